"""Frozen-encoder features, extracted once per (encoder, split) and cached on disk."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from core.files import atomic_path
from engine.data import ImageSet, normalize
from methods.vit import ViT, pool

POOLINGS = ("cls", "mean")


@torch.inference_mode()
def extract_features(vit: ViT, data: ImageSet, batch_size: int = 1024,
                     device: str | torch.device = "cpu", desc: str = "features",
                     progress: bool = True, block: int | None = None) -> dict[str, torch.Tensor]:
    """{'cls': (N, D), 'mean': (N, D), 'labels': (N,)} from one pass of the frozen encoder:
    its final (normed) tokens, or the raw output of block `block` (BEiT probes block 9).
    `data` is an ImageSet, or a split read in batches from its files (engine.stream.StreamedSet:
    decoded in DataLoader workers, never held whole)."""
    vit = vit.eval().to(device)
    # filled in place, not concatenated from chunks: the features are held once (ImageNet-1k's
    # train split at ViT-B, both poolings: 7.9 GB in fp32), not twice at the end
    feats = {p: torch.empty(len(data), vit.embed_dim) for p in POOLINGS}
    feats["labels"] = torch.empty(len(data), dtype=torch.int64)
    filled = 0
    for images, batch_labels in tqdm(image_batches(data, batch_size), total=math.ceil(len(data) / batch_size),
                                     desc=desc, unit="batch", leave=False, disable=not progress):
        images = normalize(images.to(device))
        if block is None:
            tokens = vit(images)                               # (B, 1+N, D)
        else:
            tokens = vit.block_outputs(images, [block])[0]     # (B, 1+N, D)
        rows = slice(filled, filled + len(batch_labels))
        for p in POOLINGS:
            feats[p][rows] = pool(tokens, p).float().cpu()
        feats["labels"][rows] = batch_labels
        filled += len(batch_labels)
    # a streamed split leaves out the unreadable files it was told to skip: the first rows are its features
    return {name: values[:filled] for name, values in feats.items()}


def image_batches(data, batch_size: int):
    """(uint8 images, labels) of `data` in order, `batch_size` at a time."""
    if hasattr(data, "batches"):                # streamed (engine.stream.StreamedSet)
        yield from data.batches(batch_size)
        return
    for start in range(0, len(data), batch_size):
        yield data.images[start:start + batch_size], data.labels[start:start + batch_size]


def cached_features(vit: ViT, data: ImageSet, cache_file: Path, **kwargs) -> dict[str, torch.Tensor]:
    """`extract_features`, stored in `cache_file` (safetensors) and read back next time."""
    cache_file = Path(cache_file)
    if cache_file.exists():
        with safe_open(str(cache_file), "pt") as f:
            # the split's size it was extracted from (a streamed split that skipped unreadable files
            # has fewer rows); files written before it was recorded hold one row per image
            images = int((f.metadata() or {}).get("images", f.get_slice("labels").get_shape()[0]))
            if images == len(data):
                return {name: f.get_tensor(name) for name in f.keys()}
    feats = extract_features(vit, data, **kwargs)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache_file) as tmp:       # from the tensors: no serialised copy in memory
        save_file({k: v.contiguous() for k, v in feats.items()}, str(tmp), metadata={"images": str(len(data))})
    return feats


def feature_file(feature_dir: Path, split: str, block: int | None = None) -> Path:
    """Where the cached features of `split` live: final tokens, or those of one block."""
    return Path(feature_dir) / (f"{split}.safetensors" if block is None else f"{split}-block{block}.safetensors")


def subset_positions(parent: ImageSet, subset: ImageSet, chunk: int = 4096) -> torch.Tensor:
    """For each image of `subset`, the index of a pixel-identical image in `parent`.

    `Splits.fit` and `Splits.holdout` are copies of rows of `Splits.train`; finding them
    lets the evaluations index the cached train features instead of running the encoder
    again. Identical images have identical frozen features, so duplicates in `parent`
    are harmless. Each image is hashed exactly (an integer dot product with fixed random
    weights, no overflow: 255 * 2**40 * 3 * 224 * 224 < 2**63), then compared pixel by pixel.
    """
    if parent.images.shape[1:] != subset.images.shape[1:]:
        raise ValueError(f"images of shape {tuple(subset.images.shape[1:])} cannot come from a set of "
                         f"{tuple(parent.images.shape[1:])} images")
    width = parent.images[0].numel()
    weights = torch.randint(0, 2**40, (width,), generator=torch.Generator().manual_seed(0))

    def hashes(images: torch.Tensor) -> torch.Tensor:
        flat = images.reshape(len(images), -1)
        return torch.cat([(flat[i:i + chunk].long() * weights).sum(1) for i in range(0, len(flat), chunk)])

    parent_hash, order = hashes(parent.images).sort()
    subset_hash = hashes(subset.images)
    slot = torch.searchsorted(parent_hash, subset_hash).clamp(max=len(parent_hash) - 1)
    positions = order[slot]
    same = parent_hash[slot] == subset_hash
    for i in range(0, len(subset), chunk):
        rows = slice(i, i + chunk)
        same[rows] &= (parent.images[positions[rows]] == subset.images[rows]).flatten(1).all(1)
    if not bool(same.all()):
        raise ValueError(f"{int((~same).sum())} image(s) of the subset are not in the parent set; "
                         f"build the subset with ImageSet.subset of the parent")
    return positions
