"""Finalize benchmark: wall time, peak memory and parameters per model, and time against depth.

Run from the repository root::

    python -m benchmarks.finalize                 # zoo + benchmark-size models + depth family
    python benchmarks/finalize.py --models resnet50,vit_small --repeat 5

Every model gets random 50% group masks as a pruner would make them (``channel_groups``: half
of each prunable group's removable channels, the same positions in every block of grouped
convolutions, every producer slice zeroed). The figures:

* ``time``: median wall time of ``deployprune.compact`` over ``--repeat`` runs (default 3), after
  one untimed warm-up run; ``min`` the fastest run and ``cpu`` the median CPU time of this
  process (user + system, all threads), which other processes on a shared machine disturb far
  less than wall time. Models are timed round-robin so a load spike hits all of them. Computing
  the groups and the masks is not included (it is shown separately as ``groups``).
* ``peak mem``: the peak resident set size during one extra, untimed run, above the RSS just
  before it: glibc's free lists are trimmed (``malloc_trim``), the kernel's high-water mark is
  reset (``/proc/self/clear_refs``), and ``VmHWM`` is read afterwards. Where that is not
  available, the delta of ``resource.getrusage().ru_maxrss`` is shown instead (marked ``*``;
  it only sees new process-wide highs, so it can under-report).
* ``params``: before and after, with the ratio; ``rel err``: the engine's own self-check
  (max abs error / max abs output); ``load``: the median 1-minute load average after each run
  (on a shared machine, other processes slow every figure down: compare rows with low load).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deployprune as dp  # noqa: E402
from deployprune import zoo  # noqa: E402
from deployprune.finalize import ChannelGroup, channel_groups  # noqa: E402

DEPTH = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


# ---------------------------------------------------------------------------- masks


def group_masks(model: torch.nn.Module, groups: list[ChannelGroup], ratio: float = 0.5,
                seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Zero ``ratio`` of every prunable group's removable channels in all of its producer slices."""
    rng = np.random.default_rng(seed)
    params = dict(model.named_parameters())
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for g in groups:
        if not g.prunable or g.removable is None:
            continue
        d = max(int(g.divisions), 1)
        per = g.size // d
        cand = np.flatnonzero(np.asarray(g.removable, bool).reshape(d, per).all(axis=0))
        k = int(len(cand) * ratio)
        if k == 0:
            continue
        chosen = rng.choice(cand, size=k, replace=False)
        channels = np.concatenate([b * per + chosen for b in range(d)])
        for mem in g.producers():
            p = params.get(f"{mem.module}.{mem.param}" if mem.module else mem.param)
            if p is None:
                continue
            if mem.indices is None:
                pos = channels
            else:
                pos = np.concatenate([np.asarray(mem.indices[int(c)]).reshape(-1) for c in channels])
            mask = masks.setdefault(mem.module, {}).setdefault(mem.param, torch.ones_like(p))
            mask.index_fill_(mem.dim, torch.as_tensor(pos, dtype=torch.long), 0.0)
    return masks


# ---------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r


def peak_memory_mib(fn) -> tuple[float, bool]:
    """(peak RSS above the starting RSS while ``fn`` runs, in MiB; True if from VmHWM)."""
    _trim()
    if _reset_peak():
        start = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
        if start is not None and peak is not None:
            return max(peak - start, 0) / 1024, True
    start = _maxrss_kib()
    fn()
    return max(_maxrss_kib() - start, 0) / 1024, False


# ---------------------------------------------------------------------------- runs


@dataclass
class Job:
    name: str
    model: torch.nn.Module
    inputs: tuple
    masks: dict
    groups_s: float
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    stage_runs: list[dict[str, float]] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)


@dataclass
class Row:
    name: str
    input_shape: str
    groups_s: float
    time_s: float  # median wall time
    min_s: float
    cpu_s: float  # median CPU time of this process
    times: list[float]
    mem_mib: float
    mem_exact: bool
    before: int
    after: int
    rel_err: float
    blocked: int
    compacted: bool
    stages: dict[str, float]
    load: float  # median 1-minute load average over the timed runs


def prepare(name: str) -> Job:
    model = zoo.build(name)
    x = zoo.example_inputs(name)
    t0 = time.perf_counter()
    masks = group_masks(model, channel_groups(model, x))
    return Job(name=name, model=model, inputs=x, masks=masks, groups_s=time.perf_counter() - t0)


def timed_run(job: Job) -> None:
    gc.collect()
    c, t = time.process_time(), time.perf_counter()
    result = dp.compact(job.model, job.inputs, job.masks)
    job.times.append(time.perf_counter() - t)
    job.cpu.append(time.process_time() - c)
    job.stage_runs.append(dict(getattr(result, "timings", {}) or {}))
    job.loads.append(_load1())


def finish(job: Job) -> Row:
    holder: list = []
    mem, exact = peak_memory_mib(lambda: holder.append(dp.compact(job.model, job.inputs, job.masks)))
    result = holder[0]
    stages = {k: statistics.median(run.get(k, 0.0) for run in job.stage_runs) for k in job.stage_runs[0]}
    return Row(name=job.name, input_shape="x".join(str(s) for s in job.inputs[0].shape), groups_s=job.groups_s,
               time_s=statistics.median(job.times), min_s=min(job.times), cpu_s=statistics.median(job.cpu),
               times=job.times, mem_mib=mem, mem_exact=exact, before=result.params_before, after=result.params_after,
               rel_err=result.max_abs_error / max(result.output_scale, 1e-30), blocked=len(result.blocked),
               compacted=result.compacted, stages=stages, load=statistics.median(job.loads))


def bench(names: list[str], repeat: int) -> list[Row]:
    """Prepare every model, then time them round-robin (so load spikes spread over all models)."""
    jobs = []
    for name in names:
        jobs.append(prepare(name))
        timed_run(jobs[-1])  # warm-up (first-call imports and allocator growth), not counted
        jobs[-1].times.clear(), jobs[-1].cpu.clear(), jobs[-1].stage_runs.clear(), jobs[-1].loads.clear()
        print(f"  prepared {name} (groups and masks {jobs[-1].groups_s:.2f} s)", file=sys.stderr, flush=True)
    for rep in range(repeat):
        for job in jobs:
            timed_run(job)
        print(f"  round {rep + 1}/{repeat} done", file=sys.stderr, flush=True)
    rows = []
    for job in jobs:
        rows.append(finish(job))
        job.model = None  # type: ignore[assignment]
    return rows


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def print_table(rows: list[Row]) -> None:
    head = (f"{'model':<18} {'input':<12} {'time (s)':>8} {'min (s)':>8} {'cpu (s)':>8} {'peak mem':>10} "
            f"{'params before':>13} {'after':>8} {'ratio':>6} {'rel err':>8} {'groups (s)':>10} {'load':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        mem = f"{r.mem_mib:.0f} MiB" + ("" if r.mem_exact else "*")
        flag = "" if r.compacted else "  (NOT COMPACTED)"
        flag += f"  ({r.blocked} blocker(s))" if r.blocked else ""
        print(f"{r.name:<18} {r.input_shape:<12} {r.time_s:>8.3f} {r.min_s:>8.3f} {r.cpu_s:>8.3f} {mem:>10} "
              f"{_fmt_params(r.before):>13} {_fmt_params(r.after):>8} {r.after / r.before:>6.1%} "
              f"{r.rel_err:>8.1e} {r.groups_s:>10.2f} {r.load:>5.1f}{flag}")


def print_stages(rows: list[Row]) -> None:
    rows = [r for r in rows if r.stages and r.time_s >= 0.1]
    if not rows:
        return
    names = list(dict.fromkeys(k for r in rows for k in r.stages))
    print()
    print("where the time goes (median seconds per stage, from CompactionResult.timings; models >= 0.1 s)")
    head = f"{'model':<20} " + " ".join(f"{n[:16]:>16}" for n in names)
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.name:<20} " + " ".join(f"{r.stages.get(n, 0.0):>16.3f}" for n in names))


def print_depth(rows: list[Row]) -> None:
    fam = sorted((r for r in rows if r.name in DEPTH), key=lambda r: DEPTH[r.name])
    if len(fam) < 2:
        return
    base = fam[0]
    print()
    print("time against depth (ResNet family, 224x224, 50% group masks)")
    head = (f"{'model':<10} {'depth':>5} {'params':>8} {'time (s)':>9} {'min (s)':>8} {'cpu (s)':>8} "
            f"{'ms/layer':>9} {'time ratio':>10} {'cpu ratio':>9} {'depth ratio':>11}")
    print(head)
    print("-" * len(head))
    for r in fam:
        d = DEPTH[r.name]
        print(f"{r.name:<10} {d:>5} {_fmt_params(r.before):>8} {r.time_s:>9.3f} {r.min_s:>8.3f} {r.cpu_s:>8.3f} "
              f"{1000 * r.time_s / d:>9.1f} {r.time_s / base.time_s:>10.2f} {r.cpu_s / base.cpu_s:>9.2f} "
              f"{d / DEPTH[base.name]:>11.2f}")
    xs = np.log([DEPTH[r.name] for r in fam])
    for label, ys in (("median wall time", [r.time_s for r in fam]), ("min wall time", [r.min_s for r in fam]),
                      ("median CPU time", [r.cpu_s for r in fam])):
        slope = float(np.polyfit(xs, np.log(ys), 1)[0])
        print(f"growth of {label}: ~ depth^{slope:.2f} (log-log fit; 1.00 = linear); "
              f"{fam[-1].name}/{base.name} x{ys[-1] / ys[0]:.2f} "
              f"for depth x{DEPTH[fam[-1].name] / DEPTH[base.name]:.2f}")


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _load() -> str:
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", help="comma-separated model names (default: zoo + benchmark + depth family)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per model; the median is shown (default 3)")
    p.add_argument("--skip-zoo", action="store_true", help="only the benchmark-size models")
    p.add_argument("--skip-large", action="store_true", help="only the zoo models")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (default: torch's choice); 1 avoids OpenMP spin-waiting "
                        "inflating the figures when other processes share the CPUs")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    logging.basicConfig(level=logging.ERROR)
    if args.threads < 0:
        p.error("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        for n in names:
            zoo.get(n)  # unknown names fail early with the list of known ones
    else:
        names = [] if args.skip_zoo else list(zoo.names("zoo"))
        if not args.skip_large:
            large = sorted(set(zoo.names("benchmark")) | set(zoo.names("depth-family")),
                           key=lambda n: (n not in DEPTH, DEPTH.get(n, 0), n))
            names += [n for n in large if n not in names]
    print(f"finalize benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU(s), {torch.get_num_threads()} torch thread(s), median of {args.repeat}; "
          f"load average {_load()} at start")
    rows = bench(names, args.repeat)
    print()
    print_table(rows)
    if any(not r.mem_exact for r in rows):
        print("* peak memory from the ru_maxrss delta (VmHWM reset unavailable): may under-report")
    print_stages(rows)
    print_depth(rows)
    print(f"load average {_load()} at the end (other processes on this machine slow every figure down)")
    slow = [r for r in rows if r.name == "resnet50" and r.time_s >= 1.0]
    if slow:
        print(f"note: resnet50 took {slow[0].time_s:.2f} s (target < 1 s)")
    return 0 if all(r.compacted and math.isfinite(r.rel_err) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
