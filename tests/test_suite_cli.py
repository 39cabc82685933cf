"""The suite entry point, run as a user runs it (a subprocess), on the smoke profile."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from suites.profiles import get_profile
from suites.registry import get_suite


# k-NN top-1 ([CLS], mean) of the smoke grid's runs (tokenizer: codebook usage, PSNR dB), as the
# code printed them before the run layer moved to runs/ (every encoder byte-identical since);
# deterministic on CPU, compared within one test image (100 / 320 %) for other BLAS kernels
SMOKE_VALUES = {
    "beit-52674a8f63f0": (95.0, 98.75),
    "beit-bef874678be2": (94.6875, 98.4375),
    "dvae-e6a7f6f50c81": (0.453125, 11.9089),
    "ibot-72ec73a4933f": (94.6875, 98.75),
    "ibot-7bf7d18313e1": (94.6875, 98.75),
    "ibot-f22c9fc4bf6e": (94.6875, 98.75),
    "mae-0f5cb314a47b": (95.0, 99.0625),
    "mae-185f1eb64f03": (95.625, 98.75),
    "mae-1c06d54bc51a": (95.625, 98.75),
    "mae-52ab0a4aefb3": (95.625, 98.75),
    "mae-5657f0f4887f": (95.0, 99.0625),
    "mae-b1166eacfbf9": (95.9375, 98.75),
    "mae-b1d1bfefa134": (95.9375, 99.0625),
    "none-9d452c63a5fe": (95.0, 98.75),
    "pixel-6918b1f32d72": (94.375, 98.4375),
    "pixel-a3a822ceb08c": (94.375, 98.4375),
}
ONE_TEST_IMAGE = 100 / 320 + 1e-9


def run_cli(*args, outputs, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "suites.run", *args, "--outputs", str(outputs),
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_smoke_suite_writes_one_record_per_run_and_a_rerun_runs_nothing(tmp_path):
    # the shared recipe: the runs (and values) pinned before paper recipes existed
    first = run_cli("ablation_masking", "--profile", "smoke", "--recipe", "shared", outputs=tmp_path)
    assert first.returncode == 0, first.stderr
    results = sorted((tmp_path / "runs").glob("*/result.json"))
    cells = get_suite("ablation_masking").grid(get_profile("smoke"), "shared")
    assert len(results) == len(cells) + 1       # every grid cell + the one tokenizer both BEiT cells share
    records = [json.loads(p.read_text()) for p in results]
    assert {r["method"] for r in records} == {cell.method for cell in cells} | {"dvae"}
    for record in records:
        assert record["status"] == "done"
        name = f"{record['method']}-{record['config_hash']}"
        if record["method"] == "dvae":          # a tokenizer: evaluated as one, it has no encoder
            usage, psnr = SMOKE_VALUES[name]
            assert record["metrics"]["tokenizer_codebook_usage"] == pytest.approx(usage, abs=1 / 64)
            assert record["metrics"]["tokenizer_psnr"] == pytest.approx(psnr, abs=0.05)
            continue
        cls, mean = SMOKE_VALUES[name]
        assert abs(record["metrics"]["knn_top1_cls"] - cls) <= ONE_TEST_IMAGE, name
        assert abs(record["metrics"]["knn_top1_mean"] - mean) <= ONE_TEST_IMAGE, name
        assert (results[0].parent.parent / Path(record["method"] + "-" + record["config_hash"])
                / "encoder.safetensors").exists()
    table = (tmp_path / "suites" / "ablation_masking" / "smoke" / "table.md").read_text()
    assert "random 0.75" in table and "knn_top1_cls" in table

    stamps = {p: p.stat().st_mtime_ns for p in results}
    second = run_cli("ablation_masking", "--profile", "smoke", "--recipe", "shared", outputs=tmp_path)
    assert second.returncode == 0, second.stderr
    assert {p: p.stat().st_mtime_ns for p in results} == stamps, "a finished run ran again"
    assert "pre-train" not in second.stderr


def test_only_filters_the_grid_and_dry_run_prints_costs_without_running(tmp_path):
    out = run_cli("ablation_masking", "--profile", "cpu", "--only", "mae,none", "--dry-run", outputs=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if " seed " in line]
    assert len(lines) == 3 * 8                          # (4 MAE ratios + 3 MAE strategies + none) x 3 seeds
    assert "estimated pre-training" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_only_with_a_setting_keeps_one_cell(tmp_path):
    out = run_cli("ablation_masking", "--profile", "cpu", "--only", "none,beit:random 0.4", "--seeds", "1",
                  "--dry-run", outputs=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines() if " seed " in line]
    # and the init of BEiT's paper architecture (layer scale 0.1), which the kept BEiT cell trains from
    assert [(words[0], words[1]) for words in lines] == [("none", "random"), ("beit", "random"), ("none", "init")]


@pytest.mark.parametrize("args,message", [
    (["ablation_mask"], "unknown suite 'ablation_mask'; known: ablation_mae_decoder, ablation_masking, ablation_targets, compare_methods"),
    (["ablation_masking", "--profile", "laptop"], "unknown profile 'laptop'; known: cpu, gpu, imagenet, smoke"),
    (["ablation_masking", "--only", "maee"], "--only names 'maee', not in suite 'ablation_masking'"),
    (["ablation_masking", "--only", "beit:grid 0.4"], "beit has no setting 'grid 0.4' in suite 'ablation_masking'; "
                                                      "its settings: 'block 0.4', 'random 0.4'"),
    (["ablation_masking", "--profile", "cpu", "--data", "/no/such/folder"], "not found; pass --data PATH"),
    (["ablation_masking", "--seeds", "0"], "--seeds must be >= 1"),
])
def test_bad_input_gives_a_one_line_error_and_exit_code_2(tmp_path, args, message):
    out = run_cli(*args, outputs=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "runs").exists()


def test_table_only_runs_nothing_and_shows_unfinished_runs_as_missing(tmp_path):
    done = run_cli("ablation_masking", "--profile", "smoke", "--only", "none", outputs=tmp_path)
    assert done.returncode == 0, done.stderr
    out = run_cli("ablation_masking", "--profile", "smoke", "--only", "none,mae", "--table-only", outputs=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "runs").iterdir()) == ["none"]   # nothing ran
    import pandas as pd
    table = pd.read_csv(tmp_path / "suites" / "ablation_masking" / "smoke" / "table.csv").set_index("setting")
    assert table.loc["random init", "seeds done"] == 1 and table.loc["random 0.75", "missing"] == 1


def test_the_index_lists_the_whole_grid_whichever_cells_ran(tmp_path):
    """Two processes running different cells (--only) side by side write the same index, so
    neither one's table drops the other's runs."""
    done = run_cli("ablation_masking", "--profile", "smoke", "--only", "none", outputs=tmp_path)
    assert done.returncode == 0, done.stderr
    index = json.loads((tmp_path / "suites" / "ablation_masking" / "smoke" / "runs.json").read_text())
    cells = get_suite("ablation_masking").grid(get_profile("smoke"))
    # every cell, then the init row of the paper recipes' layer scale (pixel, BEiT)
    assert [(r["method"], r["setting"]) for r in index["runs"]] == \
        [(c.method, c.setting) for c in cells] + [("none", "init (layer_scale 0.1)")]
    assert "random 0.75" in (tmp_path / "suites" / "ablation_masking" / "smoke" / "table.md").read_text()


def test_records_name_the_commit_of_the_code_that_ran():
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    from runs.execute import SOURCE_COMMIT, provenance

    commit, _, dirty = SOURCE_COMMIT.partition("+")
    assert commit == head.stdout.strip() and dirty in ("", "dirty")
    assert provenance()["git_commit"] == SOURCE_COMMIT


def test_dry_run_state_names_the_evaluations_a_pretrained_run_still_needs(tmp_path):
    from runs.identity import RunSpec
    from runs.records import EvalRecord, RunRecord, write_record
    from runs.state import read_state

    def run_state(run_dir, spec, profile):
        return read_state(run_dir, spec.evals, spec.method, profile).label
    spec = RunSpec("mae", "random 0.75", evals=("knn", "linear", "finetune"))
    assert run_state(tmp_path / "absent", spec, None) == "to run"
    record = RunRecord(status="done", method="mae", seed=0, config_hash="0" * 12, train={"steps": 1},
                       evals={"knn": EvalRecord(config={}, metrics={"knn_top1_cls": 40.0})})
    write_record(tmp_path, record)
    assert run_state(tmp_path, spec, None) == "to evaluate: linear, finetune"
    assert run_state(tmp_path, RunSpec("mae", "random 0.75"), None) == "done"
    write_record(tmp_path, RunRecord(status="failed", method="mae", seed=0, config_hash="0" * 12, error="x"))
    assert run_state(tmp_path, spec, None) == "failed"


def test_a_smaller_seeds_count_keeps_the_finished_seeds_in_the_table(tmp_path):
    done = run_cli("ablation_masking", "--profile", "smoke", "--only", "none", "--seeds", "2", outputs=tmp_path)
    assert done.returncode == 0, done.stderr
    out = run_cli("ablation_masking", "--profile", "smoke", "--seeds", "1", "--table-only", outputs=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "1 finished run(s) of other seeds" in out.stdout
    index = json.loads((tmp_path / "suites" / "ablation_masking" / "smoke" / "runs.json").read_text())
    assert [r["seed"] for r in index["runs"] if r["setting"] == "random init"] == [0, 1]
    import pandas as pd
    table = pd.read_csv(tmp_path / "suites" / "ablation_masking" / "smoke" / "table.csv").set_index("setting")
    assert table.loc["random init", "seeds done"] == 2 and table.loc["random 0.75", "missing"] == 1


def test_only_keeps_a_setting_whose_name_has_a_comma(tmp_path):
    out = run_cli("ablation_targets", "--profile", "cpu", "--seeds", "1", "--dry-run",
                  "--only", "pixel:raw pixels, block 0.4,none", outputs=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [line.split()[:4] for line in out.stdout.splitlines() if " seed " in line]
    # and the init of pixel's paper architecture (layer scale 0.1), which the kept pixel cell trains from
    assert lines == [["none", "random", "init", "seed"], ["pixel", "raw", "pixels,", "block"],
                     ["none", "init", "(layer_scale", "0.1)"]]
    empty = run_cli("ablation_targets", "--only", ",", "--dry-run", outputs=tmp_path)
    assert empty.returncode == 2 and "names nothing" in empty.stderr


def test_outputs_that_cannot_be_created_is_a_one_line_error_and_exit_code_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = run_cli("ablation_masking", "--profile", "smoke", "--only", "none", outputs=blocker / "sub")
    assert out.returncode == 2, out.stderr
    assert f"--outputs {blocker / 'sub'} cannot be created or written" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_outputs_that_cannot_be_written_is_a_one_line_error_and_exit_code_2(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    out = run_cli("ablation_masking", "--profile", "smoke", "--only", "none", outputs=locked)
    assert out.returncode == 2 and "cannot be created or written" in out.stderr


def test_a_damaged_record_fails_its_run_only_and_is_left_as_it_is(tmp_path):
    done = run_cli("ablation_masking", "--profile", "smoke", "--only", "none", outputs=tmp_path)
    assert done.returncode == 0, done.stderr
    [record] = (tmp_path / "runs").glob("none-*/result.json")
    damaged = record.read_text()[:50]
    record.write_text(damaged)                              # a copy cut short
    plan = run_cli("ablation_masking", "--profile", "smoke", "--only", "none,mae:random 0.75", "--dry-run",
                   outputs=tmp_path)
    assert "[unreadable]" in plan.stdout
    out = run_cli("ablation_masking", "--profile", "smoke", "--only", "none,mae:random 0.75", outputs=tmp_path)
    assert out.returncode == 1
    assert f"FAILED: {record}: not valid JSON" in out.stderr
    assert record.read_text() == damaged                    # nothing overwritten
    [mae] = (tmp_path / "runs").glob("mae-*/result.json")   # the other run still ran
    assert json.loads(mae.read_text())["status"] == "done"


def test_a_damaged_suite_index_is_named_and_written_anew(tmp_path):
    index = tmp_path / "suites" / "ablation_masking" / "smoke" / "runs.json"
    index.parent.mkdir(parents=True)
    index.write_text('{"suite": "ablation_masking", "runs": [')       # cut short
    out = run_cli("ablation_masking", "--profile", "smoke", "--table-only", outputs=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"warning: {index}: cannot be read" in out.stderr and "written anew from this grid" in out.stderr
    cells = get_suite("ablation_masking").grid(get_profile("smoke"))
    assert len(json.loads(index.read_text())["runs"]) == len(cells) + 1     # + the paper layer scale's init row


def test_the_dry_run_names_the_recipe_and_the_index_records_each_runs_recipe(tmp_path):
    plan = run_cli("ablation_masking", "--profile", "smoke", "--dry-run", "--recipe", "shared", outputs=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.splitlines()[0] == "suite ablation_masking, profile smoke, recipe shared: 15 runs"
    out = run_cli("ablation_masking", "--profile", "smoke", "--table-only", outputs=tmp_path)
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "suites" / "ablation_masking" / "smoke" / "runs.json").read_text())
    recipes = {(r["method"], r["recipe"]) for r in index["runs"]}
    assert recipes == {("none", "shared"), ("mae", "paper"), ("pixel", "paper"), ("ibot", "paper"), ("beit", "paper")}
    assert "budget" not in index


def test_finished_runs_of_the_other_recipe_stay_in_the_index_beside_this_ones(tmp_path):
    """`--recipe shared` then `--recipe paper`: one table with a row per recipe of each cell."""
    shared = run_cli("ablation_masking", "--profile", "smoke", "--recipe", "shared", "--only", "mae:random 0.75",
                     outputs=tmp_path)
    assert shared.returncode == 0, shared.stderr
    paper = run_cli("ablation_masking", "--profile", "smoke", "--table-only", outputs=tmp_path)
    assert paper.returncode == 0, paper.stderr
    assert "1 finished run(s) of other seeds or the other recipe" in paper.stdout
    index = json.loads((tmp_path / "suites" / "ablation_masking" / "smoke" / "runs.json").read_text())
    cell = [(r["recipe"], r["seed"]) for r in index["runs"] if r["setting"] == "random 0.75"]
    assert cell == [("paper", 0), ("shared", 0)]
    import pandas as pd
    table = pd.read_csv(tmp_path / "suites" / "ablation_masking" / "smoke" / "table.csv")
    rows = table[table["setting"] == "random 0.75"].set_index("recipe")
    assert rows.loc["shared", "seeds done"] == 1 and rows.loc["paper", "missing"] == 1
