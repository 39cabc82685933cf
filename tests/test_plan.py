"""A suite's plan (runs.plan): every run folder's state read once per command, and handed to
whatever prints, costs, indexes or runs the suite."""
from collections import Counter
from pathlib import Path

import pytest

import reports.tables  # noqa: F401  (the table's own read of each record is not counted: imported first)
import runs.records
from runs.records import RunRecord, write_record
from suites.plan import suite_plan
from suites.profiles import get_profile
from suites.run import cli

SMOKE = ["--profile", "smoke", "--seeds", "1", "--no-progress", "--recipe", "shared"]


@pytest.fixture
def record_reads(monkeypatch):
    """How often each run folder's result.json is read (through runs.records, the one reader)."""
    reads = Counter()
    read = runs.records.read_record

    def counted(run_dir):
        reads[Path(run_dir).name] += 1
        return read(run_dir)

    monkeypatch.setattr(runs.records, "read_record", counted)
    return reads


def test_one_command_reads_each_runs_record_once(tmp_path, record_reads, capsys):
    outputs = str(tmp_path)
    assert cli(["ablation_targets", *SMOKE, "--only", "mae", "--outputs", outputs]) == 0   # trains the mae cells
    plan = suite_plan("ablation_targets", "smoke", get_profile("smoke"), "shared", tmp_path, 1, None, None)
    grid = {run.name for run in plan.grid} | {need.config.name for run in plan.grid
                                               for need in run.config.requires.values()}
    for command in (["--dry-run"], ["--table-only"], ["--only", "mae"]):
        record_reads.clear()
        assert cli(["ablation_targets", *SMOKE, *command, "--outputs", outputs]) == 0, command
        assert set(record_reads) == grid and set(record_reads.values()) == {1}, (command, record_reads)
    done = [run for run in plan.runs if run.spec.method == "mae"]
    assert done and all(plan.state(run).done for run in done)
    assert "(done)" in capsys.readouterr().out       # the run loop skips what the plan found finished


def test_the_plan_labels_each_run_as_dry_run_prints_it(tmp_path):
    profile = get_profile("smoke")
    plan = suite_plan("ablation_targets", "smoke", profile, "shared", tmp_path, 1, "mae", None)
    assert {plan.state(run).label for run in plan.runs} == {"to run"}
    assert len(plan.runs) < len(plan.grid)           # --only runs part; the index lists the grid
    first = plan.runs[0]
    record = RunRecord(status="failed", method="mae", seed=0, config_hash=first.config.hash, error="boom")
    first.config.folder(tmp_path).mkdir(parents=True)
    write_record(first.config.folder(tmp_path), record)
    again = suite_plan("ablation_targets", "smoke", profile, "shared", tmp_path, 1, "mae", None)
    assert again.state(first).label == "failed" and plan.state(first).label == "to run"   # read when made
