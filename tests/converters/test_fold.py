"""fold_batchnorm: parity, zero patterns, what must not be folded, fx and hook discovery."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deployprune.converters.fold import fold_batchnorm, fold_batchnorm_pairs

from .conftest import ConvBNNet, magnitude_prune_, randomize_bn_


def out(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*inputs)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    err = (a - b).abs().max().item()
    assert err <= 1e-5 * max(a.abs().max().item(), 1e-6), err


def test_conv_bn_is_folded_with_parity(convbn, image) -> None:
    magnitude_prune_(convbn, 0.6)
    before = copy.deepcopy(convbn.state_dict())
    folded, pairs = fold_batchnorm_pairs(convbn, image)
    assert pairs == [("conv1", "bn1"), ("conv2", "bn2")]
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    assert folded.conv2.bias is not None  # conv2 had none; the BN shift became its bias
    assert_close(out(convbn, *image), out(folded, *image))
    # every zero stays a zero (BN scales output channels)
    assert torch.equal(folded.conv2.weight == 0, convbn.conv2.weight == 0)
    assert torch.equal(folded.conv1.weight == 0, convbn.conv1.weight == 0)
    # the original is untouched
    assert all(torch.equal(before[k], v) for k, v in convbn.state_dict().items())
    assert isinstance(convbn.bn1, nn.BatchNorm2d)


def test_without_inputs_uses_fx(convbn, image) -> None:
    folded = fold_batchnorm(convbn)
    assert isinstance(folded.bn2, nn.Identity)
    assert_close(out(convbn, *image), out(folded, *image))


def test_training_model_is_folded_with_running_stats(convbn, image) -> None:
    convbn.train()
    folded = fold_batchnorm(convbn, image)
    assert not folded.training
    assert convbn.training  # caller's mode untouched
    assert_close(out(copy.deepcopy(convbn), *image), out(folded, *image))


class SharedConvOutput(nn.Module):
    """conv output feeds the BN *and* a residual: folding would change the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class DataDependent(nn.Module):
    """Python control flow on tensor values: torch.fx cannot trace it, hooks can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # data-dependent branch
            y = y * 2
        z = self.shared(y)
        return self.bn2(z) + z  # shared output: must stay unfolded


@pytest.mark.parametrize("with_inputs", [True, False])
def test_shared_output_is_not_folded(with_inputs: bool) -> None:
    model = randomize_bn_(SharedConvOutput()).eval()
    x = torch.randn(2, 8, 6, 6)
    folded, pairs = fold_batchnorm_pairs(model, (x,) if with_inputs else None)
    assert pairs == [] and isinstance(folded.bn, nn.BatchNorm2d)
    assert_close(out(model, x), out(folded, x))


def test_hooks_when_fx_cannot_trace() -> None:
    model = randomize_bn_(DataDependent()).eval()
    x = torch.randn(1, 3, 8, 8)
    folded, pairs = fold_batchnorm_pairs(model, (x,))
    # found by hooks; the shared pair is a candidate too but fails parity and is dropped
    assert pairs == [("conv", "bn")]
    assert isinstance(folded.bn2, nn.BatchNorm2d)
    assert_close(out(model, x), out(folded, x))
    # without inputs there is no way to find the pairs: returned unchanged (a copy)
    unchanged, none = fold_batchnorm_pairs(model)
    assert none == [] and unchanged is not model and isinstance(unchanged.bn, nn.BatchNorm2d)


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def test_linear_bn_needs_inputs() -> None:
    model = randomize_bn_(LinearBN()).eval()
    x = torch.randn(4, 6)
    assert fold_batchnorm_pairs(model)[1] == []  # no inputs: shape unknown, not folded
    folded, pairs = fold_batchnorm_pairs(model, (x,))
    assert pairs == [("fc", "bn")]
    assert_close(out(model, x), out(folded, x))


class SequenceLinearBN(LinearBN):
    """BatchNorm1d over (N, C, L) after a Linear on the last axis: C != Linear features axis."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 5, 5)
        return self.bn(self.fc(x))


def test_linear_bn_on_the_wrong_axis_is_left_alone() -> None:
    model = randomize_bn_(SequenceLinearBN()).eval()
    x = torch.randn(2, 5, 5)
    folded, pairs = fold_batchnorm_pairs(model, (x,))
    assert pairs == []
    assert_close(out(model, x), out(folded, x))


def test_transposed_conv_and_grouped_conv() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.ConvTranspose2d(8, 6, 2, stride=2), nn.BatchNorm2d(6))
    randomize_bn_(model).eval()
    x = torch.randn(1, 4, 6, 6)
    folded, pairs = fold_batchnorm_pairs(model, (x,))
    assert pairs == [("0", "1"), ("3", "4")]
    assert_close(out(model, x), out(folded, x))


def test_module_called_twice_is_not_folded() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.bn(self.conv(x)))  # conv is reused after the BN

    model = randomize_bn_(Twice()).eval()
    x = torch.randn(1, 3, 4, 4)
    folded, pairs = fold_batchnorm_pairs(model, (x,))
    assert pairs == []
    assert_close(out(model, x), out(folded, x))


def test_bn_without_running_stats_is_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = torch.randn(2, 3, 4, 4)
    folded, pairs = fold_batchnorm_pairs(model, (x,))
    assert pairs == []
    assert_close(out(model, x), out(folded, x))


def test_deep_net_parity() -> None:
    torch.manual_seed(0)
    model = randomize_bn_(ConvBNNet(width=16)).eval()
    x = torch.randn(3, 3, 12, 12)
    folded = fold_batchnorm(model, (x,))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert_close(out(model, x), out(folded, x))
