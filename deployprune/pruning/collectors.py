"""Data collection (the first of the three pieces): what criteria need besides the weights.

* :class:`GradientCollector` accumulates ``|w * dL/dw|`` for the Taylor criterion, either during
  training (at each ``Pruner.step()``, from the gradients the optimizer just used) or, when none
  were seen, over ``data_batches`` batches of ``data`` with ``loss_fn``.
* :class:`ActivationCollector` runs ``data_batches`` batches of ``data`` through the model (eval
  mode, no grad) with forward hooks and keeps per-output-channel statistics (APoZ, mean).

A collector returns ``{(module_name, param_name or None): {key: tensor}}``; the pruner hands each
criterion view the entries of its parameter and of its module.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import InputError, UsageError

log = logging.getLogger(__name__)

Key = tuple[str, "str | None"]


def split_batch(batch: Any) -> tuple[tuple, dict, Any]:
    """``(args, kwargs, target)`` from one batch of ``data``.

    A tensor is the input; a tuple/list is ``(inputs, target, ...)`` whose first item is the input
    (or a tuple of inputs); a dict is passed as keyword arguments.
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        args = tuple(first) if isinstance(first, (tuple, list)) else (first,)
        target = batch[1] if len(batch) > 1 else None
        return args, {}, target
    if isinstance(batch, Mapping):
        return (), dict(batch), None
    raise InputError(f"data: cannot read a batch of type {type(batch).__name__}; yield tensors, "
                     "(inputs, target) pairs or dicts of keyword arguments")


def iter_batches(data: Iterable[Any] | None, limit: int, who: str) -> Iterable[Any]:
    if data is None:
        raise UsageError(f"{who}: needs data; pass data=<iterable of batches> to Pruner")
    n = 0
    for batch in data:
        if n >= limit:
            break
        n += 1
        yield batch
    if n == 0:
        raise InputError(f"{who}: data yielded no batches (an exhausted iterator? pass a list or a DataLoader)")


def leaf_parameter(module: nn.Module, name: str) -> torch.Tensor:
    """The trainable tensor behind ``module.<name>`` (the original under a parametrization)."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return module._parameters[name]


class Collector:
    """Base class. ``on_step`` runs at every ``Pruner.step()``; ``collect`` before a mask update."""

    def __init__(self, pruner: Any) -> None:
        self.pruner = pruner

    def on_step(self, keys: list[Key]) -> None:
        pass

    def collect(self, keys: list[Key]) -> dict[Key, dict[str, torch.Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def reset(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class GradientCollector(Collector):
    """Mean of ``|w * grad|`` per parameter since the last mask update."""

    def __init__(self, pruner: Any) -> None:
        super().__init__(pruner)
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def _add(self, key: Key, weight: torch.Tensor, grad: torch.Tensor) -> None:
        name = f"{key[0]}\x1f{key[1]}"
        contrib = (weight.detach() * grad.detach()).abs().to(torch.float64).cpu()
        if name in self.sums:
            self.sums[name] += contrib
        else:
            self.sums[name] = contrib

    def on_step(self, keys: list[Key]) -> None:
        seen = False
        for mod_name, pname in keys:
            module = self.pruner.model.get_submodule(mod_name)
            leaf = leaf_parameter(module, pname)
            if leaf.grad is None:
                continue
            self._add((mod_name, pname), getattr(module, pname), leaf.grad)
            seen = True
        if seen:
            self.count += 1

    def _from_data(self, keys: list[Key]) -> None:
        pruner = self.pruner
        if pruner.loss_fn is None:
            raise UsageError("taylor criterion: no gradients seen during training yet and no loss_fn; pass "
                             "data= and loss_fn= to Pruner, or call pruner.step() after optimizer.step()")
        model = pruner.model
        modules = [model.get_submodule(m) for m, _ in keys]
        leaves = [leaf_parameter(mod, p) for mod, (_, p) in zip(modules, keys, strict=True)]
        was_training = model.training
        model.eval()
        try:
            for batch in iter_batches(pruner.data, pruner.config.data_batches, "taylor criterion"):
                args, kwargs, target = split_batch(batch)
                with torch.enable_grad():
                    out = model(*args, **kwargs)
                    loss = pruner.loss_fn(out, target) if target is not None else pruner.loss_fn(out)
                    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                with torch.no_grad():
                    for key, mod, g in zip(keys, modules, grads, strict=True):
                        if g is not None:
                            self._add(key, getattr(mod, key[1]), g)
                self.count += 1
        finally:
            model.train(was_training)

    def collect(self, keys: list[Key]) -> dict[Key, dict[str, torch.Tensor]]:
        if self.count == 0:
            if self.pruner.data is None:
                raise UsageError("taylor criterion: no gradients seen yet; call pruner.step() after "
                                 "loss.backward() and optimizer.step(), or pass data= and loss_fn= to Pruner")
            self._from_data(keys)
        out: dict[Key, dict[str, torch.Tensor]] = {}
        for key in keys:
            name = f"{key[0]}\x1f{key[1]}"
            if name in self.sums:
                out[key] = {"taylor": self.sums[name] / self.count}
        return out

    def reset(self) -> None:
        self.sums.clear()
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sums": {k: v.clone() for k, v in self.sums.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        self.sums = {k: v.clone() for k, v in state.get("sums", {}).items()}


def channel_axis(module: nn.Module, out: torch.Tensor, channels: int) -> int | None:
    """The axis of ``out`` holding the module's ``channels`` output channels."""
    if out.ndim == 0:
        return None
    first_axis_types = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                        nn.modules.instancenorm._InstanceNorm)
    if isinstance(module, first_axis_types) and out.ndim >= 2 and out.shape[1] == channels:
        return 1
    if out.shape[-1] == channels:
        return out.ndim - 1
    if out.ndim >= 2 and out.shape[1] == channels:
        return 1
    return None


class ActivationCollector(Collector):
    """Per-output-channel activation statistics over ``data_batches`` batches of ``data``.

    Keys per module: ``apoz:relu`` (fraction of outputs <= 0, i.e. zero after a ReLU),
    ``apoz:none`` (fraction exactly 0), ``mean:relu`` (mean of relu(output)), ``mean:none``.
    ``keys`` name ``(module, param)`` pairs; the statistics are indexed like that parameter's
    output-channel dim (the pruner asks for producer modules only).
    """

    def collect(self, keys: list[Key]) -> dict[Key, dict[str, torch.Tensor]]:
        pruner = self.pruner
        model = pruner.model
        wanted: dict[str, int] = {}
        for mod_name, pname in keys:
            module = model.get_submodule(mod_name)
            p = getattr(module, pname, None)
            if isinstance(p, torch.Tensor) and p.ndim >= 1:
                dim = pruner.output_dim_of(mod_name, pname)
                wanted.setdefault(mod_name, p.shape[dim])
        stats: dict[str, dict[str, torch.Tensor]] = {}
        warned: set[str] = set()

        def make_hook(name: str, channels: int):
            def hook(module: nn.Module, _inp: Any, out: Any) -> None:
                if not isinstance(out, torch.Tensor):
                    if name not in warned:
                        log.debug("%s: output is not a tensor; no activation statistics", name)
                        warned.add(name)
                    return
                axis = channel_axis(module, out, channels)
                if axis is None:
                    if name not in warned:
                        log.debug("%s: no axis of size %d in output %s", name, channels, tuple(out.shape))
                        warned.add(name)
                    return
                x = out.detach().movedim(axis, 0).reshape(channels, -1).to(torch.float64)
                if name not in stats:
                    stats[name] = {k: torch.zeros(channels, dtype=torch.float64) for k in ("le0", "eq0", "relu", "sum")}
                    stats[name]["n"] = torch.zeros((), dtype=torch.float64)
                s = stats[name]
                s["le0"] += (x <= 0).sum(1)
                s["eq0"] += (x == 0).sum(1)
                s["relu"] += x.clamp_min(0).sum(1)
                s["sum"] += x.sum(1)
                s["n"] += x.shape[1]

            return hook

        handles = [model.get_submodule(n).register_forward_hook(make_hook(n, c)) for n, c in wanted.items()]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in iter_batches(pruner.data, pruner.config.data_batches, "activation criterion"):
                    args, kwargs, _ = split_batch(batch)
                    model(*args, **kwargs)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        out: dict[Key, dict[str, torch.Tensor]] = {}
        for mod_name, pname in keys:
            s = stats.get(mod_name)
            if s is None:
                continue
            n = s["n"].clamp_min(1)
            out[(mod_name, pname)] = {
                "apoz:relu": s["le0"] / n, "apoz:none": s["eq0"] / n,
                "mean:relu": s["relu"] / n, "mean:none": s["sum"] / n,
            }
        return out
