"""Small file helpers every layer shares: atomic writes, JSON, the config hash that names a
run or an evaluation. The ground floor: standard library only, importing nothing of the project."""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


# ---- atomic writes -------------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` to write to (for writers that take a path: safetensors);
    on a clean exit it is synced to disk and renamed onto `path`, so a reader sees the old
    file or the new one, never half of one. On an error the temp file is removed; after a
    kill it is left as `.<name>.tmp<pid>`, which no reader opens."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """`atomic_path` as an open file: `with atomic_write(p) as f: f.write(...)`."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_json(path: str | Path, data: Any) -> None:
    with atomic_write(path) as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def config_hash(config: Any) -> str:
    """12 hex digits naming a config: a run folder (`mae-<hash>`), an evaluation's work folder."""
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
