"""Python API entry points that span several stages (``dp.export``, ``dp.load``)."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import OutputError, UsageError
from .fsutil import check_writable
from .masks import extract_attached_masks

log = logging.getLogger(__name__)

__all__ = ["apply_masks", "export", "load"]


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)) and all(
        isinstance(t, torch.Tensor) for t in example_inputs
    ):
        if not example_inputs:
            raise UsageError("example_inputs: expected at least one tensor")
        return tuple(example_inputs)
    raise UsageError(
        "example_inputs: expected a tensor or a tuple of tensors, "
        f"got {type(example_inputs).__name__}"
    )


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    target: str = "onnx",
    masks: Mapping[str, Mapping[str, Any]] | None = None,
    force: bool = False,
    **options: Any,
) -> Path:
    """Finalize ``model`` (when it has masks) and convert it to ``target`` at ``path``.

    ``masks``: NNI layout ``{module: {"weight": 0/1 tensor}}``; ``None`` uses the masks a pruner
    attached (if any). The model is not modified. ``options`` go to the converter (see
    ``converters.get(target).OPTIONS``). The artifact is written to a staging directory and moved
    into place only when complete; an existing ``path`` is replaced only with ``force=True``.
    Returns the path. Use :func:`deployprune.validate` (or the CLI's ``export``) to verify it.
    """
    from . import converters
    from .finalize import finalize
    from .pipeline import side_file, staging

    if not isinstance(model, nn.Module):
        raise UsageError(f"model: expected a torch nn.Module, got {type(model).__name__}")
    from .adapt import positional, split_example

    args, kwargs = split_example(example_inputs)
    inputs: Any = (args, kwargs) if kwargs else _as_inputs(example_inputs)
    dest = Path(path)
    converter = converters.get(target)
    resolver = getattr(converters, "resolve_options", None)
    if resolver is not None and hasattr(converter, "OPTIONS"):
        resolver(target, converter.OPTIONS, options)
    check_writable(dest, force=force)
    attached = extract_attached_masks(model)
    if attached:
        # Finalize a plain copy: removing parametrizations from a deep copy with torch's own
        # helper would break the caller's model (the generated class is shared).
        from .io import remove_parametrizations_

        plain = copy.deepcopy(model)
        remove_parametrizations_(plain, leave_parametrized=False)
        work = finalize(plain, inputs, attached if masks is None else masks)
    elif masks is not None:
        work = finalize(model, inputs, masks)
    else:
        work = model
    was_training = work.training
    work.eval()
    # keyword inputs (input_ids=..., pixel_values=...) and ModelOutput results: converters see a
    # tensor-in/tensor-out view of the (compacted) model, and the graph inputs keep the names
    target_model, flat_inputs = positional(work, inputs)
    if target_model is not work and "input_names" in getattr(converter, "OPTIONS", {}):
        options.setdefault("input_names", list(target_model.input_names))
    try:
        with staging(dest) as stage:
            staged = stage.path()
            converter.convert(target_model, flat_inputs, staged, **options)
            if not staged.exists():
                raise OutputError(f"{dest}: the {target} converter wrote nothing")
            stage.publish(staged, dest, force=force)
            side = side_file(converter, dest)
            if force and side is not None and side not in stage.published:
                stage.retire(side)  # external data of the artifact this one replaced
    finally:
        if work is model:
            model.train(was_training)
    return dest


def apply_masks(model: nn.Module, masks: Mapping[str, Mapping[str, Any]] | None = None) -> nn.Module:
    """The masked model: a copy of ``model`` with ``masks`` multiplied into its parameters.

    This is what ``dp.finalize`` keeps equal and what an exported artifact is validated against
    (``dp.validate(dp.apply_masks(model, masks), "out.onnx", inputs)``). ``masks``: NNI layout,
    checked like everywhere else (one-line ``MaskError``), replacing attached ones as in ``dp.export``;
    ``None`` bakes the masks a pruner attached as parametrizations (or ``torch.nn.utils.prune`` left
    as hooks). The result is a
    plain module without parametrizations or hooks; ``model`` is not modified.
    """
    from .io import remove_parametrizations_
    from .masks import apply_masks_, copy_model, detach_prune_hooks_, normalize_masks

    if not isinstance(model, nn.Module):
        raise UsageError(f"model: expected a torch nn.Module, got {type(model).__name__}")
    attached = extract_attached_masks(model)
    work = copy_model(model)
    remove_parametrizations_(work, leave_parametrized=False)  # dense weights; the masks are in `attached`
    for mod_name, per in detach_prune_hooks_(work).items():
        attached.setdefault(mod_name, {}).update(per)
    apply_masks_(work, normalize_masks(work, attached if masks is None else masks))
    return work


def load(path: str | os.PathLike, **kwargs: Any):
    """:func:`deployprune.io.load_model` (model, example inputs and masks from a file), or for a Hugging
    Face model directory :func:`deployprune.hf.load_directory` (keyword ``inputs=["input_ids=1,128"]``)."""
    if Path(path).is_dir() and (Path(path) / "config.json").is_file():
        from .hf import load_directory

        return load_directory(path, **kwargs)
    from .io import load_model

    return load_model(path, **kwargs)
