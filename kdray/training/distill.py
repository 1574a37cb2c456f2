"""One distillation run: ``distill(spec) -> RunResult``.

:func:`setup` builds a :class:`Run` (data, teacher, student, layer map, stage schedule,
optimisation); :func:`distill` loops over its epochs, each batch through :class:`DistillStep`
(which calls the engine's one training step), and records every epoch. A ``Run`` saves and
restores itself as a checkpoint of plain tensors and data (``torch.load(weights_only=True)``).
No Ray in here: a Ray Tune trainable wraps :func:`distill` through its ``report`` callback,
which receives every epoch's record and a function that writes a resumable checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from kdray import __version__
from kdray.analysis.results import RunResult
from kdray.infra import faults
from kdray.infra.progress import NoProgress, ProgressHook
from kdray.infra.store import atomic_dir
from kdray.method import algorithms, losses
from kdray.method.schedule import Stage, StageSchedule
from kdray.spec import Spec, stage_schedule, term_weights
from kdray.training import data, engine, models
from kdray.training.teacher import TeacherInfo, ensure_teacher
from kdray.training.teacher_outputs import (
    OutputsFactory,
    TeacherBatch,
    TeacherOutputs,
    outputs_factory,
)

__all__ = [
    "STATE_FILE",
    "DistillStep",
    "Run",
    "distill",
    "selection_metric",
    "setup",
    "stage_losses",
]

STATE_FILE = "state.pt"
STUDENT_DIR = "student"  # the best student of a finished run, in its output or checkpoint folder
#: Bumped when the checkpoint's content changes; a checkpoint of another version is refused.
STATE_VERSION = 2

SaveFn = Callable[[str | Path], None]
ReportFn = Callable[[dict[str, Any], SaveFn | None], None]


def selection_metric(spec: Spec) -> str:
    """The dev metric that picks the best epoch (and trial): tune.metric, the first of
    tune.objectives, or the task's main."""
    task = data.task_of(spec)
    first = spec.tune.objectives[0].metric if spec.tune.objectives else None
    metric = (spec.tune.metric or first or task.main_metric).removeprefix("dev.")
    if metric not in task.metrics:
        raise ValueError(
            f"tune.metric {metric!r} is not a dev metric of {task.name} "
            f"(allowed: {', '.join(task.metrics)})"
        )
    return metric


# ---------------------------------------------------------------------------------------------
# The loss terms of a stage and the step


def stage_losses(
    student_out: Any,
    teacher: TeacherBatch | None,
    batch: dict[str, torch.Tensor],
    stage: Stage,
    layer_map: list[int],
    weights: dict[str, float],
    projections: models.Projections,
    temperature: float,
    rows: str,
) -> dict[str, torch.Tensor]:
    """The named loss terms of one stage and their weighted total (key ``total``).

    Only the stage's active terms (:func:`kdray.method.algorithms.active_terms`) are computed.
    Per-layer internal terms are summed over the stage's layers (the stacked objective of SID);
    ``attention.L<i>``/``hidden.L<i>`` keep each student layer's value for the records.
    """
    active = algorithms.active_terms(stage, weights)
    if teacher is None and active - {"hard"}:
        raise ValueError(f"stage '{stage.name}' needs teacher outputs")
    terms: dict[str, torch.Tensor] = {}
    logits = student_out.logits.float()
    if "hard" in active:
        terms["hard"] = losses.hard_label_loss(logits, batch["labels"])
    if "soft" in active:
        terms["soft"] = losses.soft_label_loss(logits, teacher.logits, temperature)
    mask = batch["attention_mask"]
    for layer in stage.internal_layers:
        t_layer = layer_map[layer - 1]
        if "attention" in active:
            terms[f"attention.L{layer}"] = losses.attention_kl_loss(
                student_out.attentions[layer - 1].float(), teacher.attentions[t_layer], mask, rows
            )
        if "hidden" in active:
            s_cls = projections(student_out.hidden_states[layer][:, 0].float(), layer)
            terms[f"hidden.L{layer}"] = losses.hidden_cosine_loss(s_cls, teacher.hidden[t_layer])
    for name in algorithms.INTERNAL_TERMS:
        parts = [v for k, v in terms.items() if k.startswith(name + ".L")]
        if parts:
            terms[name] = torch.stack(parts).sum()
    total = sum(weights[name] * terms[name] for name in algorithms.LOSS_TERMS if name in terms)
    terms["total"] = total if isinstance(total, torch.Tensor) else torch.zeros(())
    return terms


@dataclass
class DistillStep:
    """One distillation step on a batch in a stage: the teacher outputs the stage's active terms
    need, the student forward (attentions and hidden states only when used), the loss terms,
    and the engine's :func:`~kdray.training.engine.train_step`. The benchmarks time exactly this."""

    student: nn.Module
    projections: models.Projections
    outputs: TeacherOutputs
    layer_map: list[int]
    weights: dict[str, float]
    temperature: float
    rows: str
    opt: engine.Optimization

    def __call__(self, batch: dict[str, torch.Tensor], stage: Stage) -> dict[str, torch.Tensor]:
        active = algorithms.active_terms(stage, self.weights)
        internal = bool(active & set(algorithms.INTERNAL_TERMS))
        layers = tuple(self.layer_map[i - 1] for i in stage.internal_layers) if internal else ()
        # stages on hard labels only (algorithm none) never ask the teacher
        t_out = self.outputs(batch, layers) if "soft" in active or internal else None
        return engine.train_step(
            self.opt,
            lambda: self.student(
                **engine.model_inputs(batch),
                output_attentions="attention" in active,
                output_hidden_states="hidden" in active,
            ),
            lambda s_out: stage_losses(
                s_out,
                t_out,
                batch,
                stage,
                self.layer_map,
                self.weights,
                self.projections,
                self.temperature,
                self.rows,
            ),  # fmt: skip
        )


# ---------------------------------------------------------------------------------------------
# A run and its checkpoint


@dataclass
class Run:
    """Everything a distillation run trains with, and its progress so far (what a checkpoint
    holds: the student, optimisation, stage schedule, records, the best epoch and RNGs)."""

    spec: Spec
    prepared: data.Prepared
    teacher: TeacherInfo
    teacher_model: nn.Module
    student: nn.Module
    projections: models.Projections
    layer_map: list[int]
    schedule: StageSchedule
    opt: engine.Optimization
    step: DistillStep
    dev_loader: DataLoader
    metric: str
    records: list[dict[str, Any]] = field(default_factory=list)
    best_value: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.opt.device

    def enter_stage(self, stage: Stage) -> None:
        """Freeze the student parts the stage freezes, train the rest (training mode on)."""
        for index, part in models.encoder_parts(self.student).items():
            for param in part.parameters():
                param.requires_grad_(index not in stage.frozen)
        self.student.train()

    def save(self, folder: str | Path) -> None:
        """Write a resumable checkpoint into ``folder``. When the epoch just saved is the best
        one, the best weights are the student's own and are stored once.

        A finished run's checkpoint is light: its records, best epoch and metrics, and the best
        student as a Hugging Face folder (what a sweep keeps beside its tables, even when the
        scheduler stops the trial right after), without the student's last weights, optimiser
        moments or random state, which nothing can train with any more. A quarter of the bytes
        of a full checkpoint, written once by kdray and copied once more by Ray Tune.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        finished = self.schedule.finished
        state = {
            "version": STATE_VERSION,
            "kdray_version": __version__,
            "schedule": self.schedule.state_dict(),
            "records": self.records,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            **(self._finished_state() if finished else self._training_state()),
        }
        torch.save(state, folder / STATE_FILE)
        faults.point("distill.checkpoint", folder)
        if finished:
            self.save_student(folder / STUDENT_DIR)

    def _training_state(self) -> dict[str, Any]:
        """What an unfinished run's checkpoint adds: everything training goes on with."""
        best_is_current = (
            self.best_state is not None
            and bool(self.records)
            and self.records[-1]["epoch"] == self.best_epoch
        )
        return {
            "student": self.student.state_dict(),
            "projections": self.projections.state_dict(),
            **self.opt.state_dict(),
            "best_state": None if best_is_current else self.best_state,
            "best_is_current": best_is_current,
            "rng": engine.rng_state(),
        }

    def _finished_state(self) -> dict[str, Any]:
        """What a finished run's checkpoint adds: the best weights only when no student folder
        is written beside it (``train.save_student`` off)."""
        return {
            "finished": True,
            "best_state": None if self.spec.train.save_student else self.best_state,
        }

    def save_student(self, target: str | Path) -> Path | None:
        """The best student (safetensors, config, tokenizer) as a Hugging Face folder, or None
        when ``train.save_student`` is off or no epoch trained the classifier."""
        if not self.spec.train.save_student or self.best_state is None:
            return None
        target = Path(target)
        with faults.naming(target), atomic_dir(target) as tmp:  # no half student if disk fills
            # a copy: save_pretrained removes entries from the mapping it is given
            self.student.save_pretrained(tmp, state_dict=dict(self.best_state))
            self.prepared.tokenizer.save_pretrained(tmp)
        return target

    def restore(self, folder: str | Path) -> None:
        """Continue from a checkpoint :meth:`save` wrote. Only tensors and plain data are read
        (``weights_only=True``): a checkpoint that holds anything else is refused, unrun."""
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            raise ValueError(f"cannot resume from {path}: no such file")
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as error:  # noqa: BLE001 - unpickling refused or file unreadable
            raise ValueError(
                f"cannot resume from {path}: not a kdray checkpoint (truncated, corrupted, or "
                f"holding objects other than tensors and plain data, which kdray never "
                f"unpickles: {_load_reason(error)}); start the run again without resuming"
            ) from None
        if not isinstance(state, dict):
            raise ValueError(
                f"cannot resume from {path}: not a kdray checkpoint (it holds a "
                f"{type(state).__name__}, not a dict); start the run again without resuming"
            )
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"{path} is a checkpoint of format {state.get('version')!r}, this kdray reads "
                f"format {STATE_VERSION}: start the run again without resuming"
            )
        finished = bool(state.get("finished"))
        if not finished:
            self.student.load_state_dict(state["student"])
            self.projections.load_state_dict(state["projections"])
            self.opt.load_state_dict(state)
        self.schedule.load_state_dict(state["schedule"])
        self.records = state["records"]
        self.best_value, self.best_state = state["best_value"], state["best_state"]
        self.best_epoch, self.best_metrics = state["best_epoch"], state["best_metrics"]
        if finished:
            self._best_from_folder(Path(folder) / STUDENT_DIR / "model.safetensors")
            return
        if state["best_is_current"]:
            self.best_state = _cpu_copy(self.student)
        engine.set_rng_state(state["rng"])

    def _best_from_folder(self, weights: Path) -> None:
        """A finished run's best student, read back from the student folder of its light
        checkpoint (safetensors only) for a resumed run to end with."""
        if self.best_state is None and weights.is_file():
            from safetensors.torch import load_file

            self.student.load_state_dict(load_file(weights))
            self.best_state = _cpu_copy(self.student)


def _load_reason(error: Exception, limit: int = 120) -> str:
    """The gist of a ``torch.load`` failure in one short line. Torch's own text is long and
    suggests ``weights_only=False``, which is exactly what must never be done here."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    line = next((part.strip() for part in text.splitlines() if part.strip()), type(error).__name__)
    line = line.split(". ", 1)[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def setup(spec: Spec, progress: ProgressHook, outputs: OutputsFactory | None = None) -> Run:
    """Data, teacher (fine-tuned or from the cache), student, layer map, schedule, optimisation
    and the step, as the spec says. A bad ``tune.metric`` or a schedule whose stages optimise
    nothing fails here, before any training."""
    device = engine.pick_device(spec.train.device)
    metric = selection_metric(spec)
    # Read and tokenise once: a fine-tuned teacher keeps its base model's tokenizer.
    prepared = data.prepare(spec, spec.teacher.checkpoint or spec.teacher.model)
    teacher = ensure_teacher(spec, prepared, progress=progress)
    task = prepared.task
    teacher_model = models.load_classifier(teacher.path, task.num_labels)
    engine.seed_everything(spec.train.seed)
    s = spec.student
    student = models.build_student(
        teacher_model,
        layers=s.layers,
        init=s.init,
        init_layers=s.init_layers,
        num_labels=task.num_labels,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
    ).to(device)
    if spec.train.compile:
        student.compile()  # in place: state_dict keys, checkpoints and exports are unchanged
    layer_map = models.resolve_layer_map(
        spec.distill.layer_map, s.layers, models.num_layers(teacher_model)
    )
    projections = models.Projections(
        student.config.hidden_size, teacher_model.config.hidden_size, s.layers
    ).to(device)
    make_outputs = outputs or outputs_factory(spec, layer_map, teacher)
    teacher_outputs = make_outputs(prepared, teacher_model, device)
    weights = term_weights(spec)
    schedule = stage_schedule(spec)
    algorithms.check_weights(schedule.stages, weights)
    t = spec.train
    opt = engine.make_optimization(
        [student, projections],
        lr=t.lr,
        weight_decay=t.weight_decay,
        warmup=t.warmup,
        total_steps=math.ceil(len(prepared.train) / t.batch_size) * t.epochs,
        max_grad_norm=t.max_grad_norm,
        device=device,
        precision=t.precision,
    )
    losses_spec = spec.distill.losses
    step = DistillStep(
        student, projections, teacher_outputs, layer_map, weights,
        losses_spec.soft.temperature, losses_spec.attention.rows, opt,
    )  # fmt: skip
    pad = prepared.tokenizer.pad_token_id
    dev_loader = engine.make_loader(prepared.dev, t.eval_batch_size, pad)
    return Run(
        spec, prepared, teacher, teacher_model, student, projections, layer_map, schedule,
        opt, step, dev_loader, metric,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The loop


def distill(
    spec: Spec,
    report: ReportFn | None = None,
    *,
    resume_from: str | Path | None = None,
    output_dir: str | Path | None = None,
    progress: ProgressHook | None = None,
    teacher_outputs: OutputsFactory | None = None,
) -> RunResult:
    """Run one complete distillation as the spec says and return what it produced.

    ``report(record, save)`` is called after every epoch with the epoch's record and a function
    that writes a resumable checkpoint into a folder; ``resume_from`` is such a folder.
    ``output_dir``, when given and ``train.save_student`` is on, receives the best student.
    A loss that turns NaN/inf, or an epoch mean total loss over ``train.divergence_factor``
    times the first epoch's of its stage (that epoch's record kept), ends the run with status
    ``diverged``; an exception inside the
    loop ends it with status ``failed`` and the error text, and the epochs so far are kept.
    ``teacher_outputs`` replaces how the run gets its teacher outputs (tests, benchmarks).
    """
    spec, _ = data.resolve_max_seq_length(spec)  # ``auto`` as a number (the CLI did it already)
    threads = torch.get_num_threads()
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    try:
        started = time.perf_counter()
        progress = progress or NoProgress()
        run = setup(spec, progress, teacher_outputs)
        if resume_from is not None:
            run.restore(resume_from)
            if report is not None and run.records:
                # the restored epochs again: a crash right after they were first reported may
                # have kept them from the caller's tables (rows keyed by epoch: no duplicate);
                # only the last comes with a checkpoint (``save`` None: nothing new to save)
                for record in run.records[:-1]:
                    report(copy.deepcopy(record), None)
                report(copy.deepcopy(run.records[-1]), run.save)
        status, error = _train(run, report, progress)
        return _finish(run, status, error, output_dir, progress, started)
    finally:
        torch.set_num_threads(threads)  # train.threads is this run's, not the process's


def _train(run: Run, report: ReportFn | None, progress: ProgressHook) -> tuple[str, str | None]:
    """The epochs left in the schedule; returns the run's status and error text."""
    spec = run.spec
    steps_per_epoch = math.ceil(len(run.prepared.train) / spec.train.batch_size)
    remaining = spec.train.epochs - run.schedule.epoch
    progress.start(f"{spec.name} [{spec.distill.algorithm}]", steps_per_epoch * remaining)
    try:
        while not run.schedule.finished:
            epoch, stage = run.schedule.epoch + 1, run.schedule.stage
            try:
                sums, n_batches, n_examples, seconds = _train_epoch(run, epoch, stage, progress)
            except _EpochDiverged as diverged:
                return "diverged", f"{diverged.error} in epoch {epoch} (stage {stage.name})"
            record = _end_epoch(run, epoch, stage, sums, n_batches, n_examples, seconds)
            run.records.append(record)
            progress.log(_epoch_line(record, run.metric))
            if report is not None:
                report(copy.deepcopy(record), run.save)
            faults.point("distill.epoch", epoch)
            blown_up = _loss_blown_up(run.records, spec.train.divergence_factor)
            if blown_up:
                return "diverged", blown_up
    except Exception as error:  # noqa: BLE001 - a failed run is recorded, never lost
        text = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}"
        return ("oom" if faults.out_of_memory(text) else "failed"), text
    return "ok", None


def _loss_blown_up(records: list[dict[str, Any]], factor: float | None) -> str | None:
    """Why the last epoch counts as diverged, or None: its mean total loss is over ``factor``
    times that of the first epoch of the same stage. Per stage, because a staged algorithm's
    total changes meaning between stages (layer 1 only, then more layers, then soft labels)."""
    if factor is None or not records:
        return None
    last = records[-1]
    first = next(r for r in records if r["stage"] == last["stage"])
    loss, reference = last.get("loss.total"), first.get("loss.total")
    if loss is None or reference is None or reference <= 0 or loss <= factor * reference:
        return None
    return (
        f"loss blew up: epoch {last['epoch']} mean total loss {loss:.4g} is over "
        f"{factor:g} x {reference:.4g}, the mean total loss of epoch {first['epoch']} "
        f"(first epoch of stage {last['stage_name']}); train.divergence_factor={factor:g} "
        "(raise it, or null to count only NaN/inf losses)"
    )


class _EpochDiverged(Exception):
    """A step's loss was not finite: the epoch (and run) ends without a record."""

    def __init__(self, error: engine.DivergedError) -> None:
        super().__init__(str(error))
        self.error = error


def _train_epoch(
    run: Run, epoch: int, stage: Stage, progress: ProgressHook
) -> tuple[dict[str, float], int, int, float]:
    """One epoch of steps in ``stage``: summed loss terms, batches, examples and seconds."""
    run.enter_stage(stage)
    t = run.spec.train
    loader = engine.make_loader(
        run.prepared.train,
        t.batch_size,
        run.prepared.tokenizer.pad_token_id,
        shuffle_seed=t.seed * 1000 + epoch,
        group_by_length=t.group_by_length,
    )
    sums: dict[str, float] = {}
    n_batches = n_examples = 0
    started = time.perf_counter()
    for batch in loader:
        batch = engine.to_device(batch, run.device)
        try:
            terms = run.step(batch, stage)
        except engine.DivergedError as error:
            raise _EpochDiverged(error) from None
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        n_batches += 1
        n_examples += int(batch["labels"].shape[0])
        progress.advance(1, epoch=epoch, stage=stage.name, loss=float(terms["total"].detach()))
    return sums, n_batches, n_examples, time.perf_counter() - started


def _end_epoch(
    run: Run,
    epoch: int,
    stage: Stage,
    sums: dict[str, float],
    n_batches: int,
    n_examples: int,
    seconds: float,
) -> dict[str, Any]:
    """Evaluate, advance the schedule, keep the best epoch and build the epoch's record."""
    # Dev metrics mean something only once the classifier has been trained: the epochs of a
    # progressive or stacked algorithm's internal stages before that are not evaluated.
    metrics: dict[str, float] = {}
    eval_seconds = 0.0
    if stage.trains_classifier or run.schedule.classifier_epochs > 0:
        evaluating = time.perf_counter()
        metrics = engine.evaluate(
            run.student, run.dev_loader, run.prepared.task, run.device, run.opt.precision
        )
        eval_seconds = time.perf_counter() - evaluating
    means = {f"loss.{k}": v / max(1, n_batches) for k, v in sums.items()}
    record: dict[str, Any] = {
        "epoch": epoch,
        "stage": stage.index,
        "stage_name": stage.name,
        "lr": run.opt.lr,
        **means,
        **{f"dev.{k}": v for k, v in metrics.items()},
        "train_seconds": seconds,
        "train_examples": n_examples,
        "examples_per_s": n_examples / seconds if seconds > 0 else 0.0,
        "eval_seconds": eval_seconds,  # the dev evaluation, apart from the training steps
        # run-level, carried so a sweep's trial row has them (not in epochs.parquet)
        "student_params": models.count_parameters(run.student),
        "teacher_params": models.count_parameters(run.teacher_model),
        "precision": run.opt.precision,  # what ran (engine.precision_to_run), not only asked
    }
    run.schedule.end_epoch(means.get("loss.total", 0.0))
    record["classifier_epochs"] = run.schedule.classifier_epochs
    value = metrics.get(run.metric)
    if value is not None and _better(value, run.best_value, run.spec.tune.mode):
        run.best_value, run.best_epoch, run.best_metrics = value, epoch, metrics
        if run.spec.train.save_student:
            run.best_state = _cpu_copy(run.student)
    record["is_best"] = run.best_epoch == epoch
    record["best_epoch"] = run.best_epoch
    record.update({f"best.dev.{k}": v for k, v in run.best_metrics.items()})
    if run.schedule.finished and run.spec.train.diagnostics:
        # Measured before the last report so a sweep's trial carries them even when the
        # scheduler stops it right after that report.
        record.update(_diagnose(run))
    return record


def _better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def _diagnose(run: Run) -> dict[str, Any]:
    """Representation diagnostics of the best student (the current one if none was kept), as
    ``diag.*`` record fields (the CKA matrix as JSON)."""
    from kdray.method.diagnostics import representation_diagnostics

    model = run.student
    if run.best_state is not None:
        model = copy.deepcopy(run.student)
        model.load_state_dict(run.best_state)
    diag = representation_diagnostics(
        model,
        run.teacher_model.to(run.device),
        run.dev_loader,
        run.layer_map,
        run.device,
        rows=run.spec.distill.losses.attention.rows,
    )
    fields: dict[str, Any] = {f"diag.{k}": v for k, v in diag.to_columns().items()}
    fields["diag.cka_matrix"] = json.dumps(diag.cka.values.tolist())
    return fields


def _finish(
    run: Run,
    status: str,
    error: str | None,
    output_dir: str | Path | None,
    progress: ProgressHook,
    started: float,
) -> RunResult:
    """The run's result from its records; the best student saved into ``output_dir``."""
    result = RunResult.from_records(
        run.records,
        status=status,
        metric=run.metric,
        error=error,
        teacher=run.teacher,
        wall_time=time.perf_counter() - started,
        student_params=models.count_parameters(run.student),
        teacher_params=models.count_parameters(run.teacher_model),
    )
    if output_dir is not None:
        saved = run.save_student(Path(output_dir) / STUDENT_DIR)
        result.student_path = None if saved is None else str(saved)
    progress.finish(
        f"{result.status}: best dev {run.metric} "
        f"{result.best_metrics.get(run.metric, float('nan')):.4f} at epoch {result.best_epoch}"
    )
    return result


def _epoch_line(record: dict[str, Any], metric: str) -> str:
    losses_text = " ".join(
        f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss.") and ".L" not in k
    )
    best = " *" if record.get("is_best") else ""
    value = record.get(f"dev.{metric}")
    dev = (
        "dev not evaluated (no classifier trained yet)"
        if value is None
        else f"dev {metric} {value:.4f}{best}"
    )
    return (
        f"epoch {record['epoch']} [{record['stage_name']}] {losses_text} | {dev} | "
        f"{record['examples_per_s']:.0f} ex/s"
    )
