"""Profiles: how big, how long, on what data. Named dataclass instances, no YAML.

smoke     synthetic images, a micro ViT, seconds: for tests and a first look
cpu       CIFAR-10 on the nano ViT, 2 cores; budgets from ../shared/DESIGN.md (Calibration):
          ~5 epochs of MAE are what separate its k-NN from random init by 6-9 points
gpu       CIFAR-10 on ViT-Tiny, one GPU, 100 epochs
imagenet  ViT-B/16 at 224 px with the papers' schedules; pass --data /path/to/imagenet

`override` applies `--set KEY=VALUE` to a profile (a smaller model or batch, e.g. the imagenet
profile on a small folder on a CPU).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from core.config import ConfigError, unknown
from engine.trainer import TrainConfig
from eval.registry import get_evaluation
from eval.finetune import FinetuneConfig
from eval.knn import KNNConfig
from eval.linear import LinearConfig
from eval.segmentation import SegmentationConfig


def held_out_grid(finetune: FinetuneConfig) -> FinetuneConfig:
    """`finetune` as every encoder, pre-trained or not, is fine-tuned: at the blr and layer decay
    of the grid (0.5x, 1x, 2x the blr) x (its layer decay, none) with the best held-out top-1,
    chosen at seed 0 of a cell and taken by its other seeds (eval.finetune, runs.execute). No
    decay (1.0) is in the grid because a random init needs it (at cpu's 0.75 its patch embedding
    trains at 0.75^7 = 0.13x the head's lr); the profile's decay, because the papers tuned
    pre-trained encoders at it."""
    return dataclasses.replace(finetune, blr_sweep=(0.5, 1.0, 2.0), layer_decay_sweep=(finetune.layer_decay, 1.0))


@dataclass(frozen=True)
class EvalConfigs:
    """The linear probe's, fine-tuning's and segmentation's configs at a profile's scale
    (defaults: the papers' ViT-B / ImageNet / ADE20K protocols)."""
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)


@dataclass(frozen=True)
class Profile:
    name: str
    data: str                       # "synthetic", "cifar10" (shipped), or "user" (--data required)
    encoder: dict                   # ViTConfig fields
    train: TrainConfig
    seeds: int                      # default number of seeds
    knn: KNNConfig = field(default_factory=KNNConfig)
    evaluations: EvalConfigs = field(default_factory=EvalConfigs)
    feature_batch: int = 1024
    # per-method config overrides at this scale, e.g. {"mae": {"decoder_dim": 128}}: the one place
    # for them (a method a profile does not name runs at its config's defaults)
    method_defaults: dict = field(default_factory=dict)
    # Sustained training FLOP/s assumed by the cost estimate of `--dry-run`. The CPU figure
    # is what a nano MAE step reaches on the 2-core development machine (~100 GFLOP/s,
    # ~55% of its measured fp32 matmul peak); the GPU ones assume ~40% of bf16 peak.
    flops_per_second: float = 100e9
    # the --set values as given (`override`), by field: {"train": {"blr": 0.005}}. A paper recipe
    # sits above the profile's encoder and train; these are applied again above it, so what the
    # user sets is what runs (runs.identity.resolve)
    user_settings: dict = field(default_factory=dict)
    # --recipe tuned: each method's chosen lr, the grid and its held-out scores (suites.tune), read
    # from results/tuned/<profile>.json by get_profile: {"mae": {"blr": 0.002, ...}}
    tuning: dict = field(default_factory=dict)

    def eval_config(self, name: str):
        """The config of evaluation `name` at this profile; a registered evaluation the profile
        does not configure runs at its config class's defaults."""
        configs = {"knn": self.knn, **{f.name: getattr(self.evaluations, f.name) for f in fields(EvalConfigs)}}
        return configs[name] if name in configs else get_evaluation(name).config_cls()


# method_defaults["beit"] is BEiT's stage-1 tokenizer at each profile: one dVAE run, trained once
# and shared by every BEiT cell and seed. smoke: a tiny codebook, seconds; imagenet: BEiT's
# |V| = 8192, untested here.
PROFILES = {
    "smoke": Profile(
        name="smoke", data="synthetic",
        encoder=dict(size="micro", img_size=16, patch_size=4),
        train=TrainConfig(epochs=2, batch_size=64, blr=1e-3, warmup_frac=0.1, checkpoint_every=8,
                          log_every=4),
        seeds=1, feature_batch=256,
        method_defaults={"mae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
                         "beit": dict(tokenizer={"vocab_size": 64, "hidden_dim": 16}, tokenizer_epochs=2.0)},
        # every code path once, in seconds; CamVid (real) at a toy size
        evaluations=EvalConfigs(
            linear=LinearConfig(epochs=5, batch_size=128),
            finetune=held_out_grid(FinetuneConfig(epochs=1, batch_size=64, blr=1e-3, checkpoint_every=8,
                                                  log_every=4)),
            segmentation=SegmentationConfig(dataset="camvid", scale=(64, 48), crop_size=32, iterations=2,
                                            batch_size=2, channels=16, aux_channels=16, warmup_iters=0,
                                            eval_images=4, checkpoint_every=2)),
        flops_per_second=20e9,
    ),
    "cpu": Profile(
        name="cpu", data="cifar10",
        encoder=dict(size="nano", img_size=32, patch_size=4),
        # lr 1e-3 at batch 256, 5% warm-up + cosine, betas (0.9, 0.95), wd 0.05: the
        # calibration recipe of DESIGN.md; 5 epochs, because 1.5 epochs is within noise.
        train=TrainConfig(epochs=5, batch_size=256, blr=1e-3, warmup_frac=0.05, clip_grad=0.0,
                          checkpoint_every=100),
        seeds=3,
        # small inference batches stay in cache: nano features at batch 64 ran 1.5x faster than
        # at 1024 (one thread, measured in one process)
        feature_batch=64,
        method_defaults={"mae": dict(decoder_dim=128, decoder_depth=2, decoder_heads=4),
                         "beit": dict(tokenizer_epochs=2.0)},
        evaluations=EvalConfigs(
            linear=LinearConfig(),      # 30 epochs on cached features: seconds
            # Two epochs (~8 min on an idle 2-core machine): a short schedule on a small model
            # underfits, so none of the long-schedule regularisers (mixup/cutmix, RandAugment,
            # drop path; session 1 measured 38.5% for random init with RandAugment on, below
            # the 44% linear probe), MAE's pre-training crop scale, a higher lr than ViT-B's,
            # milder layer decay for 6 blocks. Swept (held_out_grid): 6 fine-tunes on 45k at seed 0.
            finetune=held_out_grid(FinetuneConfig(epochs=2, batch_size=128, blr=1e-3, layer_decay=0.75, mixup=0.0,
                                                  cutmix=0.0, randaug="", drop_path=0.0, crop_scale_min=0.2,
                                                  checkpoint_every=100)),
            # CamVid at half resolution, 128-px crops (32x32 tokens at patch 4), a narrow head
            segmentation=SegmentationConfig(dataset="camvid", scale=(240, 180), crop_size=128,
                                            iterations=200, batch_size=4, lr=5e-4, layer_decay=0.75,
                                            warmup_iters=20, channels=128, aux_channels=64,
                                            checkpoint_every=50)),
    ),
    "gpu": Profile(
        name="gpu", data="cifar10",
        encoder=dict(size="tiny", img_size=32, patch_size=4),
        train=TrainConfig(epochs=100, batch_size=512, blr=1e-3, warmup_frac=0.05, clip_grad=0.0,
                          checkpoint_every=500),
        seeds=3, feature_batch=4096,
        method_defaults={"mae": dict(decoder_dim=192, decoder_depth=4, decoder_heads=6),
                         "beit": dict(tokenizer={"hidden_dim": 64}, tokenizer_epochs=30.0)},
        evaluations=EvalConfigs(
            linear=LinearConfig(batch_size=4096, epochs=90),
            # the BEiT/MAE recipe on CIFAR-10: 100 epochs, mixup/cutmix, RandAugment, layer decay;
            # its blr and decay swept like cpu's (held_out_grid)
            finetune=held_out_grid(FinetuneConfig(epochs=100, batch_size=512, blr=5e-4, layer_decay=0.65,
                                                  checkpoint_every=1000)),
            segmentation=SegmentationConfig(dataset="camvid", scale=(480, 360), crop_size=256,
                                            iterations=4000, batch_size=16, lr=2e-4, warmup_iters=300,
                                            channels=256, aux_channels=128, checkpoint_every=500)),
        flops_per_second=150e12,
    ),
    "imagenet": Profile(
        name="imagenet", data="user",
        encoder=dict(size="base", img_size=224, patch_size=16, drop_path=0.1),
        # MAE: blr 1.5e-4, batch 4096, 40 warm-up of 800 epochs; BEiT: 800 epochs.
        train=TrainConfig(epochs=800, batch_size=4096, blr=1.5e-4, warmup_frac=0.05, clip_grad=3.0,
                          checkpoint_every=1000, compile=True),
        seeds=1, feature_batch=512,
        method_defaults={"mae": dict(decoder_dim=512, decoder_depth=8, decoder_heads=16,
                                     encoder=dict(drop_path=0.0)),
                         "beit": dict(tokenizer={"vocab_size": 8192, "hidden_dim": 64}, tokenizer_epochs=30.0,
                                      tokenizer_blr=1e-4)},
        # the papers' protocols: MAE's linear probe (90 epochs, batch 16384), BEiT/MAE
        # fine-tuning (swept around its blr and decay like every profile's: ~7 fine-tunes at seed 0;
        # --set evaluations.finetune.blr_sweep=[] --set evaluations.finetune.layer_decay_sweep=[]
        # for the papers' one) and UperNet on ADE20K (the EvalConfigs defaults) with sliding-window
        # inference
        evaluations=EvalConfigs(linear=LinearConfig(epochs=90, batch_size=16384),
                               finetune=held_out_grid(FinetuneConfig()),
                               segmentation=SegmentationConfig(test_mode="slide")),
        flops_per_second=8 * 300e12,
    ),
}


TUNED_DIR = Path(__file__).resolve().parents[1] / "results" / "tuned"


def tuned_file(profile_name: str) -> Path:
    """Where suites.tune keeps a profile's chosen lrs (committed with the results)."""
    return TUNED_DIR / f"{profile_name}.json"


def get_profile(name: str) -> Profile:
    """The named profile, with the lrs tuned for it (`tuning`) when suites.tune chose any."""
    if name not in PROFILES:
        raise unknown("profile", name, PROFILES)
    path = tuned_file(name)
    if not path.exists():
        return PROFILES[name]
    try:
        tuning = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is unreadable ({err}); restore it with git checkout {path}") from None
    return dataclasses.replace(PROFILES[name], tuning=tuning)


def override(profile: Profile, settings: list[str]) -> Profile:
    """`profile` with `--set KEY=VALUE` settings applied, KEY a dotted path into its fields
    (`encoder.img_size=64`, `train.batch_size=32`, `method_defaults.mae.decoder_dim=64`,
    `feature_batch=64`); VALUE as JSON (`64`, `false`, `"micro"`), else as a string. A changed
    config is another run (its folder name is the hash of the resolved config). The settings are
    also kept in `user_settings`, so they hold over a method's paper recipe too."""
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {setting!r}: write KEY=VALUE, e.g. --set encoder.img_size=64")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        profile = _set_path(profile, key.split("."), value, key)
        profile = dataclasses.replace(profile, user_settings=_set_path(profile.user_settings, key.split("."),
                                                                       value, key))
    return profile


def _set_path(obj, parts: list[str], value, key: str):
    if not parts:
        return value
    head, rest = parts[0], parts[1:]
    if isinstance(obj, dict):
        if rest and not isinstance(obj.get(head, {}), dict):
            raise ConfigError(f"--set {key}: {head} holds a value, not fields")
        return {**obj, head: _set_path(obj.get(head, {}), rest, value, key)}
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in fields(obj) if f.name not in ("name", "user_settings")]
        if head not in names:
            raise ConfigError(f"--set {key}: {type(obj).__name__} has no field {head!r}; known: "
                              f"{', '.join(names)}")
        return dataclasses.replace(obj, **{head: _set_path(getattr(obj, head), rest, value, key)})
    raise ConfigError(f"--set {key}: {parts[0]!r} is inside a value ({obj!r}), not a config")
