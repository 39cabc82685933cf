"""A pre-training run in its own process, for the kill / pre-emption tests.

    python tests/pretrain_driver.py RUN_DIR [--slow-checkpoint-at STEP] [--dump-state PREFIX]
    torchrun --nproc_per_node 2 tests/pretrain_driver.py RUN_DIR --dump-state PREFIX
    torchrun --nproc_per_node 2 tests/pretrain_driver.py RUN_DIR --nan-on-last-rank-at STEP
    torchrun --nproc_per_node 2 tests/pretrain_driver.py RUN_DIR --method ibot --dump-state PREFIX
    python tests/pretrain_driver.py RUN_DIR --stream IMAGEFOLDER_SPLIT [--workers N]

--nan-on-last-rank-at makes the loss of the last rank alone non-finite at one step (with
max_bad_steps 1, so the step is skipped; with --stop-on-nan 0, so the run stops). Prints "step N" after each optimizer step (so a test can kill it at a chosen step) and
"saving N" while a checkpoint's temp file is written; with --slow-checkpoint-at it pauses
there, so a test can kill it in the middle of a checkpoint write. --stream reads the images
from an ImageFolder split through engine.stream (decoded per step in --workers workers)
instead of the synthetic in-memory images.
"""
import argparse
import os
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import engine.checkpoint as checkpoint  # noqa: E402
from engine import distributed  # noqa: E402
from engine.data import synthetic_splits  # noqa: E402
from engine.stream import FolderReader, StreamingViews  # noqa: E402
from engine.trainer import Preempted, Trainer, TrainConfig  # noqa: E402
from engine.views import pretraining  # noqa: E402
from methods import build_method, registry  # noqa: E402

CFG = TrainConfig(epochs=3, batch_size=32, blr=1e-3, warmup_frac=0.1, checkpoint_every=4, log_every=2)
METHODS = {"mae": {}, "ibot": dict(out_dim=128, head_hidden_dim=64, head_bottleneck_dim=32)}   # small heads


def paper_recipe(name: str) -> tuple[dict, TrainConfig]:
    """The method's overrides and the driver's TrainConfig at its paper recipe (iBOT: DINO
    colour augmentation, local crops, weight-decay schedule, last-layer freeze, clipping)."""
    recipe = registry[name][0].paper_recipe
    return {**METHODS[name], **recipe.method}, dataclasses.replace(CFG, **{**recipe.train, "blr": CFG.blr})


def say(line: str) -> None:
    """One line on stdout in one write(2), atomic on a pipe: two ranks' lines never interleave
    (print writes the text and its newline apart, so "step 5step 5" could reach the reader)."""
    os.write(1, f"{line}\n".encode())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--slow-checkpoint-at", type=int, default=-1)
    parser.add_argument("--dump-state", default=None, help="save the final weights to PREFIX-rank<r>.pt")
    parser.add_argument("--nan-on-last-rank-at", type=int, default=-1)
    parser.add_argument("--stop-on-nan", action="store_true", help="with --nan-on-last-rank-at: max_bad_steps 0")
    parser.add_argument("--print-pid", action="store_true", help='print "pid RANK PID" first')
    parser.add_argument("--flush-every", type=int, default=None, help="log_every and checkpoint_every")
    parser.add_argument("--method", choices=sorted(METHODS), default="mae")
    parser.add_argument("--paper-recipe", action="store_true", help="the method's paper recipe (methods.recipes)")
    parser.add_argument("--stream", default=None, help="an ImageFolder split to stream instead of synthetic images")
    parser.add_argument("--workers", type=int, default=0, help="with --stream: DataLoader workers")
    args = parser.parse_args()
    distributed.init_from_env()
    if args.print_pid:
        say(f"pid {distributed.rank()} {os.getpid()}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    overrides, cfg = paper_recipe(args.method) if args.paper_recipe else (METHODS[args.method], CFG)
    method = build_method(args.method, **{**overrides, "encoder": {"size": "micro", "img_size": 16, "patch_size": 4}})
    if args.flush_every:
        cfg = dataclasses.replace(cfg, log_every=args.flush_every, checkpoint_every=args.flush_every)
    if args.nan_on_last_rank_at >= 0 and not args.stop_on_nan:
        cfg = dataclasses.replace(cfg, max_bad_steps=1)
    if args.stream:
        data = StreamingViews(method, FolderReader(args.stream), cfg.batch_size, cfg.crop_scale_min, seed=0,
                              device=torch.device("cpu"), workers=args.workers)
    else:
        data = synthetic_splits(img_size=16, train_per_class=32).train.images
    trainer = Trainer(method, *pretraining(method, data, cfg, seed=0), Path(args.run_dir), seed=0,
                      config_hash="driver", progress=False)
    if distributed.rank() == distributed.world_size() - 1 and args.nan_on_last_rank_at >= 0:
        forward, calls = trainer.step_fn, []

        def nan_once(batch):
            loss, logs = forward(batch)
            calls.append(1)
            return (loss * float("nan") if len(calls) == args.nan_on_last_rank_at + 1 else loss), logs

        trainer.step_fn = nan_once

    after_step = method.after_step

    def report_step(step, total):
        after_step(step, total)
        say(f"step {step}")

    method.after_step = report_step
    save = checkpoint.torch.save

    def slow_save(state, f):
        save(state, f)
        say(f"saving {state['step']}")
        if state["step"] == args.slow_checkpoint_at:
            time.sleep(60)

    checkpoint.torch.save = slow_save
    try:
        trainer.fit()
    except Preempted as err:
        say(f"preempted: {err}")
        return 143
    checkpoint.torch.save = save   # (the patch above is on the torch module itself)
    if args.dump_state:
        torch.save(method.state_dict(), f"{args.dump_state}-rank{distributed.rank()}.pt")
    say("finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
