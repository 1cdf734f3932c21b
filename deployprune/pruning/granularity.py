"""Granularities: what a pruning *unit* is, how criterion scores become unit scores, and how a
unit keep-vector becomes parameter masks.

* ``element``: every weight is a unit.
* ``block``: a block of ``block_size`` over the leading weight dims (missing trailing dims and
  -1 span the whole dim). Edge blocks of a dim not divisible by the block size are partial; they
  are scored by their mean contribution and count as one block.
* ``n:m``: n of every m consecutive weights along the input dim (dim 1 of a conv/linear weight,
  dim 0 of a vector) are zeroed. When that dim is not a multiple of m, the last r < m weights of
  each row form a short group in which ``floor(n * r / m)`` are zeroed, so no group is sparser than
  n/m; the layer's final sparsity is then slightly below n/m (exactly n/m when divisible).
* ``channel`` / ``head``: the channels (heads) of a coupled group from the finalize graph; a
  removed channel zeroes every *producer* slice (weight rows, bias, norm weight and bias), so the
  channel is exactly zero and ``finalize`` removes it with all its consumers' input columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .config import ModuleConfig, PrunerConfig
from .criteria import Criterion, ParamView, block_reduce, resolve_block_size


class PrunerLike(Protocol):
    """What a granularity asks of the pruner. :class:`deployprune.pruning.Pruner` provides it;
    this module does not import ``pruner.py`` (which imports this one)."""

    config: PrunerConfig

    def param(self, module_name: str, param_name: str) -> torch.Tensor: ...

    def param_view(self, target: Target, data: Mapping[tuple, Mapping[str, torch.Tensor]]) -> ParamView: ...

    def group_scores(self, target: Target, data: Mapping[tuple, Mapping[str, torch.Tensor]]) -> torch.Tensor: ...


@dataclass
class Target:
    """One allocation target: a layer parameter, or a coupled channel/head group."""

    name: str
    kind: str  # "param" or "group"
    config: ModuleConfig
    criterion: Criterion
    granularity: Granularity
    module_name: str = ""
    param_name: str = ""
    module_type: str = ""
    group: Any = None
    final_sparsity: float = 0.0
    units: int = 0
    unit_shape: tuple[int, ...] = ()
    modules: list[str] = field(default_factory=list)  # modules whose config selected this target
    channel_map: torch.Tensor | None = None  # group targets: [units, channels per unit]

    def masked_params(self, mask_consumers: bool = False) -> list[tuple[str, str]]:
        if self.kind == "param":
            return [(self.module_name, self.param_name)]
        roles = ("producer", "consumer") if mask_consumers else ("producer",)
        out = []
        for m in self.group.members:
            if m.role in roles and (m.module, m.param) not in out:
                out.append((m.module, m.param))
        return out


class Granularity:
    """Base class; see the module docstring for the built-ins."""

    name = ""
    structured = False

    def setup(self, target: Target, pruner: PrunerLike) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def scores(self, target: Target, pruner: PrunerLike, data: dict, prior_keep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def expand(self, target: Target, pruner: PrunerLike, keep: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        raise NotImplementedError  # pragma: no cover


class ElementGranularity(Granularity):
    name = "element"

    def setup(self, target: Target, pruner: PrunerLike) -> None:
        shape = tuple(pruner.param(target.module_name, target.param_name).shape)
        target.unit_shape = shape
        target.units = math.prod(shape)
        target.final_sparsity = target.config.effective_target

    def scores(self, target: Target, pruner: PrunerLike, data: dict, prior_keep: torch.Tensor) -> torch.Tensor:
        view = pruner.param_view(target, data)
        return target.criterion.element_scores(view).reshape(-1).to(torch.float64)

    def expand(self, target: Target, pruner: PrunerLike, keep: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        return {(target.module_name, target.param_name): keep.reshape(target.unit_shape)}


class BlockGranularity(Granularity):
    name = "block"

    def setup(self, target: Target, pruner: PrunerLike) -> None:
        shape = tuple(pruner.param(target.module_name, target.param_name).shape)
        sizes = resolve_block_size(shape, target.config.block_size)  # type: ignore[arg-type]
        target.unit_shape = tuple(-(-s // b) for s, b in zip(shape, sizes, strict=True))
        target.units = math.prod(target.unit_shape)
        target.final_sparsity = target.config.effective_target

    def scores(self, target: Target, pruner: PrunerLike, data: dict, prior_keep: torch.Tensor) -> torch.Tensor:
        view = pruner.param_view(target, data)
        return target.criterion.block_scores(view, target.config.block_size).reshape(-1).to(torch.float64)

    def expand(self, target: Target, pruner: PrunerLike, keep: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        shape = tuple(pruner.param(target.module_name, target.param_name).shape)
        return {(target.module_name, target.param_name): expand_blocks(keep.reshape(target.unit_shape), shape,
                                                                        target.config.block_size)}

    @staticmethod
    def unit_keep_from_mask(mask: torch.Tensor, block_size: tuple[int, ...]) -> torch.Tensor:
        total, _ = block_reduce(mask.to(torch.float64), block_size)
        return total > 0


def expand_blocks(grid: torch.Tensor, shape: tuple[int, ...], block_size: tuple[int, ...]) -> torch.Tensor:
    sizes = resolve_block_size(shape, block_size)
    out = grid
    for d, b in enumerate(sizes):
        out = out.repeat_interleave(b, dim=d)
    return out[tuple(slice(0, s) for s in shape)].contiguous()


class NMGranularity(Granularity):
    name = "n:m"

    @staticmethod
    def _layout(shape: tuple[int, ...]) -> int:
        return 1 if len(shape) >= 2 else 0

    def setup(self, target: Target, pruner: PrunerLike) -> None:
        shape = tuple(pruner.param(target.module_name, target.param_name).shape)
        n, m = target.config.n_m_ratio  # type: ignore[misc]
        d = self._layout(shape)
        length = shape[d] if shape else 1
        rows = math.prod(shape) // max(length, 1)
        per_row = n * (length // m) + (n * (length % m)) // m
        target.unit_shape = shape
        target.units = math.prod(shape)
        target.final_sparsity = rows * per_row / target.units if target.units else 0.0

    def scores(self, target: Target, pruner: PrunerLike, data: dict, prior_keep: torch.Tensor) -> torch.Tensor:
        view = pruner.param_view(target, data)
        e = target.criterion.element_scores(view).to(torch.float64)
        shape = tuple(e.shape)
        n, m = target.config.n_m_ratio  # type: ignore[misc]
        d = self._layout(shape)
        x = e.movedim(d, -1)
        pruned_before = (~prior_keep.reshape(shape)).movedim(d, -1)
        length = x.shape[-1]
        pad = (-length) % m
        key = torch.where(pruned_before, -math.inf, x)
        key = torch.nn.functional.pad(key, (0, pad), value=math.inf)
        blocks = key.reshape(*key.shape[:-1], -1, m)
        rank = torch.argsort(torch.argsort(blocks, dim=-1, stable=True), dim=-1)
        nb = blocks.shape[-2]
        allowed = torch.full((nb,), n, dtype=torch.long)
        if pad:
            allowed[-1] = (n * (m - pad)) // m
        candidate = (rank < allowed.unsqueeze(-1)).reshape(*key.shape[:-1], -1)[..., :length]
        out = torch.where(candidate, x, math.inf).movedim(-1, d)
        return out.reshape(-1)

    def expand(self, target: Target, pruner: PrunerLike, keep: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        return {(target.module_name, target.param_name): keep.reshape(target.unit_shape)}


class GroupGranularity(Granularity):
    """Channels (or heads) of a coupled group; see :meth:`Pruner.group_scores`.

    When grouped convolutions read the group (``group.divisions = g > 1``), a unit is one
    *position* of the g equal blocks: channels ``p, p + C/g, ...`` are removed together, so every
    convolution group loses the same positions. Channels the graph marks as not removable
    (``group.removable``) are never chosen.
    """

    structured = True

    def __init__(self, name: str) -> None:
        self.name = name

    @staticmethod
    def channel_map(group: Any) -> torch.Tensor:
        """``[units, channels per unit]`` channel indices."""
        size = int(group.size)
        div = int(getattr(group, "divisions", 1) or 1)
        if div <= 1 or size % div:
            return torch.arange(size).reshape(size, 1)
        per = size // div
        return (torch.arange(per).reshape(per, 1) + per * torch.arange(div).reshape(1, div))

    def setup(self, target: Target, pruner: PrunerLike) -> None:
        cmap = self.channel_map(target.group)
        target.channel_map = cmap
        target.units = int(cmap.shape[0])
        target.unit_shape = (target.units,)
        target.final_sparsity = target.config.effective_target

    def scores(self, target: Target, pruner: PrunerLike, data: dict, prior_keep: torch.Tensor) -> torch.Tensor:
        channel = pruner.group_scores(target, data)
        cmap = target.channel_map
        unit = channel[cmap].mean(1)
        removable = getattr(target.group, "removable", None)
        if removable is not None:
            ok = torch.as_tensor(np.asarray(removable, dtype=bool))[cmap].all(1)
            unit = torch.where(ok, unit, math.inf)
        return unit

    def expand(self, target: Target, pruner: PrunerLike, keep: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        pruned = target.channel_map[~keep].reshape(-1).sort().values.tolist()
        out: dict[tuple[str, str], torch.Tensor] = {}
        roles = ("producer", "consumer") if pruner.config.mask_consumers else ("producer",)
        for member in target.group.members:
            if member.role not in roles:
                continue
            key = (member.module, member.param)
            p = pruner.param(member.module, member.param)
            mask = out.get(key)
            if mask is None:
                mask = torch.ones(p.shape, dtype=torch.bool)
            if pruned:
                if member.indices is None:
                    rows = torch.as_tensor(pruned, dtype=torch.long)
                else:
                    rows = torch.as_tensor(np.concatenate([np.asarray(member.indices[k], dtype=np.int64).reshape(-1)
                                                           for k in pruned]), dtype=torch.long)
                dim = member.dim if p.ndim > 0 else 0
                mask.index_fill_(dim, rows, False)
            out[key] = mask
        return out


def make_granularity(config: ModuleConfig) -> Granularity:
    g = config.granularity
    if g == "element":
        return ElementGranularity()
    if g == "block":
        return BlockGranularity()
    if g == "n:m":
        return NMGranularity()
    return GroupGranularity(g)
