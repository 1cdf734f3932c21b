from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deployprune.finalize.graph import ChannelGroup, GroupMember


class SmallCNN(nn.Module):
    """conv-bn-relu x2 -> global pool -> fc; every coupling is a plain chain."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x.mean((2, 3)), 1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.fc2 = nn.Linear(32, 18)
        self.fc3 = nn.Linear(18, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.1)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.fixture
def cnn() -> SmallCNN:
    torch.manual_seed(0)
    return randomize_bn(SmallCNN().eval())


@pytest.fixture
def cnn_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


def cnn_batches(n: int = 3, seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def head_groups(model: nn.Module, heads: int = 4, head_dim: int = 4) -> list[ChannelGroup]:
    """Hand-built head group for :class:`TinyAttention`: head k owns rows k*hd..(k+1)*hd of q, k, v
    and columns of o (consumer)."""
    idx = [np.arange(k * head_dim, (k + 1) * head_dim) for k in range(heads)]
    members = [GroupMember(module=n, param=p, dim=0, indices=idx, role="producer")
               for n in ("q", "k", "v") for p in ("weight", "bias")]
    members.append(GroupMember(module="o", param="weight", dim=1, indices=idx, role="consumer"))
    return [ChannelGroup(id=0, size=heads, members=members, prunable=True, reason=None, unit="head")]


class TinyAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, h, d // h).transpose(1, 2)

        att = (split(self.q(x)) @ split(self.k(x)).transpose(-1, -2)).softmax(-1)
        return self.o((att @ split(self.v(x))).transpose(1, 2).reshape(b, s, d))
