"""The Parquet tables every run, sweep and ablation writes, and how to read them back.

``trials.parquet``: one row per run (trial): identity, status, the resolved settings as flat
dotted columns, best and final dev metrics, timing, teacher and model sizes.
``epochs.parquet``: one row per run and epoch: stage, every loss term, dev metrics, lr, speed.

Files are replaced atomically (written beside, then renamed), so a reader never sees a
half-written table, and the column set and types are fixed by the first write of a table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kdray import __version__
from kdray.infra import remote, store
from kdray.infra.store import atomic_file, json_cell, write_text_atomic
from kdray.spec import Spec

if TYPE_CHECKING:
    from kdray.training.teacher import TeacherInfo

logger = logging.getLogger("kdray")

TRIALS_FILE = "trials.parquet"
UNFINISHED = frozenset({"running", "pending", "interrupted"})  # a trial cut off, not ended
STUDENTS_DIR = "students"  # sweeps and ablations: students/<trial_id>/, each trial's best
EXPERIMENT_FILE = "experiment.json"  # what produced the folder: command and the full spec
EPOCHS_FILE = "epochs.parquet"
CKA_FILE = "cka.parquet"  # one row per run and (student layer, teacher layer): linear CKA
STUDENT_DIR = "student"  # a kdray run's best student (train.save_student)
RAY_DIR = "ray"  # a local Ray Tune storage: <out>/ray/<experiment> (see ray_store)

# Columns every trials table starts with, in this order; settings and metrics follow.
ID_COLUMNS = ("name", "trial_id", "status", "error", "kdray_version", "spec_fingerprint")


@dataclass
class RunResult:
    """Everything one run produced; :func:`trial_row` and :func:`epoch_rows` turn it into rows."""

    status: str  # ok | diverged | failed | oom (sweeps add pruned, error, interrupted, pending)
    metric: str  # the selection metric (a dev metric name)
    best_metrics: dict[str, float] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)
    best_epoch: int | None = None
    epochs_run: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    wall_time: float = 0.0
    examples_per_s: float = 0.0
    teacher: TeacherInfo | None = None
    student_params: int = 0
    teacher_params: int = 0
    student_path: str | None = None
    error: str | None = None
    precision: str | None = None  # what ran (train.precision is what was asked)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    cka: Any = None  # long DataFrame: student_layer, teacher_layer, cka (best student, dev set)

    @classmethod
    def from_records(
        cls, records: list[dict[str, Any]], *, status: str, metric: str, **fields: Any
    ) -> RunResult:
        """A run's summary from its epoch records: the one place that derives best and final
        metrics, speed, sizes and diagnostics (a run and a sweep's table writer both use it).

        Every record carries the best so far (``best.dev.*``, ``best_epoch``), the run's sizes,
        and the last one the diagnostics (``diag.*``) when they were measured.
        """
        last = records[-1] if records else {}
        seconds = sum(float(r.get("train_seconds", 0.0)) for r in records)
        examples = sum(int(r.get("train_examples", 0)) for r in records)
        matrix = last.get("diag.cka_matrix")
        result = cls(
            status=status,
            metric=metric,
            best_metrics=_prefixed(last, "best.dev."),
            final_metrics=_prefixed(last, "dev."),
            best_epoch=_int_or_none(last.get("best_epoch")),
            epochs_run=len(records),
            records=records,
            examples_per_s=examples / seconds if seconds > 0 else 0.0,
            student_params=int(last.get("student_params") or 0),
            teacher_params=int(last.get("teacher_params") or 0),
            precision=last.get("precision"),
            diagnostics={k: v for k, v in _prefixed(last, "diag.").items() if k != "cka_matrix"},
            cka=cka_from_matrix(matrix) if isinstance(matrix, str) else None,
        )
        for name, value in fields.items():
            setattr(result, name, value)
        return result


def all_ended(trials: pd.DataFrame, planned: int) -> bool:
    """Whether an experiment ended (was not cut off): each of its ``planned`` trials (at least
    one) has a row and none is unfinished."""
    if len(trials) < max(planned, 1):
        return False
    return "status" not in trials or not trials["status"].isin(UNFINISHED).any()


FINISHED_OK = frozenset({"ok", "pruned"})  # trials that ended as planned (pruned by design)
EXIT_INTERRUPTED, EXIT_ALL_FAILED = 130, 1


def exit_summary(trials: pd.DataFrame, planned: int = 0) -> tuple[int, str]:
    """``(exit code, one line)`` for a sweep's or ablation's trials: 130 when some were cut off
    (Ctrl-C: resumable), 1 when none finished (every trial errored, failed or diverged), else
    0; the line counts the trials by status, e.g. ``2 ok, 1 pruned, 1 interrupted``."""
    statuses = trials["status"] if "status" in trials else pd.Series([], dtype=object)
    counts = statuses.value_counts()
    missing = max(planned - len(trials), 0)
    parts = [f"{int(n)} {status}" for status, n in counts.items()]
    if missing:
        parts.append(f"{missing} not started")
    line = ", ".join(parts) or "no trials"
    if missing or statuses.isin(UNFINISHED).any():
        return EXIT_INTERRUPTED, f"interrupted: {line}"
    if not statuses.isin(FINISHED_OK).any():
        return EXIT_ALL_FAILED, f"no trial finished: {line}"
    return 0, line


def _prefixed(record: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k.removeprefix(prefix): v for k, v in record.items() if k.startswith(prefix)}


def is_missing(value: Any) -> bool:
    """Whether a table cell holds no value (None, NaN, pd.NA, NaT). A list, tuple, dict or
    array (a layer map, a JSON cell) is a value, even an empty one."""
    if isinstance(value, (list, tuple, dict, np.ndarray)):
        return False
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _int_or_none(value: Any) -> int | None:
    return None if is_missing(value) else int(value)


def trial_row(
    spec: Spec, result: RunResult, *, trial_id: str = "run", extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One trials-table row: who, what settings, what came out."""
    row: dict[str, Any] = {
        "name": spec.name,
        "trial_id": trial_id,
        "status": result.status,
        "error": result.error,
        "kdray_version": __version__,
        "spec_fingerprint": spec.fingerprint(),
    }
    for key, value in spec.flat().items():
        if key != "name":
            row[key] = json_cell(value)
    row["metric"] = result.metric
    row["mode"] = spec.tune.mode
    for prefix, metrics in (("best", result.best_metrics), ("final", result.final_metrics)):
        for name, value in metrics.items():
            row[f"{prefix}.dev.{name}"] = float(value)
    row.update(
        {
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "wall_time": result.wall_time,
            "examples_per_s": result.examples_per_s,
            "student_params": result.student_params,
            "teacher_params": result.teacher_params,
            "student_path": result.student_path,
            "precision": result.precision,
        }
    )
    if result.teacher is not None:
        row["teacher.id"] = result.teacher.id
        for name, value in result.teacher.dev_metrics.items():
            row[f"teacher.dev.{name}"] = float(value)
    for key, value in (result.diagnostics or {}).items():
        row[f"diag.{key}"] = json_cell(value)
    row.update({k: json_cell(v) for k, v in (extra or {}).items()})
    return row


def epoch_rows(
    spec: Spec, records: Iterable[dict[str, Any]], *, trial_id: str = "run"
) -> list[dict[str, Any]]:
    return [{"name": spec.name, "trial_id": trial_id, **epoch_fields(record)} for record in records]


# Keys an epoch record carries that describe the run, not the epoch: they go to the trials
# (and cka) tables instead of epochs.parquet.
RUN_FIELDS = ("student_params", "teacher_params", "precision")


def is_epoch_field(key: str) -> bool:
    return key not in RUN_FIELDS and not key.startswith("diag.")


def epoch_fields(record: dict[str, Any]) -> dict[str, Any]:
    """An epoch record with the run-level fields (sizes, diagnostics) left out."""
    return {k: v for k, v in record.items() if is_epoch_field(k)}


def cka_from_matrix(matrix_json: str) -> pd.DataFrame:
    """The long CKA table from the JSON matrix a trial reports (rows: student layers)."""
    matrix = json.loads(matrix_json)
    return pd.DataFrame(
        [
            {"student_layer": i, "teacher_layer": j, "cka": value}
            for i, row in enumerate(matrix, start=1)
            for j, value in enumerate(row, start=1)
        ]
    )


def _write_atomic(table: pa.Table, path: Path) -> None:
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def write_table(
    rows: list[dict[str, Any]], path: str | Path, *, replace: bool = False
) -> pd.DataFrame:
    """Write rows as a Parquet table, keeping the schema a table at ``path`` already has
    (``replace``: ignore it, a new table).

    New rows may leave columns out (they become null); a column the existing schema does not
    have is added at the end, so a sweep's first trial fixes the order and types (a value
    that type cannot hold, 2.5 in an int column, widens the column instead of being cut).
    """
    path = Path(path)
    frame = pd.DataFrame(rows)
    if path.exists() and not replace:
        schema = pq.read_schema(path)
        known = [n for n in schema.names]
        extra = [c for c in frame.columns if c not in known]
        frame = frame.reindex(columns=known + extra)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        fields = [schema.field(n) for n in known] + [table.schema.field(n) for n in extra]
        target = pa.schema(fields)
        table = _cast(table, target)
    else:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    _write_atomic(table, path)
    return frame


def _cast(table: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = []
    for target in schema:
        column = table.column(target.name)
        if column.type != target.type and not pa.types.is_null(target.type):
            try:
                column = column.cast(target.type)  # safe: raises rather than truncate
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass  # values the first type cannot hold (2.5 in an int column): keep them
        columns.append(column)
    return pa.Table.from_arrays(
        columns,
        schema=pa.schema([pa.field(f.name, c.type) for f, c in zip(schema, columns, strict=True)]),
    )


def write_run(out_dir: str | Path, spec: Spec, result: RunResult) -> tuple[Path, Path]:
    """A single ``kdray run``: a one-row trials table and its epochs table, each replaced
    atomically (an interrupt leaves the old table or the new one, never none)."""
    out = Path(out_dir)
    trials = out / TRIALS_FILE
    epochs = out / EPOCHS_FILE
    write_table([trial_row(spec, result)], trials, replace=True)
    rows = epoch_rows(spec, result.records)
    if rows:
        write_table(rows, epochs, replace=True)
    else:  # a run that ended before its first epoch: an empty table, still readable
        _write_atomic(
            pa.table({"name": pa.array([], pa.string()), "epoch": pa.array([], pa.int64())}), epochs
        )
    cka_file = out / CKA_FILE
    if result.cka is not None:
        write_table(cka_rows(spec.name, "run", result.cka), cka_file, replace=True)
    elif cka_file.exists():
        cka_file.unlink()
    student = out / STUDENT_DIR
    if result.student_path is None and student.is_dir():
        # an earlier run's student must not pass for this run's (kdray export reads it)
        shutil.rmtree(student)
    return trials, epochs


def write_experiment(
    out_dir: str | Path, spec: Spec, command: str, lengths: Iterable[Any] = ()
) -> Path:
    """``experiment.json``: which command wrote the folder and the full spec it ran (the report
    reads the ablation baseline and the metric's direction from it), and ``lengths``: each split's
    token lengths and what ``data.max_seq_length`` cut (``kdray.training.data.LengthStats``)."""
    record = {
        "command": command,
        "folder": _made_at(Path(out_dir)),
        "name": spec.name,
        "spec_fingerprint": spec.fingerprint(),
        "kdray_version": __version__,
        "spec": spec.model_dump(mode="json", by_alias=True),
    }
    if lengths:
        record["lengths"] = [dataclasses.asdict(stats) for stats in lengths]
    return write_text_atomic(
        Path(out_dir) / EXPERIMENT_FILE, json.dumps(record, indent=2, sort_keys=True)
    )


def _recorded_folder(folder: Path) -> str | None:
    stored = _read_record(folder / EXPERIMENT_FILE)
    made_at = stored.get("folder") if stored else None
    return made_at if isinstance(made_at, str) else None


def _leads_to(path: str, folder: Path) -> bool:
    try:
        return Path(path).samefile(folder)
    except OSError:  # the path is gone
        return False


def _made_at(folder: Path) -> str:
    """Where the experiment in ``folder`` was first written, kept while that path still leads
    here (a ``--resume``): Ray Tune's saved state holds it, so a resume checks it."""
    made_at = _recorded_folder(folder)
    return made_at if made_at and _leads_to(made_at, folder) else str(folder.resolve())


def moved_from(folder: str | Path) -> str | None:
    """The path ``folder``'s experiment was made at, when the folder holds Ray Tune state to
    restore (``ray/``) and that path no longer leads here (the folder was moved or copied);
    else None. Tables alone (a folder copied without ``ray/``, one written before kdray kept
    the path) resume anywhere."""
    folder = Path(folder)
    made_at = _recorded_folder(folder)
    if made_at is None or not (folder / RAY_DIR).is_dir() or _leads_to(made_at, folder):
        return None
    return made_at


def cka_rows(name: str, trial_id: str, cka: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"name": name, "trial_id": trial_id, **row} for row in cka.to_dict("records")]


def load_tables(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The rows of a folder's trials, epochs and cka tables (empty lists where one is missing),
    for a writer that continues them."""
    folder = Path(folder)
    files = {"trials": TRIALS_FILE, "epochs": EPOCHS_FILE, "cka": CKA_FILE}
    return {
        name: pd.read_parquet(folder / file).to_dict("records") if (folder / file).exists() else []
        for name, file in files.items()
    }


def keep_ended(folder: str | Path) -> pd.DataFrame:
    """Drop the rows of every trial that did not end (cut off, or epochs without a trials row)
    from a folder's tables, rewritten in place, and return the ended trials: what an
    experiment of explicit trials keeps when its Ray Tune state is gone and the others run
    again from their first epoch."""
    folder = Path(folder)
    tables = load_tables(folder)
    ended = [row for row in tables["trials"] if row.get("status") not in UNFINISHED]
    ids = {row["trial_id"] for row in ended}
    for name, file in (("cka", CKA_FILE), ("epochs", EPOCHS_FILE), ("trials", TRIALS_FILE)):
        kept = [row for row in tables[name] if row.get("trial_id") in ids]
        if kept and len(kept) < len(tables[name]):  # the trials table last, as writers do
            write_table(kept, folder / file)
        elif not kept and tables[name]:
            (folder / file).unlink()
    return pd.DataFrame(ended)


class Results(NamedTuple):
    """A results folder's tables (``trials, epochs = kdray.load(folder)`` unpacks them).

    ``trials``: one row per run (trial, ablation cell x seed, confirmed configuration x seed):
    ``trial_id``, ``status``, every run setting as a dotted column (``distill.algorithm``,
    ``train.lr``, ...), ``param.<key>`` for searched ones, ``best.dev.<metric>``,
    ``best_epoch``, ``teacher.dev.<metric>``, ``cell``/``seed`` in ablations. ``epochs``: one
    row per trial and epoch: ``trial_id``, ``epoch``, ``stage``, ``loss.<term>``,
    ``dev.<metric>``, ``lr``, ``examples_per_s``. README "Results tables" lists every column.
    """

    trials: pd.DataFrame
    epochs: pd.DataFrame


def load(path: str | Path) -> Results:
    """The tables of a results folder (or of the folder holding a file, or of a folder that
    ``--storage`` copied to a URI); a path that does not exist is an error, not a lookup in its
    parent folder."""
    path = remote.local_results(path)
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    folder = path if path.is_dir() else path.parent
    trials_file, epochs_file = folder / TRIALS_FILE, folder / EPOCHS_FILE
    if not trials_file.exists():
        raise FileNotFoundError(f"no {TRIALS_FILE} in {folder}")
    trials = pd.read_parquet(trials_file)
    epochs = pd.read_parquet(epochs_file) if epochs_file.exists() else pd.DataFrame()
    return Results(trials, epochs)


# ---------------------------------------------------------------------------------------------
# Whose folder is it: experiment.json decides before anything is written

RESUMABLE = ("sweep", "ablate", "confirm", "teacher")  # commands that continue an experiment
_KIND = {
    "run": "run",
    "sweep": "sweep",
    "ablate": "ablation",
    "confirm": "confirmation",
    "teacher": "teacher search",
}


def experiment_name(spec: Spec, command: str) -> str:
    """The experiment's name: the spec's, with ``-ablation`` for ``kdray ablate``,
    ``-confirm`` for ``kdray confirm`` and ``-teacher`` for ``kdray teacher --search``."""
    suffix = {"ablate": "-ablation", "confirm": "-confirm", "teacher": "-teacher"}.get(command, "")
    return f"{spec.name}{suffix}"


def ray_store(out: Path, storage: str | None) -> str:
    """Where a results folder's Ray Tune experiments live: ``--storage`` (a path or a remote URI)
    if given, else ``<out>/ray``; one rule for running, resuming and checking them."""
    return storage or str((out / RAY_DIR).resolve())


def experiment_path(out: Path, storage: str | None, name: str) -> str:
    """The Ray Tune experiment ``name`` of the results folder ``out`` (see :func:`ray_store`)."""
    return remote.join(ray_store(out, storage), name)


def claimed_before_trials(out: str | Path, spec: Spec, command: str) -> bool:
    """Whether ``out`` holds this experiment's record but no trials: a run killed after it
    claimed the folder and before Ray Tune saved anything (while the teacher trained). A
    ``--resume`` then starts the trials rather than refusing."""
    folder = Path(out)
    record = folder / EXPERIMENT_FILE
    if not record.is_file() or (folder / TRIALS_FILE).exists():
        return False
    stored = _read_record(record)
    return stored is not None and not _spec_differences(stored, spec, command)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _as_current(stored_spec: dict[str, Any]) -> dict[str, Any]:
    """A recorded spec as this kdray writes it: settings added since (with their defaults, e.g.
    ``ablation.seeds.spending``) filled in, so an older folder is still the same experiment."""
    try:
        current = Spec.model_validate(stored_spec).model_dump(mode="json", by_alias=True)
    except ValueError:
        return stored_spec
    return json.loads(json.dumps(current))


def _spec_differences(stored: dict[str, Any], spec: Spec, command: str) -> list[str]:
    """How the experiment recorded in ``stored`` differs from ``command`` on ``spec``: the
    command, the run settings (fingerprint) and the block that defines the trials."""
    found = []
    if stored.get("command") != command:
        found.append(f"written by kdray {stored.get('command')}, this is kdray {command}")
    if stored.get("spec_fingerprint") != spec.fingerprint():
        found.append(
            f"spec fingerprint {stored.get('spec_fingerprint')} there, {spec.fingerprint()} here "
            "(different run settings)"
        )
    mine = json.loads(json.dumps(spec.model_dump(mode="json", by_alias=True)))
    theirs = _as_current(stored.get("spec") if isinstance(stored.get("spec"), dict) else {})
    block = {"sweep": "search", "ablate": "ablation"}.get(command)
    if block and stored.get("command") == command and theirs.get(block) != mine.get(block):
        found.append(f"a different {block} block")
    return found


def _aside_name(folder: Path) -> str:
    return f"{folder}.old-<UTC time>"


def folder_conflict(
    out_dir: str | Path, spec: Spec, command: str, *, resume: bool = False
) -> str | None:
    """Why ``kdray <command>`` on ``spec`` must not write into ``out_dir`` (with the ways out),
    or None when it may: a folder holds one experiment, so tables of two never mix."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        return f"results folder {folder} is a file, not a folder: give another --out DIR"
    record_file, trials_file = folder / EXPERIMENT_FILE, folder / TRIALS_FILE
    can_resume = command in RESUMABLE
    if record_file.exists():
        stored = _read_record(record_file)
        if stored is None:
            what = f"{record_file} is not a readable experiment record"
            can_resume = False
        elif differences := _spec_differences(stored, spec, command):
            kind = _KIND.get(str(stored.get("command")), str(stored.get("command")))
            what = (
                f"{folder} holds the {kind} {stored.get('name')!r} ({EXPERIMENT_FILE}), not this "
                f"{_KIND[command]}: " + "; ".join(differences)
            )
            can_resume = False
        elif can_resume and not resume and trials_file.exists():
            what = f"{folder} already holds trials of this {_KIND[command]} (same spec)"
        elif resume and (made_at := moved_from(folder)):
            return _moved_message(folder, made_at, command)
        else:
            return None
    elif trials_file.exists() and not resume:
        what = (
            f"{folder} holds a {TRIALS_FILE} but no {EXPERIMENT_FILE} (an older kdray wrote "
            "it, or a person), so kdray cannot tell whose experiment it is"
        )
    else:
        return None
    return what + ". " + _ways_out(folder, command, can_resume=can_resume, resume=resume)


def _moved_message(folder: Path, made_at: str, command: str) -> str:
    here = folder.resolve()
    return (
        f"cannot resume {folder}: its experiment was made at {made_at} ({EXPERIMENT_FILE}) and "
        f"that path no longer leads here. Ray Tune's saved state (tuner.pkl, the searcher's "
        f"Optuna journal path, kdray's table writers) holds {made_at}, so a resumed run would "
        f"read and write there. Ways out: move the folder back to {made_at}, or link that path "
        f"to it (ln -s {here} {made_at}) and resume again; or start a new {_KIND[command]} here "
        f"with --overwrite (moves this folder aside; its tables stay readable)"
    )


def _ways_out(folder: Path, command: str, *, can_resume: bool, resume: bool) -> str:
    ways = ["write elsewhere with --out DIR"]
    if can_resume:
        search = " --search" if command == "teacher" else ""  # a teacher search's own flag
        ways.append(f"continue it with --resume (kdray {command} SPEC{search} --resume)")
    aside = _aside_name(folder)
    ways.append(f"start over with --overwrite (moves the old folder aside to {aside})")
    text = "Ways out: " + ", ".join(ways[:-1]) + " or " + ways[-1]
    if resume and not can_resume:
        text += "; --resume continues only the same experiment"
    elif command not in RESUMABLE:
        text += "; --resume is for sweeps and ablations only"
    return text + "."


def move_aside(folder: str | Path) -> Path:
    """Rename ``folder`` to ``<folder>.old-<UTC timestamp>`` (never over an existing one)."""
    folder = Path(folder)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = folder.with_name(f"{folder.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.old-{stamp}-{n}")
    folder.rename(target)
    logger.warning("--overwrite: moved the old results folder %s aside to %s", folder, target)
    return target


def claim_folder(
    out_dir: str | Path,
    spec: Spec,
    command: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    """Make ``out_dir`` this experiment's before any compute: refuse a folder that holds another
    experiment (see :func:`folder_conflict`); ``overwrite`` moves a results folder aside."""
    folder = Path(out_dir)
    store.remove_stale_tree(folder)  # what killed writers left
    if resume and overwrite:
        raise ValueError(
            f"give --resume or --overwrite, not both: --resume continues the experiment in "
            f"{folder}, --overwrite moves it aside and starts a new one"
        )
    if overwrite and folder.is_dir():
        if (folder / EXPERIMENT_FILE).exists() or (folder / TRIALS_FILE).exists():
            if folder.resolve() == Path.cwd().resolve():
                raise ValueError(f"--overwrite cannot move the working folder {folder} aside")
            move_aside(folder)
        return
    problem = folder_conflict(folder, spec, command, resume=resume)
    if problem:
        raise ValueError(problem)


def config_key(row: dict[str, Any]) -> str:
    """A trial's configuration: its searched values (``param.*``) but the seed, as JSON."""
    values = {
        k: json_cell(v) for k, v in sorted(row.items())
        if k.startswith("param.") and k != "param.train.seed"
    }  # fmt: skip
    return json.dumps(values)


def seed_means(trials: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per configuration (:func:`config_key`) of the ok trials: seeds, mean, sd, min, max of
    ``column``: what a seed-averaged sweep's searcher saw, and how far its seeds spread."""
    ok = trials[trials["status"] == "ok"] if "status" in trials else trials
    keys = [config_key(row) for row in ok.to_dict("records")]
    values = pd.to_numeric(ok[column], errors="coerce")
    grouped = values.groupby(pd.Series(keys, index=ok.index), sort=False)
    table = grouped.agg(seeds="count", mean="mean", sd="std", min="min", max="max")
    return table.rename_axis("config").reset_index()
