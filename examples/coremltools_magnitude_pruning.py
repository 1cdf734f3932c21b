"""The coremltools magnitude-pruning tutorial flow, on scikit-learn's bundled 8x8 digits.

1. Train the tutorial's MNIST-style network (conv 3x3 -> ReLU -> max-pool -> dense ->
   log-softmax) on the digits, dense.
2. Prune it gradually while fine-tuning: conv layers to 70 % and dense layers to 80 %
   per-element sparsity, magnitude (L1) criterion, polynomial schedule (Zhu & Gupta) whose
   update steps span the first part of the fine-tuning. The pruner advances once per
   optimizer step (``deployprune.training.finetune``).
3. Finalize (for per-element masks this bakes the zeros in; no layer changes shape) and export
   to Core ML (mlprogram) with the zeros stored as ``constexpr_sparse_to_dense`` weights, then
   verify the package by reading it back (prediction needs macOS).

Run: ``python examples/coremltools_magnitude_pruning.py`` (about a minute on 2 CPU cores);
``--quick`` runs one epoch of each phase (used by the test). Needs scikit-learn
(``pip install 'deployprune[data]'``).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

import deployprune as dp
from deployprune import zoo
from deployprune.data import digits
from deployprune.training import evaluate, finetune


def cosine(epochs: int) -> dict:
    """finetune() options: Adam's learning rate decays to 0 along a cosine over the run (per epoch)."""
    return {"lr_scheduler": "torch.optim.lr_scheduler.CosineAnnealingLR", "lr_scheduler_kwargs": {"T_max": epochs}}


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-epochs", type=int, default=20, help="dense training epochs")
    ap.add_argument("--finetune-epochs", type=int, default=16, help="pruning + fine-tuning epochs")
    ap.add_argument("--quick", action="store_true", help="one epoch of each phase (smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="directory for digits_pruned.mlpackage (default: temp)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.train_epochs, args.finetune_epochs = 1, 1

    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    torch.manual_seed(args.seed)
    train, val = digits(batch_size=32, seed=args.seed)
    model = zoo.build("mnist_net_digits")
    example = (torch.zeros(1, 1, 8, 8),)

    # 1. dense training (the tutorial's network ends in LogSoftmax, so NLLLoss is its loss)
    finetune(model, None, train, val, epochs=args.train_epochs, optimizer_kwargs={"lr": 3e-3},
             criterion="torch.nn.NLLLoss", seed=args.seed, **cosine(args.train_epochs))
    dense_acc = evaluate(model, val)["accuracy"]
    dense = copy.deepcopy(model)

    # 2. gradual magnitude pruning during fine-tuning: the sparsity ramps up over the first half of
    #    the fine-tuning steps (update three times per epoch), the rest lets accuracy recover
    steps_per_epoch = len(train)
    end_step = max(1, steps_per_epoch * args.finetune_epochs // 2)
    config = {
        "module_type_configs": {"Conv2d": {"target_sparsity": 0.7}, "Linear": {"target_sparsity": 0.8}},
        "schedule": {"type": "polynomial", "begin_step": 0, "end_step": end_step,
                     "frequency": max(1, steps_per_epoch // 3)},
    }
    pruner = dp.Pruner(model, config, example)
    result = finetune(model, pruner, train, val, epochs=args.finetune_epochs, optimizer_kwargs={"lr": 3e-3},
                      criterion="torch.nn.NLLLoss", seed=args.seed, **cosine(args.finetune_epochs))
    pruned_acc = result.final_val_accuracy
    print(pruner.summary())

    # 3. finalize and export to Core ML with sparse weights; check the package by reading it back
    compact = pruner.finalize()
    compact_acc = evaluate(compact, val)["accuracy"]
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="dp-coreml-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    package = out_dir / "digits_pruned.mlpackage"
    # the digits net's layers are small: lower the size floor so they are stored sparse too
    dp.export(model, example, package, target="coreml", force=True, sparse_min_elements=64)
    report = dp.validate(compact, package, example, latency=False)
    masks = pruner.masks()
    sparsity = {name: float((~per["weight"]).float().mean()) for name, per in masks.items()}

    print()
    print(f"{'':32} {'accuracy':>9}")
    print(f"{'dense':32} {dense_acc:9.4f}")
    print(f"{'pruned (conv 70%, dense 80%)':32} {pruned_acc:9.4f}   ({pruned_acc - dense_acc:+.4f})")
    print(f"{'finalized':32} {compact_acc:9.4f}")
    print("sparsity: " + ", ".join(f"{k} {v:.1%}" for k, v in sparsity.items()))
    info = report.coreml or {}
    print(f"Core ML: {package} ({'read-back PASSED' if report.passed else 'read-back FAILED'}; "
          f"{info.get('sparse_constants', 0)} sparse weights, weight file {info.get('weight_file_bytes')} B "
          f"vs {info.get('dense_weight_file_bytes')} B dense)")
    del dense
    return {"dense_accuracy": dense_acc, "pruned_accuracy": pruned_acc, "finalized_accuracy": compact_acc,
            "passed": float(report.passed), **{f"sparsity_{k}": v for k, v in sparsity.items()}}


if __name__ == "__main__":
    main()
