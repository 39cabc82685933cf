"""A budget curve (`python -m suites.run compare_methods --curve 0.5,1,2.5,5ep`) as the report reads
it: each method's metric against pre-training compute, and its break-even budget, the smallest from
which on it beats its own init (the untrained encoder of its architecture and seed: the index
entry's `init_run`) at every budget measured, from the suite index (a curve cell's entry names its
budget, `mae_epochs`: runs.index) and the run records alone. The verdict reads the primary metric,
mean-pooled k-NN (reports.tables.PRIMARY_METRIC); a collapsed cell is shown but never ranked or
starred, and stars are Holm-corrected over the whole of curve.csv.

    curve = curve_of(index, runs)        # None for a suite that is not a curve
    curve_markdown(index_file)           # the README block, rendered from the records

The page of a curve suite (`python -m reports.build compare_methods`: reports/out/compare_methods/
<profile>-curve/index.html) opens with `curve_section`: a one-line verdict, the figure, the
break-even budgets and the ranking at each budget; beside the page it writes curve.png,
curve.csv and curve.md.

Compute is the budget in MAE-epochs of FLOPs: at budget B every method pre-trained for the FLOPs
of B epochs of MAE (compare_methods' compute-matched block), so that all methods share each x.
The figure's top axis converts it to the FLOPs the records counted (`train.flops_total`,
standalone-equivalent for a decay branch: what the same run would cost from scratch).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullLocator

from core.files import read_json

from reports.plots import COLLAPSED_COLOUR, COLLAPSED_LABEL, img_tag, method_palette, ring_collapsed, t_interval
from reports.ranking import overlap
from reports.tables import (ALPHA, BASELINE_METRIC, PRIMARY_METRIC, PROTOCOLS, Pairing, ci95, cell_values,
                            collapse_note, family_size, format_ci, holm, is_init, load_index, paired_diffs,
                            paired_p_value, pairing_of, read_index, reference_runs)

BUDGET = "mae_epochs"           # the key of a curve cell's budget in its index entry (runs.index.entry)
UNIT = "MAE-epochs"
FLOPS = "pretrain_flops_total"  # a record's counted pre-training FLOPs, as load_index names its column
# the metric the verdict reads, the first the curve has: the primary one (reports.tables.PRIMARY_METRIC)
VERDICT_METRICS = (PRIMARY_METRIC, "linear_top1_mean", "knn_top1_cls", "linear_top1_cls", "finetune_top1",
                   "seg_miou")
METRIC_NAMES = {"knn_top1_cls": "k-NN [CLS]", "knn_top1_mean": "k-NN mean", "knn_student_top1_cls":
                "student k-NN [CLS]", "knn_student_top1_mean": "student k-NN mean", "linear_top1_cls":
                "linear [CLS]", "linear_top1_mean": "linear mean", "finetune_top1": "fine-tune",
                "seg_miou": "segmentation mIoU"}
# p: the paired t-test's; holm_star: significant after Holm over every line x budget x metric of the
# table; collapsed: the cell's reason, "" when healthy
CSV_COLUMNS = ["method", "setting", "recipe", BUDGET, "metric", "mean", "ci95", "n", "diff", "diff_ci95", "n_paired",
               "p", "holm_star", "baseline", "collapsed", "flops"]

Line = tuple[str, str]          # a curve's line: (method, recipe)


@dataclass(frozen=True)
class Curve:
    runs: pd.DataFrame          # the suite's runs (load_index) with their budget (NaN: an init)
    lines: list[Line]           # every pre-trained cell of the grid, in its order
    metrics: list[str]          # those some finished run of the curve has, the primary one first
    pairing: Pairing            # what each run's paired difference subtracts: its own init
    table: pd.DataFrame         # curve.csv: CSV_COLUMNS

    def name(self, line: Line) -> str:
        """A line as the page names it: its method, and its recipe where the curve has several."""
        several = len({recipe for _, recipe in self.lines}) > 1
        return f"{line[0]} ({line[1]} recipe)" if several else line[0]

    def runs_of(self, line: Line) -> pd.DataFrame:
        return self.runs[(self.runs["method"] == line[0]) & (self.runs["recipe"] == line[1])
                         & self.runs[BUDGET].notna()]

    def measured(self, line: Line) -> bool:
        return bool((self.runs_of(line)["status"] == "done").any())

    def points(self, line: Line, metric: str) -> pd.DataFrame:
        """The line's rows of curve.csv for one metric, budgets ascending."""
        table = self.table
        return table[(table["method"] == line[0]) & (table["recipe"] == line[1]) & (table["metric"] == metric)
                     & table[BUDGET].notna()].sort_values(BUDGET)


def curve_of(index: dict, runs: pd.DataFrame) -> Curve | None:
    """The suite's curve from its index and `load_index`'s table of its runs (the same order);
    None when no entry names a budget."""
    budgets = pd.to_numeric(pd.Series([entry.get(BUDGET) for entry in index["runs"]], index=runs.index,
                                      dtype=object), errors="coerce")
    if budgets.isna().all():
        return None
    # a run listed twice (`none` once per recipe of an earlier command) counts once
    runs = runs.assign(**{BUDGET: budgets}).drop_duplicates("run")
    on_curve = runs[runs[BUDGET].notna()]
    lines = list(dict.fromkeys(zip(on_curve["method"], on_curve["recipe"])))
    done = on_curve[on_curve["status"] == "done"]
    metrics = sorted((m for m in PROTOCOLS if m in done and done[m].notna().any()), key=lambda m: m != PRIMARY_METRIC)
    pairing = pairing_of(runs)
    return Curve(runs, lines, metrics, pairing, curve_table(runs, lines, metrics, pairing))


def init_cells(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(setting, runs) of each init cell off the curve: the reference `none` first (random init),
    then any other untrained encoder an index lists (an own init: "init (layer scale 0.1)")."""
    inits = runs[is_init(runs) & runs[BUDGET].isna()]
    return list(inits.groupby("setting", sort=False))


def init_name(runs: pd.DataFrame, setting: str) -> str:
    """An init cell as the page names it: the reference is `none`, another by its setting."""
    reference = reference_runs(runs)
    return "none" if len(reference) and setting == reference["setting"].iloc[0] else setting


def curve_table(runs: pd.DataFrame, lines: list[Line], metrics: list[str], pairing: Pairing) -> pd.DataFrame:
    """curve.csv: per line, budget and metric the mean, 95% CI half-width and seeds of the finished
    runs, the paired difference to each run's own init with its CI, pairs and p-value, the Holm
    star over the whole table and the cell's collapse (mean counted FLOPs too); the inits first,
    with no budget (the same at every budget)."""
    rows = []
    for setting, cell in init_cells(runs):
        for metric in metrics:
            rows.append(table_row(cell["method"].iloc[0], setting, cell["recipe"].iloc[0], math.nan, metric,
                                  cell_values(cell, metric), None, cell))
    for line in lines:
        on_line = runs[(runs["method"] == line[0]) & (runs["recipe"] == line[1]) & runs[BUDGET].notna()]
        for budget, cell in on_line.groupby(BUDGET, sort=True):
            for metric in metrics:
                diffs = paired_diffs(cell, pairing, metric)
                rows.append({**table_row(line[0], cell["setting"].iloc[0], line[1], budget, metric,
                                         cell_values(cell, metric), diffs, cell),
                             "p": paired_p_value(diffs), "baseline": pairing.label})
    table = pd.DataFrame(rows, columns=CSV_COLUMNS)
    # the family: every difference tested, a collapsed cell's left out (never starred)
    table["holm_star"] = holm(table["p"].where(table["collapsed"] == ""))
    return table


def table_row(method: str, setting: str, recipe: str, budget: float, metric: str, values: list[float],
              diffs: list[float] | None, cell: pd.DataFrame) -> dict:
    mean, half = ci95(values)
    diff, diff_half = ci95(diffs or [])
    flops = cell_values(cell, FLOPS)
    return {"method": method, "setting": setting, "recipe": recipe, BUDGET: budget, "metric": metric, "mean": mean,
            "ci95": half, "n": len(values), "diff": diff, "diff_ci95": diff_half, "n_paired": len(diffs or []),
            "p": math.nan, "holm_star": False, "baseline": "", "collapsed": collapse_note(cell),
            "flops": np.mean(flops) if flops else math.nan}


def holm_family(curve: Curve) -> int:
    """How many paired differences the curve's Holm correction covers."""
    return family_size(curve.table["p"].where(curve.table["collapsed"] == ""))


def break_even(table: pd.DataFrame, line: Line, metric: str) -> float | None:
    """The smallest budget whose paired difference to the line's own init has its (uncorrected)
    95% CI above 0 there and at every larger budget measured (a finished run has the metric);
    None when there is none. A budget with one paired seed (no interval), no paired seed or a
    collapsed cell is not above 0, nor is any budget below it."""
    rows = table[(table["method"] == line[0]) & (table["recipe"] == line[1]) & (table["metric"] == metric)
                 & table[BUDGET].notna() & (table["n"] > 0)].sort_values(BUDGET)
    above = ((rows["diff"] - rows["diff_ci95"] > 0) & (rows["collapsed"] == "")).to_numpy()   # NaN: False
    # above 0 here and at every larger budget: a suffix of the budgets
    from_here_on = np.flip(np.cumprod(np.flip(above))).astype(bool)
    return float(rows[BUDGET].to_numpy()[from_here_on].min()) if from_here_on.any() else None


def budget_text(budget: float) -> str:
    return f"{budget:g} {UNIT if budget != 1 else UNIT[:-1]}"


def verdict_metric(curve: Curve) -> str | None:
    return next((m for m in VERDICT_METRICS if m in curve.metrics), curve.metrics[0] if curve.metrics else None)


def metric_title(metric: str) -> str:
    """A metric as the page names it; the primary one says so."""
    return METRIC_NAMES.get(metric, metric) + (" (primary)" if metric == PRIMARY_METRIC else "")


def largest_budget(curve: Curve, line: Line, metric: str) -> float:
    """The largest budget at which the line has a finished run with the metric (else any finished run)."""
    points = curve.points(line, metric)
    measured = points.loc[points["n"] > 0, BUDGET]
    if len(measured):
        return float(measured.max())
    on_line = curve.runs_of(line)
    return float(on_line.loc[on_line["status"] == "done", BUDGET].max())


def collapsed_budgets(curve: Curve, line: Line) -> str:
    """" (collapsed at 2.5, 5 MAE-epochs)" when some cell of the line collapsed; "" otherwise."""
    budgets = [budget for budget, cell in curve.runs_of(line).groupby(BUDGET, sort=True) if collapse_note(cell)]
    return f" (collapsed at {', '.join(f'{b:g}' for b in budgets)} {UNIT})" if budgets else ""


def verdict(curve: Curve) -> str:
    """One line: each measured method's break-even budget against its own init on the verdict's
    metric ("Break-even against own init, k-NN mean (primary): mae at 2.5 MAE-epochs; pixel not
    within 5 MAE-epochs"), where a line collapsed, and which methods have no finished run yet."""
    metric = verdict_metric(curve)
    if metric is None:
        return "No run of the curve has finished yet."
    said = []
    for line in filter(curve.measured, curve.lines):
        budget = break_even(curve.table, line, metric)
        at = (f"at {budget_text(budget)}" if budget is not None else
              f"not within {budget_text(largest_budget(curve, line, metric))}")
        said.append(f"{curve.name(line)} {at}{collapsed_budgets(curve, line)}")
    missing = [curve.name(line) for line in curve.lines if not curve.measured(line)]
    if missing:
        said.append(f"no finished run yet: {', '.join(missing)}")
    return f"Break-even against {curve.pairing.label}, {metric_title(metric)}: " + "; ".join(said) + "."


def break_even_table(curve: Curve) -> pd.DataFrame:
    """Per line and metric, its break-even budget with the paired difference there
    ("2.5 (+1.20 ± 0.80)"), else "not within B MAE-epochs" (the largest budget it has finished);
    where the line collapsed, at which budgets."""
    rows = []
    for line in filter(curve.measured, curve.lines):
        row = {"method": curve.name(line)}
        for metric in curve.metrics:
            points = curve.points(line, metric)
            budget = break_even(curve.table, line, metric)
            if budget is not None:
                at = points[points[BUDGET] == budget].iloc[0]
                row[metric] = f"{budget:g} ({format_ci(at['diff'], at['diff_ci95'], signed=True)})"
            elif (points["n_paired"] > 0).any():
                row[metric] = f"not within {budget_text(largest_budget(curve, line, metric))}"
            else:
                row[metric] = "no paired seed"
            row[metric] += collapsed_budgets(curve, line)
        rows.append(row)
    return pd.DataFrame(rows, columns=["method", *curve.metrics]).rename(columns=metric_title)


def ranking_table(curve: Curve) -> pd.DataFrame:
    """Per metric (the primary one first) and budget, the lines and the inits ordered by mean,
    "mae 43.20 ± 1.00 > none 41.00 ± 0.50 ≈ pixel ...": ≈ where the two neighbours' 95% CIs overlap
    (a one-seed mean overlaps everything), > where they do not; a collapsed cell is not ranked but
    named after the ranking. Beside it each line's paired difference to its own init, starred
    where Holm's correction over curve.csv keeps it."""
    rows = []
    table = curve.table[curve.table["n"] > 0]
    inits = table[table[BUDGET].isna()]
    column = f"Δ {curve.pairing.label}"
    for metric in curve.metrics:
        on_curve = table[(table["metric"] == metric) & table[BUDGET].notna()]
        for budget, points in on_curve.groupby(BUDGET, sort=True):
            healthy = points[points["collapsed"] == ""]
            entries = [(curve.name((p["method"], p["recipe"])), p["mean"], p["ci95"]) for _, p in healthy.iterrows()]
            entries += [(init_name(curve.runs, p["setting"]), p["mean"], p["ci95"])
                        for _, p in inits[inits["metric"] == metric].iterrows()]
            entries.sort(key=lambda entry: (-entry[1], entry[0]))
            text = " ".join(f"{'' if not i else '≈ ' if overlap(entries[i - 1], entry) else '> '}{entry[0]} "
                            f"{format_ci(*entry[1:])}" for i, entry in enumerate(entries))
            left_out = [curve.name((p["method"], p["recipe"])) for _, p in points.iterrows() if p["collapsed"]]
            if left_out:
                text += f"; not ranked (collapsed): {', '.join(left_out)}"
            rows.append({"metric": metric_title(metric), UNIT: f"{budget:g}", "ranking": text,
                         column: "; ".join(difference_text(curve, p) for _, p in points.iterrows()
                                           if p["n_paired"] > 0)})
    return pd.DataFrame(rows, columns=["metric", UNIT, "ranking", column])


def difference_text(curve: Curve, point: pd.Series) -> str:
    """A line's paired difference at a budget, "mae +3.00 ± 1.24 *" (* = Holm keeps it), "(collapsed)"
    after a collapsed cell's."""
    star = " *" if point["holm_star"] else ""
    collapsed = " (collapsed)" if point["collapsed"] else ""
    return (f"{curve.name((point['method'], point['recipe']))} "
            f"{format_ci(point['diff'], point['diff_ci95'], signed=True)}{star}{collapsed}")


# ---- the figure ------------------------------------------------------------------------------
def random_init_band(curve: Curve, metric: str) -> tuple[float, float]:
    """Random init's mean and 95% half-width of the metric (a student's metric: its k-NN's)."""
    return init_band(reference_runs(curve.runs), metric)


def init_band(init: pd.DataFrame, metric: str) -> tuple[float, float]:
    """An init cell's mean and 95% half-width of the metric (a student's metric: its k-NN's)."""
    return ci95(cell_values(init, metric) or cell_values(init, BASELINE_METRIC.get(metric, metric)))


def other_inits(curve: Curve) -> list[tuple[str, pd.DataFrame]]:
    """The init cells besides random init (own inits of another architecture), by name."""
    return [(init_name(curve.runs, setting), cell) for setting, cell in init_cells(curve.runs)
            if init_name(curve.runs, setting) != "none"]


INIT_DASHES = [(1, 1.5), (3, 1, 1, 1), (1, 3)]      # one dotted style per other init, in order


def flops_per_budget(curve: Curve) -> float | None:
    """Counted FLOPs per MAE-epoch of budget (the median over the curve's finished runs); None
    when no record counts them."""
    done = curve.runs[(curve.runs["status"] == "done") & curve.runs[BUDGET].notna()]
    if FLOPS not in done:
        return None
    ratios = (done[FLOPS] / done[BUDGET]).dropna()
    return float(ratios.median()) if len(ratios) else None


def mark_collapsed(ax, data: pd.DataFrame, metric: str) -> bool:
    """A collapsed cell drawn hollow: its mean as a white marker ringed in grey over the line's, its
    seeds ringed (`ring_collapsed`); whether the panel has one."""
    if not ring_collapsed(ax, data, BUDGET, metric):
        return False
    for (method, recipe, budget), cell in data.groupby(["method", "recipe", BUDGET]):
        if collapse_note(cell):
            ax.plot([budget], [cell[metric].mean()], marker="o", ms=8, mfc="white", mec=COLLAPSED_COLOUR, mew=1.5,
                    ls="none", zorder=5)
    return True


def plot_curve(curve: Curve, path: Path) -> bool:
    """curve.png: a panel per metric (the primary one first), the metric against the budget (log x)
    per line, mean over seeds with its 95% t-band and each seed's dot, random init's mean and band
    across the panel, any other init's mean dotted, a collapsed cell hollow and grey. False (no
    file) when no run of the curve has finished."""
    points = curve.runs[(curve.runs["status"] == "done") & curve.runs[BUDGET].notna()]
    metrics = [m for m in curve.metrics if points[m].notna().any()]
    if not metrics:
        return False
    palette = method_palette(curve.runs)
    recipes = sorted({recipe for _, recipe in curve.lines})
    dashes = dict(zip(recipes, ["", (4, 2), (1, 2)]))
    inits = dict(zip((name for name, _ in other_inits(curve)), INIT_DASHES))
    columns = min(3, len(metrics))
    fig, axes = plt.subplots(math.ceil(len(metrics) / columns), columns, figsize=(4.4 * columns, 3.6 * math.ceil(
        len(metrics) / columns)), squeeze=False)
    budgets = sorted(points[BUDGET].unique())
    per_budget = flops_per_budget(curve)
    collapsed = False
    for ax, metric in zip(axes.flat, metrics):
        data = points[points[metric].notna()]
        sns.lineplot(data=data, x=BUDGET, y=metric, hue="method", palette=palette, style="recipe",
                     dashes=dashes, errorbar=t_interval, marker="o", legend=False, ax=ax)
        ax.scatter(data[BUDGET], data[metric], s=10, alpha=0.45, zorder=3, c=[palette[m] for m in data["method"]])
        collapsed |= mark_collapsed(ax, data, metric)
        mean, half = random_init_band(curve, metric)
        if not np.isnan(mean):
            ax.axhline(mean, color="gray", ls="--", lw=1)
            if not np.isnan(half):
                ax.axhspan(mean - half, mean + half, color="gray", alpha=0.15, lw=0)
        levels = []
        for name, cell in other_inits(curve):
            level = init_band(cell, metric)[0]
            if not np.isnan(level):
                ax.axhline(level, color="dimgray", dashes=inits[name], lw=1)
                levels.append(level)
        # the axis fits the seeds and the inits' means, not a 2-seed t-band (12.7 standard
        # errors wide): bands that leave the panel are clipped; curve.csv holds them in full
        shown = [*data[metric], mean, *levels]
        pad = max(1.0, 0.15 * (np.nanmax(shown) - np.nanmin(shown)))
        ax.set_ylim(np.nanmin(shown) - pad, np.nanmax(shown) + pad)
        budget_axis(ax, budgets, per_budget)
        ax.set_title(metric_title(metric), fontsize=10)
        ax.set_ylabel("mIoU (%)" if metric == "seg_miou" else "top-1 (%)")
    for ax in axes.flat[len(metrics):]:
        ax.remove()
    fig.legend(handles=legend_handles(curve, points, palette, dashes, inits, collapsed), loc="upper left",
               bbox_to_anchor=(1.0, 0.95), frameon=False, fontsize=9)
    marks = [*(["dotted: other inits"] if inits else []), *(["hollow grey: a collapsed cell"] if collapsed else [])]
    fig.suptitle("metric vs pre-training compute\n(line: mean over seeds; band: 95% t-interval, clipped to the "
                 "panel; dots: single seeds; grey: random init, mean and 95% band)"
                 + (f"\n({'; '.join(marks)})" if marks else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def legend_handles(curve: Curve, points: pd.DataFrame, palette: dict, dashes: dict, inits: dict,
                   collapsed: bool) -> list:
    """One legend for every panel: the methods drawn, the recipes where there are several, random
    init, the other inits, the collapsed marker where a panel has one."""
    handles = [Line2D([], [], color=palette[method], marker="o", label=method)
               for method in dict.fromkeys(method for method, _ in curve.lines) if method in set(points["method"])]
    if len(dashes) > 1:
        handles += [Line2D([], [], color="black", dashes=style or (None, None), label=f"{recipe} recipe")
                    for recipe, style in dashes.items()]
    handles.append(Patch(facecolor="gray", alpha=0.3, edgecolor="gray", ls="--", label="none (random init)"))
    handles += [Line2D([], [], color="dimgray", dashes=style, lw=1, label=name) for name, style in inits.items()]
    if collapsed:
        handles.append(Line2D([], [], marker="o", ms=8, mfc="white", mec=COLLAPSED_COLOUR, mew=1.5, ls="none",
                              label=COLLAPSED_LABEL))
    return handles


def budget_axis(ax, budgets: list[float], per_budget: float | None) -> None:
    """The budgets on a log x axis, labelled in MAE-epochs below and in counted FLOPs above."""
    ax.set_xscale("log")
    ax.set_xlim(budgets[0] / 1.35, budgets[-1] * 1.35)
    ax.set_xticks(budgets)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(f"pre-training compute ({UNIT} of FLOPs, log)", fontsize=9)
    if per_budget is None:
        return
    top = ax.secondary_xaxis("top", functions=(lambda b: b * per_budget, lambda f: f / per_budget))
    top.set_xticks([b * per_budget for b in budgets])
    top.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.2g}"))
    top.xaxis.set_minor_locator(NullLocator())
    top.set_xlabel("counted FLOPs", fontsize=8)
    top.tick_params(labelsize=7)


# ---- the page, the CSV, the README block ------------------------------------------------------
FIGURE = "curve.png"


def legends(curve: Curve) -> dict[str, str]:
    label = curve.pairing.label
    partner = ("its own init, the untrained encoder of the same architecture" if curve.pairing.own_init else
               "the random init run")
    return {
        "verdict": (f"Break-even: the smallest budget at which a method's paired difference to {label} (run minus "
                    f"{partner}, seed by seed) has a 95% t-interval above 0, there and at every "
                    "larger budget measured (each budget's own interval, uncorrected; a collapsed cell is never "
                    f"above 0); on {metric_title(verdict_metric(curve) or '')} in the line above, every metric "
                    f"below. Primary metric: k-NN mean ([CLS] gets no loss in MAE, pixel or BEiT and swings up to 7 "
                    "points between seeds)."),
        "figure": (f"x: the pre-training budget in {UNIT} of FLOPs (every method trained for the FLOPs of that many "
                   "epochs of MAE, under warm-up / stable / decay; log scale), with the FLOPs the records counted "
                   "on the top axis. The inits do not pre-train: none (random init)'s band and any other init's "
                   "dotted mean are the same at every budget. A collapsed cell is drawn hollow and grey."),
        "break_even": (f"Budget ({UNIT}) and the paired difference there (mean ± 95% CI over seeds); not within B = "
                       "no budget from which on every measured budget up to the largest, B, is above 0 (one seed "
                       "gives no interval); no paired seed = no seed both finished; collapsed at = the budgets "
                       "whose cell collapsed."),
        "ranking": (f"Lines and inits ordered by mean (± 95% CI over seeds) at each budget; ≈ = the two "
                    "neighbours' CIs overlap (a tie within noise; one seed has no CI and ties with all), > = they "
                    f"do not; a collapsed cell is not ranked. Δ {label}: each line's paired difference to "
                    f"{label} (mean ± uncorrected 95% CI). Stars: Holm-corrected over the {holm_family(curve)} "
                    "paired differences of curve.csv (every method at every budget and metric, collapsed cells "
                    f"left out), alpha {ALPHA:g}."),
    }


def markdown_block(curve: Curve, figure: str | None = FIGURE) -> str:
    """The README block of a curve: verdict, figure (`figure`: its path from the README; None
    leaves it out), break-even budgets and ranking, with their legends."""
    say = legends(curve)
    md = [f"**{verdict(curve)}**", "", say["verdict"], ""]
    if figure is not None:
        md += [f"![budget curve]({figure})", "", say["figure"], ""]
    md += ["#### Break-even budget", "", say["break_even"], "",
           break_even_table(curve).to_markdown(index=False), "",
           "#### Ranking at each budget", "", say["ranking"], "",
           ranking_table(curve).to_markdown(index=False), ""]
    return "\n".join(md)


def curve_markdown(index_file: Path, figure: str | None = FIGURE) -> str:
    """The README block of the curve whose suite index is `index_file`, from its run records alone
    (ValueError when the suite is not a curve)."""
    index = read_index(Path(index_file))
    curve = curve_of(index, load_index(Path(index_file), index))
    if curve is None:
        raise ValueError(f"{index_file}: no entry names a budget ({BUDGET}); not a curve (suites.run --curve)")
    return markdown_block(curve, figure)


# the project's rule for seeds: a primary cell whose 95% half-width is above 2 points gets 5 seeds
WIDE_HALF_WIDTH, SEEDS_FOR_WIDE = 2.0, 5
TUNED_DIR = Path(__file__).resolve().parents[1] / "results" / "tuned"     # suites.tune's choices


def seeds_wanted(curve: Curve) -> pd.DataFrame:
    """The primary metric's cells whose 95% half-width is above WIDE_HALF_WIDTH with fewer than
    SEEDS_FOR_WIDE seeds: where to add seeds (`--seeds 5`) before reading them."""
    table = curve.table
    wide = table[(table["metric"] == PRIMARY_METRIC) & (table["ci95"] > WIDE_HALF_WIDTH)
                 & (table["n"] < SEEDS_FOR_WIDE)]
    return pd.DataFrame({"method": wide["method"], "recipe": wide["recipe"], "MAE-epochs": wide[BUDGET],
                         "seeds": wide["n"], "95% half-width": wide["ci95"].round(2)})


def tuning_table(profile: str) -> pd.DataFrame | None:
    """The lrs `--recipe tuned` trains at (results/tuned/<profile>.json): each method's choice and
    every held-out score of its grid; None when none was tuned at the profile."""
    path = TUNED_DIR / f"{profile}.json"
    if not path.exists():
        return None
    rows = []
    for method, entry in read_json(path).items():
        scores = ", ".join(f"{lr}: {score:.2f}" if score is not None else f"{lr}: –"
                           for lr, score in entry["scores"].items())
        rows.append({"method": method, "blr": f"{entry['blr']:g}" + ("" if entry["bracketed"] else " (edge)"),
                     "criterion": f"{entry['criterion']} at {max(entry['budgets_mae_epochs']):g} {UNIT}, "
                                  f"seed {entry['seed']}", "held-out score per blr": scores})
    return pd.DataFrame(rows)


def extra_sections(curve: Curve, profile: str | None) -> list[str]:
    """Where seeds are short of the rule, and (a tuned curve) how each lr was chosen."""
    parts = []
    wanted = seeds_wanted(curve)
    if len(wanted):
        parts += ["<h2>Seeds to add</h2>",
                  f"<p>{html.escape(f'Cells of the primary metric whose 95% half-width is above {WIDE_HALF_WIDTH:g} points with fewer than {SEEDS_FOR_WIDE} seeds: run them with --seeds {SEEDS_FOR_WIDE} before reading them.')}</p>",
                  wanted.to_html(index=False)]
    tuned = tuning_table(profile) if profile and any(recipe == "tuned" for _, recipe in curve.lines) else None
    if tuned is not None:
        parts += ["<h2>Tuned learning rates</h2>",
                  "<p>Each method's constant trunk lr under --recipe tuned, chosen by python -m suites.tune on "
                  "the held-out 5k of train (k-NN with the rest of train as memory; the test split unread).</p>",
                  tuned.to_html(index=False)]
    return parts


def curve_section(curve: Curve, out_dir: Path, profile: str | None = None) -> list[str]:
    """The curve's part of the suite page, first on it: the verdict, the figure, the break-even
    budgets and the ranking, then the seeds to add and the tuned lrs (`extra_sections`); writes
    curve.png, curve.csv and curve.md into `out_dir`."""
    say = legends(curve)
    curve.table.to_csv(out_dir / "curve.csv", index=False, float_format="%.6g")
    made = plot_curve(curve, out_dir / FIGURE)
    (out_dir / "curve.md").write_text(markdown_block(curve, FIGURE if made else None))
    parts = [f'<p class="verdict"><b>{html.escape(verdict(curve))}</b></p>', f"<p>{html.escape(say['verdict'])}</p>"]
    if made:
        parts += [img_tag(out_dir / FIGURE), f"<p>{html.escape(say['figure'])}</p>"]
    parts += ["<h2>Break-even budget</h2>", f"<p>{html.escape(say['break_even'])}</p>",
              break_even_table(curve).to_html(index=False, na_rep="–"),
              "<h2>Ranking at each budget</h2>", f"<p>{html.escape(say['ranking'])}</p>",
              ranking_table(curve).to_html(index=False, na_rep="–")]
    return parts + extra_sections(curve, profile)
