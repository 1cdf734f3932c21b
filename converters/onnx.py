"""ONNX target: explicit exporter and opset, onnxsim, external data, metadata, sparse weights.

Pipeline (everything before the rename works on a temporary sibling of the output)::

    torch.onnx.export (dynamo exporter, opset 18, by default)       -> ModelProto in memory
        (dynamo's nodes renamed /module/path/Op; TorchScript exporter as option or noted fallback)
    onnxsim.simplify(check_n=...)          kept only if it succeeds and its own check passes
    sparse weight encoding                 only with sparse_initializers=True
    metadata_props                         source model, deployprune version, layer sparsity, opset
    save (external data if > 2 GB or external_data=True)
    onnx.checker.check_model(full_check=True) and onnxruntime parity (verify=True)
    rename into place (model file and its ``.data`` side file together)
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deployprune.errors import OutputError, UnsupportedError, UsageError, ValidationFailed, one_line
from deployprune.fsutil import atomic_output, check_writable

from . import COMMON_OPTIONS, Choice, ConversionResult, Verification, resolve_options
from ._common import (
    check_model_and_inputs,
    compared,
    eval_mode,
    io_names,
    metadata_props,
    os_errors_as_output_errors,
    parity,
    run_torch,
    slow_path_tracing,
    tree_size,
)

log = logging.getLogger(__name__)

TARGET = "onnx"
SUFFIX = ".onnx"
EXTERNAL_SUFFIX = ".data"

#: Above this many bytes of tensor data the model is saved with external data (protobuf's hard
#: limit is 2 GiB; keep a margin for the graph itself). Tests lower it to exercise the path.
PROTOBUF_LIMIT = 2**31 - 2**26

#: Name of the sparse weight encoding written in metadata (see encode_sparse_initializers).
SPARSE_ENCODING = "deployprune.bitmask-gather.v1"

#: Opset used when none is given, whichever exporter writes the model: the dynamo exporter's own
#: implementations start at 18 (asked for less it down-converts, which fails for e.g. ReduceMean
#: with dynamic axes and leaves 18), and the torchscript exporter writes 18 exactly, so a fallback
#: export has the same opset as a dynamo one.
DEFAULT_OPSET = 18

#: Node metadata the dynamo exporter writes that carries the user's source: file paths and code
#: lines (stack traces) and the FX node text. An artifact is shipped, so these are dropped.
_SOURCE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")

OPTIONS: dict[str, tuple[Any, Any, str]] = {
    **COMMON_OPTIONS,
    "exporter": (Choice("dynamo", "torchscript"), "dynamo",
                 "torch.onnx exporter: 'dynamo' (torch.export based; if it fails and the option was "
                 "not given, the torchscript exporter is used and the result says so) or "
                 "'torchscript' (dynamo=False, the deprecated tracer)"),
    "opset": (int, None, f"ONNX opset of the default domain (default {DEFAULT_OPSET})"),
    "input_names": (list, None, "graph input names (default input_0, input_1, ...)"),
    "output_names": (list, None, "graph output names (default output_0, output_1, ...)"),
    "dynamic_batch": (bool, False, "make axis 0 of every input and output dynamic"),
    "simplify": (bool, True, "run onnxsim; on failure the unsimplified model is kept with a warning"),
    "simplify_check_n": (int, 1, "onnxsim's own output check: 1 runs it on the example inputs, n > 1 "
                                 "on n random inputs (all-float models), 0 turns it off"),
    "external_data": (bool, False, "store weights in '<file>.data' even below 2 GB "
                                   "(done automatically above)"),
    "sparse_initializers": (bool, False, "store mostly-zero weights as bitmask + non-zero values "
                                         "(lossless, decoded when onnxruntime loads the model)"),
    "sparse_min_sparsity": (float, 0.1, "encode a weight only if at least this fraction is zero"),
    "sparse_min_elements": (int, 1024, "encode a weight only if it has at least this many elements"),
    "model_name": (str, None, "name stored in the metadata (default: the model's class name)"),
    "tolerance": (float, 1e-4, "verify: max abs error allowed, relative to the output's max |value|"),
}


# --------------------------------------------------------------------------- entry point


def convert(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: str | Path,
            **options: Any) -> ConversionResult:
    """Export ``model`` to ONNX at ``path`` (see module docstring and docs/converters.md)."""
    opts = resolve_options(TARGET, OPTIONS, options)
    if opts["opset"] is None:
        opts["opset"] = DEFAULT_OPSET
    _check_compatible(opts, given=set(options))
    # The default exporter may fall back to the torchscript one; a chosen exporter never does.
    fallback = "exporter" not in options and _in_range("torchscript", opts["opset"])
    inputs = check_model_and_inputs(model, example_inputs, TARGET)
    path = check_writable(path, force=opts["force"])
    side = Path(str(path) + EXTERNAL_SUFFIX)
    if side.exists() and not opts["force"]:
        raise OutputError(f"{side}: already exists (external data of a previous export); "
                          "pass --force (force=True) to overwrite it")
    if opts["dynamic_batch"] and any(t.dim() == 0 for t in inputs):
        raise UsageError("onnx option 'dynamic_batch': every input needs a batch axis, "
                         "but an example input is a scalar")

    warnings: list[str] = []
    with eval_mode(model):
        reference = run_torch(model, inputs)
        in_names, out_names = io_names(opts, len(inputs), len(reference), TARGET)
        proto, exporter, fallback_reason = _export_with_fallback(
            model, inputs, in_names, out_names, opts, scratch_parent=path.parent, fallback=fallback)
    if fallback_reason:
        warnings.append(f"exported with the torchscript exporter, not the default dynamo one: "
                        f"{fallback_reason} (choose one with --opt exporter=dynamo|torchscript)")
    opset = _default_opset(proto)
    if opset != opts["opset"]:
        warnings.append(f"the {exporter} exporter produced opset {opset}, not the requested "
                        f"{opts['opset']}; use exporter='torchscript' for an exact opset")
    feeds = {name: t.numpy() for name, t in zip(in_names, inputs, strict=True)}

    simplified = False
    if opts["simplify"]:
        proto, simplified = _simplify(proto, feeds, opts["simplify_check_n"], warnings)

    sparse_stats: dict[str, Any] = {}
    if opts["sparse_initializers"]:
        dense_bytes = _tensor_bytes(proto)
        proto, sparse_stats = encode_sparse_initializers(
            proto, min_sparsity=opts["sparse_min_sparsity"], min_elements=opts["sparse_min_elements"])
        sparse_stats["dense_initializer_bytes"] = dense_bytes
        sparse_stats["encoded_initializer_bytes"] = _tensor_bytes(proto)

    external = bool(opts["external_data"]) or _tensor_bytes(proto) > PROTOBUF_LIMIT
    target_meta = {"opset": opset, "exporter": exporter, "simplified": simplified,
                   "dynamic_batch": opts["dynamic_batch"]}
    if sparse_stats.get("encoded"):
        target_meta["sparse_encoding"] = SPARSE_ENCODING
        target_meta["sparse_tensors"] = len(sparse_stats["encoded"])
    _set_metadata(proto, metadata_props(model, target_meta, opts["model_name"]))

    verify_meta: dict[str, Any] = {}
    with os_errors_as_output_errors(path), \
            atomic_output(path, force=opts["force"], extra_suffixes=(EXTERNAL_SUFFIX,)) as tmp:
        _save(proto, tmp, external)
        del proto  # saving with external data moved the tensors out; do not reuse
        _check(tmp, path)
        if opts["verify"]:
            verify_meta = _verify_onnxruntime(tmp, path, feeds, out_names, reference, opts["tolerance"],
                                              rounding=lambda: _fp32_rounding(model, inputs, reference))
        if external:
            _relocate_external_data(tmp, path.name + EXTERNAL_SUFFIX)

    if not external and side.exists():
        # force=True replaced a model that had external data: its old side file is now stale
        side.unlink()
    size = tree_size(path) + (side.stat().st_size if external and side.exists() else 0)
    for w in warnings:
        log.warning("%s: %s", path, w)
    metadata = {
        "opset": opset,
        "exporter": exporter,
        **({"exporter_fallback": fallback_reason} if fallback_reason else {}),
        "simplified": simplified,
        "external_data": external,
        "external_data_path": str(side) if external else None,
        "input_names": in_names,
        "output_names": out_names,
        **({"sparse": sparse_stats} if opts["sparse_initializers"] else {}),
        **verify_meta,
    }
    return ConversionResult(path=Path(path), target=TARGET, size_bytes=size, options=opts,
                            warnings=warnings, metadata=metadata)


# --------------------------------------------------------------------------- options


def _opset_range(exporter: str) -> tuple[int, int]:
    from torch.onnx import _constants as c

    low = getattr(c, "ONNX_MIN_OPSET", 7)
    high = getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20) if exporter == "torchscript" \
        else getattr(c, "ONNX_MAX_OPSET", 23)
    return low, high


def _in_range(exporter: str, opset: int) -> bool:
    low, high = _opset_range(exporter)
    return low <= opset <= high


def _check_compatible(opts: dict[str, Any], given: set[str]) -> None:
    low, high = _opset_range(opts["exporter"])
    if not low <= opts["opset"] <= high:
        raise UsageError(f"onnx option 'opset': {opts['opset']} is outside {low}..{high} supported by "
                         f"the {opts['exporter']} exporter")
    if opts["sparse_initializers"] and opts["opset"] < 11:
        raise UsageError("onnx options 'sparse_initializers' and 'opset': the sparse encoding needs "
                         f"opset >= 11 (BitShift, CumSum), got opset {opts['opset']}; raise the opset "
                         "or drop sparse_initializers")
    if not 0.0 <= opts["sparse_min_sparsity"] <= 1.0:
        raise UsageError("onnx option 'sparse_min_sparsity' must be between 0 and 1, "
                         f"got {opts['sparse_min_sparsity']}")
    if opts["simplify_check_n"] < 0:
        raise UsageError(f"onnx option 'simplify_check_n' must be >= 0, got {opts['simplify_check_n']}")
    if not opts["simplify"] and "simplify_check_n" in given:
        raise UsageError("onnx options 'simplify_check_n' and 'simplify': the check belongs to the "
                         "simplification, which simplify=False turns off")
    if not opts["sparse_initializers"] and given & {"sparse_min_sparsity", "sparse_min_elements"}:
        raise UsageError("onnx options 'sparse_min_sparsity'/'sparse_min_elements' only apply with "
                         "sparse_initializers=True")
    if not opts["tolerance"] > 0 or opts["tolerance"] == float("inf"):  # also NaN
        raise UsageError(f"onnx option 'tolerance' must be > 0, got {opts['tolerance']}")


# --------------------------------------------------------------------------- export


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WRAPPER = re.compile(r"This is step \d/\d|^Failed to (export|convert|decompose|translate)")
_OP_PATTERNS = (
    re.compile(r"operator '([^']+)'"),  # torchscript exporter: UnsupportedOperatorError
    re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'"),  # dynamo exporter
    re.compile(r"op='([^']+)'"),
    re.compile(r"\b((?:aten|prim|prims|onnx)::[A-Za-z0-9_.]+)"),
)




def unsupported_op(message: str) -> str | None:
    """The op an exporter complained about, from its error message (None if not named)."""
    message = _ANSI.sub("", message)
    for pattern in _OP_PATTERNS:
        m = pattern.search(message)
        if m:
            return m.group(1)
    return None


def _export_error(model: nn.Module, exporter: str, opset: int, exc: BaseException) -> UnsupportedError:
    text = f"{exc}"
    cause = exc.__cause__
    deepest: BaseException = exc
    while cause is not None:
        text += f"\n{cause}"
        deepest = cause
        cause = cause.__cause__
    # torch.onnx's dynamo errors wrap the real one in "Failed to export the model with
    # torch.export. This is step 1/3 ...": name the error underneath.
    summary = str(deepest) if _WRAPPER.search(_ANSI.sub("", text.split("\n", 1)[0])) else text
    op = unsupported_op(text)
    name = type(model).__name__
    other = "torchscript" if exporter == "dynamo" else "dynamo"
    if op:
        return UnsupportedError(
            f"onnx: the {exporter} exporter cannot export op {op!r} of {name} at opset {opset}; "
            f"replace the op in the model, try exporter='{other}'/another opset, or use another target")
    why = one_line(summary, 240, first_line=True)
    return UnsupportedError(f"onnx: the {exporter} exporter failed on {name}: {why}")


def _param_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], in_names: list[str],
            out_names: list[str], opts: dict[str, Any], scratch_parent: Path) -> Any:
    import onnx

    exporter, opset = opts["exporter"], opts["opset"]
    try:
        with slow_path_tracing(model), contextlib.redirect_stdout(io.StringIO()) as chatter, \
                contextlib.redirect_stderr(chatter), _quiet_torch_loggers():
            # torch.export prints the graph it failed on to stderr and logs its guards' warnings;
            # the failure itself is reported (one line), the rest goes to the debug log.
            if exporter == "torchscript":
                proto = _export_torchscript(model, inputs, in_names, out_names, opts, scratch_parent)
            else:
                proto = _export_dynamo(model, inputs, in_names, out_names, opts)
    except (UnsupportedError, UsageError):
        raise
    except Exception as exc:
        raise _export_error(model, exporter, opset, exc) from exc
    if chatter.getvalue().strip():
        log.debug("torch.onnx.export said:\n%s", chatter.getvalue())
    if not isinstance(proto, onnx.ModelProto):  # pragma: no cover - defensive
        raise UnsupportedError(f"onnx: the {exporter} exporter returned no model for {type(model).__name__}")
    return proto


@contextlib.contextmanager
def _quiet_torch_loggers():
    """torch's own loggers (torch.export, symbolic shapes ...) at ERROR inside, unless debugging."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [lg for name, lg in list(logging.Logger.manager.loggerDict.items())
               if isinstance(lg, logging.Logger) and (name == "torch" or name.startswith("torch."))]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.ERROR))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_with_fallback(model: nn.Module, inputs: tuple[torch.Tensor, ...], in_names: list[str],
                          out_names: list[str], opts: dict[str, Any], scratch_parent: Path,
                          fallback: bool) -> tuple[Any, str, str | None]:
    """(model proto, exporter that wrote it, why not dynamo when the torchscript exporter took over).

    With ``fallback`` the torchscript exporter takes over when the dynamo exporter fails, and when
    it cannot write the requested opset (it only down-converts from 18, which can fail and leave
    18); if the torchscript exporter fails at that as well, the dynamo model is kept (the caller
    warns about its opset).
    """
    if not fallback or opts["exporter"] != "dynamo":
        return _export(model, inputs, in_names, out_names, opts, scratch_parent), opts["exporter"], None
    torchscript = {**opts, "exporter": "torchscript"}
    try:
        proto = _export(model, inputs, in_names, out_names, opts, scratch_parent)
    except UnsupportedError as first:
        reason = str(first).removeprefix("onnx: ")
        log.info("%s; trying the torchscript exporter", reason)
        try:
            proto = _export(model, inputs, in_names, out_names, torchscript, scratch_parent)
        except UnsupportedError as second:
            raise UnsupportedError(f"{first} (the torchscript exporter failed too: "
                                   f"{str(second).removeprefix('onnx: ')})") from second
        return proto, "torchscript", reason
    written = _default_opset(proto)
    if written == opts["opset"]:
        return proto, "dynamo", None
    try:
        exact = _export(model, inputs, in_names, out_names, torchscript, scratch_parent)
    except UnsupportedError as exc:
        log.info("the torchscript exporter cannot write opset %d either: %s", opts["opset"], exc)
        return proto, "dynamo", None
    return exact, "torchscript", f"it wrote opset {written}, not the requested {opts['opset']}"


def _export_torchscript(model: nn.Module, inputs: tuple[torch.Tensor, ...], in_names: list[str],
                        out_names: list[str], opts: dict[str, Any], scratch_parent: Path) -> Any:
    import onnx

    kwargs: dict[str, Any] = dict(
        dynamo=False, opset_version=opts["opset"], input_names=in_names, output_names=out_names,
        do_constant_folding=True, export_params=True,
    )
    if opts["dynamic_batch"]:
        kwargs["dynamic_axes"] = {name: {0: "batch"} for name in in_names + out_names}
    import warnings as _warnings

    with _warnings.catch_warnings():
        # torch 2.13 flags the torchscript exporter as legacy; choosing it is deliberate here.
        _warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        _warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        if _param_bytes(model) < PROTOBUF_LIMIT:
            buf = io.BytesIO()
            torch.onnx.export(model, inputs, buf, **kwargs)
            return onnx.load_from_string(buf.getvalue())
        # Too big for one protobuf: the exporter writes external data next to a file; read it back
        # into memory. The hidden scratch directory sits next to the output (where the space for
        # the artifact is) and is removed afterwards.
        with tempfile.TemporaryDirectory(prefix=".deployprune-onnx-", dir=scratch_parent) as scratch:
            f = Path(scratch) / "model.onnx"
            torch.onnx.export(model, inputs, str(f), **kwargs)
            return onnx.load(str(f), load_external_data=True)


def _export_dynamo(model: nn.Module, inputs: tuple[torch.Tensor, ...], in_names: list[str],
                   out_names: list[str], opts: dict[str, Any]) -> Any:
    dynamic_shapes = None
    trace_inputs = inputs
    if opts["dynamic_batch"]:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
        if any(t.shape[0] == 1 for t in inputs):
            # torch.export specializes size-1 dims; trace with a batch of 2 so axis 0 stays symbolic.
            trace_inputs = tuple(torch.cat([t, t], dim=0) for t in inputs)
    program = torch.onnx.export(
        model, trace_inputs, None, dynamo=True, opset_version=opts["opset"], input_names=in_names,
        output_names=out_names, dynamic_shapes=dynamic_shapes, verbose=False, optimize=True,
        external_data=False,
    )
    # The program lives in memory; the dynamo exporter's own '.onnx.data' file is never written:
    # external data is decided and written by _save below like for the other exporter.
    proto = program.model_proto
    name_nodes_by_scope(proto)
    return proto


def name_nodes_by_scope(proto: Any) -> int:
    """Name the dynamo exporter's nodes ``/module/path/Op`` as the torchscript exporter does.

    Validation's layer localization and the report's per-layer table read the torch module of a
    node from its name (:func:`deployprune.stats.module_name_from_scope`); the dynamo exporter
    names nodes ``node_conv2d`` and keeps the module path in the node's
    ``pkg.torch.onnx.name_scopes`` metadata, which onnxsim drops. Each scope step is written by
    its short name (``layer1.0.conv1`` -> ``conv1``); repeated names get ``_1``, ``_2`` on the op.
    A Conv into which the exporter's optimizer fused a BatchNorm carries the BatchNorm's scope; it
    is named after the module owning its weight instead (``layer1.0.conv1``), where the
    torchscript exporter puts it too. Metadata carrying source code and file paths is dropped.
    Returns the number of nodes renamed.
    """
    import ast

    from deployprune.stats import _unqualified

    wanted: dict[int, str] = {}
    for i, node in enumerate(proto.graph.node):
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "None"))
        except (ValueError, SyntaxError):
            continue
        if not isinstance(scopes, list) or not all(isinstance(q, str) for q in scopes):
            continue
        modules = [q for q in scopes[1:-1] if q]
        rules = [r.strip() for r in meta.get("pkg.onnxscript.rewriter.rule_name", "").split(",")]
        if "FuseBatchNormIntoConv" in rules and len(node.input) > 1 and node.input[1].endswith(".weight"):
            owner = node.input[1].removesuffix(".weight")
            while modules and not owner.startswith(modules[-1] + "."):
                modules.pop()
            modules.append(owner)
        wanted[i] = "/" + "".join(_unqualified(q) + "/" for q in modules) + node.op_type
    taken = {n.name for i, n in enumerate(proto.graph.node) if i not in wanted}
    for i, base in wanted.items():
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        proto.graph.node[i].name = name
    _strip_source_metadata(proto.graph.node)
    for function in proto.functions:
        _strip_source_metadata(function.node)
    return len(wanted)


def _strip_source_metadata(nodes: Any) -> None:
    """Drop the stack-trace metadata of ``nodes`` and of the nodes of their subgraphs."""
    from onnx import AttributeProto

    for node in nodes:
        kept = [p for p in node.metadata_props if p.key not in _SOURCE_METADATA]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                _strip_source_metadata(attr.g.node)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _strip_source_metadata(g.node)


def _default_opset(proto: Any) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return -1


# --------------------------------------------------------------------------- simplify


def _simplify(proto: Any, feeds: dict[str, np.ndarray], check_n: int,
              warnings: list[str]) -> tuple[Any, bool]:
    import onnxsim

    # onnxsim feeds ``input_data`` on every check run, so repeating it adds nothing: one run on
    # the example inputs, or n runs on random inputs (only for float inputs: random token ids
    # could index out of range).
    random_ok = check_n > 1 and all(a.dtype.kind == "f" for a in feeds.values())
    kwargs: dict[str, Any] = {"check_n": check_n}
    if random_ok:
        kwargs["test_input_shapes"] = {name: list(a.shape) for name, a in feeds.items()}
    elif check_n:
        kwargs["input_data"] = feeds
    try:
        with contextlib.redirect_stdout(io.StringIO()) as chatter:
            simplified, ok = onnxsim.simplify(proto, **kwargs)
    except Exception as exc:  # onnxsim raises many kinds; any failure means "keep the original"
        warnings.append(f"onnxsim failed ({type(exc).__name__}: {one_line(str(exc), 160, first_line=True)}); "
                        "kept the unsimplified model")
        return proto, False
    log.debug("onnxsim said:\n%s", chatter.getvalue())
    if not ok:
        warnings.append("onnxsim's output check failed (simplified model differs from the export); "
                        "kept the unsimplified model")
        return proto, False
    return simplified, True


# --------------------------------------------------------------------------- sparse weights


_FLOAT_TYPES = None


def _float_types() -> set[int]:
    global _FLOAT_TYPES
    if _FLOAT_TYPES is None:
        from onnx import TensorProto

        _FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    return _FLOAT_TYPES


def encode_sparse_initializers(proto: Any, *, min_sparsity: float = 0.1,
                               min_elements: int = 1024) -> tuple[Any, dict[str, Any]]:
    """Store mostly-zero float initializers as a bitmask plus their non-zero values.

    Each encoded weight ``W`` becomes two initializers, ``W__dp_mask`` (one bit per element,
    little-endian bit order, ``numpy.packbits``) and ``W__dp_values`` (``[0, *nonzeros]``), and a
    few standard opset-11 nodes that rebuild ``W`` exactly::

        bits  = unpack(W__dp_mask)[:numel]                      (BitShift, Sub, Slice)
        index = CumSum(bits) * bits                             (0 where W is zero)
        W     = Reshape(Gather(W__dp_values, index), shape)

    The decoding subgraph depends only on initializers, so onnxruntime constant-folds it when
    the session is created: inference runs on the dense weight, the file holds ~1/32 of the
    dense size plus the non-zeros. (ONNX's own ``sparse_initializer`` is not used: its int64
    indices cost 12 bytes per non-zero, more than dense below 67% sparsity, and
    ``onnx.checker``'s full check rejects it as a node input.) ``-0.0`` is stored as ``+0.0``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    graph_inputs = {i.name for i in graph.input}
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | graph_inputs
    encoded: dict[str, dict[str, Any]] = {}
    keep: list[Any] = []
    new_inits: list[Any] = []
    nodes: list[Any] = []

    def unique(name: str) -> str:
        if name in taken:
            raise UnsupportedError(f"onnx: cannot add tensor {name!r} for the sparse encoding, "
                                   "the name is taken; rename the weight")
        taken.add(name)
        return name

    shared: dict[str, str] = {}

    def const(key: str, array: np.ndarray) -> str:
        if key not in shared:
            shared[key] = unique(f"__dp_sparse_{key}")
            new_inits.append(numpy_helper.from_array(array, shared[key]))
        return shared[key]

    for init in graph.initializer:
        dims = list(init.dims)
        numel = int(np.prod(dims)) if dims else 1
        if (init.name in graph_inputs or init.data_type not in _float_types() or numel < max(min_elements, 1)
                or onnx.external_data_helper.uses_external_data(init)):
            keep.append(init)
            continue
        array = numpy_helper.to_array(init)
        flat = array.reshape(-1)
        nonzero = flat != 0
        zero_fraction = 1.0 - float(nonzero.mean())
        if zero_fraction < min_sparsity or zero_fraction == 0.0:
            keep.append(init)
            continue
        name = init.name
        p = f"{name}__dp_"
        mask = unique(p + "mask")
        values = unique(p + "values")
        new_inits.append(numpy_helper.from_array(np.packbits(nonzero, bitorder="little"), mask))
        new_inits.append(numpy_helper.from_array(
            np.concatenate([np.zeros(1, dtype=flat.dtype), flat[nonzero]]), values))
        shape = unique(p + "shape")
        new_inits.append(numpy_helper.from_array(np.asarray(dims, dtype=np.int64), shape))
        count = unique(p + "numel")
        new_inits.append(numpy_helper.from_array(np.asarray([numel], dtype=np.int64), count))
        col = const("col", np.asarray([-1, 1], dtype=np.int64))
        shifts = const("shifts", np.arange(8, dtype=np.uint8).reshape(1, 8))
        one = const("one", np.ones((1, 1), dtype=np.uint8))
        flat_shape = const("flat", np.asarray([-1], dtype=np.int64))
        zero = const("zero", np.asarray([0], dtype=np.int64))
        axis = const("axis", np.asarray(0, dtype=np.int64))
        t = {k: unique(p + k) for k in ("col", "shr", "half", "even", "bits", "flat", "cut", "i64",
                                         "cum", "index", "dense")}
        nodes += [
            helper.make_node("Reshape", [mask, col], [t["col"]], name=p + "reshape_mask"),
            helper.make_node("BitShift", [t["col"], shifts], [t["shr"]], direction="RIGHT",
                             name=p + "shift"),
            helper.make_node("BitShift", [t["shr"], one], [t["half"]], direction="RIGHT", name=p + "half"),
            helper.make_node("BitShift", [t["half"], one], [t["even"]], direction="LEFT", name=p + "even"),
            helper.make_node("Sub", [t["shr"], t["even"]], [t["bits"]], name=p + "bit"),
            helper.make_node("Reshape", [t["bits"], flat_shape], [t["flat"]], name=p + "flatten"),
            helper.make_node("Slice", [t["flat"], zero, count, zero], [t["cut"]], name=p + "trim"),
            helper.make_node("Cast", [t["cut"]], [t["i64"]], to=TensorProto.INT64, name=p + "cast"),
            helper.make_node("CumSum", [t["i64"], axis], [t["cum"]], name=p + "cumsum"),
            helper.make_node("Mul", [t["cum"], t["i64"]], [t["index"]], name=p + "index"),
            helper.make_node("Gather", [values, t["index"]], [t["dense"]], axis=0, name=p + "gather"),
            helper.make_node("Reshape", [t["dense"], shape], [name], name=p + "reshape"),
        ]
        encoded[name] = {"shape": dims, "sparsity": round(zero_fraction, 6),
                         "dense_bytes": int(array.nbytes),
                         "encoded_bytes": int((numel + 7) // 8 + (int(nonzero.sum()) + 1) * array.itemsize)}
    if not encoded:
        return proto, {"encoded": {}}
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old_nodes)
    return proto, {"encoded": encoded}


# --------------------------------------------------------------------------- save / check


def _tensor_bytes(proto: Any) -> int:
    """Bytes of tensor data held in the model (initializers and Constant nodes, subgraphs included)."""
    total = 0
    for tensor in _all_tensors(proto.graph):
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += 4 * (len(tensor.float_data) + len(tensor.int32_data)) + 8 * (
                len(tensor.int64_data) + len(tensor.double_data) + len(tensor.uint64_data))
    return total


def _all_tensors(graph: Any):
    from onnx import AttributeProto

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def _set_metadata(proto: Any, props: dict[str, str]) -> None:
    existing = {p.key: p.value for p in proto.metadata_props}
    existing.update(props)
    del proto.metadata_props[:]
    for key, value in existing.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _save(proto: Any, tmp: Path, external: bool) -> None:
    import onnx

    if not external:
        onnx.save_model(proto, str(tmp))
        return
    # The data file is written under the temporary name (tmp + '.data', which atomic_output
    # moves next to the final file) and renamed in the model afterwards (_relocate_external_data).
    onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=tmp.name + EXTERNAL_SUFFIX, size_threshold=1024, convert_attribute=False)


def _relocate_external_data(tmp: Path, location: str) -> None:
    import onnx

    model = onnx.load(str(tmp), load_external_data=False)
    for tensor in _all_tensors(model.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(tmp))


def _check(tmp: Path, path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as exc:
        raise ValidationFailed(f"{path}: onnx.checker (full check) rejected the exported model: "
                               f"{one_line(str(exc), 240, first_line=True)}") from exc


def _fp32_rounding(model: nn.Module, inputs: tuple[torch.Tensor, ...], reference: list[np.ndarray]) -> float:
    """How far torch's own fp32 output is from an fp64 run of the same model (its rounding noise)."""
    import copy

    try:
        m64 = copy.deepcopy(model).double()
        with eval_mode(m64):
            ref64 = run_torch(m64, tuple(t.double() if t.is_floating_point() else t for t in inputs))
    except Exception:  # noqa: BLE001 - a model that cannot run in fp64 gets no allowance
        return 0.0
    return max((float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                for a, b in zip(reference, ref64, strict=True) if np.size(a)), default=0.0)


def _verify_onnxruntime(tmp: Path, path: Path, feeds: dict[str, np.ndarray], out_names: list[str],
                        reference: list[np.ndarray], tolerance: float,
                        rounding: Any = None) -> dict[str, Any]:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        outputs = session.run(out_names, feeds)
    except Exception as exc:
        raise ValidationFailed(f"{path}: onnxruntime cannot run the exported model: "
                               f"{one_line(str(exc), 240, first_line=True)}") from exc
    rel, err = parity(reference, outputs)
    if not rel <= tolerance and rounding is not None and np.isfinite(err):
        # An output that nearly cancels makes the relative figure meaningless: accept an error
        # within a few times torch's own fp32 rounding of this very output.
        noise = rounding()
        if err <= 8 * noise:
            return {"ort_max_abs_error": err, "ort_relative_error": rel, "torch_fp32_rounding": noise}
    if not rel <= tolerance:
        raise ValidationFailed(
            f"{path}: onnxruntime output differs from torch (max abs error {err:.3g} = {rel:.3g} of the "
            f"output scale > tolerance {tolerance:g}); nothing was written")
    return {"ort_max_abs_error": err, "ort_relative_error": rel}


def verify(path: str | Path, model: nn.Module, example_inputs: tuple[torch.Tensor, ...], *,
           tolerance: float = OPTIONS["tolerance"][1]) -> Verification:
    """The converter interface's check of a written ``.onnx`` file: onnxruntime's outputs on
    ``example_inputs`` against ``model``'s (relative to the output scale, within ``tolerance``)."""
    inputs = check_model_and_inputs(model, example_inputs, TARGET)
    reference = run_torch(model, inputs)
    try:
        got = onnxruntime_outputs(path, inputs)
    except Exception as exc:  # noqa: BLE001 - an artifact onnxruntime cannot run fails verification
        why = one_line(str(exc), 240, first_line=True)
        return Verification(passed=False, failures=[f"{path}: onnxruntime cannot run it: {why}"])
    return compared(reference, got, tolerance, f"{path}: onnxruntime output")


def onnxruntime_outputs(path: str | Path, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """Run an ONNX file in onnxruntime on ``inputs`` (in graph-input order)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)})


__all__ = ["OPTIONS", "SUFFIX", "convert", "encode_sparse_initializers", "onnxruntime_outputs",
           "unsupported_op", "verify"]
