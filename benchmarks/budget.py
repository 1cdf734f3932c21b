"""Budget benchmark (issue 14): does ``latency=0.5x`` give half the measured latency, and does the
budget's allocation keep more than uniform pruning at the same cost?

Run from the repository root::

    python -m benchmarks.budget                     # MobileNetV2, ResNet-18, BERT-base, digits (~15 min)
    python -m benchmarks.budget --quick             # small widths, one digits seed (~2 min)
    python -m benchmarks.budget --models resnet18 --skip-digits
    python -m benchmarks.budget --models gpt2 --skip-digits --skip-cost-table --out benchmarks/budget_gpt2.json

Models (random init, nothing downloaded; onnxruntime CPU, 1 thread, batch 1, all graph
optimizations, TorchScript exporter via ``deployprune.converters``):

* ``mobilenet_v2`` and ``resnet18``: the torchvision definitions at 1x3x224x224; config
  ``{"global_config": {"granularity": "channel"}}`` (every Conv/Linear by channel, default criterion).
* ``bert_base``: transformers' own ``BertForSequenceClassification(BertConfig())`` (BERT-base: 12
  layers, hidden 768, 12 heads, intermediate 3072, 2 labels), input_ids 1x128; attention by head
  (``module_type_configs: {"Linear": {"granularity": "head"}}``) and the FFN by channel
  (``module_name_configs: {".*intermediate\\.dense": {"granularity": "channel"}}``). Its groups
  come from finalize's eager recording (torch.fx cannot trace its forward).

Per model, in one process:

1. **Budget.** ``Pruner(model, {**config, "budget": {"latency": 0.5, "cost_table": <empty temp
   file>}}, inputs).prepare()`` (``prepare s``: wall time, cold cost table included), then
   ``budget_report()`` (its own measurement: the compacted artifact timed interleaved with the dense
   ONNX).
2. **Uniform at equal measured latency.** The same config with one ``target_sparsity`` for every
   group (channel groups ``round_to`` the budget's measured preferred multiple, so both get
   hardware-friendly widths), compacted and exported; the sparsity is searched (bracketing
   secant steps, ``--search-steps``) so that its latency, timed interleaved with the dense and the
   budget ONNX in one run, matches the budget artifact's (uniform / budget = 1). The closest point
   is the baseline.
3. **Headline timing.** Dense, budget and uniform ONNX timed interleaved in one
   ``deployprune.latency.measure`` run (``--repeats`` calls each), ``--rounds`` such runs (default
   3); the figures are those of the median round (all rounds are in the JSON): ``ratio`` = budget /
   dense median,
   ``within 10%`` = ratio <= 0.55 (and how far below 0.5 it is).
4. **Retained importance** (``budget.retained_importance``) of both keeps, scored on the *dense*
   model (a reference Pruner of the same config, no pruning: scores of the unmasked weights, so
   neither side's pruned units score 0).

Digits (``--skip-digits`` to leave out): sklearn's 8x8 digits and the training loop of
``benchmarks/accuracy.py`` (``deployprune.data.digits``, ``deployprune.training.finetune`` with
Adam 3e-3 and cosine decay, NLL loss). Its model ``mnist_net_digits`` has a single prunable
group (one conv), where any allocation *is* uniform, so this benchmark uses a 3-conv net of the
same style (``digits_cnn``: conv 1->16, 16->32, pool, 32->64, BN+ReLU each, global average pool,
linear 64->10). Per seed: dense training (``--train-epochs``), then ``macs=50%`` budget vs uniform
channel pruning at equal MACs (sparsity bisected on the compacted model's MACs), both one-shot and
fine-tuned ``--finetune-epochs`` epochs with the masks fixed; validation accuracy of each.

Cost table: a cold ``CostTable`` build (record the layers, time every layer's grid, measure the
preferred multiple) for MobileNetV2 into an empty temp file; issue 14's target is under 120 s.

Results are printed and written to ``benchmarks/budget.json`` (with load averages: the machine is
shared; latencies are interleaved ratios, so other load slows both sides alike).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # python benchmarks/budget.py
    sys.path.insert(0, str(REPO))

BUDGET = 0.5
TOLERANCE = 0.10
TARGET_BUILD_S = 120.0
MODELS = ("mobilenet_v2", "resnet18", "bert_base")
# not in the default run: transformers GPT2Model (GPT-2 small), heads and MLP; torchvision vit_b_16, the
# nn.MultiheadAttention heads and MLP
EXTRA_MODELS = ("gpt2", "vit_b_16")


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------ models


def build(name: str, quick: bool) -> tuple[Any, tuple, dict[str, Any], str]:
    """(model, inputs, pruning config without the budget, description)."""
    import torch

    torch.manual_seed(0)
    if name in ("mobilenet_v2", "resnet18"):
        from deployprune._compat import tolerate_missing_torchvision_ops

        tolerate_missing_torchvision_ops()
        import torchvision

        size = 64 if quick else 224
        kwargs = {"width_mult": 0.5} if quick and name == "mobilenet_v2" else {}
        model = getattr(torchvision.models, name)(**kwargs).eval()
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        what = f"torchvision {name}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) 1x3x{size}x{size}"
        return model, (x,), {"global_config": {"granularity": "channel"}}, what
    if name == "bert_base":
        from deployprune._compat import tolerate_missing_torchvision_ops

        tolerate_missing_torchvision_ops()
        import transformers

        cfg = (transformers.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=1024) if quick else transformers.BertConfig())
        seq = 64 if quick else 128
        model = transformers.BertForSequenceClassification(cfg).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
        config = {"module_type_configs": {"Linear": {"granularity": "head"}},
                  "module_name_configs": {r".*intermediate\.dense": {"granularity": "channel"}}}
        what = (f"transformers {transformers.__version__} BertForSequenceClassification {cfg.num_hidden_layers} "
                f"layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, FFN {cfg.intermediate_size}, "
                f"{cfg._attn_implementation or 'eager'} attention; input_ids 1x{seq}")
        return model, (ids,), config, what
    if name == "gpt2":
        from deployprune._compat import tolerate_missing_torchvision_ops

        tolerate_missing_torchvision_ops()
        import transformers

        cfg = (transformers.GPT2Config(vocab_size=1000, n_embd=256, n_layer=2, n_head=4, n_positions=128,
                                       use_cache=False) if quick else transformers.GPT2Config(use_cache=False))
        seq = 64 if quick else 128
        model = transformers.GPT2Model(cfg).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
        # heads of the fused c_attn (split into q, k, v) and the Conv1D MLP's channels
        config = {"module_type_configs": {"Conv1D": {"granularity": "head"}},
                  "module_name_configs": {r".*mlp\.c_fc": {"granularity": "channel"}}}
        what = (f"transformers {transformers.__version__} GPT2Model {cfg.n_layer} layers, hidden {cfg.n_embd}, "
                f"{cfg.n_head} heads, MLP {4 * cfg.n_embd}, {cfg._attn_implementation or 'eager'} attention; "
                f"input_ids 1x{seq}")
        return model, (ids,), config, what
    if name == "vit_b_16":
        from deployprune._compat import tolerate_missing_torchvision_ops

        tolerate_missing_torchvision_ops()
        import torchvision

        size = 64 if quick else 224
        kwargs = dict(image_size=64, patch_size=16, num_layers=2, num_heads=4, hidden_dim=128,
                      mlp_dim=512) if quick else {}
        model = (torchvision.models.VisionTransformer(**kwargs) if quick else torchvision.models.vit_b_16()).eval()
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        # nn.MultiheadAttention's heads (in_proj_weight) and the MLP's channels (LayerNorm pins the rest)
        config = {"global_config": {"granularity": "channel"},
                  "module_type_configs": {"MultiheadAttention": {"granularity": "head"}}}
        arch = f"VisionTransformer({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if quick else "vit_b_16()"
        what = f"torchvision {arch} 1x3x{size}x{size}"
        return model, (x,), config, what
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS + EXTRA_MODELS)}")


def uniform_config(config: dict[str, Any], sparsity: float, multiple: int) -> dict[str, Any]:
    """``config`` with one target_sparsity for every rule (channel rules rounded to ``multiple``)."""
    out = copy.deepcopy(config)
    rules = [out["global_config"]] if "global_config" in out else []
    for key in ("module_type_configs", "module_name_configs"):
        rules += list(out.get(key, {}).values())
    for rule in rules:
        rule["target_sparsity"] = float(sparsity)
        if rule.get("granularity") == "channel" and multiple > 1:
            rule["round_to"] = int(multiple)
    return out


def group_keep(pruner: Any) -> dict[str, Any]:
    return {t.name: pruner._unit_keep[t.name].clone() for t in pruner.targets if t.kind == "group"}


def dense_requests(model: Any, inputs: tuple, config: dict[str, Any]) -> list[Any]:
    """Allocation requests (per-group scores) of the unpruned model under ``config``."""
    from deployprune.pruning import Pruner

    ref = Pruner(copy.deepcopy(model), uniform_config(config, 0.0, 1), inputs)
    ref.prepare()
    groups = [t for t in ref.targets if t.kind == "group"]
    return ref._requests(groups, sparsity_of=lambda t: 1.0)


def compact_onnx(pruner: Any, inputs: tuple, path: Path) -> tuple[Path, dict[str, Any]]:
    from deployprune.converters import get
    from deployprune.finalize import compact
    from deployprune.stats import count_macs, count_params

    result = compact(pruner.model, inputs, pruner.masks())
    get("onnx").convert(result.model, inputs, path, force=True)
    return path, {"compacted": bool(result.compacted), "params": count_params(result.model),
                  "macs": count_macs(result.model, inputs)}


def time_together(paths: dict[str, Path], inputs: tuple, repeats: int) -> dict[str, float]:
    """Median ms of every ONNX file, all timed interleaved in one deployprune.latency.measure run."""
    from deployprune.latency import LatencyConfig, OrtRunner, measure

    config = LatencyConfig(warmup=5, repeats=repeats, threads=1, eager=False, batch_sizes=(1,))
    runners = [OrtRunner(p, config, role=role) for role, p in paths.items()]
    report = measure(runners, inputs, config)
    out = {}
    for role in paths:
        r = report.get(role, "onnxruntime", 1)
        if r is None:
            raise RuntimeError(f"{role} could not be timed: {'; '.join(report.notes)}")
        out[role] = r.median_ms
    return out


# ------------------------------------------------------------------------------------ one model


def run_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from deployprune.converters import get
    from deployprune.errors import ConfigError
    from deployprune.pruning import Pruner
    from deployprune.pruning.budget import measure_latency_pair, retained_importance, summary_line
    from deployprune.stats import count_macs, count_params

    model, inputs, config, what = build(name, args.quick)
    dense = copy.deepcopy(model)
    dense_onnx = work / f"{name}-dense.onnx"
    get("onnx").convert(dense, inputs, dense_onnx, force=True)
    dense_params, dense_macs = count_params(dense), count_macs(dense, inputs)
    print(f"\n{name}: {what}; load {_load()}", flush=True)

    # 1. the budget, from an empty cost table
    table = work / f"{name}-cost-table.json"
    budget = {"latency": BUDGET, "cost_table": str(table), **({"iterations": 2} if args.quick else {})}
    pruner = Pruner(model, {**config, "budget": budget}, inputs)
    t0 = time.perf_counter()
    try:
        pruner.prepare()
    except ConfigError as exc:  # an unreachable budget is a result too
        print(f"  {exc}", flush=True)
        return {"model": name, "what": what, "error": str(exc), "load_average": _load()}
    prepare_s = time.perf_counter() - t0
    report = pruner.budget_report()
    print(f"  {summary_line(report)}", flush=True)
    print(f"  prepare {prepare_s:.1f} s (planner setup incl. cost table {pruner._planner.setup_seconds:.1f} s); "
          f"calibration tries: {[round(c['ratio'], 3) for c in report['calibration']]}", flush=True)
    multiple = int(report["preferred_multiple"])
    bkeep = group_keep(pruner)
    budget_onnx, bfacts = compact_onnx(pruner, inputs, work / f"{name}-budget.onnx")
    d_ms, b_ms = measure_latency_pair(dense_onnx, budget_onnx, inputs, pruner._planner.budget.setting,
                                      repeats=args.repeats)
    target = b_ms / d_ms
    print(f"  budget artifact: {b_ms:.2f} ms vs dense {d_ms:.2f} ms = {target:.3f}x; searching the uniform "
          f"sparsity at the budget's latency (channels round_to {multiple})", flush=True)

    # 2. uniform at equal measured latency: each candidate timed in one run with the dense and the
    # budget ONNX, so the search compares uniform / budget of the same run (drift between runs cancels)
    def uniform_at(s: float) -> dict[str, Any]:
        p = Pruner(copy.deepcopy(dense), uniform_config(config, s, multiple), inputs)
        p.prepare()
        path, facts = compact_onnx(p, inputs, work / f"{name}-uniform-{s:.4f}.onnx")
        t = time_together({"dense": dense_onnx, "budget": budget_onnx, "uniform": path}, inputs, args.repeats)
        point = {"sparsity": round(s, 4), "vs_budget": t["uniform"] / t["budget"], "ratio": t["uniform"] / t["dense"],
                 "budget_ratio": t["budget"] / t["dense"], **{f"{k}_ms": v for k, v in t.items()}, **facts,
                 "keep": group_keep(p), "path": path}
        print(f"    uniform sparsity {s:.3f}: {t['uniform']:.2f} ms, budget {t['budget']:.2f} ms, dense "
              f"{t['dense']:.2f} ms: uniform / budget {point['vs_budget']:.3f}", flush=True)
        return point

    points = []
    lo, hi = (0.0, 1.0 / target), None  # (sparsity, uniform / budget): slower than the budget / at or faster
    s = min(0.85, max(0.05, 1.0 - math.sqrt(target)))  # both widths of a layer scale: latency ~ (1-s)^2
    for _ in range(args.search_steps):
        pt = uniform_at(s)
        points.append(pt)
        if abs(pt["vs_budget"] - 1) <= 0.01:
            break
        if pt["vs_budget"] > 1:
            lo = (s, pt["vs_budget"])
        else:
            hi = (s, pt["vs_budget"])
        if hi is None:
            s = min(0.9, s + 0.1)
        else:
            f = (lo[1] - 1) / max(1e-9, lo[1] - hi[1])
            s = lo[0] + min(0.85, max(0.15, f)) * (hi[0] - lo[0])  # secant, kept inside the bracket
    best = min(points, key=lambda p: abs(p["vs_budget"] - 1))

    # 3. one interleaved run of all three
    rounds = [time_together({"dense": dense_onnx, "budget": budget_onnx, "uniform": best["path"]}, inputs,
                            args.repeats) for _ in range(args.rounds)]
    ratios = sorted(r["budget"] / r["dense"] for r in rounds)
    ms = sorted(rounds, key=lambda r: r["budget"] / r["dense"])[len(rounds) // 2]  # the median round
    ratio = ms["budget"] / ms["dense"]
    # 4. importance, scored on the dense model
    requests = dense_requests(dense, inputs, config)
    assert {r.name for r in requests} == set(bkeep) == set(best["keep"]), "group names differ"
    ri_b, ri_u = retained_importance(requests, bkeep), retained_importance(requests, best["keep"])
    units = {r.name: r.units for r in requests}
    row = {
        "model": name, "what": what, "load_average": _load(),
        "prepare_s": round(prepare_s, 2), "planner_setup_s": round(pruner._planner.setup_seconds, 2),
        "preferred_multiple": multiple, "groups": len(bkeep),
        "budget_report": {k: report.get(k) for k in ("budget", "achieved_ratio", "met", "error", "latency_ms",
                                                       "dense_ms_same_run", "dense_ms", "goal", "predicted",
                                                       "params", "macs", "compacted", "calibration")},
        "dense_ms": round(ms["dense"], 3), "budget_ms": round(ms["budget"], 3), "uniform_ms": round(ms["uniform"], 3),
        "uniform_vs_budget": round(ms["uniform"] / ms["budget"], 4),
        "ratio": round(ratio, 4), "ratio_rounds": [round(r, 4) for r in ratios],
        "rounds": [{k: round(v, 3) for k, v in r.items()} for r in rounds],
        "uniform_ratio": round(ms["uniform"] / ms["dense"], 4),
        "within_10pct": ratio <= BUDGET * (1 + TOLERANCE), "below_budget_by": round(BUDGET - ratio, 4),
        "budget_ratio_pair_run": round(target, 4),
        "uniform_sparsity": best["sparsity"], "uniform_search": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in p.items() if k not in ("keep", "path")}
            for p in points],
        "retained_importance": {"budget": {k: round(v, 4) for k, v in ri_b.items()},
                                "uniform": {k: round(v, 4) for k, v in ri_u.items()}},
        "budget_widths": {n: [int(v.sum()), units[n]] for n, v in bkeep.items()},
        "uniform_widths": {n: [int(v.sum()), units[n]] for n, v in best["keep"].items()},
        "params": {"dense": dense_params, "budget": bfacts["params"], "uniform": best["params"]},
        "macs": {"dense": dense_macs, "budget": bfacts["macs"], "uniform": best["macs"]},
        "compacted": {"budget": bfacts["compacted"], "uniform": best["compacted"]},
    }
    print(f"  one run: dense {ms['dense']:.2f} ms, budget {ms['budget']:.2f} ms ({ratio:.3f}x), uniform "
          f"s={best['sparsity']:.3f} {ms['uniform']:.2f} ms ({row['uniform_ratio']:.3f}x); retained importance "
          f"(geometric/total) budget {ri_b['geometric']:.3f}/{ri_b['total']:.3f}, uniform "
          f"{ri_u['geometric']:.3f}/{ri_u['total']:.3f}", flush=True)
    for p in [*points]:
        p["path"].unlink(missing_ok=True)
    for f in (dense_onnx, budget_onnx):
        f.unlink(missing_ok=True)
    return row


# ------------------------------------------------------------------------------------ digits


def digits_cnn() -> Any:
    """A 3-conv digits net in the style of mnist_net_digits (which has only one prunable group)."""
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10), nn.LogSoftmax(dim=1))


def run_digits_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks.accuracy import EXAMPLE, _cosine
    from deployprune.data import digits
    from deployprune.finalize import compact
    from deployprune.pruning import Pruner
    from deployprune.pruning.budget import retained_importance
    from deployprune.stats import count_macs
    from deployprune.training import evaluate, finetune

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    train, val = digits(batch_size=32, seed=seed)
    model = digits_cnn()
    opt = {"optimizer_kwargs": {"lr": 3e-3}, "criterion": "torch.nn.NLLLoss", "seed": seed, "progress": False}
    finetune(model, None, train, val, epochs=args.train_epochs, **opt, **_cosine(args.train_epochs))
    dense = copy.deepcopy(model).eval()
    dense_acc = evaluate(dense, val)["accuracy"]
    dense_macs = count_macs(dense, EXAMPLE)
    config = {"global_config": {"granularity": "channel"}}

    def macs_of(p: Any) -> int:
        return count_macs(compact(p.model, EXAMPLE, p.masks()).model, EXAMPLE)

    budget_model = copy.deepcopy(dense)
    bp = Pruner(budget_model, {**config, "budget": {"macs": args.digits_macs}}, EXAMPLE)
    bp.prepare()
    bmacs = macs_of(bp)

    def uniform(s: float) -> tuple[Any, Any, int]:
        m = copy.deepcopy(dense)
        p = Pruner(m, uniform_config(config, s, 1), EXAMPLE)
        p.prepare()
        return m, p, macs_of(p)

    lo, hi, tried = 0.0, 0.9, []
    for _ in range(10):  # bisection on the compacted model's MACs (counts: exact, cheap)
        mid = (lo + hi) / 2
        _, _, macs = uniform(mid)
        tried.append((mid, macs))
        lo, hi = (mid, hi) if macs > bmacs else (lo, mid)
    s, umacs = min(tried, key=lambda t: abs(t[1] - bmacs))
    umodel, up, umacs = uniform(s)
    requests = dense_requests(dense, EXAMPLE, config)
    ri_b = retained_importance(requests, group_keep(bp))
    ri_u = retained_importance(requests, group_keep(up))
    widths = {"budget": [int(v.sum()) for v in group_keep(bp).values()],
              "uniform": [int(v.sum()) for v in group_keep(up).values()]}
    out = {"seed": seed, "dense_acc": dense_acc, "dense_macs": dense_macs, "budget_macs": bmacs,
           "uniform_macs": umacs, "uniform_sparsity": round(s, 4), "widths": widths,
           "retained_importance": {"budget": ri_b, "uniform": ri_u}}
    for tag, m, p in (("budget", budget_model, bp), ("uniform", umodel, up)):
        out[f"{tag}_oneshot_acc"] = evaluate(m, val)["accuracy"]
        res = finetune(m, p, train, val, epochs=args.finetune_epochs, **opt, **_cosine(args.finetune_epochs))
        out[f"{tag}_acc"] = float(res.final_val_accuracy)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"  digits seed {seed}: dense {dense_acc:.4f}; MACs budget {bmacs / dense_macs:.3f}, uniform (s={s:.3f}) "
          f"{umacs / dense_macs:.3f}; one-shot {out['budget_oneshot_acc']:.4f} / {out['uniform_oneshot_acc']:.4f}; "
          f"fine-tuned budget {out['budget_acc']:.4f}, uniform {out['uniform_acc']:.4f} ({out['seconds']:.0f} s)",
          flush=True)
    return out


# ------------------------------------------------------------------------------------ cost table


def cold_build(quick: bool, work: Path) -> dict[str, Any]:
    import torch

    from deployprune.costmodel import CostTable, record_layers

    model, inputs, _, what = build("mobilenet_v2", quick)
    table = CostTable(path=work / "cold-mobilenet_v2.json")
    t0 = time.perf_counter()
    with torch.no_grad():
        layers = record_layers(model, inputs)
    table.build(layers)
    multiple = table.preferred_multiple()
    build_s = time.perf_counter() - t0
    print(f"\ncost table, cold: {what}: {len(layers)} layers, {table.measurements} points in {build_s:.1f} s; "
          f"preferred multiple {multiple}", flush=True)
    return {"model": "mobilenet_v2", "what": what, "layers": len(layers), "points": table.measurements,
            "build_s": round(build_s, 2), "preferred_multiple": multiple, "target_s": TARGET_BUILD_S,
            "met": build_s < TARGET_BUILD_S, "load_average": _load()}


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.budget", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size: small widths and inputs, one digits seed")
    parser.add_argument("--models", nargs="*", default=list(MODELS),
                        help=f"default: {' '.join(MODELS)}; also: {' '.join(EXTRA_MODELS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per model (default 40; quick 20)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="headline timings: interleaved runs of dense/budget/uniform, median round (default 3)")
    parser.add_argument("--search-steps", type=int, default=None, help="uniform sparsity search (default 5; quick 3)")
    parser.add_argument("--seeds", default=None, help="digits seeds (default 0,1,2,3,4; quick 0)")
    parser.add_argument("--train-epochs", type=int, default=None, help="digits dense training (default 20; quick 4)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="digits fine-tuning (default 10; quick 2)")
    parser.add_argument("--digits-macs", type=float, default=BUDGET, help="digits MACs budget (default 0.5)")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-cost-table", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/budget.json; with --quick none unless given)")
    args = parser.parse_args(argv)
    q = args.quick
    args.repeats = args.repeats or (20 if q else 40)
    args.rounds = args.rounds or (1 if q else 3)
    args.search_steps = args.search_steps or (2 if q else 5)
    args.seeds = args.seeds or ("0" if q else "0,1,2,3,4")
    args.train_epochs = args.train_epochs or (4 if q else 20)
    args.finetune_epochs = args.finetune_epochs or (2 if q else 10)
    out = args.out if args.out is not None else (None if q else REPO / "benchmarks" / "budget.json")

    import torch

    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    from deployprune import progress  # noqa: F401 - the planner's progress notes go to stderr

    t_all = time.perf_counter()
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} "
          f"cores, load average {_load()}; onnxruntime CPU, 1 thread, batch 1; budget latency={BUDGET}x"
          + (" (--quick sizes)" if q else ""), flush=True)
    doc: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
                    "load_average_start": _load()},
        "setting": {"provider": "CPUExecutionProvider", "threads": 1, "batch": 1, "graph_optimization": "all",
                    "budget": f"latency={BUDGET}x", "repeats": args.repeats, "quick": q},
        "results": [], "digits": None, "cost_table": None,
    }
    with tempfile.TemporaryDirectory(prefix="budget-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_cost_table:
            doc["cost_table"] = cold_build(q, work)
        for name in args.models:
            doc["results"].append(run_model(name, args, work))
        if not args.skip_digits:
            print(f"\ndigits: macs={args.digits_macs:.0%} budget vs uniform at equal MACs, fine-tuned", flush=True)
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
            rows = [run_digits_seed(s, args) for s in seeds]
            mean = {k: statistics.fmean(r[k] for r in rows) for k in
                    ("dense_acc", "budget_oneshot_acc", "uniform_oneshot_acc", "budget_acc", "uniform_acc")}
            doc["digits"] = {"model": "digits_cnn", "budget": f"macs={args.digits_macs:.0%}",
                             "train_epochs": args.train_epochs,
                             "finetune_epochs": args.finetune_epochs, "seeds": rows, "mean": mean}

    print("\n| model | dense ms | budget ms | ratio | within 10% | uniform sparsity (ratio) | retained importance "
          "geo budget / uniform | total budget / uniform | prepare s |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in doc["results"]:
        if "error" in r:
            print(f"| {r['model']} | {r['error']} |")
            continue
        ri = r["retained_importance"]
        verdict = "yes" if r["within_10pct"] else "NO"
        if r["ratio"] < BUDGET * (1 - TOLERANCE):
            verdict += f" ({r['below_budget_by']:.3f} below)"
        print(f"| {r['model']} | {r['dense_ms']:.2f} | {r['budget_ms']:.2f} | {r['ratio']:.3f} | {verdict} "
              f"| {r['uniform_sparsity']:.3f} ({r['uniform_ratio']:.3f}; u/b {r['uniform_vs_budget']:.3f}) "
              f"| {ri['budget']['geometric']:.3f} / {ri['uniform']['geometric']:.3f} "
              f"| {ri['budget']['total']:.3f} / {ri['uniform']['total']:.3f} | {r['prepare_s']:.0f} |")
    if doc["digits"]:
        m = doc["digits"]["mean"]
        print(f"\ndigits ({len(doc['digits']['seeds'])} seeds, {args.finetune_epochs} fine-tuning epochs), mean "
              f"accuracy: dense {m['dense_acc']:.4f}; budget {m['budget_acc']:.4f} vs uniform {m['uniform_acc']:.4f} "
              f"(one-shot {m['budget_oneshot_acc']:.4f} vs {m['uniform_oneshot_acc']:.4f})")
    if doc["cost_table"]:
        c = doc["cost_table"]
        print(f"cost table (MobileNetV2, cold): {c['build_s']:.1f} s, target under {TARGET_BUILD_S:.0f} s: "
              f"{'met' if c['met'] else 'NOT met'}")
    doc["machine"]["load_average_end"] = _load()
    doc["seconds"] = round(time.perf_counter() - t_all, 1)
    print(f"total {doc['seconds']:.0f} s; load average {_load()}")
    if out is not None:
        out.write_text(json.dumps(doc, indent=1, default=float) + "\n")
        print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
