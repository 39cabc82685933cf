"""Weighted k-NN on frozen features (DINO / iBOT protocol): cosine similarity, the k
nearest training features vote with weight exp(sim / T); top-1 on the test split, for the
[CLS] and the mean-pooled features (extracted once per run and cached)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from core.config import late_field
from engine.data import Splits
from eval.features import cached_features, check_precision, feature_file, subset_positions
from eval.registry import EvalContext, EvalResult, register_evaluation
from methods.vit import ViT


@dataclass(frozen=True)
class KNNConfig:
    k: int = 20                  # DINO / iBOT
    temperature: float = 0.07    # DINO / iBOT
    chunk_size: int = 2048       # test features per similarity matmul (bounds memory)
    # what the encoder computes in while extracting (eval.features.PRECISIONS): bf16 is ~2x
    # faster on a CPU with avx512_bf16 / AMX; runs before this field extracted in fp32
    feature_precision: str = late_field("fp32")


# Similarities held at once (float32): 1 GiB. A test chunk against all of CIFAR-10's train
# (2048 x 50,000) fits, so those runs compute as they always did; ImageNet's 1.28M train
# features are compared in slices, keeping each test row's running top k.
MAX_SIMILARITIES = 2**28


@torch.inference_mode()
def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, cfg: KNNConfig = KNNConfig(),
             max_similarities: int = MAX_SIMILARITIES) -> float:
    """Top-1 accuracy (%) of the temperature-weighted k-NN classifier."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(cfg.k, len(train_feats))
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    correct = 0
    for start in range(0, len(test), cfg.chunk_size):
        top_sims, top_idx = nearest(test[start:start + cfg.chunk_size], train, k, max_similarities)   # (C, k)
        weights = (top_sims / cfg.temperature).exp()
        votes = torch.zeros(len(top_idx), num_classes).scatter_add_(1, train_labels[top_idx], weights)
        correct += (votes.argmax(dim=1) == test_labels[start:start + cfg.chunk_size]).sum().item()
    return 100.0 * correct / len(test)


def nearest(queries: torch.Tensor, keys: torch.Tensor, k: int, max_similarities: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices) of each query's k most similar keys, descending: one matmul
    when (C, N_keys) fits `max_similarities`, else over slices of the keys, merging top ks."""
    step = max(k, max_similarities // max(1, len(queries)))
    if step >= len(keys):
        return (queries @ keys.T).topk(k, dim=1)                            # (C, N_train) -> (C, k)
    best_sims = best_idx = None
    for start in range(0, len(keys), step):
        sims, idx = (queries @ keys[start:start + step].T).topk(min(k, len(keys) - start), dim=1)
        idx = idx + start
        if best_sims is not None:
            sims, pick = torch.cat([best_sims, sims], dim=1).topk(k, dim=1)
            idx = torch.cat([best_idx, idx], dim=1).gather(1, pick)
        best_sims, best_idx = sims, idx
    return best_sims, best_idx


def knn_metrics(train_features: dict, test_features: dict, cfg: KNNConfig = KNNConfig()) -> dict[str, float]:
    """k-NN top-1 for every pooling present in both feature dicts: {'knn_top1_cls': ..., ...}."""
    return {f"knn_top1_{p}": knn_top1(train_features[p], train_features["labels"],
                                      test_features[p], test_features["labels"], cfg)
            for p in ("cls", "mean") if p in train_features and p in test_features}


def check_inputs(cfg: KNNConfig) -> None:
    """Before any training: a bf16 extraction this machine cannot run fails now."""
    check_precision(cfg.feature_precision)


@register_evaluation("knn", KNNConfig, streams=True, check_inputs=check_inputs)
def run(encoder: ViT, splits: Splits, cfg: KNNConfig, ctx: EvalContext) -> EvalResult:
    """{'knn_top1_cls', 'knn_top1_mean'} of the frozen encoder's final tokens."""
    kw = dict(batch_size=ctx.feature_batch, device=ctx.device, progress=ctx.progress,
              precision=cfg.feature_precision)
    train = cached_features(encoder, splits.train,
                            feature_file(ctx.features_dir, "train", precision=cfg.feature_precision),
                            desc="features train", **kw)
    test = cached_features(encoder, splits.test,
                           feature_file(ctx.features_dir, "test", precision=cfg.feature_precision),
                           desc="features test", **kw)
    return EvalResult(knn_metrics(train, test, cfg))


@register_evaluation("knn_holdout", KNNConfig, check_inputs=check_inputs, held_out=True)
def run_holdout(encoder: ViT, splits: Splits, cfg: KNNConfig, ctx: EvalContext) -> EvalResult:
    """k-NN with the train split's fit part as memory and its held-out part as queries: the
    criterion hyper-parameters are chosen by (`suites.tune`), so the test split stays untouched.
    Reads the train features `knn` caches (one extraction serves both)."""
    train = cached_features(encoder, splits.train,
                            feature_file(ctx.features_dir, "train", precision=cfg.feature_precision),
                            desc="features train", batch_size=ctx.feature_batch, device=ctx.device,
                            progress=ctx.progress, precision=cfg.feature_precision)
    fit, held_out = (subset_positions(splits.train, part) for part in (splits.fit, splits.holdout))
    pick = lambda positions: {name: value[positions] for name, value in train.items()}   # noqa: E731
    return EvalResult({f"holdout_{name}": value for name, value in knn_metrics(pick(fit), pick(held_out), cfg).items()})
