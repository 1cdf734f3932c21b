"""Pruning engine: configs, criteria, granularities, schedules, dependency-aware groups.

Three separate pieces, each with a registry (see docs/pruning.md):

* data collection  -- :mod:`.collectors` (weights, gradients, activations);
* metric           -- :mod:`.criteria` (``CRITERIA``, :func:`register_criterion`);
* sparsity allocation -- :mod:`.allocation` (``ALLOCATORS``, :func:`register_allocator`).

Schedules (``SCHEDULES``, :func:`register_schedule`) decide the sparsity at each step.
"""

from __future__ import annotations

from .allocation import ALLOCATORS, AllocationRequest, DefaultAllocator, SparsityAllocator, register_allocator
from .collectors import ActivationCollector, Collector, GradientCollector
from .config import DEFAULT_OP_TYPES, GRANULARITIES, ModuleConfig, PrunerConfig, Rule, nni_config_list
from .criteria import CRITERIA, ChannelView, Criterion, ParamView, register_criterion
from .granularity import Target
from .pruner import LayerSparsity, MaskParametrization, Pruner, format_report
from .registry import Registry
from .schedules import (
    SCHEDULES,
    CallableScheduler,
    ConstantSparsityScheduler,
    LinearScheduler,
    PolynomialDecayScheduler,
    Schedule,
    build_schedule,
    register_schedule,
)

__all__ = [
    "Pruner",
    "PrunerConfig",
    "ModuleConfig",
    "Rule",
    "nni_config_list",
    "DEFAULT_OP_TYPES",
    "GRANULARITIES",
    "LayerSparsity",
    "format_report",
    "MaskParametrization",
    "Target",
    "Criterion",
    "ParamView",
    "ChannelView",
    "CRITERIA",
    "register_criterion",
    "SparsityAllocator",
    "DefaultAllocator",
    "AllocationRequest",
    "ALLOCATORS",
    "register_allocator",
    "Collector",
    "GradientCollector",
    "ActivationCollector",
    "Schedule",
    "ConstantSparsityScheduler",
    "PolynomialDecayScheduler",
    "LinearScheduler",
    "CallableScheduler",
    "SCHEDULES",
    "register_schedule",
    "build_schedule",
    "Registry",
]
