"""`make gpu-check` on a machine without CUDA: one line says so, the same steps run at micro
size on the CPU, every step succeeds and the summary holds what a GPU run would fill in."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
from methods import registry  # noqa: E402


@pytest.mark.skipif(gpu_check.torch.cuda.is_available(), reason="tests the CPU fallback")
def test_the_gpu_check_runs_every_step_at_micro_size_on_the_cpu_and_writes_its_summary(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "no CUDA device: running the same steps at micro size on the CPU" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["steps"]) == {"smoke", "syncs", "steps", "gpu"}
    assert not [name for name, step in summary["steps"].items() if "error" in step]
    assert summary["env"]["fp32_peak_tflops"] > 0 and summary["env"]["torch"]
    smoke = summary["steps"]["smoke"]["result"]
    assert smoke["runs"] == smoke["done"] > 0
    rows = summary["steps"]["steps"]["result"]["small"]
    trained = {name for name, (cls, _) in registry.items() if cls.trains and name != "dvae"}
    syncs = summary["steps"]["syncs"]["result"]
    assert set(syncs) == trained                         # each method's step ran under the trainer
    assert all(row["steps"] > 0 and row["syncs_per_step"] is None for row in syncs.values())   # CPU: not counted
    assert {row["name"] for row in rows} == trained
    # what each step measured, never how fast: the MFU divides by a matmul peak measured seconds
    # earlier, so on a loaded machine it can exceed 1 (`make gpu-check` prints both)
    assert all(row["img_per_s"] > 0 and row["gflop_per_img"] > 0 and row["mfu"] > 0 for row in rows)
    assert "| name | img_per_s | gflop_per_img | mfu |" in printed
    assert all(f"| {name} | " in printed for name in trained)
    gpu = summary["steps"]["gpu"]["result"]
    assert 0 <= gpu["mae"]["finetune_top1"] <= 100 and 0 <= gpu["none"]["finetune_top1"] <= 100
    assert gpu["finetune_gain"] == pytest.approx(gpu["mae"]["finetune_top1"] - gpu["none"]["finetune_top1"])
    assert set(summary["targets"]) == {"syncs_per_step (max over methods) == 0", "mae_large_mfu >= 0.45",
                                       "mae_large_vs_lightly >= 1.5", "finetune_gain_vs_scratch >= 10"}
    assert "## targets" in (tmp_path / "summary.md").read_text()


def test_a_failing_step_is_recorded_and_the_check_exits_non_zero(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("no such kernel")
    monkeypatch.setattr(gpu_check, "gpu_step", broken)
    assert gpu_check.main(["--out", str(tmp_path), "--skip", "smoke,syncs,steps", "--device", "cpu"]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"]["gpu"]["error"] == "RuntimeError: no such kernel"
    assert "gpu: FAILED" in (tmp_path / "summary.md").read_text()


def test_an_unknown_step_to_skip_is_refused_before_anything_runs(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--skip", "smoke,sync", "--device", "cpu"]) == 2
    assert "--skip sync: no such step; steps: smoke, syncs, steps, gpu" in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()
