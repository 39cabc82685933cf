"""Run records -> tables with mean and 95% confidence interval over seeds.

Records are read through `runs.records` (the one schema; stdlib only). A record that does not
parse or validate is named in a one-line warning and its run shown as `unreadable`; the rest
of the table is built.

A cell is (method, setting, recipe): two cells that differ only by the recipe they pre-trained
with (`paper`, the method's paper recipe, or `shared`, the one recipe all methods share) are
two rows. The `none` baseline does not pre-train: its recipe is `—`, and it is the baseline of
every recipe's cells.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from core.files import read_json
from runs.index import RUNS_FROM_INDEX, read_index  # noqa: F401  (reports.build reads them here)
from runs.records import RecordError, RunRecord, read_record, record_path


# the metrics a table shows, in this order, when runs have them (iBOT's k-NN of the student
# encoder beside the default, its teacher's)
PROTOCOLS = ["knn_top1_cls", "knn_top1_mean", "knn_student_top1_cls", "knn_student_top1_mean",
             "linear_top1_cls", "linear_top1_mean", "finetune_top1", "seg_miou"]

BASELINE = "none"                       # the method that does not pre-train: random init
SHARED_RECIPE = "shared"                # a run whose config.json names no recipe
NO_RECIPE = "—"                         # the baseline's: it does not pre-train
CELL = ["method", "setting", "recipe"]  # what a table row averages seeds over
# evaluations whose recipe (layer decay) the baseline may not share with pre-trained encoders
LAYER_DECAY_EVALS = ("finetune", "segmentation")


def metric_columns(runs: pd.DataFrame) -> list[str]:
    return [m for m in PROTOCOLS if m in runs.columns and runs[m].notna().any()]


def ci95(values) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval of the mean (NaN half-width for a single value)."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) == 1:
        return float(values[0]), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


def half_width_text(half: float, n: int) -> str:
    """A 95% CI's half-width as the tables print it: `n/a (1 seed)` for a single value, `–`
    for none."""
    if n == 0:
        return "–"
    return "n/a (1 seed)" if n == 1 else f"{half:.2f}"


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_index(index_file: Path, index: dict | None = None) -> pd.DataFrame:
    """One row per run of a suite: the index entries joined with each run's record (`index`:
    the parsed runs.json, read here when not given)."""
    index = read_index(index_file) if index is None else index
    rows = []
    for entry in index["runs"]:
        # normalised, so that a warning names outputs/runs/NAME, not outputs/suites/S/P/../../../runs/NAME
        run_dir = Path(os.path.normpath(Path(index_file).parent / entry["run_dir"]))
        row = {"method": entry["method"], "setting": entry["setting"], "recipe": recipe_of(entry, run_dir),
               "seed": entry["seed"], "run": Path(entry["run_dir"]).name, "missing evaluations": "", "problem": "",
               # pre-training has logged steps but not finished (running now, or stopped)
               "status": "unfinished" if (run_dir / "metrics.jsonl").exists() else "missing"}
        try:
            record = read_record(run_dir)
        except RecordError as err:
            warn(f"{err}; shown as unreadable")
            record = None
            row.update(status="unreadable", problem=str(err).removeprefix(f"{record_path(run_dir)}: "))
        if record is not None:
            row["status"] = record.status
            row["problem"] = record.error or ""
            prov = record.provenance
            row["machine"] = f"{prov.get('device', '?')}, {prov.get('cpu_count', '?')} cores, torch {prov.get('torch', '?')}"
            row.update(suite_metrics(record, entry.get("evals")))
            for name in LAYER_DECAY_EVALS:
                if name in record.evals:
                    row[f"{name} layer_decay"] = record.evals[name].config.get("layer_decay")
            if "finetune" in record.evals:    # its lr chosen on held-out train (eval.finetune)
                row["finetune blr_sweep"] = bool(record.evals["finetune"].config.get("blr_sweep"))
            if record.done:   # a run shared with a suite that asked for fewer evaluations
                row["missing evaluations"] = ", ".join(e for e in entry.get("evals", []) if e not in record.evals)
                if record.failed_evaluation is not None:
                    error = record.failed_evaluation.get("error", "no message")
                    row["missing evaluations"] += f" (last failure: {error})"
        rows.append(row)
    return pd.DataFrame(rows)


def recipe_of(entry: dict, run_dir: Path) -> str:
    """The recipe a run pre-trained with: its config.json's `recipe`, else its index entry's,
    else `shared` (every run from before recipes existed); `—` for a run that does not
    pre-train (the baseline; `"train": null`). A config.json that cannot be read is named in a
    warning and the index entry used."""
    config = {}
    try:
        config = read_json(run_dir / "config.json")
    except FileNotFoundError:
        pass                    # not started yet: the index says what it will be
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        warn(f"{run_dir / 'config.json'}: cannot be read ({err.__class__.__name__}); its recipe taken from the index")
    config = config if isinstance(config, dict) else {}
    if entry["method"] == BASELINE or ("train" in config and config["train"] is None):
        return NO_RECIPE
    return str(config.get("recipe") or entry.get("recipe") or SHARED_RECIPE)


def suite_metrics(record: RunRecord, evals: list[str] | None) -> dict:
    """The run's metrics from the evaluations this suite asked for (a run folder shared with
    another suite may hold more), plus its pre-training figures; all of them if not recorded."""
    if evals is None:
        return dict(record.metrics)
    kept = {k: v for k, v in record.metrics.items() if k.startswith("pretrain_")}
    for name in evals:
        if name in record.evals:
            kept.update(record.evals[name].metrics)
    return kept


def summarize(runs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Mean ± 95% CI per cell (method, setting, recipe); failed / missing runs counted, not dropped."""
    out = []
    for (method, setting, recipe), group in runs.groupby(CELL, sort=False):
        done = group[group["status"] == "done"]
        row = {"method": method, "setting": setting, "recipe": recipe, "seeds done": len(done),
               "failed": int((group["status"] == "failed").sum()),
               "missing": int((~group["status"].isin(["done", "failed"])).sum())}   # or unfinished, unreadable
        for metric in metrics:
            values = cell_values(group, metric)
            row[metric] = format_ci(*ci95(values), n=len(values), of=len(done))
        out.append(row)
    return pd.DataFrame(out)


def format_ci(mean: float, half: float, n: int = 0, of: int = 0, signed: bool = False) -> str:
    """'mean ± half' ('+mean ± half' when `signed`: a difference); '(n of m seeds)' when only n of
    the cell's m finished runs have the metric."""
    if np.isnan(mean):
        return "–"
    value = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    text = value if np.isnan(half) else f"{value} ± {half:.2f}"
    return text + (f" ({n} of {of} seeds)" if 0 < n < of else "")


# a metric the baseline cannot have, paired with the one it has: the random-init encoder is a
# single encoder, so its k-NN is the baseline of a student's k-NN as of a teacher's
BASELINE_METRIC = {"knn_student_top1_cls": "knn_top1_cls", "knn_student_top1_mean": "knn_top1_mean"}


def finished_baseline(runs: pd.DataFrame) -> pd.DataFrame:
    """The baseline's finished runs, by seed (the paired differences' other side)."""
    done = runs[runs["status"] == "done"]
    return done[done["method"] == BASELINE].set_index("seed")


def paired_diffs(cell: pd.DataFrame, baseline: pd.DataFrame, metric: str) -> list[float]:
    """(run - baseline run of the same seed) for each finished run of the cell whose seed the
    baseline (`finished_baseline`) has the metric for."""
    has_own = metric in baseline and baseline[metric].notna().any()
    base_metric = metric if has_own else BASELINE_METRIC.get(metric, metric)
    if base_metric not in baseline or metric not in cell:
        return []
    pairs = [(r[metric], baseline.loc[r["seed"], base_metric])
             for _, r in cell[cell["status"] == "done"].iterrows() if r["seed"] in baseline.index]
    return [value - base for value, base in pairs if pd.notna(value) and pd.notna(base)]


def cell_values(cell: pd.DataFrame, metric: str) -> list[float]:
    """The metric of the cell's finished runs that have it."""
    return cell.loc[cell["status"] == "done", metric].dropna().tolist() if metric in cell else []


def detectable_differences(runs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per cell and metric, the smallest difference its seeds can detect: the half-width of the
    cell's 95% t-interval (column `metric`) and of its paired difference to the baseline's
    (`Δ metric`, when the suite has a baseline; `–` for the baseline itself). `n/a (1 seed)`
    where one seed gives no interval."""
    baseline = finished_baseline(runs)
    paired = bool((runs["method"] == BASELINE).any())
    out = []
    for (method, setting, recipe), cell in runs.groupby(CELL, sort=False):
        row = {"method": method, "setting": setting, "recipe": recipe,
               "seeds done": int((cell["status"] == "done").sum())}
        for metric in metrics:
            values = cell_values(cell, metric)
            row[metric] = half_width_text(ci95(values)[1], len(values))
            if paired:
                diffs = [] if method == BASELINE else paired_diffs(cell, baseline, metric)
                row[f"Δ {metric}"] = half_width_text(ci95(diffs)[1], len(diffs))
        out.append(row)
    return pd.DataFrame(out)
