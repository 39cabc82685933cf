"""Choose each method's constant trunk lr on held-out data: the lr `--recipe tuned` trains at.

    python -m suites.tune --profile cpu --dry-run                # the tuning runs and their state
    python -m suites.tune --profile cpu --only mae               # tune MAE (resumable, like a suite)
    python -m suites.tune --profile cpu --show                   # the choices and every score

For each method: its budget-curve cells (warm-up / stable / decay, runs.curve) at 1 MAE-epoch of
FLOPs (0.5 trained too, for its trunk checkpoint, not evaluated), seed 0, at blr 0.5x, 1x, 2x and
4x the profile's (cpu: 1e-3 per 256), evaluated by `knn_holdout` (k-NN with train's fit part as
memory and its held-out 5k as queries: the test split is never read), beside the method's own
untrained init. The criterion is mean-pooled held-out k-NN (CRITERION). When no lr beats the
init, training only loses at that budget and the lr that moves least would win: the grid runs
again one rung of LADDER up (2.5, then 5 MAE-epochs). A best lr at an edge of the grid extends the
grid by a factor of 2 past that edge and runs again, up to MAX_EXTENSIONS times; a choice still at
an edge, or that never beats the init, is kept and says so.

The choices, the grid and every score go to `results/tuned/<profile>.json` (committed: the runs
of `--recipe tuned` are named by the lr it holds), which `suites.profiles.get_profile` reads into
`Profile.tuning`; every `tuned` run's record carries its method's entry. The tuning runs are the
curve's seed-0 cells at these budgets and lrs: at the chosen lr they are the curve's own runs
(same names), and their trunk is the one the curve's seed 0 grows on.

Exit codes: 0 every method tuned (or, with --dry-run / --show, printed); 1 a tuning run failed;
2 bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from core.config import ConfigError
from core.files import write_json
from methods.registry import pretraining_methods
from runs.execute import RunOptions
from runs.identity import Run, RunSpec, data_descriptor, init_config
from runs.plan import make_plan, run_plan
from runs.records import read_result
from suites import compare_methods
from suites.budget import curve_warmup_steps, method_flops
from suites.plan import only_words, resolve_runs
from suites.profiles import PROFILES, TUNED_DIR, get_profile, tuned_file
from suites.run import cli as run_cli
from suites.show import print_plan

CURVE_BUDGETS = (0.5, 1.0, 2.5, 5.0)    # MAE-epochs of FLOPs: the curve's; trained up to the criterion's
LADDER = (1.0, 2.5, 5.0)    # the criterion's budget: the first at which some lr beats the method's own init
FACTORS = (0.5, 1.0, 2.0, 4.0)  # of the profile's blr
MAX_EXTENSIONS = 3              # factors of 2 past an edge before a choice at the edge is kept
CRITERION = "holdout_knn_top1_mean"
EVALUATION = "knn_holdout"
RECIPE = "tuned"


def grid_lrs(base: float) -> list[float]:
    return sorted({round(base * factor, 10) for factor in FACTORS})


def extend(lrs: list[float], scores: dict[float, float]) -> list[float] | None:
    """The grid with one more lr past the edge the best score sits at (None: the best is inside)."""
    best = choose(scores)
    if best == lrs[0]:
        return [round(lrs[0] / 2, 10), *lrs]
    if best == lrs[-1]:
        return [*lrs, round(lrs[-1] * 2, 10)]
    return None


def choose(scores: dict[float, float]) -> float:
    """The lr of the best held-out score (ties: the smaller lr)."""
    return max(sorted(scores), key=lambda lr: scores[lr])


def tuning_runs(method: str, lrs: list[float], profile, descriptor: dict, budget: float) -> list[Run]:
    """`method`'s curve cells up to `budget`, seed 0, one per lr; those at `budget` evaluated on
    the held-out split, then the method's untrained init (`none` at its architecture, seed 0)."""
    flops = method_flops(profile, RECIPE)
    budgets = tuple(b for b in CURVE_BUDGETS if b <= budget)
    specs = [spec for spec in compare_methods.curve_grid(profile, flops, budgets,
                                                         curve_warmup_steps(profile, descriptor), (EVALUATION,))
             if spec.method == method]
    # the smaller budgets are trained (their decay only) so that the trunk keeps a checkpoint where
    # the curve's seed 0 branches off it, and evaluated by the curve itself
    tuned = [dataclasses.replace(spec, setting=f"{spec.setting} blr {lr:g}", train={**spec.train, "blr": lr},
                                 evals=spec.evals if spec.budget == budget else ())
             for lr in lrs for spec in specs]
    runs = resolve_runs(tuned, profile, 1, descriptor, RECIPE, inits=False)
    init = init_config(runs[0].config, profile)
    return runs + [Run(RunSpec("none", "own init", evals=(EVALUATION,)), 0, init)]


def score_of(run: Run, outputs: Path) -> float | None:
    record = read_result(run.config.folder(outputs))
    entry = record.evals.get(EVALUATION) if record is not None else None
    return entry.metrics.get(CRITERION) if entry is not None else None


def criterion_scores(runs: list[Run], outputs: Path, budget: float) -> tuple[dict[float, float | None], float | None]:
    """Each lr's CRITERION at `budget`, and the init's (None: not measured yet)."""
    scores = {run.config.train["blr"]: score_of(run, outputs) for run in runs
              if run.config.train is not None and run.spec.budget == budget}
    [init] = [run for run in runs if run.config.train is None]
    return scores, score_of(init, outputs)


def tune_method(method: str, profile, profile_name: str, descriptor: dict, outputs: Path, options: RunOptions,
                dry_run: bool) -> dict | None:
    """Run (or, with dry_run, print) the method's tuning grid, extending it at an edge, one rung of
    LADDER up when no lr beats the method's own init; its entry (None: runs still to do)."""
    rungs = {}
    for budget in LADDER:
        lrs, extensions = grid_lrs(profile.train.blr), 0
        while True:
            runs = tuning_runs(method, lrs, profile, descriptor, budget)
            plan = make_plan("tune", profile_name, profile, RECIPE, outputs, runs,
                             suite_dir=outputs / "suites" / "tune" / profile_name)
            if dry_run:
                print_plan(plan)
            else:
                outcome = run_plan(plan, options)
                if outcome.failed or outcome.skipped:
                    raise TuningIncomplete(f"{method}: {len(outcome.failed)} failed, {len(outcome.skipped)} busy "
                                           f"elsewhere; run the command again once they are done")
            scores, init = criterion_scores(runs, outputs, budget)
            if init is None or any(score is None for score in scores.values()):
                return None
            if scores[choose(scores)] <= init:
                break           # training only loses to the init here: the lr that moves least would win
            wider = extend(lrs, scores)
            if wider is None or extensions == MAX_EXTENSIONS:
                break
            print(f"{method}: best held-out k-NN at the edge lr {choose(scores):g}; extending the grid to "
                  f"{', '.join(f'{lr:g}' for lr in wider)}")
            lrs, extensions = wider, extensions + 1
        rungs[f"{budget:g}"] = {"init": init, "scores": {f"{lr:g}": scores[lr] for lr in lrs}}
        best = choose(scores)
        if scores[best] > init:
            break
        if budget != LADDER[-1]:
            print(f"{method}: no lr beats its own init ({init:.2f}) on held-out data at {budget:g} MAE-epochs "
                  f"(best {scores[best]:.2f}); tuning at the next budget")
    return {"blr": best, "criterion": CRITERION, "evaluation": EVALUATION,
            "budgets_mae_epochs": [b for b in CURVE_BUDGETS if b <= budget], "criterion_budget": budget,
            "seed": 0, "grid": lrs, "scores": {f"{lr:g}": scores[lr] for lr in lrs}, "init_score": init,
            "beats_init": scores[best] > init, "rungs": rungs,
            "runs": {f"{run.config.train['blr']:g}": run.name for run in runs
                     if run.config.train is not None and run.spec.budget == budget},
            "bracketed": best not in (lrs[0], lrs[-1]), "extensions": extensions}


class TuningIncomplete(Exception):
    """Some tuning run failed or was busy in another process."""


def save_choice(profile_name: str, method: str, entry: dict) -> Path:
    """Add (or replace) `method`'s entry of results/tuned/<profile>.json."""
    path = tuned_file(profile_name)
    choices = json.loads(path.read_text()) if path.exists() else {}
    choices[method] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, dict(sorted(choices.items())))
    return path


def show(profile_name: str) -> None:
    tuning = get_profile(profile_name).tuning
    if not tuning:
        print(f"no tuned lrs at profile {profile_name} ({tuned_file(profile_name)} is missing)")
    for method, entry in tuning.items():
        scores = ", ".join(f"{lr}: {score:.2f}" if score is not None else f"{lr}: -"
                           for lr, score in entry["scores"].items())
        edge = "" if entry["bracketed"] else " (at the grid's edge)"
        print(f"{method:6s} blr {entry['blr']:g}{edge}   {entry['criterion']} at "
              f"{max(entry['budgets_mae_epochs']):g} MAE-epochs, seed {entry['seed']}: {scores}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m suites.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu", help=f"one of: {', '.join(PROFILES)} (default cpu)")
    parser.add_argument("--only", default=None, help="comma-separated methods (default: every pre-training method)")
    parser.add_argument("--outputs", default="outputs", help="where run folders go (default outputs/)")
    parser.add_argument("--dry-run", action="store_true", help="print the tuning runs and their state, run nothing")
    parser.add_argument("--show", action="store_true", help=f"print the choices in {TUNED_DIR}/<profile>.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.show:
        show(args.profile)
        return 0
    profile = get_profile(args.profile)
    methods = pretraining_methods()
    chosen = only_words(args.only, methods) if args.only else methods
    for method in chosen:
        if method not in methods:
            raise ConfigError(f"--only {method}: not a method that pre-trains an encoder; pick from "
                              f"{', '.join(methods)}")
    descriptor = data_descriptor(profile, None)
    options = RunOptions(device=args.device, progress=not args.no_progress)
    outputs = Path(args.outputs)
    for method in chosen:
        try:
            entry = tune_method(method, profile, args.profile, descriptor, outputs, options, args.dry_run)
        except TuningIncomplete as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if entry is None:
            print(f"{method}: not tuned yet (runs to do)")
            continue
        path = save_choice(args.profile, method, entry) if not args.dry_run else None
        where = "inside the grid" if entry["bracketed"] else "AT THE GRID'S EDGE"
        score = entry["scores"][f"{entry['blr']:g}"]
        print(f"{method}: blr {entry['blr']:g} ({where}; held-out mean k-NN {score:.2f})"
              + (f" -> {path}" if path else ""))
    return 0


def cli(argv=None) -> int:
    return run_cli(argv, main)      # bad input: one line, exit code 2, as suites.run


if __name__ == "__main__":
    sys.exit(cli())
