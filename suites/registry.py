"""Known suites: name -> module with `DESCRIPTION` and `grid(profile) -> list[RunSpec]`."""
import importlib

from methods.registry import unknown

SUITES = ("ablation_masking", "compare_methods", "ablation_targets", "ablation_mae_decoder")


def get_suite(name: str):
    if name not in SUITES:
        raise unknown("suite", name, SUITES)
    return importlib.import_module(f"suites.{name}")
