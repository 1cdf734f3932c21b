"""Fold eval-mode BatchNorm into the convolution (or linear layer) that feeds it.

Exports of sparse weights keep BatchNorm as a separate op unless it is folded first, and the
Core ML read-back verification compares stored constants with torch weights, so both need the
folded weights. Folding keeps every zero of the weight a zero (it only scales output channels).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ._common import parity, run_torch

log = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: Folding changes float rounding only; anything above this (relative to the output scale)
#: means a pair was not really "conv feeds only this BN" and the fold is undone.
FOLD_TOLERANCE = 1e-4


def fold_batchnorm(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None) -> nn.Module:
    """Return an eval-mode copy of ``model`` with every foldable BatchNorm merged into its producer.

    A BatchNorm is folded when its input is the output of a Conv*/ConvTranspose* (or a Linear
    feeding a BatchNorm1d) that nothing else consumes, both modules are called once, and the
    BatchNorm has running statistics. Pairs are found with torch.fx when the model traces, else
    by watching one forward pass on ``example_inputs`` (hooks). With ``example_inputs`` the
    result is checked against the original (relative error <= 1e-4); a pair that breaks parity
    is left unfolded. The folded BatchNorm becomes ``nn.Identity``; ``model`` is not modified.
    """
    return fold_batchnorm_pairs(model, example_inputs)[0]


def fold_batchnorm_pairs(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None
                         ) -> tuple[nn.Module, list[tuple[str, str]]]:
    """:func:`fold_batchnorm` plus the ``(producer, batchnorm)`` module names that were folded."""
    work = copy.deepcopy(model).eval()
    inputs = tuple(example_inputs) if example_inputs is not None else None
    pairs = _pairs_fx(work)
    if pairs is None:
        if inputs is None:
            log.info("fold_batchnorm: %s does not trace with torch.fx and no example inputs were "
                     "given; BatchNorm left unfolded", type(model).__name__)
            return work, []
        pairs = _pairs_hooks(work, inputs)
    pairs = [p for p in pairs if _foldable(work, *p, have_inputs=inputs is not None)]
    if not pairs:
        return work, []
    if inputs is None:
        return _apply(work, pairs), pairs
    reference = run_torch(model, inputs)
    folded = _apply(copy.deepcopy(work), pairs)
    if _close(reference, run_torch(folded, inputs)):
        return folded, pairs
    # Some pair is not a private conv -> BN edge: keep only those that hold parity on their own.
    kept = [p for p in pairs if _close(reference, run_torch(_apply(copy.deepcopy(work), [p]), inputs))]
    folded = _apply(copy.deepcopy(work), kept)
    if not _close(reference, run_torch(folded, inputs)):  # pragma: no cover - defensive
        log.warning("fold_batchnorm: folding changed the output of %s; BatchNorm left unfolded",
                    type(model).__name__)
        return work, []
    return folded, kept


def _close(reference: list, actual: list) -> bool:
    rel, _ = parity(reference, actual)
    return rel <= FOLD_TOLERANCE


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]] | None:
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # data-dependent Python, unsupported constructs, ...
        log.debug("fold_batchnorm: torch.fx cannot trace %s (%s); using hooks",
                  type(model).__name__, exc)
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BNS):
            continue
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        producer = node.args[0]
        if producer.op != "call_module" or len(producer.users) != 1:
            continue
        if calls.get(producer.target) != 1 or calls.get(node.target) != 1:
            continue
        pairs.append((producer.target, node.target))
    return pairs


def _pairs_hooks(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[tuple[str, str]]:
    names = {m: n for n, m in model.named_modules()}
    calls: dict[str, int] = {}
    produced: dict[int, str] = {}
    keep_alive: list[torch.Tensor] = []
    seen: list[tuple[str, str]] = []

    def after(module: nn.Module, args: tuple, output: object) -> None:
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(output, torch.Tensor) and isinstance(module, (*_CONVS, nn.Linear)):
            produced[id(output)] = name
            keep_alive.append(output)

    def before(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in produced:
            seen.append((produced[id(args[0])], names[module]))

    handles = []
    for module in names:
        if isinstance(module, (*_CONVS, nn.Linear, *_BNS)):
            handles.append(module.register_forward_hook(after))
        if isinstance(module, _BNS):
            handles.append(module.register_forward_pre_hook(before))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return [(p, b) for p, b in seen if calls.get(p) == 1 and calls.get(b) == 1]


def _foldable(model: nn.Module, producer: str, bn: str, *, have_inputs: bool) -> bool:
    p = model.get_submodule(producer)
    b = model.get_submodule(bn)
    if not isinstance(b, _BNS) or b.running_mean is None or b.running_var is None:
        return False
    if parametrize.is_parametrized(p) or parametrize.is_parametrized(b):
        return False
    if isinstance(p, _CONVS):
        if isinstance(p, nn.modules.conv._ConvTransposeNd) and p.groups != 1:
            return False  # torch's fusion helper assumes one group for transposed convs
        channels = p.out_channels
    elif isinstance(p, nn.Linear) and isinstance(b, nn.BatchNorm1d):
        # Linear + BatchNorm1d is only right for (N, C) activations; parity decides, so it
        # needs example inputs.
        if not have_inputs:
            return False
        channels = p.out_features
    else:
        return False
    return channels == b.num_features


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def _apply(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    for producer, bn in pairs:
        p = model.get_submodule(producer)
        b = model.get_submodule(bn)
        if isinstance(p, _CONVS):
            fused = fuse_conv_bn_eval(p, b, transpose=isinstance(p, nn.modules.conv._ConvTransposeNd))
        else:
            fused = fuse_linear_bn_eval(p, b)
        fused.weight.requires_grad_(p.weight.requires_grad)
        _set_submodule(model, producer, fused)
        _set_submodule(model, bn, nn.Identity())
    return model
