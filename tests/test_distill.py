"""The training loop on a tiny BERT: gradients, every algorithm through the CLI, the teacher
cache, exact repeatability, resuming, divergence, and one run on real RTE rows."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import FIXTURE_GLUE, SHARED_GLUE, tiny_spec_dict
from kdray.analysis import results
from kdray.method import losses
from kdray.method.algorithms import build_stages
from kdray.spec import Spec, SpecError, spec_from_dict
from kdray.training import data, engine, models, teacher
from kdray.training import distill as D
from kdray.training.teacher_outputs import LiveOutputs

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING_KEYS = {"train_seconds", "examples_per_s", "eval_seconds"}


def _spec(model: Path, **sections: Any) -> Spec:
    return spec_from_dict(tiny_spec_dict(model, **sections))


def _comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


# ------------------------------------------------------------------------------ gradients


def _batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    examples = data.load_examples(data.get_task("rte"), "train", str(FIXTURE_GLUE))
    split = data.tokenize(examples[:4], tokenizer, 32, None)
    batch = data.collate([split[i] for i in range(len(split))], tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any(), "the batch should contain padding"
    return batch


def test_gradients_reach_student_and_projections_never_teacher(tiny_bert: Path) -> None:
    teacher_model = models.load_classifier(str(tiny_bert), 2)
    torch.manual_seed(0)
    student = models.build_student(
        teacher_model, layers=2, init="random", init_layers="skip", num_labels=2, hidden_size=16
    )
    projections = models.Projections(16, teacher_model.config.hidden_size, 2)
    assert projections.needed
    teacher = LiveOutputs(teacher_model, torch.device("cpu"))
    tokenizer = models.load_tokenizer(str(tiny_bert))
    batch = _batch(tokenizer)
    layer_map = models.resolve_layer_map("skip", 2, 4)
    stage = build_stages("sid", 2, hard=True)[-1]  # everything on: soft, hard, layers 1-2
    assert stage.soft and stage.hard and stage.internal_layers == (1, 2)

    t_out = teacher(batch, tuple(layer_map))
    assert not t_out.logits.requires_grad
    assert set(t_out.attentions) == set(t_out.hidden) == {2, 4}
    student.train()
    s_out = student(**engine.model_inputs(batch), output_attentions=True, output_hidden_states=True)
    weights = {"soft": 1.0, "hard": 1.0, "attention": 1.0, "hidden": 1.0}
    terms = D.stage_losses(s_out, t_out, batch, stage, layer_map, weights, projections, 2.0, "all")
    for name in ("soft", "hard", "attention", "hidden", "attention.L1", "hidden.L2", "total"):
        assert name in terms and torch.isfinite(terms[name]), name
    expected = terms["soft"] + terms["hard"] + terms["attention"] + terms["hidden"]
    assert torch.allclose(terms["total"], expected)
    terms["total"].backward()

    for name, param in teacher_model.named_parameters():
        assert not param.requires_grad, name
        assert param.grad is None, name
    assert not teacher_model.training
    for name, param in student.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    for name, param in projections.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_stage_losses_follow_the_stage_and_weights(tiny_bert: Path) -> None:
    teacher_model = models.load_classifier(str(tiny_bert), 2)
    student = models.build_student(
        teacher_model, layers=2, init="teacher", init_layers="skip", num_labels=2
    )
    projections = models.Projections(32, 32, 2)
    teacher = LiveOutputs(teacher_model, torch.device("cpu"))
    batch = _batch(models.load_tokenizer(str(tiny_bert)))
    s_out = student(**engine.model_inputs(batch), output_attentions=True, output_hidden_states=True)
    t_out = teacher(batch, (2, 4))
    pid_layer2 = build_stages("pid", 2)[1]
    weights = {"soft": 1.0, "hard": 0.0, "attention": 2.0, "hidden": 0.0}
    terms = D.stage_losses(
        s_out, t_out, batch, pid_layer2, [2, 4], weights, projections, 1.0, "all"
    )
    assert set(terms) == {"attention.L2", "attention", "total"}
    assert torch.allclose(terms["total"], 2.0 * terms["attention.L2"])


# ------------------------------------------------------------------------- CLI, every algorithm

STAGES = {
    "none": ["hard labels"] * 3,
    "soft": ["soft labels"] * 3,
    "internal": ["all"] * 3,
    "idal": ["all"] * 3,
    "pid": ["layer 1", "layer 2", "classifier"],
    "sid": ["layer 1", "layers 1-2", "classifier"],
}
# Loss columns that must hold a value in each epoch (the rest must be absent or NaN).
INTERNAL_12 = {"attention", "hidden", "attention.L1", "attention.L2", "hidden.L1", "hidden.L2"}
LOSSES = {
    "none": [{"hard"}] * 3,
    "soft": [{"soft"}] * 3,
    "internal": [{"hard"} | INTERNAL_12] * 3,
    "idal": [{"soft"} | INTERNAL_12] * 3,
    "pid": [
        {"attention", "hidden", "attention.L1", "hidden.L1"},
        {"attention", "hidden", "attention.L2", "hidden.L2"},
        {"soft"},
    ],
    "sid": [
        {"attention", "hidden", "attention.L1", "hidden.L1"},
        INTERNAL_12,
        {"soft"} | INTERNAL_12,
    ],
}
ALL_TERMS = {"soft", "hard"} | INTERNAL_12


@pytest.mark.parametrize("algorithm", list(STAGES))
def test_cli_run_every_algorithm(algorithm: str, tiny_bert: Path, tmp_path: Path) -> None:
    from kdray.cli import app

    raw = tiny_spec_dict(tiny_bert, name=f"tiny-{algorithm}", train={"epochs": 5})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "run",
            str(spec_file),
            "--set",
            f"distill.algorithm={algorithm}",
            "--set",
            "train.epochs=3",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)

    trials, epochs = results.load(out)
    assert len(trials) == 1
    row = trials.iloc[0]
    assert row["status"] == "ok", row["error"]
    assert row["name"] == f"tiny-{algorithm}"
    assert row["distill.algorithm"] == algorithm
    assert row["train.epochs"] == 3
    assert row["student.layers"] == 2
    assert 0.0 <= row["best.dev.accuracy"] <= 1.0
    assert 0.0 <= row["teacher.dev.accuracy"] <= 1.0
    assert row["epochs_run"] == 3
    assert row["best_epoch"] in (1, 2, 3)
    assert (out / "student" / "config.json").is_file()

    assert list(epochs["epoch"]) == [1, 2, 3]
    assert list(epochs["stage_name"]) == STAGES[algorithm]
    assert (epochs["trial_id"] == "run").all()
    for (_, epoch), wanted in zip(epochs.iterrows(), LOSSES[algorithm], strict=True):
        assert math.isfinite(epoch["loss.total"]) and epoch["loss.total"] >= 0
        if epoch["classifier_epochs"] > 0:
            assert 0.0 <= epoch["dev.accuracy"] <= 1.0
        else:  # an internal stage before any classifier training is not evaluated
            assert pd.isna(epoch["dev.accuracy"]) and epoch["eval_seconds"] == 0.0
        for term in ALL_TERMS:
            column = f"loss.{term}"
            present = column in epochs.columns and not pd.isna(epoch[column])
            assert present == (term in wanted), (algorithm, epoch["stage_name"], column)
    # The best epoch is one where the classifier had been trained.
    best = epochs[epochs["is_best"]]
    assert len(best) == 1
    assert best.iloc[0]["classifier_epochs"] > 0
    assert best.iloc[0]["dev.accuracy"] == row["best.dev.accuracy"]


def test_cli_teacher(tiny_bert: Path, tmp_path: Path) -> None:
    from kdray.cli import app

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec_dict(tiny_bert)))
    result = CliRunner().invoke(app, ["teacher", str(spec_file)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    info = teacher.ensure_teacher(_spec(tiny_bert))
    assert f"teacher {info.id}" in result.output
    assert "dev accuracy" in result.output


def _state(folder: Path) -> dict[str, torch.Tensor]:
    """The student's weights in a checkpoint; a finished run's (light) checkpoint keeps only
    its best student, in the student folder."""
    from safetensors.torch import load_file

    state = torch.load(folder / D.STATE_FILE, weights_only=False)
    if state.get("finished"):
        return load_file(folder / D.STUDENT_DIR / "model.safetensors")
    return state["student"]


def _changed(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def test_pid_freeze_lower_keeps_frozen_parts_fixed(tiny_bert: Path, tmp_path: Path) -> None:
    spec = _spec(tiny_bert, distill={"algorithm": "pid", "stages": {"freeze_lower": True}})

    def report(record: dict[str, Any], save) -> None:
        save(tmp_path / f"epoch{record['epoch']}")

    result = D.distill(spec, report=report)
    assert result.status == "ok" and result.best_epoch == 3  # the one classifier epoch
    e1, e2, e3 = (_state(tmp_path / f"epoch{i}") for i in (1, 2, 3))
    # epoch 2 = stage "layer 2": embeddings and layer 1 frozen, layer 2 trains
    assert not _changed(e1, e2, "bert.embeddings.")
    assert not _changed(e1, e2, "bert.encoder.layer.0.")
    assert _changed(e1, e2, "bert.encoder.layer.1.")
    assert not _changed(e1, e2, "classifier.")  # no classifier loss in a layer stage
    # epoch 3 = stage "classifier": the whole encoder frozen, the head trains
    assert not _changed(e2, e3, "bert.embeddings.")
    assert not _changed(e2, e3, "bert.encoder.")
    assert _changed(e2, e3, "classifier.")


def test_other_hidden_size_trains_projections(tiny_bert: Path, tmp_path: Path) -> None:
    spec = _spec(
        tiny_bert,
        student={"layers": 2, "init": "random", "init_layers": "skip", "hidden_size": 16},
        distill={"algorithm": "idal"},
    )
    checkpoint = tmp_path / "ckpt"
    first: dict[str, torch.Tensor] = {}

    def report(record: dict[str, Any], save) -> None:
        save(checkpoint)
        saved = torch.load(checkpoint / D.STATE_FILE, weights_only=False)
        if saved.get("finished"):  # a finished run's checkpoint keeps no training state
            return
        state = saved["projections"]
        if not first:
            first.update({k: v.clone() for k, v in state.items()})
        else:
            assert any(not torch.equal(first[k], state[k]) for k in state)

    result = D.distill(spec, report=report)
    assert result.status == "ok", result.error
    assert sorted(first) == ["maps.0.bias", "maps.0.weight", "maps.1.bias", "maps.1.weight"]
    assert first["maps.0.weight"].shape == (32, 16)
    assert all(math.isfinite(r["loss.hidden"]) for r in result.records)
    assert result.student_params < result.teacher_params


def test_cli_run_failing_spec_exits_nonzero(tiny_bert: Path, tmp_path: Path) -> None:
    from kdray.cli import app

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec_dict(tiny_bert)))
    result = CliRunner().invoke(app, ["run", str(spec_file), "--set", "train.epochs=0"])
    assert result.exit_code == 2
    assert "train.epochs" in result.output


# ------------------------------------------------------------------------------ teacher cache


def test_teacher_cache_reuse(tiny_bert: Path, tmp_path: Path, monkeypatch) -> None:
    spec = _spec(tiny_bert, data={"cache_dir": str(tmp_path / "cache")})
    calls: list[str] = []
    real = teacher.fine_tune_teacher

    def counting(*args, **kwargs):
        calls.append("train")
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher, "fine_tune_teacher", counting)
    first = teacher.ensure_teacher(spec)
    assert calls == ["train"]
    assert Path(first.path).parent == tmp_path / "cache" / "teachers"
    assert (Path(first.path) / teacher.TEACHER_INFO_FILE).is_file()
    assert "accuracy" in first.dev_metrics

    def refuse(*args, **kwargs):
        raise AssertionError("the cached teacher should have been reused")

    monkeypatch.setattr(teacher, "fine_tune_teacher", refuse)
    second = teacher.ensure_teacher(spec)
    assert second.path == first.path
    assert second.id == first.id
    assert second.dev_metrics == first.dev_metrics
    # Settings that do not touch the teacher reuse it too.
    assert teacher.ensure_teacher(spec.with_values({"train.lr": 5e-4})).path == first.path

    monkeypatch.setattr(teacher, "fine_tune_teacher", counting)
    other = teacher.ensure_teacher(spec.with_values({"teacher.lr": 5e-4}))
    assert calls == ["train", "train"]
    assert other.path != first.path
    assert other.id != first.id


def test_teacher_key_covers_what_fine_tuning_uses(tiny_bert: Path) -> None:
    task = data.get_task("rte")

    def key(s: Spec) -> str:
        train_ex = data.load_examples(task, "train", s.data.dir)[: s.train.max_train_examples]
        dev_ex = data.load_examples(task, "dev", s.data.dir)
        fingerprint = data.examples_fingerprint(train_ex, dev_ex)
        return teacher.teacher_key(teacher.teacher_settings(s, fingerprint))

    spec = _spec(tiny_bert)
    base = key(spec)
    assert base == key(_spec(tiny_bert))
    # Student-only settings share the teacher.
    student_only = (
        {"train.lr": 5e-4},
        {"distill.algorithm": "pid"},
        {"student.layers": 1},
        {"train.weight_decay": 0.0},
        {"train.max_grad_norm": None},
        {"train.precision": "auto"},  # auto fine-tunes the teacher in fp32 (the default)
        {"train.compile": True},
    )
    for same in student_only:
        assert key(spec.with_values(same)) == base, same
    changes = [
        {"teacher.lr": 5e-4},
        {"teacher.epochs": 2},
        {"teacher.seed": 3},
        {"teacher.batch_size": 2},
        {"teacher.warmup": 0.0},
        {"data.max_seq_length": 16},
        {"train.max_train_examples": 3},
        {"teacher.weight_decay": 0.0},
        {"teacher.max_grad_norm": None},
    ]
    keys = [key(spec.with_values(change)) for change in changes]
    for change, changed in zip(changes, keys, strict=True):
        assert changed != base, change
    assert len(set(keys)) == len(keys)


def test_bad_metric_is_reported_before_the_teacher(tiny_bert: Path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("no teacher should be prepared for a spec that cannot run")

    monkeypatch.setattr(D, "ensure_teacher", refuse)
    monkeypatch.setattr(teacher, "fine_tune_teacher", refuse)
    with pytest.raises(ValueError, match=r"tune.metric 'f1' is not a dev metric of rte"):
        D.distill(_spec(tiny_bert, tune={"metric": "f1"}))


# ------------------------------------------------------------------------------ repeatability


def test_same_seed_same_run_other_seed_differs(tiny_bert: Path) -> None:
    spec = _spec(tiny_bert)
    a = D.distill(spec)
    b = D.distill(spec)
    assert a.status == b.status == "ok"
    assert len(a.records) == 3
    assert _comparable(a.records) == _comparable(b.records)
    assert a.best_metrics == b.best_metrics and a.best_epoch == b.best_epoch

    c = D.distill(spec.with_values({"train.seed": 2}))
    assert c.status == "ok"
    losses_a = [r["loss.total"] for r in a.records]
    losses_c = [r["loss.total"] for r in c.records]
    assert all(x != y for x, y in zip(losses_a, losses_c, strict=True))


# ------------------------------------------------------------------------------ resume


@pytest.mark.parametrize(
    "sections",
    [
        {"distill": {"algorithm": "sid"}},
        {"distill": {"algorithm": "pid", "stages": {"freeze_lower": True}}, "train": {"epochs": 4}},
    ],
    ids=["sid", "pid-frozen"],
)
def test_resume_reproduces_an_uninterrupted_run(
    tiny_bert: Path, tmp_path: Path, sections: dict
) -> None:
    spec = _spec(tiny_bert, **sections)
    checkpoint = tmp_path / "ckpt"
    seen: list[int] = []

    def report(record: dict[str, Any], save) -> None:
        seen.append(record["epoch"])
        if record["epoch"] == 1:
            save(checkpoint)

    full = D.distill(spec, report=report)
    assert full.status == "ok"
    assert seen == list(range(1, spec.train.epochs + 1))
    assert (checkpoint / D.STATE_FILE).is_file()

    resumed = D.distill(spec, resume_from=checkpoint)
    assert resumed.status == "ok", resumed.error
    assert _comparable(resumed.records) == _comparable(full.records)
    # epoch 1 came from the checkpoint, not from training it again
    assert resumed.records[0]["train_seconds"] == full.records[0]["train_seconds"]
    assert resumed.best_metrics == full.best_metrics
    assert resumed.best_epoch == full.best_epoch
    assert resumed.final_metrics == full.final_metrics
    assert resumed.epochs_run == full.epochs_run


def test_a_resumed_run_reports_its_restored_epochs_again_so_tables_that_missed_them_get_them(
    tiny_bert: Path, tmp_path: Path
) -> None:
    # a sweep killed right after the last epoch's checkpoint reached Tune, before its tables
    # were written: the restored trial has nothing left to train, yet its tables need epoch 3
    spec = _spec(tiny_bert)
    checkpoint = tmp_path / "ckpt"

    def save_last(record: dict[str, Any], save) -> None:
        if record["epoch"] == spec.train.epochs:
            save(checkpoint)

    D.distill(spec, report=save_last)
    seen: list[tuple[int, bool]] = []
    resumed = D.distill(
        spec, resume_from=checkpoint, report=lambda r, save: seen.append((r["epoch"], bool(save)))
    )
    assert resumed.status == "ok"
    # every restored epoch once, only the last with a checkpoint, nothing trained again
    assert seen == [(e, e == spec.train.epochs) for e in range(1, spec.train.epochs + 1)]


class _TouchOnUnpickle:
    """Unpickled with ``weights_only=False``, this creates ``marker``: a stand-in for any code a
    hostile checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tiny_bert: Path, tmp_path: Path) -> None:
    spec = _spec(tiny_bert, distill={"algorithm": "soft"}, train={"epochs": 1})
    folder, marker = tmp_path / "ckpt", tmp_path / "pwned"
    folder.mkdir()
    hostile = {"version": D.STATE_VERSION, "records": _TouchOnUnpickle(marker)}
    torch.save(hostile, folder / D.STATE_FILE)

    with pytest.raises(ValueError) as caught:
        D.distill(spec, resume_from=folder)
    message = str(caught.value)
    assert str(folder / D.STATE_FILE) in message
    assert "not a kdray checkpoint" in message and "without resuming" in message
    assert "weights_only" not in message  # torch's advice to load unsafely is not passed on
    assert len(message) < 400
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(folder / D.STATE_FILE, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("content", ["truncated", "garbage", "a list"])
def test_an_unreadable_checkpoint_is_a_clean_error(
    tiny_bert: Path, tmp_path: Path, content: str
) -> None:
    spec = _spec(tiny_bert, distill={"algorithm": "soft"}, train={"epochs": 1})
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = folder / D.STATE_FILE
    torch.save({"version": D.STATE_VERSION, "student": torch.zeros(1000)}, path)
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif content == "garbage":
        path.write_bytes(b"\x80\x02garbage" * 10)
    else:
        torch.save([1, 2, 3], path)

    with pytest.raises(ValueError, match="not a kdray checkpoint") as caught:
        D.distill(spec, resume_from=folder)
    assert str(path) in str(caught.value)
    assert "without resuming" in str(caught.value)
    assert len(str(caught.value)) < 400


# ------------------------------------------------------------------------------ divergence


@pytest.mark.parametrize("nan_from_call", [1, 3])
def test_divergence_is_recorded_and_tables_written(
    tiny_bert: Path, tmp_path: Path, monkeypatch, nan_from_call: int
) -> None:
    spec = _spec(tiny_bert, distill={"algorithm": "soft"})
    real = losses.soft_label_loss
    calls = {"n": 0}

    def exploding(student_logits, teacher_logits, temperature=1.0):
        calls["n"] += 1
        value = real(student_logits, teacher_logits, temperature)
        return value * float("nan") if calls["n"] >= nan_from_call else value

    monkeypatch.setattr(losses, "soft_label_loss", exploding)
    result = D.distill(spec, output_dir=tmp_path / "out")
    assert result.status == "diverged"
    assert "nan" in result.error
    steps_per_epoch = math.ceil(5 / spec.train.batch_size)  # 5 fixture training rows
    epochs_done = (nan_from_call - 1) // steps_per_epoch
    assert result.epochs_run == len(result.records) == epochs_done
    assert f"epoch {epochs_done + 1}" in result.error

    trials_file, epochs_file = results.write_run(tmp_path / "out", spec, result)
    assert trials_file.is_file() and epochs_file.is_file()
    trials, epochs = results.load(tmp_path / "out")
    assert list(trials["status"]) == ["diverged"]
    assert "nan" in trials.iloc[0]["error"]
    assert len(epochs) == epochs_done
    if epochs_done:
        assert list(epochs["epoch"]) == [1]
        assert math.isfinite(epochs.iloc[0]["loss.soft"])


def test_a_learning_rate_that_can_only_blow_up_is_refused_at_load(tiny_bert: Path) -> None:
    """lr 1e30 used to be the way to make a run diverge; now it never starts."""
    with pytest.raises(SpecError, match=r"train\.lr: .*allowed: 0 < lr <= 10"):
        _spec(tiny_bert, train={"lr": 1e30})


def _record(epoch: int, stage: int, loss: float) -> dict[str, Any]:
    return {"epoch": epoch, "stage": stage, "stage_name": f"s{stage}", "loss.total": loss}


def test_an_epoch_loss_over_factor_times_the_first_is_a_blow_up() -> None:
    records = [_record(1, 0, 0.5), _record(2, 0, 0.4)]
    assert D._loss_blown_up(records, 100.0) is None
    # 100 x 0.5 = 50: exactly 50 is not over it, 50.5 is
    assert D._loss_blown_up([*records, _record(3, 0, 50.0)], 100.0) is None
    why = D._loss_blown_up([*records, _record(3, 0, 50.5)], 100.0)
    assert why is not None
    assert "epoch 3 mean total loss 50.5 is over 100 x 0.5" in why
    assert "epoch 1" in why and "train.divergence_factor=100" in why
    assert D._loss_blown_up([*records, _record(3, 0, 1e9)], None) is None


def test_a_blow_up_is_measured_within_a_stage() -> None:
    # stage 0 (one layer's internal loss) starts at 0.01; stage 1 adds terms and starts at 2.0:
    # 2.0 is 200 x 0.01 but the first epoch of its own stage
    records = [_record(1, 0, 0.01), _record(2, 1, 2.0), _record(3, 1, 150.0)]
    assert D._loss_blown_up(records[:2], 100.0) is None
    assert D._loss_blown_up(records, 100.0) is None  # 150 < 100 x 2.0
    why = D._loss_blown_up([*records[:2], _record(3, 1, 201.0)], 100.0)
    assert why is not None and "over 100 x 2, the mean total loss of epoch 2" in why


def _scripted_soft_loss(monkeypatch, per_epoch: list[float], steps_per_epoch: int) -> None:
    """soft_label_loss returns per_epoch[e] in every step of epoch e (with a graph to the
    student's logits, zero gradient), so each epoch's mean total loss is known exactly."""
    calls = {"n": 0}

    def scripted(student_logits, teacher_logits, temperature=1.0):
        value = per_epoch[calls["n"] // steps_per_epoch]
        calls["n"] += 1
        return student_logits.sum() * 0.0 + value

    monkeypatch.setattr(losses, "soft_label_loss", scripted)


def test_cli_run_that_diverges_exits_1_and_says_so(
    tiny_bert: Path, tmp_path: Path, monkeypatch
) -> None:
    """A diverged run wrote its tables, but the student is not what was asked for: a script
    that chains ``kdray run`` must see a non-zero exit, as for a failed run."""
    from kdray.cli import app

    raw = tiny_spec_dict(tiny_bert, name="tiny-diverges", distill={"algorithm": "soft"})
    raw["train"].update({"epochs": 3, "diagnostics": False})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    real = losses.soft_label_loss
    monkeypatch.setattr(
        losses, "soft_label_loss", lambda s, t, temperature=1.0: real(s, t, temperature) * math.nan
    )
    result = CliRunner().invoke(app, ["run", str(spec_file), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output + repr(result.exception)
    assert "run diverged" in result.output
    trials, _ = results.load(tmp_path / "out")
    assert list(trials["status"]) == ["diverged"]  # the tables are written all the same


def test_a_loss_that_grows_past_the_divergence_factor_ends_the_run(
    tiny_bert: Path, monkeypatch
) -> None:
    spec = _spec(
        tiny_bert,
        distill={"algorithm": "soft"},
        train={"epochs": 3, "divergence_factor": 100.0, "diagnostics": False},
    )
    steps = math.ceil(5 / spec.train.batch_size)  # 5 fixture training rows, batches of 4: 2
    _scripted_soft_loss(monkeypatch, [0.5, 60.0, 0.1], steps)
    result = D.distill(spec)
    assert result.status == "diverged"
    # epoch 2's record is kept: 60 > 100 x 0.5
    assert [r["epoch"] for r in result.records] == [1, 2]
    assert [r["loss.total"] for r in result.records] == pytest.approx([0.5, 60.0])
    assert "epoch 2 mean total loss 60 is over 100 x 0.5" in result.error
    assert "train.divergence_factor=100" in result.error


def test_no_divergence_factor_only_nan_or_inf_counts(tiny_bert: Path, monkeypatch) -> None:
    spec = _spec(
        tiny_bert,
        distill={"algorithm": "soft"},
        train={"epochs": 3, "divergence_factor": None, "diagnostics": False},
    )
    _scripted_soft_loss(monkeypatch, [0.5, 60.0, 1e6], math.ceil(5 / spec.train.batch_size))
    result = D.distill(spec)
    assert result.status == "ok", result.error
    assert [r["loss.total"] for r in result.records] == pytest.approx([0.5, 60.0, 1e6])


def test_the_largest_learning_rate_blows_the_loss_up(tiny_bert: Path) -> None:
    """lr 10 without clipping or warm-up: the hard-label loss of the tiny run goes from about
    0.3 in epoch 1 to about 90 in epoch 2 (recorded on CPU), over 100 x its start."""
    spec = _spec(
        tiny_bert,
        distill={"algorithm": "none"},
        train={"lr": 10.0, "max_grad_norm": None, "warmup": 0.0, "diagnostics": False},
    )
    result = D.distill(spec)
    assert result.status == "diverged", (result.status, result.records)
    assert len(result.records) == 2
    first, second = (r["loss.total"] for r in result.records)
    assert second > 100 * first
    assert "epoch 2 mean total loss" in result.error


def test_a_divergence_factor_below_one_is_refused(tiny_bert: Path) -> None:
    with pytest.raises(SpecError, match=r"allowed: 1 <= divergence_factor <= 1000000"):
        _spec(tiny_bert, train={"divergence_factor": 0.5})


# ------------------------------------------------------------------------------ real RTE


@pytest.mark.skipif(
    not (SHARED_GLUE / "RTE" / "train.tsv").is_file(), reason="no shared GLUE RTE data"
)
def test_real_rte_rows(tiny_bert: Path, tmp_path: Path) -> None:
    spec = _spec(
        tiny_bert,
        data={"dir": str(SHARED_GLUE), "max_seq_length": 64},
        teacher={"batch_size": 16},
        train={"epochs": 3, "batch_size": 16, "max_train_examples": 64},
    )
    result = D.distill(spec, output_dir=tmp_path / "out")
    assert result.status == "ok", result.error
    assert [r["stage_name"] for r in result.records] == STAGES["sid"]
    assert all(r["train_examples"] == 64 for r in result.records)
    assert all(math.isfinite(r["loss.total"]) for r in result.records)
    dev = data.load_examples(data.get_task("rte"), "dev", str(SHARED_GLUE))
    assert len(dev) > 200
    assert 0.0 <= result.best_metrics["accuracy"] <= 1.0
    # an accuracy on the full dev set is a multiple of 1/len(dev)
    assert result.best_metrics["accuracy"] * len(dev) == pytest.approx(
        round(result.best_metrics["accuracy"] * len(dev)), abs=1e-6
    )
    assert result.teacher is not None and "accuracy" in result.teacher.dev_metrics
    assert result.student_path and (Path(result.student_path) / "config.json").is_file()
    trials, epochs = results.load(results.write_run(tmp_path / "out", spec, result)[0])
    assert trials.iloc[0]["status"] == "ok"
    assert len(epochs) == 3


def test_resume_keeps_the_best_student_whether_or_not_the_checkpoint_epoch_was_best(
    tiny_bert: Path, tmp_path: Path, monkeypatch
) -> None:
    """A checkpoint stores the best weights once: as the student's own when the saved epoch is
    the best, separately otherwise. Either way a resumed run saves the same best student."""
    from safetensors.torch import load_file

    spec = _spec(
        tiny_bert, distill={"algorithm": "soft"}, train={"epochs": 3, "diagnostics": False}
    )
    real_evaluate = engine.evaluate

    def scripted(accuracies: list[float]):
        # dev accuracy per epoch fixed by the test: epoch 1 is the best, epoch 2 is not
        def evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
            return {**real_evaluate(*args, **kwargs), "accuracy": accuracies.pop(0)}

        return evaluate

    def report(record: dict[str, Any], save) -> None:
        save(tmp_path / f"ckpt-{record['epoch']}")

    teacher.ensure_teacher(spec)  # fine-tuned before dev accuracy is scripted (it evaluates too)
    monkeypatch.setattr(engine, "evaluate", scripted([0.7, 0.5, 0.6]))
    full = D.distill(spec, report=report, output_dir=tmp_path / "full")
    assert full.status == "ok" and full.best_epoch == 1
    expected = load_file(tmp_path / "full" / "student" / "model.safetensors")
    # the last checkpoint of the finished run carries the same best student (a sweep keeps it)
    in_checkpoint = load_file(tmp_path / "ckpt-3" / "student" / "model.safetensors")
    assert all(torch.equal(in_checkpoint[k], expected[k]) for k in expected)
    assert not (tmp_path / "ckpt-2" / "student").exists()  # unfinished: resume state only
    for epoch, is_best, later in ((1, True, [0.5, 0.6]), (2, False, [0.6])):
        folder = tmp_path / f"ckpt-{epoch}"
        state = torch.load(folder / D.STATE_FILE, weights_only=False)
        assert state["best_is_current"] is is_best
        assert (state["best_state"] is None) is is_best
        monkeypatch.setattr(engine, "evaluate", scripted(later))
        resumed = D.distill(spec, resume_from=folder, output_dir=tmp_path / f"resumed-{epoch}")
        assert resumed.status == "ok" and resumed.best_epoch == 1
        got = load_file(tmp_path / f"resumed-{epoch}" / "student" / "model.safetensors")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_bf16_run_on_the_cpu_is_labelled_bf16_in_its_tables(tiny_bert: Path, tmp_path) -> None:
    spec = _spec(
        tiny_bert,
        distill={"algorithm": "soft"},
        train={"epochs": 1, "precision": "bf16", "diagnostics": False},
    )
    result = D.distill(spec)
    assert result.status == "ok", result.error
    assert result.records[0]["precision"] == "bf16"
    trials_file, epochs_file = results.write_run(tmp_path / "out", spec, result)
    trials, epochs = results.load(tmp_path / "out")
    assert trials.iloc[0]["precision"] == "bf16" == trials.iloc[0]["train.precision"]
    assert "precision" not in epochs  # run-level: in the trials table only


def test_cli_run_warns_before_compute_when_max_seq_length_cuts_the_data(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from kdray.cli import app

    raw = tiny_spec_dict(tiny_bert, name="tiny-cut", data={"max_seq_length": 16})
    raw["train"].update({"diagnostics": False})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["run", str(spec_file), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    # 4 of the 5 fixture train rows are longer than 16 tokens
    assert "warning (data.max_seq_length): data.max_seq_length 16 cuts 80% of the train" in text
    assert text.index("warning (data.max_seq_length)") < text.index("kdray run tiny-cut")


def test_cli_run_with_auto_length_records_the_number_and_every_splits_lengths(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from kdray.cli import app

    raw = tiny_spec_dict(tiny_bert, name="tiny-auto", data={"max_seq_length": "auto"})
    raw["train"].update({"diagnostics": False, "epochs": 3})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(spec_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "experiment.json").read_text())
    length = record["spec"]["data"]["max_seq_length"]
    assert isinstance(length, int) and length % 8 == 0  # the number, not "auto"
    assert f"data.max_seq_length auto -> {length}" in " ".join(result.output.split())
    lengths = {row["split"]: row for row in record["lengths"]}
    assert set(lengths) == {"train", "dev"}
    assert lengths["train"]["max_seq_length"] == length
    assert lengths["train"]["cut"] <= 0.05  # auto keeps at least 95 % of train whole
    shown = CliRunner().invoke(app, ["report", str(out)])
    assert "token lengths, train:" in shown.output and "token lengths, dev:" in shown.output


def test_a_finished_runs_checkpoint_is_light_and_resumes_to_the_same_best_student(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """The last checkpoint of a finished run keeps what its tables and kept student need, not
    the training state (student weights, optimiser moments, random state) nothing resumes."""
    from safetensors.torch import load_file

    spec = _spec(tiny_bert, distill={"algorithm": "soft"}, train={"epochs": 2})

    def report(record: dict[str, Any], save) -> None:
        save(tmp_path / f"ckpt-{record['epoch']}")

    full = D.distill(spec, report=report, output_dir=tmp_path / "full")
    assert full.status == "ok"
    middle, last = (tmp_path / f"ckpt-{e}" / D.STATE_FILE for e in (1, 2))
    state = torch.load(last, weights_only=True)
    assert state["finished"] is True
    assert not {"student", "projections", "rng", "best_is_current"} & set(state)
    assert state["best_state"] is None  # the best student is the folder beside it
    assert last.stat().st_size < middle.stat().st_size / 20

    resumed = D.distill(spec, resume_from=last.parent, output_dir=tmp_path / "resumed")
    assert resumed.status == "ok", resumed.error
    assert _comparable(resumed.records) == _comparable(full.records)
    assert (resumed.best_epoch, resumed.best_metrics) == (full.best_epoch, full.best_metrics)
    expected = load_file(tmp_path / "full" / "student" / "model.safetensors")
    got = load_file(tmp_path / "resumed" / "student" / "model.safetensors")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
