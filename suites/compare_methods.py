"""Which method gives the best encoder? MAE, pixel regression (SimMIM), BEiT and iBOT at their
papers' default masking, every evaluation, against the no-pre-training baseline, twice:

- matched in epochs: every method sees the profile's number of passes over the data;
- matched in compute: every method gets the pre-training FLOPs of MAE's run above, so a
  method whose step costs 5x MAE's trains for a fifth of the epochs. This is the question a
  researcher with a fixed budget asks. (BEiT's stage-1 tokenizer is not counted: it is trained
  once and shared, and its cost is in its own run record.)
"""
from __future__ import annotations

from runs.cost import flops_per_image
from runs.identity import RunSpec, resolve

DESCRIPTION = "MAE vs pixel vs BEiT vs iBOT at paper defaults, matched in epochs and in FLOPs; all evaluations"

EVALS = ("knn", "linear", "finetune", "segmentation")
REFERENCE = "mae"    # its epochs-matched run sets the FLOPs budget


def paper_defaults(profile) -> dict[str, dict]:
    """Each method at its config's defaults (and the profile's method_defaults)."""
    return {"mae": {}, "pixel": {}, "beit": {}, "ibot": {}}


def grid(profile) -> list[RunSpec]:
    methods = paper_defaults(profile)
    runs = [RunSpec("none", "random init", evals=EVALS)]
    runs += [RunSpec(name, f"{profile.train.epochs:g} epochs", overrides, evals=EVALS)
             for name, overrides in methods.items()]
    budget = _cell_flops_per_image(RunSpec(REFERENCE, overrides=methods[REFERENCE]), profile)
    for name, overrides in methods.items():
        if name == REFERENCE:
            continue
        epochs = round(profile.train.epochs * budget / _cell_flops_per_image(RunSpec(name, overrides=overrides),
                                                                         profile), 2)
        runs.append(RunSpec(name, f"MAE's FLOPs ({epochs:g} ep)", overrides, evals=EVALS,
                            train={"epochs": epochs}))
    return runs


def _cell_flops_per_image(spec: RunSpec, profile) -> float:
    config = resolve(spec, profile, seed=0, data={"name": "synthetic", "img_size": profile.encoder["img_size"]})
    return flops_per_image(config.method, config.method_config)
