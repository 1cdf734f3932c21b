"""``deployprune prune`` and ``deployprune run`` (scenario files); registered by ``deployprune/cli.py``.

Heavy imports stay inside the handlers so ``deployprune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import EXIT_OK, UsageError


def _kv(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE (VALUE is JSON, e.g. momentum=0.9)")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def register(subparsers: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "prune",
        parents=[parents["load"], parents["common"]],
        help="prune a model by a config, fine-tune it with the schedule, write it with its masks",
        description="Attach masks by --config, fine-tune on --data (the sparsity schedule advances once per "
        "optimizer step) and write the model with its masks as a deployprune checkpoint "
        "(export it with 'deployprune export OUT --target onnx'). Without --data the schedule "
        "is run to its end on the loaded weights (one-shot pruning). Runs under torchrun "
        "(DistributedDataParallel; rank 0 writes the files).",
    )
    p.add_argument("--config", metavar="FILE", help="pruning config (.json/.yaml; docs/pruning.md); optional "
                   "with --budget (default: every Conv/Linear and transformers' Conv1D by channel+head, "
                   "nn.MultiheadAttention by head: "
                   "attention heads by head, other groups by channel; L1)")
    b = p.add_argument_group("budget (docs/pruning.md, 'Pruning to a budget')")
    b.add_argument("--budget", metavar="METRIC=VALUE", help="prune channel/head groups to a budget instead of "
                   "their target_sparsity: latency=0.5x, latency=2.5ms (onnxruntime, measured), macs=40%%, "
                   "params=30%%")
    b.add_argument("--budget-threads", type=int, default=None, metavar="N",
                   help="onnxruntime threads the latency budget holds for (default 1)")
    b.add_argument("--budget-batch", type=int, default=None, metavar="N",
                   help="batch size the latency budget holds for (default: the example batch)")
    b.add_argument("--strict", action="store_true", help="exit 4 when the measured result misses the budget "
                   "by more than 10%% (the checkpoint is still written)")
    b.add_argument("--cost-table", metavar="FILE", help="latency cost table to read and extend (JSON; default: "
                   "the per-machine cache in $DEPLOYPRUNE_CACHE or ~/.cache/deployprune)")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--data", metavar="DATA", help="'digits' (scikit-learn's bundled 8x8 digits) or "
                   "package.module:function returning (train_loader, val_loader)")
    g.add_argument("--epochs", type=int, default=None, metavar="N", help="fine-tuning epochs (default 3 with "
                   "--data, else 0)")
    g.add_argument("--lr", type=float, default=None, metavar="X", help="learning rate (default: the optimizer's)")
    g.add_argument("--optimizer", default="torch.optim.Adam", metavar="PATH", help="optimizer class import path "
                   "(default torch.optim.Adam)")
    g.add_argument("--optimizer-arg", dest="optimizer_args", action="append", default=[], type=_kv,
                   metavar="KEY=VALUE", help="optimizer keyword argument (repeatable; VALUE parsed as JSON)")
    g.add_argument("--criterion", default="torch.nn.CrossEntropyLoss", metavar="PATH",
                   help="loss class import path (default torch.nn.CrossEntropyLoss)")
    g.add_argument("--criterion-arg", dest="criterion_args", action="append", default=[], type=_kv,
                   metavar="KEY=VALUE", help="criterion keyword argument (repeatable)")
    g.add_argument("--lr-scheduler", metavar="PATH", help="learning-rate scheduler import path, e.g. "
                   "torch.optim.lr_scheduler.CosineAnnealingLR (built with the optimizer)")
    g.add_argument("--lr-scheduler-arg", dest="lr_scheduler_args", action="append", default=[], type=_kv,
                   metavar="KEY=VALUE", help="scheduler keyword argument (repeatable), e.g. T_max=10")
    g.add_argument("--lr-scheduler-interval", choices=("epoch", "step"), default="epoch",
                   help="step the scheduler after every epoch (default) or every optimizer step")
    g.add_argument("--batch-size", type=int, default=32, metavar="N", help="training batch size (default 32)")
    g.add_argument("--seed", type=int, default=0, help="seed of the RNGs and the data shuffle (default 0)")
    g.add_argument("--checkpoint-dir", metavar="DIR", help="write a training checkpoint (last.pt) after every epoch")
    g.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir exactly")
    g.add_argument("--no-progress", action="store_true", help="no fine-tuning progress lines on stderr "
                   "(-q silences every progress line)")
    p.add_argument("-o", "--output", metavar="OUT", help="pruned checkpoint (default ./<model stem>.pruned.pt)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (and restart a checkpoint)")
    p.set_defaults(func=cmd_prune)

    r = subparsers.add_parser(
        "run",
        parents=[parents["common"]],
        help="run a scenario file: prune -> fine-tune -> finalize -> export -> validate",
        description="A JSON (or YAML) scenario holds the whole run; see docs/training.md.",
    )
    r.add_argument("scenario", metavar="SCENARIO", help="scenario file (.json/.yaml)")
    r.add_argument("--force", action="store_true",
                   help="overwrite existing outputs (the scenario's own 'force: true' is not enough)")
    r.add_argument("--allow-outside", action="store_true",
                   help="let the scenario write outputs (output, export.path, finetuning.checkpoint_dir) outside "
                        "its own folder")
    r.add_argument("--no-progress", action="store_true", help="no fine-tuning progress lines on stderr "
                   "(-q silences every progress line)")
    r.add_argument("--trust-scenario", action="store_true",
                   help="let the scenario name callables outside the allowlists (zoo factories, torch losses, "
                        "optimizers and schedulers), give them any keyword arguments, and set trust_pickle; "
                        "only for scenario files you trust")
    r.set_defaults(func=cmd_run)


def _print(lines: list[str]) -> None:
    for line in lines:
        print(line)
    sys.stdout.flush()


def _import_command_line_paths(args: argparse.Namespace) -> None:
    """Import what --optimizer, --criterion, --lr-scheduler and --data name, with the working directory
    importable as ``python -m`` has it (``--optimizer myopt:Lion`` finds ./myopt.py); a path that does
    not import is exit 2 before any work. The training loop then finds the modules already imported."""
    from .._imports import cwd_importable
    from ..data import BUILTIN, resolve_entry_point
    from ..training import import_object

    with cwd_importable():
        import_object(args.optimizer, "optimizer")
        import_object(args.criterion, "criterion")
        if args.lr_scheduler:
            import_object(args.lr_scheduler, "lr_scheduler")
        if args.data and args.data.strip() not in BUILTIN and ":" in args.data:
            resolve_entry_point(args.data.strip())


def cmd_prune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..cli import load_from_args
    from ..pipeline import check_not_input, default_output
    from ..training import prune_loaded

    if args.lr_scheduler_args and not args.lr_scheduler:
        raise UsageError("--lr-scheduler-arg needs --lr-scheduler")
    if args.resume and not args.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir (the directory of the interrupted run)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    epochs = args.epochs if args.epochs is not None else (3 if args.data else 0)
    if epochs > 0 and not args.data:
        raise UsageError(f"--epochs {epochs} needs --data (digits or package.module:function)")
    budget = _budget_from_args(args)
    if args.config is None and budget is None:
        raise UsageError("prune needs --config FILE (what to prune and how far) or --budget METRIC=VALUE "
                         "(e.g. --budget latency=0.5x)")
    out = Path(args.output) if args.output else default_output(Path(args.model_path), ".pruned.pt")
    inputs = (Path(args.model_path), Path(args.config) if args.config else None,
              Path(args.masks) if args.masks else None)
    check_not_input(out, *inputs)
    if args.checkpoint_dir:
        from ..training import CHECKPOINT_NAME

        check_not_input(Path(args.checkpoint_dir) / CHECKPOINT_NAME, *inputs)
    config: Any = args.config
    if config is not None and not Path(config).is_file():
        from ..errors import InputError

        raise InputError(f"{config}: pruning config not found (--config)")
    if budget is not None:
        from dataclasses import replace

        from .config import PrunerConfig

        base = PrunerConfig.load(config) if config is not None else PrunerConfig.coerce(DEFAULT_BUDGET_CONFIG)
        config = replace(base, budget=budget)
    _import_command_line_paths(args)
    loaded = load_from_args(args)
    outcome = prune_loaded(
        loaded,
        config,
        data=args.data,
        epochs=epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        optimizer_kwargs=dict(args.optimizer_args),
        criterion=args.criterion,
        criterion_kwargs=dict(args.criterion_args),
        lr_scheduler=args.lr_scheduler,
        lr_scheduler_kwargs=dict(args.lr_scheduler_args),
        lr_scheduler_interval=args.lr_scheduler_interval,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        progress=not args.no_progress,
        output=out,
        force=args.force,
    )
    if outcome.output is not None:
        _print(outcome.lines)
    if outcome.budget is not None and not outcome.budget_met and args.strict:
        from ..errors import ValidationFailed
        from .budget import summary_line

        what = summary_line(outcome.budget).removeprefix("budget:").strip()
        raise ValidationFailed(f"{out}: budget {what} (--strict)")
    return EXIT_OK


DEFAULT_BUDGET_CONFIG = {"global_config": {"granularity": "channel+head", "criterion": "l1"},
                         # not default layer types: transformers' Conv1D (GPT-2's layers) is a Linear stored
                         # (in, out); nn.MultiheadAttention (torchvision's ViT) holds its heads in in_proj_weight
                         "module_type_configs": {"Conv1D": {"granularity": "channel+head", "criterion": "l1"},
                                                 "MultiheadAttention": {"granularity": "head", "criterion": "l1"}}}


def _budget_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~deployprune.pruning.budget.Budget` of --budget and its runtime options (None without)."""
    extras = [o for o, v in (("--budget-threads", args.budget_threads), ("--budget-batch", args.budget_batch),
                             ("--cost-table", args.cost_table)) if v is not None]
    if args.budget is None:
        if extras:
            raise UsageError(f"{extras[0]} needs --budget (e.g. --budget latency=0.5x)")
        return None
    from dataclasses import replace

    from ..costmodel import RuntimeSetting
    from .budget import parse_budget

    budget = parse_budget(args.budget)
    for opt, v in (("--budget-threads", args.budget_threads), ("--budget-batch", args.budget_batch)):
        if v is not None and v < 1:
            raise UsageError(f"{opt} {v}: must be at least 1")
    setting = RuntimeSetting(threads=args.budget_threads or 1, batch=args.budget_batch)
    return replace(budget, setting=setting, cost_table=args.cost_table)


def cmd_run(args: argparse.Namespace) -> int:
    from ..training import run_scenario

    outcome = run_scenario(args.scenario, progress=not args.no_progress, force=args.force,
                           trust=args.trust_scenario, allow_outside=args.allow_outside)
    _print(outcome.lines)
    if outcome.exit_code:
        from ..errors import ValidationFailed

        raise ValidationFailed(f"{args.scenario}: the exported artifact failed validation (see the report)")
    return EXIT_OK
