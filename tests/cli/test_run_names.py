"""``--name`` labels a run (issue 13: two runs of the same model both showed as its file name)."""

from __future__ import annotations

import json
from pathlib import Path

from .test_cli import LENET_SAMPLE, run


def test_runs_are_labelled_in_their_reports_and_the_comparison(tmp_path: Path) -> None:
    for label, out in (("nni-masks", "a.onnx"), ("same, again", "b.onnx")):
        proc = run("export", str(LENET_SAMPLE), "-o", out, "--name", label, "--no-latency", "--n-inputs", "2",
                   cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert json.loads((tmp_path / f"{out}.report.json").read_text())["name"] == label
    proc = run("validate", str(LENET_SAMPLE), "a.onnx", "--name", "checked later", "--no-latency",
               "--json", "v.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "v.json").read_text())["name"] == "checked later"
    proc = run("report", "a.onnx.report.json", "b.onnx.report.json", "v.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for label in ("nni-masks", "same, again", "checked later"):
        assert f"| {label} |" in proc.stdout, proc.stdout


def test_without_a_name_the_run_is_the_model_file(tmp_path: Path) -> None:
    proc = run("export", str(LENET_SAMPLE), "-o", "a.onnx", "--no-latency", "--n-inputs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "a.onnx.report.json").read_text())["name"] == "lenet"
