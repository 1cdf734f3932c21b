"""EfficientNet: MBConv blocks with squeeze-and-excitation (SiLU, sigmoid gate)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._layers import ConvNormActivation, SqueezeExcitation, StochasticDepth, make_divisible
from ._spec import InputSpec, ModelSpec


@dataclass(frozen=True)
class MBConvConfig:
    """One stage at width/depth 1.0; ``width_mult``/``depth_mult`` give the compound scaling."""

    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int

    def scaled(self, width_mult: float, depth_mult: float) -> MBConvConfig:
        return MBConvConfig(
            self.expand_ratio,
            self.kernel,
            self.stride,
            make_divisible(self.input_channels * width_mult, 8),
            make_divisible(self.out_channels * width_mult, 8),
            int(math.ceil(self.num_layers * depth_mult)),
        )


class MBConv(nn.Module):
    def __init__(self, cnf: MBConvConfig, stochastic_depth_prob: float) -> None:
        super().__init__()
        if cnf.stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {cnf.stride}")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels

        layers: list[nn.Module] = []
        expanded = make_divisible(cnf.input_channels * cnf.expand_ratio, 8)
        if expanded != cnf.input_channels:
            layers.append(ConvNormActivation(cnf.input_channels, expanded, kernel_size=1, activation_layer=nn.SiLU))
        layers.append(
            ConvNormActivation(
                expanded,
                expanded,
                kernel_size=cnf.kernel,
                stride=cnf.stride,
                groups=expanded,
                activation_layer=nn.SiLU,
            )
        )
        squeeze_channels = max(1, cnf.input_channels // 4)
        layers.append(SqueezeExcitation(expanded, squeeze_channels, activation=nn.SiLU))
        layers.append(ConvNormActivation(expanded, cnf.out_channels, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
        self.out_channels = cnf.out_channels

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


B0_SETTING = (
    MBConvConfig(1, 3, 1, 32, 16, 1),
    MBConvConfig(6, 3, 2, 16, 24, 2),
    MBConvConfig(6, 5, 2, 24, 40, 2),
    MBConvConfig(6, 3, 2, 40, 80, 3),
    MBConvConfig(6, 5, 1, 80, 112, 3),
    MBConvConfig(6, 5, 2, 112, 192, 4),
    MBConvConfig(6, 3, 1, 192, 320, 1),
)


class EfficientNet(nn.Module):
    def __init__(
        self,
        setting: Sequence[MBConvConfig] = B0_SETTING,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        dropout: float = 0.2,
        stochastic_depth_prob: float = 0.2,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        stages = [cnf.scaled(width_mult, depth_mult) for cnf in setting]
        layers: list[nn.Module] = [
            ConvNormActivation(3, stages[0].input_channels, kernel_size=3, stride=2, activation_layer=nn.SiLU)
        ]
        total_blocks = sum(cnf.num_layers for cnf in stages)
        block_id = 0
        for cnf in stages:
            stage: list[nn.Module] = []
            for i in range(cnf.num_layers):
                block_cnf = (
                    cnf
                    if i == 0
                    else MBConvConfig(
                        cnf.expand_ratio, cnf.kernel, 1, cnf.out_channels, cnf.out_channels, cnf.num_layers
                    )
                )
                sd_prob = stochastic_depth_prob * float(block_id) / total_blocks
                stage.append(MBConv(block_cnf, sd_prob))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        last_in = stages[-1].out_channels
        last_out = 4 * last_in
        layers.append(ConvNormActivation(last_in, last_out, kernel_size=1, activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_out, num_classes),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def efficientnet_b0() -> EfficientNet:
    return EfficientNet()


def efficientnet() -> EfficientNet:
    """B0 topology at width 0.5, depth 0.5 (10 MBConv blocks)."""
    return EfficientNet(width_mult=0.5, depth_mult=0.5, num_classes=10)


SPECS = (
    ModelSpec(
        "efficientnet",
        efficientnet,
        (InputSpec((1, 3, 32, 32)),),
        "classification",
        ("classifier.1",),
        "EfficientNet-B0 at width/depth 0.5: MBConv, SiLU, SE `x * sigmoid(...)`, stochastic depth",
        ("zoo",),
    ),
    ModelSpec(
        "efficientnet_b0",
        efficientnet_b0,
        (InputSpec((1, 3, 224, 224)),),
        "classification",
        ("classifier.1",),
        "EfficientNet-B0 (5.3M params)",
        ("full",),
    ),
)
