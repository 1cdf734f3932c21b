"""Latency measurement: several models timed interleaved, like for like.

Every model under test is timed in the same loop, one call of each per round, so slow drifts
of the machine (other processes, frequency scaling, thermal state) hit all of them alike. The
order within a round is shuffled (seeded), because a call pays for the caches the previous
model's call evicted. Each model is warmed up first; per-call samples are kept so reports can
plot the distribution, and summarized as median, p90 and p99 (numpy's linear percentile; with 30
repeats p99 is close to the maximum).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import progress
from .errors import ConfigError, InputError, UsageError

log = logging.getLogger(__name__)

__all__ = [
    "LatencyConfig",
    "LatencyResult",
    "LatencyReport",
    "Runner",
    "TorchRunner",
    "OrtRunner",
    "CoreMLRunner",
    "measure",
    "random_inputs_like",
    "ort_session",
]

GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


@dataclass
class LatencyConfig:
    """How to time. ``threads=None`` leaves both runtimes at their default thread count."""

    warmup: int = 5
    repeats: int = 30
    threads: int | None = 1
    graph_optimization: str = "all"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    batch_sizes: tuple[int, ...] = (1,)
    eager: bool = True  # also time the source model in PyTorch eager mode

    def __post_init__(self) -> None:
        self.providers = tuple(self.providers)
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"latency warmup: expected an integer >= 0, got {self.warmup!r}")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise ConfigError(f"latency repeats: expected an integer >= 1, got {self.repeats!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError("latency threads: expected an integer >= 1 or None (runtime "
                              f"default), got {self.threads!r}")
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise ConfigError(f"latency graph_optimization: {self.graph_optimization!r} is not "
                              f"one of {', '.join(GRAPH_OPTIMIZATION_LEVELS)}")
        if not self.providers:
            raise ConfigError("latency providers: give at least one, e.g. CPUExecutionProvider")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError("latency batch_sizes: expected positive integers, "
                              f"got {list(self.batch_sizes)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyConfig:
        allowed = [f.name for f in fields(cls)]
        for key in data:
            if key not in allowed:
                raise ConfigError(f"latency config: unknown key {key!r}; "
                                  f"allowed keys: {', '.join(allowed)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["providers"] = list(self.providers)
        d["batch_sizes"] = list(self.batch_sizes)
        return d


@dataclass
class LatencyResult:
    """Timings of one model in one runtime at one batch size (milliseconds per call)."""

    label: str
    role: str  # "source" | "artifact" | "dense"
    runtime: str  # "torch" | "onnxruntime" | "coreml"
    batch_size: int
    samples_ms: list[float]
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float

    @classmethod
    def from_samples(cls, label: str, role: str, runtime: str, batch_size: int,
                     samples_ms: Sequence[float]) -> LatencyResult:
        a = np.asarray(samples_ms, dtype=np.float64)
        return cls(label=label, role=role, runtime=runtime, batch_size=batch_size,
                   samples_ms=[float(x) for x in a],
                   median_ms=float(np.median(a)), p90_ms=float(np.percentile(a, 90)),
                   p99_ms=float(np.percentile(a, 99)), mean_ms=float(a.mean()),
                   min_ms=float(a.min()))


@dataclass
class LatencyReport:
    config: LatencyConfig
    results: list[LatencyResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    def get(self, role: str, runtime: str | None = None,
            batch_size: int = 1) -> LatencyResult | None:
        for r in self.results:
            if r.role != role or r.batch_size != batch_size:
                continue
            if runtime is None or r.runtime == runtime:
                return r
        return None

    def ratio(self, slower: str, faster: str, *, batch_size: int = 1,
              runtime: str | None = None, faster_runtime: str | None = None) -> float | None:
        """Median latency of ``slower`` divided by that of ``faster`` (a speedup when > 1)."""
        a = self.get(slower, runtime, batch_size)
        b = self.get(faster, faster_runtime or runtime, batch_size)
        if a is None or b is None or b.median_ms <= 0:
            return None
        return a.median_ms / b.median_ms


# ---------------------------------------------------------------------------------------------
# Inputs


def random_inputs_like(example_inputs: Sequence[torch.Tensor], generator: torch.Generator, *,
                       batch_size: int | None = None,
                       names: Sequence[str | None] | None = None) -> tuple[torch.Tensor, ...]:
    """Seeded random tensors with the shapes and dtypes of ``example_inputs``.

    Floating inputs are standard normal; integer inputs are drawn uniformly from
    ``[0, max(example) + 1)`` (token ids, class indices); booleans are fair coin flips.
    An input whose name (``names``, e.g. the keyword names of a Hugging Face model) contains
    ``mask`` is a padding mask when its example holds only 0 and 1: each row keeps its first
    ``L`` positions (``L`` drawn from 1 to the length, the first row full), as a tokenizer pads.
    Random bits would leave rows with every key masked, whose outputs are undefined and differ
    between runtimes. Other masks (additive float masks) keep the example's values.
    ``batch_size`` replaces the first dimension of every input that has one.
    """
    names = list(names or [])
    out = []
    for i, ex in enumerate(example_inputs):
        shape = list(ex.shape)
        if batch_size is not None and shape:
            shape[0] = batch_size
        name = (names[i] if i < len(names) else None) or ""
        if "mask" in name.lower():
            out.append(_mask_like(ex, shape, generator))
            continue
        if ex.dtype.is_floating_point or ex.dtype.is_complex:
            t = torch.randn(shape, generator=generator, dtype=torch.float32).to(ex.dtype)
        elif ex.dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=generator).to(torch.bool)
        else:
            high = int(ex.max().item()) + 1 if ex.numel() else 1
            t = torch.randint(0, max(high, 1), shape, generator=generator, dtype=torch.int64)
            t = t.to(ex.dtype)
        out.append(t)
    return tuple(out)


def _mask_like(ex: torch.Tensor, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    """A right-padded 0/1 mask of ``shape`` (last dimension the sequence) when ``ex`` is one, else
    ``ex``'s values (repeated along the first dimension when the batch changes)."""
    binary = ex.numel() > 0 and not ex.is_complex() and bool(((ex == 0) | (ex == 1)).all())
    if not binary or ex.dim() < 1:
        if list(ex.shape) == shape:
            return ex.clone()
        return ex[torch.arange(shape[0]) % ex.shape[0]].clone()
    length = shape[-1]
    rows = int(torch.tensor(shape[:-1]).prod()) if len(shape) > 1 else 1
    keep = torch.randint(1, length + 1, (rows,), generator=generator)
    keep[0] = length
    mask = torch.arange(length).unsqueeze(0) < keep.unsqueeze(1)
    return mask.reshape(shape).to(ex.dtype)


# ---------------------------------------------------------------------------------------------
# Runners


class Runner:
    """One model in one runtime. ``prepare`` converts inputs once and returns the timed call."""

    label: str
    role: str
    runtime: str

    def accepts(self, batch_size: int, example_inputs: Sequence[torch.Tensor]) -> str | None:
        """None when the model can run at ``batch_size``, else the reason why not."""
        return None

    def prepare(self, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
        raise NotImplementedError


class TorchRunner(Runner):
    runtime = "torch"

    def __init__(self, model: nn.Module, *, role: str, label: str | None = None) -> None:
        self.model = model
        self.role = role
        self.label = label or f"{role} (torch eager)"

    def prepare(self, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
        model, args = self.model, tuple(inputs)

        def call() -> Any:
            with torch.inference_mode():
                return model(*args)

        call()  # fail here, outside the timed loop, if the model rejects the inputs
        return call


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def ort_session(model: str | os.PathLike | bytes, *, threads: int | None = 1,
                graph_optimization: str = "all",
                providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An onnxruntime session with explicit threads, optimization level and providers."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise UsageError(f"onnxruntime execution provider(s) {', '.join(missing)} not available "
                         f"here; available: {', '.join(available)}")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if graph_optimization not in levels:
        raise ConfigError(f"graph_optimization: {graph_optimization!r} is not one of "
                          f"{', '.join(levels)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[graph_optimization]
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, so, providers=list(providers))
    except Exception as exc:
        where = "ONNX model" if isinstance(model, bytes) else str(model)
        raise InputError(f"{where}: onnxruntime cannot load it ({first_line(exc)}); "
                         "re-export the model") from exc


def first_line(exc: BaseException) -> str:
    """``TypeName: first line of the message`` (messages must stay one line)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def ort_feed(session: Any, inputs: Sequence[torch.Tensor], *,
             where: str = "artifact") -> dict[str, np.ndarray]:
    """Map tensors to the session's inputs, in order, cast to the declared element types."""
    declared = session.get_inputs()
    if len(declared) != len(inputs):
        names = ", ".join(i.name for i in declared)
        raise InputError(f"{where}: the ONNX graph takes {len(declared)} input(s) ({names}) "
                         f"but {len(inputs)} example input(s) were given; pass one tensor per "
                         "graph input")
    feed = {}
    for spec, t in zip(declared, inputs, strict=True):
        arr = t.detach().cpu().numpy()
        shape = list(getattr(spec, "shape", None) or [])
        fixed = len(shape) == arr.ndim and all(
            not isinstance(d, int) or d == n for d, n in zip(shape, arr.shape, strict=True))
        if shape and not fixed:
            want = "x".join(str(d) if isinstance(d, int) else "?" for d in shape)
            raise InputError(f"{where}: graph input {spec.name!r} expects shape {want} but the example input is "
                             f"{'x'.join(map(str, arr.shape))}; pass --input-shape matching the artifact "
                             "or re-export it")
        dtype = _ORT_TYPES.get(spec.type)
        if dtype is not None and arr.dtype != dtype:
            arr = arr.astype(dtype)
        feed[spec.name] = arr
    return feed


class OrtRunner(Runner):
    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike, config: LatencyConfig, *, role: str,
                 label: str | None = None) -> None:
        self.path = Path(path)
        self.role = role
        self.label = label or f"{role} (onnxruntime)"
        self.session = ort_session(path, threads=config.threads,
                                   graph_optimization=config.graph_optimization,
                                   providers=config.providers)

    def fixed_batch(self) -> int | None:
        dims = [i.shape[0] for i in self.session.get_inputs() if i.shape]
        fixed = [d for d in dims if isinstance(d, int)]
        return fixed[0] if fixed else None

    def accepts(self, batch_size: int, example_inputs: Sequence[torch.Tensor]) -> str | None:
        fixed = self.fixed_batch()
        if fixed is not None and fixed != batch_size:
            return (f"{self.path.name} has a fixed batch size of {fixed} "
                    "(export with a dynamic batch axis to sweep batch sizes)")
        return None

    def prepare(self, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
        feed = ort_feed(self.session, inputs, where=str(self.path))
        session = self.session

        def call() -> Any:
            return session.run(None, feed)

        call()
        return call


class CoreMLRunner(Runner):  # pragma: no cover - needs macOS
    runtime = "coreml"

    def __init__(self, path: str | os.PathLike, *, role: str, label: str | None = None) -> None:
        import coremltools as ct

        self.path = Path(path)
        self.role = role
        self.label = label or f"{role} (coreml)"
        self.model = ct.models.MLModel(str(path))

    def prepare(self, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
        names = [i.name for i in self.model.get_spec().description.input]
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=False)}
        model = self.model

        def call() -> Any:
            return model.predict(feed)

        call()
        return call


# ---------------------------------------------------------------------------------------------
# Measurement


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine_info(config: LatencyConfig) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": config.threads if config.threads is not None else torch.get_num_threads(),
    }
    with contextlib.suppress(ImportError):
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    return info


def measure(runners: Sequence[Runner], example_inputs: Sequence[torch.Tensor],
            config: LatencyConfig | None = None, *, seed: int = 0,
            names: Sequence[str | None] | None = None) -> LatencyReport:
    """Time ``runners`` interleaved at every batch size of ``config``.

    At the example inputs' own batch size the example inputs are used; other batch sizes get
    seeded random inputs of the same kind (:func:`random_inputs_like`; ``names`` are the inputs'
    names, which mark attention masks). A runner that cannot
    take a batch size is left out at that size and a note says why.
    """
    config = config or LatencyConfig()
    report = LatencyReport(config=config, machine=machine_info(config))
    example = tuple(example_inputs)
    own_batch = int(example[0].shape[0]) if example and example[0].ndim else None
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    with _torch_threads(config.threads):
        for batch in config.batch_sizes:
            if batch == own_batch:
                inputs = example
            else:
                if own_batch is None:
                    report.notes.append(f"batch {batch}: inputs have no batch dimension; skipped")
                    continue
                inputs = random_inputs_like(example, gen, batch_size=batch, names=names)
            calls: list[tuple[Runner, Callable[[], Any]]] = []
            for runner in runners:
                reason = runner.accepts(batch, inputs)
                if reason is None:
                    try:
                        calls.append((runner, runner.prepare(inputs)))
                        continue
                    except Exception as exc:  # a model that cannot take this batch size
                        reason = first_line(exc)
                note = f"batch {batch}: {runner.label} not timed ({reason})"
                log.info(note)
                report.notes.append(note)
            if not calls:
                continue
            progress.note(f"timing batch {batch}: {', '.join(r.label for r, _ in calls)}")
            for _ in range(config.warmup):
                for _, call in calls:
                    call()
            samples: list[list[float]] = [[] for _ in calls]
            order = list(range(len(calls)))
            for _ in range(config.repeats):
                # A call pays for the caches the previous model's call evicted (measured here:
                # ~15% on a small ONNX model right after a torch eager call), so the order is
                # shuffled every round: each model follows each other one equally often on
                # average.
                rng.shuffle(order)
                for k in order:
                    call = calls[k][1]
                    t0 = time.perf_counter_ns()
                    call()
                    samples[k].append((time.perf_counter_ns() - t0) / 1e6)
            for (runner, _), s in zip(calls, samples, strict=True):
                report.results.append(LatencyResult.from_samples(
                    runner.label, runner.role, runner.runtime, batch, s))
    return report
