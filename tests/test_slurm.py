"""`python -m suites.run ... --slurm`: one submitit job per run not done, on the smoke profile.

No cluster here: submitit's debug executor (MIMBENCH_SUBMITIT_CLUSTER=debug) runs the jobs
in this process, and a stand-in `sbatch` on PATH records the Slurm scripts a cluster would get.
"""
import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import pytest
from submitit.core.utils import DelayedSubmission

from bench.data import make_jpeg_folder
from runs import slurm
from suites.profiles import get_profile
from runs.execute import RunOptions
from runs.plan import plan_of
from suites.plan import select_runs
from suites.run import cli

SMOKE = ["--profile", "smoke", "--seeds", "1", "--no-progress"]


def result_stamps(outputs: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (outputs / "runs").glob("*/result.json")}


def test_slurm_jobs_finish_every_run_then_nothing_is_submitted_and_the_plain_command_writes_the_table(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIMBENCH_SUBMITIT_CLUSTER", "debug")
    suite = ["ablation_masking", *SMOKE, "--only", "none,mae", "--outputs", str(tmp_path)]
    assert cli([*suite, "--slurm", "--slurm-wait"]) == 0
    out = capsys.readouterr().out
    assert "submitted 8 job(s)" in out and "squeue -j" in out
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/result.json")]
    assert len(records) == 8 and all(r["status"] == "done" for r in records)  # 4 MAE ratios + 3 strategies + none
    logs = tmp_path / "slurm" / "ablation_masking" / "smoke"
    assert len(list(logs.glob("*_log.out"))) == 8
    assert "random 0.75" in (tmp_path / "suites" / "ablation_masking" / "smoke" / "table.md").read_text()

    stamps, log_files = result_stamps(tmp_path), sorted(logs.iterdir())
    assert cli([*suite, "--slurm"]) == 0
    assert "nothing to submit: all 8 runs are done" in capsys.readouterr().out
    assert sorted(logs.iterdir()) == log_files

    (tmp_path / "suites" / "ablation_masking" / "smoke" / "table.md").unlink()
    assert cli(suite) == 0                                  # what the printed hint tells the user to run
    assert (tmp_path / "suites" / "ablation_masking" / "smoke" / "table.md").exists()
    assert result_stamps(tmp_path) == stamps, "a run finished by a job ran again"


def test_a_two_gpu_job_runs_its_run_as_one_two_process_group(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIMBENCH_SUBMITIT_CLUSTER", "local")   # real task processes, as srun starts them
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli(["ablation_targets", *SMOKE, "--only", "none", "--outputs", str(tmp_path),
                "--slurm", "--slurm-gpus", "2", "--slurm-wait"]) == 0
    assert "done (rank 0 of 2)" in capsys.readouterr().out
    [rank1_result] = (tmp_path / "slurm" / "ablation_targets" / "smoke").glob("*_1_result.pkl")
    assert pickle.loads(rank1_result.read_bytes())[1].endswith("done (rank 1 of 2)")
    [record] = (tmp_path / "runs").glob("*/result.json")
    assert json.loads(record.read_text())["status"] == "done"


def test_a_job_signalled_before_its_time_limit_requeues_itself_and_resumes_its_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMBENCH_SUBMITIT_CLUSTER", "local")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = select_runs("ablation_targets", "smoke", 1, "mae", None)[:1]
    jobs = slurm.plan_jobs(plan_of(runs, get_profile("smoke"), tmp_path), RunOptions(device=None, progress=False))
    folder = tmp_path / "slurm"
    [handle] = slurm.submit(jobs, slurm.SlurmOptions(), folder)
    checkpoints = jobs[0].run_dir / "checkpoints"
    deadline = time.time() + 120
    while not (checkpoints.exists() and any(checkpoints.glob("ckpt-*.pt"))):
        assert time.time() < deadline and handle.state == "RUNNING", "the job never checkpointed"
        time.sleep(0.05)
    # what Slurm sends 90 s before the limit (USR2), to the task process as srun would
    task = subprocess.run(["pgrep", "-f", f"submitit.core._submit {folder}"], capture_output=True, text=True)
    os.kill(int(task.stdout.split()[0]), signal.SIGUSR2)

    assert slurm.wait(jobs, [handle]) == []
    log = next(folder.glob("*_0_log.out")).read_text()
    assert "Calling checkpoint method" in log and "Requeued job" in log
    assert json.loads((jobs[0].run_dir / "result.json").read_text())["status"] == "done"
    steps = [json.loads(line)["step"] for line in (jobs[0].run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and len(steps) == steps[-1] + 1       # resumed, no step twice


def test_jobs_read_their_data_as_data_source_and_data_workers_say(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIMBENCH_SUBMITIT_CLUSTER", "debug")
    make_jpeg_folder(tmp_path / "data" / "train", num_classes=2, per_class=64, min_px=20, max_px=40)
    make_jpeg_folder(tmp_path / "data" / "test", num_classes=2, per_class=4, min_px=20, max_px=40, seed=1)
    # a folder this small is kept in memory unless the command says otherwise
    assert cli(["ablation_targets", *SMOKE, "--only", "mae:norm. pixels, random 0.75",
                "--data", str(tmp_path / "data"), "--outputs", str(tmp_path / "out"), "--slurm", "--slurm-wait",
                "--data-source", "stream", "--data-workers", "1"]) == 0
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("mae-*/result.json")]
    assert record["status"] == "done"
    source = record["train"]["data_source"]
    assert (source["kind"], source["workers"], source["reason"]) == ("stream", 1, "--data-source stream")


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`sbatch` and `srun` stand-ins: sbatch answers with job ids 101, 102, ..."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\nn=$(( $(cat "$0.count" 2>/dev/null || echo 100) + 1 ))\n'
                                    'echo $n > "$0.count"\necho "Submitted batch job $n"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.delenv("MIMBENCH_SUBMITIT_CLUSTER", raising=False)


def test_sbatch_scripts_ask_for_the_gpus_and_beit_runs_wait_for_the_one_tokenizer_job(
        tmp_path, fake_slurm, capsys):
    outputs = tmp_path / "out"
    assert cli(["ablation_masking", *SMOKE, "--only", "beit", "--outputs", str(outputs), "--slurm",
                "--slurm-partition", "gpu", "--slurm-nodes", "2", "--slurm-gpus", "4", "--slurm-timeout", "120",
                "--slurm-mem", "64", "--slurm-option", "account=vision"]) == 0
    out = capsys.readouterr().out
    assert "submitted 3 job(s)" in out and "squeue -j 101,102,103" in out
    folder = outputs / "slurm" / "ablation_masking" / "smoke"
    scripts = {job_id: (folder / f"{job_id}_submission.sh").read_text() for job_id in (101, 102, 103)}
    for script in scripts.values():
        for line in ("--partition=gpu", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4",
                     "--time=120", "--mem=64GB", "--account=vision", "--signal=USR2@90"):
            assert f"#SBATCH {line}\n" in script
    assert "--dependency" not in scripts[101]                 # the tokenizer, trained once
    for job_id in (102, 103):                                 # both BEiT cells wait for it
        assert "#SBATCH --dependency=afterok:101\n" in scripts[job_id]
        assert "#SBATCH --kill-on-invalid-dep=yes\n" in scripts[job_id]
    assert not (outputs / "runs").exists()                    # nothing ran here

    # at its time limit a job resubmits the same call; the run folder carries the progress
    job = DelayedSubmission.load(folder / "102_submitted.pkl").function
    assert job.checkpoint().function is job and job.run.config.method == "beit"


def test_dry_run_lists_the_jobs_and_submits_nothing(tmp_path, capsys):
    assert cli(["ablation_masking", *SMOKE, "--only", "none,beit", "--outputs", str(tmp_path),
                "--slurm", "--dry-run", "--slurm-gpus", "8"]) == 0
    out = capsys.readouterr().out
    # none, the tokenizer, two BEiT cells and the init of BEiT's paper architecture (layer scale 0.1)
    assert "with --slurm: 5 job(s)" in out and "8 DDP process(es)" in out
    assert "none init (layer_scale 0.1) seed 0" in out
    assert "prerequisites of beit block 0.4 seed 0: dvae-" in out
    assert out.count("(after job 2)") == 2
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args,message", [
    (["--slurm", "--slurm-gpus", "0"], "--slurm-gpus must be >= 1, got 0"),
    (["--slurm", "--slurm-timeout", "0"], "--slurm-timeout must be >= 1, got 0"),
    (["--slurm", "--slurm-mem", "0"], "--slurm-mem must be > 0"),
    (["--slurm", "--slurm-option", "account"], "--slurm-option takes KEY=VALUE"),
    (["--slurm-gpus", "2"], "--slurm-gpus needs --slurm"),
    (["--slurm-wait"], "--slurm-wait needs --slurm"),
    (["--slurm"], "--slurm needs Slurm's sbatch on PATH"),
])
def test_bad_slurm_options_give_a_one_line_error_and_exit_code_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv("PATH", str(tmp_path))                 # no sbatch
    monkeypatch.delenv("MIMBENCH_SUBMITIT_CLUSTER", raising=False)
    assert cli(["ablation_masking", *SMOKE, "--only", "none", "--outputs", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
