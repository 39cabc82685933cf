"""Choose each method's constant trunk lr on held-out data: the lr `--recipe tuned` trains at.

    python -m suites.tune --profile cpu --dry-run                # the tuning runs and their state
    python -m suites.tune --profile cpu --only mae               # tune MAE (resumable, like a suite)
    python -m suites.tune --profile cpu --show                   # the choices and every score

For each method: its budget-curve cells (warm-up / stable / decay, runs.curve) at 0.5 and 1
MAE-epochs of FLOPs (0.5 trained for its trunk checkpoint, not evaluated), seed 0, at blr 0.5x, 1x, 2x and 4x the profile's (cpu: 1e-3 per 256),
evaluated by `knn_holdout` (k-NN with train's fit part as memory and its held-out 5k as queries:
the test split is never read). The criterion is mean-pooled held-out k-NN at the largest budget
(CRITERION). A best lr at an edge of the grid extends the grid by a factor of 2 past that edge and
runs again, up to MAX_EXTENSIONS times; a choice still at an edge is kept and says so.

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

from core.config import ConfigError, UnknownNameError
from core.files import write_json
from engine.data import DataError
from methods.registry import pretraining_methods
from runs.execute import RunOptions
from runs.identity import Run, data_descriptor
from runs.plan import make_plan, run_plan
from runs.records import read_result
from suites import compare_methods
from suites.budget import curve_warmup_steps, method_flops
from suites.plan import only_words, resolve_runs
from suites.profiles import PROFILES, TUNED_DIR, get_profile, tuned_file
from suites.show import print_plan

BUDGETS = (0.5, 1.0)            # MAE-epochs of FLOPs; the criterion is read at the largest
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


def tuning_runs(method: str, lrs: list[float], profile, descriptor: dict) -> list[Run]:
    """`method`'s curve cells at BUDGETS, seed 0, one per lr, evaluated on the held-out split."""
    flops = method_flops(profile, RECIPE)
    specs = [spec for spec in compare_methods.curve_grid(profile, flops, BUDGETS,
                                                         curve_warmup_steps(profile, descriptor), (EVALUATION,))
             if spec.method == method]
    # the smaller budgets are trained (their decay only) so that the trunk keeps a checkpoint where
    # the curve's seed 0 branches off it, and evaluated by the curve itself
    tuned = [dataclasses.replace(spec, setting=f"{spec.setting} blr {lr:g}", train={**spec.train, "blr": lr},
                                 evals=spec.evals if spec.budget == max(BUDGETS) else ())
             for lr in lrs for spec in specs]
    return resolve_runs(tuned, profile, 1, descriptor, RECIPE, inits=False)


def criterion_scores(runs: list[Run], outputs: Path) -> dict[float, float | None]:
    """Each lr's CRITERION at the largest budget (None: not measured yet)."""
    scores = {}
    for run in runs:
        if run.spec.budget != max(BUDGETS):
            continue
        record = read_result(run.config.folder(outputs))
        entry = record.evals.get(EVALUATION) if record is not None else None
        scores[run.config.train["blr"]] = entry.metrics.get(CRITERION) if entry is not None else None
    return scores


def tune_method(method: str, profile, profile_name: str, descriptor: dict, outputs: Path, options: RunOptions,
                dry_run: bool) -> dict | None:
    """Run (or, with dry_run, print) the method's tuning grid, extending it at an edge; its entry."""
    lrs = grid_lrs(profile.train.blr)
    extensions = 0
    while True:
        runs = tuning_runs(method, lrs, profile, descriptor)
        plan = make_plan("tune", profile_name, profile, RECIPE, outputs, runs, suite_dir=outputs / "suites" / "tune"
                         / profile_name)
        if dry_run:
            print_plan(plan)
        else:
            outcome = run_plan(plan, options)
            if outcome.failed or outcome.skipped:
                raise TuningIncomplete(f"{method}: {len(outcome.failed)} failed, {len(outcome.skipped)} busy "
                                       f"elsewhere; run the command again once they are done")
        scores = criterion_scores(runs, outputs)
        if any(score is None for score in scores.values()):
            return None
        wider = extend(lrs, scores)
        if wider is None or extensions == MAX_EXTENSIONS:
            break
        print(f"{method}: best held-out k-NN at the edge lr {choose(scores):g}; extending the grid to "
              f"{', '.join(f'{lr:g}' for lr in wider)}")
        lrs, extensions = wider, extensions + 1
    best = choose(scores)
    return {"blr": best, "criterion": CRITERION, "evaluation": EVALUATION, "budgets_mae_epochs": list(BUDGETS),
            "seed": 0, "grid": lrs, "scores": {f"{lr:g}": scores[lr] for lr in lrs},
            "runs": {f"{lr:g}": run.name for run in runs if run.spec.budget == max(BUDGETS)
                     for lr in [run.config.train["blr"]]},
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
    try:
        return main(argv)
    except (UnknownNameError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
