"""compare_methods: per-run training overrides reach the trainer, and the compute-matched arm
gives every method the FLOPs of MAE's epochs-matched run."""
import dataclasses

import pytest

from core.config import ConfigError
from runs.cost import flops_per_image, pretrain_flops
from runs.execute import RunOptions, execute
from runs.identity import Run, RunConfig, RunSpec, resolve
from suites.profiles import get_profile
from suites.plan import grid_specs

SYNTHETIC = {"name": "synthetic", "img_size": 16}

QUIET = RunOptions(progress=False)


def test_flops_matched_cells_cost_what_the_reference_costs():
    profile = get_profile("smoke")
    cells = grid_specs("compare_methods", profile, "paper")
    configs = {(c.method, c.setting): resolve(c, profile, 0, SYNTHETIC) for c in cells}
    budget = pretrain_flops(configs[("mae", f"{profile.train.epochs:g} epochs")])
    matched = {key: cfg for key, cfg in configs.items() if key[1].startswith("MAE's FLOPs")}
    assert {method for method, _ in matched} == {"pixel", "beit", "ibot"}
    for (method, setting), cfg in matched.items():
        # epochs are rounded to 0.01 and steps to whole batches: within one step of the budget
        one_step = flops_per_image(method, cfg.method_config) * cfg.train["batch_size"]
        assert abs(pretrain_flops(cfg) - budget) <= one_step, (method, setting)
        # a masked full-token method costs more per image than MAE, so it gets fewer epochs
        assert cfg.train["epochs"] < profile.train.epochs
    assert all(set(c.evals) - {"knn@student"} == {"knn", "linear", "finetune", "segmentation"} for c in cells)
    assert all(("knn@student" in c.evals) == (c.method == "ibot") for c in cells)   # iBOT: the student too


def test_train_overrides_change_the_hash_and_reach_the_trainer(tmp_path):
    profile = get_profile("smoke")
    plain = RunSpec("mae", overrides={"encoder": {"size": "micro"}})
    shorter = RunSpec("mae", overrides={"encoder": {"size": "micro"}}, train={"epochs": 1.0})
    plain_cfg, short_cfg = (resolve(s, profile, 0, SYNTHETIC) for s in (plain, shorter))
    assert plain_cfg.name != short_cfg.name
    result = execute(Run(shorter, 0, short_cfg), profile, tmp_path, QUIET)
    assert result.train["steps"] == 640 // profile.train.batch_size      # 1 epoch, not the profile's 2
    assert result.train["steps"] < profile.train.epochs * 640 // profile.train.batch_size


@pytest.mark.parametrize("spec,message", [
    (RunSpec("none", train={"epochs": 1.0}), "does not train"),
    (RunSpec("mae", train={"epoch": 1.0}), "unknown config field 'epoch'"),
    (RunSpec("mae", train={"epochs": -1.0}), "epochs must be >= 0"),
])
def test_bad_train_overrides_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve(spec, get_profile("smoke"), 0, SYNTHETIC)


def test_the_cost_of_a_run_on_a_user_folder_counts_its_training_images(tmp_path):
    from PIL import Image
    from runs.cost import images_seen
    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "train" / label / f"{i}.jpg")
    config = RunConfig("mae", {}, {"epochs": 2.0, "batch_size": 2}, 0,
                       {"name": tmp_path.name, "path": str(tmp_path), "img_size": 8})
    assert images_seen(config) == 2 * 6                # not ImageNet's 1.28M images
    assert images_seen(dataclasses.replace(config, data={"name": "cifar10", "img_size": 32})) == 2 * 50_000


# Training FLOPs per image of the smoke cells under --recipe shared (counted, attention
# unfused): the numbers the hand-computed budget epochs below come from
SMOKE_SHARED_FLOPS = {"mae": 2_397_312, "pixel": 2_974_464, "beit": 5_743_360, "ibot": 59_852_800}


def test_budget_epochs_are_e_times_maes_flops_per_image_over_the_methods_rounded_to_hundredths():
    """The rule other processes already name run folders by: with E rounded to 0.01, method m
    trains round(E * fpi(mae) / fpi(m), 2) epochs; MAE trains E; `none` gets no train override."""
    from suites.budget import method_flops
    from suites.compare_methods import budget_epochs, budget_grid
    profile = get_profile("smoke")
    flops = method_flops(profile, "shared")
    assert flops == SMOKE_SHARED_FLOPS
    # by hand: 2.37 * 2397312 / 2974464 = 1.910, * / 5743360 = 0.989, * / 59852800 = 0.0949
    assert budget_epochs(flops, 2.37) == {"mae": 2.37, "pixel": 1.91, "beit": 0.99, "ibot": 0.09}
    # 1.3 * 2397312 / 2974464 = 1.048, * / 5743360 = 0.543, * / 59852800 = 0.052
    assert budget_epochs(flops, 1.304) == {"mae": 1.3, "pixel": 1.05, "beit": 0.54, "ibot": 0.05}
    cells = budget_grid(profile, flops, 2.37)
    assert [(c.method, c.train, c.evals) for c in cells] == [
        ("none", {}, ("knn", "linear")), ("mae", {"epochs": 2.37}, ("knn", "linear")),
        ("pixel", {"epochs": 1.91}, ("knn", "linear")), ("beit", {"epochs": 0.99}, ("knn", "linear")),
        ("ibot", {"epochs": 0.09}, ("knn", "linear", "knn@student"))]
    assert cells[2].setting == "budget 2.37ep MAE FLOPs (1.91 ep)"


def test_budget_epochs_under_the_paper_recipe_use_each_methods_paper_flops():
    from suites.budget import method_flops
    from suites.compare_methods import budget_epochs
    profile = get_profile("smoke")
    flops = {}
    for method in SMOKE_SHARED_FLOPS:
        config = resolve(RunSpec(method), profile, 0, SYNTHETIC, recipe="paper")
        flops[method] = flops_per_image(config.method, config.method_config)
    assert budget_epochs(method_flops(profile, "paper"), 1.3) == {
        method: round(1.3 * flops["mae"] / flops[method], 2) for method in flops}


def test_budget_cells_cost_the_reference_flops_within_one_step():
    from suites.budget import budget_runs
    profile = get_profile("cpu")
    data = {"name": "cifar10", "img_size": 32}
    configs = {run.spec.method: run.config for run in budget_runs(profile, "shared", 1.3, ("knn", "linear"), 1, data)}
    budget = pretrain_flops(configs["mae"])
    assert configs["mae"].train["epochs"] == 1.3 and configs["none"].train is None
    for method in ("pixel", "beit", "ibot"):
        one_step = flops_per_image(method, configs[method].method_config) * configs[method].train["batch_size"]
        # epochs rounded to 0.01 of ~195 steps: within two steps of MAE's FLOPs
        assert abs(pretrain_flops(configs[method]) - budget) <= 2 * one_step, method
