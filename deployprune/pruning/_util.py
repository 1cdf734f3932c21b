"""Small helpers shared by the config, schedule and criterion modules."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError


def suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(candidates), n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def check_keys(data: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Reject unknown keys, naming the key and the allowed ones."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {key!r}{suggest(str(key), allowed)}; allowed keys: {', '.join(allowed)}"
            )


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def check_fraction(value: Any, where: str, *, allow_one: bool = False) -> float:
    """A sparsity in [0, 1) (or [0, 1] with ``allow_one``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number in [0, 1), got {value!r}")
    v = float(value)
    upper_ok = v <= 1.0 if allow_one else v < 1.0
    if math.isnan(v) or v < 0.0 or not upper_ok:
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ConfigError(f"{where}: {value!r} is outside {bound}; a sparsity is the fraction of weights removed")
    return v


def check_int(value: Any, where: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value}")
    return int(value)


def count_for(fraction: float, total: int) -> int:
    """Number of units for a fraction of ``total``, rounded half up (so within half a unit)."""
    return int(math.floor(fraction * total + 0.5 + 1e-9))
