"""Shared helpers for the finalize tests: masks, masked reference models, parity and accounting.

Everything that decides whether finalize is right is computed here independently of the
engine: the masked reference model is a plain copy with its parameters multiplied by the masks,
and the expected parameter count of a group-pruned model is derived from the group members.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from deployprune import zoo
from deployprune.finalize import ChannelGroup

Masks = dict[str, dict[str, torch.Tensor]]

# relative max error allowed between the compacted and the masked model (fp32)
RTOL = 1e-5

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")


# ---------------------------------------------------------------------------- masks


def output_channels(module: nn.Module) -> int | None:
    """Number of output channels of a layer these tests mask, None for other modules."""
    if isinstance(module, CONV + CONV_T):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, BATCHNORM):
        return module.num_features if module.affine else None
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight.shape[0] if module.in_proj_weight is not None else None
    return None


def channel_mask(module: nn.Module, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """NNI masks that zero the output channels where ``keep`` is 0 (weight rows and bias)."""
    keep = keep.float()
    out: dict[str, torch.Tensor] = {}
    if isinstance(module, CONV + (nn.Linear,)):
        w = module.weight
        out["weight"] = keep.view(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()
        if module.bias is not None:
            out["bias"] = keep.clone()
    elif isinstance(module, CONV_T):
        # weight is (in, out // groups, *k): output channel g * (out // groups) + j lives in
        # rows of group g, column j
        w = module.weight
        groups = module.groups
        per_in, per_out = w.shape[0] // groups, w.shape[1]
        m = torch.ones_like(w)
        for c in torch.nonzero(keep == 0).flatten().tolist():
            g, j = divmod(c, per_out)
            m[g * per_in:(g + 1) * per_in, j] = 0
        out["weight"] = m
        if module.bias is not None:
            out["bias"] = keep.clone()
    elif isinstance(module, BATCHNORM):
        out["weight"] = keep.clone()
        out["bias"] = keep.clone()
    elif isinstance(module, nn.MultiheadAttention):
        w = module.in_proj_weight
        out["in_proj_weight"] = keep.view(-1, 1).expand_as(w).clone()
        if module.in_proj_bias is not None:
            out["in_proj_bias"] = keep.clone()
    else:  # pragma: no cover - callers only pass layers output_channels() accepts
        raise TypeError(type(module).__name__)
    return out


def maskable_layers(model: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    skip = set(skip)
    return [name for name, m in model.named_modules()
            if name and name not in skip and output_channels(m)]


def random_channel_masks(model: nn.Module, *, seed: int, ratio: float = 0.5,
                         skip: Iterable[str] = (), only: Iterable[str] | None = None,
                         weight_only: bool = False) -> Masks:
    """Seeded masks removing about ``ratio`` (at least one) of the output channels of each maskable layer."""
    g = torch.Generator().manual_seed(seed)
    names = set(only) if only is not None else None
    modules = dict(model.named_modules())
    masks: Masks = {}
    for name in maskable_layers(model, skip):
        if names is not None and name not in names:
            continue
        m = modules[name]
        n = output_channels(m)
        keep = (torch.rand(n, generator=g) >= ratio).float()
        if keep.all():  # a small layer drew no zero: remove one channel anyway
            keep[int(torch.randint(n, (1,), generator=g))] = 0.0
        per = channel_mask(m, keep)
        if weight_only:
            per = {k: v for k, v in per.items() if "bias" not in k}
        masks[name] = per
    return masks


def masked_copy(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> nn.Module:
    """The reference: a copy of ``model`` with every masked parameter multiplied by its mask."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for mod_name, per in masks.items():
            for pname, mask in per.items():
                p = getattr(modules[mod_name], pname)
                p.mul_(torch.as_tensor(mask).to(p.dtype))
    return ref.eval()


def group_masks(model: nn.Module, groups: list[ChannelGroup], *, seed: int,
                ratio: float = 0.5) -> tuple[Masks, dict[int, np.ndarray]]:
    """Masks a pruner would produce from ``groups``: per prunable group, ``ratio`` of its removable
    channels (the same positions in every block when ``divisions`` > 1), every producer slice zeroed.

    Returns the masks and, per group id, the boolean vector of removed channels.
    """
    rng = np.random.default_rng(seed)
    params = dict(model.named_parameters())
    masks: Masks = {}
    removed: dict[int, np.ndarray] = {}
    for g in groups:
        if not g.prunable or g.removable is None:
            continue
        d = max(int(g.divisions), 1)
        assert g.size % d == 0, f"group {g.id}: size {g.size} not divisible by divisions {d}"
        per = g.size // d
        ok = np.asarray(g.removable, bool).reshape(d, per).all(axis=0)
        cand = np.flatnonzero(ok)
        k = int(len(cand) * ratio)
        if k == 0:
            continue
        chosen = np.sort(rng.choice(cand, size=k, replace=False))
        sel = np.zeros(g.size, bool)
        for block in range(d):
            sel[block * per + chosen] = True
        removed[g.id] = sel
        idx = torch.as_tensor(np.flatnonzero(sel))
        for mem in g.producers():
            key = f"{mem.module}.{mem.param}" if mem.module else mem.param
            p = params.get(key)
            if p is None:
                continue  # a buffer: not maskable, and zeroing producers suffices
            mask = masks.setdefault(mem.module, {}).setdefault(mem.param, torch.ones_like(p))
            positions = _member_positions(mem, idx, p.shape[mem.dim])
            mask.index_fill_(mem.dim, positions, 0.0)
    return masks, removed


def _member_positions(mem: Any, channels: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Positions along the member's dimension that hold the group's ``channels``.

    ``indices`` None: the dimension is the group's space itself. Otherwise ``indices[k]`` lists
    the positions of the dimension that group channel ``k`` occupies (concat offsets, the
    ``head_dim`` positions of a head, the pixels of a flattened channel).
    """
    if mem.indices is None:
        assert dim_size >= int(channels.max()) + 1 if len(channels) else True, (
            f"{mem.module}.{mem.param} dim {mem.dim} (size {dim_size}) is smaller than its group")
        return channels
    pos = [torch.as_tensor(np.asarray(mem.indices[int(k)], dtype=np.int64)).reshape(-1) for k in channels]
    return torch.cat(pos) if pos else channels[:0]


def expected_param_shapes(model: nn.Module, groups: list[ChannelGroup],
                          removed: Mapping[int, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Per parameter name, the shape removing ``removed`` channels of each group implies.

    Every (module, param, dim) that is a member of a group loses the removed positions.
    """
    modules = dict(model.named_modules())
    by_id: dict[int, str] = {}
    for name, p in model.named_parameters():
        by_id.setdefault(id(p), name)
    lost: dict[str, dict[int, set[int]]] = {}
    for g in groups:
        sel = removed.get(g.id)
        if sel is None:
            continue
        channels = torch.as_tensor(np.flatnonzero(sel))
        for mem in g.members:
            t = getattr(modules.get(mem.module), mem.param, None) if mem.module in modules else None
            if not isinstance(t, nn.Parameter) or id(t) not in by_id:
                continue
            pos = _member_positions(mem, channels, t.shape[mem.dim])
            lost.setdefault(by_id[id(t)], {}).setdefault(mem.dim, set()).update(int(i) for i in pos)
    shapes = {}
    for name, p in model.named_parameters():
        per_dim = lost.get(name, {})
        shapes[name] = tuple(s - len(per_dim.get(d, ())) for d, s in enumerate(p.shape))
    return shapes


def param_count(model: nn.Module) -> int:
    """Parameters of ``model``, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates


def param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------- parity


def flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flat_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flat_outputs(v)]
    return []


def relative_error(ref: Any, out: Any) -> float:
    """max |out - ref| / max |ref| over every output tensor, in float64 (inf on a shape mismatch)."""
    r, o = flat_outputs(ref), flat_outputs(out)
    assert r, "the reference produced no tensor output"
    if len(r) != len(o) or any(x.shape != y.shape for x, y in zip(r, o, strict=True)):
        return math.inf
    err = max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(r, o, strict=True))
    scale = max(float(x.detach().double().abs().max()) for x in r)
    if err == 0.0:
        return 0.0
    return err / scale if scale > 0 else math.inf


def parity_inputs(name: str) -> list[tuple[torch.Tensor, ...]]:
    """Two seeded random inputs of the example shape at batch 1, and the same at batch 2."""
    return [zoo.example_inputs(name, batch=b, seed=s) for b in (1, 2) for s in (101, 202)]


def parity_errors(reference: nn.Module, compacted: nn.Module,
                  inputs: list[tuple[torch.Tensor, ...]]) -> list[float]:
    errs = []
    with torch.no_grad():
        for x in inputs:
            errs.append(relative_error(reference(*x), compacted(*x)))
    return errs


# ---------------------------------------------------------------------------- model state


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything finalize must leave alone: bytes of the state_dict, hooks, flags, parametrizations."""
    return {
        "state": {k: (v.dtype, tuple(v.shape), v.detach().contiguous().clone()) for k, v in model.state_dict().items()},
        "hooks": {name: tuple(len(getattr(m, h)) for h in HOOK_DICTS) for name, m in model.named_modules()},
        "training": {name: m.training for name, m in model.named_modules()},
        "parametrized": {name for name, m in model.named_modules() if parametrize.is_parametrized(m)},
        "param_ids": [id(p) for p in model.parameters()],
        "types": {name: type(m) for name, m in model.named_modules()},
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t.reshape(-1)


def assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k, (dtype, shape, t) in before["state"].items()
               if after["state"][k][0] != dtype or after["state"][k][1] != shape
               or not torch.equal(_bits(after["state"][k][2]), _bits(t))]
    assert not changed, f"finalize modified the input model's state: {changed[:5]}"
    assert after["hooks"] == before["hooks"], "finalize added or removed hooks on the input model"
    assert after["training"] == before["training"], "finalize changed train/eval flags of the input model"
    assert after["parametrized"] == before["parametrized"], "finalize added parametrizations to the input model"
    assert after["param_ids"] == before["param_ids"], "finalize replaced parameters of the input model"
    assert after["types"] == before["types"], "finalize replaced modules of the input model"


def assert_plain_tree(compacted: nn.Module, original: nn.Module, *, allow_graph_modules: bool = False) -> None:
    """A plain module tree: the user's classes and torch.nn, same names, no hooks or parametrizations.

    ``allow_graph_modules``: a submodule may instead be a torch.fx GraphModule carrying the original
    class name (finalize re-emits forward code whose sizes are literals, e.g. attention with fewer heads).
    """
    import torch.fx

    assert not isinstance(compacted, torch.fx.GraphModule)
    foreign = [f"{n}: {type(m).__module__}.{type(m).__qualname__}" for n, m in compacted.named_modules()
               if type(m).__module__.split(".")[0] == "deployprune"
               and not type(m).__module__.startswith("deployprune.zoo")]  # the zoo is the user's code here
    assert not foreign, f"deployprune classes in the compacted model: {foreign}"
    orig = {n: type(m) for n, m in original.named_modules()}
    new = {n: type(m) for n, m in compacted.named_modules()}
    assert new.keys() == orig.keys(), (
        f"module names changed: missing {sorted(orig.keys() - new.keys())[:5]}, "
        f"new {sorted(new.keys() - orig.keys())[:5]}")
    retyped = {n: (orig[n].__name__, new[n].__name__) for n in orig if orig[n] is not new[n]
               # torch's own subclasses rebuilt as their torch.nn base (NonDynamicallyQuantizableLinear -> Linear)
               and not (orig[n].__module__.startswith("torch.nn") and new[n].__module__.startswith("torch.nn")
                        and issubclass(orig[n], new[n]))}
    if allow_graph_modules:
        retyped = {n: v for n, v in retyped.items()
                   if not (issubclass(new[n], torch.fx.GraphModule) and new[n].__name__ == orig[n].__name__)}
    assert not retyped, f"module classes changed: {retyped}"
    hooked = [n for n, m in compacted.named_modules() if any(len(getattr(m, h)) for h in HOOK_DICTS)]
    assert not hooked, f"hooks left on {hooked[:5]}"
    parametrized = [n for n, m in compacted.named_modules() if parametrize.is_parametrized(m)]
    assert not parametrized, f"parametrizations left on {parametrized[:5]}"
    dtypes = {p.dtype for p in compacted.parameters()} | {b.dtype for b in compacted.buffers() if b.is_floating_point()}
    orig_dtypes = {p.dtype for p in original.parameters()} | {
        b.dtype for b in original.buffers() if b.is_floating_point()}
    assert dtypes <= orig_dtypes, f"dtypes changed: {dtypes} vs {orig_dtypes}"
