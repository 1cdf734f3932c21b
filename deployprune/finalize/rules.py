"""Per-op mask propagation rules: one small function per op family, in a registry.

A rule receives the :class:`~deployprune.finalize.graph.Analysis` and the fx node. It creates
the node's output Var(s), couples slots (``a.same``), pins dimensions that must stay whole
(``a.pin``), computes forward constants (``a.set_cv``) and may add a constraint closure that
turns kept output channels into demanded input channels. Module rules may also register a
*rebuilder* that returns the smaller module once the keep vectors are final.

Register your own::

    from deployprune.finalize import register_module_rule, rules

    @register_module_rule(MyScale)
    def _my_scale(a, node, module):
        rules.elementwise(a, node)          # output channels = input channels, nothing to rebuild
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .graph import Analysis, Var, flatten_vars, owner_of
from .rule_registry import (  # the table lives apart so that tracing can ask it without importing this module
    FunctionRule,
    ModuleRule,
    function_rule_for,
    has_user_rule,
    module_rule_for,
    register_function_rule,
    register_module_rule,
)
from .trace import TensorMeta

__all__ = ["FunctionRule", "ModuleRule", "function_rule_for", "has_user_rule", "module_rule_for",
           "register_function_rule", "register_module_rule"]

# new layers get their weights copied in right away: skip the random initialization
skip_init = torch.nn.utils.skip_init


# ============================================================================ helpers


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def out_var(a: Analysis, node: fx.Node) -> Var | None:
    meta = a.meta(node)
    if not isinstance(meta, TensorMeta):
        return None
    v = a.new_var(node.name, meta.shape)
    a.vars[node] = v
    return v


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def opaque(a: Analysis, node: fx.Node, reason: str | None = None) -> None:
    """No rule: every tensor this op touches keeps all of its channels."""
    reason = reason or "no propagation rule for this op; its inputs and outputs keep all channels"
    b = a.block(node, reason)
    for inp in node.all_input_nodes:
        for v in flatten_vars(a.vars.get(inp)):
            a.pin_var(v, reason, b)
    if node.op == "call_module":
        module = a.modules.get(str(node.target))
        if module is not None:
            for pname, p in module.named_parameters():
                mod_name, _, attr = (f"{node.target}.{pname}").rpartition(".")
                a.pin_var(a.param_var(p, mod_name, attr), reason, b)
            for bname, buf in module.named_buffers():
                mod_name, _, attr = (f"{node.target}.{bname}").rpartition(".")
                a.pin_var(a.param_var(buf, mod_name, attr), reason, b)
    out = a.var_like(node.name, a.meta(node))
    a.vars[node] = out
    for v in flatten_vars(out):
        a.pin_var(v, reason, b)


def _const_tensor(values: np.ndarray, dim: int, ndim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = len(values)
    return torch.tensor(np.nan_to_num(values, nan=0.0), dtype=dtype).reshape(shape)


def _eval_unary_cv(a: Analysis, x: Var, y: Var, fn: Callable[[torch.Tensor], torch.Tensor],
                   dtype: torch.dtype = torch.float32) -> None:
    for d, c in list(x.cval.items()):
        known = ~np.isnan(c)
        try:
            with torch.no_grad():
                r = fn(_const_tensor(c, d, x.ndim, dtype))
            r = r.detach().to(torch.float64).reshape(-1).numpy()
        except Exception:  # noqa: BLE001 - an op that cannot take the probe just gives no constants
            continue
        if r.shape != c.shape:
            continue
        a.set_cv(y, d, np.where(known, r, np.nan))


def elementwise(a: Analysis, node: fx.Node, fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                src: Any = None) -> None:
    """Output has the input's shape and channels: couple every dimension.

    ``fn`` maps a tensor to the op's result on it (used to carry constants); None = identity.
    """
    x = a.var(src if src is not None else node.args[0])
    meta = a.meta(node)
    if x is None or not isinstance(meta, TensorMeta) or tuple(meta.shape) != x.shape:
        opaque(a, node, "elementwise op whose output shape differs from its input")
        return
    y = out_var(a, node)
    a.same_all(x, y)
    if fn is None:
        y.cval = dict(x.cval)
    else:
        _eval_unary_cv(a, x, y, fn, meta.dtype if meta.dtype.is_floating_point else torch.float32)


def pin_spatial(a: Analysis, v: Var, first: int = 2, reason: str = "spatial dimension") -> None:
    for d in range(first, v.ndim):
        a.pin(v, d, reason)


# ============================================================================ graph boundaries


def placeholder_rule(a: Analysis, node: fx.Node) -> None:
    out = a.var_like(node.name, a.meta(node))
    a.vars[node] = out
    for v in flatten_vars(out):
        a.pin_var(v, "model input")


def output_rule(a: Analysis, node: fx.Node) -> None:
    for inp in node.all_input_nodes:
        for v in flatten_vars(a.vars.get(inp)):
            a.pin_var(v, "model output")


def get_attr_rule(a: Analysis, node: fx.Node) -> None:
    target = str(node.target)
    mod_name, _, attr = target.rpartition(".")
    module = a.modules.get(mod_name)
    t = getattr(module, attr, None) if module is not None else None
    if isinstance(t, torch.Tensor) and attr in (module._parameters.keys() | module._buffers.keys()):
        a.vars[node] = a.param_var(t, mod_name, attr)
        return
    out = a.var_like(node.name, a.meta(node))
    a.vars[node] = out
    for v in flatten_vars(out):
        a.pin_var(v, f"constant attribute {target!r} that is not a registered parameter or buffer")


# ============================================================================ activations and friends

_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Tanhshrink, nn.Softsign, nn.LogSigmoid,
    nn.Hardshrink, nn.Softshrink,
)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)


@register_module_rule(*_UNARY_MODULES)
def _unary_module(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    elementwise(a, node, module)


@register_module_rule(*_IDENTITY_MODULES)
def _identity_module(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    elementwise(a, node)


_UNARY_FUNCTIONS = (
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid,
    torch.tanh, F.tanh, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.mish, F.hardtanh, torch.abs,
    torch.neg, operator.neg, torch.exp, torch.sqrt, torch.rsqrt, torch.clamp, torch.clip, torch.square,
    F.logsigmoid, torch.erf, torch.log, torch.sin, torch.cos, torch.reciprocal, torch.nn.functional.softsign,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "neg", "exp", "sqrt", "rsqrt", "clamp",
    "clamp_", "clamp_min", "clamp_max", "clip", "square", "erf", "log", "sin", "cos", "reciprocal",
    torch.pow, operator.pow, "pow", F.gelu, "gelu", torch.nn.functional.silu, "silu",
)
_IDENTITY_FUNCTIONS = (
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.clone, torch.detach,
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type", "type_as", "cpu",
    "cuda", "requires_grad_",
)


def _call_with(node: fx.Node, t: torch.Tensor, position: int = 0) -> torch.Tensor:
    args = list(node.args)
    args[position] = t
    if node.op == "call_method":
        return getattr(t, str(node.target))(*args[1:], **dict(node.kwargs))
    return node.target(*args, **dict(node.kwargs))


@register_function_rule(*_UNARY_FUNCTIONS)
def _unary_function(a: Analysis, node: fx.Node) -> None:
    if any(isinstance(x, fx.Node) for x in list(node.args[1:]) + list(node.kwargs.values())):
        # e.g. clamp(x, min=other_tensor): not a pure elementwise map of x
        if any(a.var(x) is not None for x in list(node.args[1:]) + list(node.kwargs.values())):
            opaque(a, node)
            return
    elementwise(a, node, lambda t: _call_with(node, t))


@register_function_rule(*_IDENTITY_FUNCTIONS)
def _identity_function(a: Analysis, node: fx.Node) -> None:
    elementwise(a, node)


# ============================================================================ binary elementwise (broadcast)

_BINARY = {
    operator.add: np.add, operator.iadd: np.add, torch.add: np.add, "add": np.add, "add_": np.add,
    operator.sub: np.subtract, operator.isub: np.subtract, torch.sub: np.subtract, "sub": np.subtract,
    "sub_": np.subtract, torch.subtract: np.subtract,
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", "mul": "mul", "mul_": "mul", torch.multiply: "mul",
    operator.truediv: np.divide, operator.itruediv: np.divide, torch.div: np.divide, "div": np.divide,
    "div_": np.divide, torch.true_divide: np.divide,
    torch.maximum: np.maximum, torch.minimum: np.minimum, torch.max: None, torch.min: None,
}


def _binary_np(op: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        if op == "mul":
            r = x * y
            return np.where((x == 0) | (y == 0), 0.0, r)
        return op(x, y)


@register_function_rule(*[k for k, v in _BINARY.items() if v is not None])
def _binary(a: Analysis, node: fx.Node) -> None:
    op = _BINARY[node.target]
    lhs, rhs = node.args[0], arg(node, 1, "other")
    if node.kwargs.get("alpha", 1) != 1 or "rounding_mode" in node.kwargs and node.kwargs["rounding_mode"]:
        opaque(a, node, "binary op with alpha/rounding_mode")
        return
    vx, vy = a.var(lhs), a.var(rhs)
    if vx is None and vy is None:
        opaque(a, node)
        return
    if vx is None or vy is None:
        # tensor op scalar: elementwise in the tensor
        tensor_pos = 0 if vx is not None else 1
        src = lhs if vx is not None else rhs
        if isinstance(lhs if vy is not None else rhs, fx.Node):
            # the other operand is a non-tensor graph value (e.g. a size): still elementwise,
            # but its value is only known at run time, so no constants.
            _elementwise_no_cv(a, node, src)
            return
        elementwise(a, node, lambda t: _call_with(node, t, tensor_pos), src=src)
        return
    y = out_var(a, node)
    if y is None:
        opaque(a, node)
        return
    params = set(map(id, a.param_vars.values()))
    for v in (vx, vy):
        off = y.ndim - v.ndim
        if off < 0:
            opaque(a, node, "broadcast with more input than output dimensions")
            return
        for d in range(v.ndim):
            if v.shape[d] == y.shape[d + off]:
                a.union(v.slots[d], y.slots[d + off])
                if op == "mul" and id(v) in params and v.shape[d] > 1:
                    a.role(v, d, "producer")  # a layer scale: zeroing it zeroes the channel
    for od in range(y.ndim):
        cs = []
        for v in (vx, vy):
            vd = od - (y.ndim - v.ndim)
            if vd < 0:
                cs.append(np.full(y.shape[od], np.nan))
            else:
                c = a.cv(v, vd)
                cs.append(np.broadcast_to(c, (y.shape[od],)) if len(c) in (1, y.shape[od]) else
                          np.full(y.shape[od], np.nan))
        a.set_cv(y, od, _binary_np(op, cs[0], cs[1]))


def _elementwise_no_cv(a: Analysis, node: fx.Node, src: Any) -> None:
    x = a.var(src)
    meta = a.meta(node)
    if x is None or not isinstance(meta, TensorMeta) or tuple(meta.shape) != x.shape:
        opaque(a, node)
        return
    y = out_var(a, node)
    a.same_all(x, y)
    # only exact zeros survive multiplication by an unknown scalar
    if node.target in (operator.mul, operator.imul, torch.mul, "mul", "mul_", operator.truediv, "div"):
        for d, c in x.cval.items():
            a.set_cv(y, d, np.where(c == 0, 0.0, np.nan))


# ============================================================================ convolution


def _conv_foldable(module: nn.Module) -> bool:
    pad = module.padding
    if module.padding_mode != "zeros":
        return True  # reflect/replicate/circular padding of a constant is the same constant
    if isinstance(pad, str):
        return pad == "valid" or all(k == 1 for k in module.kernel_size)
    return all(p == 0 for p in pad)


@register_module_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    name = str(node.target)
    x = a.var(node.args[0])
    y = out_var(a, node)
    if x is None or y is None or x.ndim != y.ndim or x.ndim < 3:
        opaque(a, node, "convolution on unbatched input")
        return
    a.call_counts[name] = a.call_counts.get(name, 0) + 1
    W = a.module_param(name, "weight")
    b = a.module_param(name, "bias") if module.bias is not None else None
    g = module.groups
    cin, cout = module.in_channels, module.out_channels
    ig, og = cin // g, cout // g
    a.same(x, 0, y, 0)
    pin_spatial(a, x)
    pin_spatial(a, y)
    pin_spatial(a, W, 2, "kernel")
    a.same(y, 1, W, 0)
    a.role(W, 0, "producer")
    if b is not None:
        a.same(y, 1, b, 0)
        a.role(b, 0, "producer")
    if g > 1 and not (ig == 1 and og == 1):
        a.divisions[x.slots[1]] = g
        a.divisions[y.slots[1]] = g
    weight = module.weight.detach()
    flat = weight.flatten(2)
    nz = (flat != 0).any(-1).numpy()  # (cout, ig): which inputs each output reads
    _wsum: list[np.ndarray] = []

    def wsum() -> np.ndarray:  # (cout, ig) kernel sums, only needed to fold constants
        if not _wsum:
            _wsum.append(flat.sum(-1).double().numpy())
        return _wsum[0]

    bias = module.bias.detach().double().numpy() if module.bias is not None else np.zeros(cout)
    in_idx = (np.arange(cout)[:, None] // og) * ig + np.arange(ig)[None, :]  # (cout, ig) input channel read
    foldable = _conv_foldable(module) and g == 1

    # forward constants: an output channel is constant when every input it reads is constant
    xc = a.cv(x, 1)
    if np.isnan(xc).all():
        a.set_cv(y, 1, np.where(nz.any(1), np.nan, bias))
    else:
        xr = xc[in_idx]  # (cout, ig)
        contrib_known = ~nz | (~np.isnan(xr) & ((xr == 0) | foldable))
        out_c = np.where(contrib_known.all(1), bias + np.where(nz, wsum() * np.nan_to_num(xr), 0.0).sum(1), np.nan)
        a.set_cv(y, 1, out_c)

    def not_needed() -> np.ndarray:
        c = a.cv(x, 1)
        single = a.call_counts.get(name, 1) == 1
        return (c == 0) | (~np.isnan(c) & foldable & single)

    if g > 1 and ig == 1 and og == 1:
        # depthwise: output channel k is computed from input channel k alone
        a.same(x, 1, y, 1)
    elif g == 1:
        a.same(x, 1, W, 1)
        a.role(W, 1, "consumer")

        def demand_inputs() -> bool:
            ko = a.keep(y, 1)
            if not ko.any():
                return False
            need = nz[ko].any(0) & ~not_needed()
            return a.demand(x, 1, need)

        a.constraint(demand_inputs)
    elif not (ig == 1 and og == 1):
        a.relations.append(("grouped", x.slots[1], W.slots[1], ig))

        def grouped() -> bool:
            ko = a.keep(y, 1).reshape(g, og)
            ki = a.keep(x, 1).reshape(g, ig)
            skip = (a.cv(x, 1) == 0)[in_idx]  # only exact zeros may be skipped inside groups
            dem = np.zeros((g, ig), bool)
            rows = np.nonzero(ko.reshape(-1))[0]
            if rows.size:
                need_rows = nz[rows] & ~skip[rows]
                np.logical_or.at(dem, rows // og, need_rows)
            keep_g = ko.any(1) | ki.any(1) | dem.any(1)
            if not keep_g.any():
                return False
            pos_o = ko[keep_g].any(0)
            pos_i = (ki | dem)[keep_g].any(0)
            if not pos_o.any():
                pos_o[0] = True
            if not pos_i.any():
                pos_i[0] = True
            changed = a.demand(y, 1, np.outer(keep_g, pos_o).reshape(-1))
            changed |= a.demand(x, 1, np.outer(keep_g, pos_i).reshape(-1))
            changed |= a.demand(W, 1, pos_i)
            return changed

        a.constraint(grouped)

    def rebuild() -> nn.Module | None:
        ko = a.keep(y, 1)
        kw = a.keep(W, 1)
        if g == 1:
            ki = a.keep(x, 1)
            new_g, new_in = 1, int(ki.sum())
        else:
            keep_g = ko.reshape(g, og).any(1)
            new_g = int(keep_g.sum())
            new_in = new_g * int(kw.sum())
        if ko.all() and kw.all() and new_g == g:
            return None
        new_w = _take(_take(weight, 0, ko), 1, kw)
        new_b = None
        if g == 1 and a.call_counts.get(name, 1) == 1:
            dropped = ~a.keep(x, 1)
            c = a.cv(x, 1)
            fold = dropped & ~np.isnan(c) & (c != 0)
            if fold.any():
                extra = (wsum()[:, fold] * c[fold]).sum(1)[ko]
                new_b = torch.as_tensor(bias[ko] + extra, dtype=weight.dtype)
        if new_b is None and module.bias is not None:
            new_b = module.bias.detach()[torch.as_tensor(ko)]
        cls = type(module)
        new = skip_init(cls, new_in, int(ko.sum()), module.kernel_size, stride=module.stride, padding=module.padding,
                  dilation=module.dilation, groups=new_g, bias=new_b is not None, padding_mode=module.padding_mode,
                  device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(new_w)
            if new_b is not None:
                new.bias.copy_(new_b)
        return new

    a.rebuilders.setdefault(name, rebuild)


@register_module_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    name = str(node.target)
    x = a.var(node.args[0])
    y = out_var(a, node)
    if x is None or y is None or x.ndim != y.ndim or x.ndim < 3 or module.groups != 1 or len(node.args) > 1:
        opaque(a, node, "grouped, unbatched or output_size-driven transposed convolution")
        return
    W = a.module_param(name, "weight")  # (cin, cout, *k)
    b = a.module_param(name, "bias") if module.bias is not None else None
    a.same(x, 0, y, 0)
    pin_spatial(a, x)
    pin_spatial(a, y)
    pin_spatial(a, W, 2, "kernel")
    a.same(x, 1, W, 0)
    a.same(y, 1, W, 1)
    a.role(W, 1, "producer")
    a.role(W, 0, "consumer")
    if b is not None:
        a.same(y, 1, b, 0)
        a.role(b, 0, "producer")
    weight = module.weight.detach()
    nz = weight.flatten(2).ne(0).any(-1).numpy()  # (cin, cout)
    bias = module.bias.detach().double().numpy() if module.bias is not None else np.zeros(module.out_channels)
    xc = a.cv(x, 1)
    reads_live = (nz & ~(xc == 0)[:, None]).any(0)
    a.set_cv(y, 1, np.where(reads_live, np.nan, bias))

    def demand_inputs() -> bool:
        ko = a.keep(y, 1)
        if not ko.any():
            return False
        need = nz[:, ko].any(1) & ~(a.cv(x, 1) == 0)
        return a.demand(x, 1, need)

    a.constraint(demand_inputs)

    def rebuild() -> nn.Module | None:
        ki, ko = a.keep(x, 1), a.keep(y, 1)
        if ki.all() and ko.all():
            return None
        new = skip_init(type(module), int(ki.sum()), int(ko.sum()), module.kernel_size, stride=module.stride,
                           padding=module.padding, output_padding=module.output_padding, groups=1,
                           bias=module.bias is not None, dilation=module.dilation, padding_mode=module.padding_mode,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight[torch.as_tensor(ki)][:, torch.as_tensor(ko)])
            if module.bias is not None:
                new.bias.copy_(module.bias.detach()[torch.as_tensor(ko)])
        return new

    a.rebuilders.setdefault(name, rebuild)


# ============================================================================ linear / embedding


@register_module_rule(nn.Linear)
def _linear(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    name = str(node.target)
    x = a.var(node.args[0])
    y = out_var(a, node)
    if x is None or y is None or x.ndim != y.ndim:
        opaque(a, node)
        return
    a.call_counts[name] = a.call_counts.get(name, 0) + 1
    W = a.module_param(name, "weight")
    b = a.module_param(name, "bias") if module.bias is not None else None
    _linear_core(a, x, y, W, b, module.weight.detach(),
                 module.bias.detach() if module.bias is not None else None, name)

    def rebuild() -> nn.Module | None:
        ki, ko = a.keep(x, -1), a.keep(y, -1)
        new_b = _folded_bias(a, x, ko, module.weight.detach(), module.bias, name)
        if ki.all() and ko.all() and new_b is None:
            return None
        if new_b is None and module.bias is not None:
            new_b = module.bias.detach()[torch.as_tensor(ko)]
        w = module.weight.detach()
        cls = type(module) if type(module).__init__ is nn.Linear.__init__ else nn.Linear  # keep plain subclasses
        new = skip_init(cls, int(ki.sum()), int(ko.sum()), bias=new_b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w[torch.as_tensor(ko)][:, torch.as_tensor(ki)])
            if new_b is not None:
                new.bias.copy_(new_b)
        return new

    a.rebuilders.setdefault(name, rebuild)


def _folded_bias(a: Analysis, x: Var, ko: np.ndarray, weight: torch.Tensor, bias: torch.Tensor | None,
                 name: str) -> torch.Tensor | None:
    """Bias of a Linear that absorbs the constant input channels it no longer reads."""
    if a.call_counts.get(name, 1) != 1:
        return None
    c = a.cv(x, x.ndim - 1)
    fold = ~a.keep(x, x.ndim - 1) & ~np.isnan(c) & (c != 0)
    if not fold.any():
        return None
    w = weight.double().numpy()
    base = bias.detach().double().numpy() if bias is not None else np.zeros(w.shape[0])
    new = base + (w[:, fold] * c[fold]).sum(1)
    return torch.as_tensor(new[ko], dtype=weight.dtype)


def _take(t: torch.Tensor, dim: int, keep: np.ndarray) -> torch.Tensor:
    if keep.all():
        return t
    return t.index_select(dim, torch.as_tensor(np.nonzero(keep)[0], device=t.device))


def _linear_core(a: Analysis, x: Var, y: Var, W: Var, b: Var | None, weight: torch.Tensor,
                 bias: torch.Tensor | None, name: str | None) -> None:
    xl, yl = x.ndim - 1, y.ndim - 1
    for d in range(xl):
        a.same(x, d, y, d)
    a.same(x, xl, W, 1)
    a.same(y, yl, W, 0)
    a.role(W, 0, "producer")
    a.role(W, 1, "consumer")
    if b is not None:
        a.same(y, yl, b, 0)
        a.role(b, 0, "producer")
    nz = (weight != 0).numpy()
    bvals = bias.detach().double().numpy() if bias is not None else np.zeros(weight.shape[0])
    xc = a.cv(x, xl)
    if np.isnan(xc).all():
        a.set_cv(y, yl, np.where(nz.any(1), np.nan, bvals))
    else:
        w = weight.double().numpy()
        known = ~nz | ~np.isnan(xc)[None, :]
        a.set_cv(y, yl, np.where(known.all(1), bvals + (np.where(nz, w, 0) * np.nan_to_num(xc)[None, :]).sum(1),
                                 np.nan))

    def demand_inputs() -> bool:
        ko = a.keep(y, yl)
        if not ko.any():
            return False
        c = a.cv(x, xl)
        fold_ok = name is not None and a.call_counts.get(name, 1) == 1
        skip = (c == 0) | (~np.isnan(c) & fold_ok)
        return a.demand(x, xl, nz[ko].any(0) & ~skip)

    a.constraint(demand_inputs)


@register_function_rule(F.linear)
def _f_linear(a: Analysis, node: fx.Node) -> None:
    x, W = a.var(node.args[0]), a.var(arg(node, 1, "weight"))
    bnode = arg(node, 2, "bias")
    b = a.var(bnode)
    wnode = arg(node, 1, "weight")
    if x is None or W is None or wnode.op != "get_attr" or (bnode is not None and b is None):
        opaque(a, node)
        return
    weight = _attr(a, str(wnode.target))
    bias = _attr(a, str(bnode.target)) if bnode is not None and bnode.op == "get_attr" else None
    y = out_var(a, node)
    _linear_core(a, x, y, W, b, weight.detach(), bias, None)


@register_function_rule(torch.addmm)
def _addmm(a: Analysis, node: fx.Node) -> None:
    """``torch.addmm(bias, x, weight)`` with a (in, out) weight: transformers' ``Conv1D`` (GPT-2)."""
    bnode, xnode, wnode = arg(node, 0, "input"), arg(node, 1, "mat1"), arg(node, 2, "mat2")
    x, W, b = a.var(xnode), a.var(wnode), a.var(bnode)
    ok = (x is not None and W is not None and b is not None and isinstance(wnode, fx.Node) and wnode.op == "get_attr"
          and isinstance(bnode, fx.Node) and bnode.op == "get_attr" and b.ndim == 1
          and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1)
    if not ok:
        opaque(a, node)
        return
    y = out_var(a, node)
    weight = _attr(a, str(wnode.target)).detach()
    Wt = a.new_var(f"{node.name}.weight_t", (W.shape[1], W.shape[0]))  # the Linear-layout view of W
    a.same(Wt, 0, W, 1)
    a.same(Wt, 1, W, 0)
    _linear_core(a, x, y, Wt, b, weight.t(), _attr(a, str(bnode.target)).detach(), None)
    for d_t, d_w in ((0, 1), (1, 0)):  # pruners read roles from the parameter's own dims, not the view's
        if Wt.slots[d_t] in a.roles:
            a.role(W, d_w, a.roles[Wt.slots[d_t]])


def _attr(a: Analysis, target: str) -> torch.Tensor:
    mod_name, _, attr = target.rpartition(".")
    return getattr(a.modules[mod_name], attr)


@register_module_rule(nn.Embedding)
def _embedding(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    name = str(node.target)
    ids = a.var(node.args[0])
    y = out_var(a, node)
    if ids is None or y is None:
        opaque(a, node)
        return
    W = a.module_param(name, "weight")
    a.pin(W, 0, "embedding vocabulary")
    for d in range(ids.ndim):
        a.same(ids, d, y, d)
    a.same(y, y.ndim - 1, W, 1)
    a.role(W, 1, "producer")
    zero_cols = ~module.weight.detach().ne(0).any(0).numpy()
    a.set_cv(y, y.ndim - 1, np.where(zero_cols, 0.0, np.nan))

    def rebuild() -> nn.Module | None:
        k = a.keep(W, 1)
        if k.all():
            return None
        w = module.weight.detach()
        new = skip_init(nn.Embedding, module.num_embeddings, int(k.sum()), padding_idx=module.padding_idx,
                           max_norm=module.max_norm, norm_type=module.norm_type,
                           scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w[:, torch.as_tensor(k)])
        return new

    a.rebuilders.setdefault(name, rebuild)


# ============================================================================ normalization


def _per_channel_params(a: Analysis, name: str, module: nn.Module, y: Var, dim: int,
                        names: tuple[str, ...]) -> None:
    for p in names:
        if isinstance(getattr(module, p, None), torch.Tensor) and getattr(module, p).dim() == 1:
            pv = a.module_param(name, p)
            a.same(y, dim, pv, 0)
            a.role(pv, 0, "producer" if p in ("weight", "bias") else "other")


def _sliced(t: torch.Tensor | None, keep: np.ndarray) -> torch.Tensor | None:
    return None if t is None else t.detach()[torch.as_tensor(keep)]


@register_module_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
def _batchnorm(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    name = str(node.target)
    x = a.var(node.args[0])
    y = out_var(a, node)
    if x is None or y is None or x.ndim < 2:
        opaque(a, node)
        return
    a.same_all(x, y)
    pin_spatial(a, x)
    _per_channel_params(a, name, module, y, 1, ("weight", "bias", "running_mean", "running_var"))
    C = module.num_features
    w = module.weight.detach().double().numpy() if module.affine else np.ones(C)
    bb = module.bias.detach().double().numpy() if module.affine else np.zeros(C)
    if module.running_mean is not None:
        rm = module.running_mean.double().numpy()
        rv = module.running_var.double().numpy()
        with np.errstate(all="ignore"):
            out = (a.cv(x, 1) - rm) / np.sqrt(rv + module.eps) * w + bb
    else:
        out = np.full(C, np.nan)
    out = np.where(w == 0, bb, out)
    a.set_cv(y, 1, out)

    def rebuild() -> nn.Module | None:
        k = a.keep(y, 1)
        if k.all():
            return None
        cls = type(module)
        new = cls(int(k.sum()), eps=module.eps, momentum=module.momentum, affine=module.affine,
                  track_running_stats=module.track_running_stats,
                  device=module.weight.device if module.affine else None)
        _copy_norm_state(module, new, k)
        return new

    a.rebuilders.setdefault(name, rebuild)


def _same_placement(new: nn.Module, old: nn.Module) -> nn.Module:
    """Move ``new`` to the device and floating dtype of ``old`` (a float64 model stays float64)."""
    ref = next((t for t in [*old.parameters(recurse=False), *old.buffers(recurse=False)] if t.is_floating_point()),
               None)
    return new if ref is None else new.to(device=ref.device, dtype=ref.dtype)


def _copy_norm_state(old: nn.Module, new: nn.Module, k: np.ndarray) -> None:
    _same_placement(new, old)
    with torch.no_grad():
        for p in ("weight", "bias"):
            t = getattr(old, p, None)
            if isinstance(t, torch.Tensor):
                getattr(new, p).copy_(_sliced(t, k))
        for bname in ("running_mean", "running_var"):
            t = getattr(old, bname, None)
            if isinstance(t, torch.Tensor):
                getattr(new, bname).copy_(_sliced(t, k))
        nbt = getattr(old, "num_batches_tracked", None)
        if isinstance(nbt, torch.Tensor) and getattr(new, "num_batches_tracked", None) is not None:
            new.num_batches_tracked.copy_(nbt)


@register_module_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _instancenorm(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    name = str(node.target)
    x = a.var(node.args[0])
    y = out_var(a, node)
    if x is None or y is None or x.ndim < 3:
        opaque(a, node)
        return
    a.same_all(x, y)
    pin_spatial(a, x)
    _per_channel_params(a, name, module, y, 1, ("weight", "bias", "running_mean", "running_var"))
    if not module.track_running_stats:
        C = module.num_features
        bb = module.bias.detach().double().numpy() if module.affine else np.zeros(C)
        a.set_cv(y, 1, np.where(~np.isnan(a.cv(x, 1)), bb, np.nan))

    def rebuild() -> nn.Module | None:
        k = a.keep(y, 1)
        if k.all():
            return None
        new = type(module)(int(k.sum()), eps=module.eps, momentum=module.momentum, affine=module.affine,
                           track_running_stats=module.track_running_stats)
        _copy_norm_state(module, new, k)
        return new

    a.rebuilders.setdefault(name, rebuild)


@register_module_rule(nn.GroupNorm)
def _groupnorm(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    name = str(node.target)
    x = a.var(node.args[0])
    y = out_var(a, node)
    if x is None or y is None or x.ndim < 2:
        opaque(a, node)
        return
    a.same_all(x, y)
    pin_spatial(a, x)
    _per_channel_params(a, name, module, y, 1, ("weight", "bias"))
    G, C = module.num_groups, module.num_channels
    # a group whose input is entirely constant normalizes to 0; a zero scale leaves only the shift
    w = module.weight.detach().double().numpy() if module.affine else np.ones(C)
    bb = module.bias.detach().double().numpy() if module.affine else np.zeros(C)
    const_group = np.repeat((~np.isnan(a.cv(x, 1))).reshape(G, C // G).all(1), C // G)
    a.set_cv(y, 1, np.where(const_group | (w == 0), bb, np.nan))

    def whole_groups() -> bool:
        k = a.keep(y, 1).reshape(G, C // G).any(1)
        return a.demand(y, 1, np.repeat(k, C // G))

    a.constraint(whole_groups)

    def rebuild() -> nn.Module | None:
        k = a.keep(y, 1)
        if k.all():
            return None
        new = nn.GroupNorm(int(k.reshape(G, -1).any(1).sum()), int(k.sum()), eps=module.eps, affine=module.affine)
        _copy_norm_state(module, new, k)
        return new

    a.rebuilders.setdefault(name, rebuild)


@register_module_rule(nn.LayerNorm)
def _layernorm(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    name = str(node.target)
    x = a.var(node.args[0])
    y = out_var(a, node)
    if x is None or y is None:
        opaque(a, node)
        return
    a.same_all(x, y)
    k = len(module.normalized_shape)
    for i in range(k):
        a.pin(x, x.ndim - k + i, "normalized by LayerNorm (statistics over these channels)")
        for p in ("weight", "bias"):
            if isinstance(getattr(module, p, None), torch.Tensor):
                a.same(x, x.ndim - k + i, a.module_param(name, p), i)


@register_function_rule(F.layer_norm, F.normalize, F.rms_norm)  # F.group_norm: in "library ops" below
def _f_norm_last(a: Analysis, node: fx.Node) -> None:
    x = a.var(node.args[0])
    y = out_var(a, node)
    if x is None or y is None:
        opaque(a, node)
        return
    a.same_all(x, y)
    if node.target in (F.layer_norm, F.rms_norm):
        shape = arg(node, 1, "normalized_shape")
        k = len(shape) if isinstance(shape, (tuple, list)) else 1
        dims = list(range(x.ndim - k, x.ndim))
        for pos, pname in ((2, "weight"),) + (((3, "bias"),) if node.target is F.layer_norm else ()):
            pv = a.var(arg(node, pos, pname))
            if pv is not None:
                for i in range(pv.ndim):
                    a.same(x, dims[i], pv, i)
    else:  # F.normalize
        dims = [norm_dim(arg(node, 2, "dim", 1), x.ndim)]
    for d in dims:
        a.pin(x, d, f"normalized by {node.target.__name__}")


@register_module_rule(nn.PReLU)
def _prelu(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    if module.num_parameters == 1:
        elementwise(a, node, module)
        return
    name = str(node.target)
    x = a.var(node.args[0])
    elementwise(a, node, module)
    y = a.var(node)
    if y is None or x is None:
        return
    a.same(y, 1, a.module_param(name, "weight"), 0)

    def rebuild() -> nn.Module | None:
        k = a.keep(y, 1)
        if k.all():
            return None
        new = _same_placement(nn.PReLU(int(k.sum())), module)
        with torch.no_grad():
            new.weight.copy_(_sliced(module.weight, k))
        return new

    a.rebuilders.setdefault(name, rebuild)


# ============================================================================ pooling / resampling


def _channelwise(a: Analysis, node: fx.Node, keep_const: bool) -> None:
    x = a.var(node.args[0])
    y = out_var(a, node)
    if x is None or y is None or x.ndim != y.ndim or x.ndim < 3:
        opaque(a, node)
        return
    a.same(x, 0, y, 0)
    a.same(x, 1, y, 1)
    pin_spatial(a, x)
    pin_spatial(a, y)
    c = a.cv(x, 1)
    a.set_cv(y, 1, c if keep_const else np.where(c == 0, 0.0, np.nan))


_POOL_CONST = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
               nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
               nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)


@register_module_rule(*_POOL_CONST)
def _pool_module(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)) and module.return_indices:
        opaque(a, node)
        return
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and module.return_indices:
        opaque(a, node)
        return
    _channelwise(a, node, keep_const=True)


@register_module_rule(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.LPPool1d, nn.LPPool2d)
def _avgpool_module(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    pad = getattr(module, "padding", 0)
    padded = any(p != 0 for p in (pad if isinstance(pad, (tuple, list)) else (pad,)))
    const_ok = isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) and (
        not padded or not module.count_include_pad)
    _channelwise(a, node, keep_const=const_ok)


@register_function_rule(F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                        F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate,
                        F.upsample, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d, torch.adaptive_avg_pool1d)
def _pool_function(a: Analysis, node: fx.Node) -> None:
    if node.kwargs.get("return_indices"):
        opaque(a, node)
        return
    _channelwise(a, node, keep_const=True)


@register_function_rule(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d)
def _avgpool_function(a: Analysis, node: fx.Node) -> None:
    _channelwise(a, node, keep_const=False)


# ============================================================================ softmax-like: one dim is mixed


@register_function_rule(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax",
                        torch.cumsum, "cumsum")
def _softmax(a: Analysis, node: fx.Node) -> None:
    x = a.var(node.args[0])
    y = out_var(a, node)
    d = arg(node, 1, "dim")
    if x is None or y is None or not isinstance(d, int) or x.shape != y.shape:
        opaque(a, node)
        return
    a.same_all(x, y)
    d = norm_dim(d, x.ndim)
    a.pin(x, d, f"mixed by {getattr(node.target, '__name__', node.target)}")
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name in ("softmax", "log_softmax"):
        # a constant slice is uniform along the softmax dimension
        value = 1.0 / x.shape[d] if name == "softmax" else -math.log(x.shape[d])
        for od, c in x.cval.items():
            if od != d:
                a.set_cv(y, od, np.where(np.isnan(c), np.nan, value))


@register_module_rule(nn.Softmax, nn.LogSoftmax, nn.Softmin)
def _softmax_module(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    x = a.var(node.args[0])
    y = out_var(a, node)
    if x is None or y is None:
        opaque(a, node)
        return
    a.same_all(x, y)
    d = module.dim if module.dim is not None else (0 if x.ndim in (0, 1, 3) else 1)
    a.pin(x, norm_dim(d, x.ndim), f"mixed by {type(module).__name__}")


# ============================================================================ reductions


_REDUCE = {torch.mean: "mean", "mean": "mean", torch.sum: "sum", "sum": "sum", torch.amax: "amax", "amax": "amax",
           torch.amin: "amin", "amin": "amin", torch.std: None, "std": None, torch.var: None, "var": None,
           torch.norm: None, "norm": None, torch.logsumexp: None, "logsumexp": None}


@register_function_rule(*_REDUCE.keys())
def _reduce(a: Analysis, node: fx.Node) -> None:
    x = a.var(node.args[0])
    y = out_var(a, node)
    if x is None or y is None:
        opaque(a, node)
        return
    kind = _REDUCE[node.target]
    dim = arg(node, 1, "dim")
    keepdim = bool(arg(node, 2, "keepdim", False))
    if node.target in (torch.norm, "norm"):
        dim = arg(node, 2, "dim")
        keepdim = bool(arg(node, 3, "keepdim", False))
    if dim is None:
        dims = list(range(x.ndim))
    elif isinstance(dim, int):
        dims = [norm_dim(dim, x.ndim)]
    elif isinstance(dim, (tuple, list)) and all(isinstance(d, int) for d in dim):
        dims = [norm_dim(d, x.ndim) for d in dim]
    else:
        opaque(a, node)
        return
    od = 0
    for d in range(x.ndim):
        if d in dims:
            a.pin(x, d, f"reduced by {kind or node.target}")
            if keepdim:
                od += 1
            continue
        if od >= y.ndim or y.shape[od] != x.shape[d]:
            opaque(a, node)
            return
        a.same(x, d, y, od)
        c = a.cv(x, d)
        if kind in ("mean", "amax", "amin"):
            a.set_cv(y, od, c)
        elif kind == "sum":
            a.set_cv(y, od, c * int(np.prod([x.shape[r] for r in dims])))
        else:
            pass  # no constants for other reductions
        od += 1


# ============================================================================ shape ops


def _segments(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Group dims of ``src`` and ``dst`` into runs with equal products (reshape correspondence)."""
    if int(np.prod(src)) != int(np.prod(dst)) or 0 in src:
        return None
    segs: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            segs.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            segs.append(([], [j]))
            j += 1
            continue
        if i >= len(src) or j >= len(dst):
            return None
        si, sj = [i], [j]
        pi, pj = src[i], dst[j]
        while pi != pj:
            if pi < pj:
                i += 1
                if i >= len(src):
                    return None
                si.append(i)
                pi *= src[i]
            else:
                j += 1
                if j >= len(dst):
                    return None
                sj.append(j)
                pj *= dst[j]
        segs.append((si, sj))
        i += 1
        j += 1
    return segs


def _outer(keeps: list[np.ndarray]) -> np.ndarray:
    out = np.ones(1, bool)
    for k in keeps:
        out = (out[:, None] & k[None, :]).reshape(-1)
    return out


def _project(flat: np.ndarray, shape: list[int], axis: int) -> np.ndarray:
    arr = flat.reshape(shape)
    other = tuple(i for i in range(len(shape)) if i != axis)
    return arr.any(axis=other) if other else arr


def couple_reshape(a: Analysis, x: Var, y: Var) -> bool:
    """Couple the dims of ``x`` and of its reshaped view ``y``; False when they do not correspond."""
    segs = _segments(x.shape, y.shape)
    if segs is None:
        return False
    for si, sj in segs:
        if len(si) == 1 and len(sj) == 1:
            a.same(x, si[0], y, sj[0])
            if si[0] in x.cval:
                y.cval[sj[0]] = x.cval[si[0]]
            continue
        if not si or not sj:
            continue  # a lone size-1 dim: always kept
        xs = [x.shape[d] for d in si]
        ys = [y.shape[d] for d in sj]
        if len(si) == 1:
            a.relations.append(("reshape", x.slots[si[0]], [y.slots[d] for d in sj], ys))
        elif len(sj) == 1:
            a.relations.append(("reshape", y.slots[sj[0]], [x.slots[d] for d in si], xs))

        def product(si=si, sj=sj, xs=xs, ys=ys) -> bool:
            flat = _outer([a.keep(x, d) for d in si]) | _outer([a.keep(y, d) for d in sj])
            changed = False
            for pos, d in enumerate(si):
                changed |= a.demand(x, d, _project(flat, xs, pos))
            for pos, d in enumerate(sj):
                changed |= a.demand(y, d, _project(flat, ys, pos))
            return changed

        a.constraint(product)
        # constants: in a merge, flat element (i, j, ...) is constant when the slice of any merged dim
        # through it is constant (e.g. a zero channel of a (C, H, W) -> C*H*W flatten)
        if len(si) >= 1 and len(sj) == 1:
            flat = np.full(int(np.prod(xs)), np.nan)
            for pos, d in enumerate(si):
                c = a.cv(x, d)
                if np.isnan(c).all():
                    continue
                shape = [1] * len(xs)
                shape[pos] = xs[pos]
                spread = np.broadcast_to(c.reshape(shape), xs).reshape(-1)
                flat = np.where(np.isnan(flat), spread, flat)
            a.set_cv(y, sj[0], flat)
        # a split: a slice of an output dim is constant when every element it gathers is the same constant
        if len(si) == 1 and len(sj) > 1:
            c = a.cv(x, si[0])
            if not np.isnan(c).all():
                arr = c.reshape(ys)
                for pos, d in enumerate(sj):
                    moved = np.moveaxis(arr, pos, 0).reshape(ys[pos], -1)
                    same = (moved == moved[:, :1]).all(1)
                    a.set_cv(y, d, np.where(same, moved[:, 0], np.nan))
    return True


def _reshape_like(a: Analysis, node: fx.Node, literal_sizes: list[Any] | None = None) -> None:
    x = a.var(node.args[0])
    y = out_var(a, node)
    if x is None or y is None or not couple_reshape(a, x, y):
        opaque(a, node, "reshape whose dimensions do not correspond")
        return
    if literal_sizes is not None and len(literal_sizes) == y.ndim:
        for d, s in enumerate(literal_sizes):
            if isinstance(s, int) and s not in (-1, 1):
                a.literal_sizes.append((node, y, d, s))


def _size_args(node: fx.Node) -> list[Any]:
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0])
    if not rest:
        s = node.kwargs.get("shape", node.kwargs.get("size"))
        return list(s) if isinstance(s, (tuple, list)) else []
    return rest


@register_function_rule("view", "reshape", torch.reshape)
def _view(a: Analysis, node: fx.Node) -> None:
    if node.target == "view" and len(node.args) == 2 and not isinstance(node.args[1], (int, tuple, list, fx.Node)):
        opaque(a, node, "view as a dtype")
        return
    _reshape_like(a, node, _size_args(node))


@register_function_rule(torch.flatten, "flatten", torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze",
                        "view_as", "reshape_as")
def _flatten(a: Analysis, node: fx.Node) -> None:
    _reshape_like(a, node)


@register_module_rule(nn.Flatten, nn.Unflatten)
def _flatten_module(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    _reshape_like(a, node, None)


def _permute_to(a: Analysis, node: fx.Node, perm: list[int]) -> None:
    x = a.var(node.args[0])
    y = out_var(a, node)
    if x is None or y is None or len(perm) != x.ndim:
        opaque(a, node)
        return
    for od, idx in enumerate(perm):
        a.same(x, idx, y, od)
        if idx in x.cval:
            y.cval[od] = x.cval[idx]


@register_function_rule("permute", torch.permute)
def _permute(a: Analysis, node: fx.Node) -> None:
    dims = _size_args(node) if node.target == "permute" else list(arg(node, 1, "dims"))
    x = a.var(node.args[0])
    if x is None or not all(isinstance(d, int) for d in dims):
        opaque(a, node)
        return
    _permute_to(a, node, [norm_dim(d, x.ndim) for d in dims])


@register_function_rule("transpose", torch.transpose, "swapaxes", torch.swapaxes, "swapdims", "t", torch.t)
def _transpose(a: Analysis, node: fx.Node) -> None:
    x = a.var(node.args[0])
    if x is None:
        opaque(a, node)
        return
    if node.target in ("t", torch.t):
        d0, d1 = 0, max(x.ndim - 1, 0)
    else:
        d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
    if not isinstance(d0, int) or not isinstance(d1, int):
        opaque(a, node)
        return
    perm = list(range(x.ndim))
    d0, d1 = norm_dim(d0, x.ndim), norm_dim(d1, x.ndim)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    _permute_to(a, node, perm)


@register_function_rule("expand", "expand_as", torch.broadcast_to)
def _expand(a: Analysis, node: fx.Node) -> None:
    x = a.var(node.args[0])
    y = out_var(a, node)
    if x is None or y is None:
        opaque(a, node)
        return
    off = y.ndim - x.ndim
    for d in range(y.ndim):
        xd = d - off
        if xd >= 0 and x.shape[xd] == y.shape[d]:
            a.same(x, xd, y, d)
            if xd in x.cval:
                y.cval[d] = x.cval[xd]
        elif y.shape[d] > 1:
            sizes = _size_args(node) if node.target == "expand" else []
            lit = sizes[d] if len(sizes) == y.ndim else None
            if a.traced.recorded and xd >= 0 and x.shape[xd] == 1 and type(lit) is int:
                # copies of one slice (repeat_kv's n_rep query heads per key/value head): fewer copies
                # are an expand to a smaller size, patched where the forward reads it
                a.literal_sizes.append((node, y, d, lit))
                continue
            # a broadcast dimension: its size comes from the expand arguments, never pruned here
            a.pin(y, d, "broadcast by expand")


def _legacy_empty(a: Analysis, t: Any) -> bool:
    meta = a.meta(t) if isinstance(t, fx.Node) else None
    return isinstance(meta, TensorMeta) and meta.shape == (0,)


@register_function_rule(torch.cat, torch.concat, torch.concatenate)
def _cat(a: Analysis, node: fx.Node) -> None:
    tensors = arg(node, 0, "tensors")
    d = arg(node, 1, "dim", 0)
    y = out_var(a, node)
    if isinstance(tensors, (tuple, list)):
        # torch.cat skips 1-d empty tensors whatever their rank (how a KV cache starts out)
        tensors = [t for t in tensors if not _legacy_empty(a, t)]
    xs = [a.var(t) for t in tensors] if isinstance(tensors, (tuple, list)) else []
    if y is None or not xs or any(v is None for v in xs) or not isinstance(d, int):
        opaque(a, node)
        return
    d = norm_dim(d, y.ndim)
    if any(v.ndim != y.ndim for v in xs):
        opaque(a, node)
        return
    for v in xs:
        for od in range(y.ndim):
            if od != d:
                a.same(v, od, y, od)
    offsets = np.cumsum([0] + [v.shape[d] for v in xs])
    a.relations.append(("cat", y.slots[d], [(v.slots[d], int(off)) for v, off in zip(xs, offsets[:-1], strict=True)]))

    def concat() -> bool:
        ky = a.keep(y, d)
        changed = False
        parts = []
        for v, lo, hi in zip(xs, offsets[:-1], offsets[1:], strict=True):
            changed |= a.demand(v, d, ky[lo:hi])
            parts.append(a.keep(v, d))
        changed |= a.demand(y, d, np.concatenate(parts))
        return changed

    a.constraint(concat)
    a.set_cv(y, d, np.concatenate([a.cv(v, d) for v in xs]))
    for od in range(y.ndim):  # along other dims a slice is constant where every input agrees
        if od != d:
            cs = np.stack([a.cv(v, od) for v in xs])
            a.set_cv(y, od, np.where((cs == cs[0]).all(0), cs[0], np.nan))


@register_function_rule(torch.stack)
def _stack(a: Analysis, node: fx.Node) -> None:
    tensors = arg(node, 0, "tensors")
    d = arg(node, 1, "dim", 0)
    y = out_var(a, node)
    if isinstance(tensors, (tuple, list)):
        # torch.cat skips 1-d empty tensors whatever their rank (how a KV cache starts out)
        tensors = [t for t in tensors if not _legacy_empty(a, t)]
    xs = [a.var(t) for t in tensors] if isinstance(tensors, (tuple, list)) else []
    if y is None or not xs or any(v is None for v in xs) or not isinstance(d, int):
        opaque(a, node)
        return
    d = norm_dim(d, y.ndim)
    a.pin(y, d, "stacked dimension")
    for v in xs:
        for vd in range(v.ndim):
            a.same(v, vd, y, vd if vd < d else vd + 1)
    for vd in range(xs[0].ndim):  # a slice is constant where every stacked input agrees
        cs = np.stack([a.cv(v, vd) for v in xs])
        a.set_cv(y, vd if vd < d else vd + 1, np.where((cs == cs[0]).all(0), cs[0], np.nan))


@register_function_rule(torch.chunk, "chunk", torch.split, "split", torch.tensor_split, "tensor_split",
                        torch.unbind, "unbind")
def _split(a: Analysis, node: fx.Node) -> None:
    x = a.var(node.args[0])
    metas = a.meta(node)
    if x is None or not isinstance(metas, (tuple, list)) or not all(isinstance(m, TensorMeta) for m in metas):
        opaque(a, node)
        return
    outs = tuple(a.new_var(f"{node.name}.{i}", m.shape) for i, m in enumerate(metas))
    a.vars[node] = outs
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name == "unbind":
        d = norm_dim(arg(node, 1, "dim", 0), x.ndim)
        a.pin(x, d, "unbound dimension (each index used separately)")
        for o in outs:
            for od in range(o.ndim):
                xd = od if od < d else od + 1
                a.same(x, xd, o, od)
                if xd in x.cval:
                    o.cval[od] = x.cval[xd]
        return
    d = norm_dim(arg(node, 2, "dim", 0), x.ndim)
    for o in outs:
        for od in range(o.ndim):
            if od != d:
                a.same(x, od, o, od)
                if od in x.cval:  # a constant slice stays constant in every part (LeViT's zero heads)
                    o.cval[od] = x.cval[od]
    sizes = [o.shape[d] for o in outs]
    equal = name == "chunk" and len(set(sizes)) == 1
    step = arg(node, 1, "split_size_or_sections", arg(node, 1, "split_size"))
    if (name == "split" and isinstance(step, int) and not isinstance(step, bool) and len(set(sizes)) == 1
            and sizes[0] * len(outs) == x.shape[d]):
        # x.split(self.split_size): equal parts whose size the forward passes (GPT-2's fused qkv);
        # the size is patched like a reshape literal
        equal = True
        for o in outs:
            a.literal_sizes.append((node, o, d, step))
    if not equal:
        why = f"split into fixed sizes by {name}; the sizes are part of the forward code"
        b = a.block(node, why)
        a.pin(x, d, why, b)
        for o in outs:
            a.pin(o, d, why, b)
        return
    n = sizes[0]
    a.relations.append(("chunk", x.slots[d], [o.slots[d] for o in outs]))

    def chunks() -> bool:
        pattern = a.keep(x, d).reshape(len(outs), n).any(0)
        for o in outs:
            pattern = pattern | a.keep(o, d)
        changed = a.demand(x, d, np.tile(pattern, len(outs)))
        for o in outs:
            changed |= a.demand(o, d, pattern)
        return changed

    a.constraint(chunks)
    c = a.cv(x, d)
    for i, o in enumerate(outs):
        a.set_cv(o, d, c[i * n:(i + 1) * n])


@register_function_rule(operator.getitem)
def _getitem(a: Analysis, node: fx.Node) -> None:
    src = node.args[0]
    value = a.vars.get(src) if isinstance(src, fx.Node) else None
    idx = node.args[1]
    if isinstance(value, tuple):
        if isinstance(idx, int):
            a.vars[node] = value[idx]
        else:
            opaque(a, node)
        return
    x = a.var(src)
    if x is None:
        opaque(a, node)
        return
    _index_tensor(a, node, x, idx)


def _index_tensor(a: Analysis, node: fx.Node, x: Var, idx: Any) -> None:
    y = out_var(a, node)
    if y is None:
        opaque(a, node)
        return
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, (fx.Node, list)) and not isinstance(i, slice) for i in items if i is not Ellipsis):
        # tensor / list indexing (gather): positions are data
        if any(isinstance(i, fx.Node) and isinstance(a.meta(i), TensorMeta) for i in items) or any(
                isinstance(i, list) for i in items):
            if not _gather_index(a, node, x, y, items):  # in "library ops" below
                opaque(a, node, "advanced (tensor) indexing")
            return
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (x.ndim - n_real))
        else:
            expanded.append(i)
    xd = od = 0
    for i in expanded:
        if i is None:
            od += 1
            continue
        if xd >= x.ndim:
            opaque(a, node)
            return
        if isinstance(i, slice):
            if i == slice(None) or _covers(i, x.shape[xd]):  # _covers: in "library ops" below
                a.same(x, xd, y, od)
                if xd in x.cval:
                    y.cval[od] = x.cval[xd]
            elif not _segment(a, node, x, xd, y, od, i):
                b = a.block(node, "sliced at fixed positions in the forward code")
                a.pin(x, xd, "sliced at fixed positions", b)
                a.pin(y, od, "sliced at fixed positions", b)
            xd += 1
            od += 1
        else:  # an integer (or an int-valued graph value): selects one position
            b = a.block(node, "indexed at a fixed position in the forward code")
            a.pin(x, xd, "indexed at a fixed position", b)
            xd += 1
    while xd < x.ndim and od < y.ndim:
        a.same(x, xd, y, od)
        if xd in x.cval:
            y.cval[od] = x.cval[xd]
        xd += 1
        od += 1


# ============================================================================ matmul / attention


@register_function_rule(torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm")
def _matmul(a: Analysis, node: fx.Node) -> None:
    x, w = a.var(node.args[0]), a.var(arg(node, 1, "other", arg(node, 1, "mat2")))
    y = out_var(a, node)
    if x is None or w is None or y is None or x.ndim < 2 or w.ndim < 2:
        opaque(a, node)
        return
    # batch dims broadcast like elementwise ops; a zero batch slice on either side gives a zero slice
    zero_b: dict[int, np.ndarray] = {}
    for v in (x, w):
        off = y.ndim - v.ndim
        for d in range(v.ndim - 2):
            if v.shape[d] == y.shape[d + off]:
                a.same(v, d, y, d + off)
                z = a.cv(v, d) == 0
                zero_b[d + off] = zero_b.get(d + off, np.zeros_like(z)) | z
    for od, z in zero_b.items():
        a.set_cv(y, od, np.where(z, 0.0, np.nan))
    a.same(x, x.ndim - 2, y, y.ndim - 2)
    a.same(w, w.ndim - 1, y, y.ndim - 1)
    # the contracted dimension keeps everything: scale factors in attention read its size
    a.pin(x, x.ndim - 1, "contracted by matmul")
    a.pin(w, w.ndim - 2, "contracted by matmul")
    cx, cw = a.cv(x, x.ndim - 2), a.cv(w, w.ndim - 1)
    a.set_cv(y, y.ndim - 2, np.where(cx == 0, 0.0, np.nan))
    a.set_cv(y, y.ndim - 1, np.where(cw == 0, 0.0, np.nan))


@register_function_rule(F.scaled_dot_product_attention)
def _sdpa(a: Analysis, node: fx.Node) -> None:
    q, k, v = (a.var(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    y = out_var(a, node)
    mask = arg(node, 3, "attn_mask")
    if q is None or k is None or v is None or y is None or q.ndim != k.ndim or q.ndim != v.ndim or q.ndim < 3:
        opaque(a, node)
        return
    hd = q.ndim - 3  # the heads dim of (..., heads, tokens, features)
    mv = a.var(mask)
    if mv is not None:
        # an additive mask or bias broadcast against the (..., heads, queries, keys) scores; a per-head
        # bias (T5's relative position bias, ALiBi) loses the heads that go
        for md in range(mv.ndim):
            d = md + (q.ndim - mv.ndim)
            if d == hd and 0 <= d and mv.shape[md] == q.shape[hd] and mv.shape[md] > 1:
                a.same(mv, md, q, hd)
            elif mv.shape[md] > 1:
                a.pin(mv, md, "attention mask")
    gqa = bool(node.kwargs.get("enable_gqa", False)) and q.shape[hd] != k.shape[hd]
    for d in range(q.ndim - 2):
        if gqa and d == hd:
            continue
        for t in (q, k, v):
            if t.shape[d] == y.shape[d]:
                a.same(t, d, y, d)
    a.same(q, q.ndim - 2, y, y.ndim - 2)
    a.same(v, v.ndim - 1, y, y.ndim - 1)
    for t, d in ((q, q.ndim - 1), (k, k.ndim - 1), (k, k.ndim - 2), (v, v.ndim - 2)):
        a.pin(t, d, "contracted by attention")
    if gqa:
        # grouped-query attention: query head h reads key/value head h // (Hq / Hkv). Query heads are
        # a (kv head, head in group) product: whole groups go with their key/value head, and a head
        # position inside the groups goes from every group at once (sdpa reads the ratio from shapes)
        hq, hk = q.shape[hd], k.shape[hd]
        if hq % hk or k.shape[hd] != v.shape[hd]:
            opaque(a, node, "grouped-query attention whose head counts do not divide")
            return
        heads = a.new_var(f"{node.name}.qheads", (hq,))
        groups = a.new_var(f"{node.name}.groups", (hk, hq // hk))
        a.same(q, hd, heads, 0)
        a.same(y, hd, heads, 0)
        couple_reshape(a, heads, groups)
        a.unread_sizes.append((node, groups, 1, hq // hk))
        a.same(k, hd, groups, 0)
        a.same(v, hd, groups, 0)
        vc = np.repeat(a.cv(v, hd), hq // hk)
    else:
        a.same(y, hd, q, hd)
        vc = a.cv(v, hd)
    # a head whose values are all zero outputs zero; so does a value feature that is zero everywhere
    a.set_cv(y, hd, np.where(vc == 0, 0.0, np.nan))
    fc = a.cv(v, v.ndim - 1)
    a.set_cv(y, y.ndim - 1, np.where(fc == 0, 0.0, np.nan))


# ============================================================================ tensor factories


@register_function_rule(torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.rand, torch.randn,
                        torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like,
                        torch.randn_like, "new_zeros", "new_ones", "new_full", "new_empty", torch.tensor,
                        torch.eye, torch.linspace)
def _factory(a: Analysis, node: fx.Node) -> None:
    out = a.var_like(node.name, a.meta(node))
    a.vars[node] = out
    for v in flatten_vars(out):
        a.pin_var(v, "created inside forward with fixed sizes")
    for inp in node.all_input_nodes:
        for v in flatten_vars(a.vars.get(inp)):
            a.pin_var(v, "shape read by a tensor factory")


# ============================================================================ dispatch


def apply_rule(a: Analysis, node: fx.Node) -> None:
    if node.op == "placeholder":
        placeholder_rule(a, node)
        return
    if node.op == "output":
        output_rule(a, node)
        return
    if node.op == "get_attr":
        get_attr_rule(a, node)
        return
    meta = a.meta(node)
    if node.op == "call_module":
        module = a.modules.get(str(node.target))
        opaque_reason = a.traced.opaque.get(str(node.target))
        if opaque_reason is not None and not (module is not None and has_user_rule(module)):
            opaque(a, node, f"forward cannot be traced ({opaque_reason}); module kept whole")
            return
        rule = module_rule_for(module) if module is not None else None
        if rule is None:
            opaque(a, node, f"no rule for module type {type(module).__name__}; register one with "
                            "deployprune.finalize.register_module_rule")
            return
        rule(a, node, module)
        return
    # call_function / call_method
    if not _produces_tensor(meta):
        if node.target in (operator.getitem,) and isinstance(a.vars.get(node.args[0]), tuple):
            pass
        else:
            _non_tensor(a, node)
            return
    rule = function_rule_for(node)
    if rule is None:
        opaque(a, node)
        return
    rule(a, node)


def _produces_tensor(meta: Any) -> bool:
    if isinstance(meta, TensorMeta):
        return True
    if isinstance(meta, (tuple, list)):
        return any(_produces_tensor(m) for m in meta)
    return False


def _non_tensor(a: Analysis, node: fx.Node) -> None:
    """Python values computed from tensors (``x.dim()``, ``x.numel()``, arithmetic on sizes)."""
    harmless = {"dim", "ndimension", "numel", "nelement", "is_contiguous", "element_size", "get_device"}
    if node.op == "call_method" and node.target in harmless:
        return
    for inp in node.all_input_nodes:
        for v in flatten_vars(a.vars.get(inp)):
            if node.op == "call_method" and node.target in ("item", "tolist", "any", "all"):
                a.pin_var(v, f"value read by Tensor.{node.target}")


__all__ = [
    "register_module_rule",
    "register_function_rule",
    "elementwise",
    "opaque",
    "couple_reshape",
    "apply_rule",
    "owner_of",
]


@register_function_rule(F.pad, torch.constant_pad_nd)
def _pad(a: Analysis, node: fx.Node) -> None:
    x = a.var(node.args[0])
    y = out_var(a, node)
    pad = arg(node, 1, "pad")
    if x is None or y is None or not isinstance(pad, (tuple, list)) or x.ndim != y.ndim:
        opaque(a, node)
        return
    n = len(pad) // 2
    mode = arg(node, 2, "mode", "constant")
    value = arg(node, 3, "value", 0.0) or 0.0
    for d in range(x.ndim):
        if d >= x.ndim - n:
            a.pin(x, d, "padded dimension")
            a.pin(y, d, "padded dimension")
        else:
            a.same(x, d, y, d)
            c = a.cv(x, d)
            if mode == "constant":
                c = np.where(c == value, c, np.nan)
            a.set_cv(y, d, c)


@register_function_rule(torch.roll, "roll", torch.flip, "flip")
def _roll(a: Analysis, node: fx.Node) -> None:
    """``torch.roll(x, shifts, dims)`` (Swin's shifted windows) and ``torch.flip(x, dims)`` move positions
    along ``dims`` only: those are pinned, every other dim passes through."""
    x = a.var(node.args[0])
    y = out_var(a, node)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dims = arg(node, 2, "dims") if name == "roll" else arg(node, 1, "dims")
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims = (dims,)
    if (x is None or y is None or x.ndim != y.ndim or not isinstance(dims, (tuple, list)) or not dims
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims)):
        opaque(a, node)  # roll over the flattened tensor, or dims the graph computes
        return
    moved = {norm_dim(d, x.ndim) for d in dims}
    for d in range(x.ndim):
        if d in moved:
            a.pin(x, d, f"positions moved by {name}")
            a.pin(y, d, f"positions moved by {name}")
        else:
            a.same(x, d, y, d)
            if d in x.cval:
                y.cval[d] = x.cval[d]


@register_module_rule(nn.MultiheadAttention)
def _multihead_attention(a: Analysis, node: fx.Node, module: nn.Module) -> None:
    """Whole heads whose value rows or output columns are zero are removed; embed_dim stays."""
    name = str(node.target)
    q, k, v = (a.var(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    metas = a.meta(node)
    weights_used = any(u.target is not operator.getitem or (u.args[1] != 0 and len(u.users) > 0)
                       for u in node.users)
    plain = (module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn
             and all(arg(node, i, n) in (None, False) for i, n in ((3, "key_padding_mask"), (5, "attn_mask")))
             and not node.kwargs.get("is_causal", False) and len(node.args) <= 4)
    if q is None or k is None or v is None or not isinstance(metas, tuple) or not plain or weights_used:
        opaque(a, node, "nn.MultiheadAttention with masks, bias_k/v, separate k/v dims or used attention "
                        "weights: heads kept")
        return
    y = a.new_var(f"{node.name}.0", metas[0].shape)
    out = (y,) + tuple(a.var_like(f"{node.name}.{i}", m) for i, m in enumerate(metas[1:], 1))
    a.vars[node] = out
    for t in (q, k, v):
        a.pin(t, t.ndim - 1, "embed_dim of nn.MultiheadAttention")
    for d in range(q.ndim):
        a.same(q, d, y, d)
    for extra in out[1:]:
        for ev in flatten_vars(extra):
            a.pin_var(ev, "attention weights")
    E, h = module.embed_dim, module.num_heads
    hd = E // h
    W, Wo = a.module_param(name, "in_proj_weight"), a.module_param(f"{name}.out_proj", "weight")
    a.pin(W, 1, "embed_dim of nn.MultiheadAttention")
    a.pin(Wo, 0, "embed_dim of nn.MultiheadAttention")
    if module.out_proj.bias is not None:
        a.pin_var(a.module_param(f"{name}.out_proj", "bias"), "embed_dim of nn.MultiheadAttention")
    heads = a.new_var(f"{node.name}.heads", (h,))
    three, inner, inner2 = a.new_var("three", (3,)), a.new_var("hd", (hd,)), a.new_var("hd", (hd,))
    for t in (three, inner, inner2):
        a.pin_var(t, "inside a head")
    view_in = Var(f"{name}.in_proj_rows", (3, h, hd), [three.slots[0], heads.slots[0], inner.slots[0]])
    view_out = Var(f"{name}.out_proj_cols", (h, hd), [heads.slots[0], inner2.slots[0]])
    couple_reshape(a, Var(f"{name}.in_proj_weight.0", (3 * E,), [W.slots[0]]), view_in)
    couple_reshape(a, Var(f"{name}.out_proj.weight.1", (E,), [Wo.slots[1]]), view_out)
    a.role(W, 0, "producer")
    a.role(Wo, 1, "consumer")
    if module.in_proj_bias is not None:
        b = a.module_param(name, "in_proj_bias")
        a.same(W, 0, b, 0)
        a.role(b, 0, "producer")
    w = module.in_proj_weight.detach().reshape(3, h, hd, E)
    v_zero = (w[2] == 0).flatten(1).all(1)
    if module.in_proj_bias is not None:
        v_zero &= (module.in_proj_bias.detach().reshape(3, h, hd)[2] == 0).all(1)
    out_zero = (module.out_proj.weight.detach().reshape(E, h, hd) == 0).all(2).all(0)
    a.demand(heads, 0, ~(v_zero | out_zero).numpy())

    def rebuild() -> nn.Module | None:
        keep = a.keep(heads, 0)
        if keep.all():
            return None
        from .mha import pruned_mha

        return pruned_mha(module, torch.as_tensor(keep))

    a.rebuilders.setdefault(name, rebuild)


# ============================================================================ library ops
# Norms as library code calls them. timm's norm-act layers (BatchNormAct2d, GroupNormAct, ...)
# subclass torch.nn's norms but call F.batch_norm / F.group_norm in their own forward, so the
# capture sees the functional call, with the module's parameters and buffers as get_attr nodes.
# The channels are the same as for the module rules above; the parameters shrink in place, and a
# size attribute (num_features, num_groups) of the module that owns them is patched.


def _channel_arg(a: Analysis, node: fx.Node, index: int, name: str, y: Var, role: str
                 ) -> tuple[bool, np.ndarray | None]:
    """Couple a per-channel tensor argument (weight, bias, running stats) with ``y``'s dim 1.

    Returns (ok, values): ok is False for an argument of an unexpected kind or shape; values are
    its float64 values when it is a parameter or buffer (a get_attr node), None when absent or
    computed in forward (then no constants are derived from it).
    """
    t = arg(node, index, name)
    if t is None:
        return True, None
    v = a.var(t)
    if v is None or v.ndim != 1 or v.shape[0] != y.shape[1]:
        return False, None
    a.same(y, 1, v, 0)
    a.role(v, 0, role)
    if t.op != "get_attr":
        return True, None
    return True, _attr(a, str(t.target)).detach().double().numpy()


def _patch_norm_size(a: Analysis, node: fx.Node, v: Var, dim: int, attr: str, size: int,
                     params: tuple[Any, ...]) -> None:
    """Note ``attr`` (num_features, num_groups) of the norm module whose forward made this call, so
    the size is patched when its parameters shrink; only when the module holds those parameters."""
    owner = owner_of(node)
    module = a.modules.get(owner)
    if module is None or getattr(module, attr, None) != size:
        return
    targets = {str(p.target).rpartition(".")[0] for p in params if isinstance(p, fx.Node) and p.op == "get_attr"}
    if targets == {owner}:
        a.literal_sizes.append((node, v, dim, size))


@register_function_rule(F.batch_norm)
def _f_batch_norm(a: Analysis, node: fx.Node) -> None:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)``."""
    x = a.var(node.args[0])
    y = out_var(a, node)
    training = arg(node, 5, "training", False)
    eps = arg(node, 7, "eps", 1e-5)
    if x is None or y is None or x.ndim < 2 or x.shape != y.shape or not isinstance(training, bool) or not isinstance(
            eps, (int, float)):
        opaque(a, node, "batch_norm on unbatched input or with a computed training flag or eps")
        return
    a.same_all(x, y)
    pin_spatial(a, x)
    values = {}
    for i, name in enumerate(("running_mean", "running_var", "weight", "bias"), 1):
        ok, values[name] = _channel_arg(a, node, i, name, y, "producer" if name in ("weight", "bias") else "other")
        if not ok:
            opaque(a, node, f"batch_norm whose {name} is not one value per channel")
            return
    C = x.shape[1]
    given = {name: arg(node, i, name) is not None for i, name in enumerate(values, 1)}
    known = all(values[n] is not None or not given[n] for n in values)
    if known:
        w = values["weight"] if values["weight"] is not None else np.ones(C)
        b = values["bias"] if values["bias"] is not None else np.zeros(C)
        cx = a.cv(x, 1)
        if training or values["running_mean"] is None or values["running_var"] is None:
            # batch statistics: an exactly zero channel normalizes to 0 (mean 0, variance 0)
            out = np.where(cx == 0, b, np.nan)
        else:
            with np.errstate(all="ignore"):
                out = (cx - values["running_mean"]) / np.sqrt(values["running_var"] + eps) * w + b
        a.set_cv(y, 1, np.where(w == 0, b, out))
    _patch_norm_size(a, node, y, 1, "num_features", C, tuple(arg(node, i, n) for i, n in enumerate(values, 1)))


@register_function_rule(F.instance_norm)
def _f_instance_norm(a: Analysis, node: fx.Node) -> None:
    """``F.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)``:
    every channel of every sample is normalized on its own."""
    x = a.var(node.args[0])
    y = out_var(a, node)
    use_input_stats = arg(node, 5, "use_input_stats", True)
    eps = arg(node, 7, "eps", 1e-5)
    if x is None or y is None or x.ndim < 3 or x.shape != y.shape or not isinstance(use_input_stats, bool) or \
            not isinstance(eps, (int, float)):
        opaque(a, node, "instance_norm on unbatched input or with a computed use_input_stats or eps")
        return
    a.same_all(x, y)
    pin_spatial(a, x)
    values = {}
    for i, name in enumerate(("running_mean", "running_var", "weight", "bias"), 1):
        ok, values[name] = _channel_arg(a, node, i, name, y, "producer" if name in ("weight", "bias") else "other")
        if not ok:
            opaque(a, node, f"instance_norm whose {name} is not one value per channel")
            return
    C = x.shape[1]
    given = {name: arg(node, i, name) is not None for i, name in enumerate(values, 1)}
    if all(values[n] is not None or not given[n] for n in values):
        w = values["weight"] if values["weight"] is not None else np.ones(C)
        b = values["bias"] if values["bias"] is not None else np.zeros(C)
        cx = a.cv(x, 1)
        if use_input_stats or values["running_mean"] is None or values["running_var"] is None:
            out = np.where(cx == 0, b, np.nan)
        else:
            with np.errstate(all="ignore"):
                out = (cx - values["running_mean"]) / np.sqrt(values["running_var"] + eps) * w + b
        a.set_cv(y, 1, np.where(w == 0, b, out))
    _patch_norm_size(a, node, y, 1, "num_features", C, tuple(arg(node, i, n) for i, n in enumerate(values, 1)))


@register_function_rule(F.group_norm)
def _f_group_norm(a: Analysis, node: fx.Node) -> None:
    """``F.group_norm(x, num_groups, weight, bias, eps)``: whole groups go (each group has its own
    statistics), and the group count is patched in the module that passes it (timm's GroupNormAct
    passes ``self.num_groups``); a count that no attribute holds keeps every group."""
    x = a.var(node.args[0])
    y = out_var(a, node)
    G = arg(node, 1, "num_groups")
    if x is None or y is None or x.ndim < 2 or x.shape != y.shape or not isinstance(G, int) or G < 1 or \
            x.shape[1] % G:
        opaque(a, node, "group_norm on unbatched input or with a computed group count")
        return
    C = x.shape[1]
    a.same_all(x, y)
    pin_spatial(a, x)
    values = {}
    for i, name in ((2, "weight"), (3, "bias")):
        ok, values[name] = _channel_arg(a, node, i, name, y, "producer")
        if not ok:
            opaque(a, node, f"group_norm whose {name} is not one value per channel")
            return
    groups = a.new_var(f"{node.name}.groups", (G, C // G))
    couple_reshape(a, Var(f"{node.name}.channels", (C,), [y.slots[1]]), groups)
    a.pin(groups, 1, "normalized by group_norm (statistics over the channels of a group)")
    if G > 1:
        owner = a.modules.get(owner_of(node))
        attr = next((k for k in ("num_groups", "groups") if getattr(owner, k, None) == G), None)
        if attr is None:
            b = a.block(node, f"forward code passes the group count {G} to group_norm; no attribute of "
                              f"{owner_of(node) or 'the model'!r} named num_groups holds it")
            a.pin(groups, 0, "group count fixed in forward code", b)
        else:
            a.literal_sizes.append((node, groups, 0, G))
    given = [arg(node, i, n) is not None for i, n in ((2, "weight"), (3, "bias"))]
    if all(v is not None or not g for v, g in zip(values.values(), given, strict=True)):
        w = values["weight"] if values["weight"] is not None else np.ones(C)
        b = values["bias"] if values["bias"] is not None else np.zeros(C)
        zero_group = np.repeat((a.cv(x, 1) == 0).reshape(G, C // G).all(1), C // G)
        a.set_cv(y, 1, np.where(zero_group | (w == 0), b, np.nan))


def _gather_index(a: Analysis, node: fx.Node, x: Var, y: Var, items: list[Any]) -> bool:
    """``x[:, idx]``: one integer index tensor, full slices elsewhere (LeViT's
    ``attention_biases[:, attention_bias_idxs]``). The indexed dim and the index keep every position;
    the other dims (the heads) pass through. False for any other advanced indexing."""
    pos = [k for k, i in enumerate(items) if isinstance(i, fx.Node) and isinstance(a.meta(i), TensorMeta)]
    if len(pos) != 1 or len(items) > x.ndim:
        return False
    k = pos[0]
    if any(not (isinstance(i, slice) and i == slice(None)) for j, i in enumerate(items) if j != k):
        return False
    meta = a.meta(items[k])
    iv = a.var(items[k])
    if iv is None or meta.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8):
        return False  # a bool or byte mask selects a data-dependent number of positions
    n = len(meta.shape)
    if y.shape != x.shape[:k] + tuple(meta.shape) + x.shape[k + 1:]:
        return False
    b = a.block(node, "indexed by a tensor of positions")
    a.pin(x, k, "indexed by a tensor of positions", b)
    a.pin_var(iv, "index positions", b)
    for j in range(n):
        a.same(iv, j, y, k + j)
    for d in range(x.ndim):
        if d == k:
            continue
        od = d if d < k else d - 1 + n
        a.same(x, d, y, od)
        if d in x.cval:
            y.cval[od] = x.cval[d]
    return True


def _segment(a: Analysis, node: fx.Node, x: Var, xd: int, y: Var, od: int, s: slice) -> bool:
    """``y = x[..., start:stop]`` on one dim with bounds the forward code computed (Phi-3's
    ``qkv[..., :query_pos]`` with ``query_pos = self.config.num_attention_heads * self.head_dim``):
    position ``j`` of ``y`` is position ``start + j`` of ``x``, both kept together. The compacted model
    needs the bounds at their new values: ``_plan_patches`` finds the attributes (or config fields)
    they are computed from and patches them, or pins the slice. Recorded graphs only, only a computed
    tensor (never a buffer, parameter or input), and only when ``stop - start`` is ``y``'s size (a
    plain, in-range, step-1 slice)."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not a.traced.recorded or s.step not in (None, 1):
        return False
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.op in ("get_attr", "placeholder"):
        # a buffer or an input sliced to the sequence length (BERT's position_ids[:, :seq]): the
        # positions past the bound are read by longer inputs, though not by this one
        return False
    n = x.shape[xd]
    start = 0 if s.start is None else s.start
    stop = n if s.stop is None else s.stop
    if not (is_int(start) and is_int(stop) and 0 <= start < stop <= n and stop - start == y.shape[od]):
        return False
    a.slice_bounds.append((node, x, xd, int(start), None if s.stop is None or stop == n else int(stop)))

    def coupled() -> bool:
        both = a.keep(x, xd)[start:stop] | a.keep(y, od)
        full = np.zeros(n, dtype=bool)
        full[start:stop] = both
        return a.demand(x, xd, full) | a.demand(y, od, both)

    a.constraint(coupled)
    a.set_cv(y, od, a.cv(x, xd)[start:stop])
    return True


def _covers(s: slice, n: int) -> bool:
    """A slice that keeps every position of a dim of size ``n`` (GhostNet's ``out[:, :self.out_chs]``
    where the concat is exactly ``out_chs`` wide). It still keeps every position once the dim shrinks:
    Python slicing clamps the stop."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    return (s.start in (None, 0) and s.step in (None, 1)
            and (s.stop is None or (is_int(s.stop) and s.stop >= n)))


@register_function_rule("torchvision.ops.stochastic_depth.stochastic_depth")
def _stochastic_depth(a: Analysis, node: fx.Node) -> None:
    """torchvision's ``stochastic_depth(x, p, mode, training)`` (EfficientNet, ConvNeXt, Swin): the
    identity in eval mode; in training it scales whole samples or rows, so only zeros stay known."""
    p, training = arg(node, 1, "p"), arg(node, 3, "training", True)
    if training is False or p == 0:
        elementwise(a, node)
    else:
        _elementwise_no_cv(a, node, node.args[0])
        x, y = a.var(node.args[0]), a.var(node)
        if x is not None and y is not None:
            for d, c in x.cval.items():
                a.set_cv(y, d, np.where(c == 0, 0.0, np.nan))
