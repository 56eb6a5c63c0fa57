"""Rank, world size and the few collectives the engine uses, in one place.

Every helper is a no-op (rank 0 of a world of 1) when ``torch.distributed`` is not initialised,
so the same code runs in one process and under ``torchrun`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["active", "all_reduce", "barrier", "broadcast_object", "init_from_env", "rank_world"]


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if active():
        dist.barrier()


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks in place (no-op in one process); returns ``t``."""
    if active():
        dist.all_reduce(t)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; no-op in one process)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def init_from_env(device: str) -> bool:
    """Under torchrun (``$WORLD_SIZE`` > 1) start the process group if none is running: NCCL
    (on ``cuda:$LOCAL_RANK``) when ``device`` is ``cuda...`` or ``auto`` with CUDA, else gloo.
    Returns whether this call started it (the caller then destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True
