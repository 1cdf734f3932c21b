"""Import a callable named by the user: ``--model pkg.mod:fn``, ``--optimizer torch.optim.Adam``, ``--data ...``.

One place for the import and the one-line errors; each caller parses its own syntax and picks
the error class (an input problem for models and data, a configuration problem for optimizers).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from .errors import DeployPruneError, one_line


def import_callable(module_name: str, attr: str, *, label: str, error: type[DeployPruneError]) -> Any:
    """``module_name`` imported, then the dotted ``attr`` looked up; it must be callable.

    Failures raise ``error`` with a message starting with ``label`` (e.g. ``"--model 'a.b:c'"``).
    """
    from ._compat import tolerate_missing_torchvision_ops

    # torchvision's PyPI wheel next to the CPU build of torch fails to import without it
    # (--model torchvision.models:resnet18, or a user module that imports timm); a no-op where it works
    tolerate_missing_torchvision_ops()
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(f"{label}: cannot import module {module_name!r} ({one_line(exc, 100)}); "
                    "check the name and that it is on PYTHONPATH") from None
    except Exception as exc:  # noqa: BLE001 - user code failing at import time
        raise error(f"{label}: importing {module_name!r} failed ({type(exc).__name__}: {one_line(exc, 100)})"
                    ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{label}: module {module_name!r} has no attribute {attr!r}; check the spelling")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{label}: {attr!r} is a {type(obj).__name__}, not a class or function")
    return obj


@contextlib.contextmanager
def cwd_importable() -> Iterator[None]:
    """The working directory first on ``sys.path`` while inside (``python -m`` has it there for a
    whole run; the ``deployprune`` script has its own ``bin`` directory instead).

    The command line resolves the import paths the user typed (``--model mymodel:build``,
    ``--optimizer``, ``--data`` ...) inside this, so ``mymodel.py`` next to the user imports, and
    its own imports at module level with it. Nothing else runs with the directory on the path.
    """
    cwd = os.getcwd()
    added = not sys.path or os.path.abspath(sys.path[0] or os.curdir) != cwd
    if added:
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


# --------------------------------------------------------------------------------------------
# Callables a configuration or scenario *file* may name without an opt-in
#
# A file written elsewhere must not choose code to run: module-level code executes on import, and
# a whole namespace holds callables that load pickles (``torch.load`` with ``weights_only: false``)
# or compile and run source. So a file names callables from explicit lists, one per role, and its
# keyword arguments are plain data matched against the callable's own parameters. Anything else
# needs the command-line opt-in (``--trust-scenario``), or the callable passed from Python.

_LOSSES = ("CrossEntropyLoss", "NLLLoss", "MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss", "BCELoss",
           "BCEWithLogitsLoss", "KLDivLoss", "PoissonNLLLoss", "GaussianNLLLoss", "MultiMarginLoss",
           "MultiLabelMarginLoss", "MultiLabelSoftMarginLoss", "SoftMarginLoss", "HingeEmbeddingLoss",
           "CosineEmbeddingLoss", "MarginRankingLoss", "TripletMarginLoss", "CTCLoss")
_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "RMSprop", "Rprop", "NAdam", "RAdam",
               "ASGD")
_SCHEDULERS = ("StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR",
               "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR")

#: role -> the import paths (``package.module.Name``) a file may name for it.
FILE_CALLABLES: dict[str, frozenset[str]] = {
    "criterion": frozenset(f"torch.nn.{n}" for n in _LOSSES),
    "optimizer": frozenset(f"torch.optim.{n}" for n in _OPTIMIZERS),
    "lr_scheduler": frozenset(f"torch.optim.lr_scheduler.{n}" for n in _SCHEDULERS),
    "data": frozenset({"deployprune.data.digits"}),
    # fn(step, target) -> sparsity; a real schedule function is passed from Python
    "schedule function": frozenset(f"math.{n}" for n in ("fmod", "pow", "hypot", "copysign", "remainder",
                                                          "atan2")),
}
#: The role whose allowed names are the registered models of the zoo (both spellings of the zoo).
MODEL_FACTORY = "model factory"

#: Keyword arguments a file never passes, whatever the callable: loading pickles, choosing files,
#: modules or source code.
DENIED_KWARGS = frozenset({
    "weights_only", "pickle_module", "pickle_load_args", "pickle_protocol", "map_location", "mmap", "f", "file",
    "filename", "path", "module", "source", "code", "globals", "locals", "builtins", "loader", "importer",
})


def _dotted(path: str) -> str:
    return path.strip().replace(":", ".")


def is_file_callable(path: Any, role: str) -> bool:
    """Whether a file may name ``path`` (``pkg.mod.Name`` or ``pkg.mod:Name``) for ``role``."""
    if not isinstance(path, str) or not path.strip():
        return False
    if role == MODEL_FACTORY:
        from . import zoo

        return zoo.spec_for_factory(zoo.canonical_factory_path(path.strip())) is not None
    return _dotted(path) in FILE_CALLABLES[role]


def check_file_callable(path: Any, key: str, role: str, *, trusted: bool, flag: str) -> None:
    """ConfigError unless ``path`` (read from a file) is on the list for ``role``, or ``trusted``."""
    from .errors import ConfigError

    if trusted or not isinstance(path, str) or is_file_callable(path, role):
        return
    if role == MODEL_FACTORY:
        shown = "the models of deployprune.zoo, e.g. deployprune.zoo.lenet:TorchModel"
    else:
        names = sorted(FILE_CALLABLES[role])
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    raise ConfigError(f"{key}: import path {path!r} comes from a file and is outside the {role} allowlist "
                      f"({shown}); a file must not choose code to run: pass {flag} if you trust it")


def _plain(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)) and depth < 4:
        return all(_plain(v, depth + 1) for v in value)
    return False


def check_file_kwargs(target: Any, kwargs: Any, key: str, *, trusted: bool, flag: str) -> None:
    """ConfigError unless the keyword arguments a file gives ``target`` (a callable) are plain data
    (numbers, strings, booleans, null and lists of them) for parameters ``target`` declares by name,
    none of them a denied one (``weights_only``, ``pickle_module``, ``map_location``, files, code)."""
    from .errors import ConfigError

    if trusted or kwargs is None:
        return
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"{key}: expected an object of keyword arguments, got {type(kwargs).__name__}")
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for name, value in kwargs.items():
        if not isinstance(name, str) or name in DENIED_KWARGS or name.startswith("_"):
            raise ConfigError(f"{key}: keyword argument {name!r} comes from a file and may load code or files; "
                              f"pass {flag} if you trust it")
        if name not in named:
            known = ", ".join(sorted(n for n in named if n not in DENIED_KWARGS)) or "none"
            raise ConfigError(f"{key}: {name!r} is not a parameter of {getattr(target, '__qualname__', target)} "
                              f"(parameters: {known})")
        if not _plain(value):
            raise ConfigError(f"{key}.{name}: a file gives only plain values (numbers, strings, booleans, null, "
                              f"lists), got {type(value).__name__}; pass {flag} if you trust it")


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` without anchors/aliases (configs never need them; alias bombs blow up)."""
    import yaml

    class _NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.events.AliasEvent):
                event = self.peek_event()
                raise yaml.constructor.ConstructorError(None, None, "YAML aliases are not supported in configs",
                                                        event.start_mark)
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
