"""Writing a suite's index (`runs.index` reads it) from a plan: every run of the grid with its
settings, recipe, evaluations, the run of its own initialisation it pairs with (`init_run`) and,
once finished, its collapse verdict (`collapsed`).

    write_index(plan, budget=None)      # after planning and after running: the whole grid, whatever --only ran
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from core.files import read_json, write_json
from runs.collapse import collapse_verdict
from runs.identity import init_config
from runs.index import INDEX_FILE, RUNS_FROM_INDEX, entry_recipe, flatten, read_index, recipe_free
from runs.records import RecordError, UnreadableRecord, read_result

if TYPE_CHECKING:
    from runs.plan import Plan


def write_index(plan: Plan, budget: dict | None = None, suite_dir: Path | None = None, ran: bool = False) -> None:
    """runs.json: the plan's grid with its settings and recipe, as the table reads them (and a
    --budget's allocation). Finished runs of the same cells at other seeds, listed by an
    earlier command (e.g. `--seeds 3` before `--seeds 2`), stay listed: a table never loses a
    finished seed to a smaller --seeds; so do finished runs of the same cells at the other recipe."""
    suite_dir = suite_dir or plan.suite_dir
    suite_dir.mkdir(parents=True, exist_ok=True)
    runs = plan.grid
    entries = [entry(run, plan, ran) for run in runs]
    kept, dropped = earlier_finished_runs(suite_dir, runs)
    if kept:
        print(f"runs.json also lists {len(kept)} finished run(s) of other seeds or the other recipe from earlier "
              f"commands")
    if dropped:
        print(f"runs.json no longer lists {dropped} finished run(s) of an earlier command (another "
              f"--data or grid); their folders stay in {plan.outputs}/runs")
    order = {(run.spec.method, recipe_free(run.spec.setting)): i for i, run in enumerate(runs)}
    entries = sorted(entries + kept, key=lambda e: (order[(e["method"], recipe_free(e["setting"]))],
                                                    entry_recipe(e), e["seed"]))
    index = {"suite": plan.suite, "profile": plan.profile_name, "runs": entries}
    if budget is not None:
        index["budget"] = budget
    write_json(suite_dir / INDEX_FILE, index)


def entry(run, plan: Plan | None = None, ran: bool = False) -> dict:
    """A run's index entry; a curve's cell also names its budget (MAE-epochs of FLOPs). With the
    plan: `init_run`, the run of its own initialisation it pairs with (runs.identity.init_config),
    and, once it finished, `collapsed` (its method's collapse monitor: a reason, or None), from the
    record the plan read (`ran`: after the plan ran, a run it found unfinished is read again)."""
    out = {"method": run.spec.method, "setting": run.spec.setting, "recipe": run.config.recipe,
           "seed": run.seed, "params": flatten(run.spec.overrides), "evals": list(run.spec.evals),
           "run_dir": str(RUNS_FROM_INDEX / run.name)}
    if getattr(run.spec, "budget", None) is not None:
        out["mae_epochs"] = run.spec.budget
    if plan is not None:
        out["init_run"] = init_config(run.config, plan.profile).name
        run_dir = run.config.folder(plan.outputs)
        record = plan.state(run).record
        if ran and not plan.state(run).done and run in plan.runs:      # it ran here
            try:
                record = read_result(run_dir)
            except UnreadableRecord:
                record = None
        if record is not None and record.done:
            out["collapsed"] = collapse_verdict(run_dir, run.config, record)["collapsed"]
    return out


def unseeded(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True)


def earlier_finished_runs(suite_dir: Path, runs) -> tuple[list[dict], int]:
    """Entries of the existing runs.json to keep (finished, same cell and config but another
    seed; or same cell and data at the other recipe) and how many finished ones are dropped
    (another config, e.g. other --data)."""
    index_file = suite_dir / INDEX_FILE
    if not index_file.exists():
        return [], 0
    cells = {(run.spec.method, run.spec.setting, run.config.recipe): unseeded(run.config.to_dict()) for run in runs}
    # the other recipe's run of a cell: the same method and setting but for the epochs a
    # FLOPs-matched label ends with, "(0.25 ep)" under one recipe, "(0.21 ep)" under the other
    data = {(run.spec.method, recipe_free(run.spec.setting)): run.config.to_dict()["data"] for run in runs}
    listed = {(run.spec.method, run.spec.setting, run.config.recipe, run.seed) for run in runs}
    try:
        earlier = read_index(index_file)["runs"]
    except RecordError as err:
        print(f"warning: {err}; it is written anew from this grid (the run folders stay in outputs/runs)",
              file=sys.stderr)
        return [], 0
    kept, dropped = [], 0
    for entry in earlier:
        cell = (entry["method"], entry["setting"], entry_recipe(entry))
        if (*cell, entry["seed"]) in listed:
            continue
        config = finished_config(suite_dir / entry["run_dir"])
        if config is None:
            continue
        if cell in cells:
            same = cells[cell] == unseeded(config)
        else:      # the other recipe's run of a cell of this grid, on the same data
            same = data.get((cell[0], recipe_free(cell[1]))) == config.get("data")
        if same:
            kept.append(entry)
        else:
            dropped += 1
    return kept, dropped


def finished_config(run_dir: Path) -> dict | None:
    """A listed run's config.json when the run finished (None otherwise, or when its record is
    damaged: not listed; the run's own cell names it)."""
    try:
        record = read_result(run_dir)
    except UnreadableRecord:
        return None
    if record is None or not record.done or not (run_dir / "config.json").exists():
        return None
    return read_json(run_dir / "config.json")
