"""Linear CKA against its definition and invariances; representation diagnostics on tiny BERTs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdray.method.diagnostics import Diagnostics, linear_cka, representation_diagnostics
from kdray.method.losses import attention_kl_loss
from kdray.training.data import collate

# ---------------------------------------------------------------------------------------------
# linear_cka


def _hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA as normalised HSIC of linear kernels (Kornblith et al. 2019), from uncentred input."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h)) / (n - 1) ** 2

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(123)


def test_cka_of_identical_representations_is_one(rng: np.random.Generator) -> None:
    x = rng.normal(size=(50, 12))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(x)) == pytest.approx(1.0)


def test_cka_invariant_to_rotation_scaling_and_offset(rng: np.random.Generator) -> None:
    x = rng.normal(size=(60, 10))
    y = x[:, :6] @ rng.normal(size=(6, 7)) + 0.5 * rng.normal(size=(60, 7))
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    assert np.allclose(q.T @ q, np.eye(10))
    base = linear_cka(x, y)
    assert 0.2 < base < 0.99  # a value where a wrong formula would show
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x + 100.0, y - 5.0) == pytest.approx(base, rel=1e-9)  # centring
    assert linear_cka(y, x) == pytest.approx(base, rel=1e-12)  # symmetric
    # An anisotropic scaling is NOT an invariance: the test above can tell them apart.
    assert linear_cka(x * np.linspace(0.1, 10, 10), y) != pytest.approx(base, rel=1e-3)


def test_cka_matches_hsic_formula(rng: np.random.Generator) -> None:
    x = rng.normal(size=(40, 9)) + 2.0
    y = np.tanh(x @ rng.normal(size=(9, 5))) + rng.normal(size=(40, 5))
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), rel=1e-10)


def test_cka_of_independent_features_is_small(rng: np.random.Generator) -> None:
    x = rng.normal(size=(2000, 8))
    y = rng.normal(size=(2000, 8))
    dependent = x @ rng.normal(size=(8, 8)) + 0.1 * rng.normal(size=(2000, 8))
    assert linear_cka(x, y) < 0.02
    assert linear_cka(x, dependent) > 0.5


def test_cka_errors_and_undefined_cases(rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(rng.normal(size=(5, 3)), rng.normal(size=(6, 3)))
    with pytest.raises(ValueError, match="2-d"):
        linear_cka(rng.normal(size=5), rng.normal(size=(5, 3)))
    assert np.isnan(linear_cka(np.ones((5, 3)), rng.normal(size=(5, 3))))


# ---------------------------------------------------------------------------------------------
# representation_diagnostics


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: on a busy shared CPU, two OpenMP threads make each op ~100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _bert(layers: int, seed: int, attn: str = "eager") -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return BertForSequenceClassification(config).eval()


def _batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Three hand-made batches of uneven lengths, so padding is present (last one smaller)."""
    gen = torch.Generator().manual_seed(seed)
    batches, index = [], 0
    for size in (8, 8, 5):
        items = []
        for _ in range(size):
            length = int(torch.randint(4, 12, (1,), generator=gen))
            ids = [2] + torch.randint(5, 100, (length - 1,), generator=gen).tolist()
            split = length // 2
            items.append(
                {
                    "input_ids": ids,
                    "token_type_ids": [0] * split + [1] * (length - split),
                    "labels": int(torch.randint(0, 2, (1,), generator=gen)),
                    "index": index,
                }
            )
            index += 1
        batches.append(collate(items))
    return batches


def _outputs(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> list:
    with torch.no_grad():
        return [
            model(
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                token_type_ids=b["token_type_ids"],
                output_hidden_states=True,
                output_attentions=True,
            )
            for b in batches
        ]


def test_diagnostics_of_a_student_against_a_teacher() -> None:
    teacher, student = _bert(4, seed=0), _bert(2, seed=1)
    student.train()  # the mode must come back as it was
    batches = _batches()
    layer_map = [2, 4]
    diag = representation_diagnostics(
        student, teacher, batches, layer_map, torch.device("cpu"), rows="all"
    )
    assert isinstance(diag, Diagnostics)
    assert student.training and not teacher.training

    assert diag.cka.shape == (2, 4)
    assert list(diag.cka.index) == ["S1", "S2"]
    assert list(diag.cka.columns) == ["T1", "T2", "T3", "T4"]
    assert set(diag.attention_kl) == {1, 2} and set(diag.mapped_cka) == {1, 2}
    assert diag.n_examples == 21

    # Reference values computed here from full forward passes, independently of the streaming.
    s_outs, t_outs = _outputs(student.eval(), batches), _outputs(teacher, batches)
    for s in (1, 2):
        xs = torch.cat([o.hidden_states[s][:, 0] for o in s_outs])
        for t in (1, 2, 3, 4):
            ys = torch.cat([o.hidden_states[t][:, 0] for o in t_outs])
            assert diag.cka.loc[f"S{s}", f"T{t}"] == pytest.approx(linear_cka(xs, ys), rel=1e-6)
        assert diag.mapped_cka[s] == diag.cka.loc[f"S{s}", f"T{layer_map[s - 1]}"]
        sizes = [b["input_ids"].shape[0] for b in batches]
        kls = [
            float(attention_kl_loss(so.attentions[s - 1], to.attentions[layer_map[s - 1] - 1], m))
            for so, to, m in zip(
                s_outs, t_outs, [b["attention_mask"] for b in batches], strict=True
            )
        ]
        assert diag.attention_kl[s] == pytest.approx(np.average(kls, weights=sizes), rel=1e-6)
        assert diag.attention_kl[s] > 1e-4  # different random models: attention differs
    s_pred = torch.cat([o.logits.argmax(-1) for o in s_outs])
    t_pred = torch.cat([o.logits.argmax(-1) for o in t_outs])
    labels = torch.cat([b["labels"] for b in batches])
    assert diag.agreement == pytest.approx(float((s_pred == t_pred).float().mean()))
    assert diag.student_accuracy == pytest.approx(float((s_pred == labels).float().mean()))
    assert diag.teacher_accuracy == pytest.approx(float((t_pred == labels).float().mean()))

    columns = diag.to_columns()
    assert {
        "cka.L1",
        "cka.L2",
        "attention_kl.L1",
        "attention_kl.L2",
        "agreement",
        "cka.mean",
    } <= set(columns)
    assert columns["cka.mean"] == pytest.approx((diag.mapped_cka[1] + diag.mapped_cka[2]) / 2)
    assert all(isinstance(v, float) for v in columns.values())

    long = diag.cka_long()
    assert list(long.columns) == ["student_layer", "teacher_layer", "cka"]
    assert len(long) == 8
    row = long[(long.student_layer == 2) & (long.teacher_layer == 3)]
    assert float(row.cka.iloc[0]) == diag.cka.loc["S2", "T3"]
    assert pd.api.types.is_integer_dtype(long.student_layer)


def test_student_that_is_the_teacher_matches_it_exactly() -> None:
    teacher = _bert(4, seed=0)
    for rows in ("all", "cls"):
        diag = representation_diagnostics(
            teacher, teacher, _batches(seed=3), [1, 2, 3, 4], torch.device("cpu"), rows=rows
        )
        assert diag.agreement == 1.0
        assert diag.student_accuracy == diag.teacher_accuracy
        for layer in (1, 2, 3, 4):
            assert diag.attention_kl[layer] == pytest.approx(0.0, abs=1e-6)
            assert diag.mapped_cka[layer] == pytest.approx(1.0, abs=1e-9)
        assert diag.to_columns()["cka.mean"] == pytest.approx(1.0, abs=1e-9)
        # Off-diagonal layers are different representations: CKA below 1.
        assert diag.cka.loc["S1", "T4"] < 0.999


def test_streamed_cka_survives_a_large_common_offset() -> None:
    """Hidden vectors with a huge shared mean: centring from streamed sums must not cancel out."""
    from kdray.method.diagnostics import _Moments

    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 6)) + 1e7
    y = (x - 1e7) @ rng.normal(size=(6, 4)) + rng.normal(size=(90, 4)) - 3e6
    moments = _Moments()
    for start in range(0, 90, 16):
        moments.add({"a": x[start : start + 16], "b": y[start : start + 16]})
    assert moments.cka("a", "b") == pytest.approx(linear_cka(x, y), rel=1e-6)
    assert moments.cka("b", "a") == pytest.approx(linear_cka(x, y), rel=1e-6)


def test_diagnostics_rejects_bad_inputs() -> None:
    teacher, student = _bert(4, seed=0), _bert(2, seed=1)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="2 layers"):
        representation_diagnostics(student, teacher, _batches(), [1, 2, 3], cpu)
    with pytest.raises(ValueError, match="do not exist"):
        representation_diagnostics(student, teacher, _batches(), [2, 5], cpu)
    with pytest.raises(ValueError, match="no examples"):
        representation_diagnostics(student, teacher, [], [2, 4], cpu)
    with pytest.raises(ValueError, match="eager"):
        representation_diagnostics(_bert(2, seed=1, attn="sdpa"), teacher, _batches(), [2, 4], cpu)
