"""The results archive (runs.archive): finished runs' records kept in the repository outlive
the machine; restored, a suite skips them, and when their weights are needed again they are
trained again to the same bytes."""
import dataclasses
import json
from pathlib import Path

from runs import archive
from runs.execute import RunOptions, execute
from runs.plan import plan_of
from suites.plan import select_runs as plan
from suites.profiles import get_profile
from suites.run import cli

SMOKE = ["--profile", "smoke", "--seeds", "1", "--no-progress", "--recipe", "shared"]
BEIT = "beit:tokens, block 0.4"

QUIET = RunOptions(progress=False)


def stamps(outputs: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (outputs / "runs").glob("*/result.json")}


def test_a_fresh_outputs_folder_restored_from_the_archive_runs_nothing_and_reports_the_same_table(tmp_path, capsys):
    first, fresh, results = tmp_path / "first", tmp_path / "fresh", tmp_path / "results"
    suite = ["ablation_targets", *SMOKE, "--only", "none,mae:norm. pixels, random 0.75"]
    assert cli([*suite, "--outputs", str(first)]) == 0
    assert archive.main(["save", "--outputs", str(first), "--archive", str(results)]) == 0
    assert "archived 2 finished run(s) (2 new or changed) and 1 suite index(es)" in capsys.readouterr().out
    kept = sorted(str(p.relative_to(results)) for p in results.rglob("*") if p.is_file())
    assert kept == sorted([f"runs/{name}/{file}" for name in stamps(first) for file in archive.RUN_FILES
                           if (first / "runs" / name / file).exists()] +      # none trains: no metrics.jsonl
                          ["suites/ablation_targets/smoke/runs.json"])       # no weights, no caches

    assert archive.main(["restore", "--outputs", str(fresh), "--archive", str(results)]) == 0
    restored = stamps(fresh)
    assert cli([*suite, "--outputs", str(fresh)]) == 0
    assert stamps(fresh) == restored, "a restored run ran again"
    assert not list(fresh.glob("runs/*/encoder.safetensors"))
    table = "suites/ablation_targets/smoke/table.md"
    assert (fresh / table).read_text() == (first / table).read_text()
    # saving again changes nothing; restoring again leaves the finished records alone
    assert archive.save(first, results) == {"runs": 2, "changed": 0, "indexes": 0, "kept": 0}
    again = archive.restore(results, fresh)
    assert (again.runs, again.indexes) == (0, 0) and stamps(fresh) == restored


def test_a_restored_run_asked_for_a_new_evaluation_trains_its_weights_again_to_the_same_bytes(tmp_path):
    first, fresh, results = tmp_path / "first", tmp_path / "fresh", tmp_path / "results"
    profile = get_profile("smoke")
    [run] = plan("ablation_targets", "smoke", 1, BEIT, None, recipe="shared")    # needs BEiT's tokenizer
    execute(run, profile, first, QUIET)
    archive.save(first, results)
    archive.restore(results, fresh)
    knn = json.loads((fresh / "runs" / run.name / "result.json").read_text())["evals"]["knn"]

    wider = dataclasses.replace(run, spec=dataclasses.replace(run.spec, evals=("knn", "linear")))
    record = execute(wider, profile, fresh, QUIET)
    assert set(record.evals) == {"knn", "linear"} and dataclasses.asdict(record.evals["knn"]) == knn
    [tokenizer] = [p.name for p in (first / "runs").glob("dvae-*")]
    for folder, file in ((run.name, "encoder.safetensors"), (tokenizer, "tokenizer.safetensors")):
        again = (fresh / "runs" / folder / file).read_bytes()          # the tokenizer was trained again too
        assert again == (first / "runs" / folder / file).read_bytes(), f"{folder}/{file} differs"


def test_restoring_never_overwrites_a_finished_record_and_save_needs_run_folders(tmp_path, capsys):
    first, results = tmp_path / "first", tmp_path / "results"
    assert cli(["ablation_targets", *SMOKE, "--only", "none", "--outputs", str(first)]) == 0
    archive.save(first, results)
    [record] = (results / "runs").glob("*/result.json")
    edited = json.loads(record.read_text())
    edited["metrics"]["knn_top1_cls"] = -1.0
    record.write_text(json.dumps(edited))
    assert archive.restore(results, first).runs == 0
    assert json.loads((first / "runs" / record.parent.name / "result.json").read_text())["metrics"]["knn_top1_cls"] >= 0
    assert archive.main(["save", "--outputs", str(tmp_path / "nowhere"), "--archive", str(results)]) == 2
    err = capsys.readouterr().err
    assert "nowhere/runs not found" in err and len(err.strip().splitlines()) == 1


def test_a_restored_prerequisite_gets_its_own_slurm_job_and_the_dry_run_counts_the_retraining(tmp_path):
    from filelock import FileLock

    from runs import slurm
    from runs.cost import plan_seconds
    first, fresh, results = tmp_path / "first", tmp_path / "fresh", tmp_path / "results"
    profile = get_profile("smoke")
    [run] = plan("ablation_targets", "smoke", 1, BEIT, None, recipe="shared")
    execute(run, profile, first, QUIET)
    archive.save(first, results)
    archive.restore(results, fresh)
    wider = dataclasses.replace(run, spec=dataclasses.replace(run.spec, evals=("knn", "linear")))

    jobs = slurm.plan_jobs(plan_of([wider], profile, fresh), RunOptions(device=None, progress=False))
    assert [job.task.prerequisites_only for job in jobs] == [True, False] and jobs[1].after == 0
    per_run, prerequisites, _ = plan_seconds(plan_of([wider], profile, fresh), 1e9)
    assert set(per_run[run.name]) == {"pre-train", "linear"} and len(prerequisites) == 1
    assert set(plan_seconds(plan_of([run], profile, fresh), 1e9)[0][run.name]) == set()   # knn is done: nothing to train

    record = execute(wider, profile, fresh, QUIET)
    archived = json.loads((results / "runs" / run.name / "result.json").read_text())["train"]
    assert {key: record.train[key] for key in archived} == archived       # what knn was measured on
    assert record.train["retrained"]["steps"] == archived["steps"]

    # a restore never writes into a folder a process is training in
    (fresh / "runs" / run.name / "result.json").unlink()
    with FileLock(str(fresh / "runs" / run.name / ".lock")):
        assert archive.restore(results, fresh).runs == 0
    assert archive.restore(results, fresh).runs == 1


def test_runs_measured_on_a_dataset_folder_elsewhere_are_relocated_to_the_same_files_here(tmp_path, monkeypatch,
                                                                                           capsys):
    import shutil

    from bench.data import make_jpeg_folder
    there, here = tmp_path / "there" / "datasets", tmp_path / "here" / "datasets"
    make_jpeg_folder(there / "tiny" / "train", num_classes=2, per_class=64, min_px=20, max_px=40)
    make_jpeg_folder(there / "tiny" / "test", num_classes=2, per_class=4, min_px=20, max_px=40, seed=1)
    first, fresh, results = tmp_path / "first", tmp_path / "fresh", tmp_path / "results"
    suite = ["ablation_targets", *SMOKE, "--only", "none,mae:norm. pixels, random 0.75"]
    assert cli([*suite, "--data", str(there / "tiny"), "--outputs", str(first)]) == 0
    archive.save(first, results)
    shutil.copytree(there, here)
    shutil.rmtree(there)                    # the measuring machine's folder is not on this one
    monkeypatch.setenv("MIMBENCH_DATA", str(here))

    assert archive.main(["restore", "--outputs", str(fresh), "--archive", str(results)]) == 0
    out = capsys.readouterr().out
    assert f"runs measured on {there / 'tiny'} are relocated to {here / 'tiny'}" in out
    assert len(stamps(fresh)) == 2 and set(stamps(fresh)).isdisjoint(stamps(first))     # renamed
    restored = stamps(fresh)
    assert cli([*suite, "--data", str(here / "tiny"), "--outputs", str(fresh)]) == 0
    assert stamps(fresh) == restored, "a relocated run ran again"
    table = "suites/ablation_targets/smoke/table.md"
    assert (fresh / table).read_text() == (first / table).read_text()

    # a folder of that name with other files is not taken for it: the runs keep their names
    other = tmp_path / "other"
    (here / "tiny" / "test" / "class_0" / "extra.jpg").parent.mkdir(parents=True, exist_ok=True)
    (here / "tiny" / "test" / "class_0" / "extra.jpg").write_bytes(b"not the measured data")
    assert archive.main(["restore", "--outputs", str(other), "--archive", str(results)]) == 0
    assert "holds other files" in capsys.readouterr().out
    assert set(stamps(other)) == set(stamps(first))


def test_saving_never_drops_an_evaluation_the_archive_holds(tmp_path, capsys):
    """A run made again here before its record was restored, asked for fewer evaluations: the
    archived record, which holds more, stays as it is."""
    from runs.records import EvalRecord, RunRecord, read_record, write_record
    outputs, results = tmp_path / "outputs", tmp_path / "results"
    here, archived = outputs / "runs" / "none-000000000000", results / "runs" / "none-000000000000"
    knn = EvalRecord(config={}, metrics={"knn_top1_cls": 34.16})
    linear = EvalRecord(config={}, metrics={"linear_top1_cls": 44.27})
    for folder, evals in ((here, {"knn": knn}), (archived, {"knn": knn, "linear": linear})):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        write_record(folder, RunRecord(status="done", method="none", seed=0, config_hash="0" * 12, evals=evals,
                                       train={"steps": 0}))
    counts = archive.save(outputs, results)
    assert counts["kept"] == 1 and counts["runs"] == 0
    assert set(read_record(archived).evals) == {"knn", "linear"}
    assert "lacks linear" in capsys.readouterr().out
