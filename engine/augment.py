"""Batched photometric augmentation of one view, with per-image random parameters drawn from a
`torch.Generator` (never the global RNG), as torchvision's per-image transforms in DINO's and
BEiT's pipelines do it one image at a time.

    pixels = random_resized_crop_flip(uint8, size, crop_gen, standardized=False)   # [0, 1] floats
    views = standardize(photometric(pixels, spec, colour_gen))                      # then mean/std

Per image, in DINO's order (main_dino.py DataAugmentationDINO): colour jitter with probability
`jitter_p` (brightness, contrast, saturation, hue in a random order per image, as torchvision's
ColorJitter), grayscale with `grayscale_p`, Gaussian blur with `blur_p`, solarization with
`solarize_p`. Each op runs only on the rows of the batch that get it (index, op, write back).

Randomness: one `torch.rand(B, len(DRAWS))` per call, column j being DRAWS[j], whatever the
spec and the data; the same generator state gives bit-identical output, and a view's spec never
shifts the draws of the next view that shares the generator.

The formulas are torchvision's: kornia's PIL-compatible variants, not its defaults, which
torchvision does not match (`adjust_brightness` adds, `adjust_contrast` scales without the mean,
`adjust_saturation` scales HSV saturation). Hue is our own `shift_hue`: the same HSV rotation as kornia's `adjust_hue` and
torchvision's `adjust_hue` (equal within 2e-6), about four times cheaper on the CPU, where
kornia's was about 85% of the jitter's cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kornia.color import rgb_to_grayscale
from kornia.enhance import (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction,
                            adjust_saturation_with_gray_subtraction)
from kornia.filters import gaussian_blur2d
from torch import Tensor

from core.device import to_device
from core.config import ConfigError

# the columns of the one uniform draw per call, (B, len(DRAWS))
DRAWS = ("jitter", "brightness", "contrast", "saturation", "hue",
         "order_brightness", "order_contrast", "order_saturation", "order_hue",
         "grayscale", "blur", "blur_sigma", "solarize")
_ORDER = slice(DRAWS.index("order_brightness"), DRAWS.index("order_hue") + 1)
BLUR_REFERENCE_PX = 224             # `blur_sigma` is in pixels of a 224 px view (DINO's global crops)
SOLARIZE_THRESHOLD = 0.5            # PIL ImageOps.solarize's 128 of 255: inverts pixels >= 128


@dataclass(frozen=True)
class Photometric:
    """Per-image photometric augmentation of one view; every probability 0 = off."""
    jitter_p: float = 0.0           # chance an image gets colour jitter
    brightness: float = 0.0         # torchvision ColorJitter strengths (factor drawn in [max(0, 1-s), 1+s]; hue in [-h, h])
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0                # in turns of the colour wheel, at most 0.5 (torchvision's limit)
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)   # in pixels AT 224 px; scaled by image_size/224 (resolution-relative recipe)
    solarize_p: float = 0.0

    def validate(self) -> None:
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"Photometric.{name} ({value}) must be a probability in [0, 1], e.g. 0.8")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"Photometric.{name} ({value}) must be a strength >= 0, e.g. 0.4")
        if not 0 <= self.hue <= 0.5:
            raise ConfigError(f"Photometric.hue ({self.hue}) must be in [0, 0.5] turns, e.g. 0.1")
        if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(f"Photometric.blur_sigma {self.blur_sigma} must be (low, high) with "
                              f"0 < low <= high, e.g. (0.1, 2.0)")

    @property
    def active(self) -> bool:
        return max(self.jitter_p, self.grayscale_p, self.blur_p, self.solarize_p) > 0

    def blur_kernel(self, image_size: int) -> tuple[float, float, int]:
        """(lowest sigma, highest sigma, odd kernel size) in pixels at `image_size`: the kernel
        covers +-3 of the highest sigma, at least 3 wide (13 at 224 px, 3 at 32 px)."""
        scale = image_size / BLUR_REFERENCE_PX
        low, high = self.blur_sigma[0] * scale, self.blur_sigma[1] * scale
        return low, high, max(3, 2 * math.ceil(3 * high) + 1)


def photometric(images: Tensor, spec: Photometric, generator: torch.Generator) -> Tensor:
    """float (B, 3, H, W) pixels in [0, 1] (not standardised) -> the same shape and dtype, in
    [0, 1], each image augmented by `spec` with its own draws from `generator`. An inactive spec
    returns `images` itself and draws nothing. The input is never modified."""
    if not spec.active:
        return images
    b, device = images.shape[0], images.device
    draws = torch.rand(b, len(DRAWS), generator=generator, device=generator.device).cpu()  # (B, 13)
    out = images.clone()

    def apply(chosen: Tensor, op, *params: Tensor) -> None:
        """out[chosen] = op(out[chosen], params[chosen]...) on the rows `chosen` (bool (B,))."""
        rows = chosen.nonzero().squeeze(1)
        if len(rows) == 0:
            return
        if len(rows) == b:
            out.copy_(op(out, *(to_device(p, device) for p in params)))
        else:
            on_device = to_device(rows, device)
            out[on_device] = op(out[on_device], *(to_device(p[rows], device) for p in params))

    column = {name: draws[:, j] for j, name in enumerate(DRAWS)}
    jittered = column["jitter"] < spec.jitter_p
    jitter_ops = (  # (strength, op, per-image factor), in torchvision's numbering of the four
        (spec.brightness, adjust_brightness_accumulative, _factor(column["brightness"], spec.brightness)),
        (spec.contrast, adjust_contrast_with_mean_subtraction, _factor(column["contrast"], spec.contrast)),
        (spec.saturation, adjust_saturation_with_gray_subtraction, _factor(column["saturation"], spec.saturation)),
        (spec.hue, shift_hue, (2 * column["hue"] - 1) * spec.hue))
    steps = [(index, op, factor) for index, (strength, op, factor) in enumerate(jitter_ops) if strength > 0]
    if len(steps) == 1:
        apply(jittered, steps[0][1], steps[0][2])
    elif steps:
        # torchvision's ColorJitter: a random order of the four ops per image (its randperm(4)).
        # Each image still meets each op once, so this is the work of one fixed order, in
        # quarter-size slices (measured no slower at 256 x 32 px).
        order = draws[:, _ORDER].argsort(dim=1)                               # (B, 4) op at each position
        for position in range(4):
            for index, op, factor in steps:
                apply(jittered & (order[:, position] == index), op, factor)

    apply(column["grayscale"] < spec.grayscale_p, _grayscale)
    low, high, kernel = spec.blur_kernel(images.shape[-1])          # views are square: the width
    sigma = low + (high - low) * column["blur_sigma"]
    apply(column["blur"] < spec.blur_p, lambda x, s: gaussian_blur2d(x, kernel, s[:, None].expand(-1, 2)), sigma)
    apply(column["solarize"] < spec.solarize_p, _solarize)
    return out.clamp_(0, 1)         # the blur's normalised kernel may round a white pixel past 1


def _factor(uniform: Tensor, strength: float) -> Tensor:
    """torchvision's ColorJitter factor for `strength` s: uniform in [max(0, 1 - s), 1 + s]."""
    low = max(0.0, 1 - strength)
    return low + (1 + strength - low) * uniform


def _grayscale(images: Tensor) -> Tensor:
    return rgb_to_grayscale(images).expand(-1, 3, -1, -1)   # torchvision's RandomGrayscale keeps 3 channels


def _solarize(images: Tensor) -> Tensor:
    return torch.where(images >= SOLARIZE_THRESHOLD, 1 - images, images)


_CHANNEL_SEXTANTS = (5.0, 3.0, 1.0)     # R, G, B in the HSV -> RGB formula f(n) = V - C clamp(min(k, 4 - k), 0, 1)


def shift_hue(images: Tensor, turns: Tensor) -> Tensor:
    """float (B, 3, H, W) RGB in [0, 1], hue shifts (B,) in turns -> RGB with each image's HSV hue
    rotated by its shift; saturation and value (the max channel) kept. torchvision's and kornia's
    `adjust_hue` without building the HSV image: hue in sextants from the max channel, then
    k = (n + hue) mod 6 per channel."""
    maxc = images.amax(dim=1, keepdim=True)                       # (B, 1, H, W) value
    chroma = maxc - images.amin(dim=1, keepdim=True)
    r, g, b = images.split(1, dim=1)
    # hue * chroma, sextant offset included: 0 + (g - b) where red is the max, 2 + (b - r) green, 4 + (r - g) blue
    hue = torch.where(r == maxc, g - b, torch.where(g == maxc, (b - r).add_(chroma, alpha=2),
                                                    (r - g).add_(chroma, alpha=4)))
    hue = hue.div_(torch.where(chroma > 0, chroma, 1.0)).add_(6 * turns.to(images.dtype).view(-1, 1, 1, 1))
    sextants = torch.tensor(_CHANNEL_SEXTANTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    k = (hue.remainder_(6) + sextants).remainder_(6)              # (B, 3, H, W)
    return maxc - chroma * torch.minimum(k, 4 - k).clamp_(0, 1)


# ---- the papers' views --------------------------------------------------------------------
# DINO main_dino.py DataAugmentationDINO (iBOT main_ibot.py DataAugmentationiBOT is the same):
# RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8), RandomGrayscale(p=0.2), then
# GaussianBlur(p, radius U[0.1, 2.0]) and, on the second global view, Solarization(0.2).
_DINO_JITTER = dict(jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, grayscale_p=0.2)
# DINO blurs its 96 px local crops with the same radius in pixels; per 224 px that is 224/96 more
_DINO_LOCAL_SIGMA = (0.1 * BLUR_REFERENCE_PX / 96, 2.0 * BLUR_REFERENCE_PX / 96)


def dino_views(num_local: int) -> tuple[Photometric, ...]:
    """DINO/iBOT's photometric augmentation of global view 1 (blur always), global view 2 (blur
    0.1, solarize 0.2) and `num_local` local views (blur 0.5). Blur sigma is resolution-relative:
    (0.1, 2.0) px at DINO's 224 px global crops and 96 px local crops, so at 32 px the global
    views blur with sigma in (0.014, 0.29) px, scaled by 32/224 (a 3-tap kernel, nearly the
    identity), and a local view of L px with sigma scaled by L/96."""
    global1 = Photometric(**_DINO_JITTER, blur_p=1.0)
    global2 = Photometric(**_DINO_JITTER, blur_p=0.1, solarize_p=0.2)
    local = Photometric(**_DINO_JITTER, blur_p=0.5, blur_sigma=_DINO_LOCAL_SIGMA)
    return (global1, global2) + (local,) * num_local


def beit_view() -> Photometric:
    """BEiT pre-training: ColorJitter(0.4, 0.4, 0.4) on every image, no hue, grayscale, blur or
    solarization (unilm beit/datasets.py DataAugmentationForBEiT, the common_transform of
    run_beit_pretraining.py as released; the newest stored datasets.py has dropped it). BEiT
    jitters before the crop, we after it, so contrast blends with the crop's mean."""
    return Photometric(jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4)
