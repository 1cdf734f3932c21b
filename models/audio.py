"""1-D convolutional classifier for raw audio (M5-style, with a depthwise-separable residual block)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._spec import InputSpec, ModelSpec


class DepthwiseSeparableBlock(nn.Module):
    """depthwise Conv1d → BN → ReLU → pointwise Conv1d → BN, added to the input, ReLU."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.depthwise = nn.Conv1d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False
        )
        self.bn1 = nn.BatchNorm1d(channels)
        self.pointwise = nn.Conv1d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.depthwise(x)))
        out = self.bn2(self.pointwise(out))
        return F.relu(out + x)


class AudioNet(nn.Module):
    """Strided wide first conv over the waveform, conv/BN/ReLU/max-pool stacks, global mean, Linear."""

    def __init__(self, n_input: int = 1, n_output: int = 35, stride: int = 16, n_channel: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_input, n_channel, kernel_size=80, stride=stride)
        self.bn1 = nn.BatchNorm1d(n_channel)
        self.pool1 = nn.MaxPool1d(4)
        self.conv2 = nn.Conv1d(n_channel, n_channel, kernel_size=3)
        self.bn2 = nn.BatchNorm1d(n_channel)
        self.pool2 = nn.MaxPool1d(4)
        self.conv3 = nn.Conv1d(n_channel, 2 * n_channel, kernel_size=3)
        self.bn3 = nn.BatchNorm1d(2 * n_channel)
        self.pool3 = nn.MaxPool1d(4)
        self.block = DepthwiseSeparableBlock(2 * n_channel)
        self.conv4 = nn.Conv1d(2 * n_channel, 2 * n_channel, kernel_size=3, padding=1)
        self.bn4 = nn.BatchNorm1d(2 * n_channel)
        self.fc1 = nn.Linear(2 * n_channel, n_output)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = F.relu(self.bn1(x))
        x = self.pool1(x)
        x = self.conv2(x)
        x = F.relu(self.bn2(x))
        x = self.pool2(x)
        x = self.conv3(x)
        x = F.relu(self.bn3(x))
        x = self.pool3(x)
        x = self.block(x)
        x = self.conv4(x)
        x = F.relu(self.bn4(x))
        x = x.mean(-1)  # global average pool over time
        x = self.fc1(x)
        return x


def audio() -> AudioNet:
    return AudioNet(n_input=1, n_output=10, n_channel=32)


SPECS = (
    ModelSpec(
        "audio",
        audio,
        (InputSpec((1, 1, 4000)),),
        "classification",
        ("fc1",),
        "1-D conv audio net (M5-style) on 4000 samples: Conv1d/BatchNorm1d/ReLU/MaxPool1d, depthwise-separable "
        "residual block, `x.mean(-1)`, Linear",
        ("zoo",),
    ),
)
