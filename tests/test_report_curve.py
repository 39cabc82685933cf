"""The report of a budget curve (`compare_methods --curve`, reports.curve): curve.csv, the break-even
budget per method, the verdict that opens the page above the figure, the README block; built from
run folders written through the record schema as a curve writes them (each index entry's
`mae_epochs`, the records' counted FLOPs)."""
import json
import math
import statistics

import numpy as np
import pandas as pd
import pytest

from core.files import config_hash, write_json
from reports.build import main as build
from reports.curve import break_even, curve_markdown, curve_of
from reports.tables import load_index, read_index
from runs.records import EvalRecord, RunRecord, write_record

# two-sided 95% t quantiles by degrees of freedom (tables, not scipy: the check is independent)
T975 = {1: 12.706204736174707, 2: 4.302652729911275}
FLOPS_PER_MAE_EPOCH = 1.5e9
BUDGETS = (1.0, 2.0, 4.0)
NONE = [40.0, 41.0, 42.5]                  # random init's k-NN mean, seeds 0-2
# k-NN mean - random init's, seed by seed, at each budget
MAE = {1.0: [1.0, -1.0, 0.5],              # CI around 0
       2.0: [3.0, 3.5, 2.5],               # above 0: the break-even budget
       4.0: [10.0, 11.0, 10.5]}
PIXEL = {1.0: [-1.0, 1.0, 0.0], 2.0: [2.0, -1.5, 0.5], 4.0: [-0.5, 0.5, 1.0]}   # never above 0
IBOT = {1.0: [20.0], 2.0: [20.0], 4.0: [20.0]}                                   # one seed: no interval


def write_curve(outputs, lines, profile="smoke-curve"):
    """A curve's index and run folders: `none` at seeds 0-2 (NONE) and, per method, its runs at each
    budget, seed i's k-NN mean NONE[i] + lines[method][budget][i] ([CLS]: one point above it); a
    method given as None is in the grid with no run."""
    entries = []

    def add(method, seed, knn_mean, budget=None):
        setting = "random init" if budget is None else f"curve {budget:g}ep MAE FLOPs"
        config = {"method": method, "seed": seed, "setting": setting}
        run_hash = config_hash(config)
        folder = outputs / "runs" / f"{method}-{run_hash}"
        entry = {"method": method, "setting": setting, "recipe": "shared", "seed": seed, "params": {},
                 "evals": ["knn"], "run_dir": f"../../../runs/{folder.name}"}
        if budget is not None:
            entry["mae_epochs"] = budget
        entries.append(entry)
        if knn_mean is None:
            return
        folder.mkdir(parents=True)
        write_json(folder / "config.json", {**config, "train": None if budget is None else {"schedule": "wsd"}})
        knn = {"knn_top1_cls": knn_mean + 1, "knn_top1_mean": knn_mean}
        flops = 0 if budget is None else budget * FLOPS_PER_MAE_EPOCH
        train = {"steps": 0} if budget is None else {
            "steps": int(8 * budget), "flops_total": flops,
            "branch": {"trunk": f"{method}-trunk-{seed}", "from_step": int(6 * budget), "decay_steps": int(2 * budget)}}
        write_record(folder, RunRecord("done", method, seed, run_hash, train=train,
                                       metrics={**knn, "pretrain_flops_total": flops},
                                       evals={"knn": EvalRecord({"k": 20}, knn)}))

    for seed, value in enumerate(NONE):
        add("none", seed, value)
    for method, diffs in lines.items():
        for budget in BUDGETS:
            for seed in range(len(diffs[budget]) if diffs else 2):
                add(method, seed, None if diffs is None else NONE[seed] + diffs[budget][seed], budget)
    suite_dir = outputs / "suites" / "compare_methods" / profile
    suite_dir.mkdir(parents=True)
    (suite_dir / "runs.json").write_text(json.dumps({"suite": "compare_methods", "profile": "smoke",
                                                     "runs": entries}))
    return suite_dir / "runs.json"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of a curve where mae breaks even at its 2nd budget, pixel never, iBOT has one
    seed (no interval) and beit no finished run."""
    tmp = tmp_path_factory.mktemp("curve")
    index_file = write_curve(tmp / "outputs", {"mae": MAE, "pixel": PIXEL, "ibot": IBOT, "beit": None})
    assert build(["compare_methods", "--outputs", str(tmp / "outputs"), "--out", str(tmp / "report")]) == 0
    return tmp / "report" / "compare_methods" / "smoke-curve", index_file


def test_curve_csv_has_a_row_per_method_budget_and_metric_with_the_paired_difference(report):
    folder, _ = report
    table = pd.read_csv(folder / "curve.csv")
    assert list(table.columns) == ["method", "setting", "recipe", "mae_epochs", "metric", "mean", "ci95", "n", "diff",
                                   "diff_ci95", "n_paired", "p", "holm_star", "baseline", "collapsed", "flops"]
    # random init once per metric, no budget; then 4 methods x 3 budgets x 2 metrics
    assert len(table) == 2 + 4 * 3 * 2
    none = table[table["method"] == "none"].set_index("metric")
    assert none["mae_epochs"].isna().all()
    assert none.loc["knn_top1_mean", "mean"] == pytest.approx(statistics.mean(NONE), abs=1e-4)
    assert none.loc["knn_top1_mean", "ci95"] == pytest.approx(T975[2] * statistics.stdev(NONE) / math.sqrt(3),
                                                              abs=1e-4)
    row = table[(table["method"] == "mae") & (table["mae_epochs"] == 2) & (table["metric"] == "knn_top1_mean")]
    [row] = row.to_dict("records")
    values = [n + d for n, d in zip(NONE, MAE[2.0])]
    assert row["mean"] == pytest.approx(statistics.mean(values), abs=1e-4)
    assert row["n"] == 3 and row["n_paired"] == 3 and row["baseline"] == "random init"
    assert row["diff"] == pytest.approx(statistics.mean(MAE[2.0]), abs=1e-4)
    assert row["diff_ci95"] == pytest.approx(T975[2] * statistics.stdev(MAE[2.0]) / math.sqrt(3), abs=1e-4)
    assert row["flops"] == pytest.approx(2 * FLOPS_PER_MAE_EPOCH, rel=1e-5)
    one_seed = table[(table["method"] == "ibot") & (table["metric"] == "knn_top1_mean")]
    assert (one_seed["n_paired"] == 1).all() and one_seed["diff_ci95"].isna().all()
    not_run = table[table["method"] == "beit"]
    assert (not_run["n"] == 0).all() and not_run["mean"].isna().all()


def test_break_even_is_the_first_budget_from_which_on_the_paired_difference_ci_is_above_zero(report):
    _, index_file = report
    index = read_index(index_file)
    curve = curve_of(index, load_index(index_file, index))
    assert break_even(curve.table, ("mae", "shared"), "knn_top1_mean") == 2.0      # 1.0's CI holds 0
    assert break_even(curve.table, ("pixel", "shared"), "knn_top1_mean") is None
    assert break_even(curve.table, ("ibot", "shared"), "knn_top1_mean") is None    # +20, but one seed
    assert break_even(curve.table, ("beit", "shared"), "knn_top1_mean") is None


def test_the_page_opens_with_the_verdict_line_above_the_figure(report):
    folder, _ = report
    page = (folder / "index.html").read_text()
    line = ("Break-even against random init, k-NN mean (primary): mae at 2 MAE-epochs; pixel not within 4 "
            "MAE-epochs; ibot not within 4 MAE-epochs; no finished run yet: beit.")
    assert f'<p class="verdict"><b>{line}</b></p>' in page
    figure = page.index('alt="curve.png"')
    assert page.index("<h1>") < page.index(line) < figure < page.index("<h2>Break-even budget</h2>")
    assert page.index("<h2>Ranking at each budget</h2>") < page.index("<th>knn_top1_cls</th>")   # then the tables
    from PIL import Image
    pixels = np.asarray(Image.open(folder / "curve.png").convert("L"), float)
    assert pixels.shape[1] > 600 and pixels.std() > 10         # panels drawn, not a blank image


def test_break_even_table_and_ranking_say_where_each_method_stands(report):
    folder, _ = report
    page = (folder / "index.html").read_text()
    mae_2 = f"2 (+{statistics.mean(MAE[2.0]):.2f} ± {T975[2] * statistics.stdev(MAE[2.0]) / math.sqrt(3):.2f})"
    assert mae_2 in page
    assert "not within 4 MAE-epochs" in page
    # at 4 MAE-epochs: ibot 60 (one seed: no CI, ties with all), mae 51.67 ± 3.79 clear of pixel's
    # 41.50 ± 4.97, which overlaps none's 41.17 ± 3.13
    markdown = (folder / "curve.md").read_text()
    [ranking] = [row for row in markdown.splitlines() if row.startswith("| k-NN mean ") and "|            4 |" in row]
    assert "ibot 60.00 ≈ mae 51.67 ± 3.79 > pixel 41.50 ± 4.97 ≈ none 41.17 ± 3.13" in ranking


def test_the_readme_block_is_rendered_from_the_records_alone(report):
    folder, index_file = report
    block = curve_markdown(index_file)
    assert block == (folder / "curve.md").read_text()
    assert block.startswith("**Break-even against random init, k-NN mean (primary): mae at 2 MAE-epochs;")
    assert "![budget curve](curve.png)" in block and "#### Break-even budget" in block
    assert "![budget curve](docs/results/c.png)" in curve_markdown(index_file, figure="docs/results/c.png")


def test_a_suite_without_budgets_has_no_curve_section(tmp_path):
    index_file = write_curve(tmp_path / "outputs", {"mae": MAE}, profile="smoke")
    index = read_index(index_file)
    for entry in index["runs"]:
        entry.pop("mae_epochs", None)
    index_file.write_text(json.dumps(index))
    assert curve_of(index, load_index(index_file, index)) is None
    assert build(["compare_methods", "--outputs", str(tmp_path / "outputs"), "--out", str(tmp_path / "report")]) == 0
    folder = tmp_path / "report" / "compare_methods" / "smoke"
    assert not (folder / "curve.csv").exists() and 'class="verdict"' not in (folder / "index.html").read_text()
    with pytest.raises(ValueError, match="not a curve"):
        curve_markdown(index_file)


def test_the_page_lists_the_primary_cells_short_of_seeds_and_a_tuned_curve_its_lrs(report, tmp_path, monkeypatch):
    from reports import curve as curve_module
    folder, index_file = report
    curve = curve_of(read_index(index_file), load_index(index_file))
    wanted = curve_module.seeds_wanted(curve)
    table = curve.table[curve.table["metric"] == "knn_top1_mean"]
    wide = table[(table["ci95"] > 2) & (table["n"] < 5)]
    assert len(wanted) == len(wide) > 0
    assert ("pixel", 2.0) in set(zip(wanted["method"], wanted["MAE-epochs"]))      # 3 seeds, half-width ~4.5
    assert "Seeds to add" in (folder / "index.html").read_text()
    monkeypatch.setattr(curve_module, "TUNED_DIR", tmp_path)
    assert curve_module.tuning_table("smoke") is None
    write_json(tmp_path / "smoke.json", {"mae": {"blr": 0.001, "bracketed": True, "budgets_mae_epochs": [0.5, 1.0],
                                                 "criterion": "holdout_knn_top1_mean", "seed": 0,
                                                 "scores": {"0.0005": 35.56, "0.001": 37.04, "0.002": None}}})
    [row] = curve_module.tuning_table("smoke").to_dict("records")
    assert row["blr"] == "0.001" and row["held-out score per blr"] == "0.0005: 35.56, 0.001: 37.04, 0.002: –"
