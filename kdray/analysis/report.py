"""Tables and words over results tables: what an ablation or a sweep actually showed.

Every function takes and returns plain DataFrames (the ``trials``/``epochs`` tables of
``kdray.analysis.results``), so what ``kdray report`` prints a notebook user can recompute and
extend.

Ablations (tables with a ``cell`` column, several seeds per cell) are summarised per cell and
each cell is compared with a baseline cell *paired by seed*: runs sharing a seed share data
order and initialisation noise, so the per-seed differences are far less noisy than the
difference of two independent means. Sweeps (no ``cell`` column) get the best trials, the best
trial per algorithm and a fANOVA parameter importance.

The statistics behind every verdict are ``kdray.analysis.stats``'s; the plots of these tables are
``kdray.analysis.plots``'s (``plots.draw(report, folder)``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

import kdray.analysis.pareto as pareto
import kdray.analysis.results as results
import kdray.analysis.stats as st
from kdray.analysis.results import is_missing
from kdray.method.algorithms import INTERNAL

__all__ = [
    "Report",
    "best_per",
    "build_report",
    "cell_summary",
    "cka_means",
    "learning_curves",
    "paired_comparison",
    "parameter_importance",
    "read_experiment",
    "render",
    "sweep_summary",
]

CKA_FILE = "cka.parquet"
# Written by the runners next to trials.parquet: {"spec": <the full spec as JSON>, ...}.
EXPERIMENT_FILE = "experiment.json"
OK = "ok"
MODES = ("max", "min")
DEFAULT_MODE = "max"
DEFAULT_ALPHA = 0.05

# Columns of a trials row that are neither settings nor metrics (see
# kdray.analysis.results.trial_row).
_NOT_SETTINGS = {
    "name",
    "trial_id",
    "status",
    "error",
    "kdray_version",
    "spec_fingerprint",
    "metric",
    "mode",
    "best_epoch",
    "epochs_run",
    "wall_time",
    "examples_per_s",
    "student_params",
    "teacher_params",
    "student_path",
    "cell",
    "seed",
    "precision",  # what ran (train.precision is what was asked)
    "node_id",  # where Ray ran the trial
    "resumed_from_epoch",  # restarted from a checkpoint (a lost worker, a --resume)
}
_RESULT_PREFIXES = ("best.", "final.", "teacher.", "diag.")
# Settings that describe where/how a run was executed, not what it was: never "parameters".
_BOOKKEEPING_PREFIXES = ("data.dir", "data.cache_dir", "train.device", "teacher.cache")

Fmt = Literal["table", "markdown", "csv"]
# Per-run diagnostics (kdray.method.diagnostics) worth a per-cell mean in the summary.
_DIAG_SUMMARY = ("diag.cka.mean", "diag.attention_kl.mean", "diag.agreement")


# ---------------------------------------------------------------------------------------------
# Small helpers


def _folder(path: str | Path) -> Path:
    """A results folder, given the folder or a file in it (as ``kdray.analysis.results.load``
    accepts).

    A path that does not exist stays itself, so nothing is read from its parent folder."""
    path = Path(path)
    return path.parent if path.is_file() else path


def read_experiment(folder: str | Path) -> dict[str, Any] | None:
    """The folder's ``experiment.json`` as a dict (its ``spec`` is the run's full spec), or None.

    Older results folders have no such file: the report then falls back to what the trials table
    records and to its own defaults, so a missing file is not an error. A file that is there but
    unreadable is, because the settings it would have given (baseline, metric direction) would
    otherwise be silently replaced by defaults.
    """
    path = _folder(folder) / EXPERIMENT_FILE
    if not path.is_file():
        return None
    try:
        experiment = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); repair or delete it to report without it"
        ) from None
    if not isinstance(experiment, dict):
        raise ValueError(
            f"{path} must hold a JSON object with a 'spec' key, got {type(experiment).__name__}"
        )
    spec = experiment.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise ValueError(f"{path}: 'spec' must be a JSON object, got {type(spec).__name__}")
    return experiment


def _spec_value(experiment: dict[str, Any] | None, *keys: str) -> Any:
    """``experiment["spec"][k1][k2]...`` or None where any level is missing or null."""
    value: Any = (experiment or {}).get("spec")
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _ok(trials: pd.DataFrame) -> pd.DataFrame:
    """Rows of runs that finished; failed and diverged runs carry no comparable metric."""
    if "status" not in trials.columns:
        return trials
    return trials[trials["status"] == OK]


def _group_column(trials: pd.DataFrame) -> str:
    """What an ablation varies: its ``cell``; else the distillation algorithm."""
    if "cell" in trials.columns:
        return "cell"
    if "distill.algorithm" in trials.columns:
        return "distill.algorithm"
    raise ValueError(
        "trials have neither a 'cell' nor a 'distill.algorithm' column to group runs by; "
        "write the table with kdray.analysis.results (which records both) or add one of them"
    )


def _seed_column(trials: pd.DataFrame) -> str:
    for column in ("seed", "train.seed"):
        if column in trials.columns:
            return column
    raise ValueError("trials have no 'seed' (or 'train.seed') column to pair runs by")


def _metric_names(trials: pd.DataFrame) -> list[str]:
    return [c.removeprefix("best.dev.") for c in trials.columns if c.startswith("best.dev.")]


def main_metric(trials: pd.DataFrame) -> str:
    """The selection metric the runs used (the most common value of the ``metric`` column)."""
    if "metric" in trials.columns and trials["metric"].notna().any():
        return str(trials["metric"].dropna().astype(str).mode().iloc[0])
    names = _metric_names(trials)
    if not names:
        raise ValueError("trials have no 'metric' column and no best.dev.<metric> columns")
    return names[0]


def _metric_column(trials: pd.DataFrame, metric: str) -> str:
    """Accept ``accuracy``, ``dev.accuracy`` or a full column name such as ``best.dev.accuracy``."""
    if metric in trials.columns:
        return metric
    name = metric.removeprefix("dev.")
    column = f"best.dev.{name}"
    if column not in trials.columns:
        present = ", ".join(_metric_names(trials)) or "none"
        raise ValueError(
            f"no column for metric {metric!r} (looked for {column!r}); metrics present: {present}"
        )
    return column


def _short(metric_column: str) -> str:
    return metric_column.removeprefix("best.dev.")


def _ci95(std: float, n: int) -> float:
    """Half-width of the t-based 95% confidence interval of a mean (NaN with < 2 values)."""
    if n < 2 or not np.isfinite(std):
        return float("nan")
    return float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))


def setting_columns(trials: pd.DataFrame) -> list[str]:
    """Columns holding run settings (``train.lr``, ``distill.layer_map`` ...), not results."""
    return [
        c
        for c in trials.columns
        if c not in _NOT_SETTINGS
        and not c.startswith(_RESULT_PREFIXES)
        and not c.startswith(_BOOKKEEPING_PREFIXES)
    ]


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    if isinstance(value, np.ndarray):
        return json.dumps(value.tolist())
    return value


MIN_IMPORTANCE_TRIALS = 10


def searched_settings(trials: pd.DataFrame, experiment: dict[str, Any] | None) -> list[str]:
    """The settings a sweep searched, once each: the spec's ``search:`` keys that vary among
    the rows (``experiment.json``), else the varying settings. Never Ray's bookkeeping
    (``node_id``) nor the ``param.*`` copies of the searched values."""
    search = _spec_value(experiment, "search")
    varying = [c for c in varying_settings(trials) if not c.startswith("param.")]
    if isinstance(search, dict) and search:
        return [key for key in search if key in varying]
    return varying


def varying_settings(trials: pd.DataFrame) -> list[str]:
    """Setting columns that take more than one value among the given rows."""
    return [
        c for c in setting_columns(trials) if trials[c].map(_hashable).nunique(dropna=False) > 1
    ]


def _ordered_groups(frame: pd.DataFrame, column: str) -> list[Any]:
    """Group keys in order of first appearance (the grid order of an ablation)."""
    return list(dict.fromkeys(frame[column].map(_hashable).tolist()))


# ---------------------------------------------------------------------------------------------
# Ablations


def cell_summary(trials: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """Mean, std (ddof=1), t-based 95% CI half-width and n of every best dev metric per cell.

    Grouped by ``cell`` (or ``distill.algorithm`` without one) over the runs with status ok, in
    order of first appearance. ``teacher.<m>`` is the mean teacher dev score and
    ``retention.<m> = 100 * <m>.mean / teacher.<m>``, the paper's way of stating how much of the
    teacher a student keeps. ``n`` counts the ok runs with a value of the first metric,
    ``n_pruned`` the runs a scheduler stopped early and ``n_failed`` those that failed,
    diverged or did not finish. Where the runs recorded
    representation diagnostics, the cell means of ``diag.cka.mean``, ``diag.attention_kl.mean``
    and ``diag.agreement`` are added, so "behaves more like the teacher" sits beside the score.
    """
    group = _group_column(trials)
    ok = _ok(trials)
    names = metrics if metrics is not None else _metric_names(trials)
    columns = [_metric_column(trials, m) for m in names]
    keys = _ordered_groups(trials, group)
    records = []
    for key in keys:
        rows = ok[ok[group].map(_hashable) == key]
        all_rows = trials[trials[group].map(_hashable) == key]
        record: dict[str, Any] = {group: key}
        for i, column in enumerate(columns):
            values = pd.to_numeric(rows[column], errors="coerce").dropna()
            short = _short(column)
            n = int(values.size)
            mean = float(values.mean()) if n else float("nan")
            std = float(values.std(ddof=1)) if n > 1 else float("nan")
            record[f"{short}.mean"] = mean
            record[f"{short}.std"] = std
            record[f"{short}.ci95"] = _ci95(std, n)
            if i == 0:
                record["n"] = n
        pruned = int((all_rows["status"] == "pruned").sum()) if "status" in all_rows else 0
        record["n_pruned"] = pruned  # stopped early by the scheduler: partial, not failed
        record["n_failed"] = int(len(all_rows) - len(rows)) - pruned
        for column in columns:
            short = _short(column)
            teacher_column = f"teacher.dev.{short}"
            if teacher_column in trials.columns:
                teacher = pd.to_numeric(rows[teacher_column], errors="coerce").mean()
                record[f"teacher.{short}"] = float(teacher)
                mean = record[f"{short}.mean"]
                record[f"retention.{short}"] = (
                    100.0 * mean / teacher if teacher and np.isfinite(teacher) else float("nan")
                )
        for column in _DIAG_SUMMARY:
            if column in trials.columns:
                record[column] = float(pd.to_numeric(rows[column], errors="coerce").mean())
        if "student_params" in trials.columns:
            params = pd.to_numeric(rows["student_params"], errors="coerce").dropna()
            record["student_params"] = int(params.median()) if len(params) else pd.NA
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        frame = pd.DataFrame(columns=[group, "n", "n_pruned", "n_failed"])
    # Readable order: the group, n, then per metric, then teacher/retention, params last.
    first = [group, "n", "n_pruned", "n_failed"]
    rest = [c for c in frame.columns if c not in first]
    return frame[first + rest].reset_index(drop=True)


def _select_baseline(trials: pd.DataFrame, baseline: str | dict[str, Any], group: str) -> Any:
    keys = _ordered_groups(trials, group)
    if isinstance(baseline, str):
        if baseline not in keys:
            raise ValueError(
                f"baseline {baseline!r} is not a {group} of these trials "
                f"(present: {', '.join(map(str, keys))})"
            )
        return baseline
    if not isinstance(baseline, dict) or not baseline:
        raise ValueError("baseline must be a cell name or a non-empty {setting: value} dict")
    missing = [k for k in baseline if k not in trials.columns]
    if missing:
        raise ValueError(f"baseline settings {missing} are not columns of the trials table")
    matches = []
    for key in keys:
        rows = trials[trials[group].map(_hashable) == key]
        if all(
            (rows[k].map(_hashable) == _hashable(v)).all() and len(rows)
            for k, v in baseline.items()
        ):
            matches.append(key)
    if len(matches) != 1:
        found = ", ".join(map(str, matches)) or "none"
        raise ValueError(
            f"baseline {baseline} must select exactly one {group}; it selects {found}. "
            "Give the cell name instead."
        )
    return matches[0]


def paired_differences(
    trials: pd.DataFrame, baseline: str | dict[str, Any], metric: str
) -> tuple[Any, dict[Any, pd.DataFrame]]:
    """``(baseline cell, {cell: frame})``: per compared cell the seeds it shares with the
    baseline, in seed order, with ``value``, ``baseline_value`` and ``diff`` (cell minus
    baseline). Several ok runs of one cell with the same seed are averaged first."""
    group = _group_column(trials)
    seed_column = _seed_column(trials)
    column = _metric_column(trials, metric)
    base = _select_baseline(trials, baseline, group)
    ok = _ok(trials).copy()
    ok["_group"] = ok[group].map(_hashable)
    ok["_value"] = pd.to_numeric(ok[column], errors="coerce")
    ok = ok.dropna(subset=["_value"])
    per_seed = ok.groupby(["_group", seed_column], sort=False)["_value"].mean()
    groups = set(per_seed.index.get_level_values(0))
    base_values = per_seed.loc[base] if base in groups else pd.Series(dtype=float)
    out: dict[Any, pd.DataFrame] = {}
    for key in _ordered_groups(trials, group):
        if key == base:
            continue
        values = per_seed.loc[key] if key in groups else pd.Series(dtype=float)
        common = sorted(set(values.index) & set(base_values.index))
        frame = pd.DataFrame(
            {
                "seed": common,
                "value": [float(values[s]) for s in common],
                "baseline_value": [float(base_values[s]) for s in common],
            }
        )
        frame["diff"] = frame["value"] - frame["baseline_value"]
        out[key] = frame
    return base, out


def paired_comparison(
    trials: pd.DataFrame,
    baseline: str | dict[str, Any],
    metric: str,
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Every cell against the baseline cell, paired by seed over the seeds both have.

    Per cell: ``n_pairs``, the two means over the paired seeds, ``mean_diff`` (cell minus baseline),
    the ``confidence`` (default 95 %) t-interval of the mean difference (``ci_low``, ``ci_high``), a
    BCa bootstrap interval beside it only from :data:`kdray.analysis.stats.MIN_BOOTSTRAP_PAIRS`
    pairs on (``boot_low``, ``boot_high``; ``n_boot`` resamples seeded with ``seed``), the paired
    t-test p (``p_ttest``), its Holm-adjusted value over the compared cells (``p_ttest_holm``,
    statsmodels) and the exact sign-flip p (``p_signflip``). ``baseline`` is a cell name or
    ``{setting: value}`` selecting exactly one cell (e.g. ``{"distill.algorithm": "soft"}``).
    """
    _check_confidence(confidence)
    group = _group_column(trials)
    base, pairs = paired_differences(trials, baseline, metric)
    records = []
    for key, frame in pairs.items():
        diff = frame["diff"].to_numpy()
        n = int(diff.size)
        record: dict[str, Any] = {
            group: key,
            "baseline": base,
            "n_pairs": n,
            "mean": float(frame["value"].mean()) if n else math.nan,
            "baseline_mean": float(frame["baseline_value"].mean()) if n else math.nan,
            "mean_diff": float(diff.mean()) if n else math.nan,
        }
        record["ci_low"], record["ci_high"] = (
            (float(diff[0]),) * 2 if n == 1 else st.t_interval(diff, confidence)
        )
        record["boot_low"], record["boot_high"] = st.bca_interval(diff, confidence, seed, n_boot)
        record["p_ttest"] = st.ttest_p(diff)
        record["p_signflip"] = st.signflip_p(diff)
        records.append(record)
    columns = [
        group, "baseline", "n_pairs", "mean", "baseline_mean", "mean_diff", "ci_low", "ci_high",
        "boot_low", "boot_high", "p_ttest", "p_ttest_holm", "p_signflip",
    ]  # fmt: skip
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame["p_ttest_holm"] = st.adjust(frame["p_ttest"].tolist(), "holm")
    return frame[columns]


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence!r}")


# ---------------------------------------------------------------------------------------------
# Sweeps


def _ascending(mode: str) -> bool:
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    return mode == "min"


def sweep_summary(
    trials: pd.DataFrame, metric: str, mode: str = "max", top: int = 10
) -> pd.DataFrame:
    """The ``top`` ok trials by ``best.dev.<metric>``, with the settings that vary among them."""
    column = _metric_column(trials, metric)
    ok = _ok(trials)
    ok = ok[pd.to_numeric(ok[column], errors="coerce").notna()]
    varying = varying_settings(ok)
    keep = [c for c in ("trial_id", "cell") if c in ok.columns] + [column] + varying
    keep += [c for c in ("best_epoch", "epochs_run", "wall_time") if c in ok.columns]
    ordered = ok.sort_values(column, ascending=_ascending(mode), kind="stable")
    frame = ordered[list(dict.fromkeys(keep))].head(top).reset_index(drop=True)
    return frame.rename(columns={column: _short(column)})


def best_per(
    trials: pd.DataFrame,
    column: str = "distill.algorithm",
    metric: str | None = None,
    mode: str = "max",
) -> pd.DataFrame:
    """The best ok trial for every value of ``column`` (e.g. the best run of each algorithm)."""
    metric_column = _metric_column(trials, metric or main_metric(trials))
    ok = _ok(trials)
    ok = ok[pd.to_numeric(ok[metric_column], errors="coerce").notna()]
    if column not in ok.columns:
        raise ValueError(f"no column {column!r} in the trials table")
    varying = [c for c in varying_settings(ok) if c != column]
    ordered = ok.sort_values(metric_column, ascending=_ascending(mode), kind="stable")
    best = ordered.assign(_key=ordered[column].map(_hashable)).drop_duplicates("_key")
    keep = [column] + [c for c in ("trial_id",) if c in ok.columns] + [metric_column] + varying
    frame = best[list(dict.fromkeys(keep))].reset_index(drop=True)
    return frame.rename(columns={metric_column: _short(metric_column)})


def _distribution(values: pd.Series) -> tuple[Any, list[Any]] | None:
    """An optuna distribution for a column and the row values mapped into it; None if constant."""
    import optuna.distributions as od

    if values.map(_hashable).nunique(dropna=False) < 2:
        return None
    numeric = (
        pd.api.types.is_numeric_dtype(values)
        and not pd.api.types.is_bool_dtype(values)
        and values.notna().all()
    )
    if numeric:
        low, high = float(values.min()), float(values.max())
        log = low > 0 and high / low > 10
        if pd.api.types.is_integer_dtype(values):
            return od.IntDistribution(int(low), int(high), log=log and low >= 1), [
                int(v) for v in values
            ]
        return od.FloatDistribution(low, high, log=log), [float(v) for v in values]
    as_text = [str(_hashable(v)) if not is_missing(v) else "None" for v in values]
    choices = list(dict.fromkeys(as_text))
    return od.CategoricalDistribution(choices), as_text


def parameter_importance(
    trials: pd.DataFrame, params: list[str], metric: str, mode: str = "max"
) -> pd.DataFrame:
    """fANOVA importance (optuna, seed 0) of each varying parameter for ``best.dev.<metric>``.

    The ok rows become a fresh in-memory optuna study: strings, bools and lists are categorical
    (as text), integers ``IntDistribution``, floats ``FloatDistribution``, on a log scale when a
    positive column spans more than a decade (fANOVA weighs a parameter's effect over its range,
    so the scale matters). Constant parameters are left out; fewer than 3 complete rows or nothing
    varying, or the same score for every row (fANOVA has no variance to split), gives an empty
    frame. Columns ``param, importance`` (summing to 1), most important
    first.
    """
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    empty = pd.DataFrame({"param": pd.Series(dtype=str), "importance": pd.Series(dtype=float)})
    column = _metric_column(trials, metric)
    missing = [p for p in params if p not in trials.columns]
    if missing:
        raise ValueError(f"parameters {missing} are not columns of the trials table")
    ok = _ok(trials)
    ok = ok.assign(_value=pd.to_numeric(ok[column], errors="coerce"))
    ok = ok[ok["_value"].map(lambda v: bool(np.isfinite(v)))]
    numeric_params = [
        p
        for p in params
        if pd.api.types.is_numeric_dtype(ok[p]) and not pd.api.types.is_bool_dtype(ok[p])
    ]
    ok = ok.dropna(subset=numeric_params)
    if len(ok) < 3 or ok["_value"].nunique() < 2:
        return empty  # with one score for every trial, no setting explains anything
    distributions: dict[str, Any] = {}
    values: dict[str, list[Any]] = {}
    for param in params:
        found = _distribution(ok[param].reset_index(drop=True))
        if found is not None:
            distributions[param], values[param] = found
    if not distributions:
        return empty

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        for i, value in enumerate(ok["_value"].tolist()):
            study.add_trial(
                optuna.trial.create_trial(
                    params={p: values[p][i] for p in distributions},
                    distributions=dict(distributions),
                    value=float(value),
                )
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = get_param_importances(
                study, evaluator=FanovaImportanceEvaluator(seed=0), params=list(distributions)
            )
    finally:
        optuna.logging.set_verbosity(verbosity)
    frame = pd.DataFrame(
        {"param": list(importances), "importance": [float(v) for v in importances.values()]}
    )
    return frame.sort_values("importance", ascending=False, kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Learning curves


def _join_keys(left: pd.DataFrame, right: pd.DataFrame) -> list[str]:
    keys = [k for k in ("name", "trial_id") if k in left.columns and k in right.columns]
    if "trial_id" not in keys:
        raise ValueError("epochs and trials must both have a 'trial_id' column to be joined")
    return keys


def learning_curves(
    epochs: pd.DataFrame, trials: pd.DataFrame, metric: str, by: str | None = None
) -> pd.DataFrame:
    """Mean and std of ``dev.<metric>`` per group and epoch, over the ok runs, with stages.

    ``by`` defaults to ``cell`` when the trials have one, else ``distill.algorithm``: a cell is
    what an ablation varies, and it equals the algorithm in an algorithm ablation. ``stage`` and
    ``stage_name`` are the most common stage of the group's runs at that epoch and
    ``stage_start`` marks the epochs where it differs from the epoch before (the stage
    boundaries). Columns: ``<by>, epoch, mean, std, n, stage, stage_name, stage_start``.
    """
    group = by or _group_column(trials)
    name = metric.removeprefix("best.dev.").removeprefix("dev.")
    column = f"dev.{name}"
    out_columns = [group, "epoch", "mean", "std", "n", "stage", "stage_name", "stage_start"]
    if epochs.empty or column not in epochs.columns:
        return pd.DataFrame(columns=out_columns)
    keys = _join_keys(epochs, trials)
    info = _ok(trials)[keys + [group]].drop_duplicates(keys)
    info = info.assign(**{group: info[group].map(_hashable)})
    joined = epochs.drop(columns=[group], errors="ignore").merge(info, on=keys, how="inner")
    if joined.empty:
        return pd.DataFrame(columns=out_columns)
    joined[column] = pd.to_numeric(joined[column], errors="coerce")
    records = []
    for key in _ordered_groups(joined, group):
        rows = joined[joined[group] == key]
        previous_stage: Any = None
        for epoch, at in rows.groupby("epoch", sort=True):
            values = at[column].dropna()
            stage = at["stage"].mode().iloc[0] if "stage" in at.columns else pd.NA
            stage_name = (
                at.loc[at["stage"] == stage, "stage_name"].iloc[0]
                if "stage_name" in at.columns and "stage" in at.columns
                else pd.NA
            )
            records.append(
                {
                    group: key,
                    "epoch": epoch,
                    "mean": float(values.mean()) if len(values) else float("nan"),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
                    "n": int(len(values)),
                    "stage": stage,
                    "stage_name": stage_name,
                    "stage_start": bool(
                        previous_stage is not None
                        and not is_missing(stage)
                        and not is_missing(previous_stage)
                        and stage != previous_stage
                    ),
                }
            )
            previous_stage = stage
    return pd.DataFrame.from_records(records, columns=out_columns)


# ---------------------------------------------------------------------------------------------
# CKA per group (what kdray.analysis.plots draws as heatmaps)


_CKA_VALUES = ("student_layer", "teacher_layer", "cka")
# What a CKA panel is per when ``by`` is not given: the first of these the table has.
_CKA_GROUPS = ("cell", "distill.algorithm", "algorithm")
_ALL_RUNS = "runs"


def cka_means(cka_long: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Mean linear CKA per group, student layer and teacher layer
    (``kdray.analysis.plots.plot_cka``).

    ``cka_long`` is ``cka.parquet`` (``name, trial_id, student_layer, teacher_layer, cka``)
    joined with the trials' ``cell`` or ``distill.algorithm``, as ``Report.cka`` is. ``by=None``
    groups by ``cell``, else ``distill.algorithm``, else ``algorithm``, else puts every run in
    one group ``runs = "all runs"``; a ``by`` that is not a column is an error rather than one
    silent all-runs panel. Columns: ``<by>, student_layer, teacher_layer, cka, n`` (n: runs).
    """
    missing = [c for c in _CKA_VALUES if c not in cka_long.columns]
    if missing:
        raise ValueError(
            f"cka_long needs columns {list(_CKA_VALUES)}, has {list(cka_long.columns)}: "
            f"{missing} missing"
        )
    if by is None:
        by = next((c for c in _CKA_GROUPS if c in cka_long.columns), None)
    if by is None:
        by = _ALL_RUNS
        frame = cka_long.assign(**{by: "all runs"})
    elif by not in cka_long.columns:
        allowed = [c for c in cka_long.columns if c not in _CKA_VALUES]
        raise ValueError(
            f"cannot group CKA by {by!r}: not a column of cka_long; use one of "
            f"{allowed or 'none'}, or by=None for the cell or algorithm column"
        )
    else:
        frame = cka_long
    frame = frame.assign(
        **{by: frame[by].map(_hashable), "cka": pd.to_numeric(frame["cka"], errors="coerce")}
    )
    order = {key: i for i, key in enumerate(_ordered_groups(frame, by))}
    means = (
        frame.groupby([by, "student_layer", "teacher_layer"], sort=False)["cka"]
        .agg(cka="mean", n="count")
        .reset_index()
    )
    means = means.sort_values(
        [by, "student_layer", "teacher_layer"],
        key=lambda c: c.map(order) if c.name == by else c,
        kind="stable",
    )
    return means.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Rendering


def _format(value: Any) -> str:
    if is_missing(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4f}"
        return f"{v:.3g}"
    if isinstance(value, (list, tuple, dict, np.ndarray)):
        return json.dumps(value.tolist() if isinstance(value, np.ndarray) else value)
    return str(value)


def _with_index(df: pd.DataFrame) -> pd.DataFrame:
    """A meaningful index (not 0..n-1) becomes ordinary leading columns, so it is rendered."""
    if isinstance(df.index, pd.RangeIndex) and df.index.name is None:
        return df
    return df.reset_index()


def _formatted(frame: pd.DataFrame, cell: Any = _format) -> pd.DataFrame:
    """Every cell as the text ``cell`` gives it (``_format``: NaN empty, floats to 4 decimals)."""
    return frame.map(cell) if hasattr(frame, "map") else frame.applymap(cell)


def _markdown(df: pd.DataFrame) -> str:
    """A GitHub pipe table via ``DataFrame.to_markdown`` (tabulate) of the ``_format``ted cells.

    Cells are formatted and escaped first: tabulate would print NaN as ``nan`` and a ``|`` inside
    a cell (``a|b``) would split the column; numeric columns are right-aligned.
    """
    frame = _with_index(df)
    if frame.columns.empty:
        return "_(no data)_"
    numeric = [
        pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
        for c in frame.columns
    ]

    def escape(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    text = _formatted(frame, lambda value: escape(_format(value)))
    text.columns = [escape(str(c)) for c in frame.columns]
    return text.to_markdown(
        index=False,
        disable_numparse=True,
        colalign=["right" if num else "left" for num in numeric],
    )


def render(df: pd.DataFrame, fmt: Fmt = "table") -> str:
    """A frame as text: ``markdown`` (GitHub pipe table), ``csv`` or ``table`` (plain text)."""
    if fmt == "csv":
        frame = _with_index(df)
        return frame.to_csv(index=False)
    if fmt == "markdown":
        return _markdown(df)
    if fmt == "table":
        frame = _with_index(df)
        if frame.columns.empty:
            return "(no data)"
        if frame.empty:
            return "  ".join(map(str, frame.columns)) + "\n(no rows)"
        return _formatted(frame).to_string(index=False)
    raise ValueError(f"fmt must be 'table', 'markdown' or 'csv', got {fmt!r}")


# ---------------------------------------------------------------------------------------------
# Findings: the paper's question answered in words, from the paired statistics

# Algorithms that distil the teacher's internal representations (the paper's methods).
INTERNAL_ALGORITHMS = INTERNAL  # kdray.method.algorithms: the algorithms that distil internals
# Diagnostics compared with the baseline, and whether higher means closer to the teacher.
DIAGNOSTICS = {"diag.cka.mean": True, "diag.attention_kl.mean": False, "diag.agreement": True}


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1 (e.g. 0.05), got {alpha!r}")


def _percent(fraction: float) -> str:
    """``0.95`` -> ``95%``, ``0.975`` -> ``97.5%``: a CI level as the report prints it."""
    return f"{round(100 * fraction, 6):g}%"


DEFAULT_MARGIN = 0.005  # ablation.equivalence's default: half a point of accuracy
CONTROL_CELL, CONTROL_RANK = "default", 0  # a confirmation's run of the spec as written


def cell_verdicts(
    trials: pd.DataFrame,
    baseline: str | dict[str, Any],
    metric: str,
    mode: str = "max",
    alpha: float = DEFAULT_ALPHA,
    margin: float = DEFAULT_MARGIN,
    design: st.Design | None = None,
) -> dict[Any, st.Verdict]:
    """Every cell's :class:`kdray.analysis.stats.Verdict` against the baseline: ``design`` (the
    adaptive seeds' group-sequential one), else a fixed design over the seeds the cells have. The
    cells compared are the family (Holm)."""
    _, pairs = paired_differences(trials, baseline, metric)
    diffs = {key: frame["diff"].to_numpy() for key, frame in pairs.items()}
    most = max((d.size for d in diffs.values()), default=2)
    design = design or st.Design.fixed(most, alpha, margin)
    family = f"{len(diffs)} cells of {_short(_metric_column(trials, metric))} vs `{baseline}`"
    return st.sequential_verdicts(diffs, design, higher_is_better=mode == "max", family=family)


def findings(
    trials: pd.DataFrame,
    baseline: str | dict[str, Any],
    metric: str,
    mode: str = "max",
    alpha: float = DEFAULT_ALPHA,
    margin: float = DEFAULT_MARGIN,
    design: st.Design | None = None,
) -> pd.DataFrame:
    """Per compared cell: the paired difference from the baseline of the metric and of each
    recorded diagnostic, each with a verdict (better / worse / equivalent / unresolved, by
    :mod:`kdray.analysis.stats`: Holm across cells at ``alpha``) that reads "closer to the teacher"
    for the diagnostics (higher CKA and agreement, lower attention KL). Equivalence (TOST within
    ``margin``) is tested on the metric only, by ``design`` when the seeds came in adaptive rounds
    (the verdicts are then the ones the rounds stopped on)."""
    _check_alpha(alpha)
    _ascending(mode)
    group = _group_column(trials)
    column = _metric_column(trials, metric)
    verdicts = {column: cell_verdicts(trials, baseline, column, mode, alpha, margin, design)}
    for diag, higher in DIAGNOSTICS.items():
        if diag in trials.columns and pd.to_numeric(trials[diag], errors="coerce").notna().any():
            verdicts[diag] = cell_verdicts(
                trials, baseline, diag, "max" if higher else "min", alpha, margin=0.0
            )
    records: list[dict[str, Any]] = []
    for key, main in verdicts[column].items():
        record: dict[str, Any] = {group: key, "n_pairs": main.n}
        for name, by_cell in verdicts.items():
            verdict = by_cell[key]
            short = _short(name).removeprefix("diag.")
            record[f"{short}.diff"] = verdict.mean
            record[f"{short}.verdict"] = verdict.word
        record["interval"] = f"[{main.low:+.4f}, {main.high:+.4f}] ({main.level:.1%})"
        records.append(record)
    return pd.DataFrame.from_records(records)


def _algorithm_of(trials: pd.DataFrame, group: str, key: Any) -> str | None:
    if "distill.algorithm" not in trials.columns:
        return None
    values = trials.loc[trials[group].map(_hashable) == key, "distill.algorithm"].dropna().unique()
    return str(values[0]) if len(values) == 1 else None


def _claim_one(rows: pd.DataFrame, group: str, short: str, diffs: pd.Series, baseline: Any) -> str:
    """Claim 1 in words: do the internal-distillation cells beat the baseline on the metric."""
    verdicts = rows[f"{short}.verdict"]
    best = rows.loc[diffs.idxmax()]
    better = [str(k) for k, v in zip(rows[group], verdicts, strict=True) if v == "better"]
    worse = [str(k) for k, v in zip(rows[group], verdicts, strict=True) if v == "worse"]
    if better:
        claim = f"**held** for {', '.join(better)}"
    elif worse and len(worse) == len(rows):
        claim = "**did not hold**: every internal-distillation cell is worse"
    elif worse:
        rest = len(rows) - len(worse)
        claim = (
            f"**did not hold**: no internal-distillation cell is shown better, "
            f"{', '.join(worse)} {'is' if len(worse) == 1 else 'are'} worse "
            f"(the other{'s' if rest > 1 else ''} unresolved)"
        )
    elif (diffs > 0).all():
        claim = (
            "**unresolved**: every internal-distillation cell is ahead on average, none shown "
            "better at this alpha"
        )
    else:
        claim = (
            "**unresolved**: no internal-distillation cell is shown better, and some are "
            "behind on average (not shown worse either: no difference is not shown to be none)"
        )
    listed = ", ".join(
        f"{key} {value:+.4f}" for key, value in zip(rows[group], rows[f"{short}.diff"], strict=True)
    )
    return (
        f"- Claim 1, internal distillation beats soft labels on dev {short}: {claim}. "
        f"Mean differences: {listed} (largest: {best[group]})."
        + (f" Worse than `{baseline}`: {', '.join(worse)}." if worse and better else "")
    )


def _claim_two(table: pd.DataFrame, rows: pd.DataFrame) -> str | None:
    """Claim 2 in words: is the student's inside (CKA, attention KL) closer to the teacher's."""
    inside = [c for c in ("cka.mean", "attention_kl.mean") if f"{c}.verdict" in table.columns]
    if not inside:
        return None
    parts, majority, farther = [], 0, 0
    for column in inside:
        closer = int((rows[f"{column}.verdict"] == "better").sum())
        majority += closer > len(rows) / 2
        farther += int((rows[f"{column}.verdict"] == "worse").sum()) > len(rows) / 2
        mean_diff = float(rows[f"{column}.diff"].mean())
        parts.append(
            f"{column} significantly closer to the teacher in {closer} of {len(rows)} cells "
            f"(mean difference {mean_diff:+.4f})"
        )
    if majority == len(inside):
        held = "**held**"
    elif majority:
        held = "**partly held**"
    elif farther == len(inside):
        held = "**did not hold**"
    else:
        held = "**unresolved**"
    return (
        "- Claim 2, internal distillation makes the student's inside closer to the "
        f"teacher's: {held} ({'; '.join(parts)}). Attention KL is what internal distillation "
        "trains and [CLS] CKA is kin to its [CLS] cosine loss, so closer there is partly by "
        "construction; prediction agreement (below) is not trained."
    )


_PARTS = {
    "-soft": "the soft-label loss",
    "-hard": "the hard-label loss",
    "-attention": "the attention-KL loss",
    "-hidden": "the [CLS] cosine loss",
    "init=random": "the teacher's weights as the student's start (random init instead)",
    "schedule=idal": "the staged schedule (all layers at once instead)",
    "freeze=off": "freezing the lower layers",
}


def _parts_lines(table: pd.DataFrame, group: str, short: str, mode: str) -> list[str]:
    """A leave-one-out in words: what taking each part away did to the metric. It speaks of
    the recipe's parts, not of the paper's claims, which this design does not test."""
    lines = []
    for row in table.to_dict("records"):
        cell = str(row[group])
        part = _PARTS.get(cell, f"the change `{cell}`")
        verdict = row[f"{short}.verdict"]
        effect = {
            "better": "raises" if mode == "max" else "lowers",
            "worse": "lowers" if mode == "max" else "raises",
        }.get(verdict)
        diff = row[f"{short}.diff"]
        if effect:
            text = f"{effect} dev {short} by {abs(diff):.4f} {row['interval']}: {part} matters"
        elif verdict == "equivalent":
            text = f"changes dev {short} by {diff:+.4f} {row['interval']}: equivalent"
        else:
            text = (
                f"changes dev {short} by {diff:+.4f} {row['interval']}: unresolved, so whether "
                f"{part} matters is not shown either way"
            )
        lines.append(f"- Taking away {part} (`{cell}`) {text}.")
    return lines


def findings_text(
    trials: pd.DataFrame,
    table: pd.DataFrame,
    baseline: Any,
    metric: str,
    mode: str = "max",
    alpha: float = DEFAULT_ALPHA,
) -> str:
    """The paper's two claims, checked against ``findings`` in plain sentences: internal
    distillation beats soft labels on the dev metric, and it makes the student's inside (CKA,
    attention KL) closer to the teacher's. ``alpha`` must be the one ``findings`` used: the
    text states the thresholds the verdicts were made with."""
    _check_alpha(alpha)
    group = _group_column(trials)
    short = _short(_metric_column(trials, metric))  # the same key ``findings`` wrote
    internal = [
        i
        for i, key in enumerate(table[group])
        if _algorithm_of(trials, group, key) in INTERNAL_ALGORITHMS
    ]
    n_pairs = int(table["n_pairs"].max()) if len(table) else 0
    lines = [
        f"Verdicts use the paired comparison with `{baseline}` over up to {n_pairs} seeds at "
        f"alpha = {alpha:g}, the {len(table)} compared cells one Holm family: better or worse "
        f"when the Holm-adjusted paired t-test gives p < {alpha:g} (its t-interval then excludes "
        "0); equivalent within the margin when two one-sided tests (TOST) show it; unresolved "
        'otherwise, which is not "the same".',
        "",
    ]
    if str(baseline) == "recipe":
        lines += _parts_lines(table, group, short, mode)
        return "\n".join(lines)
    if not internal:
        lines.append(
            "No cell uses an internal-distillation algorithm: the paper's claim is not "
            "tested by this ablation."
        )
        return "\n".join(lines)
    rows = table.iloc[internal]
    diffs = (1 if mode == "max" else -1) * rows[f"{short}.diff"]  # > 0: ahead of the baseline
    if diffs.isna().all():
        lines.append(
            f"- Claim 1, internal distillation beats soft labels on dev {short}: **not tested**: "
            f"no internal-distillation cell has an ok run with a seed that `{baseline}` also has."
        )
        return "\n".join(lines)
    lines.append(_claim_one(rows, group, short, diffs, baseline))
    claim_two = _claim_two(table, rows)
    if claim_two:
        lines.append(claim_two)
    if "agreement.verdict" in table.columns:
        closer = int((rows["agreement.verdict"] == "better").sum())
        open_ = int((rows["agreement.verdict"] == "unresolved").sum())
        lines.append(
            f"- Prediction agreement with the teacher (not a training loss, so not the claim's "
            f"own yardstick): closer than `{baseline}` in {closer} of {len(rows)} "
            f"internal-distillation cells, unresolved in {open_}."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The whole report


@dataclass
class Report:
    """Everything ``build_report`` found in a results folder, as frames and plot paths.

    Frames that do not apply are None (``comparison`` for a sweep without baseline, ``sweep``
    and ``importance`` for an ablation).
    """

    results_dir: Path
    kind: str  # "ablation" | "sweep"
    metric: str
    mode: str
    group: str
    n_trials: int
    n_ok: int
    teacher: pd.DataFrame
    summary: pd.DataFrame
    comparison: pd.DataFrame | None = None
    baseline: Any = None
    findings: pd.DataFrame | None = None
    findings_text: str | None = None
    sweep: pd.DataFrame | None = None
    best: pd.DataFrame | None = None
    importance: pd.DataFrame | None = None
    curves: pd.DataFrame | None = None
    cka: pd.DataFrame | None = None
    plots: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fmt: Fmt = "markdown"
    alpha: float = DEFAULT_ALPHA  # verdicts: Holm p < alpha; comparison CIs at 1 - alpha
    mode_source: str = "the default"  # where ``mode`` came from (argument, trials, experiment.json)
    baseline_source: str | None = None  # where ``baseline`` came from, None without one
    experiment: dict[str, Any] | None = None  # experiment.json, when the folder has one
    alpha_source: str = "the default"
    confirmation: pd.DataFrame | None = None  # kdray confirm: winner's curse per configuration
    ranking_survived: bool | None = None
    stopping: pd.DataFrame | None = None  # adaptive seeds: seeds per cell and why it stopped
    equivalence: float | None = None  # the equivalence margin (ablation.equivalence)
    design: st.Design | None = None  # how the verdicts were decided (kdray.analysis.stats)
    family: pd.DataFrame | None = None  # one question across folders: the joint verdicts
    pareto: pd.DataFrame | None = None  # a multi-objective sweep's non-dominated trials
    seeds: pd.DataFrame | None = None  # tune.seeds_per_trial: each configuration's seed spread
    objectives: list[dict[str, Any]] = field(default_factory=list)  # tune.objectives
    trials: pd.DataFrame | None = None  # the trials table it was built from (what plots draw)

    def sections(self) -> list[tuple[str, str | pd.DataFrame]]:
        """``(heading, frame or prose)`` in document order: one source for every output format."""
        out: list[tuple[str, str | pd.DataFrame]] = []
        if self.findings_text:
            out.append(("Findings: the paper's claims at this scale", self.findings_text))
        out.append(("Teacher", self.teacher))
        title = "Cells" if self.group == "cell" else f"Per {self.group}"
        out.append((title, self.summary))
        if self.comparison is not None:
            level = _percent(1.0 - self.alpha)
            out.append(
                (
                    f"Paired comparison vs baseline `{self.baseline}` ({level} t-interval)",
                    self.comparison,
                )
            )
        if self.findings is not None and not self.findings.empty:
            out.append(("Verdict per cell (metric and diagnostics vs baseline)", self.findings))
        if self.family is not None:
            folders = self.family["folder"].nunique()
            out.append(
                (
                    f"One question, one family: {len(self.family)} comparisons in {folders} "
                    "folders, adjusted together (Holm; each folder's own seed design)",
                    self.family,
                )
            )
        if self.confirmation is not None:
            out.append(
                ("Confirmation: sweep score vs confirmed mean (winner's curse)", self.confirmation)
            )
            out.append(("Did the sweep's ranking survive?", self._survival_text()))
        if self.stopping is not None:
            out.append(
                (
                    f"Adaptive seeds: seeds per cell and why each stopped (alpha {self.alpha:g}, "
                    f"equivalence margin {self.equivalence:g})",
                    self.stopping,
                )
            )
        if self.pareto is not None:
            named = ", ".join(f"{o['metric']} ({o['mode']})" for o in self.objectives)
            out.append(
                (
                    f"Pareto front: {len(self.pareto)} trials that no other beats on every "
                    f"objective ({named}); export any with kdray export --trial",
                    self.pareto,
                )
            )
        if self.seeds is not None:
            out.append(
                (
                    "Configurations over their paired seeds (the searcher saw each mean; best "
                    "mean first)",
                    self.seeds,
                )
            )
        if self.sweep is not None:
            out.append(("Sweep: best trials", self.sweep))
        if self.best is not None:
            out.append(("Best trial per algorithm", self.best))
        if self.importance is not None:
            out.append(
                (
                    "Parameter importance of the searched settings (fANOVA, optuna's "
                    "FanovaImportanceEvaluator, seed 0)",
                    self.importance,
                )
            )
        return out

    def _survival_text(self) -> str:
        frame = self.confirmation
        if frame is None or frame.empty:
            return "no configuration finished ok"
        order = ", ".join(
            f"{row.cell} -> {row.confirmed_rank}" for row in frame.itertuples(index=False)
        )
        if self.ranking_survived:
            return f"ranking survived: yes (sweep rank -> confirmed rank: {order})"
        return f"ranking survived: no (sweep rank -> confirmed rank: {order})"

    def header_lines(self) -> list[str]:
        """What the report is about, as markdown list items: folder, kind, metric, alpha,
        design, margin, baseline, token lengths and notes (the console shows them too)."""
        lines = [
            f"- results: `{self.results_dir}`",
            f"- kind: {self.kind}; {self.n_ok} of {self.n_trials} runs ok",
            f"- metric: best dev {self.metric} ({self.mode}; from {self.mode_source})",
            f"- alpha: {self.alpha:g} (from {self.alpha_source}): better/worse need a "
            f"Holm-adjusted paired t-test p < {self.alpha:g} (within the design's share for the "
            "look); the interval printed with a verdict is the one it was decided on",
        ]
        if self.design is not None:
            lines.append(f"- design: {self.design.describe()}")
        if self.equivalence is not None:
            lines.append(
                f"- equivalence margin: +-{self.equivalence:g} ({self.equivalence * 100:g} "
                "points of the metric): equivalent only when the (1 - 2 alpha) interval lies "
                "inside it (TOST); a cell neither shown different nor equivalent is unresolved"
            )
        if self.baseline is not None:
            lines.append(f"- baseline: `{self.baseline}` (from {self.baseline_source})")
        lines += _length_lines(self.experiment)
        lines += [f"- note: {note}" for note in self.notes]
        return lines

    def to_markdown(self, path: str | Path | None = None) -> str:
        """The full markdown document; image links relative to ``path`` (the .md file) if given."""
        base = Path(path).resolve().parent if path is not None else None
        lines = [f"# kdray report: {self.results_dir.name}", "", *self.header_lines()]
        for heading, body in self.sections():
            lines += ["", f"## {heading}", ""]
            if isinstance(body, pd.DataFrame) and body.empty:
                lines.append("_(nothing to show)_")
            else:
                lines.append(body if isinstance(body, str) else render(body, "markdown"))
        if self.comparison is not None:
            lines += [
                "",
                "mean_diff = cell minus baseline over the seeds both have; ci: "
                f"{_percent(1.0 - self.alpha)} t-interval of the mean paired difference; boot: "
                f"BCa bootstrap (from {st.MIN_BOOTSTRAP_PAIRS} pairs on); p_ttest_holm: "
                "Holm-adjusted over cells (statsmodels); p_signflip: exact sign-flip test "
                "(its smallest possible value is 2/2^n: 0.25 at 3 pairs).",
            ]
        if self.plots:
            lines += ["", "## Plots", ""]
            for name, plot in self.plots.items():
                target = Path(plot).resolve()
                link = os.path.relpath(target, base) if base is not None else str(plot)
                lines.append(f"![{name}]({Path(link).as_posix()})")
                lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def render(self, fmt: Fmt | None = None) -> str:
        """The report as one text in ``fmt`` (default: the format it was built with)."""
        fmt = fmt or self.fmt
        if fmt == "markdown":
            return self.to_markdown()
        parts = []
        for heading, body in self.sections():
            text = body if isinstance(body, str) else render(body, fmt)
            if fmt == "csv":
                parts.append(f"# {heading}\n{text}")
            else:
                parts.append(f"{heading}\n{'=' * len(heading)}\n{text}\n")
        return "\n".join(parts)

    def save(self, path: str | Path) -> Path:
        """Write the markdown document to ``path`` (links relative to it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_markdown(path), encoding="utf-8")
        return path


def teacher_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per teacher: its dev scores and size, as recorded by the runs that used it."""
    columns = [c for c in trials.columns if c.startswith("teacher.dev.")]
    key = "teacher.id" if "teacher.id" in trials.columns else None
    extra = ["teacher_params"] if "teacher_params" in trials.columns else []
    if not columns and key is None:
        return pd.DataFrame()
    rows = trials.dropna(subset=columns, how="all") if columns else trials
    if key is None:
        frame = rows[columns + extra].mean(numeric_only=True).to_frame().T
    else:
        frame = (
            rows.groupby(key, sort=False, dropna=False)[columns + extra]
            .mean(numeric_only=True)
            .reset_index()
        )
        frame.insert(1, "runs", rows.groupby(key, sort=False, dropna=False).size().to_numpy())
    if "teacher_params" in frame.columns:
        frame["teacher_params"] = frame["teacher_params"].round().astype("Int64")
    return frame.rename(columns={c: c.removeprefix("teacher.dev.") for c in columns})


def remade_teacher_notes(trials: pd.DataFrame) -> list[str]:
    """A note per teacher id whose runs recorded different dev scores: the same settings
    fine-tuned again (an emptied cache, a resume on another machine) gave another teacher, so
    runs paired across it compare students of different teachers. ``teacher_table`` shows
    only their mean."""
    columns = [c for c in trials.columns if c.startswith("teacher.dev.")]
    if "teacher.id" not in trials.columns or not columns:
        return []
    notes = []
    for teacher_id, rows in trials.groupby("teacher.id", sort=False):
        for column in columns:
            values = sorted({round(float(v), 6) for v in rows[column].dropna()})
            if len(values) > 1:
                shown = ", ".join(f"{v:.4f}" for v in values)
                notes.append(
                    f"teacher {teacher_id} was fine-tuned more than once with different results "
                    f"({column.removeprefix('teacher.dev.')} {shown} across {len(rows)} runs): "
                    "its students are paired across different teachers; compare the runs' "
                    "teacher columns before quoting a verdict"
                )
                break
    return notes


def _default_baseline(trials: pd.DataFrame, group: str) -> Any:
    """The soft-label cell if there is exactly one, else None (no comparison is guessed)."""
    if "distill.algorithm" not in trials.columns:
        return None
    try:
        return _select_baseline(trials, {"distill.algorithm": "soft"}, group)
    except ValueError:
        return None


def _report_mode(
    trials: pd.DataFrame, mode: str | None, experiment: dict[str, Any] | None
) -> tuple[str, str]:
    """``(mode, where it came from)``: the argument, else the trials' ``mode`` column, else
    experiment.json's ``tune.mode``, else ``max``. A wrong direction silently inverts every
    "best" and every verdict, so unknown or conflicting values are errors, not guesses."""
    if mode is not None:
        source = "the mode argument"
    elif "mode" in trials.columns and trials["mode"].notna().any():
        values = list(dict.fromkeys(trials["mode"].dropna().astype(str)))
        if len(values) > 1:
            raise ValueError(
                f"the trials' mode column holds {values}: runs of different directions in one "
                "folder; give the mode explicitly (max or min)"
            )
        mode, source = values[0], "the trials' mode column"
    elif _spec_value(experiment, "tune", "mode") is not None:
        mode, source = str(_spec_value(experiment, "tune", "mode")), f"{EXPERIMENT_FILE} tune.mode"
    else:
        mode, source = DEFAULT_MODE, "the default"
    if mode not in MODES:
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r} (from {source})")
    return mode, source


def _report_metric(trials: pd.DataFrame, experiment: dict[str, Any] | None) -> str:
    """The trials' ``metric`` column, else experiment.json's ``tune.metric``, else the first
    ``best.dev.<metric>`` column; checked to have a column, so a gap is a clear error here."""
    recorded = "metric" in trials.columns and trials["metric"].notna().any()
    configured = _spec_value(experiment, "tune", "metric")
    metric = main_metric(trials) if recorded or not configured else str(configured)
    _metric_column(trials, metric)
    return metric


def _nothing_ok(results_dir: Path, trials: pd.DataFrame) -> str:
    """Why there is nothing to report: the status counts and the first recorded error."""
    counts = trials["status"].astype(str).value_counts(dropna=False)
    statuses = ", ".join(f"{n} {status}" for status, n in counts.items())
    message = f"{results_dir}: no run finished ok ({statuses}), so there is nothing to compare"
    if "error" in trials.columns and trials["error"].notna().any():
        first = str(trials["error"].dropna().iloc[0]).strip().splitlines()
        message += f"; first error: {first[-1] if first else '?'}"
    return message + ". Fix the failing runs and run them again."


def _choose_baseline(
    trials: pd.DataFrame,
    group: str,
    baseline: str | dict[str, Any] | None,
    experiment: dict[str, Any] | None,
    notes: list[str],
) -> tuple[Any, str | None]:
    """``(baseline cell, where it came from)``: the argument, else experiment.json's
    ``ablation.baseline``, else the unique soft-label cell, else ``(None, None)``.

    An explicit baseline that selects no single cell is an error; the spec's is a note and the
    default is tried, since every ablation spec has one (``{"distill.algorithm": "soft"}``
    unless set), also for ablations whose cells share one algorithm.
    """
    if baseline is not None:
        return _select_baseline(trials, baseline, group), "the baseline argument"
    cells = _ordered_groups(trials, group) if group == "cell" else []
    if "config_rank" in trials.columns and CONTROL_CELL in cells:
        return CONTROL_CELL, "the spec as written (a confirmation's control)"
    if "config_rank" in trials.columns and "rank1" in cells:
        return "rank1", "the sweep's winner (a confirmation)"
    design = _spec_value(experiment, "ablation", "design")
    if design == "leave_one_out" and "recipe" in cells:
        return "recipe", f"{EXPERIMENT_FILE} ablation.design leave_one_out"
    configured = _spec_value(experiment, "ablation", "baseline")
    if configured:
        try:
            return (
                _select_baseline(trials, configured, group),
                f"{EXPERIMENT_FILE} ablation.baseline {json.dumps(configured)}",
            )
        except ValueError as error:
            notes.append(f"the spec's ablation.baseline is not used: {error}")
    found = _default_baseline(trials, group)
    return found, ("the default: the one soft-label cell" if found is not None else None)


def _join_cka(cka: pd.DataFrame, trials: pd.DataFrame, group: str, path: Path) -> pd.DataFrame:
    """CKA rows with the group of their run; runs not in the trials table are dropped."""
    keys = [k for k in ("name", "trial_id") if k in cka.columns and k in trials.columns]
    if "trial_id" not in keys:
        raise ValueError(
            f"{path} and the trials table must both have a 'trial_id' column to be joined; "
            f"{path.name} has {list(cka.columns)}. Rewrite it with kdray.analysis.results or "
            "remove it"
        )
    info = trials[keys + [group]].drop_duplicates(keys)
    return cka.merge(info, on=keys, how="inner")


def _compare_with_baseline(
    report: Report, trials: pd.DataFrame, baseline: str | dict[str, Any] | None
) -> None:
    """The paired comparison with the chosen baseline and, for an ablation, the findings."""
    group = report.group
    chosen, source = _choose_baseline(trials, group, baseline, report.experiment, report.notes)
    if chosen is not None:
        report.baseline, report.baseline_source = chosen, source
        report.comparison = paired_comparison(
            trials, report.baseline, report.metric, confidence=1.0 - report.alpha
        )
        if report.kind != "sweep" and not report.comparison.empty:
            report.equivalence, report.design = _report_design(report, trials)
            report.findings = findings(
                trials,
                report.baseline,
                report.metric,
                mode=report.mode,
                alpha=report.alpha,
                margin=report.equivalence,
                design=report.design if report.design.sequential else None,
            )
        if report.kind == "ablation" and report.findings is not None:
            report.findings_text = findings_text(
                trials,
                report.findings,
                report.baseline,
                report.metric,
                mode=report.mode,
                alpha=report.alpha,
            )
    else:
        report.notes.append(
            "no baseline given, none in the spec and no unique soft-label cell: "
            "no paired comparison"
        )


def _report_design(report: Report, trials: pd.DataFrame) -> tuple[float, st.Design]:
    """The margin and the design the verdicts follow: the spec's adaptive seeds as a
    group-sequential design, else a fixed design over the seeds the cells have."""
    margin = _spec_value(report.experiment, "ablation", "equivalence")
    margin = float(DEFAULT_MARGIN if margin is None else margin)
    seeds = _spec_value(report.experiment, "ablation", "seeds")
    if isinstance(seeds, dict) and report.group == "cell":
        return margin, st.Design(
            min=seeds["min"], max=max(seeds["max"], seeds["min"]), step=seeds["step"],
            alpha=report.alpha, margin=margin, spending=seeds.get("spending", "obrien_fleming"),
        )  # fmt: skip
    most = int(report.comparison["n_pairs"].max()) if report.comparison is not None else 2
    return margin, st.Design.fixed(most, report.alpha, margin)


# ---------------------------------------------------------------------------------------------
# Confirmation and adaptive seeds (used by kdray.experiments.followup)


def winners_curse(
    sweep_trials: pd.DataFrame | None,
    confirm_trials: pd.DataFrame,
    metric: str,
    mode: str = "max",
) -> pd.DataFrame:
    """Per confirmed configuration: the sweep's score, the confirmed mean and 95% CI, the
    winner's curse (sweep score minus confirmed mean) and the rank the confirmation gives it.

    The sweep score is the source trial's (``source`` = ``sweep:<trial_id>``) in
    ``sweep_trials``, else the ``sweep_score`` column the confirmation recorded.
    """
    column = _metric_column(confirm_trials, metric)
    summary = cell_summary(confirm_trials, [metric])
    short = _short(column)
    ok = _ok(confirm_trials)
    records = []
    for row in summary.to_dict("records"):
        rows = ok[ok["cell"] == row["cell"]]
        if rows.empty:
            continue
        first = rows.iloc[0]
        if int(first.get("config_rank", 1)) == CONTROL_RANK:
            continue  # the spec as written: the control, not one of the sweep's configurations
        score = float(first["sweep_score"]) if "sweep_score" in rows else float("nan")
        if sweep_trials is not None and str(first.get("source", "")).startswith("sweep:"):
            source = sweep_trials[sweep_trials["trial_id"] == first["source"].split(":", 1)[1]]
            if not source.empty:
                score = float(source.iloc[0][column])
        mean = row[f"{short}.mean"]
        records.append(
            {
                "cell": row["cell"],
                "config_rank": int(first["config_rank"]),
                "n": row["n"],
                "sweep_score": score,
                "mean": mean,
                "ci95": row[f"{short}.ci95"],
                "winners_curse": score - mean,
            }
        )
    frame = pd.DataFrame.from_records(records).sort_values("config_rank", kind="stable")
    ranks = frame["mean"].rank(ascending=mode == "min", method="min")
    frame["confirmed_rank"] = ranks.astype(int)
    return frame.reset_index(drop=True)


def ranking_survived(curse: pd.DataFrame) -> bool:
    """Whether the confirmation ranks the configurations as the sweep did (ties count as kept:
    a tie does not reverse the order)."""
    ordered = curse.sort_values("config_rank")["confirmed_rank"].tolist()
    return all(a <= b for a, b in zip(ordered, ordered[1:], strict=False))


BETTER, WORSE, EQUIVALENT, UNRESOLVED = st.BETTER, st.WORSE, st.EQUIVALENT, st.UNRESOLVED
MAX_REACHED = "max reached"  # a stop reason: the cell is unresolved with all its seeds


@dataclass
class Decision:
    """Where one cell's comparison with the baseline stands after a round, and how it was
    decided (the :class:`kdray.analysis.stats.Verdict` behind it)."""

    status: str  # better | worse | equivalent | max reached | unresolved (more seeds coming)
    n_seeds: int
    next_seeds: list[int] = field(default_factory=list)
    mean_diff: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    level: float = float("nan")  # the interval's confidence: the level it was decided at
    p: float = float("nan")
    family_size: int = 0
    method: str = ""


def seed_decisions(
    trials: pd.DataFrame,
    baseline: str | dict[str, Any],
    metric: str,
    mode: str,
    alpha: float,
    equivalence: float,
    seeds_so_far: dict[str, int],
    seeds: Any,
) -> dict[str, Decision]:
    """Per cell (not the baseline): decided by the group-sequential design of the adaptive
    seeds (:func:`kdray.analysis.stats.sequential_verdicts`, replayed from the tables), or the seeds
    it gets next: up to the design's next look (``seeds.step`` more, at most ``seeds.max``; a cell
    below ``seeds.min`` is topped up first). ``seeds``: the spec's ``AdaptiveSeeds``."""
    design = st.Design(
        min=seeds.min, max=max(seeds.max, seeds.min), step=seeds.step, alpha=alpha,
        margin=equivalence, spending=seeds.spending,
    )  # fmt: skip
    _, pairs = paired_differences(trials, baseline, metric)
    diffs = {str(key): frame["diff"].to_numpy() for key, frame in pairs.items()}
    ended = {cell for cell in diffs if seeds_so_far.get(cell, diffs[cell].size) >= design.max}
    verdicts = st.sequential_verdicts(
        diffs, design, higher_is_better=mode == "max", complete=ended,
        family=f"{len(diffs)} cells vs `{baseline}`",
    )  # fmt: skip
    out: dict[str, Decision] = {}
    for cell, verdict in verdicts.items():
        n = seeds_so_far.get(cell, verdict.n)
        decision = Decision(
            verdict.word, verdict.n, [], verdict.mean, verdict.low, verdict.high,
            verdict.level, verdict.p, verdict.family_size, verdict.method,
        )  # fmt: skip
        if verdict.word == UNRESOLVED:
            if n >= design.max or verdict.final:
                decision.status = MAX_REACHED
            else:
                target = max(seeds.min, min(n + seeds.step, design.max))
                decision.next_seeds = list(range(n + 1, target + 1))
                decision.n_seeds = n
        out[cell] = decision
    return out


def stop_table(decisions: dict[str, Decision]) -> pd.DataFrame:
    """Per cell: seeds it took, why it stopped and the difference it stopped at."""
    rows = [
        {
            "cell": name,
            "seeds": d.n_seeds,
            "stopped": d.status,
            "mean_diff": d.mean_diff,
            "ci_low": d.ci_low,
            "ci_high": d.ci_high,
            "level": d.level,
            "p": d.p,
        }
        for name, d in decisions.items()
    ]
    columns = ["cell", "seeds", "stopped", "mean_diff", "ci_low", "ci_high", "level", "p"]
    return pd.DataFrame(rows, columns=columns)


def adaptive_summary(
    trials: pd.DataFrame,
    baseline: str | dict[str, Any],
    metric: str,
    mode: str,
    seeds: Any,
    alpha: float,
    equivalence: float,
) -> pd.DataFrame:
    """:func:`stop_table` from a finished folder's trials alone: each cell's seeds are those it
    ran ok; ``unresolved`` means the rounds were cut off before the cell was decided."""
    column = _seed_column(trials)
    ok = _ok(trials)
    counts = ok.groupby("cell")[column].nunique().to_dict()
    decisions = seed_decisions(
        trials,
        baseline,
        metric,
        mode,
        alpha,
        equivalence,
        {str(k): int(v) for k, v in counts.items()},
        seeds,
    )
    return stop_table(decisions)


def _report_alpha(alpha: float | None, experiment: dict[str, Any] | None) -> tuple[float, str]:
    """The argument, else the spec's ``ablation.alpha``, else :data:`DEFAULT_ALPHA`."""
    if alpha is not None:
        source = "the alpha argument"
    elif _spec_value(experiment, "ablation", "alpha") is not None:
        alpha, source = float(_spec_value(experiment, "ablation", "alpha")), "the spec"
    else:
        alpha, source = DEFAULT_ALPHA, "the default"
    _check_alpha(alpha)
    return alpha, source


def _adaptive_section(report: Report, trials: pd.DataFrame) -> None:
    """For an ablation run with adaptive seeds: seeds per cell and why each stopped, by the
    spec's stopping rule (the design :func:`_report_design` reads; alpha as the report's)."""
    seeds = _spec_value(report.experiment, "ablation", "seeds")
    if not isinstance(seeds, dict) or report.baseline is None or report.group != "cell":
        return
    if report.design is None:  # no paired comparison: the stopping table still says why
        report.equivalence, report.design = _report_design(report, trials)
    report.stopping = adaptive_summary(
        trials,
        report.baseline,
        report.metric,
        report.mode,
        report.design,
        report.alpha,
        report.design.margin,
    )


def build_report(
    results_dir: str | Path,
    *,
    baseline: str | dict[str, Any] | None = None,
    fmt: Fmt = "markdown",
    mode: str | None = None,
    top: int = 10,
    alpha: float | None = None,
    family_with: Sequence[str | Path] = (),
) -> Report:
    """Read a results folder and compute every table (``kdray.analysis.plots.draw`` plots them).

    ``family_with``: other folders that answer the same question (a follow-up, a re-run with
    another teacher); every comparison of them all is one family (:func:`family_verdicts`).

    An ablation (trials with a ``cell`` column) gets per-cell statistics and a paired comparison
    against ``baseline``: the argument, else the spec's ``ablation.baseline`` from
    ``experiment.json``, else the one cell whose runs all use ``distill.algorithm: soft``, if
    any. A sweep gets the best trials, the best trial per algorithm and fANOVA importance of the
    varying settings. ``cka.parquet`` (``trial_id, student_layer, teacher_layer, cka``), when
    present, is joined to the trials for the CKA heatmaps. ``mode`` is the metric's direction:
    the argument, else the trials' ``mode`` column, else the spec's ``tune.mode``, else ``max``.
    ``alpha`` is the significance level of the verdicts (and ``1 - alpha`` the level of the
    comparison's bootstrap CIs). Tables the report cannot use (no ok run, no metric or group
    column) raise ``ValueError`` saying what is missing.
    """
    results_dir = Path(results_dir)
    trials, epochs = results.load(results_dir)
    folder = _folder(results_dir)
    experiment = read_experiment(folder)
    alpha, alpha_source = _report_alpha(alpha, experiment)
    if trials.empty:
        raise ValueError(f"{results_dir}: the trials table has no rows")
    ok = _ok(trials)
    if ok.empty:
        raise ValueError(_nothing_ok(results_dir, trials))
    group = _group_column(trials)
    metric = _report_metric(trials, experiment)
    mode, mode_source = _report_mode(trials, mode, experiment)
    is_ablation = "cell" in trials.columns
    is_confirmation = is_ablation and "config_rank" in trials.columns
    report = Report(
        results_dir=results_dir,
        kind="confirmation" if is_confirmation else "ablation" if is_ablation else "sweep",
        metric=metric,
        mode=mode,
        group=group,
        n_trials=len(trials),
        n_ok=len(ok),
        teacher=teacher_table(ok),
        summary=cell_summary(trials),
        fmt=fmt,
        alpha=alpha,
        mode_source=mode_source,
        experiment=experiment,
        alpha_source=alpha_source,
        trials=trials,
    )
    report.notes += remade_teacher_notes(ok)

    if is_ablation or baseline is not None:
        _compare_with_baseline(report, trials, baseline)
    if is_confirmation:
        report.confirmation = winners_curse(None, trials, metric, mode)
        report.ranking_survived = ranking_survived(report.confirmation)
    _adaptive_section(report, trials)
    if not is_ablation:
        _sweep_sections(report, trials, top)

    if not epochs.empty:
        report.curves = learning_curves(epochs, trials, metric)
    cka_file = folder / CKA_FILE
    if cka_file.exists():
        report.cka = _join_cka(pd.read_parquet(cka_file), trials, group, cka_file)

    if family_with:
        _family_section(report, [results_dir, *family_with], alpha)
    return report


def _length_lines(experiment: dict[str, Any] | None) -> list[str]:
    """What ``data.max_seq_length`` cut, per split, as ``experiment.json`` recorded it."""
    lines = []
    for split in (experiment or {}).get("lengths") or []:
        lines.append(
            f"- token lengths, {split['split']}: {split['cut']:.1%} of {split['n']} cut at "
            f"{split['max_seq_length']} (median {split['median']:.0f}, p90 {split['p90']:.0f}, "
            f"p99 {split['p99']:.0f}, max {split['max']}; 95 % whole at {math.ceil(split['p95'])})"
        )
    return lines


def _family_section(report: Report, folders: list[Any], alpha: float | None) -> None:
    """The question's family across folders, and a note on which verdicts to quote."""
    report.family = family_verdicts(folders, alpha=alpha)
    report.notes.append(
        "the findings and verdicts per cell take this folder's cells as their family; the "
        f"question's family ({len(report.family)} comparisons in "
        f"{report.family['folder'].nunique()} folders, its own section) gives the verdicts to quote"
    )


def _seed_table(ok: pd.DataFrame, column: str, mode: str) -> pd.DataFrame:
    """Each configuration's searched values, seeds, mean, sd, min and max, best mean first."""
    table = results.seed_means(ok, column)
    values = pd.DataFrame([json.loads(key) for key in table["config"]], index=table.index)
    table = pd.concat([values, table.drop(columns="config")], axis=1)
    return table.sort_values("mean", ascending=mode == "min", kind="stable").reset_index(drop=True)


def _sweep_sections(report: Report, trials: pd.DataFrame, top: int) -> None:
    """A sweep's best trials, best trial per algorithm and importance of what it searched."""
    metric, mode, ok = report.metric, report.mode, _ok(trials)
    report.sweep = sweep_summary(trials, metric, mode=mode, top=top)
    if "distill.algorithm" in trials.columns:
        report.best = best_per(trials, "distill.algorithm", metric, mode=mode)
    searched = searched_settings(ok, report.experiment)
    report.importance = parameter_importance(trials, searched, metric, mode=mode)
    spec = (report.experiment or {}).get("spec") or {}
    report.objectives = list((spec.get("tune") or {}).get("objectives") or [])
    if report.objectives:
        report.pareto = pareto.front(trials, report.objectives)
    if int((spec.get("tune") or {}).get("seeds_per_trial") or 1) > 1:
        report.seeds = _seed_table(ok, _metric_column(ok, metric), mode)
    finished = int(pd.to_numeric(ok[_metric_column(ok, metric)], errors="coerce").notna().sum())
    if finished < MIN_IMPORTANCE_TRIALS:
        report.notes.append(
            f"parameter importance from {finished} finished trials is a rough guess: fANOVA "
            f"needs about {MIN_IMPORTANCE_TRIALS} or more to rank {len(searched)} searched settings"
        )


def family_verdicts(folders: Sequence[str | Path], alpha: float | None = None) -> pd.DataFrame:
    """One question answered by several experiments, decided as one family: every folder's
    cells against that folder's own baseline, each with the seed design its folder ran (fixed
    seeds, or the spec's adaptive rounds), Holm across all of them at one ``alpha`` (the
    argument, else the first folder's). A follow-up that re-runs an unresolved cell alone adds
    a comparison to the family; it does not start a fresh family of one."""
    import dataclasses

    diffs: dict[str, np.ndarray] = {}
    designs: dict[str, st.Design] = {}
    rows: dict[str, dict[str, Any]] = {}
    modes: dict[str, str] = {}
    for folder in folders:
        built = build_report(folder, alpha=alpha)
        alpha = built.alpha if alpha is None else alpha
        if built.baseline is None or built.comparison is None or built.design is None:
            raise ValueError(f"{folder}: no paired comparison with a baseline to pool")
        modes[str(folder)] = built.mode
        trials, _ = results.load(folder)
        _, pairs = paired_differences(trials, built.baseline, built.metric)
        for cell, frame in pairs.items():
            key = f"{Path(folder).name}: {cell}"
            diffs[key] = frame["diff"].to_numpy()
            designs[key] = dataclasses.replace(built.design, alpha=alpha)
            rows[key] = {"folder": Path(folder).name, "cell": cell, "baseline": built.baseline}
    if len(set(modes.values())) > 1:
        raise ValueError(f"the folders' metrics go different ways: {modes}; pool like with like")
    mode = next(iter(modes.values()), "max")
    family = f"{len(diffs)} comparisons in {len(modes)} folders"
    verdicts = st.sequential_verdicts(diffs, designs, higher_is_better=mode == "max", family=family)
    out = []
    for key, verdict in verdicts.items():
        out.append(
            {
                **rows[key],
                "n_pairs": verdict.n,
                "mean_diff": verdict.mean,
                "low": verdict.low,
                "high": verdict.high,
                "level": verdict.level,
                "p_ttest": verdict.p,
                "verdict": verdict.word,
            }
        )
    return pd.DataFrame(out)
