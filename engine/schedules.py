"""Learning-rate schedules, stepped per iteration (`step_update(s)` sets the lr of step s).

cosine   timm's CosineLRScheduler: linear warm-up over a fraction of the run, then a half cosine
         to the floor; every run before curves.
wsd      warm-up / stable / decay (`WSDScheduler`): a linear warm-up over a fixed number of steps,
         the peak held, then a linear decay to the floor over the run's last steps. Until its
         decay starts, a wsd run's lr depends on the step alone: a trunk at constant lr and a
         decay branch taken from its checkpoint train exactly as one run of the branch's length.

Both start the warm-up at a thousandth of the peak (timm's `warmup_lr_init` as the project sets it).
"""
from __future__ import annotations

from timm.scheduler import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer

from core.config import ConfigError
from methods.base import Horizon

WARMUP_START = 1e-3         # the warm-up's first lr, as a fraction of the peak


class WSDScheduler(Scheduler):
    """Warm-up / stable / decay per optimizer update (timm's Scheduler: `step_update(t)`)."""

    def __init__(self, optimizer: Optimizer, horizon: Horizon, lr_min: float):
        self.horizon, self.lr_min = horizon, lr_min
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=False)

    def _get_lr(self, t: int) -> list[float]:
        h = self.horizon
        if t < h.warmup_steps:
            return [peak * (WARMUP_START + (1 - WARMUP_START) * t / h.warmup_steps) for peak in self.base_values]
        if h.decay_start is None or t < h.decay_start:
            return list(self.base_values)
        left = (h.total_steps - t) / max(h.total_steps - h.decay_start, 1)
        return [self.lr_min + (peak - self.lr_min) * left for peak in self.base_values]

    # a function of the step alone: nothing to save, and a branch resumed from its trunk's
    # checkpoint keeps its own decay
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def wsd_horizon(steps: int, warmup_steps: int, decay_frac: float, trunk: bool = False) -> Horizon:
    """The horizon of a wsd run of `steps` steps (a trunk's: no decay, however long it runs);
    ConfigError when its decay would start inside its warm-up."""
    if trunk:
        return Horizon(steps, warmup_steps, decay_start=steps)
    decay_start = steps - round(decay_frac * steps)
    if decay_start < warmup_steps:
        raise ConfigError(f"a wsd run of {steps} steps would start its decay (the last {decay_frac:g} of it) at step "
                          f"{decay_start}, inside its {warmup_steps}-step warm-up; raise the budget or lower "
                          f"warmup_steps")
    return Horizon(steps, warmup_steps, decay_start)


def make_lr_scheduler(optimizer: Optimizer, horizon: Horizon, lr: float, lr_min: float, warmup_frac: float):
    """The run's scheduler: wsd when its horizon has a decay start, else timm's cosine."""
    if horizon.decay_start is not None:
        return WSDScheduler(optimizer, horizon, lr_min)
    warmup = round(warmup_frac * horizon.total_steps)
    return CosineLRScheduler(optimizer, t_initial=max(1, horizon.total_steps - warmup), lr_min=lr_min,
                             warmup_t=warmup, warmup_lr_init=lr * WARMUP_START if warmup else lr,
                             warmup_prefix=True, t_in_epochs=False)
