"""Warm-up / stable / decay (engine.schedules, methods.base.Horizon): a decay branch taken from a
constant-lr trunk's checkpoint is the standalone wsd run of the branch's length, bit for bit."""
import dataclasses

import pytest
import torch

from conftest import micro_overrides
from core.config import ConfigError
from engine.data import synthetic_splits
from engine.schedules import wsd_horizon
from engine.trainer import BRANCH_POINTS, Trainer, TrainConfig
from engine.views import pretraining
from methods import build_method
from methods.base import Horizon

# 320 images at batch 32: 10 steps per epoch; 1.5 epochs = 15 steps, decay from step 12
WSD = TrainConfig(epochs=1.5, batch_size=32, blr=1e-3, schedule="wsd", warmup_steps=3, decay_frac=0.2,
                  checkpoint_every=100, log_every=5)
IBOT = dict(out_dim=128, head_hidden_dim=64, head_bottleneck_dim=32)
METHODS = {"mae": {}, "ibot": IBOT}
IMAGES = synthetic_splits(img_size=16, train_per_class=32).train.images


def trainer(run_dir, name, cfg=WSD, **kwargs):
    torch.manual_seed(0)
    method = build_method(name, **micro_overrides(**METHODS[name]))
    plan_args = {k: kwargs.pop(k) for k in ("trunk_steps", "keep_at") if k in kwargs}
    return Trainer(method, *pretraining(method, IMAGES, cfg, 0, **plan_args), run_dir, seed=0,
                   config_hash=kwargs.pop("config_hash", "run"), progress=False, **kwargs)


@pytest.mark.parametrize("name", ["mae", "ibot"])
def test_a_branch_from_the_trunk_is_bit_identical_to_the_standalone_wsd_run(tmp_path, name):
    cfg = WSD if name == "mae" else dataclasses.replace(WSD, weight_decay=0.04, weight_decay_end=0.4)
    standalone = trainer(tmp_path / "standalone", name, cfg)
    standalone.fit()
    assert standalone.plan.decay_start == 12
    # the trunk runs on at constant lr past the branch point; its checkpoint at 12 is kept
    trunk = trainer(tmp_path / "trunk", name, cfg, trunk_steps=18, keep_at=(6, 12), config_hash="trunk")
    trunk.fit()
    points = sorted(p.name for p in (tmp_path / "trunk" / BRANCH_POINTS).iterdir())
    assert points == ["ckpt-00000006.pt", "ckpt-00000012.pt"]
    branch = trainer(tmp_path / "branch", name, cfg, config_hash="branch",
                     start_from=(tmp_path / "trunk" / BRANCH_POINTS / "ckpt-00000012.pt", "trunk"))
    branch.fit()
    assert branch.start_step == 12
    for (key, a), b in zip(standalone.module.state_dict().items(), branch.module.state_dict().values()):
        assert torch.equal(a, b), key
    lrs = [row["lr"] for row in map(eval, (tmp_path / "trunk" / "metrics.jsonl").read_text().splitlines())]
    assert lrs[3:] == [lrs[3]] * (len(lrs) - 3)           # the trunk holds the peak after its warm-up


def test_the_wsd_lr_warms_up_holds_then_decays_linearly_to_the_floor(tmp_path):
    run = trainer(tmp_path, "mae", dataclasses.replace(WSD, min_lr_frac=0.1))
    peak = WSD.blr * WSD.batch_size / 256
    lrs = []
    for step in range(15):
        run.scheduler.step_update(step)
        lrs.append(run.optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(peak * 1e-3) and lrs[1] < lrs[2] < lrs[3] == pytest.approx(peak)
    assert lrs[3:12] == [pytest.approx(peak)] * 9
    floor = 0.1 * peak
    assert lrs[12:] == pytest.approx([floor + (peak - floor) * left / 3 for left in (3, 2, 1)])


def test_per_step_schedules_depend_on_the_step_alone_until_the_decay():
    short, long = wsd_horizon(15, 3, 0.2), wsd_horizon(150, 3, 0.2)
    for step in range(12):
        assert short.ramp(step, 0.996, 1.0) == long.ramp(step, 0.996, 1.0) == 0.996
        assert short.warmed(step, 0.3) == long.warmed(step, 0.3) == min(1.0, step / 3)
        assert short.early(step, 0.01) == long.early(step, 0.01) == (step < 3)
    assert short.ramp(14, 0.996, 1.0) == pytest.approx(0.999) and long.ramp(14, 0.996, 1.0) == 0.996
    cosine = Horizon(100)        # every run before curves: over the whole run, as before
    assert cosine.ramp(50, 0.04, 0.4) == pytest.approx(0.22) and cosine.warmed(15, 0.3) == 0.5


def test_a_decay_that_would_start_inside_the_warm_up_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^a wsd run of 10 steps would start its decay .* at step 8, inside its "
                                          r"9-step warm-up; raise the budget or lower warmup_steps$"):
        wsd_horizon(10, 9, 0.2)


def test_ibots_length_scaled_momentum_is_refused_under_wsd():
    from runs.identity import RunSpec, resolve
    from suites.profiles import get_profile
    spec = RunSpec("ibot", "curve", train={"schedule": "wsd", "warmup_steps": 2})
    data = {"name": "synthetic", "img_size": 16}
    with pytest.raises(ConfigError, match="momentum_rule='scaled'"):
        resolve(spec, get_profile("smoke"), 0, data, recipe="paper")
    assert resolve(spec, get_profile("smoke"), 0, data, recipe="shared").train["schedule"] == "wsd"
