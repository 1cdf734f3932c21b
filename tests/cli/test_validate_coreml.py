"""``deployprune validate model.pt model.mlpackage`` on the package ``export --target coreml`` wrote (issue 13):
the read-back compares the program with the compacted model that was converted, not the full-size masked one."""

from __future__ import annotations

from pathlib import Path

from .test_cli import LENET_SAMPLE, run


def test_validate_accepts_the_compacted_package_export_wrote(tmp_path: Path) -> None:
    proc = run("export", str(LENET_SAMPLE), "--target", "coreml", "-o", "lenet.mlpackage", "--no-latency",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run("validate", str(LENET_SAMPLE), "lenet.mlpackage", "--no-latency", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PASS  lenet.mlpackage (coreml-readback)"), proc.stdout
    assert "not found in the program" not in proc.stdout + proc.stderr
