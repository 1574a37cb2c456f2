"""The training engine: device, seeding, optimiser and LR schedule, loaders, evaluation and the
one training step. Distillation, teacher fine-tuning and the benchmarks all train through
:func:`train_step`, so mixed precision, gradient scaling, clipping and the divergence check are
written once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from kdray.training import data

logger = logging.getLogger("kdray")

__all__ = [
    "DivergedError",
    "LengthGroupedBatches",
    "Optimization",
    "auto_precision",
    "autocast",
    "evaluate",
    "linear_schedule",
    "make_loader",
    "make_optimization",
    "make_optimizer",
    "model_inputs",
    "native_cpu",
    "pick_device",
    "precision_to_run",
    "predict",
    "resolve_precision",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "to_device",
    "train_step",
]


class DivergedError(FloatingPointError):
    """The loss of a step was NaN or infinite: the run cannot go on."""

    def __init__(self, loss: float) -> None:
        super().__init__(f"loss became {loss}")
        self.loss = loss


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (all devices) from one seed, as transformers seeds them."""
    transformers.set_seed(seed % 2**32)


def native_cpu(precision: str) -> bool:
    """Whether this CPU computes ``precision`` in hardware, as oneDNN sees it: bf16 with
    AVX512-BF16 or AMX-BF16, fp16 with AVX512-FP16 or AMX-FP16, fp32 always. Elsewhere CPU
    autocast to it is emulated and slower than fp32."""
    if precision == "fp32":
        return True
    probe = "_is_mkldnn_bf16_supported" if precision == "bf16" else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


def auto_precision(device: torch.device) -> str:
    """What ``train.precision: auto`` runs: bf16 where the device computes it natively (CPUs
    with AVX512-BF16 or AMX, CUDA GPUs with bf16), else fp32. On such CPUs a distillation step
    takes about 0.7x the fp32 time and RTE dev accuracy held over paired seeds
    (benchmarks/README.md, results/README.md); where bf16 is emulated it is slower, so fp32 is
    kept there."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if native_cpu("bf16") else "fp32"
    return "fp32"


def resolve_precision(device: torch.device, precision: str) -> str:
    """``precision`` with ``auto`` replaced by what it runs as on ``device``."""
    return auto_precision(device) if precision == "auto" else precision


def precision_to_run(device: torch.device, precision: str) -> str:
    """The precision that runs for ``train.precision`` on ``device``: the one asked for, as
    real autocast on every device (CPUs included: kdray never runs fp32 under a bf16 label), with
    a warning where the CPU only emulates it; ``auto`` as :func:`auto_precision` picks. Tables
    and benchmarks are labelled with this."""
    if precision == "auto":
        return auto_precision(device)
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"train.precision: {precision!r} is not one of auto, fp32, bf16, fp16")
    if device.type == "cpu" and not native_cpu(precision):
        logger.warning(
            "train.precision: %s on this CPU (no native %s) is emulated and slower than fp32; "
            "--set train.precision=fp32 is faster here",
            precision,
            precision,
        )
    return precision


def autocast(device: torch.device, precision: str) -> Any:
    """Autocast to ``precision`` (bf16 or fp16; fp32 turns it off) on any device: the forward
    pass's matrix products run in the lower precision, losses stay fp32."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(
    modules: list[nn.Module],
    lr: float,
    weight_decay: float,
    lr_scale: Callable[[str], float] | None = None,
) -> torch.optim.AdamW:
    """AdamW without decay on biases and LayerNorm weights, as in BERT fine-tuning;
    ``lr_scale(parameter name)`` multiplies a parameter's learning rate (layer-wise decay),
    one group per (decay, scale) pair."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for module in modules:
        for name, param in module.named_parameters():
            decays = not (name.endswith("bias") or "LayerNorm" in name)
            scale = lr_scale(name) if lr_scale is not None else 1.0
            groups.setdefault((decays, scale), []).append(param)
    return torch.optim.AdamW(
        [
            {"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": lr * scale}
            for (decays, scale), params in groups.items()
            if params or scale == 1.0  # the two plain groups always, as checkpoints expect
        ],
        lr=lr,
    )


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


@dataclass
class Optimization:
    """What a training step updates and a checkpoint saves: optimiser, LR schedule, gradient
    scaler (active for fp16 on CUDA only) and the parameters whose gradient norm is clipped."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    clip: list[nn.Parameter]
    max_grad_norm: float | None
    device: torch.device
    precision: str

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])


def make_optimization(
    modules: list[nn.Module],
    *,
    lr: float,
    weight_decay: float,
    warmup: float,
    total_steps: int,
    max_grad_norm: float | None,
    device: torch.device,
    precision: str,
    clip: Iterable[nn.Parameter] | None = None,
    lr_scale: Callable[[str], float] | None = None,
) -> Optimization:
    """AdamW + linear warm-up/decay + a GradScaler for ``modules``; ``clip`` defaults to every
    parameter the optimiser holds (in its group order); ``lr_scale`` see :func:`make_optimizer`."""
    precision = precision_to_run(device, precision)
    optimizer = make_optimizer(modules, lr, weight_decay, lr_scale)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return Optimization(
        optimizer=optimizer,
        scheduler=linear_schedule(optimizer, total_steps, warmup),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        clip=list(clip) if clip is not None else params,
        max_grad_norm=max_grad_norm,
        device=device,
        precision=precision,
    )


def train_step(
    opt: Optimization,
    forward: Callable[[], Any],
    loss: Callable[[Any], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """One optimisation step: ``forward()`` under autocast, ``loss(output)`` in fp32 giving the
    named terms and their weighted ``total``, then scaled backward, clipping, optimiser,
    scaler and LR schedule. A non-finite total raises :class:`DivergedError` before any
    parameter changes."""
    with autocast(opt.device, opt.precision):
        output = forward()
    terms = loss(output)
    total = terms["total"]
    if not torch.isfinite(total):
        raise DivergedError(float(total.detach()))
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scaler.scale(total).backward()
    if opt.max_grad_norm:
        opt.scaler.unscale_(opt.optimizer)
        nn.utils.clip_grad_norm_(opt.clip, opt.max_grad_norm)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    return terms


# ---------------------------------------------------------------------------------------------
# Data and evaluation


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of examples of similar length, in an order shuffled by ``seed``.

    transformers' length grouping (examples shuffled, cut into mega-batches of up to 50
    batches, each sorted by length) makes the batches; their order is then shuffled too, so
    long and short batches alternate at random instead of running longest-first within each
    mega-batch. Same seed, same batches in the same order: paired seeds stay paired.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        order = get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self) -> Any:
        return iter(self.batches())

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


def make_loader(
    split: Dataset,
    batch_size: int,
    pad_id: int,
    *,
    shuffle_seed: int | None = None,
    group_by_length: bool = False,
) -> DataLoader:
    """A split's batches, padded per batch. Shuffling uses its own generator seeded per epoch,
    so a resumed run sees the same order; ``group_by_length`` (with a seed) batches examples
    of similar length together (:class:`LengthGroupedBatches`)."""
    collate = lambda batch: data.collate(batch, pad_id)  # noqa: E731
    if group_by_length and shuffle_seed is not None:
        lengths = getattr(split, "lengths", None)
        if lengths is None:
            raise ValueError("train.group_by_length needs a split that knows its lengths")
        batches = LengthGroupedBatches(lengths, batch_size, shuffle_seed)
        return DataLoader(split, batch_sampler=batches, collate_fn=collate)
    if shuffle_seed is None:
        sampler: Any = SequentialSampler(split)
    else:
        sampler = RandomSampler(split, generator=torch.Generator().manual_seed(shuffle_seed))
    return DataLoader(split, batch_size=batch_size, sampler=sampler, collate_fn=collate)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys a BERT forward takes (a batch also carries labels and example indices)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32"
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and gold labels over a whole split, in split order; the forward passes under
    the autocast ``precision`` the model was trained in (fp32 logits either way)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, precision):
            output = model(**model_inputs(batch))
        logits.append(output.logits.float().cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    task: data.GlueTask,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """The task's dev metrics of ``model`` over ``loader`` (forward passes in ``precision``)."""
    logits, labels = predict(model, loader, device, precision)
    return data.compute_metrics(task, logits, labels)  # argmax there, or a regression's scores


# ---------------------------------------------------------------------------------------------
# Random state, as plain data (a checkpoint loads with torch.load(weights_only=True))


def rng_state() -> dict[str, Any]:
    """Every random generator's state as tensors, lists and numbers."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(py_state), gauss],
        "numpy": [name, torch.from_numpy(np.asarray(keys).copy()), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
