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
