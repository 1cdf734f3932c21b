"""Hugging Face transformers models for the finalize matrix: builders, inputs and masks (issue 11).

Every model is built from a config with random init (nothing is downloaded), at tiny sizes: hidden 64,
2 layers, 4 heads, intermediate 128, sequence 16, vocabulary 128. Inputs are what the library takes
(keyword dicts of ``input_ids``/``attention_mask``, ``pixel_values``, ``input_features``, ``input_values``).

Masks are built from *units*: a unit is a set of rows/columns of named parameters that must go together
(an MLP unit: its row in up/gate/fc1 with the bias entry, and its column in down/fc2; an attention head: its
q, k, v rows and its columns of the output projection). The expected size after compaction is computed
from those units and the parameter shapes alone (:func:`expected_removed`), independently of the engine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deployprune._compat import tolerate_missing_torchvision_ops

tolerate_missing_torchvision_ops()  # transformers imports torchvision when it is installed

import transformers as T  # noqa: E402
from transformers.models.whisper.modeling_whisper import WhisperEncoder  # noqa: E402

H, LAYERS, HEADS, KV_HEADS, INTER, SEQ, VOCAB = 64, 2, 4, 2, 128, 16, 128
HD = H // HEADS  # head dim


# ---------------------------------------------------------------------------- units and masks


@dataclass(frozen=True)
class Cut:
    """Indices ``index`` along dim ``dim`` of parameter ``param`` of module ``module`` (all masked)."""

    module: str
    param: str
    dim: int
    index: tuple[int, ...]


Unit = list[Cut]


def _mod(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _param(model: nn.Module, module: str, param: str) -> torch.Tensor:
    return getattr(_mod(model, module), param)


def rows(model: nn.Module, module: str, index: Iterable[int]) -> Unit:
    """Output units of an ``nn.Linear`` / conv: weight rows and bias entries."""
    idx = tuple(index)
    cuts = [Cut(module, "weight", 0, idx)]
    if getattr(_mod(model, module), "bias", None) is not None:
        cuts.append(Cut(module, "bias", 0, idx))
    return cuts


def cols(module: str, index: Iterable[int], dim: int = 1) -> Unit:
    """Input units of an ``nn.Linear`` / conv (weight columns; no bias entry)."""
    return [Cut(module, "weight", dim, tuple(index))]


def conv1d_out(model: nn.Module, module: str, index: Iterable[int]) -> Unit:
    """Output units of transformers' ``Conv1D`` (GPT-2): its weight is (in, out), so columns, and the bias."""
    idx = tuple(index)
    return [Cut(module, "weight", 1, idx), Cut(module, "bias", 0, idx)]


def conv1d_in(module: str, index: Iterable[int]) -> Unit:
    """Input units of ``Conv1D``: rows of its (in, out) weight."""
    return [Cut(module, "weight", 0, tuple(index))]


def span(start: int, n: int) -> range:
    return range(start, start + n)


def head_span(h: int, hd: int = HD, offset: int = 0) -> range:
    return span(offset + h * hd, hd)


def _by_param(cuts: Iterable[Cut]) -> dict[tuple[str, str], dict[int, set[int]]]:
    out: dict[tuple[str, str], dict[int, set[int]]] = {}
    for c in cuts:
        out.setdefault((c.module, c.param), {}).setdefault(c.dim, set()).update(c.index)
    return out


def masks_from(model: nn.Module, cuts: Iterable[Cut]) -> dict[str, dict[str, torch.Tensor]]:
    """NNI masks ``{module: {param: 0/1 tensor}}``: zero wherever an index of a cut lies."""
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for (module, param), per_dim in _by_param(cuts).items():
        mask = torch.ones_like(_param(model, module, param), dtype=torch.float32)
        for dim, idx in per_dim.items():
            mask.index_fill_(dim, torch.tensor(sorted(idx)), 0.0)
        masks.setdefault(module, {})[param] = mask
    return masks


def expected_removed(model: nn.Module, cuts: Iterable[Cut]) -> int:
    """Parameters gone when every cut's rows/columns are removed: per parameter, numel minus the product of
    the kept sizes. From the cuts and the parameter shapes only."""
    total = 0
    for (module, param), per_dim in _by_param(cuts).items():
        shape = _param(model, module, param).shape
        kept = 1
        for d, size in enumerate(shape):
            kept *= size - len(per_dim.get(d, ()))
        total += shape.numel() - kept
    return total


def count_params(model: nn.Module) -> int:
    """Parameter elements, each shared tensor once; a parametrized tensor (weight_norm) counts as the one
    tensor it computes, which is what a compacted model stores."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        plist = getattr(module, "parametrizations", None)
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        if isinstance(plist, nn.ModuleDict):
            for name, par_list in plist.items():
                for p in par_list.parameters():
                    seen.add(id(p))
                total += getattr(module, name).numel()
    return total


def masked_copy(model: nn.Module, masks: dict[str, dict[str, torch.Tensor]]) -> nn.Module:
    """The reference: a deep copy with the masked parameters multiplied by their masks."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for module, per in masks.items():
            for param, m in per.items():
                getattr(ref.get_submodule(module), param).mul_(m)
    return ref


# ---------------------------------------------------------------------------- architectures


@dataclass
class Arch:
    """One architecture: how to build it, what it is called with, and its mask kinds.

    ``kinds`` maps a mask kind to a function giving that kind's units for a built model.
    ``inputs(batch, length, seed)`` gives keyword inputs; ``length`` is ignored where the model fixes it.
    ``exact`` lists the kinds whose removal is exact; others are expected kept and reported (with why).
    """

    name: str
    build: Callable[[str | None], nn.Module]
    inputs: Callable[[int, int, int], dict[str, torch.Tensor]]
    kinds: dict[str, Callable[[nn.Module], list[Unit]]]
    impls: tuple[str | None, ...] = ("eager", "sdpa")
    kept_kinds: dict[str, str] = field(default_factory=dict)  # kind -> why removal is not exact
    fresh_length: int = 11  # the fresh inputs' length (a different one from the example's)


def _make(cls: type, config: Any, impl: str | None) -> nn.Module:
    torch.manual_seed(0)
    if impl is None:
        model = cls._from_config(config)
    else:
        model = cls._from_config(config, attn_implementation=impl)
    return model.eval()


def _text(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Token ids and an attention mask; from batch 2 on, row 1 ends in 3 padding positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, length - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _ids_only(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    return {"input_ids": _text(batch, length, seed)["input_ids"]}


def _pixels(size: int = 32) -> Callable[[int, int, int], dict[str, torch.Tensor]]:
    def make(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    return make


def _audio_features(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(batch, 16, 32, generator=g)}  # Whisper fixes the length: 2 * 16


def _waveform(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """``length`` in frames of 25 samples (the feature extractor's stride 5 * 2 = 10, kernel 10 then 3)."""
    g = torch.Generator().manual_seed(seed)
    samples = 25 * length
    mask = torch.ones(batch, samples, dtype=torch.long)
    if batch > 1:
        mask[1, samples - 60:] = 0
    return {"input_values": torch.randn(batch, samples, generator=g), "attention_mask": mask}


def _every_layer(n: int = LAYERS) -> range:
    return range(n)


# --- unit builders, per family


def _half(n: int = INTER) -> list[int]:
    """50% of the units: the odd ones."""
    return list(range(1, n, 2))


def mlp_linear(up: str, down: str, layers: Iterable[str], *, gates: tuple[str, ...] = (),
               inter: int = INTER) -> Callable[[nn.Module], list[Unit]]:
    """Units of ``down(act(up(x)) [* gate(x)])``: rows of up (and of every gate), columns of down."""
    def units(model: nn.Module) -> list[Unit]:
        out = []
        for p in layers:
            for j in _half(inter):
                u = rows(model, f"{p}.{up}", [j]) + cols(f"{p}.{down}", [j])
                for gate in gates:
                    u += rows(model, f"{p}.{gate}", [j])
                out.append(u)
        return out
    return units


def mlp_conv1d(layers: Iterable[str]) -> Callable[[nn.Module], list[Unit]]:
    """GPT-2: ``c_fc`` and ``c_proj`` are ``Conv1D`` with (in, out) weights."""
    def units(model: nn.Module) -> list[Unit]:
        return [conv1d_out(model, f"{p}.mlp.c_fc", [j]) + conv1d_in(f"{p}.mlp.c_proj", [j])
                for p in layers for j in _half()]
    return units


def mlp_gate_up(layers: Iterable[str]) -> Callable[[nn.Module], list[Unit]]:
    """Phi-3: ``gate_up_proj`` stacks gate (first half of the rows) and up (second half); ``chunk(2)``."""
    def units(model: nn.Module) -> list[Unit]:
        return [rows(model, f"{p}.mlp.gate_up_proj", [j, INTER + j]) + cols(f"{p}.mlp.down_proj", [j])
                for p in layers for j in _half()]
    return units


def _layer_head(i: int) -> int:
    """The head masked in layer ``i``: a different one per layer (1, 2, ...)."""
    return (i + 1) % HEADS


def heads_separate(layers: list[str], q: str, k: str, v: str, o: str, *, per_layer: Callable[[int], int] = _layer_head,
                   bias_tables: Callable[[int], list[tuple[str, str, int]]] | None = None,
                   heads: int = HEADS, hd: int = HD) -> Callable[[nn.Module], list[Unit]]:
    """One head per layer: its q, k, v rows (with biases) and its columns of o. ``bias_tables(i)`` names
    per-head parameters of layer ``i`` (module, param, head dim) that go with the head (T5, Swin)."""
    def units(model: nn.Module) -> list[Unit]:
        out = []
        for i, p in enumerate(layers):
            h = per_layer(i) % heads
            idx = head_span(h, hd)
            u = rows(model, f"{p}.{q}", idx) + rows(model, f"{p}.{k}", idx) + rows(model, f"{p}.{v}", idx)
            u += cols(f"{p}.{o}", idx)
            for module, param, dim in (bias_tables(i) if bias_tables else []):
                u.append(Cut(module, param, dim, (h,)))
            out.append(u)
        return out
    return units


def heads_gqa(layers: list[str], *, variant: str, fused: bool = False) -> Callable[[nn.Module], list[Unit]]:
    """Grouped-query attention with 4 query heads and 2 key/value heads (query heads 2g, 2g+1 read kv head g).

    ``variant="kv_group"``: layer i loses kv group ``i % 2``: its k and v rows, the rows of its 2 query heads,
    their o columns. ``variant="q_position"``: layer i loses the query head at position ``i % 2`` of *every*
    group (heads p and 2 + p): q rows and o columns only; k and v stay. ``fused``: Phi-3's ``qkv_proj``
    rows are [q (4 x 16), k (2 x 16), v (2 x 16)].
    """
    group = HEADS // KV_HEADS

    def units(model: nn.Module) -> list[Unit]:
        out = []
        for i, p in enumerate(layers):
            if variant == "kv_group":
                g = i % KV_HEADS
                qh, kvh = [g * group + j for j in range(group)], [g]
            else:
                pos = i % group
                qh, kvh = [g * group + pos for g in range(KV_HEADS)], []
            q_idx = [r for h in qh for r in head_span(h)]
            kv_idx = [r for h in kvh for r in head_span(h)]
            if fused:
                fused_rows = q_idx + [H + r for r in kv_idx] + [H + KV_HEADS * HD + r for r in kv_idx]
                u = rows(model, f"{p}.self_attn.qkv_proj", fused_rows)
            else:
                u = rows(model, f"{p}.self_attn.q_proj", q_idx)
                if kv_idx:
                    u += rows(model, f"{p}.self_attn.k_proj", kv_idx) + rows(model, f"{p}.self_attn.v_proj", kv_idx)
            out.append(u + cols(f"{p}.self_attn.o_proj", q_idx))
        return out
    return units


def heads_gpt2(layers: list[str]) -> Callable[[nn.Module], list[Unit]]:
    """GPT-2's fused ``c_attn`` (Conv1D, weight (64, 192)): columns q | k | v, each 4 heads of 16."""
    def units(model: nn.Module) -> list[Unit]:
        out = []
        for i, p in enumerate(layers):
            h = _layer_head(i)
            idx = [off + r for off in (0, H, 2 * H) for r in head_span(h)]
            out.append(conv1d_out(model, f"{p}.attn.c_attn", idx) + conv1d_in(f"{p}.attn.c_proj", head_span(h)))
        return out
    return units


def heads_neox(layers: list[str]) -> Callable[[nn.Module], list[Unit]]:
    """GPT-NeoX's ``query_key_value`` (192 rows) is viewed as (heads, 3 * head_dim): head h owns the
    contiguous rows [48 h, 48 h + 48), its q, k and v in that order."""
    def units(model: nn.Module) -> list[Unit]:
        out = []
        for i, p in enumerate(layers):
            h = _layer_head(i)
            out.append(rows(model, f"{p}.attention.query_key_value", span(3 * HD * h, 3 * HD))
                       + cols(f"{p}.attention.dense", head_span(h)))
        return out
    return units


def stem_channels(conv: str, *, norm: str | None = None, consumer: str | None = None,
                  n: int, every: int = 4) -> Callable[[nn.Module], list[Unit]]:
    """Every ``every``-th output channel of a stem conv (weight rows, bias), with a per-channel norm's weight
    and bias and the consumer conv's input channels where given."""
    def units(model: nn.Module) -> list[Unit]:
        out = []
        for c in range(0, n, every):
            u = rows(model, conv, [c])
            if norm is not None:
                u += [Cut(norm, "weight", 0, (c,)), Cut(norm, "bias", 0, (c,))]
            if consumer is not None:
                u += cols(consumer, [c])
            out.append(u)
        return out
    return units


# --- the architectures


def _layers(fmt: str, n: int = LAYERS) -> list[str]:
    return [fmt.format(i) for i in range(n)]


def _bert_like(name: str, cls: type, cfg_cls: type) -> Arch:
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, max_position_embeddings=64)
    layers = _layers("encoder.layer.{}")
    return Arch(name, lambda impl: _make(cls, cfg, impl), _text, {
        "mlp": mlp_linear("intermediate.dense", "output.dense", layers),
        "heads": heads_separate(layers, "attention.self.query", "attention.self.key", "attention.self.value",
                                "attention.output.dense"),
    })


def _llama_like(name: str, cls: type, cfg: Any) -> Arch:
    layers = _layers("layers.{}")
    return Arch(name, lambda impl: _make(cls, cfg, impl), _text, {
        "mlp": mlp_linear("mlp.up_proj", "mlp.down_proj", layers, gates=("mlp.gate_proj",)),
        "heads": heads_gqa(layers, variant="kv_group"),
        "heads_q_position": heads_gqa(layers, variant="q_position"),
    })


def _decoder_cfg(cfg_cls: type, **extra: Any) -> Any:
    return cfg_cls(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                   pad_token_id=0, bos_token_id=1, eos_token_id=1, **extra)


_LN_COUPLED = ("the stem's channels are normalized together by a LayerNorm over the hidden dim: a zero channel "
               "still counts in its mean and variance, so removing it changes every other channel")


def architectures() -> dict[str, Arch]:
    archs: list[Arch] = []
    archs.append(_bert_like("bert", T.BertModel, T.BertConfig))
    distil_layers = _layers("transformer.layer.{}")
    distil = T.DistilBertConfig(vocab_size=VOCAB, dim=H, hidden_dim=INTER, n_layers=LAYERS, n_heads=HEADS,
                                max_position_embeddings=64)
    archs.append(Arch("distilbert", lambda impl: _make(T.DistilBertModel, distil, impl), _text, {
        "mlp": mlp_linear("ffn.lin1", "ffn.lin2", distil_layers),
        "heads": heads_separate(distil_layers, "attention.q_lin", "attention.k_lin", "attention.v_lin",
                                "attention.out_lin"),
    }))
    archs.append(_bert_like("roberta", T.RobertaModel, T.RobertaConfig))

    gpt2 = T.GPT2Config(vocab_size=VOCAB, n_embd=H, n_inner=INTER, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                        bos_token_id=1, eos_token_id=1)
    gpt2_layers = _layers("h.{}")
    archs.append(Arch("gpt2", lambda impl: _make(T.GPT2Model, gpt2, impl), _text, {
        "mlp": mlp_conv1d(gpt2_layers), "heads": heads_gpt2(gpt2_layers)}))

    archs.append(_llama_like("llama", T.LlamaModel, _decoder_cfg(T.LlamaConfig)))
    archs.append(_llama_like("mistral", T.MistralModel, _decoder_cfg(T.MistralConfig, sliding_window=None)))
    archs.append(_llama_like("qwen2", T.Qwen2Model, _decoder_cfg(T.Qwen2Config)))
    archs.append(_llama_like("qwen3", T.Qwen3Model, _decoder_cfg(T.Qwen3Config, head_dim=HD)))

    phi3 = _decoder_cfg(T.Phi3Config)
    phi3_layers = _layers("layers.{}")
    archs.append(Arch("phi3", lambda impl: _make(T.Phi3Model, phi3, impl), _text, {
        "mlp": mlp_gate_up(phi3_layers),
        "heads": heads_gqa(phi3_layers, variant="kv_group", fused=True),
        "heads_q_position": heads_gqa(phi3_layers, variant="q_position", fused=True),
    }))  # Phi3Attention slices qkv_proj at config.num_attention_heads * head_dim: patched per layer

    neox = T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, max_position_embeddings=64, bos_token_id=1, eos_token_id=1)
    neox_layers = _layers("layers.{}")
    archs.append(Arch("gpt_neox", lambda impl: _make(T.GPTNeoXModel, neox, impl), _text, {
        "mlp": mlp_linear("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", neox_layers),
        "heads": heads_neox(neox_layers)}))

    opt = T.OPTConfig(vocab_size=VOCAB, hidden_size=H, ffn_dim=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, max_position_embeddings=64, word_embed_proj_dim=H,
                      pad_token_id=0, bos_token_id=1, eos_token_id=1)
    opt_layers = _layers("decoder.layers.{}")
    archs.append(Arch("opt", lambda impl: _make(T.OPTModel, opt, impl), _text, {
        "mlp": mlp_linear("fc1", "fc2", opt_layers),
        "heads": heads_separate(opt_layers, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "self_attn.out_proj")}))

    t5 = T.T5Config(vocab_size=VOCAB, d_model=H, d_kv=HD, d_ff=INTER, num_layers=LAYERS, num_heads=HEADS,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    t5_layers = _layers("encoder.block.{}")
    # block 0 computes the relative position bias (one column per head) and every block adds it: the same head
    # goes in every block, and its bias column with it
    t5_bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    archs.append(Arch("t5_encoder", lambda impl: _make(T.T5EncoderModel, t5, impl), _text, {
        "mlp": mlp_linear("layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo", t5_layers),
        "heads": heads_separate(t5_layers, "layer.0.SelfAttention.q", "layer.0.SelfAttention.k",
                                "layer.0.SelfAttention.v", "layer.0.SelfAttention.o", per_layer=lambda i: 1,
                                bias_tables=lambda i: [(t5_bias, "weight", 1)] if i == 0 else []),
    }))

    vit = T.ViTConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      image_size=32, patch_size=8)
    vit_layers = _layers("layers.{}")
    archs.append(Arch("vit", lambda impl: _make(T.ViTModel, vit, impl), _pixels(), {
        "mlp": mlp_linear("mlp.fc1", "mlp.fc2", vit_layers),
        "heads": heads_separate(vit_layers, "attention.q_proj", "attention.k_proj", "attention.v_proj",
                                "attention.o_proj"),
        "stem": stem_channels("embeddings.patch_embeddings.projection", n=H),
    }, kept_kinds={"stem": _LN_COUPLED}))

    swin = T.SwinConfig(image_size=32, patch_size=4, embed_dim=H, depths=(2, 2), num_heads=(HEADS, HEADS),
                        window_size=4, mlp_ratio=2.0)
    swin_blocks = [f"encoder.layers.{s}.blocks.{b}" for s in range(2) for b in range(2)]
    swin_dims = [H, H, 2 * H, 2 * H]

    def swin_mlp(model: nn.Module) -> list[Unit]:
        return [rows(model, f"{p}.mlp.fc1", [j]) + cols(f"{p}.mlp.fc2", [j])
                for p, d in zip(swin_blocks, swin_dims, strict=True) for j in _half(2 * d)]

    def swin_heads(model: nn.Module) -> list[Unit]:
        out = []
        for i, (p, d) in enumerate(zip(swin_blocks, swin_dims, strict=True)):
            h, hd = _layer_head(i), d // HEADS
            out.append(heads_separate([p], "attention.q_proj", "attention.k_proj", "attention.v_proj",
                                      "attention.o_proj", per_layer=lambda _i, h=h: h, hd=hd,
                                      bias_tables=lambda _i, p=p: [
                                          (f"{p}.attention.relative_position_bias", "relative_position_bias_table",
                                           1)])(model)[0])
        return out

    archs.append(Arch("swin", lambda impl: _make(T.SwinModel, swin, impl), _pixels(), {
        "mlp": swin_mlp, "heads": swin_heads,
        "stem": stem_channels("embeddings.patch_embeddings.projection", n=H),
    }, kept_kinds={"stem": _LN_COUPLED}))

    convnext = T.ConvNextConfig(hidden_sizes=(H // 2, H), depths=(1, 1), num_stages=2, image_size=32, patch_size=4)
    cn_layers = ["encoder.stages.0.layers.0", "encoder.stages.1.layers.0"]

    def convnext_mlp(model: nn.Module) -> list[Unit]:
        return [rows(model, f"{p}.pwconv1", [j]) + cols(f"{p}.pwconv2", [j])
                for p, d in zip(cn_layers, (H // 2, H), strict=True) for j in _half(4 * d)]

    archs.append(Arch("convnext", lambda impl: _make(T.ConvNextModel, convnext, None), _pixels(), {
        "mlp": convnext_mlp, "stem": stem_channels("embeddings.patch_embeddings", n=H // 2),
    }, impls=(None,), kept_kinds={"stem": _LN_COUPLED}))

    clip = T.CLIPVisionConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, image_size=32, patch_size=8, projection_dim=32)
    clip_layers = _layers("encoder.layers.{}")
    archs.append(Arch("clip_vision", lambda impl: _make(T.CLIPVisionModel, clip, impl), _pixels(), {
        "mlp": mlp_linear("mlp.fc1", "mlp.fc2", clip_layers),
        "heads": heads_separate(clip_layers, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "self_attn.out_proj")}))

    whisper = T.WhisperConfig(vocab_size=VOCAB, d_model=H, encoder_layers=LAYERS, encoder_attention_heads=HEADS,
                              encoder_ffn_dim=INTER, decoder_layers=1, decoder_attention_heads=HEADS,
                              decoder_ffn_dim=INTER, num_mel_bins=16, max_source_positions=16,
                              max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                              decoder_start_token_id=1)
    wh_layers = _layers("layers.{}")
    archs.append(Arch("whisper_encoder", lambda impl: _make(WhisperEncoder, whisper, impl), _audio_features, {
        "mlp": mlp_linear("fc1", "fc2", wh_layers),
        "heads": heads_separate(wh_layers, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "self_attn.out_proj")}))

    w2v = T.Wav2Vec2Config(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=INTER, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                           num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    w2v_layers = _layers("encoder.layers.{}")
    archs.append(Arch("wav2vec2", lambda impl: _make(T.Wav2Vec2Model, w2v, impl), _waveform, {
        "mlp": mlp_linear("feed_forward.intermediate_dense", "feed_forward.output_dense", w2v_layers),
        "heads": heads_separate(w2v_layers, "attention.q_proj", "attention.k_proj", "attention.v_proj",
                                "attention.out_proj"),
        # the first conv's GroupNorm has one group per channel: a channel masked with its norm weight and bias
        # is zero after it, so it goes with its column of the next conv (num_groups patched)
        "stem": stem_channels("feature_extractor.conv_layers.0.conv", norm="feature_extractor.conv_layers.0.layer_norm",
                              consumer="feature_extractor.conv_layers.1.conv", n=32),
    }, fresh_length=19))
    return {a.name: a for a in archs}


ARCHS = architectures()


def cases() -> list[tuple[str, str | None, str]]:
    """(arch, attention implementation, mask kind) for every case of the matrix."""
    return [(a.name, impl, kind) for a in ARCHS.values() for impl in a.impls for kind in a.kinds]


def impl_supported(arch: Arch, impl: str | None) -> str:
    """"" if the architecture builds with ``impl``; otherwise transformers' one-line reason."""
    try:
        arch.build(impl)
    except (ValueError, ImportError) as exc:
        return str(exc).splitlines()[0]
    return ""


# ---------------------------------------------------------------------------- one case of the matrix


@dataclass
class Outcome:
    """What one (arch, attention implementation, mask kind) case gave; ``failures`` empty means it passed."""

    arch: str
    impl: str | None
    kind: str
    failures: list[str] = field(default_factory=list)
    skipped: str = ""  # the implementation does not exist for this architecture
    compacted: bool | None = None
    masked_channels: int = 0
    removed_channels: int = 0
    params_removed: int | None = None
    params_expected: int = 0
    rel_err: float | None = None
    summary: str = ""
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return "n/a" if self.skipped else ("fail" if self.failures else "pass")


def _tensors(out: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a model output (ModelOutput, dict, tuple or tensor), by field name; caches skipped."""
    if isinstance(out, torch.Tensor):
        return {prefix or "output": out}
    found: dict[str, torch.Tensor] = {}
    if isinstance(out, dict):  # ModelOutput is an OrderedDict
        for k, v in out.items():
            found.update(_tensors(v, f"{prefix}.{k}" if prefix else k))
    elif isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            found.update(_tensors(v, f"{prefix}[{i}]"))
    return found


def relative_error(ref_out: Any, got_out: Any) -> tuple[float, str]:
    """Largest max-abs error relative to the reference's max-abs, over every output tensor; and its name."""
    ref, got = _tensors(ref_out), _tensors(got_out)
    if set(ref) != set(got):
        raise AssertionError(f"output fields differ: {sorted(ref)} vs {sorted(got)}")
    worst, name = 0.0, ""
    for k, r in ref.items():
        g = got[k]
        if r.shape != g.shape:
            raise AssertionError(f"output {k}: shape {tuple(g.shape)}, expected {tuple(r.shape)}")
        if not r.is_floating_point():
            if not torch.equal(r, g):
                return float("inf"), k
            continue
        err = float((r - g).abs().max() / r.abs().max().clamp_min(1e-12))
        if not err <= worst:  # NaN counts as worst
            worst, name = err, k
    return worst, name


RTOL = 1e-5


def run_case(arch_name: str, impl: str | None, kind: str) -> Outcome:
    """Compact one case and check it: compacted, parity on fresh inputs, size, the library's forward."""
    import time

    import deployprune as dp

    arch = ARCHS[arch_name]
    res = Outcome(arch_name, impl, kind)
    t0 = time.perf_counter()
    try:
        model = arch.build(impl)
    except (ValueError, ImportError) as exc:
        res.skipped = str(exc).splitlines()[0]
        return res
    units = arch.kinds[kind](model)
    cuts = [c for u in units for c in u]
    masks = masks_from(model, cuts)
    base = count_params(model)
    exact = kind not in arch.kept_kinds
    res.params_expected = expected_removed(model, cuts) if exact else 0
    example = arch.inputs(1, SEQ, 0)
    try:
        r = dp.compact(model, example, masks)
    except Exception as exc:  # reported in the matrix, the test fails on it
        res.failures.append(f"dp.compact raised {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        res.seconds = time.perf_counter() - t0
        return res
    res.compacted = r.compacted
    res.masked_channels, res.removed_channels = r.masked_channels, r.removed_channels
    res.summary = r.summary()
    if not r.compacted:
        res.failures.append(f"not compacted: {r.channels_line()}")
    reference = masked_copy(model, masks)
    fresh = arch.inputs(2, arch.fresh_length, 7)
    try:
        with torch.no_grad():
            want, got = reference(**fresh), r.model(**fresh)
        res.rel_err, field_name = relative_error(want, got)
        if not res.rel_err <= RTOL:
            res.failures.append(f"parity on fresh inputs: rel err {res.rel_err:.3g} in {field_name} (> {RTOL:g})")
    except Exception as exc:
        res.failures.append(f"compacted model on fresh inputs: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    res.params_removed = base - count_params(r.model)
    if exact:
        if res.params_removed != res.params_expected:
            res.failures.append(f"size: {res.params_removed:,} params removed, removing every masked unit removes "
                                f"{res.params_expected:,}; {r.channels_line().rstrip(':')}")
        elif r.kept or r.removed_channels != r.masked_channels:  # the size is right, the report is not
            res.failures.append(f"report: every masked unit is gone (size as expected) but the result says "
                                f"{r.channels_line().rstrip(':')} ({r.kept[0].describe() if r.kept else ''})")
    elif res.params_removed != 0 or r.removed_channels or not r.kept:
        res.failures.append(f"expected every masked channel kept and listed ({arch.kept_kinds[kind]}); "
                            f"{res.params_removed:,} params removed, {len(r.kept)} kept group(s)")
    res.seconds = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------- generation


def causal_lm(name: str) -> tuple[nn.Module, Callable[[nn.Module], list[Unit]]]:
    """A decoder with its LM head, and heads + MLP units together (layer i loses kv group i % 2 for Llama,
    head i + 1 for GPT-2, and half of each MLP)."""
    if name == "llama":
        torch.manual_seed(0)
        cfg = _decoder_cfg(T.LlamaConfig, initializer_range=0.3)  # a wide init: greedy tokens vary
        model = T.LlamaForCausalLM(cfg).eval()
        layers = _layers("model.layers.{}")
        mlp = mlp_linear("mlp.up_proj", "mlp.down_proj", layers, gates=("mlp.gate_proj",))
        heads = heads_gqa(layers, variant="kv_group")
    elif name == "gpt2":
        torch.manual_seed(0)
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=H, n_inner=INTER, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                           bos_token_id=1, eos_token_id=1, initializer_range=0.3)
        model = T.GPT2LMHeadModel(cfg).eval()
        layers = _layers("transformer.h.{}")
        mlp, heads = mlp_conv1d(layers), heads_gpt2(layers)
    else:
        raise KeyError(name)
    return model, lambda m: mlp(m) + heads(m)
