"""The no-pre-training baseline: the randomly initialised encoder, evaluated like the others."""
from __future__ import annotations

from dataclasses import dataclass, field

from methods.base import MIMMethod
from methods.registry import register_method
from methods.vit import ViTConfig


@dataclass(frozen=True)
class NoneConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)

    def validate(self) -> None:
        self.encoder.validate()


@register_method("none", NoneConfig)
class NoPretraining(MIMMethod):
    trains = False
    # The strongest baseline: a randomly initialised encoder is fine-tuned and segmented from
    # scratch, without layer-wise lr decay (which would train its random patch embedding at
    # 0.75^7 = 0.13x (cpu) or 0.65^13 = 0.004x (gpu) of the head's lr). The pre-trained
    # encoders keep their profile's (the papers') layer decay. Its fine-tune lr is its own too:
    # chosen from 0.5x, 1x, 2x the profile's on the held-out part of train (eval.finetune).
    eval_overrides = {"finetune": {"layer_decay": 1.0, "blr_sweep": (0.5, 1.0, 2.0)},
                      "segmentation": {"layer_decay": 1.0}}
