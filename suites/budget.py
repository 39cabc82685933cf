"""`compare_methods --budget`: its compute-matched block alone, `none` and every method at the
pre-training FLOPs of MAE at E epochs ("MAE-epochs of FLOPs").

    --budget 1.3ep    E given
    --budget 2.5h     E solved: the largest (to 0.01) at which the whole block (every cell and seed,
                      pre-training, the chosen evaluations, BEiT's tokenizer; finished work costing
                      nothing) is estimated to fit at this machine's measured FLOP/s

The E solved is kept in the suite's index, so the same command again (after a stop, or in a
second process) keeps its runs; --recalibrate measures and solves again.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigError
from engine.trainer import total_steps
from eval.registry import get_evaluation
from runs.cost import (Calibration, calibrate, cell_flops_per_image, format_flops, largest_within, num_images, plan_seconds,
                       pretrain_flops, train_steps)
from runs.curve import decay_start, is_branch
from runs.identity import RunProfile, Run, data_descriptor
from runs.index import index_budget
from runs.plan import Plan, make_plan
from suites import compare_methods
from suites.plan import init_rows, keep_only, only_words, resolve_runs, seed_count

BUDGET_SUITE = "compare_methods"        # the suite --budget applies to


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


def budget_arguments(suite: str, budget: str | None, evals: str | None, recalibrate: bool) -> ComputeBudget | None:
    """--budget parsed (None without it); its companions checked."""
    if budget is None:
        for flag, given in (("evals", evals), ("recalibrate", recalibrate)):
            if given:
                raise ConfigError(f"--{flag} needs --budget")
        return None
    if suite != BUDGET_SUITE:
        raise ConfigError(f"--budget applies to {BUDGET_SUITE} only (its compute-matched block); "
                          f"{suite} runs its whole grid: drop --budget, narrow it with --seeds / --only")
    return parse_budget(budget)


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


def method_flops(profile: RunProfile, recipe: str) -> dict[str, float]:
    """Each method's training FLOPs per image at its budget cell under `recipe`."""
    return compare_methods.budget_flops_per_image(profile, lambda spec: cell_flops_per_image(spec, profile, recipe))


def budget_runs(profile: RunProfile, recipe: str, mae_epochs: float, evals: tuple[str, ...], seeds: int,
                descriptor: dict) -> list[Run]:
    grid = compare_methods.budget_grid(profile, method_flops(profile, recipe), mae_epochs, evals)
    return resolve_runs(grid, profile, seeds, descriptor, recipe)


def budget_dir(outputs: Path, profile_name: str) -> Path:
    """The budgeted block is its own table beside the full grid's: <profile>-budget."""
    return Path(outputs) / "suites" / BUDGET_SUITE / f"{profile_name}-budget"


def budget_plan(profile_name: str, profile: RunProfile, recipe: str, outputs: Path, mae_epochs: float,
                evals: tuple[str, ...], seeds: int, descriptor: dict, known=None) -> Plan:
    """The plan of the whole block at E = `mae_epochs` (`known`: folder states read before)."""
    grid = budget_runs(profile, recipe, mae_epochs, evals, seeds, descriptor)
    return make_plan(BUDGET_SUITE, profile_name, profile, recipe, outputs, grid, known=known,
                     suite_dir=budget_dir(outputs, profile_name))


def allocate(budget: ComputeBudget, profile: RunProfile, recipe: str, evals: tuple[str, ...], seeds: int,
             descriptor: dict, outputs: Path, suite_dir: Path, calibration: Calibration,
             recalibrate: bool, known: dict | None = None) -> Allocation:
    """E for the budget: given ("1.3ep"), kept from the suite's index (the same hours, seeds,
    evaluations, recipe and data solved by an earlier command), or solved for the hours (`known`:
    the run folders' states read while solving, kept for the plan)."""
    flops = method_flops(profile, recipe)
    allocation = Allocation(budget, budget.mae_epochs or 0.0, {}, flops, calibration, seeds, evals, recipe)
    if budget.hours is not None:
        stored = index_budget(suite_dir)
        if not recalibrate and allocation.matches(stored, descriptor):
            allocation = dataclasses.replace(allocation, mae_epochs=float(stored["mae_epochs"]), kept=True)
        else:
            mae_epochs = solve(budget.hours, profile, recipe, evals, seeds, descriptor, outputs, calibration,
                               {} if known is None else known)
            allocation = dataclasses.replace(allocation, mae_epochs=mae_epochs)
    return dataclasses.replace(allocation, epochs=compare_methods.budget_epochs(flops, allocation.mae_epochs))


def solve(hours: float, profile: RunProfile, recipe: str, evals: tuple[str, ...], seeds: int, descriptor: dict,
          outputs: Path, calibration: Calibration, known: dict) -> float:
    """The largest E (to 0.01) whose whole block is estimated to fit in `hours`; each run
    folder's state is read once (into `known`) however many E are tried."""

    def seconds_at(mae_epochs: float) -> float:
        plan = budget_plan(profile.name, profile, recipe, outputs, mae_epochs, evals, seeds, descriptor, known)
        known.update(plan.states)
        return plan_seconds(plan, calibration.flops_per_second)[2]

    mae_epochs = largest_within(seconds_at, hours * 3600)
    if mae_epochs <= 0:
        raise ConfigError(f"--budget {hours:g}h does not cover the suite without its pre-training: "
                          f"~{seconds_at(0.01) / 3600:.2f} h of evaluations (and BEiT's tokenizer) at "
                          f"{calibration.flops_per_second / 1e9:.0f} GFLOP/s; raise it, or pass fewer "
                          f"--evals or --seeds")
    return mae_epochs


def plan_budget(budget: ComputeBudget, profile_name: str, profile: RunProfile, recipe: str, outputs: Path,
                seeds: int | None, only: str | None, data: str | None, check_data: bool, evals: str | None,
                device: str, recalibrate: bool) -> tuple[Plan, Allocation]:
    """The block's plan at the budget's E (calibrating this machine's FLOP/s first), and its allocation."""
    seeds = seed_count(profile, seeds)
    descriptor = data_descriptor(profile, data, check=check_data)
    names = parse_evals(evals)
    budget_runs(profile, recipe, 1.0, names, 1, descriptor)    # bad evaluations fail before calibrating
    calibration = calibrate(profile, outputs, device, recalibrate=recalibrate)
    if calibration.warning:         # before solving: a budget solved at a busy machine's figure may not cover it
        print(calibration.warning, file=sys.stderr)
    known: dict = {}
    allocation = allocate(budget, profile, recipe, names, seeds, descriptor, outputs, budget_dir(outputs, profile_name),
                          calibration, recalibrate, known)
    plan = budget_plan(profile_name, profile, recipe, outputs, allocation.mae_epochs, names, seeds, descriptor, known)
    if only:
        plan = dataclasses.replace(plan, runs=tuple(keep_only(list(plan.grid), only, BUDGET_SUITE)))
    return plan, allocation


# ---- --curve: the block at several budgets, one trunk per method and seed (runs.curve) ----------
def parse_curve(text: str) -> tuple[float, ...]:
    """'0.5,1,2.5,5ep' (or each with its 'ep'): MAE-epochs of FLOPs, rounded to 0.01, ascending."""
    words = [word.strip().lower().removesuffix("ep") for word in text.split(",") if word.strip()]
    try:
        budgets = sorted({round(float(word), 2) for word in words})
    except ValueError:
        raise ConfigError(f"--curve {text!r} is not a list of MAE-epochs of FLOPs; pass e.g. 0.5,1,2.5,5ep") from None
    if not budgets or budgets[0] <= 0 or not all(math.isfinite(b) for b in budgets):
        raise ConfigError(f"--curve {text!r} needs positive MAE-epochs (at least 0.01), e.g. 0.5,1,2.5,5ep")
    return tuple(budgets)


def curve_warmup_steps(profile: RunProfile, descriptor: dict) -> int:
    """A curve's warm-up: the profile's warm-up fraction of its own schedule, in steps (cpu: 5% of 5
    epochs, 49 steps), fixed whatever the budget, so every budget shares it."""
    train = profile.train
    return round(train.warmup_frac * total_steps(train.epochs, num_images(descriptor, "train"), train.batch_size))


def curve_runs(profile: RunProfile, recipe: str, budgets: tuple[float, ...], evals: tuple[str, ...], seeds: int,
               descriptor: dict, refused: dict | None = None) -> list[Run]:
    """Every cell of the curve at every seed; a method whose config cannot train under wsd (iBOT's
    paper recipe: its momentum depends on the run's length) is left out, its reason in `refused`."""
    grid = compare_methods.curve_grid(profile, method_flops(profile, recipe), budgets,
                                      curve_warmup_steps(profile, descriptor), evals)
    runs = []
    for spec in grid:
        try:
            runs += resolve_runs([spec], profile, seeds, descriptor, recipe, inits=False)
        except ConfigError as err:
            if refused is None:
                raise
            refused.setdefault(spec.method, str(err))
    return runs + init_rows(runs, profile)


def check_decays(runs: list[Run]) -> None:
    """ConfigError (one line) when a budget's decay would start inside the warm-up."""
    for run in runs:
        if run.seed == 0 and is_branch(run.config):
            try:
                decay_start(run.config, train_steps(run.config))
            except ConfigError as err:
                raise ConfigError(f"--curve: {run.spec.method} at {run.spec.budget:g}ep: {err}") from None


def curve_dir(outputs: Path, profile_name: str, recipe: str = "shared") -> Path:
    """A curve's table: <profile>-curve under the shared recipe (as before recipes had curves),
    <profile>-curve-<recipe> under another, so that each recipe's curve has its own index."""
    suffix = "" if recipe == "shared" else f"-{recipe}"
    return Path(outputs) / "suites" / BUDGET_SUITE / f"{profile_name}-curve{suffix}"


def plan_curve(budgets: tuple[float, ...], profile_name: str, profile: RunProfile, recipe: str, outputs: Path,
               seeds: int | None, only: str | None, data: str | None, check_data: bool,
               evals: str | None) -> Plan:
    """The plan of the whole curve (its own table: <profile>-curve)."""
    descriptor = data_descriptor(profile, data, check=check_data)
    refused: dict[str, str] = {}
    grid = curve_runs(profile, recipe, budgets, parse_evals(evals), seed_count(profile, seeds), descriptor, refused)
    # a method refused here is an error when asked for by name, or, without --only, when the recipe
    # could run it (iBOT's paper recipe); under tuned, a method not tuned yet is left out, said once
    untuned = recipe == "tuned" and not only
    asked = set(only_words(only, sorted({run.spec.method for run in grid} | set(refused)))) if only else \
        set() if untuned else set(refused)
    for method, why in refused.items() if untuned else ():
        print(f"warning: {why.removeprefix('--recipe tuned: ')}; the curve leaves it out", file=sys.stderr)
    for method, why in refused.items():
        if any(word.split(":")[0].strip() == method for word in asked):
            others = ",".join(sorted({run.spec.method for run in grid}))
            raise ConfigError(f"--curve: {why}; leave it out (--only {others}) or pass --recipe shared")
    runs = keep_only(grid, only, BUDGET_SUITE) if only else grid
    check_decays(runs)
    return make_plan(BUDGET_SUITE, profile_name, profile, recipe, outputs, grid, runs,
                     suite_dir=curve_dir(outputs, profile_name, recipe))


def budget_warnings(allocation: Allocation, runs) -> list[str]:
    """What makes a budget too small to say much: E below the calibration's threshold, a cell
    that trains less than one step."""
    warnings = []
    if allocation.mae_epochs < compare_methods.SEPARATING_MAE_EPOCHS:
        warnings.append(f"WARNING: {allocation.mae_epochs:g} MAE-epochs is below the "
                        f"{compare_methods.SEPARATING_MAE_EPOCHS:g} at which nano MAE was measured to "
                        f"separate from random init in k-NN (docs/calibration.md); differences will likely sit within the seed spread "
                        f"(raise --budget)")
    for run in runs:
        if run.seed == 0 and run.config.train is not None and train_steps(run.config) < 1:
            per_epoch = num_images(run.config.data, "train") // run.config.train["batch_size"]
            warnings.append(f"WARNING: {run.spec.method} trains 0 steps at {run.config.train['epochs']:g} epochs "
                            f"({per_epoch} steps per epoch): its row is its random init (raise --budget)")
    return warnings


def print_budget_plan(plan: Plan, allocation: Allocation) -> None:
    """The allocation, each run with its estimated cost and state, the total against the budget."""
    per_run, prerequisites, total = plan_seconds(plan, allocation.calibration.flops_per_second)
    how = ("kept from the suite's index, solved by an earlier command; --recalibrate solves again"
           if allocation.kept else "solved for the hours" if allocation.budget.hours is not None else "given")
    print(f"budget {allocation.budget.describe()}: E = {allocation.mae_epochs:g} MAE-epochs of pre-training FLOPs "
          f"per method ({how})")
    print(f"this machine: {allocation.calibration.describe()}")
    configs = {run.spec.method: run.config for run in plan.grid if run.seed == 0}
    for method, epochs in allocation.epochs.items():
        print(f"  {method:6s} {epochs:6.2f} epochs x {format_flops(allocation.flops_per_image[method])} per image "
              f"= {format_flops(pretrain_flops(configs[method]))} per run ({train_steps(configs[method])} steps)")
    print(f"evaluations: {', '.join(allocation.evals)}; {allocation.seeds} seed(s)")
    for run in plan.runs:
        phases = per_run[run.name]
        seconds, pretrain = sum(phases.values()), phases.get("pre-train", 0.0)
        print(f"  {run.spec.method:6s} {run.spec.setting:34s} seed {run.seed}  ~{seconds / 60:6.1f} min "
              f"(pre-train {pretrain / 60:5.1f}, evals {(seconds - pretrain) / 60:4.1f})  {run.name}  "
              f"[{plan.state(run).label}]")
    for name, seconds in prerequisites.items():
        print(f"  prerequisite {name}  ~{seconds / 60:6.1f} min  [to run]")
    within = f" of the {allocation.budget.hours:g} h budget" if allocation.budget.hours is not None else ""
    print(f"estimated: {total / 3600:.2f} h left{within} for the whole suite ({len(plan.grid)} runs; finished "
          f"work counts 0)")
    for line in budget_warnings(allocation, plan.grid):
        print(line)
