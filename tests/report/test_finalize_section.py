"""The finalize section of the JSON report: masked/removed/kept channels, checked against the schema."""

from __future__ import annotations

import copy
import html
import json
from pathlib import Path

import pytest
import torch

import deployprune
from deployprune import zoo
from deployprune.io import LoadedModel
from deployprune.pipeline import compact_loaded
from deployprune.report import render_html, render_markdown
from deployprune.validate import ValidationReport, validate

from . import schema_check

SCHEMA = json.loads((Path(deployprune.__file__).parent / "schemas" / "report-1.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def report() -> ValidationReport:
    """lenet with conv1's filters 0-2 masked (removable) and fc3's outputs 0-1 (kept: log_softmax mixes
    them), compacted by the pipeline; its finalize facts go into a report of the compact model."""
    torch.manual_seed(0)
    model = zoo.build("lenet").eval()
    conv = torch.ones_like(model.conv1.weight)
    conv[0:3] = 0
    fc = torch.ones_like(model.fc3.weight)
    fc[0:2] = 0
    x = torch.randn(1, 1, 28, 28)
    loaded = LoadedModel(model=model, example_inputs=(x,), masks={"conv1": {"weight": conv}, "fc3": {"weight": fc}},
                         source=Path("lenet.pt"), kind="checkpoint", arch="lenet")
    comp = compact_loaded(loaded)
    r = validate(comp.source, comp.model, (x,), n_inputs=2, latency=False, name="lenet")
    r.pipeline = {"params": {"source": 1, "compact": 1}, "finalize": comp.finalize_facts()}
    return r


def test_finalize_section_lists_every_kept_group(report: ValidationReport) -> None:
    doc = json.loads(report.to_json())
    fin = doc["pipeline"]["finalize"]
    assert (fin["masked_channels"], fin["removed_channels"], fin["kept_channels"]) == (5, 3, 2)
    assert fin["compacted"] is True and fin["abandoned"] is None
    assert fin["kept"] == [{"module": "fc3", "count": 2, "reason": "mixed by log_softmax: F.log_softmax "
                            "(node log_softmax)", "node": "log_softmax", "op": "F.log_softmax"}]
    assert schema_check.errors(doc, SCHEMA) == []
    again = ValidationReport.from_json(report.to_json())
    assert again.pipeline["finalize"] == fin
    md = render_markdown(report)
    assert "- finalize: removed 3 of 5 masked channels; " in md
    assert "  - kept 2 in 'fc3' (mixed by log_softmax: F.log_softmax (node log_softmax))" in md
    assert f"<li>{html.escape('kept 2 in ' + repr('fc3'))} (" in render_html(report)


@pytest.mark.parametrize(("mutate", "error"), [
    (lambda f: f.pop("kept"), "missing required key 'kept'"),
    (lambda f: f.update(masked_channels=-1), "< minimum 0"),
    (lambda f: f["kept"][0].pop("reason"), "missing required key 'reason'"),
    (lambda f: f["kept"][0].update(count=0), "< minimum 1"),
    (lambda f: f["kept"][0].update(extra=1), "unexpected key 'extra'"),
    (lambda f: f.update(kept="fc3"), "is not of type ['array']"),
])
def test_schema_rejects_a_malformed_finalize_section(report: ValidationReport, mutate, error: str) -> None:
    doc = json.loads(report.to_json())
    fin = copy.deepcopy(doc["pipeline"]["finalize"])
    mutate(fin)
    doc["pipeline"]["finalize"] = fin
    errs = schema_check.errors(doc, SCHEMA)
    assert any(error in e for e in errs), errs
