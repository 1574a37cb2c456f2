"""A teacher worth distilling: what ``kdray teacher SPEC --search`` searches, keeps and says.

Each trial of the search fine-tunes the teacher with the settings Optuna proposes from the spec's
``search`` block (teacher settings and ``data.max_seq_length`` only), reporting dev metrics per
epoch so ASHA can stop weak trials early (:func:`kdray.experiments.sweep.run_teacher_search` runs
them). The best configuration is then fine-tuned again with fresh seeds and stored in the
teacher cache like any teacher; ``TEACHER.md`` gives the settings to use, the seeds' spread,
and the selection bias of choosing a teacher by its dev score. Pure: no Ray, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from kdray.analysis import stats
from kdray.spec import Spec

#: What a teacher search may vary: the fine-tuning settings and the tokens per example.
SEARCHABLE = (
    "teacher.lr",
    "teacher.epochs",
    "teacher.warmup",
    "teacher.batch_size",
    "teacher.weight_decay",
    "teacher.max_grad_norm",
    "teacher.seed",
    "teacher.layer_decay",
    "teacher.pooling",
    "data.max_seq_length",
)
#: The seeds the best configuration is fine-tuned again with (its own search seed aside).
CONFIRM_SEEDS = (1, 2, 3)
TEACHER_REPORT = "TEACHER.md"
SEARCH_FILE = "trials.parquet"
CONFIRM_FILE = "confirm.parquet"


def search_problems(spec: Spec) -> list[str]:
    """Why ``spec`` cannot run a teacher search (empty when it can): no search block, or a
    searched key that is not a teacher fine-tuning setting."""
    if not spec.search:
        return ["no search block: give the teacher settings to search, e.g. teacher.lr"]
    others = sorted(set(spec.search) - set(SEARCHABLE))
    if others:
        return [
            f"search: {', '.join(others)} cannot be searched for the teacher; a teacher search "
            f"varies {', '.join(SEARCHABLE)} (search the student with kdray sweep)"
        ]
    return []


def searches_teacher(spec: Spec) -> bool:
    """Whether ``spec``'s search block can only be a teacher search's: it varies a teacher
    setting and nothing a teacher search cannot vary (a sweep of it would be refused, since a
    sweep trains its teacher once)."""
    return not search_problems(spec) and any(key.startswith("teacher.") for key in spec.search)


def max_epochs(spec: Spec) -> int:
    """The most epochs a teacher trial can run (ASHA's horizon)."""
    searched = spec.search.get("teacher.epochs")
    return int(max(searched.values)) if searched is not None else spec.teacher.epochs


def finished(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials that ran to their end or that ASHA stopped: the ones a search's best is
    chosen from (an error or an interrupted trial has no comparable score)."""
    return trials[trials["status"].isin(["ok", "pruned"])]


def best_settings(trials: pd.DataFrame, metric: str) -> dict[str, Any]:
    """The searched values of the trial with the best dev ``metric`` (at its best epoch; a
    trial ASHA stopped early counts with the epochs it ran); of tied trials, the first by id."""
    column = f"best.dev.{metric}"
    ok = finished(trials).dropna(subset=[column])
    if ok.empty:
        raise ValueError(f"no teacher trial finished with a {column} value: nothing to confirm")
    best = ok.sort_values([column, "trial_id"], ascending=[False, True]).iloc[0]
    return {
        key[len("param.") :]: _plain(best[key]) for key in best.index if key.startswith("param.")
    }


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def confirm_specs(spec: Spec, settings: dict[str, Any], seeds: Sequence[int]) -> list[Spec]:
    """The best configuration with each confirmation seed (``teacher.seed``)."""
    fixed = {k: v for k, v in settings.items() if k != "teacher.seed"}
    return [spec.with_values({**fixed, "teacher.seed": seed}) for seed in seeds]


def keyed_settings(spec: Spec, settings: dict[str, Any]) -> dict[str, Any]:
    """Every searchable setting of ``spec`` with ``settings`` applied: the ones (besides model,
    task, data and precision) that key a cached teacher. ``TEACHER.md`` gives all of them, not
    only the searched ones: a user's own spec may differ in a setting the search held fixed,
    and would then fine-tune another teacher instead of finding this one."""
    flat = spec.with_values(settings).flat()
    return {key: flat[key] for key in SEARCHABLE}


def _yaml_scalar(value: Any) -> str:
    """A ``--set`` value as YAML reads it back (``None`` is ``null``)."""
    return "null" if value is None else str(value)


def spread(confirm: pd.DataFrame, metric: str) -> dict[str, float]:
    """Mean, sd and 95 % t-interval of the confirmed teachers' dev ``metric`` over seeds."""
    values = confirm[f"dev.{metric}"].to_numpy(dtype=float)
    low, high = stats.t_interval(values, 0.95) if len(values) > 1 else (np.nan, np.nan)
    sd = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "sd": sd, "low": float(low), "high": float(high)}


def _tie(ok: pd.DataFrame, column: str) -> list[str]:
    """A line naming the trials that share the best score, if more than one does: which of
    them is confirmed is then an arbitrary pick, and the reader should know."""
    tied = sorted(ok.loc[ok[column] == ok[column].max(), "trial_id"])
    if len(tied) < 2:
        return []
    return [
        f"- {len(tied)} trials tie at the best score ({', '.join(f'`{t}`' for t in tied)}): the "
        f"first by id is confirmed; one seed each does not say which configuration is better"
    ]


def teacher_markdown(spec: Spec, trials: pd.DataFrame, confirm: pd.DataFrame, metric: str) -> str:
    """``TEACHER.md``: what was searched, the best configuration (:func:`best_settings` of
    ``trials``, the one ``confirm`` holds the seeds of), its seeds, how to use it."""
    column = f"best.dev.{metric}"
    ok = finished(trials)
    settings = best_settings(trials, metric)
    found = spread(confirm, metric)
    chosen = confirm.sort_values([f"dev.{metric}", "seed"], ascending=[False, True]).iloc[0]
    sets = " ".join(
        f"--set {k}={_yaml_scalar(v)}"
        for k, v in keyed_settings(spec, {**settings, "teacher.seed": int(chosen.seed)}).items()
    )
    lines = [
        f"# Teacher search: {spec.name}",
        "",
        f"- teacher: `{spec.teacher.model}` on {spec.task}; searched: "
        + ", ".join(f"`{k}`" for k in spec.search),
        f"- trials: {len(trials)} ({len(ok)} ran to their end or were stopped early by ASHA); "
        f"best dev {metric} in the search {ok[column].max():.4f}",
        "- best configuration: "
        + ", ".join(f"`{k}={v}`" for k, v in settings.items() if k != "teacher.seed"),
        *_tie(ok, column),
        f"- the same configuration with seeds {', '.join(str(s) for s in confirm['seed'])}: dev "
        f"{metric} {found['mean']:.4f} mean, sd {found['sd']:.4f}, 95 % interval "
        f"[{found['low']:.4f}, {found['high']:.4f}]",
        f"- chosen teacher: seed {chosen.seed}, dev {metric} {chosen[f'dev.{metric}']:.4f}, id "
        f"`{chosen.teacher_id}` (in the teacher cache: `{chosen.path}`)",
        "",
        "Use it: `kdray sweep SPEC " + sets + "` (every setting the teacher cache is keyed by "
        "besides the model, task, data and fine-tuning precision: a spec that shares those "
        "finds the cached teacher with these options).",
        "",
        "**Selection bias.** The configuration and the seed were chosen by their dev score, the "
        "same dev set the students are evaluated on: the chosen teacher's dev score is "
        "optimistic (the search's best trial more so than the seeds' mean). The seeds' mean "
        "and interval are the fairer estimate of what this configuration gives; a student "
        "compared with its teacher inherits the bias.",
    ]
    return "\n".join(lines) + "\n"
