"""Import a callable named by the user: ``--model pkg.mod:fn``, ``--optimizer torch.optim.Adam``, ``--data ...``.

One place for the import and the one-line errors; each caller parses its own syntax and picks
the error class (an input problem for models and data, a configuration problem for optimizers).
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import DeployPruneError


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text[:limit] or type(exc).__name__


def import_callable(module_name: str, attr: str, *, label: str, error: type[DeployPruneError]) -> Any:
    """``module_name`` imported, then the dotted ``attr`` looked up; it must be callable.

    Failures raise ``error`` with a message starting with ``label`` (e.g. ``"--model 'a.b:c'"``).
    """
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(f"{label}: cannot import module {module_name!r} ({_first_line(exc, 100)}); "
                    "check the name and that it is on PYTHONPATH") from None
    except Exception as exc:  # noqa: BLE001 - user code failing at import time
        raise error(f"{label}: importing {module_name!r} failed ({type(exc).__name__}: {_first_line(exc, 100)})"
                    ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{label}: module {module_name!r} has no attribute {attr!r}; check the spelling")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{label}: {attr!r} is a {type(obj).__name__}, not a class or function")
    return obj


# Import paths a configuration *file* may name without an opt-in: a config or scenario written
# elsewhere must not choose code to run (module-level code executes on import).
TRUSTED_PREFIXES = ("torch", "numpy", "math", "deployprune")


def is_trusted_path(path: str) -> bool:
    module = path.replace(":", ".").split(".")[0]
    return module in TRUSTED_PREFIXES


def check_trusted_path(path: Any, key: str, *, trusted: bool, flag: str) -> None:
    """ConfigError unless ``path`` (read from a file) stays inside torch/numpy/math/deployprune."""
    from .errors import ConfigError

    if isinstance(path, str) and not trusted and not is_trusted_path(path):
        raise ConfigError(f"{key}: import path {path!r} comes from a file and is outside "
                          f"{', '.join(TRUSTED_PREFIXES)}; a file must not choose code to run: "
                          f"pass {flag} if you trust it")


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
