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
evaluation). Light: the standard library, filelock and `runs.records`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from filelock import FileLock, Timeout

from runs.records import RecordError, atomic_path, read_record

RUN_FILES = ("config.json", "metrics.jsonl", "result.json")      # result.json, which makes a run done, last
INDEX_GLOB = "suites/*/*/runs.json"
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


def save(outputs: Path, archive: Path) -> dict[str, int]:
    """Every finished run's record files and every suite index of `outputs` into `archive`."""
    counts = {"runs": 0, "changed": 0, "indexes": 0}
    for run_dir in sorted((outputs / "runs").glob("*")):
        if not finished(run_dir):
            continue        # failed or unfinished: nothing a report or a re-run could reuse
        counts["runs"] += 1
        changed = [copy(run_dir / name, archive / "runs" / run_dir.name / name)
                   for name in RUN_FILES if (run_dir / name).exists()]
        counts["changed"] += any(changed)
    for index in sorted(outputs.glob(INDEX_GLOB)):
        counts["indexes"] += copy(index, archive / index.relative_to(outputs))
    return counts


def restore(archive: Path, outputs: Path) -> dict[str, int]:
    """The archived runs and suite indexes that `outputs` lacks; a run `outputs` has finished,
    or one a process is running, is left as it is."""
    counts = {"runs": 0, "indexes": 0}
    for archived in sorted((archive / "runs").glob("*")):
        run_dir = outputs / "runs" / archived.name
        if finished(run_dir) or running(run_dir) or not finished(archived):
            continue
        for name in RUN_FILES:
            if (archived / name).exists():
                copy(archived / name, run_dir / name)
        counts["runs"] += 1
    for index in sorted(archive.glob(INDEX_GLOB)):
        target = outputs / index.relative_to(archive)
        if not target.exists():
            counts["indexes"] += copy(index, target)
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
        counts = restore(args.archive, args.outputs)
        print(f"restored {counts['runs']} finished run(s) and {counts['indexes']} suite index(es) "
              f"from {args.archive} into {args.outputs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
