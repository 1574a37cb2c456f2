"""Representation diagnostics: how much the student's internals actually resemble the teacher's.

The paper's claim is that matching internal representations (attention and [CLS] activations)
makes the student *behave* like the teacher, not only score like it. These measures check that
directly on a dev split, after training:

- linear CKA (Kornblith et al. 2019) between the [CLS] vectors of every student layer and every
  teacher layer, so one sees both whether the mapped pairs are similar and whether a student
  layer ended up resembling a different teacher layer than the one it was mapped to;
- the attention KL(teacher || student) of every mapped layer, the same quantity the attention
  loss optimises (``kdray.method.losses.attention_kl_loss``), so training and diagnosis agree;
- prediction agreement between student and teacher, beside each one's accuracy, because two
  models with equal accuracy can still be wrong on different examples.

CKA over a whole split is computed from streamed second moments (never holding every [CLS] vector
of every layer in memory), with each layer's data shifted by its first batch's mean before
accumulating so the centring does not lose precision to cancellation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdray.method.losses import attention_kl_loss

__all__ = ["Diagnostics", "linear_cka", "representation_diagnostics"]

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _as_float64(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"linear_cka: {name} must be 2-d [N, D], got shape {array.shape}")
    return array


def _cka_from_moments(cross: np.ndarray, gram_x: np.ndarray, gram_y: np.ndarray) -> float:
    """CKA from centred ``Y^T X``, ``X^T X``, ``Y^T Y``; NaN when a side has no variance."""
    denominator = np.linalg.norm(gram_x) * np.linalg.norm(gram_y)
    if not denominator > 0 or not math.isfinite(denominator):
        return float("nan")
    return float(np.sum(cross * cross) / denominator)


def linear_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Linear CKA between two representations of the same N examples, ``x`` [N, D1], ``y`` [N, D2].

    ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred features, in float64. It is
    1 for identical representations, invariant to orthogonal transforms and isotropic scaling of
    either side (so a student and a teacher of different widths can be compared), and NaN when
    either representation is constant over the examples (the ratio is undefined then).
    """
    xs = _as_float64(x, "x")
    ys = _as_float64(y, "y")
    if xs.shape[0] != ys.shape[0]:
        raise ValueError(
            f"linear_cka: x and y must hold the same examples, got {xs.shape[0]} and {ys.shape[0]}"
        )
    xs = xs - xs.mean(axis=0, keepdims=True)
    ys = ys - ys.mean(axis=0, keepdims=True)
    return _cka_from_moments(ys.T @ xs, xs.T @ xs, ys.T @ ys)


class _Moments:
    """Streamed first and second moments of several layers' [CLS] vectors, for CKA."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: dict[str, np.ndarray] = {}
        self.sums: dict[str, np.ndarray] = {}
        self.products: dict[tuple[str, str], np.ndarray] = {}

    def add(self, vectors: dict[str, np.ndarray]) -> None:
        """Add one batch: ``vectors`` maps a layer label to its [B, D] float64 [CLS] vectors."""
        shifted = {}
        for key, value in vectors.items():
            if key not in self.shift:
                self.shift[key] = value.mean(axis=0)
                self.sums[key] = np.zeros(value.shape[1])
            shifted[key] = value - self.shift[key]
            self.sums[key] += shifted[key].sum(axis=0)
        keys = list(vectors)
        for i, a in enumerate(keys):
            for b in keys[i:]:
                product = shifted[b].T @ shifted[a]
                if (a, b) in self.products:
                    self.products[(a, b)] += product
                else:
                    self.products[(a, b)] = product
        self.n += next(iter(vectors.values())).shape[0]

    def centred(self, a: str, b: str) -> np.ndarray:
        """The centred ``B^T A`` over all examples seen (the shift cancels out)."""
        product = self.products[(a, b)] if (a, b) in self.products else self.products[(b, a)].T
        mean_a = self.sums[a] / self.n
        mean_b = self.sums[b] / self.n
        return product - self.n * np.outer(mean_b, mean_a)

    def cka(self, a: str, b: str) -> float:
        return _cka_from_moments(self.centred(a, b), self.centred(a, a), self.centred(b, b))


@dataclass
class Diagnostics:
    """What ``representation_diagnostics`` measured for one student against its teacher.

    ``cka`` is a DataFrame: rows ``"S1".."SLs"`` (student layers), columns ``"T1".."TLt"``
    (teacher layers), values the linear CKA of the two layers' [CLS] vectors over the split.
    Layer numbers in the dicts are 1-based student layers.
    """

    cka: pd.DataFrame
    attention_kl: dict[int, float]
    agreement: float
    mapped_cka: dict[int, float]
    layer_map: list[int]
    student_accuracy: float
    teacher_accuracy: float
    n_examples: int
    rows: str = "all"

    def to_columns(self) -> dict[str, float]:
        """Flat scalars for a trials row (the caller prefixes them with ``diag.``)."""
        columns: dict[str, float] = {}
        for layer, value in self.mapped_cka.items():
            columns[f"cka.L{layer}"] = float(value)
        for layer, value in self.attention_kl.items():
            columns[f"attention_kl.L{layer}"] = float(value)
        columns["cka.mean"] = _nanmean(self.mapped_cka.values())
        columns["attention_kl.mean"] = _nanmean(self.attention_kl.values())
        columns["agreement"] = float(self.agreement)
        columns["student_accuracy"] = float(self.student_accuracy)
        columns["teacher_accuracy"] = float(self.teacher_accuracy)
        return columns

    def cka_long(self) -> pd.DataFrame:
        """The full CKA matrix as rows ``student_layer, teacher_layer, cka`` (1-based ints)."""
        records = [
            {"student_layer": s + 1, "teacher_layer": t + 1, "cka": float(self.cka.iat[s, t])}
            for s in range(self.cka.shape[0])
            for t in range(self.cka.shape[1])
        ]
        frame = pd.DataFrame(records, columns=["student_layer", "teacher_layer", "cka"])
        return frame.astype({"student_layer": "int64", "teacher_layer": "int64", "cka": "float64"})


def _nanmean(values: Any) -> float:
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0 or np.all(np.isnan(array)):
        return float("nan")
    return float(np.nanmean(array))


def _forward(model: nn.Module, batch: dict[str, Tensor], who: str) -> Any:
    out = model(
        **{k: batch[k] for k in _MODEL_INPUTS if k in batch},
        output_hidden_states=True,
        output_attentions=True,
    )
    if not out.attentions or any(a is None for a in out.attentions):
        raise ValueError(
            f"representation_diagnostics: the {who} returned no attention probabilities; load it "
            'with attn_implementation="eager" (kdray.training.models.load_classifier does)'
        )
    return out


@torch.no_grad()
def representation_diagnostics(
    student: nn.Module,
    teacher: nn.Module,
    loader: DataLoader,
    layer_map: list[int],
    device: torch.device,
    rows: str = "all",
) -> Diagnostics:
    """Compare a trained student with its teacher over every batch of ``loader`` (a dev split).

    ``layer_map[i - 1]`` is the teacher layer student layer ``i`` was distilled from. Both models
    must be HF sequence classifiers with eager attention, already on ``device``; they are run in
    eval mode and their previous train/eval mode is restored. The attention KL of layer ``i`` is
    ``attention_kl_loss`` averaged over batches weighted by batch size; it is NaN for a pair whose
    head counts differ (no per-head correspondence exists then).
    """
    student_modes = student.training
    teacher_modes = teacher.training
    student.eval()
    teacher.eval()
    try:
        return _diagnose(student, teacher, loader, list(layer_map), device, rows)
    finally:
        student.train(student_modes)
        teacher.train(teacher_modes)


def _diagnose(
    student: nn.Module,
    teacher: nn.Module,
    loader: DataLoader,
    layer_map: list[int],
    device: torch.device,
    rows: str,
) -> Diagnostics:
    moments = _Moments()
    kl_sums: dict[int, float] = {}
    n_student = n_teacher = None
    n = agree = student_right = teacher_right = 0
    for raw in loader:
        batch = {k: v.to(device) for k, v in raw.items()}
        s_out = _forward(student, batch, "student")
        t_out = _forward(teacher, batch, "teacher")
        if n_student is None:
            n_student = len(s_out.hidden_states) - 1
            n_teacher = len(t_out.hidden_states) - 1
            _check_layer_map(layer_map, n_student, n_teacher)
            kl_sums = {i: 0.0 for i in range(1, n_student + 1)}
        size = int(batch["input_ids"].shape[0])
        vectors = {
            f"S{k}": s_out.hidden_states[k][:, 0].to("cpu", torch.float64).numpy()
            for k in range(1, n_student + 1)
        }
        vectors.update(
            {
                f"T{k}": t_out.hidden_states[k][:, 0].to("cpu", torch.float64).numpy()
                for k in range(1, n_teacher + 1)
            }
        )
        moments.add(vectors)
        mask = batch["attention_mask"]
        for i in range(1, n_student + 1):
            s_attn = s_out.attentions[i - 1]
            t_attn = t_out.attentions[layer_map[i - 1] - 1]
            if s_attn.shape[1] != t_attn.shape[1]:
                kl_sums[i] = float("nan")
                continue
            kl_sums[i] += float(attention_kl_loss(s_attn, t_attn, mask, rows)) * size
        s_pred = s_out.logits.argmax(dim=-1)
        t_pred = t_out.logits.argmax(dim=-1)
        labels = batch["labels"]
        agree += int((s_pred == t_pred).sum())
        student_right += int((s_pred == labels).sum())
        teacher_right += int((t_pred == labels).sum())
        n += size
    if n == 0 or n_student is None or n_teacher is None:
        raise ValueError("representation_diagnostics: the loader yielded no examples")

    s_labels = [f"S{k}" for k in range(1, n_student + 1)]
    t_labels = [f"T{k}" for k in range(1, n_teacher + 1)]
    matrix = np.array([[moments.cka(s, t) for t in t_labels] for s in s_labels])
    cka = pd.DataFrame(matrix, index=pd.Index(s_labels, name="student"), columns=t_labels)
    cka.columns.name = "teacher"
    mapped = {i: float(matrix[i - 1, layer_map[i - 1] - 1]) for i in range(1, n_student + 1)}
    # a regression's one output has no predicted label to agree on: NaN, not a false 1.0
    counted = n if s_out is not None and s_out.logits.shape[-1] > 1 else math.nan
    return Diagnostics(
        cka=cka,
        attention_kl={i: total / n for i, total in kl_sums.items()},
        agreement=agree / counted,
        mapped_cka=mapped,
        layer_map=list(layer_map),
        student_accuracy=student_right / counted,
        teacher_accuracy=teacher_right / counted,
        n_examples=n,
        rows=rows,
    )


def _check_layer_map(layer_map: list[int], n_student: int, n_teacher: int) -> None:
    if len(layer_map) != n_student:
        raise ValueError(
            f"representation_diagnostics: layer_map {layer_map} has {len(layer_map)} entries; "
            f"the student has {n_student} layers"
        )
    bad = [t for t in layer_map if not 1 <= int(t) <= n_teacher]
    if bad:
        raise ValueError(
            f"representation_diagnostics: layer_map {layer_map} names teacher layers {bad} "
            f"that do not exist (the teacher has layers 1..{n_teacher})"
        )
