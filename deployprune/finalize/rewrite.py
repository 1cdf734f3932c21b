"""Re-emit one module call as a ``torch.fx.GraphModule`` with updated reshape sizes.

Forward code often computes sizes that compaction changes but that no attribute holds, e.g.
timm-style attention ``(attn @ v).transpose(1, 2).reshape(B, N, C)`` with ``C`` read from the
block input, which keeps its width while the heads shrink. For such a module, finalize replaces
the module with a GraphModule built from the traced nodes of its call. The GraphModule keeps the
submodule names and parameters, the dynamic batch/sequence sizes and the class name, and plain
attributes such as ``num_heads`` hold the new values. Only the size arguments of the
view/reshape nodes whose shapes change become the new literal sizes. A GraphModule is plain
torch: ``torch.save``/``torch.load`` and ``torch.export`` handle it without deployprune.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch.fx as fx
from torch import nn

from .graph import Analysis
from .trace import TensorMeta

log = logging.getLogger(__name__)

_RESHAPES = {"view", "reshape"}


def _is_reshape(node: fx.Node) -> bool:
    import torch

    return (node.op == "call_method" and node.target in _RESHAPES) or (
        node.op == "call_function" and node.target is torch.reshape)


def can_rewrite(a: Analysis, owner: str) -> bool:
    regions = a.traced.regions.get(owner)
    return bool(owner) and regions is not None and len(regions) == 1


def region_module(a: Analysis, owner: str, module: nn.Module, planned: dict[str, tuple[int, ...]]) -> nn.Module | None:
    """A GraphModule computing ``module``'s traced call with reshape sizes set to ``planned``.

    ``planned`` maps node names to their compacted output shapes. Returns None when the call
    cannot be re-emitted (the caller then keeps those channels instead).
    """
    region = a.traced.regions[owner][0]
    nodes = [n for n in a.traced.graph.nodes if region.start <= n.meta.get("index", -1) < region.end]
    prefix = owner + "."
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*region.args, **region.kwargs)
    except (TypeError, ValueError):
        return None
    for name, param in sig.parameters.items():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            return None
        value = bound.arguments.get(name, param.default)
        if isinstance(value, fx.Node):
            env[value] = g.placeholder(name)
        elif any(isinstance(v, fx.Node) for v in _flatten(value)):
            return None  # a container of tensors: not re-emitted
        else:
            g.placeholder(name, default_value=None if value is inspect.Parameter.empty else value)

    def lookup(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n.op == "get_attr" and str(n.target).startswith(prefix):
            env[n] = g.get_attr(str(n.target)[len(prefix):])
            return env[n]
        raise KeyError(n.name)

    try:
        for n in nodes:
            new = g.node_copy(n, lookup)
            if n.op in ("call_module", "get_attr"):
                if not str(n.target).startswith(prefix):
                    return None
                new.target = str(n.target)[len(prefix):]
            if _is_reshape(n) and n.name in planned:
                new_sizes = _new_sizes(a, n, planned[n.name], lookup)
                if new_sizes is None:
                    return None
                new.args = (new.args[0], *new_sizes) if n.op == "call_method" else (new.args[0], tuple(new_sizes))
                new.kwargs = {}
            env[n] = new
        g.output(fx.node.map_arg(region.result, lookup))
    except KeyError as exc:
        log.debug("cannot re-emit %s: node %s comes from outside its call", owner, exc)
        return None
    gm = fx.GraphModule(module, g, class_name=type(module).__name__)
    for k, v in vars(module).items():
        if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool)):
            setattr(gm, k, v)
    gm.train(module.training)
    return gm


def _flatten(value: Any) -> list[Any]:
    out: list[Any] = []
    fx.node.map_aggregate(value, lambda v: out.append(v))
    return out


def _new_sizes(a: Analysis, n: fx.Node, shape: tuple[int, ...], lookup) -> list[Any] | None:
    meta = a.meta(n)
    if not isinstance(meta, TensorMeta):
        return None
    rest = list(n.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = list(rest[0])
    if not rest:
        rest = list(n.kwargs.get("shape", n.kwargs.get("size", ())))
    if len(rest) != len(shape):
        return None
    sizes: list[Any] = []
    for orig_size, new_size, arg in zip(meta.shape, shape, rest, strict=True):
        if orig_size == new_size:
            sizes.append(fx.node.map_arg(arg, lookup))
        else:
            sizes.append(int(new_size))
    return sizes
