"""What survives what: kill -9 at any step (also mid-checkpoint), SIGTERM, a failing run in a
suite, two suite processes at once, bad records; safe loading and determinism."""
import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from conftest import ROOT
from test_suite_cli import run_cli

DRIVER = [sys.executable, str(ROOT / "tests" / "pretrain_driver.py")]
TOTAL_STEPS = 30      # 3 epochs x 10 steps of the driver's config


def start(run_dir, *extra):
    return subprocess.Popen([*DRIVER, str(run_dir), *extra], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def run_until(run_dir, line_pattern, *extra, sig=signal.SIGKILL):
    """Start the driver, send `sig` when it prints a line matching `line_pattern`."""
    proc = start(run_dir, *extra)
    for line in proc.stdout:
        if re.fullmatch(line_pattern, line.strip()):
            proc.send_signal(sig)
            break
    rest = proc.stdout.read()
    proc.wait(timeout=120)
    return proc.returncode, rest


def final_state(run_dir):
    newest = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert newest.name == f"ckpt-{TOTAL_STEPS:08d}.pt"
    return torch.load(newest, weights_only=True)["model"]


def test_kill_9_at_several_steps_and_mid_checkpoint_then_resume_gives_identical_weights(tmp_path):
    reference = tmp_path / "uninterrupted"
    assert subprocess.run([*DRIVER, str(reference)], capture_output=True, cwd=ROOT).returncode == 0

    resumed = tmp_path / "killed"
    kill_points = [("step 2", ()), ("step 9", ()),                       # between checkpoints
                   ("saving 16", ("--slow-checkpoint-at", "16")),        # temp file written, not renamed
                   ("step 23", ())]
    for pattern, extra in kill_points:
        code, _ = run_until(resumed, pattern, *extra)
        assert code == -signal.SIGKILL
        if extra:
            assert list((resumed / "checkpoints").glob(".ckpt-00000016.pt.tmp*")), "the kill left a partial write"
    assert subprocess.run([*DRIVER, str(resumed)], capture_output=True, cwd=ROOT).returncode == 0
    assert not list((resumed / "checkpoints").glob(".ckpt-*.tmp*")), "a killed write's temp file stayed"

    expected, got = final_state(reference), final_state(resumed)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert (reference / "metrics.jsonl").read_text() == (resumed / "metrics.jsonl").read_text()


def test_kill_9_then_resume_is_bit_identical_with_the_paper_recipes_augmentation_and_schedules(tmp_path):
    """iBOT at its paper recipe: DINO's colour augmentation per image (its own seed stream),
    local crops, the weight-decay cosine, the last-layer freeze and the scaled momentum."""
    paper = ("--method", "ibot", "--paper-recipe")
    reference = tmp_path / "uninterrupted"
    done = subprocess.run([*DRIVER, str(reference), *paper], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = tmp_path / "killed"
    for pattern in ("step 5", "step 17"):
        code, _ = run_until(resumed, pattern, *paper)
        assert code == -signal.SIGKILL
    assert subprocess.run([*DRIVER, str(resumed), *paper], capture_output=True, cwd=ROOT).returncode == 0
    expected, got = final_state(reference), final_state(resumed)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert (reference / "metrics.jsonl").read_text() == (resumed / "metrics.jsonl").read_text()


def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    code, rest = run_until(tmp_path, "step 5", sig=signal.SIGTERM)
    assert code == 143
    assert "checkpoint saved - run the same command again to resume" in rest
    steps = [int(p.stem.split("-")[1]) for p in (tmp_path / "checkpoints").glob("ckpt-*.pt")]
    assert max(steps) >= 6      # the step in flight finished and was saved


def test_sigterm_to_one_of_two_gloo_ranks_stops_both_at_the_end_of_that_step(tmp_path):
    """The ranks agree on a stop every step (on the host: no device sync), not only at flush
    points: a SIGTERM to one rank is a checkpoint of the step in flight and exit 143 on both."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29538",
                str(ROOT / "tests" / "pretrain_driver.py"), str(tmp_path / "ddp"), "--print-pid",
                "--flush-every", "25"]
    proc = subprocess.Popen(torchrun, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    pids, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        for rank, pid in re.findall(r"pid (\d) (\d+)", line):     # (tolerates another rank's text on the line)
            pids[int(rank)] = int(pid)
        if re.search(r"\bstep 5\s*$", line) and 1 in pids:
            os.kill(pids[1], signal.SIGTERM)
            break
    lines.append(proc.stdout.read())
    proc.wait(timeout=120)
    out = "".join(lines)
    assert out.count("preempted: stopped by SIGTERM at step") == 2, out[-3000:]
    stopped = {int(m) for m in re.findall(r"preempted: stopped by SIGTERM at step (\d+)", out)}
    stop = stopped.pop()
    assert len(stopped) == 0 and 6 <= stop < 10          # within a step or two, not at the flush point (25)
    steps = [int(p.stem.split("-")[1]) for p in (tmp_path / "ddp" / "checkpoints").glob("ckpt-*.pt")]
    assert steps == [stop]


def test_a_failing_run_is_recorded_and_the_rest_of_the_suite_still_runs(tmp_path):
    # plant a checkpoint from another config in one run's folder: that run must fail alone
    plan = run_cli("ablation_masking", "--profile", "smoke", "--only", "pixel", "--dry-run", outputs=tmp_path)
    victim = re.search(r"(pixel-[0-9a-f]{12})", plan.stdout).group(1)
    (tmp_path / "runs" / victim / "checkpoints").mkdir(parents=True)
    torch.save({"config_hash": "someone-else", "step": 1}, tmp_path / "runs" / victim / "checkpoints" / "ckpt-00000001.pt")

    out = run_cli("ablation_masking", "--profile", "smoke", "--only", "pixel,none", outputs=tmp_path)
    assert out.returncode == 1
    assert f"1 run(s) FAILED: {victim}" in out.stderr
    failed = json.loads((tmp_path / "runs" / victim / "result.json").read_text())
    assert failed["status"] == "failed" and "another config" in failed["error"]
    assert "Traceback" in failed["traceback"]
    others = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/result.json")]
    # the other pixel cell, none and the init of pixel's paper architecture (layer scale 0.1)
    assert sorted(r["status"] for r in others) == ["done", "done", "done", "failed"]
    table = (tmp_path / "suites" / "ablation_masking" / "smoke" / "table.csv").read_text()
    assert re.search(r"pixel,(random|block) 0\.6,paper,0,1,0", table)       # (recipe column: paper)


def test_a_run_held_by_another_process_is_skipped_not_run_twice(tmp_path):
    plan = run_cli("ablation_masking", "--profile", "smoke", "--only", "none", "--dry-run", outputs=tmp_path)
    busy = re.search(r"(none-[0-9a-f]{12})", plan.stdout).group(1)
    (tmp_path / "runs" / busy).mkdir(parents=True)
    with FileLock(str(tmp_path / "runs" / busy / ".lock")):
        out = run_cli("ablation_masking", "--profile", "smoke", "--only", "none", outputs=tmp_path)
    assert out.returncode == 0
    assert f"{busy} is running in another process; skipped here" in out.stdout
    assert not (tmp_path / "runs" / busy / "result.json").exists()


def test_a_run_whose_prerequisite_is_busy_elsewhere_is_skipped_not_recorded_as_failed(tmp_path):
    """BEiT's tokenizer held by another process: the BEiT run is skipped, its folder has no
    failure record, and a later call runs it."""
    from runs.identity import RunSpec, data_descriptor, resolve
    from suites.profiles import get_profile
    smoke = get_profile("smoke")
    tokenizer = resolve(RunSpec("beit"), smoke, 0, data_descriptor(smoke, None)).requires["tokenizer"].config.name
    (tmp_path / "runs" / tokenizer).mkdir(parents=True)
    with FileLock(str(tmp_path / "runs" / tokenizer / ".lock")):
        out = run_cli("ablation_targets", "--profile", "smoke", "--only", "beit", outputs=tmp_path)
    assert f"{tokenizer} is running in another process; skipped here" in out.stdout
    assert not [p for p in (tmp_path / "runs").glob("beit-*/result.json")
                if json.loads(p.read_text())["status"] == "failed"]


def test_two_suite_processes_on_one_outputs_folder_never_run_a_run_twice(tmp_path):
    """Two real `suites.run` processes on one grid: the second starts while the first is
    training; they meet at a run one of them holds, the other skips it; every run ends done
    exactly once with an intact record."""
    mae_ratios = ",".join(f"mae:random {ratio}" for ratio in (0.25, 0.5, 0.75, 0.9))
    args = [sys.executable, "-m", "suites.run", "ablation_masking", "--profile", "smoke", "--only", mae_ratios,
            "--seeds", "3", "--outputs", str(tmp_path), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "runs").glob("*/metrics.jsonl")):      # the first is training
        assert first.poll() is None, "the first process ended before training"
        if time.monotonic() > deadline:
            first.kill()
            pytest.fail("the first process wrote no metrics.jsonl within 300 s")
        time.sleep(0.1)
    second = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    first_out = first.communicate(timeout=600)[0]
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    skips = re.findall(r"(mae-[0-9a-f]{12}) is running in another process; skipped here",
                       first_out + second.stdout)
    assert skips, "the two processes never met at a run"

    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 12
    for run_dir in run_dirs:
        record = json.loads((run_dir / "result.json").read_text())
        assert record["status"] == "done", record.get("error")
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(record["train"]["steps"])), f"{run_dir.name} trained twice or partly"


def test_a_record_from_a_newer_schema_stops_with_exit_2_and_is_left_untouched(tmp_path):
    plan = run_cli("ablation_masking", "--profile", "smoke", "--only", "none", "--dry-run", outputs=tmp_path)
    run = tmp_path / "runs" / re.search(r"(none-[0-9a-f]{12})", plan.stdout).group(1)
    run.mkdir(parents=True)
    record = json.dumps({"schema": 99, "status": "done", "metrics": {}})
    (run / "result.json").write_text(record)
    out = run_cli("ablation_masking", "--profile", "smoke", "--only", "none", outputs=tmp_path)
    assert out.returncode == 2 and "newer mimbench (schema 99" in out.stderr
    assert (run / "result.json").read_text() == record


def test_same_config_and_seed_give_the_same_results_across_invocations(tmp_path):
    metrics = []
    for name in ("a", "b"):
        # random, blockwise (topped up to one count), and grid masks
        cells = "mae:random 0.75,mae:random 0.9,mae:block 0.75,mae:grid 0.75"
        assert run_cli("ablation_masking", "--profile", "smoke", "--only", cells, outputs=tmp_path / name).returncode == 0
        records = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / name / "runs").glob("*/result.json")}
        metrics.append({run: {k: v for k, v in r["metrics"].items() if k.startswith("knn")}
                        for run, r in records.items()})
        for r in records.values():
            assert r["provenance"]["torch"] == torch.__version__ and "git_commit" in r["provenance"]
    assert metrics[0] == metrics[1] and len(metrics[0]) == 4


def test_every_torch_load_in_the_project_is_weights_only():
    calls = []
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and getattr(node.func.value, "id", None) == "torch"):
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                           for k in node.keywords)
                calls.append((path.name, node.lineno, safe))
    assert any(name == "checkpoint.py" for name, _, _ in calls), "expected at least the checkpoint loader"
    unsafe = [c for c in calls if not c[2]]
    assert not unsafe, unsafe


def torchrun_driver(run_dir, port, *extra):
    """The driver as two gloo processes on `run_dir`; returns each rank's final weights."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(port), str(ROOT / "tests" / "pretrain_driver.py")]
    ddp = subprocess.run([*torchrun, str(run_dir), *extra, "--dump-state", str(run_dir)],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return [torch.load(f"{run_dir}-rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def test_torchrun_with_two_gloo_processes_matches_a_single_process_run(tmp_path):
    single = subprocess.run([*DRIVER, str(tmp_path / "single"), "--dump-state", str(tmp_path / "single")],
                            capture_output=True, text=True, cwd=ROOT)
    assert single.returncode == 0, single.stderr
    rank0, rank1 = torchrun_driver(tmp_path / "ddp", 29533)
    reference = torch.load(tmp_path / "single-rank0.pt", weights_only=True)
    for key in reference:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
        assert torch.allclose(rank0[key], reference[key], rtol=1e-3, atol=1e-4), key
    # only rank 0 wrote the run folder; its FLOPs are those of the global batch
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == TOTAL_STEPS
    stats = [json.loads((tmp_path / run / "train_stats.json").read_text()) for run in ("single", "ddp")]
    assert stats[1]["flops_per_step"] == pytest.approx(stats[0]["flops_per_step"], rel=1e-6)


def test_torchrun_ibot_holds_the_same_centres_on_every_rank_as_a_single_process(tmp_path):
    """iBOT's centres are `synced_buffers`: the trainer averages them over ranks after each step."""
    single = subprocess.run([*DRIVER, str(tmp_path / "single"), "--method", "ibot", "--dump-state",
                             str(tmp_path / "single")], capture_output=True, text=True, cwd=ROOT)
    assert single.returncode == 0, single.stderr
    rank0, rank1 = torchrun_driver(tmp_path / "ddp", 29535, "--method", "ibot")
    reference = torch.load(tmp_path / "single-rank0.pt", weights_only=True)
    for key in ("center_cls", "center_patch"):
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
        assert rank0[key].abs().sum() > 0
        assert torch.allclose(rank0[key], reference[key], rtol=1e-3, atol=1e-4), key


def test_a_nonfinite_loss_on_one_rank_is_skipped_by_every_rank_without_a_hang(tmp_path):
    rank0, rank1 = torchrun_driver(tmp_path / "ddp", 29534, "--nan-on-last-rank-at", str(TOTAL_STEPS - 1))
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0), "the ranks' weights diverged"
    steps = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(TOTAL_STEPS - 1))
    final_state(tmp_path / "ddp")          # the skipped last step still ends with the final checkpoint
    stats = json.loads((tmp_path / "ddp" / "train_stats.json").read_text())
    assert stats["skipped_nonfinite_steps"] == 1


def test_a_nonfinite_loss_on_one_rank_stops_every_rank_at_the_next_flush_point_without_a_hang(tmp_path):
    """max_bad_steps 0: no per-step check; the ranks agree at the next flush point (log_every 2)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29536",
                str(ROOT / "tests" / "pretrain_driver.py"), str(tmp_path / "ddp"), "--nan-on-last-rank-at", "2",
                "--stop-on-nan"]
    out = subprocess.run(torchrun, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert "NonFiniteLoss: loss is nan at step 2 (fp32); last good checkpoint: none yet" in out.stderr
    # rank 0 stops too, at the same flush (its weights took the NaN gradients in DDP's all-reduce:
    # its own step 3 is non-finite; without that, "non-finite on another rank before step 4")
    assert re.search(r"\[rank0\]: engine\.trainer\.NonFiniteLoss: loss is (nan at step 3|non-finite on another "
                     r"rank before step 4) \(fp32\)", out.stderr)
    assert not list((tmp_path / "ddp" / "checkpoints").glob("ckpt-*.pt"))     # the flush at 4 saved nothing
    assert "step 3" in out.stdout and "step 4" not in out.stdout


def test_torchrun_runs_every_evaluation_on_rank_0_while_the_other_rank_waits(tmp_path):
    """Evaluations train on rank 0 alone (no DDP, no collectives): under torchrun a run with
    fine-tuning and segmentation finishes instead of hanging in rank 0's collectives."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                "-m", "suites.run", "compare_methods", "--profile", "smoke", "--only", "none",
                "--outputs", str(tmp_path), "--no-progress"]
    out = subprocess.run(torchrun, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("none-*/result.json")]
    assert set(record["evals"]) == {"knn", "linear", "finetune", "segmentation"}
