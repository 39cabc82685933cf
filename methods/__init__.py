"""Pre-training methods on one shared ViT, and the registry that names them.

    from methods import registry, register_method, build_method
    sorted(registry)                       # ['beit', 'dvae', 'ibot', 'mae', 'none', 'pixel']
    method = build_method("mae", mask={"ratio": 0.9})

Adding a method is one file: define a frozen config dataclass and a `MIMMethod`
subclass decorated with `@register_method("name", Config)`, then import it below.
"""
from core.config import ConfigError, UnknownNameError
from methods.registry import build_method, method_config, register_method, registry

from methods import mae, none, pixel  # noqa: E402,F401  (registers the built-in methods)
from methods import ibot  # noqa: E402,F401
from methods import beit, dvae  # noqa: E402,F401  (BEiT and its stage-1 tokenizer)

__all__ = ["registry", "register_method", "build_method", "method_config",
           "ConfigError", "UnknownNameError"]
