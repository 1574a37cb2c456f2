"""Layer maps, student construction from a tiny teacher, projections and attention outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_tiny_bert
from kdray.training import models
from kdray.training import teacher as teacher_mod
from kdray.training.models import ModelError, Projections, build_student, resolve_layer_map

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ layer maps


@pytest.mark.parametrize(
    ("choice", "n_student", "n_teacher", "expected"),
    [
        ("skip", 6, 12, [2, 4, 6, 8, 10, 12]),
        ("skip", 3, 6, [2, 4, 6]),
        ("skip", 4, 12, [3, 6, 9, 12]),
        ("skip", 2, 4, [2, 4]),
        ("skip", 4, 4, [1, 2, 3, 4]),
        ("first", 3, 6, [1, 2, 3]),
        ("first", 6, 12, [1, 2, 3, 4, 5, 6]),
        ("last", 3, 6, [4, 5, 6]),
        ("last", 6, 12, [7, 8, 9, 10, 11, 12]),
        ("last", 1, 4, [4]),
        ([1, 3, 6], 3, 6, [1, 3, 6]),
        ([6, 6, 1], 3, 6, [6, 6, 1]),
    ],
)
def test_resolve_layer_map(choice, n_student: int, n_teacher: int, expected: list[int]) -> None:
    assert resolve_layer_map(choice, n_student, n_teacher) == expected


def test_explicit_layer_map_is_copied() -> None:
    given = [2, 4]
    result = resolve_layer_map(given, 2, 4)
    result.append(9)
    assert given == [2, 4]


@pytest.mark.parametrize("given", [[2, 4], [1, 2, 3, 4]])
def test_layer_list_of_wrong_length(given: list[int]) -> None:
    with pytest.raises(ModelError) as info:
        resolve_layer_map(given, 3, 6)
    message = str(info.value)
    assert f"{len(given)} entries" in message
    assert "3 layers" in message


@pytest.mark.parametrize("given", [[1, 2, 7], [0, 2, 4], [-1, 2, 4]])
def test_layer_list_out_of_range(given: list[int]) -> None:
    with pytest.raises(ModelError) as info:
        resolve_layer_map(given, 3, 6)
    message = str(info.value)
    assert "do not exist" in message
    assert "1..6" in message
    bad = [t for t in given if not 1 <= t <= 6]
    assert str(bad) in message


@pytest.mark.parametrize("choice", ["skip", "first", "last", [1, 2, 3, 4, 5]])
def test_student_deeper_than_teacher(choice) -> None:
    with pytest.raises(ModelError) as info:
        resolve_layer_map(choice, 5, 4)
    assert "5 layers" in str(info.value)
    assert "only 4" in str(info.value)


def test_unknown_strategy() -> None:
    with pytest.raises(ModelError, match="unknown layer strategy"):
        resolve_layer_map("middle", 2, 4)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ students


@pytest.fixture(scope="module")
def teacher(tiny_bert: Path) -> nn.Module:
    """The tiny 4-layer, 32-wide, 4-head teacher, loaded like kdray loads teachers."""
    return models.load_classifier(str(tiny_bert), 2)


@pytest.fixture(scope="module")
def two_head_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("two-heads"), layers=2, heads=2)


def _inputs(batch: int = 3, length: int = 9, pad_from: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (batch, length), generator=generator)
    ids[:, 0] = 101
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, pad_from:] = 0  # the first example is padded
    ids[0, pad_from:] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
    }


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_teacher_is_eager(teacher: nn.Module) -> None:
    assert teacher.config._attn_implementation == "eager"
    assert models.num_layers(teacher) == 4


@pytest.mark.parametrize(
    ("init_layers", "chosen"),
    [("skip", [2, 4]), ("first", [1, 2]), ("last", [3, 4]), ([3, 1], [3, 1])],
)
def test_teacher_init_copies_embeddings_and_chosen_layers(
    teacher: nn.Module, init_layers, chosen: list[int]
) -> None:
    student = build_student(
        teacher, layers=2, init="teacher", init_layers=init_layers, num_labels=2
    )
    s_base, t_base = student.bert, teacher.bert
    assert models.num_layers(student) == 2
    assert student.config.hidden_size == teacher.config.hidden_size
    assert _same(s_base.embeddings, t_base.embeddings)
    for s_index, t_layer in enumerate(chosen):
        assert _same(s_base.encoder.layer[s_index], t_base.encoder.layer[t_layer - 1])
        # and not some other teacher layer
        for other in range(4):
            if other != t_layer - 1:
                assert not _same(s_base.encoder.layer[s_index], t_base.encoder.layer[other])
    assert _same(s_base.pooler, t_base.pooler)
    # The classifier head starts fresh, with the task's labels.
    assert student.classifier.out_features == 2
    assert student.config._attn_implementation == "eager"


def test_teacher_init_leaves_teacher_untouched(teacher: nn.Module) -> None:
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_student(teacher, layers=2, init="teacher", init_layers="skip", num_labels=2)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(1.0)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_teacher_init_number_of_labels(teacher: nn.Module) -> None:
    student = build_student(teacher, layers=1, init="teacher", init_layers="last", num_labels=3)
    assert student.classifier.out_features == 3
    assert student.config.num_labels == 3


def test_random_init(teacher: nn.Module) -> None:
    torch.manual_seed(0)
    student = build_student(teacher, layers=3, init="random", init_layers="skip", num_labels=2)
    assert models.num_layers(student) == 3
    assert student.config.hidden_size == teacher.config.hidden_size
    assert not _same(student.bert.embeddings, teacher.bert.embeddings)
    for index in range(3):
        assert not _same(student.bert.encoder.layer[index], teacher.bert.encoder.layer[index])
    # seeded by the caller: the same seed gives the same student
    torch.manual_seed(0)
    again = build_student(teacher, layers=3, init="random", init_layers="skip", num_labels=2)
    assert _same(student, again)


def test_random_init_other_hidden_size_gets_projections(teacher: nn.Module) -> None:
    student = build_student(
        teacher,
        layers=2,
        init="random",
        init_layers="skip",
        num_labels=2,
        hidden_size=16,
        intermediate_size=24,
    )
    assert student.config.hidden_size == 16
    assert student.config.intermediate_size == 24
    assert student.bert.encoder.layer[0].intermediate.dense.out_features == 24
    projections = Projections(student.config.hidden_size, teacher.config.hidden_size, 2)
    assert projections.needed
    assert len(projections.maps) == 2
    for linear in projections.maps:
        assert isinstance(linear, nn.Linear)
        assert (linear.in_features, linear.out_features) == (16, 32)
    out = student(**_inputs(), output_hidden_states=True)
    cls = out.hidden_states[1][:, 0]
    assert projections(cls, 1).shape == (3, 32)
    assert projections(cls, 2).shape == (3, 32)
    assert not torch.equal(projections(cls, 1), projections(cls, 2))


def test_same_hidden_size_needs_no_projection() -> None:
    projections = Projections(32, 32, 3)
    assert not projections.needed
    assert list(projections.parameters()) == []
    x = torch.randn(2, 32)
    assert projections(x, 2) is x


def test_other_head_count_raises(teacher: nn.Module, two_head_bert: Path) -> None:
    with pytest.raises(ModelError) as info:
        build_student(teacher, layers=2, init=str(two_head_bert), init_layers="skip", num_labels=2)
    message = str(info.value)
    assert "attention heads" in message
    assert "2" in message and "4" in message
    assert "same number of heads" in message


def test_init_from_model_with_wrong_depth(teacher: nn.Module, two_head_bert: Path) -> None:
    with pytest.raises(ModelError, match="has 2 layers but student.layers is 3"):
        build_student(teacher, layers=3, init=str(two_head_bert), init_layers="skip", num_labels=2)


def test_init_from_model_folder(teacher: nn.Module, tmp_path: Path) -> None:
    folder = make_tiny_bert(tmp_path / "other", layers=2, heads=4, seed=5)
    student = build_student(teacher, layers=2, init=str(folder), init_layers="skip", num_labels=2)
    reference = models.load_classifier(str(folder), 2)
    assert _same(student.bert.encoder, reference.bert.encoder)


def test_teacher_init_deeper_student_raises(teacher: nn.Module) -> None:
    with pytest.raises(ModelError, match="only 4"):
        build_student(teacher, layers=5, init="teacher", init_layers="skip", num_labels=2)


def test_missing_model_folder_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot load model"):
        models.load_classifier(str(tmp_path / "missing"), 2)


# ------------------------------------------------------------------------------ attention out


@pytest.mark.parametrize("training", [False, True])
def test_attention_probabilities_come_out(teacher: nn.Module, training: bool) -> None:
    """Eager attention returns one [B, H, T, T] map per layer whose rows are distributions over
    the real keys, in training mode too (the attention KL compares probabilities)."""
    student = build_student(teacher, layers=2, init="teacher", init_layers="skip", num_labels=2)
    student.train(training)
    inputs = _inputs()
    out = student(**inputs, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2
    assert len(out.hidden_states) == 3  # embeddings + 2 layers
    mask = inputs["attention_mask"].bool()
    for attn in out.attentions:
        assert attn.shape == (3, 4, 9, 9)
        assert torch.allclose(attn.sum(-1), torch.ones(3, 4, 9), atol=1e-5)
        assert (attn >= 0).all()
        # padding keys get (numerically) no probability
        assert attn[0, :, :, ~mask[0]].max() < 1e-6


def test_copied_layers_attend_like_the_teacher(teacher: nn.Module) -> None:
    """A student whose layers 1-2 are copies of teacher layers 1-2 has the same attention maps."""
    student = build_student(teacher, layers=2, init="teacher", init_layers="first", num_labels=2)
    student.eval()
    teacher.eval()
    inputs = _inputs()
    s_out = student(**inputs, output_attentions=True)
    with torch.no_grad():
        t_out = teacher(**inputs, output_attentions=True)
    for layer in range(2):
        assert torch.allclose(s_out.attentions[layer], t_out.attentions[layer], atol=1e-6)


def test_encoder_parts_numbering(teacher: nn.Module) -> None:
    student = build_student(teacher, layers=2, init="teacher", init_layers="skip", num_labels=2)
    parts = models.encoder_parts(student)
    assert sorted(parts) == [0, 1, 2]
    assert parts[0] is student.bert.embeddings
    assert parts[2] is student.bert.encoder.layer[1]


# ------------------------------------------------------------------------------ teacher cache


def test_save_teacher_round_trip(teacher: nn.Module, tiny_bert: Path, tmp_path: Path) -> None:
    tokenizer = models.load_tokenizer(str(tiny_bert))
    key = teacher_mod.teacher_key({"a": 1, "b": [1, 2]})
    assert key == teacher_mod.teacher_key({"b": [1, 2], "a": 1})
    assert key != teacher_mod.teacher_key({"a": 2, "b": [1, 2]})
    target = teacher_mod.teacher_dir(tmp_path, key)
    info = teacher_mod.save_teacher(
        teacher, tokenizer, target, {"id": key, "dev_metrics": {"accuracy": 0.5}, "settings": {}}
    )
    assert Path(info.path) == target.resolve()
    assert info.dev_metrics == {"accuracy": 0.5}
    assert [p.name for p in target.parent.iterdir()] == [key]  # no temp folder left
    reloaded = models.load_classifier(info.path, 2)
    assert _same(reloaded, teacher)
    assert teacher_mod.TeacherInfo.read(tmp_path / "nothing") is None


def test_model_fingerprint_follows_the_files(tmp_path: Path) -> None:
    a = make_tiny_bert(tmp_path / "a", layers=1, seed=1)
    b = make_tiny_bert(tmp_path / "b", layers=1, seed=1)
    c = make_tiny_bert(tmp_path / "c", layers=1, seed=2)
    assert teacher_mod.model_fingerprint(str(a)) == teacher_mod.model_fingerprint(str(b))
    assert teacher_mod.model_fingerprint(str(a)) != teacher_mod.model_fingerprint(str(c))


class _RunsCode:
    """Unpickling this runs code: what a hostile pytorch_model.bin does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        import os

        return (os.system, (f"touch {self.marker}",))


def _pickle_teacher(folder: Path, tiny: Path, marker: Path) -> Path:
    import pickle
    import shutil

    shutil.copytree(tiny, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _RunsCode(str(marker))}))
    return folder


def test_a_teacher_whose_weights_are_a_code_running_pickle_is_refused_in_one_paragraph(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from conftest import tiny_spec_dict
    from kdray.cli import app
    from kdray.experiments import check
    from kdray.spec import spec_from_dict
    from kdray.training.models import load_classifier

    marker = tmp_path / "code-ran"
    folder = _pickle_teacher(tmp_path / "hostile", tiny_bert, marker)
    with pytest.raises(ModelError) as error:
        load_classifier(str(folder), 2)
    assert "is a pickle that weights-only loading refuses" in str(error.value)
    assert "no code from it ran" in str(error.value)
    spec = spec_from_dict(tiny_spec_dict(folder))
    rows = {row.name: row for row in check.preflight(spec, command="run", out_dir=tmp_path / "o")}
    assert rows["teacher.model"].ok is False
    assert "pytorch_model.bin is a pickle" in rows["teacher.model"].detail
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps(tiny_spec_dict(folder)))
    result = CliRunner().invoke(app, ["run", str(spec_file), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "weights-only loading refuses" in " ".join(result.output.split())
    assert not marker.exists()  # nothing it carried ran


def test_a_mean_pooled_teacher_classifies_the_masked_mean_and_loads_back_as_one(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from kdray.training.models import MeanPooledBert, build_student, load_classifier

    teacher = load_classifier(str(tiny_bert), 2, new_head=True, pooling="mean").eval()
    assert isinstance(teacher, MeanPooledBert)
    ids = torch.tensor([[101, 2023, 2003, 102, 0], [101, 7592, 102, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        last = out.hidden_states[-1]
        by_hand = torch.stack([last[0, :4].mean(0), last[1, :3].mean(0)])  # real tokens only
        assert torch.allclose(out.logits, teacher.classifier(by_hand), atol=1e-6)
    teacher.save_pretrained(tmp_path / "teacher")
    again = load_classifier(str(tmp_path / "teacher"), 2)
    assert isinstance(again, MeanPooledBert)  # the saved config keeps the head
    student = build_student(again, layers=2, init="teacher", init_layers="skip", num_labels=2)
    assert student.config.kdray_pooling == "cls" and not isinstance(student, MeanPooledBert)
