"""The live trials table: what a person watching a sweep sees."""

from __future__ import annotations

import io

from rich.console import Console

from kdray.progress import TrialsTable


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
