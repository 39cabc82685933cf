"""Methods ranked under each pre-training recipe, side by side, and the pairs whose order flips.

A suite whose cells pre-train both at the shared recipe and at each method's paper recipe asks
whether the comparison depends on the recipe: for each headline metric, the methods ordered by
mean under `shared` and under `paper`, and which ordered pairs swap between the two. The primary
metric (`PRIMARY_METRIC`, mean-pooled k-NN) is ranked first; a collapsed cell is never ranked.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from reports.tables import BASELINE, CELL, NO_RECIPE, PRIMARY_METRIC, ci95, cell_values, collapse_note, format_ci

RECIPES = ("shared", "paper")
# the metrics ranked, when the suite has them: the primary one first
HEADLINE = [PRIMARY_METRIC, "knn_top1_cls", "linear_top1_mean", "linear_top1_cls", "finetune_top1", "seg_miou"]


def compute_matched(setting: str) -> bool:
    """A setting of the compute-matched block: its label starts with "budget" or names FLOPs
    (compare_methods' "MAE's FLOPs (2.93 ep)")."""
    return setting.startswith("budget") or "FLOPs" in setting


def ranking_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells (method, setting, recipe) a ranking compares, one block of settings.

    Where some setting is compute-matched (`compute_matched`), the compute-matched block: those
    cells, and each method with a single cell under a recipe (the baseline, and the reference
    method whose epochs-matched run sets the budget: MAE in compare_methods). Otherwise every
    cell. A method's several cells in the block are ranked apart, as "method (setting)"."""
    if not cells["setting"].map(compute_matched).any():
        return cells
    single = cells.groupby(["method", "recipe"])["setting"].transform("size") == 1
    return cells[cells["setting"].map(compute_matched) | single]


def cell_names(cells: pd.DataFrame) -> list[str]:
    """Each cell as a ranking names it: its method, and its setting too where its method has
    several cells here."""
    several = cells["method"].duplicated(keep=False)
    return [f"{method} ({setting})" if repeated else method
            for method, setting, repeated in zip(cells["method"], cells["setting"], several)]


def runs_of(runs: pd.DataFrame, cell: pd.Series) -> pd.DataFrame:
    return runs[(runs[CELL] == cell[CELL]).all(axis=1)]


def ranked(runs: pd.DataFrame, cells: pd.DataFrame, metric: str) -> list[tuple[str, float, float]]:
    """(name, mean, CI half-width) of the cells that have the metric, best first (`cell_names`); a
    collapsed cell is left out (`collapsed_cells` names it)."""
    out = []
    for (_, cell), name in zip(cells.iterrows(), cell_names(cells)):
        of_cell = runs_of(runs, cell)
        mean, half = ci95(cell_values(of_cell, metric))
        if not np.isnan(mean) and not collapse_note(of_cell):
            out.append((name, mean, half))
    return sorted(out, key=lambda entry: (-entry[1], entry[0]))


def collapsed_cells(runs: pd.DataFrame, cells: pd.DataFrame, recipe: str) -> list[str]:
    """The cells a ranking under `recipe` leaves out as collapsed, named as `ranked` would name them:
    "ibot (paper): seed 1: teacher entropy 0.02"."""
    out = []
    for (_, cell), name in zip(cells.iterrows(), cell_names(cells)):
        note = collapse_note(runs_of(runs, cell))
        if note:
            out.append(f"{name} ({recipe}): {note}")
    return out


def ranked_text(rank: int, entries: list[tuple[str, float, float]]) -> str:
    """The rank-th entry as the table prints it, "1. mae 43.20 ± 1.00"; "" past the last."""
    if rank >= len(entries):
        return ""
    name, mean, half = entries[rank]
    return f"{rank + 1}. {name} {format_ci(mean, half)}"


def overlap(a: tuple[str, float, float], b: tuple[str, float, float]) -> bool:
    """Whether two cells' 95% CIs overlap; a one-seed cell has no CI and counts as overlapping."""
    (_, mean_a, half_a), (_, mean_b, half_b) = a, b
    return bool(np.isnan(half_a) or np.isnan(half_b) or abs(mean_a - mean_b) <= half_a + half_b)


def flips(order: dict[str, list[tuple[str, float, float]]]) -> list[str]:
    """The pairs of names ranked in opposite orders under the two recipes, e.g. "pixel > beit
    under shared, beit > pixel under paper", "(within noise)" when the two cells' CIs overlap
    under either recipe."""
    by_name = {recipe: {entry[0]: entry for entry in entries} for recipe, entries in order.items()}
    shared, paper = (by_name[recipe] for recipe in RECIPES)
    names = [name for name, *_ in order["shared"] if name in paper]
    out = []
    for first, second in itertools.combinations(names, 2):    # first ranks above second under shared
        if shared[first][1] > shared[second][1] and paper[second][1] > paper[first][1]:
            noise = overlap(shared[first], shared[second]) or overlap(paper[first], paper[second])
            out.append(f"{first} > {second} under shared, {second} > {first} under paper"
                       + (" (within noise)" if noise else ""))
    return out


def ranking_by_recipe(runs: pd.DataFrame, metrics: list[str]) -> tuple[pd.DataFrame, dict[str, list[str]],
                                                                       list[str]]:
    """Per headline metric (the primary one first), the cells of `ranking_cells` ordered by mean
    under each recipe (columns `shared` and `paper`, each entry "1. mae 43.20 ± 1.00"), per metric
    the pairs that flip (`flips`), and the collapsed cells left out of every ranking
    (`collapsed_cells`). The baseline, which does not pre-train, is ranked under both. An empty
    table when the suite's cells do not have both recipes."""
    cells = runs[CELL].drop_duplicates()
    if not set(RECIPES) <= set(cells.loc[cells["method"] != BASELINE, "recipe"]):
        return pd.DataFrame(), {}, []
    block = ranking_cells(cells)
    under = {recipe: block[block["recipe"].isin([recipe, NO_RECIPE])] for recipe in RECIPES}
    rows, flipped = [], {}
    for metric in [m for m in HEADLINE if m in metrics]:
        order = {recipe: ranked(runs, cells, metric) for recipe, cells in under.items()}
        if not any(order.values()):
            continue
        for rank in range(max(len(entries) for entries in order.values())):
            rows.append({"metric": metric, **{recipe: ranked_text(rank, entries) for recipe, entries in order.items()}})
        flipped[metric] = flips(order)
    unranked = [entry for recipe, cells in under.items() for entry in collapsed_cells(runs, cells, recipe)]
    return pd.DataFrame(rows, columns=["metric", *RECIPES]), flipped, list(dict.fromkeys(unranked))


def flip_lines(flipped: dict[str, list[str]]) -> list[str]:
    """One line per ranked metric: the pairs that flip between recipes, or that none does."""
    return [f"{metric}: {'; '.join(pairs) if pairs else 'no pair flips'}" for metric, pairs in flipped.items()]
