"""Name -> class registries for the pluggable pieces of the pruner.

Criteria, sparsity allocators, schedules and granularities are looked up by the name a config
uses, so a user adds one with a decorator and refers to it from JSON/YAML::

    @register_criterion("my_metric")
    class MyMetric(Criterion): ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from ..errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A small case-insensitive name -> object mapping with a helpful lookup error."""

    def __init__(self, kind: str, option: str) -> None:
        self.kind = kind  # "criterion", used in messages
        self.option = option  # config key that selects an entry, used in messages
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, replace: bool = False) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``."""

        def add(o: T) -> T:
            key = name.lower()
            if key in self._items and not replace and self._items[key] is not o:
                raise ConfigError(f"{self.kind} {name!r} is already registered; pass replace=True to override it")
            self._items[key] = o
            if isinstance(o, type) and "name" not in vars(o):
                o.name = key  # type: ignore[attr-defined]
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            raise ConfigError(f"{self.option}: unknown {self.kind} {name!r}; choose one of {sorted(self._items)}")
        return self._items[key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
