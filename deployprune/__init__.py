"""deployprune: prune a PyTorch model, compact it exactly, export and verify the artifact.

Public API (stable names; see README "Python API")::

    import deployprune as dp
    compact = dp.finalize(model, example_inputs, masks=None)
    result = dp.compact(model, example_inputs, masks=None)     # model + what blocked what
    path = dp.export(model, example_inputs, "out.onnx", target="onnx")
    report = dp.validate(source_model, "out.onnx", example_inputs)
    pruner = dp.Pruner(model, config, example_inputs)

Importing the package is cheap: every public name is resolved on first use (PEP 562), so
``deployprune --version``, ``--help`` and argument errors never import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__

__all__ = [
    "__version__",
    "apply_masks",
    "finalize",
    "compact",
    "export",
    "load",
    "validate",
    "Pruner",
    "DeployPruneError",
    "UsageError",
    "ConfigError",
    "InputError",
    "UnsafeFileError",
    "MaskError",
    "OutputError",
    "UnsupportedError",
    "ValidationFailed",
    "ParityError",
]

_ERRORS = __all__[__all__.index("DeployPruneError"):]  # the error classes, all in deployprune.errors

# public name -> the module that defines it (imported on first access)
_EXPORTS: dict[str, str] = {
    "apply_masks": "deployprune.api",
    "export": "deployprune.api",
    "load": "deployprune.api",
    "finalize": "deployprune.finalize",
    "compact": "deployprune.finalize",
    "validate": "deployprune.validate",
    "Pruner": "deployprune.pruning",
    **{name: "deployprune.errors" for name in _ERRORS},
}

# Submodules named like the public function they define: ``dp.finalize`` and ``dp.validate`` are
# the functions, whichever of ``import deployprune.finalize`` / ``dp.finalize(...)`` comes first.
_SHADOWED = frozenset({"finalize", "validate"})

if TYPE_CHECKING:  # pragma: no cover
    from .api import apply_masks, export, load
    from .errors import (
        ConfigError,
        DeployPruneError,
        InputError,
        MaskError,
        OutputError,
        ParityError,
        UnsafeFileError,
        UnsupportedError,
        UsageError,
        ValidationFailed,
    )
    from .finalize import compact, finalize
    from .pruning import Pruner
    from .validate import validate


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deployprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses are plain attribute lookups
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module: the import system's binding of a submodule to its package attribute
    (done the first time the submodule is imported) must not replace a public function of the
    same name; the submodule stays reachable through ``sys.modules``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
