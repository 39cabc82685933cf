"""Known suites: name -> module with `DESCRIPTION` and `grid(profile, recipe) -> list[RunSpec]`.

`recipe` ("paper" or "shared", methods.recipes) is the one `suites.run --recipe` resolves every
run at; a grid whose cells depend on it (compare_methods: epochs matched in FLOPs, which depend on
each method's recipe) reads it, the others take it and ignore it.
"""
import importlib

from core.config import unknown

SUITES = ("ablation_masking", "compare_methods", "ablation_targets", "ablation_mae_decoder")


def get_suite(name: str):
    if name not in SUITES:
        raise unknown("suite", name, SUITES)
    return importlib.import_module(f"suites.{name}")
