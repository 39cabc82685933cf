"""Fine-tuning: BEiT/MAE layer decay, exact resume of a killed fine-tune, recipe checks.
(A kill -9 and a SIGTERM in a separate process: tests/test_train_loop_resume.py.)"""
from dataclasses import replace

import pytest
import torch

from conftest import kill_at_step
from core.config import ConfigError, identity_record
from engine.checkpoint import checkpoint_paths
from engine.data import synthetic_splits
from eval import finetune
from eval.finetune import Classifier, FinetuneConfig, LabelledBatches, finetune_trainer
from eval.registry import EvalContext, get_evaluation
from methods.vit import ViT, ViTConfig

SMALL = dict(epochs=1, batch_size=64, blr=1e-3, checkpoint_every=3, warmup_frac=0.2)


def context(work_dir, seed=0):
    return EvalContext(work_dir=work_dir, features_dir=work_dir / "features", seed=seed, progress=False)


def test_layer_decay_gives_block_i_decay_to_the_power_depth_minus_i(tmp_path):
    decay = 0.75
    vit = ViT(ViTConfig(size="nano", img_size=16, patch_size=4))          # depth 6
    depth = vit.cfg.depth
    model = Classifier(vit, num_classes=10, pooling="mean")
    splits = synthetic_splits(img_size=16)
    cfg = FinetuneConfig(layer_decay=decay, **SMALL)
    trainer = finetune_trainer(model, splits.train, cfg, tmp_path, seed=0, config_hash="t", progress=False)

    expected = {"encoder.cls_token": decay ** (depth + 1), "encoder.patch_embed.proj.weight": decay ** (depth + 1),
                "encoder.norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    expected.update({f"encoder.blocks.{i}.attn.qkv.weight": decay ** (depth - i) for i in range(depth)})
    expected.update({f"encoder.blocks.{i}.mlp.fc2.bias": decay ** (depth - i) for i in range(depth)})
    scale_of = {id(p): group["lr_scale"] for group in trainer.optimizer.param_groups for p in group["params"]}
    decay_of = {id(p): group["weight_decay"] for group in trainer.optimizer.param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    for name, scale in expected.items():
        assert scale_of[id(params[name])] == pytest.approx(scale), name
    assert decay_of[id(params["encoder.cls_token"])] == 0.0               # tokens, norms, biases: no decay
    assert decay_of[id(params["encoder.blocks.0.norm1.weight"])] == 0.0
    assert decay_of[id(params["encoder.blocks.0.attn.qkv.weight"])] == cfg.weight_decay

    # the schedule multiplies each group's scale into its learning rate
    step = trainer.total_steps - 1
    trainer.scheduler.step_update(step)
    peak = [g["lr"] / g["lr_scale"] for g in trainer.optimizer.param_groups]
    assert max(peak) == pytest.approx(min(peak))
    assert scale_of[id(params["encoder.patch_embed.proj.weight"])] < scale_of[id(params["encoder.blocks.0.attn.qkv.weight"])]


def test_a_killed_finetune_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    torch.manual_seed(0)
    vit = ViT(ViTConfig(size="micro", img_size=16, patch_size=4))
    splits = synthetic_splits(img_size=16)
    cfg = FinetuneConfig(**SMALL)                     # 10 steps, checkpoints at 3, 6, 9, 10
    straight = finetune.run(vit, splits, cfg, context(tmp_path / "straight", seed=1))

    kill_at_step(monkeypatch, LabelledBatches, 7)     # no checkpoint at the kill: 6 is the last one
    with pytest.raises(KeyboardInterrupt):
        finetune.run(vit, splits, cfg, context(tmp_path / "killed", seed=1))
    assert checkpoint_paths(tmp_path / "killed" / "checkpoints")[0].name == "ckpt-00000006.pt"
    monkeypatch.undo()
    resumed = finetune.run(vit, splits, cfg, context(tmp_path / "killed", seed=1))

    final = [torch.load(checkpoint_paths(tmp_path / d / "checkpoints")[0], weights_only=True)["model"]
             for d in ("straight", "killed")]
    assert final[0].keys() == final[1].keys()
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), name
    assert resumed.metrics == straight.metrics


def test_finetuning_leaves_the_given_encoder_untouched_uses_drop_path_and_gives_the_pinned_top1(tmp_path):
    torch.manual_seed(0)
    vit = ViT(ViTConfig(size="micro", img_size=16, patch_size=4))
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    result = get_evaluation("finetune").run(vit, synthetic_splits(img_size=16), FinetuneConfig(**SMALL),
                                            context(tmp_path))
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert vit.cfg.drop_path == 0.0
    # 43 of the 320 test images after 10 steps (CPU, fp32; the same before the trainer became
    # one loop for every use): a change here changes fine-tuning's numbers
    assert result.metrics == {"finetune_top1": pytest.approx(13.4375, rel=1e-6)}
    assert result.details["train"]["steps"] == 10


def test_a_blr_sweep_chooses_on_the_held_out_part_and_retrains_the_best_on_all_of_train(tmp_path):
    torch.manual_seed(0)
    vit = ViT(ViTConfig(size="micro", img_size=16, patch_size=4))
    splits = synthetic_splits(img_size=16)
    cfg = FinetuneConfig(**SMALL, blr_sweep=(0.3, 3.0))
    result = finetune.run(vit, splits, cfg, context(tmp_path / "sweep"))
    choice, sweep = result.details["choice"], result.details["sweep"]
    assert [point["blr"] for point in sweep["candidates"]] == pytest.approx([3e-4, 3e-3])
    assert sweep["grid"]["layer_decay"] == [cfg.layer_decay]          # a blr sweep alone
    held_out = [point["holdout_top1"] for point in sweep["candidates"]]
    best = sweep["candidates"][held_out.index(max(held_out))]
    assert choice == {"blr": best["blr"], "layer_decay": cfg.layer_decay} and sweep["blr_at_edge"]
    assert sorted(p.name for p in (tmp_path / "sweep").glob("sweep-*")) == ["sweep-x0.3", "sweep-x3"]
    # each candidate trained on train minus the held-out part; the final one on all of train
    steps_of = lambda n: n // SMALL["batch_size"]                            # one epoch
    assert result.details["train"]["steps"] == steps_of(len(splits.train)) > steps_of(len(splits.fit))
    # the final fine-tune is the plain one at the chosen blr: same test top-1
    plain = finetune.run(vit, splits, replace(cfg, blr=choice["blr"], blr_sweep=()), context(tmp_path / "plain"))
    assert plain.metrics == result.metrics
    # run again: every candidate and the final fine-tune resume from their checkpoints, nothing retrains
    again = finetune.run(vit, splits, cfg, context(tmp_path / "sweep"))
    assert again.metrics == result.metrics and again.details["sweep"] == sweep and again.details["choice"] == choice


def test_the_sweep_leaves_the_identity_of_every_earlier_fine_tune_config_alone():
    assert not {"blr_sweep", "layer_decay_sweep"} & set(identity_record(FinetuneConfig()))
    assert FinetuneConfig().config_hash() != FinetuneConfig(blr_sweep=(1.0, 2.0)).config_hash()
    assert FinetuneConfig().config_hash() != FinetuneConfig(layer_decay_sweep=(0.65, 1.0)).config_hash()


@pytest.mark.parametrize("changes,message", [
    (dict(randaug="augmix-m5"), "is not a timm RandAugment spec"),
    (dict(layer_decay=0.0), "layer_decay 0.0 must be in (0, 1]"),
    (dict(batch_size=33), "mixup/cutmix need an even batch_size"),
    (dict(pooling="max"), "fine-tune pooling 'max' unknown; known: cls, mean"),
    (dict(blr_sweep=(1.0, 0.0)), "blr_sweep (1.0, 0.0) must hold distinct multiples of blr > 0"),
    (dict(blr_sweep=(1.0, 1.0)), "must hold distinct multiples"),
    (dict(layer_decay_sweep=(0.75, 1.5)), "layer_decay_sweep (0.75, 1.5) must hold distinct layer decays in (0, 1]"),
    (dict(layer_decay_sweep=(1.0, 1.0)), "must hold distinct layer decays"),
])
def test_bad_recipes_are_refused_with_the_fix(changes, message):
    with pytest.raises(ConfigError) as err:
        FinetuneConfig(**changes).validate()
    assert message in str(err.value) and "\n" not in str(err.value)
