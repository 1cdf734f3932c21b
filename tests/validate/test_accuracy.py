"""Task accuracy on labelled data (issue 13): ``validate``/``export --data`` report the top-1
accuracy of source and artifact, measured independently here; bad data is a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import deployprune as dp
from deployprune import zoo
from deployprune.accuracy import measure
from deployprune.data import digits
from deployprune.io import save_checkpoint
from deployprune.training import evaluate
from deployprune.validate import load_report

pytest.importorskip("sklearn")
SCRIPT = Path(sys.executable).with_name("deployprune")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([str(SCRIPT), "-q", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, nn.Module]:
    """The digits net, trained a little (so accuracy is neither chance nor 100%), pruned by half."""
    torch.manual_seed(0)
    model = zoo.build("mnist_net_digits")
    train, _val = digits(batch_size=64, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for x, y in train:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    pruner = dp.Pruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "out_channel"}],
                       (torch.zeros(1, 1, 8, 8),))
    pruner.prepare()
    folder = tmp_path_factory.mktemp("acc")
    path = folder / "pruned.pt"
    save_checkpoint(path, model, arch="mnist_net_digits", masks=pruner.masks())
    return path, dp.apply_masks(model)


def expected_accuracy(model: nn.Module) -> float:
    _train, val = digits(seed=0)
    return float(evaluate(model, val)["accuracy"])


def test_validate_with_data_reports_the_accuracy_of_source_and_artifact(trained, tmp_path) -> None:
    path, masked = trained
    onnx_path = tmp_path / "p.onnx"
    proc = cli("export", str(path), "-o", str(onnx_path), "--no-latency", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = cli("validate", str(path), str(onnx_path), "--data", "digits", "--no-latency",
               "--json", "v.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "v.json").read_text())
    want = expected_accuracy(masked)
    assert 0.2 < want < 1.0
    assert report["accuracy"] == {"source": pytest.approx(want), "artifact": pytest.approx(want)}
    assert report["pipeline"]["accuracy_data"] == {"data": "digits", "samples": 360}


def test_export_with_data_puts_the_accuracy_in_the_report(trained, tmp_path) -> None:
    path, masked = trained
    proc = cli("export", str(path), "-o", "p.onnx", "--no-latency", "--data", "digits", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "p.onnx.report.json").read_text())
    want = expected_accuracy(masked)
    assert report["accuracy"] == {"source": pytest.approx(want), "artifact": pytest.approx(want)}
    back = load_report(tmp_path / "p.onnx.report.json")
    assert back.accuracy["artifact"] == pytest.approx(want)


def test_coreml_export_says_the_artifact_accuracy_was_not_measured(trained, tmp_path) -> None:
    pytest.importorskip("coremltools")
    if sys.platform == "darwin":
        pytest.skip("on macOS the package runs: its accuracy is measured")
    path, masked = trained
    proc = cli("export", str(path), "--target", "coreml", "-o", "p.mlpackage", "--no-latency", "--data", "digits",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "p.mlpackage.report.json").read_text())
    assert report["accuracy"] == {"source": pytest.approx(expected_accuracy(masked))}  # compacted == masked
    assert "need macOS" in report["pipeline"]["accuracy_data"]["not measured"]
    assert any(n.startswith("task accuracy on digits:") for n in report["notes"])


def test_data_that_does_not_fit_the_model_is_a_one_line_input_error(tmp_path) -> None:
    sample = Path(__file__).resolve().parents[2] / "models" / "samples" / "lenet.pt"  # takes 1x28x28
    onnx_path = tmp_path / "l.onnx"
    assert cli("export", str(sample), "-o", str(onnx_path), "--no-validate", cwd=tmp_path).returncode == 0
    line = one_line_error(cli("validate", str(sample), str(onnx_path), "--data", "digits", cwd=tmp_path), 3)
    assert "--data digits: the model does not take this data" in line and "256x1x8x8" in line and "1x1x28x28" in line


def test_a_data_path_that_does_not_import_fails_before_any_work(tmp_path) -> None:
    line = one_line_error(cli("export", "missing.pt", "--data", "nowhere_mod:fn", cwd=tmp_path), 2)
    assert "nowhere_mod" in line
    line = one_line_error(cli("export", "missing.pt", "--data", "imagenet", cwd=tmp_path), 2)
    assert "'imagenet': unknown dataset" in line


def test_an_entry_point_from_the_working_directory_without_validation_data(trained, tmp_path) -> None:
    path, _ = trained
    (tmp_path / "mydata.py").write_text(
        "from deployprune.data import digits\n\n"
        "def train_only(batch_size=32, seed=0):\n"
        "    return digits(batch_size=batch_size, seed=seed)[0], None\n\n"
        "def both(batch_size=32, seed=0):\n"
        "    return digits(batch_size=batch_size, seed=seed)\n")
    line = one_line_error(cli("export", str(path), "-o", "p.onnx", "--data", "mydata:train_only", cwd=tmp_path), 3)
    assert "'mydata:train_only': returned no validation loader" in line
    assert not (tmp_path / "p.onnx").exists()
    proc = cli("export", str(path), "-o", "p.onnx", "--no-latency", "--data", "mydata:both", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "p.onnx.report.json").read_text())
    assert report["pipeline"]["accuracy_data"] == {"data": "mydata:both", "samples": 360}


def test_a_fixed_batch_artifact_runs_larger_batches_in_pieces(trained, tmp_path) -> None:
    _, masked = trained
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(masked.eval(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False)  # batch fixed at 1
    _train, val = digits(seed=0)
    report = dp.validate(masked, path, (torch.zeros(1, 1, 8, 8),), latency=False, accuracy_data=val,
                         accuracy_label="digits")
    want = expected_accuracy(masked)
    assert report.accuracy == {"source": pytest.approx(want), "artifact": pytest.approx(want)}


def test_a_wrong_artifact_shows_a_lower_accuracy(trained, tmp_path) -> None:
    """The artifact's figure is its own: an ONNX file of other weights scores differently."""
    _, masked = trained
    other = zoo.build("mnist_net_digits")  # untrained: near chance
    path = tmp_path / "other.onnx"
    torch.onnx.export(other.eval(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False)
    _train, val = digits(seed=0)
    report = dp.validate(masked, path, (torch.zeros(1, 1, 8, 8),), latency=False, accuracy_data=val,
                         accuracy_label="digits")
    assert not report.passed
    assert report.accuracy["source"] == pytest.approx(expected_accuracy(masked))
    assert report.accuracy["artifact"] == pytest.approx(expected_accuracy(other))
    assert report.accuracy["artifact"] != report.accuracy["source"]


def test_outputs_that_are_not_class_scores_are_reported_as_not_measured() -> None:
    batches = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))]
    conv = nn.Conv2d(3, 2, 1)
    acc = measure(batches, lambda x: conv(*x), lambda x: conv(*x))
    assert acc.source is None and acc.artifact is None and "not (batch, classes) scores" in acc.reason
    lin = nn.Linear(3, 2)
    acc = measure([(torch.randn(4, 3), torch.randn(4))], lambda x: lin(*x), None)
    assert acc.source is None and "class indices" in acc.reason
