"""Hostile-input corpus: every file deployprune reads, made bad in every way we could think of.

The corpus is generated into a temporary directory (no binary blobs in the repository) and fed to
every entry point that reads it (``export``, ``finalize``, ``validate``, ``prune``, ``report``,
``run``). Every case must end with

* exactly one ``error: ...`` line on stderr naming the file, and the documented exit code,
* every input byte-identical afterwards (sha256 of the whole input directory),
* no file left in the output directory (the working directory) or in the input directory,
* the side-effect sentinel absent: nothing in a file ran code.

Most cases run the CLI in-process (``deployprune.cli.main``) to stay fast; the disk-full cases run
``python -m deployprune`` under a real kernel file-size limit (``RLIMIT_FSIZE``), so that torch's
C++ writers fail the way they do on a full disk.

Every bug this corpus found is fixed and its case passes; docs/security.md lists them (H1-H20).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx.external_data_helper import set_external_data
from torch import nn

import deployprune as dp
from deployprune import cli, converters, zoo
from deployprune.errors import ConfigError
from deployprune.io import InputShape, save_checkpoint
from tests.io.conftest import tree_digest

REPO = Path(__file__).resolve().parents[2]
LENET = "deployprune.zoo.lenet:TorchModel"
SENTINEL = "SENTINEL"

EXIT_USAGE, EXIT_INPUT, EXIT_UNSUPPORTED = 2, 3, 5


class Boom:
    """Unpickling this creates the sentinel file: the stand-in for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))



# --------------------------------------------------------------------------------------------
# Corpus generation


def _local_data_offset(raw: bytes, info: zipfile.ZipInfo) -> int:
    """Offset of an entry's data: the local header's own name/extra lengths (torch pads them)."""
    h = info.header_offset
    name_len, extra_len = struct.unpack("<HH", raw[h + 26 : h + 30])
    return h + 30 + name_len + extra_len


def _rewrite_zip(src: Path, dst: Path, edit: Callable[[str, bytes], list[tuple[str, bytes]]]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            for name, data in edit(info.filename, zin.read(info.filename)):
                zout.writestr(name, data)


def _lenet() -> nn.Module:
    torch.manual_seed(0)
    return zoo.build("lenet").eval()


def build_corpus(d: Path) -> None:
    """Write every good and hostile input file into ``d``."""
    model = _lenet()
    sentinel = d / SENTINEL
    rng = random.Random(8)

    # ---- good inputs the bad ones are derived from
    torch.save(model.state_dict(), d / "sd.pt")
    save_checkpoint(d / "ckpt.pt", model, arch="lenet")
    program = torch.export.export(model, (torch.randn(1, 1, 28, 28),))
    torch.export.save(program, str(d / "prog.pt2"))
    converters.get("onnx").convert(model, (torch.randn(1, 1, 28, 28),), d / "good.onnx")
    (d / "cfg.json").write_text(json.dumps({"target_sparsity": 0.5, "granularity": "out_channel"}))
    ones = {n: {"weight": torch.ones_like(m.weight)} for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}
    torch.save(ones, d / "masks_ok.pt")

    save_checkpoint(d / "digits_net.pt", zoo.build("mnist_net_digits"), arch="mnist_net_digits")
    (d / "cfg_element.json").write_text(json.dumps({"target_sparsity": 0.5}))

    # ---- model files
    sd = (d / "sd.pt").read_bytes()
    ckpt = (d / "ckpt.pt").read_bytes()
    (d / "garbage.pt").write_bytes(b"\x80\x02garbage" * 50)
    (d / "random.pt").write_bytes(rng.randbytes(4096))
    (d / "empty.pt").write_bytes(b"")
    (d / "text.pt").write_text(json.dumps({"conv1.weight": [[1.0]]}))
    (d / "trunc_sd.pt").write_bytes(sd[: len(sd) // 2])
    (d / "trunc_sd_tail.pt").write_bytes(sd[:-7])
    (d / "trunc_ckpt.pt").write_bytes(ckpt[: len(ckpt) * 2 // 3])
    with zipfile.ZipFile(d / "sd.pt") as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename)
    flipped = bytearray(sd)
    flipped[_local_data_offset(sd, info) + 8] ^= 0xFF
    (d / "bitflip_sd.pt").write_bytes(bytes(flipped))
    (d / "evil_raw.pt").write_bytes(pickle.dumps({"conv1.weight": Boom(sentinel)}))
    torch.save({"conv1.weight": Boom(sentinel)}, d / "evil_zip.pt")
    torch.save(model, d / "whole_module.pt")
    torch.save({"format": "deployprune.checkpoint", "version": 1,
                "factory": "tests.hostile.sentinel_factory:build",
                "state_dict": nn.Linear(2, 2).state_dict()}, d / "ckpt_foreign_factory.pt")
    torch.save({"format": "deployprune.checkpoint", "version": "1", "arch": "lenet",
                "state_dict": model.state_dict()}, d / "ckpt_bad_version.pt")
    torch.save({"format": "deployprune.checkpoint", "version": 99, "arch": "lenet",
                "state_dict": model.state_dict()}, d / "ckpt_future.pt")
    torch.save({"format": "deployprune.checkpoint", "version": 1, "arch": "lenet",
                "state_dict": [1, 2, 3]}, d / "ckpt_sd_list.pt")
    torch.save({"format": "deployprune.checkpoint", "version": 1, "arch": "no_such_arch",
                "state_dict": model.state_dict()}, d / "ckpt_unknown_arch.pt")
    # checkpoints whose stored input shape would make the tool allocate a petabyte / overflow
    save_checkpoint(d / "ckpt_petabyte_input.pt", model, arch="lenet", input_shapes=[InputShape((1, 1, 2**24, 2**24))])
    save_checkpoint(d / "ckpt_overflow_input.pt", model, arch="lenet", input_shapes=[InputShape((2**20,) * 4)])
    top = "sd"
    _rewrite_zip(d / "sd.pt", d / "zip_extra_entry.pt",
                 lambda n, b: [(n, b)] + ([(f"{top}/payload.py", b"import os")] if n.endswith("data.pkl") else []))
    _rewrite_zip(d / "sd.pt", d / "zip_traversal.pt",
                 lambda n, b: [(n, b)] + ([("../../escape", b"x")] if n.endswith("data.pkl") else []))
    with zipfile.ZipFile(d / "zip_bomb.pt", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb/data.pkl", b"\0" * (4 * 1024**2))
    torch.jit.script(model).save(str(d / "scripted.pt"))
    (d / "a_directory.pt").mkdir()

    # ---- .pt2 programs
    pt2 = (d / "prog.pt2").read_bytes()
    (d / "pt2_trunc.pt2").write_bytes(pt2[: len(pt2) * 2 // 3])
    ptop = "prog"

    def add_pickle(n: str, b: bytes) -> list[tuple[str, bytes]]:
        extra = [(f"{ptop}/extra.pkl", pickle.dumps(Boom(sentinel)))] if n.endswith("archive_format") else []
        return [(n, b), *extra]

    def pickled_config(n: str, b: bytes) -> list[tuple[str, bytes]]:
        if n.endswith("_weights_config.json"):
            cfg = json.loads(b)
            for meta in cfg["config"].values():
                meta["use_pickle"] = True
            b = json.dumps(cfg).encode()
        return [(n, b)]

    _rewrite_zip(d / "prog.pt2", d / "pt2_extra_pickle.pt2", add_pickle)
    _rewrite_zip(d / "prog.pt2", d / "pt2_use_pickle.pt2", pickled_config)
    _rewrite_zip(d / "prog.pt2", d / "pt2_pickled_weight.pt2",
                 lambda n, b: [(n, pickle.dumps(Boom(sentinel)) if n.endswith("weights/weight_0") else b)])
    _rewrite_zip(d / "prog.pt2", d / "pt2_pickled_sample.pt2",
                 lambda n, b: [(n, pickle.dumps(Boom(sentinel)) if "sample_inputs" in n else b)])
    _rewrite_zip(d / "prog.pt2", d / "pt2_bad_json.pt2",
                 lambda n, b: [(n, b"{not json" if "/models/" in n else b)])
    _rewrite_zip(d / "prog.pt2", d / "pt2_no_model.pt2",
                 lambda n, b: [] if "/models/" in n else [(n, b)])

    # ---- masks files (for lenet: conv1.weight is 6x1x5x5)
    w = model.conv1.weight
    torch.save({"conv1": {"weight": torch.full_like(w, float("nan"))}}, d / "m_nan.pt")
    torch.save({"conv1": {"weight": torch.full_like(w, float("inf"))}}, d / "m_inf.pt")
    torch.save({"conv1": {"weight": torch.ones(w.shape, dtype=torch.complex64)}}, d / "m_complex.pt")
    torch.save({"conv1": {"weight": "all ones"}}, d / "m_string.pt")
    torch.save({"conv1": {"weight": [[1, 0], [0, 1]]}}, d / "m_nested_list.pt")
    torch.save({"conv1": {"weight": torch.ones(6, 1, 3, 3)}}, d / "m_shape.pt")
    torch.save({"conv1": {"weight": torch.ones(6)}}, d / "m_vector_wrong_axis.pt")
    half = torch.ones_like(w)
    half[0] = 0.5
    torch.save({"conv1": {"weight": half}}, d / "m_half.pt")
    torch.save({"conv1": {"weight": -torch.ones_like(w)}}, d / "m_negative.pt")
    torch.save({"conv1": {"weight": torch.full(w.shape, 2, dtype=torch.int64)}}, d / "m_int_two.pt")
    torch.save([torch.ones_like(w)], d / "m_list.pt")
    torch.save({1: {"weight": torch.ones_like(w)}}, d / "m_int_module_key.pt")
    torch.save({"conv1": {0: torch.ones_like(w)}}, d / "m_int_param_key.pt")
    torch.save({"conv1": torch.ones_like(w)}, d / "m_flat.pt")
    torch.save({"conv9": {"weight": torch.ones_like(w)}}, d / "m_unknown_module.pt")
    torch.save({"conv1": {"gamma": torch.ones_like(w)}}, d / "m_unknown_param.pt")
    torch.save({"conv1": {"bias": torch.ones(5)}}, d / "m_bias_shape.pt")
    torch.save({"conv1": {"weight": np.ones(tuple(w.shape), dtype=np.float32)}}, d / "m_numpy.pt")
    (d / "m_evil.pt").write_bytes(pickle.dumps({"conv1": {"weight": Boom(sentinel)}}))
    torch.save({"conv1": {"weight": Boom(sentinel)}}, d / "m_evil_zip.pt")
    (d / "m_garbage.pt").write_bytes(rng.randbytes(2048))
    ok = (d / "masks_ok.pt").read_bytes()
    (d / "m_trunc.pt").write_bytes(ok[: len(ok) // 2])
    ok_zip = zipfile.ZipFile(d / "masks_ok.pt")
    entry = next(i for i in ok_zip.infolist() if "/data/" in i.filename)
    ok_zip.close()
    flipped_masks = bytearray(ok)
    flipped_masks[_local_data_offset(ok, entry) + 1] ^= 0x01  # 1.0 -> 1.0000001: still "non-zero"
    (d / "m_bitflip.pt").write_bytes(bytes(flipped_masks))
    # a masks file bigger than the model file, for --max-file-size between the two sizes
    big = {n: {"weight": torch.ones(m.weight.shape, dtype=torch.float64)} for n, m in model.named_modules()
           if isinstance(m, (nn.Conv2d, nn.Linear))}
    torch.save(big, d / "m_big.pt")

    # ---- pruning configs
    configs = {
        "c_sparsity_str.json": json.dumps({"sparsity": "high"}),
        "c_target_str.json": json.dumps({"target_sparsity": "high"}),
        "c_unknown_key.json": json.dumps({"target_sparsity": 0.5, "frobnicate": 1}),
        "c_list_of_ints.json": json.dumps([1, 2, 3]),
        "c_null.json": "null",
        "c_number.json": "42",
        "c_nan.json": '{"target_sparsity": NaN}',
        "c_too_big.json": json.dumps({"target_sparsity": 1.5}),
        "c_negative.json": json.dumps({"target_sparsity": -0.5}),
        "c_bool.json": json.dumps({"target_sparsity": True}),
        "c_trunc.json": '{"target_sparsity": 0.',
        "c_nested_wrong.json": json.dumps({"module_type_configs": [1, 2]}),
        "c_nni_wrong.json": json.dumps([{"op_types": "Conv2d", "sparse_ratio": "x"}]),
        "c_deep.json": "[" * 100_000 + "]" * 100_000,
        "c_evil.yaml": f"!!python/object/apply:os.system ['touch {sentinel}']\n",
        "c_evil_value.yaml": f"target_sparsity: !!python/object/apply:os.system ['touch {sentinel}']\n",
        "c_config.txt": "target_sparsity=0.5",
    }
    for name, text in configs.items():
        (d / name).write_text(text)
    (d / "c_not_utf8.json").write_bytes(b"\xff\xfe\x00garbage")

    # ---- ONNX artifacts for `validate SOURCE ARTIFACT`
    good = (d / "good.onnx").read_bytes()
    (d / "a_trunc.onnx").write_bytes(good[: len(good) // 2])
    (d / "a_garbage.onnx").write_bytes(rng.randbytes(5000))
    (d / "a_empty.onnx").write_bytes(b"")
    (d / "a_text.onnx").write_text("not a model")
    proto = onnx.load(str(d / "good.onnx"))
    init = proto.graph.initializer[0]
    size = len(init.raw_data)
    set_external_data(init, location="../../../../../../etc/hostname", offset=0, length=size)
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    (d / "a_escape.onnx").write_bytes(proto.SerializeToString())
    os.mkfifo(d / "a_pipe.bin")  # reading external data from a pipe would block forever
    for name, location, length in [("a_ext_fifo.onnx", "a_pipe.bin", size), ("a_ext_absolute.onnx", "/dev/zero", size),
                                   ("a_ext_huge_length.onnx", "good.onnx", 2**40)]:
        proto = onnx.load(str(d / "good.onnx"))
        init = proto.graph.initializer[0]
        set_external_data(init, location=location, offset=0, length=length)
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        (d / name).write_bytes(proto.SerializeToString())
    converters.get("onnx").convert(nn.Sequential(nn.Linear(12, 10)).eval(), (torch.randn(1, 12),),
                                   d / "a_other_rank.onnx")
    (d / "a_weird.bin").write_bytes(good)
    (d / "a_garbage_file.mlpackage").write_bytes(b"garbage")
    (d / "a_empty_dir.mlpackage").mkdir()
    (d / "a_bad_manifest.mlpackage").mkdir()
    (d / "a_bad_manifest.mlpackage" / "Manifest.json").write_text('{"fileFormatVersion": "1.0.0", '
                                                                 '"itemInfoEntries": {}}')
    report = dp.validate(model, d / "good.onnx", (torch.randn(1, 1, 28, 28),), n_inputs=2, latency=False)
    (d / "good_report.json").write_text(report.to_json())

    # ---- reports and scenarios
    (d / "r_trunc.json").write_text('{"schema": ')
    (d / "r_list.json").write_text("[1, 2]")
    (d / "r_binary.json").write_bytes(b"\x80\x04garbage")
    (d / "r_empty.json").write_bytes(b"")
    (d / "r_deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (d / "r_wrong_fields.json").write_text(json.dumps({"passed": "yes", "outputs": 3}))
    (d / "s_evil.yaml").write_text(f"!!python/object/apply:os.system ['touch {sentinel}']\n")
    (d / "s_list.json").write_text("[1]")
    (d / "s_not_utf8.json").write_bytes(b"\xff\xfe\x00garbage")
    (d / "s_deep.json").write_text("[" * 100_000 + "]" * 100_000)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hostile_inputs")
    build_corpus(d)
    return d


@dataclass
class Outcome:
    code: int
    err: str
    out: str = ""


@dataclass
class Runner:
    """Runs the CLI in-process from an empty output directory and checks the four guarantees."""

    corpus: Path
    out: Path
    capsys: pytest.CaptureFixture
    before: dict[str, str] = field(default_factory=dict)

    def __call__(self, *args: str) -> Outcome:
        argv = [a.format(d=self.corpus) for a in args]
        self.before = tree_digest(self.corpus)
        self.capsys.readouterr()
        code = cli.main(argv)
        captured = self.capsys.readouterr()
        return Outcome(code, captured.err, captured.out)

    def check(self, outcome: Outcome, code: int, *needles: str) -> str:
        """One ``error:`` line with ``code`` containing every needle; nothing written or changed."""
        assert not (self.corpus / SENTINEL).exists(), "a file ran code (the sentinel exists)"
        assert outcome.code == code, (outcome.code, outcome.err)
        lines = outcome.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), outcome.err
        assert "Traceback" not in outcome.err and "internal error" not in outcome.err, outcome.err
        for needle in needles:
            assert needle.format(d=self.corpus) in lines[0], (needle, lines[0])
        assert tree_digest(self.corpus) == self.before, "an input file changed or a file appeared next to it"
        assert sorted(p.name for p in self.out.iterdir()) == [], "something was written to the output directory"
        return lines[0]


@pytest.fixture
def run(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Runner:
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    monkeypatch.setenv("DP_HOSTILE_SENTINEL", str(corpus / SENTINEL))
    return Runner(corpus, out, capsys)


# Every command that loads a model file, with the other inputs it needs (all valid).
ENTRY_POINTS = {
    "export": ["export", "{m}", "--no-latency", "--n-inputs", "2"],
    "finalize": ["finalize", "{m}"],
    "validate": ["validate", "{m}", "{d}/good.onnx", "--no-latency", "--n-inputs", "2"],
    "prune": ["prune", "{m}", "--config", "{d}/cfg.json"],
}


def command(entry: str, model: str, *extra: str) -> list[str]:
    return [a.replace("{m}", model) for a in ENTRY_POINTS[entry]] + list(extra)


# --------------------------------------------------------------------------------------------
# Model files, for every entry point that loads one

# (id, file, extra flags, exit code, text the message must contain, marks)
MODEL_FILES = [
    ("garbage", "garbage.pt", [], EXIT_INPUT, "cannot be read as a PyTorch file", ()),
    ("random-bytes", "random.pt", [], EXIT_INPUT, "cannot be read as a PyTorch file", ()),
    ("empty", "empty.pt", [], EXIT_INPUT, "file is empty", ()),
    ("json-text", "text.pt", [], EXIT_INPUT, "cannot be read as a PyTorch file", ()),
    ("state_dict-truncated-half", "trunc_sd.pt", ["--model", LENET], EXIT_INPUT, "truncated or corrupt", ()),
    ("state_dict-truncated-tail", "trunc_sd_tail.pt", ["--model", LENET], EXIT_INPUT, "truncated or corrupt", ()),
    ("checkpoint-truncated", "trunc_ckpt.pt", [], EXIT_INPUT, "truncated or corrupt", ()),
    ("state_dict-bitflip", "bitflip_sd.pt", ["--model", LENET], EXIT_INPUT, "corrupt",
     ()),
    ("code-running-pickle", "evil_raw.pt", ["--input-shape", "1,1,28,28"], EXIT_INPUT,
     "loading it would run code from the file", ()),
    ("code-running-torch-save", "evil_zip.pt", ["--input-shape", "1,1,28,28"], EXIT_INPUT,
     "loading it would run code from the file", ()),
    ("whole-module-pickle", "whole_module.pt", [], EXIT_INPUT, "rerun with --trust-pickle", ()),
    ("checkpoint-foreign-factory", "ckpt_foreign_factory.pt", [], EXIT_INPUT,
     "importing it would run code named by the file", ()),
    ("checkpoint-version-type", "ckpt_bad_version.pt", [], EXIT_INPUT, "'version' must be an integer", ()),
    ("checkpoint-future-version", "ckpt_future.pt", [], EXIT_INPUT, "upgrade deployprune", ()),
    ("checkpoint-state_dict-list", "ckpt_sd_list.pt", [], EXIT_INPUT, "state_dict", ()),
    ("checkpoint-unknown-arch", "ckpt_unknown_arch.pt", [], EXIT_INPUT, "unknown architecture 'no_such_arch'", ()),
    ("checkpoint-petabyte-input-shape", "ckpt_petabyte_input.pt", [], EXIT_INPUT, "input", ()),
    ("checkpoint-overflowing-input-shape", "ckpt_overflow_input.pt", [], EXIT_INPUT, "input", ()),
    ("zip-extra-entry", "zip_extra_entry.pt", ["--model", LENET], EXIT_INPUT, "unexpected entry 'payload.py'", ()),
    ("zip-path-traversal", "zip_traversal.pt", ["--model", LENET], EXIT_INPUT, "unsafe path", ()),
    ("zip-bomb", "zip_bomb.pt", ["--max-file-size", "1M"], EXIT_INPUT, "the archive expands to 4.0 MiB", ()),
    ("oversized", "sd.pt", ["--model", LENET, "--max-file-size", "1K"], EXIT_INPUT, "above the 1.0 KiB limit", ()),
    ("torchscript", "scripted.pt", [], EXIT_UNSUPPORTED, "TorchScript archive", ()),
    ("directory", "a_directory.pt", [], EXIT_INPUT, "is a directory", ()),
    ("missing", "nope.pt", [], EXIT_INPUT, "no such file", ()),
    ("pt2-truncated", "pt2_trunc.pt2", [], EXIT_INPUT, "truncated or corrupt", ()),
    ("pt2-extra-pickle-entry", "pt2_extra_pickle.pt2", [], EXIT_INPUT, "unexpected entry 'extra.pkl'", ()),
    ("pt2-use-pickle-config", "pt2_use_pickle.pt2", [], EXIT_INPUT, "is pickled; loading it would run code", ()),
    ("pt2-pickled-weight-bytes", "pt2_pickled_weight.pt2", [], EXIT_INPUT, "cannot load the torch.export program", ()),
    ("pt2-pickled-sample-inputs", "pt2_pickled_sample.pt2", [], EXIT_INPUT, "need pickled code to load", ()),
    ("pt2-garbage-program-json", "pt2_bad_json.pt2", [], EXIT_INPUT, "cannot load the torch.export program", ()),
    ("pt2-no-program", "pt2_no_model.pt2", [], EXIT_INPUT, "cannot load the torch.export program", ()),
]


def _cases(table: list, entries: list[str]) -> list:
    return [pytest.param(entry, *row[1:-1], id=f"{row[0]}-{entry}", marks=row[-1])
            for row in table for entry in entries]


@pytest.mark.parametrize(("entry", "name", "extra", "code", "needle"), _cases(MODEL_FILES, list(ENTRY_POINTS)))
def test_hostile_model_files(run: Runner, entry: str, name: str, extra: list[str], code: int, needle: str) -> None:
    outcome = run(*command(entry, f"{{d}}/{name}", *extra))
    run.check(outcome, code, f"{{d}}/{name}: ", needle)


# --------------------------------------------------------------------------------------------
# Masks files (--masks), for every entry point

MASKS = [
    ("nan", "m_nan.pt", "conv1.weight: mask contains NaN", ()),
    ("inf", "m_inf.pt", "conv1.weight: mask is not binary (found inf)", ()),
    ("complex-dtype", "m_complex.pt", "mask dtype torch.complex64 is not supported", ()),
    ("string-values", "m_string.pt", "conv1.weight: mask must be a tensor or array, got str", ()),
    ("nested-list-values", "m_nested_list.pt", "conv1.weight: mask shape (2, 2) does not match", ()),
    ("wrong-shape", "m_shape.pt", "mask shape (6, 1, 3, 3) does not match parameter shape (6, 1, 5, 5)", ()),
    ("vector-on-wrong-axis", "m_vector_wrong_axis.pt", "does not match parameter shape", ()),
    ("non-binary", "m_half.pt", "mask is not binary (found 0.5)", ()),
    ("negative", "m_negative.pt", "mask is not binary (found -1)", ()),
    ("integer-two", "m_int_two.pt", "mask is not binary (found 2)", ()),
    ("list-not-dict", "m_list.pt", "expected masks as a dict", ()),
    ("module-key-int", "m_int_module_key.pt", "module names must be strings", ()),
    ("param-key-int", "m_int_param_key.pt", "conv1", ()),
    ("flat-tensor-not-dict", "m_flat.pt", "entry for module 'conv1' must be a dict", ()),
    ("unknown-module", "m_unknown_module.pt", "module 'conv9' does not exist in the model", ()),
    ("unknown-param", "m_unknown_param.pt", "has no parameter 'gamma'", ()),
    ("bias-shape", "m_bias_shape.pt", "conv1.bias: mask shape (5,) does not match parameter shape (6,)", ()),
    ("numpy-array-pickle", "m_numpy.pt", "loading it would run code from the file", ()),
    ("code-running-pickle", "m_evil.pt", "loading it would run code from the file", ()),
    ("code-running-torch-save", "m_evil_zip.pt", "loading it would run code from the file", ()),
    ("garbage", "m_garbage.pt", "cannot be read as a PyTorch file", ()),
    ("truncated", "m_trunc.pt", "truncated or corrupt", ()),
    ("missing", "m_nope.pt", "no such file; check the masks file path", ()),
]


@pytest.mark.parametrize(("entry", "name", "needle"), _cases(MASKS, list(ENTRY_POINTS)))
def test_hostile_masks(run: Runner, entry: str, name: str, needle: str) -> None:
    outcome = run(*command(entry, "{d}/sd.pt", "--model", LENET, "--masks", f"{{d}}/{name}"))
    run.check(outcome, EXIT_INPUT, f"{{d}}/{name}: ", needle)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_oversized_masks_file(run: Runner, corpus: Path, entry: str) -> None:
    limit = (corpus / "sd.pt").stat().st_size + 1024
    assert (corpus / "m_big.pt").stat().st_size > limit  # the model passes the limit, the masks do not
    outcome = run(*command(entry, "{d}/sd.pt", "--model", LENET, "--masks", "{d}/m_big.pt",
                           "--max-file-size", str(limit)))
    run.check(outcome, EXIT_INPUT, "{d}/m_big.pt: file is ", "raise the limit with --max-file-size")


# --------------------------------------------------------------------------------------------
# Pruning configs (deployprune prune --config) and the Python API

CONFIGS = [
    ("sparsity-string", "c_sparsity_str.json", "unknown key 'sparsity'", ()),
    ("target-string", "c_target_str.json", "config.target_sparsity: expected a number in [0, 1), got 'high'", ()),
    ("unknown-key", "c_unknown_key.json", "unknown key 'frobnicate'", ()),
    ("list-of-ints", "c_list_of_ints.json", "config_list[0]: expected a dict, got int", ()),
    ("null", "c_null.json", "got NoneType", ()),
    ("number", "c_number.json", "got int", ()),
    ("nan", "c_nan.json", "nan is outside [0, 1)", ()),
    ("above-one", "c_too_big.json", "1.5 is outside [0, 1)", ()),
    ("negative", "c_negative.json", "-0.5 is outside [0, 1)", ()),
    ("bool", "c_bool.json", "got True", ()),
    ("truncated-json", "c_trunc.json", "cannot parse config", ()),
    ("nested-wrong-type", "c_nested_wrong.json", "module_type_configs: expected a mapping", ()),
    ("nni-wrong-type", "c_nni_wrong.json", "config_list[0].target_sparsity", ()),
    ("deeply-nested", "c_deep.json", "cannot parse config", ()),
    ("yaml-python-tag", "c_evil.yaml", "cannot parse config", ()),
    ("yaml-python-tag-value", "c_evil_value.yaml", "cannot parse config", ()),
    ("unknown-suffix", "c_config.txt", "unknown config format '.txt'", ()),
    ("not-utf8", "c_not_utf8.json", "cannot parse config", ()),
]


@pytest.mark.parametrize(("name", "needle"), [pytest.param(*c[1:-1], id=c[0], marks=c[-1]) for c in CONFIGS])
def test_hostile_configs(run: Runner, name: str, needle: str) -> None:
    outcome = run("prune", "{d}/sd.pt", "--model", LENET, "--config", f"{{d}}/{name}")
    run.check(outcome, EXIT_USAGE, f"{{d}}/{name}: ", needle)


@pytest.mark.parametrize(("config", "needle"), [
    ({"sparsity": "high"}, "unknown key 'sparsity'"),
    ({"target_sparsity": "high"}, "expected a number in [0, 1), got 'high'"),
    ({"target_sparsity": 0.5, "frobnicate": 1}, "unknown key 'frobnicate'"),
    ([1, 2, 3], "config_list[0]: expected a dict, got int"),
    ({"target_sparsity": float("nan")}, "nan is outside [0, 1)"),
    ({"module_type_configs": {"Conv2d": {"target_sparsity": [0.5]}}}, "target_sparsity"),
    (42, "got int"),
], ids=["sparsity-string", "target-string", "unknown-key", "list-of-ints", "nan", "list-value", "number"])
def test_hostile_configs_api(config: object, needle: str) -> None:
    model = _lenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        dp.Pruner(model, config, (torch.randn(1, 1, 28, 28),))
    assert needle in str(info.value) and "\n" not in str(info.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())  # nothing attached


# --------------------------------------------------------------------------------------------
# ONNX artifacts given to `validate SOURCE ARTIFACT`

ARTIFACTS = [
    ("onnx-truncated", ["{d}/a_trunc.onnx"], "{d}/a_trunc.onnx: onnxruntime cannot load it", ()),
    ("onnx-garbage", ["{d}/a_garbage.onnx"], "{d}/a_garbage.onnx: onnxruntime cannot load it", ()),
    ("onnx-empty", ["{d}/a_empty.onnx"], "{d}/a_empty.onnx: ", ()),
    ("onnx-text", ["{d}/a_text.onnx"], "{d}/a_text.onnx: onnxruntime cannot load it", ()),
    ("onnx-external-data-escapes", ["{d}/a_escape.onnx"], "{d}/a_escape.onnx: ", ()),
    ("onnx-missing", ["{d}/a_nope.onnx"], "{d}/a_nope.onnx: ", ()),
    ("onnx-external-data-fifo", ["{d}/a_ext_fifo.onnx"], "{d}/a_ext_fifo.onnx: ", ()),
    ("onnx-external-data-absolute", ["{d}/a_ext_absolute.onnx"], "{d}/a_ext_absolute.onnx: ", ()),
    ("onnx-external-data-huge-length", ["{d}/a_ext_huge_length.onnx"], "{d}/a_ext_huge_length.onnx: ", ()),
    ("onnx-other-model-rank", ["{d}/a_other_rank.onnx"], "{d}/a_other_rank.onnx: ",
     ()),
    ("onnx-static-batch-mismatch", ["{d}/good.onnx", "--input-shape", "2,1,28,28"], "{d}/good.onnx: ",
     ()),
]


@pytest.mark.parametrize(("args", "needle"), [pytest.param(*a[1:-1], id=a[0], marks=a[-1]) for a in ARTIFACTS])
def test_hostile_artifacts(run: Runner, args: list[str], needle: str) -> None:
    outcome = run("validate", "{d}/sd.pt", "--model", LENET, *args, "--no-latency", "--n-inputs", "2",
                  "--json", "r.json")
    run.check(outcome, EXIT_INPUT, needle)


@pytest.mark.parametrize("name", [
    "a_garbage_file.mlpackage",
    "a_empty_dir.mlpackage",
    "a_bad_manifest.mlpackage",  # BUG-H18 (fixed): validate opens a private copy, the input stays byte-identical
])
def test_hostile_coreml_artifacts(run: Runner, name: str) -> None:
    """A broken .mlpackage fails the Core ML read-back: reported as a failed validation (exit 4), one line."""
    outcome = run("validate", "{d}/sd.pt", "--model", LENET, f"{{d}}/{name}", "--no-latency", "--n-inputs", "2")
    run.check(outcome, 4, f"{{d}}/{name}: validation failed: coreml read-back could not run")


def test_artifact_of_unknown_type(run: Runner) -> None:
    outcome = run("validate", "{d}/sd.pt", "--model", LENET, "{d}/a_weird.bin", "--no-latency")
    run.check(outcome, EXIT_USAGE, "{d}/a_weird.bin: unknown artifact type '.bin'")


# --------------------------------------------------------------------------------------------
# Reports (`report`) and scenarios (`run`)

REPORTS = [
    ("truncated", "r_trunc.json", "not valid JSON", ()),
    ("list", "r_list.json", "expected a JSON object, got list", ()),
    ("binary", "r_binary.json", "cannot read report", ()),
    ("empty", "r_empty.json", "", ()),
    ("deeply-nested", "r_deep.json", "", ()),
    ("wrong-fields", "r_wrong_fields.json", "", ()),
]


@pytest.mark.parametrize(("name", "needle"), [pytest.param(*r[1:-1], id=r[0], marks=r[-1]) for r in REPORTS])
def test_hostile_reports(run: Runner, name: str, needle: str) -> None:
    outcome = run("report", f"{{d}}/{name}", "-o", "r.md")
    run.check(outcome, EXIT_INPUT, f"{{d}}/{name}: ", needle)


SCENARIOS = [
    ("yaml-python-tag", "s_evil.yaml", "not valid YAML", ()),
    ("list", "s_list.json", "expected an object, got list", ()),
    ("not-utf8", "s_not_utf8.json", "not valid JSON (not UTF-8 text)", ()),
    ("deeply-nested", "s_deep.json", "", ()),
]


@pytest.mark.parametrize(("name", "needle"), [pytest.param(*s[1:-1], id=s[0], marks=s[-1]) for s in SCENARIOS])
def test_hostile_scenarios(run: Runner, name: str, needle: str) -> None:
    outcome = run("run", f"{{d}}/{name}")
    run.check(outcome, EXIT_USAGE, f"{{d}}/{name}: ", needle)


# --------------------------------------------------------------------------------------------
# Input shapes that do not match the model


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("shape", ["1,3,28,28", "1,1,32,32", "1,784"])
def test_input_shape_mismatch(run: Runner, entry: str, shape: str) -> None:
    outcome = run(*command(entry, "{d}/sd.pt", "--model", LENET, "--input-shape", shape))
    dims = shape.replace(",", "x")
    run.check(outcome, EXIT_INPUT, "{d}/sd.pt: the model fails on input " + dims, "--input-shape")


# --------------------------------------------------------------------------------------------
# Outputs never replace an input, --force or not

OVERWRITES = [
    ("report-o-input", ["report", "{d}/good_report.json", "-o", "{d}/good_report.json", "--format", "md"],
     "{d}/good_report.json", ()),
    ("finalize-o-model", ["finalize", "{d}/sd.pt", "--model", LENET, "-o", "{d}/sd.pt"], "{d}/sd.pt", ()),
    ("prune-o-model", ["prune", "{d}/sd.pt", "--model", LENET, "--config", "{d}/cfg.json", "-o", "{d}/sd.pt"],
     "{d}/sd.pt", ()),
    ("export-o-model", ["export", "{d}/sd.pt", "--model", LENET, "-o", "{d}/sd.pt"], "{d}/sd.pt", ()),
    ("finalize-o-masks", ["finalize", "{d}/sd.pt", "--model", LENET, "--masks", "{d}/masks_ok.pt",
                          "-o", "{d}/masks_ok.pt"], "{d}/masks_ok.pt", ()),
    ("export-o-masks", ["export", "{d}/sd.pt", "--model", LENET, "--masks", "{d}/masks_ok.pt",
                        "-o", "{d}/masks_ok.pt", "--no-latency", "--n-inputs", "2"], "{d}/masks_ok.pt", ()),
    ("prune-o-config", ["prune", "{d}/sd.pt", "--model", LENET, "--config", "{d}/cfg.json", "-o", "{d}/cfg.json"],
     "{d}/cfg.json", ()),
    ("validate-json-model", ["validate", "{d}/sd.pt", "--model", LENET, "{d}/good.onnx", "--no-latency",
                             "--n-inputs", "2", "--json", "{d}/sd.pt"], "{d}/sd.pt", ()),
    ("validate-html-artifact", ["validate", "{d}/sd.pt", "--model", LENET, "{d}/good.onnx", "--no-latency",
                                "--n-inputs", "2", "--html", "{d}/good.onnx"], "{d}/good.onnx", ()),
]


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
@pytest.mark.parametrize(("args", "victim"), [pytest.param(*o[1:-1], id=o[0], marks=o[-1]) for o in OVERWRITES])
def test_output_never_replaces_an_input(run: Runner, tmp_path: Path, args: list[str], victim: str,
                                        force: bool) -> None:
    # a private copy of the inputs: a failing case really overwrites its victim
    private = tmp_path / "inputs"
    private.mkdir()
    for name in ("sd.pt", "masks_ok.pt", "cfg.json", "good.onnx", "good_report.json"):
        shutil.copy2(run.corpus / name, private / name)
    run.corpus = private
    outcome = run(*args, *(["--force"] if force else []))
    run.check(outcome, EXIT_USAGE, f"{victim}: the output would overwrite the input file")


# --------------------------------------------------------------------------------------------
# Read-only output directory (simulated: the tests may run as root, who can write anywhere)

READONLY = {
    "export": ["export", "{d}/sd.pt", "--model", LENET, "-o", "{ro}/x.onnx"],
    "finalize": ["finalize", "{d}/sd.pt", "--model", LENET, "-o", "{ro}/x.pt2"],
    "prune": ["prune", "{d}/sd.pt", "--model", LENET, "--config", "{d}/cfg.json", "-o", "{ro}/p.pt"],
    "validate-json": ["validate", "{d}/sd.pt", "--model", LENET, "{d}/good.onnx", "--no-latency",
                      "--json", "{ro}/r.json"],
    "report": ["report", "{d}/good_report.json", "-o", "{ro}/r.md"],
}


@pytest.mark.parametrize("entry", list(READONLY))
def test_read_only_output_directory(run: Runner, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    ro = run.out / "ro"
    ro.mkdir()
    real_access = os.access

    def access(p, mode, **kw):
        return False if Path(p) == ro and mode & os.W_OK else real_access(p, mode, **kw)

    monkeypatch.setattr(os, "access", access)
    args = [a.replace("{ro}", str(ro)) for a in READONLY[entry]]
    outcome = run(*args)
    name = Path(args[args.index("-o") + 1] if "-o" in args else args[-1]).name
    assert list(ro.iterdir()) == []
    ro.rmdir()
    run.check(outcome, EXIT_INPUT, f"{ro / name}: directory {ro} is not writable; choose another output path")


# --------------------------------------------------------------------------------------------
# Disk full: a real kernel limit on the size of any file the process writes (RLIMIT_FSIZE, with
# SIGXFSZ ignored so write() fails with EFBIG, as it fails with ENOSPC on a full disk). No mocks:
# torch's C++ zip writer, onnx's protobuf writer and Python's file objects all hit it.

FSIZE_LIMIT = 2000  # bytes: smaller than every output (the smallest, a JSON report, is ~3 kB)

DISK_FULL = {
    "export": (["export", "{d}/sd.pt", "--model", LENET, "-o", "x.onnx", "--no-latency", "--n-inputs", "2"],
               "x.onnx", ()),
    "finalize-pt2": (["finalize", "{d}/sd.pt", "--model", LENET, "--masks", "{d}/masks_ok.pt", "-o", "x.pt2"],
                     "x.pt2", ()),
    "finalize-pt": (["finalize", "{d}/sd.pt", "--model", LENET, "--masks", "{d}/masks_ok.pt", "-o", "x.pt"],
                    "x.pt", ()),
    # at 4000 bytes torch's writer sees a short write (not an OSError) half-way through a record
    "prune": (["prune", "{d}/sd.pt", "--model", LENET, "--config", "{d}/cfg.json", "-o", "p.pt"],
              "p.pt", (), 4000),
    "validate-json": (["validate", "{d}/sd.pt", "--model", LENET, "{d}/good.onnx", "--no-latency",
                       "--n-inputs", "2", "--json", "r.json"], "r.json", ()),
    "report-html": (["report", "{d}/good_report.json", "-o", "r.html"], "r.html", ()),
}


@pytest.fixture(scope="module")
def disk_full_runs(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Run every case under the limit (tests/hostile/disk_full_driver.py: one interpreter, a fork per case)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONDONTWRITEBYTECODE": "1"}
    before = tree_digest(corpus)
    work = tmp_path_factory.mktemp("disk_full")
    cases = []
    for name, (args, _out, _marks, *limit) in DISK_FULL.items():
        out = work / name
        out.mkdir()
        cases.append({"name": name, "argv": [a.format(d=corpus) for a in args], "cwd": str(out),
                      "limit": limit[0] if limit else FSIZE_LIMIT, "stderr": str(work / f"{name}.stderr")})
    (work / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-m", "tests.hostile.disk_full_driver", str(work / "cases.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads(proc.stdout.splitlines()[-1])
    return {"before": before, **{c["name"]: (Path(c["cwd"]), status[c["name"]], Path(c["stderr"]).read_text())
                                 for c in cases}}


@pytest.mark.parametrize("name", [pytest.param(n, id=n, marks=v[2]) for n, v in DISK_FULL.items()])
def test_disk_full_real_limit(disk_full_runs: dict, corpus: Path, name: str) -> None:
    out, code, stderr = disk_full_runs[name]
    target = DISK_FULL[name][1]
    assert not (corpus / SENTINEL).exists()
    assert tree_digest(corpus) == disk_full_runs["before"], "an input changed"
    assert sorted(p.name for p in out.iterdir()) == [], "a partial output or staging directory was left"
    assert code == EXIT_INPUT, (code, stderr[-2000:])
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith(f"error: {target}: cannot write ("), lines[0]
    assert lines[0].endswith("check free space and permissions"), lines[0]


def test_disk_full_monkeypatched_report_write(run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC itself (mocked like tests/io/test_export.py): a report write that fails half-way."""
    real_write_bytes = Path.write_bytes

    def write_half(self: Path, data: bytes) -> int:
        real_write_bytes(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_half)
    outcome = run("validate", "{d}/sd.pt", "--model", LENET, "{d}/good.onnx", "--no-latency", "--n-inputs", "2",
                  "--json", "r.json")
    run.check(outcome, EXIT_INPUT, "r.json: cannot write (No space left on device); check free space and permissions")


# --------------------------------------------------------------------------------------------
# The corpus itself: the good inputs are good (so every failure above is the hostile part's)


def test_good_inputs_pass_every_entry_point(run: Runner) -> None:
    outcome = run("finalize", "{d}/sd.pt", "--model", LENET, "--masks", "{d}/masks_ok.pt", "-o", "ok.pt2")
    assert outcome.code == 0, outcome.err
    outcome = run("validate", "{d}/sd.pt", "--model", LENET, "{d}/good.onnx", "--no-latency", "--n-inputs", "2")
    assert outcome.code == 0, outcome.err
    outcome = run("prune", "{d}/sd.pt", "--model", LENET, "--config", "{d}/cfg.json", "-o", "p.pt")
    assert outcome.code == 0, outcome.err
    outcome = run("finalize", "{d}/ckpt.pt", "-o", "c.pt2")
    assert outcome.code == 0, outcome.err
    outcome = run("finalize", "{d}/prog.pt2", "-o", "p2.pt2")
    assert outcome.code == 0, outcome.err
    assert sorted(p.name for p in run.out.iterdir()) == ["c.pt2", "ok.pt2", "p.pt", "p2.pt2"]
    assert tree_digest(run.corpus) == run.before


def test_sentinel_pickles_do_run_code_when_trusted(corpus: Path, tmp_path: Path) -> None:
    """The sentinel mechanism works: plain pickle.load of the hostile file does create it."""
    sentinel = tmp_path / "ran"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Boom(sentinel)))
    with open(tmp_path / "evil.pkl", "rb") as fh:
        pickle.load(fh)  # noqa: S301 - the point of the test
    assert sentinel.exists()


# --------------------------------------------------------------------------------------------
# Interrupted at the worst moment: Ctrl-C / SIGTERM while an output is being renamed into place

INTERRUPTIBLE = {
    "export": ["export", "{d}/sd.pt", "--model", LENET, "--masks", "{d}/masks_ok.pt", "-o", "x.onnx",
               "--no-latency", "--n-inputs", "2"],
    "finalize": ["finalize", "{d}/sd.pt", "--model", LENET, "--masks", "{d}/masks_ok.pt", "-o", "x.pt2"],
    "prune": ["prune", "{d}/sd.pt", "--model", LENET, "--config", "{d}/cfg.json", "-o", "p.pt"],
    "validate": ["validate", "{d}/sd.pt", "--model", LENET, "{d}/good.onnx", "--no-latency", "--n-inputs", "2",
                 "--json", "r.json", "--html", "r.html"],
}


@pytest.mark.parametrize("entry", [
    "export",  # BUG-H12 (fixed): outputs published together or rolled back
    "finalize",
    "prune",
    "validate",
])
def test_interrupted_at_every_rename(run: Runner, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    """Count the renames a clean run makes into the output directory, then interrupt each one in turn
    (alternating Ctrl-C and SIGTERM): every interrupted run exits 130/143 and leaves nothing."""
    real_replace = os.replace
    calls: list[str] = []
    fire_at: list[int] = []  # 1-based index of the rename to interrupt; empty: none
    signal_exc: list[BaseException] = []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).resolve().is_relative_to(run.out.resolve()):
            calls.append(str(dst))
            if fire_at and len(calls) == fire_at[0]:
                raise signal_exc[0]
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    outcome = run(*INTERRUPTIBLE[entry])
    assert outcome.code == 0, outcome.err
    renames = len(calls)
    assert renames >= 1
    for p in run.out.iterdir():  # clear the clean run's outputs
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for k in range(1, renames + 1):
        calls.clear()
        fire_at[:] = [k]
        interrupted = k % 2 == 1
        signal_exc[:] = [KeyboardInterrupt() if interrupted else cli.Terminated()]
        outcome = run(*INTERRUPTIBLE[entry])
        assert len(calls) == k, "the interrupt did not happen where planned"
        expected = ("error: interrupted; no partial output was left behind" if interrupted
                    else "error: terminated (SIGTERM); no partial output was left behind")
        assert (outcome.code, outcome.err.splitlines()) == (130 if interrupted else 143, [expected]), k
        assert tree_digest(run.corpus) == run.before
        assert sorted(p.name for p in run.out.iterdir()) == [], f"rename {k} of {renames}: something was left"


# --------------------------------------------------------------------------------------------
# Hostile option values and special files

OPTIONS = [
    ("opset-not-int", ["--opt", "opset=abc"], "onnx option 'opset': expected an integer, got 'abc'", ()),
    ("opset-too-high", ["--opt", "opset=999"], "onnx option 'opset': 999 is outside", ()),
    ("opset-too-low", ["--opt", "opset=1"], "onnx option 'opset': 1 is outside", ()),
    ("bool-not-bool", ["--opt", "external_data=maybe"], "expected true/false, got 'maybe'", ()),
    ("too-many-input-names", ["--opt", "input_names=[1,2]"], "onnx option 'input_names'", ()),
    ("tolerance-nan", ["--opt", "tolerance=nan"], "tolerance", ()),
    ("tolerance-negative", ["--opt", "tolerance=-1"], "onnx option 'tolerance' must be > 0", ()),
    ("threshold-nan", ["--max-rel", "nan"], "threshold max_rel: expected a number >= 0, got nan", ()),
    ("threshold-negative", ["--max-rel", "-1"], "threshold max_rel: expected a number >= 0", ()),
    ("n-inputs-zero", ["--n-inputs", "0"], "--n-inputs 0: must be at least 1", ()),
    ("max-file-size-words", ["--max-file-size", "lots"], "--max-file-size 'lots': expected a size", ()),
    ("input-shape-zero", ["--input-shape", "1,0,28,28"], "--input-shape '1,0,28,28': dimensions must be positive", ()),
    ("input-shape-huge", ["--input-shape", "65536,65536"], "is too large for an example input", ()),
    ("input-shape-dtype", ["--input-shape", "1,1,28,28:complex128"], "unknown dtype", ()),
]


@pytest.mark.parametrize(("extra", "needle"), [pytest.param(*o[1:-1], id=o[0], marks=o[-1]) for o in OPTIONS])
def test_hostile_options(run: Runner, extra: list[str], needle: str) -> None:
    outcome = run("export", "{d}/sd.pt", "--model", LENET, "-o", "x.onnx", "--no-latency", "--n-inputs", "2", *extra)
    run.check(outcome, EXIT_USAGE, needle)


@pytest.mark.parametrize("flag", ["model", "masks"])
@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_special_files_are_not_read(run: Runner, corpus: Path, tmp_path: Path, flag: str, special: str) -> None:
    """A character device or a named pipe would block or never end: refused before it is opened."""
    if special == "fifo":
        path = tmp_path / "pipe.pt"
        os.mkfifo(path)
    else:
        path = Path(special)
    args = ["export", str(path)] if flag == "model" else ["export", "{d}/sd.pt", "--model", LENET, "--masks", str(path)]
    outcome = run(*args)
    run.check(outcome, EXIT_INPUT, f"{path}: ", "file is empty")


def test_file_name_with_a_newline_stays_one_line(run: Runner, tmp_path: Path) -> None:
    bad = tmp_path / "two\nlines.pt"
    bad.write_bytes(b"\x80\x02garbage" * 50)
    before = bad.read_bytes()
    outcome = run("export", str(bad))
    run.check(outcome, EXIT_INPUT, "cannot be read as a PyTorch file")
    assert bad.read_bytes() == before


# --------------------------------------------------------------------------------------------
# Python API loaders


PRUNER_LOAD_MASKS = [
    ("nan", "m_nan.pt", ()),
    ("inf", "m_inf.pt", ()),
    ("complex", "m_complex.pt", ()),
    ("non-binary", "m_half.pt", ()),
    ("negative", "m_negative.pt", ()),
    ("integer-two", "m_int_two.pt", ()),
    ("bitflip", "m_bitflip.pt", ()),
    ("string-values", "m_string.pt", ()),
    ("list-not-dict", "m_list.pt", ()),
    ("code-running-pickle", "m_evil.pt", ()),
    ("code-running-torch-save", "m_evil_zip.pt", ()),
    ("garbage", "m_garbage.pt", ()),
    ("truncated", "m_trunc.pt", ()),
]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", [pytest.param(m[1], id=m[0], marks=m[2]) for m in PRUNER_LOAD_MASKS])
def test_pruner_load_masks_rejects(corpus: Path, name: str) -> None:
    """``Pruner.load_masks`` is its own loader: it must refuse what ``--masks`` refuses."""
    from deployprune.errors import DeployPruneError
    from deployprune.pruning import Pruner

    before = tree_digest(corpus)
    with pytest.raises(DeployPruneError) as info:
        Pruner.load_masks(corpus / name)
    assert str(info.value).startswith(f"{corpus / name}: ") and "\n" not in str(info.value)
    assert not (corpus / SENTINEL).exists()
    assert tree_digest(corpus) == before


@pytest.mark.parametrize("name", ["evil_raw.pt", "evil_zip.pt", "whole_module.pt", "ckpt_foreign_factory.pt",
                                  "pt2_extra_pickle.pt2", "pt2_pickled_sample.pt2"])
def test_api_load_refuses_code(corpus: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``dp.load`` (the Python API) has the CLI's default: no code runs without allow_pickle=True."""
    from deployprune.errors import InputError

    monkeypatch.setenv("DP_HOSTILE_SENTINEL", str(corpus / SENTINEL))
    before = tree_digest(corpus)
    with pytest.raises(InputError) as info:
        dp.load(corpus / name, input_shapes=[InputShape((1, 1, 28, 28))])
    assert str(info.value).startswith(f"{corpus / name}: ")
    assert not (corpus / SENTINEL).exists()
    assert tree_digest(corpus) == before


def _training_checkpoints(ck: Path, sentinel: Path) -> dict[str, Callable[[], None]]:
    from deployprune.training import loop

    head = {"format": loop.CHECKPOINT_FORMAT, "version": loop.CHECKPOINT_VERSION}
    return {
        "code-running-pickle": lambda: (ck / "last.pt").write_bytes(pickle.dumps({"x": Boom(sentinel)})),
        "code-running-torch-save": lambda: torch.save({**head, "x": Boom(sentinel)}, ck / "last.pt"),
        "garbage": lambda: (ck / "last.pt").write_bytes(b"\x80\x02garbage" * 40),
        "not-a-training-checkpoint": lambda: torch.save({"a": 1}, ck / "last.pt"),
        "future-version": lambda: torch.save({**head, "version": 999}, ck / "last.pt"),
        "fields-of-wrong-type": lambda: torch.save({**head, "epoch": "x", "model": [1]}, ck / "last.pt"),
    }


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("case", list(_training_checkpoints(Path("."), Path("."))))
def test_hostile_training_checkpoint(run: Runner, tmp_path: Path, case: str) -> None:
    """``prune --resume`` reads ``--checkpoint-dir``/last.pt: a hostile one is refused, unchanged, no code runs."""
    ck = tmp_path / "ck"
    ck.mkdir()
    _training_checkpoints(ck, run.corpus / SENTINEL)[case]()
    before = tree_digest(ck)
    outcome = run("prune", "{d}/digits_net.pt", "--config", "{d}/cfg_element.json", "--data", "digits",
                  "--epochs", "1", "--checkpoint-dir", str(ck), "--resume", "--no-progress", "-o", "p.pt")
    run.check(outcome, EXIT_INPUT, f"{ck / 'last.pt'}: ")
    assert tree_digest(ck) == before


def test_config_cannot_import_code(run: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config naming a module outside the trusted packages must not import it (the checkpoint rule)."""
    module = "tests.hostile.sentinel_factory"
    sentinel = tmp_path / "imported"
    monkeypatch.setenv("DP_HOSTILE_SENTINEL", str(sentinel))
    config = tmp_path / "imports.json"
    config.write_text(json.dumps({"target_sparsity": 0.5, "schedule": {"type": "callable",
                                                                         "function": f"{module}:build"}}))
    try:
        outcome = run("prune", "{d}/sd.pt", "--model", LENET, "--config", str(config))
        assert not sentinel.exists(), "the config imported a module of its choosing"
        run.check(outcome, EXIT_USAGE, f"{config}: ", module)
    finally:
        sys.modules.pop(module, None)  # so later tests see a fresh import if one happens


@pytest.mark.parametrize("victim", ["scenario", "model"])
def test_scenario_output_never_replaces_an_input(run: Runner, tmp_path: Path, victim: str) -> None:
    private = tmp_path / "inputs"
    private.mkdir()
    shutil.copy2(run.corpus / "digits_net.pt", private / "net.pt")
    scenario = private / "scenario.json"
    target = scenario if victim == "scenario" else private / "net.pt"
    scenario.write_text(json.dumps({"model": str(private / "net.pt"), "pruning": {"target_sparsity": 0.5},
                                    "output": str(target), "force": True}))
    run.corpus = private
    outcome = run("run", str(scenario))
    run.check(outcome, EXIT_USAGE, f"{target}: ", "input")


def test_output_symlinks_are_not_followed(run: Runner, tmp_path: Path) -> None:
    """-o naming a symlink to an input is refused; a symlink pointing elsewhere is replaced, never written through."""
    private = tmp_path / "inputs"
    private.mkdir()
    shutil.copy2(run.corpus / "sd.pt", private / "sd.pt")
    (private / "to_input.onnx").symlink_to(private / "sd.pt")
    run.corpus = private
    outcome = run("export", "{d}/sd.pt", "--model", LENET, "-o", "{d}/to_input.onnx", "--force")
    run.check(outcome, EXIT_USAGE, "{d}/to_input.onnx: the output would overwrite the input file")

    elsewhere = tmp_path / "elsewhere.txt"  # where a followed symlink would write
    (run.out / "out.onnx").symlink_to(elsewhere)
    outcome = run("export", "{d}/sd.pt", "--model", LENET, "-o", "out.onnx", "--force", "--no-latency",
                  "--n-inputs", "2")
    assert outcome.code == 0, outcome.err
    assert not elsewhere.exists()
    assert not (run.out / "out.onnx").is_symlink() and onnx.load(str(run.out / "out.onnx")).graph.node
    assert tree_digest(private) == run.before


def test_training_checkpoint_never_replaces_the_model(run: Runner, tmp_path: Path) -> None:
    private = tmp_path / "ck"
    private.mkdir()
    shutil.copy2(run.corpus / "digits_net.pt", private / "last.pt")
    shutil.copy2(run.corpus / "cfg_element.json", private / "cfg.json")
    run.corpus = private
    outcome = run("prune", "{d}/last.pt", "--config", "{d}/cfg.json", "--data", "digits", "--epochs", "1",
                  "--checkpoint-dir", "{d}", "--no-progress", "-o", "p.pt", "--force")
    run.check(outcome, EXIT_USAGE, "{d}/last.pt: ", "input")


def _yaml_alias_bomb(levels: int) -> str:
    """A few hundred bytes of YAML whose aliases expand to 10**levels strings."""
    items = ['&l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def test_yaml_alias_bomb_in_config(run: Runner, tmp_path: Path) -> None:
    config = tmp_path / "bomb.yaml"
    config.write_text(f"target_sparsity: {_yaml_alias_bomb(6)}\n")
    assert config.stat().st_size < 400  # a few hundred bytes ...
    outcome = run("prune", "{d}/sd.pt", "--model", LENET, "--config", str(config))
    assert len(outcome.err) < 1000, f"a {len(outcome.err)}-character error message"
    run.check(outcome, EXIT_USAGE, f"{config}: ")


# --------------------------------------------------------------------------------------------
# --force: the previous outputs stay until the new set is complete


FORCE_INTERRUPTIBLE = {
    "export": ["export", "{d}/sd.pt", "--model", LENET, "--masks", "{d}/masks_ok.pt", "-o", "x.onnx",
               "--no-latency", "--n-inputs", "2", "--force"],
    "finalize": ["finalize", "{d}/sd.pt", "--model", LENET, "--masks", "{d}/masks_ok.pt", "-o", "x.pt2",
                 "--force"],
    "validate": ["validate", "{d}/sd.pt", "--model", LENET, "{d}/good.onnx", "--no-latency", "--n-inputs", "2",
                 "--json", "r.json", "--html", "r.html", "--force"],
}


@pytest.mark.parametrize("entry", list(FORCE_INTERRUPTIBLE))
def test_interrupted_force_run_restores_the_previous_outputs(run: Runner, monkeypatch: pytest.MonkeyPatch,
                                                              entry: str) -> None:
    """With a previous set of outputs in place, interrupt a --force run at each of its renames (alternating
    Ctrl-C and SIGTERM): the previous outputs are back, byte for byte, and nothing else is left."""
    outcome = run(*FORCE_INTERRUPTIBLE[entry])
    assert outcome.code == 0, outcome.err
    real_replace = os.replace
    calls: list[str] = []
    fire_at: list[int] = []  # 1-based index of the rename to interrupt; empty: none
    fired: list[bool] = []
    signal_exc: list[BaseException] = []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).resolve().is_relative_to(run.out.resolve()) and not fired:
            calls.append(str(dst))
            if fire_at and len(calls) == fire_at[0]:
                fired.append(True)  # the rollback's own renames are not counted
                raise signal_exc[0]
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    outcome = run(*FORCE_INTERRUPTIBLE[entry])  # a clean --force run over the previous set: count its renames
    assert outcome.code == 0, outcome.err
    renames = len(calls)
    assert renames >= 2  # the previous output moved aside, the new one moved in
    before = tree_digest(run.out)
    for k in range(1, renames + 1):
        calls.clear()
        fired.clear()
        fire_at[:] = [k]
        interrupted = k % 2 == 1
        signal_exc[:] = [KeyboardInterrupt() if interrupted else cli.Terminated()]
        outcome = run(*FORCE_INTERRUPTIBLE[entry])
        assert len(calls) == k, "the interrupt did not happen where planned"
        assert outcome.code == (130 if interrupted else 143), (k, outcome.err)
        assert tree_digest(run.out) == before, f"rename {k} of {renames}: the previous outputs were not restored"


def test_external_data_never_replaces_an_input(run: Runner, tmp_path: Path) -> None:
    """<out>.data (ONNX external data) is checked like <out>: a masks file of that name stays."""
    private = tmp_path / "inputs"
    private.mkdir()
    shutil.copy2(run.corpus / "sd.pt", private / "sd.pt")
    shutil.copy2(run.corpus / "masks_ok.pt", private / "x.onnx.data")
    run.corpus = private
    outcome = run("export", "{d}/sd.pt", "--model", LENET, "--masks", "{d}/x.onnx.data", "-o", "{d}/x.onnx",
                  "--opt", "external_data=true", "--no-latency", "--n-inputs", "2", "--force")
    run.check(outcome, EXIT_USAGE, "{d}/x.onnx.data: the output would overwrite the input file")


def _package(root: Path, name: str) -> Path:
    pkg = root / name
    (pkg / "Data" / "com.apple.CoreML" / "weights").mkdir(parents=True)
    (pkg / "Manifest.json").write_text('{"fileFormatVersion": "1.0.0", "itemInfoEntries": {}}')
    return pkg


def test_mlpackage_with_links_or_special_files_is_refused(run: Runner, tmp_path: Path) -> None:
    """validate copies an .mlpackage before opening it: a symlink inside (to /dev/zero, which a copy would
    read forever, or to a file outside the package) or a FIFO is refused, nothing is copied."""
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the package")
    outside = tmp_path / "hostile"  # not under the corpus: tree_digest would follow the links
    outside.mkdir()
    cases = {}
    pkg = _package(outside, "zero.mlpackage")
    (pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").symlink_to("/dev/zero")
    cases[pkg] = ("Data/com.apple.CoreML/weights/weight.bin is a symlink", EXIT_INPUT)
    pkg = _package(outside, "link.mlpackage")
    (pkg / "Data" / "com.apple.CoreML" / "model.mlmodel").symlink_to(secret)
    cases[pkg] = ("Data/com.apple.CoreML/model.mlmodel is a symlink", EXIT_INPUT)
    pkg = _package(outside, "dirlink.mlpackage")
    (pkg / "Data" / "more").symlink_to(tmp_path, target_is_directory=True)
    cases[pkg] = ("Data/more is a symlink", EXIT_INPUT)
    pkg = _package(outside, "fifo.mlpackage")
    os.mkfifo(pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin")
    cases[pkg] = ("Data/com.apple.CoreML/weights/weight.bin is a FIFO", EXIT_INPUT)
    for pkg, (needle, code) in cases.items():
        outcome = run("validate", "{d}/sd.pt", "--model", LENET, str(pkg), "--no-latency", "--n-inputs", "2")
        run.check(outcome, code, f"{pkg}: {needle}; a package must hold only regular files and directories")
