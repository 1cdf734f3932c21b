"""Readable reports from :class:`~deployprune.validate.ValidationReport` objects.

Everything here is a pure function of the reports (their JSON holds all that is drawn), so a
report regenerates from its JSON alone. HTML pages are self-contained: inline CSS and inline
SVG plots drawn here, no scripts, no fonts or styles from the network.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .errors import UsageError
from .fsutil import check_writable, write_text_atomic
from .stats import LayerRow
from .validate import ValidationReport, load_report

__all__ = [
    "summary_lines",
    "render_markdown",
    "render_html",
    "write_report",
    "load_reports",
    "comparison_rows",
]

FORMATS = ("html", "md", "json")

# ---------------------------------------------------------------------------------------------
# Number formatting


def _fewer(before: float, after: float) -> str:
    """``1.74× fewer``; ``unchanged`` where the ratio would print as 1.00×; ``1.20× more`` when it grew."""
    if after == before or (after and 0.995 <= before / after < 1.005):
        return "unchanged" if after == before else "about the same"
    if after > before:
        return f"{fmt_ratio(_ratio(after, before))} more"
    return f"{fmt_ratio(_ratio(before, after))} fewer"


def fmt_count(n: float | None) -> str:
    if n is None:
        return "–"
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{int(n)}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for div, unit in ((1e9, " GB"), (1e6, " MB"), (1e3, " kB")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{int(n)} B"


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3g} ms" if x >= 0.01 else f"{x * 1000:.3g} µs"


def fmt_err(x: float | None) -> str:
    if x is None:
        return "–"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    return "0" if x == 0 else f"{x:.2e}"


def fmt_cos(x: float | None) -> str:
    return "–" if x is None else f"{x:.6f}"


def fmt_pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _plain(value: object) -> str:
    """Compact one-line text for a JSON value (pipeline facts)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=False, separators=(", ", ": "), default=str)


def _pipeline_item(key: str, value: object) -> tuple[str, list[str]]:
    """One pipeline fact as text, with sub-items; the finalize section reads as the CLI prints it."""
    if key == "finalize" and isinstance(value, dict) and "masked_channels" in value:
        text = f"removed {value.get('removed_channels', 0):,} of {value['masked_channels']:,} masked channels"
        if not value.get("compacted", True):
            text = f"compaction abandoned ({value.get('abandoned') or 'self-check failed'}); {text}"
        extra = {k: v for k, v in value.items()
                 if k not in ("masked_channels", "removed_channels", "kept_channels", "kept", "compacted",
                              "abandoned")}
        kept = [f"kept {k.get('count', 0):,} in {k.get('module', '')!r} ({k.get('reason', '')})"
                for k in value.get("kept") or [] if isinstance(k, dict)]
        return f"{text}; {_plain(extra)}", kept
    return _plain(value), []


def _coreml_items(details: dict) -> list[tuple[str, str]]:
    """Core ML read-back details, one short line each (long lists become counts)."""
    items = []
    for key, value in details.items():
        if isinstance(value, list):
            if value and all(isinstance(v, str) for v in value) and len(value) <= 5:
                text = "; ".join(value)
            else:
                text = f"{len(value)} entr{'y' if len(value) == 1 else 'ies'}"
        elif isinstance(value, dict):
            text = _plain(value)
            if len(text) > 160:
                text = f"{len(value)} key(s)"
        else:
            text = _plain(value)
        items.append((str(key), text))
    return items


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ---------------------------------------------------------------------------------------------
# Shared figures


def _baseline_stats(r: ValidationReport) -> tuple[str, object]:
    """What the artifact is compared with: the dense export when given (like for like)."""
    if r.dense_stats is not None:
        return "dense export", r.dense_stats
    return "source", r.source_stats


def _headline_latency(r: ValidationReport) -> dict[str, float | int | None]:
    """Medians at the smallest timed batch size: artifact, dense export, torch eager source."""
    out: dict[str, float | int | None] = {"batch": None, "artifact": None, "dense": None,
                                          "source": None}
    if r.latency is None or not r.latency.results:
        return out
    batch = min(x.batch_size for x in r.latency.results)
    out["batch"] = batch
    for role in ("artifact", "dense", "source"):
        res = r.latency.get(role, None, batch)
        out[role] = res.median_ms if res is not None else None
    return out


def summary_lines(r: ValidationReport) -> list[str]:
    """A short console summary: verdict and parity, latency, parameters, MACs, size."""
    lines = []
    verdict = "PASS" if r.passed else "FAIL"
    what = Path(r.artifact.path).name if r.artifact.path else r.name
    if r.outputs and any(o.max_abs is not None for o in r.outputs):
        top1 = [o.top1 for o in r.outputs if o.top1 is not None]
        parity = (f"max abs {fmt_err(r.max_abs_error)}, max rel {fmt_err(r.max_rel_error)}, "
                  f"cosine {fmt_cos(r.min_cosine)}"
                  # the artifact's top-1 class equals the source's: agreement, not task accuracy
                  + (f", top-1 agreement {fmt_pct(min(top1))}" if top1 else "")
                  + f" ({r.inputs.count} {r.inputs.origin} input(s))")
    elif r.coreml is not None:
        parity = "Core ML read-back verification (outputs not compared: needs macOS)"
    else:
        parity = "outputs not compared"
    lines.append(f"{verdict}  {what} ({r.artifact.runtime}): {parity}")
    for failure in r.failures:
        lines.append(f"  - {failure}")
    lat = _headline_latency(r)
    if lat["batch"] is not None:
        parts = []
        art_label = "compacted" if r.artifact.kind == "torch" else "exported"
        if lat["dense"] is not None and lat["artifact"] is not None:
            parts.append(f"dense {fmt_ms(lat['dense'])} -> {art_label} {fmt_ms(lat['artifact'])} "
                         f"({fmt_ratio(_ratio(lat['dense'], lat['artifact']))} faster)")
        elif lat["artifact"] is not None:
            parts.append(f"{art_label} {fmt_ms(lat['artifact'])}")
        if lat["source"] is not None:
            eager = f"torch eager source {fmt_ms(lat['source'])}"
            if lat["artifact"] is not None:
                eager += f" ({fmt_ratio(_ratio(lat['source'], lat['artifact']))})"
            parts.append(eager)
        threads = r.latency.config.threads if r.latency else None
        lines.append(f"latency  batch {lat['batch']}, {threads or 'default'} thread(s): "
                     + "; ".join(parts))
    base_label, base = _baseline_stats(r)
    a = r.artifact_stats
    if base.params is not None and a.params is not None:
        line = (f"params   {fmt_count(base.params)} -> {fmt_count(a.params)} "
                f"({fmt_pct(_ratio(a.params, base.params))} of {base_label})")
        macs_base = base.macs if base.macs is not None else r.source_stats.macs
        if macs_base is not None and a.macs is not None:
            line += f"; MACs {fmt_count(macs_base)} -> {fmt_count(a.macs)} ({_fewer(macs_base, a.macs)})"
        lines.append(line)
    if base.size_bytes is not None and a.size_bytes is not None:
        kind = " (in-memory weights)" if base.size_kind == "tensors" else ""
        lines.append(f"size     {fmt_bytes(base.size_bytes)}{kind} -> {fmt_bytes(a.size_bytes)} "
                     f"({fmt_pct(_ratio(a.size_bytes, base.size_bytes))})")
    return lines


def comparison_rows(reports: Sequence[ValidationReport]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table (relative figures against the first run)."""
    acc_keys = list(dict.fromkeys(k for r in reports for k in r.accuracy))
    header = ["run", "verdict", "params", "MACs", "size", "size reduction", "latency",
              "speedup vs first", "vs dense export", "max rel error"] + acc_keys
    first = reports[0] if reports else None
    first_lat = _headline_latency(first)["artifact"] if first else None
    rows = []
    for r in reports:
        lat = _headline_latency(r)
        latency = lat["artifact"]
        lat_text = (f"{fmt_ms(latency)} (b{lat['batch']})" if latency is not None else "–")
        size = r.artifact_stats.size_bytes
        first_size = first.artifact_stats.size_bytes if first else None
        reduction = _ratio(size, first_size)
        row = [
            r.name,
            "PASS" if r.passed else "FAIL",
            fmt_count(r.artifact_stats.params),
            fmt_count(r.artifact_stats.macs),
            fmt_bytes(size),
            ("baseline" if r is first else
             f"{100 * (1 - reduction):.1f}%" if reduction is not None else "–"),
            lat_text,
            fmt_ratio(_ratio(first_lat, latency)) if r is not first else "baseline",
            fmt_ratio(_ratio(lat["dense"], latency)),
            fmt_err(r.max_rel_error) if r.outputs else "–",
        ]
        for key in acc_keys:
            v = r.accuracy.get(key)
            row.append("–" if v is None else f"{v:.4g}")
        rows.append(row)
    return header, rows


# ---------------------------------------------------------------------------------------------
# Markdown


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    out.extend("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)
    return out


def _parity_rows(r: ValidationReport) -> list[list[str]]:
    return [[o.name, "×".join(str(d) for d in o.shape), fmt_err(o.max_abs), fmt_err(o.max_rel),
             fmt_cos(o.cosine), fmt_pct(o.top1), str(o.samples), o.note or ""] for o in r.outputs]


def _threshold_text(r: ValidationReport) -> str:
    t = r.thresholds
    parts = [f"max rel ≤ {t.max_rel:g}", f"cosine ≥ {t.min_cosine:g}"]
    if t.max_abs is not None:
        parts.insert(0, f"max abs ≤ {t.max_abs:g}")
    if t.min_top1 is not None:
        parts.append(f"top-1 ≥ {t.min_top1:.2%}")
    return ", ".join(parts)


def _latency_rows(r: ValidationReport) -> list[list[str]]:
    if r.latency is None:
        return []
    return [[x.label, x.runtime, str(x.batch_size), fmt_ms(x.median_ms), fmt_ms(x.p90_ms),
             fmt_ms(x.p99_ms), fmt_ms(x.min_ms), str(len(x.samples_ms))]
            for x in r.latency.results]


def _latency_config_text(r: ValidationReport) -> str:
    c = r.latency.config
    return (f"{c.warmup} warm-up and {c.repeats} timed calls per model, interleaved; "
            f"threads: {c.threads or 'runtime default'}; onnxruntime graph optimization: "
            f"{c.graph_optimization}; providers: {', '.join(c.providers)}")


def _speedup_lines(r: ValidationReport) -> list[str]:
    if r.latency is None:
        return []
    lines = []
    for b in sorted({x.batch_size for x in r.latency.results}):
        d = r.latency.ratio("dense", "artifact", batch_size=b)
        s = r.latency.ratio("source", "artifact", batch_size=b)
        parts = []
        if d is not None:
            parts.append(f"{d:.2f}× vs the dense export (like for like)")
        if s is not None:
            parts.append(f"{s:.2f}× vs the torch eager source")
        if parts:
            lines.append(f"batch {b}: artifact " + ", ".join(parts))
    return lines


def _stats_rows(r: ValidationReport) -> tuple[list[str], list[list[str]]]:
    cols = [("source", r.source_stats)]
    if r.dense_stats is not None:
        cols.append(("dense export", r.dense_stats))
    cols.append(("artifact", r.artifact_stats))
    header = [""] + [c for c, _ in cols]
    rows = [
        ["parameters"] + [fmt_count(s.params) for _, s in cols],
        ["non-zero parameters"] + [fmt_count(s.nonzero_params) for _, s in cols],
        ["MACs"] + [fmt_count(s.macs) + (f" ({s.macs_method})" if s.macs_method else "")
                    for _, s in cols],
        ["size"] + [fmt_bytes(s.size_bytes) + (f" ({s.size_kind})" if s.size_kind else "")
                    for _, s in cols],
    ]
    return header, rows


def _io(before: int | None, after: int | None) -> str:
    if before is None and after is None:
        return "–"
    if before == after:
        return str(before)
    return f"{'–' if before is None else before} → {'–' if after is None else after}"


def _layer_rows(rows: Sequence[LayerRow]) -> list[list[str]]:
    return [[x.name, x.type, _io(x.in_before, x.in_after), _io(x.out_before, x.out_after),
             _io(x.params_before, x.params_after), fmt_pct(x.sparsity_before),
             fmt_pct(x.sparsity_after)] for x in rows]


_LAYER_HEADER = ["layer", "type", "in", "out", "params", "weight sparsity before",
                 "after"]
_LOC_HEADER = ["#", "module", "ONNX scope", "ops", "max abs", "max rel", "cosine", "matched"]


def _loc_rows(r: ValidationReport) -> list[list[str]]:
    loc = r.localization
    rows = []
    for i, x in enumerate(loc.layers):
        mark = " ◀ first diverging" if i == loc.first_bad else ""
        rows.append([str(i), x.module + mark, x.onnx_node or "–", x.op_type, fmt_err(x.max_abs),
                     fmt_err(x.max_rel), fmt_cos(x.cosine), x.matched + (
                         f" ({x.note})" if x.note else "")])
    return rows


def _intro(r: ValidationReport) -> str:
    shapes = ", ".join("×".join(map(str, s)) for s in r.inputs.shapes)
    if r.artifact.runtime == "coreml-readback":
        return (f"({r.artifact.kind}): its saved program was read back and checked against the "
                "source weights; outputs were not compared (Core ML predicts only on macOS)")
    return (f"({r.artifact.kind}, run in {r.artifact.runtime}) against the source model over "
            f"{r.inputs.count} {r.inputs.origin} input(s) ({shapes})")


def _markdown_one(r: ValidationReport, level: int = 1) -> list[str]:
    h = "#" * level
    out = [f"{h} Validation report: {r.name}", ""]
    verdict = "**PASS**" if r.passed else "**FAIL**"
    out.append(f"{verdict}: `{r.artifact.path or r.name}` {_intro(r)}.")
    out += ["", "```", *summary_lines(r), "```", ""]
    if r.failures:
        out += [f"{h}# Failures", ""] + [f"- {f}" for f in r.failures] + [""]
    if r.outputs:
        out += [f"{h}# Parity", "", f"Thresholds: {_threshold_text(r)}.", ""]
        out += _md_table(["output", "shape", "max abs", "max rel", "cosine (min)", "top-1",
                          "samples", "note"], _parity_rows(r)) + [""]
    if r.coreml is not None:
        out += [f"{h}# Core ML verification", ""]
        out += [f"- {k}: {v}" for k, v in _coreml_items(r.coreml)] + [""]
    if r.localization is not None:
        loc = r.localization
        out += [f"{h}# Layer localization", ""]
        bad = loc.first_bad_layer
        if bad is not None:
            out.append(f"First diverging layer: **{bad.module}**"
                       + (f" (ONNX scope `{bad.onnx_node}`)" if bad.onnx_node else "")
                       + f", max rel error {fmt_err(bad.max_rel)}, cosine {fmt_cos(bad.cosine)}.")
        else:
            out.append("No intermediate layer exceeds the thresholds.")
        out.append(f"Compared on input #{loc.input_index} ({loc.method}).")
        out += [""] + _md_table(_LOC_HEADER, _loc_rows(r)) + [""]
        out += [f"- {n}" for n in loc.notes] + ([""] if loc.notes else [])
    if r.latency is not None:
        out += [f"{h}# Latency", "", _latency_config_text(r) + ".", ""]
        out += _md_table(["model", "runtime", "batch", "median", "p90", "p99", "min", "calls"],
                         _latency_rows(r)) + [""]
        out += [f"- {line}" for line in _speedup_lines(r)]
        out += [f"- note: {n}" for n in r.latency.notes] + [""]
    header, rows = _stats_rows(r)
    out += [f"{h}# Model statistics", ""] + _md_table(header, rows) + [""]
    if r.accuracy:
        out += [f"{h}# Accuracy", ""] + [f"- {k}: {v:.4g}" for k, v in r.accuracy.items()] + [""]
    if r.layers:
        out += [f"{h}# Layers", ""] + _md_table(_LAYER_HEADER, _layer_rows(r.layers)) + [""]
    if r.pipeline:
        out += [f"{h}# Pipeline", ""]
        for k, v in r.pipeline.items():
            text, subs = _pipeline_item(k, v)
            out += [f"- {k}: {text}"] + [f"  - {sub}" for sub in subs]
        out += [""]
    if r.notes:
        out += [f"{h}# Notes", ""] + [f"- {n}" for n in r.notes] + [""]
    env = ", ".join(f"{k} {v}" for k, v in r.environment.items())
    out += [f"{h}# Environment", "", f"{env}. Report created {r.created} by deployprune "
            f"{r.tool_version} (schema {r.schema}).", ""]
    return out


def render_markdown(reports: ValidationReport | Sequence[ValidationReport]) -> str:
    """Markdown for one report, or a comparison table followed by each run's report."""
    if isinstance(reports, ValidationReport):
        return "\n".join(_markdown_one(reports)).rstrip() + "\n"
    reports = list(reports)
    if not reports:
        raise UsageError("report: no reports given; pass at least one report JSON file")
    if len(reports) == 1:
        return render_markdown(reports[0])
    header, rows = comparison_rows(reports)
    out = [f"# Comparison of {len(reports)} runs", ""] + _md_table(header, rows) + [""]
    out.append("Latency: median of the artifact at the smallest timed batch size; "
               "“vs dense export” compares with the dense ONNX export in onnxruntime.")
    out.append("")
    for r in reports:
        out += _markdown_one(r, level=2)
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# SVG plots

_ROLE_COLORS = {"source": "#8a8f98", "dense": "#e08a2c", "artifact": "#2f6fbd"}
_RUN_COLORS = ["#2f6fbd", "#e08a2c", "#3a9a5b", "#b8483f", "#7d5ab5", "#8a8f98", "#c2a23a",
               "#2b9fa8"]
_FONT = "font-family:system-ui,-apple-system,'Segoe UI',sans-serif"


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * step:
            step *= m
            break
    start = math.ceil(lo / step) * step
    ticks = []
    t = start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _tick_label(t: float) -> str:
    return f"{t:g}"


def _svg_open(kind: str, width: int, height: int, title: str) -> list[str]:
    return [f'<svg class="plot" data-plot="{kind}" xmlns="http://www.w3.org/2000/svg" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{_e(title)}" style="{_FONT};font-size:12px">',
            f"<title>{_e(title)}</title>"]


def _short(name: str, limit: int = 34) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def svg_latency(r: ValidationReport) -> str:
    """Box plot with every call as a dot, one row per model/runtime/batch size."""
    if r.latency is None or not r.latency.results:
        return ""
    results = sorted(r.latency.results, key=lambda x: (x.batch_size, x.role != "source",
                                                       x.role != "dense"))
    left, right, top, row_h = 230, 30, 30, 34
    width = 760
    height = top + row_h * len(results) + 46
    # The axis ends a little past the largest upper fence (q3 + 3 IQR) so one slow call (a
    # page fault, another process) does not squash every box; calls beyond it are drawn at
    # the edge as hollow dots, with their value in a tooltip.
    fences = []
    for x in results:
        a = np.asarray(x.samples_ms, dtype=np.float64)
        q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
        fences.append(min(float(a.max()), float(q3 + 3 * (q3 - q1))))
    hi = max(fences) * 1.08 if fences and max(fences) > 0 else 1.0
    lo = 0.0
    plot_w = width - left - right

    def sx(v: float) -> float:
        return left + (min(v, hi) - lo) / (hi - lo) * plot_w if hi > lo else left

    out = _svg_open("latency", width, height, f"Latency distribution: {r.name}")
    axis_y = top + row_h * len(results)
    for t in _ticks(lo, hi):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{axis_y}" '
                   'stroke="#e3e5e8"/>')
        out.append(f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle" fill="#555">'
                   f"{_tick_label(t)}</text>")
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{axis_y + 34}" text-anchor="middle" '
               'fill="#333">milliseconds per call (box: quartiles, bar: median, whiskers: '
               'min–max, dots: each call)</text>')
    for i, res in enumerate(results):
        cy = top + row_h * i + row_h / 2
        color = _ROLE_COLORS.get(res.role, "#555")
        a = np.asarray(res.samples_ms, dtype=np.float64)
        q1, med, q3 = (float(np.percentile(a, q)) for q in (25, 50, 75))
        lo_w, hi_w = float(a.min()), float(a.max())
        out.append(f'<g class="series" data-role="{_e(res.role)}" data-batch="{res.batch_size}">')
        out.append(f'<text x="{left - 10}" y="{cy + 4:.1f}" text-anchor="end" fill="#222">'
                   f"{_e(res.label)} · b{res.batch_size}</text>")
        out.append(f'<line x1="{sx(lo_w):.1f}" y1="{cy:.1f}" x2="{sx(hi_w):.1f}" y2="{cy:.1f}" '
                   f'stroke="{color}" stroke-width="1.2"/>')
        for v in (lo_w, hi_w):
            out.append(f'<line x1="{sx(v):.1f}" y1="{cy - 6:.1f}" x2="{sx(v):.1f}" '
                       f'y2="{cy + 6:.1f}" stroke="{color}" stroke-width="1.2"/>')
        out.append(f'<rect class="box" x="{sx(q1):.1f}" y="{cy - 10:.1f}" '
                   f'width="{max(sx(q3) - sx(q1), 1):.1f}" height="20" fill="{color}" '
                   f'fill-opacity="0.25" stroke="{color}"><title>{_e(res.label)}, batch '
                   f"{res.batch_size}: median {fmt_ms(med)}, p90 {fmt_ms(res.p90_ms)}, p99 "
                   f"{fmt_ms(res.p99_ms)}</title></rect>")
        out.append(f'<line class="median" x1="{sx(med):.1f}" y1="{cy - 10:.1f}" '
                   f'x2="{sx(med):.1f}" y2="{cy + 10:.1f}" stroke="{color}" stroke-width="3"/>')
        for k, v in enumerate(res.samples_ms):
            jitter = ((k * 7919) % 13 - 6) * 1.1
            if v <= hi:
                out.append(f'<circle class="sample" cx="{sx(v):.1f}" cy="{cy + jitter:.1f}" '
                           f'r="1.8" fill="{color}" fill-opacity="0.55"/>')
            else:
                out.append(f'<circle class="sample beyond" cx="{sx(v):.1f}" '
                           f'cy="{cy + jitter:.1f}" r="2.6" fill="none" stroke="{color}">'
                           f"<title>{fmt_ms(v)} (beyond the axis)</title></circle>")
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)


def _plot_layers(rows: Sequence[LayerRow]) -> list[LayerRow]:
    """Layers worth plotting: those with output channels, norms left out (they mirror convs)."""
    return [x for x in rows if x.out_before is not None and "Norm" not in x.type]


def svg_channels(r: ValidationReport) -> str:
    """Output channels per layer: before (grey) with after (blue) drawn over it."""
    rows = _plot_layers(r.layers)
    if not rows:
        return ""
    left, right, top, row_h = 250, 90, 34, 16
    width = 760
    height = top + row_h * len(rows) + 40
    hi = max(max(x.out_before or 0, x.out_after or 0) for x in rows) or 1
    plot_w = width - left - right
    out = _svg_open("channels", width, height, f"Output channels per layer: {r.name}")
    out.append(f'<rect x="{left}" y="8" width="12" height="10" fill="#c9ccd1"/>'
               f'<text x="{left + 16}" y="17">before</text>'
               f'<rect x="{left + 70}" y="8" width="12" height="10" fill="#2f6fbd"/>'
               f'<text x="{left + 86}" y="17">after</text>')
    for i, x in enumerate(rows):
        y = top + row_h * i
        wb = (x.out_before or 0) / hi * plot_w
        wa = (x.out_after or 0) / hi * plot_w
        out.append(f'<g class="layer" data-layer="{_e(x.name)}">')
        out.append(f'<text x="{left - 8}" y="{y + 11}" text-anchor="end" fill="#222">'
                   f"{_e(_short(x.name))}</text>")
        out.append(f'<rect class="before" x="{left}" y="{y + 2}" width="{wb:.1f}" '
                   f'height="{row_h - 4}" fill="#c9ccd1"/>')
        if x.out_after is not None:
            out.append(f'<rect class="after" x="{left}" y="{y + 4}" width="{wa:.1f}" '
                       f'height="{row_h - 8}" fill="#2f6fbd"/>')
        out.append(f'<text x="{left + plot_w + 6}" y="{y + 11}" fill="#444">'
                   f"{_e(_io(x.out_before, x.out_after))}</text>")
        out.append(f"<title>{_e(x.name)} ({_e(x.type)}): out channels "
                   f"{_e(_io(x.out_before, x.out_after))}, params "
                   f"{_e(_io(x.params_before, x.params_after))}</title></g>")
    axis_y = top + row_h * len(rows) + 4
    for t in _ticks(0, hi):
        xx = left + t / hi * plot_w
        out.append(f'<text x="{xx:.1f}" y="{axis_y + 12}" text-anchor="middle" fill="#555">'
                   f"{_tick_label(t)}</text>")
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{axis_y + 30}" text-anchor="middle" '
               'fill="#333">output channels</text>')
    out.append("</svg>")
    return "\n".join(out)


def svg_sparsity(r: ValidationReport) -> str:
    """Per layer: weight sparsity of the source (zeros) and the fraction of channels removed."""
    rows = _plot_layers(r.layers)
    if not rows:
        return ""
    left, right, top, row_h = 250, 90, 34, 18
    width = 760
    height = top + row_h * len(rows) + 40
    plot_w = width - left - right
    out = _svg_open("sparsity", width, height, f"Sparsity per layer: {r.name}")
    out.append(f'<rect x="{left}" y="8" width="12" height="10" fill="#e08a2c"/>'
               f'<text x="{left + 16}" y="17">weight sparsity (source)</text>'
               f'<rect x="{left + 190}" y="8" width="12" height="10" fill="#2f6fbd"/>'
               f'<text x="{left + 206}" y="17">output channels removed</text>')
    for i, x in enumerate(rows):
        y = top + row_h * i
        sp = x.sparsity_before or 0.0
        removed = x.channels_removed
        out.append(f'<g class="layer" data-layer="{_e(x.name)}">')
        out.append(f'<text x="{left - 8}" y="{y + 12}" text-anchor="end" fill="#222">'
                   f"{_e(_short(x.name))}</text>")
        out.append(f'<rect class="sparsity" x="{left}" y="{y + 2}" width="{sp * plot_w:.1f}" '
                   f'height="7" fill="#e08a2c"/>')
        if removed is not None:
            out.append(f'<rect class="removed" x="{left}" y="{y + 9}" '
                       f'width="{max(removed, 0) * plot_w:.1f}" height="7" fill="#2f6fbd"/>')
        out.append(f'<text x="{left + plot_w + 6}" y="{y + 12}" fill="#444">{fmt_pct(sp)} / '
                   f"{fmt_pct(removed)}</text>")
        out.append(f"<title>{_e(x.name)}: weight sparsity {fmt_pct(sp)}, channels removed "
                   f"{fmt_pct(removed)}</title></g>")
    axis_y = top + row_h * len(rows) + 4
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        xx = left + t * plot_w
        out.append(f'<line x1="{xx:.1f}" y1="{top - 4}" x2="{xx:.1f}" y2="{axis_y - 4}" '
                   'stroke="#e3e5e8"/>')
        out.append(f'<text x="{xx:.1f}" y="{axis_y + 12}" text-anchor="middle" fill="#555">'
                   f"{int(t * 100)}%</text>")
    out.append("</svg>")
    return "\n".join(out)


def svg_comparison(reports: Sequence[ValidationReport]) -> str:
    """Grouped bars: size, parameters, MACs and latency of each run relative to the first."""
    if len(reports) < 2:
        return ""
    metrics = [
        ("size", [r.artifact_stats.size_bytes for r in reports], fmt_bytes),
        ("parameters", [r.artifact_stats.params for r in reports], fmt_count),
        ("MACs", [r.artifact_stats.macs for r in reports], fmt_count),
        ("latency", [_headline_latency(r)["artifact"] for r in reports], fmt_ms),
    ]
    n = len(reports)
    group_w = 40 + n * 26
    left, top, plot_h = 50, 40, 220
    width = max(left + group_w * len(metrics) + 20, 420)
    height = top + plot_h + 70 + 18 * ((n + 2) // 3)
    rel_all = []
    for _, values, _ in metrics:
        base = values[0]
        rel_all.extend(v / base for v in values if v is not None and base)
    hi = max(rel_all + [1.0]) * 1.1
    out = _svg_open("comparison", width, height, "Runs compared (relative to the first run)")

    def sy(v: float) -> float:
        return top + plot_h - v / hi * plot_h

    for t in _ticks(0, hi):
        out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{width - 10}" y2="{sy(t):.1f}" '
                   'stroke="#e3e5e8"/>')
        out.append(f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" fill="#555">'
                   f"{t * 100:.0f}%</text>")
    out.append(f'<line x1="{left}" y1="{sy(1):.1f}" x2="{width - 10}" y2="{sy(1):.1f}" '
               'stroke="#888" stroke-dasharray="4 3"/>')
    for g, (label, values, fmt) in enumerate(metrics):
        gx = left + 20 + g * group_w
        base = values[0]
        for k, v in enumerate(values):
            if v is None or not base:
                continue
            rel = v / base
            x = gx + k * 26
            out.append(f'<rect class="bar" data-run="{_e(reports[k].name)}" data-metric="{label}" '
                       f'x="{x}" y="{sy(rel):.1f}" width="20" height="{sy(0) - sy(rel):.1f}" '
                       f'fill="{_RUN_COLORS[k % len(_RUN_COLORS)]}"><title>{_e(reports[k].name)} '
                       f"{label}: {_e(fmt(v))} ({rel * 100:.0f}% of the first run)</title></rect>")
        out.append(f'<text x="{gx + n * 13:.1f}" y="{top + plot_h + 18}" text-anchor="middle" '
                   f'fill="#222">{label}</text>')
    ly = top + plot_h + 40
    for k, r in enumerate(reports):
        x = left + (k % 3) * 200
        y = ly + 18 * (k // 3)
        out.append(f'<rect x="{x}" y="{y - 9}" width="12" height="10" '
                   f'fill="{_RUN_COLORS[k % len(_RUN_COLORS)]}"/>'
                   f'<text x="{x + 16}" y="{y}">{_e(_short(r.name, 26))}</text>')
    out.append("</svg>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;color:#1d2125;margin:0;
background:#f6f7f9;line-height:1.45}
main{max-width:1000px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:.2em 0 .6em}h2{font-size:1.3em;margin-top:1.6em;
border-bottom:1px solid #d8dbe0;padding-bottom:.2em}h3{font-size:1.05em;margin-top:1.3em}
section.run{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:4px 20px 16px;
margin:20px 0}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em;background:#fff}
th,td{border:1px solid #dfe2e6;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f0f2f5}td:first-child,th:first-child{text-align:left}
tr.bad td{background:#fdecea;font-weight:600}
.verdict{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:700}
.pass{background:#2e8540}.fail{background:#c0392b}
pre{background:#f0f2f5;padding:10px;border-radius:6px;overflow-x:auto;font-size:.85em}
.scroll{overflow-x:auto}.note{color:#555;font-size:.9em}
svg.plot{background:#fff;border:1px solid #e1e4e8;border-radius:6px;margin:.5em 0;
max-width:100%;height:auto}
""".strip()


def _html_table(header: Sequence[str], rows: Iterable[Sequence[str]],
                bad_row: int | None = None, cls: str = "") -> str:
    out = [f'<div class="scroll"><table class="{cls}"><thead><tr>'
           + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        attr = ' class="bad"' if i == bad_row else ""
        out.append(f"<tr{attr}>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _html_one(r: ValidationReport, heading: str = "h2") -> str:
    sub = "h3" if heading == "h2" else "h2"
    verdict = ('<span class="verdict pass">PASS</span>' if r.passed
               else '<span class="verdict fail">FAIL</span>')
    parts = [f'<section class="run" data-run="{_e(r.name)}">',
             f"<{heading}>{_e(r.name)} {verdict}</{heading}>",
             f"<p>{_e(r.artifact.path or r.name)} {_e(_intro(r))}.</p>",
             f"<pre>{_e(chr(10).join(summary_lines(r)))}</pre>"]
    if r.failures:
        parts.append(f"<{sub}>Failures</{sub}><ul>"
                     + "".join(f"<li>{_e(f)}</li>" for f in r.failures) + "</ul>")
    if r.outputs:
        parts.append(f"<{sub}>Parity</{sub}><p class=note>Thresholds: {_e(_threshold_text(r))}"
                     "</p>")
        parts.append(_html_table(["output", "shape", "max abs", "max rel", "cosine (min)",
                                  "top-1", "samples", "note"], _parity_rows(r)))
    if r.coreml is not None:
        parts.append(f"<{sub}>Core ML verification</{sub}><ul>"
                     + "".join(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in _coreml_items(r.coreml))
                     + "</ul>")
    if r.localization is not None:
        loc = r.localization
        bad = loc.first_bad_layer
        text = (f"First diverging layer: <b>{_e(bad.module)}</b>"
                + (f" (ONNX scope <code>{_e(bad.onnx_node)}</code>)" if bad.onnx_node else "")
                + f", max rel error {_e(fmt_err(bad.max_rel))}." if bad is not None
                else "No intermediate layer exceeds the thresholds.")
        parts.append(f"<{sub}>Layer localization</{sub}><p>{text} <span class=note>Compared on "
                     f"input #{loc.input_index} ({_e(loc.method)}).</span></p>")
        parts.append(_html_table(_LOC_HEADER, _loc_rows(r), bad_row=loc.first_bad,
                                 cls="localization"))
        parts.extend(f"<p class=note>{_e(n)}</p>" for n in loc.notes)
    if r.latency is not None and r.latency.results:
        parts.append(f"<{sub}>Latency</{sub}><p class=note>{_e(_latency_config_text(r))}.</p>")
        parts.append(svg_latency(r))
        parts.append(_html_table(["model", "runtime", "batch", "median", "p90", "p99", "min",
                                  "calls"], _latency_rows(r)))
        items = _speedup_lines(r) + [f"note: {n}" for n in r.latency.notes]
        if items:
            parts.append("<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>")
    header, rows = _stats_rows(r)
    parts.append(f"<{sub}>Model statistics</{sub}>" + _html_table(header, rows))
    if r.accuracy:
        parts.append(f"<{sub}>Accuracy</{sub}><ul>"
                     + "".join(f"<li>{_e(k)}: {v:.4g}</li>" for k, v in r.accuracy.items())
                     + "</ul>")
    if r.layers:
        parts.append(f"<{sub}>Layers</{sub}>")
        parts.append(svg_channels(r))
        parts.append(svg_sparsity(r))
        parts.append(_html_table(_LAYER_HEADER, _layer_rows(r.layers)))
    if r.pipeline:
        items = []
        for k, v in r.pipeline.items():
            text, subs = _pipeline_item(k, v)
            inner = "<ul>" + "".join(f"<li>{_e(x)}</li>" for x in subs) + "</ul>" if subs else ""
            items.append(f"<li>{_e(k)}: <code>{_e(text)}</code>{inner}</li>")
        parts.append(f"<{sub}>Pipeline</{sub}><ul>" + "".join(items) + "</ul>")
    if r.notes:
        parts.append(f"<{sub}>Notes</{sub}><ul>"
                     + "".join(f"<li>{_e(n)}</li>" for n in r.notes) + "</ul>")
    env = ", ".join(f"{k} {v}" for k, v in r.environment.items())
    parts.append(f"<p class=note>{_e(env)}. Created {_e(r.created)} by deployprune "
                 f"{_e(r.tool_version)} (schema {_e(r.schema)}).</p>")
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def render_html(reports: ValidationReport | Sequence[ValidationReport]) -> str:
    """A self-contained HTML page: comparison of the runs (when several), then each run."""
    if isinstance(reports, ValidationReport):
        reports = [reports]
    reports = list(reports)
    if not reports:
        raise UsageError("report: no reports given; pass at least one report JSON file")
    title = (f"deployprune report: {reports[0].name}" if len(reports) == 1
             else f"deployprune report: {len(reports)} runs compared")
    body = [f"<h1>{_e(title)}</h1>"]
    if len(reports) > 1:
        header, rows = comparison_rows(reports)
        body.append("<h2>Comparison</h2>")
        body.append(_html_table(header, rows, cls="comparison"))
        body.append("<p class=note>Latency: median of the artifact at the smallest timed batch "
                    "size; “vs dense export” compares with the dense ONNX export in onnxruntime."
                    "</p>")
        body.append(svg_comparison(reports))
    for r in reports:
        body.append(_html_one(r, "h2"))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body><main>\n"
            + "\n".join(body) + "\n</main></body></html>\n")


# ---------------------------------------------------------------------------------------------
# Files


def load_reports(paths: Iterable[str | os.PathLike]) -> list[ValidationReport]:
    """Read report JSON files (as written by ``ValidationReport.to_json``)."""
    return [load_report(p) for p in paths]


def _infer_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        return "html"
    if suffix in (".md", ".markdown"):
        return "md"
    if suffix == ".json":
        return "json"
    raise UsageError(f"{path}: cannot tell the report format from {suffix or 'no suffix'!r}; "
                     "use .html, .md or .json, or pass format=")


def write_report(reports: ValidationReport | Sequence[ValidationReport],
                 path: str | os.PathLike, format: str | None = None, *,
                 force: bool = False) -> Path:
    """Write one or several reports as HTML, Markdown or JSON, atomically.

    ``format`` defaults to the file suffix. JSON holds exactly one report (the versioned
    document); compare runs in HTML or Markdown. An existing file is kept unless ``force``.
    """
    path = Path(path)
    fmt = format or _infer_format(path)
    if fmt not in FORMATS:
        raise UsageError(f"report format {fmt!r} is not one of {', '.join(FORMATS)}")
    if isinstance(reports, ValidationReport):
        reports = [reports]
    reports = list(reports)
    if not reports:
        raise UsageError("report: no reports given; pass at least one report JSON file")
    check_writable(path, force=force)
    if fmt == "json":
        if len(reports) != 1:
            raise UsageError(f"{path}: a JSON report holds one run, got {len(reports)}; write "
                             "HTML or Markdown to compare runs")
        text = reports[0].to_json() + "\n"
    elif fmt == "md":
        text = render_markdown(reports)
    else:
        text = render_html(reports)
    return write_text_atomic(path, text, force=force)
