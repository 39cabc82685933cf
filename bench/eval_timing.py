"""Wall-clock seconds of the two evaluation pieces every run pays, timed as the suite
runner calls them at the `cpu` profile (its encoder, k-NN config and feature batch):

    k-NN                `eval.knn.knn_metrics` on cached train x test features, both poolings
                        ([CLS] and mean), random features of the encoder's width, 10 classes
    feature extraction  `eval.features.cached_features` of the train and the test split
                        (random uint8 images) through a fresh encoder, cache in a temp dir

Targets are the issue's, for 50,000 train x 10,000 test images on 2 cores.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from engine.data import ImageSet
from eval import knn
from eval.features import POOLINGS, cached_features, feature_file
from methods.vit import ViT, ViTConfig
from suites.profiles import get_profile

PROFILE = "cpu"
NUM_CLASSES = 10                # CIFAR-10
TARGET_TRAIN, TARGET_TEST = 50_000, 10_000     # CIFAR-10's splits: the sizes the targets are for
KNN_TARGET_S = 5.0
FEATURES_TARGET_S = 40.0


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


def feature_extraction_seconds(num_train: int, num_test: int, device: torch.device, seed: int = 0) -> float:
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
    with tempfile.TemporaryDirectory() as feature_dir:
        t0 = time.perf_counter()
        for split, data in splits.items():
            cached_features(encoder, data, feature_file(Path(feature_dir), split),
                            batch_size=profile.feature_batch, device=device, progress=False)
        return time.perf_counter() - t0


def eval_results(num_train: int, num_test: int, device: torch.device) -> dict:
    """{'knn_seconds': {...}, 'feature_extraction_seconds': {...}}: seconds, the target, and
    whether it is met (None at other sizes than the target's)."""
    enc = ViTConfig(**get_profile(PROFILE).encoder)
    at_target_size = (num_train, num_test) == (TARGET_TRAIN, TARGET_TEST)

    def timing(seconds: float, target: float, **about) -> dict:
        return {"seconds": seconds, "target_s": target,
                "meets_target": seconds <= target if at_target_size else None, **about}

    return {
        "knn_seconds": timing(knn_seconds(num_train, num_test), KNN_TARGET_S,
                              train=num_train, test=num_test, poolings=list(POOLINGS)),
        "feature_extraction_seconds": timing(
            feature_extraction_seconds(num_train, num_test, device), FEATURES_TARGET_S,
            images=num_train + num_test, encoder=f"ViT-{enc.size} {enc.img_size}px/p{enc.patch_size}"),
    }
