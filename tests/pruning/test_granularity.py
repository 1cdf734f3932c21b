"""Every criterion x granularity reaches the configured sparsity per layer, with the right units."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deployprune as dp
from deployprune.pruning import pruner as pruner_module

from .conftest import TinyAttention, cnn_batches, head_groups

ELEMENTWISE = ("l1", "l2", "taylor", "random")
ALL = ("l1", "l2", "fpgm", "bn_scale", "taylor", "apoz", "mean_activation", "random")


def mlp_data(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 20, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def make(model, cfg, inputs=None, **kw) -> dp.Pruner:
    kw.setdefault("data", mlp_data() if inputs is None else cnn_batches())
    kw.setdefault("loss_fn", nn.functional.cross_entropy)
    p = dp.Pruner(model, cfg, inputs, **kw)
    p.prepare()
    return p


def half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@pytest.mark.parametrize("criterion", ELEMENTWISE)
@pytest.mark.parametrize("sparsity", [0.3, 0.55, 0.8])
def test_element(mlp, criterion: str, sparsity: float) -> None:
    p = make(mlp, {"target_sparsity": sparsity, "criterion": criterion})
    masks = p.masks()
    assert set(masks) == {"fc1", "fc2", "fc3"}
    for name, per in masks.items():
        m = per["weight"]
        assert int((~m).sum()) == half_up(sparsity * m.numel()), name
    for row in p.report():
        assert abs(row.sparsity - sparsity) <= 1 / (2 * getattr(mlp, row.name).weight.numel()) + 1e-12


def test_element_l1_prunes_the_smallest_magnitudes(mlp) -> None:
    p = make(mlp, {"target_sparsity": 0.6})
    for name, per in p.masks().items():
        w = getattr(mlp, name).parametrizations.weight.original.detach().abs()
        m = per["weight"]
        assert w[~m].max() <= w[m].min()


@pytest.mark.parametrize("criterion", ELEMENTWISE)
def test_block(mlp, criterion: str) -> None:
    p = make(mlp, {"target_sparsity": 0.5, "criterion": criterion, "granularity": "block", "block_size": [2, 4]})
    for name, per in p.masks().items():
        m = per["weight"].float()
        rows, cols = m.shape
        pad = nn.functional.pad(m, (0, (-cols) % 4, 0, (-rows) % 2), value=-1)
        blocks = pad.reshape(-(-rows // 2), 2, -(-cols // 4), 4).permute(0, 2, 1, 3).reshape(-1, 8)
        real = blocks >= 0
        zero_blocks = ((blocks == 0) | ~real).all(1)
        one_blocks = ((blocks == 1) | ~real).all(1)
        assert bool((zero_blocks | one_blocks).all()), f"{name}: a block is partly masked"
        assert int(zero_blocks.sum()) == half_up(0.5 * blocks.shape[0]), name


def test_block_matches_nni_example_semantics(mlp) -> None:
    # whole-dim blocks: [-1, 4] removes 4-column stripes; the L1-lowest stripes go first
    p = make(mlp, {"module_name_configs": {"fc2": {"target_sparsity": 0.25, "granularity": "block",
                                                   "block_size": [-1, 4]}}})
    m = p.masks()["fc2"]["weight"]
    w = mlp.fc2.parametrizations.weight.original.detach().abs()
    stripe_l1 = w.reshape(18, 8, 4).sum((0, 2))
    pruned = (~m).all(0).reshape(8, 4).all(1)
    assert int(pruned.sum()) == 2
    assert stripe_l1[pruned].max() <= stripe_l1[~pruned].min()


@pytest.mark.parametrize("criterion", ELEMENTWISE)
def test_n_m(mlp, cnn, cnn_inputs, criterion: str) -> None:
    p = make(mlp, {"granularity": "2:4", "criterion": criterion})
    masks = p.masks()
    fc1 = masks["fc1"]["weight"]  # 20 inputs: five full groups of 4 per row
    assert ((~fc1).reshape(32, 5, 4).sum(-1) == 2).all()
    assert int((~fc1).sum()) == fc1.numel() // 2
    fc3 = masks["fc3"]["weight"]  # 18 inputs: four groups of 4, then a tail of 2 with floor(2*2/4) = 1 zero
    assert ((~fc3[:, :16]).reshape(4, 4, 4).sum(-1) == 2).all()
    assert ((~fc3[:, 16:]).sum(-1) == 1).all()
    rep = {r.name: r for r in p.report()}
    assert rep["fc3"].target == pytest.approx(9 * 4 / 72)
    assert rep["fc3"].sparsity == pytest.approx(rep["fc3"].target)
    # conv weights: groups along the input-channel dim (dim 1) for each output channel and tap
    q = make(cnn, {"module_type_configs": {"Conv2d": {"granularity": "1:2", "criterion": criterion}}}, cnn_inputs)
    conv2 = q.masks()["conv2"]["weight"]  # 16 input channels
    assert ((~conv2).permute(0, 2, 3, 1).reshape(24, 3, 3, 8, 2).sum(-1) == 1).all()


@pytest.mark.parametrize("criterion", ALL)
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_channel(cnn, cnn_inputs, criterion: str, sparsity: float) -> None:
    p = make(cnn, {"target_sparsity": sparsity, "granularity": "channel", "criterion": criterion}, cnn_inputs,
             data=cnn_batches())
    masks = p.masks()
    assert set(masks) == {"conv1", "bn1", "conv2", "bn2"}  # fc feeds the output: never pruned
    for conv, bn, size in (("conv1", "bn1", 16), ("conv2", "bn2", 24)):
        rows = (~masks[conv]["weight"]).reshape(size, -1)
        pruned = rows.all(1)
        assert not (rows.any(1) & ~pruned).any(), "partial channel"
        assert int(pruned.sum()) == half_up(sparsity * size)
        # every producer slice of a removed channel is masked: conv bias, BN weight and bias
        for m in (masks[conv]["bias"], masks[bn]["weight"], masks[bn]["bias"]):
            assert torch.equal(~m, pruned)
    # exactness: the removed channels are exactly zero after the BatchNorm
    acts = {}
    cnn.bn1.register_forward_hook(lambda mod, i, o: acts.setdefault("bn1", o))
    with torch.no_grad():
        cnn(*cnn_inputs)
    pruned1 = (~masks["conv1"]["weight"]).reshape(16, -1).all(1)
    assert torch.count_nonzero(acts["bn1"][:, pruned1]) == 0
    compact = p.finalize()
    assert compact.conv1.out_channels == 16 - half_up(sparsity * 16)
    assert compact.conv2.in_channels == compact.conv1.out_channels
    assert compact.conv2.out_channels == 24 - half_up(sparsity * 24)
    with torch.no_grad():
        ref, out = cnn(*cnn_inputs), compact(*cnn_inputs)
    assert float((ref - out).abs().max() / ref.abs().max()) <= 1e-5


def test_bn_scale_prunes_smallest_gamma(cnn, cnn_inputs) -> None:
    p = make(cnn, {"target_sparsity": 0.5, "granularity": "channel", "criterion": "bn_scale"}, cnn_inputs)
    gamma = cnn.bn2.parametrizations.weight.original.detach().abs()
    pruned = ~p.masks()["bn2"]["weight"]
    assert int(pruned.sum()) == 12
    assert gamma[pruned].max() <= gamma[~pruned].min()


def test_apoz_and_mean_activation_find_dead_channels(cnn, cnn_inputs) -> None:
    dead = torch.tensor([1, 4, 9, 13])
    with torch.no_grad():
        cnn.bn1.bias.fill_(5.0)  # the others are (almost always) positive
        cnn.bn1.bias[dead] = -100.0  # relu(bn1(x)) is zero on these channels for any input
    for criterion in ("apoz", "mean_activation"):
        p = make(cnn, {"module_name_configs": {"conv1": {"target_sparsity": 0.25, "granularity": "channel",
                                                         "criterion": criterion}}},
                 cnn_inputs, data=[b[0] for b in cnn_batches()])
        pruned = torch.nonzero(~p.masks()["bn1"]["weight"]).reshape(-1)
        assert pruned.tolist() == dead.tolist(), criterion
        p.remove()


def test_taylor_scores_are_mean_abs_weight_times_grad(mlp) -> None:
    data = mlp_data(2)
    expected = torch.zeros_like(mlp.fc2.weight, dtype=torch.float64)
    for x, y in data:
        mlp.zero_grad()
        nn.functional.cross_entropy(mlp(x), y).backward()
        expected += (mlp.fc2.weight * mlp.fc2.weight.grad).abs().double().detach()
    expected /= len(data)
    mlp.zero_grad()
    p = make(mlp, {"module_name_configs": {"fc2": {"target_sparsity": 0.5, "criterion": "taylor"}}}, data=data)
    m = p.masks()["fc2"]["weight"]
    assert expected[~m].max() <= expected[m].min()


def test_fpgm_removes_filters_near_the_geometric_median(mlp) -> None:
    inputs = (torch.randn(1, 20),)
    p = make(mlp, {"module_name_configs": {"fc1": {"target_sparsity": 0.25, "granularity": "channel",
                                                   "criterion": "fpgm"}}}, inputs)
    w = mlp.fc1.parametrizations.weight.original.detach().double()
    dist = torch.cdist(w, w).sum(1)
    pruned = (~p.masks()["fc1"]["weight"]).all(1)
    assert int(pruned.sum()) == 8
    assert dist[pruned].max() <= dist[~pruned].min()


def test_random_is_seeded(mlp) -> None:
    a = make(mlp, {"target_sparsity": 0.5, "criterion": "random", "seed": 7}).masks()
    torch.manual_seed(123)  # the global RNG does not matter
    mlp2 = type(mlp)()
    mlp2.load_state_dict({k.replace("parametrizations.weight.original", "weight"): v
                          for k, v in mlp.state_dict().items() if not k.endswith(".mask")})
    b = make(mlp2, {"target_sparsity": 0.5, "criterion": "random", "seed": 7}).masks()
    c = make(type(mlp)(), {"target_sparsity": 0.5, "criterion": "random", "seed": 8}).masks()
    assert all(torch.equal(a[n]["weight"], b[n]["weight"]) for n in a)
    assert not all(torch.equal(a[n]["weight"], c[n]["weight"]) for n in a)


@pytest.mark.parametrize("criterion", ("l1", "l2", "fpgm", "taylor", "random"))
def test_heads(monkeypatch, criterion: str) -> None:
    torch.manual_seed(0)
    model = TinyAttention()
    x = (torch.randn(2, 5, 16),)
    data = [torch.randn(2, 5, 16) for _ in range(2)]
    monkeypatch.setattr(pruner_module, "find_channel_groups", lambda m, i: head_groups(m))
    p = make(model, {"module_type_configs": {"Linear": {"target_sparsity": 0.5, "granularity": "head",
                                                        "criterion": criterion}}},
             x, data=data, loss_fn=lambda out: out.pow(2).mean())
    masks = p.masks()
    assert set(masks) == {"q", "k", "v"}  # the consumer (o) is left to finalize
    rows = (~masks["q"]["weight"]).all(1).reshape(4, 4)
    assert rows.all(1).sum() == 2 and not (rows.any(1) & ~rows.all(1)).any()
    for name in ("k", "v"):
        assert torch.equal((~masks[name]["weight"]).all(1), rows.reshape(-1))
        assert torch.equal(~masks[name]["bias"], rows.reshape(-1))
    row, note = p.report()
    assert (row.name, row.channels_kept, row.channels_total, row.sparsity) == ("q", 2, 4, 0.5)
    assert note.name == "o" and note.note == "kept: the graph found no attention-head group produced by this layer"


def test_mask_consumers(monkeypatch) -> None:
    torch.manual_seed(0)
    model = TinyAttention()
    monkeypatch.setattr(pruner_module, "find_channel_groups", lambda m, i: head_groups(m))
    p = make(model, {"global_config": {"target_sparsity": 0.25, "granularity": "head"}, "mask_consumers": True},
             (torch.randn(1, 3, 16),))
    heads = (~p.masks()["q"]["weight"]).all(1)
    assert torch.equal((~p.masks()["o"]["weight"]).all(0), heads)


def test_global_ranking_element(cnn) -> None:
    cfg = {"module_type_configs": {"Conv2d": {"target_sparsity": 0.6, "global_group": "convs"}}}
    p = make(cnn, cfg)
    masks = p.masks()
    w = {n: getattr(cnn, n).parametrizations.weight.original.detach().abs() for n in ("conv1", "conv2")}
    pruned = torch.cat([w[n][~masks[n]["weight"]] for n in w])
    kept = torch.cat([w[n][masks[n]["weight"]] for n in w])
    total = sum(x.numel() for x in w.values())
    assert pruned.numel() == half_up(0.6 * total)
    assert pruned.max() <= kept.min()  # one threshold across both layers
    rows = {r.name: r.sparsity for r in p.report()}
    assert rows["conv1"] != rows["conv2"]


def test_global_ranking_respects_max_sparsity(cnn) -> None:
    with torch.no_grad():
        cnn.conv1.weight.mul_(1e-3)  # globally, conv1 would be pruned first and entirely
    cfg = {"module_type_configs": {"Conv2d": {"target_sparsity": 0.5, "global_group": "g", "max_sparsity": 0.7}}}
    rows = {r.name: r for r in make(cnn, cfg).report()}
    n1, n2 = cnn.conv1.weight.numel(), cnn.conv2.weight.numel()
    assert rows["conv1"].sparsity == pytest.approx(math.floor(0.7 * n1) / n1)
    zeros = rows["conv1"].sparsity * n1 + rows["conv2"].sparsity * n2
    assert round(zeros) == half_up(0.5 * (n1 + n2))


def test_global_max_sparsity_too_low_fails(cnn) -> None:
    cfg = {"module_type_configs": {"Conv2d": {"target_sparsity": 0.8, "global_group": "g", "max_sparsity": 0.5}}}
    with pytest.raises(dp.ConfigError, match="global_group 'g': sparsity 0.8 needs .* max_sparsity allows only"):
        make(cnn, cfg)


def test_global_ranking_channels(cnn, cnn_inputs) -> None:
    cfg = {"global_config": {"target_sparsity": 0.5, "granularity": "channel", "global_group": "all"}}
    rows = make(cnn, cfg, cnn_inputs).report()
    assert sum(r.channels_total - r.channels_kept for r in rows) == 20  # half of 16 + 24


def test_round_to(cnn, cnn_inputs) -> None:
    cfg = {"global_config": {"target_sparsity": 0.6, "granularity": "channel", "round_to": 8}}
    rows = {r.name: r for r in make(cnn, cfg, cnn_inputs).report()}
    # conv1: 16 * 0.6 -> prune 10, keep 6 -> kept rounded up to 8; conv2: keep 10 -> 16
    assert (rows["conv1"].channels_kept, rows["conv2"].channels_kept) == (8, 16)


def test_grouped_conv_removes_the_same_positions_in_every_group() -> None:
    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.c = nn.Conv2d(8, 5, 1)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    model = Grouped().eval()
    x = (torch.randn(1, 3, 6, 6),)
    p = make(model, {"module_name_configs": {"a": {"target_sparsity": 0.5, "granularity": "channel"}}}, x)
    pruned = torch.nonzero((~p.masks()["a"]["weight"]).reshape(8, -1).all(1)).reshape(-1).tolist()
    assert len(pruned) == 4
    assert sorted(pruned) == sorted({i % 4 for i in pruned} | {i % 4 + 4 for i in pruned})
    compact = p.finalize()
    assert (compact.a.out_channels, compact.b.in_channels) == (4, 4)
    with torch.no_grad():
        assert torch.allclose(model(*x), compact(*x), atol=1e-6)
