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
    assert all(isinstance(r["native"], bool) for r in payload["configurations"])  # on a CPU
    assert all(r["examples_per_s"] > 0 for r in payload["configurations"])
    assert payload["teacher_cache_build"]["examples"] == 5  # the fixture's RTE train rows


def test_the_disk_benchmark_sorts_a_results_folder_into_its_parts(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_disk

    folder = tmp_path / "abl"
    files = {
        "trials.parquet": 0,  # written below
        "REPORT.md": 100,
        "rounds/round-1/ray/abl-round1-teacher/model.safetensors": 1000,
        "rounds/round-1/ray/abl-round1-teacher-outputs/k/attention.safetensors": 5000,
        "rounds/round-1/ray/abl-round1/trial_a/progress.csv": 10,
        "rounds/round-1/ray/abl-round1/trial_b/checkpoint_000004/state.pt": 700,
        "rounds/round-1/students/a/model.safetensors": 300,
        "rounds/round-2/ray/abl-round2-teacher/model.safetensors": 1000,
        "rounds/round-2/ray/abl-round2/trial_c/progress.csv": 20,
    }
    for name, size in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x" * size)
    import pandas as pd

    pd.DataFrame({"trial_id": ["a", "b", "c"]}).to_parquet(folder / "trials.parquet")
    tables = 100 + (folder / "trials.parquet").stat().st_size
    measured = bench_disk.measure(folder)
    assert measured["bytes"] == {
        "teacher_outputs": 5000, "teacher_copy": 2000, "checkpoints": 700, "trial_logs": 30,
        "students": 300, "tables": tables,
    }  # fmt: skip
    assert (measured["experiments"], measured["trials"], measured["students_kept"]) == (2, 3, 1)
    projected = bench_disk.project(measured, cells=2, seeds=3)
    ray = 2000 + 30 / 3 * 6
    assert projected["ray_bytes"] == ray
    assert projected["by_keep_students"] == {
        "best": round(ray + tables / 3 * 6 + 2 * 300),
        "all": round(ray + tables / 3 * 6 + 6 * 300),
        "none": round(ray + tables / 3 * 6),
    }


def test_the_verdict_benchmark_asks_soft_against_pid_with_adaptive_seeds(tmp_path: Path) -> None:
    """bench_verdict's spec is rte-cpu.yaml's recipe with the paired question as its ablation,
    on the first N rows, and --set values land at their dotted keys (validated as a spec)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_verdict

    from kdray.spec import load_spec

    path = bench_verdict.write_spec(tmp_path, 96, 6, {"train.precision": "fp32"})
    spec = load_spec(path)
    assert spec.train.max_train_examples == 96 and spec.train.precision == "fp32"
    ablation = spec.ablation
    assert ablation is not None and ablation.axes == {"distill.algorithm": ["soft", "pid"]}
    assert ablation.baseline == {"distill.algorithm": "soft"}
    assert (ablation.seeds.min, ablation.seeds.max, ablation.seeds.step) == (3, 6, 2)
