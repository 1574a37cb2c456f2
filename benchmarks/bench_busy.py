"""kdray's cached step on a busy machine: one of the two cores taken by a CPU-bound process.

For each OpenMP wait policy (libgomp's default, which spins 300,000 rounds before sleeping;
``PASSIVE``, kdray's default, which sleeps at once; a short spin of 10,000 rounds) a fresh
process builds the ``cached`` variant of ``bench_epoch.py`` (kdray's real step from
``kdray.training.distill.setup``, teacher outputs from the cache, 2 torch threads) and times, in
interleaved rounds, ``--steps`` steps on a quiet machine and ``--steps`` steps while a busy loop
pinned to core 0 runs. Reported per policy: the median seconds per step quiet and busy, and the
busy throughput as a ratio of the quiet one (goal: >= 0.45 with one of two cores taken); across
policies, the quiet step against the default's (goal: at most 3 % slower).

    python benchmarks/bench_busy.py [--quick] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

#: name -> the environment a child runs with (OpenMP reads it when torch loads)
POLICIES: dict[str, dict[str, str]] = {
    "default": {"KDRAY_OMP_WAIT_POLICY": "unset"},  # libgomp's own: spin 300,000 rounds
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # kdray's default: sleep at once
    "spin-10k": {"KDRAY_OMP_WAIT_POLICY": "unset", "GOMP_SPINCOUNT": "10000"},
}
MARK = "BUSY-JSON:"


def _busy_loop() -> subprocess.Popen:
    """A CPU-bound process pinned to core 0 (what another user's job looks like)."""
    code = "import os\nos.sched_setaffinity(0, {0})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def child(args: argparse.Namespace) -> None:
    """Runs in a fresh process with the policy's environment: quiet and busy rounds."""
    common.setup_env(args.cache_dir)
    import bench_epoch
    import torch

    torch.set_num_threads(common.THREADS)
    outputs_root = Path(args.cache_dir or common.DEFAULT_CACHE_DIR) / "bench-busy-outputs"
    ctx = bench_epoch.make_context(
        argparse.Namespace(
            teacher_epochs=args.teacher_epochs, temperature=1.0, train_examples=args.train_examples
        ),
        outputs_root,
    )
    bench_epoch.build_cached_outputs(ctx)
    variant = bench_epoch.KdrayVariant("cached", ctx)
    times: dict[str, list[float]] = {"quiet": [], "busy": []}
    for _ in range(args.rounds):
        for condition in ("quiet", "busy"):
            loop = _busy_loop() if condition == "busy" else None
            try:
                variant.run(args.warmup)
                started = time.perf_counter()
                variant.run(args.steps)
                times[condition].append((time.perf_counter() - started) / args.steps)
            finally:
                if loop is not None:
                    loop.kill()
                    loop.wait()
    print(MARK + json.dumps(times))


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    per_policy: dict[str, Any] = {}
    for name in args.policies:
        drop = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KDRAY_OMP_WAIT_POLICY")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(POLICIES[name])
        command = [sys.executable, __file__, "--child", *args.passthrough]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith(MARK)), None)
        if line is None:
            raise RuntimeError(f"{name} child failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        times = json.loads(line[len(MARK) :])
        quiet, busy = common.median(times["quiet"]), common.median(times["busy"])
        per_policy[name] = {
            "environment": POLICIES[name],
            "quiet_s_per_step": round(quiet, 4),
            "busy_s_per_step": round(busy, 4),
            "busy_throughput_vs_quiet": round(quiet / busy, 3),
            "rounds_s_per_step": {k: [round(v, 4) for v in vs] for k, vs in times.items()},
        }
    default_quiet = per_policy["default"]["quiet_s_per_step"]
    return {
        "benchmark": "bench_busy",
        "machine": common.machine_info(),
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "train_examples": args.train_examples,
            "threads": common.THREADS,
            "busy": "one python busy loop pinned to core 0",
        },
        "policies": per_policy,
        "quiet_vs_default_quiet": {
            name: round(p["quiet_s_per_step"] / default_quiet, 3) for name, p in per_policy.items()
        },
        "goals": {
            "busy_throughput_vs_quiet_at_least": 0.45,
            "passive_quiet_slowdown_at_most": 1.03,
        },
        "seconds_total": round(time.perf_counter() - started, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke version")
    parser.add_argument("--steps", type=int, help="timed steps per condition and round (10)")
    parser.add_argument("--warmup", type=int, help="untimed steps before each block (2)")
    parser.add_argument("--rounds", type=int, help="interleaved quiet/busy rounds (4)")
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--train-examples", type=int, help="first N RTE rows (quick: 320)")
    parser.add_argument("--cache-dir", help=f"KDRAY_CACHE_DIR (default {common.DEFAULT_CACHE_DIR})")
    parser.add_argument("--policies", default=",".join(POLICIES), help="which, comma-separated")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    args.policies = [p for p in str(args.policies).split(",") if p]
    unknown = sorted(set(args.policies) - set(POLICIES))
    if unknown or "default" not in args.policies:
        parser.error(f"--policies: {unknown or 'default is needed'} (known: {', '.join(POLICIES)})")
    args.passthrough = [a for a in raw if a != "--child"]
    args.steps = args.steps or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.rounds = args.rounds or (1 if args.quick else 4)
    if args.train_examples is None and args.quick:
        args.train_examples = 320
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    payload = run(args)
    path = common.write_json("bench_busy" + ("-quick" if args.quick else ""), payload)
    print(json.dumps({k: payload[k] for k in ("policies", "quiet_vs_default_quiet")}))
    print(f"wrote {path} in {payload['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
