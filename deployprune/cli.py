"""``deployprune`` command line: a thin layer over the Python API.

Every failure is reported as one line ``error: <message>`` on stderr with the exit code of the
exception class (see ``deployprune/errors.py`` and ``docs/cli.md``); tracebacks only with
``--debug``. Ctrl-C exits 130 and SIGTERM 143, leaving no partial output behind.

Subcommands can be added by other packages: if ``deployprune.pruning.cli`` defines
``register(subparsers, parents)``, it is called with the argparse sub-parsers object and a dict
of parent parsers (``"common"``: --debug/-v/-q, ``"load"``: the model-loading options). The
sub-parser it adds must ``set_defaults(func=handler)`` with ``handler(args) -> int``; the
handler can call :func:`load_from_args` to get a :class:`~deployprune.io.LoadedModel`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from ._version import __version__
from .errors import (
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    DeployPruneError,
    UsageError,
    ValidationFailed,
    one_line,
)

log = logging.getLogger("deployprune")

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

PLUGIN_MODULES = ("deployprune.pruning.cli",)
GRAPH_OPTIMIZATION_LEVELS = ("all", "extended", "basic", "disable")


# Library messages serve Python callers too; on the command line a converter option is given as
# --opt KEY=VALUE, so its hint "pass precision='fp32'" reads "pass --opt precision=fp32".
_OPTION_HINT = re.compile(r"\bpass ([a-z_][a-z0-9_]*)='([^'\s]*)'")


_PARAM_HINT = re.compile(r"(--[a-z][a-z0-9-]*) \([a-z_][a-z0-9_]*=[^()\s]*\)")


def cli_wording(text: str) -> str:
    """``text`` (an error, a summary line) worded for the command line: options as flags, and a flag's
    Python twin (``--force (force=True)``, written for API users too) as the flag alone."""
    return _PARAM_HINT.sub(r"\1", _OPTION_HINT.sub(r"pass --opt \1=\2", text))


class Terminated(BaseException):
    """Raised by the SIGTERM handler so ``finally`` blocks clean up staged outputs."""


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {one_line(message)} (see '{self.prog} --help')")


def _common_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output and diagnostics")
    # SUPPRESS: the same flags exist on the main parser; sub-parsers must not reset them.
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more progress output (-vv: debug, including library warnings)",
    )
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="only errors on stderr",
    )
    return p


def _load_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model loading")
    g.add_argument(
        "model_path",
        metavar="MODEL",
        help="deployprune checkpoint, state_dict (.pt/.pth, needs --model), "
        "torch.export program (.pt2), pickled module (needs --trust-pickle) or a Hugging Face "
        "model directory (save_pretrained: config.json + safetensors)",
    )
    g.add_argument(
        "--model",
        dest="factory",
        metavar="PKG.MOD:FACTORY",
        help="callable that builds the architecture (called with no arguments), e.g. deployprune.zoo.lenet:TorchModel",
    )
    g.add_argument(
        "--masks",
        metavar="FILE",
        help="masks in NNI layout {module: {'weight': 0/1 tensor}} saved with torch.save",
    )
    g.add_argument(
        "--input-shape",
        dest="input_shapes",
        action="append",
        metavar="SHAPE",
        help="example input shape, e.g. 1,3,224,224 or 1,128:int64[:HIGH]; "
        "repeat for several inputs (default: from the model registry/file)",
    )
    g.add_argument(
        "--input",
        dest="keyword_inputs",
        action="append",
        metavar="NAME=SHAPE",
        help="keyword example input of a Hugging Face model directory, e.g. input_ids=1,128 "
        "(SHAPE as --input-shape); repeat for several (default: the model's main input)",
    )
    g.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading a whole pickled nn.Module, or a .pt2 program the safety check refuses (dynamic "
        "shapes, guards); UNSAFE: unpickling and torch's .pt2 loader run code from the file, use only for "
        "files you trust",
    )
    g.add_argument(
        "--max-file-size",
        metavar="SIZE",
        default=None,
        help="refuse input files larger than SIZE (default 16G)",
    )
    return p


def _add_validation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation")
    g.add_argument(
        "--n-inputs",
        type=int,
        default=8,
        metavar="N",
        help="number of inputs compared (the example input + N-1 seeded random ones)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the random validation inputs")
    g.add_argument("--name", default=None, metavar="LABEL",
                   help="label of this run in its report and in reports that compare runs "
                        "(default: the model file's name without suffix)")
    g.add_argument(
        "--max-rel",
        type=float,
        default=None,
        metavar="X",
        help="pass threshold: max abs error / output scale (default 1e-4)",
    )
    g.add_argument(
        "--max-abs",
        type=float,
        default=None,
        metavar="X",
        help="pass threshold: max abs error (default: not checked)",
    )
    g.add_argument(
        "--min-cosine",
        type=float,
        default=None,
        metavar="X",
        help="pass threshold: lowest cosine similarity (default 0.9999)",
    )
    g.add_argument(
        "--min-top1",
        type=float,
        default=None,
        metavar="X",
        help="pass threshold: top-1 agreement for classifier outputs (default: report only)",
    )
    g.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    g.add_argument("--data", metavar="DATA", default=None,
                   help="labelled data for the task accuracy of source and artifact: 'digits' (scikit-learn's "
                        "8x8 digits) or package.module:function returning (train_loader, val_loader); the "
                        "validation batches (inputs, class index) are used")


def _add_latency_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("latency (deployprune.latency.LatencyConfig)")
    g.add_argument("--warmup", type=int, default=5, metavar="N", help="untimed calls per model first (default 5)")
    g.add_argument("--repeats", type=int, default=30, metavar="N", help="timed calls per model (default 30)")
    g.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="intra-op threads of onnxruntime and torch (default 1; 0 = the runtimes' default)",
    )
    g.add_argument(
        "--graph-opt",
        choices=GRAPH_OPTIMIZATION_LEVELS,  # = deployprune.latency's (kept here: no torch import for --help)
        default="all",
        help="onnxruntime graph optimization level for timing (default all)",
    )
    g.add_argument(
        "--providers",
        metavar="P1,P2",
        default=None,
        help="onnxruntime execution providers, comma-separated (default CPUExecutionProvider)",
    )
    g.add_argument(
        "--batch-sizes",
        metavar="B1,B2",
        default=None,
        help="batch sizes timed, comma-separated, e.g. 1,8 (default: 1)",
    )
    g.add_argument("--no-eager", action="store_true", help="do not time the source model in PyTorch eager mode")
    g.add_argument(
        "--localize",
        choices=("always", "never", "on-failure"),
        default="on-failure",
        help="compare intermediate layers: always, never, or only when the artifact fails (default)",
    )


def build_parser() -> argparse.ArgumentParser:
    common = _common_parent()
    load = _load_parent()
    parser = _Parser(
        prog="deployprune",
        description="Prune a PyTorch model, compact it exactly, export it (ONNX / Core ML) and verify it.",
        epilog="exit codes: 0 ok, 1 internal error, 2 usage, 3 input/output problem, "
        "4 validation failed, 5 unsupported, 130 interrupted, 143 terminated",
    )
    parser.add_argument("--version", action="version", version=f"deployprune {__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks for errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more progress output")
    parser.add_argument("-q", "--quiet", action="store_true", default=False, help="only errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # export ---------------------------------------------------------------------------------
    p = sub.add_parser(
        "export",
        parents=[load, common],
        help="load -> finalize -> convert -> validate, with a summary and a JSON report",
        description="Compact the (masked) model, convert it, validate the artifact against the "
        "masked source and write <OUT>.report.json next to it.",
    )
    p.add_argument("--target", default="onnx", help="onnx (default), coreml, or another installed target")
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="artifact path (default: ./<model stem><target suffix>, e.g. ./lenet.onnx)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output and report")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="converter option (repeatable); list them with 'deployprune targets TARGET'",
    )
    p.add_argument(
        "--no-validate",
        action="store_true",
        help="skip validation (no report is written; the artifact is unverified)",
    )
    p.add_argument(
        "--keep-failed",
        action="store_true",
        help="keep the artifact even when validation fails (default: remove it)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit 5) when finalize keeps any masked channel, and fail validation when the tracer "
        "warned during the export (the artifact may hold the example's values where the model computes them)",
    )
    _add_allow_uncompacted(p)
    _add_validation_options(p)
    p.set_defaults(func=cmd_export)

    # finalize -------------------------------------------------------------------------------
    p = sub.add_parser(
        "finalize",
        parents=[load, common],
        help="compact a masked model into a smaller plain PyTorch model",
        description="Write the compact model as a torch.export program (.pt2, default) or a "
        "deployprune checkpoint (.pt); the file is read back and checked before it is kept.",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="output path ending in .pt2 or .pt (default: ./<model stem>.compact.pt2); for a Hugging Face "
        "model directory, an output directory (default: ./<name>.compact) unless it ends in .pt2",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--strict", action="store_true", help="fail (exit 5) when finalize keeps any masked channel")
    _add_allow_uncompacted(p)
    p.set_defaults(func=cmd_finalize)

    # validate -------------------------------------------------------------------------------
    p = sub.add_parser(
        "validate",
        parents=[load, common],
        help="compare an artifact (.onnx / .mlpackage) with the (masked) source model",
        description="Run ARTIFACT (.onnx file or .mlpackage) and MODEL (with --masks applied) on the example "
        "input and seeded random ones (--n-inputs in all), compare their outputs against the thresholds and, "
        "unless --no-latency, time both (interleaved, medians); print the summary, write the report with "
        "--json / --html, and exit 4 when a threshold is not met.",
    )
    p.add_argument("artifact", metavar="ARTIFACT", help=".onnx file or .mlpackage directory")
    p.add_argument(
        "--dense",
        "--dense-artifact",
        dest="dense",
        metavar="ONNX",
        help="the same model exported without compaction, timed next to ARTIFACT (like for like)",
    )
    p.add_argument("--json", dest="json_out", metavar="FILE", help="write the JSON report to FILE")
    p.add_argument(
        "--html", dest="html_out", metavar="FILE", help="also write the report as a self-contained HTML page"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --json / --html file")
    _add_validation_options(p)
    _add_latency_options(p)
    p.set_defaults(func=cmd_validate)

    # report ---------------------------------------------------------------------------------
    p = sub.add_parser(
        "report",
        parents=[common],
        help="render a JSON report as Markdown or HTML",
    )
    p.add_argument(
        "reports",
        nargs="+",
        metavar="REPORT.json",
        help="report(s) written by export/validate; several are compared side by side",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="write to OUT (.md, .html or .json; default: Markdown on stdout)",
    )
    p.add_argument(
        "--format",
        choices=("md", "html", "json"),
        default=None,
        help="output format (default: from the -o suffix, else md); json holds one run",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=cmd_report)

    # targets --------------------------------------------------------------------------------
    p = sub.add_parser("targets", parents=[common], help="list export targets and their --opt options")
    p.add_argument("target", nargs="?", help="show the options of this target")
    p.set_defaults(func=cmd_targets)

    _register_plugins(sub, {"common": common, "load": load})
    return parser


def _register_plugins(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    for name in PLUGIN_MODULES:
        command = name.rsplit(".", 2)[-2]  # deployprune.pruning.cli -> "pruning"
        try:
            module = _import_plugin(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                _placeholder(
                    sub,
                    "prune" if command == "pruning" else command,
                    "is not available in this installation",
                )
                continue
            _placeholder(
                sub,
                "prune" if command == "pruning" else command,
                f"failed to load ({one_line(exc)})",
            )
            continue
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not break the other commands
            _placeholder(
                sub,
                "prune" if command == "pruning" else command,
                f"failed to load ({type(exc).__name__}: {one_line(exc)})",
            )
            continue
        register = getattr(module, "register", None)
        if callable(register):
            register(sub, parents)


def _import_plugin(name: str) -> Any:
    """The plug-in module ``name``, without running the ``__init__`` of a package not imported yet.

    ``deployprune.pruning.cli`` keeps its heavy imports inside its handlers, but its package's
    ``__init__`` imports torch (~1.5 s): while that package is not imported, the plug-in file is run
    on its own (not entered in ``sys.modules``) to build its sub-parsers, and :func:`_handler`
    swaps its handler for the one of the real module when the command runs.
    """
    parent = name.rpartition(".")[0]
    if not parent or parent in sys.modules or name in sys.modules:
        return importlib.import_module(name)
    parent_spec = importlib.util.find_spec(parent)  # imports the grandparents, not ``parent`` itself
    locations = parent_spec.submodule_search_locations if parent_spec else None
    spec = importlib.machinery.PathFinder.find_spec(name, locations) if locations else None
    if spec is None or spec.loader is None:
        return importlib.import_module(name)
    module = importlib.util.module_from_spec(spec)
    module.__dict__[_DETACHED] = True
    spec.loader.exec_module(module)
    return module


_DETACHED = "__deployprune_detached_plugin__"


def _handler(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``func``, or the same function of the real plug-in module when ``func`` comes from a copy
    :func:`_import_plugin` ran on its own (so the command runs the module everyone else imports)."""
    if not getattr(func, "__globals__", {}).get(_DETACHED):
        return func
    real = getattr(importlib.import_module(func.__module__), func.__name__, None)
    return real if callable(real) and getattr(real, "__qualname__", None) == func.__qualname__ else func


def _placeholder(sub: Any, command: str, why: str) -> None:
    p = sub.add_parser(command, help=f"({command} {why})", add_help=True)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(_args: argparse.Namespace) -> int:
        raise UsageError(f"'deployprune {command}' {why}")

    p.set_defaults(func=run)


def _add_allow_uncompacted(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-uncompacted",
        action="store_true",
        help="when finalize has to abandon compaction (its self-check failed: a bug, please report the "
        "model), go on with the masked model at full size instead of failing (exit 4)",
    )


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def load_from_args(args: argparse.Namespace):
    """The :class:`~deployprune.io.LoadedModel` described by the common loading options."""
    from .io import DEFAULT_MAX_FILE_BYTES, load_model, parse_input_shape, parse_size

    max_bytes = parse_size(args.max_file_size) if getattr(args, "max_file_size", None) else DEFAULT_MAX_FILE_BYTES
    keyword_inputs = getattr(args, "keyword_inputs", None) or []
    if _is_hf_directory(args.model_path):
        return _load_hf_directory(args, keyword_inputs, max_bytes)
    if keyword_inputs:
        raise UsageError(f"--input {keyword_inputs[0]}: keyword inputs are for Hugging Face model directories; "
                         f"{args.model_path} takes positional inputs: pass --input-shape")
    shapes = [parse_input_shape(s) for s in (args.input_shapes or [])]
    factory = args.factory
    if factory:
        from ._imports import cwd_importable
        from .io import canonical_factory, resolve_factory

        with cwd_importable():  # --model mymodel:build imports ./mymodel.py, as `python -m` would
            factory = canonical_factory(factory, from_file=False)
            resolve_factory(factory)
    return load_model(
        args.model_path,
        model_factory=factory,
        allow_pickle=args.trust_pickle,
        input_shapes=shapes or None,
        masks=args.masks,
        max_file_bytes=max_bytes,
    )


def _is_hf_directory(path: str) -> bool:
    from pathlib import Path

    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _load_hf_directory(args: argparse.Namespace, keyword_inputs: list[str], max_bytes: int):
    """A ``save_pretrained`` directory (deployprune.hf): keyword inputs, no code from the directory."""
    from .hf import load_directory

    for flag, given in (("--model", args.factory), ("--input-shape", args.input_shapes),
                        ("--trust-pickle", args.trust_pickle)):
        if given:
            hint = "; pass keyword inputs with --input NAME=SHAPE" if flag == "--input-shape" else ""
            raise UsageError(f"{flag} does not apply to a Hugging Face model directory ({args.model_path}): its "
                             f"architecture comes from config.json and its weights from safetensors{hint}")
    return load_directory(args.model_path, inputs=keyword_inputs or None, masks=args.masks,
                          max_file_bytes=max_bytes)


def _thresholds(args: argparse.Namespace) -> dict[str, float] | None:
    out = {
        k: getattr(args, k)
        for k in ("max_rel", "max_abs", "min_cosine", "min_top1")
        if getattr(args, k, None) is not None
    }
    return out or None


def _check_n_inputs(args: argparse.Namespace) -> None:
    if args.n_inputs < 1:
        raise UsageError(f"--n-inputs {args.n_inputs}: must be at least 1")
    if args.data is not None:  # a --data path that does not import is exit 2 before any work
        from ._imports import cwd_importable
        from .data import BUILTIN, resolve_entry_point

        spec = args.data.strip()
        if not spec:
            raise UsageError("--data: give 'digits' or an entry point package.module:function")
        if spec not in BUILTIN:
            if ":" not in spec:
                raise UsageError(f"--data {spec!r}: unknown dataset; use one of {', '.join(BUILTIN)} or an entry "
                                 "point package.module:function returning (train_loader, val_loader)")
            with cwd_importable():
                resolve_entry_point(spec)


def _accuracy_loader(args: argparse.Namespace) -> object:
    """The labelled validation batches of ``--data`` (None without it)."""
    if args.data is None:
        return None
    from ._imports import cwd_importable
    from .accuracy import validation_loader

    with cwd_importable():
        return validation_loader(args.data.strip(), seed=args.seed)


def cmd_export(args: argparse.Namespace) -> int:
    from . import converters
    from .pipeline import run_export

    _check_n_inputs(args)
    converters.get(args.target)  # unknown target: fail before loading anything
    options = converters.parse_option_strings(args.target, args.opt) if args.opt else {}
    thresholds = _thresholds(args)
    loaded = load_from_args(args)
    names = getattr(loaded.model, "input_names", None)  # keyword inputs: the graph inputs keep their names
    if names and "input_names" in getattr(converters.get(args.target), "OPTIONS", {}):
        options.setdefault("input_names", list(names))
    outcome = run_export(
        loaded,
        args.target,
        args.output,
        options=options,
        force=args.force,
        validate=not args.no_validate,
        keep_failed=args.keep_failed,
        thresholds=thresholds,
        n_inputs=args.n_inputs,
        seed=args.seed,
        latency=not args.no_latency,
        strict=args.strict,
        allow_uncompacted=args.allow_uncompacted,
        name=args.name,
        accuracy_data=_accuracy_loader(args),
        accuracy_label=args.data.strip() if args.data else None,
    )
    _print_lines(outcome.summary_lines())
    if outcome.passed is False:
        failures = "; ".join(getattr(outcome.validation, "failures", []) or []) or "thresholds not met"
        where = outcome.artifact or outcome.report_path or loaded.source
        raise ValidationFailed(f"{where}: validation failed: {failures}")
    return EXIT_OK


def cmd_finalize(args: argparse.Namespace) -> int:
    from .pipeline import run_finalize

    loaded = load_from_args(args)
    if loaded.kind == "hf" and not str(args.output or "").endswith((".pt2", ".pt", ".pth")):
        from .hf import finalize_directory  # a Hugging Face directory in, a Hugging Face directory out

        outcome = finalize_directory(loaded, args.output, force=args.force, strict=args.strict,
                                     allow_uncompacted=args.allow_uncompacted)
        _print_lines(outcome.summary_lines())
        return EXIT_OK
    outcome = run_finalize(loaded, args.output, force=args.force, strict=args.strict,
                           allow_uncompacted=args.allow_uncompacted)
    _print_lines(outcome.summary_lines())
    return EXIT_OK


def _int_list(option: str, text: str) -> tuple[int, ...]:
    parts = [t.strip() for t in text.split(",")]
    try:
        values = tuple(int(t) for t in parts)
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{option} {text!r}: expected positive integers separated by commas, e.g. 1,8")
    return values


def _providers(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UsageError(f"--providers {text!r}: expected provider names, e.g. CPUExecutionProvider")
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [n for n in names if n not in available]
    if missing:
        raise UsageError(
            f"--providers: onnxruntime execution provider(s) {', '.join(missing)} not available here; "
            f"available: {', '.join(available)}"
        )
    return names


def latency_config_from_args(args: argparse.Namespace):
    """The :class:`~deployprune.latency.LatencyConfig` of the latency flags (``False`` with --no-latency)."""
    from .latency import LatencyConfig

    if args.no_latency:
        return False
    if args.threads < 0:
        raise UsageError(f"--threads {args.threads}: expected 0 (runtime default) or a positive count")
    kwargs: dict[str, Any] = {
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": args.threads or None,
        "graph_optimization": args.graph_opt,
        "eager": not args.no_eager,
    }
    providers = _providers(args.providers)
    if providers:
        kwargs["providers"] = tuple(providers)
    if args.batch_sizes is not None:
        kwargs["batch_sizes"] = _int_list("--batch-sizes", args.batch_sizes)
    return LatencyConfig(**kwargs)


def cmd_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .fsutil import check_writable, replacing, write_text_atomic
    from .pipeline import check_not_input, masked_copy
    from .validate import validate

    _check_n_inputs(args)
    artifact = Path(args.artifact)
    if not artifact.exists():
        from .errors import InputError

        raise InputError(f"{artifact}: no such artifact; check the path")
    if args.dense and not Path(args.dense).is_file():
        from .errors import InputError

        raise InputError(f"{args.dense}: no such dense artifact (--dense-artifact); check the path")
    latency = latency_config_from_args(args)  # bad flags fail before the model is loaded
    providers = list(latency.providers) if latency else _providers(args.providers)
    inputs = [Path(p) for p in (args.model_path, args.artifact, args.masks, args.dense) if p]
    for out in (args.json_out, args.html_out):
        if out:
            check_not_input(Path(out), *inputs)  # never replace an input, --force or not
            check_writable(out, force=args.force)
    if args.json_out and args.html_out and Path(args.json_out).resolve() == Path(args.html_out).resolve():
        raise UsageError(f"--json and --html name the same file {args.json_out}; give two different paths")
    loaded = load_from_args(args)
    source = masked_copy(loaded.model, loaded.masks)
    reference = source
    if artifact.suffix.lower() == ".mlpackage" and loaded.masks:
        # Core ML is checked by reading its weights back (no predictions off macOS): compare with the
        # compacted model export converted, not with the masked model's full-size tensors (the
        # report's source figures stay the masked model's, as for ONNX)
        from .pipeline import compact_loaded

        reference = compact_loaded(loaded).model
    report = validate(
        reference,
        artifact,
        loaded.example_inputs,
        n_inputs=args.n_inputs,
        seed=args.seed,
        thresholds=_thresholds(args),
        latency=latency,
        dense_artifact=args.dense,
        providers=providers,
        localize={"always": True, "never": False}.get(args.localize),
        name=args.name or loaded.source.stem,
        source_path=loaded.source,
        accuracy_data=_accuracy_loader(args),
        accuracy_label=args.data.strip() if args.data else "labelled data",
        reported_source=source,
    )
    from .report import summary_lines

    _print_lines(summary_lines(report))
    outs = [Path(p) for p in (args.json_out, args.html_out) if p]
    with replacing(outs):  # both reports or neither; with --force the previous ones come back on failure
        if args.json_out:
            write_text_atomic(args.json_out, report.to_json(), force=args.force)
        if args.html_out:
            from .report import write_report

            write_report(report, args.html_out, format="html", force=args.force)
    if args.json_out:
        _print_lines([f"report:     {args.json_out}"])
    if args.html_out:
        _print_lines([f"html:       {args.html_out}"])
    report.raise_for_failure()
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .report import load_reports, render_html, render_markdown, write_report

    fmt = args.format
    if fmt is None:
        suffix = Path(args.output).suffix.lower() if args.output else ""
        fmt = {".html": "html", ".htm": "html", ".json": "json"}.get(suffix, "md")
    reports = load_reports(args.reports)
    if args.output:
        from .pipeline import check_not_input

        check_not_input(Path(args.output), *[Path(r) for r in args.reports])
        write_report(reports, args.output, format=fmt, force=args.force)
        _print_lines([f"report: {args.output}"])
        return EXIT_OK
    if fmt == "json":
        if len(reports) != 1:
            raise UsageError(
                f"--format json holds one run, got {len(reports)} reports; use --format md or html to compare runs"
            )
        text = reports[0].to_json()
    elif fmt == "html":
        text = render_html(reports)
    else:
        text = render_markdown(reports if len(reports) > 1 else reports[0])
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK


def cmd_targets(args: argparse.Namespace) -> int:
    from . import converters

    if args.target:
        converters.get(args.target)
        _print_lines(
            [
                f"options of target {args.target!r} (pass as --opt KEY=VALUE):",
                converters.describe_options(args.target),
            ]
        )
        return EXIT_OK
    _print_lines(converters.available())
    return EXIT_OK


def _print_lines(lines: Sequence[str]) -> None:
    for line in lines:
        print(cli_wording(line))
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _setup_logging(verbose: int, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(levelname_lower)s: %(message)s"))
    handler.addFilter(_LowerLevel())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries (torch, onnx, coremltools) are noisy: errors only unless -vv.
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.ERROR)
    ours = logging.ERROR if quiet else logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING
    logging.getLogger("deployprune").setLevel(ours)  # the zoo and converters log under deployprune.* too
    # progress lines (deployprune.progress) by default, on stderr; -q (or DEPLOYPRUNE_PROGRESS=0) silences them
    from . import progress

    progress.restart_clock()
    shown = not quiet and os.environ.get("DEPLOYPRUNE_PROGRESS", "1").strip().lower() not in ("0", "no", "off", "false")
    logging.getLogger("deployprune.progress").setLevel(logging.INFO if shown else logging.ERROR)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose >= 2 else logging.CRITICAL)
    if verbose < 2:
        warnings.simplefilter("ignore")


class _Formatter(logging.Formatter):
    """``level: message``; progress lines (``[  3.2s] converting to onnx``) as they are."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "deployprune.progress":
            return record.getMessage()
        return super().format(record)


class _LowerLevel(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.levelname_lower = record.levelname.lower()
        message = one_line(record.getMessage())
        record.msg = cli_wording(message) if record.name != "deployprune.progress" else message
        record.args = None
        return True


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def _restored_logging() -> Iterator[None]:
    """Undo the CLI's logging/warnings set-up afterwards (``main`` may be called in-process)."""
    root = logging.getLogger()
    names = ("deployprune", "py.warnings")
    saved = (list(root.handlers), root.level, {n: logging.getLogger(n).level for n in names})
    with warnings.catch_warnings():
        try:
            yield
        finally:
            logging.captureWarnings(False)
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
            for n, level in saved[2].items():
                logging.getLogger(n).setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    with _restored_logging():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
        previous = None
    try:
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            debug = debug or bool(getattr(args, "debug", False))
            _setup_logging(int(getattr(args, "verbose", 0) or 0), bool(getattr(args, "quiet", False)))
            func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
            if func is None:
                parser.print_help(sys.stderr)
                return EXIT_USAGE
            if getattr(args, "model_path", None):
                from . import progress

                progress.note(f"loading {args.model_path}")  # before torch is imported: at once
            return int(_handler(func)(args) or 0)
        except DeployPruneError as exc:
            if debug:
                traceback.print_exc()
            _error(str(exc))
            return exc.exit_code
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            _error("interrupted; no partial output was left behind")
            return EXIT_INTERRUPTED
        except Terminated:
            _error("terminated (SIGTERM); no partial output was left behind")
            return EXIT_TERMINATED
        except BrokenPipeError:
            return EXIT_OK
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if debug:
                traceback.print_exc()
                _error(f"internal error ({type(exc).__name__}: {one_line(exc, 300)}); please report it")
            else:
                _error(
                    f"internal error ({type(exc).__name__}: {one_line(exc, 300)}); "
                    "rerun with --debug for the traceback and please report it"
                )
            return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _error(message: str) -> None:
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001
        pass
    print(f"error: {cli_wording(one_line(message))}", file=sys.stderr)
    sys.stderr.flush()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
