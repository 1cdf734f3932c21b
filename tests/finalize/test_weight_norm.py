"""Weight-norm parametrizations (``torch.nn.utils.parametrizations.weight_norm``, as Wav2Vec2's positional
conv uses): two original tensors, ``original0`` (magnitude) and ``original1`` (direction). Finalize bakes
them into one weight; masks stacked on top are found and applied (issue 11)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import deployprune as dp
from deployprune.masks import extract_attached_masks, strip_parametrizations_

RTOL = 1e-5


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def _net(dim: int = 2) -> nn.Sequential:
    """Conv1d with a weight-normed first layer; ``dim=2`` as Wav2Vec2 (norm over the kernel position)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.GELU(), nn.Conv1d(8, 5, 3, padding=1)).eval()
    weight_norm(net[0], name="weight", dim=dim)
    with torch.no_grad():  # a magnitude that differs from the direction's norm, so baking is visible
        net[0].parametrizations.weight.original0.mul_(1.7)
    return net


def _row_mask(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.ones(8, 4, 3)
    w[rows] = 0
    b = torch.ones(8)
    b[rows] = 0
    return w, b


def _rel(want: torch.Tensor, got: torch.Tensor) -> float:
    return float((want - got).abs().max() / want.abs().max())


@pytest.mark.parametrize("dim", [0, 2])
def test_compact_bakes_weight_norm_and_removes_masked_channels(dim: int) -> None:
    net = _net(dim)
    w, b = _row_mask(slice(2, 6))
    masked = _net(dim)
    with torch.no_grad():
        masked[0].bias.mul_(b)
    x = torch.randn(1, 4, 10)
    res = dp.compact(net, x, {"0": {"weight": w, "bias": b}})
    assert res.compacted and res.removed_channels == res.masked_channels == 4, res.summary()
    small = res.model
    assert not parametrize.is_parametrized(small[0]) and type(small[0]) is nn.Conv1d
    assert small[0].weight.shape == (4, 4, 3) and small[2].weight.shape == (5, 4, 3)
    # the user's model keeps its parametrization and its values
    assert parametrize.is_parametrized(net[0], "weight")
    assert set(dict(net[0].parametrizations.weight.named_parameters())) == {"original0", "original1"}
    fresh = torch.randn(2, 4, 13)
    with torch.no_grad():
        dense_w = masked[0].weight * w  # the weight-normed weight, then the mask
        want = masked[2](masked[1](nn.functional.conv1d(fresh, dense_w, masked[0].bias, padding=1)))
        got = small(fresh)
    assert _rel(want, got) <= RTOL


def test_masks_attached_on_top_of_weight_norm_are_extracted() -> None:
    net = _net()
    w, _ = _row_mask(slice(0, 3))
    parametrize.register_parametrization(net[0], "weight", _Mask(w))
    found = extract_attached_masks(net)
    assert set(found) == {"0"} and torch.equal(found["0"]["weight"], w.bool())
    x = torch.randn(1, 4, 10)
    with torch.no_grad():
        want = net(x)
    res = dp.compact(net, x, None)
    assert res.compacted, res.summary()
    # rows 0..2 of the weight are masked but the bias is not: constants, folded into the next conv or kept
    with torch.no_grad():
        assert _rel(want, res.model(x)) <= RTOL
        fresh = torch.randn(2, 4, 7)
        assert _rel(net(fresh), res.model(fresh)) <= RTOL


def test_strip_bakes_weight_norm_whether_or_not_masks_are_left() -> None:
    net = _net()
    w, _ = _row_mask(slice(1, 4))
    with torch.no_grad():
        normed = net[0].weight.detach().clone()
    parametrize.register_parametrization(net[0], "weight", _Mask(w))
    kept = _net()
    parametrize.register_parametrization(kept[0], "weight", _Mask(w))

    strip_parametrizations_(net, leave_parametrized=True)  # masked values
    assert type(net[0]) is nn.Conv1d and isinstance(net[0].weight, nn.Parameter)
    assert net[0].weight.requires_grad
    assert torch.allclose(net[0].weight, normed * w, rtol=0, atol=1e-7)

    strip_parametrizations_(kept, leave_parametrized=False)  # dense values: weight norm baked, mask not
    assert type(kept[0]) is nn.Conv1d and isinstance(kept[0].weight, nn.Parameter)
    assert torch.allclose(kept[0].weight, normed, rtol=0, atol=1e-7)
    assert set(dict(kept[0].named_parameters())) == {"weight", "bias"}


def test_model_statistics_count_a_weight_normed_weight_once() -> None:
    """validate's model statistics read parametrized weights too (they crashed on ``.original``)."""
    from deployprune.stats import count_nonzero_params, count_params

    net = _net()
    want = 8 * 4 * 3 + 8 + 5 * 8 * 3 + 5  # the computed weight, not magnitude + direction
    assert count_params(net) == want
    assert count_nonzero_params(net) == want
