"""Trace a model to a torch.fx graph and record what every node produced.

torch.fx symbolic tracing keeps ``torch.nn`` leaf modules as ``call_module`` nodes (so module
rules can rebuild them) and turns functional code in ``forward`` into ``call_function`` /
``call_method`` nodes (so ``x + y``, ``torch.cat``, ``view`` ... get their own rules). It is
fast (milliseconds for a ResNet-50) and needs no example-shaped compilation.

Where a submodule's ``forward`` cannot be traced (data-dependent Python), that submodule is
made an opaque leaf and tracing is retried: the rest of the model still compacts and the
opaque module keeps all of its channels (reported as a blocker).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

log = logging.getLogger(__name__)

MAX_RETRACES = 64


@dataclass
class Region:
    """The nodes one call of a traced-through module created, with its arguments and result."""

    start: int  # index of the first node in graph order
    end: int  # one past the last
    args: tuple
    kwargs: dict
    result: Any


class _Tracer(fx.Tracer):
    """Records, for every node, the innermost module whose ``forward`` created it, and the node
    range of every traced-through module call (so that call can be re-emitted as a GraphModule)."""

    def __init__(self, opaque: set[str], leaves: set[str] | None = None):
        super().__init__()
        self.opaque = opaque
        self.leaves = leaves or set()  # qualnames to keep as leaves (re-tracing a compacted model)
        self.failing_module: str | None = None
        self.regions: dict[str, list[Region]] = {}
        self._n_nodes = 0

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        before = {id(m): dict(vars(m)) for m in root.modules()} if isinstance(root, nn.Module) else None
        try:
            return super().trace(root, concrete_args)
        finally:
            if before is not None:
                _drop_proxies(root, before)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opaque or qualname in self.leaves:
            return True
        from .rule_registry import has_user_rule

        if has_user_rule(m):
            return True  # the user registered a rule for this module type: keep it whole
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            qualname = self.path_of_module(m)
            start = self._n_nodes
            out = super().call_module(m, forward, args, kwargs)
            if not self.is_leaf_module(m, qualname) and qualname:
                as_node = lambda v: v.node if isinstance(v, fx.Proxy) else v  # noqa: E731
                self.regions.setdefault(qualname, []).append(Region(
                    start, self._n_nodes, fx.node.map_aggregate(args, as_node),
                    fx.node.map_aggregate(kwargs, as_node), fx.node.map_aggregate(out, as_node)))
            return out
        except Exception:
            if self.failing_module is None:
                # innermost module first: the exception unwinds through its parents afterwards
                self.failing_module = self.path_of_module(m)
            raise

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["owner"] = self.scope.module_path
        node.meta["index"] = self._n_nodes
        self._n_nodes += 1
        return node


def _drop_proxies(model: nn.Module, before: dict[int, dict[str, Any]]) -> None:
    """Undo what symbolic tracing left in module state: forward code that caches tensors on the
    module in eval mode (timm's LeViT keeps ``attention_bias_cache[str(x.device)]``) stored Proxies,
    which a later trace of a copy would pick up and which cannot be pickled."""
    for m in model.modules():
        old = before.get(id(m), {})
        for k, v in list(vars(m).items()):
            if isinstance(v, fx.Proxy):
                if k in old:
                    object.__setattr__(m, k, old[k])
                else:
                    delattr(m, k)
            elif isinstance(v, dict):
                for key in [key for key, x in v.items() if isinstance(x, fx.Proxy)]:
                    del v[key]
            elif isinstance(v, list) and any(isinstance(x, fx.Proxy) for x in v):
                v[:] = [x for x in v if not isinstance(x, fx.Proxy)]


@dataclass
class Traced:
    graph: fx.Graph
    root: nn.Module
    values: dict[fx.Node, Any]  # per node: TensorMeta for tensors (nested for tuples), else the value
    opaque: dict[str, str] = field(default_factory=dict)  # module name -> why it is a leaf
    regions: dict[str, list[Region]] = field(default_factory=dict)  # traced-through module calls
    output: Any = None  # the model's output on the example inputs
    recorded: bool = False  # captured by recording an eager run (capture.py), not by symbolic tracing
    int_reads: dict[str, set[str]] | None = None  # module -> int attributes its forward read (recorded runs)


def trace(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Traced:
    """Symbolically trace ``model`` and run the graph once on ``example_inputs``.

    Raises ``RuntimeError`` (with the tracer's message) only when the root ``forward`` itself
    cannot be traced.
    """
    opaque: dict[str, str] = {}
    for _ in range(MAX_RETRACES):
        tracer = _Tracer(set(opaque))
        try:
            graph = tracer.trace(model)
            break
        except Exception as exc:  # noqa: BLE001 - any tracing failure is handled the same way
            failing = tracer.failing_module
            if not failing or failing in opaque:
                raise RuntimeError(f"cannot trace the model's forward: {type(exc).__name__}: {exc}") from exc
            opaque[failing] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.info("module %r cannot be traced (%s); treating it as opaque", failing, opaque[failing])
    else:  # pragma: no cover - pathological
        raise RuntimeError("cannot trace the model: too many untraceable submodules")
    try:
        values, output = _record(graph, model, example_inputs, keep_output=True)
    except RecordError as exc:
        raise RuntimeError(f"the traced graph fails on the example inputs at {exc}") from exc
    return Traced(graph=graph, root=model, values=values, opaque=opaque, regions=tracer.regions, output=output)


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return type(value)(_meta(v) for v in value) if isinstance(value, tuple) else [_meta(v) for v in value]
    return value


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps, per node, the output's shapes (tensors) or value (ints...)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as exc:
            raise RecordError(n.name, self.values, exc) from exc
        self.values[n] = _meta(out)
        return out


class RecordError(Exception):
    """A node failed while recording; carries the node name and what was recorded before it."""

    def __init__(self, node: str, values: dict, cause: BaseException):
        super().__init__(f"node {node}: {type(cause).__name__}: {cause}")
        self.node = node
        self.values = values
        self.cause = cause


def _record(graph: fx.Graph, model: nn.Module, inputs: tuple[torch.Tensor, ...],
            keep_output: bool = False) -> Any:
    gm = fx.GraphModule(model, graph)
    rec = _Recorder(gm)
    with torch.no_grad():
        out = rec.run(*inputs)
    # the GraphModule shares our Graph, so the recorded nodes are the caller's nodes
    return (rec.values, out) if keep_output else rec.values
