"""The one training loop: pre-training, the dVAE tokenizer, fine-tuning and segmentation.

Three things meet in a `Trainer`:
  a `Trainable`   what is trained: `forward(batch) -> (loss, logs)` and `after_step` (an EMA
                  teacher); a method, the dVAE, the fine-tune classifier, the mmseg segmentor
  a `BatchSource` where step s's batch comes from: `batch_for_step(s)`, `steps_per_epoch`
  a `TrainPlan`   how it is optimised: steps, optimizer and scheduler factories, clipping,
                  precision, checkpoint and log cadence (built from a recipe config, never hashed)

Pre-training builds both with `engine.views.pretraining` from uint8 images (or a streamed source
of the same batches, engine.stream) and a `TrainConfig`: the views and masks (`MaskedViews`) and
the plan (`adamw_plan`: timm's AdamW, no weight decay on norms and biases - the [CLS]/[M]
tokens are decayed, as in MAE's official pre-training, not exempt as in BEiT's - and timm's
cosine schedule with linear warm-up, or warm-up / stable / decay, stepped per iteration). The loop owns gradient clipping (the
gradients' norm is logged, clipped or not), bf16 autocast on CUDA and fp32 on CPU (fp16 with loss
scaling on request), optional `torch.compile`, DDP, the buffers averaged over processes
(`synced_buffers`), a tqdm bar with ETA, `metrics.jsonl` and TensorBoard events in `tb/`, atomic
checkpoints and exact resume, the non-finite-loss guard and a checkpoint on SIGTERM / SIGINT.

Exact resume without saving RNG streams: every source of randomness in step `s` (data order of
its epoch, augmentation, masks, drop-path) is drawn from generators seeded by (seed, s). A
resumed run therefore sees the same batches as an uninterrupted one, and with the optimizer
state restored it ends with bit-identical weights on CPU.
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
from typing import Any, Callable, Protocol

import torch
from timm.optim import create_optimizer_v2
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from core.config import ConfigError, late_field
from core.files import read_json, write_json
from engine import distributed
from engine.checkpoint import CheckpointMismatch, checkpoint_paths, load_latest, save_checkpoint
from engine.schedules import make_lr_scheduler, wsd_horizon
from methods.base import Horizon


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CLIP_MODES = ("global", "per_param")
SCHEDULES = ("cosine", "wsd")
BRANCH_POINTS = "branch-points"     # a trunk's kept checkpoints (TrainPlan.keep_at), in its folder
KEEP_ALL = 10**9                    # (save_checkpoint prunes none of them)


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
    # scaling (torch.amp.GradScaler: an overflowing step is skipped and the scale halved).
    # Added after the first runs: declared with late_field, so their names stay (runs.identity).
    precision: str = late_field("auto")
    # Weight decay on a per-step cosine from `weight_decay` to this value (iBOT/DINO: 0.04 ->
    # 0.4); None keeps it constant (every earlier run).
    weight_decay_end: float | None = late_field(None)
    # "global": clip the norm of all gradients together (torch clip_grad_norm_: MAE, BEiT,
    # SimMIM); "per_param": each parameter's gradient to its own norm (DINO/iBOT clip_gradients)
    clip_mode: str = late_field("global")
    # "cosine": linear warm-up over `warmup_frac` of the run, then a cosine to the floor (every
    # run before curves). "wsd": warm-up over `warmup_steps` (a fixed number, whatever the run's
    # length), the peak lr held, then a linear decay to the floor over the last `decay_frac` of
    # the run: runs of any length share their warm-up and stable phase step for step, so one
    # constant-lr trunk serves every budget of a curve (runs.curve). methods.base.Horizon says
    # what each per-step schedule does in each phase.
    schedule: str = late_field("cosine")
    decay_frac: float = late_field(0.2)
    warmup_steps: int = late_field(0)

    def validate(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.blr <= 0:
            raise ConfigError("epochs must be >= 0, batch_size >= 1 and blr > 0")
        if not 0 <= self.warmup_frac < 1 or not 0 < self.crop_scale_min <= 1:
            raise ConfigError("warmup_frac must be in [0, 1) and crop_scale_min in (0, 1]")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("checkpoint_every and log_every must be >= 1")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} unknown; known: {', '.join(PRECISIONS)}")
        if self.weight_decay < 0 or (self.weight_decay_end is not None and self.weight_decay_end < 0):
            raise ConfigError(f"weight_decay ({self.weight_decay}) and weight_decay_end ({self.weight_decay_end}) "
                              f"must be >= 0 (weight_decay_end None = constant)")
        if self.weight_decay == 0 and self.weight_decay_end:
            raise ConfigError("a weight-decay schedule needs weight_decay > 0 at its start (iBOT: 0.04 -> 0.4)")
        if self.clip_mode not in CLIP_MODES:
            raise ConfigError(f"clip_mode {self.clip_mode!r} unknown; known: {', '.join(CLIP_MODES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} unknown; known: {', '.join(SCHEDULES)}")
        if not 0 < self.decay_frac < 1 or self.warmup_steps < 0:
            raise ConfigError(f"decay_frac ({self.decay_frac}) must be in (0, 1) and warmup_steps "
                              f"({self.warmup_steps}) >= 0")


class NonFiniteLoss(RuntimeError):
    pass


class Preempted(RuntimeError):
    """SIGTERM / SIGINT arrived: a checkpoint was written; the same command resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# ---- the protocol ------------------------------------------------------------------------
class Trainable(Protocol):
    """What the trainer trains: an `nn.Module` (parameters, state_dict, to) with these members.
    `MIMMethod` (methods/base.py), `DVAE`, `eval.finetune.Classifier` and
    `eval.segmentation.Segmentor` provide them.

    Optional members (their defaults when absent): `synced_buffers = ()`, names of buffers the
    trainer averages over processes after each `after_step` under torchrun (iBOT's centres);
    `before_optimizer_step(step, horizon)`, called after backward and before clipping, to
    edit gradients (iBOT drops its head's last layer's gradients while that layer is frozen).
    """
    name: str                       # the progress bar's label
    trains: bool                    # False: nothing to train (the `none` baseline)

    def forward(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and logs of 0-d tensors (no host syncs in the step; the trainer logs them)."""

    def after_step(self, step: int, horizon: Horizon) -> None:
        """Called after each optimizer step (EMA teachers, schedules held in buffers)."""


class BatchSource(Protocol):
    """Where step s's batch comes from. `batch_for_step(s)` must depend on (seed, s) only,
    never on the steps drawn before: that is what makes resume exact.

    Optional member (its default when absent): `random_access = False`; True where any step's
    batch costs what the next one does (images in memory: engine.views.MaskedViews). The trainer
    counts FLOPs on step 0's batch of such a source, else on the first step of the session (a
    streaming source reads no batch before it).
    """
    steps_per_epoch: int

    def batch_for_step(self, step: int) -> Any:
        """The batch `Trainable.forward` receives at step `step`."""


@dataclass(frozen=True)
class TrainPlan:
    """How a Trainable is optimised. Built from a recipe config (TrainConfig, FinetuneConfig,
    SegmentationConfig), which stays the identity of the run: the plan is never hashed."""
    total_steps: int
    batch_size: int                 # images per optimizer step (all processes): throughput stats
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    # (optimizer, total_steps) -> a timm scheduler: `step_update(s)` sets the lr of step s
    make_scheduler: Callable[[torch.optim.Optimizer, int], Any]
    checkpoint_every: int
    log_every: int
    clip_grad: float = 0.0          # max gradient norm (0 = off)
    clip_mode: str = "global"       # CLIP_MODES
    # step -> weight decay of the decayed parameter groups (None: the optimizer's, constant)
    weight_decay_at: Callable[[int], float] | None = None
    precision: str = "auto"         # PRECISIONS
    compile: bool = False
    max_bad_steps: int = 0          # non-finite losses to skip before stopping
    torch_stream: int = 3           # per-step torch seed (drop path, dropout): step_seed(seed, s, this + rank)
    # False: this process trains alone even under torchrun (the evaluations, which rank 0 runs
    # while the other ranks wait): no DDP, no collectives
    distributed: bool = True
    desc: str = "train"             # the progress bar's label
    warmup_steps: int = 0           # wsd: the lr warm-up's fixed steps (methods.base.Horizon)
    decay_start: int | None = None  # wsd: the decay's first step; None: cosine schedules span the run
    keep_at: tuple[int, ...] = ()   # steps whose checkpoint is kept for good (a trunk's branch points)

    @property
    def horizon(self) -> Horizon:
        """The run's length as `after_step` and the other per-step schedules see it."""
        return Horizon(self.total_steps, self.warmup_steps, self.decay_start)


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


def precision_name(device: torch.device, precision: str = "auto") -> str:
    """What `precision` trains in on `device`: "fp32", "bf16 autocast" or "fp16 autocast"."""
    dtype = autocast_dtype(device, precision)
    return "fp32" if dtype is None else f"{'bf16' if dtype == torch.bfloat16 else 'fp16'} autocast"


def device_autocast(device: torch.device, precision: str = "auto"):
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def adamw_plan(cfg: TrainConfig, steps: int, layer_decay: float | None = None, desc: str = "train",
               trunk: bool = False, keep_at: tuple[int, ...] = ()) -> TrainPlan:
    """timm's AdamW (layer-wise lr decay when `layer_decay` is given: timm reads the model's
    `group_matcher`) and the config's schedule stepped per iteration (engine.schedules: linear
    warm-up + cosine, or wsd). `trunk`: a wsd trunk, no decay however long it runs, its
    checkpoints at `keep_at` kept for the branches taken from them (runs.curve)."""
    lr = cfg.blr * cfg.batch_size / 256
    decay = {} if layer_decay is None else {"layer_decay": layer_decay}
    horizon = wsd_horizon(steps, cfg.warmup_steps, cfg.decay_frac, trunk) \
        if getattr(cfg, "schedule", "cosine") == "wsd" else Horizon(steps)

    def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
        return create_optimizer_v2(module, opt="adamw", lr=lr, weight_decay=cfg.weight_decay,
                                   betas=(0.9, cfg.beta2), foreach=True, **decay)

    def make_scheduler(optimizer: torch.optim.Optimizer, steps: int):
        return make_lr_scheduler(optimizer, horizon, lr, lr * cfg.min_lr_frac, cfg.warmup_frac)

    weight_decay_at = None
    if cfg.weight_decay_end is not None:
        def weight_decay_at(step: int) -> float:
            return horizon.ramp(step, cfg.weight_decay, cfg.weight_decay_end)

    return TrainPlan(total_steps=steps, batch_size=cfg.batch_size, make_optimizer=make_optimizer,
                     make_scheduler=make_scheduler, checkpoint_every=cfg.checkpoint_every,
                     log_every=cfg.log_every, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode,
                     weight_decay_at=weight_decay_at, precision=cfg.precision, compile=cfg.compile,
                     max_bad_steps=cfg.max_bad_steps, desc=desc, warmup_steps=horizon.warmup_steps,
                     decay_start=horizon.decay_start, keep_at=tuple(keep_at))


def clip_per_parameter(parameters, max_norm: float) -> Tensor:
    """Clip each parameter's gradient to norm `max_norm` on its own (DINO/iBOT clip_gradients);
    returns the norm of all gradients before clipping, as clip_grad_norm_ does."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms])
    return torch.linalg.vector_norm(torch.stack(norms))


def set_weight_decay(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set the weight decay of the groups that decay (norms and biases, at 0, stay at 0). Which
    groups decay is kept in the group ("decays"), so it survives a checkpoint."""
    for group in optimizer.param_groups:
        if group.setdefault("decays", group["weight_decay"] > 0):
            group["weight_decay"] = value


# ---- the trainer -------------------------------------------------------------------------
class Trainer:
    """Trains `module` on `data` by `plan`, in `run_dir` (checkpoints/, metrics.jsonl, tb/,
    train_stats.json); `fit()` resumes from the newest checkpoint of `config_hash`.

    Pre-training: `Trainer(method, *engine.views.pretraining(method, uint8_images, train_config,
    seed, device), ...)`.
    """

    def __init__(self, module: Trainable, data: BatchSource, plan: TrainPlan, run_dir: Path, seed: int,
                 config_hash: str, device: str | torch.device = "cpu", progress: bool = True,
                 start_from: tuple[Path, str] | None = None):
        if not isinstance(plan, TrainPlan):
            raise TypeError(f"a Trainer takes a BatchSource and a TrainPlan, not a {type(plan).__name__}; "
                            f"pre-training makes both with engine.views.pretraining")
        self.device = torch.device(device)
        self.module, self.data, self.plan, self.seed = module, data, plan, seed
        self.run_dir, self.config_hash = Path(run_dir), config_hash
        self.progress = progress
        # (checkpoint, its config hash): where a run with no checkpoint of its own starts (a
        # decay branch: its trunk's checkpoint at the branch point)
        self.start_from = start_from
        self.total_steps = plan.total_steps
        self.world, self.rank = (distributed.world_size(), distributed.rank()) if plan.distributed else (1, 0)
        if plan.batch_size % self.world:
            raise ConfigError(f"batch_size {plan.batch_size} is not divisible by the {self.world} "
                              f"processes; pick a multiple of {self.world}")
        self.synced_buffers: tuple[str, ...] = getattr(module, "synced_buffers", ())
        module.to(self.device)
        if self.total_steps:
            self.optimizer = plan.make_optimizer(module)
            self.scheduler = plan.make_scheduler(self.optimizer, self.total_steps)
        # fp16's narrow range needs loss scaling; bf16 has fp32's exponent range and does not
        self.scaler = torch.amp.GradScaler(self.device.type) \
            if plan.precision == "fp16" and self.total_steps else None
        model = module
        if self.world > 1 and self.total_steps:
            # DDP averages gradients over ranks; each rank holds an equal slice of the batch
            model = DistributedDataParallel(module, device_ids=[self.device.index]
                                            if self.device.type == "cuda" else None)
        self.step_fn = torch.compile(model) if plan.compile else model
        self._stop_signal: int | None = None
        self.start_step = 0                     # where the last fit() began (after resuming)
        self.flops: int | None = None           # FLOPs per step (fit() counts them; checkpoints keep them)
        self.resumed_flops: int | None = None   # ... as the checkpoint resumed from had them
        self.last_loss: float | None = None     # the last loss written to metrics.jsonl

    @property
    def method(self) -> Trainable:
        """`module`, by the name pre-training code calls it."""
        return self.module

    def batch_for_step(self, step: int) -> Any:
        return self.data.batch_for_step(step)

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict:
        state = {"config_hash": self.config_hash, "step": step, "flops_per_step": self.flops,
                 "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def resume(self) -> int:
        state, path = load_latest(self.run_dir / "checkpoints", self.config_hash)
        if state is None and self.start_from is not None:
            path, trunk_hash = self.start_from
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("config_hash") != trunk_hash:
                raise CheckpointMismatch(f"{path} was written by another config ({state.get('config_hash')} != "
                                         f"{trunk_hash}); move it away or use a fresh --outputs folder")
        if state is None:
            if self.rank == 0:
                self._truncate_metrics(0)
            return 0
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.resumed_flops = state.get("flops_per_step")      # None in checkpoints of before it
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        if self.rank == 0:
            self._truncate_metrics(step)
        print(f"[train] resumed from {path.name} at step {step}/{self.total_steps}")
        return step

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint we resume from (and a line cut
        short by a kill). TensorBoard's events of those steps are purged by the writer."""
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
    def flops_per_step(self, step: int = 0) -> int:
        """FLOPs of one optimizer step over the global batch (every rank counts its slice), on
        step `step`'s batch (the same for every step, except where masks change the shapes: iBOT)."""
        flops = train_flops(self.module, self.batch_for_step(step), self.device) * self.world
        if self.device.type == "cuda":   # counting ran unfused attention: not the training peak
            torch.cuda.reset_peak_memory_stats(self.device)
        return flops

    # ---- the loop ------------------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def fit(self) -> dict:
        """Train to the end (resuming if checkpoints exist); returns stats for result.json,
        among them "final_metrics": the last row of metrics.jsonl (step, lr, the trainable's
        logs), which a method's collapse monitor reads (methods.base.Method.collapse)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.total_steps == 0:
            return {"steps": 0, "images_seen": 0, "train_seconds": 0.0}
        start = self.start_step = self.resume()
        self._barrier()  # no rank starts before every rank has read the checkpoint
        stats_file = self.run_dir / "train_stats.json"
        if start >= self.total_steps and stats_file.exists():
            return read_json(stats_file)   # finished earlier: its stats, not those of an empty session
        # FLOPs of step 0's batch (iBOT's vary a little from step to step), kept in every
        # checkpoint, so a resumed run records the figure of an uninterrupted one. A streaming
        # source resumed from a checkpoint of before that counts its first batch of this session
        # (it reads no batch before it). Also when a kill came between the last checkpoint and the stats.
        flops = self.flops = self.resumed_flops if self.resumed_flops is not None else \
            self.flops_per_step(0 if getattr(self.data, "random_access", False) else min(start, self.total_steps - 1))
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        log = MetricLog(self.run_dir, start) if self.rank == 0 else None   # rank 0's slice of the batch
        timer = StepTimer(skip_until=start + 2)  # skip warm-up steps (allocation, compile) in timings
        bad_steps = 0
        bar = tqdm(total=self.total_steps, initial=start, desc=self.plan.desc, unit="step",
                   disable=not self.progress or self.rank != 0, dynamic_ncols=True)
        try:
            self.watch = NonFiniteWatch(self.device)
            for step in range(start, self.total_steps):
                loss = self._step(step, timer, log)
                if loss is not None:   # skipped; the checkpoint and stop checks below still apply
                    bad_steps += 1
                    if bad_steps > self.plan.max_bad_steps:
                        value = float(loss)
                        raise NonFiniteLoss(self._nan_message(
                            f"loss is {value} at step {step}" if not math.isfinite(value)
                            else f"loss is non-finite on another rank at step {step}"))
                bar.update(1)
                self._end_of_step(step + 1, log, bar, timer)
        finally:
            bar.close()
            if log is not None:
                log.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        self._barrier()  # the last checkpoint is on disk before any rank moves on
        stats = timer.stats(self.plan.batch_size)
        stats = {"steps": self.total_steps, "images_seen": self.total_steps * self.plan.batch_size,
                 **stats, "flops_per_step": flops, "flops_total": flops * self.total_steps if flops else None,
                 "peak_memory_mb": peak_memory_mb(self.device), "skipped_nonfinite_steps": bad_steps,
                 "precision": precision_name(self.device, self.plan.precision), "device": str(self.device),
                 "final_metrics": log.final() if log is not None else None}
        if self.rank == 0:
            write_json(stats_file, stats)
        return stats

    def _step(self, step: int, timer: "StepTimer", log: "MetricLog | None") -> Tensor | None:
        """One optimizer step, reading nothing on the host; returns the loss when it was
        non-finite and skipped (only with max_bad_steps > 0)."""
        t0 = time.perf_counter()
        self.scheduler.step_update(step)
        if self.plan.weight_decay_at is not None:
            weight_decay = self.plan.weight_decay_at(step)
            set_weight_decay(self.optimizer, weight_decay)
        batch = self.batch_for_step(step)
        t1 = time.perf_counter()
        # drop path etc.: one stream per rank, so ranks do not repeat each other's draws
        torch.manual_seed(step_seed(self.seed, step, stream=self.plan.torch_stream + self.rank))
        with device_autocast(self.device, self.plan.precision):
            loss, logs = self.step_fn(batch)
        if self.plan.max_bad_steps > 0:
            # skipping a bad step is decided before its update: a host sync per step (and with
            # several ranks an all-reduce, so every rank skips it: one skipping alone would hang)
            nonfinite = not torch.isfinite(loss)
            if self.world > 1:
                (nonfinite,) = distributed.on_any_rank(nonfinite)
            if nonfinite:
                self.optimizer.zero_grad(set_to_none=True)
                return loss
        else:
            self.watch.see(step, loss)      # on the device; read at the next flush point
        self._backward_and_step(step, loss, logs)
        self.module.after_step(step, self.plan.horizon)
        if self.world > 1:
            distributed.average_buffers(self.module, self.synced_buffers)
        if log is not None:
            scheduled = {"weight_decay": weight_decay} if self.plan.weight_decay_at is not None else {}
            log.add({"step": step, "lr": self.optimizer.param_groups[0]["lr"], **scheduled, **logs})
        timer.add(step, t1 - t0, time.perf_counter() - t0)
        return None

    def _barrier(self) -> None:
        if self.world > 1:
            distributed.barrier()

    def _end_of_step(self, done: int, log: "MetricLog | None", bar: tqdm, timer: "StepTimer") -> None:
        """At a flush point (log_every, checkpoint_every, the end, a stop signal): stop on a
        non-finite loss before anything is saved, flush metrics, checkpoint, and stop on a signal."""
        stop = self._stop_signal is not None
        if self.world > 1:      # every rank takes the same branches (one alone would hang the others):
            (stop,) = distributed.on_any_rank_host(stop)     # each step, on the host (no device sync)
        flush = (done % self.plan.log_every == 0 or done % self.plan.checkpoint_every == 0
                 or done == self.total_steps or done in self.plan.keep_at)
        if not (flush or stop):
            return
        waited = time.perf_counter()
        bad = self.watch.first()                 # the loop's one host-device sync, per flush point
        elsewhere = False
        if self.world > 1:                       # ... and a non-finite loss at flush points
            (elsewhere,) = distributed.on_any_rank(bad is not None)
        # on a GPU the steps since the last sync finish here: their time, not the writes' below
        timer.add_wait(done - 1, time.perf_counter() - waited)
        if bad is not None:
            raise NonFiniteLoss(self._nan_message(f"loss is {bad[1]} at step {bad[0]}"))
        if elsewhere:
            raise NonFiniteLoss(self._nan_message(f"loss is non-finite on another rank before step {done}"))
        kept = done in self.plan.keep_at
        checkpoint_now = done % self.plan.checkpoint_every == 0 or done == self.total_steps or stop or kept
        if log is not None and (checkpoint_now or done % self.plan.log_every == 0):
            if self.scaler is not None:   # one host sync per flush, not per step
                log.note_last("loss_scale", self.scaler.get_scale())
            self.last_loss = log.flush()
            bar.set_postfix(loss=f"{self.last_loss:.4f}")
        if checkpoint_now and self.rank == 0:
            state = self.state_dict(done)
            save_checkpoint(self.run_dir / "checkpoints", done, state)
            if kept:            # a branch point: kept for good (every one, not the last two)
                save_checkpoint(self.run_dir / BRANCH_POINTS, done, state, keep=KEEP_ALL)
        if stop and done < self.total_steps:
            self._barrier()   # rank 0's checkpoint is on disk before any rank exits
            signum = self._stop_signal or signal.SIGTERM   # (a rank the signal did not reach)
            raise Preempted(f"stopped by {signal.Signals(signum).name} at step {done}; "
                            f"checkpoint saved - run the same command again to resume", signum)

    def _backward_and_step(self, step: int, loss: Tensor, logs: dict) -> None:
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)      # clip the true gradients, not the scaled ones
        edit_gradients = getattr(self.module, "before_optimizer_step", None)
        if edit_gradients is not None:
            edit_gradients(step, self.plan.horizon)
        if self.plan.clip_grad > 0 and self.plan.clip_mode == "per_param":
            logs["grad_norm"] = clip_per_parameter(self.module.parameters(), self.plan.clip_grad)
        elif self.plan.clip_grad > 0:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                                               self.plan.clip_grad, foreach=True)
        else:   # measured as clip_grad_norm_ measures it, the gradients left as they are
            logs["grad_norm"] = torch.nn.utils.get_total_norm(
                [p.grad for p in self.module.parameters() if p.grad is not None], foreach=True)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)          # skipped when a gradient overflowed
            self.scaler.update()                      # ... and then the scale halves
        self.optimizer.zero_grad(set_to_none=True)

    def _nan_message(self, what: str) -> str:
        last = checkpoint_paths(self.run_dir / "checkpoints")
        where = last[0] if last else "none yet"
        precision = precision_name(self.device, self.plan.precision)
        hint = "; or train in fp32 (precision='fp32')" if precision != "fp32" else ""
        return (f"{what} ({precision}); last good checkpoint: {where}. "
                f"Lower the learning rate or raise max_bad_steps to skip bad steps{hint}")


class NonFiniteWatch:
    """The first non-finite loss of a session, kept on the device (no host sync per step) and
    read at flush points before anything is written: the run stops there naming that step, and
    no checkpoint holds the weights its update touched (the steps after it are wasted, at most
    log_every of them). With max_bad_steps > 0 the trainer checks each step instead."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)

    def see(self, step: int, loss: Tensor) -> None:
        loss = loss.detach().float()
        first = ~torch.isfinite(loss) & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss, self.loss)

    def first(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss, or None: one host sync."""
        step = int(self.step)
        return None if step < 0 else (step, float(self.loss))


class MetricLog:
    """Rank 0's step metrics, buffered as tensors and written at flush points (one host sync
    per flush, not per step) to `metrics.jsonl` and to TensorBoard events in `tb/` (the same
    scalars: loss, lr and the trainable's logs). A resumed run purges the events after its
    checkpoint, as it truncates metrics.jsonl."""

    def __init__(self, run_dir: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter   # (imports tensorboard: only when training)

        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start or None)
        self.pending: list[dict] = []
        self.last: dict | None = None       # the last row written

    def add(self, row: dict) -> None:
        self.pending.append(row)

    def note_last(self, key: str, value: float) -> None:
        if self.pending:
            self.pending[-1][key] = value

    def flush(self) -> float:
        """Write the buffered rows; returns the last loss (for the progress bar)."""
        last = math.nan
        for row in self.pending:
            clean = {k: (v.item() if isinstance(v, Tensor) else v) for k, v in row.items()}
            self.file.write(json.dumps(clean, sort_keys=True) + "\n")
            for key, value in clean.items():
                if key != "step":
                    self.writer.add_scalar(key, value, clean["step"])
            last = clean.get("loss", last)
            self.last = clean
        self.file.flush()
        os.fsync(self.file.fileno())
        self.writer.flush()
        self.pending.clear()
        return last

    def final(self) -> dict | None:
        """The last row of metrics.jsonl: this session's, or the file's when the session wrote
        none (resumed at the end: killed between the last checkpoint and train_stats.json)."""
        if self.last is None:
            rows = self.path.read_text().splitlines()     # (whole: `Trainer.resume` dropped any cut short)
            self.last = json.loads(rows[-1]) if rows else None
        return self.last

    def close(self) -> None:
        self.file.close()
        self.writer.close()


class StepTimer:
    """Data and step seconds of the steps after warm-up (allocation, compile), and the waits for
    the device at flush points."""

    def __init__(self, skip_until: int):
        self.skip_until = skip_until
        self.data_seconds = self.step_seconds = 0.0
        self.steps = 0

    def add(self, step: int, data_seconds: float, step_seconds: float) -> None:
        if step >= self.skip_until:
            self.data_seconds += data_seconds
            self.step_seconds += step_seconds
            self.steps += 1

    def add_wait(self, step: int, seconds: float) -> None:
        """Time a flush point waited for the device after `step`: the queued steps' work (a
        step without a host sync returns once its kernels are queued)."""
        if step >= self.skip_until:
            self.step_seconds += seconds

    def stats(self, batch_size: int) -> dict:
        seconds = self.step_seconds
        return {"train_seconds_this_session": seconds,
                "images_per_second": self.steps * batch_size / seconds if seconds else None,
                "data_fraction": self.data_seconds / seconds if seconds else None}


# ---- FLOPs -------------------------------------------------------------------------------
def count_flops(model: nn.Module, loss_fn: Callable[[], Tensor], device: torch.device | None = None) -> int:
    """FLOPs of `loss_fn().backward()` (optimizer excluded), under autocast on `device` when
    given. Attention runs unfused while counting: FlopCounterMode has no formula for the CPU
    fused kernel, and we want the FLOPs of the computation, not of a kernel. The model's
    buffers (BatchNorm statistics) and gradients are as before afterwards: counting is not a
    training step."""
    attns = [m for m in model.modules() if hasattr(m, "fused_attn")]
    buffers = [(b, b.clone()) for b in model.buffers()]
    for m in attns:
        m.fused_attn = False
    try:
        counter = FlopCounterMode(display=False)
        with counter, (device_autocast(device) if device is not None else nullcontext()):
            loss_fn().backward()
        return int(counter.get_total_flops())
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for m in attns:
            m.fused_attn = True


def train_flops(module: nn.Module, batch: Any, device: torch.device) -> int:
    """FLOPs of one forward + backward of a Trainable on `batch`."""
    return count_flops(module, lambda: module(batch)[0], device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
