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
import platform
import subprocess
import time
import traceback
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from core.config import ConfigError
from core.files import atomic_path, config_hash, read_json, write_json
from engine import distributed
from engine.checkpoint import load_latest
from engine.data import Splits, synthetic_splits
from engine.splits import choose_source, load_splits, streamed_splits
from engine.stream import StreamingViews
from engine.trainer import Preempted, Trainer, total_steps
from engine.views import pretraining
from eval.registry import EvalContext, get_evaluation, split_name, variant_metrics
from methods import registry
from methods.dvae import TOKENIZER_FILE, load_tokenizer, save_tokenizer
from methods.vit import load_encoder, save_encoder
from runs.curve import TrunkBusy, grow_trunk, is_branch
from runs.figures import first_of_each_class, write_figures
from runs.identity import RunProfile, Run, RunConfig, RunSpec, identity_record
from runs.records import EvalRecord, RunRecord, write_record
from runs.state import (ENCODER_FILE, UnreadableRecord, eval_config, is_current, is_done, product_missing,
                        read_result, read_state)

class RunSkipped(Exception):
    """Another process holds this run's lock."""


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
    """The code and machine a record was written by; with plugins loaded (runs.plugins), each one:
    its module, version or file hash, and the methods and evaluations it registered."""
    import timm

    from runs.cost import machine       # (runs.cost imports this module)
    from runs.plugins import records as plugin_records

    # machine(): the CPU model, cores, threads, torch and GPU that a plan's FLOP/s are taken for
    # from finished runs (runs.cost.sustained_by_runs); "cpu" is new, the others were always here
    out = {"git_commit": SOURCE_COMMIT, "timm": timm.__version__, "python": platform.python_version(),
           "machine": platform.machine(), **machine(),
           "cuda": torch.version.cuda if torch.cuda.is_available() else None,
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    plugins = plugin_records()
    return {**out, "plugins": plugins} if plugins else out     # records without plugins: as before


# ---- inputs ------------------------------------------------------------------------------
def check_inputs(runs: list[Run], profile: RunProfile) -> None:
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
@dataclass(frozen=True)
class RunOptions:
    """How this process runs what it runs; none of it is part of a run's identity."""
    device: str = "cpu"
    progress: bool = True           # progress bars
    on_bad_image: str = "error"     # or "skip": leave unreadable image files out, counted
    data_source: str = "auto"       # how pre-training reads its images (engine.stream.choose_source)
    workers: int | None = None      # a streaming source's DataLoader workers (None: as many as cores)


def execute(run: Run, profile: RunProfile, outputs: Path, options: RunOptions = RunOptions(),
            need_product: bool = False) -> RunRecord | None:
    """Run (or resume, or skip) one run; its record (None on ranks > 0). A failure is recorded
    in result.json (status, error, traceback) and re-raised. `need_product`: a finished run
    whose product file is missing (its record restored from the results archive, runs.archive)
    trains again, for a run that requires it."""
    run_dir = run.config.folder(outputs)
    distributed.barrier()  # under torchrun: rank 0 has finished writing the previous run
    if not distributed.is_main():
        # other ranks only take part in pre-training; rank 0 owns the lock, records and evaluations
        if not finished_with(run_dir, run, profile, need_product):
            train_and_evaluate(run, profile, run_dir, dataclasses.replace(options, progress=False))
        distributed.barrier()
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunSkipped(f"{run_dir.name} is running in another process; skipped here") from None
    try:
        return _execute_locked(run, profile, run_dir, options, need_product)
    finally:
        lock.release()
        distributed.barrier()


def finished_with(run_dir: Path, run: Run, profile: RunProfile, need_product: bool) -> bool:
    """Done with the run's evaluations (and, if `need_product`, its product file is here); read
    under the run's lock, where another process may have finished it since the plan was made."""
    state = read_state(run_dir, run.spec.evals, run.config.method, profile)
    if state.unreadable is not None:
        raise UnreadableRecord(state.unreadable)
    return state.usable if need_product else state.done


def _execute_locked(run: Run, profile: RunProfile, run_dir: Path, options: RunOptions, need_product: bool) -> RunRecord:
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
        record = train_and_evaluate(run, profile, run_dir, options)
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


def train_and_evaluate(run: Run, profile: RunProfile, run_dir: Path, options: RunOptions) -> RunRecord | None:
    """Pre-train (unless the folder's record says it finished, with its weights here), save the
    product, run the evaluations not yet current; the record (None on ranks > 0)."""
    config = run.config
    kind, reason = choose_source(config.data, options.data_source)
    streamed = None if kind == "memory" else streamed_splits(config.data["path"], config.data["img_size"],
                                                             options.workers, options.on_bad_image)
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

    def record_progress() -> RunRecord:
        """result.json after pre-training and after each evaluation: a later failure or stop keeps them."""
        record = done_record(config, evals, train_stats)
        write_record(run_dir, record)
        return record

    if train_stats is None:
        method, train_stats = pretrain(run, profile, run_dir, options, (kind, reason), streamed)
        if config.recipe == "tuned" and (choice := getattr(profile, "tuning", {}).get(config.method)):
            train_stats["lr_choice"] = choice       # how --recipe tuned chose the lr (suites.tune)
        if archived is not None:
            # the record keeps the training its evaluations were measured on; this one beside it
            train_stats = {**archived, "retrained": train_stats}
        if distributed.is_main():
            save_outputs(method, run_dir, config, streamed, options)
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
                load_data(json.dumps(config.data, sort_keys=True), options.on_bad_image, options.progress)
            # a cell's other seeds take what its seed 0 chose (fine-tuning's blr and layer decay)
            choice, choice_from = seed_zero_choice(config, name, profile, run_dir) if config.seed else (None, None)
            evals[name] = evaluate(name, taken, splits, profile, run_dir, config.seed, options.device,
                                   options.progress, config.method, choice, choice_from)
            record_progress()
    return done_record(config, evals, train_stats)


def pretrain(run: Run, profile: RunProfile, run_dir: Path, options: RunOptions, source: tuple[str, str],
             streamed) -> tuple[Any, dict]:
    """Train the run's method (its prerequisites first) on its data, read as `source` says
    ((kind, reason): engine.splits.choose_source); the method and its training stats. A wsd run
    is a decay branch: its trunk grows to the branch's decay start first (runs.curve), and the
    run trains only its decay from the trunk's checkpoint there."""
    if not is_branch(run.config):
        return fit(run, profile, run_dir, options, source, streamed, run.config.hash)

    def train_trunk(folder: Path, trunk_hash: str, trunk_steps: int, keep_at: tuple[int, ...]) -> None:
        fit(run, profile, folder, options, source, streamed, trunk_hash, trunk_steps=trunk_steps, keep_at=keep_at)

    train = run.config.train_config()
    images = streamed.train.reader if streamed is not None else \
        load_data(json.dumps(run.config.data, sort_keys=True), options.on_bad_image, options.progress).train.images
    steps = total_steps(train.epochs, len(images), train.batch_size)
    try:
        start_from, branch = grow_trunk(run.config, steps, run_dir.parent.parent, train_trunk)
    except TrunkBusy as err:
        raise RunSkipped(f"{run.name}: {err}; skipped here") from None
    method, stats = fit(run, profile, run_dir, options, source, streamed, run.config.hash, start_from=start_from)
    return method, {**stats, "branch": branch}


def fit(run: Run, profile: RunProfile, run_dir: Path, options: RunOptions, source: tuple[str, str], streamed,
        config_hash: str, start_from: tuple[Path, str] | None = None, **plan_args) -> tuple[Any, dict]:
    """Train the run's method in `run_dir` (checkpoints stamped `config_hash`); `plan_args`: a
    trunk's (engine.views.pretraining), `start_from`: a branch's trunk checkpoint."""
    config, (kind, reason) = run.config, source
    torch.manual_seed(config.seed)            # the encoder's initial weights
    method = config.build_method()
    if config.requires:
        method.use_prerequisites(run_prerequisites(config, profile, run_dir.parent.parent, options))
    train_config = config.train_config() or profile.train
    if kind == "stream":
        images = StreamingViews(method, streamed.train.reader, train_config.batch_size, train_config.crop_scale_min,
                                config.seed, torch.device(options.device), options.workers, options.on_bad_image)
    else:
        images = load_data(json.dumps(config.data, sort_keys=True), options.on_bad_image, options.progress).train.images
    trainer = Trainer(method, *pretraining(method, images, train_config, config.seed, options.device, **plan_args),
                      run_dir, seed=config.seed, config_hash=config_hash, device=options.device,
                      progress=options.progress, start_from=start_from)
    train_stats = trainer.fit()
    train_stats["data_source"] = {**(images.describe() if kind == "stream" else {"kind": "memory"}),
                                  "reason": reason}
    if kind == "stream":
        images.close()        # its workers end here, before the evaluations start theirs
    return method, train_stats


def save_outputs(method, run_dir: Path, config: RunConfig, streamed, options: RunOptions) -> None:
    """The run's product, its other encoders and (for an encoder) its figures."""
    save_product(method, run_dir)
    save_variants(method, run_dir)
    if method.product == "encoder":
        test = load_data(json.dumps(config.data, sort_keys=True), options.on_bad_image, options.progress).test \
            if streamed is None else streamed.test.in_memory(first_of_each_class(streamed.test.labels))
        write_figures(method, test, run_dir, device=options.device)


def evaluate(name: str, product, splits: Splits, profile: RunProfile, run_dir: Path, seed: int, device: str,
             progress: bool, method: str | None = None, choice: dict | None = None,
             choice_from: str | None = None) -> EvalRecord:
    """One evaluation of a run's product at the profile's config of it (for a run of `method`).
    Its record is kept in its work folder too, so a run stopped during a later evaluation keeps
    the finished ones. `choice`: hyperparameters chosen for it already (`EvalContext.choice`);
    `choice_from`, where they came from or why it chose itself, goes into the record of an
    evaluation that records a choice."""
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
                      progress=progress, feature_batch=profile.feature_batch, choice=choice)
    work_dir.mkdir(parents=True, exist_ok=True)
    result = evaluation.run(product, splits, cfg, ctx)
    details = result.details
    if choice_from is not None and "choice" in details:
        details = {**details, "choice_from": choice_from}
    record = {"config": config, "metrics": variant_metrics(result.metrics, name), "details": details,
              "seconds": time.time() - started}
    # as JSON and validated before it is cached: a metric that is not a number (a tensor, a
    # numpy scalar) fails this evaluation now instead of every later read of the cache
    record = EvalRecord.from_dict(json.loads(json.dumps(record, default=str)), f"evaluation {name!r}")
    write_json(work_dir / "result.json", dataclasses.asdict(record))
    return record


def seed_zero_choice(config: RunConfig, name: str, profile: RunProfile, run_dir: Path) -> tuple[dict | None, str]:
    """What evaluation `name` chose at seed 0 of this run's cell (details["choice"] of the seed-0
    run's record, at this profile's config of the evaluation), for a run of another seed to take
    instead of choosing again, and where it came from; (None, why) when seed 0 has not chosen yet:
    the run then chooses itself, and its record says so."""
    sibling = dataclasses.replace(config, seed=0).folder(run_dir.parent.parent)
    try:
        record = read_result(sibling)
    except UnreadableRecord:
        record = None
    chosen = record.evals.get(name) if record is not None else None
    if is_current(chosen, name, profile, config.method) and "choice" in chosen.details:
        return chosen.details["choice"], f"seed 0 ({sibling.name})"
    return None, f"its own sweep: seed 0 ({sibling.name}) had no {name} choice yet"


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


def run_prerequisites(config: RunConfig, profile: RunProfile, outputs: Path, options: RunOptions) -> dict:
    """Finish the runs `config` requires (or find them finished); their products by role."""
    products = {}
    for role, need in config.requires.items():
        run = Run(RunSpec(need.config.method, role, evals=need.evals), need.config.seed, need.config)
        run_dir = need.config.folder(outputs)
        state = "running it first" if not is_done(run_dir, run.spec.evals) else \
            "done, its weights to make again" if product_missing(run_dir, need.config.method) else "done, reused"
        print(f"  {role}: {run_dir.name} ({state})", flush=True)
        budget = dataclasses.replace(profile, train=need.config.train_config())
        execute(run, budget, outputs, options, need_product=True)
        products[role] = load_product(run_dir, registry[need.config.method][0].product)
    return products
