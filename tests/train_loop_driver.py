"""A fine-tuning or a segmentation in its own process, for the kill / SIGTERM tests.

    python tests/train_loop_driver.py finetune WORK_DIR RESULT_JSON
    python tests/train_loop_driver.py segmentation WORK_DIR RESULT_JSON

Runs the evaluation through the registry on a micro ViT (seed 0) at the sizes below. Prints
"step N" after each optimizer step (so a test can stop it at a chosen step), writes the
evaluation's metrics to RESULT_JSON when it finishes, and exits 143 when a SIGTERM stopped it.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.data import synthetic_splits  # noqa: E402
from engine.trainer import Preempted  # noqa: E402
from eval.registry import EvalContext, get_evaluation  # noqa: E402
from methods.vit import ViT, ViTConfig  # noqa: E402

STEPS = {"finetune": 10, "segmentation": 8}      # optimizer steps of each (checkpoints every 3)


def config(name: str):
    """The evaluation's config at test sizes (mmseg is imported only for a segmentation)."""
    if name == "finetune":
        from eval.finetune import FinetuneConfig

        return FinetuneConfig(epochs=1, batch_size=64, blr=1e-3, checkpoint_every=3, warmup_frac=0.2)
    from eval.segmentation import SegmentationConfig

    return SegmentationConfig(dataset="camvid", scale=(64, 48), crop_size=32, iterations=STEPS[name], batch_size=2,
                              channels=16, aux_channels=16, warmup_iters=2, checkpoint_every=3, eval_images=2)


def report_steps(trainable_cls) -> None:
    after_step = trainable_cls.after_step

    def report(self, step, total):
        after_step(self, step, total)
        print(f"step {step}", flush=True)

    trainable_cls.after_step = report


def main() -> int:
    name, work_dir, result_file = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    cfg = config(name)
    torch.set_num_threads(1)
    if name == "finetune":
        from eval.finetune import Classifier as trainable_cls
    else:
        from eval.segmentation import Segmentor as trainable_cls
    report_steps(trainable_cls)
    torch.manual_seed(0)
    encoder = ViT(ViTConfig(size="micro", img_size=16, patch_size=4))
    splits = synthetic_splits(img_size=16) if name == "finetune" else None
    ctx = EvalContext(work_dir=work_dir, features_dir=work_dir / "features", seed=0, progress=False)
    try:
        result = get_evaluation(name).run(encoder, splits, cfg, ctx)
    except Preempted as err:
        print(f"preempted: {err}", flush=True)
        return 143
    result_file.write_text(json.dumps(result.metrics, sort_keys=True))
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
