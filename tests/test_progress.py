"""The live trials table: what a person watching a sweep sees."""

from __future__ import annotations

import io

from rich.console import Console

from kdray.infra.progress import TrialsTable


def _table(metric: str) -> TrialsTable:
    return TrialsTable("sweep", metric, Console(file=io.StringIO(), width=200))


def test_the_live_table_shows_the_selection_metric_not_the_first_dev_column() -> None:
    table = _table("f1")
    result = {"epoch": 2, "stage_name": "all", "dev.accuracy": 0.5, "dev.f1": 0.8125}
    table.result("t1", {**result, "objective": 0.9}, "objective")
    table.close()
    row = table.rows["t1"]
    assert row["dev"] == "0.8125" and row["best"] == "0.9000" and row["epoch"] == 2


def test_the_live_table_names_its_metric_and_lists_the_trials_params() -> None:
    table = _table("accuracy")
    table.update("t1", {"distill.algorithm": "sid", "train.lr": 0.000123456}, status="running")
    table.update("t1", {"distill.algorithm": "soft"}, status="done")  # params are set once
    table.close()
    assert table.rows["t1"] == {"params": "algorithm=sid lr=0.000123", "status": "done"}
    assert "accuracy" in str(table.table().title)


def test_a_console_that_is_not_a_terminal_gets_one_line_per_trial_event() -> None:
    out = io.StringIO()
    table = TrialsTable("ablation", "accuracy", Console(file=out, width=30))  # lines not wrapped
    table.update("t1", {"distill.algorithm": "pid", "train.seed": 2}, status="running")
    table.update("t1", {"distill.algorithm": "pid", "train.seed": 2})  # nothing new: no line
    result = {"epoch": 3, "stage_name": "layer 2", "dev.accuracy": 0.71}
    table.result("t1", {**result, "objective": 0.725}, "objective")
    table.update("t1", {"distill.algorithm": "pid"}, status="done")
    lines = out.getvalue().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "t1 running  algorithm=pid seed=2",
        "t1 epoch 3 (layer 2): accuracy 0.7100, best 0.7250",
        "t1 done",
    ]
    table.close()  # the whole table once at the end, for the log's reader
    assert "ablation: trials (accuracy)" in out.getvalue()


def test_an_epoch_without_a_dev_evaluation_is_logged_without_a_metric() -> None:
    out = io.StringIO()
    table = TrialsTable("sweep", "accuracy", Console(file=out, width=200))
    table.result(
        "t1", {"epoch": 1, "stage_name": "layer 1", "objective": float("nan")}, "objective"
    )
    assert out.getvalue().split(" ", 1)[1] == "t1 epoch 1 (layer 1)\n"
