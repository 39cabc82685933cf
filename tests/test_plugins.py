"""Methods and evaluations from outside the package (runs.plugins): the README's files, copied to a
folder outside the checkout, run through the command line with --plugins, and their runs' records
name them; a plugin that fails is one line; entry points and MIMBENCH_PLUGINS; the project's
registry-driven tests hold with a plugin registered for the whole process; `python -m suites.pin`
adds missing pins and changes none."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from test_methods import readme_snippet

PIN_FILE = ROOT / "tests" / "data" / "run_names.json"


def user_folder(tmp_path: Path) -> Path:
    """A new user's folder outside the checkout, holding the README's two files as they stand."""
    folder = tmp_path / "my_project"
    folder.mkdir()
    (folder / "my_method.py").write_text(readme_snippet("Adding a method"))
    (folder / "centroid.py").write_text(readme_snippet("Adding an evaluation"))
    assert ROOT not in folder.resolve().parents
    return folder


def run_command(folder: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m suites.run ...` as the README writes it, run in the user's folder (mimbench on
    the path, as the .venv's editable install puts it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MIMBENCH_PLUGINS", None)       # (a plugin this test process was given would load twice)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "suites.run", *args, "--no-progress"], capture_output=True,
                          text=True, cwd=folder, env=env, timeout=600)


def records(outputs: Path, method: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(outputs.glob(f"runs/{method}-*/result.json"))]


def untracked_files() -> set[str]:
    """The checkout's untracked files that a run could write (records, tables, weights, caches:
    anything but source, which the people editing this tree beside the test may add meanwhile)."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], capture_output=True, text=True,
                         cwd=ROOT).stdout
    return {line[3:] for line in out.splitlines() if line.startswith("??") and not line.endswith(".py")}


# ---- the README's files through the command line ----------------------------------------------
@pytest.mark.slow
def test_the_readme_method_and_evaluation_run_from_outside_in_compare_methods(tmp_path):
    folder = user_folder(tmp_path)
    pins, untracked = PIN_FILE.read_bytes(), untracked_files()
    out = run_command(folder, "compare_methods", "--profile", "smoke", "--plugins", "my_method.py",
                      "--plugins", "centroid.py", "--only", "mymethod,none")
    assert out.returncode == 0, out.stderr
    # no paper recipe: one line says it runs under shared
    assert [line for line in out.stderr.splitlines() if line.startswith("warning: mymethod")] == [
        "warning: mymethod (plugin my_method.py) declares no paper recipe: --recipe paper trains it under the "
        "shared recipe and labels its rows shared (set MyMethod.paper_recipe = methods.recipes.Recipe(train=..., "
        "method=..., source=...) to give it one)"]
    mine = records(folder / "outputs", "mymethod")
    assert len(mine) == 2 and all(record["status"] == "done" for record in mine)    # epochs- and FLOPs-matched
    for record in mine + records(folder / "outputs", "none"):
        plugins = {plugin["given"]: plugin for plugin in record["provenance"]["plugins"]}
        assert plugins["my_method.py"]["methods"] == ["mymethod"]
        assert plugins["my_method.py"]["module"] == "mimbench_plugin_my_method"
        assert plugins["my_method.py"]["file"] == str((folder / "my_method.py").resolve())
        assert plugins["my_method.py"]["sha256"] == __import__("hashlib").sha256(
            (folder / "my_method.py").read_bytes()).hexdigest()
        assert plugins["centroid.py"]["evaluations"] == ["centroid"]
        assert record["metrics"]["centroid_top1_cls"] > 10 and record["evals"]["centroid"]["details"] == {"classes": 10}
        assert "knn_top1_cls" in record["metrics"] and "seg_miou" in record["metrics"]
    assert all(record["config_hash"] not in json.dumps(record["provenance"]) for record in mine)
    table = (folder / "outputs" / "suites" / "compare_methods" / "smoke" / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| mymethod")]
    assert len(rows) == 2 and all("| shared " in row for row in rows)
    assert "| 2 epochs " in rows[0] and "MAE's FLOPs" in rows[1]
    index = json.loads((folder / "outputs" / "suites" / "compare_methods" / "smoke" / "runs.json").read_text())
    # every cell, but the init rows of the paper recipes' layer scale (k-NN and linear only)
    assert all("centroid" in entry["evals"] for entry in index["runs"] if not entry["setting"].startswith("init ("))
    assert {entry["setting"] for entry in index["runs"] if entry["method"] == "none"} == \
        {"random init", "init (layer_scale 0.1)"}
    assert PIN_FILE.read_bytes() == pins and untracked_files() <= untracked     # the checkout as it was


@pytest.mark.slow
def test_the_readme_method_runs_its_declared_cells_with_only_in_ablation_masking(tmp_path):
    folder = user_folder(tmp_path)
    out = run_command(folder, "ablation_masking", "--profile", "smoke", "--plugins", "my_method.py",
                      "--only", "mymethod,none")
    assert out.returncode == 0, out.stderr
    assert "[3/3]" in out.stdout and "mymethod block 0.6 seed 0" in out.stdout
    table = (folder / "outputs" / "suites" / "ablation_masking" / "smoke" / "table.md").read_text()
    assert [line.split("|")[2].strip() for line in table.splitlines() if line.startswith("| mymethod")] == [
        "random 0.6", "block 0.6"]
    assert {record["provenance"]["plugins"][0]["methods"][0] for record in records(folder / "outputs", "mymethod")} \
        == {"mymethod"}


@pytest.mark.slow
def test_the_readme_method_takes_part_in_every_suite_that_compares_methods(tmp_path):
    """--dry-run: compare_methods twice, ablation_targets once at its defaults, ablation_masking
    at its declared cells, and ablation_mae_decoder (MAE's decoder) not at all, with the fix."""
    folder = user_folder(tmp_path)
    expected = {"compare_methods": ["2 epochs", "MAE's FLOPs (1.61 ep)"], "ablation_masking": ["random 0.6", "block 0.6"],
                "ablation_targets": ["default"]}
    for suite, settings in expected.items():
        out = run_command(folder, suite, "--profile", "smoke", "--plugins", "my_method.py", "--only", "mymethod",
                          "--dry-run")
        assert out.returncode == 0, out.stderr
        shown = [line.split(" seed ")[0].split(None, 1)[1].strip() for line in out.stdout.splitlines()
                 if line.startswith("  mymethod")]
        assert shown == settings, (suite, out.stdout)
    out = run_command(folder, "ablation_mae_decoder", "--profile", "smoke", "--plugins", "my_method.py",
                      "--only", "mymethod", "--dry-run")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "not in suite 'ablation_mae_decoder'" in out.stderr and "MyMethod.suite_cells['ablation_mae_decoder']" in out.stderr


# ---- bad input: one line naming the plugin -------------------------------------------------------
@pytest.mark.parametrize("content,message", [
    ("import no_such_package_here\n", "plugin '{path}' (--plugins) failed to import: ModuleNotFoundError: "
                                      "No module named 'no_such_package_here' (at broken.py:1)"),
    ("x = 1\ndef f(:\n", "plugin '{path}' (--plugins) failed to import: SyntaxError: invalid syntax"),
    ("from methods.registry import register_method\nfrom methods.pixel import PixelConfig, PixelRegression\n"
     "register_method('mae', PixelConfig)(PixelRegression)\n",
     "plugin '{path}' (--plugins) failed to import: ValueError: method 'mae' is already registered (by MAE) "
     "(at broken.py:3)"),
])
def test_a_plugin_file_that_fails_to_import_is_one_line_naming_it_and_exit_code_2(tmp_path, capsys, content, message):
    from suites.run import cli

    path = tmp_path / "broken.py"
    path.write_text(content)
    assert cli(["ablation_masking", "--profile", "smoke", "--dry-run", "--plugins", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(path=path)) and err.count("\n") == 1, err
    assert "mimbench_plugin_broken" not in sys.modules


@pytest.mark.parametrize("given,env,message", [
    ("no_such_plugin_module", None, "plugin 'no_such_plugin_module' (--plugins): no module named "
                                    "'no_such_plugin_module'; pass an importable module name"),
    ("/nonexistent/my_method.py", None, "plugin '/nonexistent/my_method.py' (--plugins): not found; pass a .py file"),
    (None, "no_such_plugin_module", "plugin 'no_such_plugin_module' (MIMBENCH_PLUGINS): no module named"),
])
def test_a_plugin_that_is_not_there_is_one_line_with_the_fix(monkeypatch, capsys, given, env, message):
    from suites.run import cli

    monkeypatch.setenv("MIMBENCH_PLUGINS", env) if env else monkeypatch.delenv("MIMBENCH_PLUGINS", raising=False)
    assert cli(["ablation_masking", "--profile", "smoke", "--dry-run"] + (["--plugins", given] if given else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message) and err.count("\n") == 1, err


def test_only_naming_a_method_nobody_registered_says_to_load_it(capsys):
    from suites.run import cli

    assert cli(["compare_methods", "--profile", "smoke", "--dry-run", "--only", "nosuchmethod,none"]) == 2
    err = capsys.readouterr().err
    assert "--only names 'nosuchmethod', not in suite 'compare_methods'" in err and "--plugins PATH" in err
    assert err.count("\n") == 1


@pytest.mark.slow
def test_a_bad_suite_cells_declaration_is_one_line_naming_the_method_and_the_suite(tmp_path):
    folder = user_folder(tmp_path)
    source = (folder / "my_method.py").read_text()
    (folder / "my_method.py").write_text(source.replace('{"ablation_masking": {', '{"ablation_mask": {'))
    out = run_command(folder, "ablation_masking", "--profile", "smoke", "--plugins", "my_method.py", "--dry-run")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert ("error: method 'mymethod' (mimbench_plugin_my_method.MyMethod.suite_cells) names suite 'ablation_mask', "
            "which does not exist; suites: ablation_masking") in out.stderr


# ---- other ways in: MIMBENCH_PLUGINS, entry points ---------------------------------------------
@pytest.mark.slow
def test_an_installed_entry_point_and_mimbench_plugins_load_before_the_suite_is_planned(tmp_path):
    """An installed package's `mimbench.plugins` entry point (its version recorded) and a file in
    MIMBENCH_PLUGINS, both without --plugins."""
    folder = user_folder(tmp_path)
    site = tmp_path / "site"
    (site / "ep_methods").mkdir(parents=True)
    (site / "ep_methods" / "__init__.py").write_text(
        "from methods.pixel import PixelConfig, PixelRegression\nfrom methods.registry import register_method\n\n"
        "@register_method('epmethod', PixelConfig)\nclass EpMethod(PixelRegression):\n    paper_recipe = None\n")
    dist = site / "ep_methods-1.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-methods\nVersion: 1.2\n")
    (dist / "entry_points.txt").write_text("[mimbench.plugins]\nep = ep_methods\n")
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(site)]),
           "MIMBENCH_PLUGINS": str(folder / "centroid.py")}
    out = run_command(folder, "ablation_targets", "--profile", "smoke", "--only", "epmethod", "--dry-run",
                      env_extra=env)
    assert out.returncode == 0, out.stderr
    assert [line.split()[:2] for line in out.stdout.splitlines() if line.startswith("  epmethod")] == [
        ["epmethod", "default"]]
    script = ("from runs.plugins import load_plugins; from runs.execute import provenance; import json; "
              "load_plugins(); print(json.dumps(provenance()['plugins']))")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=folder,
                           env={**os.environ, **env}, timeout=300)
    assert shown.returncode == 0, shown.stderr
    entry, centroid = json.loads(shown.stdout)
    assert (entry["module"], entry["version"], entry["methods"]) == ("ep_methods", "1.2", ["epmethod"])
    assert entry["via"] == "entry point 'ep' of ep-methods"
    assert (centroid["via"], centroid["evaluations"], centroid["version"]) == ("MIMBENCH_PLUGINS", ["centroid"], None)


def test_records_written_without_plugins_have_no_plugins_entry(monkeypatch):
    from runs import plugins
    from runs.execute import provenance

    monkeypatch.setattr(plugins, "loaded", {})
    assert "plugins" not in provenance()


# ---- the project's tests with a plugin registered for the whole process -------------------------
# the tests that iterate the registry, where a plugin's method or evaluation shows up: its own
# parametrised cases, the rules the project holds its own methods to, the pins (at smoke: the
# other profiles' grids are the same code, minutes longer)
REGISTRY_DRIVEN = [
    "tests/test_methods.py", "tests/test_run_identity.py", "tests/test_recipes.py", "tests/test_eval_suite.py",
    "-k", "mymethod or centroid or readme or registry_lists or unknown_and_duplicate or pins_cover or round_trips "
          "or (keeps_its_folder_name and smoke) or (tokenizer_run_keeps and smoke)",
]


@pytest.mark.slow
def test_the_registry_driven_tests_pass_with_the_readme_method_registered_for_the_whole_process(tmp_path):
    """MIMBENCH_PLUGINS names the README's method and evaluation; they are loaded before pytest
    collects, so every test parametrised over the registry sees them; the checkout stays as it was."""
    folder = user_folder(tmp_path)
    pins, untracked = PIN_FILE.read_bytes(), untracked_files()
    script = ("import sys; from runs.plugins import load_plugins; assert load_plugins(); import pytest; "
              f"sys.exit(pytest.main(['-v', '-x', '-p', 'no:cacheprovider', *{REGISTRY_DRIVEN!r}]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "MIMBENCH_PLUGINS": os.pathsep.join([str(folder / "my_method.py"), str(folder / "centroid.py")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "[mymethod-smoke]" in out.stdout and "[centroid]" in out.stdout      # the plugins' own cases ran
    assert PIN_FILE.read_bytes() == pins and untracked_files() <= untracked


# ---- pins --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_pin_command_adds_missing_pins_and_changes_none(tmp_path, capsys):
    from suites.pin import main

    pinned = json.loads(PIN_FILE.read_text())
    missing = json.loads(json.dumps(pinned))
    del missing["runs"]["smoke"]["ablation_masking"][3]           # a cell of a method, as if added since
    del missing["runs"]["cpu"]["ablation_targets"]                # a suite, as if added since
    del missing["evaluation_configs"]["gpu"]["linear"]
    path = tmp_path / "run_names.json"
    path.write_text(json.dumps(missing, indent=1, sort_keys=True))
    assert main(["--file", str(path)]) == 0
    assert path.read_bytes() == PIN_FILE.read_bytes()             # back as committed, nothing else changed
    assert "pinned 20 new name(s)" in capsys.readouterr().out
    assert main(["--file", str(path)]) == 0 and "unchanged" in capsys.readouterr().out

    renamed = json.loads(json.dumps(pinned))
    renamed["runs"]["smoke"]["compare_methods"][2][3] = "pixel-000000000000"
    path.write_text(json.dumps(renamed, indent=1, sort_keys=True))
    before = path.read_bytes()
    assert main(["--file", str(path)]) == 1
    assert path.read_bytes() == before
    err = capsys.readouterr().err
    assert "compare_methods at smoke: pixel '2 epochs' seed 0 would be renamed pixel-000000000000 -> pixel-" in err
