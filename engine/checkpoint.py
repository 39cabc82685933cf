"""Checkpoints: written to a temp file and renamed; the newest readable one is used.

A checkpoint is a plain dict of tensors and numbers saved with `torch.save` and read
back with `weights_only=True` (no pickled code is ever executed). The last `keep`
checkpoints stay on disk, so a truncated newest file falls back to the one before; the
temp files of writes cut short by a kill are removed at the next save.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from core.files import atomic_write

PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointMismatch(Exception):
    """A checkpoint written for another config."""


def checkpoint_paths(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, newest (highest step) first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{step:08d}.pt"
    with atomic_write(path, "wb") as f:     # temp file .ckpt-<step>.pt.tmp<pid>, then renamed
        torch.save(state, f)
    for old in checkpoint_paths(folder)[keep:]:
        old.unlink(missing_ok=True)
    # a process killed mid-write leaves its temp file (one run has one writer: any other is stale)
    for stale in folder.glob(".ckpt-*.pt.tmp*"):
        stale.unlink(missing_ok=True)
    return path


def load_latest(folder: Path, config_hash: str) -> tuple[dict[str, Any] | None, Path | None]:
    """The newest readable checkpoint in `folder` (or (None, None)); unreadable ones are
    skipped with a warning. Raises CheckpointMismatch for one written by another config."""
    for path in checkpoint_paths(folder):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or corrupted file: fall back to an older one
            warnings.warn(f"checkpoint {path} is unreadable ({err.__class__.__name__}); "
                          f"using the previous one")
            continue
        if state.get("config_hash") != config_hash:
            raise CheckpointMismatch(
                f"checkpoint {path} was written by another config ({state.get('config_hash')} != "
                f"{config_hash}); move it away or use a fresh --outputs folder")
        return state, path
    return None, None
