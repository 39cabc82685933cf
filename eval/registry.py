"""The evaluation registry: one name -> (run function, frozen config dataclass), as methods.

    @register_evaluation("fewshot", FewShotConfig)
    def run(encoder: ViT, splits: Splits, cfg: FewShotConfig, ctx: EvalContext) -> EvalResult:
        ...
        return EvalResult(metrics={"fewshot_top1": top1}, details={"shots": cfg.shots})

Every evaluation has this one signature. It gets what a finished run saved (`takes`: the
exported encoder, or BEiT's tokenizer for "tokenizer"), the data splits, its config (the
profile's budget, or the config class's defaults) and an `EvalContext` with its work folder,
the run's feature cache, seed, device, progress flag and any choice made for it already. It
knows nothing of how the encoder was trained. The run layer caches its result under the config
that produced it and calls it again only when that config changes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core.config import unknown
from methods.base import PRODUCTS


@dataclass(frozen=True)
class EvalContext:
    """Where and how an evaluation runs."""
    work_dir: Path              # its own folder: checkpoints of a trained evaluation (a killed one resumes)
    features_dir: Path          # the run's cache of frozen features, shared by the frozen protocols
    seed: int = 0               # the run's seed: a head's initial weights, augmentation draws
    device: Any = "cpu"
    progress: bool = True       # progress bars
    feature_batch: int = 1024   # batch size of feature extraction and inference
    # hyperparameters an evaluation that chooses its own on held-out data (and records them as
    # details["choice"]) takes instead of choosing: the run layer hands a cell's seed-0 choice to
    # its other seeds (fine-tuning's {"blr": ..., "layer_decay": ...}); None: it chooses
    choice: dict | None = None


@dataclass
class EvalResult:
    metrics: dict[str, float]                       # flat and prefixed, e.g. {"knn_top1_cls": 42.3}
    details: dict = field(default_factory=dict)     # anything else worth keeping in the record


@dataclass(frozen=True)
class Evaluation:
    name: str
    config_cls: type
    run: Callable[..., EvalResult]
    takes: str = "encoder"                          # what of a finished run it evaluates (methods.base.PRODUCTS)
    check_inputs: Callable[[Any], None] | None = None   # fails early (before any training) on missing data
    # reads splits.train and splits.test through engine.stream.StreamedSet's interface (batches
    # in order, rows by position): a run whose data streams passes them as StreamedSets, read
    # from the files in batches, never held whole (k-NN, the linear probe, fine-tuning)
    streams: bool = False
    # scores on the held-out part of train: a criterion for choosing hyper-parameters (suites.tune),
    # never a suite's result (compare_methods leaves it out of its evaluations)
    held_out: bool = False


registry: dict[str, Evaluation] = {}


def register_evaluation(name: str, config_cls: type, takes: str = "encoder",
                        check_inputs: Callable[[Any], None] | None = None, streams: bool = False,
                        held_out: bool = False) -> Callable:
    """Decorator that adds `run(product, splits, cfg, ctx) -> EvalResult` under `name`;
    registering a name twice raises."""
    if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
        raise TypeError(f"config of evaluation {name!r} must be a frozen dataclass")
    if takes not in PRODUCTS:
        raise ValueError(f"evaluation {name!r}: takes must be one of {', '.join(PRODUCTS)}, got {takes!r}")

    def add(run: Callable) -> Callable:
        if name in registry:
            raise ValueError(f"evaluation {name!r} is already registered (by {registry[name].run.__module__})")
        registry[name] = Evaluation(name, config_cls, run, takes, check_inputs, streams, held_out)
        return run

    return add


def split_name(name: str) -> tuple[str, str]:
    """"knn@student" -> ("knn", "student"): an evaluation of one of the other encoders a method
    saves (`Method.encoder_variants`; iBOT: its student beside the exported teacher); "knn" ->
    ("knn", "")."""
    base, _, variant = name.partition("@")
    return base, variant


def variant_metrics(metrics: dict[str, float], name: str) -> dict[str, float]:
    """The metrics of evaluation `name` as recorded: a variant's get its name after the
    evaluation's ("knn_top1_cls" of "knn@student" -> "knn_student_top1_cls")."""
    base, variant = split_name(name)
    if not variant:
        return metrics
    return {(f"{base}_{variant}_{key[len(base) + 1:]}" if key.startswith(base + "_") else f"{variant}_{key}"): value
            for key, value in metrics.items()}


def get_evaluation(name: str) -> Evaluation:
    """The registered evaluation `name` (of a variant "knn@student": knn's)."""
    base = split_name(name)[0]
    if base not in registry:
        raise unknown("evaluation", base, registry)
    return registry[base]
