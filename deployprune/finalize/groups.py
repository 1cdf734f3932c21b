"""Coupled channel groups for pruners, computed from finalize's own graph.

Pruner and finalize share one graph: a group is one *space* of the analysis (channels that
must be removed together), listed with every parameter slice that belongs to it. Which
channels of a group can be removed at all is found by analysing a copy of the model in which
every producer slice is zero: what the rules still keep there (model outputs, LayerNorm'd
dimensions, ops without a rule, fixed sizes in forward code) is never removable.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from .graph import Analysis, ChannelGroup, GroupMember
from .rules import apply_rule
from .trace import trace


def analyze(model: nn.Module, inputs: tuple) -> Analysis:
    """Trace ``model`` (eval mode) and apply every rule; not solved yet."""
    was = model.training
    model.eval()
    try:
        traced = trace(model, inputs)
        a = Analysis(traced, model)
        for node in traced.graph.nodes:
            apply_rule(a, node)
    finally:
        model.train(was)
    return a


def compute_groups(model: nn.Module, inputs: tuple[Any, ...]) -> list[ChannelGroup]:
    from ..masks import strip_parametrizations_

    base = copy.deepcopy(model)
    strip_parametrizations_(base)
    a = analyze(base, inputs)

    # every producer parameter zeroed: what is still kept can never be removed
    zeroed = copy.deepcopy(base)
    zmods = dict(zeroed.named_modules())
    with torch.no_grad():
        for v in a.param_vars.values():
            if any(a.roles.get(s) == "producer" for s in v.slots):
                for mod_name, attr in v.refs:
                    getattr(zmods[mod_name], attr).zero_()
    z = analyze(zeroed, inputs)
    z.solve()

    by_root: dict[int, list[tuple[Any, int]]] = {}
    for v in a.param_vars.values():
        for d, s in enumerate(v.slots):
            by_root.setdefault(a.find(s), []).append((v, d))
    pin_reason: dict[int, str] = {}
    for p in z.pins:
        pin_reason.setdefault(a.find(p.slot), p.reason)

    groups: list[ChannelGroup] = []
    for root, members in by_root.items():
        if a.size[root] <= 1 or not any(a.roles.get(v.slots[d]) == "producer" for v, d in members):
            continue
        removable = ~z.keep_of(root)
        divisions = 1
        for s, g in a.divisions.items():
            if a.find(s) == root:
                divisions = int(np.lcm(divisions, g))
        group = ChannelGroup(id=len(groups), size=a.size[root], prunable=bool(removable.any()),
                             reason=None if removable.any() else pin_reason.get(root, "kept by the graph"),
                             unit="channel")
        group.removable = removable
        group.divisions = divisions
        for v, d in members:
            role = a.roles.get(v.slots[d], "other")
            for mod_name, attr in v.refs:
                group.members.append(GroupMember(module=mod_name, param=attr, dim=d, indices=None, role=role))
        groups.append(group)
    return groups
