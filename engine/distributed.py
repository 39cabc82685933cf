"""Distributed data parallel through torchrun: NCCL on GPUs, gloo on CPUs.

    torchrun --nproc_per_node N -m suites.run ablation_masking --profile gpu

Every rank builds the same global batch from the same step seed and keeps its own slice,
so the data order stays exactly resumable and a run's result does not depend on how many
processes ran it (up to floating-point summation order). Rank 0 alone writes files.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (no-op when run plainly)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def default_device(requested: str | None = None) -> str:
    """`requested`, else this process's GPU (LOCAL_RANK under torchrun), else the CPU."""
    if requested:
        return requested
    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's value of `flag` on every rank (so all ranks take the same branch)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([int(flag)])
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())
