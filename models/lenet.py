"""The LeNet-style MNIST model of NNI's pruning/speedup tutorial (``TorchModel``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._spec import InputSpec, ModelSpec


class TorchModel(nn.Module):
    """conv(1→6, 5x5) → pool → conv(6→16, 5x5) → pool → 256 → 120 → 84 → 10, log-probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, 1)
        self.conv2 = nn.Conv2d(6, 16, 5, 1)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.relu3 = nn.ReLU()
        self.relu4 = nn.ReLU()
        self.pool1 = nn.MaxPool2d((2, 2))
        self.pool2 = nn.MaxPool2d((2, 2))

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        x = self.fc3(x)
        return F.log_softmax(x, dim=1)


SPECS = (
    ModelSpec(
        name="lenet",
        factory=TorchModel,
        inputs=(InputSpec((1, 1, 28, 28)),),
        task="classification",
        output_layers=("fc3",),
        description="NNI speedup-tutorial LeNet: conv/ReLU/max-pool, torch.flatten, three Linear, log_softmax",
        tags=("zoo", "sample"),
    ),
)
