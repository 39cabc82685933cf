"""Timed training steps: a `Competitor` is one named step on a fixed batch (forward, backward,
AdamW, then the method's post-step hook, e.g. an EMA teacher update); `measure` times them
interleaved, `count_flops` counts a step's FLOPs with attention unfused."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.nn import functional as F

from engine.trainer import count_flops
from methods import build_method
from methods.base import Batch, Horizon
from methods.vit import ViTConfig, patchify

# Our post-step hooks take (step, total_steps); every timed step is step 0 of this many, so
# iBOT's teacher momentum is its base value (0.996), as on lightly's side.
SCHEDULE_STEPS = 1000


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 10,
                clock: Callable[[], float] = time.perf_counter) -> float:
    """Sustained FLOP/s of an n x n matmul (median of `reps`), per second of `clock`
    (time.process_time: per CPU-second, which other processes on the cores do not dilute)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = clock()
        a @ b
        sync(device)
        times.append(clock() - t0)
    return 2 * n ** 3 / statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Competitor:
    """A named training step on a fixed batch. `after_step` runs after the optimizer step
    (an EMA teacher update is part of the step's cost); `masked_fraction` is the share of
    patch tokens the step masks (None: no masking)."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor],
                 after_step: Callable[[], None] | None = None, masked_fraction: float | None = None,
                 eager_loss_fn: Callable[[], torch.Tensor] | None = None):
        self.name, self.model, self.loss_fn = name, model, loss_fn
        self.eager_loss_fn = eager_loss_fn or loss_fn     # FLOPs are counted eagerly
        self.after_step = after_step
        self.masked_fraction = masked_fraction
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, foreach=True)
        self.rates: list[float] = []
        self.flops: int | None = None

    def step(self) -> torch.Tensor:
        loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()
        return loss.detach()

    def count_flops(self) -> int:
        self.flops = count_flops(self.model, self.eager_loss_fn)    # the trainer's counting (fp32)
        return self.flops

    @property
    def median_rate(self) -> float:
        return statistics.median(self.rates)


def encoder_overrides(enc: ViTConfig) -> dict:
    return dict(size=enc.size, img_size=enc.img_size, patch_size=enc.patch_size)


def our_method(name: str, enc: ViTConfig, batch: int, mask_ratio: float, decoder: tuple[int, int, int],
               images: torch.Tensor, device: torch.device, compile: bool = False) -> Competitor:
    """Our method's step; `compile`: through torch.compile (the trainer's `compile=True`),
    named "NAME (compiled)" and compiled at its first (warm-up) step."""
    overrides: dict = {"encoder": encoder_overrides(enc)}
    if name == "mae":
        overrides.update(decoder_dim=decoder[0], decoder_depth=decoder[1], decoder_heads=decoder[2],
                         norm_pix_loss=False, mask={"strategy": "random", "ratio": mask_ratio})
    method = build_method(name, **overrides).to(device).train()
    mask = method.draw_masks(batch, torch.Generator().manual_seed(0))
    views = [images if size == enc.img_size else F.interpolate(images, size=size, mode="bilinear")
             for size, _ in method.view_specs(0.2)]
    data = Batch.of_views(views, mask, device)

    def loss_of(model: Callable) -> Callable[[], torch.Tensor]:
        return lambda: model(data)[0]

    return Competitor(f"{name} (compiled)" if compile else name, method,
                      loss_of(torch.compile(method) if compile else method),
                      after_step=lambda: method.after_step(0, Horizon(SCHEDULE_STEPS)),
                      masked_fraction=None if mask is None else mask.float().mean().item(),
                      eager_loss_fn=loss_of(method))


def timm_full_token(enc: ViTConfig, images: torch.Tensor, device: torch.device) -> Competitor:
    vit = VisionTransformer(**enc.timm_kwargs()).to(device).train()
    head = torch.nn.Linear(enc.embed_dim, enc.patch_size ** 2 * 3).to(device)
    model = torch.nn.ModuleDict({"vit": vit, "head": head})
    target = patchify(images, enc.patch_size)

    def loss_fn():
        tokens = vit.forward_features(images)[:, 1:]
        return F.mse_loss(head(tokens), target)

    return Competitor("timm full-token ViT", model, loss_fn)


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
