"""Fine-tuning that drives the pruning schedule (single process or torch.distributed).

See ``docs/training.md``. Public names: :func:`finetune`, :class:`TrainResult`,
:func:`evaluate`, :func:`import_object`, :func:`prune_loaded`, :func:`run_scenario`.
"""

from __future__ import annotations

from .loop import CHECKPOINT_NAME, TrainResult, evaluate, finetune, import_object
from .run import PruneOutcome, prune_loaded, run_scenario

__all__ = [
    "CHECKPOINT_NAME",
    "PruneOutcome",
    "TrainResult",
    "evaluate",
    "finetune",
    "import_object",
    "prune_loaded",
    "run_scenario",
]
