"""The command line names its own flags (issue 13, "Wording")."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from deployprune import cli, zoo


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("command", ["export", "finalize", "validate"])
def test_commands_describe_themselves_in_their_help(command: str) -> None:
    sub = _subparser(command)
    assert sub.description, f"'deployprune {command} --help' has no description"
    assert sub.description.strip() in " ".join(sub.format_help().split())


def test_validate_help_says_what_it_compares_and_when_it_fails(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["validate", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Run ARTIFACT (.onnx file or .mlpackage) and MODEL (with --masks applied)" in text
    assert "exit 4 when a threshold is not met" in text


def test_a_converter_option_hint_names_the_opt_flag() -> None:
    assert cli.cli_wording("fp16 ...; pass precision='fp32'") == "fp16 ...; pass --opt precision=fp32"
    assert cli.cli_wording("x (|w| < 2.98e-08); pass precision='fp32' to keep them") == (
        "x (|w| < 2.98e-08); pass --opt precision=fp32 to keep them")
    unchanged = "m.pt: is a state_dict; pass the architecture with --model package.module:factory"
    assert cli.cli_wording(unchanged) == unchanged


def test_coreml_fp16_overflow_error_names_the_opt_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    """The converter's message ("pass precision='fp32'") reaches the terminal as a command line option."""
    model = zoo.build("lenet")
    with torch.no_grad():
        model.fc3.weight[0, :3] = 1e5  # beyond fp16's 65504
    torch.save(model.state_dict(), tmp_path / "big.pt")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["export", "big.pt", "--model", "deployprune.zoo.lenet:TorchModel", "--target", "coreml",
                     "-o", "big.mlpackage"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2, err
    assert len(err) == 1
    assert err[0].startswith("error: coreml option 'precision': fp16 cannot store 3 weights of fc3.weight")
    assert err[0].endswith("; pass --opt precision=fp32"), err[0]
    assert not (tmp_path / "big.mlpackage").exists()


def test_flags_are_not_followed_by_their_python_twin(tmp_path) -> None:
    """``--force (force=True)`` is written for API users too; the command line says ``--force``."""
    import subprocess
    import sys

    (tmp_path / "lenet.onnx").write_text("mine")
    from .test_cli import LENET_SAMPLE

    proc = subprocess.run([sys.executable, "-m", "deployprune", "export", str(LENET_SAMPLE)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3
    assert proc.stderr == "error: lenet.onnx: already exists; pass --force to overwrite it\n"
    assert (tmp_path / "lenet.onnx").read_text() == "mine"
