"""Milliseconds per call of the batched augmentation a pre-training step pays on the CPU, at
one thread, on one batch of the cpu profile's shape (256 images of 32 px):

    crop           engine.data.random_resized_crop_flip of uint8 images (every method's views)
    beit_jitter    engine.augment.photometric with beit_view()        ColorJitter(0.4, 0.4, 0.4)
    dino_global1   ... with dino_views()[0]   jitter 0.8, grayscale 0.2, blur 1.0
    dino_global2   ... with dino_views()[1]   jitter 0.8, grayscale 0.2, blur 0.1, solarize 0.2
    dino_local     ... with dino_views(1)[2]  jitter 0.8, grayscale 0.2, blur 0.5 (at 32 px too)

Repetitions are interleaved like the step table's; the median is reported, min and max beside.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from engine.augment import beit_view, dino_views, photometric
from engine.data import random_resized_crop_flip

BATCH, IMG_SIZE, THREADS = 256, 32, 1
REPS, CALLS = 7, 5                  # calls per timed repetition


def augment_results(seed: int = 0) -> dict:
    """{'augment_ms': {name: median ms per call}, 'augment_timing': {shape, threads, min_ms, max_ms}}"""
    gen = torch.Generator().manual_seed(seed)
    uint8 = torch.randint(0, 256, (BATCH, 3, IMG_SIZE, IMG_SIZE), dtype=torch.uint8, generator=gen)
    pixels = uint8.float() / 255
    global1, global2, local = dino_views(1)
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "crop": lambda: random_resized_crop_flip(uint8, IMG_SIZE, gen),
        "beit_jitter": lambda: photometric(pixels, beit_view(), gen),
        "dino_global1": lambda: photometric(pixels, global1, gen),
        "dino_global2": lambda: photometric(pixels, global2, gen),
        "dino_local": lambda: photometric(pixels, local, gen),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        times: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():     # warm-up
            call()
        for _ in range(REPS):
            for name, call in calls.items():        # interleaved
                t0 = time.perf_counter()
                for _ in range(CALLS):
                    call()
                times[name].append((time.perf_counter() - t0) / CALLS * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {"augment_ms": {name: statistics.median(ms) for name, ms in times.items()},
            "augment_timing": {"shape": [BATCH, 3, IMG_SIZE, IMG_SIZE], "device": "cpu", "threads": THREADS,
                               "min_ms": {name: min(ms) for name, ms in times.items()},
                               "max_ms": {name: max(ms) for name, ms in times.items()}}}


def print_augment(results: dict) -> None:
    timing, medians = results["augment_timing"], results["augment_ms"]
    shape = " x ".join(str(side) for side in timing["shape"])
    print(f"\naugmentation ({timing['device']}, {timing['threads']} thread, {shape})   ms/call     min     max")
    for name, ms in medians.items():
        print(f"  {name:36s} {ms:9.2f} {timing['min_ms'][name]:7.2f} {timing['max_ms'][name]:7.2f}")
