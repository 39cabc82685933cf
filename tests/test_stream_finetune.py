"""Fine-tuning a streamed run (eval.finetune on engine.stream): each step's images read from the
files in DataLoader workers, the same batches for any number of workers, a stopped fine-tune
resumed bit for bit, the sweep's held-out files those of the memory path (a skipped one left out
of its part), the test split read in batches, never decoded whole."""
import multiprocessing

import pytest
import torch

from bench.data import make_jpeg_folder
from conftest import kill_at_step
from engine import data as memory_data
from engine.checkpoint import checkpoint_paths
from engine.data import load_splits
from engine.splits import StreamedSet, streamed_splits
from engine.stream import FolderReader
from eval import finetune
from eval.finetune import FinetuneConfig, StreamingLabelledBatches
from eval.registry import EvalContext, get_evaluation
from methods.vit import ViT, ViTConfig
from runs.execute import evaluate
from suites.profiles import get_profile, override

SMALL = dict(epochs=1, batch_size=8, blr=1e-3, checkpoint_every=2, warmup_frac=0.2)   # 6 steps of the 48 images


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An ImageFolder of 48 train and 12 test JPEGs, 20-48 px a side, in 3 classes."""
    root = tmp_path_factory.mktemp("finetune-stream")
    make_jpeg_folder(root / "train", num_classes=3, per_class=16, min_px=20, max_px=48)
    make_jpeg_folder(root / "test", num_classes=3, per_class=4, min_px=20, max_px=48, seed=1)
    return root


def micro_vit():
    torch.manual_seed(0)
    return ViT(ViTConfig(size="micro", img_size=16, patch_size=4))


def context(work_dir, feature_batch=1024):
    return EvalContext(work_dir=work_dir, features_dir=work_dir / "features", seed=1, progress=False,
                       feature_batch=feature_batch)


def final_weights(work_dir):
    return torch.load(checkpoint_paths(work_dir / "checkpoints")[0], weights_only=True)["model"]


def test_a_streamed_run_fine_tunes_from_its_files_and_records_a_top1(root, tmp_path):
    assert get_evaluation("finetune").streams       # runs.execute hands it a streamed run's StreamedSets
    profile = override(get_profile("smoke"), ["evaluations.finetune.batch_size=8", "feature_batch=8"])
    record = evaluate("finetune", micro_vit(), streamed_splits(root, 16, workers=2), profile, tmp_path,
                      seed=0, device="cpu", progress=False)
    assert 0 <= record.metrics["finetune_top1"] <= 100
    assert record.details["train"]["steps"] == 48 // 8
    assert record.details["train"]["data_source"] == {"kind": "stream", "images": 48, "workers": 2,
                                                      "skipped_images": 0}
    assert not multiprocessing.active_children(), "the fine-tune's workers outlived it"


def test_streamed_fine_tune_batches_are_the_same_for_any_number_of_workers_and_from_any_start(root):
    def batches(workers, steps, **changes):
        source = StreamingLabelledBatches(StreamedSet(FolderReader(root / "train"), 16, workers=workers),
                                          FinetuneConfig(**{**SMALL, **changes}), 16, 3, seed=0,
                                          device=torch.device("cpu"))
        try:
            return [source.batch_for_step(step) for step in steps]
        finally:
            source.close()

    alone = batches(0, range(4))
    assert alone[0].images.shape == (8, 3, 16, 16) and alone[0].targets.shape == (8, 3)     # mixup: soft targets
    for expected, got in zip(alone, batches(2, range(4))):
        assert torch.equal(expected.images, got.images) and torch.equal(expected.targets, got.targets)
    resumed = batches(2, [3])[0]
    assert torch.equal(alone[3].images, resumed.images) and torch.equal(alone[3].targets, resumed.targets)
    assert not torch.equal(alone[0].images, alone[1].images)
    # RandAugment (on by default) is part of them: seeded per image in whichever worker reads it
    assert not torch.equal(batches(0, [0], randaug="")[0].images, alone[0].images)


def test_a_streamed_fine_tune_stopped_after_3_steps_resumes_to_the_weights_of_an_uninterrupted_one(
        root, tmp_path, monkeypatch):
    splits = streamed_splits(root, 16, workers=1)
    cfg = FinetuneConfig(**SMALL)                   # checkpoints at 2, 4, 6
    straight = finetune.run(micro_vit(), splits, cfg, context(tmp_path / "straight"))
    kill_at_step(monkeypatch, StreamingLabelledBatches, 3)     # no checkpoint at the kill: 2 is the last one
    with pytest.raises(KeyboardInterrupt) as killed:
        finetune.run(micro_vit(), splits, cfg, context(tmp_path / "killed"))
    # its traceback still holds the source: its workers were ended, not left to the collector
    assert killed.value and not multiprocessing.active_children()
    assert checkpoint_paths(tmp_path / "killed" / "checkpoints")[0].name == "ckpt-00000002.pt"
    monkeypatch.undo()
    resumed = finetune.run(micro_vit(), splits, cfg, context(tmp_path / "killed"))

    expected, got = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert resumed.metrics == straight.metrics


def test_the_streamed_blr_sweep_trains_and_chooses_on_the_rows_the_memory_path_holds_out(root, tmp_path, monkeypatch):
    memory = load_splits(root, 16, progress=False)
    streamed = streamed_splits(root, 16, workers=0)
    trained, read = [], []
    trainer, top1 = finetune.finetune_trainer, finetune.top1
    monkeypatch.setattr(finetune, "finetune_trainer",
                        lambda model, data, *args, **kw: trained.append(data) or trainer(model, data, *args, **kw))
    monkeypatch.setattr(finetune, "top1", lambda model, data, *args: read.append(data) or top1(model, data, *args))
    result = finetune.run(micro_vit(), streamed, FinetuneConfig(**SMALL, blr_sweep=(0.5, 2.0)), context(tmp_path))

    assert len(result.details["sweep"]["candidates"]) == 2
    (fit, fit_again, train), (holdout, holdout_again, test) = trained, read
    assert fit_again is fit and holdout_again is holdout and train is streamed.train and test is streamed.test
    for part, expected in ((fit, memory.fit), (holdout, memory.holdout)):
        held = part.in_memory(list(range(len(part))))
        assert torch.equal(held.labels, expected.labels)
        # the same files: within rounding of the memory path's decode
        assert (held.images.int() - expected.images.int()).abs().max() <= 1
    assert len(holdout) == 48 // 5


# of the 17 train files, holdout_positions holds out 7, 10 and 16: "broken.JPEG" is the 9th (fit)
# in the first class folder, the 17th (held out) in the second
@pytest.mark.parametrize("where", ["n00000000", "n00000001"])
def test_a_skipped_file_is_left_out_of_its_batch_and_of_the_sweeps_part(tmp_path, where):
    make_jpeg_folder(tmp_path / "data" / "train", num_classes=2, per_class=8, min_px=20, max_px=30)
    make_jpeg_folder(tmp_path / "data" / "test", num_classes=2, per_class=2, min_px=20, max_px=30, seed=1)
    (tmp_path / "data" / "train" / where / "broken.JPEG").write_bytes(b"not a jpeg")
    splits = streamed_splits(tmp_path / "data", 16, workers=0, on_bad_image="skip")
    result = finetune.run(micro_vit(), splits, FinetuneConfig(**{**SMALL, "batch_size": 4, "epochs": 2},
                                                              blr_sweep=(1.0, 2.0)), context(tmp_path / "sweep"))
    assert len(result.details["sweep"]["candidates"]) == 2 and 0 <= result.metrics["finetune_top1"] <= 100

    cfg = FinetuneConfig(**{**SMALL, "batch_size": 16, "epochs": 3})       # 16 of the 17 files a step
    source = StreamingLabelledBatches(splits.train, cfg, 16, 2, seed=0, device=torch.device("cpu"))
    sizes = [len(source.batch_for_step(step).images) for step in range(3)]
    assert 14 in sizes and set(sizes) <= {14, 16}, sizes      # 15 readable: mixup pairs 14 of them
    assert source.describe()["skipped_images"] == 1
    source.close()


def test_the_streamed_test_split_is_read_in_batches_never_decoded_whole(root, tmp_path, monkeypatch):
    def decoded_whole(*args, **kwargs):
        raise AssertionError("a split was decoded into memory")

    monkeypatch.setattr(memory_data, "load_imagefolder", decoded_whole)
    monkeypatch.setattr("engine.splits.decode_split", decoded_whole)
    monkeypatch.setattr(StreamedSet, "in_memory", decoded_whole)
    held, batches = [], StreamedSet.batches

    def recording(self, batch_size, index=None):
        for images, labels in batches(self, batch_size, index):
            held.append((self, len(images)))
            yield images, labels

    monkeypatch.setattr(StreamedSet, "batches", recording)
    splits = streamed_splits(root, 16, workers=0)
    result = finetune.run(micro_vit(), splits, FinetuneConfig(**SMALL), context(tmp_path, feature_batch=5))
    assert [count for split, count in held if split is splits.test] == [5, 5, 2]
    assert result.metrics["finetune_top1"] in {100 * correct / 12 for correct in range(13)}
