"""What a person watches while kdray works: a progress bar for a run, a live trials table for a
sweep. Module-level classes, so Ray pickles the sweep's callback by reference."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from kdray.spec import Spec


class RichProgress:
    """The training loop's ProgressHook as a rich progress bar; epoch lines print above it
    (and are the whole output when the console is not a terminal)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task: Any = None

    def start(self, description: str, total: int) -> None:
        if self._task is None:
            self._progress.start()
        else:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(description, total=total, info="")

    def advance(self, steps: int = 1, **fields: Any) -> None:
        info = " ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
        )
        self._progress.update(self._task, advance=steps, info=info)

    def log(self, message: str) -> None:
        self._progress.console.print(message)

    def finish(self, summary: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, info=summary)
        self._progress.stop()
        self._task = None


class LiveTrials(Callback):
    """A Tune callback keeping a rich table of the trials on screen while a sweep runs."""

    COLUMNS = ("status", "params", "epoch", "stage", "dev", "best")

    def __init__(self, spec: Spec, console: Console) -> None:
        self.spec = spec
        self.console = console
        self.rows: dict[str, dict[str, Any]] = {}
        self.live: Live | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Ray pickles the run config (callbacks included) into the experiment state; the
        # terminal and the live display hold locks, so they are left behind.
        return {"spec": self.spec, "rows": self.rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"], Console())  # type: ignore[misc]
        self.rows = state["rows"]

    def _table(self) -> Table:
        table = Table(title=f"{self.spec.name}: trials")
        table.add_column("trial")
        for column in self.COLUMNS:
            table.add_column(column)
        for trial_id, row in sorted(self.rows.items()):
            table.add_row(trial_id, *(str(row.get(c, "")) for c in self.COLUMNS))
        return table

    def _update(self, trial: Any, **fields: Any) -> None:
        from kdray.tune import trial_spec

        row = self.rows.setdefault(trial.trial_id, {})
        if "params" not in row:
            _, values = trial_spec(self.spec, trial.config)
            row["params"] = " ".join(
                f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                for k, v in values.items()
            )
        row.update(fields)
        if self.live is None:
            self.live = Live(self._table(), console=self.console, refresh_per_second=2)
            self.live.start()
        self.live.update(self._table())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, status="running")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        metric = next((k for k in result if k.startswith("dev.")), None)
        best = result.get("objective")
        self._update(
            trial,
            epoch=result.get("epoch", ""),
            stage=result.get("stage_name", ""),
            dev=f"{result[metric]:.4f}" if metric else "",
            best="" if best is None or best != best else f"{best:.4f}",
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, status="done")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, status="error")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
