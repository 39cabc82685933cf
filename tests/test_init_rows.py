"""Each trained encoder against its own initialisation: the init row of a cell is the untrained
encoder of its architecture and seed (runs.identity.init_spec), it is in the grid when no cell
has it, and every index entry names the run it pairs with (`init_run`)."""
import json

import pytest
import torch

from methods.registry import pretraining_methods
from runs.identity import RunSpec, data_descriptor, init_config, init_spec, resolve
from suites.plan import grid_runs
from suites.profiles import get_profile
from suites.run import cli


def encoder_at_init(config):
    """The encoder a run's training starts from (runs.execute.fit seeds, then builds the method)."""
    torch.manual_seed(config.seed)
    return config.build_method().export_encoder().state_dict()


@pytest.mark.parametrize("recipe", ["paper", "shared"])
@pytest.mark.parametrize("method", pretraining_methods())
def test_the_init_row_is_the_encoder_the_cell_starts_from(method, recipe):
    profile = get_profile("smoke")
    data = data_descriptor(profile, None)
    config = resolve(RunSpec(method), profile, seed=1, data=data, recipe=recipe)
    init = init_config(config, profile)
    assert init.method == "none" and init.seed == 1
    trained, untrained = encoder_at_init(config), encoder_at_init(init)
    assert trained.keys() == untrained.keys()
    for name, tensor in trained.items():
        assert torch.equal(tensor, untrained[name]), (method, recipe, name)
    # another seed is another init
    other = init_config(resolve(RunSpec(method), profile, seed=2, data=data, recipe=recipe), profile)
    assert other.name != init.name


def test_a_paper_layer_scale_gets_its_own_init_row_and_the_shared_recipe_none():
    profile = get_profile("cpu")
    paper = grid_runs("compare_methods", "cpu", 2, None, check_data=False, recipe="paper")
    inits = {(run.spec.setting, run.seed): run for run in paper if run.spec.method == "none"}
    assert set(inits) == {("random init", 0), ("random init", 1), ("init (layer_scale 0.1)", 0),
                          ("init (layer_scale 0.1)", 1)}
    for run in paper:
        if run.spec.method == "none":
            continue
        init = init_config(run.config, profile)
        expected = "init (layer_scale 0.1)" if run.spec.method in ("pixel", "beit") else "random init"
        assert init.name == inits[(expected, run.seed)].name, (run.spec.method, run.spec.setting)
    assert inits[("init (layer_scale 0.1)", 0)].spec.evals == ("knn", "linear")
    shared = grid_runs("compare_methods", "cpu", 2, None, check_data=False, recipe="shared")
    assert [run.spec.setting for run in shared if run.spec.method == "none"] == ["random init"] * 2
    for run in shared:
        assert init_config(run.config, profile).name == \
            next(r.name for r in shared if r.spec.method == "none" and r.seed == run.seed)


def test_the_drop_path_changes_no_init():
    profile = get_profile("smoke")
    data = data_descriptor(profile, None)
    config = resolve(RunSpec("mae", overrides={"encoder": {"drop_path": 0.1}}), profile, 0, data, "shared")
    assert init_spec(config, profile).setting == "random init"


def test_the_index_names_each_runs_init_run(tmp_path):
    args = ["compare_methods", "--profile", "smoke", "--recipe", "paper", "--seeds", "1", "--curve", "2ep",
            "--evals", "knn", "--only", "pixel,none", "--no-progress", "--outputs", str(tmp_path)]
    assert cli(args) == 0
    index = json.loads((tmp_path / "suites" / "compare_methods" / "smoke-curve-paper" / "runs.json").read_text())
    by_setting = {entry["setting"]: entry for entry in index["runs"]}
    init = by_setting["init (layer_scale 0.1)"]
    assert init["init_run"] == init["run_dir"].split("/")[-1]
    [pixel] = [entry for entry in index["runs"] if entry["method"] == "pixel"]
    assert pixel["init_run"] == init["init_run"]
    assert pixel["collapsed"] is None and by_setting["random init"]["collapsed"] is None    # finished, judged
    assert "collapsed" not in next(entry for entry in index["runs"] if entry["method"] == "mae")   # not run
    assert json.loads((tmp_path / "runs" / init["init_run"] / "result.json").read_text())["status"] == "done"
