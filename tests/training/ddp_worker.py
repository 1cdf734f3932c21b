"""Run under ``torchrun --nproc_per_node=2``: fine-tune with a pruner, dump per-rank hashes.

Usage: ddp_worker.py OUT_DIR. Writes OUT_DIR/rank<R>.json with hashes of the masks and the
weights, the pruner step and the final validation accuracy; rank 0 also writes checkpoints to
OUT_DIR/ckpt (nothing else may write there).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deployprune as dp
from deployprune.training import finetune


def _hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    torch.manual_seed(1000 + rank)  # different on purpose: DDP must broadcast rank 0's weights
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(x, y), batch_size=64)
    config = {
        "module_type_configs": {"Conv2d": {"target_sparsity": 0.5, "granularity": "channel"},
                                "Linear": {"target_sparsity": 0.7}},
        "schedule": {"type": "polynomial", "begin_step": 0, "end_step": 6, "frequency": 2},
    }
    pruner = dp.Pruner(model, config, (x[:1],))
    result = finetune(model, pruner, train, val, epochs=2, optimizer_kwargs={"lr": 0.01}, progress=False,
                      checkpoint_dir=os.path.join(out_dir, "ckpt"), seed=5)
    masks = {f"{m}.{p}": t for m, per in pruner.masks().items() for p, t in per.items()}
    info = {
        "rank": rank,
        "world_size": result.world_size,
        "masks": _hash(masks),
        "weights": _hash(dict(model.state_dict())),
        "step": pruner.step_count,
        "global_step": result.global_step,
        "val_accuracy": result.final_val_accuracy,
        "mask_sync_differences": result.mask_sync_differences,
        "sparsity": {k: float((~v).float().mean()) for k, v in masks.items()},
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(info, fh)


if __name__ == "__main__":
    main(sys.argv[1])
