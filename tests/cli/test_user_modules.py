"""A user's own modules next to them: ``--model mymodel:build`` imports ./mymodel.py as ``python -m``
would, a user's own ``models.py`` does not touch the shipped samples (the zoo is deployprune.zoo),
and an import path that does not import is a usage error (exit 2) for every flag that takes one.

These run the installed ``deployprune`` script without PYTHONPATH: unlike ``python -m deployprune``
it does not have the working directory on ``sys.path`` by itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deployprune import zoo
from deployprune.io import save_checkpoint

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "deployprune"

NET = """
import torch
from mylayers import Scale  # a sibling module, imported at module level


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.scale = Scale()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.scale(torch.relu(self.conv(x))).mean((2, 3)))


def build():
    return Net()
"""
LAYERS = """
import torch


class Scale(torch.nn.Module):
    def forward(self, x):
        return 2 * x
"""
HOSTILE_MODELS = "raise RuntimeError('the user models.py was imported')\n"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert SCRIPT.is_file(), f"{SCRIPT}: the console script of the installed package"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    (tmp_path / "mymodel.py").write_text(NET)
    (tmp_path / "mylayers.py").write_text(LAYERS)
    sys.path.insert(0, str(tmp_path))
    try:
        import mymodel

        torch.manual_seed(0)
        torch.save(mymodel.build().state_dict(), tmp_path / "weights.pt")
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("mymodel", "mylayers"):
            sys.modules.pop(name, None)
    return tmp_path


def test_model_factory_is_imported_from_the_working_directory(user_dir: Path) -> None:
    proc = run("export", "weights.pt", "--model", "mymodel:build", "--input-shape", "1,3,8,8", "--no-latency",
               cwd=user_dir)
    assert proc.returncode == 0, proc.stderr
    assert (user_dir / "weights.onnx").is_file()
    # finalize and validate resolve it the same way
    proc = run("validate", "weights.pt", "weights.onnx", "--model", "mymodel:build", "--input-shape", "1,3,8,8",
               "--no-latency", cwd=user_dir)
    assert proc.returncode == 0, proc.stderr


def test_a_users_models_py_does_not_touch_the_samples(tmp_path: Path) -> None:
    (tmp_path / "models.py").write_text(HOSTILE_MODELS)
    (tmp_path / "converters.py").write_text(HOSTILE_MODELS)
    proc = run("export", str(REPO / "models" / "samples" / "lenet.pt"), "--no-latency", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "lenet.onnx").is_file()
    # nor a zoo factory named with --model, which puts the working directory on the path to import it
    torch.save(zoo.build("lenet").state_dict(), tmp_path / "lenet_sd.pt")
    proc = run("export", "lenet_sd.pt", "--model", "deployprune.zoo.lenet:TorchModel", "-o", "sd.onnx",
               "--no-latency", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_a_users_models_py_is_theirs_to_name(tmp_path: Path) -> None:
    """With --model models:build the user asked for their own models.py, and gets it."""
    (tmp_path / "models.py").write_text(NET)
    (tmp_path / "mylayers.py").write_text(LAYERS)
    sys.path.insert(0, str(tmp_path))
    try:
        import models  # noqa: F401 - the user's file, not the zoo

        torch.save(sys.modules["models"].build().state_dict(), tmp_path / "weights.pt")
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("models", "mylayers"):
            sys.modules.pop(name, None)
    proc = run("export", "weights.pt", "--model", "models:build", "--input-shape", "1,3,8,8", "--no-latency",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def prune_dir(tmp_path: Path) -> Path:
    save_checkpoint(tmp_path / "net.pt", zoo.build("mnist_net_digits"), arch="mnist_net_digits")
    (tmp_path / "prune.json").write_text('{"target_sparsity": 0.5, "granularity": "channel"}')
    (tmp_path / "myopt.py").write_text("import torch\n\n\nclass MySGD(torch.optim.SGD):\n    pass\n")
    (tmp_path / "mydata.py").write_text(
        "import torch\n\n\ndef loaders(batch_size=32, seed=0):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    batches = [(torch.rand(batch_size, 1, 8, 8, generator=g),\n"
        "                torch.randint(0, 10, (batch_size,), generator=g)) for _ in range(3)]\n"
        "    return batches, batches[:1]\n")
    return tmp_path


def test_optimizer_and_data_are_imported_from_the_working_directory(prune_dir: Path) -> None:
    proc = run("prune", "net.pt", "--config", "prune.json", "--data", "mydata:loaders", "--epochs", "1",
               "--optimizer", "myopt.MySGD", "--optimizer-arg", "lr=0.01", "--no-progress", "-o", "out.pt",
               cwd=prune_dir)
    assert proc.returncode == 0, proc.stderr
    assert (prune_dir / "out.pt").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "net.pt", "--model", "nosuchmod:build"],
         "error: --model 'nosuchmod:build': cannot import module 'nosuchmod'"),
        (["export", "net.pt", "--model", "deployprune.zoo.lenet:Nope"],
         "error: --model 'deployprune.zoo.lenet:Nope': module 'deployprune.zoo.lenet' has no attribute 'Nope'"),
        (["prune", "net.pt", "--config", "prune.json", "--optimizer", "nosuchmod:Opt", "-o", "x.pt"],
         "error: optimizer 'nosuchmod:Opt': cannot import module 'nosuchmod'"),
        (["prune", "net.pt", "--config", "prune.json", "--optimizer", "torch.optim.Adamm", "-o", "x.pt"],
         "error: optimizer 'torch.optim.Adamm': module 'torch.optim' has no attribute 'Adamm'"),
        (["prune", "net.pt", "--config", "prune.json", "--criterion", "nosuchmod.Loss", "-o", "x.pt"],
         "error: criterion 'nosuchmod.Loss': cannot import module 'nosuchmod'"),
        (["prune", "net.pt", "--config", "prune.json", "--data", "nosuchmod:fn", "-o", "x.pt"],
         "error: data entry point 'nosuchmod:fn': cannot import module 'nosuchmod'"),
    ],
    ids=["model-module", "model-attribute", "optimizer-module", "optimizer-attribute", "criterion", "data"],
)
def test_a_bad_import_path_is_a_usage_error_for_every_flag(prune_dir: Path, args: list[str], message: str) -> None:
    line = one_line_error(run(*args, cwd=prune_dir), 2)
    assert line.startswith(message), line
    assert not (prune_dir / "x.pt").exists()
