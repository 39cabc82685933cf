"""Host tensors onto the device without making the host wait.

A plain `.to("cuda")` of pageable host memory synchronises the stream: the host waits for every
kernel queued before it. A training step moves a few small host tensors per step (the batch's
indices, masks, crop and colour parameters), so each such copy would be a sync per step. Pinned
memory copied with `non_blocking=True` is queued like a kernel instead (PyTorch's pinned-memory
allocator keeps the buffer until the copy has run).
"""
from __future__ import annotations

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """`tensor` on `device`: from the host to a GPU pinned and asynchronous, else `.to(device)`."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
