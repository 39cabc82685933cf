"""Semantic segmentation through mmsegmentation's own classes (BEiT / MAE protocol).

An mmseg `EncoderDecoder` with a `UPerHead` and an auxiliary `FCNHead` (weight 0.4) on
four feature maps of the ViT (`eval.mmseg_vit.MimbenchViT`, registered in mmseg's
`MODELS`), built from config dicts through mmseg's registry; mmseg datasets and
transforms (RandomResize 0.5-2.0, RandomCrop with cat_max_ratio 0.75, flip,
PhotoMetricDistortion); AdamW with layer-wise lr decay and linear warm-up + poly decay
(timm's optimizer groups and scheduler, as the rest of the project); mIoU from mmseg's
`IoUMetric`. Training is the project's one loop (`engine.trainer.Trainer`) on the segmentor
wrapped as a Trainable (`Segmentor`: data_preprocessor, then mmseg's summed losses), so a
segmentation has the trainer's checkpoints and exact resume after a kill, the non-finite-loss
guard, a checkpoint on SIGTERM, metrics.jsonl and TensorBoard events; evaluation is mmengine's
`test_step`.

Datasets: CamVid (the SegNet 11-class release kept at ../shared/datasets/camvid, read in
place; label 11 is void and ignored) is the default; ADE20K goes through mmseg's
`ADE20KDataset` (150 classes, reduce_zero_label) for users with `ADEChallengeData2016/`.

mmseg is imported only when a segmentation runs: profiles and suites stay importable
(and fast) without it. No compiled mmcv op is called, so it runs on mmcv-lite (`eval.mmcv_ops`);
the result's details name the mmcv that ran.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import PolyLRScheduler
from torch import nn
from tqdm import tqdm

from core.config import ConfigError, identity_record, late_field
from core.files import config_hash
from engine.data import IMAGENET_MEAN, IMAGENET_STD, DataError, Splits, data_root
from engine.trainer import Trainer, TrainPlan, step_seed
from eval.mmcv_ops import guard_mmcv_ops, mmcv_in_use
from eval.registry import EvalContext, EvalResult, register_evaluation
from methods.base import Horizon
from methods.vit import ViT

TORCH_STREAM = 8      # the per-iteration torch seed (dropout, drop path) of segmentation's step seeds
LOG_EVERY = 20        # iterations between flushes of metrics.jsonl
TEST_MODES = ("whole", "slide")
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")


@dataclass(frozen=True)
class SegDataset:
    """Where a dataset's splits live and how mmseg reads them."""
    mmseg_type: str
    classes: int
    ignore_index: int
    splits: dict                # split name -> (image folder, annotation folder), relative to the root
    extra: dict                 # further dataset arguments for mmseg


DATASETS = {
    # SegNet's CamVid: 11 classes, 11 = void. Layout images/<split>, annotations/<split>.
    "camvid": SegDataset("BaseSegDataset", 11, 11,
                         {s: (f"images/{s}", f"annotations/{s}") for s in ("train", "val", "test")},
                         {"metainfo": {"classes": CAMVID_CLASSES}, "img_suffix": ".jpg",
                          "seg_map_suffix": ".png", "reduce_zero_label": False, "ignore_index": 11}),
    # ADE20K: 150 classes; 0 ("other") becomes 255 through reduce_zero_label.
    "ade20k": SegDataset("ADE20KDataset", 150, 255,
                         {"train": ("images/training", "annotations/training"),
                          "val": ("images/validation", "annotations/validation"),
                          "test": ("images/validation", "annotations/validation")},
                         {}),
}


@dataclass(frozen=True)
class SegmentationConfig:
    """Defaults: MAE's UperNet on ADE20K (512 crops, batch 16, lr 1e-4, layer decay 0.65,
    1500 warm-up iterations, poly decay, drop path 0.1, UPerHead width 768)."""
    dataset: str = "ade20k"             # one of DATASETS
    data_root: str | None = None        # default: $MIMBENCH_DATA/camvid (../shared/datasets); ade20k: $MIMBENCH_ADE20K
    train_split: str = "train"
    eval_split: str = "test"            # ADE20K's "test" is its validation set, as in the papers
    scale: tuple[int, int] = (2048, 512)    # (long, short) resize bound (mmseg's ADE20K)
    crop_size: int = 512
    iterations: int = 16000             # MAE: 100 epochs of ADE20K at batch 16 (mmseg runs 160k at 2x8)
    batch_size: int = 16
    lr: float = 1e-4
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    warmup_iters: int = 1500
    drop_path: float = 0.1
    channels: int = 768                 # UPerHead width (MAE / BEiT)
    aux_channels: int = 256             # FCNHead width (mmseg)
    aux_weight: float = 0.4             # auxiliary loss weight (mmseg, BEiT, MAE)
    eval_images: int | None = None      # evaluate on the first N images only (None: all)
    checkpoint_every: int = 1000
    # inference: "whole" (one pass over the resized image) or "slide" (crop_size windows at a
    # stride of 2/3 of a crop, averaged where they overlap: BEiT's and MAE's ADE20K protocol)
    test_mode: str = late_field("whole")

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown segmentation dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        for split in (self.train_split, self.eval_split):
            if split not in DATASETS[self.dataset].splits:
                raise ConfigError(f"{self.dataset} has no split {split!r}; known: "
                                  f"{', '.join(DATASETS[self.dataset].splits)}")
        if self.iterations < 1 or self.batch_size < 1 or self.crop_size < 1 or self.lr <= 0:
            raise ConfigError("segmentation iterations, batch_size and crop_size must be >= 1 and lr > 0")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay {self.layer_decay} must be in (0, 1] (1 = no decay)")
        if self.test_mode not in TEST_MODES:
            raise ConfigError(f"segmentation test_mode {self.test_mode!r} is not one of {', '.join(TEST_MODES)}")

    @property
    def slide_stride(self) -> int:
        """The sliding window's stride: 2/3 of a crop (BEiT: 341 for 512)."""
        return max(1, int(self.crop_size * 2 / 3))

    def config_hash(self) -> str:
        return config_hash(identity_record(self))     # late fields keep old checkpoints (see late_field)


def dataset_root(cfg: SegmentationConfig) -> Path:
    """The dataset folder, checked for the layout mmseg will read (fails before any work)."""
    spec = DATASETS[cfg.dataset]
    if cfg.data_root:
        root = Path(cfg.data_root).expanduser()
    elif cfg.dataset == "camvid":
        root = data_root() / "camvid"              # $MIMBENCH_DATA or ../shared/datasets
    elif os.environ.get("MIMBENCH_ADE20K"):
        root = Path(os.environ["MIMBENCH_ADE20K"]).expanduser()
    else:
        raise DataError("segmentation on ade20k needs the ADEChallengeData2016/ folder; set MIMBENCH_ADE20K="
                        "/path/to/ADEChallengeData2016 or the config's data_root")
    missing = [folder for split in {cfg.train_split, cfg.eval_split} for folder in spec.splits[split]
               if not (root / folder).is_dir()]
    if missing:
        raise DataError(f"{cfg.dataset} folder {root} has no {missing[0]}/; expected "
                        f"{' and '.join(spec.splits[cfg.train_split])} (and those of the eval split) under it")
    return root


def pipelines(cfg: SegmentationConfig) -> tuple[list[dict], list[dict]]:
    """mmseg's train and test pipelines (those of its ADE20K config, at this config's sizes)."""
    ignore = DATASETS[cfg.dataset].ignore_index
    crop = (cfg.crop_size, cfg.crop_size)
    train = [dict(type="LoadImageFromFile"),
             dict(type="LoadAnnotations"),
             dict(type="RandomResize", scale=cfg.scale, ratio_range=(0.5, 2.0), keep_ratio=True),
             dict(type="RandomCrop", crop_size=crop, cat_max_ratio=0.75, ignore_index=ignore),
             dict(type="RandomFlip", prob=0.5),
             dict(type="PhotoMetricDistortion"),
             dict(type="PackSegInputs")]
    # annotations load after the resize: the metric compares at the original resolution
    test = [dict(type="LoadImageFromFile"),
            dict(type="Resize", scale=cfg.scale, keep_ratio=True),
            dict(type="LoadAnnotations"),
            dict(type="PackSegInputs")]
    return train, test


def build_dataset(cfg: SegmentationConfig, split: str, pipeline: list[dict], indices: int | None = None):
    """An mmseg dataset of `split`, built through mmseg's DATASETS registry."""
    from eval.mmseg_vit import use_mmseg_scope
    from mmseg.registry import DATASETS as MMSEG_DATASETS

    use_mmseg_scope()

    spec = DATASETS[cfg.dataset]
    images, annotations = spec.splits[split]
    return MMSEG_DATASETS.build(dict(
        type=spec.mmseg_type, data_root=str(dataset_root(cfg)),
        data_prefix=dict(img_path=images, seg_map_path=annotations),
        pipeline=pipeline, indices=indices, serialize_data=False, **spec.extra))


def model_config(encoder: ViT, cfg: SegmentationConfig, num_classes: int, ignore_index: int) -> dict:
    """The mmseg config of the segmentor: EncoderDecoder + UPerHead + auxiliary FCNHead."""
    from mmengine.config import ConfigDict

    dim = encoder.embed_dim
    norm_cfg = dict(type="BN", requires_grad=True)     # mmseg's configs: SyncBN under DDP
    head = dict(num_classes=num_classes, ignore_index=ignore_index, norm_cfg=norm_cfg,
                align_corners=False, dropout_ratio=0.1)
    # the loss is averaged over labelled pixels (PyTorch's definition; mmseg's legacy
    # default also counts void pixels in the denominator)
    loss = dict(type="CrossEntropyLoss", use_sigmoid=False, avg_non_ignore=True)
    return dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[255 * m for m in IMAGENET_MEAN],
                               std=[255 * s for s in IMAGENET_STD], bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=ignore_index, size=(cfg.crop_size, cfg.crop_size),
                               test_cfg=dict(size_divisor=32)),
        backbone=dict(type="MimbenchViT", encoder=encoder, drop_path=cfg.drop_path, norm_cfg=norm_cfg),
        decode_head=dict(type="UPerHead", in_channels=[dim] * 4, in_index=[0, 1, 2, 3],
                         pool_scales=(1, 2, 3, 6), channels=cfg.channels,
                         loss_decode=dict(loss, loss_weight=1.0),
                         **head),
        auxiliary_head=dict(type="FCNHead", in_channels=dim, in_index=2, channels=cfg.aux_channels,
                            num_convs=1, concat_input=False,
                            loss_decode=dict(loss, loss_weight=cfg.aux_weight), **head),
        # mmseg reads these with attribute access, as its Config files give them
        train_cfg=ConfigDict(),
        test_cfg=ConfigDict(mode="whole") if cfg.test_mode == "whole" else ConfigDict(
            mode="slide", crop_size=(cfg.crop_size, cfg.crop_size), stride=(cfg.slide_stride, cfg.slide_stride)))


def build_segmentor(encoder: ViT, cfg: SegmentationConfig):
    """The mmseg EncoderDecoder, built through mmseg's MODELS registry."""
    from eval.mmseg_vit import build_model   # also registers MimbenchViT

    spec = DATASETS[cfg.dataset]
    return build_model(model_config(encoder, cfg, spec.classes, spec.ignore_index))


def layer_decay_param_groups(model, cfg: SegmentationConfig) -> list[dict]:
    """Backbone: BEiT/MAE layer decay (stem lowest, adapters at the top); heads: scale 1.
    No weight decay on norms, biases and the ViT's tokens."""
    groups = param_groups_layer_decay(model.backbone, weight_decay=cfg.weight_decay,
                                      no_weight_decay_list=model.backbone.no_weight_decay(),
                                      layer_decay=cfg.layer_decay)
    heads = torch.nn.ModuleList([model.decode_head, model.auxiliary_head])
    return groups + param_groups_weight_decay(heads, weight_decay=cfg.weight_decay)


def seed_everything_for(seed: int, iteration: int) -> None:
    """mmseg's transforms draw from Python's and NumPy's global generators: seed them per
    iteration, so a resumed run sees the same crops."""
    random.seed(step_seed(seed, iteration, stream=6))
    np.random.seed(step_seed(seed, iteration, stream=7) % 2**32)
    torch.manual_seed(step_seed(seed, iteration, stream=TORCH_STREAM))


@lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, size: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(step_seed(seed, epoch, stream=9)))


def sample_indices(seed: int, first: int, count: int, size: int) -> list[int]:
    """Samples first .. first+count-1 of an endless stream of per-epoch random orders of
    `size` items: every batch is full, every epoch sees each item once."""
    return [int(epoch_permutation(seed, k // size, size)[k % size]) for k in range(first, first + count)]


class SegBatches:
    """Segmentation's batch source: the items of `sample_indices` through mmseg's training
    pipeline, collated by mmengine (the segmentor's data_preprocessor runs in its forward)."""

    def __init__(self, dataset, batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.steps_per_epoch = max(1, len(dataset) // batch_size)   # batches run across epoch ends

    def batch_for_step(self, step: int) -> dict:
        from mmengine.dataset import pseudo_collate

        seed_everything_for(self.seed, step)
        index = sample_indices(self.seed, step * self.batch_size, self.batch_size, len(self.dataset))
        return pseudo_collate([self.dataset[i] for i in index])


class Segmentor(nn.Module):
    """The mmseg EncoderDecoder as an `engine.trainer.Trainable`: `forward` runs its
    data_preprocessor, then `loss`, and returns the sum of mmseg's losses (`parse_losses`, as
    mmengine's `train_step`). Checkpoints hold the EncoderDecoder's own state-dict keys."""

    name = "segmentation"
    trains = True
    synced_buffers: tuple[str, ...] = ()

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        data = self.model.data_preprocessor(batch, True)
        total, log_vars = self.model.parse_losses(self.model.loss(data["inputs"], data["data_samples"]))
        return total, {key: value.detach() for key, value in log_vars.items()}   # loss, decode.loss_ce, ...

    def after_step(self, step: int, horizon: Horizon) -> None:
        pass

    def state_dict(self, *args, **kwargs) -> dict:
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)


def train_plan(cfg: SegmentationConfig) -> TrainPlan:
    """AdamW (betas 0.9, 0.999) on the layer-decay groups; linear warm-up + poly decay; fp32
    (no autocast, as mmseg's configs); no clipping."""
    def make_optimizer(segmentor: Segmentor) -> torch.optim.Optimizer:
        return torch.optim.AdamW(layer_decay_param_groups(segmentor.model, cfg), lr=cfg.lr, betas=(0.9, 0.999))

    def make_scheduler(optimizer: torch.optim.Optimizer, steps: int) -> PolyLRScheduler:
        warmup = min(cfg.warmup_iters, steps // 2)
        return PolyLRScheduler(optimizer, t_initial=max(1, steps - warmup), power=1.0, warmup_t=warmup,
                               warmup_lr_init=cfg.lr * 1e-6, warmup_prefix=True, t_in_epochs=False)

    return TrainPlan(total_steps=cfg.iterations, batch_size=cfg.batch_size, make_optimizer=make_optimizer,
                     make_scheduler=make_scheduler, checkpoint_every=cfg.checkpoint_every, log_every=LOG_EVERY,
                     precision="fp32", torch_stream=TORCH_STREAM, desc="segmentation",
                     distributed=False)     # rank 0 alone runs evaluations


def segmentation_trainer(model, dataset, cfg: SegmentationConfig, work_dir: Path, seed: int = 0,
                         device: str | torch.device = "cpu", progress: bool = True) -> Trainer:
    """The project's trainer on the segmentor; resumes from `work_dir`'s checkpoints."""
    model.train()
    return Trainer(Segmentor(model), SegBatches(dataset, cfg.batch_size, seed), train_plan(cfg), work_dir, seed,
                   config_hash=f"{cfg.config_hash()}-seed{seed}", device=device, progress=progress)


@torch.inference_mode()
def evaluate(model, dataset, ignore_index: int, progress: bool = True) -> dict[str, float]:
    """mIoU, mAcc, aAcc (%) from mmseg's IoUMetric. Its scores are computed here, not through
    mmengine's Evaluator, which gathers results over every process: under torchrun rank 0
    evaluates alone while the other ranks wait, so a collective there would hang."""
    from mmengine.dataset import pseudo_collate

    guard_mmcv_ops()                        # mmseg.evaluation imports mmcv.ops
    from mmseg.evaluation import IoUMetric

    metric = IoUMetric(iou_metrics=["mIoU"], ignore_index=ignore_index)
    metric.dataset_meta = dataset.metainfo
    model.eval()
    for i in tqdm(range(len(dataset)), desc="segmentation eval", unit="img", disable=not progress, leave=False):
        batch = pseudo_collate([dataset[i]])
        metric.process(batch, [sample.to_dict() for sample in model.test_step(batch)])   # as Evaluator passes them
    return {name: float(value) for name, value in metric.compute_metrics(metric.results).items()}


def check_inputs(cfg: SegmentationConfig) -> None:
    """Fails before any training: a bad config, or a dataset folder mmseg cannot read."""
    cfg.validate()
    dataset_root(cfg)


@register_evaluation("segmentation", SegmentationConfig, check_inputs=check_inputs)
def run(encoder: ViT, splits: Splits | None, cfg: SegmentationConfig, ctx: EvalContext) -> EvalResult:
    """Train the segmentor on a copy of `encoder` and evaluate it once (`splits` is not used:
    the dataset is the config's): metrics seg_miou, seg_macc, seg_aacc. Images are evaluated
    one at a time, whole (`ctx.feature_batch` is not used): a batch would pad each image to the
    largest of its batch and so change the predictions near its border."""
    check_inputs(cfg)
    torch.manual_seed(ctx.seed)                          # the heads' initial weights
    model = build_segmentor(encoder.with_config(), cfg).to(torch.device(ctx.device))
    train_pipeline, test_pipeline = pipelines(cfg)
    train_set = build_dataset(cfg, cfg.train_split, train_pipeline)
    eval_set = build_dataset(cfg, cfg.eval_split, test_pipeline, indices=cfg.eval_images)
    trainer = segmentation_trainer(model, train_set, cfg, Path(ctx.work_dir), ctx.seed, ctx.device, ctx.progress)
    stats = trainer.fit()
    scores = evaluate(model, eval_set, DATASETS[cfg.dataset].ignore_index, ctx.progress)
    train = {**stats, "iterations": cfg.iterations, "resumed_at": trainer.start_step,
             "final_loss": trainer.last_loss}
    return EvalResult(metrics={"seg_miou": scores["mIoU"], "seg_macc": scores["mAcc"], "seg_aacc": scores["aAcc"]},
                      details={"dataset": cfg.dataset, "train": train, "eval_images": len(eval_set),
                               "train_images": len(train_set), **mmcv_in_use()})
