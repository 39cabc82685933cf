"""The report's recipe cells, smallest detectable differences, signed paired differences with
their CIs, the ranking of methods under each recipe, and the note on how the baseline was
fine-tuned; built from small run folders written through the record schema."""
import json
import math
import statistics

import pandas as pd
import pytest

from core.files import config_hash, write_json
from reports.build import main as build
from runs.records import EvalRecord, RunRecord, write_record

# two-sided 95% t quantiles by degrees of freedom (tables, not scipy: the check is independent)
T975 = {1: 12.706204736174707, 2: 4.302652729911275}


def write_suite(outputs, runs, none_layer_decay=1.0, index_recipe=None):
    """A suite index and run folders: runs = {(method, setting, recipe, seed): metrics}; recipe
    None leaves config.json without the key (the shared recipe); none gets "train": null; a
    run with finetune_top1 has a fine-tune record whose config names its layer decay (none's:
    `none_layer_decay`); `index_recipe` also writes each entry's recipe into runs.json."""
    entries = []
    for (method, setting, recipe, seed), metrics in runs.items():
        config = {"schema": 1, "method": method, "method_config": {}, "seed": seed,
                  "train": None if method == "none" else {"schedule": setting}, "data": {"name": "cifar10"}}
        if recipe is not None:
            config["recipe"] = recipe
        run_hash = config_hash(config)
        folder = outputs / "runs" / f"{method}-{run_hash}"
        folder.mkdir(parents=True)
        write_json(folder / "config.json", config)
        evals = {"knn": EvalRecord({"k": 20}, {k: v for k, v in metrics.items() if k.startswith("knn")})}
        if "finetune_top1" in metrics:
            decay = none_layer_decay if method == "none" else 0.75
            evals["finetune"] = EvalRecord({"layer_decay": decay}, {"finetune_top1": metrics["finetune_top1"]})
        write_record(folder, RunRecord("done", method, seed, run_hash, metrics=metrics, evals=evals,
                                       train={"steps": 0 if method == "none" else 5}))
        entry = {"method": method, "setting": setting, "seed": seed, "run_dir": f"../../../runs/{folder.name}"}
        entries.append({**entry, "recipe": index_recipe} if index_recipe else entry)
    index = outputs / "suites" / "demo" / "cpu"
    index.mkdir(parents=True)
    (index / "runs.json").write_text(json.dumps({"suite": "demo", "profile": "cpu", "runs": entries}))


def knn(value, **more):
    return {"knn_top1_cls": value, "knn_top1_mean": value - 1, **more}


def report(tmp_path, runs, **options):
    """Build the demo suite's report; its folder."""
    write_suite(tmp_path / "outputs", runs, **options)
    assert build(["--outputs", str(tmp_path / "outputs"), "--out", str(tmp_path / "report")]) == 0
    return tmp_path / "report" / "demo" / "cpu"


def read(folder, name):
    return pd.read_csv(folder / name, dtype=str, keep_default_na=False)


def test_two_cells_differing_only_by_recipe_are_two_rows_and_none_has_no_recipe(tmp_path):
    folder = report(tmp_path, {
        ("none", "random init", None, 0): knn(34.0), ("none", "random init", None, 1): knn(35.0),
        ("mae", "5 epochs", None, 0): knn(42.0), ("mae", "5 epochs", None, 1): knn(43.0),
        ("mae", "5 epochs", "paper", 0): knn(46.0), ("mae", "5 epochs", "paper", 1): knn(47.0)},
        index_recipe="shared")             # config.json wins over the index
    table = read(folder, "table.csv")
    assert table[["method", "recipe"]].values.tolist() == [["none", "—"], ["mae", "shared"], ["mae", "paper"]]
    assert table["knn_top1_cls"].str[:5].tolist() == ["34.50", "42.50", "46.50"]
    diffs = read(folder, "paired_differences.csv")
    assert diffs["recipe"].tolist() == ["shared", "paper"]
    assert diffs["Δ knn_top1_cls"].tolist() == ["+8.00 ± 0.00 *", "+12.00 ± 0.00 *"]
    page = (folder / "index.html").read_text()
    assert "<th>recipe</th>" in page and "<td>paper</td>" in page and "<td>—</td>" in page


def test_the_smallest_detectable_difference_is_the_t_interval_half_width_and_n_a_for_one_seed(tmp_path):
    mae, none = [42.0, 43.5, 41.0], [34.0, 35.5, 33.0]
    folder = report(tmp_path, {
        **{("none", "random init", None, seed): knn(value) for seed, value in enumerate(none)},
        **{("mae", "random 0.75", None, seed): knn(value) for seed, value in enumerate(mae)},
        ("pixel", "random 0.6", None, 0): knn(30.0)})
    table = read(folder, "detectable_differences.csv").set_index("method")
    by_hand = T975[2] * statistics.stdev(mae) / math.sqrt(3)
    assert table.loc["mae", "knn_top1_cls"] == f"{by_hand:.2f}"
    diffs = [m - n for m, n in zip(mae, none)]
    assert table.loc["mae", "Δ knn_top1_cls"] == f"{T975[2] * statistics.stdev(diffs) / math.sqrt(3):.2f}"
    assert table.loc["pixel", "knn_top1_cls"] == "n/a (1 seed)" == table.loc["pixel", "Δ knn_top1_cls"]
    assert table.loc["none", "Δ knn_top1_cls"] == "–"
    summary = read(folder, "table.csv").set_index("method")
    assert summary.loc["mae", "knn_top1_cls"].endswith(f"± {by_hand:.2f}")      # the same interval
    assert "could not be told from zero at these seeds" in (folder / "table.md").read_text()


def test_a_paired_difference_that_holm_keeps_is_marked_in_every_metric_column(tmp_path):
    """mae's k-NN differences (+8.0, +7.9: p = 0.004) stay starred after Holm's correction over the
    table's 6 differences (the strictest bar they meet is 0.05 / 5)."""
    folder = report(tmp_path, {
        ("none", "random init", None, 0): knn(34.0, linear_top1_cls=40.0),
        ("none", "random init", None, 1): knn(35.0, linear_top1_cls=41.0),
        ("mae", "random 0.75", None, 0): knn(42.0, linear_top1_cls=50.0),
        ("mae", "random 0.75", None, 1): knn(42.9, linear_top1_cls=51.0),
        ("pixel", "random 0.6", None, 0): knn(39.0, linear_top1_cls=37.0),      # +5, -4: zero inside
        ("pixel", "random 0.6", None, 1): knn(31.0, linear_top1_cls=45.0)})
    diffs = read(folder, "paired_differences.csv").set_index("method")
    half = T975[1] * statistics.stdev([8.0, 7.9]) / math.sqrt(2)
    assert diffs.loc["mae", "Δ knn_top1_cls"] == f"+7.95 ± {half:.2f} *"
    assert diffs.loc["mae", "Δ linear_top1_cls"] == "+10.00 ± 0.00 *"        # 10 and 10
    for metric in ("knn_top1_cls", "knn_top1_mean", "linear_top1_cls"):
        assert diffs.loc["pixel", f"Δ {metric}"].startswith(("+", "-"))
        assert not diffs.loc["pixel", f"Δ {metric}"].endswith("*")


def test_student_knn_columns_sit_beside_knn_and_pair_with_the_baselines_knn(tmp_path):
    folder = report(tmp_path, {
        ("none", "random init", None, 0): knn(34.0, linear_top1_cls=40.0),
        ("ibot", "5 epochs", None, 0): knn(38.0, linear_top1_cls=45.0, knn_student_top1_cls=37.0,
                                           knn_student_top1_mean=36.0)})
    table = read(folder, "table.csv")
    metrics = [c for c in table.columns if c.startswith(("knn", "linear"))]
    assert metrics == ["knn_top1_cls", "knn_top1_mean", "knn_student_top1_cls", "knn_student_top1_mean",
                       "linear_top1_cls"]
    diffs = read(folder, "paired_differences.csv").set_index("method")
    assert diffs.loc["ibot", "Δ knn_student_top1_cls"] == "+3.00"       # 37 - none's k-NN 34


def test_compute_matched_settings_start_with_budget_or_name_flops():
    from reports.ranking import compute_matched
    assert compute_matched("budget 1e15 FLOP") and compute_matched("MAE's FLOPs (2.93 ep)")
    assert not compute_matched("5 epochs") and not compute_matched("random 0.75")


RANKED = {
    ("none", "random init", None, 0): knn(34.0), ("none", "random init", None, 1): knn(34.4),
    # mae sets the budget: its one cell per recipe is in the compute-matched block
    ("mae", "5 epochs", None, 0): knn(45.0), ("mae", "5 epochs", None, 1): knn(45.4),
    ("mae", "5 epochs", "paper", 0): knn(44.0), ("mae", "5 epochs", "paper", 1): knn(44.4),
    # epochs-matched cells of the others, outside the block: they would rank first
    ("pixel", "5 epochs", None, 0): knn(60.0), ("pixel", "5 epochs", "paper", 0): knn(60.0),
    ("pixel", "MAE's FLOPs (2.9 ep)", None, 0): knn(40.0), ("pixel", "MAE's FLOPs (2.9 ep)", None, 1): knn(40.4),
    ("pixel", "MAE's FLOPs (3.1 ep)", "paper", 0): knn(41.0),
    ("pixel", "MAE's FLOPs (3.1 ep)", "paper", 1): knn(41.4),
    ("beit", "MAE's FLOPs (2.6 ep)", None, 0): knn(38.0), ("beit", "MAE's FLOPs (2.6 ep)", None, 1): knn(38.4),
    ("beit", "MAE's FLOPs (2.6 ep)", "paper", 0): knn(47.0), ("beit", "MAE's FLOPs (2.6 ep)", "paper", 1): knn(43.0),
}


def test_the_ranking_by_recipe_orders_the_compute_matched_cells_by_mean_and_lists_the_flips(tmp_path):
    folder = report(tmp_path, RANKED)
    ranking = read(folder, "ranking_by_recipe.csv")
    knn_cls = ranking[ranking["metric"] == "knn_top1_cls"]

    def ci(values):
        return f"{statistics.mean(values):.2f} ± {T975[1] * statistics.stdev(values) / math.sqrt(2):.2f}"
    assert knn_cls["shared"].tolist() == [f"1. mae {ci([45.0, 45.4])}", f"2. pixel {ci([40.0, 40.4])}",
                                          f"3. beit {ci([38.0, 38.4])}", f"4. none {ci([34.0, 34.4])}"]
    assert knn_cls["paper"].tolist() == [f"1. beit {ci([47.0, 43.0])}", f"2. mae {ci([44.0, 44.4])}",
                                         f"3. pixel {ci([41.0, 41.4])}", f"4. none {ci([34.0, 34.4])}"]
    md = (folder / "table.md").read_text()
    # beit's paper CI (45 ± 25) overlaps everyone's: its flips are within noise
    assert ("knn_top1_cls: mae > beit under shared, beit > mae under paper (within noise); "
            "pixel > beit under shared, beit > pixel under paper (within noise)\n") in md
    assert "## Ranking by recipe" in md and "Ranking by recipe</h2>" in (folder / "index.html").read_text()


def test_a_flip_outside_the_noise_is_not_marked(tmp_path):
    """beit at 49.1 ± 1.27 under paper is clear of mae's 44.2 ± 2.54 (and 38.2 under shared), but
    within reach of pixel's 40.2 ± 2.54 under shared."""
    runs = {**RANKED, ("beit", "MAE's FLOPs (2.6 ep)", "paper", 0): knn(49.0),
            ("beit", "MAE's FLOPs (2.6 ep)", "paper", 1): knn(49.2)}
    md = (report(tmp_path, runs) / "table.md").read_text()
    assert ("knn_top1_cls: mae > beit under shared, beit > mae under paper; "
            "pixel > beit under shared, beit > pixel under paper (within noise)\n") in md


def test_no_ranking_table_when_the_suite_has_one_recipe(tmp_path):
    folder = report(tmp_path, {("none", "random init", None, 0): knn(34.0),
                               ("mae", "5 epochs", None, 0): knn(42.0)})
    assert not (folder / "ranking_by_recipe.csv").exists()
    assert "Ranking by recipe" not in (folder / "table.md").read_text()


FROM_SCRATCH = ("none: fine-tuned with a from-scratch recipe (layer decay 1.0), pre-trained encoders "
                "at their profile's layer decay")


@pytest.mark.parametrize("decay, note", [
    (1.0, FROM_SCRATCH),
    (0.75, "none: fine-tuned with layer decay 0.75 (a record from before the from-scratch recipe, layer "
           "decay 1.0), pre-trained encoders at their profile's layer decay")],
    ids=["from-scratch", "old-record"])
def test_a_shown_baseline_fine_tune_says_which_layer_decay_it_had(tmp_path, decay, note):
    folder = report(tmp_path, {("none", "random init", None, 0): knn(34.0, finetune_top1=40.0),
                               ("mae", "5 epochs", None, 0): knn(42.0, finetune_top1=50.0)},
                    none_layer_decay=decay)
    md = (folder / "table.md").read_text()
    assert md.count(note + "\n") == 2              # under the table and the paired differences
    assert note in (folder / "index.html").read_text().replace("&#x27;", "'")


def test_no_baseline_note_without_a_baseline_fine_tune(tmp_path):
    folder = report(tmp_path, {("none", "random init", None, 0): knn(34.0),
                               ("mae", "5 epochs", None, 0): knn(42.0, finetune_top1=50.0)})
    assert "from-scratch" not in (folder / "table.md").read_text()


def test_fine_tune_and_segmentation_share_one_note():
    from reports.build import baseline_footnote
    runs = pd.DataFrame([{"method": "none", "status": "done", "finetune_top1": 40.0, "seg_miou": 20.0,
                          "finetune layer_decay": 1.0, "segmentation layer_decay": 1.0}])
    assert baseline_footnote(runs, ["finetune_top1", "seg_miou"]) == [
        "none: fine-tuned and segmented with a from-scratch recipe (layer decay 1.0), pre-trained encoders "
        "at their profile's layer decay"]


def test_the_baseline_note_says_its_fine_tune_lr_was_chosen_on_held_out_data():
    from reports.build import baseline_footnote
    runs = pd.DataFrame([{"method": "none", "status": "done", "finetune_top1": 40.0, "seg_miou": 20.0,
                          "finetune layer_decay": 1.0, "segmentation layer_decay": 1.0,
                          "finetune blr_sweep": True}])
    assert baseline_footnote(runs, ["finetune_top1", "seg_miou"]) == [
        "none: fine-tuned with a from-scratch recipe (layer decay 1.0) and its lr chosen on the held-out part "
        "of train; segmented with a from-scratch recipe (layer decay 1.0), pre-trained encoders at their "
        "profile's layer decay"]
