"""Images as cached uint8 tensors, and batched augmentation on those tensors.

`load_imagefolder(root, img_size)` decodes an ImageFolder split (`root/<class>/*.jpg`)
once into a uint8 array cached under ~/.cache/mimbench/datasets, keyed by the folder's
absolute path, its file list and the output size; later loads take under a second.
Images of another size are resized (shorter side) and centre-cropped to `img_size`;
grayscale or RGBA images are converted to RGB.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.nn import functional as F
from tqdm import tqdm

from core.device import to_device
from core.files import atomic_write

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}
DATA_ROOT_ENV = "MIMBENCH_DATA"


def data_root() -> Path:
    """The folder of the shipped datasets (cifar10/, camvid/): $MIMBENCH_DATA, or
    ../shared/datasets beside the repository."""
    return Path(os.environ.get(DATA_ROOT_ENV) or Path(__file__).resolve().parents[1].parent / "shared" / "datasets")


class DataError(Exception):
    """A dataset problem the user can fix; the message says how."""


@dataclass
class ImageSet:
    images: Tensor          # (N, 3, H, W) uint8
    labels: Tensor          # (N,) int64
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.classes)


@dataclass
class Splits:
    train: ImageSet         # the whole published train split (pre-training, k-NN memory)
    test: ImageSet          # the published test split, touched once per evaluation
    fit: ImageSet           # train minus the held-out part (hyper-parameter search)
    holdout: ImageSet       # a fixed held-out part of train (hyper-parameter choice)


def cache_dir() -> Path:
    return Path(os.environ.get("MIMBENCH_CACHE", Path.home() / ".cache" / "mimbench"))


HOLDOUT_IMAGES = 5000      # train images held out for hyper-parameter choices (at most a fifth)


def load_splits(root: str | Path, img_size: int, holdout: int = HOLDOUT_IMAGES,
                on_bad_image: str = "error", progress: bool = True) -> Splits:
    """train/ and test/ of an ImageFolder dataset, plus a fixed held-out part of train."""
    root = check_dataset_root(root)        # (the class folders of both splits match)
    train = load_imagefolder(root / "train", img_size, on_bad_image, progress)
    test = load_imagefolder(root / "test", img_size, on_bad_image, progress)
    return split_holdout(train, test, holdout)


def check_dataset_root(root: str | Path) -> Path:
    """Fail fast (before any run starts) when `root` is not an ImageFolder with train/ and test/."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {root} not found; pass --data PATH to an ImageFolder "
                        f"with train/ and test/ (the default is $MIMBENCH_DATA/cifar10, else ../shared/datasets/cifar10)")
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise DataError(f"dataset folder {root} has no {' or '.join(missing)}/ subfolder; "
                        f"expected {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg")
    train, test = class_folders(root / "train"), class_folders(root / "test")
    if train and test:          # (splits of tar shards have none: their index names the classes)
        check_same_classes(root, train, test)
    return root


def class_folders(split_dir: Path) -> list[str]:
    """The class folders of an ImageFolder split, sorted: label i is the i-th."""
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir())


def check_same_classes(root: Path, train: list[str], test: list[str], shown: int = 5) -> None:
    """A label is a position in the split's classes: train/ and test/ must list the same ones,
    in the same order. Raises DataError naming the classes only one split has (a few of them)."""
    if list(train) == list(test):
        return

    def names(only: list[str]) -> str:
        more = f" and {len(only) - shown} more" if len(only) > shown else ""
        return ", ".join(only[:shown]) + more

    only_train = [name for name in train if name not in set(test)]
    only_test = [name for name in test if name not in set(train)]
    if not only_train and not only_test:
        raise DataError(f"train/ and test/ of {root} name the same classes in another order; write both "
                        f"splits with one class list")
    differ = "; ".join(f"only in {split}/: {names(only)}" for split, only in (("train", only_train),
                                                                            ("test", only_test)) if only)
    raise DataError(f"train/ and test/ of {root} have different class folders ({differ}); rename or remove "
                    f"them so both splits hold the same classes")


def holdout_size(num_train: int, holdout: int = HOLDOUT_IMAGES) -> int:
    """How many of `num_train` images are held out: `holdout`, at most a fifth."""
    return min(holdout, num_train // 5)


def holdout_positions(num_train: int, holdout: int = HOLDOUT_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, holdout): the positions in train of each part. Fixed seed: the held-out part is a
    property of the dataset, not of a run."""
    holdout = holdout_size(num_train, holdout)
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(0))
    return order[holdout:], order[:holdout]


def split_holdout(train: ImageSet, test: ImageSet, holdout: int) -> Splits:
    fit, held_out = holdout_positions(len(train), holdout)
    return Splits(train, test, train.subset(fit), train.subset(held_out))


def list_images(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    classes = class_folders(split_dir)
    if not classes:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    files = []
    for label, name in enumerate(classes):
        images = [(str(p.relative_to(split_dir)), label)
                  for p in sorted((split_dir / name).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            # a class without images would shift every later label by one against the other
            # split (torchvision's ImageFolder refuses it too)
            raise DataError(f"class folder {split_dir / name} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder")
        files += images
    return classes, files


def load_imagefolder(split_dir: str | Path, img_size: int, on_bad_image: str = "error",
                     progress: bool = True) -> ImageSet:
    """Decode `split_dir/<class>/*` to (N, 3, img_size, img_size) uint8, cached.

    on_bad_image: "error" stops at the first unreadable file, naming it; "skip" leaves
    such files out and prints how many were skipped.
    """
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    split_dir = Path(split_dir).resolve()
    if not split_dir.is_dir():
        raise DataError(f"image folder {split_dir} not found; pass the path of an ImageFolder split")
    classes, files = list_images(split_dir)
    key = hashlib.sha1(json.dumps([str(split_dir), img_size, on_bad_image, files]).encode()).hexdigest()[:16]
    path = cache_dir() / "datasets" / f"{split_dir.parent.name}-{split_dir.name}-{img_size}px-{key}.npz"
    if path.exists():
        with np.load(path) as cached:
            return ImageSet(torch.from_numpy(cached["images"]), torch.from_numpy(cached["labels"]), classes)

    images = np.empty((len(files), img_size, img_size, 3), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    kept = 0
    for rel, label in tqdm(files, desc=f"decoding {split_dir.name}/ (once)", unit="img", leave=False,
                           disable=not progress, mininterval=1.0):
        try:
            with Image.open(split_dir / rel) as img:
                images[kept] = to_square_rgb(img, img_size)
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            if on_bad_image == "error":
                raise DataError(f"cannot read image {split_dir / rel} ({err.__class__.__name__}); "
                                f"remove it or pass on_bad_image='skip' (--skip-bad-images)") from None
            continue
        labels[kept] = label
        kept += 1
    if kept < len(files):
        print(f"[data] skipped {len(files) - kept} unreadable file(s) in {split_dir}")
    images, labels = images[:kept].transpose(0, 3, 1, 2).copy(), labels[:kept]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        np.savez(f, images=images, labels=labels)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), classes)


def to_square_rgb(img: Image.Image, size: int) -> np.ndarray:
    img = img.convert("RGB")
    if img.size != (size, size):
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def synthetic_splits(img_size: int = 32, num_classes: int = 10, train_per_class: int = 64,
                     test_per_class: int = 32, seed: int = 0) -> Splits:
    """A small labelled dataset for the `smoke` profile: each class is an oriented colour
    grating with its own frequency, plus noise, so a k-NN on pixels is far above chance."""
    gen = torch.Generator().manual_seed(seed)

    def make(per_class: int) -> ImageSet:
        coords = torch.linspace(0, 1, img_size)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        images, labels = [], []
        for label in range(num_classes):
            angle = math.pi * label / num_classes
            freq = 2 + label % 4
            phase = torch.rand(per_class, 1, 1, generator=gen) * 2 * math.pi
            wave = torch.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
            colour = torch.tensor([(label * 37) % 255, (label * 91) % 255, (label * 53) % 255]) / 255
            img = 0.5 + 0.35 * wave[:, None] * (0.5 + colour[None, :, None, None])
            img = img + 0.08 * torch.randn(per_class, 3, img_size, img_size, generator=gen)
            images.append((img.clamp(0, 1) * 255).to(torch.uint8))
            labels.append(torch.full((per_class,), label))
        return ImageSet(torch.cat(images), torch.cat(labels), [f"class{i}" for i in range(num_classes)])

    train, test = make(train_per_class), make(test_per_class)
    return split_holdout(train, test, holdout=len(train) // 5)


# the one place for the ImageNet statistics every pipeline normalises with (timm's values)
IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def normalize(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float, ImageNet mean/std (as the papers' pipelines)."""
    return standardize(images.float() / 255)


def standardize(images: Tensor) -> Tensor:
    """Float pixels in [0, 1] (B, 3, H, W) -> ImageNet mean/std."""
    mean, std = mean_std_on(images.device)
    return (images - mean) / std


def denormalize(images: Tensor) -> Tensor:
    """The inverse of `normalize`, as float pixels in [0, 1] (not clamped)."""
    mean, std = mean_std_on(images.device)
    return images.float() * std + mean


@lru_cache(maxsize=8)
def mean_std_on(device: torch.device) -> tuple[Tensor, Tensor]:
    """ImageNet's mean and std as (1, 3, 1, 1) tensors on `device` (copied there once)."""
    return _MEAN.to(device), _STD.to(device)


def random_resized_crop_flip(images: Tensor, out_size: int, generator: torch.Generator,
                             scale: tuple[float, float] = (0.2, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3), standardized: bool = True) -> Tensor:
    """Batched RandomResizedCrop + horizontal flip (the MAE/BEiT pre-training augmentation).

    uint8 (B, 3, H, W) -> normalised float (B, 3, out, out), or float pixels in [0, 1] with
    `standardized=False` (for photometric augmentation before `standardize`). One affine grid per image,
    one `grid_sample` for the batch: no per-image Python work. Crop sizes follow
    torchvision's sampling (area fraction in `scale`, log-uniform aspect in `ratio`),
    clipped to the image instead of resampled.
    """
    b = images.shape[0]
    rand = torch.rand(b, 5, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * rand[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand[:, 1]
    aspect = log_r.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)       # fraction of the image width
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (rand[:, 2] * (1 - w) + w / 2) * 2 - 1      # crop centre in [-1, 1]
    cy = (rand[:, 3] * (1 - h) + h / 2) * 2 - 1
    flip = torch.where(rand[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    theta = to_device(theta, images.device)
    grid = F.affine_grid(theta, [b, 3, out_size, out_size], align_corners=False)
    pixels = normalize(images) if standardized else images.float() / 255
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
