"""NNI-style structured pruning + speedup, on scikit-learn's bundled 8x8 digits.

The flow of NNI's "pruning quickstart" / ModelSpeedup tutorial, with deployprune's API:

1. train the MNIST-style digits network dense;
2. prune 50 % of the output channels of every Conv2d by L1 norm with an NNI ``config_list``
   (one shot: ``pruner.compress()`` returns NNI-layout masks);
3. fine-tune with the masks attached (the masked channels stay zero);
4. speed up: ``pruner.finalize()`` replaces the conv with a physically smaller one (and the
   dense layer reading it loses the matching input columns), with exact output parity;
5. export dense and compact models to ONNX and compare accuracy, parameters and onnxruntime
   latency (``deployprune.validate``: interleaved timing, medians).

Run: ``python examples/nni_structured_speedup.py`` (well under a minute on 2 CPU cores);
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
from deployprune.pipeline import count_params
from deployprune.training import evaluate, finetune


def cosine(epochs: int) -> dict:
    """finetune() options: Adam's learning rate decays to 0 along a cosine over the run (per epoch)."""
    return {"lr_scheduler": "torch.optim.lr_scheduler.CosineAnnealingLR", "lr_scheduler_kwargs": {"T_max": epochs}}


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-epochs", type=int, default=20, help="dense training epochs")
    ap.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs after pruning")
    ap.add_argument("--quick", action="store_true", help="one epoch of each phase (smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="directory for the ONNX files (default: temp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_epochs, args.finetune_epochs = 1, 1

    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    torch.manual_seed(args.seed)
    train, val = digits(batch_size=32, seed=args.seed)
    model = zoo.build("mnist_net_digits")
    example = (torch.zeros(1, 1, 8, 8),)

    # 1. dense training
    finetune(model, None, train, val, epochs=args.train_epochs, optimizer_kwargs={"lr": 3e-3},
             criterion="torch.nn.NLLLoss", seed=args.seed, **cosine(args.train_epochs))
    dense = copy.deepcopy(model).eval()
    dense_acc = evaluate(dense, val)["accuracy"]

    # 2. one-shot structured pruning, NNI config_list style (the dense layer is the output layer:
    #    its channels are the classes and are never pruned)
    config_list = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "out_channel"}]
    pruner = dp.Pruner(model, config_list, example)
    _, masks = pruner.compress()
    oneshot_acc = evaluate(model, val)["accuracy"]

    # 3. fine-tune with the masks attached (constant schedule: masks fixed at step 0)
    result = finetune(model, pruner, train, val, epochs=args.finetune_epochs, optimizer_kwargs={"lr": 3e-3},
                      criterion="torch.nn.NLLLoss", seed=args.seed, **cosine(args.finetune_epochs))
    print(pruner.summary())

    # 4. speedup: a physically smaller model with the masked model's outputs
    compact = pruner.finalize()
    compact_acc = evaluate(compact, val)["accuracy"]
    with torch.no_grad():
        parity = float((compact(*example) - model(*example)).abs().max())

    # 5. ONNX: dense and compact, validated against the masked torch model, timed against each other
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="dp-nni-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    dense_onnx = dp.export(dense, example, out_dir / "digits_dense.onnx", force=True)
    compact_onnx = dp.export(compact, example, out_dir / "digits_pruned.onnx", force=True)
    report = dp.validate(compact, compact_onnx, example, dense_artifact=None if args.no_latency else dense_onnx,
                         latency=not args.no_latency)
    speedup = report.latency.ratio("dense", "artifact", runtime="onnxruntime") if report.latency else None

    p_dense, p_compact = count_params(dense), count_params(compact)
    print()
    print(f"{'':34} {'accuracy':>9} {'params':>8}")
    print(f"{'dense':34} {dense_acc:9.4f} {p_dense:8,}")
    print(f"{'50% channels, one-shot':34} {oneshot_acc:9.4f}")
    print(f"{'50% channels, fine-tuned':34} {result.final_val_accuracy:9.4f}")
    print(f"{'finalized (compact)':34} {compact_acc:9.4f} {p_compact:8,}  ({p_compact / p_dense:.1%})")
    print(f"torch parity compact vs masked: {parity:.2e}; ONNX {'PASSED' if report.passed else 'FAILED'} "
          f"(max abs error {report.max_abs_error:.2e})")
    macs_dense = report.dense_stats.macs if report.dense_stats is not None else None
    macs_compact = report.artifact_stats.macs
    if macs_dense and macs_compact:
        print(f"MACs: {macs_dense:,} -> {macs_compact:,} ({macs_dense / macs_compact:.2f}x fewer)")
    if speedup is not None:
        print(f"onnxruntime latency dense / compact (median): {speedup:.2f}x (a model this small is dominated "
              "by per-call overhead)")
    print(f"conv channels kept: {int(masks['conv']['weight'].reshape(12, -1).any(1).sum())}/12; files in {out_dir}")
    return {"dense_accuracy": dense_acc, "oneshot_accuracy": oneshot_acc,
            "finetuned_accuracy": result.final_val_accuracy, "compact_accuracy": compact_acc,
            "params_dense": float(p_dense), "params_compact": float(p_compact), "parity": parity,
            "passed": float(report.passed), "speedup": float(speedup) if speedup is not None else float("nan")}


if __name__ == "__main__":
    main()
