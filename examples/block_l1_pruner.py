"""NNI's "Customize Basic Pruner" tutorial (a block-L1-norm pruner) rebuilt on deployprune.

NNI splits a pruner into a data collector, a metrics calculator and a sparsity allocator. The
same three pieces exist here:

1. data collection -- the weights. A criterion reads each layer's current (masked) weight from
   its view, so no collector is needed; criteria that need activations or gradients declare one
   (``Criterion.collector``, see ``deployprune/pruning/collectors.py``).
2. metric -- :class:`BlockNormMetric`: the L1 norm of every block, computed with ``unfold``.
3. sparsity allocation -- :class:`BlockThresholdAllocator`: rank the block metrics, mask the
   blocks at or below the threshold. Expanding a block mask to the weight's shape is the job
   of the ``block`` granularity (NNI's ``_expand_mask``).

Run ``python examples/block_l1_pruner.py`` to print the masks of the tutorial's two-layer model.
deployprune's built-in ``{"granularity": "block", "block_size": [2, 2], "criterion": "l1"}``
does the same in one line of config; this file shows how to write your own pieces.
"""

from __future__ import annotations

import torch

from deployprune.pruning import (
    AllocationRequest,
    Criterion,
    ParamView,
    Pruner,
    PrunerConfig,
    SparsityAllocator,
    register_allocator,
    register_criterion,
)


@register_criterion("block_l1_example", replace=True)
class BlockNormMetric(Criterion):
    """L1 norm per block. Like the tutorial, it assumes every weight dim divides by its block size."""

    granularities = ("block",)

    def block_scores(self, view: ParamView, block_size: tuple[int, ...]) -> torch.Tensor:
        t = view.tensor.abs()
        for dim, size in enumerate(block_size):
            t = t.unfold(dim, size, size)  # (..., blocks along dim, ..., size)
        n = len(block_size)
        return t.sum(dim=tuple(range(n, 2 * n)))


@register_allocator("block_threshold_example", replace=True)
class BlockThresholdAllocator(SparsityAllocator):
    """Per layer: mask the ``int(sparsity * blocks)`` lowest blocks (threshold as in the tutorial).

    Blocks masked at an earlier update get metric 0 so they stay masked (NNI's continuous mask).
    """

    def allocate(self, requests: list[AllocationRequest]) -> dict[str, torch.Tensor]:
        keeps = {}
        for r in requests:
            metric = torch.where(r.prior_keep, r.scores, torch.zeros_like(r.scores))
            prune_num = int(r.sparsity * metric.numel())
            if prune_num == 0:
                keeps[r.name] = torch.ones(metric.numel(), dtype=torch.bool)
                continue
            threshold = torch.topk(metric, prune_num, largest=False).values.max()
            keeps[r.name] = metric > threshold
        return keeps


def block_l1_pruner(model: torch.nn.Module, config_list: list[dict], block_sparse_size: list[int]) -> Pruner:
    """The tutorial's ``BlockL1NormPruner(model, config_list, block_sparse_size)``."""
    entries = [{**entry, "granularity": "block", "block_size": block_sparse_size, "criterion": "block_l1_example"}
               for entry in config_list]
    return Pruner(model, PrunerConfig.from_nni(entries, allocator="block_threshold_example"))


class TestModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.fc2 = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def main() -> None:
    model = TestModel()
    # The tutorial's allocator applies 'total_sparsity' to each layer; so does this one.
    _, masks = block_l1_pruner(model, [{"op_types": ["Linear"], "total_sparsity": 0.5}], [2, 2]).compress()
    print("fc1 masks:\n", masks["fc1"]["weight"].float())
    print("fc2 masks:\n", masks["fc2"]["weight"].float())


if __name__ == "__main__":
    main()
