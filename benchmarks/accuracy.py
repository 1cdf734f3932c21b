"""Accuracy benchmark: does fine-tuning under the pruning schedule bring accuracy back?

Run from the repository root::

    python -m benchmarks.accuracy                   # seeds 0-4 (about a minute on 2 cores)
    python benchmarks/accuracy.py --seeds 0 --json accuracy.json

Data: scikit-learn's bundled 8x8 digits (1437 train / 360 validation images, stratified).
Model: the coremltools tutorial's MNIST-style net sized for 8x8 inputs (``mnist_net_digits``:
conv 1->12 3x3, ReLU, 2x2 max-pool, dense 192->10, log-softmax), trained dense with Adam
(lr 3e-3 with cosine decay to 0, batch 32, ``--train-epochs``).

A. **Per-element 70 % / 80 %** (the coremltools tutorial): conv layers 70 %, dense layers 80 %,
   L1 magnitude, polynomial schedule (power 3) over the first half of ``--finetune-epochs``
   epochs of fine-tuning (Adam, ``--finetune-lr`` 3e-3 with cosine decay to 0, stepped per
   epoch), three mask updates per epoch. Reported: accuracy,
   its difference to dense (the tutorial's claim: within 2 points), the Core ML weight file
   with sparse storage against the dense one.
B. **50 % structured channels** (NNI style): 50 % of the conv's output channels by L1 norm,
   one shot, then ``--struct-epochs`` epochs of fine-tuning with the masks fixed (same
   optimizer and learning-rate schedule); finalize
   (physically smaller conv and dense) and ONNX. Reported: accuracy dense / one-shot /
   fine-tuned / ONNX artifact (onnxruntime on the whole validation set), parameters, MACs and
   the onnxruntime latency ratio dense/compact from ``deployprune.validate`` (interleaved,
   medians, batch 1).

Every figure is per seed (model init, data split and shuffle), then the mean. Training uses one
thread (this model is far too small to gain from more, and other processes share the CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # python benchmarks/accuracy.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deployprune as dp  # noqa: E402
from deployprune import zoo  # noqa: E402
from deployprune.data import digits  # noqa: E402
from deployprune.latency import LatencyConfig  # noqa: E402
from deployprune.pipeline import count_params  # noqa: E402
from deployprune.training import evaluate, finetune  # noqa: E402

EXAMPLE = (torch.zeros(1, 1, 8, 8),)


@dataclass
class Row:
    seed: int
    dense_acc: float
    elem_acc: float
    elem_conv_sparsity: float
    elem_dense_sparsity: float
    coreml_weights_ratio: float | None
    struct_oneshot_acc: float
    struct_finetuned_acc: float
    struct_onnx_acc: float
    params_dense: int
    params_compact: int
    macs_dense: int | None
    macs_compact: int | None
    latency_dense_ms: float | None  # batch 1
    latency_compact_ms: float | None
    latency_ratio: float | None
    latency_dense_ms_b256: float | None  # batch 256
    latency_compact_ms_b256: float | None
    latency_ratio_b256: float | None
    onnx_passed: bool
    seconds: float


def onnx_accuracy(path: Path, loader) -> float:
    """Top-1 accuracy of an ONNX file (exported with a dynamic batch axis) in onnxruntime."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = total = 0
    for x, y in loader:
        out = sess.run(None, {name: x.numpy()})[0]
        correct += int((np.argmax(out, 1) == y.numpy()).sum())
        total += int(y.shape[0])
    return correct / total


def _cosine(epochs: int) -> dict:
    """Cosine learning-rate decay to 0 over the run, stepped per epoch."""
    return {"lr_scheduler": "torch.optim.lr_scheduler.CosineAnnealingLR", "lr_scheduler_kwargs": {"T_max": epochs}}


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> Row:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    train, val = digits(batch_size=32, seed=seed)
    model = zoo.build("mnist_net_digits")
    finetune(model, None, train, val, epochs=args.train_epochs, optimizer_kwargs={"lr": 3e-3},
             criterion="torch.nn.NLLLoss", seed=seed, progress=False, **_cosine(args.train_epochs))
    dense = copy.deepcopy(model).eval()
    dense_acc = evaluate(dense, val)["accuracy"]

    # A. per-element 70 % / 80 %, polynomial schedule during fine-tuning
    elem = copy.deepcopy(dense)
    spe = len(train)
    config = {
        "module_type_configs": {"Conv2d": {"target_sparsity": 0.7}, "Linear": {"target_sparsity": 0.8}},
        "schedule": {"type": "polynomial", "begin_step": 0, "end_step": spe * args.finetune_epochs // 2,
                     "frequency": max(1, spe // 3)},
    }
    pruner = dp.Pruner(elem, config, EXAMPLE)
    res = finetune(elem, pruner, train, val, epochs=args.finetune_epochs, optimizer_kwargs={"lr": args.finetune_lr},
                   criterion="torch.nn.NLLLoss", seed=seed, progress=False, **_cosine(args.finetune_epochs))
    masks = pruner.masks()
    conv_sp = float((~masks["conv"]["weight"]).float().mean())
    dense_sp = float((~masks["dense"]["weight"]).float().mean())
    coreml_ratio = None
    if not args.no_coreml:
        package = work / f"elem_{seed}.mlpackage"
        dp.export(elem, EXAMPLE, package, target="coreml", force=True, sparse_min_elements=64)
        rep = dp.validate(pruner.finalize(), package, EXAMPLE, latency=False)
        info = rep.coreml or {}
        if rep.passed and info.get("weight_file_bytes") and info.get("dense_weight_file_bytes"):
            coreml_ratio = info["weight_file_bytes"] / info["dense_weight_file_bytes"]

    # B. 50 % structured channels, one shot + fine-tuning, finalize, ONNX
    struct = copy.deepcopy(dense)
    spruner = dp.Pruner(struct, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "out_channel"}],
                        EXAMPLE)
    spruner.prepare()
    oneshot_acc = evaluate(struct, val)["accuracy"]
    sres = finetune(struct, spruner, train, val, epochs=args.struct_epochs, optimizer_kwargs={"lr": args.finetune_lr},
                    criterion="torch.nn.NLLLoss", seed=seed, progress=False, **_cosine(args.struct_epochs))
    compact = spruner.finalize()
    dense_onnx = dp.export(dense, EXAMPLE, work / f"dense_{seed}.onnx", force=True, dynamic_batch=True)
    compact_onnx = dp.export(compact, EXAMPLE, work / f"compact_{seed}.onnx", force=True, dynamic_batch=True)
    timing = LatencyConfig(batch_sizes=(1, 256), repeats=100, threads=1)
    report = dp.validate(compact, compact_onnx, EXAMPLE, dense_artifact=dense_onnx,
                         latency=False if args.no_latency else timing)
    lat = report.latency
    ld = lat.get("dense", "onnxruntime") if lat else None
    lc = lat.get("artifact", "onnxruntime") if lat else None
    ld256 = lat.get("dense", "onnxruntime", batch_size=256) if lat else None
    lc256 = lat.get("artifact", "onnxruntime", batch_size=256) if lat else None
    return Row(
        seed=seed,
        dense_acc=dense_acc,
        elem_acc=float(res.final_val_accuracy),
        elem_conv_sparsity=conv_sp,
        elem_dense_sparsity=dense_sp,
        coreml_weights_ratio=coreml_ratio,
        struct_oneshot_acc=oneshot_acc,
        struct_finetuned_acc=float(sres.final_val_accuracy),
        struct_onnx_acc=onnx_accuracy(compact_onnx, val),
        params_dense=count_params(dense),
        params_compact=count_params(compact),
        macs_dense=report.dense_stats.macs if report.dense_stats else None,
        macs_compact=report.artifact_stats.macs,
        latency_dense_ms=ld.median_ms if ld else None,
        latency_compact_ms=lc.median_ms if lc else None,
        latency_ratio=(ld.median_ms / lc.median_ms) if (ld and lc and lc.median_ms > 0) else None,
        latency_dense_ms_b256=ld256.median_ms if ld256 else None,
        latency_compact_ms_b256=lc256.median_ms if lc256 else None,
        latency_ratio_b256=(ld256.median_ms / lc256.median_ms) if (ld256 and lc256 and lc256.median_ms > 0) else None,
        onnx_passed=bool(report.passed),
        seconds=time.perf_counter() - t0,
    )


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def print_tables(rows: list[Row]) -> None:
    print("A. per-element 70% conv / 80% dense, polynomial schedule + fine-tuning (validation accuracy, %)")
    head = f"{'seed':>4} {'dense':>7} {'pruned':>7} {'diff':>6} {'conv sp':>8} {'dense sp':>9} {'coreml w':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        cm = f"{r.coreml_weights_ratio:.3f}x" if r.coreml_weights_ratio else "-"
        print(f"{r.seed:>4} {_pct(r.dense_acc):>7} {_pct(r.elem_acc):>7} {100 * (r.elem_acc - r.dense_acc):>+6.2f} "
              f"{r.elem_conv_sparsity:>8.1%} {r.elem_dense_sparsity:>9.1%} {cm:>9}")
    md, me = _mean([r.dense_acc for r in rows]), _mean([r.elem_acc for r in rows])
    print(f"{'mean':>4} {_pct(md):>7} {_pct(me):>7} {100 * ((me or 0) - (md or 0)):>+6.2f}")
    print()
    print("B. 50% structured conv channels, one shot + fine-tuning + finalize + ONNX (accuracy %, onnxruntime)")
    head = (f"{'seed':>4} {'dense':>7} {'1-shot':>7} {'tuned':>7} {'onnx':>7} {'params':>13} {'MACs':>15} "
            f"{'ratio b1':>9} {'ratio b256':>11} {'parity':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        macs = f"{r.macs_dense:,}->{r.macs_compact:,}" if r.macs_dense and r.macs_compact else "-"
        print(f"{r.seed:>4} {_pct(r.dense_acc):>7} {_pct(r.struct_oneshot_acc):>7} {_pct(r.struct_finetuned_acc):>7} "
              f"{_pct(r.struct_onnx_acc):>7} {f'{r.params_dense:,}->{r.params_compact:,}':>13} {macs:>15} "
              f"{_ratio(r.latency_dense_ms, r.latency_compact_ms):>9} "
              f"{_ratio(r.latency_dense_ms_b256, r.latency_compact_ms_b256):>11} "
              f"{'PASS' if r.onnx_passed else 'FAIL':>6}")
    print(f"{'mean':>4} {_pct(md):>7} {_pct(_mean([r.struct_oneshot_acc for r in rows])):>7} "
          f"{_pct(_mean([r.struct_finetuned_acc for r in rows])):>7} "
          f"{_pct(_mean([r.struct_onnx_acc for r in rows])):>7}")
    if any(r.latency_dense_ms for r in rows):
        print()
        print("onnxruntime median latency, ms per call (1 thread, interleaved): dense / pruned")
        for r in rows:
            print(f"  seed {r.seed}: batch 1 {_ms(r.latency_dense_ms)} / {_ms(r.latency_compact_ms)}, "
                  f"batch 256 {_ms(r.latency_dense_ms_b256)} / {_ms(r.latency_compact_ms_b256)}")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description="accuracy of pruned + fine-tuned digits nets (see module docstring)")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0,1,2,3,4)")
    ap.add_argument("--train-epochs", type=int, default=20)
    ap.add_argument("--finetune-epochs", type=int, default=16, help="per-element run (schedule: first half)")
    ap.add_argument("--struct-epochs", type=int, default=10, help="fine-tuning after structured pruning")
    ap.add_argument("--finetune-lr", type=float, default=3e-3, help="Adam learning rate of the fine-tuning runs")
    ap.add_argument("--no-coreml", action="store_true", help="skip the Core ML export of run A")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency measurement of run B")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"epochs: train {args.train_epochs}, element {args.finetune_epochs}, structured {args.struct_epochs}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dp-accuracy-") as tmp:
        for seed in seeds:
            rows.append(run_seed(seed, args, Path(tmp)))
            print(f"seed {seed}: {rows[-1].seconds:.1f} s", file=sys.stderr)
    print()
    print_tables(rows)
    if args.json:
        from deployprune.fsutil import write_text_atomic

        write_text_atomic(args.json, json.dumps([asdict(r) for r in rows], indent=2), force=True)
    return rows


if __name__ == "__main__":
    main()
