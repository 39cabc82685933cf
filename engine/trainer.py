"""The one pre-training loop every method uses.

AdamW (timm's optimizer factory: no weight decay on norms and biases; the [CLS]/[M] tokens
are decayed, as in MAE's official pre-training, not exempt as in BEiT's), timm's
cosine schedule with linear warm-up stepped per iteration, gradient clipping, bf16
autocast on CUDA and fp32 on CPU, optional `torch.compile`, the method's `after_step`
hook, a tqdm bar with ETA, `metrics.jsonl`, atomic checkpoints and exact resume.

Exact resume without saving RNG streams: every source of randomness in step `s` (data
order of its epoch, augmentation, masks, drop-path) is drawn from generators seeded by
(seed, s). A resumed run therefore sees the same batches as an uninterrupted one, and
with the optimizer state restored it ends with bit-identical weights on CPU.
"""
from __future__ import annotations

import json
import math
import os
import resource
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from torch.nn.parallel import DistributedDataParallel

from engine import distributed
from engine.checkpoint import load_latest, save_checkpoint
from engine.data import random_resized_crop_flip
from engine.records import read_json, write_json
from methods.base import Batch, MIMMethod
from methods.registry import ConfigError


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 5.0             # passes over the training split
    batch_size: int = 256
    blr: float = 1.5e-4             # base lr per 256 images (MAE); lr = blr * batch_size / 256
    weight_decay: float = 0.05      # MAE / BEiT
    beta2: float = 0.95             # MAE; BEiT uses 0.999
    warmup_frac: float = 0.05       # fraction of steps with linear warm-up (DESIGN calibration: 5%)
    min_lr_frac: float = 0.0        # cosine floor as a fraction of the peak lr
    clip_grad: float = 3.0          # BEiT clips at 3.0; MAE does not clip (0 = off)
    crop_scale_min: float = 0.2     # RandomResizedCrop scale (MAE: 0.2; BEiT: 0.08)
    checkpoint_every: int = 200     # steps between checkpoints (plus one at the end)
    log_every: int = 20             # steps between metric flushes to metrics.jsonl
    compile: bool = False           # torch.compile the method (pays on GPUs; CPU compile is slow)
    max_bad_steps: int = 0          # non-finite losses to skip before stopping (0 = stop at the first)
    # auto: bf16 autocast on CUDA, fp32 on CPU; fp16 autocasts to float16 with dynamic loss
    # scaling (torch.amp.GradScaler: an overflowing step is skipped and the scale halved)
    precision: str = "auto"

    def validate(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.blr <= 0:
            raise ConfigError("epochs must be >= 0, batch_size >= 1 and blr > 0")
        if not 0 <= self.warmup_frac < 1 or not 0 < self.crop_scale_min <= 1:
            raise ConfigError("warmup_frac must be in [0, 1) and crop_scale_min in (0, 1]")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("checkpoint_every and log_every must be >= 1")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} unknown; known: {', '.join(PRECISIONS)}")


class NonFiniteLoss(RuntimeError):
    pass


class Preempted(RuntimeError):
    """SIGTERM / SIGINT arrived: a checkpoint was written; the same command resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def total_steps(epochs: float, num_images: int, batch_size: int) -> int:
    """Optimizer steps of `epochs` passes (the last partial batch of an epoch is dropped)."""
    return round(epochs * (num_images // batch_size))


def step_seed(seed: int, step: int, stream: int) -> int:
    return (seed * 1_000_003 + step * 7919 + stream) % (2**63 - 1)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of `precision` on `device` (None: plain fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def device_autocast(device: torch.device, precision: str = "auto"):
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class Trainer:
    def __init__(self, method: MIMMethod, images: torch.Tensor, cfg: TrainConfig, run_dir: Path,
                 seed: int, config_hash: str, device: str | torch.device = "cpu",
                 progress: bool = True):
        cfg.validate()
        self.method, self.cfg, self.seed = method, cfg, seed
        self.run_dir, self.config_hash = Path(run_dir), config_hash
        self.device = torch.device(device)
        self.images = images.to(self.device)                 # uint8 (N, 3, H, W), on device
        self.progress = progress
        self.steps_per_epoch = len(images) // cfg.batch_size
        if method.trains and self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the dataset "
                              f"({len(images)} images); lower it")
        self.total_steps = total_steps(cfg.epochs, len(images), cfg.batch_size) if method.trains else 0
        self.world, self.rank = distributed.world_size(), distributed.rank()
        if cfg.batch_size % self.world:
            raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {self.world} "
                              f"processes; pick a multiple of {self.world}")
        self.method.to(self.device)
        if self.total_steps:
            lr = cfg.blr * cfg.batch_size / 256
            self.optimizer = create_optimizer_v2(method, opt="adamw", lr=lr, weight_decay=cfg.weight_decay,
                                                 betas=(0.9, cfg.beta2), foreach=True)
            warmup = round(cfg.warmup_frac * self.total_steps)
            self.scheduler = CosineLRScheduler(
                self.optimizer, t_initial=max(1, self.total_steps - warmup), lr_min=lr * cfg.min_lr_frac,
                warmup_t=warmup, warmup_lr_init=lr * 1e-3 if warmup else lr, warmup_prefix=True,
                t_in_epochs=False)
        # fp16's narrow range needs loss scaling; bf16 has fp32's exponent range and does not
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" and self.total_steps else None
        model = method
        if self.world > 1 and self.total_steps:
            # DDP averages gradients over ranks; each rank holds an equal slice of the batch
            model = DistributedDataParallel(method, device_ids=[self.device.index]
                                            if self.device.type == "cuda" else None)
        self.step_fn = torch.compile(model) if cfg.compile else model
        self._epoch_order: tuple[int, torch.Tensor] | None = None
        self._stop_signal: int | None = None

    # ---- data --------------------------------------------------------------------------
    def batch_for_step(self, step: int) -> Batch:
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            gen = torch.Generator().manual_seed(step_seed(self.seed, epoch, stream=1))
            self._epoch_order = (epoch, torch.randperm(len(self.images), generator=gen))
        index = self._epoch_order[1][position * self.cfg.batch_size:(position + 1) * self.cfg.batch_size]
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, stream=2))
        uint8 = self.images[index.to(self.device)]
        views = [random_resized_crop_flip(uint8, size, gen, scale=scale)
                 for size, scale in self.method.view_specs(self.cfg.crop_scale_min)]
        mask = self.method.draw_masks(len(index), gen)
        if self.world > 1:  # every rank drew the global batch; keep this rank's slice
            shard = slice(self.rank * len(index) // self.world, (self.rank + 1) * len(index) // self.world)
            views = [v[shard] for v in views]
            mask = None if mask is None else mask[..., shard, :]
        if mask is not None:
            mask = mask.to(self.device)
        return Batch(images=views[0], mask=mask, views=views if len(views) > 1 else None)

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict:
        state = {"config_hash": self.config_hash, "step": step,
                 "model": self.method.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def resume(self) -> int:
        state, path = load_latest(self.run_dir / "checkpoints", self.config_hash)
        if state is None:
            if self.rank == 0:
                self._truncate_metrics(0)
            return 0
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        if self.rank == 0:
            self._truncate_metrics(step)
        print(f"[train] resumed from {path.name} at step {step}/{self.total_steps}")
        return step

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint we resume from (and a line cut
        short by a kill)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                continue
        path.write_text("".join(line + "\n" for line in kept))

    # ---- measurement ---------------------------------------------------------------------
    def flops_per_step(self) -> int:
        """FLOPs of one optimizer step over the global batch (every rank counts its slice)."""
        flops = train_flops(self.method, self.batch_for_step(0), self.device) * self.world
        if self.device.type == "cuda":   # counting ran unfused attention: not the training peak
            torch.cuda.reset_peak_memory_stats(self.device)
        return flops

    # ---- the loop ------------------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def fit(self) -> dict:
        """Train to the end (resuming if checkpoints exist); returns stats for result.json."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.total_steps == 0:
            return {"steps": 0, "images_seen": 0, "train_seconds": 0.0}
        start = self.resume()
        distributed.barrier()  # no rank starts before every rank has read the checkpoint
        stats_file = self.run_dir / "train_stats.json"
        if start >= self.total_steps and stats_file.exists():
            return read_json(stats_file)   # finished earlier: its stats, not those of an empty session
        flops = self.flops_per_step()   # (also when a kill came between the last checkpoint and the stats)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        # rank 0 writes metrics (the loss of its own slice of the batch)
        metrics_file = open(self.run_dir / "metrics.jsonl", "a") if self.rank == 0 else None
        pending: list[dict] = []
        data_seconds = step_seconds = 0.0
        timed_steps = 0
        bad_steps = 0
        bar = tqdm(total=self.total_steps, initial=start, desc=f"pre-train {self.method.name}",
                   unit="step", disable=not self.progress or self.rank != 0, dynamic_ncols=True)
        try:
            for step in range(start, self.total_steps):
                t0 = time.perf_counter()
                self.scheduler.step_update(step)
                batch = self.batch_for_step(step)
                t1 = time.perf_counter()
                # drop path etc.: one stream per rank, so ranks do not repeat each other's draws
                torch.manual_seed(step_seed(self.seed, step, stream=3 + self.rank))
                with device_autocast(self.device, self.cfg.precision):
                    loss, logs = self.step_fn(batch)
                # every rank takes the same branches (a rank skipping backward or stopping alone
                # would hang the others): one all-reduce per step agrees on both flags
                nonfinite, stop = distributed.on_any_rank(not torch.isfinite(loss), self._stop_signal is not None)
                if not nonfinite:
                    self._backward_and_step(loss, logs)
                    self.method.after_step(step, self.total_steps)
                    pending.append({"step": step, "lr": self.optimizer.param_groups[0]["lr"], **logs})
                    t2 = time.perf_counter()
                    if step - start >= 2:  # skip warm-up steps (allocation, compile) in timings
                        data_seconds += t1 - t0
                        step_seconds += t2 - t0
                        timed_steps += 1
                else:   # skipped; the checkpoint and stop checks below still apply to this step
                    bad_steps += 1
                    if bad_steps > self.cfg.max_bad_steps:
                        raise NonFiniteLoss(self._nan_message(step, loss))
                    self.optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                done = step + 1
                checkpoint_now = done % self.cfg.checkpoint_every == 0 or done == self.total_steps or stop
                if checkpoint_now or done % self.cfg.log_every == 0:
                    if self.scaler is not None and pending:   # one host sync per flush, not per step
                        pending[-1]["loss_scale"] = self.scaler.get_scale()
                    bar.set_postfix(loss=f"{self._flush(metrics_file, pending):.4f}")
                if checkpoint_now and self.rank == 0:
                    save_checkpoint(self.run_dir / "checkpoints", done, self.state_dict(done))
                if stop and done < self.total_steps:
                    distributed.barrier()   # rank 0's checkpoint is on disk before any rank exits
                    signum = self._stop_signal or signal.SIGTERM   # (a rank the signal did not reach)
                    raise Preempted(f"stopped by {signal.Signals(signum).name} at step {done}; "
                                    f"checkpoint saved - run the same command again to resume", signum)
        finally:
            bar.close()
            if metrics_file is not None:
                metrics_file.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        distributed.barrier()  # the last checkpoint is on disk before any rank moves on
        images_per_second = (timed_steps * self.cfg.batch_size / step_seconds) if step_seconds else None
        stats = {
            "steps": self.total_steps,
            "images_seen": self.total_steps * self.cfg.batch_size,
            "train_seconds_this_session": step_seconds,
            "images_per_second": images_per_second,
            "data_fraction": data_seconds / step_seconds if step_seconds else None,
            "flops_per_step": flops,
            "flops_total": flops * self.total_steps if flops else None,
            "peak_memory_mb": peak_memory_mb(self.device),
            "skipped_nonfinite_steps": bad_steps,
        }
        if self.rank == 0:
            write_json(stats_file, stats)
        return stats

    def _backward_and_step(self, loss: torch.Tensor, logs: dict) -> None:
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)      # clip the true gradients, not the scaled ones
        if self.cfg.clip_grad > 0:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.method.parameters(),
                                                               self.cfg.clip_grad, foreach=True)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)          # skipped when a gradient overflowed
            self.scaler.update()                      # ... and then the scale halves
        self.optimizer.zero_grad(set_to_none=True)

    def _flush(self, metrics_file, pending: list[dict]) -> float:
        """Write buffered step metrics (one host sync per flush, not per step); returns the
        last loss for the progress bar."""
        last = math.nan
        if metrics_file is None:  # not rank 0
            pending.clear()
            return last
        for row in pending:
            clean = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
            metrics_file.write(json.dumps(clean, sort_keys=True) + "\n")
            last = clean.get("loss", last)
        metrics_file.flush()
        os.fsync(metrics_file.fileno())
        pending.clear()
        return last

    def _nan_message(self, step: int, loss: torch.Tensor) -> str:
        from engine.checkpoint import checkpoint_paths
        last = checkpoint_paths(self.run_dir / "checkpoints")
        where = last[0] if last else "none yet"
        return (f"loss is {loss.item()} at step {step}; last good checkpoint: {where}. "
                f"Lower blr or raise max_bad_steps to skip bad steps")


def train_flops(method: MIMMethod, batch: Batch, device: torch.device) -> int:
    """FLOPs of one forward + backward on `batch` (optimizer excluded). Attention runs
    unfused while counting: FlopCounterMode has no formula for the CPU fused kernel, and
    we want the FLOPs of the computation, not of a kernel."""
    attns = [m for m in method.modules() if hasattr(m, "fused_attn")]
    for m in attns:
        m.fused_attn = False
    try:
        counter = FlopCounterMode(display=False)
        with counter, device_autocast(device):
            loss, _ = method(batch)
            loss.backward()
        method.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())
    finally:
        for m in attns:
            m.fused_attn = True


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

