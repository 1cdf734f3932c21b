"""The two seed flows in examples/ run end to end (one epoch per phase)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "examples" / script), "--quick", "--out", str(out)],
                          cwd=out, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_coremltools_magnitude_pruning_example(tmp_path: Path):
    proc = _run("coremltools_magnitude_pruning.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sparsity: conv 70.4%, dense 80.0%" in proc.stdout  # 76/108 conv weights, 1536/1920 dense
    assert "read-back PASSED; 2 sparse weights" in proc.stdout
    assert (tmp_path / "digits_pruned.mlpackage").is_dir()


@pytest.mark.slow
def test_nni_structured_speedup_example(tmp_path: Path):
    proc = _run("nni_structured_speedup.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 12 -> 6 conv channels: conv 120 -> 60 params, dense 1930 -> 970
    assert "1,030  (50.2%)" in proc.stdout
    assert "ONNX PASSED" in proc.stdout
    assert "conv channels kept: 6/12" in proc.stdout
    assert (tmp_path / "digits_pruned.onnx").is_file() and (tmp_path / "digits_dense.onnx").is_file()
