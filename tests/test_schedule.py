"""Stage lists of every algorithm and the epoch -> stage decisions of StageSchedule."""

from __future__ import annotations

import json

import pytest

from kdray.method.algorithms import ALGORITHMS, build_stages
from kdray.method.schedule import Stage, StageSchedule


def _summary(stages: list[Stage]) -> list[tuple]:
    return [(s.index, s.name, s.internal_layers, s.soft, s.hard, s.frozen) for s in stages]


def _run(schedule: StageSchedule, losses: list[float]) -> list[bool]:
    return [schedule.end_epoch(loss) for loss in losses]


# ----------------------------------------------------------------------------- build_stages
def test_algorithm_names() -> None:
    assert ALGORITHMS == ("none", "soft", "internal", "idal", "pid", "sid")


@pytest.mark.parametrize("hard", [False, True])
def test_single_stage_algorithms(hard: bool) -> None:
    assert _summary(build_stages("none", 3, hard=hard)) == [(0, "hard labels", (), False, True, ())]
    assert _summary(build_stages("soft", 3, hard=hard)) == [(0, "soft labels", (), True, hard, ())]
    assert _summary(build_stages("internal", 3, hard=hard)) == [
        (0, "all", (1, 2, 3), False, True, ())
    ]
    assert _summary(build_stages("idal", 3, hard=hard)) == [(0, "all", (1, 2, 3), True, hard, ())]


def test_pid_stages() -> None:
    assert _summary(build_stages("pid", 3)) == [
        (0, "layer 1", (1,), False, False, ()),
        (1, "layer 2", (2,), False, False, ()),
        (2, "layer 3", (3,), False, False, ()),
        (3, "classifier", (), True, False, ()),
    ]
    assert build_stages("pid", 3, hard=True)[-1].hard


def test_pid_freeze_lower() -> None:
    assert _summary(build_stages("pid", 3, hard=True, freeze_lower=True)) == [
        (0, "layer 1", (1,), False, False, ()),
        (1, "layer 2", (2,), False, False, (0, 1)),
        (2, "layer 3", (3,), False, False, (0, 1, 2)),
        (3, "classifier", (), True, True, (0, 1, 2, 3)),
    ]


@pytest.mark.parametrize("freeze_lower", [False, True])
def test_sid_stacks_and_ignores_freezing(freeze_lower: bool) -> None:
    assert _summary(build_stages("sid", 3, freeze_lower=freeze_lower)) == [
        (0, "layer 1", (1,), False, False, ()),
        (1, "layers 1-2", (1, 2), False, False, ()),
        (2, "layers 1-3", (1, 2, 3), False, False, ()),
        (3, "classifier", (1, 2, 3), True, False, ()),
    ]
    assert build_stages("sid", 3, hard=True)[-1].hard


def test_trains_classifier() -> None:
    assert [s.trains_classifier for s in build_stages("pid", 2)] == [False, False, True]
    assert [s.trains_classifier for s in build_stages("sid", 2)] == [False, False, True]
    assert build_stages("internal", 2)[0].trains_classifier
    assert build_stages("soft", 2)[0].trains_classifier


def test_build_stages_errors() -> None:
    with pytest.raises(ValueError, match="allowed values.*'pid'"):
        build_stages("progressive", 3)
    with pytest.raises(ValueError, match="num_layers"):
        build_stages("sid", 0)


# ----------------------------------------------------------------------------- fixed epochs
def test_even_split_remainder_to_final() -> None:
    stages = build_stages("pid", 3)
    sched = StageSchedule(stages, 50)
    assert sched.plan() == [12, 12, 12, 14]
    advanced = _run(sched, [1.0] * 50)
    assert sched.finished and sched.epoch == 50
    assert sched.history == [0] * 12 + [1] * 12 + [2] * 12 + [3] * 14
    assert [i + 1 for i, a in enumerate(advanced) if a] == [12, 24, 36]
    assert sched.classifier_epochs == 14
    with pytest.raises(RuntimeError, match="finished"):
        sched.end_epoch(1.0)

    small = StageSchedule(stages, 4)
    assert small.plan() == [1, 1, 1, 1]
    assert _run(small, [1.0] * 4) == [True, True, True, False]


def test_epochs_per_stage() -> None:
    sched = StageSchedule(build_stages("sid", 3), 10, epochs_per_stage=2)
    assert sched.plan() == [2, 2, 2, 4]
    _run(sched, [0.0] * 10)
    assert sched.history == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]


def test_too_few_epochs() -> None:
    stages = build_stages("pid", 3)
    with pytest.raises(ValueError, match="raise total_epochs to at least 4"):
        StageSchedule(stages, 3)
    with pytest.raises(ValueError, match="raise total_epochs to at least 4"):
        StageSchedule(stages, 3, advance="plateau")
    with pytest.raises(ValueError, match="lower epochs_per_stage to at most 3"):
        StageSchedule(stages, 10, epochs_per_stage=4)


def test_schedule_argument_errors() -> None:
    stages = build_stages("soft", 3)
    with pytest.raises(ValueError, match="advance"):
        StageSchedule(stages, 5, advance="loss")
    with pytest.raises(ValueError, match="patience"):
        StageSchedule(stages, 5, patience=0)
    with pytest.raises(ValueError, match="min_delta"):
        StageSchedule(stages, 5, min_delta=-1.0)


def test_single_stage_runs_all_epochs() -> None:
    sched = StageSchedule(build_stages("none", 3), 3)
    assert _run(sched, [1.0, 1.0, 1.0]) == [False, False, False]
    assert sched.finished and sched.classifier_epochs == 3 and sched.stage.name == "hard labels"


# ----------------------------------------------------------------------------- plateau
def test_plateau_patience() -> None:
    sched = StageSchedule(build_stages("pid", 1), 20, advance="plateau", patience=2)
    assert sched.plan() is None
    # best 1.0 -> 0.8 -> (0.9, 0.85 no improvement twice) -> next stage after epoch 4.
    assert _run(sched, [1.0, 0.8, 0.9, 0.85]) == [False, False, False, True]
    assert sched.stage.name == "classifier" and sched.stage_epoch == 0
    # The final stage runs to the end regardless of the loss.
    assert not any(_run(sched, [5.0] * 16))
    assert sched.finished and sched.history == [0] * 4 + [1] * 16
    assert sched.classifier_epochs == 16


def test_plateau_min_delta_and_reset() -> None:
    sched = StageSchedule(build_stages("sid", 2), 30, advance="plateau", patience=2, min_delta=0.1)
    # Improvements of 0.05 do not count: 1.0 best, 0.95 bad, 0.9 bad -> advance.
    assert _run(sched, [1.0, 0.95, 0.9]) == [False, False, True]
    # New stage: best resets. 3.0, 2.5 (improves by 0.5), 2.45 bad, 2.2 (by 0.3 over 2.5) good,
    # 2.15 bad, 2.2 bad -> advance.
    assert _run(sched, [3.0, 2.5, 2.45, 2.2, 2.15, 2.2]) == [False] * 5 + [True]
    assert sched.history == [0] * 3 + [1] * 6
    assert sched.stage.index == 2


def test_plateau_epochs_per_stage_cap() -> None:
    sched = StageSchedule(build_stages("pid", 2), 20, advance="plateau", epochs_per_stage=3)
    assert _run(sched, [3.0, 2.0, 1.0]) == [False, False, True]  # still improving, but capped
    assert _run(sched, [3.0, 2.0, 1.0]) == [False, False, True]
    assert sched.stage.name == "classifier"


def test_plateau_leaves_one_epoch_per_remaining_stage() -> None:
    # 4 stages, 6 epochs: the loss keeps improving, so only the reserve rule ends stages.
    sched = StageSchedule(build_stages("sid", 3), 6, advance="plateau", patience=5)
    advanced = _run(sched, [6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    # Stage 0 ends after epoch 3 (3 left = 3 later stages), then each stage gets one epoch.
    assert sched.history == [0, 0, 0, 1, 2, 3]
    assert advanced == [False, False, True, True, True, False]
    assert sched.classifier_epochs == 1

    tight = StageSchedule(build_stages("pid", 3), 4, advance="plateau")
    assert _run(tight, [1.0] * 4) == [True, True, True, False]


def test_plateau_non_finite_loss_never_improves() -> None:
    sched = StageSchedule(build_stages("pid", 1), 10, advance="plateau", patience=2)
    assert _run(sched, [float("nan"), float("nan")]) == [False, True]


# ----------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize(
    ("advance", "stop"), [("plateau", 4), ("plateau", 7), ("epochs", 5), ("epochs", 0)]
)
def test_state_dict_round_trip(advance: str, stop: int) -> None:
    stages = build_stages("sid", 3)
    losses = [1.0, 0.9, 0.95, 0.97, 0.5, 0.4, 0.45, 0.46, 0.1, 0.2, 0.3, 0.3, 0.3, 0.3]
    kwargs = {"advance": advance, "patience": 2, "min_delta": 0.01}

    straight = StageSchedule(stages, len(losses), **kwargs)
    expected = _run(straight, losses)

    first = StageSchedule(stages, len(losses), **kwargs)
    part = _run(first, losses[:stop])
    state = json.loads(json.dumps(first.state_dict()))
    resumed = StageSchedule(stages, len(losses), **kwargs)
    resumed.load_state_dict(state)
    assert resumed.epoch == stop and resumed.stage == first.stage
    rest = _run(resumed, losses[stop:])
    assert part + rest == expected
    assert resumed.history == straight.history
    assert resumed.classifier_epochs == straight.classifier_epochs
    assert resumed.state_dict() == straight.state_dict()


def test_load_state_dict_rejects_other_schedule() -> None:
    a = StageSchedule(build_stages("sid", 3), 10)
    a.end_epoch(1.0)
    with pytest.raises(ValueError, match="total_epochs"):
        StageSchedule(build_stages("sid", 3), 12).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="stage_names"):
        StageSchedule(build_stages("pid", 3), 10).load_state_dict(a.state_dict())
