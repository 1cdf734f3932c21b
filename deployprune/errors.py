"""One exception hierarchy for every user-facing failure.

Each class carries the process exit code the CLI maps it to, so the mapping lives in one
place and is documented once (README, "Exit codes").
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_VALIDATION = 4
EXIT_UNSUPPORTED = 5


class DeployPruneError(Exception):
    """Base class: a problem the user can act on. The message is one line and says what to do."""

    exit_code = EXIT_INTERNAL


class UsageError(DeployPruneError):
    """Options that are missing, unknown or that cannot be used together."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A pruning/scenario configuration that is malformed (unknown key, bad value)."""


class InputError(DeployPruneError):
    """A file or object given to the tool cannot be used: missing, corrupt, unsafe, mismatched."""

    exit_code = EXIT_INPUT


class UnsafeFileError(InputError):
    """A file would need arbitrary code execution (pickle) to load and the opt-in was not given."""


class MaskError(InputError):
    """Masks that name unknown modules, have the wrong shape, or hold non-binary values."""


class OutputError(DeployPruneError):
    """An output cannot be written (read-only directory, existing file without --force, disk full)."""

    exit_code = EXIT_INPUT


class UnsupportedError(DeployPruneError):
    """A model, op or option combination the tool cannot handle; names the op or option."""

    exit_code = EXIT_UNSUPPORTED


class ValidationFailed(DeployPruneError):
    """The artifact does not match the source model within the configured thresholds."""

    exit_code = EXIT_VALIDATION


class ParityError(ValidationFailed):
    """Finalize produced a model whose output differs from the masked model (a bug: please report)."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(text: object, limit: int | None = None, *, first_line: bool = False) -> str:
    """``text`` (a message, an exception, a warning) as one line for an ``error: ...`` message.

    Terminal colour codes go; every run of white space, newlines included, becomes one space
    (``first_line``: only the first non-empty line is kept, for tools whose later lines are a
    traceback or a log); an exception without a message gives its type name; a line longer than
    ``limit`` characters is cut and ends in ``...``. The one helper for this in the package.
    """
    raw = _ANSI.sub("", str(text))
    if first_line:
        raw = next((ln for ln in raw.splitlines() if ln.strip()), "")
    line = " ".join(raw.split())
    if not line and isinstance(text, BaseException):
        line = type(text).__name__
    if limit is not None and len(line) > limit:
        line = line[: max(limit - 3, 0)].rstrip() + "..."
    return line
