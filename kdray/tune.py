"""Ray Tune and Optuna glue: every trial is one :func:`kdray.train.distill` run.

- The search space comes from the spec's ``search:`` block; Optuna samples it define-by-run,
  so a conditional parameter is only sampled where its ``when`` holds.
- The teacher is fine-tuned once, by a Ray task, before any trial; trials read it from the
  sweep's storage (a local folder, a shared mount or any pyarrow filesystem URI).
- ASHA compares trials on ``kd_epoch``: epochs in which the classifier was trained. Staged
  algorithms (pid, sid) train the classifier only in their last stage, so their earlier epochs
  report ``kd_epoch = 0`` and never reach a rung; they are compared with other trials only
  after the same number of classifier epochs.
- A :class:`TableWriter` callback writes ``trials.parquet``/``epochs.parquet`` as trials
  finish; ``Tuner.restore`` resumes an interrupted sweep.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kdray import results
from kdray.models import TeacherInfo
from kdray.spec import Distribution, Spec
from kdray.train import RunResult, distill, ensure_teacher, selection_metric

logger = logging.getLogger("kdray")

OBJECTIVE = "objective"  # best dev metric so far over classifier-trained epochs; NaN before
RUNG_TIME = "kd_epoch"  # epochs in which the classifier was trained (ASHA's time axis)

# Ray on one machine: bind to loopback, no usage stats, no dashboard probing the network.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


# ---------------------------------------------------------------------------------------------
# Search space


def _encode(value: Any) -> Any:
    """Optuna categoricals take only scalars: explicit layer lists travel as JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _decode(dist: Distribution, value: Any) -> Any:
    if dist.kind in ("choice", "grid") and isinstance(value, str):
        if any(isinstance(v, (list, dict)) for v in dist.values):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
    return value


def _ordered(search: dict[str, Distribution]) -> list[str]:
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


def _condition_holds(dist: Distribution, values: dict[str, Any], base: dict[str, Any]) -> bool:
    for key, allowed in (dist.when or {}).items():
        current = values.get(key, base.get(key))
        if current not in allowed and _encode(current) not in [_encode(a) for a in allowed]:
            return False
    return True


def active_values(spec: Spec, sampled: dict[str, Any]) -> dict[str, Any]:
    """The sampled values whose conditions hold, decoded; the rest keep the spec's value."""
    base = spec.flat()
    out: dict[str, Any] = {}
    for key in _ordered(spec.search):
        if key not in sampled:
            continue
        dist = spec.search[key]
        if _condition_holds(dist, out, base):
            out[key] = _decode(dist, sampled[key])
    return out


class OptunaSpace:
    """A define-by-run space: Optuna asks for a parameter only when its condition holds.

    A module-level class, not a closure, so Ray can pickle the searcher into the experiment
    checkpoint that ``Tuner.restore`` reads back.
    """

    def __init__(self, spec: Spec) -> None:
        self.search = dict(spec.search)
        self.base = spec.flat()
        self.order = _ordered(self.search)

    def __call__(self, trial: Any) -> None:
        chosen: dict[str, Any] = {}
        for key in self.order:
            dist = self.search[key]
            if not _condition_holds(dist, chosen, self.base):
                continue
            kind, values = dist.kind, dist.values
            if kind in ("choice", "grid"):
                encoded = trial.suggest_categorical(key, [_encode(v) for v in values])
                chosen[key] = _decode(dist, encoded)
            elif kind == "uniform":
                chosen[key] = trial.suggest_float(key, values[0], values[1])
            elif kind == "loguniform":
                chosen[key] = trial.suggest_float(key, values[0], values[1], log=True)
            else:
                chosen[key] = trial.suggest_int(key, values[0], values[1])


def ray_space(spec: Spec) -> dict[str, Any]:
    """The same space for Ray's own variant generator (searcher: grid): grid/choice keys are
    crossed as a grid, ranges sampled; conditions are applied when the trial starts."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, dist in spec.search.items():
        values = dist.values
        if dist.kind in ("choice", "grid"):
            space[key] = tune.grid_search([_encode(v) for v in values])
        elif dist.kind == "uniform":
            space[key] = tune.uniform(*values)
        elif dist.kind == "loguniform":
            space[key] = tune.loguniform(*values)
        else:
            space[key] = tune.randint(values[0], values[1] + 1)
    return space


def make_searcher(spec: Spec, metric: str = OBJECTIVE) -> Any:
    """Optuna (TPE, random, CMA-ES, QMC) over the define-by-run space, or None for grid."""
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
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
    }
    points = [
        {k: _encode(v) for k, v in point.items() if k in spec.search}
        for point in spec.tune.points_to_evaluate
    ]
    searcher = OptunaSearch(
        space=OptunaSpace(spec),
        metric=metric,
        mode=spec.tune.mode,
        sampler=samplers[kind](),
        points_to_evaluate=points or None,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=spec.tune.max_concurrent)


def make_scheduler(spec: Spec, metric: str = OBJECTIVE) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    asha = spec.tune.scheduler.asha
    if asha is None:
        return FIFOScheduler()
    epochs = spec.search.get("train.epochs")
    max_t = max(epochs.values) if epochs is not None else spec.train.epochs
    return ASHAScheduler(
        time_attr=RUNG_TIME,
        metric=metric,
        mode=spec.tune.mode,
        max_t=max(int(max_t), asha.grace_period),
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
    )


# ---------------------------------------------------------------------------------------------
# The trainable


def trial_spec(base: Spec, config: dict[str, Any]) -> tuple[Spec, dict[str, Any]]:
    """The spec one trial runs, and the parameter values that were active for it."""
    if "ablation" in config:
        trial = config["ablation"]
        values = {**trial["values"], "train.seed": trial["seed"]}
        return base.with_values(values), values
    sampled = {k: v for k, v in config.items() if k in base.search}
    values = active_values(base, sampled)
    return base.with_values(values), values


def distill_trainable(config: dict[str, Any], spec_json: dict[str, Any]) -> None:
    """One Ray Tune trial: resolve its spec, resume from a checkpoint if Ray gives one, run."""
    import ray
    from ray import tune

    base = Spec.model_validate(spec_json)
    spec, _ = trial_spec(base, config)
    if spec.teacher.checkpoint:
        spec = spec.with_values(
            {"teacher.checkpoint": fetch_teacher(spec.teacher.checkpoint, spec)}
        )
    metric = selection_metric(spec)
    node = ray.get_runtime_context().get_node_id()
    started = time.time()

    checkpoint = tune.get_checkpoint()
    resume_dir: str | None = None
    if checkpoint is not None:
        resume_dir = tempfile.mkdtemp(prefix="kdray-resume-")
        checkpoint.to_directory(resume_dir)

    def report(record: dict[str, Any], save: Callable[[str | Path], None]) -> None:
        # Each record carries the run's best so far (classifier-trained epochs only).
        metrics = {
            **record,
            RUNG_TIME: record["classifier_epochs"],
            OBJECTIVE: record.get(f"best.dev.{metric}", math.nan),
            "node_id": node,
            "status": "running",
        }
        with tempfile.TemporaryDirectory(prefix="kdray-ckpt-") as folder:
            saving = time.perf_counter()
            save(folder)
            # what a resumable trial costs over a direct run, per epoch (Ray then copies it)
            metrics["checkpoint_seconds"] = time.perf_counter() - saving
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    result = distill(spec, report=report, resume_from=resume_dir)
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)
    if result.status != "ok" or not result.records:
        # Diverged or raised inside the loop: record it and end the trial normally (a retry
        # would fail the same way); a lost worker is retried by Ray from the checkpoint.
        tune.report(
            {
                "status": result.status,
                "error": result.error,
                "best_epoch": result.best_epoch,
                **{f"best.dev.{k}": v for k, v in result.best_metrics.items()},
                "student_params": result.student_params,
                "teacher_params": result.teacher_params,
                "wall_time_trial": time.time() - started,
                "node_id": node,
                "final": True,
                OBJECTIVE: math.nan,
                RUNG_TIME: 0,
            }
        )


# ---------------------------------------------------------------------------------------------
# Tables


class TableWriter:
    """A Tune callback that keeps trials.parquet and epochs.parquet up to date as trials
    report and finish; rows are keyed by trial id (and epoch), so a resumed sweep never
    duplicates them."""

    def __init__(self, spec: Spec, out_dir: Path, teacher: Any) -> None:
        from ray.tune import Callback

        class _Callback(Callback):
            def on_trial_result(cb, iteration: int, trials: list, trial: Any, result: dict) -> None:  # noqa: N805
                self.on_result(trial, result)

            def on_trial_complete(
                cb, iteration: int, trials: list, trial: Any, **info: Any
            ) -> None:  # noqa: N805
                self.on_end(trial, error=None)

            def on_trial_error(cb, iteration: int, trials: list, trial: Any, **info: Any) -> None:  # noqa: N805
                self.on_end(trial, error=_error_text(trial))

            def on_experiment_end(cb, trials: list, **info: Any) -> None:  # noqa: N805
                self.flush(trials)

        self.callback = _Callback()
        self.spec = spec
        self.out_dir = out_dir
        self.teacher = teacher
        self._reset()

    def _reset(self) -> None:
        self.epochs: dict[tuple[str, int], dict[str, Any]] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.cka: dict[str, list[dict[str, Any]]] = {}
        self._loaded = False

    def __getstate__(self) -> dict[str, Any]:
        # Tuner.restore brings this writer back from the pickled run config: it must then
        # read the tables as they are on disk, not carry rows from when it was pickled.
        return {k: self.__dict__[k] for k in ("callback", "spec", "out_dir", "teacher")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def _load_existing(self) -> None:
        """Rows already written (a resumed sweep) are kept; new rows replace them by key."""
        if self._loaded:
            return
        self._loaded = True
        trials_file = self.out_dir / results.TRIALS_FILE
        epochs_file = self.out_dir / results.EPOCHS_FILE
        if trials_file.exists():
            for row in pd.read_parquet(trials_file).to_dict("records"):
                self.rows[row["trial_id"]] = row
        cka_file = self.out_dir / results.CKA_FILE
        if cka_file.exists():
            for row in pd.read_parquet(cka_file).to_dict("records"):
                self.cka.setdefault(row["trial_id"], []).append(row)
        if epochs_file.exists():
            for row in pd.read_parquet(epochs_file).to_dict("records"):
                if "epoch" in row and row.get("trial_id") is not None:
                    self.epochs[(row["trial_id"], int(row["epoch"]))] = row

    def on_result(self, trial: Any, result: dict[str, Any]) -> None:
        self._load_existing()
        self.last[trial.trial_id] = {**self.last.get(trial.trial_id, {}), **result}
        if isinstance(result.get("diag.cka_matrix"), str):
            matrix = results.cka_from_matrix(result["diag.cka_matrix"])
            self.cka[trial.trial_id] = results.cka_rows(self.spec.name, trial.trial_id, matrix)
        if "epoch" in result and not result.get("final"):
            keep = {k: v for k, v in result.items() if _epoch_column(k)}
            self.epochs[(trial.trial_id, int(result["epoch"]))] = {
                "name": self.spec.name,
                "trial_id": trial.trial_id,
                **keep,
            }

    def on_end(self, trial: Any, error: str | None) -> None:
        self._load_existing()
        self.rows[trial.trial_id] = self.trial_row(trial, error)
        self.write()

    def flush(self, trials: list) -> None:
        """At the end (or on Ctrl-C): every trial gets a row, finished or not."""
        self._load_existing()
        for trial in trials:
            row = self.rows.get(trial.trial_id)
            if row is None or row["status"] in ("running", "pending", "interrupted"):
                error = _error_text(trial) if trial.status == "ERROR" else None
                self.rows[trial.trial_id] = self.trial_row(trial, error, ended=False)
        self.write()

    def trial_row(self, trial: Any, error: str | None, ended: bool = True) -> dict[str, Any]:
        """A trials-table row from what the trial reported. ``ended``: Tune says it is over
        (finished, stopped by the scheduler or failed), rather than cut off by an interrupt."""
        spec, values = trial_spec(self.spec, trial.config)
        last = self.last.get(trial.trial_id, {})
        records = sorted(
            (r for (tid, _), r in self.epochs.items() if tid == trial.trial_id),
            key=lambda r: r["epoch"],
        )
        result = RunResult(status=last.get("status", "ok"), metric=selection_metric(spec))
        result.records = records
        result.epochs_run = len(records)
        result.best_metrics = {
            k.removeprefix("best.dev."): v for k, v in last.items() if k.startswith("best.dev.")
        }
        if records:
            result.final_metrics = {
                k.removeprefix("dev."): v for k, v in records[-1].items() if k.startswith("dev.")
            }
        result.best_epoch = _int_or_none(last.get("best_epoch"))
        seconds = sum(float(r.get("train_seconds", 0.0)) for r in records)
        examples = sum(int(r.get("train_examples", 0)) for r in records)
        result.examples_per_s = examples / seconds if seconds else 0.0
        result.wall_time = float(last.get("wall_time_trial") or last.get("time_total_s") or 0.0)
        result.student_params = int(last.get("student_params") or 0)
        result.teacher_params = int(last.get("teacher_params") or 0)
        result.teacher = self.teacher
        result.diagnostics = {
            k.removeprefix("diag."): v
            for k, v in last.items()
            if k.startswith("diag.") and k != "diag.cka_matrix"
        }
        status = last.get("status", "running")
        done = records[-1]["epoch"] if records else 0
        if error is not None:
            status, result.error = "error", error
        elif status not in ("running", "ok"):  # diverged or failed inside the run
            result.error = last.get("error")
        elif done >= spec.train.epochs:
            status = "ok"
        elif ended:
            status = "pruned"  # stopped early by the scheduler
        else:
            status = "interrupted" if records else "pending"
        result.status = status
        extra = {f"param.{k}": v for k, v in values.items()}
        if "ablation" in trial.config:
            ablation = trial.config["ablation"]
            extra = {
                "cell": ablation["cell"],
                "seed": ablation["seed"],
                "source": ablation["source"],
            }
        extra["node_id"] = last.get("node_id")
        extra["num_failures"] = getattr(trial, "num_failures", 0)
        return results.trial_row(spec, result, trial_id=trial.trial_id, extra=extra)

    def write(self) -> None:
        rows = sorted(self.rows.values(), key=lambda r: str(r["trial_id"]))
        cka = [row for _, trial_rows in sorted(self.cka.items()) for row in trial_rows]
        if cka:
            results.write_table(cka, self.out_dir / results.CKA_FILE)
        epochs = sorted(self.epochs.values(), key=lambda r: (str(r["trial_id"]), r["epoch"]))
        results.write_table(rows, self.out_dir / results.TRIALS_FILE)
        if epochs:
            results.write_table(epochs, self.out_dir / results.EPOCHS_FILE)


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
    "node_id",
}


def _epoch_column(key: str) -> bool:
    return key not in _RAY_KEYS and not key.startswith("config") and results.is_epoch_field(key)


def _int_or_none(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text()[-4000:]
    return "trial failed (no error file)"


# ---------------------------------------------------------------------------------------------
# Ray start-up, teacher, sweep


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray: an existing cluster when ``address`` is given, else an embedded local
    instance bound to 127.0.0.1 with no dashboard. Returns True when kdray started Ray."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
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


def _teacher_task(spec_json: dict[str, Any], target: str) -> dict[str, Any]:
    """Runs as a Ray task: fine-tune (or reuse) the teacher and copy it into the storage."""
    import pyarrow.fs as pafs

    spec = Spec.model_validate(spec_json)
    info = ensure_teacher(spec)
    fs, path = pafs.FileSystem.from_uri(_as_uri(target))
    fs.create_dir(path, recursive=True)
    pafs.copy_files(info.path, path, destination_filesystem=fs)
    return {"id": info.id, "dev_metrics": info.dev_metrics, "settings": info.settings}


def cache_variants(spec: Spec, extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every (layer_map, student.layers, attention rows) a trial of this experiment can run
    with teacher-output caching on, from the search space, the ablation cells and the spec."""
    import itertools

    def candidates(key: str) -> list[Any]:
        values = [spec.flat()[key]]
        dist = spec.search.get(key)
        if dist is not None and dist.kind in ("choice", "grid"):
            values += list(dist.values)
        for cell in extra or []:
            if key in cell:
                values.append(cell[key])
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


def _teacher_outputs_task(spec_json: dict[str, Any], variants: list[dict], root: str) -> int:
    """Runs as a Ray task: build the teacher-output caches the trials will read."""
    from kdray import models
    from kdray.train import cached_teacher_factory, pick_device, prepare_data

    spec = Spec.model_validate(spec_json)
    info = ensure_teacher(spec)
    prepared = prepare_data(spec, info.path)
    teacher_model = models.load_classifier(info.path, prepared.task.num_labels)
    device = pick_device(spec.train.device)
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
        if marker in built:
            continue
        factory = cached_teacher_factory(variant_spec, layer_map, info, root=root)
        if factory is not None:
            factory(prepared, teacher_model, device)
            built.add(marker)
    return len(built)


def _as_uri(path: str) -> str:
    return path if "://" in path else Path(path).resolve().as_uri()


def fetch_teacher(location: str, spec: Spec) -> str:
    """A local folder holding the sweep's teacher (downloaded once per node from a URI)."""
    if "://" not in location or location.startswith("file://"):
        return location.removeprefix("file://")
    import pyarrow.fs as pafs

    from kdray.models import cache_root

    local = cache_root(spec.data.cache_dir) / "sweep-teachers" / Path(location).name
    if not (local / "teacher.json").exists():
        fs, path = pafs.FileSystem.from_uri(location)
        local.parent.mkdir(parents=True, exist_ok=True)
        # beside the target, so the final rename never crosses filesystems
        tmp = Path(tempfile.mkdtemp(dir=local.parent))
        pafs.copy_files(path, str(tmp), source_filesystem=fs)
        os.replace(tmp, local)
    return str(local)


@dataclass
class SweepResult:
    trials: pd.DataFrame
    epochs: pd.DataFrame
    out_dir: Path
    storage: str
    best: dict[str, Any] | None


@dataclass
class Plan:
    """Which trials an experiment runs: a searched space, or an explicit grid (ablations)."""

    param_space: dict[str, Any]
    searcher: Any
    scheduler: Any
    num_samples: int
    max_concurrent: int | None


def run_sweep(
    spec: Spec,
    *,
    address: str | None = None,
    storage: str | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: list[Any] | None = None,
    trainable: Callable[..., None] | None = None,
) -> SweepResult:
    """Run (or resume) the spec's search as a Ray Tune experiment and write the tables."""

    def plan(base: Spec) -> Plan:
        searcher = make_searcher(base)
        return Plan(
            param_space=ray_space(base) if searcher is None else {},
            searcher=searcher,
            scheduler=make_scheduler(base),
            num_samples=base.tune.num_samples,
            # the Optuna searcher is wrapped in a ConcurrencyLimiter already
            max_concurrent=base.tune.max_concurrent if searcher is None else None,
        )

    return run_experiment(
        spec,
        plan,
        name=spec.name,
        address=address,
        storage=storage,
        out_dir=out_dir,
        resume=resume,
        callbacks=callbacks,
        trainable=trainable,
    )


def run_experiment(
    spec: Spec,
    plan: Callable[[Spec], Plan],
    *,
    name: str,
    plan_values: list[dict[str, Any]] | None = None,
    address: str | None = None,
    storage: str | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: list[Any] | None = None,
    trainable: Callable[..., None] | None = None,
) -> SweepResult:
    """Teacher first (one Ray task), then the trials as one resumable Tune experiment."""
    import ray
    from ray import tune

    out = Path(out_dir) if out_dir else Path("results") / name
    store = storage or str((out / "ray").resolve())
    out.mkdir(parents=True, exist_ok=True)
    init_ray(address)
    experiment = f"{store.rstrip('/')}/{name}"

    teacher_location = f"{store.rstrip('/')}/{name}-teacher"
    resources = spec.tune.resources
    task = ray.remote(num_cpus=resources.cpu, num_gpus=resources.gpu)(_teacher_task)
    logger.info("teacher: fine-tuning %s on %s, or reusing it", spec.teacher.model, spec.task)
    started = time.time()
    teacher_meta = ray.get(task.remote(spec.model_dump(mode="json"), teacher_location))
    logger.info(
        "teacher %s ready in %.0fs: dev %s",
        teacher_meta["id"],
        time.time() - started,
        ", ".join(f"{k} {v:.4f}" for k, v in teacher_meta["dev_metrics"].items()),
    )
    teacher = TeacherInfo(
        path=teacher_location,
        id=teacher_meta["id"],
        dev_metrics=teacher_meta["dev_metrics"],
        settings=teacher_meta["settings"],
    )
    trial_base = spec.with_values({"teacher.checkpoint": teacher_location})
    variants = cache_variants(trial_base, plan_values)
    if variants and "://" not in store:
        # Teacher outputs for every layer set a trial can ask for, built once by one task;
        # with a remote storage URI each node builds (and locks) its own local copy instead.
        outputs_root = f"{store.rstrip('/')}/{name}-teacher-outputs"
        build = ray.remote(num_cpus=resources.cpu, num_gpus=resources.gpu)(_teacher_outputs_task)
        logger.info("teacher outputs: caching them for %d layer set(s)", len(variants))
        started = time.time()
        ray.get(
            build.remote(trial_base.model_dump(mode="json", by_alias=True), variants, outputs_root)
        )
        logger.info("teacher outputs ready in %.0fs", time.time() - started)
        trial_base = trial_base.with_values({"teacher.cache.dir": outputs_root})
    spec_json = trial_base.model_dump(mode="json", by_alias=True)
    fn = tune.with_parameters(trainable or distill_trainable, spec_json=spec_json)
    fn = tune.with_resources(fn, {"cpu": resources.cpu, "gpu": resources.gpu})
    writer = TableWriter(trial_base, out, teacher)
    run_config = tune.RunConfig(
        name=name,
        storage_path=store,
        callbacks=[writer.callback, *(callbacks or [])],
        failure_config=tune.FailureConfig(max_failures=spec.tune.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.tune.checkpoint_keep),
        verbose=0,
    )
    if resume:
        if not tune.Tuner.can_restore(experiment):
            raise FileNotFoundError(f"nothing to resume at {experiment}")
        tuner = tune.Tuner.restore(
            experiment, trainable=fn, resume_unfinished=True, resume_errored=True
        )
    else:
        chosen = plan(trial_base)
        tuner = tune.Tuner(
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
    tuner.fit()
    trials, epochs = results.load(out)
    return SweepResult(
        trials=trials,
        epochs=epochs,
        out_dir=out,
        storage=experiment,
        best=best_trial(trials, spec),
    )


# ---------------------------------------------------------------------------------------------
# Ablations: every cell of a grid once per seed, no pruning, paired by seed


def cell_name(values: dict[str, Any]) -> str:
    return ",".join(f"{k}={_encode(v)}" for k, v in values.items())


def ablation_cells(spec: Spec, from_sweep: str | Path | None = None) -> list[dict[str, Any]]:
    """The grid of the ``ablation.axes``; each cell starts from the spec's settings or, with a
    sweep, from the best trial of the same algorithm there (its sampled ``param.*`` values)."""
    if spec.ablation is None or not spec.ablation.axes:
        raise ValueError("the spec has no ablation.axes: nothing to ablate")
    import itertools

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
                for key, value in best.items():
                    setting = key.removeprefix("param.")
                    if key.startswith("param.") and setting not in axes and _present(value):
                        dist = spec.search.get(setting)
                        base[setting] = _decode(dist, value) if dist is not None else value
        cells.append({"cell": cell_name(values), "values": {**base, **values}, "source": source})
    for cell in cells:
        spec.with_values(cell["values"])  # every cell must be a valid spec before Ray starts
    return cells


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _best_matching(trials: pd.DataFrame, values: dict[str, Any], spec: Spec) -> dict | None:
    """The best ok sweep trial with the cell's algorithm (the axis a sweep tunes per)."""
    rows = trials[trials["status"] == "ok"]
    algorithm = values.get("distill.algorithm")
    if algorithm is not None and "distill.algorithm" in rows:
        rows = rows[rows["distill.algorithm"] == algorithm]
    return best_trial(rows, spec) if not rows.empty else None


def run_ablation(
    spec: Spec,
    *,
    from_sweep: str | Path | None = None,
    seeds: list[int] | None = None,
    address: str | None = None,
    storage: str | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: list[Any] | None = None,
) -> SweepResult:
    """Every cell x seed as one Ray Tune trial (FIFO, nothing pruned)."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    cells = ablation_cells(spec, from_sweep)
    run_seeds = seeds or (spec.ablation.seeds if spec.ablation else [spec.train.seed])
    trials = [{**cell, "seed": seed} for cell in cells for seed in run_seeds]

    def plan(base: Spec) -> Plan:
        return Plan(
            param_space={"ablation": tune.grid_search(trials)},
            searcher=None,
            scheduler=FIFOScheduler(),
            num_samples=1,
            max_concurrent=base.tune.max_concurrent,
        )

    name = f"{spec.name}-ablation"
    return run_experiment(
        spec,
        plan,
        name=name,
        plan_values=[cell["values"] for cell in cells],
        address=address,
        storage=storage,
        out_dir=out_dir or Path("results") / name,
        resume=resume,
        callbacks=callbacks,
    )


def best_trial(trials: pd.DataFrame, spec: Spec) -> dict[str, Any] | None:
    ok = trials[trials["status"] == "ok"] if "status" in trials else trials
    if ok.empty:
        return None
    metric = ok["metric"].iloc[0]
    column = f"best.dev.{metric}"
    if column not in ok:
        return None
    ok = ok.dropna(subset=[column])
    if ok.empty:
        return None
    index = ok[column].idxmax() if spec.tune.mode == "max" else ok[column].idxmin()
    return ok.loc[index].to_dict()
