"""``deployprune prune`` and ``deployprune run`` through the real command line (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deployprune import zoo
from deployprune.io import load_model, save_checkpoint

REPO = Path(__file__).resolve().parents[2]
CONFIG = {
    "module_type_configs": {"Conv2d": {"target_sparsity": 0.5, "granularity": "channel"},
                            "Linear": {"target_sparsity": 0.8}},
    "schedule": {"type": "polynomial", "begin_step": 0, "end_step": 20, "frequency": 5},
}


def run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(cwd)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "deployprune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "net.pt", zoo.build("mnist_net_digits"), arch="mnist_net_digits")
    (tmp_path / "prune.json").write_text(json.dumps(CONFIG))
    (tmp_path / "baddata.py").write_text(
        "def loaders(batch_size=32, seed=0):\n    raise RuntimeError('disk on fire')\n\n"
        "def single():\n    return 42\n")
    return tmp_path


def test_prune_writes_checkpoint_that_exports(workdir: Path):
    proc = run("prune", "net.pt", "--config", "prune.json", "--data", "digits", "--epochs", "2", "--lr", "0.01",
               "--batch-size", "64", "--checkpoint-dir", "ck", "-o", "pruned.pt", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "pruned:     pruned.pt" in proc.stdout
    assert proc.stdout.count("val accuracy") == 2
    loaded = load_model(workdir / "pruned.pt")
    assert loaded.arch == "mnist_net_digits"
    dense = loaded.masks["dense"]["weight"]
    assert float((~dense).float().mean()) == pytest.approx(0.8, abs=1e-3)
    assert int(loaded.masks["conv"]["weight"].reshape(12, -1).any(1).sum()) == 6  # 50% of 12 channels
    assert (workdir / "ck" / "last.pt").is_file()
    # the written file is refused as input to prune (it already has masks) and exported as is
    proc = run("export", "pruned.pt", "--target", "onnx", "-o", "pruned.onnx", "--no-latency", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "pruned.onnx").is_file()
    # existing output without --force
    proc = run("prune", "net.pt", "--config", "prune.json", "-o", "pruned.pt", cwd=workdir)
    assert "pruned.pt: already exists; pass --force" in one_line_error(proc, 3)


ERRORS = {
    "optimizer": (["--data", "digits", "--optimizer", "torch.optim.Adamm"], 2,
                  "error: optimizer 'torch.optim.Adamm': module 'torch.optim' has no attribute 'Adamm'; check the "
                  "spelling"),
    "criterion": (["--data", "digits", "--criterion", "torch.nn.NoSuchLoss"], 2,
                  "error: criterion 'torch.nn.NoSuchLoss': module 'torch.nn' has no attribute 'NoSuchLoss'; check the "
                  "spelling"),
    "data-raises": (["--data", "baddata:loaders"], 3,
                    "error: data entry point 'baddata:loaders' failed (RuntimeError: disk on fire); fix the function"),
    "data-returns-int": (["--data", "baddata:single"], 3,
                         "error: data entry point 'baddata:single': returned int; it must return (train_loader, "
                         "val_loader)"),
    "data-missing": (["--data", "nosuchmod:fn"], 2,
                     "error: data entry point 'nosuchmod:fn': cannot import module 'nosuchmod'"),
    "data-unknown": (["--data", "imagenet"], 2, "error: --data 'imagenet': unknown dataset; use one of digits"),
    "epochs-no-data": (["--epochs", "2"], 2, "error: --epochs 2 needs --data"),
    "resume-no-dir": (["--resume"], 2, "error: --resume needs --checkpoint-dir"),
    "optimizer-arg": (["--data", "digits", "--optimizer-arg", "momentum=0.9"], 2,
                      "error: optimizer torch.optim.Adam: cannot be created with {'momentum': 0.9}"),
}
SUBPROCESS_CASES = ("optimizer", "criterion", "data-raises")


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_errors_are_one_line_subprocess(workdir: Path, case: str):
    args, code, message = ERRORS[case]
    proc = run("prune", "net.pt", "--config", "prune.json", *args, "-o", "out.pt", cwd=workdir)
    assert one_line_error(proc, code).startswith(message)
    assert not (workdir / "out.pt").exists()


@pytest.mark.parametrize("case", [c for c in ERRORS if c not in SUBPROCESS_CASES])
def test_errors_are_one_line_in_process(workdir: Path, case: str, monkeypatch, capsys):
    """The same entry point as the subprocess tests (deployprune.cli.main), run in-process for speed."""
    from deployprune import cli

    args, code, message = ERRORS[case]
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    assert cli.main(["prune", "net.pt", "--config", "prune.json", *args, "-o", "out.pt"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (workdir / "out.pt").exists()


@pytest.mark.slow
def test_scenario_runs_prune_finalize_export_validate(workdir: Path):
    scenario = {
        "description": "NNI-style channel pruning of the digits net, then ONNX",
        "model": "net.pt",
        "pruning": "prune.json",
        "data": "digits",
        "finetuning": {"epochs": 1, "batch_size": 64, "learning_rate": 0.01, "optimizer": "torch.optim.Adam"},
        "output": "out/pruned.pt",
        "export": {"target": "onnx", "path": "out/pruned.onnx", "latency": False, "n_inputs": 4},
    }
    (workdir / "out").mkdir()
    (workdir / "scenario.json").write_text(json.dumps(scenario))
    proc = run("run", "scenario.json", "--no-progress", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "after finalize (compact model, validation data)" in proc.stdout
    assert "PASS" in proc.stdout
    assert (workdir / "out" / "pruned.onnx").is_file() and (workdir / "out" / "pruned.pt").is_file()
    report = json.loads((workdir / "out" / "pruned.onnx.report.json").read_text())
    assert report["passed"] is True
    # the accuracy the run measured lands in the export report: before pruning, then source and
    # artifact on the same validation data (the compact model's figure printed above is the source's)
    acc = report["accuracy"]
    assert list(acc) == ["before pruning", "source", "artifact"], acc
    assert report["pipeline"]["accuracy_data"] == {"data": "digits", "samples": 360}
    assert f"{acc['source']:.4f} after finalize" in proc.stdout
    assert abs(acc["artifact"] - acc["source"]) <= 1 / 360
    assert f"{acc['before pruning']:.4f} before pruning" in proc.stdout
    # an unknown key is a one-line config error naming the key and a suggestion
    scenario["finetunning"] = scenario.pop("finetuning")
    (workdir / "bad.json").write_text(json.dumps(scenario))
    proc = run("run", "bad.json", cwd=workdir)
    assert "unknown key 'finetunning' (did you mean 'finetuning'?)" in one_line_error(proc, 2)


def test_cli_resume_matches_uninterrupted_run(workdir: Path, monkeypatch, capsys):
    """--resume through the command line (in-process): 1 epoch + resumed 2nd == 2 epochs at once."""
    from deployprune import cli

    monkeypatch.chdir(workdir)
    common = ["prune", "net.pt", "--config", "prune.json", "--data", "digits", "--batch-size", "128",
              "--lr-scheduler", "torch.optim.lr_scheduler.StepLR", "--lr-scheduler-arg", "step_size=1",
              "--no-progress"]
    assert cli.main([*common, "--epochs", "2", "--checkpoint-dir", "full", "-o", "full.pt"]) == 0
    assert cli.main([*common, "--epochs", "1", "--checkpoint-dir", "cut", "-o", "first.pt"]) == 0
    assert cli.main([*common, "--epochs", "2", "--checkpoint-dir", "cut", "--resume", "-o", "resumed.pt"]) == 0
    out = capsys.readouterr().out
    assert out.count("epoch   2:") == 2
    full = torch.load(workdir / "full.pt", weights_only=True)
    resumed = torch.load(workdir / "resumed.pt", weights_only=True)
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for k, v in full["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    for m, per in full["masks"].items():
        for p, t in per.items():
            assert torch.equal(t, resumed["masks"][m][p]), (m, p)
    # a mismatched config is refused with one line, naming what to do
    (workdir / "other.json").write_text(json.dumps({"target_sparsity": 0.3}))
    args = [*common[:3], "other.json", *common[4:], "--epochs", "3", "--checkpoint-dir", "cut", "--resume",
            "-o", "x.pt"]
    assert cli.main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resume with the config that made the checkpoint" in err[0], err
