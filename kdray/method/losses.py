"""Loss terms of internal-representation distillation, as pure functions of tensors and masks.

Each term follows TextBrewer's ``(student, teacher, mask)`` convention where it applies, so the
trainer can weight and toggle them independently (see ``LOSS_TERMS``) and the tests can check
them without a model. Every term is computed in float32, because the teacher's outputs may come
from a float16 cache and KL divergences of small probabilities lose too much in half precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ATTENTION_ROWS",
    "LOSS_TERMS",
    "attention_kl_loss",
    "hard_label_loss",
    "hidden_cosine_loss",
    "soft_label_loss",
]

#: The term names an ablation toggles (each has its own weight in the training config).
LOSS_TERMS: tuple[str, ...] = ("soft", "hard", "attention", "hidden")

#: Which query rows of the attention maps the KL term uses.
ATTENTION_ROWS: tuple[str, ...] = ("all", "cls")

# Floor for the student's probabilities inside the log: keeps the KL finite when the student
# gives a real key exactly zero probability (a teacher probability of zero needs no floor,
# xlogy handles 0 * log 0 = 0).
_PROB_EPS = 1e-12


def _check_logits(name: str, student_logits: Tensor, other: Tensor) -> None:
    if student_logits.dim() != 2 or other.dim() != 2 or student_logits.shape != other.shape:
        raise ValueError(
            f"{name}: expected student and teacher logits of the same shape [B, C], got "
            f"{tuple(student_logits.shape)} and {tuple(other.shape)}"
        )


def soft_label_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """Soft-label distillation: ``T**2 * KL(p_T || p_S)`` with ``p = softmax(logits / T)``.

    Shapes: ``student_logits`` and ``teacher_logits`` are ``[B, C]``. The KL is summed over
    classes and averaged over the batch; the ``T**2`` factor (Hinton et al. 2015) keeps the
    gradient scale independent of the temperature, so the term's weight can be swept separately.
    A regression (``C == 1``, STS-B) has no distribution to soften: the term is the mean squared
    difference of the two predicted scores (the teacher's score as the soft target) and the
    temperature does not apply. Returns a float32 scalar.
    """
    _check_logits("soft_label_loss", student_logits, teacher_logits)
    if not temperature > 0:
        raise ValueError(f"soft_label_loss: temperature must be > 0, got {temperature}")
    if student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits.float(), teacher_logits.detach().float())
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (temperature**2)


def hard_label_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy against the gold labels, averaged over the batch; for a regression
    (``C == 1``) the mean squared error against the gold scores.

    Shapes: ``student_logits`` ``[B, C]``, ``labels`` ``[B]`` (class indices, or float scores
    when ``C == 1``). Returns a float32 scalar.
    """
    if student_logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != student_logits.shape[0]:
        raise ValueError(
            "hard_label_loss: expected logits [B, C] and labels [B], got "
            f"{tuple(student_logits.shape)} and {tuple(labels.shape)}"
        )
    if student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits[:, 0].float(), labels.float())
    return F.cross_entropy(student_logits.float(), labels.long())


def attention_kl_loss(
    student_attn: Tensor, teacher_attn: Tensor, mask: Tensor, rows: str = "all"
) -> Tensor:
    """KL(teacher || student) between self-attention distributions, over real tokens only.

    Shapes:
        student_attn: ``[B, H, T, T]`` attention probabilities (softmax over the last dim, the
            key tokens).
        teacher_attn: ``[B, H, Q, T]`` with ``Q == T`` (all query rows) or ``Q == 1`` (only the
            [CLS] row, as a teacher-output cache may store it; needs ``rows="cls"``).
        mask: ``[B, T]``, 1 for real tokens and 0 for padding.

    For every (example, head, real query row) the KL ``sum_k p_T log(p_T / p_S)`` runs over the
    real keys only; the result is averaged over all such triples in the batch (``rows="all"``)
    or over the query at position 0 only (``rows="cls"``). Whatever the padded positions of
    either tensor hold (even NaN), they are replaced before any arithmetic, so the value and the
    gradients do not depend on how far the batch was padded. Returns a float32 scalar.
    """
    if rows not in ATTENTION_ROWS:
        raise ValueError(f"attention_kl_loss: rows must be one of {ATTENTION_ROWS}, got {rows!r}")
    if student_attn.dim() != 4 or teacher_attn.dim() != 4:
        raise ValueError(
            "attention_kl_loss: expected 4-d attention tensors, student [B, H, T, T] and teacher "
            f"[B, H, Q, T], got {tuple(student_attn.shape)} and {tuple(teacher_attn.shape)}"
        )
    b, h, t_q, t_k = student_attn.shape
    if t_q != t_k:
        raise ValueError(
            f"attention_kl_loss: student attention must be [B, H, T, T], got "
            f"{tuple(student_attn.shape)}"
        )
    tb, th, q, tk = teacher_attn.shape
    if (tb, th, tk) != (b, h, t_k) or q not in (1, t_k):
        raise ValueError(
            f"attention_kl_loss: teacher attention must be [B, H, T, T] or [B, H, 1, T] matching "
            f"the student {tuple(student_attn.shape)}, got {tuple(teacher_attn.shape)}"
        )
    if tuple(mask.shape) != (b, t_k):
        raise ValueError(
            f"attention_kl_loss: mask must be [B, T] = {(b, t_k)}, got {tuple(mask.shape)}"
        )
    if rows == "all" and q != t_k:
        raise ValueError(
            "attention_kl_loss: the teacher holds only the [CLS] row ([B, H, 1, T]); "
            'use rows="cls" or give the full [B, H, T, T] teacher attention'
        )

    real = mask.to(device=student_attn.device) != 0  # [B, T]
    if rows == "cls":
        student = student_attn[:, :, :1, :]
        teacher = teacher_attn[:, :, :1, :]
        query_real = real[:, :1]  # [B, 1]
    else:
        student = student_attn
        teacher = teacher_attn
        query_real = real
    # [B, 1, Q, T]: a cell counts only if both its query and its key are real tokens.
    valid = (query_real[:, :, None] & real[:, None, :])[:, None, :, :]

    # Neutral values in the ignored cells: teacher 0 contributes xlogy(0, .) = 0 and 0 * log 1 = 0.
    p_t = torch.where(valid, teacher.detach().float(), 0.0)
    log_s = torch.log(torch.where(valid, student.float(), 1.0).clamp_min(_PROB_EPS))
    # KL = sum p_T log p_T - sum p_T log p_S. The first sum is a constant of the teacher (no
    # graph); the second is one dot product, so autograd keeps no [B, H, Q, T] intermediates.
    with torch.no_grad():
        teacher_term = torch.special.xlogy(p_t, p_t).sum()
    cross = torch.vdot(p_t.reshape(-1), log_s.reshape(-1))

    n_rows = query_real.sum() * h
    return (teacher_term - cross) / n_rows.clamp_min(1).to(cross.dtype)


def hidden_cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """``1 - cos(h_T, h_S)`` between [CLS] vectors, averaged over the batch.

    Shapes: both ``[B, D]``; the caller has already projected the student's vector into the
    teacher's space when the hidden sizes differ. Returns a float32 scalar in ``[0, 2]``.
    """
    if student_hidden.dim() != 2 or student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            "hidden_cosine_loss: expected student and teacher [CLS] vectors of the same shape "
            f"[B, D], got {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.detach().float(), dim=-1)
    return (1.0 - cos).mean()
