"""Frozen-encoder features, extracted once per (encoder, split) and cached on disk."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from core.config import ConfigError
from core.files import atomic_path
from engine.data import ImageSet, normalize
from methods.vit import ViT, pool

POOLINGS = ("cls", "mean")
# What the encoder's matmuls compute in while extracting: "bf16" runs the forward under bf16
# autocast (matmuls and attention in bf16, LayerNorms and the residual stream in fp32), about
# twice as fast on a CPU with bf16 matmuls (avx512_bf16 / AMX). The cached features are fp32
# either way. bf16 changes a trained encoder's features by ~0.3% and flips near-tie k-NN votes:
# on a 5-epoch nano MAE and all of CIFAR-10, top-1 moved 42.70 -> 42.55 on [CLS] (430 of 10,000
# predictions flipped) and 44.00 -> 44.01 on mean pooling (188 flipped); on 500 test images it
# stays within one image (tests/test_features.py). fp32 is the default: compare runs extracted
# at the same precision.
PRECISIONS = ("fp32", "bf16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")      # /proc/cpuinfo flags of CPUs with bf16 matmuls


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The flags of BF16_CPU_FLAGS this CPU reports (none where /proc/cpuinfo is unreadable)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in BF16_CPU_FLAGS if flag in flags]


def check_precision(precision: str, device: str | torch.device | None = None) -> None:
    """Fail before any work on an unknown precision, or on bf16 where it would be emulated (a
    CPU without bf16 matmuls runs them slower than fp32). `device` None: the GPU if there is
    one, else the CPU (what a run picks by default)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"feature precision {precision!r} unknown; known: {', '.join(PRECISIONS)}")
    if precision != "bf16":
        return
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not cpu_bf16_flags():
        raise ConfigError("bf16 feature extraction needs a CPU with bf16 matmuls (avx512_bf16 or AMX); "
                          "this one has neither, so bf16 would be slower than fp32: use feature_precision fp32")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"bf16 feature extraction: {torch.cuda.get_device_name(device)} has no bf16; "
                          f"use feature_precision fp32")


class InPlaceGELU(nn.Module):
    """GELU written over its input. In timm's Mlp the input is fc1's fresh output, which nothing
    else reads: each block then writes one (tokens x 4D) activation fewer. Extraction at the nano
    ViT, one CPU thread: 7% faster at batch 64, the same numbers bit for bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.gelu_(x)


def inference_encoder(vit: ViT) -> ViT:
    """A copy of `vit` for extraction: eval mode, exact GELUs in place. The caller's encoder is
    left as it was. (Weights cast to bf16 would be ~15% faster than autocast, but a bf16
    residual stream flipped twice as many k-NN votes: 103 of 2000 CIFAR-10 test images.)"""
    encoder = copy.deepcopy(vit).eval()
    for block in encoder.blocks:
        act = getattr(block.mlp, "act", None)
        if type(act) is nn.GELU and act.approximate == "none":
            block.mlp.act = InPlaceGELU()
    return encoder


def extract_features(vit: ViT, data: ImageSet, batch_size: int = 1024,
                     device: str | torch.device = "cpu", desc: str = "features",
                     progress: bool = True, block: int | None = None,
                     precision: str = "fp32") -> dict[str, torch.Tensor]:
    """{'cls': (N, D), 'mean': (N, D), 'labels': (N,)} from one pass of the frozen encoder:
    its final (normed) tokens, or the raw output of block `block` (BEiT probes block 9).
    `data` is an ImageSet, or a split read in batches from its files (engine.stream.StreamedSet:
    decoded in DataLoader workers, never held whole). `precision` (PRECISIONS) is what the
    encoder computes in; the features are float32."""
    check_precision(precision, device)
    encoder = inference_encoder(vit).to(device)
    # filled in place, not concatenated from chunks: the features are held once (ImageNet-1k's
    # train split at ViT-B, both poolings: 7.9 GB in fp32), not twice at the end
    feats = {p: torch.empty(len(data), encoder.embed_dim) for p in POOLINGS}
    feats["labels"] = torch.empty(len(data), dtype=torch.int64)
    filled = 0
    batches = tqdm(image_batches(data, batch_size), total=math.ceil(len(data) / batch_size),
                   desc=desc, unit="batch", leave=False, disable=not progress)
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), autocast:
        for images, batch_labels in batches:
            images = normalize(images.to(device))
            if block is None:
                tokens = encoder(images)                               # (B, 1+N, D)
            else:
                tokens = encoder.block_outputs(images, [block])[0]     # (B, 1+N, D)
            rows = slice(filled, filled + len(batch_labels))
            for p in POOLINGS:
                feats[p][rows] = pool(tokens, p)                       # (fp32 under autocast too)
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


def feature_file(feature_dir: Path, split: str, block: int | None = None, precision: str = "fp32") -> Path:
    """Where the cached features of `split` live: final tokens, or those of one block; fp32's
    under the names they always had, bf16's beside them (train-bf16.safetensors)."""
    name = split if block is None else f"{split}-block{block}"
    return Path(feature_dir) / (f"{name}.safetensors" if precision == "fp32" else f"{name}-{precision}.safetensors")


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
