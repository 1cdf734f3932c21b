"""Task accuracy on labelled data: ``validate``/``export``/``run`` with ``--data`` (issue 13).

Parity on random inputs says whether the artifact computes what the source computes; it says
nothing about how good either is at the task. With labelled data the report also gives the
top-1 accuracy of both, measured the same way:

* ``data``: an iterable of ``(inputs, target)`` batches (``inputs`` a tensor or a tuple of tensors,
  ``target`` class indices), e.g. the validation loader of ``--data digits`` or of an entry point
  ``package.module:function`` returning ``(train_loader, val_loader)``;
* the source runs in torch, the artifact in its runtime (onnxruntime for ``.onnx``); a batch
  larger than an artifact's fixed batch size runs in pieces of that size;
* the prediction is the arg-max of the (first) output over classes, which must be ``(batch,
  classes)``; anything else is reported as "not measured" with the reason, never as a number.

A Core ML package cannot run off macOS: there the artifact's accuracy is "not measured" and the
report says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import InputError

#: The batch size of the validation loader made from ``--data`` (evaluation only: no gradients).
EVAL_BATCH = 256


@dataclass
class TaskAccuracy:
    """Top-1 accuracy of source and artifact on ``samples`` labelled samples (``None``: not measured)."""

    source: float | None
    artifact: float | None
    samples: int
    reason: str = ""  # why a figure is missing


def validation_loader(spec: str, *, seed: int = 0, batch_size: int = EVAL_BATCH) -> Iterable[Any]:
    """The labelled validation batches ``--data SPEC`` names (``digits`` or ``package.module:function``)."""
    from .data import load_data

    _train, val = load_data(spec, batch_size=batch_size, seed=seed)
    if val is None:
        raise InputError(f"--data {spec!r}: returned no validation loader; accuracy is measured on labelled "
                         "validation data: return (train_loader, val_loader) with a val_loader")
    return val


def split_batch(batch: Any, where: str) -> tuple[tuple[torch.Tensor, ...], Any]:
    """``(inputs, target)`` of one labelled batch: a pair, or a dict with ``inputs``/``input`` and
    ``target``; ``inputs`` a tensor or a tuple of tensors. Anything else is a one-line InputError."""
    if isinstance(batch, Mapping) and "target" in batch:
        inputs = batch.get("inputs", batch.get("input"))
        if inputs is None:
            raise InputError(f"{where}: a dict batch needs 'inputs' (or 'input') and 'target' keys")
        batch = (inputs, batch["target"])
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise InputError(f"{where}: each batch must be (inputs, target), got {type(batch).__name__}"
                         + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    inputs, target = batch
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs):
        inputs = tuple(inputs)
    else:
        raise InputError(f"{where}: batch inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}")
    return inputs, target


def _shapes(tensors: Sequence[Any]) -> str:
    return ", ".join("x".join(str(d) for d in t.shape) + f" ({str(t.dtype).removeprefix('torch.')})"
                     for t in tensors)


def check_data_fits(model: torch.nn.Module, loader: Iterable[Any], what: str,
                    example_inputs: Sequence[Any]) -> None:
    """InputError (one line, both shapes) when the first batch of ``loader`` does not run through
    ``model``. The model ran on ``example_inputs`` when it was loaded, so a failure here is data that
    does not fit it (``--data digits``, 1x8x8 images, on a 3-channel CNN), not a deployprune bug."""
    batch = next(iter(loader), None)
    if batch is None:
        raise InputError(f"{what}: holds no batches")
    inputs, _ = split_batch(batch, what)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported in one line
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:240]
        raise InputError(f"{what}: the model does not take this data: its batches are {_shapes(inputs)}, the model "
                         f"takes {_shapes(example_inputs)} ({reason}); pass data shaped for the model") from None
    finally:
        model.train(was_training)


def _pieces(inputs: tuple[torch.Tensor, ...], fixed: int | None) -> list[tuple[tuple[torch.Tensor, ...], int]]:
    """``inputs`` cut into runs of ``fixed`` rows (the last padded by repeating its final row)."""
    n = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
    if fixed is None or n == fixed:
        return [(inputs, n)]
    out = []
    for start in range(0, n, fixed):
        stop = min(start + fixed, n)
        idx = torch.arange(start, start + fixed).clamp(max=stop - 1)
        out.append((tuple(t[idx] for t in inputs), stop - start))
    return out


def _first(output: Any) -> torch.Tensor | None:
    if isinstance(output, (list, tuple)):
        output = output[0] if output else None
    if isinstance(output, np.ndarray):
        output = torch.from_numpy(output)
    return output if isinstance(output, torch.Tensor) else None


def measure(data: Iterable[Any], run_source: Callable[[tuple[torch.Tensor, ...]], Any],
            run_artifact: Callable[[tuple[torch.Tensor, ...]], Any] | None, *,
            fixed_batch: int | None = None, where: str = "--data",
            artifact_missing: str = "") -> TaskAccuracy:
    """Top-1 accuracy of ``run_source`` and ``run_artifact`` (``None``: not run, ``artifact_missing``
    says why) over the labelled batches of ``data``. ``fixed_batch``: the artifact's fixed batch size."""
    total = 0
    right = {"source": 0, "artifact": 0}
    shape_problem = ""
    for batch in data:
        inputs, target = split_batch(batch, where)
        if not isinstance(target, torch.Tensor) or target.ndim != 1 or target.dtype.is_floating_point:
            return TaskAccuracy(None, None, 0, f"{where}: targets must be class indices (one integer per "
                                               f"sample), got {getattr(target, 'shape', type(target).__name__)}")
        runs: list[tuple[str, Any]] = [("source", lambda x: run_source(x))]
        if run_artifact is not None:
            runs.append(("artifact", lambda x: run_artifact(x)))
        for role, run in runs:
            pieces = _pieces(inputs, fixed_batch if role == "artifact" else None)
            outs = []
            for piece, keep in pieces:
                out = _first(run(piece))
                if out is None or out.ndim != 2:
                    shape_problem = (f"the {role}'s output is "
                                     f"{'x'.join(map(str, out.shape)) if out is not None else 'not a tensor'}, "
                                     "not (batch, classes) scores")
                    break
                outs.append(out[:keep])
            if shape_problem:
                return TaskAccuracy(None, None, 0, shape_problem)
            pred = torch.cat(outs).argmax(1)
            if pred.shape[0] != target.shape[0]:
                return TaskAccuracy(None, None, 0, f"{where}: {target.shape[0]} targets for "
                                                   f"{pred.shape[0]} predictions in a batch")
            right[role] += int((pred == target).sum())
        total += int(target.shape[0])
    if total == 0:
        raise InputError(f"{where}: holds no labelled samples")
    return TaskAccuracy(right["source"] / total, right["artifact"] / total if run_artifact is not None else None,
                        total, artifact_missing)


def as_report_fields(acc: TaskAccuracy, label: str, known: Sequence[tuple[str, float]] = ()) -> tuple[
        dict[str, float], dict[str, Any]]:
    """``(report.accuracy, report.pipeline['accuracy_data'])`` for ``acc`` measured on ``label``;
    ``known``: earlier figures of the same data (``deployprune run``: before pruning ...) first."""
    figures = {k: float(v) for k, v in known if v is not None}
    if acc.source is not None:
        figures["source"] = acc.source
    if acc.artifact is not None:
        figures["artifact"] = acc.artifact
    facts: dict[str, Any] = {"data": label, "samples": acc.samples}
    if acc.reason:
        facts["not measured"] = acc.reason
    return figures, facts


__all__ = ["EVAL_BATCH", "TaskAccuracy", "as_report_fields", "check_data_fits", "measure", "split_batch",
           "validation_loader"]
