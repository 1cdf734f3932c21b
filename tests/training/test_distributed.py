from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_process_torchrun_ends_with_identical_masks_and_weights(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["masks"] == r1["masks"]
    assert r0["weights"] == r1["weights"]
    # 64 samples / 2 ranks / batch 8 = 4 steps per epoch, 2 epochs
    assert r0["step"] == r1["step"] == r0["global_step"] == 8
    assert r0["val_accuracy"] == r1["val_accuracy"]
    assert r0["sparsity"]["3.weight"] == pytest.approx(0.7, abs=1e-3)
    assert r0["sparsity"]["0.weight"] == pytest.approx(0.5, abs=1e-3)  # 2 of 4 channels
    assert r0["sparsity"]["0.bias"] == pytest.approx(0.5)
    # rank 1 computed the same masks as rank 0 by itself (weights kept in sync by DDP):
    # the broadcast of rank 0's pruner state after each update replaced nothing
    assert r1["mask_sync_differences"] == 0
    # only rank 0 wrote a checkpoint, and nothing else is left in the directory
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.pt"]
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 2
