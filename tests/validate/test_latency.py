from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from deployprune.errors import EXIT_USAGE, ConfigError, UsageError
from deployprune.latency import (
    LatencyConfig,
    LatencyReport,
    LatencyResult,
    OrtRunner,
    Runner,
    TorchRunner,
    measure,
)

from .helpers import export_onnx


class _Recording(Runner):
    """A runner whose calls append its label to a shared log (no timing involved)."""

    runtime = "torch"

    def __init__(self, label: str, log: list[str], max_batch: int | None = None) -> None:
        self.label = label
        self.role = label
        self.log = log
        self.max_batch = max_batch

    def accepts(self, batch_size: int, example_inputs: Sequence[torch.Tensor]) -> str | None:
        if self.max_batch is not None and batch_size > self.max_batch:
            return f"takes at most {self.max_batch}"
        return None

    def prepare(self, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
        batch = int(inputs[0].shape[0])

        def call() -> None:
            self.log.append(f"{self.label}{batch}")

        return call


def test_calls_are_interleaved_one_per_model_per_round() -> None:
    log: list[str] = []
    runners = [_Recording(name, log) for name in ("A", "B", "C")]
    cfg = LatencyConfig(warmup=2, repeats=12, batch_sizes=(1,))
    report = measure(runners, (torch.zeros(1, 4),), cfg, seed=3)
    # warm-up rounds in order, then timed rounds: every round holds each model exactly once
    assert log[:6] == ["A1", "B1", "C1"] * 2
    timed = log[6:]
    assert len(timed) == 36
    rounds = [timed[i:i + 3] for i in range(0, 36, 3)]
    assert all(sorted(r) == ["A1", "B1", "C1"] for r in rounds)
    # the order is shuffled: not always the same model first
    assert len({r[0] for r in rounds}) > 1
    assert [len(r.samples_ms) for r in report.results] == [12, 12, 12]
    again: list[str] = []
    measure([_Recording(n, again) for n in ("A", "B", "C")], (torch.zeros(1, 4),), cfg, seed=3)
    assert again == log  # seeded


def test_batch_sweep_skips_runners_that_cannot_take_a_batch_size() -> None:
    log: list[str] = []
    runners = [_Recording("A", log), _Recording("B", log, max_batch=2)]
    cfg = LatencyConfig(warmup=0, repeats=2, batch_sizes=(1, 4))
    report = measure(runners, (torch.zeros(1, 3), torch.zeros(1, 5, dtype=torch.long)), cfg)
    assert sorted((r.label, r.batch_size) for r in report.results) == [("A", 1), ("A", 4),
                                                                        ("B", 1)]
    assert report.notes == ["batch 4: B not timed (takes at most 2)"]
    assert log.count("A4") == 2 and "B4" not in log


def test_summary_statistics_follow_the_samples() -> None:
    samples = [float(x) for x in range(1, 101)]
    r = LatencyResult.from_samples("m", "artifact", "onnxruntime", 1, samples)
    assert r.median_ms == pytest.approx(50.5)
    assert r.p90_ms == pytest.approx(90.1)
    assert r.p99_ms == pytest.approx(99.01)
    assert r.min_ms == 1.0 and r.mean_ms == pytest.approx(50.5)
    rep = LatencyReport(config=LatencyConfig(), results=[
        r, LatencyResult.from_samples("d", "dense", "onnxruntime", 1, [x * 3 for x in samples])])
    assert rep.ratio("dense", "artifact") == pytest.approx(3.0)
    assert rep.ratio("dense", "artifact", batch_size=8) is None
    assert rep.get("source") is None


def test_torch_and_onnxruntime_runners_time_real_models(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(1, 8)
    path = export_onnx(model, (x,), tmp_path / "mlp.onnx")
    cfg = LatencyConfig(warmup=1, repeats=4, batch_sizes=(1, 3), threads=1,
                        graph_optimization="basic")
    threads_before = torch.get_num_threads()
    report = measure([TorchRunner(model, role="source"), OrtRunner(path, cfg, role="artifact")],
                     (x,), cfg)
    assert torch.get_num_threads() == threads_before  # restored
    assert sorted((r.runtime, r.batch_size) for r in report.results) == [
        ("onnxruntime", 1), ("onnxruntime", 3), ("torch", 1), ("torch", 3)]
    for r in report.results:
        assert len(r.samples_ms) == 4 and all(s > 0 for s in r.samples_ms)
        assert r.min_ms <= r.median_ms <= r.p90_ms <= r.p99_ms <= max(r.samples_ms)
    assert report.machine["torch_threads"] == 1 and "onnxruntime" in report.machine


def test_config_validation_messages() -> None:
    with pytest.raises(ConfigError) as info:
        LatencyConfig(graph_optimization="fast")
    assert str(info.value) == ("latency graph_optimization: 'fast' is not one of disable, basic, "
                               "extended, all")
    assert info.value.exit_code == EXIT_USAGE
    with pytest.raises(ConfigError, match="latency repeats: expected an integer >= 1, got 0"):
        LatencyConfig(repeats=0)
    with pytest.raises(ConfigError, match="latency threads"):
        LatencyConfig(threads=0)
    with pytest.raises(ConfigError, match=r"latency batch_sizes: expected positive integers, "
                                          r"got \[1, 0\]"):
        LatencyConfig(batch_sizes=[1, 0])
    with pytest.raises(ConfigError, match="unknown key 'repeat'; allowed keys: warmup, repeats"):
        LatencyConfig.from_dict({"repeat": 3})
    cfg = LatencyConfig.from_dict({"batch_sizes": [1, 8], "threads": None})
    assert cfg.batch_sizes == (1, 8) and cfg.threads is None
    assert LatencyConfig.from_dict(cfg.to_dict()) == cfg


def test_unavailable_execution_provider_is_a_usage_error(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    path = export_onnx(model, (torch.zeros(1, 2),), tmp_path / "l.onnx")
    cfg = LatencyConfig(providers=("CUDAExecutionProvider",))
    with pytest.raises(UsageError, match="execution provider.s. CUDAExecutionProvider not "
                                         "available here; available: .*CPUExecutionProvider"):
        OrtRunner(path, cfg, role="artifact")
