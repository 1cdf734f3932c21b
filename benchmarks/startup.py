"""Start-up benchmark: how long the command line takes to answer when it has no real work to do.

Run from the repository root::

    python -m benchmarks.startup                 # median of 5 runs per command (~10 s)
    python -m benchmarks.startup --runs 11
    python -m benchmarks.startup --command "python -m deployprune"

Each command is a fresh process (``subprocess.run``, output discarded), timed wall clock from
start to exit: ``deployprune --version``, ``--help``, ``export --help`` and one argument error
(``export`` without a model, exit 2). Two reference rows put the figures in context: the bare
interpreter (``python -c pass``) and ``python -c "import torch"``, the cost these commands
must not pay (issue 13 "Fast start": under 0.5 s). The median of ``--runs`` runs is reported,
with the fastest and slowest; one untimed run of each command comes first (cold file cache).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (label, arguments, expected exit code)
CASES: list[tuple[str, list[str], int]] = [
    ("--version", ["--version"], 0),
    ("--help", ["--help"], 0),
    ("export --help", ["export", "--help"], 0),
    ("argument error (export, no MODEL)", ["export"], 2),
]
TARGET_SECONDS = 0.5


def default_command() -> list[str]:
    """The installed ``deployprune`` script next to this interpreter, else ``python -m deployprune``."""
    script = Path(sys.executable).with_name("deployprune")
    if script.is_file():
        return [str(script)]
    found = shutil.which("deployprune")
    return [found] if found else [sys.executable, "-m", "deployprune"]


def time_once(argv: list[str], expected: int | None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    if expected is not None and proc.returncode != expected:
        raise SystemExit(f"{shlex.join(argv)}: exit {proc.returncode}, expected {expected}: {proc.stderr.strip()}")
    return elapsed


def measure(argv: list[str], expected: int | None, runs: int) -> tuple[float, float, float]:
    time_once(argv, expected)  # untimed: file cache
    times = [time_once(argv, expected) for _ in range(runs)]
    return statistics.median(times), min(times), max(times)


def progress_timeline(command: list[str]) -> tuple[float, int, float]:
    """Export torchvision's ResNet-18 (random init, half the channels of every inner conv masked) and note
    when the first progress line reaches stderr: (seconds to it, progress lines, seconds to exit)."""
    import tempfile

    import torch

    from deployprune._compat import tolerate_missing_torchvision_ops

    tolerate_missing_torchvision_ops()
    import torchvision

    with tempfile.TemporaryDirectory() as tmp:
        model = torchvision.models.resnet18()
        torch.save(model.state_dict(), Path(tmp) / "resnet18.pt")
        masks = {name: {"weight": (torch.arange(m.out_channels) % 2 == 0).float()[:, None, None, None]
                        .expand_as(m.weight).clone()}
                 for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Conv2d) and name.endswith("conv1") and name != "conv1"}
        torch.save(masks, Path(tmp) / "masks.pt")
        env = {k: v for k, v in os.environ.items() if k != "DEPLOYPRUNE_PROGRESS"}
        argv = [*command, "export", "resnet18.pt", "--model", "torchvision.models:resnet18", "--masks", "masks.pt",
                "--input-shape", "1,3,224,224", "-o", "resnet18.onnx", "--no-latency"]
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        first, lines = None, 0
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("["):
                lines += 1
                if first is None:
                    first = time.perf_counter() - start
        code = proc.wait()
        total = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"{shlex.join(argv)}: exit {code}")
    return (first if first is not None else float("nan")), lines, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command (default 5)")
    parser.add_argument("--quick", action="store_true", help="3 runs per command")
    parser.add_argument(
        "--command",
        default=None,
        help="how to start the CLI, e.g. 'python -m deployprune' (default: the installed deployprune script)",
    )
    parser.add_argument("--progress", action="store_true",
                        help="also time the first progress line of a ResNet-18 export (~1 min)")
    args = parser.parse_args(argv)
    runs = 3 if args.quick else args.runs
    if runs < 1:
        parser.error("--runs must be at least 1")
    command = shlex.split(args.command) if args.command else default_command()
    env_note = os.environ.get("PYTHONPATH")

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"command: {shlex.join(command)}" + (f"  (PYTHONPATH={env_note})" if env_note else ""))
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores"
          + (f", load average {load[0]:.1f}" if load else "") + f"; median of {runs} runs, seconds")
    rows: list[tuple[str, tuple[float, float, float]]] = []
    for label, extra, code in CASES:
        rows.append((f"deployprune {label}", measure([*command, *extra], code, runs)))
    rows.append(("reference: python -c pass", measure([sys.executable, "-c", "pass"], 0, runs)))
    rows.append(("reference: python -c 'import torch'", measure([sys.executable, "-c", "import torch"], 0, runs)))

    if args.progress:
        first, stages, total = progress_timeline(command)
        print(f"export of a ResNet-18 (torchvision, 224x224): first progress line after {first:.2f} s, "
              f"{stages} lines in all, done after {total:.1f} s (target: progress within 2 s)")
    width = max(len(label) for label, _ in rows)
    print(f"| {'command'.ljust(width)} | median | min   | max   |")
    print(f"|{'-' * (width + 2)}|-------:|------:|------:|")
    for label, (med, lo, hi) in rows:
        print(f"| {label.ljust(width)} | {med:6.2f} | {lo:5.2f} | {hi:5.2f} |")
    slow = [label for label, (med, _, _) in rows[: len(CASES)] if med >= TARGET_SECONDS]
    verdict = "met" if not slow else f"NOT met ({', '.join(slow)})"
    print(f"target: every deployprune row under {TARGET_SECONDS} s: {verdict}")
    if load:
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0 if not slow else 1


if __name__ == "__main__":
    sys.exit(main())
