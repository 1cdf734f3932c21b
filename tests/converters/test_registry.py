"""Registry, option validation and the one-file TorchScript target."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

from deployprune import converters
from deployprune.converters import Choice, ConversionResult
from deployprune.errors import EXIT_UNSUPPORTED, EXIT_USAGE, OutputError, UnsupportedError, UsageError

from .conftest import ConvBNNet


def test_available_lists_builtin_targets() -> None:
    assert {"onnx", "coreml", "torchscript"} <= set(converters.available())


@pytest.mark.parametrize("target", ["onnx", "coreml", "torchscript"])
def test_builtin_targets_follow_the_contract(target: str) -> None:
    module = converters.get(target)
    assert callable(module.convert)
    assert module.SUFFIX.startswith(".")
    for name, spec in module.OPTIONS.items():
        kind, default, help_text = spec
        assert isinstance(help_text, str) and help_text, name
        assert default is None or converters.resolve_options(target, module.OPTIONS, {name: default})[name] == default
    assert {"force", "verify"} <= set(module.OPTIONS)
    assert callable(module.verify)  # the core asks the registry for it, never the module by name


def test_unknown_target_names_it_and_the_available_ones() -> None:
    with pytest.raises(UnsupportedError) as exc:
        converters.get("tflite")
    msg = str(exc.value)
    assert "unknown target 'tflite'" in msg
    assert "coreml, onnx, torchscript" in msg
    assert "\n" not in msg
    assert exc.value.exit_code == EXIT_UNSUPPORTED


def test_unknown_target_suggests_a_close_name() -> None:
    with pytest.raises(UnsupportedError, match=r"did you mean 'onnx'\?"):
        converters.get("onxx")


def test_register_a_third_party_target(tmp_path: Path) -> None:
    calls = []

    def convert(model, example_inputs, path, **options):
        opts = converters.resolve_options("npz", target.OPTIONS, options)
        calls.append(opts)
        Path(path).write_bytes(b"x")
        return ConversionResult(path=Path(path), target="npz", size_bytes=1, options=opts)

    target = types.SimpleNamespace(OPTIONS={"level": (int, 3, "compression level")}, SUFFIX=".npz",
                                   convert=convert)
    converters.register("npz", target)
    try:
        assert "npz" in converters.available()
        assert converters.get("npz") is target
        result = converters.get("npz").convert(ConvBNNet(), (torch.zeros(1, 3, 8, 8),), tmp_path / "m.npz", level=5)
        assert result.size_bytes == 1 and calls == [{"level": 5}]
        with pytest.raises(UsageError, match="converter 'npz' already exists; pass replace=True"):
            converters.register("npz", target)
        assert converters.parse_option_strings("npz", ["level=9"]) == {"level": 9}
    finally:
        converters._unregister("npz")
    assert "npz" not in converters.available()


@pytest.mark.parametrize(
    ("name", "obj", "message"),
    [
        ("Bad-Name", types.SimpleNamespace(OPTIONS={}, convert=lambda *a, **k: None), "lower-case identifier"),
        ("noconvert", types.SimpleNamespace(OPTIONS={}), "has no callable convert()"),
        ("noopts", types.SimpleNamespace(convert=lambda *a, **k: None), "OPTIONS must be a dict"),
        ("badspec", types.SimpleNamespace(OPTIONS={"x": (int, 1)}, convert=lambda *a, **k: None),
         "option 'x' must be (type, default, help)"),
        ("onnx", types.SimpleNamespace(OPTIONS={}, convert=lambda *a, **k: None), "'onnx' already exists"),
        ("badverify", types.SimpleNamespace(OPTIONS={}, convert=lambda *a, **k: None, verify=3),
         "verify must be callable"),
    ],
)
def test_register_rejects_malformed_targets(name: str, obj: object, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        converters.register(name, obj)


SPEC = {
    "flag": (bool, False, "a switch"),
    "count": (int, 3, "a count"),
    "ratio": (float, 0.5, "a ratio"),
    "mode": (Choice("fast", "exact"), "fast", "a mode"),
    "names": (list, None, "names"),
}


def test_resolve_options_fills_defaults_and_coerces() -> None:
    opts = converters.resolve_options("t", SPEC, {"ratio": 1, "mode": "EXACT", "names": "a, b"})
    assert opts == {"flag": False, "count": 3, "ratio": 1.0, "mode": "exact", "names": ["a", "b"]}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cuont": 1},
         "t: unknown option 'cuont' (did you mean 'count'?); valid options: count, flag, mode, names, ratio"),
        ({"flag": "yes"}, "t option 'flag': expected true/false, got 'yes'"),
        ({"count": 1.5}, "t option 'count': expected an integer, got 1.5"),
        ({"count": True}, "t option 'count': expected an integer, got True"),
        ({"ratio": "x"}, "t option 'ratio': expected a number, got 'x'"),
        ({"mode": "slow"}, "t option 'mode': 'slow' is not one of fast, exact"),
        ({"names": [1, 2]}, "t option 'names': expected a list of names, got [1, 2]"),
    ],
)
def test_resolve_options_errors_name_the_option(options: dict, message: str) -> None:
    with pytest.raises(UsageError) as exc:
        converters.resolve_options("t", SPEC, options)
    assert str(exc.value) == message
    assert exc.value.exit_code == EXIT_USAGE


def test_parse_option_strings_for_the_cli() -> None:
    opts = converters.parse_option_strings(
        "onnx", ["opset=13", "dynamic-batch=true", "input_names=image", "sparse_min_sparsity=0.25"])
    assert opts == {"opset": 13, "dynamic_batch": True, "input_names": ["image"], "sparse_min_sparsity": 0.25}
    with pytest.raises(UsageError, match="option 'opset' must look like name=value"):
        converters.parse_option_strings("onnx", ["opset"])
    with pytest.raises(UsageError, match="onnx: unknown option 'opst'"):
        converters.parse_option_strings("onnx", ["opst=13"])
    with pytest.raises(UsageError, match="onnx option 'opset': expected an integer, got 'x'"):
        converters.parse_option_strings("onnx", ["opset=x"])


def test_describe_options_lists_every_option() -> None:
    text = converters.describe_options("coreml")
    for name in converters.get("coreml").OPTIONS:
        assert name in text
    assert "fp16|fp32" in text


# --------------------------------------------------------------------------- torchscript


def test_torchscript_target_round_trip(tmp_path: Path, convbn: ConvBNNet, image: tuple) -> None:
    path = tmp_path / "model.pt"
    result = converters.get("torchscript").convert(convbn, image, path)
    assert result.path == path and result.size_bytes == path.stat().st_size > 0
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert torch.equal(loaded(*image), convbn(*image))
    assert result.metadata["max_abs_error"] == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("target", ["onnx", "torchscript"])
def test_verify_checks_a_written_artifact_against_the_model(tmp_path: Path, convbn: ConvBNNet, image: tuple,
                                                            target: str) -> None:
    conv = converters.get(target)
    path = tmp_path / f"model{conv.SUFFIX}"
    conv.convert(convbn, image, path)
    good = conv.verify(path, convbn, image)
    assert isinstance(good, converters.Verification)
    assert good.passed and good.failures == [] and good.to_dict()["passed"] is True
    # a real fault: the model changes after the export (one output channel's weights negated)
    with torch.no_grad():
        convbn.conv1.weight[0].neg_()
    bad = conv.verify(path, convbn, image)
    assert not bad.passed and bad.details["relative_error"] > 100 * bad.details["tolerance"]  # far beyond rounding
    assert len(bad.failures) == 1 and "differs from torch" in bad.failures[0] and str(path) in bad.failures[0]
    # an artifact that does not load is a failed verification, not a crash
    path.write_bytes(b"not a model")
    broken = conv.verify(path, convbn, image)
    assert not broken.passed and str(path) in broken.failures[0]


def test_torchscript_target_refuses_to_overwrite(tmp_path: Path, convbn: ConvBNNet, image: tuple) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"keep")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        converters.get("torchscript").convert(convbn, image, path)
    assert path.read_bytes() == b"keep"
    converters.get("torchscript").convert(convbn, image, path, force=True)
    assert path.read_bytes() != b"keep"


def test_torchscript_script_failure_is_unsupported(tmp_path: Path, image: tuple) -> None:
    class Unscriptable(torch.nn.Module):
        def forward(self, *xs):  # variable arguments: torch.jit.script refuses them
            return xs[0] * 2

    with pytest.raises(UnsupportedError, match=r"torchscript: torch.jit.script cannot handle Unscriptable"):
        converters.get("torchscript").convert(Unscriptable(), image, tmp_path / "m.pt", method="script")
    assert list(tmp_path.iterdir()) == []
