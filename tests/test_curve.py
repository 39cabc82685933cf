"""Budget curves through the command line (`compare_methods --curve`, runs.curve): a branch's
weights are those of the standalone wsd run, a trunk and a branch resume after a kill, and the
plan costs each trunk once."""
from pathlib import Path

import pytest

from conftest import kill_at_step
from engine.views import MaskedViews
from runs.curve import Trunk
from suites.budget import parse_curve
from suites.plan import select_runs
from suites.run import cli

CURVE = ["compare_methods", "--profile", "smoke", "--recipe", "shared", "--seeds", "1", "--evals", "knn",
         "--no-progress"]


def run_curve(outputs: Path, budgets: str, only: str = "mae") -> int:
    return cli([*CURVE, "--curve", budgets, "--only", only, "--outputs", str(outputs)])


def encoder(outputs: Path, budget: float) -> bytes:
    [run] = [r for r in curve_runs(outputs) if r.spec.budget == budget]
    return (run.config.folder(outputs) / "encoder.safetensors").read_bytes()


def curve_runs(outputs: Path):
    from suites.budget import curve_runs as runs_of
    from suites.profiles import get_profile
    from runs.identity import data_descriptor
    profile = get_profile("smoke")
    return [run for run in runs_of(profile, "shared", (1.0, 2.0, 4.0), ("knn",), 1, data_descriptor(profile, None))
            if run.spec.method == "mae"]


def test_a_branch_from_the_trunk_equals_the_standalone_run_and_a_longer_curve_continues_the_trunk(tmp_path):
    curve, alone = tmp_path / "curve", tmp_path / "alone"
    assert run_curve(curve, "1,2ep") == 0
    assert run_curve(curve, "1,2,4ep") == 0               # the 4ep branch: the trunk grows on from step 16
    trunk = Trunk(curve_runs(curve)[0].config)
    assert trunk.progress(curve) == 32
    assert sorted(p.name for p in (trunk.folder(curve) / "branch-points").iterdir()) == \
        ["ckpt-00000008.pt", "ckpt-00000016.pt", "ckpt-00000032.pt"]
    # elsewhere the 4ep branch first: its trunk passes step 16 without keeping it, so the 2ep run
    # trains standalone, from step 0 to its end, and must give the branch's weights
    assert run_curve(alone, "4ep") == 0 and run_curve(alone, "2ep") == 0
    for budget in (2.0, 4.0):
        assert encoder(curve, budget) == encoder(alone, budget), budget
    import json
    [two] = [r for r in curve_runs(alone) if r.spec.budget == 2.0]
    record = json.loads((two.config.folder(alone) / "result.json").read_text())
    assert "standalone" in record["train"]["branch"]
    [two] = [r for r in curve_runs(curve) if r.spec.budget == 2.0]
    record = json.loads((two.config.folder(curve) / "result.json").read_text())
    assert record["train"]["branch"] == {"trunk": trunk.name, "from_step": 16, "decay_steps": 4}


@pytest.mark.parametrize("killed_at", [5, 17])        # inside the trunk (steps 0-16), inside the 2ep decay
def test_a_killed_trunk_or_branch_resumes_to_the_same_weights(tmp_path, monkeypatch, killed_at):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_curve(whole, "2ep") == 0
    kill_at_step(monkeypatch, MaskedViews, killed_at)
    with pytest.raises(KeyboardInterrupt):
        run_curve(killed, "2ep")
    monkeypatch.undo()
    assert run_curve(killed, "2ep") == 0
    assert encoder(whole, 2.0) == encoder(killed, 2.0)


def test_the_dry_run_costs_each_trunk_once_and_each_branch_its_decay(tmp_path, capsys):
    assert cli([*CURVE, "--curve", "1,2,4ep", "--only", "mae", "--dry-run", "--outputs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    trunks = [line for line in out.splitlines() if line.lstrip().startswith("trunk ")]
    assert len(trunks) == 1 and "still to grow" in trunks[0]
    # three branches of 10, 20, 40 steps: decays of 2, 4, 8 steps; the trunk grows to step 32
    minutes = [float(line.split("~")[1].split("min")[0]) for line in out.splitlines() if "curve " in line]
    trunk_minutes = float(trunks[0].split("~")[1].split("min")[0])
    assert minutes == sorted(minutes) and trunk_minutes == pytest.approx(2 * minutes[-1], abs=0.15)


def test_bad_curves_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(Exception, match="needs positive MAE-epochs"):
        parse_curve("0,1ep")
    assert parse_curve("5,0.5, 1ep,2.5") == (0.5, 1.0, 2.5, 5.0)
    assert cli([*CURVE, "--curve", "x", "--outputs", str(tmp_path)]) == 2
    assert cli(["ablation_masking", "--profile", "smoke", "--curve", "1ep", "--outputs", str(tmp_path)]) == 2
    # the cpu profile's 49-step warm-up does not fit before a 0.05-epoch decay
    assert cli(["compare_methods", "--curve", "0.05,1ep", "--only", "mae", "--dry-run", "--outputs",
                str(tmp_path)]) == 2
    # iBOT's paper recipe scales its teacher momentum to the run's length: refused, named, with the way out
    assert cli(["compare_methods", "--curve", "1ep", "--dry-run", "--outputs", str(tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and "inside its 49-step warm-up" in errors[2], errors
    assert "momentum_rule='scaled'" in errors[3] and "--only beit,mae,none,pixel" in errors[3], errors[3]
    assert select_runs("compare_methods", "smoke", 1, "mae", None)      # the grid without --curve is unchanged


def test_slurm_runs_the_branches_of_a_trunk_one_after_another(tmp_path, capsys):
    assert cli([*CURVE, "--curve", "1,2,4ep", "--only", "mae", "--slurm", "--dry-run", "--outputs", str(tmp_path)]) == 0
    jobs = [line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("job ")]
    assert len(jobs) == 3 and "after" not in jobs[0]
    assert jobs[1].endswith("(after job 1)") and jobs[2].endswith("(after job 2)")
