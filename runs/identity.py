"""What a run is: a grid cell (`RunSpec`) at a profile and seed, resolved into the full config
its folder is named by (`RunConfig`).

A run's identity is the hash of its resolved config, and a promise: a run folder named today
keeps its name through later code changes, so finished work is never silently re-run.

- `IDENTITY_VERSION` is hashed into every config (as "schema"). Raising it renames every run;
  don't, unless that is the point.
- A config field added later is declared with `core.config.late_field`: a run holding the
  field's identity default leaves it out of its identity (`identity_record`).
- A field removed later is listed in its config class's `RETIRED_FIELDS` with the value every
  run had; it stays in the identity and is dropped again when the config is rebuilt.
- A run trained at its method's paper recipe (`methods.recipes`, `--recipe paper`) says so in
  its identity ("recipe": "paper"); the shared recipe leaves the key out, as before recipes.
- tests/test_run_identity.py pins the names of every cell of every suite's `cpu`, `smoke` and
  `gpu` grids under `--recipe shared`: a change that renames a run fails there first.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from core.config import ConfigError, build_config, config_values, identity_record, unknown
from core.files import config_hash
from engine.data import check_dataset_root, data_root
from engine.trainer import TrainConfig
from eval.registry import get_evaluation, split_name
from methods import method_config, registry
from methods.base import Prerequisite
from methods.recipes import RECIPES, Recipe

IDENTITY_VERSION = 1


class RunProfile(Protocol):
    """What the run layer reads of a profile (`suites.profiles.Profile` is the one kind): sizes,
    schedule, data, evaluation configs. (`suites.budget.ComputeBudget` is the --budget.)"""
    name: str
    data: str                   # "synthetic", "cifar10" or "user" (--data required)
    encoder: dict               # ViTConfig fields every method's encoder gets
    train: TrainConfig
    method_defaults: dict       # per-method config overrides at this scale
    feature_batch: int
    flops_per_second: float
    user_settings: dict         # the --set values by field, applied above a paper recipe
    tuning: dict                # --recipe tuned: each method's chosen lr and how ({method: {"blr": ...}})

    def eval_config(self, name: str):
        """The config of evaluation `name` at this budget."""


@dataclass(frozen=True)
class RunSpec:
    """One cell of a suite's grid (`suites.run` adds the seeds)."""
    method: str
    setting: str = "default"                        # label shown in tables, e.g. "random 0.75"
    overrides: dict = field(default_factory=dict)   # method config overrides
    evals: tuple[str, ...] = ("knn",)               # registered evaluations (eval.registry)
    train: dict = field(default_factory=dict)       # TrainConfig overrides, e.g. {"epochs": 2.5}
    budget: float | None = None                     # a curve's cell: its MAE-epochs of FLOPs (not hashed)


@dataclass(frozen=True)
class Requirement:
    """A resolved prerequisite: the run another run needs finished first."""
    config: "RunConfig"
    evals: tuple[str, ...]


@dataclass(frozen=True)
class RunConfig:
    """The resolved config of one run: what its folder name is the hash of (`to_dict`)."""
    method: str
    method_config: dict                 # identity record of the method's config
    train: dict | None                  # identity record of the TrainConfig; None: does not train
    seed: int
    data: dict                          # {"name", "img_size"[, "path"]}
    requires: dict[str, Requirement] = field(default_factory=dict)   # role -> prerequisite run
    recipe: str = "shared"              # methods.recipes.RECIPES: what the method config and train hold

    def to_dict(self) -> dict:
        """config.json, and what the name hashes. `requires` appears only for methods with
        prerequisites and `recipe` only for paper-recipe runs, so other runs keep the names
        they had before either existed. A `tuned` run is named by what it trains with alone (its
        lr and masks are in its config): at an lr the shared recipe also has, MAE's tuned run
        is the shared run, trained once."""
        out = {"schema": IDENTITY_VERSION, "method": self.method, "method_config": self.method_config,
               "train": self.train, "seed": self.seed, "data": self.data}
        if self.recipe == "paper":
            out["recipe"] = self.recipe
        if self.requires:
            out["requires"] = {role: {"config": need.config.to_dict(), "evals": list(need.evals)}
                               for role, need in self.requires.items()}
        return out

    @property
    def hash(self) -> str:
        return config_hash(self.to_dict())

    @property
    def name(self) -> str:
        """The run's folder name: `<method>-<12 hex digits>`."""
        return f"{self.method}-{self.hash}"

    def folder(self, outputs: str | Path) -> Path:
        return Path(outputs) / "runs" / self.name

    def build_method_config(self):
        return config_from_record(self.method, self.method_config)

    def build_method(self):
        """The method, freshly initialised from this config (seed torch first)."""
        return registry[self.method][0](self.build_method_config())

    def train_config(self) -> TrainConfig | None:
        return None if self.train is None else build_from_record(TrainConfig, self.train, "train config")


@dataclass(frozen=True)
class Run:
    """One run of a suite: its grid cell, seed and resolved config."""
    spec: RunSpec
    seed: int
    config: RunConfig

    @property
    def name(self) -> str:
        return self.config.name


def build_from_record(config_cls: type, record: dict, where: str):
    return build_config(config_cls, config_values(config_cls, record, where), where=where)


def config_from_record(method: str, record: dict):
    """The method's config from the identity record of a run (config.json)."""
    if method not in registry:
        raise unknown("method", method, registry)
    return build_from_record(registry[method][1], record, f"method {method!r}")


# ---- resolving a grid cell -----------------------------------------------------------------
def deep_merge(base: dict, *updates: dict) -> dict:
    out = dict(base)
    for update in updates:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = deep_merge(out[key], value)
            else:
                out[key] = value
    return out


def data_descriptor(profile: RunProfile, data: str | None, check: bool = True) -> dict:
    """The run's data as its identity holds it. `data` is --data (None: the profile's own);
    `check=False` describes it without looking at the folder (cost listings)."""
    if data is None and profile.data == "user":
        raise ConfigError(f"profile {profile.name!r} needs --data PATH (an ImageFolder with train/ and test/)")
    if data is None and profile.data == "synthetic":
        return {"name": "synthetic", "img_size": profile.encoder["img_size"]}
    path = Path(data).expanduser() if data else data_root() / "cifar10"   # (as check_dataset_root reads it)
    if check:
        path = check_dataset_root(path)
    return {"name": path.name, "path": str(path.resolve()), "img_size": profile.encoder["img_size"]}


def check_evaluations(method: str, evals: tuple[str, ...]) -> None:
    """Every evaluation is registered and takes what this method's runs make."""
    method_cls = registry[method][0]
    product = method_cls.product
    for name in evals:
        evaluation = get_evaluation(name)
        variant = split_name(name)[1]
        if variant and (variant not in method_cls.encoder_variants or evaluation.takes != "encoder"):
            raise ConfigError(f"evaluation {name!r}: {method} runs save no encoder {variant!r} (they save: "
                              f"{', '.join(method_cls.encoder_variants) or 'none'}); fix the RunSpec's evals")
        if evaluation.takes != product:
            raise ConfigError(f"method {method!r} cannot take the {name!r} evaluation: it evaluates a "
                              f"{evaluation.takes}, and {method} runs make a {product}; fix the RunSpec's evals")


def recipe_of(method: str, recipe: str):
    """The `methods.recipes.Recipe` a run of `method` trains with under `recipe` (None: the
    profile's shared one, also for methods that declare no paper recipe or do not train); under
    "tuned" the method's `tuned_recipe`, whose lr `resolve` adds."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    method_cls = registry[method][0]
    if not method_cls.trains or recipe == "shared":
        return None
    if recipe == "paper":
        return method_cls.paper_recipe
    return method_cls.tuned_recipe or Recipe(source="the shared recipe")


def tuned_lr(method: str, profile: RunProfile, spec_train: dict, user: dict) -> dict:
    """The blr a `tuned` run trains at: the spec's (a tuning run's), else --set's, else the
    profile's chosen one (`suites.tune`); ConfigError naming the command when there is none."""
    if "blr" in spec_train or "blr" in user.get("train", {}):
        return {}
    chosen = getattr(profile, "tuning", {}).get(method)
    if chosen is None:
        raise ConfigError(f"--recipe tuned: {method} has no tuned lr at profile {profile.name!r}; run "
                          f"`python -m suites.tune --profile {profile.name} --only {method}` first, "
                          f"or use --recipe shared")
    return {"blr": chosen["blr"]}


def resolve(spec: RunSpec, profile: RunProfile, seed: int, data: dict, recipe: str = "paper") -> RunConfig:
    """The full config of a run (what its name is the hash of) at `recipe` (methods.recipes:
    "paper", each method's own, "tuned", the shared one at each method's chosen lr, or "shared",
    the profile's for all). Reads no files: an evaluation's inputs are checked by
    `runs.execute.check_inputs` before anything runs."""
    if spec.method not in registry:
        raise unknown("method", spec.method, registry)
    check_evaluations(spec.method, spec.evals)
    method_cls = registry[spec.method][0]
    chosen = recipe_of(spec.method, recipe)
    # a recipe overrides the profile's encoder and train; what --set gave them is applied
    # again above it (without a recipe it is in the profile's values already: names stay)
    user = profile.user_settings if chosen else {}
    recipe_train = {**chosen.train, **tuned_lr(spec.method, profile, spec.train, user)} if recipe == "tuned" \
        and chosen else chosen.train if chosen else {}
    overrides = deep_merge({"encoder": profile.encoder}, chosen.method if chosen else {},
                           {"encoder": user.get("encoder", {})}, profile.method_defaults.get(spec.method, {}),
                           spec.overrides)
    cfg = method_config(spec.method, **overrides)
    if spec.train and not method_cls.trains:
        raise ConfigError(f"method {spec.method!r} does not train; drop the RunSpec's train overrides")
    train = build_config(TrainConfig, {**dataclasses.asdict(profile.train), **recipe_train,
                                       **user.get("train", {}), **spec.train},
                         where=f"train config of {spec.method!r} ({spec.setting})")
    if train.schedule == "wsd" and (why := method_cls.length_dependent(cfg)):
        raise ConfigError(f"{spec.method} ({spec.setting}): {why}, so it cannot train under schedule='wsd' "
                          f"(budget curves); set momentum_rule='fixed' or use --recipe shared")
    requires = {role: resolve_prerequisite(need, profile, data)
                for role, need in method_cls.prerequisites(cfg).items()}
    # the untrained baseline does not depend on the training budget: share it across profiles
    return RunConfig(method=spec.method, method_config=identity_record(cfg),
                     train=identity_record(train) if method_cls.trains else None,
                     seed=seed, data=data, requires=requires, recipe=recipe if chosen else "shared")


# encoder fields that change no initial weight: an init row leaves them at 0
NOT_INIT_FIELDS = {"drop_path": 0.0}


def init_encoder(encoder) -> dict:
    """An encoder config's fields as its initial weights see them (drop path left out)."""
    return {**dataclasses.asdict(encoder), **NOT_INIT_FIELDS}


def init_spec(config: RunConfig, profile: RunProfile, evals: tuple[str, ...] = ("knn",)) -> RunSpec:
    """The cell of a run's own initialisation: the untrained encoder of its architecture (the
    `none` cell at its encoder config, drop path left out), which its seed pairs with. Every
    method builds its encoder first after seeding (runs.execute.fit), so at the same config and
    seed this is the very encoder its training starts from (tests/test_init_rows.py). `none`
    at the profile's encoder (setting "random init") for the encoder the profile gives every
    method; "init (layer_scale 0.1)" for a paper recipe's layer scale."""
    built = config.build_method_config().encoder
    encoder = init_encoder(built)
    default = init_encoder(build_config(type(built), profile.encoder, where="the profile's encoder"))
    changed = {key: value for key, value in encoder.items() if default.get(key) != value}
    if not changed:
        return RunSpec("none", "random init", evals=evals)
    label = ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                      for key, value in sorted(changed.items()))
    return RunSpec("none", f"init ({label})", overrides={"encoder": changed}, evals=evals)


def init_config(config: RunConfig, profile: RunProfile) -> RunConfig:
    """The run `init_spec` names, at the run's seed and data (the run itself for `none`)."""
    if config.method == "none":
        return config
    return resolve(init_spec(config, profile), profile, config.seed, config.data, recipe="shared")


def resolve_prerequisite(need: Prerequisite, profile: RunProfile, data: dict) -> Requirement:
    """A prerequisite's config comes from the method's hook alone (plus data and the
    profile's shared training recipe with the hook's train overrides), not from the profile's
    encoder or method defaults: BEiT runs of both recipes share one tokenizer."""
    budget = dataclasses.replace(profile, encoder={}, method_defaults={})
    spec = RunSpec(need.method, "prerequisite", need.overrides, tuple(need.evals), need.train)
    return Requirement(resolve(spec, budget, need.seed, data, recipe="shared"), spec.evals)
