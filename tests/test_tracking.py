"""Experiment tracking without Ray: a ``kdray run``'s epoch records as TensorBoard scalars."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_spec_dict
from kdray import results
from kdray.tracking import TENSORBOARD_DIR, TensorBoardReport, scalars

pytestmark = pytest.mark.usefixtures("one_thread")


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar tag in the TensorBoard event files under ``folder``: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: {event.step: event.value for event in events.Scalars(tag)}
        for tag in events.Tags()["scalars"]
    }


def test_only_finite_numbers_of_the_curve_fields_become_scalars() -> None:
    record = {
        "epoch": 2,
        "stage": 1,
        "stage_name": "soft",
        "lr": 1e-3,
        "loss.total": 0.5,
        "loss.attention.L1": 2,
        "dev.accuracy": math.nan,  # a staged run before its classifier stage
        "best.dev.accuracy": 0.75,
        "is_best": True,
        "train_seconds": 3.0,
        "diag.cka_matrix": "[[1.0]]",
    }
    assert scalars(record) == {
        "stage": 1.0,
        "lr": 0.001,
        "loss.total": 0.5,
        "loss.attention.L1": 2.0,
        "best.dev.accuracy": 0.75,
    }


def test_the_report_writes_one_point_per_epoch_at_the_epoch_step(tmp_path: Path) -> None:
    with TensorBoardReport(tmp_path / "tb") as report:
        report({"epoch": 1, "stage": 0, "dev.accuracy": 0.5}, lambda _: None)
        report({"epoch": 2, "stage": 1, "dev.accuracy": 0.625}, lambda _: None)
    seen = read_scalars(tmp_path / "tb")
    assert seen["dev.accuracy"] == {1: 0.5, 2: 0.625}  # both exact in float32
    assert seen["stage"] == {1: 0.0, 2: 1.0}


def test_kdray_run_writes_every_epochs_dev_metric_and_losses_to_tensorboard(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from kdray.cli import app

    raw = tiny_spec_dict(tiny_bert, name="tb-run", train={"epochs": 3})
    raw["distill"] = {"algorithm": "sid"}  # 2 layer stages, then the classifier: stage 0, 1, 2
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    for _ in range(2):  # a second run replaces the first one's events, like its tables
        result = CliRunner().invoke(app, ["run", str(spec_file), "--out", str(out)])
        assert result.exit_code == 0, result.output + repr(result.exception)

    assert len(list((out / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1
    seen = read_scalars(out / TENSORBOARD_DIR)
    _, epochs = results.load(out)
    assert list(epochs["epoch"]) == [1, 2, 3]
    for _, row in epochs.iterrows():
        epoch = int(row["epoch"])
        assert seen["dev.accuracy"][epoch] == pytest.approx(row["dev.accuracy"], abs=1e-6)
        assert seen["loss.total"][epoch] == pytest.approx(row["loss.total"], rel=1e-6)
        assert seen["lr"][epoch] == pytest.approx(row["lr"], rel=1e-6)
    assert seen["stage"] == {1: 0.0, 2: 1.0, 3: 2.0}
    assert {"loss.attention", "loss.hidden", "loss.soft"} <= set(seen)
