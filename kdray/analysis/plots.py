"""Plots of a report's tables: PNGs drawn from what ``kdray.analysis.report`` computed, nothing
more.

The tables and words live in ``kdray.analysis.report``; this module only draws them, so a notebook
can draw its own variants of the same frames. matplotlib's Agg canvas is used directly (``Figure`` +
``FigureCanvasAgg``): headless-safe, and it never switches the pyplot backend of a notebook that
imports this module.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import kdray.analysis.pareto as pareto
from kdray.analysis.report import (
    Report,
    _hashable,
    _metric_column,
    _ok,
    _ordered_groups,
    cell_summary,
    cka_means,
    learning_curves,
)

__all__ = ["draw", "plot_cells", "plot_cka", "plot_curves", "plot_learning_curves", "plot_pareto"]


def draw(report: Report, folder: str | Path) -> dict[str, Path]:
    """The report's PNGs in ``folder``: the metric by cell, learning curves, CKA heatmaps and
    the Pareto front, whichever the report has; also kept in ``report.plots``."""
    folder = Path(folder)
    if report.trials is None:
        raise ValueError("the report holds no trials table to plot (build it with build_report)")
    report.plots["cells"] = plot_cells(report.trials, report.metric, folder / "cells.png")
    if report.curves is not None and not report.curves.empty:
        path = folder / "learning_curves.png"
        report.plots["learning_curves"] = plot_curves(report.curves, report.metric, path)
    if report.cka is not None and not report.cka.empty:
        report.plots["cka"] = plot_cka(report.cka, folder / "cka.png", by=report.group)
    if report.pareto is not None and len(report.objectives) >= 2:
        path = folder / "pareto.png"
        report.plots["pareto"] = plot_pareto(report.trials, report.objectives, path)
    return report.plots


def _figure(width: float, height: float) -> Any:
    """A figure on an Agg canvas, independent of any pyplot backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_cells(summary_or_trials: pd.DataFrame, metric: str, path: str | Path) -> Path:
    """PNG of the metric per cell: mean with t-based 95% CI bars, runs as dots, teacher dashed.

    Accepts a ``cell_summary`` frame or a trials table (then also the individual runs are drawn).
    """
    name = metric.removeprefix("best.dev.").removeprefix("dev.")
    if f"{name}.mean" in summary_or_trials.columns:
        summary, trials = summary_or_trials, None
    else:
        trials = summary_or_trials
        summary = cell_summary(trials, [name])
    group = summary.columns[0]
    labels = [str(v) for v in summary[group]]
    x = np.arange(len(labels))
    means = summary[f"{name}.mean"].to_numpy(dtype=float)
    ci = summary.get(f"{name}.ci95", pd.Series(np.nan, index=summary.index)).to_numpy(dtype=float)

    fig = _figure(max(5.0, 1.1 * len(labels) + 2.0), 4.5)
    ax = fig.subplots()
    if trials is not None:
        ok = _ok(trials)
        column = _metric_column(trials, name)
        jitter = np.random.default_rng(0)
        for i, key in enumerate(summary[group]):
            values = pd.to_numeric(ok.loc[ok[group].map(_hashable) == key, column], errors="coerce")
            values = values.dropna().to_numpy()
            xs = i + jitter.uniform(-0.12, 0.12, size=values.size)
            ax.scatter(xs, values, s=14, color="0.6", zorder=2, label="runs" if i == 0 else None)
    ax.errorbar(
        x,
        means,
        yerr=np.nan_to_num(ci, nan=0.0),
        fmt="o",
        color="C0",
        capsize=5,
        markersize=7,
        zorder=3,
        label="mean ± 95% CI",
    )
    teacher_column = f"teacher.{name}"
    if teacher_column in summary.columns and summary[teacher_column].notna().any():
        teacher = float(summary[teacher_column].mean())
        ax.axhline(teacher, color="C3", linestyle="--", label=f"teacher ({teacher:.4g})")
    ax.set_xticks(x, labels, rotation=25 if max(map(len, labels), default=0) > 8 else 0, ha="right")
    ax.set_xlabel(group)
    ax.set_ylabel(f"best dev {name}")
    ax.set_title(f"Best dev {name} per {group}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def plot_learning_curves(
    epochs: pd.DataFrame,
    trials: pd.DataFrame,
    metric: str,
    path: str | Path,
    by: str | None = None,
) -> Path:
    """PNG of dev metric vs epoch per group (mean line, ±1 std band), stage starts dotted:
    :func:`plot_curves` of ``kdray.analysis.report.learning_curves(epochs, trials, metric,
    by=by)``."""
    return plot_curves(learning_curves(epochs, trials, metric, by=by), metric, path)


def plot_curves(curves: pd.DataFrame, metric: str, path: str | Path) -> Path:
    """PNG of a ``learning_curves`` table: mean line and ±1 std band per group.

    A dotted vertical line sits half an epoch before the first epoch of each new stage, in the
    group's colour, so one sees where PID/SID hand over from one layer to the next.
    """
    from matplotlib.ticker import MaxNLocator

    name = metric.removeprefix("best.dev.").removeprefix("dev.")
    group = curves.columns[0]
    fig = _figure(7.5, 4.5)
    ax = fig.subplots()
    drew_boundary = False
    for i, key in enumerate(_ordered_groups(curves, group) if len(curves) else []):
        rows = curves[curves[group] == key].sort_values("epoch")
        color = f"C{i % 10}"
        x = rows["epoch"].to_numpy(dtype=float)
        mean = rows["mean"].to_numpy(dtype=float)
        std = np.nan_to_num(rows["std"].to_numpy(dtype=float), nan=0.0)
        ax.plot(x, mean, marker="o", markersize=3, color=color, label=str(key))
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        for epoch in rows.loc[rows["stage_start"].astype(bool), "epoch"]:
            ax.axvline(
                float(epoch) - 0.5,
                color=color,
                linestyle=":",
                alpha=0.8,
                label=None if drew_boundary else "stage boundary",
            )
            drew_boundary = True
    if curves.empty:
        ax.text(0.5, 0.5, "no epoch records", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"dev {name}")
    ax.set_title(f"Dev {name} per epoch (mean ± 1 std over runs)")
    ax.grid(alpha=0.3)
    if not curves.empty:
        ax.legend(loc="best", fontsize="small", title=group)
    return _save(fig, path)


def plot_pareto(trials: pd.DataFrame, objectives: list[dict[str, Any]], path: str | Path) -> Path:
    """Every finished trial on the first two objectives, the Pareto front (over all the
    objectives) drawn as a line through its trials and labelled with their ids."""
    x, y = (pareto.column(o["metric"]) for o in objectives[:2])
    ok = _ok(trials)
    chosen = pareto.front(trials, objectives).sort_values(x)
    fig = _figure(6, 4.5)
    ax = fig.add_subplot()
    ax.scatter(pd.to_numeric(ok[x], errors="coerce"), pd.to_numeric(ok[y], errors="coerce"),
               color="0.7", label="trials")  # fmt: skip
    ax.plot(chosen[x], chosen[y], "o-", color="C3", label="Pareto front")
    for trial_id, at_x, at_y in zip(chosen["trial_id"], chosen[x], chosen[y], strict=True):
        ax.annotate(str(trial_id), (at_x, at_y), fontsize=7)
    ax.set_xlabel(f"{objectives[0]['metric']} ({objectives[0]['mode']})")
    ax.set_ylabel(f"{objectives[1]['metric']} ({objectives[1]['mode']})")
    ax.legend()
    return _save(fig, path)


def plot_cka(cka_long: pd.DataFrame, path: str | Path, by: str | None = None) -> Path:
    """PNG: one annotated CKA heatmap (student x teacher layer) per group of ``cka_means``
    (``by=None``: per cell, else per algorithm), in rows of at most three panels.

    Runs of the same group are averaged; all panels share the 0..1 colour scale so they compare.
    """
    frame = cka_means(cka_long, by)
    by = str(frame.columns[0])
    groups = _ordered_groups(frame, by)
    if not groups:
        raise ValueError("cka_long has no rows to plot")
    n_s = int(frame["student_layer"].max())
    n_t = int(frame["teacher_layer"].max())
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig = _figure(max(4.0, 0.55 * n_t + 1.6) * cols + 1.0, (max(3.0, 0.5 * n_s + 1.6)) * rows + 0.4)
    grid = fig.subplots(rows, cols, squeeze=False)
    for ax in grid.ravel()[len(groups) :]:
        ax.set_visible(False)
    axes = grid.ravel()[: len(groups)]
    image = None
    for ax, key in zip(axes, groups, strict=True):
        mean = (
            frame[frame[by] == key]
            .set_index(["student_layer", "teacher_layer"])["cka"]
            .unstack("teacher_layer")
            .reindex(index=range(1, n_s + 1), columns=range(1, n_t + 1))
        )
        matrix = mean.to_numpy(dtype=float)
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower", aspect="auto")
        for s in range(n_s):
            for t in range(n_t):
                value = matrix[s, t]
                if np.isfinite(value):
                    ax.text(
                        t,
                        s,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="black" if value > 0.6 else "white",
                    )
        ax.set_xticks(range(n_t), [f"T{t}" for t in range(1, n_t + 1)])
        ax.set_yticks(range(n_s), [f"S{s}" for s in range(1, n_s + 1)])
        ax.set_xlabel("teacher layer")
        ax.set_ylabel("student layer")
        ax.set_title(str(key))
    fig.suptitle("Linear CKA of [CLS] vectors, student vs teacher layers")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="linear CKA", shrink=0.9)
    return _save(fig, path)
