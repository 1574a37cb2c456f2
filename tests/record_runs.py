"""Record small seeded distillation runs as a regression fixture, and measure how far they drift
between CPU kernels.

    python tests/record_runs.py          # rewrites tests/fixtures/recorded_runs.json
    python tests/record_runs.py --drift  # adds this CPU to tests/fixtures/recorded_drift.json

Each run is a complete ``distill(spec)`` on a tiny random BERT teacher (``make_tiny_bert`` with
its default seed) and the fixture RTE rows, on the CPU with one torch thread. What a run
produced (per epoch: stage, learning rate, every loss term, every dev metric, model selection;
per run: status, best epoch and metrics, diagnostics; the teacher's dev metrics) is written to
``tests/fixtures/recorded_runs.json`` with floats at full precision.
``tests/test_recorded_runs.py`` re-runs every run and compares it with that file.

Another x86 CPU picks other kernels (other summation orders) in torch, MKL and oneDNN, and the
differences grow over epochs. ``--drift`` re-runs every recorded run under each of
:data:`VARIANTS` (ATen's CPU capability, MKL's code path, oneDNN off) and writes the largest
relative drift per quantity family and epoch; the test's tolerances are :data:`SAFETY` x that.
The kernels a capability names differ between CPU makers, so each CPU measured is kept (its
variants named with it) and ``--drift`` on another one adds it: the tolerance covers the
largest drift of any.

The helpers here take ``distill`` as an argument, so the test decides which entry point it calls.
Regenerate the recording only when a change of results is intended, and say so in the commit;
re-measure the drift after a torch upgrade.
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
TIMING_KEYS = frozenset({"train_seconds", "examples_per_s", "eval_seconds"})

# Comparison tolerances. Floats are compared per quantity family and epoch, within the
# tolerance that ``python tests/record_runs.py --drift`` derived from the drift it measured
# between CPU kernels (tests/fixtures/recorded_drift.json); integers, strings, booleans exactly.
DRIFT = TESTS / "fixtures" / "recorded_drift.json"
ATOL = 1e-6  # absolute floor for quantities near 0 (a loss term that is ~1e-2 everywhere else)
FLOOR = {"schedule": 1e-12, "metric": 1e-9, "loss": 1e-6, "cka": 1e-6, "attention_kl": 1e-6}
# The tolerance is this many times the largest drift measured at that epoch or before; the
# headroom covers CPUs that were not measured (an Intel Xeon's AVX-512 kernels, say).
SAFETY = 5.0

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


def family(path: tuple[Any, ...]) -> str:
    """Which kind of quantity a float at ``path`` in a run summary is: ``schedule`` (the
    learning rate: plain arithmetic), ``loss``, ``cka``, ``attention_kl`` or ``metric`` (dev
    metrics, agreement: ratios of counts)."""
    names = [part for part in path if isinstance(part, str)]
    name = names[-1] if names else ""
    if any(n == "cka" or "cka" in n for n in names):
        return "cka"
    if any("attention_kl" in n for n in names):
        return "attention_kl"
    if name == "lr":
        return "schedule"
    if name.startswith("loss."):
        return "loss"
    return "metric"


def epoch_of(path: tuple[Any, ...], run: dict[str, Any]) -> int:
    """The epoch a quantity belongs to: its record's, or the run's last for run-level results
    (best and final metrics, diagnostics, CKA), which come from the end of training."""
    if len(path) >= 2 and path[0] == "records" and isinstance(path[1], int):
        return int(run["records"][path[1]]["epoch"])
    return int(run.get("epochs_run") or max((r["epoch"] for r in run["records"]), default=1))


Tolerance = Callable[[tuple[Any, ...]], tuple[float, float]]


def exact(_: tuple[Any, ...]) -> tuple[float, float]:
    """No tolerance at all: what the drift measurement compares with."""
    return 0.0, 0.0


def tolerances(drift: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """``{family: {epoch: rtol}}`` from the measured drift (``{family: {epoch: {variant:
    largest relative drift}}}``): :data:`SAFETY` x the largest drift at that epoch or before
    (drift grows over epochs), at least the family's :data:`FLOOR`."""
    table: dict[str, dict[str, float]] = {}
    for kind, by_epoch in drift.items():
        running = 0.0
        for epoch in sorted(by_epoch, key=int):
            running = max(running, *by_epoch[epoch].values())
            table.setdefault(kind, {})[epoch] = max(FLOOR[kind], SAFETY * running)
    return table


def measured_tolerance(run: dict[str, Any], drift: dict[str, Any] | None = None) -> Tolerance:
    """``path -> (rtol, atol)`` for one recorded run, from the measured drift (``drift``: the
    content of :data:`DRIFT`, or a table with a ready ``tolerance``)."""
    drift = drift or json.loads(DRIFT.read_text())
    table = tolerances(drift["drift"]) if "drift" in drift else drift["tolerance"]

    def tolerance(path: tuple[Any, ...]) -> tuple[float, float]:
        kind = family(path)
        by_epoch = table.get(kind, {})
        epoch = epoch_of(path, run)
        known = [int(e) for e in by_epoch if int(e) <= epoch] or [int(e) for e in by_epoch]
        rtol = by_epoch[str(max(known))] if known else FLOOR[kind]
        return rtol, ATOL

    return tolerance


def differences(
    expected: Any, actual: Any, tolerance: Tolerance = exact, path: tuple[Any, ...] = ()
) -> list[str]:
    """Every place where ``actual`` differs from ``expected``: keys, lengths, types, values
    (exactly, except floats: within ``tolerance(path)``'s (rtol, atol), NaN equal to NaN)."""
    where = "run" + "".join(f"[{part!r}]" for part in path)
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
                out += differences(expected[key], actual[key], tolerance, (*path, key))
        return out
    if kind == "list":
        if len(expected) != len(actual):
            return [f"{where}: expected {len(expected)} items, got {len(actual)}"]
        out = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            out += differences(e, a, tolerance, (*path, i))
        return out
    if kind == "float":
        if math.isnan(expected) and math.isnan(actual):
            return []
        rtol, atol = tolerance(path)
        if expected == actual or math.isclose(actual, expected, rel_tol=rtol, abs_tol=atol):
            return []
        return [f"{where}: expected {expected!r}, got {actual!r} ({family(path)}, rtol {rtol:g})"]
    return [] if expected == actual else [f"{where}: expected {expected!r}, got {actual!r}"]


def relative_drift(
    expected: Any, actual: Any, path: tuple[Any, ...] = ()
) -> list[tuple[tuple[Any, ...], float]]:
    """``(path, |actual - expected| / max(|expected|, ATOL))`` of every float in two summaries
    of the same shape (the paths where the shapes differ are left to :func:`differences`)."""
    kind = _kind(expected)
    if kind != _kind(actual):
        return []
    if kind == "dict":
        return [
            item
            for key in expected
            if key in actual
            for item in relative_drift(expected[key], actual[key], (*path, key))
        ]
    if kind == "list" and len(expected) == len(actual):
        return [
            item
            for i, (e, a) in enumerate(zip(expected, actual, strict=True))
            for item in relative_drift(e, a, (*path, i))
        ]
    if kind == "float" and not (math.isnan(expected) or math.isnan(actual)):
        return [(path, abs(actual - expected) / max(abs(expected), ATOL))]
    return []


# ------------------------------------------------------------------------------ the script


# Kernel settings the drift is measured under: each changes which CPU kernels (and so which
# summation orders) torch's own vectorised ops, MKL's GEMMs and oneDNN use, as another x86 CPU
# would. "onednn": "off" is applied in the child process (torch.backends.mkldnn.enabled).
VARIANTS: dict[str, dict[str, str]] = {
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
    "mkl-avx2": {"MKL_CBWR": "AVX2"},
    "mkl-avx512": {"MKL_CBWR": "AVX512"},
    "onednn-off": {"KDRAY_RECORD_ONEDNN": "off"},
    "all-portable": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_CBWR": "COMPATIBLE",
        "KDRAY_RECORD_ONEDNN": "off",
    },
}


def _load_tests_conftest() -> Any:
    import importlib.util

    sys.path.insert(0, str(REPO))  # this checkout's kdray, not an installed one
    import conftest  # noqa: F401 - the repository's: offline variables, as in the tests

    spec = importlib.util.spec_from_file_location("_kdray_tests_conftest", TESTS / "conftest.py")
    tests_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests_conftest)
    return tests_conftest


def run_all() -> dict[str, dict[str, Any]]:
    """Every run of :data:`RUNS`, summarised, on a fresh tiny teacher in a temporary cache."""
    tests_conftest = _load_tests_conftest()
    import torch

    from kdray.training.distill import distill

    if os.environ.get("KDRAY_RECORD_ONEDNN") == "off":
        torch.backends.mkldnn.enabled = False
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
    return runs


def measure_drift() -> dict[str, Any]:
    """Re-run every recorded run under each of :data:`VARIANTS` (one child process each) and
    compare with the recording: the largest relative drift per quantity family and epoch, the
    exact fields that changed (none should), and the tolerance derived from them."""
    import platform
    import subprocess

    recorded = json.loads(RECORDED.read_text())["runs"]
    drift: dict[str, dict[str, dict[str, float]]] = {}
    exact_changes: dict[str, list[str]] = {}
    for variant, env in VARIANTS.items():
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run(
                [sys.executable, __file__, "--summaries", out.name],
                env={**os.environ, **env},
                check=True,
            )
            runs = json.loads(Path(out.name).read_text())
        for name, expected in recorded.items():
            got = runs[name]
            changed = [d for d in differences(expected, got, lambda _: (math.inf, math.inf))]
            exact_changes.setdefault(variant, []).extend(f"{name}: {c}" for c in changed)
            for path, rel in relative_drift(expected, got):
                kind, epoch = family(path), str(epoch_of(path, expected))
                cell = drift.setdefault(kind, {}).setdefault(epoch, {})
                cell[variant] = max(cell.get(variant, 0.0), rel)
        print(f"{variant}: {len(exact_changes[variant])} exact fields changed")
    import torch

    return {
        "about": "Largest relative drift of each quantity family per epoch when the recorded runs "
        "are re-run under other CPU kernels (python tests/record_runs.py --drift), and the "
        f"tolerance tests/test_recorded_runs.py uses: {SAFETY:g} x the largest drift at that "
        "epoch or before, at least the family's floor.",
        "machine": {"cpu": _cpu_model(), "platform": platform.platform()},
        "torch": torch.__version__,
        "variants": VARIANTS,
        "safety": SAFETY,
        "floor": FLOOR,
        "atol": ATOL,
        "drift": drift,
        "exact_changes": exact_changes,
        "tolerance": tolerances(drift),
    }


def merged_drift(previous: dict[str, Any] | None, measured: dict[str, Any]) -> dict[str, Any]:
    """``measured`` (one CPU) added to the drift table ``previous`` holds (other CPUs): each
    variant's cells named ``<variant> on <cpu>``, a CPU measured again replacing its earlier
    cells; the tolerance from all of them."""
    cpu = measured["machine"]["cpu"]
    machines = dict((previous or {}).get("machines") or {})
    drift: dict[str, dict[str, dict[str, float]]] = {}
    changes: dict[str, list[str]] = {}
    if previous is not None:
        if "machine" in previous:  # measured on one CPU, before CPUs were named in the cells
            named = previous["machine"]["cpu"]
            machines[named] = previous["machine"]
            previous = _named(previous, named)
        for kind, by_epoch in previous["drift"].items():
            for epoch, cells in by_epoch.items():
                kept = {k: v for k, v in cells.items() if not k.endswith(f" on {cpu}")}
                drift.setdefault(kind, {})[epoch] = kept
        changes = {k: v for k, v in previous["exact_changes"].items() if not k.endswith(cpu)}
    machines[cpu] = measured["machine"]
    ours = _named(measured, cpu)
    for kind, by_epoch in ours["drift"].items():
        for epoch, cells in by_epoch.items():
            drift.setdefault(kind, {}).setdefault(epoch, {}).update(cells)
    changes.update(ours["exact_changes"])
    merged = {k: v for k, v in measured.items() if k != "machine"}
    merged.update(machines=machines, drift=drift, exact_changes=changes)
    merged["tolerance"] = tolerances(drift)
    return merged


def _named(table: dict[str, Any], cpu: str) -> dict[str, Any]:
    """A one-CPU drift table's cells and exact changes with the CPU in their variant names."""
    drift = {
        kind: {
            epoch: {f"{variant} on {cpu}": value for variant, value in cells.items()}
            for epoch, cells in by_epoch.items()
        }
        for kind, by_epoch in table["drift"].items()
    }
    changes = {f"{variant} on {cpu}": found for variant, found in table["exact_changes"].items()}
    return {**table, "drift": drift, "exact_changes": changes}


def _cpu_model() -> str:
    """The CPU the recording or the drift measurement ran on (the benchmarks' own helper)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import _common

    return _common.cpu_model()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summaries", help="write the runs' summaries here (no recording)")
    parser.add_argument(
        "--drift", action="store_true", help=f"measure drift across kernels into {DRIFT.name}"
    )
    args = parser.parse_args()
    if args.drift:
        previous = json.loads(DRIFT.read_text()) if DRIFT.exists() else None
        payload = merged_drift(previous, measure_drift())
        DRIFT.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {DRIFT.relative_to(REPO)}")
        return
    runs = run_all()
    if args.summaries:
        Path(args.summaries).write_text(json.dumps(runs, allow_nan=True))
        return
    import torch

    teachers = {json.dumps(r["teacher_dev_metrics"], sort_keys=True) for r in runs.values()}
    assert len(teachers) == 1, "every run should share one teacher"
    payload = {
        "about": "Seeded runs recorded by tests/record_runs.py and checked by "
        "tests/test_recorded_runs.py; regenerate only for an intended change of results.",
        "torch": torch.__version__,
        "machine": _cpu_model(),
        "teacher_dev_metrics": next(iter(runs.values()))["teacher_dev_metrics"],
        "runs": runs,
    }
    RECORDED.write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
    print(f"wrote {RECORDED.relative_to(REPO)}: {len(runs)} runs")


if __name__ == "__main__":
    main()
