"""Execute one run: its prerequisites, pre-training (resuming), its product, its evaluations, its
record. A run is a folder `outputs/runs/<method>-<hash>` (`runs.identity`):

    config.json          the resolved config (RunConfig.to_dict)
    metrics.jsonl, tb/   per-step loss / lr / monitors (and TensorBoard event files)
    checkpoints/         the last two checkpoints (atomic)
    encoder.safetensors  the exported encoder, timm key names (tokenizer runs: tokenizer.safetensors)
    <variant>.safetensors  the method's other encoders (`encoder_variants`; iBOT: its student)
    figures/             reconstructions and attention maps
    features/            cached frozen features per split
    evals/<name>-<hash>/ an evaluation's working files (checkpoints) and, once finished, its record
    result.json          the run record (runs.records.RunRecord)

Prerequisites (BEiT's tokenizer) are declared by the method (`Method.prerequisites`); they run
first, like any run and content-addressed, so every run asking for the same one shares a single
folder; their products are loaded here and handed to `method.use_prerequisites`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
import traceback
from functools import lru_cache
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from core.config import ConfigError
from core.files import atomic_path, config_hash, read_json, write_json
from engine import distributed
from engine.checkpoint import load_latest
from engine.data import Splits, synthetic_splits
from engine.splits import choose_source, load_splits, streamed_splits
from engine.stream import StreamingViews
from engine.trainer import Preempted, Trainer
from engine.views import pretraining
from eval.registry import EvalContext, get_evaluation, split_name, variant_metrics
from methods import registry
from methods.dvae import TOKENIZER_FILE, load_tokenizer, save_tokenizer
from methods.vit import load_encoder, save_encoder
from runs.figures import first_of_each_class, write_figures
from runs.identity import Budget, Run, RunConfig, RunSpec, build_from_record, identity_record
from runs.records import EvalRecord, NewerSchemaError, RecordError, RunRecord, read_record, write_record

ENCODER_FILE = "encoder.safetensors"


class RunSkipped(Exception):
    """Another process holds this run's lock."""


class UnreadableRecord(RuntimeError):
    """A run folder's result.json does not parse or validate: that run fails (its file is left
    as it is), the others go on."""


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
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}


# ---- state of a run folder -----------------------------------------------------------------
def read_result(run_dir: Path) -> RunRecord | None:
    """The folder's record. A record of a newer mimbench is a ConfigError (it stops the suite:
    every run of this outputs folder is suspect); a damaged one is UnreadableRecord."""
    try:
        return read_record(run_dir)
    except NewerSchemaError as err:
        raise ConfigError(f"{err}, or use another --outputs folder") from None
    except RecordError as err:
        raise UnreadableRecord(str(err)) from None


def stale_evaluations(record: RunRecord, evals: tuple[str, ...], profile: Budget | None = None) -> list[str]:
    """The evaluations in `evals` that a finished run's record lacks (or, given a profile, holds
    at another config than the profile's)."""
    return [name for name in evals if name not in record.evals or (
        profile is not None and not is_current(record.evals[name], name, profile, record.method))]


def is_current(record: EvalRecord | None, name: str, profile: Budget, method: str | None = None) -> bool:
    """Whether a recorded evaluation was produced with this profile's config of it (for `method`)."""
    return record is not None and record.config == json.loads(json.dumps(eval_config_dict(name, profile, method)))


def eval_config(name: str, profile: Budget, method: str | None = None):
    """Evaluation `name`'s config at this profile, for a run of `method`: the profile's, with
    the method's `eval_overrides` (the `none` baseline's from-scratch fine-tune recipe)."""
    base = split_name(name)[0]
    cfg = profile.eval_config(base)
    overrides = registry[method][0].eval_overrides.get(base, {}) if method in registry else {}
    return build_from_record(type(cfg), {**dataclasses.asdict(cfg), **overrides},
                             f"{base} config of {method}") if overrides else cfg


def eval_config_dict(name: str, profile: Budget, method: str | None = None) -> dict:
    """The config an evaluation is recorded and cached under (late fields as for runs)."""
    return identity_record(eval_config(name, profile, method))


def is_done(run_dir: Path, evals: tuple[str, ...], profile: Budget | None = None) -> bool:
    """Finished with every evaluation in `evals` (and, given a profile, each at its budget)."""
    record = read_result(run_dir)
    return record is not None and record.done and not stale_evaluations(record, evals, profile)


def check_inputs(runs: list[Run], profile: Budget) -> None:
    """Fail before any training when an evaluation's inputs are missing (segmentation data)."""
    for name in sorted({name for run in runs for name in run.spec.evals}):
        evaluation = get_evaluation(name)
        if evaluation.check_inputs is not None:
            evaluation.check_inputs(eval_config(name, profile))


# ---- products ------------------------------------------------------------------------------
# what a finished pre-training leaves for its evaluations (and for runs needing it), by the
# method's `product` (methods.base.PRODUCTS): (file, save(method, path), load(path))
PRODUCT_FILES = {
    "encoder": (ENCODER_FILE, lambda method, path: save_encoder(method.export_encoder(), path), load_encoder),
    "tokenizer": (TOKENIZER_FILE, save_tokenizer, load_tokenizer),
}


def save_product(method, run_dir: Path) -> None:
    file, save, _ = PRODUCT_FILES[method.product]
    with atomic_path(run_dir / file) as tmp:
        save(method, tmp)


def load_product(run_dir: Path, product: str):
    """The saved product of a finished run, as evaluations take it."""
    file, _, load = PRODUCT_FILES[product]
    return load(run_dir / file)


def save_variants(method, run_dir: Path) -> None:
    for variant in method.encoder_variants:
        with atomic_path(run_dir / f"{variant}.safetensors") as tmp:
            save_encoder(method.variant_encoder(variant), tmp)


def load_variant(run_dir: Path, config: RunConfig, variant: str, steps: int):
    """Encoder `variant` of a finished run (`Method.encoder_variants`) of `steps` steps. A run
    finished before variants were saved has it in its last checkpoint: taken from there, and saved."""
    path = run_dir / f"{variant}.safetensors"
    if not path.exists():
        state, _ = load_latest(run_dir / "checkpoints", config.hash)
        if state is None or state["step"] != steps:     # (none, or only an earlier one readable)
            raise ConfigError(f"{run_dir.name} has no {path.name} and no checkpoint to take it from; "
                              f"drop the '@{variant}' evaluation or re-run the run in a new --outputs")
        method = config.build_method()
        method.load_state_dict(state["model"])
        with atomic_path(path) as tmp:
            save_encoder(method.variant_encoder(variant), tmp)
    return load_encoder(path)


# ---- executing -----------------------------------------------------------------------------
def execute(run: Run, profile: Budget, outputs: Path, device: str = "cpu", progress: bool = True,
            on_bad_image: str = "error", data_source: str = "auto", workers: int | None = None,
            need_product: bool = False) -> RunRecord | None:
    """Run (or resume, or skip) one run; its record (None on ranks > 0). A failure is recorded
    in result.json (status, error, traceback) and re-raised. `data_source` is how pre-training
    reads its images (engine.stream.choose_source: auto, memory or stream; recorded, not part of
    the identity), `workers` the streaming source's DataLoader workers (None: as many as cores).
    `need_product`: a finished run whose product file is missing (its record restored from the
    results archive, runs.archive) trains again, for a run that requires it."""
    run_dir = run.config.folder(outputs)
    distributed.barrier()  # under torchrun: rank 0 has finished writing the previous run
    if not distributed.is_main():
        # other ranks only take part in pre-training; rank 0 owns the lock, records and evaluations
        if not finished_with(run_dir, run, profile, need_product):
            train_and_evaluate(run, profile, run_dir, device, False, on_bad_image, data_source, workers)
        distributed.barrier()
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunSkipped(f"{run_dir.name} is running in another process; skipped here") from None
    try:
        return _execute_locked(run, profile, run_dir, device, progress, on_bad_image, data_source, workers,
                               need_product)
    finally:
        lock.release()
        distributed.barrier()


def finished_with(run_dir: Path, run: Run, profile: Budget, need_product: bool) -> bool:
    """Done with the run's evaluations (and, if `need_product`, its product file is here)."""
    if need_product:
        return usable(run_dir, run.spec.evals, run.config.method, profile)
    return is_done(run_dir, run.spec.evals, profile)


def usable(run_dir: Path, evals: tuple[str, ...], method: str, profile: Budget | None = None) -> bool:
    """Done with `evals` and its product file here: what a run that requires it can use (a
    record restored from the results archive has no weights)."""
    return is_done(run_dir, evals, profile) and not product_missing(run_dir, method)


def product_missing(run_dir: Path, method: str) -> bool:
    """Whether a run's product file (encoder or tokenizer) is absent: a record restored from the
    results archive keeps no weights."""
    return not (run_dir / PRODUCT_FILES[registry[method][0].product][0]).exists()


def _execute_locked(run: Run, profile: Budget, run_dir: Path, device: str, progress: bool,
                    on_bad_image: str, data_source: str, workers: int | None, need_product: bool) -> RunRecord:
    if finished_with(run_dir, run, profile, need_product):
        return read_result(run_dir)
    config = run.config.to_dict()
    if (run_dir / "config.json").exists():
        if read_json(run_dir / "config.json") != json.loads(json.dumps(config)):
            raise ConfigError(f"{run_dir}/config.json differs from this run's config; "
                              f"move the folder away or use another --outputs")
    else:
        write_json(run_dir / "config.json", config)
    started = time.time()
    try:
        record = train_and_evaluate(run, profile, run_dir, device, progress, on_bad_image, data_source, workers)
    except Preempted:
        raise  # not a failure: the checkpoint is written, the same command resumes
    except RunSkipped:
        raise  # a prerequisite is running in another process: this run waits for a later call
    except Exception as err:
        failure = {"error": f"{err.__class__.__name__}: {err}", "traceback": traceback.format_exc()}
        previous = read_result(run_dir)
        if previous is not None and previous.done:
            # pre-training (and the evaluations before this one) finished: keep them, for this
            # suite's rerun and for every other suite sharing the run
            write_record(run_dir, dataclasses.replace(previous, failed_evaluation=failure))
        else:
            write_record(run_dir, RunRecord(status="failed", method=run.config.method, seed=run.config.seed,
                                            config_hash=run.config.hash, provenance=provenance(), **failure))
        raise
    record = dataclasses.replace(record, wall_seconds=time.time() - started)
    write_record(run_dir, record)
    return record


def train_and_evaluate(run: Run, profile: Budget, run_dir: Path, device: str, progress: bool,
                       on_bad_image: str, data_source: str = "auto", workers: int | None = None) -> RunRecord | None:
    config = run.config
    data_json = json.dumps(config.data, sort_keys=True)
    kind, reason = choose_source(config.data, data_source)
    streamed = None if kind == "memory" else streamed_splits(config.data["path"], config.data["img_size"], workers,
                                                             on_bad_image)
    previous = read_result(run_dir)
    train_stats = previous.train if previous is not None and previous.done else None
    evals = dict(previous.evals) if previous is not None else {}
    archived = None
    if train_stats is not None and product_missing(run_dir, config.method):
        # a record restored from the results archive: its evaluations stand, the weights are
        # made again (the same seed and config; bit-identical on the machine that measured it)
        print(f"  {run_dir.name}: finished, without its weights (restored from the results archive); "
              f"training it again", flush=True)
        archived, train_stats = train_stats, None
    outputs = run_dir.parent.parent

    def record_progress() -> RunRecord:
        """result.json after pre-training and after each evaluation: a later failure or stop keeps them."""
        record = done_record(config, evals, train_stats)
        write_record(run_dir, record)
        return record

    if train_stats is None:
        torch.manual_seed(config.seed)            # the encoder's initial weights
        method = config.build_method()
        if config.requires:
            method.use_prerequisites(run_prerequisites(config, profile, outputs, device, progress, on_bad_image,
                                                       data_source, workers))
        train_config = config.train_config() or profile.train
        if kind == "stream":
            images = StreamingViews(method, streamed.train.reader, train_config.batch_size,
                                    train_config.crop_scale_min, config.seed, torch.device(device), workers,
                                    on_bad_image)
        else:
            images = load_data(data_json, on_bad_image, progress).train.images
        trainer = Trainer(method, *pretraining(method, images, train_config, config.seed, device), run_dir,
                          seed=config.seed, config_hash=config.hash, device=device, progress=progress)
        train_stats = trainer.fit()
        train_stats["data_source"] = {**(images.describe() if kind == "stream" else {"kind": "memory"}),
                                      "reason": reason}
        if kind == "stream":
            images.close()        # its workers end here, before the evaluations start theirs
        del images, trainer
        if archived is not None:
            # the record keeps the training its evaluations were measured on; this one beside it
            train_stats = {**archived, "retrained": train_stats}
        if distributed.is_main():
            save_product(method, run_dir)
            save_variants(method, run_dir)
            if method.product == "encoder":
                test = load_data(data_json, on_bad_image, progress).test if streamed is None else \
                    streamed.test.in_memory(first_of_each_class(streamed.test.labels))
                write_figures(method, test, run_dir, device=device)
            record_progress()
    if not distributed.is_main():
        return None     # ranks > 0 take part in pre-training only; rank 0 evaluates and records
    # evaluated as saved (iBOT: its teacher); a finished run builds no method to get there
    product = load_product(run_dir, registry[config.method][0].product)

    for name in run.spec.evals:
        if not is_current(evals.get(name), name, profile, config.method):
            variant = split_name(name)[1]
            taken = load_variant(run_dir, config, variant, train_stats["steps"]) if variant else product
            # the splits decoded at the model's size (engine.data), or read from the files in
            # batches when pre-training streams and the evaluation can (k-NN, probe, fine-tune)
            splits = streamed if streamed is not None and get_evaluation(name).streams else \
                load_data(data_json, on_bad_image, progress)
            evals[name] = evaluate(name, taken, splits, profile, run_dir, config.seed, device, progress,
                                   config.method)
            record_progress()
    return done_record(config, evals, train_stats)


def evaluate(name: str, product, splits: Splits, profile: Budget, run_dir: Path, seed: int, device: str,
             progress: bool, method: str | None = None) -> EvalRecord:
    """One evaluation of a run's product at the profile's config of it (for a run of `method`).
    Its record is kept in its work folder too, so a run stopped during a later evaluation keeps
    the finished ones."""
    evaluation = get_evaluation(name)
    variant = split_name(name)[1]
    cfg = eval_config(name, profile, method)
    config = identity_record(cfg)
    work_dir = Path(run_dir) / "evals" / f"{name}-{config_hash(config)}"
    cached = read_eval_cache(work_dir)
    if cached is not None:                      # finished before the run was stopped
        return cached
    started = time.time()
    # a variant's frozen features are its own: not the product's cache
    features_dir = Path(run_dir) / (f"features-{variant}" if variant else "features")
    ctx = EvalContext(work_dir=work_dir, features_dir=features_dir, seed=seed, device=device,
                      progress=progress, feature_batch=profile.feature_batch)
    work_dir.mkdir(parents=True, exist_ok=True)
    result = evaluation.run(product, splits, cfg, ctx)
    record = {"config": config, "metrics": variant_metrics(result.metrics, name), "details": result.details,
              "seconds": time.time() - started}
    # as JSON and validated before it is cached: a metric that is not a number (a tensor, a
    # numpy scalar) fails this evaluation now instead of every later read of the cache
    record = EvalRecord.from_dict(json.loads(json.dumps(record, default=str)), f"evaluation {name!r}")
    write_json(work_dir / "result.json", dataclasses.asdict(record))
    return record


def read_eval_cache(work_dir: Path) -> EvalRecord | None:
    """An evaluation's finished record in its work folder; None when absent or damaged (it then
    runs again, from its checkpoints)."""
    try:
        return EvalRecord.from_dict(read_json(work_dir / "result.json"))
    except (OSError, ValueError):        # (RecordError and JSONDecodeError are ValueErrors)
        return None


def done_record(config: RunConfig, evals: dict[str, EvalRecord], train_stats: dict) -> RunRecord:
    """The record of a run whose pre-training finished, with the evaluations done so far."""
    metrics = {name: value for e in evals.values() for name, value in e.metrics.items()}
    for key in ("images_per_second", "flops_total"):
        if train_stats.get(key) is not None:
            metrics[f"pretrain_{key}"] = train_stats[key]
    return RunRecord(status="done", method=config.method, seed=config.seed, config_hash=config.hash,
                     metrics=metrics, evals=evals, train=train_stats, provenance=provenance(),
                     prerequisites={role: need.config.name for role, need in config.requires.items()})


def run_prerequisites(config: RunConfig, profile: Budget, outputs: Path, device: str, progress: bool,
                      on_bad_image: str, data_source: str = "auto", workers: int | None = None) -> dict:
    """Finish the runs `config` requires (or find them finished); their products by role."""
    products = {}
    for role, need in config.requires.items():
        run = Run(RunSpec(need.config.method, role, evals=need.evals), need.config.seed, need.config)
        run_dir = need.config.folder(outputs)
        state = "running it first" if not is_done(run_dir, run.spec.evals) else \
            "done, its weights to make again" if product_missing(run_dir, need.config.method) else "done, reused"
        print(f"  {role}: {run_dir.name} ({state})", flush=True)
        budget = dataclasses.replace(profile, train=need.config.train_config())
        execute(run, budget, outputs, device, progress, on_bad_image, data_source, workers, need_product=True)
        products[role] = load_product(run_dir, registry[need.config.method][0].product)
    return products
