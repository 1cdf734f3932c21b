"""No code from files: ``.pt2`` programs, scenario files and their outputs (issue 12).

Every hostile file here is built from a real artifact (``torch.export.save`` of the zoo's LeNet, a
scenario that works) and edited the way an attacker would. Each case carries a side effect that
proves whether code ran: a sentinel file the payload would create, or a victim file it would change.
A control test runs each payload the way torch (or the unguarded code path) would, and shows the
sentinel appearing, so the refusals below are refusals of real attacks.
"""

from __future__ import annotations

import copy
import json
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import deployprune as dp
from deployprune import cli, converters, zoo
from deployprune._imports import check_file_callable, check_file_kwargs
from deployprune.errors import ConfigError, UnsafeFileError
from deployprune.io import save_checkpoint
from tests.io.conftest import tree_digest

SENTINEL = "SENTINEL"
VICTIM = "victim.bin"
ENUM_MODULE = "tests.hostile.sentinel_factory"  # importing it writes $DP_HOSTILE_SENTINEL
EXIT_USAGE, EXIT_INPUT = 2, 3


class Boom:
    """Unpickling this creates the file it names."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# --------------------------------------------------------------------------------------------
# Hostile .pt2 programs: a real archive with its models/model.json edited


def _edit_program(src: Path, dst: Path, edit: Callable[[dict], None]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/models/model.json"):
                program = json.loads(data)
                edit(program)
                data = json.dumps(program).encode()
            zout.writestr(info.filename, data)


def _user_input(program: dict) -> str:
    specs = program["graph_module"]["signature"]["input_specs"]
    return next(s["user_input"]["arg"]["as_tensor"]["name"] for s in specs if "user_input" in s)


def _write_file(path: Path, text: str) -> str:
    """Python that creates ``path`` (the payload every code-carrying case smuggles in)."""
    return f"__import__('pathlib').Path({str(path)!r}).write_text({text!r})"


def _sympy_size(sentinel: Path) -> Callable[[dict], None]:
    def edit(program: dict) -> None:
        meta = program["graph_module"]["graph"]["tensor_values"][_user_input(program)]
        meta["sizes"][0] = {"as_expr": {"expr_str": f"{_write_file(sentinel, 'sympy')} and 1",
                                        "hint": {"as_int": 1}}}
    return edit


def _sympy_value(sentinel: Path) -> Callable[[dict], None]:
    """A symbolic value under the user input's name: torch evaluates it when it builds that placeholder
    (values are looked up lazily, so an unreferenced one would never be parsed)."""
    def edit(program: dict) -> None:
        program["graph_module"]["graph"]["sym_int_values"][_user_input(program)] = {
            "as_expr": {"expr_str": f"{_write_file(sentinel, 'sympy value')} and 1", "hint": {"as_int": 1}}}
    return edit


def _guard_code(sentinel: Path) -> Callable[[dict], None]:
    def edit(program: dict) -> None:
        program["guards_code"] = [f"{_write_file(sentinel, 'guard')} > 0"]
    return edit


def _rename(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {(new if k == old else k): _rename(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rename(v, old, new) for v in value]
    return new if value == old else value


def _name_injection(sentinel: Path) -> Callable[[dict], None]:
    """The user input renamed so that torch.fx writes ``def forward(self, x=<payload>)``."""
    def edit(program: dict) -> None:
        old = _user_input(program)
        renamed = _rename(program, old, f"{old}={_write_file(sentinel, 'name')}")
        program.clear()
        program.update(renamed)
    return edit


def _treespec_enum(_sentinel: Path) -> Callable[[dict], None]:
    """A treespec context whose ``__enum__`` object makes torch import a module of the file's choosing."""
    def edit(program: dict) -> None:
        sig = program["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(sig["in_spec"])
        kwargs_spec = spec[1]["children_spec"][1]
        assert kwargs_spec["type"] == "builtins.dict"
        kwargs_spec["context"] = json.dumps([{"__enum__": True, "fqn": f"{ENUM_MODULE}:Missing", "name": "a"}])
        sig["in_spec"] = json.dumps(spec)
    return edit


def _from_file(victim: Path) -> Callable[[dict], None]:
    """aten.from_file(shared=True) maps the victim writable, aten.fill_ overwrites it."""
    def edit(program: dict) -> None:
        graph = program["graph_module"]["graph"]
        meta = copy.deepcopy(graph["tensor_values"][_user_input(program)])
        meta.update(sizes=[{"as_int": 4}], strides=[{"as_int": 1}])
        graph["tensor_values"].update(mapped=meta, filled=copy.deepcopy(meta))
        graph["nodes"][:0] = [
            {"target": "torch.ops.aten.from_file.default", "name": "mapped", "metadata": {},
             "inputs": [{"name": "filename", "arg": {"as_string": str(victim)}, "kind": 1},
                        {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                        {"name": "size", "arg": {"as_int": 4}, "kind": 1}],
             "outputs": [{"as_tensor": {"name": "mapped"}}]},
            {"target": "torch.ops.aten.fill_.Scalar", "name": "filled", "metadata": {},
             "inputs": [{"name": "self", "arg": {"as_tensor": {"name": "mapped"}}, "kind": 1},
                        {"name": "value", "arg": {"as_float": 7.0}, "kind": 1}],
             "outputs": [{"as_tensor": {"name": "filled"}}]},
        ]
    return edit


# id: (file, edit factory taking the sentinel/victim path, text the refusal names)
PT2_CASES: dict[str, tuple[str, Callable[[Path], Callable[[dict], None]], str]] = {
    "sympy-size-expression": ("pt2_sympy_size.pt2", _sympy_size, "a symbolic (dynamic) size"),
    "sympy-symbolic-value": ("pt2_sympy_value.pt2", _sympy_value, "symbolic (dynamic) values"),
    "guard-code": ("pt2_guard.pt2", _guard_code, "guard code, which torch executes"),
    "name-pasted-into-forward": ("pt2_name.pt2", _name_injection, "is not a plain identifier"),
    "treespec-enum-import": ("pt2_enum.pt2", _treespec_enum, "a JSON object where torch decodes"),
    "aten-from-file-writes-a-file": ("pt2_from_file.pt2", _from_file, "aten.from_file"),
}


def _payload_target(case: str, d: Path) -> Path:
    return d / VICTIM if case == "aten-from-file-writes-a-file" else d / SENTINEL


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("no_code_inputs")
    torch.manual_seed(0)
    model = zoo.build("lenet").eval()
    x = torch.randn(1, 1, 28, 28)
    torch.export.save(torch.export.export(model, (x,)), str(d / "prog.pt2"))
    converters.get("onnx").convert(model, (x,), d / "good.onnx")
    (d / "cfg.json").write_text(json.dumps({"target_sparsity": 0.5, "granularity": "out_channel"}))
    (d / VICTIM).write_bytes(b"\0" * 16)
    for case, (name, make_edit, _needle) in PT2_CASES.items():
        _edit_program(d / "prog.pt2", d / name, make_edit(_payload_target(case, d)))
    dyn = torch.export.export(model, (torch.randn(2, 1, 28, 28),),
                              dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    torch.export.save(dyn, str(d / "dynamic_batch.pt2"))
    return d


@pytest.fixture
def no_enum_module() -> Iterator[None]:
    sys.modules.pop(ENUM_MODULE, None)  # so an import would really run the module
    yield
    sys.modules.pop(ENUM_MODULE, None)


@dataclass
class Runner:
    corpus: Path
    out: Path
    capsys: pytest.CaptureFixture

    def __call__(self, *argv: str) -> tuple[int, str]:
        self.capsys.readouterr()
        code = cli.main([a.format(d=self.corpus) for a in argv])
        return code, self.capsys.readouterr().err

    def refused(self, argv: list[str], code: int, *needles: str, inputs: Path | None = None) -> str:
        """Run ``argv``; one ``error:`` line with ``code`` and every needle; no sentinel, no victim
        changed, no input changed, nothing written to the output directory."""
        inputs = inputs or self.corpus
        before = tree_digest(inputs)
        got, err = self(*argv)
        assert not (inputs / SENTINEL).exists(), f"a file ran code: {err}"
        assert got == code, (got, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert "Traceback" not in err
        for needle in needles:
            assert needle.format(d=self.corpus) in lines[0], (needle, lines[0])
        assert tree_digest(inputs) == before, "an input (or the victim file) changed"
        assert sorted(p.name for p in self.out.iterdir()) == [], "something was written to the output directory"
        return lines[0]


@pytest.fixture
def run(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        no_enum_module: None) -> Runner:
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    monkeypatch.setenv("DP_HOSTILE_SENTINEL", str(corpus / SENTINEL))
    return Runner(corpus, out, capsys)


ENTRY_POINTS = {
    "export": ["export", "{m}", "--no-latency", "--n-inputs", "2"],
    "finalize": ["finalize", "{m}"],
    "validate": ["validate", "{m}", "{d}/good.onnx", "--no-latency", "--n-inputs", "2"],
    "prune": ["prune", "{m}", "--config", "{d}/cfg.json"],
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(PT2_CASES))
def test_hostile_pt2_is_refused_by_every_command(run: Runner, case: str, entry: str) -> None:
    name, _edit, needle = PT2_CASES[case]
    argv = [a.replace("{m}", f"{{d}}/{name}") for a in ENTRY_POINTS[entry]]
    line = run.refused(argv, EXIT_INPUT, f"{{d}}/{name}: ", needle, "--trust-pickle")
    assert len(line) < 600


@pytest.mark.parametrize("case", list(PT2_CASES))
def test_hostile_pt2_is_refused_by_the_api(corpus: Path, monkeypatch: pytest.MonkeyPatch, no_enum_module: None,
                                           case: str) -> None:
    name, _edit, needle = PT2_CASES[case]
    monkeypatch.setenv("DP_HOSTILE_SENTINEL", str(corpus / SENTINEL))
    before = tree_digest(corpus)
    with pytest.raises(UnsafeFileError) as info:
        dp.load(corpus / name)
    message = str(info.value)
    assert message.startswith(f"{corpus / name}: ") and needle in message and "\n" not in message
    assert not (corpus / SENTINEL).exists()
    assert tree_digest(corpus) == before


@pytest.mark.parametrize("case", list(PT2_CASES))
def test_hostile_pt2_payloads_do_run_in_plain_torch(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    no_enum_module: None, case: str) -> None:
    """Control: the same bytes, read by torch.export.load and run the way deployprune would run them
    without the check, execute the payload (so each refusal above stops a real attack)."""
    name, make_edit, _needle = PT2_CASES[case]
    target = _payload_target(case, tmp_path)
    if case == "aten-from-file-writes-a-file":
        target.write_bytes(b"\0" * 16)
    hostile = tmp_path / name
    _edit_program(corpus / "prog.pt2", hostile, make_edit(target))
    monkeypatch.setenv("DP_HOSTILE_SENTINEL", str(tmp_path / SENTINEL))
    try:
        program = torch.export.load(str(hostile))
        program.module()(torch.randn(1, 1, 28, 28))
    except Exception:  # noqa: BLE001 - the payload has run by then (or the case is not a real attack)
        pass
    if case == "aten-from-file-writes-a-file":
        assert target.read_bytes() != b"\0" * 16, "aten.from_file + fill_ did not write the victim"
    else:
        assert (tmp_path / SENTINEL).exists(), f"{case}: the payload did not run in plain torch"


def test_dynamic_shapes_need_the_opt_in(run: Runner) -> None:
    """A genuine dynamic-batch program is refused with the way out, and loads with --trust-pickle."""
    line = run.refused(["finalize", "{d}/dynamic_batch.pt2"], EXIT_INPUT, "{d}/dynamic_batch.pt2: ",
                       "symbolic (dynamic) dimensions", "re-export it with static shapes", "--trust-pickle")
    assert "without dynamic_shapes" in line
    code, err = run("finalize", "{d}/dynamic_batch.pt2", "--trust-pickle", "--input-shape", "3,1,28,28",
                    "-o", "compact.pt2")
    assert code == 0, err
    assert "--trust-pickle" in err  # the opt-in is announced
    assert (run.out / "compact.pt2").is_file()


def test_pt2_input_shapes_share_the_checkpoint_bound(corpus: Path, tmp_path: Path) -> None:
    """A static program declaring a petabyte input is refused like a checkpoint's input_shapes entry."""
    def huge(program: dict) -> None:
        meta = program["graph_module"]["graph"]["tensor_values"][_user_input(program)]
        meta["sizes"] = [{"as_int": 1}, {"as_int": 1}, {"as_int": 2**24}, {"as_int": 2**24}]
    hostile = tmp_path / "huge_input.pt2"
    _edit_program(corpus / "prog.pt2", hostile, huge)
    with pytest.raises(Exception) as info:  # noqa: PT011 - the class is checked below
        dp.load(hostile)
    assert "too large for an example input" in str(info.value), info.value
    assert str(info.value).startswith(f"{hostile}: program input shape [1, 1, 16777216, 16777216]")


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda p: p["graph_module"]["graph"]["nodes"][0].update(target="torch.ops.import_module"),
     "operator 'torch.ops.import_module'"),
    (lambda p: p["graph_module"]["graph"]["nodes"][0].update(target="#custom_ns.op"), "operator '#custom_ns.op'"),
    (lambda p: p["graph_module"]["graph"]["nodes"][0].update(target="torch.ops.higher_order.run_const_graph"),
     "higher-order operator 'run_const_graph'"),
    (lambda p: p["graph_module"]["graph"]["custom_obj_values"].update(obj={"name": "obj", "class_fqn": "x.Y"}),
     "custom objects"),
    (lambda p: p["graph_module"]["signature"]["input_specs"].append(
        {"constant_input": {"name": "c", "value": {"as_string": "' or __import__('os') or '"}}}),
     "a constant string input"),
    (lambda p: p["graph_module"]["module_call_graph"][0]["signature"].update(
        forward_arg_names=["x=__import__('os')"]), "is not a plain identifier"),
    (lambda p: p["graph_module"]["signature"]["input_specs"][0]["parameter"].update(
        parameter_name='conv1.weight")or(__import__("os'), "is not a dotted path of plain names"),
    (lambda p: p.update(surprise=1), "unknown field 'surprise'"),
], ids=["non-aten-callable", "extension-op", "other-higher-order-op", "custom-object", "string-constant-input",
        "forward-arg-name", "parameter-name", "unknown-field"])
def test_program_json_allowlist(corpus: Path, tmp_path: Path, edit: Callable[[dict], None], needle: str) -> None:
    """More code-bearing fields the check refuses (each is pasted into code, imported or called by torch)."""
    hostile = tmp_path / "bad.pt2"
    _edit_program(corpus / "prog.pt2", hostile, edit)
    with pytest.raises(UnsafeFileError) as info:
        dp.load(hostile)
    assert needle in str(info.value), info.value


def test_payload_config_names_only_plain_records(corpus: Path, tmp_path: Path) -> None:
    """A weights config may not point at other records (opaque_obj_* is unpickled by torch) nor declare a
    tensor bigger than an empty record (torch would allocate it from nothing)."""
    def rewrite(dst: Path, change: Callable[[dict], None]) -> Path:
        with zipfile.ZipFile(corpus / "prog.pt2") as zin, zipfile.ZipFile(dst, "w") as zout:
            for info in zin.infolist():
                data = zin.read(info.filename)
                if info.filename.endswith("_weights_config.json"):
                    cfg = json.loads(data)
                    change(next(iter(cfg["config"].values())))
                    data = json.dumps(cfg).encode()
                zout.writestr(info.filename, data)
        return dst

    other = rewrite(tmp_path / "other.pt2", lambda m: m.update(path_name="../constants/opaque_obj_0"))
    with pytest.raises(UnsafeFileError, match="is not a plain weights record"):
        dp.load(other)

    def empty_but_huge(meta: dict) -> None:
        meta["path_name"] = "weight_999"
        meta["tensor_meta"]["sizes"] = [{"as_int": 2**20}, {"as_int": 2**20}]
        meta["tensor_meta"]["strides"] = [{"as_int": 2**20}, {"as_int": 1}]
    bomb = rewrite(tmp_path / "bomb.pt2", empty_but_huge)
    with zipfile.ZipFile(bomb, "a") as zf:
        zf.writestr("prog/data/weights/weight_999", b"")
    with pytest.raises(UnsafeFileError, match=r"an empty record declared as a \[1048576, 1048576\] tensor"):
        dp.load(bomb)


# --------------------------------------------------------------------------------------------
# Scenario files


@pytest.fixture
def scenario_dir(tmp_path: Path) -> Path:
    d = tmp_path / "scenario"
    d.mkdir()
    torch.manual_seed(0)
    save_checkpoint(d / "net.pt", zoo.build("mnist_net_digits"), arch="mnist_net_digits")
    torch.save({"x": Boom(d / SENTINEL)}, d / "evil.pt")  # a pickle that creates the sentinel
    return d


def _scenario(d: Path, **extra: Any) -> Path:
    sc = {"model": "net.pt", "pruning": {"target_sparsity": 0.5}, "output": "pruned.pt", **extra}
    path = d / "scenario.json"
    path.write_text(json.dumps(sc))
    return path


def _code_scenarios(d: Path) -> dict[str, dict[str, Any]]:
    """Scenario lines that ran code before the allowlist (every torch.* callable was trusted)."""
    return {
        "criterion-torch-load": {"data": "digits", "finetuning": {
            "criterion": "torch.load", "criterion_kwargs": {"f": str(d / "evil.pt"), "weights_only": False}}},
        "criterion-exec-source": {"data": "digits", "finetuning": {
            "criterion": "torch.fx.graph_module._exec_with_source",
            "criterion_kwargs": {"src": _write_file(d / SENTINEL, "exec"), "globals": {}}}},
        "model-factory-runs-the-cli": {"model": {"path": "net.pt", "factory": "deployprune.cli:main"}},
    }


CODE_SCENARIOS = {
    "criterion-torch-load": "finetuning.criterion: import path 'torch.load' comes from a file and is outside "
                            "the criterion allowlist",
    "criterion-exec-source": "import path 'torch.fx.graph_module._exec_with_source' comes from a file",
    "model-factory-runs-the-cli": "model.factory: import path 'deployprune.cli:main' comes from a file",
}


@pytest.mark.parametrize("case", list(CODE_SCENARIOS))
def test_scenario_cannot_choose_code(run: Runner, scenario_dir: Path, case: str) -> None:
    path = _scenario(scenario_dir, **_code_scenarios(scenario_dir)[case])
    line = run.refused(["run", str(path), "--no-progress"], EXIT_USAGE, f"{path}: ", CODE_SCENARIOS[case],
                       "--trust-scenario", inputs=scenario_dir)
    assert not (scenario_dir / "pruned.pt").exists(), line


@pytest.mark.parametrize("case", ["criterion-torch-load", "criterion-exec-source"])
def test_scenario_code_runs_only_with_trust_scenario(run: Runner, scenario_dir: Path, case: str) -> None:
    """Control: with --trust-scenario the same lines run the payload (so the refusal stops a real attack)."""
    path = _scenario(scenario_dir, **_code_scenarios(scenario_dir)[case])
    run("run", str(path), "--no-progress", "--trust-scenario")
    assert (scenario_dir / SENTINEL).exists()


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"weights_only": False}, "keyword argument 'weights_only' comes from a file"),
    ({"pickle_module": "pickle"}, "keyword argument 'pickle_module' comes from a file"),
    ({"map_location": "cpu"}, "keyword argument 'map_location' comes from a file"),
    ({"frobnicate": 1}, "'frobnicate' is not a parameter of CrossEntropyLoss"),
    ({"label_smoothing": {"__class__": "x"}}, "a file gives only plain values"),
])
def test_scenario_kwargs_are_plain_data_for_declared_parameters(run: Runner, scenario_dir: Path,
                                                                kwargs: dict, needle: str) -> None:
    path = _scenario(scenario_dir, finetuning={"criterion": "torch.nn.CrossEntropyLoss", "criterion_kwargs": kwargs})
    run.refused(["run", str(path), "--no-progress"], EXIT_USAGE, f"{path}: finetuning.criterion_kwargs", needle,
                inputs=scenario_dir)


def test_file_callable_allowlists() -> None:
    flag = "--trust-scenario"
    for role, path in [("criterion", "torch.nn.MSELoss"), ("optimizer", "torch.optim:AdamW"),
                       ("lr_scheduler", "torch.optim.lr_scheduler.CosineAnnealingLR"),
                       ("model factory", "deployprune.zoo.lenet:TorchModel"),
                       ("model factory", "models.lenet:TorchModel"),  # the zoo's old spelling
                       ("data", "deployprune.data:digits")]:
        check_file_callable(path, "k", role, trusted=False, flag=flag)
    for role, path in [("criterion", "torch.load"), ("optimizer", "torch.optim.Optimizer"),
                       ("lr_scheduler", "torch.optim.lr_scheduler.LambdaLR"), ("model factory", "models.yolo:Model"),
                       ("model factory", "deployprune.zoo.make_samples:main"), ("data", "torch.hub:load"),
                       ("schedule function", "torch:load"), ("criterion", "numpy.load")]:
        with pytest.raises(ConfigError, match=f"outside the {role} allowlist"):
            check_file_callable(path, "k", role, trusted=False, flag=flag)
        check_file_callable(path, "k", role, trusted=True, flag=flag)  # the command-line opt-in
    check_file_kwargs(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, "k", trusted=False, flag=flag)
    check_file_kwargs(torch.optim.Adam, {"betas": [0.9, 0.99]}, "k", trusted=False, flag=flag)
    with pytest.raises(ConfigError, match="'weights_only' comes from a file"):
        check_file_kwargs(torch.load, {"weights_only": False}, "k", trusted=False, flag=flag)


# --------------------------------------------------------------------------------------------
# Scenario outputs: replacing files and writing outside the scenario's folder


def test_scenario_cannot_replace_a_file_outside_its_folder(run: Runner, scenario_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "important.pt"
    victim.write_bytes(b"unrelated file")
    path = _scenario(scenario_dir, output=str(victim), force=True)
    run.refused(["run", str(path), "--no-progress"], EXIT_USAGE, f"{path}: output: {victim} is outside the "
                "scenario's folder", "--allow-outside", inputs=elsewhere)
    # --allow-outside alone does not let the file's force: true replace it
    run.refused(["run", str(path), "--no-progress", "--allow-outside"], EXIT_INPUT, f"{victim}: already exists",
                "--force",
                inputs=elsewhere)
    assert victim.read_bytes() == b"unrelated file"
    # both flags on the command line: the user's own decision
    code, err = run("run", str(path), "--no-progress", "--allow-outside", "--force")
    assert code == 0, err
    assert victim.read_bytes() != b"unrelated file"


@pytest.mark.parametrize(("extra", "key"), [
    ({"output": "../escaped.pt"}, "output"),
    ({"export": {"target": "onnx", "path": "/tmp/../tmp/deployprune-escaped.onnx"}}, "export.path"),
    ({"finetuning": {"checkpoint_dir": "../runs"}}, "finetuning.checkpoint_dir"),
])
def test_scenario_outputs_stay_in_its_folder(run: Runner, scenario_dir: Path, extra: dict, key: str) -> None:
    path = _scenario(scenario_dir, **extra)
    run.refused(["run", str(path), "--no-progress"], EXIT_USAGE, f"{path}: {key}: ", "outside the scenario's folder",
                inputs=scenario_dir.parent)


def test_scenario_outputs_through_a_symlink_are_outside(run: Runner, scenario_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (scenario_dir / "link").symlink_to(elsewhere, target_is_directory=True)
    path = _scenario(scenario_dir, output="link/pruned.pt")
    run.refused(["run", str(path), "--no-progress"], EXIT_USAGE, f"{path}: output: ", "outside the scenario's folder",
                inputs=tmp_path)


def test_scenario_force_needs_the_command_line(run: Runner, scenario_dir: Path) -> None:
    (scenario_dir / "pruned.pt").write_bytes(b"previous result")
    path = _scenario(scenario_dir, force=True)
    run.refused(["run", str(path), "--no-progress"], EXIT_INPUT, "pruned.pt: already exists", "--force",
                inputs=scenario_dir)
    assert (scenario_dir / "pruned.pt").read_bytes() == b"previous result"
    code, err = run("run", str(path), "--no-progress", "--force")
    assert code == 0, err
    assert (scenario_dir / "pruned.pt").read_bytes() != b"previous result"


def test_scenario_default_artifact_goes_next_to_the_output(run: Runner, scenario_dir: Path) -> None:
    path = _scenario(scenario_dir, output="out/pruned.pt", export={"target": "onnx", "latency": False,
                                                                   "n_inputs": 2})
    (scenario_dir / "out").mkdir()
    code, err = run("run", str(path), "--no-progress")
    assert code == 0, err
    assert (scenario_dir / "out" / "pruned.onnx").is_file()
    assert sorted(p.name for p in run.out.iterdir()) == []  # nothing in the working directory
