"""A budget curve (`python -m suites.run compare_methods --curve 0.5,1,2.5,5ep`) as the report reads
it: each method's metric against pre-training compute, and the smallest budget at which it beats
its baseline, from the suite index (a curve cell's entry names its budget, `mae_epochs`:
runs.index) and the run records alone.

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
from typing import Callable, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullLocator

from reports.plots import img_tag, method_palette, t_interval
from reports.ranking import overlap
from reports.tables import (BASELINE, BASELINE_METRIC, NO_RECIPE, PROTOCOLS, ci95, cell_values, finished_baseline,
                            format_ci, load_index, paired_diffs, read_index)

BUDGET = "mae_epochs"           # the key of a curve cell's budget in its index entry (runs.index.entry)
UNIT = "MAE-epochs"
FLOPS = "pretrain_flops_total"  # a record's counted pre-training FLOPs, as load_index names its column
# the metric the verdict reads, the first the curve has: mean-pooled k-NN moves least from seed to
# seed at these budgets (README: under 2.3 points, [CLS] k-NN up to 7)
VERDICT_METRICS = ("knn_top1_mean", "linear_top1_mean", "knn_top1_cls", "linear_top1_cls", "finetune_top1",
                   "seg_miou")
METRIC_NAMES = {"knn_top1_cls": "k-NN [CLS]", "knn_top1_mean": "k-NN mean", "knn_student_top1_cls":
                "student k-NN [CLS]", "knn_student_top1_mean": "student k-NN mean", "linear_top1_cls":
                "linear [CLS]", "linear_top1_mean": "linear mean", "finetune_top1": "fine-tune",
                "seg_miou": "segmentation mIoU"}
CSV_COLUMNS = ["method", "recipe", BUDGET, "metric", "mean", "ci95", "n", "diff", "diff_ci95", "n_paired",
               "baseline", "flops"]

Line = tuple[str, str]          # a curve's line: (method, recipe)


@dataclass(frozen=True)
class Baseline:
    """What each line of the curve is paired with, seed by seed. Today the `none` runs (random
    init) for every method (`random_init`); a method's own initialisation is another mapping."""
    label: str                              # as the verdict and the CSV name it: "random init"
    runs: Mapping[Line, pd.DataFrame]       # a line -> its baseline's finished runs, indexed by seed


def random_init(runs: pd.DataFrame, lines: list[Line]) -> Baseline:
    # a `none` run listed twice (once per recipe of an earlier command) pairs once
    none = finished_baseline(runs.drop_duplicates("run"))
    return Baseline("random init", {line: none for line in lines})


@dataclass(frozen=True)
class Curve:
    runs: pd.DataFrame          # the suite's runs (load_index) with their budget (NaN: the baseline)
    lines: list[Line]           # every pre-trained cell of the grid, in its order
    metrics: list[str]          # those some finished run of the curve has
    baseline: Baseline
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


# (the suite's runs, the curve's lines) -> what each line is paired with
BaselineOf = Callable[[pd.DataFrame, list[Line]], Baseline]


def curve_of(index: dict, runs: pd.DataFrame, baseline_of: BaselineOf = random_init) -> Curve | None:
    """The suite's curve from its index and `load_index`'s table of its runs (the same order);
    None when no entry names a budget."""
    budgets = pd.to_numeric(pd.Series([entry.get(BUDGET) for entry in index["runs"]], index=runs.index,
                                      dtype=object), errors="coerce")
    if budgets.isna().all():
        return None
    runs = runs.assign(**{BUDGET: budgets}).drop_duplicates("run")
    on_curve = runs[runs[BUDGET].notna()]
    lines = list(dict.fromkeys(zip(on_curve["method"], on_curve["recipe"])))
    done = on_curve[on_curve["status"] == "done"]
    metrics = [m for m in PROTOCOLS if m in done and done[m].notna().any()]
    baseline = baseline_of(runs, lines)
    return Curve(runs, lines, metrics, baseline, curve_table(runs, lines, metrics, baseline))


def curve_table(runs: pd.DataFrame, lines: list[Line], metrics: list[str], baseline: Baseline) -> pd.DataFrame:
    """curve.csv: per line, budget and metric the mean, 95% CI half-width and seeds of the finished
    runs, and the paired difference to the line's baseline with its CI and pairs (mean counted
    FLOPs too); the random-init runs first, with no budget (the same at every budget)."""
    rows = []
    none = runs[runs["method"] == BASELINE]
    for metric in metrics:
        rows.append(table_row(BASELINE, NO_RECIPE, math.nan, metric, cell_values(none, metric), None, none))
    for line in lines:
        on_line = runs[(runs["method"] == line[0]) & (runs["recipe"] == line[1]) & runs[BUDGET].notna()]
        for budget, cell in on_line.groupby(BUDGET, sort=True):
            for metric in metrics:
                diffs = paired_diffs(cell, baseline.runs[line], metric)
                rows.append({**table_row(*line, budget, metric, cell_values(cell, metric), diffs, cell),
                             "baseline": baseline.label})
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def table_row(method: str, recipe: str, budget: float, metric: str, values: list[float],
              diffs: list[float] | None, cell: pd.DataFrame) -> dict:
    mean, half = ci95(values)
    diff, diff_half = ci95(diffs or [])
    flops = cell_values(cell, FLOPS)
    return {"method": method, "recipe": recipe, BUDGET: budget, "metric": metric, "mean": mean, "ci95": half,
            "n": len(values), "diff": diff, "diff_ci95": diff_half, "n_paired": len(diffs or []),
            "baseline": "", "flops": np.mean(flops) if flops else math.nan}


def break_even(table: pd.DataFrame, line: Line, metric: str) -> float | None:
    """The smallest budget whose paired difference to the line's baseline has its 95% CI above 0;
    None when none has (one seed gives no interval: never)."""
    rows = table[(table["method"] == line[0]) & (table["recipe"] == line[1]) & (table["metric"] == metric)]
    above = rows[rows["diff"] - rows["diff_ci95"] > 0]      # NaN (no interval) compares False
    return float(above[BUDGET].min()) if len(above) else None


def budget_text(budget: float) -> str:
    return f"{budget:g} {UNIT if budget != 1 else UNIT[:-1]}"


def verdict_metric(curve: Curve) -> str | None:
    return next((m for m in VERDICT_METRICS if m in curve.metrics), curve.metrics[0] if curve.metrics else None)


def verdict(curve: Curve) -> str:
    """One line: at which budget each measured method first beats its baseline on the verdict's
    metric ("mae first beats random init (k-NN mean) at 2.5 MAE-epochs; pixel never does up to 5
    MAE-epochs"), and which methods have no finished run yet."""
    metric = verdict_metric(curve)
    if metric is None:
        return "No run of the curve has finished yet."
    label, said = curve.baseline.label, []
    for line in filter(curve.measured, curve.lines):
        budget = break_even(curve.table, line, metric)
        if budget is not None:
            said.append(f"{curve.name(line)} first beats {label} ({METRIC_NAMES.get(metric, metric)}) at "
                        f"{budget_text(budget)}")
        else:
            on_line = curve.runs_of(line)
            largest = on_line.loc[on_line["status"] == "done", BUDGET].max()
            said.append(f"{curve.name(line)} never does up to {budget_text(largest)}" if said else
                        f"{curve.name(line)} does not beat {label} ({METRIC_NAMES.get(metric, metric)}) up to "
                        f"{budget_text(largest)}")
    missing = [curve.name(line) for line in curve.lines if not curve.measured(line)]
    if missing:
        said.append(f"no finished run yet: {', '.join(missing)}")
    return "; ".join(said) + "."


def break_even_table(curve: Curve) -> pd.DataFrame:
    """Per line and metric, its break-even budget with the paired difference there
    ("2.5 (+1.20 ± 0.80)"), else "not reached up to B" (the largest budget it has finished)."""
    rows = []
    for line in filter(curve.measured, curve.lines):
        row = {"method": curve.name(line)}
        for metric in curve.metrics:
            points = curve.table[(curve.table["method"] == line[0]) & (curve.table["recipe"] == line[1])
                                 & (curve.table["metric"] == metric)]
            budget = break_even(curve.table, line, metric)
            if budget is not None:
                at = points[points[BUDGET] == budget].iloc[0]
                row[metric] = f"{budget:g} ({format_ci(at['diff'], at['diff_ci95'], signed=True)})"
            elif (points["n_paired"] > 0).any():
                row[metric] = f"not reached up to {points.loc[points['n'] > 0, BUDGET].max():g}"
            else:
                row[metric] = "no paired seed"
        rows.append(row)
    return pd.DataFrame(rows, columns=["method", *curve.metrics]).rename(columns=METRIC_NAMES)


def ranking_table(curve: Curve) -> pd.DataFrame:
    """Per metric and budget, the lines and random init ordered by mean, "mae 43.20 ± 1.00 > none
    41.00 ± 0.50 ≈ pixel ...": ≈ where the two neighbours' 95% CIs overlap (a one-seed mean
    overlaps everything), > where they do not."""
    rows = []
    table = curve.table[curve.table["n"] > 0]
    none = table[table["method"] == BASELINE].set_index("metric")
    for metric in curve.metrics:
        on_curve = table[(table["metric"] == metric) & table[BUDGET].notna()]
        for budget, points in on_curve.groupby(BUDGET, sort=True):
            entries = [(curve.name((p["method"], p["recipe"])), p["mean"], p["ci95"]) for _, p in points.iterrows()]
            if metric in none.index:
                entries.append((f"{BASELINE}", none.loc[metric, "mean"], none.loc[metric, "ci95"]))
            entries.sort(key=lambda entry: (-entry[1], entry[0]))
            text = f"{entries[0][0]} {format_ci(*entries[0][1:])}"
            for above, entry in zip(entries, entries[1:]):
                text += f" {'≈' if overlap(above, entry) else '>'} {entry[0]} {format_ci(*entry[1:])}"
            rows.append({"metric": METRIC_NAMES.get(metric, metric), UNIT: f"{budget:g}", "ranking": text})
    return pd.DataFrame(rows, columns=["metric", UNIT, "ranking"])


# ---- the figure ------------------------------------------------------------------------------
def random_init_band(curve: Curve, metric: str) -> tuple[float, float]:
    """Random init's mean and 95% half-width of the metric (a student's metric: its k-NN's)."""
    none = curve.runs[curve.runs["method"] == BASELINE]
    values = cell_values(none, metric) or cell_values(none, BASELINE_METRIC.get(metric, metric))
    return ci95(values)


def flops_per_budget(curve: Curve) -> float | None:
    """Counted FLOPs per MAE-epoch of budget (the median over the curve's finished runs); None
    when no record counts them."""
    done = curve.runs[(curve.runs["status"] == "done") & curve.runs[BUDGET].notna()]
    if FLOPS not in done:
        return None
    ratios = (done[FLOPS] / done[BUDGET]).dropna()
    return float(ratios.median()) if len(ratios) else None


def plot_curve(curve: Curve, path: Path) -> bool:
    """curve.png: a panel per metric, the metric against the budget (log x) per line, mean over
    seeds with its 95% t-band and each seed's dot, random init's mean and band across the panel.
    False (no file) when no run of the curve has finished."""
    points = curve.runs[(curve.runs["status"] == "done") & curve.runs[BUDGET].notna()]
    metrics = [m for m in curve.metrics if points[m].notna().any()]
    if not metrics:
        return False
    palette = method_palette(curve.runs)
    recipes = sorted({recipe for _, recipe in curve.lines})
    dashes = dict(zip(recipes, ["", (4, 2), (1, 2)]))
    columns = min(3, len(metrics))
    fig, axes = plt.subplots(math.ceil(len(metrics) / columns), columns, figsize=(4.4 * columns, 3.6 * math.ceil(
        len(metrics) / columns)), squeeze=False)
    budgets = sorted(points[BUDGET].unique())
    per_budget = flops_per_budget(curve)
    for ax, metric in zip(axes.flat, metrics):
        data = points[points[metric].notna()]
        sns.lineplot(data=data, x=BUDGET, y=metric, hue="method", palette=palette, style="recipe",
                     dashes=dashes, errorbar=t_interval, marker="o", legend=False, ax=ax)
        ax.scatter(data[BUDGET], data[metric], s=10, alpha=0.45, zorder=3, c=[palette[m] for m in data["method"]])
        mean, half = random_init_band(curve, metric)
        if not np.isnan(mean):
            ax.axhline(mean, color="gray", ls="--", lw=1)
            if not np.isnan(half):
                ax.axhspan(mean - half, mean + half, color="gray", alpha=0.15, lw=0)
        # the axis fits the seeds and random init's mean, not a 2-seed t-band (12.7 standard
        # errors wide): bands that leave the panel are clipped; curve.csv holds them in full
        shown = [*data[metric], mean]
        pad = max(1.0, 0.15 * (np.nanmax(shown) - np.nanmin(shown)))
        ax.set_ylim(np.nanmin(shown) - pad, np.nanmax(shown) + pad)
        budget_axis(ax, budgets, per_budget)
        ax.set_title(METRIC_NAMES.get(metric, metric), fontsize=10)
        ax.set_ylabel("mIoU (%)" if metric == "seg_miou" else "top-1 (%)")
    for ax in axes.flat[len(metrics):]:
        ax.remove()
    fig.legend(handles=legend_handles(curve, points, palette, dashes), loc="upper left", bbox_to_anchor=(1.0, 0.95),
               frameon=False, fontsize=9)
    fig.suptitle("metric vs pre-training compute\n(line: mean over seeds; band: 95% t-interval, clipped to the "
                 "panel; dots: single seeds; grey: random init, mean and 95% band)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def legend_handles(curve: Curve, points: pd.DataFrame, palette: dict, dashes: dict) -> list:
    """One legend for every panel: the methods drawn, the recipes where there are several, random init."""
    handles = [Line2D([], [], color=palette[method], marker="o", label=method)
               for method in dict.fromkeys(method for method, _ in curve.lines) if method in set(points["method"])]
    if len(dashes) > 1:
        handles += [Line2D([], [], color="black", dashes=style or (None, None), label=f"{recipe} recipe")
                    for recipe, style in dashes.items()]
    handles.append(Patch(facecolor="gray", alpha=0.3, edgecolor="gray", ls="--", label=f"{BASELINE} (random init)"))
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
    label = curve.baseline.label
    return {
        "verdict": (f"Break-even: the smallest budget at which a method's paired difference to {label} (run minus "
                    f"{label} run of the same seed) has a 95% t-interval above 0; on "
                    f"{METRIC_NAMES.get(verdict_metric(curve) or '', 'its first metric')} in the line above, every "
                    "metric below."),
        "figure": (f"x: the pre-training budget in {UNIT} of FLOPs (every method trained for the FLOPs of that many "
                   "epochs of MAE, under warm-up / stable / decay; log scale), with the FLOPs the records counted "
                   f"on the top axis. {BASELINE} (random init) does not pre-train: its band is the same at every "
                   "budget."),
        "break_even": (f"Budget ({UNIT}) and the paired difference there (mean ± 95% CI over seeds); not reached = "
                       "at no budget finished (one seed gives no interval); no paired seed = no seed both finished."),
        "ranking": ("Lines and random init ordered by mean (± 95% CI over seeds) at each budget; ≈ = the two "
                    "neighbours' CIs overlap (a tie within noise; one seed has no CI and ties with all), > = they "
                    "do not."),
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


def curve_markdown(index_file: Path, figure: str | None = FIGURE, baseline_of: BaselineOf = random_init) -> str:
    """The README block of the curve whose suite index is `index_file`, from its run records alone
    (ValueError when the suite is not a curve)."""
    index = read_index(Path(index_file))
    curve = curve_of(index, load_index(Path(index_file), index), baseline_of)
    if curve is None:
        raise ValueError(f"{index_file}: no entry names a budget ({BUDGET}); not a curve (suites.run --curve)")
    return markdown_block(curve, figure)


def curve_section(curve: Curve, out_dir: Path) -> list[str]:
    """The curve's part of the suite page, first on it: the verdict, the figure, the break-even
    budgets and the ranking; writes curve.png, curve.csv and curve.md into `out_dir`."""
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
    return parts
