"""Pruner lifecycle: prepare/step/masks/report/finalize, files, exact resume, removal, extension points."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import deployprune as dp
from deployprune import zoo
from deployprune.errors import InputError, MaskError, OutputError, UnsafeFileError, UsageError
from deployprune.masks import extract_attached_masks
from deployprune.pruning import (
    CRITERIA,
    AllocationRequest,
    Criterion,
    SparsityAllocator,
    register_allocator,
    register_criterion,
)

from .conftest import MLP


def train_steps(model, pruner, opt, batches, *, start: int = 0, stop: int | None = None) -> None:
    for x, y in batches[start:stop]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()


def mlp_batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 20, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def test_masked_training_keeps_pruned_weights_out(mlp) -> None:
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)  # made before prepare: same parameter objects
    pruner = dp.Pruner(mlp, {"target_sparsity": 0.5})
    assert pruner.prepare() is mlp
    mask = pruner.masks()["fc1"]["weight"]
    before = mlp.fc1.parametrizations.weight.original.detach().clone()
    train_steps(mlp, pruner, opt, mlp_batches(3))
    after = mlp.fc1.parametrizations.weight.original.detach()
    assert torch.equal(after[~mask], before[~mask])  # masked entries get no gradient
    assert not torch.equal(after[mask], before[mask])  # the optimizer still trains the rest
    assert torch.count_nonzero(mlp.fc1.weight[~mask]) == 0
    masks = pruner.masks()
    assert {k: set(v) for k, v in masks.items()} == {"fc1": {"weight"}, "fc2": {"weight"}, "fc3": {"weight"}}
    assert all(m.dtype == torch.bool for per in masks.values() for m in per.values())
    attached = extract_attached_masks(mlp)  # finalize's reader recognises the parametrizations
    assert all(torch.equal(attached[n]["weight"], masks[n]["weight"]) for n in masks)


def test_usage_errors(mlp) -> None:
    pruner = dp.Pruner(mlp, {"target_sparsity": 0.5})
    for call in (pruner.step, pruner.masks, pruner.report, pruner.state_dict):
        with pytest.raises(UsageError, match="call pruner.prepare\\(\\) first"):
            call()
    with pytest.raises(UsageError, match="model must be a torch.nn.Module"):
        dp.Pruner("model.pt", {"target_sparsity": 0.5})
    pruner.prepare()
    with pytest.raises(UsageError, match="finalize: pass example_inputs"):
        pruner.finalize()
    with pytest.raises(UsageError, match="already carries deployprune masks"):
        dp.Pruner(mlp, {"target_sparsity": 0.3}).prepare()


def test_mnist_tutorial_flow_reaches_70_and_80_percent() -> None:
    """coremltools magnitude-pruning tutorial: conv 70 %, dense 80 %, polynomial schedule."""
    model = zoo.build("mnist_net")
    model.train()
    config = {
        "module_type_configs": {"Conv2d": {"target_sparsity": 0.7}, "Linear": {"target_sparsity": 0.8}},
        "schedule": {"type": "polynomial", "begin_step": 0, "end_step": 8, "frequency": 2},
    }
    pruner = dp.Pruner(model, config, zoo.example_inputs("mnist_net"))
    pruner.prepare()
    opt = torch.optim.Adam(model.parameters(), eps=1e-7)
    g = torch.Generator().manual_seed(0)
    seen = []
    for step in range(1, 11):
        x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        nn.functional.nll_loss(model(x), y).backward()
        opt.step()
        pruner.step()
        rows = {r.name: r for r in pruner.report()}
        seen.append((rows["conv"].sparsity, rows["dense"].sparsity))
        for name, target, numel in (("conv", 0.7, 108), ("dense", 0.8, 23520)):
            scheduled = target * (1 - (1 - min(step - step % 2, 8) / 8) ** 3)
            assert rows[name].scheduled == pytest.approx(scheduled)
            assert abs(rows[name].sparsity - scheduled) <= 0.5 / numel + 1e-12, (step, name)
    conv, dense = seen[7]  # step 8 = end step
    assert round(conv * 108) == 76 and dense == 0.8  # 0.7 * 108 = 75.6 -> 76 weights; 0.8 * 23520 exactly
    assert seen[9] == seen[7]  # stays there
    compact = pruner.finalize()
    with torch.no_grad():
        x = zoo.example_inputs("mnist_net")[0]
        model.eval()
        assert torch.allclose(compact(x), model(x), atol=1e-5)
    assert not any(parametrize.is_parametrized(m) for m in compact.modules())
    assert parametrize.is_parametrized(model.conv)  # the pruned model is untouched
    assert int((compact.dense.weight == 0).sum()) == 18816


def test_exclude_last_layer_finds_the_output_layer(caplog) -> None:
    model = zoo.build("mnist_net")  # dense is followed by a LogSoftmax module
    pruner = dp.Pruner(model, {"target_sparsity": 0.5, "exclude_last_layer": True}, zoo.example_inputs("mnist_net"))
    pruner.prepare()
    assert set(pruner.masks()) == {"conv"}
    rows = {r.name: r for r in pruner.report()}
    assert rows["dense"].note == "last layer kept dense (exclude_last_layer)" and rows["dense"].sparsity == 0
    assert tuple(zoo.get("mnist_net").output_layers) == ("dense",)

    class TwoHeads(nn.Module):  # both outputs come from a Linear: both are kept
        def __init__(self) -> None:
            super().__init__()
            self.body, self.a, self.b, self.unused_late = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 3), None

        def forward(self, x):
            h = self.body(x)
            return {"a": self.a(h), "b": self.b(h)}

    p = dp.Pruner(TwoHeads(), {"target_sparsity": 0.5, "exclude_last_layer": True}, (torch.randn(1, 4),))
    p.prepare()
    assert set(p.masks()) == {"body"}
    with caplog.at_level(logging.WARNING):
        q = dp.Pruner(MLP(), {"target_sparsity": 0.5, "exclude_last_layer": True})
        q.prepare()
    assert set(q.masks()) == {"fc1", "fc2"} and "no example_inputs" in caplog.text


def test_save_and_load_masks(tmp_path: Path, mlp) -> None:
    pruner = dp.Pruner(mlp, {"target_sparsity": 0.5})
    pruner.prepare()
    path = pruner.save_masks(tmp_path / "masks.pt")
    loaded = dp.Pruner.load_masks(path)
    assert all(torch.equal(loaded[n]["weight"], pruner.masks()[n]["weight"]) for n in loaded)
    with pytest.raises(OutputError, match="already exists; pass --force"):
        pruner.save_masks(path)
    pruner.save_masks(path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.pt"]  # no temporary left behind
    with pytest.raises(InputError, match="no such file; check the masks file path"):
        dp.Pruner.load_masks(tmp_path / "missing.pt")
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as f:
        pickle.dump({"fc1": {"weight": object()}}, f, protocol=2)
    with pytest.raises(UnsafeFileError, match="evil.pt: loading it would run code from the file") as info:
        dp.Pruner.load_masks(evil)
    assert info.value.exit_code == 3
    torch.save({"fc1": {"weight": [1, 0]}}, tmp_path / "bad.pt")
    with pytest.raises(MaskError, match="fc1.weight is a list, not a tensor"):
        dp.Pruner.load_masks(tmp_path / "bad.pt")
    torch.save(pruner.state_dict(), tmp_path / "state.pt")
    assert set(dp.Pruner.load_masks(tmp_path / "state.pt")) == {"fc1", "fc2", "fc3"}
    # the masks drive dp.finalize directly
    fresh = MLP()
    fresh.load_state_dict({k.replace("parametrizations.weight.original", "weight"): v
                           for k, v in mlp.state_dict().items() if not k.endswith("mask")})
    x = torch.randn(2, 20)
    out = dp.finalize(fresh, (x,), loaded)
    with torch.no_grad():
        assert torch.allclose(out(x), mlp(x), atol=1e-6)  # mlp is still the masked model


@pytest.mark.parametrize("criterion", ["l1", "taylor", "random"])
def test_resume_is_exact(tmp_path: Path, criterion: str) -> None:
    config = {"target_sparsity": 0.6, "criterion": criterion,
              "schedule": {"type": "polynomial", "begin_step": 2, "end_step": 10, "frequency": 2}}
    batches = mlp_batches(12)

    def fresh():
        torch.manual_seed(0)
        model = MLP()
        pruner = dp.Pruner(model, config)
        pruner.prepare()
        return model, pruner, torch.optim.Adam(model.parameters(), lr=0.01)

    model_a, pruner_a, opt_a = fresh()
    train_steps(model_a, pruner_a, opt_a, batches)

    model_b, pruner_b, opt_b = fresh()
    train_steps(model_b, pruner_b, opt_b, batches, stop=5)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "pruner": pruner_b.state_dict()}, ckpt)
    state = torch.load(ckpt, weights_only=True)
    model_c, pruner_c, opt_c = fresh()
    model_c.load_state_dict(state["model"])
    opt_c.load_state_dict(state["opt"])
    pruner_c.load_state_dict(state["pruner"])
    assert pruner_c.step_count == 5
    train_steps(model_c, pruner_c, opt_c, batches, start=5)

    for name, per in pruner_a.masks().items():
        assert torch.equal(per["weight"], pruner_c.masks()[name]["weight"])
    for (ka, va), (kc, vc) in zip(model_a.state_dict().items(), model_c.state_dict().items(), strict=True):
        assert ka == kc and torch.equal(va, vc), ka


def test_state_loaded_before_prepare_replaces_step_zero_masks(mlp) -> None:
    pruner = dp.Pruner(mlp, {"target_sparsity": 0.5, "criterion": "random", "seed": 1})
    pruner.prepare()
    state = pruner.state_dict()
    pruner.remove()
    other = dp.Pruner(mlp, {"target_sparsity": 0.5, "criterion": "random", "seed": 2})
    other.load_state_dict(state)
    other.prepare()
    assert all(torch.equal(other.masks()[n]["weight"], state["masks"][n]["weight"]) for n in state["masks"])


def test_state_from_another_config_is_rejected(mlp) -> None:
    pruner = dp.Pruner(mlp, {"target_sparsity": 0.5})
    pruner.prepare()
    state = pruner.state_dict()
    pruner.remove()
    other = dp.Pruner(mlp, {"target_sparsity": 0.5, "exclude": ["fc3"]})
    other.prepare()
    with pytest.raises(MaskError, match="masks do not match this config .*unexpected \\['fc3.weight'\\]"):
        other.load_state_dict(state)
    with pytest.raises(InputError, match="expected the dict written by Pruner.state_dict"):
        other.load_state_dict({"masks": {}})


def test_remove_keeps_masked_values(mlp) -> None:
    pruner = dp.Pruner(mlp, {"target_sparsity": 0.5})
    pruner.prepare()
    x = torch.randn(3, 20)
    with torch.no_grad():
        masked = mlp(x)
    masks = pruner.masks()
    assert pruner.remove() is mlp
    assert not any(parametrize.is_parametrized(m) for m in mlp.modules())
    assert type(mlp.fc1) is nn.Linear
    with torch.no_grad():
        assert torch.equal(mlp(x), masked)
    assert torch.count_nonzero(mlp.fc1.weight[~masks["fc1"]["weight"]]) == 0
    assert torch.equal(pruner.masks()["fc1"]["weight"], masks["fc1"]["weight"])


def test_finalize_leaves_the_pruned_model_working(cnn, cnn_inputs) -> None:
    pruner = dp.Pruner(cnn, {"target_sparsity": 0.5, "granularity": "channel"}, cnn_inputs)
    pruner.prepare()
    compact = pruner.finalize()
    with torch.no_grad():  # a deepcopy + strip must not break the parametrized original
        assert torch.allclose(cnn(*cnn_inputs), compact(*cnn_inputs), atol=1e-5)
    rows = pruner.report()
    assert [(r.name, r.channels_kept, r.channels_total) for r in rows] == [
        ("conv1", 8, 16), ("conv2", 12, 24), ("fc", 10, 10)]
    assert rows[0].note.startswith("coupled group") and "conv1" in pruner.summary()


def test_report_lists_blocked_layers(cnn, cnn_inputs) -> None:
    pruner = dp.Pruner(cnn, {"target_sparsity": 0.5, "granularity": "channel"}, cnn_inputs)
    pruner.prepare()
    rows = {r.name: r for r in pruner.report()}
    assert rows["fc"].note == "not prunable: model output" and rows["fc"].channels_kept == 10


class _UnknownOpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.special.erfcx(self.conv(x)))  # an op with no propagation rule


def test_note_for_a_layer_kept_by_an_op_without_a_rule_names_the_op() -> None:
    pruner = dp.Pruner(_UnknownOpNet(), {"target_sparsity": 0.5, "granularity": "channel"},
                       (torch.randn(1, 3, 8, 8),))
    pruner.prepare()
    rows = {r.name: r for r in pruner.report()}
    note = rows["conv"].note
    assert note.startswith("not prunable: no propagation rule for this op") and rows["conv"].channels_kept == 8
    assert "special_erfcx" in note and "node special_erfcx" in note, note


def test_nni_style_compress(mlp) -> None:
    model, masks = dp.Pruner(mlp, [{"op_types": ["Linear"], "sparse_ratio": 0.5}]).compress()
    assert model is mlp and set(masks) == {"fc1", "fc2", "fc3"}


def test_taylor_from_training_gradients(mlp) -> None:
    config = {"target_sparsity": 0.5, "criterion": "taylor",
              "schedule": {"type": "polynomial", "begin_step": 3, "end_step": 6, "frequency": 3}}
    pruner = dp.Pruner(mlp, config)
    pruner.prepare()
    train_steps(mlp, pruner, torch.optim.SGD(mlp.parameters(), lr=0.01), mlp_batches(6))
    assert all(abs(r.sparsity - 0.5) < 1e-2 for r in pruner.report())


def test_taylor_without_gradients_at_update_time(mlp) -> None:
    config = {"target_sparsity": 0.5, "criterion": "taylor", "schedule": {"type": "constant", "begin_step": 1}}
    pruner = dp.Pruner(mlp, config)
    pruner.prepare()
    with pytest.raises(UsageError, match="taylor criterion: no gradients seen yet"):
        pruner.step()  # no backward happened


def test_a_new_criterion_in_a_few_lines(mlp) -> None:
    @register_criterion("test_l3_cubed", replace=True)
    class L3(Criterion):
        def element_scores(self, view):
            return view.tensor.abs() ** 3

    assert "test_l3_cubed" in CRITERIA
    a = dp.Pruner(mlp, {"target_sparsity": 0.5, "criterion": "test_l3_cubed"}).compress()[1]
    mlp2 = MLP()
    mlp2.load_state_dict({k.replace("parametrizations.weight.original", "weight"): v
                          for k, v in mlp.state_dict().items() if not k.endswith("mask")})
    b = dp.Pruner(mlp2, {"target_sparsity": 0.5}).compress()[1]
    assert all(torch.equal(a[n]["weight"], b[n]["weight"]) for n in a)  # |w|^3 ranks like |w|


def test_a_new_allocator(mlp) -> None:
    @register_allocator("test_keep_first_rows", replace=True)
    class KeepFirst(SparsityAllocator):
        def allocate(self, requests: list[AllocationRequest]) -> dict[str, torch.Tensor]:
            out = {}
            for r in requests:
                keep = torch.ones(r.units, dtype=torch.bool)
                keep[r.units - round(r.sparsity * r.units):] = False
                out[r.name] = keep
            return out

    masks = dp.Pruner(mlp, {"target_sparsity": 0.25, "allocator": "test_keep_first_rows"}).compress()[1]
    w = masks["fc2"]["weight"].reshape(-1)
    assert w[:432].all() and not w[432:].any()
