"""The report's statistics: stars only after a Holm correction over the family a table tests, a
collapsed cell labelled but never starred or ranked, each run paired with its own init (the run
its index entry's `init_run` names, same seed), and the break-even budget of a curve: the
smallest from which on every measured budget's paired difference has a 95% interval above 0.
Built from small tables of runs as `reports.tables.load_index` returns them."""
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from core.files import config_hash
from reports.build import paired_differences
from reports.curve import break_even, curve_of, ranking_table, verdict
from reports.ranking import ranking_by_recipe
from reports.tables import (PRIMARY_METRIC, holm, load_index, paired_diffs, paired_p_value, pairing_of,
                            summarize)
from runs.records import RunRecord, write_record

NONE = [40.0, 41.0, 42.5]                   # random init's k-NN mean, seeds 0-2
SIGNIFICANT_ALONE = [1.8, 2.6, 3.6]         # paired differences with p = 0.036: below 0.05, above 0.05 / 2
NOISE = [1.0, -1.0, 0.5]                    # p = 0.7


def run_row(method, setting, seed, knn_mean, recipe="shared", collapsed=None, init_run=None, budget=None):
    """A row of `load_index`'s table: a finished run named "<method>-<setting>-<seed>"."""
    row = {"method": method, "setting": setting, "recipe": recipe, "seed": seed,
           "run": f"{method}-{setting}-{seed}".replace(" ", "_"), "status": "done", "missing evaluations": "",
           "problem": "", "knn_top1_mean": knn_mean, "mae_epochs": budget}
    if collapsed is not None:
        row["collapsed"] = collapsed
    if init_run is not None:
        row["init_run"] = init_run
    return row


def cell(method, setting, diffs, recipe="shared", base=NONE, **options):
    """A cell's runs at seeds 0.., each `base[seed] + diffs[seed]`."""
    return [run_row(method, setting, seed, base[seed] + diff, recipe, **options) for seed, diff in enumerate(diffs)]


def none_cell():
    return cell("none", "random init", [0.0] * len(NONE), recipe="—")


def test_holm_holds_the_smallest_p_to_alpha_over_m_and_steps_down():
    p = paired_p_value(SIGNIFICANT_ALONE)
    assert p == pytest.approx(stats.ttest_rel(np.add(NONE, SIGNIFICANT_ALONE), NONE).pvalue)
    assert 0.025 < p < 0.05
    assert holm([p]) == [True]                                      # a family of one: uncorrected
    assert holm([p, 0.4, 0.6, 0.9]) == [False] * 4                  # p > 0.05 / 4
    assert holm([1e-4, p]) == [True, True]                          # 1e-4 <= 0.05 / 2, then p <= 0.05 / 1
    assert holm([p, float("nan")]) == [True, False]                 # no test: outside the family


def test_a_difference_starred_uncorrected_loses_its_star_among_several_tests():
    runs = pd.DataFrame(none_cell() + cell("mae", "5 ep", SIGNIFICANT_ALONE)
                        + cell("pixel", "5 ep", NOISE) + cell("beit", "5 ep", [-1.0, 0.5, 0.2])
                        + cell("ibot", "5 ep", [0.3, -0.4, 1.1]))
    table, family = paired_differences(runs, [PRIMARY_METRIC])
    table = table.set_index("method")
    mean, half = np.mean(SIGNIFICANT_ALONE), stats.t.ppf(0.975, 2) * stats.sem(SIGNIFICANT_ALONE)
    assert mean - half > 0                                          # its own 95% interval leaves 0 out
    assert family == 4 and table.loc["mae", f"Δ {PRIMARY_METRIC}"] == f"+{mean:.2f} ± {half:.2f}"


def test_a_difference_stays_starred_when_the_step_down_reaches_it():
    runs = pd.DataFrame(none_cell() + cell("mae", "5 ep", SIGNIFICANT_ALONE)
                        + cell("ibot", "5 ep", [20.0, 20.1, 20.2]))           # p = 1e-4
    table, family = paired_differences(runs, [PRIMARY_METRIC])
    assert family == 2 and table[f"Δ {PRIMARY_METRIC}"].str.endswith(" *").all()


def test_a_collapsed_cell_is_labelled_and_neither_starred_nor_in_the_family():
    reason = "teacher entropy 0.01 of ln 1024"
    runs = pd.DataFrame(none_cell() + cell("mae", "5 ep", SIGNIFICANT_ALONE)
                        + cell("ibot", "5 ep", [20.0, 20.1, 20.2], collapsed=reason))
    table, family = paired_differences(runs, [PRIMARY_METRIC])
    table = table.set_index("method")
    assert family == 1
    assert not table.loc["ibot", f"Δ {PRIMARY_METRIC}"].endswith("*")       # +20 with p = 1e-4
    assert table.loc["ibot", "collapsed"] == f"seeds 0, 1, 2: {reason}" and table.loc["mae", "collapsed"] == ""
    summary = summarize(runs, [PRIMARY_METRIC]).set_index("method")
    assert summary.loc["ibot", "collapsed"] == f"seeds 0, 1, 2: {reason}"


def test_a_collapsed_cell_is_not_ranked_and_the_ranking_says_so():
    ibot_paper = cell("ibot", "budget 1ep", [9.0] * 3, "paper")        # 9 points above init
    ibot_paper[1]["collapsed"] = "one prototype"                        # at seed 1
    runs = pd.DataFrame(none_cell() + cell("mae", "budget 1ep", [1.0] * 3)
                        + cell("mae", "budget 1ep", [2.0] * 3, "paper") + cell("ibot", "budget 1ep", [5.0] * 3)
                        + ibot_paper)
    table, _, unranked = ranking_by_recipe(runs, [PRIMARY_METRIC])
    assert [entry.split()[1] for entry in table["shared"] if entry] == ["ibot", "mae", "none"]
    assert [entry.split()[1] for entry in table["paper"] if entry] == ["mae", "none"]
    assert unranked == ["ibot (paper): seed 1: one prototype"]


def test_own_init_pairs_each_run_with_the_init_its_entry_names_at_its_seed():
    layer_scale = [38.0, 37.0, 39.5]                 # the untrained encoder with layer scale 0.1, seeds 0-2
    inits = [{**row, "init_run": row["run"]} for row in none_cell()]
    inits += [{**row, "init_run": row["run"]} for row in cell("none", "init (layer scale 0.1)", [0.0] * 3,
                                                                 recipe="—", base=layer_scale)]
    pixel = [run_row("pixel", "5 ep", seed, value, init_run=f"none-init_(layer_scale_0.1)-{seed}")
             for seed, value in enumerate([40.0, 40.5, 41.0])]
    mae = [run_row("mae", "5 ep", seed, value, init_run=f"none-random_init-{seed}")
           for seed, value in enumerate([45.0, 46.0, 47.0])]
    runs = pd.DataFrame(inits + pixel + mae)
    pairing = pairing_of(runs)
    assert pairing.label == "own init"
    assert paired_diffs(runs[runs["method"] == "pixel"], pairing, PRIMARY_METRIC) == [2.0, 3.5, 1.5]
    assert paired_diffs(runs[runs["method"] == "mae"], pairing, PRIMARY_METRIC) == [5.0, 5.0, 4.5]
    table, family = paired_differences(runs, [PRIMARY_METRIC])     # two `none` cells: fine, each run names its init
    assert table["method"].tolist() == ["pixel", "mae"] and family == 2
    summary = summarize(runs, [PRIMARY_METRIC])
    assert summary["setting"].tolist() == ["random init", "init (layer scale 0.1)", "5 ep", "5 ep"]


def test_without_init_run_a_run_pairs_with_the_none_run_of_its_seed():
    mae = [run_row("mae", "5 ep", seed, value) for seed, value in [(2, 45.0), (0, 44.0)]]
    runs = pd.DataFrame(none_cell() + mae)
    pairing = pairing_of(runs)
    assert pairing.label == "random init"
    assert paired_diffs(runs[runs["method"] == "mae"], pairing, PRIMARY_METRIC) == [45.0 - NONE[2], 44.0 - NONE[0]]


def test_an_index_with_and_without_the_new_columns_loads(tmp_path):
    entries = []
    for name, extra in [("none-0", {"init_run": "none-0"}),
                        ("ibot-0", {"collapsed": "entropy 0.01", "init_run": "none-0"}),
                        ("mae-0", {"collapsed": None}), ("pixel-0", {"collapsed": float("nan")}),
                        ("beit-0", {})]:                                   # an entry from before both columns
        method = name.split("-")[0]
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        write_record(folder, RunRecord("done", method, 0, config_hash(name), train={"steps": 5},
                                               metrics={PRIMARY_METRIC: 40.0}))
        entries.append({"method": method, "setting": "s", "seed": 0, "run_dir": f"../../../runs/{name}", **extra})
    index_file = tmp_path / "suites" / "demo" / "cpu" / "runs.json"
    index_file.parent.mkdir(parents=True)
    index_file.write_text(json.dumps({"suite": "demo", "profile": "cpu", "runs": entries}))
    runs = load_index(index_file).set_index("run")
    assert runs["collapsed"].tolist() == ["", "entropy 0.01", "", "", ""]
    assert runs["init_run"].tolist() == ["none-0", "none-0", "", "", ""]


def curve_runs(lines, collapsed_at=None):
    """A curve's index and runs table: `none` at seeds 0-2 and, per method, its runs at each budget
    {budget: diffs}, each naming its seed's `none` run as its init; the cell (method, budget) of
    `collapsed_at` collapsed."""
    rows = [{**row, "init_run": row["run"]} for row in none_cell()]
    for method, budgets in lines.items():
        for budget, diffs in budgets.items():
            reason = "one prototype" if collapsed_at == (method, budget) else None
            rows += [run_row(method, f"curve {budget:g}ep", seed, NONE[seed] + diff, collapsed=reason,
                             init_run=f"none-random_init-{seed}", budget=budget) for seed, diff in enumerate(diffs)]
    runs = pd.DataFrame(rows)
    index = {"runs": [{"mae_epochs": budget} for budget in runs["mae_epochs"]]}
    return curve_of(index, runs.drop(columns="mae_epochs"))


ABOVE = [3.0, 3.5, 2.5]                          # 95% interval above 0
FAR_ABOVE = [10.0, 11.0, 10.5]


def test_a_budget_above_zero_followed_by_one_that_is_not_is_not_the_break_even():
    curve = curve_runs({"mae": {1.0: ABOVE, 2.0: NOISE, 4.0: FAR_ABOVE},     # 1 is above, 2 is not: 4
                        "pixel": {1.0: ABOVE, 2.0: ABOVE, 4.0: NOISE}})      # the largest is not: never
    assert break_even(curve.table, ("mae", "shared"), PRIMARY_METRIC) == 4.0
    assert break_even(curve.table, ("pixel", "shared"), PRIMARY_METRIC) is None
    assert verdict(curve) == ("Break-even against own init, k-NN mean (primary): mae at 4 MAE-epochs; pixel not "
                              "within 4 MAE-epochs.")


def test_a_collapsed_budget_blocks_the_break_even_below_it_and_is_not_ranked_or_starred():
    curve = curve_runs({"ibot": {1.0: FAR_ABOVE, 2.0: FAR_ABOVE, 4.0: FAR_ABOVE},
                        "mae": {1.0: ABOVE, 2.0: ABOVE, 4.0: ABOVE}}, collapsed_at=("ibot", 2.0))
    assert break_even(curve.table, ("ibot", "shared"), PRIMARY_METRIC) == 4.0
    assert "ibot at 4 MAE-epochs (collapsed at 2 MAE-epochs)" in verdict(curve)
    at_2 = ranking_table(curve).set_index("MAE-epochs").loc["2"]
    assert "ibot" not in at_2["ranking"].split(";")[0] and at_2["ranking"].endswith("; not ranked (collapsed): ibot")
    assert at_2["Δ own init"].startswith("ibot +10.50 ± 1.24 (collapsed); mae +3.00 ± 1.24 *")
    collapsed = curve.table[curve.table["collapsed"] != ""]
    assert len(collapsed) == 1 and not collapsed["holm_star"].any() and collapsed["p"].iloc[0] < 1e-3
    assert curve.table["holm_star"].sum() == 5       # the other five differences, each p < 0.01 of a family of 5
