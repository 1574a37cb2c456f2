"""What a full sha256 check of the caches a run reuses costs, against the run itself.

A run reuses two caches: the fine-tuned teacher (``teacher.json`` records each file's size and
sha256) and the teacher-output cache (its manifest records the same). Checking sizes costs a
stat per file and misses same-size corruption; checking sha256 reads every byte. This measures
both checks on the benchmark setting's real caches (MiniLM-L6 teacher on RTE; the output cache
of the 3-layer ``idal`` student at length 64) and one epoch of that run, and writes the ratio.

    python benchmarks/bench_integrity.py [--repeats 5] [--omp-passive]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import _common as common


def _timed(fn: Any, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--omp-passive", action="store_true")
    args = parser.parse_args()
    common.setup_env(args.cache_dir, omp_passive=args.omp_passive)

    from kdray.infra.store import cache_root
    from kdray.spec import spec_from_dict
    from kdray.training.distill import distill
    from kdray.training.teacher import TeacherInfo, ensure_teacher
    from kdray.training.teacher_outputs import CacheManifest

    raw = common.spec_dict(epochs=1)
    raw["teacher"]["cache"] = {"enabled": "on"}  # auto caches from 2 epochs on
    spec = spec_from_dict(raw, source="<benchmark spec>")
    teacher = ensure_teacher(spec)
    result = distill(spec)  # builds (or reuses) the teacher-output cache, trains one epoch
    epoch_seconds = float(result.records[-1]["train_seconds"])
    outputs_root = cache_root(spec.data.cache_dir) / "teacher-outputs"
    caches = [p.parent for p in outputs_root.glob("*/manifest.json")]
    cache = max(caches, key=lambda p: p.stat().st_mtime)
    checks = {
        "teacher sizes": lambda: TeacherInfo.read(teacher.path, "sizes"),
        "teacher sha256": lambda: TeacherInfo.read(teacher.path, "full"),
        "teacher outputs sizes": lambda: CacheManifest.inspect(cache, "sizes"),
        "teacher outputs sha256": lambda: CacheManifest.inspect(cache, "full"),
    }
    rows = {}
    for name, check in checks.items():
        times = _timed(check, args.repeats)
        rows[name] = {
            "median_s": round(common.median(times), 4),
            "times_s": [round(t, 4) for t in times],
            "share_of_one_epoch": round(common.median(times) / epoch_seconds, 5),
        }
        print(f"{name:24s} {rows[name]['median_s']:.4f} s = "
              f"{100 * rows[name]['share_of_one_epoch']:.2f} % of one epoch")  # fmt: skip
    payload = {
        "what": "full sha256 check of the reused caches vs one epoch of the benchmark run",
        "command": "python benchmarks/bench_integrity.py",
        "machine": common.machine_info(),
        "teacher_bytes": _bytes(Path(teacher.path)),
        "teacher_outputs_bytes": _bytes(cache),
        "epoch_seconds": round(epoch_seconds, 2),
        "checks": rows,
    }
    path = common.write_json("bench_integrity", payload)
    print(f"one epoch: {epoch_seconds:.1f} s; wrote {path}")


if __name__ == "__main__":
    main()
