"""The prepared GPU check (`make gpu-check`): everything a first CUDA machine should measure, in
one process and one summary, in under 12 minutes on an H100/H200-class GPU.

    python scripts/gpu_check.py [--out outputs/gpu_check] [--minutes 11]

Steps, each timed and recorded (a failing step is recorded with its error; the others still run):
  env        device, torch / CUDA / cuDNN versions, bf16 support, matmul peaks (fp32, bf16) measured here
  smoke      the smoke suite (`suites.run ablation_masking --profile smoke`) on the device
  syncs      host-device syncs inside the trainer's step, per method (torch.cuda.set_sync_debug_mode
             "warn" around each step of a short Trainer run): the target is 0; on the CPU not measurable
  steps      every method's training step at the gpu profile's ViT (bf16 autocast), img/s and MFU
             against the bf16 peak; MAE ViT-B/16 at 224 px, eager and compiled, and lightly's MAE at
             the identical config when lightly is installed
  gpu        a gpu-profile MAE pre-training and its fine-tune beside the from-scratch baseline, at the
             epochs that fit (`--pretrain-epochs`, `--finetune-epochs`), against the published anchors
             (MAE ViT-T on CIFAR-10, 2000 epochs: fine-tune 89.77 vs 74.13 from scratch)

On a machine without CUDA it says so in one line and runs the same steps at micro size on the CPU
(fp32, small batches, the smoke profile for the pre-training), so the script itself is tested in CI
(tests/test_gpu_check.py). Writes summary.json and summary.md under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import anchors  # noqa: E402
from bench.steps import Competitor, matmul_peak, measure, our_method  # noqa: E402
from methods import registry  # noqa: E402
from methods.vit import ViTConfig  # noqa: E402

ANCHORS = {"mae_vit_t_cifar10_2000ep_finetune": 89.77, "vit_t_cifar10_from_scratch": 74.13}


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu (micro sizes)")
    parser.add_argument("--pretrain-epochs", type=float, default=None, help="gpu step (default: 30 on CUDA)")
    parser.add_argument("--finetune-epochs", type=float, default=None, help="gpu step (default: 15 on CUDA)")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out (smoke, syncs, steps, gpu)")
    return parser.parse_args(argv)


class Sizes:
    """What each step runs at: the real sizes on CUDA, micro ones on the CPU."""

    def __init__(self, cuda: bool, args: argparse.Namespace):
        self.cuda = cuda
        self.dtype = torch.bfloat16 if cuda else None                  # autocast dtype (None: fp32)
        self.small = ViTConfig(size="tiny", img_size=32, patch_size=4) if cuda \
            else ViTConfig(size="micro", img_size=16, patch_size=4)
        self.small_batch = 256 if cuda else 16
        self.large = ViTConfig(size="base", img_size=224, patch_size=16) if cuda \
            else ViTConfig(size="micro", img_size=32, patch_size=8)
        self.large_batch = 128 if cuda else 8
        self.reps, self.steps_per_rep = (5, 10) if cuda else (2, 1)
        self.profile = "gpu" if cuda else "smoke"
        self.pretrain_epochs = args.pretrain_epochs if args.pretrain_epochs is not None else (30 if cuda else 1)
        self.finetune_epochs = args.finetune_epochs if args.finetune_epochs is not None else (15 if cuda else 1)


# ---- the steps ------------------------------------------------------------------------------
def pretraining_methods() -> list[str]:
    """Every registered method with a training step of its own (BEiT's dVAE is BEiT's tokenizer)."""
    return sorted(n for n, (cls, _) in registry.items() if cls.trains and n != "dvae")


def env_step(device: torch.device, sizes: Sizes) -> dict:
    info = {"device": torch.cuda.get_device_name(device) if sizes.cuda else (platform.processor() or "cpu"),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if sizes.cuda else None,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    n = 8192 if sizes.cuda else 512
    info["fp32_peak_tflops"] = matmul_peak(torch.float32, device, n=n) / 1e12
    if not sizes.cuda or torch.cuda.is_bf16_supported():
        info["bf16_peak_tflops"] = matmul_peak(torch.bfloat16, device, n=n) / 1e12
    return info


def smoke_step(device: torch.device, sizes: Sizes) -> dict:
    with tempfile.TemporaryDirectory() as outputs:
        command = [sys.executable, "-m", "suites.run", "ablation_masking", "--profile", "smoke",
                   "--recipe", "shared", "--device", device.type, "--outputs", outputs, "--no-progress"]
        if not sizes.cuda:
            command += ["--only", "mae,none"]      # the CPU fallback checks the path, not the grid
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"smoke suite exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        records = [json.loads(p.read_text()) for p in Path(outputs).glob("runs/*/result.json")]
    return {"runs": len(records), "done": sum(r.get("status") == "done" for r in records)}


def syncs_step(device: torch.device, sizes: Sizes) -> dict:
    """Syncs per step inside the trainer's step (not at its flush points), per method: CUDA's
    sync debug mode warns on each; the CPU has none to count (the code path still runs)."""
    import warnings

    from engine.data import synthetic_splits
    from engine.trainer import Trainer, TrainConfig
    from engine.views import pretraining
    from methods import build_method

    images = synthetic_splits(img_size=sizes.small.img_size, train_per_class=sizes.small_batch // 10 * 4).train.images
    result = {}
    for name in pretraining_methods():
        torch.manual_seed(0)
        method = build_method(name, encoder=dict(size=sizes.small.size, img_size=sizes.small.img_size,
                                                 patch_size=sizes.small.patch_size))
        cfg = TrainConfig(epochs=1, batch_size=sizes.small_batch // 2, blr=1e-4, checkpoint_every=1000,
                          log_every=1000, precision="bf16" if sizes.cuda else "fp32")
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(method, *pretraining(method, images, cfg, 0, device), Path(run_dir), seed=0,
                              config_hash="gpu-check",
                              device=str(device), progress=False)
            step, seen = trainer._step, []

            def watched(*args, _step=step):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if sizes.cuda:
                        torch.cuda.set_sync_debug_mode("warn")
                    try:
                        return _step(*args)
                    finally:
                        if sizes.cuda:
                            torch.cuda.set_sync_debug_mode("default")
                        seen.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))
            trainer._step = watched
            trainer.fit()
        result[name] = {"steps": trainer.total_steps,
                        "syncs_per_step": len(seen) / trainer.total_steps if sizes.cuda else None,
                        "first": seen[0][:200] if seen else None}
    return result


def autocast(competitor: Competitor, device: torch.device, dtype) -> Competitor:
    """`competitor` with its forward under autocast to `dtype` (None: unchanged)."""
    if dtype is None:
        return competitor
    loss_fn = competitor.loss_fn

    def under_autocast():
        with torch.autocast(device.type, dtype=dtype):
            return loss_fn()
    competitor.loss_fn = under_autocast
    return competitor


def timed(competitors: list[Competitor], batch: int, sizes: Sizes, device: torch.device, peak: float) -> list[dict]:
    for c in competitors:
        c.count_flops()
    measure(competitors, sizes.reps, sizes.steps_per_rep, batch, device)
    return [{"name": c.name, "img_per_s": c.median_rate, "gflop_per_img": c.flops / batch / 1e9,
             "mfu": c.flops / batch * c.median_rate / peak} for c in competitors]


def steps_step(device: torch.device, sizes: Sizes, peak: float) -> dict:
    decoder = (128, 2, 4)
    torch.manual_seed(0)
    images = torch.randn(sizes.small_batch, 3, sizes.small.img_size, sizes.small.img_size, device=device)
    small = [autocast(our_method(n, sizes.small, sizes.small_batch, 0.75, decoder, images, device), device, sizes.dtype)
             for n in pretraining_methods()]
    result = {"small": timed(small, sizes.small_batch, sizes, device, peak)}
    del small

    images = torch.randn(sizes.large_batch, 3, sizes.large.img_size, sizes.large.img_size, device=device)
    large = [autocast(our_method("mae", sizes.large, sizes.large_batch, 0.75, (512, 8, 16) if sizes.cuda else decoder,
                                 images, device, compile=compile), device, sizes.dtype)
             for compile in ((False, True) if sizes.cuda else (False,))]
    if anchors.lightly_available():
        large.append(autocast(anchors.lightly_mae(sizes.large, images, 0.75, (512, 8, 16) if sizes.cuda else decoder,
                                                  device), device, sizes.dtype))
    else:
        result["lightly"] = "not installed (pip install lightly): no ratio to lightly's MAE"
    result["mae_large"] = timed(large, sizes.large_batch, sizes, device, peak)
    return result


def gpu_step(device: torch.device, sizes: Sizes) -> dict:
    from runs.execute import RunOptions, execute
    from runs.identity import Run, RunSpec, data_descriptor, resolve
    from suites.profiles import get_profile, override

    profile = override(get_profile(sizes.profile), [f"evaluations.finetune.epochs={sizes.finetune_epochs}"])
    outputs = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    result = {"profile": sizes.profile, "pretrain_epochs": sizes.pretrain_epochs,
              "finetune_epochs": sizes.finetune_epochs, "anchors": ANCHORS}
    for method, train in (("mae", {"epochs": sizes.pretrain_epochs}), ("none", {})):
        spec = RunSpec(method, evals=("knn", "finetune"), train=train)
        run = Run(spec, 0, resolve(spec, profile, 0, data_descriptor(profile, None), recipe="paper"))
        t0 = time.perf_counter()
        record = execute(run, profile, outputs, RunOptions(device=device.type, progress=False))
        train_stats = record.train or {}
        result[method] = {"seconds": time.perf_counter() - t0, **record.metrics,
                          "img_per_s": train_stats.get("images_per_second"),
                          "peak_memory_mb": train_stats.get("peak_memory_mb")}
    result["finetune_gain"] = result["mae"]["finetune_top1"] - result["none"]["finetune_top1"]
    return result


# ---- the summary ----------------------------------------------------------------------------
def targets(summary: dict) -> dict:
    """The issue's targets, where this run measured them (None: not measured here)."""
    steps = summary["steps"]
    large = {row["name"]: row for row in steps.get("steps", {}).get("result", {}).get("mae_large", [])}
    gpu = steps.get("gpu", {}).get("result", {})
    best = max((row for name, row in large.items() if name.startswith("mae")), key=lambda r: r["img_per_s"],
               default=None)
    lightly = next((row for name, row in large.items() if "lightly" in name), None)
    syncs = steps.get("syncs", {}).get("result", {})
    counted = [row["syncs_per_step"] for row in syncs.values() if row.get("syncs_per_step") is not None]
    return {"syncs_per_step (max over methods) == 0": max(counted) if counted else None,
            "mae_large_mfu >= 0.45": best and best["mfu"],
            "mae_large_vs_lightly >= 1.5": best and lightly and best["img_per_s"] / lightly["img_per_s"],
            "finetune_gain_vs_scratch >= 10": gpu.get("finetune_gain")}


def markdown(summary: dict) -> str:
    env = summary["env"]
    lines = [f"# gpu-check on {env.get('device', '?')}", "",
             f"{summary['note']}; {summary['seconds']:.0f} s in all. torch {env['torch']}, CUDA {env['cuda']}, "
             f"cuDNN {env['cudnn']}; matmul peak fp32 {env['fp32_peak_tflops']:.2f} TFLOP/s, "
             f"bf16 {env.get('bf16_peak_tflops', float('nan')):.2f} TFLOP/s (measured here).", ""]
    for name, step in summary["steps"].items():
        if "error" in step:
            lines += [f"## {name}: FAILED ({step['seconds']:.1f} s)", "", f"    {step['error']}", ""]
            continue
        lines += [f"## {name} ({step['seconds']:.1f} s)", ""]
        for key, value in step["result"].items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                lines += [f"{key}:", "", "| " + " | ".join(value[0]) + " |", "|" + " --- |" * len(value[0])]
                lines += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |"
                          for row in value]
                lines.append("")
            else:
                lines.append(f"- {key}: {json.dumps(value, default=str)}")
        lines.append("")
    lines += ["## targets", ""] + [f"- {k}: {'not measured' if v is None else f'{v:.3g}'}"
                                   for k, v in summary["targets"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    sizes = Sizes(cuda, args)
    note = ("CUDA device: the real sizes" if cuda else
            "no CUDA device: running the same steps at micro size on the CPU (fp32)")
    print(f"[gpu-check] {note}", flush=True)
    # the steps after env, in order (`peak` is read when `steps` runs, after env has measured it)
    steps = {"smoke": lambda: smoke_step(device, sizes), "syncs": lambda: syncs_step(device, sizes),
             "steps": lambda: steps_step(device, sizes, peak),
             "gpu": lambda: gpu_step(device, sizes)}
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(steps):
        print(f"error: --skip {','.join(sorted(skip - set(steps)))}: no such step; steps: {', '.join(steps)}",
              file=sys.stderr)
        return 2
    summary = {"note": note, "steps": {}}
    start = time.perf_counter()
    env = env_step(device, sizes)
    summary["env"] = env
    peak = env.get("bf16_peak_tflops" if sizes.dtype is not None else "fp32_peak_tflops") * 1e12
    for name, step in steps.items():
        if name in skip:
            continue
        t0 = time.perf_counter()
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            summary["steps"][name] = {"result": step()}
        except Exception as err:       # recorded; the next step still runs
            summary["steps"][name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        summary["steps"][name]["seconds"] = time.perf_counter() - t0
        print(f"[gpu-check] {name}: {'FAILED' if 'error' in summary['steps'][name] else 'ok'} "
              f"in {summary['steps'][name]['seconds']:.1f} s", flush=True)
    summary["seconds"] = time.perf_counter() - start
    summary["targets"] = targets(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (args.out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    failed = [name for name, step in summary["steps"].items() if "error" in step]
    if failed:
        print(f"[gpu-check] failed steps: {', '.join(failed)} (summary.json has their tracebacks)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
