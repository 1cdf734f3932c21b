"""Data classes describing a registered model: its factory, example inputs and task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

TASKS = ("classification", "segmentation", "sequence", "regression")


@dataclass(frozen=True)
class InputSpec:
    """One positional input of a model.

    ``shape`` includes the batch dimension (batch 1). Integer inputs (token ids) carry
    ``high``: example values are drawn from ``[0, high)``.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    high: int | None = None

    def __post_init__(self) -> None:
        if not self.shape or any(int(d) <= 0 for d in self.shape):
            raise ValueError(f"InputSpec.shape must be positive sizes, got {self.shape!r}")
        if self.dtype.is_floating_point:
            if self.high is not None:
                raise ValueError("InputSpec.high only applies to integer inputs")
        elif self.dtype == torch.bool:
            pass
        elif self.high is None or self.high <= 0:
            raise ValueError(f"integer InputSpec needs high > 0 (values in [0, high)), got {self.high!r}")


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it and what to feed it."""

    name: str
    factory: Callable[[], nn.Module]
    inputs: tuple[InputSpec, ...]
    task: str
    output_layers: tuple[str, ...]
    description: str = ""
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"ModelSpec {self.name!r}: task must be one of {TASKS}, got {self.task!r}")
        if not self.inputs:
            raise ValueError(f"ModelSpec {self.name!r}: needs at least one InputSpec")

    @property
    def factory_path(self) -> str:
        """``"models.<module>:<function>"``, the importable location of the factory."""
        return f"{self.factory.__module__}:{self.factory.__qualname__}"

    @property
    def family(self) -> str:
        """The zoo module the model lives in (``resnet``, ``vit`` ...)."""
        return self.factory.__module__.rsplit(".", 1)[-1]
