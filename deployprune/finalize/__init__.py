"""Finalize: bake masks, propagate them through the traced graph, replace modules.

(Work in progress: the graph-based compaction lands next; until then this bakes masks only.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from ..masks import apply_masks_, extract_attached_masks, normalize_masks, strip_parametrizations_


@dataclass
class CompactionResult:
    model: nn.Module
    blocked: list = field(default_factory=list)


def compact(model, example_inputs, masks=None, *, strict=False, inplace=False) -> CompactionResult:
    attached = extract_attached_masks(model)
    work = model if inplace else copy.deepcopy(model)
    strip_parametrizations_(work)
    masks = normalize_masks(work, masks) if masks is not None else attached
    apply_masks_(work, masks)
    return CompactionResult(model=work)


def finalize(model, example_inputs, masks=None, **kwargs) -> nn.Module:
    return compact(model, example_inputs, masks, **kwargs).model
