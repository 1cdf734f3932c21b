"""The table of propagation rules, apart from the rules themselves.

Tracing (``trace.py``, ``capture.py``) asks whether a module type has a user rule (then it is
kept whole); the rules (``rules.py``) need the trace's types. Keeping the table here lets both
import it without importing each other. ``rules`` re-exports every name below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import nn

# the first argument is a deployprune.finalize.graph.Analysis (not imported: graph imports the
# trace, and the trace asks this table)
ModuleRule = Callable[[Any, fx.Node, nn.Module], None]
FunctionRule = Callable[[Any, fx.Node], None]

_MODULE_RULES: dict[type, ModuleRule] = {}
_FUNCTION_RULES: dict[Any, FunctionRule] = {}


def register_module_rule(*types: type) -> Callable[[ModuleRule], ModuleRule]:
    """Register ``fn(analysis, node, module)`` for modules of these types (and subclasses)."""

    def deco(fn: ModuleRule) -> ModuleRule:
        for t in types:
            _MODULE_RULES[t] = fn
        return fn

    return deco


def register_function_rule(*targets: Any) -> Callable[[FunctionRule], FunctionRule]:
    """Register ``fn(analysis, node)`` for functions (``torch.cat``), Tensor method names ("view") or
    functions given by qualified name ("torchvision.ops.stochastic_depth.stochastic_depth")."""

    def deco(fn: FunctionRule) -> FunctionRule:
        for t in targets:
            _FUNCTION_RULES[t] = fn
        return fn

    return deco


def module_rule_for(module: nn.Module) -> ModuleRule | None:
    for cls in type(module).__mro__:
        rule = _MODULE_RULES.get(cls)
        if rule is not None:
            return rule
    return None


def has_user_rule(module: nn.Module) -> bool:
    """A rule registered for a module class that is not part of torch (so tracing stops there)."""
    for cls in type(module).__mro__:
        if cls in _MODULE_RULES:
            return not (cls.__module__ or "").startswith("torch.")
    return False


def function_rule_for(node: fx.Node) -> FunctionRule | None:
    rule = _FUNCTION_RULES.get(node.target)
    if rule is None and callable(node.target):
        # a function of an optional library, registered by its qualified name so that deployprune need
        # not import the library: "torchvision.ops.stochastic_depth.stochastic_depth"
        t = node.target
        rule = _FUNCTION_RULES.get(f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', '')}")
    return rule
