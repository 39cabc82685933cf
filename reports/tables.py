"""Run records -> tables with mean and 95% confidence interval over seeds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats


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


def load_index(index_file: Path) -> pd.DataFrame:
    """One row per run of a suite: the index entries joined with each run's result.json."""
    index = json.loads(Path(index_file).read_text())
    rows = []
    for entry in index["runs"]:
        run_dir = Path(index_file).parent / entry["run_dir"]
        row = {"method": entry["method"], "setting": entry["setting"], "seed": entry["seed"],
               "run": Path(entry["run_dir"]).name, "missing evaluations": "",
               # pre-training has logged steps but not finished (running now, or stopped)
               "status": "unfinished" if (run_dir / "metrics.jsonl").exists() else "missing"}
        if (run_dir / "result.json").exists():
            result = json.loads((run_dir / "result.json").read_text())
            row["status"] = result["status"]
            row.update(suite_metrics(result, entry.get("evals")))
            if result["status"] == "done":   # a run shared with a suite that asked for fewer evaluations
                row["missing evaluations"] = ", ".join(e for e in entry.get("evals", [])
                                                       if e not in result.get("evals", {}))
                if "failed_evaluation" in result:
                    row["missing evaluations"] += f" (last failure: {result['failed_evaluation']['error']})"
        rows.append(row)
    return pd.DataFrame(rows)


def suite_metrics(result: dict, evals: list[str] | None) -> dict:
    """The run's metrics from the evaluations this suite asked for (a run folder shared with
    another suite may hold more), plus its pre-training figures; all of them if not recorded."""
    metrics = result.get("metrics", {})
    if evals is None:
        return metrics
    kept = {k: v for k, v in metrics.items() if k.startswith("pretrain_")}
    for name in evals:
        kept.update(result.get("evals", {}).get(name, {}).get("metrics", {}))
    return kept


def summarize(runs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Mean ± 95% CI per (method, setting); failed / missing runs counted, not dropped."""
    out = []
    for (method, setting), group in runs.groupby(["method", "setting"], sort=False):
        done = group[group["status"] == "done"]
        row = {"method": method, "setting": setting, "seeds done": len(done),
               "failed": int((group["status"] == "failed").sum()),
               "missing": int((~group["status"].isin(["done", "failed"])).sum())}   # or unfinished
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
