"""dp.apply_masks: the masked model an artifact is validated against (README "Python API")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.utils import parametrize, prune

import deployprune as dp
from deployprune import zoo
from deployprune.errors import MaskError

X = (torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)),)


def _masks(model: torch.nn.Module) -> dict:
    keep = torch.ones_like(model.conv1.weight)
    keep[:3] = 0
    return {"conv1": {"weight": keep}}


def test_masked_copy_is_what_the_compact_model_computes() -> None:
    model = zoo.build("lenet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = _masks(model)
    masked = dp.apply_masks(model, masks)
    assert masked is not model
    assert torch.equal(masked.conv1.weight[:3], torch.zeros_like(masked.conv1.weight[:3]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model untouched
    compact = dp.finalize(model, X, masks)
    with torch.no_grad():
        assert torch.allclose(compact(*X), masked(*X), rtol=0, atol=1e-6)
        assert not torch.allclose(model(*X), masked(*X), atol=1e-4)  # the masks change the output


def test_validate_the_artifact_against_the_masked_model(tmp_path: Path) -> None:
    model = zoo.build("lenet")
    masks = _masks(model)
    path = dp.export(model, X, tmp_path / "out.onnx", masks=masks)
    assert dp.validate(dp.apply_masks(model, masks), path, X, latency=False).passed
    # the unmasked model is another function: masked channels still output their bias there
    assert not dp.validate(model, path, X, latency=False, localize=False).passed


def test_attached_masks_are_baked_and_the_copy_is_plain() -> None:
    model = zoo.build("lenet")
    pruner = dp.Pruner(model, {"target_sparsity": 0.5}, X)
    pruner.prepare()
    masked = dp.apply_masks(model)
    assert parametrize.is_parametrized(model.conv1)  # the pruned model keeps its parametrizations
    assert not any(parametrize.is_parametrized(m) for m in masked.modules())
    with torch.no_grad():
        assert torch.equal(masked(*X), model(*X))
        assert torch.equal(masked.conv1.weight, model.conv1.weight)


def test_torch_prune_hooks_are_taken_off_the_copy() -> None:
    model = zoo.build("lenet")
    prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    masked = dp.apply_masks(model)
    assert hasattr(model.fc1, "weight_orig")  # still pruned
    assert not hasattr(masked.fc1, "weight_orig") and not masked.fc1._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(masked(*X), model(*X))


def test_given_masks_are_checked() -> None:
    model = zoo.build("lenet")
    with pytest.raises(MaskError, match="module 'conv9' does not exist in the model"):
        dp.apply_masks(model, {"conv9": {"weight": torch.ones(1)}})
    with pytest.raises(MaskError, match="does not match parameter shape"):
        dp.apply_masks(model, {"conv1": {"weight": torch.ones(2, 2)}})
