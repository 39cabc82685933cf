"""One fine-tune protocol for every encoder, `none` included: blr 0.5x / 1x / 2x the profile's
times layer decay (the profile's, or none), each candidate fine-tuned on the fit part of train
and read on the held-out part, the best retrained on all of train and only that one read on the
test split. Seed 0 of a cell chooses; its other seeds take that choice without sweeping."""
import json
import re

import pytest
import torch

from conftest import ROOT
from core.config import ConfigError
from engine.data import synthetic_splits
from eval import finetune
from eval.registry import EvalContext
from methods import registry
from methods.vit import ViT, ViTConfig
from runs import execute as runs_execute
from runs.cost import CALIBRATION_FILE, machine
from runs.execute import RunOptions, execute
from runs.identity import Run, RunSpec, data_descriptor, resolve
from runs.state import eval_config
from suites.profiles import PROFILES, get_profile
from suites.run import cli

SMOKE = get_profile("smoke")
QUIET = RunOptions(progress=False)
PINNED = json.loads((ROOT / "tests" / "data" / "run_names.json").read_text())


def run_cell(method: str, seed: int, outputs) -> tuple:
    """A smoke run of `method` at `seed` that fine-tunes: its record and folder."""
    spec = RunSpec(method, evals=("finetune",))
    config = resolve(spec, SMOKE, seed=seed, data=data_descriptor(SMOKE, None))
    return execute(Run(spec, seed, config), SMOKE, outputs, QUIET), config.folder(outputs)


def smoke_splits():
    """The smoke runs' splits: the very objects runs.execute hands the evaluation (its cache)."""
    return runs_execute.load_data(json.dumps(data_descriptor(SMOKE, None), sort_keys=True), "error", False)


def spy_on_data(monkeypatch, holdout_scores: list[float] | None = None) -> tuple[list, list]:
    """Which data each fine-tune trains on (with its blr and layer decay) and each top-1 reads,
    named by split, in order; `holdout_scores`: what the held-out reads return instead."""
    splits = smoke_splits()
    names = {id(splits.train): "train", id(splits.fit): "fit", id(splits.holdout): "holdout",
             id(splits.test): "test"}
    trained, read = [], []
    trainer, top1 = finetune.finetune_trainer, finetune.top1

    def training(model, data, cfg, *args, **kwargs):
        trained.append((names.get(id(data), "other"), cfg.blr, cfg.layer_decay))
        return trainer(model, data, cfg, *args, **kwargs)

    def reading(model, data, *args, **kwargs):
        read.append(names.get(id(data), "other"))
        if holdout_scores is not None and read[-1] == "holdout":
            return holdout_scores[read.count("holdout") - 1]
        return top1(model, data, *args, **kwargs)

    monkeypatch.setattr(finetune, "finetune_trainer", training)
    monkeypatch.setattr(finetune, "top1", reading)
    return trained, read


def candidates(details: dict) -> list[tuple[float, float]]:
    return [(point["blr"], point["layer_decay"]) for point in details["sweep"]["candidates"]]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_method_fine_tunes_at_one_config_with_six_candidates_no_decay_among_them(profile):
    budget = get_profile(profile)
    encoders = [name for name, (cls, _) in registry.items() if cls.product == "encoder"]
    assert "none" in encoders and "mae" in encoders
    configs = {name: eval_config("finetune", budget, name) for name in encoders}
    assert all(cfg == budget.eval_config("finetune") for cfg in configs.values()), configs
    cfg = budget.eval_config("finetune")
    assert cfg.sweep_grid() == [(factor, decay) for factor in (0.5, 1.0, 2.0) for decay in (cfg.layer_decay, 1.0)]
    if profile == "cpu":
        assert (cfg.blr, cfg.layer_decay) == (1e-3, 0.75)


def test_a_pre_trained_encoder_and_none_fine_tune_through_the_same_candidates(tmp_path):
    records = {method: run_cell(method, 0, tmp_path)[0].evals["finetune"] for method in ("mae", "none")}
    cfg = SMOKE.eval_config("finetune")
    expected = [(cfg.blr * factor, decay) for factor in (0.5, 1.0, 2.0) for decay in (cfg.layer_decay, 1.0)]
    assert records["mae"].config == records["none"].config
    for method, record in records.items():
        assert candidates(record.details) == expected, method
        assert record.details["sweep"]["grid"] == {"blr": [cfg.blr / 2, cfg.blr, cfg.blr * 2],
                                                   "layer_decay": [cfg.layer_decay, 1.0]}
        assert record.details["choice"] in [{"blr": blr, "layer_decay": decay} for blr, decay in expected]
        assert "choice_from" not in record.details          # seed 0 chooses itself


def test_the_choice_is_made_on_held_out_data_and_the_test_split_read_once_after_it(tmp_path, monkeypatch):
    # (the smoke fine-tunes all score chance on the held-out part; these scores make the 4th the best)
    scores = [10.0, 20.0, 30.0, 40.0, 40.0, 5.0]
    trained, read = spy_on_data(monkeypatch, holdout_scores=scores)
    record, _ = run_cell("none", 0, tmp_path)
    details = record.evals["finetune"].details
    grid = candidates(details)
    assert trained == [("fit", *candidate) for candidate in grid] + [("train", *grid[3])]   # ties: the first
    assert read == ["holdout"] * 6 + ["test"]         # the test split: never during the sweep
    assert [point["holdout_top1"] for point in details["sweep"]["candidates"]] == scores
    assert details["choice"] == {"blr": grid[3][0], "layer_decay": grid[3][1]} == {"blr": SMOKE.eval_config(
        "finetune").blr, "layer_decay": 1.0}


def test_seed_1_takes_seed_0s_choice_and_does_not_sweep(tmp_path, monkeypatch):
    seed_0, folder_0 = run_cell("none", 0, tmp_path)
    trained, read = spy_on_data(monkeypatch)
    seed_1, folder_1 = run_cell("none", 1, tmp_path)
    chosen, taken = seed_0.evals["finetune"], seed_1.evals["finetune"]
    assert taken.config == chosen.config                 # the choice is no part of the evaluation's identity
    assert taken.details["choice"] == chosen.details["choice"] and "sweep" not in taken.details
    assert trained == [("train", *chosen.details["choice"].values())] and read == ["test"]
    assert taken.details["choice_from"] == f"seed 0 ({folder_0.name})"
    assert not list(folder_1.glob("evals/finetune-*/sweep-*"))
    assert json.loads((folder_1 / "result.json").read_text())["evals"]["finetune"]["details"]["choice_from"]


def test_a_seed_run_before_its_seed_0_sweeps_itself_and_its_record_says_so(tmp_path, monkeypatch):
    trained, _ = spy_on_data(monkeypatch)
    seed_1, _ = run_cell("none", 1, tmp_path)
    assert [data for data, *_ in trained] == ["fit"] * 6 + ["train"]
    details = seed_1.evals["finetune"].details
    folder_0 = resolve(RunSpec("none", evals=("finetune",)), SMOKE, seed=0,
                       data=data_descriptor(SMOKE, None)).folder(tmp_path)
    assert details["choice_from"] == f"its own sweep: seed 0 ({folder_0.name}) had no finetune choice yet"
    assert len(details["sweep"]["candidates"]) == 6


def test_a_given_choice_outside_the_configs_grid_is_refused_before_any_training(tmp_path):
    torch.manual_seed(0)
    vit = ViT(ViTConfig(size="micro", img_size=16, patch_size=4))
    ctx = EvalContext(work_dir=tmp_path, features_dir=tmp_path / "features", progress=False,
                      choice={"blr": 0.123, "layer_decay": 1.0})
    with pytest.raises(ConfigError, match="is not one of this config's candidates"):
        finetune.run(vit, synthetic_splits(img_size=16), SMOKE.eval_config("finetune"), ctx)
    assert not list(tmp_path.iterdir())


def test_the_dry_run_costs_six_candidates_and_the_retrain_at_seed_0_one_fine_tune_at_seed_1(tmp_path, capsys):
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({          # a fixed FLOP/s: nothing measured
        **machine(), "device_type": "cpu", "profile": "cpu", "flops_per_second": 100e9, "steps": 8,
        "batch_size": 64, "method": "mae", "timestamp": "test"}))
    assert cli(["compare_methods", "--profile", "cpu", "--recipe", "shared", "--budget", "5ep", "--only", "mae,none",
                "--seeds", "2", "--evals", "finetune", "--dry-run", "--data", PINNED["data_path"],
                "--outputs", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    minutes = {(line.split()[0], int(re.search(r" seed (\d+) ", line).group(1))):
               float(re.search(r"evals +([\d.]+)\)", line).group(1))
               for line in printed.splitlines() if " seed " in line and "evals " in line}
    assert set(minutes) == {("mae", 0), ("mae", 1), ("none", 0), ("none", 1)}, printed
    epochs = get_profile("cpu").eval_config("finetune").epochs
    # 6 candidates on the 45k fit images, each read on the held-out 5k; then 50k train, 10k test
    fine_tunes = 1 + 6 * (3 * epochs * 45_000 + 5_000) / (3 * epochs * 50_000 + 10_000)     # 6.32
    for method in ("mae", "none"):
        assert minutes[method, 0] == pytest.approx(fine_tunes * minutes[method, 1], abs=0.1 * fine_tunes), printed
    assert minutes["mae", 0] == minutes["none", 0] and minutes["mae", 1] == minutes["none", 1]
