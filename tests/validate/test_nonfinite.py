"""Non-finite outputs must match position by position (NaN<->NaN, same-sign inf).

The faults are real: the exported ONNX model's offset initializer is edited so that its output
holds -inf where the source has +inf, NaN where the source is finite, a finite value where the
source is NaN; and a layer whose output is NaN everywhere in the source.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from deployprune.parity import compare, compare_outputs
from deployprune.validate import validate

from .helpers import export_onnx

X = torch.randn(3, 6, generator=torch.Generator().manual_seed(7))
INF, NAN = math.inf, math.nan


class WithOffset(nn.Module):
    """A Linear whose output gets a fixed offset: +inf in column 0, NaN in column 1."""

    def __init__(self, offset: list[float]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 4)
        self.register_buffer("offset", torch.tensor(offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.offset


def _onnx_with_offset(src: Path, dst: Path, offset: list[float]) -> Path:
    """Copy of ``src`` whose offset initializer (the one of shape (4,) feeding the Add) is ``offset``."""
    model = onnx.load(str(src))
    add = next(n for n in model.graph.node if n.op_type == "Add")
    inits = {i.name: i for i in model.graph.initializer}
    name = next(i for i in add.input if i in inits)
    old = numpy_helper.to_array(inits[name])
    assert old.shape == (4,)
    inits[name].CopyFrom(numpy_helper.from_array(np.array(offset, dtype=old.dtype), name))
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def faithful(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = WithOffset([INF, NAN, 0.0, 0.0]).eval()
    path = export_onnx(model, (X,), tmp_path_factory.mktemp("nonfinite") / "faithful.onnx")
    got = onnx.load(str(path))
    assert [n.op_type for n in got.graph.node].count("Add") == 1
    return model, path


def test_matching_nan_and_inf_pass(faithful: tuple[nn.Module, Path]) -> None:
    model, path = faithful
    report = validate(model, path, (X,), latency=False, n_inputs=3)
    assert report.passed, report.failures
    (out,) = report.outputs
    assert out.nonfinite == 0 and out.max_abs < 1e-5


@pytest.mark.parametrize(("offset", "position", "source", "artifact"), [
    ([-INF, NAN, 0.0, 0.0], "(0, 0)", "+inf", "-inf"),  # sign-flipped infinity
    ([INF, NAN, NAN, 0.0], "(0, 2)", None, "nan"),  # NaN where the source is finite
    ([INF, 0.0, 0.0, 0.0], "(0, 1)", "nan", None),  # finite where the source is NaN
    ([INF, NAN, 0.0, INF], "(0, 3)", None, "+inf"),  # inf where the source is finite
], ids=["inf-sign-flipped", "nan-for-finite", "finite-for-nan", "inf-for-finite"])
def test_nonfinite_mismatch_fails_and_names_it(faithful: tuple[nn.Module, Path], tmp_path: Path,
                                               offset: list[float], position: str,
                                               source: str | None, artifact: str | None) -> None:
    model, path = faithful
    bad = _onnx_with_offset(path, tmp_path / "bad.onnx", offset)
    report = validate(model, bad, (X,), latency=False, n_inputs=3)
    assert not report.passed
    (out,) = report.outputs
    assert out.nonfinite == 3 * 3  # 3 inputs x 3 rows, one column
    (failure,) = [f for f in report.failures if "non-finite" in f]
    assert "9 position(s) whose non-finite values differ from the source" in failure, failure
    assert f"first non-finite mismatch at index {position}: source " in failure, failure
    if source is not None:
        assert f"source {source}, artifact" in failure, failure
    if artifact is not None:
        assert failure.endswith(f"artifact {artifact}"), failure


class NaNLayer(nn.Module):
    """A model whose output is NaN everywhere (log of a negative number)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(-(self.fc(x) ** 2) - 1.0)


def test_all_nan_source_against_finite_artifact_fails(tmp_path: Path) -> None:
    model = NaNLayer().eval()
    path = export_onnx(model, (X,), tmp_path / "nan.onnx")
    assert validate(model, path, (X,), latency=False, n_inputs=2).passed  # NaN everywhere on both sides
    # the fault: the artifact computes log(fc(x)^2 + 1) (finite), the source NaN everywhere
    proto = onnx.load(str(path))
    neg = next(n for n in proto.graph.node if n.op_type == "Neg")
    consumer = next(n for n in proto.graph.node if neg.output[0] in n.input)
    consumer.input[list(consumer.input).index(neg.output[0])] = neg.input[0]
    sub = next(n for n in proto.graph.node if n.op_type == "Sub")
    sub.op_type = "Add"
    onnx.save(proto, str(tmp_path / "finite.onnx"))
    report = validate(model, tmp_path / "finite.onnx", (X,), latency=False, n_inputs=2)
    assert not report.passed
    (out,) = report.outputs
    assert out.nonfinite == 2 * 3 * 4
    assert any("24 position(s) whose non-finite values differ" in f and "source nan, artifact " in f
               for f in report.failures), report.failures


# --- the metric itself ----------------------------------------------------------------------


def test_compare_matches_nonfinite_positions() -> None:
    ref = np.array([[1.0, INF, -INF, NAN]])
    assert compare(ref, ref.copy()).within(0.0)
    p = compare(ref, np.array([[1.0, -INF, -INF, NAN]]))
    assert p.mismatches == 1 and p.rel == INF and not p.within(1e9)
    assert p.first_mismatch == "index (0, 1): reference +inf, actual -inf"
    assert p.max_abs == 0.0  # the finite part agrees; the verdict comes from the mismatch
    assert compare(ref, np.array([[1.0, INF, -INF, 0.0]])).mismatches == 1
    assert compare(ref, np.array([[NAN, INF, -INF, NAN]])).mismatches == 1
    assert compare(ref, np.array([[1.0, INF, NAN, NAN]])).mismatches == 1
    assert compare(ref, np.array([[1.0, 1e308, -INF, NAN]])).mismatches == 1


def test_compare_figures_and_torch_tensors() -> None:
    ref = torch.tensor([[3.0, -4.0], [0.0, 1.0]])
    got = ref + torch.tensor([[0.0, 0.5], [0.0, 0.0]])
    p = compare(ref, got, rows=True)
    assert p.max_abs == pytest.approx(0.5) and p.scale == 4.0 and p.rel == pytest.approx(0.125)
    assert p.cosine < 1.0 and p.error == pytest.approx(0.5)
    assert compare(torch.zeros(3), torch.zeros(3)).rel == 0.0
    assert compare(torch.zeros(3), torch.full((3,), 1e-9)).rel == INF  # zero output: exact only
    shape = compare(torch.zeros(2, 3), torch.zeros(3, 2))
    assert not shape.comparable and shape.error == INF
    assert "differs" in shape.describe("source", "artifact")
    many = compare_outputs([np.ones(2), np.full(2, 100.0)], [np.ones(2) + 0.1, np.full(2, 100.1)])
    assert many.rel == pytest.approx(0.1)  # each output against its own scale: the worst wins
    assert compare_outputs([np.ones(2)], []).shape == "actual has 0 output(s), the reference has 1"


def test_every_parity_check_uses_the_same_metric() -> None:
    """The converters' verification, finalize's self-check and the pipelines' read-back checks."""
    from deployprune.converters._common import parity
    from deployprune.finalize import _compare
    from deployprune.pipeline import _max_abs_diff

    ref = torch.tensor([[1.0, INF, NAN]])
    flipped = torch.tensor([[1.0, -INF, NAN]])
    assert parity([ref.numpy()], [flipped.numpy()]) == (INF, INF)
    assert parity([ref.numpy()], [ref.numpy()]) == (0.0, 0.0)
    assert _compare(ref, flipped)[0] == INF and _compare(ref, ref.clone()) == (0.0, 1.0)
    assert _max_abs_diff(ref, flipped) == INF and _max_abs_diff((ref,), (ref.clone(),)) == 0.0
