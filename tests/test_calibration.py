"""This machine's FLOP/s for a --budget plan (runs.cost.calibrate): taken from what finished runs
here sustained, measured only when there are none, and never set by a measurement taken while the
machine was busy. And the FLOP counts a plan weighs its cells by, kept on disk."""
import json
import os
import shutil

import pytest

from runs import cost
from runs.cost import CALIBRATION_FILE, FLOPS_CACHE_FILE, calibrate, machine
from runs.identity import RunSpec, resolve
from runs.records import RunRecord, read_record, write_record
from suites.profiles import get_profile
from suites.run import cli

SMOKE_DATA = {"name": "synthetic", "img_size": 16}


class Machine:
    """A stand-in for this machine's load and speed: what the measurement would see."""

    def __init__(self, monkeypatch, load: float, flops_per_second: float):
        self.load, self.flops_per_second, self.measured = load, flops_per_second, 0
        monkeypatch.setattr(os, "getloadavg", lambda: (self.load, self.load, self.load))
        monkeypatch.setattr(cost, "matmul_peak", lambda: 100e9)
        monkeypatch.setattr(cost, "measure_flops_per_second", self.measure)

    def measure(self, profile, device="cpu", batch_size=64):
        self.measured += 1
        return self.flops_per_second


def planned_flops_per_second(capsys, outputs, *args) -> tuple[float, str, str]:
    """The GFLOP/s a --budget dry-run plans at, its "this machine:" line and its stderr."""
    assert cli(["compare_methods", "--profile", "smoke", "--budget", "1ep", "--dry-run", "--outputs", str(outputs),
                *args]) == 0
    out, err = capsys.readouterr()
    [line] = [line for line in out.splitlines() if line.startswith("this machine: ")]
    return float(line.split()[2]) * 1e9, line, err


def test_a_measurement_on_a_busy_machine_does_not_set_the_plans_after_it(tmp_path, monkeypatch, capsys):
    # a test run holds both cores: the steps run at 3.36 GFLOP/s where the idle machine gives 60
    Machine(monkeypatch, load=os.cpu_count() + 1.0, flops_per_second=3.36e9)
    rate, line, err = planned_flops_per_second(capsys, tmp_path)
    assert rate == pytest.approx(3.36e9, rel=0.02) and "measured now on a busy machine, not recorded" in line
    [warning] = err.strip().splitlines()
    assert warning.startswith("WARNING: 3.4 GFLOP/s measured while this machine was busy (load average")
    assert not (tmp_path / CALIBRATION_FILE).exists()

    Machine(monkeypatch, load=0.1, flops_per_second=60e9)          # idle again
    rate, line, err = planned_flops_per_second(capsys, tmp_path)
    assert 0.5 <= rate / 60e9 <= 2, line
    assert "measured now (" in line and err == ""
    idle = Machine(monkeypatch, load=0.1, flops_per_second=1e9)    # a measurement now would give this
    rate, line, _ = planned_flops_per_second(capsys, tmp_path)
    assert rate == pytest.approx(60e9, rel=0.02) and " recorded " in line and idle.measured == 0


def test_recalibrating_on_a_busy_machine_keeps_the_figure_it_had(tmp_path, monkeypatch):
    profile = get_profile("smoke")
    Machine(monkeypatch, load=0.0, flops_per_second=60e9)
    assert calibrate(profile, tmp_path).source == "measured"
    Machine(monkeypatch, load=3.0 + os.cpu_count(), flops_per_second=3e9)
    again = calibrate(profile, tmp_path, recalibrate=True)
    assert again.flops_per_second == 60e9 and again.warning.startswith("WARNING: 3.0 GFLOP/s measured while")
    assert json.loads((tmp_path / CALIBRATION_FILE).read_text())["flops_per_second"] == 60e9


def test_a_burst_of_work_during_the_measurement_makes_it_busy():
    threads = 1
    free = os.cpu_count() - threads
    assert cost.busy_reason(threads, 0.0, 0.0, 5.0, (100e9, 95e9)) is None
    assert "load average" in cost.busy_reason(threads, free + 1.0, 0.0, 5.0, (100e9, 100e9))
    # the measurement's own thread raises the 1-minute average a little: not busy for that
    assert cost.busy_reason(threads, 0.0, free + 0.5, 5.0, (100e9, 100e9)) is None
    assert "a matmul ran at 100 GFLOP/s before the steps and 30 after" in cost.busy_reason(
        threads, 0.0, 0.0, 5.0, (100e9, 30e9))


def write_run(outputs, name: str, flops_per_second: float, provenance: dict, method: str = "mae",
              batch_size: int = 64) -> None:
    """A finished smoke run's folder whose pre-training sustained `flops_per_second`."""
    config = resolve(RunSpec(method), get_profile("smoke"), 0, SMOKE_DATA).to_dict()
    config["train"]["batch_size"] = batch_size
    folder = outputs / "runs" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    flops_per_image, images_per_second = 3e7, flops_per_second / 3e7
    steps = 20
    train = {"steps": steps, "images_seen": steps * batch_size, "flops_total": flops_per_image * steps * batch_size,
             "images_per_second": images_per_second,
             "train_seconds_this_session": (steps - 2) * batch_size / images_per_second, "device": "cpu"}
    write_record(folder, RunRecord("done", method, 0, name.split("-")[-1], train=train, provenance=provenance))


def test_the_plan_takes_the_median_of_what_this_machines_finished_runs_sustained(tmp_path, monkeypatch):
    never = Machine(monkeypatch, load=0.0, flops_per_second=1e9)
    here = {"git_commit": "abc", "machine": "x86_64", **machine()}
    for name, rate in (("mae-a", 40e9), ("mae-b", 50e9), ("mae-c", 90e9)):
        write_run(tmp_path, name, rate, here)
    # records restored from results/ (runs.archive): measured elsewhere, or before records named the CPU
    write_run(tmp_path, "mae-elsewhere", 500e9, {**here, "cpu": "another CPU"})
    write_run(tmp_path, "mae-older", 500e9, {key: value for key, value in here.items() if key != "cpu"})
    write_run(tmp_path, "mae-threads", 500e9, {**here, "threads": here["threads"] + 3})
    write_run(tmp_path, "mae-batch", 500e9, here, batch_size=32)
    (tmp_path / "runs" / "mae-broken").mkdir()
    (tmp_path / "runs" / "mae-broken" / "result.json").write_text("{")
    calibration = calibrate(get_profile("smoke"), tmp_path)
    assert calibration.source == "runs" and calibration.flops_per_second == pytest.approx(50e9)
    assert "50.0 GFLOP/s from 3 finished run(s) on this machine (median" in calibration.describe()
    assert never.measured == 0
    # another profile's scale: none of them
    assert calibrate(get_profile("cpu"), tmp_path).source == "measured" and never.measured == 1


def test_a_real_run_records_the_machine_and_its_speed_then_plans_by(tmp_path, monkeypatch, capsys):
    Machine(monkeypatch, load=0.0, flops_per_second=7e9)        # (the measurement before the run)
    assert cli(["compare_methods", "--profile", "smoke", "--budget", "1ep", "--only", "mae", "--no-progress",
                "--outputs", str(tmp_path)]) == 0
    capsys.readouterr()
    [run] = [folder for folder in (tmp_path / "runs").iterdir() if folder.name.startswith("mae-")]
    record = read_record(run)
    assert {key: record.provenance[key] for key in machine()} == machine()
    figures = cost.sustained_by_runs(tmp_path, get_profile("smoke"))
    train = record.train
    assert figures == {run.name: pytest.approx(train["flops_total"] / train["images_seen"] * train["images_per_second"])}
    _, line, _ = planned_flops_per_second(capsys, tmp_path)
    assert "from 1 finished run(s) on this machine (median" in line
    assert calibrate(get_profile("smoke"), tmp_path).flops_per_second == pytest.approx(figures[run.name])

    # the same record restored on a machine with another CPU: not this machine's
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run, elsewhere / "runs" / run.name)
    data = json.loads((elsewhere / "runs" / run.name / "result.json").read_text())
    data["provenance"]["cpu"] = "another CPU"
    (elsewhere / "runs" / run.name / "result.json").write_text(json.dumps(data))
    assert calibrate(get_profile("smoke"), elsewhere).source == "measured"


# ---- FLOP counts on disk ------------------------------------------------------------------------
def fresh_process() -> None:
    """Forget what this process counted, as a new process would."""
    cost._flops_per_image.cache_clear()
    cost._encoder_forward_flops.cache_clear()
    cost._counts_on_disk.cache_clear()


def test_flop_counts_are_kept_on_disk_and_a_damaged_file_is_counted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMBENCH_CACHE", str(tmp_path))
    fresh_process()
    config = resolve(RunSpec("mae"), get_profile("smoke"), 0, SMOKE_DATA)
    counted = cost.flops_per_image("mae", config.method_config)
    assert counted > 0 and (tmp_path / FLOPS_CACHE_FILE).exists()

    def no_counting(*args, **kwargs):
        raise AssertionError("counted again")

    fresh_process()
    with monkeypatch.context() as patched:
        patched.setattr(cost, "train_flops", no_counting)
        assert cost.flops_per_image("mae", config.method_config) == counted       # read from the file

    for damage in ("{", '{"version": "other code", "counts": {}}', "[]"):
        (tmp_path / FLOPS_CACHE_FILE).write_text(damage)
        fresh_process()
        assert cost.flops_per_image("mae", config.method_config) == counted       # counted again
    assert json.loads((tmp_path / FLOPS_CACHE_FILE).read_text())["version"] == cost.counting_version()
    fresh_process()
