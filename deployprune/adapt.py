"""Models called with keyword inputs, returning ``ModelOutput``s, as plain tensor-in/tensor-out modules.

Library models take ``model(input_ids=..., attention_mask=...)`` or ``model(pixel_values=...)`` and
return a ``ModelOutput`` (a dict with extra fields), tuples or dataclasses. Converters and the
validator work with a tuple of input tensors and a tuple of output tensors; :func:`positional`
gives them that view of such a model, without the user writing a wrapper. The input names carry
over to the ONNX graph's inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import UsageError


def flat_outputs(value: Any) -> list[torch.Tensor]:
    """The tensors of a model output in a stable order (tensors, tuples, lists, dicts, dataclasses,
    ``ModelOutput``); other objects, such as a KV-cache object, are not part of the output."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat_outputs(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flat_outputs(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [t for k in value.__dataclass_fields__ for t in flat_outputs(getattr(value, k, None))]
    return []


class KeywordModel(nn.Module):
    """``model`` called as ``model(*positional, **dict(zip(names, rest)))``, returning its output's
    tensors as a tuple. ``input_names`` are the keyword names (positional ones are ``input_{i}``)."""

    def __init__(self, model: nn.Module, n_positional: int, names: list[str], constants: dict[str, Any]):
        super().__init__()
        self.model = model
        self.n_positional = n_positional
        self.keyword_names = list(names)
        self.constants = dict(constants)  # non-tensor keyword inputs (use_cache=False, ...)
        self.input_names = [f"input_{i}" for i in range(n_positional)] + list(names)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = tensors[: self.n_positional]
        kwargs = dict(zip(self.keyword_names, tensors[self.n_positional:], strict=True))
        out = self.model(*args, **kwargs, **self.constants)
        return tuple(flat_outputs(out))


def split_example(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from a tensor, a tuple, a dict of keyword inputs or ``(tuple, dict)``."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if (len(example_inputs) == 2 and isinstance(example_inputs[0], (tuple, list))
                and isinstance(example_inputs[1], dict)):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise UsageError("example_inputs: expected a tensor, a tuple of tensors, a dict of keyword inputs or "
                     f"(tuple, dict), got {type(example_inputs).__name__}")


def positional(model: nn.Module, example_inputs: Any) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``(module, inputs)`` where ``module(*inputs)`` computes ``model``'s output from positional tensors.

    Tensor or tuple inputs come back unchanged; keyword inputs are adapted with :class:`KeywordModel`,
    which also flattens ``ModelOutput``/dict/dataclass outputs into a tuple of tensors.
    """
    args, kwargs = split_example(example_inputs)
    if not all(isinstance(t, torch.Tensor) for t in args):
        raise UsageError("example_inputs: positional inputs must be tensors")
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    if not args and not tensors:
        raise UsageError("example_inputs: expected at least one tensor")
    if not kwargs:
        return model, tuple(args)
    return KeywordModel(model, len(args), list(tensors), constants), tuple(args) + tuple(tensors.values())

