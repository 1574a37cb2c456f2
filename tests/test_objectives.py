"""Tests for what a sweep's searcher optimises beyond one score of one seed: several objectives
(the Pareto front, kdray.analysis.pareto; latency, kdray.training.footprint) and a seed-averaged
objective."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from conftest import grid_tune, tiny_spec_dict
from kdray.analysis import pareto
from kdray.spec import SpecError, spec_from_dict

TWO = [{"metric": "accuracy", "mode": "max"}, {"metric": "latency_ms", "mode": "min"}]


def test_a_trial_is_dominated_when_another_is_as_good_everywhere_and_better_somewhere() -> None:
    # (accuracy max, latency min): b beats a on both; c trades accuracy for speed; d ties c
    values = np.array([[0.60, 5.0], [0.70, 4.0], [0.65, 2.0], [0.65, 2.0], [np.nan, 1.0]])
    assert list(pareto.dominated(values, ["max", "min"])) == [True, False, False, False, True]


def test_the_front_lists_finished_non_dominated_trials_best_first() -> None:
    trials = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d"],
            "status": ["ok", "ok", "ok", "error"],
            "best.dev.accuracy": [0.6, 0.7, 0.65, 0.9],
            "latency_ms": [5.0, 4.0, 2.0, 0.1],
            "param.student.layers": [3, 3, 1, 1],
        }
    )
    front = pareto.front(trials, TWO)
    assert list(front["trial_id"]) == ["b", "c"]  # d errored: not a candidate
    assert list(front.columns) == [
        "trial_id", "best.dev.accuracy", "latency_ms", "param.student.layers"
    ]  # fmt: skip
    params = [{"metric": "accuracy", "mode": "max"}, {"metric": "params", "mode": "min"}]
    assert pareto.column("params") == "student_params" and pareto.front(trials, params).empty


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"objectives": TWO[:1]}, "give two or three objectives"),
        ({"objectives": TWO[::-1]}, "the first objective picks each trial's best epoch"),
        ({"objectives": TWO, "scheduler": {"asha": {}}}, "use scheduler: {fifo: {}}"),
        ({"objectives": TWO, "mode": "min"}, "set tune.mode: max"),
        ({"objectives": TWO, "searcher": {"optuna": {"sampler": "cmaes"}}}, "CMA-ES sampler"),
        ({"objectives": [*TWO, TWO[1]]}, "give each objective's metric once"),
    ],
)
def test_objectives_that_cannot_run_are_refused_with_the_fix(
    tiny_bert: Path, tune: dict[str, Any], message: str
) -> None:
    raw = tiny_spec_dict(tiny_bert)
    raw["tune"] = {"scheduler": {"fifo": {}}, **tune}
    with pytest.raises(SpecError, match=message.replace("{", r"\{").replace("}", r"\}")):
        spec_from_dict(raw)


def test_latency_grows_with_the_students_layers(tiny_bert: Path) -> None:
    from kdray.training import footprint

    measured = {}
    for layers in (1, 4):
        raw = tiny_spec_dict(tiny_bert, student={"layers": layers, "init": "teacher"})
        raw["distill"] = {"algorithm": "soft"}
        spec = spec_from_dict(raw)
        model = footprint.student_architecture(spec, str(tiny_bert), 2)
        assert model.config.num_hidden_layers == layers
        measured[layers] = footprint.cpu_latency_ms(model, 32, rounds=30)
    assert 0 < measured[1] < measured[4]


def test_a_two_objective_sweep_writes_its_front_and_keeps_each_front_students(
    cluster: Any, tiny_bert: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    import kdray
    from kdray.analysis.plots import draw
    from kdray.analysis.report import build_report
    from kdray.cli import app

    raw = tiny_spec_dict(tiny_bert, name="pareto", train={"epochs": 1})
    raw["distill"] = {"algorithm": "soft"}
    raw["search"] = {"student.layers": {"grid": [1, 3]}, "train.lr": {"grid": [1e-4, 1e-3]}}
    raw["tune"] = grid_tune(objectives=TWO, max_concurrent=1)
    out = tmp_path / "sweep"
    trials, _ = kdray.sweep(raw, out=out, address=cluster.address)
    assert len(trials) == 4 and trials["latency_ms"].gt(0).all()
    report = build_report(out)
    draw(report, tmp_path / "plots")
    expected = pareto.front(trials, TWO)
    assert list(report.pareto["trial_id"]) == list(expected["trial_id"])
    assert (tmp_path / "plots" / "pareto.png").stat().st_size > 0
    assert "Pareto front" in report.to_markdown()
    kept = set(trials.loc[trials["student_path"].notna(), "trial_id"])
    assert kept == set(expected["trial_id"])  # every front trial can be exported
    last = expected["trial_id"].iloc[-1]
    done = CliRunner().invoke(
        app, ["export", str(out), "--trial", str(last), "--to", str(tmp_path / "student")]
    )
    assert done.exit_code == 0, done.output[-2000:]


def test_a_seed_averaged_sweep_shows_the_searcher_each_configurations_mean(
    cluster: Any, tiny_bert: Path, tmp_path: Path
) -> None:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    import kdray
    from kdray.analysis import results
    from kdray.analysis.report import build_report
    from kdray.experiments import plan

    raw = tiny_spec_dict(tiny_bert, name="seeds", train={"epochs": 1, "seed": 7})
    raw["distill"] = {"algorithm": "soft"}
    raw["search"] = {"train.lr": {"loguniform": [1e-4, 1e-3]}}
    raw["tune"] = {"num_samples": 2, "seeds_per_trial": 2, "scheduler": {"fifo": {}},
                   "searcher": {"optuna": {"sampler": "tpe", "seed": 0}},
                   "max_concurrent": 1, "resources": {"cpu": 1}, "max_failures": 0}  # fmt: skip
    out = tmp_path / "sweep"
    trials, _ = kdray.sweep(raw, out=out, address=cluster.address)  # the module, called
    assert len(trials) == 4 and set(trials["status"]) == {"ok"}
    import kdray.experiments.sweep as module

    assert kdray.experiments.sweep is module and results.load(out).trials.equals(trials)
    with pytest.raises(ValueError, match="no search block; use kdray.run"):
        kdray.sweep(tiny_spec_dict(tiny_bert), out=tmp_path / "none")
    for _, group in trials.groupby("param.train.lr"):
        assert sorted(group["param.train.seed"]) == [7, 8]  # the same paired seeds
    means = results.seed_means(trials, "best.dev.accuracy")
    assert list(means["seeds"]) == [2, 2]
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    study = optuna.load_study(study_name="seeds", storage=storage)
    told = sorted(t.value for t in study.trials if t.state.name == "COMPLETE")
    assert told == pytest.approx(sorted(means["mean"]))
    best = plan.best_trial(trials, "max", by_mean=True)  # the best mean's best seed
    assert results.config_key(best) == means.loc[means["mean"].idxmax(), "config"]
    report = build_report(out)
    assert list(report.seeds["seeds"]) == [2, 2]
    assert report.seeds["mean"].iloc[0] == pytest.approx(means["mean"].max())


def test_seeds_per_trial_needs_fifo_a_searcher_and_one_objective(tiny_bert: Path) -> None:
    raw = tiny_spec_dict(tiny_bert)
    for tune, message in (
        ({"seeds_per_trial": 2, "scheduler": {"asha": {}}}, "bias its mean"),
        ({"seeds_per_trial": 2, "scheduler": {"fifo": {}}, "searcher": {"grid": {}}},
         "add train.seed to the grid"),
        ({"seeds_per_trial": 2, "scheduler": {"fifo": {}}, "objectives": TWO},
         "the seed mean is of one objective"),
    ):  # fmt: skip
        with pytest.raises(SpecError, match=message):
            spec_from_dict({**raw, "tune": tune})
