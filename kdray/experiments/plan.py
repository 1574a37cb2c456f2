"""Which trials an experiment runs, decided without Ray: the search space, the ablation cells,
the spec each trial runs, and the best trial of a table.

- The search space comes from the spec's ``search:`` block; Optuna samples it define-by-run
  (:class:`OptunaSpace`), so a conditional parameter is only sampled where its ``when`` holds.
- An ablation is every cell of its grid once per seed; with a sweep, each cell starts from the
  best trial of its algorithm there.
- A trial reports :data:`OBJECTIVE` (the best dev metric so far over epochs in which the
  classifier was trained) at time :data:`RUNG_TIME` (the number of such epochs), so staged
  algorithms (pid, sid) are compared with others only after the same classifier epochs.

Pure Python and pandas: :mod:`kdray.experiments.sweep` hands these to Ray Tune.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from kdray.analysis import pareto, results
from kdray.infra.store import json_cell
from kdray.spec import Distribution, Spec

OBJECTIVE = "objective"  # best dev metric so far over classifier-trained epochs; NaN before
RUNG_TIME = "kd_epoch"  # epochs in which the classifier was trained (ASHA's time axis)
SEED_INDEX = "__trial_index__"  # Ray Tune's Repeater: which repeat of a configuration a trial is


# ---------------------------------------------------------------------------------------------
# Search space


def decode(dist: Distribution | None, value: Any) -> Any:
    """A categorical value back from the JSON text it travelled as (explicit layer lists)."""
    if dist is None:
        return value
    if dist.kind in ("choice", "grid") and isinstance(value, str):
        if any(isinstance(v, (list, dict)) for v in dist.values):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
    return value


def ordered(search: dict[str, Distribution]) -> list[str]:
    """Parameters in an order where every condition's key is sampled before it is used."""
    order: list[str] = []
    pending = list(search)
    while pending:
        progressed = False
        for key in list(pending):
            deps = [k for k in (search[key].when or {}) if k in search and k not in order]
            if not deps:
                order.append(key)
                pending.remove(key)
                progressed = True
        if not progressed:
            raise ValueError(f"search: conditions form a cycle among {pending}")
    return order


def condition_holds(dist: Distribution, values: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether ``dist``'s ``when`` holds for the values sampled so far (else the spec's)."""
    for key, allowed in (dist.when or {}).items():
        current = values.get(key, base.get(key))
        if current not in allowed and json_cell(current) not in [json_cell(a) for a in allowed]:
            return False
    return True


def active_values(spec: Spec, sampled: dict[str, Any]) -> dict[str, Any]:
    """The sampled values whose conditions hold, decoded; the rest keep the spec's value."""
    base = spec.flat()
    out: dict[str, Any] = {}
    for key in ordered(spec.search):
        if key not in sampled:
            continue
        dist = spec.search[key]
        if condition_holds(dist, out, base):
            out[key] = decode(dist, sampled[key])
    return out


class OptunaSpace:
    """A define-by-run space: Optuna asks for a parameter only when its condition holds.

    A module-level class, not a closure, so Ray can pickle the searcher into the experiment
    checkpoint that ``Tuner.restore`` reads back.
    """

    def __init__(self, spec: Spec) -> None:
        self.search = dict(spec.search)
        self.base = spec.flat()
        self.order = ordered(self.search)

    def __call__(self, trial: Any) -> None:
        chosen: dict[str, Any] = {}
        for key in self.order:
            dist = self.search[key]
            if not condition_holds(dist, chosen, self.base):
                continue
            kind, values = dist.kind, dist.values
            if kind in ("choice", "grid"):
                encoded = trial.suggest_categorical(key, [json_cell(v) for v in values])
                chosen[key] = decode(dist, encoded)
            elif kind == "uniform":
                chosen[key] = trial.suggest_float(key, values[0], values[1])
            elif kind == "loguniform":
                chosen[key] = trial.suggest_float(key, values[0], values[1], log=True)
            else:
                chosen[key] = trial.suggest_int(key, values[0], values[1])


def trial_spec(base: Spec, config: dict[str, Any]) -> tuple[Spec, dict[str, Any]]:
    """The spec one trial runs, and the parameter values that were active for it."""
    if "ablation" in config:
        trial = config["ablation"]
        values = {**trial["values"], "train.seed": trial["seed"]}
        return base.with_values(values), values
    sampled = {k: v for k, v in config.items() if k in base.search}
    values = active_values(base, sampled)
    if SEED_INDEX in config:  # tune.seeds_per_trial: the i-th paired seed of a configuration
        values["train.seed"] = base.train.seed + int(config[SEED_INDEX])
    return base.with_values(values), values


def max_epochs(spec: Spec) -> int:
    """The most epochs a trial can run (the largest searched ``train.epochs``)."""
    epochs = spec.search.get("train.epochs")
    return int(max(epochs.values)) if epochs is not None else spec.train.epochs


# ---------------------------------------------------------------------------------------------
# A search continued from its tables alone


def told_trials(spec: Spec, rows: list[dict[str, Any]], values: list[str]) -> list[Any]:
    """Optuna's record of the ended trials of a search table (``param.<key>`` columns, their
    objectives in the columns ``values``; a row without them failed): what a search whose
    Optuna and Ray Tune state are gone tells a new study, so that it goes on from them."""
    import optuna
    from optuna.trial import TrialState

    space = OptunaSpace(spec)
    told = []
    for row in rows:
        params = {
            key: json_cell(_scalar(row[f"param.{key}"]))
            for key in spec.search
            if _given(row.get(f"param.{key}"))
        }
        fixed = optuna.trial.FixedTrial(params)
        space(fixed)  # the distributions, conditions included, as the search asked for them
        found = [row.get(column) for column in values]
        failed = row.get("status") == "error" or not all(_given(v) for v in found)
        told.append(
            optuna.trial.create_trial(
                params=fixed.params,
                distributions=fixed.distributions,
                values=None if failed else [float(v) for v in found],
                state=TrialState.FAIL if failed else TrialState.COMPLETE,
            )
        )
    return told


def continue_problem(spec: Spec) -> str | None:
    """Why a search cannot go on from its tables alone (None: it can): a grid's place and a
    configuration's seeds group (``tune.seeds_per_trial``) are kept only in Ray Tune's state."""
    if spec.tune.searcher.kind == "grid":
        return "a grid search's place in its grid is kept only there"
    if spec.tune.seeds_per_trial > 1:
        return "tune.seeds_per_trial > 1: which seeds of a configuration ran is kept only there"
    return None


def continue_study(study: Any, sampler: Any, space: OptunaSpace, told: list[Any]) -> None:
    """``told`` added to ``study`` (unless it has trials already), and ``sampler`` moved past
    as many proposals: a seeded sampler then proposes what an uninterrupted search would have
    proposed next (exactly while it samples at random, as TPE does for its first trials, and
    trials ran one at a time), rather than its first proposals again."""
    import optuna

    warm = optuna.create_study(sampler=sampler, directions=study.directions)
    for frozen in told:
        trial = warm.ask()
        space(trial)
        warm.tell(trial, frozen.values, state=frozen.state)
    if not study.trials:
        study.add_trials(told)


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and not isinstance(value, str) else value


# ---------------------------------------------------------------------------------------------
# Teacher-output caches an experiment needs


def cache_variants(spec: Spec, extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every (layer_map, student.layers, attention rows) a trial of this experiment can run
    with teacher-output caching on: a sweep's from its search space and the spec, an
    experiment of cells (``extra``: ablation, confirmation) from its cells, and the spec where a
    cell leaves the setting to it (the search block does not apply there, and each extra
    layer set costs a teacher pass)."""

    def candidates(key: str) -> list[Any]:
        # the spec's value counts unless every cell sets its own (a confirmation's configs)
        values = [spec.flat()[key]] if not extra or any(key not in c for c in extra) else []
        dist = spec.search.get(key) if extra is None else None
        if dist is not None and dist.kind in ("choice", "grid"):
            values += list(dist.values)
        values += [cell[key] for cell in extra or [] if key in cell]
        unique: list[Any] = []
        for value in values:
            if value not in unique:
                unique.append(value)
        return unique

    if not any(
        spec.with_values(cell).teacher.cache.enabled not in (False, "off") for cell in extra or [{}]
    ):
        return []
    keys = ("distill.layer_map", "student.layers", "distill.losses.attention.rows")
    return [
        dict(zip(keys, combo, strict=True))
        for combo in itertools.product(*(candidates(k) for k in keys))
    ]


# ---------------------------------------------------------------------------------------------
# Ablations: every cell of a grid once per seed, no pruning, paired by seed


def cell_name(values: dict[str, Any]) -> str:
    return ",".join(f"{k}={json_cell(v)}" for k, v in values.items())


def ablation_cells(spec: Spec, from_sweep: str | Path | None = None) -> list[dict[str, Any]]:
    """The grid of the ``ablation.axes``; each cell starts from the spec's settings or, with a
    sweep, from the best trial of the same algorithm there (its sampled ``param.*`` values)."""
    if spec.ablation is None or not spec.ablation.axes:
        raise ValueError("the spec has no ablation.axes: nothing to ablate")
    axes = spec.ablation.axes
    sweep_trials = results.load(from_sweep)[0] if from_sweep else None
    cells = []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo, strict=True))
        base: dict[str, Any] = {}
        source = "spec"
        if sweep_trials is not None:
            best = _best_matching(sweep_trials, values, spec)
            if best is not None:
                source = f"sweep:{best['trial_id']}"
                base = sampled_settings(best, spec, exclude=set(axes))
        cells.append({"cell": cell_name(values), "values": {**base, **values}, "source": source})
    for cell in cells:
        spec.with_values(cell["values"])  # every cell must be a valid spec before Ray starts
    return cells


def ablation_trials(
    spec: Spec, from_sweep: str | Path | None = None, seeds: list[int] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(cells, trials)``: the cells and every cell x seed as one trial's config."""
    cells = ablation_cells(spec, from_sweep)
    run_seeds = seeds or (spec.ablation.first_seeds() if spec.ablation else [spec.train.seed])
    return cells, [{**cell, "seed": seed} for cell in cells for seed in run_seeds]


def sampled_settings(row: dict[str, Any], spec: Spec, exclude: set[str]) -> dict[str, Any]:
    """A sweep trial's sampled ``param.*`` values as settings (null ones left out)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        setting = key.removeprefix("param.")
        if key.startswith("param.") and setting not in exclude and not results.is_missing(value):
            out[setting] = decode(spec.search.get(setting), value)
    return out


def _best_matching(trials: pd.DataFrame, values: dict[str, Any], spec: Spec) -> dict | None:
    """The best ok sweep trial with the cell's algorithm (the axis a sweep tunes per)."""
    rows = trials[trials["status"] == "ok"]
    algorithm = values.get("distill.algorithm")
    if algorithm is not None and "distill.algorithm" in rows:
        rows = rows[rows["distill.algorithm"] == algorithm]
    return best_trial(rows, spec.tune.mode) if not rows.empty else None


def students_to_keep(
    rows: list[dict[str, Any]],
    policy: str | int,
    mode: str,
    objectives: list[dict[str, Any]] | None = None,
) -> set[str]:
    """Trial ids whose student a ``tune.keep_students`` policy keeps: the best ``K`` ok trials
    (``best`` is 1) of each group, where a group is an ablation ``cell``, a confirmed
    configuration (``config_rank``) or, in a sweep, all trials, ranked by :func:`rank_key`.
    With ``objectives`` (a multi-objective sweep), ``best`` keeps every trial on the Pareto
    front, so any of them can be exported."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("student_path")]
    if policy == "all":
        return {str(r["trial_id"]) for r in ok}
    if objectives and policy == "best" and ok:
        return {str(t) for t in pareto.front(pd.DataFrame(ok), objectives)["trial_id"]}
    top = 0 if policy == "none" else 1 if policy == "best" else int(policy)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in ok:
        cells = (row[k] for k in ("cell", "config_rank") if not results.is_missing(row.get(k)))
        groups.setdefault(json_cell(next(cells, None)), []).append(row)
    keep: set[str] = set()
    for members in groups.values():
        ranked = sorted(members, key=lambda row: rank_key(row, mode))
        keep.update(str(row["trial_id"]) for row in ranked[:top])
    return keep


def rank_key(row: dict[str, Any], mode: str) -> tuple[float, float, str, str]:
    """Sort key of a trial, best first: its best dev metric, then (ties are common on small dev
    sets) its final one, then its spec fingerprint and id, so that the same trials always rank
    the same, in any row order; a missing score ranks last."""
    sign = -1.0 if mode == "max" else 1.0

    def score(which: str) -> float:
        value = row.get(f"{which}.dev.{row.get('metric')}")
        return math.inf if results.is_missing(value) else sign * float(value)

    fingerprint = row.get("spec_fingerprint")
    fingerprint = "" if results.is_missing(fingerprint) else str(fingerprint)
    return score("best"), score("final"), fingerprint, str(row.get("trial_id", ""))


def best_trial(
    trials: pd.DataFrame, mode: str = "max", by_mean: bool = False
) -> dict[str, Any] | None:
    """The ok trial with the best value of its selection metric, as a row dict; ``by_mean``
    (``tune.seeds_per_trial`` > 1): the best seed of the configuration with the best mean."""
    ok = trials[trials["status"] == "ok"] if "status" in trials else trials
    if ok.empty:
        return None
    metric = ok["metric"].iloc[0]
    column = f"best.dev.{metric}"
    if column not in ok:
        return None
    ok = ok.dropna(subset=[column]).reset_index(drop=True)  # labels may repeat (concatenated)
    if ok.empty:
        return None
    if by_mean:
        means = results.seed_means(ok, column)
        best = means.sort_values("mean", ascending=mode == "min", kind="stable").iloc[0]
        ok = ok[[results.config_key(r) == best["config"] for r in ok.to_dict("records")]]
    return min(ok.to_dict("records"), key=lambda row: rank_key(row, mode))
