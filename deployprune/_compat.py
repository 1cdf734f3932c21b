"""Make torchvision importable when its compiled ops were built for another torch.

torchvision's PyPI wheel for a given torch release is built against the CUDA build of that
release. Next to the CPU build of the same version its C++ operators (``torchvision::nms``,
``roi_align`` ...) do not register, and ``import torchvision`` then fails in
``torchvision/_meta_registrations.py``: ``torch.library.register_fake("torchvision::nms")``
raises ``RuntimeError: operator torchvision::nms does not exist``. timm imports torchvision, so
timm fails the same way.

:func:`tolerate_missing_torchvision_ops` wraps ``torch.library.register_fake`` so that a fake
(meta) registration for a ``torchvision::`` operator that does not exist is skipped instead of
raised. Every classification model of torchvision and timm builds and runs afterwards; only the
detection operators themselves (``nms``, ``roi_align``, ``deform_conv2d`` ...) stay unavailable.
Any other registration, and any other error, behaves exactly as before.

The test suite applies it in ``tests/conftest.py``. In the library only :mod:`deployprune.hf` calls
it, before importing transformers (which imports torchvision when it is installed), so that reading a
Hugging Face model directory does not fail on a torchvision built for another torch; nothing else in
deployprune patches torch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_MARK = "_deployprune_tolerates_missing_torchvision_ops"


def _skippable(op: Any, exc: BaseException) -> bool:
    name = op if isinstance(op, str) else getattr(op, "name", lambda: "")()
    return (isinstance(exc, RuntimeError) and isinstance(name, str) and name.startswith("torchvision::")
            and "does not exist" in str(exc))


def tolerate_missing_torchvision_ops() -> bool:
    """Skip fake registrations of torchvision operators that are missing; True if newly applied.

    Idempotent. Call it before the first ``import torchvision`` (or ``import timm``).
    """
    import torch.library

    original = torch.library.register_fake
    if getattr(original, _MARK, False):
        return False

    @functools.wraps(original)
    def register_fake(op: Any, func: Callable[..., Any] | None = None, /, **kwargs: Any) -> Any:
        if func is not None:
            try:
                return original(op, func, **kwargs)
            except RuntimeError as exc:
                if not _skippable(op, exc):
                    raise
                log.debug("skipped the fake registration of %s: %s", op, exc)
                return func
        decorator = original(op, **kwargs)

        def apply(fn: Callable[..., Any]) -> Any:
            try:
                return decorator(fn)
            except RuntimeError as exc:
                if not _skippable(op, exc):
                    raise
                log.debug("skipped the fake registration of %s: %s", op, exc)
                return fn

        return apply

    setattr(register_fake, _MARK, True)
    torch.library.register_fake = register_fake
    return True


__all__ = ["tolerate_missing_torchvision_ops"]
