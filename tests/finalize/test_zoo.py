"""Finalize on every zoo model: parity with the masked model, exact accounting, plain results.

Three kinds of masks per model:
(a) random 50% output-channel masks on every Conv/ConvTranspose/Linear/BatchNorm/attention
    in-projection except the output layers;
(b) masks on only some layers (the middle conv/linear layer's weight rows alone, so its bias
    leaves constant channels; and every third layer);
(c) group-consistent masks as a pruner makes them from ``channel_groups``.
The reference is always a plain copy of the model with the masks multiplied in, compared on
fresh seeded inputs at batch 1 and 2 (not the example inputs finalize saw).
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import deployprune as dp
from deployprune import zoo
from deployprune.finalize import ChannelGroup, channel_groups

from .helpers import (
    BATCHNORM,
    RTOL,
    assert_plain_tree,
    assert_untouched,
    expected_param_shapes,
    group_masks,
    maskable_layers,
    masked_copy,
    param_count,
    param_shapes,
    parity_errors,
    parity_inputs,
    random_channel_masks,
    snapshot,
)

ZOO = zoo.names("zoo")

# Not marked slow: the whole file runs in about 25 s on an idle 2-CPU machine (221 tests).


def _seed(name: str, salt: str) -> int:
    return zlib.crc32(f"{name}/{salt}".encode())


@dataclass
class Case:
    name: str
    model: nn.Module
    masks: dict
    before: dict
    result: Any
    groups: list[ChannelGroup] | None = None
    removed: dict[int, np.ndarray] | None = None


@functools.cache
def random_case(name: str) -> Case:
    spec = zoo.get(name)
    model = zoo.build(name)
    masks = random_channel_masks(model, seed=_seed(name, "a"), skip=spec.output_layers)
    before = snapshot(model)
    result = dp.compact(model, zoo.example_inputs(name), masks)
    return Case(name, model, masks, before, result)


@functools.cache
def group_case(name: str) -> Case:
    model = zoo.build(name)
    before = snapshot(model)
    x = zoo.example_inputs(name)
    groups = channel_groups(model, x)
    masks, removed = group_masks(model, groups, seed=_seed(name, "c"))
    result = dp.compact(model, x, masks)
    return Case(name, model, masks, before, result, groups, removed)


def _check_parity(case: Case, masks: dict | None = None) -> None:
    ref = masked_copy(case.model, case.masks if masks is None else masks)
    errs = parity_errors(ref, case.result.model, parity_inputs(case.name))
    assert max(errs) <= RTOL, f"{case.name}: relative errors {errs} exceed {RTOL}"


# ---------------------------------------------------------------------------- (a) random masks


@pytest.mark.parametrize("name", ZOO)
def test_random_masks_parity_and_size(name: str) -> None:
    case = random_case(name)
    r = case.result
    assert r.compacted, f"{name}: compaction abandoned: {[b.describe() for b in r.blocked]}"
    _check_parity(case)
    assert param_count(r.model) < param_count(case.model)
    assert (r.params_before, r.params_after) == (param_count(case.model), param_count(r.model))
    assert r.max_abs_error <= RTOL * max(r.output_scale, 1e-12)


@pytest.mark.parametrize("name", ZOO)
def test_random_masks_leave_input_model_untouched(name: str) -> None:
    case = random_case(name)
    assert_untouched(case.model, case.before)
    # and the input model still computes the unmasked function (no mask was baked into it)
    fresh = zoo.build(name)
    x = zoo.example_inputs(name, seed=5)
    with torch.no_grad():
        assert torch.equal(case.model(*x), fresh(*x))


@pytest.mark.parametrize("name", ZOO)
def test_random_masks_result_is_plain_module_tree(name: str) -> None:
    case = random_case(name)
    # a call whose forward fixes sizes (attention) may come back re-emitted as a GraphModule
    # carrying its class name; everything else is the original class or a torch.nn layer
    assert_plain_tree(case.result.model, case.model, allow_graph_modules=True)


@pytest.mark.parametrize("name", ZOO)
def test_save_load_roundtrip(name: str, tmp_path) -> None:
    case = random_case(name)
    path = tmp_path / f"{name}.pt"
    torch.save(case.result.model, path)
    loaded = torch.load(path, weights_only=False)
    assert param_shapes(loaded) == param_shapes(case.result.model)
    with torch.no_grad():
        for x in parity_inputs(name):
            assert torch.equal(loaded(*x), case.result.model(*x))


# ---------------------------------------------------------------------------- (b) some layers


def _conv_linear_layers(model: nn.Module, skip: tuple[str, ...]) -> list[str]:
    modules = dict(model.named_modules())
    return [n for n in maskable_layers(model, skip) if not isinstance(modules[n], BATCHNORM + (nn.MultiheadAttention,))]


@pytest.mark.parametrize("variant", ["middle_weight_only", "every_third"])
@pytest.mark.parametrize("name", ZOO)
def test_partial_masks_parity(name: str, variant: str) -> None:
    spec = zoo.get(name)
    model = zoo.build(name)
    if variant == "middle_weight_only":
        layers = _conv_linear_layers(model, spec.output_layers)
        chosen = [layers[len(layers) // 2]]
        masks = random_channel_masks(model, seed=_seed(name, "b1"), only=chosen, weight_only=True)
    else:
        chosen = maskable_layers(model, spec.output_layers)[::3]
        masks = random_channel_masks(model, seed=_seed(name, "b2"), only=chosen)
    assert sorted(masks) == sorted(chosen)
    assert all(float(per["weight"].min()) == 0.0 for per in masks.values())
    before = snapshot(model)
    r = dp.compact(model, zoo.example_inputs(name), masks)
    assert_untouched(model, before)
    assert r.compacted
    ref = masked_copy(model, masks)
    errs = parity_errors(ref, r.model, parity_inputs(name))
    assert max(errs) <= RTOL, f"{name} ({variant}): relative errors {errs}"
    assert param_count(r.model) <= param_count(model)


# ---------------------------------------------------------------------------- (c) group masks


@pytest.mark.parametrize("name", ZOO)
def test_group_masks_parity(name: str) -> None:
    case = group_case(name)
    assert case.removed, f"{name}: no prunable group"
    assert case.result.compacted
    assert_untouched(case.model, case.before)
    _check_parity(case)
    assert param_count(case.result.model) < param_count(case.model)


@pytest.mark.parametrize("name", ZOO)
def test_group_masks_param_count_matches_removed_groups(name: str) -> None:
    case = group_case(name)
    expected = expected_param_shapes(case.model, case.groups, case.removed)
    got = param_shapes(case.result.model)
    wrong = {k: (expected[k], got.get(k)) for k in expected if got.get(k) != expected[k]}
    assert not wrong, f"{name}: {len(wrong)} parameter(s) differ from what the removed groups imply " \
                      f"(name: (expected, got)): {dict(list(wrong.items())[:6])}"
    assert param_count(case.result.model) == sum(int(np.prod(s)) for s in expected.values())


@pytest.mark.parametrize("name", ZOO)
def test_group_masks_result_is_plain_and_serializable(name: str, tmp_path) -> None:
    case = group_case(name)
    assert_plain_tree(case.result.model, case.model, allow_graph_modules=True)
    path = tmp_path / f"{name}.pt"
    torch.save(case.result.model, path)
    loaded = torch.load(path, weights_only=False)
    with torch.no_grad():
        for x in parity_inputs(name):
            assert torch.equal(loaded(*x), case.result.model(*x))


def test_group_masks_zero_every_producer_slice() -> None:
    """The group masks the tests build zero whole channels: the masked model's channel is exactly 0."""
    case = group_case("resnet_basic")
    ref = masked_copy(case.model, case.masks)
    g = next(g for g in case.groups if g.id in case.removed and any(m.module == "conv1" for m in g.members))
    feats = {}
    ref.bn1.register_forward_hook(lambda m, i, o: feats.__setitem__("bn1", o))
    with torch.no_grad():
        ref(*zoo.example_inputs("resnet_basic", seed=3))
    removed = np.flatnonzero(case.removed[g.id])
    assert len(removed) > 0
    assert float(feats["bn1"][:, removed].abs().max()) == 0.0


# ---------------------------------------------------------------------------- export, modes


@pytest.mark.parametrize(("name", "masks"), [
    ("lenet", "random"), ("resnet_basic", "random"), ("mobilenet_v3_tiny", "random"), ("vit", "random"),
    ("convnext", "random"), ("unet", "random"), ("vit", "groups"), ("vit_mha", "groups"), ("bert", "groups"),
])
def test_torch_export_of_compacted_model(name: str, masks: str) -> None:
    case = random_case(name) if masks == "random" else group_case(name)
    compacted = case.result.model
    x = zoo.example_inputs(name)
    exported = torch.export.export(compacted, x)
    with torch.no_grad():
        got = exported.module()(*x)
        want = compacted(*x)
    assert float((got - want).abs().max()) <= 1e-6 * max(float(want.abs().max()), 1.0)


@pytest.mark.parametrize("name", ["resnet_basic", "vit", "efficientnet", "bert"])
def test_train_eval_flags_preserved(name: str) -> None:
    spec = zoo.get(name)
    model = zoo.build(name).train()
    # a mixed tree: every other module back in eval mode
    for i, m in enumerate(model.modules()):
        if i % 2:
            m.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    assert len(set(flags.values())) == 2
    masks = random_channel_masks(model, seed=_seed(name, "t"), skip=spec.output_layers)
    r = dp.compact(model, zoo.example_inputs(name), masks)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: m.training for n, m in r.model.named_modules()} == flags
    changed = {c.name for c in r.changes}
    assert changed, f"{name}: nothing was compacted"
    # and the compacted model in eval mode still matches the masked one
    ref = masked_copy(model, masks).eval()
    errs = parity_errors(ref, r.model.eval(), parity_inputs(name))
    assert max(errs) <= RTOL
