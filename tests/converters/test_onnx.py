"""ONNX target: exporter/opset, names, dynamic batch, onnxsim fallback, external data, metadata,
sparse weight encoding, errors (and that a failure leaves nothing behind)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from deployprune import converters
from deployprune.converters import onnx as onnx_target
from deployprune.errors import (
    EXIT_INPUT,
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
    OutputError,
    UnsupportedError,
    UsageError,
    ValidationFailed,
)

from .conftest import MLPNet, TwoOutputs, ZetaNet, magnitude_prune_


def run(path: Path, *inputs: torch.Tensor) -> list[np.ndarray]:
    return onnx_target.onnxruntime_outputs(path, inputs)


def torch_out(model: torch.nn.Module, *inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(*inputs).numpy()


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.max(np.abs(ref - got)) / max(np.max(np.abs(ref)), 1e-6))


def test_default_export_is_one_opset18_dynamo_file(tmp_path: Path, convbn, image) -> None:
    path = tmp_path / "m.onnx"
    result = converters.get("onnx").convert(convbn, image, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no .data, no temp files
    model = onnx.load(str(path))
    assert [(i.domain, i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")] == [("", 18)]
    assert [i.name for i in model.graph.input] == ["input_0"]
    assert [o.name for o in model.graph.output] == ["output_0"]
    onnx.checker.check_model(model, full_check=True)
    assert rel_err(torch_out(convbn, *image), run(path, *image)[0]) <= 1e-5
    assert result.metadata["opset"] == 18 and result.metadata["exporter"] == "dynamo"
    assert "exporter_fallback" not in result.metadata
    assert result.metadata["simplified"] is True and result.metadata["external_data"] is False
    assert result.metadata["ort_relative_error"] <= 1e-5
    assert result.size_bytes == path.stat().st_size
    assert result.warnings == []
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}  # folded (eval export)


def test_metadata_props(tmp_path: Path, convbn, image) -> None:
    magnitude_prune_(convbn, 0.5)
    path = tmp_path / "m.onnx"
    converters.get("onnx").convert(convbn, image, path, model_name="tiny")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["deployprune.model_name"] == "tiny"
    assert props["deployprune.source_model"] == "tests.converters.conftest.ConvBNNet"
    assert props["deployprune.opset"] == "18"
    assert props["deployprune.exporter"] == "dynamo"
    import deployprune

    assert props["deployprune.version"] == deployprune.__version__
    sparsity = json.loads(props["deployprune.layer_sparsity"])
    assert sparsity["conv2"] == pytest.approx(0.5, abs=1e-3)
    assert sparsity["fc"] == pytest.approx(0.5, abs=1e-3)
    assert sparsity["bn1"] == 0.0
    assert int(props["deployprune.parameters"]) == sum(p.numel() for p in convbn.parameters())


def test_names_and_multiple_outputs(tmp_path: Path, image) -> None:
    torch.manual_seed(0)
    model = TwoOutputs().eval()
    path = tmp_path / "two.onnx"
    result = converters.get("onnx").convert(model, image, path, input_names=["image"],
                                            output_names=["features", "logits"])
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == ["features", "logits"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feats, logits = session.run(["features", "logits"], {"image": image[0].numpy()})
    ref_feats, ref_logits = (t.detach().numpy() for t in model(*image))
    assert rel_err(ref_feats, feats) <= 1e-5 and rel_err(ref_logits, logits) <= 1e-5
    assert result.metadata["output_names"] == ["features", "logits"]


def test_wrong_number_of_names(tmp_path: Path, convbn, image) -> None:
    with pytest.raises(UsageError) as exc:
        converters.get("onnx").convert(convbn, image, tmp_path / "m.onnx", output_names=["a", "b"])
    assert str(exc.value) == "onnx option 'output_names': 2 names for 1 model outputs"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_dynamic_batch(tmp_path: Path, convbn, image, exporter: str) -> None:
    path = tmp_path / "m.onnx"
    result = converters.get("onnx").convert(convbn, image, path, dynamic_batch=True, exporter=exporter)
    dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value
    batch = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    got = run(path, batch)[0]
    assert got.shape == (3, 10)
    assert rel_err(torch_out(convbn, batch), got) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert result.metadata["exporter"] == exporter


def test_dynamo_exporter_defaults_to_opset18_in_one_file(tmp_path: Path, convbn, image) -> None:
    path = tmp_path / "m.onnx"
    result = converters.get("onnx").convert(convbn, image, path, exporter="dynamo")
    model = onnx.load(str(path))
    assert result.metadata["opset"] == 18 == [i.version for i in model.opset_import if i.domain == ""][0]
    assert result.options["opset"] == 18
    # the dynamo exporter's own '.onnx.data' side file is not written: data is inline
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert rel_err(torch_out(convbn, *image), run(path, *image)[0]) <= 1e-5


def test_opset_the_exporter_cannot_keep_is_a_warning(tmp_path: Path, convbn, image) -> None:
    # ReduceMean with a dynamic batch does not down-convert from 18 to 17
    result = converters.get("onnx").convert(convbn, image, tmp_path / "m.onnx", exporter="dynamo",
                                            opset=17, dynamic_batch=True)
    assert result.metadata["opset"] == 18
    assert result.warnings == ["the dynamo exporter produced opset 18, not the requested 17; "
                               "use exporter='torchscript' for an exact opset"]


def test_other_opset(tmp_path: Path, convbn, image) -> None:
    # the dynamo exporter only writes 18 (down-conversion to 13 fails); with the default exporter
    # the torchscript one writes the requested opset exactly, and the result says so
    path = tmp_path / "m.onnx"
    result = converters.get("onnx").convert(convbn, image, path, opset=13)
    assert [i.version for i in onnx.load(str(path)).opset_import if i.domain == ""] == [13]
    assert result.metadata["exporter"] == "torchscript"
    assert result.metadata["exporter_fallback"] == "it wrote opset 18, not the requested 13"
    assert result.warnings == ["exported with the torchscript exporter, not the default dynamo one: it wrote "
                               "opset 18, not the requested 13 (choose one with --opt exporter=dynamo|torchscript)"]


@pytest.mark.parametrize("opset", [None, 17])
def test_torchscript_exporter_option(tmp_path: Path, convbn, image, opset: int | None) -> None:
    path = tmp_path / "m.onnx"
    options = {} if opset is None else {"opset": opset}
    result = converters.get("onnx").convert(convbn, image, path, exporter="torchscript", **options)
    written = [i.version for i in onnx.load(str(path)).opset_import if i.domain == ""]
    assert written == [opset or 18] and result.metadata["opset"] == (opset or 18)
    assert result.metadata["exporter"] == "torchscript" and result.warnings == []
    assert onnx.load(str(path)).metadata_props  # deployprune's metadata as with the default exporter
    assert rel_err(torch_out(convbn, *image), run(path, *image)[0]) <= 1e-5


@pytest.mark.parametrize("simplify", [True, False])
def test_dynamo_nodes_are_named_by_module_scope(tmp_path: Path, convbn, image, simplify: bool) -> None:
    from deployprune.stats import module_name_from_scope, onnx_layers

    path = tmp_path / "m.onnx"
    converters.get("onnx").convert(convbn, image, path, simplify=simplify)
    model = onnx.load(str(path))
    modules = [n for n, _ in convbn.named_modules()]
    compute = {n.name: module_name_from_scope(n.name, modules)
               for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    # the BatchNorms are fused into the convolutions, which keep the convolution's scope
    assert compute == {"/conv1/Conv": "conv1", "/conv2/Conv": "conv2", "/fc/Gemm": "fc"}
    assert len({n.name for n in model.graph.node}) == len(model.graph.node)
    assert set(onnx_layers(path, modules)) == {"conv1", "conv2", "fc"}
    # the exporter's stack traces (the user's file paths and source lines) are not shipped
    keys = {p.key for n in model.graph.node for p in n.metadata_props}
    assert not keys & {"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node"}
    assert str(Path(__file__).parent) not in path.read_bytes().decode("latin-1")


class DataDependentBranch(torch.nn.Module):
    """torch.export refuses a Python branch on a tensor's value; the tracer records one side."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:
            return y * 2
        return y - 1


def test_default_exporter_falls_back_to_torchscript_and_says_why(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DataDependentBranch().eval()
    x = (torch.randn(2, 4, generator=torch.Generator().manual_seed(1)),)
    path = tmp_path / "m.onnx"
    result = converters.get("onnx").convert(model, x, path)
    assert result.metadata["exporter"] == "torchscript"
    assert props_of(path)["deployprune.exporter"] == "torchscript"
    reason = result.metadata["exporter_fallback"]
    assert reason.startswith("the dynamo exporter failed on DataDependentBranch: Could not guard on "
                             "data-dependent expression")
    assert result.warnings == [f"exported with the torchscript exporter, not the default dynamo one: {reason} "
                               "(choose one with --opt exporter=dynamo|torchscript)"]
    assert "\n" not in result.warnings[0]


def test_chosen_dynamo_exporter_never_falls_back(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError) as exc:
        converters.get("onnx").convert(DataDependentBranch().eval(), (torch.randn(2, 4),), tmp_path / "m.onnx",
                                       exporter="dynamo")
    assert str(exc.value).startswith("onnx: the dynamo exporter failed on DataDependentBranch: Could not guard "
                                     "on data-dependent expression")
    assert "\n" not in str(exc.value) and exc.value.exit_code == EXIT_UNSUPPORTED
    assert list(tmp_path.iterdir()) == []


class CondBranch(torch.nn.Module):
    """The same branch written with torch.cond: the dynamo exporter keeps both sides (an ONNX If)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: self.fc(t) * 2, lambda t: self.fc(t) - 1, (x,))


def test_dynamo_keeps_both_sides_of_torch_cond_and_no_source_in_subgraphs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CondBranch().eval()
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "m.onnx"
    result = converters.get("onnx").convert(model, (x,), path, simplify=False)
    assert result.metadata["exporter"] == "dynamo" and result.warnings == []
    assert "If" in {n.op_type for n in onnx.load(str(path)).graph.node}
    for sign in (1.0, -1.0):  # both branches, not the one the example took
        probe = sign * x.abs()
        assert rel_err(torch_out(model, probe), run(path, probe)[0]) <= 1e-5
    assert b"pkg.torch.onnx.stack_trace" not in path.read_bytes()


def props_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


# --------------------------------------------------------------------------- onnxsim fallback


def test_simplification_failure_keeps_the_export(tmp_path: Path, convbn, image, monkeypatch) -> None:
    import onnxsim

    def boom(*args, **kwargs):
        raise RuntimeError("simplifier crashed\nsecond line")

    monkeypatch.setattr(onnxsim, "simplify", boom)
    path = tmp_path / "m.onnx"
    result = converters.get("onnx").convert(convbn, image, path)
    assert result.warnings == ["onnxsim failed (RuntimeError: simplifier crashed); kept the unsimplified model"]
    assert result.metadata["simplified"] is False
    # what was written is exactly the unsimplified export
    plain = tmp_path / "plain.onnx"
    converters.get("onnx").convert(convbn, image, plain, simplify=False)
    assert path.read_bytes() == plain.read_bytes()
    assert rel_err(torch_out(convbn, *image), run(path, *image)[0]) <= 1e-5


def test_simplification_check_failure_keeps_the_export(tmp_path: Path, convbn, image, monkeypatch) -> None:
    import onnxsim

    seen = {}

    def failing_check(model, **kwargs):
        seen.update(kwargs)
        return model, False

    monkeypatch.setattr(onnxsim, "simplify", failing_check)
    result = converters.get("onnx").convert(convbn, image, tmp_path / "m.onnx", simplify_check_n=2)
    assert result.warnings == ["onnxsim's output check failed (simplified model differs from the export); "
                               "kept the unsimplified model"]
    assert result.metadata["simplified"] is False
    assert seen["check_n"] == 2 and seen["test_input_shapes"] == {"input_0": [1, 3, 16, 16]}
    converters.get("onnx").convert(convbn, image, tmp_path / "m1.onnx")
    assert seen["check_n"] == 1 and list(seen["input_data"]) == ["input_0"]


def test_simplify_off(tmp_path: Path, convbn, image) -> None:
    path = tmp_path / "m.onnx"
    result = converters.get("onnx").convert(convbn, image, path, simplify=False)
    assert result.metadata["simplified"] is False and result.warnings == []
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["deployprune.simplified"] == "False"


# --------------------------------------------------------------------------- external data


def _locations(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


def test_forced_external_data(tmp_path: Path, convbn, image) -> None:
    path = tmp_path / "m.onnx"
    result = converters.get("onnx").convert(convbn, image, path, external_data=True)
    side = tmp_path / "m.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert _locations(path) == {"m.onnx.data"}  # relative, final name (not the temporary one)
    assert result.metadata["external_data"] is True
    assert result.metadata["external_data_path"] == str(side)
    assert result.size_bytes == path.stat().st_size + side.stat().st_size
    assert side.stat().st_size > 20_000  # the weights live in the side file
    onnx.checker.check_model(str(path), full_check=True)
    # the pair is relocatable: move both elsewhere and load again
    other = tmp_path / "moved"
    other.mkdir()
    for p in (path, side):
        shutil.move(str(p), other / p.name)
    assert rel_err(torch_out(convbn, *image), run(other / "m.onnx", *image)[0]) <= 1e-5


def test_external_data_is_automatic_above_the_protobuf_limit(tmp_path: Path, convbn, image, monkeypatch) -> None:
    monkeypatch.setattr(onnx_target, "PROTOBUF_LIMIT", 10_000)  # stands in for 2 GB
    path = tmp_path / "big.onnx"
    result = converters.get("onnx").convert(convbn, image, path)
    assert result.metadata["external_data"] is True
    assert _locations(path) == {"big.onnx.data"}
    assert rel_err(torch_out(convbn, *image), run(path, *image)[0]) <= 1e-5


def test_large_model_goes_through_a_file_export(tmp_path: Path, convbn, image, monkeypatch) -> None:
    # above the limit the torchscript exporter writes to a scratch file (external data) first
    monkeypatch.setattr(onnx_target, "PROTOBUF_LIMIT", 1_000)
    path = tmp_path / "big.onnx"
    converters.get("onnx").convert(convbn, image, path, simplify=False, exporter="torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert rel_err(torch_out(convbn, *image), run(path, *image)[0]) <= 1e-5


def test_existing_side_file_needs_force(tmp_path: Path, convbn, image) -> None:
    (tmp_path / "m.onnx.data").write_bytes(b"old")
    with pytest.raises(OutputError) as exc:
        converters.get("onnx").convert(convbn, image, tmp_path / "m.onnx", external_data=True)
    assert "m.onnx.data: already exists (external data of a previous export); pass --force" in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.data"]
    converters.get("onnx").convert(convbn, image, tmp_path / "m.onnx", external_data=True, force=True)
    assert (tmp_path / "m.onnx.data").read_bytes() != b"old"
    # overwriting it with an inline model removes the now stale side file
    converters.get("onnx").convert(convbn, image, tmp_path / "m.onnx", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert rel_err(torch_out(convbn, *image), run(tmp_path / "m.onnx", *image)[0]) <= 1e-5


# --------------------------------------------------------------------------- sparse weights


def test_sparse_initializers_lossless_and_smaller(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = magnitude_prune_(MLPNet().eval(), 0.75)
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(2)),)
    dense_path, sparse_path = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    converters.get("onnx").convert(model, x, dense_path)
    result = converters.get("onnx").convert(model, x, sparse_path, sparse_initializers=True)
    dense_size, sparse_size = dense_path.stat().st_size, sparse_path.stat().st_size
    # 75% zeros: 1 bit per element + 4 bytes per non-zero ~ 0.28x of the weights
    assert sparse_size <= 0.32 * dense_size, (sparse_size, dense_size)
    assert result.size_bytes == sparse_size
    encoded = result.metadata["sparse"]["encoded"]
    assert set(encoded) == {"fc1.weight", "fc2.weight", "fc3.weight"}  # biases: < 1024 elements
    assert encoded["fc2.weight"]["sparsity"] == pytest.approx(0.75, abs=1e-4)
    # onnxruntime output is bit-identical to the dense file's: the weights are rebuilt exactly
    np.testing.assert_array_equal(run(sparse_path, *x)[0], run(dense_path, *x)[0])
    props = {p.key: p.value for p in onnx.load(str(sparse_path)).metadata_props}
    assert props["deployprune.sparse_encoding"] == onnx_target.SPARSE_ENCODING
    assert props["deployprune.sparse_tensors"] == "3"


def test_sparse_encoding_rebuilds_every_weight_exactly(tmp_path: Path) -> None:
    """Decode with the ONNX reference evaluator: every element, including -0.0 and tiny values."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    weights = {}
    for name, shape, sparsity in [("w_conv", (8, 4, 3, 3), 0.6), ("w_odd", (7, 13), 0.9), ("w_one", (1, 2050), 0.5)]:
        w = rng.standard_normal(shape).astype(np.float32)
        w[rng.random(shape) < sparsity] = 0.0
        w.flat[1] = 1e-30
        weights[name] = w
    weights["w_fp16"] = np.where(rng.random((40, 40)) < 0.5, 0, rng.standard_normal((40, 40))).astype(np.float16)
    weights["w_dense"] = rng.standard_normal((40, 40)).astype(np.float32)  # no zeros: left alone
    nodes = [helper.make_node("Identity", [n], [f"out_{n}"]) for n in weights]
    outputs = [helper.make_tensor_value_info(f"out_{n}", helper.np_dtype_to_tensor_dtype(w.dtype), list(w.shape))
               for n, w in weights.items()]
    graph = helper.make_graph(nodes, "g", [], outputs,
                              initializer=[numpy_helper.from_array(w, n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    encoded, stats = onnx_target.encode_sparse_initializers(model, min_sparsity=0.1, min_elements=64)
    assert set(stats["encoded"]) == {"w_conv", "w_odd", "w_one", "w_fp16"}
    onnx.checker.check_model(encoded, full_check=True)
    assert "w_conv" not in {t.name for t in encoded.graph.initializer}
    decoded = ReferenceEvaluator(encoded).run(None, {})
    for (name, w), got in zip(weights.items(), decoded, strict=True):
        assert got.dtype == w.dtype and got.shape == w.shape, name
        np.testing.assert_array_equal(got, w, err_msg=name)
    # and onnxruntime folds the decoding away when the session is created
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(encoded.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for (name, w), got in zip(weights.items(), session.run(None, {}), strict=True):
        np.testing.assert_array_equal(got, w, err_msg=name)
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert {n.op_type for n in optimized.graph.node} <= {"Identity"}
    assert TensorProto.UINT8 in {t.data_type for t in encoded.graph.initializer}


def test_sparse_options_need_sparse_initializers(tmp_path: Path, convbn, image) -> None:
    with pytest.raises(UsageError) as exc:
        converters.get("onnx").convert(convbn, image, tmp_path / "m.onnx", sparse_min_sparsity=0.5)
    assert str(exc.value) == ("onnx options 'sparse_min_sparsity'/'sparse_min_elements' only apply with "
                              "sparse_initializers=True")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sparse_initializers": True, "opset": 10},
         "onnx options 'sparse_initializers' and 'opset': the sparse encoding needs opset >= 11 (BitShift, "
         "CumSum), got opset 10; raise the opset or drop sparse_initializers"),
        ({"simplify": False, "simplify_check_n": 5},
         "onnx options 'simplify_check_n' and 'simplify': the check belongs to the simplification, which "
         "simplify=False turns off"),
        ({"opset": 99}, "onnx option 'opset': 99 is outside 7..23 supported by the dynamo exporter"),
        ({"opset": 21, "exporter": "torchscript"},
         "onnx option 'opset': 21 is outside 7..20 supported by the torchscript exporter"),
        ({"exporter": "tflite"}, "onnx option 'exporter': 'tflite' is not one of dynamo, torchscript"),
        ({"sparse_initializers": True, "sparse_min_sparsity": 1.5},
         "onnx option 'sparse_min_sparsity' must be between 0 and 1, got 1.5"),
        ({"dynamic_shapes": True}, "onnx: unknown option 'dynamic_shapes'"),
    ],
)
def test_incompatible_or_bad_options(tmp_path: Path, convbn, image, options: dict, message: str) -> None:
    with pytest.raises(UsageError) as exc:
        converters.get("onnx").convert(convbn, image, tmp_path / "m.onnx", **options)
    assert str(exc.value).startswith(message)
    assert exc.value.exit_code == EXIT_USAGE
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo", None])
def test_unsupported_op_is_named(tmp_path: Path, exporter: str | None) -> None:
    options = {} if exporter is None else {"exporter": exporter}
    with pytest.raises(UnsupportedError) as exc:
        converters.get("onnx").convert(ZetaNet(), (torch.randn(2, 4),), tmp_path / "z.onnx", **options)
    msg = str(exc.value)
    assert "zeta" in msg and "ZetaNet" in msg and "\n" not in msg
    expected = "'aten::special_zeta'" if exporter == "torchscript" else "'prims.zeta'"
    assert f"cannot export op {expected} of ZetaNet" in msg
    if exporter is None:  # the default tried both exporters and names both failures
        assert "(the torchscript exporter failed too: the torchscript exporter cannot export op " \
               "'aten::special_zeta' of ZetaNet" in msg
    assert exc.value.exit_code == EXIT_UNSUPPORTED
    assert list(tmp_path.iterdir()) == []


def test_unsupported_op_parsing() -> None:
    assert onnx_target.unsupported_op(
        "Exporting the operator 'aten::fft_fft' to ONNX opset version 17 is not supported") == "aten::fft_fft"
    assert onnx_target.unsupported_op(
        "\x1b[96mx\x1b[0m No ONNX function found for <OpOverload(op='aten.linalg_eig', overload='default')>"
    ) == "aten.linalg_eig"
    assert onnx_target.unsupported_op("something else broke") is None


def test_existing_output_needs_force(tmp_path: Path, convbn, image) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(OutputError) as exc:
        converters.get("onnx").convert(convbn, image, path)
    assert str(exc.value) == f"{path}: already exists; pass --force (force=True) to overwrite it"
    assert path.read_bytes() == b"old"
    converters.get("onnx").convert(convbn, image, path, force=True)
    onnx.checker.check_model(str(path))


def test_missing_directory(tmp_path: Path, convbn, image) -> None:
    path = tmp_path / "missing" / "m.onnx"
    with pytest.raises(OutputError) as exc:
        converters.get("onnx").convert(convbn, image, path)
    assert str(exc.value) == f"{path}: directory {path.parent} does not exist; create it first"
    assert exc.value.exit_code == EXIT_INPUT


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux sysfs (refuses new files even for root)")
def test_unwritable_directory(convbn, image) -> None:
    with pytest.raises(OutputError) as exc:
        converters.get("onnx").convert(convbn, image, "/sys/deployprune-test.onnx")
    assert str(exc.value).startswith("/sys/deployprune-test.onnx: ")
    assert "\n" not in str(exc.value)
    assert not Path("/sys/deployprune-test.onnx").exists()


@pytest.mark.parametrize("external", [False, True])
def test_disk_full_while_saving_leaves_nothing(tmp_path: Path, convbn, image, monkeypatch, external: bool) -> None:
    real_save = onnx.save_model

    def full_disk(proto, f, *args, **kwargs):
        real_save(proto, f, *args, **kwargs)  # write something, then fail like a full disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full_disk)
    with pytest.raises(OutputError) as exc:
        converters.get("onnx").convert(convbn, image, tmp_path / "m.onnx", external_data=external)
    assert "No space left on device" in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_nothing(tmp_path: Path, convbn, image, monkeypatch) -> None:
    monkeypatch.setattr(onnx_target, "parity", lambda ref, got: (0.5, 1.25))
    with pytest.raises(ValidationFailed) as exc:
        converters.get("onnx").convert(convbn, image, tmp_path / "m.onnx", external_data=True)
    assert str(exc.value) == (f"{tmp_path / 'm.onnx'}: onnxruntime output differs from torch (max abs error "
                              "1.25 = 0.5 of the output scale > tolerance 0.0001); nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path: Path, convbn) -> None:
    from deployprune.errors import InputError

    with pytest.raises(InputError, match="onnx: example_inputs must be a non-empty tuple of tensors"):
        converters.get("onnx").convert(convbn, (), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="onnx: expected a torch.nn.Module, got str"):
        converters.get("onnx").convert("model.pt", (torch.zeros(1),), tmp_path / "m.onnx")


def test_training_flag_and_grad_flags_are_restored(tmp_path: Path, convbn, image) -> None:
    convbn.train()
    convbn.fc.weight.requires_grad_(False)
    converters.get("onnx").convert(convbn, image, tmp_path / "m.onnx")
    assert convbn.training and convbn.bn1.training
    assert not convbn.fc.weight.requires_grad and convbn.conv1.weight.requires_grad
