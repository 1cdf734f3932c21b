"""Readable reports (issue 13): the pipeline section is a table, not a JSON dump; latency is
plotted like with like (one panel per batch size, log axis when values span more than 10×);
task accuracy on labelled data has its own table and summary line.

The reports come from real ``deployprune export`` runs of the shipped samples; where a test needs
a situation one machine cannot produce on demand (torch timed at batch 8, onnxruntime at batch 1;
timings 100× apart; accuracy from ``--data``), it edits the real report's JSON, as a newer tool or
another option would have written it.
"""

from __future__ import annotations

import copy
import html
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import deployprune
from deployprune import zoo
from deployprune.io import LoadedModel
from deployprune.pipeline import compact_loaded
from deployprune.report import (
    comparison_notes,
    comparison_rows,
    fmt_bytes,
    render_html,
    render_markdown,
    summary_lines,
    svg_comparison,
    svg_latency,
)
from deployprune.validate import ValidationReport, load_report

from . import schema_check

REPO = Path(deployprune.__file__).resolve().parent.parent
SAMPLES = REPO / "models" / "samples"
SCHEMA = json.loads((REPO / "deployprune" / "schemas" / "report-1.json").read_text(encoding="utf-8"))
SVG = "{http://www.w3.org/2000/svg}"


def _export(tmp: Path, sample: str, target: str, suffix: str) -> ValidationReport:
    out = tmp / f"{sample}{suffix}"
    proc = subprocess.run([sys.executable, "-m", "deployprune", "-q", "export", str(SAMPLES / f"{sample}.pt"),
                           "--target", target, "-o", str(out)], cwd=tmp, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_report(Path(str(out) + ".report.json"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ValidationReport]:
    tmp = tmp_path_factory.mktemp("exports")
    return {"lenet": _export(tmp, "lenet", "onnx", ".onnx"),
            "resnet_small": _export(tmp, "resnet_small", "onnx", ".onnx")}


@pytest.fixture(scope="module")
def coreml_report(tmp_path_factory: pytest.TempPathFactory) -> ValidationReport:
    pytest.importorskip("coremltools")
    return _export(tmp_path_factory.mktemp("coreml"), "lenet", "coreml", ".mlpackage")


def _md_section(md: str, title: str) -> str:
    start = md.index(f"## {title}\n")
    end = md.find("\n## ", start + 1)
    return md[start:end if end >= 0 else len(md)]


def _html_section(page: str, title: str) -> str:
    start = page.index(f"<h3>{title}</h3>")
    end = page.find("<h3>", start + 1)
    return page[start:end if end >= 0 else len(page)]


def _assert_no_json(text: str) -> None:
    text = html.unescape(text)
    for token in ("{", "}", "[", "]"):
        assert token not in text, f"JSON literal ({token!r}) in the pipeline section:\n{text}"
    assert not re.search(r'"\w+"\s*:', text), text


def _pipeline_rows(md: str) -> list[list[str]]:
    section = _md_section(md, "Pipeline")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    assert rows[0] == ["stage", "fact", "value"]
    return rows[1:]


# --- pipeline: a table ------------------------------------------------------------------------


@pytest.mark.parametrize("sample", ["lenet", "resnet_small"])
def test_pipeline_section_is_a_table_of_facts_not_json(exported: dict[str, ValidationReport], sample: str) -> None:
    r = exported[sample]
    p = r.pipeline
    assert {"source", "masks", "params", "finalize", "conversion"} <= set(p)
    md = render_markdown(r)
    section = _md_section(md, "Pipeline")
    _assert_no_json(section)
    rows = _pipeline_rows(md)
    # every stage starts a group; facts are rows with their values
    assert [row[0] for row in rows if row[0]] == ["source", "masks", "parameters", "finalize", "conversion"]
    facts = {(row[1], row[2]) for row in rows}
    shape = "×".join(str(d) for d in p["source"]["inputs"][0]["shape"])
    assert ("example inputs", f"{shape} float32") in facts
    assert ("file", p["source"]["path"]) in facts
    assert ("architecture", p["source"]["arch"]) in facts
    for name in p["masks"]:
        assert (name, "50.0% zero") in facts
    src, comp = p["params"]["source"], p["params"]["compact"]
    assert any(f == "source → compact" and v.startswith(f"{src:,} → {comp:,} (") for f, v in facts)
    fin = p["finalize"]
    assert ("channels", f"removed {fin['removed_channels']:,} of {fin['masked_channels']:,} masked channels") in facts
    assert ("kept masked channels", "0") in facts and ("compaction", "done") in facts
    assert ("time", f"{fin['seconds']:.3g} s") in facts
    conv = p["conversion"]
    meta = conv["metadata"]
    assert ("target", "onnx") in facts and ("artifact", conv["path"]) in facts
    assert ("size on disk", fmt_bytes(conv["size_bytes"])) in facts
    assert ("exporter", f"{meta['exporter']}, opset {meta['opset']}") in facts
    assert ("warnings", "none") in facts
    options = next(v for f, v in facts if f == "options")
    assert f"opset={conv['options']['opset']}" in options and "dynamic_batch=no" in options

    page = render_html(r)
    hsec = _html_section(page, "Pipeline")
    _assert_no_json(re.sub(r"<[^>]+>", "", hsec))
    assert '<table class="pipeline">' in hsec and "<code>" not in hsec
    assert re.search(r'<th scope="row" rowspan="\d+">finalize</th><td>channels</td><td>removed ', hsec)
    assert f"<td>size on disk</td><td>{html.escape(fmt_bytes(conv['size_bytes']))}</td>" in hsec


def test_coreml_pipeline_section_reads_as_a_table(coreml_report: ValidationReport) -> None:
    md = render_markdown(coreml_report)
    _assert_no_json(_md_section(md, "Pipeline"))
    facts = {(row[1], row[2]) for row in _pipeline_rows(md)}
    ver = coreml_report.pipeline["conversion"]["metadata"]["verification"]
    assert ("target", "coreml") in facts
    assert ("read-back", f"passed; {ver['weights_checked']} weights checked, {ver['sparse_constants']} sparse / "
            f"{ver['dense_constants']} dense constants") in facts
    assert any(f == "weight file" for f, _ in facts)
    _assert_no_json(re.sub(r"<[^>]+>", "", _html_section(render_html(coreml_report), "Pipeline")))


def test_kept_channels_and_facts_of_a_newer_tool_stay_readable(exported: dict[str, ValidationReport]) -> None:
    """Kept channels are listed with their reasons; a key this version does not know is compact text."""
    torch.manual_seed(0)
    model = zoo.build("lenet").eval()
    conv = torch.ones_like(model.conv1.weight)
    conv[0:3] = 0
    fc = torch.ones_like(model.fc3.weight)
    fc[0:2] = 0  # kept: log_softmax mixes fc3's outputs
    x = torch.randn(1, 1, 28, 28)
    loaded = LoadedModel(model=model, example_inputs=(x,), masks={"conv1": {"weight": conv}, "fc3": {"weight": fc}},
                         source=Path("lenet.pt"), kind="checkpoint", arch="lenet")
    r = copy.deepcopy(exported["lenet"])
    r.pipeline["finalize"] = compact_loaded(loaded).finalize_facts()
    r.pipeline["quantization"] = {"scheme": {"weights": "int8", "axes": [0, 1]}, "calibrated": True}
    r = ValidationReport.from_json(r.to_json())
    assert schema_check.errors(json.loads(r.to_json()), SCHEMA) == []

    md = render_markdown(r)
    section = _md_section(md, "Pipeline")
    _assert_no_json(section)
    facts = {(row[0], row[1], row[2]) for row in _pipeline_rows(md)}
    assert ("", "kept masked channels", "2 (listed below)") in facts
    assert ("quantization", "scheme", "weights=int8, axes=(0, 1)") in facts
    assert ("", "calibrated", "yes") in facts
    assert "  - kept 2 in 'fc3' (mixed by log_softmax: F.log_softmax (node log_softmax))" in section
    hsec = _html_section(render_html(r), "Pipeline")
    _assert_no_json(re.sub(r"<[^>]+>", "", hsec))
    assert re.search(r"<td>kept masked channels</td><td>2<ul><li>kept 2 in &#x27;fc3&#x27; \(mixed by "
                     r"log_softmax", hsec)


# --- latency: like with like ------------------------------------------------------------------


def _panels(svg: str) -> list[ET.Element]:
    root = ET.fromstring(svg)
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == "panel"]


def _series(panel: ET.Element) -> list[ET.Element]:
    return [g for g in panel.iter(f"{SVG}g") if g.get("class") == "series"]


def _texts(el: ET.Element) -> str:
    return " ".join(t.text or "" for t in el.iter(f"{SVG}text"))


def _source_at_batch_8(r: ValidationReport) -> ValidationReport:
    """The report with its torch eager timing at batch 8 (the artifact and dense export stay at 1)."""
    r = copy.deepcopy(r)
    src = next(x for x in r.latency.results if x.role == "source")
    src.batch_size = 8
    return ValidationReport.from_json(r.to_json())


def test_latency_plot_never_puts_two_batch_sizes_on_one_axis(exported: dict[str, ValidationReport]) -> None:
    r = _source_at_batch_8(exported["lenet"])
    panels = _panels(svg_latency(r))
    assert [p.get("data-batch") for p in panels] == ["1", "8"]
    for p in panels:
        batches = {s.get("data-batch") for s in _series(p)}
        assert batches == {p.get("data-batch")}, "one axis, several batch sizes"
        assert f"batch {p.get('data-batch')}" in _texts(p)
    assert {s.get("data-role") for s in _series(panels[0])} == {"dense", "artifact"}
    assert {s.get("data-role") for s in _series(panels[1])} == {"source"}
    # every timed call is still drawn, once
    assert sum(len(s.findall(f"{SVG}circle")) for p in panels for s in _series(p)) == sum(
        len(x.samples_ms) for x in r.latency.results)

    # text: the source is not compared with an artifact timed at another batch
    line = next(x for x in summary_lines(r) if x.startswith("latency "))
    assert line.startswith("latency  batch 1,") and "torch eager" not in line
    lat = _md_section(render_markdown(r), "Latency")
    assert ("- source (torch eager) was timed at batch 8 and the artifact at batch 1: not compared "
            "(time per call depends on the batch size)") in lat
    assert "vs the torch eager source" not in lat
    rows = [line.split("|")[3].strip() for line in lat.splitlines() if line.startswith("| ") and "calls" not in line]
    assert rows == sorted(rows, key=int)  # grouped by batch size
    assert "not compared" in _html_section(render_html(r), "Latency")


def _with_samples(r: ValidationReport, by_role: dict[str, list[float]]) -> ValidationReport:
    r = copy.deepcopy(r)
    doc = json.loads(r.to_json())
    for res in doc["latency"]["results"]:
        if res["role"] in by_role:
            s = by_role[res["role"]]
            res.update(samples_ms=s, median_ms=sorted(s)[len(s) // 2], min_ms=min(s), p90_ms=max(s),
                       p99_ms=max(s), mean_ms=sum(s) / len(s))
    return ValidationReport.from_dict(doc)


def test_latency_axis_is_logarithmic_when_values_span_more_than_10x(exported: dict[str, ValidationReport]) -> None:
    spread = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    far = _with_samples(exported["lenet"], {"source": [10 * v for v in spread], "dense": spread,
                                            "artifact": [v / 10 for v in spread]})  # 150× apart
    (panel,) = _panels(svg_latency(far))
    assert panel.get("data-scale") == "log"
    assert "log scale" in _texts(panel)
    # on a log axis equal relative spreads draw as equal widths (a linear axis squashes the fast one)
    widths = {s.get("data-role"): float(next(r for r in s.iter(f"{SVG}rect") if r.get("class") == "box")
                                        .get("width")) for s in _series(panel)}
    assert widths["artifact"] > 10 and 0.8 < widths["artifact"] / widths["source"] < 1.25

    near = _with_samples(exported["lenet"], {"source": [2 * v for v in spread], "dense": spread,
                                             "artifact": spread})
    (panel,) = _panels(svg_latency(near))
    assert panel.get("data-scale") == "linear"
    assert "log scale" not in _texts(panel)


def test_comparison_compares_latency_only_at_one_batch_size(exported: dict[str, ValidationReport]) -> None:
    a = copy.deepcopy(exported["lenet"])
    b = copy.deepcopy(exported["resnet_small"])
    header, rows = comparison_rows([a, b])
    i = header.index("speedup vs first")
    assert rows[1][header.index("latency")].endswith("(b1)") and rows[1][i].endswith("×")
    assert "at batch 1, the smallest batch size every run timed" in comparison_notes([a, b])[0]

    doc = json.loads(b.to_json())
    for res in doc["latency"]["results"]:
        res["batch_size"] = 8  # the second run was timed at batch 8 only
    b8 = ValidationReport.from_dict(doc)
    header, rows = comparison_rows([a, b8])
    assert rows[1][header.index("latency")].endswith("(b8)")
    assert rows[1][i] == "not compared (b8 vs b1)"
    assert "runs timed at different batch sizes are not compared" in comparison_notes([a, b8])[0]
    bars = [g for g in ET.fromstring(svg_comparison([a, b8])).iter(f"{SVG}rect")
            if g.get("class") == "bar" and g.get("data-metric", "").startswith("latency")]
    assert [x.get("data-run") for x in bars] == [a.name]  # no bar for the batch-8 run next to batch 1
    marks = [t for t in ET.fromstring(svg_comparison([a, b8])).iter(f"{SVG}text") if t.get("class") == "not-compared"]
    assert [t.text for t in marks] == ["b8"]
    md = render_markdown([a, b8])
    assert "not compared (b8 vs b1)" in md and "runs timed at different batch sizes" in md


# --- accuracy ---------------------------------------------------------------------------------


def _with_accuracy(r: ValidationReport, accuracy: dict[str, float], data: str = "deployprune.data:digits",
                   samples: int = 360) -> ValidationReport:
    r = copy.deepcopy(r)
    r.accuracy = dict(accuracy)
    r.pipeline["accuracy_data"] = {"data": data, "samples": samples}
    again = ValidationReport.from_json(r.to_json())
    assert schema_check.errors(json.loads(again.to_json()), SCHEMA) == []
    return again


def test_accuracy_section_and_summary_line(exported: dict[str, ValidationReport]) -> None:
    r = _with_accuracy(exported["lenet"], {"source": 0.953, "artifact": 0.951})
    assert summary_lines(r)[-1] == ("accuracy top-1 on deployprune.data:digits (360 samples): "
                                    "source 95.3% -> artifact 95.1%")
    md = render_markdown(r)
    acc = _md_section(md, "Accuracy")
    assert "Task top-1 accuracy on labelled data: deployprune.data:digits (360 samples)." in acc
    assert "not the parity check's top-1 agreement" in acc
    assert "| model | top-1 accuracy |\n|---|---|\n| source | 95.3% |\n| artifact | 95.1% |" in acc
    # the data is named once, in the accuracy section, not again in the pipeline table
    pipe = _md_section(md, "Pipeline")
    assert "digits" not in pipe and "accuracy" not in pipe
    assert md.index("## Parity") < md.index("## Accuracy")  # next to the agreement it differs from
    page = render_html(r)
    hacc = _html_section(page, "Accuracy")
    assert '<table class="accuracy">' in hacc and "<td>source</td><td>95.3%</td>" in hacc
    assert "digits" not in _html_section(page, "Pipeline")


def test_accuracy_of_a_scenario_run_lists_every_stage_in_order(exported: dict[str, ValidationReport]) -> None:
    r = _with_accuracy(exported["lenet"], {"before pruning": 0.96, "after fine-tuning": 0.95, "compacted": 0.95,
                                           "artifact": 0.949})
    assert summary_lines(r)[-1] == ("accuracy top-1 on deployprune.data:digits (360 samples): before pruning "
                                    "96.0%, after fine-tuning 95.0%, compacted 95.0%, artifact 94.9%")
    acc = _md_section(render_markdown(r), "Accuracy")
    assert [line.split("|")[1].strip() for line in acc.splitlines() if line.startswith("| ")][1:] == [
        "before pruning", "after fine-tuning", "compacted", "artifact"]
    assert not any(x.startswith("accuracy") for x in summary_lines(exported["lenet"]))  # none measured: no line


def test_comparison_accuracy_columns_are_percentages_on_named_data(exported: dict[str, ValidationReport]) -> None:
    a = _with_accuracy(exported["lenet"], {"source": 0.953, "artifact": 0.951})
    b = _with_accuracy(exported["resnet_small"], {"source": 0.9, "artifact": 0.875})
    header, rows = comparison_rows([a, b])
    assert header[-2:] == ["accuracy: source", "accuracy: artifact"]
    assert rows[0][-2:] == ["95.3%", "95.1%"] and rows[1][-2:] == ["90.0%", "87.5%"]
    assert comparison_notes([a, b])[1].startswith("Accuracy: task top-1 on deployprune.data:digits (360 samples)")
    c = _with_accuracy(exported["resnet_small"], {"source": 0.9, "artifact": 0.875}, data="mydata:val", samples=50)
    note = comparison_notes([a, c])[1]
    assert "different data per run, so not comparable" in note and "mydata:val (50 samples)" in note
