"""``deployprune validate`` latency/report flags and ``deployprune report`` with several runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import deployprune as dp
from deployprune import cli
from deployprune.io import load_model
from deployprune.validate import load_report
from tests.cli.test_cli import LENET_SAMPLE, assert_one_line_error, run
from tests.faults import perturb_initializer


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LeNet sample exported compacted and dense, both with a dynamic batch axis."""
    d = tmp_path_factory.mktemp("flags")
    loaded = load_model(LENET_SAMPLE)
    dp.export(loaded.model, loaded.example_inputs, d / "c.onnx", masks=loaded.masks, dynamic_batch=True)
    dp.export(loaded.model, loaded.example_inputs, d / "dense.onnx", dynamic_batch=True)
    return d


def test_validate_latency_flags_json_and_html(artifacts: Path) -> None:
    proc = run(
        "validate", str(LENET_SAMPLE), "c.onnx", "--n-inputs", "2",
        "--warmup", "1", "--repeats", "3", "--threads", "1", "--graph-opt", "basic",
        "--providers", "CPUExecutionProvider", "--batch-sizes", "1,4", "--no-eager",
        "--localize", "always", "--dense-artifact", "dense.onnx",
        "--json", "v.json", "--html", "v.html",
        cwd=artifacts,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PASS")
    assert "html:       v.html" in proc.stdout

    doc = json.loads((artifacts / "v.json").read_text())
    assert doc["latency"]["config"] == {
        "warmup": 1, "repeats": 3, "threads": 1, "graph_optimization": "basic",
        "providers": ["CPUExecutionProvider"], "batch_sizes": [1, 4], "eager": False,
    }  # fmt: skip
    timed = sorted((r["role"], r["batch_size"], len(r["samples_ms"])) for r in doc["latency"]["results"])
    assert timed == [("artifact", 1, 3), ("artifact", 4, 3), ("dense", 1, 3), ("dense", 4, 3)]
    assert doc["dense_artifact"]["path"] == "dense.onnx"
    # --localize always: intermediate layers compared although the artifact passed
    assert doc["localization"]["method"] == "onnx-intermediates"
    assert [row["module"] for row in doc["localization"]["layers"]][:2] == ["conv1", "conv2"]

    html = (artifacts / "v.html").read_text()
    assert html.lower().startswith("<!doctype html")
    assert html.count("<svg") >= 1 and "dense" in html

    # without the flags: defaults (eager source timed at batch 1, localization only on failure)
    proc = run("validate", str(LENET_SAMPLE), "c.onnx", "--n-inputs", "2", "--repeats", "2", "--warmup", "0",
               "--localize", "never", "--json", "d.json", cwd=artifacts)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((artifacts / "d.json").read_text())
    assert doc["latency"]["config"]["batch_sizes"] == [1] and doc["latency"]["config"]["eager"] is True
    assert sorted(r["role"] for r in doc["latency"]["results"]) == ["artifact", "source"]
    assert doc["localization"] is None


def test_validate_html_written_when_validation_fails(artifacts: Path) -> None:
    # a real fault: one weight of a copy of the artifact moved by half the weight's range
    shutil.copy(artifacts / "c.onnx", artifacts / "perturbed.onnx")
    perturb_initializer(artifacts / "perturbed.onnx")
    proc = run("validate", str(LENET_SAMPLE), "perturbed.onnx", "--n-inputs", "2", "--no-latency",
               "--html", "fail.html", cwd=artifacts)
    assert_one_line_error(proc, 4, "perturbed.onnx: validation failed: output 'output_0': ...")
    html = (artifacts / "fail.html").read_text()
    assert "FAIL" in html and "output &#x27;output_0&#x27;: max rel error" in html
    # the perturbed layer is the one named (the dynamo export's nodes carry module scopes)
    assert "first diverging layer: fc3" in html


INTS = "expected positive integers separated by commas, e.g. 1,8"
BAD_FLAGS = [
    ("batch-sizes", ["--batch-sizes", "1,x"], 2, f"--batch-sizes '1,x': {INTS}"),
    ("batch-zero", ["--batch-sizes", "0"], 2, f"--batch-sizes '0': {INTS}"),
    ("graph-opt", ["--graph-opt", "fast"], 2,
     "deployprune validate: argument --graph-opt: invalid choice: 'fast' (choose from ..."),
    ("localize", ["--localize", "sometimes"], 2,
     "deployprune validate: argument --localize: invalid choice: 'sometimes' ..."),
    ("provider", ["--providers", "NopeExecutionProvider"], 2,
     "--providers: onnxruntime execution provider(s) NopeExecutionProvider not available here; available: ..."),
    ("warmup", ["--warmup", "-1"], 2, "latency warmup: expected an integer >= 0, got -1"),
    ("repeats", ["--repeats", "0"], 2, "latency repeats: expected an integer >= 1, got 0"),
    ("threads", ["--threads", "-2"], 2, "--threads -2: expected 0 (runtime default) or a positive count"),
    ("dense", ["--dense-artifact", "missing.onnx"], 3,
     "missing.onnx: no such dense artifact (--dense-artifact); check the path"),
    ("html-exists", ["--html", "exists.html"], 3,
     "exists.html: already exists; pass --force to overwrite it"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "flags", "code", "message"), BAD_FLAGS, ids=[c[0] for c in BAD_FLAGS])
def test_validate_bad_flags(artifacts: Path, case: str, flags: list[str], code: int, message: str,
                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # in process (the same main() as the console script; a subprocess per case would only add
    # interpreter start-up): bad flags fail before the model is loaded, with one line on stderr
    (artifacts / "exists.html").write_text("keep me")
    monkeypatch.chdir(artifacts)
    assert cli.main(["validate", str(LENET_SAMPLE), "c.onnx", *flags]) == code
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    if message.endswith("..."):
        assert lines[0].startswith(f"error: {message[:-3]}"), lines[0]
    else:
        assert lines[0] == f"error: {message}"
    assert (artifacts / "exists.html").read_text() == "keep me"


def test_validate_bad_flag_subprocess(artifacts: Path) -> None:
    proc = run("validate", str(LENET_SAMPLE), "c.onnx", "--batch-sizes", "8,-1", cwd=artifacts)
    assert_one_line_error(proc, 2, f"--batch-sizes '8,-1': {INTS}")


def test_report_several_runs(artifacts: Path) -> None:
    for name, extra in (("a", []), ("b", ["--dense-artifact", "dense.onnx"])):
        proc = run("validate", str(LENET_SAMPLE), "c.onnx", "--n-inputs", "2", "--repeats", "2", "--warmup", "0",
                   "--json", f"{name}.json", *extra, cwd=artifacts)
        assert proc.returncode == 0, proc.stderr

    proc = run("report", "a.json", "b.json", "-o", "cmp.html", cwd=artifacts)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "report: cmp.html\n"
    html = (artifacts / "cmp.html").read_text()
    assert "<title>deployprune report: 2 runs compared</title>" in html and "<h2>Comparison</h2>" in html
    proc = run("report", "a.json", "b.json", "--format", "md", cwd=artifacts)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# Comparison of 2 runs\n")

    # JSON holds one run: -o x.json round-trips it, two runs are refused
    proc = run("report", "a.json", "-o", "copy.json", cwd=artifacts)
    assert proc.returncode == 0, proc.stderr
    assert load_report(artifacts / "copy.json").to_json() == load_report(artifacts / "a.json").to_json()
    proc = run("report", "a.json", "b.json", "--format", "json", cwd=artifacts)
    assert_one_line_error(
        proc, 2, "--format json holds one run, got 2 reports; use --format md or html to compare runs"
    )
    proc = run("report", "a.json", "b.json", "-o", "two.json", cwd=artifacts)
    assert_one_line_error(
        proc, 2, "two.json: a JSON report holds one run, got 2; write HTML or Markdown to compare runs"
    )
    assert not (artifacts / "two.json").exists()
    proc = run("report", "a.json", "b.json", "-o", "cmp.html", cwd=artifacts)
    assert_one_line_error(proc, 3, "cmp.html: already exists; pass --force to overwrite it")
    proc = run("report", "a.json", "b.json", "-o", "cmp.html", "--force", cwd=artifacts)
    assert proc.returncode == 0, proc.stderr
    proc = run("report", "a.json", "nope.json", cwd=artifacts)
    assert_one_line_error(proc, 3, "nope.json: report not found; check the path")
