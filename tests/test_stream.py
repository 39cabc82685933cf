"""The streaming data path (engine.stream): image files decoded per step in DataLoader workers.
Deterministic for any number of workers and ranks, resumable bit for bit after kill -9, two gloo
ranks together equal to one process, bad files named or skipped, empty class folders refused."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import ConfigError
from bench.data import make_jpeg_folder
from conftest import ROOT, micro_overrides
from engine.data import DataError, load_imagefolder, to_square_rgb
from engine import shards, splits
from engine.splits import StreamedSet, choose_source, load_splits
from engine.stream import FolderReader, ImageViews, StreamingViews, crop_box, decode_rgb, open_reader
from eval.features import extract_features
from eval.knn import KNNConfig, knn_top1, nearest
from methods import build_method
from methods.vit import ViT, ViTConfig
from test_reliability import DRIVER, TOTAL_STEPS, final_state, run_until, torchrun_driver
from suites.profiles import get_profile, override
from test_suite_cli import run_cli

IBOT_SMALL = dict(out_dim=128, head_hidden_dim=64, head_bottleneck_dim=32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """320 JPEGs of 20-48 px in 4 classes: 10 steps of the driver's batch of 32."""
    return make_jpeg_folder(tmp_path_factory.mktemp("stream") / "train", num_classes=4, per_class=80,
                            min_px=20, max_px=48)


def ibot(**extra):
    """iBOT at its paper recipe's views: two global crops with DINO colour, local crops, masks."""
    torch.manual_seed(0)
    recipe = build_method("ibot", **micro_overrides(**IBOT_SMALL)).paper_recipe.method
    return build_method("ibot", **micro_overrides(**{**IBOT_SMALL, **recipe, **extra}))


def source(method, folder, workers=0, **kwargs):
    return StreamingViews(method, FolderReader(folder), 16, 0.2, seed=0, device=torch.device("cpu"),
                          workers=workers, **kwargs)


def assert_same_batch(a, b):
    assert torch.equal(a.images, b.images)
    assert (a.mask is None) == (b.mask is None) and (a.mask is None or torch.equal(a.mask, b.mask))
    assert len(a.views or []) == len(b.views or [])
    for x, y in zip(a.views or [], b.views or []):
        assert torch.equal(x, y)


def test_streaming_batches_are_the_same_for_any_number_of_workers_and_from_any_start(folder):
    method = ibot()
    alone = source(method, folder, workers=0)
    expected = [alone.batch_for_step(step) for step in range(4)]
    assert len(expected[0].views) > 2, "the paper recipe's local crops"
    assert expected[0].views[2].shape[-1] < expected[0].views[0].shape[-1]
    workers = source(method, folder, workers=2)
    for step in range(4):
        assert_same_batch(expected[step], workers.batch_for_step(step))
    resumed = source(method, folder, workers=2)
    assert_same_batch(expected[3], resumed.batch_for_step(3))
    assert not torch.equal(expected[0].images, expected[1].images)


def test_a_source_started_at_a_step_reads_no_image_of_an_earlier_step(folder, monkeypatch):
    asked = []
    getitem = ImageViews.__getitem__

    def recording(self, key):
        asked.append(key[0])
        return getitem(self, key)

    monkeypatch.setattr(ImageViews, "__getitem__", recording)
    streaming = source(build_method("mae", **micro_overrides()), folder, workers=0)
    streaming.batch_for_step(7)
    streaming.batch_for_step(7)          # the trainer asks for its first step twice (FLOPs, then training)
    streaming.batch_for_step(8)
    assert asked and min(asked) == 7 and max(asked) == 8 and len(asked) == 2 * 16


def test_two_ranks_read_disjoint_halves_that_together_are_the_one_process_batch(folder, monkeypatch):
    """Rank r reads only positions [r B/2, (r+1) B/2) of each global batch, with the same views
    and mask rows the single process has there."""
    method = ibot()
    single = source(method, folder).batch_for_step(5)
    parts, read = [], {0: set(), 1: set()}
    for rank in (0, 1):
        part = source(method, folder)
        part.world, part.rank = 2, rank
        getitem = ImageViews.__getitem__
        monkeypatch.setattr(ImageViews, "__getitem__",
                            lambda self, key, rank=rank: read[rank].add(key[1]) or getitem(self, key))
        parts.append(part.batch_for_step(5))
        monkeypatch.setattr(ImageViews, "__getitem__", getitem)
    assert read[0] == set(range(8)) and read[1] == set(range(8, 16))
    assert torch.equal(torch.cat([p.images for p in parts]), single.images)
    assert torch.equal(torch.cat([p.mask for p in parts], dim=-2), single.mask)
    for v in range(len(single.views)):
        assert torch.equal(torch.cat([p.views[v] for p in parts]), single.views[v])


def test_crop_boxes_follow_torchvision_sampling_within_the_image():
    gen = torch.Generator().manual_seed(0)
    for height, width in ((300, 500), (500, 300), (20, 20), (10, 400)):
        for _ in range(50):
            top, left, h, w = crop_box(height, width, (0.2, 1.0), (3 / 4, 4 / 3), gen)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
    top, left, h, w = crop_box(10, 400, (0.9, 1.0), (3 / 4, 4 / 3), gen)   # no try fits: centre, nearest aspect
    assert (h, w) == (10, 13) and left == (400 - 13) // 2


def test_sigterm_to_the_process_group_then_kill_9_during_streaming_then_resume_gives_identical_weights(
        tmp_path, folder):
    """SIGTERM to every process of the group, workers included (Slurm's pre-emption, Ctrl-C):
    the step in flight finishes and is checkpointed (exit 143), not failed by a dead worker."""
    stream = ("--stream", str(folder), "--workers", "2")
    reference = tmp_path / "uninterrupted"
    done = subprocess.run([*DRIVER, str(reference), *stream], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = tmp_path / "killed"
    group = subprocess.Popen([*DRIVER, str(resumed), *stream], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    for line in group.stdout:
        if line.strip() == "step 5":
            os.killpg(group.pid, signal.SIGTERM)
            break
    rest, errors = group.communicate(timeout=120)
    assert group.returncode == 143, errors[-2000:]
    assert "checkpoint saved - run the same command again to resume" in rest
    code, _ = run_until(resumed, "step 13", *stream)        # between checkpoints, mid-epoch
    assert code == -signal.SIGKILL
    again = subprocess.run([*DRIVER, str(resumed), *stream], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    expected, got = final_state(reference), final_state(resumed)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert (reference / "metrics.jsonl").read_text() == (resumed / "metrics.jsonl").read_text()


def test_torchrun_with_two_gloo_processes_streaming_matches_one_process(tmp_path, folder):
    stream = ("--stream", str(folder), "--workers", "1")
    single = subprocess.run([*DRIVER, str(tmp_path / "single"), *stream, "--dump-state", str(tmp_path / "single")],
                            capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-2000:]
    rank0, rank1 = torchrun_driver(tmp_path / "ddp", 29541, *stream)
    reference = torch.load(tmp_path / "single-rank0.pt", weights_only=True)
    for key in reference:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
        assert torch.allclose(rank0[key], reference[key], rtol=1e-3, atol=1e-4), key
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == TOTAL_STEPS


def test_an_unreadable_file_is_named_in_one_line_also_from_a_worker_or_skipped_and_counted(tmp_path, capsys):
    root = make_jpeg_folder(tmp_path / "train", num_classes=2, per_class=8, min_px=20, max_px=30)
    broken = root / "n00000001" / "broken.JPEG"
    broken.write_bytes(b"not a jpeg")
    (root / "n00000000" / "cut.JPEG").write_bytes((root / "n00000000" / "0_0.JPEG").read_bytes()[:40])
    method = build_method("mae", **micro_overrides())
    streaming = StreamingViews(method, FolderReader(root), 18, 0.2, 0, torch.device("cpu"), workers=2)
    with pytest.raises(DataError) as err:
        streaming.batch_for_step(0)
    message = str(err.value)
    assert "\n" not in message and "--skip-bad-images" in message
    assert "broken.JPEG" in message or "cut.JPEG" in message
    skipping = StreamingViews(method, FolderReader(root), 18, 0.2, 0, torch.device("cpu"), workers=2,
                              on_bad_image="skip")
    batch = skipping.batch_for_step(0)      # one epoch of 18 holds every file
    assert batch.images.shape[0] == 16 and batch.mask.shape[0] == 16
    assert sorted(name.split(" ")[0].rsplit("/", 1)[1] for name in skipping.skipped.values()) == \
        ["broken.JPEG", "cut.JPEG"]
    assert skipping.describe()["skipped_images"] == 2
    assert "skipped unreadable image" in capsys.readouterr().out


def test_an_empty_class_folder_is_an_error_naming_it_on_both_paths(tmp_path):
    root = make_jpeg_folder(tmp_path / "train", num_classes=2, per_class=2, min_px=20, max_px=24)
    (root / "n00000005").mkdir()
    (root / "n00000005" / "notes.txt").write_text("no images here")
    for load in (FolderReader, lambda path: load_imagefolder(path, 16)):
        with pytest.raises(DataError, match=r"class folder .*n00000005 holds no images.*remove the folder"):
            load(root)


def test_greyscale_png_and_cmyk_files_stream_as_rgb(tmp_path):
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    Image.new("L", (30, 20), 90).save(root / "a" / "grey.png")
    Image.new("CMYK", (30, 20), (0, 0, 0, 0)).save(root / "a" / "cmyk.jpg")
    Image.new("RGBA", (30, 20), (10, 20, 30, 40)).save(root / "a" / "alpha.png")
    Image.new("RGB", (30, 20), (1, 2, 3)).save(root / "a" / "plain.bmp")
    streaming = StreamingViews(build_method("mae", **micro_overrides()), FolderReader(root), 4, 0.2, 0,
                               torch.device("cpu"), workers=0)
    assert streaming.batch_for_step(0).images.shape == (4, 3, 16, 16)


# the imagenet profile at a size a CPU runs in seconds (README: "Streaming data and ImageNet")
IMAGENET_SMALL = ("--set", "encoder.size=micro", "--set", "encoder.img_size=32", "--set", "encoder.patch_size=8",
                  "--set", "encoder.drop_path=0", "--set", "train.batch_size=32", "--set", "train.epochs=2",
                  "--set", "train.compile=false", "--set", "method_defaults.mae.decoder_dim=32",
                  "--set", "method_defaults.mae.decoder_heads=2", "--set", "feature_batch=64")


def test_the_imagenet_profile_runs_on_a_small_folder_through_the_streaming_path_to_knn(tmp_path):
    make_jpeg_folder(tmp_path / "imagenet" / "train", num_classes=4, per_class=60, min_px=40, max_px=80)
    make_jpeg_folder(tmp_path / "imagenet" / "test", num_classes=4, per_class=20, min_px=40, max_px=80, seed=1)
    args = ("ablation_mae_decoder", "--profile", "imagenet", "--data", str(tmp_path / "imagenet"),
            "--recipe", "shared", "--only", "mae:depth 1 x 32", "--data-workers", "2", *IMAGENET_SMALL)
    cache = {"MIMBENCH_CACHE": str(tmp_path / "cache")}
    done = run_cli(*args, "--data-source", "stream", outputs=tmp_path / "out", env_extra=cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list((tmp_path / "cache").rglob("*.npz")), "a split was decoded into memory"
    assert list((tmp_path / "out" / "runs").glob("mae-*/figures/*.png"))
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("mae-*/result.json")]
    assert record["status"] == "done" and record["metrics"]["knn_top1_cls"] > 25     # 4 classes: chance is 25
    assert record["train"]["data_source"] == {"kind": "stream", "images": 240, "workers": 2, "skipped_images": 0,
                                              "reason": "--data-source stream"}
    assert record["train"]["steps"] == 2 * (240 // 32)
    config = json.loads(next((tmp_path / "out" / "runs").glob("mae-*/config.json")).read_text())
    assert config["method_config"]["encoder"]["img_size"] == 32 and config["train"]["batch_size"] == 32
    # the same command again finds it done; the source is no part of the run's name
    again = run_cli(*args, "--data-source", "memory", outputs=tmp_path / "out", env_extra=cache)
    assert again.returncode == 0 and "1 runs" in again.stdout
    assert len(list((tmp_path / "out" / "runs").glob("mae-*"))) == 1


def test_a_split_streams_when_its_decoded_size_is_over_the_memory_limit_unless_forced(tmp_path, monkeypatch):
    make_jpeg_folder(tmp_path / "data" / "train", num_classes=2, per_class=5, min_px=20, max_px=24)
    data = {"name": "data", "path": str(tmp_path / "data"), "img_size": 32}
    kind, reason = choose_source(data)
    assert kind == "memory" and reason.startswith("10 images x 3 x 32 x 32 = 0.00 GiB decoded, within")
    monkeypatch.setattr(splits, "MEMORY_SOURCE_MAX_BYTES", 10 * 3 * 32 * 32 - 1)
    assert choose_source(data)[0] == "stream"
    assert choose_source(data, "memory") == ("memory", "--data-source memory")
    assert choose_source({"name": "synthetic", "img_size": 16}) == ("memory", "synthetic images")
    with pytest.raises(DataError, match="no files to stream"):
        choose_source({"name": "synthetic", "img_size": 16}, "stream")


def test_bad_set_overrides_are_one_line_errors_naming_the_known_fields():
    with pytest.raises(ConfigError) as err:
        override(get_profile("smoke"), ["train.batchsize=3"])
    assert "\n" not in str(err.value) and "TrainConfig has no field 'batchsize'; known:" in str(err.value)
    assert "batch_size" in str(err.value)
    with pytest.raises(ConfigError, match="write KEY=VALUE"):
        override(get_profile("smoke"), ["encoder"])
    small = override(get_profile("imagenet"), ["encoder.img_size=32", "train.batch_size=32",
                                               "method_defaults.mae.decoder_dim=32", "train.compile=false"])
    assert small.encoder["img_size"] == 32 and small.encoder["size"] == "base"
    assert (small.train.batch_size, small.train.compile, small.train.epochs) == (32, False, 800)
    assert small.method_defaults["mae"]["decoder_dim"] == 32 and small.method_defaults["mae"]["decoder_depth"] == 8


def test_shards_written_from_an_imagefolder_stream_the_batches_of_the_folder_and_decode_its_splits(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIMBENCH_CACHE", str(tmp_path / "cache"))    # (other tests count the session cache's files)
    make_jpeg_folder(tmp_path / "data" / "train", num_classes=3, per_class=12, min_px=20, max_px=40)
    make_jpeg_folder(tmp_path / "data" / "test", num_classes=3, per_class=4, min_px=20, max_px=40, seed=1)
    assert shards.main([str(tmp_path / "data"), str(tmp_path / "shards"), "--images-per-shard", "10"]) == 0
    assert "train on them with --data" in capsys.readouterr().out
    assert len(list((tmp_path / "shards" / "train").glob("shard-*.tar"))) == 4        # 36 images, 10 a shard
    method = ibot()
    from_folder = source(method, tmp_path / "data" / "train")
    from_shards = StreamingViews(method, open_reader(tmp_path / "shards" / "train"), 16, 0.2, seed=0,
                                 device=torch.device("cpu"), workers=2)
    assert isinstance(from_shards.reader, shards.ShardReader)
    for step in (0, 3):
        assert_same_batch(from_folder.batch_for_step(step), from_shards.batch_for_step(step))
    folder_splits = load_splits(tmp_path / "data", 16)
    shard_splits = load_splits(tmp_path / "shards", 16)
    assert shard_splits.train.classes == folder_splits.train.classes == ["n00000000", "n00000001", "n00000002"]
    for split in ("train", "test", "fit", "holdout"):
        assert torch.equal(getattr(shard_splits, split).images, getattr(folder_splits, split).images), split
        assert torch.equal(getattr(shard_splits, split).labels, getattr(folder_splits, split).labels), split
    assert choose_source({"name": "shards", "path": str(tmp_path / "shards"), "img_size": 16})[0] == "memory"
    # shards of another writer (no index.json) are listed from their tars, classes by number
    (tmp_path / "shards" / "train" / "index.json").unlink()
    listed = shards.ShardReader(tmp_path / "shards" / "train")
    assert torch.equal(listed.labels, FolderReader(tmp_path / "data" / "train").labels)
    assert listed.classes == ["0", "1", "2"] and listed.read(5) == FolderReader(tmp_path / "data" / "train").read(5)


def test_a_corrupt_image_in_a_shard_is_named_by_shard_and_offset(tmp_path):
    root = make_jpeg_folder(tmp_path / "data" / "train", num_classes=2, per_class=8, min_px=20, max_px=30)
    (root / "n00000000" / "0_3.JPEG").write_bytes(b"garbage, not a JPEG at all")
    shards.write_shards(root, tmp_path / "shards", images_per_shard=5)
    streaming = StreamingViews(build_method("mae", **micro_overrides()), open_reader(tmp_path / "shards"), 16, 0.2,
                               0, torch.device("cpu"), workers=1)
    with pytest.raises(DataError, match=r"cannot read image .*shard-000000\.tar at byte \d+ \(\w+\); remove it"):
        streaming.batch_for_step(0)
    with pytest.raises(DataError, match="neither index.json nor"):
        shards.ShardReader(tmp_path)


def test_a_missing_shard_met_in_a_worker_is_the_one_line_data_error_also_when_skipping(tmp_path):
    root = make_jpeg_folder(tmp_path / "data" / "train", num_classes=2, per_class=8, min_px=20, max_px=30)
    shards.write_shards(root, tmp_path / "shards", images_per_shard=5)
    (tmp_path / "shards" / "shard-000001.tar").unlink()
    method = build_method("mae", **micro_overrides())
    for on_bad_image in ("error", "skip"):
        streaming = StreamingViews(method, open_reader(tmp_path / "shards"), 16, 0.2, 0, torch.device("cpu"),
                                   workers=1, on_bad_image=on_bad_image)
        with pytest.raises(DataError) as err:
            streaming.batch_for_step(0)
        assert str(err.value).startswith("shard ") and "shard-000001.tar is missing" in str(err.value)
        assert "\n" not in str(err.value) and "worker" not in str(err.value)
    with pytest.raises(DataError, match=r"^shard .*shard-000001\.tar is missing; copy it back[^\n]*$"):
        list(StreamedSet(open_reader(tmp_path / "shards"), 16, workers=1).batches(8))


def test_writing_shards_drops_the_old_index_first_and_only_numbered_tars_make_a_shard_folder(tmp_path, monkeypatch):
    import webdataset

    root = make_jpeg_folder(tmp_path / "data" / "train", num_classes=2, per_class=4, min_px=20, max_px=30)
    dest = tmp_path / "shards"
    shards.write_shards(root, dest, images_per_shard=3)
    write, calls = webdataset.ShardWriter.write, []

    def crash_midway(self, sample):
        calls.append(sample)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return write(self, sample)

    monkeypatch.setattr(webdataset.ShardWriter, "write", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        shards.write_shards(root, dest, images_per_shard=2)
    assert not (dest / "index.json").exists(), "the old offsets would be read over the new tars"
    # an ImageFolder split with a stray archive is still a folder; numbered tars are shards
    (root / "backup.tar").write_bytes(b"")
    assert not shards.is_shard_split(root) and isinstance(open_reader(root), FolderReader)
    assert shards.is_shard_split(dest)
    other = tmp_path / "other"
    other.mkdir()
    (dest / "shard-000000.tar").rename(other / "imagenet-train-000000.tar")
    assert shards.is_shard_split(other) and len(shards.ShardReader(other)) == 2


def test_16_bit_pngs_and_animated_gifs_stream_as_the_memory_path_reads_them(tmp_path):
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)).save(root / "a" / "deep.png")
    frames = [Image.new("RGB", (30, 20), (50 * i, 100, 200)) for i in range(3)]
    # folders list no .gif, but decoders go by the bytes: a GIF saved as .jpg reaches them
    frames[0].save(root / "a" / "moving.jpg", format="GIF", save_all=True, append_images=frames[1:])
    for name in ("deep.png", "moving.jpg"):
        with Image.open(root / "a" / name) as img:
            expected = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
        got = decode_rgb((root / "a" / name).read_bytes())
        assert got.dtype == torch.uint8 and torch.equal(got, expected), name
    streaming = StreamingViews(build_method("mae", **micro_overrides()), FolderReader(root), 2, 0.2, 0,
                               torch.device("cpu"), workers=0)
    assert streaming.batch_for_step(0).images.shape == (2, 3, 16, 16)


def test_a_bad_file_met_in_every_epoch_is_skipped_and_counted_once(tmp_path, capsys):
    root = make_jpeg_folder(tmp_path / "train", num_classes=2, per_class=4, min_px=20, max_px=30)
    (root / "n00000001" / "broken.JPEG").write_bytes(b"not a jpeg")
    skipping = StreamingViews(build_method("mae", **micro_overrides()), FolderReader(root), 9, 0.2, 0,
                              torch.device("cpu"), workers=0, on_bad_image="skip")
    for step in range(3):               # a batch of 9 is the whole folder: three epochs
        assert skipping.batch_for_step(step).images.shape[0] == 8
    assert skipping.describe()["skipped_images"] == 1
    assert capsys.readouterr().out.count("skipped unreadable image") == 1


def test_bench_data_writes_every_loader_rate_and_its_stable_keys(tmp_path):
    """`make bench-data` at a toy size: what it measures, never how fast (a loaded machine)."""
    out = tmp_path / "data_results.json"
    done = subprocess.run([sys.executable, "-m", "bench.data", "--images", "40", "--size", "32", "--batch", "8",
                           "--steps", "1", "--reps", "1", "--workers", "1", "--folder", str(tmp_path / "jpegs"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["img_per_s"]["1"]) == {"stream", "torchvision", "decode"}
    assert all(rate > 0 for rate in results["img_per_s"]["1"].values())
    assert results["stream_vs_torchvision"]["1"] > 0 and results["decode_ceiling_share"]["1"] > 0
    assert set(results["rss_mb"]) == {"1x", "10x", "growth"} and results["rss_mb"]["10x"]["main"] > 0
    assert len(list((tmp_path / "jpegs" / "train-10x").rglob("*.JPEG"))) == 10 * 40


def test_streamed_evaluation_splits_give_the_features_of_the_same_images_held_in_memory(tmp_path):
    root = make_jpeg_folder(tmp_path / "train", num_classes=3, per_class=7, min_px=20, max_px=60)
    streamed = StreamedSet(FolderReader(root), 16, workers=2)
    held = streamed.in_memory(list(range(len(streamed))))
    assert held.images.shape == (21, 3, 16, 16) and torch.equal(held.labels, streamed.labels)
    with Image.open(root / "n00000001" / "1_2.JPEG") as img:     # as the memory path decodes it, within rounding
        memory = torch.from_numpy(to_square_rgb(img, 16)).permute(2, 0, 1).int()
    assert (memory - held.images[9].int()).abs().max() <= 1
    vit = ViT(ViTConfig(size="micro", img_size=16, patch_size=4)).eval()
    from_files = extract_features(vit, streamed, batch_size=8, progress=False)    # 8 + 8 + 5
    from_memory = extract_features(vit, held, batch_size=8, progress=False)
    for key in ("cls", "mean", "labels"):
        assert torch.equal(from_files[key], from_memory[key]), key


def test_features_of_a_streamed_split_that_skips_a_bad_file_are_those_of_the_readable_ones_and_cached(
        tmp_path, monkeypatch):
    from eval import features
    root = make_jpeg_folder(tmp_path / "train", num_classes=2, per_class=6, min_px=20, max_px=40)
    (root / "n00000000" / "0_3.JPEG").write_bytes(b"not a jpeg")       # the 4th of 12 files
    streamed = StreamedSet(FolderReader(root), 16, workers=0, on_bad_image="skip")
    vit = ViT(ViTConfig(size="micro", img_size=16, patch_size=4)).eval()
    feats = features.cached_features(vit, streamed, tmp_path / "train.safetensors", batch_size=5, progress=False)
    readable = [i for i in range(12) if i != 3]
    held = streamed.in_memory(readable)
    assert len(feats["labels"]) == 11 and torch.equal(feats["labels"], streamed.labels[readable])
    assert torch.equal(feats["mean"], extract_features(vit, held, batch_size=5, progress=False)["mean"])
    monkeypatch.setattr(features, "extract_features", lambda *args, **kwargs: pytest.fail("extracted again"))
    again = features.cached_features(vit, streamed, tmp_path / "train.safetensors", batch_size=5, progress=False)
    assert torch.equal(again["mean"], feats["mean"])


def test_knn_over_slices_of_the_train_features_equals_one_similarity_matmul():
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(500, 16, generator=gen), torch.randn(70, 16, generator=gen)
    train_labels, test_labels = torch.randint(0, 5, (500,), generator=gen), torch.randint(0, 5, (70,), generator=gen)
    cfg = KNNConfig(k=20, chunk_size=32)
    whole = knn_top1(train, train_labels, test, test_labels, cfg)
    assert knn_top1(train, train_labels, test, test_labels, cfg, max_similarities=32 * 45) == whole   # 45 a slice
    sims, idx = nearest(test, train, 20, max_similarities=70 * 33)
    expected_sims, expected_idx = (test @ train.T).topk(20, dim=1)
    # the same neighbours; a slice's matmul may take other BLAS kernels than the whole one (this
    # machine's differ in the last bit), so the similarities agree to float rounding
    assert torch.equal(idx, expected_idx)
    torch.testing.assert_close(sims, expected_sims, rtol=1e-6, atol=1e-6)


def test_the_linear_probe_streams_and_takes_the_held_out_rows_the_memory_path_finds_by_pixels(tmp_path):
    from engine.data import load_splits
    from eval import linear
    from eval.registry import EvalContext

    root = tmp_path / "data"
    make_jpeg_folder(root / "train", num_classes=3, per_class=30, min_px=20, max_px=60)
    make_jpeg_folder(root / "test", num_classes=3, per_class=6, min_px=20, max_px=60, seed=1)
    memory = load_splits(root, 16, progress=False)
    streamed = splits.streamed_splits(root, 16, workers=0)
    assert streamed.fit is None and len(streamed.train) == len(memory.train) == 90
    labels = streamed.train.labels
    rows_streamed = linear.held_out_rows(streamed, labels)
    rows_memory = linear.held_out_rows(memory, memory.train.labels)
    for (rows_s, labels_s), (rows_m, labels_m) in zip(rows_streamed, rows_memory):    # fit, then holdout
        assert torch.equal(rows_s, rows_m) and torch.equal(labels_s, labels_m)
    assert len(rows_streamed[1][0]) == 90 // 5

    torch.manual_seed(0)
    vit = ViT(ViTConfig(size="micro", img_size=16, patch_size=4)).eval()
    cfg = linear.LinearConfig(epochs=2, batch_size=32)
    result = linear.run(vit, streamed, cfg, EvalContext(tmp_path / "w", tmp_path / "features", progress=False))
    assert set(result.metrics) == {"linear_top1_cls", "linear_top1_mean"}
    assert result.details["cls"]["sweep"]
    with pytest.raises(DataError, match="2 of the 90 train images were unreadable and skipped"):
        linear.held_out_rows(streamed, labels[:88])
