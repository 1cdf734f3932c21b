"""What removing every masked channel group should leave, computed without finalize's graph.

A slice of a parameter (one index along one of its dimensions) can go when it is masked to zero, or
when the masked model's output no longer depends on it although the dense model's does: a weight
column that reads a zeroed channel, the row of a layer whose output only feeds zeroed channels, the
attention-bias rows of a removed head. "Depends on" is measured with gradients: the sum over a few
random inputs of |d(random projection of the outputs)/d(slice)|, exactly zero for a slice that only
meets exact zeros.

Gradients can also vanish for reasons that are data, not structure: a ReLU that is off for every
probe, a sigmoid gate saturated at 0 or 1, softmax weights that underflow, the shift invariance of
softmax (a key bias has a mathematically zero gradient). The probe therefore runs a *structural*
version of both models: activations with f(0) = 0 (ReLU, ReLU6, hardswish, SiLU, GELU ...) act as
the identity, sigmoid-like gates as a bounded map that never saturates (0.5 + 0.5 tanh(x / c), c a
bound on |x|: 0.5 at 0, as the gates give), and softmax (also inside
``scaled_dot_product_attention`` and ``nn.MultiheadAttention``) as a bounded, unnormalized affine
weighting. Exact zeros stay exact zeros through all of these, so what is removable is unchanged,
while nothing dies by chance. Slices that the dense model does not use either (kernel taps that only
ever read padding on a small input, relative-position-table rows a small window never indexes) are
not counted: compaction by masks does not remove them.

The expected shape of a parameter is its shape with the removable indices of every dimension taken
out (channel removal keeps a product structure: rows x columns).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# piecewise activations with f(0) = 0: the identity keeps zeros and never switches a channel off
_AS_IDENTITY = {
    F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu6, F.hardtanh,
    F.hardtanh_, F.hardswish, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.celu, F.selu, torch.clamp,
    torch.Tensor.clamp, torch.Tensor.clamp_, torch.clamp_min, torch.Tensor.clamp_min, torch.Tensor.clamp_min_,
}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}
# gates with f(0) = 1/2 that saturate at exactly 0 or 1
_GATES = {F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.Tensor.sigmoid, torch.Tensor.sigmoid_}
_AS_IDENTITY |= {F.silu, F.gelu, F.mish}


def _gate(x: torch.Tensor) -> torch.Tensor:
    return 0.5 + 0.5 * torch.tanh(x / (x.detach().abs().amax() + 1))


def _scores(s: torch.Tensor, dim: int) -> torch.Tensor:
    """softmax -> (1 + s / c) / n, c a detached bound on |s| along ``dim``: a constant added along
    ``dim`` still changes the result, no weight is zero by data, and the scale stays bounded."""
    masked = torch.isneginf(s)
    finite = torch.where(masked, torch.zeros_like(s), s)
    c = finite.detach().abs().amax(dim=dim, keepdim=True) + 1
    return torch.where(masked, torch.zeros_like(s), (1 + finite / c) / s.shape[dim])


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor:
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    s = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return _scores(s, -1) @ v


def _multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, embed_dim: int,
                          num_heads: int, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor | None,
                          bias_k: Any, bias_v: Any, add_zero_attn: bool, dropout_p: float,
                          out_proj_weight: torch.Tensor, out_proj_bias: torch.Tensor | None, *args: Any,
                          **kwargs: Any) -> tuple[torch.Tensor, None] | None:
    """nn.MultiheadAttention's computation with the structural scores; None for the variants this
    probe does not need (separate projections, bias_k/v, masks), which then run as they are."""
    extra = dict(zip(("training", "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight"),
                     args, strict=False)) | kwargs
    if (bias_k is not None or add_zero_attn or extra.get("key_padding_mask") is not None
            or extra.get("attn_mask") is not None or extra.get("use_separate_proj_weight") or query.dim() != 3
            or extra.get("is_causal")):
        return None
    L, N, E = query.shape
    hd = E // num_heads
    wq, wk, wv = in_proj_weight.chunk(3)
    bq, bk, bv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)

    def heads(t: torch.Tensor) -> torch.Tensor:  # (L, N, E) -> (N * H, L, hd)
        return t.reshape(t.shape[0], N * num_heads, hd).transpose(0, 1)

    q, k, v = heads(F.linear(query, wq, bq)), heads(F.linear(key, wk, bk)), heads(F.linear(value, wv, bv))
    out = _scores(q @ k.transpose(-2, -1) * hd ** -0.5, -1) @ v
    return F.linear(out.transpose(0, 1).reshape(L, N, E), out_proj_weight, out_proj_bias), None


class Structural(TorchFunctionMode):
    """Runs a model with the data-dependent zeros of its nonlinearities taken out (see module doc)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _AS_IDENTITY:
            return args[0]
        if func in _GATES:
            return _gate(args[0])
        if func in _SOFTMAX:
            return _scores(args[0], kwargs.get("dim", args[1] if len(args) > 1 else -1))
        if func is F.scaled_dot_product_attention:
            return _attention(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            out = _multi_head_attention(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat(v)]
    return []


def _gradient_mass(model: nn.Module, probes: Sequence[tuple[torch.Tensor, ...]], seed: int
                   ) -> dict[str, torch.Tensor]:
    """Per parameter, sum over the probes of |d(random projection of the outputs)/d(parameter)|."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    # one backward over every probe: modules that cache tensors in eval mode (LeViT's attention
    # biases) share them between calls
    with Structural():
        for x in probes:
            for o in _flat(model(*x)):
                loss = loss + (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum()
    loss.backward()
    mass = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in the structural probe"
            mass[name] = p.grad.abs()
    return mass


def removable_slices(dense: nn.Module, masked: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]],
                     probes: Sequence[tuple[torch.Tensor, ...]], seed: int = 0) -> dict[str, dict[int, torch.Tensor]]:
    """Per parameter name, per dimension, a bool vector of the indices removing the masks frees."""
    dense_mass = _gradient_mass(dense, probes, seed)
    masked_mass = _gradient_mass(masked, probes, seed)
    out: dict[str, dict[int, torch.Tensor]] = {}
    for name, p in dense.named_parameters():
        mod_name, _, attr = name.rpartition(".")
        mask = masks.get(mod_name, {}).get(attr)
        per: dict[int, torch.Tensor] = {}
        for d in range(p.dim()):
            if p.shape[d] <= 1:
                continue
            other = tuple(i for i in range(p.dim()) if i != d)
            free = torch.zeros(p.shape[d], dtype=torch.bool)
            if name in dense_mass and name in masked_mass:
                gd, gm = dense_mass[name], masked_mass[name]
                along_d = gd.amax(dim=other) if other else gd
                along_m = gm.amax(dim=other) if other else gm
                # relative to the parameter's largest gradient: rounding noise is not a dependence
                free = (along_m <= 1e-9 * float(gm.max())) & (along_d > 1e-9 * float(gd.max()))
            if mask is not None:
                zero = torch.as_tensor(mask) == 0
                free |= zero.all(dim=other) if other else zero
            if free.any():
                per[d] = free
        out[name] = per
    return out


def expected_shapes(dense: nn.Module, removable: Mapping[str, Mapping[int, torch.Tensor]]) -> dict[str, tuple]:
    return {name: tuple(s - int(removable[name][d].sum()) if d in removable[name] else s
                        for d, s in enumerate(p.shape))
            for name, p in dense.named_parameters()}


def expected_count(shapes: Mapping[str, tuple]) -> int:
    return sum(math.prod(s) for s in shapes.values())
