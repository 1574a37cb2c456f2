"""The Pareto front of a multi-objective sweep: the trials no other trial beats on every
objective at once (``tune.objectives``). Pure pandas and numpy: the report lists and draws it,
``kdray export --trial`` takes any of its trials.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

#: Where each objective's value is in the trials table.
FOOTPRINT_COLUMNS = {"params": "student_params", "latency_ms": "latency_ms"}


def column(metric: str) -> str:
    """The trials-table column of an objective: ``best.dev.<metric>`` for a dev metric."""
    metric = metric.removeprefix("dev.")
    return FOOTPRINT_COLUMNS.get(metric, f"best.dev.{metric}")


def dominated(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """For ``values`` ``[n, k]`` (one row per trial, one column per objective): whether each
    row is dominated, i.e. another row is at least as good on every objective and better on
    one. Rows with a NaN are dominated (they did not measure every objective)."""
    sign = np.array([1.0 if mode == "max" else -1.0 for mode in modes])
    gains = values * sign  # every objective as "larger is better"
    n = len(gains)
    out = np.isnan(gains).any(axis=1)
    for i in range(n):
        if out[i]:
            continue
        others = gains[~np.isnan(gains).any(axis=1)]
        at_least = (others >= gains[i]).all(axis=1)
        better = (others > gains[i]).any(axis=1)
        out[i] = bool((at_least & better).any())
    return out


def front(trials: pd.DataFrame, objectives: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The finished trials on the Pareto front: trial id, each objective's value, the searched
    settings; sorted by the first objective, best first."""
    columns = [column(o["metric"]) for o in objectives]
    modes = [o["mode"] for o in objectives]
    ok = trials[trials["status"] == "ok"] if "status" in trials else trials
    missing = [c for c in columns if c not in ok.columns]
    if ok.empty or missing:
        return pd.DataFrame(columns=["trial_id", *columns])
    values = ok[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    chosen = ok[~dominated(values, modes)]
    params = [c for c in chosen.columns if c.startswith("param.")]
    table = chosen[["trial_id", *columns, *params]]
    return table.sort_values(columns[0], ascending=modes[0] == "min").reset_index(drop=True)
