"""Sparsity schedules: which sparsity is in effect at a given optimizer step.

Step counting: ``Pruner.prepare()`` evaluates the schedule at step 0 and the k-th call of
``Pruner.step()`` (after k optimizer steps) evaluates it at step k. Masks are recomputed only on
the schedule's update steps; between two update steps the sparsity stays at the value of the last
update, and after the last update step it stays at the target for good.

A schedule is stateless given the step (the pruner owns the step counter), so resuming only needs
the step; ``state_dict()`` records the schedule's parameters so a resumed run can check them.
"""

from __future__ import annotations

import bisect
import dataclasses
import importlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError
from ._util import check_fraction, check_int, check_keys, field_names
from .registry import Registry

log = logging.getLogger(__name__)

SCHEDULES: Registry[type[Schedule]] = Registry("schedule", "schedule.type")


def register_schedule(name: str, *, replace: bool = False):
    """Decorator: make a :class:`Schedule` subclass available as ``{"type": name, ...}``."""
    return SCHEDULES.register(name, replace=replace)


class Schedule:
    """Base class. Subclasses implement :meth:`sparsity` and :meth:`is_update_step`."""

    name: ClassVar[str] = ""

    def sparsity(self, step: int, target: float) -> float:  # pragma: no cover - interface
        """Sparsity in effect at ``step`` for a layer whose final sparsity is ``target``."""
        raise NotImplementedError

    def is_update_step(self, step: int) -> bool:  # pragma: no cover - interface
        """True when masks are recomputed at ``step``."""
        raise NotImplementedError

    @property
    def last_update_step(self) -> int | None:
        """The step after which masks never change again (None: no such step)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        if dataclasses.is_dataclass(self):
            params = {n: getattr(self, n) for n in field_names(type(self))}
            return {"type": self.name, **{k: v for k, v in params.items() if _plain(v)}}
        return {"type": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the parameters saved by :meth:`state_dict` (warns when they differ)."""
        mine = self.state_dict()
        if dict(state) != mine:
            log.warning("schedule: the resumed state %s differs from the configured %s; using the resumed one",
                        dict(state), mine)
            if state.get("type") != self.name:
                raise ConfigError(f"schedule: checkpoint was made with schedule {state.get('type')!r}, "
                                  f"config has {self.name!r}; use the same schedule to resume")
            for k, v in state.items():
                if k != "type" and hasattr(self, k):
                    setattr(self, k, v)
            if hasattr(self, "__post_init__"):
                self.__post_init__()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        where = f"schedule ({cls.name})"
        check_keys(data, ["type", *field_names(cls)], where)
        kwargs = {k: v for k, v in data.items() if k != "type"}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (
        isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v))


def _parse_steps(value: Any) -> list[int]:
    """``[0, 100, 200]`` or the string ``"range(0, 900, 100)"`` (coremltools style)."""
    where = "schedule.update_steps"
    if isinstance(value, str):
        m = re.fullmatch(r"\s*range\(\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?(?:,\s*(-?\d+)\s*)?\)\s*", value)
        if not m:
            raise ConfigError(f"{where}: {value!r} is not a list of steps nor 'range(start, stop, step)'")
        args = [int(a) for a in m.groups() if a is not None]
        steps = list(range(*args))
    elif isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        raw = value.tolist() if hasattr(value, "tolist") else list(value)
        steps = [check_int(s, where, minimum=0) for s in raw]
    else:
        raise ConfigError(f"{where}: expected a list of step numbers, got {type(value).__name__}")
    if not steps:
        raise ConfigError(f"{where}: no steps given")
    if any(s < 0 for s in steps):
        raise ConfigError(f"{where}: steps must be >= 0, got {steps}")
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ConfigError(f"{where}: steps must be strictly increasing, got {steps}")
    return steps


@register_schedule("constant")
@dataclass
class ConstantSparsityScheduler(Schedule):
    """Sparsity 0 before ``begin_step``, the target from ``begin_step`` on (one-shot pruning).

    Masks are computed at ``begin_step``; with ``frequency`` they are recomputed every
    ``frequency`` steps after it (up to ``end_step`` if given), e.g. to re-rank by a data criterion.
    """

    name: ClassVar[str] = "constant"
    begin_step: int = 0
    frequency: int | None = None
    end_step: int | None = None

    def __post_init__(self) -> None:
        self.begin_step = check_int(self.begin_step, "schedule.begin_step", minimum=0)
        if self.frequency is not None:
            self.frequency = check_int(self.frequency, "schedule.frequency", minimum=1)
        if self.end_step is not None:
            self.end_step = check_int(self.end_step, "schedule.end_step", minimum=self.begin_step)

    def sparsity(self, step: int, target: float) -> float:
        return float(target) if step >= self.begin_step else 0.0

    def is_update_step(self, step: int) -> bool:
        if step == self.begin_step:
            return True
        if self.frequency is None or step < self.begin_step:
            return False
        if self.end_step is not None and step > self.end_step:
            return False
        return (step - self.begin_step) % self.frequency == 0

    @property
    def last_update_step(self) -> int | None:
        if self.frequency is None:
            return self.begin_step
        return self.end_step


@register_schedule("polynomial")
@dataclass
class PolynomialDecayScheduler(Schedule):
    """Gradual pruning of Zhu & Gupta, "To prune or not to prune" (2017).

    With update steps ``t0 < t1 < ... < tn`` (``begin_step``, every ``frequency`` steps, and
    ``end_step``, which is always an update step), the sparsity at update step ``t`` is::

        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (tn - t0)) ** power

    where ``s_i`` is ``initial_sparsity`` and ``s_f`` the layer's target. It is 0 before ``t0``,
    stays at the last update's value between update steps and is exactly ``s_f`` from ``tn`` on.
    ``update_steps`` (a list or ``"range(0, 900, 100)"``, as in coremltools) may replace
    begin/end/frequency; for evenly spaced steps both spellings give the same values.
    """

    name: ClassVar[str] = "polynomial"
    begin_step: int = 0
    end_step: int | None = None
    frequency: int = 1
    initial_sparsity: float = 0.0
    power: float = 3
    update_steps: list[int] | str | None = None
    _steps: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.initial_sparsity = check_fraction(self.initial_sparsity, "schedule.initial_sparsity")
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)) or self.power <= 0:
            raise ConfigError(f"schedule.power: expected a positive number, got {self.power!r}")
        if self.update_steps is not None:
            if self.end_step is not None:
                raise ConfigError("schedule: give either update_steps or begin_step/end_step/frequency, not both")
            self._steps = _parse_steps(self.update_steps)
            if isinstance(self.update_steps, str):
                self.update_steps = list(self._steps)
            return
        if self.end_step is None:
            raise ConfigError(f"schedule ({self.name}): end_step is required (the step at which the target "
                              "sparsity is reached), or give update_steps")
        self.begin_step = check_int(self.begin_step, "schedule.begin_step", minimum=0)
        self.end_step = check_int(self.end_step, "schedule.end_step", minimum=self.begin_step)
        self.frequency = check_int(self.frequency, "schedule.frequency", minimum=1)
        steps = list(range(self.begin_step, self.end_step, self.frequency))
        if not steps or steps[-1] != self.end_step:
            steps.append(self.end_step)
        self._steps = steps

    def _last_update_at_or_before(self, step: int) -> int | None:
        i = bisect.bisect_right(self._steps, step)
        return self._steps[i - 1] if i else None

    def sparsity(self, step: int, target: float) -> float:
        t = self._last_update_at_or_before(step)
        if t is None:
            return 0.0
        t0, tn = self._steps[0], self._steps[-1]
        if t >= tn:
            return float(target)
        frac = (t - t0) / (tn - t0)
        return float(target + (self.initial_sparsity - target) * (1.0 - frac) ** self.power)

    def is_update_step(self, step: int) -> bool:
        i = bisect.bisect_left(self._steps, step)
        return i < len(self._steps) and self._steps[i] == step

    @property
    def last_update_step(self) -> int | None:
        return self._steps[-1]

    @property
    def steps(self) -> list[int]:
        """All update steps."""
        return list(self._steps)


@register_schedule("linear")
@dataclass
class LinearScheduler(PolynomialDecayScheduler):
    """Linear ramp: ``s_t = s_i + (s_f - s_i) * (t - t0) / (tn - t0)`` on the update steps."""

    name: ClassVar[str] = "linear"
    power: float = 1

    def __post_init__(self) -> None:
        if self.power != 1:
            raise ConfigError("schedule (linear): power is fixed to 1; use type 'polynomial' for another power")
        super().__post_init__()


@register_schedule("callable")
@dataclass
class CallableScheduler(Schedule):
    """A user function ``fn(step, target) -> sparsity``, evaluated every ``frequency`` steps.

    From a config file give ``{"type": "callable", "function": "package.module:function"}``.
    Before ``begin_step`` the sparsity is 0; after ``end_step`` (if given) masks are frozen at the
    value of ``fn(end_step, target)``.
    """

    name: ClassVar[str] = "callable"
    function: Callable[[int, float], float] | str | None = None
    begin_step: int = 0
    end_step: int | None = None
    frequency: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.function, str):
            self.function = _import_callable(self.function)
        if not callable(self.function):
            raise ConfigError("schedule (callable): 'function' must be a callable fn(step, target) -> sparsity "
                              "or an import path 'package.module:function'")
        self.begin_step = check_int(self.begin_step, "schedule.begin_step", minimum=0)
        self.frequency = check_int(self.frequency, "schedule.frequency", minimum=1)
        if self.end_step is not None:
            self.end_step = check_int(self.end_step, "schedule.end_step", minimum=self.begin_step)

    def _last_update_at_or_before(self, step: int) -> int | None:
        if step < self.begin_step:
            return None
        if self.end_step is not None and step >= self.end_step:
            return self.end_step
        return self.begin_step + (step - self.begin_step) // self.frequency * self.frequency

    def sparsity(self, step: int, target: float) -> float:
        t = self._last_update_at_or_before(step)
        if t is None:
            return 0.0
        value = self.function(t, target)  # type: ignore[misc]
        return check_fraction(value, f"schedule (callable): value returned at step {t}")

    def is_update_step(self, step: int) -> bool:
        if step < self.begin_step:
            return False
        if self.end_step is not None:
            if step > self.end_step:
                return False
            if step == self.end_step:
                return True
        return (step - self.begin_step) % self.frequency == 0

    @property
    def last_update_step(self) -> int | None:
        return self.end_step

    def state_dict(self) -> dict[str, Any]:
        fn = self.function
        label = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
        return {"type": self.name, "function": label, "begin_step": self.begin_step,
                "end_step": self.end_step, "frequency": self.frequency}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("type") != self.name:
            raise ConfigError(f"schedule: checkpoint was made with schedule {state.get('type')!r}, "
                              f"config has {self.name!r}; use the same schedule to resume")
        for k in ("begin_step", "end_step", "frequency"):
            if k in state:
                setattr(self, k, state[k])


def _import_callable(path: str) -> Callable[..., Any]:
    from .._imports import check_file_callable

    if ":" not in path:
        raise ConfigError(f"schedule.function: {path!r} is not an import path 'package.module:function'")
    # a config may come from a file: it must not import arbitrary code (pass the callable from Python)
    check_file_callable(path, "schedule.function", "schedule function", trusted=False,
                        flag="the callable itself from Python")
    mod_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"schedule.function: cannot import {path!r} ({exc})") from None
    return obj


def build_schedule(spec: Any) -> Schedule:
    """A :class:`Schedule` from an instance, a callable, a name, or a dict with a ``type`` key."""
    if spec is None:
        return ConstantSparsityScheduler()
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        cls = SCHEDULES.get(spec)
        try:
            return cls()
        except ConfigError as exc:
            raise ConfigError(f"{exc}") from None
    if isinstance(spec, Mapping):
        if "type" not in spec:
            raise ConfigError(f"schedule: missing 'type'; choose one of {SCHEDULES.names()}")
        return SCHEDULES.get(spec["type"]).from_dict(spec)
    if callable(spec):
        return CallableScheduler(function=spec)
    raise ConfigError(f"schedule: expected a dict with 'type', a schedule name or a callable, "
                      f"got {type(spec).__name__}")
