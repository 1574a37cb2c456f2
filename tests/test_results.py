"""Parquet tables: the first write fixes the schema, new columns go last, writes are atomic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdray import results
from kdray.results import RunResult
from kdray.spec import spec_from_dict
from kdray.teacher import TeacherInfo


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
