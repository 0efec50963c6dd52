"""The trainer's processes: joining the launcher's group, who is who, and reducing metrics over ranks.

One process or many (``deepspeed``, ``torchrun`` or ``accelerate launch`` set the usual ``RANK`` /
``WORLD_SIZE`` variables).
"""

from __future__ import annotations

import os
from typing import TypeVar

import deepspeed
import torch
import torch.distributed as dist

from shared.launch import free_port

T = TypeVar("T")


def init_distributed() -> None:
    """Join the launcher's process group; a plain ``python`` run is a group of one."""
    for name, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def broadcast_from_rank0(value: T) -> T:
    """Rank 0's ``value`` on every rank; pickled, which is safe only between this run's own processes."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_from_ranks(value: T) -> list[T]:
    """Every rank's ``value``, in rank order; pickled, which is safe only between this run's own processes."""
    if world_size() == 1:
        return [value]
    gathered: list[T] = [value] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks (the same keys on every rank)."""
    if world_size() == 1:
        return values
    keys = sorted(values)
    total = sum_over_ranks(torch.tensor([values[k] for k in keys], dtype=torch.float64))
    return {k: float(v) / world_size() for k, v in zip(keys, total.tolist(), strict=True)}


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over the ranks (the same shape on every rank), on the CPU."""
    if world_size() == 1:
        return tensor
    # NCCL reduces GPU tensors only.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    reduced = tensor.to(device, copy=True)
    dist.all_reduce(reduced)
    return reduced.cpu()
