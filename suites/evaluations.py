"""The evaluations a run's spec can ask for beyond k-NN, each a function of the exported
encoder with its budget from the profile.

A result is cached in result.json under `evals[name]` with the config that produced it;
the runner calls an evaluation again only when it is missing or its config changed, so
adding one to a finished suite runs only the new work. Each keeps its working files in
`<run>/evals/<name>-<config hash>/` (fine-tuning and segmentation checkpoints: a killed
evaluation resumes) and, once it has finished, its record (`result.json`), so that a
run killed during a later evaluation keeps the finished ones.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from engine.data import Splits
from engine.records import config_hash, read_json, write_json
from methods.vit import ViT
from suites.profiles import Profile

ENCODER_EVALUATIONS = ("linear", "finetune", "segmentation")


def eval_config(name: str, profile: Profile) -> dict:
    """The config of evaluation `name` at this profile's budget, as recorded in result.json."""
    return dataclasses.asdict(profile.knn if name == "knn" else getattr(profile.eval_budget, name))


def is_current(record: dict | None, name: str, profile: Profile) -> bool:
    """Whether result.json's `evals[name]` was produced with this profile's config."""
    return bool(record) and record.get("config") == json.loads(json.dumps(eval_config(name, profile)))


def check_inputs(names, profile: Profile) -> None:
    """Fail before any training when an evaluation's inputs are missing (segmentation data)."""
    if "segmentation" in names:
        from eval.segmentation import dataset_root

        profile.eval_budget.segmentation.validate()
        dataset_root(profile.eval_budget.segmentation)


def run_evaluation(name: str, encoder: ViT, splits: Splits, profile: Profile, run_dir: Path, seed: int,
                   device: str, progress: bool) -> dict:
    """{"config", "metrics", "details", "seconds"} of one evaluation of `encoder`."""
    config = eval_config(name, profile)
    work_dir = Path(run_dir) / "evals" / f"{name}-{config_hash(config)}"
    if (work_dir / "result.json").exists():      # finished before the run was stopped
        return read_json(work_dir / "result.json")
    started = time.time()
    if name == "linear":
        from eval import linear

        out = linear.run(encoder, splits, profile.eval_budget.linear, Path(run_dir) / "features",
                         batch_size=profile.feature_batch, device=device, progress=progress)
    elif name == "finetune":
        from eval import finetune

        out = finetune.run(encoder, splits, profile.eval_budget.finetune, work_dir, seed=seed, device=device,
                           progress=progress, eval_batch=profile.feature_batch)
    elif name == "segmentation":
        from eval import segmentation

        out = segmentation.run(encoder, profile.eval_budget.segmentation, work_dir, seed=seed, device=device,
                               progress=progress)
    else:
        raise ValueError(f"{name!r} is not one of {ENCODER_EVALUATIONS}")
    record = {"config": config, **out, "seconds": time.time() - started}
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json(work_dir / "result.json", record)
    return record


