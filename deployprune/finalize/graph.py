"""The channel graph: every tensor dimension is a *slot*; rules couple slots and demand channels.

Vocabulary
----------
* A **Var** is a tensor the graph computes (a node output) or a parameter/buffer. Each of its
  dimensions is a **slot**.
* Slots that must keep exactly the same channels (the two inputs of a residual add, a conv's
  output and its weight's rows, a BatchNorm's input and output ...) are merged with
  union-find; a merged set is a **space** with one boolean ``keep`` vector.
* Relations that are not plain equality (concat offsets, reshape splits and merges, grouped
  convolutions) are **constraints**: small closures re-run until nothing changes.
* Every space starts with nothing kept. Demands only ever add channels: model outputs and
  inputs demand everything, a conv demands the input channels its kept outputs read, an op
  without a rule demands everything it touches. Keeping more is always exact, so the fixed
  point is exact and is the smallest model the rules can justify.
* Every kept channel remembers its first *cause* (``Analysis.why``): the pin or the constraint
  whose demand kept it, so a masked channel that stays can be explained (``accounting.py``).
* Forward, every Var carries per-dimension constant information (``cval``): NaN = depends on
  the input, a number = that slice is this constant for any input (0.0 = exactly zero).
  Consumers need not read zero channels, and a constant channel can be folded into a
  consumer's bias when that is exact (Linear, unpadded conv).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .trace import TensorMeta, Traced

log = logging.getLogger(__name__)


class Var:
    """A tensor in the graph (node output or parameter) with one slot per dimension."""

    __slots__ = ("key", "shape", "slots", "cval", "refs")

    def __init__(self, key: str, shape: tuple[int, ...], slots: list[int]):
        self.key = key
        self.shape = shape
        self.slots = slots
        self.cval: dict[int, np.ndarray] = {}
        # for parameters: every (module_name, attr_name) that holds this tensor
        self.refs: list[tuple[str, str]] = []

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Var({self.key}, {self.shape})"


@dataclass
class Blocker:
    """An op that forced channels to stay (no rule, untraceable, fixed sizes in forward code)."""

    node: str
    op: str
    module: str
    reason: str
    kept_zero_channels: int = 0

    def describe(self) -> str:
        where = f" in module {self.module!r}" if self.module else ""
        extra = f"; kept {self.kept_zero_channels} masked channel(s)" if self.kept_zero_channels else ""
        return f"{self.op} (node {self.node}{where}): {self.reason}{extra}"


@dataclass
class Pin:
    slot: int
    reason: str
    blocker: int | None = None  # index into Analysis.blockers
    node: str = ""  # the node whose rule (or repair) pinned the slot


# kinds of Analysis.causes entries: ("pin", pin index), ("constraint", constraint index),
# ("rule", node name) for a demand a rule made directly, ("rescue",) for rescue_empty
NO_CAUSE = -1


class Analysis:
    """Slots, spaces, constraints and per-node Vars for one traced model."""

    def __init__(self, traced: Traced, model: nn.Module):
        self.traced = traced
        self.model = model
        self.modules: dict[str, nn.Module] = dict(model.named_modules())
        self.module_names: dict[int, str] = {id(m): n for n, m in model.named_modules()}
        # union-find over slots
        self.parent: list[int] = []
        self.size: list[int] = []
        self.kept: list[np.ndarray] = []
        self.pins: list[Pin] = []
        self.vars: dict[fx.Node, Any] = {}
        self.param_vars: dict[int, Var] = {}  # id(tensor) -> Var
        self.constraints: list[Callable[[], bool]] = []
        self.blockers: list[Blocker] = []
        self.rebuilders: dict[str, Callable[[], nn.Module | None]] = {}
        self.call_counts: dict[str, int] = {}
        self.literal_sizes: list[tuple[fx.Node, Var, int, int]] = []  # node, out var, dim, literal
        # sizes an attribute must follow even on paths that did not read it: sdpa's enable_gqa infers the
        # group size from shapes, while the masked-attention path of the same forward reads
        # num_key_value_groups (node, var, dim, value)
        self.unread_sizes: list[tuple[fx.Node, Var, int, int]] = []
        self.roles: dict[int, str] = {}  # slot -> "producer" | "consumer" (for pruners)
        self.divisions: dict[int, int] = {}  # slot -> groups of a grouped conv reading/writing it
        self.patches: list[tuple[str, str, int, int]] = []
        # partial slices of a channel dim at bounds forward code computed (node, x, dim, start, stop or None
        # for the end): the bounds must follow the kept channels, through patched attributes
        self.slice_bounds: list[tuple[fx.Node, Var, int, int, int | None]] = []
        self.rewrite_owners: set[str] = set()  # module calls re-emitted as GraphModules
        # index relations between spaces, for pruner groups: ("cat", out_slot, [(in_slot, offset)])
        # and ("reshape", single_slot, [multi_slots], [sizes]) for one dim split into / merged from several
        self.relations: list[tuple] = []
        self.rewrite_failed: set[str] = set()
        # provenance: per space root, the cause (index into ``causes``) that first kept each channel
        self.causes: list[tuple] = []
        self.why: dict[int, np.ndarray] = {}
        self.when: dict[int, np.ndarray] = {}  # per space root: when (a demand counter) each channel was kept
        self.tick = 0
        self.cause = NO_CAUSE  # the cause of the demands being made now
        self.current = ""  # the node whose rule is being applied (set by the caller)
        self.constraint_causes: list[int] = []
        self.constraint_nodes: list[str] = []

    def new_cause(self, *cause: Any) -> int:
        self.causes.append(cause)
        return len(self.causes) - 1

    def at(self, node: str) -> None:
        """What rules pin, demand and constrain from now on comes from ``node`` ("" for nobody)."""
        self.current = node
        self.cause = self.new_cause("rule", node) if node else NO_CAUSE

    # ------------------------------------------------------------------ slots
    def new_slot(self, n: int) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(n)
        self.kept.append(np.ones(n, bool) if n <= 1 else np.zeros(n, bool))
        return i

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            # A rule asked to equate dimensions of different sizes: keep both whole (always exact).
            log.debug("size mismatch coupling slots %d (%d) and %d (%d)", a, self.size[ra], b, self.size[rb])
            self.pin_slot(ra, "internal: coupled dimensions differ in size")
            self.pin_slot(rb, "internal: coupled dimensions differ in size")
            return
        self.parent[rb] = ra
        self.kept[ra] = self.kept[ra] | self.kept[rb]
        wb, tb = self.why.pop(rb, None), self.when.pop(rb, None)
        if wb is not None:
            wa, ta = self.why.get(ra), self.when.get(ra)
            if wa is None:
                self.why[ra], self.when[ra] = wb, tb
            else:
                first = (wa == NO_CAUSE) | ((wb != NO_CAUSE) & (tb < ta))
                self.why[ra], self.when[ra] = np.where(first, wb, wa), np.where(first, tb, ta)

    def keep_of(self, slot: int) -> np.ndarray:
        return self.kept[self.find(slot)]

    def demand_slot(self, slot: int, mask: np.ndarray) -> bool:
        r = self.find(slot)
        cur = self.kept[r]
        if mask.shape != cur.shape:
            raise AssertionError(f"demand of shape {mask.shape} on slot of size {cur.shape}")
        new = cur | mask
        if (new != cur).any():
            self._note(r, new & ~cur)
            self.kept[r] = new
            return True
        return False

    def _note(self, root: int, added: np.ndarray) -> None:
        w = self.why.get(root)
        if w is None:
            w = self.why[root] = np.full(self.size[root], NO_CAUSE, np.int64)
            self.when[root] = np.full(self.size[root], -1, np.int64)
        w[added] = self.cause
        self.when[root][added] = self.tick
        self.tick += 1

    def pin_slot(self, slot: int, reason: str, blocker: int | None = None) -> bool:
        self.pins.append(Pin(slot, reason, blocker, self.current))
        outer, self.cause = self.cause, self.new_cause("pin", len(self.pins) - 1)
        try:
            return self.demand_slot(slot, np.ones(self.size[self.find(slot)], bool))
        finally:
            self.cause = outer

    # ------------------------------------------------------------------ vars
    def new_var(self, key: str, shape: Iterable[int]) -> Var:
        shape = tuple(int(s) for s in shape)
        return Var(key, shape, [self.new_slot(s) for s in shape])

    def var_like(self, key: str, meta: Any) -> Any:
        """Fresh Vars mirroring a recorded output (tensor, or nested tuple of tensors)."""
        if isinstance(meta, TensorMeta):
            return self.new_var(key, meta.shape)
        if isinstance(meta, (tuple, list)):
            return tuple(self.var_like(f"{key}.{i}", m) for i, m in enumerate(meta))
        return None

    def var(self, arg: Any) -> Var | None:
        if isinstance(arg, fx.Node):
            v = self.vars.get(arg)
            return v if isinstance(v, Var) else None
        return None

    def meta(self, node: fx.Node) -> Any:
        return self.traced.values.get(node)

    def param_var(self, tensor: torch.Tensor, module_name: str, attr: str) -> Var:
        v = self.param_vars.get(id(tensor))
        if v is None:
            key = f"{module_name}.{attr}" if module_name else attr
            v = self.new_var(key, tuple(tensor.shape))
            self.param_vars[id(tensor)] = v
        if (module_name, attr) not in v.refs:
            v.refs.append((module_name, attr))
        return v

    def module_param(self, module_name: str, attr: str) -> Var | None:
        module = self.modules[module_name]
        t = getattr(module, attr, None)
        if not isinstance(t, torch.Tensor):
            return None
        return self.param_var(t, module_name, attr)

    def same(self, a: Var, da: int, b: Var, db: int) -> None:
        self.union(a.slots[da], b.slots[db])

    def same_all(self, a: Var, b: Var) -> None:
        for i in range(a.ndim):
            self.union(a.slots[i], b.slots[i])

    def pin(self, v: Var, dim: int, reason: str, blocker: int | None = None) -> None:
        self.pin_slot(v.slots[dim], reason, blocker)

    def pin_var(self, v: Var, reason: str, blocker: int | None = None) -> None:
        for d in range(v.ndim):
            self.pin(v, d, reason, blocker)

    def keep(self, v: Var, dim: int) -> np.ndarray:
        return self.keep_of(v.slots[dim])

    def demand(self, v: Var, dim: int, mask: np.ndarray) -> bool:
        return self.demand_slot(v.slots[dim], mask)

    def role(self, v: Var | None, dim: int, role: str) -> None:
        """Tag a parameter dimension for pruners: "producer" slices make the channel zero when zeroed."""
        if v is not None:
            self.roles.setdefault(v.slots[dim], role)

    def constraint(self, fn: Callable[[], bool]) -> None:
        self.constraints.append(fn)
        self.constraint_nodes.append(self.current)
        self.constraint_causes.append(self.new_cause("constraint", len(self.constraints) - 1))

    def block(self, node: fx.Node, reason: str) -> int:
        self.blockers.append(Blocker(node=node.name, op=describe_node(node, self), module=owner_of(node),
                                     reason=reason))
        return len(self.blockers) - 1

    # ------------------------------------------------------------------ constants
    def cv(self, v: Var, dim: int) -> np.ndarray:
        c = v.cval.get(dim)
        if c is None:
            c = np.full(v.shape[dim], np.nan)
        return c

    def set_cv(self, v: Var, dim: int, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (v.shape[dim],):
            if values.size == 1:
                values = np.full(v.shape[dim], float(values.reshape(-1)[0]))
            else:
                return
        if not np.isnan(values).all():
            v.cval[dim] = values

    # ------------------------------------------------------------------ solving
    def solve(self, max_passes: int = 10_000) -> int:
        """Run constraints until no demand changes; returns the number of passes."""
        outer = self.cause
        try:
            for passes in range(1, max_passes + 1):
                changed = False
                for i in range(len(self.constraints) - 1, -1, -1):
                    self.cause = self.constraint_causes[i]
                    if self.constraints[i]():
                        changed = True
                if not changed:
                    return passes
        finally:
            self.cause = outer
        raise RuntimeError("mask propagation did not converge")  # pragma: no cover

    def rescue_empty(self) -> bool:
        """A dimension never shrinks to zero: keep index 0 of any space with nothing kept."""
        changed = False
        rescue = NO_CAUSE
        for i in range(len(self.parent)):
            if self.parent[i] == i and self.size[i] > 0 and not self.kept[i].any():
                k = self.kept[i].copy()
                k[0] = True
                if rescue == NO_CAUSE:
                    rescue = self.new_cause("rescue")
                outer, self.cause = self.cause, rescue
                self._note(i, ~self.kept[i] & k)
                self.cause = outer
                self.kept[i] = k
                changed = True
        return changed


def owner_of(node: fx.Node) -> str:
    return node.meta.get("owner", "") or ""


def describe_node(node: fx.Node, a: Analysis | None = None) -> str:
    if node.op == "call_module":
        mod = a.modules.get(str(node.target)) if a is not None else None
        return f"{type(mod).__name__ if mod is not None else 'module'} {node.target!r}"
    if node.op == "call_function":
        t = node.target
        name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
        mod = getattr(t, "__module__", "") or ""
        if mod in ("_operator", "operator"):
            return f"operator.{name}"
        if mod.startswith("torch"):
            short = mod.replace("torch.nn.functional", "F").replace("torch._C._nn", "F")
            short = "torch" if short.startswith("torch._C") or short == "torch" else short
            return f"{short}.{name}"
        return f"{mod}.{name}" if mod else name
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return f"{node.op} {node.target}"


def flatten_vars(value: Any) -> list[Var]:
    if isinstance(value, Var):
        return [value]
    if isinstance(value, (tuple, list)):
        out: list[Var] = []
        for v in value:
            out.extend(flatten_vars(v))
        return out
    return []


def node_inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


# ---------------------------------------------------------------------------- groups for pruners


@dataclass
class GroupMember:
    module: str
    param: str
    dim: int
    indices: list[np.ndarray] | None
    role: str  # "producer" | "consumer" | "other"


@dataclass
class ChannelGroup:
    id: int
    size: int
    members: list[GroupMember] = field(default_factory=list)
    prunable: bool = True
    reason: str | None = None
    unit: str = "channel"
    # channels that can be removed at all (False where outputs, LayerNorms, ... keep them)
    removable: np.ndarray | None = None
    # >1 when grouped convolutions read the space: remove the same positions in each of the
    # ``divisions`` equal blocks (or whole blocks), otherwise the conv keeps them
    divisions: int = 1

    def producers(self) -> list[GroupMember]:
        return [m for m in self.members if m.role == "producer"]
