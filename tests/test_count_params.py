"""One parameter counter (``deployprune.stats.count_params``) for the whole package.

``pipeline`` had its own (unique ``model.parameters()``), which agreed on shared and masked weights
but counted a parametrization's own tensors: a weight-normed weight as magnitude + direction, a
learned parametrization's parameters as the model's. The model has the computed weight: that is
what is exported and what a compacted model is compared with.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from deployprune import hf, pipeline, stats
from deployprune.stats import count_params


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


class _LearnedScale(nn.Module):
    """A parametrization with a parameter of its own (not a parameter of the model's weights)."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(rows, 1))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.scale


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def test_the_pipeline_and_hf_use_the_one_counter() -> None:
    assert pipeline.count_params is stats.count_params
    assert "count_params" not in vars(hf) or hf.count_params is stats.count_params


def test_a_tied_weight_counts_once() -> None:
    model = _Tied()
    assert count_params(model) == 10 * 4
    assert count_params(nn.Sequential(model.head, model.head)) == 40  # one module used twice


def test_a_tied_weight_counts_once_when_masked() -> None:
    model = _Tied()
    parametrize.register_parametrization(model.embed, "weight", _Mask(torch.ones(10, 4)))
    # head.weight is the parametrization's `original` itself: still one tensor
    assert model.head.weight is model.embed.parametrizations.weight.original
    assert count_params(model) == 40
    parametrize.register_parametrization(model.head, "weight", _Mask(torch.ones(10, 4)))
    assert count_params(model) == 40


def test_a_masked_weight_counts_its_elements_not_the_mask() -> None:
    lin = nn.Linear(4, 3)
    mask = torch.ones(3, 4)
    mask[0] = 0
    parametrize.register_parametrization(lin, "weight", _Mask(mask))
    assert count_params(lin) == 3 * 4 + 3


def test_a_weight_normed_weight_counts_as_the_weight() -> None:
    lin = weight_norm(nn.Linear(4, 3))
    stored = sum(p.numel() for p in lin.parameters())
    assert stored == 3 * 1 + 3 * 4 + 3  # magnitude g, direction v, bias: what the old pipeline counter said
    assert count_params(lin) == 3 * 4 + 3


def test_a_parametrization_s_own_parameters_are_not_the_model_s() -> None:
    lin = nn.Linear(4, 3)
    parametrize.register_parametrization(lin, "weight", _LearnedScale(3))
    assert count_params(lin) == 3 * 4 + 3
