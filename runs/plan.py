"""A suite's plan: every run resolved, every run folder's state read once.

    plan = make_plan("ablation_masking", "cpu", profile, "paper", outputs, grid, runs)
    plan.state(run).label        # "done", "to run", ...: read when the plan was made

What prints (`--dry-run`), costs (`runs.cost.plan_seconds`), indexes (`runs.index`), submits
(`runs.slurm.plan_jobs`) or runs (`run_plan`) a suite takes the plan instead of asking each run
folder again. Only `runs.execute` reads a folder again, under the run's lock, because another
process may have finished (or started) the run since.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigError, UnknownNameError
from engine.data import DataError
from engine.trainer import Preempted
from runs.execute import RunOptions, RunSkipped, execute
from runs.identity import RunProfile, Requirement, Run
from runs.state import RunState, UnreadableRecord, read_state

StateKey = tuple[str, tuple[str, ...], bool]     # (run name, evaluations asked for, at the profile's configs)


def run_key(run: Run) -> StateKey:
    return run.name, tuple(run.spec.evals), True


def requirement_key(need: Requirement) -> StateKey:
    # a prerequisite is asked for its evaluations at any config (runs.execute.run_prerequisites)
    return need.config.name, tuple(need.evals), False


def read_states(runs, profile: RunProfile, outputs: Path, known: Mapping[StateKey, RunState] | None = None
                ) -> dict[StateKey, RunState]:
    """The state of every run of `runs` and of every run they require, each folder read once
    (not again for a key `known` holds: a budget solver asks about the same runs many times)."""
    states = dict(known or {})
    for run in runs:
        if run_key(run) not in states:
            states[run_key(run)] = read_state(run.config.folder(outputs), run.spec.evals, run.config.method,
                                              profile)
        for need in run.config.requires.values():
            if requirement_key(need) not in states:
                states[requirement_key(need)] = read_state(need.config.folder(outputs), need.evals,
                                                           need.config.method)
    return states


@dataclass(frozen=True)
class Plan:
    suite: str
    profile_name: str
    profile: RunProfile               # the named profile with its --set overrides
    recipe: str
    outputs: Path
    grid: tuple[Run, ...]         # the suite's whole grid: its index lists every run of it
    runs: tuple[Run, ...]         # what runs here (--only keeps part of the grid)
    states: Mapping[StateKey, RunState]
    suite_dir: Path               # where its index and table go (outputs/suites/<suite>/<profile>)

    def state(self, run: Run) -> RunState:
        return self.states[run_key(run)]

    def requirement(self, need: Requirement) -> RunState:
        return self.states[requirement_key(need)]


def make_plan(suite: str, profile_name: str, profile: RunProfile, recipe: str, outputs: Path, grid: list[Run],
              runs: list[Run] | None = None, known: Mapping[StateKey, RunState] | None = None,
              suite_dir: Path | None = None) -> Plan:
    """The plan of `runs` (default: the whole `grid`), every folder's state read once."""
    outputs = Path(outputs)
    return Plan(suite, profile_name, profile, recipe, outputs, tuple(grid), tuple(grid if runs is None else runs),
                read_states(grid, profile, outputs, known),
                suite_dir or outputs / "suites" / suite / profile_name)


# ---- running a plan here ---------------------------------------------------------------------
@dataclass
class Outcome:
    failed: list[str]
    skipped: list[str]            # busy in another process


def run_plan(plan: Plan, options: RunOptions, is_main: bool = True) -> Outcome:
    """Run (or resume) every run of the plan in order. Bad input (a DataError, an unknown name, a
    bad config) stops the whole suite; `Preempted` (SIGTERM / SIGINT after a checkpoint) too; one
    run's failure is recorded in its folder and the others go on."""
    outcome = Outcome([], [])
    for i, run in enumerate(plan.runs, 1):
        done = plan.state(run).done        # finished when planned: nothing to do
        if is_main:
            print(f"[{i}/{len(plan.runs)}] {run.spec.method} {run.spec.setting} seed {run.seed} -> {run.name}"
                  f"{' (done)' if done else ''}", flush=True)
        if done:
            continue
        try:
            execute(run, plan.profile, plan.outputs, options)
        except RunSkipped as err:
            outcome.skipped.append(run.name)
            print(f"  skipped: {err}")
        except (DataError, UnknownNameError, ConfigError, Preempted):
            raise
        except UnreadableRecord as err:      # the file is left as it is
            outcome.failed.append(run.name)
            print(f"  FAILED: {err}", file=sys.stderr)
        except Exception as err:  # one run's failure must not stop the others
            outcome.failed.append(run.name)
            print(f"  FAILED: {err.__class__.__name__}: {err} (traceback in {run.name}/result.json)")
    return outcome


def plan_of(runs: list[Run], profile: RunProfile, outputs: Path) -> Plan:
    """A plan of these runs alone, outside a suite: to cost (`runs.cost.plan_seconds`) or submit them."""
    recipe = runs[0].config.recipe if runs else "paper"
    return make_plan("runs", getattr(profile, "name", "profile"), profile, recipe, outputs, runs)
