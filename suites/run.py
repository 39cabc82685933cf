"""Run a suite: every (method, setting, seed) of its grid, skipping finished runs and
resuming unfinished ones; then print and save the table (mean ± 95% CI over seeds).

    python -m suites.run --list
    python -m suites.run ablation_masking --profile smoke
    python -m suites.run ablation_masking --profile cpu --seeds 2 --only mae,none
    python -m suites.run ablation_masking --dry-run
    python -m suites.run ablation_masking --table-only      # the table of what has finished
    python -m suites.run compare_methods --budget 2.5h --dry-run   # what fits 2.5 h here, per cell
    python -m suites.run compare_methods --budget 1.3ep --recipe shared   # FLOPs of 1.3 MAE-epochs each
    python -m suites.run compare_methods --curve 0.5,1,2.5,5ep --recipe shared   # a curve: one trunk each
    python -m suites.run ablation_masking --profile imagenet --data /data/imagenet \
        --slurm --slurm-partition gpu --slurm-gpus 8 --slurm-timeout 2880   # one Slurm job per run

--budget (compare_methods only) runs the compute-matched block alone: `none` and every method at
the pre-training FLOPs of MAE at E epochs. "1.3ep" sets E; hours ("2.5", "2.5h") solve for the
largest E (to 0.01) at which the whole suite (every cell and seed, pre-training, the chosen
evaluations and BEiT's tokenizer, work already finished costing nothing) is estimated to fit, at
this machine's FLOP/s (measured once, in outputs/calibration.json). The E solved is kept in the
suite's index, so running the same command again (after a stop, or in a second process) keeps its
runs; --recalibrate measures and solves again.

Exit codes: 0 every run done, or skipped because another process holds it (with --slurm:
submitted); 1 some runs failed (each folder's result.json says why); 2 bad input (unknown
suite / profile / method, bad path or config); 130 / 143 stopped by SIGINT / SIGTERM after
writing a checkpoint (run the same command again to resume).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from core.config import ConfigError, UnknownNameError
from engine import distributed
from engine.data import DataError
from engine.stream import DATA_SOURCES, MAX_WORKERS, MEMORY_SOURCE_MAX_BYTES
from engine.trainer import Preempted
from methods.recipes import RECIPES
from runs import slurm
from runs.cost import plan_seconds
from runs.execute import RunOptions, check_inputs
from runs.index import INDEX_FILE
from runs.indexing import write_index
from runs.plan import Plan, run_plan
from runs.plugins import load_plugins
from suites import compare_methods
from suites.budget import (BUDGET_SUITE, Allocation, ComputeBudget, budget_arguments, parse_curve, plan_budget,
                           plan_curve)
from suites.plan import check_recipe, suite_plan
from suites.profiles import PROFILES, get_profile, override
from suites.registry import SUITES
from suites.show import list_suites, print_plan


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m suites.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", nargs="?", help=f"one of: {', '.join(SUITES)}")
    parser.add_argument("--profile", default="cpu", help=f"one of: {', '.join(PROFILES)} (default cpu)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per grid cell (default: the profile's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile field (repeatable; dotted keys, JSON values), e.g. the imagenet "
                             "profile on a small folder: --set encoder.size=micro --set encoder.img_size=32 "
                             "--set train.batch_size=32 (changed configs are other runs)")
    parser.add_argument("--only", default=None,
                        help="comma-separated methods to keep from the grid; METHOD:SETTING keeps one cell "
                             "(e.g. --only 'none,beit:random 0.4'; a setting with a comma stays whole: "
                             "'pixel:raw pixels, block 0.4')")
    parser.add_argument("--recipe", default="paper",
                        help=f"one of: {', '.join(RECIPES)} (default paper: each method at its paper's recipe; "
                             f"shared: the profile's one recipe for every method, as runs before recipes had)")
    parser.add_argument("--budget", default=None, metavar="B",
                        help=f"{BUDGET_SUITE} only: its compute-matched block alone, every method at the "
                             f"pre-training FLOPs of MAE at E epochs; B is E as '1.3ep', or hours ('2.5' or "
                             f"'2.5h') the whole suite must fit on this machine (E solved from its measured FLOP/s)")
    parser.add_argument("--curve", default=None, metavar="B1,...,Bk",
                        help=f"{BUDGET_SUITE} only: its compute-matched block at several budgets of MAE-epochs of "
                             f"FLOPs (e.g. 0.5,1,2.5,5ep) under warm-up / stable / decay: one constant-lr trunk per "
                             f"method and seed, a decay branch per budget (runs.curve); its own table, <profile>-curve (-<recipe> but for shared)")
    parser.add_argument("--evals", default=None,
                        help=f"with --budget: comma-separated evaluations (default "
                             f"{','.join(compare_methods.BUDGET_EVALS)}; e.g. knn,linear,finetune,segmentation)")
    parser.add_argument("--recalibrate", action="store_true",
                        help="with --budget: measure this machine's FLOP/s now (a few MAE steps; recorded in "
                             "outputs/calibration.json unless the machine is busy) instead of taking what the "
                             "finished runs here sustained, and solve the budget again instead of keeping the E "
                             "of an earlier command")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and estimated cost, run nothing")
    parser.add_argument("--list", action="store_true", help="list the suites with grid sizes and costs")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: write the grid's index and table from the runs finished so far "
                             "(the others show as missing)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--plugins", action="append", default=[], metavar="MODULE_OR_PATH",
                        help="a module or .py file of your own that registers methods or evaluations, imported "
                             "before the suite is planned (repeatable; also $MIMBENCH_PLUGINS, separated by "
                             f"'{os.pathsep}', and installed packages' 'mimbench.plugins' entry points); every "
                             "suite then runs its methods, and each run's record names the plugin")
    add_data_arguments(parser)
    add_slurm_arguments(parser)
    return parser.parse_args(argv)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Where runs go, what they read and on which device."""
    parser.add_argument("--outputs", default="outputs", help="where run folders go (default outputs/)")
    parser.add_argument("--data", default=None,
                        help="ImageFolder with train/ and test/ (default: the shipped CIFAR-10); images "
                             "of another size are resized (shorter side) and centre-cropped, grayscale "
                             "converted to RGB")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave unreadable image files out (counted) instead of stopping at the first")
    parser.add_argument("--data-source", default="auto", choices=DATA_SOURCES,
                        help="how pre-training (and k-NN, the probe and fine-tuning after it) reads --data: memory "
                             "(decoded once at the model's size, cached), stream (files decoded per step in "
                             "DataLoader workers, engine.stream) "
                             f"or auto (default: memory when the decoded train split fits "
                             f"{MEMORY_SOURCE_MAX_BYTES // 2**30} GiB, else stream); recorded in result.json")
    parser.add_argument("--data-workers", type=int, default=None, metavar="N",
                        help="with a streaming source: DataLoader workers per process (default: the "
                             f"process's cores, at most {MAX_WORKERS})")


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
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


def main(argv=None) -> int:
    args = parse_args(argv)
    load_plugins(args.plugins)
    check_recipe(args.recipe)
    if args.data_workers is not None and args.data_workers < 0:
        raise ConfigError(f"--data-workers {args.data_workers}: pass 0 (decode in the training process) or more")
    if args.list:
        list_suites(args.profile, args.recipe)
        return 0
    if not args.suite:
        raise UnknownNameError(f"no suite given; known: {', '.join(SUITES)} (or --list)")
    curve = curve_arguments(args)
    budget = budget_arguments(args.suite, args.budget, None if curve else args.evals, args.recalibrate)
    cluster = slurm_options(args)
    if budget is not None and budget.hours is not None and cluster:
        raise ConfigError("--budget in hours is solved at this machine's FLOP/s; with --slurm pass MAE-epochs "
                          "(e.g. --budget 1.3ep)")
    plan, allocation = plan_command(args, budget, curve)
    if not args.dry_run:
        check_outputs(plan.outputs)
        if not args.table_only:
            check_inputs(list(plan.runs), plan.profile)       # e.g. CamVid for segmentation: before any training
    jobs = slurm.plan_jobs(plan, run_options(args, args.device)) if cluster else []
    if args.dry_run:
        print_plan(plan, allocation)
        if cluster:
            slurm.print_jobs(jobs, cluster, len(plan.runs))
        return 0
    budget_entry = index_budget_entry(plan, allocation)
    if args.table_only:
        write_index(plan, budget_entry)
        write_table(plan.suite_dir)
        return 0
    if cluster:
        return submit_to_slurm(args, cluster, jobs, plan, budget_entry)
    return run_here(args, plan, budget_entry)


def curve_arguments(args: argparse.Namespace) -> tuple[float, ...] | None:
    """--curve parsed (None without it); where it applies checked."""
    if args.curve is None:
        return None
    if args.suite != BUDGET_SUITE or args.budget is not None:
        raise ConfigError(f"--curve applies to {BUDGET_SUITE} alone, without --budget: "
                          f"python -m suites.run {BUDGET_SUITE} --curve {args.curve}")
    return parse_curve(args.curve)


def plan_command(args: argparse.Namespace, budget: ComputeBudget | None,
                 curve: tuple[float, ...] | None = None) -> tuple[Plan, Allocation | None]:
    """The command's plan: the suite's whole grid (the index and table list it, whatever --only
    picked to run: processes running different cells side by side write the same index), or,
    with --budget, the compute-matched block at its E."""
    profile = override(get_profile(args.profile), args.set)
    outputs = Path(args.outputs)
    if curve is not None:
        return plan_curve(curve, args.profile, profile, args.recipe, outputs, args.seeds, args.only, args.data,
                          not args.dry_run, args.evals), None
    if budget is None:
        return suite_plan(args.suite, args.profile, profile, args.recipe, outputs, args.seeds, args.only, args.data,
                          not args.dry_run, tuple(args.set)), None
    device = distributed.default_device(args.device).split(":")[0]
    return plan_budget(budget, args.profile, profile, args.recipe, outputs, args.seeds, args.only, args.data,
                       not args.dry_run, args.evals, device, args.recalibrate)


def index_budget_entry(plan: Plan, allocation: Allocation | None) -> dict | None:
    """A --budget's entry of the suite's index (its plan printed first, on the main process)."""
    if allocation is None:
        return None
    if distributed.is_main():
        print_plan(plan, allocation)
    estimated = plan_seconds(plan, allocation.calibration.flops_per_second)[2]
    return allocation.record(estimated, plan.grid[0].config.data)


def run_options(args: argparse.Namespace, device: str | None) -> RunOptions:
    return RunOptions(device=device, progress=not args.no_progress,
                      on_bad_image="skip" if args.skip_bad_images else "error", data_source=args.data_source,
                      workers=args.data_workers)


def run_here(args: argparse.Namespace, plan: Plan, budget_entry: dict | None) -> int:
    """Run the plan in this process (under torchrun: in every rank), then write the table."""
    distributed.init_from_env()       # under torchrun: join the process group
    options = run_options(args, distributed.default_device(args.device))
    if distributed.is_main():
        write_index(plan, budget_entry)
    started = time.time()
    try:
        outcome = run_plan(plan, options, distributed.is_main())
    except Preempted as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 128 + (err.signum or 0)
    if not distributed.is_main():
        return 0
    write_index(plan, budget_entry, ran=True)     # again: what finished now has its collapse verdict
    write_table(plan.suite_dir, f"{len(plan.runs)} runs in {time.time() - started:.0f} s; ")
    if outcome.skipped:
        print(f"{len(outcome.skipped)} run(s) were busy in another process: {', '.join(outcome.skipped)}")
    if outcome.failed:
        print(f"{len(outcome.failed)} run(s) FAILED: {', '.join(outcome.failed)}", file=sys.stderr)
        return 1
    return 0


def write_table(suite_dir: Path, before: str = "") -> None:
    """The suite's table (mean ± 95% CI over seeds) from its index: printed, and saved as
    table.csv and table.md."""
    from reports.tables import load_index, metric_columns, summarize     # pandas and scipy: 1 s to import

    runs_table = load_index(suite_dir / INDEX_FILE)
    table = summarize(runs_table, metric_columns(runs_table))
    table.to_csv(suite_dir / "table.csv", index=False)
    (suite_dir / "table.md").write_text(table.to_markdown(index=False) + "\n")
    print()
    print(table.to_string(index=False))
    print(f"\n{before}table: {suite_dir}/table.md")


def table_command(args: argparse.Namespace) -> str:
    """The command that writes the table once the jobs are done: this one without --slurm."""
    words = ["python -m suites.run", args.suite, "--profile", args.profile]
    for flag, value in (("--recipe", args.recipe), ("--budget", args.budget), ("--curve", args.curve),
                        ("--evals", args.evals),
                        ("--seeds", args.seeds), ("--only", args.only), ("--outputs", args.outputs),
                        ("--data", args.data)):
        if value is not None and not (flag == "--outputs" and value == "outputs") \
                and not (flag == "--recipe" and value == "paper"):
            words += [flag, str(value)]
    for setting in args.set:
        words += ["--set", setting]
    return " ".join(words)


def submit_to_slurm(args: argparse.Namespace, options: slurm.SlurmOptions, jobs: list[slurm.PlannedJob],
                    plan: Plan, budget: dict | None = None) -> int:
    if jobs:
        slurm.cluster()   # no sbatch here: say so before writing anything
    write_index(plan, budget)
    if not jobs:
        print(f"nothing to submit: all {len(plan.runs)} runs are done")
        write_table(plan.suite_dir)
        return 0
    folder = plan.outputs / "slurm" / args.suite / args.profile
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
    write_table(plan.suite_dir)
    if failed:
        print(f"{len(failed)} job(s) FAILED (their logs in {folder}, runs' result.json in {plan.outputs}/runs)",
              file=sys.stderr)
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


def cli(argv=None, command=None) -> int:
    """`command(argv)` (default: this module's `main`) with bad input as one line and exit code 2."""
    try:
        return (command or main)(argv)
    except (UnknownNameError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
