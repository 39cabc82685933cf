"""The method registry: one name -> (method class, frozen config dataclass).

    @register_method("mae", MAEConfig)
    class MAE(MIMMethod): ...

    method = build_method("mae", encoder={"size": "nano"}, mask={"ratio": 0.9})
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

registry: dict[str, tuple[type, type]] = {}


class UnknownNameError(KeyError):
    """An unknown method / suite / profile / evaluation name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message names the field and the fix."""


def unknown(kind: str, name: str, known) -> UnknownNameError:
    return UnknownNameError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")


def register_method(name: str, config_cls: type) -> Callable[[type], type]:
    """Class decorator that adds a method under `name`; registering a name twice raises."""
    if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
        raise TypeError(f"config of method {name!r} must be a frozen dataclass")

    def add(cls: type) -> type:
        if name in registry:
            raise ValueError(f"method {name!r} is already registered (by {registry[name][0].__qualname__})")
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


def build_config(config_cls: type, values: dict[str, Any], where: str):
    """Build a (possibly nested) frozen dataclass from plain values, checking names and types."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown config field {key!r}; fields: {', '.join(fields)}")
        default = getattr(config_cls(), key) if _has_defaults(config_cls) else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = build_config(type(default), value, where=f"{where}.{key}")
        elif default is not None and not dataclasses.is_dataclass(default):
            value = _coerce(value, type(default), f"{where}: field {key!r}")
        kwargs[key] = value
    cfg = config_cls(**kwargs)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    return cfg


def _has_defaults(config_cls: type) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(config_cls))


def _coerce(value: Any, expected: type, where: str) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is tuple and isinstance(value, list):
        return tuple(value)
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {expected.__name__}, got {value!r}; pass a {expected.__name__}")
    return value


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---- run identity: fields added after runs existed -------------------------------------------
IDENTITY_DEFAULT = "identity_default"       # the field metadata key `late_field` sets
RETIRED_FIELDS = "RETIRED_FIELDS"           # class attribute: {removed field: the value it always had}


def late_field(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
               identity_default: Any = dataclasses.MISSING):
    """A config field added after runs using the config existed. A run whose value equals
    `identity_default` (the behaviour every earlier run had; by default the field's default)
    leaves the field out of its identity, so run folders named before the field existed keep
    their names and are not re-run. `runs.identity` reads it; every config field added from
    now on is declared this way:

        precision: str = late_field("auto")                           # earlier runs: auto
        recipe: str = late_field("paper", identity_default="shared")  # earlier runs: shared
    """
    if identity_default is dataclasses.MISSING:
        identity_default = default_factory() if default_factory is not dataclasses.MISSING else default
    if identity_default is dataclasses.MISSING:
        raise TypeError("late_field needs a default, a default_factory or an identity_default")
    kwargs = {"default": default} if default_factory is dataclasses.MISSING else {"default_factory": default_factory}
    return dataclasses.field(metadata={IDENTITY_DEFAULT: identity_default}, **kwargs)
