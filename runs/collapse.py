"""No silent collapse: the verdict on a finished run, from its record and folder.

Each method declares its collapse monitor (`methods.base.Method.collapse`: the metrics it reads
and its rule, thresholds in the method's file); this module reads those metrics and asks it.

    verdict = collapse_verdict(run_dir, config, record)
    # {"collapsed": "teacher [CLS] entropy 6.90 = 0.996 ln K ...", or None,
    #  "monitor": {"teacher_entropy_cls": 6.90, "teacher_entropy_patch": 6.12, "step": 155,
    #              "from": "train stats"}}

  ibot     collapsed when the teacher's [CLS] entropy at the last logged step is above
           0.9 ln K (methods.ibot.COLLAPSED_ENTROPY_SHARE; K = out_dim)
  beit     collapsed when its tokenizer run uses fewer than 5% of its codes on the test split
           (methods.beit.MIN_CODEBOOK_USAGE): every BEiT run on that tokenizer is
  others   no monitor, never flagged ("monitor": {})

A run's last logged step metrics are its train stats' "final_metrics" (engine.trainer); a record
of before them falls back to the last line of the folder's metrics.jsonl that holds them (an
archived run keeps its metrics.jsonl). A prerequisite's metrics are its record's, in the same
runs folder. Whatever is missing (a run not finished, a folder not here, a record that does not
parse) gives "collapsed": None and "monitor": {"unknown": why}; never an error.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import ConfigError
from runs.records import RunRecord, UnreadableRecord, read_result

if TYPE_CHECKING:
    from runs.identity import RunConfig

METRICS_FILE = "metrics.jsonl"


def collapse_verdict(run_dir: Path, config: RunConfig, record: RunRecord | None) -> dict:
    """{"collapsed": the method's one-line reason or None, "monitor": the values it looked at}
    for the run of `config` in `run_dir` (`record`: its result.json, None when it has none)."""
    from methods import registry    # here, so that importing this module (from runs.index) imports no torch

    if config.method not in registry:
        return unknown(f"method {config.method!r} is not registered here (a plugin not loaded?)")
    method_cls = registry[config.method][0]
    keys, prerequisite_keys = method_cls.collapse_metrics, method_cls.collapse_prerequisite_metrics
    if not keys and not prerequisite_keys:
        return {"collapsed": None, "monitor": {}}
    if record is None or not record.done:
        return unknown("the run has not finished")
    monitor: dict = {}
    final: dict[str, float] = {}
    if keys:
        found = final_metrics(Path(run_dir), record, keys)
        if found is None:
            return unknown(f"no logged step holds {', '.join(keys)} (record train stats, {METRICS_FILE})")
        row, source = found
        final = {key: row[key] for key in keys}
        monitor = {**final, "step": row.get("step"), "from": source}
    prerequisites: dict[str, dict[str, float]] = {}
    for role, role_keys in prerequisite_keys.items():
        need = config.requires.get(role)
        if need is None:
            return unknown(f"the run has no {role} run (it brings its own)")
        metrics = prerequisite_metrics(need.config.folder(Path(run_dir).parent.parent), role_keys)
        if isinstance(metrics, str):
            return unknown(metrics)
        prerequisites[role] = metrics
        monitor[role] = {"run": need.config.name, **metrics}
    try:
        cfg = config.build_method_config()
    except ConfigError as err:
        return unknown(f"its config does not build here: {err}")
    return {"collapsed": method_cls.collapse(cfg, final, prerequisites), "monitor": monitor}


def unknown(why: str) -> dict:
    return {"collapsed": None, "monitor": {"unknown": why}}


def holds(row, keys) -> bool:
    """`row` is a dict with a finite number at every key."""
    return isinstance(row, dict) and all(
        isinstance(row.get(key), (int, float)) and not isinstance(row[key], bool) and math.isfinite(row[key])
        for key in keys)


def final_metrics(run_dir: Path, record: RunRecord, keys: tuple[str, ...]) -> tuple[dict, str] | None:
    """The run's last logged step holding `keys`, and where it came from: the record's train
    stats, or (a record of before them) the folder's metrics.jsonl; None when neither has it."""
    row = (record.train or {}).get("final_metrics")
    if holds(row, keys):
        return row, "train stats"
    try:
        lines = (run_dir / METRICS_FILE).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if holds(row, keys):
            return row, METRICS_FILE
    return None


def prerequisite_metrics(run_dir: Path, keys: tuple[str, ...]) -> dict[str, float] | str:
    """`keys` of the finished prerequisite run's record metrics, or why they cannot be read."""
    try:
        record = read_result(run_dir)
    except (UnreadableRecord, ConfigError) as err:
        return str(err)
    if record is None or not record.done:
        return f"{run_dir.name} has not finished (no done record in {run_dir.parent})"
    if not holds(record.metrics, keys):
        return f"{run_dir.name}'s record has no {', '.join(keys)}"
    return {key: record.metrics[key] for key in keys}
