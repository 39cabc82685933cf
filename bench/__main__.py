"""Training-step throughput of every method at identical configs, in ONE process.

    python -m bench [--size tiny] [--batch 128] [--reps 7] [--threads 2]

Each competitor is a step function (forward + backward + AdamW step) on the same input.
Repetitions are interleaved (A B C A B C ...) so machine noise hits all alike; we report
the median img/s and the spread (min-max over repetitions), ratios to the anchors, and
model FLOPs utilisation (FLOPs of the step, counted by torch.utils.flop_counter with
attention unfused, over a matmul peak measured in this process at the same dtype).

Anchors: lightly's MAE (`MaskedVisionTransformerTIMM` + `MAEDecoderTIMM`, its random
token mask, MSE on masked patches) at the same ViT, decoder, mask ratio and batch; a plain
timm `VisionTransformer` full-token step (the cost of "no masking"). Results go to
bench/results.json (git-ignored). lightly is optional: `pip install lightly` (the `bench`
extra); without it those rows are skipped with a message.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from methods import build_method, registry
from methods.base import Batch
from methods.vit import ViTConfig, patchify

RESULTS = Path(__file__).parent / "results.json"


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """Sustained FLOP/s of an n x n matmul (median of `reps`)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Competitor:
    """A named training step on a fixed batch."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]):
        self.name, self.model, self.loss_fn = name, model, loss_fn
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, foreach=True)
        self.rates: list[float] = []
        self.flops: int | None = None

    def step(self) -> None:
        loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def count_flops(self) -> int:
        attns = [m for m in self.model.modules() if hasattr(m, "fused_attn")]
        for m in attns:
            m.fused_attn = False
        counter = FlopCounterMode(display=False)
        with counter:
            self.loss_fn().backward()
        self.optimizer.zero_grad(set_to_none=True)
        for m in attns:
            m.fused_attn = True
        self.flops = int(counter.get_total_flops())
        return self.flops


def our_method(name: str, enc: ViTConfig, batch: int, mask_ratio: float, decoder: tuple[int, int, int],
               images: torch.Tensor, device: torch.device) -> Competitor:
    overrides: dict = {"encoder": dict(size=enc.size, img_size=enc.img_size, patch_size=enc.patch_size)}
    if name == "mae":
        overrides.update(decoder_dim=decoder[0], decoder_depth=decoder[1], decoder_heads=decoder[2],
                         norm_pix_loss=False, mask={"strategy": "random", "ratio": mask_ratio})
    method = build_method(name, **overrides).to(device).train()
    gen = torch.Generator().manual_seed(0)
    views = [images] * method.num_views
    mask = method.draw_masks(batch, gen)
    data = Batch(images=images, mask=None if mask is None else mask.to(device),
                 views=views if method.num_views > 1 else None)

    def loss_fn():
        loss, _ = method(data)
        return loss

    def step_with_hooks():
        loss_fn().backward()
        competitor.optimizer.step()
        competitor.optimizer.zero_grad(set_to_none=True)
        method.after_step(0, 1000)   # iBOT's EMA update is part of its step

    competitor = Competitor(name, method, loss_fn)
    competitor.step = step_with_hooks
    return competitor


def timm_full_token(enc: ViTConfig, images: torch.Tensor, device: torch.device) -> Competitor:
    vit = VisionTransformer(**enc.timm_kwargs()).to(device).train()
    head = torch.nn.Linear(enc.embed_dim, enc.patch_size ** 2 * 3).to(device)
    model = torch.nn.ModuleDict({"vit": vit, "head": head})
    target = patchify(images, enc.patch_size)

    def loss_fn():
        tokens = vit.forward_features(images)[:, 1:]
        return F.mse_loss(head(tokens), target)

    return Competitor("timm full-token ViT", model, loss_fn)


def lightly_mae(enc: ViTConfig, images: torch.Tensor, mask_ratio: float, decoder: tuple[int, int, int],
                device: torch.device) -> Competitor | None:
    try:
        from lightly.models import utils
        from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM
    except ImportError:
        return None
    vit = VisionTransformer(**enc.timm_kwargs())
    backbone = MaskedVisionTransformerTIMM(vit=vit)
    dec = MAEDecoderTIMM(num_patches=enc.num_patches, patch_size=enc.patch_size, embed_dim=enc.embed_dim,
                         decoder_embed_dim=decoder[0], decoder_depth=decoder[1], decoder_num_heads=decoder[2],
                         mlp_ratio=4.0, proj_drop_rate=0.0, attn_drop_rate=0.0)
    model = torch.nn.ModuleDict({"backbone": backbone, "decoder": dec}).to(device).train()
    batch = images.shape[0]
    seq_len = backbone.sequence_length

    def loss_fn():
        idx_keep, idx_mask = utils.random_token_mask(size=(batch, seq_len), mask_ratio=mask_ratio,
                                                     device=images.device)
        encoded = backbone.encode(images=images, idx_keep=idx_keep)
        tokens = dec.embed(encoded)
        full = utils.repeat_token(dec.mask_token, (batch, seq_len))
        full = utils.set_at_index(full, idx_keep, tokens.type_as(full))
        decoded = dec.decode(full)
        pred = dec.predict(utils.get_at_index(decoded, idx_mask))
        target = utils.get_at_index(utils.patchify(images, enc.patch_size), idx_mask - 1)
        return F.mse_loss(pred, target)

    return Competitor("lightly MAE", model, loss_fn)


def measure(competitors: list[Competitor], reps: int, steps_per_rep: int, batch: int,
            device: torch.device) -> None:
    for c in competitors:              # warm-up: allocation, lazy init
        for _ in range(2):
            c.step()
    for _ in range(reps):
        for c in competitors:          # interleaved
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps_per_rep):
                c.step()
            sync(device)
            c.rates.append(steps_per_rep * batch / (time.perf_counter() - t0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", help="ViT size (default tiny: 192-d x 12)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--decoder", default="128,2,4", help="MAE decoder dim,depth,heads (default 128,2,4)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed repetition")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of our methods")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    enc = ViTConfig(size=args.size, img_size=args.img_size, patch_size=args.patch_size)
    enc.validate()
    decoder = tuple(int(x) for x in args.decoder.split(","))
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, enc.img_size, enc.img_size, device=device)

    names = args.methods.split(",") if args.methods else sorted(n for n, (c, _) in registry.items() if c.trains)
    competitors = [our_method(n, enc, args.batch, args.mask_ratio, decoder, images, device) for n in names]
    competitors.append(timm_full_token(enc, images, device))
    lightly = lightly_mae(enc, images, args.mask_ratio, decoder, device)
    if lightly is None:
        print("lightly is not installed (pip install lightly): its rows are skipped")
    else:
        competitors.append(lightly)

    peak = matmul_peak(torch.float32, device)
    for c in competitors:
        c.count_flops()
    print(f"device {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32; ViT-{args.size} {enc.img_size}px/p{enc.patch_size}, "
          f"batch {args.batch}, mask {args.mask_ratio}, MAE decoder {decoder}; matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s")
    measure(competitors, args.reps, args.steps, args.batch, device)

    by_name = {c.name: c for c in competitors}
    rows, results = [], {"machine": {"device": str(device), "threads": torch.get_num_threads(),
                                     "torch": torch.__version__, "matmul_peak_flops": peak},
                         "config": vars(args)}
    for c in competitors:
        median = statistics.median(c.rates)
        step_time = args.batch / median
        mfu = c.flops / step_time / peak
        results.setdefault("throughput", {})[c.name] = {"img_per_s": median, "min": min(c.rates),
                                                       "max": max(c.rates), "flops_per_step": c.flops,
                                                       "mfu": mfu}
        results.setdefault("mfu", {})[c.name] = mfu
        rows.append((c.name, median, min(c.rates), max(c.rates), c.flops / args.batch / 1e9, mfu))

    def ratio(a: str, b: str, key: str) -> None:
        if a in by_name and b in by_name:
            ra, rb = statistics.median(by_name[a].rates), statistics.median(by_name[b].rates)
            results[key] = {a: ra, b: rb, "ratio": ra / rb}

    ratio("mae", "lightly MAE", "mae_vs_lightly")
    for name in names:
        ratio(name, "timm full-token ViT", f"{name}_vs_timm_full_token")
        if name != "mae":
            ratio("mae", name, f"mae_vs_{name}")

    print(f"\n{'step':24s} {'img/s':>8s} {'min':>8s} {'max':>8s} {'GFLOP/img':>10s} {'MFU':>6s}")
    for name, median, low, high, gflop, mfu in rows:
        print(f"{name:24s} {median:8.1f} {low:8.1f} {high:8.1f} {gflop:10.3f} {mfu:6.1%}")
    print()
    for key, value in results.items():
        if isinstance(value, dict) and "ratio" in value:
            print(f"{key:32s} {value['ratio']:.2f}x")
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
