"""The mimbench ViT as an mmsegmentation backbone: the one small adapter to mmseg.

Importing this module registers `MimbenchViT` in mmseg's `MODELS`, so an mmseg config
can name it:

    dict(type="EncoderDecoder",
         backbone=dict(type="MimbenchViT", encoder="outputs/runs/mae-.../encoder.safetensors"),
         decode_head=dict(type="UPerHead", in_channels=[128] * 4, ...), ...)

It returns four feature maps taken from blocks at 1/3, 1/2, 3/4 and the end of the
depth (0-based 3, 5, 8, 11 for ViT-B; BEiT and MAE take 3, 5, 7, 11), brought to
strides 4, 8, 16, 32 as BEiT and MAE do: transposed convolutions where the patch grid
is coarser than the stride (two, with BN + GELU between, for 4x), identity where they
match, max pooling where it is finer. For 16-pixel patches that is exactly BEiT's
fpn1..fpn4; the CPU models' 4-pixel patches already give stride 4, so they pool instead.

mmseg imports `mmcv.ops` when it is imported: the guard below (`eval.mmcv_ops`) runs first, so
mmseg imports on mmcv-lite too. Build configs with `build_model`, which names the fix in one
line when a config needs a compiled op that this mmcv lacks.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

from torch import Tensor, nn
from torch.nn import functional as F

from core.config import ConfigError
from eval.mmcv_ops import check_compiled_ops, guard_mmcv_ops
from methods.vit import ViT, ViTConfig, load_encoder

guard_mmcv_ops()     # before mmcv and mmseg: mmseg imports mmcv.ops, which loads mmcv's compiled extension

from mmcv.cnn import build_norm_layer  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.model import BaseModule  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402


def use_mmseg_scope() -> None:
    """Let mmengine's registries resolve names (transforms, the data preprocessor) in mmseg's
    scope first, as mmseg's own tools do; keep mmengine's INFO logs (a line per initialised
    parameter, IoUMetric's per-class table) off the console."""
    init_default_scope("mmseg")
    if not MMLogger.check_instance_created("mimbench"):
        MMLogger.get_instance("mimbench", log_level="WARNING")


def build_model(config: dict) -> BaseModule:
    """An mmseg model (e.g. an EncoderDecoder on `MimbenchViT`) built from its config through
    mmseg's MODELS registry, its weights initialised."""
    check_compiled_ops(config)
    use_mmseg_scope()
    with warnings.catch_warnings():   # mmseg's heads call their own deprecated build_loss
        warnings.filterwarnings("ignore", message="``build_loss`` would be deprecated")
        model = MODELS.build(config)
    model.init_weights()
    return model


def default_out_indices(depth: int) -> list[int]:
    """0-based indices of the blocks at 1/3, 1/2, 3/4 and the end of `depth`."""
    return [math.ceil(depth * fraction) - 1 for fraction in (1 / 3, 1 / 2, 3 / 4, 1)]


def stride_adapter(dim: int, patch_size: int, stride: int, norm_cfg: dict) -> nn.Module:
    """Maps the (B, D, H/patch, W/patch) token grid to stride `stride`."""
    if stride == patch_size:
        return nn.Identity()
    if stride > patch_size:
        if stride % patch_size:
            raise ConfigError(f"output stride {stride} is not a multiple of patch size {patch_size}")
        return nn.MaxPool2d(kernel_size=stride // patch_size)
    doublings = math.log2(patch_size / stride)
    if doublings != int(doublings):
        raise ConfigError(f"patch size {patch_size} / output stride {stride} must be a power of 2")
    layers: list[nn.Module] = []
    for i in range(int(doublings)):
        if i:
            layers += [build_norm_layer(norm_cfg, dim)[1], nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


@MODELS.register_module()
class MimbenchViT(BaseModule):
    """encoder: an `encoder.safetensors` path, a `ViT`, or ViTConfig fields (random init)."""

    def __init__(self, encoder: str | Path | ViT | dict, out_indices: list[int] | None = None,
                 out_strides: tuple[int, ...] = (4, 8, 16, 32), drop_path: float | None = None,
                 norm_cfg: dict | None = None):
        super().__init__()
        if isinstance(encoder, (str, Path)):
            encoder = load_encoder(encoder)
        elif isinstance(encoder, dict):
            encoder = ViT(ViTConfig(**encoder))
        if drop_path is not None and drop_path != encoder.cfg.drop_path:
            encoder = encoder.with_config(drop_path=drop_path)
        self.encoder = encoder
        cfg = encoder.cfg
        self.out_indices = list(out_indices) if out_indices is not None else default_out_indices(cfg.depth)
        if len(self.out_indices) != len(out_strides):
            raise ConfigError(f"{len(self.out_indices)} out_indices for {len(out_strides)} out_strides; "
                              f"give one block per output stride")
        norm_cfg = norm_cfg or dict(type="BN", requires_grad=True)   # SyncBN under DDP
        self.adapters = nn.ModuleList(stride_adapter(cfg.embed_dim, cfg.patch_size, s, norm_cfg)
                                      for s in out_strides)

    def init_weights(self) -> None:
        """Keep the encoder's weights (they are what is evaluated); the adapters keep
        PyTorch's default initialisation."""

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        patch = self.encoder.cfg.patch_size
        # pad bottom / right to whole patches (mmseg's own ViT pads the same "corner" way)
        images = F.pad(images, (0, -images.shape[-1] % patch, 0, -images.shape[-2] % patch))
        b, _, h, w = images.shape
        grid_h, grid_w = h // patch, w // patch
        maps = []
        for adapter, tokens in zip(self.adapters, self.encoder.block_outputs(images, self.out_indices)):
            grid = tokens[:, 1:].transpose(1, 2).reshape(b, -1, grid_h, grid_w)   # (B, D, H/p, W/p)
            maps.append(adapter(grid))
        return tuple(maps)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer-decay groups (timm format); the adapters are unmatched: top layer, no decay."""
        return self.encoder.group_matcher(coarse, prefix="encoder.")

    def no_weight_decay(self) -> set[str]:
        return self.encoder.no_weight_decay(prefix="encoder.")
