"""End-to-end fine-tuning (BEiT / MAE protocol) on the project's trainer.

A copy of the encoder (with drop path) gets a linear head on its pooled tokens and is
trained on the whole training split with AdamW + warm-up/cosine (timm's scheduler),
layer-wise lr decay (timm's optimizer factory reading `ViT.group_matcher`), label
smoothing, mixup / cutmix (timm `Mixup`, on the batch) and RandAugment (timm, per image:
its ops are PIL ops). The test split is read once, after the last step.

With `blr_sweep` (multiples of `blr`) and `layer_decay_sweep` (layer decays) the lr and layer
decay are chosen like the linear probe's: each candidate of their grid fine-tunes on `Splits.fit`
and is read on `Splits.holdout`, the best is retrained on the whole training split, and only that
one reads the test split. Each candidate has its own folder, so a killed sweep resumes where it
stopped. The profiles give every encoder, pre-trained or not, the same grid. A choice made before
(`EvalContext.choice`: the run layer hands seed 0's to a cell's other seeds) is fine-tuned at
directly, without a sweep. The record's details hold the choice and, when it swept, the grid and
every held-out score.

Fine-tuning is `engine.trainer.Trainer` with a labelled batch source (`LabelledBatches`) and a
layer-decayed optimizer (`finetune_trainer`), so it has the trainer's checkpoints, exact resume
(every random draw of step s comes from generators seeded by (seed, s)), non-finite-loss guard,
checkpoint on SIGTERM, metrics.jsonl, TensorBoard events and progress bar: a killed or stopped
fine-tune picks up from its last checkpoint when run again.

A streamed run (engine.stream: ImageNet-size data) passes its splits as StreamedSets and
fine-tuning reads them from the files (`StreamingLabelledBatches`): each step's images decoded
in DataLoader workers, RandomResizedCrop from the full image, flip, then RandAugment (timm /
MAE's order; the memory path augments the resized image before its batched crop), all drawn
from generators seeded by (seed, step, position in the batch), so a batch is the same for any
number of workers and a resumed fine-tune is bit-identical; the test split is read in batches.
The sweep holds out the files at the positions the memory path's split holds out (a skipped
unreadable file is left out of its part, as of any batch).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, rand_augment_transform
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn
from torch.nn import functional as F

from core.config import ConfigError, identity_record, late_field
from core.device import to_device
from core.files import config_hash
from engine.data import DataError, ImageSet, Splits, holdout_positions, normalize, random_resized_crop_flip
from engine.splits import StreamedSet
from engine.stream import (CROP_STREAM, PIL_STREAM, ImageReader, StepImages, StepPart, StepSource, crop_flip,
                           image_generator, item_seed, standardize_pixels)
from engine.trainer import Trainer, TrainConfig, adamw_plan, step_seed, total_steps
from engine.views import EpochOrder
from eval.features import POOLINGS, image_batches
from eval.registry import EvalContext, EvalResult, register_evaluation
from methods.base import Batch, Horizon
from methods.vit import ViT, pool


@dataclass(frozen=True)
class FinetuneConfig:
    """Defaults: BEiT / MAE fine-tuning of ViT-B on ImageNet-1k."""
    epochs: float = 100.0
    batch_size: int = 1024
    blr: float = 5e-4                   # MAE ViT-B; lr = blr * batch_size / 256
    layer_decay: float = 0.65           # BEiT and MAE ViT-B (MAE ViT-L: 0.75); 1.0 = off
    weight_decay: float = 0.05
    beta2: float = 0.999
    warmup_frac: float = 0.05           # 5 of 100 epochs
    min_lr_frac: float = 0.0
    clip_grad: float = 0.0              # MAE does not clip when fine-tuning (0 = off)
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.8                  # Beta(alpha) of mixup; 0 = off
    cutmix: float = 1.0                 # Beta(alpha) of cutmix; 0 = off
    mixup_switch_prob: float = 0.5      # chance of cutmix instead of mixup when both are on
    # timm RandAugment spec; "" = off. MAE / BEiT use rand-m9-mstd0.5-inc1; the magnitude is
    # capped at 9 (mmax9) because at 10 timm posterizes to 0 bits, which Pillow 13 refuses.
    randaug: str = "rand-m9-mstd0.5-inc1-mmax9"
    crop_scale_min: float = 0.08        # RandomResizedCrop scale (Inception / MAE fine-tuning)
    pooling: str = "mean"               # MAE and BEiT fine-tune on mean-pooled tokens
    checkpoint_every: int = 500
    log_every: int = 20
    compile: bool = False
    # multiples of blr tried on the held-out part of train, the best retrained on all of it;
    # () = fine-tune at blr alone (every run before the sweep existed)
    blr_sweep: tuple[float, ...] = late_field(())
    # layer decays tried with each of those (1.0 = none); () = layer_decay alone
    layer_decay_sweep: tuple[float, ...] = late_field(())

    def validate(self) -> None:
        if any(factor <= 0 for factor in self.blr_sweep) or len(set(self.blr_sweep)) != len(self.blr_sweep):
            raise ConfigError(f"blr_sweep {self.blr_sweep} must hold distinct multiples of blr > 0, "
                              f"e.g. (0.5, 1.0, 2.0), or () for no sweep")
        if (any(not 0 < decay <= 1 for decay in self.layer_decay_sweep)
                or len(set(self.layer_decay_sweep)) != len(self.layer_decay_sweep)):
            raise ConfigError(f"layer_decay_sweep {self.layer_decay_sweep} must hold distinct layer decays in "
                              f"(0, 1], e.g. (0.75, 1.0), or () for layer_decay alone")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"fine-tune pooling {self.pooling!r} unknown; known: {', '.join(POOLINGS)}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay {self.layer_decay} must be in (0, 1] (1 = no decay)")
        if not 0 <= self.label_smoothing < 1 or self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("label_smoothing must be in [0, 1), mixup and cutmix >= 0")
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise ConfigError(f"mixup/cutmix need an even batch_size, got {self.batch_size}")
        if self.randaug:
            try:
                rand_augment_transform(self.randaug, {})
            except Exception:
                raise ConfigError(f"randaug {self.randaug!r} is not a timm RandAugment spec; "
                                  f"use e.g. 'rand-m9-mstd0.5-inc1-mmax9' or '' for none") from None
        self.train_config().validate()

    def train_config(self) -> TrainConfig:
        """The fields the project's trainer reads, with this recipe's values."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, blr=self.blr,
                           weight_decay=self.weight_decay, beta2=self.beta2, warmup_frac=self.warmup_frac,
                           min_lr_frac=self.min_lr_frac, clip_grad=self.clip_grad,
                           crop_scale_min=self.crop_scale_min, checkpoint_every=self.checkpoint_every,
                           log_every=self.log_every, compile=self.compile)

    def config_hash(self) -> str:
        return config_hash(identity_record(self))     # late fields keep old checkpoints (see late_field)

    def sweep_grid(self) -> list[tuple[float, float]]:
        """The (multiple of blr, layer decay) candidates the held-out sweep tries, in the order
        ties are broken in (the first wins); [] when it does not sweep."""
        if not (self.blr_sweep or self.layer_decay_sweep):
            return []
        return [(factor, decay) for factor in self.blr_sweep or (1.0,)
                for decay in self.layer_decay_sweep or (self.layer_decay,)]

    def at(self, blr: float, layer_decay: float) -> FinetuneConfig:
        """This recipe at one blr and layer decay, without a sweep."""
        return replace(self, blr=blr, layer_decay=layer_decay, blr_sweep=(), layer_decay_sweep=())


@dataclass
class LabelledBatch(Batch):
    targets: Tensor | None = None       # (B, C) soft targets (mixup / smoothing) or (B,) class ids


class Classifier(nn.Module):
    """The encoder with a linear head on its pooled tokens: a `engine.trainer.Trainable`."""

    name = "finetune"
    trains = True
    synced_buffers: tuple[str, ...] = ()

    def __init__(self, encoder: ViT, num_classes: int, pooling: str, label_smoothing: float = 0.0):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)       # MAE's head init
        nn.init.zeros_(self.head.bias)
        self.label_smoothing = label_smoothing

    def logits(self, images: Tensor) -> Tensor:
        return self.head(pool(self.encoder(images), self.pooling))      # (B, C)

    def forward(self, batch: LabelledBatch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.logits(batch.images)
        if batch.targets.ndim == 2:   # soft targets: mixup / cutmix, smoothing already inside
            loss = SoftTargetCrossEntropy()(logits, batch.targets)
        else:
            loss = F.cross_entropy(logits, batch.targets, label_smoothing=self.label_smoothing)
        return loss, {"loss": loss.detach()}

    def after_step(self, step: int, horizon: Horizon) -> None:
        pass

    def group_matcher(self, coarse: bool = False) -> dict:
        return self.encoder.group_matcher(coarse, prefix="encoder.")

    def no_weight_decay(self) -> set[str]:
        return self.encoder.no_weight_decay(prefix="encoder.")


class LabelledBatches:
    """Fine-tuning's batch source: the epoch order of pre-training (`EpochOrder`), then per
    image timm's RandAugment, the batched RandomResizedCrop + flip, and mixup / cutmix on the
    batch. Every draw of step s comes from generators seeded by (seed, s)."""

    def __init__(self, data: ImageSet, cfg: FinetuneConfig, img_size: int, num_classes: int, seed: int,
                 device: torch.device):
        self.cfg, self.img_size, self.seed, self.device = cfg, img_size, seed, device
        self.images, self.labels = data.images.to(device), data.labels.to(device)
        self.order = EpochOrder(len(data), cfg.batch_size, seed)
        self.steps_per_epoch = self.order.steps_per_epoch
        self.mixup = mixup_of(cfg, num_classes)
        self.randaug = rand_augment_of(cfg, img_size)

    def batch_for_step(self, step: int) -> LabelledBatch:
        index = self.order.indices(step).to(self.device)
        # timm's RandAugment and Mixup draw from Python's and NumPy's global generators:
        # seed them per step so that a resumed fine-tune sees the same batches.
        random.seed(step_seed(self.seed, step, stream=4))
        np.random.seed(step_seed(self.seed, step, stream=5) % 2**32)
        uint8 = self.images[index]
        if self.randaug is not None:
            uint8 = self.rand_augment(uint8)
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, stream=2))
        images = random_resized_crop_flip(uint8, self.img_size, gen, scale=(self.cfg.crop_scale_min, 1.0))
        targets = self.labels[index]
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)         # targets: (B, C) soft
        return LabelledBatch(images=images, targets=targets)

    def rand_augment(self, uint8: Tensor) -> Tensor:
        """timm's RandAugment, image by image: uint8 (B, 3, H, W)."""
        pixels = uint8.permute(0, 2, 3, 1).cpu().numpy()                       # (B, H, W, 3)
        out = np.stack([rand_augment(self.randaug, p) for p in pixels])
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(uint8.device)


def mixup_of(cfg: FinetuneConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup / CutMix of the recipe (None when both are off); it draws from NumPy's
    global generator."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, switch_prob=cfg.mixup_switch_prob,
                 label_smoothing=cfg.label_smoothing, num_classes=num_classes)


def rand_augment_of(cfg: FinetuneConfig, img_size: int):
    """timm's RandAugment of the recipe for `img_size` images (None when off)."""
    if not cfg.randaug:
        return None
    return rand_augment_transform(cfg.randaug, {
        "translate_const": int(img_size * 0.45),             # timm's default: 45% of the image
        "img_mean": (124, 116, 104)})


def rand_augment(randaug, pixels: np.ndarray) -> np.ndarray:
    """timm's RandAugment on one uint8 (H, W, 3) image (its ops are PIL ops): uint8 (H, W, 3).
    It draws from Python's and NumPy's global generators: the caller seeds them."""
    return np.array(randaug(Image.fromarray(pixels)))


class AugmentedImages(StepImages):
    """Each image as fine-tuning trains on it, uint8 (3, s, s), in a DataLoader worker (the
    worker's side of `StreamingLabelledBatches`)."""

    def __init__(self, reader: ImageReader, img_size: int, scale: tuple[float, float], randaug, seed: int):
        super().__init__(reader, seed)
        self.img_size, self.scale, self.randaug = img_size, scale, randaug

    def views(self, image: Tensor, step: int, position: int) -> list[Tensor]:
        view = crop_flip(image, self.img_size, self.scale, image_generator(self.seed, step, position, CROP_STREAM))
        if self.randaug is not None:
            # seeded here, per image: a worker's generators would otherwise depend on which
            # images that worker read before
            seed = item_seed(self.seed, step, position, PIL_STREAM)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            view = torch.from_numpy(rand_augment(self.randaug, view.permute(1, 2, 0).numpy())).permute(2, 0, 1)
        return [view]


class StreamingLabelledBatches(StepSource):
    """Fine-tuning's batch source for a split read from its files (engine.stream.StreamedSet):
    the epoch order of `LabelledBatches`; per image in the workers `AugmentedImages`; here the
    standardisation and mixup / cutmix on the batch, NumPy seeded per step as `LabelledBatches`
    does. An unreadable file skipped (--skip-bad-images) is left out of its batch."""

    def __init__(self, data: StreamedSet, cfg: FinetuneConfig, img_size: int, num_classes: int, seed: int,
                 device: torch.device):
        images = AugmentedImages(data.reader, img_size, (cfg.crop_scale_min, 1.0), rand_augment_of(cfg, img_size),
                                 seed)
        super().__init__(images, EpochOrder(len(data), cfg.batch_size, seed), device, data.workers,
                         data.on_bad_image, standardize=False)
        self.seed = seed
        self.mixup = mixup_of(cfg, num_classes)

    def assemble(self, step: int, part: StepPart) -> LabelledBatch:
        images = standardize_pixels(part.views[0].to(self.device, non_blocking=True))     # (B, 3, s, s)
        targets = to_device(part.labels, self.device)                                     # (B,)
        if self.mixup is not None:
            if len(targets) % 2:     # a skipped file left the batch odd, which timm's Mixup refuses
                if len(targets) == 1:
                    raise DataError(f"step {step}'s fine-tune batch has one readable image, and mixup needs "
                                    f"pairs; check the dataset's files (skipped: {len(self.skipped)})")
                images, targets = images[:-1], targets[:-1]
            np.random.seed(step_seed(self.seed, step, stream=5) % 2**32)
            images, targets = self.mixup(images, targets)                   # targets: (B, C) soft
        return LabelledBatch(images=images, targets=targets)


def finetune_trainer(model: Classifier, data: ImageSet | StreamedSet, cfg: FinetuneConfig, work_dir: Path,
                     seed: int, config_hash: str, device: str | torch.device = "cpu", progress: bool = True
                     ) -> Trainer:
    """The project's trainer on labelled batches (held in memory, or read from the files of a
    StreamedSet) with a layer-decayed AdamW + warm-up/cosine (the pre-training plan's factories,
    with timm's `layer_decay`)."""
    cfg.validate()
    device = torch.device(device)
    img_size, num_classes = model.encoder.cfg.img_size, model.head.out_features
    if isinstance(data, StreamedSet):
        batches = StreamingLabelledBatches(data, cfg, img_size, num_classes, seed, device)
    else:
        batches = LabelledBatches(data, cfg, img_size, num_classes, seed, device)
    steps = total_steps(cfg.epochs, len(data), cfg.batch_size)
    plan = adamw_plan(cfg.train_config(), steps, layer_decay=cfg.layer_decay, desc="fine-tune")
    plan = replace(plan, distributed=False)     # rank 0 alone runs evaluations
    return Trainer(model, batches, plan, work_dir, seed, config_hash, device, progress)


@torch.inference_mode()
def top1(model: Classifier, data: ImageSet | StreamedSet, batch_size: int = 1024,
         device: str | torch.device = "cpu") -> float:
    """Top-1 (%) on `data`, read `batch_size` images at a time (a StreamedSet from its files)."""
    model.eval()
    correct = seen = 0
    for images, labels in image_batches(data, batch_size):
        predictions = model.logits(normalize(images.to(device))).argmax(-1).cpu()
        correct += (predictions == labels).sum().item()
        seen += len(labels)
    return 100.0 * correct / seen


def fine_tune(encoder: ViT, train: ImageSet | StreamedSet, num_classes: int, cfg: FinetuneConfig, work_dir: Path,
              ctx: EvalContext) -> tuple[Classifier, dict]:
    """A fine-tuned copy of `encoder` (resuming from `work_dir`'s checkpoints) and its train stats
    (with `data_source` when it read the files, as pre-training records it)."""
    torch.manual_seed(ctx.seed)                               # the head's initial weights
    model = Classifier(encoder.with_config(drop_path=cfg.drop_path), num_classes,
                       cfg.pooling, cfg.label_smoothing).train()
    trainer = finetune_trainer(model, train, cfg, work_dir, ctx.seed,
                               config_hash=f"{cfg.config_hash()}-seed{ctx.seed}", device=ctx.device,
                               progress=ctx.progress)
    if isinstance(trainer.data, LabelledBatches):
        return model, trainer.fit()
    try:
        return model, {**trainer.fit(), "data_source": trainer.data.describe()}
    finally:
        trainer.data.close()        # its workers end here, also when the fine-tune stopped


def held_out_sets(splits: Splits) -> tuple[ImageSet | StreamedSet, ImageSet | StreamedSet]:
    """(fit, holdout): `splits.fit` and `splits.holdout`, or, for a streamed train split (both
    None), its files at `engine.data.holdout_positions`, the draw the memory path's split makes
    (each part reads its own files: a file skipped in one shifts nothing, unlike the probe's rows
    of cached features)."""
    if splits.fit is not None:
        return splits.fit, splits.holdout
    fit, holdout = holdout_positions(len(splits.train))
    return splits.train.subset(fit), splits.train.subset(holdout)


def choose(encoder: ViT, splits: Splits, cfg: FinetuneConfig, ctx: EvalContext) -> tuple[dict, dict]:
    """The blr and layer decay of `cfg.sweep_grid()` with the best held-out top-1, each candidate
    fine-tuned on the fit part of train in its own folder (ties go to the first listed), and the
    sweep as recorded: the grid and every candidate's held-out top-1."""
    num_classes, scores = len(splits.train.classes), []
    fit, holdout = held_out_sets(splits)
    for factor, decay in cfg.sweep_grid():
        # (a blr sweep alone keeps its folders' names from before the layer decay sweep)
        folder = f"sweep-x{factor:g}" + (f"-ld{decay:g}" if cfg.layer_decay_sweep else "")
        candidate = cfg.at(cfg.blr * factor, decay)
        model, _ = fine_tune(encoder, fit, num_classes, candidate, Path(ctx.work_dir) / folder, ctx)
        scores.append({"blr": candidate.blr, "layer_decay": decay,
                       "holdout_top1": top1(model, holdout, ctx.feature_batch, ctx.device)})
    best = scores[max(range(len(scores)), key=lambda i: (scores[i]["holdout_top1"], -i))]
    blrs = sorted({score["blr"] for score in scores})
    grid = {"blr": blrs, "layer_decay": sorted({score["layer_decay"] for score in scores})}
    return ({"blr": best["blr"], "layer_decay": best["layer_decay"]},
            {"grid": grid, "candidates": scores,
             "blr_at_edge": len(blrs) > 1 and best["blr"] in (blrs[0], blrs[-1])})


@register_evaluation("finetune", FinetuneConfig, streams=True)
def run(encoder: ViT, splits: Splits, cfg: FinetuneConfig, ctx: EvalContext) -> EvalResult:
    """Fine-tune a copy of `encoder` on the training split (resuming from `ctx.work_dir`'s
    checkpoints) at the blr and layer decay given in `ctx.choice`, else chosen on the held-out
    part of train when `cfg` sweeps, else at `cfg`'s; then read the test split once: metrics
    {"finetune_top1": ...}."""
    cfg.validate()
    details, work_dir = {}, Path(ctx.work_dir)
    if ctx.choice is not None:
        candidates = [(cfg.blr * factor, decay) for factor, decay in cfg.sweep_grid()]
        if (ctx.choice["blr"], ctx.choice["layer_decay"]) not in candidates:
            raise ConfigError(f"the given fine-tune choice {ctx.choice} is not one of this config's "
                              f"candidates (blr, layer_decay) {candidates}")
        details["choice"] = {"blr": ctx.choice["blr"], "layer_decay": ctx.choice["layer_decay"]}
    elif cfg.sweep_grid():
        details["choice"], details["sweep"] = choose(encoder, splits, cfg, ctx)
    if "choice" in details:
        cfg = cfg.at(details["choice"]["blr"], details["choice"]["layer_decay"])
        # a folder per choice: a run that swept itself, stopped, and is then given another
        # choice (by seed 0) starts that one afresh instead of meeting the other's checkpoints
        work_dir = work_dir / f"final-blr{cfg.blr:g}-ld{cfg.layer_decay:g}"
    model, details["train"] = fine_tune(encoder, splits.train, len(splits.train.classes), cfg, work_dir, ctx)
    # The test split is read here, once, after every choice has been made.
    return EvalResult(metrics={"finetune_top1": top1(model, splits.test, ctx.feature_batch, ctx.device)},
                      details=details)
