"""What `--dry-run` and `--list` print: a plan with each run's estimated cost and state, and the
suites with their grid sizes."""
from __future__ import annotations

import json

from runs.cost import estimate_seconds, format_hours, train_steps
from runs.curve import pretrain_costs
from runs.identity import resolve
from runs.plan import Plan
from suites.budget import Allocation, print_budget_plan
from suites.plan import grid_specs
from suites.profiles import PROFILES, get_profile
from suites.registry import SUITES, get_suite


def print_plan(plan: Plan, allocation: Allocation | None = None) -> None:
    """Each run with its estimated cost and state; with a budget, its allocation and its total
    (over the whole grid, whatever --only keeps) against the budget."""
    print(f"suite {plan.suite}, profile {plan.profile_name}, recipe {plan.recipe}: {len(plan.runs)} runs")
    if allocation is not None:
        print_budget_plan(plan, allocation)
        return
    total = left = 0.0
    # a curve's branches cost their decay, their trunks once (runs.curve)
    branches, trunks = pretrain_costs(plan, train_steps, lambda config: estimate_seconds(config, plan.profile))
    for run in plan.runs:
        seconds = branches.get(run.name, estimate_seconds(run.config, plan.profile))
        state = plan.state(run).label
        total += seconds
        left += seconds if state in ("to run", "failed", "unreadable") else 0.0   # pre-training still to do
        print(f"  {run.spec.method:6s} {run.spec.setting:22s} seed {run.seed}  ~{seconds / 60:7.1f} min  "
              f"{run.name}  [{state}]")
    for name, seconds in trunks.items():
        total, left = total + seconds, left + seconds
        print(f"  trunk  {name}  ~{seconds / 60:7.1f} min still to grow (constant lr, shared by its branches)")
    print(f"estimated pre-training: {left / 3600:.2f} h left of {total / 3600:.2f} h for these runs "
          f"at {plan.profile.flops_per_second / 1e9:.0f} GFLOP/s (plus a minute or two of evaluation per run; "
          f"fine-tuning and segmentation take longer)")


def list_suites(cost_profile: str, recipe: str = "paper") -> None:
    """Suites with their grid sizes per profile, and the estimated pre-training cost at
    `cost_profile` (counting FLOPs builds every model of the grid, so only one profile)."""
    cost_at = get_profile(cost_profile)
    for name in SUITES:
        print(f"{name}: {get_suite(name).DESCRIPTION}")
        for profile_name, profile in PROFILES.items():
            # only the costed profile needs each cell's FLOPs; elsewhere their number is the same without
            specs = (grid_specs(name, profile, recipe) if profile is cost_at
                     else get_suite(name).grid(profile, recipe, lambda spec: 1.0))
            line = (f"  {profile_name:9s} {len(specs):2d} cells x {profile.seeds} seed(s) = "
                    f"{len(specs) * profile.seeds:3d} runs")
            if profile is cost_at:
                line += (f", ~{format_hours(grid_seconds(specs, profile, recipe))} of pre-training at "
                         f"{profile.flops_per_second / 1e9:g} GFLOP/s (estimated from counted FLOPs)")
            print(line)
    print(f"(costs shown for --profile {cost_profile}, --recipe {recipe}; pass --list --profile NAME for another)")


def grid_seconds(specs: list, profile, recipe: str) -> float:
    """Estimated pre-training seconds of a grid at the profile's seeds, on the profile's own data
    (without reading it; imagenet: ImageNet-1k's size)."""
    data = {"name": "imagenet" if profile.data == "user" else profile.data, "img_size": profile.encoder["img_size"]}
    costs: dict[str, float] = {}
    total = 0.0
    for spec in specs:
        config = resolve(spec, profile, 0, data, recipe=recipe)
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in costs:
            costs[key] = estimate_seconds(config, profile)
        total += costs[key] * profile.seeds
    return total
