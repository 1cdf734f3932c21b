"""Structured pruning on the real libraries' code: the Pruner finds the channel and head groups of
Hugging Face transformers, timm and torchvision models, prunes them, and finalize removes every unit
it pruned.

The groups come from finalize's own capture (torch.fx where it sees the whole model, otherwise the
recording of one eager run), so a model finalize compacts is a model the Pruner can prune; the Pruner
is given the keyword inputs HF models are called with. Per case: ``prepare()`` at target 0.5 gives at
least one group and reaches the target in each; compacting its masks keeps no masked channel; the
compacted model matches the masked one on fresh inputs (batch 2, another length, padding) to 1e-5
relative; and it is smaller by the pruned units. Fused projections split into equal parts (GPT-2's
c_attn, Phi-3's gate_up_proj) are pruned by head or channel; where the graph offers no group (Phi-3's
qkv_proj, sliced at computed offsets), the Pruner must say so, not prune quietly.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from deployprune.finalize import compact
from deployprune.pruning import Pruner

from . import vision_models as V
from .hf_models import SEQ, architectures, relative_error

pytestmark = pytest.mark.real

CHANNEL = {"global_config": {"granularity": "channel", "target_sparsity": 0.5}}
HEADS = {"module_type_configs": {"Linear": {"granularity": "head", "target_sparsity": 0.5}}}

HF_CHANNEL = ["bert", "distilbert", "roberta", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "opt",
              "t5_encoder", "vit", "swin", "convnext", "clip_vision", "whisper_encoder", "wav2vec2"]
HF_HEADS = ["bert", "distilbert", "roberta", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "opt", "t5_encoder",
            "vit", "swin", "clip_vision", "whisper_encoder", "wav2vec2"]
_ARCHS = architectures()


def _check(model: torch.nn.Module, inputs, fresh, config: dict) -> Pruner:
    p = Pruner(model, config, inputs)
    p.prepare()
    groups = [t for t in p.targets if t.kind == "group"]
    assert groups, f"no group pruned:\n{p.summary()}"
    for t in groups:  # half of each group's units, within rounding (a unit the graph keeps is never chosen)
        pruned = t.units - int(p._unit_keep[t.name].sum())
        assert abs(pruned - 0.5 * t.units) <= 1, (t.name, pruned, t.units)
    masked = copy.deepcopy(p.model)
    res = compact(p.model, inputs, p.masks())
    assert res.compacted, res.abandoned
    assert res.kept_channels == 0, res.channels_line()
    assert res.removed_channels == res.masked_channels > 0
    assert res.params_after < res.params_before
    args, kw = (fresh, {}) if isinstance(fresh, tuple) else ((), fresh)
    with torch.no_grad():
        err, name = relative_error(masked(*args, **kw), res.model(*args, **kw))
    assert err <= 1e-5, f"{name}: relative error {err:.2e}"
    return p


def _check_arch(name: str, config: dict, impl: str | None = None) -> Pruner:
    """_check on a transformers architecture of tests/real/hf_models.py (example batch 1, fresh batch 2)."""
    arch = _ARCHS[name]
    impl = impl or arch.impls[0]
    return _check(arch.build(impl), arch.inputs(1, SEQ, 0), arch.inputs(2, arch.fresh_length, 1), config)


@pytest.mark.parametrize("name", HF_CHANNEL)
def test_hf_channel_groups_are_pruned_and_removed(name: str) -> None:
    _check_arch(name, CHANNEL)


def test_gpt2_conv1d_mlp_channels_are_pruned_and_removed() -> None:
    """transformers' Conv1D keeps its weight as (in, out) and runs torch.addmm: the MLP's output
    channels are the weight's columns."""
    _check_arch("gpt2", {"module_type_configs": {"Conv1D": {"granularity": "channel", "target_sparsity": 0.5}}},
                "eager")


@pytest.mark.parametrize("name", ["bert", "llama", "t5_encoder", "vit"])
def test_channel_plus_head_prunes_heads_and_mlp_in_one_config(name: str) -> None:
    p = _check_arch(name, {"global_config": {"granularity": "channel+head", "target_sparsity": 0.5}})
    units = {t.config.granularity for t in p.targets if t.kind == "group"}
    assert units == {"channel", "head"}, p.summary()


@pytest.mark.parametrize("name", HF_HEADS)
def test_hf_attention_heads_are_pruned_and_removed(name: str) -> None:
    _check_arch(name, HEADS)


def test_transformers_bert_base_prunes_with_positional_input_ids() -> None:
    """The model issue 14's benchmark uses: transformers' own BertForSequenceClassification (2 layers of
    BERT-base width), called with input_ids alone; heads and FFN channels together."""
    from deployprune._compat import tolerate_missing_torchvision_ops

    tolerate_missing_torchvision_ops()
    import transformers

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(num_hidden_layers=2)).eval()
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    fresh = (torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(1)),)
    config = {"module_type_configs": {"Linear": {"granularity": "head", "target_sparsity": 0.5}},
              "module_name_configs": {r".*intermediate\.dense": {"granularity": "channel", "target_sparsity": 0.5}}}
    _check(model, (ids,), fresh, config)


@pytest.mark.parametrize("granularity", ["head", "channel+head"])
def test_gpt2_fused_c_attn_heads_are_pruned_and_removed(granularity: str) -> None:
    """GPT-2 computes q, k and v with one Conv1D and splits them (``c_attn(x).split(self.split_size)``):
    a head is 3 x head_dim of c_attn's output columns, one block in each third, and head_dim rows of
    c_proj. With channel+head the MLP's channels are pruned in the same config."""
    p = _check_arch("gpt2", {"module_type_configs": {"Conv1D": {"granularity": granularity,
                                                                 "target_sparsity": 0.5}}}, "eager")
    cfg = p.model.config
    attn = [t for t in p.targets if t.kind == "group" and t.config.granularity == "head"]
    assert sorted(t.name.split(":")[-1] for t in attn) == ["h.0.attn.c_attn", "h.1.attn.c_attn"], p.summary()
    cols = p.masks()["h.0.attn.c_attn"]["weight"].all(0)  # Conv1D weight is (in, out)
    dropped = (~cols).nonzero().flatten().tolist()
    assert len(dropped) == 3 * cfg.n_embd // 2  # half the heads, in q, k and v
    thirds = [{c % cfg.n_embd for c in dropped if c // cfg.n_embd == i} for i in range(3)]
    assert thirds[0] == thirds[1] == thirds[2], "q, k and v must lose the same heads"
    if granularity == "channel+head":
        assert any(t.config.granularity == "channel" for t in p.targets if t.kind == "group"), p.summary()


def test_phi3_fused_gate_up_proj_channels_are_pruned_and_removed() -> None:
    """Phi-3's MLP is one Linear for gate and up, chunked in two (``gate, up = gate_up_proj(x).chunk(2)``):
    an intermediate channel is row k of each half."""
    p = _check_arch("phi3", CHANNEL, "eager")
    rows = p.masks()["layers.0.mlp.gate_up_proj"]["weight"].all(1)
    half = rows.numel() // 2
    assert not rows.all() and torch.equal(rows[:half], rows[half:]), "gate and up must lose the same channels"


def test_phi3_fused_qkv_heads_not_found_are_reported(caplog) -> None:
    """Phi-3 slices its fused qkv_proj at computed offsets (not a split into equal parts): no head group, said so."""
    arch = _ARCHS["phi3"]
    model = arch.build("eager")
    config = {"module_type_configs": {"Linear": {"granularity": "head", "target_sparsity": 0.5}}}
    with caplog.at_level(logging.WARNING, logger="deployprune"):
        p = Pruner(model, config, arch.inputs(1, SEQ, 0))
        p.prepare()
    assert "the graph found no attention-head group in Phi3Model" in caplog.text
    assert "no layer is prunable with this config" in caplog.text
    assert "kept: the graph found no attention-head group produced by this layer" in p.summary()


def test_phi3_fused_qkv_channels_are_withdrawn_with_finalize_reason() -> None:
    """Phi-3 splits its fused qkv_proj by fixed positions and head_dim: only compaction finds that. The group analysis
    probes it and withdraws the group with finalize's reason, instead of pruning channels that stay."""
    arch = _ARCHS["phi3"]
    p = Pruner(arch.build("eager"), CHANNEL, arch.inputs(1, SEQ, 0))
    p.prepare()
    summary = p.summary()
    assert "layers.0.self_attn.qkv_proj" in summary
    row = next(line for line in summary.splitlines() if line.startswith("layers.0.self_attn.qkv_proj"))
    assert "not prunable: finalize keeps them: coupled through operator.getitem" in row, row
    masks = p.masks()
    assert all(bool(m.all()) for name, per in masks.items() if "qkv_proj" in name for m in per.values())
    assert "layers.0.mlp.gate_up_proj" in masks  # the MLP is still pruned


@pytest.mark.parametrize("spec_id", [s.id for s in V.SPECS])
def test_vision_channel_groups_are_pruned_and_removed(spec_id: str) -> None:
    spec = V.BY_ID[spec_id]
    _check(V.build(spec), V.inputs(spec, 1, 0), V.inputs(spec, 2, 1), CHANNEL)
