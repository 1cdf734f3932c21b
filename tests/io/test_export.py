"""dp.export, the export/finalize pipelines and their writing guarantees (staged, atomic, no strays)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import deployprune as dp
from deployprune import converters, zoo
from deployprune.errors import EXIT_VALIDATION, OutputError, UnsupportedError, UsageError
from deployprune.io import load_model
from deployprune.pipeline import masked_copy, run_export, run_finalize
from deployprune.validate import load_report
from tests.faults import faulty_onnx_target
from tests.io.conftest import SAMPLES, tree_digest


def onnx_conv_weight_shapes(path: Path) -> list[list[int]]:
    proto = onnx.load(str(path))
    inits = {i.name: list(i.dims) for i in proto.graph.initializer}
    return [inits[n.input[1]] for n in proto.graph.node if n.op_type == "Conv"]


def ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


# --------------------------------------------------------------------------------------------
# The NNI tutorial case through the Python API


def test_nni_tutorial_case_api(tmp_path: Path, lenet: nn.Module, tutorial_masks: dict) -> None:
    x = torch.randn(10, 1, 28, 28)
    compact = dp.finalize(lenet, (x,), tutorial_masks)
    assert (compact.conv1.in_channels, compact.conv1.out_channels) == (1, 3)
    assert (compact.conv2.in_channels, compact.conv2.out_channels) == (3, 16)

    path = dp.export(lenet, (x,), tmp_path / "lenet.onnx", target="onnx", masks=tutorial_masks)
    assert path == tmp_path / "lenet.onnx"
    assert onnx_conv_weight_shapes(path)[:2] == [[3, 1, 5, 5], [16, 3, 5, 5]]
    masked = masked_copy(lenet, tutorial_masks)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        xi = torch.randn(10, 1, 28, 28, generator=gen)
        with torch.no_grad():
            ref = masked(xi).numpy()
        assert np.abs(ort_run(path, xi) - ref).max() <= 1e-5
    # the user's model is not modified
    assert lenet.conv1.out_channels == 6 and lenet.conv1.weight[:3].abs().sum() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.onnx"]


def test_export_uses_attached_masks(tmp_path: Path, lenet: nn.Module, tutorial_masks: dict) -> None:
    from torch.ao.pruning.sparsifier.utils import FakeSparsity

    parametrize.register_parametrization(lenet.conv1, "weight", FakeSparsity(tutorial_masks["conv1"]["weight"]))
    x = torch.randn(2, 1, 28, 28)
    path = dp.export(lenet, x, tmp_path / "att.onnx")
    assert onnx_conv_weight_shapes(path)[0] == [3, 1, 5, 5]
    with torch.no_grad():
        ref = lenet(x).numpy()  # the parametrized model computes the masked output
    assert np.abs(ort_run(path, x) - ref).max() <= 1e-5
    assert parametrize.is_parametrized(lenet.conv1)


def test_export_without_masks_and_force(tmp_path: Path, lenet: nn.Module) -> None:
    x = torch.randn(1, 1, 28, 28)
    out = tmp_path / "plain.onnx"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError) as exc:
        dp.export(lenet, (x,), out)
    assert str(exc.value) == f"{out}: already exists; pass --force (force=True) to overwrite it"
    assert out.read_bytes() == b"precious"
    dp.export(lenet, (x,), out, force=True)
    assert onnx_conv_weight_shapes(out)[0] == [6, 1, 5, 5]
    with torch.no_grad():
        assert np.abs(ort_run(out, x) - lenet(x).numpy()).max() <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.onnx"]


def test_export_argument_errors(tmp_path: Path, lenet: nn.Module) -> None:
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(UnsupportedError, match="unknown target 'onnnx' \\(did you mean 'onnx'\\?\\)"):
        dp.export(lenet, (x,), tmp_path / "a.onnx", target="onnnx")
    with pytest.raises(UsageError, match="unknown option 'opsett'"):
        dp.export(lenet, (x,), tmp_path / "a.onnx", opsett=17)
    with pytest.raises(UsageError, match=r"example_inputs: expected a tensor, a tuple of tensors, a dict of keyword "
                                         r"inputs or \(tuple, dict\), got str"):
        dp.export(lenet, "x", tmp_path / "a.onnx")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# run_export


def test_run_export_sample(tmp_path: Path) -> None:
    before = tree_digest(SAMPLES)
    loaded = load_model(SAMPLES / "lenet.pt")
    out = tmp_path / "lenet.onnx"
    outcome = run_export(loaded, "onnx", out, n_inputs=3, latency=False)
    assert outcome.passed is True and outcome.exit_code == 0
    assert outcome.artifact == out and outcome.report_path == tmp_path / "lenet.onnx.report.json"
    assert (outcome.params_before, outcome.params_after) == (44426, 43148)
    assert onnx_conv_weight_shapes(out)[:2] == [[3, 1, 5, 5], [16, 3, 5, 5]]
    report = load_report(outcome.report_path)
    assert report.passed and report.max_abs_error <= 1e-5
    assert report.artifact.path == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.onnx", "lenet.onnx.report.json"]
    lines = outcome.summary_lines()
    assert lines[0] == f"artifact:   {out} (onnx, {outcome.size_bytes / 1000:.3g} kB)"
    assert any(line.startswith("PASS") for line in lines)
    assert tree_digest(SAMPLES) == before


def test_run_export_dense_reference_is_timed(tmp_path: Path) -> None:
    loaded = load_model(SAMPLES / "lenet.pt")
    from deployprune.latency import LatencyConfig

    outcome = run_export(loaded, "onnx", tmp_path / "l.onnx", n_inputs=2,
                         latency=LatencyConfig(warmup=1, repeats=3))
    report = outcome.validation
    assert report.dense_stats is not None and report.dense_stats.params == 44426
    assert report.artifact_stats.params < report.dense_stats.params
    assert report.latency is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.onnx", "l.onnx.report.json"]  # dense temp removed


def test_validation_failure_removes_artifact(tmp_path: Path) -> None:
    loaded = load_model(SAMPLES / "lenet.pt")
    out = tmp_path / "strict.onnx"
    with faulty_onnx_target() as target:  # the export is wrong: two output channels swapped
        outcome = run_export(loaded, "onnx", out, n_inputs=2, latency=False)
    assert target.swapped  # the fault was really injected
    assert outcome.passed is False and outcome.exit_code == EXIT_VALIDATION
    assert any(f.startswith("output 'output_0': ") for f in outcome.validation.failures)
    assert outcome.artifact is None and not out.exists()
    data = json.loads(outcome.report_path.read_text())
    assert data["passed"] is False and data["artifact"]["path"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strict.onnx.report.json"]

    with faulty_onnx_target():
        kept = run_export(loaded, "onnx", out, n_inputs=2, latency=False, keep_failed=True, force=True)
    assert kept.passed is False and kept.artifact == out and out.is_file()


def test_run_export_refuses_input_and_existing_outputs(tmp_path: Path, lenet_sd: Path) -> None:
    loaded = load_model(lenet_sd, model_factory="deployprune.zoo.lenet:TorchModel")
    with pytest.raises(UsageError, match="the output would overwrite the input file"):
        run_export(loaded, "onnx", lenet_sd)
    report = tmp_path / "x.onnx.report.json"
    report.write_text("old")
    with pytest.raises(OutputError, match="x.onnx.report.json: already exists; pass --force"):
        run_export(loaded, "onnx", tmp_path / "x.onnx")
    assert report.read_text() == "old" and not (tmp_path / "x.onnx").exists()


def test_unwritable_output_directory(tmp_path: Path, lenet_sd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_model(lenet_sd, model_factory="deployprune.zoo.lenet:TorchModel")
    with pytest.raises(OutputError) as exc:
        run_export(loaded, "onnx", tmp_path / "missing" / "x.onnx")
    missing = tmp_path / "missing"
    assert str(exc.value) == f"{missing / 'x.onnx'}: directory {missing} does not exist; create it first"
    # a read-only directory (simulated: the test may run as root, who can write anywhere)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real_access(p, mode, **kw))
    with pytest.raises(OutputError) as exc:
        run_export(loaded, "onnx", ro / "x.onnx")
    assert str(exc.value) == f"{ro / 'x.onnx'}: directory {ro} is not writable; choose another output path"
    assert list(ro.iterdir()) == []


def test_really_unwritable_directory(lenet_sd: Path) -> None:
    # /sys rejects new files even for root
    loaded = load_model(lenet_sd, model_factory="deployprune.zoo.lenet:TorchModel")
    with pytest.raises(OutputError) as exc:
        run_export(loaded, "onnx", "/sys/x.onnx", validate=False)
    assert str(exc.value).startswith("/sys/x.onnx: ")
    assert exc.value.exit_code == 3


class _FailingTarget:
    """A converter that writes half a file, then fails the way the test asks."""

    OPTIONS: dict = {}
    SUFFIX = ".bin"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def convert(self, model, example_inputs, path, **options):
        Path(path).write_bytes(b"partial" * 100)
        Path(str(path) + ".data").write_bytes(b"side")
        raise self.exc


@pytest.fixture
def failing_target():
    names = []

    def make(exc: BaseException) -> str:
        name = f"failing{len(names)}"
        converters.register(name, _FailingTarget(exc))
        names.append(name)
        return name

    yield make
    for name in names:
        converters._unregister(name)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), OutputError),
        (KeyboardInterrupt(), KeyboardInterrupt),
        (RuntimeError("converter bug"), RuntimeError),
    ],
)
def test_failures_leave_nothing_behind(tmp_path: Path, lenet_sd: Path, failing_target, exc, expected) -> None:
    target = failing_target(exc)
    loaded = load_model(lenet_sd, model_factory="deployprune.zoo.lenet:TorchModel")
    before = tree_digest(tmp_path)
    with pytest.raises(expected) as info:
        run_export(loaded, target, tmp_path / "out.bin")
    if expected is OutputError:
        assert str(info.value) == (
            f"{tmp_path / 'out.bin'}: cannot write (No space left on device); check free space and permissions"
        )
    assert tree_digest(tmp_path) == before  # no artifact, no side file, no staging directory


def test_disk_full_in_api_export(tmp_path: Path, lenet: nn.Module, failing_target) -> None:
    target = failing_target(OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OutputError, match="No space left on device"):
        dp.export(lenet, torch.randn(1, 1, 28, 28), tmp_path / "o.bin", target=target)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# run_finalize


def test_run_finalize_pt2_and_checkpoint(tmp_path: Path) -> None:
    loaded = load_model(SAMPLES / "lenet.pt")
    outcome = run_finalize(loaded, tmp_path / "c.pt2")
    assert outcome.format == "pt2" and outcome.params_after == 43148
    assert "conv1: Conv2d(1, 6) -> Conv2d(1, 3)" in outcome.module_changes
    assert "conv2: Conv2d(6, 16) -> Conv2d(3, 16)" in outcome.module_changes
    program = load_model(tmp_path / "c.pt2")
    source = masked_copy(loaded.model, loaded.masks)
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        assert (program.model(x) - source(x)).abs().max() <= 1e-5

    ck = run_finalize(loaded, tmp_path / "c.pt")
    assert ck.format == "checkpoint"
    again = load_model(tmp_path / "c.pt")  # arch from the registry: no flags
    assert again.compact and again.model.conv1.out_channels == 3
    with torch.no_grad():
        assert (again.model(x) - source(x)).abs().max() <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt2"]

    with pytest.raises(UsageError, match="finalize writes .pt2 .* or .pt/.pth"):
        run_finalize(loaded, tmp_path / "c.onnx")
    with pytest.raises(OutputError, match="already exists"):
        run_finalize(loaded, tmp_path / "c.pt")


def test_resnet_sample_compacts_by_half(tmp_path: Path) -> None:
    loaded = load_model(SAMPLES / "resnet_small.pt")
    outcome = run_export(loaded, "onnx", tmp_path / "r.onnx", n_inputs=2, latency=False)
    assert outcome.passed
    spec_model = zoo.build("resnet_basic")
    inner = {f"layer{i}.0.conv1" for i in range(1, 5)}
    shapes = onnx_conv_weight_shapes(tmp_path / "r.onnx")
    full = [list(m.weight.shape) for n, m in spec_model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(shapes) == len(full)
    halved = [list(m.weight.shape) for n, m in spec_model.named_modules() if n in inner]
    for s in halved:
        assert [s[0] // 2, *s[1:]] in shapes


def test_coreml_target_through_the_same_path(tmp_path: Path) -> None:
    loaded = load_model(SAMPLES / "lenet.pt")
    out = tmp_path / "lenet.mlpackage"
    outcome = run_export(loaded, "coreml", out, n_inputs=2, latency=False)
    assert outcome.passed is True and outcome.artifact == out and out.is_dir()
    # counted like the ONNX target: the compacted program's weights against the masked source
    assert any(line.startswith("params   44.4 k -> 43.1 k (97.1% of source); MACs 282 k -> 162 k")
               for line in outcome.summary_lines())
    report = load_report(tmp_path / "lenet.mlpackage.report.json")
    assert report.artifact.kind == "coreml" and report.passed
    assert any("checked against the compact model" in n for n in report.notes)
    # an existing package (a directory) is replaced only with force
    with pytest.raises(OutputError, match="already exists"):
        run_export(loaded, "coreml", out, n_inputs=2, latency=False)
    run_export(loaded, "coreml", out, n_inputs=2, latency=False, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.mlpackage", "lenet.mlpackage.report.json"]
