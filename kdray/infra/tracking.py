"""Experiment tracking for ``kdray run``: the epoch records as TensorBoard scalars (no Ray).

A sweep's trials are tracked by Ray Tune's own logger callbacks (:mod:`kdray.experiments.sweep`); a
single run has no Ray, so :class:`TensorBoardReport` is the ``report`` callable that
:func:`kdray.training.distill.distill` calls after every epoch, writing the same numbers under the
same names so a run and a sweep's trials read alike in one TensorBoard.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The folder under a run's results folder that holds its TensorBoard event files.
TENSORBOARD_DIR = "tensorboard"
#: Record fields written as scalars: every loss term, dev metric (and best so far), lr, stage.
SCALAR_PREFIXES = ("loss.", "dev.", "best.dev.")
SCALAR_KEYS = ("lr", "stage", "classifier_epochs", "examples_per_s")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of an epoch record that belong on a learning curve (NaN left out:
    TensorBoard draws it as a gap anyway, and a staged run's early dev metrics may be NaN)."""
    chosen = {
        key: value
        for key, value in record.items()
        if key in SCALAR_KEYS or key.startswith(SCALAR_PREFIXES)
    }
    return {
        key: float(value)
        for key, value in chosen.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


class TensorBoardReport:
    """``report(record, save)`` for :func:`~kdray.training.distill.distill`: one scalar per record
    field per epoch (step = epoch) in ``<folder>``; call :meth:`close` when the run ends."""

    def __init__(self, folder: str | Path) -> None:
        from tensorboardX import SummaryWriter  # imported here: kdray run only

        self.folder = Path(folder)
        self.writer = SummaryWriter(str(self.folder), flush_secs=30)

    def __call__(self, record: dict[str, Any], save: Callable[[str | Path], None] | None) -> None:
        step = int(record["epoch"])
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a crashed run keeps its curve up to its last epoch

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardReport:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
