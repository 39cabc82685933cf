"""Distributed data parallel through torchrun: NCCL on GPUs, gloo on CPUs.

    torchrun --nproc_per_node N -m suites.run ablation_masking --profile gpu

Every rank builds the same global batch from the same step seed and keeps its own slice,
so the data order stays exactly resumable. A run's result depends on the number of processes
only through floating-point summation order, each rank's own drop-path draws, and losses
averaged over a rank's masked patches (equal to the global mean when every image masks the
same number of patches, as MAE's and the random/grid masks do). Rank 0 alone writes files.
Per step the ranks agree on whether a stop signal came (over a CPU gloo group: no device
sync), and at flush points on whether a loss was non-finite, so they all take the same branch; a trainable's `synced_buffers` (iBOT's centres) are averaged
over ranks after each step, so every rank holds the same value.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


COLLECTIVE_TIMEOUT_HOURS = 48


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (no-op when run plainly)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # rank 0 runs a run's evaluations alone (a fine-tune can take hours) while the other
        # ranks wait for it in a barrier: the default 10-30 min would end them
        dist.init_process_group(backend, timeout=timedelta(hours=COLLECTIVE_TIMEOUT_HOURS))
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
    tensor = _flags_tensor([flag])
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def _flags_tensor(flags) -> torch.Tensor:
    tensor = torch.tensor([int(f) for f in flags])
    return tensor.cuda() if dist.get_backend() == "nccl" else tensor


_HOST_GROUP: list = []     # [the process group host flags are agreed in], made on first use


def on_any_rank_host(*flags: bool) -> tuple[bool, ...]:
    """`on_any_rank` over CPU tensors (a gloo group beside NCCL's): the ranks wait for each other
    but not for their devices, so a training step can agree on a stop signal every step
    without a host-device sync. Every rank must call it at the same points (the first call
    makes the group, collectively)."""
    if not dist.is_initialized():
        return flags
    if not _HOST_GROUP:
        _HOST_GROUP.append(None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    tensor = torch.tensor([int(f) for f in flags])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_HOST_GROUP[0])
    return tuple(bool(v) for v in tensor.tolist())


def on_any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag, True on every rank when it is True on at least one (one all-reduce for all)."""
    if not dist.is_initialized():
        return flags
    tensor = _flags_tensor(flags)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in tensor.tolist())


def average_buffers(module: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Average the named buffers of `module` over processes, in place (no-op when run plainly).
    The trainer calls it after each `after_step` on a Trainable's `synced_buffers`."""
    if not names or not dist.is_initialized():
        return
    for name in names:
        buffer = module.get_buffer(name)
        dist.all_reduce(buffer)
        buffer /= dist.get_world_size()
