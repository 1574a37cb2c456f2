"""kdray on one GPU: the cached step's throughput by precision and batch size, how many trials
fit on the card at once, and the teacher-output cache build time.

The setting is every benchmark's (MiniLM-L6 teacher fine-tuned on RTE -> 3-layer student, idal,
length 64, real RTE rows), on ``--device`` (default cuda). For each precision (fp32, bf16) and batch
size (32, 128) it builds kdray's real run (``kdray.training.distill.setup`` with the teacher-output
cache) and times ``--steps`` calls of the real step after ``--warmup``; examples/s is the median
over ``--rounds``. The peak GPU memory of a step gives how many trials of that configuration fit on
the card (``tune.resources.gpu = 1 / n``, leaving 10 % of the card free). On a machine without CUDA
it runs on the CPU as a dry run (``--device cpu``), which the tests use to keep it working; bf16
then runs as real CPU autocast (native on AVX512-BF16/AMX CPUs). Every row is labelled with the
precision that ran (``kdray.training.engine.precision_to_run``) and whether this CPU computes it
natively.

    python benchmarks/bench_gpu.py [--device cuda] [--quick]
    python benchmarks/bench_gpu.py --device cpu --tiny MODEL_DIR --glue GLUE_DIR   # dry run
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

PRECISIONS = ("fp32", "bf16")
BATCH_SIZES = (32, 128)
HEADROOM = 0.9  # share of the card trials may fill


def base_spec(args: argparse.Namespace) -> Any:
    """The benchmark spec on ``--device``; with ``--tiny`` a tiny model on fixture data."""
    from kdray.spec import spec_from_dict

    raw = common.spec_dict(epochs=1)
    raw["train"].update({"device": args.device, "threads": None})
    if args.tiny:
        raw["teacher"].update({"model": args.tiny, "epochs": 1, "batch_size": 4})
        raw["student"]["layers"] = 2
        raw["data"] = {"dir": args.glue, "max_seq_length": 32}
    if args.train_examples:
        raw["train"]["max_train_examples"] = args.train_examples
    return spec_from_dict(raw, source="<bench_gpu spec>")


def cuda_memory() -> tuple[float, float]:
    """(peak allocated GiB since the last reset, total GiB of the card); zeros on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return 0.0, 0.0
    total = torch.cuda.get_device_properties(0).total_memory
    return torch.cuda.max_memory_allocated() / 2**30, total / 2**30


def measure(spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One (precision, batch size): examples/s of the real cached step and its peak memory."""
    import torch

    from kdray.infra.progress import NoProgress
    from kdray.training import engine
    from kdray.training.distill import setup

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = setup(spec, NoProgress())
    stage = run.schedule.stage
    run.enter_stage(stage)
    loader = engine.make_loader(
        run.prepared.train, spec.train.batch_size, run.prepared.tokenizer.pad_token_id,
        shuffle_seed=1,
    )  # fmt: skip
    batches = [engine.to_device(b, run.device) for b in loader]
    rates = []
    for _ in range(args.rounds):
        for i in range(args.warmup):
            run.step(batches[i % len(batches)], stage)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started, examples = time.perf_counter(), 0
        for i in range(args.steps):
            batch = batches[i % len(batches)]
            float(run.step(batch, stage)["total"].detach())  # what the loop does each step
            examples += int(batch["labels"].shape[0])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rates.append(examples / (time.perf_counter() - started))
    peak, total = cuda_memory()
    return {
        "examples_per_s": round(common.median(rates), 1),
        "rounds_examples_per_s": [round(r, 1) for r in rates],
        "peak_gib": round(peak, 3),
        "trials_per_gpu": int(HEADROOM * total // peak) if peak > 0 else None,
    }


def ran(spec: Any) -> dict[str, Any]:
    """The precision that runs for the spec on its device, and (on a CPU) whether in hardware."""
    from kdray.training import engine

    device = engine.pick_device(spec.train.device)
    precision = engine.precision_to_run(device, spec.train.precision)
    native = engine.native_cpu(precision) if device.type == "cpu" else None
    return {"precision": precision, "native": native}


def cache_build(spec: Any) -> dict[str, Any]:
    """Build the teacher-output cache for the spec (fresh folder) and time it."""
    import tempfile

    from kdray.training import data, engine, models
    from kdray.training.teacher import ensure_teacher
    from kdray.training.teacher_outputs import outputs_factory

    info = ensure_teacher(spec)
    prepared = data.prepare(spec, info.path)
    teacher = models.load_classifier(info.path, prepared.task.num_labels)
    layer_map = models.resolve_layer_map(
        spec.distill.layer_map, spec.student.layers, models.num_layers(teacher)
    )
    with tempfile.TemporaryDirectory(prefix="kdray-bench-gpu-") as root:
        started = time.perf_counter()
        outputs = outputs_factory(spec, layer_map, info, root=root)(
            prepared, teacher, engine.pick_device(spec.train.device)
        )
        seconds = time.perf_counter() - started
        manifest = getattr(outputs, "manifest", None)
        return {
            "seconds": round(seconds, 2),
            "examples": len(prepared.train),
            "bytes": sum(manifest.bytes.values()) if manifest else None,
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    base = base_spec(args)
    outputs_dir = Path(common.setup_env(args.cache_dir)) / "bench-gpu-outputs"
    base = base.with_values({"teacher.cache.enabled": "on", "teacher.cache.dir": str(outputs_dir)})
    results = {"teacher_cache_build": cache_build(base), "configurations": []}
    for precision in PRECISIONS:
        for batch in args.batch_sizes:
            spec = base.with_values({"train.precision": precision, "train.batch_size": batch})
            row = {**ran(spec), "batch_size": batch, **measure(spec, args)}
            results["configurations"].append(row)
            print(json.dumps(row), flush=True)
    device = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run, no CUDA)"
    )
    return {
        "benchmark": "bench_gpu",
        "device": device,
        "machine": common.machine_info(),
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "train_examples": args.train_examples,
            "tiny": bool(args.tiny),
        },
        **results,
        "seconds_total": round(time.perf_counter() - started, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (a dry run)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, help="timed steps per round (30; quick 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps per round (5; quick 1)")
    parser.add_argument("--rounds", type=int, help="rounds (3; quick 1)")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument("--train-examples", type=int, help="first N RTE rows")
    parser.add_argument("--tiny", help="a tiny model folder instead of MiniLM (dry runs)")
    parser.add_argument("--glue", help="GLUE folder for --tiny (the fixture layout)")
    parser.add_argument("--cache-dir", help=f"KDRAY_CACHE_DIR (default {common.DEFAULT_CACHE_DIR})")
    parser.add_argument("--out", help="write the JSON here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.setup_env(args.cache_dir)
    payload = run(args)
    if args.out:
        path = Path(args.out)
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    else:
        name = "bench_gpu" + ("-dry-run" if args.device == "cpu" else "")
        path = common.write_json(name, payload)
    print(f"wrote {path} in {payload['seconds_total']:.0f} s on {payload['device']}")


if __name__ == "__main__":
    main()
