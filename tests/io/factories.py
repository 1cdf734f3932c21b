"""Small models named by ``--model tests.io.factories:<name>`` in the I/O and CLI tests.

They live outside the ``deployprune`` package on purpose: a checkpoint naming one of
them must not be imported unless the user repeats the factory with ``--model``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn


class TinyConv(nn.Module):
    """conv(3->8) + BN + ReLU -> conv(8->8) -> global pool -> linear(8->4); input 1x3x8x8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_conv() -> nn.Module:
    torch.manual_seed(0)
    return TinyConv().eval()


class TwoInputs(nn.Module):
    """Token ids (int64, 1x6) and a float feature vector (1x4): embedding + linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids: Tensor, feats: Tensor) -> Tensor:
        return self.fc(self.emb(ids).mean(1) + feats)


def two_inputs() -> nn.Module:
    torch.manual_seed(0)
    return TwoInputs().eval()


def not_a_module() -> object:
    return {"this": "is not a module"}


class SlowExport(TinyConv):
    """TinyConv that stalls while being exported to ONNX, for the interruption tests.

    When ``DP_TEST_READY`` names a file, the forward pass run by the ONNX exporter creates it
    and sleeps, so the test can send SIGINT/SIGTERM while the artifact is being written.
    """

    def forward(self, x: Tensor) -> Tensor:
        ready = os.environ.get("DP_TEST_READY")
        if ready and torch.onnx.is_in_onnx_export():
            Path(ready).write_text("exporting")
            time.sleep(120)
        return super().forward(x)


def slow_export() -> nn.Module:
    torch.manual_seed(0)
    return SlowExport().eval()
