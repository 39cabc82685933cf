"""Frozen-feature extraction (eval.features): the features are the encoder's own, and the bf16
option moves k-NN top-1 on real CIFAR-10 images by at most one test image."""
import os

import pytest
import torch
from torch import nn

from conftest import SHARED_CIFAR10
from core.config import ConfigError, identity_record
from engine.data import ImageSet, load_splits, normalize
from eval import features, knn
from eval.features import cpu_bf16_flags, extract_features, feature_file
from eval.linear import LinearConfig
from eval.registry import EvalContext
from methods.vit import ViT, ViTConfig

needs_bf16 = pytest.mark.skipif(not cpu_bf16_flags(), reason="this CPU has no bf16 matmuls (avx512_bf16 / AMX)")
needs_cifar10 = pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="../shared/datasets/cifar10 not present")


def random_images(n: int, size: int = 16) -> ImageSet:
    gen = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen),
                    torch.randint(0, 10, (n,), generator=gen), [str(c) for c in range(10)])


def cifar10_subset(root, train_per_class: int, test_per_class: int):
    """The first images of each class of the shared CIFAR-10, as an ImageFolder of links, loaded
    as a run loads its data (100 train images held out)."""
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for cls in sorted(os.listdir(SHARED_CIFAR10 / split)):
            (root / split / cls).mkdir(parents=True)
            for name in sorted(os.listdir(SHARED_CIFAR10 / split / cls))[:per_class]:
                (root / split / cls / name).symlink_to(SHARED_CIFAR10 / split / cls / name)
    return load_splits(root, 32, holdout=100, progress=False)


def test_features_are_the_encoders_pooled_tokens_and_the_encoder_is_left_as_it_was():
    vit = ViT(ViTConfig(size="micro", img_size=16, patch_size=4)).train()
    data = random_images(21)
    feats = extract_features(vit, data, batch_size=8, progress=False)         # 8 + 8 + 5
    assert vit.training and all(type(block.mlp.act) is nn.GELU for block in vit.blocks)
    with torch.inference_mode():
        tokens = vit.eval()(normalize(data.images))                           # (21, 1+16, 32)
    # the in-place GELU changes where the MLP writes, not a bit of what it computes
    assert torch.equal(feats["cls"], tokens[:, 0])
    assert torch.equal(feats["mean"], tokens[:, 1:].mean(dim=1))
    assert torch.equal(feats["labels"], data.labels)


def test_bf16_features_go_beside_fp32s_and_fp32_evaluations_keep_their_config_names():
    assert feature_file("f", "train").name == "train.safetensors"
    assert feature_file("f", "train", 9).name == "train-block9.safetensors"
    assert feature_file("f", "train", precision="bf16").name == "train-bf16.safetensors"
    assert feature_file("f", "test", 9, "bf16").name == "test-block9-bf16.safetensors"
    for config_cls in (knn.KNNConfig, LinearConfig):
        assert "feature_precision" not in identity_record(config_cls())
        assert identity_record(config_cls(feature_precision="bf16"))["feature_precision"] == "bf16"


def test_an_unknown_precision_or_bf16_on_a_cpu_without_bf16_matmuls_is_refused(monkeypatch):
    vit = ViT(ViTConfig(size="micro", img_size=16, patch_size=4))
    with pytest.raises(ConfigError, match="feature precision 'fp16' unknown; known: fp32, bf16"):
        extract_features(vit, random_images(4), progress=False, precision="fp16")
    monkeypatch.setattr(features, "cpu_bf16_flags", lambda: [])
    with pytest.raises(ConfigError, match="avx512_bf16 or AMX"):
        extract_features(vit, random_images(4), progress=False, precision="bf16")
    if not torch.cuda.is_available():      # before any training, from the evaluation's config
        with pytest.raises(ConfigError, match="avx512_bf16 or AMX"):
            knn.check_inputs(knn.KNNConfig(feature_precision="bf16"))


def test_the_cpus_bf16_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert cpu_bf16_flags(cpuinfo) == ["avx512_bf16", "amx_bf16"]
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert cpu_bf16_flags(cpuinfo) == []
    assert cpu_bf16_flags(tmp_path / "absent") == []


@pytest.fixture
def one_thread():
    """One torch thread for the test: two threads on cores other processes share ran this
    extraction 6x slower (OpenMP threads waiting on each other), one runs it in seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_bf16
@needs_cifar10
def test_bf16_knn_top1_is_within_one_test_image_of_fp32_on_real_cifar10(tmp_path, one_thread):
    """The cpu profile's encoder (nano, 32 px, seeded random init) on 1,000 train and 500 test
    images, both precisions through the k-NN evaluation into one feature folder. (On all of
    CIFAR-10 [CLS] moves more: eval.features.PRECISIONS has the figures.)"""
    splits = cifar10_subset(tmp_path / "cifar10", train_per_class=100, test_per_class=50)
    torch.manual_seed(0)
    vit = ViT(ViTConfig(size="nano", img_size=32, patch_size=4))
    ctx = EvalContext(work_dir=tmp_path / "work", features_dir=tmp_path / "features", progress=False,
                      feature_batch=64)
    top1 = {precision: knn.run(vit, splits, knn.KNNConfig(feature_precision=precision), ctx).metrics
            for precision in ("fp32", "bf16")}
    assert sorted(p.name for p in ctx.features_dir.iterdir()) == [
        "test-bf16.safetensors", "test.safetensors", "train-bf16.safetensors", "train.safetensors"]
    one_image = 100 / len(splits.test)
    for metric, fp32 in top1["fp32"].items():
        assert fp32 > 15, metric                    # features of real images, above chance (10%)
        assert abs(top1["bf16"][metric] - fp32) <= one_image + 1e-9, (metric, top1)
