"""ResNet (basic and bottleneck blocks) and ResNeXt, in the style of torchvision's ResNet."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ._spec import InputSpec, ModelSpec


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """1x1 reduce → 3x3 (stride, groups) → 1x1 expand (x4), stride on the 3x3 ("ResNet v1.5")."""

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """7x7 stem, max-pool, four stages, global average pool, ``torch.flatten``, fc.

    ``width`` is the channel count of the stem and first stage (64 in the paper); stage
    ``i`` uses ``width * 2**i`` planes, so small test models keep the exact topology.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        width: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = width
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    groups=self.groups,
                    base_width=self.base_width,
                    norm_layer=norm_layer,
                )
            )
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


# Reference sizes (ImageNet heads, 224x224 inputs).
def resnet18() -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2])


def resnet34() -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3])


def resnet50() -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3])


def resnet101() -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3])


def resnet152() -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3])


def resnext50_32x4d() -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4)


# Test sizes (32x32 inputs, 10 classes).
def resnet_basic() -> ResNet:
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, width=16)


def resnet_bottleneck() -> ResNet:
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width=16)


def resnext() -> ResNet:
    # layer widths 8, 16, 32, 64 split into 4 groups of (2, 4, 8, 16) channels
    return ResNet(Bottleneck, [1, 2, 1, 1], num_classes=10, width=16, groups=4, width_per_group=8)


_IMAGENET = (InputSpec((1, 3, 224, 224)),)
_SMALL = (InputSpec((1, 3, 32, 32)),)


def _full(name: str, factory: Callable[[], nn.Module], description: str, tags: tuple[str, ...]) -> ModelSpec:
    return ModelSpec(name, factory, _IMAGENET, "classification", ("fc",), description, tags)


SPECS = (
    ModelSpec(
        "resnet_basic",
        resnet_basic,
        _SMALL,
        "classification",
        ("fc",),
        "ResNet, BasicBlock [1,1,1,1], width 16: residual `out += identity`, downsample conv1x1+BN",
        ("zoo", "sample"),
    ),
    ModelSpec(
        "resnet_bottleneck",
        resnet_bottleneck,
        _SMALL,
        "classification",
        ("fc",),
        "ResNet, Bottleneck [1,1,1,1], width 16: 1x1-3x3-1x1 x4 expansion, projection shortcuts",
        ("zoo",),
    ),
    ModelSpec(
        "resnext",
        resnext,
        _SMALL,
        "classification",
        ("fc",),
        "ResNeXt bottleneck [1,2,1,1], groups=4, width_per_group 8: grouped 3x3 conv",
        ("zoo",),
    ),
    _full("resnet18", resnet18, "ResNet-18 (11.7M params)", ("benchmark", "depth-family", "full")),
    _full("resnet34", resnet34, "ResNet-34 (21.8M params)", ("benchmark", "depth-family", "full")),
    _full("resnet50", resnet50, "ResNet-50 (25.6M params)", ("benchmark", "depth-family", "full")),
    _full("resnet101", resnet101, "ResNet-101 (44.5M params)", ("benchmark", "depth-family", "full")),
    _full("resnet152", resnet152, "ResNet-152 (60.2M params)", ("benchmark", "depth-family", "full")),
    _full("resnext50_32x4d", resnext50_32x4d, "ResNeXt-50 32x4d (25.0M params)", ("full",)),
)
