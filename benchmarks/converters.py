"""Artifact sizes of the converters, measured in one run (issue 6 targets).

1. Core ML, 75% per-element sparsity (magnitude, per layer, every conv/linear weight) on a
   ResNet-18: weight file (``weights/weight.bin``) of the sparse export vs the dense export of
   the same model. Target: <= 0.35x.
2. ONNX, 50% of the channels removed from a ResNet-18: file size vs the dense file.
   Target: <= 0.3x. Measured twice: (a) the smaller model built directly with halved widths,
   (b) deployprune's own path (Pruner, out_channel 50% -> deployprune.finalize).
3. For reference: ONNX with ``sparse_initializers=True`` at 75% per-element sparsity.

    python benchmarks/converters.py [--width 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployprune import converters  # noqa: E402
from deployprune.zoo.resnet import BasicBlock, ResNet  # noqa: E402


def resnet18(width: int) -> nn.Module:
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=1000, width=width)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # trained-looking BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def prune_per_element_(model: nn.Module, sparsity: float) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                w = m.weight.view(-1)
                w[w.abs().argsort()[: int(round(sparsity * w.numel()))]] = 0.0
    return model


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64, help="stem width (64 = ResNet-18)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    x = (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2)),)
    figures: dict[str, dict] = {}
    onnx_c, coreml_c = converters.get("onnx"), converters.get("coreml")

    with tempfile.TemporaryDirectory(prefix="deployprune-bench-") as tmp:
        out = Path(tmp)
        dense = resnet18(args.width)
        sparse = prune_per_element_(resnet18(args.width), 0.75)

        # 1. Core ML weight file, 75% per-element sparsity
        for precision in ("fp16", "fp32"):
            d, td = timed(coreml_c.convert, dense, x, out / f"dense_{precision}.mlpackage", precision=precision)
            s, ts = timed(coreml_c.convert, sparse, x, out / f"sparse_{precision}.mlpackage", precision=precision)
            ratio = s.metadata["weight_file_bytes"] / d.metadata["weight_file_bytes"]
            figures[f"coreml_75pct_{precision}"] = {
                "dense_weight_bytes": d.metadata["weight_file_bytes"],
                "sparse_weight_bytes": s.metadata["weight_file_bytes"],
                "ratio": ratio,
                "target": 0.35,
                "verified": s.metadata["verification"]["passed"],
                "sparse_constants": s.metadata["verification"]["sparse_constants"],
                "seconds_dense": round(td, 2),
                "seconds_sparse": round(ts, 2),
            }

        # 2a. ONNX, 50% channels: widths halved directly
        dense_onnx, t_dense = timed(onnx_c.convert, dense, x, out / "dense.onnx")
        half = resnet18(args.width // 2)
        half_onnx, t_half = timed(onnx_c.convert, half, x, out / "half.onnx")
        figures["onnx_50pct_channels_halved_widths"] = {
            "dense_bytes": dense_onnx.size_bytes,
            "compact_bytes": half_onnx.size_bytes,
            "ratio": half_onnx.size_bytes / dense_onnx.size_bytes,
            "target": 0.3,
            "params_dense": params(dense),
            "params_compact": params(half),
            "seconds_dense": round(t_dense, 2),
            "seconds_compact": round(t_half, 2),
        }

        # 2b. ONNX, 50% channels through deployprune's Pruner + finalize
        try:
            import deployprune as dp

            source = resnet18(args.width)
            pruner = dp.Pruner(source, [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5,
                                         "granularity": "out_channel"}], x)
            pruner.prepare()
            compact, t_fin = timed(dp.finalize, source, x, pruner.masks())
            comp_onnx, t_comp = timed(onnx_c.convert, compact, x, out / "finalized.onnx")
            figures["onnx_50pct_channels_finalize"] = {
                "dense_bytes": dense_onnx.size_bytes,
                "compact_bytes": comp_onnx.size_bytes,
                "ratio": comp_onnx.size_bytes / dense_onnx.size_bytes,
                "target": 0.3,
                "params_compact": params(compact),
                "seconds_finalize": round(t_fin, 2),
                "seconds_convert": round(t_comp, 2),
            }
        except Exception as exc:  # the benchmark still reports the other figures
            figures["onnx_50pct_channels_finalize"] = {"error": f"{type(exc).__name__}: {exc}"}

        # 3. ONNX sparse weight encoding, 75% per-element sparsity
        plain, _ = timed(onnx_c.convert, sparse, x, out / "sparse_plain.onnx")
        enc, t_enc = timed(onnx_c.convert, sparse, x, out / "sparse_encoded.onnx", sparse_initializers=True)
        figures["onnx_75pct_sparse_initializers"] = {
            "dense_bytes": plain.size_bytes,
            "encoded_bytes": enc.size_bytes,
            "ratio": enc.size_bytes / plain.size_bytes,
            "encoded_tensors": len(enc.metadata["sparse"]["encoded"]),
            "ort_max_abs_error": enc.metadata["ort_max_abs_error"],
            "seconds": round(t_enc, 2),
        }

    print(f"ResNet-18 (width {args.width}), input 1x3x224x224, torch {torch.__version__}")
    for name, fig in figures.items():
        if "error" in fig:
            print(f"  {name:40s} ERROR {fig['error']}")
            continue
        target = f" (target <= {fig['target']}: {'met' if fig['ratio'] <= fig['target'] else 'MISSED'})" \
            if "target" in fig else ""
        sizes = {k: v for k, v in fig.items() if k.endswith("bytes")}
        print(f"  {name:40s} ratio {fig['ratio']:.3f}{target}  {sizes}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
