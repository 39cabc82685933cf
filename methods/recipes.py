"""Training recipes as data. Each method declares its paper's pre-training recipe as a
`Recipe` (`Method.paper_recipe`), every value with its source; `runs.identity.resolve` applies it
under `--recipe paper` (the default) on top of the profile and under the spec's overrides:

    TrainConfig     profile.train  <-  recipe.train  <-  RunSpec.train
    method config   profile.encoder  <-  recipe.method  <-  profile.method_defaults  <-  RunSpec.overrides

A recipe holds only what does not depend on scale: lr per 256 images (the linear rule scales it
with the profile's batch), betas, weight decay and its schedule, clipping, warm-up and the lr
floor as fractions of training, crop scale, augmentation, backbone options (layer scale), mask
unit. The profile keeps epochs, batch size, image and model size, checkpoint cadence.

A method that declares no paper recipe (one registered from outside, `runs.plugins`, may leave
it out) trains under the shared recipe under both, and its runs and table rows say `shared`;
`--recipe paper` says so in one warning line (`suites.plan`).

`--recipe tuned` is the shared recipe with each method's own constant lr, chosen on held-out data
(`suites.tune`: mean-pooled k-NN on the held-out 5k of train at one seed and one budget, from a
grid that brackets the optimum) and the masks scaled to the patch grid (`Method.tuned_recipe`,
`methods.masking.SCALED`); iBOT adds its small-scale teacher settings. The chosen lrs are data
(`results/tuned/<profile>.json`), read into `Profile.tuning`; a method without one is refused
with the command that tunes it.

`--recipe shared` applies no recipe: every method trains with the profile's one recipe (MAE's,
calibrated at the cpu scale; DESIGN.md), as every run before recipes existed did, so those runs
keep their folder names. It is the controlled ablation of "does the recipe decide the ranking?".
"""
from __future__ import annotations

from dataclasses import dataclass, field

RECIPES = ("paper", "shared", "tuned")


@dataclass(frozen=True)
class Recipe:
    """A method's recipe (paper or tuned): TrainConfig fields and method-config overrides."""
    train: dict = field(default_factory=dict)       # engine.trainer.TrainConfig fields
    method: dict = field(default_factory=dict)      # method config overrides (nested: {"encoder": {...}})
    source: str = ""                                # the paper table / official file it comes from
