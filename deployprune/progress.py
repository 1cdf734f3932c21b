"""Progress lines for work that takes more than a moment (issue 13).

Library code announces a stage with :func:`stage` (``with stage("converting to onnx"):``) or a
single line with :func:`note`. The lines go to the ``deployprune.progress`` logger at INFO: silent
in library use (Python's default level is WARNING), shown by the command line on stderr unless
``-q``. Each line carries the time since the command started, and a stage that takes longer than
:data:`SLOW` seconds says when it is done, so a long export is never silent::

    [0.4s] finalizing (14 masked modules)
    [12.9s] finalizing: done in 12.5 s
    [12.9s] converting to onnx

Lines are plain text (one per event), readable in a terminal, a log file or CI output alike.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

log = logging.getLogger("deployprune.progress")

#: A stage that takes longer than this (seconds) also reports when it finishes.
SLOW = 2.0

_T0 = time.perf_counter()


def restart_clock() -> None:
    """Count the time of later lines from now (the command line calls it when a command starts)."""
    global _T0
    _T0 = time.perf_counter()


def note(message: str) -> None:
    log.info("[%.1fs] %s", time.perf_counter() - _T0, message)


@contextlib.contextmanager
def stage(message: str) -> Iterator[None]:
    note(message)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        took = time.perf_counter() - t0
        if took > SLOW:
            note(f"{message.split(' (')[0]}: done in {took:.1f} s")


__all__ = ["SLOW", "note", "restart_clock", "stage"]
