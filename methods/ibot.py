"""iBOT (Zhou et al., 2022): masked image modeling with an online tokenizer.

The tokenizer is the teacher, an exponential moving average of the student. Both see two
augmented global crops; the student's are masked blockwise. Two losses, each a
cross-entropy to the teacher's centred, sharpened distribution over K prototypes (returned
minus the targets' entropy, see `forward_loss`):
  [CLS]  the student's [CLS] of one view against the teacher's [CLS] of the other (DINO)
  MIM    the student's patch tokens against the teacher's at the masked positions only.
The teacher moves in `after_step` (momentum 0.996 -> 1, cosine) and never gets gradients;
the centres move there too, so a forward pass changes no state. Evaluations use the teacher
encoder by default, as the paper does. Multi-crop is a config option (`local_crops_number`,
off by default): the student also sees smaller local crops, unmasked, which enter only the
[CLS] loss, against both teacher views.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from core.config import ConfigError, late_field
from methods.base import Batch, Horizon, MIMMethod, at_masked, check_augment
from methods.masking import block_mask_per_image, scaled_min_block
from methods.recipes import Recipe
from methods.registry import register_method
from methods.vit import ViT, ViTConfig

EXPORTS = ("teacher", "student")
MOMENTUM_RULES = ("fixed", "scaled")
# the "scaled" rule: the teacher keeps at most 1% of its random init at the end of any run
# (the product of the cosine schedule's momenta is ~exp(-(1 - base) * steps / 2))
INIT_SHARE_AT_END = 0.01
# The collapse monitor: a teacher whose [CLS] output at the end of training has an entropy above
# this share of ln K (the entropy of the uniform distribution over K prototypes) gives the
# student near-uniform targets, nothing to learn from. The cpu profile's runs in results/runs
# (0.2-0.8 epochs) ended at 6.84-6.90 (paper recipe) and 6.57-6.73 (shared) of ln 1024 = 6.93.
COLLAPSED_ENTROPY_SHARE = 0.9


@dataclass(frozen=True)
class IBOTConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)
    # Masking (iBOT README recipe `--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`): half of the
    # images get a blockwise mask with a ratio drawn uniformly from [0.1, 0.5]; the rest none.
    mask_ratio_range: tuple[float, float] = (0.1, 0.5)
    mask_fraction: float = 0.5
    # Projection head (DINO/iBOT: 3 layers, 2048 hidden, 256 bottleneck, K = 8192 at ImageNet
    # scale). Smaller here so that the head costs less than the nano encoder on a CPU.
    out_dim: int = 1024             # K, the number of prototypes ("visual words" of the tokenizer)
    head_hidden_dim: int = 512
    head_bottleneck_dim: int = 128
    head_layers: int = 3
    shared_head: bool = True        # one head for [CLS] and patches (iBOT README); False: a second head
    norm_last_layer: bool = True    # fix the last layer's weight-norm scale to 1 (iBOT code default)
    # Temperatures and centring: the iBOT README's ViT-S/16 recipe (teacher 0.04 -> 0.07 for
    # [CLS] and patches, student 0.1), warm-up as a fraction because our schedules are short.
    student_temp: float = 0.1
    teacher_temp: float = 0.07          # [CLS], after the warm-up
    teacher_patch_temp: float = 0.07    # patches, after the warm-up
    warmup_teacher_temp: float = 0.04   # both start here and rise linearly
    teacher_temp_warmup_frac: float = 0.3   # iBOT code: 30 warm-up epochs of its default 100
    center_momentum: float = 0.9        # EMA of the teacher's mean output, [CLS] and patches
    teacher_momentum: float = 0.996     # EMA of the teacher, raised to 1 on a cosine schedule
    cls_loss_weight: float = 1.0        # lambda1 in the iBOT code
    mim_loss_weight: float = 1.0        # lambda2
    export: str = "teacher"         # which encoder the evaluations get; the paper reports the teacher
    # Multi-crop (DINO/iBOT), off by default (the shared recipe); the paper recipe (below) turns
    # it on. The iBOT README's commands add 10 local crops of 96 px (3/7 of 224) with area scale
    # (0.05, 0.25); DINO's default is (0.05, 0.4). The global crops keep the trainer's scale
    # (crop_scale_min, 1).
    local_crops_number: int = late_field(0)         # (added after the first runs: see late_field)
    local_crop_size: int = late_field(0)            # 0: 3/7 of the image size, rounded down to whole patches
    local_crops_scale: tuple[float, float] = late_field((0.05, 0.4))
    augment: str = late_field("none")     # photometric augmentation (methods.base.AUGMENTATIONS); iBOT's: "dino"
    # Teacher momentum schedule. "fixed": `teacher_momentum` -> 1 on a cosine, as the iBOT code,
    # whatever the run's length (on 195 steps 67.5% of the final teacher is still its random
    # init). "scaled": the base momentum is lowered on short runs to 1 - 2 ln(1/INIT_SHARE_AT_END)
    # / steps, so the teacher's initial half-life is ln 2 / (2 ln 100) = 7.5% of the run and at
    # most 1% of its init is left at the end; never above `teacher_momentum` (long runs: the paper's).
    momentum_rule: str = late_field("fixed")
    # The head's last layer gets no gradients for this fraction of training (iBOT/DINO
    # `freeze_last_layer` = 1 epoch; at least one step when > 0). 0 = never frozen.
    freeze_last_layer_frac: float = late_field(0.0)

    def validate(self) -> None:
        self.encoder.validate()
        low, high = self.mask_ratio_range
        if not 0.0 < low <= high < 1.0:
            raise ConfigError(f"mask_ratio_range {self.mask_ratio_range} must satisfy 0 < low <= high < 1, "
                              f"e.g. (0.1, 0.5)")
        if not 0.0 <= self.mask_fraction <= 1.0:
            raise ConfigError(f"mask_fraction {self.mask_fraction} must be in [0, 1], e.g. 0.5")
        if min(self.out_dim, self.head_hidden_dim, self.head_bottleneck_dim, self.head_layers) < 1:
            raise ConfigError("out_dim, head_hidden_dim, head_bottleneck_dim and head_layers must be >= 1")
        temps = (self.student_temp, self.teacher_temp, self.teacher_patch_temp, self.warmup_teacher_temp)
        if min(temps) <= 0:
            raise ConfigError("temperatures must be > 0; iBOT uses student 0.1, teacher 0.04 -> 0.07")
        if not 0.0 <= self.teacher_temp_warmup_frac <= 1.0:
            raise ConfigError(f"teacher_temp_warmup_frac {self.teacher_temp_warmup_frac} must be in [0, 1]")
        if not 0.0 <= self.center_momentum < 1.0 or not 0.0 <= self.teacher_momentum <= 1.0:
            raise ConfigError("center_momentum must be in [0, 1) and teacher_momentum in [0, 1], "
                              "e.g. 0.9 and 0.996")
        if min(self.cls_loss_weight, self.mim_loss_weight) < 0 or \
                self.cls_loss_weight + self.mim_loss_weight == 0:
            raise ConfigError("cls_loss_weight and mim_loss_weight must be >= 0 and not both 0")
        if self.export not in EXPORTS:
            raise ConfigError(f"unknown export {self.export!r}; known: {', '.join(EXPORTS)}")
        patch, size = self.encoder.patch_size, self.local_crop_size
        if self.local_crops_number < 0 or size < 0 or size % patch or size > self.encoder.img_size:
            raise ConfigError(f"local_crops_number ({self.local_crops_number}) must be >= 0 and local_crop_size "
                              f"({size}) 0 (automatic) or a multiple of the patch size {patch} up to the image "
                              f"size {self.encoder.img_size}")
        check_augment(self.augment, ("none", "dino"))
        if self.momentum_rule not in MOMENTUM_RULES:
            raise ConfigError(f"unknown momentum_rule {self.momentum_rule!r}; known: {', '.join(MOMENTUM_RULES)}")
        if not 0.0 <= self.freeze_last_layer_frac < 1.0:
            raise ConfigError(f"freeze_last_layer_frac {self.freeze_last_layer_frac} must be in [0, 1), "
                              f"e.g. 1/800 (iBOT: 1 epoch of 800)")
        low, high = self.local_crops_scale
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(f"local_crops_scale {self.local_crops_scale} must satisfy 0 < low <= high <= 1, "
                              f"e.g. (0.05, 0.4)")

    @property
    def local_size(self) -> int:
        """Side of the local crops: `local_crop_size`, or 3/7 of the image (96 of 224) in whole patches."""
        patch = self.encoder.patch_size
        return self.local_crop_size or max(patch, self.encoder.img_size * 3 // 7 // patch * patch)


class ProjectionHead(nn.Module):
    """DINO's head: an MLP with GELUs down to a bottleneck, L2-normalised, then a
    weight-normalised linear layer (no bias) to K logits."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int,
                 num_layers: int, norm_last_layer: bool):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers += [nn.Linear(d_in, d_out)] + ([nn.GELU()] if i < num_layers - 1 else [])
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        scale = self.last_layer.parametrizations.weight.original0     # weight-norm's g, (K, 1)
        nn.init.ones_(scale)
        scale.requires_grad = not norm_last_layer

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def centred_softmax(logits: Tensor, centre: Tensor, temperature: Tensor | float) -> Tensor:
    """The teacher's targets: softmax((logits - centre) / temperature) over the last dim."""
    return F.softmax((logits.float() - centre) / temperature, dim=-1)


def soft_cross_entropy(teacher_probs: Tensor, student_logits: Tensor) -> Tensor:
    """Cross-entropy of student logits to teacher distributions, (..., K) -> (...)."""
    return -(teacher_probs * F.log_softmax(student_logits.float(), dim=-1)).sum(-1)


def entropy(probs: Tensor) -> Tensor:
    """Entropy in nats over the last dim, (..., K) -> (...): ln K = uniform, 0 = one-hot."""
    return torch.special.entr(probs).sum(-1)


def cross_view_cross_entropy(teacher_probs: Tensor, student_logits: Tensor, num_global: int) -> Tensor:
    """DINO's [CLS] loss: mean cross-entropy of each student view against every *other*
    teacher view. Teacher (G*B, K) on the G global crops; student (V*B, K) on the same G
    global crops first, then any local crops; views stacked along the batch."""
    k = teacher_probs.shape[-1]
    teacher = teacher_probs.view(num_global, -1, k)                                          # (G, B, K)
    student = F.log_softmax(student_logits.float(), dim=-1).view(-1, teacher.shape[1], k)   # (V, B, K)
    cross = -torch.einsum("qbk,vbk->qv", teacher, student) / teacher.shape[1]              # (G, V)
    pairs = num_global * student.shape[0] - num_global         # all but a view against itself
    return (cross.sum() - cross.diagonal().sum()) / pairs


def masked_image_mean(per_patch: Tensor, mask: Tensor, masked: Tensor | None = None) -> Tensor:
    """iBOT's MIM reduction of a per-patch loss (M,) given at the M masked positions of `mask`
    (B, N), in `mask.nonzero()` order: the mean over each image's masked patches, then the
    mean over all B images, so an image without a mask adds 0 (the iBOT code; `masked_mean`
    of methods.base would weigh every masked patch equally instead). `masked`: the positions'
    flat indices (`Batch.masked`; without them the host reads `mask.nonzero()`)."""
    image_of_patch = mask.nonzero(as_tuple=True)[0] if masked is None else masked // mask.shape[1]
    per_image = torch.zeros(mask.shape[0], device=per_patch.device).index_add_(0, image_of_patch, per_patch)
    return (per_image / mask.sum(dim=1).clamp(min=1)).mean()


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """DINO's teacher momentum: base at step 0, rising to 1 at the end on a half cosine."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1) / 2


def base_momentum(rule: str, paper_base: float, total_steps: int) -> float:
    """The base (first-step) teacher momentum of a run of `total_steps` under `rule`."""
    if rule == "fixed":
        return paper_base
    return max(0.0, min(paper_base, 1.0 - 2.0 * math.log(1.0 / INIT_SHARE_AT_END) / max(total_steps, 1)))


def teacher_init_share(base: float, total_steps: int) -> float:
    """How much of the teacher's random init is left after `total_steps` EMA steps of the cosine
    schedule from `base` (the product of the momenta)."""
    return math.prod(cosine_momentum(step, total_steps, base) for step in range(total_steps))


def min_block_patches(grid: int) -> int:
    """iBOT's smallest mask block, (grid // 3)^2 (methods.masking.scaled_min_block)."""
    return scaled_min_block(grid)


@register_method("ibot", IBOTConfig)
class IBOT(MIMMethod):
    num_views = 2                   # two global crops
    # iBOT README's multi-crop commands (ViT-S/B, `--norm_last_layer false --local_crops_number 10
    # --global_crops_scale 0.25 1 --local_crops_scale 0.05 0.25`) and main_ibot.py defaults
    # (bytedance/ibot); DINO's DataAugmentationDINO for the colours. Scaled to short runs: the
    # momentum rule (above); the last-layer freeze as DINO's 1 epoch of its default 100; warm-up
    # stays the profile's (10 epochs is a schedule length).
    # Local crops: 4 of 12 px (3/7 of 32 px, in whole patches). Counted at the cpu profile, each
    # adds ~5% to a step's FLOPs (1.54 GFLOP per image without, 1.84 with 4, 2.29 with iBOT's
    # 10): 4 keep the multi-crop objective for a fifth more per step, where 10 would cost a
    # third of the steps of the run that gets the fewest when compute-matched.
    paper_recipe = Recipe(
        train=dict(blr=5e-4,                # lr 5e-4 per 256
                   beta2=0.999,             # AdamW betas (0.9, 0.999)
                   weight_decay=0.04, weight_decay_end=0.4,     # cosine 0.04 -> 0.4
                   min_lr_frac=1e-6 / 5e-4,     # min_lr 1e-6
                   clip_grad=3.0, clip_mode="per_param",    # utils.clip_gradients: each parameter's norm
                   crop_scale_min=0.25),    # global_crops_scale (0.25, 1)
        method=dict(encoder=dict(drop_path=0.1),    # --drop_path 0.1 (the student; the teacher has none)
                    augment="dino", norm_last_layer=False,
                    local_crops_number=4, local_crops_scale=(0.05, 0.25),
                    momentum_rule="scaled",
                    freeze_last_layer_frac=1 / 100),    # freeze_last_layer 1 epoch (DINO: of 100)
        source="Zhou et al. 2022; bytedance/ibot main_ibot.py, README ViT-S/16")
    # --recipe tuned: small-scale teacher settings chosen on held-out data so that the teacher does
    # not go uniform within the curve's budgets (cpu, 2.5 MAE-epochs = 92 steps, shared lr, seed 0;
    # the teacher's [CLS] entropy at step 39 of ln 1024 = 6.93): a fixed momentum 0.99 with the
    # default temperatures (0.04 -> 0.07) and weight-normed last layer sat at 6.40 (0.92 ln K,
    # collapsed by COLLAPSED_ENTROPY_SHARE) and stayed there; a constant teacher temperature of
    # 0.04 (the warm-up value: sharper targets) with a free last layer fell to 3.65 (0.53 ln K)
    # and kept falling. Paper: momentum 0.996 (at 800 epochs), temperatures 0.04 -> 0.07.
    tuned_recipe = Recipe(method=dict(momentum_rule="fixed", teacher_momentum=0.99, teacher_temp=0.04,
                                      teacher_patch_temp=0.04, warmup_teacher_temp=0.04, norm_last_layer=False),
                          source="the shared recipe; teacher momentum 0.99 fixed, teacher temperature 0.04, "
                                 "norm_last_layer off (chosen on held-out data, see the comment above)")
    synced_buffers = ("center_cls", "center_patch")   # the same centres on every rank (torchrun)
    collapse_metrics = ("teacher_entropy_cls", "teacher_entropy_patch")   # forward's logs
    encoder_variants = ("student",)     # saved beside the exported teacher: "knn@student" evaluates it

    def __init__(self, cfg: IBOTConfig):
        super().__init__(cfg)
        head = dict(in_dim=cfg.encoder.embed_dim, out_dim=cfg.out_dim, hidden_dim=cfg.head_hidden_dim,
                    bottleneck_dim=cfg.head_bottleneck_dim, num_layers=cfg.head_layers,
                    norm_last_layer=cfg.norm_last_layer)
        self.heads = nn.ModuleDict({"cls": ProjectionHead(**head)})
        if not cfg.shared_head:
            self.heads["patch"] = ProjectionHead(**head)
        # The teacher starts as a copy of the student; only `after_step` changes it.
        self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(self.encoder),
                                      "heads": copy.deepcopy(self.heads)})
        self.teacher.requires_grad_(False).eval()   # no drop path in the teacher, from the first step
        self.register_buffer("center_cls", torch.zeros(cfg.out_dim))
        self.register_buffer("center_patch", torch.zeros(cfg.out_dim))
        # ([CLS], patch) teacher temperatures for the next step, set by `after_step`
        self.register_buffer("teacher_temps", torch.tensor(self.teacher_temperatures(0, Horizon(1))))
        self._batch_centres: tuple[Tensor, Tensor] | None = None

    def train(self, mode: bool = True) -> "IBOT":
        super().train(mode)
        self.teacher.eval()         # no drop path in the teacher (iBOT builds it with rate 0)
        return self

    # ---- masks ---------------------------------------------------------------------------
    def draw_masks(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """(2, B, N): each global crop masked independently, as in iBOT's data loader."""
        grid = self.cfg.encoder.grid
        return torch.stack([
            block_mask_per_image(batch_size, grid, self.cfg.mask_ratio_range, self.cfg.mask_fraction,
                                 generator, min_block_patches(grid))
            for _ in range(self.num_views)
        ])

    # ---- forward -------------------------------------------------------------------------
    def view_specs(self, crop_scale_min: float) -> list[tuple[int, tuple[float, float]]]:
        """The two global crops, then `local_crops_number` local ones."""
        local = (self.cfg.local_size, tuple(self.cfg.local_crops_scale))
        return super().view_specs(crop_scale_min) + [local] * self.cfg.local_crops_number

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        images = torch.cat(batch.views[:self.num_views])                  # (2B, 3, H, W), global crops
        mask = batch.mask.flatten(0, 1)                                   # (2B, N)
        with torch.no_grad():
            teacher_cls, teacher_patch = self.forward_teacher(images)     # (2B, K), (2B, N, K)
        student_cls, student_patch = self.forward_student(images, mask, batch.masked)   # (2B, K), (M, K)
        local_views = batch.views[self.num_views:]
        if local_views:             # multi-crop: the student alone, unmasked, [CLS] only
            tokens = self.encoder(torch.cat(local_views))                 # (L*B, 1+n, D)
            student_cls = torch.cat([student_cls, self._heads(self.heads)[0](tokens[:, 0])])   # ((2+L)B, K)
        return self.forward_loss(teacher_cls, teacher_patch, student_cls, student_patch, mask, batch.masked)

    def forward_teacher(self, images: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.teacher.encoder(images)                             # (2B, 1+N, D), unmasked
        cls_head, patch_head = self._heads(self.teacher.heads)
        return cls_head(tokens[:, 0]).float(), patch_head(tokens[:, 1:]).float()

    def forward_student(self, images: Tensor, mask: Tensor, masked: Tensor | None = None) -> tuple[Tensor, Tensor]:
        tokens = self.encoder(images, mask=mask)                          # (2B, 1+N, D), [M] where masked
        cls_head, patch_head = self._heads(self.heads)
        # only masked patches enter the MIM loss, so only they go through the head
        return cls_head(tokens[:, 0]), patch_head(at_masked(tokens, mask, masked, skip=1))

    def forward_loss(self, teacher_cls: Tensor, teacher_patch: Tensor, student_cls: Tensor,
                     student_patch: Tensor, mask: Tensor, masked: Tensor | None = None
                     ) -> tuple[Tensor, dict[str, Tensor]]:
        """iBOT's cross-entropies, returned minus the targets' entropy, i.e. as KL divergences.
        The gradient is the same (the targets are constants), but the value does not rise when
        centring and the temperature warm-up flatten the targets, so it shows what the student
        still has to learn (0 = it matches the teacher). `loss_ce` is the iBOT code's value."""
        cfg = self.cfg
        cls_targets = centred_softmax(teacher_cls, self.center_cls, self.teacher_temps[0])       # (2B, K)
        patch_targets = centred_softmax(teacher_patch, self.center_patch, self.teacher_temps[1])  # (2B, N, K)
        masked_targets = at_masked(patch_targets, mask, masked)                                  # (M, K)
        ce_cls = cross_view_cross_entropy(cls_targets, student_cls / cfg.student_temp, self.num_views)
        ce_mim = masked_image_mean(soft_cross_entropy(masked_targets, student_patch / cfg.student_temp), mask,
                                   masked)
        entropy_cls = entropy(cls_targets).mean()
        loss_cls = ce_cls - entropy_cls
        loss_mim = ce_mim - masked_image_mean(entropy(masked_targets), mask, masked)
        loss = cfg.cls_loss_weight * loss_cls + cfg.mim_loss_weight * loss_mim
        # applied in after_step, so that a forward pass (FLOP counting, a skipped step) changes nothing
        self._batch_centres = (teacher_cls.mean(dim=0), teacher_patch.mean(dim=(0, 1)))
        return loss, {
            "loss": loss.detach(), "loss_cls": loss_cls.detach(), "loss_mim": loss_mim.detach(),
            "loss_ce": (cfg.cls_loss_weight * ce_cls + cfg.mim_loss_weight * ce_mim).detach(),
            "teacher_entropy_cls": entropy_cls, "teacher_entropy_patch": entropy(patch_targets).mean(),
            "center_norm_cls": self.center_cls.norm(), "center_norm_patch": self.center_patch.norm(),
        }

    def _heads(self, heads: nn.ModuleDict) -> tuple[nn.Module, nn.Module]:
        return heads["cls"], heads["patch"] if "patch" in heads else heads["cls"]

    # ---- hooks ---------------------------------------------------------------------------
    @classmethod
    def length_dependent(cls, cfg: IBOTConfig) -> str | None:
        if cfg.momentum_rule == "scaled":
            return "momentum_rule='scaled' sets the teacher's base momentum from the run's total length"
        return None

    @classmethod
    def collapse(cls, cfg: IBOTConfig, final: dict[str, float], prerequisites: dict) -> str | None:
        """Collapsed when the teacher's [CLS] entropy at the last logged step is above
        COLLAPSED_ENTROPY_SHARE ln K (K = out_dim). The patch entropy is reported beside it,
        relative to ln K too, but is not part of the rule."""
        uniform = math.log(cfg.out_dim)
        cls_share = final["teacher_entropy_cls"] / uniform
        if cls_share <= COLLAPSED_ENTROPY_SHARE:
            return None
        patch_share = final["teacher_entropy_patch"] / uniform
        return (f"teacher [CLS] entropy {final['teacher_entropy_cls']:.2f} = {cls_share:.3f} ln K (K = {cfg.out_dim}) "
                f"> {COLLAPSED_ENTROPY_SHARE} ln K: near-uniform targets (patch entropy {patch_share:.3f} ln K)")

    @torch.no_grad()
    def after_step(self, step: int, horizon: Horizon) -> None:
        """EMA of the teacher towards the student, EMA of the centres towards the teacher's
        mean outputs of this step, and the teacher temperatures of the next step."""
        base = base_momentum(self.cfg.momentum_rule, self.cfg.teacher_momentum, horizon.total_steps)
        momentum = horizon.ramp(step, base, 1.0)       # (cosine: cosine_momentum, bit for bit)
        teacher = [*self.teacher.encoder.parameters(), *self.teacher.heads.parameters()]
        student = [*self.encoder.parameters(), *self.heads.parameters()]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)
        if self._batch_centres is not None:
            # under torchrun the trainer then averages the centres over ranks (`synced_buffers`):
            # the EMA is linear, so that equals the EMA of the batch centre averaged over ranks
            for centre, batch_centre in zip((self.center_cls, self.center_patch), self._batch_centres):
                centre.mul_(self.cfg.center_momentum).add_(batch_centre, alpha=1.0 - self.cfg.center_momentum)
            self._batch_centres = None
        self.teacher_temps.copy_(torch.tensor(self.teacher_temperatures(step + 1, horizon)))

    def before_optimizer_step(self, step: int, horizon: Horizon) -> None:
        """DINO's cancel_gradients_last_layer: while frozen, the heads' last layers get no
        gradient (and so no weight decay: the optimizer skips a parameter without one)."""
        if horizon.early(step, self.cfg.freeze_last_layer_frac):
            for head in self.heads.values():
                for param in head.last_layer.parameters():
                    param.grad = None

    def teacher_temperatures(self, step: int, horizon: Horizon) -> tuple[float, float]:
        """([CLS], patch) temperatures: linear from the warm-up value over the first
        `teacher_temp_warmup_frac` of training (wsd: over the lr warm-up), then constant."""
        cfg = self.cfg
        progress = horizon.warmed(step, cfg.teacher_temp_warmup_frac)
        start = cfg.warmup_teacher_temp
        return (start + (cfg.teacher_temp - start) * progress,
                start + (cfg.teacher_patch_temp - start) * progress)

    def export_encoder(self) -> ViT:
        return self.variant_encoder(self.cfg.export)

    def variant_encoder(self, name: str) -> ViT:
        if name not in EXPORTS:
            return super().variant_encoder(name)
        return self.teacher.encoder if name == "teacher" else self.encoder
