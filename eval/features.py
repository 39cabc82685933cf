"""Frozen-encoder features, extracted once per (encoder, split) and cached on disk."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engine.data import ImageSet, normalize
from methods.vit import ViT, pool

POOLINGS = ("cls", "mean")


@torch.inference_mode()
def extract_features(vit: ViT, data: ImageSet, batch_size: int = 1024,
                     device: str | torch.device = "cpu", desc: str = "features",
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """{'cls': (N, D), 'mean': (N, D), 'labels': (N,)} from one pass of the frozen encoder."""
    vit = vit.eval().to(device)
    out = {p: [] for p in POOLINGS}
    for start in tqdm(range(0, len(data), batch_size), desc=desc, unit="batch", leave=False,
                      disable=not progress):
        images = normalize(data.images[start:start + batch_size].to(device))
        tokens = vit(images)                                   # (B, 1+N, D)
        for p in POOLINGS:
            out[p].append(pool(tokens, p).float().cpu())
    feats = {p: torch.cat(chunks) for p, chunks in out.items()}
    feats["labels"] = data.labels.clone()
    return feats


def cached_features(vit: ViT, data: ImageSet, cache_file: Path, **kwargs) -> dict[str, torch.Tensor]:
    """`extract_features`, stored in `cache_file` (safetensors) and read back next time."""
    cache_file = Path(cache_file)
    if cache_file.exists():
        feats = load_file(str(cache_file))
        if len(feats["labels"]) == len(data):
            return feats
    feats = extract_features(vit, data, **kwargs)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".{cache_file.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in feats.items()}, str(tmp))
    os.replace(tmp, cache_file)
    return feats
