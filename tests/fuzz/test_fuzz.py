"""Fuzzing: random small models and random masks through compaction AND ONNX export.

Each example draws a network (conv / batch norm / ReLU / residual add / concat, then flatten or
global mean into a stack of Linear layers), a set of NaN-free binary masks (whole output channels
or single elements) and export options, then:

1. ``deployprune.compact(model, inputs, masks)``: compaction must happen (``compacted``: an
   abandoned compaction fails the test), every masked channel must be accounted for (removed, or
   kept with a reason), and the compact model must compute what the masked model computes (max
   abs error <= 1e-5 of the output's scale) on the example and a fresh batch. A third mask
   strategy draws the masks a pruner makes from ``channel_groups`` (every producer slice of
   removable channels zeroed): there removal is exact, so every masked channel must be removed;
2. ``converters.get("onnx").convert(...)`` of the compact model (the converter's own check turned
   off, so this test is the judge), then onnxruntime: max abs error <= 1e-4 of the output scale.

Either step may refuse with a clean :class:`~deployprune.errors.DeployPruneError` (an op it does
not support, say); any other exception fails the test, and so does a wrong answer, including a
:class:`~deployprune.errors.ParityError` or :class:`~deployprune.errors.ValidationFailed`, which
are the tool catching its own wrong answer.

A third fuzzer throws hostile mask *structures* at ``dp.compact``: non-dicts, unknown modules and
parameters, non-string keys, non-tensors, every dtype, wrong shapes, NaN/inf/0.5/-1/2. It must end
in a ``DeployPruneError`` or, for masks that turn out valid, in parity, and must not modify the model.

Profiles: the default ``ci`` profile (derandomized, 25 examples per test, no deadline) keeps CI
fast. ``DEPLOYPRUNE_FUZZ_LONG=1`` selects ``long``: 3000 random examples per test (override with
``DEPLOYPRUNE_FUZZ_EXAMPLES=N``), for the benchmark machine::

    DEPLOYPRUNE_FUZZ_LONG=1 python -m pytest tests/fuzz -q
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import deployprune as dp
from deployprune import converters
from deployprune.errors import DeployPruneError, ParityError, ValidationFailed
from deployprune.finalize import channel_groups
from deployprune.pipeline import masked_copy
from tests.finalize.helpers import group_masks

COMPACT_RTOL = 1e-5
ONNX_RTOL = 1e-4

_COMMON = {"deadline": None, "print_blob": True,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
LONG = os.environ.get("DEPLOYPRUNE_FUZZ_LONG", "") not in ("", "0")
PROFILE = (settings(max_examples=int(os.environ.get("DEPLOYPRUNE_FUZZ_EXAMPLES", "3000")), **_COMMON) if LONG
           else settings(max_examples=25, derandomize=True, **_COMMON))


# --------------------------------------------------------------------------------------------
# Network specs


@dataclass(frozen=True)
class Layer:
    kind: str  # conv | bn | relu | add | cat
    inputs: tuple[int, ...]  # indices into the list of tensors produced so far (0: the input)
    channels: int = 0  # conv output channels
    kernel: int = 1
    depthwise: bool = False
    bias: bool = True


@dataclass(frozen=True)
class NetSpec:
    channels: int
    side: int
    body: tuple[Layer, ...]
    head: str  # flatten | mean
    hidden: tuple[int, ...]  # widths of the hidden Linear layers
    outputs: int
    seed: int


def _channels(spec_channels: int, body: list[Layer] | tuple[Layer, ...]) -> list[int]:
    chans = [spec_channels]
    for layer in body:
        if layer.kind == "conv":
            chans.append(layer.channels)
        elif layer.kind == "cat":
            chans.append(sum(chans[i] for i in layer.inputs))
        else:
            chans.append(chans[layer.inputs[0]])
    return chans


@st.composite
def net_specs(draw: st.DrawFn) -> NetSpec:
    channels = draw(st.integers(1, 4), label="input channels")
    body: list[Layer] = []
    for _ in range(draw(st.integers(0, 7), label="body length")):
        chans = _channels(channels, body)
        last = len(chans) - 1
        src = draw(st.integers(max(0, last - 2), last), label="source")
        kind = draw(st.sampled_from(["conv", "conv", "bn", "relu", "add", "cat"]), label="kind")
        if kind == "add":
            same = [i for i in range(len(chans)) if i != src and chans[i] == chans[src]]
            if same:
                body.append(Layer("add", (src, draw(st.sampled_from(same), label="residual"))))
                continue
            kind = "conv"
        if kind == "cat":
            other = draw(st.integers(0, last), label="concat with")
            body.append(Layer("cat", (src, other)))
            continue
        if kind == "conv":
            depthwise = chans[src] > 1 and draw(st.integers(0, 3), label="depthwise?") == 0
            body.append(Layer("conv", (src,), channels=chans[src] if depthwise else draw(st.integers(1, 6)),
                              kernel=draw(st.sampled_from([1, 3])), depthwise=depthwise,
                              bias=draw(st.booleans(), label="bias")))
        else:
            body.append(Layer(kind, (src,)))
    return NetSpec(channels=channels, side=draw(st.sampled_from([4, 6])), body=tuple(body),
                   head=draw(st.sampled_from(["flatten", "mean"])),
                   hidden=tuple(draw(st.lists(st.integers(1, 8), min_size=0, max_size=2), label="hidden")),
                   outputs=draw(st.integers(1, 4)), seed=draw(st.integers(0, 2**16)))


class FuzzNet(nn.Module):
    """The network a spec describes (forward walks the static spec: tracing unrolls it)."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        torch.manual_seed(spec.seed)
        self.spec = spec
        chans = _channels(spec.channels, spec.body)
        blocks: list[nn.Module] = []
        for layer in spec.body:
            c = chans[layer.inputs[0]]
            if layer.kind == "conv":
                blocks.append(nn.Conv2d(c, layer.channels, layer.kernel, padding=layer.kernel // 2,
                                        groups=c if layer.depthwise else 1, bias=layer.bias))
            elif layer.kind == "bn":
                bn = nn.BatchNorm2d(c)
                with torch.no_grad():  # running statistics that are not the identity
                    bn.running_mean.uniform_(-1, 1)
                    bn.running_var.uniform_(0.25, 4)
                    bn.weight.uniform_(0.5, 2)
                    bn.bias.uniform_(-1, 1)
                blocks.append(bn)
            else:
                blocks.append(nn.Identity())
        self.blocks = nn.ModuleList(blocks)
        width = chans[-1] * (spec.side**2 if spec.head == "flatten" else 1)
        linears = []
        for h in spec.hidden:
            linears.append(nn.Linear(width, h))
            width = h
        self.hidden = nn.ModuleList(linears)
        self.out = nn.Linear(width, spec.outputs)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ts = [x]
        for layer, block in zip(self.spec.body, self.blocks, strict=True):
            a = ts[layer.inputs[0]]
            if layer.kind in ("conv", "bn"):
                ts.append(block(a))
            elif layer.kind == "relu":
                ts.append(F.relu(a))
            elif layer.kind == "add":
                ts.append(a + ts[layer.inputs[1]])
            else:
                ts.append(torch.cat([a, ts[layer.inputs[1]]], dim=1))
        y = torch.flatten(ts[-1], 1) if self.spec.head == "flatten" else ts[-1].mean((2, 3))
        for linear in self.hidden:
            y = F.relu(linear(y))
        return self.out(y)


# --------------------------------------------------------------------------------------------
# Masks (NaN-free and binary by construction: 0.0 / 1.0 floats or bools)


def channel_masks(model: FuzzNet, data: st.DataObject) -> dict:
    masks = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            continue
        # the output layer too, now and then: its zeroed outputs must stay (as zeros), not vanish
        chance = st.integers(0, 3).map(lambda v: v == 3) if name == "out" else st.booleans()
        if not data.draw(chance, label=f"mask {name}?"):
            continue
        n = m.weight.shape[0]
        keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label=f"keep {name}"))
        weight = keep.view(-1, *([1] * (m.weight.dim() - 1))).expand_as(m.weight).clone()
        per = {"weight": weight if data.draw(st.booleans(), label="bool dtype?") else weight.float()}
        if m.bias is not None and data.draw(st.booleans(), label=f"mask bias of {name}?"):
            per["bias"] = keep.float()
        masks[name] = per
    return masks


def element_masks(model: FuzzNet, data: st.DataObject) -> dict:
    masks = {}
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="mask seed"))
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or not data.draw(st.booleans(), label=f"mask {name}?"):
            continue
        density = data.draw(st.sampled_from([0.0, 0.25, 0.5, 0.9]), label=f"density {name}")
        masks[name] = {"weight": (torch.rand(m.weight.shape, generator=g) < density).float()}
    return masks


# --------------------------------------------------------------------------------------------
# The property


def rel_error(ref: torch.Tensor | np.ndarray, got: torch.Tensor | np.ndarray, scale: float) -> float:
    """Max abs error divided by the output scale."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    assert ref.shape == got.shape, (ref.shape, got.shape)
    assert np.isfinite(got).all(), "non-finite output"
    return float(np.abs(ref - got).max(initial=0.0)) / scale


def output_scale(outputs: list[torch.Tensor]) -> float:
    """The largest |value| the reference produces over all test inputs (at least 1e-3).

    Over all inputs, not per input: a single output that happens to cancel to ~0 on one input
    would otherwise turn float32 rounding (~1e-7) into a large "relative" error.
    """
    return max(max(float(o.abs().max()) for o in outputs), 1e-3)


def group_consistent_masks(model: FuzzNet, data: st.DataObject) -> dict:
    """Masks as a pruner makes them from the coupled groups: removing them is exact."""
    g = torch.Generator().manual_seed(model.spec.seed)
    example = torch.randn(1, model.spec.channels, model.spec.side, model.spec.side, generator=g)
    groups = channel_groups(model, (example,))
    ratio = data.draw(st.sampled_from([0.25, 0.5, 0.75]), label="group ratio")  # 1.0: a layer keeps one
    masks, _ = group_masks(model, groups, seed=data.draw(st.integers(0, 2**16), label="group seed"), ratio=ratio)
    return masks


def check_accounting(result: dp.CompactionResult, exact: bool) -> None:
    """Compaction happened, and every masked channel is removed or kept with a reason."""
    assert result.compacted, f"compaction abandoned: {result.abandoned}"
    assert result.masked_channels == result.removed_channels + result.kept_channels, result.summary()
    for k in result.kept:
        assert k.count > 0 and k.reason and "\n" not in k.reason, k
    if exact:  # every masked channel goes, but a dimension none of whose channels is needed keeps one
        rescued = sum(k.count for k in result.kept if k.reason.startswith("a dimension keeps at least one"))
        assert result.removed_channels + rescued == result.masked_channels, result.summary()


def check_example(spec: NetSpec, masks: dict, data: st.DataObject, *, exact: bool = False) -> str:
    """Compact + export ``spec`` with ``masks``; returns the outcome (for hypothesis' statistics).

    ``exact``: the masks allow removing every masked channel exactly, so all of them must go."""
    model = FuzzNet(spec)
    g = torch.Generator().manual_seed(spec.seed)
    example = torch.randn(1, spec.channels, spec.side, spec.side, generator=g)
    fresh = torch.randn(1, spec.channels, spec.side, spec.side, generator=g)
    batch = torch.randn(3, spec.channels, spec.side, spec.side, generator=g)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    reference = masked_copy(model, masks)

    try:
        result = dp.compact(model, (example,), masks)
    except (ParityError, ValidationFailed):
        raise  # the tool caught itself computing a wrong answer: a bug
    except DeployPruneError as exc:
        assert "\n" not in str(exc), "error messages are one line"
        return f"compact refused: {type(exc).__name__}"
    # the user's model is never modified
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    check_accounting(result, exact)
    compact = result.model.eval()
    with torch.no_grad():
        refs = {id(x): reference(x) for x in (example, fresh, batch)}
        scale = output_scale(list(refs.values()))
        for x in (example, fresh, batch):
            err = rel_error(refs[id(x)], compact(x), scale)
            assert err <= COMPACT_RTOL, f"compacted vs masked: relative error {err:.3g}"

    dynamic = data.draw(st.booleans(), label="dynamic batch?")
    sparse = data.draw(st.booleans(), label="sparse initializers?")
    options = {"verify": False, "dynamic_batch": dynamic}
    if sparse:
        options.update(sparse_initializers=True, sparse_min_elements=1, sparse_min_sparsity=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.onnx"
        try:
            converters.get("onnx").convert(compact, (example,), path, **options)
        except ValidationFailed:
            raise
        except DeployPruneError as exc:
            assert "\n" not in str(exc), "error messages are one line"
            assert sorted(p.name for p in Path(tmp).iterdir()) == [], "a failed export left files"
            return f"export refused: {type(exc).__name__}"
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["fuzz.onnx"]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        with torch.no_grad():
            for x in (example, fresh, *([batch] if dynamic else [])):
                got = session.run(None, {name: x.numpy()})[0]
                err = rel_error(refs[id(x)].numpy(), got, scale)
                assert err <= ONNX_RTOL, f"onnxruntime vs masked torch: relative error {err:.3g}"
    return "parity"


@pytest.mark.filterwarnings("ignore")
@PROFILE
@given(spec=net_specs(), data=st.data())
def test_fuzz_channel_masks(spec: NetSpec, data: st.DataObject) -> None:
    event(check_example(spec, channel_masks(FuzzNet(spec), data), data))


@pytest.mark.filterwarnings("ignore")
@PROFILE
@given(spec=net_specs(), data=st.data())
def test_fuzz_element_masks(spec: NetSpec, data: st.DataObject) -> None:
    event(check_example(spec, element_masks(FuzzNet(spec), data), data))


@pytest.mark.filterwarnings("ignore")
@PROFILE
@given(spec=net_specs(), data=st.data())
def test_fuzz_group_masks(spec: NetSpec, data: st.DataObject) -> None:
    event(check_example(spec, group_consistent_masks(FuzzNet(spec), data), data, exact=True))


# --------------------------------------------------------------------------------------------
# The generator itself covers what it claims


class _Options:
    """Answers check_example's two option draws: dynamic batch on, sparse initializers off."""

    def draw(self, strategy: st.SearchStrategy, label: str | None = None) -> bool:
        return label == "dynamic batch?"


def test_hand_written_spec_compacts_and_exports() -> None:
    """Every layer kind, channel masks that remove something everywhere: parity and a smaller graph."""
    spec = NetSpec(channels=3, side=4, body=(
        Layer("conv", (0,), channels=4, kernel=3), Layer("bn", (1,)), Layer("relu", (2,)),
        Layer("conv", (3,), channels=4, kernel=1), Layer("add", (4, 3)), Layer("cat", (5, 1)),
        Layer("conv", (6,), channels=8, kernel=3, depthwise=True, bias=False),
    ), head="flatten", hidden=(5,), outputs=3, seed=3)
    model = FuzzNet(spec)
    assert {layer.kind for layer in spec.body} == {"conv", "bn", "relu", "add", "cat"}
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
    masks = {"blocks.0": {"weight": keep.view(4, 1, 1, 1).expand(4, 3, 3, 3).clone(), "bias": keep.clone()},
             "blocks.1": {"weight": keep.clone(), "bias": keep.clone()},
             "blocks.3": {"weight": keep.view(4, 1, 1, 1).expand(4, 4, 1, 1).clone(), "bias": keep.clone()}}
    assert check_example(spec, masks, _Options(), exact=True) == "parity"
    result = dp.compact(model, (torch.randn(1, 3, 4, 4),), masks)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in result.model.parameters())
    assert after < before


@pytest.mark.parametrize("fault", ["rounding", "wrong weights"])
def test_export_check_survives_a_near_zero_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  fault: str) -> None:
    """Found by the fuzzer (BUG-H11, fixed): conv + BN residual, one output that nearly cancels on the
    example. A difference at rounding level must pass the converter's own check although it is a
    large fraction of that tiny output; a wrong weight must still fail it. Both are injected into
    the written file before the check (every weight moved by one ulp / one output channel's weights
    moved by half their range), so the test does not depend on how onnxruntime happens to round."""
    from deployprune.converters import onnx as onnx_target
    from tests.faults import nudge_initializers, perturb_initializer

    real_check = onnx_target._check

    def check_then_inject(tmp: Path, path: Path) -> None:
        real_check(tmp, path)
        (nudge_initializers if fault == "rounding" else perturb_initializer)(tmp)

    monkeypatch.setattr(onnx_target, "_check", check_then_inject)
    spec = NetSpec(channels=3, side=6, body=(
        Layer("conv", (0,), channels=3, kernel=1), Layer("conv", (0,), channels=4, kernel=1, bias=False),
        Layer("bn", (2,)), Layer("add", (2, 3)),
    ), head="flatten", hidden=(), outputs=1, seed=3)
    model = FuzzNet(spec)
    example = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert float(model(example).abs().max()) < 1e-3  # the example output nearly cancels
    if fault == "wrong weights":
        with pytest.raises(ValidationFailed, match="onnxruntime output differs from torch"):
            converters.get("onnx").convert(model, (example,), tmp_path / "m.onnx")
        assert list(tmp_path.iterdir()) == []
        return
    result = converters.get("onnx").convert(model, (example,), tmp_path / "m.onnx")  # verify=True (default)
    # the relative figure alone would refuse it: the rounding allowance is what accepted it
    assert result.metadata["ort_relative_error"] > onnx_target.OPTIONS["tolerance"][1]
    assert result.metadata["ort_max_abs_error"] <= 8 * result.metadata["torch_fp32_rounding"]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    with torch.no_grad():
        assert 0 < np.abs(got - model(example).numpy()).max() < 1e-6


# --------------------------------------------------------------------------------------------
# Hostile masks: random structure, dtypes, shapes and values through the Python API


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool, torch.int64, torch.uint8,
           torch.int8, torch.complex64]
_VALUES = [0.0, 1.0, 0.5, -1.0, 2.0, float("nan"), float("inf"), -0.0, 1e-30]


@st.composite
def hostile_mask_value(draw: st.DrawFn, shape: tuple[int, ...]) -> object:
    kind = draw(st.sampled_from(["tensor", "tensor", "tensor", "vector", "wrong-shape", "scalar", "not-a-tensor"]))
    if kind == "not-a-tensor":
        return draw(st.sampled_from(["ones", None, [1, 0], {"weight": 1}, 1.0, b"\x00"]))
    if kind == "vector":
        shape = (shape[0],)
    elif kind == "wrong-shape":
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=4)))
    elif kind == "scalar":
        shape = ()
    binary = draw(st.booleans())
    pool = _VALUES[:2] if binary else _VALUES
    n = int(np.prod(shape)) if shape else 1
    values = draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
    t = torch.tensor(values, dtype=torch.float64).reshape(shape)
    dtype = draw(st.sampled_from(_DTYPES))
    return t.to(dtype)


@st.composite
def hostile_masks(draw: st.DrawFn, model: nn.Module) -> object:
    if draw(st.integers(0, 9)) == 0:  # now and then, not even a dict
        return draw(st.sampled_from([[1, 2], "masks", None, 3.0, ("conv", {"weight": 1})]))
    params = {name: dict(m.named_parameters(recurse=False)) for name, m in model.named_modules()}
    names = [n for n, p in params.items() if p]
    masks: dict = {}
    for _ in range(draw(st.integers(0, 3))):
        module = draw(st.sampled_from([*names, "", "nope", "blocks", 0, None]))
        per: dict = {}
        if isinstance(module, str) and module in params and params[module]:
            choices = [*params[module], "gamma", 0]
        else:
            choices = ["weight", "bias"]
        for _ in range(draw(st.integers(0, 2))):
            pname = draw(st.sampled_from(choices))
            shape = tuple(params[module][pname].shape) if (
                isinstance(module, str) and module in params and pname in params[module]) else (2, 2)
            per[pname] = draw(hostile_mask_value(shape))
        masks[module] = per if draw(st.integers(0, 9)) else draw(st.sampled_from([[1], "x", 1.0]))
    return masks


_HOSTILE_SPEC = NetSpec(channels=2, side=4, body=(
    Layer("conv", (0,), channels=3, kernel=3), Layer("bn", (1,)), Layer("relu", (2,)), Layer("add", (3, 2)),
), head="flatten", hidden=(4,), outputs=2, seed=5)


@pytest.mark.filterwarnings("ignore")
@PROFILE
@given(data=st.data())
def test_fuzz_hostile_masks_api(data: st.DataObject) -> None:
    """Random mask structures and values: compact either succeeds with parity or raises a DeployPruneError."""
    model = FuzzNet(_HOSTILE_SPEC)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    masks = data.draw(hostile_masks(model), label="masks")
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    try:
        result = dp.compact(model, (x[:1],), masks)
    except (ParityError, ValidationFailed):
        raise
    except DeployPruneError as exc:
        assert "\n" not in str(exc)
        event(f"refused: {type(exc).__name__}")
        return
    finally:
        assert all(torch.equal(original[k], v) for k, v in model.state_dict().items()), "the model was modified"
    event("accepted")
    check_accounting(result, exact=False)
    # accepted masks must have been valid 0/1 masks: the compact model computes the masked model
    reference = masked_copy(model, masks)
    with torch.no_grad():
        ref = reference(x)
        assert torch.isfinite(ref).all()
        err = rel_error(ref, result.model(x), output_scale([ref]))
    assert err <= COMPACT_RTOL, f"compacted vs masked: relative error {err:.3g}"
