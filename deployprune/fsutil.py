"""Atomic, non-destructive output writing.

Every artifact, report and checkpoint goes through :func:`atomic_output`: the producer writes
to a temporary sibling, and only a complete result is renamed into place. A failure (or a
signal turned into an exception) leaves the destination exactly as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


def check_writable(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Fail early, before any expensive work, if ``path`` cannot be produced."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path}: already exists; pass --force (force=True) to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"{path}: directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise OutputError(f"{path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: directory {parent} is not writable; choose another output path")
    return path


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, force: bool = False,
                  extra_suffixes: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path in the destination directory; rename it onto ``path`` on success.

    Works for files and for directories (``.mlpackage``). ``extra_suffixes`` names side files
    the producer may write next to the temporary path (e.g. ``.data`` for ONNX external data);
    they are moved along with the main file (``tmp + suffix`` -> ``path + suffix``).
    """
    path = check_writable(path, force=force)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmpname = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create files in {parent} ({exc.strerror or exc}); "
                          "choose another output path") from exc
    os.close(fd)
    tmp = Path(tmpname)
    tmp.unlink()  # the producer creates it (file or directory)
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"{path}: the producer wrote nothing")
        for suffix in extra_suffixes:
            side_tmp = Path(str(tmp) + suffix)
            if side_tmp.exists():
                os.replace(side_tmp, Path(str(path) + suffix))
        if path.exists() and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); check free space and permissions") from exc
    finally:
        if tmp.exists():
            _remove(tmp)
        for suffix in extra_suffixes:
            side_tmp = Path(str(tmp) + suffix)
            if side_tmp.exists():
                _remove(side_tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, force: bool = False) -> Path:
    with atomic_output(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, *, force: bool = False) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), force=force)
