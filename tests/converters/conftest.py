"""Small models for the converter tests (the zoo-wide runs live in test_zoo.py, marked slow)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class ConvBNNet(nn.Module):
    """conv-bn-relu twice, global pooling, linear: the shape most converters meet."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class MLPNet(nn.Module):
    """Large linear layers: the weights dominate the file, so size ratios are predictable."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.conv(x))
        return features, self.head(features.mean(dim=(2, 3)))


class ZetaNet(nn.Module):
    """Uses an op no exporter here supports (aten::special_zeta)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return torch.special.zeta(y.abs() + 2.0, y.abs() + 1.0)


def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics so folding changes the weights."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def magnitude_prune_(model: nn.Module, sparsity: float, min_elements: int = 0) -> nn.Module:
    """Zero the smallest-|w| fraction of every conv/linear weight (per layer, per element)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear) and m.weight.numel() >= min_elements:
                w = m.weight
                k = int(round(sparsity * w.numel()))
                if k == 0:
                    continue
                idx = w.abs().flatten().argsort()[:k]
                w.view(-1)[idx] = 0.0
    return model


@pytest.fixture
def convbn() -> ConvBNNet:
    torch.manual_seed(0)
    return randomize_bn_(ConvBNNet()).eval()


@pytest.fixture
def image() -> tuple[torch.Tensor]:
    return (torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)
