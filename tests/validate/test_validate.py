from __future__ import annotations

import dataclasses
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deployprune import converters
from deployprune.errors import (
    EXIT_INPUT,
    EXIT_USAGE,
    EXIT_VALIDATION,
    ConfigError,
    InputError,
    UsageError,
    ValidationFailed,
)
from deployprune.latency import LatencyConfig, random_inputs_like
from deployprune.report import render_markdown
from deployprune.validate import Thresholds, validate

from .helpers import (
    PRUNED,
    Offset,
    TinyViT,
    export_onnx,
    masked_and_compact,
    perturb_initializer_of,
    perturb_onnx_weight,
    simplify_onnx,
    tiny_net,
)

X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = tiny_net()
    path = export_onnx(model, (X,), tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return model, path


# --- ONNX artifacts ------------------------------------------------------------------------


def test_faithful_onnx_export_passes(exported: tuple[nn.Module, Path]) -> None:
    model, path = exported
    report = validate(model, path, (X,), latency=False)
    assert report.passed, report.failures
    assert report.failures == []
    assert report.artifact.kind == "onnx" and report.artifact.runtime == "onnxruntime"
    assert report.inputs.count == 8 and report.inputs.origin == "random"
    (out,) = report.outputs
    assert out.shape == [2, 10]
    assert out.samples == 16  # 8 inputs x batch 2
    assert out.max_abs < 1e-5 and out.max_rel < 1e-5
    assert out.cosine > 0.999999
    assert out.top1 == 1.0
    assert report.localization is None  # only computed on failure unless asked for
    # statistics: the ONNX file holds the same weights minus the two folded BatchNorms
    bn_params = 2 * (8 + 16)
    assert report.artifact_stats.params == report.source_stats.params - bn_params
    assert report.source_stats.macs == report.artifact_stats.macs  # flop counter == ONNX count
    assert report.artifact_stats.size_bytes == path.stat().st_size


@pytest.mark.parametrize("node, module", [
    ("/layer2/conv1/Conv", "layer2.conv1"),  # BatchNorm folded into this Conv by the exporter
    ("/layer1/conv2/Conv", "layer1.conv2"),  # plain convolution
])
def test_perturbed_weight_fails_and_names_the_layer(exported: tuple[nn.Module, Path],
                                                     tmp_path: Path, node: str,
                                                     module: str) -> None:
    model, path = exported
    broken = tmp_path / "broken.onnx"
    perturb_onnx_weight(path, broken, node, delta=0.5)
    report = validate(model, broken, (X,), latency=False)

    assert not report.passed
    assert report.max_rel_error > 1e-3
    loc = report.localization
    assert loc is not None and loc.method == "onnx-intermediates"
    bad = loc.first_bad_layer
    assert bad is not None and bad.module == module
    assert bad.onnx_node == node.rsplit("/", 1)[0] + "/"
    assert bad.max_rel > 1e-3
    # every layer before it agrees to float precision
    for layer in loc.layers[: loc.first_bad]:
        assert layer.max_rel is not None and layer.max_rel < 1e-5, layer
    assert any(f.startswith(f"first diverging layer: {module}") for f in report.failures)
    assert f"First diverging layer: **{module}**" in render_markdown(report)
    with pytest.raises(ValidationFailed) as info:
        report.raise_for_failure()
    assert info.value.exit_code == EXIT_VALIDATION == 4
    assert module in str(info.value) and "\n" not in str(info.value)


def test_localize_on_request_matches_every_layer(exported: tuple[nn.Module, Path]) -> None:
    model, path = exported
    report = validate(model, path, (X,), latency=False, localize=True)
    loc = report.localization
    assert [x.module for x in loc.layers] == ["stem", "layer1.conv1", "layer1.conv2",
                                              "layer2.conv1", "layer2.conv2", "fc"]
    matched = {x.module: x.matched for x in loc.layers}
    assert matched["layer1.conv1"] == "folded-bn" and matched["layer1.conv2"] == "same"
    assert loc.first_bad is None
    assert max(x.max_rel for x in loc.layers) < 1e-5


def test_simplified_transformer_layers_are_found_through_tensor_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(1, 5, 8)
    raw = export_onnx(model, (x,), tmp_path / "raw.onnx")
    simple = simplify_onnx(raw, tmp_path / "simple.onnx")
    report = validate(model, simple, (x,), latency=False, localize=True)
    assert report.passed, report.failures
    modules = [layer.module for layer in report.localization.layers]
    for block in ("blocks.0", "blocks.1"):
        # fc1/fc2/proj run as unscoped Gemm nodes after onnxsim; their outputs keep scoped names
        for name in ("attn", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert f"{block}.{name}" in modules
    assert modules[-1] == "head"
    assert all(layer.matched == "same" and layer.max_rel < 1e-5
               for layer in report.localization.layers)

    broken = tmp_path / "broken.onnx"
    perturb_initializer_of(simple, broken, "blocks.1.mlp.fc1.bias", delta=0.3)
    bad = validate(model, broken, (x,), latency=False)
    assert not bad.passed
    assert bad.localization.first_bad_layer.module == "blocks.1.mlp.fc1"


def test_wrong_number_of_inputs_is_an_input_error(exported: tuple[nn.Module, Path]) -> None:
    model, path = exported
    with pytest.raises(InputError) as info:
        validate(model, path, (X, X), latency=False)
    assert "takes 1 input(s)" in str(info.value) and str(path) in str(info.value)
    assert info.value.exit_code == EXIT_INPUT


def test_missing_and_unknown_artifacts(tmp_path: Path) -> None:
    model = tiny_net()
    with pytest.raises(InputError, match="artifact not found") as info:
        validate(model, tmp_path / "nope.onnx", (X,), latency=False)
    assert info.value.exit_code == EXIT_INPUT
    other = tmp_path / "model.tflite"
    other.write_bytes(b"x")
    with pytest.raises(UsageError, match=r"unknown artifact type '\.tflite'") as info:
        validate(model, other, (X,), latency=False)
    assert info.value.exit_code == EXIT_USAGE
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf")
    with pytest.raises(InputError, match="onnxruntime cannot load it"):
        validate(model, corrupt, (X,), latency=False)


def test_output_count_mismatch_fails(tmp_path: Path) -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.fc(x)
            return y, y.sum(dim=1)

    one = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    path = export_onnx(one, (x,), tmp_path / "one.onnx")
    report = validate(Two(), path, (x,), latency=False)
    assert not report.passed
    assert report.failures[0] == "artifact has 1 output(s), source has 2; export the same outputs"


# --- thresholds and verdicts ---------------------------------------------------------------


@pytest.fixture(scope="module")
def linear() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(6, 5).eval(), torch.randn(4, 6)


def test_known_offset_gives_known_errors(linear: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = linear
    artifact = Offset(model, torch.full((5,), 1e-3))
    report = validate(model, artifact, (x,), latency=False,
                      thresholds=Thresholds(max_abs=2e-3, max_rel=1.0, min_cosine=0.0))
    assert report.passed
    (out,) = report.outputs
    assert out.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert out.max_rel == pytest.approx(out.max_abs / out.scale, rel=1e-12)
    # the scale is the largest |reference| over the 8 inputs
    gen = torch.Generator().manual_seed(0)
    inputs = [x] + [random_inputs_like((x,), gen)[0] for _ in range(7)]
    with torch.no_grad():
        scale = max(float(model(i).abs().max()) for i in inputs)
    assert out.scale == pytest.approx(scale, rel=1e-6)

    strict_abs = validate(model, artifact, (x,), latency=False,
                          thresholds=Thresholds(max_abs=5e-4, max_rel=1.0, min_cosine=0.0))
    assert not strict_abs.passed
    assert len(strict_abs.failures) == 1
    assert strict_abs.failures[0].startswith("output 'output0': max abs error 0.001 > 0.0005")

    default = validate(model, artifact, (x,), latency=False)  # max_rel 1e-4 by default
    assert not default.passed
    assert any("max rel error" in f and "> 0.0001" in f for f in default.failures)
    # a failure on an nn.Module artifact is localized with forward hooks
    assert default.localization.method == "torch-hooks"


def test_cosine_threshold_is_inclusive_at_the_measured_value(
        linear: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = linear
    artifact = Offset(model, torch.linspace(-0.2, 0.2, 5))
    loose = dict(max_rel=10.0)
    cos = validate(model, artifact, (x,), latency=False,
                   thresholds=Thresholds(min_cosine=-1.0, **loose)).outputs[0].cosine
    assert 0.5 < cos < 0.9999
    ok = validate(model, artifact, (x,), latency=False,
                  thresholds=Thresholds(min_cosine=cos - 1e-9, **loose))
    assert ok.passed
    bad = validate(model, artifact, (x,), latency=False,
                   thresholds=Thresholds(min_cosine=cos + 1e-9, **loose))
    assert not bad.passed
    assert bad.failures == [f"output 'output0': cosine similarity {cos:.6f} < {cos + 1e-9:g}"]


def test_top1_is_reported_and_enforced_only_when_asked(
        linear: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = linear
    with torch.no_grad():
        cls = int(model(x).argmax(1)[0])
    offset = torch.zeros(5)
    offset[cls] = 100.0  # the artifact always predicts this class
    artifact = Offset(model, offset)
    loose = dict(max_rel=1e9, min_cosine=-1.0)
    report = validate(model, artifact, (x,), latency=False, thresholds=Thresholds(**loose))
    gen = torch.Generator().manual_seed(0)
    inputs = [x] + [random_inputs_like((x,), gen)[0] for _ in range(7)]
    with torch.no_grad():
        expected = float(torch.cat([model(i).argmax(1) for i in inputs]).eq(cls).float().mean())
    assert report.outputs[0].top1 == pytest.approx(expected)
    assert 0 < expected < 1
    assert report.passed  # min_top1=None: reported, not enforced
    strict = validate(model, artifact, (x,), latency=False,
                      thresholds=Thresholds(min_top1=0.99, **loose))
    assert not strict.passed
    assert strict.failures == [f"output 'output0': top-1 agreement {expected:.2%} < 99.00%"]


def test_nonfinite_artifact_output_fails(linear: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = linear
    offset = torch.zeros(5)
    offset[2] = math.nan
    report = validate(model, Offset(model, offset), (x,), latency=False,
                      thresholds=Thresholds(max_rel=1e9, min_cosine=-1.0), n_inputs=2)
    assert not report.passed
    assert report.outputs[0].nonfinite == 8  # 2 inputs x 4 rows, one column
    assert report.failures[0].startswith("output 'output0': 8 position(s) whose non-finite values differ "
                                         "from the source (NaN must match NaN, inf the same-sign inf); "
                                         "first non-finite mismatch at index (0, 2): source ")
    assert report.failures[0].endswith(", artifact nan")


def test_thresholds_are_validated() -> None:
    with pytest.raises(ConfigError, match="threshold max_rel: expected a number >= 0") as info:
        Thresholds(max_rel=-1)
    assert info.value.exit_code == EXIT_USAGE
    with pytest.raises(ConfigError, match=r"threshold min_cosine: expected a number in \[-1, 1\]"):
        Thresholds(min_cosine=2)
    with pytest.raises(ConfigError, match="unknown key 'max_relative'; allowed keys: max_abs, "
                                          "max_rel, min_cosine, min_top1"):
        Thresholds.from_dict({"max_relative": 1e-3})
    assert Thresholds.from_dict({"max_abs": 1, "min_top1": 0.5}) == Thresholds(max_abs=1.0,
                                                                               min_top1=0.5)


# --- inputs --------------------------------------------------------------------------------


def test_random_inputs_are_seeded_and_shaped_like_the_examples() -> None:
    ids = torch.tensor([[0, 3, 9, 2]])
    mask = torch.tensor([[True, False, True, True]])
    feats = torch.zeros(1, 4, dtype=torch.float16)
    a = random_inputs_like((ids, mask, feats), torch.Generator().manual_seed(5), batch_size=64)
    b = random_inputs_like((ids, mask, feats), torch.Generator().manual_seed(5), batch_size=64)
    for t, u, ex in zip(a, b, (ids, mask, feats), strict=True):
        assert torch.equal(t, u)
        assert t.dtype == ex.dtype and t.shape == (64, 4)
    assert a[0].min() >= 0 and a[0].max() <= 9  # integer ids drawn in [0, max + 1)
    assert set(a[0].unique().tolist()) == set(range(10))
    assert a[1].any() and not a[1].all()
    assert a[2].float().std() > 0.5


def test_integer_inputs_stay_valid_embedding_ids() -> None:
    class Tok(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(12, 4)
            self.fc = nn.Linear(4, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(ids).mean(1))

    torch.manual_seed(0)
    model = Tok().eval()
    ids = torch.tensor([[1, 11, 4]])  # max id 11 -> random ids in [0, 12)
    report = validate(model, model, (ids,), latency=False, n_inputs=20)
    assert report.passed and report.outputs[0].max_abs == 0.0
    assert report.inputs.dtypes == ["int64"]


def test_same_seed_same_metrics_other_seed_other_inputs(
        linear: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = linear
    artifact = Offset(model, torch.linspace(0, 1e-3, 5))
    th = Thresholds(max_rel=1.0, min_cosine=0.0)
    a = validate(model, artifact, (x,), latency=False, thresholds=th, seed=7)
    b = validate(model, artifact, (x,), latency=False, thresholds=th, seed=7)
    c = validate(model, artifact, (x,), latency=False, thresholds=th, seed=8)
    assert a.outputs == b.outputs
    assert a.outputs[0].scale != c.outputs[0].scale


def test_user_data_is_used_up_to_n_inputs(linear: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = linear
    data = [torch.full((3, 6), float(i)) for i in range(5)]  # bare tensors are accepted
    report = validate(model, model, (x,), data=data, n_inputs=3, latency=False)
    assert report.inputs.origin == "data" and report.inputs.count == 3
    assert report.inputs.seed is None and report.inputs.shapes == [[3, 6]]
    assert report.outputs[0].samples == 9
    with torch.no_grad():
        scale = max(float(model(d).abs().max()) for d in data[:3])
    assert report.outputs[0].scale == pytest.approx(scale)
    with pytest.raises(InputError, match="data: the iterable is empty"):
        validate(model, model, (x,), data=[], latency=False)
    with pytest.raises(InputError, match=r"data\[0\]: expected a tensor or a tuple of tensors"):
        validate(model, model, (x,), data=[np.zeros((3, 6))], latency=False)


def test_model_modes_are_restored(linear: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = linear
    model.train()
    try:
        validate(model, model, (x,), latency=False, n_inputs=1)
        assert model.training
    finally:
        model.eval()


# --- compacted nn.Module against the masked model -----------------------------------------


def test_compacted_module_against_masked_source() -> None:
    masked, compact = masked_and_compact()
    x = torch.randn(2, 3, 8, 8)
    report = validate(masked, compact, (x,), latency=False, localize=True)
    assert report.passed, report.failures
    assert report.artifact.kind == "torch" and report.artifact.path is None
    assert report.outputs[0].max_abs < 1e-5
    layers = {x.module: x for x in report.localization.layers}
    assert layers["conv1"].matched == "nonzero-channels"  # 8 masked channels vs 5 kept
    assert layers["conv1"].shape == [2, 5, 8, 8]
    assert layers["conv1"].max_rel < 1e-6
    assert layers["conv2"].matched == "same" and layers["fc"].matched == "same"
    rows = {r.name: r for r in report.layers}
    assert (rows["conv1"].out_before, rows["conv1"].out_after) == (8, 5)
    assert (rows["conv2"].in_before, rows["conv2"].in_after) == (8, 5)
    assert rows["conv1"].channels_removed == pytest.approx(len(PRUNED) / 8)
    assert rows["conv1"].sparsity_before == pytest.approx(3 / 8)
    assert rows["conv1"].sparsity_after == 0.0
    assert report.artifact_stats.params < report.source_stats.params
    assert report.artifact_stats.params == report.source_stats.nonzero_params - 0 - (
        # the zeroed output channels also drop conv2's matching input weights
        3 * 4 * 9)


# --- latency inside validate ---------------------------------------------------------------


def test_latency_sweep_with_dense_export_and_fixed_batch_artifact(tmp_path: Path) -> None:
    model = tiny_net()
    x = X[:1]
    dense = export_onnx(model, (x,), tmp_path / "dense.onnx")
    fixed = export_onnx(model, (x,), tmp_path / "fixed.onnx", dynamic_batch=False)
    cfg = LatencyConfig(warmup=1, repeats=3, batch_sizes=(1, 2))
    report = validate(model, fixed, (x,), latency=cfg, dense_artifact=dense, n_inputs=2)
    assert report.passed
    got = sorted((r.role, r.runtime, r.batch_size) for r in report.latency.results)
    assert got == [("artifact", "onnxruntime", 1), ("dense", "onnxruntime", 1),
                   ("dense", "onnxruntime", 2), ("source", "torch", 1), ("source", "torch", 2)]
    assert all(len(r.samples_ms) == 3 for r in report.latency.results)
    assert any("fixed.onnx has a fixed batch size of 1" in n for n in report.latency.notes)
    assert any(n.startswith("batch sweep limited: exported (onnxruntime) not timed (fixed.onnx "
                            "has a fixed batch size of 1") for n in report.notes)
    assert report.dense_artifact.path == str(dense)
    assert report.dense_stats.params == report.artifact_stats.params
    assert report.latency.ratio("dense", "artifact") == pytest.approx(
        report.latency.get("dense").median_ms / report.latency.get("artifact").median_ms)


def test_missing_dense_artifact_is_reported_before_any_work(
        exported: tuple[nn.Module, Path], tmp_path: Path) -> None:
    model, path = exported
    with pytest.raises(InputError, match="dense artifact not found"):
        validate(model, path, (X,), dense_artifact=tmp_path / "dense.onnx")


# --- Core ML -------------------------------------------------------------------------------


@dataclasses.dataclass
class _FakeVerification:
    passed: bool
    checked: int
    mismatches: list[str]


def _fake_coreml(monkeypatch: pytest.MonkeyPatch, result: object) -> list[tuple]:
    calls: list[tuple] = []

    def verify(path: Path, model: nn.Module, inputs: tuple) -> object:
        calls.append((path, model, inputs))
        return result

    # validate asks the converter registry for the target's verify(); a stand-in target answers
    target = types.SimpleNamespace(OPTIONS={}, convert=None, verify=verify)
    monkeypatch.setitem(converters._registered, "coreml", target)
    return calls


@pytest.fixture()
def mlpackage(tmp_path: Path) -> Path:
    path = tmp_path / "model.mlpackage"
    (path / "Data").mkdir(parents=True)
    (path / "Data" / "weights.bin").write_bytes(b"\0" * 1000)
    (path / "Manifest.json").write_text("{}")
    return path


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS Core ML artifacts are predicted")
def test_coreml_readback_verdict_on_linux(monkeypatch: pytest.MonkeyPatch,
                                          mlpackage: Path) -> None:
    model, x = tiny_net(), X
    calls = _fake_coreml(monkeypatch, _FakeVerification(True, 7, []))
    report = validate(model, mlpackage, (x,), latency=False)
    assert calls and calls[0][0] == mlpackage and calls[0][1] is model
    assert report.passed and report.artifact.runtime == "coreml-readback"
    assert report.coreml == {"passed": True, "checked": 7, "mismatches": [], "available": True}
    assert report.outputs == []
    assert report.artifact_stats.size_bytes == 1002  # directory summed
    assert report.artifact_stats.size_kind == "directory"
    md = render_markdown(report)
    assert "outputs were not compared (Core ML predicts only on macOS)" in md
    assert "- checked: 7\n- mismatches: 0 entries\n" in md

    _fake_coreml(monkeypatch, _FakeVerification(False, 7, ["conv1.weight differs"]))
    failed = validate(model, mlpackage, (x,), latency=False)
    assert not failed.passed
    assert failed.failures == ["coreml read-back: the saved program does not match the source "
                               "weights (conv1.weight differs)"]


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS Core ML artifacts are predicted")
def test_coreml_verification_unavailable_is_a_failure(monkeypatch: pytest.MonkeyPatch,
                                                      mlpackage: Path) -> None:
    monkeypatch.setitem(sys.modules, "deployprune.converters.coreml", None)  # import fails
    report = validate(tiny_net(), mlpackage, (X,), latency=False)
    assert not report.passed
    assert report.failures[0].startswith("coreml verification unavailable")
    assert report.coreml == {"available": False}
    # a coreml target registered without verify() cannot vouch for the artifact either
    monkeypatch.setitem(converters._registered, "coreml", types.SimpleNamespace(OPTIONS={}, convert=None))
    report = validate(tiny_net(), mlpackage, (X,), latency=False)
    assert not report.passed and report.coreml == {"available": False}
    assert report.failures[0].startswith("coreml verification unavailable (target 'coreml' verify():")
