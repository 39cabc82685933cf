"""mmsegmentation on mmcv-lite: a stand-in for mmcv's compiled extension.

mmseg 1.2.2 imports `mmcv.ops` when it is imported, and every `mmcv.ops` module loads the
compiled `mmcv._ext`, which the pure-Python mmcv-lite (what `make setup` installs) lacks. The
UperNet protocol (UPerHead, FCNHead, cross-entropy, BN, the ADE20K pipeline, IoUMetric) calls no
compiled op, so `guard_mmcv_ops` registers a stand-in `mmcv._ext` whose every op raises a
one-line error naming it and the fix. With a full mmcv (compiled ops) it does nothing.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

from core.config import ConfigError

FULL_MMCV_FIX = "install full mmcv with compiled ops: bash scripts/setup.sh --full-mmcv"

# Types in mmseg 1.2.2 configs whose forward always calls a compiled op, and that op, so a
# config naming one fails when it is built rather than after training has started
COMPILED_OP_TYPES = {
    "PSAHead": "PSAMask",                                   # PSANet's head
    "DCN": "DeformConv2d",                                  # conv_cfg of DCN-based heads and backbones
    "DCNv2": "ModulatedDeformConv2d",
    "Mask2FormerHead": "MultiScaleDeformableAttention",     # mmdet's pixel decoder (mmdet needs full mmcv)
}


class MissingCompiledOps(types.ModuleType):
    """Stands in for `mmcv._ext`: every attribute is an op that raises when called, so
    mmcv's `load_ext` (which checks only that each op is there) lets `mmcv.ops` import."""

    def __getattr__(self, op: str):
        if op.startswith("__"):                  # module protocol lookups (__path__, ...) stay absent
            raise AttributeError(op)

        def missing(*args, **kwargs):
            raise RuntimeError(f"mmcv op {op!r} is compiled, and this mmcv (mmcv-lite) has no "
                               f"compiled ops; {FULL_MMCV_FIX}")

        missing.__name__ = op
        return missing


def guard_mmcv_ops() -> None:
    """Registers the stand-in when mmcv has no compiled extension; call it before mmseg is
    imported. A compiled extension that is there but fails to load still raises."""
    if sys.modules.get("mmcv._ext") is not None:
        return
    try:
        importlib.import_module("mmcv._ext")
    except ModuleNotFoundError as err:
        if err.name != "mmcv._ext":
            raise
        import mmcv

        stand_in = MissingCompiledOps("mmcv._ext")
        stand_in.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", loader=None)   # mmcv's check_ops_exist: False
        mmcv._ext = sys.modules["mmcv._ext"] = stand_in


def has_compiled_ops() -> bool:
    guard_mmcv_ops()
    return not isinstance(sys.modules["mmcv._ext"], MissingCompiledOps)


def mmcv_in_use() -> dict[str, str]:
    """Which mmcv runs, for a record: {"mmcv": "2.1.0", "mmcv_ops": "compiled" | "none (mmcv-lite)"}."""
    import mmcv

    return {"mmcv": mmcv.__version__, "mmcv_ops": "compiled" if has_compiled_ops() else "none (mmcv-lite)"}


def check_compiled_ops(config) -> None:
    """Raises a one-line ConfigError when an mmseg model config names a type that needs a
    compiled op this mmcv lacks."""
    if has_compiled_ops():
        return
    for name in config_types(config):
        if name in COMPILED_OP_TYPES:
            raise ConfigError(f"{name} needs mmcv's compiled {COMPILED_OP_TYPES[name]}, which mmcv-lite "
                              f"lacks; {FULL_MMCV_FIX}")


def config_types(config) -> list[str]:
    """Every `type` named in a nested mmseg config (dicts and lists)."""
    if isinstance(config, dict):
        own = [config["type"]] if isinstance(config.get("type"), str) else []
        return own + [name for value in config.values() for name in config_types(value)]
    if isinstance(config, (list, tuple)):
        return [name for value in config for name in config_types(value)]
    return []
