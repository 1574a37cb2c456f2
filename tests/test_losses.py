"""Loss terms against values computed by hand with plain Python math, plus masking properties."""

from __future__ import annotations

import math

import pytest
import torch

from kdray.method.losses import (
    LOSS_TERMS,
    attention_kl_loss,
    hard_label_loss,
    hidden_cosine_loss,
    soft_label_loss,
)


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    exps = [math.exp(x - m) for x in xs]
    z = sum(exps)
    return [e / z for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _ref_attention_kl(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, rows: str
) -> float:
    """Plain-Python loops: mean KL over (example, head, real query row), real keys only."""
    s, t, m = student.tolist(), teacher.tolist(), mask.tolist()
    total, count = 0.0, 0
    for b in range(len(s)):
        real = [k for k, v in enumerate(m[b]) if v]
        queries = [0] if rows == "cls" else real
        for h in range(len(s[b])):
            for q in queries:
                tq = 0 if len(t[b][h]) == 1 else q
                total += _kl([t[b][h][tq][k] for k in real], [s[b][h][q][k] for k in real])
                count += 1
    return total / count


def _attention_probs(
    lengths: list[int], heads: int, seq: int, generator: torch.Generator, scale: float = 2.0
) -> torch.Tensor:
    """[B, H, T, T] softmax attention with padding keys at probability 0 (as BERT produces)."""
    scores = torch.randn(len(lengths), heads, seq, seq, generator=generator) * scale
    key_pad = torch.arange(seq)[None, :] >= torch.tensor(lengths)[:, None]  # [B, T]
    scores = scores.masked_fill(key_pad[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)


def _mask(lengths: list[int], seq: int) -> torch.Tensor:
    return (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()


def _pad_with_garbage(
    attn: torch.Tensor, mask: torch.Tensor, seq: int, generator: torch.Generator
) -> torch.Tensor:
    """Pad [B, H, Q, T] to T=seq (and Q too unless Q == 1); every padded cell gets garbage."""
    b, h, q, t = attn.shape
    new_q = 1 if q == 1 else seq
    garbage = torch.randn(b, h, new_q, seq, generator=generator) * 100.0
    garbage[..., ::3] = float("nan")
    garbage[..., 1::5] = float("inf")
    garbage[..., 2::7] = -5.0
    out = garbage.clone()
    out[:, :, :q, :t] = attn
    # Also overwrite the cells that were already padding inside the original length.
    new_mask = torch.zeros(b, seq, dtype=torch.long)
    new_mask[:, :t] = mask
    real = new_mask.bool()
    qreal = real[:, :new_q] if new_q > 1 else real[:, :1]
    valid = (qreal[:, :, None] & real[:, None, :])[:, None]
    return torch.where(valid, out, garbage)


def test_loss_terms_names() -> None:
    assert LOSS_TERMS == ("soft", "hard", "attention", "hidden")


# ----------------------------------------------------------------------------- soft labels
def test_soft_label_loss_hand_value() -> None:
    s = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
    t = [[3.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
    temp = 2.0
    expected = (
        sum(
            _kl(_softmax([x / temp for x in tr]), _softmax([x / temp for x in sr]))
            for sr, tr in zip(s, t, strict=True)
        )
        / 2
        * temp**2
    )
    got = soft_label_loss(torch.tensor(s), torch.tensor(t), temperature=temp)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_soft_label_loss_temperature_scaling() -> None:
    # softmax(k*z / k) == softmax(z): only the T**2 factor differs.
    s = torch.tensor([[0.3, -1.2, 2.0, 0.1]])
    t = torch.tensor([[1.0, 0.0, -0.5, 0.7]])
    base = soft_label_loss(s, t, temperature=1.0)
    for temp in (2.0, 4.0):
        scaled = soft_label_loss(s * temp, t * temp, temperature=temp)
        assert scaled.item() == pytest.approx(temp**2 * base.item(), rel=1e-5)
    # At T=1, the plain KL of the two distributions.
    assert base.item() == pytest.approx(
        _kl(_softmax(t[0].tolist()), _softmax(s[0].tolist())), rel=1e-5
    )


def test_soft_label_loss_zero_when_equal_and_errors() -> None:
    z = torch.randn(4, 3)
    assert soft_label_loss(z, z.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        soft_label_loss(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        soft_label_loss(z, torch.randn(4, 2))


# ----------------------------------------------------------------------------- hard labels
def test_hard_label_loss_hand_value() -> None:
    logits = [[2.0, 0.0, -1.0], [0.0, 1.0, 1.0]]
    labels = [0, 2]
    expected = -(math.log(_softmax(logits[0])[0]) + math.log(_softmax(logits[1])[2])) / 2
    got = hard_label_loss(torch.tensor(logits), torch.tensor(labels))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        hard_label_loss(torch.tensor(logits), torch.tensor([0, 1, 2]))


# ----------------------------------------------------------------------------- hidden cosine
def test_hidden_cosine_loss_hand_value() -> None:
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0], [2.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [-2.0, -2.0], [5.0, 0.0], [1.0, 1.0]])
    # cos: 1/sqrt(2), -1, 0, 1
    expected = ((1 - 1 / math.sqrt(2)) + 2.0 + 1.0 + 0.0) / 4
    assert hidden_cosine_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        hidden_cosine_loss(s, t[:, :1])


# ----------------------------------------------------------------------------- attention KL
def test_attention_kl_hand_value() -> None:
    # B=1, H=1, T=3 with the last token padding: two real query rows, two real keys each.
    nan = float("nan")
    teacher = torch.tensor([[[[0.5, 0.5, nan], [0.9, 0.1, 7.0], [nan, 3.0, -1.0]]]])
    student = torch.tensor([[[[0.25, 0.75, 0.0], [0.5, 0.5, 0.0], [1.0, nan, 9.0]]]])
    mask = torch.tensor([[1, 1, 0]])
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row1 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    got_all = attention_kl_loss(student, teacher, mask, rows="all")
    got_cls = attention_kl_loss(student, teacher, mask, rows="cls")
    assert got_all.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert got_cls.item() == pytest.approx(row0, rel=1e-6)


def test_attention_kl_matches_reference_loops() -> None:
    g = torch.Generator().manual_seed(0)
    lengths, seq = [6, 4, 2], 6
    student = _attention_probs(lengths, 2, seq, g)
    teacher = _attention_probs(lengths, 2, seq, g)
    mask = _mask(lengths, seq)
    for rows in ("all", "cls"):
        got = attention_kl_loss(student, teacher, mask, rows=rows).item()
        assert got == pytest.approx(_ref_attention_kl(student, teacher, mask, rows), rel=1e-5)


@pytest.mark.parametrize("rows", ["all", "cls"])
def test_attention_kl_padding_invariance(rows: str) -> None:
    g = torch.Generator().manual_seed(1)
    lengths, seq, padded = [5, 3], 5, 9
    student = _attention_probs(lengths, 3, seq, g)
    teacher = _attention_probs(lengths, 3, seq, g)
    mask = _mask(lengths, seq)
    reference = attention_kl_loss(student, teacher, mask, rows=rows)

    student_p = _pad_with_garbage(student, mask, padded, g).requires_grad_(True)
    teacher_p = _pad_with_garbage(teacher, mask, padded, g)
    mask_p = _mask(lengths, padded)
    got = attention_kl_loss(student_p, teacher_p, mask_p, rows=rows)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)

    got.backward()
    assert student_p.grad is not None and torch.isfinite(student_p.grad).all()
    # No gradient reaches padded cells.
    real = mask_p.bool()
    valid = (real[:, :, None] & real[:, None, :])[:, None].expand_as(student_p)
    assert (student_p.grad[~valid] == 0).all()


def test_attention_kl_cls_is_row_zero_of_full() -> None:
    # Make every row but 0 identical in student and teacher: the "all" average then holds only
    # the row-0 KLs, spread over all real rows.
    g = torch.Generator().manual_seed(2)
    lengths, heads, seq = [4, 3, 2], 2, 4
    student = _attention_probs(lengths, heads, seq, g)
    teacher = _attention_probs(lengths, heads, seq, g)
    teacher[:, :, 1:, :] = student[:, :, 1:, :]
    mask = _mask(lengths, seq)
    cls = attention_kl_loss(student, teacher, mask, rows="cls").item()
    full = attention_kl_loss(student, teacher, mask, rows="all").item()
    assert cls * len(lengths) * heads == pytest.approx(full * sum(lengths) * heads, rel=1e-5)
    assert cls == pytest.approx(_ref_attention_kl(student, teacher, mask, "cls"), rel=1e-5)


def test_attention_kl_cls_teacher_row_only() -> None:
    g = torch.Generator().manual_seed(3)
    lengths, seq = [5, 2], 5
    student = _attention_probs(lengths, 2, seq, g)
    teacher = _attention_probs(lengths, 2, seq, g)
    mask = _mask(lengths, seq)
    full_teacher = attention_kl_loss(student, teacher, mask, rows="cls")
    cls_teacher = attention_kl_loss(student, teacher[:, :, :1, :], mask, rows="cls")
    assert cls_teacher.item() == pytest.approx(full_teacher.item(), rel=1e-7)
    with pytest.raises(ValueError, match='rows="cls"'):
        attention_kl_loss(student, teacher[:, :, :1, :], mask, rows="all")


def test_attention_kl_zero_when_equal_and_zero_probs() -> None:
    g = torch.Generator().manual_seed(4)
    lengths, seq = [4, 2], 4
    student = _attention_probs(lengths, 2, seq, g)
    mask = _mask(lengths, seq)
    for rows in ("all", "cls"):
        assert attention_kl_loss(student, student.clone(), mask, rows=rows).item() == pytest.approx(
            0.0, abs=1e-7
        )
    # Exact zeros in teacher (and student) probabilities on real keys: finite, no NaN.
    one_hot = torch.zeros(2, 2, seq, seq)
    one_hot[..., 0] = 1.0
    s = student.clone().requires_grad_(True)
    loss = attention_kl_loss(s, one_hot, mask)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # A student with exact zeros where the teacher has mass is penalised, but stays finite.
    shifted = torch.zeros(2, 2, seq, seq)
    shifted[..., 1] = 1.0
    assert torch.isfinite(attention_kl_loss(shifted, one_hot, mask))
    assert attention_kl_loss(one_hot, one_hot, mask).item() == 0.0


def test_attention_kl_float16_teacher() -> None:
    g = torch.Generator().manual_seed(5)
    lengths, seq = [6, 3], 6
    student = _attention_probs(lengths, 2, seq, g)
    teacher = _attention_probs(lengths, 2, seq, g, scale=6.0)  # peaked: tiny probabilities
    mask = _mask(lengths, seq)
    teacher16 = teacher.half()
    got = attention_kl_loss(student, teacher16, mask)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    expected = attention_kl_loss(student, teacher16.float(), mask)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert got.item() == pytest.approx(attention_kl_loss(student, teacher, mask).item(), rel=1e-2)
    # Soft labels and hidden vectors from a float16 cache too.
    z, zt = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    assert soft_label_loss(z, zt.half(), 2.0).dtype == torch.float32
    assert hidden_cosine_loss(z, zt.half()).dtype == torch.float32


def test_attention_kl_validation() -> None:
    s = torch.full((1, 2, 3, 3), 1 / 3)
    m = torch.ones(1, 3)
    with pytest.raises(ValueError, match="rows must be one of"):
        attention_kl_loss(s, s, m, rows="first")
    with pytest.raises(ValueError, match=r"\[B, H, T, T\]"):
        attention_kl_loss(s[:, :, :2, :], s, m)
    with pytest.raises(ValueError, match="teacher"):
        attention_kl_loss(s, s[:, :1], m)
    with pytest.raises(ValueError, match="teacher"):
        attention_kl_loss(s, s[:, :, :2, :], m)
    with pytest.raises(ValueError, match="mask"):
        attention_kl_loss(s, s, torch.ones(1, 4))
    with pytest.raises(ValueError, match="4-d"):
        attention_kl_loss(s[0], s[0], m)


# ----------------------------------------------------------------------------- gradients
def test_gradients_reach_student_only() -> None:
    g = torch.Generator().manual_seed(6)
    lengths, seq = [3, 2], 3
    scores = torch.randn(2, 2, seq, seq, generator=g, requires_grad=True)
    key_pad = ~_mask(lengths, seq).bool()
    student = scores.masked_fill(key_pad[:, None, None, :], float("-inf")).softmax(-1)
    teacher = _attention_probs(lengths, 2, seq, g)
    logits = torch.randn(2, 3, generator=g, requires_grad=True)
    t_logits = torch.randn(2, 3, generator=g)
    hidden = torch.randn(2, 5, generator=g, requires_grad=True)
    t_hidden = torch.randn(2, 5, generator=g)
    total = (
        attention_kl_loss(student, teacher, _mask(lengths, seq))
        + soft_label_loss(logits, t_logits, 2.0)
        + hard_label_loss(logits, torch.tensor([0, 2]))
        + hidden_cosine_loss(hidden, t_hidden)
    )
    total.backward()
    for leaf in (scores, logits, hidden):
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
        assert leaf.grad.abs().sum() > 0
    for t in (teacher, t_logits, t_hidden):
        assert not t.requires_grad and t.grad is None

    # A teacher that happens to require grad still receives none (it is a fixed target).
    t_req = t_hidden.clone().requires_grad_(True)
    hidden_cosine_loss(hidden, t_req).backward()
    assert t_req.grad is None
