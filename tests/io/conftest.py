from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from deployprune import zoo
from tests.io.factories import tiny_conv

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "models" / "samples"


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (directories as entries too)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


@pytest.fixture
def lenet() -> torch.nn.Module:
    return zoo.build("lenet")


@pytest.fixture
def lenet_sd(tmp_path: Path, lenet: torch.nn.Module) -> Path:
    path = tmp_path / "lenet_sd.pt"
    torch.save(lenet.state_dict(), path)
    return path


@pytest.fixture
def tiny_sd(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.pt"
    torch.save(tiny_conv().state_dict(), path)
    return path


@pytest.fixture
def tutorial_masks(lenet: torch.nn.Module) -> dict:
    mask = torch.ones_like(lenet.conv1.weight)
    mask[0:3] = 0
    return {"conv1": {"weight": mask}}
