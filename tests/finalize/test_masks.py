"""Masks finalize refuses, and the NNI speedup tutorial case."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deployprune as dp
from deployprune import zoo
from deployprune.errors import EXIT_INPUT, MaskError

from .helpers import RTOL, assert_untouched, masked_copy, param_count, parity_errors, parity_inputs, snapshot


@pytest.fixture
def lenet() -> nn.Module:
    return zoo.build("lenet")


def _x() -> tuple[torch.Tensor, ...]:
    return zoo.example_inputs("lenet")


# ---------------------------------------------------------------------------- NNI tutorial


def test_nni_tutorial_lenet_conv1_first_three_channels(lenet: nn.Module) -> None:
    """NNI's speedup tutorial: conv1's first three output channels masked (weight only)."""
    w = lenet.conv1.weight
    mask = torch.ones_like(w)
    mask[:3] = 0
    masks = {"conv1": {"weight": mask}}
    before = snapshot(lenet)
    r = dp.compact(lenet, _x(), masks)
    assert_untouched(lenet, before)
    m = r.model
    assert isinstance(m.conv1, nn.Conv2d) and (m.conv1.in_channels, m.conv1.out_channels) == (1, 3)
    assert isinstance(m.conv2, nn.Conv2d) and (m.conv2.in_channels, m.conv2.out_channels) == (3, 16)
    assert tuple(m.conv1.weight.shape) == (3, 1, 5, 5) and tuple(m.conv1.bias.shape) == (3,)
    assert tuple(m.conv2.weight.shape) == (16, 3, 5, 5)
    # the kept channels are conv1's last three, bit for bit
    assert torch.equal(m.conv1.weight, lenet.conv1.weight[3:])
    assert torch.equal(m.conv2.weight, lenet.conv2.weight[:, 3:])
    # conv1's bias on the masked channels is a constant relu(b) feeding conv2: folded exactly
    ref = masked_copy(lenet, masks)
    errs = parity_errors(ref, m, parity_inputs("lenet"))
    assert max(errs) <= RTOL, errs
    removed = 3 * 1 * 5 * 5 + 3 + 16 * 3 * 5 * 5
    assert param_count(m) == param_count(lenet) - removed
    assert (r.params_before, r.params_after) == (param_count(lenet), param_count(lenet) - removed)
    assert not r.blocked


def test_finalize_returns_the_compact_model(lenet: nn.Module) -> None:
    mask = torch.ones_like(lenet.conv1.weight)
    mask[:3] = 0
    m = dp.finalize(lenet, _x(), {"conv1": {"weight": mask}})
    assert (m.conv1.out_channels, m.conv2.in_channels) == (3, 3)


def test_no_masks_and_none_attached_keeps_model_whole(lenet: nn.Module) -> None:
    r = dp.compact(lenet, _x(), None)
    assert r.params_after == r.params_before == param_count(lenet)
    errs = parity_errors(lenet, r.model, parity_inputs("lenet"))
    assert max(errs) == 0.0


# ---------------------------------------------------------------------------- refused masks


def _conv1_mask(lenet: nn.Module) -> torch.Tensor:
    m = torch.ones_like(lenet.conv1.weight)
    m[:2] = 0
    return m


def _bad_masks(lenet: nn.Module) -> dict[str, tuple[dict, list[str]]]:
    good = _conv1_mask(lenet)
    nan = good.clone()
    nan[0, 0, 0, 0] = float("nan")
    half = good.clone()
    half[1, 0, 2, 2] = 0.5
    return {
        "unknown_module": ({"conv9": {"weight": good}}, ["'conv9'", "does not exist"]),
        "unknown_module_close": ({"conv_1": {"weight": good}}, ["'conv_1'", "conv1"]),
        "unknown_param": ({"conv1": {"kernel": good}}, ["conv1.kernel", "no parameter 'kernel'"]),
        "wrong_shape": ({"conv1": {"weight": torch.ones(6, 1, 3, 3)}},
                        ["conv1.weight", "(6, 1, 3, 3)", "(6, 1, 5, 5)"]),
        "non_binary": ({"conv1": {"weight": half}}, ["conv1.weight", "not binary", "0.5"]),
        "nan": ({"conv1": {"weight": nan}}, ["conv1.weight", "NaN"]),
        "bias_wrong_shape": ({"fc1": {"bias": torch.ones(3)}}, ["fc1.bias", "(3,)"]),
        "not_a_dict": ({"conv1": good}, ["'conv1'", "dict"]),
    }


@pytest.mark.parametrize("case", ["unknown_module", "unknown_module_close", "unknown_param", "wrong_shape",
                                  "non_binary", "nan", "bias_wrong_shape", "not_a_dict"])
@pytest.mark.parametrize("entry", ["finalize", "compact"])
def test_bad_masks_raise_mask_error_naming_the_layer(lenet: nn.Module, case: str, entry: str) -> None:
    masks, needles = _bad_masks(lenet)[case]
    before = snapshot(lenet)
    fn = dp.finalize if entry == "finalize" else dp.compact
    with pytest.raises(MaskError) as info:
        fn(lenet, _x(), masks)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert info.value.exit_code == EXIT_INPUT
    assert_untouched(lenet, before)


def test_bool_and_integer_masks_are_accepted(lenet: nn.Module) -> None:
    m = _conv1_mask(lenet)
    a = dp.compact(lenet, _x(), {"conv1": {"weight": m.bool()}})
    b = dp.compact(lenet, _x(), {"conv1": {"weight": m.to(torch.int64)}})
    c = dp.compact(lenet, _x(), {"conv1": {"weight": m.numpy()}})
    assert a.params_after == b.params_after == c.params_after < param_count(lenet)
    assert a.model.conv1.out_channels == 4


# ---------------------------------------------------------------------------- masks attached to the model


class _MaskParam(nn.Module):
    """A parametrization carrying ``mask``, as deployprune's Pruner and torch.ao.pruning attach them."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def test_masks_none_uses_attached_parametrizations(lenet: nn.Module) -> None:
    from torch.nn.utils import parametrize

    mask = _conv1_mask(lenet)
    parametrize.register_parametrization(lenet.conv1, "weight", _MaskParam(mask))
    before = snapshot(lenet)
    r = dp.compact(lenet, _x(), None)
    assert_untouched(lenet, before)
    assert parametrize.is_parametrized(lenet.conv1)
    assert not parametrize.is_parametrized(r.model.conv1)
    assert (r.model.conv1.out_channels, r.model.conv2.in_channels) == (4, 4)
    with torch.no_grad():
        for x in parity_inputs("lenet"):
            want, got = lenet(*x), r.model(*x)
            assert float((want - got).abs().max()) <= RTOL * float(want.abs().max())


def test_masks_none_uses_torch_nn_utils_prune_masks(lenet: nn.Module) -> None:
    """Models pruned with torch.nn.utils.prune (weight_orig + weight_mask + pre-hook) compact too."""
    from torch.nn.utils import prune

    prune.ln_structured(lenet.conv1, "weight", amount=0.5, n=2, dim=0)
    kept = int(lenet.conv1.weight_mask[:, 0, 0, 0].sum())
    before = snapshot(lenet)
    r = dp.compact(lenet, _x(), None)
    assert_untouched(lenet, before)
    assert r.model.conv1.out_channels == kept == 3
    assert not r.model.conv1._forward_pre_hooks and "weight" in dict(r.model.conv1.named_parameters())
    with torch.no_grad():
        for x in parity_inputs("lenet"):
            want, got = lenet(*x), r.model(*x)
            assert float((want - got).abs().max()) <= RTOL * float(want.abs().max())
