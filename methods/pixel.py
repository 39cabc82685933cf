"""Masked pixel regression: SimMIM (Xie et al., 2022) and BEiT's "recover masked pixels"
ablation. The encoder sees all patches with [M] on the masked ones; a linear head
regresses the pixels of each masked patch."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.nn import functional as F

from core.config import ConfigError
from methods.base import Batch, MIMMethod, masked_mean, patch_targets, prediction_to_images
from methods.masking import SCALED, MaskConfig
from methods.recipes import Recipe
from methods.registry import register_method
from methods.vit import ViTConfig, init_weights

LOSSES = ("l1", "l2")


@dataclass(frozen=True)
class PixelConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)
    mask: MaskConfig = field(default_factory=lambda: MaskConfig("random", 0.6))  # SimMIM's 0.6 random
    loss: str = "l1"                # SimMIM: L1 on raw pixels
    norm_pix_loss: bool = False     # True regresses per-patch normalised pixels (MAE-style target)

    def validate(self) -> None:
        self.encoder.validate()
        self.mask.validate()
        self.mask.check_grid(self.encoder.grid)
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown pixel loss {self.loss!r}; known: {', '.join(LOSSES)}")


# SimMIM's mask: 0.6 random in units of a seventh of the image side (methods.masking.SCALED)
SCALED_MASK = dict(strategy="random", ratio=0.6, unit=SCALED)


@register_method("pixel", PixelConfig)
class PixelRegression(MIMMethod):
    # SimMIM ViT-B (microsoft/SimMIM configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml,
    # data/data_simmim.py). Not taken: its multi-step schedule (x0.1 at epoch 700 of 800; the
    # project's cosine instead, down to its MIN_LR 5e-6 = 0.05x) and the
    # shared relative position bias (not implemented). Warm-up stays the profile's (as epochs).
    paper_recipe = Recipe(
        train=dict(blr=1e-4 / 2,            # BASE_LR 1e-4 per 512 images
                   beta2=0.999,             # AdamW betas (0.9, 0.999)
                   weight_decay=0.05,
                   min_lr_frac=5e-6 / 1e-4,     # MIN_LR 5e-6
                   clip_grad=5.0,           # global norm (timm / torch clip_grad_norm_)
                   crop_scale_min=0.67),    # RandomResizedCrop(scale=(0.67, 1)) + flip
        method=dict(encoder=dict(layer_scale=0.1,    # LAYER_SCALE_INIT_VALUE 0.1
                                 drop_path=0.1),     # DROP_PATH_RATE 0.1
                    # MASK_RATIO 0.6 at MASK_PATCH_SIZE 32: 2x2 patches of 16 px at 224 px, a
                    # seventh of the side, scaled to the grid (one patch at 8x8; the whole mask
                    # config: a partial one would start from MaskConfig's defaults)
                    mask=SCALED_MASK),
        source="Xie et al. 2022; microsoft/SimMIM simmim_pretrain__vit_base__img224__800ep.yaml")
    tuned_recipe = Recipe(method=dict(mask=SCALED_MASK), source="the shared recipe, SimMIM's mask unit scaled")

    def __init__(self, cfg: PixelConfig):
        super().__init__(cfg)
        enc = cfg.encoder
        self.head = nn.Linear(enc.embed_dim, enc.patch_size ** 2 * enc.in_chans)
        init_weights(self.head)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        pred = self.predict_patches(batch)                           # (B, N, p*p*3)
        target = patch_targets(batch.images, self.cfg.encoder.patch_size, self.cfg.norm_pix_loss)
        error = F.l1_loss if self.cfg.loss == "l1" else F.mse_loss
        per_patch = error(pred, target, reduction="none").mean(dim=-1)   # (B, N)
        loss = masked_mean(per_patch, batch.mask)
        return loss, {"loss": loss.detach()}

    def predict_patches(self, batch: Batch) -> Tensor:
        tokens = self.encoder(batch.images, mask=batch.mask)         # (B, 1+N, D)
        return self.head(tokens[:, 1:]).float()                      # (B, N, p*p*3)

    def reconstruct(self, batch: Batch) -> Tensor:
        return prediction_to_images(self.predict_patches(batch), batch.images,
                                    self.cfg.encoder.patch_size, self.cfg.norm_pix_loss)
