"""Hugging Face round trip (issue 11): a ``save_pretrained`` directory in, through the real command line
(``python -m deployprune``), and a Hugging Face directory (or an ONNX artifact) out.

Tiny BERT, GPT-2 (with its tied LM head) and Llama with grouped-query attention are built from configs
(random init, nothing downloaded) and saved with ``save_pretrained``. Masks remove MLP units and whole
attention heads (for Llama a whole KV group with its query heads), alike in every layer (the compacted
model is written with ``save_pretrained`` and an updated config) or differently per layer (safetensors +
``deployprune_widths.json``). Every written model is loaded back the way a user would and compared with
the masked model on fresh inputs, with padding (relative error <= 1e-5).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from deployprune import cli
from deployprune._compat import tolerate_missing_torchvision_ops
from deployprune.adapt import flat_outputs
from deployprune.masks import apply_masks_, normalize_masks

tolerate_missing_torchvision_ops()  # transformers imports torchvision when it is installed
T = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")

from deployprune import hf  # noqa: E402  (after the shim: it imports transformers)

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
H, INTER, HEADS, KV, HD, LAYERS, VOCAB = 64, 128, 4, 2, 16, 2, 100
TOL = 1e-5


# ---------------------------------------------------------------------------- models and masks


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.BertModel(T.BertConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER,
                                    num_hidden_layers=LAYERS, num_attention_heads=HEADS)).eval()


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                                          bos_token_id=0, eos_token_id=0)).eval()


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER,
                                            num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                            num_key_value_heads=KV)).eval()


def _phi3() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.Phi3ForCausalLM(T.Phi3Config(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER,
                                          num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                          num_key_value_heads=KV, pad_token_id=0, bos_token_id=0,
                                          eos_token_id=0)).eval()


BUILD = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "phi3": _phi3}


def _keep(n: int, drop: range | slice | list[int]) -> torch.Tensor:
    m = torch.ones(n)
    m[drop] = 0
    return m


def _rows(m: torch.Tensor, cols: int, bias: bool) -> dict:
    out = {"weight": m[:, None].expand(len(m), cols).clone()}
    if bias:
        out["bias"] = m.clone()
    return out


def masks_for(kind: str, mlp_drop: list[int], heads: list[list[int]]) -> dict:
    """MLP units ``mlp_drop[i]`` units in layer i (every other one) and the query heads ``heads[i]``
    of layer i, each as its whole coupled group. For Llama a head list names whole KV groups."""
    masks: dict = {}
    for i in range(LAYERS):
        units = list(range(0, 2 * mlp_drop[i], 2))
        head_rows = [r for h in heads[i] for r in range(h * HD, (h + 1) * HD)]
        if kind == "bert":
            p = f"encoder.layer.{i}"
            masks[f"{p}.intermediate.dense"] = _rows(_keep(INTER, units), H, bias=True)
            if head_rows:
                for q in ("query", "key", "value"):
                    masks[f"{p}.attention.self.{q}"] = _rows(_keep(H, head_rows), H, bias=True)
        elif kind == "gpt2":
            p = f"transformer.h.{i}"
            u = _keep(4 * H, units)  # Conv1D: weight (in, out), the units are columns
            masks[f"{p}.mlp.c_fc"] = {"weight": u[None, :].expand(H, 4 * H).clone(), "bias": u.clone()}
        elif kind == "phi3":  # fused: gate_up_proj rows [gate | up], qkv_proj rows [q (4 x 16) | k (2 x 16) | v]
            p = f"model.layers.{i}"
            masks[f"{p}.mlp.gate_up_proj"] = _rows(torch.cat([_keep(INTER, units)] * 2), H, bias=False)
            if heads[i]:
                q_rows = [r for g in heads[i] for h in (2 * g, 2 * g + 1) for r in range(h * HD, (h + 1) * HD)]
                rows = q_rows + [H + r for r in head_rows] + [H + KV * HD + r for r in head_rows]
                masks[f"{p}.self_attn.qkv_proj"] = _rows(_keep(H + 2 * KV * HD, rows), H, bias=False)
        else:
            p = f"model.layers.{i}"
            for q in ("gate_proj", "up_proj"):
                masks[f"{p}.mlp.{q}"] = _rows(_keep(INTER, units), H, bias=False)
            if heads[i]:  # KV group g = query heads g*2, g*2+1 and kv head g
                q_rows = [r for g in heads[i] for h in (2 * g, 2 * g + 1) for r in range(h * HD, (h + 1) * HD)]
                masks[f"{p}.self_attn.q_proj"] = _rows(_keep(HEADS * HD, q_rows), H, bias=False)
                for q in ("k_proj", "v_proj"):
                    masks[f"{p}.self_attn.{q}"] = _rows(_keep(KV * HD, head_rows), H, bias=False)
    return masks


def removed_params(kind: str, mlp_drop: list[int], heads: list[list[int]]) -> int:
    """Parameters that removing every masked unit takes away (from the shapes alone)."""
    total = 0
    for i in range(LAYERS):
        u, n = mlp_drop[i], len(heads[i])
        if kind == "bert":
            total += u * (H + 1) + u * H + n * (3 * HD * (H + 1) + HD * H)
        elif kind == "gpt2":
            total += u * (H + 1) + u * H
        elif kind == "phi3":  # the same units as Llama's, in fused layers
            total += 3 * u * H + n * (2 * HD * H + 2 * HD * H + 2 * HD * H)
        else:
            total += 3 * u * H + n * (2 * HD * H + 2 * HD * H + 2 * HD * H)  # 2 q heads + k + v, o columns
    return total


def fresh_inputs(kind: str, seed: int = 5) -> dict:
    """Batch 2, length 9, new token ids, the second row padded at the end."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(0, VOCAB, (2, 9), generator=g), "attention_mask": mask}


def masked_model(kind: str, masks: dict) -> torch.nn.Module:
    model = BUILD[kind]()
    apply_masks_(model, normalize_masks(model, masks))
    return model


def _call(model: torch.nn.Module, inputs: dict) -> list[torch.Tensor]:
    extra = {"use_cache": False} if "use_cache" in inspect.signature(type(model).forward).parameters else {}
    with torch.no_grad():
        return flat_outputs(model(**inputs, **extra))


def rel_error(ref_model: torch.nn.Module, model: torch.nn.Module, inputs: dict) -> float:
    ref, out = _call(ref_model, inputs), _call(model, inputs)
    assert len(ref) == len(out) and ref
    return max(float((r - o).abs().max() / r.abs().max()) for r, o in zip(ref, out, strict=True))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- helpers


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "deployprune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def saved(tmp: Path, kind: str, mlp_drop: list[int], heads: list[list[int]]) -> tuple[Path, Path]:
    """The model saved with save_pretrained and its masks file."""
    directory = tmp / f"my-{kind}"
    BUILD[kind]().save_pretrained(directory)
    masks = tmp / f"{kind}.masks.pt"
    torch.save(masks_for(kind, mlp_drop, heads), masks)
    return directory, masks


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str], code: int) -> str:
    capsys.readouterr()  # what building the test's models printed
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0][len("error: "):]


# ---------------------------------------------------------------------------- finalize DIR -o OUTDIR

UNIFORM = {  # MLP units and heads removed alike in every layer: save_pretrained with an updated config
    "bert": ([32, 32], [[], []], {"intermediate_size": 96}),
    "gpt2": ([64, 64], [[], []], {"n_inner": 192}),
    "llama": ([32, 32], [[1], [1]], {"intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1,
                                     "head_dim": HD}),
    # Phi3Config has no head_dim field (the attention reads getattr(config, "head_dim", hidden // heads)):
    # it is written, so that two heads stay 16 wide
    "phi3": ([32, 32], [[1], [1]], {"intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1,
                                    "head_dim": HD}),
}


@pytest.mark.parametrize("kind", sorted(UNIFORM))
def test_uniform_widths_come_back_through_from_pretrained(tmp_path: Path, kind: str) -> None:
    mlp_drop, heads, config_fields = UNIFORM[kind]
    directory, masks = saved(tmp_path, kind, mlp_drop, heads)
    (directory / "vocab.txt").write_text("[PAD]\n[UNK]\n")  # tokenizer files travel with the model
    proc = run("finalize", directory.name, "--masks", masks.name, "-o", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "from_pretrained loads it" in proc.stdout
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name != "generation_config.json") == [
        "config.json", "model.safetensors", "vocab.txt"]
    assert (out / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    config = json.loads((out / "config.json").read_text())
    for key, value in config_fields.items():
        assert config[key] == value, (key, config[key])

    cls = getattr(T, config["architectures"][0])
    again, info = cls.from_pretrained(out, output_loading_info=True, local_files_only=True)
    assert {k: v for k, v in info.items() if v} == {}, info  # no missing, unexpected or mismatched key
    reference = masked_model(kind, masks_for(kind, mlp_drop, heads))
    assert n_params(reference) - n_params(again) == removed_params(kind, mlp_drop, heads)
    assert rel_error(reference, again.eval(), fresh_inputs(kind)) <= TOL
    auto = T.AutoModelForCausalLM if kind in ("gpt2", "llama", "phi3") else T.AutoModel
    assert type(auto.from_pretrained(out, local_files_only=True)) is cls


NON_UNIFORM = {  # widths that differ per layer, or heads the config cannot express: the widths spec
    "bert": ([32, 64], [[1], []]),  # a BERT head count below hidden_size / head_dim has no config field
    "gpt2": ([64, 32], [[], []]),  # with the LM head tied to the embedding
    "llama": ([32, 16], [[1], []]),  # a KV group in layer 0 only
    "phi3": ([32, 16], [[1], []]),  # layer 0's attention gets its own config (num_attention_heads 2)
}


@pytest.mark.parametrize("kind", sorted(NON_UNIFORM))
def test_per_layer_widths_come_back_through_load_compacted(tmp_path: Path, kind: str) -> None:
    mlp_drop, heads = NON_UNIFORM[kind]
    directory, masks = saved(tmp_path, kind, mlp_drop, heads)
    proc = run("finalize", directory.name, "--masks", masks.name, "-o", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "per-layer widths" in proc.stdout
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir() if p.name != "generation_config.json")
    assert names == ["config.json", hf.WIDTHS_FILE, "model.safetensors"]  # no pickle anywhere
    spec = json.loads((out / hf.WIDTHS_FILE).read_text())
    layer0, attr, width = {"bert": ("encoder.layer.0.intermediate.dense", "out_features", INTER),
                           "gpt2": ("transformer.h.0.mlp.c_fc", "nf", 4 * H),
                           "llama": ("model.layers.0.mlp.up_proj", "out_features", INTER),
                           "phi3": ("model.layers.0.mlp.gate_up_proj", "out_features", 2 * INTER)}[kind]
    assert spec["modules"][layer0]["attributes"][attr] == width - mlp_drop[0] * (2 if kind == "phi3" else 1)
    if kind == "phi3":
        assert spec["modules"]["model.layers.0.self_attn"]["config"] == {"num_attention_heads": 2}

    again = hf.load_compacted(out)
    reference = masked_model(kind, masks_for(kind, mlp_drop, heads))
    assert n_params(reference) - n_params(again) == removed_params(kind, mlp_drop, heads)
    assert rel_error(reference, again, fresh_inputs(kind)) <= TOL
    cls = getattr(T, json.loads((out / "config.json").read_text())["architectures"][0])
    with pytest.raises(RuntimeError, match="mismatch"):  # never a silently re-initialized layer
        cls.from_pretrained(out, local_files_only=True)
    if kind == "bert":  # the written directory is a model directory for export too
        proc = run("export", "out", "--no-latency", "--n-inputs", "3", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "PASS" in proc.stdout


def test_finalize_output_is_atomic_and_never_replaced_without_force(tmp_path: Path, capsys) -> None:
    directory, masks = saved(tmp_path, "bert", [32, 32], [[], []])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = one_line_error(capsys, ["finalize", str(directory), "--masks", str(masks), "-o", str(out)], 3)
    assert msg == f"{out}: already exists; pass --force to overwrite it"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert cli.main(["finalize", str(directory), "--masks", str(masks), "-o", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


# ---------------------------------------------------------------------------- export DIR (the README's command)


def test_readme_command_exports_a_bert_directory_to_onnx(tmp_path: Path) -> None:
    mlp_drop, heads = [32, 32], [[1], [1]]
    saved(tmp_path, "bert", mlp_drop, heads)
    (tmp_path / "bert.masks.pt").rename(tmp_path / "masks.pt")
    readme = (REPO / "README.md").read_text()
    command = "deployprune export ./my-bert --masks masks.pt --input input_ids=1,128 --target onnx"
    assert command in readme
    proc = run(*command.split()[1:], "--no-latency", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "removed 160 of 160 masked channels" in proc.stdout  # 2 layers x (32 MLP units + 3 x 16 head rows)
    report = json.loads((tmp_path / "my-bert.onnx.report.json").read_text())
    assert report["passed"] is True
    assert report["pipeline"]["source"]["kind"] == "hf"
    graph = onnx.load(str(tmp_path / "my-bert.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids"]
    dims = {tuple(i.dims) for i in graph.initializer}
    assert (H, INTER - 32) in dims or (INTER - 32, H) in dims  # the compacted MLP, not the masked one


# ---------------------------------------------------------------------------- loading: what is refused


def test_custom_code_is_refused_and_never_imported(tmp_path: Path, capsys) -> None:
    directory = tmp_path / "remote"
    _bert().save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (directory / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    msg = one_line_error(capsys, ["export", str(directory)], 3)
    assert msg == (f"{directory}/config.json: names custom model code (auto_map, trust_remote_code); deployprune "
                   "never runs code from a model directory and builds only transformers' own architectures")
    assert not marker.exists()


def test_unknown_architecture_is_refused(tmp_path: Path, capsys) -> None:
    directory = tmp_path / "odd"
    _bert().save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["os.system"]
    (directory / "config.json").write_text(json.dumps(config))
    msg = one_line_error(capsys, ["finalize", str(directory)], 3)
    assert msg == f"{directory}/config.json: 'architectures' names 'os.system', not a class name; re-save the model " \
                  "with save_pretrained"
    config["architectures"] = ["BertForTeleportation"]
    (directory / "config.json").write_text(json.dumps(config))
    msg = one_line_error(capsys, ["finalize", str(directory)], 3)
    assert msg == (f"{directory}/config.json: unknown architecture 'BertForTeleportation': not a model class of "
                   f"transformers {T.__version__}; deployprune builds only transformers' own architectures")
    config["architectures"] = ["pipeline"]  # a transformers name, but not a model class
    (directory / "config.json").write_text(json.dumps(config))
    assert "unknown architecture 'pipeline'" in one_line_error(capsys, ["finalize", str(directory)], 3)


def test_bad_input_key_names_the_allowed_ones(tmp_path: Path, capsys) -> None:
    directory = tmp_path / "bert"
    _bert().save_pretrained(directory)
    msg = one_line_error(capsys, ["export", str(directory), "--input", "input_idz=1,8"], 2)
    assert msg == (f"--input input_idz: {directory}: BertModel.forward takes no input 'input_idz'; allowed: "
                   "input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, encoder_hidden_states, "
                   "encoder_attention_mask")
    msg = one_line_error(capsys, ["export", str(directory), "--input", "1,8"], 2)
    assert msg == ("--input '1,8': expected NAME=SHAPE, e.g. input_ids=1,128 (keyword inputs of a Hugging Face "
                   "model directory); use --input-shape for positional inputs")
    msg = one_line_error(capsys, ["export", str(directory), "--input-shape", "1,8"], 2)
    assert msg.startswith(f"--input-shape does not apply to a Hugging Face model directory ({directory})")


def test_pickled_weights_are_not_read(tmp_path: Path, capsys) -> None:
    directory = tmp_path / "old"
    model = _bert()
    model.save_pretrained(directory)
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    msg = one_line_error(capsys, ["finalize", str(directory)], 3)
    assert msg == (f"{directory}: no model.safetensors or model.safetensors.index.json (found pytorch_model.bin: "
                   "pickles, which deployprune does not load from a model directory); re-save the model with "
                   "save_pretrained(..., safe_serialization=True)")


def test_shard_outside_the_directory_is_refused(tmp_path: Path, capsys) -> None:
    directory = tmp_path / "sharded"
    _llama().save_pretrained(directory, max_shard_size="40KB")
    index = json.loads((directory / hf.INDEX_FILE).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../elsewhere.safetensors"
    (directory / hf.INDEX_FILE).write_text(json.dumps(index))
    msg = one_line_error(capsys, ["finalize", str(directory)], 3)
    assert msg == (f"{directory / hf.INDEX_FILE}: weight file '../elsewhere.safetensors' is not a plain file name "
                   "inside the directory; refusing to read it")


# ---------------------------------------------------------------------------- loading: what it builds


def test_sharded_directory_loads_with_tied_head_and_stored_order(tmp_path: Path) -> None:
    directory = tmp_path / "sharded"
    _gpt2().save_pretrained(directory, max_shard_size="40KB")
    assert (directory / hf.INDEX_FILE).is_file() and not (directory / "model.safetensors").exists()
    loaded = hf.load_directory(directory)
    model = loaded.library_model
    assert model.lm_head.weight is model.transformer.wte.weight  # the tied head, absent from the files
    assert rel_error(_gpt2(), model, fresh_inputs("gpt2")) == 0.0


def test_default_and_given_inputs(tmp_path: Path) -> None:
    directory = tmp_path / "bert"
    _bert().save_pretrained(directory)
    loaded = hf.load_directory(directory)
    assert {k: (tuple(v.shape), v.dtype) for k, v in loaded.keyword_inputs.items()} == {
        "input_ids": ((1, 16), torch.int64), "attention_mask": ((1, 16), torch.int64)}
    assert loaded.model.input_names == ["input_ids", "attention_mask"]
    loaded = hf.load_directory(directory, inputs=["input_ids=2,128", "token_type_ids=2,128", "position_ids=2,128"])
    kw = loaded.keyword_inputs
    assert kw["input_ids"].dtype == torch.int64 and 0 <= int(kw["input_ids"].min()) < int(kw["input_ids"].max()) < VOCAB
    assert int(kw["input_ids"].max()) > 50  # drawn from the whole vocabulary, not [0, 2)
    assert set(kw["token_type_ids"].unique().tolist()) <= {0, 1}
    assert kw["position_ids"][1].tolist() == list(range(128))

    vit = tmp_path / "vit"
    T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, hidden_size=H, num_hidden_layers=1, num_attention_heads=HEADS,
                           intermediate_size=INTER)).save_pretrained(vit)
    pixels = hf.load_directory(vit).keyword_inputs
    assert list(pixels) == ["pixel_values"] and tuple(pixels["pixel_values"].shape) == (1, 3, 32, 32)
    assert pixels["pixel_values"].dtype == torch.float32


def test_masks_may_name_the_view(tmp_path: Path) -> None:
    """Masks written for the loaded view (``model.``-prefixed, as ``deployprune prune`` on a directory names
    them) and masks named after the library model are the same masks."""
    directory, masks = saved(tmp_path, "bert", [32, 32], [[], []])
    plain = hf.load_directory(directory, masks=masks).masks
    prefixed = hf.load_directory(directory, masks={f"model.{k}": v for k, v in torch.load(masks).items()}).masks
    assert plain.keys() == prefixed.keys() and all(k.startswith("model.encoder.") for k in plain)
    with pytest.raises(Exception, match="'encoder.layer.9.intermediate.dense' does not exist"):
        hf.load_directory(directory, masks={"encoder.layer.9.intermediate.dense": {}})
