"""Data that does not fit the model is an input error naming both shapes, not an internal error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deployprune import zoo
from deployprune.errors import InputError
from deployprune.io import load_model
from deployprune.training import prune_loaded


def _cnn(tmp_path: Path) -> Path:
    torch.save(zoo.build("vgg").state_dict(), tmp_path / "cnn.pt")  # 3-channel 32x32 input
    (tmp_path / "prune.json").write_text('{"target_sparsity": 0.5, "granularity": "channel"}')
    return tmp_path / "cnn.pt"


def test_digits_on_a_3_channel_cnn_is_one_input_error_line(tmp_path: Path) -> None:
    _cnn(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "deployprune", "prune", "cnn.pt", "--model", "deployprune.zoo.vgg:vgg",
                           "--config", "prune.json", "--data", "digits", "--epochs", "1", "-o", "out.pt"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr  # an input problem (was 1, "internal error ... please report it")
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: --data digits (training data): the model does not take this data: its "
                               "batches are 32x1x8x8 (float32), the model takes 1x3x32x32 (float32) (RuntimeError: ")
    assert "internal error" not in lines[0]
    assert not (tmp_path / "out.pt").exists()


def test_validation_data_is_checked_too(tmp_path: Path) -> None:
    loaded = load_model(_cnn(tmp_path), model_factory="deployprune.zoo.vgg:vgg")
    train = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    val = [(torch.randn(4, 3, 16), torch.randint(0, 10, (4,)))]
    with pytest.raises(InputError, match=r"^data \(validation data\): the model does not take this data: its batches "
                                         r"are 4x3x16 \(float32\), the model takes 1x3x32x32 \(float32\)"):
        prune_loaded(loaded, tmp_path / "prune.json", data=(train, val), epochs=1)
    # data that fits goes through
    outcome = prune_loaded(loaded, tmp_path / "prune.json", data=(train, train[:1]), epochs=1, progress=False)
    assert outcome.train is not None
