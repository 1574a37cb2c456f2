"""The one training loop: ``distill(spec) -> RunResult`` (and teacher fine-tuning on the same
engine). No Ray in here: a Ray Tune trainable wraps :func:`distill` through its ``report``
callback, which receives every epoch's record and a function that writes a resumable checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from kdray import __version__, data, losses, models
from kdray.schedule import Stage, StageSchedule
from kdray.spec import Spec, stage_schedule

STATE_FILE = "state.pt"


# ---------------------------------------------------------------------------------------------
# Results and hooks


@dataclass
class RunResult:
    """Everything one run produced; results.py turns it into table rows."""

    status: str  # ok | diverged | failed
    metric: str  # the selection metric (a dev metric name)
    best_metrics: dict[str, float] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)
    best_epoch: int | None = None
    epochs_run: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    wall_time: float = 0.0
    examples_per_s: float = 0.0
    teacher: models.TeacherInfo | None = None
    student_params: int = 0
    teacher_params: int = 0
    student_path: str | None = None
    error: str | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    cka: Any = None  # long DataFrame: student_layer, teacher_layer, cka (best student, dev set)


SaveFn = Callable[[str | Path], None]
ReportFn = Callable[[dict[str, Any], SaveFn], None]


class ProgressHook(Protocol):
    """What a front end (the CLI's progress bar) is told while a run goes on."""

    def start(self, description: str, total: int) -> None: ...
    def advance(self, steps: int = 1, **fields: Any) -> None: ...
    def log(self, message: str) -> None: ...
    def finish(self, summary: str) -> None: ...


class _NoProgress:
    def start(self, description: str, total: int) -> None: ...
    def advance(self, steps: int = 1, **fields: Any) -> None: ...
    def log(self, message: str) -> None: ...
    def finish(self, summary: str) -> None: ...


# ---------------------------------------------------------------------------------------------
# Engine pieces shared by teacher fine-tuning and distillation


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(name)


def make_optimizer(modules: list[nn.Module], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without decay on biases and LayerNorm weights, as in BERT fine-tuning."""
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def linear_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then linear decay to zero (the original BERT schedule)."""
    warmup_steps = int(total_steps * warmup)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_loader(
    split: Dataset, batch_size: int, pad_id: int, *, shuffle_seed: int | None = None
) -> DataLoader:
    """Shuffling uses its own generator seeded per epoch, so a resumed run sees the same order."""
    if shuffle_seed is None:
        sampler: Any = SequentialSampler(split)
    else:
        sampler = RandomSampler(split, generator=torch.Generator().manual_seed(shuffle_seed))
    return DataLoader(
        split,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=lambda batch: data.collate(batch, pad_id),
    )


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and gold labels over a whole split, in split order."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        batch = to_device(batch, device)
        logits.append(model(**model_inputs(batch)).logits.float().cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate(
    model: nn.Module, loader: DataLoader, task: data.GlueTask, device: torch.device
) -> dict[str, float]:
    logits, labels = predict(model, loader, device)
    return data.compute_metrics(task, logits.argmax(-1), labels)


def _autocast(device: torch.device, precision: str) -> Any:
    if device.type == "cpu" or precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Data and teacher preparation


@dataclass
class Prepared:
    """Data and tokenizer for one spec: read once, shared by the teacher and the run."""

    task: data.GlueTask
    tokenizer: Any
    train: data.TokenizedSplit
    dev: data.TokenizedSplit
    data_fingerprint: str


def _examples_fingerprint(*splits: list[data.Example]) -> str:
    digest = hashlib.sha256()
    for split in splits:
        for ex in split:
            digest.update(json.dumps([ex.text_a, ex.text_b, ex.label]).encode())
        digest.update(b"|")
    return digest.hexdigest()[:20]


def prepare_data(spec: Spec, tokenizer_name: str) -> Prepared:
    task = data.get_task(spec.task)
    train_ex = data.load_examples(task, "train", spec.data.dir)
    if spec.train.max_train_examples:
        train_ex = train_ex[: spec.train.max_train_examples]
    dev_ex = data.load_examples(task, "dev", spec.data.dir)
    tokenizer = models.load_tokenizer(tokenizer_name)
    cache = models.cache_root(spec.data.cache_dir) / "tokenized"
    return Prepared(
        task=task,
        tokenizer=tokenizer,
        train=data.tokenize(train_ex, tokenizer, spec.data.max_seq_length, cache),
        dev=data.tokenize(dev_ex, tokenizer, spec.data.max_seq_length, cache),
        data_fingerprint=_examples_fingerprint(train_ex, dev_ex),
    )


def teacher_settings(spec: Spec, data_fingerprint: str) -> dict[str, Any]:
    """What determines a fine-tuned teacher: its cache key is a hash of exactly this."""
    t = spec.teacher
    return {
        "model": t.model,
        "model_fingerprint": models.model_fingerprint(t.model),
        "task": spec.task,
        "data": data_fingerprint,
        "max_seq_length": spec.data.max_seq_length,
        "epochs": t.epochs,
        "lr": t.lr,
        "batch_size": t.batch_size,
        "seed": t.seed,
        "warmup": t.warmup,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "precision": spec.train.precision,
        "recipe": "kdray-finetune-v1",
    }


def ensure_teacher(
    spec: Spec, prepared: Prepared | None = None, progress: ProgressHook | None = None
) -> models.TeacherInfo:
    """The fine-tuned teacher for this spec: the given checkpoint, a cached one, or a new one.

    Fine-tuning keeps the best dev epoch; the folder is content-addressed by
    :func:`teacher_settings`, so every later run with the same settings reuses it.
    """
    if spec.teacher.checkpoint:
        return _checkpoint_teacher(spec, prepared)
    if prepared is None:
        prepared = prepare_data(spec, spec.teacher.model)
    settings = teacher_settings(spec, prepared.data_fingerprint)
    key = models.teacher_key(settings)
    target = models.cached_teacher_dir(models.cache_root(spec.data.cache_dir), key)
    cached = models.TeacherInfo.read(target)
    if cached is not None:
        return cached
    return fine_tune_teacher(spec, prepared, settings, target, progress or _NoProgress())


def _checkpoint_teacher(spec: Spec, prepared: Prepared | None) -> models.TeacherInfo:
    path = Path(spec.teacher.checkpoint or "").expanduser()
    if not path.is_dir():
        raise models.ModelError(f"teacher.checkpoint {str(path)!r} is not a folder")
    info = models.TeacherInfo.read(path)
    if info is not None:
        return info
    # A teacher fine-tuned elsewhere: measure it once so its dev score is known.
    prepared = prepared or prepare_data(spec, str(path))
    model = models.load_classifier(str(path), prepared.task.num_labels)
    device = pick_device(spec.train.device)
    loader = make_loader(prepared.dev, spec.train.eval_batch_size, prepared.tokenizer.pad_token_id)
    metrics = evaluate(model.to(device), loader, prepared.task, device)
    return models.TeacherInfo(
        path=str(path.resolve()),
        id="ckpt-" + models.model_fingerprint(str(path))[:16],
        dev_metrics=metrics,
        settings={"checkpoint": str(path.resolve())},
    )


def fine_tune_teacher(
    spec: Spec,
    prepared: Prepared,
    settings: dict[str, Any],
    target: Path,
    progress: ProgressHook,
) -> models.TeacherInfo:
    t = spec.teacher
    device = pick_device(spec.train.device)
    seed_everything(t.seed)
    model = models.load_classifier(t.model, prepared.task.num_labels).to(device)
    pad = prepared.tokenizer.pad_token_id
    steps_per_epoch = math.ceil(len(prepared.train) / t.batch_size)
    optimizer = make_optimizer([model], t.lr, t.weight_decay)
    scheduler = linear_schedule(optimizer, steps_per_epoch * t.epochs, t.warmup)
    dev_loader = make_loader(prepared.dev, spec.train.eval_batch_size, pad)
    main = prepared.task.main_metric
    best: tuple[float, int, dict[str, Any], dict[str, float]] | None = None
    history = []
    progress.start(f"teacher {spec.task}", steps_per_epoch * t.epochs)
    for epoch in range(1, t.epochs + 1):
        loader = make_loader(prepared.train, t.batch_size, pad, shuffle_seed=t.seed * 1000 + epoch)
        model.train()
        for batch in loader:
            batch = to_device(batch, device)
            with _autocast(device, spec.train.precision):
                logits = model(**model_inputs(batch)).logits
            loss = losses.hard_label_loss(logits.float(), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.max_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            progress.advance(1, loss=float(loss.detach()))
        metrics = evaluate(model, dev_loader, prepared.task, device)
        history.append({"epoch": epoch, **{f"dev.{k}": v for k, v in metrics.items()}})
        progress.log(f"teacher epoch {epoch}: dev {main} {metrics[main]:.4f}")
        if best is None or metrics[main] > best[0]:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best = (metrics[main], epoch, state, metrics)
    assert best is not None
    model.load_state_dict(best[2])
    info = {
        "id": target.name,
        "dev_metrics": best[3],
        "best_epoch": best[1],
        "history": history,
        "settings": settings,
        "kdray_version": __version__,
    }
    saved = models.save_teacher(model.cpu(), prepared.tokenizer, target, info)
    progress.finish(f"teacher dev {main} {best[0]:.4f} (epoch {best[1]})")
    return saved


# ---------------------------------------------------------------------------------------------
# Teacher outputs for the losses


@dataclass
class TeacherBatch:
    """What the loss terms need from the teacher for one batch.

    logits [B, C]; hidden[layer] the [CLS] vector [B, D] at the output of teacher layer `layer`;
    attentions[layer] the attention probabilities [B, H, Q, T] (Q = T, or 1 for [CLS] rows only).
    """

    logits: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)


class TeacherOutputs(Protocol):
    def __call__(self, batch: dict[str, torch.Tensor], layers: tuple[int, ...]) -> TeacherBatch: ...


class LiveTeacher:
    """Runs the frozen teacher forward for every batch (no gradients, eval mode)."""

    def __init__(self, model: nn.Module, device: torch.device, precision: str = "fp32") -> None:
        self.model = model.to(device).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.device = device
        self.precision = precision

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], layers: tuple[int, ...]) -> TeacherBatch:
        with _autocast(self.device, self.precision):
            out = self.model(
                **model_inputs(batch),
                output_attentions=bool(layers),
                output_hidden_states=bool(layers),
            )
        result = TeacherBatch(logits=out.logits.float())
        for layer in layers:
            result.hidden[layer] = out.hidden_states[layer][:, 0].float()
            result.attentions[layer] = out.attentions[layer - 1].float()
        return result


# ---------------------------------------------------------------------------------------------
# Distillation


def cache_enabled(spec: Spec) -> bool:
    """``teacher.cache.enabled``: auto caches whenever the teacher is used for more than one
    epoch (building the cache costs about one epoch of teacher forwards)."""
    setting = spec.teacher.cache.enabled
    if setting in (False, "off"):
        return False
    if setting in (True, "on"):
        return True
    return spec.train.epochs > 1 and spec.distill.algorithm != "none"


def cached_teacher_factory(
    spec: Spec,
    layer_map: list[int],
    teacher_info: models.TeacherInfo,
    root: str | Path | None = None,
) -> Callable[[Prepared, nn.Module, torch.device], TeacherOutputs] | None:
    """The teacher-output cache for this run's mapped layers, or None when it is off."""
    if not cache_enabled(spec):
        return None
    from kdray import teacher_cache

    return teacher_cache.teacher_outputs_factory(
        task=spec.task,
        max_seq_length=spec.data.max_seq_length,
        layers=tuple(sorted(set(layer_map))),
        rows=spec.distill.losses.attention.rows,
        max_bytes=int(spec.teacher.cache.max_gb * 1e9),
        teacher_id=teacher_info.id,
        root=root
        or spec.teacher.cache.dir
        or models.cache_root(spec.data.cache_dir) / "teacher-outputs",
        precision=spec.train.precision,
    )


def term_weights(spec: Spec) -> dict[str, float]:
    """Weights of the named loss terms. Algorithms without soft labels (none, internal) train
    the classifier on hard labels, with weight 1 when ``losses.hard.weight`` is left at 0."""
    w = spec.distill.losses
    hard = w.hard.weight
    if spec.distill.algorithm in ("none", "internal") and hard == 0:
        hard = 1.0
    return {
        "soft": w.soft.weight,
        "hard": hard,
        "attention": w.attention.weight,
        "hidden": w.hidden.weight,
    }


def _check_weights(schedule: StageSchedule, weights: dict[str, float]) -> None:
    for stage in schedule.stages:
        active = {
            "soft": stage.soft,
            "hard": stage.hard,
            "attention": bool(stage.internal_layers),
            "hidden": bool(stage.internal_layers),
        }
        if not any(on and weights[name] > 0 for name, on in active.items()):
            names = [n for n, on in active.items() if on]
            raise ValueError(
                f"stage '{stage.name}' optimises {', '.join(names)} but all their weights are 0: "
                "give one of distill.losses.<term>.weight a value > 0"
            )


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

    Per-layer internal terms are summed over the stage's layers (the stacked objective of SID);
    ``attention.L<i>``/``hidden.L<i>`` keep each student layer's value for the records.
    """
    terms: dict[str, torch.Tensor] = {}
    if teacher is None and (stage.soft or stage.internal_layers):
        raise ValueError(f"stage '{stage.name}' needs teacher outputs")
    logits = student_out.logits.float()
    if stage.hard and weights["hard"] > 0:
        terms["hard"] = losses.hard_label_loss(logits, batch["labels"])
    if stage.soft and weights["soft"] > 0:
        terms["soft"] = losses.soft_label_loss(logits, teacher.logits, temperature)
    mask = batch["attention_mask"]
    for layer in stage.internal_layers:
        t_layer = layer_map[layer - 1]
        if weights["attention"] > 0:
            terms[f"attention.L{layer}"] = losses.attention_kl_loss(
                student_out.attentions[layer - 1].float(), teacher.attentions[t_layer], mask, rows
            )
        if weights["hidden"] > 0:
            s_cls = projections(student_out.hidden_states[layer][:, 0].float(), layer)
            terms[f"hidden.L{layer}"] = losses.hidden_cosine_loss(s_cls, teacher.hidden[t_layer])
    for name in ("attention", "hidden"):
        parts = [v for k, v in terms.items() if k.startswith(name + ".L")]
        if parts:
            terms[name] = torch.stack(parts).sum()
    total = sum(weights[name] * terms[name] for name in losses.LOSS_TERMS if name in terms)
    terms["total"] = total if isinstance(total, torch.Tensor) else torch.zeros(())
    return terms


def _apply_freezing(student: nn.Module, stage: Stage) -> None:
    for index, part in models.encoder_parts(student).items():
        for param in part.parameters():
            param.requires_grad_(index not in stage.frozen)


def selection_metric(spec: Spec) -> str:
    """The dev metric that picks the best epoch (and trial): tune.metric or the task's main."""
    task = data.get_task(spec.task)
    metric = (spec.tune.metric or task.main_metric).removeprefix("dev.")
    if metric not in task.metrics:
        raise ValueError(
            f"tune.metric {metric!r} is not a dev metric of {task.name} "
            f"(allowed: {', '.join(task.metrics)})"
        )
    return metric


def _better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def distill(
    spec: Spec,
    report: ReportFn | None = None,
    *,
    resume_from: str | Path | None = None,
    output_dir: str | Path | None = None,
    progress: ProgressHook | None = None,
    teacher_outputs: Callable[[Prepared, nn.Module, torch.device], TeacherOutputs] | None = None,
) -> RunResult:
    """Run one complete distillation as the spec says and return what it produced.

    ``report(record, save)`` is called after every epoch with the epoch's record and a function
    that writes a resumable checkpoint into a folder; ``resume_from`` is such a folder.
    ``output_dir``, when given and ``train.save_student`` is on, receives the best student.
    A loss that turns NaN/inf ends the run with status ``diverged``; an exception inside the
    loop ends it with status ``failed`` and the error text, and the epochs so far are kept.
    """
    threads = torch.get_num_threads()
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    try:
        return _distill(spec, report, resume_from, output_dir, progress, teacher_outputs)
    finally:
        torch.set_num_threads(threads)  # train.threads is this run's, not the process's


def _distill(
    spec: Spec,
    report: ReportFn | None,
    resume_from: str | Path | None,
    output_dir: str | Path | None,
    progress: ProgressHook | None,
    teacher_outputs: Callable[[Prepared, nn.Module, torch.device], TeacherOutputs] | None,
) -> RunResult:
    started = time.perf_counter()
    progress = progress or _NoProgress()
    device = pick_device(spec.train.device)
    # A bad tune.metric surfaces before a teacher is fine-tuned (which can take hours).
    metric, mode = selection_metric(spec), spec.tune.mode
    # Read and tokenise once: a fine-tuned teacher keeps its base model's tokenizer.
    prepared = prepare_data(spec, spec.teacher.checkpoint or spec.teacher.model)
    teacher_info = ensure_teacher(spec, prepared, progress=progress)
    task = prepared.task
    result = RunResult(status="ok", metric=metric, teacher=teacher_info)

    teacher_model = models.load_classifier(teacher_info.path, task.num_labels)
    seed_everything(spec.train.seed)
    student = models.build_student(
        teacher_model,
        layers=spec.student.layers,
        init=spec.student.init,
        init_layers=spec.student.init_layers,
        num_labels=task.num_labels,
        hidden_size=spec.student.hidden_size,
        intermediate_size=spec.student.intermediate_size,
    ).to(device)
    layer_map = models.resolve_layer_map(
        spec.distill.layer_map, spec.student.layers, models.num_layers(teacher_model)
    )
    projections = models.Projections(
        student.config.hidden_size, teacher_model.config.hidden_size, spec.student.layers
    ).to(device)
    result.student_params = models.count_parameters(student)
    result.teacher_params = models.count_parameters(teacher_model)
    make_teacher = teacher_outputs or cached_teacher_factory(spec, layer_map, teacher_info)
    if make_teacher is None:
        make_teacher = lambda p, m, d: LiveTeacher(m, d, spec.train.precision)  # noqa: E731
    teacher = make_teacher(prepared, teacher_model, device)

    weights = term_weights(spec)
    schedule = stage_schedule(spec)
    _check_weights(schedule, weights)
    pad = prepared.tokenizer.pad_token_id
    steps_per_epoch = math.ceil(len(prepared.train) / spec.train.batch_size)
    optimizer = make_optimizer([student, projections], spec.train.lr, spec.train.weight_decay)
    scheduler = linear_schedule(optimizer, steps_per_epoch * spec.train.epochs, spec.train.warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=spec.train.precision == "fp16")
    dev_loader = make_loader(prepared.dev, spec.train.eval_batch_size, pad)
    temperature = spec.distill.losses.soft.temperature
    rows = spec.distill.losses.attention.rows

    best_value: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    if resume_from is not None:
        state = torch.load(Path(resume_from) / STATE_FILE, weights_only=False)
        student.load_state_dict(state["student"])
        projections.load_state_dict(state["projections"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        schedule.load_state_dict(state["schedule"])
        result.records = state["records"]
        best_value, best_state = state["best_value"], state.get("best_state")
        if state.get("best_is_current"):
            best_state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
        result.best_epoch, result.best_metrics = state["best_epoch"], state["best_metrics"]
        result.final_metrics = state["final_metrics"]
        _set_rng_state(state["rng"])

    def save(folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # When the epoch just saved is the best one, the best weights are the student's own:
        # store them once (a checkpoint is written and copied every epoch of every trial).
        best_is_current = (
            best_state is not None
            and bool(result.records)
            and result.records[-1]["epoch"] == result.best_epoch
        )
        torch.save(
            {
                "student": student.state_dict(),
                "projections": projections.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "schedule": schedule.state_dict(),
                "records": result.records,
                "best_value": best_value,
                "best_state": None if best_is_current else best_state,
                "best_is_current": best_is_current,
                "best_epoch": result.best_epoch,
                "best_metrics": result.best_metrics,
                "final_metrics": result.final_metrics,
                "rng": _rng_state(),
                "kdray_version": __version__,
            },
            folder / STATE_FILE,
        )

    train_seconds = sum(r.get("train_seconds", 0.0) for r in result.records)
    train_examples = sum(r.get("train_examples", 0) for r in result.records)
    remaining = spec.train.epochs - schedule.epoch
    progress.start(f"{spec.name} [{spec.distill.algorithm}]", steps_per_epoch * remaining)
    try:
        while not schedule.finished:
            epoch = schedule.epoch + 1
            stage = schedule.stage
            _apply_freezing(student, stage)
            student.train()
            need = tuple(layer_map[i - 1] for i in stage.internal_layers)
            need_internal = bool(need) and (weights["attention"] > 0 or weights["hidden"] > 0)
            sums: dict[str, float] = {}
            n_batches, n_examples = 0, 0
            epoch_start = time.perf_counter()
            loader = make_loader(
                prepared.train,
                spec.train.batch_size,
                pad,
                shuffle_seed=spec.train.seed * 1000 + epoch,
            )
            diverged = False
            for batch in loader:
                batch = to_device(batch, device)
                # stages on hard labels only (algorithm none) never ask the teacher
                uses_teacher = stage.soft or need_internal
                t_out = teacher(batch, need if need_internal else ()) if uses_teacher else None
                with _autocast(device, spec.train.precision):
                    s_out = student(
                        **model_inputs(batch),
                        output_attentions=need_internal and weights["attention"] > 0,
                        output_hidden_states=need_internal and weights["hidden"] > 0,
                    )
                terms = stage_losses(
                    s_out, t_out, batch, stage, layer_map, weights, projections, temperature, rows
                )
                total = terms["total"]
                if not torch.isfinite(total):
                    diverged = True
                    break
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                if spec.train.max_grad_norm:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]],
                        spec.train.max_grad_norm,
                    )
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
                n_batches += 1
                n_examples += int(batch["labels"].shape[0])
                progress.advance(1, epoch=epoch, stage=stage.name, loss=float(total.detach()))
            seconds = time.perf_counter() - epoch_start
            train_seconds += seconds
            train_examples += n_examples
            if diverged:
                result.status = "diverged"
                result.error = (
                    f"loss became {float(total.detach())} in epoch {epoch} (stage {stage.name})"
                )
                break
            metrics = evaluate(student, dev_loader, task, device)
            means = {f"loss.{k}": v / max(1, n_batches) for k, v in sums.items()}
            record: dict[str, Any] = {
                "epoch": epoch,
                "stage": stage.index,
                "stage_name": stage.name,
                "lr": scheduler.get_last_lr()[0],
                **means,
                **{f"dev.{k}": v for k, v in metrics.items()},
                "train_seconds": seconds,
                "train_examples": n_examples,
                "examples_per_s": n_examples / seconds if seconds > 0 else 0.0,
                # run-level, carried so a sweep's trial row has them (not in epochs.parquet)
                "student_params": result.student_params,
                "teacher_params": result.teacher_params,
            }
            schedule.end_epoch(means.get("loss.total", 0.0))
            record["classifier_epochs"] = schedule.classifier_epochs
            # Dev metrics mean something only once the classifier has been trained.
            if schedule.classifier_epochs > 0 and _better(metrics[metric], best_value, mode):
                best_value = metrics[metric]
                result.best_epoch, result.best_metrics = epoch, metrics
                if spec.train.save_student:
                    best_state = {
                        k: v.detach().cpu().clone() for k, v in student.state_dict().items()
                    }
            result.final_metrics = metrics
            record["is_best"] = result.best_epoch == epoch
            record["best_epoch"] = result.best_epoch
            record.update({f"best.dev.{k}": v for k, v in result.best_metrics.items()})
            if schedule.finished and spec.train.diagnostics:
                # Measured before the last report so a sweep's trial carries them even when
                # the scheduler stops it right after that report.
                diag = _diagnose(
                    student, best_state, teacher_model, dev_loader, layer_map, device, rows
                )
                result.diagnostics = diag.to_columns()
                result.cka = diag.cka_long()
                record.update({f"diag.{k}": v for k, v in result.diagnostics.items()})
                record["diag.cka_matrix"] = json.dumps(diag.cka.values.tolist())
            result.records.append(record)
            progress.log(_epoch_line(record, metric))
            if report is not None:
                report(copy.deepcopy(record), save)
    except Exception as error:  # noqa: BLE001 - a failed run is recorded, never lost
        result.status = "failed"
        result.error = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}"

    result.epochs_run = len(result.records)
    result.wall_time = time.perf_counter() - started
    result.examples_per_s = train_examples / train_seconds if train_seconds > 0 else 0.0
    if output_dir is not None and spec.train.save_student and best_state is not None:
        target = Path(output_dir) / "student"
        student.load_state_dict(best_state)
        student.cpu().save_pretrained(target, safe_serialization=True)
        prepared.tokenizer.save_pretrained(target)
        result.student_path = str(target)
    summary = (
        f"{result.status}: best dev {metric} {result.best_metrics.get(metric, float('nan')):.4f}"
        f" at epoch {result.best_epoch}"
    )
    progress.finish(summary)
    return result


def _diagnose(
    student: nn.Module,
    best_state: dict[str, torch.Tensor] | None,
    teacher_model: nn.Module,
    loader: DataLoader,
    layer_map: list[int],
    device: torch.device,
    rows: str,
) -> Any:
    """Representation diagnostics of the best student (the current one if none was kept)."""
    from kdray.diagnostics import representation_diagnostics

    model = student
    if best_state is not None:
        model = copy.deepcopy(student)
        model.load_state_dict(best_state)
    return representation_diagnostics(
        model, teacher_model.to(device), loader, layer_map, device, rows=rows
    )


def _epoch_line(record: dict[str, Any], metric: str) -> str:
    losses_text = " ".join(
        f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss.") and ".L" not in k
    )
    best = " *" if record.get("is_best") else ""
    return (
        f"epoch {record['epoch']} [{record['stage_name']}] {losses_text} | "
        f"dev {metric} {record.get('dev.' + metric, float('nan')):.4f}{best} | "
        f"{record['examples_per_s']:.0f} ex/s"
    )
