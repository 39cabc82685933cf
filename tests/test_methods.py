"""Every method of the project: finite loss, the loss falls by 10% in 12 steps on a fixed batch,
gradients reach the encoder. Parametrised over the registry, so a new method of the project is
tested when it is registered; a method from outside (a plugin, runs.plugins) is held to none of
these rules (tests/test_plugins.py runs the README's through the command line)."""
import runpy
import sys
from pathlib import Path

import pytest
import torch

from conftest import micro_overrides
from core.config import ConfigError, UnknownNameError
from methods import build_method, registry
from methods.base import Batch, Horizon, MIMMethod
from methods.registry import from_project, register_method

# the project's MIM methods only: BEiT's dVAE tokenizer (`dvae`) is registered to be trained
# like one but has no ViT (tests/test_beit.py tests it); a plugin's method is its author's to test
TRAINING_METHODS = sorted(name for name, (cls, _) in registry.items()
                          if cls.trains and issubclass(cls, MIMMethod) and from_project(name))


def fixed_batch(method, batch_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    enc = method.cfg.encoder
    views = [torch.randn(batch_size, 3, enc.img_size, enc.img_size, generator=gen)
             for _ in range(method.num_views)]
    return Batch.of_views(views, method.draw_masks(batch_size, gen))     # as the trainer makes it


@pytest.mark.parametrize("name", TRAINING_METHODS)
def test_the_host_counted_mask_gives_the_loss_and_gradients_of_boolean_indexing(name):
    """Batch.visible / Batch.masked (found on the host, no device sync) change no number."""
    torch.manual_seed(0)
    method = build_method(name, **micro_overrides())
    whole = fixed_batch(method)
    # also rank 1's half of a global batch, as the trainer slices it under torchrun
    half = Batch.of_views([v[8:] for v in whole.views or [whole.images]], whole.mask[..., 8:, :])
    for batch in (whole, half):
        assert batch.masked is not None
        plain = Batch(images=batch.images, mask=batch.mask, views=batch.views)     # counted on the device
        check_the_same_loss_and_gradients(method, batch, plain)


def check_the_same_loss_and_gradients(method, batch, plain):
    results = []
    for b in (batch, plain):
        torch.manual_seed(1)
        method.zero_grad()
        loss, _ = method(b)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])


def test_registry_lists_the_foundation_methods():
    assert {"mae", "none", "pixel"} <= set(registry)


@pytest.mark.parametrize("name", TRAINING_METHODS)
def test_loss_is_finite_falls_on_a_fixed_batch_and_reaches_the_encoder(name):
    torch.manual_seed(0)
    method = build_method(name, **micro_overrides())
    losses, first_grads = train_on_a_fixed_batch(method)
    grads = [g for g in first_grads.values() if g is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "no gradient reached the encoder"
    assert losses[-1] < 0.9 * losses[0], losses


def train_on_a_fixed_batch(method, steps: int = 12) -> tuple[list[float], dict]:
    """`steps` AdamW steps of `method` on one fixed batch: the losses (each finite, logged as
    "loss") and the encoder blocks' gradients of the first step, by parameter name."""
    batch = fixed_batch(method)
    optimizer = torch.optim.AdamW(method.parameters(), lr=3e-3)
    losses, first_grads = [], {}
    for step in range(steps):
        loss, metrics = method(batch)
        assert torch.isfinite(loss) and "loss" in metrics
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            first_grads = {name: None if p.grad is None else p.grad.clone()
                           for name, p in method.encoder.blocks.named_parameters()}
        optimizer.step()
        method.after_step(step, Horizon(steps))
        losses.append(loss.item())
    return losses, first_grads


def test_mae_loss_is_zero_for_a_perfect_prediction_and_counts_masked_patches_only():
    method = build_method("mae", **micro_overrides())
    batch = fixed_batch(method)
    from methods.base import patch_targets
    target = patch_targets(batch.images, 4, normalize=True)
    assert method.forward_loss(batch.images, target, batch.mask).item() == pytest.approx(0, abs=1e-6)
    wrong_where_visible = target.clone()
    wrong_where_visible[~batch.mask] += 5.0
    assert method.forward_loss(batch.images, wrong_where_visible, batch.mask).item() == pytest.approx(0, abs=1e-6)


def test_mae_encoder_sees_only_the_visible_patches():
    method = build_method("mae", **micro_overrides(mask={"ratio": 0.75}))
    batch = fixed_batch(method)
    seen = {}

    def record(module, inputs, output):
        seen["shape"] = output.shape

    method.encoder.blocks[0].register_forward_hook(record)
    method(batch)
    assert seen["shape"] == (16, 1 + 4, 32)   # [CLS] + 25% of a 4x4 grid


def test_pixel_loss_ignores_the_pixels_of_visible_patches_in_its_target():
    method = build_method("pixel", **micro_overrides()).eval()
    batch = fixed_batch(method)
    loss, _ = method(batch)
    # changing the image only inside masked patches changes the target, so the loss
    images = batch.images.clone()
    from methods.vit import patchify, unpatchify
    patches = patchify(images, 4)
    patches[batch.mask] += 1.0
    changed, _ = method(Batch(unpatchify(patches, 4), batch.mask))
    assert changed.item() != pytest.approx(loss.item())


def test_none_baseline_does_not_train():
    method = build_method("none", **micro_overrides())
    assert method.trains is False and method.mask_config is None


def test_unknown_and_duplicate_names_raise_with_the_known_names():
    with pytest.raises(UnknownNameError, match="unknown method 'maee'; known: .*mae.*none.*pixel"):
        build_method("maee")
    with pytest.raises(ValueError, match="already registered"):
        register_method("mae", registry["mae"][1])(type("Again", (), {}))


def test_config_overrides_are_type_and_range_checked():
    with pytest.raises(ConfigError, match="mask ratio 1.5 must be in"):
        build_method("mae", mask={"ratio": 1.5})
    with pytest.raises(ConfigError, match="patch_size 5 must divide img_size 32"):
        build_method("mae", encoder={"patch_size": 5})
    with pytest.raises(ConfigError, match="decoder_depth"):
        build_method("mae", decoder_depth=0)
    with pytest.raises(ConfigError, match="must be int"):
        build_method("mae", decoder_depth="two")
    with pytest.raises(ConfigError, match="unknown config field 'ratio'"):
        build_method("mae", ratio=0.5)


@pytest.mark.parametrize("strategy,ratio", [("block", 0.75), ("block", 0.5), ("grid", 0.75)])
def test_mae_takes_block_and_grid_masks_with_one_count_per_batch(strategy, ratio):
    overrides = micro_overrides(mask={"strategy": strategy, "ratio": ratio})
    method = build_method("mae", **{**overrides, "encoder": {**overrides["encoder"], "img_size": 32}})
    batch = fixed_batch(method, batch_size=64)
    assert (batch.mask.sum(1) == round(ratio * 64)).all()
    seen = {}
    method.encoder.blocks[0].register_forward_hook(lambda m, i, out: seen.update(shape=out.shape))
    loss, _ = method(batch)
    assert torch.isfinite(loss) and seen["shape"] == (64, 1 + round((1 - ratio) * 64), 32)


def readme_snippet(section: str) -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return readme.split(f"## {section}")[1].split("```python")[1].split("```")[0]


def test_readme_add_a_method_file_registers_a_method_whose_loss_falls(monkeypatch, tmp_path):
    """The README's file as it stands, from a folder outside the package (tests/test_plugins.py
    runs it through the command line)."""
    module = sys.modules["methods.registry"]    # (the package's `registry` attribute is the dict)
    # a registry of its own: other tests do not see "mymethod", and it registers where a plugin
    # registered it for the whole process too
    monkeypatch.setattr(module, "registry", {k: v for k, v in registry.items() if k != "mymethod"})
    (tmp_path / "my_method.py").write_text(readme_snippet("Adding a method"))
    runpy.run_path(str(tmp_path / "my_method.py"))
    assert "mymethod" in module.registry
    method = module.build_method("mymethod", **micro_overrides())
    losses, first_grads = train_on_a_fixed_batch(method)
    assert first_grads["0.attn.qkv.weight"].abs().sum() > 0
    assert losses[-1] < 0.9 * losses[0], losses


def test_readme_add_a_suite_snippet_gives_a_description_and_a_grid_with_the_baseline():
    namespace = {}
    exec(readme_snippet("Adding a suite"), namespace)
    assert namespace["DESCRIPTION"]
    methods_in_grid = [spec.method for spec in namespace["grid"](None)]
    assert methods_in_grid[0] == "none" and set(methods_in_grid) <= set(registry)
