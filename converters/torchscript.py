"""TorchScript target: the whole contract of a converter in one small file.

It is the worked example of docs/converters.md ("adding a target"): options with defaults
and help, argument checking, an atomic write, verification before the rename, and a
ConversionResult.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from deployprune.errors import UnsupportedError, ValidationFailed
from deployprune.fsutil import atomic_output, check_writable

from . import COMMON_OPTIONS, Choice, ConversionResult, Verification, resolve_options
from ._common import (
    check_model_and_inputs,
    compared,
    eval_mode,
    flatten_outputs,
    os_errors_as_output_errors,
    run_torch,
)

TARGET = "torchscript"
SUFFIX = ".pt"

OPTIONS: dict[str, tuple[Any, Any, str]] = {
    **COMMON_OPTIONS,
    "method": (Choice("trace", "script"), "trace", "torch.jit.trace (any forward) or torch.jit.script"),
    "tolerance": (float, 1e-5, "verify: max abs error allowed, relative to the output's max |value|"),
}


def convert(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: str | Path,
            **options: Any) -> ConversionResult:
    opts = resolve_options(TARGET, OPTIONS, options)
    inputs = check_model_and_inputs(model, example_inputs, TARGET)
    path = check_writable(path, force=opts["force"])
    with eval_mode(model), torch.no_grad():
        reference = run_torch(model, inputs)
        try:
            module = torch.jit.trace(model, inputs) if opts["method"] == "trace" else torch.jit.script(model)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedError(f"torchscript: torch.jit.{opts['method']} cannot handle "
                                   f"{type(model).__name__}: {first}") from exc
    metadata: dict[str, Any] = {"method": opts["method"]}
    with os_errors_as_output_errors(path), \
            atomic_output(path, force=opts["force"]) as tmp:
        torch.jit.save(module, str(tmp))
        if opts["verify"]:
            check = verify(tmp, model, inputs, tolerance=opts["tolerance"], reference=reference)
            err = check.details.get("max_abs_error", float("nan"))
            if not check.passed:
                raise ValidationFailed(f"{path}: the saved TorchScript module differs from the model "
                                       f"(max abs error {err:.3g}); nothing was written")
            metadata["max_abs_error"] = err
    return ConversionResult(path=path, target=TARGET, size_bytes=path.stat().st_size, options=opts,
                            metadata=metadata)


def verify(path: str | Path, model: nn.Module, example_inputs: tuple[torch.Tensor, ...], *,
           tolerance: float = OPTIONS["tolerance"][1], reference: list | None = None) -> Verification:
    """The converter interface's check of a written module: reloaded with ``torch.jit.load``, its
    outputs on ``example_inputs`` against ``model``'s (``reference``: those outputs, if known)."""
    inputs = check_model_and_inputs(model, example_inputs, TARGET)
    if reference is None:
        reference = run_torch(model, inputs)
    try:
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            got = [t.numpy() for t in flatten_outputs(loaded(*inputs))]
    except Exception as exc:  # noqa: BLE001 - a module that does not load or run fails verification
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Verification(passed=False, failures=[f"{path}: torch.jit.load cannot run it: {first}"])
    return compared(reference, got, tolerance, f"{path}: the saved TorchScript module")
