"""A suite's index, `outputs/suites/<suite>/<profile>/runs.json`: the runs of its grid with their
settings, recipe and evaluations, which the table and the report read. Read here (and its
schema kept here); standard library, the ground floor and the record schema only, so that
`reports/` reads it without importing model code. `runs.indexing` writes it from a plan.

    index = read_index(index_file)      # validated; RecordError naming the file when damaged
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from core.files import read_json
from runs.records import RecordError

INDEX_FILE = "runs.json"
RUNS_FROM_INDEX = Path("..") / ".." / ".." / "runs"     # an entry's run_dir, relative to the index
ENTRY_KEYS = ("method", "setting", "seed", "run_dir")


def read_index(index_file: Path) -> dict:
    """A suite's runs.json; RecordError (one line, naming the file) when it is damaged."""
    try:
        index = read_json(index_file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"{index_file}: cannot be read ({err.__class__.__name__}: {err})") from None
    if not (isinstance(index, dict) and isinstance(index.get("suite"), str) and isinstance(index.get("profile"), str)
            and isinstance(index.get("runs"), list) and index["runs"]
            and all(isinstance(e, dict) and all(k in e for k in ENTRY_KEYS) for e in index["runs"])):
        raise RecordError(f"{index_file}: not a suite index (suite, profile and a non-empty 'runs' list "
                          f"of {', '.join(ENTRY_KEYS)})")
    return index


def index_budget(suite_dir: Path) -> dict | None:
    """The "budget" entry of a suite's index (None when there is none or it cannot be read)."""
    try:
        return read_index(suite_dir / INDEX_FILE).get("budget")
    except (RecordError, OSError):
        return None


def flatten(overrides: dict, prefix: str = "") -> dict:
    """{"mask": {"ratio": 0.75}} -> {"mask.ratio": 0.75}: the grid's settings as report columns."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def entry_recipe(entry: dict) -> str:
    """An index entry's recipe: entries written before recipes existed are the shared one's."""
    return entry.get("recipe", "shared")


def recipe_free(setting: str) -> str:
    """A cell's setting label without the epochs that depend on its recipe's FLOPs per image."""
    return setting.split(" (")[0]
