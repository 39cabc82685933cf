"""The one training loop holds its promises for evaluations too: a fine-tuning or a segmentation
killed with kill -9, then stopped with SIGTERM, then run again ends with the weights, the
metrics.jsonl and the metric of an uninterrupted run (bit-identical on CPU)."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

DRIVER = [sys.executable, str(ROOT / "tests" / "train_loop_driver.py")]
STEPS = {"finetune": 10, "segmentation": 8}       # the driver's; checkpoints every 3 steps


def start(evaluation, work_dir):
    return subprocess.Popen([*DRIVER, evaluation, str(work_dir), str(work_dir / "result.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def run_until(evaluation, work_dir, line_pattern, sig):
    """Start the driver, send `sig` when it prints a line matching `line_pattern`."""
    proc = start(evaluation, work_dir)
    for line in proc.stdout:
        if re.fullmatch(line_pattern, line.strip()):
            proc.send_signal(sig)
            break
    rest, err = proc.communicate(timeout=120)
    return proc.returncode, rest, err


def run_to_end(evaluation, work_dir):
    proc = start(evaluation, work_dir)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads((work_dir / "result.json").read_text())


def final_weights(work_dir, steps):
    newest = sorted((work_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert newest.name == f"ckpt-{steps:08d}.pt"
    return torch.load(newest, weights_only=True)["model"]


@pytest.mark.parametrize("evaluation", ["finetune", "segmentation"])
def test_kill_9_then_sigterm_then_resume_gives_the_weights_and_metric_of_an_uninterrupted_run(tmp_path, evaluation):
    if evaluation == "segmentation":
        pytest.importorskip("mmseg", reason="mmsegmentation is installed by scripts/setup.sh")
    reference = run_to_end(evaluation, tmp_path / "uninterrupted")

    stopped = tmp_path / "stopped"
    code, _, _ = run_until(evaluation, stopped, "step 4", signal.SIGKILL)   # 5 steps done, checkpoint at 3
    assert code == -signal.SIGKILL
    assert not (stopped / "result.json").exists()
    code, rest, _ = run_until(evaluation, stopped, "step 5", signal.SIGTERM)   # resumed at 3
    assert code == 143
    assert re.search(r"preempted: stopped by SIGTERM at step \d+; checkpoint saved - run the same command "
                     r"again to resume", rest)
    resumed = run_to_end(evaluation, stopped)

    steps = STEPS[evaluation]
    expected, got = final_weights(tmp_path / "uninterrupted", steps), final_weights(stopped, steps)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert resumed == reference
    assert (stopped / "metrics.jsonl").read_text() == (tmp_path / "uninterrupted" / "metrics.jsonl").read_text()
