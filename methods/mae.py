"""MAE (He et al., 2022): the encoder sees visible patches only; a light decoder fills in
[M] tokens and regresses the (per-patch normalised) pixels of the masked patches."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from core.config import ConfigError
from methods.base import Batch, MIMMethod, masked_mean, patch_targets, prediction_to_images
from methods.masking import MaskConfig, visible_indices
from methods.recipes import Recipe
from methods.registry import register_method
from methods.vit import ViTConfig, gather_tokens, init_weights, sincos_pos_embed


@dataclass(frozen=True)
class MAEConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)
    mask: MaskConfig = field(default_factory=lambda: MaskConfig("random", 0.75))  # MAE's default
    decoder_dim: int = 128          # MAE uses 512 at ViT-B; 128 for the nano/CPU model (DESIGN calibration)
    decoder_depth: int = 2          # MAE Table 1a: depth 8 best for linear, 1-2 enough for fine-tuning
    decoder_heads: int = 4
    norm_pix_loss: bool = True      # MAE Table 1d: normalised pixels beat raw

    def validate(self) -> None:
        self.encoder.validate()
        self.mask.validate()
        self.mask.check_grid(self.encoder.grid)
        if self.decoder_depth < 1 or self.decoder_dim < 1 or self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"decoder_depth must be >= 1 and decoder_dim ({self.decoder_dim}) "
                              f"divisible by decoder_heads ({self.decoder_heads})")


@register_method("mae", MAEConfig)
class MAE(MIMMethod):
    equal_mask_counts = True        # blockwise masks are topped up to exactly ratio * N patches
    # MAE paper Table 8 (pre-training setting) and facebookresearch/mae main_pretrain.py
    paper_recipe = Recipe(
        train=dict(blr=1.5e-4,              # base lr per 256 (lr = blr * batch / 256)
                   beta2=0.95,              # AdamW betas (0.9, 0.95)
                   weight_decay=0.05,
                   warmup_frac=40 / 800,    # 40 warm-up epochs of 800, cosine to 0
                   min_lr_frac=0.0,
                   clip_grad=0.0,           # no clipping
                   crop_scale_min=0.2),     # RandomResizedCrop(scale=(0.2, 1)) + flip, no colour
        source="He et al. 2022, Table 8; facebookresearch/mae main_pretrain.py")

    def __init__(self, cfg: MAEConfig):
        super().__init__(cfg)
        self.encoder.mask_token.requires_grad_(False)   # MAE's encoder never sees [M]
        enc = cfg.encoder
        self.decoder_embed = nn.Linear(enc.embed_dim, cfg.decoder_dim)
        self.decoder_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        pos = torch.cat([torch.zeros(1, cfg.decoder_dim), sincos_pos_embed(cfg.decoder_dim, enc.grid)])
        self.decoder_pos_embed = nn.Parameter(pos[None], requires_grad=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(cfg.decoder_dim, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True)
            for _ in range(cfg.decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, enc.patch_size ** 2 * enc.in_chans)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            init_weights(module)
        nn.init.normal_(self.decoder_mask_token, std=0.02)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        pred = self.predict_patches(batch)                          # (B, N, p*p*3)
        loss = self.forward_loss(batch.images, pred, batch.mask)
        return loss, {"loss": loss.detach()}

    def predict_patches(self, batch: Batch) -> Tensor:
        idx_keep = visible_indices(batch.mask, batch.visible)       # (B, N_vis)
        latent = self.encoder(batch.images, idx_keep=idx_keep)      # (B, 1+N_vis, D)
        return self.forward_decoder(latent, idx_keep)               # (B, N, p*p*3)

    def reconstruct(self, batch: Batch) -> Tensor:
        return prediction_to_images(self.predict_patches(batch), batch.images,
                                    self.cfg.encoder.patch_size, self.cfg.norm_pix_loss)

    def forward_decoder(self, latent: Tensor, idx_keep: Tensor) -> Tensor:
        x = self.decoder_embed(latent)                              # (B, 1+N_vis, Dd)
        b, num_patches = x.shape[0], self.cfg.encoder.num_patches
        patches = self.decoder_mask_token.to(x.dtype).expand(b, num_patches, -1).clone()
        patches.scatter_(1, idx_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, 1:])
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed   # (B, 1+N, Dd)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, 1:])

    def forward_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        target = patch_targets(images, self.cfg.encoder.patch_size, self.cfg.norm_pix_loss)
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)     # (B, N)
        return masked_mean(per_patch, mask)
