"""Training on several processes with :class:`~torch.nn.parallel.DistributedDataParallel`.

Launch with ``torchrun --nproc_per_node=K -m gnn_transformer.cli train ...`` (or any launcher
that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``). Every process builds the
same model from the same seed, draws its own batches (seed 1000 · seed + rank) and DDP averages the gradients,
so the replicas stay identical. CPU uses the ``gloo`` backend, CUDA ``nccl``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> DistInfo:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as set by ``torchrun`` (defaults: one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"Inconsistent RANK={rank} / WORLD_SIZE={world} in the environment")
    return DistInfo(rank, world, local)


def setup(info: DistInfo, device: str) -> str:
    """Start the process group (``gloo`` on CPU, ``nccl`` on CUDA); returns this rank's device."""
    if not info.enabled:
        return device
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
        device = f"cuda:{info.local_rank}"
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)
    return device


def wrap(model: nn.Module, info: DistInfo, device: str) -> nn.Module:
    """``model`` wrapped in DDP when running on several processes, else unchanged."""
    if not info.enabled:
        return model
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
