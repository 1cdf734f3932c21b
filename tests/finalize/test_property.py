"""Property-based: random small conv/linear graphs with residual adds and concats, random masks.

For every drawn graph and mask set, the compacted model must compute what the masked model
computes (max error <= 1e-5 relative to the output's scale, see ``_scale``, on the example and a
fresh batch-2 input) and never have more parameters.

CI runs a fixed, moderate number of examples; set ``DEPLOYPRUNE_HYPOTHESIS_PROFILE=long`` (on
the benchmark machine) for a much longer, randomized search.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import deployprune as dp
from deployprune.finalize import channel_groups

from .helpers import (
    RTOL,
    expected_param_shapes,
    group_masks,
    masked_copy,
    param_count,
    param_shapes,
)

_PROFILES = {
    "ci": settings(max_examples=60, deadline=None, derandomize=True, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
    "long": settings(max_examples=3000, deadline=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
}
_PROFILE_NAME = os.environ.get("DEPLOYPRUNE_HYPOTHESIS_PROFILE", "ci")
if _PROFILE_NAME not in _PROFILES:
    raise RuntimeError(f"DEPLOYPRUNE_HYPOTHESIS_PROFILE={_PROFILE_NAME!r}: use one of {sorted(_PROFILES)}")
PROFILE = _PROFILES[_PROFILE_NAME]

SIDE = 6  # input height and width


# ---------------------------------------------------------------------------- graph specs


@dataclass(frozen=True)
class Op:
    kind: str  # conv | bn | relu | add | mul | cat | pool | linear (channels-last) | chunk | gate (SE-style)
    srcs: tuple[int, ...]
    out: int = 0  # conv/linear output channels; for chunk, which half (0 or 1)
    kernel: int = 1
    groups: int = 1
    bias: bool = True


@dataclass(frozen=True)
class Spec:
    in_ch: int
    ops: tuple[Op, ...]
    head: str  # "mean" (global average, Linear-ReLU-Linear) | "flatten" (flatten into Linear), of every leaf
    hidden: int
    classes: int
    seed: int


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    in_ch = draw(st.integers(1, 4))
    shapes: list[tuple[int, int]] = [(in_ch, SIDE)]  # (channels, side) of every tensor so far
    ops: list[Op] = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["conv", "conv", "conv", "bn", "relu", "add", "cat", "pool",
                                     "mul", "linear", "chunk", "gate"]))
        recent = list(range(max(0, len(shapes) - 4), len(shapes)))
        src = draw(st.sampled_from(recent))
        c, side = shapes[src]
        if kind in ("add", "mul"):
            partners = [i for i in range(len(shapes)) if i != src and shapes[i] == shapes[src]]
            if not partners:
                kind = "conv"
            else:
                other = draw(st.sampled_from(partners))
                ops.append(Op(kind, (src, other)))
                shapes.append(shapes[src])
                continue
        if kind == "chunk":
            if c < 2 or c % 2:
                kind = "gate"
            else:
                half = draw(st.integers(0, 1))
                ops.append(Op("chunk", (src,), out=half))
                shapes.append((c // 2, side))
                continue
        if kind == "linear":
            out = draw(st.integers(1, 6))
            ops.append(Op("linear", (src,), out=out, bias=draw(st.booleans())))
            shapes.append((out, side))
            continue
        if kind == "cat":
            partners = [i for i in range(len(shapes)) if shapes[i][1] == side]
            others = draw(st.lists(st.sampled_from(partners), min_size=1, max_size=2))
            srcs = (src, *others)
            ops.append(Op("cat", srcs))
            shapes.append((sum(shapes[i][0] for i in srcs), side))
            continue
        if kind == "pool" and side < 2:
            kind = "relu"
        if kind == "conv":
            depthwise = c > 1 and draw(st.booleans()) and draw(st.booleans())
            out = c if depthwise else draw(st.integers(1, 6))
            kernel = draw(st.sampled_from([1, 3]))
            ops.append(Op("conv", (src,), out=out, kernel=kernel, groups=c if depthwise else 1,
                          bias=draw(st.booleans())))
            shapes.append((out, side))
        elif kind == "pool":
            ops.append(Op("pool", (src,)))
            shapes.append((c, side // 2))
        else:
            ops.append(Op(kind, (src,)))
            shapes.append((c, side))
    return Spec(in_ch=in_ch, ops=tuple(ops), head=draw(st.sampled_from(["mean", "flatten"])),
                hidden=draw(st.integers(1, 6)), classes=draw(st.integers(1, 3)),
                seed=draw(st.integers(0, 2**31 - 1)))


def shapes_of(spec: Spec) -> list[tuple[int, int]]:
    shapes = [(spec.in_ch, SIDE)]
    for op in spec.ops:
        c, side = shapes[op.srcs[0]]
        if op.kind in ("conv", "linear"):
            shapes.append((op.out, side))
        elif op.kind == "chunk":
            shapes.append((c // 2, side))
        elif op.kind == "cat":
            shapes.append((sum(shapes[i][0] for i in op.srcs), side))
        elif op.kind == "pool":
            shapes.append((c, side // 2))
        else:
            shapes.append((c, side))
    return shapes


def leaves(spec: Spec) -> list[int]:
    """Indices of the tensors no op reads (the last one always among them)."""
    read = {i for op in spec.ops for i in op.srcs}
    return [i for i in range(1, len(spec.ops) + 1) if i not in read]


class SpecNet(nn.Module):
    """The module a spec describes; forward walks the (static) spec, so torch.fx unrolls it."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        torch.manual_seed(spec.seed)
        self.spec = spec
        shapes = shapes_of(spec)
        layers: list[nn.Module] = []
        for op in spec.ops:
            c = shapes[op.srcs[0]][0]
            if op.kind == "conv":
                layers.append(nn.Conv2d(c, op.out, op.kernel, padding=op.kernel // 2, groups=op.groups, bias=op.bias))
            elif op.kind == "linear":
                layers.append(nn.Linear(c, op.out, bias=op.bias))
            elif op.kind == "bn":
                bn = nn.BatchNorm2d(c)
                with torch.no_grad():
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.5, 0.5)
                    bn.running_mean.uniform_(-0.5, 0.5)
                    bn.running_var.uniform_(0.5, 2.0)
                layers.append(bn)
            else:
                layers.append(nn.Identity())
        self.layers = nn.ModuleList(layers)
        self.leaves = leaves(spec)
        features = sum(shapes[i][0] if spec.head == "mean" else shapes[i][0] * shapes[i][1] ** 2 for i in self.leaves)
        self.fc1 = nn.Linear(features, spec.hidden)
        self.fc2 = nn.Linear(spec.hidden, spec.classes)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ts = [x]
        for op, layer in zip(self.spec.ops, self.layers, strict=True):
            a = ts[op.srcs[0]]
            if op.kind in ("conv", "bn"):
                ts.append(layer(a))
            elif op.kind == "relu":
                ts.append(F.relu(a))
            elif op.kind == "add":
                ts.append(a + ts[op.srcs[1]])
            elif op.kind == "mul":
                ts.append(a * ts[op.srcs[1]])
            elif op.kind == "linear":  # channels-last Linear, as in ConvNeXt blocks
                ts.append(layer(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
            elif op.kind == "chunk":
                ts.append(a.chunk(2, dim=1)[op.out])
            elif op.kind == "gate":  # squeeze-and-excitation style gate without parameters
                ts.append(a * torch.sigmoid(a.mean((2, 3), keepdim=True)))
            elif op.kind == "cat":
                ts.append(torch.cat([ts[i] for i in op.srcs], dim=1))
            else:
                ts.append(F.max_pool2d(a, 2))
        # every tensor nothing else reads feeds the head, so no layer is dead code
        feats = [ts[i].mean((2, 3)) if self.spec.head == "mean" else torch.flatten(ts[i], 1) for i in self.leaves]
        y = feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)
        return self.fc2(F.relu(self.fc1(y)))


# ---------------------------------------------------------------------------- masks


def channel_masks(model: SpecNet, data: st.DataObject) -> dict:
    """Per maskable layer (not the output layer): maybe a random output-channel mask."""
    masks = {}
    for name, m in model.named_modules():
        if name == "fc2" or not isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            continue
        if not data.draw(st.booleans(), label=f"mask {name}"):
            continue
        n = m.weight.shape[0]
        keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label=f"keep {name}"),
                            dtype=torch.float32)
        per = {"weight": keep.view(-1, *([1] * (m.weight.dim() - 1))).expand_as(m.weight).clone()}
        if m.bias is not None and (isinstance(m, nn.BatchNorm2d) or data.draw(st.booleans(), label=f"bias {name}")):
            per["bias"] = keep.clone()
        masks[name] = per
    return masks


def element_masks(model: SpecNet, data: st.DataObject) -> dict:
    """Unstructured masks: every weight element kept with a drawn probability."""
    masks = {}
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="mask seed"))
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or not data.draw(st.booleans(), label=f"mask {name}"):
            continue
        p = data.draw(st.sampled_from([0.3, 0.6, 0.9]), label=f"density {name}")
        masks[name] = {"weight": (torch.rand(m.weight.shape, generator=g) < p).float()}
    return masks


def _scale(fc2: nn.Linear, h: torch.Tensor, out: torch.Tensor) -> float:
    """What the relative error is relative to: the output's magnitude, or, when the output layer's
    terms cancel (random tiny graphs often end near zero: bias -0.145 + 0.148 = 0.003), the
    magnitude of those terms, |b| + |W| |h|. Finalize folds constant channels into biases, which
    changes the fp32 summation order; against a cancelled output that rounding alone can exceed 1e-5.
    """
    terms = fc2.bias.abs() + h.abs() @ fc2.weight.abs().t()
    return max(float(out.abs().max()), float(terms.max()))


def _check(spec: Spec, masks: dict) -> Any:
    model = SpecNet(spec)
    g = torch.Generator().manual_seed(spec.seed % 1000)
    example = torch.randn(1, spec.in_ch, SIDE, SIDE, generator=g)
    fresh = torch.randn(2, spec.in_ch, SIDE, SIDE, generator=g)
    r = dp.compact(model, (example,), masks)
    assert r.compacted, f"compaction abandoned: {[b.describe() for b in r.blocked]}"
    assert not r.blocked, [b.describe() for b in r.blocked]
    ref = masked_copy(model, masks)
    head_in: list[torch.Tensor] = []
    ref.fc2.register_forward_hook(lambda m, i, o: head_in.append(i[0]))
    with torch.no_grad():
        for x in (example, fresh):
            want, got = ref(x), r.model(x)
            err = float((want.double() - got.double()).abs().max())
            assert err <= RTOL * _scale(ref.fc2, head_in.pop(), want), f"abs error {err:.3g} for {spec}"
    assert param_count(r.model) <= param_count(model)
    assert r.params_after == param_count(r.model)
    return r


@pytest.mark.filterwarnings("ignore")
@PROFILE
@given(spec=specs(), data=st.data())
def test_random_graph_channel_masks_parity(spec: Spec, data: st.DataObject) -> None:
    masks = channel_masks(SpecNet(spec), data)
    assume(masks)
    _check(spec, masks)


@pytest.mark.filterwarnings("ignore")
@PROFILE
@given(spec=specs(), data=st.data())
def test_random_graph_element_masks_parity(spec: Spec, data: st.DataObject) -> None:
    masks = element_masks(SpecNet(spec), data)
    assume(masks)
    _check(spec, masks)


def _check_groups(spec: Spec, seed: int, ratio: float) -> bool:
    """Group masks on the spec's model: parity, and exactly the shapes the removed groups imply.

    Returns False when no group had anything to remove.
    """
    model = SpecNet(spec)
    example = torch.randn(1, spec.in_ch, SIDE, SIDE, generator=torch.Generator().manual_seed(seed % 1000))
    groups = channel_groups(model, (example,))
    masks, removed = group_masks(model, groups, seed=seed, ratio=ratio)
    if not masks:
        return False
    r = _check(spec, masks)
    expected = expected_param_shapes(model, groups, removed)
    got = param_shapes(r.model)
    wrong = {k: (expected[k], got.get(k)) for k in expected if got.get(k) != expected[k]}
    assert not wrong, f"(expected, got) per parameter: {wrong} for {spec}"
    return True


@pytest.mark.filterwarnings("ignore")
@PROFILE
@given(spec=specs(), seed=st.integers(0, 2**31 - 1), ratio=st.sampled_from([0.3, 0.5, 0.8]))
def test_random_graph_group_masks_exact_accounting(spec: Spec, seed: int, ratio: float) -> None:
    """Masks chosen per channel group: parity, and exactly the parameter shapes the removed groups imply."""
    assume(_check_groups(spec, seed, ratio))


def test_group_reaching_one_concat_by_two_paths_lists_both_positions() -> None:
    """conv -> cat([conv, x]) -> mean and conv -> BN -> mean both end in the head's concat: the conv's
    group must own both positions in fc1's input (found by the property test above)."""
    spec = Spec(in_ch=2, ops=(Op("conv", (0,), out=4, kernel=1), Op("cat", (1, 0)), Op("bn", (1,))),
                head="mean", hidden=3, classes=2, seed=0)
    assert leaves(spec) == [2, 3]
    assert _check_groups(spec, seed=0, ratio=0.5)


def test_spec_net_examples_cover_every_op() -> None:
    """The generator's building blocks all appear in a hand-written spec that compacts."""
    spec = Spec(in_ch=3, ops=(
        Op("conv", (0,), out=4, kernel=3), Op("bn", (1,)), Op("relu", (2,)),
        Op("conv", (3,), out=4, kernel=1, bias=False), Op("conv", (4,), out=4, kernel=1), Op("add", (5, 4)),
        Op("conv", (6,), out=4, kernel=3, groups=4), Op("cat", (7, 6, 1)), Op("pool", (8,)),
    ), head="flatten", hidden=5, classes=2, seed=1)
    model = SpecNet(spec)
    kinds = {op.kind for op in spec.ops}
    assert kinds == {"conv", "bn", "relu", "add", "cat", "pool"}
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
    masks = {"layers.0": {"weight": keep.view(4, 1, 1, 1).expand(4, 3, 3, 3).clone(), "bias": keep.clone()},
             "layers.1": {"weight": keep.clone(), "bias": keep.clone()}}
    _check(spec, masks)
    r = dp.compact(model, (torch.randn(1, 3, SIDE, SIDE),), masks)
    # conv0 loses 2 rows + bias, the BatchNorm 2 channels, the 1x1 conv reading the ReLU 2 input
    # columns, and fc1 the 2 x 3 x 3 flattened features conv0's zero channels occupy in the concat
    removed = 2 * (3 * 9 + 1) + 2 * 2 + 4 * 2 + 5 * 2 * 9
    assert param_count(r.model) == param_count(model) - removed


def test_spec_net_channels_last_linear_chunk_gate_mul() -> None:
    """The newer building blocks, with the sizes finalize must reach."""
    spec = Spec(in_ch=3, ops=(
        Op("conv", (0,), out=4, kernel=3), Op("linear", (1,), out=6), Op("chunk", (2,), out=0),
        Op("gate", (3,)), Op("mul", (4, 3)),
    ), head="mean", hidden=5, classes=2, seed=2)
    assert leaves(spec) == [5]
    model = SpecNet(spec)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    masks = {"layers.1": {"weight": keep.view(6, 1).expand(6, 4).clone(), "bias": keep.clone()}}
    r = _check(spec, masks)
    shapes = param_shapes(r.model)
    # chunk(2)[0] reads rows 0-2 of the Linear; row 1 is zero, so it goes, and the same position
    # of the other (unread) half goes with it (chunks stay equal); the gate and the product keep
    # channel 1 at zero, so the head's fc1 drops that column
    assert shapes["layers.1.weight"] == (4, 4) and shapes["layers.1.bias"] == (4,)
    assert shapes["fc1.weight"] == (5, 2)
    assert param_count(r.model) == param_count(model) - 2 * 5 - 5
