"""Run records -> tables with mean and 95% confidence interval over seeds.

Records are read through `runs.records` (the one schema; stdlib only). A record that does not
parse or validate is named in a one-line warning and its run shown as `unreadable`; the rest
of the table is built.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from runs.records import RecordError, RunRecord, read_json, read_record, record_path


# where run folders are, seen from a suite's index (outputs/suites/<suite>/<profile>/runs.json)
RUNS_FROM_INDEX = Path("..") / ".." / ".." / "runs"

# the metrics a table shows, in this order, when runs have them
PROTOCOLS = ["knn_top1_cls", "knn_top1_mean", "linear_top1_cls", "linear_top1_mean",
             "finetune_top1", "seg_miou"]


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


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_index(index_file: Path) -> dict:
    """A suite's runs.json; RecordError (one line, naming the file) when it is damaged."""
    try:
        index = read_json(index_file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"{index_file}: cannot be read ({err.__class__.__name__}: {err})") from None
    keys = ("method", "setting", "seed", "run_dir")
    if not (isinstance(index, dict) and isinstance(index.get("suite"), str) and isinstance(index.get("profile"), str)
            and isinstance(index.get("runs"), list) and index["runs"]
            and all(isinstance(e, dict) and all(k in e for k in keys) for e in index["runs"])):
        raise RecordError(f"{index_file}: not a suite index (suite, profile and a non-empty 'runs' list "
                          f"of {', '.join(keys)})")
    return index


def load_index(index_file: Path, index: dict | None = None) -> pd.DataFrame:
    """One row per run of a suite: the index entries joined with each run's record (`index`:
    the parsed runs.json, read here when not given)."""
    index = read_index(index_file) if index is None else index
    rows = []
    for entry in index["runs"]:
        # normalised, so that a warning names outputs/runs/NAME, not outputs/suites/S/P/../../../runs/NAME
        run_dir = Path(os.path.normpath(Path(index_file).parent / entry["run_dir"]))
        row = {"method": entry["method"], "setting": entry["setting"], "seed": entry["seed"],
               "run": Path(entry["run_dir"]).name, "missing evaluations": "", "problem": "",
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
            if record.done:   # a run shared with a suite that asked for fewer evaluations
                row["missing evaluations"] = ", ".join(e for e in entry.get("evals", []) if e not in record.evals)
                if record.failed_evaluation is not None:
                    error = record.failed_evaluation.get("error", "no message")
                    row["missing evaluations"] += f" (last failure: {error})"
        rows.append(row)
    return pd.DataFrame(rows)


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
    """Mean ± 95% CI per (method, setting); failed / missing runs counted, not dropped."""
    out = []
    for (method, setting), group in runs.groupby(["method", "setting"], sort=False):
        done = group[group["status"] == "done"]
        row = {"method": method, "setting": setting, "seeds done": len(done),
               "failed": int((group["status"] == "failed").sum()),
               "missing": int((~group["status"].isin(["done", "failed"])).sum())}   # or unfinished, unreadable
        for metric in metrics:
            values = done[metric].dropna().tolist() if metric in done else []
            row[metric] = format_ci(*ci95(values), n=len(values), of=len(done))
        out.append(row)
    return pd.DataFrame(out)


def format_ci(mean: float, half: float, n: int = 0, of: int = 0) -> str:
    """'mean ± half'; '(n of m seeds)' when only n of the cell's m finished runs have the metric."""
    if np.isnan(mean):
        return "–"
    text = f"{mean:.2f}" if np.isnan(half) else f"{mean:.2f} ± {half:.2f}"
    return text + (f" ({n} of {of} seeds)" if 0 < n < of else "")
