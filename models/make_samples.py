"""Regenerate the sample checkpoints in ``models/samples/`` (deterministic, byte for byte).

    python -m deployprune.zoo.make_samples            # rewrite the samples
    python -m deployprune.zoo.make_samples --check    # exit 1 if a committed sample differs

Samples are deployprune checkpoints (``{"format": "deployprune.checkpoint", "arch": ...,
"state_dict": ..., "masks": ...}``), loadable with ``torch.load(weights_only=True)``:

* ``lenet.pt``: the NNI speedup tutorial's ``TorchModel`` with the tutorial's masks: the first
  three output channels of ``conv1`` masked (weight only, bias left alone, as in the tutorial).
* ``resnet_small.pt``: the registry's ``resnet_basic`` with 50% of the output channels of each
  residual block's inner convolution masked together with the BatchNorm that follows it (the
  channels with the smallest L1 norm), so masked channels are exactly zero.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"


def lenet_masks(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The NNI tutorial masks: conv1 output channels 0..2 masked, weight only."""
    mask = torch.ones_like(model.conv1.weight, dtype=torch.bool)
    mask[0:3] = False
    return {"conv1": {"weight": mask}}


def block_channel_masks(model: nn.Module, ratio: float = 0.5) -> dict[str, dict[str, torch.Tensor]]:
    """Mask ``ratio`` of the output channels of every residual block's inner conv + its BN.

    A block is any module with ``conv1``/``bn1`` and ``conv2`` children (BasicBlock; for a
    Bottleneck, ``conv2``/``bn2`` are masked as well). Channels with the smallest L1 weight
    norm go first; ties are broken by index, so the result is deterministic.
    """
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in model.named_modules():
        pairs = [("conv1", "bn1")]
        if hasattr(module, "conv3") and hasattr(module, "bn2"):
            pairs.append(("conv2", "bn2"))  # bottleneck: both inner convs
        if not (hasattr(module, "conv1") and hasattr(module, "bn1") and hasattr(module, "conv2")):
            continue
        if name == "":
            continue  # the stem conv feeds the residual stream: not an inner conv
        for conv_name, bn_name in pairs:
            conv = getattr(module, conv_name)
            out = conv.weight.shape[0]
            n_pruned = int(out * ratio)
            if n_pruned == 0 or n_pruned >= out:
                continue
            scores = conv.weight.detach().abs().flatten(1).sum(1)
            order = torch.argsort(scores, stable=True)
            keep = torch.ones(out, dtype=torch.bool)
            keep[order[:n_pruned]] = False
            prefix = f"{name}." if name else ""
            wshape = [-1] + [1] * (conv.weight.dim() - 1)
            masks[f"{prefix}{conv_name}"] = {"weight": keep.reshape(wshape).expand_as(conv.weight).clone()}
            if conv.bias is not None:
                masks[f"{prefix}{conv_name}"]["bias"] = keep.clone()
            masks[f"{prefix}{bn_name}"] = {"weight": keep.clone(), "bias": keep.clone()}
    return masks


def _build(arch: str) -> nn.Module:
    from deployprune import zoo

    return zoo.build(arch)


SAMPLES: dict[str, tuple[str, Callable[[nn.Module], dict]]] = {
    "lenet.pt": ("lenet", lenet_masks),
    "resnet_small.pt": ("resnet_basic", block_channel_masks),
}


def sample_bytes(arch: str, make_masks: Callable[[nn.Module], dict]) -> bytes:
    from deployprune.io import make_checkpoint

    torch.manual_seed(0)
    model = _build(arch)
    masks = make_masks(model)
    ckpt = make_checkpoint(
        model,
        arch=arch,
        masks=masks,
        meta={"generator": "models/make_samples.py", "description": f"{arch} sample with masks"},
    )
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR, help="output directory")
    args = parser.parse_args(argv)
    from deployprune.fsutil import write_bytes_atomic

    status = 0
    for filename, (arch, make_masks) in SAMPLES.items():
        data = sample_bytes(arch, make_masks)
        path = args.out / filename
        digest = hashlib.sha256(data).hexdigest()[:16]
        if args.check:
            same = path.is_file() and path.read_bytes() == data
            print(f"{path}: {'up to date' if same else 'DIFFERS'} ({digest})")
            status |= 0 if same else 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, data, force=True)
            print(f"{path}: {len(data):,} bytes ({digest})")
    return status


if __name__ == "__main__":
    sys.exit(main())
