"""Recorded seeded runs: the same spec on the same tiny teacher gives the recorded results.

``tests/fixtures/recorded_runs.json`` holds small runs of every algorithm (and of freeze_lower,
[CLS]-row attention with the live teacher, a smaller random student with projections, and soft
labels at temperature 2 with hard labels) recorded by ``python tests/record_runs.py``. Each test
re-runs one of them and compares every epoch's stage, learning rate, loss terms, dev metrics and
model selection, the run's best epoch/metrics and diagnostics, and the teacher's dev metrics:
integers, strings and booleans exactly, floats within rtol 1e-5, atol 1e-6 (CPU, one thread).

The entry point is imported here, once: repoint this import when it moves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from record_runs import RECORDED, differences, run_recorded

from conftest import make_tiny_bert
from kdray.distill import distill

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDS = json.loads(RECORDED.read_text())
RUNS: dict[str, dict[str, Any]] = RECORDS["runs"]


@pytest.fixture(scope="module")
def recorded_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random BERT the runs were recorded with (make_tiny_bert's default seed)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_tiny_bert(tmp_path_factory.mktemp("recorded-tiny-bert"))
    finally:
        torch.set_num_threads(before)


def test_the_recording_covers_every_algorithm_and_its_variants() -> None:
    algorithms = {run["spec"]["distill"]["algorithm"] for run in RUNS.values()}
    assert algorithms == {"none", "soft", "internal", "idal", "pid", "sid"}
    assert len(RUNS) >= 8
    assert any(run["diagnostics"] for run in RUNS.values())
    assert all(run["status"] == "ok" and run["records"] for run in RUNS.values())


@pytest.mark.parametrize("name", list(RUNS))
def test_a_seeded_run_reproduces_its_recorded_losses_and_metrics(
    name: str, recorded_teacher: Path
) -> None:
    recorded = RUNS[name]
    expected = {k: v for k, v in recorded.items() if k != "spec"}
    got = run_recorded(distill, recorded["spec"], recorded_teacher)

    # The shape of the run first, so a failure says what changed before listing numbers.
    assert got["status"] == expected["status"], got["error"]
    assert [(r["epoch"], r["stage_name"]) for r in got["records"]] == [
        (r["epoch"], r["stage_name"]) for r in expected["records"]
    ]
    assert [r["is_best"] for r in got["records"]] == [r["is_best"] for r in expected["records"]]
    assert got["best_epoch"] == expected["best_epoch"]
    assert [sorted(r) for r in got["records"]] == [sorted(r) for r in expected["records"]]
    assert got["teacher_dev_metrics"] == pytest.approx(RECORDS["teacher_dev_metrics"])

    problems = differences(expected, got)
    assert not problems, f"{len(problems)} differences from the recording:\n" + "\n".join(
        problems[:40]
    )
