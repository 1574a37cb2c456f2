"""The experiments that follow a sweep (confirm, leave-one-out, adaptive seeds), designed
without Ray: from a sweep to a confirmed, explained answer.

- **Confirmation** (:func:`confirm_configs`, :func:`winners_curse`): a sweep's best score is an
  optimistic estimate (the maximum of noisy trials); its top-K distinct configurations are run
  again with fresh paired seeds, and the gap between the sweep's score and the confirmed mean
  (the winner's curse) says how much of the ranking was luck.
- **Leave-one-out ablation** (:func:`leave_one_out_cells`): the recipe itself, then the recipe
  with exactly one component changed to its plain alternative, so each cell's difference from
  the recipe is that component's contribution.
- **Adaptive seeds** (:func:`seed_decisions`, :func:`adaptive_rounds`): seeds are spent only on
  cells whose paired comparison with the baseline is still unresolved.

Pure Python and pandas: :mod:`kdray.experiments.sweep` runs the trials these describe.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from kdray.analysis import report, results
from kdray.analysis.report import (  # noqa: F401 - the study's statistics, kept with the report's
    BETTER,
    EQUIVALENT,
    MAX_REACHED,
    UNRESOLVED,
    WORSE,
    Decision,
    adaptive_summary,
    ranking_survived,
    seed_decisions,
    stop_table,
    winners_curse,
)
from kdray.experiments import plan
from kdray.infra.store import json_cell
from kdray.method import algorithms
from kdray.spec import AdaptiveSeeds, ComponentsSpec, Spec, stage_schedule, term_weights

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
    which settings to keep, not which trial was luckiest. A seed-averaged sweep
    (``tune.seeds_per_trial``) ranks and scores each configuration by its seeds' mean, as its
    searcher did.
    """
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    column = _metric_column(trials, spec)
    ok = trials[trials["status"] == "ok"] if "status" in trials else trials
    ok = ok.dropna(subset=[column])
    if spec.tune.seeds_per_trial > 1:
        means = results.seed_means(ok, column).set_index("config")["mean"]
        ok = ok.assign(**{column: [means[results.config_key(r)] for r in ok.to_dict("records")]})
    ok = ok.sort_values(column, ascending=spec.tune.mode == "min", kind="stable")
    configs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in ok.to_dict("records"):
        values = plan.sampled_settings(row, spec, exclude={"train.seed"})
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


DEFAULT_CELL = report.CONTROL_CELL  # the spec as written: the control every confirmation runs


def with_control(configs: list[dict[str, Any]], spec: Spec) -> list[dict[str, Any]]:
    """``configs`` plus the spec as written (cell ``default``, ``config_rank`` 0), run with the
    same paired seeds, so the confirmed winner is compared with what the user would get
    without the sweep; not added when a configuration already is the spec as written."""
    own = spec.fingerprint()
    for config in configs:
        if spec.with_values(config["values"]).fingerprint() == own:
            config["is_default"] = True
            return configs
    control = {
        "cell": DEFAULT_CELL,
        "config_rank": report.CONTROL_RANK,
        "values": {},
        "source": "spec",
        "sweep_score": float("nan"),
        CONFIG_VALUES: json.dumps({}),
    }
    return [*configs, control]


def control_verdict(trials: pd.DataFrame, spec: Spec, cell: str) -> Any:
    """``cell``'s :class:`kdray.analysis.stats.Verdict` against the spec as written (``default``),
    every confirmed configuration against it one Holm family; None without a default cell."""
    if "cell" not in trials or DEFAULT_CELL not in set(trials["cell"]) or cell == DEFAULT_CELL:
        return None
    metric = spec.tune.metric or report.main_metric(trials)
    ablation = spec.ablation
    alpha = ablation.alpha if ablation else report.DEFAULT_ALPHA
    margin = ablation.equivalence if ablation else report.DEFAULT_MARGIN
    verdicts = report.cell_verdicts(trials, DEFAULT_CELL, metric, spec.tune.mode, alpha, margin)
    return verdicts.get(cell)


def paired_trials(cells: list[dict[str, Any]], seeds: list[int]) -> list[dict[str, Any]]:
    """Every cell once per seed, the same seeds for every cell (so they pair)."""
    return [{**cell, "seed": seed} for cell in cells for seed in seeds]


# ---------------------------------------------------------------------------------------------
# Leave-one-out cells


def recipe_from_results(trials: pd.DataFrame, spec: Spec) -> tuple[dict[str, Any], str]:
    """``(values, source)`` of the recipe a folder recommends: a confirmation's winner (the
    best confirmed mean), else a sweep's best trial."""
    if "config_rank" in trials.columns and CONFIG_VALUES in trials.columns:
        metric = spec.tune.metric or report.main_metric(trials)
        curse = winners_curse(None, trials, metric, spec.tune.mode)
        winner = curse.sort_values(["confirmed_rank", "config_rank"]).iloc[0]
        control = control_verdict(trials, spec, str(winner["cell"]))
        if control is not None and control.word in (WORSE, UNRESOLVED):
            # not shown at least as good as the spec as written: that is the recipe, then
            return {}, f"confirmed:{DEFAULT_CELL} ({winner['cell']} {control.word} than it)"
        rows = trials[trials["cell"] == winner["cell"]]
        return json.loads(rows.iloc[0][CONFIG_VALUES]), f"confirmed:{winner['cell']}"
    best = plan.best_trial(trials, spec.tune.mode, spec.tune.seeds_per_trial > 1)
    if best is None:
        raise ValueError("the results have no ok trial with a metric value to take a recipe from")
    return plan.sampled_settings(best, spec, exclude={"train.seed"}), f"sweep:{best['trial_id']}"


def _active_terms(spec: Spec) -> set[str]:
    """The loss terms some stage of the spec's algorithm optimises (weight > 0 and used)."""
    weights = term_weights(spec)
    stages = stage_schedule(spec).stages
    return {term for stage in stages for term in algorithms.active_terms(stage, weights)}


def _changes(spec: Spec, recipe: Spec) -> tuple[list[tuple[str, dict]], list[dict[str, str]]]:
    """``(candidate (name, change) pairs, components that do not apply with why)``."""
    parts = spec.ablation.components if spec.ablation else ComponentsSpec()
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
            algorithms.check_weights(stage_schedule(cell_spec).stages, term_weights(cell_spec))
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


def adaptive_rounds(
    cells: list[dict[str, Any]],
    baseline: str | dict[str, Any],
    seeds: AdaptiveSeeds,
    run_round: Callable[[list[dict[str, Any]], int], pd.DataFrame],
    *,
    metric: str | None = None,
    mode: str = "max",
    alpha: float = 0.05,
    equivalence: float = 0.005,
    stop_before: Callable[[int], str | None] | None = None,
) -> tuple[pd.DataFrame, dict[str, Decision]]:
    """Run rounds until every cell is resolved or at ``seeds.max``.

    ``run_round(trials, round)`` runs the given trial configs and returns every trial so far.
    Round 1 runs every cell with seeds ``1..min``; later rounds give each unresolved cell its
    next ``step`` seeds, and the baseline every seed any cell gets, so seeds stay paired.
    ``metric``: default the trials' selection metric. ``stop_before(round)`` (a study's budget)
    is asked before each later round: a reason raises :class:`SeedsStopped` with the rounds so
    far decided, so a budget ends between rounds, never inside one.
    """
    first = seeds.seeds(seeds.min)
    done = {cell["cell"]: list(first) for cell in cells}
    by_name = {cell["cell"]: cell for cell in cells}
    trials = run_round(paired_trials(_plain(cells), first), 1)
    round_index = 1
    metric = metric or report.main_metric(trials)
    while True:
        decisions = seed_decisions(
            trials,
            baseline,
            metric,
            mode,
            alpha,
            equivalence,
            {name: len(s) for name, s in done.items()},
            seeds,
        )
        base = _baseline_cell(trials, baseline)
        wanted = {name: d.next_seeds for name, d in decisions.items() if d.next_seeds}
        if not wanted:
            return trials, decisions
        extra = sorted({s for s_list in wanted.values() for s in s_list} - set(done[base]))
        if extra:
            wanted[base] = extra
        reason = stop_before(round_index + 1) if stop_before else None
        if reason:
            raise SeedsStopped(reason, round_index, trials, decisions)
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


# ---------------------------------------------------------------------------------------------
# Adaptive rounds on disk: one Tune experiment per round, the tables merged above them

ROUNDS_DIR = "rounds"


def merge_rounds(out_dir: Path, folders: list[Path]) -> pd.DataFrame:
    """The rounds' trials, epochs and CKA tables concatenated into ``out_dir``'s tables (what
    ``kdray report`` reads); returns the trials."""
    merged = {}
    for kind, file in (
        ("trials", results.TRIALS_FILE),
        ("epochs", results.EPOCHS_FILE),
        ("cka", results.CKA_FILE),
    ):
        rows = [row for folder in folders for row in results.load_tables(folder)[kind]]
        if rows:
            merged[kind] = results.write_table(rows, out_dir / file, replace=True)
    return merged.get("trials", pd.DataFrame())


class RoundInterrupted(RuntimeError):
    """A round's experiment returned with trials cut off (Ctrl-C): no decision is taken from
    it; ``--resume`` continues that round. ``trials`` holds every round's rows so far and
    ``planned`` how many trials the rounds so far were to run."""

    def __init__(self, round_index: int, folder: Path, trials: pd.DataFrame, planned: int) -> None:
        super().__init__(
            f"adaptive seeds: round {round_index} was interrupted ({folder}); continue it with "
            "--resume"
        )
        self.round_index, self.folder, self.trials, self.planned = (
            round_index, folder, trials, planned,
        )  # fmt: skip


class SeedsStopped(RuntimeError):
    """The rounds stopped between rounds for ``reason`` (a study's budget) with cells still
    unresolved: ``trials`` holds every finished round's rows and ``decisions`` where each cell
    stands; ``--resume`` with a larger budget continues with the next round."""

    def __init__(
        self, reason: str, rounds: int, trials: pd.DataFrame, decisions: dict[str, Decision]
    ) -> None:
        super().__init__(f"adaptive seeds stopped after round {rounds}: {reason}")
        self.reason, self.rounds, self.trials, self.decisions = reason, rounds, trials, decisions


def run_adaptive(
    spec: Spec,
    cells: list[dict[str, Any]],
    baseline: str | dict[str, Any],
    run: Callable[..., Any],
    *,
    name: str,
    out_dir: Path,
    resume: bool = False,
    overwrite: bool = False,
    stop_before: Callable[[int], str | None] | None = None,
    lengths: tuple[Any, ...] = (),
    **run_options: Any,
) -> tuple[pd.DataFrame, dict[str, Decision]]:
    """:func:`adaptive_rounds` with each round one experiment in ``out_dir/rounds/round-<k>``
    run by ``run`` (:func:`kdray.experiments.sweep.run_trials`), its tables merged into ``out_dir``.

    A folder holds one experiment, so rounds cannot append to one Tune experiment; with
    ``resume``, a round whose folder exists is continued (a finished one returns at once) and
    the same decisions follow, since they depend only on the tables. A round cut off (Ctrl-C)
    raises :class:`RoundInterrupted` instead of deciding from part of its seeds.
    """
    if not isinstance(spec.ablation.seeds if spec.ablation else None, AdaptiveSeeds):
        raise ValueError("ablation.seeds is a list: give {min, max, step} for adaptive seeds")
    results.claim_folder(out_dir, spec, "ablate", resume=resume, overwrite=overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    results.write_experiment(out_dir, spec, "ablate", lengths)
    folders: list[Path] = []
    all_values = [cell["values"] for cell in cells]

    def run_round(trials: list[dict[str, Any]], round_index: int) -> pd.DataFrame:
        folder = out_dir / ROUNDS_DIR / f"round-{round_index}"
        again = resume and (folder / results.EXPERIMENT_FILE).exists()
        run(
            spec,
            trials,
            name=f"{name}-round{round_index}",
            command="ablate",
            cells=all_values,
            out_dir=folder,
            resume=again,
            **run_options,
        )
        folders.append(folder)
        merged = merge_rounds(out_dir, folders)
        ended = results.load_tables(folder)["trials"]
        if len(ended) < len(trials) or any(r.get("status") in results.UNFINISHED for r in ended):
            planned = len(merged) - len(ended) + len(trials)
            raise RoundInterrupted(round_index, folder, merged, planned)
        return merged

    ablation = spec.ablation
    return adaptive_rounds(
        cells,
        baseline,
        ablation.seeds,
        run_round,
        metric=spec.tune.metric,
        mode=spec.tune.mode,
        alpha=ablation.alpha,
        equivalence=ablation.equivalence,
        stop_before=stop_before,
    )
