"""Pure trial planning (no Ray, no model): which students a finished experiment keeps."""

from __future__ import annotations

from typing import Any

import pytest

from kdray.experiments.plan import cache_variants, students_to_keep
from kdray.spec import SpecError, spec_from_dict


def _row(trial_id: str, score: float | None, cell: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "trial_id": trial_id,
        "status": "ok",
        "metric": "accuracy",
        "best.dev.accuracy": score,
        "student_path": f"students/{trial_id}",
        "cell": cell,
        **extra,
    }


ABLATION = [
    _row("a1", 0.60, "soft"),
    _row("a2", 0.65, "soft"),
    _row("a3", 0.62, "soft"),
    _row("b1", 0.55, "idal"),
    _row("b2", 0.70, "idal"),
    _row("c1", 0.90, "sid", status="pruned"),  # a pruned trial never competes
    _row("d1", 0.99, "pid", student_path=None),  # nor one whose student was not saved
]


def test_best_keeps_the_best_trial_of_each_ablation_cell() -> None:
    assert students_to_keep(ABLATION, "best", "max") == {"a2", "b2"}


def test_an_integer_keeps_the_k_best_of_each_cell() -> None:
    assert students_to_keep(ABLATION, 2, "max") == {"a2", "a3", "b1", "b2"}


def test_mode_min_keeps_the_lowest_scores() -> None:
    assert students_to_keep(ABLATION, "best", "min") == {"a1", "b1"}


def test_all_keeps_every_saved_student_and_none_keeps_nothing() -> None:
    assert students_to_keep(ABLATION, "all", "max") == {"a1", "a2", "a3", "b1", "b2"}
    assert students_to_keep(ABLATION, "none", "max") == set()
    assert students_to_keep(ABLATION, 0, "max") == set()


def test_a_sweep_is_one_group_and_confirmations_group_by_configuration_rank() -> None:
    sweep = [_row("t1", 0.5, None), _row("t2", 0.7, float("nan")), _row("t3", 0.6)]
    assert students_to_keep(sweep, "best", "max") == {"t2"}
    confirm = [
        {**_row("r1s1", 0.61), "config_rank": 1},
        {**_row("r1s2", 0.58), "config_rank": 1},
        {**_row("r2s1", 0.52), "config_rank": 2},
    ]
    assert students_to_keep(confirm, "best", "max") == {"r1s1", "r2s1"}


def test_a_trial_without_a_score_is_kept_last_and_ties_keep_the_earlier_trial() -> None:
    rows = [_row("x2", 0.6, "c"), _row("x1", 0.6, "c"), _row("x0", None, "c")]
    assert students_to_keep(rows, "best", "max") == {"x1"}
    assert students_to_keep(rows, 3, "max") == {"x0", "x1", "x2"}
    assert students_to_keep(rows, "best", "min") == {"x1"}


@pytest.mark.parametrize("value", ["some", -1, 1.5])
def test_keep_students_accepts_all_best_none_or_a_count(value: Any) -> None:
    with pytest.raises(SpecError, match="tune.keep_students"):
        spec_from_dict({"name": "x", "task": "rte", "tune": {"keep_students": value}})


# ---------------------------------------------------------------------------------------------
# teacher-output cache variants


def _layer_map_spec() -> Any:
    return spec_from_dict(
        {
            "name": "x",
            "task": "rte",
            "distill": {"algorithm": "idal", "layer_map": "skip"},
            "search": {"distill.layer_map": {"choice": ["skip", "last"]}},
        }
    )


def test_a_sweep_caches_every_layer_map_its_search_can_sample() -> None:
    maps = [v["distill.layer_map"] for v in cache_variants(_layer_map_spec())]
    assert maps == ["skip", "last"]


def test_an_experiment_of_cells_caches_only_the_layer_maps_of_its_cells_and_spec() -> None:
    spec = _layer_map_spec()
    cells = [{"distill.algorithm": "soft"}, {"distill.algorithm": "sid"}]
    assert [v["distill.layer_map"] for v in cache_variants(spec, cells)] == ["skip"]
    cells.append({"distill.layer_map": [1, 2, 3]})
    assert [v["distill.layer_map"] for v in cache_variants(spec, cells)] == ["skip", [1, 2, 3]]
    # a confirmation's configurations all set the layer map: the spec's own is not cached
    configs = [{"distill.layer_map": "last"}, {"distill.layer_map": "last", "train.lr": 1e-4}]
    assert [v["distill.layer_map"] for v in cache_variants(spec, configs)] == ["last"]


def test_tied_best_trials_are_broken_by_the_final_metric_then_the_fingerprint_in_any_order() -> (
    None
):
    import pandas as pd

    from kdray.experiments.plan import best_trial

    rows = [
        {"trial_id": "b", "status": "ok", "metric": "accuracy", "best.dev.accuracy": 0.56,
         "final.dev.accuracy": 0.54, "spec_fingerprint": "f2"},
        {"trial_id": "a", "status": "ok", "metric": "accuracy", "best.dev.accuracy": 0.56,
         "final.dev.accuracy": 0.54, "spec_fingerprint": "f1"},
        {"trial_id": "c", "status": "ok", "metric": "accuracy", "best.dev.accuracy": 0.55,
         "final.dev.accuracy": 0.55, "spec_fingerprint": "f0"},
    ]  # fmt: skip
    for order in (rows, rows[::-1], [rows[1], rows[2], rows[0]]):
        assert best_trial(pd.DataFrame(order))["trial_id"] == "a"  # full tie: fingerprint f1
    rows[0]["final.dev.accuracy"] = 0.55  # now b ends better
    assert best_trial(pd.DataFrame(rows))["trial_id"] == "b"
    assert best_trial(pd.DataFrame(rows[::-1]))["trial_id"] == "b"
    # with mode min both metrics count lower as better: negated, b still wins
    lowest = [
        {**row, "best.dev.accuracy": -row["best.dev.accuracy"],
         "final.dev.accuracy": -row["final.dev.accuracy"]}
        for row in rows
    ]  # fmt: skip
    assert best_trial(pd.DataFrame(lowest), "min")["trial_id"] == "b"


def _teacher_space_spec() -> Any:
    raw = {
        "name": "told",
        "task": "rte",
        "teacher": {"model": "m"},
        "student": {"layers": 1},
        "search": {
            "teacher.lr": {"loguniform": [1e-5, 1e-3]},
            "teacher.epochs": {"choice": [3, 6]},
            "teacher.pooling": {"choice": ["cls", "mean"]},
        },
    }
    return spec_from_dict(raw)


def _asked(study: Any, space: Any) -> dict[str, Any]:
    trial = study.ask()
    space(trial)
    return trial.params


def test_a_search_told_its_ended_trials_proposes_what_an_uninterrupted_one_would_next() -> None:
    import numpy as np
    import optuna

    from kdray.experiments.plan import OptunaSpace, continue_study, told_trials

    spec = _teacher_space_spec()
    space = OptunaSpace(spec)
    whole = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    proposed = []
    for value in (0.6, 0.7, 0.5):
        proposed.append(_asked(whole, space))
        whole.tell(whole.trials[-1].number, value)
    # the table of the first two (as read back from parquet: numpy scalars), one of them failed
    first = {f"param.{k}": v for k, v in proposed[0].items()}
    first["param.teacher.lr"] = np.float64(first["param.teacher.lr"])
    rows = [
        {"status": "ok", "best.dev.accuracy": np.float64(0.6), **first},
        {"status": "error", "best.dev.accuracy": float("nan"),
         **{f"param.{k}": v for k, v in proposed[1].items()}},
    ]  # fmt: skip
    told = told_trials(spec, rows, ["best.dev.accuracy"])
    assert [t.state.name for t in told] == ["COMPLETE", "FAIL"] and told[0].value == 0.6
    assert told[0].params == proposed[0] and told[1].params == proposed[1]
    study = optuna.create_study(direction="maximize")
    sampler = optuna.samplers.TPESampler(seed=0)
    continue_study(study, sampler, space, told)
    assert [t.params for t in study.trials] == proposed[:2]
    again = optuna.create_study(sampler=sampler, direction="maximize")
    assert _asked(again, space) == proposed[2]  # not the seed's first proposal again
    continue_study(study, optuna.samplers.TPESampler(seed=0), space, told)
    assert len(study.trials) == 2  # a study that has its trials is not told them twice
