"""Run records -> tables with mean and 95% confidence interval over seeds.

Records are read through `runs.records` (the one schema; stdlib only). A record that does not
parse or validate is named in a one-line warning and its run shown as `unreadable`; the rest
of the table is built.

A cell is (method, setting, recipe): two cells that differ only by the recipe they pre-trained
with (`paper`, the method's paper recipe, or `shared`, the one recipe all methods share) are
two rows. The `none` baseline does not pre-train: its recipe is `—`.

A paired difference subtracts, seed by seed, each run's own init: the untrained encoder of its
architecture and seed, the run its index entry's `init_run` names (`Pairing`); an index from
before `init_run` pairs every run with the `none` run of its seed. A difference is starred only
after a Holm correction over the family its table tests (`holm`). A run whose index entry has a
`collapsed` reason makes its cell collapsed: labelled everywhere, never starred or ranked.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
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

# The metric verdicts and rankings read first. Mean-pooled k-NN: the [CLS] token gets no loss in MAE,
# pixel or BEiT, and its k-NN swings up to 7 points between seeds.
PRIMARY_METRIC = "knn_top1_mean"
ALPHA = 0.05                            # the family-wise error rate of a table's stars (Holm)

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
               # runs.index's optional columns; an index from before them: nobody collapsed, no init named
               "collapsed": entry_text(entry.get("collapsed")), "init_run": entry_text(entry.get("init_run")),
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


def entry_text(value) -> str:
    """An optional text of an index entry (`collapsed`'s reason, `init_run`): "" when it is missing,
    None or NaN; a bare `true` reads as a reason not given."""
    if isinstance(value, str):
        return value.strip()
    if value is None or value is False or (isinstance(value, float) and math.isnan(value)):
        return ""
    return "collapsed (no reason given)" if value is True else str(value)


def text_column(runs: pd.DataFrame, column: str) -> pd.Series:
    """A text column of `load_index`'s table, "" where empty (a table built without it: all "")."""
    if column not in runs:
        return pd.Series("", index=runs.index, dtype=object)
    return runs[column].map(entry_text)


def collapse_note(cell: pd.DataFrame) -> str:
    """Why a cell is collapsed, from its runs' `collapsed` reasons ("seed 1: teacher entropy 0.02 of
    ln K"; "seeds 0, 1: ..." for a reason shared); "" when no run of it collapsed."""
    reasons = text_column(cell, "collapsed")
    seeds: dict[str, list[str]] = {}
    for seed, reason in zip(cell["seed"], reasons):
        if reason:
            seeds.setdefault(reason, []).append(str(seed))
    return "; ".join(f"seed{'s' if len(s) > 1 else ''} {', '.join(s)}: {reason}" for reason, s in seeds.items())


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
    """Mean ± 95% CI per cell (method, setting, recipe); failed / missing runs counted, not dropped;
    a `collapsed` column with each collapsed cell's reason when some cell collapsed."""
    out = []
    for (method, setting, recipe), group in runs.groupby(CELL, sort=False):
        done = group[group["status"] == "done"]
        row = {"method": method, "setting": setting, "recipe": recipe, "seeds done": len(done),
               "failed": int((group["status"] == "failed").sum()),
               "missing": int((~group["status"].isin(["done", "failed"])).sum())}   # or unfinished, unreadable
        for metric in metrics:
            values = cell_values(group, metric)
            row[metric] = format_ci(*ci95(values), n=len(values), of=len(done))
        out.append(with_collapse(row, group, runs))
    return pd.DataFrame(out)


def with_collapse(row: dict, cell: pd.DataFrame, runs: pd.DataFrame) -> dict:
    """The row of a cell's table with its `collapsed` note, when some run of the suite collapsed."""
    if text_column(runs, "collapsed").eq("").all():
        return row
    return {**row, "collapsed": collapse_note(cell)}


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


def reference_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of the reference `none` cell (random init, the grid's first `none` cell): what an
    index from before `init_run` pairs every run with, and the band a plot draws as random init."""
    none = runs[runs["method"] == BASELINE]
    return none[none["setting"] == none["setting"].iloc[0]] if len(none) else none


def is_init(runs: pd.DataFrame) -> pd.Series:
    """The runs that are an init, not a pre-trained cell: `none`'s, and any run that names itself
    its own init."""
    return (runs["method"] == BASELINE) | (text_column(runs, "init_run") == runs["run"])


@dataclass(frozen=True)
class Pairing:
    """Which finished run a run's paired difference subtracts: the run its `init_run` names (its own
    init: the untrained encoder of its architecture and seed), else, in an index from before
    `init_run`, the reference `none` run of its seed (`reference_runs`)."""
    inits: pd.DataFrame         # the finished runs, by run-folder name
    reference: pd.DataFrame     # the reference `none` cell's finished runs, by seed
    own_init: bool              # some run names its init: the tables call the baseline "own init"

    @property
    def label(self) -> str:
        return "own init" if self.own_init else "random init"

    def partner(self, run: pd.Series) -> pd.Series | None:
        name = entry_text(run.get("init_run"))
        table, key = (self.inits, name) if name else (self.reference, run["seed"])
        return table.loc[key] if key in table.index else None


def pairing_of(runs: pd.DataFrame) -> Pairing:
    done = runs[runs["status"] == "done"].drop_duplicates("run")
    reference = reference_runs(done).drop_duplicates("seed").set_index("seed")
    return Pairing(done.set_index("run"), reference, bool(text_column(runs, "init_run").ne("").any()))


def paired_diffs(cell: pd.DataFrame, pairing: Pairing, metric: str) -> list[float]:
    """(run - its init) for each finished run of the cell whose init (`Pairing.partner`) has the
    metric: a student's metric pairs with its init's plain one (`BASELINE_METRIC`)."""
    diffs = []
    for _, run in cell[cell["status"] == "done"].iterrows():
        init = pairing.partner(run)
        if init is None or pd.isna(run.get(metric)):
            continue
        base = init.get(metric)
        base = init.get(BASELINE_METRIC.get(metric, metric)) if pd.isna(base) else base
        if pd.notna(base):
            diffs.append(run[metric] - base)
    return diffs


def paired_p_value(diffs) -> float:
    """The two-sided p-value of a paired t-test over seeds (a one-sample t-test of the differences
    against 0, as scipy's ttest_rel); NaN below two pairs. It is below 0.05 exactly when the 95%
    interval of `ci95` leaves 0 out."""
    diffs = np.asarray(diffs, dtype=float)
    if len(diffs) < 2:
        return float("nan")
    spread = diffs.std(ddof=1)
    if spread == 0:                     # every seed moved by the same amount
        return 1.0 if diffs.mean() == 0 else 0.0
    t = diffs.mean() / (spread / np.sqrt(len(diffs)))
    return float(2 * stats.t.sf(abs(t), len(diffs) - 1))


def holm(p_values, alpha: float = ALPHA) -> list[bool]:
    """Which hypotheses of a family Holm's step-down procedure rejects at family-wise error `alpha`:
    the smallest p is held to alpha / m, the next to alpha / (m - 1), and so on, stopping at the
    first that fails. A NaN p (no test: one seed, a collapsed cell) is outside the family and never
    rejected; m counts the others."""
    p_values = [float(p) for p in p_values]
    family = sorted((i for i, p in enumerate(p_values) if not math.isnan(p)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(family):
        if p_values[i] > alpha / (len(family) - rank):
            break
        rejected[i] = True
    return rejected


def family_size(p_values) -> int:
    """How many tests a family holds: the p-values that are not NaN."""
    return sum(not math.isnan(float(p)) for p in p_values)


def cell_values(cell: pd.DataFrame, metric: str) -> list[float]:
    """The metric of the cell's finished runs that have it."""
    return cell.loc[cell["status"] == "done", metric].dropna().tolist() if metric in cell else []


def detectable_differences(runs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per cell and metric, the smallest difference its seeds can detect: the half-width of the
    cell's 95% t-interval (column `metric`) and of its paired difference to its own init
    (`Δ metric`, when the suite has a baseline; `–` for an init itself). `n/a (1 seed)` where one
    seed gives no interval."""
    pairing = pairing_of(runs)
    paired = bool(is_init(runs).any())
    inits = set(runs.loc[is_init(runs), "run"])
    out = []
    for (method, setting, recipe), cell in runs.groupby(CELL, sort=False):
        row = {"method": method, "setting": setting, "recipe": recipe,
               "seeds done": int((cell["status"] == "done").sum())}
        for metric in metrics:
            values = cell_values(cell, metric)
            row[metric] = half_width_text(ci95(values)[1], len(values))
            if paired:
                diffs = [] if set(cell["run"]) <= inits else paired_diffs(cell, pairing, metric)
                row[f"Δ {metric}"] = half_width_text(ci95(diffs)[1], len(diffs))
        out.append(with_collapse(row, cell, runs))
    return pd.DataFrame(out)
