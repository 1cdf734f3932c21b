"""U-Net: double-conv encoder/decoder with skip concatenation (ConvTranspose and bilinear ups)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._spec import InputSpec, ModelSpec


class DoubleConv(nn.Module):
    """(conv 3x3 → BN → ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None) -> None:
        super().__init__()
        if not mid_channels:
            mid_channels = out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """2x2 max-pool then double conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Upsample the deeper map (ConvTranspose2d halving channels, or bilinear keeping them),
    pad to the skip's size, ``cat([skip, up])``, double conv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, bilinear: bool = False) -> None:
        super().__init__()
        if bilinear:
            self.up: nn.Module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            cat_channels = in_channels + skip_channels
            self.conv = DoubleConv(cat_channels, out_channels, cat_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels // 2 + skip_channels, out_channels)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        x1 = self.up(x1)
        # inputs are (N, C, H, W); odd sizes leave the upsampled map one pixel short
        diff_y = x2.size()[2] - x1.size()[2]
        diff_x = x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        x = torch.cat([x2, x1], dim=1)
        return self.conv(x)


class OutConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class UNet(nn.Module):
    """Four down and four up levels. ``bilinear[i]`` picks the upsampling of ``up{i+1}``."""

    def __init__(
        self,
        n_channels: int = 3,
        n_classes: int = 2,
        base: int = 64,
        bilinear: Sequence[bool] = (False, False, False, False),
    ) -> None:
        super().__init__()
        if len(bilinear) != 4:
            raise ValueError("bilinear needs one flag per up level (4)")
        self.n_channels = n_channels
        self.n_classes = n_classes
        c = [base, base * 2, base * 4, base * 8, base * 16]
        self.inc = DoubleConv(n_channels, c[0])
        self.down1 = Down(c[0], c[1])
        self.down2 = Down(c[1], c[2])
        self.down3 = Down(c[2], c[3])
        self.down4 = Down(c[3], c[4])
        self.up1 = Up(c[4], c[3], c[3], bilinear[0])
        self.up2 = Up(c[3], c[2], c[2], bilinear[1])
        self.up3 = Up(c[2], c[1], c[1], bilinear[2])
        self.up4 = Up(c[1], c[0], c[0], bilinear[3])
        self.outc = OutConv(c[0], n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        logits = self.outc(x)
        return logits


def unet() -> UNet:
    """Base width 8; the last up level is bilinear ``nn.Upsample``, the others ConvTranspose2d."""
    return UNet(n_channels=3, n_classes=2, base=8, bilinear=(False, False, False, True))


SPECS = (
    ModelSpec(
        "unet",
        unet,
        (InputSpec((1, 3, 32, 32)),),
        "segmentation",
        ("outc.conv",),
        "U-Net base 8, 4 levels: double conv, max-pool down, ConvTranspose2d and bilinear nn.Upsample up, "
        "F.pad + skip `torch.cat([skip, up], dim=1)`, 1x1 output conv",
        ("zoo",),
    ),
)
