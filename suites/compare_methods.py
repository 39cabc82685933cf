"""Which method gives the best encoder? MAE, pixel regression (SimMIM), BEiT, iBOT and every
other registered method that pre-trains an encoder (a plugin's too, `runs.plugins`) at their
config's defaults (the papers' masking), every registered evaluation of an encoder, against the
no-pre-training baseline, twice:

- matched in epochs: every method sees the profile's number of passes over the data;
- matched in compute: every method gets the pre-training FLOPs of MAE's run above, so a
  method whose step costs 5x MAE's trains for a fifth of the epochs. This is the question a
  researcher with a fixed budget asks. (BEiT's stage-1 tokenizer is not counted: it is trained
  once and shared, and its cost is in its own run record.)

`budget_grid` is the compute-matched block alone at a budget of E MAE-epochs of FLOPs (what
`python -m suites.run compare_methods --budget` runs): `none` and every method at E * (MAE's
training FLOPs per image / its own), rounded to 0.01 epochs.
"""
from __future__ import annotations

from collections.abc import Callable

from eval.registry import registry as evaluation_registry
from methods.registry import pretraining_methods, registry
from runs.identity import RunSpec

# a cell's training FLOPs per image at the grid's profile and recipe (runs.cost.cell_flops_per_image,
# handed in by the plan: a grid builds no model)
FlopsPerImage = Callable[[RunSpec], float]

DESCRIPTION = ("MAE vs pixel vs BEiT vs iBOT (and every other registered method) at paper defaults, matched in "
               "epochs and in FLOPs; all evaluations")

BUDGET_EVALS = ("knn", "linear")    # --budget's default: minutes per run, a verdict the same day
REFERENCE = "mae"    # its epochs-matched run sets the FLOPs budget

# The smallest MAE budget measured to separate from random init. DESIGN.md, "Calibration" (nano
# MAE on CIFAR-10, 2-core CPU): 5 epochs beat random init in k-NN by 6-9 points (a 5-epoch
# run's encoder at 1.3 epochs, mid-schedule with its lr still high, by 7 / 5). Whole schedules
# of 1.3 epochs (seed 0: k-NN 35.8 / 32.9 against random init's 34.2 / 32.9, 2026-12-02) and
# 1.45-1.58 epochs stayed within 1-3 points, the baseline's seed spread. Below this budget a
# comparison is unlikely to say anything.
SEPARATING_MAE_EPOCHS = 5.0


# The project's methods in the order every table so far printed them; the other registered
# methods follow in the order they were registered
PAPER_ORDER = ("mae", "pixel", "beit", "ibot")


def paper_defaults(profile) -> dict[str, dict]:
    """Each compared method (every registered one that pre-trains an encoder) and its overrides:
    none, so each runs at its config's defaults (and the profile's method_defaults)."""
    names = pretraining_methods()
    ordered = [name for name in PAPER_ORDER if name in names] + [name for name in names if name not in PAPER_ORDER]
    return {name: {} for name in ordered}


def all_evaluations() -> tuple[str, ...]:
    """Every registered evaluation of an encoder, in the order registered (knn, linear, finetune,
    segmentation, then those of plugins), but the held-out criteria (knn_holdout: suites.tune's)."""
    return tuple(name for name, evaluation in evaluation_registry.items()
                 if evaluation.takes == "encoder" and not evaluation.held_out)


def evaluations(method: str, evals: tuple[str, ...]) -> tuple[str, ...]:
    """A cell's evaluations: with k-NN, also k-NN of each other encoder the method saves
    (`Method.encoder_variants`; iBOT: its student, beside the exported teacher)."""
    variants = registry[method][0].encoder_variants if "knn" in evals else ()
    return evals + tuple(f"knn@{variant}" for variant in variants)


def grid(profile, recipe: str = "paper", flops_per_image: FlopsPerImage | None = None) -> list[RunSpec]:
    if flops_per_image is None:
        raise TypeError("compare_methods.grid matches methods in FLOPs: pass flops_per_image "
                        "(suites.plan.grid_specs does)")
    methods = paper_defaults(profile)
    evals = all_evaluations()
    runs = [RunSpec("none", "random init", evals=evals)]
    runs += [RunSpec(name, f"{profile.train.epochs:g} epochs", overrides, evals=evaluations(name, evals))
             for name, overrides in methods.items()]
    budget = flops_per_image(RunSpec(REFERENCE, overrides=methods[REFERENCE]))
    for name, overrides in methods.items():
        if name == REFERENCE:
            continue
        epochs = round(profile.train.epochs * budget / flops_per_image(RunSpec(name, overrides=overrides)), 2)
        runs.append(RunSpec(name, f"MAE's FLOPs ({epochs:g} ep)", overrides, evals=evaluations(name, evals),
                            train={"epochs": epochs}))
    return runs


def budget_flops_per_image(profile, flops_per_image: FlopsPerImage) -> dict[str, float]:
    """Each method's training FLOPs per image (fpi), at its grid cell's config."""
    return {name: flops_per_image(RunSpec(name)) for name in paper_defaults(profile)}


def budget_epochs(flops: dict[str, float], mae_epochs: float) -> dict[str, float]:
    """Each method's epochs at a budget of E = `mae_epochs` (rounded to 0.01) MAE-epochs of
    pre-training FLOPs, given each method's fpi: round(E * fpi(mae) / fpi(method), 2); MAE itself at E."""
    mae_epochs = round(mae_epochs, 2)
    return {name: round(mae_epochs * flops[REFERENCE] / flops[name], 2) for name in flops}


def budget_grid(profile, flops: dict[str, float], mae_epochs: float,
                evals: tuple[str, ...] = BUDGET_EVALS) -> list[RunSpec]:
    """`none` and every method at the pre-training FLOPs of MAE at `mae_epochs` (`flops`: each
    method's fpi, `budget_flops_per_image`)."""
    label = f"{round(mae_epochs, 2):g}"
    return [RunSpec("none", "random init", evals=evals)] + [
        RunSpec(name, f"budget {label}ep MAE FLOPs ({epochs:g} ep)", paper_defaults(profile)[name],
                evals=evaluations(name, evals), train={"epochs": epochs})
        for name, epochs in budget_epochs(flops, mae_epochs).items()]


def curve_grid(profile, flops: dict[str, float], budgets: tuple[float, ...], warmup_steps: int,
               evals: tuple[str, ...] = BUDGET_EVALS) -> list[RunSpec]:
    """`none` and every method at each budget of a curve (MAE-epochs of FLOPs, ascending), under
    warm-up / stable / decay: one trunk per method and seed, a decay branch per budget (runs.curve).
    Cells are listed method by method, budgets ascending, so each trunk grows once. The warm-up
    is matched in FLOPs too: MAE's `warmup_steps`, in each method's own steps (cpu: MAE 49, iBOT
    9 of its ~5x costlier steps), so the cheapest budget leaves every method a stable phase."""
    cells = [RunSpec("none", "random init", evals=evals)]
    for name in paper_defaults(profile):
        train = {"schedule": "wsd", "warmup_steps": max(1, round(warmup_steps * flops[REFERENCE] / flops[name]))}
        for budget in budgets:
            epochs = budget_epochs(flops, budget)[name]
            cells.append(RunSpec(name, f"curve {budget:g}ep MAE FLOPs ({epochs:g} ep)", paper_defaults(profile)[name],
                                 evals=evaluations(name, evals), train={**train, "epochs": epochs}, budget=budget))
    return cells
