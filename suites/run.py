"""Run a suite: every (method, setting, seed) of its grid, skipping finished runs and
resuming unfinished ones; then print and save the table (mean ± 95% CI over seeds).

    python -m suites.run --list
    python -m suites.run ablation_masking --profile smoke
    python -m suites.run ablation_masking --profile cpu --seeds 2 --only mae,none
    python -m suites.run ablation_masking --dry-run
    python -m suites.run ablation_masking --table-only      # the table of what has finished
    python -m suites.run ablation_masking --profile imagenet --data /data/imagenet \
        --slurm --slurm-partition gpu --slurm-gpus 8 --slurm-timeout 2880   # one Slurm job per run

Exit codes: 0 every run done, or skipped because another process holds it (with --slurm:
submitted); 1 some runs failed (each folder's result.json says why); 2 bad input (unknown
suite / profile / method, bad path or config); 130 / 143 stopped by SIGINT / SIGTERM after
writing a checkpoint (run the same command again to resume).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


from engine import distributed
from engine.data import DataError
from engine.trainer import Preempted
from methods.registry import ConfigError, UnknownNameError
from reports.tables import RUNS_FROM_INDEX, load_index, metric_columns, read_index, summarize, warn
from runs import slurm
from runs.cost import estimate_seconds
from runs.execute import RunSkipped, UnreadableRecord, check_inputs, execute, read_result, stale_evaluations
from runs.identity import Run, data_descriptor, resolve
from runs.records import RecordError, read_json, write_json
from suites.profiles import PROFILES, get_profile
from suites.registry import SUITES, get_suite


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m suites.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", nargs="?", help=f"one of: {', '.join(SUITES)}")
    parser.add_argument("--profile", default="cpu", help=f"one of: {', '.join(PROFILES)} (default cpu)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per grid cell (default: the profile's)")
    parser.add_argument("--only", default=None,
                        help="comma-separated methods to keep from the grid; METHOD:SETTING keeps one cell "
                             "(e.g. --only 'none,beit:random 0.4'; a setting with a comma stays whole: "
                             "'pixel:raw pixels, block 0.4')")
    parser.add_argument("--outputs", default="outputs", help="where run folders go (default outputs/)")
    parser.add_argument("--data", default=None,
                        help="ImageFolder with train/ and test/ (default: the shipped CIFAR-10); images "
                             "of another size are resized (shorter side) and centre-cropped, grayscale "
                             "converted to RGB")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave unreadable image files out (counted) instead of stopping at the first")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and estimated cost, run nothing")
    parser.add_argument("--list", action="store_true", help="list the suites with grid sizes and costs")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: write the grid's index and table from the runs finished so far "
                             "(the others show as missing)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    cluster = parser.add_argument_group("Slurm (through submitit; each option needs --slurm)")
    cluster.add_argument("--slurm", action="store_true",
                         help="submit one Slurm job per run not done instead of running here; with "
                              "--dry-run, print the jobs")
    cluster.add_argument("--slurm-partition", default=None, help="partition (default: the cluster's)")
    cluster.add_argument("--slurm-nodes", type=int, default=None, help="nodes per job (default 1)")
    cluster.add_argument("--slurm-gpus", type=int, default=None,
                         help="GPUs per node = DDP processes per node (default 1)")
    cluster.add_argument("--slurm-timeout", type=int, default=None,
                         help="time limit of a job in minutes (default 1440); at it the job requeues "
                              "itself and resumes from the run's last checkpoint")
    cluster.add_argument("--slurm-cpus-per-task", type=int, default=None, help="default: the cluster's")
    cluster.add_argument("--slurm-mem", type=float, default=None, help="GB per node (default: the cluster's)")
    cluster.add_argument("--slurm-option", action="append", default=None, metavar="KEY=VALUE",
                         help="any other sbatch option, e.g. account=vision or qos=high (repeatable)")
    cluster.add_argument("--slurm-wait", action="store_true", default=None,   # None: not given
                         help="wait for the jobs to end, then write the table")
    return parser.parse_args(argv)


# --slurm-* arguments -> SlurmOptions fields
SLURM_FIELDS = {"slurm_partition": "partition", "slurm_nodes": "nodes", "slurm_gpus": "gpus",
                "slurm_timeout": "timeout_min", "slurm_cpus_per_task": "cpus_per_task", "slurm_mem": "mem_gb"}


def slurm_options(args: argparse.Namespace) -> slurm.SlurmOptions | None:
    """The --slurm-* options as SlurmOptions (None without --slurm); ConfigError for bad ones."""
    given = [name for name in (*SLURM_FIELDS, "slurm_option", "slurm_wait") if getattr(args, name) is not None]
    if not args.slurm:
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} needs --slurm")
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--slurm submits jobs from one process; run it without torchrun")
    return slurm.SlurmOptions(**{field: getattr(args, name) for name, field in SLURM_FIELDS.items()
                                 if getattr(args, name) is not None},
                              extra=slurm.parse_extra(args.slurm_option or []))


def plan(suite_name: str, profile_name: str, seeds: int | None, only: str | None,
         data: str | None, check_data: bool = True) -> list[Run]:
    """Every run of the suite that `only` keeps (all without it), in grid order."""
    grid = plan_grid(suite_name, profile_name, seeds, data, check_data)
    return keep_only(grid, only, suite_name) if only else grid


def plan_grid(suite_name: str, profile_name: str, seeds: int | None, data: str | None,
              check_data: bool = True) -> list[Run]:
    """Every run of the suite's whole grid. `check_data=False` (--dry-run) names the runs
    without looking at the data folder."""
    suite = get_suite(suite_name)
    profile = get_profile(profile_name)
    seeds = profile.seeds if seeds is None else seeds
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    descriptor = data_descriptor(profile, data, check=check_data)
    return [Run(spec, seed, resolve(spec, profile, seed, descriptor))
            for spec in suite.grid(profile) for seed in range(seeds)]


def keep_only(grid: list[Run], only: str, suite_name: str) -> list[Run]:
    """The runs of `grid` whose cells `--only` keeps."""
    kept = select([run.spec for run in grid if run.seed == 0], only, suite_name)
    return [run for run in grid if run.spec in kept]


def select(specs: list, only: str, suite_name: str) -> list:
    """The grid cells `--only` keeps: "mae,none" keeps methods, "beit:random 0.4" one cell."""
    known = sorted({s.method for s in specs})
    kept = []
    for word in only_words(only, known):
        method, _, setting = (part.strip() for part in word.partition(":"))
        if method not in known:
            raise UnknownNameError(f"--only names {method!r}, not in suite {suite_name!r}; its methods: "
                                   f"{', '.join(known)}")
        cells = [s for s in specs if s.method == method and (not setting or s.setting == setting)]
        if not cells:
            settings = ", ".join(repr(s.setting) for s in specs if s.method == method)
            raise UnknownNameError(f"--only names {word!r}, but {method} has no setting {setting!r} in suite "
                                   f"{suite_name!r}; its settings: {settings}")
        kept += [s for s in cells if s not in kept]
    return [s for s in specs if s in kept]     # grid order


def only_words(only: str, methods: list[str]) -> list[str]:
    """--only split at commas, except inside a setting that has one ("pixel:raw pixels, block 0.4")."""
    words: list[str] = []
    for piece in (p.strip() for p in only.split(",")):
        if words and ":" in words[-1] and ":" not in piece and piece not in methods:
            words[-1] += ", " + piece
        elif piece:
            words.append(piece)
    if not words:
        raise UnknownNameError(f"--only {only!r} names nothing; pass methods or METHOD:SETTING, "
                               f"comma-separated (its methods: {', '.join(methods)})")
    return words


def flatten(overrides: dict, prefix: str = "") -> dict:
    """{"mask": {"ratio": 0.75}} -> {"mask.ratio": 0.75}: the grid's settings as report columns."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_state(run_dir: Path, spec, profile) -> str:
    """What a run folder holds for this grid cell: done, to evaluate (named), to run, failed,
    unreadable (a damaged result.json)."""
    try:
        record = read_result(run_dir)
    except UnreadableRecord:
        return "unreadable"
    if record is None:
        return "to run"
    if not record.done:
        return record.status
    stale = stale_evaluations(record, spec.evals, profile)
    return "to evaluate: " + ", ".join(stale) if stale else "done"


def print_plan(suite_name: str, profile_name: str, runs: list[Run], outputs: Path) -> None:
    profile = get_profile(profile_name)
    total = left = 0.0
    print(f"suite {suite_name}, profile {profile_name}: {len(runs)} runs")
    for run in runs:
        seconds = estimate_seconds(run.config, profile)
        state = run_state(run.config.folder(outputs), run.spec, profile)
        total += seconds
        left += seconds if state in ("to run", "failed", "unreadable") else 0.0   # pre-training still to do
        print(f"  {run.spec.method:6s} {run.spec.setting:22s} seed {run.seed}  ~{seconds / 60:7.1f} min  "
              f"{run.name}  [{state}]")
    print(f"estimated pre-training: {left / 3600:.2f} h left of {total / 3600:.2f} h for these runs "
          f"at {profile.flops_per_second / 1e9:.0f} GFLOP/s (plus a minute or two of evaluation per run; "
          f"fine-tuning and segmentation take longer)")


def list_suites(cost_profile: str) -> None:
    """Suites with their grid sizes per profile, and the estimated pre-training cost at
    `cost_profile` (counting FLOPs builds every model of the grid, so only one profile)."""
    costs: dict[str, float] = {}
    cost_at = get_profile(cost_profile)
    for name in SUITES:
        suite = get_suite(name)
        print(f"{name}: {suite.DESCRIPTION}")
        for profile_name, profile in PROFILES.items():
            specs = suite.grid(profile)
            line = (f"  {profile_name:9s} {len(specs):2d} cells x {profile.seeds} seed(s) = "
                    f"{len(specs) * profile.seeds:3d} runs")
            if profile is cost_at:
                # the profile's own data, without reading it (imagenet: ImageNet-1k's size)
                data = {"name": "imagenet" if profile.data == "user" else profile.data,
                        "img_size": profile.encoder["img_size"]}
                total = 0.0
                for spec in specs:
                    config = resolve(spec, profile, 0, data)
                    key = json.dumps(config.to_dict(), sort_keys=True)
                    if key not in costs:
                        costs[key] = estimate_seconds(config, profile)
                    total += costs[key] * profile.seeds
                line += (f", ~{format_hours(total)} of pre-training at "
                         f"{profile.flops_per_second / 1e9:g} GFLOP/s (estimated from counted FLOPs)")
            print(line)
    print(f"(costs shown for --profile {cost_profile}; pass --list --profile NAME for another)")


def format_hours(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def write_index(suite_dir: Path, suite_name: str, profile_name: str, runs: list[Run], outputs: Path) -> None:
    """runs.json: the suite's runs with their grid settings, as the table reads them. Finished
    runs of the same cells at other seeds, listed by an earlier command (e.g. `--seeds 3` before
    `--seeds 2`), stay listed: a table never loses a finished seed to a smaller --seeds."""
    suite_dir.mkdir(parents=True, exist_ok=True)
    entries = [{"method": run.spec.method, "setting": run.spec.setting, "seed": run.seed,
                "params": flatten(run.spec.overrides), "evals": list(run.spec.evals),
                "run_dir": str(RUNS_FROM_INDEX / run.name)}
               for run in runs]
    kept, dropped = earlier_finished_runs(suite_dir, runs)
    if kept:
        print(f"runs.json also lists {len(kept)} finished run(s) of other seeds from earlier commands")
    if dropped:
        print(f"runs.json no longer lists {dropped} finished run(s) of an earlier command (another "
              f"--data or grid); their folders stay in {outputs}/runs")
    order = {(run.spec.method, run.spec.setting): i for i, run in enumerate(runs)}
    entries = sorted(entries + kept, key=lambda e: (order[(e["method"], e["setting"])], e["seed"]))
    write_json(suite_dir / "runs.json", {"suite": suite_name, "profile": profile_name, "runs": entries})


def earlier_finished_runs(suite_dir: Path, runs: list[Run]) -> tuple[list[dict], int]:
    """Entries of the existing runs.json to keep (finished, same cell and config but another
    seed) and how many finished ones are dropped (another config, e.g. other --data)."""
    index_file = suite_dir / "runs.json"
    if not index_file.exists():
        return [], 0

    def unseeded(config: dict) -> str:
        return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True)

    cells = {(run.spec.method, run.spec.setting): unseeded(run.config.to_dict()) for run in runs}
    listed = {(run.spec.method, run.spec.setting, run.seed) for run in runs}
    try:
        earlier = read_index(index_file)["runs"]        # the report's reader: validated
    except RecordError as err:
        warn(f"{err}; it is written anew from this grid (the run folders stay in outputs/runs)")
        return [], 0
    kept, dropped = [], 0
    for entry in earlier:
        run_dir = suite_dir / entry["run_dir"]
        if (entry["method"], entry["setting"], entry["seed"]) in listed:
            continue
        try:
            record = read_result(run_dir)
        except UnreadableRecord:
            record = None            # not listed; the run's own cell names it
        if record is None or not record.done or not (run_dir / "config.json").exists():
            continue
        if cells.get((entry["method"], entry["setting"])) == unseeded(read_json(run_dir / "config.json")):
            kept.append(entry)
        else:
            dropped += 1
    return kept, dropped


def write_table(suite_dir: Path) -> None:
    runs_table = load_index(suite_dir / "runs.json")
    table = summarize(runs_table, metric_columns(runs_table))
    table.to_csv(suite_dir / "table.csv", index=False)
    (suite_dir / "table.md").write_text(table.to_markdown(index=False) + "\n")
    print()
    print(table.to_string(index=False))


def table_command(args: argparse.Namespace) -> str:
    """The command that writes the table once the jobs are done: this one without --slurm."""
    words = ["python -m suites.run", args.suite, "--profile", args.profile]
    for flag, value in (("--seeds", args.seeds), ("--only", args.only), ("--outputs", args.outputs),
                        ("--data", args.data)):
        if value is not None and not (flag == "--outputs" and value == "outputs"):
            words += [flag, str(value)]
    return " ".join(words)


def submit_to_slurm(args: argparse.Namespace, options: slurm.SlurmOptions, jobs: list[slurm.PlannedJob],
                    runs: list[Run], grid: list[Run], outputs: Path, suite_dir: Path) -> int:
    if jobs:
        slurm.cluster()   # no sbatch here: say so before writing anything
    write_index(suite_dir, args.suite, args.profile, grid, outputs)
    if not jobs:
        print(f"nothing to submit: all {len(runs)} runs are done")
        write_table(suite_dir)
        print(f"\ntable: {suite_dir}/table.md")
        return 0
    folder = outputs / "slurm" / args.suite / args.profile
    submitted = slurm.submit(jobs, options, folder)
    print(f"submitted {len(jobs)} job(s); each: {options.describe()}")
    job_ids = [handle.job_id for handle in submitted]
    for job, job_id in zip(jobs, job_ids):
        after = "" if job.after is None else f"  (after {job_ids[job.after]})"
        print(f"  {job_id}  {job.label}{after}")
    print(f"follow them: squeue -j {','.join(job_ids)}; logs: {folder}/<job id>_<task>_log.out/.err")
    print("a job at its time limit requeues itself and resumes from the run's last checkpoint")
    if not args.slurm_wait:
        print(f"once squeue lists none of them, the same command without --slurm finds every run done and "
              f"writes the table (--dry-run first shows each run's state):\n  {table_command(args)}")
        return 0
    print("waiting for them:")
    failed = slurm.wait(jobs, submitted)
    write_table(suite_dir)
    print(f"\ntable: {suite_dir}/table.md")
    if failed:
        print(f"{len(failed)} job(s) FAILED (their logs in {folder}, runs' result.json in {outputs}/runs)",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        list_suites(args.profile)
        return 0
    if not args.suite:
        raise UnknownNameError(f"no suite given; known: {', '.join(SUITES)} (or --list)")
    outputs = Path(args.outputs)
    # the suite's index (and so its table) lists the whole grid, whatever --only picked to run:
    # processes running different cells side by side then write the same index
    grid = plan_grid(args.suite, args.profile, args.seeds, args.data, check_data=not args.dry_run)
    runs = keep_only(grid, args.only, args.suite) if args.only else grid
    options = slurm_options(args)
    profile = get_profile(args.profile)
    if not args.dry_run:
        check_outputs(outputs)
        if not args.table_only:
            check_inputs(runs, profile)       # e.g. CamVid for segmentation: before any training
    jobs = slurm.plan_jobs(runs, get_profile(args.profile), outputs, args.device, not args.no_progress,
                           "skip" if args.skip_bad_images else "error") if options else []
    suite_dir = outputs / "suites" / args.suite / args.profile
    if args.dry_run:
        print_plan(args.suite, args.profile, runs, outputs)
        if options:
            slurm.print_jobs(jobs, options, len(runs))
        return 0
    if args.table_only:
        write_index(suite_dir, args.suite, args.profile, grid, outputs)
        write_table(suite_dir)
        print(f"\ntable: {suite_dir}/table.md")
        return 0
    if options:
        return submit_to_slurm(args, options, jobs, runs, grid, outputs, suite_dir)
    distributed.init_from_env()       # under torchrun: join the process group
    device = distributed.default_device(args.device)
    if distributed.is_main():
        write_index(suite_dir, args.suite, args.profile, grid, outputs)

    failed, skipped, started = [], [], time.time()
    for i, run in enumerate(runs, 1):
        name = run.name
        if distributed.is_main():
            print(f"[{i}/{len(runs)}] {run.spec.method} {run.spec.setting} seed {run.seed} -> {name}", flush=True)
        try:
            execute(run, profile, outputs, device=device, progress=not args.no_progress,
                    on_bad_image="skip" if args.skip_bad_images else "error")
        except RunSkipped as err:
            skipped.append(name)
            print(f"  skipped: {err}")
        except (DataError, UnknownNameError, ConfigError):
            raise  # bad input: stop the whole suite (exit 2), nothing else would work either
        except UnreadableRecord as err:      # the file is left as it is
            failed.append(name)
            print(f"  FAILED: {err}", file=sys.stderr)
        except Preempted as err:
            print(f"stopped: {err}", file=sys.stderr)
            return 128 + (err.signum or 0)
        except Exception as err:  # one run's failure must not stop the others
            failed.append(name)
            print(f"  FAILED: {err.__class__.__name__}: {err} (traceback in {name}/result.json)")

    if not distributed.is_main():
        return 0
    write_table(suite_dir)
    print(f"\n{len(runs)} runs in {time.time() - started:.0f} s; table: {suite_dir}/table.md")
    if skipped:
        print(f"{len(skipped)} run(s) were busy in another process: {', '.join(skipped)}")
    if failed:
        print(f"{len(failed)} run(s) FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def check_outputs(outputs: Path) -> None:
    """--outputs can be created and written (checked before any work, creating nothing: a run
    must not train for hours and then find it cannot save)."""
    existing = outputs.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return
    raise ConfigError(f"--outputs {outputs} cannot be created or written ({problem}); pass a folder "
                      f"you can write to, e.g. --outputs outputs")


def cli(argv=None) -> int:
    try:
        return main(argv)
    except (UnknownNameError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
