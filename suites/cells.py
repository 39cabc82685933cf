"""The cells of every registered method in a suite that varies a setting across methods.

A suite's module keeps the cells of the project's own methods (beside the paper tables they
follow); every other registered method, from a plugin (`runs.plugins`) included, brings its own
through `Method.suite_cells` or runs once at its config's defaults:

    own = {"mae": [RunSpec("mae", "random 0.75", ...)], "pixel": [...]}
    specs = method_cells("ablation_masking", own)      # mae's, pixel's, then every other method's
"""
from __future__ import annotations

from collections.abc import Mapping

from core.config import ConfigError
from methods.registry import from_project, pretraining_methods, registry
from runs.identity import RunSpec
from suites.registry import SUITES

DEFAULT_SETTING = "default"         # the one cell of a method that declares none for a suite
DEFAULTS_ONLY = "compare_methods"   # compares every method at its config's defaults: takes no cells


def method_cells(suite: str, own: dict[str, list[RunSpec]], default_cell: bool = True) -> list[RunSpec]:
    """The methods' cells in `suite`: the suite's own (`own`: the project's methods it varies, in
    its order), then every method from outside that pre-trains an encoder, in the order
    registered, with the cells it declares (`Method.suite_cells[suite]`) or else one cell at its
    defaults (unless `default_cell` is False: a suite about one method's part, such as MAE's
    decoder, takes declared cells only). A method's declared cells replace the suite's own."""
    specs: list[RunSpec] = []
    for name in list(own) + [name for name in pretraining_methods() if name not in own]:
        declared = declared_cells(suite, name)
        if declared is not None:
            specs += declared
        elif name in own:
            specs += own[name]
        elif default_cell and not from_project(name):     # a project method the suite leaves out stays out
            specs.append(RunSpec(name, DEFAULT_SETTING))
    return specs


def declared_cells(suite: str, method: str) -> list[RunSpec] | None:
    """The cells `method` declares for `suite` (None: it declares none)."""
    cells = registry[method][0].suite_cells.get(suite)
    if cells is None:
        return None
    return [RunSpec(method, setting, dict(overrides)) for setting, overrides in cells.items()]


def check_suite_cells() -> None:
    """Every registered method's `suite_cells` names known suites and maps setting labels to
    config overrides (ConfigError, one line naming the method and the fix, otherwise)."""
    example = "{'ablation_masking': {'block 0.6': {'mask': {'strategy': 'block', 'ratio': 0.6}}}}"
    for name, (cls, _) in registry.items():
        where = f"method {name!r} ({cls.__module__}.{cls.__qualname__}.suite_cells)"
        if not isinstance(cls.suite_cells, Mapping):
            raise ConfigError(f"{where} must map suites to their cells, e.g. {example}")
        for suite, cells in cls.suite_cells.items():
            if suite not in SUITES:
                raise ConfigError(f"{where} names suite {suite!r}, which does not exist; suites: {', '.join(SUITES)}")
            if suite == DEFAULTS_ONLY:
                raise ConfigError(f"{where} names {DEFAULTS_ONLY}, which runs every method at its config's "
                                  f"defaults; drop that entry")
            if not (isinstance(cells, Mapping) and cells
                    and all(isinstance(setting, str) and setting and isinstance(overrides, Mapping)
                            for setting, overrides in cells.items())):
                raise ConfigError(f"{where}[{suite!r}] must map setting labels to method config overrides, "
                                  f"e.g. {example}; got {cells!r}")
