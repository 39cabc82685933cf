"""One run: resolve its config, pre-train (resuming), export the encoder, evaluate, record.

A run is a folder `outputs/runs/<method>-<hash>` named by the hash of its resolved
pre-training config, so two suites that need the same pre-training share it:

    config.json          the resolved config (method, method config, train config, data, seed)
    metrics.jsonl        per-step loss / lr / grad norm
    checkpoints/         the last two checkpoints (atomic)
    encoder.safetensors  the exported encoder, timm key names
    features/            cached frozen features per split
    result.json          status (done / failed), method, seed, flat `metrics`, train stats, provenance

Prerequisites (BEiT's stage-1 tokenizer): a method class may define
`prerequisites(cfg) -> {role: {"method", "overrides", "train", "seed", "evals"}}`, runs it
needs finished first ("train" overrides the profile's TrainConfig). `resolve` puts their
resolved configs under the run's "requires" key (only such methods get the key, so other
runs keep their hashes); before training, the runner executes them like any run -
content-addressed, so every run asking for the same one shares a single folder - and
passes their folders to `method.use_prerequisites({role: run_dir})`. A method whose product
is not an encoder (the tokenizer) writes it with `save_artifacts(run_dir)` instead.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from engine import distributed
from engine.data import DEFAULT_CIFAR10, Splits, check_dataset_root, load_splits, synthetic_splits
from engine.records import config_hash, read_json, write_json
from engine.trainer import Preempted, Trainer, TrainConfig
from eval import knn
from eval import tokenizer as tokenizer_eval
from eval.features import cached_features
from methods import build_method, method_config, registry
from methods.registry import ConfigError, build_config, unknown
from methods.vit import save_encoder
from suites import evaluations
from suites.figures import write_figures
from suites.profiles import Profile

SCHEMA = 1
EVALUATIONS = ("knn", "tokenizer", *evaluations.ENCODER_EVALUATIONS)


@dataclass(frozen=True)
class RunSpec:
    """One cell of a suite's grid (seeds are added by the suite runner)."""
    method: str
    setting: str = "default"                        # label shown in tables, e.g. "random 0.75"
    overrides: dict = field(default_factory=dict)   # method config overrides
    evals: tuple[str, ...] = ("knn",)               # any of EVALUATIONS
    train: dict = field(default_factory=dict)       # TrainConfig overrides, e.g. {"epochs": 2.5}


class RunSkipped(Exception):
    """Another process holds this run's lock."""


def deep_merge(base: dict, *updates: dict) -> dict:
    out = dict(base)
    for update in updates:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = deep_merge(out[key], value)
            else:
                out[key] = value
    return out


def data_descriptor(profile: Profile, data: str | None) -> dict:
    if data is None and profile.data == "user":
        raise ConfigError(f"profile {profile.name!r} needs --data PATH (an ImageFolder with train/ and test/)")
    if data is None and profile.data == "synthetic":
        return {"name": "synthetic", "img_size": profile.encoder["img_size"]}
    path = check_dataset_root(Path(data) if data else DEFAULT_CIFAR10)
    return {"name": path.name, "path": str(path.resolve()), "img_size": profile.encoder["img_size"]}


def resolve(spec: RunSpec, profile: Profile, seed: int, data: dict, check_inputs: bool = True) -> dict:
    """The full pre-training config of a run (what its hash covers). `check_inputs`: fail now
    when an evaluation's data is missing (off only for cost listings)."""
    if spec.method not in registry:
        raise unknown("method", spec.method, registry)
    bad = [e for e in spec.evals if e not in EVALUATIONS]
    if bad:
        raise unknown("evaluation", bad[0], EVALUATIONS)
    if check_inputs:
        evaluations.check_inputs(spec.evals, profile)
    method_cls = registry[spec.method][0]
    wrong = [e for e in spec.evals if (e == "tokenizer") != hasattr(method_cls, "tokenize")]
    if wrong:
        raise ConfigError(f"method {spec.method!r} cannot take the {wrong[0]!r} evaluation: 'tokenizer' is "
                          f"for tokenizer runs (dvae), the others for encoders; fix the RunSpec's evals")
    overrides = deep_merge({"encoder": profile.encoder},
                           profile.method_defaults.get(spec.method, {}), spec.overrides)
    cfg = method_config(spec.method, **overrides)
    trains = method_cls.trains
    if spec.train and not trains:
        raise ConfigError(f"method {spec.method!r} does not train; drop the RunSpec's train overrides")
    train = build_config(TrainConfig, {**dataclasses.asdict(profile.train), **spec.train},
                         where=f"train config of {spec.method!r} ({spec.setting})")
    config = {
        "schema": SCHEMA,
        "method": spec.method,
        "method_config": method_record(spec.method, cfg),
        # the untrained baseline does not depend on the training budget: share it across profiles
        "train": train_record(train) if trains else None,
        "seed": seed,
        "data": data,
    }
    needs = method_cls.prerequisites(cfg) if hasattr(method_cls, "prerequisites") else {}
    if needs:
        config["requires"] = {role: resolve_prerequisite(need, profile, data) for role, need in needs.items()}
    return config


def train_record(train: TrainConfig) -> dict:
    """The training recipe as hashed into a run's config (see `record_without_late_defaults`)."""
    return record_without_late_defaults(train, LATE_TRAIN_FIELDS)


def method_record(method: str, cfg) -> dict:
    """The method's config as hashed into a run's config (see `record_without_late_defaults`)."""
    return record_without_late_defaults(cfg, LATE_METHOD_FIELDS.get(method, ()))


def record_without_late_defaults(cfg, late: tuple[str, ...]) -> dict:
    """`dataclasses.asdict(cfg)` without the fields of `late` that hold their default. Fields
    added after the first runs existed appear only when changed, so run folders written
    before a field existed keep their names (and are not re-run)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    record = dataclasses.asdict(cfg)
    for name in late:
        if json.dumps(record[name]) == json.dumps(defaults[name]):
            del record[name]
    return record


# fields added to TrainConfig / to a method's config after runs using it existed
LATE_TRAIN_FIELDS = ("precision",)
LATE_METHOD_FIELDS = {"ibot": ("local_crops_number", "local_crop_size", "local_crops_scale")}


def resolve_prerequisite(need: dict, profile: Profile, data: dict) -> dict:
    """{"config": resolved config, "evals": [...]} of a run another run requires. Its config
    comes from the method's hook alone (plus data and the profile's training recipe with
    the hook's "train" overrides), not from the profile's encoder or method defaults."""
    budget = dataclasses.replace(profile, encoder={}, method_defaults={})
    spec = RunSpec(need["method"], "prerequisite", need["overrides"], tuple(need["evals"]), need["train"])
    return {"config": resolve(spec, budget, need["seed"], data), "evals": list(spec.evals)}


def run_dir_for(outputs: Path, config: dict) -> Path:
    return Path(outputs) / "runs" / f"{config['method']}-{config_hash(config)}"


@lru_cache(maxsize=4)
def load_data(data_json: str, on_bad_image: str = "error", progress: bool = True) -> Splits:
    data = json.loads(data_json)
    if data["name"] == "synthetic":
        return synthetic_splits(img_size=data["img_size"])
    return load_splits(data["path"], data["img_size"], on_bad_image=on_bad_image, progress=progress)


def source_commit() -> str | None:
    """The git commit of the code this process runs, with "+dirty" for uncommitted changes
    to tracked files; None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                              timeout=5).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return (commit + "+dirty" if git("status", "--porcelain", "--untracked-files=no") else commit) or None
    except (OSError, subprocess.SubprocessError):
        return None


# read when the code is loaded, not when a record is written hours later (the checkout may
# have moved on meanwhile)
SOURCE_COMMIT = source_commit()


def provenance() -> dict:
    import timm

    return {"git_commit": SOURCE_COMMIT, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def read_result(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "result.json"
    if not path.exists():
        return None
    result = read_json(path)
    if result.get("schema", 0) > SCHEMA:
        raise ConfigError(f"{path} was written by a newer mimbench (schema {result['schema']} > {SCHEMA}); "
                          f"upgrade mimbench or use another --outputs folder")
    return result


def is_done(run_dir: Path, evals: tuple[str, ...], profile: Profile | None = None) -> bool:
    """Finished with every evaluation in `evals` (and, given a profile, each at its budget)."""
    result = read_result(run_dir)
    return bool(result) and result["status"] == "done" and not stale_evaluations(result, evals, profile)


def stale_evaluations(result: dict, evals: tuple[str, ...], profile: Profile | None = None) -> list[str]:
    """The evaluations in `evals` that a finished run's record lacks (or, given a profile, holds
    at another budget)."""
    recorded = result.get("evals", {})
    current = ("knn",) + evaluations.ENCODER_EVALUATIONS
    return [name for name in evals if name not in recorded or (
        profile is not None and name in current and not evaluations.is_current(recorded[name], name, profile))]


def execute(config: dict, spec: RunSpec, profile: Profile, outputs: Path, device: str = "cpu",
            progress: bool = True, on_bad_image: str = "error") -> dict:
    """Run (or resume, or skip) one run; returns its result record. A failure is recorded
    in result.json (status, error, traceback) and re-raised."""
    run_dir = run_dir_for(outputs, config)
    distributed.barrier()  # under torchrun: rank 0 has finished writing the previous run
    if not distributed.is_main():
        # other ranks only take part in pre-training; rank 0 owns the lock, records and evaluations
        if not is_done(run_dir, spec.evals, profile):
            _train_and_evaluate(config, spec, profile, run_dir, device, False, on_bad_image)
        distributed.barrier()
        return {}
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunSkipped(f"{run_dir.name} is running in another process; skipped here") from None
    try:
        return _execute_locked(config, spec, profile, run_dir, device, progress, on_bad_image)
    finally:
        lock.release()
        distributed.barrier()


def _execute_locked(config: dict, spec: RunSpec, profile: Profile, run_dir: Path, device: str,
                    progress: bool, on_bad_image: str) -> dict:
    if is_done(run_dir, spec.evals, profile):
        return read_result(run_dir)
    if (run_dir / "config.json").exists():
        if read_json(run_dir / "config.json") != json.loads(json.dumps(config)):
            raise ConfigError(f"{run_dir}/config.json differs from this run's config; "
                              f"move the folder away or use another --outputs")
    else:
        write_json(run_dir / "config.json", config)
    started = time.time()
    try:
        result = _train_and_evaluate(config, spec, profile, run_dir, device, progress, on_bad_image)
    except Preempted:
        raise  # not a failure: the checkpoint is written, the same command resumes
    except Exception as err:
        failure = {"error": f"{err.__class__.__name__}: {err}", "traceback": traceback.format_exc()}
        previous = read_result(run_dir)
        if previous and previous["status"] == "done":
            # pre-training (and the evaluations before this one) finished: keep them, for this
            # suite's rerun and for every other suite sharing the run
            write_json(run_dir / "result.json", {**previous, "failed_evaluation": failure})
        else:
            write_json(run_dir / "result.json", {
                "schema": SCHEMA, "status": "failed", "method": config["method"], "seed": config["seed"],
                "config_hash": config_hash(config), **failure, "metrics": {}, "provenance": provenance()})
        raise
    result["wall_seconds"] = time.time() - started
    write_json(run_dir / "result.json", result)
    return result


def _train_and_evaluate(config: dict, spec: RunSpec, profile: Profile, run_dir: Path, device: str,
                        progress: bool, on_bad_image: str) -> dict:
    splits = load_data(json.dumps(config["data"], sort_keys=True), on_bad_image, progress)
    torch.manual_seed(config["seed"])            # the encoder's initial weights
    method = build_method(config["method"], **config["method_config"])
    previous = read_result(run_dir) or {}
    train_stats = previous.get("train") if previous.get("status") == "done" else None
    evals = dict(previous.get("evals", {}))
    outputs = run_dir.parent.parent

    def record_progress() -> None:
        """result.json after pre-training and after each evaluation: a later failure or stop keeps them."""
        write_json(run_dir / "result.json", done_record(config, evals, train_stats, outputs))

    if train_stats is None:
        if "requires" in config:
            method.use_prerequisites(run_prerequisites(config, profile, outputs, device, progress,
                                                       on_bad_image))
        train = TrainConfig(**config["train"]) if config["train"] else profile.train   # None: does not train
        trainer = Trainer(method, splits.train.images, train, run_dir, seed=config["seed"],
                          config_hash=config_hash(config), device=device, progress=progress)
        train_stats = trainer.fit()
        if not distributed.is_main():
            return {}
        if hasattr(method, "save_artifacts"):
            method.save_artifacts(run_dir)
        else:
            save_encoder_atomic(method, run_dir / "encoder.safetensors")
            write_figures(method, splits.test, run_dir, device=device)
        encoder = method.export_encoder()
        record_progress()
    else:  # pre-training finished earlier; only new evaluations run, on what the run saved
        method, encoder = load_saved(method, run_dir)

    if "knn" in spec.evals and not evaluations.is_current(evals.get("knn"), "knn", profile):
        kw = dict(batch_size=profile.feature_batch, device=device, progress=progress)
        train_feats = cached_features(encoder, splits.train, run_dir / "features" / "train.safetensors",
                                      desc="features train", **kw)
        test_feats = cached_features(encoder, splits.test, run_dir / "features" / "test.safetensors",
                                     desc="features test", **kw)
        evals["knn"] = {"config": dataclasses.asdict(profile.knn),
                        "metrics": knn.run(train_feats, test_feats, profile.knn)}
        record_progress()
    if "tokenizer" in spec.evals and "tokenizer" not in evals:
        evals["tokenizer"] = {"config": {"split": "test"}, "metrics": tokenizer_eval.run(
            method, splits.test, batch_size=profile.feature_batch, device=device, progress=progress)}
        record_progress()
    for name in spec.evals:
        if name in evaluations.ENCODER_EVALUATIONS and not evaluations.is_current(evals.get(name), name, profile):
            evals[name] = evaluations.run_evaluation(name, encoder, splits, profile, run_dir, config["seed"],
                                                     device, progress)
            record_progress()
    return done_record(config, evals, train_stats, outputs)


def done_record(config: dict, evals: dict, train_stats: dict, outputs: Path) -> dict:
    """result.json of a run whose pre-training finished, with the evaluations done so far."""
    metrics = {name: value for e in evals.values() for name, value in e["metrics"].items()}
    for key in ("images_per_second", "flops_total"):
        if train_stats.get(key) is not None:
            metrics[f"pretrain_{key}"] = train_stats[key]
    result = {"schema": SCHEMA, "status": "done", "method": config["method"], "seed": config["seed"],
              "config_hash": config_hash(config), "metrics": metrics, "evals": evals,
              "train": train_stats, "provenance": provenance()}
    if "requires" in config:
        result["prerequisites"] = {role: run_dir_for(outputs, need["config"]).name
                                   for role, need in config["requires"].items()}
    return result


def load_saved(method, run_dir: Path):
    """(method, encoder) as a finished run saved them. The saved encoder is the exported one
    (iBOT's teacher), so it is evaluated as loaded, never put back into a freshly built method."""
    from methods.dvae import TOKENIZER_FILE, load_tokenizer
    from methods.vit import load_encoder

    if (run_dir / TOKENIZER_FILE).exists():
        return load_tokenizer(run_dir / TOKENIZER_FILE), None
    return method, load_encoder(run_dir / "encoder.safetensors")


def run_prerequisites(config: dict, profile: Profile, outputs: Path, device: str, progress: bool,
                      on_bad_image: str) -> dict[str, Path]:
    """Finish the runs `config` requires (or find them finished); their folders by role."""
    run_dirs = {}
    for role, need in config["requires"].items():
        spec = RunSpec(need["config"]["method"], role, evals=tuple(need["evals"]))
        run_dirs[role] = run_dir_for(outputs, need["config"])
        state = "done, reused" if is_done(run_dirs[role], spec.evals) else "running it first"
        print(f"  {role}: {run_dirs[role].name} ({state})", flush=True)
        budget = dataclasses.replace(profile, train=TrainConfig(**need["config"]["train"]))
        execute(need["config"], spec, budget, outputs, device, progress, on_bad_image)
    return run_dirs


def save_encoder_atomic(method, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_encoder(method.export_encoder(), tmp)
    os.replace(tmp, path)
