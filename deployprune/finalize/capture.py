"""Capture a model's graph by recording one eager run.

``torch.fx`` symbolic tracing cannot follow the Python that real library code is written in
(iteration over proxies, item assignment, data-dependent branches, ``co_varnames`` wrappers), so
finalize falls back to recording: the model runs once, eagerly, on its example inputs, and every
torch function, Tensor method and operator applied to a tensor the run produced is written into a
``torch.fx.Graph`` with the same vocabulary symbolic tracing uses:

* ``torch.nn`` modules (and modules with a user rule) are ``call_module`` nodes, their insides are
  not recorded;
* functions (``torch.cat``, ``F.linear``, ``F.scaled_dot_product_attention``) are ``call_function``
  nodes, Tensor methods (``x.view(...)``) ``call_method`` nodes and operators (``x + y``,
  ``x[..., :64]``) ``operator.*`` nodes;
* parameters and buffers read directly in ``forward`` are ``get_attr`` nodes.

So the per-op rules are the same for both captures. Python control flow is resolved on the example
inputs (the compacted model is checked on fresh inputs afterwards), and sizes computed from tensor
shapes arrive as plain integers. The compacted model is the user's own module tree re-run eagerly,
so sizes its ``forward`` computes from shapes follow the new widths by themselves; a size that does
not (a fixed attribute) is found by recording the compacted model and comparing shapes node by node.

The recorder patches ``nn.Module.__call__`` for the duration of the run (module calls must be seen
to keep leaves whole and to know which module's ``forward`` created a node) and uses a
``TorchFunctionMode`` for everything else.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .trace import Region, TensorMeta, Traced, _meta

log = logging.getLogger(__name__)

# Tensor dunder methods -> the operator fx uses for them; "r" variants swap their operands
_DUNDER: dict[str, tuple[Any, bool]] = {}
for _name, _op in [("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("floordiv", operator.floordiv), ("matmul", operator.matmul),
                   ("pow", operator.pow), ("mod", operator.mod), ("and", operator.and_), ("or", operator.or_),
                   ("xor", operator.xor)]:
    _DUNDER[f"__{_name}__"] = (_op, False)
    _DUNDER[f"__r{_name}__"] = (_op, True)
for _name, _op in [("iadd", operator.iadd), ("isub", operator.isub), ("imul", operator.imul),
                   ("itruediv", operator.itruediv)]:
    _DUNDER[f"__{_name}__"] = (_op, False)
_DUNDER.update({
    "__getitem__": (operator.getitem, False), "__setitem__": (operator.setitem, False),
    "__neg__": (operator.neg, False), "__invert__": (operator.invert, False),
    "__eq__": (operator.eq, False), "__ne__": (operator.ne, False), "__lt__": (operator.lt, False),
    "__le__": (operator.le, False), "__gt__": (operator.gt, False), "__ge__": (operator.ge, False),
})
_INPLACE_OPS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}
# tensor-valued properties, as the method fx would have recorded
_PROPERTIES = {"T": "t", "mT": "mT", "data": "detach", "real": "real"}


def is_leaf(module: nn.Module) -> bool:
    """Modules recorded whole: torch.nn's own layers and module types with a user rule."""
    from .rule_registry import has_user_rule

    if has_user_rule(module):
        return True
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    mod = type(module).__module__ or ""
    return mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")


class _Recorder:
    def __init__(self, model: nn.Module):
        self.model = model
        self.graph = fx.Graph()
        self.names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.attrs: dict[int, str] = {}
        for mname, m in model.named_modules(remove_duplicate=False):
            for pname, p in list(m._parameters.items()) + list(m._buffers.items()):
                if p is not None:
                    self.attrs.setdefault(id(p), f"{mname}.{pname}" if mname else pname)
        self.node_of: dict[int, fx.Node] = {}  # id(tensor) -> the node that produced it
        self.keep_alive: list[Any] = []  # tensors whose ids are in node_of
        self.values: dict[fx.Node, Any] = {}
        self.scope: list[str] = [""]
        self.leaf_depth = 0
        self.regions: dict[str, list[Region]] = {}
        self.index = 0
        self.consts = 0
        self.failed_index: int | None = None  # index the failing call's node would have had
        self.int_reads: dict[str, set[str]] = {}  # module -> names of int attributes its forward read

    # ----------------------------------------------------------------- nodes
    def _node(self, op: str, target: Any, args: tuple, kwargs: dict, value: Any, owner: str | None = None) -> fx.Node:
        node = self.graph.create_node(op, target, args, kwargs)
        node.meta["owner"] = self.scope[-1] if owner is None else owner
        node.meta["index"] = self.index
        self.index += 1
        self.values[node] = _meta(value)
        return node

    def _bind(self, value: Any, node: fx.Node) -> None:
        """Map every tensor in ``value`` to ``node`` (tuples get getitem nodes, as fx's unpacking does)."""
        if isinstance(value, torch.Tensor):
            self.node_of[id(value)] = node
            self.keep_alive.append(value)
        elif isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
            for i, v in enumerate(value):
                if _has_tensor(v):
                    item = self._node("call_function", operator.getitem, (node, i), {}, v, node.meta["owner"])
                    self._bind(v, item)

    def tensor_arg(self, t: torch.Tensor) -> fx.Node:
        node = self.node_of.get(id(t))
        if node is not None:
            return node
        target = self.attrs.get(id(t))
        if target is None:  # a tensor from outside the graph (a plain attribute, a global constant)
            target = f"_deployprune_constant_{self.consts}"
            self.consts += 1
        node = self._node("get_attr", target, (), {}, t, "")
        node.meta["constant"] = t if target.startswith("_deployprune_constant_") else None
        self.node_of[id(t)] = node
        self.keep_alive.append(t)
        return node

    def map_args(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.tensor_arg(value)
        if isinstance(value, torch.Size):
            return tuple(int(s) for s in value)
        if isinstance(value, (tuple, list)):
            mapped = [self.map_args(v) for v in value]
            return tuple(mapped) if isinstance(value, tuple) else mapped
        if isinstance(value, dict):
            return {k: self.map_args(v) for k, v in value.items()}
        if isinstance(value, slice):
            return slice(self.map_args(value.start), self.map_args(value.stop), self.map_args(value.step))
        return value

    # ----------------------------------------------------------------- function calls
    def record_call(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if not _has_tensor(out):
            if getattr(func, "__name__", "") == "__setitem__" and isinstance(args[0], torch.Tensor):
                out = args[0]  # item assignment: a new version of the assigned tensor
            else:
                return  # sizes, dtypes, item(), bool(): plain Python values in the graph
        if not _has_tensor((args, kwargs)) and not isinstance(out, torch.Tensor):
            return
        op, target, args = self._target(func, args)
        if target is None:
            return
        node = self._node(op, target, self.map_args(tuple(args)), self.map_args(dict(kwargs)), out)
        if target in _INPLACE_OPS or (op == "call_method" and str(target).endswith("_")
                                       and isinstance(out, torch.Tensor)):
            node.meta["inplace"] = True
        self._bind(out, node)

    def _target(self, func: Any, args: tuple) -> tuple[str, Any, tuple]:
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property of a tensor (x.T, x.data, ...)
            prop = getattr(getattr(func, "__self__", None), "__name__", "")
            return "call_method", _PROPERTIES.get(prop, prop or "property"), args
        qual = getattr(func, "__qualname__", "") or ""
        if qual.split(".")[0] in ("TensorBase", "Tensor", "_TensorBase") and qual.count(".") == 1:
            name = qual.split(".")[1]  # a method, possibly through torch._tensor's operator wrappers
            if name in _DUNDER:
                target, swap = _DUNDER[name]
                if swap:
                    args = (args[1], args[0], *args[2:])
                return "call_function", target, args
            return "call_method", name, args
        if name in _DUNDER and _is_tensor_method(func, name):
            target, swap = _DUNDER[name]
            if swap:
                args = (args[1], args[0], *args[2:])
            return "call_function", target, args
        if _is_tensor_method(func, name):
            return "call_method", name, args
        if qual.startswith("_VariableFunctionsClass.") and callable(getattr(torch, name, None)):
            func = getattr(torch, name)  # torch.cat as the mode sees it -> torch.cat as forward wrote it
        return "call_function", func, args

    # ----------------------------------------------------------------- module calls
    def call_module(self, module: nn.Module, call: Any, args: tuple, kwargs: dict) -> Any:
        qualname = self.names.get(id(module))
        if qualname is None or self.leaf_depth:
            return call(module, *args, **kwargs)
        if qualname and is_leaf(module):
            self.leaf_depth += 1
            try:
                out = call(module, *args, **kwargs)
            except Exception:
                if self.failed_index is None:
                    self.failed_index = self.index
                raise
            finally:
                self.leaf_depth -= 1
            if not _has_tensor(out):
                return out
            node = self._node("call_module", qualname, self.map_args(tuple(args)), self.map_args(dict(kwargs)),
                              out, qualname)
            self._bind(out, node)
            return out
        start = self.index
        self.scope.append(qualname)
        cls = type(module)
        tracked = _tracking_class(cls, self.int_reads.setdefault(qualname, set()))
        if tracked is not None:
            module.__class__ = tracked
        try:
            out = call(module, *args, **kwargs)
        finally:
            self.scope.pop()
            if tracked is not None:
                module.__class__ = cls
        if qualname:
            self.regions.setdefault(qualname, []).append(Region(start, self.index, (), {}, None))
        return out


def _tracking_class(cls: type, reads: set[str]) -> type | None:
    """A subclass of ``cls`` that notes which int attributes are read (``self.split_size``), so a
    size patch goes to the attribute forward uses, not to another that happens to be equal."""
    if getattr(cls, "_deployprune_tracking", False) or "__getattribute__" in vars(cls) or "__slots__" in vars(cls):
        return None
    return _reading_subclass(cls, reads.add)


def _reading_subclass(cls: type, on_read: Callable[[str], None]) -> type:
    """``cls`` with ``on_read(name)`` called for every public int attribute read from an instance."""
    base_get = cls.__getattribute__

    def __getattribute__(self, name):  # noqa: N807
        value = base_get(self, name)
        if type(value) is int and not name.startswith("_"):
            on_read(name)
        return value

    return type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "_deployprune_tracking": True,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _track_configs(model: nn.Module, rec: _Recorder) -> list[tuple[Any, type]]:
    """Note the int fields forward code reads from a module's ``config`` object
    (``self.config.num_attention_heads`` in Phi-3's attention), as ``config.<field>`` reads of the module
    whose call is running: a slice bound computed from them can then be patched like an attribute.
    Returns ``(object, original class)`` pairs to restore."""
    swapped: list[tuple[Any, type]] = []
    seen: set[int] = set()
    for m in model.modules():
        cfg = vars(m).get("config")
        if cfg is None or id(cfg) in seen or isinstance(cfg, (nn.Module, torch.Tensor, int, float, str, bool,
                                                                dict, list, tuple)):
            continue
        seen.add(id(cfg))
        cls = type(cfg)
        if not hasattr(cfg, "__dict__") or "__slots__" in vars(cls) or getattr(cls, "_deployprune_tracking", False):
            continue
        tracked = _reading_subclass(
            cls, lambda name: rec.int_reads.setdefault(rec.scope[-1], set()).add(f"config.{name}"))
        try:
            cfg.__class__ = tracked
        except TypeError:
            continue
        swapped.append((cfg, cls))
    return swapped


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _is_tensor_method(func: Any, name: str) -> bool:
    if not name:
        return False
    return getattr(torch.Tensor, name, None) is func or getattr(torch._C.TensorBase, name, None) is func


class SizeInt(int):
    """An int read from a tensor's shape during recording (``x.size(-1)``, ``x.shape[:-1]``).

    Forward code that passes such a size on (``x.view(-1, x.size(-1))``) recomputes it when the
    compacted model runs, so it is not a fixed size to patch; arithmetic on it gives plain ints.
    """

    __slots__ = ()


def _mark_sizes(func: Any, out: Any) -> Any:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    if name in ("size", "shape"):
        if isinstance(out, torch.Size):
            return torch.Size([SizeInt(v) for v in out])
        if type(out) is int:
            return SizeInt(out)
    return out


class _Mode(TorchFunctionMode):
    def __init__(self, rec: _Recorder):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except Exception:
            if self.rec.failed_index is None and not self.rec.leaf_depth:
                self.rec.failed_index = self.rec.index
            raise
        if not self.rec.leaf_depth:
            self.rec.record_call(func, args, kwargs, out)
            out = _mark_sizes(func, out)
        return out


def flat_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a model output in a stable order: tensors, tuples, lists, dicts, dataclasses
    and ``ModelOutput``s; other objects (a KV cache object) are not part of the compared output."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):  # ModelOutput is an OrderedDict
        return [t for v in value.values() for t in flat_tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flat_tensors(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [t for k in value.__dataclass_fields__ for t in flat_tensors(getattr(value, k, None))]
    return []


class CaptureError(Exception):
    """The eager run failed; ``index`` is the graph index of the call that raised (or None)."""

    def __init__(self, index: int | None, graph: fx.Graph, values: dict, cause: BaseException):
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        super().__init__(f"{type(cause).__name__}: {msg}")
        self.index, self.graph, self.values, self.cause = index, graph, values, cause


def record(model: nn.Module, args: tuple, kwargs: dict) -> Traced:
    """Run ``model(*args, **kwargs)`` once and return its recorded graph (see the module docstring).

    Raises :class:`CaptureError` when the run itself fails.
    """
    rec = _Recorder(model)
    flat, _spec = pytree.tree_flatten((args, kwargs))
    for i, leaf in enumerate(flat):
        if isinstance(leaf, torch.Tensor) and id(leaf) not in rec.node_of:
            node = rec._node("placeholder", f"input_{i}", (), {}, leaf, "")
            rec.node_of[id(leaf)] = node
            rec.keep_alive.append(leaf)
    original_call = nn.Module.__call__

    def patched(module, *a, **kw):
        return rec.call_module(module, original_call, a, kw)

    nn.Module.__call__ = patched
    configs = _track_configs(model, rec)
    try:
        with torch.no_grad(), _Mode(rec):
            out = model(*args, **kwargs)
    except Exception as exc:
        raise CaptureError(rec.failed_index, rec.graph, rec.values, exc) from exc
    finally:
        nn.Module.__call__ = original_call
        for obj, cls in configs:
            obj.__class__ = cls
    outputs = tuple(rec.tensor_arg(t) if id(t) in rec.node_of else rec.tensor_arg(t) for t in flat_tensors(out))
    out_node = rec.graph.create_node("output", "output", (outputs,), {})
    out_node.meta["owner"] = ""
    out_node.meta["index"] = rec.index
    return Traced(graph=rec.graph, root=model, values=rec.values, opaque={}, regions={}, output=out,
                  recorded=True, int_reads=rec.int_reads)


__all__ = ["record", "is_leaf", "flat_tensors", "CaptureError", "SizeInt", "TensorMeta"]
