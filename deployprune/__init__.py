"""deployprune: prune a PyTorch model, compact it exactly, export and verify the artifact.

Public API (stable names; see README "Python API")::

    import deployprune as dp
    compact = dp.finalize(model, example_inputs, masks=None)
    result = dp.compact(model, example_inputs, masks=None)     # model + what blocked what
    path = dp.export(model, example_inputs, "out.onnx", target="onnx")
    report = dp.validate(source_model, "out.onnx", example_inputs)
    pruner = dp.Pruner(model, config, example_inputs)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
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

# ``finalize`` and ``validate`` are both submodules and the public functions. Importing them here
# binds the package attributes to the functions once and for all (a later
# ``import deployprune.finalize`` finds the submodule in sys.modules and leaves the attribute alone).
from .finalize import compact, finalize  # noqa: E402
from .validate import validate  # noqa: E402

_LAZY = {
    "apply_masks": ("deployprune.api", "apply_masks"),
    "export": ("deployprune.api", "export"),
    "load": ("deployprune.api", "load"),
    "Pruner": ("deployprune.pruning", "Pruner"),
}

if TYPE_CHECKING:  # pragma: no cover
    from .api import apply_masks, export
    from .pruning import Pruner


def __getattr__(name: str) -> Any:
    # torch and onnx are heavy: import them only when an API function is first used, so
    # `deployprune --help` and error paths stay fast.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deployprune' has no attribute {name!r}")
