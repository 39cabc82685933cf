"""A finished run must never be lost to a code change: its folder name (the hash of its
resolved config) is pinned here for every cell of every suite at the cpu, smoke and gpu
profiles, with the names the code printed before the run layer moved to runs/ (tests/data/
run_names.json, from `python -m suites.run SUITE --profile P --dry-run` at commit 367d41d).
`python -m suites.pin` adds the pins of new runs and never changes one; the project's own
methods are pinned, a method from outside (a plugin) needs no pin."""
import dataclasses
import json
from dataclasses import dataclass

import pytest

from conftest import ROOT
from core.config import ConfigError, late_field
from core.files import config_hash
from methods import registry
from methods.beit import BEiTConfig
from methods.registry import from_project
from runs.identity import config_from_record, config_values, identity_record, resolve
from runs.state import eval_config_dict
from suites.plan import grid_specs
from suites.profiles import get_profile
from suites.registry import SUITES

PINNED = json.loads((ROOT / "tests" / "data" / "run_names.json").read_text())
PROFILES = ("cpu", "smoke", "gpu")


def data_of(profile):
    """The data descriptor the names were made with: the shipped CIFAR-10 where it sat then
    (a run's identity holds its data's resolved path, so the pins name that path)."""
    if profile.data == "synthetic":
        return {"name": "synthetic", "img_size": profile.encoder["img_size"]}
    return {"name": "cifar10", "path": PINNED["data_path"], "img_size": profile.encoder["img_size"]}


def grid_runs(suite: str, profile_name: str) -> list:
    """The grid's runs of the project's own methods (a plugin's need no pin)."""
    profile = get_profile(profile_name)
    return [(spec, seed, resolve(spec, profile, seed, data_of(profile), recipe="shared"))
            for spec in grid_specs(suite, profile, "shared") if from_project(spec.method)
            for seed in range(profile.seeds)]


PIN_COMMAND = "run `python -m suites.pin` (it adds missing pins, changes none) and commit tests/data/run_names.json"


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("suite", SUITES)
def test_every_run_of_every_grid_keeps_its_folder_name(suite, profile):
    names = [[spec.method, spec.setting, seed, config.name] for spec, seed, config in grid_runs(suite, profile)]
    pinned = PINNED["runs"][profile].get(suite, [])
    missing = [row for row in names if row[:3] not in [pin[:3] for pin in pinned]]
    assert not missing, (f"no pinned name for {len(missing)} run(s) of {suite} at {profile}, the first "
                         f"{missing[0][0]} {missing[0][1]!r} seed {missing[0][2]}: {PIN_COMMAND}")
    assert names == pinned


@pytest.mark.parametrize("profile", PROFILES)
def test_beits_tokenizer_run_keeps_its_folder_name(profile):
    tokenizers = {need.config.name for suite in SUITES for _, _, config in grid_runs(suite, profile)
                  for need in config.requires.values()}
    assert tokenizers == {PINNED["prerequisites"][profile]["tokenizer"]}


@pytest.mark.parametrize("profile", PROFILES)
def test_finished_evaluations_keep_their_cache_names(profile):
    budget = get_profile(profile)
    names = {name: config_hash(eval_config_dict(name, budget)) for name in PINNED["evaluation_configs"][profile]}
    assert names == PINNED["evaluation_configs"][profile]
    # the tokenizer evaluation was recorded with {"split": "test"} before it had a config class
    assert eval_config_dict("tokenizer", budget) == {"split": "test"}


def test_the_pins_cover_every_method_of_the_project():
    """A method added to the project has no pinned run yet: `python -m suites.pin` pins its
    cells as the code names them. A method from outside (a plugin) needs no pin."""
    pinned = {row[0] for suites in PINNED["runs"].values() for rows in suites.values() for row in rows}
    pinned |= {name.split("-")[0] for roles in PINNED["prerequisites"].values() for name in roles.values()}
    own = {name for name in registry if from_project(name)}
    assert own <= pinned, f"no pinned run names for: {', '.join(sorted(own - pinned))}; {PIN_COMMAND}"


def test_dry_run_prints_the_pinned_names_without_the_data(capsys):
    """--dry-run names every run (and costs it) without reading the data folder."""
    from suites.run import cli

    assert cli(["ablation_masking", "--dry-run", "--recipe", "shared", "--data", PINNED["data_path"], "--outputs", "/nonexistent"]) == 0
    printed = capsys.readouterr().out
    for _, _, _, name in PINNED["runs"]["cpu"]["ablation_masking"]:
        assert f"  {name}  [to run]" in printed


# ---- the mechanism: late and retired fields -----------------------------------------------
@dataclass(frozen=True)
class Before:
    ratio: float = 0.75


@dataclass(frozen=True)
class After:
    ratio: float = 0.75
    scale: tuple = late_field(default_factory=lambda: (0.2, 1.0))          # a default_factory field
    recipe: str = late_field("paper", identity_default="shared")            # earlier runs: "shared"


def test_a_late_field_holding_what_earlier_runs_did_leaves_their_identity_unchanged():
    assert identity_record(After(recipe="shared")) == identity_record(Before())
    assert config_hash(identity_record(After(recipe="shared"))) == config_hash(dataclasses.asdict(Before()))
    assert identity_record(After()) == {"ratio": 0.75, "recipe": "paper"}    # new runs: a new name
    assert identity_record(After(scale=(0.5, 1.0), recipe="shared")) == {"ratio": 0.75, "scale": (0.5, 1.0)}
    # a record written before the field existed rebuilds the config those runs had
    assert After(**config_values(After, identity_record(Before()), "test")) == After(recipe="shared")


def test_a_retired_field_stays_in_the_identity_and_is_dropped_when_the_config_is_rebuilt():
    record = identity_record(BEiTConfig())
    assert record["target"] == "tokens"            # BEiT's removed `target`: every run had "tokens"
    assert config_from_record("beit", record) == BEiTConfig()
    with pytest.raises(ConfigError, match="field 'target' was removed from BEiTConfig"):
        config_from_record("beit", {**record, "target": "pixels"})


def test_every_methods_default_config_round_trips_through_its_identity():
    for name, (_, config_cls) in registry.items():
        cfg = config_cls()
        assert config_from_record(name, json.loads(json.dumps(identity_record(cfg)))) == cfg, name


def test_mimbench_data_moves_the_data_root_of_cifar10_and_camvid(tmp_path, monkeypatch):
    from engine.data import DataError
    from eval.segmentation import dataset_root
    from runs.identity import data_descriptor

    monkeypatch.setenv("MIMBENCH_DATA", str(tmp_path))
    cpu = get_profile("cpu")
    assert data_descriptor(cpu, None, check=False)["path"] == str((tmp_path / "cifar10").resolve())
    with pytest.raises(DataError, match=str(tmp_path / "cifar10")):
        data_descriptor(cpu, None)
    with pytest.raises(DataError, match=f"camvid folder {tmp_path / 'camvid'} has no"):
        dataset_root(cpu.evaluations.segmentation)


# ---- --set over a recipe --------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["paper", "shared"])
def test_a_set_value_holds_over_the_recipe_and_names_another_run(recipe):
    """`--set train.blr=5e-3` trains at that blr under either recipe: the paper recipe's own blr
    (MAE: 1.5e-4) would otherwise win over the profile silently and the run keep its name."""
    from suites.profiles import override
    from runs.identity import RunSpec

    profile = get_profile("cpu")
    data = data_of(profile)
    plain = resolve(RunSpec("mae"), profile, 0, data, recipe=recipe)
    assert resolve(RunSpec("mae"), override(profile, []), 0, data, recipe=recipe).name == plain.name
    names = {plain.name}
    for blr in (5e-3, 1e-3):
        changed = resolve(RunSpec("mae"), override(profile, [f"train.blr={blr}"]), 0, data, recipe=recipe)
        assert changed.train["blr"] == blr and changed.train_config().blr == blr
        if blr != plain.train["blr"]:
            names.add(changed.name)
    assert len(names) == (3 if recipe == "paper" else 2)     # shared: 1e-3 is the profile's own blr
    # what the recipe sets and --set leaves alone stays the recipe's
    if recipe == "paper":
        changed = resolve(RunSpec("mae"), override(profile, ["train.blr=5e-3"]), 0, data, recipe=recipe)
        assert {k: v for k, v in changed.train.items() if k != "blr"} == \
               {k: v for k, v in plain.train.items() if k != "blr"}
        # a prerequisite (BEiT's tokenizer) is resolved from its hook and the shared recipe, as before
        beit = resolve(RunSpec("beit"), override(profile, ["encoder.layer_scale=0.05"]), 0, data, recipe=recipe)
        assert beit.method_config["encoder"]["layer_scale"] == 0.05        # the recipe says 0.1
        assert [need.config.name for need in beit.requires.values()] == \
               [need.config.name for need in resolve(RunSpec("beit"), profile, 0, data, recipe).requires.values()]


def test_the_dry_run_names_a_set_run_differently_under_the_default_recipe(capsys):
    from suites.run import cli

    def names(*settings) -> list[str]:
        args = [word for setting in settings for word in ("--set", setting)]
        assert cli(["ablation_mae_decoder", "--dry-run", "--only", "mae", "--seeds", "1", "--data", PINNED["data_path"],
                    "--outputs", "/nonexistent", *args]) == 0
        return [line.rsplit("  [", 1)[0].split()[-1] for line in capsys.readouterr().out.splitlines()
                if " seed " in line]

    plain, high = names(), names("train.blr=5e-3")
    assert len(plain) == len(high) > 0 and not set(plain) & set(high)
