"""Your own data: a task's labelled examples read from CSV, JSON Lines or Parquet files, a local
``datasets`` folder or a Hugging Face dataset, as ``data.source`` in the spec says.

Everything is read through Hugging Face ``datasets`` (one reader for every format) and checked
before any compute, so a wrong column, an empty split, a null text or a dev label the training
data never shows fails with the file and the row instead of a traceback mid-training. Labels
get ids in a fixed order (the spec's ``labels``, else the dataset's ClassLabel names, else the
train values sorted), so every process of a sweep numbers them alike. Knows nothing of GLUE,
tokenisers or torch: :mod:`kdray.training.data` turns what this module reads into examples and a
task.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdray.spec import SourceSpec

SPLITS = ("train", "dev")


class SourceError(ValueError):
    """Bad or unreadable data in ``data.source``: the message names the file (or dataset),
    the column and the row, and how to fix it."""


@dataclass(frozen=True)
class SourceSplit:
    """One split's columns as read: texts (``text_b`` None for single texts) and label names,
    or a regression's scores."""

    where: str
    text_a: tuple[str, ...]
    text_b: tuple[str, ...] | None
    labels: tuple[str, ...]
    scores: tuple[float, ...] | None = None


@dataclass(frozen=True)
class SourceData:
    """Both splits of a source and the label names in id order (a regression: its one score
    column's name)."""

    label_names: tuple[str, ...]
    splits: dict[str, SourceSplit]

    def label_ids(self, split: str) -> list[int] | list[float]:
        """The split's labels as ids in ``label_names`` order, or its scores."""
        part = self.splits[split]
        if part.scores is not None:
            return list(part.scores)
        index = {name: i for i, name in enumerate(self.label_names)}
        return [index[name] for name in part.labels]


def read(source: SourceSpec) -> SourceData:
    """Both splits, checked (cached per process while the files stay as they were: a sweep's
    pre-flight and run read once, a notebook that fixes a file reads it again)."""
    return _read(source.model_dump_json(), _stamp(source))


def _stamp(source: SourceSpec) -> tuple[tuple[str, int, int], ...]:
    """Size and modification time of every local file a source reads."""
    if source.files is not None:
        paths = [Path(f).expanduser() for f in source.files.values()]
    elif source.format == "disk":
        paths = sorted(Path(source.path or "").expanduser().rglob("*"))
    else:
        return ()
    found = [(p, p.stat()) for p in paths if p.is_file()]
    return tuple((str(p), st.st_size, st.st_mtime_ns) for p, st in found)


@functools.lru_cache(maxsize=4)
def _read(source_json: str, stamp: tuple[tuple[str, int, int], ...]) -> SourceData:
    source = SourceSpec.model_validate_json(source_json)
    tables = {split: _dataset(source, split) for split in SPLITS}
    class_names = _class_label_names(tables["train"], source)
    splits = {
        split: _split(source, table, _where(source, split), class_names)
        for split, table in tables.items()
    }
    if source.type == "regression":
        return SourceData(label_names=(source.label,), splits=splits)
    names = _label_names(source, splits["train"], class_names)
    for split in SPLITS:
        _check_labels(source, splits[split], names, split)
    return SourceData(label_names=names, splits=splits)


def _where(source: SourceSpec, split: str) -> str:
    """How an error names the split: its file, or the dataset and split name."""
    if source.files is not None:
        return str(source.files[split])
    config = f" ({source.config})" if source.config else ""
    return f"{source.path}{config} split {source.splits[split]!r}"


def _dataset(source: SourceSpec, split: str) -> Any:
    """One split as a ``datasets.Dataset``."""
    import datasets

    where = _where(source, split)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a "Generating split" bar per read is noise in kdray's own
    try:
        if source.files is not None:
            path = Path(source.files[split]).expanduser()
            if not path.is_file():
                raise SourceError(
                    f"data.source.files.{split}: {path} is not a file (relative paths are read "
                    f"from {Path.cwd()}); give the {source.format} file of the {split} split"
                )
            return datasets.load_dataset(
                source.format, data_files={split: str(path.resolve())}, split=split
            )
        name = source.splits[split]
        if source.format == "disk":
            loaded = datasets.load_from_disk(str(Path(source.path or "").expanduser()))
            return _pick_split(loaded, name, where, "data.source.path")
        return datasets.load_dataset(source.path, source.config, split=name)
    except SourceError:
        raise
    except ValueError as error:
        if "corresponds to no data" not in str(error):  # datasets' words for an empty split
            raise _unreadable(source, where, error) from None
        raise SourceError(f"{where}: the split has no rows; give a file with examples") from None
    except Exception as error:  # the reader's own words, with where and what to check
        raise _unreadable(source, where, error) from None
    finally:
        if bars:
            datasets.enable_progress_bars()


def _unreadable(source: SourceSpec, where: str, error: Exception) -> SourceError:
    return SourceError(
        f"data.source ({source.format}): could not read {where}: {type(error).__name__}: "
        f"{error}. Check the path and format (hub datasets offline: only from the datasets "
        "cache)"
    )


def _pick_split(loaded: Any, name: str, where: str, key: str) -> Any:
    """A split of a saved DatasetDict (a saved single Dataset has no splits to pick)."""
    if not hasattr(loaded, "keys"):
        raise SourceError(
            f"{key}: {where}: a single saved Dataset, not a DatasetDict with train and dev "
            "splits; save a DatasetDict (DatasetDict({'train': ..., 'validation': ...}))"
        )
    if name not in loaded:
        raise SourceError(
            f"data.source.splits: {where}: no split {name!r} (splits: "
            f"{', '.join(loaded.keys())}); name the dataset's splits in data.source.splits"
        )
    return loaded[name]


def _class_label_names(table: Any, source: SourceSpec) -> tuple[str, ...] | None:
    """The label column's ClassLabel names, when the dataset declares them."""
    feature = table.features.get(source.label)
    names = getattr(feature, "names", None)
    return tuple(str(n) for n in names) if names else None


def _split(
    source: SourceSpec, table: Any, where: str, class_names: tuple[str, ...] | None
) -> SourceSplit:
    """Texts and label names of one split, every column and row checked."""
    columns = list(table.column_names)
    for key, column in [*((f"text[{i}]", c) for i, c in enumerate(source.text)),
                        ("label", source.label)]:  # fmt: skip
        if column not in columns:
            raise SourceError(
                f"data.source.{key}: {where} has no column {column!r} (columns: "
                f"{', '.join(columns)}); name one of its columns"
            )
    if len(table) == 0:
        raise SourceError(f"{where}: the split has no rows; give a file with examples")
    texts = [_texts(table[column], column, where) for column in source.text]
    raw = table[source.label]
    _no_nulls(raw, source.label, where, "label")
    text_b = texts[1] if len(texts) == 2 else None
    if source.type == "regression":
        return SourceSplit(where, texts[0], text_b, (), _scores(raw, source.label, where))
    labels = tuple(_label_name(value, class_names) for value in raw)
    return SourceSplit(where, texts[0], text_b, labels)


def _scores(values: list[Any], column: str, where: str) -> tuple[float, ...]:
    """A regression's label column as finite floats; the first value that is not one fails."""
    scores = []
    for row, value in enumerate(values):
        try:
            score = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            raise SourceError(
                f"data.source.label: {where}: the score column {column!r} holds {value!r} at "
                f"row {row}, not a finite number; a regression needs numeric scores (or use "
                "type: classification for label names)"
            )
        scores.append(score)
    return tuple(scores)


def _texts(values: list[Any], column: str, where: str) -> tuple[str, ...]:
    _no_nulls(values, column, where, "text")
    return tuple(str(v) for v in values)


def _no_nulls(values: list[Any], column: str, where: str, what: str) -> None:
    """Nulls (or NaN) in a text or label column fail with their count and the first row."""
    bad = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and v != v)]
    if bad:
        every = " (every row)" if len(bad) == len(values) else ""
        raise SourceError(
            f"{where}: {what} column {column!r} is null in {len(bad)} of {len(values)} rows"
            f"{every}, first at row {bad[0]} (0-based, header not counted); drop or fill them"
        )


def _label_name(value: Any, class_names: tuple[str, ...] | None) -> str:
    """A label value as its name: a ClassLabel id as its name, a whole float as an integer."""
    if class_names is not None and isinstance(value, int) and 0 <= value < len(class_names):
        return class_names[value]
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _label_names(
    source: SourceSpec, train: SourceSplit, class_names: tuple[str, ...] | None
) -> tuple[str, ...]:
    """The label names in id order: the spec's, the dataset's, else the train values sorted
    (numerically when they are all integers)."""
    if source.labels is not None:
        return tuple(source.labels)
    if class_names is not None:
        return class_names
    seen = sorted(set(train.labels))
    if all(_is_int(name) for name in seen):
        seen = sorted(seen, key=int)
    if len(seen) < 2:
        raise SourceError(
            f"data.source.label: {train.where} has a single label value ({seen[0]!r}); a "
            "classifier needs at least two"
        )
    return tuple(seen)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _check_labels(
    source: SourceSpec, split: SourceSplit, names: tuple[str, ...], name: str
) -> None:
    """Every label is a known one: a dev label the training data never shows cannot be learnt."""
    known = set(names)
    unknown = [i for i, label in enumerate(split.labels) if label not in known]
    if not unknown:
        return
    values = sorted({split.labels[i] for i in unknown})
    shown = ", ".join(repr(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
    origin = "data.source.labels" if source.labels is not None else "the train split"
    raise SourceError(
        f"data.source.label: {split.where}: {len(unknown)} {name} rows have labels not in "
        f"{origin} ({shown}; first at row {unknown[0]}); known: {', '.join(names)}. Fix the "
        "data or list every label in data.source.labels"
    )
