"""Run every benchmark of the project, then print the one summary table.

    python -m benchmarks.run_all            # everything, benchmark-size models included (minutes)
    python -m benchmarks.run_all --quick    # CI-size models only
    python -m benchmarks.run_all --only compaction

Every ``benchmarks/<name>.py`` module other than this one and ``compaction`` is run first, one
after the other, as ``python -m benchmarks.<name>`` (its output is shown as it comes, under a
header; ``--quick`` passes each module's own small-size flags, or ``--quick`` when its ``--help``
offers one). The compaction benchmark (``benchmarks/compaction.py``) runs last, in this process,
and prints the table: per model and channel sparsity, the MACs ratio, the onnxruntime latency
ratio dense/compacted at batch 1 and 8, their quotient (efficiency against the MACs ceiling),
finalize time and ONNX size ratio. It also writes ``benchmarks/results.md`` and
``benchmarks/results.svg`` unless ``--no-write``. Benchmarks run sequentially, so they do not
disturb each other's timings; other processes on the machine do, hence the load averages.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

# Flags that make a benchmark CI-size, for modules without a --quick flag of their own.
QUICK_ARGS: dict[str, list[str]] = {
    "finalize": ["--skip-large"],
    "converters": ["--width", "16"],
}
NOT_BENCHMARKS = {"__init__", "__main__", "run_all", "compaction"}


def discover() -> list[str]:
    """The benchmark modules present (others may add theirs at any time)."""
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_BENCHMARKS and not p.stem.startswith("_"))


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), path]) if path else str(REPO)}


def quick_args(name: str) -> list[str]:
    if name in QUICK_ARGS:
        return list(QUICK_ARGS[name])
    try:
        helptext = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=REPO, env=_env(),
                                  capture_output=True, text=True, timeout=120).stdout
    except subprocess.TimeoutExpired:
        return []
    return ["--quick"] if "--quick" in helptext else []


def run_module(name: str, quick: bool) -> tuple[int, float, list[str]]:
    args = quick_args(name) if quick else []
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
    print(f"\n=== benchmarks.{name}: {' '.join(['python', '-m', f'benchmarks.{name}', *args])} "
          f"(load average {_load()}) ===", flush=True)
    t0 = time.perf_counter()
    code = subprocess.run(cmd, cwd=REPO, env=_env()).returncode
    return code, time.perf_counter() - t0, args


def _load() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-size models only")
    p.add_argument("--only", help="comma-separated benchmark names to run (e.g. compaction,finalize)")
    p.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
    p.add_argument("--repeats", type=int, default=None, help="compaction: timed calls per model and batch size")
    p.add_argument("--no-write", action="store_true", help="compaction: do not write benchmarks/results.*")
    args = p.parse_args(argv)

    available = discover() + ["compaction"]
    wanted = [n.strip() for n in args.only.split(",")] if args.only else list(available)
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    unknown = [n for n in [*wanted, *skip] if n not in available]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}")
    wanted = [n for n in wanted if n not in skip]

    print(f"run_all: {', '.join(wanted)}{' (--quick)' if args.quick else ''}; load average {_load()}", flush=True)
    status: list[str] = []
    failed = False
    for name in (n for n in wanted if n != "compaction"):
        code, seconds, used = run_module(name, args.quick)
        failed |= code != 0
        status.append(f"benchmarks.{name} {' '.join(used)}".rstrip() + f": exit {code}, {seconds:.0f} s")

    if "compaction" in wanted:
        from benchmarks import compaction

        print(f"\n=== benchmarks.compaction (load average {_load()}) ===", flush=True)
        cargs = (["--quick"] if args.quick else []) + (["--no-write"] if args.no_write else [])
        if args.repeats:
            cargs += ["--repeats", str(args.repeats)]
        t0 = time.perf_counter()
        code = compaction.main(cargs)
        failed |= code != 0
        status.append(f"benchmarks.compaction {' '.join(cargs)}".rstrip()
                      + f": exit {code}, {time.perf_counter() - t0:.0f} s")
    print("\nbenchmarks run:")
    for line in status:
        print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
