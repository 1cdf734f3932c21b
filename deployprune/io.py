"""Loading models, masks and example inputs safely.

Everything a user hands to deployprune goes through :func:`load_model` / :func:`load_masks`.
The rules (see ``docs/cli.md``, "Loading models"):

* Files are checked before use: existence, size limit, archive structure.
* ``torch.load`` always runs with ``weights_only=True`` first. A file that needs pickled code
  (a whole ``nn.Module``, or anything that imports a callable) is only loaded when the caller
  opts in (``allow_pickle=True`` / CLI ``--trust-pickle``), because unpickling runs code taken
  from the file.
* ``.pt2`` programs are scanned for pickled payloads before ``torch.export.load`` sees them, and
  loaded with ``torch.load`` forced to ``weights_only=True``. Their JSON is checked against a strict
  allowlist first (:mod:`deployprune._pt2_schema`): torch evaluates size expressions, guard code
  and names from it as Python, so only static-shape aten programs with plain names load unless
  the caller opts in (``allow_pickle=True`` / ``--trust-pickle``).
* A model factory named inside a *file* is only imported when it is a registered model of the zoo
  (``deployprune.zoo``; the old spelling ``models.<family>:...`` is read as the zoo) or when the
  user names the same factory with ``--model``.

Every error is a one-line :class:`~deployprune.errors.InputError` (or subclass) naming the file.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import pickletools
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._imports import import_callable
from .errors import DeployPruneError, InputError, MaskError, UnsafeFileError, UnsupportedError, UsageError, one_line
from .masks import Masks, normalize_masks

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "deployprune.checkpoint"
CHECKPOINT_VERSION = 1
#: Files bigger than this are rejected before they are read (override per call / --max-file-size).
DEFAULT_MAX_FILE_BYTES = 16 * 1024**3
#: Flag named in messages about pickled files.
TRUST_FLAG = "--trust-pickle"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in reversed(list(DTYPES.items()))}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# --------------------------------------------------------------------------------------------
# Input shapes and example inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputShape:
    """Shape, dtype and (for integer inputs) the exclusive upper bound of generated values."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    high: int | None = None

    def __str__(self) -> str:
        text = ",".join(str(d) for d in self.shape)
        if self.dtype != torch.float32 or self.high is not None:
            text += f":{dtype_name(self.dtype)}"
        if self.high is not None:
            text += f":{self.high}"
        return text

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": list(self.shape), "dtype": dtype_name(self.dtype)}
        if self.high is not None:
            out["high"] = self.high
        return out


def parse_input_shape(text: str) -> InputShape:
    """Parse ``1,3,224,224``, ``1x3x224x224``, ``1,16:int64`` or ``1,16:int64:30522``.

    The optional third field is the exclusive upper bound for generated integer values
    (default 2, which is valid for any embedding table or class index).
    """
    hint = "expected e.g. 1,3,224,224 or 1,16:int64 (shape[:dtype[:high]])"
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"--input-shape: empty value; {hint}")
    parts = text.strip().split(":")
    if len(parts) > 3:
        raise UsageError(f"--input-shape {text!r}: too many ':' fields; {hint}")
    dims = re.split(r"\s*[,x×]\s*|\s+", parts[0].strip())
    try:
        shape = tuple(int(d) for d in dims)
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: dimensions must be integers; {hint}") from None
    if not shape:
        raise UsageError(f"--input-shape {text!r}: no dimensions; {hint}")
    if any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r}: dimensions must be positive; {hint}")
    numel = 1
    for d in shape:
        numel *= d
    if numel > 2**31:
        raise UsageError(f"--input-shape {text!r}: {numel} elements is too large for an example input")
    dtype = torch.float32
    if len(parts) >= 2 and parts[1].strip():
        key = parts[1].strip().lower()
        if key not in DTYPES:
            raise UsageError(
                f"--input-shape {text!r}: unknown dtype {parts[1]!r}; "
                f"use one of {', '.join(sorted(set(_DTYPE_NAMES.values())))}"
            )
        dtype = DTYPES[key]
    high = None
    if len(parts) == 3:
        if dtype.is_floating_point:
            raise UsageError(f"--input-shape {text!r}: a value bound only applies to integer dtypes")
        try:
            high = int(parts[2])
        except ValueError:
            raise UsageError(f"--input-shape {text!r}: the bound {parts[2]!r} must be an integer") from None
        if high < 1:
            raise UsageError(f"--input-shape {text!r}: the bound must be at least 1")
    return InputShape(shape, dtype, high)


def make_example_inputs(shapes: Sequence[InputShape], *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic example inputs: N(0, 1) floats, integers in ``[0, high)`` (default 2)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        if s.dtype == torch.bool:
            out.append(torch.randint(0, 2, s.shape, generator=gen).to(torch.bool))
        elif s.dtype.is_floating_point:
            out.append(torch.randn(s.shape, generator=gen).to(s.dtype))
        else:
            out.append(torch.randint(0, s.high or 2, s.shape, generator=gen).to(s.dtype))
    return tuple(out)


def describe_inputs(inputs: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{'x'.join(str(d) for d in t.shape) or 'scalar'} ({dtype_name(t.dtype)})" for t in inputs)


def _bounded(shape: tuple[int, ...], where: str, what: str = "'input_shapes' entry") -> tuple[int, ...]:
    """The same size limit ``--input-shape`` applies, for shapes read from a file (checkpoints, .pt2)."""
    numel = 1
    for d in shape:
        numel *= d
    if numel > 2**31:
        raise InputError(f"{where}: {what} {list(shape)} has {numel} elements, too large for an "
                         "example input; pass --input-shape")
    return shape


def _shapes_from_json(value: Any, where: str) -> list[InputShape]:
    """``input_shapes`` as stored in a checkpoint: a list of int lists, strings or dicts."""
    if not isinstance(value, (list, tuple)) or not value:
        raise InputError(f"{where}: 'input_shapes' must be a non-empty list, got {type(value).__name__}")
    shapes = []
    for item in value:
        if isinstance(item, str):
            try:
                shapes.append(parse_input_shape(item))
            except UsageError as exc:
                raise InputError(f"{where}: bad entry in 'input_shapes': {exc}") from None
        elif isinstance(item, (list, tuple)) and item and all(isinstance(d, int) and d > 0 for d in item):
            shapes.append(InputShape(_bounded(tuple(item), where)))
        elif isinstance(item, Mapping) and "shape" in item:
            dims = item["shape"]
            if not (isinstance(dims, (list, tuple)) and dims and all(isinstance(d, int) and d > 0 for d in dims)):
                raise InputError(f"{where}: bad shape {dims!r} in 'input_shapes'")
            dt = str(item.get("dtype", "float32")).lower()
            if dt not in DTYPES:
                raise InputError(f"{where}: unknown dtype {dt!r} in 'input_shapes'")
            high = item.get("high")
            if high is not None and not isinstance(high, int):
                raise InputError(f"{where}: 'high' in 'input_shapes' must be an integer")
            shapes.append(InputShape(_bounded(tuple(dims), where), DTYPES[dt], high))
        else:
            raise InputError(f"{where}: bad entry {item!r} in 'input_shapes'; expected a list of positive ints")
    return shapes


# --------------------------------------------------------------------------------------------
# Safe file reading
# --------------------------------------------------------------------------------------------


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def parse_size(text: str) -> int:
    """``500M``, ``16G``, ``1024`` (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise UsageError(f"--max-file-size {text!r}: expected a size like 500M or 16G")
    mult = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[m.group(2)]
    return int(float(m.group(1)) * mult)


def check_input_file(
    path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES, what: str = "model file"
) -> Path:
    """Existence, type, readability and size of an input file, checked before it is opened."""
    path = Path(path)
    if not path.exists():
        hint = (
            ""
            if path.parent.exists() or str(path.parent) in ("", ".")
            else f" (directory {path.parent} does not exist)"
        )
        raise InputError(f"{path}: no such file{hint}; check the {what} path")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a {what}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied; make the {what} readable")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: file is empty; it is not a {what}")
    if size > max_bytes:
        raise InputError(
            f"{path}: file is {_fmt_bytes(size)}, above the {_fmt_bytes(max_bytes)} limit; "
            f"if you trust it, raise the limit with --max-file-size"
        )
    return path




_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _pickle_globals(data: bytes, limit: int = 5) -> list[str] | None:
    """Globals a pickle stream would import, found without executing it (None: not a pickle)."""
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if len(found) >= limit:
                break
    except Exception:
        return found or None
    return found


class _ZipInfo:
    def __init__(self, names: list[str], total: int):
        self.names = names
        self.total = total


def _inspect_zip(path: Path, max_bytes: int) -> _ZipInfo | None:
    """Structural check of a zip archive (torch.save / torch.export.save); None if not a zip."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head.startswith(b"PK"):
            raise InputError(
                f"{path}: the zip archive is truncated or corrupt (no central directory); re-save or re-copy the file"
            )
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            total = sum(i.file_size for i in infos)
            # torch's reader does not check entry CRCs: a flipped byte would load as wrong weights
            bad = zf.testzip() if total <= max_bytes else None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InputError(
            f"{path}: the zip archive is corrupt ({one_line(exc, 160)}); re-save or re-copy the file"
        ) from None
    names = [i.filename for i in infos]
    if bad is not None:
        raise InputError(f"{path}: archive entry {bad!r} fails its CRC check; the file is corrupt, "
                         "re-save or re-copy it")
    if total > max_bytes:
        raise InputError(
            f"{path}: the archive expands to {_fmt_bytes(total)}, above the "
            f"{_fmt_bytes(max_bytes)} limit; if you trust it, raise the limit with --max-file-size"
        )
    for n in names:
        if n.startswith("/") or ".." in n.split("/") or "\\" in n:
            raise InputError(f"{path}: archive entry {n!r} has an unsafe path; refusing to read the file")
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1:
        raise InputError(
            f"{path}: unexpected archive layout (several top-level folders: "
            f"{', '.join(sorted(tops)[:4])}); not a torch.save or torch.export.save file"
        )
    return _ZipInfo(names, total)


def _is_pt2(info: _ZipInfo | None) -> bool:
    if info is None:
        return False
    rel = {n.split("/", 1)[1] for n in info.names if "/" in n}
    return "archive_format" in rel or any(r.startswith("models/") and r.endswith(".json") for r in rel)


#: Entries of a torch.save zip archive (below its single top-level folder): the pickle, tensor
#: storages and small metadata records (version, byteorder, .data/..., .format_version ...).
_TORCH_ZIP_ENTRY = re.compile(r"data\.pkl|data/\d+|\.data/[\w.]+|\.?[A-Za-z_][\w]*")


def torch_load(
    path: Path,
    *,
    allow_pickle: bool = False,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    what: str = "model file",
    zip_info: _ZipInfo | None = None,
) -> Any:
    """``torch.load`` with ``weights_only=True``; pickled code only with ``allow_pickle``.

    Classifies every failure into a one-line InputError / UnsafeFileError naming the file.
    """
    path = check_input_file(path, max_bytes=max_bytes, what=what)
    if zip_info is None:
        zip_info = _inspect_zip(path, max_bytes)
    if zip_info is not None:
        rel = {n.split("/", 1)[1] for n in zip_info.names if "/" in n}
        if "constants.pkl" in rel or any(r.startswith("code/") for r in rel):
            raise UnsupportedError(
                f"{path}: is a TorchScript archive, which deployprune does not load; "
                "save the model's state_dict (with --model) or a torch.export .pt2 program instead"
            )
        if "data.pkl" not in rel:
            raise InputError(f"{path}: zip archive without data.pkl; not a file written by torch.save")
        for r in sorted(rel):
            if not _TORCH_ZIP_ENTRY.fullmatch(r):
                raise InputError(
                    f"{path}: unexpected entry {r!r} in the archive (torch.save writes data.pkl, data/<n> "
                    "and small metadata records only); refusing to read the file"
                )
    try:
        with _quiet_torch_load():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure is classified below
        unsafe_globals = _unsafe_globals(path, exc, zip_info)
        if unsafe_globals is None:
            raise InputError(
                f"{path}: cannot be read as a PyTorch file ({_load_reason(exc)}); "
                "it is corrupt, truncated or not written by torch.save"
            ) from None
        names = ", ".join(unsafe_globals[:3]) or "Python objects"
        if not allow_pickle:
            raise UnsafeFileError(
                f"{path}: loading it would run code from the file (it pickles {names}); "
                f"if you trust its source, rerun with {TRUST_FLAG} (allow_pickle=True), or save a "
                "state_dict and pass --model package.module:factory"
            ) from None
    log.warning("%s: unpickling with code execution allowed (%s)", path, TRUST_FLAG)
    try:
        with _quiet_torch_load():
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"{path}: unpickling failed ({one_line(exc, 140)}); the file needs code "
            "that is not importable here or is corrupt"
        ) from None


@contextlib.contextmanager
def _quiet_torch_load() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol.*")
        warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
        yield


def _load_reason(exc: BaseException) -> str:
    """A short reason for a torch.load failure (torch's own messages run to several lines)."""
    text = one_line(str(exc))
    m = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    if m:
        return m.group(1).strip().rstrip(".") or "unsupported pickle content"
    if isinstance(exc, (KeyError, IndexError, ValueError)) or not text:
        return f"unrecognized data, {type(exc).__name__}"
    if "PytorchStreamReader" in text:
        text = text.split(". This is an internal")[0]
    return one_line(text, 120)


def _unsafe_globals(path: Path, exc: BaseException, zip_info: _ZipInfo | None) -> list[str] | None:
    """Names the file would import if unpickled freely, or None when it is simply unreadable."""
    text = str(exc)
    found = _GLOBAL_RE.findall(text)
    if found:
        return found
    if not isinstance(exc, Exception) or "Weights only load failed" not in text:
        return None
    # The weights-only unpickler stopped on an opcode it does not support: scan the pickle
    # stream (without executing it) to tell a code-carrying pickle from garbage.
    try:
        if zip_info is not None:
            with zipfile.ZipFile(path) as zf:
                name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
                data = zf.read(name)
        else:
            data = path.read_bytes()
    except Exception:  # noqa: BLE001
        return None
    globals_ = _pickle_globals(data)
    if not globals_:
        return None
    harmless = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage"}
    risky = [g for g in globals_ if g not in harmless]
    return risky or None


# --------------------------------------------------------------------------------------------
# torch.export programs
# --------------------------------------------------------------------------------------------

_PT2_ALLOWED = [
    re.compile(p)
    for p in (
        r"archive_format",
        r"archive_version",
        r"byteorder",
        r"version",
        r"\.data/version",
        r"\.data/serialization_id",
        r"\.format_version",
        r"\.storage_alignment",
        r"models/[\w.-]+\.json",
        r"data/weights/weight_\d+",
        r"data/weights/[\w.-]+_weights_config\.json",
        r"data/constants/tensor_\d+",
        r"data/constants/[\w.-]+_constants_config\.json",
        r"data/sample_inputs/[\w.-]+\.pt",
        r"extra/[\w.-]+",
    )
]


def _check_pt2_archive(path: Path, info: _ZipInfo, *, trusted: bool = False) -> None:
    """Reject .pt2 archives whose loading would unpickle arbitrary objects or, unless ``trusted``,
    whose program JSON holds anything torch turns into code (see :mod:`deployprune._pt2_schema`)."""
    from ._pt2_schema import check_payload_config, check_program_json

    with zipfile.ZipFile(path) as zf:
        sizes = {}
        for zinfo in zf.infolist():
            rel = zinfo.filename.split("/", 1)[1] if "/" in zinfo.filename else zinfo.filename
            sizes[rel] = zinfo.file_size
        for name in info.names:
            rel = name.split("/", 1)[1] if "/" in name else name
            if name.endswith("/") or not rel:
                continue
            if not any(p.fullmatch(rel) for p in _PT2_ALLOWED):
                raise UnsafeFileError(
                    f"{path}: unexpected entry {rel!r} in the torch.export archive "
                    "(pickled objects, compiled code or a legacy layout); deployprune only "
                    "loads plain-tensor .pt2 programs: re-export with torch.export.save"
                )
            if not trusted and rel.startswith("models/"):
                check_program_json(zf.read(name), path=str(path), entry=rel)
            elif not trusted and rel.endswith("_config.json"):
                kind = rel.split("/")[1]  # data/weights/... or data/constants/...

                def record_size(record: str, kind: str = kind) -> int | None:
                    return sizes.get(f"data/{kind}/{record}")

                check_payload_config(zf.read(name), path=str(path), entry=rel, kind=kind, record_size=record_size)
            elif rel.endswith("_config.json"):
                try:
                    config = json.loads(zf.read(name)).get("config", {})
                except (ValueError, AttributeError) as exc:
                    raise InputError(f"{path}: corrupt archive entry {rel} ({one_line(exc, 80)})") from None
                for key, meta in config.items():
                    if not isinstance(meta, Mapping) or meta.get("use_pickle", False):
                        raise UnsafeFileError(
                            f"{path}: tensor {key!r} in the torch.export archive is pickled; "
                            "loading it would run code from the file; re-export with plain tensors"
                        )
            if rel.startswith("data/sample_inputs/"):
                try:
                    with _quiet_torch_load():
                        torch.load(io.BytesIO(zf.read(name)), weights_only=True)
                except Exception:  # noqa: BLE001
                    raise UnsafeFileError(
                        f"{path}: the archive's sample inputs ({rel}) need pickled code to "
                        "load; re-export the program with tensor inputs"
                    ) from None


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Force ``weights_only=True`` for loads torch.export performs internally (defence in depth)."""
    original = torch.load

    def guarded(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = guarded  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


def _load_pt2(path: Path, info: _ZipInfo, *, trusted: bool = False
              ) -> tuple[nn.Module, list[InputShape] | None, tuple[torch.Tensor, ...] | None]:
    _check_pt2_archive(path, info, trusted=trusted)
    if trusted:
        log.warning("%s: loading the torch.export program without checking it for code (%s)", path, TRUST_FLAG)
    torch_export_logger = logging.getLogger("torch.export")
    previous = torch_export_logger.level
    torch_export_logger.setLevel(logging.ERROR)
    try:
        with _weights_only_torch_load(), _quiet_torch_load():
            program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"{path}: cannot load the torch.export program ({one_line(exc, 120)}); "
            "the file is corrupt or from an incompatible torch version"
        ) from None
    finally:
        torch_export_logger.setLevel(previous)
    shapes = _program_input_shapes(program, str(path))
    stored: tuple[torch.Tensor, ...] | None = None
    example = getattr(program, "example_inputs", None)
    if example:
        args, kwargs = example
        if not kwargs and args and all(isinstance(a, torch.Tensor) for a in args):
            stored = tuple(a.detach().clone() for a in args)
    try:
        module = program.module()
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedError(
            f"{path}: cannot turn the torch.export program into a module ({one_line(exc, 120)})"
        ) from None
    return module, shapes, stored


def _program_input_shapes(program: Any, where: str) -> list[InputShape] | None:
    """Static shapes of the program's tensor inputs, held to the checkpoint bound (None if dynamic)."""
    user_inputs = set(program.graph_signature.user_inputs)
    shapes = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        dims = []
        for d in val.shape:
            if not isinstance(d, int):
                return None  # dynamic dimension: the user must give --input-shape
            dims.append(int(d))
        shapes.append(InputShape(_bounded(tuple(dims), where, "program input shape"), val.dtype))
    return shapes or None


# --------------------------------------------------------------------------------------------
# Factories and the models registry
# --------------------------------------------------------------------------------------------


def _registry() -> Any | None:
    from . import zoo  # the registry shipped inside deployprune (folder models/)

    return zoo


def _spec_shapes(spec: Any) -> list[InputShape] | None:
    inputs = getattr(spec, "inputs", None)
    if not inputs:
        return None
    out = []
    for item in inputs:
        shape = tuple(int(d) for d in getattr(item, "shape", item))
        dtype = getattr(item, "dtype", torch.float32)
        if isinstance(dtype, str):
            dtype = DTYPES.get(dtype.lower(), torch.float32)
        out.append(InputShape(shape, dtype, getattr(item, "high", None)))
    return out


def spec_for_factory(factory: str) -> Any | None:
    reg = _registry()
    fn = getattr(reg, "spec_for_factory", None) if reg is not None else None
    if fn is None:
        return None
    try:
        return fn(factory)
    except Exception:  # noqa: BLE001 - an unknown factory simply has no spec
        return None


def registry_spec(arch: str, where: str) -> Any:
    reg = _registry()
    if reg is None:
        raise InputError(f"{where}: names architecture {arch!r} but the models registry is not installed")
    try:
        return reg.get(arch)
    except Exception:  # noqa: BLE001
        known = ""
        names = getattr(reg, "names", None)
        if callable(names):
            with contextlib.suppress(Exception):
                known = f"; known: {', '.join(sorted(names())[:20])}"
        raise InputError(f"{where}: unknown architecture {arch!r} in the models registry{known}") from None


def _build_arch(arch: str, spec: Any, where: str) -> nn.Module:
    reg = _registry()
    try:
        if reg is not None and hasattr(reg, "build"):
            model = reg.build(arch)
        else:
            model = spec.factory()
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{where}: building architecture {arch!r} failed ({one_line(exc, 120)})") from None
    return _expect_module(model, f"architecture {arch!r}", where)


def _expect_module(obj: Any, what: str, where: str) -> nn.Module:
    if not isinstance(obj, nn.Module):
        raise InputError(f"{where}: {what} returned {type(obj).__name__}, not a torch.nn.Module")
    return obj


def resolve_factory(factory: str, *, where: str = "--model", error: type[DeployPruneError] = UsageError) -> Any:
    """Import ``package.module:callable`` (``callable`` may be dotted: ``mod:Class.build``).

    A path that does not import is ``error``: a usage error (exit 2) for one the user gave, as for
    ``--optimizer``; the loader passes ``InputError`` for a factory named by a file.
    """
    if not isinstance(factory, str) or factory.count(":") != 1:
        raise UsageError(f"{where} {factory!r}: expected package.module:factory "
                         "(e.g. deployprune.zoo.lenet:TorchModel)")
    mod_name, attr = factory.split(":")
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*", mod_name) or not re.fullmatch(
        r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", attr
    ):
        raise UsageError(f"{where} {factory!r}: expected package.module:factory "
                         "(e.g. deployprune.zoo.lenet:TorchModel)")
    return import_callable(mod_name, attr, label=f"{where} {factory!r}", error=error)


def build_from_factory(factory: str, *, where: str = "--model",
                       error: type[DeployPruneError] = UsageError) -> nn.Module:
    fn = resolve_factory(factory, where=where, error=error)
    try:
        model = fn()
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"{where} {factory!r}: calling the factory with no arguments failed "
            f"({type(exc).__name__}: {one_line(exc, 100)})"
        ) from None
    return _expect_module(model, f"factory {factory!r}", where)


def canonical_factory(factory: str, *, from_file: bool) -> str:
    """``factory`` with the zoo's old top-level spelling (``models.lenet:TorchModel``, written by
    deployprune 0.1 when the zoo was installed as ``models``) mapped to ``deployprune.zoo.lenet:...``.

    From a file the old spelling always meant the zoo. From the user (``--model``) it is mapped only
    when no other ``models`` package is importable, so a user's own ``models`` keeps working.
    """
    if not isinstance(factory, str):
        return factory
    zoo = _registry()
    mapped = zoo.canonical_factory_path(factory)
    if mapped == factory:
        return factory
    if not from_file:
        import importlib.util

        try:
            spec = importlib.util.find_spec(factory.split(".", 1)[0])
        except (ImportError, ValueError):
            spec = None
        ours = {Path(p).resolve() for p in zoo.__path__}
        if spec is not None and not ours & {Path(p).resolve() for p in spec.submodule_search_locations or ()}:
            return factory  # the user's own ``models`` package
    log.info("model factory %s is now spelled %s", factory, mapped)
    return mapped


def _is_trusted_factory(factory: str) -> bool:
    """A factory a file may name: a registered model of the zoo (an allowlist of names, not a namespace:
    a file naming ``deployprune.cli:main`` or ``deployprune.zoo.make_samples:main`` must not call it)."""
    from ._imports import MODEL_FACTORY, is_file_callable

    return is_file_callable(factory, MODEL_FACTORY)


# --------------------------------------------------------------------------------------------
# State dicts (plain, parametrized, torch.nn.utils.prune style)
# --------------------------------------------------------------------------------------------

_PARAM_ORIG = re.compile(r"^(?:(.*)\.)?parametrizations\.(\w+)\.original$")
_PARAM_MASK = re.compile(r"^(?:(.*)\.)?parametrizations\.(\w+)\.(\d+)\.mask$")
_PARAM_ANY = re.compile(r"(^|\.)parametrizations\.")


def split_pruned_state_dict(sd: Mapping[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], Masks]:
    """Plain weights and masks from a state_dict saved with masks still attached.

    Handles ``torch.nn.utils.parametrize`` keys (``m.parametrizations.weight.original`` and
    ``m.parametrizations.weight.<i>.mask``) and ``torch.nn.utils.prune`` keys (``m.weight_orig``,
    ``m.weight_mask``). The plain weight is the *unmasked* original; the mask comes back separately.
    """
    plain: dict[str, torch.Tensor] = {}
    masks: dict[str, dict[str, torch.Tensor]] = {}
    originals: dict[tuple[str, str], torch.Tensor] = {}
    prune_masks: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _PARAM_ORIG.match(key)
        if m:
            originals[(m.group(1) or "", m.group(2))] = value
            continue
        m = _PARAM_MASK.match(key)
        if m:
            mod, pname = m.group(1) or "", m.group(2)
            mask = value.detach().to(torch.bool)
            prev = masks.setdefault(mod, {}).get(pname)
            masks[mod][pname] = mask if prev is None else _and_masks(prev, mask, f"{where}: {key}")
            continue
        if _PARAM_ANY.search(key):
            raise UnsupportedError(
                f"{where}: state_dict key {key!r} belongs to a parametrization deployprune cannot "
                "undo (only masks are supported); remove it with "
                "torch.nn.utils.parametrize.remove_parametrizations before saving"
            )
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in sd:
            continue
        if key.endswith("_mask") and key[: -len("_mask")] + "_orig" in sd:
            prune_masks[key[: -len("_mask")]] = value
            continue
        plain[key] = value
    for full, mask in prune_masks.items():
        mod, _, pname = full.rpartition(".")
        plain[full] = sd[full + "_orig"]
        masks.setdefault(mod, {})[pname] = mask.detach().to(torch.bool)
    for (mod, pname), value in originals.items():
        full = f"{mod}.{pname}" if mod else pname
        plain[full] = value
        if pname not in masks.get(mod, {}):
            raise InputError(
                f"{where}: {full} is parametrized but its mask was not saved; save the model after "
                "pruner.finalize()/remove_parametrizations or save the masks with the weights"
            )
    # Masks stored as per-output-channel vectors (torch.ao FakeStructuredSparsity) -> weight shape.
    for mod, per in masks.items():
        for pname, mask in per.items():
            full = f"{mod}.{pname}" if mod else pname
            weight = plain.get(full)
            if weight is None:
                raise InputError(f"{where}: mask for {full} has no matching weight in the state_dict")
            if mask.shape != weight.shape and mask.dim() == 1 and weight.dim() >= 1 and mask.numel() == weight.shape[0]:
                per[pname] = mask.reshape([-1] + [1] * (weight.dim() - 1)).expand_as(weight).clone()
    return plain, masks


def _and_masks(a: torch.Tensor, b: torch.Tensor, where: str) -> torch.Tensor:
    try:
        return a & b
    except RuntimeError:
        raise MaskError(
            f"{where}: stacked masks have incompatible shapes {tuple(a.shape)} and {tuple(b.shape)}"
        ) from None


def _check_state_dict(sd: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(sd, Mapping):
        raise InputError(f"{where}: expected a state_dict (dict of tensors), got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise InputError(f"{where}: state_dict keys must be strings, got {k!r}")
        if not isinstance(v, torch.Tensor):
            raise InputError(f"{where}: state_dict entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v
    return out


def load_state_dict_into(model: nn.Module, sd: Mapping[str, torch.Tensor], where: str, what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line message naming the mismatching keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {few(unexpected)}")
        raise InputError(
            f"{where}: the weights do not fit {what}: {'; '.join(parts)}; "
            "check that --model names the architecture the weights were saved from"
        )
    bad = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if tuple(sd[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise InputError(
            f"{where}: the weights do not fit {what}: shape mismatch for {few(bad)} "
            "(file vs model); "
            "check that --model names the architecture the weights were saved from"
        )
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{where}: loading the weights into {what} failed ({one_line(exc, 120)})") from None


# --------------------------------------------------------------------------------------------
# Compact checkpoints: rebuild smaller modules from the shapes in the state_dict
# --------------------------------------------------------------------------------------------


def _resized(module: nn.Module, sd: Mapping[str, torch.Tensor], prefix: str) -> nn.Module | None:
    """A copy of ``module`` sized for the tensors in ``sd`` (None if it already fits)."""

    def get(name: str) -> torch.Tensor | None:
        return sd.get(f"{prefix}{name}")

    w = get("weight")
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and w is not None:
        out_c, in_per_group = int(w.shape[0]), int(w.shape[1])
        if out_c == module.out_channels and in_per_group == module.in_channels // module.groups:
            return None
        groups = module.groups
        if groups > 1 and groups == module.in_channels:
            # depthwise (channel multiplier k = out/in): the group count follows the channel count
            groups = out_c // (module.out_channels // module.groups)
        in_c = in_per_group * groups
        new = type(module)(
            in_c,
            out_c,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
        )
        return new
    if isinstance(module, nn.Linear) and w is not None:
        if tuple(w.shape) == (module.out_features, module.in_features):
            return None
        return nn.Linear(int(w.shape[1]), int(w.shape[0]), bias=module.bias is not None)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        rm = get("running_mean") if get("running_mean") is not None else w
        if rm is None or int(rm.shape[0]) == module.num_features:
            return None
        return type(module)(
            int(rm.shape[0]),
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
    if isinstance(module, nn.LayerNorm) and w is not None:
        if tuple(w.shape) == tuple(module.normalized_shape):
            return None
        return nn.LayerNorm(tuple(w.shape), eps=module.eps, elementwise_affine=True, bias=get("bias") is not None)
    if isinstance(module, nn.GroupNorm) and w is not None:
        if int(w.shape[0]) == module.num_channels:
            return None
        per_group = module.num_channels // module.num_groups
        return nn.GroupNorm(int(w.shape[0]) // per_group, int(w.shape[0]), eps=module.eps, affine=module.affine)
    if isinstance(module, nn.Embedding) and w is not None:
        if tuple(w.shape) == (module.num_embeddings, module.embedding_dim):
            return None
        return nn.Embedding(int(w.shape[0]), int(w.shape[1]), padding_idx=module.padding_idx)
    return None


def resize_to_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> int:
    """Swap Conv/Linear/norm/Embedding modules whose tensors in ``sd`` differ; returns the count."""
    replaced = 0
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        new = _resized(module, sd, prefix)
        if new is None:
            continue
        new.train(module.training)
        if not name:
            raise UnsupportedError("the root module itself cannot be resized")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        replaced += 1
    return replaced


# --------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready for the pipeline: eval mode, example inputs that run, validated masks."""

    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    masks: Masks
    source: Path
    kind: str  # "checkpoint" | "state_dict" | "export" | "pickle"
    factory: str | None = None
    arch: str | None = None
    input_shapes: list[InputShape] = field(default_factory=list)
    compact: bool = False
    files: tuple[Path, ...] = ()  # every file read (model, masks): outputs must never replace them
    meta: dict[str, Any] = field(default_factory=dict)  # a checkpoint's "meta" (plain data, e.g. the budget)

    @property
    def has_masks(self) -> bool:
        return bool(self.masks)


def load_model(
    path: str | os.PathLike,
    *,
    model_factory: str | None = None,
    allow_pickle: bool = False,
    input_shapes: Sequence[str | InputShape] | None = None,
    masks: str | os.PathLike | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    check_forward: bool = True,
) -> LoadedModel:
    """Load a model file of any supported kind, plus optional masks and input shapes.

    ``model_factory``: ``package.module:callable`` building the architecture (required for a
    plain state_dict). ``input_shapes``: strings like ``"1,3,224,224"`` or :class:`InputShape`
    (override any shape known from the registry or the file). ``masks``: path of an NNI-layout
    masks file; replaces masks stored in the model file.
    """
    if Path(path).is_dir() and (Path(path) / "config.json").is_file():
        raise UsageError(f"{path}: is a Hugging Face model directory; load it with deployprune.hf.load_directory "
                         "(dp.load and the command line do)")
    path = check_input_file(path, max_bytes=max_file_bytes)
    if path.suffix.lower() in (".onnx", ".mlpackage", ".mlmodel", ".tflite"):
        raise InputError(
            f"{path}: is a deployment artifact, not a PyTorch model; pass the PyTorch model "
            "(state_dict/checkpoint/.pt2) it was made from"
        )
    user_shapes = [s if isinstance(s, InputShape) else parse_input_shape(s) for s in (input_shapes or [])]
    if model_factory is not None:
        model_factory = canonical_factory(model_factory, from_file=False)
        resolve_factory(model_factory)  # fail fast on a typo, before reading a large file
    where = str(path)

    info = _inspect_zip(path, max_file_bytes)
    stored_inputs: tuple[torch.Tensor, ...] | None = None
    shapes: list[InputShape] | None = None
    factory: str | None = None
    arch: str | None = None
    file_masks: Masks | dict = {}
    compact = False
    meta: dict[str, Any] = {}

    if _is_pt2(info):
        assert info is not None
        model, shapes, stored_inputs = _load_pt2(path, info, trusted=allow_pickle)
        kind = "export"
        if model_factory:
            log.warning("%s: --model is ignored for a torch.export program (it carries its own graph)", path)
    else:
        obj = torch_load(path, allow_pickle=allow_pickle, max_bytes=max_file_bytes, zip_info=info)
        if isinstance(obj, nn.Module):
            model, kind = obj, "pickle"
            if model_factory:
                log.warning("%s: --model is ignored for a pickled module", path)
            model, file_masks = _detach_attached(model)
        elif isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
            model, file_masks, shapes, factory, arch, compact = _from_checkpoint(obj, path, model_factory)
            kind = "checkpoint"
            if isinstance(obj.get("meta"), Mapping):
                meta = dict(obj["meta"])
        elif isinstance(obj, Mapping) and "format" in obj and isinstance(obj.get("format"), str):
            raise InputError(f"{path}: unknown checkpoint format {obj['format']!r}; expected {CHECKPOINT_FORMAT!r}")
        elif isinstance(obj, Mapping):
            if _looks_like_masks(obj):
                raise InputError(
                    f"{path}: holds masks, not model weights; pass it with --masks and give the model file"
                )
            if model_factory is None:
                raise UsageError(
                    f"{path}: is a state_dict; pass the architecture with "
                    "--model package.module:factory "
                    "(e.g. --model deployprune.zoo.lenet:TorchModel)"
                )
            sd = _check_state_dict(obj, where)
            plain, file_masks = split_pruned_state_dict(sd, where)
            model = build_from_factory(model_factory)
            load_state_dict_into(model, plain, where, f"--model {model_factory}")
            factory, kind = model_factory, "state_dict"
            spec = spec_for_factory(model_factory)
            shapes = _spec_shapes(spec) if spec is not None else None
        else:
            raise InputError(f"{path}: holds a {type(obj).__name__}, not a model, state_dict or deployprune checkpoint")

    if kind != "export":  # an exported program's module has its mode baked in (and no .eval())
        model.eval()
    if file_masks:
        file_masks = normalize_masks(model, file_masks, source=f"{path} (stored masks)")
    if masks is not None:
        if file_masks:
            log.info("%s: masks from %s replace the masks stored in the model file", path, masks)
        file_masks = load_masks(masks, model, max_file_bytes=max_file_bytes)

    if user_shapes:
        shapes = user_shapes
        example = make_example_inputs(shapes)
    elif stored_inputs is not None:
        example = stored_inputs
        shapes = [InputShape(tuple(t.shape), t.dtype) for t in stored_inputs]
    elif shapes:
        example = make_example_inputs(shapes)
    else:
        raise UsageError(
            f"{path}: the input shape of this model is unknown; pass --input-shape, "
            "e.g. --input-shape 1,3,224,224 (repeat it for several inputs)"
        )

    loaded = LoadedModel(
        model=model,
        example_inputs=example,
        masks=dict(file_masks),
        source=path,
        kind=kind,
        factory=factory,
        arch=arch,
        input_shapes=list(shapes or []),
        compact=compact,
        files=tuple(Path(p) for p in (path, masks) if p is not None),
        meta=meta,
    )
    if check_forward:
        check_runs(loaded.model, loaded.example_inputs, where, user_given=bool(user_shapes))
    return loaded


def _looks_like_masks(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, Mapping) for v in obj.values())


def remove_parametrizations_(model: nn.Module, *, leave_parametrized: bool) -> None:
    """Remove every parametrization from ``model`` without touching shared classes (see masks)."""
    from .masks import strip_parametrizations_

    strip_parametrizations_(model, leave_parametrized=leave_parametrized)


def _detach_attached(model: nn.Module) -> tuple[nn.Module, Masks]:
    """Take pruning masks off a module: dense weights stay, the masks come back separately.

    Handles ``torch.nn.utils.parametrize`` parametrizations carrying a ``mask`` and
    ``torch.nn.utils.prune`` forward pre-hooks (``weight_orig`` / ``weight_mask``).
    """
    from .masks import detach_prune_hooks_, extract_attached_masks

    masks = extract_attached_masks(model)
    remove_parametrizations_(model, leave_parametrized=False)
    for mod_name, per in detach_prune_hooks_(model).items():
        masks.setdefault(mod_name, {}).update(per)
    return model, masks


def check_runs(model: nn.Module, inputs: tuple[torch.Tensor, ...], where: str, *, user_given: bool = True) -> None:
    """Run one forward pass; a failure is reported as a wrong input shape, in one line."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # noqa: BLE001
        fix = (
            "pass the shape the model expects with --input-shape"
            if user_given
            else "pass the right shape with --input-shape"
        )
        raise InputError(
            f"{where}: the model fails on input {describe_inputs(inputs)} "
            f"({type(exc).__name__}: {one_line(exc, 140)}); {fix}"
        ) from None


def _from_checkpoint(obj: Mapping, path: Path, user_factory: str | None):
    where = str(path)
    version = obj.get("version")
    if not isinstance(version, int):
        raise InputError(f"{where}: checkpoint 'version' must be an integer, got {type(version).__name__}")
    if version > CHECKPOINT_VERSION:
        raise InputError(
            f"{where}: checkpoint version {version} was written by a newer deployprune "
            f"(this one reads version {CHECKPOINT_VERSION}); upgrade deployprune"
        )
    arch = obj.get("arch")
    factory = obj.get("factory")
    if arch is not None and not isinstance(arch, str):
        raise InputError(f"{where}: checkpoint 'arch' must be a string, got {type(arch).__name__}")
    if factory is not None and not isinstance(factory, str):
        raise InputError(f"{where}: checkpoint 'factory' must be a string, got {type(factory).__name__}")
    if factory is not None:
        factory = canonical_factory(factory, from_file=True)
    sd = _check_state_dict(obj.get("state_dict"), f"{where}: checkpoint 'state_dict'")
    raw_masks = obj.get("masks") or {}
    if not isinstance(raw_masks, Mapping):
        raise InputError(f"{where}: checkpoint 'masks' must be a dict, got {type(raw_masks).__name__}")
    compact = bool(obj.get("compact", False))
    shapes = _shapes_from_json(obj["input_shapes"], where) if obj.get("input_shapes") is not None else None

    spec = None
    if user_factory is not None:
        if factory is not None and factory != user_factory:
            log.warning(
                "%s: using --model %s instead of the factory %s stored in the file",
                path,
                user_factory,
                factory,
            )
        model = build_from_factory(user_factory)
        factory, arch_used = user_factory, None
        spec = spec_for_factory(user_factory)
        what = f"--model {user_factory}"
    elif arch is not None:
        spec = registry_spec(arch, where)
        model = _build_arch(arch, spec, where)
        arch_used = arch
        what = f"architecture {arch!r}"
    elif factory is not None:
        if not _is_trusted_factory(factory):
            raise UnsafeFileError(
                f"{where}: names model factory {factory!r}, "
                "which is not a model of the deployprune zoo; "
                f"importing it would run code named by the file; if you trust it, pass "
                f"--model {factory}"
            )
        model = build_from_factory(factory, where=f"{where}: factory", error=InputError)
        spec = spec_for_factory(factory)
        arch_used = None
        what = f"factory {factory}"
    else:
        raise InputError(f"{where}: checkpoint names neither 'arch' nor 'factory'; pass --model package.module:factory")

    plain, attached = split_pruned_state_dict(sd, where)
    if compact:
        resize_to_state_dict(model, plain)
    load_state_dict_into(model, plain, where, what)
    masks: dict = dict(attached)
    for mod, per in raw_masks.items():
        if not isinstance(per, Mapping):
            raise MaskError(f"{where}: checkpoint masks for {mod!r} must be a dict {{param_name: mask}}")
        masks.setdefault(mod, {}).update(per)
    if shapes is None and spec is not None:
        shapes = _spec_shapes(spec)
    return model, masks, shapes, factory, arch_used, compact


def load_masks(path: str | os.PathLike, model: nn.Module, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Masks:
    """An NNI-layout masks file (``{name: {"weight": mask}}``), validated against ``model``.

    A deployprune checkpoint is accepted too (its ``masks`` entry is used).
    """
    path = check_input_file(path, max_bytes=max_file_bytes, what="masks file")
    obj = torch_load(path, allow_pickle=False, max_bytes=max_file_bytes, what="masks file")
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj.get("masks") or {}
    if not isinstance(obj, Mapping):
        raise MaskError(
            f"{path}: expected masks as a dict {{module_name: {{param_name: mask}}}}, got {type(obj).__name__}"
        )
    return normalize_masks(model, obj, source=str(path))


# --------------------------------------------------------------------------------------------
# Writing checkpoints
# --------------------------------------------------------------------------------------------


def make_checkpoint(
    model: nn.Module,
    *,
    arch: str | None = None,
    factory: str | None = None,
    masks: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    input_shapes: Sequence[InputShape] | None = None,
    compact: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The dict :func:`save_checkpoint` writes (plain tensors: loads with weights_only=True)."""
    if (arch is None) == (factory is None):
        raise UsageError("a checkpoint needs exactly one of arch= (registry name) or factory= (package.module:fn)")
    attached: Masks = {}
    if any(hasattr(m, "parametrizations") for m in model.modules()):
        # keep the dense (unmasked) weights: the masks travel separately
        model, attached = _detach_attached(copy.deepcopy(model))
    ckpt: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}
    if arch is not None:
        ckpt["arch"] = arch
    else:
        ckpt["factory"] = factory
    ckpt["state_dict"] = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    all_masks = dict(attached)
    for mod, per in (masks or {}).items():
        all_masks.setdefault(mod, {}).update(per)
    if all_masks:
        ckpt["masks"] = {
            mod: {p: m.detach().cpu().to(torch.bool).contiguous() for p, m in per.items()}
            for mod, per in all_masks.items()
        }
    if input_shapes:
        ckpt["input_shapes"] = [s.to_json() for s in input_shapes]
    if compact:
        ckpt["compact"] = True
    if meta:
        ckpt["meta"] = dict(meta)
    return ckpt


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, force: bool = False, **kwargs: Any) -> Path:
    """Write a deployprune checkpoint atomically (see :func:`make_checkpoint` for the fields)."""
    from .fsutil import atomic_output

    ckpt = make_checkpoint(model, **kwargs)
    # Serialize in memory first: torch's zip writer turns a failed disk write (disk full) into a
    # RuntimeError or worse; a plain write of finished bytes fails as an OSError -> OutputError.
    # A file object also keeps the archive's inner folder name fixed ("archive"), so the same
    # checkpoint always produces the same bytes whatever the (temporary) file name.
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    with atomic_output(path, force=force) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(path)
