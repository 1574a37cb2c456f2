"""Stages and the schedule that walks through them, testable without a model.

A ``Stage`` says which loss terms are on and which student parts are frozen (each algorithm's stages
are built in :mod:`kdray.method.algorithms`); ``StageSchedule`` decides which stage each epoch
belongs to. Both are pure Python so the progressive (PID) and stacked (SID) algorithms of Aguilar et
al. (AAAI 2020) can be checked exhaustively in unit tests, and a checkpointed run can resume
mid-schedule exactly.

Student layers are numbered 1..L (1-based); 0 means the embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["ADVANCE_MODES", "Stage", "StageSchedule"]

ADVANCE_MODES: tuple[str, ...] = ("epochs", "plateau")

_STATE_VERSION = 1


@dataclass(frozen=True)
class Stage:
    """One stage of a schedule: which loss terms are on and which student parts are frozen."""

    index: int  # 0-based position in the schedule
    name: str  # e.g. "all", "layer 1", "layers 1-2", "classifier"
    internal_layers: tuple[int, ...]  # student layers whose attention/hidden losses are on
    soft: bool  # soft-label term on
    hard: bool  # hard-label term on
    frozen: tuple[int, ...] = ()  # frozen student parts (0 = embeddings, k = encoder layer k)

    @property
    def trains_classifier(self) -> bool:
        """Whether this stage trains the classification head.

        Dev metrics mean something only once such a stage has started (model selection should
        ignore earlier epochs).
        """
        return self.soft or self.hard


class StageSchedule:
    """Decides which stage each epoch belongs to; pure Python so it can be unit-tested and
    checkpointed.

    ``advance="epochs"``: fixed lengths. Without ``epochs_per_stage`` the epochs are split evenly
    with the remainder going to the final stage (50 epochs, 4 stages -> 12, 12, 12, 14); with
    ``epochs_per_stage=n`` every stage but the last gets n epochs and the last the rest.

    ``advance="plateau"``: a non-final stage ends when its loss has not improved by more than
    ``min_delta`` over the stage's best for ``patience`` consecutive epochs, when it reaches
    ``epochs_per_stage`` (if given), or when the remaining epochs are just enough to give every
    later stage one epoch. The final stage runs until ``total_epochs``.
    """

    def __init__(
        self,
        stages: list[Stage],
        total_epochs: int,
        *,
        advance: str = "epochs",
        epochs_per_stage: int | None = None,
        patience: int = 2,
        min_delta: float = 0.0,
    ) -> None:
        if not stages:
            raise ValueError("StageSchedule needs at least one stage")
        if [s.index for s in stages] != list(range(len(stages))):
            raise ValueError("stage indices must be 0, 1, ..., len(stages) - 1 in order")
        if advance not in ADVANCE_MODES:
            raise ValueError(f"advance must be one of {ADVANCE_MODES}, got {advance!r}")
        if total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
        if epochs_per_stage is not None and epochs_per_stage < 1:
            raise ValueError(f"epochs_per_stage must be >= 1 or None, got {epochs_per_stage}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        n = len(stages)
        if total_epochs < n:
            raise ValueError(
                f"total_epochs={total_epochs} is fewer than the {n} stages of this schedule "
                f"(every stage needs at least one epoch): raise total_epochs to at least {n}"
            )

        self._stages = list(stages)
        self._total = total_epochs
        self._advance = advance
        self._epochs_per_stage = epochs_per_stage
        self._patience = patience
        self._min_delta = float(min_delta)

        self._plan: list[int] | None = None
        if advance == "epochs":
            if epochs_per_stage is None:
                base = total_epochs // n
                self._plan = [base] * (n - 1) + [total_epochs - base * (n - 1)]
            else:
                last = total_epochs - epochs_per_stage * (n - 1)
                if last < 1:
                    raise ValueError(
                        f"epochs_per_stage={epochs_per_stage} over the first {n - 1} stages "
                        f"leaves {last} of total_epochs={total_epochs} for the final stage: "
                        f"lower epochs_per_stage to at most {(total_epochs - 1) // (n - 1)} or "
                        f"raise total_epochs to at least {epochs_per_stage * (n - 1) + 1}"
                    )
                self._plan = [epochs_per_stage] * (n - 1) + [last]

        # Mutable progress (everything in state_dict).
        self._epoch = 0
        self._stage_index = 0
        self._stage_epochs = 0
        self._best: float | None = None
        self._bad_epochs = 0
        self._history: list[int] = []

    # ------------------------------------------------------------------ queries
    @property
    def stages(self) -> list[Stage]:
        """All stages, in order."""
        return list(self._stages)

    @property
    def stage(self) -> Stage:
        """The stage the next (or current) epoch belongs to; the final stage once finished."""
        return self._stages[self._stage_index]

    @property
    def epoch(self) -> int:
        """Epochs completed so far."""
        return self._epoch

    @property
    def stage_epoch(self) -> int:
        """Epochs completed so far in the current stage."""
        return self._stage_epochs

    @property
    def total_epochs(self) -> int:
        return self._total

    @property
    def finished(self) -> bool:
        """All ``total_epochs`` have been recorded."""
        return self._epoch >= self._total

    @property
    def classifier_epochs(self) -> int:
        """Completed epochs that belonged to a stage training the classifier head."""
        return sum(1 for i in self._history if self._stages[i].trains_classifier)

    @property
    def history(self) -> list[int]:
        """Stage index of each completed epoch (a copy)."""
        return list(self._history)

    def plan(self) -> list[int] | None:
        """Epochs per stage when ``advance="epochs"``; None for plateau (decided at run time)."""
        return None if self._plan is None else list(self._plan)

    # ------------------------------------------------------------------ progress
    def end_epoch(self, stage_loss: float) -> bool:
        """Record one finished epoch with the mean loss of the current stage's terms.

        Returns True if the NEXT epoch belongs to a new stage (the caller then re-applies
        freezing and loss toggles, and may reset its optimizer). Raises RuntimeError if the
        schedule is already finished.
        """
        if self.finished:
            raise RuntimeError(f"the schedule is finished: all {self._total} epochs are recorded")
        self._history.append(self._stage_index)
        self._epoch += 1
        self._stage_epochs += 1
        if self.finished or self._stage_index == len(self._stages) - 1:
            return False

        if self._advance == "epochs":
            assert self._plan is not None
            done = self._stage_epochs >= self._plan[self._stage_index]
        else:
            done = self._plateau_done(float(stage_loss))
        if done:
            self._stage_index += 1
            self._stage_epochs = 0
            self._best = None
            self._bad_epochs = 0
        return done

    def _plateau_done(self, loss: float) -> bool:
        # A non-finite loss never counts as an improvement (and never becomes the best).
        if math.isfinite(loss) and (self._best is None or self._best - loss > self._min_delta):
            self._best = loss
            self._bad_epochs = 0
        else:
            self._bad_epochs += 1
        later_stages = len(self._stages) - 1 - self._stage_index
        return (
            self._bad_epochs >= self._patience
            or (self._epochs_per_stage is not None and self._stage_epochs >= self._epochs_per_stage)
            or self._total - self._epoch <= later_stages
        )

    # ------------------------------------------------------------------ checkpointing
    def _settings(self) -> dict[str, Any]:
        """How this schedule was built: a saved state only resumes into the same settings."""
        return {
            "stage_names": [s.name for s in self._stages],
            "total_epochs": self._total,
            "advance": self._advance,
            "epochs_per_stage": self._epochs_per_stage,
            "patience": self._patience,
            "min_delta": self._min_delta,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable progress (plus the settings, to catch a mismatched resume)."""
        return {
            "version": _STATE_VERSION,
            **self._settings(),
            "epoch": self._epoch,
            "stage_index": self._stage_index,
            "stage_epochs": self._stage_epochs,
            "best": self._best,
            "bad_epochs": self._bad_epochs,
            "history": list(self._history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress saved by ``state_dict``; the schedule must be built the same way."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported schedule state version {state.get('version')!r}")
        for key, value in self._settings().items():
            if state.get(key) != value:
                raise ValueError(
                    f"schedule state does not match this schedule: {key} is {state.get(key)!r} "
                    f"in the state but {value!r} here"
                )
        history = [int(i) for i in state["history"]]
        if len(history) != int(state["epoch"]) or not 0 <= state["stage_index"] < len(self._stages):
            raise ValueError("corrupt schedule state: epoch, history and stage_index disagree")
        self._epoch = int(state["epoch"])
        self._stage_index = int(state["stage_index"])
        self._stage_epochs = int(state["stage_epochs"])
        self._best = None if state["best"] is None else float(state["best"])
        self._bad_epochs = int(state["bad_epochs"])
        self._history = history

    def __repr__(self) -> str:
        return (
            f"StageSchedule(stage={self.stage.name!r}, epoch={self._epoch}/{self._total}, "
            f"advance={self._advance!r})"
        )
