"""Evaluations wired into runs through the registry: chosen per RunSpec, budgeted per profile,
cached in result.json; every registered evaluation is tested the moment it registers."""
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from core.config import ConfigError, UnknownNameError, build_config, config_values, identity_record
from eval.linear import LinearConfig
from eval.registry import EvalContext, EvalResult, registry
from runs import execute as runs_execute
from runs.execute import RunOptions, execute
from runs.state import UnreadableRecord, eval_config, is_done
from runs.identity import Run, RunSpec, data_descriptor, resolve
from runs.records import read_record
from suites.profiles import get_profile

SMOKE = get_profile("smoke")

QUIET = RunOptions(progress=False)


def run_once(spec: RunSpec, outputs, profile=SMOKE):
    config = resolve(spec, profile, seed=0, data=data_descriptor(profile, None))
    return execute(Run(spec, 0, config), profile, outputs, QUIET)


def replace_evaluation(monkeypatch, name, run):
    """Swap a registered evaluation's function for this test (the registry holds the function)."""
    monkeypatch.setitem(registry, name, dataclasses.replace(registry[name], run=run))


def product_spec(name: str) -> RunSpec:
    """A smoke run whose product this evaluation takes."""
    method = "dvae" if registry[name].takes == "tokenizer" else "none"
    return RunSpec(method, evals=(name,))


# ---- every registered evaluation ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(registry))
def test_every_registered_evaluation_runs_in_a_smoke_run_and_is_recorded(name, tmp_path, monkeypatch):
    evaluation = registry[name]
    assert dataclasses.is_dataclass(evaluation.config_cls) and evaluation.config_cls.__dataclass_params__.frozen
    record = run_once(product_spec(name), tmp_path)
    entry = record.evals[name]
    # (the profile's config, with the method's eval_overrides: `none` segments without layer decay),
    # as identities hold it: late fields at their identity default left out (runs.identity)
    expected = eval_config(name, SMOKE, record.method)
    assert entry.config == json.loads(json.dumps(identity_record(expected)))
    assert build_config(evaluation.config_cls, config_values(evaluation.config_cls, entry.config, name), name) == expected
    assert entry.metrics and all(isinstance(v, float) and math.isfinite(v) for v in entry.metrics.values())
    assert set(entry.metrics) <= set(record.metrics)
    json.dumps(entry.details)                                  # details must be JSON
    assert read_record(next(tmp_path.glob(f"runs/{record.method}-*"))).evals[name] == entry
    # a second call finds it done and runs nothing
    replace_evaluation(monkeypatch, name, lambda *a: pytest.fail(f"{name} ran again"))
    assert run_once(product_spec(name), tmp_path).evals[name] == entry


def test_a_new_evaluation_registers_in_one_decorator_and_runs_through_the_runner(tmp_path, monkeypatch):
    from eval.registry import register_evaluation

    @dataclasses.dataclass(frozen=True)
    class NormConfig:
        pooling: str = "cls"

    try:
        @register_evaluation("feature_norm", NormConfig)
        def run(encoder, splits, cfg: NormConfig, ctx: EvalContext) -> EvalResult:
            with torch.no_grad():
                tokens = encoder(torch.zeros(2, 3, 16, 16))
            return EvalResult({"feature_norm": float(tokens[:, 0].norm(dim=-1).mean())}, {"images": 2})

        with pytest.raises(ValueError, match="'feature_norm' is already registered"):
            register_evaluation("feature_norm", NormConfig)(run)
        record = run_once(RunSpec("none", evals=("knn", "feature_norm")), tmp_path)
        assert record.evals["feature_norm"].config == {"pooling": "cls"}     # the config class's defaults
        assert record.metrics["feature_norm"] > 0 and record.evals["feature_norm"].details == {"images": 2}
    finally:
        registry.pop("feature_norm", None)


def test_an_evaluation_config_must_be_a_frozen_dataclass():
    from eval.registry import register_evaluation

    @dataclasses.dataclass
    class Mutable:
        k: int = 1

    with pytest.raises(TypeError, match="must be a frozen dataclass"):
        register_evaluation("mutable", Mutable)


# ---- the runner and the records ----------------------------------------------------------------
def test_all_evaluations_of_a_random_init_encoder_run_in_the_smoke_profile(tmp_path):
    result = run_once(RunSpec("none", evals=("knn", "linear", "finetune", "segmentation")), tmp_path)
    assert result.done
    assert result.evals["segmentation"].details["dataset"] == "camvid"
    assert result.evals["linear"].config == json.loads(json.dumps(identity_record(SMOKE.evaluations.linear)))
    on_disk = json.loads(next(tmp_path.glob("runs/*/result.json")).read_text())
    assert on_disk["metrics"] == result.metrics
    # the smoke values (deterministic on CPU; within one test image / a rounding step of mmseg's
    # two-decimal scores): a random-init micro ViT, 1 fine-tuning epoch, 2 segmentation iterations
    expected = {"knn_top1_cls": 95.0, "knn_top1_mean": 98.75, "linear_top1_cls": 95.9375,
                "linear_top1_mean": 98.4375, "finetune_top1": 12.5, "seg_miou": 3.78, "seg_macc": 11.7,
                "seg_aacc": 15.92}
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, abs=100 / 320 + 0.01), name
    assert result.metrics["seg_miou"] <= result.metrics["seg_macc"]     # a mean IoU never exceeds the accuracy


def test_adding_an_evaluation_to_a_finished_run_runs_only_the_new_one(tmp_path, monkeypatch):
    first = run_once(RunSpec("none", evals=("knn",)), tmp_path)
    replace_evaluation(monkeypatch, "knn", lambda *a: pytest.fail("k-NN ran again"))
    second = run_once(RunSpec("none", evals=("knn", "linear")), tmp_path)
    assert second.evals["knn"] == first.evals["knn"]
    assert "linear_top1_cls" in second.metrics

    replace_evaluation(monkeypatch, "linear", lambda *a: pytest.fail("the linear probe ran again"))
    third = run_once(RunSpec("none", evals=("knn", "linear")), tmp_path)   # all done: nothing runs
    assert third.metrics == second.metrics


def test_an_evaluation_added_to_a_finished_ibot_run_gets_the_saved_teacher(tmp_path, monkeypatch):
    """The saved encoder is iBOT's teacher; a later evaluation must see it, not the
    freshly built method's untrained teacher."""
    run_once(RunSpec("ibot", evals=("knn",)), tmp_path)
    saved = load_file(next(tmp_path.glob("runs/ibot-*/encoder.safetensors")))   # all but [M]
    seen = {}

    def record_encoder(encoder, splits, cfg, ctx):
        seen["linear"] = encoder.state_dict()
        return EvalResult({})

    replace_evaluation(monkeypatch, "linear", record_encoder)
    run_once(RunSpec("ibot", evals=("knn", "linear")), tmp_path)
    assert all(torch.equal(seen["linear"][k], saved[k]) for k in saved)


def test_a_changed_knn_config_reruns_knn(tmp_path):
    run_once(RunSpec("none", evals=("knn",)), tmp_path)
    other = dataclasses.replace(SMOKE, knn=dataclasses.replace(SMOKE.knn, k=3))
    assert not is_done(next(tmp_path.glob("runs/none-*")), ("knn",), other)
    result = run_once(RunSpec("none", evals=("knn",)), tmp_path, other)
    assert result.evals["knn"].config["k"] == 3


def test_a_changed_budget_reruns_only_that_evaluation(tmp_path, monkeypatch):
    run_once(RunSpec("none", evals=("knn", "linear")), tmp_path)
    cheaper = dataclasses.replace(SMOKE, evaluations=dataclasses.replace(
        SMOKE.evaluations, linear=LinearConfig(epochs=2, batch_size=128, lrs=(0.1, 1.0))))
    ran = []
    for name in ("knn", "linear"):
        real = registry[name].run
        replace_evaluation(monkeypatch, name, lambda *a, _n=name, _r=real: ran.append(_n) or _r(*a))
    result = run_once(RunSpec("none", evals=("knn", "linear")), tmp_path, cheaper)
    assert ran == ["linear"]
    assert len(result.evals["linear"].details["cls"]["sweep"]) == 2 * 3


def test_an_unknown_evaluation_is_a_one_line_error_listing_the_known_ones():
    with pytest.raises(UnknownNameError) as err:
        resolve(RunSpec("none", evals=("knn", "linaer")), SMOKE, 0, data_descriptor(SMOKE, None))
    message = str(err.value)
    assert message.startswith("unknown evaluation 'linaer'; known: ")
    assert all(name in message for name in ("finetune", "knn", "linear", "segmentation", "tokenizer"))
    assert "\n" not in message


def test_an_evaluation_of_the_wrong_product_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot take the 'tokenizer' evaluation: it evaluates a tokenizer"):
        resolve(RunSpec("mae", evals=("tokenizer",)), SMOKE, 0, data_descriptor(SMOKE, None))
    with pytest.raises(ConfigError, match="cannot take the 'knn' evaluation"):
        resolve(RunSpec("dvae", evals=("knn",)), SMOKE, 0, data_descriptor(SMOKE, None))


def test_segmentation_on_ade20k_without_the_data_fails_before_any_training(tmp_path, monkeypatch):
    from runs.execute import check_inputs

    monkeypatch.delenv("MIMBENCH_ADE20K", raising=False)
    ade = dataclasses.replace(SMOKE, evaluations=dataclasses.replace(
        SMOKE.evaluations, segmentation=dataclasses.replace(SMOKE.evaluations.segmentation, dataset="ade20k")))
    spec = RunSpec("none", evals=("segmentation",))
    # naming and costing the run (--list, --dry-run) needs no data
    config = resolve(spec, ade, 0, data_descriptor(ade, None))
    assert config.method == "none"
    with pytest.raises(Exception, match="needs the ADEChallengeData2016/ folder; set MIMBENCH_ADE20K="):
        check_inputs([Run(spec, 0, config)], ade)


def test_a_run_stopped_during_a_later_evaluation_keeps_the_finished_ones(tmp_path, monkeypatch):
    def killed(*args):
        raise KeyboardInterrupt        # the process is stopped during fine-tuning

    replace_evaluation(monkeypatch, "finetune", killed)
    with pytest.raises(KeyboardInterrupt):
        run_once(RunSpec("none", evals=("knn", "linear", "finetune")), tmp_path)
    monkeypatch.undo()

    replace_evaluation(monkeypatch, "linear", lambda *a: pytest.fail("the finished linear probe ran again"))
    result = run_once(RunSpec("none", evals=("knn", "linear", "finetune")), tmp_path)
    assert {"linear_top1_cls", "finetune_top1"} <= set(result.metrics)


def test_a_failed_evaluation_keeps_the_finished_run_and_its_earlier_evaluations(tmp_path, monkeypatch):
    """A run another suite finished must not turn into a failed run when this suite's extra
    evaluation fails: its record, pre-training and k-NN stay, the failure is added beside them."""
    first = run_once(RunSpec("mae", evals=("knn",)), tmp_path)

    def broken(*args):
        raise RuntimeError("probe diverged")

    replace_evaluation(monkeypatch, "linear", broken)
    with pytest.raises(RuntimeError):
        run_once(RunSpec("mae", evals=("knn", "linear")), tmp_path)
    on_disk = read_record(next(tmp_path.glob("runs/mae-*")))
    assert on_disk.done and on_disk.evals["knn"] == first.evals["knn"]
    assert on_disk.train == first.train
    assert on_disk.failed_evaluation["error"] == "RuntimeError: probe diverged"
    assert is_done(next(tmp_path.glob("runs/mae-*")), ("knn",), SMOKE)

    monkeypatch.undo()
    again = run_once(RunSpec("mae", evals=("knn", "linear")), tmp_path)
    assert "linear_top1_cls" in again.metrics and again.failed_evaluation is None


def test_a_failure_after_pretraining_keeps_the_pretrained_encoder_as_done(tmp_path, monkeypatch):
    """Pre-training is recorded as soon as it ends: an evaluation failing in the same call
    leaves a done run that a rerun evaluates without training again."""
    replace_evaluation(monkeypatch, "linear", lambda *a: (_ for _ in ()).throw(RuntimeError("probe diverged")))
    with pytest.raises(RuntimeError):
        run_once(RunSpec("mae", evals=("knn", "linear")), tmp_path)
    on_disk = read_record(next(tmp_path.glob("runs/mae-*")))
    assert on_disk.done and on_disk.train["steps"] > 0 and "knn" in on_disk.evals
    monkeypatch.undo()
    monkeypatch.setattr(runs_execute.Trainer, "fit", lambda self: pytest.fail("pre-training ran again"))
    again = run_once(RunSpec("mae", evals=("knn", "linear")), tmp_path)
    assert "linear_top1_cls" in again.metrics


def test_a_damaged_run_record_is_a_one_line_error_naming_the_file(tmp_path):
    run_once(RunSpec("none", evals=("knn",)), tmp_path)
    record = next(tmp_path.glob("runs/none-*/result.json"))
    record.write_text(record.read_text()[:40])                  # a copy cut short
    with pytest.raises(UnreadableRecord, match=r"result.json: not valid JSON .* delete it and run the suite again"):
        run_once(RunSpec("none", evals=("knn",)), tmp_path)
    record.unlink()                                             # ... as the message says
    again = run_once(RunSpec("none", evals=("knn",)), tmp_path)
    assert again.done and "knn_top1_cls" in again.metrics      # from the evaluation's own record


def test_readme_add_an_evaluation_file_registers_one_the_runner_runs(tmp_path, monkeypatch):
    """The README's file as it stands, from a folder outside the package, into a registry of its
    own (so that it is also registered where a plugin registered it for the whole process);
    tests/test_plugins.py runs it through the command line."""
    import runpy
    import sys

    from test_methods import readme_snippet

    module = sys.modules["eval.registry"]
    monkeypatch.setattr(module, "registry", {k: v for k, v in registry.items() if k != "centroid"})
    (tmp_path / "centroid.py").write_text(readme_snippet("Adding an evaluation"))
    runpy.run_path(str(tmp_path / "centroid.py"))
    assert module.registry["centroid"].config_cls().pooling == "cls"
    record = run_once(RunSpec("none", evals=("knn", "centroid")), tmp_path / "outputs")
    # a nearest-centroid classifier on the synthetic classes beats chance (10 classes)
    assert record.metrics["centroid_top1_cls"] > 10 and record.evals["centroid"].details == {"classes": 10}


def test_an_evaluation_returning_a_non_number_fails_and_caches_nothing(tmp_path, monkeypatch):
    replace_evaluation(monkeypatch, "linear", lambda *a: EvalResult({"linear_top1_cls": torch.tensor(50.0)}))
    with pytest.raises(ValueError, match=r"evaluation 'linear': metrics\['linear_top1_cls'\] must be a number"):
        run_once(RunSpec("none", evals=("knn", "linear")), tmp_path)
    assert not list(tmp_path.glob("runs/none-*/evals/linear-*/result.json"))
    record = read_record(next(tmp_path.glob("runs/none-*")))
    assert record.done and "knn" in record.evals and "must be a number" in record.failed_evaluation["error"]
