"""A suite's grid as runs, and its plan: every cell resolved at the profile, recipe and seeds,
`--only` applied, every run folder's state read once (`runs.plan`).

    plan = suite_plan("ablation_masking", "cpu", profile, "paper", Path("outputs"), seeds=None,
                      only="mae,none", data=None)
    plan.runs            # what --only keeps, in grid order
    plan.grid            # the whole grid (the suite's index lists every run of it)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from core.config import ConfigError, UnknownNameError
from methods.recipes import RECIPES
from methods.registry import registry
from runs.cost import cell_flops_per_image
from runs.identity import RunProfile, Run, data_descriptor, init_config, init_encoder, init_spec, resolve
from runs.plan import Plan, make_plan
from runs.plugins import plugin_of
from suites.cells import check_suite_cells
from suites.profiles import get_profile, override
from suites.registry import get_suite


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe {recipe!r} unknown; known: {', '.join(RECIPES)}")


def seed_count(profile, seeds: int | None) -> int:
    seeds = profile.seeds if seeds is None else seeds
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    return seeds


def grid_specs(suite_name: str, profile: RunProfile, recipe: str) -> list:
    """The suite's cells at a profile and recipe; a grid that compares methods at equal FLOPs gets
    each cell's training FLOPs per image from the run layer (`runs.cost`), not by building models."""
    check_suite_cells()
    return get_suite(suite_name).grid(profile, recipe, lambda spec: cell_flops_per_image(spec, profile, recipe))


INIT_EVALS = ("knn", "linear")      # what an init row is evaluated by (the frozen-feature protocols)


def resolve_runs(specs: list, profile, seeds: int, descriptor: dict, recipe: str, inits: bool = True) -> list[Run]:
    """The specs at every seed, then (`inits`) an init row per architecture and seed no cell has
    yet (a paper recipe's layer scale: `runs.identity.init_spec`), which its cells' runs pair with."""
    runs = [Run(spec, seed, resolve(spec, profile, seed, descriptor, recipe=recipe))
            for spec in specs for seed in range(seeds)]
    warn_shared_instead_of_paper(runs, recipe)
    return runs + init_rows(runs, profile) if inits else runs


def init_rows(runs: list[Run], profile) -> list[Run]:
    """The untrained encoder of each architecture and seed the runs train that is not among them."""
    names, rows = {run.name for run in runs}, {}
    for run in runs:
        if run.spec.method == "none" or not registry[run.spec.method][0].trains or run.config.train is None:
            continue
        evals = tuple(name for name in run.spec.evals if name in INIT_EVALS)
        init = init_config(run.config, profile)
        if init.name not in names and init.name not in rows:
            rows[init.name] = Run(init_spec(run.config, profile, evals or ("knn",)), run.seed, init)
    return list(rows.values())


WARNED: set[str] = set()      # methods warned about in this process (the budget solver resolves grids often)


def warn_shared_instead_of_paper(runs: list[Run], recipe: str) -> None:
    """One line per method that pre-trains but declares no paper recipe (a method from outside,
    `Method.paper_recipe`), when --recipe paper runs it under the shared one."""
    for name in dict.fromkeys(run.spec.method for run in runs):
        cls = registry[name][0]
        if recipe == "paper" and cls.trains and cls.paper_recipe is None and name not in WARNED:
            WARNED.add(name)
            plugin = plugin_of(cls.__module__)
            where = f"plugin {plugin.given}" if plugin else f"module {cls.__module__}"
            print(f"warning: {name} ({where}) declares no paper recipe: --recipe paper trains it under the "
                  f"shared recipe and labels its rows shared (set {cls.__name__}.paper_recipe = "
                  f"methods.recipes.Recipe(train=..., method=..., source=...) to give it one)", file=sys.stderr)


def grid_runs(suite_name: str, profile_name: str, seeds: int | None, data: str | None, check_data: bool = True,
              recipe: str = "paper", settings: tuple[str, ...] = ()) -> list[Run]:
    """Every run of the suite's whole grid. `check_data=False` (--dry-run) names the runs
    without looking at the data folder; `settings` are --set overrides of the profile."""
    profile = override(get_profile(profile_name), list(settings))
    check_recipe(recipe)
    descriptor = data_descriptor(profile, data, check=check_data)
    return resolve_runs(grid_specs(suite_name, profile, recipe), profile, seed_count(profile, seeds), descriptor,
                        recipe)


def select_runs(suite_name: str, profile_name: str, seeds: int | None, only: str | None,
                data: str | None, check_data: bool = True, recipe: str = "paper") -> list[Run]:
    """Every run of the suite that `only` keeps (all without it), in grid order."""
    grid = grid_runs(suite_name, profile_name, seeds, data, check_data, recipe)
    return keep_only(grid, only, suite_name) if only else grid


def suite_plan(suite_name: str, profile_name: str, profile: RunProfile, recipe: str, outputs: Path,
               seeds: int | None, only: str | None, data: str | None, check_data: bool = True,
               settings: tuple[str, ...] = ()) -> Plan:
    """The plan of the suite's whole grid, running what `only` keeps."""
    grid = grid_runs(suite_name, profile_name, seeds, data, check_data, recipe, settings)
    runs = keep_only(grid, only, suite_name) if only else grid
    return make_plan(suite_name, profile_name, profile, recipe, outputs, grid, runs)


# ---- --only ------------------------------------------------------------------------------------
def keep_only(grid: list[Run], only: str, suite_name: str) -> list[Run]:
    """The runs of `grid` whose cells `--only` keeps; an init row (`init_rows`) only where a kept
    run trains from it."""
    kept = select([run.spec for run in grid if run.seed == 0], only, suite_name)
    runs = [run for run in grid if run.spec in kept]
    needed = {(init_architecture(run), run.seed) for run in runs if run.config.train is not None}
    return [run for run in runs if not run.spec.setting.startswith(INIT_ROW)
            or (init_architecture(run), run.seed) in needed]


INIT_ROW = "init ("     # the setting of an init row (runs.identity.init_spec)


def init_architecture(run: Run) -> str:
    """A run's encoder config as its initial weights see it (drop path left out)."""
    return json.dumps(init_encoder(run.config.build_method_config().encoder), sort_keys=True)


def select(specs: list, only: str, suite_name: str) -> list:
    """The grid cells `--only` keeps: "mae,none" keeps methods, "beit:random 0.4" one cell."""
    known = sorted({s.method for s in specs})
    kept = []
    for word in only_words(only, known):
        method, _, setting = (part.strip() for part in word.partition(":"))
        if method not in known:
            raise UnknownNameError(f"--only names {method!r}, not in suite {suite_name!r}; its methods: "
                                   f"{', '.join(known)}{why_not_in(method, suite_name)}")
        cells = [s for s in specs if s.method == method and (not setting or s.setting == setting)]
        if not cells:
            settings = ", ".join(repr(s.setting) for s in specs if s.method == method)
            raise UnknownNameError(f"--only names {word!r}, but {method} has no setting {setting!r} in suite "
                                   f"{suite_name!r}; its settings: {settings}")
        kept += [s for s in cells if s not in kept]
    return [s for s in specs if s in kept]     # grid order


def why_not_in(method: str, suite_name: str) -> str:
    """What to do about a method --only names that the suite's grid lacks."""
    if method not in registry:
        return (" (a method of your own: load the file or module that registers it with --plugins PATH, "
                "or list it in MIMBENCH_PLUGINS)")
    cls = registry[method][0]
    if not (cls.trains and cls.product == "encoder"):
        return f" ({method} pre-trains no encoder, which is what the suites compare)"
    return f" ({method} is registered; this suite takes it only with the cells {cls.__name__}.suite_cells[{suite_name!r}] declares)"


def only_words(only: str, methods: list[str]) -> list[str]:
    """--only split at commas, except inside a setting that has one ("pixel:raw pixels, block 0.4")."""
    words: list[str] = []
    for piece in (p.strip() for p in only.split(",")):
        if words and ":" in words[-1] and ":" not in piece and piece not in methods:
            words[-1] += ", " + piece
        elif piece:
            words.append(piece)
    if not words:
        raise UnknownNameError(f"--only {only!r} names nothing; pass methods or METHOD:SETTING, "
                               f"comma-separated (its methods: {', '.join(methods)})")
    return words
