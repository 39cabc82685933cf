"""Methods ranked under each pre-training recipe, side by side, and the pairs whose order flips.

A suite whose cells pre-train both at the shared recipe and at each method's paper recipe asks
whether the comparison depends on the recipe: for each headline metric, the methods ordered by
mean under `shared` and under `paper`, and which ordered pairs swap between the two.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from reports.tables import BASELINE, CELL, NO_RECIPE, ci95, cell_values, format_ci

RECIPES = ("shared", "paper")
# the metrics ranked, when the suite has them
HEADLINE = ["knn_top1_cls", "knn_top1_mean", "linear_top1_cls", "linear_top1_mean", "finetune_top1", "seg_miou"]


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


def ranked(runs: pd.DataFrame, cells: pd.DataFrame, metric: str) -> list[tuple[str, float, float]]:
    """(name, mean, CI half-width) of the cells that have the metric, best first; a cell is
    named by its method, and by its setting too where its method has several cells here."""
    several = cells["method"].duplicated(keep=False)
    out = []
    for (_, cell), repeated in zip(cells.iterrows(), several):
        values = cell_values(runs[(runs[CELL] == cell[CELL]).all(axis=1)], metric)
        mean, half = ci95(values)
        if not np.isnan(mean):
            out.append((f"{cell['method']} ({cell['setting']})" if repeated else cell["method"], mean, half))
    return sorted(out, key=lambda entry: (-entry[1], entry[0]))


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


def ranking_by_recipe(runs: pd.DataFrame, metrics: list[str]) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Per headline metric, the cells of `ranking_cells` ordered by mean under each recipe
    (columns `shared` and `paper`, each entry "1. mae 43.20 ± 1.00"), and per metric the
    pairs that flip (`flips`). The baseline, which does not pre-train, is ranked under both.
    An empty table when the suite's cells do not have both recipes."""
    cells = runs[CELL].drop_duplicates()
    if not set(RECIPES) <= set(cells.loc[cells["method"] != BASELINE, "recipe"]):
        return pd.DataFrame(), {}
    block = ranking_cells(cells)
    rows, flipped = [], {}
    for metric in [m for m in HEADLINE if m in metrics]:
        order = {recipe: ranked(runs, block[block["recipe"].isin([recipe, NO_RECIPE])], metric) for recipe in RECIPES}
        if not any(order.values()):
            continue
        for rank in range(max(len(entries) for entries in order.values())):
            rows.append({"metric": metric, **{recipe: ranked_text(rank, entries) for recipe, entries in order.items()}})
        flipped[metric] = flips(order)
    return pd.DataFrame(rows, columns=["metric", *RECIPES]), flipped


def flip_lines(flipped: dict[str, list[str]]) -> list[str]:
    """One line per ranked metric: the pairs that flip between recipes, or that none does."""
    return [f"{metric}: {'; '.join(pairs) if pairs else 'no pair flips'}" for metric, pairs in flipped.items()]
