"""RegNetY: residual bottlenecks with grouped 3x3 convs of fixed group width and SE."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._layers import ConvNormActivation, SqueezeExcitation, make_divisible
from ._spec import InputSpec, ModelSpec


class SimpleStemIN(ConvNormActivation):
    """3x3 stride-2 conv, BN, ReLU."""

    def __init__(self, width_in: int, width_out: int) -> None:
        super().__init__(width_in, width_out, kernel_size=3, stride=2)


class BottleneckTransform(nn.Sequential):
    """1x1 → grouped 3x3 (stride) → SE → 1x1, as an ordered ``a``/``b``/``se``/``c`` Sequential."""

    def __init__(
        self,
        width_in: int,
        width_out: int,
        stride: int,
        group_width: int,
        bottleneck_multiplier: float,
        se_ratio: float | None,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        w_b = int(round(width_out * bottleneck_multiplier))
        g = w_b // group_width
        layers["a"] = ConvNormActivation(width_in, w_b, kernel_size=1)
        layers["b"] = ConvNormActivation(w_b, w_b, kernel_size=3, stride=stride, groups=g)
        if se_ratio:
            width_se_out = int(round(se_ratio * width_in))
            layers["se"] = SqueezeExcitation(w_b, width_se_out, activation=nn.ReLU)
        layers["c"] = ConvNormActivation(w_b, width_out, kernel_size=1, activation_layer=None)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    """``x = proj(x) + f(x)`` (or ``x + f(x)``), then ReLU."""

    def __init__(
        self,
        width_in: int,
        width_out: int,
        stride: int,
        group_width: int = 1,
        bottleneck_multiplier: float = 1.0,
        se_ratio: float | None = None,
    ) -> None:
        super().__init__()
        self.proj = None
        if (width_in != width_out) or (stride != 1):
            self.proj = ConvNormActivation(width_in, width_out, kernel_size=1, stride=stride, activation_layer=None)
        self.f = BottleneckTransform(width_in, width_out, stride, group_width, bottleneck_multiplier, se_ratio)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class AnyStage(nn.Sequential):
    def __init__(
        self,
        width_in: int,
        width_out: int,
        stride: int,
        depth: int,
        group_width: int,
        bottleneck_multiplier: float,
        se_ratio: float | None,
        stage_index: int,
    ) -> None:
        super().__init__()
        for i in range(depth):
            block = ResBottleneckBlock(
                width_in if i == 0 else width_out,
                width_out,
                stride if i == 0 else 1,
                group_width,
                bottleneck_multiplier,
                se_ratio,
            )
            # torchvision's names ("block1-0") are kept: they are not Python identifiers
            self.add_module(f"block{stage_index}-{i}", block)


@dataclass(frozen=True)
class BlockParams:
    depths: Sequence[int]
    widths: Sequence[int]
    group_widths: Sequence[int]
    bottleneck_multipliers: Sequence[float]
    strides: Sequence[int]
    se_ratio: float | None = None

    @classmethod
    def from_init_params(
        cls,
        depth: int,
        w_0: int,
        w_a: float,
        w_m: float,
        group_width: int,
        bottleneck_multiplier: float = 1.0,
        se_ratio: float | None = None,
    ) -> BlockParams:
        """The RegNet design-space rule: linear widths ``w_0 + w_a * j`` quantized to powers of
        ``w_m``, runs of equal width forming stages (Radosavovic et al., 2020)."""
        quant, stride = 8, 2
        if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % 8 != 0:
            raise ValueError("invalid RegNet settings")
        # computed in float32 on the CPU whatever the default device, like the reference
        widths_cont = torch.arange(depth, device="cpu") * w_a + w_0
        block_capacity = torch.round(torch.log(widths_cont / w_0) / math.log(w_m))
        block_widths = (torch.round(torch.divide(w_0 * torch.pow(w_m, block_capacity), quant)) * quant).int().tolist()
        num_stages = len(set(block_widths))
        starts = [i for i in range(depth) if i == 0 or block_widths[i] != block_widths[i - 1]]
        stage_widths = [block_widths[i] for i in starts]
        stage_depths = [b - a for a, b in zip(starts, starts[1:] + [depth], strict=True)]
        multipliers = [bottleneck_multiplier] * num_stages
        groups = [group_width] * num_stages
        stage_widths, groups = _adjust_widths_groups(stage_widths, multipliers, groups)
        return cls(stage_depths, stage_widths, groups, multipliers, [stride] * num_stages, se_ratio)


def _adjust_widths_groups(
    stage_widths: list[int], bottleneck_ratios: list[float], group_widths: list[int]
) -> tuple[list[int], list[int]]:
    """Make bottleneck widths multiples of the group width (shrinking the group width if needed)."""
    widths = [int(w * b) for w, b in zip(stage_widths, bottleneck_ratios, strict=True)]
    group_min = [min(g, w) for g, w in zip(group_widths, widths, strict=True)]
    ws_bot = [make_divisible(w, g) for w, g in zip(widths, group_min, strict=True)]
    stage_widths = [int(w / b) for w, b in zip(ws_bot, bottleneck_ratios, strict=True)]
    return stage_widths, group_min


class RegNet(nn.Module):
    def __init__(self, block_params: BlockParams, num_classes: int = 1000, stem_width: int = 32) -> None:
        super().__init__()
        self.stem = SimpleStemIN(3, stem_width)
        current_width = stem_width
        blocks = []
        for i, (width_out, stride, depth, group_width, bottleneck_multiplier) in enumerate(
            zip(
                block_params.widths,
                block_params.strides,
                block_params.depths,
                block_params.group_widths,
                block_params.bottleneck_multipliers,
                strict=True,
            )
        ):
            blocks.append(
                (
                    f"block{i + 1}",
                    AnyStage(
                        current_width,
                        width_out,
                        stride,
                        depth,
                        group_width,
                        bottleneck_multiplier,
                        block_params.se_ratio,
                        stage_index=i + 1,
                    ),
                )
            )
            current_width = width_out
        self.trunk_output = nn.Sequential(OrderedDict(blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_features=current_width, out_features=num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.trunk_output(x)
        x = self.avgpool(x)
        x = x.flatten(start_dim=1)
        x = self.fc(x)
        return x


def regnet_y_400mf() -> RegNet:
    params = BlockParams.from_init_params(depth=16, w_0=48, w_a=27.89, w_m=2.09, group_width=8, se_ratio=0.25)
    return RegNet(params)


def regnet() -> RegNet:
    """RegNetY-style: stages of widths 16-128, depths (1,1,2,1), group width 8, SE ratio 0.25."""
    params = BlockParams(
        depths=(1, 1, 2, 1),
        widths=(16, 32, 64, 128),
        group_widths=(8, 8, 8, 8),
        bottleneck_multipliers=(1.0, 1.0, 1.0, 1.0),
        strides=(2, 2, 2, 2),
        se_ratio=0.25,
    )
    return RegNet(params, num_classes=10, stem_width=16)


SPECS = (
    ModelSpec(
        "regnet",
        regnet,
        (InputSpec((1, 3, 32, 32)),),
        "classification",
        ("fc",),
        "RegNetY-style: grouped 3x3 (group width 8), SE `x * sigmoid(...)`, `proj(x) + f(x)`, block names with '-'",
        ("zoo",),
    ),
    ModelSpec(
        "regnet_y_400mf",
        regnet_y_400mf,
        (InputSpec((1, 3, 224, 224)),),
        "classification",
        ("fc",),
        "RegNetY-400MF (4.3M params)",
        ("full",),
    ),
)
