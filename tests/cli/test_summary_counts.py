"""ONNX and Core ML exports count parameters and MACs the same way (issue 13): both summaries
show one `params ... ; MACs ...` line, from the artifact itself, with equal figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("deployprune")
SAMPLES = Path(__file__).resolve().parents[2] / "models" / "samples"


def export(sample: str, target: str, out: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(SCRIPT), "-q", "export", str(SAMPLES / sample), "--target", target, "-o", str(out),
                           "--no-latency"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.parametrize("sample", ["lenet.pt", "resnet_small.pt"])
def test_onnx_and_coreml_summaries_count_alike(sample: str, tmp_path: Path) -> None:
    pytest.importorskip("coremltools")
    stem = Path(sample).stem
    onnx_lines = export(sample, "onnx", tmp_path / f"{stem}.onnx")
    coreml_lines = export(sample, "coreml", tmp_path / f"{stem}.mlpackage")
    onnx_report = json.loads((tmp_path / f"{stem}.onnx.report.json").read_text())
    coreml_report = json.loads((tmp_path / f"{stem}.mlpackage.report.json").read_text())
    o, c = onnx_report["artifact_stats"], coreml_report["artifact_stats"]
    assert o["params"] == c["params"] and o["macs"] == c["macs"], (o, c)  # the same compacted model
    assert c["params"] < coreml_report["source_stats"]["params"]  # compared with the masked source
    for lines in (onnx_lines, coreml_lines):
        params = [line for line in lines if line.startswith("params")]
        assert len(params) == 1 and params[0].startswith("params   ") and "; MACs " in params[0], lines
    assert [p.split(" (")[0] for p in onnx_lines if p.startswith("params")] == \
        [p.split(" (")[0] for p in coreml_lines if p.startswith("params")]
