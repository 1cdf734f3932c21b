"""VGG with BatchNorm: 3x3 conv/BN/ReLU stacks, max-pools, flatten, three Linear layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._spec import InputSpec, ModelSpec

# configuration "A" (VGG-11); "M" is a 2x2 max-pool
CFG_A: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def make_layers(cfg: Sequence[int | str], batch_norm: bool = True, width_div: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            channels = int(v) // width_div
            conv2d = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = channels
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(
        self,
        features: nn.Sequential,
        num_classes: int = 1000,
        pool_size: int = 7,
        hidden: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features = features
        last_channels = [m for m in features if isinstance(m, nn.Conv2d)][-1].out_channels
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(last_channels * pool_size * pool_size, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def vgg11_bn() -> VGG:
    return VGG(make_layers(CFG_A, batch_norm=True))


def vgg() -> VGG:
    """VGG-11-BN at 1/8 width for 32x32 inputs (CIFAR-style: 1x1 pool, 128-wide classifier)."""
    return VGG(make_layers(CFG_A, batch_norm=True, width_div=8), num_classes=10, pool_size=1, hidden=128)


SPECS = (
    ModelSpec(
        "vgg",
        vgg,
        (InputSpec((1, 3, 32, 32)),),
        "classification",
        ("classifier.6",),
        "VGG-11-BN at 1/8 width: conv/BN/ReLU + max-pool stacks, flatten, Linear-ReLU-Dropout classifier",
        ("zoo",),
    ),
    ModelSpec(
        "vgg11_bn",
        vgg11_bn,
        (InputSpec((1, 3, 224, 224)),),
        "classification",
        ("classifier.6",),
        "VGG-11 with BatchNorm (132.9M params)",
        ("full",),
    ),
)
