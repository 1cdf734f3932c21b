"""Validation beyond the example's batch size and value range.

A trace records one run: a batch size read into a Python int, or one branch of a data-dependent
``if``, becomes a constant of the exported graph. On the example inputs (and on more N(0, 1)
inputs of the same shape) such an artifact agrees with the source; validation must also compare
at a second batch size (when the artifact declares a dynamic one) and on inputs at 10x scale.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deployprune.validate import validate

from .helpers import export_onnx, tiny_net

X1 = torch.randn(1, 6, generator=torch.Generator().manual_seed(11))


class BakedBatch(nn.Module):
    """Reads the batch size into a Python int: the trace keeps the example's batch size."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = int(x.shape[0])
        return self.fc(x).reshape(batch, -1) * 2.0


class Branchy(nn.Module):
    """A data-dependent branch: N(0, 1) inputs never reach the first one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() > 5:
            return self.fc(x) * 0.5
        return self.fc(x)


def test_baked_batch_size_fails_at_the_second_batch(tmp_path: Path) -> None:
    model = BakedBatch().eval()
    path = export_onnx(model, (X1,), tmp_path / "baked.onnx", dynamic_batch=True)
    # without the probes, every input has the example's batch size and the fault is invisible
    assert validate(model, path, (X1,), latency=False, probes=False).passed
    report = validate(model, path, (X1,), latency=False)
    assert not report.passed
    (failure,) = report.failures
    assert failure.endswith(" at batch 3 (the artifact has a dynamic batch): shape (1, 12) differs from the "
                            "source's (3, 4)"), failure
    assert report.outputs[0].max_abs is not None and report.outputs[0].max_rel < 1e-5  # the examples agree


def test_data_dependent_branch_fails_at_10x_scale(tmp_path: Path) -> None:
    model = Branchy().eval()
    path = export_onnx(model, (X1,), tmp_path / "branch.onnx", dynamic_batch=True)
    assert validate(model, path, (X1,), latency=False, probes=False).passed
    report = validate(model, path, (X1,), latency=False)
    assert not report.passed
    (failure,) = report.failures
    assert " on inputs at 10x scale: max rel error 1 > 0.0001 (max abs " in failure, failure
    assert "also compared at batch 3 (the artifact has a dynamic batch): max rel error" in " ".join(report.notes)


def test_faithful_exports_pass_the_probes(tmp_path: Path) -> None:
    model = tiny_net()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    dynamic = export_onnx(model, (x,), tmp_path / "dynamic.onnx", dynamic_batch=True)
    report = validate(model, dynamic, (x,), latency=False, n_inputs=3)
    assert report.passed, report.failures
    notes = " ".join(report.notes)
    assert "also compared at batch 3 (the artifact has a dynamic batch)" in notes
    assert "also compared on inputs at 10x scale" in notes
    # a fixed batch: no second batch size to try, the scale probe still runs
    fixed = export_onnx(model, (x,), tmp_path / "fixed.onnx", dynamic_batch=False)
    report = validate(model, fixed, (x,), latency=False, n_inputs=3)
    assert report.passed, report.failures
    notes = " ".join(report.notes)
    assert "at batch" not in notes and "also compared on inputs at 10x scale" in notes


def test_scale_probe_on_a_module_artifact() -> None:
    """An nn.Module artifact (a compacted model) gets the 10x probe too."""

    class Clipped(nn.Module):  # agrees with the source only while |x| < 5
        def __init__(self, source: nn.Module) -> None:
            super().__init__()
            self.source = source

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.source(x.clamp(-5, 5))

    source = nn.Sequential(nn.Linear(6, 4)).eval()
    report = validate(source, Clipped(source), (X1,), latency=False)
    assert not report.passed
    assert any(f.startswith("output 'output0' on inputs at 10x scale: max rel error") for f in report.failures)


def test_integer_only_inputs_are_not_scaled(tmp_path: Path) -> None:
    model = nn.Embedding(10, 3).eval()
    ids = torch.tensor([[1, 2, 3]])
    path = export_onnx(model, (ids,), tmp_path / "emb.onnx", dynamic_batch=True)
    report = validate(model, path, (ids,), latency=False, n_inputs=2)
    assert report.passed, report.failures
    notes = " ".join(report.notes)
    assert "also compared at batch 3" in notes and "10x" not in notes
