"""The benchmark scripts stay runnable: each runs here as a small dry run (timings are not
checked: speed goals are measured by the benchmarks themselves, never by tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURE_GLUE, REPO


def test_the_gpu_benchmark_dry_runs_on_the_cpu(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench_gpu.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--device", "cpu",
        "--tiny", str(tiny_bert), "--glue", str(FIXTURE_GLUE), "--quick", "--steps", "2",
        "--batch-sizes", "2,4", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["device"].startswith("cpu (dry run")
    rows = [(r["precision"], r["batch_size"]) for r in payload["configurations"]]
    assert rows == [("fp32", 2), ("fp32", 4), ("bf16", 2), ("bf16", 4)]
    assert all(r["examples_per_s"] > 0 for r in payload["configurations"])
    assert payload["teacher_cache_build"]["examples"] == 5  # the fixture's RTE train rows
