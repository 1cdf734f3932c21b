"""ONNX artifacts of Hugging Face transformers' own models that pass validation (issue 11).

For each of the 18 architectures (sdpa attention where the library has it, else its only implementation),
with half of every MLP and one attention head (or KV group) per layer masked: ``dp.export`` finalizes and
exports the model called with its keyword inputs, and ``dp.validate`` runs the ONNX file in onnxruntime
against the masked model on the example and on seeded random inputs. The random inputs give an
``attention_mask`` the shape of a tokenizer's padding (each row a run of ones); random 0/1 bits would mask
every key of some rows, whose outputs are undefined and differ between runtimes. The artifact holds no
more weights than the dense model's export minus every masked unit that compaction removes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import deployprune as dp
from deployprune.latency import random_inputs_like

from .hf_models import ARCHS, SEQ, expected_removed, masked_copy, masks_from

pytestmark = pytest.mark.real


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _weights(path) -> int:
    """Elements of the ONNX graph's floating initializers and Constant tensors (shape constants left out)."""
    model = onnx.load(str(path))
    tensors = list(model.graph.initializer) + [a.t for node in model.graph.node if node.op_type == "Constant"
                                               for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    return sum(int(np.prod(t.dims)) for t in tensors if t.data_type in _FLOATS)


def _random_vectors(model: torch.nn.Module) -> None:
    """Biases and norm weights drawn at random: the library initializes them to 0 and 1, which hides a bias
    that lost its place, and the ONNX optimizer stores equal tensors once, which hides a removed entry."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_pruned_onnx_artifact_passes_validation(name: str, tmp_path) -> None:
    arch = ARCHS[name]
    impl = "sdpa" if "sdpa" in arch.impls else arch.impls[0]
    model = arch.build(impl)
    _random_vectors(model)
    kinds = [k for k in ("mlp", "heads") if k in arch.kinds]
    cuts = [c for k in kinds for unit in arch.kinds[k](model) for c in unit]
    exact = [c for k in kinds if k not in arch.kept_kinds for unit in arch.kinds[k](model) for c in unit]
    masks = masks_from(model, cuts)
    example = arch.inputs(1, SEQ, 0)
    path = dp.export(model, example, tmp_path / f"{name}.onnx", masks=masks)
    report = dp.validate(masked_copy(model, masks), path, example, n_inputs=4, latency=False)
    assert report.passed, f"{name} ({impl}): {report.failures}"
    assert report.inputs.count == 4
    removed = expected_removed(model, exact)  # Phi-3's fused-qkv heads are kept (and reported): MLP only
    assert removed > 0
    dense = _weights(dp.export(model, example, tmp_path / f"{name}-dense.onnx"))
    assert dense - _weights(path) >= removed, (
        f"{name}: the artifact holds {_weights(path):,} weights, the dense export {dense:,}: "
        f"{dense - _weights(path):,} fewer, but {removed:,} were masked")


def test_random_attention_masks_are_padding_masks() -> None:
    example = (torch.randint(0, 100, (1, 12)), torch.ones(1, 12, dtype=torch.long), torch.randn(1, 12))
    gen = torch.Generator().manual_seed(0)
    ids, mask, x = random_inputs_like(example, gen, batch_size=6, names=["input_ids", "attention_mask", "x"])
    assert mask.dtype == torch.long and mask.shape == (6, 12)
    assert mask[0].all(), "the first row is unpadded"
    lengths = mask.sum(1)
    assert (lengths >= 1).all(), "no row has every position masked"
    for row, n in zip(mask, lengths, strict=True):
        assert row[:n].all() and not row[n:].any(), row  # ones, then padding
    assert len(set(lengths.tolist())) > 1, "the rows are padded differently"
    # without a name the tensor is treated as integers like the example (0/1 bits), as before
    _, bits, _ = random_inputs_like(example, torch.Generator().manual_seed(0), batch_size=6)
    assert set(bits.unique().tolist()) <= {0, 1}


def test_dense_sdpa_decoder_validates_with_its_attention_mask(tmp_path) -> None:
    """GPT-2 with sdpa attention, exported dense: random 0/1 attention masks made validation fail (rows with
    every key masked are undefined); padding masks agree to rounding."""
    model = ARCHS["gpt2"].build("sdpa")
    example = ARCHS["gpt2"].inputs(1, SEQ, 0)
    path = dp.export(model, example, tmp_path / "gpt2.onnx")
    report = dp.validate(model, path, example, n_inputs=6, latency=False)
    assert report.passed, report.failures
    assert report.max_rel_error < 1e-5
