"""The config kernel every layer shares: typed, frozen config dataclasses built from plain
values (`build_config`), the errors a bad value raises, and the identity a run is named by
(`late_field`, `identity_record`, `config_values`).

The ground floor: it imports nothing of the project, and every layer may import it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

class UnknownNameError(KeyError):
    """An unknown method / suite / profile / evaluation name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message names the field and the fix."""


def unknown(kind: str, name: str, known) -> UnknownNameError:
    return UnknownNameError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")


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
RETIRED_ATTR = "RETIRED_FIELDS"             # class attribute: {removed field: the value it always had}


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


# ---- run identity: the record a config is hashed as (runs.identity names runs by it) ------
def identity_record(cfg) -> dict:
    """`dataclasses.asdict(cfg)` as a run's identity holds it: fields declared with `late_field`
    left out where they hold their identity default, retired fields put back with the value
    they always had (nested configs alike)."""
    record = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if IDENTITY_DEFAULT in f.metadata and same_json(value, f.metadata[IDENTITY_DEFAULT]):
            continue
        record[f.name] = identity_record(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    record.update(copy.deepcopy(getattr(type(cfg), RETIRED_ATTR, {})))
    return record


def config_values(config_cls: type, record: dict, where: str) -> dict:
    """The inverse of `identity_record` as plain values for `build_config`: retired fields
    dropped (an error if one holds another value than the one every run had), late fields
    left out of the record given back their identity default."""
    values = dict(record)
    for name, always in getattr(config_cls, RETIRED_ATTR, {}).items():
        if name in values and not same_json(values.pop(name), always):
            raise ConfigError(f"{where}: field {name!r} was removed from {config_cls.__name__} (every run had "
                              f"{always!r}); this config cannot be rebuilt by this version of mimbench")
    for f in dataclasses.fields(config_cls):
        if f.name not in values and IDENTITY_DEFAULT in f.metadata:
            values[f.name] = copy.deepcopy(f.metadata[IDENTITY_DEFAULT])
        default = nested_default(config_cls, f)
        if default is not None and isinstance(values.get(f.name), dict):
            values[f.name] = config_values(type(default), values[f.name], f"{where}.{f.name}")
    return values


def nested_default(config_cls: type, f: dataclasses.Field):
    """The default of a field when it is a nested config dataclass, else None."""
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = None if f.default is dataclasses.MISSING else f.default
    return default if dataclasses.is_dataclass(default) else None


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON (a tuple and a list of the same values are the same to a hash)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
