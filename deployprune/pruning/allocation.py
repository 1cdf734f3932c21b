"""Sparsity allocation (the third piece): from unit scores to the units kept.

An allocator receives one :class:`AllocationRequest` per pruning target (a layer's parameter
for element/block/n:m, a coupled channel group for channel/head) and returns, per target, a flat
boolean ``keep`` vector over its units. The default allocator:

* per layer: prunes exactly ``round(sparsity * units)`` units with the lowest scores;
* global (targets sharing a ``global_group``): ranks all units of the group together and prunes
  ``round(sparsity * total units)``, never more than ``max_sparsity`` of any one target;
* ``round_to``: the number of channels/heads kept is rounded *up* to a multiple (never above
  the original count), so the achieved sparsity can be slightly below the requested one;
* monotone masks: units pruned at an earlier update are pruned first (as in Zhu & Gupta), so
  a rising schedule never revives a unit; if the sparsity falls, the best of them come back.

Scores of ``+inf`` mark units that cannot be pruned (n:m keeps them out of reach).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ._util import count_for
from .registry import Registry

ALLOCATORS: Registry[type[SparsityAllocator]] = Registry("sparsity allocator", "allocator")


def register_allocator(name: str, *, replace: bool = False):
    """Decorator: make a :class:`SparsityAllocator` subclass available as ``"allocator": name``."""
    return ALLOCATORS.register(name, replace=replace)


@dataclass
class AllocationRequest:
    name: str  # target name (for messages)
    scores: torch.Tensor  # flat float64, one per unit; +inf = not prunable
    sparsity: float  # fraction of units to prune now (per target, or of the pool's total)
    prior_keep: torch.Tensor  # flat bool, the units kept after the previous update
    round_to: int = 1
    max_sparsity: float | None = None
    pool: str | None = None  # global group name
    unit_shape: tuple[int, ...] | None = None  # the unit grid (block grid, weight shape, channels)

    @property
    def units(self) -> int:
        return int(self.scores.numel())


class SparsityAllocator:
    """Base class: ``allocate(requests) -> {request.name: flat bool keep}``."""

    def allocate(self, requests: list[AllocationRequest]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


def prune_order(scores: torch.Tensor, prior_keep: torch.Tensor) -> torch.Tensor:
    """Unit indices in pruning order: previously pruned first, then by ascending score (stable);
    units with a score of +inf (unprunable) last."""
    s = torch.nan_to_num(scores.to(torch.float64), nan=0.0, posinf=math.inf, neginf=-math.inf)
    by_score = torch.sort(s, stable=True).indices
    prunable = torch.isfinite(s)
    rank_key = torch.where(prunable, torch.where(prior_keep, 1, 0), 2)
    return by_score[torch.sort(rank_key[by_score], stable=True).indices]


def round_kept(units: int, pruned: int, round_to: int) -> int:
    """Number pruned after rounding the number kept up to a multiple of ``round_to``."""
    if round_to <= 1 or pruned <= 0:
        return pruned
    kept = units - pruned
    kept = min(units, max(round_to, -(-kept // round_to) * round_to))
    return units - kept


@register_allocator("default")
class DefaultAllocator(SparsityAllocator):
    """Per-layer exact counts, global ranking per ``global_group``, ``max_sparsity``, ``round_to``."""

    def allocate(self, requests: list[AllocationRequest]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        pools: dict[str, list[AllocationRequest]] = {}
        for r in requests:
            if r.pool is None:
                out[r.name] = self._per_layer(r)
            else:
                pools.setdefault(r.pool, []).append(r)
        for name, members in pools.items():
            out.update(self._global(name, members))
        return out

    @staticmethod
    def _per_layer(r: AllocationRequest) -> torch.Tensor:
        keep = torch.ones(r.units, dtype=torch.bool)
        prunable = int(torch.isfinite(r.scores).sum())
        k = min(count_for(r.sparsity, r.units), prunable)
        k = round_kept(r.units, k, r.round_to)
        if k > 0:
            keep[prune_order(r.scores, r.prior_keep)[:k]] = False
        return keep

    @staticmethod
    def _global(pool: str, members: list[AllocationRequest]) -> dict[str, torch.Tensor]:
        sparsities = {round(m.sparsity, 12) for m in members}
        if len(sparsities) > 1:
            raise ConfigError(f"global_group {pool!r}: its layers resolve to different sparsities "
                              f"{sorted(sparsities)}; give one target_sparsity per global group")
        sparsity = members[0].sparsity
        total = sum(m.units for m in members)
        k_total = count_for(sparsity, total)
        caps = []
        for m in members:
            prunable = int(torch.isfinite(m.scores).sum())
            cap = m.units if m.max_sparsity is None else int(math.floor(m.max_sparsity * m.units + 1e-9))
            caps.append(min(cap, prunable))
        if sum(caps) < k_total:
            raise ConfigError(f"global_group {pool!r}: sparsity {sparsity:g} needs {k_total} of {total} units "
                              f"pruned but max_sparsity allows only {sum(caps)}; raise max_sparsity or lower "
                              "target_sparsity")
        # Order every member's units, then merge by (previously pruned, score).
        keys, ids = [], []
        for i, m in enumerate(members):
            order = prune_order(m.scores, m.prior_keep)
            s = torch.nan_to_num(m.scores.to(torch.float64), nan=0.0, posinf=math.inf, neginf=-math.inf)[order]
            flag = torch.where(m.prior_keep[order] | ~torch.isfinite(s), 1.0, 0.0)
            keys.append(torch.stack([flag, s], 1))
            ids.append(torch.full((m.units,), i, dtype=torch.long))
        key = torch.cat(keys).numpy()
        id_all = torch.cat(ids).numpy()
        merged = np.lexsort((key[:, 1], key[:, 0]))  # stable: primary flag, then score
        id_o = id_all[merged]
        # rank of each unit within its member, in merged order
        perm = np.argsort(id_o, kind="stable")
        sorted_ids = id_o[perm]
        starts = np.searchsorted(sorted_ids, sorted_ids, side="left")
        rank = np.empty_like(perm)
        rank[perm] = np.arange(len(perm)) - starts
        caps_arr = np.asarray(caps)
        accepted = merged[rank < caps_arr[id_o]][:k_total]
        counts = np.bincount(id_all[accepted], minlength=len(members))
        out: dict[str, torch.Tensor] = {}
        for i, m in enumerate(members):
            k = round_kept(m.units, int(counts[i]), m.round_to)
            keep = torch.ones(m.units, dtype=torch.bool)
            if k > 0:
                keep[prune_order(m.scores, m.prior_keep)[:k]] = False
            out[m.name] = keep
        return out
