"""Parquet tables: the first write fixes the schema, new columns go last, writes are atomic."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdray.analysis import results
from kdray.analysis.results import RunResult
from kdray.spec import spec_from_dict
from kdray.training.teacher import TeacherInfo


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_table_keeps_first_schema_and_appends_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    results.write_table([{"a": 1, "b": "x", "c": 0.5}], path)
    first = pq.read_schema(path)
    assert first.names == ["a", "b", "c"]
    assert first.field("a").type == pa.int64()

    # Columns in another order, one left out, one new, a null in an int column.
    results.write_table(
        [{"new": True, "c": 1.5, "a": 2}, {"a": None, "c": 2.5, "b": "z", "new": False}], path
    )
    schema = pq.read_schema(path)
    assert schema.names == ["a", "b", "c", "new"]
    for name in ("a", "b", "c"):
        assert schema.field(name).type == first.field(name).type, name
    assert schema.field("new").type == pa.bool_()
    table = pq.read_table(path).to_pydict()
    assert table["a"] == [2, None]
    assert table["b"] == [None, "z"]
    assert table["c"] == [1.5, 2.5]
    assert table["new"] == [True, False]

    # A third write that lacks the added column still keeps it (as nulls).
    results.write_table([{"a": 3, "b": "w", "c": 0.0}], path)
    schema = pq.read_schema(path)
    assert schema.names == ["a", "b", "c", "new"]
    assert pq.read_table(path).to_pydict()["new"] == [None]


def test_write_table_fills_a_column_that_started_all_null(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    results.write_table([{"a": 1, "later": None}], path)
    results.write_table([{"a": 2, "later": 0.25}], path)
    assert pq.read_table(path).to_pydict() == {"a": [2], "later": [0.25]}


def test_write_table_never_truncates_values(tmp_path: Path) -> None:
    """A sweep rewrites its table after every trial: a sampled choice of [1, 2.5] may give an
    int column on the first write, and 2.5 must not come back as 2 later."""
    path = tmp_path / "t.parquet"
    results.write_table([{"trial_id": "a", "param.w": 1, "n": 3}], path)
    results.write_table(
        [{"trial_id": "a", "param.w": 1, "n": 3}, {"trial_id": "b", "param.w": 2.5, "n": None}],
        path,
    )
    table = pq.read_table(path).to_pydict()
    assert table["param.w"] == [1.0, 2.5]
    assert table["n"] == [3, None]
    assert pq.read_schema(path).field("n").type == pa.int64()  # lossless: type kept


def test_write_table_is_atomic(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "t.parquet"
    for i in range(3):
        results.write_table([{"i": i}], path)
        assert _files(tmp_path) == ["t.parquet"]  # no temp file left behind
    assert pq.read_table(path).to_pydict() == {"i": [2]}

    # A write that dies half-way leaves the previous table intact and no temp file.
    def broken(table, where, *args, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        results.write_table([{"i": 99}], path)
    monkeypatch.undo()
    assert _files(tmp_path) == ["t.parquet"]
    assert pq.read_table(path).to_pydict() == {"i": [2]}


def _run_result(records: list[dict], status: str = "ok") -> RunResult:
    return RunResult(
        status=status,
        metric="accuracy",
        best_metrics={"accuracy": 0.75} if records else {},
        final_metrics={"accuracy": 0.5} if records else {},
        best_epoch=1 if records else None,
        epochs_run=len(records),
        records=records,
        wall_time=1.5,
        teacher=TeacherInfo(path="/t", id="abc", dev_metrics={"accuracy": 0.8}),
        student_params=10,
        teacher_params=20,
        error=None if status == "ok" else "loss became nan",
    )


def test_write_run_and_load(tmp_path: Path) -> None:
    spec = spec_from_dict(
        {"name": "r", "task": "rte", "distill": {"algorithm": "pid", "layer_map": [2, 4]}}
    )
    records = [
        {"epoch": 1, "stage": 0, "stage_name": "layer 1", "loss.attention": 0.5},
        {"epoch": 2, "stage": 1, "stage_name": "classifier", "loss.soft": 0.1},
    ]
    out = tmp_path / "out"
    trials_file, epochs_file = results.write_run(out, spec, _run_result(records))
    assert trials_file == out / results.TRIALS_FILE
    assert epochs_file == out / results.EPOCHS_FILE
    assert {results.TRIALS_FILE, results.EPOCHS_FILE} <= set(_files(out))
    assert not [name for name in _files(out) if name.startswith(".")]  # no temp files

    for where in (out, trials_file):  # a folder, or a file in it
        trials, epochs = results.load(where)
        assert isinstance(trials, pd.DataFrame) and isinstance(epochs, pd.DataFrame)
        assert len(trials) == 1 and len(epochs) == 2
    row = trials.iloc[0]
    assert list(trials.columns[: len(results.ID_COLUMNS)]) == list(results.ID_COLUMNS)
    assert row["name"] == "r" and row["status"] == "ok"
    assert row["spec_fingerprint"] == spec.fingerprint()
    assert row["distill.algorithm"] == "pid"
    assert json.loads(row["distill.layer_map"]) == [2, 4]
    assert row["best.dev.accuracy"] == 0.75
    assert row["final.dev.accuracy"] == 0.5
    assert row["teacher.dev.accuracy"] == 0.8
    assert row["teacher.id"] == "abc"
    assert list(epochs["stage_name"]) == ["layer 1", "classifier"]
    assert math.isnan(epochs.iloc[0]["loss.soft"]) and epochs.iloc[1]["loss.soft"] == 0.1

    # A second run in the same folder replaces the tables (one row, not two).
    results.write_run(out, spec, _run_result(records[:1]))
    trials, epochs = results.load(out)
    assert len(trials) == 1 and len(epochs) == 1


def test_run_without_epochs_still_readable(tmp_path: Path) -> None:
    spec = spec_from_dict({"name": "r", "task": "rte"})
    results.write_run(tmp_path, spec, _run_result([], status="diverged"))
    trials, epochs = results.load(tmp_path)
    assert list(trials["status"]) == ["diverged"]
    assert trials.iloc[0]["error"] == "loss became nan"
    assert len(epochs) == 0
    assert "epoch" in epochs.columns


def test_load_without_tables(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="trials.parquet"):
        results.load(tmp_path)


def test_the_trials_row_records_the_metrics_direction(tmp_path: Path) -> None:
    spec = spec_from_dict({"name": "r", "task": "rte", "tune": {"mode": "min"}})
    records = [{"epoch": 1, "stage": 0, "stage_name": "all", "loss.soft": 0.1}]
    results.write_run(tmp_path, spec, _run_result(records))
    trials, _ = results.load(tmp_path)
    assert trials.iloc[0]["metric"] == "accuracy" and trials.iloc[0]["mode"] == "min"


def test_a_run_result_is_derived_from_its_records_in_one_place() -> None:
    records = [
        {"epoch": 1, "dev.accuracy": 0.6, "best.dev.accuracy": 0.6, "best_epoch": 1,
         "train_seconds": 2.0, "train_examples": 10, "student_params": 5, "teacher_params": 9},
        {"epoch": 2, "dev.accuracy": 0.5, "best.dev.accuracy": 0.6, "best_epoch": 1,
         "train_seconds": 3.0, "train_examples": 10, "student_params": 5, "teacher_params": 9,
         "diag.agreement": 0.8, "diag.cka_matrix": "[[0.5, 0.25]]"},
    ]  # fmt: skip
    result = RunResult.from_records(records, status="ok", metric="accuracy", wall_time=7.0)
    assert result.best_metrics == {"accuracy": 0.6} and result.best_epoch == 1
    assert result.final_metrics == {"accuracy": 0.5} and result.epochs_run == 2
    assert result.examples_per_s == 20 / 5.0  # all examples over all training seconds
    assert (result.student_params, result.teacher_params, result.wall_time) == (5, 9, 7.0)
    assert result.diagnostics == {"agreement": 0.8}
    assert result.cka.to_dict("records") == [
        {"student_layer": 1, "teacher_layer": 1, "cka": 0.5},
        {"student_layer": 1, "teacher_layer": 2, "cka": 0.25},
    ]


def test_a_second_run_replaces_the_tables_without_deleting_them_first(
    tmp_path: Path, monkeypatch
) -> None:
    spec = spec_from_dict({"name": "r", "task": "rte"})
    records = [{"epoch": 1, "stage": 0, "stage_name": "all", "loss.soft": 0.1}]
    results.write_run(tmp_path, spec, _run_result(records))
    real_unlink = Path.unlink

    def unlink(self: Path, *args, **kwargs) -> None:
        if self.name in (results.TRIALS_FILE, results.EPOCHS_FILE):
            pytest.fail(f"{self.name} was deleted before its successor was written")
        real_unlink(self, *args, **kwargs)  # temporary files beside it may go

    monkeypatch.setattr(Path, "unlink", unlink)
    results.write_run(tmp_path, spec, _run_result(records + records))
    assert len(results.load(tmp_path)[1]) == 2


# ---------------------------------------------------------------------------------------------
# Results folder identity: one experiment per folder

SWEEP = {
    "name": "s",
    "task": "rte",
    "distill": {"algorithm": "soft"},
    "search": {"train.lr": {"choice": [1e-5, 2e-5]}},
    "ablation": {"axes": {"distill.algorithm": ["soft", "sid"]}},
}


def _experiment(folder: Path, raw: dict, command: str, *, trials: bool = True) -> Path:
    """A folder as ``kdray <command>`` leaves it: experiment.json, and a trials table."""
    spec = spec_from_dict(raw)
    results.write_experiment(folder, spec, command)
    if trials:
        results.write_table([{"name": spec.name, "trial_id": "t1"}], folder / results.TRIALS_FILE)
    return folder


def test_an_empty_or_missing_folder_is_claimed_without_a_word(tmp_path: Path) -> None:
    spec = spec_from_dict(SWEEP)
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        for command in ("run", "sweep", "ablate"):
            assert results.folder_conflict(folder, spec, command) is None
            results.claim_folder(folder, spec, command)
    assert not (tmp_path / "missing").exists()  # claiming writes nothing


def test_a_sweep_with_another_search_block_is_refused_with_the_ways_out(tmp_path: Path) -> None:
    folder = _experiment(tmp_path / "s", SWEEP, "sweep")
    other = spec_from_dict({**SWEEP, "search": {"train.lr": {"choice": [3e-5]}}})
    with pytest.raises(ValueError) as error:
        results.claim_folder(folder, other, "sweep")
    message = str(error.value)
    assert f"{folder} holds the sweep 's' (experiment.json), not this sweep" in message
    assert "a different search block" in message
    assert "spec fingerprint" not in message  # the run settings are the same
    assert "write elsewhere with --out DIR" in message
    assert f"--overwrite (moves the old folder aside to {folder}.old-<UTC time>)" in message
    assert "continue it with --resume" not in message  # it is another experiment
    # so is --resume: it would continue another experiment
    with pytest.raises(ValueError, match="--resume continues only the same experiment"):
        results.claim_folder(folder, other, "sweep", resume=True)


def test_other_run_settings_or_another_command_are_refused(tmp_path: Path) -> None:
    folder = _experiment(tmp_path / "s", SWEEP, "sweep")
    changed = spec_from_dict({**SWEEP, "train": {"seed": 7}})
    with pytest.raises(ValueError, match=r"spec fingerprint [0-9a-f]{16} there, [0-9a-f]{16} here"):
        results.claim_folder(folder, changed, "sweep", resume=True)
    same = spec_from_dict(SWEEP)
    for command, kind in (("ablate", "ablation"), ("run", "run")):
        with pytest.raises(ValueError) as error:
            results.claim_folder(folder, same, command)
        expected = f"not this {kind}: written by kdray sweep, this is kdray {command}"
        assert expected in str(error.value)
    with pytest.raises(ValueError, match="--resume is for sweeps and ablations only"):
        results.claim_folder(folder, same, "run")


def test_an_ablation_with_other_axes_is_refused(tmp_path: Path) -> None:
    folder = _experiment(tmp_path / "a", SWEEP, "ablate")
    other = spec_from_dict({**SWEEP, "ablation": {"axes": {"distill.algorithm": ["soft"]}}})
    with pytest.raises(ValueError, match="a different ablation block"):
        results.claim_folder(folder, other, "ablate", resume=True)
    # the search block does not define an ablation's trials
    searched = spec_from_dict({**SWEEP, "search": {"train.lr": {"choice": [3e-5]}}})
    results.claim_folder(folder, searched, "ablate", resume=True)


def test_a_folder_written_before_a_setting_existed_is_still_the_same_experiment(
    tmp_path: Path,
) -> None:
    """An ablation recorded before ``ablation.seeds.spending`` existed resumes (the setting's
    default fills the gap); a real difference in the block is still refused."""
    raw = {**SWEEP, "ablation": {"axes": {"distill.algorithm": ["soft", "pid"]},
                                 "seeds": {"min": 3, "max": 10, "step": 2}}}  # fmt: skip
    folder = _experiment(tmp_path / "a", raw, "ablate")
    record = json.loads((folder / "experiment.json").read_text())
    del record["spec"]["ablation"]["seeds"]["spending"]  # as an older kdray wrote it
    (folder / "experiment.json").write_text(json.dumps(record))
    results.claim_folder(folder, spec_from_dict(raw), "ablate", resume=True)
    raw["ablation"]["seeds"]["spending"] = "pocock"
    with pytest.raises(ValueError, match="a different ablation block"):
        results.claim_folder(folder, spec_from_dict(raw), "ablate", resume=True)


def test_the_same_sweep_again_needs_resume_or_overwrite(tmp_path: Path) -> None:
    folder = _experiment(tmp_path / "s", SWEEP, "sweep")
    spec = spec_from_dict(SWEEP)
    with pytest.raises(ValueError) as error:
        results.claim_folder(folder, spec, "sweep")
    message = str(error.value)
    assert f"{folder} already holds trials of this sweep (same spec)" in message
    assert "continue it with --resume (kdray sweep SPEC --resume)" in message
    results.claim_folder(folder, spec, "sweep", resume=True)  # continuing it is fine
    # a teacher search is continued with the flag that makes it one
    teacher = _experiment(tmp_path / "t", SWEEP, "teacher")
    with pytest.raises(ValueError, match=r"\(kdray teacher SPEC --search --resume\)"):
        results.claim_folder(teacher, spec, "teacher")
    # experiment.json but no trials yet (it stopped before the first trial): start again
    bare = _experiment(tmp_path / "bare", SWEEP, "sweep", trials=False)
    results.claim_folder(bare, spec, "sweep")


def test_a_moved_folder_is_refused_at_resume_with_the_path_it_was_made_at(tmp_path: Path) -> None:
    """Ray Tune's saved state (``ray/``) holds the folder's first absolute path: resuming a
    moved copy would read and write the old one, so kdray refuses and says how to resume it."""
    made = _experiment(tmp_path / "made", SWEEP, "sweep")
    (made / "ray").mkdir()  # a Ray Tune experiment to restore
    spec = spec_from_dict(SWEEP)
    results.claim_folder(made, spec, "sweep", resume=True)  # where it was made: fine
    results.write_experiment(made, spec, "sweep")  # a resume writes the record again
    recorded = json.loads((made / "experiment.json").read_text())["folder"]
    assert recorded == str((tmp_path / "made").resolve())  # the first path, kept
    moved = tmp_path / "moved"
    made.rename(moved)
    assert results.moved_from(moved) == recorded
    with pytest.raises(ValueError) as error:
        results.claim_folder(moved, spec, "sweep", resume=True)
    message = str(error.value)
    assert f"cannot resume {moved}: its experiment was made at {recorded}" in message
    assert f"ln -s {moved.resolve()} {recorded}" in message
    assert "start a new sweep here with --overwrite" in message
    # a link from the old path makes it resumable again, and the record keeps the old path
    (tmp_path / "made").symlink_to(moved)
    assert results.moved_from(moved) is None
    results.claim_folder(moved, spec, "sweep", resume=True)
    results.write_experiment(moved, spec, "sweep")
    assert json.loads((moved / "experiment.json").read_text())["folder"] == recorded
    (tmp_path / "made").unlink()
    results.claim_folder(moved, spec, "sweep", overwrite=True)  # a new sweep is not refused


def test_a_moved_folder_without_ray_state_resumes_and_records_its_new_path(
    tmp_path: Path,
) -> None:
    """Tables alone hold no path (a study copied without its ``ray/`` folders continues on
    another machine); the next record names where the folder is now."""
    made = _experiment(tmp_path / "made", SWEEP, "sweep")
    moved = tmp_path / "moved"
    made.rename(moved)
    assert results.moved_from(moved) is None
    spec = spec_from_dict(SWEEP)
    results.claim_folder(moved, spec, "sweep", resume=True)
    results.write_experiment(moved, spec, "sweep")
    recorded = json.loads((moved / "experiment.json").read_text())["folder"]
    assert recorded == str(moved.resolve())


def test_a_folder_recorded_before_kdray_kept_its_path_resumes_as_before(tmp_path: Path) -> None:
    folder = _experiment(tmp_path / "old", SWEEP, "sweep")
    (folder / "ray").mkdir()
    record = json.loads((folder / "experiment.json").read_text())
    del record["folder"]  # as an older kdray wrote it
    (folder / "experiment.json").write_text(json.dumps(record))
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    assert results.moved_from(moved) is None
    results.claim_folder(moved, spec_from_dict(SWEEP), "sweep", resume=True)


def test_a_trials_table_without_experiment_json_is_refused_unless_resumed(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    results.write_table([{"name": "s", "trial_id": "t1"}], folder / results.TRIALS_FILE)
    spec = spec_from_dict(SWEEP)
    with pytest.raises(ValueError) as error:
        results.claim_folder(folder, spec, "sweep")
    message = str(error.value)
    assert "holds a trials.parquet but no experiment.json (an older kdray" in message
    assert "--out DIR" in message and "--resume" in message and "--overwrite" in message
    results.claim_folder(folder, spec, "sweep", resume=True)
    with pytest.raises(ValueError, match="no experiment.json"):
        results.claim_folder(folder, spec, "run")


def test_overwrite_moves_the_old_folder_aside_and_says_so(tmp_path: Path, caplog) -> None:
    folder = _experiment(tmp_path / "s", SWEEP, "sweep")
    other = spec_from_dict({**SWEEP, "train": {"seed": 7}})
    with caplog.at_level("WARNING", logger="kdray"):
        results.claim_folder(folder, other, "sweep", overwrite=True)
    assert not folder.exists()
    (aside,) = tmp_path.glob("s.old-*")
    assert re.fullmatch(r"s\.old-\d{8}T\d{6}Z", aside.name)
    assert (aside / results.TRIALS_FILE).exists()  # nothing lost
    assert f"moved the old results folder {folder} aside to {aside}" in caplog.text
    # a second overwrite within the same second gets its own name
    _experiment(folder, SWEEP, "sweep")
    results.claim_folder(folder, other, "sweep", overwrite=True)
    assert len(list(tmp_path.glob("s.old-*"))) == 2


def test_overwrite_leaves_a_folder_without_kdray_results_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    results.claim_folder(tmp_path, spec_from_dict(SWEEP), "sweep", overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_and_overwrite_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give --resume or --overwrite, not both"):
        results.claim_folder(tmp_path, spec_from_dict(SWEEP), "sweep", resume=True, overwrite=True)


def test_a_run_without_a_student_removes_the_earlier_runs_student(tmp_path: Path) -> None:
    spec = spec_from_dict({"name": "r", "task": "rte"})
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "model.safetensors").write_text("old")
    kept = _run_result([])
    kept.student_path = str(tmp_path / "student")
    results.write_run(tmp_path, spec, kept)
    assert (tmp_path / "student" / "model.safetensors").exists()
    results.write_run(tmp_path, spec, _run_result([], status="diverged"))
    assert not (tmp_path / "student").exists()


def _fake_distill(calls: list[str]) -> Any:
    """kdray.training.distill.distill that trains nothing: a one-epoch result, with a student folder
    when the spec saves one and the run is not the diverging kind (``train.seed`` 13)."""

    def distill(spec: Any, output_dir: Path, **_: Any) -> RunResult:
        calls.append(spec.fingerprint())
        records = [{"epoch": 1, "stage": 0, "stage_name": "all", "dev.accuracy": 0.5,
                    "examples_per_s": 10.0}]  # fmt: skip
        result = _run_result(records, status="diverged" if spec.train.seed == 13 else "ok")
        if result.status == "ok":
            (output_dir / "student").mkdir(parents=True, exist_ok=True)
            (output_dir / "student" / "config.json").write_text("{}")
            result.student_path = str(output_dir / "student")
        return result

    return distill


def test_kdray_run_replaces_its_own_run_and_refuses_another(
    tmp_path: Path, monkeypatch, tiny_bert: Path
) -> None:
    from typer.testing import CliRunner

    from conftest import tiny_spec_dict
    from kdray import cli

    calls: list[str] = []
    monkeypatch.setattr("kdray.training.distill.distill", _fake_distill(calls))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps(tiny_spec_dict(tiny_bert)))
    out = tmp_path / "out"

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli.app, ["run", str(spec_file), "--out", str(out), *args])

    assert run().exit_code == 0
    assert run().exit_code == 0  # the same spec again: replaces its own run
    assert len(calls) == 2 and len(results.load(out)[0]) == 1
    refused = run("--set", "train.lr=2e-3")
    assert refused.exit_code == 2, refused.output
    assert "not this run: spec fingerprint" in refused.output and "--overwrite" in refused.output
    assert len(calls) == 2  # refused before any compute
    # the same settings that end without a student: the old student/ goes with the old run
    # (a diverged run exits 1: its tables are written, its student is not what was asked for)
    assert run("--set", "train.seed=13", "--overwrite").exit_code == 1
    assert not (out / "student").exists()
    (aside,) = tmp_path.glob("out.old-*")
    assert (aside / "student" / "config.json").exists()  # moved aside, not lost
    assert results.load(out)[0].iloc[0]["status"] == "diverged"


@pytest.mark.parametrize(
    ("value", "missing"),
    [
        (None, True),
        (float("nan"), True),
        (pd.NA, True),
        (pd.NaT, True),
        (0.0, False),
        (0, False),
        ("", False),
        ([], False),  # an empty layer map is a value
        ([1, float("nan")], False),  # a list is never a missing cell, whatever it holds
        ({"a": None}, False),
    ],
)
def test_a_table_cell_is_missing_only_when_it_holds_no_value(value: Any, missing: bool) -> None:
    from kdray.analysis.results import is_missing

    assert is_missing(value) is missing


def test_an_experiment_lives_in_the_given_storage_or_else_in_the_folders_ray(
    tmp_path: Path,
) -> None:
    out = tmp_path / "results" / "sweep"
    assert results.ray_store(out, None) == str(tmp_path / "results" / "sweep" / "ray")
    assert results.experiment_path(out, None, "rte") == f"{tmp_path}/results/sweep/ray/rte"
    assert results.experiment_path(out, "s3://bucket/runs/", "rte") == "s3://bucket/runs/rte"
    assert results.experiment_path(out, "/shared/ray", "rte-confirm") == "/shared/ray/rte-confirm"


@pytest.mark.parametrize(
    ("statuses", "planned", "code", "line"),
    [
        (["ok", "pruned", "ok"], 3, 0, "2 ok, 1 pruned"),
        (["ok", "diverged", "error"], 3, 0, "1 ok, 1 diverged, 1 error"),
        (["error", "error", "diverged"], 3, 1, "no trial finished: 2 error, 1 diverged"),
        (["failed"], 1, 1, "no trial finished: 1 failed"),
        (["ok", "interrupted", "pending"], 3, 130, "interrupted: 1 ok, 1 interrupted, 1 pending"),
        (["ok", "ok"], 4, 130, "interrupted: 2 ok, 2 not started"),  # Ctrl-C between trials
        ([], 2, 130, "interrupted: 2 not started"),
    ],
)
def test_exit_summary_is_130_when_cut_off_1_when_nothing_finished_else_0(
    statuses: list[str], planned: int, code: int, line: str
) -> None:
    trials = pd.DataFrame({"trial_id": [str(i) for i in range(len(statuses))], "status": statuses})
    assert results.exit_summary(trials, planned) == (code, line)


def test_keep_ended_drops_every_row_of_the_trials_that_did_not_end(tmp_path: Path) -> None:
    """Kept: the ended trial (ok or pruned). Dropped: a cut-off one and one whose epochs were
    written but not its row (a kill between the two writes), in all three tables."""
    rows = [
        {"trial_id": "ok", "status": "ok"},
        {"trial_id": "pruned", "status": "pruned"},
        {"trial_id": "cut", "status": "interrupted"},
    ]
    ids = ("ok", "pruned", "cut", "rowless")
    epochs = [{"trial_id": t, "epoch": e} for t in ids for e in (1, 2)]
    cka = [{"trial_id": t, "cka": 0.5} for t in ("ok", "cut")]
    results.write_table(rows, tmp_path / results.TRIALS_FILE)
    results.write_table(epochs, tmp_path / results.EPOCHS_FILE)
    results.write_table(cka, tmp_path / results.CKA_FILE)
    ended = results.keep_ended(tmp_path)
    assert list(ended["trial_id"]) == ["ok", "pruned"]
    trials, kept_epochs = results.load(tmp_path)
    assert list(trials["trial_id"]) == ["ok", "pruned"]
    assert sorted(set(kept_epochs["trial_id"])) == ["ok", "pruned"] and len(kept_epochs) == 4
    assert list(pd.read_parquet(tmp_path / results.CKA_FILE)["trial_id"]) == ["ok"]
