"""The model zoo: registry behaviour, and for every zoo model eager/fx/ONNX behaviour."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx
from torch import nn

from deployprune import zoo
from deployprune.zoo import InputSpec, ModelSpec

ZOO = zoo.names("zoo")

EXPECTED_ZOO = {
    "audio",
    "bert",
    "convnext",
    "densenet",
    "efficientnet",
    "inception",
    "lenet",
    "mixer",
    "mlp",
    "mnist_net",
    "mnist_net_digits",
    "mobilenet_v2_tiny",
    "mobilenet_v3_tiny",
    "regnet",
    "resnet_basic",
    "resnet_bottleneck",
    "resnext",
    "shufflenet",
    "squeezenet",
    "unet",
    "vgg",
    "vit",
    "vit_mha",
}

# Parameter counts of the published reference implementations (torchvision / timm /
# Hugging Face) at their default sizes: the re-implementations must match them exactly.
REFERENCE_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_large": 5_483_032,
    "mobilenet_v3_small": 2_542_856,
    "efficientnet_b0": 5_288_548,
    "densenet121": 7_978_856,
    "shufflenet_v2_x1_0": 2_278_604,
    "squeezenet1_0": 1_248_424,
    "squeezenet1_1": 1_235_496,
    "regnet_y_400mf": 4_344_144,
    "vgg11_bn": 132_868_840,
    "convnext_tiny": 28_589_128,
    "vit_small": 22_050_664,
    "vit_b_16": 86_567_656,
    "mixer_b16": 59_880_472,
    # BertModel-base 109,482,240 + a 768x2 classifier
    "bert_base": 109_483_778,
    # torchvision's GoogLeNet (6,624,904) uses 3x3 in the "5x5" branch; the paper's 5x5 adds
    # 16 weights per (ch5x5red, ch5x5) pair: 23,808 pairs.
    "googlenet": 6_624_904 + 16 * 23_808,
}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    return {}


def _model(cache: dict[str, nn.Module], name: str) -> nn.Module:
    if name not in cache:
        cache[name] = zoo.build(name)
    return cache[name]


# ------------------------------------------------------------------------------ registry


def test_names_sorted_and_filtered_by_tag() -> None:
    all_names = zoo.names()
    assert all_names == sorted(all_names)
    assert len(all_names) == len(set(all_names))
    assert set(ZOO) == EXPECTED_ZOO
    assert set(zoo.names("benchmark")) == {
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "mobilenet_v2",
        "vit_small",
    }
    assert zoo.names("depth-family") == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]
    assert "lenet" in zoo.names("sample")
    assert zoo.names("no-such-tag") == []


def test_get_unknown_name_lists_known_models() -> None:
    with pytest.raises(ValueError) as info:
        zoo.get("resnet9000")
    message = str(info.value)
    assert "resnet9000" in message
    assert "lenet" in message and "vit_mha" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="unknown model"):
        zoo.get(None)  # type: ignore[arg-type]


def test_get_returns_spec_with_consistent_fields() -> None:
    spec = zoo.get("lenet")
    assert isinstance(spec, ModelSpec)
    assert spec.name == "lenet"
    assert spec.inputs == (InputSpec((1, 1, 28, 28)),)
    assert spec.task == "classification"
    assert spec.output_layers == ("fc3",)
    assert set(spec.tags) == {"zoo", "sample"}
    assert spec.factory_path == "deployprune.zoo.lenet:TorchModel"


@pytest.mark.parametrize("name", zoo.names())
def test_every_factory_is_importable_from_its_path(name: str) -> None:
    spec = zoo.get(name)
    module_name, _, attr = spec.factory_path.partition(":")
    assert module_name.startswith("deployprune.zoo.")
    assert getattr(importlib.import_module(module_name), attr) is spec.factory
    assert spec.task in zoo.TASKS


def test_factories_are_unique() -> None:
    paths = [zoo.get(n).factory_path for n in zoo.names()]
    assert len(paths) == len(set(paths))


def test_example_inputs_are_deterministic() -> None:
    a = zoo.example_inputs("resnet_basic")
    b = zoo.example_inputs(zoo.get("resnet_basic"))
    c = zoo.example_inputs("resnet_basic", seed=1)
    assert len(a) == 1 and a[0].shape == (1, 3, 32, 32) and a[0].dtype == torch.float32
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])
    batch = zoo.example_inputs("resnet_basic", batch=4)
    assert batch[0].shape == (4, 3, 32, 32)
    assert torch.equal(batch[0], zoo.example_inputs("resnet_basic", batch=4)[0])
    with pytest.raises(ValueError, match="batch"):
        zoo.example_inputs("resnet_basic", batch=0)


def test_example_inputs_for_token_ids_respect_dtype_and_high() -> None:
    spec = zoo.get("bert")
    (ids,) = zoo.example_inputs(spec, batch=64)
    high = spec.inputs[0].high
    assert high is not None
    assert ids.dtype == torch.int64
    assert ids.shape == (64, 16)
    assert int(ids.min()) >= 0 and int(ids.max()) < high
    assert len(torch.unique(ids)) > high // 2  # spread over the vocabulary, not a constant
    assert torch.equal(ids, zoo.example_inputs(spec, batch=64)[0])


def test_input_spec_validation() -> None:
    with pytest.raises(ValueError, match="high"):
        InputSpec((1, 8), dtype=torch.int64)
    with pytest.raises(ValueError, match="high"):
        InputSpec((1, 8), high=10)
    with pytest.raises(ValueError, match="positive"):
        InputSpec((1, 0, 3))
    with pytest.raises(ValueError, match="task"):
        ModelSpec("x", nn.Identity, (InputSpec((1, 2)),), "detection", ())


def test_spec_for_factory_by_string_and_callable() -> None:
    from deployprune.zoo.lenet import TorchModel
    from deployprune.zoo.resnet import resnet18

    assert zoo.spec_for_factory("deployprune.zoo.lenet:TorchModel") is zoo.get("lenet")
    assert zoo.spec_for_factory("deployprune.zoo.lenet.TorchModel") is zoo.get("lenet")
    assert zoo.spec_for_factory(" deployprune.zoo.resnet:resnet18 ") is zoo.get("resnet18")
    assert zoo.spec_for_factory(TorchModel) is zoo.get("lenet")
    assert zoo.spec_for_factory(resnet18) is zoo.get("resnet18")
    assert zoo.spec_for_factory("deployprune.zoo.lenet:Nope") is None
    assert zoo.spec_for_factory("nope") is None
    assert zoo.spec_for_factory(lambda: nn.Linear(2, 2)) is None


def test_build_is_seeded_eval_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = zoo.build("resnet_basic")
    assert torch.equal(torch.get_rng_state(), before)
    b = zoo.build("resnet_basic")
    c = zoo.build("resnet_basic", seed=1)
    assert not a.training and all(not m.training for m in a.modules())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    assert not torch.equal(sa["bn1.running_var"], sc["bn1.running_var"])


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_reference_sizes_match_published_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = zoo.get(name).factory()
    assert _num_params(model) == REFERENCE_PARAMS[name]


def test_every_full_size_model_has_a_reference_count() -> None:
    assert set(zoo.names("full")) == set(REFERENCE_PARAMS)


def test_lenet_matches_the_nni_tutorial_structure() -> None:
    model = zoo.build("lenet")
    convs = {
        n: (m.in_channels, m.out_channels, m.kernel_size) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
    }
    linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert convs == {"conv1": (1, 6, (5, 5)), "conv2": (6, 16, (5, 5))}
    assert linears == {"fc1": (256, 120), "fc2": (120, 84), "fc3": (84, 10)}
    assert {n for n, m in model.named_modules() if isinstance(m, nn.ReLU)} == {"relu1", "relu2", "relu3", "relu4"}
    (x,) = zoo.example_inputs("lenet")
    # log-probabilities: exp sums to one
    assert torch.allclose(model(x).exp().sum(1), torch.ones(1), atol=1e-5)


def test_mnist_net_digits_dense_layer_size() -> None:
    assert zoo.build("mnist_net").dense.in_features == 12 * 14 * 14
    assert zoo.build("mnist_net_digits").dense.in_features == 12 * 4 * 4


# ------------------------------------------------------------------------------ zoo models


def _expected_out_dim(model: nn.Module, spec: ModelSpec) -> int:
    layer = model.get_submodule(spec.output_layers[0])
    if isinstance(layer, nn.Linear):
        return layer.out_features
    assert isinstance(layer, nn.Conv2d)
    return layer.out_channels


@pytest.mark.parametrize("name", ZOO)
def test_zoo_eager_forward(name: str, built: dict[str, nn.Module]) -> None:
    spec = zoo.get(name)
    model = _model(built, name)
    inputs = zoo.example_inputs(spec)
    with torch.no_grad():
        out = model(*inputs)
        again = model(*inputs)
    assert isinstance(out, torch.Tensor)
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)  # eval mode is deterministic
    assert float(out.std()) > 0
    n_out = _expected_out_dim(model, spec)
    if spec.task == "segmentation":
        assert out.shape == (1, n_out, *spec.inputs[0].shape[2:])
    else:
        assert out.shape == (1, n_out)
    for layer in spec.output_layers:
        model.get_submodule(layer)  # raises if the name is wrong
    # a batch of two gives the same rows as two batches of one (no batch mixing in eval)
    pair = zoo.example_inputs(spec, batch=2, seed=3)
    with torch.no_grad():
        joint = model(*pair)
        rows = torch.cat([model(*(t[i : i + 1] for t in pair)) for i in range(2)])
    assert _rel_err(joint, rows) < 1e-4


@pytest.mark.parametrize("name", ZOO)
def test_zoo_fx_trace_matches_eager(name: str, built: dict[str, nn.Module]) -> None:
    model = _model(built, name)
    inputs = zoo.example_inputs(name, seed=5)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(*inputs)
        got = traced(*inputs)
    assert _rel_err(got, expected) < 1e-6


@pytest.mark.parametrize("name", ZOO)
def test_zoo_onnx_export(name: str, built: dict[str, nn.Module], tmp_path: Path) -> None:
    model = _model(built, name)
    inputs = zoo.example_inputs(name, seed=7)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=17)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    (got,) = session.run(None, feeds)
    with torch.no_grad():
        expected = model(*inputs).numpy()
    assert got.shape == expected.shape
    assert float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12)) < 1e-4


@pytest.mark.parametrize("name", ZOO)
def test_zoo_normalization_is_not_default_after_build(name: str, built: dict[str, nn.Module]) -> None:
    model = _model(built, name)
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm))]
    norms += [m for m in model.modules() if type(m).__name__ == "LayerNorm2d"]
    for m in norms:
        assert not torch.equal(m.weight, torch.ones_like(m.weight))
        assert not torch.equal(m.bias, torch.zeros_like(m.bias))
        if isinstance(m, nn.modules.batchnorm._NormBase):
            assert m.running_mean is not None and m.running_var is not None
            assert not torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert not torch.equal(m.running_var, torch.ones_like(m.running_var))
            assert bool((m.running_var > 0).all())
    has_bn = any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    bn_free = {
        "lenet",
        "mnist_net",
        "mnist_net_digits",
        "mlp",
        "vit",
        "vit_mha",
        "mixer",
        "bert",
        "convnext",
        "squeezenet",
    }
    assert has_bn != (name in bn_free)


# ------------------------------------------------------------------------------ full sizes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vit_small"])
def test_benchmark_models_run_at_imagenet_size(name: str) -> None:
    spec = zoo.get(name)
    model = zoo.build(name)
    (x,) = zoo.example_inputs(spec)
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()
