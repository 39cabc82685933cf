"""Recipes as data (methods.recipes): every method's paper recipe resolves and lands in its run's
config, `shared` is the recipe every earlier run had, and the pieces the paper recipes added
(weight-decay cosine, iBOT's last-layer freeze and scaled momentum, SimMIM's mask unit, the
student encoder, the baseline's from-scratch fine-tune) do what they say."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from methods.base import Horizon
from methods.masking import SCALED
from core.config import ConfigError
from engine.data import synthetic_splits
from engine.trainer import TrainConfig, Trainer
from engine.views import pretraining
from methods import build_method, registry
from methods.registry import from_project
from methods.registry import pretraining_methods as registered_pretraining
from methods.ibot import INIT_SHARE_AT_END, base_momentum, teacher_init_share
from methods.masking import MaskConfig, make_masks
from runs.execute import RunOptions, execute
from runs.state import ENCODER_FILE, eval_config
from runs.identity import Run, RunSpec, data_descriptor, resolve
from runs.records import read_record, write_record
from suites.profiles import PROFILES, get_profile

SYNTHETIC = {"name": "synthetic", "img_size": 32}
MICRO = {"size": "micro", "img_size": 16, "patch_size": 4}

QUIET = RunOptions(progress=False)


def pretraining_methods():
    """The project's methods whose runs pre-train an encoder: each declares its paper's recipe.
    (A method from outside may declare none: it then trains under the shared recipe under both.)"""
    return [name for name in registered_pretraining() if from_project(name)]


# ---- every method, every profile ---------------------------------------------------------------
@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("method", sorted(registry))
def test_every_registered_method_resolves_under_both_recipes_at_every_profile(method, profile):
    budget = get_profile(profile)
    data = {"name": "synthetic", "img_size": budget.encoder["img_size"]}
    spec = RunSpec(method, evals=())
    shared = resolve(spec, budget, 0, data, recipe="shared")
    paper = resolve(spec, budget, 0, data, recipe="paper")
    assert "recipe" not in shared.to_dict()
    cls = registry[method][0]
    recipe = cls.paper_recipe if cls.trains else None
    if method in pretraining_methods():
        assert recipe is not None and recipe.source, f"{method} declares no paper recipe with its source"
    if recipe is not None:
        assert paper.to_dict()["recipe"] == "paper" and paper.name != shared.name
        assert set(recipe.train) <= {f.name for f in dataclasses.fields(TrainConfig)}
        train = paper.train_config()
        for key, value in recipe.train.items():           # the recipe's values land in the run's config
            assert getattr(train, key) == pytest.approx(value), (method, key)
        # what depends on scale stays the profile's
        assert (train.epochs, train.batch_size) == (budget.train.epochs, budget.train.batch_size)
        assert paper.build_method_config().encoder.img_size == budget.encoder["img_size"]
        paper.build_method()
    else:   # the baseline, the tokenizer and a method from outside without a recipe: one run
        assert paper.name == shared.name


def flat(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@pytest.mark.parametrize("method", pretraining_methods())
def test_a_paper_config_differs_from_the_shared_one_only_where_the_recipe_says(method):
    """A partial nested override (e.g. only the mask's unit) must not reset its siblings to
    their class defaults (SimMIM's 0.6 ratio to MaskConfig's 0.75)."""
    cpu = get_profile("cpu")
    shared, paper = (resolve(RunSpec(method), cpu, 0, SYNTHETIC, recipe=r) for r in ("shared", "paper"))
    recipe = registry[method][0].paper_recipe
    for got, base, named in ((paper.method_config, shared.method_config, recipe.method),
                             (paper.train, shared.train, recipe.train)):
        got, base = flat(got), flat(base)
        changed = {k for k in got.keys() | base.keys() if got.get(k) != base.get(k)}
        assert changed <= set(flat(named)), (method, changed - set(flat(named)))


def test_paper_recipe_values_with_their_sources():
    """A few values checked against the papers (DESIGN.md / the faithfulness review)."""
    cpu = get_profile("cpu")
    mae, pixel, beit, ibot = (resolve(RunSpec(m), cpu, 0, SYNTHETIC) for m in ("mae", "pixel", "beit", "ibot"))
    assert (mae.train["blr"], mae.train["beta2"], mae.train["clip_grad"]) == (1.5e-4, 0.95, 0.0)
    assert beit.train["blr"] == pytest.approx(1.5e-3 * 256 / 2048) and beit.train["clip_grad"] == 3.0
    assert beit.method_config["encoder"]["layer_scale"] == 0.1 and beit.method_config["augment"] == "beit"
    # SimMIM's 32-px unit (2 patches at 224 px) as its share of the side: 1 patch at cpu's 8x8 grid
    assert pixel.train["crop_scale_min"] == 0.67 and pixel.method_config["mask"]["unit"] == SCALED
    assert pixel.build_method_config().mask.at_grid(14).unit == 2
    assert beit.build_method_config().mask.at_grid(8).min_block_patches == 4
    assert pixel.method_config["mask"]["ratio"] == 0.6
    assert (ibot.train["weight_decay"], ibot.train["weight_decay_end"], ibot.train["beta2"]) == (0.04, 0.4, 0.999)
    assert ibot.method_config["augment"] == "dino" and ibot.method_config["local_crops_number"] == 4
    assert ibot.method_config["momentum_rule"] == "scaled" and ibot.train["clip_mode"] == "per_param"
    # a RunSpec's overrides still win over the recipe
    spec = RunSpec("ibot", overrides={"local_crops_number": 0}, train={"blr": 1e-3})
    override = resolve(spec, cpu, 0, SYNTHETIC)
    assert override.method_config.get("local_crops_number", 0) == 0 and override.train["blr"] == 1e-3


def test_an_unknown_recipe_is_one_line_naming_the_known_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'papers'; known: paper, shared, tuned"):
        resolve(RunSpec("mae"), get_profile("smoke"), 0, SYNTHETIC, recipe="papers")


def test_beit_runs_of_both_recipes_share_one_tokenizer():
    cpu = get_profile("cpu")
    paper, shared = (resolve(RunSpec("beit"), cpu, 0, SYNTHETIC, recipe=r) for r in ("paper", "shared"))
    assert paper.requires["tokenizer"].config.name == shared.requires["tokenizer"].config.name


# ---- iBOT's teacher momentum at short budgets ------------------------------------------------------
@pytest.mark.parametrize("steps", [10, 39, 195, 975])
def test_scaled_momentum_leaves_at_most_one_percent_of_the_random_init(steps):
    fixed = teacher_init_share(base_momentum("fixed", 0.996, steps), steps)
    scaled = teacher_init_share(base_momentum("scaled", 0.996, steps), steps)
    assert scaled <= INIT_SHARE_AT_END * 1.05 < fixed
    if steps >= 39:     # (the rule's exp() approximation of the product is loose on a handful of steps)
        assert scaled > INIT_SHARE_AT_END / 2        # lowered only as far as the rule needs


def test_scaled_momentum_keeps_the_papers_value_on_long_runs_and_the_fixed_rule_is_the_papers():
    assert base_momentum("scaled", 0.996, 1_000_000) == 0.996
    assert base_momentum("fixed", 0.996, 39) == 0.996
    assert base_momentum("scaled", 0.996, 195) == pytest.approx(1 - 2 * math.log(100) / 195)
    # the 67.5% of the faithfulness review: 195 steps at the paper's fixed schedule
    assert teacher_init_share(0.996, 195) == pytest.approx(0.675, abs=0.001)


def test_ibot_after_step_moves_the_teacher_by_the_scaled_momentum():
    torch.manual_seed(0)
    model = build_method("ibot", encoder=MICRO, out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8,
                         momentum_rule="scaled")
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.teacher.encoder.parameters()]
    model.after_step(0, Horizon(20))
    m = base_momentum("scaled", 0.996, 20)
    for old, new, s in zip(before, model.teacher.encoder.parameters(), model.encoder.parameters()):
        torch.testing.assert_close(new, m * old + (1 - m) * s)


# ---- the trainer's schedules and hooks -----------------------------------------------------------
def train_micro(method: str, tmp_path: Path, epochs: float = 1.0, overrides: dict | None = None,
                **train) -> Trainer:
    torch.manual_seed(0)
    heads = dict(out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8) if method == "ibot" else {}
    model = build_method(method, encoder=MICRO, **{**heads, **(overrides or {})})
    images = synthetic_splits(img_size=16, train_per_class=16).train.images
    cfg = TrainConfig(epochs=epochs, batch_size=32, blr=1e-3, warmup_frac=0.0, checkpoint_every=100, **train)
    trainer = Trainer(model, *pretraining(model, images, cfg, seed=0), tmp_path, seed=0, config_hash="test",
                      progress=False)
    trainer.fit()
    return trainer


def test_weight_decay_follows_its_cosine_and_norms_and_biases_stay_undecayed(tmp_path):
    trainer = train_micro("mae", tmp_path, weight_decay=0.04, weight_decay_end=0.4)
    last = trainer.total_steps - 1
    decays = [g["weight_decay"] for g in trainer.optimizer.param_groups]
    assert 0.0 in decays and max(decays) == pytest.approx(Horizon(trainer.total_steps).ramp(last, 0.04, 0.4))
    assert Horizon(10).ramp(0, 0.04, 0.4) == pytest.approx(0.04) and Horizon(10).ramp(10, 0.04, 0.4) == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="weight_decay_end"):
        TrainConfig(weight_decay_end=-0.1).validate()


def test_ibot_last_layer_stays_at_its_init_while_frozen_and_trains_after(tmp_path):
    torch.manual_seed(0)
    init = build_method("ibot", encoder=MICRO, out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8)
    last_layer = {k: v.clone() for k, v in init.heads["cls"].last_layer.state_dict().items()}
    frozen = train_micro("ibot", tmp_path / "frozen", epochs=0.5, overrides={"freeze_last_layer_frac": 0.99})
    free = train_micro("ibot", tmp_path / "free", epochs=0.5)
    for key, value in last_layer.items():
        if value.requires_grad or key.endswith("original1"):     # the direction v (g is fixed by norm_last_layer)
            assert torch.equal(frozen.module.heads["cls"].last_layer.state_dict()[key], value), key
            assert not torch.equal(free.module.heads["cls"].last_layer.state_dict()[key], value), key
    assert not torch.equal(frozen.module.encoder.patch_embed.proj.weight, init.encoder.patch_embed.proj.weight)


# ---- SimMIM's mask unit --------------------------------------------------------------------------
def test_per_parameter_clipping_clips_each_gradient_alone(tmp_path):
    from engine.trainer import clip_per_parameter
    big, small = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    big.grad, small.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, 0.4])
    total = clip_per_parameter([big, small], 3.0)
    assert total == pytest.approx(math.hypot(50.0, 0.5))
    torch.testing.assert_close(big.grad, torch.tensor([1.8, 2.4, 0.0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small.grad, torch.tensor([0.3, 0.4]))        # under the norm: unchanged


def test_a_mask_unit_masks_whole_unit_squares_at_the_ratio():
    mask = make_masks(MaskConfig("random", 0.6, unit=2), 8, 8, torch.Generator().manual_seed(0))
    grid = mask.view(8, 4, 2, 4, 2)
    assert torch.equal(grid.amin(dim=(2, 4)), grid.amax(dim=(2, 4)))      # constant on each 2x2 unit
    assert (mask.sum(dim=1) == 4 * round(0.6 * 16)).all()
    with pytest.raises(ConfigError, match="mask unit 3 must divide the 8x8 patch grid"):
        make_masks(MaskConfig("random", 0.6, unit=3), 2, 8, torch.Generator())
    with pytest.raises(ConfigError, match="mask unit 3 must divide"):       # at config time, for every method
        build_method("mae", encoder={"img_size": 32, "patch_size": 4}, mask={"unit": 3})
    # blockwise: the smallest block is counted in patches, so in units it is a quarter
    block = make_masks(MaskConfig("block", 0.5, min_block_patches=16, unit=2), 64, 8, torch.Generator().manual_seed(0))
    assert block.view(64, 4, 2, 4, 2).amin(dim=(2, 4)).equal(block.view(64, 4, 2, 4, 2).amax(dim=(2, 4)))
    assert block.sum(dim=1).float().mean() > 0.3 * 64


# ---- the strongest baseline ------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_the_baseline_is_segmented_without_layer_decay_the_others_with(profile):
    budget = get_profile(profile)
    assert eval_config("segmentation", budget, "none").layer_decay == 1.0
    assert eval_config("segmentation", budget, "mae").layer_decay == \
        budget.eval_config("segmentation").layer_decay < 1.0
    # fine-tuning: one protocol for every encoder (tests/test_finetune_protocol.py), no decay among its candidates
    finetune = budget.eval_config("finetune")
    assert eval_config("finetune", budget, "none") == eval_config("finetune", budget, "mae") == finetune
    assert 1.0 in finetune.layer_decay_sweep


# ---- the student beside the teacher ------------------------------------------------------------------
def test_knn_of_the_student_is_recorded_beside_the_teachers_and_rebuilt_from_the_checkpoint(tmp_path):
    smoke = get_profile("smoke")
    spec = RunSpec("ibot", evals=("knn", "knn@student"), overrides=dict(out_dim=64, head_hidden_dim=32))
    config = resolve(spec, smoke, 0, data_descriptor(smoke, None), recipe="shared")
    record = execute(Run(spec, 0, config), smoke, tmp_path, QUIET)
    run_dir = config.folder(tmp_path)
    assert {"knn_top1_cls", "knn_student_top1_cls", "knn_student_top1_mean"} <= set(record.metrics)
    assert (run_dir / "student.safetensors").is_file() and (run_dir / "features-student").is_dir()
    assert (run_dir / "student.safetensors").read_bytes() != (run_dir / ENCODER_FILE).read_bytes()
    # a run finished before students were saved: taken from its last checkpoint, same metrics
    student = (run_dir / "student.safetensors").read_bytes()
    (run_dir / "student.safetensors").unlink()
    for path in run_dir.glob("evals/knn@student-*"):
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    for f in (run_dir / "features-student").iterdir():
        f.unlink()
    finished = read_record(run_dir)
    write_record(run_dir, dataclasses.replace(finished, evals={k: v for k, v in finished.evals.items() if "@" not in k}))
    again = execute(Run(spec, 0, config), smoke, tmp_path, QUIET)
    assert (run_dir / "student.safetensors").read_bytes() == student
    assert again.metrics["knn_student_top1_cls"] == record.metrics["knn_student_top1_cls"]


def test_a_variant_the_method_does_not_save_is_a_config_error():
    with pytest.raises(ConfigError, match="mae runs save no encoder 'student'"):
        resolve(RunSpec("mae", evals=("knn@student",)), get_profile("smoke"), 0, SYNTHETIC)


@pytest.mark.parametrize("method", sorted(registry))
def test_every_methods_eval_overrides_build_a_valid_config_of_every_evaluation_it_takes(method):
    from eval.registry import registry as evaluations
    cls = registry[method][0]
    assert set(cls.eval_overrides) <= set(evaluations), f"{method} overrides an unknown evaluation"
    for name, evaluation in evaluations.items():
        if evaluation.takes == cls.product:
            for profile in PROFILES.values():
                eval_config(name, profile, method)          # builds and validates
