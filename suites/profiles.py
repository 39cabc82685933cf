"""Budget profiles: how big, how long, on what data. Named dataclass instances, no YAML.

smoke     synthetic images, a micro ViT, seconds: for tests and a first look
cpu       CIFAR-10 on the nano ViT, 2 cores; budgets from ../shared/DESIGN.md (Calibration):
          ~5 epochs of MAE are what separate its k-NN from random init by 6-9 points
gpu       CIFAR-10 on ViT-Tiny, one GPU, 100 epochs
imagenet  ViT-B/16 at 224 px with the papers' schedules; pass --data /path/to/imagenet
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.trainer import TrainConfig
from eval.knn import KNNConfig
from methods.registry import unknown


@dataclass(frozen=True)
class Profile:
    name: str
    data: str                       # "synthetic", "cifar10" (shipped), or "user" (--data required)
    encoder: dict                   # ViTConfig fields
    train: TrainConfig
    seeds: int                      # default number of seeds
    knn: KNNConfig = field(default_factory=KNNConfig)
    feature_batch: int = 1024
    method_defaults: dict = field(default_factory=dict)   # per-method overrides at this scale
    # Sustained training FLOP/s assumed by the cost estimate of `--dry-run`. The CPU figure
    # is what a nano MAE step reaches on the 2-core development machine (~100 GFLOP/s,
    # ~55% of its measured fp32 matmul peak); the GPU ones assume ~40% of bf16 peak.
    flops_per_second: float = 100e9


PROFILES = {
    "smoke": Profile(
        name="smoke", data="synthetic",
        encoder=dict(size="micro", img_size=16, patch_size=4),
        train=TrainConfig(epochs=2, batch_size=64, blr=1e-3, warmup_frac=0.1, checkpoint_every=8,
                          log_every=4),
        seeds=1, feature_batch=256,
        method_defaults={"mae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)},
        flops_per_second=20e9,
    ),
    "cpu": Profile(
        name="cpu", data="cifar10",
        encoder=dict(size="nano", img_size=32, patch_size=4),
        # lr 1e-3 at batch 256, 5% warm-up + cosine, betas (0.9, 0.95), wd 0.05: the
        # calibration recipe of DESIGN.md; 5 epochs, because 1.5 epochs is within noise.
        train=TrainConfig(epochs=5, batch_size=256, blr=1e-3, warmup_frac=0.05, clip_grad=0.0,
                          checkpoint_every=100),
        seeds=2,
        method_defaults={"mae": dict(decoder_dim=128, decoder_depth=2, decoder_heads=4)},
    ),
    "gpu": Profile(
        name="gpu", data="cifar10",
        encoder=dict(size="tiny", img_size=32, patch_size=4),
        train=TrainConfig(epochs=100, batch_size=512, blr=1e-3, warmup_frac=0.05, clip_grad=0.0,
                          checkpoint_every=500),
        seeds=3, feature_batch=4096,
        method_defaults={"mae": dict(decoder_dim=192, decoder_depth=4, decoder_heads=6)},
        flops_per_second=150e12,
    ),
    "imagenet": Profile(
        name="imagenet", data="user",
        encoder=dict(size="base", img_size=224, patch_size=16, drop_path=0.1),
        # MAE: blr 1.5e-4, batch 4096, 40 warm-up of 800 epochs; BEiT: 800 epochs.
        train=TrainConfig(epochs=800, batch_size=4096, blr=1.5e-4, warmup_frac=0.05, clip_grad=3.0,
                          checkpoint_every=1000, compile=True),
        seeds=1, feature_batch=512,
        method_defaults={"mae": dict(decoder_dim=512, decoder_depth=8, decoder_heads=16,
                                     encoder=dict(drop_path=0.0))},
        flops_per_second=8 * 300e12,
    ),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise unknown("profile", name, PROFILES)
    return PROFILES[name]
