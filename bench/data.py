"""`make bench-data`: the streaming loader (engine.stream) against MAE's loader, on JPEGs it makes.

    python -m bench.data [--images 2000] [--size 224] [--workers 1,2,N] [--folder DIR]

On a synthetic ImageNet-layout folder (`train/<class>/*.JPEG`, 300-500 px a side, smooth
colour fields with texture, quality 90, so files are photo-sized, not noise-sized), in one
process, interleaved:

    stream        engine.stream.StreamingViews: MAE's views at `--size` (RandomResizedCrop 0.2-1,
                  bicubic, flip) and its masks, one rank's batches from workers
    torchvision   MAE's main_pretrain.py loader: datasets.ImageFolder + RandomResizedCrop(0.2-1,
                  bicubic) + RandomHorizontalFlip + ToTensor + Normalize, a DataLoader with the
                  same workers, batch and pinned memory off (CPU)
    decode        the decode-only ceiling: the same files read and decoded (torchvision.io) by the
                  same workers, nothing else

img/s at 1, 2 and all workers; then the peak RSS of a streaming pass over the folder and over
one 10x larger (the loader holds file names and labels, never images: it must stay flat).
Writes bench/data_results.json (keys stream_vs_torchvision, decode_ceiling_share, rss_mb).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).with_name("data_results.json")


def make_jpeg_folder(root: str | Path, num_classes: int, per_class: int, min_px: int = 300, max_px: int = 500,
                     seed: int = 0, quality: int = 90) -> Path:
    """`root/<class>/<i>.JPEG`, ImageNet's layout: each image a smooth field of its class's hue
    with a random texture, `min_px`-`max_px` a side (random aspect). Returns `root`."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        hue = np.array([(c * 37) % 255, (c * 91) % 255, (c * 53) % 255], dtype=np.float32)
        for i in range(per_class):
            width, height = (int(v) for v in rng.integers(min_px, max_px + 1, 2))
            coarse = rng.random((max(2, height // 16), max(2, width // 16), 3), dtype=np.float32)
            field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC),
                               dtype=np.float32)
            texture = rng.normal(0, 12, (height, width, 1)).astype(np.float32)
            pixels = np.clip(0.5 * field + 0.5 * hue + texture, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{c}_{i}.JPEG", quality=quality)
    return root
