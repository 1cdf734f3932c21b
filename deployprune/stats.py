"""Model statistics: parameters, MACs, file sizes and a per-layer before/after table.

MACs are counted with torch's own :class:`torch.utils.flop_counter.FlopCounterMode`, which
counts the FLOPs of matrix multiplications and convolutions (``mm``, ``addmm``, ``bmm``,
``convolution``, scaled-dot-product attention ...) and nothing else: element-wise ops,
normalization, pooling and activations are free. One multiply-accumulate is two FLOPs there,
so ``MACs = FLOPs / 2``. Scaled-dot-product attention's CPU kernel is given torch's attention
formula, and the fused eval fast paths of ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` are switched off while counting (``torch.backends.mha``), so
attention is counted (``Q Kᵀ`` and the weighted sum of ``V``). Other ops torch has no formula for
are not counted; :func:`onnx_macs` counts the exported graph's Conv/Gemm/MatMul nodes instead
and is the figure to compare ONNX artifacts with.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "LayerRow",
    "count_params",
    "count_nonzero_params",
    "count_macs",
    "macs_by_module",
    "onnx_macs",
    "onnx_params",
    "file_size",
    "layer_table",
    "onnx_layers",
]

# Modules that own the channels a pruner removes. Anything else with a weight is reported too,
# with in/out read from the weight shape.
_LAYER_TYPES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.Bilinear,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.Embedding, nn.MultiheadAttention,
)


def _as_tuple(inputs: Any) -> tuple[Any, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    return tuple(inputs)


def _tensor_names(module: nn.Module) -> list[str]:
    """Names of the tensors a module owns directly, seeing through parametrizations.

    A module masked with ``torch.nn.utils.parametrize`` keeps ``weight`` as a property and
    its parameter under ``parametrizations.weight.original``; ``getattr(module, "weight")``
    then returns the masked tensor, which is what statistics should describe.
    """
    names = [n for n, _ in module.named_parameters(recurse=False)]
    parametrized = getattr(module, "parametrizations", None)
    if isinstance(parametrized, nn.ModuleDict):
        names.extend(k for k in parametrized.keys() if k not in names)
    return names


def _leaf_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if "parametrizations" in name.split("."):
            continue
        yield name, module


def _unique_tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    """Every parameter tensor once (shared parameters are yielded once), masked if parametrized."""
    seen: set[int] = set()
    for _, module in _leaf_modules(model):
        for pname in _tensor_names(module):
            t = getattr(module, pname)
            if not isinstance(t, torch.Tensor):
                continue
            owner = t
            if _is_parametrized(module, pname):  # `original`, or `original0`... (weight_norm)
                plist = module.parametrizations[pname]
                owner = next((getattr(plist, n) for n in ("original", "original0") if hasattr(plist, n)), t)
            if id(owner) in seen:
                continue
            seen.add(id(owner))
            yield t


def count_params(model: nn.Module) -> int:
    """Number of parameter elements; parameters shared between modules count once."""
    return sum(t.numel() for t in _unique_tensors(model))


def count_nonzero_params(model: nn.Module) -> int:
    """Parameter elements that are not exactly zero (masked weights read as zero)."""
    return sum(int(torch.count_nonzero(t.detach()).item()) for t in _unique_tensors(model))


def _is_parametrized(module: nn.Module, pname: str) -> bool:
    p = getattr(module, "parametrizations", None)
    return isinstance(p, nn.ModuleDict) and pname in p


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                    **kwargs: Any) -> int:
    """FLOPs of ``scaled_dot_product_attention``'s CPU kernel, which torch's counter has no formula for."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _flop_counts(model: nn.Module, inputs: Any) -> dict[str, int]:
    from torch.utils.flop_counter import FlopCounterMode

    args = _as_tuple(inputs)
    was_training = model.training
    model.eval()
    # Counted as the math it is: on CPU, scaled_dot_product_attention runs a kernel the counter does
    # not know, and the eval fast paths of nn.MultiheadAttention / nn.TransformerEncoderLayer fused
    # ops (no formula either), so all would count as free. The fast paths are switched off while
    # counting (the same projections and attention, unfused).
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _cpu_sdpa_flops
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(*args)
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    out: dict[str, int] = {}
    root = type(model).__name__
    for name, per_op in counter.get_flop_counts().items():
        flops = int(sum(per_op.values()))
        if name == "Global":
            out[""] = flops
            continue
        # FlopCounterMode names modules "<RootClass>.<qualified name>"; the root is "<RootClass>".
        if name == root:
            continue
        if name.startswith(root + "."):
            name = name[len(root) + 1:]
        out[name] = flops
    return out


def count_macs(model: nn.Module, inputs: Any) -> int:
    """Multiply-accumulates of one forward pass on ``inputs`` (FLOPs / 2, see module doc)."""
    return _flop_counts(model, inputs).get("", 0) // 2


def macs_by_module(model: nn.Module, inputs: Any) -> dict[str, int]:
    """MACs per module qualified name (a parent includes its children); ``""`` is the total."""
    return {k: v // 2 for k, v in _flop_counts(model, inputs).items()}


# ---------------------------------------------------------------------------------------------
# ONNX


def _load_onnx(path: str | os.PathLike, *, with_data: bool) -> Any:
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: ONNX file not found; check the path")
    try:
        return onnx.load(str(path), load_external_data=with_data)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValidationError ...
        raise InputError(f"{path}: cannot read as ONNX ({type(exc).__name__}: {exc}); "
                         "re-export the model") from exc


_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _float_initializers(model: Any) -> list[Any]:
    import onnx

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16}
    return [i for i in model.graph.initializer if i.data_type in floats]


def onnx_params(path: str | os.PathLike, *, nonzero: bool = False) -> int:
    """Elements of the graph's floating-point initializers (integer shape constants excluded);
    with ``nonzero=True`` only the elements that are not exactly zero."""
    import numpy as np
    from onnx import numpy_helper

    model = _load_onnx(path, with_data=nonzero)
    total = 0
    for init in _float_initializers(model):
        if nonzero:
            total += int(np.count_nonzero(numpy_helper.to_array(init)))
        else:
            total += int(np.prod([int(d) for d in init.dims], dtype=np.int64))
    return total


_ONNX_NP_TYPES = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32",
                  9: "bool", 2: "uint8", 3: "int8", 5: "int16"}


def _runtime_shapes(path: Path, model: Any, names: set[str],
                    input_shapes: list[list[int]]) -> dict[str, list[int]]:
    """Shapes of ``names`` observed by running the graph once in onnxruntime on zeros."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    full = _load_onnx(path, with_data=True)
    existing = {o.name for o in full.graph.output}
    for n in sorted(names - existing):
        full.graph.output.append(onnx.ValueInfoProto(name=n))
    if full.ByteSize() > 2**31 - 1:
        return {}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(full.SerializeToString(), so, providers=["CPUExecutionProvider"])
    init_names = {i.name for i in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in init_names]
    feed = {}
    for inp, shape in zip(real_inputs, input_shapes, strict=True):
        dtype = _ONNX_NP_TYPES.get(inp.type.tensor_type.elem_type, "float32")
        feed[inp.name] = np.zeros(shape, dtype=dtype)
    outs = sess.run(None, feed)
    return {o.name: list(v.shape) for o, v in zip(sess.get_outputs(), outs, strict=True)}


def onnx_macs(path: str | os.PathLike,
              input_shapes: Sequence[Sequence[int]] | None = None) -> int | None:
    """MACs of the Conv, ConvTranspose, Gemm and MatMul nodes of an ONNX graph.

    Symbolic input dimensions are replaced by ``input_shapes`` (one shape per graph input, in
    order) or by 1. Shapes come from ONNX shape inference; when it cannot resolve one (e.g.
    attention reshapes), the graph is run once in onnxruntime on zeros to observe it.
    Returns None if a shape stays unknown.
    """
    import onnx
    from onnx import shape_inference

    path = Path(path)
    model = _load_onnx(path, with_data=False)
    graph = model.graph
    init_names = {i.name for i in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in init_names]
    concrete: list[list[int]] = []
    for k, inp in enumerate(real_inputs):
        dims = inp.type.tensor_type.shape.dim
        shape = []
        for j, d in enumerate(dims):
            if not d.HasField("dim_value"):
                value = 1
                if input_shapes is not None and k < len(input_shapes) and j < len(input_shapes[k]):
                    value = int(input_shapes[k][j])
                d.Clear()
                d.dim_value = value
            shape.append(int(d.dim_value))
        concrete.append(shape)
    shapes: dict[str, list[int]] = {}
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
        g = inferred.graph
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                shapes[vi.name] = [int(d.dim_value) for d in tt.shape.dim]
    except Exception as exc:  # pragma: no cover - depends on the graph
        log.info("onnx shape inference failed (%s); observing shapes in onnxruntime", exc)
    for init in graph.initializer:
        shapes[init.name] = [int(d) for d in init.dims]
    compute = [n for n in graph.node if n.op_type in _COMPUTE_OPS]
    needed = {t for n in compute for t in (n.input[0], n.input[1], n.output[0])}
    missing = needed - set(shapes)
    if missing:
        try:
            shapes.update(_runtime_shapes(path, model, missing, concrete))
        except Exception as exc:
            log.info("onnx_macs: cannot observe shapes in onnxruntime (%s)", exc)
            return None

    def numel(shape: Sequence[int]) -> int:
        n = 1
        for d in shape:
            n *= int(d)
        return n

    total = 0
    for node in compute:
        a_shape = shapes.get(node.input[0])
        b_shape = shapes.get(node.input[1])
        y_shape = shapes.get(node.output[0])
        if a_shape is None or b_shape is None or y_shape is None:
            log.info("onnx_macs: shape around %s unknown; MACs not computed",
                     node.name or node.op_type)
            return None
        if node.op_type == "Conv":
            # weight (C_out, C_in/groups, k...): each output element costs C_in/groups * prod(k)
            total += numel(y_shape) * numel(b_shape[1:])
        elif node.op_type == "ConvTranspose":
            # weight (C_in, C_out/groups, k...): each input element feeds C_out/groups * prod(k)
            total += numel(a_shape) * numel(b_shape[1:])
        elif node.op_type == "Gemm":
            trans_a = any(a.name == "transA" and onnx.helper.get_attribute_value(a)
                          for a in node.attribute)
            total += numel(y_shape) * (a_shape[0] if trans_a else a_shape[1])
        else:  # MatMul
            total += numel(y_shape) * (a_shape[-1] if a_shape else 1)
    return total


_SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Add", "Identity")


def _renamed_node_scope(node: Any, consumers: dict[str, list[Any]],
                        names: set[str] | None) -> str | None:
    """Module of a compute node a simplifier renamed (``Gemm_3``): from the torch name of its
    initializers (``blocks.0.mlp.fc2.bias``), else from a scoped tensor name a few shape-only
    ops downstream (``/blocks/blocks.0/mlp/fc2/Add_output_0``), as a ``/``-scope or a module."""
    for name in node.input[1:]:
        for suffix in (".weight", ".bias"):
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                if names is None or module in names:
                    return "module:" + module
    frontier = list(node.output)
    for _ in range(3):
        nxt = []
        for tensor in frontier:
            for user in consumers.get(tensor, []):
                if user.op_type not in _SHAPE_OPS:
                    continue
                for out in user.output:
                    if out.startswith("/") and "/" in out[1:]:
                        return out.rsplit("/", 1)[0]
                nxt.extend(user.output)
        frontier = nxt
    return None


def onnx_layers(path: str | os.PathLike,
                modules: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per torch module holding Conv/Gemm/MatMul nodes with constant weights: channels,
    parameters and weight sparsity of the exported layer.

    Node names follow the TorchScript exporter (``/layer1/layer1.0/conv1/Conv``); the module
    name is recovered from the scope (``modules``, the source's qualified module names, makes
    this exact, see :func:`module_name_from_scope`). A node a simplifier renamed is placed
    through its initializers' torch names or the scoped name of a tensor just downstream.
    ``in_channels`` comes from the module's first weighted node and ``out_channels`` from its
    last (an attention block: input projection in, output projection out); parameters sum
    every float initializer its nodes use (a bias added by a separate ``Add`` included).
    """
    import numpy as np
    from onnx import numpy_helper

    path = Path(path)
    model = _load_onnx(path, with_data=True)
    floats = {i.name: i for i in _float_initializers(model)}
    names = set(modules) if modules is not None else None
    index = ScopeIndex(names) if names is not None else None
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    groups: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.name.startswith("/"):
            scope = node.name.rsplit("/", 1)[0]
        elif node.op_type in _COMPUTE_OPS and len(node.input) > 1 and node.input[1] in floats:
            scope = _renamed_node_scope(node, consumers, names)
            if scope is None:
                continue
        else:
            continue
        if scope.startswith("module:"):
            module = scope[len("module:"):]
        else:
            module = module_name_from_scope(scope + "/_", index)
        if module:
            groups.setdefault(module, []).append(node)
    out: dict[str, dict[str, Any]] = {}
    for module, nodes in groups.items():
        weighted = [n for n in nodes
                    if n.op_type in _COMPUTE_OPS and len(n.input) > 1 and n.input[1] in floats]
        if not weighted:
            continue
        weights = [numpy_helper.to_array(floats[n.input[1]]) for n in weighted]
        ios = [_weight_io(n, w) for n, w in zip(weighted, weights, strict=True)]
        used = dict.fromkeys(i for n in nodes for i in n.input if i in floats)
        size = sum(int(w.size) for w in weights)
        zeros = sum(int((w == 0).sum()) for w in weights)
        out[module] = {
            "op_type": "+".join(dict.fromkeys(n.op_type for n in weighted)),
            "onnx_node": weighted[0].name,
            "in_channels": ios[0][0],
            "out_channels": ios[-1][1],
            "params": int(sum(np.prod([int(d) for d in floats[i].dims], dtype=np.int64)
                              for i in used)),
            "sparsity": zeros / size if size else 0.0,
        }
    return out


def _weight_io(node: Any, w: Any) -> tuple[int, int]:
    """(in, out) channels of a compute node from its constant weight."""
    attrs = {a.name: a for a in node.attribute}
    groups = attrs["group"].i if "group" in attrs else 1
    if node.op_type == "Conv":
        return int(w.shape[1]) * int(groups), int(w.shape[0])
    if node.op_type == "ConvTranspose":
        return int(w.shape[0]), int(w.shape[1]) * int(groups)
    if w.ndim < 2:
        return int(w.shape[0]) if w.ndim else 1, int(w.shape[0]) if w.ndim else 1
    if node.op_type == "Gemm" and "transB" in attrs and attrs["transB"].i == 1:
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[-2]), int(w.shape[-1])  # MatMul / Gemm without transB: (in, out)


def _unqualified(qualified: str) -> str:
    """The exporter's short scope name: the last non-numeric atom and the indices after it
    (``layer1.0.conv1`` -> ``conv1``, ``features.3`` -> ``features.3``, ``heads.a`` -> ``a``)."""
    atoms = qualified.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isdigit():
            return ".".join(atoms[i:])
    return qualified


class ScopeIndex(dict):
    """Qualified module names grouped by their exporter short name (build once, reuse)."""

    def __init__(self, modules: Iterable[str]) -> None:
        super().__init__()
        for q in modules:
            if q:
                self.setdefault(_unqualified(q), []).append(q)


def module_name_from_scope(node_name: str, modules: Iterable[str] | None = None) -> str | None:
    """Torch module name of an ONNX node written by the TorchScript exporter (``dynamo=False``).

    The exporter names a node after the chain of module calls that produced it, each module
    shown by its short name (:func:`_unqualified`):
    ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``. With ``modules`` (the source's
    qualified module names) each step is resolved among the descendants of the previous one,
    a ``_<n>`` suffix (the n-th extra call of a module) is accepted, and an unresolvable name
    gives None. Without it the chain is joined, which is right unless a module is reached
    through a container's ``__getitem__`` from a non-parent.
    """
    if not node_name.startswith("/"):
        return None
    parts = [p for p in node_name.split("/") if p][:-1]
    if not parts:
        return None
    if modules is not None:
        by_short = modules if isinstance(modules, ScopeIndex) else ScopeIndex(modules)
        name = ""
        for part in parts:
            options = by_short.get(part)
            if options is None:
                base, _, count = part.rpartition("_")
                options = by_short.get(base) if base and count.isdigit() else None
            if not options:
                return None
            inside = [q for q in options if not name or q.startswith(name + ".")]
            if not inside:
                return None
            name = min(inside, key=len)
        return name
    atoms: list[str] = []
    for part in parts:
        new = part.split(".")
        head = new[0]
        # "block.0" after "...block": the short name re-states the tail of the path so far
        j = max((i for i, a in enumerate(atoms) if a == head), default=-1)
        if j >= 0 and all(a.isdigit() for a in atoms[j + 1:]) and len(new) > 1:
            atoms = atoms[:j] + new
        else:
            atoms = atoms + new
    return ".".join(atoms)


# ---------------------------------------------------------------------------------------------
# Files


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk: a file, a directory (``.mlpackage``) summed, or an ONNX file plus its
    external-data side files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: not found; check the path")
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    size = path.stat().st_size
    if path.suffix == ".onnx":
        size += sum(p.stat().st_size for p in _onnx_external_files(path))
    return size


def _onnx_external_files(path: Path) -> list[Path]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    files: set[Path] = set()
    for init in model.graph.initializer:
        if onnx.external_data_helper.uses_external_data(init):
            for entry in init.external_data:
                if entry.key == "location":
                    p = path.parent / entry.value
                    if p.is_file():
                        files.add(p)
    return sorted(files)


# ---------------------------------------------------------------------------------------------
# Per-layer table


@dataclass
class LayerRow:
    """One layer before and after compaction. ``None`` means the layer does not exist there."""

    name: str
    type: str
    in_before: int | None
    in_after: int | None
    out_before: int | None
    out_after: int | None
    params_before: int | None
    params_after: int | None
    sparsity_before: float | None  # fraction of exactly-zero weight elements
    sparsity_after: float | None

    @property
    def channels_removed(self) -> float | None:
        """Fraction of output channels removed, or None when unknown."""
        if not self.out_before or self.out_after is None:
            return None
        return 1.0 - self.out_after / self.out_before


def _module_io(module: nn.Module) -> tuple[int | None, int | None]:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                           nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Bilinear):
        return module.in1_features, module.out_features
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return module.num_features, module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, module.num_channels
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, module.embed_dim
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        if weight.ndim >= 2:
            return int(weight.shape[1]), int(weight.shape[0])
        if weight.ndim == 1:
            return int(weight.shape[0]), int(weight.shape[0])
    return None, None


def _module_summary(module: nn.Module) -> dict[str, Any]:
    in_ch, out_ch = _module_io(module)
    if isinstance(module, nn.MultiheadAttention):  # its output projection is a child module
        params = count_params(module)
    else:
        params = sum(t.numel() for pname in _tensor_names(module)
                     if isinstance(t := getattr(module, pname), torch.Tensor))
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.MultiheadAttention):
        weight = module.in_proj_weight
        if weight is None:
            weight = module.q_proj_weight
    sparsity = None
    if isinstance(weight, torch.Tensor) and weight.numel():
        sparsity = float((weight.detach() == 0).sum().item() / weight.numel())
    return {"type": type(module).__name__, "in_channels": in_ch, "out_channels": out_ch,
            "params": params, "sparsity": sparsity}


def _model_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, module in _leaf_modules(model):
        if not name:
            continue
        if isinstance(module, _LAYER_TYPES) or (
            not list(module.children()) and any(True for _ in _tensor_names(module))
        ):
            out[name] = _module_summary(module)
    return out


def layer_table(model_before: nn.Module,
                model_after: nn.Module | str | os.PathLike) -> list[LayerRow]:
    """Per-layer channels, parameters and weight sparsity, before and after.

    ``model_after`` is the compacted ``nn.Module`` or an exported ``.onnx`` file (layers then
    come from the Conv/Gemm/MatMul nodes, matched by the exporter's scope names; BatchNorm
    layers folded into convolutions appear as missing there). Rows follow ``model_before``'s
    module order, followed by layers that only exist after.
    """
    before = _model_layers(model_before)
    before_names = [n for n, _ in model_before.named_modules()]
    if isinstance(model_after, nn.Module):
        after = _model_layers(model_after)
    else:
        after = {
            name: {"type": info["op_type"], "in_channels": info["in_channels"],
                   "out_channels": info["out_channels"], "params": info["params"],
                   "sparsity": info["sparsity"]}
            for name, info in onnx_layers(model_after, before_names).items()
        }
    rows: list[LayerRow] = []
    for name in list(before) + [n for n in after if n not in before]:
        b = before.get(name)
        a = after.get(name)
        rows.append(LayerRow(
            name=name,
            type=(b or a or {}).get("type", "?"),
            in_before=b["in_channels"] if b else None,
            in_after=a["in_channels"] if a else None,
            out_before=b["out_channels"] if b else None,
            out_after=a["out_channels"] if a else None,
            params_before=b["params"] if b else None,
            params_after=a["params"] if a else None,
            sparsity_before=b["sparsity"] if b else None,
            sparsity_after=a["sparsity"] if a else None,
        ))
    return rows
