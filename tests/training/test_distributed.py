"""torchrun with 2 CPU processes (gloo): DDP keeps every rank's W, M and D identical through merges."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_processes_stay_identical_through_a_merge(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               str(WORKER), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["merges"] == ranks[1]["merges"] == 1
    first, second = ranks[0]["state"], ranks[1]["state"]
    assert any(key.endswith(".M") for key in first) and any(key.endswith(".D") for key in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert (tmp_path / "run" / "model_dense.pt").is_file()  # written once, by rank 0
