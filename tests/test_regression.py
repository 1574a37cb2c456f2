"""Tests for regression tasks (GLUE STS-B, a data.source of scores): the loss terms, the
metrics, the data path and a whole study, with hand-computed expected values."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

from conftest import FIXTURE_GLUE
from kdray.method import losses
from kdray.spec import SpecError, spec_from_dict
from kdray.training import data


def test_a_one_output_head_trains_on_squared_error_against_gold_and_teacher_scores() -> None:
    student = torch.tensor([[1.0], [3.0]])
    gold = torch.tensor([2.0, 2.0])
    assert losses.hard_label_loss(student, gold).item() == pytest.approx(1.0)  # (1 + 1) / 2
    teacher = torch.tensor([[0.0], [5.0]])
    # (1 - 0)^2 and (3 - 5)^2 averaged: 2.5; a temperature has nothing to soften
    for temperature in (1.0, 4.0):
        loss = losses.soft_label_loss(student, teacher, temperature)
        assert loss.item() == pytest.approx(2.5)


def test_stsb_scores_by_pearson_and_spearman_and_says_nan_for_a_constant_prediction() -> None:
    task = data.get_task("stsb")
    assert task.regression and task.num_labels == 1 and task.main_metric == "pearson"
    scores = data.compute_metrics(task, [[1.0], [2.0], [3.0]], [1.0, 2.0, 4.0])
    # deviations (-1, 0, 1) and (-4/3, -1/3, 5/3): covariance 3, r = 3 / sqrt(2 * 42/9)
    assert scores["pearson"] == pytest.approx(3 / math.sqrt(2 * 42 / 9))
    assert scores["spearman"] == pytest.approx(1.0)  # the same order
    flat = data.compute_metrics(task, [2.0, 2.0, 2.0], [1.0, 2.0, 4.0])
    assert math.isnan(flat["pearson"]) and math.isnan(flat["spearman"])


def test_stsb_files_read_as_float_scores_and_a_bad_score_names_its_line(tmp_path: Path) -> None:
    dev = data.read_local("stsb", FIXTURE_GLUE, "dev")
    assert [e.label for e in dev[:2]] == [4.4, 0.2]
    assert (dev[0].text_a, dev[0].text_b) == ("A boy is riding a bicycle.", "A child rides a bike.")
    test = data.read_test("stsb", FIXTURE_GLUE, "test")
    assert len(test.examples) == 4 and test.ids[0] == "0"
    bad = tmp_path / "STS-B"
    bad.mkdir()
    lines = (FIXTURE_GLUE / "STS-B" / "dev.tsv").read_text().splitlines()
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\thigh"
    (bad / "dev.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match=r"dev.tsv:3: the score 'high' is not a finite"):
        data.read_local("stsb", tmp_path, "dev")


def test_float_scores_survive_the_tokenisation_cache_and_batch_as_float32(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from kdray.training.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_bert))
    dev = data.read_local("stsb", FIXTURE_GLUE, "dev")
    live = data.tokenize(dev, tokenizer, 32, tmp_path)
    cached = data.tokenize(dev, tokenizer, 32, tmp_path)  # read back from the Arrow file
    assert cached.labels == live.labels == [e.label for e in dev]
    batch = data.collate([cached[0], cached[1]])
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([4.4, 0.2])


def test_a_regression_source_reads_numeric_scores_and_refuses_words(
    tmp_path: Path, tiny_bert: Path
) -> None:
    from conftest import tiny_spec_dict

    rows = "a,b,score\nx y,x y,4.5\nx y,z w,1\nq,r,2.25\n"
    (tmp_path / "train.csv").write_text(rows)
    (tmp_path / "dev.csv").write_text(rows.replace("2.25", "high"))
    files = {"train": str(tmp_path / "train.csv"), "dev": str(tmp_path / "dev.csv")}
    source = {"format": "csv", "files": files, "text": ["a", "b"], "label": "score",
              "type": "regression"}  # fmt: skip
    raw = tiny_spec_dict(tiny_bert, task="pairs", data={"source": source})
    spec = spec_from_dict(raw)
    with pytest.raises(data.DataError, match=r"score column 'score' holds 'high' at row 2"):
        data.task_of(spec)
    (tmp_path / "dev.csv").write_text(rows)  # fixed: read again, not a stale copy
    task = data.task_of(spec)
    assert task.regression and task.metrics == ("pearson", "spearman")
    assert [e.label for e in data.spec_examples(spec, "train")] == [4.5, 1.0, 2.25]
    for extra, message in (({"metrics": ["accuracy"]}, "accuracy not for a regression task"),
                           ({"labels": ["a", "b"]}, "a regression has scores")):  # fmt: skip
        with pytest.raises(SpecError, match=message):
            spec_from_dict(tiny_spec_dict(tiny_bert, task="pairs",
                                          data={"source": {**source, **extra}}))  # fmt: skip


def stsb_study(model: Path) -> dict[str, Any]:
    from test_sweep import study_spec

    raw = study_spec(model, "stsb-study")
    raw["task"] = "stsb"
    raw["tune"]["num_samples"] = 2
    raw["study"]["confirm"]["top_k"] = 1
    return raw


def test_kdray_study_on_stsb_and_its_export_predict_the_dev_scores_it_recorded(
    cluster: Any, tiny_bert: Path, tmp_path: Path
) -> None:
    from test_sweep import _assert_whole_study, _study_cli
    from typer.testing import CliRunner

    from kdray.cli import app

    spec_file = tmp_path / "stsb-study.yaml"
    spec_file.write_text(yaml.safe_dump(stsb_study(tiny_bert)))
    out = tmp_path / "study"
    result = _study_cli(str(spec_file), "--out", str(out), "--address", cluster.address)
    assert result.exit_code == 0, result.output[-3000:]
    _assert_whole_study(out, metric="pearson")
    sweep = pd.read_parquet(out / "sweep" / "trials.parquet")
    assert set(sweep["status"]) == {"ok"} and set(sweep["metric"]) == {"pearson"}
    cli = CliRunner()
    done = cli.invoke(app, ["export", str(out / "sweep"), "--to", str(tmp_path / "student")])
    assert done.exit_code == 0, done.output[-2000:]
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["problem_type"] == "regression" and config["id2label"] == {"0": "score"}
    predicted = cli.invoke(
        app, ["predict", str(tmp_path / "student"), "--split", "dev",
              "--data-dir", str(FIXTURE_GLUE), "--out", str(tmp_path / "pred")],
    )  # fmt: skip
    assert predicted.exit_code == 0, predicted.output[-2000:]
    metrics = json.loads((tmp_path / "pred" / "metrics.json").read_text())["dev"]
    best = sweep.loc[sweep["best.dev.pearson"].idxmax()]
    # other batches, other float sums: tiny students' near-flat scores move the 5th decimal
    assert metrics["pearson"] == pytest.approx(best["best.dev.pearson"], abs=1e-4)
    assert metrics["spearman"] == pytest.approx(best["best.dev.spearman"], abs=1e-4)
