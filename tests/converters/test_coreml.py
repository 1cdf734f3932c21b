"""Core ML target: sparse mlprogram, fp16 loss reporting, read-back verification, errors.

Conversions take about a second each, so the packages are built once per module and shared.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deployprune import converters
from deployprune.converters import coreml as coreml_target
from deployprune.errors import EXIT_UNSUPPORTED, EXIT_USAGE, OutputError, UnsupportedError, UsageError, ValidationFailed

from .conftest import ConvBNNet, ZetaNet, magnitude_prune_, randomize_bn_

TINY = 1e-9  # below fp16's smallest subnormal / 2: fp16 stores it as 0


def sparse_model() -> ConvBNNet:
    torch.manual_seed(0)
    model = magnitude_prune_(randomize_bn_(ConvBNNet(width=32, classes=40)).eval(), 0.75)
    with torch.no_grad():
        nonzero = model.fc.weight.flatten().nonzero()[0].item()
        model.fc.weight.view(-1)[nonzero] = TINY
    return model


INPUTS = (torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)


@pytest.fixture(scope="module", params=["ios16", "ios18"])
def package(request, tmp_path_factory) -> tuple[Path, ConvBNNet, converters.ConversionResult]:
    model = sparse_model()
    path = tmp_path_factory.mktemp(f"coreml_{request.param}") / "model.mlpackage"
    result = converters.get("coreml").convert(model, INPUTS, path, minimum_deployment_target=request.param)
    return path, model, result


def test_sparse_package_passes_read_back(package) -> None:
    path, model, result = package
    assert path.is_dir() and (path / "Manifest.json").is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.mlpackage"]  # nothing else left
    v = result.metadata["verification"]
    assert v["passed"] and v["failures"] == []
    # conv1 (864 elements) is below sparse_min_elements: conv2 and fc are stored sparse
    assert v["sparse_constants"] == 2
    assert v["ops"]["constexpr_sparse_to_dense"] == 2
    assert "batch_norm" not in v["ops"]  # folded before export
    assert result.metadata["batchnorm_folded"] == ["conv1+bn1", "conv2+bn2"]
    assert v["weights_checked"] == 6  # conv1 w/b, conv2 w/b (from bn2), fc w/b
    assert v["unlocated"] == []
    # 75% zeros: mask bit + fp16 non-zeros ~ 0.31x for the sparse tensors
    ratio = result.metadata["weight_file_ratio"]
    assert ratio == v["weight_file_ratio"] and ratio <= 0.40, ratio
    assert result.metadata["weight_file_bytes"] < result.metadata["dense_weight_file_bytes"]
    assert result.size_bytes > result.metadata["weight_file_bytes"]


def test_fp16_zeroing_is_reported_not_silent(package) -> None:
    path, model, result = package
    assert result.warnings == ["fp16 storage turns 1 non-zero weight values into 0 (|w| < 2.98e-08; "
                               "fc.weight: 1); pass precision='fp32' to keep them"]
    assert result.metadata["fp16_losses"] == {"fc.weight": {"zeroed": 1, "overflow": 0, "below_eps": 1}}
    assert result.metadata["verification"]["zeroed_by_fp16"] == 1


def test_metadata_and_io(package) -> None:
    import coremltools as ct

    path, model, result = package
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    meta = dict(spec.description.metadata.userDefined)
    assert meta["deployprune.source_model"] == "tests.converters.conftest.ConvBNNet"
    assert meta["deployprune.precision"] == "fp16"
    assert meta["deployprune.minimum_deployment_target"] in ("iOS16", "iOS18")
    assert meta["deployprune.dense_weight_bytes"] == str(result.metadata["dense_weight_file_bytes"])
    assert json.loads(meta["deployprune.layer_sparsity"])["conv2"] == pytest.approx(0.75, abs=1e-3)
    assert [f.name for f in spec.description.input] == ["input_0"]
    assert list(spec.description.input[0].type.multiArrayType.shape) == [1, 3, 16, 16]
    assert [f.name for f in spec.description.output] == ["output_0"]
    assert spec.specificationVersion == (7 if meta["deployprune.minimum_deployment_target"] == "iOS16" else 9)


def test_sparse_constants_decode_like_coremltools(package) -> None:
    """Our mask decoding (both the iOS16 packed-bit and the iOS18 uint1 layouts) agrees with
    coremltools' own materialization, and with the torch weights' zero pattern."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    path, model, _ = package
    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    program = load(model_spec=spec, specification_version=spec.specificationVersion,
                   file_weights_dir=mlmodel.weights_dir)
    sparse_ops = [op for op in program.functions["main"].operations if op.op_type == "constexpr_sparse_to_dense"]
    assert len(sparse_ops) == 2
    folded = coreml_target.fold_batchnorm(model, INPUTS)
    expected = {"conv2": folded.conv2.weight, "fc": folded.fc.weight}
    for op in sparse_ops:
        ours = coreml_target._decode_sparse(op)
        theirs = op.materialized_val_inference()
        np.testing.assert_array_equal(ours, theirs)
        layer = op.name.split("_weight")[0]
        w = expected[layer].detach().numpy()
        np.testing.assert_array_equal(ours == 0, w.astype(np.float16) == 0)
        np.testing.assert_allclose(ours.astype(np.float32), w, rtol=2**-11, atol=2**-25)


def test_verify_detects_a_changed_value(package) -> None:
    path, model, _ = package
    assert coreml_target.verify_coreml(path, model, INPUTS).passed
    tampered = copy.deepcopy(model)
    with torch.no_grad():
        index = tampered.conv2.weight.flatten().abs().argmax()
        tampered.conv2.weight.view(-1)[index] *= 1.01
    v = coreml_target.verify_coreml(path, tampered, INPUTS)
    assert not v.passed
    assert len(v.failures) == 1
    assert v.failures[0].startswith(
        "conv2.weight: values differ from constant conv2_weight_to_fp16_sparsified by up to ")
    assert v.failures[0].endswith(", more than float16 rounding")


def test_verify_detects_a_changed_zero_pattern(package) -> None:
    path, model, _ = package
    tampered = copy.deepcopy(model)
    with torch.no_grad():
        nonzero = tampered.fc.weight.flatten().abs().argsort()[-1]
        tampered.fc.weight.view(-1)[nonzero] = 0.0  # one more zero: no constant matches any more
    v = coreml_target.verify_coreml(path, tampered, INPUTS)
    zeros = int((tampered.fc.weight == 0).sum())
    assert v.failures[-1] == (f"fc.weight: zero pattern differs at 1 of 2560 positions "
                              f"({zeros} zeros in torch, {zeros} in Core ML)")
    summary = v.summary()
    assert "read-back FAILED" in summary and "fc.weight" in summary


def test_verify_checks_names_and_shapes(package) -> None:
    path, model, _ = package
    v = coreml_target.verify_coreml(path, model, INPUTS, input_names=["image"], output_names=["logits"])
    assert v.failures == ["inputs are ['input_0'], expected ['image']", "outputs are ['output_0'], expected ['logits']"]
    other = (torch.randn(1, 3, 16, 16),)  # same shape, other values: weights still match
    assert coreml_target.verify_coreml(path, model, other).passed
    v = coreml_target.verify_coreml(path, model, (torch.randn(2, 3, 16, 16),))
    assert v.failures == ["input input_0 has shape [1, 3, 16, 16], torch example is [2, 3, 16, 16]",
                          "output output_0 has shape [1, 40], torch gives [2, 40]"]


def test_verify_reports_weight_file_size(package) -> None:
    path, model, result = package
    v = coreml_target.verify_coreml(path, model, INPUTS)
    weights = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    assert v.weight_file_bytes == weights.stat().st_size
    assert v.dense_weight_file_bytes == result.metadata["dense_weight_file_bytes"]
    assert v.weight_file_ratio == pytest.approx(v.weight_file_bytes / v.dense_weight_file_bytes)
    by_name = {w.name: w for w in v.weights}
    assert by_name["conv2.weight"].storage == "sparse" and by_name["conv2.weight"].matched_by == "name"
    assert by_name["conv1.weight"].storage == "dense"
    assert by_name["fc.weight"].zeroed == 1 and by_name["fc.weight"].ok


def test_fp32_keeps_tiny_weights(tmp_path: Path) -> None:
    model = sparse_model()
    result = converters.get("coreml").convert(model, INPUTS, tmp_path / "m.mlpackage", precision="fp32")
    assert result.warnings == []
    v = result.metadata["verification"]
    assert v["passed"] and v["zeroed_by_fp16"] == 0 and v["sparse_constants"] == 2
    checks = coreml_target.verify_coreml(tmp_path / "m.mlpackage", model, INPUTS).weights
    assert {w.dtype for w in checks} == {"float32"}
    assert max(w.max_abs_error for w in checks if w.name.endswith("weight")) == 0.0


def test_dense_dynamic_batch_package(tmp_path: Path) -> None:
    import coremltools as ct

    model = sparse_model()
    path = tmp_path / "m.mlpackage"
    result = converters.get("coreml").convert(model, INPUTS, path, sparse=False, dynamic_batch=True,
                                              max_batch=8, input_names=["image"], output_names=["logits"],
                                              compute_units="cpu_only")
    v = result.metadata["verification"]
    assert v["passed"] and v["sparse_constants"] == 0 and "constexpr_sparse_to_dense" not in v["ops"]
    assert result.metadata["weight_file_ratio"] == 1.0
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    ranges = spec.description.input[0].type.multiArrayType.shapeRange.sizeRanges
    assert [(r.lowerBound, r.upperBound) for r in ranges] == [(1, 8), (3, 3), (16, 16), (16, 16)]
    assert spec.description.metadata.userDefined["deployprune.compute_units"] == "cpu_only"
    # a dense package is flagged when sparse storage was expected
    v = coreml_target.verify_coreml(path, model, INPUTS, expect_sparse=True)
    assert not v.passed and "conv2.weight: 75% zeros but stored dense" in v.failures


def test_trace_with_size_calls_converts(tmp_path: Path) -> None:
    """ViT-style ``x.size(0)`` code: coremltools 9 + numpy 2.4 needed the aten::Int fix."""

    class ClsToken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 4, stride=4)
            self.cls = nn.Parameter(torch.randn(1, 1, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x).flatten(2).transpose(1, 2)
            return torch.cat([self.cls.expand(y.size(0), -1, -1), y], dim=1)

    result = converters.get("coreml").convert(ClsToken(), INPUTS, tmp_path / "m.mlpackage", sparse=False)
    assert result.metadata["verification"]["passed"]


# --------------------------------------------------------------------------- errors


def test_unsupported_op_is_named(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError) as exc:
        converters.get("coreml").convert(ZetaNet(), (torch.randn(2, 4),), tmp_path / "z.mlpackage")
    assert str(exc.value) == ("coreml: coremltools cannot convert op 'special_zeta' of ZetaNet; replace the op "
                              "in the model or use another target")
    assert exc.value.exit_code == EXIT_UNSUPPORTED
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("path", "options", "message"),
    [
        ("m.onnx", {}, "m.onnx: a Core ML mlprogram is a directory named '*.mlpackage'; use e.g. m.mlpackage"),
        ("m.mlpackage", {"max_batch": 4}, "coreml option 'max_batch' only applies with dynamic_batch=True"),
        ("m.mlpackage", {"sparse": False, "sparse_min_sparsity": 0.5},
         "coreml options 'sparse_min_sparsity'/'sparse_min_elements' only apply with sparse=True"),
        ("m.mlpackage", {"minimum_deployment_target": "ios15"},
         "coreml option 'minimum_deployment_target': 'ios15' is not one of ios16"),
        ("m.mlpackage", {"precision": "int8"}, "coreml option 'precision': 'int8' is not one of fp16, fp32"),
        ("m.mlpackage", {"dynamic_batch": True, "max_batch": 0}, "coreml option 'max_batch' must be >= 1, got 0"),
    ],
)
def test_bad_options_and_paths(tmp_path: Path, path: str, options: dict, message: str) -> None:
    with pytest.raises(UsageError) as exc:
        converters.get("coreml").convert(ConvBNNet(), INPUTS, tmp_path / path, **options)
    assert str(exc.value).replace(str(tmp_path) + "/", "").startswith(message)
    assert exc.value.exit_code == EXIT_USAGE
    assert list(tmp_path.iterdir()) == []


def test_existing_package_needs_force(tmp_path: Path) -> None:
    path = tmp_path / "m.mlpackage"
    path.mkdir()
    (path / "keep.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        converters.get("coreml").convert(ConvBNNet(), INPUTS, path)
    assert (path / "keep.txt").read_text() == "old"


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux sysfs (refuses new files even for root)")
def test_unwritable_directory() -> None:
    with pytest.raises(OutputError) as exc:
        converters.get("coreml").convert(ConvBNNet().eval(), INPUTS, "/sys/deployprune-test.mlpackage")
    assert str(exc.value).startswith("/sys/deployprune-test.mlpackage: ")
    assert not Path("/sys/deployprune-test.mlpackage").exists()


def test_failed_verification_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def failing(path, *args, **kwargs):
        assert Path(path).is_dir() and Path(path).name != "m.mlpackage"  # runs on the temporary package
        return coreml_target.CoreMLVerification(path=Path(path), passed=False, failures=["weights differ"])

    monkeypatch.setattr(coreml_target, "verify_coreml", failing)
    with pytest.raises(ValidationFailed) as exc:
        converters.get("coreml").convert(ConvBNNet().eval(), INPUTS, tmp_path / "m.mlpackage", sparse=False)
    assert str(exc.value) == (f"{tmp_path / 'm.mlpackage'}: Core ML read-back verification failed: weights differ; "
                              "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_verify_rejects_a_non_mlprogram(tmp_path: Path, package) -> None:
    import coremltools as ct

    path, model, _ = package
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    spec.ClearField("mlProgram")
    spec.neuralNetwork.SetInParent()
    copy_path = tmp_path / "nn.mlmodel"
    ct.utils.save_spec(spec, str(copy_path))
    v = coreml_target.verify_coreml(copy_path, model, INPUTS)
    assert not v.passed and v.failures == ["not an mlprogram (model type neuralNetwork)"]


# --------------------------------------------------------------------------- fp16 losses


def test_fp16_overflow_is_refused(tmp_path: Path) -> None:
    model = ConvBNNet().eval()
    with torch.no_grad():
        model.fc.weight[0, :3] = 1e5
    with pytest.raises(UsageError) as exc:
        converters.get("coreml").convert(model, INPUTS, tmp_path / "m.mlpackage")
    assert str(exc.value) == ("coreml option 'precision': fp16 cannot store 3 weights of fc.weight (|w| > 65504, "
                              "they would become inf); pass precision='fp32'")
    assert list(tmp_path.iterdir()) == []


def test_fp16_losses_counts_underflow_and_overflow() -> None:
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1e-9, 1e-6, 5e-4, 0.0], [1e5, -1e5, 1.0, 2.0],
                                         [1e-8, 0.1, 0.2, 0.3], [1.0, 1.0, 1.0, 1.0]]))
    losses = coreml_target.fp16_losses(layer)
    assert losses == {"weight": {"zeroed": 2, "overflow": 2, "below_eps": 4}}
    assert coreml_target.fp16_losses(nn.Linear(4, 4)) == {}


def test_package_can_be_copied_and_verified_elsewhere(tmp_path: Path, package) -> None:
    path, model, _ = package
    moved = tmp_path / "copy.mlpackage"
    shutil.copytree(path, moved)
    assert coreml_target.verify_coreml(moved, model, INPUTS).passed
