"""Tests for kdray from Python (kdray.api, kdray.sweep(spec)): notebooks need no CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import kdray
from conftest import REPO, tiny_spec_dict
from kdray.analysis import results
from kdray.experiments.check import PreflightError


def test_import_kdray_loads_neither_torch_nor_ray_until_a_function_needs_them() -> None:
    code = (
        "import sys, kdray; f = kdray.load; r = kdray.run; "
        "print('torch' in sys.modules, 'ray' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


def test_load_gives_the_tables_as_named_dataframes_and_refuses_a_missing_folder(
    tmp_path: Path,
) -> None:
    folder = REPO / "results" / "rte-cpu"
    loaded = kdray.load(folder)
    trials, epochs = loaded
    assert loaded.trials is trials and loaded.epochs is epochs
    pd.testing.assert_frame_equal(trials, pd.read_parquet(folder / "trials.parquet"))
    pd.testing.assert_frame_equal(epochs, pd.read_parquet(folder / "epochs.parquet"))
    assert kdray.load(folder / "trials.parquet").trials.shape == trials.shape  # a file's folder
    with pytest.raises(FileNotFoundError, match="no results at"):
        kdray.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no trials.parquet in"):
        kdray.load(tmp_path)


def test_run_from_a_dict_writes_and_returns_the_same_tables_as_the_cli(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from kdray.cli import app

    raw = tiny_spec_dict(tiny_bert, train={"epochs": 2}, distill={"algorithm": "soft"})
    trials, epochs = kdray.run(raw, out=tmp_path / "api", overrides={"train.lr": 5e-4})
    assert list(trials["status"]) == ["ok"] and trials["train.lr"].iloc[0] == 5e-4
    assert list(epochs["epoch"]) == [1, 2]
    assert (tmp_path / "api" / "experiment.json").is_file()
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    cli = CliRunner().invoke(
        app, ["run", str(tmp_path / "tiny.yaml"), "--set", "train.lr=5e-4",
              "--out", str(tmp_path / "cli")],
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output[-2000:]
    theirs = results.load(tmp_path / "cli").trials
    assert trials["best.dev.accuracy"].iloc[0] == theirs["best.dev.accuracy"].iloc[0]
    assert trials["spec_fingerprint"].iloc[0] == theirs["spec_fingerprint"].iloc[0]


def test_a_failed_pre_flight_raises_before_any_compute_naming_each_check(
    tiny_bert: Path, tmp_path: Path
) -> None:
    raw = tiny_spec_dict(tiny_bert, data={"dir": str(tmp_path / "no-glue")})
    with pytest.raises(PreflightError, match=r"data: .*no-glue") as info:
        kdray.run(raw, out=tmp_path / "out")
    assert [check.name for check in info.value.failed] == ["data"]
    assert not (tmp_path / "out").exists()
