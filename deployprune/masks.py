"""Masks in NNI layout: ``{module_name: {param_name: 0/1 tensor}}``.

Normalization and validation live here so every entry point (API, CLI, finalize, pruner)
rejects the same bad masks with the same message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import MaskError

Masks = dict[str, dict[str, torch.Tensor]]


def _close_names(name: str, candidates: list[str], limit: int = 3) -> str:
    import difflib

    close = difflib.get_close_matches(name, candidates, n=limit)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def normalize_masks(model: nn.Module, masks: Mapping[str, Any] | None, *, source: str = "masks") -> Masks:
    """Check ``masks`` against ``model`` and return them as float 0/1 tensors on CPU.

    Raises :class:`MaskError` (one line, naming the module/parameter) for an unknown module or
    parameter, a shape mismatch, a non-tensor, NaN, or a value other than 0 and 1.
    """
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise MaskError(f"{source}: expected a dict {{module_name: {{param_name: mask}}}}, got {type(masks).__name__}")
    modules = dict(model.named_modules())
    out: Masks = {}
    for mod_name, per_param in masks.items():
        if not isinstance(mod_name, str):
            raise MaskError(f"{source}: module names must be strings, got {mod_name!r}")
        if mod_name not in modules:
            raise MaskError(
                f"{source}: module {mod_name!r} does not exist in the model"
                f"{_close_names(mod_name, [n for n in modules if n])}"
            )
        module = modules[mod_name]
        if not isinstance(per_param, Mapping):
            raise MaskError(f"{source}: entry for module {mod_name!r} must be a dict {{param_name: mask}}, "
                            f"got {type(per_param).__name__}")
        for pname, mask in per_param.items():
            if not isinstance(pname, str):
                raise MaskError(f"{source}: {mod_name or '<root>'}: parameter names must be strings, got {pname!r}")
            where = f"{source}: {mod_name}.{pname}" if mod_name else f"{source}: {pname}"
            target = _param_of(module, pname)
            if target is None:
                params = [n for n, _ in module.named_parameters(recurse=False)]
                raise MaskError(f"{where}: module {mod_name!r} ({type(module).__name__}) has no parameter "
                                f"{pname!r}; it has {params}")
            if not isinstance(mask, torch.Tensor):
                try:
                    mask = torch.as_tensor(mask)
                except Exception:
                    raise MaskError(f"{where}: mask must be a tensor or array, got {type(mask).__name__}") from None
            if tuple(mask.shape) != tuple(target.shape):
                raise MaskError(f"{where}: mask shape {tuple(mask.shape)} does not match parameter shape "
                                f"{tuple(target.shape)}")
            if mask.dtype.is_complex:
                raise MaskError(f"{where}: mask dtype {mask.dtype} is not supported; use bool or 0/1 floats")
            m = check_binary(mask.detach().to("cpu"), where)
            out.setdefault(mod_name, {})[pname] = m.to(torch.bool)
    return out


def check_binary(m: torch.Tensor, where: str) -> torch.Tensor:
    """``m`` if it holds only 0 and 1 (or is bool); otherwise a one-line MaskError naming ``where``."""
    if m.dtype == torch.bool:
        return m
    if m.dtype.is_complex:
        raise MaskError(f"{where}: mask dtype {m.dtype} is not supported; use bool or 0/1 floats")
    if m.is_floating_point() and torch.isnan(m).any():
        raise MaskError(f"{where}: mask contains NaN; masks must hold only 0 and 1")
    bad = (m != 0) & (m != 1)
    if bad.any():
        value = float(m[bad].flatten()[0])
        raise MaskError(f"{where}: mask is not binary (found {value:g}); masks must hold only 0 and 1")
    return m


def _param_of(module: nn.Module, name: str) -> torch.Tensor | None:
    if "." in name:
        return None
    p = module._parameters.get(name)
    if p is None and name in getattr(module, "_buffers", {}):
        return None  # masks apply to parameters only
    return p


def mask_sparsity(masks: Masks) -> dict[str, float]:
    """Fraction of zeros per ``module.param``."""
    out = {}
    for mod, per in masks.items():
        for p, m in per.items():
            key = f"{mod}.{p}" if mod else p
            out[key] = 1.0 - float(m.float().mean()) if m.numel() else 0.0
    return out


def apply_masks_(model: nn.Module, masks: Masks) -> None:
    """Multiply parameters by their masks in place (bake)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for mod_name, per in masks.items():
            module = modules[mod_name]
            for pname, m in per.items():
                p = module._parameters[pname]
                p.mul_(m.to(device=p.device, dtype=p.dtype))


def extract_attached_masks(model: nn.Module) -> Masks:
    """Masks attached by a pruner as parametrizations (deployprune's or torch.ao.pruning's).

    Any parametrization object carrying a ``mask`` tensor attribute counts.
    """
    out: Masks = {}
    for mod_name, module in model.named_modules():
        plist = getattr(module, "parametrizations", None)
        if plist is None:
            continue
        for pname in list(plist.keys()):
            mask = None
            shape: torch.Size | None = None
            for par in plist[pname]:
                m = getattr(par, "mask", None)
                if isinstance(m, torch.Tensor):
                    if shape is None:  # the parametrized tensor's (weight_norm has two originals)
                        shape = _parametrized_shape(module, pname)
                    m = _expand_mask(m.detach().to(torch.bool), shape)
                    mask = m if mask is None else (mask & m)
            if mask is not None:
                out.setdefault(mod_name, {})[pname] = mask.cpu()
    return out


def detach_prune_hooks_(model: nn.Module) -> Masks:
    """Take ``torch.nn.utils.prune`` forward pre-hooks off ``model`` (in place).

    ``weight_orig`` becomes ``weight`` again (unmasked) and the ``weight_mask`` buffers come back
    as masks, so the model is plain and the masks can be baked or compacted like any other.
    """
    from torch.nn.utils import prune

    masks: Masks = {}
    for mod_name, module in model.named_modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if not isinstance(hook, prune.BasePruningMethod):
                continue
            pname = hook._tensor_name
            orig = module._parameters.pop(f"{pname}_orig")
            mask = module._buffers.pop(f"{pname}_mask")
            del module._forward_pre_hooks[key]
            if hasattr(module, pname):
                delattr(module, pname)
            module.register_parameter(pname, orig)
            masks.setdefault(mod_name, {})[pname] = mask.detach().to(torch.bool)
    return masks


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copes with ``torch.nn.utils.prune`` hooks.

    Those hooks keep the masked weight as a computed, non-leaf attribute, which deepcopy refuses;
    it is set aside for the copy and put back, so ``model`` ends exactly as it was.
    """
    import copy

    from torch.nn.utils import prune

    computed: list[tuple[nn.Module, str, torch.Tensor]] = []
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name in module.__dict__:
                computed.append((module, hook._tensor_name, module.__dict__.pop(hook._tensor_name)))
    try:
        return copy.deepcopy(model)
    finally:
        for module, name, value in computed:
            module.__dict__[name] = value


def _expand_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Per-output-channel masks (torch.ao structured sparsifiers keep a (C,) mask) to the weight's shape."""
    if tuple(mask.shape) == tuple(shape) or mask.dim() != 1 or len(shape) == 0 or mask.shape[0] != shape[0]:
        return mask
    return mask.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()


def strip_parametrizations_(model: nn.Module, *, leave_parametrized: bool = True) -> None:
    """Remove every parametrization from ``model``, changing only this instance.

    ``torch.nn.utils.parametrize.remove_parametrizations`` deletes the property from the
    module's generated ``Parametrized*`` class; a ``copy.deepcopy`` of a parametrized model
    shares that class, so removing parametrizations from a copy that way breaks the original
    (``'ParametrizedConv2d' object has no attribute 'weight'``). ``leave_parametrized=True``
    keeps the parametrized (masked) values, ``False`` the original tensors.
    """
    from torch.nn.utils import parametrize

    from .errors import UnsupportedError

    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        plist = module.parametrizations
        restored: dict[str, torch.Tensor] = {}
        for name in list(plist.keys()):
            originals = _originals(plist[name])
            if not originals:
                raise UnsupportedError(f"parametrization of {type(module).__name__}.{name} has no original "
                                       "tensor; remove it before handing the model to deployprune")
            if leave_parametrized:
                with torch.no_grad():
                    value = getattr(module, name).detach().clone()
            elif len(originals) == 1:
                value = originals[0].detach()
            else:
                # several originals (weight_norm's magnitude and direction): there is no single tensor to go
                # back to, so the parametrization that combines them is baked; masks stacked on it are not
                value = _value_without_masks(plist[name], originals)
            first = originals[0]
            restored[name] = nn.Parameter(value, requires_grad=first.requires_grad) if isinstance(
                first, nn.Parameter) else value
        module.__class__ = module.__class__.__bases__[0]
        del module._modules["parametrizations"]
        for name, value in restored.items():
            if isinstance(value, nn.Parameter):
                module.register_parameter(name, value)
            else:
                module.register_buffer(name, value)


def _originals(plist: nn.Module) -> list[torch.Tensor]:
    """The tensors a ``ParametrizationList`` stores: ``original``, or ``original0``, ``original1`` ... when
    the first parametrization's ``right_inverse`` returns several (``parametrizations.weight_norm``)."""
    if getattr(plist, "is_tensor", True):
        original = getattr(plist, "original", None)
        return [original] if isinstance(original, torch.Tensor) else []
    found = [getattr(plist, f"original{i}", None) for i in range(int(getattr(plist, "ntensors", 0)))]
    return found if all(isinstance(t, torch.Tensor) for t in found) else []


def _value_without_masks(plist: nn.Module, originals: list[torch.Tensor]) -> torch.Tensor:
    """The parametrized value of a multi-original list, skipping parametrizations that carry a ``mask``."""
    with torch.no_grad():
        value = plist[0](*originals)
        for par in list(plist)[1:]:
            if not isinstance(getattr(par, "mask", None), torch.Tensor):
                value = par(value)
    return value.detach().clone()


def _parametrized_shape(module: nn.Module, name: str) -> torch.Size:
    originals = _originals(module.parametrizations[name])
    if len(originals) == 1:
        return originals[0].shape
    with torch.no_grad():
        return getattr(module, name).shape


def _is_finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
