"""Measured cost model: onnxruntime latency of each Conv/Linear layer as a function of its widths.

Pruning to a latency budget (issue 14) needs to know what a channel costs *on the runtime the
model will run on*, not what its MACs promise. This module measures it:

* :func:`record_layers` runs the model once with forward pre-hooks and records every
  ``Conv1d``/``Conv2d``/``Linear`` call as a :class:`LayerShape` (kind, widths, kernel, stride,
  padding, dilation, groups, the full input shape).
* :class:`CostTable` times one-layer ONNX graphs (built directly with ``onnx.helper``, no torch
  export) in onnxruntime under a :class:`RuntimeSetting` (provider, threads, graph optimization),
  on a small grid of widths per layer: 3 x 3 ``(in, out)`` fractions (1/4, 1/2, 1) for dense and
  grouped convs and linears, 5 fractions (1/8, 1/4, 1/2, 3/4, 1) for depthwise convs (in, out and
  groups scaled together), aligned to multiples of 16 (8, 4) where the full width is one. The
  points of one grid are timed interleaved (shuffled order per round, warm-up, median), like
  :func:`deployprune.latency.measure` does for whole models, each timed call right after an untimed
  one of the same graph (warm caches, as a layer inside a running model sees them). Between grid
  points :meth:`CostTable.layer_ms` interpolates piecewise-bilinearly in ``(in, out)`` (piecewise
  linearly for depthwise), extrapolating linearly from the outer cells.
* :meth:`CostTable.preferred_multiple` measures the channel multiple the runtime prefers: a
  representative layer is timed at the 17 widths ``w .. w+16``; a width is dominated when a wider
  one runs at least 10% faster, and the smallest ``m`` in (2, 4, 8, 16) none of whose multiples is
  dominated is returned (1 when no width is dominated: no alignment matters). Measured here
  (onnxruntime 1.32, AVX-512): 16 for a 1x1 conv at 56x56 (68, 72 and 76 channels run ~25% slower
  than 69, 73 and 77); in 3x3 dense and depthwise convs multiples of 4 run up to 2x faster than
  their neighbours.
* Measured points are cached in a plain JSON file (never pickle) per machine and setting:
  ``$DEPLOYPRUNE_CACHE`` or ``~/.cache/deployprune``, ``cost-<hash>.json``, where the hash covers
  the CPU model, core count, onnxruntime version and the runtime setting. The file holds the
  machine description, the setting, every measured point (``"points": {key: ms}``) and the
  multiple measurements, so a user can reuse and inspect it. An unreadable or garbled file gives a
  one-line :class:`CostTableWarning` and the table is measured again.

:func:`predict_ms` sums the layers at given widths. The sum leaves out everything that is not a
Conv/Linear (pooling, adds, attention matmuls, softmax ...) and counts one session call per layer,
so it is a *relative* model: :meth:`CostTable.model_ms` measures a whole exported model, which is
what a caller calibrates against. Measured here (benchmarks/costmodel.py, 224x224, batch 1, 1
thread): the layer sum is 0.95-1.12x the dense ONNX latency of MobileNetV2 and 0.96-1.04x of
ResNet-18; held-out widths at multiples of 16 interpolate within 6-12% (time-weighted). Widths off
the grid's alignment are not modelled: they can run slower than the interpolation says (the 50%
MobileNetV2, with 8/12/20-channel layers, runs ~15% slower than predicted), so candidates should be
rounded to :meth:`CostTable.preferred_multiple`.

Which batch the layers are measured at is the batch of the recorded input shapes: record them with
``record_layers(model, inputs, batch=setting.batch)``; the table times each shape as given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import progress
from .errors import ConfigError, DeployPruneError, InputError, UsageError

log = logging.getLogger(__name__)

__all__ = [
    "CostTable",
    "CostTableWarning",
    "LayerShape",
    "RuntimeSetting",
    "predict_ms",
    "record_layers",
]

FORMAT = "deployprune.cost_table"
VERSION = 1
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
KINDS = ("conv1d", "conv2d", "linear")
MULTIPLES = (16, 8, 4, 2)
#: Width fractions of the measured grid (dense/grouped: per axis; depthwise: the group width).
DENSE_FRACTIONS = (0.25, 0.5, 1.0)
DEPTHWISE_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)
#: A dimension narrower than this is measured at its full width only (an image's 3 channels).
MIN_GRID_WIDTH = 8
#: Per grid: time this many milliseconds of runs in all, within [MIN_REPEATS, MAX_REPEATS] rounds.
GRID_BUDGET_MS = 1000.0
MIN_REPEATS = 15
MAX_REPEATS = 100
WARMUP = 2
#: preferred_multiple: a width is dominated when a wider one runs this much faster (noise here is
#: ~1-5% between widths; the alignment effects measured are 20-100%).
MULTIPLE_THRESHOLD = 0.10
MULTIPLE_BASE_WIDTH = 64
OPSET = 17


class CostTableWarning(UserWarning):
    """The cost table cache could not be used (unreadable, garbled, another machine/setting)."""


# ---------------------------------------------------------------------------------------------
# Settings and shapes


@dataclass(frozen=True)
class RuntimeSetting:
    """The runtime the costs hold for (issue 14's "stated runtime setting")."""

    provider: str = "CPUExecutionProvider"
    threads: int = 1
    batch: int | None = None  # None: the model's example batch
    graph_optimization: str = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.provider, str) or not self.provider:
            raise ConfigError(f"runtime provider: expected an onnxruntime execution provider name, "
                              f"got {self.provider!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"runtime threads: expected an integer >= 1, got {self.threads!r}")
        if self.batch is not None and (isinstance(self.batch, bool) or not isinstance(self.batch, int)
                                       or self.batch < 1):
            raise ConfigError(f"runtime batch: expected an integer >= 1 or None (the example batch), "
                              f"got {self.batch!r}")
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise ConfigError(f"runtime graph_optimization: {self.graph_optimization!r} is not one of "
                              f"{', '.join(GRAPH_OPTIMIZATION_LEVELS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuntimeSetting:
        allowed = [f.name for f in fields(cls)]
        for key in data:
            if key not in allowed:
                raise ConfigError(f"runtime setting: unknown key {key!r}; allowed keys: {', '.join(allowed)}")
        return cls(**dict(data))


@dataclass(frozen=True)
class LayerShape:
    """One Conv1d/Conv2d/Linear call as the model runs it."""

    kind: str  # "conv1d" | "conv2d" | "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int  # depthwise when groups == in_channels == out_channels
    input_shape: tuple[int, ...]  # full input shape (linear: (..., in_features))
    bias: bool

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"layer kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("kernel", "stride", "padding", "dilation", "input_shape"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        nd = {"conv1d": 1, "conv2d": 2, "linear": 0}[self.kind]
        if any(len(getattr(self, n)) != nd for n in ("kernel", "stride", "padding", "dilation")):
            raise ConfigError(f"{self.kind} layer: kernel, stride, padding and dilation need {nd} value(s) each")
        if self.kind != "linear" and len(self.input_shape) != nd + 2:
            raise ConfigError(f"{self.kind} layer: input shape {list(self.input_shape)} is not (N, C, "
                              f"{'L' if nd == 1 else 'H, W'})")
        if self.kind == "linear" and not self.input_shape:
            raise ConfigError("linear layer: empty input shape")
        if self.in_channels < 1 or self.out_channels < 1 or self.groups < 1:
            raise ConfigError(f"layer widths must be positive, got in={self.in_channels} "
                              f"out={self.out_channels} groups={self.groups}")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ConfigError(f"layer widths in={self.in_channels} out={self.out_channels} are not "
                              f"multiples of groups={self.groups}")

    @property
    def channel_dim(self) -> int:
        return len(self.input_shape) - 1 if self.kind == "linear" else 1

    @property
    def depthwise(self) -> bool:
        """Depthwise family: one input channel per group (``out`` may be a multiple of ``in``)."""
        return self.kind != "linear" and self.groups > 1 and self.groups == self.in_channels

    def at(self, in_channels: int, out_channels: int) -> LayerShape:
        """This layer with other widths (depthwise: groups follow ``in_channels``)."""
        shape = list(self.input_shape)
        shape[self.channel_dim] = in_channels
        groups = in_channels if self.depthwise else self.groups
        return LayerShape(self.kind, in_channels, out_channels, self.kernel, self.stride, self.padding,
                          self.dilation, groups, tuple(shape), self.bias)

    def key(self) -> str:
        """A stable, readable identifier of exactly what is measured."""
        def dims(t: tuple[int, ...]) -> str:
            return "x".join(map(str, t)) or "-"

        return (f"{self.kind} in={self.in_channels} out={self.out_channels} g={self.groups} "
                f"k={dims(self.kernel)} s={dims(self.stride)} p={dims(self.padding)} "
                f"d={dims(self.dilation)} x={dims(self.input_shape)} bias={int(self.bias)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("kernel", "stride", "padding", "dilation", "input_shape"):
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerShape:
        allowed = [f.name for f in fields(cls)]
        for key in data:
            if key not in allowed:
                raise ConfigError(f"layer shape: unknown key {key!r}; allowed keys: {', '.join(allowed)}")
        return cls(**dict(data))

    def macs(self) -> int:
        """Multiply-accumulates of one call (for reports and sanity checks)."""
        if self.kind == "linear":
            rows = math.prod(self.input_shape[:-1])
            return rows * self.in_channels * self.out_channels
        n, spatial = self.input_shape[0], self.input_shape[2:]
        out_sp = [(s + 2 * p - d * (k - 1) - 1) // st + 1
                  for s, p, d, k, st in zip(spatial, self.padding, self.dilation, self.kernel, self.stride,
                                            strict=True)]
        return (n * math.prod(out_sp) * self.out_channels * (self.in_channels // self.groups)
                * math.prod(self.kernel))


def _conv_padding(module: Any, nd: int) -> tuple[int, ...]:
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0,) * nd
        # "same": torch pads (total // 2) before and the rest after; symmetric ceil is close enough
        # for a cost (the output is at most one row/column larger)
        return tuple((d * (k - 1) + 1) // 2 for d, k in zip(module.dilation, module.kernel_size, strict=True))
    return tuple(int(p) for p in pad)


def is_conv1d_linear(module: Any) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``, run by addmm."""
    w = getattr(module, "weight", None)  # (a parametrized module's class is a subclass: ParametrizedConv1D)
    return (any(c.__name__ == "Conv1D" for c in type(module).__mro__) and isinstance(getattr(module, "nf", None), int)
            and getattr(w, "ndim", 0) == 2 and int(w.shape[1]) == module.nf)


def record_layers(model: Any, example_inputs: Any, *, batch: int | None = None) -> dict[str, LayerShape]:
    """Module qualified name -> :class:`LayerShape` of its first call, for every Conv1d/Conv2d/Linear
    (and transformers' ``Conv1D``, recorded as the linear layer it is; an ``nn.MultiheadAttention``
    as its in-projection under its own name and its ``out_proj``).

    The model runs once on ``example_inputs`` (a tuple of tensors, or one tensor) under
    ``torch.no_grad``; it is not modified (hooks are removed afterwards). With ``batch``, the leading
    dimension of each recorded input is rescaled from the example batch to ``batch`` (a Linear on a
    ``(B*T, C)`` view scales with it too).
    """
    import torch
    from torch import nn

    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise UsageError(f"record_layers batch: expected an integer >= 1 or None, got {batch!r}")
    own_batch = next((int(t.shape[0]) for t in inputs if isinstance(t, torch.Tensor) and t.ndim), None)
    found: dict[str, LayerShape] = {}
    handles = []

    def observed(x: torch.Tensor) -> list[int]:
        """The shape of a layer's input, its leading dimension rescaled to ``batch``."""
        shape = [int(s) for s in x.shape]
        if batch is not None and own_batch and shape and shape[0] % own_batch == 0:
            shape[0] = shape[0] // own_batch * batch
        return shape

    def hook_for(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if name in found or not args or not isinstance(args[0], torch.Tensor):
                return
            shape = observed(args[0])
            if isinstance(mod, nn.Linear) or is_conv1d_linear(mod):
                if len(shape) == 1:  # an unbatched Linear call
                    shape = [1, *shape]
                cin, cout = ((mod.in_features, mod.out_features) if isinstance(mod, nn.Linear)
                             else (int(mod.weight.shape[0]), int(mod.weight.shape[1])))
                found[name] = LayerShape("linear", cin, cout, (), (), (), (), 1, tuple(shape),
                                         getattr(mod, "bias", None) is not None)
                return
            nd = 1 if isinstance(mod, nn.Conv1d) else 2
            if len(shape) == nd + 1:  # an unbatched conv call
                shape = [1, *shape]
            found[name] = LayerShape(
                f"conv{nd}d", mod.in_channels, mod.out_channels, tuple(mod.kernel_size), tuple(mod.stride),
                _conv_padding(mod, nd), tuple(mod.dilation), mod.groups, tuple(shape), mod.bias is not None)

        return hook

    def attention_hook_for(name: str) -> Callable[..., None]:
        # nn.MultiheadAttention runs its projections functionally (out_proj is never called as a
        # module): recorded as the two linear layers it computes, in_proj (E -> 3E, its
        # in_proj_weight) under its own name and out_proj (E -> E) under "<name>.out_proj" (recorded
        # first, so out_proj's own hook, which would only fire on a direct call, leaves it)
        def hook(mod: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            query = args[0] if args else kwargs.get("query")
            if name in found or not isinstance(query, torch.Tensor) or not mod._qkv_same_embed_dim:
                return
            shape = observed(query)
            e = int(mod.embed_dim)
            found[name] = LayerShape("linear", e, 3 * e, (), (), (), (), 1, tuple(shape),
                                     mod.in_proj_bias is not None)
            found[f"{name}.out_proj"] = LayerShape("linear", e, e, (), (), (), (), 1, tuple(shape),
                                                   mod.out_proj.bias is not None)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            handles.append(module.register_forward_pre_hook(attention_hook_for(name), with_kwargs=True))
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)) or is_conv1d_linear(module):
            handles.append(module.register_forward_pre_hook(hook_for(name, module)))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    # module order, not call order: stable for reports
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(found.items(), key=lambda kv: order.get(kv[0], len(order))))


# ---------------------------------------------------------------------------------------------
# One-layer ONNX graphs


def layer_onnx(shape: LayerShape, *, seed: int = 0) -> bytes:
    """A serialized ONNX model (opset 17) holding only ``shape``'s layer, random weights as initializers."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape.input_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = []
    if shape.kind == "linear":
        if len(shape.input_shape) == 2:
            w = rng.standard_normal((shape.out_channels, shape.in_channels), dtype=np.float32)
            inits.append(numpy_helper.from_array(w, "w"))
            ins = ["x", "w"]
            if shape.bias:
                inits.append(numpy_helper.from_array(rng.standard_normal(shape.out_channels, dtype=np.float32), "b"))
                ins.append("b")
            nodes = [helper.make_node("Gemm", ins, ["y"], transB=1)]
        else:
            w = rng.standard_normal((shape.in_channels, shape.out_channels), dtype=np.float32)
            inits.append(numpy_helper.from_array(w, "w"))
            if shape.bias:
                inits.append(numpy_helper.from_array(rng.standard_normal(shape.out_channels, dtype=np.float32), "b"))
                nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
            else:
                nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    else:
        wshape = (shape.out_channels, shape.in_channels // shape.groups, *shape.kernel)
        inits.append(numpy_helper.from_array(rng.standard_normal(wshape, dtype=np.float32), "w"))
        ins = ["x", "w"]
        if shape.bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(shape.out_channels, dtype=np.float32), "b"))
            ins.append("b")
        nodes = [helper.make_node("Conv", ins, ["y"], kernel_shape=list(shape.kernel), strides=list(shape.stride),
                                  pads=list(shape.padding) * 2, dilations=list(shape.dilation), group=shape.groups)]
    graph = helper.make_graph(nodes, "layer", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="deployprune")
    model.ir_version = 8
    return model.SerializeToString()


# ---------------------------------------------------------------------------------------------
# Machine and cache file


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def machine_description() -> dict[str, Any]:
    """What the measured figures depend on besides the setting (part of the cache file name)."""
    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:  # pragma: no cover - onnxruntime is a dependency of the cost model
        ort_version = None
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
            "system": platform.system(), "onnxruntime": ort_version}


def default_cache_dir() -> Path:
    env = os.environ.get("DEPLOYPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deployprune"


def cache_name(setting: RuntimeSetting, machine: Mapping[str, Any] | None = None) -> str:
    machine = machine_description() if machine is None else machine
    blob = json.dumps({"machine": dict(machine), "setting": setting.to_dict()}, sort_keys=True)
    return f"cost-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.json"


class _Garbled(Exception):
    pass


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _Garbled(f"{where}: {value!r} is not a positive number of milliseconds")
    return float(value)


def _parse(doc: Any) -> tuple[dict[str, Any], RuntimeSetting, dict[str, float], dict[str, dict[str, Any]]]:
    """(machine, setting, points, multiples) of a cache document, or :class:`_Garbled`."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _Garbled(f"not a {FORMAT} document")
    if doc.get("version") != VERSION:
        raise _Garbled(f"version {doc.get('version')!r}, expected {VERSION}")
    machine = doc.get("machine")
    if not isinstance(machine, dict):
        raise _Garbled("'machine' is not an object")
    try:
        setting = RuntimeSetting.from_dict(doc.get("setting") or {})
    except (ConfigError, TypeError) as exc:
        raise _Garbled(f"setting: {exc}") from None
    raw_points = doc.get("points")
    if not isinstance(raw_points, dict):
        raise _Garbled("'points' is not an object")
    points = {str(k): _positive(v, f"point {k!r}") for k, v in raw_points.items()}
    raw_mult = doc.get("multiples", {})
    if not isinstance(raw_mult, dict):
        raise _Garbled("'multiples' is not an object")
    multiples = {}
    for k, v in raw_mult.items():
        if not isinstance(v, dict) or v.get("multiple") not in (1, *MULTIPLES):
            raise _Garbled(f"multiple {k!r}: expected an object with 'multiple' in 1, 2, 4, 8, 16")
        multiples[str(k)] = v
    return machine, setting, points, multiples


# ---------------------------------------------------------------------------------------------
# Interpolation


def _cell(grid: Sequence[int], x: float) -> tuple[int, float]:
    """Index i of the cell [grid[i], grid[i+1]] for x (outer cells extrapolate) and x's position in it."""
    if len(grid) == 1:
        return 0, 0.0
    i = 0
    while i < len(grid) - 2 and x > grid[i + 1]:
        i += 1
    return i, (x - grid[i]) / (grid[i + 1] - grid[i])


def _interp1(grid: Sequence[int], values: Sequence[float], x: float) -> float:
    if len(grid) == 1:
        return values[0]
    i, u = _cell(grid, x)
    return values[i] * (1 - u) + values[i + 1] * u


def _grid(full: int, fractions: Sequence[float], step: int) -> list[int]:
    """Distinct widths near ``fractions`` of ``full``, ascending: multiples of ``step`` (groups), and
    of 16 (or 8, or 4: the largest that leaves 4 steps) when ``full`` is one, so the grid measures
    aligned widths (an unaligned width can run 2x slower than its aligned neighbours and would bend
    the interpolation between them)."""
    if full < MIN_GRID_WIDTH:
        return [full]
    align = next((a for a in (16, 8, 4) if full % a == 0 and full // a >= 4), 1)
    step = step * align // math.gcd(step, align)
    out = {max(step, int(round(f * full / step)) * step) for f in fractions}
    out.add(full)
    return sorted(w for w in out if w <= full)


# ---------------------------------------------------------------------------------------------
# The table


class _SessionRunner:
    """The smallest thing :func:`deployprune.latency.measure` needs: a label and a prepared call."""

    role = "model"
    runtime = "onnxruntime"

    def __init__(self, session: Any, feed: dict[str, np.ndarray], label: str) -> None:
        self.session, self.feed, self.label = session, feed, label

    def accepts(self, batch_size: int, example_inputs: Sequence[Any]) -> str | None:
        return None

    def prepare(self, inputs: Sequence[Any]) -> Callable[[], Any]:
        session, feed = self.session, self.feed

        def call() -> Any:
            return session.run(None, feed)

        call()
        return call


class CostTable:
    """Measured onnxruntime latency of layers under one :class:`RuntimeSetting`, cached in JSON.

    ``path``: the cache file (default: ``$DEPLOYPRUNE_CACHE`` or ``~/.cache/deployprune``, named per
    machine and setting). ``autosave``: write the file after every newly measured grid (default),
    so an interrupted build keeps what it measured. ``measurements`` counts the points this object
    timed itself (not those it read from the file).
    """

    def __init__(self, setting: RuntimeSetting = RuntimeSetting(), path: str | os.PathLike | None = None,
                 *, autosave: bool = True, seed: int = 0) -> None:
        if not isinstance(setting, RuntimeSetting):
            raise UsageError(f"CostTable setting: expected a RuntimeSetting, got {type(setting).__name__}")
        self.setting = setting
        self.machine = machine_description()
        self.path = Path(path) if path is not None else default_cache_dir() / cache_name(setting, self.machine)
        self.autosave = autosave
        self.seed = seed
        self.points: dict[str, float] = {}
        self.multiples: dict[str, dict[str, Any]] = {}
        self.measurements = 0
        self._rng = random.Random(seed)
        self._read_cache()

    # -- cache -----------------------------------------------------------------------------------

    def _read_cache(self) -> None:
        if not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            machine, setting, points, multiples = _parse(doc)
        except (OSError, UnicodeDecodeError, ValueError, _Garbled) as exc:
            reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            warnings.warn(f"cost table {self.path}: unreadable ({reason}); measuring it again",
                          CostTableWarning, stacklevel=3)
            return
        if setting != self.setting:
            warnings.warn(f"cost table {self.path}: measured for another runtime setting ({setting}); "
                          "measuring it again", CostTableWarning, stacklevel=3)
            return
        if machine != self.machine:
            warnings.warn(f"cost table {self.path}: measured on another machine ({machine.get('cpu')}, "
                          f"{machine.get('cores')} cores, onnxruntime {machine.get('onnxruntime')}); "
                          "measuring it again", CostTableWarning, stacklevel=3)
            return
        self.points, self.multiples = points, multiples
        log.info("cost table %s: %d measured points", self.path, len(points))

    def to_dict(self) -> dict[str, Any]:
        """The cache document: format, machine, setting, measured points and multiples."""
        return {"format": FORMAT, "version": VERSION, "machine": dict(self.machine),
                "setting": self.setting.to_dict(), "points": dict(sorted(self.points.items())),
                "multiples": dict(sorted(self.multiples.items()))}

    @property
    def entries(self) -> dict[str, float]:
        """Every measured point: layer key (:meth:`LayerShape.key`) -> median milliseconds."""
        return dict(self.points)

    def save(self) -> Path:
        from .fsutil import write_text_atomic

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.to_dict(), indent=1) + "\n", force=True)
        return self.path

    @classmethod
    def load(cls, path: str | os.PathLike, *, autosave: bool = True) -> CostTable:
        """The table stored at ``path``, under the setting it was measured for.

        A missing or garbled file is an :class:`~deployprune.errors.InputError` (asked for by name);
        a file from another machine loads with a warning (its figures may not hold here).
        """
        p = Path(path)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            machine, setting, points, multiples = _parse(doc)
        except FileNotFoundError:
            raise InputError(f"{p}: no such cost table") from None
        except (OSError, UnicodeDecodeError, ValueError, _Garbled) as exc:
            reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{p}: not a readable cost table ({reason}); delete it to measure again") from None
        table = cls.__new__(cls)
        table.setting, table.path, table.autosave, table.seed = setting, p, autosave, 0
        table.machine = machine_description()
        table.points, table.multiples, table.measurements = points, multiples, 0
        table._rng = random.Random(0)
        if machine != table.machine:
            warnings.warn(f"cost table {p}: measured on another machine ({machine.get('cpu')}, "
                          f"{machine.get('cores')} cores); its figures may not hold here",
                          CostTableWarning, stacklevel=2)
            table.machine = machine
        return table

    # -- measuring -------------------------------------------------------------------------------

    def _session(self, model: bytes) -> Any:
        from .latency import ort_session

        return ort_session(model, threads=self.setting.threads, graph_optimization=self.setting.graph_optimization,
                           providers=(self.setting.provider,))

    def _time(self, shapes: Sequence[LayerShape], *, budget_ms: float = GRID_BUDGET_MS,
              min_repeats: int = MIN_REPEATS, max_repeats: int = MAX_REPEATS) -> list[float]:
        """Median ms of each one-layer graph, timed interleaved (shuffled order per round, warm-up)."""
        rng = np.random.default_rng(self.seed)
        calls = []
        for s in shapes:
            session = self._session(layer_onnx(s, seed=self.seed))
            feed = {session.get_inputs()[0].name: rng.standard_normal(s.input_shape, dtype=np.float32)}
            calls.append(_SessionRunner(session, feed, s.key()).prepare(()))
        round_ms = 0.0
        for call in calls:  # warm-up; the last warm-up call estimates the cost of a round
            for _ in range(WARMUP):
                t0 = time.perf_counter_ns()
                call()
            round_ms += (time.perf_counter_ns() - t0) / 1e6
        repeats = int(min(max_repeats, max(min_repeats, budget_ms // max(round_ms, 1e-3))))
        samples: list[list[float]] = [[] for _ in calls]
        order = list(range(len(calls)))
        for _ in range(repeats):
            self._rng.shuffle(order)
            for k in order:
                # one untimed call first: the previous graph's call evicted this one's weights from the
                # caches, which a layer inside a running model does not pay (measured: up to 2x on a
                # 1280x1000 Linear); the timed call runs warm, like a back-to-back loop
                calls[k]()
                t0 = time.perf_counter_ns()
                calls[k]()
                samples[k].append((time.perf_counter_ns() - t0) / 1e6)
        self.measurements += len(shapes)
        return [float(np.median(s)) for s in samples]

    def _ensure(self, shapes: Sequence[LayerShape]) -> None:
        todo = list({s.key(): s for s in shapes if s.key() not in self.points}.values())
        if not todo:
            return
        for s, ms in zip(todo, self._time(todo), strict=True):
            self.points[s.key()] = max(ms, 1e-6)
        if self.autosave:
            self._autosave()

    def _autosave(self) -> None:
        try:
            self.save()
        except (OSError, DeployPruneError) as exc:  # a read-only cache directory: keep measuring
            warnings.warn(f"cost table {self.path}: cannot be written ({str(exc).splitlines()[0]}); "
                          "measurements are kept in memory only", CostTableWarning, stacklevel=4)
            self.autosave = False

    def grid(self, shape: LayerShape) -> tuple[list[int], list[int]]:
        """The measured widths of ``shape``: (in widths, out widths); depthwise: (group widths, [])."""
        if shape.depthwise:
            return _grid(shape.in_channels, DEPTHWISE_FRACTIONS, 1), []
        return (_grid(shape.in_channels, DENSE_FRACTIONS, shape.groups),
                _grid(shape.out_channels, DENSE_FRACTIONS, shape.groups))

    def _grid_shapes(self, shape: LayerShape) -> list[LayerShape]:
        ins, outs = self.grid(shape)
        if shape.depthwise:
            mult = shape.out_channels // shape.in_channels
            return [shape.at(w, w * mult) for w in ins]
        return [shape.at(i, o) for i in ins for o in outs]

    def build(self, layers: Mapping[str, LayerShape] | Sequence[LayerShape]) -> None:
        """Measure the grids of all ``layers`` now (``layer_ms`` measures lazily otherwise)."""
        shapes = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
        todo = [s for s in shapes if any(g.key() not in self.points for g in self._grid_shapes(s))]
        if not todo:
            return
        progress.note(f"measuring the cost table: {len(todo)} layer(s) in onnxruntime ({self.path.name})")
        autosave, self.autosave = self.autosave, False
        last = time.perf_counter()
        try:
            for k, s in enumerate(todo, 1):
                self._ensure(self._grid_shapes(s))
                if time.perf_counter() - last > 10:
                    progress.note(f"cost table: {k}/{len(todo)} layers")
                    last = time.perf_counter()
        finally:
            self.autosave = autosave
            if autosave:
                self._autosave()

    def layer_ms(self, shape: LayerShape, in_channels: int, out_channels: int) -> float:
        """Median latency (ms) of ``shape``'s layer at widths ``(in_channels, out_channels)``.

        Depthwise layers scale in, out and groups together; their width is ``in_channels``.
        Grouped (non-depthwise) convs keep their groups. Measured on the layer's grid (cached) and
        interpolated between grid points.
        """
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise UsageError(f"layer_ms {name}: expected a positive integer, got {v!r}")
        self._ensure(self._grid_shapes(shape))
        ins, outs = self.grid(shape)
        if shape.depthwise:
            mult = shape.out_channels // shape.in_channels
            values = [self.points[shape.at(w, w * mult).key()] for w in ins]
            ms = _interp1(ins, values, float(in_channels))
            floor = min(values) * 0.25
        else:
            table = [[self.points[shape.at(i, o).key()] for o in outs] for i in ins]
            i, u = _cell(ins, float(in_channels))
            j, v = _cell(outs, float(out_channels))
            if len(ins) == 1 and len(outs) == 1:
                ms = table[0][0]
            elif len(ins) == 1:
                ms = _interp1(outs, table[0], float(out_channels))
            elif len(outs) == 1:
                ms = _interp1(ins, [row[0] for row in table], float(in_channels))
            else:
                ms = (table[i][j] * (1 - u) * (1 - v) + table[i + 1][j] * u * (1 - v)
                      + table[i][j + 1] * (1 - u) * v + table[i + 1][j + 1] * u * v)
            floor = min(min(row) for row in table) * 0.25
        return float(max(ms, floor))

    def measure_layer_ms(self, shape: LayerShape, in_channels: int, out_channels: int) -> float:
        """One measurement of ``shape`` at these widths, not interpolated (to check the fit); cached."""
        s = shape.at(in_channels, in_channels * (shape.out_channels // shape.in_channels)) if shape.depthwise \
            else shape.at(in_channels, out_channels)
        self._ensure([s])
        return self.points[s.key()]

    # -- the preferred multiple ------------------------------------------------------------------

    def _representative(self) -> LayerShape:
        n = self.setting.batch or 1
        w = MULTIPLE_BASE_WIDTH
        return LayerShape("conv2d", w, w, (1, 1), (1, 1), (0, 0), (1, 1), 1, (n, w, 56, 56), True)

    def preferred_multiple(self, shape: LayerShape | None = None) -> int:
        """The channel multiple (1, 2, 4, 8 or 16) the runtime prefers, measured and cached.

        The layer (default: a 1x1 conv, 64 -> 64 channels at 56x56, ``w = 64``; a given layer:
        ``w`` a multiple of 16 near half its width) is timed at the 17 widths ``w .. w+16``
        (dense: in and out both at the width, depthwise: the group width), interleaved. A width
        is dominated when a wider one of the sweep runs at least 10% faster; the smallest ``m``
        none of whose multiples is dominated is returned, 1 when no width is dominated (or every
        ``m`` has a dominated multiple). The sweep, the medians and the dominated multiples are
        kept in the cache file (``"multiples"``).
        """
        base = shape or self._representative()
        w0 = MULTIPLE_BASE_WIDTH if shape is None else \
            max(16, (min(base.in_channels, base.out_channels) // 2) // 16 * 16)
        if base is shape and not base.depthwise and base.groups > 1:
            raise UsageError("preferred_multiple: grouped convolutions are measured at multiples of their "
                             "groups; pass a dense or depthwise layer (or None)")
        key = f"{base.kind} k={'x'.join(map(str, base.kernel)) or '-'} s={'x'.join(map(str, base.stride)) or '-'} " \
              f"g={'dw' if base.depthwise else 1} w={w0}..{w0 + 16} x={'x'.join(map(str, base.input_shape))}"
        if key in self.multiples:
            return int(self.multiples[key]["multiple"])
        widths = list(range(w0, w0 + 17))
        mult = base.out_channels // base.in_channels if base.depthwise else 1
        shapes = [base.at(w, w * mult) for w in widths]
        ms = self._time(shapes, budget_ms=600.0, min_repeats=15, max_repeats=60)
        m, failures = _preferred(widths, ms)
        self.multiples[key] = {"multiple": m, "widths": widths, "ms": [round(x, 6) for x in ms],
                               "dominated": {str(k): v for k, v in failures.items()}}
        if self.autosave:
            self._autosave()
        return m

    # -- whole models ----------------------------------------------------------------------------

    def model_ms(self, onnx_path_or_bytes: str | os.PathLike | bytes, inputs: Any, *,
                 warmup: int = 5, repeats: int = 30, label: str | None = None) -> float:
        """Measured median latency (ms) of a whole ONNX model under this setting (for calibration).

        ``inputs``: a tensor, a numpy array or a sequence of them, one per graph input.
        """
        import torch

        from .latency import LatencyConfig, measure, ort_feed

        items = [inputs] if isinstance(inputs, (torch.Tensor, np.ndarray)) else list(inputs)
        tensors = [torch.from_numpy(np.ascontiguousarray(t)) if isinstance(t, np.ndarray) else t for t in items]
        session = self._session(onnx_path_or_bytes if isinstance(onnx_path_or_bytes, bytes)
                                else Path(onnx_path_or_bytes))
        where = label or ("ONNX model" if isinstance(onnx_path_or_bytes, bytes) else str(onnx_path_or_bytes))
        runner = _SessionRunner(session, ort_feed(session, tensors, where=where), where)
        config = LatencyConfig(warmup=warmup, repeats=repeats, threads=self.setting.threads,
                               graph_optimization=self.setting.graph_optimization,
                               providers=(self.setting.provider,), eager=False)
        batch = int(tensors[0].shape[0]) if tensors and tensors[0].ndim else 1
        config.batch_sizes = (batch,)
        report = measure([runner], tuple(tensors) if tensors and tensors[0].ndim else (torch.zeros(1),), config,
                         seed=self.seed)
        return report.results[0].median_ms


def _preferred(widths: Sequence[int], ms: Sequence[float]) -> tuple[int, dict[int, list[int]]]:
    """(preferred multiple, the dominated multiples of each m) of a width sweep.

    A width is *dominated* when a wider one of the sweep runs at least :data:`MULTIPLE_THRESHOLD`
    faster (more channels for less time: no allocator should pick it). The preferred multiple is
    the smallest ``m`` none of whose multiples is dominated; 1 when no width is dominated at all (the
    cost grows smoothly with the width, no alignment matters) or when every ``m`` has a dominated
    multiple.
    """
    t = list(ms)
    dominated = {w for i, w in enumerate(widths)
                 if any(t[j] <= (1.0 - MULTIPLE_THRESHOLD) * t[i] for j in range(i + 1, len(t)))}
    failures = {m: [w for w in widths if w % m == 0 and w in dominated] for m in MULTIPLES}
    if not dominated:
        return 1, failures
    ok = [m for m in MULTIPLES if not failures[m]]
    return (min(ok) if ok else 1), failures


def predict_ms(table: CostTable, layers: Mapping[str, LayerShape], widths: Mapping[str, tuple[int, int]]) -> float:
    """Sum of :meth:`CostTable.layer_ms` of every layer at ``widths`` (name -> (in, out)).

    Layers missing from ``widths`` count at full width; names in ``widths`` that are not layers are
    a usage error (a typo would otherwise be priced at full width silently).
    """
    unknown = [n for n in widths if n not in layers]
    if unknown:
        raise UsageError(f"predict_ms: widths name unknown layer(s) {', '.join(sorted(unknown)[:5])}")
    total = 0.0
    for name, shape in layers.items():
        cin, cout = widths.get(name, (shape.in_channels, shape.out_channels))
        total += table.layer_ms(shape, int(cin), int(cout))
    return total
