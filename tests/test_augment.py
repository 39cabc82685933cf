import math

import kornia
import pytest
import torch
from torchvision.transforms import functional as TF

from core.config import ConfigError
from engine.augment import DRAWS, Photometric, beit_view, dino_views, photometric, shift_hue
from engine.views import view_augmentations
from methods.base import AUGMENTATIONS

DINO_JITTER = dict(jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def pixels(batch=6, size=16, seed=0):
    return torch.rand(batch, 3, size, size, generator=gen(seed + 100))


def draws_of(generator, batch):
    """The uniforms `photometric` will draw next from `generator`, without advancing it."""
    clone = torch.Generator()
    clone.set_state(generator.get_state())
    return torch.rand(batch, len(DRAWS), generator=clone)


def test_two_identical_images_in_one_batch_get_different_jitter():
    images = pixels(1).expand(4, -1, -1, -1).contiguous()
    out = photometric(images, Photometric(**DINO_JITTER), gen())
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(out[i], out[j])


def test_without_jitter_probability_the_images_come_back_unchanged_and_nothing_is_drawn():
    images, g = pixels(), gen()
    state = g.get_state()
    spec = Photometric(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)      # jitter_p 0
    assert not spec.active
    assert photometric(images, spec, g) is images
    assert torch.equal(g.get_state(), state)


def test_jitter_probability_picks_the_images_from_the_first_draw():
    images, g = pixels(32), gen(3)
    jittered = draws_of(g, 32)[:, DRAWS.index("jitter")] < 0.5
    out = photometric(images, Photometric(jitter_p=0.5, brightness=0.4), g)
    changed = (out != images).flatten(1).any(1)
    assert torch.equal(changed, jittered) and 0 < jittered.sum() < 32


@pytest.mark.parametrize("spec", [*dino_views(1), beit_view()], ids=["global1", "global2", "local", "beit"])
def test_the_same_generator_seed_gives_bit_identical_views_and_another_seed_others(spec):
    images = pixels(16)
    first = photometric(images, spec, gen(7))
    assert torch.equal(first, photometric(images, spec, gen(7)))
    assert not torch.equal(first, photometric(images, spec, gen(8)))


def test_the_global_rng_is_never_touched():
    state = torch.random.get_rng_state()
    for spec in (*dino_views(2), beit_view()):
        photometric(pixels(8), spec, gen())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_every_spec_draws_the_same_amount_so_one_view_never_shifts_the_next():
    after = []
    for spec in (*dino_views(1), beit_view(), Photometric(solarize_p=0.5)):
        g = gen(5)
        photometric(pixels(8), spec, g)
        after.append(g.get_state())
    assert all(torch.equal(state, after[0]) for state in after)


@pytest.mark.parametrize("size", [12, 32, 224])
def test_views_keep_shape_and_dtype_in_the_unit_range_and_leave_the_input_alone(size):
    images = pixels(8, size)
    images[0], images[1] = 0.0, 1.0          # black and white images: the clamps and the blur's rounding
    before = images.clone()
    for spec in (*dino_views(1), beit_view()):
        out = photometric(images, spec, gen())
        assert out.shape == images.shape and out.dtype == images.dtype
        assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(images, before)


def test_grayscale_gives_three_equal_luma_channels():
    images = pixels()
    out = photometric(images, Photometric(grayscale_p=1.0), gen())
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    for channel in range(3):
        torch.testing.assert_close(out[:, channel], luma)


def test_solarize_inverts_exactly_the_pixels_at_or_above_one_half():
    images = pixels()
    images[0, 0, 0, :3] = torch.tensor([0.5, 128 / 255, 127 / 255])
    out = photometric(images, Photometric(solarize_p=1.0), gen())
    assert torch.equal(out, torch.where(images >= 0.5, 1 - images, images))
    # PIL's threshold 128 of 255: 128 inverted, 127 kept (0.5 itself is its own inverse)
    assert out[0, 0, 0, :3].tolist() == pytest.approx([0.5, 127 / 255, 127 / 255], abs=1e-7)


@pytest.mark.parametrize("strength,low", [(0.4, 0.6), (1.5, 0.0)])     # torchvision: max(0, 1 - s)
def test_brightness_factor_is_drawn_in_one_minus_to_one_plus_the_strength(strength, low):
    images, g = pixels(4), gen(11)
    uniform = draws_of(g, 4)[:, DRAWS.index("brightness")]
    out = photometric(images, Photometric(jitter_p=1.0, brightness=strength), g)
    for i in range(4):
        factor = low + (1 + strength - low) * uniform[i].item()
        torch.testing.assert_close(out[i], (images[i] * factor).clamp(0, 1))


def test_colour_jitter_matches_torchvision_in_each_images_own_random_order():
    images, g = pixels(12), gen(2)
    u = draws_of(g, 12)
    out = photometric(images, Photometric(jitter_p=0.75, brightness=0.4, contrast=0.4, saturation=0.3, hue=0.1), g)
    column = {name: u[:, j] for j, name in enumerate(DRAWS)}
    orders = {tuple(order) for order in u[:, 5:9].argsort(dim=1).tolist()}
    assert len(orders) > 3                       # the images really get different orders
    for i in range(12):
        expected = images[i]
        if column["jitter"][i] < 0.75:
            ops = (lambda x: TF.adjust_brightness(x, 0.6 + 0.8 * column["brightness"][i].item()),
                   lambda x: TF.adjust_contrast(x, 0.6 + 0.8 * column["contrast"][i].item()),
                   lambda x: TF.adjust_saturation(x, 0.7 + 0.6 * column["saturation"][i].item()),
                   lambda x: TF.adjust_hue(x, 0.1 * (2 * column["hue"][i].item() - 1)))
            for op in u[i, 5:9].argsort().tolist():
                expected = ops[op](expected)
        # kornia's luma weights are 0.299 where torchvision's are 0.2989
        torch.testing.assert_close(out[i], expected, atol=1e-3, rtol=0)


def test_shift_hue_is_kornias_adjust_hue_in_turns():
    images = pixels(8)
    images[0] = images[0, :1]                    # gray: no hue
    images[1, 1] = images[1, 0]                  # two channels tie for the max
    images[2] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    turns = torch.tensor([0.5, -0.5, 0.25, 0.1, -0.1, 0.0, 0.33, -0.49])
    expected = kornia.enhance.adjust_hue(images, turns * 2 * math.pi)
    torch.testing.assert_close(shift_hue(images, turns), expected, atol=1e-5, rtol=0)


def test_blur_sigma_scales_with_the_image_and_matches_kornias_gaussian_blur():
    spec = Photometric(blur_p=1.0)
    assert spec.blur_kernel(224) == (0.1, 2.0, 13)
    low, high, kernel = spec.blur_kernel(32)
    assert (low, high, kernel) == pytest.approx((0.1 / 7, 2.0 / 7, 3)) and kernel == 3
    images, g = pixels(4, 32), gen(4)
    sigma = low + (high - low) * draws_of(g, 4)[:, DRAWS.index("blur_sigma")]
    expected = kornia.filters.gaussian_blur2d(images, 3, sigma[:, None].expand(-1, 2))
    torch.testing.assert_close(photometric(images, spec, g), expected.clamp(0, 1))
    white = torch.ones(64, 3, 32, 32)           # a normalised kernel's sum rounds past 1 for some sigmas
    assert photometric(white, Photometric(blur_p=1.0, blur_sigma=(1.0, 20.0)), gen()).max() <= 1


@pytest.mark.parametrize("field,value,message", [
    ("brightness", -0.1, "brightness"), ("saturation", -1.0, "saturation"), ("hue", 0.6, "hue"),
    ("jitter_p", 1.5, "jitter_p"), ("blur_p", -0.1, "blur_p"), ("solarize_p", 2.0, "solarize_p"),
    ("blur_sigma", (2.0, 0.1), "blur_sigma"), ("blur_sigma", (0.0, 1.0), "blur_sigma")])
def test_validate_names_the_field_out_of_range(field, value, message):
    with pytest.raises(ConfigError, match=message):
        Photometric(**{field: value}).validate()


def test_dino_and_beit_presets_hold_the_papers_values():
    views = dino_views(2)
    assert len(views) == 4 and dino_views(0) == views[:2]
    for view in views:
        view.validate()
        assert (view.jitter_p, view.brightness, view.contrast, view.saturation, view.hue) == (0.8, 0.4, 0.4, 0.2, 0.1)
        assert view.grayscale_p == 0.2
    assert (views[0].blur_p, views[0].solarize_p) == (1.0, 0.0)
    assert (views[1].blur_p, views[1].solarize_p) == (0.1, 0.2)
    assert all(view.blur_p == 0.5 and view.solarize_p == 0 for view in views[2:])
    assert views[2].blur_kernel(96)[:2] == pytest.approx((0.1, 2.0))    # DINO's radius at its 96 px crops
    beit = beit_view()
    beit.validate()
    assert (beit.jitter_p, beit.brightness, beit.contrast, beit.saturation, beit.hue) == (1.0, 0.4, 0.4, 0.4, 0.0)
    assert beit.grayscale_p == beit.blur_p == beit.solarize_p == 0


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_every_augmentation_a_config_may_name_maps_to_its_views(name):
    views = view_augmentations(name, num_views=4, num_global=2)      # iBOT's shape: 2 global + 2 local
    assert len(views) == 4
    assert all(view is None for view in views) == (name == "none")
    with pytest.raises(ConfigError, match="unknown augmentation 'jitter'; known: none, beit, dino"):
        view_augmentations("jitter", 1, 1)
