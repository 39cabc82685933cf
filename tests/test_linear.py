"""The linear probe: chosen on the held-out part of train, the test split read once at the end."""
import pytest
import torch

from engine.data import ImageSet, synthetic_splits
from eval import linear
from eval.features import subset_positions
from eval.registry import EvalContext
from methods.vit import ViT, ViTConfig

FAST = linear.LinearConfig(epochs=8, batch_size=128)


def ctx(folder):
    """Features cached in `folder` (as a run caches them in <run>/features)."""
    return EvalContext(work_dir=folder, features_dir=folder, progress=False)


class WatchedImageSet(ImageSet):
    """An ImageSet that logs every read of its pixels or labels."""

    def __init__(self, data: ImageSet, log: list, name: str):
        super().__init__(data.images, data.labels, data.classes)
        self._log, self._name = log, name

    def __getattribute__(self, attr):
        if attr in ("images", "labels"):
            object.__getattribute__(self, "_log").append(object.__getattribute__(self, "_name"))
        return object.__getattribute__(self, attr)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ViT(ViTConfig(size="micro", img_size=16, patch_size=4))


def test_the_test_split_is_read_only_after_every_sweep_and_retrain(encoder, tmp_path, monkeypatch):
    splits = synthetic_splits(img_size=16)
    log = []
    splits.test = WatchedImageSet(splits.test, log, "test")
    real_train = linear.train_linear

    def logged_train(*args, **kwargs):
        log.append("train_linear")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(linear, "train_linear", logged_train)
    result = linear.run(encoder, splits, FAST, ctx(tmp_path))

    assert log.count("train_linear") == 2 * 2             # (sweep + retrain) x (cls, mean)
    first_test_read = log.index("test")
    assert first_test_read > max(i for i, event in enumerate(log) if event == "train_linear")
    assert set(result.metrics) == {"linear_top1_cls", "linear_top1_mean"}
    # the values of this micro ViT (deterministic on CPU; within one of the 320 test images)
    assert result.metrics == pytest.approx({"linear_top1_cls": 94.0625, "linear_top1_mean": 96.875}, abs=0.32)


def test_the_choice_does_not_depend_on_the_test_split(encoder, tmp_path):
    splits = synthetic_splits(img_size=16)
    first = linear.run(encoder, splits, FAST, ctx(tmp_path / "a"))
    gen = torch.Generator().manual_seed(1)
    splits.test = ImageSet(torch.randint(0, 256, splits.test.images.shape, dtype=torch.uint8, generator=gen),
                           splits.test.labels[torch.randperm(len(splits.test), generator=gen)],
                           splits.test.classes)
    second = linear.run(encoder, splits, FAST, ctx(tmp_path / "b"))
    assert first.details == second.details          # same sweep, same choice
    assert first.metrics != second.metrics          # but the test split was really read


def test_probe_learns_the_synthetic_classes_and_records_the_whole_sweep(encoder, tmp_path):
    splits = synthetic_splits(img_size=16)
    result = linear.run(encoder, splits, FAST, ctx(tmp_path))
    assert result.metrics["linear_top1_mean"] > 60      # 10 classes: chance is 10%
    details = result.details["mean"]
    assert len(details["sweep"]) == len(FAST.lrs) * len(FAST.weight_decays)
    assert details["holdout_top1"] == max(point["holdout_top1"] for point in details["sweep"])
    assert (details["lr"], details["weight_decay"]) in {(p["lr"], p["weight_decay"]) for p in details["sweep"]}


def test_a_grid_that_is_too_low_is_flagged_at_its_edge(encoder, tmp_path):
    splits = synthetic_splits(img_size=16)
    cfg = linear.LinearConfig(lrs=(1e-5, 1e-4), weight_decays=(0.0,), epochs=2, batch_size=128)
    result = linear.run(encoder, splits, cfg, ctx(tmp_path))
    for details in result.details.values():
        assert details["lr"] == 1e-4 and details["lr_at_edge"]


def test_a_chosen_block_is_probed_and_named_in_the_metric(encoder, tmp_path):
    splits = synthetic_splits(img_size=16)
    cfg = linear.LinearConfig(poolings=("mean",), block=0, epochs=2, batch_size=128)
    result = linear.run(encoder, splits, cfg, ctx(tmp_path))
    assert set(result.metrics) == {"linear_top1_mean_block0"}
    assert (tmp_path / "train-block0.safetensors").exists()
    with pytest.raises(Exception, match="block 5 out of range for a depth-2 encoder"):
        linear.run(encoder, splits, linear.LinearConfig(block=5), ctx(tmp_path))


def test_fit_and_holdout_are_found_inside_train_and_foreign_images_are_refused():
    splits = synthetic_splits(img_size=16)
    for part in (splits.fit, splits.holdout):
        positions = subset_positions(splits.train, part)
        assert torch.equal(splits.train.images[positions], part.images)
    assert len(set(subset_positions(splits.train, splits.fit).tolist())
               & set(subset_positions(splits.train, splits.holdout).tolist())) == 0
    with pytest.raises(ValueError, match="not in the parent set"):
        subset_positions(splits.train, splits.test)
