"""The one-shot pipelines behind ``deployprune export`` and ``deployprune finalize``.

``run_export``: loaded model -> finalize (compact) -> convert -> validate against the masked
source in onnxruntime (plus a dense, uncompacted export of the same masked model, timed like for
like) -> summary + JSON report next to the artifact.

Outputs are produced in a private staging directory next to the destination and moved into
place only when complete (and, unless ``keep_failed``, only when validation passed), so an
error, Ctrl-C or SIGTERM never leaves a partial or unverified artifact at the output path.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import progress
from .errors import DeployPruneError, OutputError, ParityError, UnsupportedError, UsageError, one_line
from .fsutil import JOURNAL, PREVIOUS, backup_path, check_writable, journal, remove_stale, staging_prefix, undo
from .fsutil import commit as fs_commit
from .io import LoadedModel, describe_inputs
from .masks import Masks, apply_masks_, mask_sparsity
from .stats import count_params  # noqa: F401 - also imported from here (examples, benchmarks)

log = logging.getLogger(__name__)

REPORT_SUFFIX = ".report.json"
DEFAULT_SUFFIXES = {"onnx": ".onnx", "coreml": ".mlpackage", "torchscript": ".pt"}


# --------------------------------------------------------------------------------------------
# Output paths and staging
# --------------------------------------------------------------------------------------------


def target_suffix(target: str) -> str:
    try:
        from . import converters

        suffix = getattr(converters.get(target), "SUFFIX", None)
    except DeployPruneError:
        raise
    except Exception:  # noqa: BLE001 - converters package missing: fall back to the table
        suffix = None
    return suffix or DEFAULT_SUFFIXES.get(target, f".{target}")


def resolve_output(out: str | os.PathLike | None, source: Path, target: str) -> tuple[Path, Path | None]:
    """The artifact path for ``out`` and the directory to create for it (or None), checked before any
    work. ``out`` may be a file with the target's suffix, or a directory (``outdir/``, an existing
    directory, or a name without a suffix), which receives ``<source stem><suffix>``. A file named
    for another target (``z.onnx`` for Core ML) is a usage error."""
    suffix = target_suffix(target)
    if out is None:
        return default_output(source, suffix), None
    text = os.fspath(out)
    path = Path(text)
    as_dir = (text.endswith(("/", os.sep)) or (path.is_dir() and path.suffix.lower() != suffix)
              or (not path.suffix and not path.exists()))
    if as_dir:
        if path.exists() and not path.is_dir():
            raise OutputError(f"{text}: not a directory; name the artifact, e.g. {path.with_suffix(suffix)}")
        return default_output(source, suffix, directory=path), (None if path.is_dir() else path)
    if path.suffix.lower() != suffix:
        kind = "directory" if suffix == ".mlpackage" else "file"
        raise UsageError(f"{text}: the {target} target writes a '{suffix}' {kind}; name the output "
                         f"{path.with_suffix(suffix)} (or give a directory)")
    return path, None


@contextlib.contextmanager
def unstaged(stage: Any, staged: Path, dest: Path) -> Iterator[None]:
    """Errors raised and warnings logged inside name ``dest``, never the private staging path they were
    written to."""
    staging_dir = str(getattr(stage, "dir", staged.parent))

    def fix(msg: str) -> str:
        return msg.replace(str(staged), str(dest)).replace(staging_dir, str(dest.parent))

    factory = logging.getLogRecordFactory()

    def record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        if record.name.startswith("deployprune"):
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a malformed record is logging's to report, as it is
                return record
            fixed = fix(message)
            if fixed != message:
                record.msg, record.args = fixed, None
        return record

    logging.setLogRecordFactory(record_factory)
    try:
        yield
    except DeployPruneError as exc:
        msg = str(exc)
        fixed = fix(msg)
        if fixed == msg:
            raise
        try:
            new = type(exc)(fixed)
        except Exception:  # noqa: BLE001 - an error class with another signature keeps its message
            raise exc from None
        raise new from exc.__cause__
    finally:
        logging.setLogRecordFactory(factory)


def default_output(source: Path, suffix: str, *, directory: Path | None = None) -> Path:
    """``<stem><suffix>`` in the current directory (never the input file itself)."""
    directory = Path(".") if directory is None else directory
    out = directory / f"{source.stem}{suffix}"
    if _same_file(out, source):
        out = directory / f"{source.stem}.out{suffix}"
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_not_input(out: Path, *inputs: Path | None) -> None:
    for src in inputs:
        if src is not None and _same_file(out, src):
            raise UsageError(f"{out}: the output would overwrite the input file; choose another -o path")


def report_path_for(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + REPORT_SUFFIX)


class Staging:
    """A private directory next to the destination; :meth:`publish` moves results into place.

    An output being replaced (``force``) is moved aside into the staging directory, not
    deleted, and restored if the run does not finish (:func:`deployprune.fsutil.undo`, driven
    by a journal written before every move, so a killed run is rolled back by the next one).
    """

    def __init__(self, dest: Path):
        parent = dest.parent if str(dest.parent) else Path(".")
        remove_stale(dest)  # what killed runs to the same output left behind
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=staging_prefix(dest), suffix=".partial", dir=parent))
        except OSError as exc:
            raise OutputError(
                f"{dest}: cannot write in {parent} ({exc.strerror or exc}); choose another output path"
            ) from None
        self.dest = dest
        self.published: list[Path] = []  # moved into place so far (undone if the run does not finish)
        self.retired: list[Path] = []  # previous outputs removed by this run (restored if it does not finish)

    def path(self, name: str | None = None) -> Path:
        return self.dir / (name or self.dest.name)

    def publish(self, staged: Path, dest: Path, *, force: bool) -> Path:
        """Move ``staged`` (and side files ``staged.name + suffix``) onto ``dest``."""
        sides = sorted(p for p in self.dir.iterdir()
                       if p.name.startswith(staged.name) and p != staged and p.name not in (JOURNAL, PREVIOUS))
        try:
            for side in sides:  # side files first (ONNX external data) so the main file is last
                target = dest.with_name(dest.name + side.name[len(staged.name) :])
                self._move_in(side, target, force=force)
            self._move_in(staged, dest, force=force)
        except OSError as exc:
            raise OutputError(
                f"{dest}: cannot move the result into place ({exc.strerror or exc}); check free space and permissions"
            ) from None
        return dest

    def retire(self, target: Path) -> bool:
        """Remove a previous output that does not belong to the new set (kept aside until the run
        is complete). Returns True if there was one."""
        if not (target.exists() or target.is_symlink()):
            return False
        self._check_sibling(target)
        journal(self.dir, "replaced", target)
        backup = backup_path(self.dir, target)
        backup.parent.mkdir(exist_ok=True)
        os.replace(target, backup)
        self.retired.append(target)
        return True

    def _check_sibling(self, target: Path) -> None:
        if os.path.abspath(target.parent) != os.path.abspath(self.dir.parent):
            raise OutputError(f"{target}: outputs of one run must share a directory with {self.dest}")

    def _move_in(self, src: Path, target: Path, *, force: bool) -> None:
        self._check_sibling(target)
        if target.exists() or target.is_symlink():
            if not force:
                raise OutputError(f"{target}: already exists; pass --force (force=True) to overwrite it")
            self.retire(target)
        else:
            journal(self.dir, "new", target)
        os.replace(src, target)
        self.published.append(target)

    def commit(self) -> None:
        """The new set is complete: the outputs it replaced are let go."""
        fs_commit(self.dir)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def rollback(self) -> bool:
        """Undo what was moved into place and put back what it replaced: several outputs appear
        together or not at all. False if that failed (the staging directory is then kept, and the
        next run to this output finishes the job)."""
        try:
            undo(self.dir)
        except OSError as exc:
            log.error("%s: could not restore the previous outputs (%s); they are kept in %s",
                      self.dest, exc, self.dir)
            return False
        self.published.clear()
        self.retired.clear()
        return True


@contextlib.contextmanager
def staging(dest: Path) -> Iterator[Staging]:
    """Staging directory for ``dest``; removed on exit (success, error, Ctrl-C or SIGTERM).

    An ``OSError`` raised inside (disk full, permissions) becomes a one-line OutputError.
    """
    stage = Staging(dest)
    try:
        try:
            yield stage
        except OutputError as exc:
            # a writer inside names its private staging path: name the user's output instead
            msg = str(exc)
            staged = str(stage.dir)
            if staged in msg:
                raise OutputError(
                    msg.replace(str(Path(staged) / dest.name), str(dest)).replace(staged, str(dest.parent))
                ) from None
            raise
        except OSError as exc:
            why = exc.strerror or one_line(exc, 200) or type(exc).__name__
            raise OutputError(f"{dest}: cannot write ({why}); check free space and permissions") from None
    except BaseException:  # error, Ctrl-C or SIGTERM: nothing of this run stays, what it replaced is back
        if stage.rollback():
            stage.cleanup()
        raise
    stage.commit()
    stage.cleanup()


@contextlib.contextmanager
def tracer_warnings() -> Iterator[list[str]]:
    """Collect the tracer's warnings raised inside (one line each, with the model's source line).

    Other warnings are passed on unchanged, to whatever filters the caller has set.
    """
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        yield found
    others = []
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            first = one_line(w.message, 200).split(". ", 1)[0].rstrip(".")
            text = f"{first} ({Path(w.filename).name}:{w.lineno})"
            if text not in found:
                found.append(text)
        else:
            others.append(w)
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


# --------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------


def masked_copy(model: nn.Module, masks: Masks) -> nn.Module:
    """The dense model with masks multiplied in: the reference every artifact is checked against."""
    from .io import remove_parametrizations_

    work = copy.deepcopy(model)
    remove_parametrizations_(work, leave_parametrized=True)
    if masks:
        apply_masks_(work, masks)
    return work


def _max_abs_diff(a: Any, b: Any) -> float:
    """Max abs error of ``b`` against ``a`` (infinite when shapes or non-finite values disagree)."""
    from .parity import compare_outputs

    return compare_outputs(_flatten(a), _flatten(b)).error


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return []


@dataclass
class Compacted:
    source: nn.Module  # masked dense model (reference)
    model: nn.Module  # compact model
    blocked: list  # finalize Blockers: ops that kept masked channels
    parity_max_abs: float
    seconds: float
    compacted: bool = True  # False: finalize gave up and returned the masked model
    masked_channels: int = 0
    removed_channels: int = 0
    kept: list = field(default_factory=list)  # finalize KeptChannels: masked channels that stay, with the reason
    abandoned: str = ""  # why compaction was abandoned (compacted is False)

    @property
    def blocked_text(self) -> list[str]:
        return [b.describe() if hasattr(b, "describe") else str(b) for b in self.blocked]

    def channel_lines(self) -> list[str]:
        """``removed 1,024 of 1,536 masked channels; kept 512 in 'encoder.layer.0.attention' (reason)``,
        then one line per group of kept channels when there are several."""
        head = f"removed {self.removed_channels:,} of {self.masked_channels:,} masked channels"
        if not self.compacted and not self.kept:  # otherwise the kept channels' reason says it
            head = f"compaction abandoned ({self.abandoned}), the masked model is used at full size; {head}"
        kept = sum(k.count for k in self.kept)
        if len(self.kept) == 1:
            return [f"{head}; {self.kept[0].describe()}"]
        if self.kept:
            return [f"{head}; kept {kept:,} in {len(self.kept)} groups:", *(k.describe() for k in self.kept)]
        return [head]

    def finalize_facts(self) -> dict[str, Any]:
        """The finalize section of the JSON report (plain JSON types)."""
        return {
            "torch_max_abs": self.parity_max_abs,
            "seconds": round(self.seconds, 3),
            "compacted": self.compacted,
            "abandoned": self.abandoned or None,
            "masked_channels": self.masked_channels,
            "removed_channels": self.removed_channels,
            "kept_channels": sum(k.count for k in self.kept),
            "kept": [k.to_dict() for k in self.kept],
            "blocked": self.blocked_text,
        }


@contextlib.contextmanager
def _held_finalize_log(name: str) -> Iterator[list[logging.LogRecord]]:
    """Hold back the ERROR records logger ``name`` emits inside; the caller shows them (``handle``)
    or replaces them by its own one-line error. Finalize's warning about kept masked channels is
    dropped: the summary lists them."""
    from .finalize import KEPT_RECORD

    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if getattr(record, KEPT_RECORD, False):
            return False
        if record.levelno >= logging.ERROR:
            held.append(record)
            return False
        return True

    logger = logging.getLogger(name)
    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)


def compact_loaded(loaded: LoadedModel, *, strict: bool = False, allow_uncompacted: bool = False) -> Compacted:
    """Finalize ``loaded`` (when it has masks) and measure torch parity against the masked model.

    ``strict``: any masked channel that stays is an :class:`UnsupportedError`. An abandoned
    compaction (finalize's self-check failed and it returned the masked model) is a
    :class:`ParityError` unless ``allow_uncompacted``, with which the masked model goes on at
    full size.
    """
    from .finalize import compact

    t0 = time.perf_counter()
    source = masked_copy(loaded.model, loaded.masks)
    comp = Compacted(source, source, [], 0.0, 0.0)
    if loaded.masks:
        with _held_finalize_log("deployprune.finalize") as held:
            result = compact(loaded.model, loaded.example_inputs, loaded.masks, strict=strict)
        comp.model, comp.blocked = result.model, list(result.blocked)
        comp.compacted, comp.abandoned = result.compacted, result.abandoned
        comp.masked_channels, comp.removed_channels = result.masked_channels, result.removed_channels
        comp.kept = list(result.kept)
        if not result.compacted and not allow_uncompacted:
            raise ParityError(
                f"{loaded.source}: compaction abandoned ({result.abandoned}); nothing was written. This is a "
                "deployprune bug: please report this model; --allow-uncompacted (allow_uncompacted=True) "
                "goes on with the masked model at full size"
            )
        for record in held:  # finalize's own account of what went wrong, unless the error above replaced it
            logging.getLogger(record.name).handle(record)
        if not result.compacted:
            log.warning("%s: compaction abandoned (%s); going on with the masked model at full size "
                        "(--allow-uncompacted)", loaded.source, result.abandoned)
    comp.model.eval()
    with torch.no_grad():
        comp.parity_max_abs = _max_abs_diff(source(*loaded.example_inputs), comp.model(*loaded.example_inputs))
    comp.seconds = time.perf_counter() - t0
    return comp


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


@dataclass
class ExportOutcome:
    """What ``run_export`` produced; ``exit_code`` is what the CLI returns."""

    target: str
    artifact: Path | None  # None when validation failed and the artifact was not kept
    report_path: Path | None
    passed: bool | None  # None: not validated
    params_before: int
    params_after: int
    size_bytes: int | None
    conversion: Any = None
    validation: Any = None
    blocked: list = field(default_factory=list)
    torch_parity: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)  # finalize: removed/masked channels, kept groups

    @property
    def exit_code(self) -> int:
        from .errors import EXIT_OK, EXIT_VALIDATION

        return EXIT_VALIDATION if self.passed is False else EXIT_OK

    def summary_lines(self) -> list[str]:
        lines = []
        shown = self.artifact if self.artifact is not None else "(not kept: validation failed)"
        size = f", {_fmt_size(self.size_bytes)}" if self.size_bytes is not None else ""
        lines.append(f"artifact:   {shown} ({self.target}{size})")
        validation_lines: list[str] = []
        if self.validation is not None:
            try:
                from .report import summary_lines

                validation_lines = list(summary_lines(self.validation))
            except Exception as exc:  # noqa: BLE001 - a rendering problem must not hide the verdict
                log.debug("summary_lines failed: %s", exc)
                validation_lines = [
                    f"validation: {'PASSED' if self.passed else 'FAILED'} "
                    f"(max abs error {getattr(self.validation, 'max_abs_error', float('nan')):.3g})"
                ]
        if not any(line.startswith("params") for line in validation_lines):
            ratio = self.params_after / self.params_before if self.params_before else 1.0
            lines.append(f"params:     {self.params_before:,} -> {self.params_after:,} ({ratio:.1%} of the source)")
        if self.channels:
            lines.append(f"compaction: {self.channels[0]}")
            lines.extend(f"  {c}" for c in self.channels[1:])
        if self.validation is not None:
            lines.extend(validation_lines)
        else:
            lines.append("validation: skipped (--no-validate)")
        if self.report_path is not None:
            lines.append(f"report:     {self.report_path}")
        lines.extend(f"note:       {n}" for n in self.notes)
        return lines


def _fmt_size(n: int | None) -> str:
    """Bytes as the report's size line writes them (``176 kB``, ``46.7 MB``): decimal units, 3 digits."""
    if n is None:
        return "?"
    for div, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def run_export(
    loaded: LoadedModel,
    target: str = "onnx",
    out: str | os.PathLike | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    force: bool = False,
    validate: bool = True,
    keep_failed: bool = False,
    thresholds: Any = None,
    n_inputs: int = 8,
    seed: int = 0,
    latency: Any = True,
    write_report: bool = True,
    strict: bool = False,
    allow_uncompacted: bool = False,
    name: str | None = None,
    accuracy_data: Any = None,
    accuracy_label: str | None = None,
    accuracy_known: Mapping[str, float | None] | None = None,
) -> ExportOutcome:
    """Load -> compact -> convert -> validate -> report. See the module docstring.

    ``name`` labels the run in its report (default: the model file's stem).
    ``accuracy_data`` (labelled validation batches, named ``accuracy_label``) adds the task
    accuracy of source and artifact to the report; ``accuracy_known`` are earlier figures on the
    same data (``deployprune run``: ``{"before pruning": 0.96}``), listed first.

    Warnings of the tracer during the conversion (``torch.jit.TracerWarning``: a tensor turned
    into a Python number or bool, an iteration over a tensor ...) mean the artifact may hold the
    example's values where the model computes them; they become report notes, and with
    ``strict`` a validation failure. ``strict`` also refuses (:class:`UnsupportedError`) when
    finalize keeps any masked channel; an abandoned compaction is a :class:`ParityError` unless
    ``allow_uncompacted`` (see :func:`compact_loaded`).
    """
    from . import converters

    converter = converters.get(target)
    options = dict(options or {})
    resolver = getattr(converters, "resolve_options", None)
    if resolver is not None and hasattr(converter, "OPTIONS"):
        resolver(target, converter.OPTIONS, options)  # reject unknown/mistyped options before work
    if out is not None:
        check_not_input(Path(out), *(loaded.files or (loaded.source,)))  # before its name is judged
    out_path, new_dir = resolve_output(out, loaded.source, target)
    if new_dir is not None:
        new_dir.mkdir(parents=True, exist_ok=True)  # -o outdir/: created, as optimum-cli does
    try:
        rpath, side = _check_outputs(loaded, converter, out_path, force=force,
                                     report=validate and write_report)
    except BaseException:
        if new_dir is not None:
            with contextlib.suppress(OSError):
                new_dir.rmdir()  # only if still empty
        raise

    seconds: dict[str, float] = {}
    with progress.stage(f"finalizing ({len(loaded.masks)} masked module(s))" if loaded.masks
                        else "checking the model (no masks: nothing to compact)"):
        comp = compact_loaded(loaded, strict=strict, allow_uncompacted=allow_uncompacted)
    seconds["finalize"] = comp.seconds
    notes: list[str] = []
    if comp.parity_max_abs > 1e-4:
        log.warning("compact model differs from the masked model by %.3g in torch", comp.parity_max_abs)

    with staging(out_path) as stage:
        staged = stage.path()
        t0 = time.perf_counter()
        with progress.stage(f"converting to {target}"), tracer_warnings() as traced, \
                unstaged(stage, staged, out_path):
            conversion = converter.convert(comp.model, loaded.example_inputs, staged, **options)
        if hasattr(conversion, "path"):
            with contextlib.suppress(AttributeError, TypeError):
                conversion.path = out_path  # the staging path is private: reports name the artifact
        seconds["convert"] = time.perf_counter() - t0
        if not staged.exists():
            raise OutputError(f"{out_path}: the {target} converter wrote nothing")
        size = getattr(conversion, "size_bytes", None)

        report = None
        passed: bool | None = None
        if validate:
            t0 = time.perf_counter()
            progress.note(f"validating in {'onnxruntime' if target == 'onnx' else target} "
                          f"({n_inputs} input(s){', then timing' if latency else ''})")
            report = _validate(
                loaded,
                comp,
                converter,
                target,
                staged,
                options,
                stage,
                thresholds=thresholds,
                n_inputs=n_inputs,
                seed=seed,
                latency=latency,
                name=name,
                accuracy_data=accuracy_data,
                accuracy_label=accuracy_label or "labelled data",
            )
            if accuracy_known and report is not None and accuracy_data is not None:
                report.accuracy = {**{k: float(v) for k, v in accuracy_known.items() if v is not None},
                                   **report.accuracy}
            seconds["validate"] = time.perf_counter() - t0
            passed = bool(report.passed)
        for w in traced:
            notes.append(f"the tracer warned during the export: {w}")
        if strict and traced:
            reason = (f"the tracer warned during the export ({len(traced)} warning(s), --strict): "
                      "the artifact may hold the example's values where the model computes them")
            if report is not None:
                report.failures.append(reason)
                report.passed = False
            passed = False

        keep = passed is not False or keep_failed
        artifact: Path | None = None
        if keep:
            artifact = stage.publish(staged, out_path, force=force)
        else:
            notes.append("the artifact failed validation and was removed; rerun with --keep-failed to keep it")
            if force and stage.retire(out_path):  # never an old artifact beside this report
                notes.append(f"the previous {out_path.name} was removed too (--force): it is not the model "
                             "this report describes")
        if force:  # leftovers of the previous set that this one does not replace
            if side is not None and side not in stage.published:
                stage.retire(side)
            old_report = report_path_for(out_path)
            if rpath is None and stage.retire(old_report):
                notes.append(f"the previous {old_report.name} was removed: it described the previous artifact")
        if report is not None:
            _annotate_report(report, target, loaded, comp, conversion, out_path if keep else None, notes)
            if rpath is not None:
                staged_report = stage.path(rpath.name)
                staged_report.write_text(report.to_json(), encoding="utf-8")
                stage.publish(staged_report, rpath, force=force)

    return ExportOutcome(
        target=target,
        artifact=artifact,
        report_path=rpath,
        passed=passed,
        params_before=count_params(comp.source),
        params_after=count_params(comp.model),
        size_bytes=size,
        conversion=conversion,
        validation=report,
        blocked=comp.blocked,
        torch_parity=comp.parity_max_abs,
        seconds=seconds,
        notes=notes,
        channels=comp.channel_lines() if loaded.masks else [],
    )


def _check_outputs(loaded: LoadedModel, converter: Any, out_path: Path, *, force: bool,
                   report: bool) -> tuple[Path | None, Path | None]:
    """Every output-path check of an export, before any work: (report path, external-data path)."""
    inputs = loaded.files or (loaded.source,)
    check_not_input(out_path, *inputs)
    remove_stale(out_path)  # first: it may restore outputs a killed --force run had moved aside
    check_writable(out_path, force=force)
    rpath = report_path_for(out_path) if report else None
    if rpath is not None:
        check_not_input(rpath, *inputs)
        check_writable(rpath, force=force)
    side = side_file(converter, out_path)  # ONNX external data: <out>.data
    if side is not None:
        check_not_input(side, *inputs)
        if (side.exists() or side.is_symlink()) and not force:
            raise OutputError(f"{side}: already exists (external data of a previous export); "
                              "pass --force (force=True) to overwrite it")
    return rpath, side


def side_file(converter: Any, out_path: Path) -> Path | None:
    suffix = getattr(converter, "EXTERNAL_SUFFIX", None)
    return Path(str(out_path) + suffix) if isinstance(suffix, str) and suffix else None


def _validate(
    loaded: LoadedModel,
    comp: Compacted,
    converter: Any,
    target: str,
    staged: Path,
    options: Mapping[str, Any],
    stage: Staging,
    *,
    thresholds: Any,
    n_inputs: int,
    seed: int,
    latency: Any,
    name: str | None = None,
    accuracy_data: Any = None,
    accuracy_label: str = "labelled data",
) -> Any:
    from .validate import validate

    dense_path: Path | None = None
    if target == "onnx" and latency and loaded.masks:
        # Like-for-like timing: the same masked model, exported without compaction.
        dense_path = stage.path(f"dense-{staged.name}")
        try:
            with progress.stage("exporting the dense model too (latency reference)"):
                converter.convert(comp.source, loaded.example_inputs, dense_path, **options)
        except DeployPruneError as exc:
            log.warning("dense reference export failed, latency is shown for the artifact only: %s", exc)
            dense_path = None
    source_path = loaded.source if loaded.source.is_file() else None
    log.info("validating %s against %s", staged.name, loaded.source)
    # ONNX runs in onnxruntime: compare its outputs with the masked source. Core ML cannot run
    # on Linux: its read-back check compares stored weights with the model that was converted,
    # i.e. the compact one (whose parity with the masked model finalize has just checked).
    reference = comp.model if target == "coreml" and comp.model is not comp.source else comp.source
    report = validate(
        reference,
        staged,
        loaded.example_inputs,
        n_inputs=n_inputs,
        seed=seed,
        thresholds=thresholds,
        latency=latency,
        dense_artifact=dense_path,
        name=name or loaded.source.stem,
        source_path=source_path,
        accuracy_data=accuracy_data,
        accuracy_label=accuracy_label,
        reported_source=comp.source,
    )
    if dense_path is not None:
        for p in stage.dir.glob(dense_path.name + "*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    return report


def _annotate_report(
    report: Any,
    target: str,
    loaded: LoadedModel,
    comp: Compacted,
    conversion: Any,
    final_path: Path | None,
    notes: list[str],
) -> None:
    """Point the report at the final artifact path and record pipeline facts."""
    art = getattr(report, "artifact", None)
    if art is not None and hasattr(art, "path"):
        art.path = str(final_path) if final_path is not None else None
    dense = getattr(report, "dense_artifact", None)
    if dense is not None and hasattr(dense, "path"):
        dense.path = None  # a temporary file, removed after timing
    extra = pipeline_facts(loaded, comp, conversion)
    if hasattr(report, "pipeline") and isinstance(report.pipeline, dict):
        report.pipeline.update(extra)
    report_notes = getattr(report, "notes", None)
    if isinstance(report_notes, list):
        if not hasattr(report, "pipeline"):  # older report schema: keep the essentials as notes
            report_notes.append(
                f"source {loaded.source} ({loaded.kind}), inputs {describe_inputs(loaded.example_inputs)}"
            )
        if target == "coreml" and comp.model is not comp.source:
            report_notes.append(
                "Core ML weights were checked against the compact model; its torch parity with the masked "
                f"model is {comp.parity_max_abs:.3g} (max abs)"
            )
        if not comp.compacted:
            report_notes.append(f"finalize abandoned compaction ({comp.abandoned}); the masked model was exported "
                                "at full size (--allow-uncompacted)")
        report_notes.extend(f"finalize {k.describe()}" for k in comp.kept)
        report_notes.extend(f"converter: {w}" for w in getattr(conversion, "warnings", []) or [])
        report_notes.extend(notes)


def pipeline_facts(loaded: LoadedModel, comp: Compacted, conversion: Any) -> dict[str, Any]:
    """Pipeline details for reports (plain JSON types)."""
    to_dict = getattr(conversion, "to_dict", None)
    facts = {
        "source": {
            "path": str(loaded.source),
            "kind": loaded.kind,
            "factory": loaded.factory,
            "arch": loaded.arch,
            "inputs": [s.to_json() for s in loaded.input_shapes],
        },
        "masks": {k: round(v, 6) for k, v in mask_sparsity(loaded.masks).items()},
        "params": {"source": count_params(comp.source), "compact": count_params(comp.model)},
        "finalize": comp.finalize_facts(),
        "conversion": to_dict() if callable(to_dict) else None,
    }
    budget = (loaded.meta or {}).get("budget")
    if isinstance(budget, Mapping):
        facts["budget"] = dict(budget)  # deployprune prune --budget: budget vs achieved, widths, latency table
    return facts


# --------------------------------------------------------------------------------------------
# finalize
# --------------------------------------------------------------------------------------------


@dataclass
class FinalizeOutcome:
    path: Path
    format: str  # "pt2" | "checkpoint"
    params_before: int
    params_after: int
    blocked: list
    torch_parity: float
    module_changes: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)  # finalize: removed/masked channels, kept groups

    def summary_lines(self) -> list[str]:
        ratio = self.params_after / self.params_before if self.params_before else 1.0
        kind = "torch.export program" if self.format == "pt2" else "deployprune checkpoint"
        lines = [
            f"compact model: {self.path} ({kind})",
            f"params:        {self.params_before:,} -> {self.params_after:,} ({ratio:.1%} of the source)",
            f"parity:        max abs error {self.torch_parity:.3g} vs the masked model (torch)",
        ]
        if self.channels:
            lines.append(f"compaction:    {self.channels[0]}")
            lines.extend(f"  {c}" for c in self.channels[1:])
        lines.extend(f"  {c}" for c in self.module_changes[:20])
        if len(self.module_changes) > 20:
            lines.append(f"  ... {len(self.module_changes) - 20} more")
        return lines


def module_changes(before: nn.Module, after: nn.Module) -> list[str]:
    """``conv1: Conv2d(1, 6) -> Conv2d(1, 3)`` for every module whose size changed."""
    old = dict(before.named_modules())
    out = []
    for name, mod in after.named_modules():
        if not name or name not in old:
            continue
        a, b = _short(old[name]), _short(mod)
        if a != b:
            out.append(f"{name}: {a} -> {b}")
    return out


def _short(m: nn.Module) -> str:
    for attrs in (
        ("in_channels", "out_channels"),
        ("in_features", "out_features"),
        ("num_features",),
        ("normalized_shape",),
        ("num_embeddings", "embedding_dim"),
    ):
        if all(hasattr(m, a) for a in attrs):
            return f"{type(m).__name__}({', '.join(str(getattr(m, a)) for a in attrs)})"
    return type(m).__name__


def run_finalize(
    loaded: LoadedModel,
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
    tolerance: float = 1e-5,
    strict: bool = False,
    allow_uncompacted: bool = False,
) -> FinalizeOutcome:
    """Compact ``loaded`` and write it as a ``.pt2`` program (default) or a deployprune checkpoint.

    The written file is loaded back (safely) and compared with the compact model before it is
    moved into place; a checkpoint that cannot reproduce the model is refused. ``strict`` and
    ``allow_uncompacted`` are those of :func:`compact_loaded`.
    """
    out_path = Path(out) if out is not None else default_output(loaded.source, ".compact.pt2")
    fmt = "pt2" if out_path.suffix == ".pt2" else "checkpoint" if out_path.suffix in (".pt", ".pth") else None
    if fmt is None:
        raise UsageError(
            f"{out_path}: finalize writes .pt2 (torch.export program) or .pt/.pth "
            "(deployprune checkpoint); choose one of these suffixes"
        )
    if fmt == "checkpoint" and loaded.arch is None and loaded.factory is None:
        raise UsageError(
            f"{out_path}: a checkpoint needs the model's architecture, which {loaded.source} "
            f"({loaded.kind}) does not name; write a .pt2 file instead"
        )
    check_not_input(out_path, *(loaded.files or (loaded.source,)))
    remove_stale(out_path)
    check_writable(out_path, force=force)
    with progress.stage(f"finalizing ({len(loaded.masks)} masked module(s))"):
        comp = compact_loaded(loaded, strict=strict, allow_uncompacted=allow_uncompacted)
    from .io import load_model, save_checkpoint

    with staging(out_path) as stage:
        staged = stage.path()
        if fmt == "pt2":
            try:
                program = torch.export.export(comp.model, loaded.example_inputs)
            except Exception as exc:  # noqa: BLE001
                raise UnsupportedError(
                    f"{out_path}: torch.export cannot capture the compact model "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
                    "write a .pt checkpoint instead"
                ) from None
            buf = io.BytesIO()  # in memory first: a failed disk write must be an OSError, not an abort
            torch.export.save(program, buf)
            staged.write_bytes(buf.getvalue())
        else:
            save_checkpoint(
                staged,
                comp.model,
                arch=loaded.arch,
                factory=None if loaded.arch else loaded.factory,
                input_shapes=loaded.input_shapes,
                compact=True,
            )
        # Read it back the way a user would and check it reproduces the compact model.
        try:
            again = load_model(
                staged,
                model_factory=None if (loaded.arch or fmt == "pt2") else loaded.factory,
                input_shapes=loaded.input_shapes,
            )
            with torch.no_grad():
                diff = _max_abs_diff(comp.model(*loaded.example_inputs), again.model(*loaded.example_inputs))
        except DeployPruneError as exc:
            raise UnsupportedError(
                f"{out_path}: the written {fmt} does not load back ({exc}); write a .pt2 file instead"
                if fmt == "checkpoint"
                else f"{out_path}: the written program does not load back ({exc})"
            ) from None
        if diff > tolerance:
            hint = "; write a .pt2 file instead" if fmt == "checkpoint" else ""
            raise UnsupportedError(
                f"{out_path}: the written {fmt} reproduces the compact model only to {diff:.3g} (max abs){hint}"
            )
        stage.publish(staged, out_path, force=force)
    return FinalizeOutcome(
        path=out_path,
        format=fmt,
        params_before=count_params(comp.source),
        params_after=count_params(comp.model),
        blocked=comp.blocked,
        torch_parity=comp.parity_max_abs,
        module_changes=module_changes(loaded.model, comp.model),
        channels=comp.channel_lines() if loaded.masks else [],
    )
