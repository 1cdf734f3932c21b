"""run_export: tracer warnings in the report, and what --force does to a previous artifact set."""

from __future__ import annotations

import errno
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from deployprune import pipeline
from deployprune.errors import OutputError, UsageError
from deployprune.io import LoadedModel
from deployprune.pipeline import run_export
from tests.io.conftest import tree_digest

TORCHSCRIPT = {"exporter": "torchscript"}  # the tracer these tests are about


class Branchy(nn.Module):
    """A data-dependent branch: the trace keeps the one N(0, 1) example inputs take."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() > 5:
            return self.fc(x) * 0.5
        return self.fc(x)


class FixedWidth(nn.Module):
    """Reads a fixed (non-batch) size into a Python int: the tracer warns, the trace is right."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = int(x.shape[1])
        return self.fc(x.reshape(-1, width))


class Wide(nn.Module):
    """Weights big enough (6 kB) for ONNX external data."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def line_of(func: object, text: str) -> int:
    lines, start = inspect.getsourcelines(func)
    return start + next(i for i, line in enumerate(lines) if text in line)


def loaded(model: nn.Module, where: Path) -> LoadedModel:
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    return LoadedModel(model=model.eval(), example_inputs=(x,), masks={},
                       source=where / f"{type(model).__name__}.pt", kind="pickle")


def test_tracer_warning_is_a_note_and_the_fault_is_caught(tmp_path: Path) -> None:
    out = tmp_path / "branchy.onnx"
    outcome = run_export(loaded(Branchy(), tmp_path), "onnx", out, options=TORCHSCRIPT, n_inputs=2,
                         latency=False)
    report = outcome.validation
    assert outcome.passed is False and not out.exists()
    assert any(" on inputs at 10x scale: max rel error" in f for f in report.failures), report.failures
    traced = [n for n in report.notes if n.startswith("the tracer warned during the export: ")]
    line = line_of(Branchy.forward, "if x.abs()")
    assert traced == ["the tracer warned during the export: Converting a tensor to a Python boolean might "
                      f"cause the trace to be incorrect (test_export_outputs.py:{line})"], report.notes
    saved = json.loads(outcome.report_path.read_text())
    assert traced[0] in saved["notes"]


def test_tracer_warning_fails_only_under_strict(tmp_path: Path) -> None:
    out = tmp_path / "fixed.onnx"
    outcome = run_export(loaded(FixedWidth(), tmp_path), "onnx", out, options=TORCHSCRIPT, n_inputs=2,
                         latency=False)
    assert outcome.passed is True and out.is_file(), outcome.validation.failures
    note = ("the tracer warned during the export: Converting a tensor to a Python integer might cause the "
            f"trace to be incorrect (test_export_outputs.py:{line_of(FixedWidth.forward, 'int(x.shape[1])')})")
    assert note in outcome.validation.notes and note in outcome.notes

    strict = run_export(loaded(FixedWidth(), tmp_path), "onnx", tmp_path / "strict.onnx", options=TORCHSCRIPT,
                        n_inputs=2, latency=False, strict=True)
    assert strict.passed is False and strict.artifact is None and not (tmp_path / "strict.onnx").exists()
    assert strict.validation.failures == [
        "the tracer warned during the export (1 warning(s), --strict): the artifact may hold the example's "
        "values where the model computes them"]
    saved = json.loads(strict.report_path.read_text())
    assert saved["passed"] is False


def test_other_warnings_pass_through(tmp_path: Path) -> None:
    class Warns(FixedWidth):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            import warnings

            warnings.warn("model says hello", UserWarning, stacklevel=1)
            return self.fc(x)

    with pytest.warns(UserWarning, match="model says hello"):
        outcome = run_export(loaded(Warns(), tmp_path), "onnx", tmp_path / "w.onnx", options=TORCHSCRIPT,
                             n_inputs=2, latency=False)
    assert outcome.passed is True
    assert not any("tracer" in n for n in outcome.validation.notes)


def test_cli_strict_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from deployprune import cli

    sd = tmp_path / "fixed_sd.pt"
    torch.save(FixedWidth().state_dict(), sd)
    args = ["export", str(sd), "--model", "tests.io.test_export_outputs:FixedWidth", "--input-shape", "2,6",
            "--opt", "exporter=torchscript", "--no-latency", "--n-inputs", "2"]
    assert cli.main([*args, "-o", str(tmp_path / "ok.onnx")]) == 0
    assert "note:       the tracer warned during the export: Converting a tensor to a Python integer" \
        in capsys.readouterr().out
    assert cli.main([*args, "-o", str(tmp_path / "strict.onnx"), "--strict"]) == 4
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "the tracer warned during the export" in err[0]
    assert not (tmp_path / "strict.onnx").exists()


# --------------------------------------------------------------------------------------------
# --force keeps the previous set until the new one is complete


def digest(root: Path) -> dict[str, str]:
    return tree_digest(root)


@pytest.fixture
def previous(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A directory holding a complete previous export (artifact + report) and its digest."""
    out = tmp_path / "out"
    out.mkdir()
    first = run_export(loaded(FixedWidth(), tmp_path), "onnx", out / "m.onnx", options=TORCHSCRIPT,
                       n_inputs=2, latency=False)
    assert first.passed
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.report.json"]
    return out, digest(out)


def test_interrupt_after_the_artifact_rename_restores_the_previous_set(
        previous: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, before = previous
    real_publish = pipeline.Staging.publish

    def publish_then_interrupt(self, staged, dest, *, force):
        result = real_publish(self, staged, dest, force=force)
        if dest.suffix == ".onnx":
            raise KeyboardInterrupt  # after the new artifact was renamed onto the old one
        return result

    monkeypatch.setattr(pipeline.Staging, "publish", publish_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_export(loaded(Branchy(), tmp_path), "onnx", out / "m.onnx", options=TORCHSCRIPT, n_inputs=2,
                   latency=False, force=True, keep_failed=True)
    assert digest(out) == before  # the previous artifact and its report, byte for byte; no staging left


def test_failed_report_write_restores_the_previous_set(previous: tuple[Path, dict[str, str]], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out, before = previous
    real_write_text = Path.write_text

    def full_disk(self: Path, data: str, *args, **kwargs) -> int:
        if self.name.endswith(".report.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        run_export(loaded(FixedWidth(), tmp_path), "onnx", out / "m.onnx", options=TORCHSCRIPT, n_inputs=2,
                   latency=False, force=True)
    assert digest(out) == before


def test_failed_force_reexport_leaves_no_old_artifact_beside_its_report(
        previous: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    out, _ = previous
    outcome = run_export(loaded(Branchy(), tmp_path), "onnx", out / "m.onnx", options=TORCHSCRIPT, n_inputs=2,
                         latency=False, force=True)
    assert outcome.passed is False and outcome.artifact is None
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx.report.json"]
    saved = json.loads((out / "m.onnx.report.json").read_text())
    assert saved["passed"] is False and saved["artifact"]["path"] is None
    assert "the previous m.onnx was removed too (--force): it is not the model this report describes" \
        in saved["notes"]


def test_no_validate_force_removes_the_previous_report(previous: tuple[Path, dict[str, str]],
                                                        tmp_path: Path) -> None:
    out, before = previous
    outcome = run_export(loaded(FixedWidth(), tmp_path), "onnx", out / "m.onnx", options=TORCHSCRIPT,
                         validate=False, force=True)
    assert outcome.artifact == out / "m.onnx"
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx"]  # no report of another artifact beside it
    assert "the previous m.onnx.report.json was removed: it described the previous artifact" in outcome.notes


# --------------------------------------------------------------------------------------------
# <out>.data, ONNX external data, is an output like the artifact


def test_external_data_file_never_replaces_an_input(tmp_path: Path) -> None:
    victim = tmp_path / "m.onnx.data"
    victim.write_bytes(b"an input file")
    model = loaded(Wide(), tmp_path)
    model.files = (model.source, victim)
    with pytest.raises(UsageError, match=r"m\.onnx\.data: the output would overwrite the input file"):
        run_export(model, "onnx", tmp_path / "m.onnx", options={**TORCHSCRIPT, "external_data": True},
                   latency=False, n_inputs=2, force=True)
    assert victim.read_bytes() == b"an input file" and not (tmp_path / "m.onnx").exists()


def test_existing_external_data_needs_force_and_a_stale_one_goes(tmp_path: Path) -> None:
    side = tmp_path / "m.onnx.data"
    side.write_bytes(b"weights of an earlier export")
    with pytest.raises(OutputError, match=r"m\.onnx\.data: already exists \(external data of a previous export\)"):
        run_export(loaded(Wide(), tmp_path), "onnx", tmp_path / "m.onnx", options=TORCHSCRIPT,
                   latency=False, n_inputs=2)
    assert side.read_bytes() == b"weights of an earlier export" and not (tmp_path / "m.onnx").exists()
    outcome = run_export(loaded(Wide(), tmp_path), "onnx", tmp_path / "m.onnx", options=TORCHSCRIPT,
                         latency=False, n_inputs=2, force=True)
    assert outcome.passed and not side.exists()  # the new artifact holds its weights itself


def test_external_data_of_the_new_artifact_is_published(tmp_path: Path) -> None:
    outcome = run_export(loaded(Wide(), tmp_path), "onnx", tmp_path / "m.onnx",
                         options={**TORCHSCRIPT, "external_data": True}, latency=False, n_inputs=2)
    assert outcome.passed
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("m.onnx"))
    assert names == ["m.onnx", "m.onnx.data", "m.onnx.report.json"]


# --------------------------------------------------------------------------------------------
# What killed runs left behind is cleaned up by the next run to the same output

REPO = Path(__file__).resolve().parents[2]


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(proc.stdout)


def test_stale_staging_files_are_removed_by_the_next_run(tmp_path: Path) -> None:
    dead = dead_pid()
    left = {
        f".m.onnx.{dead}-abcd1234.partial": "dir",  # a killed export's staging directory
        ".m.onnx.efgh5678.partial": "dir",  # named before staging names carried a pid
        f".m.onnx.{dead}-ijkl9012.tmp.onnx": "file",  # a killed atomic write
        f".m.onnx.{dead}-ijkl9012.tmp.onnx.data": "file",  # ... and its side file
        ".m.onnx.mnop3456.tmp.onnx": "file",
    }
    kept = {
        f".m.onnx.{os.getpid()}-qrst7890.partial": "dir",  # a live run's (this process)
        f".other.onnx.{dead}-uvwx1234.partial": "dir",  # another output's
        "notes.txt": "file",
    }
    for name, kind in {**left, **kept}.items():
        if kind == "dir":
            (tmp_path / name).mkdir()
            (tmp_path / name / "m.onnx").write_bytes(b"half an artifact")
        else:
            (tmp_path / name).write_bytes(b"half a file")
    outcome = run_export(loaded(FixedWidth(), tmp_path), "onnx", tmp_path / "m.onnx", options=TORCHSCRIPT,
                         latency=False, n_inputs=2)
    assert outcome.passed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "m.onnx", "m.onnx.report.json"])


def test_stale_temporary_file_of_an_atomic_write_is_removed(tmp_path: Path) -> None:
    from deployprune.fsutil import write_text_atomic

    stale = tmp_path / f".r.json.{dead_pid()}-abcd1234.tmp.json"
    stale.write_text("half a report")
    write_text_atomic(tmp_path / "r.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


KILL_AFTER_ARTIFACT_RENAME = """
import os, sys
from pathlib import Path
from deployprune import pipeline
from tests.io.test_export_outputs import TORCHSCRIPT, Branchy, loaded

real = pipeline.Staging.publish
def publish(self, staged, dest, *, force):
    result = real(self, staged, dest, force=force)
    if dest.suffix == ".onnx":
        os._exit(9)  # killed: no rollback, no clean-up
    return result
pipeline.Staging.publish = publish
out = Path(sys.argv[1])
pipeline.run_export(loaded(Branchy(), out.parent.parent), "onnx", out, options=TORCHSCRIPT, n_inputs=2,
                    latency=False, force=True, keep_failed=True)
"""


def test_a_force_run_killed_after_the_artifact_rename_is_rolled_back_by_the_next_run(
        previous: tuple[Path, dict[str, str]]) -> None:
    out, before = previous
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_ARTIFACT_RENAME, str(out / "m.onnx")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert digest(out)["m.onnx"] != before["m.onnx"]  # the killed run's artifact is in place
    assert any(p.name.endswith(".partial") for p in out.iterdir())
    # the next run to the same output puts the previous set back before it looks at anything
    with pytest.raises(OutputError, match="already exists; pass --force"):
        run_export(loaded(FixedWidth(), out.parent), "onnx", out / "m.onnx", options=TORCHSCRIPT, n_inputs=2,
                   latency=False)
    assert digest(out) == before


# --------------------------------------------------------------------------------------------
# Copies of a package (validate copies an .mlpackage before coremltools opens it)


def test_copy_regular_tree_copies_files_and_refuses_links(tmp_path: Path) -> None:
    from deployprune.errors import InputError
    from deployprune.fsutil import check_regular_tree, copy_regular_tree

    pkg = tmp_path / "m.mlpackage"
    (pkg / "Data").mkdir(parents=True)
    (pkg / "Manifest.json").write_text("{}")
    (pkg / "Data" / "w.bin").write_bytes(b"\x00\x01" * 1000)
    copy_regular_tree(pkg, tmp_path / "copy.mlpackage")
    assert tree_digest(tmp_path / "copy.mlpackage") == tree_digest(pkg)
    link = tmp_path / "link.mlpackage"  # the package path the user names may itself be a link
    link.symlink_to(pkg, target_is_directory=True)
    copy_regular_tree(link, tmp_path / "copy2.mlpackage")
    assert tree_digest(tmp_path / "copy2.mlpackage") == tree_digest(pkg)

    (pkg / "Data" / "zero.bin").symlink_to("/dev/zero")
    for call in (check_regular_tree, lambda p: copy_regular_tree(p, tmp_path / "copy3.mlpackage")):
        with pytest.raises(InputError, match=r"m\.mlpackage: Data/zero\.bin is a symlink; a package must hold "
                                             "only regular files and directories"):
            call(pkg)
    with pytest.raises(InputError, match="is a device file"):
        copy_regular_tree("/dev/zero", tmp_path / "zero.copy")
