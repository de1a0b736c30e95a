"""Multi-process training on torch.distributed, started by torchrun (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Newer torch renames DDP's per-forward buffer broadcast; the old name still works but warns.
_SYNC_BUFFERS = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else "broadcast_buffers"
)


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" picks this process's GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return device


def setup(device_name: str) -> tuple[Topology, torch.device]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size == 1:
        return Topology(), device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Topology(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def wrap(model: nn.Module, topology: Topology, device: torch.device, broadcast_buffers: bool) -> nn.Module:
    """DistributedDataParallel around `model` when there is more than one process."""
    if not topology.distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **{_SYNC_BUFFERS: broadcast_buffers})


def all_sum(values: list[float], topology: Topology, device: torch.device) -> list[float]:
    """Sum a few numbers over all processes (for epoch metrics)."""
    if not topology.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def average_buffers(tensors: list[torch.Tensor], topology: Topology) -> None:
    """Replace each tensor by its mean over all processes, in place."""
    if not topology.distributed:
        return
    for tensor in tensors:
        dist.all_reduce(tensor)
        tensor.div_(topology.world_size)


def teardown(topology: Topology) -> None:
    if topology.owns_group and dist.is_initialized():
        dist.destroy_process_group()
