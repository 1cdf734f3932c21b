"""The timm and torchvision models the real-library finalize tests run on, and how each is set up.

Every model is built by its library with random weights (``pretrained=False`` / ``weights=None``,
nothing downloaded) and then made non-trivial: parameters a library initializes to exactly zero
(torchvision ViT's head and class token) get small random values, every BatchNorm-like layer gets
random scales and shifts (a masked channel is then not accidentally one that was already constant),
and BatchNorm running statistics come from a few random batches (so activations stay in range and
the output depends on the input). Inputs are small (64 x 64 where the architecture allows it).

``python -m tests.real.vision_models`` prints the table of docs/finalize.md ("timm and torchvision").
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from deployprune._compat import tolerate_missing_torchvision_ops

tolerate_missing_torchvision_ops()  # before timm/torchvision are imported (tests/conftest.py does it too)

import timm  # noqa: E402 - test dependencies: a missing one is an error, not a skip
import torchvision  # noqa: E402

import deployprune as dp  # noqa: E402
from deployprune.finalize import ChannelGroup, channel_groups  # noqa: E402

from ..finalize.helpers import group_masks, masked_copy  # noqa: E402
from .expected import expected_count, expected_shapes, removable_slices  # noqa: E402

# Why channel_groups may decline a group of these models (every other group gets 50% masked).
MODEL_OUTPUT = "model output"
LAYER_NORM = ("normalized by layer_norm", "normalized by LayerNorm (statistics over these channels)")
HEAD_POSITIONS = "positions inside attention heads are kept; remove whole heads"
CHANNEL_SPLIT = "coupled through a channel split (chunk) or shuffle: not supported by groups yet"


@dataclass(frozen=True)
class Spec:
    id: str
    make: Callable[[], nn.Module]
    size: int = 64
    declined: tuple[str, ...] = (MODEL_OUTPUT,)  # reasons channel_groups may give for a group it declines
    deploy: bool = False  # timm's reparameterize_model after random init (RepVGG's deploy form)


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return functools.partial(timm.create_model, name, pretrained=False, num_classes=10, **kwargs)


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return functools.partial(getattr(torchvision.models, name), weights=None, num_classes=10, **kwargs)


def _tv_vit() -> nn.Module:
    # vit_b_16's architecture (class token, nn.MultiheadAttention encoder) at a size that runs in seconds
    return torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=4,
                                               hidden_dim=64, mlp_dim=128, num_classes=10)


SPECS: list[Spec] = [
    Spec("timm/efficientnet_b0", _timm("efficientnet_b0")),
    Spec("timm/mobilenetv3_large_100", _timm("mobilenetv3_large_100")),
    Spec("timm/regnetx_002", _timm("regnetx_002")),
    Spec("timm/ghostnet_100", _timm("ghostnet_100")),
    Spec("timm/repvgg_a0", _timm("repvgg_a0")),
    Spec("timm/repvgg_a0-deploy", _timm("repvgg_a0"), deploy=True),
    Spec("timm/levit_128s", _timm("levit_128s", img_size=112), size=112),
    Spec("timm/cspresnet50", _timm("cspresnet50"), declined=(MODEL_OUTPUT, CHANNEL_SPLIT)),
    Spec("timm/resnet18", _timm("resnet18")),
    Spec("timm/resnet50", _timm("resnet50")),
    Spec("timm/convnext_atto", _timm("convnext_atto"), declined=(MODEL_OUTPUT, *LAYER_NORM)),
    Spec("timm/vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", img_size=64),
         declined=(MODEL_OUTPUT, *LAYER_NORM, HEAD_POSITIONS)),
    Spec("tv/resnet18", _tv("resnet18")),
    Spec("tv/mobilenet_v2", _tv("mobilenet_v2")),
    Spec("tv/mobilenet_v3_small", _tv("mobilenet_v3_small")),
    Spec("tv/efficientnet_b0", _tv("efficientnet_b0")),
    Spec("tv/regnet_x_400mf", _tv("regnet_x_400mf")),
    Spec("tv/shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5"), declined=(MODEL_OUTPUT, CHANNEL_SPLIT)),
    Spec("tv/squeezenet1_0", _tv("squeezenet1_0")),
    Spec("tv/densenet121", _tv("densenet121")),
    Spec("tv/convnext_tiny", _tv("convnext_tiny"), declined=(MODEL_OUTPUT, *LAYER_NORM)),
    Spec("tv/vit", _tv_vit, declined=(MODEL_OUTPUT, *LAYER_NORM, HEAD_POSITIONS)),
    Spec("tv/swin_t", _tv("swin_t"), declined=(MODEL_OUTPUT, *LAYER_NORM, HEAD_POSITIONS)),
]
BY_ID = {s.id: s for s in SPECS}


def seed_of(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode())


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random values where the library starts from exact zeros or from BatchNorm's identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def calibrate_(model: nn.Module, size: int, seed: int) -> nn.Module:
    """Running statistics of every BatchNorm from a few random batches, as training would leave them:
    with random statistics a deep network saturates (ReLU6 at 0 or 6) and its output stops depending
    on the input, which would make any parity check vacuous."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(6, 3, size, size, generator=g))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


def build(spec: Spec) -> nn.Module:
    torch.manual_seed(seed_of(spec.id, "init"))
    model = randomize_(spec.make(), seed_of(spec.id, "randomize"))
    calibrate_(model, spec.size, seed_of(spec.id, "calibrate"))
    if spec.deploy:
        from timm.utils.model import reparameterize_model

        model = reparameterize_model(model)
    return model.eval()


def inputs(spec: Spec, batch: int, seed: int) -> tuple[torch.Tensor]:
    """Noise images whose per-channel mean and contrast differ from sample to sample: white noise alone
    averages out in the global pooling of these networks, and their outputs would hardly differ."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(batch, 3, 1, 1, generator=g)
    scale = torch.rand(batch, 3, 1, 1, generator=g) + 0.5
    return (mean + scale * torch.randn(batch, 3, spec.size, spec.size, generator=g),)


@dataclass
class Case:
    spec: Spec
    model: nn.Module  # the dense model
    example: tuple[torch.Tensor]
    groups: list[ChannelGroup]
    masks: dict
    removed: dict[int, np.ndarray]  # group id -> removed channels
    result: Any  # dp.CompactionResult
    reference: nn.Module  # the dense model with the masks multiplied in
    expected: dict[str, tuple] = field(default_factory=dict)  # parameter name -> shape after removal

    @property
    def expected_params(self) -> int:
        return expected_count(self.expected)


@functools.cache
def case(spec_id: str) -> Case:
    spec = BY_ID[spec_id]
    model = build(spec)
    x = inputs(spec, 1, seed_of(spec.id, "example"))
    groups = channel_groups(model, x)
    masks, removed = group_masks(model, groups, seed=seed_of(spec.id, "masks"))
    result = dp.compact(model, x, masks)
    reference = masked_copy(model, masks)
    probes = [inputs(spec, 2, seed_of(spec.id, "probe", str(i))) for i in range(2)]
    expected = expected_shapes(model, removable_slices(model, reference, masks, probes))
    return Case(spec, model, x, groups, masks, removed, result, reference, expected)


def table() -> str:
    """docs/finalize.md's table: parameters dense / with every masked group removed / compacted."""
    rows = ["| model | input | groups masked | params dense | masked groups removed | compacted | finalize |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for spec in SPECS:
        c = case(spec.id)
        r = c.result
        rows.append(f"| {spec.id} | {spec.size}x{spec.size} | {len(c.removed)} of {len(c.groups)} | "
                    f"{r.params_before:,} | {c.expected_params:,} | {r.params_after:,} | {r.seconds:.1f} s |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(f"torch {torch.__version__}, timm {timm.__version__}, torchvision {torchvision.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(table())
