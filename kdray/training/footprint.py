"""What a student costs to run: the objective ``latency_ms`` of a multi-objective sweep.

Latency depends on the architecture (layers, widths, sequence length), not on the weights, so
it is measured before training on a randomly initialised copy of the trial's student: median
milliseconds of one forward pass of one example of ``data.max_seq_length`` tokens, on the CPU,
with the threads the trial has. It is a property of the trial's node and of how busy that node
was: compare latencies measured on the same kind of machine, one trial at a time where it
matters (``tune.max_concurrent: 1``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from kdray.spec import Spec
from kdray.training import models

WARMUP = 3
ROUNDS = 20


def student_architecture(spec: Spec, teacher_path: str, num_labels: int) -> torch.nn.Module:
    """A randomly initialised model shaped like the spec's student (no teacher weights read)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    student = spec.student
    if student.init in ("teacher", "random"):
        base = AutoConfig.from_pretrained(models.resolve_model_path(teacher_path))
        overrides: dict[str, Any] = {"num_hidden_layers": student.layers, "num_labels": num_labels}
        if student.init == "random":
            overrides.update(
                {k: v for k, v in (("hidden_size", student.hidden_size),
                                   ("intermediate_size", student.intermediate_size)) if v}
            )  # fmt: skip
        config = AutoConfig.for_model(**{**base.to_dict(), **overrides})
    else:
        config = AutoConfig.from_pretrained(models.resolve_model_path(student.init))
        config.num_labels = num_labels
    with models.quiet_loading():
        return AutoModelForSequenceClassification.from_config(config).eval()


@torch.inference_mode()
def cpu_latency_ms(model: torch.nn.Module, length: int, rounds: int = ROUNDS) -> float:
    """Median wall milliseconds of a forward pass of one example of ``length`` tokens."""
    vocab = int(getattr(model.config, "vocab_size", 1000))
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000 % vocab, vocab, (1, length), generator=generator),
        "attention_mask": torch.ones(1, length, dtype=torch.long),
    }
    model = model.to("cpu")
    for _ in range(WARMUP):
        model(**inputs)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def measure(spec: Spec, teacher_path: str, num_labels: int) -> dict[str, float]:
    """``{"latency_ms": ...}`` of the spec's student."""
    length = int(spec.data.max_seq_length)
    model = student_architecture(spec, teacher_path, num_labels)
    return {"latency_ms": cpu_latency_ms(model, length)}
