"""Kill kdray at 100+ random moments and check that resuming loses and repeats nothing.

Runs a sweep, an adaptive ablation and a whole study on a two-node Ray cluster on loopback (the
tests' tiny BERT, the fixture RTE rows), each first uninterrupted (the reference, which also counts
the fault points it passes) and then again under seeded SIGKILLs of the whole command at fault
points (table writes, checkpoints, student saves, teacher-output cache builds) and on timers,
resumed with ``--resume`` after each until it finishes (:mod:`kdray.experiments.fault_harness`).
Writes ``benchmarks/results/bench_faults.json``: per command the kills planned and landed,
the resumes, and every difference from the reference, corrupt file and leftover temp file.

    python benchmarks/bench_faults.py [--kills 40] [--seed 0] [--only study] [--name NAME]
    python benchmarks/bench_faults.py --site teacher_outputs.build --name bench_faults-cache
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as common
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import grid_tune, make_tiny_bert, tiny_spec_dict  # noqa: E402  (the tests')

KDRAY = str(Path(sys.executable).parent / "kdray")


def _base(model: Path, name: str) -> dict[str, Any]:
    spec = tiny_spec_dict(model, name=name, train={"epochs": 3})
    spec["distill"] = {"algorithm": "sid", "layer_map": "skip"}
    spec["tune"] = grid_tune()
    return spec


def specs(model: Path) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """``{name: (command, marker, spec)}``: runs fixed by their specs (grids and seeds), so the
    killed run must reproduce the reference run by run."""
    sweep = _base(model, "bench-faults-sweep")
    sweep["search"] = {"train.lr": {"grid": [1e-3, 3e-4]}, "distill.algorithm": {"grid": [
        "sid", "soft"]}}  # fmt: skip
    ablation = _base(model, "bench-faults-ablation")
    ablation["ablation"] = {
        "axes": {"distill.algorithm": ["soft", "idal", "sid"]},
        "baseline": {"distill.algorithm": "soft"},
        "seeds": {"min": 2, "max": 4, "step": 1},
    }
    study = _base(model, "bench-faults-study")
    study["distill"] = {"algorithm": "soft"}
    study["train"]["epochs"] = 2
    study["search"] = {"train.lr": {"grid": [1e-3, 3e-4]}}
    study["ablation"] = {
        "components": {"losses": [], "schedule": None, "init": "random", "freeze": False},
        "seeds": {"min": 2, "max": 3, "step": 1},
    }
    study["study"] = {"confirm": {"top_k": 1, "seeds": 2}, "budget": {"trials": 100}}
    return {
        "sweep": ("sweep", "experiment.json", sweep),
        "ablate": ("ablate", "experiment.json", ablation),
        "study": ("study", "study.json", study),
    }


def _command(what: str, spec_file: Path, out: Path, address: str, cache: Path) -> Any:
    from kdray.experiments.fault_harness import Command

    command, marker, _ = specs_cache[what]
    argv = [KDRAY, command, str(spec_file), "--out", str(out), "--address", address]
    argv += ["--set", f"data.cache_dir={cache}"]
    return Command(argv, out, {**os.environ, "PYTHONPATH": str(REPO)}, spec_file.parent, marker)


specs_cache: dict[str, tuple[str, str, dict[str, Any]]] = {}


def run_one(
    what: str, work: Path, address: str, kills: int, seed: int, site: str | None = None
) -> dict[str, Any]:
    from kdray.experiments import fault_harness as fh

    _, _, spec = specs_cache[what]
    spec_file = work / f"{what}.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    reference = _command(what, spec_file, work / f"{what}-ref", address, work / "cache-ref")
    dry = fh.dry_run(reference, work / f"{what}-dry")
    if dry.returncode != 0:
        raise RuntimeError(f"the reference {what} failed: see {work / f'{what}-dry'}/dry.log")
    plan = fh.plan_kills(seed, kills, dry)
    if site:  # every pass of one fault point, one kill each (points the draw rarely picks)
        plan = [fh.Kill(site, hit=hit) for hit in range(1, dry.hits.get(site, 0) + 1)]
    cache = work / f"cache-{what}-killed"
    killed = _command(what, spec_file, work / f"{what}-killed", address, cache)
    started = time.perf_counter()
    attempts = fh.run_with_kills(killed, plan, work / f"{what}-kills")
    finding = fh.Finding(
        command=killed.argv[1:3],
        seed=seed,
        kills_planned=len(plan),
        attempts=attempts,
        differences=fh.compare(reference.out, killed.out)
        + fh.verdict_differences(reference.out, killed.out),
        corrupt=fh.corrupt_files(killed.out, cache),
        leftovers=fh.leftovers(killed.out, cache),
    )
    record = finding.as_dict()
    record.update(
        reference_seconds=round(dry.seconds, 1),
        killed_seconds=round(time.perf_counter() - started, 1),
        fault_point_passes=dry.hits,
    )
    print(
        f"{what}: {finding.kills_landed}/{len(plan)} kills landed, {record['resumes']} resumes, "
        f"finished {finding.finished}, {len(finding.differences)} differences, "
        f"{len(finding.corrupt)} corrupt, {len(finding.leftovers)} leftovers",
        flush=True,
    )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=40, help="kills planned per command")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("sweep", "ablate", "study"), action="append")
    parser.add_argument("--name", default="bench_faults", help="results/<name>.json")
    parser.add_argument("--site", help="kill at every pass of this fault point instead")
    args = parser.parse_args()
    common.setup_env()
    from ray.cluster_utils import Cluster

    work = Path(tempfile.mkdtemp(prefix="kdray-bench-faults-"))
    os.environ["KDRAY_CACHE_DIR"] = str(work / "cache")
    model = make_tiny_bert(work / "tiny-bert")
    specs_cache.update(specs(model))
    head = {"num_cpus": 1, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    records = []
    try:
        for index, what in enumerate(args.only or ("sweep", "ablate", "study")):
            seed = args.seed + index
            records.append(run_one(what, work, cluster.address, args.kills, seed, args.site))
    finally:
        cluster.shutdown()
    landed = sum(r["kills_landed"] for r in records)
    payload = {
        "what": "SIGKILL at random fault points and times, resume until done, compare",
        "command": "python benchmarks/bench_faults.py " + " ".join(sys.argv[1:]),
        "machine": common.machine_info(),
        "kills_landed": landed,
        "resumes": sum(r["resumes"] for r in records),
        "differences": sum(len(r["differences"]) for r in records),
        "corrupt_files": sum(len(r["corrupt"]) for r in records),
        "leftover_temp_files": sum(len(r["leftovers"]) for r in records),
        "all_finished": all(r["finished"] for r in records),
        "runs": records,
        "work_folder": str(work),
    }
    path = common.write_json(args.name, payload)
    print(f"{landed} kills landed; wrote {path}")


if __name__ == "__main__":
    main()
