"""Importance criteria (the "metric" piece): turn collected data into scores; low scores are pruned.

A criterion sees the pruned tensors through *views*:

* :class:`ParamView` for element / block / n:m granularity (one parameter of one layer);
* :class:`ChannelView` for channel / head granularity: one *producer member* of a coupled
  channel group (from the finalize graph), with ``gather`` to collect the slices of each channel.

Most criteria only implement :meth:`Criterion.element_scores` (one non-negative contribution per
weight); the granularities reduce these contributions (sum over a block or a channel's slices,
then :meth:`Criterion.finish`). Channel-only criteria implement :meth:`Criterion.channel_scores`.

Adding a criterion::

    @register_criterion("l3")
    class L3(Criterion):
        def element_scores(self, view):
            return view.tensor.abs() ** 3
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, UnsupportedError
from ._util import check_keys
from .collectors import ActivationCollector, GradientCollector
from .registry import Registry

CRITERIA: Registry[type[Criterion]] = Registry("criterion", "criterion")

ALL_GRANULARITIES = ("element", "block", "n:m", "channel", "head", "channel+head")
STRUCTURED_ONLY = ("channel", "head", "channel+head")

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
)


def register_criterion(name: str, *, replace: bool = False):
    """Decorator: make a :class:`Criterion` subclass available as ``"criterion": name``."""
    return CRITERIA.register(name, replace=replace)


def seeded_generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (stable across processes and runs)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


@dataclass
class ParamView:
    """One parameter as seen by a criterion.

    tensor: the parameter's current effective (masked) value, detached.
    data: what the collectors gathered for this parameter and its module, e.g. ``"taylor"``
        (accumulated ``|w * grad|``), ``"apoz"``, ``"mean_activation"`` (per output channel).
    """

    module_name: str
    param_name: str
    module: nn.Module
    tensor: torch.Tensor
    data: Mapping[str, torch.Tensor] = field(default_factory=dict)
    seed: int = 0
    step: int = 0

    @property
    def qualified_name(self) -> str:
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    def generator(self, *extra: Any) -> torch.Generator:
        return seeded_generator(self.seed, self.qualified_name, self.step, *extra)


@dataclass
class ChannelView(ParamView):
    """A producer member of a coupled channel group: channel ``k`` owns ``indices[k]`` along ``dim``."""

    dim: int = 0
    indices: list[np.ndarray] | None = None
    size: int = 0  # number of channels (or heads) in the group
    role: str = "producer"

    def __post_init__(self) -> None:
        d = self.tensor.shape[self.dim] if self.tensor.ndim else 0
        if self.indices is None:
            if d != self.size:
                raise UnsupportedError(f"{self.qualified_name}: dim {self.dim} has {d} entries but the group has "
                                       f"{self.size} channels and no index map")
            self._index = None
        else:
            lengths = {len(ix) for ix in self.indices}
            width = max(lengths) if lengths else 0
            rows = []
            self._valid = torch.ones(self.size, max(width, 1), dtype=torch.bool)
            for k, ix in enumerate(self.indices):
                ix = np.asarray(ix, dtype=np.int64).reshape(-1)
                pad = width - len(ix)
                if pad:
                    self._valid[k, len(ix):] = False
                    ix = np.concatenate([ix, np.zeros(pad, dtype=np.int64)])
                rows.append(ix)
            self._index = torch.as_tensor(np.stack(rows)) if rows else torch.zeros(0, 0, dtype=torch.long)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like the parameter) as ``[D, L]`` with ``dim`` first."""
        moved = t.movedim(self.dim, 0) if t.ndim > 1 else t.reshape(-1, 1)
        return moved.reshape(moved.shape[0], -1)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like the parameter, or a 1-D vector along ``dim``) as ``[C, L]``:
        row ``k`` holds every entry of channel ``k`` (padding entries are 0)."""
        flat = self.rows(t)
        if self._index is None:
            return flat
        out = flat[self._index.to(flat.device)]  # [C, w, L]
        out = out * self._valid.to(device=out.device, dtype=out.dtype).unsqueeze(-1)
        return out.reshape(self.size, -1)

    def gather_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over each channel's entries (``t`` shaped like the parameter or 1-D along dim)."""
        per_row = self.rows(t).shape[1]
        summed = self.gather(t).sum(1)
        if self._index is None:
            return summed / per_row
        return summed / (self._valid.sum(1).to(device=summed.device, dtype=summed.dtype) * per_row).clamp_min(1)

    @property
    def is_norm(self) -> bool:
        return isinstance(self.module, NORM_TYPES)


class Criterion:
    """Base class of importance criteria. Higher score = more important = kept.

    Class attributes describe what the criterion needs; the pruner validates configs with them:
    ``granularities`` it supports, ``needs_data`` (activations over ``data`` batches),
    ``needs_grad`` (gradients), ``collector`` (the data-collection class, see collectors.py) and
    ``allowed_args`` (keys of ``criterion_args``).
    """

    name: ClassVar[str] = ""
    granularities: ClassVar[tuple[str, ...]] = ALL_GRANULARITIES
    needs_data: ClassVar[bool] = False
    needs_grad: ClassVar[bool] = False
    collector: ClassVar[type | None] = None
    allowed_args: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs: Any) -> None:
        self.check_args(kwargs)
        self.args = dict(kwargs)

    @classmethod
    def check_args(cls, args: Mapping[str, Any]) -> None:
        check_keys(args, cls.allowed_args, f"criterion_args ({cls.name or cls.__name__})")

    # -- element-wise criteria ----------------------------------------------------------------

    def element_scores(self, view: ParamView) -> torch.Tensor:
        """One non-negative contribution per entry of ``view.tensor`` (same shape)."""
        raise UnsupportedError(f"criterion {self.name!r} has no per-weight scores; use granularity "
                               f"{' or '.join(self.granularities)}")

    def finish(self, summed: torch.Tensor) -> torch.Tensor:
        """Map summed contributions to a score (identity; L2 takes the square root)."""
        return summed

    def block_scores(self, view: ParamView, block_size: tuple[int, ...]) -> torch.Tensor:
        """Score per block (grid shape): ``finish`` of the mean contribution in the block.

        The mean (not the sum) keeps partial edge blocks comparable with full ones.
        """
        contrib = self.element_scores(view).to(torch.float64)
        total, count = block_reduce(contrib, block_size)
        return self.finish(total / count.clamp_min(1))

    # -- channel-wise criteria ----------------------------------------------------------------

    def select_members(self, views: list[ChannelView]) -> list[ChannelView]:
        """Which producer members of a group are scored. Default: members holding a weight
        matrix/kernel (ndim >= 2); a group without one falls back to all producer members."""
        heavy = [v for v in views if v.tensor.ndim >= 2]
        return heavy or views

    def channel_scores(self, view: ChannelView) -> torch.Tensor | None:
        """Score per channel of the group from one member (``None``: member not used)."""
        contrib = self.element_scores(view).to(torch.float64)
        return self.finish(view.gather(contrib).sum(1))


def block_reduce(t: torch.Tensor, block_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of ``t`` per block and number of real entries per block (edge blocks may be partial)."""
    sizes = resolve_block_size(t.shape, block_size)
    pads = []
    for dim_len, b in zip(reversed(t.shape), reversed(sizes), strict=True):
        pads += [0, (-dim_len) % b]
    padded = torch.nn.functional.pad(t, pads)
    ones = torch.nn.functional.pad(torch.ones_like(t), pads)
    grid = [s // b for s, b in zip(padded.shape, sizes, strict=True)]
    view_shape = [x for g, b in zip(grid, sizes, strict=True) for x in (g, b)]
    reduce_dims = tuple(range(1, 2 * len(sizes), 2))
    total = padded.reshape(view_shape).sum(reduce_dims)
    count = ones.reshape(view_shape).sum(reduce_dims)
    return total, count


def resolve_block_size(shape: torch.Size | tuple[int, ...], block_size: tuple[int, ...]) -> tuple[int, ...]:
    """Block sizes for every dim of ``shape``: -1 and missing trailing dims mean the whole dim."""
    if len(block_size) > len(shape):
        raise UnsupportedError(f"block_size {list(block_size)} has more dims than the weight {list(shape)}")
    sizes = [shape[i] if (i >= len(block_size) or block_size[i] == -1) else min(block_size[i], shape[i])
             for i in range(len(shape))]
    return tuple(max(1, s) for s in sizes)


# ---------------------------------------------------------------------------------------------
# Built-in criteria


@register_criterion("l1")
class L1Norm(Criterion):
    """Magnitude: ``|w|``; a channel/block scores the L1 norm of its weights."""

    def element_scores(self, view: ParamView) -> torch.Tensor:
        return view.tensor.abs()


@register_criterion("l2")
class L2Norm(Criterion):
    """``w**2`` summed, then square-rooted: the L2 norm of a channel/block."""

    def element_scores(self, view: ParamView) -> torch.Tensor:
        return view.tensor.to(torch.float64) ** 2

    def finish(self, summed: torch.Tensor) -> torch.Tensor:
        return summed.sqrt()


@register_criterion("random")
class RandomCriterion(Criterion):
    """Uniform random scores, a baseline. Reproducible: a pure function of seed, layer and step."""

    def element_scores(self, view: ParamView) -> torch.Tensor:
        return torch.rand(view.tensor.shape, generator=view.generator(), dtype=torch.float64)

    def channel_scores(self, view: ChannelView) -> torch.Tensor | None:
        return torch.rand(view.size, generator=view.generator("channels"), dtype=torch.float64)


@register_criterion("fpgm")
class FPGM(Criterion):
    """Filter pruning via geometric median (He et al., 2019): a filter close to all the others is
    redundant. Score = sum of Euclidean distances from a filter to every other filter."""

    granularities = STRUCTURED_ONLY

    def channel_scores(self, view: ChannelView) -> torch.Tensor | None:
        vectors = view.gather(view.tensor.to(torch.float64))
        return torch.cdist(vectors, vectors).sum(1)


@register_criterion("bn_scale")
class BatchNormScale(Criterion):
    """Network slimming (Liu et al., 2017): ``|gamma|`` of the normalization layer(s) in the
    channel's group (the BatchNorm following the conv). Groups without one are not pruned."""

    granularities = ("channel",)

    def select_members(self, views: list[ChannelView]) -> list[ChannelView]:
        return [v for v in views if v.is_norm and v.param_name == "weight"]

    def channel_scores(self, view: ChannelView) -> torch.Tensor | None:
        return view.gather_mean(view.tensor.abs().to(torch.float64))


@register_criterion("taylor")
class TaylorFirstOrder(Criterion):
    """First-order Taylor expansion of the loss (Molchanov et al., 2019): ``|w * dL/dw|``,
    averaged over the batches seen (``data`` with ``loss_fn``, or the training steps)."""

    needs_grad = True
    collector = GradientCollector

    def element_scores(self, view: ParamView) -> torch.Tensor:
        acc = view.data.get("taylor")
        if acc is None:
            raise UnsupportedError(f"{view.qualified_name}: no gradient was collected for the taylor criterion")
        return acc.to(torch.float64)


class _ActivationCriterion(Criterion):
    granularities = ("channel",)
    needs_data = True
    collector = ActivationCollector
    allowed_args = ("activation",)
    statistic = ""

    @classmethod
    def check_args(cls, args: Mapping[str, Any]) -> None:
        super().check_args(args)
        act = args.get("activation", "relu")
        if act not in ("relu", "none"):
            raise ConfigError(f"criterion_args ({cls.name}).activation: expected 'relu' or 'none', got {act!r}")

    def _key(self) -> str:
        act = self.args.get("activation", "relu")
        return f"{self.statistic}:{act}"

    def select_members(self, views: list[ChannelView]) -> list[ChannelView]:
        # The activation that follows a conv is usually the one after its normalization layer.
        with_stats = [v for v in views if self._key() in v.data]
        norms = [v for v in with_stats if v.is_norm]
        return norms or with_stats

    def channel_scores(self, view: ChannelView) -> torch.Tensor | None:
        stat = view.data.get(self._key())
        if stat is None or stat.numel() != view.tensor.shape[view.dim]:
            return None
        return self.transform(view.gather_mean(stat.to(torch.float64)))

    def transform(self, stat: torch.Tensor) -> torch.Tensor:
        return stat


@register_criterion("apoz")
class APoZ(_ActivationCriterion):
    """Average percentage of zeros of a channel's activation over ``data`` (Hu et al., 2016).
    Score = 1 - APoZ (channels that are mostly zero are pruned)."""

    statistic = "apoz"

    def transform(self, stat: torch.Tensor) -> torch.Tensor:
        return 1.0 - stat


@register_criterion("mean_activation")
class MeanActivation(_ActivationCriterion):
    """Mean activation of a channel over ``data`` (Molchanov et al., 2017); low means prunable."""

    statistic = "mean"
