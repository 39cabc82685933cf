"""Pre-training's batches from images held in memory: step s's views and masks of uint8 images.

    EpochOrder          the dataset indices of step s, from (seed, epoch); the streaming path
                        (engine.stream) and fine-tuning (eval.finetune) take the same order
    MaskedViews         the BatchSource of a method's augmented views and masks
    view_augmentations  each view's photometric augmentation, by the name a method's config gives
    pretraining         what `Trainer` takes to pre-train a method by a TrainConfig: the source
                        (MaskedViews of uint8 images, or a streaming source of the same batches)
                        and the plan (`adamw_plan`)

Every draw of step s comes from generators seeded by (seed, s) (`step_seed`), never from the
steps drawn before: what makes a resumed run bit-identical (engine.trainer).
"""
from __future__ import annotations

import torch
from torch import Tensor

from core.config import ConfigError
from core.device import to_device
from engine import distributed
from engine.augment import beit_view, dino_views, photometric
from engine.data import random_resized_crop_flip, standardize
from engine.trainer import BatchSource, TrainConfig, TrainPlan, adamw_plan, step_seed
from methods.base import AUGMENTATIONS, Batch


class EpochOrder:
    """The dataset indices of step s: a random order per epoch, seeded by (seed, epoch); the
    last partial batch of an epoch is dropped."""

    def __init__(self, num_items: int, batch_size: int, seed: int, check: bool = True):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.steps_per_epoch = num_items // batch_size
        if check and self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size {batch_size} is larger than the dataset ({num_items} images); "
                              f"lower it")
        self._order: tuple[int, Tensor] | None = None        # (epoch, its permutation)

    def indices(self, step: int) -> Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(step_seed(self.seed, epoch, stream=1))
            self._order = (epoch, torch.randperm(self.num_items, generator=gen))
        return self._order[1][position * self.batch_size:(position + 1) * self.batch_size]


# the photometric augmentation's seed stream: clear of the per-rank torch streams (3 + rank)
COLOUR_STREAM = 1000


class MaskedViews:
    """Pre-training batches: the method's augmented views (`view_specs`, and the photometric
    augmentation its config names, `view_augmentations`) and masks (`draw_masks`) of uint8
    images. Under torchrun every rank draws the global batch from the same step seed and
    keeps its own slice. Crops and masks draw from stream 2 of the step seed, photometric
    augmentation from stream COLOUR_STREAM, so a view's colours never shift another view's crop
    or mask."""
    random_access = True            # any step's batch costs what the next one does (BatchSource)

    def __init__(self, method, images: Tensor, batch_size: int, crop_scale_min: float, seed: int,
                 device: torch.device):
        self.method, self.crop_scale_min, self.seed, self.device = method, crop_scale_min, seed, device
        self.images = images.to(device)                       # uint8 (N, 3, H, W), on device
        self.order = EpochOrder(len(images), batch_size, seed, check=method.trains)   # `none`: never drawn
        self.steps_per_epoch = self.order.steps_per_epoch
        self.world, self.rank = distributed.world_size(), distributed.rank()
        specs = method.view_specs(crop_scale_min)
        self.specs = list(zip(specs, view_augmentations(method.augmentation, len(specs), method.num_views)))

    def batch_for_step(self, step: int) -> Batch:
        index = self.order.indices(step)
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, stream=2))
        colour_gen = torch.Generator().manual_seed(step_seed(self.seed, step, stream=COLOUR_STREAM))
        uint8 = self.images[to_device(index, self.device)]
        views = []
        for (size, scale), colour in self.specs:
            if colour is None or not colour.active:
                views.append(random_resized_crop_flip(uint8, size, gen, scale=scale))
            else:   # colour ops work on [0, 1] pixels: crop, augment, then standardise
                pixels = random_resized_crop_flip(uint8, size, gen, scale=scale, standardized=False)
                views.append(standardize(photometric(pixels, colour, colour_gen)))
        mask = self.method.draw_masks(len(index), gen)
        if self.world > 1:  # every rank drew the global batch; keep this rank's slice
            shard = slice(self.rank * len(index) // self.world, (self.rank + 1) * len(index) // self.world)
            views = [v[shard] for v in views]
            mask = None if mask is None else mask[..., shard, :]
        return Batch.of_views(views, mask, self.device)


def view_augmentations(name: str, num_views: int, num_global: int) -> list:
    """The photometric augmentation (engine.augment.Photometric, or None) of each of a method's
    `num_views` views, by the name its config gives (methods.base.AUGMENTATIONS):
    none, BEiT's colour jitter on its one view, or DINO/iBOT's pipeline (two global views, then
    local ones)."""
    if name == "none":
        return [None] * num_views
    if name == "beit":
        return [beit_view()] * num_views
    if name == "dino":
        if num_global != 2:
            raise ConfigError(f"the 'dino' augmentation needs two global views, the method has {num_global}")
        return list(dino_views(num_views - num_global))
    raise ConfigError(f"unknown augmentation {name!r}; known: {', '.join(AUGMENTATIONS)}")


def pretraining(method, data: Tensor | BatchSource, cfg: TrainConfig, seed: int,
                device: str | torch.device = "cpu", trunk_steps: int | None = None,
                keep_at: tuple[int, ...] = ()) -> tuple[BatchSource, TrainPlan]:
    """(source, plan) to pre-train `method` by `cfg`: `MaskedViews` of `data` when it is uint8
    images (N, 3, H, W), else `data` itself, a source of the same batches
    (engine.stream.StreamingViews); and timm's AdamW + the config's schedule over `cfg.epochs` of
    it (no steps for a method with nothing to train: the `none` baseline). `trunk_steps`: a wsd
    trunk of that many steps instead, its checkpoints at `keep_at` kept (runs.curve)."""
    cfg.validate()
    if isinstance(data, Tensor):
        data = MaskedViews(method, data, cfg.batch_size, cfg.crop_scale_min, seed, torch.device(device))
    if trunk_steps is not None:
        return data, adamw_plan(cfg, trunk_steps, desc=f"trunk {method.name}", trunk=True, keep_at=keep_at)
    steps = round(cfg.epochs * data.steps_per_epoch) if method.trains else 0
    return data, adamw_plan(cfg, steps, desc=f"pre-train {method.name}")
