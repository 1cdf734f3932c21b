"""Training/validation data for ``deployprune prune``: entry points and the built-in digits set.

``load_data(spec)`` accepts:

* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download;
  needs the optional extra ``pip install 'deployprune[data]'``), as ``(N, 1, 8, 8)`` float
  images scaled to [0, 1] and int64 labels, split 80/20 stratified by ``seed``;
* ``"package.module:function"``: a function returning ``(train_loader, val_loader)``
  (``val_loader`` may be ``None``). It is called with ``batch_size=`` and ``seed=`` when its
  signature accepts them, otherwise with no arguments.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

from ._imports import import_callable
from .errors import InputError, UnsupportedError, UsageError, one_line

log = logging.getLogger("deployprune.data")

BUILTIN = ("digits",)


def digits_arrays(*, seed: int = 0, val_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor,
                                                                        torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)`` of the 8x8 digits (x: float32 (N,1,8,8) in [0,1])."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise UnsupportedError("the built-in 'digits' data needs scikit-learn; install it with "
                               "pip install 'deployprune[data]'") from None
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"digits: val_fraction must be in (0, 1), got {val_fraction}")
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype("float32") / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype("int64"))
    idx = torch.arange(len(y)).numpy()
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=bunch.target)
    tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
    return x[tr_t], y[tr_t], x[va_t], y[va_t]


def digits(batch_size: int = 32, seed: int = 0, val_fraction: float = 0.2) -> tuple[Any, Any]:
    """Train (shuffled with a seeded generator) and validation loaders of the 8x8 digits."""
    from torch.utils.data import DataLoader, TensorDataset

    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    xt, yt, xv, yv = digits_arrays(seed=seed, val_fraction=val_fraction)
    gen = torch.Generator()
    gen.manual_seed(seed)
    train = DataLoader(TensorDataset(xt, yt), batch_size=batch_size, shuffle=True, generator=gen)
    val = DataLoader(TensorDataset(xv, yv), batch_size=256, shuffle=False)
    return train, val


def resolve_entry_point(spec: str) -> Callable[..., Any]:
    """The function ``package.module:function`` names; a path that does not import is a usage error
    (exit 2, as for ``--model`` and ``--optimizer``), a function that fails when called is an input one."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--data {spec!r}: expected 'digits' or an entry point package.module:function")
    return import_callable(module_name, attr, label=f"data entry point {spec!r}", error=UsageError)


def _call(fn: Callable[..., Any], spec: str, batch_size: int, seed: int) -> Any:
    kwargs: dict[str, Any] = {}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "batch_size" in params or var_kw:
        kwargs["batch_size"] = batch_size
    if "seed" in params or var_kw:
        kwargs["seed"] = seed
    try:
        return fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - user code
        raise InputError(f"data entry point {spec!r} failed ({type(exc).__name__}: {one_line(exc, 200)}); "
                         "fix the function or run it alone to debug it") from None


def load_data(spec: str, *, batch_size: int = 32, seed: int = 0) -> tuple[Any, Any]:
    """``(train_loader, val_loader)`` for ``spec`` (``"digits"`` or ``package.module:function``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("--data: give 'digits' or an entry point package.module:function")
    spec = spec.strip()
    if spec == "digits":
        return digits(batch_size=batch_size, seed=seed)
    if ":" not in spec:
        raise UsageError(f"--data {spec!r}: unknown dataset; use one of {', '.join(BUILTIN)} or an entry point "
                         "package.module:function returning (train_loader, val_loader)")
    result = _call(resolve_entry_point(spec), spec, batch_size, seed)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise InputError(f"data entry point {spec!r}: returned {type(result).__name__}; "
                         "it must return (train_loader, val_loader)")
    train, val = result
    if train is None or not hasattr(train, "__iter__"):
        raise InputError(f"data entry point {spec!r}: the training loader is {type(train).__name__}, not iterable")
    if val is not None and not hasattr(val, "__iter__"):
        raise InputError(f"data entry point {spec!r}: the validation loader is {type(val).__name__}, not iterable")
    return train, val
