"""Issue 13's user journeys that had no test, or one that a regression would pass (audit of the "Why" list).

Each test runs the command line as a user does (``python -m deployprune`` in a subprocess, or the same
``main()`` in process where a fault has to be injected) and checks the text the user reads. Five of them
began as strict xfails for bugs the audit found (staging path and Python option names in converter
warnings, run's error naming --model, the bare 'top-1' parity column, the params baseline differing
between ONNX and Core ML); each failed before its fix.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deployprune import cli, zoo

from .test_cli import LENET_SAMPLE, REPO, run

SAMPLES = REPO / "models" / "samples"
PROGRESS = re.compile(r"^\[ *\d+\.\ds\] (.*)$")


def _with_progress() -> dict[str, str]:
    """The environment without tests/conftest.py's ``DEPLOYPRUNE_PROGRESS=0`` (for a subprocess)."""
    env = {k: v for k, v in os.environ.items() if k != "DEPLOYPRUNE_PROGRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run_progress(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deployprune", *args], cwd=cwd, env=_with_progress(),
                          capture_output=True, text=True, timeout=600)


# --- Silence: a long conversion is announced while it runs, not after --------------------------------

GATED_MODEL = """
import os
import time
from pathlib import Path

import torch


class Gated(torch.nn.Module):
    # Its ONNX export waits until the test has read the 'converting' line and created the file 'go'.
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            for _ in range(1200):
                if Path("go").exists():
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError("nobody said go: no progress line reached stderr during the conversion")
        return self.conv(x)


def build():
    torch.manual_seed(0)
    return Gated().eval()
"""


def test_a_long_conversion_is_announced_while_it_runs(tmp_path: Path) -> None:
    """'a ResNet-18 export prints nothing for 68 s': the 'converting' line must reach a pipe *during* the
    conversion (a test of the final stderr alone passes even if every line came at the end)."""
    (tmp_path / "gated.py").write_text(GATED_MODEL)
    torch.manual_seed(0)
    torch.save({f"conv.{k}": v for k, v in torch.nn.Conv2d(3, 4, 3).state_dict().items()}, tmp_path / "w.pt")
    proc = subprocess.Popen([sys.executable, "-m", "deployprune", "export", "w.pt", "--model", "gated:build",
                             "--input-shape", "1,3,8,8", "-o", "g.onnx", "--no-latency", "--n-inputs", "2"],
                            cwd=tmp_path, env=_with_progress(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen: list[str] = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "converting to onnx" in line:
                assert not (tmp_path / "g.onnx").exists()  # announced before the artifact is there
                (tmp_path / "go").touch()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, "".join(seen)
    assert (tmp_path / "go").exists(), "".join(seen)
    assert out.startswith("artifact:   g.onnx (onnx, ")


def test_validate_announces_its_latency_timing(tmp_path: Path) -> None:
    """'latency timing has no indication': for ``validate`` too, not only ``export``; ``-q`` silences it."""
    proc = run("export", str(LENET_SAMPLE), "-o", "l.onnx", "--no-validate", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = _run_progress("validate", str(LENET_SAMPLE), "l.onnx", "--repeats", "3", "--warmup", "0",
                         cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert all(PROGRESS.match(line) for line in lines), proc.stderr  # nothing but progress lines
    stages = [PROGRESS.match(line).group(1) for line in lines]
    assert any(s.startswith("timing batch 1: ") for s in stages), stages
    assert "latency  batch 1" in proc.stdout
    quiet = _run_progress("-q", "validate", str(LENET_SAMPLE), "l.onnx", "--repeats", "3", "--warmup", "0",
                          cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""


# --- Output paths: the private staging directory never reaches the user -------------------------------


def test_a_converter_error_names_the_output_not_the_staging_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """The ONNX converter's own onnxruntime check fails (injected: it measures a huge error); its message is
    written with the path it was given, the staging one, and must reach the terminal with ``-o``'s name."""
    from deployprune.converters import onnx as onnx_converter

    monkeypatch.setattr(onnx_converter, "parity", lambda reference, outputs: (1.0, 1.0))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    code = cli.main(["export", str(LENET_SAMPLE), "-o", "out/z.onnx", "--no-latency", "--n-inputs", "2"])
    err = capsys.readouterr().err.splitlines()
    assert code == 4, err
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {Path('out', 'z.onnx')}: onnxruntime output differs from torch "), err[0]
    assert ".partial" not in err[0]
    assert list((tmp_path / "out").iterdir()) == []  # and nothing was left behind


@pytest.fixture
def tiny_weights(tmp_path: Path) -> Path:
    """LeNet weights with three values fp16 stores as 0: the Core ML converter warns about them."""
    model = zoo.build("lenet")
    with torch.no_grad():
        model.fc3.weight[0, :3] = 1e-9
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    return tmp_path


def _coreml_warnings(folder: Path) -> list[str]:
    pytest.importorskip("coremltools")
    proc = run("export", "tiny.pt", "--model", "deployprune.zoo.lenet:TorchModel", "--target", "coreml",
               "-o", "tiny.mlpackage", "--no-latency", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "fp16 storage turns 3 non-zero weight values into 0" in warnings[0], proc.stderr
    return warnings


def test_a_converter_warning_names_the_output_not_the_staging_path(tiny_weights: Path) -> None:
    (warning,) = _coreml_warnings(tiny_weights)
    assert ".partial" not in warning, warning
    assert warning.startswith("warning: tiny.mlpackage: fp16 storage turns 3 "), warning


def test_a_converter_warning_names_the_opt_flag(tiny_weights: Path) -> None:
    (warning,) = _coreml_warnings(tiny_weights)
    assert warning.endswith("; pass --opt precision=fp32 to keep them"), warning
    assert "precision='fp32'" not in warning


# --- Snippets: the scenario example with a state_dict -------------------------------------------------


SCENARIO = {"pruning": [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "out_channel"}],
            "output": "net.pruned.pt", "export": {"latency": False, "n_inputs": 2}}


@pytest.fixture
def state_dict_dir(tmp_path: Path) -> Path:
    torch.save(zoo.build("mnist_net_digits").state_dict(), tmp_path / "net.pt")
    return tmp_path


def test_a_scenario_runs_a_state_dict_with_its_factory(state_dict_dir: Path) -> None:
    """docs/training.md: 'for a plain state_dict give the architecture too: "model": {"path", "factory"}'."""
    scenario = {**SCENARIO, "model": {"path": "net.pt", "factory": "deployprune.zoo.mnist_net:mnist_net_digits"}}
    (state_dict_dir / "s.json").write_text(json.dumps(scenario))
    proc = run("run", "s.json", cwd=state_dict_dir)
    assert proc.returncode == 0, proc.stderr
    assert "PASS  net.pruned.onnx (onnxruntime)" in proc.stdout
    assert (state_dict_dir / "net.pruned.pt").is_file() and (state_dict_dir / "net.pruned.onnx").is_file()


def test_a_scenario_with_a_bare_state_dict_names_the_scenario_key(state_dict_dir: Path) -> None:
    """'the scenario example (state_dict without factory; run has no --model)': the error must say what to
    write in the scenario, not name a flag of another command."""
    (state_dict_dir / "s.json").write_text(json.dumps({**SCENARIO, "model": "net.pt"}))
    proc = run("run", "s.json", cwd=state_dict_dir)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "--model" not in line, line
    assert "factory" in line and "net.pt" in line, line
    assert not (state_dict_dir / "net.pruned.pt").exists()


# --- Wording: one size format ------------------------------------------------------------------------

SIZE = r"\d+(?:\.\d+)? (?:B|kB|MB|GB)"


def test_the_artifact_line_and_the_size_line_write_a_size_alike(tmp_path: Path) -> None:
    """'176.0 KB beside 176 kB': the size in the artifact line is the size line's artifact figure, as written."""
    proc = run("export", str(LENET_SAMPLE), "-o", "l.onnx", "--no-latency", "--n-inputs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    artifact = re.fullmatch(rf"artifact:   l\.onnx \(onnx, ({SIZE})\)", lines[0])
    assert artifact, lines[0]
    size_line = next(line for line in lines if line.startswith("size "))
    size = re.fullmatch(rf"size +({SIZE}) -> ({SIZE}) \(\d+\.\d%\)", size_line)
    assert size, size_line
    assert artifact.group(1) == size.group(2)
    on_disk = (tmp_path / "l.onnx").stat().st_size
    assert artifact.group(1) == f"{on_disk / 1000:.3g} kB"  # 3 significant digits, decimal kB
    assert "KB" not in proc.stdout


# --- Reports: top-1 agreement on random inputs is not accuracy ---------------------------------------


def test_the_report_parity_table_says_top1_agreement(tmp_path: Path) -> None:
    proc = run("export", str(LENET_SAMPLE), "-o", "l.onnx", "--no-latency", "--n-inputs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    md = run("report", "l.onnx.report.json", "--format", "md", cwd=tmp_path)
    assert md.returncode == 0, md.stderr
    header = next(line for line in md.stdout.splitlines() if line.startswith("| output | shape |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert "top-1 agreement" in cells, header
    assert "top-1" not in cells, header
    page = run("report", "l.onnx.report.json", "-o", "l.html", cwd=tmp_path)
    assert page.returncode == 0, page.stderr
    html = (tmp_path / "l.html").read_text()
    assert "<th>top-1</th>" not in html and "top-1 agreement" in html


# --- Wording: ONNX and Core ML count alike, with the default flags -----------------------------------


def _params_line(stdout: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.startswith("params ")]
    return line


def test_onnx_and_coreml_summaries_count_alike_with_the_default_flags(tmp_path: Path) -> None:
    """tests/cli/test_summary_counts.py passes --no-latency, which is not the journey a user runs: the
    README's ``deployprune export models/samples/resnet_small.pt --target onnx`` times the artifact."""
    pytest.importorskip("coremltools")
    sample = str(SAMPLES / "resnet_small.pt")
    onnx_run = run("export", sample, "--target", "onnx", "-o", "r.onnx", cwd=tmp_path)
    assert onnx_run.returncode == 0, onnx_run.stderr
    coreml_run = run("export", sample, "--target", "coreml", "-o", "r.mlpackage", cwd=tmp_path)
    assert coreml_run.returncode == 0, coreml_run.stderr
    onnx_line, coreml_line = _params_line(onnx_run.stdout), _params_line(coreml_run.stdout)
    assert onnx_line == coreml_line, (onnx_line, coreml_line)


# --- Exit codes: a bad import path is a usage error, wherever it is given -----------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["finalize", "{d}/sd.pt", "--model", "nosuchmod:build", "-o", "x.pt"],
     "--model 'nosuchmod:build': cannot import module 'nosuchmod'..."),
    (["validate", "{d}/sd.pt", "{d}/l.onnx", "--model", "nosuchmod:build"],
     "--model 'nosuchmod:build': cannot import module 'nosuchmod'..."),
    (["prune", "{d}/sd.pt", "--config", "{d}/prune.json", "--model", "nosuchmod:build", "-o", "x.pt"],
     "--model 'nosuchmod:build': cannot import module 'nosuchmod'..."),
    (["prune", "{d}/net.pt", "--config", "{d}/prune.json", "--data", "digits", "--lr-scheduler",
      "nosuchmod.Sched", "-o", "x.pt"], "lr_scheduler 'nosuchmod.Sched': cannot import module 'nosuchmod'..."),
    (["export", "{d}/sd.pt", "--model", "brokenmod:build"],
     "--model 'brokenmod:build': cannot import module 'brokenmod' (No module named 'nonexistent_pkg')..."),
    (["prune", "{d}/net.pt", "--config", "{d}/prune.json", "--data", "digits", "--optimizer", "brokenmod.Opt",
      "-o", "x.pt"], "optimizer 'brokenmod.Opt': cannot import module 'brokenmod' (No module named "
                     "'nonexistent_pkg')..."),
], ids=["finalize-model", "validate-model", "prune-model", "lr-scheduler", "model-import-fails-inside",
        "optimizer-import-fails-inside"])
def test_a_bad_import_path_is_exit_2_for_every_command(tmp_path_factory: pytest.TempPathFactory,
                                                      tmp_path: Path, args: list[str], message: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """'exit codes for a bad import path differ between --model (3) and --optimizer (2)': the other commands
    and flags that import, and a module that exists but fails to import, are usage errors too."""
    d = tmp_path_factory.getbasetemp() / "imports"
    if not d.exists():
        d.mkdir()
        torch.save(zoo.build("lenet").state_dict(), d / "sd.pt")
        from deployprune.io import save_checkpoint

        save_checkpoint(d / "net.pt", zoo.build("mnist_net_digits"), arch="mnist_net_digits")
        (d / "prune.json").write_text('{"target_sparsity": 0.5, "granularity": "channel"}')
        (d / "l.onnx").write_bytes(b"")  # validate fails on the import before it reads the artifact
    (tmp_path / "brokenmod.py").write_text("import nonexistent_pkg  # noqa: F401\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = cli.main([a.format(d=d) for a in args])
    err = capsys.readouterr().err.splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {message[:-3]}"), err[0]
    assert list(tmp_path.iterdir()) == [tmp_path / "brokenmod.py"]  # nothing written
    sys.modules.pop("brokenmod", None)
