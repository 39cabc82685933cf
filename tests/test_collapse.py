"""No silent collapse: every method declares a collapse monitor (methods.base.Method.collapse) and
runs.collapse.collapse_verdict judges a run from its record and folder.

  ibot    collapsed when the teacher's [CLS] entropy at the last logged step is above 0.9 ln K
  beit    collapsed when its tokenizer run uses fewer than 5% of its codes on the test split
  others  no monitor: never flagged
"""
import json
import math

import pytest
import torch

from conftest import micro_overrides
from engine.data import synthetic_splits
from engine.trainer import Trainer, TrainConfig
from engine.views import pretraining
from methods import build_method, registry
from methods.beit import MIN_CODEBOOK_USAGE
from methods.ibot import COLLAPSED_ENTROPY_SHARE
from runs.collapse import collapse_verdict
from runs.execute import RunOptions, execute
from runs.identity import Run, RunSpec, data_descriptor, resolve
from runs.records import RunRecord, read_record, write_record
from suites.profiles import get_profile

SMOKE = get_profile("smoke")


def smoke_config(method: str, **overrides):
    spec = RunSpec(method, "default", overrides, evals=())
    return resolve(spec, SMOKE, seed=0, data=data_descriptor(SMOKE, None), recipe="shared")


def write_done_record(run_dir, config, train=None, metrics=None):
    """A finished run's record, as runs.execute writes it (its train stats and metrics given)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_record(run_dir, RunRecord(status="done", method=config.method, seed=config.seed,
                                    config_hash=config.hash, metrics=metrics or {}, train=train or {"steps": 20}))
    return read_record(run_dir)


def ibot_final(cls_share: float, patch_share: float, out_dim: int, step: int = 19) -> dict:
    """The last logged row of an iBOT run whose teacher entropies are these shares of ln K."""
    uniform = math.log(out_dim)
    return {"step": step, "loss": 0.2, "teacher_entropy_cls": cls_share * uniform,
            "teacher_entropy_patch": patch_share * uniform}


# ---- iBOT ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls_share, collapsed", [(0.99, True), (0.95, True), (0.85, False), (0.4, False)])
def test_an_ibot_run_is_collapsed_when_its_teacher_cls_entropy_ends_above_0_9_ln_k(tmp_path, cls_share, collapsed):
    config = smoke_config("ibot")
    out_dim = config.build_method_config().out_dim
    run_dir = config.folder(tmp_path)
    final = ibot_final(cls_share, 0.5, out_dim)
    record = write_done_record(run_dir, config, train={"steps": 20, "final_metrics": final})

    verdict = collapse_verdict(run_dir, config, record)
    assert (verdict["collapsed"] is not None) == collapsed == (cls_share > COLLAPSED_ENTROPY_SHARE)
    assert verdict["monitor"] == {"teacher_entropy_cls": final["teacher_entropy_cls"],
                                  "teacher_entropy_patch": final["teacher_entropy_patch"],
                                  "step": 19, "from": "train stats"}
    if collapsed:       # one line naming both entropies relative to ln K; the patch one is not in the rule
        assert verdict["collapsed"].startswith(f"teacher [CLS] entropy {final['teacher_entropy_cls']:.2f} = "
                                               f"{cls_share:.3f} ln K (K = {out_dim})")
        assert "patch entropy 0.500 ln K" in verdict["collapsed"] and "\n" not in verdict["collapsed"]


def test_the_ibot_rule_reads_k_from_the_runs_own_out_dim(tmp_path):
    # 6.0 nats: 0.87 ln 1024 (healthy), but 1.08 ln 256 (above the uniform of 256 prototypes)
    for out_dim, collapsed in ((1024, False), (256, True)):
        config = smoke_config("ibot", out_dim=out_dim)
        run_dir = config.folder(tmp_path)
        final = {"step": 19, "teacher_entropy_cls": 6.0, "teacher_entropy_patch": 6.0}
        record = write_done_record(run_dir, config, train={"steps": 20, "final_metrics": final})
        assert (collapse_verdict(run_dir, config, record)["collapsed"] is not None) == collapsed


def test_a_record_of_before_final_metrics_is_judged_from_the_last_full_line_of_metrics_jsonl(tmp_path):
    config = smoke_config("ibot")
    out_dim = config.build_method_config().out_dim
    run_dir = config.folder(tmp_path)
    record = write_done_record(run_dir, config, train={"steps": 20})        # no "final_metrics"
    rows = [ibot_final(0.5, 0.5, out_dim, step=15), ibot_final(0.97, 0.8, out_dim, step=19)]
    lines = [json.dumps(row) for row in rows] + [json.dumps({"step": 19, "lr": 1e-6}), '{"step": 19, "lo']
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    verdict = collapse_verdict(run_dir, config, record)
    assert verdict["monitor"]["from"] == "metrics.jsonl" and verdict["monitor"]["step"] == 19
    assert verdict["monitor"]["teacher_entropy_cls"] == rows[1]["teacher_entropy_cls"]
    assert "0.970 ln K" in verdict["collapsed"]


def test_a_smoke_ibot_run_records_its_last_logged_metrics_and_is_judged_from_them(tmp_path):
    config = smoke_config("ibot")
    record = execute(Run(RunSpec("ibot", evals=()), 0, config), SMOKE, tmp_path, RunOptions(progress=False))
    run_dir = config.folder(tmp_path)
    last_line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    final = record.train["final_metrics"]
    assert final == last_line and final["step"] == record.train["steps"] - 1
    assert read_record(run_dir).train["final_metrics"] == final       # in result.json, not only in memory

    verdict = collapse_verdict(run_dir, config, record)
    entropy = final["teacher_entropy_cls"]
    assert verdict["monitor"]["from"] == "train stats" and verdict["monitor"]["teacher_entropy_cls"] == entropy
    uniform = math.log(config.build_method_config().out_dim)
    assert (verdict["collapsed"] is not None) == (entropy > COLLAPSED_ENTROPY_SHARE * uniform)


def test_a_run_killed_between_its_last_checkpoint_and_its_stats_still_records_its_final_metrics(tmp_path):
    def trainer():
        torch.manual_seed(0)
        method = build_method("ibot", **micro_overrides(out_dim=128, head_hidden_dim=64, head_bottleneck_dim=32))
        images = synthetic_splits(img_size=16, train_per_class=32).train.images     # 320 images: 10 steps
        cfg = TrainConfig(epochs=1, batch_size=32, blr=1e-3, checkpoint_every=5, log_every=3)
        return Trainer(method, *pretraining(method, images, cfg, 0), tmp_path, seed=0, config_hash="test",
                       progress=False)

    first = trainer().fit()
    assert first["final_metrics"]["step"] == 9 and "teacher_entropy_cls" in first["final_metrics"]
    (tmp_path / "train_stats.json").unlink()
    again = trainer().fit()     # resumes at its end: this session logs no step
    assert again["final_metrics"] == first["final_metrics"]


# ---- BEiT ----------------------------------------------------------------------------------
@pytest.mark.parametrize("usage, collapsed", [(0.03125, True), (0.171875, False)])
def test_every_beit_cell_on_a_tokenizer_using_under_5_percent_of_its_codes_is_collapsed(tmp_path, usage, collapsed):
    configs = [smoke_config("beit", mask={"strategy": strategy}) for strategy in ("block", "random")]
    tokenizer = configs[0].requires["tokenizer"].config
    assert configs[1].requires["tokenizer"].config == tokenizer       # one tokenizer run for both cells
    write_done_record(tokenizer.folder(tmp_path), tokenizer, metrics={"tokenizer_codebook_usage": usage})

    for config in configs:
        run_dir = config.folder(tmp_path)
        verdict = collapse_verdict(run_dir, config, write_done_record(run_dir, config))
        assert (verdict["collapsed"] is not None) == collapsed == (usage < MIN_CODEBOOK_USAGE)
        assert verdict["monitor"] == {"tokenizer": {"run": tokenizer.name, "tokenizer_codebook_usage": usage}}
    if collapsed:
        vocab_size = configs[0].build_method_config().tokenizer.vocab_size
        assert verdict["collapsed"].startswith(f"its tokenizer uses 3.1% of its {vocab_size} codes on the test split")


# ---- the others, and missing data ------------------------------------------------------------
def test_only_ibot_and_beit_have_a_monitor_and_the_others_are_never_flagged(tmp_path):
    unmonitored = sorted(name for name, (cls, _) in registry.items()
                         if not cls.collapse_metrics and not cls.collapse_prerequisite_metrics)
    assert {"mae", "pixel", "none", "dvae"} <= set(unmonitored) and not {"ibot", "beit"} & set(unmonitored)
    for name in unmonitored:
        config = smoke_config(name)
        run_dir = config.folder(tmp_path)
        # a last step that would flag an iBOT run changes nothing
        record = write_done_record(run_dir, config, train={"steps": 20, "final_metrics": ibot_final(1.0, 1.0, 1024)})
        assert collapse_verdict(run_dir, config, record) == {"collapsed": None, "monitor": {}}
        assert collapse_verdict(run_dir, config, None) == {"collapsed": None, "monitor": {}}


def unknown_why(verdict) -> str:
    assert verdict["collapsed"] is None and set(verdict["monitor"]) == {"unknown"}
    return verdict["monitor"]["unknown"]


def test_missing_data_gives_an_unknown_verdict_never_an_error(tmp_path):
    ibot = smoke_config("ibot")
    ibot_dir = ibot.folder(tmp_path)
    assert "not finished" in unknown_why(collapse_verdict(ibot_dir, ibot, None))
    failed = RunRecord(status="failed", method="ibot", seed=0, config_hash=ibot.hash, error="NonFiniteLoss")
    assert "not finished" in unknown_why(collapse_verdict(ibot_dir, ibot, failed))
    record = write_done_record(ibot_dir, ibot)         # no final metrics and no metrics.jsonl
    assert "teacher_entropy_cls" in unknown_why(collapse_verdict(ibot_dir, ibot, record))

    beit = smoke_config("beit")
    beit_dir = beit.folder(tmp_path)
    record = write_done_record(beit_dir, beit)
    tokenizer = beit.requires["tokenizer"].config
    assert tokenizer.name in unknown_why(collapse_verdict(beit_dir, beit, record))      # its folder is not here
    tokenizer_dir = tokenizer.folder(tmp_path)
    write_done_record(tokenizer_dir, tokenizer, metrics={"tokenizer_psnr": 18.0})
    assert "tokenizer_codebook_usage" in unknown_why(collapse_verdict(beit_dir, beit, record))
    (tokenizer_dir / "result.json").write_text('{"status": "do')       # cut short
    assert "not valid JSON" in unknown_why(collapse_verdict(beit_dir, beit, record))
