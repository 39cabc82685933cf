"""iBOT: the teacher is an EMA of the student that never gets gradients, the centres and
temperatures shape its targets, and the MIM loss looks at masked patches only."""
import json
import math

import pytest
import torch
from timm.optim import create_optimizer_v2

from conftest import micro_overrides
from core.config import ConfigError
from engine.checkpoint import checkpoint_paths
from engine.data import random_resized_crop_flip, synthetic_splits
from engine.trainer import Trainer, TrainConfig
from engine.views import pretraining
from methods import build_method
from methods.base import Batch, Horizon
from methods.ibot import centred_softmax, cosine_momentum, cross_view_cross_entropy, masked_image_mean
from methods.masking import block_mask_per_image


SMALL_HEAD = dict(out_dim=128, head_hidden_dim=64, head_bottleneck_dim=32)   # fast trainer tests


def ibot(**overrides):
    torch.manual_seed(0)
    return build_method("ibot", **micro_overrides(**overrides))


def views_batch(method, batch_size=16, seed=0):
    """Two augmented views of real (synthetic, structured) images, with iBOT's masks."""
    gen = torch.Generator().manual_seed(seed)
    images = synthetic_splits(img_size=16, train_per_class=8).train.images[:batch_size]
    views = [random_resized_crop_flip(images, 16, gen) for _ in range(method.num_views)]
    return Batch(images=views[0], mask=method.draw_masks(batch_size, gen), views=views)


def perturb_student(method, scale=0.05):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*method.encoder.parameters(), *method.heads.parameters()]:
            p.add_(scale * torch.randn(p.shape, generator=gen))


def test_no_gradient_reaches_the_teacher_and_the_optimizer_never_sees_it():
    method = ibot()
    loss, _ = method(views_batch(method))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.encoder.blocks.parameters())
    optimizer = create_optimizer_v2(method, opt="adamw", lr=1e-3, weight_decay=0.05)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in method.teacher.parameters()}


def test_ema_update_moves_the_teacher_toward_the_student_by_the_cosine_momentum():
    method = ibot()
    perturb_student(method)
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    student = [p.clone() for p in [*method.encoder.parameters(), *method.heads.parameters()]]
    assert any(not torch.equal(t, s) for t, s in zip(teacher_before, student))

    method.after_step(3, Horizon(10))
    momentum = 1 - (1 - 0.996) * (math.cos(math.pi * 3 / 10) + 1) / 2
    for after, before, s in zip(method.teacher.parameters(), teacher_before, student):
        torch.testing.assert_close(after, momentum * before + (1 - momentum) * s, rtol=0, atol=1e-7)
    assert cosine_momentum(0, 10, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(10, 10, 0.996) == pytest.approx(1.0)


def test_a_forward_pass_changes_neither_the_teacher_nor_the_centres():
    method = ibot()
    perturb_student(method)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method(views_batch(method))
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())


def test_mim_loss_counts_masked_positions_only():
    # reduction pinned by hand: per image, the mean over its masked patches; then over all images
    mask = torch.tensor([[True, True, False], [False, False, False], [False, True, False]])
    per_patch = torch.tensor([1.0, 3.0, 6.0])                  # image 0: 1, 3; image 2: 6
    assert masked_image_mean(per_patch, mask).item() == pytest.approx((2.0 + 0.0 + 6.0) / 3)

    method = ibot()
    batch = views_batch(method)
    mask = batch.mask.flatten(0, 1)
    images = torch.cat(batch.views)
    seen = {}
    method.heads["cls"].register_forward_hook(lambda m, inputs, out: seen.setdefault("rows", []).append(len(out)))
    with torch.no_grad():
        teacher_cls, teacher_patch = method.forward_teacher(images)
        student_cls, student_patch = method.forward_student(images, mask)
        _, logs = method.forward_loss(teacher_cls, teacher_patch, student_cls, student_patch, mask)
        # the student's head runs on [CLS] and on the masked patches, nothing else
        assert seen["rows"][-2:] == [len(images), int(mask.sum())]
        noise = 10 * torch.randn_like(teacher_patch)
        visible_changed = torch.where(mask[..., None], teacher_patch, teacher_patch + noise)
        _, same = method.forward_loss(teacher_cls, visible_changed, student_cls, student_patch, mask)
        masked_changed = torch.where(mask[..., None], teacher_patch + noise, teacher_patch)
        _, other = method.forward_loss(teacher_cls, masked_changed, student_cls, student_patch, mask)
    assert same["loss_mim"].item() == pytest.approx(logs["loss_mim"].item(), abs=1e-6)
    assert same["loss_cls"].item() == pytest.approx(logs["loss_cls"].item(), abs=1e-6)
    assert abs(other["loss_mim"].item() - logs["loss_mim"].item()) > 1e-2


def test_centring_subtracts_an_ema_of_the_teachers_mean_output_before_sharpening():
    method = ibot(center_momentum=0.9)
    batch = views_batch(method)
    with torch.no_grad():
        teacher_cls, teacher_patch = method.forward_teacher(torch.cat(batch.views))
    old_cls, old_patch = method.center_cls.clone(), method.center_patch.clone()
    method(batch)
    method.after_step(0, Horizon(10))
    torch.testing.assert_close(method.center_cls, 0.9 * old_cls + 0.1 * teacher_cls.mean(0))
    torch.testing.assert_close(method.center_patch, 0.9 * old_patch + 0.1 * teacher_patch.mean((0, 1)))

    # the targets are softmax((logits - centre) / T): a direction that dominates every
    # sample is removed by a centre that has learned it, so it no longer wins everywhere
    logits = torch.randn(64, 32)
    common = torch.zeros(32)
    common[0] = 5.0
    torch.testing.assert_close(centred_softmax(logits, torch.zeros(32), 0.1),
                               torch.softmax(logits / 0.1, dim=-1))
    uncentred = centred_softmax(logits + common, torch.zeros(32), 0.1)
    centred = centred_softmax(logits + common, common + logits.mean(0), 0.1)
    assert (uncentred.argmax(-1) == 0).all()
    assert (centred.argmax(-1) == 0).float().mean() < 0.2
    torch.testing.assert_close(centred, centred_softmax(logits, logits.mean(0), 0.1))


def test_teacher_temperature_warms_up_linearly_then_holds():
    method = ibot(warmup_teacher_temp=0.04, teacher_temp=0.07, teacher_patch_temp=0.06,
                  teacher_temp_warmup_frac=0.5)
    assert method.teacher_temps.tolist() == pytest.approx([0.04, 0.04])
    method.after_step(4, Horizon(20))                    # next step is 5 of a 10-step warm-up
    assert method.teacher_temps.tolist() == pytest.approx([0.055, 0.05])
    method.after_step(15, Horizon(20))
    assert method.teacher_temps.tolist() == pytest.approx([0.07, 0.06])


class Interrupt(Exception):
    pass


def test_a_resumed_run_ends_with_bit_identical_teacher_centres_and_metrics(tmp_path):
    images = synthetic_splits(img_size=16, train_per_class=32).train.images          # 320 images
    cfg = TrainConfig(epochs=1, batch_size=32, blr=1e-3, warmup_frac=0.2, checkpoint_every=4, log_every=2)

    def trainer(run_dir):
        method = ibot(**SMALL_HEAD)
        return Trainer(method, *pretraining(method, images, cfg, seed=0), run_dir, seed=0, config_hash="test",
                       progress=False)

    full = trainer(tmp_path / "full")
    full.fit()
    interrupted = trainer(tmp_path / "resumed")
    after_step = interrupted.method.after_step

    def crash_at_step_6(step, total):
        after_step(step, total)
        if step == 6:                   # checkpoint at 4, metrics flushed to 6: both roll back
            raise Interrupt

    interrupted.method.after_step = crash_at_step_6
    with pytest.raises(Interrupt):
        interrupted.fit()
    assert checkpoint_paths(tmp_path / "resumed" / "checkpoints")[0].name == "ckpt-00000004.pt"
    resumed = trainer(tmp_path / "resumed")
    resumed.fit()
    expected = full.method.state_dict()
    assert any(k.startswith("teacher.") for k in expected) and "center_patch" in expected
    for key, value in resumed.method.state_dict().items():
        assert torch.equal(expected[key], value), key
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == \
        (tmp_path / "resumed" / "metrics.jsonl").read_text()


def test_a_few_steps_on_a_fixed_batch_lower_the_loss_and_the_teacher_entropy_stays_above_zero():
    method = ibot()
    batch = views_batch(method)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    rows = []
    for step in range(12):
        loss, logs = method(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_step(step, Horizon(12))
        rows.append({k: v.item() for k, v in logs.items()})
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], [r["loss"] for r in rows]
    max_entropy = math.log(method.cfg.out_dim)
    for key in ("teacher_entropy_cls", "teacher_entropy_patch"):
        assert all(0.2 * max_entropy < r[key] <= max_entropy for r in rows), [r[key] for r in rows]
    assert rows[-1]["center_norm_cls"] > 0 and rows[-1]["center_norm_patch"] > 0


def test_masks_hide_a_fraction_of_the_images_with_a_ratio_drawn_from_the_range():
    gen = torch.Generator().manual_seed(0)
    mask = block_mask_per_image(200, 14, (0.1, 0.5), 0.5, gen, min_block_patches=16)
    counts = mask.sum(1)
    assert (counts > 0).sum() == 100
    masked = counts[counts > 0].float() / 196
    assert masked.max() <= 0.5 and masked.min() >= 0.1 - 16 / 196
    assert masked.std() > 0.08                   # ratios vary per image (uniform on [0.1, 0.5]: 0.115)

    method = ibot()
    masks = method.draw_masks(16, torch.Generator().manual_seed(0))
    assert masks.shape == (2, 16, 16) and masks.dtype == torch.bool
    assert ((masks.sum(-1) > 0).sum(-1) == 8).all()
    assert not torch.equal(masks[0], masks[1])   # each view is masked independently


def test_evaluations_get_the_teacher_encoder_unless_asked_for_the_student():
    method = ibot()
    assert method.export_encoder() is method.teacher.encoder
    student = ibot(export="student")
    assert student.export_encoder() is student.encoder
    method.train()
    assert method.encoder.training and not method.teacher.training


def test_the_teacher_runs_without_drop_path_from_construction_on():
    """The student's drop path must not reach the targets: nothing calls train() before
    the first step, so the teacher is in eval mode from construction."""
    method = ibot(encoder={"size": "micro", "img_size": 16, "patch_size": 4, "drop_path": 0.5})
    assert method.encoder.training and not method.teacher.training
    images = views_batch(method).views[0]
    with torch.no_grad():
        first, second = (method.teacher.encoder(images) for _ in range(2))
    assert torch.equal(first, second)


def test_separate_heads_give_the_patch_tokens_their_own_head():
    method = ibot(shared_head=False)
    loss, _ = method(views_batch(method))
    loss.backward()
    for name in ("cls", "patch"):
        assert method.heads[name].mlp[0].weight.grad.abs().sum() > 0
    assert method.heads["patch"] is not method.heads["cls"]


@pytest.mark.parametrize("overrides,message", [
    (dict(mask_ratio_range=(0.5, 0.1)), "mask_ratio_range"),
    (dict(mask_fraction=1.5), "mask_fraction"),
    (dict(teacher_temp=0.0), "temperatures must be > 0"),
    (dict(export="both"), "unknown export 'both'; known: teacher, student"),
    (dict(out_dim=0), "out_dim"),
    (dict(local_crops_number=2, local_crop_size=6), "a multiple of the patch size 4"),
    (dict(local_crops_number=-1), "local_crops_number"),
    (dict(local_crops_scale=(0.4, 0.05)), "local_crops_scale"),
])
def test_bad_config_values_raise_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_method("ibot", **micro_overrides(**overrides))


def test_cls_loss_pairs_every_student_view_with_every_other_teacher_view():
    gen = torch.Generator().manual_seed(0)
    batch, k = 3, 5
    teacher = torch.softmax(torch.randn(2 * batch, k, generator=gen), -1)      # 2 global views
    student = torch.randn(4 * batch, k, generator=gen)                         # 2 global + 2 local
    log_p = torch.log_softmax(student, -1).view(4, batch, k)
    t = teacher.view(2, batch, k)
    pairs = [-(t[q] * log_p[v]).sum(-1).mean() for q in range(2) for v in range(4) if q != v]
    expected = torch.stack(pairs).mean()
    assert torch.allclose(cross_view_cross_entropy(teacher, student, num_global=2), expected)


def test_multi_crop_adds_local_views_that_train_the_student_cls_only(tmp_path):
    method = ibot(local_crops_number=2, local_crop_size=8, **SMALL_HEAD)
    assert method.view_specs(0.2) == [(16, (0.2, 1.0))] * 2 + [(8, (0.05, 0.4))] * 2
    assert ibot().view_specs(0.2) == [(16, (0.2, 1.0))] * 2       # off by default
    assert build_method("ibot", encoder={"img_size": 224, "patch_size": 16}).cfg.local_size == 96

    batch = views_batch(method)
    gen = torch.Generator().manual_seed(3)
    images = synthetic_splits(img_size=16, train_per_class=8).train.images[:16]
    locals_ = [random_resized_crop_flip(images, 8, gen, scale=(0.05, 0.4)) for _ in range(2)]
    with_locals = Batch(batch.images, batch.mask, batch.views + locals_)
    loss, logs = method(with_locals)
    loss_global, logs_global = method(batch)
    assert logs["loss_mim"] == logs_global["loss_mim"]              # local crops: [CLS] loss only
    assert logs["loss_cls"] != logs_global["loss_cls"]
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    loss.backward()
    assert method.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, method.teacher.parameters()))

    # the trainer makes the local crops from the method's view specs and trains with them
    splits = synthetic_splits(img_size=16, train_per_class=8)
    cfg = TrainConfig(epochs=1, batch_size=16, blr=1e-3, warmup_frac=0.0, log_every=1, checkpoint_every=100)
    trainer = Trainer(method, *pretraining(method, splits.train.images, cfg, seed=0), tmp_path, seed=0,
                      config_hash="test", progress=False)
    views = trainer.batch_for_step(0).views
    assert [tuple(v.shape[-2:]) for v in views] == [(16, 16)] * 2 + [(8, 8)] * 2
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)


def test_multi_crop_fields_at_their_defaults_leave_run_names_unchanged():
    from runs.identity import identity_record

    default = identity_record(build_method("ibot").cfg)
    assert "local_crops_number" not in default and "mask_ratio_range" in default
    multi = identity_record(build_method("ibot", local_crops_number=4).cfg)
    assert multi["local_crops_number"] == 4 and "local_crops_scale" not in multi
