"""Readable reports from :class:`~deployprune.validate.ValidationReport` objects.

Everything here is a pure function of the reports (their JSON holds all that is drawn), so a
report regenerates from its JSON alone. HTML pages are self-contained: inline CSS and inline
SVG plots drawn here, no scripts, no fonts or styles from the network.
"""

from __future__ import annotations

import html
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


def _text(value: object, key: str = "", limit: int = 300) -> str:
    """A JSON value as short readable text: yes/no, sizes, ``k=v`` pairs and lists, no braces or quotes.

    Also the fallback for pipeline facts this version does not know (written by a newer one)."""
    if value is None:
        text = "–"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, (int, float)) and (key.endswith("_bytes") or key == "bytes"):
        text = fmt_bytes(value)
    elif isinstance(value, int):
        text = f"{value:,}" if abs(value) >= 10_000 else str(value)
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, dict):
        text = ", ".join(f"{k}={_nested(v, str(k))}" for k, v in value.items()) if value else "none"
    elif isinstance(value, (list, tuple)):
        if not value:
            text = "none"
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            text = ", ".join(str(v) for v in value)
        else:
            sep = "; " if any(isinstance(v, (dict, list, tuple)) for v in value) else ", "
            text = sep.join(_text(v, key, limit=10**9) for v in value)
    else:
        text = str(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _nested(value: object, key: str) -> str:
    text = _text(value, key, limit=10**9)
    return f"({text})" if isinstance(value, (dict, list, tuple)) and value else text


def _shape_text(spec: object) -> str:
    """``1×3×224×224 float32`` for an input spec (``{"shape", "dtype", "high"}`` or a bare shape)."""
    if isinstance(spec, dict):
        shape = spec.get("shape")
        text = "×".join(str(d) for d in shape) if isinstance(shape, list) else _text(shape)
        if spec.get("dtype"):
            text += f" {spec['dtype']}"
        if spec.get("high") is not None:
            text += f" (values below {spec['high']})"
        rest = {k: v for k, v in spec.items() if k not in ("shape", "dtype", "high")}
        return text + (f" ({_text(rest)})" if rest else "")
    if isinstance(spec, list) and all(isinstance(d, int) for d in spec):
        return "×".join(str(d) for d in spec)
    return _text(spec)


def _fact(key: str) -> str:
    return key.replace("_", " ")


def _rest(value: dict, known: Iterable[str]) -> list[tuple[str, str]]:
    """Rows for the keys a stage renderer does not know (a newer tool's facts): compact text."""
    skip = set(known)
    return [(_fact(str(k)), _text(v, str(k))) for k, v in value.items() if k not in skip]


def _source_rows(v: dict) -> list[tuple[str, str]]:
    rows = [("file", _text(v.get("path")))]
    if v.get("kind"):
        rows.append(("format", str(v["kind"])))
    if v.get("arch"):
        rows.append(("architecture", str(v["arch"])))
    if v.get("factory"):
        rows.append(("factory", str(v["factory"])))
    if "inputs" in v:
        inputs = v["inputs"] if isinstance(v["inputs"], list) else [v["inputs"]]
        rows.append(("example inputs", ", ".join(_shape_text(s) for s in inputs) or "none"))
    return rows + _rest(v, ("path", "kind", "arch", "factory", "inputs"))


_MASK_ROWS = 12  # more masked tensors than this are summarized by sparsity


def _mask_rows(v: dict) -> list[tuple[str, str]]:
    if not v:
        return [("masked tensors", "none")]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values()):
        return [(str(k), _text(x)) for k, x in v.items()]
    if len(v) <= _MASK_ROWS:
        return [(str(k), f"{fmt_pct(x)} zero") for k, x in v.items()]
    groups: dict[str, int] = {}
    for x in v.values():
        groups[fmt_pct(x)] = groups.get(fmt_pct(x), 0) + 1
    by = ", ".join(f"{n} at {p} zero" for p, n in sorted(groups.items(), key=lambda kv: -kv[1]))
    return [("masked tensors", f"{len(v)}: {by}")]


def _params_rows(v: dict) -> list[tuple[str, str]]:
    src, comp = v.get("source"), v.get("compact")
    if isinstance(src, int) and isinstance(comp, int):
        share = f" ({fmt_pct(_ratio(comp, src))} of the source)" if src else ""
        rows = [("source → compact", f"{src:,} → {comp:,}{share}")]
    else:
        rows = [("source → compact", f"{_text(src)} → {_text(comp)}")]
    return rows + _rest(v, ("source", "compact"))


def _finalize_channels(v: dict) -> str:
    """``removed 3 of 5 masked channels`` (as the CLI prints it), abandoned compaction first."""
    text = f"removed {v.get('removed_channels', 0):,} of {v.get('masked_channels', 0):,} masked channels"
    if not v.get("compacted", True):
        text = f"compaction abandoned ({v.get('abandoned') or 'self-check failed'}); {text}"
    return text


def _kept_items(v: dict) -> list[str]:
    return [f"kept {k.get('count', 0):,} in {k.get('module', '')!r} ({k.get('reason', '')})"
            for k in v.get("kept") or [] if isinstance(k, dict)]


def _finalize_rows(v: dict) -> list[tuple[str, str]]:
    rows = [("channels", _finalize_channels(v))]
    kept = v.get("kept_channels", sum(k.get("count", 0) for k in v.get("kept") or [] if isinstance(k, dict)))
    rows.append(("kept masked channels", f"{kept:,}" if isinstance(kept, int) else _text(kept)))
    if "compacted" in v:
        rows.append(("compaction", "done" if v["compacted"] else
                     f"abandoned: {v.get('abandoned') or 'self-check failed'}; the masked model went on "
                     "at full size"))
    if "torch_max_abs" in v:
        rows.append(("parity with the masked model (max abs)", fmt_err(v["torch_max_abs"])))
    if isinstance(v.get("seconds"), (int, float)):
        rows.append(("time", f"{v['seconds']:.3g} s"))
    blocked = v.get("blocked")
    if blocked:
        rows.append(("blocked", _text(blocked)))
    return rows + _rest(v, ("masked_channels", "removed_channels", "kept_channels", "kept", "compacted",
                            "abandoned", "torch_max_abs", "seconds", "blocked"))


def _conversion_rows(v: dict) -> list[tuple[str, str]]:
    rows = []
    if v.get("target"):
        rows.append(("target", str(v["target"])))
    if v.get("path"):
        rows.append(("artifact", str(v["path"])))
    if "size_bytes" in v:
        rows.append(("size on disk", fmt_bytes(v["size_bytes"])))
    meta = v.get("metadata") if isinstance(v.get("metadata"), dict) else {}
    done = {"ort_max_abs_error", "ort_relative_error", "exporter", "opset", "exporter_fallback",
            "external_data", "external_data_path", "verification", "weight_file_bytes",
            "dense_weight_file_bytes", "weight_file_ratio"}
    if meta.get("exporter") or meta.get("opset") is not None:
        rows.append(("exporter", ", ".join(x for x in (
            str(meta["exporter"]) if meta.get("exporter") else "",
            f"opset {meta['opset']}" if meta.get("opset") is not None else "") if x)))
    if meta.get("exporter_fallback"):
        rows.append(("exporter fallback", _text(meta["exporter_fallback"])))
    if "external_data" in meta:
        rows.append(("external data", _text(meta.get("external_data_path")) if meta["external_data"] else "no"))
    if "ort_max_abs_error" in meta or "ort_relative_error" in meta:
        rows.append(("onnxruntime check at export", f"max abs {fmt_err(meta.get('ort_max_abs_error'))}, "
                     f"rel {fmt_err(meta.get('ort_relative_error'))}"))
    if "weight_file_bytes" in meta:
        text = fmt_bytes(meta["weight_file_bytes"])
        if meta.get("dense_weight_file_bytes"):
            text += f" (dense: {fmt_bytes(meta['dense_weight_file_bytes'])}"
            ratio = meta.get("weight_file_ratio")
            text += f", {ratio:.3f}×)" if isinstance(ratio, (int, float)) else ")"
        rows.append(("weight file", text))
    ver = meta.get("verification")
    if isinstance(ver, dict):
        text = "passed" if ver.get("passed") else "FAILED"
        if "weights_checked" in ver:
            text += (f"; {ver['weights_checked']} weights checked, {ver.get('sparse_constants', 0)} sparse / "
                     f"{ver.get('dense_constants', 0)} dense constants")
        if ver.get("failures"):
            text += "; " + _text(ver["failures"])
        rows.append(("read-back", text))
    elif ver is not None:
        rows.append(("read-back", _text(ver)))
    rows += [(_fact(k), _text(x, k)) for k, x in meta.items() if k not in done]
    warnings = v.get("warnings")
    if isinstance(warnings, list):
        rows += [("warning", _text(w)) for w in warnings] or [("warnings", "none")]
    opts = v.get("options")
    if isinstance(opts, dict):
        rows.append(("options", ", ".join(f"{k}={_nested(x, str(k))}" for k, x in opts.items()
                                          if x is not None and k != "force") or "defaults"))
    return rows + _rest(v, ("target", "path", "size_bytes", "metadata", "warnings", "options"))


#: Pipeline stages in the order they ran, with their renderers (value -> rows of fact, value).
_STAGES = {
    "source": ("source", _source_rows),
    "masks": ("masks", _mask_rows),
    "params": ("parameters", _params_rows),
    "finalize": ("finalize", _finalize_rows),
    "conversion": ("conversion", _conversion_rows),
}
#: Pipeline facts shown in another section (not again in the pipeline table).
_ELSEWHERE = ("accuracy_data", "budget")


def _pipeline_rows(pipeline: dict) -> list[tuple[str, list[tuple[str, str]], list[str]]]:
    """The pipeline section as (stage, [(fact, value)], kept-channel items) groups, no JSON literal.

    Known stages come first in the order they ran; keys this version does not know (a newer tool's)
    follow as compact ``k=v`` text."""
    groups = []
    keys = [k for k in _STAGES if k in pipeline] + [k for k in pipeline if k not in _STAGES]
    for key in keys:
        if key in _ELSEWHERE:
            continue
        value = pipeline[key]
        title, render = _STAGES.get(key, (_fact(key), None))
        kept: list[str] = []
        if render is not None and isinstance(value, dict):
            try:
                rows = render(value)
            except (TypeError, ValueError, AttributeError, KeyError):  # an odd shape: plain text
                rows = [("", _text(value))]
            if key == "finalize":
                kept = _kept_items(value)
        elif isinstance(value, dict) and value:
            rows = [(_fact(str(k)), _text(v, str(k))) for k, v in value.items()]
        else:
            rows = [("", _text(value, key))]
        groups.append((title, rows, kept))
    return groups


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
            text = _text(value, str(key), limit=10**9)
            if len(text) > 160:
                text = f"{len(value)} key(s)"
        else:
            text = _text(value, str(key))
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
    # the artifact's smallest batch: a source timed only at another batch is not its reference
    art = [x.batch_size for x in r.latency.results if x.role == "artifact"]
    batch = min(art or [x.batch_size for x in r.latency.results])
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
    # Parameters and MACs are counted on the compacted torch model for every target, so they compare
    # with the source as given (a dense ONNX export counts BatchNorm folded into its convs); the size
    # compares files with files.
    counts_label, counts = ("source", r.source_stats) if r.source_stats.params is not None else (base_label, base)
    if counts.params is not None and a.params is not None:
        line = (f"params   {fmt_count(counts.params)} -> {fmt_count(a.params)} "
                f"({fmt_pct(_ratio(a.params, counts.params))} of {counts_label})")
        macs_base = counts.macs if counts.macs is not None else r.source_stats.macs
        if macs_base is not None and a.macs is not None:
            line += f"; MACs {fmt_count(macs_base)} -> {fmt_count(a.macs)} ({_fewer(macs_base, a.macs)})"
        lines.append(line)
    if base.size_bytes is not None and a.size_bytes is not None:
        kind = " (in-memory weights)" if base.size_kind == "tensors" else ""
        lines.append(f"size     {fmt_bytes(base.size_bytes)}{kind} -> {fmt_bytes(a.size_bytes)} "
                     f"({fmt_pct(_ratio(a.size_bytes, base.size_bytes))})")
    if r.accuracy:
        lines.append(_accuracy_line(r))
    budget = _budget(r)
    if budget is not None:
        lines.append(budget_line(budget))
    return lines


def _accuracy_line(r: ValidationReport) -> str:
    """``accuracy top-1 on deployprune.data:digits (360 samples): source 95.3% -> artifact 95.1%``."""
    data = _data_text(_accuracy_data(r))
    if list(r.accuracy) == ["source", "artifact"]:
        figures = f"source {_acc_text(r.accuracy['source'])} -> artifact {_acc_text(r.accuracy['artifact'])}"
    else:
        figures = ", ".join(f"{k} {_acc_text(v)}" for k, v in r.accuracy.items())
    return f"accuracy top-1{f' on {data}' if data else ''}: {figures}"


_ACCURACY_HEADER = ["model", "top-1 accuracy"]


def _accuracy_intro(r: ValidationReport) -> str:
    """Where the accuracy figures come from, kept apart from the parity check's top-1 agreement."""
    facts = _accuracy_data(r)
    data = _data_text(facts)
    text = (f"Task top-1 accuracy on labelled data: {data}." if data else
            "Task top-1 accuracy on labelled data (the report does not name the data).")
    if facts.get("not measured"):
        text += f" Not measured: {facts['not measured']}."
    return (text + " This is not the parity check's top-1 agreement, which compares the artifact's "
            "class with the source's on random inputs.")


def _accuracy_rows(r: ValidationReport) -> list[list[str]]:
    return [[str(k), _acc_text(v)] for k, v in r.accuracy.items()]


def _comparison_latency(
        reports: Sequence[ValidationReport]) -> tuple[int | None, list[tuple[float | None, int | None]]]:
    """(common batch, [(artifact median, batch)] per run): like with like across runs.

    The smallest batch size at which every timed run timed its artifact; without one, each run's
    own headline batch (and runs at different batches are then not compared)."""
    sets = [{x.batch_size for x in r.latency.results if x.role == "artifact"}
            for r in reports if r.latency is not None and r.latency.results]
    sets = [s for s in sets if s]
    common = set.intersection(*sets) if sets else set()
    batch = min(common) if common else None
    out = []
    for r in reports:
        if batch is not None:
            res = r.latency.get("artifact", None, batch) if r.latency is not None else None
            out.append((res.median_ms, batch) if res is not None else (None, None))
        else:
            lat = _headline_latency(r)
            out.append((lat["artifact"], lat["batch"] if lat["artifact"] is not None else None))
    return batch, out


def _accuracy_data(r: ValidationReport) -> dict:
    facts = r.pipeline.get("accuracy_data") if isinstance(r.pipeline, dict) else None
    return facts if isinstance(facts, dict) else {}


def _data_text(facts: dict) -> str:
    """``deployprune.data:digits (360 samples)``, or '' when the report does not say."""
    if not facts.get("data"):
        return ""
    samples = facts.get("samples")
    return f"{facts['data']}" + (f" ({samples:,} samples)" if isinstance(samples, int) else "")


def _acc_text(v: float | None) -> str:
    """A task accuracy fraction as a percentage (other figures, from older reports, as numbers)."""
    if v is None:
        return "–"
    if isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1:
        return f"{100 * v:.1f}%"
    return f"{v:.4g}"


def comparison_notes(reports: Sequence[ValidationReport]) -> list[str]:
    """What the comparison table's latency and accuracy columns compare."""
    batch, _ = _comparison_latency(reports)
    if batch is not None:
        notes = [f"Latency: median of the artifact at batch {batch}, the smallest batch size every run "
                 "timed; “vs dense export” compares with the dense ONNX export in onnxruntime."]
    else:
        notes = ["Latency: median of the artifact at each run's smallest timed batch size; runs timed at "
                 "different batch sizes are not compared (“vs first” says so); “vs dense export” "
                 "compares with the dense ONNX export in onnxruntime."]
    data = {r.name: _data_text(_accuracy_data(r)) for r in reports if r.accuracy}
    if data:
        kinds = set(data.values())
        if len(kinds) == 1 and "" not in kinds:
            notes.append(f"Accuracy: task top-1 on {kinds.pop()}, labelled data (not the top-1 agreement "
                         "on random inputs).")
        else:
            notes.append("Accuracy: task top-1 on labelled data, measured on different data per run, so not "
                         "comparable across runs: " + "; ".join(f"{k}: {v or 'data not recorded'}"
                                                                  for k, v in data.items()) + ".")
    return notes


def comparison_rows(reports: Sequence[ValidationReport]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table (relative figures against the first run).

    Latency is compared at one batch size (see :func:`comparison_notes`); accuracy columns are task
    top-1 accuracy per label (``source``, ``artifact``, ``before pruning`` ...)."""
    acc_keys = list(dict.fromkeys(k for r in reports for k in r.accuracy))
    header = ["run", "verdict", "params", "MACs", "size", "size reduction", "latency",
              "speedup vs first", "vs dense export", "max rel error"] + [f"accuracy: {k}" for k in acc_keys]
    first = reports[0] if reports else None
    _, lats = _comparison_latency(reports)
    first_lat, first_batch = lats[0] if lats else (None, None)
    rows = []
    for r, (latency, batch) in zip(reports, lats, strict=True):
        lat_text = f"{fmt_ms(latency)} (b{batch})" if latency is not None else "–"
        if r is first:
            vs_first = "baseline"
        elif latency is not None and first_lat is not None and batch != first_batch:
            vs_first = f"not compared (b{batch} vs b{first_batch})"
        else:
            vs_first = fmt_ratio(_ratio(first_lat, latency))
        dense = (r.latency.ratio("dense", "artifact", batch_size=batch)
                 if r.latency is not None and batch is not None else None)
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
            vs_first,
            fmt_ratio(dense),
            fmt_err(r.max_rel_error) if r.outputs else "–",
        ]
        row += [_acc_text(r.accuracy.get(key)) for key in acc_keys]
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
    order = {"source": 0, "dense": 1, "artifact": 2}
    results = sorted(r.latency.results, key=lambda x: (x.batch_size, order.get(x.role, 3)))
    return [[x.label, x.runtime, str(x.batch_size), fmt_ms(x.median_ms), fmt_ms(x.p90_ms),
             fmt_ms(x.p99_ms), fmt_ms(x.min_ms), str(len(x.samples_ms))]
            for x in results]


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
    return lines + _unmatched_lines(r)


def _batches_text(batches: Iterable[int]) -> str:
    b = sorted(set(batches))
    return f"batch {b[0]}" if len(b) == 1 else "batches " + ", ".join(str(x) for x in b)


def _unmatched_lines(r: ValidationReport) -> list[str]:
    """Models timed only at batch sizes the artifact was not timed at: said, never compared."""
    if r.latency is None:
        return []
    art = {x.batch_size for x in r.latency.results if x.role == "artifact"}
    if not art:
        return []
    by_label: dict[str, set[int]] = {}
    for x in r.latency.results:
        if x.role != "artifact":
            by_label.setdefault(x.label, set()).add(x.batch_size)
    return [f"{label} was timed at {_batches_text(b)} and the artifact at {_batches_text(art)}: "
            "not compared (time per call depends on the batch size)"
            for label, b in by_label.items() if not b & art]


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



# ---------------------------------------------------------------------------------------------
# Budget (deployprune prune --budget; the checkpoint's budget report, copied by export)


def _budget(r: ValidationReport) -> dict | None:
    b = r.pipeline.get("budget") if isinstance(r.pipeline, dict) else None
    return b if isinstance(b, dict) and "budget" in b and "metric" in b else None


def _num(x: object) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def budget_line(b: dict) -> str:
    """``budget   latency=0.5x met: 0.507x of dense (9.13 ms; dense 18.0 ms)`` (from the prune run)."""
    achieved, dense = _num(b.get("achieved")), _num(b.get("dense"))
    if achieved is None or not dense:
        return f"budget   {b['budget']}: not measured"
    ratio = achieved / dense
    state = "met" if b.get("met") else f"NOT met (missed by {_num(b.get('error')) or 0.0:+.1%})"
    what = (f"{ratio:.3f}x of dense ({fmt_ms(achieved)}; dense {fmt_ms(dense)})" if b["metric"] == "latency"
            else f"{fmt_pct(ratio)} of dense")
    return f"budget   {b['budget']} {state}: {what} (measured when pruned)"


def _budget_intro(b: dict) -> str:
    setting = b.get("setting") if isinstance(b.get("setting"), dict) else {}
    runtime = (f"onnxruntime {setting.get('provider', 'CPUExecutionProvider')}, "
               f"{setting.get('threads', 1)} thread(s), batch {setting.get('batch') or 'of the example'}"
               if b["metric"] == "latency" else "counted on the compacted model")
    multiple = f"; widths in multiples of {b['preferred_multiple']} (measured)" \
        if b["metric"] == "latency" and b.get("preferred_multiple") else ""
    return f"Pruned to the budget {b['budget']} ({runtime}{multiple}). {budget_line(b).split('   ', 1)[1]}."


def _budget_rows(b: dict) -> list[list[str]]:
    """Budget vs achieved for latency, MACs and parameters (each where it was measured)."""
    rows = []
    dense, goal, achieved = _num(b.get("dense")), _num(b.get("goal")), _num(b.get("achieved"))
    if b["metric"] == "latency":
        same_run = _num(b.get("dense_ms_same_run"))
        rows.append(["latency (onnxruntime)", fmt_ms(dense), fmt_ms(goal), fmt_ms(achieved),
                     fmt_ratio(achieved / dense) if achieved is not None and dense else "-",
                     f"timed interleaved with the dense ONNX ({fmt_ms(same_run)} in that run)" if same_run else ""])
    for key, label, fmt in (("macs", "MACs", fmt_count), ("params", "parameters", fmt_count)):
        full, got = _num(b.get(f"dense_{key}")), _num(b.get(key))
        target = goal if b["metric"] == key else None
        rows.append([label, fmt(full), fmt(target) if target is not None else "-", fmt(got),
                     fmt_pct(got / full) if got is not None and full else "-",
                     "the budget" if b["metric"] == key else ""])
    return rows


_BUDGET_HEADER = ["cost", "dense", "budget", "achieved", "of dense", "note"]
_GROUP_HEADER = ["group", "layers", "kept", "of total"]


def _group_rows(b: dict) -> list[list[str]]:
    rows = []
    for g in b.get("groups") or []:
        if not isinstance(g, dict):
            continue
        kept, total = _num(g.get("kept")), _num(g.get("total"))
        mods = [str(m) for m in g.get("modules") or []]
        rows.append([str(g.get("group", "")), ", ".join(mods[:4]) + (" ..." if len(mods) > 4 else ""),
                     f"{int(kept or 0):,}/{int(total or 0):,}", fmt_pct(kept / total) if total else "-"])
    return rows


def _calibration_rows(b: dict) -> list[list[str]]:
    rows = []
    for c in b.get("calibration") or []:
        if isinstance(c, dict):
            fmt = fmt_ms if b["metric"] == "latency" else fmt_count
            rows.append([str(c.get("iteration", "")), fmt(_num(c.get("predicted"))), fmt(_num(c.get("measured"))),
                         fmt_ratio(_num(c.get("ratio")))])
    return rows


def svg_budget(r: ValidationReport) -> str:
    """The latency cost table: each layer's measured milliseconds at full and at the chosen widths."""
    b = _budget(r)
    rows = [x for x in (b or {}).get("latency_table") or [] if isinstance(x, dict) and _num(x.get("full_ms"))]
    if not rows:
        return ""
    rows = sorted(rows, key=lambda x: -float(x["full_ms"]))[:40]
    left, right, top, row_h, width = 250, 120, 34, 18, 760
    height = top + row_h * len(rows) + 40
    plot_w = width - left - right
    hi = max(float(x["full_ms"]) for x in rows) * 1.05 or 1.0
    out = _svg_open("budget", width, height, f"Latency cost table: {r.name}")
    out.append(_legend(left, [("#b9bec6", "full width", 110), ("#2f6fbd", "chosen widths (cost table, ms)", 0)]))
    for i, x in enumerate(rows):
        y = top + row_h * i
        full, chosen = float(x["full_ms"]), _num(x.get("chosen_ms"))
        widths = x.get("chosen") or x.get("full")
        out.append(f'<g class="layer" data-layer="{_e(x.get("layer", ""))}">')
        out.append(f'<text x="{left - 8}" y="{y + 12}" text-anchor="end" fill="#222">{_e(_short(str(x.get("layer"))))}'
                   "</text>")
        out.append(f'<rect x="{left}" y="{y + 2}" width="{full / hi * plot_w:.1f}" height="7" fill="#b9bec6"/>')
        if chosen is not None:
            out.append(f'<rect class="chosen" x="{left}" y="{y + 9}" width="{chosen / hi * plot_w:.1f}" height="7" '
                       'fill="#2f6fbd"/>')
        out.append(f'<text x="{left + plot_w + 6}" y="{y + 12}" fill="#444">{_e(fmt_ms(full))} → '
                   f"{_e(fmt_ms(chosen))}</text>")
        out.append(f"<title>{_e(x.get('layer'))}: {x.get('full')} {fmt_ms(full)}; chosen {widths} "
                   f"{fmt_ms(chosen)}</title></g>")
    axis_y = top + row_h * len(rows) + 4
    for t in _ticks(0.0, hi):
        xx = left + t / hi * plot_w
        out.append(f'<line x1="{xx:.1f}" y1="{top - 4}" x2="{xx:.1f}" y2="{axis_y - 4}" stroke="#e3e5e8"/>')
        out.append(f'<text x="{xx:.1f}" y="{axis_y + 12}" text-anchor="middle" fill="#555">{_tick_label(t)} ms</text>')
    out.append("</svg>")
    return "\n".join(out)

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
        out += _md_table(["output", "shape", "max abs", "max rel", "cosine (min)", "top-1 agreement",
                          "samples", "note"], _parity_rows(r)) + [""]
    if r.accuracy or _accuracy_data(r):
        out += [f"{h}# Accuracy", "", _accuracy_intro(r), ""]
        if r.accuracy:
            out += _md_table(_ACCURACY_HEADER, _accuracy_rows(r)) + [""]
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
    budget = _budget(r)
    if budget is not None:
        out += [f"{h}# Budget", "", _budget_intro(budget), ""] + _md_table(_BUDGET_HEADER, _budget_rows(budget))
        out += ["", "Chosen widths:", ""] + _md_table(_GROUP_HEADER, _group_rows(budget)) + [""]
        if _calibration_rows(budget):
            out += ["Calibration (allocate, compact, measure):", ""]
            out += _md_table(["try", "predicted", "measured", "of dense"], _calibration_rows(budget)) + [""]
    if r.layers:
        out += [f"{h}# Layers", ""] + _md_table(_LAYER_HEADER, _layer_rows(r.layers)) + [""]
    groups = _pipeline_rows(r.pipeline)
    if groups:
        out += [f"{h}# Pipeline", ""]
        rows, kept_lists = [], []
        for stage, facts, kept in groups:
            for i, (fact, value) in enumerate(facts):
                if kept and fact == "kept masked channels":
                    value += " (listed below)"
                rows.append([stage if i == 0 else "", fact, value])
            if kept:
                kept_lists += [f"- {stage}: {_finalize_channels(r.pipeline[stage])}; "
                               f"{r.pipeline[stage].get('kept_channels', len(kept))} kept:"]
                kept_lists += [f"  - {x}" for x in kept]
        out += _md_table(["stage", "fact", "value"], rows) + [""]
        out += kept_lists + ([""] if kept_lists else [])
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
    for note in comparison_notes(reports):
        out += [note, ""]
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


def _legend(left: int, items: Sequence[tuple[str, str, int]]) -> str:
    """A plot's legend: (colour, text, distance to the next item) swatches along the top."""
    parts, x = [], left
    for colour, text, step in items:
        parts.append(f'<rect x="{x}" y="8" width="12" height="10" fill="{colour}"/>'
                     f'<text x="{x + 16}" y="17">{_e(text)}</text>')
        x += step
    return "".join(parts)


def _short(name: str, limit: int = 34) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


#: One plot spans at most this ratio of its largest to its smallest value on a linear axis; beyond
#: it the axis is logarithmic (and says so), so a fast artifact is not squashed against zero.
_LOG_RATIO = 10.0


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks per decade inside [lo, hi]; decades only when that makes too many."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mults in ((1, 2, 5), (1,)):
        ticks = [m * 10.0 ** e for e in range(first, last + 1) for m in mults if lo <= m * 10.0 ** e <= hi]
        if len(ticks) <= 9:
            break
    return ticks or [lo]


def _latency_axis(results: Sequence) -> tuple[float, float, bool]:
    """(lo, hi, log) for one batch size's results. The axis ends a little past the largest upper
    fence (q3 + 3 IQR) so one slow call (a page fault, another process) does not squash every box;
    calls beyond it are drawn at the edge as hollow dots, with their value in a tooltip."""
    fences, lows = [], []
    for x in results:
        a = np.asarray(x.samples_ms, dtype=np.float64)
        if not a.size:
            continue
        q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
        fences.append(min(float(a.max()), float(q3 + 3 * (q3 - q1))))
        lows.append(float(a.min()))
    hi = max(fences) * 1.08 if fences and max(fences) > 0 else 1.0
    low = min(lows) if lows else 0.0
    if low > 0 and hi / low > _LOG_RATIO:
        return low / 1.15, hi, True
    return 0.0, hi, False


def svg_latency(r: ValidationReport) -> str:
    """Box plots with every call as a dot, one panel per batch size (one row per model/runtime).

    Calls at different batch sizes never share an axis: a batch of 8 costs more per call than a
    batch of 1, so drawing them together would compare unlike things. A panel whose values span
    more than 10× uses a logarithmic axis, labelled "log scale"."""
    if r.latency is None or not r.latency.results:
        return ""
    batches = sorted({x.batch_size for x in r.latency.results})
    panels = [(b, sorted((x for x in r.latency.results if x.batch_size == b),
                         key=lambda x: (x.role != "source", x.role != "dense"))) for b in batches]
    left, right, row_h, head_h, axis_h = 230, 30, 34, 26, 40
    width = 760
    plot_w = width - left - right
    height = 10 + sum(head_h + row_h * len(rs) + axis_h for _, rs in panels) + 24
    out = _svg_open("latency", width, height, f"Latency distribution: {r.name}")
    y0 = 10
    for batch, results in panels:
        lo, hi, log = _latency_axis(results)

        def sx(v: float, lo: float = lo, hi: float = hi, log: bool = log) -> float:
            v = min(max(v, lo), hi)
            if log:
                return left + (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * plot_w
            return left + (v - lo) / (hi - lo) * plot_w if hi > lo else left

        scale = "log" if log else "linear"
        top = y0 + head_h
        axis_y = top + row_h * len(results)
        out.append(f'<g class="panel" data-batch="{batch}" data-scale="{scale}">')
        out.append(f'<text class="panel-title" x="{left}" y="{y0 + 14}" fill="#222" font-weight="600">'
                   f"batch {batch}" + (" · log scale" if log else "") + "</text>")
        for t in (_log_ticks(lo, hi) if log else _ticks(lo, hi)):
            x = sx(t)
            out.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{axis_y}" stroke="#e3e5e8"/>')
            out.append(f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle" fill="#555">'
                       f"{_tick_label(t)}</text>")
        out.append(f'<text x="{left + plot_w / 2:.1f}" y="{axis_y + 32}" text-anchor="middle" fill="#333">'
                   f"milliseconds per call at batch {batch}" + (" (log scale)" if log else "") + "</text>")
        for i, res in enumerate(results):
            cy = top + row_h * i + row_h / 2
            color = _ROLE_COLORS.get(res.role, "#555")
            a = np.asarray(res.samples_ms, dtype=np.float64)
            if not a.size:
                continue
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
        out.append("</g>")
        y0 = axis_y + axis_h
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{y0 + 12}" text-anchor="middle" fill="#555">'
               "box: quartiles, bar: median, whiskers: min–max, dots: each call; one panel per batch "
               "size</text>")
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
    out.append(_legend(left, [("#c9ccd1", "before", 70), ("#2f6fbd", "after", 0)]))
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
    out.append(_legend(left, [("#e08a2c", "weight sparsity (source)", 190),
                              ("#2f6fbd", "output channels removed", 0)]))
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
    # latency bars only for runs timed at the first run's batch size (like with like)
    _, lats = _comparison_latency(reports)
    first_batch = lats[0][1]
    latency = [v if b == first_batch else None for v, b in lats]
    metrics = [
        ("size", [r.artifact_stats.size_bytes for r in reports], fmt_bytes),
        ("parameters", [r.artifact_stats.params for r in reports], fmt_count),
        ("MACs", [r.artifact_stats.macs for r in reports], fmt_count),
        (f"latency (b{first_batch})" if first_batch is not None else "latency", latency, fmt_ms),
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
            if v is None and label.startswith("latency") and lats[k][0] is not None:
                # timed, but at another batch size than the first run: marked, not drawn
                out.append(f'<text class="not-compared" x="{gx + k * 26 + 10}" y="{sy(0) - 4:.1f}" '
                           f'text-anchor="middle" fill="#888" font-size="10">b{lats[k][1]}<title>'
                           f"{_e(reports[k].name)}: timed at batch {lats[k][1]}, the first run at batch "
                           f"{first_batch}: not compared</title></text>")
            if v is None or not base:
                continue
            rel = v / base
            x = gx + k * 26
            out.append(f'<rect class="bar" data-run="{_e(reports[k].name)}" data-metric="{_e(label)}" '
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
table.pipeline td{text-align:left;white-space:normal;max-width:640px;overflow-wrap:anywhere}
table.pipeline th{text-align:left;vertical-align:top}table.pipeline td:first-of-type{white-space:nowrap}
table.pipeline ul{margin:.2em 0;padding-left:1.2em}
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
                                  "top-1 agreement", "samples", "note"], _parity_rows(r)))
    if r.accuracy or _accuracy_data(r):
        parts.append(f"<{sub}>Accuracy</{sub}><p class=note>{_e(_accuracy_intro(r))}</p>")
        if r.accuracy:
            parts.append(_html_table(_ACCURACY_HEADER, _accuracy_rows(r), cls="accuracy"))
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
    budget = _budget(r)
    if budget is not None:
        parts.append(f"<{sub}>Budget</{sub}><p class=note>{_e(_budget_intro(budget))}</p>")
        parts.append(_html_table(_BUDGET_HEADER, _budget_rows(budget), cls="budget"))
        parts.append(svg_budget(r))
        parts.append("<p>Chosen widths</p>" + _html_table(_GROUP_HEADER, _group_rows(budget), cls="budget-groups"))
        if _calibration_rows(budget):
            parts.append("<p>Calibration (allocate, compact, measure)</p>"
                         + _html_table(["try", "predicted", "measured", "of dense"], _calibration_rows(budget)))
    if r.layers:
        parts.append(f"<{sub}>Layers</{sub}>")
        parts.append(svg_channels(r))
        parts.append(svg_sparsity(r))
        parts.append(_html_table(_LAYER_HEADER, _layer_rows(r.layers)))
    groups = _pipeline_rows(r.pipeline)
    if groups:
        body = []
        for stage, facts, kept in groups:
            for i, (fact, value) in enumerate(facts):
                head = (f'<th scope="row" rowspan="{len(facts)}">{_e(stage)}</th>' if i == 0 else "")
                cell = _e(value)
                if kept and fact == "kept masked channels":
                    cell += "<ul>" + "".join(f"<li>{_e(x)}</li>" for x in kept) + "</ul>"
                body.append(f"<tr>{head}<td>{_e(fact)}</td><td>{cell}</td></tr>")
        parts.append(f'<{sub}>Pipeline</{sub}><div class="scroll"><table class="pipeline"><thead><tr>'
                     "<th>stage</th><th>fact</th><th>value</th></tr></thead><tbody>"
                     + "".join(body) + "</tbody></table></div>")
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
        body.extend(f"<p class=note>{_e(note)}</p>" for note in comparison_notes(reports))
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
