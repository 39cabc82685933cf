"""The figures step of a run: on a fixed set of test images (the first image of each of
the first 8 classes), write into `<run>/figures/`
    reconstructions.png  original | masked input | prediction | prediction with the visible
                         patches pasted back (mae and pixel predict pixels; BEiT's predicted
                         tokens are decoded by its tokenizer; iBOT has none)
    attention.png        last-layer [CLS] attention, mean over heads, over each image (BEiT Fig. 2)
so that the report only collects files."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from engine.data import ImageSet, denormalize, normalize  # noqa: E402
from methods.base import Batch, MIMMethod  # noqa: E402
from methods.vit import patchify, unpatchify  # noqa: E402

NUM_IMAGES = 8


def fixed_images(test: ImageSet) -> torch.Tensor:
    return test.images[first_of_each_class(test.labels)]


def first_of_each_class(labels: torch.Tensor) -> list[int]:
    """The figures' images: the first test image of each of the first NUM_IMAGES classes."""
    return [int(torch.nonzero(labels == c)[0]) for c in labels.unique()[:NUM_IMAGES]]


def to_display(images: torch.Tensor) -> torch.Tensor:
    """Normalised (B, 3, H, W) -> (B, H, W, 3) in [0, 1]."""
    return denormalize(images.cpu()).clamp(0, 1).permute(0, 2, 3, 1)


@torch.no_grad()
def write_figures(method: MIMMethod, test: ImageSet, run_dir: Path, device: str = "cpu") -> list[Path]:
    out_dir = Path(run_dir) / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    method = method.eval().to(device)
    images = normalize(fixed_images(test).to(device))
    patch = method.cfg.encoder.patch_size
    written = []

    mask = method.draw_masks(len(images), torch.Generator().manual_seed(0))
    recon = None
    if mask is not None and mask.dim() == 2:
        recon = method.reconstruct(Batch(images=images, mask=mask.to(device)))
    if recon is not None:
        keep = (~mask).to(device).unsqueeze(-1).float()                   # (B, N, 1)
        masked = unpatchify(patchify(images, patch) * keep, patch)
        pasted = unpatchify(patchify(images, patch) * keep + patchify(recon, patch) * (1 - keep), patch)
        rows = [("original", images), ("masked", masked), ("prediction", recon), ("pasted", pasted)]
        path = out_dir / "reconstructions.png"
        _grid(rows, path, f"{method.name}: masked-image reconstructions ({mask.float().mean():.0%} masked)")
        written.append(path)

    encoder = method.export_encoder().eval().to(device)
    attn = encoder.last_attention(images)[:, :, 0, 1:].mean(dim=1)       # (B, N): [CLS] -> patches
    grid = encoder.cfg.grid
    maps = attn.view(-1, 1, grid, grid)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="nearest")[:, 0].cpu()
    fig, axes = plt.subplots(2, len(images), figsize=(1.3 * len(images), 2.8))
    for i, (img, heat) in enumerate(zip(to_display(images), maps)):
        axes[0, i].imshow(img)
        axes[1, i].imshow(img)
        axes[1, i].imshow(heat, cmap="inferno", alpha=0.6)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{method.name}: last-layer [CLS] attention (mean over heads)", fontsize=9)
    path = out_dir / "attention.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    return written


def _grid(rows, path: Path, title: str) -> None:
    fig, axes = plt.subplots(len(rows), rows[0][1].shape[0], figsize=(1.3 * rows[0][1].shape[0], 1.4 * len(rows)))
    for r, (label, batch) in enumerate(rows):
        for i, img in enumerate(to_display(batch)):
            axes[r, i].imshow(img)
            axes[r, i].axis("off")
        axes[r, 0].set_title(label, fontsize=7, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
