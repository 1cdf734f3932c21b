"""Suite-wide set-up: torchvision and timm importable next to the CPU build of torch.

torchvision's PyPI wheel is built against the CUDA build of torch; its compiled operators do not
register against the CPU build, and ``import torchvision`` (so also ``import timm``) fails. The
shim skips those fake registrations (see deployprune/_compat.py); the models build and run, only
the detection operators (nms, roi_align, ...) stay unavailable. It must run before any test module
imports torchvision, which is why it lives here, at the root of the suite.
"""

from __future__ import annotations

from deployprune._compat import tolerate_missing_torchvision_ops

tolerate_missing_torchvision_ops()
