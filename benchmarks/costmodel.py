"""Cost model benchmark (issue 14): how long the measured cost table takes to build, and how well it predicts.

Run from the repository root::

    python -m benchmarks.costmodel                  # MobileNetV2 and ResNet-18 (~1 min)
    python -m benchmarks.costmodel --models mobilenet_v2 --repeats 50

Per torchvision model (random init, nothing downloaded; 224x224, batch 1, onnxruntime CPU, 1 thread,
all graph optimizations):

* ``build s``: wall time of a cold :class:`deployprune.costmodel.CostTable` build: record the layers
  (one forward pass), time every layer's width grid (``CostTable.build``) and the preferred channel
  multiple (``preferred_multiple``). Issue 14's target: under 120 s for MobileNetV2 on this machine.
* ``fit err``: interpolation error on held-out widths: for every 4th layer, ``layer_ms`` at widths
  off the measured grid (3/8 and 3/4 of each width, rounded to multiples of 4, then of the measured
  preferred multiple) against a direct measurement at those widths: time-weighted
  (sum |predicted - measured| / sum measured) and the median of |predicted / measured - 1|.
* ``dense`` / ``50%``: whole-model median latency of the exported ONNX (TorchScript exporter, opset 17),
  the two models timed interleaved in one ``deployprune.latency.measure`` loop (``CostTable.model_ms``
  of the dense model is recorded too), against ``predict_ms`` (the sum of the Conv/Linear layers). The 50%
  model is the same network with every Conv/BatchNorm/Linear width halved (the image's 3 channels and
  the 1000 classes kept; depthwise groups halved with them), built by replacing modules, and predicted
  from the *dense* model's layers at half widths, as the allocator will ask. ``pred/meas`` is the
  ratio; the sum leaves out pooling, adds and activations and pays one session call per layer, so the
  ratio is not 1 — what matters for allocation is that it stays the same between widths
  (``ratio drift`` = 50% ratio / dense ratio - 1).

Results are printed and written to ``benchmarks/costmodel.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_BUILD_S = 120.0


def halve(model):  # noqa: ANN001, ANN201 - torch types imported lazily
    """The same network with every Conv2d/BatchNorm2d/Linear width halved (image channels and classes kept)."""
    from torch import nn

    def half(n: int, keep: bool) -> int:
        return n if keep else max(1, n // 2)

    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if isinstance(m, nn.Conv2d):
                cin = half(m.in_channels, m.in_channels == 3)
                cout = half(m.out_channels, False)
                groups = cin if m.groups == m.in_channels and m.groups > 1 else m.groups
                setattr(parent, name, nn.Conv2d(cin, cout, m.kernel_size, m.stride, m.padding, m.dilation,
                                                groups, m.bias is not None))
            elif isinstance(m, nn.BatchNorm2d):
                setattr(parent, name, nn.BatchNorm2d(m.num_features // 2))
            elif isinstance(m, nn.Linear):
                setattr(parent, name, nn.Linear(m.in_features // 2, m.out_features, m.bias is not None))
    return model.eval()


def half_widths(layers):  # noqa: ANN001, ANN201
    return {n: (s.in_channels if s.in_channels == 3 else s.in_channels // 2,
                s.out_channels if s.kind == "linear" else s.out_channels // 2) for n, s in layers.items()}


def onnx_bytes(model, x) -> bytes:  # noqa: ANN001
    import torch

    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
    return buf.getvalue()


def fit_error(table, layers, multiple: int) -> tuple[float, float, int]:  # noqa: ANN001
    """Held-out widths (3/8 and 3/4 of each width, rounded to ``multiple``) of every 4th layer:
    (time-weighted error sum|pred - meas| / sum(meas), median relative error, cases)."""
    def rnd(n: float) -> int:
        return max(multiple, int(round(n / multiple)) * multiple)

    abs_err, total, rel = 0.0, 0.0, []
    for shape in list(layers.values())[::4]:
        fr = (0.375, 0.75)
        if shape.depthwise:
            mult = shape.out_channels // shape.in_channels
            cases = [(rnd(shape.in_channels * f), rnd(shape.in_channels * f) * mult) for f in fr]
        else:
            cin = [shape.in_channels] if shape.in_channels < 8 else [rnd(shape.in_channels * f) for f in fr]
            cases = [(i, rnd(shape.out_channels * f)) for i in cin for f in fr]
        for cin_, cout in cases:
            measured = table.measure_layer_ms(shape, cin_, cout)
            predicted = table.layer_ms(shape, cin_, cout)
            abs_err += abs(predicted - measured)
            total += measured
            rel.append(abs(predicted / measured - 1))
    rel.sort()
    return abs_err / total, rel[len(rel) // 2], len(rel)


def run(name: str, repeats: int, cache_dir: Path) -> dict:
    import torch

    from deployprune._compat import tolerate_missing_torchvision_ops

    tolerate_missing_torchvision_ops()
    import torchvision

    from deployprune.costmodel import CostTable, predict_ms, record_layers

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    table = CostTable(path=cache_dir / f"{name}.json")
    t0 = time.perf_counter()
    layers = record_layers(model, (x,))
    table.build(layers)
    multiple = table.preferred_multiple()
    build_s = time.perf_counter() - t0
    points = table.measurements

    fit = {m: fit_error(table, layers, m) for m in sorted({multiple, 4})}

    torch.manual_seed(0)
    small = halve(getattr(torchvision.models, name)())
    # both whole models timed interleaved in one loop (deployprune.latency.measure), like for like
    from deployprune.latency import LatencyConfig, OrtRunner, measure

    config = LatencyConfig(warmup=10, repeats=repeats, threads=1, eager=False)
    (cache_dir / f"{name}.onnx").write_bytes(onnx_bytes(model, x))
    (cache_dir / f"{name}-50.onnx").write_bytes(onnx_bytes(small, x))
    report = measure([OrtRunner(cache_dir / f"{name}.onnx", config, role="dense"),
                      OrtRunner(cache_dir / f"{name}-50.onnx", config, role="artifact")], (x,), config)
    dense_ms, half_ms = report.get("dense").median_ms, report.get("artifact").median_ms
    calib_ms = table.model_ms(cache_dir / f"{name}.onnx", (x,), repeats=repeats)  # the calibration call itself
    pred_dense = predict_ms(table, layers, {})
    pred_half = predict_ms(table, layers, half_widths(layers))
    r_dense, r_half = pred_dense / dense_ms, pred_half / half_ms
    return {
        "model": name, "layers": len(layers), "points": points, "build_s": round(build_s, 2),
        "preferred_multiple": multiple,
        "fit": {f"multiples_of_{m}": {"time_weighted_error": round(w, 4), "median_relative_error": round(r, 4),
                                      "cases": n} for m, (w, r, n) in fit.items()},
        "dense_measured_ms": round(dense_ms, 3), "dense_model_ms_call": round(calib_ms, 3),
        "dense_predicted_ms": round(pred_dense, 3),
        "dense_ratio": round(r_dense, 3),
        "half_measured_ms": round(half_ms, 3), "half_predicted_ms": round(pred_half, 3), "half_ratio": round(r_half, 3),
        "ratio_drift": round(r_half / r_dense - 1, 4),
        "speedup_measured": round(dense_ms / half_ms, 3), "speedup_predicted": round(pred_dense / pred_half, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.costmodel", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    parser.add_argument("--repeats", type=int, default=50, help="whole-model timing repeats (default 50)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "costmodel.json")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores"
          + (f", load average {load:.1f}" if load is not None else "")
          + "; onnxruntime CPU, 1 thread, batch 1, 224x224, cold cost table")
    rows = []
    with tempfile.TemporaryDirectory(prefix="costmodel-") as tmp:
        for name in args.models:
            rows.append(run(name, args.repeats, Path(tmp)))
            r = rows[-1]
            print(f"{name}: {r['layers']} layers, {r['points']} points measured in {r['build_s']:.1f} s; "
                  f"preferred multiple {r['preferred_multiple']}")
    print("| model | build s | fit err (x4; x pref) | dense meas/pred ms | 50% meas/pred ms | pred/meas dense, 50% "
          "| ratio drift | speedup meas/pred |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fits = "; ".join(f"{v['time_weighted_error']:.0%} (med {v['median_relative_error']:.0%})"
                         for v in r["fit"].values())
        print(f"| {r['model']} | {r['build_s']:.1f} | {fits} "
              f"| {r['dense_measured_ms']:.2f} / {r['dense_predicted_ms']:.2f} "
              f"| {r['half_measured_ms']:.2f} / {r['half_predicted_ms']:.2f} "
              f"| {r['dense_ratio']:.2f}, {r['half_ratio']:.2f} | {r['ratio_drift']:+.1%} "
              f"| {r['speedup_measured']:.2f} / {r['speedup_predicted']:.2f} |")
    mnv2 = next((r for r in rows if r["model"] == "mobilenet_v2"), None)
    if mnv2:
        verdict = "met" if mnv2["build_s"] < TARGET_BUILD_S else "NOT met"
        print(f"target: MobileNetV2 cost table under {TARGET_BUILD_S:.0f} s: {verdict} ({mnv2['build_s']:.1f} s)")
    doc = {"machine": {"python": platform.python_version(), "cores": os.cpu_count(), "load_average": load},
           "setting": {"provider": "CPUExecutionProvider", "threads": 1, "batch": 1, "graph_optimization": "all"},
           "results": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
