"""compare_methods: per-run training overrides reach the trainer, and the compute-matched arm
gives every method the FLOPs of MAE's epochs-matched run."""
import dataclasses

import pytest

from methods.registry import ConfigError
from runs.cost import flops_per_image, pretrain_flops
from runs.execute import execute
from runs.identity import Run, RunConfig, RunSpec, resolve
from suites.profiles import get_profile
from suites.registry import get_suite

SYNTHETIC = {"name": "synthetic", "img_size": 16}


def test_flops_matched_cells_cost_what_the_reference_costs():
    profile = get_profile("smoke")
    cells = get_suite("compare_methods").grid(profile)
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
    assert all(set(c.evals) == {"knn", "linear", "finetune", "segmentation"} for c in cells)


def test_train_overrides_change_the_hash_and_reach_the_trainer(tmp_path):
    profile = get_profile("smoke")
    plain = RunSpec("mae", overrides={"encoder": {"size": "micro"}})
    shorter = RunSpec("mae", overrides={"encoder": {"size": "micro"}}, train={"epochs": 1.0})
    plain_cfg, short_cfg = (resolve(s, profile, 0, SYNTHETIC) for s in (plain, shorter))
    assert plain_cfg.name != short_cfg.name
    result = execute(Run(shorter, 0, short_cfg), profile, tmp_path, progress=False)
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
