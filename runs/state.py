"""What a run folder holds, read once: its record, the evaluations it still lacks at the
profile's configs, whether its product file (encoder or tokenizer weights) is there.

    state = read_state(run.config.folder(outputs), run.spec.evals, run.config.method, profile)
    state.label        # "done", "to evaluate: linear", "to run", "failed", "unreadable"
    state.done         # finished with every evaluation asked for
    state.usable       # done, and its weights here (a record restored from results/ has none)

A suite's plan (`runs.plan`) reads every run's state once and hands it to whatever prints, costs,
indexes, submits or runs it; `runs.execute` reads it again only under the run's lock, where
another process may have changed it since.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from core.config import identity_record
from eval.registry import split_name
from methods import registry
from methods.dvae import TOKENIZER_FILE
from runs.identity import RunProfile, build_from_record
from runs.records import EvalRecord, RunRecord, UnreadableRecord, read_result

ENCODER_FILE = "encoder.safetensors"
PRODUCT_FILES = {"encoder": ENCODER_FILE, "tokenizer": TOKENIZER_FILE}   # by `Method.product`


# ---- an evaluation's config at a profile, and whether a record holds it ---------------------
def eval_config(name: str, profile: RunProfile, method: str | None = None):
    """Evaluation `name`'s config at this profile, for a run of `method`: the profile's, with
    the method's `eval_overrides` (the `none` baseline's from-scratch fine-tune recipe)."""
    base = split_name(name)[0]
    cfg = profile.eval_config(base)
    overrides = registry[method][0].eval_overrides.get(base, {}) if method in registry else {}
    return build_from_record(type(cfg), {**dataclasses.asdict(cfg), **overrides},
                             f"{base} config of {method}") if overrides else cfg


def eval_config_dict(name: str, profile: RunProfile, method: str | None = None) -> dict:
    """The config an evaluation is recorded and cached under (late fields as for runs)."""
    return identity_record(eval_config(name, profile, method))


def is_current(record: EvalRecord | None, name: str, profile: RunProfile, method: str | None = None) -> bool:
    """Whether a recorded evaluation was produced with this profile's config of it (for `method`)."""
    return record is not None and record.config == json.loads(json.dumps(eval_config_dict(name, profile, method)))


def stale_evaluations(record: RunRecord, evals: tuple[str, ...], profile: RunProfile | None = None) -> list[str]:
    """The evaluations in `evals` that a finished run's record lacks (or, given a profile, holds
    at another config than the profile's)."""
    return [name for name in evals if name not in record.evals or (
        profile is not None and not is_current(record.evals[name], name, profile, record.method))]


def product_missing(run_dir: Path, method: str) -> bool:
    """Whether a run's product file (encoder or tokenizer) is absent: a record restored from the
    results archive keeps no weights."""
    return not (run_dir / PRODUCT_FILES[registry[method][0].product]).exists()


# ---- a run folder's state --------------------------------------------------------------------
@dataclass(frozen=True)
class RunState:
    record: RunRecord | None            # None: no record yet, or an unreadable one
    unreadable: str | None = None       # why result.json could not be read
    stale: tuple[str, ...] = ()         # evaluations asked for that a finished record lacks
    product_here: bool = False          # its weights file is in the folder
    features_cached: bool = False       # frozen features extracted before (features/)

    @property
    def finished(self) -> bool:
        """Pre-training finished (whatever evaluations are still to run)."""
        return self.record is not None and self.record.done

    @property
    def done(self) -> bool:
        return self.finished and not self.stale

    @property
    def usable(self) -> bool:
        """What a run that requires this one can use: done, with its weights here."""
        return self.done and self.product_here

    @property
    def label(self) -> str:
        """done, to evaluate (named), to run, failed, unreadable."""
        if self.unreadable is not None:
            return "unreadable"
        if self.record is None:
            return "to run"
        if not self.record.done:
            return self.record.status
        return "to evaluate: " + ", ".join(self.stale) if self.stale else "done"


def read_state(run_dir: Path, evals: tuple[str, ...], method: str, profile: RunProfile | None = None) -> RunState:
    """The folder's state for a run asking for `evals` (given a profile: each at its config)."""
    try:
        record = read_result(run_dir)
    except UnreadableRecord as err:
        return RunState(None, unreadable=str(err))
    stale = tuple(stale_evaluations(record, evals, profile)) if record is not None and record.done else ()
    return RunState(record, stale=stale, product_here=not product_missing(run_dir, method),
                    features_cached=(run_dir / "features").is_dir())


def is_done(run_dir: Path, evals: tuple[str, ...], profile: RunProfile | None = None) -> bool:
    """Finished with every evaluation in `evals` (and, given a profile, each at its budget);
    UnreadableRecord for a damaged record."""
    record = read_result(run_dir)
    return record is not None and record.done and not stale_evaluations(record, evals, profile)


def usable(run_dir: Path, evals: tuple[str, ...], method: str, profile: RunProfile | None = None) -> bool:
    """Done with `evals` and its product file here: what a run that requires it can use."""
    return is_done(run_dir, evals, profile) and not product_missing(run_dir, method)
