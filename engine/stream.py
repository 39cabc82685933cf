"""Streaming pre-training batches: image files decoded per step in DataLoader workers.
(Fine-tuning reads its batches through the same pieces: `StepSource`, eval.finetune; the
evaluations read whole splits from their files through them too: engine.splits.)

The in-memory path (`engine.data.load_imagefolder` + `engine.views.MaskedViews`) keeps a split as
one uint8 array; ImageNet-1k at 224 px is ~190 GB of it. Here a split stays on disk (an ImageFolder,
or WebDataset tar shards, `engine.shards`) and each step's images are read, decoded and cropped
from their full resolution when the step comes:

    order      EpochOrder(num_items, batch_size, seed): step s's global indices, from (seed, epoch)
    sampler    this rank's part of them (`StepSampler`), from the step a run starts or resumes at:
               the batches before it are never read
    workers    per image (`ImageViews`): decode (torchvision.io, libjpeg-turbo), the method's views
               as RandomResizedCrop from the full image (bicubic, antialiased) + flip, and the
               recipe's photometric augmentation, all from generators seeded by
               (seed, step, position in the global batch): a batch is the same for any number of
               workers and ranks
    main       masks for the global batch (stream 2 of the step seed, as MaskedViews), this
               rank's rows of them; views standardised on the device

So a run is deterministic, a resumed run bit-identical to an uninterrupted one, and two ranks
see together exactly the batch one rank sees alone. It is not bit-identical to the in-memory
path, whose crops are one batched `grid_sample` on images already resized to the model's size.

Unreadable files: with on_bad_image="error" (the default) the first one stops the run with a
one-line DataError naming it, also when a worker met it; with "skip" it is left out of its
batch (that step trains on fewer images) and counted once however many epochs meet it. A
DataError inside a worker (a missing shard) is carried to the training process and raised there
as the same one line, whatever on_bad_image says.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import signal
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from engine import distributed
from engine.augment import photometric
from engine.data import IMAGENET_MEAN, IMAGENET_STD, DataError, list_images, standardize
from engine.shards import ShardReader, is_shard_split
from engine.trainer import step_seed
from engine.views import EpochOrder, view_augmentations
from methods.base import Batch

# torchvision 0.29 marks its decoders deprecated in favour of torchcodec (not a dependency here);
# they are torch's libjpeg-turbo / libpng bindings and the fastest we measured (bench.data)
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

# MAE's loader: 10 workers per GPU (main_pretrain.py --num_workers); fewer where cores are fewer
MAX_WORKERS = 10
# Which source a run's pre-training reads (--data-source; engine.splits.choose_source): a decoded
# train split up to MEMORY_SOURCE_MAX_BYTES is held in memory per process (engine.data; CIFAR-10
# at 32 px is 0.15 GB); a larger one streams (ImageNet-1k at 224 px: 180 GiB)
DATA_SOURCES = ("auto", "memory", "stream")
MEMORY_SOURCE_MAX_BYTES = 4 * 2**30


class ImageReader(Protocol):
    """A split whose images are read one at a time, by index: an ImageFolder or tar shards.
    Pickled into each DataLoader worker, so it opens files lazily."""
    classes: list[str]
    labels: Tensor                      # (N,) int64

    def __len__(self) -> int: ...

    def read(self, index: int) -> bytes:
        """The encoded bytes of image `index`."""

    def name(self, index: int) -> str:
        """Where image `index` lives, for error messages."""


class FolderReader:
    """`split_dir/<class>/<image>` (ImageFolder), listed once in sorted order."""

    def __init__(self, split_dir: str | Path):
        self.root = Path(split_dir).expanduser().resolve()
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} not found; pass the path of an ImageFolder split")
        self.classes, files = list_images(self.root)
        # one fixed-width byte array, not a list of str: workers read it without touching
        # reference counts, so its pages stay shared with the training process (a list of
        # 1.28M str would be copied into every worker as they read it)
        self.files = np.array([rel.encode() for rel, _ in files], dtype=np.bytes_)
        self.labels = torch.tensor([label for _, label in files], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> bytes:
        return (self.root / self.files[index].decode()).read_bytes()

    def name(self, index: int) -> str:
        return str(self.root / self.files[index].decode())


def open_reader(split_dir: str | Path) -> ImageReader:
    """The split's images one at a time: tar shards (engine.shards) or an ImageFolder."""
    split_dir = Path(split_dir).expanduser()
    return ShardReader(split_dir) if split_dir.is_dir() and is_shard_split(split_dir) else FolderReader(split_dir)


class BadImage(Exception):
    pass


def decode_rgb(data: bytes) -> Tensor:
    """Encoded image bytes -> uint8 (3, H, W) RGB. JPEG, PNG, WebP and GIF through torchvision
    (libjpeg-turbo: 1.3x PIL's decode of the same JPEGs, measured by bench.data), anything else
    PIL reads (BMP, TIFF, PPM) through PIL. Raises BadImage for bytes no decoder reads.
    torchvision gives 16-bit PNGs as uint16 and animated GIFs as (frames, 3, H, W): those go
    through PIL too, which reads them as the memory path does (engine.data: convert("RGB"),
    the first frame)."""
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if image.dtype == torch.uint8 and image.ndim == 3:
            return image
    except (RuntimeError, ValueError):
        pass
    try:
        with Image.open(io.BytesIO(data)) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImage(err.__class__.__name__) from None


def item_seed(seed: int, step: int, position: int, stream: int) -> int:
    """A seed of its own for the image at `position` of step `step`'s global batch: a hash, not
    a sum as step_seed's, since sums of (step, position) pairs would collide across steps once
    a batch is larger than the step stride."""
    digest = hashlib.blake2b(f"{seed}/{step}/{position}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def image_generator(seed: int, step: int, position: int, stream: int) -> torch.Generator:
    """A generator of its own for the image at `position` of step `step`'s global batch."""
    return torch.Generator().manual_seed(item_seed(seed, step, position, stream))


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop, by torchvision's sampling (area fraction in
    `scale`, log-uniform aspect in `ratio`, ten tries, then the whole image's centre at the
    nearest allowed aspect), drawn from `gen`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        draw = torch.rand(4, generator=gen).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * draw[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draw[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(draw[2] * (height - h + 1)), int(draw[3] * (width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_flip(image: Tensor, size: int, scale: tuple[float, float], gen: torch.Generator) -> Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size): RandomResizedCrop (MAE: bicubic; antialiased,
    as PIL resizes) and a horizontal flip with probability 1/2."""
    top, left, h, w = crop_box(image.shape[1], image.shape[2], scale, (3 / 4, 4 / 3), gen)
    view = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC,
                           antialias=True)
    return view.flip(-1) if torch.rand(1, generator=gen).item() < 0.5 else view


# per-image generator streams (hashed with the step and position, so clear of the step streams);
# PIL_STREAM seeds Python's and NumPy's global generators, which PIL-based ops draw from
# (fine-tuning's timm RandAugment)
CROP_STREAM, COLOUR_STREAM, PIL_STREAM = 0, 1, 2


@dataclass
class Item:
    """One image of a step as a worker returns it: its views or why it has none."""
    position: int                       # in the step's global batch
    index: int                          # the image's index in the reader
    label: int
    views: list[Tensor] = field(default_factory=list)   # uint8 (3, s, s), or float [0, 1] with colour
    bad: str | None = None              # "path (error)" of a file no decoder read
    # a DataError's message (a missing shard): torch would re-raise the error itself in the
    # training process wrapped in its worker's traceback, so it travels as data and is raised there
    error: str | None = None


def read_image(reader: ImageReader, position: int, index: int) -> tuple[Item, Tensor | None]:
    """Image `index` of `reader` decoded, uint8 (3, H, W), with its Item to fill (no views yet);
    None for the pixels when the file is unreadable (Item.bad) or its shard missing (Item.error)."""
    item = Item(position, index, int(reader.labels[index]))
    try:
        return item, decode_rgb(reader.read(index))
    except BadImage as err:
        item.bad = f"{reader.name(index)} ({err})"
    except OSError as err:
        item.bad = f"{reader.name(index)} ({err.__class__.__name__}: {err.strerror or err})"
    except DataError as err:
        item.error = str(err)
    return item, None


class StepImages(Dataset):
    """Indexed by (step, position, image index): that image decoded and made into what a step
    trains on (`views`), in a DataLoader worker; an unreadable one is its Item with `bad` set."""

    def __init__(self, reader: ImageReader, seed: int):
        self.reader, self.seed = reader, seed

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, key: tuple[int, int, int]) -> Item:
        step, position, index = key
        item, image = read_image(self.reader, position, index)
        if image is not None:
            item.views.extend(self.views(image, step, position))
        return item

    def views(self, image: Tensor, step: int, position: int) -> list[Tensor]:
        """uint8 (3, H, W) -> its views, each (3, s, s), drawn from generators of (step, position)."""
        raise NotImplementedError


class ImageViews(StepImages):
    """Pre-training's views of each image (the worker's side of StreamingViews)."""

    def __init__(self, reader: ImageReader, specs: list, seed: int):
        super().__init__(reader, seed)
        self.specs = specs

    def views(self, image: Tensor, step: int, position: int) -> list[Tensor]:
        crop_gen = image_generator(self.seed, step, position, CROP_STREAM)
        colour_gen = image_generator(self.seed, step, position, COLOUR_STREAM)
        views = []
        for (size, scale), colour in self.specs:
            view = crop_flip(image, size, scale, crop_gen)
            if colour is not None and colour.active:
                view = photometric(view[None].float() / 255, colour, colour_gen)[0]
            views.append(view)
        return views


@dataclass
class StepPart:
    """A rank's part of one step, collated in the worker: the readable images' views stacked."""
    positions: Tensor                   # (B_rank,) positions in the global batch
    labels: Tensor                      # (B_rank,)
    # per view (B_rank, 3, s, s): standardised floats, or (for a GPU to standardise) uint8 /
    # float [0, 1] pixels
    views: list[Tensor]
    standardized: bool
    bad: dict[int, str]                 # the unreadable files of this part: image index -> "path (error)"
    error: str | None = None            # the first DataError a worker met (Item.error)

    def pin_memory(self) -> "StepPart":  # (the DataLoader's pin_memory thread calls it)
        return dataclasses.replace(self, views=[v.pin_memory() for v in self.views])


def standardize_pixels(view: Tensor, out: Tensor | None = None) -> Tensor:
    """uint8 or [0, 1] float views -> ImageNet mean/std (the values of
    engine.data.standardize(view / 255)); on the CPU in place, into `out` when given."""
    if view.device.type != "cpu":
        return standardize(view.float() / 255 if view.dtype == torch.uint8 else view)
    pixels = view.float() if out is None else out.copy_(view)
    if view.dtype == torch.uint8:
        pixels.div_(255)
    return pixels.sub_(CPU_MEAN).div_(CPU_STD)


def batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An empty tensor for a collated batch: in shared memory inside a DataLoader worker, so
    handing it to the training process copies nothing (as torch's default_collate does)."""
    out = torch.empty(shape, dtype=dtype)
    return out.share_memory_() if get_worker_info() is not None else out


CPU_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
CPU_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@dataclass
class Collate:
    """Stacks a step's items in the worker; standardises there too when training on the CPU
    (in parallel, where the training process would spend ~1 ms an image at 224 px); for a GPU
    the views stay uint8, a quarter of the bytes to copy, and are standardised on it."""
    standardize: bool

    def __call__(self, items: list[Item]) -> StepPart:
        kept = [item for item in items if item.bad is None and item.error is None]
        views = []
        for v in range(len(kept[0].views) if kept else 0):
            images = [item.views[v] for item in kept]
            shape = (len(images), *images[0].shape)                            # (B_rank, 3, s, s)
            if self.standardize:     # stacked as they are, then standardised into the shared batch
                views.append(standardize_pixels(torch.stack(images), batch_buffer(shape, torch.float32)))
            else:
                views.append(torch.stack(images, out=batch_buffer(shape, images[0].dtype)))
        return StepPart(torch.tensor([item.position for item in kept], dtype=torch.int64),
                        torch.tensor([item.label for item in kept], dtype=torch.int64), views, self.standardize,
                        {item.index: item.bad for item in items if item.bad is not None},
                        next((item.error for item in items if item.error is not None), None))


class StepSampler:
    """The DataLoader's batch sampler: for each step from `start` on, this rank's part of the
    step's global batch as (step, position, image index) keys. Endless: the trainer stops
    asking when its steps are done."""

    def __init__(self, order: EpochOrder, start: int, rank: int, world: int):
        self.order, self.start, self.rank, self.world = order, start, rank, world

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        step = self.start
        positions = rank_positions(self.order.batch_size, self.rank, self.world)
        while True:
            index = self.order.indices(step).tolist()
            yield [(step, position, index[position]) for position in positions]
            step += 1


def rank_positions(batch_size: int, rank: int, world: int) -> range:
    """The positions of the global batch that rank `rank` of `world` trains on (as MaskedViews)."""
    return range(rank * batch_size // world, (rank + 1) * batch_size // world)


def ignore_stop_signals(_worker_id: int) -> None:
    """A worker's init: SIGINT / SIGTERM sent to every process of the job (Ctrl-C to the process
    group, Slurm's pre-emption, `kill -TERM -PGID`) are the training process's to handle (it
    finishes the step and checkpoints); a worker that died of them would fail that step instead.
    A SIGTERM from the training process itself (the DataLoader's shutdown, multiprocessing at
    exit) still ends the worker: SIGTERM is blocked and taken by a thread that looks at its sender."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})     # threads started later inherit it
    parent = os.getppid()

    def take_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=take_sigterm, name="sigterm", daemon=True).start()


def default_workers() -> int:
    """DataLoader workers per process, at most MAX_WORKERS: the cores this process is bound to
    (a Slurm task's --cpus-per-task), or, when it may use the whole node (torchrun), its share
    of them among the node's ranks (LOCAL_WORLD_SIZE)."""
    node = os.cpu_count() or 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else node
    if cores >= node:
        cores //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_WORKERS, cores))


def check_part(part: StepPart, on_bad_image: str) -> None:
    """Raise, as one line, the DataError a worker met, or (on_bad_image="error") the first
    unreadable file of the part."""
    if part.error is not None:
        raise DataError(part.error)
    if part.bad and on_bad_image == "error":
        raise DataError(f"cannot read image {next(iter(part.bad.values()))}; remove it or pass --skip-bad-images")


class StepSource:
    """What the streaming BatchSources share: this rank's part of step s's global batch
    (`order`), each image made by `dataset` from its (step, position, image index) key in
    DataLoader workers and collated there (`Collate`), read from the step asked first on (a
    resumed run reads no batch before its step); unreadable files stop the run or are skipped
    and counted (`check_part`). A subclass makes the step's batch of that part (`assemble`).
    workers=0 reads in this process."""

    def __init__(self, dataset: Dataset, order: EpochOrder, device: torch.device, workers: int | None,
                 on_bad_image: str, standardize: bool, prefetch: int = 2, world: int = 1, rank: int = 0):
        if on_bad_image not in ("error", "skip"):
            raise DataError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.dataset, self.order, self.device = dataset, order, torch.device(device)
        self.steps_per_epoch = order.steps_per_epoch
        self.workers = default_workers() if workers is None else workers
        self.on_bad_image, self.standardize, self.prefetch = on_bad_image, standardize, prefetch
        self.world, self.rank = world, rank
        # the distinct unreadable files met so far (on_bad_image="skip"): image index -> "path (error)"
        self.skipped: dict[int, str] = {}
        self._parts: Iterator[StepPart] | None = None
        self._next_step = -1                # the step the running iterator yields next
        self._last: tuple[int, Any] | None = None

    def assemble(self, step: int, part: StepPart) -> Any:
        """Step `step`'s batch of this rank's part of it (its readable images)."""
        raise NotImplementedError

    def close(self) -> None:
        """End the workers now (they also end when the source is garbage collected)."""
        self._parts = self._last = None
        self._next_step = -1

    def describe(self) -> dict:
        """What a run record keeps of the source. skipped_images: the distinct unreadable files
        this process left out in this session (a file met in every epoch counts once; a resumed
        run counts from 0 again). Under torchrun each rank reads its own part of each batch and
        the record is rank 0's: not summed, as ranks meet the same file in different epochs and
        engine.distributed has no union of sets over ranks."""
        return {"kind": "stream", "images": len(self.dataset), "workers": self.workers,
                "skipped_images": len(self.skipped)}

    def batch_for_step(self, step: int) -> Any:
        if self._last is not None and self._last[0] == step:
            return self._last[1]            # (the trainer counts FLOPs on the step it trains first)
        if self._parts is None or step != self._next_step:
            self._parts = iter(self._loader(step))
        part = next(self._parts)
        self._next_step = step + 1
        batch = self.assemble(step, self._checked(step, part))
        self._last = (step, batch)
        return batch

    def _loader(self, start: int) -> DataLoader:
        extra = dict(prefetch_factor=self.prefetch, persistent_workers=False,
                     worker_init_fn=ignore_stop_signals) if self.workers else {}
        return DataLoader(self.dataset, batch_sampler=StepSampler(self.order, start, self.rank, self.world),
                          num_workers=self.workers, collate_fn=Collate(self.standardize),
                          pin_memory=self.device.type == "cuda", **extra)

    def _checked(self, step: int, part: StepPart) -> StepPart:
        check_part(part, self.on_bad_image)
        for index, name in part.bad.items():
            if index not in self.skipped:
                self.skipped[index] = name
                print(f"[data] skipped unreadable image {name} ({len(self.skipped)} distinct so far)", flush=True)
        if not len(part.positions):
            raise DataError(f"every image of step {step}'s batch on rank {self.rank} is unreadable "
                            f"(first: {next(iter(part.bad.values()))}); check the dataset's files")
        return part


class StreamingViews(StepSource):
    """A BatchSource of pre-training batches read from `reader` (see the module's docstring);
    the same Batch as MaskedViews gives. workers=0 decodes in this process."""

    def __init__(self, method, reader: ImageReader, batch_size: int, crop_scale_min: float, seed: int,
                 device: torch.device, workers: int | None = None, on_bad_image: str = "error",
                 prefetch: int = 2):
        device = torch.device(device)
        specs = method.view_specs(crop_scale_min)
        views = ImageViews(reader, list(zip(specs, view_augmentations(
            method.augmentation, len(specs), method.num_views))), seed)
        super().__init__(views, EpochOrder(len(reader), batch_size, seed, check=method.trains), device, workers,
                         on_bad_image, standardize=device.type == "cpu", prefetch=prefetch,
                         world=distributed.world_size(), rank=distributed.rank())
        self.method, self.reader, self.seed = method, reader, seed

    def assemble(self, step: int, part: StepPart) -> Batch:
        views = [view if part.standardized else standardize_pixels(view.to(self.device, non_blocking=True))
                 for view in part.views]                                    # (B_rank, 3, s, s)
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, stream=2))
        mask = self.method.draw_masks(self.order.batch_size, gen)           # the global batch's
        if mask is not None:
            mask = mask[..., part.positions, :]                             # this rank's readable rows
        return Batch.of_views(views, mask, self.device)
