"""Decoder-only language models (transformers' ``*ForCausalLM``) to ONNX, with and without a KV cache.

A generating model needs two graphs, as onnxruntime users deploy them:

* ``decoder.onnx`` (prefill): ``input_ids``, ``attention_mask`` -> ``logits``, ``present.{i}.key``,
  ``present.{i}.value`` for every layer;
* ``decoder_with_past.onnx`` (one step): the same plus ``past.{i}.key``/``past.{i}.value`` in.

Both are exported with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``; the TorchScript
exporter cannot export these models: ``aten::diff``), with dynamic batch, sequence and past lengths,
and weights inside each file (``external_data=False``) below 2 GB, beside it above. The cache is
passed as plain tensors: a small wrapper builds transformers' ``DynamicCache`` from them and returns
the updated one flattened, so the graphs need no cache object. Compacted models whose layers have
different numbers of key/value heads work unchanged: every cache tensor has its own shape.

:func:`greedy_generate` runs the two graphs in onnxruntime; :func:`check_generation` compares its
tokens with ``model.generate(do_sample=False)`` token for token.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

TWO_GB = 2 * 1024**3


class _Step(nn.Module):
    """``model`` with the KV cache as flat tensors: (ids, mask, k0, v0, k1, v1, ...) -> (logits, k0', v0', ...)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        import inspect

        # transformers 5.x renames the argument (``past_key_values`` -> ``cache``); use what forward takes
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True))) if past else DynamicCache()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{self.cache_arg: cache})
        new = getattr(out, "cache", None) or out.past_key_values
        flat = [t for layer in new.layers for t in (layer.keys, layer.values)]
        return (out.logits, *flat)


@dataclass
class DecoderExport:
    prefill: Path
    with_past: Path
    n_layers: int
    input_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


def _export(module: nn.Module, args: tuple, dynamic: tuple, in_names: list[str], out_names: list[str],
            path: Path, params_bytes: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, None, dynamo=True, dynamic_shapes=dynamic, input_names=in_names,
                                    output_names=out_names, opset_version=18)
    program.save(str(path), external_data=params_bytes >= TWO_GB)


def export_decoder(model: nn.Module, out_dir: str | Path, *, vocab_size: int | None = None,
                   seq: int = 8, past: int = 5) -> DecoderExport:
    """Export ``model`` (a transformers causal LM, eval mode) to ``out_dir``/decoder.onnx and
    ``out_dir``/decoder_with_past.onnx. ``seq``/``past`` are the example lengths traced with (any length
    works afterwards: the sequence, past and batch dimensions are dynamic)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    vocab = vocab_size or int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab <= 0:
        raise ValueError("export_decoder: the model has no config.vocab_size; pass vocab_size=")
    step = _Step(model)
    g = torch.Generator().manual_seed(0)
    batch = 2  # an example batch of 1 would be specialized into the graph
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    with torch.no_grad():
        present = step(ids, torch.ones(batch, seq, dtype=torch.long))[1:]
    n_layers = len(present) // 2
    params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    B = torch.export.Dim("batch", min=1, max=1024)
    S = torch.export.Dim("sequence", min=1, max=8192)
    P = torch.export.Dim("past", min=1, max=8192)
    prefill = out / "decoder.onnx"
    _export(step, (ids, torch.ones(batch, seq, dtype=torch.long)),
            ({0: B, 1: S}, {0: B, 1: S}), ["input_ids", "attention_mask"], ["logits", *_names(n_layers, "present")],
            prefill, params_bytes)
    # one step with a cache: the example past comes from a real prefill, cut to ``past`` positions
    past_t = tuple(t[:, :, :past].contiguous() for t in present)
    one = torch.randint(0, vocab, (batch, 1), generator=g)
    mask = torch.ones(batch, past + 1, dtype=torch.long)
    total = P + 1
    dyn = ({0: B}, {0: B, 1: total}, tuple({0: B, 2: P} for _ in past_t))  # *past is one tuple input
    with_past = out / "decoder_with_past.onnx"
    _export(step, (one, mask, *past_t), dyn, ["input_ids", "attention_mask", *_names(n_layers, "past")],
            ["logits", *_names(n_layers, "present")], with_past, params_bytes)
    return DecoderExport(prefill=prefill, with_past=with_past, n_layers=n_layers,
                         input_names=["input_ids", "attention_mask"])


def greedy_generate(export: DecoderExport, input_ids: np.ndarray, new_tokens: int,
                    providers: list[str] | None = None) -> np.ndarray:
    """Greedy decoding in onnxruntime: prefill once, then one cached step per new token."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    prov = providers or ["CPUExecutionProvider"]
    pre = ort.InferenceSession(str(export.prefill), opts, providers=prov)
    step = ort.InferenceSession(str(export.with_past), opts, providers=prov)
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids)
    outs = pre.run(None, {"input_ids": ids, "attention_mask": mask})
    tokens = ids
    for _ in range(new_tokens):
        nxt = outs[0][:, -1, :].argmax(-1).astype(np.int64)[:, None]
        tokens = np.concatenate([tokens, nxt], axis=1)
        mask = np.ones_like(tokens)
        feeds: dict[str, Any] = {"input_ids": nxt, "attention_mask": mask}
        feeds.update(dict(zip(_names(export.n_layers, "past"), outs[1:], strict=True)))
        outs = step.run(None, feeds)
    return tokens


def check_generation(model: nn.Module, export: DecoderExport, input_ids: torch.Tensor,
                     new_tokens: int = 20) -> tuple[bool, np.ndarray, np.ndarray]:
    """Whether onnxruntime's greedy tokens equal ``model.generate(do_sample=False)``'s, token for token."""
    with torch.no_grad():
        ref = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0).numpy()
    got = greedy_generate(export, input_ids.numpy(), new_tokens)
    return bool(ref.shape == got.shape and (ref == got).all()), ref, got
