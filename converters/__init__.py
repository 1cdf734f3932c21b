"""Converter registry: one module per deployment target.

A target is any object (normally a module in this package) exposing::

    OPTIONS: dict[str, tuple[type | Choice, default, help]]
    SUFFIX: str                       # e.g. ".onnx"; the CLI uses it for default output names
    def convert(model, example_inputs, path, **options) -> ConversionResult
    def verify(path, model, example_inputs) -> Verification   # check a written artifact

The core (``deployprune.validate``) asks this registry for a target's ``verify``; it never
imports a converter module by name. ``verify`` is optional for third-party targets.

Built-in targets are imported lazily (coremltools and onnx are heavy), third-party targets are
added with :func:`register` or through the ``deployprune.converters`` entry-point group.

    >>> from deployprune import converters
    >>> converters.available()
    ['coreml', 'onnx', 'torchscript']
    >>> result = converters.get("onnx").convert(model, (x,), "model.onnx", dynamic_batch=True)
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from deployprune.errors import UnsupportedError, UsageError

if __name__ != "deployprune.converters":  # the folder imported by its old top-level name (e.g. from the repo root)
    raise ImportError(f"the converters are the package deployprune.converters, not {__name__!r}: "
                      "`pip install -e .` and import deployprune.converters")

log = logging.getLogger(__name__)

__all__ = [
    "Choice",
    "ConversionResult",
    "ConverterModule",
    "Verification",
    "COMMON_OPTIONS",
    "available",
    "get",
    "register",
    "resolve_options",
    "parse_option_strings",
    "describe_options",
]

#: Targets shipped in this package (module ``deployprune.converters.<name>``).
BUILTIN = ("coreml", "onnx", "torchscript")
ENTRY_POINT_GROUP = "deployprune.converters"

_registered: dict[str, Any] = {}
_entry_points_loaded = False


@dataclass
class ConversionResult:
    """What a converter wrote and what it had to say about it."""

    path: Path
    target: str
    size_bytes: int  # total on disk, side files (ONNX external data) and package contents included
    options: dict[str, Any]  # every option, defaults filled in
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "target": self.target,
            "size_bytes": self.size_bytes,
            "options": dict(self.options),
            "warnings": list(self.warnings),
            "metadata": dict(self.metadata),
        }


@dataclass
class Verification:
    """What ``verify(path, model, example_inputs)`` found: the artifact against the torch model."""

    passed: bool
    failures: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "failures": list(self.failures), **self.details}


@runtime_checkable
class ConverterModule(Protocol):
    OPTIONS: dict[str, tuple[Any, Any, str]]

    def convert(self, model: Any, example_inputs: tuple, path: Any, **options: Any) -> ConversionResult: ...

    def verify(self, path: Any, model: Any, example_inputs: tuple) -> Any: ...


class Choice:
    """Option type for a closed set of strings (``Choice("fp16", "fp32")``)."""

    def __init__(self, *values: str) -> None:
        if not values:
            raise ValueError("Choice needs at least one value")
        self.values = tuple(values)

    def __repr__(self) -> str:
        return "|".join(self.values)


#: Options every target accepts.
COMMON_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "force": (bool, False, "overwrite an existing output"),
    "verify": (bool, True, "check the artifact against the torch model before it is moved into place"),
}


# --------------------------------------------------------------------------- registry


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN or ep.name in _registered:
            continue
        try:
            _registered[ep.name] = ep.load()
        except Exception as exc:  # a broken plug-in must not break the built-in targets
            log.warning("converter plug-in %r (%s) failed to load: %s", ep.name, ep.value, exc)


def available() -> list[str]:
    """Names of every target: built-in ones, registered ones and installed plug-ins."""
    _load_entry_points()
    return sorted(set(BUILTIN) | set(_registered))


def get(target: str) -> ConverterModule:
    """The converter for ``target``; :class:`UnsupportedError` naming the available ones if unknown."""
    _load_entry_points()
    if not isinstance(target, str):
        raise UsageError(f"target must be a string such as 'onnx', got {type(target).__name__}")
    name = target.strip().lower()
    if name in _registered:
        return _registered[name]
    if name in BUILTIN:
        return importlib.import_module(f"{__name__}.{name}")
    names = available()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnsupportedError(
        f"unknown target {target!r}{hint}; available targets: {', '.join(names)} "
        "(add one with converters.register)"
    )


def register(name: str, module_or_object: Any, *, replace: bool = False) -> None:
    """Add a third-party target: anything with ``convert()`` and ``OPTIONS`` (see docs/converters.md)."""
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise UsageError(f"converter name {name!r} must be a lower-case identifier such as 'tflite'")
    if not callable(getattr(module_or_object, "convert", None)):
        raise UsageError(f"converter {name!r}: {module_or_object!r} has no callable convert()")
    if getattr(module_or_object, "verify", None) is not None and not callable(module_or_object.verify):
        raise UsageError(f"converter {name!r}: verify must be callable (verify(path, model, example_inputs))")
    options = getattr(module_or_object, "OPTIONS", None)
    if not isinstance(options, Mapping):
        raise UsageError(f"converter {name!r}: OPTIONS must be a dict name -> (type, default, help)")
    for opt, spec in options.items():
        if not (isinstance(spec, tuple) and len(spec) == 3):
            raise UsageError(f"converter {name!r}: option {opt!r} must be (type, default, help), got {spec!r}")
    if (name in BUILTIN or name in _registered) and not replace:
        raise UsageError(f"converter {name!r} already exists; pass replace=True to override it")
    _registered[name] = module_or_object


def _unregister(name: str) -> None:
    """For tests: forget a registered target."""
    _registered.pop(name, None)


# --------------------------------------------------------------------------- options


def _coerce(target: str, name: str, kind: Any, value: Any) -> Any:
    where = f"{target} option {name!r}"
    if value is None:
        return None
    if isinstance(kind, Choice):
        if isinstance(value, str) and value.lower() in kind.values:
            return value.lower()
        raise UsageError(f"{where}: {value!r} is not one of {', '.join(kind.values)}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{where}: expected true/false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise UsageError(f"{where}: expected a string, got {value!r}")
        return value
    if kind is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{where}: expected a list of names, got {value!r}")
        return list(value)
    if isinstance(kind, type) and not isinstance(value, kind):
        raise UsageError(f"{where}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def resolve_options(target: str, spec: Mapping[str, tuple[Any, Any, str]],
                    options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``options`` against ``spec`` and fill in defaults; unknown names raise UsageError."""
    for name in options:
        if name not in spec:
            close = difflib.get_close_matches(name, list(spec), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(
                f"{target}: unknown option {name!r}{hint}; valid options: {', '.join(sorted(spec))}"
            )
    resolved = {}
    for name, (kind, default, _help) in spec.items():
        resolved[name] = _coerce(target, name, kind, options[name]) if name in options else default
    return resolved


def _parse_scalar(target: str, name: str, kind: Any, text: str) -> Any:
    if kind is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{target} option {name!r}: expected true/false, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"{target} option {name!r}: expected an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"{target} option {name!r}: expected a number, got {text!r}") from None
    if text.strip().lower() in ("none", "null") and kind is not str:
        return None
    return text


def parse_option_strings(target: str, items: Iterable[str]) -> dict[str, Any]:
    """Turn CLI ``key=value`` strings into typed options for ``target`` (validated)."""
    module = get(target)
    spec = module.OPTIONS
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"{target}: option {item!r} must look like name=value")
        name, text = item.split("=", 1)
        name = name.strip().replace("-", "_")
        if name not in spec:
            resolve_options(target, spec, {name: None})  # raises the standard unknown-option message
        out[name] = _parse_scalar(target, name, spec[name][0], text)
    resolved = resolve_options(target, spec, out)
    return {name: resolved[name] for name in out}


def _kind_name(kind: Any) -> str:
    if isinstance(kind, Choice):
        return repr(kind)
    if kind is list:
        return "names"
    return getattr(kind, "__name__", str(kind))


def describe_options(target: str) -> str:
    """Human-readable option table for ``deployprune export --help-target``."""
    spec = get(target).OPTIONS
    lines = []
    for name, (kind, default, help_text) in spec.items():
        lines.append(f"  {name:<22} {_kind_name(kind):<18} default {default!r:<10} {help_text}")
    return "\n".join(lines)
