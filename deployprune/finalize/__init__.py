"""Finalize: bake masks, propagate them through the traced graph, replace modules.

``finalize(model, example_inputs, masks)`` returns a plain ``nn.Module`` (the user's own module
tree, with smaller ``torch.nn`` layers swapped in) whose output equals the masked model's
output. ``compact(...)`` returns the same model together with what was removed and what
blocked removal.

How it works (see ``graph.py`` for the vocabulary):

1. copy the model, bake the masks into the weights (the input model is never modified);
2. trace it with torch.fx and run it once to record every tensor's shape;
3. apply one rule per node (``rules.py``) to couple dimensions and compute constants;
4. solve the demand fixed point: what is kept is exactly what some output needs;
5. rebuild the modules and parameters that shrink, patch ``num_heads``-style attributes
   that forward code feeds to ``view``/``reshape``;
6. verify: run the compacted model; if a node's shape does not match (sizes fixed in
   forward code), keep that node's channels whole and go back to 4; finally compare outputs
   with the masked model. If they ever differ, the uncompacted masked model is returned
   (never a wrong model) and the problem is reported.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..errors import InputError, ParityError, UnsupportedError
from ..masks import (
    Masks,
    apply_masks_,
    copy_model,
    detach_prune_hooks_,
    extract_attached_masks,
    normalize_masks,
    strip_parametrizations_,
)
from ..stats import count_params
from .accounting import Accounting, KeptChannels, account, all_kept, masked_slices
from .capture import CaptureError, flat_tensors, record
from .graph import Analysis, Blocker, ChannelGroup, GroupMember, Var, flatten_vars
from .rewrite import _is_reshape, can_rewrite, region_module
from .rules import apply_rule, register_function_rule, register_module_rule
from .trace import TensorMeta, trace

log = logging.getLogger(__name__)

__all__ = [
    "finalize",
    "compact",
    "CompactionResult",
    "KeptChannels",
    "KEPT_RECORD",
    "Blocker",
    "register_module_rule",
    "register_function_rule",
    "channel_groups",
    "ChannelGroup",
    "GroupMember",
]

MAX_REPAIRS = 200
KEPT_RECORD = "deployprune_kept_channels"  # set on the log record that reports kept masked channels


@dataclass
class LayerChange:
    name: str
    type: str
    before: dict[str, tuple[int, ...]]
    after: dict[str, tuple[int, ...]]


@dataclass
class CompactionResult:
    """What :func:`compact` produced.

    ``masked_channels`` counts the masked channels of the input (docs/finalize.md, "Masked
    channels"), ``removed_channels`` those gone from ``model``; every other one is in ``kept``,
    grouped by module and reason. ``blocked`` lists the ops without a rule (or with fixed sizes)
    among those reasons.
    """

    model: nn.Module
    blocked: list[Blocker] = field(default_factory=list)
    changes: list[LayerChange] = field(default_factory=list)
    patched_attributes: list[tuple[str, str, int, int]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    max_abs_error: float = 0.0
    output_scale: float = 0.0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    masked_channels: int = 0
    removed_channels: int = 0
    kept: list[KeptChannels] = field(default_factory=list)  # masked channels that stay, with the reason
    compacted: bool = True  # False when compaction had to be abandoned (the masked model is returned)
    abandoned: str = ""  # why, when compacted is False

    @property
    def kept_channels(self) -> int:
        return sum(k.count for k in self.kept)

    def channels_line(self) -> str:
        """``removed 1,024 of 1,536 masked channels; kept 512 in 'encoder.layer.0.attention' (reason)``."""
        head = f"removed {self.removed_channels:,} of {self.masked_channels:,} masked channels"
        if not self.compacted and not self.kept:  # otherwise the kept channels' reason says it
            head = f"compaction abandoned ({self.abandoned}); {head}"
        if len(self.kept) == 1:
            return f"{head}; {self.kept[0].describe()}"
        if self.kept:
            return f"{head}; kept {self.kept_channels:,} in {len(self.kept)} groups:"
        return head

    def summary(self) -> str:
        lines = [self.channels_line()]
        if len(self.kept) > 1:
            lines.extend(f"  {k.describe()}" for k in self.kept)
        lines.append(f"params {self.params_before:,} -> {self.params_after:,} "
                     f"({self.params_after / max(self.params_before, 1):.1%}), "
                     f"{len(self.changes)} layer(s) replaced, max abs error {self.max_abs_error:.2e}, "
                     f"{self.seconds * 1000:.0f} ms")
        return "\n".join(lines)


def finalize(model: nn.Module, example_inputs: Any, masks: Any = None, **kwargs: Any) -> nn.Module:
    """Bake ``masks`` and return a physically smaller model computing the masked model's output.

    ``masks`` is NNI layout ``{module_name: {param_name: 0/1 tensor}}``; ``None`` uses the masks
    a pruner attached as parametrizations. ``model`` is not modified (unless ``inplace=True``).
    Keyword arguments are those of :func:`compact`.
    """
    return compact(model, example_inputs, masks, **kwargs).model


def compact(model: nn.Module, example_inputs: Any, masks: Any = None, *, strict: bool = False,
            inplace: bool = False, rtol: float = 1e-4) -> CompactionResult:
    """Like :func:`finalize`, returning a :class:`CompactionResult` (model, blockers, changes).

    ``strict=True`` raises :class:`UnsupportedError` when any masked channel is kept (the
    message names module, count and reason), and :class:`ParityError` when compaction had to be
    abandoned. Without it, an abandoned compaction is logged as an ERROR and the masked model is
    returned with ``compacted=False``. ``rtol`` bounds the self-check against the masked model,
    relative to the output's scale.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    clock = [t0]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + now - clock[0]
        clock[0] = now
    if not isinstance(model, nn.Module):
        raise InputError(f"finalize: expected a torch.nn.Module, got {type(model).__name__}")
    inputs, kw = split_inputs(example_inputs)
    modes = {name: m.training for name, m in model.named_modules()}
    attached = extract_attached_masks(model)
    work = model if inplace else copy_model(model)
    strip_parametrizations_(work)
    for mod_name, per in detach_prune_hooks_(work).items():  # torch.nn.utils.prune masks
        for pname, m in per.items():
            attached.setdefault(mod_name, {})[pname] = attached.get(mod_name, {}).get(pname, m) & m
    masks_n: Masks = normalize_masks(work, masks) if masks is not None else attached
    apply_masks_(work, masks_n)
    work.eval()
    params_before = count_params(work)

    lap("copy and bake masks")
    traced, capture_error = _capture(work, inputs, kw)
    if traced is None:
        _run(work, inputs, "the masked model", kw)  # example inputs that do not fit: a one-line InputError
        blocker = Blocker(node="<root>", op=type(work).__name__, module="", reason=capture_error)
        if strict:
            raise UnsupportedError(f"finalize: {capture_error}; the model can only be returned uncompacted")
        log.warning("finalize: %s; returning the masked model uncompacted", capture_error)
        _restore_modes(work, modes)
        acc = all_kept(masked_slices(work, masks_n), f"no graph: {capture_error}", "<root>", blocker.op)
        blocker.kept_zero_channels = acc.masked
        return _result(CompactionResult(model=work, blocked=[blocker], params_before=params_before,
                                        params_after=params_before, seconds=time.perf_counter() - t0,
                                        compacted=False, abandoned=capture_error), acc)

    ref = traced.output  # the masked model's output, from the recording run of its graph
    a = Analysis(traced, work)
    lap("trace and record")
    live = _live_nodes(traced.graph) if traced.recorded else None
    for node in traced.graph.nodes:
        if live is None or node in live:
            a.at(node.name)  # provenance: what this rule pins and constrains comes from this node
            apply_rule(a, node)
        else:
            a.vars[node] = None  # only read by Python (a branch, a size): the re-run checks the path
    a.at("")
    lap("rules")

    result_model: nn.Module | None = None
    patched: list[tuple[str, str, int, int]] = []
    changes: list[LayerChange] = []
    err, scale = 0.0, 0.0
    failing, why = None, ""
    pinned_nodes: set[str] = set()
    for _attempt in range(MAX_REPAIRS):
        _solve(a)
        unpatchable = _plan_patches(a, work)
        lap("solve")
        if unpatchable:
            continue
        candidate, patched, changes = _build(a, work)
        lap("rebuild")
        failing, out = (_check_recorded(a, candidate, inputs, kw) if traced.recorded
                        else _check_shapes(a, candidate, inputs))
        lap("check")
        if failing is not None:
            name, why = failing
            if not name:  # not a size problem pinning could fix
                log.error("finalize: %s; returning the masked model uncompacted", why)
                break
            if name in pinned_nodes:
                log.error("finalize: %s again after keeping its channels; returning the masked model uncompacted",
                          name)
                break
            node = next(n for n in a.traced.graph.nodes if n.name == name)
            owner = node.meta.get("owner", "") or ""
            if (_is_reshape(node) and can_rewrite(a, owner) and owner not in a.rewrite_owners
                    and owner not in a.rewrite_failed):
                # re-emit the call with the new sizes; repeated blocks of the same class share the
                # forward code, so they are re-emitted together (one repair, not one per block)
                kind = type(a.modules.get(owner))
                a.rewrite_owners.update(o for o in a.traced.regions
                                        if type(a.modules.get(o)) is kind and can_rewrite(a, o)
                                        and o not in a.rewrite_failed and _changes_reshape(a, o))
                a.rewrite_owners.add(owner)
                continue
            if owner in a.rewrite_owners:
                a.rewrite_owners.discard(owner)
                a.rewrite_failed.add(owner)
            _pin_node(a, node, why)
            pinned_nodes.add(name)
            continue
        err, scale = _compare(ref, out)
        if traced.recorded and (err <= rtol * max(scale, 1e-12) or err == 0.0):
            # the recording resolved Python control flow on the example inputs: check fresh ones too
            err2, scale2 = _fresh_check(work, candidate, inputs, kw)
            err, scale = max(err, err2), max(scale, scale2)
        if err <= rtol * max(scale, 1e-12) or err == 0.0:
            result_model = candidate
            break
        log.error("finalize: compacted model differs from the masked model (max abs error %.3g at scale %.3g); "
                  "returning the masked model uncompacted", err, scale)
        break
    lap("check")  # the output comparison above
    slices = masked_slices(work, masks_n, a)
    if result_model is None:
        detail = why if failing else (f"max abs error {err:.3g}" if err or scale else
                                      f"no consistent plan after {MAX_REPAIRS} repairs")
        blocker = Blocker(node="<parity>", op="finalize", module="",
                          reason=f"self-check failed ({detail}); compaction abandoned")
        if strict:
            raise ParityError(f"finalize: {blocker.reason}; please report this model")
        _restore_modes(work, modes)
        acc = all_kept(slices, f"compaction abandoned: self-check failed ({detail})", blocker.node, blocker.op)
        blocker.kept_zero_channels = acc.masked
        log.error("finalize: compaction abandoned (self-check failed: %s); returning the masked model with "
                  "all %d masked channel(s); please report this model", detail, acc.masked)
        return _result(CompactionResult(model=work, blocked=[blocker], params_before=params_before,
                                        params_after=params_before, seconds=time.perf_counter() - t0,
                                        compacted=False, abandoned=f"self-check failed: {detail}"), acc)

    _restore_modes(result_model, modes)
    acc = account(a, slices)
    lap("accounting")
    for k, b in enumerate(a.blockers):
        b.kept_zero_channels = acc.by_blocker.get(k, 0)
    blocked = [b for b in a.blockers if b.kept_zero_channels]
    res = _result(CompactionResult(model=result_model, blocked=blocked, changes=changes, patched_attributes=patched,
                                   params_before=params_before, params_after=count_params(result_model),
                                   max_abs_error=err, output_scale=scale, seconds=time.perf_counter() - t0,
                                   timings=timings), acc)
    if strict and res.kept:
        raise UnsupportedError(f"finalize (strict): {strict_message(res)}")
    if res.kept:  # marked: callers that print the kept groups themselves (the CLI) leave it out
        log.warning("finalize: %s%s", res.channels_line().rstrip(":"),
                    f" ({res.kept[0].describe()}; the others in CompactionResult.kept)" if len(res.kept) > 1 else "",
                    extra={KEPT_RECORD: True})
    log.info("finalize: %s", res.summary())
    return res


def _result(res: CompactionResult, acc: Accounting) -> CompactionResult:
    res.masked_channels, res.removed_channels, res.kept = acc.masked, acc.removed, acc.kept
    return res


def strict_message(res: CompactionResult, limit: int = 5) -> str:
    """One line naming module, count and reason of the kept masked channels (the first ``limit`` groups)."""
    parts = [k.describe() for k in res.kept[:limit]]
    rest = res.kept[limit:]
    if rest:
        parts.append(f"and {sum(k.count for k in rest):,} more in {len(rest)} other group(s)")
    return (f"{res.kept_channels:,} of {res.masked_channels:,} masked channels stay: " + "; ".join(parts)
            + "; register a rule for the op, change the masks or drop strict to accept them")


# ---------------------------------------------------------------------------- steps


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from example inputs given as a tensor, a tuple of positional inputs, a dict
    of keyword inputs (``input_ids``, ``attention_mask``, ``pixel_values`` ...) or ``(tuple, dict)``."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if (len(example_inputs) == 2 and isinstance(example_inputs[0], (tuple, list))
                and isinstance(example_inputs[1], dict)):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise InputError("example_inputs must be a tensor, a tuple of inputs, a dict of keyword inputs or "
                     f"(tuple, dict), got {type(example_inputs).__name__}")


def _capture(work: nn.Module, inputs: tuple, kw: dict) -> tuple[Any, str]:
    """The model's graph: torch.fx symbolic tracing where it sees the whole model, otherwise a
    recording of one eager run (capture.py), which follows any Python the model runs."""
    fx_error = ""
    if not kw:
        try:
            traced = trace(work, inputs)
            if not traced.opaque:
                return traced, ""
            log.info("finalize: torch.fx cannot trace %s; recording an eager run instead",
                     ", ".join(repr(k) for k in traced.opaque))
        except RuntimeError as exc:
            fx_error = str(exc)
            log.info("finalize: %s; recording an eager run instead", exc)
    try:
        return record(work, inputs, kw), ""
    except CaptureError as exc:
        return None, f"the model fails on the example inputs ({exc})" + (f"; {fx_error}" if fx_error else "")


def fresh_inputs(inputs: tuple, kw: dict, seed: int = 1) -> tuple[tuple, dict]:
    """Inputs like the example ones with new values: floats from N(0, 1) scaled like the example,
    integers (token ids) drawn from the example's range, booleans and attention masks kept."""
    g = torch.Generator().manual_seed(seed)

    def new(t: Any, key: str = "") -> Any:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return t
        if t.is_floating_point():
            std = float(t.double().std()) if t.numel() > 1 else 1.0
            return (torch.randn(t.shape, generator=g, dtype=torch.float64) * (std or 1.0)).to(t.dtype)
        if t.dtype == torch.bool or "mask" in key:
            return t.clone()
        lo, hi = int(t.min()), int(t.max())
        return torch.randint(lo, hi + 1, t.shape, generator=g, dtype=t.dtype)

    return tuple(new(t) for t in inputs), {k: new(v, k) for k, v in kw.items()}


def _fresh_check(masked: nn.Module, candidate: nn.Module, inputs: tuple, kw: dict) -> tuple[float, float]:
    args, kwargs = fresh_inputs(inputs, kw)
    try:
        with torch.no_grad():
            ref, out = masked(*args, **kwargs), candidate(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a failure on fresh inputs is a failed self-check
        log.error("finalize: the compacted model fails on fresh inputs: %s", exc)
        return float("inf"), 0.0
    return _compare(ref, out)


def _live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes some output depends on. In a recorded graph the others fed Python only (``if x.sum() > 0``,
    ``float(x.max())``): they constrain no channel, and the compacted model's re-run shows whether it
    still takes the same path."""
    live: set[fx.Node] = set()
    stack = [n for n in graph.nodes if n.op in ("output", "placeholder")]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    return live


def _run(model: nn.Module, inputs: tuple, what: str, kw: dict | None = None) -> Any:
    kw = kw or {}
    try:
        with torch.no_grad():
            return model(*inputs, **kw)
    except Exception as exc:  # noqa: BLE001 - reported as one line
        shapes = ", ".join([str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs]
                           + [f"{k}={tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                              for k, t in kw.items()])
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{what} fails on example inputs of shape {shapes}: {msg}") from None


_flat_outputs = flat_tensors


def _compare(ref: Any, out: Any) -> tuple[float, float]:
    """Max abs error (infinite when shapes or non-finite values disagree) and output scale,
    from the project's one parity metric."""
    from ..parity import compare_outputs

    p = compare_outputs(_flat_outputs(ref), _flat_outputs(out))
    return p.error, p.scale


def _restore_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    for name, m in model.named_modules():
        if name in modes:
            m.training = modes[name]


def _solve(a: Analysis) -> None:
    a.solve()
    while a.rescue_empty():
        a.solve()


def _int_attrs(module: nn.Module) -> dict[str, int]:
    return {k: v for k, v in vars(module).items()
            if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("_")}


_PREFERRED = ("head", "dim", "size", "channel", "feature", "width", "hidden", "group")
_REPLICATING = ("expand", "repeat", "repeat_interleave")


def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def _plan_patches(a: Analysis, work: nn.Module) -> bool:
    """Decide attribute patches for literal sizes that shrink; pin what cannot be patched.

    Returns True when something was pinned (the caller solves again).
    """
    plan: dict[tuple[str, str], int] = {}
    pinned = False
    a.patches = []
    entries = [(*e, False) for e in a.literal_sizes] + [(*e, True) for e in a.unread_sizes]
    # sizes that stay claim their attribute too: Llama's hidden_shape = (*input_shape, -1, self.head_dim)
    # views q, k and v alike, so v alone cannot lose head positions by patching head_dim
    # (a value that also changes in the same call is ambiguous: timm's reshape(B, N, 3, self.num_heads, ...)
    # with 3 heads has a 3 that stays and a 3 that shrinks)
    fixed: dict[tuple[str, str], int] = {}
    sized = [(node, lit, unread, int(a.keep(y, d).sum())) for node, y, d, lit, unread in entries]
    changing = {(node, lit) for node, lit, _u, new in sized if new != lit}
    for node, lit, unread, new in sized:
        if not unread and new == lit and type(lit) is int and (node, lit) not in changing:
            key = _literal_key(a, node, lit, unread)
            if key is not None:
                fixed.setdefault(key, lit)
    for node, lit, unread, new in sized:
        if new == lit:
            continue
        if a.traced.recorded and type(lit) is not int:
            continue  # read from a tensor's shape: the compacted model's forward recomputes it
        owner = node.meta.get("owner", "") or ""
        key = _literal_key(a, node, lit, unread)
        if key is None and unread:
            continue  # nothing names the group size: shapes carry it on every path
        if key is None and a.traced.recorded:
            # a recorded size is usually computed from a tensor's shape, which the eager re-run
            # recomputes; the shape check after rebuilding pins it if it was fixed after all
            continue
        if key is None and _is_reshape(node) and can_rewrite(a, owner) and owner not in a.rewrite_failed:
            a.rewrite_owners.add(owner)  # the literal is rewritten in a re-emitted graph instead
            continue
        if key is None or plan.get(key, new) != new or fixed.get(key, new) != new:
            why = (f"forward code passes the fixed size {lit} to {node.target}; no unique attribute of "
                   f"{owner or 'the model'!r} holds it" if key is None else
                   f"forward code uses attribute {key[1]!r} for sizes that would need different values")
            _pin_node(a, node, why)
            pinned = True
            continue
        plan[key] = new
    pinned = _plan_slice_bounds(a, plan, fixed) or pinned
    a.patches = [(o, k, _attr_value(a.modules[o], k), v) for (o, k), v in plan.items()]
    return pinned


def _literal_key(a: Analysis, node: fx.Node, lit: int, unread: bool) -> tuple[str, str] | None:
    """The one attribute of the node's module that holds the literal size ``lit`` (None: none or several)."""
    owner = node.meta.get("owner", "") or ""
    module = a.modules.get(owner)
    cands = [k for k, v in _int_attrs(module).items() if v == lit] if module is not None else []
    reads = (a.traced.int_reads or {}).get(owner)
    if unread:
        cands = [k for k in cands if "group" in k.lower()]
    elif reads is not None:
        cands = [k for k in cands if k in reads]  # attributes the forward actually read
    if len(cands) > 1:
        pref = [k for k in cands if any(p in k.lower() for p in _PREFERRED)]
        cands = pref if len(pref) == 1 else (pref or cands)
    if len(cands) > 1 and _target_name(node) in _REPLICATING:
        # repeat_kv's expand replicates each KV head num_key_value_groups times; an equal
        # num_key_value_heads (Phi-3 reads both) is not the replication count
        rep = [k for k in cands if "group" in k.lower() or "rep" in k.lower()]
        cands = rep if len(rep) == 1 else cands
    return (owner, cands[0]) if len(cands) == 1 else None


def _attr_value(module: nn.Module, key: str) -> int:
    """An int attribute of ``module``, or ``config.<field>`` of its config object."""
    if key.startswith("config."):
        return getattr(vars(module)["config"], key[len("config."):])
    return _int_attrs(module)[key]


def _read_ints(a: Analysis, owner: str) -> dict[str, int]:
    """The int attributes and config fields the forward of ``owner`` read, with their values."""
    module = a.modules.get(owner)
    reads = (a.traced.int_reads or {}).get(owner) or set()
    if module is None:
        return {}
    out = {k: v for k, v in _int_attrs(module).items() if k in reads}
    cfg = vars(module).get("config")
    for k in reads:
        if k.startswith("config.") and cfg is not None:
            v = getattr(cfg, k[len("config."):], None)
            if type(v) is int:
                out[k] = v
    return out


def _explain(length: int, new: int, ints: dict[str, int], plan: dict[tuple[str, str], int],
             owner: str) -> tuple[str, int] | None:
    """The one attribute patch that turns a slice segment of ``length`` into one of ``new``: an attribute
    equal to the length, or a factor of a product of two the forward read (``num_heads * head_dim``, the
    other factor unchanged). Names with ``heads`` win a tie; None when nothing, or more than one, fits."""
    def current(k: str) -> int:
        return plan.get((owner, k), ints[k])

    options: set[tuple[str, int]] = set()
    for k, v in ints.items():
        if v == length and current(k) == v:
            options.add((k, new))
        for k2 in ints:
            if k2 != k and current(k) == v and v * current(k2) == length and current(k2) > 0 \
                    and new % current(k2) == 0 and new // current(k2) > 0:
                options.add((k, new // current(k2)))
    options = {(k, v) for k, v in options if plan.get((owner, k), v) == v}
    if len(options) > 1:
        heads = {o for o in options if "heads" in o[0].lower()}
        options = heads or options
    return next(iter(options)) if len(options) == 1 else None


def _plan_slice_bounds(a: Analysis, plan: dict[tuple[str, str], int],
                       fixed: dict[tuple[str, str], int] | None = None) -> bool:
    """Patches for the slice bounds of ``a.slice_bounds`` whose kept channels moved them; pins the slices
    whose bounds no attribute explains. Returns True when something was pinned."""
    groups: dict[tuple[str, int], list[tuple]] = {}
    for node, x, xd, start, stop in a.slice_bounds:
        groups.setdefault((node.meta.get("owner", "") or "", a.find(x.slots[xd])), []).append(
            (node, x, xd, start, stop))
    pinned = False
    for (owner, _root), entries in groups.items():
        _node, x, xd, _s, _e = entries[0]
        keep = a.keep(x, xd)
        bounds = sorted({b for _n, _x, _d, s, e in entries for b in (s, e) if b})
        moved = {b: int(keep[:b].sum()) for b in bounds}
        if all(moved[b] == b for b in bounds):
            continue
        ints = _read_ints(a, owner)
        local: dict[tuple[str, int], int] = {}
        why = ""
        prev, prev_new = 0, 0
        for b in bounds:
            length, new = b - prev, moved[b] - prev_new
            if length != new:
                choice = _explain(length, new, ints, {**(fixed or {}), **plan, **local}, owner)
                if choice is None:
                    why = (f"sliced at position {b}, computed in the forward code; no attribute or config field "
                           f"of {owner or 'the model'!r} it read gives the new position {moved[b]}")
                    break
                local[(owner, choice[0])] = choice[1]
            prev, prev_new = b, moved[b]
        if why:
            for n, *_rest in entries:
                _pin_node(a, n, why)
            pinned = True
            continue
        plan.update(local)
    return pinned


def _pin_node(a: Analysis, node: fx.Node | str, why: str) -> None:
    if isinstance(node, str):
        node = next(n for n in a.traced.graph.nodes if n.name == node)
    b = a.block(node, why if why.startswith("forward code") else f"forward code: {why}")
    for v in flatten_vars(a.vars.get(node)):
        a.pin_var(v, why, b)
    for inp in node.all_input_nodes:
        for v in flatten_vars(a.vars.get(inp)):
            a.pin_var(v, why, b)


def _slice(t: torch.Tensor, keeps: list[np.ndarray]) -> torch.Tensor:
    out = t.detach()
    for d, k in enumerate(keeps):
        if not k.all():
            out = out.index_select(d, torch.as_tensor(np.nonzero(k)[0], device=out.device))
    return out


def _build(a: Analysis, work: nn.Module) -> tuple[nn.Module, list, list[LayerChange]]:
    """A compacted copy of ``work`` from the current keep vectors."""
    new_modules: dict[str, nn.Module] = {}
    for name, rebuild in a.rebuilders.items():
        m = rebuild()
        if m is not None:
            m.train(a.modules[name].training)
            new_modules[name] = m
    # parameters/buffers used directly in forward (cls tokens, layer scales, ...)
    new_tensors: dict[tuple[str, str], torch.Tensor] = {}
    for v in a.param_vars.values():
        keeps = [a.keep(v, d) for d in range(v.ndim)]
        if all(k.all() for k in keeps):
            continue
        for mod_name, attr in v.refs:
            if mod_name in new_modules or mod_name in a.rebuilders:
                continue
            t = getattr(a.modules[mod_name], attr)
            new_tensors[(mod_name, attr)] = _slice(t, keeps)
    # deepcopy with the replaced layers pre-seeded in the memo: they are swapped in, never copied
    memo: dict[int, Any] = {id(a.modules[name]): m for name, m in new_modules.items()}
    result = copy.deepcopy(work, memo)
    modules = dict(result.named_modules())
    changes = []
    for name, m in new_modules.items():
        old = a.modules[name]
        changes.append(LayerChange(name, type(old).__name__,
                                   {k: tuple(p.shape) for k, p in old.named_parameters(recurse=False)},
                                   {k: tuple(p.shape) for k, p in m.named_parameters(recurse=False)}))
    for (mod_name, attr), t in new_tensors.items():
        owner = modules[mod_name]
        old = getattr(owner, attr)
        if attr in owner._parameters:
            setattr(owner, attr, nn.Parameter(t.clone(), requires_grad=old.requires_grad))
        else:
            owner._buffers[attr] = t.clone()
        changes.append(LayerChange(f"{mod_name}.{attr}" if mod_name else attr, "Parameter",
                                   {attr: tuple(old.shape)}, {attr: tuple(t.shape)}))
    patched = []
    own_config: set[str] = set()
    for owner, attr, old, new in getattr(a, "patches", []):
        if attr.startswith("config."):
            # a config object is shared by every layer: the patched module gets its own copy
            if owner not in own_config:
                modules[owner].config = copy.copy(modules[owner].config)
                own_config.add(owner)
            setattr(modules[owner].config, attr[len("config."):], new)
        else:
            setattr(modules[owner], attr, new)
        patched.append((owner, attr, old, new))
    # calls whose forward code fixes sizes: re-emit them as GraphModules with the new sizes
    for owner in sorted(a.rewrite_owners, key=lambda o: o.count(".")):
        if any(owner.startswith(o + ".") for o in a.rewrite_owners if o != owner):
            continue  # an enclosing call is re-emitted already
        region = a.traced.regions[owner][0]
        planned = {n.name: _expected(a, a.vars.get(n)) for n in a.traced.graph.nodes
                   if region.start <= n.meta.get("index", -1) < region.end and _is_reshape(n)
                   and isinstance(a.vars.get(n), Var)}
        gm = region_module(a, owner, modules[owner], planned)
        if gm is None:
            a.rewrite_failed.add(owner)
            continue
        parent_name, _, child = owner.rpartition(".")
        setattr(modules[parent_name], child, gm)
        changes.append(LayerChange(owner, f"{type(modules[owner]).__name__} (re-emitted as GraphModule)", {}, {}))
    return result, patched, changes


def _changes_reshape(a: Analysis, owner: str) -> bool:
    """Whether some view/reshape in this call produces a different shape after compaction."""
    region = a.traced.regions[owner][0]
    for n in a.traced.graph.nodes:
        if region.start <= n.meta.get("index", -1) < region.end and _is_reshape(n):
            v = a.vars.get(n)
            if isinstance(v, Var) and _expected(a, v) != v.shape:
                return True
    return False


def _expected(a: Analysis, value: Any) -> Any:
    if isinstance(value, Var):
        return tuple(int(a.keep(value, d).sum()) for d in range(value.ndim))
    if isinstance(value, tuple):
        return tuple(_expected(a, v) for v in value)
    return None


def _shape_of(meta: Any) -> Any:
    if isinstance(meta, TensorMeta):
        return tuple(meta.shape)
    if isinstance(meta, (tuple, list)):
        return tuple(_shape_of(m) for m in meta)
    return None


def _check_shapes(a: Analysis, candidate: nn.Module, inputs: tuple) -> tuple[tuple[str, str] | None, Any]:
    """Re-trace and run the compacted model.

    Returns (first node whose shape is not the planned one, with why) or (None, model output).
    """
    from .trace import RecordError, _record, _Tracer

    # modules that were leaves stay leaves (a replacement GraphModule must not be traced into)
    leaves = {str(n.target) for n in a.traced.graph.nodes if n.op == "call_module"}
    tracer = _Tracer(set(a.traced.opaque), leaves)
    try:
        graph = tracer.trace(candidate)
    except Exception as exc:  # noqa: BLE001
        return ("", f"the compacted model cannot be traced: {exc}"), None
    values: dict[fx.Node, Any] = {}
    out, failed = None, None
    try:
        values, out = _record(graph, candidate, inputs, keep_output=True)
    except RecordError as exc:
        values, failed = exc.values, exc.node
    by_name = {n.name: n for n in a.traced.graph.nodes}
    for n in graph.nodes:
        orig = by_name.get(n.name)
        if orig is None:
            continue
        if n.name == failed:
            return (n.name, f"{n.target} fails with the compacted sizes"), None
        if n not in values:
            continue
        exp = _expected(a, a.vars.get(orig))
        got = _shape_of(values[n])
        if exp is not None and got is not None and exp != got:
            return (n.name, f"{n.target} produces shape {got} where {exp} was planned"), None
    if failed is not None:
        return (failed, "fails with the compacted sizes"), None
    return None, out


def _check_recorded(a: Analysis, candidate: nn.Module, inputs: tuple, kw: dict
                    ) -> tuple[tuple[str, str] | None, Any]:
    """Record the compacted model's eager run and compare it with the plan, node by node.

    The same control flow gives the same sequence of nodes; the first node whose shape is not the
    planned one (or that fails) is returned with why, else ``(None, output)``.
    """
    failed_index = None
    try:
        t2 = record(candidate, inputs, kw)
        values, nodes2 = t2.values, list(t2.graph.nodes)
    except CaptureError as exc:
        failed_index, values, nodes2 = exc.index, exc.values, list(exc.graph.nodes)
        t2 = None
    orig = [n for n in a.traced.graph.nodes if n.op != "output"]
    for n, m in zip(orig, nodes2, strict=False):
        if m.op == "output":
            break
        if n.op != m.op or n.target != m.target:
            # another path through Python (``if n_rep == 1: return x`` once a size shrank): nodes no
            # longer correspond, so only the outputs can be compared
            log.info("finalize: the compacted model takes another path at %s; comparing outputs only", n.name)
            if t2 is None:
                return ("", f"the compacted model fails after taking another path at {n.name}"), None
            return None, t2.output
        exp = _expected(a, a.vars.get(n))
        got = _shape_of(values.get(m))
        if exp is not None and got is not None and exp != got:
            return (n.name, f"{n.target} produces shape {got} where {exp} was planned"), None
    if t2 is None:
        n = next((x for x in orig if x.meta.get("index") == failed_index), None)
        if n is None:
            return ("", "the compacted model fails to run"), None
        return (n.name, f"{n.target} fails with the compacted sizes"), None
    return None, t2.output


# ---------------------------------------------------------------------------- pruner interface


def channel_groups(model: nn.Module, example_inputs: Any) -> list[ChannelGroup]:
    """Coupled channel groups of ``model`` as finalize sees them (one graph for pruner and finalize).

    Each group is one space of channels that must be removed together; zeroing all of a channel's
    ``producer`` slices makes it exactly zero, which finalize then removes everywhere.
    """
    from .groups import compute_groups

    args, kwargs = split_inputs(example_inputs)
    from types import SimpleNamespace

    engine = SimpleNamespace(capture=_capture, live_nodes=_live_nodes, compact=compact)
    return compute_groups(model, args, kwargs, engine)
