"""The one training step and its pieces, on models small enough to compute by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import tiny_spec_dict
from kdray.spec import spec_from_dict
from kdray.training import engine, teacher

CPU = torch.device("cpu")


def _scalar_model() -> nn.Module:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return model


def _opt(model: nn.Module, **kw: Any) -> engine.Optimization:
    settings = {"lr": 0.1, "weight_decay": 0.0, "warmup": 0.0, "total_steps": 10}
    settings.update(kw)
    return engine.make_optimization(
        [model], max_grad_norm=settings.pop("max_grad_norm", None), device=CPU,
        precision="fp32", **settings,
    )  # fmt: skip


def _squared_error(model: nn.Module, x: float, target: float) -> Any:
    inputs = torch.tensor([[x]])
    return (
        lambda: model(inputs),
        lambda out: {"total": ((out - target) ** 2).sum()},
    )


def test_a_step_moves_a_weight_by_the_learning_rate_against_its_gradient() -> None:
    model = _scalar_model()
    opt = _opt(model)
    terms = engine.train_step(opt, *_squared_error(model, 2.0, 0.0))
    # loss (w x - t)^2 = 4 at w = 1; AdamW's first step is lr * g / (|g| + eps) = 0.1
    assert float(terms["total"].detach()) == pytest.approx(4.0)
    assert float(model.weight.detach()) == pytest.approx(0.9, abs=1e-6)
    # the schedule advanced: 10 steps, no warm-up -> factor 9/10 after one step
    assert opt.lr == pytest.approx(0.09)


def test_a_non_finite_loss_raises_before_any_parameter_changes() -> None:
    model = _scalar_model()
    opt = _opt(model)
    with pytest.raises(engine.DivergedError, match="loss became nan"):
        engine.train_step(opt, *_squared_error(model, float("nan"), 0.0))
    assert float(model.weight.detach()) == 1.0 and opt.lr == pytest.approx(0.1)


def test_gradients_are_clipped_to_max_grad_norm_before_the_update() -> None:
    model = _scalar_model()
    opt = _opt(model, max_grad_norm=0.5)
    seen: list[float] = []
    opt.optimizer.register_step_pre_hook(
        lambda *_: seen.append(float(model.weight.grad))  # the gradient the update uses
    )
    engine.train_step(opt, *_squared_error(model, 2.0, 0.0))
    assert seen == [pytest.approx(0.5)]  # the raw gradient 8 clipped to norm 0.5


def test_warm_up_rises_linearly_then_decays_to_zero() -> None:
    model = _scalar_model()
    opt = _opt(model, warmup=0.4, total_steps=5)  # 2 warm-up steps
    lrs = []
    for _ in range(5):
        lrs.append(opt.lr)
        opt.optimizer.step()
        opt.scheduler.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 2 / 3 * 0.1, 1 / 3 * 0.1])


def test_the_teacher_is_fine_tuned_through_the_engine_step_with_a_scaler_for_fp16(
    tiny_bert: Path, tmp_path: Path, monkeypatch, one_thread: None
) -> None:
    raw = tiny_spec_dict(tiny_bert, data={"cache_dir": str(tmp_path)})
    raw["train"]["precision"] = "fp16"
    spec = spec_from_dict(raw)
    scalers: list[bool] = []
    real = engine.train_step

    def recording(opt: engine.Optimization, *args: Any) -> Any:
        scalers.append(opt.scaler.is_enabled())
        return real(opt, *args)

    monkeypatch.setattr(engine, "train_step", recording)
    info = teacher.ensure_teacher(spec)
    assert "accuracy" in info.dev_metrics
    assert scalers and all(scalers)  # every fine-tuning step went through it, scaled


def test_a_diverging_teacher_is_a_settings_error_that_names_the_fix(
    tiny_bert: Path, tmp_path: Path, monkeypatch
) -> None:
    spec = spec_from_dict(tiny_spec_dict(tiny_bert, data={"cache_dir": str(tmp_path)}))
    monkeypatch.setattr(
        "kdray.method.losses.hard_label_loss", lambda logits, labels: torch.tensor(float("inf"))
    )
    with pytest.raises(ValueError, match=r"teacher fine-tuning diverged in epoch 1.*teacher.lr"):
        teacher.ensure_teacher(spec)


def _padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches_cover_every_example_once_with_less_padding() -> None:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 65, (1000,), generator=generator).tolist()
    grouped = engine.LengthGroupedBatches(lengths, 32, seed=7).batches()
    flat = sorted(i for b in grouped for i in b)
    assert flat == list(range(1000))
    assert sorted(len(b) for b in grouped) == [8] + [32] * 31  # one partial batch of 1000 % 32
    random_order = torch.randperm(1000, generator=torch.Generator().manual_seed(7)).tolist()
    shuffled = [random_order[i : i + 32] for i in range(0, 1000, 32)]
    # similar lengths in a batch: far fewer padded tokens than random batches
    assert _padded_tokens(grouped, lengths) < 0.8 * _padded_tokens(shuffled, lengths)


def test_length_grouping_is_reproducible_per_seed_and_shuffles_the_batch_order() -> None:
    lengths = [(i * 37) % 60 + 3 for i in range(640)]
    first = engine.LengthGroupedBatches(lengths, 32, seed=3).batches()
    assert first == engine.LengthGroupedBatches(lengths, 32, seed=3).batches()
    assert first != engine.LengthGroupedBatches(lengths, 32, seed=4).batches()
    longest = [max(lengths[i] for i in b) for b in first]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)


def test_a_length_grouped_loader_yields_the_sampler_batches(tiny_bert: Path) -> None:
    from kdray.training import data, models

    tokenizer = models.load_tokenizer(str(tiny_bert))
    texts = [data.Example(text_a="word " * n, text_b=None, label=n % 2) for n in range(1, 40)]
    split = data.tokenize(texts, tokenizer, 64)
    loader = engine.make_loader(split, 8, 0, shuffle_seed=5, group_by_length=True)
    batches = [batch["index"].tolist() for batch in loader]
    assert batches == engine.LengthGroupedBatches(split.lengths, 8, seed=5).batches()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_lower_precision_really_runs_on_the_cpu_and_is_labelled_so(
    precision: str, one_thread: None
) -> None:
    """Before, train.precision bf16 on a CPU silently ran fp32: now the forward pass runs in
    the asked precision and the label says what ran."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    device = torch.device("cpu")
    assert engine.precision_to_run(device, precision) == precision
    layer = torch.nn.Linear(4, 4)
    with engine.autocast(device, precision):
        assert layer(torch.ones(2, 4)).dtype == dtype
    with engine.autocast(device, "fp32"):
        assert layer(torch.ones(2, 4)).dtype == torch.float32


def test_an_emulated_cpu_precision_is_warned_about(monkeypatch, caplog) -> None:
    monkeypatch.setattr(engine, "native_cpu", lambda precision: precision == "fp32")
    with caplog.at_level("WARNING", logger="kdray"):
        assert engine.precision_to_run(torch.device("cpu"), "bf16") == "bf16"
    assert "bf16 on this CPU (no native bf16) is emulated" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="kdray"):
        engine.precision_to_run(torch.device("cpu"), "fp32")
    assert not caplog.text


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_runs_bf16_only_where_the_cpu_computes_it_natively(
    monkeypatch, caplog, native: bool, expected: str
) -> None:
    """auto is for speed: bf16 where it is native (faster), fp32 where it would be emulated
    (slower), never with the emulation warning."""
    monkeypatch.setattr(engine, "native_cpu", lambda precision: native or precision == "fp32")
    device = torch.device("cpu")
    with caplog.at_level("WARNING", logger="kdray"):
        assert engine.precision_to_run(device, "auto") == expected
    assert not caplog.text
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[expected]
    with engine.autocast(device, "auto"):
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == dtype
