"""`python -m bench`, run as a user runs it (a subprocess), at a micro ViT and tiny eval sizes.
No timing thresholds: a loaded machine must not fail these; they check what gets measured."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from eval.features import cpu_bf16_flags

MICRO = ["--size", "micro", "--img-size", "16", "--patch-size", "4", "--batch", "8", "--reps", "1",
         "--steps", "1", "--decoder", "32,1,2", "--eval-train", "64", "--eval-test", "16"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    done = subprocess.run([sys.executable, "-m", "bench", *MICRO, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped work" in done.stdout
    return {**json.loads(out.read_text()), "stdout": done.stdout}


def test_every_competitor_gets_a_positive_rate_flops_and_mfu(results):
    throughput = results["throughput"]
    assert {"mae", "ibot", "timm full-token ViT"} <= set(throughput)
    for name, row in throughput.items():
        assert row["img_per_s"] > 0 and row["min"] <= row["img_per_s"] <= row["max"], name
        assert row["flops_per_step"] > 0 and results["mfu"][name] > 0, name


def test_mae_and_ibot_are_compared_with_lightly_and_the_differences_are_listed(results):
    pytest.importorskip("lightly")
    assert results["mae_vs_lightly"]["ratio"] > 0
    ibot = results["ibot_vs_lightly"]
    assert ibot["ratio"] > 0
    assert ibot["not_comparable"] and all(isinstance(line, str) for line in ibot["not_comparable"])
    assert 0 < ibot["masked_fraction"]["lightly iBOT"] < 1 and 0 < ibot["masked_fraction"]["ibot"] < 1
    # lightly's iBOT projects only the masked teacher patches, so ours counts more FLOPs
    assert results["skipped_work"]["ibot"]["extra_gflop_per_img_ours"] > 0
    assert results["skipped_work"]["mae"]["ours_skips"] == []


def test_knn_and_feature_extraction_are_timed_with_their_targets(results):
    knn, features = results["knn_seconds"], results["feature_extraction_seconds"]
    assert knn["seconds"] > 0 and knn["target_s"] == 5
    assert features["seconds"] > 0 and features["target_s"] == 40 and features["images"] == 80
    assert knn["meets_target"] is None      # only judged at 50,000 x 10,000


def test_extraction_mfu_is_printed_for_fp32_and_for_bf16_where_the_cpu_has_bf16_matmuls(results):
    extraction = results["feature_extraction"]
    assert extraction["mfu_goal"] == 0.8
    assert 0.15 < extraction["gflop_per_img"] < 0.18        # the cpu profile's nano ViT, attention counted
    precisions = ["fp32", "bf16"] if "bf16" in extraction else ["fp32"]
    if not torch.cuda.is_available():
        assert ("bf16" in extraction) == bool(cpu_bf16_flags())
        assert "bf16" in extraction or "avx512_bf16" in extraction["bf16_skipped"]
    for precision in precisions:
        row = extraction[precision]
        assert row["seconds"] > 0 and row["img_per_s"] > 0 and row["matmul_peak_flops"] > 0 and row["mfu"] > 0
        assert f"features, 80 images, ViT-nano 32px/p4, {precision}" in results["stdout"]
    assert results["feature_extraction_seconds"]["seconds"] == extraction["fp32"]["seconds"]
    assert "extraction MFU" in results["stdout"] and "per encoder (k-NN evaluation, fp32)" in results["stdout"]


def test_the_crop_and_each_photometric_view_are_timed_at_the_cpu_profiles_batch(results):
    assert set(results["augment_ms"]) == {"crop", "beit_jitter", "dino_global1", "dino_global2", "dino_local"}
    timing = results["augment_timing"]
    assert timing["shape"] == [256, 3, 32, 32] and timing["threads"] == 1     # whatever --batch and --threads
    for name, ms in results["augment_ms"].items():
        assert 0 < timing["min_ms"][name] <= ms <= timing["max_ms"][name], name


def test_eval_only_writes_the_timings_and_no_step_table(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "bench", "--eval", "--eval-train", "32", "--eval-test", "8",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["knn_seconds"]["seconds"] > 0 and "throughput" not in results and "augment_ms" not in results


def test_compile_adds_a_compiled_row_with_the_eager_flops(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "bench", *MICRO, "--methods", "mae", "--compile", "--no-eval",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    eager, compiled = results["throughput"]["mae"], results["throughput"]["mae (compiled)"]
    assert compiled["img_per_s"] > 0
    assert compiled["flops_per_step"] == eager["flops_per_step"]     # the same computation, counted eagerly
    assert results["mae_compiled_vs_eager"]["ratio"] > 0
