"""What a person watches while kdray works: a progress bar for a run, a live table of a sweep's
trials. No Ray in here: the sweep's Tune callback (in :mod:`kdray.experiments.sweep`) feeds
:class:`TrialsTable`, and the training loop talks to a :class:`ProgressHook`."""

from __future__ import annotations

import time
from typing import Any, Protocol

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


class ProgressHook(Protocol):
    """What a front end (the CLI's progress bar) is told while a run goes on."""

    def start(self, description: str, total: int) -> None: ...
    def advance(self, steps: int = 1, **fields: Any) -> None: ...
    def log(self, message: str) -> None: ...
    def finish(self, summary: str) -> None: ...


class NoProgress:
    """A ProgressHook that shows nothing (library calls, sweep trials)."""

    def start(self, description: str, total: int) -> None: ...
    def advance(self, steps: int = 1, **fields: Any) -> None: ...
    def log(self, message: str) -> None: ...
    def finish(self, summary: str) -> None: ...


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


def _short_params(values: dict[str, Any]) -> str:
    return " ".join(
        f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
        for k, v in values.items()
    )


class TrialsTable:
    """A rich table of a sweep's trials kept on screen while it runs: status, the trial's
    parameters, its epoch and stage, and the selection metric now and at its best.

    When the console is not a terminal (``nohup``, a batch job's log, CI), a live display would
    show nothing until the end: each event is then one timestamped line instead (a trial's
    start with its parameters, each epoch's metric, its end), and the whole table once at the
    end."""

    COLUMNS = ("status", "params", "epoch", "stage", "dev", "best")

    def __init__(self, title: str, metric: str, console: Console) -> None:
        self.title = title
        self.metric = metric
        self.console = console
        self.rows: dict[str, dict[str, Any]] = {}
        self.live: Live | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Ray pickles the run config (callbacks included) into the experiment state; the
        # terminal and the live display hold locks, so they are left behind.
        return {"title": self.title, "metric": self.metric, "rows": self.rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["title"], state["metric"], Console())  # type: ignore[misc]
        self.rows = state["rows"]

    def table(self) -> Table:
        table = Table(title=f"{self.title}: trials ({self.metric})")
        table.add_column("trial")
        for column in self.COLUMNS:
            table.add_column(column)
        for trial_id, row in sorted(self.rows.items()):
            table.add_row(trial_id, *(str(row.get(c, "")) for c in self.COLUMNS))
        return table

    def update(self, trial_id: str, params: dict[str, Any] | None = None, **fields: Any) -> None:
        """Set a trial's fields (``params`` once, as the values it runs with) and redraw."""
        row = self.rows.setdefault(trial_id, {})
        new_params = params is not None and "params" not in row
        if new_params:
            row["params"] = _short_params(params)
        changed = {k: v for k, v in fields.items() if row.get(k) != v}
        row.update(fields)
        if not self.console.is_terminal:
            if changed:
                line = self._line(trial_id, row, changed, new_params)
                self.console.print(
                    f"{time.strftime('%H:%M:%S')} {line}", markup=False, soft_wrap=True
                )
            return
        if self.live is None:
            self.live = Live(self.table(), console=self.console, refresh_per_second=2)
            self.live.start()
        self.live.update(self.table())

    def _line(
        self, trial_id: str, row: dict[str, Any], changed: dict[str, Any], new_params: bool
    ) -> str:
        """One event as a log line: a result as its epoch and metric, else the new status (with
        the parameters the first time the trial shows up)."""
        if "epoch" in changed or "dev" in changed:
            stage = f" ({row['stage']})" if row.get("stage") else ""
            line = f"{trial_id} epoch {row.get('epoch', '')}{stage}"
            if not row.get("dev"):  # a layer stage: no classifier yet, no dev evaluation
                return line
            return f"{line}: {self.metric} {row['dev']}, best {row.get('best', '')}"
        words = " ".join(f"{v}" if k == "status" else f"{k} {v}" for k, v in changed.items())
        return f"{trial_id} {words}" + (f"  {row['params']}" if new_params else "")

    def result(self, trial_id: str, result: dict[str, Any], objective: str) -> None:
        """An epoch's report: the selection metric of that epoch and the best so far."""
        value = result.get(f"dev.{self.metric}")
        best = result.get(objective)
        self.update(
            trial_id,
            epoch=result.get("epoch", ""),
            stage=result.get("stage_name", ""),
            dev="" if value is None else f"{value:.4f}",
            best="" if best is None or best != best else f"{best:.4f}",
        )

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        elif self.rows and not self.console.is_terminal:
            self.console.print(self.table())
