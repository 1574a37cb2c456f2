"""The fine-tuned teacher: one home for finding, fine-tuning, storing and fetching it.

A teacher is fine-tuned on the task once, through the same :func:`kdray.training.engine.train_step`
as every student, keeping its best dev epoch, and stored as a folder (safetensors + tokenizer +
``teacher.json``) in a content-addressed cache keyed by :func:`teacher_settings`; any later run with
the same settings reuses it. A sweep copies it into its storage once (:func:`publish`) and each node
fetches it from there under a file lock (:func:`fetch`).

``teacher.json`` records the size and sha256 of every file beside it, so a truncated or corrupted
teacher is never used under the id and dev metrics of the one that was saved: every read checks
the sizes and the sha256 sums by default (``verify="full"``; a same-size corruption passes a size
check). Hashing MiniLM-L6's 92 MB took 0.06 s here, against minutes for a trial: well under 1 %.
``verify="sizes"`` (a stat per file) remains for callers that want it. A damaged cache entry is
fine-tuned again; a damaged ``teacher.checkpoint`` is an error naming the file.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from kdray import __version__
from kdray.infra import remote
from kdray.infra.progress import NoProgress, ProgressHook
from kdray.infra.store import (
    atomic_dir,
    cache_root,
    content_hash,
    file_digest,
    file_problems,
    file_records,
)
from kdray.method import losses
from kdray.spec import Spec
from kdray.training import data, engine, models

TEACHER_INFO_FILE = "teacher.json"
#: Part of every teacher key: bump it when fine-tuning changes what it produces.
RECIPE = "kdray-finetune-v1"
#: How much of a teacher folder a read checks: nothing, file sizes, or sizes and sha256.
Verify = Literal["none", "sizes", "full"]

logger = logging.getLogger(__name__)


class TeacherDamagedError(models.ModelError):
    """A teacher folder whose ``teacher.json`` is unreadable or whose files differ from it."""

    def __init__(self, message: str, path: Path, problems: list[str]) -> None:
        super().__init__(message, path, problems)  # all in args: it pickles (Ray) intact
        self.path = path
        self.problems = problems

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class TeacherInfo:
    """A fine-tuned teacher on disk and what is known about it."""

    path: str
    id: str
    dev_metrics: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    #: {name: {"bytes", "sha256"}} of every file saved with it; None: an older teacher.json
    #: that records none, so nothing can be checked.
    files: dict[str, dict[str, Any]] | None = None

    @classmethod
    def read(cls, path: str | Path, verify: Verify = "full") -> TeacherInfo | None:
        """The teacher in folder ``path``, or None when it holds no ``teacher.json``.

        Raises :class:`TeacherDamagedError` when ``teacher.json`` cannot be read or (unless
        ``verify`` is "none") a file it records is missing or has another size, or (with
        "full") another sha256.
        """
        folder = Path(path)
        info_file = folder / TEACHER_INFO_FILE
        if not info_file.is_file():
            return None
        try:
            record = json.loads(info_file.read_text())
            info = cls(
                path=str(folder.resolve()),
                id=record["id"],
                dev_metrics=record.get("dev_metrics", {}),
                settings=record.get("settings", {}),
                files=record.get("files"),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            problems = [f"{info_file} cannot be read ({type(error).__name__}: {error})"]
            raise TeacherDamagedError(_damage_message(folder, problems), folder, problems) from None
        if verify != "none" and info.files is not None:
            problems = file_problems(folder, info.files, full=verify == "full")
            if problems:
                raise TeacherDamagedError(_damage_message(folder, problems), folder, problems)
        return info


def _damage_message(folder: Path, problems: list[str]) -> str:
    return f"the teacher in {folder} is damaged: {'; '.join(problems)}"


# ---------------------------------------------------------------------------------------------
# Keys and folders


def model_fingerprint(name: str) -> str:
    """Content hash of a model's weights and config, so a cache key follows the files, not
    the name (a re-downloaded or edited model gets a new key)."""
    path = Path(models.resolve_model_path(name))
    if not path.is_dir():
        return f"hub:{name}"
    parts = [
        [item.name, file_digest(item)]
        for item in sorted(path.iterdir())
        if item.suffix in {".safetensors", ".bin", ".json", ".txt"} and item.is_file()
    ]
    return content_hash(parts)


def fine_tune_precision(spec: Spec) -> str:
    """The precision the teacher is fine-tuned in: ``train.precision``, except that ``auto``
    (chosen for the students' speed) fine-tunes in fp32: the teacher is trained once and
    cached, and its quality caps every student's."""
    return "fp32" if spec.train.precision == "auto" else spec.train.precision


def teacher_settings(spec: Spec, data_fingerprint: str) -> dict[str, Any]:
    """What determines a fine-tuned teacher: its cache key is a hash of exactly this."""
    t = spec.teacher
    return {
        "model": t.model,
        "model_fingerprint": model_fingerprint(t.model),
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
        "precision": fine_tune_precision(spec),
        "recipe": RECIPE,
        # added later: only when set, so the teachers cached before keep their keys
        **({"layer_decay": t.layer_decay} if t.layer_decay != 1.0 else {}),
        **({"pooling": t.pooling} if t.pooling != "cls" else {}),
    }


def teacher_key(settings: dict[str, Any]) -> str:
    return content_hash(settings, 20)


def teacher_dir(root: Path, key: str) -> Path:
    """The cache folder of the fine-tuned teacher with key ``key``."""
    return root / "teachers" / key


def save_teacher(
    model: nn.Module, tokenizer: Any, target: Path, info: dict[str, Any]
) -> TeacherInfo:
    """Write a teacher folder atomically: a crash never leaves a half-written cache entry.
    ``teacher.json`` gets the size and sha256 of every other file, taken before the rename."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        names = [str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()]
        record = {**info, "files": file_records(tmp, names)}
        (tmp / TEACHER_INFO_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    loaded = TeacherInfo.read(target)
    assert loaded is not None
    return loaded


# ---------------------------------------------------------------------------------------------
# Finding or fine-tuning


def ensure_teacher(
    spec: Spec,
    prepared: data.Prepared | None = None,
    progress: ProgressHook | None = None,
    *,
    verify: Verify = "full",
    repair: bool = True,
) -> TeacherInfo:
    """The fine-tuned teacher for this spec: the given checkpoint, a cached one, or a new one.

    A cached teacher is checked as ``verify`` says before it is reused; a damaged one is
    fine-tuned again with a warning (with ``repair=False``: a :class:`TeacherDamagedError`).
    """
    if spec.teacher.checkpoint:
        return _checkpoint_teacher(spec, prepared, verify)
    if prepared is None:
        prepared = data.prepare(spec, spec.teacher.model)
    settings = teacher_settings(spec, prepared.data_fingerprint)
    target = teacher_dir(cache_root(spec.data.cache_dir), teacher_key(settings))
    try:
        cached = TeacherInfo.read(target, verify)
    except TeacherDamagedError as error:
        if not repair:
            raise TeacherDamagedError(
                f"{error}. Delete {target} and run `kdray teacher` again to fine-tune it anew",
                error.path,
                error.problems,
            ) from None
        # save_teacher replaces the damaged folder in one rename once the new teacher is ready
        logger.warning("%s; fine-tuning it again", error)
        cached = None
    if cached is not None:
        return cached
    return fine_tune_teacher(spec, prepared, settings, target, progress or NoProgress())


def _checkpoint_teacher(
    spec: Spec, prepared: data.Prepared | None, verify: Verify = "full"
) -> TeacherInfo:
    path = Path(spec.teacher.checkpoint or "").expanduser()
    if not path.is_dir():
        raise models.ModelError(f"teacher.checkpoint {str(path)!r} is not a folder")
    try:
        info = TeacherInfo.read(path, verify)
    except TeacherDamagedError as error:
        raise TeacherDamagedError(
            f"teacher.checkpoint: {error}. Copy the teacher folder again from where it was "
            "fine-tuned, or point teacher.checkpoint at an intact one",
            error.path,
            error.problems,
        ) from None
    if info is not None:
        return info
    # A teacher fine-tuned elsewhere: measure it once so its dev score is known.
    prepared = prepared or data.prepare(spec, str(path))
    model = models.load_classifier(str(path), prepared.task.num_labels)
    device = engine.pick_device(spec.train.device)
    loader = engine.make_loader(
        prepared.dev, spec.train.eval_batch_size, prepared.tokenizer.pad_token_id
    )
    metrics = engine.evaluate(model.to(device), loader, prepared.task, device)
    return TeacherInfo(
        path=str(path.resolve()),
        id="ckpt-" + model_fingerprint(str(path))[:16],
        dev_metrics=metrics,
        settings={"checkpoint": str(path.resolve())},
    )


def fine_tune_teacher(
    spec: Spec,
    prepared: data.Prepared,
    settings: dict[str, Any],
    target: Path,
    progress: ProgressHook,
) -> TeacherInfo:
    """Fine-tune ``teacher.model`` on the task with the ``teacher.*`` settings, keep the best
    dev epoch and store it at ``target``."""
    model, best, history = train_teacher(spec, prepared, progress)
    model.load_state_dict(best.state)
    info = {
        "id": target.name,
        "dev_metrics": best.metrics,
        "best_epoch": best.epoch,
        "history": history,
        "settings": settings,
        "kdray_version": __version__,
    }
    saved = save_teacher(model.cpu(), prepared.tokenizer, target, info)
    main = prepared.task.main_metric
    progress.finish(f"teacher dev {main} {best.metrics[main]:.4f} (epoch {best.epoch})")
    return saved


@dataclass
class BestEpoch:
    """The best dev epoch of a teacher fine-tune so far: its number, metrics and weights."""

    epoch: int
    metrics: dict[str, float]
    state: dict[str, torch.Tensor]


def train_teacher(
    spec: Spec,
    prepared: data.Prepared,
    progress: ProgressHook | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[nn.Module, BestEpoch, list[dict[str, Any]]]:
    """The fine-tuning loop itself, nothing stored: the model, its best dev epoch and the
    per-epoch history. ``on_epoch(record)`` after each epoch (a teacher search reports it to
    Ray Tune, whose scheduler may stop the trial there)."""
    t = spec.teacher
    progress = progress or NoProgress()
    device = engine.pick_device(spec.train.device)
    engine.seed_everything(t.seed)
    model = models.load_classifier(
        t.model, prepared.task.num_labels, new_head=True, pooling=t.pooling
    ).to(device)
    pad = prepared.tokenizer.pad_token_id
    steps_per_epoch = math.ceil(len(prepared.train) / t.batch_size)
    opt = engine.make_optimization(
        [model],
        lr=t.lr,
        weight_decay=t.weight_decay,
        warmup=t.warmup,
        total_steps=steps_per_epoch * t.epochs,
        max_grad_norm=t.max_grad_norm,
        device=device,
        precision=fine_tune_precision(spec),
        clip=model.parameters(),
        lr_scale=models.layer_lr_scale(model, t.layer_decay) if t.layer_decay != 1.0 else None,
    )
    dev_loader = engine.make_loader(prepared.dev, spec.train.eval_batch_size, pad)
    main = prepared.task.main_metric
    best: BestEpoch | None = None
    history: list[dict[str, Any]] = []
    progress.start(f"teacher {spec.task}", steps_per_epoch * t.epochs)
    for epoch in range(1, t.epochs + 1):
        _teacher_epoch(model, opt, prepared, t.batch_size, t.seed * 1000 + epoch, progress, epoch)
        metrics = engine.evaluate(model, dev_loader, prepared.task, device)
        history.append({"epoch": epoch, **{f"dev.{k}": v for k, v in metrics.items()}})
        progress.log(f"teacher epoch {epoch}: dev {main} {metrics[main]:.4f}")
        if best is None or metrics[main] > best.metrics[main]:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best = BestEpoch(epoch, metrics, state)
        if on_epoch is not None:
            best_so_far = {f"best.dev.{k}": v for k, v in best.metrics.items()}
            on_epoch({**history[-1], **best_so_far, "best_epoch": best.epoch})
    assert best is not None
    return model, best, history


def _teacher_epoch(
    model: nn.Module,
    opt: engine.Optimization,
    prepared: data.Prepared,
    batch_size: int,
    shuffle_seed: int,
    progress: ProgressHook,
    epoch: int,
) -> None:
    """One fine-tuning epoch on hard labels; a diverged loss is an error that says what to do."""
    loader = engine.make_loader(
        prepared.train, batch_size, prepared.tokenizer.pad_token_id, shuffle_seed=shuffle_seed
    )
    model.train()
    for batch in loader:
        batch = engine.to_device(batch, opt.device)
        try:
            terms = engine.train_step(
                opt,
                lambda b=batch: model(**engine.model_inputs(b)).logits,
                lambda logits, b=batch: {
                    "total": losses.hard_label_loss(logits.float(), b["labels"])
                },
            )
        except engine.DivergedError as error:
            raise ValueError(
                f"teacher fine-tuning diverged in epoch {epoch}: {error}; lower teacher.lr"
            ) from None
        progress.advance(1, loss=float(terms["total"].detach()))


# ---------------------------------------------------------------------------------------------
# A sweep's copy of the teacher


def publish(info: TeacherInfo, location: str) -> None:
    """Copy a teacher folder into a sweep's storage (a path or a pyarrow filesystem URI)."""
    remote.upload(info.path, location)


def fetch(location: str, spec: Spec) -> str:
    """A local folder holding the sweep's teacher: the location itself when it is local, else a
    copy downloaded once per node (checked against its teacher.json, fetched again if cut
    short or corrupted)."""
    if not remote.is_remote(location):
        return location.removeprefix("file://")
    local = cache_root(spec.data.cache_dir) / "sweep-teachers" / remote.local_name(location)
    return str(remote.download(location, local, intact=_intact))


def _intact(folder: Path) -> bool:
    """Whether ``folder`` holds a teacher whose files have the sizes and sha256 sums its
    teacher.json records (a copy cut short or corrupted is fetched again)."""
    try:
        return TeacherInfo.read(folder, "full") is not None
    except TeacherDamagedError as error:
        logger.warning("%s; fetching it again", error)
        return False
