"""What a run's pre-training costs, from FLOPs counted on a 2-image batch (attention
unfused, so the FLOPs of the computation, not of the kernel that runs it)."""
from __future__ import annotations

from functools import lru_cache
import json
from pathlib import Path

import torch

from engine.data import list_images
from engine.trainer import TrainConfig, total_steps, train_flops
from methods import build_method
from methods.base import Batch

TRAIN_IMAGES = {"synthetic": 640, "cifar10": 50_000, "imagenet": 1_281_167}   # without a folder to count


@lru_cache(maxsize=64)
def _flops_per_image(method: str, method_config_json: str) -> float:
    model = build_method(method, **json.loads(method_config_json))
    enc = model.cfg.encoder
    views = [torch.randn(2, enc.in_chans, size, size) for size, _ in model.view_specs(0.2)]
    mask = model.draw_masks(2, torch.Generator().manual_seed(0))
    batch = Batch(views[0], mask, views if len(views) > 1 else None)
    return train_flops(model, batch, torch.device("cpu")) / 2


def flops_per_image(method: str, method_config: dict) -> float:
    """Training FLOPs (forward + backward) per image of one step of `method`."""
    return _flops_per_image(method, json.dumps(method_config, sort_keys=True))


def images_seen(config: dict) -> int:
    train = TrainConfig(**config["train"])
    data = config["data"]
    num_train = count_train_images(data["path"]) if "path" in data else TRAIN_IMAGES[data["name"]]
    return total_steps(train.epochs, num_train, train.batch_size) * train.batch_size


@lru_cache(maxsize=8)
def count_train_images(root: str) -> int:
    return len(list_images(Path(root) / "train")[1])


def pretrain_flops(config: dict) -> float:
    """FLOPs of a resolved run's whole pre-training (0 for methods that do not train)."""
    if config["train"] is None:
        return 0.0
    return flops_per_image(config["method"], config["method_config"]) * images_seen(config)


def estimate_seconds(config: dict, profile) -> float:
    """Pre-training wall time at the profile's assumed sustained FLOP/s."""
    return pretrain_flops(config) / profile.flops_per_second
