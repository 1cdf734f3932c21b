"""Does compaction buy the speed its MACs promise? Dense vs compacted ONNX in onnxruntime.

Per model and channel sparsity (25%, 50%, 75%):

* masks: ``deployprune.Pruner`` one-shot L1 with ``{"target_sparsity": s, "granularity":
  "channel"}`` on every Conv/Linear (dependency-aware: coupled groups share their channels;
  channels reaching the output or LayerNorm'd dimensions stay), plus ``"granularity": "head"``
  at the same level on the attention ``qkv`` layers of transformer models (``+heads``);
* ``finalize``: wall time of ``deployprune.compact`` (graph, propagation, rewrite, self-check);
* ``MACs ratio``: ``deployprune.stats.count_macs`` of the dense model / of the compacted one;
* latency: the dense model and the three compacted models exported with
  ``converters.get("onnx")`` (dynamic batch axis, onnxsim) and timed **interleaved** in one
  ``deployprune.latency.measure`` loop (shuffled order per round, warm-up, 1 intra-op thread,
  all graph optimizations), at batch 1 and 8; ``lat ratio`` = median dense / median compacted;
* ``efficiency`` = latency ratio / MACs ratio: 1.0 means the runtime turned every removed MAC
  into saved time (the MACs ratio is the ceiling);
* ``size ratio``: dense ONNX file / compacted ONNX file.

Run from the repository root::

    python -m benchmarks.compaction              # zoo + benchmark-size models (several minutes)
    python -m benchmarks.compaction --quick      # CI-size zoo models only
    python -m benchmarks.compaction --models resnet18 --levels 0.5 --repeats 30

Results also go to ``benchmarks/results.md`` and ``benchmarks/results.svg`` (``--out DIR``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deployprune as dp  # noqa: E402
from deployprune import (
    converters,  # noqa: E402
    zoo,  # noqa: E402
)
from deployprune.fsutil import write_text_atomic  # noqa: E402
from deployprune.latency import LatencyConfig, OrtRunner, measure  # noqa: E402
from deployprune.stats import count_macs, count_params, file_size  # noqa: E402

QUICK_MODELS = ("resnet_basic", "mobilenet_v2_tiny", "vit")
FULL_MODELS = QUICK_MODELS + ("resnet18", "mobilenet_v2", "vit_small")
LEVELS = (0.25, 0.5, 0.75)
BATCHES = (1, 8)
TARGET = 0.85  # issue 7: efficiency >= 0.85 at 50% for ResNet-, MobileNetV2- and ViT-style models
HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    model: str
    input: str
    level: float
    params_ratio: float
    macs_dense: int
    macs_compact: int
    macs_ratio: float
    lat_dense_ms: dict[int, float]
    lat_compact_ms: dict[int, float]
    min_dense_ms: dict[int, float]
    min_compact_ms: dict[int, float]
    finalize_s: float
    size_ratio: float
    rel_err: float
    heads: bool = False
    round_to: int = 1

    @property
    def pruned(self) -> str:
        heads = " +heads" if self.heads else ""
        return f"{self.level:.0%}{heads}" + (f" r{self.round_to}" if self.round_to > 1 else "")

    def lat_ratio(self, batch: int) -> float:
        d, c = self.lat_dense_ms.get(batch), self.lat_compact_ms.get(batch)
        return d / c if d and c else math.nan

    def efficiency(self, batch: int) -> float:
        return self.lat_ratio(batch) / self.macs_ratio

    def min_efficiency(self, batch: int) -> float:
        """The same from the fastest call of each model: less sensitive to other processes."""
        d, c = self.min_dense_ms.get(batch), self.min_compact_ms.get(batch)
        return d / c / self.macs_ratio if d and c else math.nan


def load_average() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


HEAD_LAYERS = r".*attn\.qkv"  # the zoo ViTs' fused q/k/v projection


def structured_config(model: torch.nn.Module, level: float, round_to: int = 1) -> dict:
    """Channel pruning of every Conv/Linear; attention heads too where the model has a qkv layer.

    In a ViT, channel pruning alone reaches only the MLP hidden width: the embedding dimension is
    LayerNorm'd (not prunable) and q/k/v rows belong to heads. Heads are pruned at the same level.
    """
    config: dict = {"global_config": {"target_sparsity": level, "granularity": "channel", "round_to": round_to}}
    if any(re.fullmatch(HEAD_LAYERS, n) for n, _ in model.named_modules()):
        config["module_name_configs"] = {HEAD_LAYERS: {"target_sparsity": level, "granularity": "head"}}
    return config


def structured_masks(model: torch.nn.Module, x: tuple[torch.Tensor, ...], level: float, round_to: int = 1) -> dict:
    """One-shot L1 masks from the pruner (on a copy: the dense model stays untouched)."""
    pruner = dp.Pruner(copy.deepcopy(model), structured_config(model, level, round_to), x)
    pruner.prepare()
    return pruner.masks()


def export(model: torch.nn.Module, x: tuple[torch.Tensor, ...], path: Path) -> Path:
    converters.get("onnx").convert(model, x, path, dynamic_batch=True)
    return path


def bench_model(name: str, levels: tuple[float, ...], config: LatencyConfig, work: Path,
                round_tos: tuple[int, ...] = (1,)) -> list[Row]:
    """All variants of one model (levels x round_to) timed with its dense export in one loop."""
    model = zoo.build(name)
    x = zoo.example_inputs(name)
    shape = "x".join(str(s) for s in x[0].shape[1:])
    macs_dense = count_macs(model, x)
    params_dense = count_params(model)
    dense_path = export(model, x, work / f"{name}.dense.onnx")
    runners = [OrtRunner(dense_path, config, role="dense", label=f"{name} dense")]
    partial = []
    for level in levels:
        for round_to in round_tos:
            masks = structured_masks(model, x, level, round_to)
            t0 = time.perf_counter()
            result = dp.compact(model, x, masks)
            finalize_s = time.perf_counter() - t0
            small = result.model
            role = f"c{int(level * 100)}r{round_to}"
            path = export(small, x, work / f"{name}.{role}.onnx")
            runners.append(OrtRunner(path, config, role=role, label=f"{name} {level:.0%} round_to {round_to}"))
            partial.append((level, round_to, role, result, small, finalize_s, path))
            print(f"  {name} {level:.0%} round_to {round_to}: finalize {finalize_s:.2f} s", file=sys.stderr,
                  flush=True)
    timing = measure(runners, x, config)
    rows = []
    for level, round_to, role, result, small, finalize_s, path in partial:
        dense_ms, comp_ms, dense_min, comp_min = {}, {}, {}, {}
        for b in config.batch_sizes:
            d, c = timing.get("dense", batch_size=b), timing.get(role, batch_size=b)
            if d is not None and c is not None:
                dense_ms[b], comp_ms[b] = d.median_ms, c.median_ms
                dense_min[b], comp_min[b] = d.min_ms, c.min_ms
        macs_c = count_macs(small, x)
        rows.append(Row(model=name, input=shape, level=level,
                        params_ratio=params_dense / max(count_params(small), 1),
                        macs_dense=macs_dense, macs_compact=macs_c, macs_ratio=macs_dense / max(macs_c, 1),
                        lat_dense_ms=dense_ms, lat_compact_ms=comp_ms, min_dense_ms=dense_min,
                        min_compact_ms=comp_min, finalize_s=finalize_s,
                        size_ratio=file_size(dense_path) / file_size(path),
                        rel_err=result.max_abs_error / max(result.output_scale, 1e-30),
                        heads="module_name_configs" in structured_config(model, level), round_to=round_to))
    for note in timing.notes:
        print(f"  note: {note}", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------- output

COLUMNS = ("model", "input", "pruned", "MACs ratio", "lat ratio b1", "lat ratio b8", "eff b1", "eff b8",
           "eff b1 (min)", "eff b8 (min)",
           "dense b1 (ms)", "dense b8 (ms)", "finalize (s)", "ONNX size ratio", "params ratio")


def _f(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def table_cells(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        out.append([r.model, r.input, r.pruned, _f(r.macs_ratio), _f(r.lat_ratio(1)), _f(r.lat_ratio(8)),
                    _f(r.efficiency(1)), _f(r.efficiency(8)), _f(r.min_efficiency(1)), _f(r.min_efficiency(8)),
                    _f(r.lat_dense_ms.get(1, math.nan)),
                    _f(r.lat_dense_ms.get(8, math.nan), 1), _f(r.finalize_s), _f(r.size_ratio),
                    _f(r.params_ratio)])
    return out


def text_table(rows: list[Row]) -> str:
    cells = [list(COLUMNS)] + table_cells(rows)
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for k, c in enumerate(cells):
        pairs = enumerate(zip(c, widths, strict=True))
        lines.append("  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in pairs))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if i < 3 else "---:"
                                                               for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in table_cells(rows)]
    return "\n".join(lines)


def verdict_lines(rows: list[Row]) -> list[str]:
    """The issue's target, checked on the 50% rows."""
    out = []
    for r in rows:
        if r.level != 0.5:
            continue
        effs = {b: r.efficiency(b) for b in BATCHES}
        ok = all(math.isfinite(e) and e >= TARGET for e in effs.values())
        out.append(f"{r.model} {r.pruned}: efficiency b1 {_f(effs[1])}, b8 {_f(effs[8])} -> "
                   f"{'meets' if ok else 'BELOW'} the {TARGET} target")
    return out


_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def svg_plot(rows: list[Row], title: str) -> str:
    """Latency ratio against MACs ratio: the diagonal is the ceiling, the dashed line 0.85 of it."""
    w, h, left, right, top, bottom = 640, 440, 60, 170, 36, 50
    pts = [(r.macs_ratio, r.lat_ratio(b)) for r in rows for b in BATCHES]
    hi = max([1.0] + [v for p in pts for v in p if math.isfinite(v)]) * 1.08
    hi = math.ceil(hi)

    def sx(v: float) -> float:
        return left + (v / hi) * (w - left - right)

    def sy(v: float) -> float:
        return h - bottom - (v / hi) * (h - top - bottom)

    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
         'font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{w / 2 - right / 2:.0f}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    for t in range(0, hi + 1):
        s.append(f'<line x1="{sx(0):.1f}" y1="{sy(t):.1f}" x2="{sx(hi):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
        s.append(f'<text x="{sx(0) - 6:.1f}" y="{sy(t) + 4:.1f}" text-anchor="end">{t}</text>')
        s.append(f'<text x="{sx(t):.1f}" y="{h - bottom + 16:.1f}" text-anchor="middle">{t}</text>')
    s.append(f'<line x1="{sx(0):.1f}" y1="{sy(0):.1f}" x2="{sx(hi):.1f}" y2="{sy(0):.1f}" stroke="#333"/>')
    s.append(f'<line x1="{sx(0):.1f}" y1="{sy(0):.1f}" x2="{sx(0):.1f}" y2="{sy(hi):.1f}" stroke="#333"/>')
    s.append(f'<line x1="{sx(0):.1f}" y1="{sy(0):.1f}" x2="{sx(hi):.1f}" y2="{sy(hi):.1f}" stroke="#555"/>')
    s.append(f'<line x1="{sx(0):.1f}" y1="{sy(0):.1f}" x2="{sx(hi):.1f}" y2="{sy(hi * TARGET):.1f}" '
             'stroke="#555" stroke-dasharray="5,4"/>')
    s.append(f'<text x="{sx(hi) - 4:.1f}" y="{sy(hi) + 14:.1f}" text-anchor="end" fill="#555">ceiling</text>')
    s.append(f'<text x="{sx(hi) - 4:.1f}" y="{sy(hi * TARGET) + 14:.1f}" text-anchor="end" '
             f'fill="#555">{TARGET} of it</text>')
    s.append(f'<text x="{(sx(0) + sx(hi)) / 2:.1f}" y="{h - 12}" text-anchor="middle">'
             'MACs ratio (dense / compacted)</text>')
    s.append(f'<text transform="translate(16 {(sy(0) + sy(hi)) / 2:.1f}) rotate(-90)" text-anchor="middle">'
             'onnxruntime latency ratio (dense / compacted)</text>')
    names = list(dict.fromkeys(r.model for r in rows))
    for r in rows:
        color = _PALETTE[names.index(r.model) % len(_PALETTE)]
        for b in BATCHES:
            lr = r.lat_ratio(b)
            if not math.isfinite(lr):
                continue
            cx, cy = sx(r.macs_ratio), sy(lr)
            tip = f"{r.model} {r.level:.0%} batch {b}: MACs x{r.macs_ratio:.2f}, latency x{lr:.2f}"
            if b == 1:
                s.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4.5" fill="{color}"><title>{tip}</title></circle>')
            else:
                s.append(f'<rect x="{cx - 4:.1f}" y="{cy - 4:.1f}" width="8" height="8" fill="none" '
                         f'stroke="{color}" stroke-width="2"><title>{tip}</title></rect>')
    lx = w - right + 14
    for i, n in enumerate(names):
        y = top + 10 + 18 * i
        s.append(f'<circle cx="{lx}" cy="{y}" r="4.5" fill="{_PALETTE[i % len(_PALETTE)]}"/>')
        s.append(f'<text x="{lx + 10}" y="{y + 4}">{n}</text>')
    y = top + 10 + 18 * len(names) + 10
    s.append(f'<circle cx="{lx}" cy="{y}" r="4.5" fill="#777"/><text x="{lx + 10}" y="{y + 4}">batch 1</text>')
    s.append(f'<rect x="{lx - 4}" y="{y + 14}" width="8" height="8" fill="none" stroke="#777" stroke-width="2"/>'
             f'<text x="{lx + 10}" y="{y + 22}">batch 8</text>')
    s.append("</svg>")
    return "\n".join(s) + "\n"


def header(config: LatencyConfig) -> str:
    import onnxruntime as ort

    return (f"torch {torch.__version__}, onnxruntime {ort.__version__}, {platform.machine()}, "
            f"{os.cpu_count()} CPU(s); {config.threads} intra-op thread; warm-up {config.warmup}, "
            f"{config.repeats} interleaved repeats, medians")


def write_results(rows: list[Row], out: Path, head: str, load_start: str, load_end: str) -> tuple[Path, Path]:
    svg = out / "results.svg"
    md = out / "results.md"
    write_text_atomic(svg, svg_plot(rows, "Compaction: latency ratio vs MACs ratio"), force=True)
    text = ["# Compaction benchmark results", "",
            f"Generated by `python -m benchmarks.compaction` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            f"{head}. Load average (1/5/15 min) {load_start} at start, {load_end} at the end "
            "(the machine is shared; other processes slow some calls down).", "",
            markdown_table(rows), "",
            "`eff` = latency ratio / MACs ratio (1.0 = the MACs ceiling), from the median latencies; "
            "`eff (min)` the same from each model's fastest call (less sensitive to other processes). "
            f"Target at 50%: >= {TARGET} at batch 1 and 8 (medians).", ""]
    text += [f"- {line}" for line in verdict_lines(rows)]
    text += ["", f"![latency ratio vs MACs ratio]({svg.name})", ""]
    write_text_atomic(md, "\n".join(text), force=True)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return md, svg


def run(names: list[str], levels: tuple[float, ...], config: LatencyConfig, out: Path | None,
        round_tos: tuple[int, ...] = (1,)) -> list[Row]:
    load_start = load_average()
    print(f"compaction benchmark: {header(config)}; load average {load_start} at start", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="dp-bench-") as tmp:
        for name in names:
            rows += bench_model(name, levels, config, Path(tmp), round_tos)
    load_end = load_average()
    print()
    print(text_table(rows))
    print()
    for line in verdict_lines(rows):
        print(line)
    print(f"load average {load_end} at the end")
    if out is not None:
        md, svg = write_results(rows, out, header(config), load_start, load_end)
        print(f"written: {md}, {svg}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-size zoo models only (32x32 inputs)")
    p.add_argument("--models", help="comma-separated model names (default: zoo + benchmark-size models)")
    p.add_argument("--levels", default="0.25,0.5,0.75", help="channel sparsities (default 0.25,0.5,0.75)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per model and batch size "
                   "(default 50 with --quick, 20 otherwise)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    p.add_argument("--out", default=str(HERE), help="directory for results.md/.svg/.json (default benchmarks/)")
    p.add_argument("--round-to", default="1", help="keep a multiple of this many channels per group (the "
                   "pruner's round_to; default 1); several, e.g. 1,8,16, are timed side by side (rows 'rN')")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    names = ([n.strip() for n in args.models.split(",") if n.strip()] if args.models
             else list(QUICK_MODELS if args.quick else FULL_MODELS))
    for n in names:
        zoo.get(n)  # unknown names fail early
    levels = tuple(float(v) for v in args.levels.split(","))
    repeats = args.repeats or (50 if args.quick else 20)
    config = LatencyConfig(warmup=args.warmup, repeats=repeats, threads=1, graph_optimization="all",
                           batch_sizes=BATCHES, eager=False)
    round_tos = tuple(int(v) for v in args.round_to.split(","))
    rows = run(names, levels, config, None if args.no_write else Path(args.out), round_tos)
    return 0 if all(r.rel_err < 1e-3 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
