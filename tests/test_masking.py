import numpy as np
import pytest
import torch
from scipy import ndimage

from core.config import ConfigError
from methods.masking import MaskConfig, block_mask, grid_mask, make_masks, random_mask, visible_indices


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.6, 0.75, 0.9])
def test_random_mask_hides_exactly_the_ratio_in_every_image(ratio):
    mask = random_mask(64, 14, ratio, gen())
    assert mask.shape == (64, 196) and mask.dtype == torch.bool
    assert (mask.sum(1) == round(ratio * 196)).all()


def test_random_mask_is_uniform_over_positions():
    mask = random_mask(4000, 8, 0.75, gen())
    per_position = mask.float().mean(0)
    assert per_position.min() > 0.70 and per_position.max() < 0.80


@pytest.mark.parametrize("grid,ratio", [(14, 0.4), (14, 0.6), (8, 0.4), (8, 0.75)])
def test_block_mask_reaches_its_ratio_within_one_block(grid, ratio):
    mask = block_mask(256, grid, ratio, gen())
    target = round(ratio * grid * grid)
    counts = mask.sum(1)
    assert (counts <= target).all()
    assert (counts >= target - 16).all()
    assert counts.float().mean() >= target - 4


def test_block_mask_is_made_of_large_blocks_with_bounded_aspect():
    # BEiT: blocks of >= 16 patches until the target; only the last, topping-up block may be smaller
    in_large, total = 0, 0
    for mask in block_mask(200, 14, 0.4, gen(1)).view(-1, 14, 14).numpy():
        labels, count = ndimage.label(mask)
        sizes = np.bincount(labels.ravel())[1:]
        in_large += sizes[sizes >= 16].sum()
        total += mask.sum()
    assert in_large / total > 0.8

    # a 10% target is about one block: where the block stands alone (its component fills its
    # bounding box), its aspect ratio is in [0.3, 1/0.3], widened for rounding to whole patches
    rectangles = 0
    for mask in block_mask(200, 14, 0.1, gen(2)).view(-1, 14, 14).numpy():
        labels, count = ndimage.label(mask)
        for component in range(1, count + 1):
            rows, cols = np.nonzero(labels == component)
            h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
            if len(rows) >= 14 and h * w == len(rows):
                rectangles += 1
                assert 0.3 / 1.5 <= h / w <= 1.5 / 0.3
    assert rectangles >= 100


def test_block_masks_are_more_clustered_than_random_ones():
    def neighbours(mask):
        m = mask.view(-1, 14, 14).float()
        return ((m[:, 1:] * m[:, :-1]).sum() + (m[:, :, 1:] * m[:, :, :-1]).sum()) / m.sum()
    assert neighbours(block_mask(64, 14, 0.4, gen())) > 1.5 * neighbours(random_mask(64, 14, 0.4, gen()))


def test_grid_mask_keeps_one_patch_per_cell():
    mask = grid_mask(16, 8, 0.75, gen())
    assert (mask.sum(1) == 48).all()
    keep = (~mask).view(16, 8, 8)
    for k in keep:
        rows, cols = torch.nonzero(k, as_tuple=True)
        assert len(set((rows % 2).tolist())) == 1 and len(set((cols % 2).tolist())) == 1


def test_masks_are_reproducible_from_the_seed_and_differ_across_seeds():
    for strategy, ratio in [("random", 0.75), ("block", 0.4), ("grid", 0.75)]:
        cfg = MaskConfig(strategy, ratio)
        a, b = make_masks(cfg, 8, 8, gen(3)), make_masks(cfg, 8, 8, gen(3))
        assert torch.equal(a, b)
        assert not torch.equal(a, make_masks(cfg, 8, 8, gen(4)))


def test_bad_mask_configs_raise_with_the_fix():
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        MaskConfig("random", 1.2).validate()
    with pytest.raises(ConfigError, match="known: random, block, grid"):
        MaskConfig("blocky", 0.5).validate()
    with pytest.raises(ConfigError, match="valid: 0.75"):
        MaskConfig("grid", 0.5).validate()


def test_visible_indices_are_the_unmasked_patches_in_order():
    mask = random_mask(5, 4, 0.5, gen())
    idx = visible_indices(mask)
    for m, i in zip(mask, idx):
        assert torch.equal(i, torch.nonzero(~m).flatten())


def test_exact_count_tops_block_masks_up_to_the_target_keeping_their_blocks():
    cfg = MaskConfig("block", 0.75)
    plain = make_masks(cfg, 256, 8, gen(1))
    exact = make_masks(cfg, 256, 8, gen(1), exact_count=True)
    assert (plain.sum(1) < 48).any(), "no short mask drawn: the test would check nothing"
    assert (exact.sum(1) == 48).all()
    assert (exact | plain).eq(exact).all()          # every block patch stays masked


def test_visible_indices_refuses_masks_with_different_counts():
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :12], mask[1, :10] = True, True
    with pytest.raises(ValueError, match="exact_count=True"):
        visible_indices(mask)


def test_a_batch_counts_its_host_mask_so_mae_gathers_the_same_patches_without_a_sync():
    from methods.base import Batch
    views = [torch.zeros(5, 3, 16, 16)]
    mask = random_mask(5, 4, 0.75, gen())
    batch = Batch.of_views(views, mask, "cpu")
    assert batch.visible == 4
    assert torch.equal(visible_indices(batch.mask, batch.visible), visible_indices(mask))
    uneven = make_masks(MaskConfig("block", 0.75), 64, 8, gen(1))          # block masks differ per image
    assert (uneven.sum(1) != uneven.sum(1)[0]).any()
    assert Batch.of_views(views, uneven).visible is None
    assert Batch.of_views(views).visible is None and Batch.of_views(views).mask is None
