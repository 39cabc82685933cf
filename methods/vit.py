"""The one Vision Transformer every method shares, built from timm parts.

Three ways in (explicit arguments of `forward`):
    vit(images)                      all patches
    vit(images, mask=mask)           all patches, masked ones swapped for the learned [M] token
    vit(images, idx_keep=idx_keep)   visible patches only (MAE's encoder)
Named ways out: `features(images, "cls" | "mean")`, `block_outputs(images, indices)`,
`last_attention(images)`. `save_encoder` writes `encoder.safetensors` with timm's
`VisionTransformer` key names, so `timm.create_model(...)` / `load_state_dict` accept it.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace

import torch
from safetensors.torch import load_file, save_file
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from core.config import ConfigError

# name -> (embed_dim, depth, num_heads). nano is the CPU model of ../shared/DESIGN.md
# (calibration: 128-d x 6); the rest are the standard ViT sizes (DeiT / ViT papers).
SIZES = {
    "micro": (32, 2, 2),        # tests and the smoke profile only
    "nano": (128, 6, 4),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


@dataclass(frozen=True)
class ViTConfig:
    size: str = "nano"          # one of SIZES
    img_size: int = 32          # CIFAR-10; 224 for ImageNet
    patch_size: int = 4         # 16 at 224 px (ViT-B/16); 4 keeps an 8x8 grid at 32 px
    in_chans: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.0      # stochastic depth; pre-training papers use 0 (MAE) or 0.1 (BEiT/iBOT)
    layer_scale: float = 0.0    # BEiT's layer-scale init (0.1); 0 = off, so all methods share one backbone

    def validate(self) -> None:
        if self.size not in SIZES:
            raise ConfigError(f"unknown ViT size {self.size!r}; known: {', '.join(SIZES)}")
        if self.patch_size <= 0 or self.img_size % self.patch_size:
            raise ConfigError(f"patch_size {self.patch_size} must divide img_size {self.img_size}; "
                              f"pick a divisor such as {_divisor_hint(self.img_size)}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"drop_path {self.drop_path} must be in [0, 1)")

    @property
    def embed_dim(self) -> int:
        return SIZES[self.size][0]

    @property
    def depth(self) -> int:
        return SIZES[self.size][1]

    @property
    def num_heads(self) -> int:
        return SIZES[self.size][2]

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def timm_kwargs(self) -> dict:
        """Keyword arguments for timm's VisionTransformer with the same architecture."""
        kwargs = dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                      embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                      mlp_ratio=self.mlp_ratio, qkv_bias=True, class_token=True,
                      global_pool="token", num_classes=0)
        if self.layer_scale:
            kwargs["init_values"] = self.layer_scale
        return kwargs


def _divisor_hint(n: int) -> int:
    return next(p for p in (16, 14, 8, 4, 2, 1) if n % p == 0)


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE), (grid*grid, dim)."""
    if dim % 4:
        raise ConfigError(f"embed_dim {dim} must be divisible by 4 for 2-D sin-cos position embeddings")
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    parts = []
    for pos in (yy.flatten(), xx.flatten()):
        angles = pos[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in raster order, pixels (p, p, C) within a patch."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: Tensor, patch_size: int, channels: int = 3) -> Tensor:
    """Inverse of `patchify` for square images."""
    b, n, _ = patches.shape
    g = math.isqrt(n)
    x = patches.reshape(b, g, g, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, g * patch_size, g * patch_size)


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens (B, N, D), index (B, K) -> (B, K, D) without Python loops."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(img_size=cfg.img_size, patch_size=cfg.patch_size,
                                      in_chans=cfg.in_chans, embed_dim=dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed sin-cos (MAE), the same kind for every method so comparisons are fair;
        # the [CLS] slot is zero as in MAE.
        pos = torch.cat([torch.zeros(1, dim), sincos_pos_embed(dim, cfg.grid)])[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        drop_path = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.Sequential(*[
            Block(dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, drop_path=dp,
                  init_values=cfg.layer_scale or None)
            for dp in drop_path
        ])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def _pos_embed(self, grid_hw: tuple[int, int]) -> Tensor:
        if grid_hw == (self.cfg.grid, self.cfg.grid):
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid_hw), num_prefix_tokens=1)

    def embed(self, images: Tensor, mask: Tensor | None = None,
              idx_keep: Tensor | None = None) -> Tensor:
        """Patch tokens with [CLS] prepended and position embeddings added: (B, 1+N_kept, D)."""
        x = self.patch_embed(images)                                   # (B, N, D)
        grid_hw = (images.shape[-2] // self.cfg.patch_size, images.shape[-1] // self.cfg.patch_size)
        pos = self._pos_embed(grid_hw)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = x + pos[:, 1:]
        if idx_keep is not None:
            x = gather_tokens(x, idx_keep)                             # (B, N_kept, D)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward(self, images: Tensor, mask: Tensor | None = None,
                idx_keep: Tensor | None = None) -> Tensor:
        """All tokens after the final norm: (B, 1+N_kept, D); token 0 is [CLS]."""
        return self.norm(self.blocks(self.embed(images, mask, idx_keep)))

    def features(self, images: Tensor, pooling: str = "cls") -> Tensor:
        """(B, D) image features: the [CLS] token or the mean of the patch tokens."""
        tokens = self(images)
        return pool(tokens, pooling)

    def block_outputs(self, images: Tensor, indices: list[int]) -> list[Tensor]:
        """Outputs (B, 1+N, D) of the blocks at `indices` (0-based), before the final norm."""
        bad = [i for i in indices if not -self.cfg.depth <= i < self.cfg.depth]
        if bad:
            raise ConfigError(f"block indices {bad} out of range for depth {self.cfg.depth}")
        wanted = {i % self.cfg.depth for i in indices}
        x, outputs = self.embed(images), {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in wanted:
                outputs[i] = x
        return [outputs[i % self.cfg.depth] for i in indices]

    def last_attention(self, images: Tensor) -> Tensor:
        """Softmax attention of the last block: (B, heads, 1+N, 1+N)."""
        x = self.embed(images)
        for block in self.blocks[:-1]:
            x = block(x)
        attn = self.blocks[-1].attn
        b, t, d = x.shape
        qkv = attn.qkv(self.blocks[-1].norm1(x)).reshape(b, t, 3, attn.num_heads, d // attn.num_heads)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        return (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)

    def with_config(self, **changes) -> "ViT":
        """A copy with some config fields changed (fine-tuning's drop path) and the same weights."""
        copy = ViT(replace(self.cfg, **changes))
        copy.load_state_dict(self.state_dict())
        return copy

    def group_matcher(self, coarse: bool = False, prefix: str = "") -> dict:
        """Layer groups for layer-wise lr decay in timm's format (its optimizer factory reads
        this), numbered as BEiT and MAE do: the stem (patch embedding, tokens) is layer 0,
        block i is layer i+1, and everything unmatched (the final norm, a head) is the top
        layer, so with decay d block i gets d**(depth - i) and the stem d**(depth + 1).
        `prefix` is where a wrapping module keeps this ViT ("encoder.")."""
        p = re.escape(prefix)
        return {"stem": rf"^{p}(?:cls_token|mask_token|pos_embed|patch_embed)",
                "blocks": rf"^{p}blocks\.(\d+)"}

    def no_weight_decay(self, prefix: str = "") -> set[str]:
        """Parameters AdamW must not decay besides norms and biases: the tokens. Fine-tuning and
        segmentation use it; pre-training (engine.trainer) decays the tokens, as MAE's code does."""
        return {f"{prefix}{name}" for name in ("cls_token", "mask_token", "pos_embed")}

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """Weights under timm VisionTransformer names (the [M] token is pre-training only)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if k != "mask_token"}


def pool(tokens: Tensor, pooling: str) -> Tensor:
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise ConfigError(f"unknown pooling {pooling!r}; known: cls, mean")


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears (and patch projection), unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):  # the patch projection is a linear map on each patch
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def save_encoder(vit: ViT, path) -> None:
    """Write `encoder.safetensors`: timm key names, the ViTConfig in the metadata."""
    save_file(vit.encoder_state_dict(), str(path), metadata={"vit_config": json.dumps(asdict(vit.cfg))})


def load_encoder(path) -> ViT:
    """Rebuild a ViT from an `encoder.safetensors` written by `save_encoder`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "vit_config" not in meta:
        raise ConfigError(f"{path} has no mimbench ViT config in its metadata; export it with save_encoder")
    vit = ViT(ViTConfig(**json.loads(meta["vit_config"])))
    missing, unexpected = vit.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or set(missing) - {"mask_token"}:
        raise ConfigError(f"{path} does not match its config (missing {missing}, unexpected {unexpected})")
    return vit
