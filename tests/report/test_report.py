from __future__ import annotations

import copy
import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import deployprune
from deployprune.errors import EXIT_INPUT, EXIT_USAGE, InputError, OutputError, UsageError
from deployprune.latency import LatencyConfig
from deployprune.report import (
    comparison_rows,
    load_reports,
    render_html,
    render_markdown,
    summary_lines,
    write_report,
)
from deployprune.validate import ValidationReport, validate

from ..validate.helpers import export_onnx, masked_and_compact, perturb_onnx_weight, tiny_net
from . import schema_check

SCHEMA_FILE = Path(deployprune.__file__).parent / "schemas" / "report-1.json"
CFG = LatencyConfig(warmup=1, repeats=6, batch_sizes=(1, 2))


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[ValidationReport]:
    """Three runs: a faithful export, a broken export, and a compacted model in torch."""
    d = tmp_path_factory.mktemp("runs")
    model = tiny_net()
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    dense = export_onnx(model, (x,), d / "tiny.onnx")
    broken = d / "broken.onnx"
    perturb_onnx_weight(dense, broken, "/layer2/conv1/Conv")
    good = validate(model, dense, (x,), latency=CFG, dense_artifact=dense, name="tiny",
                    n_inputs=3)
    good.accuracy = {"top1": 0.925}
    bad = validate(model, broken, (x,), latency=CFG, dense_artifact=dense, name="tiny-broken",
                   n_inputs=3)
    masked, compact = masked_and_compact()
    xm = torch.randn(1, 3, 8, 8)
    comp = validate(masked, compact, (xm,), latency=CFG, name="masked-vs-compact", n_inputs=3,
                    localize=True)
    comp.accuracy = {"top1": 0.91, "top5": 0.99}
    comp.pipeline = {"source": {"path": "net.pt", "inputs": [[1, 3, 8, 8]]}, "blocked": []}
    return [good, bad, comp]


# --- JSON ----------------------------------------------------------------------------------


def test_reports_regenerate_from_json_alone(reports: list[ValidationReport],
                                            tmp_path: Path) -> None:
    for r in reports:
        text = r.to_json()
        again = ValidationReport.from_json(text)
        assert again.to_json() == text
        assert render_markdown(again) == render_markdown(r)
        assert render_html(again) == render_html(r)
        assert summary_lines(again) == summary_lines(r)
    # through files, as `deployprune report run1.json run2.json -o report.html` does
    paths = []
    for i, r in enumerate(reports):
        paths.append(write_report(r, tmp_path / f"run{i}.json"))
    loaded = load_reports(paths)
    write_report(loaded, tmp_path / "from_json.html")
    write_report(loaded, tmp_path / "from_json.md")
    assert (tmp_path / "from_json.html").read_text(encoding="utf-8") == render_html(reports)
    assert (tmp_path / "from_json.md").read_text(encoding="utf-8") == render_markdown(reports)


def test_non_finite_numbers_stay_strict_json(reports: list[ValidationReport]) -> None:
    r = copy.deepcopy(reports[0])
    r.outputs[0].max_rel = math.inf
    r.outputs[0].cosine = math.nan
    r.accuracy["loss"] = -math.inf
    text = r.to_json()

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    data = json.loads(text, parse_constant=reject)
    assert data["outputs"][0]["max_rel"] == "Infinity"
    assert data["outputs"][0]["cosine"] == "NaN"
    assert data["accuracy"]["loss"] == "-Infinity"
    again = ValidationReport.from_json(text)
    assert again.outputs[0].max_rel == math.inf and math.isnan(again.outputs[0].cosine)
    assert again.accuracy["loss"] == -math.inf
    assert again.to_json() == text
    assert schema_check.errors(data, json.loads(SCHEMA_FILE.read_text())) == []


def _schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def test_reports_match_the_json_schema(reports: list[ValidationReport]) -> None:
    schema = _schema()
    for r in reports:
        doc = json.loads(r.to_json())
        assert doc["schema"] == "deployprune.report/1"
        assert schema_check.errors(doc, schema) == []
    try:
        import jsonschema
    except ImportError:  # the hand checker above already covered the schema
        return
    jsonschema.Draft202012Validator.check_schema(schema)
    for r in reports:
        jsonschema.validate(json.loads(r.to_json()), schema,
                            cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize("mutate, schema_error, load_error", [
    (lambda d: d.update(extra=1), "unexpected key 'extra'",
     "unknown key 'extra' in ValidationReport"),
    (lambda d: d.pop("passed"), "missing required key 'passed'",
     "ValidationReport is missing key 'passed'"),
    (lambda d: d.update(passed="yes"), "is not of type ['boolean']",
     "report.passed: expected true or false, got 'yes'"),
    (lambda d: d["outputs"][0].update(max_abs="big"), "matches none of the alternatives",
     "report.outputs[0].max_abs: expected a number, got 'big'"),
    (lambda d: d["thresholds"].pop("max_rel"), "missing required key 'max_rel'",
     "report.thresholds: Thresholds is missing key 'max_rel'"),
    (lambda d: d.update(schema="deployprune.report/2"), "is not 'deployprune.report/1'",
     "schema 'deployprune.report/2' is not supported"),
])
def test_schema_and_loader_reject_malformed_reports(reports: list[ValidationReport], mutate,
                                                    schema_error: str, load_error: str) -> None:
    doc = json.loads(reports[0].to_json())
    mutate(doc)
    errs = schema_check.errors(doc, _schema())
    assert any(schema_error in e for e in errs), errs
    with pytest.raises(InputError) as info:
        ValidationReport.from_dict(doc)
    assert load_error in str(info.value)
    assert info.value.exit_code == EXIT_INPUT


def test_loading_bad_files_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match=r"bad.json: not valid JSON .*line 1"):
        load_reports([bad])
    with pytest.raises(InputError, match="missing.json: report not found"):
        load_reports([tmp_path / "missing.json"])


# --- text renderings -----------------------------------------------------------------------


def test_summary_lines(reports: list[ValidationReport]) -> None:
    good, bad, comp = reports
    lines = summary_lines(good)
    assert lines[0].startswith("PASS  tiny.onnx (onnxruntime): max abs ")
    assert "top-1 agreement 100.0% (3 random input(s))" in lines[0]
    assert lines[1].startswith("latency  batch 1, 1 thread(s): dense ")
    assert "faster" in lines[1] and "torch eager source" in lines[1]
    assert lines[2].startswith("params   ") and "of source" in lines[2]
    assert lines[3].startswith("size     ")
    blines = summary_lines(bad)
    assert blines[0].startswith("FAIL  broken.onnx")
    assert any(line.startswith("  - first diverging layer: layer2.conv1") for line in blines)
    clines = summary_lines(comp)
    assert clines[0].startswith("PASS  masked-vs-compact (torch)")
    assert "compacted" in clines[1]


def test_markdown_sections(reports: list[ValidationReport]) -> None:
    good, bad, comp = reports
    md = render_markdown(good)
    for heading in ("# Validation report: tiny", "## Parity", "## Latency",
                    "## Model statistics", "## Layers", "## Environment"):
        assert heading in md
    assert "Thresholds: max rel ≤ 0.0001, cosine ≥ 0.9999." in md
    assert "| exported (onnxruntime) | onnxruntime | 2 |" in md
    assert "## Failures" not in md
    bmd = render_markdown(bad)
    assert "## Failures" in bmd and "## Layer localization" in bmd
    assert re.search(r"\| \d+ \| layer2\.conv1 ◀ first diverging \| /layer2/conv1/ \| Conv \|",
                     bmd)
    cmd = render_markdown(comp)
    assert "| conv1 | Conv2d | 3 | 8 → 5 |" in cmd
    assert "| source | file | net.pt |\n|  | example inputs | 1×3×8×8 |" in cmd  # a table, not JSON


def test_comparison_table(reports: list[ValidationReport]) -> None:
    header, rows = comparison_rows(reports)
    assert header[:6] == ["run", "verdict", "params", "MACs", "size", "size reduction"]
    assert header[-2:] == ["accuracy: top1", "accuracy: top5"]
    assert [r[0] for r in rows] == ["tiny", "tiny-broken", "masked-vs-compact"]
    assert [r[1] for r in rows] == ["PASS", "FAIL", "PASS"]
    assert rows[0][5] == "baseline" and rows[0][7] == "baseline"
    assert rows[0][-2:] == ["92.5%", "–"] and rows[2][-2:] == ["91.0%", "99.0%"]
    md = render_markdown(reports)
    assert md.startswith("# Comparison of 3 runs\n")
    assert md.count("## Validation report: ") == 3


def test_html_is_self_contained(reports: list[ValidationReport]) -> None:
    page = render_html(reports)
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "url(" not in page
    urls = set(re.findall(r"https?://[^\s\"'<>]+", page))
    assert urls == {"http://www.w3.org/2000/svg"}  # the SVG namespace, never fetched
    assert page.count('data-plot="latency"') == 3
    assert page.count('data-plot="comparison"') == 1
    assert 'data-plot="channels"' in page and 'data-plot="sparsity"' in page


# --- files ---------------------------------------------------------------------------------


def test_write_report_formats_and_overwrite_rules(reports: list[ValidationReport],
                                                  tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    write_report(reports, out)
    first = out.read_text(encoding="utf-8")
    with pytest.raises(OutputError, match="already exists; pass --force") as info:
        write_report(reports[:1], out)
    assert info.value.exit_code == EXIT_INPUT
    assert out.read_text(encoding="utf-8") == first  # untouched
    write_report(reports[:1], out, force=True)
    assert out.read_text(encoding="utf-8") == render_html(reports[:1])
    txt = write_report(reports[0], tmp_path / "r.txt", format="md")
    assert txt.read_text(encoding="utf-8") == render_markdown(reports[0])
    with pytest.raises(UsageError, match=r"cannot tell the report format from '\.txt'") as info:
        write_report(reports, tmp_path / "other.txt")
    assert info.value.exit_code == EXIT_USAGE
    with pytest.raises(UsageError, match="a JSON report holds one run, got 3"):
        write_report(reports, tmp_path / "all.json")
    with pytest.raises(UsageError, match="report format 'pdf' is not one of html, md, json"):
        write_report(reports, tmp_path / "x.pdf", format="pdf")
    with pytest.raises(OutputError, match="does not exist; create it first"):
        write_report(reports, tmp_path / "no" / "dir.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.txt"]  # no leftovers


# --- headless Chromium ---------------------------------------------------------------------

_PROBE = """
<pre id="render-check"></pre>
<script>
const found = {};
for (const svg of document.querySelectorAll('svg.plot')) {
  const box = svg.getBoundingClientRect();
  const painted = sel => [...svg.querySelectorAll(sel)]
      .filter(e => { const b = e.getBBox(); return b.width > 0 && b.height > 0; }).length;
  (found[svg.dataset.plot] = found[svg.dataset.plot] || []).push({
    svg: svg instanceof SVGSVGElement, width: box.width, height: box.height,
    boxes: painted('rect.box'), samples: svg.querySelectorAll('circle.sample').length,
    after: painted('rect.after'), before: painted('rect.before'),
    removed: svg.querySelectorAll('rect.removed').length, bars: painted('rect.bar')});
}
document.getElementById('render-check').textContent = JSON.stringify(found);
</script>
"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None,
                    reason="headless Chromium not installed (apt-get install -y chromium)")
def test_html_plots_render_in_headless_chromium(reports: list[ValidationReport],
                                                tmp_path: Path) -> None:
    page = render_html(reports).replace("</main></body>", _PROBE + "</main></body>")
    target = tmp_path / "report.html"
    target.write_text(page, encoding="utf-8")
    profile = tmp_path / "profile"
    profile.mkdir()
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", "--window-size=1200,900",
           "--dump-dom", target.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(r'<pre id="render-check">(.*?)</pre>', proc.stdout, re.S)
    assert match, proc.stdout[:2000]
    found = json.loads(html.unescape(match.group(1)))

    assert sorted(found) == ["channels", "comparison", "latency", "sparsity"]
    for plots in found.values():
        for p in plots:
            assert p["svg"] and p["width"] > 300 and p["height"] > 100
    # latency: one box per model/runtime/batch size and one dot per timed call
    assert len(found["latency"]) == 3
    for plot, r in zip(found["latency"], reports, strict=True):
        assert plot["boxes"] == len(r.latency.results)
        assert plot["samples"] == sum(len(x.samples_ms) for x in r.latency.results)
    # channels: every plotted layer has a before bar and an after bar; the compacted run
    # shows conv1 shrinking
    comp = found["channels"][-1]
    assert comp["before"] == comp["after"] == 3  # conv1, conv2, fc
    assert found["sparsity"][-1]["removed"] == 3
    # comparison: four metrics for each of the three runs
    assert found["comparison"][0]["bars"] == 12
