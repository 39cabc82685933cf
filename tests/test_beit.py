"""BEiT: the dVAE tokenizer (stage 1), masked visual-token prediction (stage 2), and the
runner training one tokenizer for every BEiT run that asks for it."""
import json

import pytest
import torch

from conftest import micro_overrides
from core.config import ConfigError
from methods import build_method
from methods.base import Batch, Horizon
from methods.dvae import TOKENIZER_FILE, load_tokenizer, save_tokenizer
from methods.vit import ViT, ViTConfig
from runs.execute import RunOptions, execute
from runs.identity import Run, RunSpec, data_descriptor, resolve
from runs.records import read_record
from suites.profiles import get_profile

MICRO_TOKENIZER = {"vocab_size": 64, "hidden_dim": 8}

QUIET = RunOptions(progress=False)


def micro_dvae(img_size=16, patch_size=4):
    torch.manual_seed(0)
    return build_method("dvae", encoder={"img_size": img_size, "patch_size": patch_size},
                        tokenizer=MICRO_TOKENIZER)


def images(batch_size=8, img_size=16, seed=0):
    return torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def test_gumbel_relaxation_gives_gradients_to_every_tokenizer_encoder_layer():
    dvae = micro_dvae()
    loss, metrics = dvae(Batch(images()))
    loss.backward()
    weights = [p for name, p in dvae.encoder.named_parameters() if name.endswith("weight")]
    assert weights and all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)
    assert metrics["temperature"].item() == pytest.approx(1.0)


def test_temperature_anneals_from_start_to_end_and_travels_in_the_checkpoint():
    dvae = micro_dvae()
    temperatures = []
    for step in range(10):
        dvae.after_step(step, Horizon(10))
        temperatures.append(dvae.temperature.item())
    assert all(a > b for a, b in zip(temperatures, temperatures[1:]))
    assert temperatures[-1] == pytest.approx(1 / 16)
    assert dvae.state_dict()["temperature"].item() == pytest.approx(1 / 16)


def test_tokens_of_a_fixed_image_are_deterministic_in_eval_mode():
    dvae = micro_dvae().eval()
    x = images()
    first = dvae.tokenize(x)
    torch.manual_seed(123)                              # another RNG state: no sampling in tokenize
    dvae(Batch(x))                                      # a Gumbel-sampling forward in between
    assert torch.equal(dvae.tokenize(x), first)
    assert torch.equal(dvae.tokenize(x[:3]), first[:3])  # an image's tokens do not depend on its batch
    assert first.dtype == torch.long and first.min() >= 0 and first.max() < 64


@pytest.mark.parametrize("img_size,patch_size", [(16, 4), (32, 8), (28, 14), (32, 16)])
def test_token_grid_matches_the_vit_patch_grid_at_any_input_size(img_size, patch_size):
    dvae = micro_dvae(img_size, patch_size).eval()
    vit = ViT(ViTConfig(size="micro", img_size=img_size, patch_size=patch_size))
    for size in (img_size, 2 * img_size):               # larger images: the ViT interpolates positions
        x = images(2, size)
        tokens = dvae.tokenize(x)
        assert tokens.shape == vit.patch_embed(x).shape[:2]
        assert dvae.decode(tokens).shape == x.shape


def test_beit_loss_counts_masked_positions_only():
    torch.manual_seed(0)
    beit = build_method("beit", **micro_overrides(tokenizer=MICRO_TOKENIZER)).eval()
    gen = torch.Generator().manual_seed(0)
    batch = Batch(images(16), beit.draw_masks(16, gen))
    assert 0 < batch.mask.sum() < batch.mask.numel()
    tokens = beit.tokenizer.tokenize(batch.images)
    loss, metrics = beit(batch)
    assert "token_accuracy" in metrics
    assert beit.reconstruct(batch).shape == batch.images.shape     # tokens decoded for the figures

    def loss_with_targets(targets):
        beit.tokenizer.tokenize = lambda _images: targets
        try:
            return beit(batch)[0].item()
        finally:
            del beit.tokenizer.tokenize

    unmasked_changed = torch.where(batch.mask, tokens, (tokens + 1) % 64)
    assert loss_with_targets(unmasked_changed) == loss.item()
    masked_changed = torch.where(batch.mask, (tokens + 1) % 64, tokens)
    assert loss_with_targets(masked_changed) != pytest.approx(loss.item())


def test_beit_defaults_to_blockwise_masking_at_forty_percent_and_freezes_its_tokenizer():
    beit = build_method("beit", **micro_overrides(tokenizer=MICRO_TOKENIZER))
    assert (beit.cfg.mask.strategy, beit.cfg.mask.ratio) == ("block", 0.4)
    assert not any(p.requires_grad for p in beit.tokenizer.parameters())
    assert beit.head.out_features == 64


def test_beit_takes_a_users_tokenizer_checkpoint_and_names_a_bad_one(tmp_path):
    dvae = micro_dvae()
    save_tokenizer(dvae, tmp_path / TOKENIZER_FILE)
    beit = build_method("beit", **micro_overrides(tokenizer_path=str(tmp_path / TOKENIZER_FILE)))
    assert type(beit).prerequisites(beit.cfg) == {}
    x = images()
    assert torch.equal(beit.tokenizer.tokenize(x), dvae.eval().tokenize(x))
    with pytest.raises(ConfigError, match="not found; pass the tokenizer.safetensors of a dvae run"):
        build_method("beit", **micro_overrides(tokenizer_path=str(tmp_path / "missing.safetensors")))
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(ConfigError, match="is not a safetensors file"):
        build_method("beit", **micro_overrides(tokenizer_path=str(tmp_path / "notes.txt")))
    save_tokenizer(micro_dvae(16, 8), tmp_path / "patch8.safetensors")
    with pytest.raises(ConfigError, match="one token per 8px patch .* the ViT uses 4px patches"):
        build_method("beit", **micro_overrides(tokenizer_path=str(tmp_path / "patch8.safetensors")))
    with pytest.raises(ConfigError, match="unknown config field 'target'"):   # removed: the pixel method
        build_method("beit", target="pixels")


def test_a_smoke_tokenizer_is_trained_once_and_reused_by_a_second_beit_run(tmp_path):
    profile = get_profile("smoke")
    data = data_descriptor(profile, None)
    # the tokenizer's settings are the profile's (Profile.method_defaults["beit"])
    specs = [RunSpec("beit", strategy, {"mask": {"strategy": strategy}}) for strategy in ("block", "random")]
    configs = [resolve(spec, profile, seed=0, data=data) for spec in specs]
    # every BEiT cell and seed asks for the same tokenizer run
    assert configs[0].requires == configs[1].requires == resolve(specs[0], profile, 1, data).requires
    tokenizer_dir = configs[0].requires["tokenizer"].config.folder(tmp_path)

    first = execute(Run(specs[0], 0, configs[0]), profile, tmp_path, QUIET)
    tokenizer_file = tokenizer_dir / TOKENIZER_FILE
    stamps = {p: p.stat().st_mtime_ns for p in (tokenizer_file, tokenizer_dir / "result.json")}
    second = execute(Run(specs[1], 0, configs[1]), profile, tmp_path, QUIET)

    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert [r.split("-")[0] for r in runs] == ["beit", "beit", "dvae"]
    assert first.prerequisites == second.prerequisites == {"tokenizer": tokenizer_dir.name}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "the tokenizer was trained again"
    record = read_record(tokenizer_dir)
    assert record.done and record.train["steps"] == 20
    for name in ("tokenizer_psnr", "tokenizer_codebook_usage", "tokenizer_perplexity", "tokenizer_recon_mse"):
        assert record.metrics[name] > 0
    # stage 2 trained against the stage-1 weights, not a fresh random tokenizer
    trained = load_tokenizer(tokenizer_file).state_dict()
    for config in configs:
        checkpoint = sorted((config.folder(tmp_path) / "checkpoints").glob("ckpt-*.pt"))[-1]
        model = torch.load(checkpoint, weights_only=True)["model"]
        assert all(torch.equal(model[f"tokenizer.{k}"], v) for k, v in trained.items())
