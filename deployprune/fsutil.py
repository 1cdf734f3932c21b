"""Atomic, non-destructive output writing.

Every artifact, report and checkpoint goes through :func:`atomic_output`: the producer writes
to a temporary sibling, and only a complete result is renamed into place. A failure (or a
signal turned into an exception) leaves the destination exactly as it was.

Staging names carry the writer's process id (``.<name>.<pid>-<random>.partial`` for a
pipeline's staging directory, ``.<name>.<pid>-<random>.tmp<suffix>`` for a temporary file):
the next run to the same output removes what a killed run left behind (:func:`remove_stale`),
never what a live one is writing. A staging directory keeps a journal of what it moved into
place and what it replaced (the replaced outputs wait in it, under ``.deployprune-previous/``),
so a run killed half-way through publishing is rolled back by the next run, previous outputs
restored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError, OutputError

log = logging.getLogger(__name__)

JOURNAL = ".deployprune-journal"
PREVIOUS = ".deployprune-previous"


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


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM) or unknown: treat as alive
        return True
    return True


def staging_prefix(path: Path) -> str:
    """Prefix of this process's staging names for ``path``: ``.<name>.<pid>-``."""
    return f".{path.name}.{os.getpid()}-"


def _stale_entries(path: Path) -> list[Path]:
    parent = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(r"\." + re.escape(path.name) + r"\.(?:(\d+)-)?[A-Za-z0-9_]+\.(?:partial|old|tmp.*)")
    found = []
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        pid = m.group(1)
        if pid is not None and _alive(int(pid)):
            continue  # a live run is writing it
        found.append(parent / name)  # a killed run's, or one named before pids were recorded
    return sorted(found)


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove what killed runs left next to ``path`` (staging directories, temporary files),
    rolling back their half-published outputs first. Returns the entries removed."""
    path = Path(path)
    removed = []
    for entry in _stale_entries(path):
        try:
            if entry.name.endswith(".partial") and entry.is_dir() and not entry.is_symlink():
                undo(entry)
            elif entry.name.endswith(".old") and not path.exists() and not path.is_symlink():
                os.replace(entry, path)  # atomic_output was killed between its two renames
                log.warning("%s: restored from %s, left by an interrupted run", path, entry.name)
                continue
            _remove(entry)
            removed.append(entry)
            log.info("removed %s, left by an interrupted run", entry)
        except OSError as exc:
            log.warning("cannot remove %s, left by an interrupted run: %s", entry, exc)
    return removed


# ---------------------------------------------------------------------------------------------
# The journal of a staging directory: what it moved into place, and what that replaced


def journal(stage_dir: Path, action: str, target: Path) -> None:
    """Record ``action`` ("new" or "replaced") for ``target`` *before* doing it."""
    with open(stage_dir / JOURNAL, "a", encoding="utf-8") as fh:
        fh.write(f"{action} {target.name}\n")
        fh.flush()
        os.fsync(fh.fileno())


def backup_path(stage_dir: Path, target: Path) -> Path:
    return stage_dir / PREVIOUS / target.name


def undo(stage_dir: Path) -> None:
    """Roll back what the journal of ``stage_dir`` says was moved into place (its parent).

    Undone in reverse order: a replaced output whose backup is still in the staging directory
    is put back (one rename); a new output is removed. Safe to run again after an interruption:
    a backup that is gone was already restored. Without a journal (a committed or empty run)
    nothing is touched.
    """
    parent = stage_dir.parent
    try:
        lines = (stage_dir / JOURNAL).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return
    for line in reversed(lines):
        action, _, name = line.partition(" ")
        if not name or "/" in name or name in (".", ".."):
            continue
        target = parent / name
        backup = backup_path(stage_dir, target)
        if action == "replaced" and (backup.exists() or backup.is_symlink()):
            if target.exists() or target.is_symlink():
                _remove(target)
            os.replace(backup, target)
        elif action == "new" and (target.exists() or target.is_symlink()):
            _remove(target)
    (stage_dir / JOURNAL).unlink()


def commit(stage_dir: Path) -> None:
    """The run is complete: forget the journal (the commit point), then the backups go."""
    with contextlib.suppress(FileNotFoundError):
        (stage_dir / JOURNAL).unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, force: bool = False,
                  extra_suffixes: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path in the destination directory; rename it onto ``path`` on success.

    Works for files and for directories (``.mlpackage``). ``extra_suffixes`` names side files
    the producer may write next to the temporary path (e.g. ``.data`` for ONNX external data);
    they are moved along with the main file (``tmp + suffix`` -> ``path + suffix``). A
    directory being replaced is first renamed aside, so it is never lost half-way.
    """
    remove_stale(path)  # first: it may restore the output a killed run had moved aside
    path = check_writable(path, force=force)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmpname = tempfile.mkstemp(prefix=staging_prefix(path), suffix=".tmp" + path.suffix, dir=parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create files in {parent} ({exc.strerror or exc}); "
                          "choose another output path") from exc
    os.close(fd)
    tmp = Path(tmpname)
    tmp.unlink()  # the producer creates it (file or directory)
    old = Path(str(tmp)[: -len(".tmp" + path.suffix)] + ".old")
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"{path}: the producer wrote nothing")
        for suffix in extra_suffixes:
            side_tmp = Path(str(tmp) + suffix)
            if side_tmp.exists():
                os.replace(side_tmp, Path(str(path) + suffix))
        if path.exists() and path.is_dir() and not path.is_symlink():
            os.replace(path, old)  # aside first: a directory cannot be replaced in one rename
        os.replace(tmp, path)
    except OSError as exc:
        if old.exists() and not path.exists():
            with contextlib.suppress(OSError):
                os.replace(old, path)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); check free space and permissions") from exc
    finally:
        if tmp.exists():
            _remove(tmp)
        for suffix in extra_suffixes:
            side_tmp = Path(str(tmp) + suffix)
            if side_tmp.exists():
                _remove(side_tmp)
        if old.exists() and (path.exists() or path.is_symlink()):
            _remove(old)


@contextlib.contextmanager
def replacing(paths: list[Path]) -> Iterator[None]:
    """Outputs in different places that appear together or not at all, even with ``force``.

    Each existing file among ``paths`` is renamed aside first (``.<name>.<pid>-<random>.old``)
    and deleted only when the block completes; on an error or an interrupt what the block
    wrote is removed and the previous files are put back (a kill leaves the ``.old`` file, which
    :func:`remove_stale` restores on the next run to that output).
    """
    backups: list[tuple[Path, Path]] = []
    ours = [p for p in paths if not (p.exists() or p.is_symlink())]  # what the block may create
    started = False
    try:
        for path in paths:
            if path.is_file() and not path.is_symlink():
                parent = path.parent if str(path.parent) else Path(".")
                fd, name = tempfile.mkstemp(prefix=staging_prefix(path), suffix=".old", dir=parent)
                os.close(fd)
                try:
                    os.replace(path, name)
                except BaseException:
                    os.unlink(name)
                    raise
                backups.append((path, Path(name)))
        started = True
        yield
    except BaseException:
        if started:
            for path in ours + [p for p, _ in backups]:
                if path.exists() or path.is_symlink():
                    _remove(path)
        for path, backup in backups:
            os.replace(backup, path)
        raise
    for _, backup in backups:
        _remove(backup)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def copy_regular_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a file or a directory tree that holds only directories and regular files.

    Anything else inside (a symlink, which could lead to /dev/zero or out of the package; a
    device, FIFO or socket) is refused with a one-line InputError naming it: the copy never
    follows a link and never reads a special file. ``src`` itself may be a link the user named.
    """
    src, dst = Path(src), Path(dst)
    try:
        top = os.stat(src)
    except OSError as exc:
        raise InputError(f"{src}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(top.st_mode):
        _copy_dir(src, dst, src)
    elif stat.S_ISREG(top.st_mode):
        _copy_file(src, dst, src, follow=True)
    else:
        raise InputError(f"{src}: is {_kind(top.st_mode)}; pass a regular file or package directory")


def check_regular_tree(src: str | os.PathLike) -> None:
    """Raise the InputError :func:`copy_regular_tree` would raise, without copying anything."""
    src = Path(src)
    try:
        top = os.stat(src)
    except OSError as exc:
        raise InputError(f"{src}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISREG(top.st_mode):
        return
    if not stat.S_ISDIR(top.st_mode):
        raise InputError(f"{src}: is {_kind(top.st_mode)}; pass a regular file or package directory")
    stack = [src]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    stack.append(Path(entry.path))
                elif not stat.S_ISREG(mode):
                    raise _refuse(src, Path(entry.path), mode)


def _refuse(root: Path, entry: Path, mode: int) -> InputError:
    rel = entry.relative_to(root)
    return InputError(f"{root}: {rel} is {_kind(mode)}; a package must hold only regular files and "
                      "directories (replace links by copies)")


def _copy_dir(root: Path, dst: Path, src: Path) -> None:
    dst.mkdir()
    with os.scandir(src) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        path = Path(entry.path)
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISDIR(mode):
            _copy_dir(root, dst / entry.name, path)
        elif stat.S_ISREG(mode):
            _copy_file(root, dst / entry.name, path, follow=False)
        else:
            raise _refuse(root, path, mode)


def _copy_file(root: Path, dst: Path, src: Path, *, follow: bool) -> None:
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(src, flags)
    except OSError as exc:  # ELOOP: replaced by a link since it was listed
        rel = src.relative_to(root) if src != root else src.name
        raise InputError(f"{root}: cannot read {rel} ({exc.strerror or exc}); a package must hold only "
                         "regular files and directories") from None
    with os.fdopen(fd, "rb") as fin:
        mode = os.fstat(fin.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse(root, src, mode) if src != root else InputError(
                f"{src}: is {_kind(mode)}; pass a regular file or package directory")
        with open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    shutil.copystat(src, dst, follow_symlinks=False)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, force: bool = False) -> Path:
    with atomic_output(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, *, force: bool = False) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), force=force)
