"""Atomic writes of the small JSON files that make up a run record."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON through a temp file + rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def config_hash(config: dict) -> str:
    """12 hex digits naming a config: a run folder (`mae-<hash>`), an evaluation's cache."""
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
