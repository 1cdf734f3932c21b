"""Fine-tuning progress off a terminal (issue 13): ``deployprune prune`` announces each epoch on stderr as it
ends (plain lines, also when stderr is a file or a pipe), says when it resumed a checkpoint (stderr and the
stdout summary), ``-q`` and ``--no-progress`` silence the lines, and the summary on stdout stays the same."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deployprune as dp
from deployprune import zoo
from deployprune.io import save_checkpoint
from deployprune.training import finetune, loop

REPO = Path(__file__).resolve().parents[2]
CONFIG = {
    "module_type_configs": {"Conv2d": {"target_sparsity": 0.5, "granularity": "channel"},
                            "Linear": {"target_sparsity": 0.8}},
    "schedule": {"type": "polynomial", "begin_step": 0, "end_step": 20, "frequency": 5},
}
LINE = re.compile(r"^\[ *\d+\.\ds\] (.*)$")
EPOCH = re.compile(r"^epoch (\d+)/(\d+): train loss \d+\.\d{4}, val accuracy \d\.\d{4}, sparsity \d+\.\d%, "
                   r"step (\d+)$")

# Training data whose second pass of the training loader waits until the test creates the file "go": the
# test sees the line of epoch 1 while the run is still inside epoch 2, or never (a hang guard ends it).
GATED_DATA = """
import time
from pathlib import Path

from deployprune.data import load_data


class Gated:
    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if Path("ck", "last.pt").exists():  # epoch 1 is done (its checkpoint is written)
            for _ in range(1200):
                if Path("go").exists():
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError("nobody said go: the epoch-1 line never reached stderr during the run")
        return iter(self.loader)


def loaders(batch_size=32, seed=0):
    train, val = load_data("digits", batch_size=batch_size, seed=seed)
    return Gated(train), val
"""


def _env() -> dict[str, str]:
    # tests/conftest.py turns the progress lines off for the suite; these tests are about them
    env = {k: v for k, v in os.environ.items() if k != "DEPLOYPRUNE_PROGRESS"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    return env


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deployprune", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)


def _progress(stderr: str) -> list[str]:
    """The stderr lines without their ``[1.2s]`` prefix; every line must be a progress line."""
    lines = stderr.splitlines()
    assert all(LINE.match(line) for line in lines), stderr
    return [LINE.match(line).group(1) for line in lines]


def _epochs(stages: list[str]) -> list[tuple[int, int, int]]:
    return [tuple(int(g) for g in m.groups()) for m in map(EPOCH.match, stages) if m]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "net.pt", zoo.build("mnist_net_digits"), arch="mnist_net_digits")
    (tmp_path / "prune.json").write_text(json.dumps(CONFIG))
    return tmp_path


PRUNE = ("prune", "net.pt", "--config", "prune.json", "--data", "digits", "--batch-size", "128", "--lr", "0.01")


def test_epoch_lines_on_stderr_off_a_terminal_and_quiet_flags_silence_them(workdir: Path):
    proc = run(*PRUNE, "--epochs", "2", "-o", "a.pt", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    stages = _progress(proc.stderr)
    assert stages[0] == "loading net.pt"
    assert "fine-tuning: 2 epochs of 12 steps" in stages
    assert _epochs(stages) == [(1, 2, 12), (2, 2, 24)]
    assert stages[-1].startswith("epoch 2/2: ")  # nothing after training but the stdout summary
    assert proc.stdout.count("val accuracy") == 2 and "pruned:     a.pt" in proc.stdout
    assert not any("resum" in s for s in stages) and "resumed:" not in proc.stdout

    # -q (the global flag) and --no-progress: no epoch lines; the summary on stdout is the same
    quiet = run("-q", *PRUNE, "--epochs", "2", "-o", "a.pt", "--force", cwd=workdir)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    no_progress = run(*PRUNE, "--epochs", "2", "-o", "a.pt", "--force", "--no-progress", cwd=workdir)
    assert no_progress.returncode == 0, no_progress.stderr
    assert _progress(no_progress.stderr) == ["loading net.pt"]
    assert quiet.stdout == no_progress.stdout == proc.stdout


def test_epoch_lines_come_as_epochs_end_not_at_the_end(workdir: Path):
    (workdir / "gated.py").write_text(GATED_DATA)
    proc = subprocess.Popen([sys.executable, "-m", "deployprune", *PRUNE[:4], "--data", "gated:loaders",
                             *PRUNE[6:], "--epochs", "2", "--checkpoint-dir", "ck", "-o", "g.pt"], cwd=workdir,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        for line in proc.stderr:  # epoch 2 waits for "go": the epoch-1 line must arrive before it
            seen.append(line)
            if "epoch 1/2: " in line:
                (workdir / "go").touch()
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(seen)
    assert _epochs(_progress("".join(seen))) == [(1, 2, 12), (2, 2, 24)]
    assert out.count("val accuracy") == 2


def test_resume_says_so_on_stderr_and_in_the_summary(workdir: Path):
    first = run(*PRUNE, "--epochs", "1", "--checkpoint-dir", "ck", "-o", "first.pt", cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert _epochs(_progress(first.stderr)) == [(1, 1, 12)]

    resumed = run(*PRUNE, "--epochs", "3", "--checkpoint-dir", "ck", "--resume", "-o", "resumed.pt", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    stages = _progress(resumed.stderr)
    assert f"resuming from {Path('ck', 'last.pt')}: epoch 1 of 3 done, step 12" in stages
    assert not any(s.startswith("fine-tuning: ") for s in stages)
    assert _epochs(stages) == [(2, 3, 24), (3, 3, 36)]  # epoch 1 is not run again
    out = resumed.stdout.splitlines()
    assert f"resumed:    {Path('ck', 'last.pt')} after epoch 1 of 3 (epoch 1 below is from the checkpoint)" in out
    assert resumed.stdout.count("val accuracy") == 3  # the summary still lists the whole history

    # -q: no stderr at all, and the summary still says it resumed
    quiet = run("-q", *PRUNE, "--epochs", "3", "--checkpoint-dir", "ck", "--resume", "-o", "q.pt", cwd=workdir)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert f"resumed:    {Path('ck', 'last.pt')} after epoch 3 of 3" in quiet.stdout


def test_resume_without_a_checkpoint_is_said_by_default(workdir: Path):
    proc = run(*PRUNE, "--epochs", "1", "--checkpoint-dir", "empty", "--resume", "-o", "x.pt", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert f"warning: {Path('empty', 'last.pt')}: no checkpoint to resume from; starting at epoch 0" in lines
    assert _epochs(_progress("\n".join(line for line in lines if not line.startswith("warning: ")))) == [(1, 1, 12)]
    assert "resumed:    nothing: no checkpoint in empty; trained from epoch 1" in proc.stdout.splitlines()


def test_one_shot_pruning_is_announced(workdir: Path):
    proc = run("prune", "net.pt", "--config", "prune.json", "-o", "once.pt", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    stages = _progress(proc.stderr)
    assert "pruning: running the schedule to its last update step (20) on the loaded weights" in stages
    quiet = run("prune", "net.pt", "--config", "prune.json", "-o", "once.pt", "--force", "--no-progress", cwd=workdir)
    assert quiet.returncode == 0, quiet.stderr
    assert _progress(quiet.stderr) == ["loading net.pt"]
    assert quiet.stdout == proc.stdout


# --- in process: step lines inside a long epoch, rate-limited; progress=False and other ranks print none


def _digits_run(**kwargs):
    from deployprune.data import load_data

    torch.manual_seed(0)
    model = zoo.build("mnist_net_digits")
    pruner = dp.Pruner(model, CONFIG, (torch.zeros(1, 1, 8, 8),))
    train, val = load_data("digits", batch_size=32, seed=0)
    return finetune(model, pruner, train, val, epochs=2, **kwargs), len(train)


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [LINE.match(r.getMessage()).group(1) for r in caplog.records if r.name == "deployprune.progress"]


def test_a_long_epoch_gets_occasional_step_lines(caplog, monkeypatch, capsys):
    clock = iter(range(10**6))  # each reading of the step clock is one second later: every epoch is "long"
    monkeypatch.setattr(loop, "_now", lambda: float(next(clock)))
    caplog.set_level(logging.INFO, logger="deployprune.progress")
    _, n = _digits_run()
    messages = _messages(caplog)
    steps = [m for m in messages if re.match(r"^epoch \d/2: step \d+/\d+, train loss \d+\.\d{4}$", m)]
    assert steps and len(steps) <= 2 * (n // loop.STEP_LINE_EVERY + 1)  # occasional, never one per batch
    assert len(steps) < 2 * n / 3
    assert all(f"/{n}, train loss" in m for m in steps)
    # every step line of epoch 1 comes before the epoch-1 line, which comes before epoch 2's
    first_end = next(i for i, m in enumerate(messages) if m.startswith("epoch 1/2: train loss"))
    assert all(messages.index(m) < first_end for m in steps if m.startswith("epoch 1/2"))
    assert capsys.readouterr().err == ""  # not a terminal: no tqdm bar, the lines go through logging only


@pytest.mark.parametrize("how", ["progress=False", "rank 1"])
def test_no_progress_and_other_ranks_print_none(caplog, monkeypatch, how):
    caplog.set_level(logging.INFO, logger="deployprune.progress")
    if how == "rank 1":
        monkeypatch.setattr(loop, "_setup_distributed", lambda: loop._Dist(rank=1, world_size=2))
    result, _ = _digits_run(progress=how != "progress=False")
    assert len(result.history) == 2
    assert _messages(caplog) == []
