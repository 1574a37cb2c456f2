"""GLUE data: task registry, readers for local TSV files and the HF hub, metrics, tokenization.

Local files follow the layout written by the widely used ``download_glue_data.py`` script
(``<glue_dir>/<TASK>/<split>.tsv``). Labels are always ids in the order of the Hugging Face
``nyu-mll/glue`` dataset, so a model trained on local files and one trained on hub data agree.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdray.infra import remote
from kdray.infra.store import atomic_file, cache_root, content_hash, file_digest
from kdray.training import sources
from kdray.training.models import load_tokenizer

if TYPE_CHECKING:
    from kdray.spec import SourceSpec, Spec

__all__ = [
    "TASKS",
    "DataError",
    "Example",
    "GlueTask",
    "Prepared",
    "TestSplit",
    "TokenizedSplit",
    "collate",
    "compute_metrics",
    "get_task",
    "load_examples",
    "load_hub",
    "prepare",
    "read_local",
    "read_test",
    "spec_examples",
    "task_of",
    "tokenize",
]

logger = logging.getLogger(__name__)

GLUE_DIR_ENV = "KDRAY_GLUE_DIR"
HUB_DATASET = "nyu-mll/glue"
_CACHE_FORMAT = "kdray-tokenized-v1"
_FIX_HINT = (
    "Point data.dir (config) or $KDRAY_GLUE_DIR at a folder in the download_glue_data.py layout, "
    "e.g. <dir>/RTE/train.tsv, <dir>/MNLI/dev_matched.tsv."
)


class DataError(ValueError):
    """Raised for missing/malformed data; the message names the file (and line) or where we looked.

    A ValueError subclass so callers that only know "bad input" still catch it.
    """


@dataclass(frozen=True)
class GlueTask:
    """Everything needed to read one GLUE classification task from disk or from the hub.

    The ``file_*`` fields describe the download_glue_data.py TSV layout; they are private parsing
    details that other modules need not use.
    """

    name: str
    hub_columns: tuple[str, ...]
    labels: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    dev_split: str
    local_dir: str
    local_files: Mapping[str, str] = field(hash=False)
    # split -> hub split name ("train", "dev" and, for MNLI, "dev_mismatched").
    hub_splits: Mapping[str, str] = field(hash=False, repr=False)
    # split -> the file's columns (its header, or positional names when it has none).
    file_columns: Mapping[str, tuple[str, ...]] = field(hash=False, repr=False)
    file_has_header: bool = field(default=True, repr=False)
    file_text_columns: tuple[str, ...] = field(default=(), repr=False)
    file_label_column: str = field(default="label", repr=False)
    # Label values as written in the file, in id order (same order as ``labels``).
    file_label_values: tuple[str, ...] = field(default=(), repr=False)
    # QQP's train file has a few rows broken by embedded newlines; the hub loader drops them too.
    skip_malformed_rows: bool = field(default=False, repr=False)
    # Unlabelled test files: split -> file, and their columns (all with a header, the first
    # column the row id the GLUE server expects back).
    test_files: Mapping[str, str] = field(default_factory=dict, hash=False, repr=False)
    test_columns: tuple[str, ...] = field(default=(), repr=False)
    # A score to predict (STS-B): one output, ``labels`` its single name, float labels.
    regression: bool = False

    @property
    def num_labels(self) -> int:
        """Size of the classifier head (1 for a regression: the score)."""
        return len(self.labels)

    @property
    def is_pair(self) -> bool:
        """Whether examples carry a second text (``text_b``)."""
        return len(self.hub_columns) == 2

    @property
    def dev_splits(self) -> tuple[str, ...]:
        """The labelled evaluation splits: ``dev`` (and MNLI's ``dev_mismatched``)."""
        return tuple(s for s in self.local_files if s != "train")

    @property
    def test_splits(self) -> tuple[str, ...]:
        """The unlabelled test splits: ``test`` (and MNLI's ``test_mismatched``)."""
        return tuple(self.test_files)

    def submission_file(self, split: str) -> str:
        """The file name the GLUE server expects for this task's predictions on ``split``
        (``RTE.tsv``, ``SST-2.tsv``; MNLI's matched and mismatched halves are ``MNLI-m.tsv`` and
        ``MNLI-mm.tsv``)."""
        if self.name == "mnli":
            return "MNLI-mm.tsv" if split.endswith("mismatched") else "MNLI-m.tsv"
        return f"{self.local_dir}.tsv"


def _task(
    name: str,
    *,
    hub_columns: tuple[str, ...],
    labels: tuple[str, ...],
    metrics: tuple[str, ...],
    main_metric: str,
    local_dir: str,
    columns: tuple[str, ...],
    text_columns: tuple[str, ...],
    label_column: str,
    label_values: tuple[str, ...],
    test_columns: tuple[str, ...],
    has_header: bool = True,
    dev_columns: tuple[str, ...] | None = None,
    mnli: bool = False,
    skip_malformed_rows: bool = False,
    regression: bool = False,
) -> GlueTask:
    """Build a task with the usual train/dev split names so the table below stays readable."""
    files = {"train": "train.tsv", "dev": "dev.tsv"}
    hub = {"train": "train", "dev": "validation"}
    tests = {"test": "test.tsv"}
    if mnli:
        tests = {"test": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv"}
        files = {
            "train": "train.tsv",
            "dev": "dev_matched.tsv",
            "dev_mismatched": "dev_mismatched.tsv",
        }
        hub = {
            "train": "train",
            "dev": "validation_matched",
            "dev_mismatched": "validation_mismatched",
        }
    dev_cols = dev_columns or columns
    file_columns = {split: (columns if split == "train" else dev_cols) for split in files}
    return GlueTask(
        name=name,
        hub_columns=hub_columns,
        labels=labels,
        metrics=metrics,
        main_metric=main_metric,
        dev_split=hub["dev"],
        local_dir=local_dir,
        local_files=MappingProxyType(files),
        hub_splits=MappingProxyType(hub),
        file_columns=MappingProxyType(file_columns),
        file_has_header=has_header,
        file_text_columns=text_columns,
        file_label_column=label_column,
        file_label_values=label_values,
        skip_malformed_rows=skip_malformed_rows,
        test_files=MappingProxyType(tests),
        test_columns=test_columns,
        regression=regression,
    )


_NLI2 = ("entailment", "not_entailment")
_BIN = ("0", "1")
_MNLI_PREFIX = (
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
)

_STSB_COLUMNS = ("index", "genre", "filename", "year", "old_index", "source1", "source2")

TASKS: dict[str, GlueTask] = {
    "cola": _task(
        "cola",
        hub_columns=("sentence",),
        labels=("unacceptable", "acceptable"),
        metrics=("matthews",),
        main_metric="matthews",
        local_dir="CoLA",
        columns=("source", "label", "original_mark", "sentence"),
        has_header=False,
        text_columns=("sentence",),
        test_columns=("index", "sentence"),
        label_column="label",
        label_values=_BIN,
    ),
    "sst2": _task(
        "sst2",
        hub_columns=("sentence",),
        labels=("negative", "positive"),
        metrics=("accuracy",),
        main_metric="accuracy",
        local_dir="SST-2",
        columns=("sentence", "label"),
        text_columns=("sentence",),
        test_columns=("index", "sentence"),
        label_column="label",
        label_values=_BIN,
    ),
    "mrpc": _task(
        "mrpc",
        hub_columns=("sentence1", "sentence2"),
        labels=("not_equivalent", "equivalent"),
        metrics=("accuracy", "f1"),
        main_metric="accuracy",
        local_dir="MRPC",
        columns=("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
        text_columns=("#1 String", "#2 String"),
        test_columns=("index", "#1 ID", "#2 ID", "#1 String", "#2 String"),
        label_column="Quality",
        label_values=_BIN,
    ),
    "qqp": _task(
        "qqp",
        hub_columns=("question1", "question2"),
        labels=("not_duplicate", "duplicate"),
        metrics=("accuracy", "f1"),
        main_metric="accuracy",
        local_dir="QQP",
        columns=("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
        text_columns=("question1", "question2"),
        test_columns=("id", "question1", "question2"),
        label_column="is_duplicate",
        label_values=_BIN,
        skip_malformed_rows=True,
    ),
    "mnli": _task(
        "mnli",
        hub_columns=("premise", "hypothesis"),
        labels=("entailment", "neutral", "contradiction"),
        metrics=("accuracy",),
        main_metric="accuracy",
        local_dir="MNLI",
        columns=(*_MNLI_PREFIX, "label1", "gold_label"),
        dev_columns=(*_MNLI_PREFIX, "label1", "label2", "label3", "label4", "label5", "gold_label"),
        text_columns=("sentence1", "sentence2"),
        test_columns=_MNLI_PREFIX,
        label_column="gold_label",
        label_values=("entailment", "neutral", "contradiction"),
        mnli=True,
    ),
    "qnli": _task(
        "qnli",
        hub_columns=("question", "sentence"),
        labels=_NLI2,
        metrics=("accuracy",),
        main_metric="accuracy",
        local_dir="QNLI",
        columns=("index", "question", "sentence", "label"),
        text_columns=("question", "sentence"),
        test_columns=("index", "question", "sentence"),
        label_column="label",
        label_values=_NLI2,
    ),
    "rte": _task(
        "rte",
        hub_columns=("sentence1", "sentence2"),
        labels=_NLI2,
        metrics=("accuracy",),
        main_metric="accuracy",
        local_dir="RTE",
        columns=("index", "sentence1", "sentence2", "label"),
        text_columns=("sentence1", "sentence2"),
        test_columns=("index", "sentence1", "sentence2"),
        label_column="label",
        label_values=_NLI2,
    ),
    "wnli": _task(
        "wnli",
        hub_columns=("sentence1", "sentence2"),
        labels=("not_entailment", "entailment"),
        metrics=("accuracy",),
        main_metric="accuracy",
        local_dir="WNLI",
        columns=("index", "sentence1", "sentence2", "label"),
        text_columns=("sentence1", "sentence2"),
        test_columns=("index", "sentence1", "sentence2"),
        label_column="label",
        label_values=_BIN,
    ),
    "stsb": _task(
        "stsb",
        hub_columns=("sentence1", "sentence2"),
        labels=("score",),
        metrics=("pearson", "spearman"),
        main_metric="pearson",
        local_dir="STS-B",
        columns=(*_STSB_COLUMNS, "sentence1", "sentence2", "score"),
        text_columns=("sentence1", "sentence2"),
        test_columns=(*_STSB_COLUMNS, "sentence1", "sentence2"),
        label_column="score",
        label_values=(),
        regression=True,
    ),
}

_UNSUPPORTED = {
    "ax": "AX is a test-only diagnostic set without training data",
}


def get_task(name: str | GlueTask) -> GlueTask:
    """Look a task up forgivingly ("RTE", "SST-2", "sst_2") so configs can use any spelling."""
    if isinstance(name, GlueTask):
        return name
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key in TASKS:
        return TASKS[key]
    allowed = ", ".join(TASKS)
    if key in _UNSUPPORTED:
        raise DataError(f"task '{name}' is not supported: {_UNSUPPORTED[key]} (allowed: {allowed})")
    raise DataError(f"unknown GLUE task '{name}' (allowed: {allowed})")


@dataclass(frozen=True)
class Example:
    """One example; ``label`` is an id in ``GlueTask.labels`` order (-1: an unlabelled test row),
    or a regression task's score."""

    text_a: str
    text_b: str | None
    label: int | float  # a float score for a regression task


def _check_split(task: GlueTask, split: str) -> None:
    """Fail early with the list of valid splits instead of a KeyError deep inside a reader."""
    if split not in task.local_files:
        allowed = ", ".join(task.local_files)
        hint = " (unlabelled test files are read by read_test)" if split in task.test_files else ""
        raise DataError(f"unknown split '{split}' for task {task.name} (allowed: {allowed}){hint}")


def _local_file(t: GlueTask, glue_dir: str | Path, file: str, split: str) -> Path:
    """The split's file in the GLUE folder; a missing one names where it was looked for."""
    root = Path(glue_dir).expanduser()
    path = root / t.local_dir / file
    if not path.is_file():
        where = f"GLUE folder {root} does not exist" if not root.is_dir() else f"no file {path}"
        raise DataError(f"{where}: looked for {path} (task {t.name}, split {split}). {_FIX_HINT}")
    return path


def _tsv_rows(
    path: Path,
    columns: tuple[str, ...],
    *,
    has_header: bool,
    skipped: list[int] | None = None,
) -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` of every non-blank row, after checking the header and field count.

    Tab-delimited with no quote processing (GLUE texts contain stray quote characters);
    ``skipped`` collects the lines of rows with the wrong field count instead of failing on them.
    """
    try:
        # utf-8-sig strips MRPC's byte-order mark and is a no-op for the other files.
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if has_header:
                header = next(reader, None)
                if header is None:
                    raise DataError(f"{path}: file is empty. {_FIX_HINT}")
                if tuple(header) != columns:
                    got, want = "\t".join(header), "\t".join(columns)
                    raise DataError(
                        f"{path}:1: unexpected header {got!r}; expected {want!r} "
                        f"(the download_glue_data.py layout for {path.parent.name}/{path.name})"
                    )
            for row in reader:
                if not row:  # blank line, e.g. a trailing one; csv.DictReader skips these too
                    continue
                if len(row) != len(columns):
                    if skipped is not None:
                        skipped.append(reader.line_num)
                        continue
                    raise DataError(
                        f"{path}:{reader.line_num}: expected {len(columns)} tab-separated fields, "
                        f"got {len(row)}"
                    )
                yield reader.line_num, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e})") from e
    except csv.Error as e:
        raise DataError(f"{path}: malformed TSV ({e})") from e


def _score(value: Any, where: str) -> float:
    """A regression label as a finite float, or an error naming where it was."""
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = math.nan
    if not math.isfinite(score):
        raise DataError(f"{where}: the score {value!r} is not a finite number")
    return score


def read_local(task: str | GlueTask, glue_dir: str | Path, split: str) -> list[Example]:
    """Read one labelled split from a download_glue_data.py-style folder.

    Files are validated strictly, so a wrong file fails loudly with its path and line instead of
    silently training on garbage.
    """
    t = get_task(task)
    _check_split(t, split)
    path = _local_file(t, glue_dir, t.local_files[split], split)
    columns = t.file_columns[split]
    text_idx = [columns.index(c) for c in t.file_text_columns]
    label_idx = columns.index(t.file_label_column)
    label_ids = {v: i for i, v in enumerate(t.file_label_values)}
    allowed = ", ".join(repr(v) for v in t.file_label_values)

    examples: list[Example] = []
    skipped: list[int] = []
    malformed = skipped if t.skip_malformed_rows else None
    for line, row in _tsv_rows(path, columns, has_header=t.file_has_header, skipped=malformed):
        value = row[label_idx]
        text_b = row[text_idx[1]] if len(text_idx) == 2 else None
        if t.regression:
            examples.append(Example(row[text_idx[0]], text_b, _score(value, f"{path}:{line}")))
            continue
        if value not in label_ids:
            raise DataError(f"{path}:{line}: unknown label {value!r} (allowed: {allowed})")
        examples.append(Example(row[text_idx[0]], text_b, label_ids[value]))

    if skipped:
        shown = ", ".join(str(n) for n in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        logger.warning(
            "%s: skipped %d malformed row(s) with the wrong number of fields (lines %s); "
            "the Hugging Face GLUE loader drops these too",
            path,
            len(skipped),
            shown,
        )
    if not examples:
        raise DataError(f"{path}: no examples found")
    return examples


@dataclass(frozen=True)
class TestSplit:
    """An unlabelled GLUE test file: the row ids the GLUE server expects back, and the
    examples (``label`` -1) in file order."""

    __test__ = False  # not a pytest class

    path: Path
    ids: list[str]
    examples: list[Example]


def read_test(task: str | GlueTask, glue_dir: str | Path, split: str = "test") -> TestSplit:
    """Read an unlabelled test split (``test``; MNLI also ``test_mismatched``).

    Every row must parse: a submission needs a prediction for each one, so rows with the wrong
    number of fields are an error even for QQP.
    """
    t = get_task(task)
    if split not in t.test_files:
        allowed = ", ".join(t.test_files)
        raise DataError(f"unknown test split '{split}' for task {t.name} (allowed: {allowed})")
    path = _local_file(t, glue_dir, t.test_files[split], split)
    columns = t.test_columns
    text_idx = [columns.index(c) for c in t.file_text_columns]
    ids: list[str] = []
    examples: list[Example] = []
    for _, row in _tsv_rows(path, columns, has_header=True):
        ids.append(row[0])
        text_b = row[text_idx[1]] if len(text_idx) == 2 else None
        examples.append(Example(row[text_idx[0]], text_b, -1))
    if not examples:
        raise DataError(f"{path}: no examples found")
    return TestSplit(path, ids, examples)


def _offline() -> bool:
    """Whether the user switched the HF libraries offline (then the hub can only serve caches)."""
    truthy = {"1", "on", "yes", "true"}
    return any(
        os.environ.get(v, "").strip().lower() in truthy
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def load_hub(task: str | GlueTask, split: str) -> list[Example]:
    """Load a split from the ``nyu-mll/glue`` hub dataset, for machines without local GLUE files."""
    t = get_task(task)
    _check_split(t, split)
    hub_split = t.hub_splits[split]
    try:
        import datasets

        ds = datasets.load_dataset(HUB_DATASET, t.name, split=hub_split)
    except Exception as e:  # any failure here means "no hub data"; say how to avoid the hub
        why = (
            "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not cached"
            if _offline()
            else "the hub could not be reached or the dataset could not be prepared"
        )
        raise DataError(
            f"could not load {HUB_DATASET} config '{t.name}' split '{hub_split}' from the Hugging "
            f"Face hub: {why} ({type(e).__name__}: {e}). To use local files instead: {_FIX_HINT}"
        ) from e

    texts_a = ds[t.hub_columns[0]]
    texts_b = ds[t.hub_columns[1]] if t.is_pair else [None] * len(texts_a)
    if t.regression:
        where = f"{HUB_DATASET}/{t.name} split '{hub_split}'"
        scores = [_score(y, f"{where} row {i}") for i, y in enumerate(ds["label"])]
        return [Example(a, b, y) for a, b, y in zip(texts_a, texts_b, scores, strict=True)]
    names = getattr(ds.features.get("label"), "names", None)
    if names is not None and tuple(names) != t.labels:
        raise DataError(
            f"{HUB_DATASET}/{t.name}: hub label names {tuple(names)} differ from the expected "
            f"{t.labels}; refusing to guess the mapping"
        )
    labels = ds["label"]
    bad = [i for i, y in enumerate(labels) if not 0 <= int(y) < t.num_labels]
    if bad:
        raise DataError(
            f"{HUB_DATASET}/{t.name} split '{hub_split}': row {bad[0]} has label {labels[bad[0]]} "
            f"outside 0..{t.num_labels - 1} ({len(bad)} such rows; is this an unlabelled split?)"
        )
    return [Example(a, b, int(y)) for a, b, y in zip(texts_a, texts_b, labels, strict=True)]


def load_examples(
    task: str | GlueTask, split: str, glue_dir: str | Path | None = None
) -> list[Example]:
    """Pick the data source: explicit folder, then $KDRAY_GLUE_DIR, then the hub."""
    if glue_dir is None:
        glue_dir = os.environ.get(GLUE_DIR_ENV) or None
    if glue_dir is not None:
        return read_local(task, glue_dir, split)
    return load_hub(task, split)


def task_of(spec: Spec) -> GlueTask:
    """The spec's task: a GLUE task, or one made from ``data.source`` (labels from the data)."""
    if spec.data.source is None:
        return get_task(spec.task)
    source = spec.data.source
    read = _read_source(source)
    names = read.label_names
    metrics = source.dev_metrics
    if "f1" in metrics and len(names) != 2:
        raise DataError(
            f"data.source.metrics: f1 is the second label's F1 and needs two labels; "
            f"{spec.task} has {len(names)} ({', '.join(names)}): use f1_macro"
        )
    wheres = {split: read.splits[split].where for split in sources.SPLITS}
    return GlueTask(
        name=spec.task,
        hub_columns=tuple(source.text),
        labels=names,
        metrics=metrics,
        main_metric=metrics[0],
        dev_split="dev",
        local_dir=spec.task,
        local_files=MappingProxyType(wheres),
        hub_splits=MappingProxyType(dict(source.splits)),
        file_columns=MappingProxyType({}),
        regression=source.type == "regression",
    )


def _read_source(source: SourceSpec) -> sources.SourceData:
    """``data.source`` read and checked, its problems as :class:`DataError`."""
    try:
        return sources.read(source)
    except sources.SourceError as error:
        raise DataError(str(error)) from None


def spec_examples(spec: Spec, split: str) -> list[Example]:
    """A split of the spec's data (``train`` or ``dev``): its own source, else GLUE from
    ``data.dir``, ``$KDRAY_GLUE_DIR`` or the hub (``train.max_train_examples`` not applied)."""
    return read_examples(spec.task, split, spec.data.dir, spec.data.source)


def read_examples(
    task: str, split: str, glue_dir: str | None, source: SourceSpec | None
) -> list[Example]:
    """:func:`spec_examples` from the data settings alone (what a cache can key on)."""
    if source is None:
        return load_examples(get_task(task), split, glue_dir)
    read = _read_source(source)
    if split not in read.splits:
        raise DataError(f"{task}: no split {split!r} (splits: {', '.join(read.splits)})")
    part = read.splits[split]
    texts_b = part.text_b if part.text_b is not None else [None] * len(part.text_a)
    return [
        Example(a, b, y)
        for a, b, y in zip(part.text_a, texts_b, read.label_ids(split), strict=True)
    ]


def compute_metrics(task: str | GlueTask, predictions: Any, labels: Any) -> dict[str, float]:
    """Score predictions with the task's GLUE metrics (keys exactly ``task.metrics``).

    ``predictions`` may be class ids ``[N]`` or logits ``[N, C]`` (argmax is taken), as numpy
    arrays, torch tensors or lists, so trainers can pass whatever they have.
    """
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    t = get_task(task)
    preds = _as_numpy(predictions)
    gold = _as_numpy(labels)
    if t.regression:
        return _regression_metrics(t, preds, gold)
    if preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    if preds.ndim != 1 or gold.ndim != 1:
        raise ValueError(
            f"expected 1-d predictions (or 2-d logits) and 1-d labels, got shapes "
            f"{preds.shape} and {gold.shape}"
        )
    if len(preds) != len(gold):
        raise ValueError(f"{len(preds)} predictions but {len(gold)} labels")
    if len(gold) == 0:
        raise ValueError("cannot compute metrics on zero examples")
    preds = preds.astype(np.int64)
    gold = gold.astype(np.int64)

    out: dict[str, float] = {}
    for name in t.metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(gold, preds))
        elif name == "f1":
            out[name] = float(f1_score(gold, preds, average="binary", pos_label=1, zero_division=0))
        elif name == "f1_macro":
            out[name] = float(
                f1_score(gold, preds, average="macro", labels=range(t.num_labels), zero_division=0)
            )
        elif name == "matthews":
            out[name] = float(matthews_corrcoef(gold, preds))
        else:  # pragma: no cover - guarded by the TASKS table
            raise ValueError(f"unknown metric {name!r}")
    return out


def _regression_metrics(t: GlueTask, preds: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlations of predicted and gold scores (``[N]`` or ``[N, 1]``
    outputs); NaN where a side is constant (no correlation is defined)."""
    from scipy import stats

    if preds.ndim == 2 and preds.shape[1] == 1:
        preds = preds[:, 0]
    if preds.ndim != 1 or gold.ndim != 1 or len(preds) != len(gold):
        raise ValueError(
            f"expected [N] (or [N, 1]) predictions and [N] scores, got shapes {preds.shape} "
            f"and {gold.shape}"
        )
    if len(gold) < 2:
        raise ValueError("correlations need at least two examples")
    preds, gold = preds.astype(np.float64), gold.astype(np.float64)
    constant = np.ptp(preds) == 0 or np.ptp(gold) == 0
    out: dict[str, float] = {}
    for name in t.metrics:
        if name == "pearson":
            out[name] = math.nan if constant else float(stats.pearsonr(preds, gold).statistic)
        elif name == "spearman":
            out[name] = math.nan if constant else float(stats.spearmanr(preds, gold).statistic)
        else:  # pragma: no cover - guarded by the spec
            raise ValueError(f"unknown regression metric {name!r}")
    return out


def _as_numpy(x: Any) -> np.ndarray:
    """Accept tensors (on any device), arrays and lists alike."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass(repr=False, eq=False)
class TokenizedSplit(Dataset):
    """Unpadded token ids per example; padding happens per batch in :func:`collate`.

    Keeping sequences unpadded lets a length-bucketing sampler use :attr:`lengths` and keeps the
    on-disk cache small.
    """

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[int] | list[float]  # floats: a regression task's scores

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if len(self.token_type_ids) != n or len(self.labels) != n:
            raise ValueError(
                f"input_ids ({n}), token_type_ids ({len(self.token_type_ids)}) and labels "
                f"({len(self.labels)}) must have the same length"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.input_ids)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} examples")
        i = int(i) % n
        return {
            "input_ids": self.input_ids[i],
            "token_type_ids": self.token_type_ids[i],
            "labels": self.labels[i],
            "index": i,
        }

    @property
    def lengths(self) -> list[int]:
        """Sequence lengths (with special tokens), for length-grouped batching."""
        return [len(ids) for ids in self.input_ids]

    def __repr__(self) -> str:
        return f"TokenizedSplit(n={len(self)})"


def _tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Everything about the tokenizer that changes its output, minus call-time settings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    backend_cfg: Any = None
    if backend is not None and hasattr(backend, "to_str"):
        backend_cfg = json.loads(backend.to_str())
        # Truncation/padding are per-call state the tokenizer mutates; they must not break hits.
        backend_cfg.pop("truncation", None)
        backend_cfg.pop("padding", None)
    init_kwargs = getattr(tokenizer, "init_kwargs", {}) or {}
    special = getattr(tokenizer, "special_tokens_map", {}) or {}
    return {
        "class": type(tokenizer).__name__,
        "do_lower_case": getattr(tokenizer, "do_lower_case", init_kwargs.get("do_lower_case")),
        "strip_accents": init_kwargs.get("strip_accents"),
        "special_tokens": {k: str(v) for k, v in sorted(special.items())},
        "special_ids": list(getattr(tokenizer, "all_special_ids", []) or []),
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
        "backend": backend_cfg,
    }


def _cache_key(examples: Sequence[Example], tokenizer: Any, max_seq_length: int) -> str:
    """sha256 over tokenizer identity, vocabulary, max length and example content."""
    h = hashlib.sha256()
    head = {
        "format": _CACHE_FORMAT,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "max_seq_length": max_seq_length,
    }
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    h.update(str(len(examples)).encode())
    for ex in examples:
        h.update(json.dumps([ex.text_a, ex.text_b, ex.label], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


TRUNCATION_WARNING = 0.05  # above this share of cut examples, say so before compute


@dataclass(frozen=True)
class LengthStats:
    """Token lengths of one split under a tokenizer (special tokens included, nothing cut),
    and what ``max_seq_length`` cuts: the truncation a run would do silently otherwise."""

    split: str
    n: int
    median: float
    p90: float
    p95: float
    p99: float
    max: int
    max_seq_length: int
    cut: float  # share of examples longer than max_seq_length (cut longest-first)

    def describe(self) -> str:
        return (
            f"{self.split}: {self.cut:.1%} of {self.n} cut at {self.max_seq_length} (median "
            f"{self.median:.0f}, p90 {self.p90:.0f}, p99 {self.p99:.0f}, max {self.max}; 95 % "
            f"whole at {math.ceil(self.p95)})"
        )

    def warning(self, threshold: float = TRUNCATION_WARNING) -> str | None:
        """One sentence when more than ``threshold`` of the split is cut, else None."""
        if self.cut <= threshold:
            return None
        return (
            f"data.max_seq_length {self.max_seq_length} cuts {self.cut:.0%} of the {self.split} "
            f"examples (longest {self.max} tokens); {math.ceil(self.p95)} keeps 95 % whole "
            f"(--set data.max_seq_length={math.ceil(self.p95)}: up to "
            f"{math.ceil(self.p95) / self.max_seq_length:.1f}x the tokens per batch)"
        )


def _lengths(examples: Sequence[Example], tokenizer: Any) -> list[int]:
    """Every example's token count, tokenized whole (special tokens included), pairs as pairs."""
    lengths: list[int] = []
    chunk = 2048
    for is_pair in (False, True):
        group = [ex for ex in examples if (ex.text_b is not None) == is_pair]
        for start in range(0, len(group), chunk):
            part = group[start : start + chunk]
            enc = tokenizer(
                [ex.text_a for ex in part],
                [ex.text_b for ex in part] if is_pair else None,
                truncation=False,
                padding=False,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
            lengths += [len(ids) for ids in enc["input_ids"]]
    return lengths


def length_stats(
    examples: Sequence[Example], tokenizer: Any, max_seq_length: int, split: str
) -> LengthStats:
    """:class:`LengthStats` of ``examples``: every example tokenized whole, pairs as pairs."""
    return _stats(_lengths(examples, tokenizer), split, max_seq_length)


def _stats(lengths: list[int], split: str, max_seq_length: int) -> LengthStats:
    values = np.asarray(lengths or [0], dtype=float)
    q = np.percentile(values, [50, 90, 95, 99])
    return LengthStats(
        split, len(lengths), float(q[0]), float(q[1]), float(q[2]), float(q[3]),
        int(values.max()), max_seq_length, float(np.mean(values > max_seq_length)),
    )  # fmt: skip


def _run_tokenizer(
    examples: Sequence[Example], tokenizer: Any, max_seq_length: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenize in chunks; single texts and pairs go in separate calls (the API needs that)."""
    input_ids: list[list[int]] = [[] for _ in examples]
    type_ids: list[list[int]] = [[] for _ in examples]
    singles = [i for i, ex in enumerate(examples) if ex.text_b is None]
    pairs = [i for i, ex in enumerate(examples) if ex.text_b is not None]
    chunk = 2048
    for group, is_pair in ((singles, False), (pairs, True)):
        for start in range(0, len(group), chunk):
            idx = group[start : start + chunk]
            texts_a = [examples[i].text_a for i in idx]
            texts_b = [examples[i].text_b for i in idx] if is_pair else None
            enc = tokenizer(
                texts_a,
                texts_b,
                truncation="longest_first",
                max_length=max_seq_length,
                padding=False,
                return_token_type_ids=True,
                return_attention_mask=False,
            )
            ids_batch = enc["input_ids"]
            tt_batch = enc.get("token_type_ids") or [[0] * len(ids) for ids in ids_batch]
            for i, ids, tt in zip(idx, ids_batch, tt_batch, strict=True):
                input_ids[i] = list(ids)
                type_ids[i] = list(tt)
    too_long = max((len(ids) for ids in input_ids), default=0)
    if too_long > max_seq_length:
        raise ValueError(
            f"max_seq_length={max_seq_length} is too small to hold the special tokens "
            f"(got a {too_long}-token sequence)"
        )
    return input_ids, type_ids


def _read_cache(path: Path, key: str, n: int) -> TokenizedSplit | None:
    """Load a cached split; return None (recompute) if the file is unreadable, not ours, or its
    arrays no longer match the checksum written with them (Arrow itself checks no values, so a
    flipped byte in the token ids would otherwise be read back silently)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        meta = table.schema.metadata or {}
        if meta.get(b"kdray_cache_key", b"").decode() != key or table.num_rows != n:
            logger.warning("ignoring tokenization cache %s: key or size mismatch", path)
            return None
        if meta.get(b"kdray_checksum", b"").decode() != _table_checksum(table):
            logger.warning(
                "ignoring tokenization cache %s: its arrays do not match their checksum "
                "(corrupted, or written by an older kdray); tokenizing again",
                path,
            )
            return None
        return TokenizedSplit(
            input_ids=table.column("input_ids").to_pylist(),
            token_type_ids=table.column("token_type_ids").to_pylist(),
            labels=table.column("labels").to_pylist(),
        )
    except (OSError, KeyError, ValueError, pa.ArrowException) as e:
        logger.warning("ignoring unreadable tokenization cache %s: %s", path, e)
        return None


def _table_checksum(table: Any) -> str:
    """sha256 of the cached columns' values and row lengths, independent of Arrow's buffer
    layout (padding, chunking), so the writer and the reader compute it the same way."""
    digest = hashlib.sha256()
    for name in ("input_ids", "token_type_ids"):
        column = table.column(name).combine_chunks()
        lengths = column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        digest.update(lengths.tobytes())
        digest.update(values.tobytes())
    labels = table.column("labels").to_numpy()  # int64 ids, or float64 scores
    digest.update(labels.astype(np.float64 if labels.dtype.kind == "f" else np.int64).tobytes())
    return digest.hexdigest()


def _label_type(labels: list[int] | list[float]) -> Any:
    """Arrow's type for the labels: int64 class ids, float64 regression scores."""
    import pyarrow as pa

    return pa.float64() if any(isinstance(y, float) for y in labels) else pa.int64()


def _write_cache(path: Path, key: str, split: TokenizedSplit) -> None:
    """Write atomically so a crashed or concurrent writer never leaves a half file behind."""
    import pyarrow as pa

    table = pa.table(
        {
            "input_ids": pa.array(split.input_ids, type=pa.list_(pa.int32())),
            "token_type_ids": pa.array(split.token_type_ids, type=pa.list_(pa.int8())),
            "labels": pa.array(split.labels, type=_label_type(split.labels)),
        }
    )
    table = table.replace_schema_metadata(
        {
            "kdray_cache_key": key,
            "kdray_format": _CACHE_FORMAT,
            "kdray_checksum": _table_checksum(table),
        }
    )
    with atomic_file(path) as tmp, tmp.open("wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)


def tokenize(
    examples: list[Example],
    tokenizer: Any,
    max_seq_length: int,
    cache_dir: str | Path | None = None,
) -> TokenizedSplit:
    """Tokenize examples (truncating pairs longest-first), reusing an on-disk cache if given.

    Trials in a sweep tokenize the same split with the same tokenizer over and over; the cache
    (an Arrow IPC file keyed by a content hash) makes that a file read.
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
    if not examples:
        raise ValueError("no examples to tokenize")
    path: Path | None = None
    key = ""
    if cache_dir is not None:
        key = _cache_key(examples, tokenizer, max_seq_length)
        path = Path(cache_dir).expanduser() / f"tokenized-{key}.arrow"
        if path.is_file():
            cached = _read_cache(path, key, len(examples))
            if cached is not None:
                logger.debug("loaded tokenized split from %s", path)
                return cached

    input_ids, type_ids = _run_tokenizer(examples, tokenizer, max_seq_length)
    split = TokenizedSplit(input_ids, type_ids, [ex.label for ex in examples])
    if path is not None:
        _write_cache(path, key, split)
    return split


def _labels(values: list[Any]) -> torch.Tensor:
    """Class ids as int64; regression scores as float32 (what the MSE losses take)."""
    if any(isinstance(y, float) for y in values):
        return torch.tensor(values, dtype=torch.float32)
    return torch.tensor([int(y) for y in values], dtype=torch.long)


def collate(batch: list[dict[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence (dynamic padding wastes less compute than max_len)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    size = len(batch)
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((size, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((size, width), dtype=torch.long)
    token_type_ids = torch.zeros((size, width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        token_type_ids[row, :n] = torch.as_tensor(item["token_type_ids"], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "labels": _labels([item["labels"] for item in batch]),
        "index": torch.tensor([int(item["index"]) for item in batch], dtype=torch.long),
    }


# ---------------------------------------------------------------------------------------------
# A spec's data, read and tokenised once


@dataclass
class Prepared:
    """Data and tokenizer for one spec: read once, shared by the teacher and the run."""

    task: GlueTask
    tokenizer: Any
    train: TokenizedSplit
    dev: TokenizedSplit
    data_fingerprint: str


SPLIT_NAMES = ("train", "dev")
LENGTH_SAMPLE = 20000  # lengths are measured on at most this many examples of a split


def split_lengths(
    splits: Mapping[str, Sequence[Example]], tokenizer: Any, max_seq_length: int
) -> tuple[LengthStats, ...]:
    """:class:`LengthStats` of each split (its first :data:`LENGTH_SAMPLE` examples)."""
    return tuple(
        length_stats(examples[:LENGTH_SAMPLE], tokenizer, max_seq_length, split)
        for split, examples in splits.items()
    )


def _teacher_tokenizer_path(spec: Spec) -> str:
    """The folder whose tokenizer a run's examples are measured (and cut) with."""
    from kdray.training.models import resolve_model_path

    return resolve_model_path(spec.teacher.checkpoint or spec.teacher.model)


def spec_length_stats(spec: Spec, model_path: str | None = None) -> tuple[LengthStats, ...]:
    """The train and dev splits' :class:`LengthStats` under the teacher's tokenizer (the
    pre-flight prints them, ``experiment.json`` and the report keep them); empty when the data
    or the tokenizer is not on this machine (nothing is downloaded for it). Measured once per
    process for the same data, tokenizer and length: the pre-flight's numbers serve the
    experiment record that follows."""
    glue_dir = spec.data.dir or os.environ.get(GLUE_DIR_ENV)
    length = spec.data.max_seq_length
    if (not glue_dir and spec.data.source is None) or length == "auto":
        return ()
    try:
        model = model_path or _teacher_tokenizer_path(spec)
    except (OSError, ValueError):
        return ()
    source = spec.data.source.model_dump_json() if spec.data.source else None
    return _measured_lengths(
        spec.task, glue_dir, source, str(model), int(length), spec.train.max_train_examples
    )


@functools.lru_cache(maxsize=8)
def _measured_lengths(
    task: str,
    glue_dir: str | None,
    source_json: str | None,
    model: str,
    length: int,
    max_train: int | None,
) -> tuple[LengthStats, ...]:
    from kdray.spec import SourceSpec

    source = SourceSpec.model_validate_json(source_json) if source_json else None
    try:
        splits = {split: read_examples(task, split, glue_dir, source) for split in SPLIT_NAMES}
        tokenizer = load_tokenizer(model)
    except (DataError, OSError, ValueError):
        return ()
    if max_train:
        splits["train"] = splits["train"][:max_train]
    return split_lengths(splits, tokenizer, length)


#: ``data.max_seq_length: auto`` keeps this share of the training examples whole.
AUTO_LENGTH_KEEPS = 0.95


def _position_limit(model_path: str, tokenizer: Any) -> int:
    """The longest input the teacher takes: its ``max_position_embeddings``, else what its
    tokenizer says (a huge sentinel when unset), else 512."""
    config = Path(model_path) / "config.json"
    if config.is_file():
        limit = json.loads(config.read_text()).get("max_position_embeddings")
        if isinstance(limit, int):
            return limit
    told = getattr(tokenizer, "model_max_length", None)
    return told if isinstance(told, int) and told < 100_000 else 512


def resolve_max_seq_length(spec: Spec) -> tuple[Spec, LengthStats | None]:
    """A spec with ``data.max_seq_length: auto`` made concrete: the length that keeps
    :data:`AUTO_LENGTH_KEEPS` of the training examples (its first :data:`LENGTH_SAMPLE`) whole
    under the teacher's tokenizer, rounded up to a multiple of 8, capped by the teacher's
    positions; with the training split's :class:`LengthStats` at that length. A spec with a
    number comes back as it is, with None."""
    if spec.data.max_seq_length != "auto":
        return spec, None
    train = spec_examples(spec, "train")
    if spec.train.max_train_examples:
        train = train[: spec.train.max_train_examples]
    path = _teacher_tokenizer_path(spec)
    tokenizer = load_tokenizer(path)
    lengths = _lengths(train[:LENGTH_SAMPLE], tokenizer)
    quantile = float(np.percentile(lengths or [0], 100 * AUTO_LENGTH_KEEPS))
    length = min(_position_limit(path, tokenizer), max(8, 8 * math.ceil(quantile / 8)))
    return spec.with_values({"data.max_seq_length": length}), _stats(lengths, "train", length)


def examples_fingerprint(*splits: list[Example]) -> str:
    """Hash of the examples' text and labels, split by split (part of the teacher's key)."""
    digest = hashlib.sha256()
    for split in splits:
        for ex in split:
            digest.update(json.dumps([ex.text_a, ex.text_b, ex.label]).encode())
        digest.update(b"|")
    return digest.hexdigest()[:20]


def prepare(spec: Spec, tokenizer_name: str) -> Prepared:
    """The spec's train (``train.max_train_examples`` first rows) and dev splits, tokenised
    with ``tokenizer_name``'s tokenizer through the on-disk cache."""
    task = task_of(spec)
    train_ex = spec_examples(spec, "train")
    if spec.train.max_train_examples:
        train_ex = train_ex[: spec.train.max_train_examples]
    dev_ex = spec_examples(spec, "dev")
    tokenizer = load_tokenizer(tokenizer_name)
    cache = cache_root(spec.data.cache_dir) / "tokenized"
    length = spec.data.max_seq_length
    return Prepared(
        task=task,
        tokenizer=tokenizer,
        train=tokenize(train_ex, tokenizer, length, cache),
        dev=tokenize(dev_ex, tokenizer, length, cache),
        data_fingerprint=examples_fingerprint(train_ex, dev_ex),
    )


# ---------------------------------------------------------------------------------------------
# Data on a cluster: it travels by the experiment's storage


def publish(spec: Spec, root: str) -> Spec:
    """The spec with its data copied under ``root`` (the experiment's remote storage) and named
    there: the GLUE task's folder (``data.dir``) or the source's files or datasets folder.
    The copy's location holds a hash of the files, so a node's local copy
    (:func:`localize`) is never stale and a copy already there is not uploaded again. A hub
    dataset is left as it is (each node's hub cache)."""
    source = spec.data.source
    if source is None:
        glue_dir = spec.data.dir or os.environ.get(GLUE_DIR_ENV)
        if not glue_dir or remote.is_remote(glue_dir):
            return spec
        task = get_task(spec.task)
        folder = Path(glue_dir).expanduser() / task.local_dir
        # every split file there is (train, dev, MNLI's mismatched dev, test for predictions)
        files = [folder / f for f in task.local_files.values() if (folder / f).is_file()]
        stored = _store(root, files, {p: f"{task.local_dir}/{p.name}" for p in files})
        return spec.with_values({"data.dir": stored})
    if source.files is not None and not any(map(remote.is_remote, source.files.values())):
        named = {Path(f): f"{split}-{Path(f).name}" for split, f in source.files.items()}
        stored = _store(root, list(named), named)
        uris = {split: remote.join(stored, named[Path(f)]) for split, f in source.files.items()}
        return spec.with_values({"data.source.files": uris})
    if source.format == "disk" and source.path and not remote.is_remote(source.path):
        folder = Path(source.path)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        stored = _store(root, files, {folder: folder.name})
        return spec.with_values({"data.source.path": remote.join(stored, folder.name)})
    return spec


def _store(root: str, files: list[Path], uploads: dict[Path, str]) -> str:
    """``root/<hash of files>``, holding each of ``uploads`` (a local file or folder -> its
    name there); a file already there is kept, since its name is its content (a folder, which
    a killed upload may have left half, is uploaded again)."""
    stored = remote.join(root, content_hash([file_digest(p) for p in files], 16))
    for local, name in uploads.items():
        if local.is_dir() or not remote.exists(remote.join(stored, name)):
            remote.upload(local, remote.join(stored, name))
    return stored


def localize(spec: Spec) -> Spec:
    """The spec with data that :func:`publish` put in a remote storage downloaded to this
    machine (once per machine, in kdray's cache) and named by its local path."""
    root = cache_root(spec.data.cache_dir) / "storage-data"

    def local(location: str) -> str:
        return str(remote.download(location, root / remote.local_name(location)))

    source = spec.data.source
    if source is None:
        if spec.data.dir and remote.is_remote(spec.data.dir):
            return spec.with_values({"data.dir": local(spec.data.dir)})
        return spec
    if source.files is not None and any(map(remote.is_remote, source.files.values())):
        files = {s: local(f) if remote.is_remote(f) else f for s, f in source.files.items()}
        return spec.with_values({"data.source.files": files})
    if source.path and remote.is_remote(source.path):
        return spec.with_values({"data.source.path": local(source.path)})
    return spec
