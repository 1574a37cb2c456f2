"""Sweeps and ablations on Ray Tune: the only kdray module that imports Ray.

Every trial is one :func:`kdray.training.distill.distill` run (:func:`distill_trainable`). Before
the trials, one Ray task fine-tunes (or finds) the teacher and copies it into the sweep's storage,
and another builds the teacher-output caches the trials will read. Ray Tune callbacks, module-level
classes so Ray pickles them by reference, keep the Parquet tables (:class:`TableWriter`) and the
live trials table (:class:`LiveTrials`) up to date; Ray Tune's own logger callbacks write each
trial's curves for TensorBoard, CSV/JSON, MLflow or W&B (``tune.loggers``); the Optuna study lives
in a journal file or database so a resumed sweep's sampler keeps its history; ``Tuner.restore``
resumes an interrupted experiment. What runs (search space, ablation cells, best trial) is decided
in :mod:`kdray.experiments.plan`.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune import Callback

import kdray
from kdray.analysis import pareto, results
from kdray.analysis.results import Results
from kdray.experiments import check, plan
from kdray.experiments.plan import OBJECTIVE, RUNG_TIME
from kdray.infra import faults, remote
from kdray.infra.progress import TrialsTable
from kdray.infra.store import atomic_dir, json_cell, write_text_atomic
from kdray.spec import TPE_STARTUP, Spec, SpecLike, as_spec
from kdray.training import data, footprint
from kdray.training.distill import STUDENT_DIR, distill, selection_metric

logger = logging.getLogger("kdray")

#: The Optuna study's journal file in a sweep's results folder (``tune.searcher.optuna.storage``
#: unset); ``optuna-dashboard <folder>/optuna.journal`` shows it.
OPTUNA_JOURNAL = "optuna.journal"
#: Ray's logger callbacks draw a result's ``timesteps_total``, when given, as its step: the
#: trainable reports the epoch there, so curves are per epoch, also after a restore.
TB_STEP = "timesteps_total"

# Ray on one machine: bind to loopback, no usage stats, no dashboard probing the network.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


class _IOFailures(logging.Filter):
    """Ray Tune logs an exception a callback raised, with its traceback, and goes on: an I/O
    failure there (a table write on a full disk) is kept instead, for :func:`run_experiment`
    to end the command with it in one paragraph once Tune has stopped."""

    seen: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None or faults.io_failure(error) is None:
            return True
        self.seen.append(error)
        return False


def _keep_io_failures() -> None:
    for handler in logging.getLogger("ray").handlers:
        if not any(isinstance(f, _IOFailures) for f in handler.filters):
            handler.addFilter(_IOFailures())


#: Ray Client's proxy starts a server per connecting client; on a loaded head that start can
#: fail now and then ("Starting Ray client server failed", or the proxy's own check of the new
#: process failing while it is a zombie: ray-project/ray#63202), a known Ray Client flake:
#: kdray tries again this many times, a few seconds apart, before it gives up.
CLIENT_RETRIES = 2
CLIENT_RETRY_SECONDS = 3.0


def _client_server_failed(error: ConnectionError) -> bool:
    """Did Ray Client's proxy fail to start this client's server (worth another try), rather
    than refuse the connection for a reason that would hold again?"""
    text = str(error)
    return "Ray client server failed" in text or (
        "Initialization failure from server" in text and "start_specific_server" in text
    )


def _join(address: str, runtime_env: dict[str, Any] | None) -> None:
    """Join the cluster at ``address``; a Ray Client server that fails to start is tried
    again (:data:`CLIENT_RETRIES`), any other failure ends the join at once."""
    for attempt in range(CLIENT_RETRIES + 1):
        try:
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
            return
        except ConnectionError as error:
            transient = address.startswith("ray://") and _client_server_failed(error)
            if not transient or attempt == CLIENT_RETRIES:
                raise
            ray.shutdown()  # the half-made client connection, before a new one
            logger.warning(
                "Ray Client at %s could not start this client's server (%s); trying again",
                address,
                str(error).strip().splitlines()[-1],
            )
            time.sleep(CLIENT_RETRY_SECONDS * (attempt + 1))


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> bool:
    """Connect to Ray: an existing cluster when ``address`` is given (with the spec's
    ``tune.runtime_env``), else an embedded local instance bound to 127.0.0.1 with no
    dashboard. Returns True when kdray started Ray."""
    if ray.is_initialized():
        return False
    if address:
        env = dict(runtime_env or {})
        # a fault-injection plan (tests) reaches the cluster's workers with the job
        plan = os.environ.get(faults.PLAN_VAR)
        if plan:
            env["env_vars"] = {**env.get("env_vars", {}), faults.PLAN_VAR: plan}
        _join(address, env or None)
        return False
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(
        address="local",  # a new instance, never whatever cluster happens to run here
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    return True


# ---------------------------------------------------------------------------------------------
# Searchers and schedulers


def ray_space(spec: Spec) -> dict[str, Any]:
    """The search space for Ray's own variant generator (searcher: grid): grid/choice keys are
    crossed as a grid, ranges sampled; conditions are applied when the trial starts."""
    space: dict[str, Any] = {}
    for key, dist in spec.search.items():
        values = dist.values
        if dist.kind in ("choice", "grid"):
            space[key] = tune.grid_search([json_cell(v) for v in values])
        elif dist.kind == "uniform":
            space[key] = tune.uniform(*values)
        elif dist.kind == "loguniform":
            space[key] = tune.loguniform(*values)
        else:
            space[key] = tune.randint(values[0], values[1] + 1)
    return space


def optuna_storage(spec: Spec, out: Path, fresh: bool = False) -> Any:
    """Where the sweep's Optuna study lives: ``tune.searcher.optuna.storage`` as a database URL
    (Optuna's RDBStorage) or a journal file path, default ``<out>/optuna.journal``. ``fresh``:
    a new sweep does not inherit a default journal an earlier attempt left in its folder."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    opts = spec.tune.searcher.optuna
    given = opts.storage if opts is not None else None
    if given and "://" in given:
        return optuna.storages.RDBStorage(given)
    path = (Path(given) if given else out / OPTUNA_JOURNAL).resolve()
    if fresh and not given:
        path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def make_searcher(
    spec: Spec,
    metric: str = OBJECTIVE,
    *,
    storage: Any = None,
    study_name: str | None = None,
    told: list[Any] | None = None,
) -> Any:
    """Optuna (TPE, random, CMA-ES, QMC) over the define-by-run space, or None for grid. With
    ``storage`` the study is kept there (loaded if it exists) rather than only in Ray's pickled
    searcher state, which a restore has lost before (ray-project/ray#30861). ``told``: trials that
    ran before (:func:`kdray.experiments.plan.told_trials`), given to the study in ``storage``."""
    if spec.tune.searcher.kind == "grid":
        return None
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    opts = spec.tune.searcher.optuna
    seed = opts.seed if opts is not None else None
    kind = opts.sampler if opts is not None else "random"
    if spec.tune.searcher.kind == "random":
        kind = "random"
    startup = opts.startup_trials() if opts is not None else None  # None: not TPE
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=TPE_STARTUP if startup is None else startup
        ),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
    }
    points = [
        {k: json_cell(v) for k, v in point.items() if k in spec.search}
        for point in spec.tune.points_to_evaluate
    ]
    metrics, modes = objective_keys(spec, metric)
    sampler = samplers[kind]()
    if told:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name or spec.name,
            directions=["minimize" if mode == "min" else "maximize" for mode in modes],
            load_if_exists=True,
        )
        plan.continue_study(study, sampler, plan.OptunaSpace(spec), told)
    searcher = OptunaSearch(
        space=plan.OptunaSpace(spec),
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        sampler=sampler,
        points_to_evaluate=points or None,
        storage=storage,
        study_name=study_name or spec.name,
    )
    if spec.tune.seeds_per_trial > 1:  # the searcher sees each configuration's seed mean
        from ray.tune.search import Repeater

        searcher = Repeater(searcher, repeat=spec.tune.seeds_per_trial, set_index=True)
    return ConcurrencyLimiter(searcher, max_concurrent=spec.tune.max_concurrent)


def objective_keys(spec: Spec, metric: str = OBJECTIVE) -> tuple[list[str], list[str]]:
    """The result keys Optuna optimises and their modes: ``metric`` (the best dev metric so
    far), then each further objective of ``tune.objectives`` (``student_params``,
    ``latency_ms`` or ``best.dev.<metric>``, as every report of a trial carries them)."""
    keys, modes = [metric], [spec.tune.mode]
    for objective in spec.tune.objectives[1:]:
        keys.append(pareto.column(objective.metric))
        modes.append(objective.mode)
    return keys, modes


def make_scheduler(
    spec: Spec,
    metric: str = OBJECTIVE,
    *,
    time_attr: str = RUNG_TIME,
    horizon: int | None = None,
    mode: str | None = None,
) -> Any:
    """ASHA on classifier epochs (:data:`~kdray.experiments.plan.RUNG_TIME`, up to the most a trial
    can run), or on ``time_attr`` up to ``horizon`` (a teacher search: teacher epochs); or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    asha = spec.tune.scheduler.asha
    if asha is None:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=time_attr,
        metric=metric,
        mode=mode or spec.tune.mode,
        max_t=max(horizon or plan.max_epochs(spec), asha.grace_period),
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
    )


# ---------------------------------------------------------------------------------------------
# The trainable


def distill_trainable(config: dict[str, Any], spec_json: dict[str, Any]) -> None:
    """One Ray Tune trial: resolve its spec, resume from a checkpoint if Ray gives one, run.

    Retry policy: settings that cannot work (an impossible layer map, a bad metric, missing
    data: a ``ValueError`` or ``FileNotFoundError`` before the first epoch) are recorded once
    as ``error``, since a retry would fail the same way; only a lost worker (killed, out of
    memory, node gone) is retried by Ray from the trial's last checkpoint.
    """
    node = ray.get_runtime_context().get_node_id()
    started = time.time()
    try:
        _run_trial(config, spec_json, node, started)
    except (ValueError, FileNotFoundError) as error:
        tune.report(_final_report("error", f"{type(error).__name__}: {error}", node, started))


def _final_report(status: str, error: str | None, node: str, started: float) -> dict[str, Any]:
    """What a trial that ends without a last epoch to report tells the table writer."""
    return {
        "status": status,
        "error": error,
        "wall_time_trial": time.time() - started,
        "node_id": node,
        "final": True,
        OBJECTIVE: math.nan,
        RUNG_TIME: 0,
    }


def _run_trial(config: dict[str, Any], spec_json: dict[str, Any], node: str, started: float):
    from kdray.training import teacher

    base = Spec.model_validate(spec_json)
    spec, _ = plan.trial_spec(base, config)
    if spec.teacher.checkpoint:
        local = teacher.fetch(spec.teacher.checkpoint, spec)
        spec = spec.with_values({"teacher.checkpoint": local})
    spec = data.localize(spec)  # data the sweep put in a remote storage, copied to this node
    metric = selection_metric(spec)
    measured = _footprint(spec)

    checkpoint = tune.get_checkpoint()
    resume_dir: str | None = None
    restored: dict[str, int] = {}  # after a restart: the last epoch the checkpoint brought back
    if checkpoint is not None:
        resume_dir = tempfile.mkdtemp(prefix="kdray-resume-")
        checkpoint.to_directory(resume_dir)

    def report(record: dict[str, Any], save: Callable[[str | Path], None] | None) -> None:
        # Each record carries the run's best so far (classifier-trained epochs only).
        metrics = {
            **record,
            TB_STEP: record["epoch"],
            RUNG_TIME: record["classifier_epochs"],
            OBJECTIVE: record.get(f"best.dev.{metric}", math.nan),
            "node_id": node,
            "status": "running",
            **measured,
        }
        if save is None:  # an epoch restored from a checkpoint, reported again for the tables
            tune.report(metrics)
            return
        if resume_dir is not None and not restored:
            # the first report with a checkpoint after a restore: the checkpoint's own epoch
            restored["resumed_from_epoch"] = record["epoch"]
        with tempfile.TemporaryDirectory(prefix="kdray-ckpt-") as folder:
            saving = time.perf_counter()
            save(folder)
            # what a resumable trial costs over a direct run, per epoch (Ray then copies it)
            metrics["checkpoint_seconds"] = time.perf_counter() - saving
            metrics.update(restored)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    result = distill(spec, report=report, resume_from=resume_dir)
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)
    if result.status != "ok" or not result.records:
        # Diverged or raised inside the loop: record it and end the trial normally (a retry
        # would fail the same way); a lost worker is retried by Ray from the checkpoint.
        tune.report({**_final_report(result.status, result.error, node, started), **measured})


def _footprint(spec: Spec) -> dict[str, float]:
    """The student's CPU latency when an objective asks for it (measured before training, on
    the trial's node and threads), else nothing."""
    if not any(o.metric == "latency_ms" for o in spec.tune.objectives):
        return {}
    teacher_path = spec.teacher.checkpoint or spec.teacher.model
    return footprint.measure(spec, teacher_path, data.task_of(spec).num_labels)


# ---------------------------------------------------------------------------------------------
# Callbacks: the tables and the live view

_RAY_KEYS = {
    "timestamp",
    "checkpoint_dir_name",
    "done",
    "training_iteration",
    "trial_id",
    "date",
    "time_this_iter_s",
    "time_total_s",
    "pid",
    "hostname",
    "node_ip",
    "config",
    "time_since_restore",
    "iterations_since_restore",
    "experiment_tag",
    "should_checkpoint",
    "status",
    OBJECTIVE,
    RUNG_TIME,
    TB_STEP,
    "node_id",
    "latency_ms",
    "resumed_from_epoch",
}


def _record_key(key: str) -> bool:
    """A key of distill's epoch record (not one Ray or the trainable added)."""
    return key not in _RAY_KEYS and not key.startswith("config")


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text()[-4000:]
    return "trial failed (no error file)"


class TableWriter(Callback):
    """Keeps trials.parquet, epochs.parquet and cka.parquet up to date as trials report and
    finish; rows are keyed by trial id (and epoch), so a resumed sweep never duplicates them."""

    def __init__(
        self,
        spec: Spec,
        out_dir: Path,
        teacher: Any,
        experiment: str = "",
        mirror: remote.Mirror | None = None,
    ) -> None:
        self.spec = spec
        self.out_dir = out_dir
        self.teacher = teacher
        self.experiment = experiment  # where Tune keeps it: its checkpoints are pruned here
        self.mirror = mirror  # with --storage: the tables and students copied there too
        self._reset()

    def _reset(self) -> None:
        self.records: dict[str, dict[int, dict[str, Any]]] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.cka: dict[str, list[dict[str, Any]]] = {}
        self.epoch_rows: dict[tuple[str, int], dict[str, Any]] = {}
        self.seen: set[str] = set()  # trials started in this run (not restored as ended)
        self._loaded = False
        self._pruned = 0.0  # when checkpoints were last pruned

    def __getstate__(self) -> dict[str, Any]:
        # Tuner.restore brings this writer back from the pickled run config: it must then
        # read the tables as they are on disk, not carry rows from when it was pickled.
        keys = ("spec", "out_dir", "teacher", "experiment", "mirror")
        return {k: self.__dict__.get(k) for k in keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # defaults: pickled by an older kdray
        self.__dict__.update({"experiment": "", "mirror": None, **state})
        self._reset()

    # Tune's hooks
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **_: Any) -> None:
        self.seen.add(trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **_: Any):
        self._load_existing()
        self.last[trial.trial_id] = {**self.last.get(trial.trial_id, {}), **result}
        if "epoch" in result and not result.get("final"):
            record = {k: v for k, v in result.items() if _record_key(k)}
            self.records.setdefault(trial.trial_id, {})[int(result["epoch"])] = record
            self.epoch_rows[(trial.trial_id, int(result["epoch"]))] = results.epoch_rows(
                self.spec, [record], trial_id=trial.trial_id
            )[0]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **_: Any) -> None:
        self._end(trial, error=None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **_: Any) -> None:
        self._end(trial, error=_error_text(trial))

    def on_step_end(self, iteration: int, trials: list, **_: Any) -> None:
        """Every 10 s: prune checkpoints no saved experiment state needs (see
        :func:`prune_checkpoints`)."""
        if not self.experiment or time.time() - self._pruned < 10:
            return
        self._pruned = time.time()
        prune_checkpoints(
            self.experiment, self.spec.tune.checkpoint_keep, not self.spec.tune.keep_checkpoints
        )

    def on_experiment_end(self, trials: list, **_: Any) -> None:
        """At the end (or on Ctrl-C): every trial gets a row, finished or not. A trial that
        started in this run and did not complete was cut off, whatever status Tune's clean-up
        gave it (it marks the trials it stops on Ctrl-C TERMINATED in memory, RUNNING in the
        state it saved); a TERMINATED one it did not start was restored as ended."""
        self._load_existing()
        for trial in trials:
            row = self.rows.get(trial.trial_id)
            if row is None or row["status"] in results.UNFINISHED:
                error = _error_text(trial) if trial.status == "ERROR" else None
                # a trial Tune restored as ended whose row a kill kept from the table
                ended = trial.status == "TERMINATED" and trial.trial_id not in self.seen
                self._set_row(trial, error, ended=ended)
        self.write()

    # rows
    def _load_existing(self) -> None:
        """Rows already written (a resumed sweep) are kept; new rows replace them by key."""
        if self._loaded:
            return
        self._loaded = True
        existing = results.load_tables(self.out_dir)
        for row in existing["trials"]:
            self.rows[row["trial_id"]] = row
        for row in existing["cka"]:
            self.cka.setdefault(row["trial_id"], []).append(row)
        for row in existing["epochs"]:
            if "epoch" in row and row.get("trial_id") is not None:
                tid, epoch = row["trial_id"], int(row["epoch"])
                self.epoch_rows[(tid, epoch)] = row
                record = {k: v for k, v in row.items() if k not in ("name", "trial_id")}
                self.records.setdefault(tid, {})[epoch] = record

    def _end(self, trial: Any, error: str | None) -> None:
        self._load_existing()
        self._set_row(trial, error, ended=True)
        pruned: list[str] = []
        if error is None:  # finished for good (an errored trial may be resumed: keep its state)
            self._keep_student(trial)
            pruned = self._prune_students()
        self.write()
        # deleted after the table stops naming them: a crash leaves no row pointing at nothing
        for path in pruned:
            shutil.rmtree(path, ignore_errors=True)

    def _prune_students(self) -> list[str]:
        """The students that ``tune.keep_students`` no longer keeps (a better trial of the same
        cell finished), for the caller to delete once the table is written; their rows keep
        every metric, with no ``student_path``."""
        policy = self.spec.tune.keep_students
        objectives = [o.model_dump() for o in self.spec.tune.objectives]
        keep = plan.students_to_keep(
            list(self.rows.values()), policy, self.spec.tune.mode, objectives
        )
        pruned = []
        for trial_id, row in self.rows.items():
            path = row.get("student_path")
            if path and trial_id not in keep and row.get("status") == "ok":
                pruned.append(path)
                row["student_path"] = None
                logger.info("trial %s: student not kept (tune.keep_students: %s)", trial_id, policy)
        return pruned

    def _keep_student(self, trial: Any) -> None:
        """Copy the best student of a finished trial (in its last checkpoint) beside the tables,
        so export works after the Ray storage is cleaned."""
        checkpoint = trial.checkpoint
        if checkpoint is None or self.rows[trial.trial_id]["status"] != "ok":
            return
        import pyarrow.fs as pafs

        source = f"{checkpoint.path}/{STUDENT_DIR}"
        if checkpoint.filesystem.get_file_info(source).type != pafs.FileType.Directory:
            return
        target = self.out_dir / results.STUDENTS_DIR / trial.trial_id
        with atomic_dir(target) as tmp:
            pafs.copy_files(source, str(tmp), source_filesystem=checkpoint.filesystem)
        self.rows[trial.trial_id]["student_path"] = str(target)

    def _set_row(self, trial: Any, error: str | None, ended: bool) -> None:
        """A trials-table row from the trial's records. ``ended``: Tune says it is over
        (finished, stopped by the scheduler or failed), rather than cut off by an interrupt."""
        spec, values = plan.trial_spec(self.spec, trial.config)
        last = self.last.get(trial.trial_id, {})
        records = [r for _, r in sorted(self.records.get(trial.trial_id, {}).items())]
        status = _trial_status(last, records, spec.train.epochs, error, ended)
        result = results.RunResult.from_records(
            records,
            status=status,
            metric=selection_metric(spec),
            teacher=self.teacher,
            error=error if error is not None else last.get("error"),
            wall_time=float(last.get("wall_time_trial") or last.get("time_total_s") or 0.0),
        )
        if result.cka is not None:
            self.cka[trial.trial_id] = results.cka_rows(self.spec.name, trial.trial_id, result.cka)
        extra = {f"param.{k}": v for k, v in values.items()}
        if "ablation" in trial.config:
            ablation = trial.config["ablation"]
            extra = {k: v for k, v in ablation.items() if k != "values"}  # cell, seed, ...
        extra["node_id"] = last.get("node_id")
        if "latency_ms" in last:  # measured for tune.objectives
            extra["latency_ms"] = last["latency_ms"]
        extra["num_failures"] = getattr(trial, "num_failures", 0)
        if "resumed_from_epoch" in last:  # restarted (a lost worker, a --resume): from where
            extra["resumed_from_epoch"] = last["resumed_from_epoch"]
        self.rows[trial.trial_id] = results.trial_row(
            spec, result, trial_id=trial.trial_id, extra=extra
        )

    def write(self) -> None:
        """The tables, the trials table last: a trial's row is what says it is recorded, so a
        kill between two writes leaves its epochs without a row (rebuilt from them on resume),
        never a row whose epochs are lost for good."""
        rows = sorted(self.rows.values(), key=lambda r: str(r["trial_id"]))
        cka = [row for _, trial_rows in sorted(self.cka.items()) for row in trial_rows]
        if cka:
            results.write_table(cka, self.out_dir / results.CKA_FILE)
        epochs = [row for _, row in sorted(self.epoch_rows.items(), key=lambda kv: kv[0])]
        if epochs:
            results.write_table(epochs, self.out_dir / results.EPOCHS_FILE)
        results.write_table(rows, self.out_dir / results.TRIALS_FILE)
        if self.mirror is not None:
            try:
                self.mirror.push()
            except OSError as error:  # the local tables are whole; the next write tries again
                logger.warning("could not copy the tables to %s: %s", self.mirror.location, error)


def _saved_state(fs: Any, experiment: str) -> dict[str, tuple[str, set[str]]]:
    """``trial_id -> (status, checkpoint folders it names)`` in the experiment state a
    ``Tuner.restore`` would read now (the newest ``experiment_state-*.json``)."""
    import pyarrow.fs as pafs

    names = sorted(
        info.path
        for info in fs.get_file_info(pafs.FileSelector(experiment))
        if info.base_name.startswith("experiment_state-") and info.base_name.endswith(".json")
    )
    if not names:
        return {}
    with fs.open_input_stream(names[-1]) as handle:
        state = json.loads(handle.read())
    found = {}
    for item in state.get("trial_data", []):
        trial = json.loads(item[0]) if isinstance(item[0], str) else item[0]
        named = set(re.findall(r"checkpoint_\d{6}", json.dumps(item)))
        found[str(trial.get("trial_id"))] = (str(trial.get("status")), named)
    return found


def prune_checkpoints(experiment: str, keep: int, drop_ended: bool) -> None:
    """Delete checkpoints (hundreds of MB each) that no restore can need: for a trial that the
    saved experiment state says finished (``TERMINATED``), all of them when ``drop_ended`` (its
    best student was copied beside the tables first); for any other trial, those older than its
    newest ``keep`` that the saved state does not name. Tune's own ``num_to_keep`` is not used:
    it deletes a checkpoint before the state that stops naming it is saved, and a crash in
    between leaves a state that cannot be restored."""
    import pyarrow.fs as pafs

    fs, root = remote.filesystem(experiment)
    try:
        saved = _saved_state(fs, root)
        folders = fs.get_file_info(pafs.FileSelector(root))
    except (OSError, ValueError):  # not there yet, or a state being written: next time
        return
    for folder in folders:
        trial_id = next((t for t in saved if f"_{t}_" in folder.base_name), None)
        if folder.type != pafs.FileType.Directory or trial_id is None:
            continue
        status, named = saved[trial_id]
        checkpoints = sorted(
            info.base_name
            for info in fs.get_file_info(pafs.FileSelector(folder.path))
            if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
        )
        needed = set() if drop_ended and status == "TERMINATED" else {*named, *checkpoints[-keep:]}
        for name in checkpoints:
            if name not in needed:
                fs.delete_dir(f"{folder.path}/{name}")


def _trial_status(
    last: dict[str, Any], records: list[dict], epochs: int, error: str | None, ended: bool
) -> str:
    """ok, pruned, diverged/failed/oom (inside the run), error or oom (the trial raised), or
    interrupted/pending for a trial cut off before it ended or started."""
    status = last.get("status", "running")
    if error is not None:  # the trial raised, or its worker died (Ray's memory monitor, a kill)
        return "oom" if faults.out_of_memory(error) else "error"
    if status not in ("running", "ok"):
        return status
    done = records[-1]["epoch"] if records else 0
    if done >= epochs:
        return "ok"
    if ended:
        return "pruned"  # stopped early by the scheduler
    return "interrupted" if records else "pending"


class LiveTrials(Callback):
    """Feeds Tune's trial events to a :class:`~kdray.infra.progress.TrialsTable` on screen.
    ``horizon``: whose epochs a trial runs (``train`` for students, ``teacher`` for the teacher
    search), so that a trial the scheduler stopped early shows as pruned, as in the tables."""

    def __init__(self, spec: Spec, table: TrialsTable, horizon: str = "train") -> None:
        self.spec = spec
        self.table = table
        self.horizon = horizon
        self.last: dict[str, dict] = {}  # each trial's last report

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tuner.restore unpickles the run config: one an older kdray pickled has neither
        self.__dict__.update({"horizon": "train", "last": {}, **state})

    def _params(self, trial: Any) -> dict[str, Any]:
        return plan.trial_spec(self.spec, trial.config)[1]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **_: Any) -> None:
        self.table.update(trial.trial_id, self._params(trial), status="running")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **_: Any):
        self.last[trial.trial_id] = result
        self.table.update(trial.trial_id, self._params(trial))
        self.table.result(trial.trial_id, result, OBJECTIVE)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **_: Any) -> None:
        trial_spec, params = plan.trial_spec(self.spec, trial.config)
        last = self.last.get(trial.trial_id, {})
        epochs = getattr(trial_spec, self.horizon).epochs
        records = [last] if "epoch" in last else []
        status = _trial_status(last, records, epochs, None, ended=True)
        self.table.update(trial.trial_id, params, status=status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **_: Any) -> None:
        self.table.update(trial.trial_id, self._params(trial), status="error")

    def on_experiment_end(self, trials: list, **_: Any) -> None:
        self.table.close()


# ---------------------------------------------------------------------------------------------
# Tracking: Ray Tune's own logger callbacks


def logger_callbacks(spec: Spec, out: Path, name: str) -> list[Any]:
    """Ray Tune's logger callbacks for ``tune.loggers``, writing into each trial's folder of the
    experiment (``tensorboard --logdir <storage>``): every numeric result (loss terms, dev
    metrics, stage, lr) as a scalar per epoch, and the trial's sampled settings as hparams."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    made: list[Any] = []
    for kind in spec.tune.loggers:
        if kind == "tensorboard":
            made.append(TBXLoggerCallback())
        elif kind == "csv":
            made.append(CSVLoggerCallback())
        elif kind == "json":
            made.append(JsonLoggerCallback())
        elif kind == "mlflow":
            made.append(_mlflow_callback(spec, out, name))
        else:
            made.append(_wandb_callback(spec, out, name))
    return made


def _require(package: str, logger_name: str) -> None:
    """An optional tracker named in ``tune.loggers`` but not installed fails before Ray starts,
    saying how to install it."""
    try:
        __import__(package)
    except ImportError:
        raise ValueError(
            f"tune.loggers: {logger_name} needs the {package} package: "
            f"pip install 'kdray[{logger_name}]' (or take {logger_name} out of tune.loggers)"
        ) from None


#: MLflow's usage telemetry is on by default (HTTPS to MLflow's servers): off, unless the user's
#: environment says otherwise.
MLFLOW_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true"}
#: The MLflow store's file in a sweep's results folder (``tune.mlflow.tracking_uri`` unset).
MLFLOW_DB = "mlflow.db"


def _mlflow_callback(spec: Spec, out: Path, name: str) -> Any:
    """MLflow runs, one per trial, in ``tune.mlflow.tracking_uri`` (default a local SQLite store
    in the results folder: nothing leaves the machine unless the spec says so; MLflow 3 refuses
    its old ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE`` is set)."""
    for key, value in MLFLOW_ENV.items():
        os.environ.setdefault(key, value)  # before mlflow is imported: its client reads them
    _require("mlflow", "mlflow")
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    settings = spec.tune.mlflow
    return MLflowLoggerCallback(
        tracking_uri=settings.tracking_uri or f"sqlite:///{out.resolve() / MLFLOW_DB}",
        experiment_name=settings.experiment or name,
        save_artifact=False,
    )


#: Set in W&B's logging actor (a Ray worker, which does not inherit the driver's environment),
#: unless already set: no crash reports to W&B's Sentry, no git calls, quiet console.
WANDB_ENV = {"WANDB_ERROR_REPORTING": "false", "WANDB_DISABLE_GIT": "true", "WANDB_SILENT": "true"}

#: wandb.init settings: kdray logs the epochs' results only. System metrics and machine info
#: are off (their probes include a cloud metadata address), as are git, code saving and console
#: capture (the actor's output is Ray's, not the trial's).
WANDB_SETTINGS = {
    "disable_git": True,
    "save_code": False,
    "disable_code": True,
    "console": "off",
    "x_disable_stats": True,
    "x_disable_machine_info": True,
}


def _wandb_callback(spec: Spec, out: Path, name: str) -> Any:
    """W&B runs, one per trial (id = trial id), through Ray's ``WandbLoggerCallback``: offline
    by default, under ``<results folder>/wandb/`` (``tune.wandb.dir`` is W&B's ``dir``, which
    gets the ``wandb/`` folder), so nothing leaves the machine unless the spec says so."""
    _require("wandb", "wandb")
    from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

    settings = spec.tune.wandb
    root = Path(settings.dir).resolve() if settings.dir else out.resolve()

    class LocalWandbActor(_WandbLoggingActor):  # type: ignore[misc]
        """Ray's per-trial W&B actor (local: Ray pickles it by value, so importing
        kdray.experiments.sweep does not import wandb), with kdray's environment set and W&B's
        folder made first.

        It returns only once W&B's writer process has ended: Ray kills the actor as soon as
        ``run`` returns, and ``wandb.finish`` may return before that process has written the
        run, which then died with the actor and left an empty run file."""

        def run(self) -> None:
            for key, value in WANDB_ENV.items():
                os.environ.setdefault(key, value)
            root.mkdir(parents=True, exist_ok=True)
            try:
                super().run()
            finally:
                self._wandb.teardown()  # waits for W&B's writer process to finish

    callback = WandbLoggerCallback(
        project=settings.project or name,
        group=settings.group,
        entity=settings.entity,
        mode=settings.mode,
        dir=str(root),
        settings=dict(WANDB_SETTINGS),
    )
    callback._logger_actor_cls = LocalWandbActor  # Ray's hook for the actor class
    return callback


# ---------------------------------------------------------------------------------------------
# Teacher and teacher outputs, once per experiment


def setup_cpus(
    cpu: float, gpu: float, max_concurrent: int, node_cpus: list[float], free_cpus: float
) -> float:
    """CPUs for a task that runs before any trial (the teacher, its outputs) on CPU: the
    trials' CPUs together (``cpu`` x ``max_concurrent``), as none of them runs yet, but no more
    than the largest node has (or the task could not be placed) nor than the cluster has free
    now (other jobs may hold some), and never fewer than one trial's. With a GPU (``gpu`` > 0)
    the GPU does the work: one trial's CPUs."""
    if gpu > 0:
        return cpu
    return max(cpu, min(cpu * max_concurrent, max(node_cpus, default=0.0), free_cpus))


def setup_task_cpus(spec: Spec) -> float:
    """:func:`setup_cpus` for ``spec`` on the connected Ray cluster as it is now."""
    resources = spec.tune.resources
    nodes = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
    free = ray.available_resources().get("CPU", 0.0)
    return setup_cpus(resources.cpu, resources.gpu, spec.tune.max_concurrent, nodes, free)


def _setup_task(spec: Spec, fn: Callable[..., Any]) -> tuple[Any, float]:
    """``fn`` as a Ray task with :func:`setup_task_cpus` CPUs (and one trial's GPUs), and that
    CPU count, which the task passes to torch (Ray's worker would otherwise run it on one
    thread)."""
    cpus = setup_task_cpus(spec)
    return ray.remote(num_cpus=cpus, num_gpus=spec.tune.resources.gpu)(fn), cpus


def _use_cpus(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def _teacher_task(spec_json: dict[str, Any], target: str, cpus: float = 1) -> dict[str, Any]:
    """Runs as a Ray task: fine-tune (or reuse) the teacher and copy it into the storage."""
    from kdray.training import teacher

    _use_cpus(cpus)
    spec = data.localize(Spec.model_validate(spec_json))
    info = teacher.ensure_teacher(spec)
    teacher.publish(info, target)
    return {"id": info.id, "dev_metrics": info.dev_metrics, "settings": info.settings}


def _teacher_outputs_task(
    spec_json: dict[str, Any], variants: list[dict], root: str, cpus: float = 1
) -> int:
    """Runs as a Ray task: build the teacher-output caches the trials will read."""
    from kdray.training import data, engine, models
    from kdray.training.teacher import ensure_teacher
    from kdray.training.teacher_outputs import cache_enabled, outputs_factory

    _use_cpus(cpus)
    spec = Spec.model_validate(spec_json)
    info = ensure_teacher(spec)
    prepared = data.prepare(spec, info.path)
    teacher_model = models.load_classifier(info.path, prepared.task.num_labels)
    device = engine.pick_device(spec.train.device)
    built = set()
    for variant in variants:
        try:
            variant_spec = spec.with_values(variant)
            layer_map = models.resolve_layer_map(
                variant_spec.distill.layer_map,
                variant_spec.student.layers,
                models.num_layers(teacher_model),
            )
        except (ValueError, models.ModelError):
            continue  # a combination no trial can run (its trial fails with the reason)
        marker = (tuple(sorted(set(layer_map))), variant_spec.distill.losses.attention.rows)
        if marker in built or not cache_enabled(variant_spec):
            continue
        outputs_factory(variant_spec, layer_map, info, root=root)(prepared, teacher_model, device)
        built.add(marker)
    return len(built)


def _prepare_teacher(spec: Spec, store: str, name: str) -> tuple[Any, Spec]:
    """The teacher fine-tuned (or found) once by a Ray task and copied into the storage; the
    trials' base spec then points at that copy."""
    from kdray.training.teacher import TeacherInfo

    location = remote.join(store, f"{name}-teacher")
    task, cpus = _setup_task(spec, _teacher_task)
    model = spec.teacher.model
    logger.info("teacher: fine-tuning %s on %s, or reusing it (%g CPUs)", model, spec.task, cpus)
    started = time.time()
    meta = ray.get(task.remote(spec.model_dump(mode="json"), location, cpus))
    logger.info(
        "teacher %s ready in %.0fs: dev %s",
        meta["id"],
        time.time() - started,
        ", ".join(f"{k} {v:.4f}" for k, v in meta["dev_metrics"].items()),
    )
    info = TeacherInfo(location, meta["id"], meta["dev_metrics"], meta["settings"])
    return info, spec.with_values({"teacher.checkpoint": location})


def _prepare_outputs(base: Spec, cells: list[dict] | None, store: str, name: str) -> Spec:
    """Teacher outputs for every layer set a trial can ask for, built once by one task; with a
    remote storage URI each node builds (and locks) its own local copy instead."""
    variants = plan.cache_variants(base, cells)
    if not variants or "://" in store:
        return base
    root = remote.join(store, f"{name}-teacher-outputs")
    build, cpus = _setup_task(base, _teacher_outputs_task)
    logger.info("teacher outputs: caching them for %d layer set(s)", len(variants))
    started = time.time()
    ray.get(build.remote(base.model_dump(mode="json", by_alias=True), variants, root, cpus))
    logger.info("teacher outputs ready in %.0fs", time.time() - started)
    return base.with_values({"teacher.cache.dir": root})


# ---------------------------------------------------------------------------------------------
# Experiments


@dataclass
class SweepResult:
    trials: pd.DataFrame
    epochs: pd.DataFrame
    out_dir: Path
    storage: str
    best: dict[str, Any] | None


@dataclass
class TrialPlan:
    """Which trials an experiment runs: a searched space, or an explicit grid (ablations)."""

    param_space: dict[str, Any]
    searcher: Any
    scheduler: Any
    num_samples: int
    max_concurrent: int | None


def _sweep_plan(
    base: Spec, out: Path, scheduler: Any = None, told: list[Any] | None = None
) -> TrialPlan:
    """The search block's trials: Optuna (its study in ``out``) or Ray's grid, and
    ``scheduler`` (default :func:`make_scheduler`'s); ``told``: Optuna trials that ran before
    (a search continued from its tables), which count towards ``num_samples``."""
    searcher = None
    if base.tune.searcher.kind != "grid":
        storage = optuna_storage(base, out, fresh=True)
        searcher = make_searcher(base, storage=storage, study_name=base.name, told=told)
    elif told:
        raise ValueError("a grid search cannot be told the trials that ran before")
    return TrialPlan(
        param_space=ray_space(base) if searcher is None else {},
        searcher=searcher,
        scheduler=scheduler or make_scheduler(base),
        # Ray counts trials
        num_samples=(base.tune.num_samples - len(told or [])) * base.tune.seeds_per_trial,
        # the Optuna searcher is wrapped in a ConcurrencyLimiter already
        max_concurrent=base.tune.max_concurrent if searcher is None else None,
    )


def run_sweep(
    spec: Spec,
    *,
    address: str | None = None,
    storage: str | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list[Any] | None = None,
    trainable: Callable[..., None] | None = None,
) -> SweepResult:
    """Run (or resume) the spec's search as a Ray Tune experiment and write the tables; a
    resume without Ray Tune's state goes on from the tables (:func:`_continued_plan`)."""
    out = Path(out_dir) if out_dir else Path("results") / spec.name
    from_tables = _search_from_tables(spec, out, storage, spec.name, resume)
    if from_tables and (ended := _ended(spec, out, spec.name, storage, spec.tune.num_samples)):
        return ended

    def searched(base: Spec, out: Path) -> TrialPlan:
        if not from_tables:
            return _sweep_plan(base, out)
        value = f"best.dev.{selection_metric(base)}"
        time = (RUNG_TIME, "classifier_epochs")
        return _continued_plan(base, out, make_scheduler(base), value, time)

    return run_experiment(
        spec,
        searched,
        from_tables=from_tables,
        name=spec.name,
        command="sweep",
        address=address,
        storage=storage,
        out_dir=out_dir,
        resume=resume,
        overwrite=overwrite,
        callbacks=callbacks,
        trainable=trainable,
    )


def run_ablation(
    spec: Spec,
    *,
    from_sweep: str | Path | None = None,
    seeds: list[int] | None = None,
    address: str | None = None,
    storage: str | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list[Any] | None = None,
) -> SweepResult:
    """Every cell x seed as one Ray Tune trial (FIFO, nothing pruned)."""
    cells, trials = plan.ablation_trials(spec, from_sweep, seeds)
    name = f"{spec.name}-ablation"
    return run_trials(
        spec,
        trials,
        name=name,
        command="ablate",
        cells=[cell["values"] for cell in cells],
        address=address,
        storage=storage,
        out_dir=out_dir or Path("results") / name,
        resume=resume,
        overwrite=overwrite,
        callbacks=callbacks,
    )


def run_experiment(
    spec: Spec,
    make_plan: Callable[[Spec, Path], TrialPlan],
    *,
    name: str,
    command: str,
    cells: list[dict[str, Any]] | None = None,
    address: str | None = None,
    storage: str | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list[Any] | None = None,
    trainable: Callable[..., None] | None = None,
    from_tables: bool = False,
) -> SweepResult:
    """Teacher first (one Ray task), then the trials as one resumable Tune experiment.
    ``from_tables``: a ``resume`` without Ray Tune state whose plan holds only the trials the
    tables lack (:func:`run_trials`): a new experiment that adds to the tables."""
    selection_metric(spec)  # a metric the task does not have fails before Ray starts
    spec, _ = data.resolve_max_seq_length(spec)  # ``auto`` as a number (the CLI did it already)
    out = Path(out_dir) if out_dir else Path("results") / name
    loggers = logger_callbacks(spec, out, name)  # mlflow/wandb missing fails here, before Ray
    results.claim_folder(out, spec, command, resume=resume, overwrite=overwrite)
    store = results.ray_store(out, storage)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(address, runtime_env=spec.tune.runtime_env)
    experiment = results.experiment_path(out, storage, name)
    if resume and not tune.Tuner.can_restore(experiment):
        if not (from_tables or results.claimed_before_trials(out, spec, command)):
            raise FileNotFoundError(f"nothing to resume at {experiment}")
        if not from_tables:
            logger.info("%s: stopped before its first trial; starting the trials", out)
        resume = False
    results.write_experiment(out, spec, command, data.spec_length_stats(spec))
    if remote.is_remote(store):  # the nodes read the data from the storage too
        spec = data.publish(spec, remote.join(store, f"{name}-data"))
    teacher, base = _prepare_teacher(spec, store, name)
    base = _prepare_outputs(base, cells, store, name)
    fn = tune.with_parameters(
        trainable or distill_trainable, spec_json=base.model_dump(mode="json", by_alias=True)
    )
    resources = spec.tune.resources
    fn = tune.with_resources(fn, {"cpu": resources.cpu, "gpu": resources.gpu})
    run_config = tune.RunConfig(
        name=name,
        storage_path=store,
        callbacks=[
            TableWriter(base, out, teacher, experiment, _mirror(out, storage, name)),
            *loggers,
            *(callbacks or []),
        ],
        failure_config=tune.FailureConfig(max_failures=spec.tune.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),  # kdray prunes, safely
        verbose=0,
    )
    # only the loggers tune.loggers names (Ray adds CSV, JSON and TensorBoard ones otherwise)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    tuner = _tuner(fn, run_config, experiment, make_plan(base, out) if not resume else None)
    _keep_io_failures()
    _IOFailures.seen.clear()
    _fit(tuner)
    if _IOFailures.seen:
        raise _IOFailures.seen[0]
    if address and address.startswith("ray://") and storage:
        # Ray Client ran the Tuner (and its table writer) on the head node: the tables come
        # back by the storage
        remote.pull_results(remote.results_location(storage, name), into=out)
    trials, epochs = results.load(out)
    if not spec.tune.keep_checkpoints:
        prune_checkpoints(experiment, spec.tune.checkpoint_keep, drop_ended=True)
        _drop_outputs_cache(trials, store, name)
    by_mean = spec.tune.seeds_per_trial > 1
    best = plan.best_trial(trials, spec.tune.mode, by_mean)
    return SweepResult(trials, epochs, out, experiment, best)


def _mirror(out: Path, storage: str | None, name: str) -> remote.Mirror | None:
    """With ``--storage``, the results folder is copied there as it is written
    (``<storage>/<name>-results``): readable from the storage alone, and under Ray Client the
    way the tables reach the machine that ran ``kdray``."""
    if not storage:
        return None
    return remote.Mirror(out.resolve(), remote.results_location(storage, name))


def _fit(tuner: Any) -> Any:
    """``tuner.fit()``, then the SIGINT/SIGUSR1 handlers as they were: Ray Tune installs its own
    for the run and leaves them after a run that ended normally, so a Ctrl-C between two
    experiments (an ablation's next round, a search's confirmation) was swallowed."""
    numbers = [signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    saved = {number: signal.getsignal(number) for number in numbers}
    try:
        return tuner.fit()
    finally:
        if threading.current_thread() is threading.main_thread():
            for number, handler in saved.items():
                if handler is not None:  # None: not installed from Python, nothing to put back
                    signal.signal(number, handler)


def _tuner(fn: Any, run_config: Any, experiment: str, chosen: TrialPlan | None) -> Any:
    """A new Tuner for ``chosen``'s trials, or (``chosen`` None) the experiment restored."""
    if chosen is None:
        return tune.Tuner.restore(
            experiment, trainable=fn, resume_unfinished=True, resume_errored=True
        )
    return tune.Tuner(
        fn,
        param_space=chosen.param_space,
        tune_config=tune.TuneConfig(
            search_alg=chosen.searcher,
            scheduler=chosen.scheduler,
            num_samples=chosen.num_samples,
            max_concurrent_trials=chosen.max_concurrent,
            # A trial after the first runs in a worker that has torch, transformers and
            # kdray imported already: seconds saved per trial (see benchmarks/README.md).
            reuse_actors=True,
        ),
        run_config=run_config,
    )


def _drop_outputs_cache(trials: pd.DataFrame, store: str, name: str) -> None:
    """Once every trial has ended, the experiment's teacher-output cache (hundreds of MB, built
    in about one epoch of teacher forwards) is deleted from the storage; a later ``--resume``
    of an interrupted experiment keeps it, and a rerun builds it again."""
    if "status" not in trials or trials["status"].isin(results.UNFINISHED).any():
        return
    root = Path(remote.join(store, f"{name}-teacher-outputs"))
    if "://" not in store and root.is_dir():
        shutil.rmtree(root, ignore_errors=True)
        logger.info("deleted the teacher-output cache %s: every trial has ended", root)


def cluster_resources(address: str, runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the Ray cluster at ``address`` offers (``CPU``, ``GPU``, ... in total) and, under
    ``nodes``, each alive node's address, resources (a trial must fit on one node) and the
    kdray it runs (:func:`kdray.build`, or why it has none), for the pre-flight checks; joins
    the cluster (which the sweep then uses)."""
    init_ray(address, runtime_env=runtime_env)
    totals: dict[str, Any] = {k: float(v) for k, v in ray.cluster_resources().items()}
    alive = [node for node in ray.nodes() if node.get("Alive")]
    builds = _node_builds([node["NodeID"] for node in alive])
    totals["nodes"] = [
        {
            "address": node.get("NodeManagerAddress", ""),
            **{k: float(v) for k, v in node.get("Resources", {}).items() if k in ("CPU", "GPU")},
            "kdray": build,
        }
        for node, build in zip(alive, builds, strict=True)
    ]
    totals["driver_kdray"] = kdray.build()
    return totals


#: Each node's kdray build, run there; ``kdray.build`` needs only the standard library, so a
#: node answers in a fresh worker without importing torch.
_build_on_node = ray.remote(num_cpus=0, max_retries=0)(kdray.build)


def _node_builds(node_ids: list[str], timeout: float = 120.0) -> list[str]:
    """Each node's :func:`kdray.build`, run there (no CPU asked); an error (kdray not
    importable there) as its text."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    refs = [
        _build_on_node.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote()
        for node in node_ids
    ]
    builds = []
    for ref in refs:
        try:
            builds.append(ray.get(ref, timeout=timeout))
        except Exception as error:  # noqa: BLE001 - whatever stops kdray loading there
            cause = getattr(error, "cause", None) or error
            builds.append(f"error: {type(cause).__name__}: {str(cause).splitlines()[0][:200]}")
    return builds


def run_trials(
    spec: Spec,
    trials: list[dict[str, Any]],
    *,
    name: str,
    command: str,
    cells: list[dict[str, Any]] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    storage: str | None = None,
    callbacks: list[Any] | None = None,
) -> SweepResult:
    """An explicit list of trial configs (``{"cell", "values", "source", "seed", ...}``, see
    :func:`kdray.experiments.plan.trial_spec`) as one Ray Tune experiment, FIFO, nothing pruned:
    ablation cells, confirmation runs, a round of adaptive seeds. Keys other than ``values`` become
    columns of the trials table."""
    from ray.tune.schedulers import FIFOScheduler

    out = Path(out_dir) if out_dir else Path("results") / name
    if resume and (ended := _ended(spec, out, name, storage, len(trials))):
        return ended
    from_tables = resume and _state_lost(out, storage, name)

    def explicit(base: Spec, out: Path) -> TrialPlan:
        # planned after run_experiment claimed the folder: its tables are this experiment's
        chosen = _not_ended(out, trials) if from_tables else trials
        return TrialPlan(
            param_space={"ablation": tune.grid_search(chosen)},
            searcher=None,
            scheduler=FIFOScheduler(),
            num_samples=1,
            max_concurrent=base.tune.max_concurrent,
        )

    return run_experiment(
        spec,
        explicit,
        from_tables=from_tables,
        name=name,
        command=command,
        cells=cells if cells is not None else [trial["values"] for trial in trials],
        address=address,
        storage=storage,
        out_dir=out,
        resume=resume,
        overwrite=overwrite,
        callbacks=callbacks,
    )


def _search_from_tables(
    spec: Spec, out: Path, storage: str | None, name: str, resume: bool
) -> bool:
    """Whether a resumed search goes on from its tables (its Ray Tune state is gone); one that
    cannot (:func:`kdray.experiments.plan.continue_problem`) is refused here, before anything
    runs."""
    if not (resume and _state_lost(out, storage, name)):
        return False
    if problem := plan.continue_problem(spec):
        raise FileNotFoundError(f"--resume: no Ray Tune state for {out}, and {problem}")
    return True


def _state_lost(out: Path, storage: str | None, name: str) -> bool:
    """Whether ``out``'s tables hold trials but no Ray Tune state can be restored: the folder
    was copied without ``ray/``, or the storage (a lost head node's disk) is gone."""
    if not (out / results.TRIALS_FILE).exists():
        return False
    return not tune.Tuner.can_restore(results.experiment_path(out, storage, name))


def _trial_key(values: dict[str, Any], keys: list[str]) -> tuple[str, ...]:
    """A planned trial's (or a row's) identity: its ``cell``, ``seed``, ... as text."""

    def text(value: Any) -> str:
        value = json_cell(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value)

    return tuple(text(values.get(key)) for key in keys)


def _not_ended(out: Path, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The planned trials the tables do not show ended, after dropping the rows of those cut
    off (:func:`kdray.analysis.results.keep_ended`): they run again from their first epoch."""
    ended = results.keep_ended(out)
    keys = sorted({key for trial in trials for key in trial if key != "values"})
    done = {_trial_key(row, keys) for row in ended.to_dict("records")}
    remaining = [trial for trial in trials if _trial_key(trial, keys) not in done]
    logger.warning(
        "%s: no Ray Tune state to restore; %d of %d trials ended in its tables and are kept, "
        "the other %d run again from their first epoch",
        out, len(trials) - len(remaining), len(trials), len(remaining),
    )  # fmt: skip
    return remaining


def _ended(
    spec: Spec, out: Path, name: str, storage: str | None, planned: int
) -> SweepResult | None:
    """The tables of an explicit experiment whose ``planned`` trials have all ended, so that
    resuming it (a finished round of adaptive seeds) starts neither Ray, the teacher nor the
    teacher-output cache; None while any trial is missing or unfinished."""
    if not (out / results.TRIALS_FILE).exists():
        return None
    trials, epochs = results.load(out)
    if not results.all_ended(trials, planned):
        return None
    logger.info("%s: its %d trials have ended already; nothing to resume", name, len(trials))
    experiment = results.experiment_path(out, storage, name)
    return SweepResult(
        trials,
        epochs,
        out,
        experiment,
        plan.best_trial(trials, spec.tune.mode, spec.tune.seeds_per_trial > 1),
    )


# ---------------------------------------------------------------------------------------------
# Teacher search (kdray teacher --search): what it searches and says is
# kdray.experiments.teacher_search


def teacher_trainable(config: dict[str, Any], spec_json: dict[str, Any]) -> None:
    """One teacher-search trial: the teacher fine-tuned with the trial's settings, every
    epoch's dev metrics reported (ASHA may stop it there); nothing is stored."""
    from kdray.training import teacher

    spec, _ = plan.trial_spec(Spec.model_validate(spec_json), config)
    _use_cpus(spec.tune.resources.cpu)
    prepared = data.prepare(spec, spec.teacher.model)
    metric = prepared.task.main_metric

    def on_epoch(record: dict[str, Any]) -> None:
        tune.report({**record, OBJECTIVE: record[f"best.dev.{metric}"]})

    teacher.train_teacher(spec, prepared, on_epoch=on_epoch)


def _confirm_teacher_task(spec_json: dict[str, Any], cpus: float) -> dict[str, Any]:
    """Runs as a Ray task: the best configuration fine-tuned with one confirmation seed and
    stored in the teacher cache (or found there)."""
    from kdray.training import teacher

    _use_cpus(cpus)
    spec = Spec.model_validate(spec_json)
    info = teacher.ensure_teacher(spec)
    dev = {f"dev.{k}": v for k, v in info.dev_metrics.items()}
    return {"seed": spec.teacher.seed, "teacher_id": info.id, "path": info.path, **dev}


class TeacherTables(Callback):
    """The teacher search's tables, kept up to date as trials report: ``epochs.parquet`` (dev
    metrics by trial and epoch) and ``trials.parquet`` (one row per trial, in the order trials
    started), keyed by trial, so a resumed search adds to them and a kill loses no ended trial;
    one log line per ended trial."""

    def __init__(self, spec: Spec, out_dir: Path) -> None:
        self.spec = spec
        self.out_dir = out_dir
        self.metric = data.task_of(spec).main_metric
        self.__setstate__({})

    def __getstate__(self) -> dict[str, Any]:  # restored: read the tables from disk again
        return {"spec": self.spec, "out_dir": self.out_dir, "metric": self.metric}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.epochs: dict[tuple[str, int], dict[str, Any]] | None = None
        self.trials: dict[str, dict[str, Any]] = {}
        self.seen: set[str] = set()  # trials started in this run (not restored as ended)

    def _load(self) -> None:
        if self.epochs is None:
            found = results.load_tables(self.out_dir)
            self.epochs = {(r["trial_id"], int(r["epoch"])): r for r in found["epochs"]}
            self.trials = {row["trial_id"]: row for row in found["trials"]}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **_: Any) -> None:
        self.seen.add(trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **_: Any):
        self._load()
        kept = {k: v for k, v in result.items() if k.startswith(("dev.", "best")) or k == "epoch"}
        self.epochs[(trial.trial_id, int(result["epoch"]))] = {
            "name": self.spec.name, "trial_id": trial.trial_id, **kept
        }  # fmt: skip
        self._row(trial, "running")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **_: Any) -> None:
        row = self._row(trial, "ended")
        logger.info(
            "teacher trial %s: %s, best dev %s %.4f (epoch %s of %s run)",
            trial.trial_id,
            row["status"],
            self.metric,
            row.get(f"best.dev.{self.metric}", math.nan),
            row.get("best_epoch"),
            row["epochs_run"],
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **_: Any) -> None:
        self._row(trial, "error", _error_text(trial))

    def on_experiment_end(self, trials: list, **_: Any) -> None:
        """Every trial gets a row; one that started in this run and did not end was cut off
        (Tune's clean-up marks the trials a Ctrl-C stops TERMINATED), one Tune restored as
        ended whose row a kill lost has ended."""
        self._load()
        for trial in trials:
            if self.trials.get(trial.trial_id, {}).get("status", "running") in results.UNFINISHED:
                ended = trial.status == "TERMINATED" and trial.trial_id not in self.seen
                self._row(trial, "ended" if ended else "cut")

    def _row(self, trial: Any, how: str, error: str | None = None) -> dict[str, Any]:
        """``trial``'s row from its epochs: ``how`` running, ended (ok or pruned by the epochs
        it ran), error, or cut (interrupted, or pending before its first epoch)."""
        self._load()
        trial_spec, values = plan.trial_spec(self.spec, trial.config)
        mine = [row for (tid, _), row in sorted(self.epochs.items()) if tid == trial.trial_id]
        ran = int(mine[-1]["epoch"]) if mine else 0
        status = {
            "running": "running",
            "error": "error",
            "ended": "ok" if ran >= trial_spec.teacher.epochs else "pruned",
            "cut": "interrupted" if mine else "pending",
        }[how]
        best = {k: v for k, v in (mine[-1] if mine else {}).items() if k.startswith("best")}
        row = {
            "name": self.spec.name, "trial_id": trial.trial_id, "status": status,
            "epochs_run": ran, "error": error, **best,
            **{f"param.{k}": json_cell(v) for k, v in values.items()},
        }  # fmt: skip
        self.trials[trial.trial_id] = row
        epochs = [r for _, r in sorted(self.epochs.items())]
        if epochs:
            results.write_table(epochs, self.out_dir / results.EPOCHS_FILE)
        results.write_table(list(self.trials.values()), self.out_dir / results.TRIALS_FILE)
        return row


# the name a search started by an earlier kdray pickled its callback under: Tuner.restore of
# that search unpickles it as a TeacherTables (its state, spec and out_dir, is the same)
TeacherEpochs = TeacherTables


@dataclass
class TeacherSearchResult:
    trials: pd.DataFrame
    confirm: pd.DataFrame
    settings: dict[str, Any]
    out_dir: Path
    interrupted: bool = False  # trials cut off: nothing confirmed; --resume continues


def _teacher_tuner(
    spec: Spec,
    out: Path,
    storage: str | None,
    name: str,
    resume: bool,
    from_tables: bool,
    callbacks: list[Any] | None = None,
) -> Any:
    """The search restored from Ray Tune's state, a new one, or (``from_tables``) one that goes
    on from its tables alone (:func:`_continued_plan`); ``callbacks`` besides the tables' (the
    live trials table)."""
    from kdray.experiments import teacher_search

    fn = tune.with_parameters(teacher_trainable, spec_json=spec.model_dump(mode="json"))
    resources = spec.tune.resources
    fn = tune.with_resources(fn, {"cpu": resources.cpu, "gpu": resources.gpu})
    experiment = results.experiment_path(out, storage, name)
    run_config = tune.RunConfig(
        name=name,
        storage_path=results.ray_store(out, storage),
        verbose=0,
        callbacks=[TeacherTables(spec, out), *(callbacks or [])],
        failure_config=tune.FailureConfig(max_failures=spec.tune.max_failures),
    )
    if resume and not from_tables and tune.Tuner.can_restore(experiment):
        return _tuner(fn, run_config, experiment, None)
    # ASHA on teacher epochs; the best dev score so far, always higher is better
    horizon = teacher_search.max_epochs(spec)
    scheduler = make_scheduler(spec, time_attr="epoch", horizon=horizon, mode="max")
    if from_tables:
        value = f"best.dev.{data.task_of(spec).main_metric}"
        continued = _continued_plan(spec, out, scheduler, value, ("epoch", "epoch"))
        return _tuner(fn, run_config, experiment, continued)
    return _tuner(fn, run_config, experiment, _sweep_plan(spec, out, scheduler))


def _continued_plan(
    spec: Spec, out: Path, scheduler: Any, value: str, time: tuple[str, str]
) -> TrialPlan:
    """A search whose Ray Tune state is gone (the folder copied without ``ray/``, a lost head
    node's disk), continued from its tables: the trials they show ended are kept (the rows of
    those cut off dropped) and told to Optuna (``value`` and the further objectives' columns)
    and to ``scheduler`` (``time``: its time key and the epochs table's column for it); the
    rest of ``num_samples`` runs."""
    kept = results.keep_ended(out).to_dict("records")
    logger.warning(
        "%s: no Ray Tune state to restore; the %d trials its tables show ended are kept and told "
        "to Optuna and the scheduler, the search goes on from there",
        out, len(kept),
    )  # fmt: skip
    epochs = results.load_tables(out)["epochs"]
    _tell_scheduler(scheduler, kept, epochs, value, time)
    values = [value, *objective_keys(spec)[0][1:]]
    return _sweep_plan(spec, out, scheduler, plan.told_trials(spec, kept, values))


def _tell_scheduler(
    scheduler: Any,
    trials: list[dict[str, Any]],
    epochs: list[dict[str, Any]],
    value: str,
    time: tuple[str, str] = ("epoch", "epoch"),
) -> None:
    """The kept trials' epochs given to a new scheduler through Tune's scheduler hooks, so that
    ASHA's rungs hold them (in any order: each result lands in the rung it reached) and prune a
    new trial as the uninterrupted search would have (exactly when trials ran one at a time);
    ``time``: the scheduler's time key and the epochs table's column it is in."""
    time_attr, time_column = time
    for trial in trials:
        stand_in = types.SimpleNamespace(trial_id=trial["trial_id"])
        scheduler.on_trial_add(None, stand_in)
        mine = sorted((r for r in epochs if r["trial_id"] == trial["trial_id"]), key=_epoch)
        result: dict[str, Any] = {}
        for row in mine:
            result = {time_attr: int(row[time_column]), OBJECTIVE: float(row[value])}
            scheduler.on_trial_result(None, stand_in, result)
        if result:
            scheduler.on_trial_complete(None, stand_in, result)
        else:
            scheduler.on_trial_remove(None, stand_in)


def _epoch(row: dict[str, Any]) -> int:
    return int(row["epoch"])


def run_teacher_search(
    spec: Spec,
    *,
    address: str | None = None,
    storage: str | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    seeds: tuple[int, ...] | None = None,
    callbacks: list[Any] | None = None,
) -> TeacherSearchResult:
    """Search the teacher's fine-tuning as Ray Tune trials, then fine-tune the best
    configuration with fresh seeds into the teacher cache; tables and ``TEACHER.md`` in
    ``out_dir`` (default ``results/<name>-teacher``)."""
    from kdray.experiments import teacher_search as ts

    problems = ts.search_problems(spec)
    if problems:
        raise ValueError("; ".join(problems))
    name = results.experiment_name(spec, "teacher")
    out = Path(out_dir) if out_dir else Path("results") / name
    from_tables = _search_from_tables(spec, out, storage, name, resume)
    results.claim_folder(out, spec, "teacher", resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(address, runtime_env=spec.tune.runtime_env)
    results.write_experiment(out, spec, "teacher")
    found = pd.DataFrame(results.load_tables(out)["trials"])
    if not (from_tables and results.all_ended(found, spec.tune.num_samples)):
        # (a search whose every trial ended goes on to its confirmation)
        _fit(_teacher_tuner(spec, out, storage, name, resume, from_tables, callbacks))
    trials = pd.DataFrame(results.load_tables(out)["trials"])
    if len(trials) < spec.tune.num_samples or trials["status"].isin(results.UNFINISHED).any():
        # interrupted (Ctrl-C, a lost driver): no confirmation of a half-searched space
        return TeacherSearchResult(trials, pd.DataFrame(), {}, out, interrupted=True)
    metric = data.task_of(spec).main_metric
    settings = ts.best_settings(trials, metric)
    task, cpus = _setup_task(spec, _confirm_teacher_task)
    confirmed = ts.confirm_specs(spec, settings, seeds or ts.CONFIRM_SEEDS)
    logger.info(
        "confirming %s with teacher seeds %s: %d fine-tunes of %d epochs, %g CPUs each "
        "(a teacher already in the cache is reused)",
        " ".join(f"{k}={v}" for k, v in settings.items()),
        ", ".join(str(s.teacher.seed) for s in confirmed),
        len(confirmed),
        confirmed[0].teacher.epochs,
        cpus,
    )
    rows = _confirm(task, confirmed, cpus, metric, out / ts.CONFIRM_FILE)
    confirm = pd.DataFrame(rows)
    report = ts.teacher_markdown(spec, trials, confirm, metric)
    write_text_atomic(out / ts.TEACHER_REPORT, report)
    return TeacherSearchResult(trials, confirm, settings, out)


def _confirm(
    task: Any, specs: list[Spec], cpus: float, metric: str, table: Path
) -> list[dict[str, Any]]:
    """The confirmation fine-tunes as Ray tasks (in parallel where the cluster has room), one
    log line and a rewritten ``table`` as each ends: an hour-long confirmation shows its
    progress in a background run's log, and a kill loses no ended seed's row."""
    order = {s.teacher.seed: index for index, s in enumerate(specs)}
    pending = [task.remote(s.model_dump(mode="json"), cpus) for s in specs]
    rows: list[dict[str, Any]] = []
    while pending:
        (done,), pending = ray.wait(pending, num_returns=1)
        row = ray.get(done)
        rows = sorted([*rows, row], key=lambda r: order[r["seed"]])
        results.write_table(rows, table)
        logger.info(
            "confirmation seed %s: dev %s %.4f, teacher %s (%d of %d)",
            row["seed"], metric, row[f"dev.{metric}"], row["teacher_id"], len(rows), len(specs),
        )  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# kdray.sweep(spec) from Python


def search(
    spec: SpecLike,
    *,
    out: str | Path | None = None,
    address: str | None = None,
    storage: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Results:
    """``kdray sweep`` from Python: the pre-flight (a failed check raises
    :class:`kdray.experiments.check.PreflightError` before any compute), the search, its tables read
    back (``trials, epochs = kdray.sweep(spec)``)."""
    spec = as_spec(spec, overrides)
    if not spec.search:
        raise ValueError(f"{spec.name}: no search block; use kdray.run for a single run")
    out_dir = Path(out) if out else check.default_out_dir(spec, "sweep")
    resources = cluster_resources(address, spec.tune.runtime_env) if address else None
    checks = check.preflight(
        spec,
        command="sweep",
        out_dir=out_dir,
        address=address,
        storage=storage,
        resume=resume,
        overwrite=overwrite,
        cluster_resources=resources,
    )
    check.raise_failed(checks)
    outcome = run_sweep(
        spec, address=address, storage=storage, out_dir=out_dir, resume=resume, overwrite=overwrite
    )
    return results.load(outcome.out_dir)


class _CallableModule(types.ModuleType):
    """``kdray.sweep(spec)`` runs :func:`search`: Python makes a package's attribute its
    submodule of that name once it is imported, so the module answers the call itself."""

    def __call__(self, spec: SpecLike, **options: Any) -> Results:
        return search(spec, **options)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # pickled by name like any module (a Ray closure may hold it): imported again there
        return importlib.import_module, (self.__name__,)


sys.modules[__name__].__class__ = _CallableModule
