"""Library models as they are called: keyword inputs and ModelOutput results through compact, export
and validate, with no wrapper written by the user (issue 11)."""

from __future__ import annotations

import onnx
import pytest
import torch

import deployprune as dp
from deployprune._compat import tolerate_missing_torchvision_ops

tolerate_missing_torchvision_ops()
T = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")

pytestmark = pytest.mark.real

H, INTER, HEAD = 64, 128, 16


def _bert():
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=100, hidden_size=H, intermediate_size=INTER, num_hidden_layers=2,
                       num_attention_heads=4)
    return T.BertModel(cfg).eval()


def _masks() -> dict:
    """Half of every MLP, and head 2 of 4, each as the whole coupled group."""
    unit = torch.ones(INTER)
    unit[::2] = 0
    head = torch.ones(H)
    head[2 * HEAD:3 * HEAD] = 0
    masks = {}
    for i in range(2):
        p = f"encoder.layer.{i}"
        masks[f"{p}.intermediate.dense"] = {"weight": unit[:, None].expand(INTER, H).clone(), "bias": unit.clone()}
        masks[f"{p}.output.dense"] = {"weight": unit[None, :].expand(H, INTER).clone()}
        for q in ("query", "key", "value"):
            masks[f"{p}.attention.self.{q}"] = {"weight": head[:, None].expand(H, H).clone(), "bias": head.clone()}
        masks[f"{p}.attention.output.dense"] = {"weight": head[None, :].expand(H, H).clone()}
    return masks


def _inputs(batch: int = 1, seq: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[:, seq - 3:] = 0  # padding
    return {"input_ids": torch.randint(0, 100, (batch, seq), generator=g), "attention_mask": mask}


def test_compact_takes_keyword_inputs_and_compares_model_outputs() -> None:
    model = _bert()
    res = dp.compact(model, _inputs(), _masks(), strict=True)
    assert res.compacted
    per_layer = (INTER // 2) * (H + 1) + (INTER // 2) * H + 3 * HEAD * (H + 1) + HEAD * H
    assert res.params_before - res.params_after == 2 * per_layer
    masked = _bert()
    from deployprune.masks import apply_masks_, normalize_masks

    apply_masks_(masked, normalize_masks(masked, _masks()))
    fresh = _inputs(batch=2, seq=9, seed=5)
    with torch.no_grad():
        ref, got = masked(**fresh), res.model(**fresh)
    assert isinstance(got, T.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions)
    for name in ("last_hidden_state", "pooler_output"):
        err = (ref[name] - got[name]).abs().max() / ref[name].abs().max()
        assert err <= 1e-5, (name, float(err))


def test_export_and_validate_take_keyword_inputs(tmp_path) -> None:
    model = _bert()
    path = dp.export(model, _inputs(), tmp_path / "bert.onnx", masks=_masks())
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    masked = _bert()
    from deployprune.masks import apply_masks_, normalize_masks

    apply_masks_(masked, normalize_masks(masked, _masks()))
    report = dp.validate(masked, path, _inputs(), latency=False)
    assert report.passed, report.to_json()
    # the artifact is the compacted model: its first MLP has half the units
    inits = {i.name: tuple(i.dims) for i in graph.initializer}
    assert any(dims in ((INTER // 2, H), (H, INTER // 2)) for dims in inits.values()), inits
