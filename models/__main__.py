"""``python -m deployprune.zoo [TAG]``: print the registered models as a Markdown table.

Parameter counts are taken on the meta device (nothing is allocated), so full-size models
are listed instantly.
"""

from __future__ import annotations

import sys

import torch

from . import get, names


def table(tag: str | None = None) -> str:
    rows = [
        "| name | family | input | params | tags | exercises |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    for name in names(tag):
        spec = get(name)
        with torch.device("meta"):
            model = spec.factory()
        params = sum(p.numel() for p in model.parameters())
        shapes = ", ".join(
            "x".join(str(d) for d in i.shape) + ("" if i.dtype == torch.float32 else f" {str(i.dtype)[6:]}")
            for i in spec.inputs
        )
        rows.append(
            f"| `{name}` | {spec.family} | {shapes} | {params:,} | {', '.join(spec.tags)} | {spec.description} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else None))
