"""examples/block_l1_pruner.py: NNI's customize-pruner tutorial rebuilt on the pruning API."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deployprune as dp

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "block_l1_pruner.py"


@pytest.fixture(scope="module")
def example():
    name = "deployprune_example_block_l1"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def blocks(mask: torch.Tensor) -> torch.Tensor:
    r, c = mask.shape
    return mask.reshape(r // 2, 2, c // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)


def test_masks_are_half_of_the_2x2_blocks_with_the_lowest_l1(example) -> None:
    torch.manual_seed(0)
    model = example.TestModel()
    _, masks = example.block_l1_pruner(model, [{"op_types": ["Linear"], "total_sparsity": 0.5}], [2, 2]).compress()
    for name in ("fc1", "fc2"):
        m = blocks(masks[name]["weight"])
        assert bool(((m.all(1)) | (~m.any(1))).all()), "each 2x2 block is all kept or all pruned"
        pruned = ~m.all(1)
        assert int(pruned.sum()) == m.shape[0] // 2
        l1 = blocks(getattr(model, name).parametrizations.weight.original.detach().abs()).sum(1)
        assert l1[pruned].max() <= l1[~pruned].min()


def test_same_masks_as_the_built_in_block_granularity(example) -> None:
    torch.manual_seed(1)
    a = example.TestModel()
    b = example.TestModel()
    b.load_state_dict(a.state_dict())
    _, custom = example.block_l1_pruner(a, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], [2, 2]).compress()
    _, builtin = dp.Pruner(b, {"target_sparsity": 0.5, "granularity": "block", "block_size": [2, 2]}).compress()
    for name in ("fc1", "fc2"):
        assert torch.equal(custom[name]["weight"], builtin[name]["weight"])


def test_gradual_schedule_keeps_earlier_blocks_pruned(example) -> None:
    torch.manual_seed(2)
    model = example.TestModel()
    entries = [{"op_types": ["Linear"], "sparse_ratio": 0.75, "granularity": "block", "block_size": [2, 2],
                "criterion": "block_l1_example"}]
    config = dp.pruning.PrunerConfig.from_nni(entries, allocator="block_threshold_example",
                                              schedule={"type": "linear", "end_step": 3})
    pruner = dp.Pruner(model, config)
    pruner.prepare()
    previous = pruner.masks()["fc1"]["weight"]
    for _ in range(3):
        with torch.no_grad():
            model.fc1.parametrizations.weight.original.add_(torch.randn(8, 4))  # scores change between updates
        pruner.step()
        current = pruner.masks()["fc1"]["weight"]
        assert not (current & ~previous).any()  # no pruned block comes back
        previous = current
    assert int((~blocks(previous).all(1)).sum()) == 6  # 0.75 of 8 blocks


def test_script_runs() -> None:
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, check=True)
    assert "fc1 masks:" in out.stdout and "fc2 masks:" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.strip().startswith(("tensor([[", "["))]
    assert len(rows) == 12  # 8 rows of fc1 and 4 of fc2
