"""Every loading format of deployprune.io, and the one-line errors for bad files."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deployprune import zoo
from deployprune.errors import InputError, MaskError, UnsafeFileError, UnsupportedError, UsageError
from deployprune.io import (
    CHECKPOINT_FORMAT,
    InputShape,
    load_masks,
    load_model,
    make_checkpoint,
    parse_input_shape,
    parse_size,
    save_checkpoint,
)
from tests.io.conftest import SAMPLES, tree_digest
from tests.io.factories import tiny_conv, two_inputs

LENET = "deployprune.zoo.lenet:TorchModel"


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------------------------
# input shapes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,3,224,224", InputShape((1, 3, 224, 224))),
        ("1x3x32x32", InputShape((1, 3, 32, 32))),
        (" 2, 16 ", InputShape((2, 16))),
        ("1,16:int64", InputShape((1, 16), torch.int64)),
        ("1,16:int64:30522", InputShape((1, 16), torch.int64, 30522)),
        ("4:float16", InputShape((4,), torch.float16)),
    ],
)
def test_parse_input_shape(text: str, expected: InputShape) -> None:
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty value"),
        ("1,a,3", "dimensions must be integers"),
        ("1,0,3", "dimensions must be positive"),
        ("1,3:complex", "unknown dtype 'complex'"),
        ("1,3:float32:5", "only applies to integer dtypes"),
        ("1:int64:x", "the bound 'x' must be an integer"),
        ("1:2:3:4", "too many ':' fields"),
        ("100000,100000,100", "too large"),
    ],
)
def test_parse_input_shape_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_input_shape(text)
    assert message in one_line(exc)
    assert exc.value.exit_code == 2


def test_parse_size() -> None:
    assert parse_size("1024") == 1024
    assert parse_size("2K") == 2048
    assert parse_size("16G") == 16 * 1024**3
    assert parse_size("1.5MiB") == int(1.5 * 1024**2)
    with pytest.raises(UsageError, match="expected a size like 500M"):
        parse_size("lots")


# --------------------------------------------------------------------------------------------
# state_dict + factory


def test_state_dict_with_registry_factory(lenet_sd: Path, lenet: nn.Module) -> None:
    loaded = load_model(lenet_sd, model_factory=LENET)
    assert loaded.kind == "state_dict"
    assert loaded.factory == LENET
    assert same_weights(loaded.model, lenet)
    assert not loaded.model.training
    # the input shape comes from the registry spec of the factory: no --input-shape needed
    assert [tuple(t.shape) for t in loaded.example_inputs] == [(1, 1, 28, 28)]
    assert loaded.masks == {}


def test_state_dict_with_user_factory_and_shapes(tiny_sd: Path) -> None:
    loaded = load_model(tiny_sd, model_factory="tests.io.factories:tiny_conv", input_shapes=["2,3,8,8"])
    assert same_weights(loaded.model, tiny_conv())
    assert loaded.example_inputs[0].shape == (2, 3, 8, 8)
    # deterministic example inputs
    again = load_model(tiny_sd, model_factory="tests.io.factories:tiny_conv", input_shapes=["2,3,8,8"])
    assert torch.equal(loaded.example_inputs[0], again.example_inputs[0])


def test_several_inputs_with_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "two.pt"
    torch.save(two_inputs().state_dict(), path)
    loaded = load_model(path, model_factory="tests.io.factories:two_inputs",
                        input_shapes=["1,6:int64:10", "1,4"])
    ids, feats = loaded.example_inputs
    assert ids.dtype == torch.int64 and ids.shape == (1, 6) and int(ids.max()) < 10
    assert feats.dtype == torch.float32 and feats.shape == (1, 4)


def test_state_dict_needs_factory(lenet_sd: Path) -> None:
    with pytest.raises(UsageError) as exc:
        load_model(lenet_sd)
    assert one_line(exc) == (
        f"{lenet_sd}: is a state_dict; pass the architecture with --model package.module:factory "
        "(e.g. --model deployprune.zoo.lenet:TorchModel)"
    )


def test_state_dict_wrong_factory_names_keys(lenet_sd: Path) -> None:
    with pytest.raises(InputError) as exc:
        load_model(lenet_sd, model_factory="tests.io.factories:tiny_conv", input_shapes=["1,3,8,8"])
    msg = one_line(exc)
    assert msg.startswith(f"{lenet_sd}: the weights do not fit --model tests.io.factories:tiny_conv: ")
    assert "missing keys bn1.weight" in msg
    assert "unexpected keys fc1.weight" in msg


def test_state_dict_shape_mismatch(tmp_path: Path) -> None:
    sd = tiny_conv().state_dict()
    sd["fc.weight"] = torch.zeros(5, 8)
    path = tmp_path / "bad_shapes.pt"
    torch.save(sd, path)
    with pytest.raises(InputError, match=r"shape mismatch for fc.weight \(5, 8\) vs \(4, 8\)"):
        load_model(path, model_factory="tests.io.factories:tiny_conv", input_shapes=["1,3,8,8"])


@pytest.mark.parametrize(
    ("factory", "error", "message"),
    [
        ("nomodule", UsageError, "expected package.module:factory"),
        ("no_such_pkg.mod:fn", UsageError, "cannot import module 'no_such_pkg.mod'"),  # as for --optimizer
        ("tests.io.factories:missing", UsageError, "module 'tests.io.factories' has no attribute 'missing'"),
        ("tests.io.factories:not_a_module", InputError, "returned dict, not a torch.nn.Module"),
    ],
)
def test_bad_factories(tiny_sd: Path, factory: str, error: type, message: str) -> None:
    with pytest.raises(error) as exc:
        load_model(tiny_sd, model_factory=factory, input_shapes=["1,3,8,8"])
    assert message in one_line(exc)


def test_unknown_input_shape(tiny_sd: Path) -> None:
    with pytest.raises(UsageError) as exc:
        load_model(tiny_sd, model_factory="tests.io.factories:tiny_conv")
    assert one_line(exc) == (
        f"{tiny_sd}: the input shape of this model is unknown; pass --input-shape, "
        "e.g. --input-shape 1,3,224,224 (repeat it for several inputs)"
    )


def test_wrong_input_shape(lenet_sd: Path) -> None:
    with pytest.raises(InputError) as exc:
        load_model(lenet_sd, model_factory=LENET, input_shapes=["1,1,32,32"])
    msg = one_line(exc)
    assert msg.startswith(f"{lenet_sd}: the model fails on input 1x1x32x32 (float32) (RuntimeError: ")
    assert "mat1 and mat2 shapes cannot be multiplied" in msg
    assert msg.endswith("pass the shape the model expects with --input-shape")
    assert exc.value.exit_code == 3


# --------------------------------------------------------------------------------------------
# masks attached by a pruner


class _Mask(nn.Module):
    """A pruning parametrization whose mask is saved with the state_dict."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def test_parametrized_state_dict(tmp_path: Path, lenet: nn.Module, tutorial_masks: dict) -> None:
    dense = {k: v.clone() for k, v in lenet.state_dict().items()}
    parametrize.register_parametrization(lenet.conv1, "weight", _Mask(tutorial_masks["conv1"]["weight"]))
    keys = list(lenet.state_dict())
    assert "conv1.parametrizations.weight.original" in keys and "conv1.parametrizations.weight.0.mask" in keys
    path = tmp_path / "pruned_sd.pt"
    torch.save(lenet.state_dict(), path)

    loaded = load_model(path, model_factory=LENET)
    assert not parametrize.is_parametrized(loaded.model.conv1)
    assert torch.equal(loaded.model.conv1.weight, dense["conv1.weight"])  # plain weights are the originals
    assert list(loaded.masks) == ["conv1"]
    assert torch.equal(loaded.masks["conv1"]["weight"], tutorial_masks["conv1"]["weight"].bool())


def test_torch_prune_style_state_dict(tmp_path: Path, lenet: nn.Module) -> None:
    from torch.nn.utils import prune

    prune.ln_structured(lenet.conv2, "weight", amount=0.5, n=1, dim=0)
    expected = lenet.conv2.weight_mask.bool().clone()
    path = tmp_path / "tp.pt"
    torch.save(lenet.state_dict(), path)
    loaded = load_model(path, model_factory=LENET)
    assert torch.equal(loaded.masks["conv2"]["weight"], expected)
    assert torch.equal(loaded.model.conv2.weight, lenet.conv2.weight_orig)


def test_structured_vector_mask_is_expanded(tmp_path: Path, lenet: nn.Module) -> None:
    keep = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    parametrize.register_parametrization(lenet.conv1, "weight", _Mask(keep.reshape(-1, 1, 1, 1).float()))
    sd = lenet.state_dict()
    sd["conv1.parametrizations.weight.0.mask"] = keep  # a per-channel vector, as torch.ao stores it
    path = tmp_path / "vec.pt"
    torch.save(sd, path)
    loaded = load_model(path, model_factory=LENET)
    mask = loaded.masks["conv1"]["weight"]
    assert mask.shape == (6, 1, 5, 5)
    assert mask.flatten(1).all(1).tolist() == keep.tolist()


def test_parametrization_without_mask_is_rejected(tmp_path: Path, lenet: nn.Module) -> None:
    sd = lenet.state_dict()
    sd["conv1.parametrizations.weight.original"] = sd.pop("conv1.weight")
    path = tmp_path / "nomask.pt"
    torch.save(sd, path)
    with pytest.raises(InputError, match="conv1.weight is parametrized but its mask was not saved"):
        load_model(path, model_factory=LENET)


# --------------------------------------------------------------------------------------------
# deployprune checkpoints


def test_samples_load_without_flags(lenet: nn.Module) -> None:
    loaded = load_model(SAMPLES / "lenet.pt")
    assert loaded.kind == "checkpoint" and loaded.arch == "lenet"
    assert same_weights(loaded.model, lenet)
    mask = loaded.masks["conv1"]["weight"]
    assert mask.shape == (6, 1, 5, 5)
    assert mask.flatten(1).any(1).tolist() == [False, False, False, True, True, True]
    assert list(loaded.masks) == ["conv1"]  # weight only, bias untouched: the NNI tutorial case

    rs = load_model(SAMPLES / "resnet_small.pt")
    assert rs.arch == "resnet_basic"
    assert [tuple(t.shape) for t in rs.example_inputs] == [tuple(s.shape) for s in zoo.get("resnet_basic").inputs]
    for block in ("layer1.0", "layer2.0", "layer3.0", "layer4.0"):
        kept = rs.masks[f"{block}.conv1"]["weight"].flatten(1).any(1)
        assert kept.float().mean().item() == 0.5
        assert torch.equal(rs.masks[f"{block}.bn1"]["weight"], kept)
        assert torch.equal(rs.masks[f"{block}.bn1"]["bias"], kept)


def test_samples_are_reproducible() -> None:
    from deployprune.zoo.make_samples import SAMPLES as RECIPES
    from deployprune.zoo.make_samples import sample_bytes

    for filename, (arch, make_masks) in RECIPES.items():
        assert sample_bytes(arch, make_masks) == (SAMPLES / filename).read_bytes(), filename


def test_checkpoint_round_trip(tmp_path: Path, lenet: nn.Module, tutorial_masks: dict) -> None:
    path = save_checkpoint(tmp_path / "ck.pt", lenet, arch="lenet", masks=tutorial_masks,
                           input_shapes=[InputShape((2, 1, 28, 28))])
    assert torch.load(path, weights_only=True)["format"] == CHECKPOINT_FORMAT
    loaded = load_model(path)
    assert same_weights(loaded.model, lenet)
    assert loaded.example_inputs[0].shape == (2, 1, 28, 28)  # stored shapes win over the registry
    assert torch.equal(loaded.masks["conv1"]["weight"], tutorial_masks["conv1"]["weight"].bool())
    # same checkpoint, same bytes (the temporary file name does not leak into the archive)
    again = save_checkpoint(tmp_path / "ck2.pt", lenet, arch="lenet", masks=tutorial_masks,
                            input_shapes=[InputShape((2, 1, 28, 28))])
    assert path.read_bytes() == again.read_bytes()


def test_checkpoint_from_attached_masks(tmp_path: Path, lenet: nn.Module, tutorial_masks: dict) -> None:
    dense_w = lenet.conv1.weight.detach().clone()
    parametrize.register_parametrization(lenet.conv1, "weight", _Mask(tutorial_masks["conv1"]["weight"]))
    path = save_checkpoint(tmp_path / "att.pt", lenet, arch="lenet")
    assert parametrize.is_parametrized(lenet.conv1)  # the caller's model is untouched and still runs
    x = torch.randn(1, 1, 28, 28)
    assert torch.equal(lenet(x), lenet(x))
    loaded = load_model(path)
    assert torch.equal(loaded.model.conv1.weight, dense_w)
    assert torch.equal(loaded.masks["conv1"]["weight"], tutorial_masks["conv1"]["weight"].bool())


def test_checkpoint_factory_trust(tmp_path: Path) -> None:
    model = tiny_conv()
    path = save_checkpoint(tmp_path / "f.pt", model, factory="tests.io.factories:tiny_conv",
                           input_shapes=[InputShape((1, 3, 8, 8))])
    with pytest.raises(UnsafeFileError) as exc:
        load_model(path)
    assert one_line(exc) == (
        f"{path}: names model factory 'tests.io.factories:tiny_conv', which is not a model of the "
        "deployprune zoo; importing it would run code named by the file; if you trust it, pass "
        "--model tests.io.factories:tiny_conv"
    )
    loaded = load_model(path, model_factory="tests.io.factories:tiny_conv")
    assert same_weights(loaded.model, model)

    trusted = save_checkpoint(tmp_path / "t.pt", zoo.build("lenet"), factory=LENET)
    assert load_model(trusted).factory == LENET


@pytest.fixture
def user_models_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A user's own top-level ``models`` package (as YOLOv5 has) first on sys.path; importing any of
    it writes a sentinel file, so a test can prove it never ran."""
    import importlib
    import sys

    root = tmp_path / "user_repo"
    (root / "models").mkdir(parents=True)
    sentinel = tmp_path / "user_models_imported"
    (root / "models" / "__init__.py").write_text(
        f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n")
    (root / "models" / "lenet.py").write_text(
        "from torch import nn\n\ndef TorchModel():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n")
    (root / "models" / "yolo.py").write_text("from torch import nn\n\ndef Model():\n    return nn.Linear(2, 2)\n")
    saved = {k: v for k, v in sys.modules.items() if k == "models" or k.startswith("models.")}
    for k in saved:
        del sys.modules[k]
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield sentinel
    for k in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_checkpoint_legacy_zoo_factory(tmp_path: Path) -> None:
    """Checkpoints written when the zoo was installed as ``models`` still load, as the zoo."""
    model = zoo.build("lenet")
    path = save_checkpoint(tmp_path / "old.pt", model, factory="models.lenet:TorchModel")
    loaded = load_model(path)
    assert loaded.factory == LENET
    assert type(loaded.model).__module__ == "deployprune.zoo.lenet"
    assert same_weights(loaded.model, model)
    assert [s.shape for s in loaded.input_shapes] == [(1, 1, 28, 28)]  # the registry spec was found
    # the old spelling given with --model (no other `models` package importable) means the zoo too
    sd = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd)
    assert load_model(sd, model_factory="models.lenet:TorchModel").factory == LENET


def test_legacy_spelling_never_imports_a_user_models_package(tmp_path: Path, user_models_package: Path) -> None:
    model = zoo.build("lenet")
    old = save_checkpoint(tmp_path / "old.pt", model, factory="models.lenet:TorchModel")
    assert load_model(old).factory == LENET  # from a file the old spelling is the zoo
    # a file naming a module the zoo never had is the user's code: refused, nothing imported
    foreign = save_checkpoint(tmp_path / "yolo.pt", nn.Linear(2, 2), factory="models.yolo:Model",
                              input_shapes=[InputShape((1, 2))])
    with pytest.raises(UnsafeFileError,
                       match="names model factory 'models.yolo:Model', which is not a model of the deployprune zoo"):
        load_model(foreign)
    assert not user_models_package.exists()
    # the user naming their own package with --model gets their package, not the zoo
    mine = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    sd = tmp_path / "mine.pt"
    torch.save(mine.state_dict(), sd)
    loaded = load_model(sd, model_factory="models.lenet:TorchModel", input_shapes=["1,1,28,28"])
    assert loaded.factory == "models.lenet:TorchModel"
    assert same_weights(loaded.model, mine)
    assert user_models_package.exists()


def _write_ckpt(path: Path, **overrides) -> Path:
    ckpt = make_checkpoint(zoo.build("lenet"), arch="lenet")
    ckpt.update(overrides)
    for k in [k for k, v in overrides.items() if v is None]:
        del ckpt[k]
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"version": "1"}, InputError, "checkpoint 'version' must be an integer, got str"),
        ({"version": 99}, InputError, "checkpoint version 99 was written by a newer deployprune"),
        ({"arch": 5}, InputError, "checkpoint 'arch' must be a string, got int"),
        ({"arch": "nonexistent_net"}, InputError, "unknown architecture 'nonexistent_net'"),
        ({"arch": None}, InputError, "checkpoint names neither 'arch' nor 'factory'"),
        ({"state_dict": [1, 2]}, InputError,
         "checkpoint 'state_dict': expected a state_dict (dict of tensors), got list"),
        ({"state_dict": {"conv1.weight": 3}}, InputError, "state_dict entry 'conv1.weight' is a int, not a tensor"),
        ({"masks": [1]}, InputError, "checkpoint 'masks' must be a dict, got list"),
        ({"masks": {"conv1": 1}}, MaskError, "checkpoint masks for 'conv1' must be a dict"),
        ({"masks": {"nope": {"weight": torch.ones(1)}}}, MaskError, "module 'nope' does not exist in the model"),
        ({"input_shapes": "1,1,28,28"}, InputError, "'input_shapes' must be a non-empty list, got str"),
        ({"input_shapes": [[1, -1]]}, InputError, "bad entry [1, -1] in 'input_shapes'"),
        ({"format": "something.else"}, InputError, "unknown checkpoint format 'something.else'"),
    ],
)
def test_checkpoint_wrong_types(tmp_path: Path, overrides: dict, error: type, message: str) -> None:
    path = _write_ckpt(tmp_path / "bad.pt", **overrides)
    with pytest.raises(error) as exc:
        load_model(path)
    msg = one_line(exc)
    assert msg.startswith(str(path)) and message in msg


def test_compact_checkpoint_rebuilds_smaller_modules(tmp_path: Path) -> None:
    import deployprune as dp

    model = tiny_conv()
    keep = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    masks = {
        "conv1": {"weight": keep.reshape(-1, 1, 1, 1).expand_as(model.conv1.weight), "bias": keep},
        "bn1": {"weight": keep, "bias": keep},
    }
    x = torch.randn(2, 3, 8, 8)
    small = dp.finalize(model, (x,), masks)
    path = save_checkpoint(tmp_path / "compact.pt", small, factory="tests.io.factories:tiny_conv",
                           compact=True, input_shapes=[InputShape((2, 3, 8, 8))])
    loaded = load_model(path, model_factory="tests.io.factories:tiny_conv")
    assert loaded.compact
    assert loaded.model.conv1.out_channels == small.conv1.out_channels < 8
    assert loaded.model.bn1.num_features == small.bn1.num_features
    assert torch.equal(loaded.model(x), small(x))


# --------------------------------------------------------------------------------------------
# torch.export programs


@pytest.fixture
def program_path(tmp_path: Path, lenet: nn.Module) -> Path:
    x = torch.randn(1, 1, 28, 28)
    path = tmp_path / "lenet.pt2"
    torch.export.save(torch.export.export(lenet, (x,)), str(path))
    return path


def test_pt2_program(program_path: Path, lenet: nn.Module, tutorial_masks: dict, tmp_path: Path) -> None:
    loaded = load_model(program_path)
    assert loaded.kind == "export"
    assert [tuple(t.shape) for t in loaded.example_inputs] == [(1, 1, 28, 28)]
    x = torch.randn(1, 1, 28, 28)
    assert torch.allclose(loaded.model(x), lenet(x), atol=1e-6)
    # masks given separately apply to the program's module names
    mpath = tmp_path / "m.pt"
    torch.save(tutorial_masks, mpath)
    with_masks = load_model(program_path, masks=mpath)
    assert list(with_masks.masks) == ["conv1"]


def _rewrite_zip(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
        extra = edit(None, None)
        if extra:
            name, data = extra
            top = zin.namelist()[0].split("/", 1)[0]
            zout.writestr(f"{top}/{name}", data)
    return dst


def test_pt2_with_pickled_weights_is_refused(program_path: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel"

    def edit(name, data):
        if name is None:
            return None
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            first = next(iter(cfg["config"]))
            cfg["config"][first]["use_pickle"] = True
            return json.dumps(cfg).encode()
        return data

    bad = _rewrite_zip(program_path, tmp_path / "pickled.pt2", edit)
    with pytest.raises(UnsafeFileError) as exc:
        load_model(bad)
    assert "in the torch.export archive is pickled; loading it would run code from the file" in one_line(exc)
    assert not sentinel.exists()


def test_pt2_with_unexpected_entry_is_refused(program_path: Path, tmp_path: Path) -> None:
    def edit(name, data):
        if name is None:
            return ("data/constants/opaque_obj_0", pickle.dumps({"x": 1}))
        return data

    bad = _rewrite_zip(program_path, tmp_path / "extra.pt2", edit)
    with pytest.raises(UnsafeFileError) as exc:
        load_model(bad)
    assert "unexpected entry 'data/constants/opaque_obj_0' in the torch.export archive" in one_line(exc)


def test_truncated_pt2(program_path: Path, tmp_path: Path) -> None:
    data = program_path.read_bytes()
    bad = tmp_path / "trunc.pt2"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as exc:
        load_model(bad)
    assert one_line(exc) == (f"{bad}: the zip archive is truncated or corrupt (no central directory); "
                             "re-save or re-copy the file")


# --------------------------------------------------------------------------------------------
# pickled modules and hostile files


class Boom:
    """Unpickling this creates the sentinel file named in its state (runs code from the file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_module_needs_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(tiny_conv(), path)
    with pytest.raises(UnsafeFileError) as exc:
        load_model(path, input_shapes=["1,3,8,8"])
    assert one_line(exc) == (
        f"{path}: loading it would run code from the file (it pickles tests.io.factories.TinyConv); "
        "if you trust its source, rerun with --trust-pickle (allow_pickle=True), or save a state_dict "
        "and pass --model package.module:factory"
    )
    loaded = load_model(path, input_shapes=["1,3,8,8"], allow_pickle=True)
    assert loaded.kind == "pickle"
    assert same_weights(loaded.model, tiny_conv())


def test_pickled_module_with_attached_masks(tmp_path: Path, lenet: nn.Module) -> None:
    from torch.nn.utils import prune

    dense_w = lenet.conv2.weight.detach().clone()
    prune.ln_structured(lenet.conv2, "weight", amount=0.5, n=1, dim=0)
    expected = lenet.conv2.weight_mask.bool().clone()
    path = tmp_path / "whole_masked.pt"
    torch.save(lenet, path)  # parametrized modules cannot be pickled; torch.nn.utils.prune ones can
    loaded = load_model(path, input_shapes=["1,1,28,28"], allow_pickle=True)
    conv2 = loaded.model.conv2
    assert not conv2._forward_pre_hooks and "weight_orig" not in dict(conv2.named_parameters())
    assert torch.equal(conv2.weight, dense_w)
    assert torch.equal(loaded.masks["conv2"]["weight"], expected)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_running_pickle_does_not_run(tmp_path: Path, writer: str) -> None:
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.pt"
    payload = {"state": Boom(str(sentinel))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)
    before = path.read_bytes()
    with pytest.raises(UnsafeFileError) as exc:
        load_model(path, input_shapes=["1,2"])
    assert "loading it would run code from the file" in one_line(exc)
    assert "--trust-pickle" in str(exc.value)
    with pytest.raises(UnsafeFileError):
        load_masks(path, tiny_conv())
    assert not sentinel.exists(), "the pickle's code ran"
    assert path.read_bytes() == before


def _torchscript(path: Path) -> Path:
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    return path


@pytest.mark.parametrize(
    ("name", "make", "error", "expected"),
    [
        ("missing.pt", None, InputError, "{p}: no such file; check the model file path"),
        ("empty.pt", lambda p: p.write_bytes(b""), InputError, "{p}: file is empty; it is not a model file"),
        ("text.pt", lambda p: p.write_text("hello, world\n"), InputError,
         "{p}: cannot be read as a PyTorch file (unrecognized data, KeyError); "
         "it is corrupt, truncated or not written by torch.save"),
        ("random.pt", lambda p: p.write_bytes(bytes(range(256)) * 8), InputError,
         "{p}: cannot be read as a PyTorch file"),
        ("trunc.pt", "truncated-zip", InputError,
         "{p}: the zip archive is truncated or corrupt (no central directory); re-save or re-copy the file"),
        ("trunc_legacy.pt", "truncated-legacy", InputError, "{p}: cannot be read as a PyTorch file"),
        ("list.pt", lambda p: torch.save([1, 2, 3], p), InputError,
         "{p}: holds a list, not a model, state_dict or deployprune checkpoint"),
        ("masks_as_model.pt", lambda p: torch.save({"conv1": {"weight": torch.ones(2)}}, p), InputError,
         "{p}: holds masks, not model weights; pass it with --masks and give the model file"),
        ("script.pt", _torchscript, UnsupportedError, "{p}: is a TorchScript archive"),
        ("model.onnx", lambda p: p.write_bytes(b"\x08\x07"), InputError, "{p}: is a deployment artifact"),
    ],
)
def test_bad_model_files(tmp_path: Path, name: str, make, error: type, expected: str) -> None:
    path = tmp_path / name
    sd = tiny_conv().state_dict()
    if make == "truncated-zip":
        torch.save(sd, path)
        path.write_bytes(path.read_bytes()[:700])
    elif make == "truncated-legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:500])
    elif make is not None:
        make(path)
    before = tree_digest(tmp_path)
    with pytest.raises(error) as exc:
        load_model(path, model_factory="tests.io.factories:tiny_conv", input_shapes=["1,3,8,8"])
    assert one_line(exc).startswith(expected.format(p=path))
    assert tree_digest(tmp_path) == before  # inputs byte-identical, nothing written


@pytest.mark.parametrize(
    ("entry", "error", "message"),
    [
        ("good/code/__torch__.py", UnsupportedError, "is a TorchScript archive, which deployprune does not load"),
        ("good/payload.so", InputError, "unexpected entry 'payload.so' in the archive"),
        ("good/../escape", InputError, "archive entry 'good/../escape' has an unsafe path"),
        ("other/data.pkl", InputError, "unexpected archive layout (several top-level folders: good, other)"),
    ],
)
def test_zip_with_unexpected_entries(tmp_path: Path, entry: str, error: type, message: str) -> None:
    good = tmp_path / "good.pt"
    torch.save(tiny_conv().state_dict(), good)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename))
        zout.writestr(entry, b"import os")
    with pytest.raises(error) as exc:
        load_model(bad, model_factory="tests.io.factories:tiny_conv", input_shapes=["1,3,8,8"])
    assert message in one_line(exc)


def test_directory_and_size_limit(tmp_path: Path, tiny_sd: Path) -> None:
    with pytest.raises(InputError, match="is a directory, expected a model file"):
        load_model(tmp_path)
    with pytest.raises(InputError) as exc:
        load_model(tiny_sd, model_factory="tests.io.factories:tiny_conv", input_shapes=["1,3,8,8"],
                   max_file_bytes=1000)
    assert "above the 1000 B limit; if you trust it, raise the limit with --max-file-size" in one_line(exc)


# --------------------------------------------------------------------------------------------
# masks files


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        ({"conv3": {"weight": torch.ones(6, 1, 5, 5)}},
         "module 'conv3' does not exist in the model (did you mean 'conv2', 'conv1'?)"),
        ({"conv1": {"weight": torch.ones(6, 1, 3, 3)}},
         "conv1.weight: mask shape (6, 1, 3, 3) does not match parameter shape (6, 1, 5, 5)"),
        ({"conv1": {"weight": torch.full((6, 1, 5, 5), 0.5)}},
         "conv1.weight: mask is not binary (found 0.5); masks must hold only 0 and 1"),
        ({"conv1": {"weight": torch.full((6, 1, 5, 5), float("nan"))}},
         "conv1.weight: mask contains NaN; masks must hold only 0 and 1"),
        ({"conv1": {"gamma": torch.ones(6)}}, "module 'conv1' (Conv2d) has no parameter 'gamma'"),
        ({"conv1": {"weight": "ones"}}, "conv1.weight: mask must be a tensor or array, got str"),
        ({"conv1": {"weight": torch.ones(6, 1, 5, 5, dtype=torch.complex64)}},
         "conv1.weight: mask dtype torch.complex64 is not supported; use bool or 0/1 floats"),
        ([torch.ones(3)], "expected masks as a dict {module_name: {param_name: mask}}, got list"),
    ],
)
def test_bad_masks_files(tmp_path: Path, lenet_sd: Path, masks, message: str) -> None:
    mpath = tmp_path / "masks.pt"
    torch.save(masks, mpath)
    before = tree_digest(tmp_path)
    with pytest.raises(MaskError) as exc:
        load_model(lenet_sd, model_factory=LENET, masks=mpath)
    msg = one_line(exc)
    assert msg.startswith(f"{mpath}") and message in msg
    assert exc.value.exit_code == 3
    assert tree_digest(tmp_path) == before


def test_masks_file_variants(tmp_path: Path, lenet_sd: Path, tutorial_masks: dict) -> None:
    # bool, float and int masks are all accepted and normalized to bool
    for dtype in (torch.bool, torch.float32, torch.int64):
        mpath = tmp_path / f"m_{dtype}.pt"
        torch.save({"conv1": {"weight": tutorial_masks["conv1"]["weight"].to(dtype)}}, mpath)
        loaded = load_model(lenet_sd, model_factory=LENET, masks=mpath)
        assert loaded.masks["conv1"]["weight"].dtype == torch.bool
        assert int(loaded.masks["conv1"]["weight"].sum()) == 75
    # --masks replaces the masks stored in a checkpoint
    mpath = tmp_path / "conv2.pt"
    torch.save({"conv2": {"weight": torch.ones(16, 6, 5, 5)}}, mpath)
    loaded = load_model(SAMPLES / "lenet.pt", masks=mpath)
    assert list(loaded.masks) == ["conv2"]
    with pytest.raises(InputError, match="no such file; check the masks file path"):
        load_model(lenet_sd, model_factory=LENET, masks=tmp_path / "nope.pt")
