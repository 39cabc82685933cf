"""The results archive: the records of finished runs kept in the repository (`results/`), so a
measurement outlives the machine it ran on.

A run folder in `outputs/` holds megabytes (weights, checkpoints, feature caches) and is lost
with the machine; what a report and a re-run need of a finished run is kilobytes (a long run's
loss curve: about a megabyte): its
`config.json`, `result.json` (every evaluation) and `metrics.jsonl` (loss curves), and each
suite's index (`suites/<suite>/<profile>/runs.json`, which names its runs and the budget it
solved for). So:

    python -m runs.archive save        # outputs/ -> results/: every finished run's record (commit it)
    python -m runs.archive restore     # results/ -> outputs/: the records a folder lacks (make report does this)

A restored run is done: a suite skips it and the report shows it. It has no weights; when a
later evaluation, or a run that requires it (BEiT's tokenizer), needs them, `runs.execute`
trains it again from its config, which on the machine and torch it was measured on gives the
same weights bit for bit (the run's seed decides every draw). Restoring never overwrites a
finished record in `outputs/`; saving overwrites the archive's copy of a run (it gained an
evaluation).

A run's identity holds the absolute path of its dataset, so a checkout elsewhere (another home,
another `../shared`) names the same run differently. `save` therefore also records what each
dataset folder held (`datasets.json`: its files' relative paths and sizes, hashed), and `restore`
relocates a run whose folder is not on this machine to the folder of the same name under this
machine's data root (`$MIMBENCH_DATA`, else `../shared/datasets`) when that folder holds the same
files: the run's config (and its suite index entry) take the new path, and so the name this
machine gives the run. A folder with other files is not taken for it. Light: the standard
library, filelock and `runs.records`.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from core.files import atomic_path, config_hash, read_json, write_json
from runs.records import RecordError, read_record

RUN_FILES = ("config.json", "metrics.jsonl", "result.json")      # result.json, which makes a run done, last
INDEX_GLOB = "suites/*/*/runs.json"
DATASETS = "datasets.json"                                       # data path -> what the folder held
DEFAULT_ARCHIVE = Path(__file__).resolve().parent.parent / "results"


def finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a readable record of a finished run."""
    try:
        record = read_record(run_dir)
    except RecordError:
        return False
    return record is not None and record.done


def running(run_dir: Path) -> bool:
    """Whether a process holds the run's lock (the one `runs.execute.execute` takes): it is training."""
    if not (run_dir / ".lock").exists():
        return False
    lock = FileLock(str(run_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def copy(source: Path, target: Path) -> bool:
    """`source` onto `target` (atomically) unless they are equal; whether it copied."""
    if target.exists() and target.read_bytes() == source.read_bytes():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return True


def data_paths(record) -> set[str]:
    """The dataset folders a config (or suite index) names: every `data` entry's `path`, at any
    depth (a run's prerequisites carry their own)."""
    if isinstance(record, list):
        return set().union(*map(data_paths, record))
    if not isinstance(record, dict):
        return set()
    found = {record["data"]["path"]} if isinstance(record.get("data"), dict) and "path" in record["data"] else set()
    return found.union(*map(data_paths, record.values()))


def fingerprint(folder: Path) -> dict:
    """What a dataset folder holds, cheaply: its files' relative paths and sizes, hashed (CIFAR-10's
    60k files: ~1 s). Contents are not read: two folders with the same names and sizes pass."""
    digest, count, size = hashlib.sha256(), 0, 0
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        length = file.stat().st_size
        digest.update(f"{file.relative_to(folder).as_posix()}\t{length}\n".encode())
        count, size = count + 1, size + length
    return {"name": folder.name, "files": count, "bytes": size, "sha256": digest.hexdigest()}


def save(outputs: Path, archive: Path) -> dict[str, int]:
    """Every finished run's record files and every suite index of `outputs` into `archive`, and
    what each dataset folder they name held (`datasets.json`, for `restore` elsewhere)."""
    counts = {"runs": 0, "changed": 0, "indexes": 0, "kept": 0}
    paths = set()
    for run_dir in sorted((outputs / "runs").glob("*")):
        if not finished(run_dir):
            continue        # failed or unfinished: nothing a report or a re-run could reuse
        lost = evaluations_lost(run_dir, archive / "runs" / run_dir.name)
        if lost:
            print(f"{run_dir.name}: kept as archived: its record here lacks {', '.join(lost)}, which "
                  f"results/ holds (restore it, or evaluate them here, then save)")
            counts["kept"] += 1
            continue
        counts["runs"] += 1
        changed = [copy(run_dir / name, archive / "runs" / run_dir.name / name)
                   for name in RUN_FILES if (run_dir / name).exists()]
        counts["changed"] += any(changed)
        paths |= data_paths(read_json(run_dir / "config.json"))
    for index in sorted(outputs.glob(INDEX_GLOB)):
        counts["indexes"] += copy(index, archive / index.relative_to(outputs))
    known = read_datasets(archive)
    new = {path: fingerprint(Path(path)) for path in sorted(paths - set(known)) if Path(path).is_dir()}
    if new:
        write_json(archive / DATASETS, {**known, **new})
    return counts


def evaluations_lost(run_dir: Path, archived_dir: Path) -> list[str]:
    """The evaluations an archived record holds that the run's record here does not: saving it
    would drop them (a run made again here before its record was restored, asked for fewer)."""
    try:
        archived = read_record(archived_dir)
    except RecordError:
        return []
    here = read_record(run_dir)
    return sorted(set(archived.evals) - set(here.evals)) if archived is not None and archived.done else []


def read_datasets(archive: Path) -> dict[str, dict]:
    file = archive / DATASETS
    return read_json(file) if file.exists() else {}


def relocations(archive: Path, data_root: Path | None) -> tuple[dict[str, str], list[str]]:
    """Archived dataset paths not on this machine -> the folder of the same name under
    `data_root` holding the same files; and a line for each one left as it was."""
    moved, left = {}, []
    if data_root is None:
        return moved, left
    for path, held in sorted(read_datasets(archive).items()):
        if Path(path).is_dir():
            continue
        here = data_root / held["name"]
        if not here.is_dir():
            left.append(f"{path} (no {here} here)")
        elif fingerprint(here) != held:
            left.append(f"{path} ({here} holds other files)")
        else:
            moved[path] = str(here.resolve())
    return moved, left


def relocated(record, moved: dict[str, str], names: dict[str, str]):
    """`record` (a config, result or suite index) with every moved data path and renamed run
    folder replaced."""
    if isinstance(record, dict):
        return {key: relocated(value, moved, names) for key, value in record.items()}
    if isinstance(record, list):
        return [relocated(value, moved, names) for value in record]
    if isinstance(record, str):
        if record in moved:
            return moved[record]
        head, _, tail = record.rpartition("/")        # a suite index's run_dir: ../../../runs/<name>
        return f"{head}/{names[tail]}" if head and tail in names else record
    return record


def relocate_run(archived: Path, moved: dict[str, str]) -> tuple[str, dict[str, dict]]:
    """An archived run's folder name on this machine, and the record files that differ from the
    archive's: none, or, when its config names a moved dataset, its relocated config and result
    (renamed by the relocated config's hash)."""
    config = read_json(archived / "config.json")
    if not data_paths(config) & set(moved):
        return archived.name, {}
    config = relocated(config, moved, {})
    result = {**relocated(read_json(archived / "result.json"), moved, {}), "config_hash": config_hash(config)}
    return f"{config['method']}-{result['config_hash']}", {"config.json": config, "result.json": result}


@dataclass
class Restored:
    runs: int = 0                   # run records written into outputs/
    indexes: int = 0                # suite indexes written
    relocated: int = 0              # of the runs, those renamed for a relocated dataset
    moved: dict[str, str] = field(default_factory=dict)     # archived data path -> this machine's
    left: list[str] = field(default_factory=list)           # archived data paths not relocated, why


def restore(archive: Path, outputs: Path, data_root: Path | None = None) -> Restored:
    """The archived runs and suite indexes that `outputs` lacks; a run `outputs` has finished,
    or one a process is running, is left as it is. Runs measured on a dataset folder this
    machine does not have are relocated to the same files under `data_root` (module doc)."""
    moved, left = relocations(archive, data_root)
    counts = Restored(moved=moved, left=left)
    names = {}
    for archived in sorted((archive / "runs").glob("*")):
        if not finished(archived):
            continue
        name, rewritten = relocate_run(archived, moved)
        names[archived.name] = name
        run_dir = outputs / "runs" / name
        if finished(run_dir) or running(run_dir):
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        for file in RUN_FILES:                          # result.json, which makes the run done, last
            if file in rewritten:
                write_json(run_dir / file, rewritten[file])
            elif (archived / file).exists():
                copy(archived / file, run_dir / file)
        counts.runs += 1
        counts.relocated += name != archived.name
    for index in sorted(archive.glob(INDEX_GLOB)):
        target = outputs / index.relative_to(archive)
        if target.exists():
            continue
        if moved:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_json(target, relocated(read_json(index), moved, names))
        else:
            copy(index, target)
        counts.indexes += 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runs.archive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("--outputs", type=Path, default=Path("outputs"), help="run folders (default outputs/)")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE,
                        help="the archive (default: results/ of this checkout)")
    args = parser.parse_args(argv)
    if args.action == "save":
        if not (args.outputs / "runs").is_dir():
            print(f"error: {args.outputs}/runs not found: nothing to save; run a suite first or pass --outputs",
                  file=sys.stderr)
            return 2
        counts = save(args.outputs, args.archive)
        print(f"archived {counts['runs']} finished run(s) ({counts['changed']} new or changed) and "
              f"{counts['indexes']} suite index(es) in {args.archive}")
    else:
        if not args.archive.is_dir():
            print(f"no archive at {args.archive}: nothing to restore")
            return 0
        from engine.data import data_root
        counts = restore(args.archive, args.outputs, data_root())
        print(f"restored {counts.runs} finished run(s) and {counts.indexes} suite index(es) "
              f"from {args.archive} into {args.outputs}")
        for old, new in counts.moved.items():
            print(f"  runs measured on {old} are relocated to {new}, which holds the same files "
                  f"({counts.relocated} run(s) renamed by their new config)")
        for line in counts.left:
            print(f"  runs measured on {line} keep their names: set $MIMBENCH_DATA to the folder holding "
                  f"that dataset to reuse them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
