"""What a run costs, from FLOPs counted on a 2-image batch (attention unfused, so the FLOPs of
the computation, not of the kernel that runs it), and this machine's FLOP/s, measured.

Seconds are FLOPs / a sustained FLOP/s: the profile's assumed `flops_per_second`, or this
machine's as `calibrate` finds it: what the finished runs here sustained (their records), else a
few MAE training steps measured on an idle machine (recorded in outputs/calibration.json for this
CPU, cores, threads and torch; a figure measured on a busy one serves one command, with a
warning). FLOP counts are kept on disk (`counted`), so a plan builds no model twice. One
figure serves every phase: the bench measured every method's step within 80-92% of the matmul
peak (README, Performance), and frozen-feature extraction runs near the training rate; BEiT's
convolutional tokenizer trains at two thirds of it (`Method.training_efficiency`).

Evaluations (`evaluation_seconds`), counted from their configs, not timed:

- frozen protocols (k-NN, linear, and any evaluation not listed here): one forward pass of the
  encoder over train + test, cached per run and so paid once by whichever runs first (forward
  FLOPs = a full-token step's training FLOPs / 3); k-NN adds its similarity matmuls, the linear
  probe its sweep (every (lr, wd) classifier on the fit split) and refit (one on train), at a
  seventh of the rate (`LINEAR_PROBE_EFFICIENCY`);
- fine-tuning: `epochs` full-token training passes over train, plus one forward over test;
- segmentation: `iterations` x `batch_size` training crops, plus a forward over the evaluated
  images at the resize scale; the UPerHead is not counted;
- BEiT's tokenizer evaluation: not counted (a forward over test; seconds).

Checked against the `cpu` profile's finished runs on the 2-core machine, at the 72 GFLOP/s their
pre-training ran at: k-NN with the feature extraction 143 s estimated / 122-124 s measured,
linear 42 / 36-52 s, fine-tuning 718 / 621-736 s, segmentation 282 / 306-312 s.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from core.files import read_json, write_json
from engine.data import IMAGE_SUFFIXES, cache_dir, holdout_size
from engine.shards import ShardReader, is_shard_split
from engine.trainer import adamw_plan, count_flops, total_steps, train_flops
from engine.views import MaskedViews
from eval.registry import split_name
from methods import registry
from methods.base import Batch
from methods.vit import ViT
from runs.identity import RunProfile, Run, RunConfig, RunSpec, config_from_record, resolve
from runs.plan import Plan
from runs.records import read_record
from runs.state import RunState, eval_config

# images per split without a folder to count (the known sizes of the named datasets; else ImageNet's)
TRAIN_IMAGES = {"synthetic": 640, "cifar10": 50_000, "imagenet": 1_281_167}
TEST_IMAGES = {"synthetic": 320, "cifar10": 10_000, "imagenet": 50_000}
SEGMENTATION_EVAL_IMAGES = {"camvid": 233, "ade20k": 2000}     # CamVid's test split, ADE20K's validation
# the probe's small batched matmuls (21 classifiers of 128 x 10 at the cpu profile) run far below
# the training rate: measured 36-52 s where its FLOPs at the training rate give 6 s
LINEAR_PROBE_EFFICIENCY = 1 / 7
TRAINED_EVALUATIONS = ("finetune", "segmentation", "tokenizer")   # the others read cached frozen features
NUM_CLASSES = {"synthetic": 10, "cifar10": 10, "imagenet": 1000}


# ---- FLOP counts, kept on disk ----------------------------------------------------------------
# Counting builds the model and runs a step under FlopCounterMode: about a second a config on the
# 2-core machine, and --list or a --budget plan counts dozens. The counts are kept in
# <cache>/flops.json (engine.data.cache_dir: $MIMBENCH_CACHE, else ~/.cache/mimbench) by config,
# for the torch, timm and counted code that made them; a damaged or older file is ignored.
FLOPS_CACHE_FILE = "flops.json"
COUNTED_CODE = ("methods", "engine/trainer.py", "runs/cost.py")   # what builds, steps and counts a model


@lru_cache(maxsize=1)
def counting_version() -> str:
    """A hash of torch's and timm's versions and the source of COUNTED_CODE: a count made by
    other code is counted again."""
    import timm

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha1(f"{torch.__version__} {timm.__version__}".encode())
    for name in COUNTED_CODE:
        for path in sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / name]:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _read_counts(path: Path) -> dict[str, float]:
    try:
        data = read_json(path)
        if data["version"] == counting_version():
            return {key: float(value) for key, value in data["counts"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {}


@lru_cache(maxsize=1)
def _counts_on_disk() -> dict[str, float]:
    """This process's copy of flops.json, read once (a count made here is added to it)."""
    return _read_counts(cache_dir() / FLOPS_CACHE_FILE)


def counted(key: str, count) -> float:
    """The FLOPs `count()` gives for `key` (a config as JSON), counted once per version of the code."""
    counts = _counts_on_disk()
    if key not in counts:
        counts[key] = float(count())
        path = cache_dir() / FLOPS_CACHE_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path) + ".lock", timeout=10):     # other processes' counts are kept
                write_json(path, {"version": counting_version(), "counts": {**_read_counts(path), key: counts[key]}})
        except (OSError, Timeout):
            pass                    # an optimisation: counted again next time
    return counts[key]


@lru_cache(maxsize=64)
def _flops_per_image(method: str, method_config_json: str) -> float:
    def count() -> float:
        model = registry[method][0](config_from_record(method, json.loads(method_config_json)))
        enc = model.cfg.encoder
        views = [torch.randn(2, enc.in_chans, size, size) for size, _ in model.view_specs(0.2)]
        mask = model.draw_masks(2, torch.Generator().manual_seed(0))
        batch = Batch.of_views(views, mask)
        return train_flops(model, batch, torch.device("cpu")) / 2

    return counted(f"train {method} {source_hash(registry[method][0])} {method_config_json}", count)


@lru_cache(maxsize=None)
def source_hash(method_cls: type) -> str:
    """A hash of the file that defines a method: a method from outside (a plugin, runs.plugins)
    is not in COUNTED_CODE, and its count must follow its code too."""
    module = sys.modules.get(method_cls.__module__)
    try:
        return hashlib.sha1(Path(module.__file__).read_bytes()).hexdigest()[:12]
    except (AttributeError, OSError, TypeError):
        return "unknown"


def flops_per_image(method: str, method_config: dict) -> float:
    """Training FLOPs (forward + backward) per image of one step of `method`, given the
    identity record of its config (RunConfig.method_config)."""
    return _flops_per_image(method, json.dumps(method_config, sort_keys=True))


@lru_cache(maxsize=64)
def _encoder_forward_flops(encoder_json: str, img_size: int) -> float:
    def count() -> float:
        from methods.vit import ViTConfig
        encoder = ViT(dataclasses.replace(ViTConfig(**json.loads(encoder_json)), img_size=img_size))
        images = torch.randn(1, encoder.cfg.in_chans, img_size, img_size)
        # a linear layer's backward is twice its forward: a third of a full-token step's FLOPs
        return count_flops(encoder, lambda: encoder(images).float().sum()) / 3

    return counted(f"encoder {encoder_json} {img_size}", count)


def cell_flops_per_image(spec: RunSpec, profile: RunProfile, recipe: str) -> float:
    """Training FLOPs per image of a grid cell at a profile and recipe (its seed and data change
    nothing of them): what a suite that matches methods in FLOPs weighs its cells by."""
    data = {"name": "synthetic", "img_size": profile.encoder["img_size"]}
    if recipe == "tuned":       # the lr changes no FLOPs: a method not tuned yet is costed too
        spec = dataclasses.replace(spec, train={"blr": profile.train.blr, **spec.train})
    config = resolve(spec, profile, seed=0, data=data, recipe=recipe)
    return flops_per_image(config.method, config.method_config)


def encoder_forward_flops(config: RunConfig, img_size: int | None = None) -> float:
    """Forward FLOPs per image of a run's encoder on all tokens (at `img_size`, default its own)."""
    encoder = config.build_method_config().encoder
    fields = {f.name: getattr(encoder, f.name) for f in dataclasses.fields(encoder)}
    return _encoder_forward_flops(json.dumps(fields, sort_keys=True), img_size or encoder.img_size)


def num_images(data: dict, split: str) -> int:
    """Images in a split of a run's data: counted in its folder when it is there, else the
    known size of the named dataset (a --dry-run elsewhere), else ImageNet's."""
    if "path" in data and (Path(data["path"]) / split).is_dir():
        return count_images(data["path"], split)
    sizes = TRAIN_IMAGES if split == "train" else TEST_IMAGES
    return sizes.get(data["name"], sizes["imagenet"])


def images_seen(config: RunConfig) -> int:
    train = config.train_config()
    return total_steps(train.epochs, num_images(config.data, "train"), train.batch_size) * train.batch_size


def train_steps(config: RunConfig) -> int:
    """Optimizer steps of a run's pre-training (0 for methods that do not train)."""
    if config.train is None:
        return 0
    train = config.train_config()
    return total_steps(train.epochs, num_images(config.data, "train"), train.batch_size)


@lru_cache(maxsize=16)
def count_images(root: str, split: str = "train") -> int:
    """Images in a split folder: the image files of its class folders, as engine.data.list_images
    lists them (scanned, not sorted or kept: a --dry-run counts CIFAR-10's 60k files in tens of
    ms), or the images its shards' index names."""
    split_dir = Path(root) / split
    if is_shard_split(split_dir):
        return len(ShardReader(split_dir))
    count = 0
    with os.scandir(split_dir) as classes:
        for folder in classes:
            if folder.is_dir():
                with os.scandir(folder.path) as files:
                    count += sum(os.path.splitext(file.name)[1].lower() in IMAGE_SUFFIXES for file in files)
    return count


def pretrain_flops(config: RunConfig) -> float:
    """FLOPs of a resolved run's whole pre-training (0 for methods that do not train)."""
    if config.train is None:
        return 0.0
    return flops_per_image(config.method, config.method_config) * images_seen(config)


def estimate_seconds(config: RunConfig, profile: RunProfile, flops_per_second: float | None = None) -> float:
    """Pre-training wall time at `flops_per_second` (default: the profile's assumed figure), at
    the share of it the method sustains (`training_efficiency`: the dVAE's convolutions, 0.66)."""
    efficiency = registry[config.method][0].training_efficiency
    return pretrain_flops(config) / ((flops_per_second or profile.flops_per_second) * efficiency)


def format_flops(flops: float) -> str:
    """2.4e6 -> '2.4 MFLOP', 1.92e13 -> '19.2 TFLOP', 1.27e11 -> '127 GFLOP'."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            value = flops / scale
            return f"{value:.3g} {prefix}FLOP" if value < 100 else f"{value:.0f} {prefix}FLOP"
    return f"{flops:.0f} FLOP"


def format_hours(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


# ---- evaluations ---------------------------------------------------------------------------
def evaluation_flops(name: str, config: RunConfig, profile: RunProfile) -> float:
    """FLOPs of evaluation `name` of a run at the profile's config of it, without the frozen
    protocols' shared feature extraction (`feature_flops`). ("knn@student", an evaluation of
    another encoder the run saves, costs what "knn" does.)"""
    name = split_name(name)[0]
    cfg = eval_config(name, profile, config.method)      # with the method's overrides (none's segmentation)
    train, test = num_images(config.data, "train"), num_images(config.data, "test")
    if name == "knn":            # (test x train) similarities of both poolings
        return 2 * 2 * train * test * config.build_method_config().encoder.embed_dim
    if name == "linear":         # per pooling: the sweep on the fit split (4/5 of train), the refit on train
        dim = config.build_method_config().encoder.embed_dim
        classes = NUM_CLASSES.get(config.data["name"], 1000)
        grid = len(cfg.lrs) * len(cfg.weight_decays)
        flops = 6 * dim * classes * cfg.epochs * len(cfg.poolings) * (0.8 * train * grid + train)
        return flops / LINEAR_PROBE_EFFICIENCY
    if name == "finetune":      # each candidate of a sweep on the fit part, read on the held-out part; the final one
        held_out = holdout_size(train)
        # the sweep runs at seed 0 of a cell; its other seeds take seed 0's choice (runs.execute)
        candidates = len(cfg.sweep_grid()) if config.seed == 0 else 0
        sweep = candidates * (3 * cfg.epochs * (train - held_out) + held_out)
        return encoder_forward_flops(config) * (sweep + 3 * cfg.epochs * train + test)
    if name == "segmentation":
        crop = encoder_forward_flops(config, cfg.crop_size)
        # inference at a square of the resize bound's area: whole, or in sliding crops
        patch = config.build_method_config().encoder.patch_size
        side = max(1, round(math.sqrt(cfg.scale[0] * cfg.scale[1]) / patch)) * patch
        if cfg.test_mode == "slide":
            windows = (max(0, math.ceil((side - cfg.crop_size) / cfg.slide_stride)) + 1) ** 2
            inference = crop * windows
        else:
            inference = encoder_forward_flops(config, side)
        images = cfg.eval_images or SEGMENTATION_EVAL_IMAGES.get(cfg.dataset, 2000)
        return 3 * crop * cfg.iterations * cfg.batch_size + inference * images
    return 0.0                   # the tokenizer evaluation, or a frozen protocol beyond its features


def feature_flops(config: RunConfig) -> float:
    """FLOPs of extracting a run's frozen features: one forward over train and test."""
    return encoder_forward_flops(config) * (num_images(config.data, "train") + num_images(config.data, "test"))


def evaluation_seconds(config: RunConfig, evals, profile: RunProfile, flops_per_second: float,
                       features_cached: bool = False) -> dict[str, float]:
    """Estimated seconds of each of `evals` (those still to run) of a run; the first one that
    reads frozen features of an encoder pays their extraction unless the run has them cached."""
    seconds, extracted = {}, set()
    for name in evals:
        base, encoder = split_name(name)
        flops = evaluation_flops(name, config, profile)
        if base not in TRAINED_EVALUATIONS and encoder not in extracted and not (features_cached and not encoder):
            flops += feature_flops(config)
            extracted.add(encoder)
        seconds[name] = flops / flops_per_second
    return seconds


# ---- what a plan still costs ----------------------------------------------------------------
def seconds_left(run: Run, state: RunState, profile: RunProfile, flops_per_second: float) -> dict[str, float]:
    """Estimated seconds of the work a run still needs, by phase ("pre-train", each evaluation),
    given its folder's `state`: nothing for what it holds finished."""
    if state.finished:
        seconds = evaluation_seconds(run.config, state.stale, profile, flops_per_second, state.features_cached)
        if state.stale and not state.product_here:    # restored from the results archive
            seconds = {"pre-train": estimate_seconds(run.config, profile, flops_per_second), **seconds}
        return seconds
    pretrain = estimate_seconds(run.config, profile, flops_per_second)
    return {**({"pre-train": pretrain} if pretrain else {}),
            **evaluation_seconds(run.config, run.spec.evals, profile, flops_per_second, state.features_cached)}


def plan_seconds(plan: Plan, flops_per_second: float) -> tuple[dict[str, dict[str, float]], dict[str, float], float]:
    """Seconds left per run of the plan's grid (by phase), per prerequisite run not done
    (BEiT's tokenizer: once, however many runs need it), and in all."""
    per_run, prerequisites = {}, {}
    for run in plan.grid:
        per_run[run.name] = seconds_left(run, plan.state(run), plan.profile, flops_per_second)
        if "pre-train" in per_run[run.name]:
            for need in run.config.requires.values():
                if need.config.name not in prerequisites and not plan.requirement(need).usable:
                    prerequisites[need.config.name] = estimate_seconds(need.config, plan.profile, flops_per_second)
    total = sum(sum(phases.values()) for phases in per_run.values()) + sum(prerequisites.values())
    return per_run, prerequisites, total


# ---- calibration: this machine's sustained training FLOP/s ---------------------------------
CALIBRATION_FILE = "calibration.json"
CALIBRATION_STEPS, CALIBRATION_WARMUP = 8, 2       # timed steps after warm-up steps (allocation)
CALIBRATION_BATCH = 64      # at most; the cpu profile's nano MAE does ~120 img/s on one thread: ~5 s
# A measurement is taken on a busy machine when the 1-minute load average exceeds the cores its
# threads leave free by more than this: the planning process itself (imports, FLOP counts) and
# short system tasks add a few tenths; a training or test process on the cores adds one or more.
LOAD_SLACK = 0.5
# ... or when a matmul timed just before the steps and one timed just after differ by more than
# this factor: work that started or stopped during the measurement (an idle machine repeats it
# within a few per cent)
PEAK_SPREAD = 2.0


@dataclass(frozen=True)
class Calibration:
    flops_per_second: float
    record: dict                # what the suite index keeps (calibration.json's fields for a measurement)
    source: str                 # "runs" (finished runs here), "recorded" (calibration.json) or "measured" (now)
    warning: str | None = None  # measured on a busy machine: used by this command only, not recorded

    @property
    def reused(self) -> bool:
        return self.source != "measured"

    def describe(self) -> str:
        """The figure and where it came from, for --dry-run."""
        r, rate = self.record, f"{self.flops_per_second / 1e9:.1f} GFLOP/s"
        where = f"{r['threads']} thread(s), {r['device_type']}"
        if self.source == "runs":
            return (f"{rate} from {r['runs']} finished run(s) on this machine (median of what their pre-training "
                    f"sustained; {where})")
        steps = f"MAE {r['steps']} steps of {r['batch_size']}"
        if self.source == "recorded":
            return f"{rate} recorded {r['timestamp']} ({where}, {steps}; no finished run on this machine yet)"
        busy = " on a busy machine, not recorded" if self.warning else ""
        return f"{rate} measured now{busy} ({where}, {steps}, {r['timestamp']})"


def cpu_model() -> str:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def machine() -> dict:
    """What a FLOP/s figure holds for: the CPU model, its cores, the threads torch uses, torch, and
    the GPU ("cpu" without one). Every run record's provenance holds these fields (runs.execute),
    so a record restored from another machine (runs.archive) is told apart from this one's."""
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def sustained_by_runs(outputs: str | Path, profile: RunProfile, device: str = "cpu") -> dict[str, float]:
    """Run name -> the training FLOP/s its pre-training sustained, for the finished runs in
    `outputs` that trained here (their provenance holds this `machine()`) on `device`, at the
    profile's model size, image size and batch: its counted FLOPs over its timed seconds, divided
    by its method's `training_efficiency`, so the figure is the one at which `estimate_seconds`
    gives the time it took. Runs of fewer timed steps than a measurement takes are left out; so are
    folders that do not parse."""
    here, figures = machine(), {}
    for folder in sorted((Path(outputs) / "runs").glob("*/")):
        try:
            record = read_record(folder)
            config = read_json(folder / "config.json")
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict) or record is None or not record.done or record.method not in registry or not record.train:
            continue
        if any(record.provenance.get(key) != value for key, value in here.items()):
            continue
        train, encoder = record.train, (config.get("method_config") or {}).get("encoder") or {}
        if (str(train.get("device", "cpu")).split(":")[0] != str(device).split(":")[0]
                or any(encoder.get(key) != value for key, value in profile.encoder.items())
                or (config.get("train") or {}).get("batch_size") != profile.train.batch_size):
            continue
        flops, images = train.get("flops_total"), train.get("images_seen")
        rate, seconds = train.get("images_per_second"), train.get("train_seconds_this_session")
        if not (flops and images and rate and seconds) or \
                rate * seconds / profile.train.batch_size < CALIBRATION_STEPS - 0.5:      # timed steps
            continue
        figures[folder.name] = flops / images * rate / registry[record.method][0].training_efficiency
    return figures


def calibrate(profile: RunProfile, outputs: str | Path, device: str = "cpu", recalibrate: bool = False) -> Calibration:
    """This machine's sustained training FLOP/s at the profile's scale, the first of:

    - the median of what the finished runs in `outputs` sustained on this machine
      (`sustained_by_runs`): a plan is best made from real runs' speed, not a few steps';
    - a measurement recorded in `outputs/calibration.json` for this machine, device and profile;
    - a measurement now (a few MAE steps, `measure_flops_per_second`), recorded for the next
      command unless the machine was busy while it was taken (`busy_reason`): such a figure
      serves this command only, with a one-line `warning`, so it cannot set later plans.

    `recalibrate` (--recalibrate) measures now; a busy measurement then leaves the plan at the
    figure above it, if there is one. A lock makes processes started together measure once (the
    second waits and reads the record)."""
    wanted = {**machine(), "device_type": str(device).split(":")[0], "profile": profile.name}
    now = datetime.datetime.now().isoformat(timespec="seconds")
    path = Path(outputs) / CALIBRATION_FILE
    figures = sustained_by_runs(outputs, profile, device)
    if figures:
        median = statistics.median(figures.values())
        trusted = Calibration(median, {**wanted, "flops_per_second": median, "runs": len(figures), "timestamp": now},
                              source="runs")
    else:
        trusted = recorded_calibration(path, wanted)
    if trusted is not None and not recalibrate:
        return trusted
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not recalibrate and (recorded := recorded_calibration(path, wanted)) is not None:
            return recorded         # another process measured while this one waited
        batch_size = min(CALIBRATION_BATCH, profile.train.batch_size)
        on_cpu = wanted["device_type"] == "cpu"   # the host's load says little about a GPU's speed
        load_before, peak_before = (os.getloadavg()[0], matmul_peak()) if on_cpu else (0.0, 0.0)
        started = time.perf_counter()
        flops_per_second = measure_flops_per_second(profile, device, batch_size)
        seconds = time.perf_counter() - started
        busy = busy_reason(wanted["threads"], load_before, os.getloadavg()[0], seconds,
                           (peak_before, matmul_peak())) if on_cpu else None
        record = {**wanted, "flops_per_second": flops_per_second, "steps": CALIBRATION_STEPS,
                  "batch_size": batch_size, "method": "mae", "timestamp": now, "busy": busy}
        if busy is None:
            write_json(path, record)
            return Calibration(flops_per_second, record, source="measured")
    measured = f"{flops_per_second / 1e9:.1f} GFLOP/s measured while this machine was busy ({busy})"
    if trusted is not None:
        return dataclasses.replace(trusted, warning=f"WARNING: {measured} is not recorded; the plan keeps the "
                                                    f"{trusted.flops_per_second / 1e9:.1f} GFLOP/s of before")
    return Calibration(flops_per_second, record, source="measured",
                       warning=f"WARNING: {measured} serves this command only and is not recorded; plan again on "
                               f"an idle machine, or give --budget in MAE-epochs (e.g. 1.3ep)")


def recorded_calibration(path: Path, wanted: dict) -> Calibration | None:
    """The measurement in calibration.json when it was taken for `wanted` (this machine, device
    and profile); None when there is none, it is for another, or the file is damaged."""
    try:
        record = read_json(path)
        if {key: record.get(key) for key in wanted} == wanted and record["flops_per_second"] > 0:
            return Calibration(float(record["flops_per_second"]), record, source="recorded")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def busy_reason(threads: int, load_before: float, load_after: float, seconds: float,
                peaks: tuple[float, float]) -> str | None:
    """Why a measurement of `threads` threads over `seconds` was taken on a busy machine (None:
    it was not), from the 1-minute load average before and after it (less what the measurement
    itself adds to it) and a matmul's FLOP/s timed before and after it."""
    cores = os.cpu_count() or 1
    free = max(0, cores - threads)
    own = threads * (1 - math.exp(-seconds / 60))       # the measurement's own share of the average
    load = max(load_before, load_after - own)
    if load > free + LOAD_SLACK:
        return f"load average {load:.1f}, where its {threads} thread(s) leave {free} of {cores} cores free"
    if max(peaks) > PEAK_SPREAD * min(peaks):
        return (f"a matmul ran at {peaks[0] / 1e9:.0f} GFLOP/s before the steps and {peaks[1] / 1e9:.0f} "
                f"after them")
    return None


def matmul_peak(size: int = 512, repeats: int = 10) -> float:
    """FLOP/s of a square fp32 matmul on the CPU (the median of `repeats`, after one untimed)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - started)
    return 2 * size ** 3 / max(statistics.median(seconds), 1e-9)


def measure_flops_per_second(profile: RunProfile, device: str = "cpu", batch_size: int = CALIBRATION_BATCH,
                             steps: int = CALIBRATION_STEPS, warmup: int = CALIBRATION_WARMUP) -> float:
    """Counted training FLOPs / the median wall time of `steps` MAE steps as the trainer takes
    them (augmented views and masks drawn, forward, backward, AdamW), at the profile's encoder.
    The median, not the mean: a burst of another process's work during one step of a few-second
    measurement would otherwise set the figure a whole suite is planned by."""
    config = resolve(RunSpec("mae"), profile, 0, {"name": "synthetic", "img_size": profile.encoder["img_size"]})
    train = dataclasses.replace(config.train_config(), batch_size=batch_size)
    torch.manual_seed(0)
    method = config.build_method().to(device)
    size = profile.encoder["img_size"]
    images = torch.randint(0, 256, (2 * batch_size, 3, size, size), dtype=torch.uint8)
    views = MaskedViews(method, images, batch_size, train.crop_scale_min, seed=0, device=torch.device(device))
    optimizer = adamw_plan(train, steps + warmup).make_optimizer(method)
    flops_per_step = flops_per_image(config.method, config.method_config) * batch_size   # (kept on disk)

    def step(s: int) -> None:
        loss, _ = method(views.batch_for_step(s))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    seconds = []
    for s in range(warmup + steps):
        started = time.perf_counter()
        step(s)
        sync()
        seconds.append(time.perf_counter() - started)
    return flops_per_step / statistics.median(seconds[warmup:])


# ---- budgets: the largest schedule that fits --------------------------------------------------
def largest_within(seconds_at, budget_seconds: float, step: float = 0.01, limit: float = 1e5) -> float:
    """The largest multiple x of `step` in (0, limit] with `seconds_at(x) <= budget_seconds`,
    for a `seconds_at` that does not decrease with x (0.0 when not even `step` fits). Searched
    by doubling then bisection on whole steps, so a few dozen calls."""
    low, high = 0, 1          # in steps: seconds_at(low * step) fits (or low = 0), high may not
    while seconds_at(high * step) <= budget_seconds:
        low, high = high, high * 2
        if high * step > limit:
            return low * step
    while high - low > 1:
        middle = (low + high) // 2
        if seconds_at(middle * step) <= budget_seconds:
            low = middle
        else:
            high = middle
    return round(low * step, 10)
