"""What a run's pre-training costs, from FLOPs counted on a 2-image batch (attention
unfused, so the FLOPs of the computation, not of the kernel that runs it)."""
from __future__ import annotations

from functools import lru_cache
import json
from pathlib import Path

import torch

from engine.data import list_images
from engine.trainer import total_steps, train_flops
from methods import registry
from methods.base import Batch
from runs.identity import Budget, RunConfig, config_from_record

TRAIN_IMAGES = {"synthetic": 640, "cifar10": 50_000, "imagenet": 1_281_167}   # without a folder to count


@lru_cache(maxsize=64)
def _flops_per_image(method: str, method_config_json: str) -> float:
    model = registry[method][0](config_from_record(method, json.loads(method_config_json)))
    enc = model.cfg.encoder
    views = [torch.randn(2, enc.in_chans, size, size) for size, _ in model.view_specs(0.2)]
    mask = model.draw_masks(2, torch.Generator().manual_seed(0))
    batch = Batch(views[0], mask, views if len(views) > 1 else None)
    return train_flops(model, batch, torch.device("cpu")) / 2


def flops_per_image(method: str, method_config: dict) -> float:
    """Training FLOPs (forward + backward) per image of one step of `method`, given the
    identity record of its config (RunConfig.method_config)."""
    return _flops_per_image(method, json.dumps(method_config, sort_keys=True))


def images_seen(config: RunConfig) -> int:
    train = config.train_config()
    data = config.data
    if "path" in data and (Path(data["path"]) / "train").is_dir():
        num_train = count_train_images(data["path"])
    else:   # not there (a --dry-run elsewhere): the known size of the named dataset, else ImageNet's
        num_train = TRAIN_IMAGES.get(data["name"], TRAIN_IMAGES["imagenet"])
    return total_steps(train.epochs, num_train, train.batch_size) * train.batch_size


@lru_cache(maxsize=8)
def count_train_images(root: str) -> int:
    return len(list_images(Path(root) / "train")[1])


def pretrain_flops(config: RunConfig) -> float:
    """FLOPs of a resolved run's whole pre-training (0 for methods that do not train)."""
    if config.train is None:
        return 0.0
    return flops_per_image(config.method, config.method_config) * images_seen(config)


def estimate_seconds(config: RunConfig, profile: Budget) -> float:
    """Pre-training wall time at the profile's assumed sustained FLOP/s."""
    return pretrain_flops(config) / profile.flops_per_second
