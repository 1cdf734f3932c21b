"""The :class:`Pruner`: config -> targets -> (collect, score, allocate) -> masks as parametrizations."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, InputError, MaskError, UnsupportedError, UsageError
from ..fsutil import atomic_output
from ..masks import Masks
from ._util import suggest
from .allocation import ALLOCATORS, AllocationRequest
from .collectors import Collector
from .config import DEFAULT_OP_TYPES, ModuleConfig, PrunerConfig, Rule
from .criteria import CRITERIA, ChannelView, Criterion, ParamView
from .granularity import Target, make_granularity

log = logging.getLogger(__name__)

STATE_VERSION = 1


class MaskParametrization(nn.Module):
    """``weight = original * mask``; ``mask`` is a bool buffer (moves with ``.to()``, saved in state_dict)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


@dataclass
class LayerSparsity:
    """One row of :meth:`Pruner.report`.

    sparsity: fraction of the target's units removed (elements, blocks, channels or heads).
    weight_sparsity: fraction of zeros in the layer's weight mask.
    channels_kept / channels_total: output channels (heads for head groups) that still carry a
        non-zero weight / all of them.
    """

    name: str
    type: str
    granularity: str
    criterion: str
    target: float
    scheduled: float
    sparsity: float
    weight_sparsity: float
    channels_kept: int
    channels_total: int
    params: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_report(rows: list[LayerSparsity]) -> str:
    """A plain-text table of :meth:`Pruner.report` rows."""
    header = f"{'layer':<32} {'type':<14} {'granularity':<11} {'target':>7} {'actual':>7} {'channels':>11}  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        ch = f"{r.channels_kept}/{r.channels_total}"
        lines.append(f"{r.name[:32]:<32} {r.type[:14]:<14} {r.granularity:<11} {r.target:>7.3f} {r.sparsity:>7.3f} "
                     f"{ch:>11}  {r.note}")
    return "\n".join(lines)


def find_channel_groups(model: nn.Module, example_inputs: Any) -> list[Any]:
    """Coupled channel groups from the finalize graph (one graph for pruning and compaction)."""
    from ..finalize import channel_groups

    return channel_groups(model, example_inputs)


def _type_names(module: nn.Module) -> set[str]:
    names = set()
    for cls in type(module).__mro__:
        names.add(cls.__name__)
        names.add(f"{cls.__module__}.{cls.__qualname__}")
    return names


def _type_matches(module: nn.Module, types: Iterable[str]) -> bool:
    names = _type_names(module)
    for t in types:
        if t in names:
            return True
        if t.startswith(("torch.nn.", "nn.")) and t.rsplit(".", 1)[-1] in names:
            return True
    return False


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors_in(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors_in(v)]
    return []


def _as_inputs(example_inputs: Any) -> Any:
    """Example inputs in a form finalize takes: a tuple of positional inputs, a dict of keyword inputs
    (``{"input_ids": ..., "attention_mask": ...}``, as Hugging Face models are called) or ``(tuple, dict)``."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, dict):
        return dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if (len(example_inputs) == 2 and isinstance(example_inputs[0], (tuple, list))
                and isinstance(example_inputs[1], dict)):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs)
    raise UsageError("example_inputs: expected a tensor, a tuple of inputs, a dict of keyword inputs or "
                     f"(tuple, dict), got {type(example_inputs).__name__}")


def _call_args(example_inputs: Any) -> tuple[tuple, dict]:
    from ..finalize import split_inputs

    return split_inputs(example_inputs)


_EXCLUDED = "excluded"


def _unshare_class(module: nn.Module) -> None:
    """Give a parametrized module its own class object.

    torch's parametrized classes are shared by ``copy.deepcopy`` copies, and
    ``remove_parametrizations`` deletes the property from that class: removing the masks of a
    copy would break the original (and vice versa). A fresh class keeps them independent.
    """
    cls = type(module)
    if parametrize.is_parametrized(module):
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every parametrization removed (values kept), leaving
    ``model`` untouched."""
    import copy

    from ..masks import strip_parametrizations_

    work = copy.deepcopy(model)
    strip_parametrizations_(work)
    return work


class Pruner:
    """Masks a model by a :class:`PrunerConfig`; see docs/pruning.md.

    ``Pruner(model, config, example_inputs=None, *, data=None, loss_fn=None)``:

    config: a dict, an NNI config_list, a :class:`PrunerConfig` or a ``.json``/``.yaml`` path.
    example_inputs: needed for channel/head granularity (coupled groups come from the graph)
        and for ``exclude_last_layer``.
    data: an iterable of batches (tensor, ``(inputs, target)`` or dict of keyword arguments),
        read by data-driven criteria (apoz, mean_activation; taylor with ``loss_fn``).
    loss_fn: ``loss_fn(output, target)`` for the taylor criterion on ``data``.

    The model is modified in place by :meth:`prepare` (parametrizations) and restored by
    :meth:`remove`; parameters stay the same objects, so an existing optimizer keeps working.
    """

    def __init__(self, model: nn.Module, config: Any, example_inputs: Any = None, *,
                 data: Iterable[Any] | None = None, loss_fn: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"Pruner: model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.config = PrunerConfig.coerce(config)
        self.example_inputs = _as_inputs(example_inputs)
        self.data = data
        self.loss_fn = loss_fn
        self.schedule = self.config.schedule
        self.allocator = ALLOCATORS.get(self.config.allocator)()
        self._step = 0
        self._prepared = False
        self._targets: list[Target] = []
        self._unit_keep: dict[str, torch.Tensor] = {}
        self._managed: list[tuple[str, str]] = []
        self._criteria: dict[tuple, Criterion] = {}
        self._collectors: dict[type, Collector] = {}
        self._collector_keys: dict[type, list[tuple[str, str]]] = {}
        self._member_dims: dict[tuple[str, str], int] = {}
        self._notes: dict[str, tuple[ModuleConfig, str]] = {}
        self._pending_state: Mapping[str, Any] | None = None
        self._removed_masks: Masks | None = None
        self._planner: Any = None  # a BudgetPlanner with config.budget, built by prepare()
        self._resolved, self._sources = self._resolve()
        self._check_requirements()

    # ------------------------------------------------------------------ config resolution

    def _rule_matches(self, rule: Rule, name: str, module: nn.Module) -> bool:
        types = rule.op_types
        if types is None and rule.default_types:
            types = DEFAULT_OP_TYPES
        if types is not None and not _type_matches(module, types):
            return False
        if rule.op_names is not None or rule.op_names_re is not None or rule.op_partial_names is not None:
            hit = (rule.op_names is not None and name in rule.op_names) or \
                  (rule.op_names_re is not None and any(re.fullmatch(p, name) for p in rule.op_names_re)) or \
                  (rule.op_partial_names is not None and any(p in name for p in rule.op_partial_names))
            if not hit:
                return False
        if name in rule.exclude_op_names or any(re.fullmatch(p, name) for p in rule.exclude_op_names_re):
            return False
        return not (rule.exclude_op_types and _type_matches(module, rule.exclude_op_types))

    def _resolve(self) -> tuple[dict[str, Any], dict[str, str]]:
        modules = dict(self.model.named_modules())
        names = [n for n in modules if n]
        resolved: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for rule in self.config.rules():
            for exact in rule.op_names or ():
                if exact not in modules:
                    raise ConfigError(f"{rule.where}.op_names: module {exact!r} does not exist in the model"
                                      f"{suggest(exact, names)}")
            for pattern in rule.op_names_re or ():
                if not any(re.fullmatch(pattern, n) for n in modules):
                    raise ConfigError(f"{rule.where}: name pattern {pattern!r} matches no module (patterns must "
                                      f"match the whole name, e.g. 'layer1\\..*'){suggest(pattern, names)}")
            for part in rule.op_partial_names or ():
                if not any(part in n for n in names):
                    raise ConfigError(f"{rule.where}.op_partial_names: {part!r} is in no module name")
            matched = [n for n, m in modules.items() if self._rule_matches(rule, n, m)]
            if rule.exclude:
                for n in matched:
                    resolved[n] = _EXCLUDED
                    sources[n] = rule.where
                continue
            cfg = rule.config
            for n in matched:
                resolved[n] = cfg
                sources[n] = rule.where
            if cfg is not None and not cfg.structured and matched and (rule.op_names or rule.op_names_re):
                if not any(self._has_params(modules[n], cfg.params) for n in matched):
                    raise ConfigError(f"{rule.where}: matches {matched[:5]} but none has parameter(s) "
                                      f"{list(cfg.params)}")
        # absolute exclusions (exclude / NNI exclude entries) win whatever their position
        for rule in self.config.rules():
            if rule.exclude:
                for n, m in modules.items():
                    if self._rule_matches(rule, n, m):
                        resolved[n] = _EXCLUDED
                        sources[n] = rule.where
        if not any(isinstance(c, ModuleConfig) for c in resolved.values()):
            raise ConfigError(f"config selects no layer of {type(self.model).__name__} to prune; check op_types / "
                              f"module_type_configs (layer types in the model: "
                              f"{sorted({type(m).__name__ for m in modules.values()})[:12]})")
        return resolved, sources

    @staticmethod
    def _has_params(module: nn.Module, params: Iterable[str]) -> bool:
        return any(isinstance(getattr(module, p, None), torch.Tensor) for p in params)

    def _check_requirements(self) -> None:
        for name, cfg in self._resolved.items():
            if not isinstance(cfg, ModuleConfig):
                continue
            where = self._sources.get(name, "config")
            crit = CRITERIA.get(cfg.criterion)
            if crit.needs_data and self.data is None:
                raise ConfigError(f"{where}: criterion {cfg.criterion!r} needs data (layer {name!r}): pass "
                                  "data=<iterable of batches> to Pruner (CLI: --data)")
            if crit.needs_grad and (self.data is None or self.loss_fn is None) and \
                    self.schedule.sparsity(0, cfg.effective_target) > 0:
                raise ConfigError(f"{where}: criterion {cfg.criterion!r} needs gradients before the first masks "
                                  f"(layer {name!r}): pass data= and loss_fn= to Pruner, or use a schedule "
                                  "that starts after some training steps")
            if cfg.structured and self.example_inputs is None:
                raise ConfigError(f"{where}: granularity {cfg.granularity!r} needs example_inputs to find the "
                                  f"coupled channels (layer {name!r}); pass example_inputs to Pruner")

    def _criterion(self, cfg: ModuleConfig) -> Criterion:
        key = (cfg.criterion, tuple(sorted((k, repr(v)) for k, v in cfg.criterion_args.items())))
        if key not in self._criteria:
            self._criteria[key] = CRITERIA.get(cfg.criterion)(**cfg.criterion_args)
        return self._criteria[key]

    # ------------------------------------------------------------------ targets

    def param(self, module_name: str, param_name: str) -> torch.Tensor:
        """The current (masked) value of ``module_name.param_name``."""
        return getattr(self.model.get_submodule(module_name), param_name)

    def output_dim_of(self, module_name: str, param_name: str) -> int:
        return self._member_dims.get((module_name, param_name), 0)

    def _last_layers(self) -> list[str]:
        candidates = [(n, m) for n, m in self.model.named_modules()
                      if any(p.ndim >= 2 for p in m.parameters(recurse=False))]
        if not candidates:
            return []
        if self.example_inputs is None:
            log.warning("exclude_last_layer: no example_inputs; keeping %r dense (the last layer in registration "
                        "order); pass example_inputs to find the layer that produces the output",
                        candidates[-1][0])
            return [candidates[-1][0]]
        records: list[tuple[str, list[torch.Tensor]]] = []
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: records.append((n, _tensors_in(o))))
                 for n, m in candidates]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                args, kwargs = _call_args(self.example_inputs)
                out = self.model(*args, **kwargs)
        finally:
            self.model.train(was_training)
            for h in hooks:
                h.remove()
        out_ids = {id(t) for t in _tensors_in(out)}
        producing: list[str] = []
        for n, tensors in records:
            if any(id(t) in out_ids for t in tensors) and n not in producing:
                producing.append(n)
        if producing:
            return producing
        return [records[-1][0]] if records else []

    def _build_targets(self) -> list[Target]:
        targets: list[Target] = []
        last = set(self._last_layers()) if self.config.exclude_last_layer else set()
        modules = dict(self.model.named_modules())
        structured_wanted = False
        for name, cfg in self._resolved.items():
            if not isinstance(cfg, ModuleConfig):
                continue
            if cfg.structured:
                structured_wanted = True
                continue
            module = modules[name]
            if name in last:
                self._notes[name] = (cfg, "last layer kept dense (exclude_last_layer)")
                continue
            for pname in cfg.params:
                p = module._parameters.get(pname)
                if p is None or p.ndim == 0:
                    continue
                t = Target(name=f"{name}.{pname}" if name else pname, kind="param", config=cfg,
                           criterion=self._criterion(cfg), granularity=make_granularity(cfg),
                           module_name=name, param_name=pname, module_type=type(module).__name__, modules=[name])
                targets.append(t)
        if structured_wanted:
            targets.extend(self._group_targets(modules))
        for t in targets:
            t.granularity.setup(t, self)
        return targets

    def _group_targets(self, modules: dict[str, nn.Module]) -> list[Target]:
        groups = find_channel_groups(self.model, self.example_inputs)  # type: ignore[arg-type]
        out: list[Target] = []
        for g in groups:
            producers = [m for m in g.members if m.role == "producer"]
            cfgs: list[tuple[str, ModuleConfig]] = []
            excluded = None
            for m in producers:
                res = self._resolved.get(m.module)
                if res is _EXCLUDED:
                    excluded = m.module
                elif isinstance(res, ModuleConfig) and res.structured:
                    unit = "head" if getattr(g, "unit", "channel") == "head" else "channel"
                    if res.granularity == "channel+head":  # this group by its own unit
                        cfgs.append((m.module, replace(res, granularity=unit)))
                    elif (res.granularity == "head") == (unit == "head"):
                        cfgs.append((m.module, res))
            if not cfgs:
                continue
            if not g.prunable:
                for mod, cfg in cfgs:
                    self._notes.setdefault(mod, (cfg, f"not prunable: {g.reason or 'coupled to the output'}"))
                continue
            if excluded is not None:
                for mod, cfg in cfgs:
                    self._notes.setdefault(mod, (cfg, f"kept: coupled with excluded {excluded!r}"))
                continue
            heavy = [mod for mod, _ in cfgs if self._has_heavy_param(modules[mod])]
            primary = heavy[0] if heavy else cfgs[0][0]
            cfg = min((c for _, c in cfgs), key=lambda c: c.effective_target)
            if len({c.effective_target for _, c in cfgs}) > 1:
                log.info("group %s (%s): members configured with different sparsities; using the lowest, %g",
                         g.id, primary, cfg.effective_target)
            for m in g.members:
                self._member_dims.setdefault((m.module, m.param), m.dim)
            out.append(Target(name=f"group{g.id}:{primary}", kind="group", config=cfg, criterion=self._criterion(cfg),
                              granularity=make_granularity(cfg), module_name=primary,
                              param_name="weight", module_type=type(modules[primary]).__name__, group=g,
                              modules=sorted({mod for mod, _ in cfgs})))
        covered = {mod for t in out for mod in t.modules} | set(self._notes)
        for name, cfg in self._resolved.items():
            if isinstance(cfg, ModuleConfig) and cfg.structured and name not in covered \
                    and self._has_heavy_param(modules[name]):
                unit = {"head": "attention-head", "channel+head": "channel or attention-head"}.get(cfg.granularity,
                                                                                                  "channel")
                self._notes[name] = (cfg, f"kept: the graph found no {unit} group produced by this layer")
        head_configured = any(isinstance(c, ModuleConfig) and c.granularity == "head" for c in self._resolved.values())
        if head_configured and not any(t.config.granularity == "head" for t in out):
            log.warning("granularity 'head': the graph found no attention-head group in %s; nothing is pruned "
                        "by head", type(self.model).__name__)
        return out

    @staticmethod
    def _has_heavy_param(module: nn.Module) -> bool:
        return any(p.ndim >= 2 for p in module.parameters(recurse=False))

    # ------------------------------------------------------------------ views and scores

    def param_view(self, target: Target, data: Mapping[tuple, Mapping[str, torch.Tensor]]) -> ParamView:
        module = self.model.get_submodule(target.module_name)
        merged = {**data.get((target.module_name, None), {}), **data.get((target.module_name, target.param_name), {})}
        return ParamView(module_name=target.module_name, param_name=target.param_name, module=module,
                         tensor=getattr(module, target.param_name).detach(), data=merged,
                         seed=self.config.seed, step=self._step)

    def group_scores(self, target: Target, data: Mapping[tuple, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """Channel scores of a group: each scored producer member's scores normalized
        (``score_normalization``), then averaged over the members."""
        g = target.group
        views: list[ChannelView] = []
        for m in g.members:
            if m.role != "producer":
                continue
            module = self.model.get_submodule(m.module)
            t = getattr(module, m.param, None)
            if not isinstance(t, torch.Tensor):
                continue
            merged = {**data.get((m.module, None), {}), **data.get((m.module, m.param), {})}
            views.append(ChannelView(module_name=m.module, param_name=m.param, module=module, tensor=t.detach(),
                                     data=merged, seed=self.config.seed, step=self._step, dim=m.dim,
                                     indices=m.indices, size=g.size, role=m.role))
        per: list[torch.Tensor] = []
        for v in target.criterion.select_members(views):
            s = target.criterion.channel_scores(v)
            if s is None:
                continue
            s = torch.nan_to_num(s.to(torch.float64).reshape(-1), nan=0.0)
            if s.numel() != g.size:
                raise UnsupportedError(f"criterion {target.criterion.name!r} returned {s.numel()} scores for "
                                       f"{v.qualified_name} but its group has {g.size} channels")
            norm = self.config.score_normalization
            scale = s.mean() if norm == "mean" else s.abs().max() if norm == "max" else None
            if scale is not None and float(scale) > 0:
                s = s / scale
            per.append(s)
        if not per:
            log.warning("%s: criterion %r cannot score this group (no suitable member); it stays dense",
                        target.name, target.criterion.name)
            return torch.full((g.size,), float("inf"), dtype=torch.float64)
        return torch.stack(per).mean(0)

    # ------------------------------------------------------------------ lifecycle

    def prepare(self) -> nn.Module:
        """Attach masks (all ones, then the step-0 masks of the schedule). Returns the model."""
        if self._prepared:
            return self.model
        for module in self.model.modules():
            if parametrize.is_parametrized(module):
                for plist in module.parametrizations.values():
                    if any(isinstance(p, MaskParametrization) for p in plist):
                        raise UsageError("prepare: the model already carries deployprune masks; call remove() on "
                                         "the previous Pruner first")
        self._targets = self._build_targets()
        if not self._targets:
            log.warning("pruner: no layer is prunable with this config (see report() notes)")
        managed: list[tuple[str, str]] = []
        for t in self._targets:
            for key in t.masked_params(self.config.mask_consumers):
                if key not in managed:
                    managed.append(key)
        for mod_name, pname in managed:
            module = self.model.get_submodule(mod_name)
            p = module._parameters.get(pname) if not parametrize.is_parametrized(module, pname) else None
            if p is None and not parametrize.is_parametrized(module, pname):
                raise UnsupportedError(f"{mod_name}.{pname}: not a parameter; cannot attach a mask")
            current = getattr(module, pname)
            parametrize.register_parametrization(
                module, pname, MaskParametrization(torch.ones(current.shape, dtype=torch.bool, device=current.device)))
        self._managed = managed
        self._unit_keep = {t.name: torch.ones(t.units, dtype=torch.bool) for t in self._targets}
        self._collectors = {}
        self._collector_keys = {}
        for t in self._targets:
            cls = t.criterion.collector
            if cls is None:
                continue
            if cls not in self._collectors:
                self._collectors[cls] = cls(self)
                self._collector_keys[cls] = []
            keys = self._collector_keys[cls]
            for key in self._data_keys(t):
                if key not in keys:
                    keys.append(key)
        self._prepared = True
        if self.config.budget is not None:
            try:
                self._setup_budget(calibrate=self._pending_state is None
                                   or "budget_target" not in self._pending_state)
            except BaseException:
                # a bad or unreachable budget leaves the model as it was (masks are still all ones)
                self.remove()
                self._removed_masks = None
                self._planner = None
                raise
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)
        elif self.schedule.is_update_step(self._step):
            self._update()
        return self.model

    # ------------------------------------------------------------------ budgets

    def _budget_targets(self) -> list[Target]:
        return [t for t in self._targets if t.kind == "group"] if self.config.budget is not None else []

    def _setup_budget(self, *, calibrate: bool) -> None:
        """Build the budget planner; calibrate it on the current weights (not on resume: the saved
        calibrated target is restored by load_state_dict)."""
        from .budget import BudgetPlanner

        groups = self._budget_targets()
        if not groups:
            raise ConfigError(f"budget {self.config.budget.text}: needs layers pruned by channel or head "
                              "(granularity 'channel' or 'head'); the config selects none, or the graph found "
                              "no prunable group (see report() notes)")
        # keyword inputs (input_ids=..., attention_mask=...) are timed as the ONNX graph's inputs, in order
        self._planner = BudgetPlanner(self.config.budget, self.model, groups, self.example_inputs)
        if calibrate:
            requests = self._requests(groups, sparsity_of=lambda t: 1.0)
            planned = self._planner.plan(requests, self._nni_masks_of)
            self._planner.planned = {n: k for n, (k, _) in planned.widths.items()}
        # report()'s target column: the sparsity the budget gives each group at the schedule's end
        for t in groups:
            kept = self._planner.planned.get(t.name)
            if kept is not None and t.units:
                t.final_sparsity = 1.0 - kept / t.units

    def _nni_masks_of(self, keep: Mapping[str, torch.Tensor]) -> Masks:
        """NNI-layout masks of the budget groups' keep vectors (other targets: as the model has them)."""
        out: Masks = {}
        for t in self._budget_targets():
            for (mod, par), m in t.granularity.expand(t, self, keep[t.name]).items():
                prev = out.setdefault(mod, {}).get(par)
                out[mod][par] = m if prev is None else prev & m
        return out

    def _requests(self, targets: list[Target], *, sparsity_of: Any = None) -> list[AllocationRequest]:
        data = self._collect([t for t in targets if (sparsity_of or self.current_sparsity)(t) > 0])
        requests = []
        for t in targets:
            prior = self._unit_keep[t.name]
            sp = (sparsity_of or self.current_sparsity)(t)
            scores = t.granularity.scores(t, self, data, prior) if sp > 0 else torch.zeros(t.units,
                                                                                          dtype=torch.float64)
            if scores.numel() != t.units:
                raise UnsupportedError(f"{t.name}: {t.granularity.name} scores have {scores.numel()} entries, "
                                       f"expected {t.units}")
            requests.append(AllocationRequest(name=t.name, scores=scores.reshape(-1).cpu(), sparsity=sp,
                                              prior_keep=prior, round_to=t.config.round_to,
                                              max_sparsity=t.config.max_sparsity, pool=t.config.global_group,
                                              unit_shape=t.unit_shape))
        return requests

    @property
    def budget_progress(self) -> float:
        """How far the schedule is towards the budget (0 = dense, 1 = the budget)."""
        return float(self.schedule.sparsity(self._step, 1.0))

    def budget_report(self, *, measure: bool = True) -> dict[str, Any] | None:
        """Budget vs achieved (latency, MACs, params), the chosen width of every group and the
        calibration history; ``measure`` compacts the current masks and measures them (latency:
        exported to ONNX and timed interleaved with the dense ONNX). None without a budget."""
        planner = self._planner
        if planner is None:
            return None
        self._require_prepared("budget_report")
        return planner.report(self._budget_targets(), {t.name: self._unit_keep[t.name] for t in
                                                        self._budget_targets()},
                              self._nni_masks_of if measure else None, progress=self.budget_progress)

    def compress(self) -> tuple[nn.Module, Masks]:
        """NNI-style one call: prepare and return ``(model, masks)``."""
        self.prepare()
        return self.model, self.masks()

    def _data_keys(self, t: Target) -> list[tuple[str, str]]:
        if t.kind == "param":
            return [(t.module_name, t.param_name)]
        return [(m.module, m.param) for m in t.group.members if m.role == "producer"]

    def _require_prepared(self, what: str) -> None:
        if not self._prepared:
            raise UsageError(f"{what}: call pruner.prepare() first")

    def step(self) -> None:
        """Call after ``optimizer.step()``: advance the schedule, recompute masks on update steps."""
        self._require_prepared("step")
        self._step += 1
        last = self.schedule.last_update_step
        if last is not None and self._step > last:
            return
        for cls, col in self._collectors.items():
            col.on_step(self._collector_keys[cls])
        if self.schedule.is_update_step(self._step):
            self._update()

    @property
    def step_count(self) -> int:
        return self._step

    def current_sparsity(self, target: Target) -> float:
        return self.schedule.sparsity(self._step, target.final_sparsity)

    def _update(self) -> None:
        with torch.no_grad():
            budgeted = self._budget_targets()
            if budgeted:
                self._update_budget(budgeted)
            active = [t for t in self._targets if t not in budgeted and
                      (self.current_sparsity(t) > 0 or not bool(self._unit_keep[t.name].all()))]
            if not active:
                if budgeted:
                    self._write_masks(self._masks_from_units())
                return
            data = self._collect([t for t in active if self.current_sparsity(t) > 0])
            requests = []
            for t in active:
                prior = self._unit_keep[t.name]
                if self.current_sparsity(t) > 0:
                    scores = t.granularity.scores(t, self, data, prior)
                else:
                    scores = torch.zeros(t.units, dtype=torch.float64)
                if scores.numel() != t.units:
                    raise UnsupportedError(f"{t.name}: {t.granularity.name} scores have {scores.numel()} entries, "
                                           f"expected {t.units}")
                requests.append(AllocationRequest(name=t.name, scores=scores.reshape(-1).cpu(),
                                                  sparsity=self.current_sparsity(t), prior_keep=prior,
                                                  round_to=t.config.round_to, max_sparsity=t.config.max_sparsity,
                                                  pool=t.config.global_group, unit_shape=t.unit_shape))
            keeps = self.allocator.allocate(requests)
            for t in active:
                keep = keeps.get(t.name)
                if keep is None or keep.numel() != t.units:
                    raise UnsupportedError(f"allocator {self.config.allocator!r} returned no valid keep vector "
                                           f"for {t.name}")
                self._unit_keep[t.name] = keep.reshape(-1).to(torch.bool).cpu()
            self._write_masks(self._masks_from_units())
            for col in self._collectors.values():
                col.reset()

    def _update_budget(self, targets: list[Target]) -> None:
        """Budget groups: the widths of the cost target at the schedule's progress."""
        p = self.budget_progress
        if p <= 0 and all(bool(self._unit_keep[t.name].all()) for t in targets):
            return
        requests = self._requests(targets, sparsity_of=lambda t: 1.0 if p > 0 else 0.0)
        alloc = self._planner.allocate(requests, self._planner.target_at(p))
        for t in targets:
            self._unit_keep[t.name] = alloc.keep[t.name].reshape(-1).to(torch.bool).cpu()
        self._planner.last = alloc

    def _collect(self, targets: list[Target]) -> dict[tuple, dict[str, torch.Tensor]]:
        needed: dict[type, list[tuple[str, str]]] = {}
        for t in targets:
            cls = t.criterion.collector
            if cls is None:
                continue
            keys = needed.setdefault(cls, [])
            keys.extend(k for k in self._data_keys(t) if k not in keys)
        data: dict[tuple, dict[str, torch.Tensor]] = {}
        for cls, keys in needed.items():
            for key, values in self._collectors[cls].collect(keys).items():
                data.setdefault(key, {}).update(values)
        return data

    def _masks_from_units(self) -> dict[tuple[str, str], torch.Tensor]:
        masks = {key: torch.ones(self.param(*key).shape, dtype=torch.bool) for key in self._managed}
        for t in self._targets:
            keep = self._unit_keep[t.name]
            if bool(keep.all()):
                continue
            for key, m in t.granularity.expand(t, self, keep).items():
                if key in masks:
                    masks[key] &= m.to(torch.bool).cpu()
        return masks

    def _parametrization(self, mod_name: str, pname: str) -> MaskParametrization:
        module = self.model.get_submodule(mod_name)
        for p in module.parametrizations[pname]:
            if isinstance(p, MaskParametrization):
                return p
        raise UsageError(f"{mod_name}.{pname}: its mask was removed from the model")  # pragma: no cover

    def _write_masks(self, masks: Mapping[tuple[str, str], torch.Tensor]) -> None:
        for key, m in masks.items():
            par = self._parametrization(*key)
            par.mask.copy_(m.to(device=par.mask.device, dtype=torch.bool))

    # ------------------------------------------------------------------ outputs

    def masks(self) -> Masks:
        """Current masks in NNI layout ``{module: {param: bool tensor}}`` (copies, on CPU)."""
        if self._removed_masks is not None:
            return {m: {p: t.clone() for p, t in per.items()} for m, per in self._removed_masks.items()}
        self._require_prepared("masks")
        out: Masks = {}
        for mod_name, pname in self._managed:
            out.setdefault(mod_name, {})[pname] = self._parametrization(mod_name, pname).mask.detach().cpu().clone()
        return out

    def report(self) -> list[LayerSparsity]:
        """Per target: configured and scheduled sparsity, achieved sparsity, channels kept/total."""
        self._require_prepared("report")
        masks = self.masks()
        rows: list[LayerSparsity] = []
        for t in self._targets:
            keep = self._unit_keep[t.name]
            sparsity = int((~keep).sum()) / keep.numel() if keep.numel() else 0.0
            wmask = masks.get(t.module_name, {}).get(t.param_name)
            module = self.model.get_submodule(t.module_name)
            if t.kind == "group":
                per_unit = int(t.channel_map.shape[1]) if t.channel_map is not None else 1
                kept, total = int(keep.sum()) * per_unit, int(t.group.size)
                params = sum(int(self.param(mn, pn).numel()) for mn, pn in t.masked_params())
            else:
                total = int(wmask.shape[0]) if wmask is not None and wmask.ndim >= 1 else 0
                kept = int(wmask.reshape(total, -1).any(1).sum()) if total else 0
                params = int(self.param(t.module_name, t.param_name).numel())
            wsp = int((~wmask).sum()) / wmask.numel() if wmask is not None and wmask.numel() else 0.0
            rows.append(LayerSparsity(
                name=t.module_name if t.kind == "group" or t.param_name == "weight" else t.name,
                type=type(module).__name__.removeprefix("Parametrized"), granularity=t.config.granularity,
                criterion=t.config.criterion, target=t.final_sparsity, scheduled=self.current_sparsity(t),
                sparsity=sparsity, weight_sparsity=wsp, channels_kept=kept, channels_total=total, params=params,
                note=(f"coupled group {t.group.id}: " + ", ".join(t.modules)) if t.kind == "group" else ""))
        for name, (cfg, note) in self._notes.items():
            module = self.model.get_submodule(name)
            w = getattr(module, "weight", None)
            total = int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim >= 1 else 0
            rows.append(LayerSparsity(name=name, type=type(module).__name__.removeprefix("Parametrized"),
                                      granularity=cfg.granularity, criterion=cfg.criterion,
                                      target=cfg.effective_target, scheduled=0.0, sparsity=0.0, weight_sparsity=0.0,
                                      channels_kept=total, channels_total=total,
                                      params=int(w.numel()) if isinstance(w, torch.Tensor) else 0, note=note))
        return rows

    def summary(self) -> str:
        return format_report(self.report())

    def finalize(self, example_inputs: Any = None, **kwargs: Any) -> nn.Module:
        """``deployprune.finalize(model, example_inputs, self.masks(), **kwargs)``: a compact model."""
        inputs = _as_inputs(example_inputs) if example_inputs is not None else self.example_inputs
        if inputs is None:
            raise UsageError("finalize: pass example_inputs (to Pruner or to finalize)")
        from ..finalize import finalize

        if kwargs.get("inplace"):
            raise UsageError("finalize: inplace=True would strip the pruner's masks from the model; "
                             "call pruner.remove() first, then deployprune.finalize(model, ..., inplace=True)")
        return finalize(self.model, inputs, self.masks(), **kwargs)

    def remove(self) -> nn.Module:
        """Detach the mask parametrizations; parameters keep their masked values."""
        if not self._prepared:
            return self.model
        masks = self.masks()
        for mod_name, pname in self._managed:
            module = self.model.get_submodule(mod_name)
            _unshare_class(module)
            plist = module.parametrizations[pname]
            ours = [i for i, p in enumerate(plist) if isinstance(p, MaskParametrization)]
            if len(plist) == 1:
                parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
            elif ours == [0]:
                with torch.no_grad():
                    plist.original.mul_(plist[0].mask.to(plist.original.dtype))
                del plist[0]
            else:
                raise UnsupportedError(f"{mod_name}.{pname}: another parametrization runs before the mask; remove "
                                       "it first")
        self._removed_masks = masks
        self._prepared = False
        return self.model

    # ------------------------------------------------------------------ files and state

    def save_masks(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write :meth:`masks` with ``torch.save`` (atomic; plain tensors, loadable weights_only)."""
        masks = self.masks()
        buf = io.BytesIO()  # in memory first: a failed disk write is then a plain OSError
        torch.save(masks, buf)
        with atomic_output(path, force=force) as tmp:
            tmp.write_bytes(buf.getvalue())
        return Path(path)

    @staticmethod
    def load_masks(path: str | os.PathLike) -> Masks:
        """Read masks written by :meth:`save_masks` (or a :meth:`state_dict` file, or NNI's
        ``torch.save(masks)``) with ``weights_only=True``."""
        from ..io import DEFAULT_MAX_FILE_BYTES, check_input_file, torch_load
        from ..masks import check_binary

        # the same archive, size and CRC checks as --masks
        p = check_input_file(path, max_bytes=DEFAULT_MAX_FILE_BYTES, what="masks file")
        obj = torch_load(p, allow_pickle=False, max_bytes=DEFAULT_MAX_FILE_BYTES, what="masks file")
        if isinstance(obj, Mapping) and "masks" in obj and "step" in obj:
            obj = obj["masks"]
        if not isinstance(obj, Mapping):
            raise MaskError(f"{p}: expected a dict {{module: {{param: mask}}}}, got {type(obj).__name__}")
        out: Masks = {}
        for mod, per in obj.items():
            if not isinstance(mod, str) or not isinstance(per, Mapping):
                raise MaskError(f"{p}: entry {mod!r} is not {{param: mask}}")
            for pname, m in per.items():
                if not isinstance(m, torch.Tensor):
                    raise MaskError(f"{p}: {mod}.{pname} is a {type(m).__name__}, not a tensor")
                out.setdefault(mod, {})[str(pname)] = check_binary(m, f"{p}: {mod}.{pname}").to(torch.bool)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: step, masks, unit state, collectors, schedule."""
        self._require_prepared("state_dict")
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "masks": self.masks(),
            "unit_keep": {k: v.clone() for k, v in self._unit_keep.items()},
            "collectors": {cls.__name__: col.state_dict() for cls, col in self._collectors.items()},
            "schedule": self.schedule.state_dict(),
            **({"budget_target": self._planner.goal_predicted, "budget_history": list(self._planner.history),
                "budget_planned": dict(self._planner.planned)}
               if self._planner is not None else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Before :meth:`prepare` it is applied by ``prepare()``
        (instead of computing step-0 masks)."""
        if not isinstance(state, Mapping) or "step" not in state or "masks" not in state:
            raise InputError("pruner state: expected the dict written by Pruner.state_dict()")
        if not self._prepared:
            self._pending_state = state
            return
        if state.get("version") != STATE_VERSION:
            raise InputError(f"pruner state: version {state.get('version')!r} is not supported "
                             f"(expected {STATE_VERSION})")
        saved_keys = {(m, p) for m, per in state["masks"].items() for p in per}
        if saved_keys != set(self._managed):
            missing = sorted(f"{m}.{p}" for m, p in set(self._managed) - saved_keys)
            extra = sorted(f"{m}.{p}" for m, p in saved_keys - set(self._managed))
            raise MaskError(f"pruner state: masks do not match this config (missing {missing[:4]}, "
                            f"unexpected {extra[:4]}); resume with the config that made the checkpoint")
        unit_keep = state.get("unit_keep", {})
        if set(unit_keep) != set(self._unit_keep):
            raise MaskError("pruner state: pruning targets differ from this config; resume with the same config")
        for t in self._targets:
            if unit_keep[t.name].numel() != t.units:
                raise MaskError(f"pruner state: {t.name} has {unit_keep[t.name].numel()} units saved, "
                                f"{t.units} now")
        masks = {}
        for (m, p) in self._managed:
            mask = state["masks"][m][p]
            if tuple(mask.shape) != tuple(self.param(m, p).shape):
                raise MaskError(f"pruner state: mask of {m}.{p} has shape {tuple(mask.shape)}, parameter "
                                f"{tuple(self.param(m, p).shape)}")
            masks[(m, p)] = mask.to(torch.bool)
        self.schedule.load_state_dict(state.get("schedule", self.schedule.state_dict()))
        planner = self._planner
        if planner is not None and state.get("budget_target") is not None:
            planner.goal_predicted = float(state["budget_target"])
            planner.history = list(state.get("budget_history", []))
            planner.planned = {str(k): int(v) for k, v in dict(state.get("budget_planned", {})).items()}
            for t in self._budget_targets():
                if t.name in planner.planned and t.units:
                    t.final_sparsity = 1.0 - planner.planned[t.name] / t.units
        self._step = int(state["step"])
        self._unit_keep = {k: v.clone().to(torch.bool) for k, v in unit_keep.items()}
        self._write_masks(masks)
        saved_cols = state.get("collectors", {})
        for cls, col in self._collectors.items():
            if cls.__name__ in saved_cols:
                col.load_state_dict(saved_cols[cls.__name__])

    @property
    def targets(self) -> list[Target]:
        """The pruning targets built by :meth:`prepare` (read-only use)."""
        return list(self._targets)
