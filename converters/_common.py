"""Helpers shared by the converters (inputs, outputs, names, sparsity, parity)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from deployprune._version import __version__
from deployprune.errors import InputError, OutputError, UsageError
from deployprune.parity import compare_outputs

if TYPE_CHECKING:
    from . import Verification


def package_version() -> str:
    return __version__


def check_model_and_inputs(model: Any, example_inputs: Any, target: str) -> tuple[torch.Tensor, ...]:
    """Normalize ``example_inputs`` to a tuple of tensors and check ``model`` is an nn.Module."""
    if not isinstance(model, nn.Module):
        raise InputError(f"{target}: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise InputError(f"{target}: example_inputs must be a non-empty tuple of tensors, "
                         f"got {type(example_inputs).__name__}")
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{target}: example input {i} is a {type(t).__name__}, not a tensor")
    return tuple(t.detach().cpu() for t in example_inputs)


@contextlib.contextmanager
def os_errors_as_output_errors(path: str | os.PathLike) -> Iterator[None]:
    """One-line OutputError for an OSError that escapes atomic_output (e.g. creating the
    temporary file in a directory that refuses new files, like /sys)."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); choose another output path") from exc


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the duration, then restore every submodule's flag."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def slow_path_tracing(model: nn.Module) -> Iterator[nn.Module]:
    """Trace with autograd on and every float parameter requiring grad, restored afterwards.

    With grad off (or frozen weights) ``nn.MultiheadAttention`` and the transformer layers take
    fused fast paths (``aten::_native_multi_head_attention``) that neither the ONNX torchscript
    exporter nor coremltools can convert; the traced graph should hold the plain ops.
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            if p.is_floating_point():
                p.requires_grad_(True)
        with torch.enable_grad():
            yield model
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Tensors of a model output (tensor, nested tuple/list, or dict values in order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in flatten_outputs(o)]
    raise UsageError(f"model output of type {type(out).__name__} cannot be exported; "
                     "return a tensor, a tuple/list or a dict of tensors")


def run_torch(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad(), eval_mode(model):
        out = model(*inputs)
    return [t.detach().cpu().numpy() for t in flatten_outputs(out)]


def io_names(options: dict[str, Any], n_inputs: int, n_outputs: int, target: str) -> tuple[list[str], list[str]]:
    inputs = options.get("input_names") or [f"input_{i}" for i in range(n_inputs)]
    outputs = options.get("output_names") or [f"output_{i}" for i in range(n_outputs)]
    if len(inputs) != n_inputs:
        raise UsageError(f"{target} option 'input_names': {len(inputs)} names for {n_inputs} model inputs")
    if len(outputs) != n_outputs:
        raise UsageError(f"{target} option 'output_names': {len(outputs)} names for {n_outputs} model outputs")
    if len(set(inputs) | set(outputs)) != n_inputs + n_outputs:
        raise UsageError(f"{target} options 'input_names'/'output_names': names must be unique, "
                         f"got {inputs + outputs}")
    return list(inputs), list(outputs)


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Zero fraction of every module's own ``weight`` (rounded), e.g. ``{"layer1.0.conv1": 0.75}``."""
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.numel() > 0 and w.is_floating_point():
            out[name or type(module).__name__] = round(float((w.detach() == 0).float().mean()), 6)
    return out


def metadata_props(model: nn.Module, target_meta: dict[str, Any], model_name: str | None) -> dict[str, str]:
    """String key/values every artifact carries (ONNX metadata_props, Core ML user_defined)."""
    cls = type(model)
    props = {
        "deployprune.version": package_version(),
        "deployprune.source_model": f"{cls.__module__}.{cls.__qualname__}",
        "deployprune.model_name": model_name or cls.__name__,
        "deployprune.parameters": str(sum(p.numel() for p in model.parameters())),
        "deployprune.layer_sparsity": json.dumps(layer_sparsity(model), sort_keys=True),
    }
    props.update({f"deployprune.{k}": str(v) for k, v in target_meta.items()})
    return props


def parity(reference: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> tuple[float, float]:
    """Worst (max abs error / output scale) over outputs, and the worst max abs error, from the
    project's one parity metric (:func:`deployprune.parity.compare_outputs`): non-finite values
    must match position by position, else both figures are infinite.

    The scale of an output is its max absolute value (at least 1e-6), so the relative figure
    compares errors across outputs of any magnitude.
    """
    p = compare_outputs(reference, actual, min_scale=1e-6)
    return p.rel, p.error


def tree_size(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def compared(reference: Sequence[np.ndarray], actual: Sequence[np.ndarray], tolerance: float,
             what: str) -> Verification:
    """A :class:`~deployprune.converters.Verification` from the parity of ``actual`` (an artifact's
    outputs) with ``reference`` (torch's), passing when the relative error is within ``tolerance``."""
    from . import Verification

    rel, err = parity(reference, actual)
    passed = bool(rel <= tolerance)
    failures = [] if passed else [f"{what} differs from torch (max abs error {err:.3g} = {rel:.3g} of the "
                                  f"output scale > tolerance {tolerance:g})"]
    return Verification(passed=passed, failures=failures,
                        details={"max_abs_error": err, "relative_error": rel, "tolerance": tolerance})
