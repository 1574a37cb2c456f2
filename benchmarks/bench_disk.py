"""Disk that a finished sweep, confirmation or ablation keeps, by part, and what an ablation of
``--cells`` x ``--seeds`` trials would keep under each ``tune.keep_students`` policy.

The parts: the Ray folder (``ray/``: the teacher copy, each trial's logs, checkpoints still
there, a teacher-output cache not yet deleted), the students kept beside the tables
(``students/<trial_id>``) and the tables and reports. Adaptive ablations hold one experiment
per round (``rounds/round-<k>``); their parts are summed. The projection multiplies the
measured sizes: a teacher copy per experiment, the trial logs per trial, one student per cell
(``best``) or per trial (``all``).

    python benchmarks/bench_disk.py results/rte-claim1-ablation --cells 6 --seeds 3

Measures only what is on disk after the run: while trials run, the teacher-output cache and
each running trial's last two checkpoints exist too (see the README's Disk paragraph).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import _common as common

PARTS = ("teacher_outputs", "teacher_copy", "checkpoints", "trial_logs", "students", "tables")


def classify(path: Path, root: Path) -> str:
    """Which part of a results folder a file belongs to."""
    parts = path.relative_to(root).parts
    if "students" in parts or "student" in parts:
        return "students"
    if "ray" not in parts:
        return "tables"
    below = parts[parts.index("ray") + 1 :]
    top = below[0] if below else ""
    if top.endswith("-teacher-outputs"):
        return "teacher_outputs"
    if top.endswith("-teacher"):
        return "teacher_copy"
    if any(p.startswith("checkpoint_") for p in below):
        return "checkpoints"
    return "trial_logs"


def measure(folder: Path) -> dict[str, Any]:
    """Bytes per part, experiments (Ray folders), trials and students kept."""
    sizes = dict.fromkeys(PARTS, 0)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            sizes[classify(path, folder)] += path.stat().st_size
    experiments = [p for p in folder.rglob("ray") if p.is_dir()]
    students = [p for p in folder.rglob("students/*") if p.is_dir()]
    trials_file = folder / "trials.parquet"
    trials = 0
    if trials_file.is_file():
        import pandas as pd

        trials = len(pd.read_parquet(trials_file, columns=["trial_id"]))
    return {
        "bytes": sizes,
        "total_bytes": sum(sizes.values()),
        "experiments": len(experiments),
        "trials": trials,
        "students_kept": len(students),
    }


def project(measured: dict[str, Any], cells: int, seeds: int) -> dict[str, Any]:
    """Bytes an ablation of ``cells`` x ``seeds`` finished trials keeps, per policy."""
    sizes, trials = measured["bytes"], max(measured["trials"], 1)
    student = sizes["students"] / max(measured["students_kept"], 1)
    # one teacher copy per experiment (as measured: an adaptive ablation has one per round)
    ray = sizes["teacher_copy"] + sizes["trial_logs"] / trials * cells * seeds
    tables = sizes["tables"] / trials * cells * seeds
    return {
        "trials": cells * seeds,
        "student_bytes_each": round(student),
        "ray_bytes": round(ray),
        "by_keep_students": {
            "best": round(ray + tables + cells * student),
            "all": round(ray + tables + cells * seeds * student),
            "none": round(ray + tables),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a finished results folder")
    parser.add_argument("--cells", type=int, default=6, help="cells of the projected ablation")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the projected ablation")
    parser.add_argument("--tag", default=None, help="write results/bench_disk-<tag>.json")
    args = parser.parse_args(argv)
    measured = measure(args.folder)
    payload = {
        "benchmark": "bench_disk",
        "machine": common.machine_info(),
        "folder": str(args.folder),
        "measured": measured,
        "projection": {
            "cells": args.cells,
            "seeds": args.seeds,
            **project(measured, args.cells, args.seeds),
        },
    }
    name = "bench_disk" + (f"-{args.tag}" if args.tag else "")
    path = common.write_json(name, payload)
    print(json.dumps({k: payload[k] for k in ("measured", "projection")}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
