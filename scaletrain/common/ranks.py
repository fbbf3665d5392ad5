"""Rank helpers that work with and without a process group (one process: rank 0 of 1)."""

from __future__ import annotations

import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) when none is up."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier(world: int) -> None:
    """Wait for every rank when there is more than one."""
    if world > 1:
        dist.barrier()
