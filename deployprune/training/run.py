"""``prune`` and ``run`` (scenario) flows over a loaded model: prune -> fine-tune -> save -> export.

Used by the CLI (``deployprune/pruning/cli.py``) and callable from Python.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .._imports import MODEL_FACTORY, check_file_callable, check_file_kwargs, load_yaml
from ..accuracy import check_data_fits
from ..errors import ConfigError, DeployPruneError, InputError, UnsupportedError, UsageError
from .loop import TrainResult, _build, evaluate, finetune, import_object

log = logging.getLogger("deployprune.training")


@dataclass
class PruneOutcome:
    """Result of :func:`prune_loaded`: the model still carries the pruner's masks."""

    model: nn.Module
    pruner: Any
    train: TrainResult | None
    accuracy_before: float | None = None
    output: Path | None = None
    lines: list[str] = field(default_factory=list)
    budget: dict[str, Any] | None = None  # Pruner.budget_report() of the final masks, with a budget

    @property
    def budget_met(self) -> bool | None:
        return None if self.budget is None else bool(self.budget.get("met"))

    @property
    def accuracy_after(self) -> float | None:
        return self.train.final_val_accuracy if self.train is not None else None


def _is_main_process() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def prune_loaded(
    loaded: Any,
    config: Any,
    *,
    data: Any = None,
    epochs: int = 0,
    batch_size: int = 32,
    lr: float | None = None,
    optimizer: str = "torch.optim.Adam",
    optimizer_kwargs: Mapping[str, Any] | None = None,
    criterion: str = "torch.nn.CrossEntropyLoss",
    criterion_kwargs: Mapping[str, Any] | None = None,
    lr_scheduler: str | None = None,
    lr_scheduler_kwargs: Mapping[str, Any] | None = None,
    lr_scheduler_interval: str = "epoch",
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    output: str | os.PathLike | None = None,
    force: bool = False,
) -> PruneOutcome:
    """Prune ``loaded`` (a :class:`deployprune.io.LoadedModel`) by ``config`` and fine-tune it on
    ``data`` (``"digits"``, ``"pkg.mod:fn"`` or a ``(train_loader, val_loader)`` pair) for
    ``epochs`` epochs; with ``output``, write the model and its masks as a deployprune
    checkpoint (rank 0 only). Without data (or with 0 epochs) the schedule is run to its end on
    the loaded weights: one-shot pruning."""
    from ..fsutil import check_writable
    from ..pruning import Pruner

    if loaded.masks:
        raise UsageError(f"{loaded.source}: already carries masks; export/finalize it, or prune the unmasked model")
    if loaded.compact:
        log.info("%s: is a compacted model; pruning it again", loaded.source)
    hf_masks_only = loaded.kind == "hf"  # a model directory: the output is its masks file
    if hf_masks_only and epochs > 0:
        raise UnsupportedError(f"{loaded.source}: fine-tuning a Hugging Face model directory is not supported by "
                               "prune (its new weights would need a new directory); prune it one-shot (no --epochs) "
                               "and export it with --masks")
    if output is not None:
        if loaded.arch is None and loaded.factory is None and not hf_masks_only:
            raise UnsupportedError(f"{loaded.source}: a {loaded.kind} model cannot be saved as a deployprune "
                                   "checkpoint; load a checkpoint or a state_dict with --model package.module:factory")
        check_writable(output, force=force)
    if epochs < 0:
        raise UsageError(f"--epochs {epochs}: must be 0 or more")
    okw = dict(optimizer_kwargs or {})
    if lr is not None:
        if lr <= 0:
            raise UsageError(f"--lr {lr}: must be positive")
        okw["lr"] = lr
    # import paths fail before loading data or touching the model
    import_object(optimizer, "optimizer")
    import_object(criterion, "criterion")
    if lr_scheduler is not None:
        import_object(lr_scheduler, "lr_scheduler")

    from .. import progress as _progress

    train_loader = val_loader = None
    if data is not None:
        if isinstance(data, str):
            from ..data import load_data

            if progress and _is_main_process():
                _progress.note(f"loading data {data}")
            train_loader, val_loader = load_data(data, batch_size=batch_size, seed=seed)
        else:
            train_loader, val_loader = data
    elif epochs > 0:
        raise UsageError(f"--epochs {epochs} needs training data: pass --data digits or --data package.module:fn")

    model = loaded.model
    label = f"--data {data}" if isinstance(data, str) else "data"
    for loader, role in ((train_loader, "training"), (val_loader, "validation")):
        if loader is not None:
            check_data_fits(model, loader, f"{label} ({role} data)", loaded.example_inputs)
    lines: list[str] = []
    acc_before = None
    if val_loader is not None:
        acc_before = evaluate(model, val_loader)["accuracy"]
        if acc_before is not None:
            lines.append(f"accuracy:   {acc_before:.4f} before pruning (validation data)")

    # data-driven criteria (apoz, mean_activation, taylor) read batches of the training data
    loss_fn = _build(criterion, "criterion", (), criterion_kwargs) if train_loader is not None else None
    pruner = Pruner(model, config, loaded.example_inputs, data=train_loader, loss_fn=loss_fn)
    result = None
    if epochs > 0 and train_loader is not None:
        result = finetune(model, pruner, train_loader, val_loader, epochs=epochs, optimizer=optimizer,
                          optimizer_kwargs=okw, criterion=criterion, criterion_kwargs=criterion_kwargs,
                          checkpoint_dir=checkpoint_dir, resume=resume, seed=seed, progress=progress,
                          force=force, lr_scheduler=lr_scheduler, lr_scheduler_kwargs=lr_scheduler_kwargs,
                          lr_scheduler_interval=lr_scheduler_interval)
        if result.resumed_from_epoch is not None:
            done = result.resumed_from_epoch
            restored = "epoch 1 below is" if done == 1 else f"epochs 1-{done} below are"
            lines.append(f"resumed:    {result.checkpoint} after epoch {done} of {epochs}"
                         + (f" ({restored} from the checkpoint)" if done else ""))
        elif resume and checkpoint_dir is not None:
            lines.append(f"resumed:    nothing: no checkpoint in {checkpoint_dir}; trained from epoch 1")
        for row in result.history:
            acc = row.get("val_accuracy")
            lines.append(f"epoch {row['epoch']:>3}: train loss {row['train_loss']:.4f}"
                         + (f", val accuracy {acc:.4f}" if acc is not None else "")
                         + f", sparsity {row['sparsity']:.1%}, step {row['step']}")
    else:
        pruner.prepare()
        last = pruner.schedule.last_update_step
        if last is not None and last > 0:
            what = f"pruning: running the schedule to its last update step ({last}) on the loaded weights"
            shown = progress and _is_main_process()
            with _progress.stage(what) if shown else contextlib.nullcontext():
                if not shown:
                    log.info("%s", what)
                while pruner.step_count < last:
                    pruner.step()
        if val_loader is not None:
            acc = evaluate(model, val_loader)["accuracy"]
            if acc is not None:
                lines.append(f"accuracy:   {acc:.4f} after one-shot pruning (no fine-tuning)")
    model.eval()
    lines.extend(pruner.summary().splitlines())
    budget = None
    if pruner.config.budget is not None and _is_main_process():
        from ..pruning.budget import summary_line

        budget = pruner.budget_report(measure=True)  # the final masks, compacted and measured
        lines.append(summary_line(budget))
    outcome = PruneOutcome(model=model, pruner=pruner, train=result, accuracy_before=acc_before, lines=lines,
                           budget=budget)
    if output is not None and _is_main_process() and hf_masks_only:
        _save_hf_masks(output, pruner.masks(), force=force)
        outcome.output = Path(output)
        lines.append(f"pruned:     {output} (masks of {loaded.source}, named after its modules; "
                     f"deployprune export {loaded.source} --masks {output} ...)")
    elif output is not None and _is_main_process():
        from ..io import save_checkpoint

        meta = {"pruned_by": "deployprune prune", "epochs": epochs, "seed": seed}
        if outcome.accuracy_after is not None:
            meta["val_accuracy"] = float(outcome.accuracy_after)
        if budget is not None:
            meta["budget"] = budget
        save_checkpoint(output, model, force=force, arch=loaded.arch,
                        factory=None if loaded.arch else loaded.factory, input_shapes=loaded.input_shapes or None,
                        meta=meta)
        outcome.output = Path(output)
        lines.append(f"pruned:     {output} (deployprune checkpoint with masks)")
    return outcome


def _save_hf_masks(output: str | os.PathLike, masks: Mapping[str, Any], *, force: bool) -> None:
    """NNI masks named after the library model's modules (without the view's ``model.`` prefix), as
    ``deployprune export DIR --masks FILE`` reads them; written atomically (weights-only loadable)."""
    import io as _io

    import torch

    from ..fsutil import write_bytes_atomic
    from ..hf import PREFIX

    plain = {(name[len(PREFIX):] if name.startswith(PREFIX) else name): {k: v.detach().cpu().bool()
                                                                          for k, v in per.items()}
             for name, per in masks.items()}
    buf = _io.BytesIO()
    torch.save(plain, buf)
    write_bytes_atomic(output, buf.getvalue(), force=force)


# --------------------------------------------------------------------------------------------
# Scenario files
# --------------------------------------------------------------------------------------------

SCENARIO_KEYS = {
    "model": "model file, or {path, factory, input_shapes, trust_pickle}",
    "pruning": "pruning config (dict, NNI config_list, or a .json/.yaml path)",
    "data": "'digits' or package.module:function returning (train_loader, val_loader)",
    "finetuning": "{epochs, batch_size, learning_rate, optimizer, optimizer_kwargs, criterion, criterion_kwargs, "
                  "lr_scheduler, lr_scheduler_kwargs, lr_scheduler_interval, seed, checkpoint_dir, resume}",
    "output": "path of the pruned deployprune checkpoint",
    "export": "{target, path, options, validate, thresholds, n_inputs, latency}",
    "force": "overwrite existing outputs (only together with --force on the command line)",
    "description": "free text",
}
MODEL_KEYS = ("path", "factory", "input_shapes", "trust_pickle")
FINETUNE_KEYS = ("epochs", "batch_size", "learning_rate", "optimizer", "optimizer_kwargs", "criterion",
                 "criterion_kwargs", "lr_scheduler", "lr_scheduler_kwargs", "lr_scheduler_interval", "seed",
                 "checkpoint_dir", "resume")
EXPORT_KEYS = ("target", "path", "options", "validate", "thresholds", "n_inputs", "latency")


@dataclass
class ScenarioOutcome:
    prune: PruneOutcome | None
    export: Any = None
    accuracy_compact: float | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return self.export.exit_code if self.export is not None else 0


def _check_keys(obj: Any, allowed: Sequence[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{where}: expected an object, got {type(obj).__name__}")
    import difflib

    for key in obj:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")
    return dict(obj)


def load_scenario(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a scenario file (JSON, or YAML by suffix); paths stay relative to its folder."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: scenario file not found")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        kind = "YAML" if p.suffix.lower() in (".yaml", ".yml") else "JSON"
        raise ConfigError(f"{p}: not valid {kind} (not UTF-8 text); save the scenario as UTF-8") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read the scenario file ({exc.strerror or exc})") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):

            obj = load_yaml(text)
        else:
            obj = json.loads(text)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{p}: not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                          f"({' '.join(str(exc).split())[:160]})") from None
    sc = _check_keys(obj, list(SCENARIO_KEYS), str(p))
    for required in ("model", "pruning", "output"):
        if required not in sc:
            raise ConfigError(f"{p}: missing key {required!r} ({SCENARIO_KEYS[required]})")
    return sc


def _check_inside(target: Path, folder: Path, key: str) -> None:
    """ConfigError unless ``target`` (symlinks resolved) lies in ``folder`` or below it."""
    try:
        inside = target.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise ConfigError(f"{key}: {target} is outside the scenario's folder {folder.resolve()}; a scenario file "
                          "writes only inside its own folder unless you pass --allow-outside "
                          "(run_scenario(allow_outside=True))")


_FACTORY_HINT = re.compile(r"pass (?:the architecture with )?--model package\.module:factory"
                           r"(?: \(e\.g\. --model ([^)\s]+)\))?")
_TRUST_HINT = re.compile(r"rerun with --trust-pickle(?: \(allow_pickle=True\))?")


def _as_scenario_error(exc: DeployPruneError, scenario: Path, model_path: str) -> DeployPruneError:
    """``load_model``'s error worded for a scenario: what to write in its ``"model"``, not the flags of
    ``deployprune export``, which ``deployprune run`` does not take."""
    msg = str(exc)

    def factory(m: re.Match[str]) -> str:
        example = f" (e.g. {m.group(1)})" if m.group(1) else ""
        return (f'name the architecture in {scenario}: "model": {{"path": "{model_path}", '
                f'"factory": "package.module:function"}}{example}')

    fixed = _TRUST_HINT.sub(f'set "trust_pickle": true in the "model" of {scenario}', _FACTORY_HINT.sub(factory, msg))
    if fixed == msg:
        return exc
    try:
        return type(exc)(fixed)
    except Exception:  # noqa: BLE001 - an error class with another signature keeps its message
        return exc


def run_scenario(path: str | os.PathLike, *, progress: bool = True, force: bool | None = None,
                 trust: bool = False, allow_outside: bool = False) -> ScenarioOutcome:
    """prune -> fine-tune -> save -> finalize -> export -> validate, as a scenario file describes.

    What the file may not decide alone (the caller's flags): replacing existing outputs (``force``,
    CLI ``--force``; the file's own ``force: true`` is not enough), writing outside the scenario's
    folder (``allow_outside``, CLI ``--allow-outside``), and naming callables off the allowlists or
    unpickling its model (``trust``, CLI ``--trust-scenario``).
    """
    from ..io import canonical_factory, load_model

    p = Path(path)
    sc = load_scenario(p)
    base = p.parent

    def rel(value: Any) -> Any:
        if isinstance(value, str) and value and not os.path.isabs(value):
            return str(base / value)
        return value

    force = bool(force)
    if sc.get("force") and not force:
        log.info("%s: 'force: true' in the scenario file is not enough to replace existing outputs; "
                    "pass --force on the command line (run_scenario(force=True))", p)
    model_spec = sc["model"]
    if isinstance(model_spec, str):
        model_spec = {"path": model_spec}
    model_spec = _check_keys(model_spec, MODEL_KEYS, f"{p}: model")
    if "path" not in model_spec:
        raise ConfigError(f"{p}: model: missing key 'path'")
    ft = _check_keys(sc.get("finetuning", {}), FINETUNE_KEYS, f"{p}: finetuning")
    exp = _check_keys(sc.get("export", {}), EXPORT_KEYS, f"{p}: export") if sc.get("export") is not None else None
    config = sc["pruning"]
    if isinstance(config, str):
        config = rel(config)
    out = Path(rel(sc["output"]))

    # a scenario file must not choose code to run or opt itself into unpickling (--trust-scenario)
    if isinstance(model_spec.get("factory"), str):  # the zoo's old spelling models.<family>:... is the zoo
        model_spec["factory"] = canonical_factory(model_spec["factory"], from_file=True)
    # Callables come from per-role allowlists (never whole namespaces) and get plain-data keyword
    # arguments for parameters they declare: torch.load with weights_only=false, or a torch internal
    # that compiles source, must not be one scenario line away.
    flag = "--trust-scenario (run_scenario(trust=True))"
    for key, value, role in (("model.factory", model_spec.get("factory"), MODEL_FACTORY),
                             ("data", sc.get("data"), "data"),
                             ("finetuning.optimizer", ft.get("optimizer"), "optimizer"),
                             ("finetuning.criterion", ft.get("criterion"), "criterion"),
                             ("finetuning.lr_scheduler", ft.get("lr_scheduler"), "lr_scheduler")):
        if key != "data" or (isinstance(value, str) and ":" in value):
            check_file_callable(value, f"{p}: {key}", role, trusted=trust, flag=flag)
    for key, default in (("optimizer", "torch.optim.Adam"), ("criterion", "torch.nn.CrossEntropyLoss"),
                         ("lr_scheduler", None)):
        target = ft.get(key, default)
        if not trust and isinstance(target, str) and ft.get(f"{key}_kwargs") is not None:
            check_file_kwargs(import_object(target, key), ft[f"{key}_kwargs"], f"{p}: finetuning.{key}_kwargs",
                              trusted=trust, flag=flag)
    if model_spec.get("trust_pickle") and not trust:
        raise ConfigError(f"{p}: model.trust_pickle: a scenario file cannot opt itself into unpickling code; "
                          f"pass {flag} if you trust it")
    from ..pipeline import check_not_input

    inputs = [p, Path(rel(model_spec["path"]))] + ([Path(config)] if isinstance(config, str) else [])
    check_not_input(out, *inputs)
    ckdir_value = ft.get("checkpoint_dir")
    if ckdir_value:
        from .loop import CHECKPOINT_NAME

        check_not_input(Path(rel(ckdir_value)) / CHECKPOINT_NAME, *inputs)

    art: Path | None = None
    if exp is not None:  # fail before training if the artifact cannot be written
        from .. import converters
        from ..pipeline import default_output, target_suffix

        converters.get(exp.get("target", "onnx"))
        art = (Path(rel(exp["path"])) if exp.get("path")
               else default_output(out, target_suffix(exp.get("target", "onnx")), directory=out.parent))
    # every output stays inside the scenario's folder unless the command line allows more
    if not allow_outside:
        written = [("output", out)] + ([("export.path", art)] if art is not None else [])
        if ckdir_value:
            written.append(("finetuning.checkpoint_dir", Path(rel(ckdir_value))))
        for key, target in written:
            _check_inside(target, base, f"{p}: {key}")
    if art is not None:
        from ..fsutil import check_writable

        check_not_input(art, *inputs, out)
        check_not_input(art.with_name(art.name + ".report.json"), *inputs, out)
        check_writable(art, force=force)

    try:
        loaded = load_model(rel(model_spec["path"]), model_factory=model_spec.get("factory"),
                            allow_pickle=bool(model_spec.get("trust_pickle", False)),
                            input_shapes=model_spec.get("input_shapes"))
    except DeployPruneError as exc:
        raise _as_scenario_error(exc, p, str(model_spec["path"])) from exc.__cause__
    data = sc.get("data")
    if data is not None and not isinstance(data, str):
        raise ConfigError(f"{p}: data: expected 'digits' or 'package.module:function', got {type(data).__name__}")
    batch_size = int(ft.get("batch_size", 32))
    seed = int(ft.get("seed", 0))
    data_pair = None
    if data is not None:
        from .. import progress as _progress
        from ..data import load_data

        if progress and _is_main_process():
            _progress.note(f"loading data {data}")
        data_pair = load_data(data, batch_size=batch_size, seed=seed)
    ckdir = ft.get("checkpoint_dir")
    pr = prune_loaded(loaded, config, data=data_pair, epochs=int(ft.get("epochs", 0)), batch_size=batch_size,
                      lr=ft.get("learning_rate"), optimizer=ft.get("optimizer", "torch.optim.Adam"),
                      optimizer_kwargs=ft.get("optimizer_kwargs"), criterion=ft.get("criterion",
                                                                                     "torch.nn.CrossEntropyLoss"),
                      criterion_kwargs=ft.get("criterion_kwargs"), lr_scheduler=ft.get("lr_scheduler"),
                      lr_scheduler_kwargs=ft.get("lr_scheduler_kwargs"),
                      lr_scheduler_interval=ft.get("lr_scheduler_interval", "epoch"), seed=seed,
                      checkpoint_dir=rel(ckdir) if ckdir else None, resume=bool(ft.get("resume", False)),
                      progress=progress, output=out, force=force)
    outcome = ScenarioOutcome(prune=pr, lines=list(pr.lines))
    if exp is None or not _is_main_process():
        return outcome

    from ..pipeline import compact_loaded, run_export

    pruned = load_model(out)
    if data_pair is not None and data_pair[1] is not None:
        comp = compact_loaded(pruned)
        acc = evaluate(comp.model, data_pair[1])["accuracy"]
        outcome.accuracy_compact = acc
        if acc is not None:
            outcome.lines.append(f"accuracy:   {acc:.4f} after finalize (compact model, validation data)")
    thresholds = exp.get("thresholds")
    res = run_export(pruned, exp.get("target", "onnx"), art,
                     options=exp.get("options") or {}, force=force, validate=bool(exp.get("validate", True)),
                     thresholds=thresholds, n_inputs=int(exp.get("n_inputs", 8)),
                     latency=bool(exp.get("latency", True)),
                     # the report's accuracy section: the run's own figures on the same validation data,
                     # then source and artifact measured by validate
                     accuracy_data=data_pair[1] if data_pair is not None else None,
                     accuracy_label=data if data_pair is not None and data_pair[1] is not None else None,
                     accuracy_known={"before pruning": pr.accuracy_before})
    outcome.export = res
    outcome.lines.extend(res.summary_lines())
    return outcome


__all__ = ["PruneOutcome", "ScenarioOutcome", "load_scenario", "prune_loaded", "run_scenario"]
