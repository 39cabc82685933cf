"""Seconds of the two evaluation pieces every run pays, timed as the suite runner calls them
at the `cpu` profile (its encoder, k-NN config and feature batch):

    k-NN                `eval.knn.knn_metrics` on cached train x test features, both poolings
                        ([CLS] and mean), random features of the encoder's width, 10 classes
    feature extraction  `eval.features.cached_features` of the train and the test split
                        (random uint8 images) through a fresh encoder, cache in a temp dir, in
                        fp32 and, where the machine has bf16 matmuls, in bf16 (feature_precision)

Extraction's model FLOPs utilisation: the forward's FLOPs (torch.utils.flop_counter, attention
unfused, as the step table counts them) over the matmul peak at the same dtype measured just
before. On a CPU both are per CPU-second (time.process_time), so another process time-slicing
the cores does not dilute them (at one thread of an idle machine it is the wall-clock MFU);
on a GPU per wall second. The goal is 80% of the peak.

Targets are the issue's, for 50,000 train x 10,000 test images on 2 cores.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.steps import matmul_peak, sync
from core.config import ConfigError
from engine.data import ImageSet
from eval import knn
from eval.features import (POOLINGS, cached_features, check_precision, cpu_bf16_flags, feature_file,
                           inference_encoder)
from methods.vit import ViT, ViTConfig
from suites.profiles import get_profile

PROFILE = "cpu"
NUM_CLASSES = 10                # CIFAR-10
TARGET_TRAIN, TARGET_TEST = 50_000, 10_000     # CIFAR-10's splits: the sizes the targets are for
KNN_TARGET_S = 5.0
FEATURES_TARGET_S = 40.0
MFU_GOAL = 0.8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def knn_seconds(num_train: int, num_test: int, seed: int = 0) -> float:
    profile = get_profile(PROFILE)
    dim = ViTConfig(**profile.encoder).embed_dim
    gen = torch.Generator().manual_seed(seed)

    def features(n: int) -> dict[str, torch.Tensor]:
        feats = {p: torch.randn(n, dim, generator=gen) for p in POOLINGS}
        feats["labels"] = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        return feats

    train, test = features(num_train), features(num_test)
    t0 = time.perf_counter()
    knn.knn_metrics(train, test, profile.knn)
    return time.perf_counter() - t0


def mfu_clock(device: torch.device):
    """The clock MFU is measured by: CPU seconds of this process on a CPU, wall seconds on a GPU."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def forward_flops_per_image(encoder: ViT, device: torch.device) -> float:
    """FLOPs of one image through the frozen encoder, attention unfused (FlopCounterMode has no
    formula for the CPU's fused kernel; we count the computation, not a kernel)."""
    counted = inference_encoder(encoder).to(device)
    for module in counted.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    size = counted.cfg.img_size
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        counted(torch.zeros(2, counted.cfg.in_chans, size, size, device=device))
    return counter.get_total_flops() / 2


def bf16_unavailable(device: torch.device) -> str | None:
    """Why this machine is not offered bf16 extraction; None where it is."""
    try:
        check_precision("bf16", device)
    except ConfigError as refusal:
        return str(refusal)
    return None


def feature_extraction_seconds(num_train: int, num_test: int, device: torch.device, precision: str = "fp32",
                               seed: int = 0) -> tuple[float, float]:
    """(wall seconds, seconds by `mfu_clock`) of extracting both splits' features at `precision`."""
    profile = get_profile(PROFILE)
    enc = ViTConfig(**profile.encoder)
    encoder = ViT(enc)
    gen = torch.Generator().manual_seed(seed)
    classes = [str(c) for c in range(NUM_CLASSES)]

    def images(n: int) -> ImageSet:
        return ImageSet(torch.randint(0, 256, (n, enc.in_chans, enc.img_size, enc.img_size),
                                      dtype=torch.uint8, generator=gen),
                        torch.randint(0, NUM_CLASSES, (n,), generator=gen), classes)

    splits = {"train": images(num_train), "test": images(num_test)}
    clock = mfu_clock(device)
    with tempfile.TemporaryDirectory() as feature_dir:
        sync(device)
        wall, clocked = time.perf_counter(), clock()
        for split, data in splits.items():
            cached_features(encoder, data, feature_file(Path(feature_dir), split, precision=precision),
                            batch_size=profile.feature_batch, device=device, progress=False,
                            precision=precision)
        sync(device)
        return time.perf_counter() - wall, clock() - clocked


def extraction_mfu(num_train: int, num_test: int, device: torch.device) -> dict:
    """Extraction at each precision the machine offers: wall seconds, img/s, the matmul peak at
    that dtype (measured just before, by the same clock) and the MFU against it."""
    enc = ViTConfig(**get_profile(PROFILE).encoder)
    flops_per_image = forward_flops_per_image(ViT(enc), device)
    images = num_train + num_test
    out: dict = {"gflop_per_img": flops_per_image / 1e9, "mfu_goal": MFU_GOAL,
                 "clock": "cpu" if device.type == "cpu" else "wall", "threads": torch.get_num_threads(),
                 "cpu_bf16_flags": cpu_bf16_flags()}
    skipped = bf16_unavailable(device)
    if skipped:
        out["bf16_skipped"] = skipped
    for precision in ("fp32",) if skipped else ("fp32", "bf16"):
        peak = matmul_peak(DTYPES[precision], device, clock=mfu_clock(device))
        seconds, clocked = feature_extraction_seconds(num_train, num_test, device, precision)
        out[precision] = {"seconds": seconds, "clock_seconds": clocked, "img_per_s": images / seconds,
                          "matmul_peak_flops": peak, "mfu": flops_per_image * images / clocked / peak}
    if "bf16" in out:
        out["bf16_speedup"] = out["fp32"]["clock_seconds"] / out["bf16"]["clock_seconds"]
    return out


def eval_results(num_train: int, num_test: int, device: torch.device) -> dict:
    """{'knn_seconds': {...}, 'feature_extraction_seconds': {...}, 'feature_extraction': {...}}:
    seconds, the target and whether it is met (None at other sizes than the target's); fp32's
    extraction seconds, and extraction's MFU at fp32 and bf16 (`extraction_mfu`)."""
    enc = ViTConfig(**get_profile(PROFILE).encoder)
    at_target_size = (num_train, num_test) == (TARGET_TRAIN, TARGET_TEST)

    def timing(seconds: float, target: float, **about) -> dict:
        return {"seconds": seconds, "target_s": target,
                "meets_target": seconds <= target if at_target_size else None, **about}

    extraction = extraction_mfu(num_train, num_test, device)
    return {
        "knn_seconds": timing(knn_seconds(num_train, num_test), KNN_TARGET_S,
                              train=num_train, test=num_test, poolings=list(POOLINGS)),
        "feature_extraction_seconds": timing(
            extraction["fp32"]["seconds"], FEATURES_TARGET_S,
            images=num_train + num_test, encoder=f"ViT-{enc.size} {enc.img_size}px/p{enc.patch_size}"),
        "feature_extraction": extraction,
    }
