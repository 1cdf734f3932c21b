"""Exact accounting of masked channels: how many finalize removed, and why each other one stayed.

A **masked channel** is one slice of a masked parameter along one of its channel dimensions
whose mask is zero everywhere (the masks remove the whole slice):

* the channel dimensions of a parameter are those the rules tag as producer or consumer
  (a Linear's rows and columns, a convolution's filters and, for ``groups == 1``, its input
  channels, an Embedding's columns, a norm's per-channel scale); a parameter the rules never
  tagged (an op without a rule uses it) counts its first two dimensions (one for 1-d tensors,
  the filters only for grouped convolutions, the columns for embeddings);
* biases are not channels (a masked bias entry under an unmasked weight row is a live channel);
* a slice that is zero only partly by its mask (the rest zero-initialised, as Swin's relative
  position table) or not masked at all (a zero-initialised layer) is not a masked channel;
* a weight masked whole along one dimension (every row of a Linear) is zero along the others
  too; it counts along that dimension only.

A unit masked in ``gate_proj``, ``up_proj`` and ``down_proj`` therefore counts three times
(two rows and a column), once per slice that finalize has to remove.

A masked channel is **removed** when its parameter slice is gone from the compacted model
(its channel is not kept in the analysis). Every other masked channel is **kept** and gets a
reason, found from the analysis' provenance (``Analysis.why``: the cause that first kept each
channel of a space), in this order:

1. its space is *pinned* (a pin keeps a dimension whole): the pin's reason and op;
2. another layer writes the same channels and is not masked there (a residual add, a gated
   product): "coupled with 'X', whose channel is not masked";
3. the constraint that demanded it: a consumer that reads its constant (an unmasked bias
   that a padded convolution or a norm cannot fold) or its live value; for a coupling
   (reshape/view product, concat, chunk, grouped convolution) the coupled channel that is kept,
   found by re-running the constraint with that channel removed, explained the same way;
4. a dimension never shrinks to zero: when none of its channels is needed (all masked, or the
   layer's output is unused), one stays.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .graph import NO_CAUSE, Analysis, Var, describe_node, owner_of

MAX_DEPTH = 8  # how many couplings an explanation follows before it names the last one


@dataclass
class KeptChannels:
    """Masked channels of one module that stayed, for one reason."""

    module: str  # the module whose masked parameter slices stay
    count: int
    reason: str
    node: str = ""  # the graph node (op) that kept them, "" when there is none
    op: str = ""

    def describe(self) -> str:
        return f"kept {self.count:,} in {self.module or '<root>'!r} ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "count": self.count, "reason": self.reason, "node": self.node,
                "op": self.op}


@dataclass
class MaskedSlices:
    """The masked channels of one parameter along one dimension."""

    module: str
    param: str
    dim: int
    indices: np.ndarray  # masked channel indices along ``dim``
    var: Var | None = None  # the parameter's Var in the analysis (None: the graph never reads it)


@dataclass
class Accounting:
    masked: int = 0
    removed: int = 0
    kept: list[KeptChannels] = field(default_factory=list)
    by_blocker: dict[int, int] = field(default_factory=dict)  # blocker index -> kept masked channels

    @property
    def kept_count(self) -> int:
        return sum(k.count for k in self.kept)


def _is_bias(pname: str) -> bool:
    return pname == "bias" or pname.endswith("_bias")


def _fallback_dims(module: nn.Module, t: torch.Tensor) -> list[int]:
    if t.dim() == 0:
        return []
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return [1]
    if t.dim() == 1:
        return [0]
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        return [0]
    return [0, 1]


def channel_dims(a: Analysis | None, module: nn.Module, t: torch.Tensor) -> tuple[list[int], Var | None]:
    """The channel dimensions of parameter ``t`` (see the module docstring) and its Var."""
    v = a.param_vars.get(id(t)) if a is not None else None
    if v is not None:
        tagged = [d for d in range(v.ndim) if v.slots[d] in a.roles]
        if tagged:
            return [d for d in tagged if a.roles[v.slots[d]] in ("producer", "consumer")], v
    return _fallback_dims(module, t), v


def masked_slices(model: nn.Module, masks: dict[str, dict[str, torch.Tensor]],
                  a: Analysis | None = None) -> list[MaskedSlices]:
    """Every masked channel of ``model`` (whose parameters hold the masks already)."""
    modules = dict(model.named_modules())
    out: list[MaskedSlices] = []
    for mod_name, per in masks.items():
        module = modules.get(mod_name)
        if module is None:
            continue
        for pname, mask in per.items():
            t = module._parameters.get(pname)
            if t is None or _is_bias(pname) or t.dim() == 0:
                continue
            dims, v = channel_dims(a, module, t)
            mask = torch.as_tensor(mask).to(device=t.device)
            if mask.dtype == torch.bool:  # attached masks may be boolean; amax wants numbers
                mask = mask.to(torch.uint8)
            found: list[tuple[int, np.ndarray]] = []
            for d in dims:
                others = tuple(x for x in range(t.dim()) if x != d)
                # the mask zeroes the whole slice: a weight that is merely zero where the mask keeps it
                # (Swin's zero-initialized relative position table) is not a masked channel. Masks hold
                # 0 and 1: one max-reduction over the mask per dimension, no boolean copy
                covered = (mask.amax(dim=others) == 0) if others else mask == 0
                found.append((d, torch.nonzero(covered).flatten().cpu().numpy()))
            # a weight masked whole along one dimension is zero along the others too: that is one mask,
            # counted along the first such dimension only (a fully masked layer counts its outputs)
            whole = next((d for d, idx in found if idx.size == t.shape[d]), None)
            for d, idx in found:
                if idx.size and (whole is None or d == whole):
                    out.append(MaskedSlices(mod_name, pname, d, idx, v))
    return out


def all_kept(slices: Iterable[MaskedSlices], reason: str, node: str = "", op: str = "") -> Accounting:
    """Accounting when nothing was removed (compaction abandoned, or no graph at all)."""
    acc = Accounting()
    groups: dict[str, int] = {}
    for s in slices:
        acc.masked += int(s.indices.size)
        groups[s.module] = groups.get(s.module, 0) + int(s.indices.size)
    acc.kept = [KeptChannels(m, c, reason, node, op) for m, c in groups.items()]
    return acc


def account(a: Analysis, slices: list[MaskedSlices]) -> Accounting:
    """Removed and kept masked channels of a solved analysis, each kept one with its reason."""
    ex = _Explainer(a)
    acc = Accounting()
    for s in slices:
        if s.var is not None:
            r = a.find(s.var.slots[s.dim])
            m = ex.masked.setdefault(r, np.zeros(a.size[r], bool))
            m[s.indices] = True
    groups: dict[tuple[str, str, str, str], int] = {}
    for s in slices:
        acc.masked += int(s.indices.size)
        if s.var is None:
            key = (s.module, "the forward pass on the example inputs never reads this parameter", "", "")
            groups[key] = groups.get(key, 0) + int(s.indices.size)
            continue
        keep = a.keep(s.var, s.dim)
        kept_idx = s.indices[keep[s.indices]]
        acc.removed += int(s.indices.size - kept_idx.size)
        root = a.find(s.var.slots[s.dim])
        if kept_idx.size and root in ex.pins:  # a pin keeps the whole dimension: one reason for all
            whys = [(ex.explain(root, int(kept_idx[0]), s.module), int(kept_idx.size))]
        else:
            whys = [(ex.explain(root, int(i), s.module), 1) for i in kept_idx]
        for e, n in whys:
            key = (s.module, e.reason, e.node, e.op)
            groups[key] = groups.get(key, 0) + n
            if e.blocker is not None:
                acc.by_blocker[e.blocker] = acc.by_blocker.get(e.blocker, 0) + n
    acc.kept = [KeptChannels(m, c, r, n, o) for (m, r, n, o), c in groups.items()]
    acc.kept.sort(key=lambda k: -k.count)
    return acc


# ---------------------------------------------------------------------------- explanations


@dataclass(frozen=True)
class _Why:
    base: str  # the root cause: a pin, a consumer, an unmasked coupled layer ...
    node: str = ""
    op: str = ""
    blocker: int | None = None
    via: str = ""  # the first coupling on the way to the root cause ("" when there is none)
    whole: tuple[str, ...] = ()  # pins of coupled dimensions that are kept whole
    path: tuple[str, ...] = ()  # the ops of the further couplings on the way
    via_node: str = ""  # the node of ``via``

    @property
    def reason(self) -> str:
        if not self.via:
            return self.base
        parts = [f"with kept channels ({self.base})"] if self.base else []
        parts += [f"with a dimension kept whole ({w})" for w in dict.fromkeys(self.whole)]
        path = [p for p in dict.fromkeys(self.path) if p not in self.via]
        via = f"{self.via}, then {', '.join(path)}," if path else self.via
        return " ".join([f"coupled through {via}", " and ".join(parts)]).strip()


_CONSUMER_KINDS = ("demand_inputs", "grouped")


class _Explainer:
    """Why a channel of a space is kept, from the analysis' provenance (see the module docstring)."""

    def __init__(self, a: Analysis):
        self.a = a
        self.nodes: dict[str, fx.Node] = {n.name: n for n in a.traced.graph.nodes}
        self.pins: dict[int, list[int]] = {}
        for k, p in enumerate(a.pins):
            self.pins.setdefault(a.find(p.slot), []).append(k)
        # where each space appears: (var, dim) of node outputs, in graph order, and parameters
        self.appears: dict[int, list[tuple[fx.Node | None, Var, int]]] = {}
        for node, value in a.vars.items():
            for v in _vars(value):
                for d, s in enumerate(v.slots):
                    self.appears.setdefault(a.find(s), []).append((node, v, d))
        self.module_outputs: dict[str, list[Var]] = {}
        for node, value in a.vars.items():
            if node.op == "call_module" and isinstance(value, Var):
                self.module_outputs.setdefault(str(node.target), []).append(value)
        self.writers: dict[int, list[tuple[str, np.ndarray]]] | None = None
        self.cache: dict[tuple, _Why] = {}
        self.masked: dict[int, np.ndarray] = {}  # per space root: its masked channels (set by account)

    # -------------------------------------------------------------- entry point
    def explain(self, root: int, i: int, module: str, depth: int = 0, seen: frozenset = frozenset()) -> _Why:
        a = self.a
        pinned = self._pin(root)
        if pinned is not None:
            return pinned
        other = self._live_writer(root, i, module)
        if other is not None:
            return _Why(f"coupled with {other!r}, whose channel is not masked")
        w = a.why.get(root)
        cause = int(w[i]) if w is not None else NO_CAUSE
        if cause == NO_CAUSE:
            return _Why("a dimension of size 1 is never removed" if a.size[root] <= 1 else
                        "kept by the analysis without a recorded cause (please report this model)")
        kind = a.causes[cause]
        if kind[0] == "rescue":
            return _Why(f"a dimension keeps at least one channel; none of its {a.size[root]} is needed")
        if kind[0] == "rule":
            node = self.nodes.get(kind[1])
            return _Why("demanded by the rule of this op", kind[1], self._op(node))
        if kind[0] == "pin":
            return self._pin_why(kind[1])
        j = kind[1]
        node = self.nodes.get(a.constraint_nodes[j])
        fn = a.constraints[j]
        name = getattr(fn, "__name__", "")
        if name in _CONSUMER_KINDS:
            return self._consumer(root, i, node)
        key = (root, cause)
        hit = self.cache.get(key)
        if hit is None:
            hit = self._coupling(root, i, j, node, module, depth, seen | {(root, i)})
            self.cache[key] = hit
        return hit

    # -------------------------------------------------------------- pieces
    def _op(self, node: fx.Node | None) -> str:
        return describe_node(node, self.a) if node is not None else ""

    def _where(self, node: fx.Node | None) -> str:
        if node is None:
            return ""
        if node.op == "call_module":
            return self._op(node)  # names the module already
        owner = owner_of(node)
        return f"{self._op(node)} (node {node.name}{f' in {owner!r}' if owner else ''})"

    def _pin(self, root: int) -> _Why | None:
        ks = self.pins.get(root)
        if not ks:
            return None
        pins = self.a.pins
        k = next((k for k in ks if pins[k].blocker is not None), ks[0])  # an op that blocked, if any
        return self._pin_why(k)

    def _pin_why(self, k: int) -> _Why:
        a = self.a
        p = a.pins[k]
        if p.blocker is not None:
            b = a.blockers[p.blocker]
            where = f"{b.op} (node {b.node}{f' in {b.module!r}' if b.module else ''})"
            return _Why(f"{b.reason}: {where}", b.node, b.op, p.blocker)
        node = self.nodes.get(p.node)
        if node is None:
            return _Why(p.reason)
        if node.op in ("placeholder", "output"):
            return _Why(p.reason, node.name, node.op)
        return _Why(f"{p.reason}: {self._where(node)}", node.name, self._op(node))

    def _writers(self) -> dict[int, list[tuple[str, np.ndarray]]]:
        """Per space: (module, live channels) of every layer with a weight that writes it."""
        if self.writers is not None:
            return self.writers
        a = self.a
        out: dict[int, list[tuple[str, np.ndarray]]] = {}
        for v in a.param_vars.values():
            if v.ndim < 2 or not v.refs or _is_bias(v.refs[0][1]):
                continue
            mod_name, attr = v.refs[0]
            for d, s in enumerate(v.slots):
                if a.roles.get(s) != "producer":
                    continue
                r = a.find(s)
                outs = [(o, od) for o in self.module_outputs.get(mod_name, []) for od, os in enumerate(o.slots)
                        if a.find(os) == r]
                if outs:
                    live = np.zeros(a.size[r], bool)
                    for o, od in outs:
                        live |= np.isnan(a.cv(o, od))
                else:  # used functionally: a weight slice that is not zero writes a live channel
                    t = getattr(a.modules[mod_name], attr)
                    live = t.detach().ne(0).movedim(d, 0).reshape(t.shape[d], -1).any(1).cpu().numpy()
                out.setdefault(r, []).append((mod_name, live))
        self.writers = out
        return out

    def _live_writer(self, root: int, i: int, module: str) -> str | None:
        for mod_name, live in self._writers().get(root, []):
            if mod_name != module and live[i]:
                return mod_name
        return None

    def _consumer(self, root: int, i: int, node: fx.Node | None) -> _Why:
        """A layer demanded the channel as an input: its constant or its value reaches that layer."""
        a = self.a
        const = None
        if node is not None:
            for inp in node.all_input_nodes:
                for v in _vars(a.vars.get(inp)):
                    for d, s in enumerate(v.slots):
                        if a.find(s) == root:
                            c = float(a.cv(v, d)[i])
                            if not np.isnan(c) and c != 0:
                                const = c
        op = self._op(node)
        where = self._where(node)
        if const is not None:
            return _Why(f"its constant (an unmasked bias) reaches {where}, which cannot fold it",
                        node.name, op)
        return _Why(f"read by {where}" if node is not None else "read by a consumer", node.name if node else "", op)

    def _describe_space(self, root: int) -> str:
        for node, _v, d in self.appears.get(root, []):
            if node is not None and node.op not in ("placeholder", "output", "get_attr"):
                return f"dim {d} of {node.name}"
        for v in self.a.param_vars.values():
            for d, s in enumerate(v.slots):
                if self.a.find(s) == root and v.refs:
                    return f"dim {d} of {'.'.join(x for x in v.refs[0] if x)}"
        return "another dimension"

    def _coupling(self, root: int, i: int, j: int, node: fx.Node | None, module: str, depth: int,
                  seen: frozenset) -> _Why:
        """Constraint ``j`` (a coupling) demanded channel ``i``: find the kept channel it is coupled with.

        The constraint is re-run on the keep vectors as they were just before it kept ``i`` (so the
        explanation never goes round in a circle); a space is the source when emptying it stops the
        demand, and a binary search finds one channel of it that alone makes the demand.
        """
        a = self.a
        where = self._where(node)
        plain = _Why("", node.name if node else "", self._op(node), via=where, via_node=node.name if node else "")
        t = int(a.when[root][i]) if root in a.when else -1
        probe = _Probe(a, j, t)
        if not _demands(probe.run({}), root, i):
            return plain
        needed: list[tuple[int, int | None]] = []
        for s in sorted(probe.reads):
            if s == root and a.size[s] <= 1:
                continue
            if _demands(probe.run({s: []}), root, i):
                continue  # this space does not matter
            needed.append((s, _one_bit(probe, s, np.nonzero(probe.before(s))[0], root, i)))
        # Which coupled channel stands in the way: the one whose every coupled channel here is masked
        # (the masks meant to remove it: a whole head, one position in every head). A pinned one says
        # that its dimension is whole, one that is not pinned is explained in turn. When no source is
        # targeted like that (part of a head masked), every needed source is named.
        masked = self.masked.get(root)
        targeted = []
        for s, k in needed:
            if k is None or masked is None:
                continue
            # the channels here that (s, k) alone demands, without this space's own other channels
            d1, d0 = probe.run({root: [], s: [k]}), probe.run({root: [], s: []})
            if d1 is None or d0 is None or root not in d1:
                continue
            cover = d1[root] & ~d0.get(root, np.zeros(a.size[root], bool))
            if cover.any() and not (cover & ~masked).any():
                targeted.append((s, k))
        chosen = targeted or needed
        if not chosen:  # every space it reads matters only together (no single one stops the demand)
            return plain
        whole = tuple(self._pin(s).reason for s, _ in chosen if s in self.pins)
        free = [(s, k) for s, k in chosen if s not in self.pins]
        if not free:  # named by the op that keeps the first of them whole
            first = self._pin(chosen[0][0])
            return _Why("", first.node or plain.node, first.op or plain.op, first.blocker, via=where, whole=whole,
                        via_node=plain.via_node)
        s, k = free[0]
        if (s, k) in seen or depth >= MAX_DEPTH or k is None:
            return _Why(self._describe_space(s), plain.node, plain.op, via=where, whole=whole,
                        via_node=plain.via_node)
        deep = self.explain(s, k, module, depth + 1, seen)
        blocker = deep.blocker if deep.blocker is not None else next(
            (self._pin(x).blocker for x, _ in chosen if x in self.pins), None)
        path = ((self._op(self.nodes.get(deep.via_node)),) if deep.via else ()) + deep.path
        return _Why(deep.base, deep.node or plain.node, deep.op or plain.op, blocker, via=where,
                    whole=deep.whole + whole, path=path, via_node=plain.node)


class _Probe:
    """Re-run one constraint on the keep vectors as of demand ``t`` (optionally altered), recording
    the spaces it reads and what it would demand; the analysis is left unchanged."""

    def __init__(self, a: Analysis, j: int, t: int):
        self.a = a
        self.fn = a.constraints[j]
        self.t = t
        self.reads: set[int] = set()

    def before(self, r: int) -> np.ndarray:
        """Space ``r``'s channels kept before demand ``t``."""
        k = self.a.kept[r]
        w = self.a.when.get(r)
        return k if w is None else k & (w < self.t)

    def run(self, override: dict[int, Any]) -> dict[int, np.ndarray] | None:
        a = self.a
        demanded: dict[int, np.ndarray] = {}

        def keep_of(slot: int) -> np.ndarray:
            r = a.find(slot)
            self.reads.add(r)
            if r in override:
                k = np.zeros(a.size[r], bool)
                k[list(override[r])] = True
                return k
            return self.before(r)

        def demand_slot(slot: int, mask: np.ndarray) -> bool:
            r = a.find(slot)
            demanded[r] = demanded.get(r, np.zeros(a.size[r], bool)) | mask
            return False

        a.keep_of = keep_of  # type: ignore[method-assign]
        a.demand_slot = demand_slot  # type: ignore[method-assign]
        try:
            self.fn()
        except Exception:  # noqa: BLE001 - a constraint that cannot run on altered vectors explains nothing
            return None
        finally:
            del a.keep_of, a.demand_slot
        return demanded


def _demands(d: dict[int, np.ndarray] | None, root: int, i: int) -> bool:
    return d is not None and root in d and bool(d[root][i])


def _one_bit(probe: _Probe, s: int, cand: np.ndarray, root: int, i: int) -> int | None:
    """One channel of space ``s`` that alone makes the constraint demand ``(root, i)``."""
    lo = [int(c) for c in cand]
    if not lo or not _demands(probe.run({s: lo}), root, i):
        return None
    while len(lo) > 1:
        half = len(lo) // 2
        if _demands(probe.run({s: lo[:half]}), root, i):
            lo = lo[:half]
        elif _demands(probe.run({s: lo[half:]}), root, i):
            lo = lo[half:]
        else:
            return lo[0]  # it takes channels from both halves: name one of them
    return lo[0]


def _vars(value: Any) -> list[Var]:
    if isinstance(value, Var):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for x in value for v in _vars(x)]
    return []
