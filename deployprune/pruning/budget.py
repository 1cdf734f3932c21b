"""Pruning to a budget: per-group widths chosen to meet a latency, MACs or parameter target.

A :class:`Budget` says what the pruned model may cost, relative to the dense model
(``latency=0.5x``, ``macs=40%``, ``params=30%``) or, for latency, absolutely (``latency=2.5ms``),
under a :class:`~deployprune.costmodel.RuntimeSetting` (provider, threads, batch).

How widths are chosen (see docs/pruning.md, "Pruning to a budget"):

* :class:`GroupCosts` prices the model at any per-group width. Every coupled channel/head group
  removes indices along the dims of its members' parameters; a layer's kept widths are its full
  widths minus what its groups remove. Parameters are counted exactly; MACs are the dense
  Conv/Linear MACs scaled by each layer's kept ``in x out`` fraction (everything else counts as
  dense); latency is the measured cost table's :meth:`~deployprune.costmodel.CostTable.layer_ms`
  of each Conv/Linear at its kept widths, plus the rest of the dense model's measured latency.
* :func:`allocate` is a lazy greedy: starting from the full widths it repeatedly shrinks the group
  whose next step loses the least importance (the sum of the removed units' scores, already
  normalised per group) per unit of cost saved, until the cost target is met. Widths step in the
  channel multiple the runtime prefers (measured, :meth:`CostTable.preferred_multiple`; 1 for
  MACs/params) and no group loses more than ``max_sparsity`` of its units. Units pruned at an
  earlier update score 0, so a rising schedule keeps them pruned.
* :class:`BudgetPlanner` calibrates: it allocates for the budget, compacts the masked model,
  measures it (latency: exported to ONNX and timed interleaved with the dense ONNX in one run;
  MACs/params: counted on the compacted model), moves the predicted target (first by
  ``goal / measured``, then by a secant through the last two tries, kept inside the bracket of
  tries on both sides of the goal) and tries again, up to ``iterations`` times, keeping the closest. The
  schedule then moves the cost target from the dense cost to the calibrated one over its updates
  (``target = dense - p * (dense - goal)``, ``p`` = the schedule's progress, 0..1).
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import math
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapt import positional
from ..errors import ConfigError, UsageError

METRICS = ("latency", "macs", "params")
DEFAULT_MAX_SPARSITY = 0.9
MET_TOLERANCE = 0.10  # a measured cost within 10% above the budget counts as meeting it
_SETTING_KEYS = ("provider", "threads", "batch", "graph_optimization")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"


@dataclass(frozen=True)
class Budget:
    """What the pruned model may cost.

    metric: ``latency``, ``macs`` or ``params``.
    value: a fraction of the dense model's cost (``0.5`` = half), or milliseconds with ``absolute``.
    absolute: ``value`` is a latency in ms (``latency=2.5ms``).
    setting: the runtime the latency holds for (provider, threads, batch; defaults: CPU, 1 thread,
        the example batch).
    cost_table: the cost table file (default: the per-machine cache, see :mod:`deployprune.costmodel`).
    max_sparsity: no group loses more than this fraction of its units (default 0.9).
    iterations: measure-and-recalibrate rounds (default 4).
    tolerance: calibration stops once the measured cost is within this fraction of the budget.
    """

    metric: str
    value: float
    absolute: bool = False
    setting: Any = None  # RuntimeSetting; None = the default one
    cost_table: str | None = None
    max_sparsity: float = DEFAULT_MAX_SPARSITY
    iterations: int = 4
    tolerance: float = 0.05
    text: str = ""

    def __post_init__(self) -> None:
        from ..costmodel import RuntimeSetting

        if self.setting is None:
            object.__setattr__(self, "setting", RuntimeSetting())
        if not self.text:
            object.__setattr__(self, "text", self.describe())

    def describe(self) -> str:
        if self.absolute:
            return f"{self.metric}={self.value:g}ms"
        if self.metric == "latency":
            return f"{self.metric}={self.value:g}x"
        return f"{self.metric}={self.value * 100:g}%"

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.text, "metric": self.metric, "value": self.value, "absolute": self.absolute,
                "setting": self.setting.to_dict(), "cost_table": self.cost_table,
                "max_sparsity": self.max_sparsity, "iterations": self.iterations}


def _value(metric: str, raw: Any, where: str, shown: str) -> tuple[float, bool]:
    """(value, absolute) of one budget value: ``0.5``, ``"0.5x"``, ``"40%"``, ``"2.5ms"``."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ConfigError(f"{where} {shown}: expected a number, 'N%', 'Nx' or (latency) 'Nms'")
    absolute = False
    if isinstance(raw, str):
        m = re.fullmatch(rf"\s*({_NUMBER})\s*(%|x|ms)?\s*", raw)
        if m is None:
            raise ConfigError(f"{where} {shown}: {raw!r} is not a number, 'N%', 'Nx' or (latency) 'Nms'")
        number, unit = float(m.group(1)), m.group(2)
        if unit == "%":
            number /= 100.0
        elif unit == "ms":
            if metric != "latency":
                raise ConfigError(f"{where} {shown}: 'ms' is a latency; give {metric} as a fraction "
                                  f"('40%' or '0.4x')")
            absolute = True
    else:
        number = float(raw)
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{where} {shown}: the budget must be above 0 (a fraction of the dense model "
                          f"such as 0.5x or 50%{', or a latency such as 2.5ms' if metric == 'latency' else ''})")
    if not absolute and number > 1.0:
        raise ConfigError(f"{where} {shown}: above the dense model (1x = 100%); a budget is at most the dense "
                          f"model's {metric}, e.g. {metric}=0.5x")
    return number, absolute


def parse_budget(text: str, *, where: str = "--budget") -> Budget:
    """``latency=0.5x`` | ``latency=2.5ms`` | ``macs=40%`` | ``params=0.3`` -> :class:`Budget`."""
    shown = repr(text)
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"{where} {shown}: expected METRIC=VALUE, e.g. latency=0.5x, latency=2.5ms, "
                          "macs=40% or params=30%")
    key, raw = (s.strip() for s in text.split("=", 1))
    if key not in METRICS:
        from ._util import suggest

        raise ConfigError(f"{where} {shown}: unknown budget {key!r}{suggest(key, METRICS)}; use latency=, "
                          "macs= or params=")
    value, absolute = _value(key, raw, where, shown)
    return Budget(metric=key, value=value, absolute=absolute, text=f"{key}={raw}")


def budget_from_config(data: Any, *, where: str = "budget") -> Budget | None:
    """The config's ``"budget"``: ``{"latency": 0.5}`` (plus ``threads``, ``provider``, ``batch``,
    ``graph_optimization``, ``cost_table``, ``max_sparsity``, ``iterations``), a ``"latency=0.5x"``
    string, a :class:`Budget`, or None."""
    if data is None or isinstance(data, Budget):
        return data
    if isinstance(data, str):
        return parse_budget(data, where=where)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping such as {{\"latency\": 0.5}} or a string such as "
                          f"'latency=0.5x', got {type(data).__name__}")
    allowed = [*METRICS, *_SETTING_KEYS, "cost_table", "max_sparsity", "iterations"]
    from ._util import suggest

    for k in data:
        if k not in allowed:
            raise ConfigError(f"{where}: unknown key {k!r}{suggest(str(k), allowed)}; allowed keys: "
                              f"{', '.join(allowed)}")
    metrics = [k for k in METRICS if k in data]
    if len(metrics) != 1:
        raise ConfigError(f"{where}: give exactly one of latency, macs, params (got "
                          f"{', '.join(metrics) or 'none'})")
    metric = metrics[0]
    value, absolute = _value(metric, data[metric], where, f"{metric}={data[metric]!r}")
    from ..costmodel import RuntimeSetting

    setting = RuntimeSetting.from_dict({k: data[k] for k in _SETTING_KEYS if k in data})
    max_sp = data.get("max_sparsity", DEFAULT_MAX_SPARSITY)
    if isinstance(max_sp, bool) or not isinstance(max_sp, (int, float)) or not 0 < float(max_sp) < 1:
        raise ConfigError(f"{where}.max_sparsity: expected a fraction between 0 and 1 (exclusive), got {max_sp!r}")
    iters = data.get("iterations", 4)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"{where}.iterations: expected an integer >= 1, got {iters!r}")
    table = data.get("cost_table")
    if table is not None and not isinstance(table, str):
        raise ConfigError(f"{where}.cost_table: expected a file path, got {table!r}")
    raw = data[metric]
    text = f"{metric}={raw}" if isinstance(raw, str) else Budget(metric, value, absolute).describe()
    return Budget(metric=metric, value=value, absolute=absolute, setting=setting, cost_table=table,
                  max_sparsity=float(max_sp), iterations=iters, text=text)


# ---------------------------------------------------------------------------------------------
# Pricing widths


@dataclass
class _Group:
    """What the allocator needs of one group target."""

    name: str
    units: int
    per_unit: int  # channels per unit
    step: int  # units per width step
    min_keep: int  # units that stay
    order: torch.Tensor  # unit indices in pruning order
    scores: np.ndarray  # finite scores in pruning order (inf -> not prunable)


@dataclass
class _Dim:
    size: int
    parts: list[tuple[int, float]] = field(default_factory=list)  # (group index, indices removed per unit)


class GroupCosts:
    """The cost of the model at per-group kept-unit counts (see the module docstring).

    ``targets``: the pruner's group targets; ``model``: the (masked or plain) model, for shapes;
    ``layers``: :func:`~deployprune.costmodel.record_layers` of the model; ``metric``: what to price;
    ``table`` (latency): the cost table; ``dense_measured``: the dense model's measured cost, so the
    part outside the priced layers (``rest``) is ``dense_measured - sum of the layers``.
    """

    def __init__(self, targets: Sequence[Any], model: nn.Module, layers: Mapping[str, Any], metric: str, *,
                 table: Any = None, dense_measured: float | None = None,
                 macs_by_module: Mapping[str, int] | None = None) -> None:
        if metric not in METRICS:
            raise UsageError(f"GroupCosts metric: {metric!r} is not one of {', '.join(METRICS)}")
        if metric == "latency" and table is None:
            raise UsageError("GroupCosts: a latency budget needs a cost table")
        self.metric = metric
        self.table = table
        self.layers = dict(layers)
        self.names = [t.name for t in targets]
        self.units = [int(t.units) for t in targets]
        self.full = list(self.units)
        self.dims: dict[tuple[str, str, int], _Dim] = {}
        from ..costmodel import is_conv1d_linear

        # layers storing their weight (in, out): transformers' Conv1D
        self._transposed = {mn for mn, mod in model.named_modules() if is_conv1d_linear(mod)}
        # nn.MultiheadAttention is recorded as its in-projection, whose weight is in_proj_weight
        self._weight = {mn: "in_proj_weight" for mn, mod in model.named_modules()
                        if isinstance(mod, nn.MultiheadAttention)}
        self._pshapes = {(mn, pn): tuple(p.shape) for mn, mod in model.named_modules()
                         for pn, p in _own_tensors(mod)}
        shapes = {f"{mn}.{pn}" if mn else pn: s for (mn, pn), s in self._pshapes.items()}
        for gi, t in enumerate(targets):
            per_unit = int(t.channel_map.shape[1]) if t.channel_map is not None else 1
            seen: set[tuple[str, str, int]] = set()
            for m in t.group.members:
                key = (m.module, m.param, int(m.dim))
                full = shapes.get(f"{m.module}.{m.param}" if m.module else m.param)
                if full is None or key in seen or len(full) <= key[2]:
                    continue
                seen.add(key)
                if m.indices is None:
                    per = float(per_unit)
                else:
                    per = sum(int(np.asarray(ix).size) for ix in m.indices) / max(1, t.units)
                self.dims.setdefault(key, _Dim(size=int(full[key[2]]))).parts.append((gi, per))
        self.touching: list[set[str]] = [set() for _ in targets]  # items each group changes
        self.items: dict[str, tuple[str, ...]] = {}
        if metric == "params":
            for pname, shape in shapes.items():
                mod, _, par = pname.rpartition(".")
                dims = [(mod, par, d) for d in range(len(shape)) if (mod, par, d) in self.dims]
                if dims:
                    self.items[pname] = (mod, par)
                    for d in dims:
                        for gi, _ in self.dims[d].parts:
                            self.touching[gi].add(pname)
            self._const = float(sum(math.prod(s) for n, s in shapes.items() if n not in self.items))
        else:
            for lname in self.layers:
                w = (lname, self._weight.get(lname, "weight"))
                keys = [(*w, 0), (*w, 1)]
                if any(k in self.dims for k in keys):
                    self.items[lname] = w
                    for k in keys:
                        for gi, _ in self.dims.get(k, _Dim(0)).parts:
                            self.touching[gi].add(lname)
            self._macs = dict(macs_by_module or {})
            for mn in self._weight:  # an attention module's MACs include its out_proj's, priced on its own
                if mn in self._macs and f"{mn}.out_proj" in self.layers:
                    self._macs[mn] = max(0, self._macs[mn] - self.layers[f"{mn}.out_proj"].macs())
            full_items = sum(self._item_cost(n, None) for n in self.items)
            if metric == "macs":
                total = float((macs_by_module or {}).get("", 0))
                self._const = max(0.0, total - full_items)
            else:
                layer_sum = sum(self._layer_ms(s, s.in_channels, s.out_channels) for s in self.layers.values())
                others = layer_sum - full_items
                rest = (dense_measured - layer_sum) if dense_measured is not None else 0.0
                self._const = others + rest

    def _layer_ms(self, shape: Any, cin: int, cout: int) -> float:
        return self.table.layer_ms(shape, max(1, int(cin)), max(1, int(cout)))

    def kept(self, key: tuple[str, str, int], k: Sequence[int]) -> int:
        d = self.dims.get(key)
        if d is None:
            return -1
        removed = sum((self.units[gi] - k[gi]) * per for gi, per in d.parts)
        return max(1, int(round(d.size - removed)))

    def _item_cost(self, name: str, k: Sequence[int] | None) -> float:
        k = self.full if k is None else k
        if self.metric == "params":
            mod, par = self.items[name]
            shape = self._pshapes[(mod, par)]
            return float(math.prod(self.kept((mod, par, d), k) if (mod, par, d) in self.dims else s
                                   for d, s in enumerate(shape)))
        shape = self.layers[name]
        cin, out = self.widths_of(name, k)
        if self.metric == "macs":
            full = self._macs.get(name)
            if full is None:
                full = shape.macs()
            frac = (out / shape.out_channels) * (cin / shape.in_channels)
            return float(full) * frac
        return self._layer_ms(shape, cin, out)

    def widths_of(self, name: str, k: Sequence[int]) -> tuple[int, int]:
        """``(in, out)`` channels of layer ``name`` when the groups keep ``k`` units."""
        shape = self.layers[name]
        out_dim, in_dim = (1, 0) if name in self._transposed else (0, 1)
        weight = self._weight.get(name, "weight")
        out = self.kept((name, weight, out_dim), k)
        out = shape.out_channels if out < 0 else out
        if shape.depthwise:
            return out // max(1, shape.out_channels // shape.in_channels), out
        w_in = self.kept((name, weight, in_dim), k)
        return (shape.in_channels if w_in < 0 else w_in * shape.groups), out

    def cost(self, k: Sequence[int]) -> float:
        return self._const + sum(self._item_cost(n, k) for n in self.items)

    def delta(self, gi: int, k: list[int], new: int) -> float:
        """Cost saved when group ``gi`` goes from ``k[gi]`` to ``new`` units (others as in ``k``)."""
        before = sum(self._item_cost(n, k) for n in self.touching[gi])
        old, k[gi] = k[gi], new
        try:
            after = sum(self._item_cost(n, k) for n in self.touching[gi])
        finally:
            k[gi] = old
        return before - after


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters of ``module`` itself, by their public names (parametrized ones unwrapped)."""
    out = []
    for pname, p in module.named_parameters(recurse=False):
        if pname == "original" or pname.startswith("parametrizations."):
            continue
        out.append((pname, p))
    par = getattr(module, "parametrizations", None)
    if par is not None:
        for pname, plist in par.items():
            out.append((pname, plist.original))
    return out


# ---------------------------------------------------------------------------------------------
# The greedy


def _groups(requests: Sequence[Any], steps: Mapping[str, int], max_sparsity: Mapping[str, float]) -> list[_Group]:
    from .allocation import prune_order

    out = []
    for r in requests:
        order = prune_order(r.scores, r.prior_keep)
        s = r.scores.to(torch.float64)[order].numpy()
        s = np.where(np.isnan(s), 0.0, s)
        finite = int(np.isfinite(s).sum())
        cap = int(math.floor(max_sparsity.get(r.name, DEFAULT_MAX_SPARSITY) * r.units + 1e-9))
        step = max(1, int(steps.get(r.name, 1)))
        min_keep = max(r.units - min(cap, finite), 1)
        if min_keep < r.units and step > 1:
            min_keep = min(r.units, -(-min_keep // step) * step)  # aligned, never below the cap
        out.append(_Group(name=r.name, units=r.units, per_unit=1, step=step, min_keep=min_keep, order=order,
                          scores=np.maximum(np.where(np.isfinite(s), s, np.inf), 0.0)))
    return out


def _next_width(g: _Group, k: int) -> int | None:
    """The next smaller aligned width below ``k`` (None at the floor)."""
    if k <= g.min_keep:
        return None
    nxt = ((k - 1) // g.step) * g.step
    return max(nxt, g.min_keep)


@dataclass
class Allocation:
    """Kept units per group and what they cost (predicted)."""

    keep: dict[str, torch.Tensor]
    widths: dict[str, tuple[int, int]]  # name -> (kept units, units)
    predicted: float
    dense: float
    retained: float  # geometric mean over groups of the fraction of each group's score kept
    reached: bool


def allocate(requests: Sequence[Any], costs: GroupCosts, target: float, *, steps: Mapping[str, int] | None = None,
             max_sparsity: Mapping[str, float] | None = None) -> Allocation:
    """Per-group kept units meeting ``costs.cost(k) <= target`` at the least importance lost.

    Lazy greedy over width steps: each candidate move is priced by importance lost per cost saved;
    a popped move is re-priced and taken only if it is still the best (neighbouring groups change
    what a move saves). ``reached`` is False when every group is at its floor and the cost is still
    above ``target`` (the widths are then the smallest allowed).
    """
    groups = _groups(requests, steps or {}, max_sparsity or {})
    index = {g.name: i for i, g in enumerate(groups)}
    if [costs.names[i] for i in range(len(costs.names))] != [g.name for g in groups]:
        order = [index[n] for n in costs.names]
        groups = [groups[i] for i in order]
    k = [g.units for g in groups]
    dense = costs.cost(k)
    cost = dense
    # importance: each group's retained fraction R_g of its (finite) score; the objective is
    # sum(log R_g), since a network is a chain of layers: the signal a layer passes on is what the
    # layers before it kept. A move's loss log(R) - log(R') grows as a group shrinks, so deep cuts
    # of one group cost more than the same cut spread over several.
    totals = [float(np.sum(g.scores[np.isfinite(g.scores)])) or 1.0 for g in groups]
    retained = [1.0] * len(groups)

    def price(gi: int) -> tuple[float, int, float, float] | None:
        g = groups[gi]
        new = _next_width(g, k[gi])
        if new is None:
            return None
        frac = float(np.sum(g.scores[g.units - k[gi]: g.units - new])) / totals[gi]
        after = retained[gi] - frac
        loss = math.log(retained[gi] / after) if after > 1e-12 else math.inf
        saved = costs.delta(gi, k, new)
        ratio = loss / saved if saved > 1e-12 else math.inf if loss > 0 else 1e300
        return ratio, new, frac, saved

    heap: list[tuple[float, int, int]] = []
    for gi in range(len(groups)):
        p = price(gi)
        if p is not None:
            heapq.heappush(heap, (p[0], gi, p[1]))
    while cost > target and heap:
        ratio, gi, new = heapq.heappop(heap)
        p = price(gi)
        if p is None:
            continue
        if p[0] > ratio * (1 + 1e-9) + 1e-15 and heap and p[0] > heap[0][0]:
            heapq.heappush(heap, (p[0], gi, p[1]))  # stale: re-queue at its true price
            continue
        _, new, frac, saved = p
        k[gi] = new
        cost -= saved
        retained[gi] -= frac
        q = price(gi)
        if q is not None:
            heapq.heappush(heap, (q[0], gi, q[1]))
    cost = costs.cost(k)  # exact, not the running sum
    keep: dict[str, torch.Tensor] = {}
    widths: dict[str, tuple[int, int]] = {}
    for gi, g in enumerate(groups):
        v = torch.ones(g.units, dtype=torch.bool)
        v[g.order[: g.units - k[gi]]] = False
        keep[g.name] = v
        widths[g.name] = (k[gi], g.units)
    geo = math.exp(sum(math.log(max(r, 1e-300)) for r in retained) / max(1, len(retained)))
    return Allocation(keep=keep, widths=widths, predicted=cost, dense=dense, retained=geo,
                      reached=cost <= target * (1 + 1e-9))


def retained_importance(requests: Sequence[Any], keep: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """How much of the importance score ``keep`` retains (to compare allocations at equal cost).

    ``geometric``: the geometric mean over groups of the fraction of each group's score kept (what
    :func:`allocate` maximises); ``total``: kept score over all score, groups pooled (scores are
    normalised per group, so this is close to the fraction of units kept)."""
    kept = total = 0.0
    logs = []
    for r in requests:
        s = r.scores.to(torch.float64)
        s = torch.where(torch.isfinite(s), s.clamp_min(0.0), torch.zeros_like(s))
        t, kk = float(s.sum()), float(s[keep[r.name]].sum())
        total += t
        kept += kk
        if t > 0:
            logs.append(math.log(max(kk / t, 1e-300)))
    return {"geometric": math.exp(sum(logs) / len(logs)) if logs else 1.0,
            "total": kept / total if total > 0 else 1.0}


# ---------------------------------------------------------------------------------------------
# Measuring and calibrating


def _export_onnx(model: nn.Module, inputs: tuple, path: Path) -> Path:
    from ..converters import get

    get("onnx").convert(model, inputs, path, force=True)
    return path


def measure_latency_pair(dense_onnx: Path, candidate_onnx: Path, inputs: tuple, setting: Any, *,
                         repeats: int = 30, seed: int = 0) -> tuple[float, float]:
    """(dense ms, candidate ms): medians of the two ONNX models timed interleaved in one run."""
    from ..latency import LatencyConfig, OrtRunner, measure

    batch = int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1
    config = LatencyConfig(warmup=5, repeats=repeats, threads=setting.threads,
                           graph_optimization=setting.graph_optimization, providers=(setting.provider,),
                           batch_sizes=(batch,), eager=False)
    runners = [OrtRunner(dense_onnx, config, role="dense"), OrtRunner(candidate_onnx, config, role="artifact")]
    report = measure(runners, inputs, config, seed=seed)
    d = report.get("dense", "onnxruntime", batch)
    a = report.get("artifact", "onnxruntime", batch)
    if d is None or a is None:
        raise UsageError("budget: the latency of the dense or the pruned ONNX model could not be measured: "
                         + "; ".join(report.notes))
    return d.median_ms, a.median_ms


def _batched(inputs: tuple, batch: int | None) -> tuple:
    if batch is None or not inputs or not inputs[0].ndim or int(inputs[0].shape[0]) == batch:
        return inputs
    out = []
    for t in inputs:
        reps = [batch // max(1, int(t.shape[0])) + 1] + [1] * (t.ndim - 1)
        out.append(t.repeat(*reps)[:batch].clone())
    return tuple(out)


class BudgetPlanner:
    """Chooses per-group widths for a :class:`Budget` (see the module docstring).

    Built by the pruner at ``prepare()``: ``model`` is the pruner's model, ``targets`` its group
    targets, ``inputs`` the example inputs. ``plan(requests)`` calibrates (compacting and measuring
    up to ``budget.iterations`` candidates); ``keeps(requests, progress)`` allocates for the cost
    target at the schedule's progress; ``achieved(masks)`` measures what given masks give.
    """

    def __init__(self, budget: Budget, model: nn.Module, targets: Sequence[Any], inputs: Any, *,
                 max_sparsity: Mapping[str, float] | None = None) -> None:
        from .. import progress
        from ..costmodel import CostTable, record_layers
        from ..stats import count_macs, macs_by_module

        self.budget = budget
        self.model = model
        self.targets = list(targets)
        # ``inputs`` may be keyword inputs (a library model's input_ids=..., pixel_values=...):
        # compaction takes them as given; counting, recording and the ONNX export see the model
        # through a positional view (adapt.positional) of them.
        self.example = inputs
        own = _plain(model)
        plain, self.inputs = positional(own, inputs)
        wrapped = plain is not own  # keyword inputs: per-module figures are named "model.<name>"
        self.max_sparsity = {t.name: (t.config.max_sparsity if t.config.max_sparsity is not None
                                      else budget.max_sparsity) for t in self.targets}
        if max_sparsity:
            self.max_sparsity.update(max_sparsity)
        self.history: list[dict[str, Any]] = []
        self.last: Allocation | None = None  # the allocation of the latest mask update
        self.planned: dict[str, int] = {}  # units each group keeps at the end (from the calibration)
        self.notes: list[str] = []
        self.goal_predicted: float | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="deployprune-budget-")
        self.timing_inputs = _batched(self.inputs, budget.setting.batch)
        self.table = None
        self.multiple = 1
        dense_measured = None
        self.dense_onnx: Path | None = None
        t0 = time.perf_counter()
        with torch.no_grad():
            layers = _unwrapped_names(record_layers(plain, self.inputs, batch=budget.setting.batch), wrapped)
        if budget.metric == "latency":
            self.table = CostTable(budget.setting, path=budget.cost_table)
            self.table.build(layers)
            self.multiple = int(self.table.preferred_multiple())
            progress.note("budget: exporting and timing the dense model in onnxruntime")
            self.dense_onnx = _export_onnx(plain, self.inputs, Path(self._tmp.name) / "dense.onnx")
            dense_measured = self.table.model_ms(self.dense_onnx.read_bytes(), self.timing_inputs,
                                                  label="dense model (onnxruntime)")
            self.dense_ms = dense_measured
        self.dense_macs = count_macs(plain, self.inputs)
        from ..stats import count_params

        self.dense_params = count_params(plain)
        by_module = _unwrapped_names(macs_by_module(plain, self.inputs), wrapped) if budget.metric == "macs" else None
        self.costs = GroupCosts(self.targets, own, layers, budget.metric, table=self.table,
                                dense_measured=dense_measured, macs_by_module=by_module)
        self.steps = {t.name: max(1, self.multiple // (int(t.channel_map.shape[1]) if t.channel_map is not None
                                                       else 1)) if t.config.granularity != "head" else 1
                      for t in self.targets}
        self.setup_seconds = time.perf_counter() - t0
        full = [int(t.units) for t in self.targets]
        self.dense_predicted = self.costs.cost(full)
        self.goal = self._goal()

    # -- targets ----------------------------------------------------------------------------------

    @property
    def dense_measured(self) -> float:
        return {"latency": getattr(self, "dense_ms", 0.0), "macs": float(self.dense_macs),
                "params": float(self.dense_params)}[self.budget.metric]

    def _goal(self) -> float:
        """The budget in measured units (ms, MACs, parameters)."""
        b = self.budget
        if b.absolute:
            if b.value >= self.dense_measured:
                raise ConfigError(f"budget {b.text}: the dense model already runs in {self.dense_measured:.3g} ms "
                                  f"under this setting; a budget must be below it (e.g. latency=0.5x)")
            return b.value
        return b.value * self.dense_measured

    def _predicted_target(self, goal: float) -> float:
        # measured -> predicted units (the prediction of the dense model is its measurement for latency)
        return goal * self.dense_predicted / self.dense_measured if self.dense_measured else goal

    def allocate(self, requests: Sequence[Any], target: float) -> Allocation:
        return allocate(requests, self.costs, target, steps=self.steps, max_sparsity=self.max_sparsity)

    def _unreachable(self, alloc: Allocation) -> ConfigError:
        b = self.budget
        floor = alloc.predicted * self.dense_measured / self.dense_predicted if self.dense_predicted else 0.0
        shown = self._fmt(floor)
        cap = max_sparsity_text(self)
        return ConfigError(f"budget {b.text}: unreachable with the configured layers: at most {cap} "
                           f"of each group can go, which leaves {shown} ({floor / self.dense_measured:.2f}x of "
                           f"the dense model); raise max_sparsity, prune more layers or relax the budget")

    def _fmt(self, v: float) -> str:
        m = self.budget.metric
        return f"{v:.3g} ms" if m == "latency" else f"{v / 1e6:.3g} M MACs" if m == "macs" else f"{int(v):,} params"

    # -- calibration ------------------------------------------------------------------------------

    def measure_all(self, keep: Mapping[str, torch.Tensor], expand: Any) -> dict[str, Any]:
        """Compact the model with these group keeps and measure it: ``params``, ``macs``, the
        channels compaction kept, and (latency budgets) ``latency_ms`` and ``dense_ms`` of the
        pruned and the dense ONNX, timed interleaved in one run."""
        from ..finalize import compact
        from ..stats import count_macs, count_params

        masks = expand(keep)
        result = compact(_plain(self.model), self.example, masks)
        model, flat = positional(result.model, self.example)
        out: dict[str, Any] = {"params": count_params(model), "macs": count_macs(model, flat),
                               "compacted": bool(result.compacted)}
        if not result.compacted:
            out["abandoned"] = result.abandoned or "see the log"
        if result.kept_channels:
            out["channels_kept"] = result.channels_line()
        if self.budget.metric == "latency":
            path = _export_onnx(model, flat, Path(self._tmp.name) / "candidate.onnx")
            dense, cand = measure_latency_pair(self.dense_onnx, path, self.timing_inputs, self.budget.setting)
            out["latency_ms"], out["dense_ms"] = cand, dense
        return out

    def measure(self, keep: Mapping[str, torch.Tensor], expand: Any) -> float:
        """The measured cost (in the budget's metric) of the model with these group keeps."""
        facts = self.measure_all(keep, expand)
        return self._metric_of(facts)

    def _metric_of(self, facts: Mapping[str, Any]) -> float:
        if self.budget.metric == "params":
            return float(facts["params"])
        if self.budget.metric == "macs":
            return float(facts["macs"])
        # timed in one run with the dense ONNX: expressed against the dense median measured at setup
        dense, cand = facts["dense_ms"], facts["latency_ms"]
        return cand * self.dense_measured / dense if dense > 0 else cand

    def report(self, targets: Sequence[Any], keeps: Mapping[str, torch.Tensor], expand: Any, *,
               progress: float) -> dict[str, Any]:
        """Budget vs achieved, per-group widths, the calibration history (plain data, for reports)."""
        b = self.budget
        k = [int(keeps[t.name].sum()) for t in targets]
        groups = []
        for t in targets:
            per = int(t.channel_map.shape[1]) if t.channel_map is not None else 1
            groups.append({"group": t.name, "modules": list(t.modules), "unit": t.config.granularity,
                           "kept": int(keeps[t.name].sum()) * per, "total": int(t.group.size)})
        out: dict[str, Any] = {
            "budget": b.text, "metric": b.metric, "setting": b.setting.to_dict(), "schedule_progress": progress,
            "dense": self.dense_measured, "goal": self.goal, "predicted": self.costs.cost(k),
            "preferred_multiple": self.multiple, "calibration": list(self.history), "groups": groups,
            "dense_params": self.dense_params, "dense_macs": self.dense_macs,
        }
        if self.table is not None:
            out["cost_table"] = str(self.table.path)
            out["dense_ms"] = self.dense_ms
            out["latency_table"] = self.latency_table(k)
        if expand is not None:
            facts = self.measure_all(keeps, expand)
            achieved = self._metric_of(facts)
            out.update({"achieved": achieved, "achieved_ratio": achieved / self.dense_measured,
                        "error": achieved / self.goal - 1.0, "met": achieved <= self.goal * (1 + MET_TOLERANCE),
                        "params": facts["params"], "macs": facts["macs"]})
            if "latency_ms" in facts:
                out["latency_ms"], out["dense_ms_same_run"] = facts["latency_ms"], facts["dense_ms"]
            for key in ("channels_kept", "compacted", "abandoned"):
                if key in facts:
                    out[key] = facts[key]
        return out

    def latency_table(self, k: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Per layer: the measured widths and milliseconds of its cost-table grid, and (with ``k``,
        kept units per group) the chosen widths and their predicted milliseconds (for plots)."""
        rows = []
        for name, shape in self.costs.layers.items():
            full_ms = self.table.layer_ms(shape, shape.in_channels, shape.out_channels)
            chosen = self.costs.widths_of(name, k) if k is not None else None
            ins, outs = self.table.grid(shape)
            if shape.depthwise:
                mult = shape.out_channels // shape.in_channels
                pts = [[w, w * mult, self.table.layer_ms(shape, w, w * mult)] for w in ins]
            else:
                pts = [[i, o, self.table.layer_ms(shape, i, o)] for i in ins for o in outs]
            row = {"layer": name, "kind": shape.kind, "depthwise": shape.depthwise,
                   "full": [shape.in_channels, shape.out_channels], "full_ms": full_ms, "points": pts}
            if chosen is not None:
                row["chosen"] = list(chosen)
                row["chosen_ms"] = self.table.layer_ms(shape, *chosen)
            rows.append(row)
        return rows

    def plan(self, requests: Sequence[Any], expand: Any) -> Allocation:
        """Calibrate the predicted target so the *measured* cost meets the budget."""
        from .. import progress

        goal = self.goal
        target = self._predicted_target(goal)
        best: tuple[float, Allocation, float] | None = None
        tried: list[dict[str, tuple[int, int]]] = []
        trials: list[tuple[float, float]] = []  # (predicted target, measured cost) per try
        for it in range(1, self.budget.iterations + 1):
            alloc = self.allocate(requests, target)
            if not alloc.reached and it == 1:
                raise self._unreachable(alloc)
            if alloc.widths in tried:
                break  # the recalibrated target gives widths already measured: nothing new to learn
            tried.append(alloc.widths)
            measured = self.measure(alloc.keep, expand)
            err = measured / goal - 1.0
            self.history.append({"iteration": it, "predicted_target": target, "predicted": alloc.predicted,
                                 "measured": measured, "ratio": measured / self.dense_measured})
            progress.note(f"budget {self.budget.text}: try {it}: measured {self._fmt(measured)} "
                          f"({measured / self.dense_measured:.3f}x of dense; goal {self._fmt(goal)})")
            score = abs(err) if err <= 0 else 2 * err  # prefer meeting the budget to missing it
            if best is None or score < best[0]:
                best = (score, alloc, target)
            if abs(err) <= self.budget.tolerance and err <= self.budget.tolerance / 2:
                break
            if measured <= 0 or alloc.predicted <= 0:
                break
            trials.append((target, measured))
            new_target = _next_target(trials, goal)
            if abs(new_target - target) <= 1e-6 * max(1.0, target):
                break
            target = new_target
        assert best is not None
        self.goal_predicted = best[2]
        return best[1]

    def target_at(self, progress: float) -> float:
        """The predicted cost target when the schedule is ``progress`` (0..1) of the way."""
        goal = self.goal_predicted if self.goal_predicted is not None else self._predicted_target(self.goal)
        p = min(1.0, max(0.0, float(progress)))
        return self.dense_predicted - p * (self.dense_predicted - goal)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._tmp.cleanup()


def _next_target(trials: Sequence[tuple[float, float]], goal: float) -> float:
    """The predicted target of the next calibration try, from ``(predicted target, measured)`` so far.

    One try: rescale by what the measurement says the prediction misses (``target * goal /
    measured``). Then a secant through the last two tries (the measured cost is not proportional to
    the prediction: what the layers do not explain does not shrink with them), in the rescale's
    direction and at most twice its step, falling back to the rescale when the two tries disagree
    on the direction. Once tries lie on both sides of the goal, the
    next target stays strictly inside the closest such pair: one noisy timing (another process on
    the machine) cannot throw calibration back out of a bracket earlier tries established.
    """
    target, measured = trials[-1]
    new = rescaled = target * goal / measured
    if len(trials) >= 2:
        (ta, ma), (tb, mb) = trials[-2], trials[-1]
        if ta != tb and (mb - ma) / (tb - ta) > 0:
            new = tb + (goal - mb) * (tb - ta) / (mb - ma)
            # two nearly equal timings make the secant flat: never step more than twice the rescale
            step = rescaled - target
            new = target + (min(max(new - target, 2 * step), 0.0) if step < 0 else
                            max(min(new - target, 2 * step), 0.0))
    under = [t for t, m in trials if m <= goal]
    over = [t for t, m in trials if m > goal]
    if under and over:
        lo, hi = max(under), min(over)
        if lo < hi:
            margin = 0.05 * (hi - lo)
            new = min(max(new, lo + margin), hi - margin)
        else:  # a larger target met the goal and a smaller one missed it: timing noise; split the pair
            new = 0.5 * (lo + hi)
    return new


def summary_line(report: Mapping[str, Any]) -> str:
    """``budget:     latency=0.5x met: 0.507x of dense (9.13 ms; dense 18.0 ms), params 40.2%, MACs 39.8%``."""
    metric = report["metric"]
    if "achieved" not in report:
        return f"budget:     {report['budget']}: not measured"
    ratio = report["achieved_ratio"]
    if metric == "latency":
        what = f"{ratio:.3f}x of dense ({report['achieved']:.3g} ms; dense {report['dense']:.3g} ms)"
    else:
        what = f"{ratio:.1%} of dense"
    extra = []
    if metric != "params":
        extra.append(f"params {report['params'] / max(1, report['dense_params']):.1%}")
    if metric != "macs":
        extra.append(f"MACs {report['macs'] / max(1, report['dense_macs']):.1%}")
    state = "met" if report["met"] else f"NOT met (missed by {report['error']:+.1%})"
    line = f"budget:     {report['budget']} {state}: {what}" + (", " + ", ".join(extra) if extra else "")
    if report.get("compacted") is False:
        line += f"; compaction abandoned ({report.get('abandoned', 'see the log')})"
    elif report.get("channels_kept"):
        line += f"; finalize: {report['channels_kept']}"
    return line


def max_sparsity_text(planner: BudgetPlanner) -> str:
    vals = sorted(set(planner.max_sparsity.values()))
    return f"{vals[0]:.0%}" if len(vals) == 1 else f"{vals[0]:.0%}-{vals[-1]:.0%}"


def _unwrapped_names(by_name: Mapping[str, Any], wrapped: bool) -> dict[str, Any]:
    """Per-module results of a positional view, keyed by the viewed model's own module names (a
    KeywordModel made here holds it as ``model``)."""
    if not wrapped:
        return dict(by_name)
    out = {name.removeprefix("model."): v for name, v in by_name.items() if name.startswith("model.")}
    if "" in by_name:
        out[""] = by_name[""]
    return out


def _plain(model: nn.Module) -> nn.Module:
    """A copy with masks baked in and parametrizations removed (eval mode)."""
    from ..masks import strip_parametrizations_

    work = copy.deepcopy(model)
    strip_parametrizations_(work)
    return work.eval()


__all__ = ["Allocation", "Budget", "BudgetPlanner", "GroupCosts", "allocate", "budget_from_config",
           "measure_latency_pair", "parse_budget", "retained_importance", "summary_line"]
