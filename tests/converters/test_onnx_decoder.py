"""Decoder-only LMs of transformers to ONNX with a KV cache, compacted first; greedy generation in
onnxruntime equals torch's, token for token (issue 11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deployprune as dp
from deployprune._compat import tolerate_missing_torchvision_ops
from deployprune.converters.onnx_decoder import check_generation, export_decoder

tolerate_missing_torchvision_ops()
T = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")

pytestmark = pytest.mark.real


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        initializer_range=0.3)  # a wide init: greedy tokens vary instead of repeating
    return T.LlamaForCausalLM(cfg).eval()


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=96, n_embd=64, n_inner=96, n_layer=2, n_head=4, n_positions=128,
                       initializer_range=0.3, bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(cfg).eval()


def _rows(n: int, zero: slice) -> torch.Tensor:
    k = torch.ones(n)
    k[zero] = 0
    return k


def _llama_masks(model) -> dict:
    """Layer 0 loses key/value head 1 with its query heads 2, 3 and half its MLP; layer 1 keeps its
    heads: the compacted cache has 1 key/value head in layer 0 and 2 in layer 1."""
    q, kv, unit = _rows(64, slice(32, 64)), _rows(32, slice(16, 32)), _rows(96, slice(0, 48))
    p = "model.layers.0"
    return {f"{p}.self_attn.q_proj": {"weight": q[:, None].expand(64, 64).clone()},
            f"{p}.self_attn.k_proj": {"weight": kv[:, None].expand(32, 64).clone()},
            f"{p}.self_attn.v_proj": {"weight": kv[:, None].expand(32, 64).clone()},
            f"{p}.self_attn.o_proj": {"weight": q[None, :].expand(64, 64).clone()},
            f"{p}.mlp.gate_proj": {"weight": unit[:, None].expand(96, 64).clone()},
            f"{p}.mlp.up_proj": {"weight": unit[:, None].expand(96, 64).clone()},
            f"{p}.mlp.down_proj": {"weight": unit[None, :].expand(64, 96).clone()}}


def _gpt2_masks(model) -> dict:
    head = _rows(64, slice(16, 32))  # head 1 of 4, in q, k and v of the fused c_attn
    qkv = torch.cat([head, head, head])
    return {f"transformer.h.{i}.attn.c_attn": {"weight": qkv[None, :].expand(64, 192).clone(), "bias": qkv.clone()}
            for i in range(2)} | {f"transformer.h.{i}.attn.c_proj": {"weight": head[:, None].expand(64, 64).clone()}
                                  for i in range(2)}


@pytest.mark.parametrize(("build", "make_masks"), [(_llama, _llama_masks), (_gpt2, _gpt2_masks)],
                         ids=["llama-gqa", "gpt2"])
def test_compacted_decoder_generates_the_same_tokens_in_onnxruntime(build, make_masks, tmp_path) -> None:
    model = build()
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(3))
    res = dp.compact(model, {"input_ids": ids}, make_masks(model))
    assert res.compacted and res.params_after < res.params_before
    small = res.model
    exp = export_decoder(small, tmp_path)
    assert exp.prefill.is_file() and exp.with_past.is_file()
    assert not list(tmp_path.glob("*.data"))  # small models: weights inside each file
    prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(4))
    same, ref, got = check_generation(small, exp, prompt, new_tokens=20)
    assert same, f"torch {ref.tolist()} vs onnxruntime {got.tolist()}"
    assert got.shape == (1, 25)
    assert len(set(got[0, 5:].tolist())) > 2  # a real sequence, not one repeated token


def test_exported_prefill_matches_torch_logits_at_other_lengths(tmp_path) -> None:
    import onnxruntime as ort

    model = _llama()
    exp = export_decoder(model, tmp_path)
    sess = ort.InferenceSession(str(exp.prefill), providers=["CPUExecutionProvider"])
    for shape in ((1, 3), (3, 11)):
        ids = torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(sum(shape)))
        mask = torch.ones_like(ids)
        got = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
        assert np.abs(got - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1.0)
