"""The run record (`result.json`) and the small files around it: one schema, written and read
here only, versioned and validated on read (written atomically through `core.files`).

Standard library and the ground floor only: `reports/` reads records without importing torch or
any model code.

    record = read_record(run_dir)         # RunRecord, None when there is none yet;
                                          # RecordError when it does not parse or validate
    write_record(run_dir, record)         # validated, atomic

A record of schema 1 (every record so far) reads unchanged: the dataclasses below mirror its
JSON field for field. A later schema that changes a field raises SCHEMA and converts older
records in `RunRecord.from_dict`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import ConfigError
from core.files import write_json

SCHEMA = 1                              # version of result.json this code writes
STATUSES = ("done", "failed")
RESULT_FILE = "result.json"


class RecordError(ValueError):
    """A record that does not parse or does not match the schema; the message names the file."""


class NewerSchemaError(RecordError):
    """A record written by a newer mimbench (a higher SCHEMA)."""


class UnreadableRecord(RuntimeError):
    """A run folder's result.json does not parse or validate: that run fails (its file is left
    as it is), the others go on."""


# ---- the schema ----------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalRecord:
    """One evaluation of a run's product, cached with the config that produced it."""
    config: dict                                    # the evaluation's config (its budget)
    metrics: dict[str, float | None]                # flat, e.g. {"knn_top1_cls": 42.3}
    details: dict = field(default_factory=dict)     # anything else worth keeping (chosen lr, ...)
    seconds: float | None = None

    @classmethod
    def from_dict(cls, entry: Any, where: str = "evaluation record") -> "EvalRecord":
        """Validate `entry` (parsed JSON); RecordError naming `where` and the problem otherwise."""
        def bad(problem: str) -> RecordError:
            return RecordError(f"{where}: {problem}")

        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
            raise bad("must be an object with a 'config' object")
        unknown = sorted(set(entry) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise bad(f"unknown field {unknown[0]!r}")
        _check_metrics(entry.get("metrics"), bad, "metrics")
        if not isinstance(entry.get("details", {}), dict) or \
                not isinstance(entry.get("seconds"), (int, float, type(None))):
            raise bad("'details' must be an object and 'seconds' a number")
        return cls(**entry)


@dataclass(frozen=True)
class RunRecord:
    """`result.json` of a run folder."""
    status: str                                     # one of STATUSES
    method: str
    seed: int
    config_hash: str                                # of config.json: the folder's name
    metrics: dict[str, float | None] = field(default_factory=dict)   # every evaluation's, flat
    evals: dict[str, EvalRecord] = field(default_factory=dict)
    train: dict | None = None                       # pre-training stats (throughput, FLOPs, ...)
    provenance: dict = field(default_factory=dict)  # code commit, versions, machine
    prerequisites: dict[str, str] = field(default_factory=dict)   # role -> run folder name
    failed_evaluation: dict | None = None           # {"error", "traceback"}: a done run's last failure
    error: str | None = None                        # a failed run's error ...
    traceback: str | None = None                    # ... and where it came from
    wall_seconds: float | None = None
    schema: int = SCHEMA

    @property
    def done(self) -> bool:
        return self.status == "done"

    def to_dict(self) -> dict:
        """The JSON of result.json; empty optional fields are left out (as records always were)."""
        out = dataclasses.asdict(self)
        for name in ("prerequisites", "failed_evaluation", "error", "traceback", "wall_seconds"):
            if not out[name]:
                del out[name]
        if self.status == "failed":
            del out["evals"], out["train"]
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "record") -> "RunRecord":
        """Validate `data` (parsed JSON) against the schema; RecordError naming `where` and the
        first problem otherwise."""
        def bad(problem: str) -> RecordError:
            return RecordError(f"{where}: {problem}")

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, got {type(data).__name__}")
        schema = data.get("schema", 0)
        if not isinstance(schema, int) or schema < 1:
            raise bad(f"'schema' must be an integer >= 1, got {schema!r}")
        if schema > SCHEMA:
            raise NewerSchemaError(f"{where}: written by a newer mimbench (schema {schema} > {SCHEMA}); "
                                   f"upgrade mimbench")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise bad(f"unknown field {extra[0]!r}")
        for name, kind in (("status", str), ("method", str), ("seed", int), ("config_hash", str)):
            if not isinstance(data.get(name), kind) or isinstance(data.get(name), bool):
                raise bad(f"{name!r} must be {kind.__name__}, got {data.get(name)!r}")
        if data["status"] not in STATUSES:
            raise bad(f"'status' must be one of {', '.join(STATUSES)}, got {data['status']!r}")
        _check_metrics(data.get("metrics", {}), bad, "metrics")
        evals = data.get("evals", {})
        if not isinstance(evals, dict):
            raise bad("'evals' must be an object")
        parsed = {name: EvalRecord.from_dict(entry, f"{where}: evals[{name!r}]") for name, entry in evals.items()}
        for name, kinds in (("train", (dict, type(None))), ("provenance", dict), ("prerequisites", dict),
                            ("failed_evaluation", (dict, type(None))), ("error", (str, type(None))),
                            ("traceback", (str, type(None))), ("wall_seconds", (int, float, type(None)))):
            if name in data and not isinstance(data[name], kinds):
                raise bad(f"{name!r} has the wrong type ({type(data[name]).__name__})")
        if data["status"] == "done" and not isinstance(data.get("train"), dict):
            raise bad("a done run needs its 'train' stats")
        return cls(**{**data, "evals": parsed})


def _check_metrics(metrics: Any, bad, where: str) -> None:
    if not isinstance(metrics, dict):
        raise bad(f"{where!r} must be an object")
    for name, value in metrics.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not number:
            raise bad(f"{where}[{name!r}] must be a number, got {value!r}")


def record_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RESULT_FILE


def read_record(run_dir: str | Path) -> RunRecord | None:
    """The run folder's record; None when it has none yet; RecordError (one line, naming the
    file) when it does not parse or validate - a copy cut short, a full disk, a hand edit."""
    path = record_path(run_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"{path}: cannot be read ({err.__class__.__name__}: {err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); the file is cut short "
                          f"or damaged - delete it and run the suite again: it finds the run's checkpoints "
                          f"and finished evaluations and writes the record anew") from None
    return RunRecord.from_dict(data, where=str(path))


def write_record(run_dir: str | Path, record: RunRecord) -> None:
    """Validate and write the run's record atomically."""
    data = record.to_dict()
    RunRecord.from_dict(json.loads(json.dumps(data, default=str)), where="record to write")
    write_json(record_path(run_dir), data)


def read_result(run_dir: Path) -> RunRecord | None:
    """`read_record` as a suite acts on it: a record of a newer mimbench is a ConfigError (it stops
    the suite: every run of this outputs folder is suspect); a damaged one is UnreadableRecord."""
    try:
        return read_record(run_dir)
    except NewerSchemaError as err:
        raise ConfigError(f"{err}, or use another --outputs folder") from None
    except RecordError as err:
        raise UnreadableRecord(str(err)) from None
