"""Experiment tracking: a ``kdray run``'s epoch records as TensorBoard scalars, and a sweep's
trials as MLflow and W&B runs, read back from the stores those write and compared with kdray's
own epochs table."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import grid_tune, tiny_spec_dict
from kdray.analysis import results
from kdray.infra.tracking import TENSORBOARD_DIR, TensorBoardReport, scalars
from kdray.spec import spec_from_dict

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
        if pd.isna(row["dev.accuracy"]):  # a layer stage before the classifier: not evaluated
            assert epoch not in seen["dev.accuracy"]
        else:
            assert seen["dev.accuracy"][epoch] == pytest.approx(row["dev.accuracy"], abs=1e-6)
        assert seen["loss.total"][epoch] == pytest.approx(row["loss.total"], rel=1e-6)
        assert seen["lr"][epoch] == pytest.approx(row["lr"], rel=1e-6)
    assert seen["stage"] == {1: 0.0, 2: 1.0, 3: 2.0}
    assert sorted(seen["dev.accuracy"]) == [3]  # only the classifier stage is evaluated
    assert {"loss.attention", "loss.hidden", "loss.soft"} <= set(seen)


# ---------------------------------------------------------------------------------------------
# A sweep's trials in MLflow and W&B (Ray Tune's logger callbacks, on the session's Ray)

#: The per-epoch fields compared with the epochs table.
TRACKED = ("dev.accuracy", "loss.total")


@pytest.fixture(scope="module")
def tracked(
    cluster: Any, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """One sweep for both trackers (two sweeps cost twice the teacher and the Ray start-up):
    two one-CPU trials of two epochs, a grid over the learning rate, ``tune.loggers: [mlflow,
    wandb]`` with their defaults, under ``WANDB_MODE=offline``; its folder, trials and epochs."""
    from kdray.experiments.sweep import run_sweep

    raw = tiny_spec_dict(tiny_bert, name="tracked", train={"epochs": 2})
    raw["distill"] = {"algorithm": "soft"}  # no layer stages: a dev metric every epoch
    raw["search"] = {"train.lr": {"grid": [1e-3, 3e-4]}}
    raw["tune"] = grid_tune(loggers=["mlflow", "wandb"])
    out = tmp_path_factory.mktemp("tracked") / "out"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        run_sweep(spec_from_dict(raw), out_dir=out)
    trials, epochs = results.load(out)
    assert len(trials) == 2 and set(trials["status"]) == {"ok"}
    return out, trials, epochs


def expected_curves(epochs: pd.DataFrame, trial_id: str) -> dict[str, dict[int, float]]:
    """{field: {epoch: value}} of one trial, from kdray's epochs table."""
    rows = epochs[epochs["trial_id"] == trial_id]
    return {
        field: dict(zip(rows["epoch"].astype(int), rows[field], strict=True)) for field in TRACKED
    }


def test_mlflow_holds_one_run_per_trial_with_every_epochs_dev_metric(
    tracked: tuple[Path, pd.DataFrame, pd.DataFrame],
) -> None:
    from mlflow.tracking import MlflowClient

    from kdray.experiments.sweep import MLFLOW_DB

    out, trials, epochs = tracked
    # default: a SQLite store in the results folder, the experiment named after the spec
    client = MlflowClient(tracking_uri=f"sqlite:///{out / MLFLOW_DB}")
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == len(trials)
    for trial_id in trials["trial_id"]:
        (run,) = [r for r in runs if r.data.tags["trial_name"].endswith(trial_id)]
        assert run.info.status == "FINISHED"
        for field, expected in expected_curves(epochs, trial_id).items():
            # the step is the epoch (kdray reports it as Ray's timesteps_total)
            seen = {m.step: m.value for m in client.get_metric_history(run.info.run_id, field)}
            assert seen == pytest.approx(expected, rel=1e-12), field


def read_wandb_history(wandb_file: Path) -> list[dict[str, Any]]:
    """The history rows (one per ``wandb.log``) of a run's ``run-<id>.wandb``. wandb ships no
    reader for it (its old ``wandb.sdk.internal.datastore`` is gone; offline runs are read
    only by ``wandb sync``), but the format is stable and public: a 7-byte W&B header
    (``:W&B``, magic, version), then LevelDB's log format (32 KiB blocks; each chunk a 7-byte
    header: crc32, length, type FULL/FIRST/MIDDLE/LAST; a block's last < 7 bytes are padding),
    each record a ``wandb_internal.Record`` protobuf (``wandb.proto``)."""
    from wandb.proto import wandb_internal_pb2

    block, header, data = 32768, 7, wandb_file.read_bytes()
    assert data[:4] == b":W&B", f"{wandb_file} is not a W&B transaction log"
    rows: list[dict[str, Any]] = []
    pending, pos = b"", header
    while len(data) - pos >= header:
        room = block - pos % block
        if room < header:  # padding at the end of a block
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if kind == 0:  # zeros: nothing written past here
            break
        pending += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or ".".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows


def test_wandb_offline_run_holds_every_epochs_dev_metric(
    tracked: tuple[Path, pd.DataFrame, pd.DataFrame],
) -> None:
    out, trials, epochs = tracked
    # offline by default, under <results folder>/wandb: one run per trial, its id the trial's
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == len(trials)
    for trial_id in trials["trial_id"]:
        (log,) = [f for folder in folders for f in folder.glob(f"run-{trial_id}.wandb")]
        rows = read_wandb_history(log)
        for field, expected in expected_curves(epochs, trial_id).items():
            seen = {int(row["epoch"]): row[field] for row in rows if field in row}
            assert seen == pytest.approx(expected, rel=1e-12), field
