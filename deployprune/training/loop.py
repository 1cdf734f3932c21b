"""The fine-tuning loop: one pruner step per optimizer step, evaluation and a checkpoint per epoch.

Exact resume: the checkpoint written after every epoch holds the model (with its mask
buffers), the optimizer, the pruner state (schedule step, masks, unit state), the epoch and
step counters and the python / numpy / torch RNG states taken *after* the epoch's evaluation.
The shuffle order of epoch ``e`` comes from the loader's generator re-seeded with
``loader_seed(seed, e)`` (or ``DistributedSampler.set_epoch(e)``), so a resumed run draws
exactly the batches the uninterrupted run would have drawn.

Distributed: when the process runs under ``torchrun`` (``WORLD_SIZE`` > 1) or a process group
is already initialised, the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on
CUDA), the training loader is re-built around a :class:`DistributedSampler`, the pruner state is
broadcast from rank 0 after every mask update (so data-driven criteria cannot diverge), and
only rank 0 writes files.

Progress: one line per epoch when it ends (``[12.3s] epoch 2/10: train loss 0.4100, val accuracy
0.9300, sparsity 40.0%, step 90``), a line when a run resumes, and inside an epoch that takes
long an occasional ``step k/N`` line (at most one every :data:`STEP_LINE_EVERY` seconds), through
:mod:`deployprune.progress` (shown by the command line on stderr unless ``-q``; silent in library
use at Python's default logging level). On a terminal a tqdm bar replaces the step lines.
``progress=False`` and ranks other than 0 print none of them.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import progress as _progress
from .._imports import import_callable
from ..accuracy import split_batch
from ..errors import ConfigError, DeployPruneError, InputError, OutputError, UsageError, one_line
from ..fsutil import atomic_output

log = logging.getLogger("deployprune.training")

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "deployprune-train"
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Import paths
# --------------------------------------------------------------------------------------------


def import_object(path: str, what: str) -> Any:
    """Resolve ``package.module.Name`` or ``package.module:Name`` (``what`` names the option in errors)."""
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"{what}: expected an import path such as torch.optim.Adam, got {path!r}")
    path = path.strip()
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise ConfigError(f"{what} {path!r}: not an import path; write package.module.Name (e.g. torch.optim.Adam)")
    return import_callable(module_name, attr_path, label=f"{what} {path!r}", error=ConfigError)


def _build(path: Any, what: str, args: tuple, kwargs: Mapping[str, Any] | None, *, name: Any = None) -> Any:
    factory = import_object(path, what) if isinstance(path, str) else path
    if not callable(factory):
        raise ConfigError(f"{what}: expected an import path or a callable, got {type(path).__name__}")
    try:
        return factory(*args, **dict(kwargs or {}))
    except DeployPruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - wrong kwargs etc.
        name = name if isinstance(name, str) else path if isinstance(path, str) else getattr(
            path, "__qualname__", repr(path))
        msg = one_line(exc, 200)
        raise ConfigError(f"{what} {name}: cannot be created with {dict(kwargs or {})} ({type(exc).__name__}: {msg})"
                          ) from None


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    mask_sync_differences: int = 0  # distributed: mask tensors that differed from rank 0's before syncing
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def _setup_distributed() -> _Dist:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(True, dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Dist()
    if not dist.is_available():
        raise UsageError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local)
    log.info("distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return _Dist(True, dist.get_rank(), dist.get_world_size(), local, True)


def _teardown_distributed(clean_exit: bool) -> None:
    """Destroy the process group finetune created, without racing the other ranks.

    The DistributedDataParallel wrapper (and its reducer, which holds the gloo/nccl backend)
    can be kept alive by reference cycles; collected only at interpreter exit, the backend's
    worker threads are torn down mid-finalisation and the process aborts ("terminate called
    without an active exception", seen once in CI on a two-rank run). Collect them now, while
    the group still exists, and let every rank reach this point before any rank closes its
    connections. After a failure the other ranks may never arrive, so no barrier then.
    """
    import gc

    gc.collect()
    if clean_exit:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    gc.collect()


def _distributed_loader(loader: Any, dist_info: _Dist, seed: int) -> Any:
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    if not isinstance(loader, DataLoader):
        raise UsageError("distributed fine-tuning needs the training data as a torch DataLoader "
                         f"(got {type(loader).__name__})")
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if loader.batch_size is None:
        raise UsageError("distributed fine-tuning: the training DataLoader must use batch_size (not a batch_sampler)")
    sampler = DistributedSampler(loader.dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
                                 drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last)


# --------------------------------------------------------------------------------------------
# Batches, evaluation
# --------------------------------------------------------------------------------------------


_split_batch = split_batch  # one definition, shared with validate --data (deployprune.accuracy)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


def _correct(output: Any, target: Any) -> int | None:
    if not (isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor)):
        return None
    if output.ndim != 2 or target.ndim != 1 or target.dtype.is_floating_point:
        return None
    return int((output.argmax(1) == target).sum())


def evaluate(model: nn.Module, loader: Iterable[Any], criterion: Any = None, *,
             device: str | torch.device | None = None) -> dict[str, float | None]:
    """Mean loss (when ``criterion`` is given) and top-1 accuracy (class-index targets) over ``loader``.

    The model's train/eval mode is restored afterwards.
    """
    dev = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total, correct, loss_sum, counted = 0, 0, 0.0, True
    try:
        with torch.no_grad():
            for batch in loader:
                inputs, target = _split_batch(batch, "validation data")
                inputs, target = _to(inputs, dev), _to(target, dev)
                out = model(*inputs)
                n = int(target.shape[0]) if isinstance(target, torch.Tensor) and target.ndim else 1
                if criterion is not None:
                    loss_sum += float(criterion(out, target)) * n
                c = _correct(out, target)
                if c is None:
                    counted = False
                else:
                    correct += c
                total += n
    finally:
        model.train(was_training)
    if total == 0:
        return {"loss": None, "accuracy": None, "samples": 0}
    return {
        "loss": loss_sum / total if criterion is not None else None,
        "accuracy": correct / total if counted else None,
        "samples": total,
    }


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# RNG state and checkpoints
# --------------------------------------------------------------------------------------------


def loader_seed(seed: int, epoch: int) -> int:
    """The seed of the training loader's shuffle in ``epoch`` (a pure function: resumable)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2**63 - 1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
        "has_gauss": int(n["has_gauss"]),
        "gauss": float(n["gauss"]),
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_loader(loader: Any, seed: int, epoch: int) -> int | None:
    """Make the loader's shuffle of ``epoch`` a function of (seed, epoch); returns the seed used."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
        return int(getattr(sampler, "seed", 0))
    gen = getattr(loader, "generator", None)
    s = loader_seed(seed, epoch)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(s)
        return s
    sgen = getattr(sampler, "generator", None)
    if isinstance(sgen, torch.Generator):
        sgen.manual_seed(s)
        return s
    return None  # shuffle (if any) follows the global torch RNG, which the checkpoint restores


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        msg = one_line(exc, 160)
        raise InputError(f"{path}: cannot read the training checkpoint ({type(exc).__name__}: {msg}); "
                         "delete it or start without --resume") from None
    if not isinstance(obj, Mapping) or obj.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a deployprune training checkpoint; choose another --checkpoint-dir")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"{path}: training checkpoint version {obj.get('version')!r} is not supported "
                         f"(expected {CHECKPOINT_VERSION})")
    return dict(obj)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`finetune` did. ``history`` has one dict per epoch run in this process or
    restored from the checkpoint (epoch, step, train_loss, val_loss, val_accuracy, seconds)."""

    epochs: int
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int | None = None
    checkpoint: Path | None = None
    rank: int = 0
    world_size: int = 1
    mask_sync_differences: int = 0  # distributed: mask tensors that differed from rank 0's before syncing

    @property
    def final_val_accuracy(self) -> float | None:
        return self.history[-1].get("val_accuracy") if self.history else None

    @property
    def final_val_loss(self) -> float | None:
        return self.history[-1].get("val_loss") if self.history else None


#: Inside an epoch, at most one ``step k/N`` progress line every this many seconds (none in an epoch
#: that ends sooner): enough to show a long epoch is moving, never one line per batch.
STEP_LINE_EVERY = max(5.0, _progress.SLOW)

_now = time.perf_counter  # the clock of the step lines (a test replaces it)


def _bar_enabled(show: bool) -> bool:
    """A tqdm bar (instead of step lines) when the progress lines are on and stderr is a terminal.

    Progress silenced on purpose (``-q``, ``DEPLOYPRUNE_PROGRESS=0``: the ``deployprune.progress``
    logger set above INFO) hides the bar too; in library use (logger level not set) a terminal
    still gets it."""
    if not show:
        return False
    level = _progress.log.level
    if level != logging.NOTSET and level > logging.INFO:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _say(show: bool, message: str) -> None:
    """A progress line when progress is on for this rank, else (once, not twice) a log.info."""
    if show:
        _progress.note(message)
    else:
        log.info("%s", message)


def epoch_line(row: Mapping[str, Any], epochs: int) -> str:
    """``epoch 2/10: train loss 0.4100, val accuracy 0.9300, sparsity 40.0%, step 90`` for a history row."""
    parts = [f"train loss {_fmt(row.get('train_loss'))}"]
    if row.get("val_accuracy") is not None:
        parts.append(f"val accuracy {row['val_accuracy']:.4f}")
    elif row.get("val_loss") is not None:  # no accuracy (e.g. regression targets): the validation loss
        parts.append(f"val loss {_fmt(row['val_loss'])}")
    if row.get("sparsity") is not None:
        parts.append(f"sparsity {row['sparsity']:.1%}")
    parts.append(f"step {row.get('step')}")
    return f"epoch {row.get('epoch')}/{epochs}: " + ", ".join(parts)


def finetune(
    model: nn.Module,
    pruner: Any,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    epochs: int,
    optimizer: Any = "torch.optim.Adam",
    optimizer_kwargs: Mapping[str, Any] | None = None,
    criterion: Any = "torch.nn.CrossEntropyLoss",
    criterion_kwargs: Mapping[str, Any] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    lr_scheduler: Any = None,
    lr_scheduler_kwargs: Mapping[str, Any] | None = None,
    lr_scheduler_interval: str = "epoch",
    device: str | torch.device | None = None,
    force: bool = False,
) -> TrainResult:
    """Train ``model`` for ``epochs`` epochs, calling ``pruner.step()`` after every optimizer step.

    ``pruner``: a :class:`deployprune.Pruner` built on ``model`` (prepared here if needed), or
    ``None`` for plain training. ``optimizer`` / ``criterion``: import paths (``torch.optim.SGD``)
    or callables, built as ``optimizer(model.parameters(), **optimizer_kwargs)`` and
    ``criterion(**criterion_kwargs)``. Batches are ``(inputs, target)``.

    ``checkpoint_dir``: a checkpoint ``last.pt`` is written there (atomically) after every epoch;
    an existing one is refused unless ``resume`` (continue it exactly) or ``force`` (start over).
    The global RNGs are seeded with ``seed`` at the start of a fresh run.

    ``lr_scheduler``: optional import path or callable (``torch.optim.lr_scheduler.CosineAnnealingLR``),
    built as ``lr_scheduler(optimizer, **lr_scheduler_kwargs)`` and stepped after every epoch
    (``lr_scheduler_interval="epoch"``) or every optimizer step (``"step"``); its state is part of
    the checkpoint.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"finetune: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(epochs, int) or epochs < 0:
        raise UsageError(f"finetune: epochs must be a non-negative integer, got {epochs!r}")
    if pruner is not None and getattr(pruner, "model", model) is not model:
        raise UsageError("finetune: the pruner was built on another model; pass the model given to the Pruner")
    # resolve the import paths first: a typo must fail before any work
    opt_factory = import_object(optimizer, "optimizer") if isinstance(optimizer, str) else optimizer
    crit = _build(criterion, "criterion", (), criterion_kwargs)
    # wrong optimizer kwargs must also fail before the model is touched: try them on a dummy parameter
    dummy_opt = _build(opt_factory, "optimizer", ([nn.Parameter(torch.zeros(1))],), optimizer_kwargs, name=optimizer)
    sched_factory = None
    if lr_scheduler is not None:
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ConfigError(f"lr_scheduler_interval: expected 'epoch' or 'step', got {lr_scheduler_interval!r}")
        sched_factory = import_object(lr_scheduler, "lr_scheduler") if isinstance(lr_scheduler, str) else lr_scheduler
        if isinstance(dummy_opt, torch.optim.Optimizer):
            _build(sched_factory, "lr_scheduler", (dummy_opt,), lr_scheduler_kwargs, name=lr_scheduler)

    dist_info = _setup_distributed()
    clean_exit = False
    try:
        result = _finetune(model, pruner, train_loader, val_loader, epochs=epochs, opt_factory=opt_factory,
                         optimizer_name=optimizer, optimizer_kwargs=optimizer_kwargs, crit=crit,
                         checkpoint_dir=checkpoint_dir, resume=resume, seed=seed, progress=progress,
                         device=device, force=force, dist_info=dist_info, sched_factory=sched_factory,
                         sched_name=lr_scheduler, sched_kwargs=lr_scheduler_kwargs,
                         sched_per_step=lr_scheduler_interval == "step")
        clean_exit = True
        return result
    finally:
        if dist_info.owns_group:
            _teardown_distributed(clean_exit)


def _finetune(model: nn.Module, pruner: Any, train_loader: Iterable[Any], val_loader: Iterable[Any] | None, *,
              epochs: int, opt_factory: Any, optimizer_name: Any, optimizer_kwargs: Mapping[str, Any] | None,
              crit: Any, checkpoint_dir: str | os.PathLike | None, resume: bool, seed: int, progress: bool,
              device: str | torch.device | None, force: bool, dist_info: _Dist, sched_factory: Any = None,
              sched_name: Any = None, sched_kwargs: Mapping[str, Any] | None = None,
              sched_per_step: bool = False) -> TrainResult:
    from tqdm.auto import tqdm

    if device is None:
        dev = torch.device(f"cuda:{dist_info.local_rank}") if (dist_info.enabled and torch.cuda.is_available()) \
            else _model_device(model)
    else:
        dev = torch.device(device)
    model.to(dev)

    ckpt_path: Path | None = None
    state: dict[str, Any] | None = None
    if checkpoint_dir is not None:
        cdir = Path(checkpoint_dir)
        ckpt_path = cdir / CHECKPOINT_NAME
        if ckpt_path.exists():
            if resume:
                state = _read_checkpoint(ckpt_path)
            elif not force:
                raise OutputError(f"{ckpt_path}: a training checkpoint already exists; pass --resume (resume=True) "
                                  "to continue it, --force to start over, or choose another --checkpoint-dir")
        elif resume and dist_info.is_main:
            log.warning("%s: no checkpoint to resume from; starting at epoch 0", ckpt_path)
        if dist_info.is_main:
            if cdir.exists() and not cdir.is_dir():
                raise OutputError(f"{cdir}: is not a directory; choose another --checkpoint-dir")
            cdir.mkdir(parents=True, exist_ok=True)
    elif resume:
        raise UsageError("resume needs a checkpoint directory (--checkpoint-dir)")

    if state is not None and int(state.get("seed", seed)) != int(seed):
        raise ConfigError(f"{ckpt_path}: was written with seed {state.get('seed')}, not {seed}; resume with the "
                          "same seed (or start over with --force)")
    if state is None:
        _seed_everything(seed)

    if pruner is not None:
        pruner.prepare()
    opt = _build(opt_factory, "optimizer", (model.parameters(),), optimizer_kwargs, name=optimizer_name)
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"optimizer {optimizer_name}: built a {type(opt).__name__}, not a torch.optim.Optimizer")
    sched = _build(sched_factory, "lr_scheduler", (opt,), sched_kwargs, name=sched_name) if sched_factory else None

    start_epoch, global_step = 0, 0
    history: list[dict[str, Any]] = []
    if state is not None:
        try:
            if pruner is not None:  # first: its errors name the config mismatch precisely
                if state.get("pruner") is None:
                    raise InputError(f"{ckpt_path}: was written without a pruner; resume it without one")
                try:
                    pruner.load_state_dict(state["pruner"])
                except DeployPruneError as exc:
                    raise type(exc)(f"{ckpt_path}: {exc}") from None
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if sched is not None:
                if state.get("lr_scheduler") is None:
                    raise InputError(f"{ckpt_path}: was written without an lr_scheduler; resume with the same options")
                sched.load_state_dict(state["lr_scheduler"])
        except DeployPruneError:
            raise
        except Exception as exc:  # noqa: BLE001 - state from another model/config
            msg = one_line(exc, 200)
            raise InputError(f"{ckpt_path}: does not fit this model/optimizer ({type(exc).__name__}: {msg}); "
                             "resume with the model, config and optimizer that wrote it") from None
        start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
        history = [dict(h) for h in state.get("history", [])]
        _set_rng_state(state["rng"])

    train_model: nn.Module = model
    result_syncs = 0
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [dev.index] if dev.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids)
        train_loader = _distributed_loader(train_loader, dist_info, seed)
        if pruner is not None:
            result_syncs = _sync_pruner(pruner, dist_info)

    show = bool(progress) and dist_info.is_main
    bar_on = _bar_enabled(show)
    try:
        n_batches = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        n_batches = None
    per_epoch = f" of {n_batches} steps" if n_batches is not None else ""
    if state is not None:
        left = "; nothing left to train" if start_epoch >= epochs else ""
        _say(show, f"resuming from {ckpt_path}: epoch {start_epoch} of {epochs} done, step {global_step}{left}")
    elif epochs:
        _say(show, f"fine-tuning: {epochs} epoch{'s' if epochs != 1 else ''}{per_epoch}"
             + (f" (world size {dist_info.world_size})" if dist_info.enabled else ""))
    result = TrainResult(epochs=epochs, global_step=global_step, history=history,
                         resumed_from_epoch=start_epoch if state is not None else None, checkpoint=ckpt_path,
                         rank=dist_info.rank, world_size=dist_info.world_size)
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        used_seed = _seed_loader(train_loader, seed, epoch)
        train_model.train()
        loss_sum, n_seen = 0.0, 0
        next_line = _now() + STEP_LINE_EVERY
        bar = tqdm(train_loader, total=n_batches, desc=f"epoch {epoch + 1}/{epochs}", disable=not bar_on,
                   leave=False, dynamic_ncols=True)
        for k, batch in enumerate(bar, 1):
            inputs, target = _split_batch(batch, "training data")
            inputs, target = _to(inputs, dev), _to(target, dev)
            opt.zero_grad(set_to_none=True)
            out = train_model(*inputs)
            loss = crit(out, target)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise ConfigError("criterion: must return a scalar tensor; check --criterion and its arguments")
            loss.backward()
            opt.step()
            if sched is not None and sched_per_step:
                sched.step()
            global_step += 1
            if pruner is not None:
                pruner.step()
                if dist_info.enabled and pruner.schedule.is_update_step(pruner.step_count):
                    result_syncs += _sync_pruner(pruner, dist_info)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise InputError(f"training diverged at epoch {epoch + 1}, step {global_step} (loss {value}); "
                                 "lower the learning rate")
            n = int(target.shape[0]) if isinstance(target, torch.Tensor) and target.ndim else 1
            loss_sum += value * n
            n_seen += n
            if bar_on:
                bar.set_postfix(loss=f"{value:.4f}")
            elif show and _now() >= next_line:
                _progress.note(f"epoch {epoch + 1}/{epochs}: step {k}{'/' + str(n_batches) if n_batches else ''}, "
                               f"train loss {loss_sum / n_seen:.4f}")
                next_line = _now() + STEP_LINE_EVERY
        bar.close()
        if sched is not None and not sched_per_step:
            sched.step()
        train_loss = loss_sum / n_seen if n_seen else None
        if dist_info.enabled and n_seen:
            t = torch.tensor([loss_sum, float(n_seen)], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            train_loss = float(t[0] / t[1])
        metrics = evaluate(model, val_loader, crit, device=dev) if val_loader is not None else {}
        row = {
            "epoch": epoch + 1,
            "step": global_step,
            "train_loss": train_loss,
            "val_loss": metrics.get("loss"),
            "val_accuracy": metrics.get("accuracy"),
            "lr": float(opt.param_groups[0]["lr"]),
            "sparsity": _sparsity(pruner),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        history.append(row)
        _say(show, epoch_line(row, epochs))
        if ckpt_path is not None:
            ckpt = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "epoch": epoch + 1,
                "global_step": global_step,
                "seed": int(seed),
                "loader_seed": used_seed,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": _cpu(opt.state_dict()),
                "lr_scheduler": sched.state_dict() if sched is not None else None,
                "pruner": pruner.state_dict() if pruner is not None else None,
                "rng": _rng_state(),
                "history": [_plain_row(h) for h in history],
                "world_size": dist_info.world_size,
            }
            if dist_info.is_main:
                with atomic_output(ckpt_path, force=True) as tmp, open(tmp, "wb") as fh:
                    torch.save(ckpt, fh)
            dist_info.barrier()
    result.global_step = global_step
    result.mask_sync_differences = result_syncs
    model.eval()
    return result


def _sync_pruner(pruner: Any, dist_info: _Dist) -> int:
    """Put rank 0's pruner state (masks, unit state, collectors) on every rank.

    Returns how many mask tensors on this rank differed from rank 0's before the copy: 0 for
    criteria that read only the weights (DDP keeps them identical); data-driven criteria see
    each rank's own batches and may differ, which is why rank 0's state is authoritative.
    """
    box = [pruner.state_dict() if dist_info.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    if dist_info.is_main:
        return 0
    mine = pruner.masks()
    theirs = box[0]["masks"]
    differ = sum(1 for m, per in mine.items() for p, t in per.items() if not torch.equal(t, theirs[m][p].to(t.dtype)))
    if differ:
        log.debug("rank %d: %d mask tensor(s) differed from rank 0 and were replaced", dist_info.rank, differ)
    pruner.load_state_dict(box[0])
    return differ


def _sparsity(pruner: Any) -> float | None:
    if pruner is None:
        return None
    masks = pruner.masks()
    total = sum(int(m.numel()) for per in masks.values() for m in per.values())
    zeros = sum(int((~m.bool()).sum()) for per in masks.values() for m in per.values())
    return zeros / total if total else 0.0


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _plain_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, float) else v) for k, v in row.items()}


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_cpu(v) for v in obj)
    return obj
