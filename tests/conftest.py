"""Suite-wide set-up: torchvision and timm importable next to the CPU build of torch, and no progress lines.

torchvision's PyPI wheel is built against the CUDA build of torch; its compiled operators do not
register against the CPU build, and ``import torchvision`` (so also ``import timm``) fails. The
shim skips those fake registrations (see deployprune/_compat.py); the models build and run, only
the detection operators (nms, roi_align, ...) stay unavailable. It must run before any test module
imports torchvision, which is why it lives here, at the root of the suite.

The command line prints progress lines on stderr by default. Tests of its messages compare stderr
line by line, so the suite turns them off (``DEPLOYPRUNE_PROGRESS=0``, inherited by every command
a test runs); tests/cli/test_progress.py removes the variable to test the lines themselves.
"""

from __future__ import annotations

import os

from deployprune._compat import tolerate_missing_torchvision_ops

tolerate_missing_torchvision_ops()
os.environ["DEPLOYPRUNE_PROGRESS"] = "0"
