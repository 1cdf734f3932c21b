"""Pruning configuration: validated dataclasses loadable from dict, JSON, YAML or an NNI config_list.

Precedence (the most specific wins, whole configs are replaced, never merged field by field,
as in coremltools and NNI): ``global_config`` (supported layer types) < ``module_type_configs``
< ``module_name_configs`` (regex, full match) < ``config_list`` entries in order. A ``None``
config means "do not prune" and can be overridden by a more specific one; ``exclude`` (regexes),
NNI ``exclude`` entries and ``exclude_last_layer`` always win.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .._imports import load_yaml
from ..errors import ConfigError
from ._util import check_fraction, check_int, check_keys, field_names
from .schedules import Schedule, build_schedule

#: Layer types a ``global_config`` (or an NNI entry without ``op_types``) applies to.
DEFAULT_OP_TYPES: tuple[str, ...] = (
    "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
)

GRANULARITIES = ("element", "channel", "block", "n:m", "head", "channel+head")
#: "channel+head": each coupled group by its own unit (attention-head groups by head, the others by channel)
STRUCTURED = ("channel", "head", "channel+head")

_GRANULARITY_ALIASES = {
    "element": "element", "per_scalar": "element", "default": "element", "unstructured": "element",
    "fine_grained": "element", "fine-grained": "element", "per_element": "element",
    "channel": "channel", "out_channel": "channel", "per_channel": "channel", "filter": "channel",
    "output_channel": "channel", "structured": "channel",
    "block": "block",
    "n:m": "n:m", "nm": "n:m", "n_m": "n:m",
    "head": "head", "heads": "head", "attention_head": "head",
    "channel+head": "channel+head", "head+channel": "channel+head", "channel_and_head": "channel+head",
}


def canonical_granularity(value: Any, where: str) -> tuple[str, tuple[int, int] | None]:
    """Normalize a granularity spelling; ``"2:4"`` also yields its n:m ratio."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected one of {list(GRANULARITIES)}, got {value!r}")
    key = value.strip().lower()
    m = re.fullmatch(r"(\d+)\s*:\s*(\d+)", key)
    if m:
        return "n:m", (int(m.group(1)), int(m.group(2)))
    if key not in _GRANULARITY_ALIASES:
        if key == "in_channel":
            raise ConfigError(f"{where}: 'in_channel' granularity is not supported; prune output channels "
                              "('channel'): the input side follows from the coupled groups")
        raise ConfigError(f"{where}: unknown granularity {value!r}; choose one of {list(GRANULARITIES)} "
                          "(or 'N:M' such as '2:4')")
    return _GRANULARITY_ALIASES[key], None


@dataclass
class ModuleConfig:
    """How one layer is pruned.

    target_sparsity: fraction of the layer's units (elements, blocks, channels, heads) removed at
        the end of the schedule, in [0, 1). Default 0.5; for n:m it defaults to n/m.
    granularity: ``element`` | ``channel`` (output channels, dependency-aware) | ``block`` |
        ``n:m`` | ``head`` (attention heads, dependency-aware); ``"2:4"`` is a shorthand for n:m.
    criterion: registry name: l1, l2, fpgm, bn_scale, taylor, apoz, mean_activation, random, or yours.
    criterion_args: keyword arguments for the criterion (e.g. ``{"activation": "relu"}`` for apoz).
    block_size: block shape over the leading weight dims (``[2, 2]``; -1 = the whole dim).
    n_m_ratio: ``[n, m]``: n of every m consecutive weights along the input dim are zeroed.
    round_to: keep a multiple of this many channels/heads (structured only).
    max_sparsity: per-layer cap; used by global ranking (``global_group``), caps per-layer targets.
    global_group: layers sharing a group name are ranked together (model-wide importance ranking);
        their common ``target_sparsity`` applies to the group's total.
    params: parameters masked for element/block/n:m granularity (default ``["weight"]``).
    """

    target_sparsity: float | None = None
    granularity: str = "element"
    criterion: str = "l1"
    criterion_args: dict[str, Any] = field(default_factory=dict)
    block_size: tuple[int, ...] | None = None
    n_m_ratio: tuple[int, int] | None = None
    round_to: int = 1
    max_sparsity: float | None = None
    global_group: str | None = None
    params: tuple[str, ...] = ("weight",)

    def __post_init__(self) -> None:
        where = "config"
        gran, nm = canonical_granularity(self.granularity, f"{where}.granularity")
        if nm is not None:
            if self.n_m_ratio is not None and tuple(self.n_m_ratio) != nm:
                raise ConfigError(f"{where}: granularity {self.granularity!r} contradicts n_m_ratio {self.n_m_ratio}")
            self.n_m_ratio = nm
        self.granularity = gran
        if gran == "n:m":
            if self.n_m_ratio is None:
                raise ConfigError(f"{where}: granularity 'n:m' needs n_m_ratio, e.g. [2, 4]")
            if not isinstance(self.n_m_ratio, Sequence) or len(self.n_m_ratio) != 2:
                raise ConfigError(f"{where}.n_m_ratio: expected [n, m], got {self.n_m_ratio!r}")
            n = check_int(self.n_m_ratio[0], f"{where}.n_m_ratio n", minimum=1)
            m = check_int(self.n_m_ratio[1], f"{where}.n_m_ratio m", minimum=2)
            if n >= m:
                raise ConfigError(f"{where}.n_m_ratio: n must be smaller than m (n of every m weights are zeroed), "
                                  f"got {n}:{m}")
            self.n_m_ratio = (n, m)
            if self.target_sparsity is None:
                self.target_sparsity = n / m
            elif abs(float(self.target_sparsity) - n / m) > 1e-9:
                raise ConfigError(f"{where}: target_sparsity {self.target_sparsity} contradicts n:m {n}:{m} "
                                  f"(sparsity {n / m:g}); drop target_sparsity")
        elif self.n_m_ratio is not None:
            raise ConfigError(f"{where}: n_m_ratio is only used with granularity 'n:m' (got {gran!r})")
        if self.target_sparsity is None:
            self.target_sparsity = 0.5
        self.target_sparsity = check_fraction(self.target_sparsity, f"{where}.target_sparsity")
        if gran == "block":
            if self.block_size is None:
                raise ConfigError(f"{where}: granularity 'block' needs block_size, e.g. [2, 2]")
            if isinstance(self.block_size, int) or not isinstance(self.block_size, Sequence) or not self.block_size:
                raise ConfigError(f"{where}.block_size: expected a list of block sizes, got {self.block_size!r}")
            sizes = []
            for b in self.block_size:
                b = check_int(b, f"{where}.block_size")
                if b == 0 or b < -1:
                    raise ConfigError(f"{where}.block_size: sizes must be >= 1 (or -1 for a whole dim), got {b}")
                sizes.append(b)
            self.block_size = tuple(sizes)
        elif self.block_size is not None:
            raise ConfigError(f"{where}: block_size is only used with granularity 'block' (got {gran!r})")
        if not isinstance(self.criterion, str) or not self.criterion:
            raise ConfigError(f"{where}.criterion: expected a criterion name, got {self.criterion!r}")
        from .criteria import CRITERIA  # local import: criteria imports torch-heavy helpers

        crit_cls = CRITERIA.get(self.criterion)
        self.criterion = self.criterion.lower()
        if gran not in crit_cls.granularities:
            raise ConfigError(f"{where}: criterion {self.criterion!r} does not support granularity {gran!r}; "
                              f"it supports {list(crit_cls.granularities)}")
        if not isinstance(self.criterion_args, Mapping):
            raise ConfigError(f"{where}.criterion_args: expected a mapping, got {self.criterion_args!r}")
        self.criterion_args = dict(self.criterion_args)
        crit_cls.check_args(self.criterion_args)
        self.round_to = check_int(self.round_to, f"{where}.round_to", minimum=1)
        if self.round_to > 1 and gran not in STRUCTURED:
            raise ConfigError(f"{where}: round_to only applies to channel/head granularity (got {gran!r})")
        if self.max_sparsity is not None:
            self.max_sparsity = check_fraction(self.max_sparsity, f"{where}.max_sparsity", allow_one=False)
        if self.global_group is not None:
            self.global_group = str(self.global_group)
            if gran == "n:m":
                raise ConfigError(f"{where}: n:m fixes every layer's sparsity at n/m; global_group does not apply")
        if isinstance(self.params, str):
            self.params = (self.params,)
        if not isinstance(self.params, Sequence) or not self.params or not all(isinstance(p, str) for p in self.params):
            raise ConfigError(f"{where}.params: expected a list of parameter names, got {self.params!r}")
        self.params = tuple(self.params)

    @property
    def structured(self) -> bool:
        return self.granularity in STRUCTURED

    @property
    def effective_target(self) -> float:
        t = float(self.target_sparsity)  # type: ignore[arg-type]
        if self.max_sparsity is not None and self.global_group is None:
            t = min(t, self.max_sparsity)
        return t

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | ModuleConfig | None, where: str = "config") -> ModuleConfig:
        if isinstance(data, ModuleConfig):
            return data
        if data is None:
            return cls()
        check_keys(data, field_names(cls), where)
        try:
            return cls(**dict(data))
        except ConfigError as exc:
            msg = str(exc)
            raise ConfigError(msg.replace("config", where, 1) if msg.startswith("config") else f"{where}: {msg}") \
                from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in field_names(type(self)):
            v = getattr(self, name)
            out[name] = list(v) if isinstance(v, tuple) else v
        return out


# ---------------------------------------------------------------------------------------------
# Rules (NNI config_list entries, and the compiled form of type/name configs)


@dataclass
class Rule:
    """One selector with the config it assigns (None = not pruned) or an absolute exclusion."""

    op_types: tuple[str, ...] | None = None
    op_names: tuple[str, ...] | None = None  # exact names
    op_names_re: tuple[str, ...] | None = None  # regexes, full match
    op_partial_names: tuple[str, ...] | None = None  # substrings
    exclude_op_names: tuple[str, ...] = ()
    exclude_op_names_re: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    exclude: bool = False
    config: ModuleConfig | None = None
    where: str = "config_list"
    default_types: bool = False  # op_types None means DEFAULT_OP_TYPES (True) or any type (False)


NNI_SPARSITY_KEYS = ("sparse_ratio", "sparsity", "sparsity_per_layer", "total_sparsity")
NNI_KEYS = (
    "op_types", "op_names", "op_names_re", "op_partial_names", "exclude", "exclude_op_names",
    "exclude_op_names_re", "exclude_op_types", *NNI_SPARSITY_KEYS, "max_sparse_ratio",
    "max_sparsity_per_layer", "global_group_id", "target_names", "dependency_group_id",
)


def _str_tuple(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, type):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, type):
            v = v.__name__
        if not isinstance(v, str):
            raise ConfigError(f"{where}: expected a list of strings, got element {v!r}")
        out.append(v)
    return tuple(out)


def _check_regexes(patterns: Sequence[str], where: str) -> None:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise ConfigError(f"{where}: invalid regular expression {p!r} ({exc})") from None


def nni_entry_to_rule(entry: Mapping[str, Any], index: int) -> Rule:
    """Translate one NNI config_list entry (v2 or v3 keys, plus native ModuleConfig keys)."""
    where = f"config_list[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a dict, got {type(entry).__name__}")
    module_keys = field_names(ModuleConfig)
    check_keys(entry, [*NNI_KEYS, *module_keys], where)
    sel: dict[str, Any] = {}
    for key in ("op_types", "op_names", "op_names_re", "op_partial_names"):
        if key in entry and entry[key] is not None:
            sel[key] = _str_tuple(entry[key], f"{where}.{key}")
    for key in ("exclude_op_names", "exclude_op_names_re", "exclude_op_types"):
        if key in entry and entry[key] is not None:
            sel[key] = _str_tuple(entry[key], f"{where}.{key}")
    for key in ("op_names_re", "exclude_op_names_re"):
        if key in sel:
            _check_regexes(sel[key], f"{where}.{key}")
    types = sel.get("op_types")
    default_types = types is None or "default" in types
    if types is not None:
        types = tuple(t for t in types if t != "default") or None
        sel["op_types"] = types
    exclude = entry.get("exclude", False)
    if not isinstance(exclude, bool):
        raise ConfigError(f"{where}.exclude: expected true/false, got {exclude!r}")
    given_sparsity = [k for k in (*NNI_SPARSITY_KEYS, "target_sparsity") if k in entry]
    if exclude:
        extra = [k for k in entry if k not in ("op_types", "op_names", "op_names_re", "op_partial_names", "exclude")]
        if extra:
            raise ConfigError(f"{where}: an 'exclude' entry only selects layers; remove {extra}")
        return Rule(exclude=True, where=where, default_types=default_types and types is None, **sel)
    if len(given_sparsity) > 1:
        raise ConfigError(f"{where}: give only one of {given_sparsity}")
    mod: dict[str, Any] = {k: entry[k] for k in module_keys if k in entry}
    if given_sparsity:
        key = given_sparsity[0]
        mod["target_sparsity"] = entry[key]
        if key == "total_sparsity":
            mod.setdefault("global_group", f"config_list[{index}]")
    for key in ("max_sparse_ratio", "max_sparsity_per_layer"):
        if key in entry:
            if "max_sparsity" in mod:
                raise ConfigError(f"{where}: give only one of max_sparsity/max_sparse_ratio/max_sparsity_per_layer")
            mod["max_sparsity"] = entry[key]
    if "global_group_id" in entry:
        mod["global_group"] = f"global_group_id={entry['global_group_id']}"
    if "target_names" in entry:
        names = _str_tuple(entry["target_names"], f"{where}.target_names")
        bad = [n for n in names if n.startswith("_")]
        if bad:
            raise ConfigError(f"{where}.target_names: {bad} are module inputs/outputs; only parameters "
                              "(e.g. 'weight', 'bias') can be pruned")
        mod["params"] = names
    gran = mod.get("granularity")
    if isinstance(gran, (list, tuple)):
        mod["granularity"] = "block"
        mod["block_size"] = tuple(gran)
    try:
        config = ModuleConfig.from_dict(mod, where)
    except ConfigError:
        raise
    return Rule(config=config, where=where, default_types=default_types and types is None, **sel)


def nni_config_list(entries: Sequence[Mapping[str, Any]]) -> list[Rule]:
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise ConfigError(f"config_list: expected a list of dicts, got {type(entries).__name__}")
    return [nni_entry_to_rule(e, i) for i, e in enumerate(entries)]


# ---------------------------------------------------------------------------------------------


@dataclass
class PrunerConfig:
    """Everything a :class:`~deployprune.pruning.Pruner` needs besides the model.

    global_config: applied to every supported layer type (Linear, Conv*, ConvTranspose*).
    module_type_configs: ``{"Conv2d": {...}, "Linear": None}``; a type name matches subclasses.
    module_name_configs: ``{"layer1\\\\..*": {...}}``; regexes fully matching module names.
    config_list: NNI-style entries, applied last, in order.
    exclude: regexes of module names never pruned.
    exclude_last_layer: keep the layer(s) producing the model output dense (element/block/n:m;
        channel/head pruning never touches output channels: the graph marks them unprunable).
    schedule: ``{"type": "constant" | "polynomial" | "linear" | "callable", ...}`` or a Schedule.
    allocator: sparsity allocator registry name.
    seed: seed for the random criterion (masks are a pure function of seed, layer and step).
    data_batches: batches of ``data`` read by data-driven criteria at each mask update.
    mask_consumers: also zero consumers' input columns of removed channels (off: finalize removes them).
    score_normalization: how a coupled group combines its members' channel scores: each member's
        scores are divided by their ``mean`` (default) or ``max`` (or used raw: ``none``), then
        averaged over the members.
    budget: prune channel/head groups to a latency, MACs or parameter budget instead of their
        ``target_sparsity`` (``{"latency": 0.5}``, ``{"macs": "40%"}``, ``"latency=2.5ms"``; see
        docs/pruning.md, "Pruning to a budget").
    """

    global_config: ModuleConfig | None = None
    module_type_configs: dict[str, ModuleConfig | None] = field(default_factory=dict)
    module_name_configs: dict[str, ModuleConfig | None] = field(default_factory=dict)
    config_list: list[Rule] = field(default_factory=list)
    exclude: tuple[str, ...] = ()
    exclude_last_layer: bool = False
    schedule: Schedule = field(default_factory=lambda: build_schedule(None))
    allocator: str = "default"
    seed: int = 0
    data_batches: int = 8
    mask_consumers: bool = False
    score_normalization: str = "mean"
    budget: Any = None  # a Budget, {"latency": 0.5, ...} or "latency=0.5x" (see pruning/budget.py)

    def __post_init__(self) -> None:
        if self.global_config is not None:
            self.global_config = ModuleConfig.from_dict(self.global_config, "global_config")
        self.module_type_configs = _config_map(self.module_type_configs, "module_type_configs", regex=False)
        self.module_name_configs = _config_map(self.module_name_configs, "module_name_configs", regex=True)
        rules = []
        for i, r in enumerate(self.config_list):
            if isinstance(r, Rule):
                rules.append(r)
            else:
                rules.append(nni_entry_to_rule(r, i))
        self.config_list = rules
        self.exclude = _str_tuple(self.exclude, "exclude")
        _check_regexes(self.exclude, "exclude")
        if not isinstance(self.exclude_last_layer, bool):
            raise ConfigError(f"exclude_last_layer: expected true/false, got {self.exclude_last_layer!r}")
        self.schedule = build_schedule(self.schedule)
        from .allocation import ALLOCATORS

        ALLOCATORS.get(self.allocator)
        self.seed = check_int(self.seed, "seed")
        self.data_batches = check_int(self.data_batches, "data_batches", minimum=1)
        if not isinstance(self.mask_consumers, bool):
            raise ConfigError(f"mask_consumers: expected true/false, got {self.mask_consumers!r}")
        from .budget import budget_from_config

        self.budget = budget_from_config(self.budget)
        if self.score_normalization not in ("mean", "max", "none"):
            raise ConfigError(f"score_normalization: expected one of mean, max, none; "
                              f"got {self.score_normalization!r}")

    def check_selects_something(self) -> PrunerConfig:
        """ConfigError when no layer config is set at all. Checked when a config is used (``coerce``,
        the Pruner), not when it is built: coremltools-style code starts from ``PrunerConfig(schedule=...)``
        and adds ``set_module_type(...)`` afterwards."""
        if (self.global_config is None and not self.module_type_configs and not self.module_name_configs
                and not self.config_list):
            raise ConfigError("config: nothing to prune; set global_config, module_type_configs, "
                              "module_name_configs or config_list (e.g. {\"target_sparsity\": 0.5})")
        return self

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrunerConfig:
        """Native dict. ModuleConfig keys at the top level are a shorthand for ``global_config``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
        own = field_names(cls)
        module_keys = field_names(ModuleConfig)
        check_keys(data, [*own, *[k for k in module_keys if k not in own]], "config")
        kwargs = {k: v for k, v in data.items() if k in own}
        shorthand = {k: v for k, v in data.items() if k not in own}
        if shorthand:
            if kwargs.get("global_config") is not None:
                raise ConfigError(f"config: {sorted(shorthand)} given both at the top level and in global_config; "
                                  "put them in global_config")
            kwargs["global_config"] = ModuleConfig.from_dict(shorthand, "config")
        return cls(**kwargs)

    @classmethod
    def from_nni(cls, config_list: Sequence[Mapping[str, Any]], **options: Any) -> PrunerConfig:
        """An NNI ``config_list`` (plus optional PrunerConfig keys such as ``schedule``)."""
        return cls(config_list=nni_config_list(config_list), **options)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrunerConfig:
        """From a ``.json`` / ``.yaml`` / ``.yml`` file (a dict, or an NNI list)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: cannot parse config (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
        suffix = p.suffix.lower()
        try:
            if suffix == ".json":
                data = json.loads(text)
            elif suffix in (".yaml", ".yml"):

                data = load_yaml(text)
            else:
                raise ConfigError(f"{p}: unknown config format {suffix!r}; use .json, .yaml or .yml")
        except (json.JSONDecodeError, ValueError) as exc:
            raise ConfigError(f"{p}: cannot parse config ({str(exc).splitlines()[0]})") from None
        except Exception as exc:  # yaml.YAMLError and friends
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{p}: cannot parse config ({str(exc).splitlines()[0]})") from None
        try:
            return cls.coerce(data)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None

    @classmethod
    def coerce(cls, config: Any) -> PrunerConfig:
        """Accept a PrunerConfig, a dict, an NNI list, or a path to a JSON/YAML file."""
        if isinstance(config, PrunerConfig):
            return config.check_selects_something()
        if isinstance(config, ModuleConfig):
            return cls(global_config=config)
        if isinstance(config, (str, os.PathLike)):
            return cls.load(config)  # coerces what the file holds
        if isinstance(config, Mapping):
            return cls.from_dict(config).check_selects_something()
        if isinstance(config, Sequence):
            return cls.from_nni(config).check_selects_something()
        raise ConfigError(f"config: expected a dict, an NNI config_list, a PrunerConfig or a .json/.yaml path, "
                          f"got {type(config).__name__}")

    # -- coremltools-style builders --------------------------------------------------------------

    def set_global(self, config: ModuleConfig | Mapping[str, Any] | None) -> PrunerConfig:
        return replace(self, global_config=config)

    def set_module_type(self, module_type: str | type, config: ModuleConfig | Mapping[str, Any] | None
                        ) -> PrunerConfig:
        name = module_type.__name__ if isinstance(module_type, type) else str(module_type)
        return replace(self, module_type_configs={**self.module_type_configs, name: config})

    def set_module_name(self, pattern: str, config: ModuleConfig | Mapping[str, Any] | None) -> PrunerConfig:
        return replace(self, module_name_configs={**self.module_name_configs, pattern: config})

    def rules(self) -> list[Rule]:
        """All selectors in precedence order (later wins)."""
        out: list[Rule] = []
        if self.global_config is not None:
            out.append(Rule(config=self.global_config, where="global_config", default_types=True))
        for tname, cfg in self.module_type_configs.items():
            out.append(Rule(op_types=(tname,), config=cfg, where=f"module_type_configs[{tname!r}]"))
        for pattern, cfg in self.module_name_configs.items():
            out.append(Rule(op_names_re=(pattern,), config=cfg, where=f"module_name_configs[{pattern!r}]"))
        out.extend(self.config_list)
        if self.exclude:
            out.append(Rule(op_names_re=self.exclude, exclude=True, where="exclude"))
        return out


def _config_map(value: Any, where: str, *, regex: bool) -> dict[str, ModuleConfig | None]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping {{name: config}}, got {type(value).__name__}")
    out: dict[str, ModuleConfig | None] = {}
    for key, cfg in value.items():
        name = key.__name__ if isinstance(key, type) else key
        if not isinstance(name, str):
            raise ConfigError(f"{where}: keys must be strings, got {key!r}")
        if regex:
            _check_regexes([name], where)
        out[name] = None if cfg is None else ModuleConfig.from_dict(cfg, f"{where}[{name!r}]")
    return out
