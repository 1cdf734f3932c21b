"""The Pruner on the real libraries' code: what it prunes at target 0.5 and what finalize then removes.

Run from the repository root (needs the test extras: transformers, timm, torchvision)::

    python -m benchmarks.pruner_real            # markdown table on stdout

Models are those of ``tests/real`` (tiny configs, random init; nothing downloaded). Per model and
granularity: ``Pruner(model, config, example_inputs).prepare()`` with one ``target_sparsity`` of 0.5
(``channel``: every Linear/Conv, GPT-2's Conv1D too; ``head``: every Linear by head), then
``deployprune.finalize.compact`` of its masks. Columns: groups pruned, masked channels removed of
masked, parameters before and after, and the Pruner's note when it pruned nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> int:
    import logging

    logging.basicConfig(level=logging.ERROR)
    from deployprune.finalize import compact
    from deployprune.pruning import Pruner
    from tests.real import vision_models as V
    from tests.real.hf_models import SEQ, architectures

    channel = {"global_config": {"granularity": "channel", "target_sparsity": 0.5},
               "module_type_configs": {"Conv1D": {"granularity": "channel", "target_sparsity": 0.5}}}
    heads = {"module_type_configs": {t: {"granularity": "head", "target_sparsity": 0.5} for t in ("Linear", "Conv1D")}}
    rows = []

    def one(name: str, model, inputs, config, kind: str) -> None:
        t0 = time.perf_counter()
        p = Pruner(model, config, inputs)
        p.prepare()
        groups = [t for t in p.targets if t.kind == "group"]
        if not groups:
            why = sorted({line.split("not prunable: ")[-1].split("kept: ")[-1].strip()
                          for line in p.summary().splitlines()[2:] if "not prunable" in line or "kept:" in line})
            rows.append(f"| {name} | {kind} | 0 | - | - | {'; '.join(why)[:160]} |")
            return
        res = compact(p.model, inputs, p.masks())
        rows.append(f"| {name} | {kind} | {len(groups)} | {res.removed_channels:,} of {res.masked_channels:,} | "
                    f"{res.params_before:,} -> {res.params_after:,} | {time.perf_counter() - t0:.1f} s |")

    for name, arch in architectures().items():
        for kind, config in (("channel", channel), ("head", heads)):
            if kind == "head" and "heads" not in arch.kinds:
                continue
            one(f"transformers {name}", arch.build(arch.impls[0]), arch.inputs(1, SEQ, 0), config, kind)
    for spec in V.SPECS:
        one(spec.id, V.build(spec), V.inputs(spec, 1, 0), channel, "channel")
    print("| model | granularity | groups pruned | masked channels removed | params | note / time |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
