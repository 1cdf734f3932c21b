"""MobileNetV2 (inverted residuals, ReLU6) and MobileNetV3 (SE with hard-sigmoid, hardswish)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layers import ConvNormActivation, SqueezeExcitation, make_divisible
from ._spec import InputSpec, ModelSpec


def _init_weights(model: nn.Module) -> None:
    """The MobileNet reference initialization: kaiming (fan-out) convs, N(0, 0.01) Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) → 3x3 depthwise (ReLU6) → 1x1 linear projection; residual if shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6))
        layers.extend(
            [
                ConvNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, activation_layer=nn.ReLU6),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        inverted_residual_setting: Sequence[Sequence[int]] | None = None,
        round_nearest: int = 8,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        input_channel = 32
        last_channel = 1280
        if inverted_residual_setting is None:
            inverted_residual_setting = [
                # t (expansion), c (channels), n (repeats), s (first stride)
                [1, 16, 1, 1],
                [6, 24, 2, 2],
                [6, 32, 3, 2],
                [6, 64, 4, 2],
                [6, 96, 3, 1],
                [6, 160, 3, 2],
                [6, 320, 1, 1],
            ]
        input_channel = make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvNormActivation(3, input_channel, stride=2, activation_layer=nn.ReLU6)]
        for t, c, n, s in inverted_residual_setting:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, expand_ratio=t))
                input_channel = output_channel
        features.append(ConvNormActivation(input_channel, self.last_channel, kernel_size=1, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(self.last_channel, num_classes),
        )

        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


# ----------------------------------------------------------------------------- MobileNetV3


@dataclass(frozen=True)
class BlockConfig:
    """One MobileNetV3 bottleneck: channels are given at width 1.0 and scaled by ``width_mult``."""

    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    activation: str  # "RE" (ReLU) or "HS" (hardswish)
    stride: int
    width_mult: float = 1.0

    def scaled(self, channels: int) -> int:
        return make_divisible(channels * self.width_mult, 8)


class InvertedResidualV3(nn.Module):
    def __init__(self, cnf: BlockConfig) -> None:
        super().__init__()
        if cnf.stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {cnf.stride}")
        inp = cnf.scaled(cnf.input_channels)
        exp = cnf.scaled(cnf.expanded_channels)
        out = cnf.scaled(cnf.out_channels)
        self.use_res_connect = cnf.stride == 1 and inp == out
        activation = nn.Hardswish if cnf.activation == "HS" else nn.ReLU

        layers: list[nn.Module] = []
        if exp != inp:
            layers.append(ConvNormActivation(inp, exp, kernel_size=1, activation_layer=activation))
        layers.append(
            ConvNormActivation(
                exp, exp, kernel_size=cnf.kernel, stride=cnf.stride, groups=exp, activation_layer=activation
            )
        )
        if cnf.use_se:
            squeeze_channels = make_divisible(exp // 4, 8)
            layers.append(SqueezeExcitation(exp, squeeze_channels, scale_activation=nn.Hardsigmoid))
        layers.append(ConvNormActivation(exp, out, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class MobileNetV3(nn.Module):
    def __init__(
        self,
        setting: Sequence[BlockConfig],
        last_channel: int,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        first = setting[0].scaled(setting[0].input_channels)
        layers: list[nn.Module] = [ConvNormActivation(3, first, kernel_size=3, stride=2, activation_layer=nn.Hardswish)]
        for cnf in setting:
            layers.append(InvertedResidualV3(cnf))
        last_in = setting[-1].scaled(setting[-1].out_channels)
        last_conv = 6 * last_in
        layers.append(ConvNormActivation(last_in, last_conv, kernel_size=1, activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )

        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def _v3_setting(arch: str, width_mult: float) -> tuple[list[BlockConfig], int]:
    c = partial(BlockConfig, width_mult=width_mult)
    if arch == "large":
        rows = [
            c(16, 3, 16, 16, False, "RE", 1),
            c(16, 3, 64, 24, False, "RE", 2),
            c(24, 3, 72, 24, False, "RE", 1),
            c(24, 5, 72, 40, True, "RE", 2),
            c(40, 5, 120, 40, True, "RE", 1),
            c(40, 5, 120, 40, True, "RE", 1),
            c(40, 3, 240, 80, False, "HS", 2),
            c(80, 3, 200, 80, False, "HS", 1),
            c(80, 3, 184, 80, False, "HS", 1),
            c(80, 3, 184, 80, False, "HS", 1),
            c(80, 3, 480, 112, True, "HS", 1),
            c(112, 3, 672, 112, True, "HS", 1),
            c(112, 5, 672, 160, True, "HS", 2),
            c(160, 5, 960, 160, True, "HS", 1),
            c(160, 5, 960, 160, True, "HS", 1),
        ]
        last = 1280
    elif arch == "small":
        rows = [
            c(16, 3, 16, 16, True, "RE", 2),
            c(16, 3, 72, 24, False, "RE", 2),
            c(24, 3, 88, 24, False, "RE", 1),
            c(24, 5, 96, 40, True, "HS", 2),
            c(40, 5, 240, 40, True, "HS", 1),
            c(40, 5, 240, 40, True, "HS", 1),
            c(40, 5, 120, 48, True, "HS", 1),
            c(48, 5, 144, 48, True, "HS", 1),
            c(48, 5, 288, 96, True, "HS", 2),
            c(96, 5, 576, 96, True, "HS", 1),
            c(96, 5, 576, 96, True, "HS", 1),
        ]
        last = 1024
    else:
        raise ValueError(f"unknown MobileNetV3 arch {arch!r}; use 'large' or 'small'")
    return rows, make_divisible(last * width_mult, 8)


def mobilenet_v2() -> MobileNetV2:
    return MobileNetV2()


def mobilenet_v3_large() -> MobileNetV3:
    setting, last = _v3_setting("large", 1.0)
    return MobileNetV3(setting, last)


def mobilenet_v3_small() -> MobileNetV3:
    setting, last = _v3_setting("small", 1.0)
    return MobileNetV3(setting, last)


def mobilenet_v2_tiny() -> MobileNetV2:
    """Width 0.25 and shortened stages (every residual pattern of the full model still occurs)."""
    setting = [
        [1, 16, 1, 1],
        [6, 24, 2, 2],
        [6, 32, 2, 2],
        [6, 64, 2, 2],
        [6, 96, 2, 1],
        [6, 160, 2, 2],
        [6, 320, 1, 1],
    ]
    return MobileNetV2(num_classes=10, width_mult=0.25, inverted_residual_setting=setting)


def mobilenet_v3_tiny() -> MobileNetV3:
    """MobileNetV3-Small topology at width 0.5."""
    setting, last = _v3_setting("small", 0.5)
    return MobileNetV3(setting, last, num_classes=10)


_SMALL = (InputSpec((1, 3, 32, 32)),)
_IMAGENET = (InputSpec((1, 3, 224, 224)),)

SPECS = (
    ModelSpec(
        "mobilenet_v2_tiny",
        mobilenet_v2_tiny,
        _SMALL,
        "classification",
        ("classifier.1",),
        "MobileNetV2 width 0.25: inverted residuals, depthwise 3x3, ReLU6, `x + conv(x)`",
        ("zoo", "sample"),
    ),
    ModelSpec(
        "mobilenet_v3_tiny",
        mobilenet_v3_tiny,
        _SMALL,
        "classification",
        ("classifier.3",),
        "MobileNetV3-Small width 0.5: depthwise 3x3/5x5, SE `x * hardsigmoid(...)`, hardswish",
        ("zoo",),
    ),
    ModelSpec(
        "mobilenet_v2",
        mobilenet_v2,
        _IMAGENET,
        "classification",
        ("classifier.1",),
        "MobileNetV2 1.0 (3.5M params)",
        ("benchmark", "full"),
    ),
    ModelSpec(
        "mobilenet_v3_large",
        mobilenet_v3_large,
        _IMAGENET,
        "classification",
        ("classifier.3",),
        "MobileNetV3-Large 1.0 (5.5M params)",
        ("full",),
    ),
    ModelSpec(
        "mobilenet_v3_small",
        mobilenet_v3_small,
        _IMAGENET,
        "classification",
        ("classifier.3",),
        "MobileNetV3-Small 1.0 (2.5M params)",
        ("full",),
    ),
)
