"""Mask generators, kept outside the methods: (batch, grid, ratio, generator) -> bool mask.

A mask is a (B, N) bool tensor over the patch grid in raster order; True = masked.
Every generator is seeded by a `torch.Generator`, so the same seed gives the same masks.

    random   uniform over patches, exactly round(ratio * N) masked per image (MAE, SimMIM)
    block    BEiT's blockwise masking (Algorithm 1): rectangles of >= min_block_patches
             patches with aspect ratio in [0.3, 1/0.3], added until the target count
    grid     a regular lattice keeps one patch in every s x s cell (MAE Fig. 6 "grid")
    exact_count=True   tops blockwise masks up with random patches to exactly round(ratio * N),
             for methods whose encoder drops the masked patches (MAE needs one count per batch)
    block_mask_per_image   blockwise with a ratio drawn per image from a range, on a
             fraction of the images (iBOT); a method composes it in its `draw_masks`
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from core.config import ConfigError, late_field

STRATEGIES = ("random", "block", "grid")


@dataclass(frozen=True)
class MaskConfig:
    strategy: str = "random"        # one of STRATEGIES
    ratio: float = 0.75             # fraction of patches masked
    # BEiT's smallest block (16 at its 14x14 grid); clipped to the target count. SCALED (0): the
    # same share of the grid at any grid, (grid // 3)^2 (16 at 14x14, 4 at 8x8; iBOT's rule)
    min_block_patches: int = 16
    min_aspect: float = 0.3         # BEiT's block aspect-ratio range [0.3, 1/0.3]
    # the side, in patches, of the square unit a mask is drawn in (SimMIM: a 32-px unit = 2x2
    # patches of 16 px); 1 = per patch, as every earlier run. SCALED (0): SimMIM's share of the
    # image side (32 of 224 px, a seventh) at any grid, round(grid / 7) (2 at 14x14, 1 at 8x8)
    unit: int = late_field(1)

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown mask strategy {self.strategy!r}; known: {', '.join(STRATEGIES)}")
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"mask ratio {self.ratio} must be in (0, 1), e.g. 0.75")
        if self.strategy == "grid":
            grid_stride(self.ratio)
        if self.min_block_patches < 0 or not 0.0 < self.min_aspect <= 1.0:
            raise ConfigError("min_block_patches must be >= 1 (or 0: scaled to the grid) and min_aspect in (0, 1]")
        if self.unit < 0:
            raise ConfigError(f"mask unit {self.unit} must be >= 1 patches (SimMIM: 2) or 0 (scaled to the grid)")

    def at_grid(self, grid: int) -> "MaskConfig":
        """This config with its SCALED values made concrete for a grid x grid patch grid."""
        return dataclasses.replace(self, min_block_patches=self.min_block_patches or scaled_min_block(grid),
                                   unit=self.unit or max(1, round(grid / 7)))

    def check_grid(self, grid: int) -> None:
        unit = self.at_grid(grid).unit
        if grid % unit:
            raise ConfigError(f"mask unit {unit} must divide the {grid}x{grid} patch grid; "
                              f"pick a divisor of {grid}")


SCALED = 0      # a MaskConfig size set to the papers' share of the grid (MaskConfig.at_grid)


def scaled_min_block(grid: int) -> int:
    """The smallest mask block at the papers' share of the grid, (grid // 3)^2: BEiT's 16 at
    14x14 (224 px, patch 16), 4 at 8x8, 1 at 4x4."""
    return max(1, (grid // 3) ** 2)


def make_masks(cfg: MaskConfig, batch_size: int, grid: int, generator: torch.Generator,
               exact_count: bool = False) -> Tensor:
    """(batch_size, grid*grid) bool masks drawn with `generator`. Random and grid masks hide
    the same number of patches in every image; blockwise ones only with `exact_count`. With
    `cfg.unit` > 1 the mask is drawn on the grid of units and each unit covers unit x unit patches."""
    cfg = cfg.at_grid(grid)
    if cfg.unit > 1:
        cfg.check_grid(grid)
        # a block's smallest size is counted in patches: in units, a unit^2-th of it
        per_unit = dataclasses.replace(cfg, unit=1, min_block_patches=math.ceil(cfg.min_block_patches / cfg.unit**2))
        coarse = make_masks(per_unit, batch_size, grid // cfg.unit, generator, exact_count)
        side = grid // cfg.unit
        return (coarse.view(batch_size, side, 1, side, 1)
                .expand(batch_size, side, cfg.unit, side, cfg.unit).reshape(batch_size, grid * grid))
    if cfg.strategy == "random":
        return random_mask(batch_size, grid, cfg.ratio, generator)
    if cfg.strategy == "block":
        mask = block_mask(batch_size, grid, cfg.ratio, generator, cfg.min_block_patches, cfg.min_aspect)
        return top_up(mask, round(cfg.ratio * grid * grid), generator) if exact_count else mask
    return grid_mask(batch_size, grid, cfg.ratio, generator)


def random_mask(batch_size: int, grid: int, ratio: float, generator: torch.Generator) -> Tensor:
    """The round(ratio * N) patches of lowest noise: `top_up` of an empty mask."""
    empty = torch.zeros(batch_size, grid * grid, dtype=torch.bool)
    return top_up(empty, round(ratio * grid * grid), generator)


def block_mask(batch_size: int, grid: int, ratio: float, generator: torch.Generator,
               min_block_patches: int = 16, min_aspect: float = 0.3) -> Tensor:
    """BEiT's blockwise masking. Each image gets between target - min_block and target masked
    patches (a block is only placed if it adds no more than what is still missing)."""
    target = round(ratio * grid * grid)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    masks = np.zeros((batch_size, grid, grid), dtype=bool)
    for mask in masks:
        count = 0
        while count < target:
            missing = target - count
            added = 0
            for _attempt in range(10):
                area = rng.uniform(min(min_block_patches, missing), missing)
                aspect = math.exp(rng.uniform(*log_aspect))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if not (0 < h <= grid and 0 < w <= grid):
                    continue
                top = rng.integers(0, grid - h + 1)
                left = rng.integers(0, grid - w + 1)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= missing:
                    block[:] = True
                    added = new
                    break
            if added == 0:
                break
            count += added
    return torch.from_numpy(masks.reshape(batch_size, grid * grid))


def top_up(mask: Tensor, target: int, generator: torch.Generator) -> Tensor:
    """Mask random visible patches of every image that hides fewer than `target` patches
    (blockwise masking stops up to one block short), so that each hides exactly `target`:
    the visible patches of lowest uniform noise."""
    missing = target - mask.sum(dim=1, keepdim=True)
    noise = torch.rand(mask.shape, generator=generator).masked_fill(mask, 2.0)  # masked ones rank last
    ranks = noise.argsort(dim=1).argsort(dim=1)       # rank of each patch's noise
    return mask | (ranks < missing)


def block_mask_per_image(batch_size: int, grid: int, ratio_range: tuple[float, float], fraction: float,
                         generator: torch.Generator, min_block_patches: int = 16,
                         min_aspect: float = 0.3) -> Tensor:
    """iBOT's masking: round(fraction * batch_size) images, chosen at random, get a blockwise
    mask whose ratio is drawn per image uniformly from `ratio_range`; the others stay unmasked."""
    low, high = ratio_range
    masks = torch.zeros(batch_size, grid * grid, dtype=torch.bool)
    num_masked_images = round(fraction * batch_size)
    chosen = torch.randperm(batch_size, generator=generator)[:num_masked_images]
    ratios = low + (high - low) * torch.rand(num_masked_images, generator=generator, dtype=torch.float64)
    for image, ratio in zip(chosen.tolist(), ratios.tolist()):
        masks[image] = block_mask(1, grid, ratio, generator, min_block_patches, min_aspect)[0]
    return masks


def grid_stride(ratio: float) -> int:
    stride = round(1 / math.sqrt(1 - ratio))
    if stride < 2 or abs((1 - 1 / stride**2) - ratio) > 0.02:
        valid = ", ".join(f"{1 - 1 / s**2:.4g}" for s in (2, 3, 4))
        raise ConfigError(f"grid masking keeps one patch per s x s cell, so its ratio must be "
                          f"1 - 1/s^2; got {ratio}, valid: {valid}")
    return stride


def grid_mask(batch_size: int, grid: int, ratio: float, generator: torch.Generator) -> Tensor:
    stride = grid_stride(ratio)
    offsets = torch.randint(0, stride, (batch_size, 2), generator=generator)
    rows = torch.arange(grid).view(1, grid, 1)
    cols = torch.arange(grid).view(1, 1, grid)
    keep = ((rows % stride) == offsets[:, 0, None, None]) & ((cols % stride) == offsets[:, 1, None, None])
    return (~keep).reshape(batch_size, grid * grid)


def visible_indices(mask: Tensor, num_visible: int | None = None) -> Tensor:
    """(B, N) mask with the same count per row -> (B, N_visible) indices of unmasked patches.
    `num_visible`: that count when the caller has it (`Batch.visible`); else it is counted
    here, a host sync on a device mask."""
    if num_visible is None:
        num_visible, most = torch.stack((~mask).sum(dim=1).aminmax()).tolist()   # one host sync
        if num_visible != most:
            raise ValueError(f"masks hide different numbers of patches per image ({num_visible} to "
                             f"{most} visible); draw them with make_masks(..., exact_count=True)")
    # stable sort puts False (visible) first, in raster order
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    return order[:, :num_visible]
