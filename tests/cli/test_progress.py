"""Progress lines by default on stderr (issue 13): every stage of an export is announced with the time since the
command started, the first line before torch is even imported; ``-q`` and ``DEPLOYPRUNE_PROGRESS=0`` silence
them; stdout (the summary) is the same either way."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from .test_cli import LENET_SAMPLE, run

LINE = re.compile(r"^\[ *\d+\.\ds\] \S")


@pytest.fixture
def with_progress(monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.delenv("DEPLOYPRUNE_PROGRESS", raising=False)
    return {k: v for k, v in os.environ.items() if k != "DEPLOYPRUNE_PROGRESS"}


def _stages(stderr: str) -> list[str]:
    assert all(LINE.match(line) for line in stderr.splitlines()), stderr  # nothing but progress lines
    return [line.split("] ", 1)[1] for line in stderr.splitlines()]


def test_export_announces_every_stage(tmp_path: Path, with_progress: dict) -> None:
    proc = run("export", str(LENET_SAMPLE), "-o", "lenet.onnx", cwd=tmp_path, env=with_progress)
    assert proc.returncode == 0, proc.stderr
    stages = _stages(proc.stderr)
    assert stages[0] == f"loading {LENET_SAMPLE}"
    assert float(proc.stderr.split("]")[0].strip("[ s")) < 0.5  # before the heavy imports
    assert stages[1].startswith("finalizing (")
    assert "converting to onnx" in stages
    assert any(s.startswith("validating in onnxruntime (8 input(s), then timing)") for s in stages)
    assert any(s.startswith("timing batch 1: ") for s in stages)
    assert proc.stdout.startswith("artifact:")


@pytest.mark.parametrize("silence", [["-q"], []])
def test_quiet_and_the_variable_silence_progress(tmp_path: Path, with_progress: dict, silence: list[str]) -> None:
    env = dict(with_progress) if silence else {**with_progress, "DEPLOYPRUNE_PROGRESS": "0"}
    proc = run("export", str(LENET_SAMPLE), "-o", "lenet.onnx", "--no-latency", *silence, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "PASS" in proc.stdout


def test_an_error_after_progress_is_still_one_error_line(tmp_path: Path, with_progress: dict) -> None:
    (tmp_path / "lenet.onnx").write_text("mine")
    proc = run("export", str(LENET_SAMPLE), "-o", "lenet.onnx", cwd=tmp_path, env=with_progress)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if not LINE.match(line)]
    assert len(errors) == 1 and errors[0].startswith("error: lenet.onnx: "), proc.stderr
    assert (tmp_path / "lenet.onnx").read_text() == "mine"
