"""`make bench-data`: the streaming loader (engine.stream) against MAE's loader, on JPEGs it makes.

    python -m bench.data [--images 2000] [--size 224] [--workers 1,2,N] [--folder DIR]

On a synthetic ImageNet-layout folder (`train/<class>/*.JPEG`, 300-500 px a side, smooth
colour fields with texture, quality 90, so files are photo-sized, not noise-sized), in one
process, interleaved:

    stream        engine.stream.StreamingViews: MAE's views at `--size` (RandomResizedCrop 0.2-1,
                  bicubic, flip) and its masks, one rank's batches from workers
    torchvision   MAE's main_pretrain.py loader: datasets.ImageFolder + RandomResizedCrop(0.2-1,
                  bicubic) + RandomHorizontalFlip + ToTensor + Normalize, a DataLoader with the
                  same workers, batch and pinned memory off (CPU)
    decode        the decode-only ceiling: the same files read and decoded (torchvision.io) by the
                  same workers, nothing else

img/s at 1, 2 and all workers; then the peak RSS of a streaming pass over the folder and over
one 10x larger (the loader holds file names and labels, never images: it must stay flat).
Writes bench/data_results.json (keys stream_vs_torchvision, decode_ceiling_share, rss_mb).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).with_name("data_results.json")


def make_jpeg_folder(root: str | Path, num_classes: int, per_class: int, min_px: int = 300, max_px: int = 500,
                     seed: int = 0, quality: int = 90) -> Path:
    """`root/<class>/<i>.JPEG`, ImageNet's layout: each image a smooth field of its class's hue
    with a random texture, `min_px`-`max_px` a side (random aspect). Returns `root`."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        hue = np.array([(c * 37) % 255, (c * 91) % 255, (c * 53) % 255], dtype=np.float32)
        for i in range(per_class):
            width, height = (int(v) for v in rng.integers(min_px, max_px + 1, 2))
            coarse = rng.random((max(2, height // 16), max(2, width // 16), 3), dtype=np.float32)
            field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC),
                               dtype=np.float32)
            texture = rng.normal(0, 12, (height, width, 1)).astype(np.float32)
            pixels = np.clip(0.5 * field + 0.5 * hue + texture, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{c}_{i}.JPEG", quality=quality)
    return root


def link_copies(src: Path, dest: Path, copies: int) -> Path:
    """`dest` with each file of `src` under `copies` names (hard links: a folder 10x the size in
    file count, at no disk cost; the loader cannot tell)."""
    for path in sorted(src.rglob("*.JPEG")):
        folder = dest / path.parent.relative_to(src)
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            os.link(path, folder / f"{path.stem}_{k}{path.suffix}")
    return dest


class DecodeOnly:
    """The ceiling: the same files read and decoded as the streaming source does, nothing else."""

    def __init__(self, folder: Path):
        from engine.stream import FolderReader

        self.reader = FolderReader(folder)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int):
        from engine.stream import decode_rgb

        return decode_rgb(self.reader.read(index)).shape[1]


def first(items):
    return items


def mae_method(size: int):
    """MAE's views and masks at `size` px (patch 16); the encoder is never run here."""
    from methods import build_method

    return build_method("mae", encoder={"size": "micro", "img_size": size, "patch_size": 16},
                        decoder_dim=32, decoder_depth=1, decoder_heads=2)


def torchvision_loader(folder: Path, size: int, batch: int, workers: int):
    """MAE's main_pretrain.py loader: ImageFolder + RandomResizedCrop(0.2-1, bicubic) + flip +
    ToTensor + Normalize, shuffled, the last partial batch dropped."""
    import torch
    from torchvision import datasets, transforms

    from engine.data import IMAGENET_MEAN, IMAGENET_STD

    transform = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), transform=transform), batch_size=batch,
                                       shuffle=True, num_workers=workers, drop_last=True, persistent_workers=False)


def images_per_second(kind: str, folder: Path, size: int, batch: int, workers: int, steps: int) -> float:
    """img/s of `steps` batches after the first (worker start-up and the first batch excluded)."""
    import torch

    if kind == "stream":
        from engine.stream import FolderReader, StreamingViews

        source = StreamingViews(mae_method(size), FolderReader(folder), batch, 0.2, seed=0,
                                device=torch.device("cpu"), workers=workers)
        source.batch_for_step(0)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            source.batch_for_step(step)
        seconds = time.perf_counter() - start
        del source
        return steps * batch / seconds
    if kind == "torchvision":
        loader = torchvision_loader(folder, size, batch, workers)
    else:
        loader = torch.utils.data.DataLoader(DecodeOnly(folder), batch_size=batch, shuffle=True,
                                             num_workers=workers, collate_fn=first, drop_last=True)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    seconds = time.perf_counter() - start
    del batches
    return steps * batch / seconds


def peak_rss_mb(folder: Path, size: int, batch: int, workers: int, steps: int) -> dict:
    """Peak RSS (MB) of a fresh process streaming `steps` batches of `folder`: its own and its
    largest worker's."""
    probe = [sys.executable, "-m", "bench.data", "--rss-probe", str(folder), "--size", str(size),
             "--batch", str(batch), "--workers", str(workers), "--steps", str(steps)]
    out = subprocess.run(probe, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    return json.loads(out.strip().splitlines()[-1])


def rss_probe(folder: Path, size: int, batch: int, workers: int, steps: int) -> None:
    import resource

    images_per_second("stream", folder, size, batch, workers, steps)
    print(json.dumps({"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    return f"{os.cpu_count()} cores, {cpu}"


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="JPEGs in the synthetic folder (default 1000)")
    parser.add_argument("--size", type=int, default=224, help="view size in px (default 224, MAE's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed batches per measurement (default 10)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median; default 3)")
    parser.add_argument("--workers", default=None,
                        help="comma-separated worker counts (default 1,2 and all cores)")
    parser.add_argument("--folder", default=None, help="keep the synthetic folder here (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--rss-probe", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def loader_rates(folder: Path, counts: list[int], args: argparse.Namespace) -> dict:
    """Median img/s of each loader at each worker count, repetitions interleaved across loaders;
    each count's line printed as it is measured."""
    figures: dict = {}
    for workers in counts:
        runs = {kind: [] for kind in ("stream", "torchvision", "decode")}
        for _ in range(args.reps):
            for kind in runs:
                runs[kind].append(images_per_second(kind, folder, args.size, args.batch, workers, args.steps))
        medians = figures[str(workers)] = {kind: statistics.median(values) for kind, values in runs.items()}
        print(f"{workers} worker(s): " + ", ".join(f"{kind} {v:.0f} img/s" for kind, v in medians.items()), flush=True)
    return figures


def rss_at_scale(folder: Path, large: Path, args: argparse.Namespace, workers: int) -> dict:
    """Peak RSS streaming `folder` and `large` (its 10x hard-linked copy, made when missing), and
    the growth from one to the other."""
    if not large.is_dir():
        link_copies(folder, large, 10)
    rss = {label: peak_rss_mb(path, args.size, args.batch, workers, args.steps)
           for label, path in (("1x", folder), ("10x", large))}
    rss["growth"] = {part: rss["10x"][part] / rss["1x"][part] - 1 for part in ("main", "largest_worker")}
    return rss


def summary(args: argparse.Namespace, figures: dict, rss: dict, num_images: int) -> dict:
    import torch

    return {
        "machine": machine(), "load_average_at_end": os.getloadavg(), "torch": torch.__version__,
        "images": num_images, "image_px": "300-500 a side, JPEG quality 90", "view_px": args.size,
        "batch": args.batch, "steps": args.steps, "reps": args.reps,
        "img_per_s": figures,
        "stream_vs_torchvision": {w: f["stream"] / f["torchvision"] for w, f in figures.items()},
        "decode_ceiling_share": {w: f["stream"] / f["decode"] for w, f in figures.items()},
        "rss_mb": rss,
    }


def print_summary(results: dict) -> None:
    rss = results["rss_mb"]
    for key in ("stream_vs_torchvision", "decode_ceiling_share"):
        print(f"{key}: " + ", ".join(f"{w} workers {v:.2f}" for w, v in results[key].items()))
    print(f"peak RSS (MB) 1x / 10x images: main {rss['1x']['main']:.0f} / {rss['10x']['main']:.0f}, "
          f"largest worker {rss['1x']['largest_worker']:.0f} / {rss['10x']['largest_worker']:.0f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rss_probe:
        rss_probe(Path(args.rss_probe), args.size, args.batch, int(args.workers), args.steps)
        return 0
    import torch

    torch.set_num_threads(1)
    counts = sorted({int(w) for w in args.workers.split(",")}) if args.workers else sorted({1, 2, os.cpu_count() or 1})
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.folder or tmp)
        folder = base / "train"
        if not folder.is_dir():
            classes = 10
            make_jpeg_folder(folder, classes, max(1, args.images // classes))
        figures = loader_rates(folder, counts, args)
        rss = rss_at_scale(folder, base / "train-10x", args, max(counts))
        num_images = sum(1 for _ in folder.rglob("*.JPEG"))
    results = summary(args, figures, rss, num_images)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
