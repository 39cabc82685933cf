import dataclasses
import json

import pytest
import torch

from conftest import micro_overrides
from engine.checkpoint import checkpoint_paths
from engine.data import synthetic_splits
from engine.trainer import NonFiniteLoss, Trainer, TrainConfig
from engine.views import pretraining
from methods import build_method

CFG = TrainConfig(epochs=2, batch_size=32, blr=1e-3, warmup_frac=0.2, checkpoint_every=5, log_every=2)


def make_trainer(run_dir, name="mae", cfg=CFG, seed=0):
    torch.manual_seed(seed)
    method = build_method(name, **micro_overrides())
    images = synthetic_splits(img_size=16, train_per_class=32).train.images     # 320 images
    return Trainer(method, *pretraining(method, images, cfg, seed), run_dir, seed=seed, config_hash="test",
                   progress=False)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("name", ["mae", "pixel"])
def test_resumed_run_ends_with_bit_identical_weights_and_metrics(tmp_path, name):
    full = make_trainer(tmp_path / "full", name)
    stats = full.fit()
    assert stats["steps"] == 20 and stats["flops_per_step"] > 0

    interrupted = make_trainer(tmp_path / "resumed", name)
    original = interrupted.module.after_step

    def crash_at_step_12(step, total):
        original(step, total)
        if step == 12:                     # checkpoint at 10, metrics flushed to 12: both must roll back
            raise Interrupt

    interrupted.module.after_step = crash_at_step_12
    with pytest.raises(Interrupt):
        interrupted.fit()
    assert [p.name for p in checkpoint_paths(tmp_path / "resumed" / "checkpoints")] == \
        ["ckpt-00000010.pt", "ckpt-00000005.pt"]

    resumed = make_trainer(tmp_path / "resumed", name)
    resumed.fit()
    for (key, a), b in zip(full.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), key
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == \
        (tmp_path / "resumed" / "metrics.jsonl").read_text()
    # TensorBoard: the steps after the checkpoint written before the crash are purged, not doubled
    assert tensorboard_scalars(tmp_path / "resumed") == tensorboard_scalars(tmp_path / "full")


def test_a_resumed_run_records_the_flops_of_an_uninterrupted_one_where_they_vary_by_step(tmp_path):
    # iBOT's masked-patch count, and so its FLOPs, differ from batch to batch: every session
    # must report step 0's figure (kept in the checkpoints), not that of the step it resumed at
    full = make_trainer(tmp_path / "full", "ibot")
    stats = full.fit()
    assert full.flops_per_step(10) != stats["flops_per_step"]        # the premise: they vary (resumed at 10)
    interrupted = make_trainer(tmp_path / "resumed", "ibot")
    original = interrupted.module.after_step

    def crash_at_step_12(step, total):
        original(step, total)
        if step == 12:
            raise Interrupt
    interrupted.module.after_step = crash_at_step_12
    with pytest.raises(Interrupt):
        interrupted.fit()
    resumed = make_trainer(tmp_path / "resumed", "ibot").fit()
    assert (resumed["flops_per_step"], resumed["flops_total"]) == (stats["flops_per_step"], stats["flops_total"])


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_in_tb_hold_the_scalars_of_metrics_jsonl(tmp_path):
    make_trainer(tmp_path).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(tmp_path)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert set(scalars) == set(rows[0]) - {"step"} >= {"loss", "lr", "grad_norm"}
    for tag, series in scalars.items():
        assert [step for step, _ in series] == [r["step"] for r in rows] == list(range(20)), tag
        assert [value for _, value in series] == pytest.approx([r[tag] for r in rows], rel=1e-6), tag


def test_grad_norm_is_logged_with_clipping_off_and_measuring_it_leaves_the_weights_alone(tmp_path):
    # a clip far above any norm scales every gradient by exactly 1: the same weights as no clip
    unclipped = make_trainer(tmp_path / "off", cfg=dataclasses.replace(CFG, clip_grad=0.0))
    unclipped.fit()
    clipped = make_trainer(tmp_path / "far", cfg=dataclasses.replace(CFG, clip_grad=1e9))
    clipped.fit()
    norms = [[json.loads(line)["grad_norm"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("off", "far")]
    assert len(norms[0]) == 20 and all(norm > 0 for norm in norms[0])
    assert norms[0] == norms[1]                    # measured as clip_grad_norm_ measures it
    for (key, a), b in zip(unclipped.module.state_dict().items(), clipped.module.state_dict().values()):
        assert torch.equal(a, b), key


def test_metrics_log_every_step_and_the_lr_follows_warmup_then_cosine(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(20))
    lrs = [r["lr"] for r in rows]
    peak = 1e-3 * 32 / 256
    assert max(lrs) == pytest.approx(peak, rel=1e-6)
    assert lrs[0] < 0.1 * peak and lrs[-1] < 0.1 * peak
    assert lrs.index(max(lrs)) == 4        # 20% of 20 steps of warm-up


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.fit()
    newest = checkpoint_paths(tmp_path / "checkpoints")[0]
    newest.write_bytes(newest.read_bytes()[:1000])
    again = make_trainer(tmp_path)
    with pytest.warns(UserWarning, match="unreadable"):
        assert again.resume() == 15


@pytest.mark.parametrize("precision, named", [("auto", r"\(fp32\)"), ("bf16", r"\(bf16 autocast\)")])
def test_a_nonfinite_loss_stops_the_run_naming_the_step_and_precision(tmp_path, precision, named):
    trainer = make_trainer(tmp_path, cfg=TrainConfig(epochs=1, batch_size=32, checkpoint_every=3,
                                                     precision=precision))
    forward = trainer.module.forward

    def nan_after_4(batch, calls=[0]):
        calls[0] += 1
        loss, logs = forward(batch)
        return (loss * float("nan") if calls[0] > 4 else loss), logs

    trainer.step_fn = nan_after_4
    with pytest.raises(NonFiniteLoss, match=rf"^loss is nan at step 4 {named}; last good checkpoint: .*ckpt-00000003.pt"):
        trainer.fit()
    # read at the next flush point (the checkpoint at 6), before it is written: no checkpoint
    # holds weights that a non-finite step updated
    assert [p.name for p in checkpoint_paths(tmp_path / "checkpoints")] == ["ckpt-00000003.pt"]


def test_fp16_scales_the_loss_and_skips_an_overflowing_step_without_stopping(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=32, blr=1e-3, checkpoint_every=5, log_every=1, precision="fp16")
    trainer = make_trainer(tmp_path, cfg=cfg)
    assert trainer.scaler is not None
    forward = trainer.module.forward
    calls = []

    def overflow_at_step_3(batch):
        loss, logs = forward(batch)
        calls.append(1)
        if len(calls) == 4:
            loss = loss * 1e38            # finite, but scaled by 2**16 its gradients overflow
        return loss, logs

    trainer.step_fn = overflow_at_step_3
    stats = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scales = [r["loss_scale"] for r in rows]
    assert stats["steps"] == 10 and len(rows) == 10
    assert scales[0] == 2.0 ** 16 and min(scales) == 2.0 ** 15      # halved once, at the overflow
    assert scales.index(min(scales)) == 3
    state = torch.load(checkpoint_paths(tmp_path / "checkpoints")[0], weights_only=True)
    assert state["scaler"]["scale"] == 2.0 ** 15                   # resumes with the same scale


def test_fp16_overflow_step_leaves_the_weights_unchanged(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=32, blr=1e-3, checkpoint_every=50, log_every=1, precision="fp16")
    trainer = make_trainer(tmp_path, cfg=cfg)
    trainer.total_steps = 1
    trainer.step_fn = lambda batch: (lambda loss, logs: (loss * 1e38, logs))(*trainer.module.forward(batch))
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    trainer.fit()
    after = trainer.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.scaler.get_scale() == 2.0 ** 15


def test_an_unknown_precision_is_a_config_error():
    with pytest.raises(Exception, match="precision 'fp8' unknown; known: auto, fp32, bf16, fp16"):
        TrainConfig(precision="fp8").validate()


def test_a_finished_run_started_again_returns_its_training_stats_not_an_empty_session(tmp_path):
    first = make_trainer(tmp_path).fit()
    assert first["images_per_second"] > 0 and first["flops_total"] > 0
    again = make_trainer(tmp_path).fit()       # e.g. evaluations were interrupted and the run restarts
    assert again == json.loads(json.dumps(first))


def test_a_kill_between_the_last_checkpoint_and_the_stats_file_still_records_the_flops(tmp_path):
    first = make_trainer(tmp_path).fit()
    (tmp_path / "train_stats.json").unlink()   # as if killed right after the final checkpoint
    again = make_trainer(tmp_path).fit()
    assert again["steps"] == first["steps"] and again["flops_total"] == first["flops_total"] > 0
