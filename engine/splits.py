"""The splits the evaluations read, and which source a run's pre-training reads.

    load_splits      every split decoded once at the model's size and cached, from an ImageFolder
                     (engine.data) or tar shards (engine.shards): what the evaluations read
    streamed_splits  train/ and test/ as StreamedSets: read in batches, in order, from their
                     files in DataLoader workers (the pieces of engine.stream), never held whole:
                     what k-NN, the linear probe and fine-tuning read of an ImageNet-size run
    choose_source    "memory" (engine.views.MaskedViews) or "stream" (engine.stream.StreamingViews)
                     for a run's pre-training, from the decoded size of its train split
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from core.files import atomic_write
from engine.data import (HOLDOUT_IMAGES, DataError, ImageSet, Splits, cache_dir, check_dataset_root, check_same_classes,
                         split_holdout, to_square_rgb)
from engine.data import load_splits as load_folder_splits
from engine.shards import ShardReader, is_shard_split
from engine.stream import (DATA_SOURCES, MEMORY_SOURCE_MAX_BYTES, Collate, ImageReader, Item, check_part,
                           default_workers, ignore_stop_signals, open_reader, read_image)


# ---- splits decoded in memory ----------------------------------------------------------------
def load_splits(root: str | Path, img_size: int, on_bad_image: str = "error", progress: bool = True) -> Splits:
    """engine.data.load_splits for an ImageFolder; for shards, each split decoded the same way
    (shorter side to `img_size`, centre crop) and cached. What evaluations read."""
    root = check_dataset_root(root)
    if not is_shard_split(root / "train"):
        return load_folder_splits(root, img_size, on_bad_image=on_bad_image, progress=progress)
    readers = [ShardReader(root / split) for split in ("train", "test")]
    check_same_classes(root, readers[0].classes, readers[1].classes)      # before decoding a single image
    train, test = (decode_split(reader, img_size, on_bad_image, progress) for reader in readers)
    return split_holdout(train, test, holdout=HOLDOUT_IMAGES)


def decode_split(reader: ShardReader, img_size: int, on_bad_image: str, progress: bool) -> ImageSet:
    """Every image of `reader` at `img_size` as uint8 (N, 3, s, s), cached as load_imagefolder's are."""
    key = hashlib.sha1(json.dumps([str(reader.root), img_size, on_bad_image, reader.classes,
                                   reader.places.tolist()]).encode()).hexdigest()[:16]
    path = cache_dir() / "datasets" / f"{reader.root.parent.name}-{reader.root.name}-shards-{img_size}px-{key}.npz"
    if path.exists():
        with np.load(path) as cached:
            return ImageSet(torch.from_numpy(cached["images"]), torch.from_numpy(cached["labels"]), reader.classes)
    images = np.empty((len(reader), img_size, img_size, 3), dtype=np.uint8)
    kept = []
    for index in tqdm(range(len(reader)), desc=f"decoding {reader.root.name}/ shards (once)", unit="img",
                      leave=False, disable=not progress, mininterval=1.0):
        try:
            with Image.open(io.BytesIO(reader.read(index))) as img:
                images[len(kept)] = to_square_rgb(img, img_size)
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            if on_bad_image == "error":
                raise DataError(f"cannot read image {reader.name(index)} ({err.__class__.__name__}); "
                                f"pass --skip-bad-images to leave it out") from None
            continue
        kept.append(index)
    if len(kept) < len(reader):
        print(f"[data] skipped {len(reader) - len(kept)} unreadable image(s) in {reader.root}")
    images = images[:len(kept)].transpose(0, 3, 1, 2).copy()
    labels = reader.labels[kept].numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        np.savez(f, images=images, labels=labels)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), reader.classes)


# ---- evaluation splits, streamed ------------------------------------------------------------
def center_square(image: Tensor, size: int) -> Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size): the shorter side resized to `size` (bicubic,
    antialiased), then the centre crop, as the memory path decodes a split (engine.data,
    through PIL: equal to within rounding, not bit for bit)."""
    height, width = image.shape[1:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        height, width = max(size, round(height * scale)), max(size, round(width * scale))
        image = TF.resize(image, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    top, left = (height - size) // 2, (width - size) // 2
    return image[:, top:top + size, left:left + size]


class SquareImages(Dataset):
    """Image i of a reader at the evaluation size, with its label (the worker's side)."""

    def __init__(self, reader: ImageReader, size: int):
        self.reader, self.size = reader, size

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> Item:
        item, image = read_image(self.reader, index, index)
        if image is not None:
            item.views.append(center_square(image, self.size))
        return item


class SubsetReader:
    """The images of `reader` at `positions`, as a reader of their own (rows of a split taken
    by position: the held-out part of a streamed train split)."""

    def __init__(self, reader: ImageReader, positions: Tensor):
        self.reader, self.positions = reader, positions
        self.classes = reader.classes
        self.labels = reader.labels[positions]

    def __len__(self) -> int:
        return len(self.positions)

    def read(self, index: int) -> bytes:
        return self.reader.read(int(self.positions[index]))

    def name(self, index: int) -> str:
        return self.reader.name(int(self.positions[index]))


class StreamedSet:
    """A split the evaluations read in batches, in order, without holding it (what an ImageSet
    is for the memory path): `batches(n)` yields (uint8 (B, 3, s, s), labels (B,))."""

    def __init__(self, reader: ImageReader, img_size: int, workers: int | None = None,
                 on_bad_image: str = "error"):
        self.reader, self.img_size, self.on_bad_image = reader, img_size, on_bad_image
        self.workers = default_workers() if workers is None else workers
        self.classes = reader.classes
        self.labels = reader.labels

    def __len__(self) -> int:
        return len(self.reader)

    def subset(self, positions: Tensor) -> "StreamedSet":
        """Its images at `positions`, read as a split of their own."""
        return StreamedSet(SubsetReader(self.reader, positions), self.img_size, self.workers, self.on_bad_image)

    def batches(self, batch_size: int, index: list[int] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Its images (or those at `index`) in order, `batch_size` at a time."""
        order = list(range(len(self))) if index is None else index
        chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        extra = dict(prefetch_factor=2, worker_init_fn=ignore_stop_signals) if self.workers else {}
        loader = DataLoader(SquareImages(self.reader, self.img_size), batch_sampler=chunks,
                            num_workers=min(self.workers, len(chunks)), collate_fn=Collate(False), **extra)
        for part in loader:
            check_part(part, self.on_bad_image)
            for name in part.bad.values():
                print(f"[data] skipped unreadable image {name}", flush=True)
            if len(part.positions):
                yield part.views[0], part.labels

    def in_memory(self, index: list[int]) -> ImageSet:
        """The images at `index` as an ImageSet (a few, for figures)."""
        images, labels = zip(*self.batches(len(index) or 1, index)) if index else ((), ())
        return ImageSet(torch.cat(images) if images else torch.empty(0, 3, self.img_size, self.img_size,
                                                                     dtype=torch.uint8),
                        torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64), self.classes)


def streamed_splits(root: str | Path, img_size: int, workers: int | None = None,
                    on_bad_image: str = "error") -> Splits:
    """train/ and test/ as StreamedSets, for the evaluations that read splits in batches
    (eval.registry `streams`: k-NN, the linear probe, fine-tuning). fit and holdout are None: an
    evaluation takes their rows of train by position (engine.data.holdout_positions)."""
    root = check_dataset_root(root)
    train, test = (StreamedSet(open_reader(root / split), img_size, workers, on_bad_image)
                   for split in ("train", "test"))
    check_same_classes(root, train.classes, test.classes)
    return Splits(train, test, None, None)


# ---- which source a run reads ---------------------------------------------------------------
def choose_source(data: dict, force: str = "auto") -> tuple[str, str]:
    """("memory" | "stream", why) for pre-training on `data` (a run's data descriptor): `force`
    as given (--data-source), else memory when the decoded train split at the model's size fits
    MEMORY_SOURCE_MAX_BYTES."""
    if force not in DATA_SOURCES:
        raise DataError(f"unknown data source {force!r}; pass --data-source one of {', '.join(DATA_SOURCES)}")
    if data["name"] == "synthetic":
        if force == "stream":
            raise DataError("the synthetic data set has no files to stream; pass --data PATH or drop --data-source stream")
        return "memory", "synthetic images"
    if force != "auto":
        return force, f"--data-source {force}"
    size = data["img_size"]
    count = len(open_reader(Path(data["path"]) / "train"))
    decoded = count * 3 * size * size
    kind = "memory" if decoded <= MEMORY_SOURCE_MAX_BYTES else "stream"
    return kind, (f"{count} images x 3 x {size} x {size} = {decoded / 2**30:.2f} GiB decoded, "
                  f"{'within' if kind == 'memory' else 'over'} the {MEMORY_SOURCE_MAX_BYTES / 2**30:.0f} GiB "
                  f"kept in memory")
