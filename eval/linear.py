"""Linear probe on frozen, cached features (MAE protocol, sped up for a benchmark).

A linear classifier with a non-affine BatchNorm in front (MAE: it standardises the
features, so one learning-rate grid suits every encoder) is trained with SGD + momentum
and a cosine schedule on cached [CLS] and mean-pooled features. The learning rate and
weight decay are chosen on the held-out part of the training split (`Splits.fit` to
train, `Splits.holdout` to choose); the chosen values are then retrained on the whole
training split and the test split is read once, at the very end.

Every (lr, weight decay) of the grid is trained at the same time, as one batched set of
classifiers on the same batches (the shared BatchNorm has no parameters, so the
classifiers differ only in their weights): a sweep costs about one training run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from core.config import ConfigError, late_field
from engine.data import DataError, Splits, holdout_positions
from eval.features import POOLINGS, cached_features, check_precision, feature_file, subset_positions
from eval.registry import EvalContext, EvalResult, register_evaluation
from methods.vit import ViT


@dataclass(frozen=True)
class LinearConfig:
    poolings: tuple[str, ...] = ("cls", "mean")
    block: int | None = None            # probe this block's output instead of the final tokens (BEiT: 9 of 12)
    # DESIGN.md calibration: the best SGD lr sat at the top of {0.01 ... 1.0}; sweep wider.
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3)   # MAE probes with 0
    epochs: int = 30
    batch_size: int = 1024
    momentum: float = 0.9
    seed: int = 0
    # what the encoder computes in while extracting (eval.features.PRECISIONS): bf16 is ~2x
    # faster on a CPU with avx512_bf16 / AMX; runs before this field extracted in fp32
    feature_precision: str = late_field("fp32")

    def validate(self) -> None:
        bad = [p for p in self.poolings if p not in POOLINGS]
        if bad or not self.poolings:
            raise ConfigError(f"linear probe pooling {bad[0] if bad else '(none)'!r} unknown; "
                              f"known: {', '.join(POOLINGS)}")
        if not self.lrs or min(self.lrs) <= 0 or not self.weight_decays or min(self.weight_decays) < 0:
            raise ConfigError("linear probe needs at least one lr > 0 and one weight decay >= 0")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("linear probe epochs and batch_size must be >= 1")


def standardize_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std of the non-affine BatchNorm's running statistics, taken on the whole
    training set (what a BatchNorm's running averages converge to, without their lag)."""
    return features.mean(0), features.var(0, unbiased=False).add(1e-6).sqrt()


def train_linear(features: Tensor, labels: Tensor, num_classes: int, lrs: Tensor, weight_decays: Tensor,
                 cfg: LinearConfig) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Train G = len(lrs) classifiers at once, classifier g with (lrs[g], weight_decays[g]).

    Returns weights (G, D, C), biases (G, C) and the standardisation (mean, std) to apply
    to evaluation features. Training batches are standardised with their own statistics,
    as a BatchNorm in train mode does.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    num, dim = features.shape
    groups = len(lrs)
    weight = torch.randn(groups, dim, num_classes, generator=gen) * 0.01   # MAE: trunc_normal(std=0.01)
    bias = torch.zeros(groups, num_classes)
    momentum_w, momentum_b = torch.zeros_like(weight), torch.zeros_like(bias)
    steps_per_epoch = max(1, num // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    lr_w, wd_w = lrs.view(-1, 1, 1), weight_decays.view(-1, 1, 1)
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(num, generator=gen)
        index = order[(step % steps_per_epoch) * cfg.batch_size:][:cfg.batch_size]
        x = F.batch_norm(features[index], None, None, training=True, eps=1e-6)    # (B, D)
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        logits = torch.einsum("bd,gdc->gbc", x, weight) + bias[:, None]        # (G, B, C)
        # summed over classifiers: each one's gradient is that of its own mean loss
        loss = F.cross_entropy(logits.flatten(0, 1), labels[index].repeat(groups), reduction="sum") / len(index)
        grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
        weight, bias = weight.detach(), bias.detach()
        scale = 0.5 * (1 + math.cos(math.pi * step / total))                   # cosine to 0
        momentum_w.mul_(cfg.momentum).add_(grad_w + wd_w * weight)
        momentum_b.mul_(cfg.momentum).add_(grad_b)                              # no decay on biases
        weight = weight - scale * lr_w * momentum_w
        bias = bias - scale * lrs.view(-1, 1) * momentum_b
    return weight, bias, standardize_stats(features)


def top1(weight: Tensor, bias: Tensor, stats: tuple[Tensor, Tensor], features: Tensor,
         labels: Tensor) -> Tensor:
    """Top-1 (%) of each of the G classifiers on (features, labels): (G,)."""
    x = (features - stats[0]) / stats[1]
    logits = torch.einsum("nd,gdc->gnc", x, weight) + bias[:, None]
    return (logits.argmax(-1) == labels).double().mean(-1) * 100


def check_inputs(cfg: LinearConfig) -> None:
    """Before any training: a bad config, or a bf16 extraction this machine cannot run, fails now."""
    cfg.validate()
    check_precision(cfg.feature_precision)


@register_evaluation("linear", LinearConfig, streams=True, check_inputs=check_inputs)
def run(vit: ViT, splits: Splits, cfg: LinearConfig, ctx: EvalContext) -> EvalResult:
    """Sweep on fit/holdout, retrain the chosen values on train, then read test once.

    Metrics {"linear_top1_<pooling>[_block<k>]": ...}; details with,
    per pooling, the chosen lr / weight decay, whether each sits at the edge of its grid,
    and the holdout top-1 of every point of the sweep.
    """
    cfg.validate()
    if cfg.block is not None and not -vit.cfg.depth <= cfg.block < vit.cfg.depth:
        raise ConfigError(f"linear probe block {cfg.block} out of range for a depth-{vit.cfg.depth} "
                          f"encoder; pick one in 0..{vit.cfg.depth - 1} or None (final tokens)")
    feature_dir, precision = ctx.features_dir, cfg.feature_precision
    kw = dict(batch_size=ctx.feature_batch, device=ctx.device, progress=ctx.progress, block=cfg.block,
              precision=precision)
    train = cached_features(vit, splits.train, feature_file(feature_dir, "train", cfg.block, precision),
                            desc="features train", **kw)
    (fit_index, fit_labels), (holdout_index, holdout_labels) = held_out_rows(splits, train["labels"])
    num_classes = len(splits.train.classes)
    grid = [(lr, wd) for lr in cfg.lrs for wd in cfg.weight_decays]
    lrs = torch.tensor([lr for lr, _ in grid])
    wds = torch.tensor([wd for _, wd in grid])

    chosen, details = {}, {}
    for pooling in cfg.poolings:
        feats = train[pooling].float()
        weight, bias, stats = train_linear(feats[fit_index], fit_labels, num_classes, lrs, wds, cfg)
        holdout_top1 = top1(weight, bias, stats, feats[holdout_index], holdout_labels)
        best = int(holdout_top1.argmax())        # ties: the first in grid order (the smaller lr)
        lr, wd = grid[best]
        chosen[pooling] = train_linear(feats, train["labels"], num_classes,
                                       torch.tensor([lr]), torch.tensor([wd]), cfg)
        details[pooling] = {
            "lr": lr, "weight_decay": wd,
            "lr_at_edge": len(cfg.lrs) > 1 and lr in (min(cfg.lrs), max(cfg.lrs)),
            "weight_decay_at_edge": len(cfg.weight_decays) > 1 and wd == max(cfg.weight_decays),
            "holdout_top1": float(holdout_top1[best]),
            "sweep": [{"lr": g_lr, "weight_decay": g_wd, "holdout_top1": float(acc)}
                      for (g_lr, g_wd), acc in zip(grid, holdout_top1)],
        }

    # The test split is read here, once, after every choice has been made.
    test = cached_features(vit, splits.test, feature_file(feature_dir, "test", cfg.block, precision),
                           desc="features test", **kw)
    suffix = "" if cfg.block is None else f"_block{cfg.block}"
    metrics = {}
    for pooling, (weight, bias, stats) in chosen.items():
        metrics[f"linear_top1_{pooling}{suffix}"] = float(
            top1(weight, bias, stats, test[pooling].float(), test["labels"])[0])
    return EvalResult(metrics, details)


def held_out_rows(splits: Splits, train_labels: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(rows, labels) of `splits.fit` and of `splits.holdout` in the cached train features
    (labelled `train_labels`): found by their pixels in memory; by position when train streams
    (fit and holdout None)."""
    if splits.fit is not None:
        return ((subset_positions(splits.train, splits.fit), splits.fit.labels),
                (subset_positions(splits.train, splits.holdout), splits.holdout.labels))
    if len(train_labels) != len(splits.train):
        raise DataError(f"{len(splits.train) - len(train_labels)} of the {len(splits.train)} train images were "
                        f"unreadable and skipped: the streamed linear probe takes its held-out rows by "
                        f"position, so it needs every one; remove or repair the bad files")
    return tuple((rows, train_labels[rows]) for rows in holdout_positions(len(splits.train)))
