"""Rules for ops as model libraries write them, on small stand-ins of their layers.

timm's norm-act layers subclass torch.nn's norms but call ``F.batch_norm`` / ``F.group_norm`` in
their own ``forward`` (so the capture sees the functional call with get_attr parameters); LeViT
caches attention biases on the module and gathers them with an index tensor; GhostNet slices a
concat with ``[:, :self.out_chs]`` and writes each primary channel to two stream positions. The
real layers are tested in tests/real/; these stand-ins pin each rule down with exact sizes.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import deployprune as dp
from deployprune.finalize import channel_groups

from .helpers import RTOL, group_masks, masked_copy, relative_error

KEEP = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.float32)


def _conv_masks(conv: str = "c1", norm: str | None = "n1") -> dict:
    masks = {conv: {"weight": KEEP.view(-1, 1, 1, 1).expand(8, 3, 3, 3).clone(), "bias": KEEP.clone()}}
    if norm is not None:
        masks[norm] = {"weight": KEEP.clone(), "bias": KEEP.clone()}
    return masks


def _randomize_norms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)):
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def _check_parity(model: nn.Module, masks: dict, compacted: nn.Module, shape: tuple[int, ...]) -> None:
    ref = masked_copy(model, masks)
    with torch.no_grad():
        for batch in (1, 2):
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
            assert relative_error(ref(x), compacted(x)) <= RTOL


class BatchNormAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm2d whose forward calls F.batch_norm itself."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(x)


class ConvBNAct(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.n1 = norm
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(self.n1(self.c1(x)))


def test_functional_batch_norm_in_a_batchnorm_subclass() -> None:
    model = _randomize_norms(ConvBNAct(BatchNormAct(8)))
    masks = _conv_masks()
    r = dp.compact(model, torch.randn(1, 3, 8, 8), masks)
    n1 = r.model.n1
    assert type(n1) is BatchNormAct
    assert r.model.c1.out_channels == 4 and r.model.c2.in_channels == 4
    assert n1.weight.shape == n1.bias.shape == n1.running_mean.shape == n1.running_var.shape == (4,)
    assert n1.num_features == 4 and ("n1", "num_features", 8, 4) in [tuple(p) for p in r.patched_attributes]
    assert not r.kept and r.removed_channels == r.masked_channels == 8  # c1's and n1's
    _check_parity(model, masks, r.model, (3, 8, 8))


def test_functional_batch_norm_folds_a_constant_channel_exactly() -> None:
    """Conv rows masked but not the BN: the channel is the BN constant (x - mean) / std * w + b, which
    the unpadded 1x1 consumer absorbs into its bias; the channel goes."""
    model = _randomize_norms(ConvBNAct(BatchNormAct(8)))
    model.c2 = nn.Conv2d(8, 4, 1)
    model.n1.act = nn.Identity()
    masks = _conv_masks(norm=None)
    r = dp.compact(model, torch.randn(1, 3, 8, 8), masks)
    assert r.model.c2.in_channels == 4
    _check_parity(model, masks, r.model, (3, 8, 8))


class GroupNormAct(nn.GroupNorm):
    """Like timm's GroupNormAct: F.group_norm with the module's own num_groups."""

    def forward(self, x):
        return F.relu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class FixedGroups(nn.Module):
    """F.group_norm with a group count written into forward: nothing to patch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(8) + 0.5)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)

    def forward(self, x):
        return F.group_norm(x, 4, self.weight, self.bias)


def test_functional_group_norm_removes_whole_groups_and_patches_num_groups() -> None:
    model = _randomize_norms(ConvBNAct(GroupNormAct(4, 8)))
    keep = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.float32)  # groups 1 and 3
    masks = {"c1": {"weight": keep.view(-1, 1, 1, 1).expand(8, 3, 3, 3).clone(), "bias": keep.clone()},
             "n1": {"weight": keep.clone(), "bias": keep.clone()}}
    r = dp.compact(model, torch.randn(1, 3, 8, 8), masks)
    assert r.model.n1.num_groups == 2 and r.model.n1.weight.shape == (4,)
    assert r.model.c1.out_channels == 4 and not r.kept
    _check_parity(model, masks, r.model, (3, 8, 8))


def test_functional_group_norm_keeps_part_of_a_group() -> None:
    """A group with one live channel keeps all of its channels: its statistics read every one."""
    model = _randomize_norms(ConvBNAct(GroupNormAct(4, 8)))
    masks = _conv_masks()  # masks channels 1, 3, 5, 7: one of each group
    r = dp.compact(model, torch.randn(1, 3, 8, 8), masks)
    assert r.model.c1.out_channels == 8 and r.model.n1.num_groups == 4
    _check_parity(model, masks, r.model, (3, 8, 8))


def test_functional_group_norm_with_a_literal_group_count_keeps_its_groups() -> None:
    model = ConvBNAct(FixedGroups()).eval()
    keep = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.float32)
    masks = {"c1": {"weight": keep.view(-1, 1, 1, 1).expand(8, 3, 3, 3).clone(), "bias": keep.clone()},
             "n1": {"weight": keep.clone(), "bias": keep.clone()}}
    r = dp.compact(model, torch.randn(1, 3, 8, 8), masks)
    assert r.model.c1.out_channels == 8
    assert any("group count 4" in b.reason for b in r.blocked)
    _check_parity(model, masks, r.model, (3, 8, 8))


class InstanceNormAffine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(8) + 0.5)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)

    def forward(self, x):
        return F.instance_norm(x, weight=self.weight, bias=self.bias)


def test_functional_instance_norm_is_per_channel() -> None:
    model = ConvBNAct(InstanceNormAffine()).eval()
    masks = _conv_masks()
    r = dp.compact(model, torch.randn(1, 3, 8, 8), masks)
    assert r.model.c1.out_channels == 4 and r.model.n1.weight.shape == (4,)
    _check_parity(model, masks, r.model, (3, 8, 8))


class CachedBiasAttention(nn.Module):
    """LeViT-style: per-head biases gathered with an index buffer and cached on the module in eval mode."""

    def __init__(self, dim: int = 24, heads: int = 4, tokens: int = 5) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.randn(heads, tokens))
        idx = torch.arange(tokens * tokens).reshape(tokens, tokens) % tokens
        self.register_buffer("attention_bias_idxs", idx, persistent=False)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    def biases(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) + self.biases(x.device)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


def test_cached_gathered_head_biases_shrink_with_the_heads_and_leave_no_proxies() -> None:
    model = CachedBiasAttention().eval()
    rows = torch.ones(3, 4, 6)
    rows[:, 1] = 0  # head 1 of q, k and v
    masks = {"qkv": {"weight": rows.reshape(72, 1).expand(72, 24).clone(), "bias": rows.reshape(72).clone()}}
    x = torch.randn(1, 5, 24)
    r = dp.compact(model, x, masks)
    assert r.model.attention_biases.shape == (3, 5) and r.model.num_heads == 3
    assert r.model.qkv.out_features == 54 and r.model.proj.in_features == 18
    for m in (model, r.model):
        assert not any(isinstance(v, torch.fx.Proxy) for v in m.attention_bias_cache.values())
    buf = io.BytesIO()
    torch.save(r.model, buf)  # a Proxy left in the cache could not be pickled
    ref = masked_copy(model, masks)
    with torch.no_grad():
        for batch in (1, 2):
            y = torch.randn(batch, 5, 24)
            assert relative_error(ref(y), r.model(y)) <= RTOL


class Ghost(nn.Module):
    """GhostNet's module: a primary conv and its depthwise copy concatenated, sliced to out_chs."""

    def __init__(self, cin: int, out_chs: int) -> None:
        super().__init__()
        self.out_chs = out_chs
        self.primary = nn.Sequential(nn.Conv2d(cin, out_chs // 2, 1, bias=False), nn.BatchNorm2d(out_chs // 2))
        self.cheap = nn.Sequential(nn.Conv2d(out_chs // 2, out_chs // 2, 3, padding=1, groups=out_chs // 2,
                                             bias=False), nn.BatchNorm2d(out_chs // 2))

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], dim=1)[:, :self.out_chs]


class GhostStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.g1, self.g2 = Ghost(8, 8), Ghost(8, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        s = self.stem(x)
        s = s + self.g1(s)
        s = s + self.g2(F.relu(s))
        return self.head(s)


def test_ghost_modules_sharing_a_stream_are_one_group_and_compact() -> None:
    model = _randomize_norms(GhostStage())
    x = torch.randn(1, 3, 8, 8)
    groups = channel_groups(model, x)
    stream = [g for g in groups if any(m.module == "g1.primary.0" and m.role == "producer" for m in g.members)]
    assert len(stream) == 1
    members = {(m.module, m.dim) for m in stream[0].members if m.role == "producer"}
    assert {("g1.primary.0", 0), ("g2.primary.0", 0), ("stem", 0)} <= members
    masks, removed = group_masks(model, groups, seed=3)
    assert stream[0].id in removed
    r = dp.compact(model, x, masks)
    n = int(removed[stream[0].id].sum())
    assert r.model.g1.primary[0].out_channels == 4 - n and r.model.stem.out_channels == 8 - 2 * n
    assert not r.kept
    _check_parity(model, masks, r.model, (3, 8, 8))
    assert np.isclose(r.removed_channels, r.masked_channels)
