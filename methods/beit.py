"""BEiT (Bao et al., 2022): masked image modeling with discrete visual tokens.

Stage 1 trains a dVAE tokenizer (`methods.dvae`); stage 2 (this file) freezes it and
trains the ViT: the encoder sees all patches with the masked ones replaced by [M], and a
linear head over the vocabulary predicts the tokenizer's code of every masked patch
(cross-entropy on masked positions only). Blockwise masking at ~40% by default.

The tokenizer is a run of its own: `prerequisites` names it, the run layer trains it
once (content-addressed like every run), loads it and hands it to `use_prerequisites`.
Without that call, the method holds a randomly initialised dVAE - a valid, deterministic
tokenizer - so it can be built and tested alone. BEiT's relative position bias is not
implemented (absolute sin-cos positions, shared with every method); layer-scale is the
backbone's `encoder.layer_scale` (BEiT: 0.1), off by default like in every method.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from core.config import ConfigError, late_field
from methods.base import Batch, MIMMethod, Prerequisite, at_masked, check_augment
from methods.dvae import DVAE, TOKENIZER_FILE, DVAEConfig, TokenizerConfig, load_tokenizer
from methods.masking import SCALED, MaskConfig
from methods.recipes import Recipe
from methods.registry import register_method
from methods.vit import ViTConfig, init_weights


@dataclass(frozen=True)
class BEiTConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)
    mask: MaskConfig = field(default_factory=lambda: MaskConfig("block", 0.4))  # BEiT: blockwise, 40%
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)   # the stage-1 dVAE to train
    tokenizer_epochs: float = 5.0   # stage-1 passes over the training split; suites set it per profile
    tokenizer_blr: float = 1e-3     # stage-1 lr per 256 images; the rest of its schedule is the profile's
    tokenizer_seed: int = 0         # fixed, so every seed of stage 2 shares one tokenizer
    tokenizer_path: str = ""        # your own tokenizer.safetensors (methods.dvae format), not trained here
    # `target` ("tokens" or "pixels") was removed: BEiT's "recover masked pixels" is the `pixel`
    # method. Every run had "tokens", which stays in their identities (see late_field).
    RETIRED_FIELDS: ClassVar[dict] = {"target": "tokens"}
    augment: str = late_field("none")   # photometric augmentation (methods.base.AUGMENTATIONS); BEiT's: "beit"

    def validate(self) -> None:
        self.encoder.validate()
        self.mask.validate()
        self.tokenizer.validate()
        self.mask.check_grid(self.encoder.grid)
        check_augment(self.augment, ("none", "beit"))
        if self.tokenizer_epochs <= 0 or self.tokenizer_blr <= 0:
            raise ConfigError(f"tokenizer_epochs ({self.tokenizer_epochs}) and tokenizer_blr "
                              f"({self.tokenizer_blr}) must be > 0")
        if self.tokenizer_path and not Path(self.tokenizer_path).expanduser().is_file():
            raise ConfigError(f"tokenizer_path {self.tokenizer_path} not found; pass the {TOKENIZER_FILE} "
                              f"of a dvae run (outputs/runs/dvae-<hash>/{TOKENIZER_FILE}) or your own")

    def tokenizer_geometry(self) -> ViTConfig:
        """The tokenizer only needs the image geometry; leaving the ViT's size out of its config
        lets BEiT runs on different ViT sizes share one tokenizer."""
        enc = self.encoder
        return ViTConfig(img_size=enc.img_size, patch_size=enc.patch_size, in_chans=enc.in_chans)


# BEiT's masking, 40% blockwise, its smallest block (16 of 196 patches) scaled to the grid
# (4 of 64 at 8x8; methods.masking.SCALED)
SCALED_MASK = dict(strategy="block", ratio=0.4, min_block_patches=SCALED)

# The collapse monitor: a tokenizer using fewer than this share of its codes on the test split
# gives stage 2 too few targets to learn from; that flags every BEiT run built on it. (The cpu
# profile's tokenizer in results/runs uses 17%.)
MIN_CODEBOOK_USAGE = 0.05


@register_method("beit", BEiTConfig)
class BEiT(MIMMethod):
    # BEiT paper Table 11 (pre-training hyper-parameters), microsoft/unilm beit/datasets.py
    # (DataAugmentationForBEiT). The table's betas (0.9, 0.999) are taken; the released
    # run_beit_pretraining.py defaults to (0.9, 0.98). Not taken: the relative position bias
    # (not implemented). Warm-up stays the profile's (10 of 800 epochs is a schedule length).
    paper_recipe = Recipe(
        train=dict(blr=1.5e-3 * 256 / 2048,     # lr 1.5e-3 at batch 2048
                   beta2=0.999,                 # AdamW betas (0.9, 0.999)
                   weight_decay=0.05,
                   min_lr_frac=1e-5 / 1.5e-3,   # min lr 1e-5
                   clip_grad=3.0,               # global norm
                   crop_scale_min=0.08),        # RandomResizedCrop(scale=(0.08, 1)) + flip
        method=dict(encoder=dict(layer_scale=0.1,   # layer-scale init 0.1
                                 drop_path=0.1),    # stochastic depth 0.1
                    augment="beit",                 # ColorJitter(0.4, 0.4, 0.4)
                    mask=SCALED_MASK),
        source="Bao et al. 2022, Table 11; microsoft/unilm beit/run_beit_pretraining.py")
    tuned_recipe = Recipe(method=dict(mask=SCALED_MASK), source="the shared recipe, BEiT's smallest block scaled")
    # the tokenizer run's share of codes used on the test split (its "tokenizer" evaluation)
    collapse_prerequisite_metrics = {"tokenizer": ("tokenizer_codebook_usage",)}

    def __init__(self, cfg: BEiTConfig):
        super().__init__(cfg)
        if cfg.tokenizer_path:
            self.set_tokenizer(load_tokenizer(cfg.tokenizer_path))
        else:
            self.set_tokenizer(DVAE(DVAEConfig(cfg.tokenizer_geometry(), cfg.tokenizer)))
        self.head = nn.Linear(cfg.encoder.embed_dim, self.tokenizer.vocab_size)
        init_weights(self.head)

    @classmethod
    def prerequisites(cls, cfg: BEiTConfig) -> dict[str, Prerequisite]:
        """The stage-1 tokenizer: a `dvae` run with BEiT's image geometry and the stage-1
        budget; none when the user brings a tokenizer."""
        if cfg.tokenizer_path:
            return {}
        return {"tokenizer": Prerequisite(
            method=DVAE.name,
            overrides={"encoder": dataclasses.asdict(cfg.tokenizer_geometry()),
                       "tokenizer": dataclasses.asdict(cfg.tokenizer)},
            train={"epochs": cfg.tokenizer_epochs, "blr": cfg.tokenizer_blr},
            seed=cfg.tokenizer_seed,
            evals=("tokenizer",))}

    @classmethod
    def collapse(cls, cfg: BEiTConfig, final: dict, prerequisites: dict[str, dict[str, float]]) -> str | None:
        """Collapsed when its tokenizer uses fewer than MIN_CODEBOOK_USAGE of its codes on the
        test split: the targets, not this run's training, are what failed."""
        usage = prerequisites["tokenizer"]["tokenizer_codebook_usage"]
        if usage >= MIN_CODEBOOK_USAGE:
            return None
        return (f"its tokenizer uses {usage:.1%} of its {cfg.tokenizer.vocab_size} codes on the test split "
                f"(< {MIN_CODEBOOK_USAGE:.0%}): too few targets")

    def use_prerequisites(self, products: dict[str, nn.Module]) -> None:
        """Take the trained tokenizer (called by the run layer before training)."""
        self.set_tokenizer(products["tokenizer"])

    def set_tokenizer(self, tokenizer: DVAE) -> None:
        enc = self.cfg.encoder
        geometry = (tokenizer.cfg.encoder.patch_size, tokenizer.cfg.encoder.in_chans)
        if geometry != (enc.patch_size, enc.in_chans):
            raise ConfigError(f"tokenizer makes one token per {geometry[0]}px patch of {geometry[1]}-channel "
                              f"images, but the ViT uses {enc.patch_size}px patches of {enc.in_chans} "
                              f"channels; use a tokenizer trained for this patch size")
        if hasattr(self, "head") and self.head.out_features != tokenizer.vocab_size:
            raise ConfigError(f"tokenizer has {tokenizer.vocab_size} codes but this BEiT was built for "
                              f"{self.head.out_features}; set tokenizer.vocab_size to match")
        self.tokenizer = tokenizer.requires_grad_(False).eval()   # frozen: never in the optimizer

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        targets = self.tokenizer.tokenize(batch.images)                 # (B, N) visual tokens
        tokens = self.encoder(batch.images, mask=batch.mask)            # (B, 1+N, D)
        logits = self.head(at_masked(tokens, batch.mask, batch.masked, skip=1))   # (M, V): masked only
        return self.forward_loss(logits, targets, batch.mask, batch.masked)

    def reconstruct(self, batch: Batch) -> Tensor:
        """Images (B, C, H, W) for the run's figures: the tokenizer decodes the predicted tokens of
        the masked patches together with the true tokens of the visible ones."""
        tokens = self.tokenizer.tokenize(batch.images)                  # (B, N)
        logits = self.head(self.encoder(batch.images, mask=batch.mask)[:, 1:])   # (B, N, V)
        return self.tokenizer.decode(torch.where(batch.mask, logits.argmax(dim=-1), tokens))

    def forward_loss(self, logits: Tensor, targets: Tensor, mask: Tensor,
                     masked: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy of the masked positions' logits (M, V) against their tokens."""
        masked_targets = at_masked(targets, mask, masked)               # (M,)
        loss = F.cross_entropy(logits.float(), masked_targets)
        accuracy = (logits.argmax(dim=-1) == masked_targets).float().mean()
        return loss, {"loss": loss.detach(), "token_accuracy": accuracy.detach()}
