"""MLP-Mixer: token-mixing MLP across patches (via transpose) and channel-mixing MLP."""

from __future__ import annotations

from torch import Tensor, nn

from ._spec import InputSpec, ModelSpec
from .vit import Mlp, PatchEmbed


class MixerBlock(nn.Module):
    def __init__(self, dim: int, seq_len: int, mlp_ratio: tuple[float, float] = (0.5, 4.0)) -> None:
        super().__init__()
        tokens_dim, channels_dim = (int(r * dim) for r in mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(seq_len, tokens_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, channels_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.mlp_channels(self.norm2(x))
        return x


class MlpMixer(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        img_size: int = 224,
        in_chans: int = 3,
        patch_size: int = 16,
        num_blocks: int = 8,
        embed_dim: int = 512,
        mlp_ratio: tuple[float, float] = (0.5, 4.0),
    ) -> None:
        super().__init__()
        self.stem = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.blocks = nn.Sequential(
            *[MixerBlock(embed_dim, self.stem.num_patches, mlp_ratio) for _ in range(num_blocks)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.blocks(x)
        x = self.norm(x)
        x = x.mean(dim=1)  # average over tokens
        x = self.head(x)
        return x


def mixer_b16() -> MlpMixer:
    return MlpMixer(patch_size=16, num_blocks=12, embed_dim=768)


def mixer() -> MlpMixer:
    return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=64)


SPECS = (
    ModelSpec(
        "mixer",
        mixer,
        (InputSpec((1, 3, 32, 32)),),
        "classification",
        ("head",),
        "MLP-Mixer D=64, 16 tokens, 2 blocks: token MLP between `transpose(1, 2)`s, channel MLP, "
        "LayerNorm, residuals, `mean(dim=1)`",
        ("zoo",),
    ),
    ModelSpec(
        "mixer_b16",
        mixer_b16,
        (InputSpec((1, 3, 224, 224)),),
        "classification",
        ("head",),
        "Mixer-B/16 (59.9M params)",
        ("full",),
    ),
)
