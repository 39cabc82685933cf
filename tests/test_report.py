"""The report is built from run records alone: tables with mean ± 95% CI, paired differences
to the baseline, failed and missing runs shown as such."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import ROOT
from core.files import config_hash
from reports.tables import ci95
from runs.records import EvalRecord, RunRecord, read_record, write_record


def write_records(outputs, knn, suite="demo"):
    """A suite index plus result.json files, written through the record schema:
    knn = {(method, setting, seed): value or 'failed'}."""
    entries = []
    for (method, setting, seed), value in knn.items():
        run_hash = config_hash([suite, method, setting, seed])
        run = f"{method}-{run_hash}"
        folder = outputs / "runs" / run
        folder.mkdir(parents=True)
        ratio = float(setting.split()[-1]) if setting[-1].isdigit() else None
        entries.append({"method": method, "setting": setting, "seed": seed, "run_dir": f"../../../runs/{run}",
                        "params": {"mask.ratio": ratio} if ratio else {}})
        if value is None:
            continue            # missing: never ran
        if value == "failed":
            record = RunRecord("failed", method, seed, run_hash, error="RuntimeError: loss is nan")
        else:
            record = RunRecord("done", method, seed, run_hash, train={"steps": 5},
                               metrics={"knn_top1_cls": value, "knn_top1_mean": value - 1,
                                        "pretrain_flops_total": 1e15})
        write_record(folder, record)
        rows = [{"step": s, "loss": 1 / (s + 1)} for s in range(5)]
        if method == "ibot":
            rows = [{**row, "teacher_entropy_cls": 3.0 - row["step"] / 10} for row in rows]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    index = outputs / "suites" / suite / "cpu"
    index.mkdir(parents=True)
    (index / "runs.json").write_text(json.dumps({"suite": suite, "profile": "cpu", "runs": entries}))


def edit_record(run_dir, **changes):
    """Rewrite a run's record with some fields changed, through the schema."""
    write_record(run_dir, dataclasses.replace(read_record(run_dir), **changes))


def run_dirs(outputs, suite="demo"):
    """The suite's run folders, in its index's order."""
    index_file = outputs / "suites" / suite / "cpu" / "runs.json"
    return [outputs / "runs" / e["run_dir"].split("/")[-1] for e in json.loads(index_file.read_text())["runs"]]


def test_ci95_matches_scipy_on_a_known_sample():
    sample = [41.2, 43.5, 42.1, 44.0, 40.9]
    mean, half = ci95(sample)
    low, high = stats.t.interval(0.95, len(sample) - 1, loc=np.mean(sample), scale=stats.sem(sample))
    assert mean == pytest.approx(pd.Series(sample).mean())
    assert (mean - half, mean + half) == pytest.approx((low, high))
    assert np.isnan(ci95([40.0])[1])


def test_report_builds_from_records_alone_and_shows_failed_and_missing_runs(tmp_path):
    write_records(tmp_path / "outputs", {
        ("none", "random init", 0): 34.0, ("none", "random init", 1): 35.0,
        ("mae", "random 0.75", 0): 42.0, ("mae", "random 0.75", 1): 43.5,
        ("mae", "random 0.9", 0): 39.0, ("mae", "random 0.9", 1): "failed",
        ("pixel", "random 0.6", 0): None, ("pixel", "random 0.6", 1): 30.0,
        ("ibot", "teacher", 0): 37.0, ("ibot", "teacher", 1): 36.0,
    })
    # which project modules the report may reach is test_layers' (read from the source); here, as it
    # runs, that nothing it imports, a library included, loads torch
    code = ("import sys, reports.build as b; rc = b.main(['--outputs', sys.argv[1], '--out', sys.argv[2]]); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch'); assert not bad, bad; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "outputs"), str(tmp_path / "report")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "report" / "demo" / "cpu"
    table = pd.read_csv(folder / "table.csv").set_index("setting")
    assert table.loc["random 0.9", "failed"] == 1 and table.loc["random 0.6", "missing"] == 1
    mean, half = ci95([42.0, 43.5])
    assert table.loc["random 0.75", "knn_top1_cls"] == f"{mean:.2f} ± {half:.2f}"
    assert table.loc["random 0.75", "paper linear"] == "73.5"       # MAE's ablation of this setting, its own column
    diffs = pd.read_csv(folder / "paired_differences.csv").set_index("setting")
    assert diffs.loc["random 0.75", "Δ knn_top1_cls"].startswith("+8.25 ± ")   # (8 + 8.5) / 2, paired by seed
    html = (folder / "index.html").read_text()
    assert "Failed, missing or incomplete runs" in html and "data:image/png;base64" in html
    for plot in ("vs_mask_ratio.png", "vs_flops.png", "loss_curves.png", "collapse_monitors.png"):
        assert (folder / plot).stat().st_size > 1000


def test_a_metric_from_fewer_seeds_than_finished_says_so_and_the_run_is_listed(tmp_path):
    """A run shared with a suite that asked for fewer evaluations is done but incomplete here:
    its metric cells say how many seeds they average, and the run is listed with what it lacks;
    evaluations another suite asked for stay out of this suite's table."""
    outputs = tmp_path / "outputs"
    write_records(outputs, {("none", "random init", 0): 34.0, ("none", "random init", 1): 35.0,
                            ("mae", "5 epochs", 0): 42.0, ("mae", "5 epochs", 1): 43.0})
    index_file = outputs / "suites" / "demo" / "cpu" / "runs.json"
    index = json.loads(index_file.read_text())
    for entry, run_dir in zip(index["runs"], run_dirs(outputs)):
        entry["evals"] = ["knn", "linear"]
        record = read_record(run_dir)
        knn = {k: v for k, v in record.metrics.items() if k.startswith("knn")}
        evals, metrics = {"knn": EvalRecord({"k": 20}, knn)}, dict(record.metrics)
        if entry["seed"] == 0:
            linear = {"linear_top1_cls": 50.0 if entry["method"] == "mae" else 44.0}
            finetune = {"finetune_top1": 60.0}          # asked for by another suite sharing the run
            evals.update(linear=EvalRecord({"epochs": 10}, linear), finetune=EvalRecord({"epochs": 10}, finetune))
            metrics.update(**linear, **finetune)
        edit_record(run_dir, evals=evals, metrics=metrics)
    index_file.write_text(json.dumps(index))
    out = subprocess.run([sys.executable, "-m", "reports.build", "--outputs", str(outputs),
                          "--out", str(tmp_path / "report")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "report" / "demo" / "cpu"
    table = pd.read_csv(folder / "table.csv").set_index("method")
    assert table.loc["mae", "linear_top1_cls"] == "50.00 (1 of 2 seeds)"
    assert table.loc["mae", "knn_top1_cls"] == "{:.2f} ± {:.2f}".format(*ci95([42.0, 43.0]))
    assert "finetune_top1" not in table.columns      # this suite did not ask for fine-tuning
    diffs = pd.read_csv(folder / "paired_differences.csv").set_index("method")
    assert diffs.loc["mae", "Δ linear_top1_cls"] == "+6.00 (1 of 2 seeds)"
    html = (folder / "index.html").read_text()
    assert "Failed, missing or incomplete runs" in html and html.count("<td>linear</td>") == 2


def test_report_without_records_says_what_to_run(tmp_path):
    out = subprocess.run([sys.executable, "-m", "reports.build", "--outputs", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "run python -m suites.run SUITE first" in out.stderr


@pytest.mark.skipif(not __import__("reports.screenshot").screenshot.find_browser(),
                    reason="no Chromium on this machine (apt install chromium)")
def test_the_html_page_renders_its_tables_and_plots_in_headless_chromium(tmp_path):
    from PIL import Image

    from reports.build import main as build
    from reports.screenshot import screenshot

    write_records(tmp_path / "outputs", {("none", "random init", 0): 34.0, ("none", "random init", 1): 35.0,
                                         ("mae", "random 0.75", 0): 42.0, ("mae", "random 0.75", 1): 43.5})
    assert build(["--outputs", str(tmp_path / "outputs"), "--out", str(tmp_path / "report")]) == 0
    page = tmp_path / "report" / "demo" / "cpu" / "index.html"
    empty = tmp_path / "empty.html"
    empty.write_text("<html><body></body></html>")
    pixels = np.asarray(Image.open(screenshot(page, tmp_path / "shot.png", height=1600)).convert("L"), float)
    blank = np.asarray(Image.open(screenshot(empty, tmp_path / "blank.png", height=1600)).convert("L"), float)
    assert pixels.std() > 5 * (blank.std() + 1)     # text and plots, not a white page
    rows_with_ink = (pixels < 128).any(axis=1).mean()
    assert rows_with_ink > 0.2       # tables and plots fill a good part of the page


def test_readme_block_is_replaced_with_the_table_and_a_plot(tmp_path):
    from reports.build import main as build

    write_records(tmp_path / "outputs", {("none", "random init", 0): 34.0, ("none", "random init", 1): 35.0,
                                         ("mae", "random 0.75", 0): 42.0, ("mae", "random 0.75", 1): 43.5,
                                         ("mae", "random 0.9", 0): 44.0})     # two ratios: a line to plot
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- results:demo/cpu -->\nold table\n<!-- /results -->\n\n## next\n")
    assert build(["--outputs", str(tmp_path / "outputs"), "--out", str(tmp_path / "report"),
                  "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title") and text.endswith("## next\n")
    assert "| mae" in text and "42.75 ±" in text                     # mean of 42.0 and 43.5
    assert "](docs/results/demo-cpu-vs_mask_ratio.png)" in text
    assert (tmp_path / "docs" / "results" / "demo-cpu-vs_mask_ratio.png").stat().st_size > 1000


def test_paper_columns_show_the_papers_ablation_of_a_setting_else_the_methods_headline():
    from reports.build import with_paper_columns
    table = pd.DataFrame({"method": ["mae", "mae", "beit", "pixel", "none"],
                          "setting": ["grid 0.75", "random 0.5", "random 0.4", "5 ep", "random init"]})
    papers = with_paper_columns(table)
    assert papers["paper linear"].tolist() == [66.0, 68.0, "–", "–", "–"]
    assert papers["paper ADE20K mIoU"].tolist() == ["–", 48.1, 42.93, "–", "–"]
    assert papers["paper setting"][0].startswith("MAE ViT-L") and papers["paper setting"][4] == "–"


def add_metrics(outputs, metrics):
    """Add metrics to the demo suite's records: metrics = {(method, setting, seed): {name: value}}."""
    index_file = outputs / "suites" / "demo" / "cpu" / "runs.json"
    for entry, run_dir in zip(json.loads(index_file.read_text())["runs"], run_dirs(outputs)):
        extra = metrics.get((entry["method"], entry["setting"], entry["seed"]))
        if extra:
            edit_record(run_dir, metrics={**read_record(run_dir).metrics, **extra})


def build_and_keep_figures(tmp_path, monkeypatch) -> dict:
    """Build the demo report in-process; the plots' figures by their title, kept open to inspect."""
    import matplotlib.pyplot as plt

    from reports.build import main as build
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert build(["--outputs", str(tmp_path / "outputs"), "--out", str(tmp_path / "report")]) == 0
    return {figure.get_suptitle().split(" per protocol")[0]: figure for figure in figures}


def test_a_seed_whose_baseline_lacks_the_metric_is_not_paired(tmp_path):
    outputs = tmp_path / "outputs"
    write_records(outputs, {("none", "random init", 0): 34.0, ("none", "random init", 1): 35.0,
                            ("mae", "5 epochs", 0): 42.0, ("mae", "5 epochs", 1): 43.0})
    add_metrics(outputs, {("none", "random init", 0): {"linear_top1_cls": 44.0},
                          ("mae", "5 epochs", 0): {"linear_top1_cls": 50.0},
                          ("mae", "5 epochs", 1): {"linear_top1_cls": 51.0}})
    from reports.build import main as build
    assert build(["--outputs", str(outputs), "--out", str(tmp_path / "report")]) == 0
    diffs = pd.read_csv(tmp_path / "report" / "demo" / "cpu" / "paired_differences.csv").set_index("method")
    assert diffs.loc["mae", "Δ linear_top1_cls"] == "+6.00 (1 of 2 seeds)"    # seed 1 has no baseline value


def test_two_baseline_cells_are_refused_with_a_one_line_error(tmp_path, capsys):
    write_records(tmp_path / "outputs", {("none", "random init", 0): 34.0, ("none", "random init (long)", 0): 35.0,
                                         ("mae", "random 0.75", 0): 42.0})
    from reports.build import main as build
    assert build(["--outputs", str(tmp_path / "outputs"), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: demo (cpu): the suite has 2 `none` cells") and err.count("\n") == 1


def test_mask_ratio_plot_joins_only_settings_that_differ_in_the_ratio(tmp_path, monkeypatch):
    """Raw and normalised pixels at one ratio are two points, never one averaged over both; a
    setting with no other ratio to join (MAE at 0.75 alone) is a lone marker."""
    write_records(tmp_path / "outputs", {
        ("none", "random init", 0): 34.0, ("none", "random init", 1): 35.0,
        ("pixel", "raw pixels, block 0.4", 0): 30.0, ("pixel", "raw pixels, block 0.4", 1): 31.0,
        ("pixel", "raw pixels, block 0.6", 0): 32.0, ("pixel", "raw pixels, block 0.6", 1): 33.0,
        ("pixel", "norm. pixels, block 0.4", 0): 40.0, ("pixel", "norm. pixels, block 0.4", 1): 41.0,
        ("pixel", "norm. pixels, block 0.6", 0): 42.0, ("pixel", "norm. pixels, block 0.6", 1): 43.0,
        ("mae", "random 0.75", 0): 45.0})
    figure = build_and_keep_figures(tmp_path, monkeypatch)["accuracy vs mask ratio"]
    knn_panel = figure.axes[0]
    lines = {tuple(np.round(line.get_ydata(), 2)) for line in knn_panel.lines}
    assert {(30.5, 32.5), (40.5, 42.5)} <= lines                    # one line per target, means over seeds
    assert (45.0,) in lines


def test_mask_ratio_plot_is_left_out_when_no_setting_has_a_second_ratio(tmp_path):
    """ablation_targets: every setting has one ratio, so there is no trend to draw."""
    write_records(tmp_path / "outputs", {
        ("none", "random init", 0): 34.0,
        ("pixel", "raw pixels, block 0.4", 0): 30.0, ("pixel", "norm. pixels, block 0.4", 0): 40.0,
        ("mae", "raw pixels, random 0.75", 0): 38.0, ("mae", "norm. pixels, random 0.75", 0): 41.0})
    from reports.build import main as build
    assert build(["--outputs", str(tmp_path / "outputs"), "--out", str(tmp_path / "report")]) == 0
    folder = tmp_path / "report" / "demo" / "cpu"
    assert not (folder / "vs_mask_ratio.png").exists() and (folder / "vs_flops.png").exists()


def test_flops_plot_has_a_panel_per_protocol_with_the_baseline_and_the_pages_method_colours(tmp_path, monkeypatch):
    from reports.build import method_palette
    write_records(tmp_path / "outputs", {("none", "random init", 0): 34.0, ("none", "random init", 1): 35.0,
                                         ("mae", "random 0.75", 0): 42.0, ("pixel", "random 0.6", 0): 30.0})
    figure = build_and_keep_figures(tmp_path, monkeypatch)["accuracy vs pre-training compute"]
    assert [ax.get_title() for ax in figure.axes] == ["protocol = knn_top1_cls", "protocol = knn_top1_mean"]
    for ax, baseline in zip(figure.axes, (34.5, 33.5)):           # knn_top1_mean = knn_top1_cls - 1
        assert [line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--"] == [baseline]
    palette = method_palette(pd.DataFrame({"method": ["none", "mae", "pixel"]}))
    colours = {tuple(np.round(colour[:3], 3)) for colour in figure.axes[0].collections[0].get_facecolors()}
    assert colours == {tuple(np.round(palette[method], 3)) for method in ("none", "mae", "pixel")}


def test_a_missing_readme_gives_a_one_line_error(tmp_path, capsys):
    from reports.build import main as build
    write_records(tmp_path / "outputs", {("none", "random init", 0): 34.0})
    assert build(["--outputs", str(tmp_path / "outputs"), "--out", str(tmp_path / "report"),
                  "--readme", str(tmp_path / "missing.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: README file") and "missing.md' not found" in err and err.count("\n") == 1


@pytest.mark.parametrize("browser", ["echo 'cannot open display' >&2; exit 1", "exec sleep 30"],
                         ids=["fails", "hangs"])
def test_a_failing_or_hanging_chromium_gives_a_one_line_error(tmp_path, monkeypatch, capsys, browser):
    import functools
    import os

    import reports.screenshot as shot
    fake = tmp_path / "bin" / "chromium"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\n{browser}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(shot, "screenshot", functools.partial(shot.screenshot, timeout=2))
    page = tmp_path / "index.html"
    page.write_text("<html><body>report</body></html>")
    assert shot.main([str(page), str(tmp_path / "shot.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {fake}") and err.count("\n") == 1


def test_a_cell_without_a_finished_run_is_a_row_of_the_difference_table(tmp_path):
    write_records(tmp_path / "outputs", {("none", "random init", 0): 34.0,
                                         ("mae", "random 0.75", 0): 42.0, ("pixel", "random 0.6", 0): "failed"})
    from reports.build import main as build
    assert build(["--outputs", str(tmp_path / "outputs"), "--out", str(tmp_path / "report")]) == 0
    diffs = pd.read_csv(tmp_path / "report" / "demo" / "cpu" / "paired_differences.csv").set_index("method")
    assert diffs.loc["pixel", "Δ knn_top1_cls"] == "–" and diffs.loc["mae", "Δ knn_top1_cls"] == "+8.00"


def test_run_figures_are_captioned_with_method_setting_and_seed(tmp_path):
    from PIL import Image

    from reports.build import main as build
    outputs = tmp_path / "outputs"
    write_records(outputs, {("none", "random init", 0): 34.0, ("mae", "random 0.75", 1): 42.0})
    entry = json.loads((outputs / "suites" / "demo" / "cpu" / "runs.json").read_text())["runs"][1]
    figures = outputs / "runs" / entry["run_dir"].split("/")[-1] / "figures"
    figures.mkdir()
    Image.new("RGB", (8, 8)).save(figures / "reconstructions.png")
    assert build(["--outputs", str(outputs), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "demo" / "cpu" / "index.html").read_text()
    assert "<figcaption>mae random 0.75, seed 1 (mae-" in page


def test_a_started_run_shows_as_unfinished_and_a_failed_evaluation_names_its_error(tmp_path):
    from reports.tables import load_index, summarize
    write_records(tmp_path / "outputs", {("none", "random init", 0): 34.0, ("mae", "random 0.75", 0): 42.0,
                                         ("mae", "random 0.75", 1): None})
    index = tmp_path / "outputs" / "suites" / "demo" / "cpu" / "runs.json"
    entries = json.loads(index.read_text())["runs"]
    started = index.parent / entries[2]["run_dir"]
    (started / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')         # pre-training under way
    edit_record(run_dirs(tmp_path / "outputs")[1], evals={"knn": EvalRecord({"k": 20}, {})},
                failed_evaluation={"error": "RuntimeError: probe diverged"})
    index.write_text(json.dumps({"suite": "demo", "profile": "cpu",
                                 "runs": [{**e, "evals": ["knn", "linear"]} for e in entries]}))
    runs = load_index(index).set_index("seed", append=True)
    assert runs["status"].tolist() == ["done", "done", "unfinished"]
    assert runs["missing evaluations"].iloc[1] == "linear (last failure: RuntimeError: probe diverged)"
    table = summarize(load_index(index), ["knn_top1_cls"]).set_index("setting")
    assert table.loc["random 0.75", "missing"] == 1 and table.loc["random 0.75", "seeds done"] == 1


def cut_short(run_dir):
    """result.json as a copy cut short or a full disk leaves it."""
    path = run_dir / "result.json"
    path.write_text(path.read_text()[:40])


def seed_as_text(run_dir):
    path = run_dir / "result.json"
    path.write_text(path.read_text().replace('"seed": 0', '"seed": "zero"'))


def newer_schema(run_dir):
    path = run_dir / "result.json"
    path.write_text(path.read_text().replace('"schema": 1', '"schema": 2'))


@pytest.mark.parametrize("damage, problem", [(cut_short, "not valid JSON"),
                                             (seed_as_text, "'seed' must be int, got 'zero'"),
                                             (newer_schema, "upgrade mimbench")],
                         ids=["truncated", "wrong-type", "newer-schema"])
def test_an_unreadable_record_is_named_and_listed_and_the_other_runs_are_reported(tmp_path, capsys,
                                                                                    damage, problem):
    from reports.build import main as build
    outputs = tmp_path / "outputs"
    write_records(outputs, {("none", "random init", 0): 34.0, ("none", "random init", 1): 35.0,
                            ("mae", "random 0.75", 0): 42.0, ("mae", "random 0.75", 1): 43.5})
    bad = run_dirs(outputs)[2] / "result.json"                      # mae, seed 0
    damage(bad.parent)
    damaged = bad.read_bytes()
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:demo/cpu -->\nold table\n<!-- /results -->\n")
    assert build(["--outputs", str(outputs), "--out", str(tmp_path / "report"), "--readme", str(readme)]) == 0
    warnings = capsys.readouterr().err.splitlines()
    assert warnings[0].startswith(f"warning: {bad}: ") and problem in warnings[0]
    assert warnings[0].endswith("; shown as unreadable")
    assert warnings[1] == f"warning: demo (cpu): 1 unreadable record(s); {readme} left as it was"
    folder = tmp_path / "report" / "demo" / "cpu"
    runs = pd.read_csv(folder / "runs.csv").set_index(["method", "seed"])
    assert runs.loc[("mae", 0), "status"] == "unreadable" and problem in runs.loc[("mae", 0), "problem"]
    table = pd.read_csv(folder / "table.csv").set_index("method")
    assert table.loc["mae", "knn_top1_cls"] == "43.50" and table.loc["mae", "missing"] == 1
    assert table.loc["none", "knn_top1_cls"] == "{:.2f} ± {:.2f}".format(*ci95([34.0, 35.0]))
    page = (folder / "index.html").read_text()
    listed = page.split("Failed, missing or incomplete runs")[1].split("<h2>")[0]
    assert "<td>unreadable</td>" in listed and bad.parent.name in listed
    assert bad.read_bytes() == damaged and "old table" in readme.read_text()      # nothing overwritten


def test_when_no_record_is_readable_the_report_is_left_as_it_was_and_the_exit_code_is_1(tmp_path):
    outputs = tmp_path / "outputs"
    write_records(outputs, {("none", "random init", 0): 34.0, ("mae", "random 0.75", 0): 42.0})
    for run_dir in run_dirs(outputs):
        cut_short(run_dir)
    earlier = tmp_path / "report" / "demo" / "cpu" / "index.html"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("the last good report")
    out = subprocess.run([sys.executable, "-m", "reports.build", "--outputs", str(outputs),
                          "--out", str(tmp_path / "report")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert [line.split(":")[0] for line in lines] == ["warning"] * 3 + ["error"]
    assert "Traceback" not in out.stderr and lines[-1].startswith("error: no readable")
    assert earlier.read_text() == "the last good report"


def test_a_damaged_suite_index_skips_that_suite_only(tmp_path, capsys):
    from reports.build import main as build
    outputs = tmp_path / "outputs"
    write_records(outputs, {("none", "random init", 0): 34.0, ("mae", "random 0.75", 0): 42.0})
    write_records(outputs, {("none", "random init", 0): 34.0}, suite="other")
    index_file = outputs / "suites" / "other" / "cpu" / "runs.json"
    index_file.write_text(index_file.read_text()[:30])
    assert build(["--outputs", str(outputs), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {index_file}: ") and err.endswith("suite other (cpu) skipped\n")
    assert err.count("\n") == 1
    assert (tmp_path / "report" / "demo" / "cpu" / "index.html").exists()
    assert not (tmp_path / "report" / "other").exists()


def test_a_cut_short_line_of_the_training_log_is_skipped(tmp_path):
    from reports.build import main as build
    outputs = tmp_path / "outputs"
    write_records(outputs, {("none", "random init", 0): 34.0, ("mae", "random 0.75", 0): 42.0})
    with open(run_dirs(outputs)[1] / "metrics.jsonl", "a") as log:
        log.write('{"step": 5, "lo')                          # killed mid-write
    assert build(["--outputs", str(outputs), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "demo" / "cpu" / "loss_curves.png").stat().st_size > 1000
