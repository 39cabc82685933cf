"""Known suites: name -> module with `DESCRIPTION` and
`grid(profile, recipe, flops_per_image) -> list[RunSpec]`.

`recipe` ("paper" or "shared", methods.recipes) is the one `suites.run --recipe` resolves every
run at; `flops_per_image(spec)` a cell's training FLOPs per image under it (from the run layer:
a grid builds no model). A grid whose cells depend on them (compare_methods: epochs matched in
FLOPs, which depend on each method's recipe) reads them, the others take them and ignore them.
"""
import importlib

from core.config import unknown

SUITES = ("ablation_masking", "compare_methods", "ablation_targets", "ablation_mae_decoder")


def get_suite(name: str):
    if name not in SUITES:
        raise unknown("suite", name, SUITES)
    return importlib.import_module(f"suites.{name}")
