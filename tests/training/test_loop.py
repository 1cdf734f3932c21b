from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deployprune as dp
from deployprune.errors import ConfigError, OutputError
from deployprune.training import CHECKPOINT_NAME, evaluate, finetune, import_object

CONFIG = {
    "module_type_configs": {"Conv2d": {"target_sparsity": 0.5}, "Linear": {"target_sparsity": 0.6}},
    "schedule": {"type": "polynomial", "begin_step": 0, "end_step": 12, "frequency": 2},
}


class Net(nn.Module):
    """Small conv net with dropout, so the torch RNG matters for exact resume."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(self.drop(x.flatten(1)))


def _data(n: int = 96):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator())
    val = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=32)
    return train, val


def _fresh():
    torch.manual_seed(0)
    model = Net()
    pruner = dp.Pruner(model, CONFIG, (torch.zeros(1, 1, 8, 8),))
    return model, pruner


def _state(model: nn.Module, pruner) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in model.state_dict().items()}
    for m, per in pruner.masks().items():
        for p, t in per.items():
            out[f"mask:{m}.{p}"] = t
    return out


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_interrupted_then_resumed_run_is_bit_identical(tmp_path):
    kw = dict(epochs=3, optimizer="torch.optim.SGD", optimizer_kwargs={"lr": 0.05, "momentum": 0.9},
              lr_scheduler="torch.optim.lr_scheduler.StepLR", lr_scheduler_kwargs={"step_size": 4, "gamma": 0.8},
              lr_scheduler_interval="step", progress=False, seed=3)
    model, pruner = _fresh()
    train, val = _data()
    full = finetune(model, pruner, train, val, checkpoint_dir=tmp_path / "full", **kw)
    reference = _state(model, pruner)
    ref_rng = (torch.get_rng_state(), random.random(), np.random.rand())

    # the second run dies in the middle of epoch 2 (after the epoch-1 checkpoint)
    model2, pruner2 = _fresh()
    train2, val2 = _data()
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == len(train2) + 3:
            raise KeyboardInterrupt

    handle = model2.register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        finetune(model2, pruner2, train2, val2, checkpoint_dir=tmp_path / "cut", **kw)
    handle.remove()
    saved = torch.load(tmp_path / "cut" / CHECKPOINT_NAME, weights_only=True)
    assert saved["epoch"] == 1 and saved["global_step"] == len(train2)

    # resume in a fresh model/pruner/loader (as a new process would)
    torch.manual_seed(123)  # whatever the global state, the checkpoint's RNG state wins
    model3, pruner3 = _fresh()
    train3, val3 = _data()
    resumed = finetune(model3, pruner3, train3, val3, checkpoint_dir=tmp_path / "cut", resume=True, **kw)
    assert resumed.resumed_from_epoch == 1
    assert resumed.global_step == full.global_step == 3 * len(train)
    _assert_identical(reference, _state(model3, pruner3))
    assert pruner3.step_count == pruner.step_count == 18
    assert (torch.equal(ref_rng[0], torch.get_rng_state()), ref_rng[1], ref_rng[2]) == (
        True, random.random(), np.random.rand())
    assert [h["val_accuracy"] for h in resumed.history] == [h["val_accuracy"] for h in full.history]
    assert resumed.history[-1]["lr"] == pytest.approx(0.05 * 0.8 ** (18 // 4))
    # the masks reached the configured sparsity at the end of the schedule
    masks = pruner3.masks()
    assert abs(float((~masks["conv"]["weight"]).float().mean()) - 0.5) < 0.03
    assert abs(float((~masks["fc"]["weight"]).float().mean()) - 0.6) < 0.01


def test_checkpoint_not_overwritten_without_resume_or_force(tmp_path):
    model, pruner = _fresh()
    train, val = _data(32)
    finetune(model, pruner, train, val, epochs=1, checkpoint_dir=tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    model, pruner = _fresh()
    with pytest.raises(OutputError, match="already exists; pass --resume"):
        finetune(model, pruner, train, val, epochs=1, checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def test_resume_with_another_seed_is_refused(tmp_path):
    model, pruner = _fresh()
    train, val = _data(32)
    finetune(model, pruner, train, val, epochs=1, checkpoint_dir=tmp_path, progress=False, seed=1)
    model, pruner = _fresh()
    with pytest.raises(ConfigError, match="seed 1, not 2"):
        finetune(model, pruner, train, val, epochs=2, checkpoint_dir=tmp_path, resume=True, progress=False, seed=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "torch.optim.Adamm"},
         "optimizer 'torch.optim.Adamm': module 'torch.optim' has no attribute 'Adamm'"),
        ({"optimizer": "no_such_pkg.Opt"}, "optimizer 'no_such_pkg.Opt': cannot import module 'no_such_pkg'"),
        ({"criterion": "torch.nn.CrossEntropyLos"}, "criterion 'torch.nn.CrossEntropyLos': module 'torch.nn' has no"),
        ({"criterion": "Adam"}, "criterion 'Adam': not an import path"),
        ({"optimizer_kwargs": {"lrr": 0.1}}, "optimizer torch.optim.Adam: cannot be created with {'lrr': 0.1}"),
        ({"lr_scheduler": "torch.optim.lr_scheduler.StepLR"},
         "lr_scheduler torch.optim.lr_scheduler.StepLR: cannot be created with {} (TypeError"),
        ({"lr_scheduler": "torch.optim.lr_scheduler.StepLR", "lr_scheduler_kwargs": {"step_size": 1},
          "lr_scheduler_interval": "batch"}, "lr_scheduler_interval: expected 'epoch' or 'step', got 'batch'"),
    ],
)
def test_bad_import_paths_fail_before_training(kwargs, message):
    model, pruner = _fresh()
    train, val = _data(32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        finetune(model, pruner, train, val, epochs=1, progress=False, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_import_object_forms():
    assert import_object("torch.optim.SGD", "optimizer") is torch.optim.SGD
    assert import_object("torch.nn:CrossEntropyLoss", "criterion") is nn.CrossEntropyLoss
    with pytest.raises(ConfigError, match="is a TorchVersion, not a class or function"):
        import_object("torch.__version__", "optimizer")


def test_training_recovers_accuracy_and_steps_schedule_per_optimizer_step():
    torch.manual_seed(0)
    x = torch.randn(256, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long()  # a learnable rule
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator())
    val = DataLoader(TensorDataset(x, y), batch_size=256)
    model = Net()
    model.drop.p = 0.0
    pruner = dp.Pruner(model, CONFIG, (x[:1],))
    result = finetune(model, pruner, train, val, epochs=12, optimizer_kwargs={"lr": 0.01}, progress=False)
    assert pruner.step_count == result.global_step == 12 * 8
    assert [h["step"] for h in result.history] == list(range(8, 97, 8))
    assert result.final_val_accuracy is not None and result.final_val_accuracy > 0.8  # chance: about 0.5
    assert result.final_val_accuracy > result.history[0]["val_accuracy"]
    ev = evaluate(model, val, nn.CrossEntropyLoss())
    assert ev["accuracy"] == pytest.approx(result.final_val_accuracy)
    assert ev["loss"] == pytest.approx(result.final_val_loss, rel=1e-5)
    # trained weights under the masks stay zero in the effective weights
    assert torch.all(model.fc.weight[~pruner.masks()["fc"]["weight"]] == 0)
