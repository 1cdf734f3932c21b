"""The injected faults are real: they change what the ONNX file computes (or, for a nudge, barely)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deployprune import converters
from deployprune.converters.onnx import onnxruntime_outputs
from tests.faults import faulty_onnx_target, nudge_initializers, perturb_initializer, swap_output_channels


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("faults") / "m.onnx"
    converters.get("onnx").convert(model, (x,), path, exporter="torchscript")
    return path, model, x


def outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    return onnxruntime_outputs(path, (x,))[0]


def test_swap_output_channels_swaps_exactly_two_outputs(exported, tmp_path: Path) -> None:
    path, _, x = exported
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(path.read_bytes())
    before = outputs(path, x)
    swap_output_channels(bad)
    after = outputs(bad, x)
    np.testing.assert_array_equal(after[:, [1, 0, 2, 3, 4]], before)


def test_perturb_moves_one_output_and_nudge_stays_at_rounding_level(exported, tmp_path: Path) -> None:
    path, _, x = exported
    before = outputs(path, x)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(path.read_bytes())
    perturb_initializer(bad)
    diff = np.abs(outputs(bad, x) - before)
    assert diff[:, 0].min() > 1e-2 * np.abs(before).max() and diff[:, 1:].max() == 0
    nudged = tmp_path / "nudged.onnx"
    nudged.write_bytes(path.read_bytes())
    assert nudge_initializers(nudged) == 4  # two weights and two biases
    diff = np.abs(outputs(nudged, x) - before)
    assert 0 < diff.max() < 1e-5 * np.abs(before).max()


def test_faulty_target_writes_the_export_then_breaks_it(exported, tmp_path: Path) -> None:
    _, model, x = exported
    with faulty_onnx_target() as target:
        result = converters.get("onnx").convert(model, (x,), tmp_path / "f.onnx", exporter="torchscript")
    assert target.swapped == [result.path]
    with torch.no_grad():
        ref = model(x).numpy()
    got = outputs(result.path, x)
    np.testing.assert_allclose(got[:, [1, 0, 2, 3, 4]], ref, rtol=1e-5, atol=1e-6)
    assert converters.get("onnx") is not target  # the built-in target is back
