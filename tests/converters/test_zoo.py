"""Every zoo architecture through both converters (slow: about four minutes on two cores).

ONNX: the dense model and the channel-pruned, compacted one (deployprune.finalize); each file
passes onnx.checker's full check and matches torch in onnxruntime within 1e-4 of the output
scale, on the example inputs and a random batch like them.
Core ML: the compacted model with 50% of every conv/linear weight zeroed passes the read-back
verification (sparse constants decoded and compared with the torch weights).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import deployprune as dp
from deployprune import converters, zoo
from deployprune.converters.coreml import verify_coreml
from deployprune.converters.onnx import onnxruntime_outputs

from .conftest import magnitude_prune_

pytestmark = pytest.mark.slow

ZOO = zoo.names("zoo")
CHANNEL_CONFIG = [{"op_types": ["Conv1d", "Conv2d", "Linear"], "sparse_ratio": 0.5, "granularity": "out_channel"}]


@functools.cache
def compacted(name: str) -> torch.nn.Module:
    model = zoo.build(name)
    inputs = zoo.example_inputs(name)
    pruner = dp.Pruner(model, CHANNEL_CONFIG, inputs)
    pruner.prepare()
    return dp.finalize(model, inputs, pruner.masks()).eval()


def input_sets(name: str) -> list[tuple[torch.Tensor, ...]]:
    example = zoo.example_inputs(name)
    g = torch.Generator().manual_seed(7)
    other = []
    for t in example:
        if t.is_floating_point():
            other.append(torch.randn(t.shape, generator=g, dtype=t.dtype))
        else:
            other.append(torch.randint(0, int(t.max()) + 1, t.shape, generator=g, dtype=t.dtype))
    return [example, tuple(other)]


def assert_onnx_matches(path: Path, model: torch.nn.Module, name: str) -> None:
    onnx.checker.check_model(str(path), full_check=True)
    for inputs in input_sets(name):
        with torch.no_grad():
            ref = model(*inputs)
        refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        got = onnxruntime_outputs(path, inputs)
        assert len(got) == len(refs)
        for r, g in zip(refs, got, strict=True):
            r = r.numpy()
            err = float(np.max(np.abs(r - g)))
            assert err <= 1e-4 * max(float(np.max(np.abs(r))), 1e-6), (name, err)


@pytest.mark.parametrize("name", ZOO)
def test_onnx_dense_and_compacted(tmp_path: Path, name: str) -> None:
    dense_model = zoo.build(name)
    dense = converters.get("onnx").convert(dense_model, zoo.example_inputs(name), tmp_path / "dense.onnx")
    # the default dynamo exporter handles every zoo model (no torchscript fallback, no warning)
    assert dense.warnings == [] and dense.metadata["opset"] == 18 and dense.metadata["exporter"] == "dynamo"
    assert_onnx_matches(dense.path, dense_model, name)

    compact_model = compacted(name)
    compact = converters.get("onnx").convert(compact_model, zoo.example_inputs(name), tmp_path / "compact.onnx")
    assert compact.warnings == [] and compact.metadata["exporter"] == "dynamo"
    assert_onnx_matches(compact.path, compact_model, name)
    assert compact.size_bytes < dense.size_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compact.onnx", "dense.onnx"]


@pytest.mark.parametrize("name", ZOO)
def test_coreml_compacted_and_sparse(tmp_path: Path, name: str) -> None:
    import copy

    model = magnitude_prune_(copy.deepcopy(compacted(name)), 0.5, min_elements=16)
    inputs = zoo.example_inputs(name)
    path = tmp_path / f"{name}.mlpackage"
    result = converters.get("coreml").convert(model, inputs, path)
    v = result.metadata["verification"]
    assert v["passed"], v["failures"]
    assert v["weights_checked"] > 0
    big = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv1d | torch.nn.Linear)
           and m.weight.numel() > 2048]
    assert v["sparse_constants"] >= len(big) > 0 or not big
    assert result.metadata["weight_file_bytes"] <= result.metadata["dense_weight_file_bytes"]
    # an independent read-back from the final location agrees
    again = verify_coreml(path, model, inputs, expect_sparse=True)
    assert again.passed, again.failures
