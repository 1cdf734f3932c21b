"""A model factory whose *import* has a side effect: it creates the file named by
``DP_HOSTILE_SENTINEL``. A checkpoint naming it stands for a file that asks deployprune to import
attacker-chosen code; the hostile-input tests check the sentinel never appears.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

_SENTINEL = os.environ.get("DP_HOSTILE_SENTINEL")
if _SENTINEL:
    Path(_SENTINEL).write_text("imported")


def build() -> nn.Module:
    return nn.Linear(2, 2)
