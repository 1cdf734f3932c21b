"""Validate a deployment artifact against its source model.

``validate(source, artifact, example_inputs)`` runs both on the same inputs and measures, per
output: the maximum absolute error, the maximum relative error (absolute error divided by the
output's scale, the largest ``|reference|`` seen over all inputs), the cosine similarity
(the lowest over samples) and, for classifier-like outputs (2-D, one row of logits per sample),
the top-1 agreement. The verdict compares them with :class:`Thresholds`. When the artifact
fails, the intermediate activations are compared layer by layer to name the first layer whose
error jumps. Latency, parameters, MACs, file sizes and a per-layer table complete the
:class:`ValidationReport`, which serializes to a versioned JSON document
(``"schema": "deployprune.report/1"``, see ``deployprune/schemas/report-1.json``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import platform
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import progress
from .errors import ConfigError, DeployPruneError, InputError, UsageError, ValidationFailed
from .fsutil import check_regular_tree
from .latency import (
    LatencyConfig,
    LatencyReport,
    OrtRunner,
    Runner,
    TorchRunner,
    first_line,
    measure,
    ort_feed,
    ort_session,
    random_inputs_like,
)
from .parity import compare, relative_error
from .stats import (
    LayerRow,
    ScopeIndex,
    count_macs,
    count_nonzero_params,
    count_params,
    file_size,
    layer_table,
    module_name_from_scope,
    onnx_macs,
    onnx_params,
)

log = logging.getLogger(__name__)

SCHEMA = "deployprune.report/1"

__all__ = [
    "SCHEMA",
    "Thresholds",
    "OutputMetrics",
    "LayerDiff",
    "Localization",
    "ArtifactInfo",
    "InputsInfo",
    "ModelStats",
    "ValidationReport",
    "validate",
    "load_report",
]

_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Thresholds:
    """Pass criteria. ``None`` disables a check (top-1 is then only reported)."""

    max_abs: float | None = None
    max_rel: float = 1e-4
    min_cosine: float = 0.9999
    min_top1: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_abs", "max_rel"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or v < 0 or math.isnan(v)):
                raise ConfigError(f"threshold {name}: expected a number >= 0, got {v!r}")
        for name in ("min_cosine", "min_top1"):
            v = getattr(self, name)
            if v is None and name == "min_top1":
                continue
            if not isinstance(v, (int, float)) or not -1.0 <= v <= 1.0:
                raise ConfigError(f"threshold {name}: expected a number in [-1, 1], got {v!r}")
        for f in fields(self):  # store floats so a JSON round trip reproduces the same text
            v = getattr(self, f.name)
            if v is not None:
                setattr(self, f.name, float(v))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Thresholds:
        allowed = [f.name for f in fields(cls)]
        for key in data:
            if key not in allowed:
                raise ConfigError(f"thresholds: unknown key {key!r}; allowed keys: "
                                  f"{', '.join(allowed)}")
        return cls(**data)


@dataclass
class OutputMetrics:
    """Agreement of one output over all validation inputs."""

    name: str
    shape: list[int]  # artifact output shape for the first input
    max_abs: float | None
    max_rel: float | None  # max_abs / scale
    scale: float | None  # max |reference| over all inputs
    cosine: float | None  # lowest per-sample cosine similarity
    top1: float | None  # fraction of rows whose argmax agrees (2-D float outputs only)
    samples: int
    nonfinite: int = 0  # non-finite artifact values where the reference is finite
    note: str | None = None


@dataclass
class LayerDiff:
    """Error of one intermediate activation, artifact against source."""

    module: str  # torch module name in the source
    onnx_node: str | None  # ONNX scope (TorchScript exporter naming) when the artifact is ONNX
    op_type: str
    shape: list[int]
    max_abs: float | None
    max_rel: float | None
    cosine: float | None
    matched: str  # "same" | "folded-bn" | "nonzero-channels" | "not-comparable"
    note: str | None = None


@dataclass
class Localization:
    method: str  # "onnx-intermediates" | "torch-hooks"
    input_index: int
    first_bad: int | None  # index into layers
    layers: list[LayerDiff] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def first_bad_layer(self) -> LayerDiff | None:
        return self.layers[self.first_bad] if self.first_bad is not None else None


@dataclass
class ArtifactInfo:
    path: str | None
    kind: str  # "onnx" | "coreml" | "torch"
    runtime: str  # "onnxruntime" | "coreml-readback" | "coreml" | "torch"
    size_bytes: int | None


@dataclass
class InputsInfo:
    origin: str  # "random" | "data"
    count: int
    seed: int | None
    shapes: list[list[int]]
    dtypes: list[str]


@dataclass
class ModelStats:
    params: int | None = None
    nonzero_params: int | None = None
    macs: int | None = None
    macs_method: str | None = None  # "torch.utils.flop_counter" | "onnx"
    size_bytes: int | None = None
    size_kind: str | None = None  # "file" | "directory" | "tensors" (in-memory weights)


@dataclass
class ValidationReport:
    name: str
    passed: bool
    failures: list[str]
    thresholds: Thresholds
    artifact: ArtifactInfo
    inputs: InputsInfo
    outputs: list[OutputMetrics]
    source_stats: ModelStats
    artifact_stats: ModelStats
    dense_artifact: ArtifactInfo | None = None
    dense_stats: ModelStats | None = None
    localization: Localization | None = None
    coreml: dict[str, Any] | None = None
    latency: LatencyReport | None = None
    layers: list[LayerRow] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)  # where known (set by the caller)
    pipeline: dict[str, Any] = field(default_factory=dict)  # facts the caller adds (plain JSON)
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    tool_version: str = ""
    schema: str = SCHEMA

    # -- convenience -------------------------------------------------------------------------

    @property
    def max_abs_error(self) -> float:
        values = [o.max_abs for o in self.outputs if o.max_abs is not None]
        return max(values) if values else math.nan

    @property
    def max_rel_error(self) -> float:
        values = [o.max_rel for o in self.outputs if o.max_rel is not None]
        return max(values) if values else math.nan

    @property
    def min_cosine(self) -> float:
        values = [o.cosine for o in self.outputs if o.cosine is not None]
        return min(values) if values else math.nan

    def raise_for_failure(self) -> None:
        """Raise :class:`ValidationFailed` (exit code 4) with a one-line summary if not passed."""
        if not self.passed:
            raise ValidationFailed(f"{self.artifact.path or self.name}: validation failed: "
                                   + "; ".join(self.failures))

    # -- serialization -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "report") -> ValidationReport:
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(data).__name__}")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise InputError(f"{where}: schema {schema!r} is not supported (this deployprune "
                             f"reads {SCHEMA!r}); regenerate the report with this version")
        return _from_plain(cls, data, where)

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str = "report") -> ValidationReport:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                             "pass a report written by deployprune") from exc
        except RecursionError:
            raise InputError(f"{where}: not valid JSON (nested too deeply); pass a report written by deployprune"
                             ) from None
        except UnicodeDecodeError as exc:
            raise InputError(f"{where}: not valid JSON (not UTF-8 text: {exc.reason}); "
                             "pass a report written by deployprune") from None
        return cls.from_dict(data, where=where)

    # Rendering (Markdown, HTML, the console summary) is deployprune.report's job: validate
    # measures, report renders; report imports this module, never the other way round.


def load_report(path: str | os.PathLike) -> ValidationReport:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: report not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read report ({first_line(exc)})") from exc
    return ValidationReport.from_json(text, where=str(path))


# ---------------------------------------------------------------------------------------------
# JSON <-> dataclasses (non-finite floats are written as the strings "NaN", "Infinity",
# "-Infinity" so the document stays strict JSON and reloads to the same numbers)


def _encode_float(x: float) -> float | str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return _encode_float(obj)
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return _to_plain(obj.item())
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return _to_plain(obj.tolist())
    return str(obj)


_FLOAT_WORDS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _from_plain(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _from_plain(arg, value, where)
            except InputError as exc:
                errors.append(str(exc))
        raise InputError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected an object for {tp.__name__}, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in fields(tp) if f.init}
        for key in value:
            if key not in names:
                raise InputError(f"{where}: unknown key {key!r} in {tp.__name__}; was this report "
                                 "written by a newer deployprune?")
        kwargs = {}
        for f in fields(tp):
            if not f.init:
                continue
            if f.name not in value:  # documents hold every field (as the schema requires)
                raise InputError(f"{where}: {tp.__name__} is missing key {f.name!r}")
            kwargs[f.name] = _from_plain(hints[f.name], value[f.name], f"{where}.{f.name}")
        try:
            return tp(**kwargs)
        except DeployPruneError as exc:
            raise InputError(f"{where}: {exc}") from exc
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list):
            raise InputError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_from_plain(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected an object, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {k: _from_plain(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and value in _FLOAT_WORDS:
            return _FLOAT_WORDS[value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InputError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InputError(f"{where}: expected an integer, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise InputError(f"{where}: expected true or false, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise InputError(f"{where}: expected a string, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Running models


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Tensors of a model output in the order the ONNX exporter flattens them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten_outputs(v)]
    return []


def _run_torch(model: nn.Module, inputs: tuple[torch.Tensor, ...],
               what: str = "source model") -> list[np.ndarray]:
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as exc:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise InputError(f"{what} ({type(model).__name__}) fails on inputs of shape {shapes}: "
                         f"{first_line(exc)}; pass example inputs the model accepts") from exc
    return [t.detach().cpu().numpy() for t in _flatten_outputs(out)]


@dataclass
class _Acc:
    """Running aggregate for one output (figures from :func:`deployprune.parity.compare`)."""

    name: str
    shape: list[int] | None = None
    max_abs: float = 0.0
    scale: float = 0.0
    cosine: float = 1.0
    agree: int = 0
    rows: int = 0
    classifier: bool = True
    samples: int = 0
    nonfinite: int = 0
    note: str | None = None
    comparable: bool = True

    def add(self, ref: np.ndarray, got: np.ndarray) -> float:
        """Fold one input's pair in; returns that input's relative error."""
        if self.shape is None:
            self.shape = [int(d) for d in got.shape]
        p = compare(ref, got, rows=True)
        if not p.comparable:
            self.note = f"shape {tuple(got.shape)} differs from the source's {tuple(ref.shape)}"
            self.comparable = False
            return math.inf
        if p.mismatches and self.nonfinite == 0:
            self.note = "first non-finite mismatch at " + (p.first_mismatch or "?").replace(
                "reference", "source").replace("actual", "artifact")
        self.nonfinite += p.mismatches
        self.max_abs = max(self.max_abs, p.max_abs)
        self.scale = max(self.scale, p.scale)
        self.cosine = min(self.cosine, p.cosine)
        self.samples += ref.shape[0] if ref.ndim >= 2 else 1
        if ref.ndim == 2 and ref.shape[1] >= 2 and np.issubdtype(ref.dtype, np.floating):
            r = np.nan_to_num(ref.astype(np.float64, copy=False))
            g = np.nan_to_num(got.astype(np.float64, copy=False))
            self.agree += int((r.argmax(axis=1) == g.argmax(axis=1)).sum())
            self.rows += ref.shape[0]
        else:
            self.classifier = False
        return p.rel

    def result(self) -> OutputMetrics:
        if not self.comparable or (self.note is not None and self.samples == 0):
            return OutputMetrics(self.name, self.shape or [], None, None, None, None, None,
                                 self.samples, self.nonfinite, self.note)
        top1 = self.agree / self.rows if self.classifier and self.rows else None
        return OutputMetrics(self.name, self.shape or [], self.max_abs,
                             relative_error(self.max_abs, self.scale), self.scale,
                             self.cosine, top1, self.samples, self.nonfinite, self.note)


def _check(metrics: list[OutputMetrics], th: Thresholds, context: str = "") -> list[str]:
    failures = []
    for m in metrics:
        where = f"output {m.name!r}{context}"
        if m.max_abs is None:
            failures.append(f"{where}: {m.note or 'not compared'}")
            continue
        if m.nonfinite:
            failures.append(f"{where}: {m.nonfinite} position(s) whose non-finite values differ "
                            "from the source (NaN must match NaN, inf the same-sign inf)"
                            + (f"; {m.note}" if m.note else ""))
        if th.max_abs is not None and m.max_abs > th.max_abs:
            failures.append(f"{where}: max abs error {m.max_abs:.3g} > {th.max_abs:g}")
        if m.max_rel is not None and m.max_rel > th.max_rel:
            failures.append(f"{where}: max rel error {m.max_rel:.3g} > {th.max_rel:g} "
                            f"(max abs {m.max_abs:.3g}, output scale {m.scale:.3g})")
        if m.cosine is not None and m.cosine < th.min_cosine:
            failures.append(f"{where}: cosine similarity {m.cosine:.6f} < {th.min_cosine:g}")
        if th.min_top1 is not None:
            if m.top1 is None:
                continue
            if m.top1 < th.min_top1:
                failures.append(f"{where}: top-1 agreement {m.top1:.2%} < {th.min_top1:.2%}")
    return failures


# ---------------------------------------------------------------------------------------------
# Probes: a second batch size and inputs at 10x scale

PROBE_SCALE = 10.0


def _dynamic_batch(session: Any, example: tuple[torch.Tensor, ...]) -> bool:
    """True when every ONNX input has a symbolic first dimension and the examples share it."""
    metas = session.get_inputs()
    if not metas or len(metas) != len(example):
        return False
    sizes = set()
    for meta, t in zip(metas, example, strict=True):
        shape = list(meta.shape or [])
        if t.dim() == 0 or not shape or isinstance(shape[0], int):
            return False
        sizes.add(int(t.shape[0]))
    return len(sizes) == 1


def _rebatch(input_sets: list[tuple[torch.Tensor, ...]], batch: int) -> tuple[torch.Tensor, ...]:
    """``batch`` rows drawn in turn from every input set (the examples' own values and dtypes)."""
    out = []
    for k, example in enumerate(input_sets[0]):
        try:
            rows = torch.cat([s[k] for s in input_sets], dim=0)
        except RuntimeError:  # data batches of different shapes: the example's rows only
            rows = example
        out.append(rows[torch.arange(batch) % rows.shape[0]])
    return tuple(out)


def _scaled(inputs: tuple[torch.Tensor, ...], factor: float) -> tuple[torch.Tensor, ...]:
    return tuple(t * factor if t.is_floating_point() else t for t in inputs)


def _probe(source: nn.Module, run_artifact: Any, input_sets: list[tuple[torch.Tensor, ...]],
           th: Thresholds, dynamic_batch: bool) -> tuple[list[str], list[str]]:
    """Compare at a second batch size (artifacts with a dynamic batch) and on inputs at 10x
    scale. Returns (failures, notes). The relative thresholds apply; ``max_abs`` and
    ``min_top1`` belong to the inputs the user chose and are not applied here."""
    relative = Thresholds(max_abs=None, max_rel=th.max_rel, min_cosine=th.min_cosine, min_top1=None)
    probes: list[tuple[str, list[tuple[torch.Tensor, ...]]]] = []
    if dynamic_batch:
        batch = int(input_sets[0][0].shape[0])
        other = 3 if batch != 3 else 2
        probes.append((f" at batch {other} (the artifact has a dynamic batch)", [_rebatch(input_sets, other)]))
    if any(t.is_floating_point() for t in input_sets[0]):
        probes.append((f" on inputs at {PROBE_SCALE:g}x scale",
                       [_scaled(s, PROBE_SCALE) for s in input_sets[:2]]))
    failures: list[str] = []
    notes: list[str] = []
    for context, sets in probes:
        accs: list[_Acc] = []
        try:
            for inputs in sets:
                ref = _run_torch(source, inputs)
                try:
                    got, names = run_artifact(inputs)
                except DeployPruneError:
                    raise
                except Exception as exc:  # the runtime refuses: the artifact does not generalize
                    failures.append(f"artifact{context}: the runtime fails ({first_line(exc)})")
                    break
                if len(ref) != len(got):
                    failures.append(f"artifact{context}: {len(got)} output(s), source has {len(ref)}")
                    break
                accs = accs or [_Acc(n) for n in names]
                for acc, r, g in zip(accs, ref, got, strict=True):
                    acc.add(r, g)
        except InputError as exc:  # the source itself does not run there: nothing to compare
            notes.append(f"not compared{context}: {exc}")
            continue
        if not accs:
            continue
        metrics = [a.result() for a in accs]
        found = _check(metrics, relative, context)
        failures.extend(found)
        if not found:
            worst = max((m.max_rel for m in metrics if m.max_rel is not None), default=0.0)
            notes.append(f"also compared{context}: max rel error {worst:.3g}")
    return failures, notes


# ---------------------------------------------------------------------------------------------
# Localization


def _align(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Make a source activation comparable with the artifact's.

    Equal shapes compare as they are. A compacted artifact has fewer channels along one
    dimension than the masked source: the source's channels that are zero everywhere (the
    pruned ones) are dropped, and if the rest match in number they are compared.
    """
    if ref.shape == got.shape:
        return ref, "same"
    if ref.ndim != got.ndim:
        return None, "not-comparable"
    diff = [d for d in range(ref.ndim) if ref.shape[d] != got.shape[d]]
    if len(diff) != 1 or ref.shape[diff[0]] < got.shape[diff[0]]:
        return None, "not-comparable"
    d = diff[0]
    other = tuple(i for i in range(ref.ndim) if i != d)
    alive = np.nonzero(np.abs(ref).max(axis=other) > 0)[0] if other else np.nonzero(ref)[0]
    if len(alive) != got.shape[d]:
        return None, "not-comparable"
    return np.take(ref, alive, axis=d), "nonzero-channels"


def _diff_numbers(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    p = compare(ref, got)
    return p.max_abs, p.rel, p.cosine


class _Recorder:
    """Forward hooks that keep every module's output tensors, in completion order."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: dict[str, list[list[np.ndarray]]] = {}
        self.order: list[tuple[str, int]] = []  # (module name, call index), leaves only
        self.types: dict[str, str] = {}
        self._handles = []
        for name, module in model.named_modules():
            if not name or "parametrizations" in name.split("."):
                continue
            self.types[name] = type(module).__name__
            leaf = not any(True for n, _ in module.named_children() if n != "parametrizations")
            self._handles.append(module.register_forward_hook(self._hook(name, leaf)))

    def _hook(self, name: str, leaf: bool) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            tensors = [t.detach().cpu().numpy().copy() for t in _flatten_outputs(output)]
            self.calls.setdefault(name, []).append(tensors)
            if leaf:
                self.order.append((name, len(self.calls[name]) - 1))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _candidates(rec: _Recorder, module: str, call: int) -> list[tuple[np.ndarray, str]]:
    """Source activations an artifact activation of ``module`` may correspond to."""
    calls = rec.calls.get(module)
    if not calls:
        return []
    out = [(t, "same") for t in calls[min(call, len(calls) - 1)]]
    # An exporter folds a BatchNorm that follows a convolution into it: the ONNX Conv then
    # computes conv+bn, so the BatchNorm's output is the reference.
    if (module, call) in rec.order:
        k = rec.order.index((module, call))
        if k + 1 < len(rec.order):
            nxt, ncall = rec.order[k + 1]
            if rec.types.get(nxt, "").startswith("BatchNorm"):
                out.extend((t, "folded-bn") for t in rec.calls[nxt][ncall])
    return out


def _compare_layer(module: str, onnx_node: str | None, op_type: str, got: np.ndarray,
                   candidates: list[tuple[np.ndarray, str]]) -> LayerDiff:
    best: LayerDiff | None = None
    for ref, how in candidates:
        aligned, matched = _align(ref, got)
        if aligned is None:
            continue
        max_abs, rel, cos = _diff_numbers(aligned, got)
        label = how if matched == "same" else f"{how}+{matched}" if how != "same" else matched
        cand = LayerDiff(module, onnx_node, op_type, [int(d) for d in got.shape], max_abs, rel,
                         cos, label)
        if best is None or (cand.max_rel or 0.0) < (best.max_rel or 0.0):
            best = cand
    if best is None:
        shapes = ", ".join(str(tuple(r.shape)) for r, _ in candidates) or "no output recorded"
        return LayerDiff(module, onnx_node, op_type, [int(d) for d in got.shape], None, None,
                         None, "not-comparable",
                         f"artifact shape {tuple(got.shape)} vs source {shapes}")
    return best


def _first_bad(layers: list[LayerDiff], th: Thresholds) -> int | None:
    """The first layer whose error exceeds the thresholds and jumps (>= 10x the largest error
    before it); if errors creep up without a jump, the first layer exceeding the thresholds."""
    worst_before = 0.0
    first_exceeding = None
    for i, layer in enumerate(layers):
        if layer.max_rel is None:
            continue
        exceeds = layer.max_rel > th.max_rel or (layer.cosine is not None
                                                 and layer.cosine < th.min_cosine)
        if exceeds:
            if first_exceeding is None:
                first_exceeding = i
            if layer.max_rel >= 10 * worst_before:
                return i
        worst_before = max(worst_before, layer.max_rel)
    return first_exceeding


def _node_scope(node: Any) -> str | None:
    """Module scope of an ONNX node: from its name (``/layer1/conv1/Conv`` -> ``/layer1/conv1``)
    or, for a node a simplifier renamed, from a scoped output tensor name; None if neither."""
    if node.name.startswith("/"):
        return node.name.rsplit("/", 1)[0]
    for out in node.output:
        if out.startswith("/") and "/" in out[1:]:
            return out.rsplit("/", 1)[0]
    return None


def _within(scope: str | None, outer: str) -> bool:
    return scope is not None and (scope == outer or scope.startswith(outer + "/"))


def _scope_outputs(model: Any, modules: dict[str, nn.Module]) -> list[tuple[str, str, str, str]]:
    """(scope, module name, op types, output tensor name) of the layers to compare, in graph order.

    Layers are the scopes that directly hold a Conv/ConvTranspose/Gemm/MatMul node, and the
    scopes of torch modules that own a weight matrix (whose compute node a simplifier may have
    renamed). A scope's output is the last tensor produced inside it (children included) that a
    scoped node outside it, or the graph output, consumes: a Linear exported as MatMul + Add is
    compared after the Add, an attention block after its output projection. Consumers without
    a scope (renamed by a simplifier) are not counted: they may belong to the scope itself.
    """
    nodes = list(model.graph.node)
    scopes = [_node_scope(n) for n in nodes]
    consumers: dict[str, list[str | None]] = {}
    for node, scope in zip(nodes, scopes, strict=True):
        for i in node.input:
            consumers.setdefault(i, []).append(scope)
    graph_outputs = {o.name for o in model.graph.output}
    index = ScopeIndex(modules)
    direct_ops: dict[str, list[str]] = {}
    for node, scope in zip(nodes, scopes, strict=True):
        if scope:
            ops = direct_ops.setdefault(scope, [])
            if node.op_type in _COMPUTE_OPS and node.name.startswith("/"):
                ops.append(node.op_type)
    found = []
    for scope, ops in direct_ops.items():
        module = module_name_from_scope(scope + "/_", index)
        if module is None:
            continue
        weight = getattr(modules[module], "weight", None)
        owns_matrix = isinstance(weight, torch.Tensor) and weight.ndim >= 2
        if not ops and not owns_matrix:
            continue
        exit_at = None
        for k, (node, s) in enumerate(zip(nodes, scopes, strict=True)):
            if not _within(s, scope):
                continue
            for out in node.output:
                users = consumers.get(out, [])
                if out in graph_outputs or any(u is not None and not _within(u, scope)
                                               for u in users):
                    exit_at = (k, out)
        if exit_at is None:
            continue
        kinds = "+".join(dict.fromkeys(ops)) or type(modules[module]).__name__
        found.append((exit_at[0], scope, module, kinds, exit_at[1]))
    found.sort(key=lambda t: t[0])
    return [t[1:] for t in found]


def _localize_onnx(source: nn.Module, path: Path, inputs: tuple[torch.Tensor, ...],
                   th: Thresholds, input_index: int, providers: Sequence[str]) -> Localization:
    import onnx

    loc = Localization(method="onnx-intermediates", input_index=input_index, first_bad=None)
    model = onnx.load(str(path))
    modules = dict(source.named_modules())
    scopes = _scope_outputs(model, modules)
    if not scopes:
        loc.notes.append("no ONNX node carries a torch module scope (export with the TorchScript "
                         "exporter, dynamo=False, to keep /module/path/Op names)")
        return loc
    existing = {o.name for o in model.graph.output}
    for _, _, _, out in scopes:
        if out not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=out))
            existing.add(out)
    if model.ByteSize() > 2**31 - 1:
        loc.notes.append("model larger than 2 GB: intermediate outputs not compared")
        return loc
    session = ort_session(model.SerializeToString(), threads=None, graph_optimization="disable",
                          providers=providers)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, ort_feed(session, inputs, where=str(path))),
                      strict=True))
    rec = _Recorder(source)
    try:
        with torch.no_grad():
            source(*inputs)
    finally:
        rec.remove()
    calls_seen: dict[str, int] = {}
    for scope, module, kinds, out in scopes:
        call = calls_seen.get(module, 0)
        calls_seen[module] = call + 1
        loc.layers.append(_compare_layer(module, scope + "/", kinds, values[out],
                                         _candidates(rec, module, call)))
    loc.first_bad = _first_bad(loc.layers, th)
    return loc


def _localize_torch(source: nn.Module, artifact: nn.Module, inputs: tuple[torch.Tensor, ...],
                    th: Thresholds, input_index: int) -> Localization:
    loc = Localization(method="torch-hooks", input_index=input_index, first_bad=None)
    rec_s = _Recorder(source)
    rec_a = _Recorder(artifact)
    try:
        with torch.no_grad():
            source(*inputs)
            artifact(*inputs)
    finally:
        rec_s.remove()
        rec_a.remove()
    for name, call in rec_a.order:
        if name not in rec_s.calls:
            continue
        tensors = rec_a.calls[name][call]
        if not tensors:
            continue
        got = tensors[0]
        src_calls = rec_s.calls[name]
        refs = [(t, "same") for t in src_calls[min(call, len(src_calls) - 1)]]
        loc.layers.append(_compare_layer(name, None, rec_a.types[name], got, refs))
    loc.first_bad = _first_bad(loc.layers, th)
    if not loc.layers:
        loc.notes.append("source and artifact share no module names; nothing to compare")
    return loc


# ---------------------------------------------------------------------------------------------
# Core ML


def _coreml_readback(path: Path, source: nn.Module,
                     example_inputs: tuple[torch.Tensor, ...]) -> tuple[bool, list[str], dict]:
    """Linux: the converter's read-back verification (weights of the saved program vs torch)."""
    from torch.nn.utils import parametrize

    if any(parametrize.is_parametrized(m) for m in source.modules()):
        # masks attached by a pruner: compare against the plain masked weights
        import copy

        from .masks import strip_parametrizations_

        source = copy.deepcopy(source)
        strip_parametrizations_(source, leave_parametrized=True)
    from . import converters

    try:  # the target's own check, from the registry (validate never imports a converter by name)
        verify = converters.get("coreml").verify
    except (ImportError, AttributeError, DeployPruneError) as exc:
        msg = f"coreml verification unavailable (target 'coreml' verify(): {first_line(exc)})"
        return False, [msg], {"available": False}
    try:
        result = verify(path, source, example_inputs)
    except DeployPruneError as exc:
        return False, [f"coreml read-back: {exc}"], {"available": True, "error": str(exc)}
    except Exception as exc:  # a verifier crash must not pass for a verdict: report it
        msg = f"coreml read-back could not run ({first_line(exc)})"
        return False, [msg], {"available": True, "error": first_line(exc)}
    details: dict[str, Any]
    if isinstance(result, bool):
        details, passed = {}, result
    else:
        if callable(getattr(result, "to_dict", None)):
            details = dict(result.to_dict())  # the verifier's own compact summary
        elif dataclasses.is_dataclass(result) and not isinstance(result, type):
            details = dataclasses.asdict(result)
        elif isinstance(result, dict):
            details = dict(result)
        else:
            details = {k: v for k, v in vars(result).items() if not k.startswith("_")}
        passed = bool(details.get("passed", getattr(result, "passed", True)))
    details = _to_plain(details)
    details["available"] = True
    failures = []
    if not passed:
        listed = details.get("failures") or details.get("mismatches") or []
        reason = "; ".join(str(x) for x in listed[:5]) if isinstance(listed, list) else str(listed)
        failures.append("coreml read-back: the saved program does not match the source weights"
                        + (f" ({reason})" if reason else ""))
    return passed, failures, details


def _run_coreml(path: Path,
                inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:  # pragma: no cover
    import coremltools as ct

    from . import converters

    with converters.get("coreml").private_copy(path) as readable:  # coremltools rewrites the Manifest.json it opens
        model = ct.models.MLModel(str(readable))
    spec = model.get_spec()
    in_names = [i.name for i in spec.description.input]
    out_names = [o.name for o in spec.description.output]
    pred = model.predict({n: t.detach().cpu().numpy() for n, t in zip(in_names, inputs,
                                                                      strict=False)})
    return [np.asarray(pred[n]) for n in out_names]


# ---------------------------------------------------------------------------------------------
# Entry point


def _artifact_kind(artifact: str | Path | nn.Module) -> tuple[str, Path | None]:
    if isinstance(artifact, nn.Module):
        return "torch", None
    if not isinstance(artifact, (str, os.PathLike)):
        raise UsageError(f"artifact: expected a path (.onnx, .mlpackage) or an nn.Module, "
                         f"got {type(artifact).__name__}")
    path = Path(artifact)
    if not path.exists():
        raise InputError(f"{path}: artifact not found; check the path")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx", path
    if suffix in (".mlpackage", ".mlmodel"):
        check_regular_tree(path)  # it is copied before it is opened: no links, no special files
        return "coreml", path
    raise UsageError(f"{path}: unknown artifact type {suffix or '(no suffix)'!r}; "
                     "expected .onnx or .mlpackage")


def _as_inputs(item: Any, where: str) -> tuple[torch.Tensor, ...]:
    if isinstance(item, torch.Tensor):
        return (item,)
    if isinstance(item, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in item):
        return tuple(item)
    raise InputError(f"{where}: expected a tensor or a tuple of tensors, got {type(item).__name__}")


def _model_stats(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                 path: Path | None = None) -> ModelStats:
    stats = ModelStats(params=count_params(model), nonzero_params=count_nonzero_params(model))
    try:
        stats.macs = count_macs(model, inputs)
        stats.macs_method = "torch.utils.flop_counter"
    except Exception as exc:  # a model FlopCounterMode cannot run: report it as unknown
        log.info("MACs not counted: %s", first_line(exc))
    if path is not None and path.exists():
        stats.size_bytes = file_size(path)
        stats.size_kind = "directory" if path.is_dir() else "file"
    else:
        tensors = list(model.state_dict().values())
        stats.size_bytes = int(sum(t.numel() * t.element_size() for t in tensors
                                   if isinstance(t, torch.Tensor)))
        stats.size_kind = "tensors"
    return stats


def _file_stats(path: Path, kind: str, inputs: tuple[torch.Tensor, ...]) -> ModelStats:
    stats = ModelStats(size_bytes=file_size(path),
                       size_kind="directory" if path.is_dir() else "file")
    if kind == "onnx":
        stats.params = onnx_params(path)
        stats.nonzero_params = onnx_params(path, nonzero=True)
        stats.macs = onnx_macs(path, [list(t.shape) for t in inputs])
        stats.macs_method = "onnx" if stats.macs is not None else None
    return stats


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    from importlib import metadata

    for dist in ("onnx", "onnxruntime", "coremltools"):
        try:  # the installed version, without importing the (slow to import) package
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return env


def validate(
    source: nn.Module,
    artifact: str | Path | nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
    *,
    n_inputs: int = 8,
    seed: int = 0,
    data: Iterable[tuple[torch.Tensor, ...] | torch.Tensor] | None = None,
    thresholds: Thresholds | dict[str, Any] | None = None,
    latency: bool | LatencyConfig = True,
    dense_artifact: str | Path | None = None,
    providers: list[str] | None = None,
    name: str | None = None,
    localize: bool | None = None,
    source_path: str | Path | None = None,
    layers: bool = True,
    probes: bool = True,
    accuracy_data: Iterable[Any] | None = None,
    accuracy_label: str = "labelled data",
    reported_source: nn.Module | None = None,
) -> ValidationReport:
    """Compare ``artifact`` with ``source`` and time both; see the module docstring.

    ``artifact`` is an ``.onnx`` file (run in onnxruntime), an ``.mlpackage`` (read-back
    verification on Linux, predictions on macOS) or an ``nn.Module`` (run in torch, e.g. a
    compacted model against the masked one). Inputs: the example inputs, then seeded random
    inputs like them (``n_inputs`` in all), or the first ``n_inputs`` items of ``data``.
    ``localize`` (default: only when the artifact fails) compares intermediate activations.
    ``source_path`` gives the source's file size in the report; without it the in-memory size
    of its tensors is used. The source model's train/eval mode is restored afterwards.
    ``probes`` (default on) also compares at a second batch size when an ONNX artifact
    declares a dynamic batch, and on the inputs scaled by 10: a trace that baked in the
    example's batch size or one branch of a data-dependent ``if`` fails there.
    ``accuracy_data`` (labelled ``(inputs, target)`` batches, named ``accuracy_label``) adds the
    task top-1 accuracy of source and artifact to ``report.accuracy`` (see
    :mod:`deployprune.accuracy`); data the model does not take is a one-line ``InputError``.
    ``reported_source``: the model the report's source statistics describe, when ``source`` is
    not the user's model (a Core ML package is checked against the compacted model it was
    converted from; its report still compares with the masked source, as for ONNX).
    """
    if not isinstance(source, nn.Module):
        raise UsageError(f"source: expected a torch nn.Module, got {type(source).__name__}")
    if isinstance(example_inputs, dict) or (isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 2
                                            and isinstance(example_inputs[1], dict)):
        # keyword inputs and ModelOutput results: compare through a tensor-in/tensor-out view, the
        # one export used (an nn.Module artifact gets the same view)
        from .adapt import positional

        if isinstance(artifact, nn.Module):
            artifact, _ = positional(artifact, example_inputs)
        source, example_inputs = positional(source, example_inputs)
    example = _as_inputs(example_inputs, "example_inputs")
    if not isinstance(n_inputs, int) or n_inputs < 1:
        raise UsageError(f"n_inputs: expected an integer >= 1, got {n_inputs!r}")
    if isinstance(thresholds, dict):
        thresholds = Thresholds.from_dict(thresholds)
    th = thresholds or Thresholds()
    if latency is True:
        lat_cfg: LatencyConfig | None = LatencyConfig()
    elif latency is False or latency is None:
        lat_cfg = None
    elif isinstance(latency, LatencyConfig):
        lat_cfg = latency
    else:
        raise UsageError(f"latency: expected True, False or a LatencyConfig, got {latency!r}")
    ort_providers = list(providers or (lat_cfg.providers if lat_cfg else ["CPUExecutionProvider"]))
    kind, path = _artifact_kind(artifact)
    dense_path = Path(dense_artifact) if dense_artifact is not None else None
    if dense_path is not None and not dense_path.is_file():
        raise InputError(f"{dense_path}: dense artifact not found; check the path")

    # Inputs
    session = None
    if kind == "onnx":
        session = ort_session(path, threads=None, graph_optimization="all", providers=ort_providers)
        ort_feed(session, example, where=str(path))  # input count checked before any work
    names = _input_names(source, session, len(example))
    if data is None:
        gen = torch.Generator().manual_seed(seed)
        input_sets = [example] + [random_inputs_like(example, gen, names=names)
                                  for _ in range(n_inputs - 1)]
        origin = "random"
    else:
        input_sets = []
        for i, item in enumerate(data):
            if i >= n_inputs:
                break
            input_sets.append(_as_inputs(item, f"data[{i}]"))
        if not input_sets:
            raise InputError("data: the iterable is empty; pass at least one batch of inputs")
        origin = "data"
    inputs_info = InputsInfo(origin=origin, count=len(input_sets),
                             seed=seed if origin == "random" else None,
                             shapes=[list(t.shape) for t in input_sets[0]],
                             dtypes=[str(t.dtype).replace("torch.", "") for t in input_sets[0]])

    modes = {m: m.training for m in source.modules()}
    art_modes = ({m: m.training for m in artifact.modules()}
                 if isinstance(artifact, nn.Module) else {})
    source.eval()
    if isinstance(artifact, nn.Module):
        artifact.eval()
    try:
        report = _validate(source, artifact, kind, path, input_sets, inputs_info, th, lat_cfg,
                           dense_path, ort_providers, name, localize, source_path, layers, seed,
                           probes, names, session)
        if reported_source is not None and reported_source is not source:
            report.source_stats = _model_stats(reported_source, example,
                                               Path(source_path) if source_path is not None else None)
        if accuracy_data is not None:
            with progress.stage(f"measuring task accuracy on {accuracy_label}"):
                _add_task_accuracy(report, source, artifact, kind, path, session, example,
                                   accuracy_data, accuracy_label)
        return report
    finally:
        for m, was in {**modes, **art_modes}.items():
            m.training = was


def _validate(source: nn.Module, artifact: Any, kind: str, path: Path | None,
              input_sets: list[tuple[torch.Tensor, ...]], inputs_info: InputsInfo,
              th: Thresholds, lat_cfg: LatencyConfig | None, dense_path: Path | None,
              providers: list[str], name: str | None, localize: bool | None,
              source_path: str | Path | None, want_layers: bool, seed: int,
              probes: bool = True, names: list[str | None] | None = None,
              session: Any = None) -> ValidationReport:
    example = input_sets[0]
    notes: list[str] = []
    failures: list[str] = []
    coreml_details: dict[str, Any] | None = None
    runtime = {"onnx": "onnxruntime", "torch": "torch", "coreml": "coreml"}[kind]
    compare = True
    if kind == "coreml":
        if platform.system() != "Darwin":
            runtime = "coreml-readback"
            compare = False
            _ok, errs, coreml_details = _coreml_readback(path, source, example)
            failures.extend(errs)
            notes.append("Core ML predictions need macOS: outputs were not compared; the saved "
                         "program was checked against the source weights instead")

    def run_artifact(inputs: tuple[torch.Tensor, ...]) -> tuple[list[np.ndarray], list[str]]:
        if kind == "onnx":
            got = session.run(None, ort_feed(session, inputs, where=str(path)))
            return got, [o.name for o in session.get_outputs()]
        if kind == "torch":
            got = _run_torch(artifact, inputs, "artifact model")
        else:  # pragma: no cover - macOS
            got = _run_coreml(path, inputs)
        return got, [f"output{i}" for i in range(len(got))]

    # Parity
    accs: list[_Acc] = []
    per_input_rel: list[float] = []
    if compare:
        for idx, inputs in enumerate(input_sets):
            ref = _run_torch(source, inputs)
            got, out_names = run_artifact(inputs)
            if len(ref) != len(got):
                failures.append(f"artifact has {len(got)} output(s), source has {len(ref)}; "
                                "export the same outputs")
                break
            if not accs:
                accs = [_Acc(n) for n in out_names]
            rel = max((acc.add(r, g) for acc, r, g in zip(accs, ref, got, strict=True)),
                      default=0.0)
            per_input_rel.append(rel)
            log.debug("input %d: max rel error %.3g", idx, rel)
    outputs = [a.result() for a in accs]
    failures.extend(_check(outputs, th))
    compared_ok = not failures

    # Probes: a trace that baked in the example's batch size or took one branch of a
    # data-dependent `if` agrees on the example inputs; other batch sizes and scales expose it.
    if compare and probes and accs and not failures:
        dynamic = kind == "onnx" and _dynamic_batch(session, example)
        probe_failures, probe_notes = _probe(source, run_artifact, input_sets, th, dynamic)
        failures.extend(probe_failures)
        notes.extend(probe_notes)
    passed = not failures

    # Localization
    loc = None
    if compare and per_input_rel and (localize or (localize is None and not compared_ok)):
        worst = int(np.nanargmax(np.nan_to_num(per_input_rel, posinf=1e300)))
        try:
            if kind == "onnx":
                loc = _localize_onnx(source, path, input_sets[worst], th, worst, providers)
            elif kind == "torch":
                loc = _localize_torch(source, artifact, input_sets[worst], th, worst)
        except DeployPruneError:
            raise
        except Exception as exc:  # localization is a diagnosis aid: never hide the verdict
            notes.append(f"layer localization failed: {first_line(exc)}")
        if loc is not None and loc.first_bad is not None and not passed:
            bad = loc.layers[loc.first_bad]
            failures.append(f"first diverging layer: {bad.module}"
                            + (f" (ONNX {bad.onnx_node})" if bad.onnx_node else "")
                            + f": max rel error {bad.max_rel:.3g}, cosine {bad.cosine:.6f}")

    # Statistics
    src_path = Path(source_path) if source_path is not None else None
    source_stats = _model_stats(source, example, src_path)
    if kind == "torch":
        artifact_stats = _model_stats(artifact, example)
    else:
        artifact_stats = _file_stats(path, kind, example)
    if kind == "coreml":  # counted as for ONNX: the program's weights; MACs of the model it was converted from
        if coreml_details and coreml_details.get("weight_elements"):
            artifact_stats.params = int(coreml_details["weight_elements"])
            artifact_stats.nonzero_params = int(coreml_details.get("nonzero_weight_elements") or 0)
        artifact_stats.macs, artifact_stats.macs_method = source_stats.macs, source_stats.macs_method
    dense_stats = _file_stats(dense_path, "onnx", example) if dense_path is not None else None
    table: list[LayerRow] = []
    if want_layers:
        try:
            if kind == "torch":
                table = layer_table(source, artifact)
            elif kind == "onnx":
                table = layer_table(source, path)
        except DeployPruneError:
            raise
        except Exception as exc:
            notes.append(f"per-layer table unavailable: {first_line(exc)}")

    # Latency
    lat = None
    if lat_cfg is not None:
        lat = _time(source, artifact, kind, path, dense_path, example, lat_cfg, seed, notes, names)

    report = ValidationReport(
        name=name or (path.stem if path is not None else type(artifact).__name__),
        passed=passed,
        failures=failures,
        thresholds=th,
        artifact=ArtifactInfo(path=str(path) if path is not None else None, kind=kind,
                              runtime=runtime, size_bytes=artifact_stats.size_bytes),
        inputs=inputs_info,
        outputs=outputs,
        source_stats=source_stats,
        artifact_stats=artifact_stats,
        dense_artifact=(ArtifactInfo(str(dense_path), "onnx", "onnxruntime",
                                     dense_stats.size_bytes)
                        if dense_path is not None and dense_stats is not None else None),
        dense_stats=dense_stats,
        localization=loc,
        coreml=coreml_details,
        latency=lat,
        layers=table,
        notes=notes,
        environment=_environment(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        tool_version=_tool_version(),
    )
    log.info("validation of %s: %s", report.name, "passed" if passed else "FAILED")
    return report


def _add_task_accuracy(report: ValidationReport, source: nn.Module, artifact: Any, kind: str,
                       path: Path | None, session: Any, example: tuple[torch.Tensor, ...],
                       data: Iterable[Any], label: str) -> None:
    """Top-1 accuracy of source and artifact on labelled ``data`` into ``report.accuracy``."""
    from .accuracy import as_report_fields, check_data_fits, measure

    where = f"--data {label}"
    check_data_fits(source, data, where, example)  # data shaped for another model: one line, both shapes
    fixed: int | None = int(example[0].shape[0]) if example and example[0].dim() else None
    run_artifact = None
    missing = ""
    if kind == "onnx":
        if _dynamic_batch(session, example):
            fixed = None

        def run_artifact(x: tuple[torch.Tensor, ...]) -> Any:
            return session.run(None, ort_feed(session, x, where=str(path)))
    elif kind == "torch":
        fixed = None

        def run_artifact(x: tuple[torch.Tensor, ...]) -> Any:
            return _run_torch(artifact, x, "artifact model")
    elif platform.system() == "Darwin":  # pragma: no cover - macOS
        def run_artifact(x: tuple[torch.Tensor, ...]) -> Any:
            return _run_coreml(path, x)
    else:
        missing = ("the Core ML package was not run (its predictions need macOS); 'source' is the compacted "
                   "model it was converted from")
    acc = measure(data, lambda x: _run_torch(source, x), run_artifact, fixed_batch=fixed, where=where,
                  artifact_missing=missing)
    figures, facts = as_report_fields(acc, label)
    report.accuracy.update(figures)
    report.pipeline["accuracy_data"] = facts
    if acc.reason:
        report.notes.append(f"task accuracy on {label}: {acc.reason}")
    if acc.source is not None:
        log.info("task accuracy on %s (%d samples): source %.4f, artifact %s", label, acc.samples, acc.source,
                 f"{acc.artifact:.4f}" if acc.artifact is not None else "not measured")


def _input_names(source: nn.Module, session: Any, count: int) -> list[str | None]:
    """The inputs' names where they are known: the keyword names of a model called with keyword
    inputs, else the ONNX session's inputs. Random inputs use them to spot attention masks."""
    from .adapt import KeywordModel

    if isinstance(source, KeywordModel):
        return list(source.input_names)
    if session is not None:
        names = [i.name for i in session.get_inputs()]
        if len(names) == count:
            return names
    return [None] * count


def _tool_version() -> str:
    from ._version import __version__

    return __version__


def _time(source: nn.Module, artifact: Any, kind: str, path: Path | None,
          dense_path: Path | None, example: tuple[torch.Tensor, ...], cfg: LatencyConfig,
          seed: int, notes: list[str], names: list[str | None] | None = None) -> LatencyReport | None:
    runners: list[Runner] = []
    if dense_path is not None:
        runners.append(OrtRunner(dense_path, cfg, role="dense", label="dense export (onnxruntime)"))
    if kind == "onnx":
        runners.append(OrtRunner(path, cfg, role="artifact", label="exported (onnxruntime)"))
    elif kind == "torch":
        runners.append(TorchRunner(artifact, role="artifact", label="compacted (torch eager)"))
    elif kind == "coreml":
        if platform.system() == "Darwin":  # pragma: no cover - macOS
            from .latency import CoreMLRunner

            runners.append(CoreMLRunner(path, role="artifact", label="exported (coreml)"))
        else:
            notes.append("Core ML latency needs macOS: the artifact was not timed")
    if cfg.eager or kind == "torch":
        runners.insert(0, TorchRunner(source, role="source", label="source (torch eager)"))
    if not runners:
        return None
    report = measure(runners, example, cfg, seed=seed, names=names)
    fixed = [n for n in report.notes if "fixed batch size" in n]
    if fixed:
        notes.append("batch sweep limited: " + fixed[0].split(": ", 1)[1])
    return report
