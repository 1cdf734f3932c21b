"""Core ML target: mlprogram with sparse weights, verified by reading the package back.

Pipeline::

    fold_batchnorm (on a copy)  ->  torch.jit.trace  ->  ct.convert(mlprogram, dense)
    ->  ct.optimize.coreml.prune_weights(OpThresholdPrunerConfig(threshold=0.0))
        (exact zeros only: every weight with enough zeros becomes constexpr_sparse_to_dense)
    ->  save to a temporary .mlpackage  ->  verify_coreml (read back, materialize, compare)
    ->  rename into place

Why this route (measured with coremltools 9.0 and torch 2.13, see docs/converters.md):
``torch.jit.trace`` converts in a fraction of a second with named fp32 inputs, while the
torch.export route needs ``run_decompositions`` and returns fp16 outputs. coremltools' own
sparse route (compression buffers registered by ``coremltools.optimize.torch``) prunes with
``threshold = fp16 eps``, i.e. silently zeroes every weight with ``|w| <= 9.8e-4``; pruning
the converted program with ``threshold=0.0`` stores exactly the zeros that are there.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deployprune.errors import UnsupportedError, UsageError, ValidationFailed, one_line
from deployprune.fsutil import atomic_output, check_writable

from . import COMMON_OPTIONS, Choice, ConversionResult, resolve_options
from ._common import (
    check_model_and_inputs,
    eval_mode,
    flatten_outputs,
    io_names,
    metadata_props,
    os_errors_as_output_errors,
    parity,
    run_torch,
    slow_path_tracing,
    tree_size,
)
from .fold import fold_batchnorm, fold_batchnorm_pairs

log = logging.getLogger(__name__)

TARGET = "coreml"
SUFFIX = ".mlpackage"

#: Deployment targets with mlprogram + constexpr_sparse_to_dense (specification 7 and later).
DEPLOYMENT_TARGETS = {
    "ios16": "iOS16", "ios17": "iOS17", "ios18": "iOS18", "ios26": "iOS26",
    "macos13": "macOS13", "macos14": "macOS14", "macos15": "macOS15", "macos26": "macOS26",
    "tvos16": "tvOS16", "tvos17": "tvOS17", "tvos18": "tvOS18",
    "watchos9": "watchOS9", "watchos10": "watchOS10", "watchos11": "watchOS11",
}
COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU",
                 "cpu_and_ne": "CPU_AND_NE"}

FP16_EPS = float(np.finfo(np.float16).eps)  # 9.77e-4: coremltools' compression-buffer threshold
FP16_MAX = float(np.finfo(np.float16).max)

OPTIONS: dict[str, tuple[Any, Any, str]] = {
    **COMMON_OPTIONS,
    "minimum_deployment_target": (Choice(*DEPLOYMENT_TARGETS), "ios16",
                                  "oldest OS the model must run on (iOS16 or later)"),
    "precision": (Choice("fp16", "fp32"), "fp16",
                  "compute precision and weight storage; fp32 keeps weights that fp16 would zero"),
    "compute_units": (Choice(*COMPUTE_UNITS), "all",
                      "compute units hint stored with the model (Core ML chooses at load time)"),
    "sparse": (bool, True, "store weights with enough zeros as constexpr_sparse_to_dense"),
    "sparse_min_sparsity": (float, 0.1, "store a weight sparse only if at least this fraction is zero"),
    "sparse_min_elements": (int, 2048, "store a weight sparse only if it has more elements than this"),
    "input_names": (list, None, "model input names (default input_0, input_1, ...)"),
    "output_names": (list, None, "model output names (default output_0, output_1, ...)"),
    "dynamic_batch": (bool, False, "let axis 0 of every input take any size from 1 to max_batch"),
    "max_batch": (int, 64, "largest batch with dynamic_batch=True (mlprogram needs a bound)"),
    "model_name": (str, None, "name stored in the metadata (default: the model's class name)"),
}


# --------------------------------------------------------------------------- entry point


def convert(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: str | Path,
            **options: Any) -> ConversionResult:
    """Convert ``model`` to an ``.mlpackage`` at ``path`` (see module docstring)."""
    opts = resolve_options(TARGET, OPTIONS, options)
    _check_compatible(opts, given=set(options))
    inputs = check_model_and_inputs(model, example_inputs, TARGET)
    path = Path(path)
    if path.suffix != SUFFIX:
        raise UsageError(f"{path}: a Core ML mlprogram is a directory named '*.mlpackage'; "
                         f"use e.g. {path.with_suffix(SUFFIX).name}")
    path = check_writable(path, force=opts["force"])
    if opts["dynamic_batch"] and any(t.dim() == 0 for t in inputs):
        raise UsageError("coreml option 'dynamic_batch': every input needs a batch axis, "
                         "but an example input is a scalar")
    if opts["dynamic_batch"] and any(t.shape[0] > opts["max_batch"] for t in inputs):
        raise UsageError(f"coreml option 'max_batch': {opts['max_batch']} is below the example "
                         "inputs' batch size")
    ct = _coremltools()
    warnings: list[str] = []
    with eval_mode(model):
        folded, folded_pairs = fold_batchnorm_pairs(model, inputs)
    with torch.no_grad():
        raw = folded(*inputs)
    reference = [t.detach().cpu().numpy() for t in flatten_outputs(raw)]
    in_names, out_names = io_names(opts, len(inputs), len(reference), TARGET)

    lossy = fp16_losses(folded) if opts["precision"] == "fp16" else {}
    overflow = {layer: counts["overflow"] for layer, counts in lossy.items() if counts["overflow"]}
    if overflow:
        layer, n = next(iter(overflow.items()))
        raise UsageError(f"coreml option 'precision': fp16 cannot store {n} weights of {layer} (|w| > "
                         f"{FP16_MAX:g}, they would become inf); pass precision='fp32'")
    zeroed = {layer: counts["zeroed"] for layer, counts in lossy.items() if counts["zeroed"]}
    if zeroed:
        where = ", ".join(f"{layer}: {n}" for layer, n in list(zeroed.items())[:5])
        more = f" and {len(zeroed) - 5} more tensors" if len(zeroed) > 5 else ""
        warnings.append(f"fp16 storage turns {sum(zeroed.values())} non-zero weight values into 0 "
                        f"(|w| < 2.98e-08; {where}{more}); pass precision='fp32' to keep them")
    if opts["compute_units"] == "cpu_and_ne" and opts["precision"] == "fp32":
        warnings.append("compute_units='cpu_and_ne' with precision='fp32': the Neural Engine runs "
                        "fp16 only, so this model will run on the CPU")

    dense = _ct_convert(ct, folded, inputs, raw, in_names, out_names, opts)
    dense_weight_bytes = _weight_file_bytes(Path(dense.weights_dir)) if dense.weights_dir else 0
    mlmodel = _sparsify(dense, opts) if opts["sparse"] else dense

    target_meta = {
        "minimum_deployment_target": DEPLOYMENT_TARGETS[opts["minimum_deployment_target"]],
        "precision": opts["precision"],
        "compute_units": opts["compute_units"],
        "dense_weight_bytes": dense_weight_bytes,
        "batchnorm_folded": len(folded_pairs),
    }
    props = metadata_props(model, target_meta, opts["model_name"])
    mlmodel.short_description = (f"{props['deployprune.model_name']} exported by deployprune "
                                 f"{props['deployprune.version']}")
    mlmodel.user_defined_metadata.update(props)

    verification: CoreMLVerification | None = None
    with os_errors_as_output_errors(path), \
            atomic_output(path, force=opts["force"]) as tmp:
        with _quiet():
            mlmodel.save(str(tmp))
        if opts["verify"]:
            verification = verify_coreml(
                tmp, folded, inputs, input_names=in_names, output_names=out_names, fold=False,
                torch_outputs=reference,
                expect_sparse=opts["sparse"], sparse_min_sparsity=opts["sparse_min_sparsity"],
                sparse_min_elements=opts["sparse_min_elements"])
            if not verification.passed:
                raise ValidationFailed(f"{path}: Core ML read-back verification failed: "
                                       f"{'; '.join(verification.failures[:3])}; nothing was written")
    for w in warnings:
        log.warning("%s: %s", path, w)
    weight_bytes = _weight_file_bytes(path)
    metadata: dict[str, Any] = {
        "weight_file_bytes": weight_bytes,
        "dense_weight_file_bytes": dense_weight_bytes,
        "weight_file_ratio": weight_bytes / dense_weight_bytes if dense_weight_bytes else None,
        "batchnorm_folded": [f"{p}+{b}" for p, b in folded_pairs],
        "fp16_losses": lossy,
        "input_names": in_names,
        "output_names": out_names,
    }
    if verification is not None:
        metadata["verification"] = verification.to_dict()
    return ConversionResult(path=path, target=TARGET, size_bytes=tree_size(path), options=opts,
                            warnings=warnings, metadata=metadata)


def _check_compatible(opts: dict[str, Any], given: set[str]) -> None:
    if not opts["sparse"] and given & {"sparse_min_sparsity", "sparse_min_elements"}:
        raise UsageError("coreml options 'sparse_min_sparsity'/'sparse_min_elements' only apply "
                         "with sparse=True")
    if not opts["dynamic_batch"] and "max_batch" in given:
        raise UsageError("coreml option 'max_batch' only applies with dynamic_batch=True")
    if opts["max_batch"] < 1:
        raise UsageError(f"coreml option 'max_batch' must be >= 1, got {opts['max_batch']}")
    if not 0.0 <= opts["sparse_min_sparsity"] <= 1.0:
        raise UsageError("coreml option 'sparse_min_sparsity' must be between 0 and 1, "
                         f"got {opts['sparse_min_sparsity']}")
    if opts["sparse_min_elements"] < 0:
        raise UsageError(f"coreml option 'sparse_min_elements' must be >= 0, got {opts['sparse_min_elements']}")


# --------------------------------------------------------------------------- conversion


def _coremltools() -> Any:
    with _quiet():
        import coremltools as ct
    _patch_scalar_casts()
    return ct


_PATCHED = False


def _patch_scalar_casts() -> None:
    """Make coremltools 9's torch ``aten::Int``/``aten::Bool`` converters work with numpy >= 2.4.

    coremltools calls ``int(array)`` on a 1-element array (from ``x.size(0)``-style code in a
    trace); numpy 2.4 turned the old deprecation into ``TypeError: only 0-dimensional arrays
    can be converted to Python scalars``, which broke ViT, U-Net and ShuffleNet conversions
    here. The same conversion is re-registered through coremltools' public
    ``register_torch_op(override=True)``, taking the scalar with ``.item()``. Applied only when
    numpy actually rejects the old call.
    """
    global _PATCHED
    if _PATCHED:
        return
    _PATCHED = True
    try:
        int(np.array([1]))
        return
    except TypeError:
        pass
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    def make(py_type: type, dtype_name: str, func_name: str) -> Any:
        def cast(context: Any, node: Any) -> None:
            x = _get_inputs(context, node, expected=1)[0]
            if not (len(x.shape) == 0 or all(d == 1 for d in x.shape)):
                raise ValueError("input to cast must be either a scalar or a length 1 tensor")
            if x.can_be_folded_to_const():
                if isinstance(x.val, py_type):
                    res = x
                else:
                    res = mb.const(val=py_type(np.asarray(x.val).reshape(-1)[0].item()), name=node.name)
            elif len(x.shape) > 0:
                res = mb.cast(x=mb.squeeze(x=x, name=node.name + "_item"), dtype=dtype_name, name=node.name)
            else:
                res = mb.cast(x=x, dtype=dtype_name, name=node.name)
            context.add(res, node.name)

        cast.__name__ = func_name  # coremltools registers by function name plus the aliases
        return cast

    register_torch_op(make(int, "int32", "_int"), torch_alias=["int"], override=True)
    register_torch_op(make(bool, "bool", "_bool"), torch_alias=["bool"], override=True)


@contextlib.contextmanager
def _quiet():
    """Keep coremltools' progress bars and import chatter out of the user's terminal."""
    ct_logger = logging.getLogger("coremltools")
    level = ct_logger.level
    ct_logger.setLevel(max(level, logging.ERROR))
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        ct_logger.setLevel(level)


class _TupleOutputs(nn.Module):
    """Wraps a model whose output is a dict or nested structure into a flat tuple of tensors."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(flatten_outputs(self.inner(*args)))


def fp16_losses(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per tensor: non-zero values fp16 stores as 0, values it stores as inf, and |w| < fp16 eps.

    Only ``zeroed`` and ``overflow`` are losses in this converter; ``below_eps`` counts the
    weights coremltools' compression-buffer route would have zeroed (see module docstring).
    """
    out: dict[str, dict[str, int]] = {}
    tensors = [(n, t) for n, t in model.named_parameters()]
    tensors += [(n, t) for n, t in model.named_buffers() if t.is_floating_point()]
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        w = tensor.detach().cpu().to(torch.float32).numpy()
        with np.errstate(over="ignore"):
            h = w.astype(np.float16)
        nonzero = w != 0
        counts = {
            "zeroed": int(np.count_nonzero(nonzero & (h == 0))),
            "overflow": int(np.count_nonzero(np.isfinite(w) & ~np.isfinite(h))),
            "below_eps": int(np.count_nonzero(nonzero & (np.abs(w) < FP16_EPS))),
        }
        if counts["zeroed"] or counts["overflow"]:
            out[name] = counts
    return out


def _input_type(ct: Any, name: str, t: torch.Tensor, dynamic_batch: bool, max_batch: int) -> Any:
    shape: Any = tuple(t.shape)
    if dynamic_batch:
        batch = ct.RangeDim(lower_bound=1, upper_bound=max_batch, default=shape[0])
        shape = ct.Shape(shape=(batch, *shape[1:]))
    if t.is_floating_point():
        dtype = np.float32
    elif t.dtype == torch.bool:
        dtype = bool
    else:
        dtype = np.int32
    return ct.TensorType(name=name, shape=shape, dtype=dtype)


_CT_OP = re.compile(r"op '([^']+)'")


def _ct_convert(ct: Any, model: nn.Module, inputs: tuple[torch.Tensor, ...], raw: Any, in_names: list[str],
                out_names: list[str], opts: dict[str, Any]) -> Any:
    name = type(model).__name__
    traced_model = model if isinstance(raw, torch.Tensor) or (
        isinstance(raw, tuple) and all(isinstance(o, torch.Tensor) for o in raw)) else _TupleOutputs(model)
    try:
        with slow_path_tracing(traced_model), _quiet():
            traced = torch.jit.trace(traced_model, inputs, check_trace=False)
    except Exception as exc:
        raise UnsupportedError(f"coreml: torch.jit.trace cannot trace {name}: "
                               f"{one_line(str(exc), 240, first_line=True)}") from exc
    outputs = [ct.TensorType(name=o, dtype=np.float32) if r.dtype.is_floating_point else ct.TensorType(name=o)
               for o, r in zip(out_names, flatten_outputs(raw), strict=True)]
    try:
        with _quiet():
            return ct.convert(
                traced,
                inputs=[_input_type(ct, n, t, opts["dynamic_batch"], opts["max_batch"])
                        for n, t in zip(in_names, inputs, strict=True)],
                outputs=outputs,
                convert_to="mlprogram",
                minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGETS[opts["minimum_deployment_target"]]),
                compute_precision=ct.precision.FLOAT16 if opts["precision"] == "fp16" else ct.precision.FLOAT32,
                compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[opts["compute_units"]]),
            )
    except Exception as exc:
        op = _CT_OP.search(str(exc))
        if op:
            raise UnsupportedError(f"coreml: coremltools cannot convert op {op.group(1)!r} of {name}; "
                                   "replace the op in the model or use another target") from exc
        why = one_line(str(exc), 240, first_line=True)
        raise UnsupportedError(f"coreml: coremltools cannot convert {name}: {why}") from exc


def _sparsify(mlmodel: Any, opts: dict[str, Any]) -> Any:
    import coremltools.optimize.coreml as cto

    config = cto.OptimizationConfig(global_config=cto.OpThresholdPrunerConfig(
        threshold=0.0,  # '<=' comparison: exactly the zeros, never a small non-zero weight
        minimum_sparsity_percentile=float(opts["sparse_min_sparsity"]),
        weight_threshold=int(opts["sparse_min_elements"]),
    ))
    with _quiet():
        return cto.prune_weights(mlmodel, config)




def _weight_file_bytes(package: Path) -> int:
    """Bytes of the weight file(s) of an .mlpackage (``Data/com.apple.CoreML/weights/*``)."""
    package = Path(package)
    weights = package if package.name == "weights" else package / "Data" / "com.apple.CoreML" / "weights"
    if not weights.is_dir():
        return 0
    return sum(p.stat().st_size for p in weights.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- verification


@dataclass
class WeightCheck:
    """One torch tensor against the constant that stores it in the Core ML program."""

    name: str  # torch name, e.g. "layer1.0.conv1.weight"
    shape: tuple[int, ...]
    constant: str | None  # Core ML constant (None: not located)
    storage: str  # "sparse", "dense", "compressed" (other constexpr) or "missing"
    dtype: str = ""
    max_abs_error: float = 0.0
    zeros_torch: int = 0
    zeros_coreml: int = 0
    zeroed: int = 0  # torch non-zero, stored as 0 (fp16 underflow; expected, counted)
    values_ok: bool = False
    pattern_ok: bool = False
    matched_by: str = ""  # "name", "value" or "value-transposed"

    @property
    def ok(self) -> bool:
        return self.values_ok and self.pattern_ok


@dataclass
class CoreMLVerification:
    """Result of reading an .mlpackage back and comparing it with the torch model."""

    path: Path
    passed: bool
    failures: list[str] = field(default_factory=list)
    weights: list[WeightCheck] = field(default_factory=list)
    unlocated: list[str] = field(default_factory=list)  # 1-D torch tensors not found (fused away)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    sparse_constants: int = 0
    dense_constants: int = 0
    weight_file_bytes: int = 0
    dense_weight_file_bytes: int | None = None  # from the export's metadata, if recorded
    materialized_bytes: int = 0  # every weight constant stored dense, at its stored precision
    weight_elements: int = 0  # elements of the program's float weight constants (its parameters)
    nonzero_weight_elements: int = 0
    prediction: dict[str, Any] | None = None  # macOS only

    @property
    def weight_file_ratio(self) -> float | None:
        if not self.dense_weight_file_bytes:
            return None
        return self.weight_file_bytes / self.dense_weight_file_bytes

    def summary(self) -> str:
        status = "passed" if self.passed else "FAILED"
        ratio = self.weight_file_ratio
        size = f"weights {self.weight_file_bytes} B" + (f" ({ratio:.3f}x dense)" if ratio else "")
        text = (f"{self.path.name}: read-back {status}; {len(self.weights)} weights checked, "
                f"{self.sparse_constants} sparse / {self.dense_constants} dense constants; {size}")
        if self.failures:
            text += "; " + "; ".join(self.failures[:3])
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failures": list(self.failures),
            "weights_checked": len(self.weights),
            "sparse_constants": self.sparse_constants,
            "dense_constants": self.dense_constants,
            "zeroed_by_fp16": sum(w.zeroed for w in self.weights),
            "unlocated": list(self.unlocated),
            "ops": dict(self.ops),
            "weight_file_bytes": self.weight_file_bytes,
            "dense_weight_file_bytes": self.dense_weight_file_bytes,
            "weight_file_ratio": self.weight_file_ratio,
            "materialized_bytes": self.materialized_bytes,
            "weight_elements": self.weight_elements,
            "nonzero_weight_elements": self.nonzero_weight_elements,
            "prediction": self.prediction,
        }


#: Compression ops that change values (this converter never writes them: their presence
#: means the package was not produced losslessly).
_LOSSY_CONSTEXPR = ("constexpr_affine_dequantize", "constexpr_lut_to_dense", "constexpr_blockwise_shift_scale",
                    "constexpr_lut_to_sparse", "constexpr_cast")


def verify(path: str | Path, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> CoreMLVerification:
    """The converter interface's check of a written ``.mlpackage``: :func:`verify_coreml` with its
    defaults (read back without running it; on macOS a prediction is compared too)."""
    return verify_coreml(path, model, example_inputs)


def verify_coreml(path: str | Path, torch_model: nn.Module, example_inputs: tuple[torch.Tensor, ...], *,
                  input_names: list[str] | None = None, output_names: list[str] | None = None,
                  fold: bool = True, expect_sparse: bool = False, sparse_min_sparsity: float = 0.1,
                  sparse_min_elements: int = 2048, rtol: float | None = None,
                  torch_outputs: list[np.ndarray] | None = None) -> CoreMLVerification:
    """Read an ``.mlpackage`` back without running it and check it against ``torch_model``.

    The package is read from a private temporary copy: coremltools re-serializes the
    ``Manifest.json`` of a package it opens, and an input is never modified.

    * Loads the spec with ``MLModel(path, skip_model_load=True)`` and rebuilds the MIL program
      from it and the weight file.
    * Materializes every ``constexpr_sparse_to_dense`` constant (mask bits + non-zero values
      -> dense; decoded here, not by coremltools) and every dense constant.
    * Matches each torch tensor (after BatchNorm folding, ``fold=True``) to its constant, by
      name and else by value: values within the stored precision's rounding, identical zero
      pattern after that rounding (non-zeros fp16 rounds to 0 are counted in ``zeroed``).
      Tensors with 2+ dimensions must be found; 1-D ones (biases, norm scales) may have been
      fused into other constants and are listed in ``unlocated``.
    * Checks input and output names and shapes and the op set (no lossy constexpr op; with
      ``expect_sparse`` every weight with enough zeros stored sparse).
    * On macOS also runs a prediction and compares it with torch (``rtol``: 1e-2 for fp16
      programs, 1e-4 for fp32 ones, relative to the output scale).

    ``torch_outputs`` may pass the model's outputs on ``example_inputs`` when already computed.
    """
    with private_copy(Path(path)) as readable:
        return _verify_coreml(Path(path), readable, torch_model, example_inputs, input_names=input_names,
                              output_names=output_names, fold=fold, expect_sparse=expect_sparse,
                              sparse_min_sparsity=sparse_min_sparsity, sparse_min_elements=sparse_min_elements,
                              rtol=rtol, torch_outputs=torch_outputs)


def _verify_coreml(path: Path, readable: Path, torch_model: nn.Module, example_inputs: tuple[torch.Tensor, ...], *,
                   input_names: list[str] | None, output_names: list[str] | None, fold: bool, expect_sparse: bool,
                   sparse_min_sparsity: float, sparse_min_elements: int, rtol: float | None,
                   torch_outputs: list[np.ndarray] | None) -> CoreMLVerification:
    ct = _coremltools()
    inputs = check_model_and_inputs(torch_model, example_inputs, TARGET)
    failures: list[str] = []
    with eval_mode(torch_model):
        reference_model = fold_batchnorm(torch_model, inputs) if fold else torch_model
    if torch_outputs is None:
        torch_outputs = run_torch(reference_model, inputs)

    with _quiet():
        mlmodel = ct.models.MLModel(str(readable), skip_model_load=True)
        spec = mlmodel.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        failures.append(f"not an mlprogram (model type {spec.WhichOneof('Type')})")
        return CoreMLVerification(path=path, passed=False, failures=failures)
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    with _quiet():
        program = load_milproto(model_spec=spec, specification_version=spec.specificationVersion,
                                file_weights_dir=mlmodel.weights_dir)
    constants, ops, sparse_count, dense_count = _program_constants(program, failures)

    result = CoreMLVerification(path=path, passed=False, ops=ops, sparse_constants=sparse_count,
                                dense_constants=dense_count)
    result.weight_file_bytes = _weight_file_bytes(path)
    # parameters as the report counts them for ONNX (float initializers): every weight constant
    result.weight_elements = int(sum(c.value.size for c in constants))
    result.nonzero_weight_elements = int(sum(np.count_nonzero(c.value) for c in constants))
    dense_meta = spec.description.metadata.userDefined.get("deployprune.dense_weight_bytes")
    result.dense_weight_file_bytes = int(dense_meta) if dense_meta else None

    _match_weights(reference_model, constants, result, failures, expect_sparse, sparse_min_sparsity,
                   sparse_min_elements)
    _check_io(spec, inputs, torch_outputs, input_names, output_names, result, failures)
    lossy = sorted(op for op in ops if op in _LOSSY_CONSTEXPR)
    if lossy:
        failures.append(f"lossy compression ops in the program: {', '.join(lossy)}")

    if sys.platform == "darwin":  # pragma: no cover - needs macOS and the Core ML framework
        result.prediction = _predict_and_compare(ct, readable, inputs, torch_outputs, spec, rtol, failures)
    result.failures = failures
    result.passed = not failures
    return result


@dataclass
class _Constant:
    name: str
    value: np.ndarray
    storage: str  # "sparse" | "dense" | "compressed"
    used: bool = False


def _iter_ops(block: Any):
    for op in block.operations:
        yield op
        for inner in getattr(op, "blocks", ()):
            yield from _iter_ops(inner)


def _decode_sparse(op: Any) -> np.ndarray:
    """constexpr_sparse_to_dense -> dense array, decoded from the stored mask and values."""
    values = np.asarray(op.nonzero_data.val)
    mask = np.asarray(op.mask.val)
    shape_var = op.inputs.get("shape")
    if shape_var is not None:  # iOS16 layout: flat uint8 mask, 8 elements per byte, LSB first
        shape = tuple(int(s) for s in np.asarray(shape_var.val))
        size = int(np.prod(shape))
        bits = np.unpackbits(mask.astype(np.uint8), bitorder="little")
        if bits[size:].any():
            raise ValueError(f"{op.name}: padding bits of the sparse mask are set")
        bits = bits[:size].astype(bool)
    else:  # iOS18 layout: uint1 mask with the weight's shape
        shape = mask.shape
        bits = mask.reshape(-1) != 0
    if int(bits.sum()) != values.size:
        raise ValueError(f"{op.name}: mask has {int(bits.sum())} set bits for {values.size} values")
    dense = np.zeros(int(np.prod(shape)), dtype=values.dtype)
    dense[bits] = values
    return dense.reshape(shape)


def _program_constants(program: Any, failures: list[str]) -> tuple[list[_Constant], dict[str, int], int, int]:
    ops: dict[str, int] = {}
    constants: list[_Constant] = []
    feeding_constexpr: set[str] = set()
    all_ops = []
    for function in program.functions.values():
        all_ops.extend(_iter_ops(function))
    for op in all_ops:
        ops[op.op_type] = ops.get(op.op_type, 0) + 1
        if op.op_type.startswith("constexpr_"):
            for var in op.inputs.values():
                feeding_constexpr.add(var.name)
    sparse = dense = 0
    for op in all_ops:
        out = op.outputs[0]
        if op.op_type == "const":
            value = out.val
            if out.name in feeding_constexpr or not isinstance(value, np.ndarray):
                continue
            if value.dtype.kind != "f" or value.size < 2:
                continue
            constants.append(_Constant(out.name, value, "dense"))
            dense += 1
        elif op.op_type == "constexpr_sparse_to_dense":
            try:
                constants.append(_Constant(out.name, _decode_sparse(op), "sparse"))
                sparse += 1
            except Exception as exc:
                failures.append(f"sparse constant {out.name} cannot be decoded: {exc}")
        elif op.op_type.startswith("constexpr_"):
            value = op.materialized_val_inference()
            value = value[-1] if isinstance(value, tuple) else value
            constants.append(_Constant(out.name, np.asarray(value), "compressed"))
    return constants, ops, sparse, dense


_SUFFIXES = re.compile(r"(_sparsified|_to_fp16|_to_fp32|_cast_fp16|_cast_fp32)+$")


def _normalized(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def _compare(t: np.ndarray, c: np.ndarray) -> tuple[bool, int, float, int]:
    """(values within storage rounding, zero-pattern mismatches after rounding, max err, zeroed)."""
    stored = t.astype(c.dtype) if c.dtype.kind == "f" else t
    c64 = c.astype(np.float64)
    t64 = t.astype(np.float64)
    err = float(np.max(np.abs(c64 - t64))) if t.size else 0.0
    if c.dtype == np.float16:
        # half an fp16 ulp of |t| (2^-11 relative) or of the smallest subnormal (2^-25)
        tol = np.maximum(np.abs(t64) * 2.0**-11, 2.0**-25) * (1 + 1e-6)
    else:
        tol = np.abs(t64) * float(np.finfo(c.dtype).eps) + float(np.finfo(c.dtype).tiny)
    with np.errstate(invalid="ignore"):
        values_ok = bool(np.all((np.abs(c64 - t64) <= tol) | (np.isnan(c64) & np.isnan(t64))))
    mismatched = int(np.count_nonzero((c == 0) != (stored == 0)))
    zeroed = int(np.count_nonzero((t != 0) & (c == 0)))
    return values_ok, mismatched, err, zeroed


_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
             nn.Linear)


def _reference_tensors(model: nn.Module) -> list[tuple[str, np.ndarray, bool]]:
    """(name, float32 array, required) for every float parameter/buffer with 2+ elements.

    Required are the weights of convolutions and linear layers: the converter writes each of
    them as one constant (the tensors pruning acts on). Other tensors (biases, norm scales,
    embeddings) are checked when located; coremltools may legitimately fold them into other
    constants (bias adds fused, a constant-index embedding lookup folded, a slice of a
    position table).
    """
    required = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, _WEIGHTED)}
    out = []
    tensors = list(model.named_parameters())
    tensors += [(n, b) for n, b in model.named_buffers()
                if b.is_floating_point() and not n.endswith("num_batches_tracked")]
    for name, tensor in tensors:
        if tensor.numel() < 2 or not tensor.is_floating_point():
            continue
        out.append((name, tensor.detach().cpu().to(torch.float32).numpy(), name in required))
    return out


def _locate(name: str, t: np.ndarray, constants: list[_Constant], by_name: dict[str, list[_Constant]]
            ) -> tuple[_Constant | None, str, np.ndarray]:
    """The constant storing ``t``: by name, else by value (also transposed or reshaped)."""
    named = [c for c in by_name.get(_normalized(name), []) + by_name.get(_normalized(name.removeprefix("inner.")), [])
             if c.value.shape == t.shape]
    for c in named:
        if _compare(t, c.value)[0]:
            return c, "name", t
    candidates = sorted((c for c in constants if c.value.size == t.size), key=lambda c: c.used)
    squeezed = tuple(d for d in t.shape if d != 1)
    for c in candidates:
        if c.value.shape == t.shape and _compare(t, c.value)[0]:
            return c, "value", t
        if t.ndim == 2 and c.value.shape == t.T.shape and _compare(t.T, c.value)[0]:
            return c, "value-transposed", t.T
        if tuple(d for d in c.value.shape if d != 1) == squeezed:
            reshaped = t.reshape(c.value.shape)
            if _compare(reshaped, c.value)[0]:
                return c, "value-reshaped", reshaped
    if named:  # the constant of that name holds other values: report the difference
        return named[0], "name", t
    return None, "", t


def _match_weights(model: nn.Module, constants: list[_Constant], result: CoreMLVerification,
                   failures: list[str], expect_sparse: bool, min_sparsity: float, min_elements: int) -> None:
    by_name: dict[str, list[_Constant]] = {}
    for c in constants:
        by_name.setdefault(_SUFFIXES.sub("", c.name), []).append(c)
    materialized = 0
    for name, t, required in _reference_tensors(model):
        check = WeightCheck(name=name, shape=tuple(t.shape), constant=None, storage="missing")
        found, check.matched_by, ref = _locate(name, t, constants, by_name)
        if found is None:
            if required:
                result.weights.append(check)
                failures.append(f"torch weight {name} {tuple(t.shape)} not found in the program")
            else:
                result.unlocated.append(name)
            continue
        if not found.used:
            materialized += found.value.nbytes
        found.used = True  # a constant may serve several identical tensors (deduplicated)
        check.values_ok, mismatched, check.max_abs_error, check.zeroed = _compare(ref, found.value)
        check.pattern_ok = mismatched == 0
        check.constant, check.storage, check.dtype = found.name, found.storage, str(found.value.dtype)
        check.zeros_torch = int(np.count_nonzero(ref == 0))
        check.zeros_coreml = int(np.count_nonzero(found.value == 0))
        if not check.values_ok:
            failures.append(f"{name}: values differ from constant {found.name} by up to "
                            f"{check.max_abs_error:.3g}, more than {found.value.dtype} rounding")
        if not check.pattern_ok:
            failures.append(f"{name}: zero pattern differs at {mismatched} of {t.size} positions "
                            f"({check.zeros_torch} zeros in torch, {check.zeros_coreml} in Core ML)")
        if (expect_sparse and found.storage == "dense" and t.size > min_elements
                and check.zeros_coreml / t.size >= max(min_sparsity, 1e-12)):
            failures.append(f"{name}: {check.zeros_coreml / t.size:.0%} zeros but stored dense")
        result.weights.append(check)
    result.materialized_bytes = materialized
    stray = [c.name for c in constants if c.storage == "sparse" and not c.used]
    if stray:
        failures.append(f"sparse constants not matched to any torch tensor: {', '.join(stray[:5])}")


def _feature_shape(feature: Any) -> tuple[list[int], bool]:
    arr = feature.type.multiArrayType
    if arr.WhichOneof("ShapeFlexibility") == "shapeRange":
        ranges = arr.shapeRange.sizeRanges
        dims = [int(r.lowerBound) if r.lowerBound == r.upperBound else -1 for r in ranges]
        return dims, True
    return [int(d) for d in arr.shape], False


def _check_io(spec: Any, inputs: tuple[torch.Tensor, ...], torch_outputs: list[np.ndarray],
              in_names: list[str] | None, out_names: list[str] | None, result: CoreMLVerification,
              failures: list[str]) -> None:
    got_in = [f.name for f in spec.description.input]
    got_out = [f.name for f in spec.description.output]
    if len(got_in) != len(inputs) or (in_names is not None and got_in != list(in_names)):
        failures.append(f"inputs are {got_in}, expected {in_names or f'{len(inputs)} inputs'}")
    if len(got_out) != len(torch_outputs) or (out_names is not None and got_out != list(out_names)):
        failures.append(f"outputs are {got_out}, expected {out_names or f'{len(torch_outputs)} outputs'}")
    for feature, t in zip(spec.description.input, inputs, strict=False):
        dims, flexible = _feature_shape(feature)
        want = list(t.shape)
        ok = len(dims) == len(want) and all(d in (-1, w) for d, w in zip(dims, want, strict=False))
        result.inputs.append({"name": feature.name, "shape": dims, "flexible": flexible, "ok": ok})
        if not ok:
            failures.append(f"input {feature.name} has shape {dims}, torch example is {want}")
    for feature, ref in zip(spec.description.output, torch_outputs, strict=False):
        dims, flexible = _feature_shape(feature)
        want = list(ref.shape)
        ok = not dims or (len(dims) == len(want) and all(d in (-1, w) for d, w in zip(dims, want, strict=False)))
        result.outputs.append({"name": feature.name, "shape": dims, "flexible": flexible, "ok": ok})
        if not ok:
            failures.append(f"output {feature.name} has shape {dims}, torch gives {want}")


@contextlib.contextmanager
def private_copy(path: Path):
    """A temporary copy of an .mlpackage to open: coremltools re-serializes the Manifest.json of the
    package it opens, and an input must never be modified (BUG-H18). Symlinks and special files
    inside are refused (a link to /dev/zero would fill the disk), see ``copy_regular_tree``."""
    import tempfile

    from deployprune.fsutil import copy_regular_tree

    with tempfile.TemporaryDirectory(prefix="deployprune-mlpackage-") as tmp:
        copy = Path(tmp) / Path(path).name
        copy_regular_tree(path, copy)
        yield copy


def _predict_and_compare(ct: Any, path: Path, inputs: tuple[torch.Tensor, ...],
                         torch_outputs: list[np.ndarray], spec: Any, rtol: float | None,
                         failures: list[str]) -> dict[str, Any]:  # pragma: no cover
    model = ct.models.MLModel(str(path))  # path is already a private copy
    in_names = [f.name for f in spec.description.input]
    out_names = [f.name for f in spec.description.output]
    feeds = {}
    for name, t in zip(in_names, inputs, strict=True):
        array = t.numpy()
        feeds[name] = array.astype(np.float32) if t.is_floating_point() else array.astype(np.int32)
    prediction = model.predict(feeds)
    got = [np.asarray(prediction[n]) for n in out_names]
    fp16 = spec.description.metadata.userDefined.get("deployprune.precision", "fp16") == "fp16"
    limit = rtol if rtol is not None else (1e-2 if fp16 else 1e-4)
    rel, err = parity(torch_outputs, got)
    if not rel <= limit:
        failures.append(f"prediction differs from torch: max abs error {err:.3g} = {rel:.3g} of the "
                        f"output scale > {limit:g}")
    return {"max_abs_error": err, "relative_error": rel, "tolerance": limit}


__all__ = ["OPTIONS", "SUFFIX", "CoreMLVerification", "WeightCheck", "convert", "fold_batchnorm",
           "fp16_losses", "private_copy", "verify", "verify_coreml"]
