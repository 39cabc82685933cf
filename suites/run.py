"""Run a suite: every (method, setting, seed) of its grid, skipping finished runs and
resuming unfinished ones; then print and save the table (mean ± 95% CI over seeds).

    python -m suites.run --list
    python -m suites.run ablation_masking --profile smoke
    python -m suites.run ablation_masking --profile cpu --seeds 2 --only mae,none
    python -m suites.run ablation_masking --dry-run
    python -m suites.run ablation_masking --table-only      # the table of what has finished
    python -m suites.run compare_methods --budget 2.5h --dry-run   # what fits 2.5 h here, per cell
    python -m suites.run compare_methods --budget 1.3ep --recipe shared   # FLOPs of 1.3 MAE-epochs each
    python -m suites.run ablation_masking --profile imagenet --data /data/imagenet \
        --slurm --slurm-partition gpu --slurm-gpus 8 --slurm-timeout 2880   # one Slurm job per run

--budget (compare_methods only) runs the compute-matched block alone: `none` and every method at
the pre-training FLOPs of MAE at E epochs. "1.3ep" sets E; hours ("2.5", "2.5h") solve for the
largest E (to 0.01) at which the whole suite (every cell and seed, pre-training, the chosen
evaluations and BEiT's tokenizer, work already finished costing nothing) is estimated to fit, at
this machine's FLOP/s (measured once, in outputs/calibration.json). The E solved is kept in the
suite's index, so running the same command again (after a stop, or in a second process) keeps its
runs; --recalibrate measures and solves again.

Exit codes: 0 every run done, or skipped because another process holds it (with --slurm:
submitted); 1 some runs failed (each folder's result.json says why); 2 bad input (unknown
suite / profile / method, bad path or config); 130 / 143 stopped by SIGINT / SIGTERM after
writing a checkpoint (run the same command again to resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path


from core.config import ConfigError, UnknownNameError
from core.files import read_json, write_json
from engine import distributed
from engine.data import DataError
from engine.stream import DATA_SOURCES, MAX_WORKERS, MEMORY_SOURCE_MAX_BYTES
from engine.trainer import Preempted
from reports.tables import RUNS_FROM_INDEX, load_index, metric_columns, read_index, summarize, warn
from runs import slurm
from eval.registry import get_evaluation
from methods.recipes import RECIPES
from runs.cost import (Calibration, calibrate, estimate_seconds, largest_within, num_images, plan_seconds,
                       pretrain_flops, train_steps)
from runs.execute import RunSkipped, UnreadableRecord, check_inputs, execute, read_result, stale_evaluations
from runs.identity import Run, data_descriptor, resolve
from runs.records import RecordError
from suites import compare_methods
from suites.profiles import PROFILES, get_profile, override
from suites.registry import SUITES, get_suite

BUDGET_SUITE = "compare_methods"        # the suite --budget applies to


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m suites.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", nargs="?", help=f"one of: {', '.join(SUITES)}")
    parser.add_argument("--profile", default="cpu", help=f"one of: {', '.join(PROFILES)} (default cpu)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per grid cell (default: the profile's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile field (repeatable; dotted keys, JSON values), e.g. the imagenet "
                             "profile on a small folder: --set encoder.size=micro --set encoder.img_size=32 "
                             "--set train.batch_size=32 (changed configs are other runs)")
    parser.add_argument("--only", default=None,
                        help="comma-separated methods to keep from the grid; METHOD:SETTING keeps one cell "
                             "(e.g. --only 'none,beit:random 0.4'; a setting with a comma stays whole: "
                             "'pixel:raw pixels, block 0.4')")
    parser.add_argument("--recipe", default="paper",
                        help=f"one of: {', '.join(RECIPES)} (default paper: each method at its paper's recipe; "
                             f"shared: the profile's one recipe for every method, as runs before recipes had)")
    parser.add_argument("--budget", default=None, metavar="B",
                        help=f"{BUDGET_SUITE} only: its compute-matched block alone, every method at the "
                             f"pre-training FLOPs of MAE at E epochs; B is E as '1.3ep', or hours ('2.5' or "
                             f"'2.5h') the whole suite must fit on this machine (E solved from its measured FLOP/s)")
    parser.add_argument("--evals", default=None,
                        help=f"with --budget: comma-separated evaluations (default "
                             f"{','.join(compare_methods.BUDGET_EVALS)}; e.g. knn,linear,finetune,segmentation)")
    parser.add_argument("--recalibrate", action="store_true",
                        help="with --budget: measure this machine's FLOP/s again (outputs/calibration.json) "
                             "and solve the budget again instead of keeping the E of an earlier command")
    parser.add_argument("--outputs", default="outputs", help="where run folders go (default outputs/)")
    parser.add_argument("--data", default=None,
                        help="ImageFolder with train/ and test/ (default: the shipped CIFAR-10); images "
                             "of another size are resized (shorter side) and centre-cropped, grayscale "
                             "converted to RGB")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave unreadable image files out (counted) instead of stopping at the first")
    parser.add_argument("--data-source", default="auto", choices=DATA_SOURCES,
                        help="how pre-training (and k-NN, the probe and fine-tuning after it) reads --data: memory "
                             "(decoded once at the model's size, cached), stream (files decoded per step in "
                             "DataLoader workers, engine.stream) "
                             f"or auto (default: memory when the decoded train split fits "
                             f"{MEMORY_SOURCE_MAX_BYTES // 2**30} GiB, else stream); recorded in result.json")
    parser.add_argument("--data-workers", type=int, default=None, metavar="N",
                        help="with a streaming source: DataLoader workers per process (default: the "
                             f"process's cores, at most {MAX_WORKERS})")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and estimated cost, run nothing")
    parser.add_argument("--list", action="store_true", help="list the suites with grid sizes and costs")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: write the grid's index and table from the runs finished so far "
                             "(the others show as missing)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    cluster = parser.add_argument_group("Slurm (through submitit; each option needs --slurm)")
    cluster.add_argument("--slurm", action="store_true",
                         help="submit one Slurm job per run not done instead of running here; with "
                              "--dry-run, print the jobs")
    cluster.add_argument("--slurm-partition", default=None, help="partition (default: the cluster's)")
    cluster.add_argument("--slurm-nodes", type=int, default=None, help="nodes per job (default 1)")
    cluster.add_argument("--slurm-gpus", type=int, default=None,
                         help="GPUs per node = DDP processes per node (default 1)")
    cluster.add_argument("--slurm-timeout", type=int, default=None,
                         help="time limit of a job in minutes (default 1440); at it the job requeues "
                              "itself and resumes from the run's last checkpoint")
    cluster.add_argument("--slurm-cpus-per-task", type=int, default=None, help="default: the cluster's")
    cluster.add_argument("--slurm-mem", type=float, default=None, help="GB per node (default: the cluster's)")
    cluster.add_argument("--slurm-option", action="append", default=None, metavar="KEY=VALUE",
                         help="any other sbatch option, e.g. account=vision or qos=high (repeatable)")
    cluster.add_argument("--slurm-wait", action="store_true", default=None,   # None: not given
                         help="wait for the jobs to end, then write the table")
    return parser.parse_args(argv)


# --slurm-* arguments -> SlurmOptions fields
SLURM_FIELDS = {"slurm_partition": "partition", "slurm_nodes": "nodes", "slurm_gpus": "gpus",
                "slurm_timeout": "timeout_min", "slurm_cpus_per_task": "cpus_per_task", "slurm_mem": "mem_gb"}


def slurm_options(args: argparse.Namespace) -> slurm.SlurmOptions | None:
    """The --slurm-* options as SlurmOptions (None without --slurm); ConfigError for bad ones."""
    given = [name for name in (*SLURM_FIELDS, "slurm_option", "slurm_wait") if getattr(args, name) is not None]
    if not args.slurm:
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} needs --slurm")
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--slurm submits jobs from one process; run it without torchrun")
    return slurm.SlurmOptions(**{field: getattr(args, name) for name, field in SLURM_FIELDS.items()
                                 if getattr(args, name) is not None},
                              extra=slurm.parse_extra(args.slurm_option or []))


def plan(suite_name: str, profile_name: str, seeds: int | None, only: str | None,
         data: str | None, check_data: bool = True, recipe: str = "paper") -> list[Run]:
    """Every run of the suite that `only` keeps (all without it), in grid order."""
    grid = plan_grid(suite_name, profile_name, seeds, data, check_data, recipe)
    return keep_only(grid, only, suite_name) if only else grid


def plan_grid(suite_name: str, profile_name: str, seeds: int | None, data: str | None,
              check_data: bool = True, recipe: str = "paper", settings: tuple[str, ...] = ()) -> list[Run]:
    """Every run of the suite's whole grid. `check_data=False` (--dry-run) names the runs
    without looking at the data folder; `settings` are --set overrides of the profile."""
    suite = get_suite(suite_name)
    profile = override(get_profile(profile_name), list(settings))
    check_recipe(recipe)
    descriptor = data_descriptor(profile, data, check=check_data)
    return resolve_runs(suite.grid(profile, recipe), profile, seed_count(profile, seeds), descriptor, recipe)


def resolve_runs(specs: list, profile, seeds: int, descriptor: dict, recipe: str) -> list[Run]:
    return [Run(spec, seed, resolve(spec, profile, seed, descriptor, recipe=recipe))
            for spec in specs for seed in range(seeds)]


def seed_count(profile, seeds: int | None) -> int:
    seeds = profile.seeds if seeds is None else seeds
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    return seeds


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe {recipe!r} unknown; known: {', '.join(RECIPES)}")


# ---- --budget: the compute-matched block at the FLOPs of E MAE-epochs --------------------------
@dataclass(frozen=True)
class ComputeBudget:
    """--budget: hours the whole suite must fit on this machine, or E MAE-epochs of FLOPs."""
    hours: float | None = None
    mae_epochs: float | None = None

    def describe(self) -> str:
        return f"{self.hours:g} h" if self.hours is not None else f"{self.mae_epochs:g} MAE-epochs of FLOPs"


def parse_budget(text: str) -> ComputeBudget:
    """'2.5' or '2.5h': hours; '1.3ep': MAE-epochs (rounded to 0.01)."""
    word = text.strip().lower()
    epochs = word.endswith("ep")
    number = word[:-2] if epochs else word.removesuffix("h")
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"--budget {text!r} is neither hours ('2.5' or '2.5h') nor MAE-epochs of "
                          f"FLOPs ('1.3ep')") from None
    if not math.isfinite(value) or value <= 0 or (epochs and round(value, 2) <= 0):
        raise ConfigError(f"--budget {text!r} must be a positive number of hours or of MAE-epochs "
                          f"(at least 0.01ep)")
    return ComputeBudget(mae_epochs=round(value, 2)) if epochs else ComputeBudget(hours=value)


def parse_evals(text: str | None) -> tuple[str, ...]:
    """--evals: registered evaluations, comma-separated (the budget's default without it)."""
    if text is None:
        return compare_methods.BUDGET_EVALS
    names = tuple(dict.fromkeys(word.strip() for word in text.split(",") if word.strip()))
    if not names:
        raise ConfigError(f"--evals {text!r} names nothing; pass evaluations, comma-separated "
                          f"(e.g. knn,linear)")
    for name in names:
        get_evaluation(name)        # an unknown one: one line naming the known ones
    return names


@dataclass(frozen=True)
class Allocation:
    """What a --budget gives every method, and what the suite is estimated to cost."""
    budget: ComputeBudget
    mae_epochs: float                   # E: every method gets MAE's pre-training FLOPs at E epochs
    epochs: dict[str, float]            # each method's epochs at E
    flops_per_image: dict[str, float]   # each method's training FLOPs per image
    calibration: Calibration
    seeds: int
    evals: tuple[str, ...]
    recipe: str
    kept: bool = False                  # E kept from the suite's index (an earlier command solved it)

    def record(self, estimated_seconds: float, data: dict) -> dict:
        """The suite index's "budget" entry."""
        return {"hours": self.budget.hours, "mae_epochs": self.mae_epochs,
                "flops_per_image_mae": self.flops_per_image[compare_methods.REFERENCE],
                "flops_per_second": self.calibration.flops_per_second, "calibration": self.calibration.record,
                "epochs": self.epochs, "seeds": self.seeds, "evals": list(self.evals), "recipe": self.recipe,
                "data": data, "estimated_hours": estimated_seconds / 3600}

    def matches(self, stored: dict | None, data: dict) -> bool:
        """Whether an earlier command's index entry was solved for this same hours budget."""
        return (isinstance(stored, dict) and stored.get("hours") == self.budget.hours
                and stored.get("seeds") == self.seeds and stored.get("evals") == list(self.evals)
                and stored.get("recipe") == self.recipe and stored.get("data") == data
                and isinstance(stored.get("mae_epochs"), (int, float)))


def budget_runs(profile, recipe: str, mae_epochs: float, evals: tuple[str, ...], seeds: int,
                descriptor: dict) -> list[Run]:
    return resolve_runs(compare_methods.budget_grid(profile, recipe, mae_epochs, evals), profile, seeds,
                        descriptor, recipe)


def allocate(budget: ComputeBudget, profile, recipe: str, evals: tuple[str, ...], seeds: int, descriptor: dict,
             outputs: Path, suite_dir: Path, calibration: Calibration, recalibrate: bool) -> Allocation:
    """E for the budget: given ("1.3ep"), kept from the suite's index (the same hours, seeds,
    evaluations, recipe and data solved by an earlier command), or solved for the hours."""
    flops_per_image = compare_methods.budget_flops_per_image(profile, recipe)
    allocation = Allocation(budget, budget.mae_epochs or 0.0, {}, flops_per_image, calibration, seeds, evals, recipe)
    if budget.hours is not None:
        stored = earlier_budget(suite_dir)
        if not recalibrate and allocation.matches(stored, descriptor):
            allocation = dataclasses.replace(allocation, mae_epochs=float(stored["mae_epochs"]), kept=True)
        else:
            def seconds_at(mae_epochs: float) -> float:
                runs = budget_runs(profile, recipe, mae_epochs, evals, seeds, descriptor)
                return plan_seconds(runs, profile, outputs, calibration.flops_per_second)[2]

            mae_epochs = largest_within(seconds_at, budget.hours * 3600)
            if mae_epochs <= 0:
                raise ConfigError(f"--budget {budget.hours:g}h does not cover the suite without its pre-training: "
                                  f"~{seconds_at(0.01) / 3600:.2f} h of evaluations (and BEiT's tokenizer) at "
                                  f"{calibration.flops_per_second / 1e9:.0f} GFLOP/s; raise it, or pass fewer "
                                  f"--evals or --seeds")
            allocation = dataclasses.replace(allocation, mae_epochs=mae_epochs)
    return dataclasses.replace(allocation, epochs=compare_methods.budget_epochs(profile, recipe, allocation.mae_epochs))


def earlier_budget(suite_dir: Path) -> dict | None:
    """The "budget" entry of the suite's index (None when there is none or it cannot be read)."""
    try:
        return read_index(suite_dir / "runs.json").get("budget")
    except (RecordError, OSError):
        return None


def budget_warnings(allocation: Allocation, runs: list[Run]) -> list[str]:
    """What makes a budget too small to say much: E below the calibration's threshold, a cell
    that trains less than one step."""
    warnings = []
    if allocation.mae_epochs < compare_methods.SEPARATING_MAE_EPOCHS:
        warnings.append(f"WARNING: {allocation.mae_epochs:g} MAE-epochs is below the "
                        f"{compare_methods.SEPARATING_MAE_EPOCHS:g} at which nano MAE was measured to "
                        f"separate from random init in k-NN (DESIGN.md); differences will likely sit within the seed spread "
                        f"(raise --budget)")
    for run in runs:
        if run.seed == 0 and run.config.train is not None and train_steps(run.config) < 1:
            per_epoch = num_images(run.config.data, "train") // run.config.train["batch_size"]
            warnings.append(f"WARNING: {run.spec.method} trains 0 steps at {run.config.train['epochs']:g} epochs "
                            f"({per_epoch} steps per epoch): its row is its random init (raise --budget)")
    return warnings


def keep_only(grid: list[Run], only: str, suite_name: str) -> list[Run]:
    """The runs of `grid` whose cells `--only` keeps."""
    kept = select([run.spec for run in grid if run.seed == 0], only, suite_name)
    return [run for run in grid if run.spec in kept]


def select(specs: list, only: str, suite_name: str) -> list:
    """The grid cells `--only` keeps: "mae,none" keeps methods, "beit:random 0.4" one cell."""
    known = sorted({s.method for s in specs})
    kept = []
    for word in only_words(only, known):
        method, _, setting = (part.strip() for part in word.partition(":"))
        if method not in known:
            raise UnknownNameError(f"--only names {method!r}, not in suite {suite_name!r}; its methods: "
                                   f"{', '.join(known)}")
        cells = [s for s in specs if s.method == method and (not setting or s.setting == setting)]
        if not cells:
            settings = ", ".join(repr(s.setting) for s in specs if s.method == method)
            raise UnknownNameError(f"--only names {word!r}, but {method} has no setting {setting!r} in suite "
                                   f"{suite_name!r}; its settings: {settings}")
        kept += [s for s in cells if s not in kept]
    return [s for s in specs if s in kept]     # grid order


def only_words(only: str, methods: list[str]) -> list[str]:
    """--only split at commas, except inside a setting that has one ("pixel:raw pixels, block 0.4")."""
    words: list[str] = []
    for piece in (p.strip() for p in only.split(",")):
        if words and ":" in words[-1] and ":" not in piece and piece not in methods:
            words[-1] += ", " + piece
        elif piece:
            words.append(piece)
    if not words:
        raise UnknownNameError(f"--only {only!r} names nothing; pass methods or METHOD:SETTING, "
                               f"comma-separated (its methods: {', '.join(methods)})")
    return words


def flatten(overrides: dict, prefix: str = "") -> dict:
    """{"mask": {"ratio": 0.75}} -> {"mask.ratio": 0.75}: the grid's settings as report columns."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_state(run_dir: Path, spec, profile) -> str:
    """What a run folder holds for this grid cell: done, to evaluate (named), to run, failed,
    unreadable (a damaged result.json)."""
    try:
        record = read_result(run_dir)
    except UnreadableRecord:
        return "unreadable"
    if record is None:
        return "to run"
    if not record.done:
        return record.status
    stale = stale_evaluations(record, spec.evals, profile)
    return "to evaluate: " + ", ".join(stale) if stale else "done"


def print_plan(suite_name: str, profile_name: str, runs: list[Run], outputs: Path, recipe: str = "paper",
               allocation: Allocation | None = None, grid: list[Run] | None = None, profile=None) -> None:
    """Each run with its estimated cost and state; with a budget, its allocation and its total
    (over the whole `grid`, whatever --only keeps) against the budget. `profile`: the named
    one with its --set overrides."""
    profile = profile or get_profile(profile_name)
    print(f"suite {suite_name}, profile {profile_name}, recipe {recipe}: {len(runs)} runs")
    if allocation is not None:
        print_budget_plan(runs, grid or runs, outputs, profile, allocation)
        return
    total = left = 0.0
    for run in runs:
        seconds = estimate_seconds(run.config, profile)
        state = run_state(run.config.folder(outputs), run.spec, profile)
        total += seconds
        left += seconds if state in ("to run", "failed", "unreadable") else 0.0   # pre-training still to do
        print(f"  {run.spec.method:6s} {run.spec.setting:22s} seed {run.seed}  ~{seconds / 60:7.1f} min  "
              f"{run.name}  [{state}]")
    print(f"estimated pre-training: {left / 3600:.2f} h left of {total / 3600:.2f} h for these runs "
          f"at {profile.flops_per_second / 1e9:.0f} GFLOP/s (plus a minute or two of evaluation per run; "
          f"fine-tuning and segmentation take longer)")


def print_budget_plan(runs: list[Run], grid: list[Run], outputs: Path, profile, allocation: Allocation) -> None:
    flops_per_second = allocation.calibration.flops_per_second
    per_run, prerequisites, total = plan_seconds(grid, profile, outputs, flops_per_second)
    how = ("kept from the suite's index, solved by an earlier command; --recalibrate solves again"
           if allocation.kept else "solved for the hours" if allocation.budget.hours is not None else "given")
    print(f"budget {allocation.budget.describe()}: E = {allocation.mae_epochs:g} MAE-epochs of pre-training FLOPs "
          f"per method ({how})")
    print(f"this machine: {allocation.calibration.describe()}")
    configs = {run.spec.method: run.config for run in grid if run.seed == 0}
    for method, epochs in allocation.epochs.items():
        print(f"  {method:6s} {epochs:6.2f} epochs x {format_flops(allocation.flops_per_image[method])} per image "
              f"= {format_flops(pretrain_flops(configs[method]))} per run ({train_steps(configs[method])} steps)")
    print(f"evaluations: {', '.join(allocation.evals)}; {allocation.seeds} seed(s)")
    for run in runs:
        phases = per_run[run.name]
        seconds, pretrain = sum(phases.values()), phases.get("pre-train", 0.0)
        state = run_state(run.config.folder(outputs), run.spec, profile)
        print(f"  {run.spec.method:6s} {run.spec.setting:34s} seed {run.seed}  ~{seconds / 60:6.1f} min "
              f"(pre-train {pretrain / 60:5.1f}, evals {(seconds - pretrain) / 60:4.1f})  {run.name}  [{state}]")
    for name, seconds in prerequisites.items():
        print(f"  prerequisite {name}  ~{seconds / 60:6.1f} min  [to run]")
    if allocation.budget.hours is not None:
        print(f"estimated: {total / 3600:.2f} h left of the {allocation.budget.hours:g} h budget for the whole suite "
              f"({len(grid)} runs; finished work counts 0)")
    else:
        print(f"estimated: {total / 3600:.2f} h left for the whole suite ({len(grid)} runs; finished work counts 0)")
    for line in budget_warnings(allocation, grid):
        print(line)


def list_suites(cost_profile: str, recipe: str = "paper") -> None:
    """Suites with their grid sizes per profile, and the estimated pre-training cost at
    `cost_profile` (counting FLOPs builds every model of the grid, so only one profile)."""
    costs: dict[str, float] = {}
    cost_at = get_profile(cost_profile)
    for name in SUITES:
        suite = get_suite(name)
        print(f"{name}: {suite.DESCRIPTION}")
        for profile_name, profile in PROFILES.items():
            specs = suite.grid(profile, recipe)
            line = (f"  {profile_name:9s} {len(specs):2d} cells x {profile.seeds} seed(s) = "
                    f"{len(specs) * profile.seeds:3d} runs")
            if profile is cost_at:
                # the profile's own data, without reading it (imagenet: ImageNet-1k's size)
                data = {"name": "imagenet" if profile.data == "user" else profile.data,
                        "img_size": profile.encoder["img_size"]}
                total = 0.0
                for spec in specs:
                    config = resolve(spec, profile, 0, data, recipe=recipe)
                    key = json.dumps(config.to_dict(), sort_keys=True)
                    if key not in costs:
                        costs[key] = estimate_seconds(config, profile)
                    total += costs[key] * profile.seeds
                line += (f", ~{format_hours(total)} of pre-training at "
                         f"{profile.flops_per_second / 1e9:g} GFLOP/s (estimated from counted FLOPs)")
            print(line)
    print(f"(costs shown for --profile {cost_profile}, --recipe {recipe}; pass --list --profile NAME for another)")


def format_flops(flops: float) -> str:
    """2.4e6 -> '2.4 MFLOP', 1.92e13 -> '19.2 TFLOP', 1.27e11 -> '127 GFLOP'."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            value = flops / scale
            return f"{value:.3g} {prefix}FLOP" if value < 100 else f"{value:.0f} {prefix}FLOP"
    return f"{flops:.0f} FLOP"


def format_hours(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def write_index(suite_dir: Path, suite_name: str, profile_name: str, runs: list[Run], outputs: Path,
                budget: dict | None = None) -> None:
    """runs.json: the suite's runs with their grid settings and recipe, as the table reads them
    (and a --budget's allocation). Finished runs of the same cells at other seeds, listed by an
    earlier command (e.g. `--seeds 3` before `--seeds 2`), stay listed: a table never loses a
    finished seed to a smaller --seeds; so do finished runs of the same cells at the other recipe."""
    suite_dir.mkdir(parents=True, exist_ok=True)
    entries = [{"method": run.spec.method, "setting": run.spec.setting, "recipe": run.config.recipe,
                "seed": run.seed, "params": flatten(run.spec.overrides), "evals": list(run.spec.evals),
                "run_dir": str(RUNS_FROM_INDEX / run.name)}
               for run in runs]
    kept, dropped = earlier_finished_runs(suite_dir, runs)
    if kept:
        print(f"runs.json also lists {len(kept)} finished run(s) of other seeds or the other recipe from earlier "
              f"commands")
    if dropped:
        print(f"runs.json no longer lists {dropped} finished run(s) of an earlier command (another "
              f"--data or grid); their folders stay in {outputs}/runs")
    order = {(run.spec.method, recipe_free(run.spec.setting)): i for i, run in enumerate(runs)}
    entries = sorted(entries + kept, key=lambda e: (order[(e["method"], recipe_free(e["setting"]))],
                                                    entry_recipe(e), e["seed"]))
    index = {"suite": suite_name, "profile": profile_name, "runs": entries}
    if budget is not None:
        index["budget"] = budget
    write_json(suite_dir / "runs.json", index)


def entry_recipe(entry: dict) -> str:
    """An index entry's recipe: entries written before recipes existed are the shared one's."""
    return entry.get("recipe", "shared")


def recipe_free(setting: str) -> str:
    """A cell's setting label without the epochs that depend on its recipe's FLOPs per image."""
    return setting.split(" (")[0]


def earlier_finished_runs(suite_dir: Path, runs: list[Run]) -> tuple[list[dict], int]:
    """Entries of the existing runs.json to keep (finished, same cell and config but another
    seed; or same cell and data at the other recipe) and how many finished ones are dropped
    (another config, e.g. other --data)."""
    index_file = suite_dir / "runs.json"
    if not index_file.exists():
        return [], 0

    def unseeded(config: dict) -> str:
        return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True)

    cells = {(run.spec.method, run.spec.setting, run.config.recipe): unseeded(run.config.to_dict()) for run in runs}
    # the other recipe's run of a cell: the same method and setting but for the epochs a
    # FLOPs-matched label ends with, "(0.25 ep)" under one recipe, "(0.21 ep)" under the other
    data = {(run.spec.method, recipe_free(run.spec.setting)): run.config.to_dict()["data"] for run in runs}
    listed = {(run.spec.method, run.spec.setting, run.config.recipe, run.seed) for run in runs}
    try:
        earlier = read_index(index_file)["runs"]        # the report's reader: validated
    except RecordError as err:
        warn(f"{err}; it is written anew from this grid (the run folders stay in outputs/runs)")
        return [], 0
    kept, dropped = [], 0
    for entry in earlier:
        run_dir = suite_dir / entry["run_dir"]
        cell = (entry["method"], entry["setting"], entry_recipe(entry))
        if (*cell, entry["seed"]) in listed:
            continue
        try:
            record = read_result(run_dir)
        except UnreadableRecord:
            record = None            # not listed; the run's own cell names it
        if record is None or not record.done or not (run_dir / "config.json").exists():
            continue
        config = read_json(run_dir / "config.json")
        if cell in cells:
            same = cells[cell] == unseeded(config)
        else:      # the other recipe's run of a cell of this grid, on the same data
            same = data.get((cell[0], recipe_free(cell[1]))) == config.get("data")
        if same:
            kept.append(entry)
        else:
            dropped += 1
    return kept, dropped


def write_table(suite_dir: Path) -> None:
    runs_table = load_index(suite_dir / "runs.json")
    table = summarize(runs_table, metric_columns(runs_table))
    table.to_csv(suite_dir / "table.csv", index=False)
    (suite_dir / "table.md").write_text(table.to_markdown(index=False) + "\n")
    print()
    print(table.to_string(index=False))


def table_command(args: argparse.Namespace) -> str:
    """The command that writes the table once the jobs are done: this one without --slurm."""
    words = ["python -m suites.run", args.suite, "--profile", args.profile]
    for flag, value in (("--recipe", args.recipe), ("--budget", args.budget), ("--evals", args.evals),
                        ("--seeds", args.seeds), ("--only", args.only), ("--outputs", args.outputs),
                        ("--data", args.data)):
        if value is not None and not (flag == "--outputs" and value == "outputs") \
                and not (flag == "--recipe" and value == "paper"):
            words += [flag, str(value)]
    for setting in args.set:
        words += ["--set", setting]
    return " ".join(words)


def submit_to_slurm(args: argparse.Namespace, options: slurm.SlurmOptions, jobs: list[slurm.PlannedJob],
                    runs: list[Run], grid: list[Run], outputs: Path, suite_dir: Path,
                    budget: dict | None = None) -> int:
    if jobs:
        slurm.cluster()   # no sbatch here: say so before writing anything
    write_index(suite_dir, args.suite, args.profile, grid, outputs, budget)
    if not jobs:
        print(f"nothing to submit: all {len(runs)} runs are done")
        write_table(suite_dir)
        print(f"\ntable: {suite_dir}/table.md")
        return 0
    folder = outputs / "slurm" / args.suite / args.profile
    submitted = slurm.submit(jobs, options, folder)
    print(f"submitted {len(jobs)} job(s); each: {options.describe()}")
    job_ids = [handle.job_id for handle in submitted]
    for job, job_id in zip(jobs, job_ids):
        after = "" if job.after is None else f"  (after {job_ids[job.after]})"
        print(f"  {job_id}  {job.label}{after}")
    print(f"follow them: squeue -j {','.join(job_ids)}; logs: {folder}/<job id>_<task>_log.out/.err")
    print("a job at its time limit requeues itself and resumes from the run's last checkpoint")
    if not args.slurm_wait:
        print(f"once squeue lists none of them, the same command without --slurm finds every run done and "
              f"writes the table (--dry-run first shows each run's state):\n  {table_command(args)}")
        return 0
    print("waiting for them:")
    failed = slurm.wait(jobs, submitted)
    write_table(suite_dir)
    print(f"\ntable: {suite_dir}/table.md")
    if failed:
        print(f"{len(failed)} job(s) FAILED (their logs in {folder}, runs' result.json in {outputs}/runs)",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    check_recipe(args.recipe)
    if args.data_workers is not None and args.data_workers < 0:
        raise ConfigError(f"--data-workers {args.data_workers}: pass 0 (decode in the training process) or more")
    if args.list:
        list_suites(args.profile, args.recipe)
        return 0
    if not args.suite:
        raise UnknownNameError(f"no suite given; known: {', '.join(SUITES)} (or --list)")
    outputs = Path(args.outputs)
    profile = override(get_profile(args.profile), args.set)
    budget = budget_arguments(args)
    options = slurm_options(args)
    if budget is not None and budget.hours is not None and options:
        raise ConfigError("--budget in hours is solved at this machine's FLOP/s; with --slurm pass MAE-epochs "
                          "(e.g. --budget 1.3ep)")
    allocation = None
    suite_dir = outputs / "suites" / args.suite / args.profile
    # the suite's index (and so its table) lists the whole grid, whatever --only picked to run:
    # processes running different cells side by side then write the same index
    if budget is None:
        grid = plan_grid(args.suite, args.profile, args.seeds, args.data, not args.dry_run, args.recipe,
                         tuple(args.set))
    else:
        # the budgeted block is its own table beside the full grid's: <profile>-budget
        suite_dir = outputs / "suites" / args.suite / f"{args.profile}-budget"
        seeds = seed_count(profile, args.seeds)
        descriptor = data_descriptor(profile, args.data, check=not args.dry_run)
        evals = parse_evals(args.evals)
        budget_runs(profile, args.recipe, 1.0, evals, 1, descriptor)    # bad evaluations fail before calibrating
        calibration = calibrate(profile, outputs, distributed.default_device(args.device).split(":")[0],
                                recalibrate=args.recalibrate)
        allocation = allocate(budget, profile, args.recipe, evals, seeds, descriptor, outputs, suite_dir,
                              calibration, args.recalibrate)
        grid = budget_runs(profile, args.recipe, allocation.mae_epochs, evals, seeds, descriptor)
    runs = keep_only(grid, args.only, args.suite) if args.only else grid
    if not args.dry_run:
        check_outputs(outputs)
        if not args.table_only:
            check_inputs(runs, profile)       # e.g. CamVid for segmentation: before any training
    jobs = slurm.plan_jobs(runs, profile, outputs, args.device, not args.no_progress,
                           "skip" if args.skip_bad_images else "error", args.data_source,
                           args.data_workers) if options else []
    if args.dry_run:
        print_plan(args.suite, args.profile, runs, outputs, args.recipe, allocation, grid, profile)
        if options:
            slurm.print_jobs(jobs, options, len(runs))
        return 0
    index_budget = None
    if allocation is not None:
        if distributed.is_main():
            print_plan(args.suite, args.profile, runs, outputs, args.recipe, allocation, grid, profile)
        estimated = plan_seconds(grid, profile, outputs, allocation.calibration.flops_per_second)[2]
        index_budget = allocation.record(estimated, descriptor)
    if args.table_only:
        write_index(suite_dir, args.suite, args.profile, grid, outputs, index_budget)
        write_table(suite_dir)
        print(f"\ntable: {suite_dir}/table.md")
        return 0
    if options:
        return submit_to_slurm(args, options, jobs, runs, grid, outputs, suite_dir, index_budget)
    distributed.init_from_env()       # under torchrun: join the process group
    device = distributed.default_device(args.device)
    if distributed.is_main():
        write_index(suite_dir, args.suite, args.profile, grid, outputs, index_budget)

    failed, skipped, started = [], [], time.time()
    for i, run in enumerate(runs, 1):
        name = run.name
        if distributed.is_main():
            print(f"[{i}/{len(runs)}] {run.spec.method} {run.spec.setting} seed {run.seed} -> {name}", flush=True)
        try:
            execute(run, profile, outputs, device=device, progress=not args.no_progress,
                    on_bad_image="skip" if args.skip_bad_images else "error", data_source=args.data_source,
                    workers=args.data_workers)
        except RunSkipped as err:
            skipped.append(name)
            print(f"  skipped: {err}")
        except (DataError, UnknownNameError, ConfigError):
            raise  # bad input: stop the whole suite (exit 2), nothing else would work either
        except UnreadableRecord as err:      # the file is left as it is
            failed.append(name)
            print(f"  FAILED: {err}", file=sys.stderr)
        except Preempted as err:
            print(f"stopped: {err}", file=sys.stderr)
            return 128 + (err.signum or 0)
        except Exception as err:  # one run's failure must not stop the others
            failed.append(name)
            print(f"  FAILED: {err.__class__.__name__}: {err} (traceback in {name}/result.json)")

    if not distributed.is_main():
        return 0
    write_table(suite_dir)
    print(f"\n{len(runs)} runs in {time.time() - started:.0f} s; table: {suite_dir}/table.md")
    if skipped:
        print(f"{len(skipped)} run(s) were busy in another process: {', '.join(skipped)}")
    if failed:
        print(f"{len(failed)} run(s) FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def budget_arguments(args: argparse.Namespace) -> ComputeBudget | None:
    """--budget parsed (None without it); its companions checked."""
    if args.budget is None:
        for flag in ("evals", "recalibrate"):
            if getattr(args, flag):
                raise ConfigError(f"--{flag} needs --budget")
        return None
    if args.suite != BUDGET_SUITE:
        raise ConfigError(f"--budget applies to {BUDGET_SUITE} only (its compute-matched block); "
                          f"{args.suite} runs its whole grid: drop --budget, narrow it with --seeds / --only")
    return parse_budget(args.budget)


def check_outputs(outputs: Path) -> None:
    """--outputs can be created and written (checked before any work, creating nothing: a run
    must not train for hours and then find it cannot save)."""
    existing = outputs.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return
    raise ConfigError(f"--outputs {outputs} cannot be created or written ({problem}); pass a folder "
                      f"you can write to, e.g. --outputs outputs")


def cli(argv=None) -> int:
    try:
        return main(argv)
    except (UnknownNameError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
