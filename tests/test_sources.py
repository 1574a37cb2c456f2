"""Tests for kdray.training.sources and ``data.source``: a task of the user's own from CSV, JSON
Lines, Parquet or a datasets folder, its labels from the data, and its problems found before
compute."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from conftest import tiny_spec_dict
from kdray.spec import SpecError, spec_from_dict
from kdray.training import data

REVIEWS = [
    ("a great film", "pos"),
    ("a dull mess", "neg"),
    ("it was fine", "neutral"),
    ("loved every minute", "pos"),
    ("boring and long", "neg"),
    ("nothing special", "neutral"),
]


def write_csv(path: Path, rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def reviews_csv(folder: Path, dev: list[tuple[Any, ...]] | None = None) -> dict[str, str]:
    """Three-label single-text reviews: train twice the rows, dev the rows once."""
    header = ("review", "sentiment")
    train = write_csv(folder / "train.csv", REVIEWS * 2, header)
    dev_file = write_csv(folder / "dev.csv", REVIEWS if dev is None else dev, header)
    return {"train": str(train), "dev": str(dev_file)}


def source_spec(model: Path, source: dict[str, Any], **sections: Any) -> Any:
    spec = tiny_spec_dict(model, **sections)
    spec["task"] = "reviews"
    spec["data"] = {"source": source, "max_seq_length": 32}
    return spec_from_dict(spec)


def csv_source(files: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"format": "csv", "files": files, "text": ["review"], "label": "sentiment", **extra}


def test_csv_labels_are_numbered_in_sorted_order_and_examples_keep_file_order(
    tmp_path: Path, tiny_bert: Path
) -> None:
    spec = source_spec(tiny_bert, csv_source(reviews_csv(tmp_path)))
    task = data.task_of(spec)
    assert task.labels == ("neg", "neutral", "pos") and task.num_labels == 3
    assert not task.is_pair and task.metrics == ("accuracy",)
    dev = data.spec_examples(spec, "dev")
    assert [(e.text_a, e.text_b, e.label) for e in dev[:3]] == [
        ("a great film", None, 2), ("a dull mess", None, 0), ("it was fine", None, 1)
    ]  # fmt: skip
    assert len(data.spec_examples(spec, "train")) == 12


def test_given_label_names_set_the_ids_and_integer_labels_sort_numerically(
    tmp_path: Path, tiny_bert: Path
) -> None:
    files = reviews_csv(tmp_path)
    spec = source_spec(tiny_bert, csv_source(files, labels=["pos", "neutral", "neg"]))
    assert [e.label for e in data.spec_examples(spec, "dev")[:3]] == [0, 2, 1]
    rows = [("a", 10), ("b", 2), ("c", 1), ("d", 2)]
    numbered = {
        split: str(write_csv(tmp_path / f"n-{split}.csv", rows, ("review", "sentiment")))
        for split in ("train", "dev")
    }
    task = data.task_of(source_spec(tiny_bert, csv_source(numbered)))
    assert task.labels == ("1", "2", "10")  # 2 before 10: numbers, not strings


def test_json_lines_and_parquet_pairs_read_like_csv(tmp_path: Path, tiny_bert: Path) -> None:
    rows = [
        {"premise": f"p{i}", "hypothesis": f"h{i}", "label": ["yes", "no"][i % 2]} for i in range(6)
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "rows.parquet")
    read = {}
    for fmt, file in (("json", "rows.jsonl"), ("parquet", "rows.parquet")):
        where = str(tmp_path / file)
        source = {"format": fmt, "files": {"train": where, "dev": where},
                  "text": ["premise", "hypothesis"], "metrics": ["f1", "accuracy"]}  # fmt: skip
        spec = source_spec(tiny_bert, source)
        task = data.task_of(spec)
        assert task.is_pair and task.labels == ("no", "yes") and task.main_metric == "f1"
        read[fmt] = [(e.text_a, e.text_b, e.label) for e in data.spec_examples(spec, "train")]
    assert read["json"] == read["parquet"]
    assert read["json"][:2] == [("p0", "h0", 1), ("p1", "h1", 0)]


def test_a_saved_datasets_folder_gives_its_class_label_names(
    tmp_path: Path, tiny_bert: Path
) -> None:
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"),
         "label": datasets.ClassLabel(names=["sports", "politics", "tech"])}
    )  # fmt: skip
    rows = {"text": ["goal", "vote", "chip", "match"], "label": [0, 1, 2, 0]}
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(tmp_path / "news")
    source = {"format": "disk", "path": str(tmp_path / "news"), "text": ["text"],
              "splits": {"train": "train", "dev": "test"}}  # fmt: skip
    spec = source_spec(tiny_bert, source)
    assert data.task_of(spec).labels == ("sports", "politics", "tech")
    assert [e.label for e in data.spec_examples(spec, "dev")] == [0, 1, 2, 0]
    wrong = source_spec(tiny_bert, {**source, "splits": {"train": "train", "dev": "validation"}})
    with pytest.raises(data.DataError, match="no split 'validation' .*train, test"):
        data.task_of(wrong)


@pytest.mark.parametrize(
    ("dev_rows", "source_extra", "message"),
    [
        (
            None,
            {"label": "stars"},
            r"data.source.label: .*train.csv has no column 'stars' "
            r"\(columns: review, sentiment\)",
        ),
        ([], {}, r"dev.csv: the split has no rows"),
        (
            [("fine", "pos"), ("meh", "mixed")],
            {},
            r"1 dev rows have labels not in the train split \('mixed'; first at row 1\)",
        ),
        (
            [("", "pos"), ("ok", "neg")],
            {},
            r"dev.csv: text column 'review' is null in 1 of 2 rows, first at row 0",
        ),
        ([("", "pos"), ("", "neg")], {}, r"null in 2 of 2 rows \(every row\)"),
        ([("fine", "pos")], {"metrics": ["f1"]}, r"f1 .* needs two labels; reviews has 3"),
    ],
    ids=["missing-column", "empty-split", "unseen-dev-label", "null-text", "all-null", "f1"],
)
def test_bad_data_fails_before_compute_naming_the_file_column_and_row(
    tmp_path: Path, tiny_bert: Path, dev_rows: list | None, source_extra: dict, message: str
) -> None:
    files = reviews_csv(tmp_path, dev=dev_rows)
    spec = source_spec(tiny_bert, csv_source(files, **source_extra))
    with pytest.raises(data.DataError, match=message):
        data.task_of(spec)


def test_the_pre_flight_refuses_bad_data_and_a_missing_file_with_the_key(
    tmp_path: Path, tiny_bert: Path
) -> None:
    from kdray.experiments import check

    files = reviews_csv(tmp_path, dev=[("fine", "pos"), ("meh", "mixed")])
    rows = check.preflight(source_spec(tiny_bert, csv_source(files)), command="run")
    problem = next(row for row in rows if row.name == "data")
    assert problem.ok is False and "'mixed'" in problem.detail
    missing = csv_source({**files, "dev": str(tmp_path / "nope.csv")})
    rows = check.preflight(source_spec(tiny_bert, missing), command="run")
    problem = next(row for row in rows if row.name == "data")
    assert problem.ok is False and "data.source.files.dev:" in problem.detail


def test_a_source_spec_says_what_each_format_needs() -> None:
    base = {"name": "x", "task": "mine", "teacher": {"model": "m"}}
    cases = [
        ({"format": "csv", "text": ["t"]}, "format csv reads local files: give files:"),
        ({"format": "disk", "text": ["t"]}, "format disk needs path:"),
        ({"format": "csv", "files": {"train": "a", "dev": "b"}, "text": ["t"], "config": "c"},
         "config: is a hub dataset's configuration"),
        ({"format": "csv", "files": {"train": "a", "dev": "b"}, "text": ["t", "t"]},
         "text: and label: name different columns"),
    ]  # fmt: skip
    for source, message in cases:
        with pytest.raises(SpecError, match=message):
            spec_from_dict({**base, "data": {"source": source}})
    with pytest.raises(SpecError, match=r"'mine' is not a GLUE task .*give data.source"):
        spec_from_dict(base)


def test_relative_source_files_are_read_from_where_kdray_runs(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reviews_csv(tmp_path)
    monkeypatch.chdir(tmp_path)
    spec = source_spec(tiny_bert, csv_source({"train": "train.csv", "dev": "dev.csv"}))
    assert spec.data.source.files == {
        "train": str(tmp_path / "train.csv"), "dev": str(tmp_path / "dev.csv")
    }  # fmt: skip


def test_a_glue_spec_keeps_the_fingerprint_it_had_before_data_source_existed() -> None:
    """Recorded experiments stay resumable: the value is what main computed at afadb35 (whose
    rte-cpu.yaml trained in fp32; the file now says auto)."""
    from conftest import REPO
    from kdray.spec import load_spec

    spec = load_spec(REPO / "search_spaces" / "rte-cpu.yaml", ["train.precision=fp32"])
    assert spec.data.source is None and spec.fingerprint() == "c7943da39bf22e46"


def test_a_csv_tasks_student_exports_with_a_card_that_names_its_own_data(
    tmp_path: Path, tiny_bert: Path
) -> None:
    from huggingface_hub import ModelCard
    from typer.testing import CliRunner

    from kdray.cli import app

    raw = tiny_spec_dict(tiny_bert, train={"epochs": 2}, distill={"algorithm": "soft"})
    raw.update(task="reviews", data={"source": csv_source(reviews_csv(tmp_path)),
                                     "max_seq_length": 32})  # fmt: skip
    (tmp_path / "reviews.yaml").write_text(yaml.safe_dump(raw))
    cli = CliRunner()
    ran = cli.invoke(app, ["run", str(tmp_path / "reviews.yaml"), "--out", str(tmp_path / "r")])
    assert ran.exit_code == 0, ran.output[-2000:]
    done = cli.invoke(app, ["export", str(tmp_path / "r"), "--to", str(tmp_path / "student")])
    assert done.exit_code == 0, done.output[-2000:]
    card = ModelCard.load(tmp_path / "student" / "README.md")
    trials = pd.read_parquet(tmp_path / "r" / "trials.parquet")
    (result,) = card.data.eval_results
    assert result.dataset_name == "reviews (csv data)" and result.dataset_type == "reviews"
    assert result.metric_value == pytest.approx(trials["best.dev.accuracy"].iloc[0])
    assert card.data.datasets is None and "glue" not in card.data.tags
    assert "labels 0 `neg`, 1 `neutral`, 2 `pos`" in card.text and "GLUE" not in card.text
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
