"""Build the report of every suite found under outputs/suites (or the ones named):

    python -m reports.build [suite ...] [--outputs outputs] [--out reports/out] [--readme README.md]

Per suite and profile: table.md / table.csv / index.html (self-contained) with mean ± 95% CI
over seeds per cell (method, setting, recipe), the paired difference of each run to its own init
(the untrained encoder of its architecture and seed; `none` in an index from before `init_run`)
with its CI, starred where a Holm correction over the table keeps it (paired_differences.csv),
collapsed cells labelled and never starred or ranked, the smallest
difference each cell's seeds can detect (detectable_differences.csv), the methods ranked under
each recipe side by side when a suite has both (ranking_by_recipe.csv), failed/missing runs
shown as such, plots (metric vs mask ratio, metric vs pre-training FLOPs, loss curves), the
run folders' figures, and the papers' numbers in separate, labelled columns. A budget curve's
page (`suites.run compare_methods --curve`, folder <profile>-curve) opens with its verdict, the
metric against pre-training FLOPs per method, the break-even budgets and the ranking at each
budget (curve.png / curve.csv / curve.md: reports.curve). Reads only run records, through
`runs.records`: never imports methods, engine, eval or torch.

A result.json that does not parse or validate (cut short, hand-edited, from a newer mimbench) is
named in a warning and its run listed as `unreadable`; the suite's other runs are reported, and
the README block of such a suite is left as it was. A damaged runs.json skips its suite. Exit
code 1 when no suite could be built for such damage, 2 on bad input.
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from reports import papers  # noqa: E402
from reports.curve import curve_of, curve_section  # noqa: E402
from reports.plots import COLLAPSED_LABEL, img_tag, method_palette, ring_collapsed, t_interval  # noqa: E402
from reports.ranking import flip_lines, ranking_by_recipe  # noqa: E402
from reports.tables import (ALPHA, BASELINE, CELL, NO_RECIPE, PRIMARY_METRIC, RUNS_FROM_INDEX, ci95,  # noqa: E402
                            collapse_note, detectable_differences, family_size, format_ci, holm, is_init, load_index,
                            metric_columns, paired_diffs, paired_p_value, pairing_of, read_index, reference_runs,
                            summarize, text_column, warn)
from runs.records import RecordError  # noqa: E402


class ReportError(ValueError):
    """Input the report cannot be built from as it stands (the records, the README's block); the
    message names the problem and the fix, and main prints it on one line."""


def paired_differences(runs: pd.DataFrame, metrics: list[str]) -> tuple[pd.DataFrame, int]:
    """Per pre-trained cell (method, setting, recipe): mean ± CI of (run - its own init, same seed)
    for every metric, `+3.20 ± 1.10 *` where Holm's correction over every cell x metric difference
    of the table keeps it; a collapsed cell's differences are shown, labelled, and left out of the
    family (never starred); a cell with no finished run gets a row of `–`. Also how many
    differences the family holds. An index from before `init_run` pairs with its one `none` cell."""
    cells = runs.loc[runs["method"] == BASELINE, "setting"].unique()
    unnamed = text_column(runs, "init_run").eq("") & ~is_init(runs)
    if len(cells) > 1 and unnamed.any():
        raise ReportError(f"the suite has {len(cells)} `{BASELINE}` cells ({', '.join(map(repr, cells))}) and runs "
                          f"whose index entry names no init_run; paired with `{BASELINE}` by seed, they need one: "
                          f"keep a single RunSpec({BASELINE!r}, ...)")
    pairing = pairing_of(runs)
    rows, tests = [], {}            # (row, column) -> p of the paired t-test, for Holm
    for (method, setting, recipe), cell in runs[~is_init(runs)].groupby(CELL, sort=False):
        row = {"method": method, "setting": setting, "recipe": recipe}
        collapsed = collapse_note(cell)
        for metric in metrics:
            diffs = paired_diffs(cell, pairing, metric)
            row[f"Δ {metric}"] = format_ci(*ci95(diffs), len(diffs), int((cell["status"] == "done").sum()),
                                           signed=True)
            if not collapsed:
                tests[(len(rows), f"Δ {metric}")] = paired_p_value(diffs)
        rows.append({**row, "collapsed": collapsed})
    for (i, column), star in zip(tests, holm(list(tests.values()))):
        rows[i][column] += " *" if star else ""
    table = pd.DataFrame(rows)
    if table.empty or table["collapsed"].eq("").all():
        table = table.drop(columns="collapsed", errors="ignore")
    return table, family_size(tests.values())


RECIPE_LEGEND = ("recipe: paper = pre-trained at the method's paper recipe, shared = at the one recipe all "
                 f"methods share, {NO_RECIPE} = none and any other init, which do not pre-train and are the "
                 "baselines of every recipe's cells.")
COLLAPSED_LEGEND = ("collapsed: a run of the cell collapsed (its method's monitor; the reason per seed); its numbers "
                    "are shown, never starred and never ranked.")


def difference_legend(label: str, family: int) -> str:
    """The paired-difference table's caption: what it pairs with, and the family its stars are
    corrected over."""
    pairs = ("the run of its own init (the untrained encoder of its architecture and seed)" if label == "own init"
             else "the none run (random init) of the same seed")
    return (f"Paired by seed: mean ± 95% CI of (cell - {label}) over the seeds both finished, each run against "
            f"{pairs}; – = no seed where both finished. A student k-NN is paired with its init's k-NN. Stars: "
            f"Holm-corrected over the {family} paired differences of this table (every cell x metric with two or "
            f"more paired seeds, collapsed cells left out), alpha {ALPHA:g}; the ± is each difference's uncorrected "
            "interval.")


def detectable_legend(label: str) -> str:
    return ("Half-width of the 95% t-interval of each cell's mean (metric columns) and of its paired "
            f"difference to {label} (Δ columns): a difference smaller than this could not be told from "
            "zero at these seeds. n/a (1 seed) = one seed gives no interval; – = no value.")


RANKING_LEGEND = ("Methods ordered by mean under each pre-training recipe (mean ± 95% CI over seeds), "
                  f"{PRIMARY_METRIC} (the primary metric: [CLS] gets no loss in MAE, pixel or BEiT and swings up to "
                  "7 points between seeds) first; where a suite has several settings per method, its compute-matched "
                  "block (reports.ranking.ranking_cells). none does not pre-train and is ranked under both. A "
                  "collapsed cell is not ranked.")


def baseline_footnote(runs: pd.DataFrame, metrics: list[str]) -> list[str]:
    """The note that says how the baseline was fine-tuned and segmented, when a table shows
    those metrics for it: a from-scratch recipe (layer decay 1.0) unlike the pre-trained
    encoders, or, in records from before that recipe, the layer decay it had; [] otherwise."""
    base = runs[(runs["method"] == BASELINE) & (runs["status"] == "done")]
    shown = {}
    for evaluation, metric, verb in (("finetune", "finetune_top1", "fine-tuned"),
                                     ("segmentation", "seg_miou", "segmented")):
        if metric in metrics and metric in base and base[metric].notna().any():
            column = f"{evaluation} layer_decay"
            decays = base.loc[base[metric].notna(), column] if column in base else pd.Series(dtype=float)
            shown[verb] = sorted(set(decays.dropna()))
    if not shown:
        return []

    def how(decays: list[float]) -> str:
        if decays == [1.0]:
            return "with a from-scratch recipe (layer decay 1.0)"
        if not decays:
            return "with a layer decay its record does not name"
        return (f"with layer decay {' or '.join(f'{d:g}' for d in decays)} (a record from before the "
                "from-scratch recipe, layer decay 1.0)")

    recipes = {verb: how(decays) for verb, decays in shown.items()}
    if "fine-tuned" in recipes and "finetune blr_sweep" in base and base["finetune blr_sweep"].eq(True).any():
        recipes["fine-tuned"] += " and its lr chosen on the held-out part of train"
    if len(set(recipes.values())) == 1:
        said = f"{' and '.join(recipes)} {next(iter(recipes.values()))}"
    else:
        said = "; ".join(f"{verb} {text}" for verb, text in recipes.items())
    return [f"{BASELINE}: {said}, pre-trained encoders at their profile's layer decay"]


def with_paper_columns(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    rows = [papers.ABLATIONS.get((m, s)) or papers.REFERENCE.get(m) or [None] * 5
            for m, s in zip(table["method"], table["setting"])]
    for i, column in enumerate(papers.COLUMNS):
        table[column] = [row[i] or "–" for row in rows]
    return table


def setting_labels(runs: pd.DataFrame, settings: pd.Series | None = None) -> list[str]:
    """Each run's setting (or `settings`) as the plots name it: with its recipe when the suite
    pre-trains at several ("5 epochs, paper recipe"), so that cells differing by recipe alone
    are never pooled into one point."""
    settings = runs["setting"] if settings is None else settings
    recipes = runs["recipe"] if "recipe" in runs else pd.Series(NO_RECIPE, index=runs.index)
    several = recipes[recipes != NO_RECIPE].nunique() > 1
    return [f"{setting}, {recipe} recipe" if several and recipe != NO_RECIPE else setting
            for setting, recipe in zip(settings, recipes)]


def draw_baseline(ax, runs: pd.DataFrame, metric: str) -> float:
    """The `none` baseline's mean over its finished seeds, drawn as a dashed line; NaN (and no
    line) without one."""
    reference = reference_runs(runs)
    level = reference.loc[reference["status"] == "done", metric].mean()
    if pd.notna(level):
        ax.axhline(level, color="gray", ls="--", lw=1, label="none (random init)")
    return level


def plot_vs_ratio(runs: pd.DataFrame, metrics: list[str], path: Path) -> bool:
    if "mask.ratio" not in runs.columns or not metrics:
        return False
    data = runs[(runs["status"] == "done") & runs["mask.ratio"].notna()]
    # a line joins a method's settings that differ in the ratio alone ("raw pixels, block 0.4" and
    # "raw pixels, block 0.6"), so two settings never pool into one point; a setting with one
    # ratio is a lone marker, and the plot needs at least one line
    family = "setting, ratio aside"
    data = data.assign(**{family: setting_labels(data, pd.Series(
        [setting.removesuffix(f" {ratio:g}") for setting, ratio in zip(data["setting"], data["mask.ratio"])],
        index=data.index))})
    if not (data.groupby(["method", family])["mask.ratio"].transform("nunique") >= 2).any():
        return False
    # a panel per protocol measured in at least two cells: one point shows no trend (a suite's
    # cells can carry another suite's evaluations through a shared run)
    data = data.assign(cell=setting_labels(data))
    metrics = [m for m in metrics if m in data and data.loc[data[m].notna(), "cell"].nunique() >= 2]
    if data.empty or not metrics:
        return False
    data = data.assign(collapsed=text_column(data, "collapsed"))
    long = data.melt(id_vars=["method", family, "mask.ratio", "seed", "collapsed"], value_vars=metrics,
                     var_name="protocol", value_name="top-1 / mIoU (%)")
    palette = method_palette(runs)
    grid = sns.relplot(data=long, x="mask.ratio", y="top-1 / mIoU (%)", hue="method", style=family,
                       col="protocol", col_order=metrics, kind="line", markers=True, dashes=False,
                       errorbar=t_interval, palette=palette, height=3.2, aspect=1.1, facet_kws={"sharey": False})
    collapsed = False
    for ax, metric in zip(grid.axes.flat, metrics):
        seeds = long[long["protocol"] == metric]
        ax.scatter(seeds["mask.ratio"], seeds["top-1 / mIoU (%)"], s=9, alpha=0.45, zorder=3,
                   c=[palette[m] for m in seeds["method"]])
        collapsed |= ring_collapsed(ax, seeds, "mask.ratio", "top-1 / mIoU (%)")
        shown = [*seeds["top-1 / mIoU (%)"].dropna(), draw_baseline(ax, runs, metric)]
        # the axis fits the seeds, not a 2-seed t-interval (12.7 standard errors wide): bands
        # that leave the panel are clipped, the tables print them in full
        pad = max(2.0, 0.15 * (np.nanmax(shown) - np.nanmin(shown)))
        ax.set_ylim(np.nanmin(shown) - pad, np.nanmax(shown) + pad)
    grid.figure.suptitle("accuracy vs mask ratio per protocol (line: mean over seeds; dots: single seeds; "
                         "band: 95% t-interval, clipped to the panel; dashed: none"
                         + (f"; grey rings: {COLLAPSED_LABEL}" if collapsed else "") + ")", y=1.03, fontsize=9)
    grid.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(grid.figure)
    return True


def plot_vs_flops(runs: pd.DataFrame, metrics: list[str], path: Path) -> bool:
    column = "pretrain_flops_total"
    if column not in runs.columns:
        return False
    data = runs[(runs["status"] == "done") & runs[column].notna()]
    metrics = [m for m in metrics if data[m].notna().any()]
    if data.empty or not metrics:
        return False
    long = data.assign(tflops=data[column] / 1e12, setting=setting_labels(data),
                       collapsed=text_column(data, "collapsed")).melt(
        id_vars=["method", "setting", "tflops", "collapsed"], value_vars=metrics, var_name="protocol",
        value_name="top-1 / mIoU (%)")
    grid = sns.relplot(data=long, x="tflops", y="top-1 / mIoU (%)", hue="method", style="setting",
                       col="protocol", col_order=metrics, col_wrap=min(3, len(metrics)), kind="scatter",
                       s=70, palette=method_palette(runs), height=3.2, aspect=1.1,
                       facet_kws={"sharey": False})
    collapsed = False
    for ax, metric in zip(grid.axes.flat, metrics):
        draw_baseline(ax, runs, metric)
        collapsed |= ring_collapsed(ax, long[long["protocol"] == metric], "tflops", "top-1 / mIoU (%)")
    grid.set_xlabels("pre-training compute (TFLOP, counted)")
    grid.figure.suptitle("accuracy vs pre-training compute per protocol (dots: single seeds; dashed: none"
                         + (f"; grey rings: {COLLAPSED_LABEL}" if collapsed else "") + ")", y=1.03, fontsize=9)
    grid.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(grid.figure)
    return True


# logged quantities that make a collapse visible (iBOT: the teacher's output entropy falls to
# zero and its centre's norm runs away when every image maps to one prototype)
MONITORS = ("entropy", "center_norm")


def training_curves(runs: pd.DataFrame, run_root: Path) -> pd.DataFrame:
    """Long table (run, method, step, name, value) of every logged scalar of each setting's
    first seed; a collapsed run's name says so."""
    rows = []
    first = runs[~is_init(runs) & (runs["seed"] == runs["seed"].min())]
    collapsed = text_column(first, "collapsed") != ""
    for (_, run), setting, gone in zip(first.iterrows(), setting_labels(first), collapsed):
        metrics_file = run_root / run["run"] / "metrics.jsonl"
        if not metrics_file.exists():
            continue
        for line in metrics_file.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue        # blank, or the last line of a run killed mid-write
            if isinstance(record, dict) and "step" in record:
                label = f"{run['method']} {setting}" + (" (collapsed)" if gone else "")
                rows += [{"run": label, "method": run["method"], "step": record["step"], "name": name, "value": value}
                         for name, value in record.items() if name not in ("step", "lr")]
    return pd.DataFrame(rows, columns=["run", "method", "step", "name", "value"])


def plot_losses(curves: pd.DataFrame, path: Path) -> bool:
    data = curves[curves["name"] == "loss"]
    if data.empty:
        return False
    grid = sns.relplot(data=data, x="step", y="value", hue="run", col="method", kind="line",
                       height=3, aspect=1.2, facet_kws={"sharey": False, "sharex": False})
    grid.set_ylabels("loss")
    grid.figure.suptitle("pre-training loss (first seed)", y=1.03)
    grid.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(grid.figure)
    return True


def plot_monitors(curves: pd.DataFrame, path: Path) -> bool:
    data = curves[curves["name"].str.contains("|".join(MONITORS))]
    if data.empty:
        return False
    grid = sns.relplot(data=data, x="step", y="value", hue="run", col="name", kind="line", col_wrap=4,
                       height=3, aspect=1.2, facet_kws={"sharey": False, "sharex": False})
    grid.figure.suptitle("collapse monitors (first seed): teacher entropy in nats, centre norm", y=1.03)
    grid.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(grid.figure)
    return True


def build_suite(index_file: Path, index: dict, runs: pd.DataFrame, out_dir: Path) -> Path:
    """The suite's report pages from its index and its runs' table (`load_index`)."""
    params = pd.DataFrame([e.get("params", {}) for e in index["runs"]])
    runs = pd.concat([runs, params.drop(columns=[c for c in params if c in runs])], axis=1)
    metrics = metric_columns(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = table_sections(runs, metrics, out_dir)
    (out_dir / "table.md").write_text(markdown_page(index, sections))

    run_root = index_file.parent / RUNS_FROM_INDEX
    curves = training_curves(runs, run_root)
    plots = {"vs_mask_ratio.png": plot_vs_ratio(runs, metrics, out_dir / "vs_mask_ratio.png"),
             "vs_flops.png": plot_vs_flops(runs, metrics, out_dir / "vs_flops.png"),
             "loss_curves.png": plot_losses(curves, out_dir / "loss_curves.png"),
             "collapse_monitors.png": plot_monitors(curves, out_dir / "collapse_monitors.png")}
    curve = curve_of(index, runs)       # a --curve suite's page opens with its verdict and figure
    parts = [f"<h1>{html.escape(index['suite'])} — {html.escape(index['profile'])} profile</h1>",
             *(curve_section(curve, out_dir, index.get("profile")) if curve is not None else []),
             *html_sections(sections), *html_status(runs)]
    parts += ["<h2>Plots</h2>"] + [img_tag(out_dir / name) for name, made in plots.items() if made]
    parts += html_figures(runs, run_root)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>mimbench report</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
            "font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}p.verdict{font-size:17px}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>")
    (out_dir / "index.html").write_text(page)
    return out_dir / "index.html"


def table_sections(runs: pd.DataFrame, metrics: list[str], out_dir: Path) -> list[tuple]:
    """(heading, legend, table, notes below it) of each of the suite's tables, for table.md and
    index.html alike; each table also written to `out_dir` as CSV, with the runs' own."""
    table = with_paper_columns(summarize(runs, metrics))
    diffs, family = paired_differences(runs, metrics) if is_init(runs).any() else (pd.DataFrame(), 0)
    detectable = detectable_differences(runs, metrics)
    ranking, flipped, unranked = ranking_by_recipe(runs, metrics)
    label = pairing_of(runs).label
    table.to_csv(out_dir / "table.csv", index=False)
    runs.to_csv(out_dir / "runs.csv", index=False)
    detectable.to_csv(out_dir / "detectable_differences.csv", index=False)
    baseline_note = baseline_footnote(runs, metrics)
    collapsed_note = [COLLAPSED_LEGEND] if "collapsed" in table else []
    sections = [(None, "Mean ± 95% CI (t-interval) over seeds; – = no finished run; (n of m seeds) = only n "
                       "of the cell's m finished runs have that evaluation.",
                 table, [RECIPE_LEGEND, *collapsed_note, f"Paper columns: {papers.SOURCE}.", *baseline_note])]
    if not diffs.empty:
        diffs.to_csv(out_dir / "paired_differences.csv", index=False)
        heading = "Difference to own init" if label == "own init" else "Difference to the none baseline"
        sections.append((heading, difference_legend(label, family), diffs, [*collapsed_note, *baseline_note]))
    sections.append(("Smallest detectable difference", detectable_legend(label), detectable, collapsed_note))
    if not ranking.empty:
        ranking.to_csv(out_dir / "ranking_by_recipe.csv", index=False)
        left_out = [f"Not ranked (collapsed): {'; '.join(unranked)}."] if unranked else []
        sections.append(("Ranking by recipe", RANKING_LEGEND, ranking,
                         ["Pairs that flip between recipes (within noise: the two cells' 95% CIs overlap "
                          "under either recipe):", *flip_lines(flipped), *left_out, *baseline_note]))
    return sections


def markdown_page(index: dict, sections: list[tuple]) -> str:
    md = [f"# {index['suite']} ({index['profile']} profile)", ""]
    for heading, legend, frame, notes in sections:
        md += ([f"## {heading}", ""] if heading else []) + [legend, "", frame.to_markdown(index=False), ""]
        md += [line for note in notes for line in (note, "")]
    return "\n".join(md)


def html_sections(sections: list[tuple]) -> list[str]:
    parts = []
    for heading, legend, frame, notes in sections:
        parts += ([f"<h2>{html.escape(heading)}</h2>"] if heading else []) + [
            f"<p>{html.escape(legend)}</p>", frame.to_html(index=False, na_rep="–"),
            *(f"<p>{html.escape(note)}</p>" for note in notes)]
    return parts


def html_status(runs: pd.DataFrame) -> list[str]:
    """The tables of runs that failed, are missing or lack an evaluation, and of runs that
    collapsed, with why; [] when there is none."""
    status = runs[(runs["status"] != "done") | (runs["missing evaluations"] != "")][
        ["method", "setting", "recipe", "seed", "run", "status", "missing evaluations", "problem"]]
    collapsed = runs.assign(collapsed=text_column(runs, "collapsed"))
    collapsed = collapsed[collapsed["collapsed"] != ""][["method", "setting", "recipe", "seed", "run", "collapsed"]]
    parts = [] if status.empty else ["<h2>Failed, missing or incomplete runs</h2>", status.to_html(index=False)]
    if not collapsed.empty:
        parts += ["<h2>Collapsed runs</h2>", f"<p>{html.escape(COLLAPSED_LEGEND)}</p>", collapsed.to_html(index=False)]
    return parts


def html_figures(runs: pd.DataFrame, run_root: Path) -> list[str]:
    """The figures the run folders hold (reconstructions, attention maps), captioned by run."""
    figures = [(run, setting, p) for (_, run), setting in zip(runs.iterrows(), setting_labels(runs))
               for p in sorted((run_root / run["run"] / "figures").glob("*.png"))]
    if not figures:
        return []
    parts = ["<h2>Reconstructions and attention maps</h2>"]
    for run, setting, p in figures:
        caption = f"{run['method']} {setting}, seed {run['seed']} ({run['run']}/{p.name})"
        parts.append(f"<figure>{img_tag(p)}<figcaption>{html.escape(caption)}</figcaption></figure>")
    return parts


README_PLOTS = ("vs_mask_ratio.png", "vs_flops.png")     # the first one a suite has goes into the README


def update_readme(readme: Path, report_dir: Path, suite: str, profile: str, machine: str) -> bool:
    """Replace the README block between `<!-- results:SUITE/PROFILE -->` and
    `<!-- /results -->` with the suite's table, its paired differences and one plot (copied
    to docs/results/ so that the README shows it from git). False when the README has no
    such block."""
    start, end = f"<!-- results:{suite}/{profile} -->", "<!-- /results -->"
    text = readme.read_text()
    if start not in text:
        return False
    head, rest = text.split(start, 1)
    if end not in rest:
        raise ReportError(f"{readme}: {start} has no closing {end}; add it")
    tail = rest.split(end, 1)[1]
    table = (report_dir / "table.md").read_text().split("\n", 3)[3]    # drop the page title
    table = table.replace("\n## ", "\n#### ")                           # nest under the README's headings
    block = [start, "", f"Machine: {machine}. Generated by `python -m reports.build {suite} --readme "
             f"{readme.name}` from `outputs/suites/{suite}/{profile}`.", "", table.strip(), ""]
    plot = next((report_dir / name for name in README_PLOTS if (report_dir / name).exists()), None)
    if plot is not None:
        target = readme.parent / "docs" / "results" / f"{suite}-{profile}-{plot.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(plot.read_bytes())
        block += [f"![{suite} {plot.stem}]({target.relative_to(readme.parent).as_posix()})", ""]
    readme.write_text(head + "\n".join(block) + end + tail)
    return True


def machine_of(runs: pd.DataFrame) -> str:
    """What the suite's runs ran on, from their records' provenance (`load_index`'s column)."""
    machines = set(runs["machine"].dropna()) if "machine" in runs else set()    # no record yet: no column
    return "; ".join(sorted(machines)) or "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", help="suite names (default: every suite with records)")
    parser.add_argument("--outputs", default="outputs", help="the suites' --outputs folder")
    parser.add_argument("--out", default="reports/out", help="where the report goes")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also write each suite's table and plot into this README's "
                             "<!-- results:SUITE/PROFILE --> ... <!-- /results --> block")
    args = parser.parse_args(argv)
    if args.readme and not args.readme.is_file():
        print(f"error: README file '{args.readme}' not found; pass --readme PATH to an existing file",
              file=sys.stderr)
        return 2
    indexes = sorted(Path(args.outputs).glob("suites/*/*/runs.json"))
    if args.suites:
        known = sorted({p.parent.parent.name for p in indexes})
        unknown = [s for s in args.suites if s not in known]
        if unknown:
            print(f"error: no records for suite {unknown[0]!r} in {args.outputs}/suites; "
                  f"with records: {', '.join(known) or 'none'} (run python -m suites.run first)",
                  file=sys.stderr)
            return 2
        indexes = [p for p in indexes if p.parent.parent.name in args.suites]
    if not indexes:
        print(f"error: no suite records under {args.outputs}/suites; run python -m suites.run SUITE first",
              file=sys.stderr)
        return 2
    built = 0
    for index_file in indexes:
        suite, profile = index_file.parent.parent.name, index_file.parent.name
        try:
            index = read_index(index_file)
        except RecordError as err:
            warn(f"{err}; suite {suite} ({profile}) skipped")
            continue
        runs = load_index(index_file, index)
        unreadable = int((runs["status"] == "unreadable").sum())
        if unreadable and not runs["status"].isin(["done", "failed"]).any():
            # a page of unreadable rows only would replace the last good one: keep that
            warn(f"{suite} ({profile}): no readable record; its report is left as it was")
            continue
        try:
            page = build_suite(index_file, index, runs, Path(args.out) / suite / profile)
            built += 1
            print(f"[report] {suite} ({profile}): {page}")
            if args.readme and unreadable:
                warn(f"{suite} ({profile}): {unreadable} unreadable record(s); {args.readme} left as it was")
            elif args.readme and update_readme(args.readme, page.parent, suite, profile, machine_of(runs)):
                print(f"[report] {suite} ({profile}) -> {args.readme}")
        except ReportError as err:
            print(f"error: {suite} ({profile}): {err}", file=sys.stderr)
            return 2
    if not built:
        print(f"error: no readable suite index or run record under {args.outputs}/suites (each named "
              f"above); no report written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
