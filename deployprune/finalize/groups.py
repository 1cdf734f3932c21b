"""Coupled channel groups for pruners, computed from finalize's own graph.

Pruner and finalize share one graph: a group is one *space* of the analysis (channels that
must be removed together), listed with every parameter slice that belongs to it. Which
channels of a group can be removed at all is found by analysing a copy of the model in which
every producer slice is zero: what the rules still keep there (model outputs, LayerNorm'd
dimensions, ops without a rule, fixed sizes in forward code) is never removable.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedError
from .graph import Analysis, ChannelGroup, GroupMember
from .rules import apply_rule


def analyze(model: nn.Module, inputs: tuple, kw: dict | None, engine: Any) -> Analysis:
    """Capture ``model`` (eval mode) as finalize does and apply every rule; not solved yet.

    The capture is finalize's own: torch.fx where it sees the whole model, otherwise the recording
    of one eager run, so the pruner offers the groups of library code (transformers' attention with
    item assignment, timm's norm-act layers) that symbolic tracing cannot follow.
    """
    was = model.training
    model.eval()
    try:
        traced, error = engine.capture(model, inputs, kw or {})
        if traced is None:
            raise UnsupportedError(f"structured pruning: {error}; no channel groups can be found")
        a = Analysis(traced, model)
        live = engine.live_nodes(traced.graph) if traced.recorded else None
        for node in traced.graph.nodes:
            if live is None or node in live:
                a.at(node.name)
                apply_rule(a, node)
            else:
                a.vars[node] = None  # read by Python only (a branch, a size)
        a.at("")
    finally:
        model.train(was)
    return a


def _signature(a: Analysis) -> list[tuple[str, Any]]:
    return [(n.op, str(n.target)) for n in a.traced.graph.nodes]


def compute_groups(model: nn.Module, inputs: tuple[Any, ...], kw: dict | None, engine: Any) -> list[ChannelGroup]:
    """``engine`` is finalize's own ``capture``, ``live_nodes`` and ``compact`` (passed in, not imported:
    this module is imported by finalize)."""
    from ..masks import strip_parametrizations_

    base = copy.deepcopy(model)
    strip_parametrizations_(base)
    a = analyze(base, inputs, kw, engine)

    # every producer parameter zeroed: what is still kept can never be removed
    zeroed = copy.deepcopy(base)
    zmods = dict(zeroed.named_modules())
    with torch.no_grad():
        for v in a.param_vars.values():
            if any(a.roles.get(s) == "producer" for s in v.slots):
                for mod_name, attr in v.refs:
                    getattr(zmods[mod_name], attr).zero_()
    z = analyze(zeroed, inputs, kw, engine)
    if _signature(z) != _signature(a):
        # both analyses must number their spaces alike; a recorded run whose Python path depends on
        # the weights' values (``if x.abs().max() > 0``) does not
        raise UnsupportedError(f"structured pruning: {type(model).__name__}'s forward takes another path when "
                               "its weights are zero, so its removable channels cannot be found; "
                               "use element or block granularity for it")
    z.solve()

    by_root: dict[int, list[tuple[Any, int]]] = {}
    for v in a.param_vars.values():
        for d, s in enumerate(v.slots):
            by_root.setdefault(a.find(s), []).append((v, d))
    pin_reason: dict[int, str] = {}
    for p in z.pins:
        reason = p.reason
        if p.blocker is not None:  # name the op, as finalize's kept list does
            b = z.blockers[p.blocker]
            reason = f"{b.reason}: {b.op} (node {b.node}{f' in {b.module!r}' if b.module else ''})"
        pin_reason.setdefault(a.find(p.slot), reason)

    maps, owned, kinds = _index_maps(a, z)

    def has_producer(root: int) -> bool:
        return any(a.roles.get(v.slots[d]) == "producer" for v, d in by_root.get(root, []))

    # chunk/split into equal parts (a fused projection: GPT-2's c_attn.split, Phi-3's gate_up_proj.chunk)
    # couples position p of every part: x's channels p, n + p, ... go together. A group that reaches every
    # part with the same channels (q, k and v of one head; gate and up of one channel) owns x's positions;
    # any other use (a channel split whose halves go different ways, as in ShuffleNet) is not described
    # by groups yet, so those spaces are offered as not prunable rather than over-promised
    splits = [(a.find(rel[1]), [a.find(sl) for sl in rel[2]], a.size[a.find(rel[2][0])])
              for rel in a.relations if rel[0] == "chunk"]
    primaries = [r for r in sorted(set(by_root) | set(maps)) if a.size[r] > 1 and r not in owned]
    # likewise a split and a merge of the same dims in another order (a channel shuffle permutes channels)
    orders: dict[frozenset, set[tuple]] = {}
    singles: dict[frozenset, set[int]] = {}
    for rel in a.relations:
        if rel[0] == "reshape":
            roots = tuple(a.find(sl) for sl, size in zip(rel[2], rel[3], strict=True) if size > 1)
            if len(roots) > 1:
                orders.setdefault(frozenset(roots), set()).add(roots)
                singles.setdefault(frozenset(roots), set()).add(a.find(rel[1]))
    shuffled: set[int] = set()
    for key, seen in orders.items():
        if len(seen) > 1:
            shuffled |= singles[key] | set(key)
    groups: list[ChannelGroup] = []
    reaches = {root: _reach(root, a.size[root], maps) for root in primaries}
    clusters = []
    for roots in _merge_primaries(primaries, reaches):
        reach: dict[int, list | None] = {}  # space -> per-channel index arrays (None = identity)
        for r in roots:
            reach.update(reaches[r])
        owns = _own_splits(reach, a.size[roots[0]], splits, maps)
        clusters.append((roots, reach, owns))
    owned_x = set().union(*(owns for _, _, owns in clusters)) if clusters else set()
    for roots, reach, owns in clusters:
        if set(roots) <= owned_x - owns:
            continue  # a fused projection's output: its channels are listed by the group owning the split
        root = roots[0]
        n = a.size[root]
        if not any(has_producer(r) for r in reach):
            continue
        removable = np.logical_and.reduce([~z.keep_of(r) for r in roots])
        for x in owns:  # and every position of the fused output a unit takes must be removable
            kept_x = z.keep_of(x)
            removable &= np.array([not kept_x[i].any() for i in reach[x]], bool)
        chunked = {s for x, outs, _ in splits if x not in owns for s in [x, *outs]} | shuffled
        if root in kinds:
            unit = kinds[root] if not any(has_producer(r) for r in roots) else "channel"
        else:
            unit = "channel" if any(has_producer(r) for r in [*roots, *owns]) else "head"
        if kinds.get(root) == "head" and any(has_producer(r) for r in reach if r not in roots):
            # heads with a parameter of their own (T5's relative_attention_bias columns) are still heads when
            # the split space is a projection's output (q rows); a flatten of conv channels is not
            unit = "head"
        if chunked & set(reach) or unit == "head_position":
            # positions inside a head: forward code usually derives q, k and v sizes from one head_dim
            removable = np.zeros(n, bool)
        divisions = 1
        for s, g in a.divisions.items():
            if a.find(s) in roots:
                divisions = int(np.lcm(divisions, g))
        group = ChannelGroup(id=len(groups), size=n, prunable=bool(removable.any()),
                             reason=None if removable.any() else (
                                 "positions inside attention heads are kept; remove whole heads"
                                 if unit == "head_position" else
                                 "coupled through a channel split (chunk) or shuffle: not supported by groups yet"
                                 if chunked & set(reach) else pin_reason.get(root, "kept by the graph")),
                             unit=unit)
        group.removable = removable
        group.divisions = divisions
        for r, idx in reach.items():
            for v, d in by_root.get(r, []):
                role = a.roles.get(v.slots[d], "other")
                for mod_name, attr in v.refs:
                    group.members.append(GroupMember(module=mod_name, param=attr, dim=d, indices=idx, role=role))
        groups.append(group)
    _probe_with_compaction(base, inputs, kw or {}, groups, engine.compact)
    return groups


def _probe_with_compaction(model: nn.Module, inputs: tuple, kw: dict, groups: list[ChannelGroup],
                           compact: Any) -> None:
    """Compact the model with every other removable unit of every group masked, and withdraw the groups
    whose channels stay.

    The rules alone cannot see everything compaction meets: a recorded forward that slices a fused
    projection at fixed positions (Phi-3's ``qkv_proj``) is only found when the compacted model is
    re-run. Offering such a group would prune channels finalize must keep, so the probe takes
    finalize's own word for it: a group is offered only if its probe channels are gone from every
    producer afterwards.
    """
    removed: dict[tuple[str, str, int], set[int]] = {}  # (module, param, dim) -> probe channels, all groups
    probed: dict[int, set[tuple[str, str, int]]] = {}  # group id -> the parameter dims it masks
    mods = dict(model.named_modules())
    for g in groups:
        if not g.prunable or g.removable is None:
            continue
        cmap = _channel_map(g.size, g.divisions)
        ok = [u for u in range(len(cmap)) if g.removable[cmap[u]].all()]
        chosen = ok[::2] if len(ok) > 1 else []
        if not chosen:
            continue
        channels = np.sort(np.concatenate([cmap[u] for u in chosen]))
        for m in g.members:
            if m.role != "producer":
                continue
            idx = channels if m.indices is None else np.concatenate([m.indices[c] for c in channels])
            key = (m.module, m.param, m.dim)
            removed.setdefault(key, set()).update(int(i) for i in idx)
            probed.setdefault(g.id, set()).add(key)
    if not probed:
        return
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for (mod_name, pname, dim), idx in removed.items():
        mask = masks.setdefault(mod_name, {}).get(pname)
        if mask is None:
            mask = masks[mod_name][pname] = torch.ones(getattr(mods[mod_name], pname).shape)
        mask.index_fill_(dim, torch.tensor(sorted(idx)), 0.0)
    logger = logging.getLogger("deployprune.finalize")
    level, failure = logger.level, ""
    logger.setLevel(logging.CRITICAL)  # the probe's kept channels are the answer here, not news for the user
    try:
        res = compact(model, (inputs, kw) if kw else inputs, masks)
    except Exception as exc:  # noqa: BLE001 - any failure means compaction cannot remove these channels
        res, failure = None, f"finalize fails on the probe ({type(exc).__name__}: {exc})"
    finally:
        logger.setLevel(level)
    if res is not None and not res.compacted:
        res, failure = None, f"finalize cannot compact this model ({res.abandoned or 'self-check failed'})"
    after = dict(res.model.named_modules()) if res is not None else {}
    kept_why = {k.module: k.reason for k in res.kept} if res is not None else {}
    for g in groups:
        for key in sorted(probed.get(g.id, ())):
            mod_name, pname, dim = key
            if res is not None:  # (fewer is fine: finalize also drops channels that are already all zero)
                p = getattr(after.get(mod_name), pname, None)
                if p is not None and p.shape[dim] <= getattr(mods[mod_name], pname).shape[dim] - len(removed[key]):
                    continue
                failure = kept_why.get(mod_name, f"channels of {mod_name}.{pname} stay when compacted")
            g.prunable = False
            g.removable = np.zeros(g.size, bool)
            g.reason = f"finalize keeps them: {failure}"
            break


def _channel_map(size: int, divisions: int) -> list[np.ndarray]:
    """Channels of each unit: with ``divisions`` blocks, position ``p`` of every block (as the pruner counts)."""
    if divisions <= 1 or size % divisions:
        return [np.array([c]) for c in range(size)]
    per = size // divisions
    return [p + per * np.arange(divisions) for p in range(per)]


def _merge_primaries(primaries: list[int], reaches: dict[int, dict[int, list | None]]) -> list[list[int]]:
    """Spaces whose channels reach the same positions of a shared space in the same way are one group.

    GhostNet: each block of a stage concatenates its primary conv's channels with their depthwise
    copies into the stage's residual stream, so channel k of every block's primary conv is positions
    k and k + C/2 of the same stream: removing it in one block needs it removed in all. (Spaces that
    reach a space with different maps, such as the heads and the head positions of a reshape, or the
    parts of a concat, stay apart.)
    """
    parent = {r: r for r in primaries}

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    by_dst: dict[int, list[tuple[int, list[np.ndarray]]]] = {}
    for r in primaries:
        for dst, idx in reaches[r].items():
            if dst != r and idx is not None:
                by_dst.setdefault(dst, []).append((r, idx))
    for entries in by_dst.values():
        for i in range(1, len(entries)):
            r1, m1 = entries[i]
            for r2, m2 in entries[:i]:
                if find(r1) != find(r2) and len(m1) == len(m2) and all(
                        np.array_equal(x, y) for x, y in zip(m1, m2, strict=True)):
                    parent[find(r1)] = find(r2)
    clusters: dict[int, list[int]] = {}
    for r in primaries:
        clusters.setdefault(find(r), []).append(r)
    return list(clusters.values())


def _index_maps(a: Analysis, z: Analysis) -> tuple[dict[int, list[tuple[int, list[np.ndarray]]]], set[int],
                                                    dict[int, str]]:
    """Space-to-space index maps from concat and reshape relations.

    ``maps[src]`` lists ``(dst, idx)`` where ``idx[k]`` are the indices of ``dst`` that channel ``k``
    of ``src`` becomes. ``owned`` are the spaces whose channels belong to another space's group.
    """
    maps: dict[int, list[tuple[int, list[np.ndarray]]]] = {}
    owned: set[int] = set()
    kinds: dict[int, str] = {}  # spaces made by splitting a dim: "head" (outer) or "head_position" (innermost)
    for rel in a.relations:
        if rel[0] == "cat":
            _, out_slot, parts = rel
            dst = a.find(out_slot)
            for slot, off in parts:
                src = a.find(slot)
                if src != dst:
                    maps.setdefault(src, []).append((dst, [np.array([off + k]) for k in range(a.size[src])]))
                    owned.add(dst)
        elif rel[0] == "grouped":
            # input channel c of a grouped conv is weight column c % (channels per group)
            _, x_slot, w_slot, ig = rel
            src, dst = a.find(x_slot), a.find(w_slot)
            if src != dst:
                maps.setdefault(src, []).append((dst, [np.array([c % ig]) for c in range(a.size[src])]))
                owned.add(dst)
        elif rel[0] == "reshape":
            _, single, multi, sizes = rel
            dst = a.find(single)
            # every removable dim of the multi-dim side owns the single dim's indices with its coordinate
            # (e.g. heads and head positions of a (heads, head_dim) view); removal stays a product set
            free = [i for i, sl in enumerate(multi) if sizes[i] > 1 and not z.keep_of(sl).all()]
            coords = np.indices(sizes).reshape(len(sizes), -1) if free else None
            for i in free:
                src = a.find(multi[i])
                if src == dst:
                    continue
                maps.setdefault(src, []).append((dst, [np.nonzero(coords[i] == k)[0] for k in range(sizes[i])]))
                owned.add(dst)
                if i == len(sizes) - 1:
                    kinds.setdefault(src, "head_position")
                else:
                    kinds[src] = "head"
    return maps, owned, kinds


def _own_splits(reach: dict[int, list | None], n: int, splits: list[tuple[int, list[int], int]],
                maps: dict[int, list[tuple[int, list[np.ndarray]]]]) -> set[int]:
    """Extend ``reach`` (in place) over the equal splits whose every part it reaches with the same
    channels; returns the split inputs it now owns.

    Channel ``k`` of the group is then positions ``i * part + m[k]`` of the split input for every part
    ``i`` (``m[k]``: its indices in each part), and whatever that input maps to further.
    """
    owns: set[int] = set()
    changed = True
    while changed:
        changed = False
        for x, outs, part in splits:
            if x in owns or not all(o in reach for o in outs):
                continue
            ms = [reach[o] if reach[o] is not None else [np.array([k]) for k in range(n)] for o in outs]
            if any(len(m) != len(ms[0]) or not all(np.array_equal(u, v) for u, v in zip(m, ms[0], strict=True))
                   for m in ms[1:]):
                continue
            owns.add(x)
            changed = True
            idx = [np.concatenate([i * part + m for i in range(len(outs))]).astype(int) for m in ms[0]]
            for dst, m in _reach(x, part * len(outs), maps).items():
                composed = idx if m is None else [np.concatenate([m[i] for i in ks]) if len(ks) else np.zeros(0, int)
                                                  for ks in idx]
                if dst in reach and reach[dst] is None:
                    continue  # the group's own root
                old = reach.get(dst)
                reach[dst] = composed if old is None else [np.union1d(o, c).astype(int)
                                                           for o, c in zip(old, composed, strict=True)]
    return owns


def _reach(root: int, n: int, maps: dict[int, list[tuple[int, list[np.ndarray]]]]) -> dict[int, list | None]:
    """Per space reachable from ``root``: the indices each channel of ``root`` becomes there.

    A space reached along several paths (e.g. a concat fed both directly and through a norm)
    gets the union of the paths' indices, so every copy of a channel is listed.
    """
    reach: dict[int, list | None] = {root: None}
    frontier: list[int] = [root]
    while frontier:
        src = frontier.pop()
        idx = reach[src]
        for dst, m in maps.get(src, []):
            if dst == root:
                continue
            composed = m if idx is None else [np.concatenate([m[i] for i in ks]) if len(ks) else np.zeros(0, int)
                                              for ks in idx]
            old = reach.get(dst)
            if old is not None:
                merged = [np.union1d(o, c).astype(int) for o, c in zip(old, composed, strict=True)]
                if all(len(mg) == len(o) for mg, o in zip(merged, old, strict=True)):
                    continue  # nothing new along this path
                composed = merged
            reach[dst] = composed
            frontier.append(dst)
    return reach
