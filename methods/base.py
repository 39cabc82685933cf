"""What every method shares: the batch it receives and the small interface the trainer calls."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor, nn

from core.config import ConfigError
from core.device import to_device
from methods.masking import make_masks
from methods.vit import ViT, patchify, unpatchify


@dataclass
class Batch:
    images: Tensor                  # (B, 3, H, W) augmented, normalised (the first view)
    mask: Tensor | None = None      # (B, N) bool, True = masked (per view: (V, B, N)); from methods.masking
    views: list[Tensor] | None = None   # all augmented views (`view_specs`) when there is more than one
    # found on the host mask as drawn, so the step gathers patches without a device sync:
    visible: int | None = None      # patches every image leaves visible, when all leave as many (MAE)
    masked: Tensor | None = None    # flat indices of the masked positions, in mask.nonzero() order (`at_masked`)

    @classmethod
    def of_views(cls, views: list[Tensor], mask: Tensor | None = None,
                 device: torch.device | str | None = None) -> "Batch":
        """A step's batch from its views and its masks as drawn (on the host), moved to `device`."""
        visible = masked = None
        if mask is not None:
            if mask.dtype != torch.bool or mask.device.type != "cpu":
                raise ValueError(f"Batch.of_views takes the host's bool mask as drawn, not a {mask.dtype} "
                                 f"mask on {mask.device}")
            fewest, most = torch.stack((~mask).sum(dim=-1).flatten().aminmax()).tolist()
            visible = fewest if fewest == most else None
            masked = mask.flatten().nonzero().squeeze(1)
            if device is not None:
                mask, masked = to_device(mask, device), to_device(masked, device)
        return cls(images=views[0], mask=mask, views=views if len(views) > 1 else None, visible=visible,
                   masked=masked)


def at_masked(x: Tensor, mask: Tensor, masked: Tensor | None = None, skip: int = 0) -> Tensor:
    """`x[:, skip:][mask]`: the entries of `x` (the mask's dims first; `skip` leading tokens per
    row before its N positions, e.g. [CLS]) at the masked positions, in mask.nonzero() order.
    Given `masked` (`Batch.masked`, their flat indices) an index_select with no device sync
    (and no copy of the tokens); else boolean indexing, whose output size the host must read."""
    if masked is None:
        return x[:, skip:][mask] if skip else x[mask]
    if skip:            # row r's position n sits at r * (skip + N) + skip + n of the flattened tokens
        masked = masked + (masked // mask.shape[-1] + 1) * skip
    return x.flatten(0, mask.dim() - 1).index_select(0, masked)


@dataclass(frozen=True)
class Prerequisite:
    """A run that must be finished before a method's run starts (BEiT: its stage-1 tokenizer).
    The run layer resolves it like any run (content-addressed, so every run needing the same
    one shares it), executes it first, loads its product and hands it to `use_prerequisites`."""
    method: str                                 # a registered method, e.g. "dvae"
    overrides: dict                             # its method config (the profile's encoder is not applied)
    train: dict = field(default_factory=dict)   # TrainConfig overrides of the profile's recipe
    seed: int = 0
    evals: tuple[str, ...] = ()                 # evaluations of its product, recorded with it


@dataclass(frozen=True)
class Horizon:
    """A run's length as its per-step schedules see it (the trainer hands it to `after_step`).

    cosine (every run before curves): each schedule spans the whole run of `total_steps`.
    wsd (warm-up / stable / decay, `decay_start` set): a schedule is a function of the step
    alone until `decay_start`, so runs of different lengths share that part exactly, and moves
    only over the decay. Per schedule (lr: engine.schedules):

    | schedule                          | cosine                       | wsd: warm-up + stable      | wsd: decay            |
    | --------------------------------- | ---------------------------- | -------------------------- | --------------------- |
    | `ramp` (weight decay 0.04 -> 0.4, | start -> end, half cosine    | held at start              | start -> end, half    |
    |  iBOT teacher momentum -> 1)      | over the run                 |                            | cosine over the decay |
    | `warmed` (iBOT temperature)       | linear over `frac` of the run| linear over the lr warm-up | done                  |
    | `early` (iBOT last-layer freeze)  | the first `frac` of the run  | the lr warm-up             | no                    |
    """
    total_steps: int
    warmup_steps: int = 0                 # wsd: the lr warm-up's fixed number of steps
    decay_start: int | None = None        # wsd: the first step of the decay; None: cosine

    def ramp(self, step: int, start: float, end: float) -> float:
        """`start` -> `end` on a half cosine (DINO's cosine_scheduler): over the run, or (wsd) over the decay."""
        if self.decay_start is None:
            return end + (start - end) * (1 + math.cos(math.pi * step / max(self.total_steps, 1))) / 2
        if step < self.decay_start:
            return start
        decay_steps = max(self.total_steps - self.decay_start, 1)
        return end + (start - end) * (1 + math.cos(math.pi * (step - self.decay_start) / decay_steps)) / 2

    def warmed(self, step: int, frac: float) -> float:
        """How far (0..1) a linear warm-up over `frac` of the run (wsd: the lr warm-up) is at `step`."""
        steps = frac * self.total_steps if self.decay_start is None else (self.warmup_steps if frac > 0 else 0)
        return min(1.0, step / steps) if steps > 0 else 1.0

    def early(self, step: int, frac: float) -> bool:
        """Within the first `frac` of the run (at least one step when frac > 0; wsd: the lr warm-up)."""
        if frac <= 0:
            return False
        steps = math.ceil(frac * self.total_steps) if self.decay_start is None else self.warmup_steps
        return step < max(1, steps)


PRODUCTS = ("encoder", "tokenizer")     # what a run can make (`Method.product`); evaluations take one
# photometric augmentation of the views, by name (a method config's `augment` field); the
# trainer maps each name to per-view specs (engine.trainer.view_augmentations)
AUGMENTATIONS = ("none", "beit", "dino")


def check_augment(name: str, allowed: tuple[str, ...]) -> None:
    """A method config's `augment` is one its views can take (`allowed`, of AUGMENTATIONS)."""
    if name not in allowed:
        raise ConfigError(f"augment {name!r} does not fit this method; use one of: {', '.join(allowed)}")


class Method(nn.Module):
    """What the trainer and the run layer call on anything registered with `register_method`:
    a MIM method (`MIMMethod`, below) or BEiT's stage-1 tokenizer (`methods.dvae.DVAE`).
    Subclasses implement `forward(batch) -> (loss, metrics)`.

    The trainer owns data, optimiser, devices and loops; a method only computes a loss.
    `metrics` holds 0-d tensors (no host syncs in the step); the trainer logs them.
    The run layer owns files: it saves what `product` names and loads prerequisites.
    """

    name: str = ""
    trains: bool = True             # False for the `none` baseline: no pre-training steps
    num_views: int = 1              # augmented views per image the trainer makes (iBOT: 2 global crops)
    equal_mask_counts: bool = False     # True when the encoder drops masked patches (MAE): every
                                        # image of a batch must then hide the same number
    # buffers the trainer averages over processes after each step (under torchrun), so every
    # rank holds the same value: iBOT's centres of the teacher's outputs
    synced_buffers: tuple[str, ...] = ()
    # what a finished run saves and its evaluations take: "encoder" (the ViT of `export_encoder`,
    # encoder.safetensors) or "tokenizer" (the method itself, tokenizer.safetensors: the dVAE)
    product: str = "encoder"
    # the share of the calibrated (MAE) FLOP/s this method's training sustains, for the cost
    # plan (runs.cost.estimate_seconds): the ViT methods run within 80-92% of the matmul peak
    # like MAE's calibration steps, so 1.0
    training_efficiency: float = 1.0
    # the paper's pre-training recipe (methods.recipes.Recipe), applied under --recipe paper;
    # None: the method trains with the profile's shared recipe under both
    paper_recipe = None
    # what --recipe tuned changes beside the tuned lr (methods.recipes): the masks scaled to the
    # grid, a method's small-scale settings; the lr itself is chosen by suites.tune
    tuned_recipe = None
    # other encoders a finished run saves beside its product (`<name>.safetensors`), which an
    # evaluation "knn@<name>" takes instead of the product (iBOT: "student" and "teacher")
    encoder_variants: tuple[str, ...] = ()
    # evaluation config fields this method's runs change from the profile's, by evaluation
    # (the `none` baseline: its from-scratch fine-tune recipe); every other method: none
    eval_overrides: Mapping[str, dict] = MappingProxyType({})
    # this method's cells in the suites that vary a setting across methods, by suite: setting
    # label -> method config overrides, e.g. {"ablation_masking": {"block 0.6": {"mask":
    # {"strategy": "block", "ratio": 0.6}}}}. A suite it names no cells for runs it once at its
    # config's defaults (setting "default"); compare_methods runs every method at its defaults.
    # (The project's own methods' cells are in the suites' modules, beside the papers' tables.)
    suite_cells: Mapping[str, Mapping[str, dict]] = MappingProxyType({})
    # what its collapse monitor (`collapse`) reads: keys of the run's last logged step
    # (metrics.jsonl, kept as train stats' "final_metrics"), and a prerequisite run's record
    # metrics by role. Neither: no monitor, never flagged (MAE, pixel, none)
    collapse_metrics: tuple[str, ...] = ()
    collapse_prerequisite_metrics: Mapping[str, tuple[str, ...]] = MappingProxyType({})

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    @property
    def mask_config(self):
        """The MaskConfig the trainer uses to draw masks, or None when the method takes none."""
        return getattr(self.cfg, "mask", None)

    def draw_masks(self, batch_size: int, generator: torch.Generator) -> Tensor | None:
        """Masks for one batch, drawn by a generator of `methods.masking` from the config.
        A method whose masking needs more (iBOT: a ratio per image, one mask per view)
        overrides this, still composing the generators of `methods.masking`."""
        if self.mask_config is None:
            return None
        return make_masks(self.mask_config, batch_size, self.cfg.encoder.grid, generator,
                          exact_count=self.equal_mask_counts)

    @property
    def augmentation(self) -> str:
        """The photometric augmentation of the views (AUGMENTATIONS): the config's `augment`."""
        return getattr(self.cfg, "augment", "none")

    def view_specs(self, crop_scale_min: float) -> list[tuple[int, tuple[float, float]]]:
        """(output size, RandomResizedCrop area scale) of each augmented view the trainer
        makes: `num_views` crops at the encoder's size; iBOT adds smaller local crops."""
        return [(self.cfg.encoder.img_size, (crop_scale_min, 1.0))] * self.num_views

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def reconstruct(self, batch: Batch) -> Tensor | None:
        """Predicted images (B, 3, H, W) in normalised pixel space, for the run's figures;
        None for methods that do not predict pixels."""
        return None

    def after_step(self, step: int, horizon: Horizon) -> None:
        """Called by the trainer after each optimiser step (EMA teachers): `horizon` gives the
        run's length as its schedules see it."""

    def export_encoder(self) -> ViT | None:
        """The encoder that evaluations use (None when the product is not an encoder)."""
        return None

    def variant_encoder(self, name: str) -> ViT:
        """One of `encoder_variants`, for evaluations named "<evaluation>@<name>"."""
        raise KeyError(f"{self.name} has no encoder {name!r}; it has: {', '.join(self.encoder_variants) or 'none'}")

    @classmethod
    def length_dependent(cls, cfg) -> str | None:
        """Why a per-step schedule of this config depends on the run's total length (None: none
        does, beyond what `Horizon` handles): such a config cannot run under schedule="wsd"."""
        return None

    @classmethod
    def collapse(cls, cfg, final: dict[str, float], prerequisites: dict[str, dict[str, float]]) -> str | None:
        """Why a finished run of `cfg` collapsed, in one line; None when it did not. `final`:
        the `collapse_metrics` of its last logged step; `prerequisites`: role -> the
        `collapse_prerequisite_metrics` of that run's record. The run layer reads them
        (runs.collapse) and calls this only when all are there. Default: never collapsed."""
        return None

    @classmethod
    def prerequisites(cls, cfg) -> dict[str, Prerequisite]:
        """Runs to finish before a run of this config, by role; none by default."""
        return {}

    def use_prerequisites(self, products: dict[str, nn.Module]) -> None:
        """Take the products of the finished prerequisite runs, by role (called before training)."""


class MIMMethod(Method):
    """A pre-training method on the shared ViT (`self.encoder`), which it exports."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.encoder = ViT(cfg.encoder)

    def export_encoder(self) -> ViT:
        return self.encoder


def patch_targets(images: Tensor, patch_size: int, normalize: bool) -> Tensor:
    """Pixels per patch (B, N, p*p*C); optionally normalised per patch (MAE's norm_pix_loss)."""
    target = patchify(images, patch_size)
    if normalize:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return target


def prediction_to_images(pred: Tensor, images: Tensor, patch_size: int, normalized: bool) -> Tensor:
    """Predicted patches (B, N, p*p*C) -> images; a per-patch-normalised prediction gets the
    true patches' mean and std back (as MAE's visualisation does)."""
    if normalized:
        target = patchify(images, patch_size)
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        pred = pred * std + mean
    return unpatchify(pred, patch_size, images.shape[1])


def masked_mean(per_patch_loss: Tensor, mask: Tensor) -> Tensor:
    """Mean of a (B, N) loss over masked patches only."""
    weights = mask.to(per_patch_loss.dtype)
    return (per_patch_loss * weights).sum() / weights.sum().clamp(min=1.0)
