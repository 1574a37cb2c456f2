"""The teacher task of a sweep: one trial's CPUs against the CPUs of all concurrent trials.

A sweep or ablation fine-tunes its teacher in one Ray task before any trial starts. With
``tune.resources.cpu: 1`` and ``tune.max_concurrent: 2`` that task used to ask for one CPU, so torch
ran it on one thread while the other core idled; it now asks for the trials' CPUs together
(``kdray.experiments.sweep.setup_cpus``). This times that Ray task both ways on a local 2-CPU Ray,
in interleaved rounds, each fine-tuning the MiniLM-L6 teacher from scratch (a fresh cache folder per
run) on the first ``--examples`` RTE training rows for one epoch, dev set included. Reported: the
median seconds per variant and their ratio.

    python benchmarks/bench_setup.py [--rounds 3] [--examples 640] [--tag NAME]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

CPUS = 2  # the local Ray's CPUs: two 1-CPU trials


def _time_teacher_task(spec_json: dict[str, Any], cpus: float) -> float:
    """Seconds for one teacher Ray task with ``cpus`` CPUs, fine-tuning from scratch."""
    import ray

    from kdray.experiments.sweep import _teacher_task

    with tempfile.TemporaryDirectory(prefix="bench-setup-") as folder:
        fresh = {**spec_json, "data": {**spec_json["data"], "cache_dir": f"{folder}/cache"}}
        task = ray.remote(num_cpus=cpus, num_gpus=0)(_teacher_task)
        started = time.perf_counter()
        ray.get(task.remote(fresh, f"{folder}/teacher", cpus))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=640, help="RTE training rows")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = parser.parse_args()
    common.setup_env()
    import ray

    from kdray.experiments.sweep import setup_task_cpus
    from kdray.spec import spec_from_dict

    raw = common.spec_dict(teacher_epochs=1, name="bench-setup")
    raw["train"]["max_train_examples"] = args.examples
    raw["tune"] = {"max_concurrent": CPUS, "resources": {"cpu": 1, "gpu": 0}}
    spec = spec_from_dict(raw, source="<benchmark spec>")
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    variants = {
        "one_trial_cpus": spec.tune.resources.cpu,  # what the task asked for before
        "all_trials_cpus": setup_task_cpus(spec),  # what kdray asks for now
    }
    spec_json = spec.model_dump(mode="json")
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(1, args.rounds + 1):
        for name, cpus in variants.items():
            seconds[name].append(_time_teacher_task(spec_json, cpus))
            print(f"round {round_} {name} ({cpus:g} CPUs): {seconds[name][-1]:.1f} s", flush=True)
    ray.shutdown()
    medians = {name: common.median(values) for name, values in seconds.items()}
    ratio = medians["one_trial_cpus"] / medians["all_trials_cpus"]
    print(
        f"median: one trial's CPUs {medians['one_trial_cpus']:.1f} s, all trials' CPUs "
        f"{medians['all_trials_cpus']:.1f} s: {ratio:.2f}x faster"
    )
    path = common.write_json(
        "bench_setup" + (f"-{args.tag}" if args.tag else ""),
        {
            "machine": common.machine_info(),
            "setting": {"examples": args.examples, "teacher_epochs": 1, "ray_cpus": CPUS},
            "cpus": variants,
            "seconds": seconds,
            "median_seconds": medians,
            "speedup": ratio,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
