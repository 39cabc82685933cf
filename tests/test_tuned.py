"""--recipe tuned: each method's lr chosen on held-out data only (suites.tune, knn_holdout), the
grid extended when the choice lands at an edge; masks scaled to the grid under paper and tuned,
unchanged under shared."""
import dataclasses
import json

import pytest
import torch

from core.config import ConfigError
from engine.data import Splits, synthetic_splits
from eval.knn import KNNConfig, knn_metrics
from eval.registry import EvalContext, get_evaluation
from methods.masking import SCALED, MaskConfig, make_masks
from methods.vit import ViT, ViTConfig
from runs.identity import RunSpec, data_descriptor, resolve
from suites import profiles, tune
from suites.profiles import get_profile


# ---- the recipe ---------------------------------------------------------------------------------
def test_a_tuned_run_needs_a_choice_and_trains_at_it():
    profile = get_profile("cpu")
    data = data_descriptor(profile, None, check=False)
    untuned = dataclasses.replace(profile, tuning={})
    with pytest.raises(ConfigError, match="python -m suites.tune --profile cpu --only pixel"):
        resolve(RunSpec("pixel"), untuned, 0, data, recipe="tuned")
    tuned = dataclasses.replace(profile, tuning={"pixel": {"blr": 0.002}})
    assert resolve(RunSpec("pixel"), tuned, 0, data, recipe="tuned").train["blr"] == 0.002
    # a tuning run's own lr wins; `none` does not train and stays the shared run
    assert resolve(RunSpec("pixel", train={"blr": 0.004}), tuned, 0, data, recipe="tuned").train["blr"] == 0.004
    assert resolve(RunSpec("none"), untuned, 0, data, "tuned").name == resolve(RunSpec("none"), untuned, 0, data,
                                                                               "shared").name


def test_a_tuned_run_at_the_shared_lr_and_masks_is_the_shared_run():
    profile = dataclasses.replace(get_profile("cpu"), tuning={"mae": {"blr": 1e-3}, "pixel": {"blr": 1e-3}})
    data = data_descriptor(profile, None, check=False)
    spec = RunSpec("mae", train={"epochs": 1.0})
    assert resolve(spec, profile, 0, data, "tuned").name == resolve(spec, profile, 0, data, "shared").name
    # pixel's mask unit is SCALED under tuned: another config, another name
    pixel = RunSpec("pixel", train={"epochs": 1.0})
    assert resolve(pixel, profile, 0, data, "tuned").name != resolve(pixel, profile, 0, data, "shared").name


# ---- masks scaled to the grid ---------------------------------------------------------------------
@pytest.mark.parametrize("recipe, unit, min_block", [("paper", SCALED, SCALED), ("tuned", SCALED, SCALED),
                                                     ("shared", 1, 16)])
def test_masks_are_scaled_under_paper_and_tuned_and_unchanged_under_shared(recipe, unit, min_block):
    profile = dataclasses.replace(get_profile("cpu"), tuning={"pixel": {"blr": 1e-3}, "beit": {"blr": 1e-3}})
    data = data_descriptor(profile, None, check=False)
    pixel = resolve(RunSpec("pixel"), profile, 0, data, recipe).build_method_config()
    beit = resolve(RunSpec("beit"), profile, 0, data, recipe).build_method_config()
    assert pixel.mask.unit == unit and beit.mask.min_block_patches == min_block
    assert beit.mask.strategy == "block" and beit.mask.ratio == 0.4 and pixel.mask.ratio == 0.6


@pytest.mark.parametrize("grid, unit, min_block", [(14, 2, 16), (8, 1, 4), (4, 1, 1)])
def test_a_scaled_mask_is_the_papers_share_of_the_grid(grid, unit, min_block):
    scaled = MaskConfig("block", 0.4, min_block_patches=SCALED, unit=SCALED)
    assert scaled.at_grid(grid) == MaskConfig("block", 0.4, min_block_patches=min_block, unit=unit)
    concrete = make_masks(MaskConfig("block", 0.4, min_block_patches=min_block, unit=unit), 8, grid,
                          torch.Generator().manual_seed(3))
    assert torch.equal(make_masks(scaled, 8, grid, torch.Generator().manual_seed(3)), concrete)


# ---- the criterion: held-out data only ------------------------------------------------------------
class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name})")

    def __len__(self):
        raise AssertionError("the test split was read (len)")


def test_knn_holdout_reads_the_fit_part_as_memory_and_the_held_out_part_as_queries(tmp_path):
    splits = synthetic_splits(img_size=16)
    guarded = Splits(splits.train, Untouchable(), splits.fit, splits.holdout)
    torch.manual_seed(0)
    encoder = ViT(ViTConfig(size="micro", img_size=16, patch_size=4)).eval()
    ctx = EvalContext(work_dir=tmp_path / "work", features_dir=tmp_path / "features", seed=0, device="cpu",
                      progress=False, feature_batch=64)
    result = get_evaluation("knn_holdout").run(encoder, guarded, KNNConfig(), ctx)
    from eval.features import extract_features
    fit, held_out = (extract_features(encoder, part, batch_size=64, device="cpu", progress=False)
                     for part in (splits.fit, splits.holdout))
    expected = knn_metrics(fit, held_out, KNNConfig())
    assert result.metrics == {f"holdout_{name}": value for name, value in expected.items()}
    assert set(result.metrics) == {"holdout_knn_top1_cls", "holdout_knn_top1_mean"}


# ---- the choice ----------------------------------------------------------------------------------
def test_the_grid_is_extended_past_the_edge_the_best_lr_sits_at():
    lrs = tune.grid_lrs(1e-3)
    assert lrs == [5e-4, 1e-3, 2e-3, 4e-3]
    assert tune.extend(lrs, {5e-4: 30, 1e-3: 31, 2e-3: 32, 4e-3: 33}) == [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]
    assert tune.extend(lrs, {5e-4: 34, 1e-3: 31, 2e-3: 32, 4e-3: 33}) == [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]
    assert tune.extend(lrs, {5e-4: 30, 1e-3: 35, 2e-3: 32, 4e-3: 33}) is None
    assert tune.choose({5e-4: 30, 1e-3: 35, 2e-3: 35}) == 1e-3          # a tie: the smaller lr


def fake_scores(peak: float, init: float = 0.0, beaten_from: float = 1.0):
    """Held-out scores that fall with the distance (in factors of 2) from `peak`, above the init's
    `init` from the budget `beaten_from` on (below it, every lr scores under the init)."""
    import math

    def scores(runs, outputs, budget):
        offset = 0 if budget >= beaten_from else -100
        return ({run.config.train["blr"]: offset + 40 - abs(math.log2(run.config.train["blr"] / peak))
                 for run in runs if run.config.train is not None and run.spec.budget == budget}, init)
    return scores


@pytest.mark.parametrize("peak, grid, bracketed", [(2e-3, [5e-4, 1e-3, 2e-3, 4e-3], True),
                                                   (1.6e-2, [5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2], True),
                                                   (1.0, [5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2], False)])
def test_a_choice_at_an_edge_extends_the_grid_and_runs_again(tmp_path, monkeypatch, peak, grid, bracketed):
    planned = []
    monkeypatch.setattr(tune, "criterion_scores", fake_scores(peak))
    monkeypatch.setattr(tune, "run_plan", lambda plan, options: planned.append(plan) or tune_outcome())
    profile = get_profile("smoke")
    entry = tune.tune_method("mae", profile, "smoke", data_descriptor(profile, None), tmp_path, None, dry_run=False)
    assert entry["grid"] == grid and entry["bracketed"] is bracketed and entry["criterion_budget"] == 1.0
    assert entry["blr"] == min(grid, key=lambda lr: abs(lr - peak))
    assert len(planned) == 1 + entry["extensions"]
    # every planned run is a seed-0 curve cell at the grid's lrs, evaluated on held-out data only,
    # beside the method's own init
    runs = planned[-1].runs
    trained = [run for run in runs if run.config.train is not None]
    [init] = [run for run in runs if run.config.train is None]
    assert {run.seed for run in runs} == {0} and init.spec.evals == ("knn_holdout",)
    assert {run.config.train["blr"] for run in trained} == set(grid)
    assert {tuple(run.spec.evals) for run in trained if run.spec.budget == 1.0} == {("knn_holdout",)}
    assert {tuple(run.spec.evals) for run in trained if run.spec.budget != 1.0} == {()}


def test_when_no_lr_beats_the_init_the_grid_runs_again_a_budget_up(tmp_path, monkeypatch):
    planned = []
    monkeypatch.setattr(tune, "criterion_scores", fake_scores(1e-3, init=35.0, beaten_from=2.5))
    monkeypatch.setattr(tune, "run_plan", lambda plan, options: planned.append(plan) or tune_outcome())
    profile = get_profile("smoke")
    entry = tune.tune_method("mae", profile, "smoke", data_descriptor(profile, None), tmp_path, None, dry_run=False)
    assert entry["criterion_budget"] == 2.5 and entry["beats_init"] and entry["blr"] == 1e-3
    assert list(entry["rungs"]) == ["1", "2.5"] and entry["rungs"]["1"]["init"] == 35.0
    # at 1 MAE-epoch no lr beat the init: no extension towards the lr that moves least
    assert [len({run.config.train["blr"] for run in plan.runs if run.config.train is not None})
            for plan in planned] == [4, 4]
    assert max(run.spec.budget for run in planned[-1].runs if run.spec.budget is not None) == 2.5
    # never beaten: the last rung's choice, kept and labelled
    monkeypatch.setattr(tune, "criterion_scores", fake_scores(1e-3, init=35.0, beaten_from=99))
    entry = tune.tune_method("mae", profile, "smoke", data_descriptor(profile, None), tmp_path, None, dry_run=False)
    assert entry["criterion_budget"] == 5.0 and not entry["beats_init"]


def tune_outcome():
    from runs.plan import Outcome
    return Outcome([], [])


def test_tuning_mae_on_smoke_writes_the_choice_and_the_tuned_recipe_trains_at_it(tmp_path, monkeypatch):
    monkeypatch.setattr(profiles, "TUNED_DIR", tmp_path / "tuned")
    # smoke's k-NN ties at the top (synthetic gratings): ties go to the smaller lr, an edge, so
    # a short grid extends once, and stops there
    monkeypatch.setattr(tune, "FACTORS", (1.0, 2.0))
    monkeypatch.setattr(tune, "MAX_EXTENSIONS", 1)
    outputs = tmp_path / "outputs"
    assert tune.cli(["--profile", "smoke", "--only", "mae", "--outputs", str(outputs), "--no-progress"]) == 0
    choice = json.loads((tmp_path / "tuned" / "smoke.json").read_text())["mae"]
    assert set(choice["scores"]) == {f"{lr:g}" for lr in choice["grid"]} and len(choice["grid"]) >= 2
    assert choice["scores"][f"{choice['blr']:g}"] == max(choice["scores"].values())
    for lr, name in choice["runs"].items():         # each score is its run's held-out k-NN, nothing else
        record = json.loads((outputs / "runs" / name / "result.json").read_text())
        assert set(record["evals"]) == {"knn_holdout"}
        assert record["evals"]["knn_holdout"]["metrics"]["holdout_knn_top1_mean"] == choice["scores"][lr]
    # the tuned recipe now trains MAE at the choice, and its 1-epoch curve cell is the tuning run
    profile = get_profile("smoke")
    assert profile.tuning["mae"]["blr"] == choice["blr"]
    budget = choice["criterion_budget"]
    [cell] = [run for run in tune.tuning_runs("mae", [choice["blr"]], profile, data_descriptor(profile, None), budget)
              if run.spec.budget == budget]
    from suites.budget import curve_runs
    refused = {}        # the methods not tuned here are refused, each with the command that tunes it
    [curve] = [run for run in curve_runs(profile, "tuned", tune.CURVE_BUDGETS, ("knn",), 1,
                                         data_descriptor(profile, None), refused)
               if run.spec.method == "mae" and run.spec.budget == budget]
    assert "suites.tune --profile smoke --only pixel" in refused["pixel"]
    assert curve.name == cell.name == choice["runs"][f"{choice['blr']:g}"]
    assert tune.cli(["--profile", "smoke", "--show"]) == 0
