"""`suites.run compare_methods --budget`: every method at the pre-training FLOPs of E MAE-epochs,
E given ("1.3ep") or solved from hours at this machine's measured FLOP/s (outputs/calibration.json)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from runs import cost
from runs.cost import CALIBRATION_FILE, Calibration, calibrate, machine, plan_seconds
from runs.identity import data_descriptor
from suites.profiles import get_profile
from runs.plan import plan_of
from suites.budget import ComputeBudget, allocate, budget_runs, parse_budget
from suites.run import cli

PINNED = json.loads((ROOT / "tests" / "data" / "run_names.json").read_text())
CPU_DATA = {"name": "cifar10", "path": PINNED["data_path"], "img_size": 32}


def run_cli(*args, outputs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "suites.run", *args, "--outputs", str(outputs), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def fixed_calibration(flops_per_second: float) -> Calibration:
    record = {"threads": 1, "device_type": "cpu", "steps": 8, "batch_size": 64, "timestamp": "test"}
    return Calibration(flops_per_second, record, source="recorded")


def test_a_budget_is_hours_or_mae_epochs():
    assert parse_budget("2.5") == parse_budget("2.5h") == ComputeBudget(hours=2.5)
    assert parse_budget("1.3ep") == ComputeBudget(mae_epochs=1.3)
    assert parse_budget(" 1.304EP ") == ComputeBudget(mae_epochs=1.3)      # E is rounded to 0.01


@pytest.mark.parametrize("args,message", [
    (["compare_methods", "--budget", "abc"], "--budget 'abc' is neither hours ('2.5' or '2.5h') nor MAE-epochs"),
    (["compare_methods", "--budget", "-1"], "--budget '-1' must be a positive number"),
    (["compare_methods", "--budget", "0.001ep"], "--budget '0.001ep' must be a positive number"),
    (["ablation_masking", "--budget", "1.3ep"], "--budget applies to compare_methods only"),
    (["compare_methods", "--budget", "1.3ep", "--evals", "knn,fewshot"], "unknown evaluation 'fewshot'; known:"),
    (["compare_methods", "--evals", "knn"], "--evals needs --budget"),
    (["compare_methods", "--recipe", "mine"], "--recipe 'mine' unknown; known: paper, shared"),
])
def test_bad_budget_arguments_are_a_one_line_error_and_exit_code_2(tmp_path, args, message):
    out = run_cli(*args, "--dry-run", outputs=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / CALIBRATION_FILE).exists()        # nothing measured for bad input


def test_hours_solve_for_the_largest_mae_epochs_that_fit_and_more_hours_give_more(tmp_path):
    profile = get_profile("cpu")
    calibration = fixed_calibration(50e9)
    solved = []
    for hours in (2.0, 2.5, 4.0, 8.0):
        allocation = allocate(ComputeBudget(hours=hours), profile, "shared", ("knn", "linear"), 3, CPU_DATA,
                              tmp_path, tmp_path / "suite", calibration, recalibrate=False)
        runs = budget_runs(profile, "shared", allocation.mae_epochs, ("knn", "linear"), 3, CPU_DATA)
        total = plan_seconds(plan_of(runs, profile, tmp_path), 50e9)[2]
        assert 0.95 * hours * 3600 <= total <= hours * 3600, (hours, allocation.mae_epochs, total)
        # 0.01 MAE-epochs more would not fit
        more = budget_runs(profile, "shared", allocation.mae_epochs + 0.01, ("knn", "linear"), 3, CPU_DATA)
        assert plan_seconds(plan_of(more, profile, tmp_path), 50e9)[2] > hours * 3600
        solved.append(allocation.mae_epochs)
    assert solved == sorted(solved) and solved[0] < solved[-1], solved
    # twice the FLOP/s, the same hours: more than twice the epochs (the evaluations shrink too)
    faster = allocate(ComputeBudget(hours=2.5), profile, "shared", ("knn", "linear"), 3, CPU_DATA, tmp_path,
                      tmp_path / "suite", fixed_calibration(100e9), recalibrate=False)
    assert faster.mae_epochs > 2 * solved[1]


def test_a_budget_below_the_evaluations_alone_is_a_config_error(tmp_path):
    from core.config import ConfigError
    with pytest.raises(ConfigError, match=r"--budget 0.1h does not cover the suite without its pre-training"):
        allocate(ComputeBudget(hours=0.1), get_profile("cpu"), "shared", ("knn", "linear"), 3, CPU_DATA,
                 tmp_path, tmp_path / "suite", fixed_calibration(50e9), recalibrate=False)


def test_the_calibration_is_recorded_reused_and_measured_again_for_other_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))      # an idle machine (else: not recorded)
    monkeypatch.setattr(cost, "matmul_peak", lambda: 100e9)
    profile = get_profile("smoke")
    first = calibrate(profile, tmp_path)
    record = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    assert not first.reused and first.flops_per_second > 0 and first.warning is None
    assert {"cpu", "cpu_count", "threads", "torch", "device", "device_type", "flops_per_second",
            "timestamp"} <= set(record)
    assert record["flops_per_second"] == first.flops_per_second

    again = calibrate(profile, tmp_path)
    assert again.reused and again.flops_per_second == first.flops_per_second

    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({**record, "threads": record["threads"] + 7}))
    other_threads = calibrate(profile, tmp_path)
    assert not other_threads.reused
    assert json.loads((tmp_path / CALIBRATION_FILE).read_text())["threads"] == record["threads"]
    assert not calibrate(profile, tmp_path, recalibrate=True).reused


def dry_run(capsys, outputs, *args) -> str:
    assert cli(["compare_methods", "--profile", "smoke", "--dry-run", "--outputs", str(outputs), *args]) == 0
    return capsys.readouterr().out


def test_the_dry_run_warns_below_the_budget_that_separated_mae_from_random_init(tmp_path, capsys):
    low = dry_run(capsys, tmp_path, "--budget", "1.29ep", "--recipe", "shared")
    assert "E = 1.29 MAE-epochs" in low
    assert "WARNING: 1.29 MAE-epochs is below the 5 at which nano MAE was measured to separate" in low
    # iBOT at 0.05 of an epoch of 10 steps: no step at all
    assert "WARNING: ibot trains 0 steps at 0.05 epochs (10 steps per epoch)" in low
    high = dry_run(capsys, tmp_path, "--budget", "5ep", "--recipe", "shared")
    assert "E = 5 MAE-epochs" in high and "WARNING" not in high


def test_recipe_shared_keeps_the_pinned_names_of_compare_methods(tmp_path, capsys):
    assert cli(["compare_methods", "--profile", "cpu", "--recipe", "shared", "--dry-run", "--data",
                PINNED["data_path"], "--outputs", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "recipe shared" in printed
    names = [line.rsplit("  [", 1)[0].split()[-1] for line in printed.splitlines() if " seed " in line]
    assert names == [name for _, _, _, name in PINNED["runs"]["cpu"]["compare_methods"]]


def test_the_index_records_recipe_and_budget_and_the_same_command_keeps_the_solved_epochs(tmp_path, capsys):
    # (hours generous enough that a slow or busy machine's calibration still covers the evaluations)
    out = run_cli("compare_methods", "--profile", "smoke", "--budget", "0.5h", "--table-only", outputs=tmp_path)
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "suites" / "compare_methods" / "smoke-budget" / "runs.json").read_text())
    budget = index["budget"]
    assert budget["hours"] == 0.5 and budget["mae_epochs"] > 0 and budget["recipe"] == "paper"
    assert budget["flops_per_image_mae"] > 0 and budget["flops_per_second"] > 0 and budget["seeds"] == 1
    assert budget["calibration"]["threads"] == 1
    # the paper recipes' layer scale (pixel, BEiT) gets its own init row, last
    assert [(e["method"], e["recipe"]) for e in index["runs"]] == [
        ("none", "shared"), ("mae", "paper"), ("pixel", "paper"), ("beit", "paper"), ("ibot", "paper"),
        ("none", "shared")]
    assert index["runs"][-1]["setting"] == "init (layer_scale 0.1)"
    assert {e["init_run"] for e in index["runs"] if e["method"] in ("pixel", "beit")} == \
        {index["runs"][-1]["run_dir"].split("/")[-1]}
    assert [e["setting"] for e in index["runs"]][1] == f"budget {budget['mae_epochs']:g}ep MAE FLOPs " \
                                                      f"({budget['mae_epochs']:g} ep)"
    # finished or not, another command with this budget runs the same cells: E is kept
    (tmp_path / CALIBRATION_FILE).write_text("{}")           # even when the FLOP/s would be measured anew
    kept = dry_run(capsys, tmp_path, "--budget", "0.5h")
    assert f"E = {budget['mae_epochs']:g} MAE-epochs of pre-training FLOPs per method (kept from" in kept
    assert "(solved for the hours)" in dry_run(capsys, tmp_path, "--budget", "0.5h", "--recalibrate")


def test_finished_runs_cost_nothing_so_the_same_hours_then_buy_more_epochs(tmp_path, capsys):
    # a recorded FLOP/s for this machine, not a measured one: the estimate is a staircase in E (whole
    # steps), so whether freeing `none`'s evaluations crosses the next step's cost (one iBOT step is
    # ~10x `none`'s evaluations at smoke size) would otherwise depend on where a measured FLOP/s lands
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({
        **machine(), "device_type": "cpu", "profile": "smoke", "flops_per_second": 10e9, "steps": 8,
        "batch_size": 64, "method": "mae", "timestamp": "test"}))
    before = dry_run(capsys, tmp_path, "--budget", "0.5h")
    assert "10.0 GFLOP/s recorded" in before
    assert cli(["compare_methods", "--profile", "smoke", "--budget", "1ep", "--only", "none", "--no-progress",
                "--outputs", str(tmp_path)]) == 0
    capsys.readouterr()
    after = dry_run(capsys, tmp_path, "--budget", "0.5h")
    none_line = next(line for line in after.splitlines() if line.lstrip().startswith("none "))
    assert "~   0.0 min" in none_line and none_line.endswith("[done]")

    def solved(text: str) -> float:
        return float(text.split("E = ")[1].split()[0])

    assert solved(after) > solved(before)
    # exactly nothing left of `none` (the printed "0.0 min" is rounded)
    profile = get_profile("smoke")
    grid = budget_runs(profile, "paper", solved(after), ("knn", "linear"), 1, data_descriptor(profile, None))
    left = plan_seconds(plan_of(grid, profile, tmp_path), 10e9)[0]
    [random_init] = [run.name for run in grid if run.spec.setting == "random init"]
    assert sum(left[random_init].values()) == 0.0


def test_the_other_recipes_finished_runs_stay_in_the_index_though_their_epochs_label_differs(tmp_path):
    """iBOT's FLOPs-matched epochs differ by recipe ("(0.05 ep)" vs "(0.04 ep)"): the shared
    run is still the same cell's other-recipe row in the paper command's table."""
    done = run_cli("compare_methods", "--profile", "smoke", "--budget", "1ep", "--recipe", "shared",
                   "--only", "ibot", outputs=tmp_path)
    assert done.returncode == 0, done.stderr
    out = run_cli("compare_methods", "--profile", "smoke", "--budget", "1ep", "--table-only", outputs=tmp_path)
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "suites" / "compare_methods" / "smoke-budget" / "runs.json").read_text())
    ibot = [(e["recipe"], e["setting"]) for e in index["runs"] if e["method"] == "ibot"]
    assert ("shared", next(s for r, s in ibot if r == "shared")) in ibot and any(r == "paper" for r, _ in ibot)


def test_every_encoders_fine_tune_is_costed_with_its_sweep_at_seed_0_and_once_at_other_seeds():
    """Seed 0 of a cell tries 6 candidates (3 blrs x 2 layer decays) on train minus the held-out
    5k, then trains on all of train: about 6.3 fine-tunes; its other seeds take seed 0's choice
    and fine-tune once. `none` and a pre-trained encoder (the same nano ViT) cost the same."""
    from runs.cost import evaluation_flops
    from suites.plan import select_runs as plan
    profile = get_profile("cpu")
    cost = {(run.spec.method, run.seed): evaluation_flops("finetune", run.config, profile)
            for run in plan("compare_methods", "cpu", 2, "none,mae:5 epochs", None, check_data=False, recipe="shared")}
    epochs = profile.eval_config("finetune").epochs
    runs_of_the_sweep = 6 * (3 * epochs * 45_000 + 5_000) / (3 * epochs * 50_000 + 10_000)
    for method in ("none", "mae"):
        assert cost[method, 0] / cost[method, 1] == pytest.approx(1 + runs_of_the_sweep)      # 6.32
    assert cost["none", 0] == cost["mae", 0] and cost["none", 1] == cost["mae", 1]


def test_the_tokenizer_is_costed_at_the_share_of_the_calibrated_rate_its_convolutions_sustain(tmp_path):
    """BEiT's dVAE trains at about two thirds of MAE's FLOP/s (measured; the plan once said 8.1
    min for 14.6): its prerequisite time is its FLOPs at that share of the rate."""
    from runs.cost import pretrain_flops
    from suites.plan import select_runs as plan
    from methods import registry
    [run] = plan("compare_methods", "cpu", 1, "beit:5 epochs", None, check_data=False, recipe="shared")
    [tokenizer] = [need.config for need in run.config.requires.values()]
    _, prerequisites, _ = plan_seconds(plan_of([run], get_profile("cpu"), tmp_path), 1e10)
    efficiency = registry["dvae"][0].training_efficiency
    assert 0.5 < efficiency < 0.8
    assert prerequisites == {tokenizer.name: pytest.approx(pretrain_flops(tokenizer) / (1e10 * efficiency))}
    assert all(0 < registry[m][0].training_efficiency <= 1 for m in registry)
