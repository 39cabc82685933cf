"""Budget curves: one constant-lr trunk per method and seed, a decay branch at every budget.

A run trained under schedule="wsd" (engine.schedules) is a decay branch. Its steps before the
decay are those of every wsd run of the same config and seed, whatever their length, so they are
trained once, in the config's trunk, `outputs/trunks/<method>-trunk-<hash>`:

    trunk     the branch's config without its length (epochs, decay_frac), trained at constant lr;
              it grows to the decay start of each branch that asks (a longer curve continues it),
              and keeps its checkpoint there for good (branch-points/)
    branch    an ordinary run (its own folder, identity, record, evaluations): its config is the
              standalone wsd run's, so its name is too; it starts from the trunk's checkpoint at
              its decay start and trains only the decay. On CPU its weights are bit-identical to
              the standalone run's (tests/test_wsd.py, tests/test_curve.py).

A curve of budgets B1 < ... < Bk therefore costs about 0.8 Bk + 0.2 (B1 + ... + Bk) of pre-training
instead of B1 + ... + Bk. Runs of a curve are executed in budget order, so each trunk grows once;
a branch whose trunk has gone past its decay start without a checkpoint there trains standalone
(the same weights, at full cost) and says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from core.files import config_hash
from engine.checkpoint import checkpoint_paths
from engine.schedules import wsd_horizon
from engine.trainer import BRANCH_POINTS
from runs.identity import RunConfig

TRUNKS = "trunks"                       # outputs/trunks/<method>-trunk-<hash>
LENGTH_FIELDS = ("epochs", "decay_frac")   # what a branch has and its trunk has not


class TrunkBusy(Exception):
    """Another process is growing the trunk a branch needs."""


def is_branch(config: RunConfig) -> bool:
    return config.train is not None and config.train.get("schedule") == "wsd"


@dataclass(frozen=True)
class Trunk:
    """The trunk of a branch's config: the same run without its length."""
    branch: RunConfig

    def record(self) -> dict:
        out = self.branch.to_dict()
        out["train"] = {key: value for key, value in out["train"].items() if key not in LENGTH_FIELDS}
        return {**out, "trunk": True}

    @property
    def hash(self) -> str:
        return config_hash(self.record())

    @property
    def name(self) -> str:
        return f"{self.branch.method}-trunk-{self.hash}"

    def folder(self, outputs: Path) -> Path:
        return Path(outputs) / TRUNKS / self.name

    def progress(self, outputs: Path) -> int:
        """Steps the trunk has trained (its newest checkpoint's)."""
        newest = checkpoint_paths(self.folder(outputs) / "checkpoints")
        return int(newest[0].stem.split("-")[1]) if newest else 0

    def branch_point(self, outputs: Path, step: int) -> Path:
        return self.folder(outputs) / BRANCH_POINTS / f"ckpt-{step:08d}.pt"


def decay_start(config: RunConfig, steps: int) -> int:
    """Where a branch of `steps` steps leaves its trunk (ConfigError inside the warm-up)."""
    train = config.train_config()
    return wsd_horizon(steps, train.warmup_steps, train.decay_frac).decay_start


# train(folder, config_hash, trunk_steps, keep_at): trains the branch's method there (runs.execute)
TrainTrunk = Callable[[Path, str, int, tuple[int, ...]], None]


def grow_trunk(config: RunConfig, steps: int, outputs: Path, train: TrainTrunk) -> tuple[tuple[Path, str] | None, dict]:
    """Grow the branch's trunk to its decay start (once: a later branch continues it); where the
    branch starts ((checkpoint, the trunk's hash), or None: train standalone) and what its record
    says of it. TrunkBusy when another process holds the trunk."""
    trunk, start = Trunk(config), decay_start(config, steps)
    folder = trunk.folder(outputs)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise TrunkBusy(f"{trunk.name} is growing in another process") from None
    try:
        point = trunk.branch_point(outputs, start)
        if not point.exists():
            if trunk.progress(outputs) > start:
                print(f"  {trunk.name} is past step {start} with no checkpoint there: training standalone "
                      f"(the same weights, at the full cost)", flush=True)
                return None, {"standalone": f"{trunk.name} had no checkpoint at step {start}"}
            print(f"  trunk {trunk.name}: to step {start} (from {trunk.progress(outputs)})", flush=True)
            train(folder, trunk.hash, start, (start,))
    finally:
        lock.release()
    return (point, trunk.hash), {"trunk": trunk.name, "from_step": start, "decay_steps": steps - start}


def pretrain_costs(plan, steps_of: Callable[[RunConfig], int], seconds_of: Callable[[RunConfig], float]
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """Pre-training seconds a plan's branches still cost, counted once: each unfinished branch
    its decay, by run name; each trunk the steps it has yet to grow to its furthest unfinished
    branch, by trunk name. `steps_of`/`seconds_of`: a run's standalone steps and seconds (runs.cost)."""
    branches: dict[str, float] = {}
    furthest: dict[str, tuple[Trunk, int, float]] = {}      # trunk name -> (trunk, decay start, s/step)
    for run in plan.runs:
        if not is_branch(run.config) or plan.state(run).finished:
            continue
        steps = steps_of(run.config)
        start, per_step = decay_start(run.config, steps), seconds_of(run.config) / max(steps, 1)
        branches[run.name] = per_step * (steps - start)
        trunk = Trunk(run.config)
        if start > furthest.get(trunk.name, (trunk, -1, 0.0))[1]:
            furthest[trunk.name] = (trunk, start, per_step)
    trunks = {name: per_step * max(0, start - trunk.progress(plan.outputs))
              for name, (trunk, start, per_step) in furthest.items()}
    return branches, trunks
