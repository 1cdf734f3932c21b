"""Pruner-produced channel masks on every zoo architecture compact fully under finalize."""

from __future__ import annotations

import pytest
import torch

import deployprune as dp
from deployprune import zoo
from deployprune.finalize import compact
from deployprune.pruning.pruner import plain_copy


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.names("zoo"))
def test_channel_masks_compact_with_parity(name: str) -> None:
    model = zoo.build(name)
    inputs = zoo.example_inputs(name)
    pruner = dp.Pruner(model, {"target_sparsity": 0.5, "granularity": "channel"}, inputs)
    pruner.prepare()
    groups = [t for t in pruner.targets if t.kind == "group"]
    assert groups, "no prunable group"
    masks = pruner.masks()
    for layer in zoo.get(name).output_layers:  # output channels are never removed
        assert (masks.get(layer, {}).get("weight", torch.ones(1, dtype=torch.bool))).all()
    result = compact(plain_copy(model), inputs, masks)
    assert result.compacted and not result.blocked, result.summary()
    with torch.no_grad():
        ref, out = model(*inputs), result.model(*inputs)
    ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
    assert float((ref - out).abs().max() / ref.abs().max()) <= 1e-5
    # no channel the masks zeroed is left in the compact model
    dims = {(m.module, m.param, m.dim) for t in groups for m in t.group.members if m.role == "producer"}
    for mod, par, dim in dims:
        mask = masks[mod][par]
        zeroed = int((~mask).movedim(dim, 0).reshape(mask.shape[dim], -1).all(1).sum())
        left = getattr(result.model.get_submodule(mod), par).shape[dim]
        assert left <= mask.shape[dim] - zeroed, f"{mod}.{par}: {left} channels left, {zeroed} of them zeroed"
    assert result.params_after < result.params_before


@pytest.mark.parametrize("name", zoo.names("zoo"))
def test_exclude_last_layer_matches_the_zoo_output_layers(name: str) -> None:
    model = zoo.build(name)
    pruner = dp.Pruner(model, {"target_sparsity": 0.5, "exclude_last_layer": True,
                               "module_type_configs": {"Embedding": {"target_sparsity": 0.5}}},
                       zoo.example_inputs(name))
    pruner.prepare()
    masks = pruner.masks()
    for layer in zoo.get(name).output_layers:
        assert layer not in masks, f"{layer} is an output layer"
    assert masks  # something else was pruned


ATTENTION = ("bert", "vit", "vit_mha")


@pytest.mark.slow
@pytest.mark.parametrize("name", ATTENTION)
def test_head_masks_compact_with_parity(name: str) -> None:
    model = zoo.build(name)
    inputs = zoo.example_inputs(name)
    config = {"module_type_configs": {t: {"target_sparsity": 0.5, "granularity": "head"}
                                      for t in ("Linear", "MultiheadAttention")}}
    pruner = dp.Pruner(model, config, inputs)
    pruner.prepare()
    heads = [t for t in pruner.targets if t.config.granularity == "head"]
    assert heads, "the graph found no attention-head group"
    result = compact(plain_copy(model), inputs, pruner.masks())
    assert result.compacted and not result.blocked, result.summary()
    with torch.no_grad():
        ref, out = model(*inputs), result.model(*inputs)
    ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
    assert float((ref - out).abs().max() / ref.abs().max()) <= 1e-5
    for t in heads:
        for m in t.group.members:
            if m.role == "producer":
                size = getattr(result.model.get_submodule(m.module), m.param).shape[m.dim]
                assert size <= getattr(model.get_submodule(m.module), m.param).shape[m.dim] // 2
