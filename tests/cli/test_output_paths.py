"""Output paths of ``deployprune export`` (issue 13): checked before any work, directories created as
optimum-cli does, and the private staging path never shown to the user or written into a report."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from .test_cli import LENET_SAMPLE, assert_one_line_error, run


@pytest.mark.parametrize(("output", "target", "message"), [
    ("z.onnx", "coreml",
     "z.onnx: the coreml target writes a '.mlpackage' directory; name the output z.mlpackage (or give a directory)"),
    ("z.mlpackage", "onnx",
     "z.mlpackage: the onnx target writes a '.onnx' file; name the output z.onnx (or give a directory)"),
    ("z.bin", "onnx", "z.bin: the onnx target writes a '.onnx' file; name the output z.onnx (or give a directory)"),
])
def test_output_named_for_another_target_is_refused_before_any_work(tmp_path: Path, output: str, target: str,
                                                                     message: str) -> None:
    proc = run("export", str(LENET_SAMPLE), "--target", target, "-o", output, cwd=tmp_path)
    assert_one_line_error(proc, 2, message)
    assert "compaction" not in proc.stdout  # nothing ran: the model was not even compacted
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("output", ["outdir/", "outdir", "nested/dir/"])
def test_output_directory_is_created_and_receives_the_artifact(tmp_path: Path, output: str) -> None:
    proc = run("export", str(LENET_SAMPLE), "--target", "onnx", "-o", output, "--no-latency", "--n-inputs", "2",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / output.rstrip("/")
    assert sorted(p.name for p in folder.iterdir()) == ["lenet.onnx", "lenet.onnx.report.json"]
    onnx.checker.check_model(str(folder / "lenet.onnx"))
    report = json.loads((folder / "lenet.onnx.report.json").read_text())
    assert report["artifact"]["path"] == str(Path(output.rstrip("/")) / "lenet.onnx")
    text = (folder / "lenet.onnx.report.json").read_text() + proc.stdout + proc.stderr
    assert ".partial" not in text, "the staging path leaked"
    conversion = report["pipeline"]["conversion"]
    assert conversion is None or ".partial" not in json.dumps(conversion)


def test_existing_directory_output_for_both_targets(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    for target, name in (("onnx", "lenet.onnx"), ("coreml", "lenet.mlpackage")):
        proc = run("export", str(LENET_SAMPLE), "--target", target, "-o", "out", "--no-latency", "--n-inputs", "2",
                   cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "out" / name).exists()


def test_a_file_given_as_the_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("mine")
    proc = run("export", str(LENET_SAMPLE), "--target", "onnx", "-o", "notes/", cwd=tmp_path)
    assert_one_line_error(proc, 3, "notes/: not a directory; name the artifact, e.g. notes.onnx")
    assert (tmp_path / "notes").read_text() == "mine"
