"""lightly's versions of our MAE and iBOT steps, the anchors of `mae_vs_lightly` and
`ibot_vs_lightly`, built from lightly's own pieces at our configs.

MAE: `MaskedVisionTransformerTIMM` encodes the visible tokens; the deprecated `MAEDecoderTIMM`
is replaced by `MaskedVisionTransformerDecoderTIMM`, which builds the same blocks (decoder
dim, depth, heads, mlp_ratio 4, qkv bias, no dropout, no drop path, LayerNorm eps 1e-6) and
leaves the input embedding and the pixel prediction to two plain linear layers, as lightly's
migration pattern does. lightly's random token mask (drawn in the step), MSE on the masked
patches. Our MAE predicts pixels for all patches and takes the loss on the masked ones;
lightly predicts only the masked ones: the "skipped work" of `MAE_SKIPPED_WORK`.

iBOT: lightly 1.6 has no iBOT model, so the step is assembled as lightly's own DINOv2
benchmark assembles it: a `MaskedVisionTransformerTIMM` student (its [M] token replaces the
masked patches) and an EMA teacher copy, two global views (no local crops, as ours), lightly's
`random_block_mask` on each view, `DINOProjectionHead` shared by [CLS] and patches, `DINOLoss`
on [CLS] across views plus `IBOTPatchLoss` on the masked patches, both centring the teacher,
and `update_momentum` after the optimizer step. Sizes, temperatures, momenta and loss
weights come from our `IBOTConfig`. What lightly lacks or does differently:

- no iBOT projection head: `DINOProjectionHead` is DINO's (3 layers, GELU, L2-normalised
  bottleneck, weight-normalised last layer with the scale fixed to 1), the same as ours at
  `head_layers=3`, but through the deprecated hook-based `torch.nn.utils.weight_norm`;
- masking is DINOv2's `random_block_mask`: per-image ratios stratified over the range (one
  per linspace bin) instead of drawn i.i.d., the patch count truncated instead of rounded, no
  block as wide or tall as the grid, Python's global `random`. Same fraction of masked
  images, ratio range and smallest block; drawn once per view outside the step, as ours;
- `IBOTPatchLoss` is DINOv2's: the teacher head runs on the masked patch tokens only and the
  patch centre is their mean; ours (the iBOT code) projects all teacher patch tokens and
  centres over all of them, work lightly's step skips (`IBOT_SKIPPED_WORK`);
- lightly's losses move their centres inside forward, ours after the optimizer step;
- lightly returns the cross-entropies, ours subtracts the targets' entropy (same gradients);
- the teacher temperature stays at the warm-up value; ours is at its step-1 value
  (0.04 + 0.03/300 at 1000 steps), a difference in the loss value only.

These are `ibot_differences(cfg)`, written to results.json under
`ibot_vs_lightly["not_comparable"]`. Both lightly backbones freeze their position embedding,
which lightly initialises to the sin-cos table that ours keeps fixed.
"""
from __future__ import annotations

import copy
import random

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F

from bench.steps import SCHEDULE_STEPS, Competitor, encoder_overrides
from methods import method_config
from methods.ibot import IBOTConfig, min_block_patches
from methods.vit import ViTConfig

MAE_SKIPPED_WORK = {
    "ours_skips": [],
    "lightly_skips": ["the pixel prediction (decoder_pred) and its loss terms on the visible "
                      "patches: our MAE predicts all patches and masks the loss"],
}
IBOT_SKIPPED_WORK = {
    "ours_skips": [],
    "lightly_skips": ["the teacher projection head and softmax on the unmasked patch tokens "
                      "(IBOTPatchLoss centres over the masked ones only)"],
}


def lightly_available() -> bool:
    try:
        import lightly  # noqa: F401
    except ImportError:
        return False
    return True


def lightly_vit(enc: ViTConfig) -> nn.Module:
    """lightly's masked ViT around a timm ViT of our architecture."""
    from lightly.models.modules import MaskedVisionTransformerTIMM

    backbone = MaskedVisionTransformerTIMM(vit=VisionTransformer(**enc.timm_kwargs()))
    backbone.vit.pos_embed.requires_grad_(False)     # sin-cos, fixed as in our ViT
    return backbone


def lightly_mae(enc: ViTConfig, images: torch.Tensor, mask_ratio: float, decoder: tuple[int, int, int],
                device: torch.device) -> Competitor:
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerDecoderTIMM

    decoder_dim, decoder_depth, decoder_heads = decoder
    backbone = lightly_vit(enc)
    model = nn.ModuleDict({
        "backbone": backbone,
        "embed": nn.Linear(enc.embed_dim, decoder_dim),
        "decoder": MaskedVisionTransformerDecoderTIMM(
            num_patches=enc.num_patches, embed_dim=decoder_dim, depth=decoder_depth, num_heads=decoder_heads,
            mlp_ratio=4.0, qkv_bias=True, proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0),
        "predict": nn.Linear(decoder_dim, enc.patch_size ** 2 * enc.in_chans),
    }).to(device).train()
    batch, seq_len = images.shape[0], backbone.sequence_length

    def loss_fn():
        idx_keep, idx_mask = utils.random_token_mask(size=(batch, seq_len), mask_ratio=mask_ratio,
                                                     device=images.device)
        encoded = model["embed"](backbone.encode(images=images, idx_keep=idx_keep))  # (B, 1+N_vis, Dd)
        tokens = utils.repeat_token(model["decoder"].mask_token, (batch, seq_len))  # (B, 1+N, Dd)
        tokens = utils.set_at_index(tokens, idx_keep, encoded.type_as(tokens))
        decoded = model["decoder"](tokens)                                          # (B, 1+N, Dd)
        pred = model["predict"](utils.get_at_index(decoded, idx_mask))              # (B, N_mask, p*p*3)
        target = utils.patchify(images, enc.patch_size)                             # (B, N, p*p*3)
        return F.mse_loss(pred, utils.get_at_index(target, idx_mask - 1))

    _, idx_mask = utils.random_token_mask(size=(1, seq_len), mask_ratio=mask_ratio)
    return Competitor("lightly MAE", model, loss_fn, masked_fraction=idx_mask.shape[1] / enc.num_patches)


def ibot_config(enc: ViTConfig) -> IBOTConfig:
    """Our `ibot` method's config at the bench's encoder: what both iBOT steps are built from."""
    return method_config("ibot", encoder=encoder_overrides(enc))


def ibot_differences(cfg: IBOTConfig) -> list[str]:
    """What lightly's iBOT step does differently from ours at `cfg` (see the module docstring)."""
    differences = [
        "projection head: lightly has no iBOT head; DINOProjectionHead (DINO's, 3 layers) with the "
        "deprecated hook-based weight_norm, ours uses the weight_norm parametrization",
        "masking: lightly's random_block_mask (DINOv2) stratifies the per-image ratios over the range, "
        "truncates the patch count and never places a block as wide or tall as the grid; ours draws "
        "ratios i.i.d. (same fraction of masked images, ratio range, smallest block)",
        "patch loss: IBOTPatchLoss (DINOv2) projects and centres only the teacher's masked patch tokens; "
        "ours (iBOT) projects and centres all of them",
        "centring: lightly updates its centres inside the loss forward, ours after the optimizer step",
        "loss value: lightly returns cross-entropies, ours minus the targets' entropy (same gradients)",
        f"teacher temperature: lightly held at the warm-up value {cfg.warmup_teacher_temp}, ours at its "
        f"step-1 value of a {SCHEDULE_STEPS}-step schedule",
    ]
    if cfg.head_layers != 3:
        differences.append(f"head depth: DINOProjectionHead has 3 layers, ours {cfg.head_layers}")
    return differences


def lightly_ibot(cfg: IBOTConfig, images: torch.Tensor, device: torch.device,
                 seed: int = 0) -> Competitor:
    from lightly.loss import DINOLoss, IBOTPatchLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, random_block_mask, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    enc = cfg.encoder
    head_kwargs = dict(input_dim=enc.embed_dim, hidden_dim=cfg.head_hidden_dim,
                       bottleneck_dim=cfg.head_bottleneck_dim, output_dim=cfg.out_dim,
                       norm_last_layer=cfg.norm_last_layer)
    student = nn.ModuleDict({"backbone": lightly_vit(enc), "cls_head": DINOProjectionHead(**head_kwargs)})
    student["patch_head"] = student["cls_head"] if cfg.shared_head else DINOProjectionHead(**head_kwargs)
    # copy.deepcopy cannot copy the hook-based weight norm's computed weight: a fresh module, same state
    teacher = nn.ModuleDict({"backbone": copy.deepcopy(student["backbone"]),
                             "cls_head": DINOProjectionHead(**head_kwargs)})
    teacher["patch_head"] = teacher["cls_head"] if cfg.shared_head else DINOProjectionHead(**head_kwargs)
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    dino_loss = DINOLoss(output_dim=cfg.out_dim, warmup_teacher_temp=cfg.warmup_teacher_temp,
                         teacher_temp=cfg.teacher_temp, student_temp=cfg.student_temp,
                         center_momentum=cfg.center_momentum)
    patch_loss = IBOTPatchLoss(output_dim=cfg.out_dim, teacher_temp=cfg.teacher_patch_temp,
                               student_temp=cfg.student_temp, center_momentum=cfg.center_momentum)
    model = nn.ModuleDict({"student": student, "teacher": teacher, "dino_loss": dino_loss,
                           "patch_loss": patch_loss}).to(device).train()
    teacher.eval()

    batch, grid = images.shape[0], enc.grid
    random.seed(seed)           # random_block_mask draws from Python's global `random`
    low, high = cfg.mask_ratio_range
    block_mask = torch.cat([                                                     # (2B, g, g), per view
        random_block_mask(size=(batch, grid, grid), batch_mask_ratio=cfg.mask_fraction,
                          min_image_mask_ratio=low, max_image_mask_ratio=high,
                          min_num_masks_per_block=min_block_patches(grid), device=device)
        for _ in range(2)])
    token_mask = F.pad(block_mask.flatten(1), (1, 0), value=False)               # (2B, 1+N), [CLS] kept
    momentum = cosine_schedule(step=0, max_steps=SCHEDULE_STEPS, start_value=cfg.teacher_momentum,
                               end_value=1.0)

    def loss_fn():
        views = torch.cat([images, images])                                      # (2B, 3, H, W), as ours
        with torch.no_grad():
            teacher_tokens = teacher["backbone"].encode(views)                   # (2B, 1+N, D)
            teacher_cls = teacher["cls_head"](teacher_tokens[:, 0])              # (2B, K)
            teacher_masked = teacher["patch_head"](teacher_tokens[token_mask])   # (M, K)
        student_tokens = student["backbone"].encode(views, mask=token_mask)      # (2B, 1+N, D)
        student_cls = student["cls_head"](student_tokens[:, 0])                  # (2B, K)
        student_masked = student["patch_head"](student_tokens[token_mask])       # (M, K)
        loss_cls = dino_loss(teacher_cls.chunk(2), student_cls.chunk(2), teacher_temp=cfg.warmup_teacher_temp)
        loss_mim = patch_loss(teacher_masked, student_masked, mask=block_mask,
                              teacher_temp=cfg.warmup_teacher_temp)
        return cfg.cls_loss_weight * loss_cls + cfg.mim_loss_weight * loss_mim

    def after_step():
        update_momentum(student, teacher, m=momentum)

    return Competitor("lightly iBOT", model, loss_fn, after_step=after_step,
                      masked_fraction=block_mask.float().mean().item())
