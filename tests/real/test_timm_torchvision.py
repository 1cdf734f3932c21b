"""Finalize on timm's and torchvision's own model code: every masked channel group is removed.

For each model (tests/real/vision_models.py) the masks are what a pruner makes from deployprune's group
API: half of the removable channels of every group ``dp.finalize.channel_groups`` offers, every
producer slice zeroed, so removing them is exact. Then:

* parity: the compacted model equals the masked model (relative error <= 1e-5) on fresh inputs
  at batch 1 and 2;
* size: every parameter has the shape that removing the masked groups gives, computed without
  finalize's graph (tests/real/expected.py), so the parameter count is that of the ideal removal;
* reporting: compaction happened and no masked channel was kept; the groups channel_groups
  declines are declined only for the reasons listed per model (docs/finalize.md);
* ONNX: for a few models the exported artifact passes ``dp.validate`` against the masked model.

timm, torchvision and onnxruntime are test dependencies: a missing one fails the module import.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.fx
from timm.layers import BatchNormAct2d

import deployprune as dp

from ..finalize.helpers import RTOL, param_shapes, relative_error
from .vision_models import SPECS, case, inputs, seed_of

pytestmark = pytest.mark.real

IDS = [s.id for s in SPECS]
ONNX_IDS = ["timm/efficientnet_b0", "timm/vit_tiny_patch16_224", "tv/mobilenet_v3_small"]


@pytest.mark.parametrize("spec_id", IDS)
def test_parity_on_fresh_inputs(spec_id: str) -> None:
    c = case(spec_id)
    errors = []
    with torch.no_grad():
        for batch in (1, 2):
            for k in range(2):
                x = inputs(c.spec, batch, seed_of(spec_id, "fresh", str(batch), str(k)))
                ref, out = c.reference(*x), c.result.model(*x)
                errors.append(relative_error(ref, out))
        # the masked model is not degenerate: its output depends on the input well beyond the tolerance
        # (RepVGG's deploy form with half of every layer masked is the closest, at about 20x)
        a, b = (c.reference(*inputs(c.spec, 1, seed_of(spec_id, "spread", str(k)))) for k in range(2))
        assert relative_error(a, b) > 10 * RTOL, f"{spec_id}: the output hardly depends on the input"
    assert max(errors) <= RTOL, f"{spec_id}: relative errors {errors}"


@pytest.mark.parametrize("spec_id", IDS)
def test_every_masked_group_is_removed(spec_id: str) -> None:
    c = case(spec_id)
    got = param_shapes(c.result.model)
    wrong = {name: (shape, got.get(name)) for name, shape in c.expected.items() if got.get(name) != shape}
    assert not wrong, (f"{spec_id}: {len(wrong)} parameter(s) differ from removing the masked groups "
                       f"(name: (expected, compacted)): {dict(list(wrong.items())[:8])}")
    assert c.result.params_after == c.expected_params
    assert c.result.params_after < 0.8 * c.result.params_before  # the masks covered most of the model


@pytest.mark.parametrize("spec_id", IDS)
def test_compacted_and_no_masked_channel_kept(spec_id: str) -> None:
    c = case(spec_id)
    r = c.result
    assert r.compacted, f"{spec_id}: {r.abandoned}"
    assert not r.kept, f"{spec_id}: " + "; ".join(k.describe() for k in r.kept)
    assert r.masked_channels > 0 and r.removed_channels == r.masked_channels
    declined = {g.reason for g in c.groups if not g.prunable}
    assert declined <= set(c.spec.declined), f"{spec_id}: groups declined for {declined - set(c.spec.declined)}"
    assert len(c.removed) == sum(g.prunable for g in c.groups)


@pytest.mark.parametrize("spec_id", ONNX_IDS)
def test_onnx_artifact_matches_the_masked_model(spec_id: str, tmp_path) -> None:
    c = case(spec_id)
    path = dp.export(c.result.model, c.example, tmp_path / "model.onnx")
    report = dp.validate(c.reference, path, c.example, n_inputs=3, latency=False)
    assert report.passed, f"{spec_id}: max abs error {report.max_abs_error}"


def test_vit_heads_are_removed_and_num_heads_patched() -> None:
    c = case("timm/vit_tiny_patch16_224")
    head_groups = [g for g in c.groups if g.unit == "head" and g.id in c.removed]
    assert len(head_groups) == 12  # one per block: 3 heads, one of them masked
    attn = c.result.model.blocks[0].attn
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * attn.head_dim
    assert ("blocks.0.attn", "num_heads", 3, 2) in [tuple(p) for p in c.result.patched_attributes]


def test_norm_act_layers_shrink_with_num_features() -> None:
    """timm's BatchNormAct2d reaches the graph as F.batch_norm; its parameters, running statistics and
    num_features shrink together."""
    c = case("timm/efficientnet_b0")
    dense = dict(c.model.named_modules())
    layers = [(n, m) for n, m in c.result.model.named_modules() if isinstance(m, BatchNormAct2d)]
    assert layers
    for _, m in layers:
        assert m.num_features == m.weight.numel() == m.bias.numel() == m.running_mean.numel() \
            == m.running_var.numel()
    shrunk = [n for n, m in layers if m.num_features < dense[n].num_features]
    assert len(shrunk) > len(layers) // 2


def test_levit_compacted_model_pickles_without_trace_leftovers() -> None:
    """LeViT caches attention biases on the module in eval mode; tracing must not leave Proxies there."""
    c = case("timm/levit_128s")
    proxies = [n for n, m in c.result.model.named_modules() for v in vars(m).values()
               if isinstance(v, torch.fx.Proxy) or isinstance(v, dict) and any(
                   isinstance(x, torch.fx.Proxy) for x in v.values())]
    assert not proxies
    buf = io.BytesIO()
    torch.save(c.result.model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = inputs(c.spec, 2, seed_of("levit", "pickle"))
    with torch.no_grad():
        assert torch.equal(loaded(*x), c.result.model(*x))


def test_repvgg_both_forms() -> None:
    """Train form: identity branches tie every block of a stage to one stream. Deploy form (one conv per
    block after timm's reparameterize_model): every block's output is a group of its own."""
    train, deploy = case("timm/repvgg_a0"), case("timm/repvgg_a0-deploy")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.model.modules())
    assert len(deploy.removed) > 3 * len(train.removed)
