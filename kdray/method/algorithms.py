"""Every distillation algorithm as one record: its stages, its loss terms, what it needs.

This is the only place that knows what an algorithm *is*. The spec takes its allowed names from
here, the stage schedule its stages, the training loop which loss terms are on and whether the
teacher must run, the teacher-output cache what to store, and the report which algorithms count
as internal distillation. Adding an algorithm means adding one :class:`Algorithm` to
:data:`REGISTRY`. Pure Python (no torch), so it is tested without a model.

Student layers are numbered 1..L (1-based); 0 means the embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from kdray.method.schedule import Stage

__all__ = [
    "ALGORITHMS",
    "INTERNAL",
    "LOSS_TERMS",
    "REGISTRY",
    "Algorithm",
    "active_terms",
    "build_stages",
    "get",
    "term_weights",
]

#: The named loss terms, in the order they are summed and recorded.
LOSS_TERMS: tuple[str, ...] = ("soft", "hard", "attention", "hidden")
#: The terms computed from the mapped layers' internal representations.
INTERNAL_TERMS: tuple[str, ...] = ("attention", "hidden")

StageBuilder = Callable[[tuple[int, ...], bool, bool], list[Stage]]


@dataclass(frozen=True)
class Algorithm:
    """What one algorithm is.

    ``stages(layers, hard, freeze_lower)`` gives its stages for student layers ``layers``
    (1..L), where ``hard`` says whether the user gave the hard-label term a weight > 0.
    ``always_hard``: the classifier trains on hard labels whatever ``losses.hard.weight`` says
    (weight 1 when it is left at 0), because the algorithm has no other signal for it.
    ``internal``: it distils internal representations (the paper's claim 1 compares these with
    soft labels). ``uses_teacher``: some stage needs teacher outputs.
    """

    name: str
    summary: str
    stages: StageBuilder
    internal: bool
    uses_teacher: bool = True
    always_hard: bool = False


def _layers_name(layers: tuple[int, ...]) -> str:
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"


def _none(layers: tuple[int, ...], hard: bool, freeze_lower: bool) -> list[Stage]:
    return [Stage(0, "hard labels", (), soft=False, hard=True)]


def _soft(layers: tuple[int, ...], hard: bool, freeze_lower: bool) -> list[Stage]:
    return [Stage(0, "soft labels", (), soft=True, hard=hard)]


def _internal(layers: tuple[int, ...], hard: bool, freeze_lower: bool) -> list[Stage]:
    return [Stage(0, "all", layers, soft=False, hard=True)]


def _idal(layers: tuple[int, ...], hard: bool, freeze_lower: bool) -> list[Stage]:
    return [Stage(0, "all", layers, soft=True, hard=hard)]


def _pid(layers: tuple[int, ...], hard: bool, freeze_lower: bool) -> list[Stage]:
    """One layer per stage bottom-up; with ``freeze_lower`` the parts below stage k's layer are
    frozen, and the final classifier stage trains only the pooler and head."""
    stages = []
    for k in layers:
        frozen = (0, *range(1, k)) if freeze_lower and k > 1 else ()
        stages.append(Stage(k - 1, f"layer {k}", (k,), soft=False, hard=False, frozen=frozen))
    final_frozen = (0, *layers) if freeze_lower else ()
    stages.append(Stage(len(layers), "classifier", (), soft=True, hard=hard, frozen=final_frozen))
    return stages


def _sid(layers: tuple[int, ...], hard: bool, freeze_lower: bool) -> list[Stage]:
    """Stage k optimises layers 1..k (the stacked objective keeps the lower layers' losses on,
    so ``freeze_lower`` has no effect); the soft labels join in the final stage."""
    stages = []
    for k in layers:
        below = layers[:k]
        stages.append(Stage(k - 1, _layers_name(below), below, soft=False, hard=False))
    stages.append(Stage(len(layers), "classifier", layers, soft=True, hard=hard))
    return stages


_RECORDS = (
    Algorithm("none", "hard labels only (no teacher signal)", _none, internal=False,
              uses_teacher=False, always_hard=True),
    Algorithm("soft", "soft labels (plus hard labels if weighted)", _soft, internal=False),
    Algorithm("internal", "attention + [CLS] losses on every mapped layer, hard labels",
              _internal, internal=True, always_hard=True),
    Algorithm("idal", "internal losses on all layers plus soft labels from the first epoch",
              _idal, internal=True),
    Algorithm("pid", "progressive: one layer per stage bottom-up, then a soft-label classifier",
              _pid, internal=True),
    Algorithm("sid", "stacked: stage k optimises layers 1..k, soft labels in the last stage",
              _sid, internal=True),
)  # fmt: skip

#: name -> Algorithm, in the order the CLI, spec errors and reports list them.
REGISTRY: Mapping[str, Algorithm] = MappingProxyType({a.name: a for a in _RECORDS})
#: The algorithm names (the spec's allowed values of ``distill.algorithm``).
ALGORITHMS: tuple[str, ...] = tuple(REGISTRY)
#: Algorithms that distil internal representations.
INTERNAL: tuple[str, ...] = tuple(a.name for a in _RECORDS if a.internal)


def get(name: str) -> Algorithm:
    """The record of ``name``; an unknown name is an error listing the allowed values."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; allowed values: {ALGORITHMS}") from None


def build_stages(
    algorithm: str, num_layers: int, *, hard: bool = False, freeze_lower: bool = False
) -> list[Stage]:
    """The stages of ``algorithm`` for a student with ``num_layers`` encoder layers.

    ``hard`` says whether the user gave the hard-label term a weight > 0 (ignored by algorithms
    that always use hard labels). ``freeze_lower`` only affects algorithms that freeze (pid).
    """
    record = get(algorithm)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    return record.stages(tuple(range(1, num_layers + 1)), hard, freeze_lower)


def term_weights(
    algorithm: str, *, soft: float, hard: float, attention: float, hidden: float
) -> dict[str, float]:
    """The weight of each named loss term for ``algorithm``: the spec's weights, except that an
    algorithm that always trains on hard labels gets hard weight 1 when the spec leaves it 0."""
    if get(algorithm).always_hard and hard == 0:
        hard = 1.0
    return {"soft": soft, "hard": hard, "attention": attention, "hidden": hidden}


def active_terms(stage: Stage, weights: Mapping[str, float]) -> frozenset[str]:
    """The loss terms ``stage`` computes: those it switches on that have a weight > 0.

    The loop asks the teacher only for what these need, the student for attentions only when
    ``attention`` is active, and a stage with no active term is a settings error.
    """
    on = {
        "soft": stage.soft,
        "hard": stage.hard,
        "attention": bool(stage.internal_layers),
        "hidden": bool(stage.internal_layers),
    }
    return frozenset(name for name in LOSS_TERMS if on[name] and weights[name] > 0)


def check_weights(stages: list[Stage], weights: Mapping[str, float]) -> None:
    """Every stage must optimise something: a stage whose terms all weigh 0 is an error."""
    for stage in stages:
        if not active_terms(stage, weights):
            names = [n for n in LOSS_TERMS if n in _switched_on(stage)]
            raise ValueError(
                f"stage '{stage.name}' optimises {', '.join(names)} but all their weights are 0: "
                "give one of distill.losses.<term>.weight a value > 0"
            )


def _switched_on(stage: Stage) -> set[str]:
    return active_terms(stage, dict.fromkeys(LOSS_TERMS, 1.0))
