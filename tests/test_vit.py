import timm
import torch

from methods.masking import random_mask, visible_indices
from methods.vit import ViT, ViTConfig, load_encoder, patchify, save_encoder, unpatchify


def test_exported_encoder_loads_into_timm_and_gives_the_same_features(tmp_path):
    cfg = ViTConfig(size="micro", img_size=16, patch_size=4)
    vit = ViT(cfg).eval()
    path = tmp_path / "encoder.safetensors"
    save_encoder(vit, path)

    from safetensors.torch import load_file
    model = timm.models.vision_transformer.VisionTransformer(**cfg.timm_kwargs()).eval()
    model.load_state_dict(load_file(str(path)), strict=True)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(images), vit(images), atol=1e-5)
        assert torch.allclose(model(images), vit.features(images, "cls"), atol=1e-5)

    reloaded = load_encoder(path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(images), vit(images))


def test_exported_encoder_loads_through_timm_create_model(tmp_path):
    cfg = ViTConfig(size="tiny", img_size=32, patch_size=4)
    vit = ViT(cfg).eval()
    path = tmp_path / "encoder.safetensors"
    save_encoder(vit, path)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0,
                              img_size=32, patch_size=4,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=0)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(images), vit.features(images, "cls"), atol=1e-5)


def test_visible_only_input_equals_gathering_the_full_embedding():
    vit = ViT(ViTConfig(size="micro", img_size=16, patch_size=4)).eval()
    images = torch.randn(2, 3, 16, 16)
    mask = random_mask(2, 4, 0.75, torch.Generator().manual_seed(0))
    idx = visible_indices(mask)
    full = vit.embed(images)
    kept = vit.embed(images, idx_keep=idx)
    assert kept.shape == (2, 1 + 4, 32)
    assert torch.equal(kept[:, 1:], torch.gather(full[:, 1:], 1, idx[..., None].expand(-1, -1, 32)))


def test_mask_swaps_patch_embeddings_for_the_mask_token_only_where_masked():
    vit = ViT(ViTConfig(size="micro", img_size=16, patch_size=4)).eval()
    images = torch.randn(2, 3, 16, 16)
    mask = random_mask(2, 4, 0.5, torch.Generator().manual_seed(1))
    plain, masked = vit.embed(images), vit.embed(images, mask=mask)
    pos = vit.pos_embed[:, 1:].expand(2, -1, -1)
    assert torch.equal(masked[:, 1:][~mask], plain[:, 1:][~mask])
    assert torch.allclose(masked[:, 1:][mask], (vit.mask_token + pos)[mask], atol=1e-6)


def test_position_embeddings_interpolate_for_another_input_size():
    vit = ViT(ViTConfig(size="micro", img_size=16, patch_size=4)).eval()
    tokens = vit(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 1 + 64, 32)


def test_named_outputs_have_the_documented_shapes():
    vit = ViT(ViTConfig(size="micro", img_size=16, patch_size=4)).eval()
    images = torch.randn(2, 3, 16, 16)
    assert vit.features(images, "mean").shape == (2, 32)
    outs = vit.block_outputs(images, [0, -1])
    assert [o.shape for o in outs] == [(2, 17, 32)] * 2
    attn = vit.last_attention(images)
    assert attn.shape == (2, 2, 17, 17)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 2, 17), atol=1e-5)
    # the last block output, normed, is the encoder output
    assert torch.allclose(vit.norm(outs[1]), vit(images), atol=1e-6)


def test_patchify_roundtrips():
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(images, 4), 4), images)
