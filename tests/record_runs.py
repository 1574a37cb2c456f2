"""Record small seeded distillation runs as a regression fixture.

    python tests/record_runs.py          # rewrites tests/fixtures/recorded_runs.json

Each run is a complete ``distill(spec)`` on a tiny random BERT teacher (``make_tiny_bert`` with
its default seed) and the fixture RTE rows, on the CPU with one torch thread. What a run
produced (per epoch: stage, learning rate, every loss term, every dev metric, model selection;
per run: status, best epoch and metrics, diagnostics; the teacher's dev metrics) is written to
``tests/fixtures/recorded_runs.json`` with floats at full precision.
``tests/test_recorded_runs.py`` re-runs every run and compares it with that file.

The helpers here take ``distill`` as an argument, so the test decides which entry point it calls.
Regenerate the file only when a change of results is intended, and say so in the commit.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FIXTURE_GLUE = TESTS / "fixtures" / "glue"
RECORDED = TESTS / "fixtures" / "recorded_runs.json"

# Placeholders in the stored specs, filled in when a run is rebuilt.
TEACHER_MODEL = "<tiny-bert>"
GLUE_DIR = "<fixture-glue>"

# Changes from run to run and machine to machine: never recorded.
TIMING_KEYS = frozenset({"train_seconds", "examples_per_s"})

# Comparison tolerance for floats.
RTOL, ATOL = 1e-5, 1e-6

BASE_SPEC: dict[str, Any] = {
    "name": "recorded",
    "task": "rte",
    "data": {"dir": GLUE_DIR, "max_seq_length": 32},
    # A high teacher learning rate moves the tiny teacher far enough from its near-uniform random
    # init that the soft and attention losses are ~1e-2, well above the comparison's atol.
    "teacher": {"model": TEACHER_MODEL, "epochs": 5, "lr": 3e-2, "batch_size": 2},
    "student": {"layers": 2, "init": "teacher", "init_layers": "skip"},
    "distill": {"algorithm": "sid", "layer_map": "skip"},
    "train": {
        "epochs": 3,
        "batch_size": 2,
        "lr": 1e-3,
        "seed": 3,
        "device": "cpu",
        "threads": 1,
        "diagnostics": True,
    },
}

# name -> changes to BASE_SPEC (merged one section deep, nested dicts merged recursively).
RUNS: dict[str, dict[str, Any]] = {
    "none": {"distill": {"algorithm": "none"}},
    "soft": {"distill": {"algorithm": "soft"}},
    "internal": {"distill": {"algorithm": "internal"}},
    "idal": {"distill": {"algorithm": "idal"}},
    # 4 epochs over 3 stages: the schedule spreads epochs unevenly
    "pid": {"distill": {"algorithm": "pid"}, "train": {"epochs": 4}},
    "sid": {"distill": {"algorithm": "sid"}, "train": {"epochs": 4}},
    # freeze_lower: embeddings and lower layers frozen per stage, only the head in the last one
    "pid-freeze-lower": {
        "distill": {"algorithm": "pid", "stages": {"freeze_lower": True}},
        "train": {"diagnostics": False},
    },
    # freeze_lower is documented to have no effect on sid
    "sid-freeze-lower": {"distill": {"algorithm": "sid", "stages": {"freeze_lower": True}}},
    # [CLS]-row attention loss with the live teacher (no teacher-output cache)
    "idal-cls-rows-live-teacher": {
        "distill": {"algorithm": "idal", "losses": {"attention": {"rows": "cls"}}},
        "teacher": {"cache": {"enabled": "off"}},
    },
    # a smaller random student: trained projections map its hidden states to the teacher's
    "idal-random-student-hidden-16": {
        "distill": {"algorithm": "idal"},
        "student": {"init": "random", "hidden_size": 16, "intermediate_size": 32},
        "train": {"lr": 3e-3},
    },
    # soft labels at temperature 2 plus the hard-label term, no warmup
    "soft-hard-t2": {
        "distill": {
            "algorithm": "soft",
            "losses": {"soft": {"weight": 1.0, "temperature": 2.0}, "hard": {"weight": 0.5}},
        },
        "train": {"epochs": 4, "warmup": 0.0},
    },
}


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def run_spec_dict(name: str) -> dict[str, Any]:
    """The full spec of a recorded run, with placeholders for the teacher and data folders."""
    return _merge({**BASE_SPEC, "name": f"recorded-{name}"}, RUNS[name])


def fill_spec(raw: dict[str, Any], teacher: Path) -> dict[str, Any]:
    """A stored spec with its placeholders replaced by real folders."""
    filled = copy.deepcopy(raw)
    assert filled["teacher"]["model"] == TEACHER_MODEL and filled["data"]["dir"] == GLUE_DIR
    filled["teacher"]["model"] = str(teacher)
    filled["data"]["dir"] = str(FIXTURE_GLUE)
    return filled


def summarise(result: Any) -> dict[str, Any]:
    """What a run produced, in JSON-able types, without timings or machine-specific paths."""
    records = []
    for record in result.records:
        kept = {k: v for k, v in record.items() if k not in TIMING_KEYS}
        if "diag.cka_matrix" in kept:  # stored by distill as a JSON string
            kept["diag.cka_matrix"] = json.loads(kept["diag.cka_matrix"])
        records.append(kept)
    cka = None
    if result.cka is not None:
        cka = [
            [int(r.student_layer), int(r.teacher_layer), float(r.cka)]
            for r in result.cka.itertuples(index=False)
        ]
    return {
        "status": result.status,
        "error": result.error,
        "metric": result.metric,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "best_metrics": dict(result.best_metrics),
        "final_metrics": dict(result.final_metrics),
        "records": records,  # first, so a difference report starts with the epochs
        "diagnostics": dict(result.diagnostics),
        "cka": cka,
        "student_params": result.student_params,
        "teacher_params": result.teacher_params,
        "teacher_dev_metrics": dict(result.teacher.dev_metrics) if result.teacher else None,
    }


def run_recorded(
    distill: Callable[..., Any], raw_spec: dict[str, Any], teacher: Path
) -> dict[str, Any]:
    """Run one stored spec through ``distill`` and summarise it."""
    from kdray.spec import spec_from_dict

    return summarise(distill(spec_from_dict(fill_spec(raw_spec, teacher))))


# ------------------------------------------------------------------------------ comparison


def _kind(value: Any) -> str:
    if value is None or isinstance(value, bool | str):
        return type(value).__name__
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


def differences(expected: Any, actual: Any, where: str = "run") -> list[str]:
    """Every place where ``actual`` differs from ``expected``: keys, lengths, types, values
    (exactly, except floats: within RTOL/ATOL, NaN equal to NaN)."""
    kind = _kind(expected)
    if kind != _kind(actual):
        return [f"{where}: expected {expected!r} ({kind}), got {actual!r} ({_kind(actual)})"]
    if kind == "dict":
        out = []
        missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
        if missing or extra:
            out.append(f"{where}: keys missing {missing}, unexpected {extra}")
        for key in expected:
            if key in actual:
                out += differences(expected[key], actual[key], f"{where}[{key!r}]")
        return out
    if kind == "list":
        if len(expected) != len(actual):
            return [f"{where}: expected {len(expected)} items, got {len(actual)}"]
        out = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            out += differences(e, a, f"{where}[{i}]")
        return out
    if kind == "float":
        if math.isnan(expected) and math.isnan(actual):
            return []
        if expected == actual or math.isclose(actual, expected, rel_tol=RTOL, abs_tol=ATOL):
            return []
        return [f"{where}: expected {expected!r}, got {actual!r}"]
    return [] if expected == actual else [f"{where}: expected {expected!r}, got {actual!r}"]


# ------------------------------------------------------------------------------ the script


def main() -> None:
    import importlib.util

    sys.path.insert(0, str(REPO))  # this checkout's kdray, not an installed one
    import conftest  # noqa: F401 - the repository's: offline variables, as in the tests

    spec = importlib.util.spec_from_file_location("_kdray_tests_conftest", TESTS / "conftest.py")
    tests_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests_conftest)
    import torch

    from kdray.distill import distill

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="kdray-record-") as tmp:
        os.environ["KDRAY_CACHE_DIR"] = str(Path(tmp) / "cache")
        teacher = tests_conftest.make_tiny_bert(Path(tmp) / "tiny-bert")
        runs = {}
        for name in RUNS:
            raw = run_spec_dict(name)
            summary = run_recorded(distill, raw, teacher)
            assert summary["status"] == "ok", (name, summary["error"])
            runs[name] = {"spec": raw, **summary}
            print(f"{name}: best epoch {summary['best_epoch']} {summary['best_metrics']}")
    teachers = {json.dumps(r["teacher_dev_metrics"], sort_keys=True) for r in runs.values()}
    assert len(teachers) == 1, "every run should share one teacher"
    payload = {
        "about": "Seeded runs recorded by tests/record_runs.py and checked by "
        "tests/test_recorded_runs.py; regenerate only for an intended change of results.",
        "torch": torch.__version__,
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "teacher_dev_metrics": next(iter(runs.values()))["teacher_dev_metrics"],
        "runs": runs,
    }
    RECORDED.write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
    print(f"wrote {RECORDED.relative_to(REPO)}: {len(runs)} runs")


if __name__ == "__main__":
    main()
