"""run_export: tracer warnings in the report, and what --force does to a previous artifact set."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from deployprune.io import LoadedModel
from deployprune.pipeline import run_export

TORCHSCRIPT = {"exporter": "torchscript"}  # the tracer these tests are about


class Branchy(nn.Module):
    """A data-dependent branch: the trace keeps the one N(0, 1) example inputs take."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() > 5:
            return self.fc(x) * 0.5
        return self.fc(x)


class FixedWidth(nn.Module):
    """Reads a fixed (non-batch) size into a Python int: the tracer warns, the trace is right."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = int(x.shape[1])
        return self.fc(x.reshape(-1, width))


def line_of(func: object, text: str) -> int:
    lines, start = inspect.getsourcelines(func)
    return start + next(i for i, line in enumerate(lines) if text in line)


def loaded(model: nn.Module, where: Path) -> LoadedModel:
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    return LoadedModel(model=model.eval(), example_inputs=(x,), masks={},
                       source=where / f"{type(model).__name__}.pt", kind="pickle")


def test_tracer_warning_is_a_note_and_the_fault_is_caught(tmp_path: Path) -> None:
    out = tmp_path / "branchy.onnx"
    outcome = run_export(loaded(Branchy(), tmp_path), "onnx", out, options=TORCHSCRIPT, n_inputs=2,
                         latency=False)
    report = outcome.validation
    assert outcome.passed is False and not out.exists()
    assert any(" on inputs at 10x scale: max rel error" in f for f in report.failures), report.failures
    traced = [n for n in report.notes if n.startswith("the tracer warned during the export: ")]
    line = line_of(Branchy.forward, "if x.abs()")
    assert traced == ["the tracer warned during the export: Converting a tensor to a Python boolean might "
                      f"cause the trace to be incorrect (test_export_outputs.py:{line})"], report.notes
    saved = json.loads(outcome.report_path.read_text())
    assert traced[0] in saved["notes"]


def test_tracer_warning_fails_only_under_strict(tmp_path: Path) -> None:
    out = tmp_path / "fixed.onnx"
    outcome = run_export(loaded(FixedWidth(), tmp_path), "onnx", out, options=TORCHSCRIPT, n_inputs=2,
                         latency=False)
    assert outcome.passed is True and out.is_file(), outcome.validation.failures
    note = ("the tracer warned during the export: Converting a tensor to a Python integer might cause the "
            f"trace to be incorrect (test_export_outputs.py:{line_of(FixedWidth.forward, 'int(x.shape[1])')})")
    assert note in outcome.validation.notes and note in outcome.notes

    strict = run_export(loaded(FixedWidth(), tmp_path), "onnx", tmp_path / "strict.onnx", options=TORCHSCRIPT,
                        n_inputs=2, latency=False, strict=True)
    assert strict.passed is False and strict.artifact is None and not (tmp_path / "strict.onnx").exists()
    assert strict.validation.failures == [
        "the tracer warned during the export (1 warning(s), --strict): the artifact may hold the example's "
        "values where the model computes them"]
    saved = json.loads(strict.report_path.read_text())
    assert saved["passed"] is False


def test_other_warnings_pass_through(tmp_path: Path) -> None:
    class Warns(FixedWidth):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            import warnings

            warnings.warn("model says hello", UserWarning, stacklevel=1)
            return self.fc(x)

    with pytest.warns(UserWarning, match="model says hello"):
        outcome = run_export(loaded(Warns(), tmp_path), "onnx", tmp_path / "w.onnx", options=TORCHSCRIPT,
                             n_inputs=2, latency=False)
    assert outcome.passed is True
    assert not any("tracer" in n for n in outcome.validation.notes)


def test_cli_strict_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from deployprune import cli

    sd = tmp_path / "fixed_sd.pt"
    torch.save(FixedWidth().state_dict(), sd)
    args = ["export", str(sd), "--model", "tests.io.test_export_outputs:FixedWidth", "--input-shape", "2,6",
            "--opt", "exporter=torchscript", "--no-latency", "--n-inputs", "2"]
    assert cli.main([*args, "-o", str(tmp_path / "ok.onnx")]) == 0
    assert "note:       the tracer warned during the export: Converting a tensor to a Python integer" \
        in capsys.readouterr().out
    assert cli.main([*args, "-o", str(tmp_path / "strict.onnx"), "--strict"]) == 4
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "the tracer warned during the export" in err[0]
    assert not (tmp_path / "strict.onnx").exists()
