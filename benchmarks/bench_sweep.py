"""What Ray Tune costs per trial: a sweep of N identical short trials through
``kdray.experiments.sweep.run_sweep`` against the same N runs called directly with
``kdray.training.distill.distill``.

The sweep's search block is one single-value choice (every trial is the same run), FIFO
scheduler, max_concurrent 1, resources cpu 2; Ray is bound to 127.0.0.1 by
``kdray.experiments.sweep.init_ray``. The trial is sized with ``train.max_train_examples`` to about
``--trial-seconds`` (a short probe measures the per-step time first). The direct runs are split
around the sweep (half before, half after) so a load change hits both.

Reported: Ray start-up (``init_ray`` until a first task has run), the sweep's teacher phase
(from ``run_sweep`` until Tune starts: fine-tuned teacher copied into the storage and the
teacher-output cache built by a Ray task), per-trial overhead
``(sweep wall - teacher phase - direct wall) / N``, that overhead as % of a trial, trials/hour.

    python benchmarks/bench_sweep.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402


def probe_per_step(base: Any, info: Any, root: Path, steps: int) -> float:
    """Seconds per training step of a direct cached idal run (its cache built beforehand)."""
    from kdray.training.distill import distill

    spec = base.with_values(
        {
            "teacher.checkpoint": info.path,
            "train.max_train_examples": steps * base.train.batch_size,
            "train.epochs": 1,
            "teacher.cache.enabled": "on",
            "teacher.cache.dir": str(root),
            "train.diagnostics": False,
        }
    )
    result = distill(spec)
    if result.status != "ok":
        raise RuntimeError(f"probe run failed: {result.error}")
    return result.records[0]["train_seconds"] / steps


def build_direct_cache(spec: Any, info: Any) -> float:
    """Build the trial split's teacher-output cache for the direct runs (with the factory
    ``distill`` uses, so their runs find it ready); seconds taken."""
    from kdray.training import data, engine, models
    from kdray.training.teacher_outputs import cache_enabled, outputs_factory

    if not cache_enabled(spec):
        return 0.0
    prepared = data.prepare(spec, info.path)
    teacher_model = models.load_classifier(info.path, prepared.task.num_labels)
    layer_map = models.resolve_layer_map(
        spec.distill.layer_map, spec.student.layers, models.num_layers(teacher_model)
    )
    factory = outputs_factory(spec, layer_map, info)
    started = time.perf_counter()
    factory(prepared, teacher_model, engine.pick_device(spec.train.device))
    return time.perf_counter() - started


def direct_run(spec: Any) -> dict[str, Any]:
    from kdray.training.distill import distill

    started = time.perf_counter()
    result = distill(spec)
    wall = time.perf_counter() - started
    return {
        "wall_seconds": round(wall, 2),
        "status": result.status,
        "train_seconds": round(sum(r["train_seconds"] for r in result.records), 2),
        "epochs": result.epochs_run,
        "accuracy": result.best_metrics.get("accuracy"),
    }


TIMING_ENV = "KDRAY_BENCH_TRIAL_TIMING"


def timed_trainable(config: dict[str, Any], spec_json: dict[str, Any] | None = None) -> None:
    """kdray.experiments.sweep.distill_trainable, unchanged, with its start and end (wall clock)
    appended to the file named by $KDRAY_BENCH_TRIAL_TIMING: splits a trial's Tune overhead into
    worker start-up, the trainable itself and the wind-down."""
    import json
    import os
    import time

    from kdray.experiments.sweep import distill_trainable

    start = time.time()
    distill_trainable(config, spec_json=spec_json)
    end = time.time()
    path = os.environ.get(TIMING_ENV)
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"start": start, "end": end, "pid": os.getpid()}) + "\n")


def trial_phases(timing: Any, path: Path) -> list[dict[str, float]]:
    """Per trial: driver start -> trainable start (worker start-up and imports), trainable
    wall, trainable end -> driver sees the trial complete."""
    import json

    if not path.exists():
        return []
    inside = sorted(
        (json.loads(line) for line in path.read_text().splitlines() if line.strip()),
        key=lambda r: r["start"],
    )
    starts = sorted(timing.wall_starts.values())
    ends = sorted(timing.wall_ends.values())
    phases = []
    for i, record in enumerate(inside):
        if i >= len(starts) or i >= len(ends):
            break
        phases.append(
            {
                "launch_s": round(record["start"] - starts[i], 2),
                "trainable_s": round(record["end"] - record["start"], 2),
                "wind_down_s": round(ends[i] - record["end"], 2),
                "worker_pid": record["pid"],
            }
        )
    return phases


def _sweep_epoch_sums(epochs: Any) -> dict[str, list[float]]:
    """Per sweep trial, the summed ``train_seconds`` and ``checkpoint_seconds`` of its epochs:
    is training itself slower inside a Ray worker, or is the time spent around it?"""
    out: dict[str, list[float]] = {}
    for column in ("train_seconds", "checkpoint_seconds"):
        if column in epochs.columns:
            sums = epochs.groupby("trial_id", sort=True)[column].sum()
            out[column] = [round(float(v), 2) for v in sums]
    return out


def overhead_parts(
    overhead: float, phases: list[dict[str, float]], per_trial: dict[str, list[float]], direct: list
) -> dict[str, float]:
    """The per-trial overhead split into its parts (means over trials): Tune starting the
    trainable (launch), training steps running slower in the worker than in the direct runs,
    kdray's checkpoint writes, the rest inside the trainable (Tune's per-epoch report round trip,
    Ray copying each checkpoint into the storage), the wind-down, and the remainder between
    trials (Tune's scheduling and bookkeeping in the driver)."""

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    direct_wall = mean([d["wall_seconds"] for d in direct])
    slower = mean(per_trial.get("train_seconds", [])) - mean([d["train_seconds"] for d in direct])
    checkpoints = mean(per_trial.get("checkpoint_seconds", []))
    launch = mean([p["launch_s"] for p in phases])
    inside = mean([p["trainable_s"] for p in phases]) - direct_wall
    wind_down = mean([p["wind_down_s"] for p in phases])
    parts = {
        "launch": launch,
        "training_slower_in_worker": slower,
        "checkpoint_writes": checkpoints,
        "report_and_checkpoint_copy": inside - slower - checkpoints,
        "wind_down": wind_down,
        "between_trials": overhead - launch - inside - wind_down,
    }
    return {k: round(v, 2) for k, v in parts.items()}


def timing_callback() -> Any:
    """A Tune callback that notes when Tune starts and when each trial starts and ends."""
    from ray.tune import Callback

    class Timing(Callback):
        def __init__(self) -> None:
            self.setup_at: float | None = None
            self.starts: dict[str, float] = {}
            self.ends: dict[str, float] = {}

            self.wall_starts: dict[str, float] = {}
            self.wall_ends: dict[str, float] = {}

        def setup(self, **info: Any) -> None:
            self.setup_at = time.perf_counter()

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.starts[trial.trial_id] = time.perf_counter()
            self.wall_starts[trial.trial_id] = time.time()

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.ends[trial.trial_id] = time.perf_counter()
            self.wall_ends[trial.trial_id] = time.time()

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.on_trial_complete(iteration, trials, trial)

    return Timing()


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch

    from kdray.experiments import sweep
    from kdray.training.teacher import ensure_teacher

    console = _console()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="kdray-bench-sweep-"))
    base = common.build_spec(teacher_epochs=args.teacher_epochs, name="bench-sweep")
    t0 = time.perf_counter()
    info = ensure_teacher(base)
    teacher_seconds = time.perf_counter() - t0
    console.print(f"teacher {info.id} ready in {teacher_seconds:.1f} s")

    batch = base.train.batch_size
    if args.train_examples:
        examples, per_step = args.train_examples, None
    else:
        per_step = probe_per_step(base, info, work / "probe-cache", args.probe_steps)
        # two epochs of training plus two dev evaluations and the end-of-run diagnostics
        budget = max(args.trial_seconds - args.fixed_seconds, 2 * per_step)
        steps = max(2, int(budget / per_step))
        examples = math.ceil(steps / args.epochs) * batch
        console.print(
            f"probe: {per_step:.3f} s/step -> {examples} rows x {args.epochs} epochs "
            f"(~{examples / batch * args.epochs * per_step:.0f} s of steps)"
        )
    trial_spec = base.with_values(
        {
            "teacher.checkpoint": info.path,
            "train.max_train_examples": examples,
            "train.epochs": args.epochs,
            "train.diagnostics": args.diagnostics,
        }
    )
    direct_cache_seconds = build_direct_cache(trial_spec, info)
    console.print(f"direct runs' teacher-output cache built in {direct_cache_seconds:.1f} s")

    n = args.trials
    before, after = (n + 1) // 2, n // 2
    direct: list[dict[str, Any]] = []
    for i in range(before):
        direct.append(direct_run(trial_spec))
        console.print(f"direct run {i + 1}/{n}: {direct[-1]['wall_seconds']:.1f} s")

    os.environ[TIMING_ENV] = str(work / "trial-timing.jsonl")  # Ray workers inherit it
    t0 = time.perf_counter()
    started_ray = sweep.init_ray(num_cpus=args.ray_cpus)
    ray_init = time.perf_counter() - t0
    ray.get(ray.remote(lambda: 1).remote())
    ray_ready = time.perf_counter() - t0
    console.print(f"Ray: init {ray_init:.1f} s, first task done {ray_ready:.1f} s")

    sweep_spec = trial_spec.with_values({})
    raw = sweep_spec.model_dump(mode="json", by_alias=True)
    raw["search"] = {"distill.algorithm": {"choice": ["idal"]}}
    raw["tune"] = {
        "metric": "accuracy",
        "mode": "max",
        "num_samples": n,
        "scheduler": {},
        "max_concurrent": 1,
        "resources": {"cpu": 2, "gpu": 0},
    }
    from kdray.spec import spec_from_dict

    sweep_spec = spec_from_dict(raw, source="<bench sweep spec>")
    timing = timing_callback()
    timing_file = work / "trial-timing.jsonl"
    t0 = time.perf_counter()
    result = sweep.run_sweep(
        sweep_spec,
        out_dir=work / "out",
        storage=str(work / "ray"),
        callbacks=[timing],
        trainable=timed_trainable if args.trial_timing else None,
    )
    sweep_wall = time.perf_counter() - t0
    teacher_phase = (timing.setup_at - t0) if timing.setup_at else float("nan")
    trials = result.trials
    statuses = trials["status"].tolist() if "status" in trials else []
    console.print(f"sweep: {sweep_wall:.1f} s (teacher phase {teacher_phase:.1f} s), {statuses}")
    if started_ray:
        ray.shutdown()

    for i in range(after):
        direct.append(direct_run(trial_spec))
        console.print(f"direct run {before + i + 1}/{n}: {direct[-1]['wall_seconds']:.1f} s")

    direct_wall = sum(d["wall_seconds"] for d in direct)
    trial_time = direct_wall / n
    overhead = (sweep_wall - teacher_phase - direct_wall) / n
    in_tune = [timing.ends[k] - timing.starts[k] for k in timing.starts if k in timing.ends]
    phases = trial_phases(timing, timing_file)
    per_trial = _sweep_epoch_sums(result.epochs)
    payload: dict[str, Any] = {
        "benchmark": "bench_sweep",
        "machine": common.machine_info(),
        "settings": {
            "quick": args.quick,
            "trials": n,
            "trial_rows": examples,
            "trial_epochs": args.epochs,
            "target_trial_seconds": args.trial_seconds,
            "probe_per_step_s": round(per_step, 4) if per_step else None,
            "search": raw["search"],
            "tune": raw["tune"],
            "algorithm": "idal, teacher-output cache on (auto: epochs > 1)",
            "threads": torch.get_num_threads(),
            "diagnostics": args.diagnostics,
            "trainable": "bench_sweep.timed_trainable "
            "(kdray.experiments.sweep.distill_trainable + a start/end timestamp)"
            if args.trial_timing
            else "kdray.experiments.sweep.distill_trainable",
        },
        "teacher_seconds_direct": round(teacher_seconds, 2),
        "direct_cache_build_seconds": round(direct_cache_seconds, 2),
        "ray_init_seconds": round(ray_init, 2),
        "ray_first_task_seconds": round(ray_ready, 2),
        "sweep_wall_seconds": round(sweep_wall, 2),
        "sweep_teacher_phase_seconds": round(teacher_phase, 2),
        "sweep_trial_seconds_driver_view": [round(x, 2) for x in in_tune],
        "sweep_trial_phases": phases,
        "sweep_trial_statuses": statuses,
        "sweep_trial_train_seconds": per_trial.get("train_seconds", []),
        "sweep_trial_checkpoint_seconds": per_trial.get("checkpoint_seconds", []),
        "direct_runs": direct,
        "direct_wall_seconds": round(direct_wall, 2),
        "trial_seconds_direct_mean": round(trial_time, 2),
        "overhead_per_trial_seconds": round(overhead, 2),
        "overhead_parts_per_trial_seconds": overhead_parts(overhead, phases, per_trial, direct),
        "overhead_percent_of_trial": round(100 * overhead / trial_time, 1),
        # the goal's own terms: Ray's share of the sweep's wall time (without the teacher phase)
        "overhead_percent_of_sweep_wall": round(100 * overhead / (trial_time + overhead), 1),
        "overhead_per_trial_with_ray_start_seconds": round(overhead + ray_ready / n, 2),
        "trials_per_hour_sweep": round(3600 * n / (sweep_wall - teacher_phase), 1),
        "trials_per_hour_direct": round(3600 / trial_time, 1),
        "definitions": {
            "sweep wall": "run_sweep call (Ray already started)",
            "teacher phase": "run_sweep start until Tune's callbacks are set up: the "
            "teacher task (a pinned fine-tuned teacher copied into the storage) and the "
            "teacher-output cache task",
            "direct wall": "sum of the N direct distill() calls (their cache built beforehand, "
            "direct_cache_build_seconds)",
            "overhead per trial": "(sweep wall - teacher phase - direct wall) / N",
            "trials/hour sweep": "N / (sweep wall - teacher phase)",
        },
    }
    shutil.rmtree(work, ignore_errors=True)
    payload["seconds_total"] = round(time.perf_counter() - started, 1)
    payload["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return payload


def _console() -> Any:
    from rich.console import Console

    return Console()


def print_table(payload: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"bench_sweep: {payload['settings']['trials']} identical trials")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("Ray start-up (init / first task done)", "ray_init_seconds", "s"),
        ("", "ray_first_task_seconds", "s"),
        ("sweep wall (run_sweep)", "sweep_wall_seconds", "s"),
        ("sweep teacher phase", "sweep_teacher_phase_seconds", "s"),
        ("direct wall (N distill calls)", "direct_wall_seconds", "s"),
        ("trial time (direct mean)", "trial_seconds_direct_mean", "s"),
        ("overhead per trial", "overhead_per_trial_seconds", "s"),
        ("overhead % of trial", "overhead_percent_of_trial", "%"),
        ("overhead % of sweep wall", "overhead_percent_of_sweep_wall", "%"),
        ("overhead per trial incl. Ray start", "overhead_per_trial_with_ray_start_seconds", "s"),
        ("trials/hour, sweep", "trials_per_hour_sweep", ""),
        ("trials/hour, direct", "trials_per_hour_direct", ""),
    ]
    for label, key, unit in rows:
        table.add_row(label or "  (first task done)", f"{payload[key]} {unit}".strip())
    phases = payload.get("sweep_trial_phases") or []
    for key, label in (
        ("launch_s", "trial launch (Tune start -> trainable runs)"),
        ("trainable_s", "trainable wall (distill + reports/checkpoints)"),
        ("wind_down_s", "trial wind-down (trainable end -> Tune sees it)"),
    ):
        if phases:
            value = common.median([p[key] for p in phases])
            table.add_row(label + ", median", f"{value:.2f} s")
    direct_train = common.median([d["train_seconds"] for d in payload["direct_runs"]])
    for key, label in (
        ("sweep_trial_train_seconds", "training steps per trial, sweep vs direct, median"),
        ("sweep_trial_checkpoint_seconds", "checkpoint writes per trial, median"),
    ):
        values = payload.get(key) or []
        if values:
            extra = f" vs {direct_train:.2f} s" if key == "sweep_trial_train_seconds" else ""
            table.add_row(label, f"{common.median(values):.2f} s{extra}")
    if phases:
        workers = len({p["worker_pid"] for p in phases if "worker_pid" in p})
        table.add_row("trial worker processes (reused across trials)", str(workers))
    _console().print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 tiny trials (~3 min)")
    parser.add_argument("--trials", type=int, help="N (3; quick 2)")
    parser.add_argument("--trial-seconds", type=float, default=60.0)
    parser.add_argument(
        "--fixed-seconds",
        type=float,
        default=7.0,
        help="part of a trial that is not training steps (set-up, dev eval, diagnostics: "
        "about 6.5 s measured for 1.5k RTE rows)",
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (cache on)")
    parser.add_argument("--train-examples", type=int, help="rows per trial (skips the probe)")
    parser.add_argument("--probe-steps", type=int, default=8)
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--ray-cpus", type=int, default=None)
    parser.add_argument(
        "--no-trial-timing",
        dest="trial_timing",
        action="store_false",
        help="run kdray's trainable itself, without the start/end timing wrapper",
    )
    parser.add_argument(
        "--diagnostics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train.diagnostics in every trial (default on; quick off)",
    )
    parser.add_argument("--cache-dir", help=f"KDRAY_CACHE_DIR (default {common.DEFAULT_CACHE_DIR})")
    parser.add_argument(
        "--omp-passive",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE (for a machine shared with other CPU work)",
    )
    args = parser.parse_args(argv)
    args.trials = args.trials or (2 if args.quick else 3)
    if args.quick and args.train_examples is None:
        args.train_examples = 64
    if args.diagnostics is None:
        args.diagnostics = not args.quick
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.setup_env(args.cache_dir, omp_passive=args.omp_passive)
    import torch

    torch.set_num_threads(common.THREADS)
    payload = run_benchmark(args)
    path = common.write_json("bench_sweep" + ("-quick" if args.quick else ""), payload)
    print_table(payload)
    _console().print(f"wrote {path} in {payload['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
