"""One small model per op family: masked channels of ``c1`` meet the op; exact sizes and parity.

Every model has a first layer ``c1`` with 8 output channels, of which 1, 3, 5, 7 are masked
(weight rows and bias, and the affine parameters of a norm layer ``n1`` right after it). Where
the op lets zero channels through, ``c1`` must shrink to 4; where the op needs them (statistics
or softmax over channels), ``c1`` must stay at 8. Parity is always checked on fresh inputs at
batch 1 and 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deployprune as dp
from deployprune import zoo

from .helpers import RTOL, assert_plain_tree, channel_mask, masked_copy, param_count, relative_error

KEEP = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.float32)


class Conv1dBNPReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 8, 3, padding=1)
        self.n1 = nn.BatchNorm1d(8)
        self.act = nn.PReLU(8)
        self.c2 = nn.Conv1d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(self.act(self.n1(self.c1(x)))).mean(-1)


class Conv3dBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(2, 8, 3, padding=1)
        self.n1 = nn.BatchNorm3d(8)
        self.c2 = nn.Conv3d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.n1(self.c1(x)))).mean((2, 3, 4))


class ConvTransposeProducer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.ConvTranspose2d(3, 8, 2, stride=2)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)))


class ConvTransposeConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        return self.up(F.relu(self.c1(x)))


class InstanceNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.n1 = nn.InstanceNorm2d(8, affine=True)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.n1(self.c1(x))))


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.n1 = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.n1(self.c1(x))))


class ChannelsLastLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.n1 = nn.LayerNorm(8)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.n1(self.c1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.c2(F.gelu(y))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids):
        return self.fc(F.relu(self.c1(ids))).mean(1)


class SEGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.c1(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.c2(y * s)


class LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.c1(x).permute(0, 2, 3, 1)
        y = (self.gamma * y).permute(0, 3, 1, 2)
        return self.c2(F.relu(y))


class ChunkCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        a, b = self.c1(x).chunk(2, dim=1)
        return self.c2(torch.cat([F.relu(b), a], dim=1))


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.fc = nn.Linear(72, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.c1(x))), 1))


class ViewLinear(FlattenLinear):
    def forward(self, x):
        y = self.pool(F.relu(self.c1(x)))
        return self.fc(y.view(y.size(0), -1))


class ResidualSubMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1b = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        a = self.c1(x)
        return self.c2(a * self.c1b(x) - a)


class PoolUpsampleChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.3)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.up(self.drop(self.pool(F.relu(self.c1(x)))))
        y = F.interpolate(F.adaptive_avg_pool2d(y, 4), size=(8, 8), mode="nearest")
        return self.c2(F.dropout(y, 0.2, self.training))


class SoftmaxOverChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.softmax(self.c1(x), dim=1))


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(F.relu(self.g(F.relu(self.c1(x)))))


class SpatialCat(nn.Module):
    """Two maps concatenated along height: their common zero channels stay zero."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1b = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.c2(torch.cat([self.c1(x), self.c1b(x)], dim=2))


class StackLinear(nn.Module):
    """torch.stack of two channel vectors, flattened into a Linear: zero channels stay zero."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = self.c1(x).mean((2, 3))
        return self.fc(torch.stack([y, y * 2.0], dim=1).flatten(1))


class Conv1dSequence(nn.Module):
    """Audio-style: Conv1d, MaxPool1d, AdaptiveAvgPool1d, squeeze, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(1, 8, 9, stride=2)
        self.pool = nn.MaxPool1d(2)
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.gap(self.pool(F.relu(self.c1(x)))).squeeze(-1))


class RollFlip(nn.Module):
    """Swin-style shifted windows: torch.roll over the spatial dims, then a flip; channels pass through."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.roll(F.relu(self.c1(x)), shifts=(-2, 1), dims=(2, 3))
        return self.c2(torch.flip(y, dims=[3]))


class RollChannels(RollFlip):
    """A roll along the channel dim moves channels to other positions: they stay."""

    def forward(self, x):
        return self.c2(torch.roll(F.relu(self.c1(x)), shifts=1, dims=1))


@dataclass(frozen=True)
class OpCase:
    cls: Callable[[], nn.Module]
    shape: tuple[int, ...]
    c1_out: int  # expected output channels of c1 after compaction
    extra: dict[str, tuple[int, ...]] | None = None  # parameter name -> expected shape
    int_input: int = 0  # > 0: token ids in [0, int_input)


CASES = {
    "conv1d_bn_prelu": OpCase(Conv1dBNPReLU, (1, 2, 16), 4, {"act.weight": (4,), "c2.weight": (4, 4, 3)}),
    "conv3d_bn": OpCase(Conv3dBN, (1, 2, 4, 4, 4), 4, {"c2.weight": (4, 4, 3, 3, 3)}),
    "conv_transpose_producer": OpCase(ConvTransposeProducer, (1, 3, 4, 4), 4, {"c1.weight": (3, 4, 2, 2)}),
    "conv_transpose_consumer": OpCase(ConvTransposeConsumer, (1, 3, 4, 4), 4, {"up.weight": (4, 4, 2, 2)}),
    "instance_norm": OpCase(InstanceNormNet, (1, 3, 6, 6), 4, {"n1.weight": (4,)}),
    # GroupNorm statistics include the zero channels: removing them would change the other channels
    "group_norm_keeps": OpCase(GroupNormNet, (1, 3, 6, 6), 8),
    # LayerNorm over channels: same
    "channels_last_layer_norm_keeps": OpCase(ChannelsLastLayerNorm, (1, 3, 6, 6), 8),
    "embedding": OpCase(EmbeddingNet, (1, 7), 4, {"c1.weight": (20, 4), "fc.weight": (4, 4)}, int_input=20),
    "se_gate": OpCase(SEGate, (1, 3, 6, 6), 4, {"fc1.weight": (4, 4, 1, 1), "fc2.weight": (4, 4, 1, 1)}),
    "layer_scale": OpCase(LayerScale, (1, 3, 6, 6), 4, {"gamma": (4,)}),
    "chunk_cat": OpCase(ChunkCat, (1, 3, 6, 6), 4, {"c2.weight": (4, 4, 3, 3)}),
    "flatten_linear": OpCase(FlattenLinear, (1, 3, 6, 6), 4, {"fc.weight": (4, 36)}),
    "view_linear": OpCase(ViewLinear, (1, 3, 6, 6), 4, {"fc.weight": (4, 36)}),
    # a * b - a: where a is zero, so is the result, whatever b is: c1b's channels go too
    "residual_sub_mul": OpCase(ResidualSubMul, (1, 3, 6, 6), 4, {"c1b.weight": (4, 3, 3, 3)}),
    "pool_upsample_chain": OpCase(PoolUpsampleChain, (1, 3, 8, 8), 4, {"c2.weight": (4, 4, 3, 3)}),
    # a zero logit still adds exp(0) to the softmax denominator
    "softmax_over_channels_keeps": OpCase(SoftmaxOverChannels, (1, 3, 6, 6), 8),
    # masked positions 1 and 3 of each block of 4: the grouped conv keeps groups=2 with 2 inputs each
    "grouped_conv": OpCase(GroupedConv, (1, 3, 6, 6), 4, {"g.weight": (8, 2, 3, 3)}),
    "conv1d_sequence": OpCase(Conv1dSequence, (1, 1, 64), 4, {"fc.weight": (4, 4)}),
    "stack_flatten_linear": OpCase(StackLinear, (1, 3, 6, 6), 4, {"fc.weight": (4, 8)}),
    "roll_flip": OpCase(RollFlip, (1, 3, 6, 6), 4, {"c2.weight": (4, 4, 3, 3)}),
    "roll_channels_keeps": OpCase(RollChannels, (1, 3, 6, 6), 8),
    "spatial_cat": OpCase(SpatialCat, (1, 3, 6, 6), 4, {"c1b.weight": (4, 3, 3, 3), "c2.weight": (4, 4, 3, 3)}),
}


def _build(case: OpCase) -> nn.Module:
    torch.manual_seed(0)
    model = case.cls()
    # non-trivial normalization statistics and affine parameters, so constants matter
    zoo.randomize_normalization(model, seed=3)
    return model.eval()


def _masks(model: nn.Module) -> dict:
    c1 = model.c1
    if isinstance(c1, nn.Embedding):
        masks = {"c1": {"weight": KEEP.view(1, -1).expand_as(c1.weight).clone()}}
    else:
        masks = {"c1": channel_mask(c1, KEEP)}
    if hasattr(model, "c1b"):
        masks["c1b"] = channel_mask(model.c1b, KEEP)
    n1 = getattr(model, "n1", None)
    if n1 is not None and getattr(n1, "weight", None) is not None:
        masks["n1"] = {"weight": KEEP.clone(), "bias": KEEP.clone()}
    return masks


def _inputs(case: OpCase, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *case.shape[1:])
    if case.int_input:
        return torch.randint(0, case.int_input, shape, generator=g)
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("name", list(CASES))
def test_op_family(name: str) -> None:
    case = CASES[name]
    model = _build(case)
    masks = _masks(model)
    r = dp.compact(model, _inputs(case, 1, 0), masks)
    assert r.compacted and not r.blocked, [b.describe() for b in r.blocked]
    ref = masked_copy(model, masks)
    with torch.no_grad():
        errs = [relative_error(ref(_inputs(case, b, s)), r.model(_inputs(case, b, s))) for b in (1, 2) for s in (1, 2)]
    assert max(errs) <= RTOL, errs
    c1 = r.model.c1
    out = c1.embedding_dim if isinstance(c1, nn.Embedding) else c1.out_channels
    assert out == case.c1_out
    shapes = {n: tuple(p.shape) for n, p in r.model.named_parameters()}
    for pname, shape in (case.extra or {}).items():
        assert shapes[pname] == shape, f"{pname}: {shapes[pname]} != {shape}"
    if case.c1_out < 8:
        assert param_count(r.model) < param_count(model)
    else:
        assert param_count(r.model) == param_count(model)
    assert_plain_tree(r.model, model)


def test_constant_channel_before_padded_conv_is_kept() -> None:
    """A masked conv whose bias is not masked feeds a padded conv: the constant cannot be folded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].bias.fill_(0.5)  # relu(0.5) = 0.5: a non-zero constant on the masked channels
    masks = {"0": {"weight": channel_mask(model[0], KEEP)["weight"]}}
    r = dp.compact(model, torch.randn(1, 3, 6, 6), masks)
    ref = masked_copy(model, masks)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert relative_error(ref(x), r.model(x)) <= RTOL
    # the zero padding makes the constant channel's contribution position-dependent
    assert r.model[0].out_channels == 8


def test_constant_channel_before_unpadded_conv_is_folded() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].bias.fill_(0.5)
    masks = {"0": {"weight": channel_mask(model[0], KEEP)["weight"]}}
    r = dp.compact(model, torch.randn(1, 3, 6, 6), masks)
    ref = masked_copy(model, masks)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert relative_error(ref(x), r.model(x)) <= RTOL
    assert r.model[0].out_channels == 4 and r.model[2].in_channels == 4
    # folded: the 1x1 conv's bias absorbed w[:, masked] * 0.5
    masked = torch.nonzero(KEEP == 0).flatten()
    expected_bias = model[2].bias + 0.5 * model[2].weight[:, masked].sum((1, 2, 3))
    assert torch.allclose(r.model[2].bias, expected_bias, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float64_model_keeps_dtype_and_compacts(dtype: torch.dtype) -> None:
    """Replacements keep the model's dtype (BatchNorm, PReLU, Linear rebuilt in float64 too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.PReLU(8), nn.Conv2d(8, 4, 1),
                          nn.Flatten(), nn.Linear(4 * 36, 5))
    zoo.randomize_normalization(model, seed=1)
    model = model.to(dtype).eval()
    masks = {"0": channel_mask(model[0], KEEP), "1": {"weight": KEEP.clone(), "bias": KEEP.clone()}}
    r = dp.compact(model, torch.randn(1, 3, 6, 6, dtype=dtype), masks)
    assert not r.blocked, [b.describe() for b in r.blocked]
    assert {t.dtype for t in r.model.state_dict().values() if t.is_floating_point()} == {dtype}
    assert (r.model[0].out_channels, r.model[1].num_features, r.model[2].num_parameters) == (4, 4, 4)
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    with torch.no_grad():
        assert relative_error(masked_copy(model, masks)(x), r.model(x)) <= RTOL
