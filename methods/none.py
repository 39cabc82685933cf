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
    # Fine-tuned like every encoder: the profile's grid of lr and layer decay (1.0 among them),
    # chosen on the held-out part of train (eval.finetune). Segmented from scratch, without
    # layer-wise lr decay (which would train its random patch embedding at 0.75^7 = 0.13x (cpu)
    # or 0.65^13 = 0.004x (gpu) of the head's lr); the pre-trained encoders keep their
    # profile's (the papers') layer decay there.
    eval_overrides = {"segmentation": {"layer_decay": 1.0}}
