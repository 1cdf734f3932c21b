"""The real command line (``python -m deployprune``): exit codes, one-line errors, no strays."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from deployprune import cli, zoo
from deployprune.pipeline import masked_copy
from tests.faults import swap_output_channels
from tests.io.conftest import SAMPLES, tree_digest
from tests.io.factories import tiny_conv

REPO = Path(__file__).resolve().parents[2]
LENET_SAMPLE = SAMPLES / "lenet.pt"


def run(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300,
        module: str = "deployprune") -> subprocess.CompletedProcess:
    """``python -m deployprune ARGS``; ``module="tests.faulty_cli"`` runs it with a wrong ONNX export."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    if message.endswith("..."):
        assert lines[0].startswith(f"error: {message[:-3]}"), lines[0]
    else:
        assert lines[0] == f"error: {message}"


def conv_shapes(path: Path) -> list[list[int]]:
    proto = onnx.load(str(path))
    inits = {i.name: list(i.dims) for i in proto.graph.initializer}
    return [inits[n.input[1]] for n in proto.graph.node if n.op_type == "Conv"]


def ort_max_error(path: Path, model: torch.nn.Module, n: int = 3) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(7)
    worst = 0.0
    for _ in range(n):
        x = torch.randn(1, 1, 28, 28, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        worst = max(worst, float(np.abs(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0] - ref).max()))
    return worst


def tutorial_reference() -> torch.nn.Module:
    model = zoo.build("lenet")
    mask = torch.ones_like(model.conv1.weight)
    mask[0:3] = 0
    return masked_copy(model, {"conv1": {"weight": mask.bool()}})


# --------------------------------------------------------------------------------------------


def test_help_and_version(tmp_path: Path) -> None:
    proc = run("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in ("export", "finalize", "validate", "report", "targets", "prune"):
        assert command in proc.stdout
    proc = run("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("deployprune ")
    assert cli.main([]) == 2  # no command: help on stderr, usage exit code


def test_readme_first_command_nni_tutorial(tmp_path: Path) -> None:
    """`deployprune export models/samples/lenet.pt --target onnx`, no other flag."""
    before = tree_digest(SAMPLES)
    proc = run("export", str(LENET_SAMPLE), "--target", "onnx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr == ""
    out = tmp_path / "lenet.onnx"
    assert proc.stdout.splitlines()[0].startswith(f"artifact:   {out.name} (onnx, ")
    assert any(line.startswith("PASS") for line in proc.stdout.splitlines())
    assert "latency" in proc.stdout and "report:     lenet.onnx.report.json" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.onnx", "lenet.onnx.report.json"]
    # conv1: Conv2d(1, 3), conv2: Conv2d(3, 16); onnxruntime matches the masked model
    assert conv_shapes(out)[:2] == [[3, 1, 5, 5], [16, 3, 5, 5]]
    assert ort_max_error(out, tutorial_reference()) <= 1e-5
    assert tree_digest(SAMPLES) == before

    # a second run refuses to overwrite, --force replaces
    proc = run("export", str(LENET_SAMPLE), cwd=tmp_path)
    assert_one_line_error(proc, 3, "lenet.onnx: already exists; pass --force to overwrite it")
    proc = run("export", str(LENET_SAMPLE), "--force", "--n-inputs", "2", "--no-latency", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_nni_tutorial_with_state_dict_and_masks_flags(tmp_path: Path) -> None:
    model = zoo.build("lenet")
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    mask = torch.ones_like(model.conv1.weight)
    mask[0:3] = 0
    torch.save({"conv1": {"weight": mask}}, tmp_path / "masks.pt")
    proc = run("export", "weights.pth", "--model", "deployprune.zoo.lenet:TorchModel", "--masks", "masks.pt",
               "-o", "out/tut.onnx", cwd=tmp_path) if (tmp_path / "out").mkdir() is None else None
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out" / "tut.onnx"
    assert conv_shapes(out)[:2] == [[3, 1, 5, 5], [16, 3, 5, 5]]
    assert ort_max_error(out, tutorial_reference()) <= 1e-5


def test_finalize_validate_report_targets(tmp_path: Path) -> None:
    proc = run("finalize", str(LENET_SAMPLE), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "conv1: Conv2d(1, 6) -> Conv2d(1, 3)" in proc.stdout
    assert "conv2: Conv2d(6, 16) -> Conv2d(3, 16)" in proc.stdout
    assert (tmp_path / "lenet.compact.pt2").is_file()

    # export the compact program, then validate the artifact against the masked sample
    proc = run("export", "lenet.compact.pt2", "-o", "c.onnx", "--no-validate", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "validation: skipped (--no-validate)" in proc.stdout
    assert not (tmp_path / "c.onnx.report.json").exists()
    proc = run("validate", str(LENET_SAMPLE), "c.onnx", "--n-inputs", "3", "--no-latency", "--json", "v.json",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PASS")
    # a real fault: two output channels of the last layer swapped in a copy of the artifact
    shutil.copy(tmp_path / "c.onnx", tmp_path / "bad.onnx")
    swap_output_channels(tmp_path / "bad.onnx")
    proc = run("validate", str(LENET_SAMPLE), "bad.onnx", "--n-inputs", "2", "--no-latency", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.startswith("error: bad.onnx: validation failed: output 'output_0': ")
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stdout.startswith("FAIL")

    proc = run("report", "v.json", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("#")
    proc = run("targets", "onnx", cwd=tmp_path)
    assert proc.returncode == 0 and "opset" in proc.stdout


def test_report_and_targets_in_process(tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import deployprune as dp
    from deployprune.io import load_model

    loaded = load_model(LENET_SAMPLE)
    path = dp.export(loaded.model, loaded.example_inputs, tmp_path / "l.onnx", masks=loaded.masks)
    report = dp.validate(masked_copy(loaded.model, loaded.masks), path, loaded.example_inputs, n_inputs=2,
                         latency=False)
    (tmp_path / "r.json").write_text(report.to_json())
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", "r.json", "-o", "r.md"]) == 0
    assert (tmp_path / "r.md").read_text().startswith("#")
    assert cli.main(["report", "r.json", "-o", "r.html"]) == 0
    assert "<html" in (tmp_path / "r.html").read_text().lower()
    assert cli.main(["report", "r.json", "-o", "r.md"]) == 3  # exists, no --force
    assert cli.main(["report", "missing.json"]) == 3
    assert cli.main(["targets"]) == 0
    out, err = capsys.readouterr()
    assert "onnx" in out.split() and "coreml" in out.split()
    assert err.splitlines() == [
        "error: r.md: already exists; pass --force to overwrite it",
        "error: missing.json: report not found; check the path",
    ]


# --------------------------------------------------------------------------------------------
# bad inputs: one line, right exit code, inputs untouched, nothing written


class Boom:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    model = zoo.build("lenet")
    torch.save(model.state_dict(), d / "lenet_sd.pt")
    (d / "corrupt.pt").write_bytes(b"\x80\x02garbage" * 50)
    torch.save(tiny_conv(), d / "whole.pt")
    with open(d / "evil.pt", "wb") as fh:
        pickle.dump({"x": Boom(str(d / "SENTINEL"))}, fh)
    good = torch.ones_like(model.conv1.weight)
    torch.save({"conv9": {"weight": good}}, d / "masks_unknown.pt")
    torch.save({"conv1": {"weight": torch.ones(6, 1, 3, 3)}}, d / "masks_shape.pt")
    half = good.clone()
    half[0] = 0.5
    torch.save({"conv1": {"weight": half}}, d / "masks_nonbinary.pt")
    return d


LENET = "deployprune.zoo.lenet:TorchModel"

BAD_INPUTS = [
    ("missing file", ["export", "{d}/nope.pt"], 3, "{d}/nope.pt: no such file; check the model file path"),
    ("corrupt file", ["export", "{d}/corrupt.pt"], 3, "{d}/corrupt.pt: cannot be read as a PyTorch file..."),
    ("pickled module without opt-in", ["export", "{d}/whole.pt", "--input-shape", "1,3,8,8"], 3,
     "{d}/whole.pt: loading it would run code from the file (it pickles tests.io.factories.TinyConv); if you "
     "trust its source, rerun with --trust-pickle, or save a state_dict and pass --model "
     "package.module:factory"),
    ("code-running pickle", ["export", "{d}/evil.pt", "--input-shape", "1,2"], 3,
     "{d}/evil.pt: loading it would run code from the file (it pickles io.open)..."),
    ("state_dict without --model", ["export", "{d}/lenet_sd.pt"], 2,
     "{d}/lenet_sd.pt: is a state_dict; pass the architecture with --model package.module:factory "
     "(e.g. --model deployprune.zoo.lenet:TorchModel)"),
    ("masks naming a missing module", ["export", "{d}/lenet_sd.pt", "--model", LENET, "--masks",
                                       "{d}/masks_unknown.pt"], 3,
     "{d}/masks_unknown.pt: module 'conv9' does not exist in the model (did you mean 'conv2', 'conv1'?)"),
    ("mask of wrong shape", ["export", "{d}/lenet_sd.pt", "--model", LENET, "--masks", "{d}/masks_shape.pt"], 3,
     "{d}/masks_shape.pt: conv1.weight: mask shape (6, 1, 3, 3) does not match parameter shape (6, 1, 5, 5)"),
    ("non-binary mask", ["export", "{d}/lenet_sd.pt", "--model", LENET, "--masks", "{d}/masks_nonbinary.pt"], 3,
     "{d}/masks_nonbinary.pt: conv1.weight: mask is not binary (found 0.5); masks must hold only 0 and 1"),
    ("wrong --input-shape", ["export", "{d}/lenet_sd.pt", "--model", LENET, "--input-shape", "1,3,28,28"], 3,
     "{d}/lenet_sd.pt: the model fails on input 1x3x28x28 (float32) (RuntimeError: Given groups=1, weight of "
     "size [6, 1, 5, 5], expected input[1, 3, 28, 28] to have 1 channels..."),
    ("malformed --input-shape", ["export", "{d}/lenet_sd.pt", "--model", LENET, "--input-shape", "1,x"], 2,
     "--input-shape '1,x': dimensions must be integers; expected e.g. 1,3,224,224 or 1,16:int64 "
     "(shape[:dtype[:high]])"),
    ("unwritable output path", ["export", "{d}/lenet_sd.pt", "--model", LENET, "-o", "/sys/lenet.onnx"], 3,
     "/sys/lenet.onnx: ..."),
    ("output directory missing", ["export", "{d}/lenet_sd.pt", "--model", LENET, "-o", "no/dir/x.onnx"], 3,
     "no/dir/x.onnx: directory no/dir does not exist; create it first"),
    ("output overwrites input", ["export", "{d}/lenet_sd.pt", "--model", LENET, "-o", "{d}/lenet_sd.pt"], 2,
     "{d}/lenet_sd.pt: the output would overwrite the input file; choose another -o path"),
    ("unknown target", ["export", "{d}/lenet_sd.pt", "--target", "tflite"], 5,
     "unknown target 'tflite'..."),
    ("unknown converter option", ["export", "{d}/lenet_sd.pt", "--opt", "opsett=17"], 2,
     "onnx: unknown option 'opsett' (did you mean 'opset'?)..."),
    ("untrusted factory via flag typo", ["export", "{d}/lenet_sd.pt", "--model", "deployprune.zoo.lenet:Nope"], 2,
     "--model 'deployprune.zoo.lenet:Nope': module 'deployprune.zoo.lenet' has no attribute 'Nope'; "
     "check the spelling"),
    ("unknown flag", ["export", "{d}/lenet_sd.pt", "--frobnicate"], 2,
     "deployprune: unrecognized arguments: --frobnicate (see 'deployprune --help')"),
]


@pytest.mark.parametrize(("case", "args", "code", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs(corpus: Path, tmp_path: Path, case: str, args: list[str], code: int, message: str) -> None:
    before = tree_digest(corpus)
    proc = run(*[a.format(d=corpus) for a in args], cwd=tmp_path)
    assert_one_line_error(proc, code, message.format(d=corpus))
    assert tree_digest(corpus) == before, "an input file changed"
    assert list(tmp_path.iterdir()) == [], "something was written"
    assert not (corpus / "SENTINEL").exists(), "the pickle's code ran"


def test_trust_pickle_loads_whole_module(corpus: Path, tmp_path: Path) -> None:
    proc = run("export", str(corpus / "whole.pt"), "--trust-pickle", "--input-shape", "1,3,8,8",
               "--n-inputs", "2", "--no-latency", "-o", "w.onnx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == f"warning: {corpus / 'whole.pt'}: unpickling with code execution allowed (--trust-pickle)\n"
    assert (tmp_path / "w.onnx").is_file()


def test_validation_failure_exit_code(tmp_path: Path) -> None:
    # the export writes a wrong artifact (two output channels swapped after conversion)
    proc = run("export", str(LENET_SAMPLE), "--n-inputs", "2", "--no-latency", cwd=tmp_path,
               module="tests.faulty_cli")
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.startswith("error: lenet.onnx.report.json: validation failed: output 'output_0': ")
    assert len(proc.stderr.splitlines()) == 1
    assert "FAIL" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.onnx.report.json"]  # no unverified artifact


def test_debug_shows_traceback(tmp_path: Path) -> None:
    proc = run("export", "nope.pt", "--debug", cwd=tmp_path)
    assert proc.returncode == 3
    assert "Traceback" in proc.stderr
    assert proc.stderr.splitlines()[-1] == "error: nope.pt: no such file; check the model file path"


def test_internal_error_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def boom(args):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(cli, "cmd_targets", boom)
    assert cli.main(["targets"]) == 1
    err = capsys.readouterr().err
    assert err == ("error: internal error (RuntimeError: something unexpected); rerun with --debug for the "
                   "traceback and please report it\n")


# --------------------------------------------------------------------------------------------
# interruptions


@pytest.mark.parametrize(("sig", "code", "message"), [
    (signal.SIGTERM, 143, "error: terminated (SIGTERM); no partial output was left behind"),
    (signal.SIGINT, 130, "error: interrupted; no partial output was left behind"),
])
def test_interrupted_export_leaves_nothing(tmp_path: Path, sig: int, code: int, message: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    torch.save(tiny_conv().state_dict(), tmp_path / "tiny.pt")
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DP_TEST_READY": str(ready)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployprune", "export", str(tmp_path / "tiny.pt"), "--model",
         "tests.io.factories:slow_export", "--input-shape", "1,3,8,8", "-o", "slow.onnx"],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the export never started"
            time.sleep(0.1)
        staged = [p.name for p in work.iterdir()]
        assert len(staged) == 1 and staged[0].endswith(".partial")  # mid-write: only the staging dir
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code
    assert err.splitlines() == [message]
    assert list(work.iterdir()) == []


# --------------------------------------------------------------------------------------------
# masked channels finalize keeps or cannot remove: reported, --strict, abandoned compaction


@pytest.fixture()
def lenet_with_kept_channels(tmp_path: Path) -> Path:
    """lenet weights and masks: conv1's filters 0-2 (removable) and fc3's outputs 0-1, which the final
    log_softmax mixes (so they stay)."""
    model = zoo.build("lenet")
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    conv = torch.ones_like(model.conv1.weight)
    conv[0:3] = 0
    fc = torch.ones_like(model.fc3.weight)
    fc[0:2] = 0
    torch.save({"conv1": {"weight": conv}, "fc3": {"weight": fc}}, tmp_path / "masks.pt")
    return tmp_path


def test_kept_masked_channels_are_reported_and_strict_fails(lenet_with_kept_channels: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    import json

    monkeypatch.chdir(lenet_with_kept_channels)
    load = ["weights.pth", "--model", LENET, "--masks", "masks.pt"]
    reason = "mixed by log_softmax: F.log_softmax (node log_softmax)"
    kept_line = f"removed 3 of 5 masked channels; kept 2 in 'fc3' ({reason})"
    assert cli.main(["export", *load, "-o", "k.onnx", "--n-inputs", "2", "--no-latency"]) == 0
    out = capsys.readouterr().out
    assert f"compaction: {kept_line}" in out.splitlines()
    finalize = json.loads(Path("k.onnx.report.json").read_text())["pipeline"]["finalize"]
    assert finalize["compacted"] is True and finalize["abandoned"] is None
    assert (finalize["masked_channels"], finalize["removed_channels"], finalize["kept_channels"]) == (5, 3, 2)
    assert finalize["kept"] == [{"module": "fc3", "count": 2, "reason": reason, "node": "log_softmax",
                                 "op": "F.log_softmax"}]
    assert cli.main(["finalize", *load, "-o", "k.pt2"]) == 0
    assert f"compaction:    {kept_line}" in capsys.readouterr().out.splitlines()

    before = sorted(p.name for p in Path(".").iterdir())
    for command in (["export", *load, "-o", "s.onnx", "--strict"], ["finalize", *load, "-o", "s.pt2", "--strict"]):
        assert cli.main(command) == 5
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: finalize (strict): 2 of 5 masked channels stay: "), err
        assert f"kept 2 in 'fc3' ({reason})" in err[0]
    assert sorted(p.name for p in Path(".").iterdir()) == before  # nothing written


def _swap_first_two_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real fault: the Conv2d rebuilder swaps the first two filters of every conv it shrinks, so the
    compacted model is wrong and finalize's self-check must catch it."""
    from torch import nn

    from deployprune.finalize import rule_registry

    original = rule_registry._MODULE_RULES[nn.Conv2d]

    def faulty(a, node, module) -> None:
        original(a, node, module)
        rebuild = a.rebuilders[str(node.target)]

        def swapped():
            new = rebuild()
            if new is not None and new.out_channels > 1:
                with torch.no_grad():
                    new.weight[[0, 1]] = new.weight[[1, 0]].clone()
                    new.bias[[0, 1]] = new.bias[[1, 0]].clone()
            return new

        a.rebuilders[str(node.target)] = swapped

    monkeypatch.setitem(rule_registry._MODULE_RULES, nn.Conv2d, faulty)


def test_abandoned_compaction_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    import json

    monkeypatch.chdir(tmp_path)
    _swap_first_two_filters(monkeypatch)
    sample = str(LENET_SAMPLE)
    for command in (["export", sample, "--n-inputs", "2", "--no-latency"], ["finalize", sample]):
        assert cli.main(command) == 4  # ParityError: the code of a wrong answer
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1, err
        assert err[0].startswith(f"error: {sample}: compaction abandoned (self-check failed: max abs error "), err
        assert "nothing was written" in err[0] and "please report this model" in err[0]
        assert "--allow-uncompacted" in err[0]
        assert list(tmp_path.iterdir()) == []

    # opted in: the masked model goes on at full size, and the summary and the report say so
    assert cli.main(["export", sample, "--n-inputs", "2", "--no-latency", "--allow-uncompacted"]) == 0
    captured = capsys.readouterr()
    line = next(x for x in captured.out.splitlines() if x.startswith("compaction: "))
    assert line.startswith("compaction: removed 0 of 3 masked channels; kept 3 in 'conv1' (compaction abandoned: "
                           "self-check failed (max abs error "), line
    assert "please report this model" in captured.err
    report = json.loads((tmp_path / "lenet.onnx.report.json").read_text())
    finalize = report["pipeline"]["finalize"]
    assert finalize["compacted"] is False and finalize["abandoned"].startswith("self-check failed")
    assert (finalize["masked_channels"], finalize["removed_channels"]) == (3, 0)
    assert report["pipeline"]["params"]["compact"] == report["pipeline"]["params"]["source"]
    assert any(n.startswith("finalize abandoned compaction") for n in report["notes"])
    assert cli.main(["finalize", sample, "--allow-uncompacted"]) == 0
    assert "compaction:    removed 0 of 3 masked channels" in capsys.readouterr().out
