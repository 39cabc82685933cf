"""The method registry: one name -> (method class, frozen config dataclass).

    @register_method("mae", MAEConfig)
    class MAE(MIMMethod): ...

    method = build_method("mae", encoder={"size": "nano"}, mask={"ratio": 0.9})

A method may be registered from outside the package (a user's file or package, imported by
`runs.plugins`); `from_project` tells the project's own methods from those.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from core.config import build_config, unknown
from methods.base import PRODUCTS, Method

registry: dict[str, tuple[type, type]] = {}


def register_method(name: str, config_cls: type) -> Callable[[type], type]:
    """Class decorator that adds a method under `name`; registering a name twice raises."""
    if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
        raise TypeError(f"config of method {name!r} must be a frozen dataclass")

    def add(cls: type) -> type:
        if name in registry:
            raise ValueError(f"method {name!r} is already registered (by {registry[name][0].__qualname__})")
        if not (issubclass(cls, Method) and cls.product in PRODUCTS):
            raise TypeError(f"method {name!r} must subclass methods.base.Method (MIMMethod for a ViT) with a "
                            f"product in {', '.join(PRODUCTS)}")
        registry[name] = (cls, config_cls)
        cls.name = name
        return cls

    return add


def method_config(name: str, **overrides: Any):
    """The method's config with `overrides` applied, type- and range-checked."""
    if name not in registry:
        raise unknown("method", name, registry)
    config_cls = registry[name][1]
    return build_config(config_cls, overrides, where=f"method {name!r}")


def build_method(name: str, **overrides: Any):
    """Instantiate a registered method from its config defaults plus `overrides`."""
    cfg = method_config(name, **overrides)
    return registry[name][0](cfg)


PROJECT_PACKAGE = "methods"     # where the project's own methods are defined


def from_project(name: str) -> bool:
    """Whether registered method `name` is one of mimbench's own (its class is defined in the
    `methods` package), not one registered from outside: the project's tests hold its own
    methods to rules (a paper recipe, pinned run names) that a user's method need not follow."""
    if name not in registry:
        raise unknown("method", name, registry)
    return registry[name][0].__module__.split(".")[0] == PROJECT_PACKAGE


def pretraining_methods() -> list[str]:
    """The registered methods whose runs pre-train an encoder (the methods a suite compares), in
    the order registered: the project's own first, then those from outside."""
    return [name for name, (cls, _) in registry.items() if cls.trains and cls.product == "encoder"]
