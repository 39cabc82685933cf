"""Evaluations wired into runs: chosen per RunSpec, budgeted per profile, cached in result.json."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from eval.linear import LinearConfig
from methods.registry import UnknownNameError
from suites import evaluations, runner
from suites.profiles import get_profile
from suites.runner import RunSpec, data_descriptor, execute, resolve

SMOKE = get_profile("smoke")


def run_once(spec: RunSpec, outputs, profile=SMOKE) -> dict:
    config = resolve(spec, profile, seed=0, data=data_descriptor(profile, None))
    return execute(config, spec, profile, outputs, progress=False)


def test_all_evaluations_of_a_random_init_encoder_run_in_the_smoke_profile(tmp_path):
    result = run_once(RunSpec("none", evals=("knn", "linear", "finetune", "segmentation")), tmp_path)
    assert result["status"] == "done"
    for metric in ("knn_top1_cls", "linear_top1_cls", "linear_top1_mean", "finetune_top1", "seg_miou"):
        assert 0 <= result["metrics"][metric] <= 100, metric
    assert result["evals"]["segmentation"]["details"]["dataset"] == "camvid"
    assert result["evals"]["linear"]["config"] == dataclasses.asdict(SMOKE.eval_budget.linear)
    on_disk = json.loads(next(tmp_path.glob("runs/*/result.json")).read_text())
    assert on_disk["metrics"] == result["metrics"]


def test_adding_an_evaluation_to_a_finished_run_runs_only_the_new_one(tmp_path, monkeypatch):
    first = run_once(RunSpec("none", evals=("knn",)), tmp_path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("k-NN ran again")

    monkeypatch.setattr(runner.knn, "run", must_not_run)
    second = run_once(RunSpec("none", evals=("knn", "linear")), tmp_path)
    assert second["evals"]["knn"] == first["evals"]["knn"]
    assert "linear_top1_cls" in second["metrics"]

    monkeypatch.setattr(evaluations, "run_evaluation", must_not_run)
    third = run_once(RunSpec("none", evals=("knn", "linear")), tmp_path)   # all done: nothing runs
    assert third["metrics"] == second["metrics"]


def test_an_evaluation_added_to_a_finished_ibot_run_gets_the_saved_teacher(tmp_path, monkeypatch):
    """The saved encoder is iBOT's teacher; a later evaluation must see it, not the
    freshly built method's untrained teacher."""
    run_once(RunSpec("ibot", evals=("knn",)), tmp_path)
    saved = load_file(next(tmp_path.glob("runs/ibot-*/encoder.safetensors")))   # all but [M]
    seen = {}

    def record_encoder(name, encoder, *args, **kwargs):
        seen[name] = encoder.state_dict()
        return {"config": evaluations.eval_config(name, SMOKE), "metrics": {}}

    monkeypatch.setattr(evaluations, "run_evaluation", record_encoder)
    run_once(RunSpec("ibot", evals=("knn", "linear")), tmp_path)
    assert all(torch.equal(seen["linear"][k], saved[k]) for k in saved)


def test_a_changed_knn_config_reruns_knn(tmp_path):
    run_once(RunSpec("none", evals=("knn",)), tmp_path)
    other = dataclasses.replace(SMOKE, knn=dataclasses.replace(SMOKE.knn, k=3))
    assert not runner.is_done(next(tmp_path.glob("runs/none-*")), ("knn",), other)
    result = run_once(RunSpec("none", evals=("knn",)), tmp_path, other)
    assert result["evals"]["knn"]["config"]["k"] == 3


def test_a_changed_budget_reruns_only_that_evaluation(tmp_path, monkeypatch):
    run_once(RunSpec("none", evals=("knn", "linear")), tmp_path)
    cheaper = dataclasses.replace(SMOKE, eval_budget=dataclasses.replace(
        SMOKE.eval_budget, linear=LinearConfig(epochs=2, batch_size=128, lrs=(0.1, 1.0))))
    ran = []
    real = evaluations.run_evaluation
    monkeypatch.setattr(evaluations, "run_evaluation", lambda name, *a, **k: ran.append(name) or real(name, *a, **k))
    result = run_once(RunSpec("none", evals=("knn", "linear")), tmp_path, cheaper)
    assert ran == ["linear"]
    assert len(result["evals"]["linear"]["details"]["cls"]["sweep"]) == 2 * 3


def test_an_unknown_evaluation_is_a_one_line_error_listing_the_known_ones():
    with pytest.raises(UnknownNameError) as err:
        resolve(RunSpec("none", evals=("knn", "linaer")), SMOKE, 0, data_descriptor(SMOKE, None))
    message = str(err.value)
    assert message.startswith("unknown evaluation 'linaer'; known: ")
    assert all(name in message for name in ("finetune", "knn", "linear", "segmentation"))
    assert "\n" not in message


def test_segmentation_on_ade20k_without_the_data_fails_before_any_training(tmp_path, monkeypatch):
    monkeypatch.delenv("MIMBENCH_ADE20K", raising=False)
    ade = dataclasses.replace(SMOKE, eval_budget=dataclasses.replace(
        SMOKE.eval_budget, segmentation=dataclasses.replace(SMOKE.eval_budget.segmentation, dataset="ade20k")))
    with pytest.raises(Exception, match="needs the ADEChallengeData2016/ folder; set MIMBENCH_ADE20K="):
        resolve(RunSpec("none", evals=("segmentation",)), ade, 0, data_descriptor(ade, None))
    # a cost listing (--list) resolves the grid without the data
    assert resolve(RunSpec("none", evals=("segmentation",)), ade, 0, data_descriptor(ade, None),
                   check_inputs=False)["method"] == "none"


def test_a_run_stopped_during_a_later_evaluation_keeps_the_finished_ones(tmp_path, monkeypatch):
    from eval import finetune

    def killed(*args, **kwargs):
        raise KeyboardInterrupt        # the process is stopped during fine-tuning

    monkeypatch.setattr(finetune, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        run_once(RunSpec("none", evals=("knn", "linear", "finetune")), tmp_path)
    monkeypatch.undo()

    from eval import linear
    monkeypatch.setattr(linear, "run", lambda *a, **k: pytest.fail("the finished linear probe ran again"))
    result = run_once(RunSpec("none", evals=("knn", "linear", "finetune")), tmp_path)
    assert {"linear_top1_cls", "finetune_top1"} <= set(result["metrics"])


def test_a_failed_evaluation_keeps_the_finished_run_and_its_earlier_evaluations(tmp_path, monkeypatch):
    """A run another suite finished must not turn into a failed run when this suite's extra
    evaluation fails: its record, pre-training and k-NN stay, the failure is added beside them."""
    first = run_once(RunSpec("mae", evals=("knn",)), tmp_path)
    from eval import linear

    def broken(*args, **kwargs):
        raise RuntimeError("probe diverged")

    monkeypatch.setattr(linear, "run", broken)
    with pytest.raises(RuntimeError):
        run_once(RunSpec("mae", evals=("knn", "linear")), tmp_path)
    on_disk = json.loads(next(tmp_path.glob("runs/mae-*/result.json")).read_text())
    assert on_disk["status"] == "done" and on_disk["evals"]["knn"] == first["evals"]["knn"]
    assert on_disk["train"] == first["train"]
    assert on_disk["failed_evaluation"]["error"] == "RuntimeError: probe diverged"
    assert runner.is_done(next(tmp_path.glob("runs/mae-*")), ("knn",), SMOKE)

    monkeypatch.undo()
    again = run_once(RunSpec("mae", evals=("knn", "linear")), tmp_path)
    assert "linear_top1_cls" in again["metrics"] and "failed_evaluation" not in again


def test_a_failure_after_pretraining_keeps_the_pretrained_encoder_as_done(tmp_path, monkeypatch):
    """Pre-training is recorded as soon as it ends: an evaluation failing in the same call
    leaves a done run that a rerun evaluates without training again."""
    from eval import linear
    monkeypatch.setattr(linear, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("probe diverged")))
    with pytest.raises(RuntimeError):
        run_once(RunSpec("mae", evals=("knn", "linear")), tmp_path)
    on_disk = json.loads(next(tmp_path.glob("runs/mae-*/result.json")).read_text())
    assert on_disk["status"] == "done" and on_disk["train"]["steps"] > 0 and "knn" in on_disk["evals"]
    monkeypatch.undo()
    monkeypatch.setattr(runner.Trainer, "fit", lambda self: pytest.fail("pre-training ran again"))
    again = run_once(RunSpec("mae", evals=("knn", "linear")), tmp_path)
    assert "linear_top1_cls" in again["metrics"]
