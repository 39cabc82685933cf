"""Pin the folder names of runs that have no pin yet (tests/data/run_names.json), never changing one.

    python -m suites.pin            # after adding a method, a suite or a cell to the project

A run's folder name is a promise (runs.identity): tests/test_run_identity.py checks that every
cell of every suite at the cpu, smoke and gpu profiles (under --recipe shared, on the data path
the pins were made with), BEiT's tokenizer runs and the evaluation caches keep the names pinned
here. This command computes them all, adds the ones the file lacks and leaves every pinned one
as it is. A pinned name the code would change (a rename retrains finished work), a pinned run
no longer in its grid or a grid whose pinned runs changed order is printed, and the file is left
untouched (exit 1): fix the code, or, where the change is meant, edit that pin by hand.

Only the project's own methods and evaluations are pinned: a method or evaluation from outside
(a plugin, runs.plugins) makes runs the project does not promise to keep, and needs no pin.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import lru_cache
from pathlib import Path

from core.files import atomic_write, config_hash
from eval.registry import registry as evaluations
from methods.registry import from_project
from runs.identity import resolve
from runs.state import eval_config_dict
from suites.plan import grid_specs
from suites.profiles import get_profile
from suites.registry import SUITES

PIN_FILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "run_names.json"
PROFILES = ("cpu", "smoke", "gpu")
RECIPE = "shared"       # the recipe every run had before recipes existed: the pins' names
COMMAND = "python -m suites.pin"


def data_of(profile, data_path: str) -> dict:
    """The data descriptor the pins name: the shipped CIFAR-10 where it sat when they were made
    (a run's identity holds its data's resolved path)."""
    if profile.data == "synthetic":
        return {"name": "synthetic", "img_size": profile.encoder["img_size"]}
    return {"name": "cifar10", "path": data_path, "img_size": profile.encoder["img_size"]}


@lru_cache(maxsize=2)
def current_pins(data_path: str) -> dict:
    """What the code names today, in the pin file's layout: runs (method, setting, seed, name) of
    every suite's grid per profile, each profile's prerequisite runs by role, each evaluation's
    cache name per profile; the project's own methods and evaluations only."""
    pins: dict = {"runs": {}, "prerequisites": {}, "evaluation_configs": {}}
    for profile_name in PROFILES:
        profile = get_profile(profile_name)
        data = data_of(profile, data_path)
        pins["runs"][profile_name], roles = {}, {}
        for suite in SUITES:
            rows = pins["runs"][profile_name][suite] = []
            for spec in grid_specs(suite, profile, RECIPE):
                if not from_project(spec.method):
                    continue
                for seed in range(profile.seeds):
                    config = resolve(spec, profile, seed, data, recipe=RECIPE)
                    rows.append([spec.method, spec.setting, seed, config.name])
                    for role, need in config.requires.items():
                        roles.setdefault(role, set()).add(need.config.name)
        pins["prerequisites"][profile_name] = roles
        pins["evaluation_configs"][profile_name] = {
            name: config_hash(eval_config_dict(name, profile)) for name, evaluation in evaluations.items()
            if evaluation.takes == "encoder" and evaluation.run.__module__.split(".")[0] == "eval"}
    return pins


def cell(row: list) -> tuple:
    """A pinned run's (method, setting, seed), without its name."""
    return tuple(row[:3])


def merge(pinned: dict, current: dict) -> tuple[dict, list[str], list[str]]:
    """(the pins with every missing one added, what was added, what conflicts with a pin)."""
    merged = json.loads(json.dumps(pinned))
    added: list[str] = []
    conflicts: list[str] = []
    for profile, suites in current["runs"].items():
        for suite, rows in suites.items():
            have = merged.setdefault("runs", {}).setdefault(profile, {}).setdefault(suite, [])
            pinned_names = {cell(row): row[3] for row in have}
            in_grid = {cell(row) for row in rows}
            wrong = [f"{suite} at {profile}: {row[0]} {row[1]!r} seed {row[2]} would be renamed "
                     f"{pinned_names[cell(row)]} -> {row[3]}"
                     for row in rows if cell(row) in pinned_names and pinned_names[cell(row)] != row[3]]
            wrong += [f"{suite} at {profile}: pinned {row[0]} {row[1]!r} seed {row[2]} ({row[3]}) is no longer "
                      f"in the grid" for row in have if cell(row) not in in_grid]
            if not wrong and [row for row in rows if cell(row) in pinned_names] != have:
                wrong.append(f"{suite} at {profile}: the pinned runs are in another order than the grid's")
            if not wrong:       # the grid's rows: every pinned one as it was, the new ones in their places
                added += [f"{suite} at {profile}: {row[0]} {row[1]!r} seed {row[2]} -> {row[3]}"
                          for row in rows if cell(row) not in pinned_names]
                have[:] = rows
            conflicts += wrong
    for profile, roles in current["prerequisites"].items():
        have = merged.setdefault("prerequisites", {}).setdefault(profile, {})
        for role, names in roles.items():
            if len(names) > 1:
                conflicts.append(f"prerequisite {role!r} at {profile}: {len(names)} different runs "
                                 f"({', '.join(sorted(names))}); the pins hold one per role")
            elif role not in have:
                have[role] = next(iter(names))
                added.append(f"prerequisite {role!r} at {profile} -> {have[role]}")
            elif have[role] not in names:
                conflicts.append(f"prerequisite {role!r} at {profile} would be renamed {have[role]} -> "
                                 f"{next(iter(names))}")
    for profile, hashes in current["evaluation_configs"].items():
        have = merged.setdefault("evaluation_configs", {}).setdefault(profile, {})
        for name, digest in hashes.items():
            if name not in have:
                have[name] = digest
                added.append(f"evaluation {name!r} at {profile} -> {digest}")
            elif have[name] != digest:
                conflicts.append(f"evaluation {name!r} at {profile}: its cache would be renamed {have[name]} -> "
                                 f"{digest}")
    return merged, added, conflicts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, default=PIN_FILE, help=f"the pin file (default {PIN_FILE})")
    args = parser.parse_args(argv)
    try:
        pinned = json.loads(args.file.read_text())
    except (OSError, ValueError) as err:
        print(f"error: pin file {args.file} cannot be read ({err}); restore it from git "
              f"(git show HEAD:tests/data/run_names.json)", file=sys.stderr)
        return 2
    merged, added, conflicts = merge(pinned, current_pins(pinned["data_path"]))
    if conflicts:
        print(f"{len(conflicts)} pinned name(s) the code would change; {args.file} left as it was:", file=sys.stderr)
        for line in conflicts:
            print(f"  {line}", file=sys.stderr)
        print("a rename retrains finished runs: fix the code (runs.identity: late_field, RETIRED_FIELDS), "
              "or edit those pins by hand where the change is meant", file=sys.stderr)
        return 1
    if not added:
        print(f"every run is pinned already; {args.file} unchanged")
        return 0
    with atomic_write(args.file) as f:
        f.write(json.dumps(merged, indent=1, sort_keys=True))       # the file's layout: no newline at the end
    print(f"pinned {len(added)} new name(s) in {args.file} (no pinned name changed):")
    for line in added:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
