"""Training-step throughput of every method at identical configs, in ONE process, then the
cost of the batched augmentation every step pays and of the evaluations every run pays.

    python -m bench [--size tiny] [--batch 128] [--reps 7] [--threads 2] [--out PATH]
    python -m bench --no-eval          # the step table and the augmentation cost only
    python -m bench --eval             # the evaluation timings only
    python -m bench --compile          # plus each method through torch.compile (extra rows)

Each competitor is a step function (forward + backward + AdamW step, then the method's
post-step hook such as iBOT's EMA teacher update) on the same input. Repetitions are
interleaved (A B C A B C ...) so machine noise hits all alike; we report the median img/s
and the spread (min-max over repetitions), ratios to the anchors, and model FLOPs
utilisation (FLOPs of the step, counted by torch.utils.flop_counter with attention unfused,
over a matmul peak measured in this process at the same dtype).

Anchors (bench/anchors.py says how they are built and where they differ):
  lightly MAE    MaskedVisionTransformerTIMM + MaskedVisionTransformerDecoderTIMM at our
                 ViT, decoder, mask ratio and batch                      -> mae_vs_lightly
  lightly iBOT   lightly's masked ViT, DINO head, DINOLoss + IBOTPatchLoss, update_momentum
                 at our IBOTConfig; what lightly lacks or does differently is listed under
                 ibot_vs_lightly["not_comparable"]                       -> ibot_vs_lightly
  timm ViT       a plain full-token step, the cost of "no masking"       -> *_vs_timm_full_token
Work one side computes and the other skips (our MAE predicts the visible patches too) is
listed apart from the ratios, under "skipped_work", with its FLOPs.

Augmentation (bench/augment_timing.py): ms per call of the crop and of each photometric view
(BEiT's jitter, DINO/iBOT's two global and one local view) on 256 x 3 x 32 x 32, on the CPU
at one thread, as a cpu-profile step makes its views                    -> augment_ms

Evaluations (bench/eval_timing.py): k-NN on 50,000 x 10,000 cached features (target 5 s)
and feature extraction of 60,000 images through the nano ViT (target 40 s), as the suite
runner does them at the cpu profile; --eval-train/--eval-test scale them down. Extraction runs
in fp32 and, where the CPU has bf16 matmuls (avx512_bf16 / AMX) or the GPU bf16, in bf16, each
with its MFU against the matmul peak at its dtype (goal 80%), per CPU-second on a CPU.

Results go to bench/results.json (git-ignored) or --out. lightly is optional:
`pip install lightly` (the `bench` extra); without it its rows are skipped with a message.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from core.files import write_json
from bench import anchors
from bench.augment_timing import augment_results, print_augment
from bench.eval_timing import TARGET_TEST, TARGET_TRAIN, eval_results
from bench.steps import Competitor, matmul_peak, measure, our_method, timm_full_token
from methods import registry
from methods.vit import ViTConfig

RESULTS = Path(__file__).parent / "results.json"
FULL_TOKEN = "timm full-token ViT"


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", help="ViT size (default tiny: 192-d x 12)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--decoder", default="128,2,4", help="MAE decoder dim,depth,heads (default 128,2,4)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed repetition")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of our methods")
    parser.add_argument("--device", default=None)
    parser.add_argument("--compile", action="store_true",
                        help="also time each method through torch.compile (extra rows; compiling takes "
                             "1-2 minutes per method on 2 CPU cores)")
    parts = parser.add_mutually_exclusive_group()
    parts.add_argument("--eval", action="store_true", help="only the evaluation timings (default: both)")
    parts.add_argument("--no-eval", action="store_true",
                       help="only the step table and the augmentation cost (default: both)")
    parser.add_argument("--eval-train", type=int, default=TARGET_TRAIN, help="k-NN memory / train images")
    parser.add_argument("--eval-test", type=int, default=TARGET_TEST, help="k-NN queries / test images")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    return parser.parse_args(argv)


def step_results(args: argparse.Namespace, device: torch.device) -> dict:
    """Build, count and time every step; print the table; return the results' step part."""
    enc = ViTConfig(size=args.size, img_size=args.img_size, patch_size=args.patch_size)
    enc.validate()
    decoder = tuple(int(x) for x in args.decoder.split(","))
    names = args.methods.split(",") if args.methods else sorted(n for n, (c, _) in registry.items() if c.trains)
    competitors = build_competitors(args, enc, decoder, names, device)

    peak = matmul_peak(torch.float32, device)
    for c in competitors:
        c.count_flops()
    print(f"device {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32; ViT-{args.size} {enc.img_size}px/p{enc.patch_size}, "
          f"batch {args.batch}, MAE mask {args.mask_ratio}, MAE decoder {decoder}; matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s")
    measure(competitors, args.reps, args.steps, args.batch, device)

    results: dict = {"matmul_peak_flops": peak, **rate_table(competitors, args.batch, peak)}
    by_name = {c.name: c for c in competitors}
    results.update(step_ratios(by_name, names, args.compile))
    ibot = ibot_vs_lightly(by_name, enc)
    if ibot is not None:
        results["ibot_vs_lightly"] = ibot
    results["skipped_work"] = skipped_work(by_name, args.batch)
    return results


def build_competitors(args: argparse.Namespace, enc: ViTConfig, decoder: tuple[int, ...], names: list[str],
                      device: torch.device) -> list[Competitor]:
    """Our methods (and, with --compile, each compiled), the full-token timm ViT and the lightly
    anchors of the methods asked for, all on one seeded input batch."""
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, enc.img_size, enc.img_size, device=device)
    competitors = [our_method(n, enc, args.batch, args.mask_ratio, decoder, images, device) for n in names]
    if args.compile:
        competitors += [our_method(n, enc, args.batch, args.mask_ratio, decoder, images, device, compile=True)
                        for n in names]
    competitors.append(timm_full_token(enc, images, device))
    if not anchors.lightly_available():
        print("lightly is not installed (pip install lightly): its rows are skipped")
    else:
        if "mae" in names:
            competitors.append(anchors.lightly_mae(enc, images, args.mask_ratio, decoder, device))
        if "ibot" in names:
            competitors.append(anchors.lightly_ibot(anchors.ibot_config(enc), images, device))
    return competitors


def rate_table(competitors: list[Competitor], batch: int, peak: float) -> dict:
    """Each timed step's median img/s, its spread, FLOPs and MFU (`throughput`, and `mfu` alone),
    printed as the step table."""
    table: dict = {"throughput": {}, "mfu": {}}
    for c in competitors:
        mfu = c.flops / (batch / c.median_rate) / peak
        table["throughput"][c.name] = {"img_per_s": c.median_rate, "min": min(c.rates), "max": max(c.rates),
                                       "flops_per_step": c.flops, "mfu": mfu,
                                       "masked_fraction": c.masked_fraction}
        table["mfu"][c.name] = mfu
    print(f"\n{'step':24s} {'img/s':>8s} {'min':>8s} {'max':>8s} {'GFLOP/img':>10s} {'MFU':>6s} {'masked':>7s}")
    for c in competitors:
        masked = "-" if c.masked_fraction is None else f"{c.masked_fraction:.0%}"
        print(f"{c.name:24s} {c.median_rate:8.1f} {min(c.rates):8.1f} {max(c.rates):8.1f} "
              f"{c.flops / batch / 1e9:10.3f} {table['mfu'][c.name]:6.1%} {masked:>7s}")
    return table


def ratio(by_name: dict[str, Competitor], a: str, b: str) -> dict | None:
    """Both median rates and a's over b's; None when either step was not timed."""
    if a in by_name and b in by_name:
        ra, rb = by_name[a].median_rate, by_name[b].median_rate
        return {a: ra, b: rb, "ratio": ra / rb}
    return None


def step_ratios(by_name: dict[str, Competitor], names: list[str], compiled: bool) -> dict:
    """The ratios of median img/s between steps on the same ViT, batch and input, printed."""
    pairs = {"mae_vs_lightly": ("mae", "lightly MAE")}
    for name in names:
        pairs[f"{name}_vs_timm_full_token"] = (name, FULL_TOKEN)
        if name != "mae":
            pairs[f"mae_vs_{name}"] = ("mae", name)
    if compiled:
        pairs["mae_compiled_vs_lightly"] = ("mae (compiled)", "lightly MAE")
        pairs.update({f"{name}_compiled_vs_eager": (f"{name} (compiled)", name) for name in names})
    ratios = {key: ratio(by_name, *pair) for key, pair in pairs.items()}
    ratios = {key: value for key, value in ratios.items() if value is not None}
    print("\nratios of median img/s, same ViT, batch and input:")
    for key, value in ratios.items():
        print(f"  {key:32s} {value['ratio']:.2f}x")
    return ratios


def ibot_vs_lightly(by_name: dict[str, Competitor], enc: ViTConfig) -> dict | None:
    """Our iBOT over lightly's at the nearest config, with what differs between them; None
    without a lightly iBOT row."""
    ibot = ratio(by_name, "ibot", "lightly iBOT")
    if ibot is None:
        return None
    ibot["not_comparable"] = anchors.ibot_differences(anchors.ibot_config(enc))
    ibot["masked_fraction"] = {n: by_name[n].masked_fraction for n in ("ibot", "lightly iBOT")}
    print(f"  {'ibot_vs_lightly (nearest config)':32s} {ibot['ratio']:.2f}x   "
          f"{len(ibot['not_comparable'])} differences: results.json ibot_vs_lightly.not_comparable")
    return ibot


def skipped_work(by_name: dict[str, Competitor], batch: int) -> dict:
    """Per anchored method: what each side computes that the other skips, and the FLOPs per
    image by which ours exceeds lightly's (counted matmul FLOPs). Not part of any ratio."""
    rows = {}
    print("\nskipped work (kept out of the ratios above):")
    for ours, theirs, work in (("mae", "lightly MAE", anchors.MAE_SKIPPED_WORK),
                               ("ibot", "lightly iBOT", anchors.IBOT_SKIPPED_WORK)):
        if ours not in by_name or theirs not in by_name:
            continue
        extra = (by_name[ours].flops - by_name[theirs].flops) / batch
        rows[ours] = {**work, "gflop_per_img": {ours: by_name[ours].flops / batch / 1e9,
                                                theirs: by_name[theirs].flops / batch / 1e9},
                      "extra_gflop_per_img_ours": extra / 1e9}
        ours_skips = "; ".join(work["ours_skips"]) or "nothing"
        print(f"  {ours}: ours skips {ours_skips} of what {theirs} computes; {theirs} skips "
              f"{'; '.join(work['lightly_skips'])}")
        print(f"  {'':{len(ours)}s}  ours - lightly: {extra / 1e9:+.4f} GFLOP/img "
              f"({extra * batch / by_name[ours].flops:+.1%} of our step)")
    if not rows:
        print("  nothing to compare (no lightly rows)")
    return rows


def print_eval(results: dict) -> None:
    knn, feats, extraction = (results["knn_seconds"], results["feature_extraction_seconds"],
                              results["feature_extraction"])

    def verdict(met: bool | None) -> str:
        return "" if met is None else ("  met" if met else "  MISSED")

    def at_size(seconds: float) -> bool | None:
        return None if feats["meets_target"] is None else seconds <= feats["target_s"]

    rows = [(f"k-NN {knn['train']} x {knn['test']}, {'+'.join(knn['poolings'])}", knn["seconds"],
             f"<= {knn['target_s']:g} s at 50000 x 10000{verdict(knn['meets_target'])}")]
    rows += [(f"features, {feats['images']} images, {feats['encoder']}, {precision}", extraction[precision]["seconds"],
              f"<= {feats['target_s']:g} s at 60000{verdict(at_size(extraction[precision]['seconds']))}")
             for precision in ("fp32", "bf16") if precision in extraction]
    width = max(len(label) for label, _, _ in rows)
    print(f"\n{'evaluations (cpu profile, ' + str(torch.get_num_threads()) + ' threads)':{width + 2}s} "
          f"{'seconds':>9s}   target")
    for label, seconds, target in rows:
        print(f"  {label:{width}s} {seconds:9.2f}   {target}")
    per = "CPU-second" if extraction["clock"] == "cpu" else "second"
    print(f"extraction MFU: {extraction['gflop_per_img']:.3f} GFLOP/img (attention counted) over the matmul "
          f"peak at its dtype, per {per}; goal {extraction['mfu_goal']:.0%}")
    for precision in ("fp32", "bf16"):
        if precision in extraction:
            row = extraction[precision]
            mfu = row["mfu"]
            print(f"  {precision}  {mfu:6.1%} of {row['matmul_peak_flops'] / 1e9:6.0f} GFLOP/s  "
                  f"{row['img_per_s']:7.0f} img/s{'' if mfu >= extraction['mfu_goal'] else '  below goal'}")
    if "bf16" in extraction:
        print(f"  bf16 extracts {extraction['bf16_speedup']:.2f}x as fast as fp32 (same clock)")
    else:
        print(f"  bf16 not offered: {extraction['bf16_skipped']}")
    print(f"per encoder (k-NN evaluation, fp32): extraction {feats['seconds']:.1f} s + k-NN {knn['seconds']:.1f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results: dict = {"machine": {"device": str(device), "threads": torch.get_num_threads(),
                                 "torch": torch.__version__}, "config": vars(args)}
    if not args.eval:
        steps = step_results(args, device)
        results["machine"]["matmul_peak_flops"] = steps.pop("matmul_peak_flops")
        results.update(steps)
        augment = augment_results()
        print_augment(augment)
        results.update(augment)
    if not args.no_eval:
        timings = eval_results(args.eval_train, args.eval_test, device)
        print_eval(timings)
        results.update(timings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, results)
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
