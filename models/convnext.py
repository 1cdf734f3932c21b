"""ConvNeXt: depthwise 7x7, channels-last LayerNorm + pointwise MLP, layer scale, residual."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._layers import StochasticDepth
from ._spec import InputSpec, ModelSpec


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of an (N, C, H, W) tensor, written out by hand."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.normalized_shape = (normalized_shape,)

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        x = self.weight[:, None, None] * x + self.bias[:, None, None]
        return x


class Block(nn.Module):
    """dwconv7x7 → permute to NHWC → LayerNorm → Linear(4x) → GELU → Linear → gamma * x → NCHW → + input."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (
            nn.Parameter(layer_scale_init_value * torch.ones(dim), requires_grad=True)
            if layer_scale_init_value > 0
            else None
        )
        self.drop_path = StochasticDepth(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        input = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        x = input + self.drop_path(x)
        return x


class ConvNeXt(nn.Module):
    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        self.downsample_layers.append(stem)
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm2d(dims[i], eps=1e-6),
                    nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
                )
            )

        self.stages = nn.ModuleList()
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        cur = 0
        for i in range(4):
            self.stages.append(
                nn.Sequential(
                    *[
                        Block(dims[i], drop_path=rates[cur + j], layer_scale_init_value=layer_scale_init_value)
                        for j in range(depths[i])
                    ]
                )
            )
            cur += depths[i]

        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.constant_(m.bias, 0)
        self.head.weight.data.mul_(head_init_scale)
        self.head.bias.data.mul_(head_init_scale)

    def forward_features(self, x: Tensor) -> Tensor:
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
        return self.norm(x.mean([-2, -1]))  # global average pooling, (N, C, H, W) -> (N, C)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.head(x)
        return x


def convnext_tiny() -> ConvNeXt:
    return ConvNeXt(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))


def convnext() -> ConvNeXt:
    """Depths (1,1,2,1), dims 16-128. Layer scale starts at 1.0 (not 1e-6) so that, untrained,
    every block's branch still contributes to the output and parity checks can see it."""
    return ConvNeXt(num_classes=10, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), layer_scale_init_value=1.0)


SPECS = (
    ModelSpec(
        "convnext",
        convnext,
        (InputSpec((1, 3, 32, 32)),),
        "classification",
        ("head",),
        "ConvNeXt dims 16-128: depthwise 7x7, permute + channels-last LayerNorm, Linear 4x MLP, "
        "layer scale `gamma * x`, channels-first LayerNorm (mean over dim 1)",
        ("zoo",),
    ),
    ModelSpec(
        "convnext_tiny",
        convnext_tiny,
        (InputSpec((1, 3, 224, 224)),),
        "classification",
        ("head",),
        "ConvNeXt-T (28.6M params)",
        ("full",),
    ),
)
