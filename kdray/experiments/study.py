"""``kdray study``: sweep -> confirm -> leave-one-out of the winner, one folder per phase.

A study answers *which recipe, how good, and which of its parts matter* in one command. Each
phase is an ordinary experiment in ``<study>/<phase>`` (so ``kdray report`` and ``kdray export``
read it as usual); ``study.json`` records which phases are done, so ``--resume`` skips those
and continues the interrupted one. The phases are run by callables the caller passes (the CLI
gives Ray-backed ones), so the bookkeeping, the budget and ``STUDY.md`` are decided without Ray.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kdray.analysis import plots, report, results, stats
from kdray.experiments import followup, plan
from kdray.infra.store import remove_stale_tree, write_text_atomic
from kdray.spec import AblationSpec, AdaptiveSeeds, Spec, StudyBudgetSpec

logger = logging.getLogger("kdray")

STUDY_FILE = "study.json"
STUDY_REPORT = "STUDY.md"
PHASE_REPORT = "REPORT.md"
PHASES = ("sweep", "confirm", "ablation")
DEFAULT_SEEDS = AdaptiveSeeds(min=3, max=10, step=2)  # when the spec's ablation.seeds is a list
DONE, RUNNING, INTERRUPTED, STOPPED = "done", "running", "interrupted", "stopped"

# (phase folder, resume, budget_spent) -> (the phase's trials, how many rows a finished phase
# has at least); ``budget_spent()`` says why the budget is spent now (or None), for a phase that
# can stop cleanly part-way (the ablation, between its adaptive rounds).
PhaseRunner = Callable[[Path, bool, Callable[[], str | None]], tuple[pd.DataFrame, int]]


# ---------------------------------------------------------------------------------------------
# study.json


def read_study(folder: str | Path) -> dict[str, Any]:
    """The study's record (``{"name", "phases": {phase: {"status", "seconds", "trials"}},
    "stopped"}``); an empty one where there is none yet."""
    path = Path(folder) / STUDY_FILE
    if not path.exists():
        return {"phases": {}, "stopped": None}
    return json.loads(path.read_text())


def write_study(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write ``study.json`` atomically: a reader sees the old record or the new one."""
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    return write_text_atomic(Path(folder) / STUDY_FILE, text)


def claim_study(folder: Path, spec: Spec, resume: bool) -> dict[str, Any]:
    """The record of a new study in ``folder``, or of the one ``resume`` continues; a folder
    that already holds something is refused with the ways out. Temporary files that a killed
    run left are removed first (a study killed while writing its first record is no study)."""
    record_file = folder / STUDY_FILE
    remove_stale_tree(folder)
    if resume:
        if not record_file.exists():
            raise ValueError(
                f"--resume: {folder} holds no {STUDY_FILE}, so there is no study to continue; "
                "start one with kdray study SPEC (without --resume)"
            )
        record = read_study(folder)
        if record.get("name") != spec.name:
            raise ValueError(
                f"--resume: {record_file} is the study {record.get('name')!r}, not "
                f"{spec.name!r}; give its own spec or another --out DIR"
            )
        record["stopped"] = None
        return record
    if folder.exists() and (record_file.exists() or any(folder.iterdir())):
        what = "a study" if record_file.exists() else "other files"
        raise ValueError(
            f"{folder} already holds {what}. Ways out: continue it with kdray study SPEC "
            "--resume, or write elsewhere with --out DIR."
        )
    return {"name": spec.name, "phases": {}, "stopped": None}


def phase_status(record: dict[str, Any], phase: str) -> str:
    """A phase's status in a study record: pending, running, interrupted, stopped or done."""
    return record["phases"].get(phase, {}).get("status", "pending")


def phase_trials(folder: Path, phase: str) -> pd.DataFrame:
    """A phase's trials table; empty before the phase wrote one."""
    if not (folder / phase / results.TRIALS_FILE).exists():
        return pd.DataFrame()
    return results.load(folder / phase)[0]


def budget_reached(budget: StudyBudgetSpec, trials: int, hours: float) -> str | None:
    """Why the study stops before its next phase (its budget is spent), or None."""
    if budget.trials is not None and trials >= budget.trials:
        return f"the budget of {budget.trials} trials is spent ({trials} trials run)"
    if budget.hours is not None and hours >= budget.hours:
        return f"the budget of {budget.hours:g} wall hours is spent ({hours:.2f} hours)"
    return None


def _spent(folder: Path, record: dict[str, Any]) -> tuple[int, float]:
    """``(trials in every phase table, wall hours the phases took)``."""
    trials = sum(len(phase_trials(folder, phase)) for phase in PHASES)
    seconds = sum(entry.get("seconds", 0.0) for entry in record["phases"].values())
    return trials, seconds / 3600


# ---------------------------------------------------------------------------------------------
# The chain


@dataclass
class StudyOutcome:
    folder: Path
    record: dict[str, Any]
    interrupted: str | None = None  # the phase that did not finish
    stopped: str | None = None  # why the budget stopped the study before a phase


def ablation_spec(spec: Spec) -> Spec:
    """The spec of the study's ablation phase: its ``ablation`` block as a leave-one-out, with
    adaptive seeds (:data:`DEFAULT_SEEDS` where the spec gives a fixed list)."""
    ablation = spec.ablation or AblationSpec()
    seeds = ablation.seeds if ablation.adaptive else DEFAULT_SEEDS
    forced = ablation.model_copy(update={"design": "leave_one_out", "seeds": seeds})
    return spec.model_copy(update={"ablation": forced})


def run_study(
    spec: Spec, folder: Path, runners: dict[str, PhaseRunner], *, resume: bool = False
) -> StudyOutcome:
    """Run the phases in order, skipping done ones; before each (and between the ablation's
    adaptive rounds) stop if the budget is spent. Each finished or budget-stopped phase gets its
    ``REPORT.md``; ``STUDY.md`` is rewritten after each finished phase (what is known so far,
    should the study later crash) and when the study ends."""
    record = claim_study(folder, spec, resume)
    folder.mkdir(parents=True, exist_ok=True)
    write_study(folder, record)
    budget = spec.study.budget if spec.study else StudyBudgetSpec()
    outcome = StudyOutcome(folder, record)
    for phase in PHASES:
        entry = record["phases"].setdefault(phase, {"status": "pending", "seconds": 0.0})
        if entry["status"] == DONE:
            continue
        stop = budget_reached(budget, *_spent(folder, record))
        if stop:
            record["stopped"] = outcome.stopped = f"stopped before the {phase} phase: {stop}"
            logger.info("study %s: %s", spec.name, outcome.stopped)
            break
        if not _run_phase(phase, runners[phase], folder, record, budget, outcome):
            break
        if phase != PHASES[-1]:  # the last one's is written just below
            write_text_atomic(folder / STUDY_REPORT, study_markdown(spec, folder, record))
    write_study(folder, record)
    write_text_atomic(folder / STUDY_REPORT, study_markdown(spec, folder, record))
    return outcome


def _run_phase(
    phase: str,
    runner: PhaseRunner,
    folder: Path,
    record: dict[str, Any],
    budget: StudyBudgetSpec,
    outcome: StudyOutcome,
) -> bool:
    """Run (or continue) one phase and record how it ended; False when the study stops here."""
    entry = record["phases"][phase]
    again = entry["status"] in (RUNNING, INTERRUPTED, STOPPED)
    entry["status"] = RUNNING
    write_study(folder, record)
    started = time.time()

    def budget_spent() -> str | None:
        trials, hours = _spent(folder, record)
        return budget_reached(budget, trials, hours + (time.time() - started) / 3600)

    try:
        trials, expected = runner(folder / phase, again, budget_spent)
    except followup.SeedsStopped as stop:
        entry["status"], entry["trials"] = STOPPED, len(stop.trials)
        record["stopped"] = outcome.stopped = (
            f"stopped the {phase} phase after its adaptive round {stop.rounds}: {stop.reason}"
        )
        logger.info("study %s: %s", record.get("name"), outcome.stopped)
        write_phase_report(folder / phase)
        return False
    finally:
        entry["seconds"] = entry.get("seconds", 0.0) + time.time() - started
        write_study(folder, record)
    entry["trials"] = len(trials)
    if not results.all_ended(trials, expected):
        outcome.interrupted, entry["status"] = phase, INTERRUPTED
        write_study(folder, record)
        return False
    entry["status"] = DONE
    write_study(folder, record)
    write_phase_report(folder / phase)
    return True


def write_phase_report(phase_dir: Path) -> Path:
    """``<phase>/REPORT.md`` (``kdray report``'s markdown) with its plots in ``<phase>/plots``;
    tables the report cannot use give a REPORT.md that says why."""
    path = phase_dir / PHASE_REPORT
    try:
        built = report.build_report(phase_dir)
        plots.draw(built, phase_dir / "plots")
    except ValueError as error:
        write_text_atomic(path, f"# kdray report: {phase_dir.name}\n\nno report: {error}\n")
        return path
    return built.save(path)


# ---------------------------------------------------------------------------------------------
# STUDY.md


def _metric(spec: Spec, trials: pd.DataFrame) -> str:
    return str(spec.tune.metric or report.main_metric(trials)).removeprefix("dev.")


def _settings_lines(values: dict[str, Any]) -> list[str]:
    if not values:
        return ["- the spec's own settings (nothing searched differs from them)"]
    return [f"- `{key}`: {json.dumps(value)}" for key, value in sorted(values.items())]


def _teacher_lines(trials: pd.DataFrame, metric: str, score: float, what: str) -> list[str]:
    column = f"teacher.dev.{metric}"
    if column not in trials or trials[column].dropna().empty:
        return ["The runs recorded no teacher score, so the retention is not known."]
    teacher = float(trials[column].dropna().iloc[0])
    return [
        f"The teacher scores dev {metric} {teacher:.4f}; {what} keeps "
        f"{100 * score / teacher:.1f} % of it (retention)."
    ]


def winner_values(trials: pd.DataFrame, cell: str) -> dict[str, Any]:
    rows = trials[trials["cell"] == cell]
    return json.loads(rows.iloc[0][followup.CONFIG_VALUES]) if len(rows) else {}


def _default_mean(trials: pd.DataFrame) -> float:
    rows = trials[(trials["cell"] == followup.DEFAULT_CELL) & (trials["status"] == "ok")]
    column = next(c for c in trials.columns if c.startswith("best.dev.") and c in rows)
    return float(rows[column].mean())


def _control_lines(control: Any, shown: bool) -> list[str]:
    """The confirmed winner against the spec as written, and whether kdray recommends it."""
    if control is None:
        return [
            "No control: this confirmation did not run the spec as written, so whether the "
            "recipe beats it is not known (kdray confirm runs it since this check was added)."
        ]
    said = f"Against the spec as written (cell `default`, the same seeds): {stats.words(control)}."
    if shown:
        return [said, "kdray recommends this recipe: it is at least as good as the default."]
    return [
        said,
        "kdray does **not** recommend it: it is not shown at least as good as the spec as "
        f"written ({control.word}). Keep the spec as written, or add seeds to settle it.",
    ]


def _recipe_section(spec: Spec, folder: Path, record: dict[str, Any]) -> list[str]:
    phases = record["phases"]
    lines = ["## The recommended recipe", ""]
    if phases.get("confirm", {}).get("status") == DONE:
        trials = phase_trials(folder, "confirm")
        metric = _metric(spec, trials)
        sweep = phase_trials(folder, "sweep")
        curse = report.winners_curse(None if sweep.empty else sweep, trials, metric, spec.tune.mode)
        winner = curse.sort_values(["confirmed_rank", "config_rank"]).iloc[0]
        values, _ = followup.recipe_from_results(trials, spec)
        mean, half = float(winner["mean"]), float(winner["ci95"])
        control = followup.control_verdict(trials, spec, str(winner["cell"]))
        shown = control is None or control.word in (followup.BETTER, followup.EQUIVALENT)
        lines += [
            f"The sweep's configuration `{winner['cell']}` (sweep rank {winner['config_rank']}) "
            f"is the best after confirmation with {winner['n']} seeds. Its settings:",
            "",
            *_settings_lines(winner_values(trials, str(winner["cell"]))),
            "",
            f"Confirmed dev {metric}: {mean:.4f}, 95 % CI {mean - half:.4f} to {mean + half:.4f} "
            f"({winner['n']} seeds); the sweep scored it {winner['sweep_score']:.4f} "
            f"(winner's curse {winner['winners_curse']:+.4f}).",
            "",
            *_control_lines(control, shown),
            "",
            *_teacher_lines(trials, metric, mean if shown else _default_mean(trials), "the recipe"),
        ]
        if not shown:
            lines += ["", "The recipe (and the leave-one-out below) is therefore:", ""]
            lines += _settings_lines(values)
        return lines
    sweep = phase_trials(folder, "sweep")
    best = (
        None
        if sweep.empty
        else plan.best_trial(sweep, spec.tune.mode, spec.tune.seeds_per_trial > 1)
    )
    if best is None:
        return [*lines, "No phase has finished yet: nothing is known so far."]
    metric = _metric(spec, sweep)
    score = float(best[f"best.dev.{metric}"])
    values = followup.recipe_from_results(sweep, spec)[0]
    return [
        *lines,
        f"Only the sweep's best trial is known: `{best['trial_id']}`, dev {metric} "
        f"{score:.4f}, unconfirmed (a sweep's best score is optimistic: it is the maximum "
        "of noisy trials, and no fresh seeds have tested it). Its settings:",
        "",
        *_settings_lines(values),
        "",
        *_teacher_lines(sweep, metric, score, "this trial"),
    ]


_VERDICT = {
    followup.WORSE: "matters: the recipe is worse without it (keep it)",
    followup.BETTER: "matters: the recipe is better with this change (consider making it)",
}


def _components_section(spec: Spec, folder: Path, record: dict[str, Any]) -> list[str]:
    status = phase_status(record, "ablation")
    if status not in (DONE, STOPPED):
        return ["## Which components matter", "", "Not known yet: the ablation has not finished."]
    cut_off = (
        "the budget stopped its seeds; kdray study --resume with a larger study.budget adds more"
        if status == STOPPED
        else "rounds cut off"
    )
    built = report.build_report(folder / "ablation")
    ablation = ablation_spec(spec).ablation
    margin = f"+-{ablation.equivalence:g}"
    matter, rest = [], []
    for row in built.stopping.to_dict("records"):
        diff = (
            f"dev {built.metric} {row['mean_diff']:+.4f} vs the recipe, {row['level']:.1%} "
            f"interval {row['ci_low']:+.4f} to {row['ci_high']:+.4f}, {row['seeds']} seeds"
        )
        if row["stopped"] in _VERDICT:
            matter.append(f"- `{row['cell']}` {_VERDICT[row['stopped']]}; {diff}.")
        elif row["stopped"] == followup.EQUIVALENT:
            rest.append(f"- `{row['cell']}` is equivalent to the recipe within {margin}; {diff}.")
        elif row["stopped"] == followup.MAX_REACHED:
            rest.append(
                f"- `{row['cell']}` is unresolved at the maximum of seeds (whether it matters "
                f"is not shown either way); {diff}."
            )
        else:
            rest.append(f"- `{row['cell']}` is unresolved so far ({cut_off}); {diff}.")
    lines = ["## Which components matter", "", "Each cell is the recipe with one change."]
    lines += [f"Verdicts: {built.design.describe()}." if built.design else ""]
    lines += ["", *(matter or ["- none shown to matter"])]
    lines += ["", "## Equivalent or unresolved", "", *(rest or ["- none"])]
    return lines + _skipped_lines(spec, folder)


def _skipped_lines(spec: Spec, folder: Path) -> list[str]:
    """The components the leave-one-out could not test on this recipe, with why."""
    values, source = followup.recipe_from_results(phase_trials(folder, "confirm"), spec)
    _, skipped = followup.leave_one_out_cells(ablation_spec(spec), values, source)
    if not skipped:
        return []
    return ["", "Not tested on this recipe:", ""] + [
        f"- `{item['cell']}`: {item['reason']}" for item in skipped
    ]


def _spent_section(spec: Spec, folder: Path, record: dict[str, Any]) -> list[str]:
    resources = spec.tune.resources
    lines = [
        "## Spent",
        "",
        "| phase | status | runs | seeds | CPU hours | GPU hours | wall hours |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for phase in PHASES:
        entry = record["phases"].get(phase, {})
        trials = phase_trials(folder, phase)
        seconds = float(trials["wall_time"].sum()) if "wall_time" in trials else 0.0
        seeds = trials["seed"].nunique() if "seed" in trials and phase != "sweep" else "-"
        lines.append(
            f"| {phase} | {entry.get('status', 'not run')} | {len(trials)} | {seeds} | "
            f"{seconds * resources.cpu / 3600:.3f} | {seconds * resources.gpu / 3600:.3f} | "
            f"{entry.get('seconds', 0.0) / 3600:.3f} |"
        )
    lines += ["", "CPU (GPU) hours: the trials' wall time x tune.resources.cpu (gpu)."]
    return lines


def study_markdown(spec: Spec, folder: Path, record: dict[str, Any]) -> str:
    """STUDY.md: the recipe, its confirmed score and the teacher's, which components matter,
    what each phase spent, and links to the phase reports."""
    phases = record["phases"]
    done = [p for p in PHASES if phase_status(record, p) in (DONE, STOPPED)]
    status = "; ".join(f"{p} {phases.get(p, {}).get('status', 'not run')}" for p in PHASES)
    lines = [f"# kdray study: {spec.name}", "", f"Phases: {status}."]
    if record.get("stopped"):
        lines += ["", f"The study {record['stopped']}; what follows is what is known so far."]
    interrupted = [p for p in PHASES if phase_status(record, p) in (RUNNING, INTERRUPTED)]
    if interrupted:
        lines += ["", f"The {interrupted[0]} phase was interrupted: continue with --resume."]
    lines += ["", *_recipe_section(spec, folder, record)]
    lines += ["", *_components_section(spec, folder, record)]
    lines += ["", *_spent_section(spec, folder, record), "", "## Reports", ""]
    lines += [f"- {p}: [{p}/{PHASE_REPORT}]({p}/{PHASE_REPORT})" for p in done] or ["- none yet"]
    return "\n".join(lines) + "\n"
