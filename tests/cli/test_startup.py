"""Fast start: ``--version``, ``--help``, ``<command> --help`` and argument errors never import torch.

Behaviour, not timing (the wall-clock figures are in benchmarks/startup.py, docs/benchmarks.md):
each check runs in a fresh interpreter, since the test process has long imported torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import deployprune as dp

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_version_help_and_argument_errors_do_not_import_torch(tmp_path: Path) -> None:
    proc = run_python(
        """
        import sys
        import deployprune.cli

        codes = []
        for argv in (["--version"], ["--help"], ["export", "--help"], ["finalize", "--help"],
                     ["validate", "--help"], ["prune", "--help"], ["run", "--help"],
                     ["export"], ["export", "m.pt", "--n-inputs", "many"], ["expor"]):
            try:
                codes.append(deployprune.cli.main(argv))
            except SystemExit as exc:
                codes.append(exc.code)
        print(codes)
        heavy = [m for m in ("torch", "onnx", "onnxruntime", "numpy") if m in sys.modules]
        print("heavy:", heavy)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    codes, heavy = proc.stdout.splitlines()[-2:]
    assert codes == "[0, 0, 0, 0, 0, 0, 0, 2, 2, 2]", proc.stderr
    assert heavy == "heavy: []"


def test_import_deployprune_is_lazy_and_complete(tmp_path: Path) -> None:
    proc = run_python(
        """
        import sys
        import deployprune as dp

        assert "torch" not in sys.modules
        assert set(dp.__all__) <= set(dir(dp)), set(dp.__all__) - set(dir(dp))
        print(dp.__version__, dp.UsageError.__name__, "torch" in sys.modules)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [dp.__version__, "UsageError", "False"]


def test_public_functions_survive_importing_the_submodules_first(tmp_path: Path) -> None:
    """``deployprune.finalize`` and ``deployprune.validate`` are submodules and functions: the
    package attribute is the function whether the submodule or the attribute comes first."""
    proc = run_python(
        """
        import types
        import deployprune.finalize.trace
        import deployprune.validate
        import deployprune as dp
        from deployprune.finalize import finalize as f
        from deployprune.validate import validate as v

        assert dp.finalize is f and dp.validate is v, (dp.finalize, dp.validate)
        assert not isinstance(dp.finalize, types.ModuleType)
        print("ok")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_every_public_name_resolves() -> None:
    for name in dp.__all__:
        value = getattr(dp, name)
        assert not isinstance(value, types.ModuleType), name
    assert callable(dp.finalize) and callable(dp.compact) and callable(dp.validate)
    assert callable(dp.export) and callable(dp.load) and callable(dp.apply_masks)
    assert issubclass(dp.ParityError, dp.ValidationFailed) and issubclass(dp.ValidationFailed, dp.DeployPruneError)
    assert dp.Pruner.__name__ == "Pruner"
    try:
        dp.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("unknown attribute resolved")


def test_plugin_command_runs_the_real_plugin_module(tmp_path: Path) -> None:
    """The sub-parsers of ``prune`` come from the plug-in file run on its own (its package imports
    torch); the command itself runs the handler of the module ``import`` gives everyone else."""
    proc = run_python(
        """
        import sys
        from deployprune import cli

        args = cli.build_parser().parse_args(["prune", "m.pt", "--config", "c.json"])
        assert "torch" not in sys.modules
        handler = cli._handler(args.func)
        import deployprune.pruning.cli as real

        assert handler is real.cmd_prune, (handler, real.cmd_prune)
        assert cli._handler(cli.cmd_export) is cli.cmd_export
        print("ok")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_plugin_commands_when_their_package_is_already_imported() -> None:
    import deployprune.pruning  # noqa: F401 - the in-process case: the package's __init__ has run
    import deployprune.pruning.cli as real
    from deployprune import cli

    args = cli.build_parser().parse_args(["prune", "m.pt", "--config", "c.json", "--epochs", "2"])
    assert args.func is real.cmd_prune and args.epochs == 2
    assert cli._handler(args.func) is real.cmd_prune
