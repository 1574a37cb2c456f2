"""From a sweep to a confirmed, explained answer, decided without Ray.

- **Confirmation** (:func:`confirm_configs`, :func:`winners_curse`): a sweep's best score is an
  optimistic estimate (the maximum of noisy trials); its top-K distinct configurations are run
  again with fresh paired seeds, and the gap between the sweep's score and the confirmed mean
  (the winner's curse) says how much of the ranking was luck.
- **Leave-one-out ablation** (:func:`leave_one_out_cells`): the recipe itself, then the recipe
  with exactly one component changed to its plain alternative, so each cell's difference from
  the recipe is that component's contribution.
- **Adaptive seeds** (:func:`seed_decisions`, :func:`adaptive_rounds`): seeds are spent only on
  cells whose paired comparison with the baseline is still unresolved.

Pure Python and pandas: :mod:`kdray.sweep` runs the trials these describe.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kdray import algorithms, plan, report
from kdray.spec import AdaptiveSeeds, Spec
from kdray.store import json_cell

logger = logging.getLogger("kdray")

RECIPE = "recipe"  # the leave-one-out baseline cell: the recipe unchanged
CONFIG_VALUES = "config_values"  # trials column: a confirmed configuration's settings as JSON


# ---------------------------------------------------------------------------------------------
# Confirmation


def _metric_column(trials: pd.DataFrame, spec: Spec) -> str:
    metric = spec.tune.metric or report.main_metric(trials)
    column = f"best.dev.{str(metric).removeprefix('dev.')}"
    if column not in trials.columns:
        raise ValueError(
            f"the sweep's trials have no {column!r} column (tune.metric {metric!r}); "
            "confirm a folder written by kdray sweep"
        )
    return column


def confirm_configs(trials: pd.DataFrame, spec: Spec, top_k: int) -> list[dict[str, Any]]:
    """The sweep's best ``top_k`` distinct configurations (different ``param.*`` values), best
    first by the sweep's metric and mode, as cells ``rank1``, ``rank2``, ...

    A configuration sampled twice counts once, with its best trial's score: the question is
    which settings to keep, not which trial was luckiest.
    """
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    column = _metric_column(trials, spec)
    ok = trials[trials["status"] == "ok"] if "status" in trials else trials
    ok = ok.dropna(subset=[column])
    ok = ok.sort_values(column, ascending=spec.tune.mode == "min", kind="stable")
    configs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in ok.to_dict("records"):
        values = plan._sampled_settings(row, spec, exclude={"train.seed"})
        key = json.dumps({k: json_cell(v) for k, v in sorted(values.items())})
        if key in seen:
            continue
        seen.add(key)
        rank = len(configs) + 1
        configs.append(
            {
                "cell": f"rank{rank}",
                "config_rank": rank,
                "values": values,
                "source": f"sweep:{row['trial_id']}",
                "sweep_score": float(row[column]),
                CONFIG_VALUES: key,
            }
        )
        if len(configs) == top_k:
            break
    if not configs:
        raise ValueError(f"the sweep has no ok trial with a {column} value: nothing to confirm")
    return configs


def paired_trials(cells: list[dict[str, Any]], seeds: list[int]) -> list[dict[str, Any]]:
    """Every cell once per seed, the same seeds for every cell (so they pair)."""
    return [{**cell, "seed": seed} for cell in cells for seed in seeds]


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
    column = report._metric_column(confirm_trials, metric)
    summary = report.cell_summary(confirm_trials, [metric])
    short = report._short(column)
    ok = report._ok(confirm_trials)
    records = []
    for row in summary.to_dict("records"):
        rows = ok[ok["cell"] == row["cell"]]
        if rows.empty:
            continue
        first = rows.iloc[0]
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


# ---------------------------------------------------------------------------------------------
# Leave-one-out cells


def recipe_from_results(trials: pd.DataFrame, spec: Spec) -> tuple[dict[str, Any], str]:
    """``(values, source)`` of the recipe a folder recommends: a confirmation's winner (the
    best confirmed mean), else a sweep's best trial."""
    if "config_rank" in trials.columns and CONFIG_VALUES in trials.columns:
        metric = spec.tune.metric or report.main_metric(trials)
        curse = winners_curse(None, trials, metric, spec.tune.mode)
        winner = curse.sort_values(["confirmed_rank", "config_rank"]).iloc[0]
        rows = trials[trials["cell"] == winner["cell"]]
        return json.loads(rows.iloc[0][CONFIG_VALUES]), f"confirmed:{winner['cell']}"
    best = plan.best_trial(trials, spec.tune.mode)
    if best is None:
        raise ValueError("the results have no ok trial with a metric value to take a recipe from")
    return plan._sampled_settings(best, spec, exclude={"train.seed"}), f"sweep:{best['trial_id']}"


def _active_terms(spec: Spec) -> set[str]:
    """The loss terms some stage of the spec's algorithm optimises (weight > 0 and used)."""
    weights = _weights(spec)
    stages = algorithms.build_stages(
        spec.distill.algorithm,
        spec.student.layers,
        hard=spec.distill.losses.hard.weight > 0,
        freeze_lower=spec.distill.stages.freeze_lower,
    )
    return {term for stage in stages for term in algorithms.active_terms(stage, weights)}


def _weights(spec: Spec) -> dict[str, float]:
    from kdray.spec import term_weights

    return term_weights(spec)


def _changes(spec: Spec, recipe: Spec) -> tuple[list[tuple[str, dict]], list[dict[str, str]]]:
    """``(candidate (name, change) pairs, components that do not apply with why)``."""
    parts = spec.ablation.components if spec.ablation else None
    if parts is None:
        from kdray.spec import ComponentsSpec

        parts = ComponentsSpec()
    changes: list[tuple[str, dict]] = []
    skipped: list[dict[str, str]] = []
    active = _active_terms(recipe)
    for term in parts.losses:
        if term in active:
            changes.append((f"-{term}", {f"distill.losses.{term}.weight": 0.0}))
        else:
            skipped.append({"cell": f"-{term}", "reason": f"{term} is not active in the recipe"})
    staged = len(algorithms.build_stages(recipe.distill.algorithm, recipe.student.layers)) > 1
    if parts.schedule is not None:
        name = f"schedule={parts.schedule}"
        if staged:
            changes.append((name, {"distill.algorithm": parts.schedule}))
        else:
            why = f"the recipe's {recipe.distill.algorithm} is not staged"
            skipped.append({"cell": name, "reason": why})
    for layer_map in parts.layer_map:
        changes.append((f"layer_map={json_cell(layer_map)}", {"distill.layer_map": layer_map}))
    if parts.init is not None:
        name = f"init={parts.init}"
        if recipe.student.init == "teacher":
            changes.append((name, {"student.init": parts.init}))
        else:
            why = f"the recipe's student is not initialised from the teacher: {recipe.student.init}"
            skipped.append({"cell": name, "reason": why})
    if parts.freeze:
        alg, layers = recipe.distill.algorithm, recipe.student.layers
        freezes = algorithms.build_stages(alg, layers, freeze_lower=True) != (
            algorithms.build_stages(alg, layers, freeze_lower=False)
        )
        if recipe.distill.stages.freeze_lower and freezes:
            changes.append(("freeze=off", {"distill.stages.freeze_lower": False}))
        else:
            why = (
                f"{alg} never freezes layers"
                if recipe.distill.stages.freeze_lower
                else "the recipe freezes nothing"
            )
            skipped.append({"cell": "freeze=off", "reason": why})
    return changes, skipped


def leave_one_out_cells(
    spec: Spec, recipe_values: dict[str, Any] | None = None, source: str = "spec"
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """``(cells, skipped)``: the recipe (cell ``recipe``) and the recipe with one component of
    ``ablation.components`` changed per cell; a change that does not apply, gives a run identical
    to the recipe or to an earlier cell, or makes settings that cannot run is skipped with why.
    """
    recipe_values = dict(recipe_values or {})
    recipe = spec.with_values(recipe_values)
    cells = [{"cell": RECIPE, "values": recipe_values, "source": source, "change": {}}]
    seen = {recipe.fingerprint(): RECIPE}
    changes, skipped = _changes(spec, recipe)
    for name, change in changes:
        values = {**recipe_values, **change}
        try:
            cell_spec = spec.with_values(values)
            algorithms.check_weights(
                algorithms.build_stages(
                    cell_spec.distill.algorithm,
                    cell_spec.student.layers,
                    hard=cell_spec.distill.losses.hard.weight > 0,
                    freeze_lower=cell_spec.distill.stages.freeze_lower,
                ),
                _weights(cell_spec),
            )
        except ValueError as error:
            last = str(error).strip().splitlines()[-1].strip()
            skipped.append({"cell": name, "reason": f"cannot run: {last}"})
            continue
        twin = seen.get(cell_spec.fingerprint())
        if twin is not None:
            skipped.append({"cell": name, "reason": f"identical to {twin}"})
            continue
        seen[cell_spec.fingerprint()] = name
        cells.append({"cell": name, "values": values, "source": source, "change": change})
    for item in skipped:
        logger.info("leave-one-out: skipped %s (%s)", item["cell"], item["reason"])
    return cells, skipped


# ---------------------------------------------------------------------------------------------
# Adaptive seeds

BETTER, WORSE, EQUIVALENT, MAX_REACHED, UNRESOLVED = (
    "better",
    "worse",
    "equivalent",
    "max reached",
    "unresolved",
)


@dataclass
class Decision:
    """Where one cell's comparison with the baseline stands after a round."""

    status: str  # better | worse | equivalent | max reached | unresolved (more seeds coming)
    n_seeds: int
    next_seeds: list[int] = field(default_factory=list)
    mean_diff: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")


def decide(
    mean_diff: float, ci_low: float, ci_high: float, mode: str, equivalence: float
) -> str | None:
    """better/worse when the CI of the difference excludes 0, equivalent when it does not and
    the difference is within ``equivalence``; None while unresolved."""
    if np.isfinite(ci_low) and np.isfinite(ci_high) and (ci_low > 0 or ci_high < 0):
        higher = ci_low > 0
        return BETTER if higher == (mode == "max") else WORSE
    if np.isfinite(mean_diff) and abs(mean_diff) <= equivalence:
        return EQUIVALENT
    return None


def seed_decisions(
    trials: pd.DataFrame,
    baseline: str | dict[str, Any],
    metric: str,
    mode: str,
    alpha: float,
    equivalence: float,
    seeds_so_far: dict[str, int],
    min_seeds: int,
    max_seeds: int,
    step: int,
) -> dict[str, Decision]:
    """Per cell (not the baseline): resolved, or the seeds it gets next (``step`` more, at most
    ``max_seeds`` in all; a cell below ``min_seeds`` is topped up first)."""
    comparison = report.paired_comparison(trials, baseline, metric, confidence=1.0 - alpha)
    out: dict[str, Decision] = {}
    for row in comparison.to_dict("records"):
        cell = row["cell"]
        n = seeds_so_far.get(cell, int(row["n_pairs"]))
        diff, low, high = row["mean_diff"], row["ci_low"], row["ci_high"]
        status = decide(diff, low, high, mode, equivalence) if n >= min_seeds else None
        target = max(min_seeds, min(n + step, max_seeds))
        if status is None and n >= max_seeds:
            status = MAX_REACHED
        if status is None:
            out[cell] = Decision(UNRESOLVED, n, list(range(n + 1, target + 1)), diff, low, high)
        else:
            out[cell] = Decision(status, n, [], diff, low, high)
    return out


def adaptive_rounds(
    cells: list[dict[str, Any]],
    baseline: str | dict[str, Any],
    seeds: AdaptiveSeeds,
    run_round: Callable[[list[dict[str, Any]], int], pd.DataFrame],
    *,
    metric: str,
    mode: str = "max",
    alpha: float = 0.05,
    equivalence: float = 0.005,
) -> tuple[pd.DataFrame, dict[str, Decision]]:
    """Run rounds until every cell is resolved or at ``seeds.max``.

    ``run_round(trials, round)`` runs the given trial configs and returns every trial so far.
    Round 1 runs every cell with seeds ``1..min``; later rounds give each unresolved cell its
    next ``step`` seeds, and the baseline every seed any cell gets, so seeds stay paired.
    """
    first = seeds.seeds(seeds.min)
    done = {cell["cell"]: list(first) for cell in cells}
    by_name = {cell["cell"]: cell for cell in cells}
    trials = run_round(paired_trials(_plain(cells), first), 1)
    round_index = 1
    while True:
        decisions = seed_decisions(
            trials,
            baseline,
            metric,
            mode,
            alpha,
            equivalence,
            {name: len(s) for name, s in done.items()},
            seeds.min,
            seeds.max,
            seeds.step,
        )
        base = _baseline_cell(trials, baseline)
        wanted = {name: d.next_seeds for name, d in decisions.items() if d.next_seeds}
        if not wanted:
            return trials, decisions
        extra = sorted({s for s_list in wanted.values() for s in s_list} - set(done[base]))
        if extra:
            wanted[base] = extra
        new = []
        for name, new_seeds in wanted.items():
            new += paired_trials(_plain([by_name[name]]), new_seeds)
            done[name] += new_seeds
        round_index += 1
        logger.info("adaptive seeds: round %d runs %d trials", round_index, len(new))
        trials = run_round(new, round_index)


def _plain(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A cell as a trial config carries: what it is, its settings, where it came from."""
    return [{k: v for k, v in cell.items() if k != "change"} for cell in cells]


def _baseline_cell(trials: pd.DataFrame, baseline: str | dict[str, Any]) -> str:
    return str(report._select_baseline(trials, baseline, report._group_column(trials)))


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
        }
        for name, d in decisions.items()
    ]
    columns = ["cell", "seeds", "stopped", "mean_diff", "ci_low", "ci_high"]
    return pd.DataFrame(rows, columns=columns)


def adaptive_summary(
    trials: pd.DataFrame,
    baseline: str | dict[str, Any],
    metric: str,
    mode: str,
    seeds: AdaptiveSeeds,
    alpha: float,
    equivalence: float,
) -> pd.DataFrame:
    """:func:`stop_table` from a finished folder's trials alone: each cell's seeds are those it
    ran ok; ``unresolved`` means the rounds were cut off before the cell was decided."""
    column = report._seed_column(trials)
    ok = report._ok(trials)
    counts = ok.groupby("cell")[column].nunique().to_dict()
    decisions = seed_decisions(
        trials,
        baseline,
        metric,
        mode,
        alpha,
        equivalence,
        {str(k): int(v) for k, v in counts.items()},
        seeds.min,
        seeds.max,
        seeds.step,
    )
    return stop_table(decisions)
