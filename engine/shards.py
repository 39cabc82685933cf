"""WebDataset tar shards of an ImageFolder, read by index (the streaming source's second kind).

    python -m engine.shards /data/imagenet /data/imagenet-shards [--images-per-shard 5000]

writes, for each split (train/, test/) of the ImageFolder, `DEST/<split>/shard-000000.tar`, ...
in WebDataset's layout (one sample per image: `<key>.<ext>` holding the file's bytes as they
were, no re-encoding, and `<key>.cls` its label), in ImageFolder order, plus
`DEST/<split>/index.json`: the class names and, per shard, each image's offset and size in it.
A cluster copies a few hundred large files instead of 1.28M small ones, and
`--data DEST` trains on them like on the folder.

Reading goes by that index (`ShardReader.read(i)`: a seek and a read in shard i's tar), not as
a WebDataset stream: the epoch order stays a function of (seed, epoch), each rank reads only its
part of each global batch, and a resumed run starts at its step (engine.stream). Shards written
by other tools (webdataset's ShardWriter, `tarp`) are read too: without an index.json, their
numbered tars (`<prefix><digits>.tar`, as SHARD_PATTERN's `%06d` and ShardWriter's patterns name
them) are listed once (`<key>.cls` holding an integer label, class names "0", "1", ...).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
from pathlib import Path

import torch
from torch import Tensor

from core.files import atomic_write
from engine.data import IMAGE_SUFFIXES, DataError, check_dataset_root, list_images

INDEX = "index.json"
SHARD_PATTERN = "shard-%06d.tar"
# a shard's name: a writer's pattern with a shard number before .tar; an ImageFolder's stray
# `backup.tar` or `images.tar` is not one
SHARD_NAME = re.compile(r".*\d+\.tar")


def shard_files(split_dir: Path) -> list[Path]:
    """The tars of `split_dir` named like shards, in order."""
    return sorted(path for path in split_dir.glob("*.tar") if SHARD_NAME.fullmatch(path.name) and path.is_file())


def is_shard_split(split_dir: Path) -> bool:
    """A split folder of tar shards (rather than class folders): it holds index.json or a tar
    named like a shard."""
    return (split_dir / INDEX).is_file() or bool(shard_files(split_dir))


class ShardReader:
    """Images of a split of tar shards, by index (engine.stream.ImageReader)."""

    def __init__(self, split_dir: str | Path):
        self.root = Path(split_dir).expanduser().resolve()
        index = read_index(self.root)
        self.classes = index["classes"]
        self.shards = [entry["file"] for entry in index["shards"]]
        # one row per image: (shard, offset, size, label)
        rows = [(shard, offset, size, label) for shard, entry in enumerate(index["shards"])
                for offset, size, label in entry["members"]]
        if not rows:
            raise DataError(f"the shards in {self.root} hold no images; write them again with python -m engine.shards")
        self.places = torch.tensor([row[:3] for row in rows], dtype=torch.int64)    # (N, 3)
        self.labels: Tensor = torch.tensor([row[3] for row in rows], dtype=torch.int64)
        self._files: dict[int, object] = {}     # open shards, per process (never pickled)

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def read(self, index: int) -> bytes:
        shard, offset, size = self.places[index].tolist()
        handle = self._files.get(shard)
        if handle is None:
            try:
                handle = self._files[shard] = open(self.root / self.shards[shard], "rb")
            except FileNotFoundError:
                raise DataError(f"shard {self.root / self.shards[shard]} is missing; copy it back or write "
                                f"the shards again (python -m engine.shards)") from None
        handle.seek(offset)
        return handle.read(size)

    def name(self, index: int) -> str:
        shard, offset, _ = self.places[index].tolist()
        return f"{self.root / self.shards[shard]} at byte {offset}"


def read_index(split_dir: Path) -> dict:
    """The split's index.json, or (shards of another writer) one listed from the tars."""
    path = split_dir / INDEX
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path} does not parse ({err.msg}); delete it (it is listed from the shards "
                            f"again) or write the shards again") from None
    tars = shard_files(split_dir)
    if not tars:
        raise DataError(f"{split_dir} holds neither {INDEX} nor numbered *.tar shards; write them with "
                        f"python -m engine.shards")
    shards, labels = [], set()
    for tar in tars:
        members = list_members(tar)
        labels.update(label for _, _, label in members)
        shards.append({"file": tar.name, "members": members})
    return {"classes": [str(label) for label in range(max(labels) + 1)], "shards": shards}


def list_members(tar_path: Path) -> list[list[int]]:
    """[offset, size, label] of each image of a WebDataset tar (an image member and its
    `.cls` member share a key)."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if ext == "cls":
                    labels[key] = int(tar.extractfile(member).read().decode().strip())
                elif f".{ext.lower()}" in IMAGE_SUFFIXES:
                    images[key] = (member.offset_data, member.size)
    except (tarfile.TarError, ValueError) as err:
        raise DataError(f"cannot read shard {tar_path} ({err.__class__.__name__}: {err}); copy it again") from None
    missing = sorted(set(images) - set(labels))
    if missing:
        raise DataError(f"shard {tar_path}: image {missing[0]!r} has no {missing[0]}.cls label; write the "
                        f"shards with python -m engine.shards")
    return [[*images[key], labels[key]] for key in images]


def write_shards(split_dir: Path, dest: Path, images_per_shard: int = 5000) -> int:
    """`split_dir/<class>/*` as tar shards in `dest` (with index.json); returns the image count."""
    import webdataset

    classes, files = list_images(split_dir)
    dest.mkdir(parents=True, exist_ok=True)
    # the old index goes first: a write stopped midway must not leave its offsets over new tars
    # (without it the tars written so far are listed from their members)
    (dest / INDEX).unlink(missing_ok=True)
    for old in dest.glob("shard-*.tar"):
        old.unlink()
    # mtime 0: the same folder gives byte-identical shards
    with webdataset.ShardWriter(str(dest / SHARD_PATTERN), maxcount=images_per_shard, verbose=0, mtime=0) as sink:
        for number, (rel, label) in enumerate(files):
            path = split_dir / rel
            sink.write({"__key__": f"{number:09d}", path.suffix.lower().lstrip("."): path.read_bytes(),
                        "cls": label})
    shards = [{"file": tar.name, "members": list_members(tar)} for tar in sorted(dest.glob("shard-*.tar"))]
    with atomic_write(dest / INDEX, "w") as f:
        json.dump({"classes": classes, "source": str(split_dir), "shards": shards}, f)
    return len(files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="an ImageFolder with train/ and test/")
    parser.add_argument("dest", help="where the shards go (DEST/train/, DEST/test/)")
    parser.add_argument("--images-per-shard", type=int, default=5000,
                        help="images per tar (default 5000: ~0.5 GB of ImageNet JPEGs)")
    args = parser.parse_args(argv)
    try:
        source = check_dataset_root(args.source)
        if args.images_per_shard < 1:
            raise DataError(f"--images-per-shard {args.images_per_shard}: pass 1 or more")
        for split in ("train", "test"):
            count = write_shards(source / split, Path(args.dest).expanduser() / split, args.images_per_shard)
            print(f"{split}: {count} images in {Path(args.dest) / split}")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"train on them with --data {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
