import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_CIFAR10
from engine.data import (DataError, cache_dir, load_imagefolder, load_splits, normalize, random_resized_crop_flip,
                         synthetic_splits)


def write_folder(root, sizes=((40, 30), (32, 32)), mode="RGB"):
    for split in ("train", "test"):
        for label, name in enumerate(["cat", "dog"]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, size in enumerate(sizes):
                colour = (label * 200, 50 + i, 0) if mode == "RGB" else label * 200
                Image.new(mode, size, colour).save(folder / f"{i}.png")


def test_imagefolder_is_decoded_resized_converted_and_cached(tmp_path):
    write_folder(tmp_path / "data", mode="L")
    first = load_imagefolder(tmp_path / "data" / "train", img_size=16)
    assert first.images.shape == (4, 3, 16, 16) and first.images.dtype == torch.uint8
    assert first.labels.tolist() == [0, 0, 1, 1] and first.classes == ["cat", "dog"]
    assert (first.images[2:] == 200).all()          # grayscale value copied to 3 channels
    cached = list((cache_dir() / "datasets").glob("data-train-16px-*.npz"))
    assert len(cached) == 1
    second = load_imagefolder(tmp_path / "data" / "train", img_size=16)
    assert torch.equal(first.images, second.images)
    # another file list is another cache entry
    Image.new("RGB", (32, 32)).save(tmp_path / "data" / "train" / "cat" / "extra.png")
    assert len(load_imagefolder(tmp_path / "data" / "train", img_size=16)) == 5


def test_missing_or_malformed_dataset_folders_give_errors_naming_the_fix(tmp_path):
    with pytest.raises(DataError, match="not found; pass --data PATH"):
        load_splits(tmp_path / "nowhere", 32)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no test/ subfolder"):
        load_splits(tmp_path / "empty", 32)
    (tmp_path / "empty" / "test").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_splits(tmp_path / "empty", 32)


def test_a_corrupt_image_is_named_or_skipped_with_a_count(tmp_path, capsys):
    write_folder(tmp_path / "data")
    (tmp_path / "data" / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot read image .*broken.jpg"):
        load_imagefolder(tmp_path / "data" / "train", 16)
    kept = load_imagefolder(tmp_path / "data" / "train", 16, on_bad_image="skip")
    assert len(kept) == 4
    assert "skipped 1 unreadable" in capsys.readouterr().out


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="../shared/datasets/cifar10 not present")
def test_real_cifar10_test_split_has_the_published_size_and_labels():
    test = load_imagefolder(SHARED_CIFAR10 / "test", 32)
    assert test.images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.classes[0] == "airplane" and test.classes[-1] == "truck"
    assert 80 < test.images.float().mean() < 160        # real photos, not blank


def test_holdout_is_fixed_and_disjoint():
    a, b = synthetic_splits(), synthetic_splits()
    assert torch.equal(a.holdout.images, b.holdout.images)
    assert len(a.fit) + len(a.holdout) == len(a.train)


def test_full_crop_without_flip_is_the_normalised_image():
    images = torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8)
    # scale 1 and ratio 1 make every crop the whole image; find images that were not flipped
    out = random_resized_crop_flip(images, 16, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1))
    reference = normalize(images)
    for o, r in zip(out, reference):
        assert torch.allclose(o, r, atol=1e-4) or torch.allclose(o, r.flip(-1), atol=1e-4)


def test_augmentation_is_seeded_and_varies_crops():
    images = torch.randint(0, 255, (64, 3, 32, 32), dtype=torch.uint8)
    a = random_resized_crop_flip(images, 32, torch.Generator().manual_seed(1))
    b = random_resized_crop_flip(images, 32, torch.Generator().manual_seed(1))
    c = random_resized_crop_flip(images, 32, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (64, 3, 32, 32) and np.isfinite(a.numpy()).all()


def test_train_and_test_with_different_class_folders_fail_naming_them_before_any_decode(tmp_path, monkeypatch,
                                                                                       capsys):
    from engine import shards, splits
    from suites.run import cli

    write_folder(tmp_path / "data")
    (tmp_path / "data" / "test" / "dog").rename(tmp_path / "data" / "test" / "dgo")     # a typo
    for split in ("train", "test"):
        shards.write_shards(tmp_path / "data" / split, tmp_path / "shards" / split)

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr("engine.data.to_square_rgb", no_decoding)
    monkeypatch.setattr("engine.splits.to_square_rgb", no_decoding)
    monkeypatch.setattr("engine.stream.decode_rgb", no_decoding)
    message = r"train/ and test/ of .* have different class folders \(only in train/: dog; only in test/: dgo\)"
    for load in (load_splits, splits.load_splits):
        for root in (tmp_path / "data", tmp_path / "shards"):
            if load is load_splits and root.name == "shards":
                continue            # engine.data reads ImageFolders only
            with pytest.raises(DataError, match=message):
                load(root, 16)
    for root in (tmp_path / "data", tmp_path / "shards"):
        with pytest.raises(DataError, match=message):
            splits.streamed_splits(root, 16)
    # the command line says it in one line, before anything is planned or written
    assert cli(["ablation_mae_decoder", "--only", "none", "--data", str(tmp_path / "data"), "--table-only",
                "--outputs", str(tmp_path / "out")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: train/ and test/ of") and "only in test/: dgo" in line
    assert not (tmp_path / "out").exists()
