"""Time to a verdict: what one paired question costs, end to end, through ``kdray ablate``.

The question: RTE ``soft`` against ``pid`` (search_spaces/rte-cpu.yaml's recipe, baseline
``soft``), with adaptive seeds (``{min: 3, max: 10, step: 2}``, the study's design: seeds are
added in rounds until the comparison is resolved or ``max`` is reached), on the first
``--rows`` training rows so that it fits a benchmark. The real CLI command runs in this process
(``kdray ablate SPEC --out ... --overwrite``), from a fresh cache folder, so the teacher is
fine-tuned as a user's first ablation would fine-tune it.

Reported: wall seconds, CPU-seconds of the whole machine over the run (``/proc/stat``: the Ray
workers included; run it on a quiet machine), and the wall time split into its parts:

- ``ray_start``: ``kdray.experiments.sweep.init_ray``;
- ``teacher``: the teacher phase of each round (``kdray.experiments.sweep._prepare_teacher``:
fine-tune or
  cache hit, copy into the storage);
- ``teacher_outputs``: each round's teacher-output cache
(``kdray.experiments.sweep._prepare_outputs``);
- ``training`` and ``evaluation``: the trials' epochs (``train_seconds``, ``eval_seconds`` of
  the epochs table);
- ``trial_other``: the rest of each trainable (model and data set-up, checkpoints, reports,
  diagnostics), from a thin timing wrapper around ``kdray.experiments.sweep.distill_trainable``;
- ``ray_per_trial``: Tune's ``fit`` minus the trainables (worker start, scheduling, result and
  checkpoint handling);
- ``driver``: everything else (pre-flight checks, tables, the statistics, the report).

    python benchmarks/bench_verdict.py [--rows 192] [--max-seeds 10] [--tag before] [--set k=v]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

REPO = common.BENCH_DIR.parent
SPEC = REPO / "search_spaces" / "rte-cpu.yaml"
TIMING_ENV = "KDRAY_BENCH_TRIAL_TIMING"


def timed_trainable(config: dict[str, Any], spec_json: dict[str, Any] | None = None) -> None:
    """kdray.experiments.sweep.distill_trainable, unchanged, with its start and end appended to the
    file $KDRAY_BENCH_TRIAL_TIMING names (defined here, so Ray ships it by value to the worker)."""
    import json
    import os
    import time

    from kdray.experiments.sweep import distill_trainable

    start = time.time()
    try:
        distill_trainable(config, spec_json=spec_json)
    finally:
        path = os.environ.get(TIMING_ENV)
        if path:
            with open(path, "a") as handle:
                handle.write(json.dumps({"start": start, "end": time.time()}) + "\n")


def busy_cpu_seconds() -> float:
    """CPU-seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal
    excluded) since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class Clock:
    """Sums of the wall seconds spent in the functions it wraps, by part."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, part: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - started
                self.calls[part] = self.calls.get(part, 0) + 1

        return timed


def write_spec(folder: Path, rows: int, max_seeds: int, values: dict[str, Any]) -> Path:
    """rte-cpu.yaml's recipe with the soft-vs-pid question as its ablation block."""
    import yaml

    raw = yaml.safe_load(SPEC.read_text())
    raw["name"] = "bench-verdict"
    raw["train"]["max_train_examples"] = rows
    raw["ablation"] = {
        "design": "grid",
        "axes": {"distill.algorithm": ["soft", "pid"]},
        "baseline": {"distill.algorithm": "soft"},
        "seeds": {"min": 3, "max": max_seeds, "step": 2},
    }
    raw.pop("study", None)
    for key, value in values.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = folder / "bench-verdict.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_ablate(spec_path: Path, out: Path, clock: Clock) -> int:
    """``kdray ablate`` in this process with kdray's phases timed; its exit code."""
    import click
    import typer.main
    from ray import tune

    from kdray import cli
    from kdray.experiments import sweep

    sweep.init_ray = clock.wrap("ray_start", sweep.init_ray)
    sweep._prepare_teacher = clock.wrap("teacher", sweep._prepare_teacher)
    sweep._prepare_outputs = clock.wrap("teacher_outputs", sweep._prepare_outputs)
    sweep.distill_trainable = timed_trainable
    tune.Tuner.fit = clock.wrap("fit", tune.Tuner.fit)
    command = typer.main.get_command(cli.app)
    try:
        command.main(
            args=["ablate", str(spec_path), "--out", str(out), "--overwrite"],
            prog_name="kdray",
            standalone_mode=False,
        )
    except (SystemExit, click.exceptions.Exit) as stop:
        code = getattr(stop, "exit_code", getattr(stop, "code", 1))
        return int(code or 0)
    return 0


def breakdown(out: Path, clock: Clock, timing: Path, wall: float) -> dict[str, Any]:
    """The wall seconds by part (see the module docstring)."""
    import pandas as pd

    epochs = pd.read_parquet(out / "epochs.parquet")
    inside = [json.loads(x) for x in timing.read_text().splitlines() if x.strip()]
    trainables = sum(r["end"] - r["start"] for r in inside)
    training = float(epochs["train_seconds"].sum())
    evaluation = float(epochs["eval_seconds"].sum()) if "eval_seconds" in epochs else None
    known = training + (evaluation or 0.0)
    parts = {
        "ray_start": clock.seconds.get("ray_start", 0.0),
        "teacher": clock.seconds.get("teacher", 0.0),
        "teacher_outputs": clock.seconds.get("teacher_outputs", 0.0),
        "training": training,
        "evaluation": evaluation,
        "trial_other": trainables - known,
        "ray_per_trial": clock.seconds.get("fit", 0.0) - trainables,
    }
    accounted = sum(v for k, v in parts.items() if v is not None and k != "ray_start")
    parts["driver"] = wall - accounted - parts["ray_start"]
    return {k: (round(v, 2) if v is not None else None) for k, v in parts.items()}


def verdict(out: Path) -> dict[str, Any]:
    """Seeds per cell, the trials, and the comparison the tables give (``kdray report``)."""
    import pandas as pd

    from kdray.analysis import report

    trials = pd.read_parquet(out / "trials.parquet")
    summary: dict[str, Any] = {
        "trials": int(len(trials)),
        "statuses": trials["status"].value_counts().to_dict(),
        "seeds_per_cell": trials.groupby("cell")["seed"].nunique().to_dict(),
        "rounds": len(list((out / "rounds").glob("round-*"))),
    }
    try:
        table = report.paired_comparison(trials, {"distill.algorithm": "soft"}, "accuracy")
        summary["comparison"] = json.loads(table.to_json(orient="records"))
    except Exception as error:  # noqa: BLE001 - the timing stands without the table
        summary["comparison_error"] = f"{type(error).__name__}: {error}"
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=192, help="training rows (first N)")
    parser.add_argument("--max-seeds", type=int, default=10, help="adaptive seeds' max")
    parser.add_argument("--set", action="append", default=[], help="spec key=value (YAML)")
    parser.add_argument("--tag", help="write results/bench_verdict-<tag>.json")
    parser.add_argument("--omp-passive", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import yaml

    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="kdray-bench-verdict-"))
    common.setup_env(cache_dir=str(root / "cache"), omp_passive=args.omp_passive)
    timing = root / "trial-timing.jsonl"
    os.environ[TIMING_ENV] = str(timing)
    values = dict(item.split("=", 1) for item in args.set)
    values = {k: yaml.safe_load(v) for k, v in values.items()}
    spec_path = write_spec(root, args.rows, args.max_seeds, values)
    out = root / "out"
    clock = Clock()
    cpu0, started = busy_cpu_seconds(), time.perf_counter()
    code = run_ablate(spec_path, out, clock)
    wall = time.perf_counter() - started
    cpu = busy_cpu_seconds() - cpu0
    payload: dict[str, Any] = {
        "benchmark": "bench_verdict",
        "machine": common.machine_info(),
        "settings": {
            "question": "RTE soft vs pid, search_spaces/rte-cpu.yaml's recipe",
            "rows": args.rows,
            "adaptive_seeds": {"min": 3, "max": args.max_seeds, "step": 2},
            "set": values,
            "command": "kdray ablate <spec> --out <tmp> --overwrite (in process), fresh cache",
        },
        "exit_code": code,
        "wall_seconds": round(wall, 1),
        "machine_busy_cpu_seconds": round(cpu, 1),
        "parts_seconds": breakdown(out, clock, timing, wall),
        "calls": clock.calls,
        "verdict": verdict(out),
    }
    name = f"bench_verdict-{args.tag}" if args.tag else "bench_verdict"
    path = common.write_json(name, payload)
    print(json.dumps({k: payload[k] for k in ("wall_seconds", "machine_busy_cpu_seconds")}))
    print(json.dumps(payload["parts_seconds"], indent=1))
    print(json.dumps(payload["verdict"], indent=1, default=str))
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"kept {root}")


if __name__ == "__main__":
    main()
