"""Submit a suite's runs to Slurm through submitit instead of running them here.

    python -m suites.run ablation_masking --profile imagenet --data /data/imagenet \\
        --slurm --slurm-partition gpu --slurm-nodes 2 --slurm-gpus 8 --slurm-timeout 2880

One job per run that is not done. A job has one task per GPU; the tasks join one DDP
process group (submitit's TorchDistributedEnvironment exports the variables torchrun would,
which `engine.distributed.init_from_env` reads) and call `runs.execute.execute` for the run, so a
job writes the same run folder a local run does: the same command without `--slurm` then
finds every run done and only writes the table.

Prerequisites (BEiT's tokenizer): each one not done is trained by one job of its own, and the
runs that need it are submitted with `--dependency=afterok:<that job>`. So no two jobs train
it (the run lock would make the second one fail, not wait), the runs waiting for it hold no
GPUs, and if it fails Slurm cancels them (`--kill-on-invalid-dep=yes`).

Time limits: submitit asks Slurm for USR2 90 s before a job's limit; on it, rank 0 calls
the job's `checkpoint()`, which resubmits the same call, requeues the job and exits. The
requeued job resumes the run from its last checkpoint (the trainer keeps one every
`checkpoint_every` steps) and keeps its finished evaluations. A SIGTERM while pre-training
(Slurm's preemption) reaches the trainer, which checkpoints at the end of the step; Slurm
requeues the job where the partition preempts by requeueing.

MIMBENCH_SUBMITIT_CLUSTER=debug runs each job in this process when it is waited for (with
--slurm-wait), =local runs it as local processes, one per task: for tests and for debugging.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import submitit
import torch

from core.config import ConfigError
from engine import distributed
from runs.archive import running
from runs.curve import Trunk, is_branch
from runs.execute import RunOptions, execute, run_prerequisites
from runs.identity import RunProfile, Run
from runs.plan import Plan

CLUSTER_ENV = "MIMBENCH_SUBMITIT_CLUSTER"
# How often submitit requeues a job that hit its time limit before giving up (preemptions do
# not count). An 800-epoch ImageNet run is days of GPU time against limits of a day or so,
# and each requeue resumes from the run's checkpoint, so the bound only ends a run that
# never gets anywhere.
MAX_TIMEOUTS = 50


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None      # None: the cluster's default partition
    nodes: int = 1
    gpus: int = 1                     # per node; one task (one DDP process) per GPU
    timeout_min: int = 1440           # the time limit of one job; at it the job requeues itself
    cpus_per_task: int | None = None  # None: the cluster's default
    mem_gb: float | None = None       # per node; None: the cluster's default
    extra: dict = field(default_factory=dict)   # any other sbatch option: {"account": "x", "qos": "y"}

    def __post_init__(self) -> None:
        for flag, value in (("--slurm-nodes", self.nodes), ("--slurm-gpus", self.gpus),
                            ("--slurm-timeout", self.timeout_min), ("--slurm-cpus-per-task", self.cpus_per_task)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ConfigError(f"--slurm-mem must be > 0 (GB per node), got {self.mem_gb:g}")

    def executor_parameters(self) -> dict:
        return {"nodes": self.nodes, "gpus_per_node": self.gpus, "tasks_per_node": self.gpus,
                "timeout_min": self.timeout_min, "cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb,
                "slurm_partition": self.partition}

    def describe(self) -> str:
        cpus = "cluster default" if self.cpus_per_task is None else self.cpus_per_task
        mem = "cluster default" if self.mem_gb is None else f"{self.mem_gb:g} GB"
        extra = "".join(f", --{key}={value}" for key, value in self.extra.items())
        return (f"partition {self.partition or '(default)'}, {self.nodes} node(s) x {self.gpus} GPU(s) "
                f"= {self.nodes * self.gpus} DDP process(es), {self.timeout_min} min, "
                f"CPUs per task: {cpus}, memory per node: {mem}{extra}")


def parse_extra(pairs: list[str]) -> dict:
    """["account=vision", "qos=high"] -> {"account": "vision", "qos": "high"}"""
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not (sep and key.strip() and value.strip()):
            raise ConfigError(f"--slurm-option takes KEY=VALUE (an sbatch option without its dashes, "
                              f"e.g. account=vision), got {pair!r}")
        extra[key.strip()] = value.strip()
    return extra


class RunJob(submitit.helpers.Checkpointable):
    """What one job does: finish one run of the plan, or (prerequisites_only) the runs it requires.
    `options.device` None: cuda when the job has one."""

    def __init__(self, run: Run, profile: RunProfile, outputs: Path, options: RunOptions,
                 prerequisites_only: bool = False):
        self.run, self.profile, self.options = run, profile, options
        self.outputs = Path(outputs).resolve()    # the job may start in another directory
        self.prerequisites_only = prerequisites_only

    def __setstate__(self, state: dict) -> None:
        # a job pickled before its options were one record (requeued after an upgrade)
        if "options" not in state:
            state["options"] = RunOptions(state.pop("device"), state.pop("progress"), state.pop("on_bad_image"),
                                          state.pop("data_source", "auto"), state.pop("workers", None))
        self.__dict__.update(state)

    def __call__(self) -> str:
        options = dataclasses.replace(self.options, device=join_process_group(self.options.device))
        if self.prerequisites_only:
            run_prerequisites(self.run.config, self.profile, self.outputs, options)
            return f"done: {', '.join(need.config.name for need in self.run.config.requires.values())}"
        run_dir = self.run.config.folder(self.outputs)
        if held_elsewhere(run_dir):
            message = f"{run_dir.name} is running in another process (submitted twice?); nothing to do here"
            print(message, flush=True)
            return message
        record = execute(self.run, self.profile, self.outputs, options)
        status = record.status if record else "done"   # ranks > 0 get no record back: rank 0 alone writes it
        return f"{run_dir.name}: {status} (rank {distributed.rank()} of {distributed.world_size()})"

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # the run folder holds the progress (checkpoints, finished evaluations): the same call resumes it
        return submitit.helpers.DelayedSubmission(self)


def join_process_group(device: str | None) -> str:
    """Under a multi-task job, set what torchrun would set and join the process group; the
    device this task trains on."""
    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if torch.cuda.is_available() and torch.cuda.device_count() == 1:
            os.environ["LOCAL_RANK"] = "0"  # the cluster binds one GPU per task (--gpu-bind): it is cuda:0
        distributed.init_from_env()
    return distributed.default_device(device)


def held_elsewhere(run_dir: Path) -> bool:
    """Whether another process holds the run's lock (its job was submitted twice). Rank 0 looks
    and every rank follows: `execute` raises RunSkipped on rank 0 alone, and the other ranks
    would wait for it in the trainer's first collective."""
    return distributed.broadcast_flag(distributed.is_main() and running(run_dir))


@dataclass
class PlannedJob:
    label: str             # what the job does, for people
    run_dir: Path          # the run folder it finishes (for prerequisites: the first one)
    task: RunJob
    after: int | None      # index of the planned job it must wait for


def plan_jobs(plan: Plan, options: RunOptions) -> list[PlannedJob]:
    """One job per run of the plan not done, each run's unfinished prerequisites in one job before
    it; every job runs with `options` (the CLI's device, --data-source, --data-workers, ...)."""
    jobs: list[PlannedJob] = []
    prerequisite_job: dict[str, int] = {}      # the required runs' names -> index of their job
    trunk_job: dict[str, int] = {}             # a curve's trunk -> its last branch's job: they run in turn
    for run in plan.runs:
        if plan.state(run).done:     # (a damaged record is submitted: its job fails naming the file)
            continue
        after = None
        # a prerequisite restored from the results archive has no weights: it trains in its own job too
        unfinished = [need.config.folder(plan.outputs) for need in run.config.requires.values()
                      if not plan.requirement(need).usable]
        if unfinished:
            key = json.dumps(sorted(need.config.name for need in run.config.requires.values()))
            if key not in prerequisite_job:
                prerequisite_job[key] = len(jobs)
                jobs.append(PlannedJob(
                    f"prerequisites of {run.spec.method} {run.spec.setting} seed {run.seed}: "
                    f"{', '.join(d.name for d in unfinished)}", unfinished[0],
                    RunJob(run, plan.profile, plan.outputs, options, prerequisites_only=True), None))
            after = prerequisite_job[key]
        if is_branch(run.config):     # (its prerequisites' job, if any, came before the trunk's first)
            trunk = Trunk(run.config).name
            after = trunk_job.get(trunk, after)
            trunk_job[trunk] = len(jobs)
        run_dir = run.config.folder(plan.outputs)
        jobs.append(PlannedJob(f"{run.spec.method} {run.spec.setting} seed {run.seed} -> {run_dir.name}", run_dir,
                               RunJob(run, plan.profile, plan.outputs, options), after))
    return jobs


def print_jobs(jobs: list[PlannedJob], options: SlurmOptions, total_runs: int) -> None:
    print(f"with --slurm: {len(jobs)} job(s); each: {options.describe()}")
    for i, job in enumerate(jobs):
        after = "" if job.after is None else f"  (after job {job.after + 1})"
        print(f"  job {i + 1:3d}  {job.label}{after}")
    done = total_runs - sum(not job.task.prerequisites_only for job in jobs)
    if done:
        print(f"  {done} run(s) done: not submitted")


def cluster() -> str:
    """The submitit executor to submit to: "slurm" unless MIMBENCH_SUBMITIT_CLUSTER says otherwise."""
    name = os.environ.get(CLUSTER_ENV, "slurm")
    if name == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("--slurm needs Slurm's sbatch on PATH: run it on the cluster's login node "
                          "(--dry-run shows the jobs anywhere)")
    return name


def submit(jobs: list[PlannedJob], options: SlurmOptions, folder: Path) -> list[submitit.Job]:
    """Submit the planned jobs in order (a prerequisite's job before the jobs waiting for it)."""
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster(), slurm_max_num_timeout=MAX_TIMEOUTS)
    executor.update_parameters(**options.executor_parameters())
    submitted: list[submitit.Job] = []
    for job in jobs:
        sbatch_options = dict(options.extra)
        if job.after is not None:
            sbatch_options.update(dependency=f"afterok:{submitted[job.after].job_id}",
                                  kill_on_invalid_dep="yes")
        executor.update_parameters(name=f"mimbench-{job.run_dir.name}",
                                   slurm_additional_parameters=sbatch_options)
        submitted.append(executor.submit(job.task))
    return submitted


def wait(jobs: list[PlannedJob], submitted: list[submitit.Job]) -> list[str]:
    """Wait for every job; the labels of those that failed (or were cancelled)."""
    failed = []
    for job, handle in zip(jobs, submitted):
        try:
            print(f"  {handle.job_id}  {handle.results()[0]}", flush=True)   # rank 0's answer
        except Exception as err:  # a failed run is recorded in its folder; report and go on
            failed.append(job.label)
            last_line = (str(err).strip().splitlines() or [err.__class__.__name__])[-1]
            print(f"  {handle.job_id}  FAILED: {job.label}: {last_line}", flush=True)
    return failed
