"""Calibration of kdray's verdicts: the error rates of the whole procedure, by simulation.

Each replicate is one paired question (one cell against its baseline, a family of one): per seed
both dev metrics are drawn around 0.60 with per-seed sd ``sd`` (independent, so the paired
difference has sd ``sd * sqrt 2``), the cell shifted by ``effect``, and both rounded to the dev
set's 1/N (RTE: N = 277), as real accuracies are. The replicate then goes through
:func:`kdray.analysis.stats.sequential_verdicts`, the function kdray ships, under each design:

- ``fixed-3``, ``fixed-5``, ``fixed-10``: one look at 3, 5 or 10 seeds;
- ``adaptive-obf``: the shipped adaptive seeds (min 3, step 2, max 10), O'Brien-Fleming spending;
- ``adaptive-pocock``: the same looks, Pocock spending.

Reported per design, sd and effect: the share of replicates called better, worse, equivalent and
unresolved, and the mean number of seeds used. Read off: the false better/worse rate under a
null effect (should be <= alpha), "equivalent" under a true effect of 2x the margin (should be
<= alpha), and the power at 1 and 2 points. Monte Carlo standard errors: sqrt(p (1 - p) / reps).

    python benchmarks/bench_calibration.py [--reps 6000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

ALPHA, MARGIN, DEV_N = 0.05, 0.005, 277
SDS = (0.01, 0.02)
EFFECTS = (0.0, 2 * MARGIN, 0.02)  # null, 2x the margin (= 1 point), 2 points


def designs(alpha: float = ALPHA, margin: float = MARGIN) -> dict[str, Any]:
    from kdray.analysis.stats import Design

    return {
        "fixed-3": Design.fixed(3, alpha, margin),
        "fixed-5": Design.fixed(5, alpha, margin),
        "fixed-10": Design.fixed(10, alpha, margin),
        "adaptive-obf": Design(3, 10, 2, alpha, margin, "obrien_fleming"),
        "adaptive-pocock": Design(3, 10, 2, alpha, margin, "pocock"),
    }


def simulate(
    design: Any, effect: float, sd: float, reps: int, seed: int = 0, dev_n: int = DEV_N
) -> dict[str, float]:
    """Shares of better / worse / equivalent / unresolved and the mean seeds over ``reps``
    replicates of one paired question under ``design``."""
    from kdray.analysis.stats import WORDS, sequential_verdicts

    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(WORDS, 0)
    seeds = 0
    for _ in range(reps):
        base = np.round((0.60 + rng.normal(0.0, sd, design.max)) * dev_n) / dev_n
        cell = np.round((0.60 + effect + rng.normal(0.0, sd, design.max)) * dev_n) / dev_n
        verdict = sequential_verdicts({"cell": cell - base}, design, signflip=False)["cell"]
        counts[verdict.word] += 1
        seeds += verdict.n
    out = {word: n / reps for word, n in counts.items()}
    out["mean_seeds"] = seeds / reps
    return out


def run(reps: int, seed: int) -> dict[str, Any]:
    rows = []
    for name, design in designs().items():
        for sd in SDS:
            for effect in EFFECTS:
                started = time.perf_counter()
                shares = simulate(design, effect, sd, reps, seed)
                rows.append(
                    {
                        "design": name,
                        "sd": sd,
                        "effect": effect,
                        **{k: round(v, 4) for k, v in shares.items()},
                        "seconds": round(time.perf_counter() - started, 2),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return {
        "benchmark": "bench_calibration",
        "machine": common.machine_info(),
        "settings": {
            "reps": reps,
            "seed": seed,
            "alpha": ALPHA,
            "margin": MARGIN,
            "dev_examples": DEV_N,
            "mc_se_at_alpha": round(math.sqrt(ALPHA * (1 - ALPHA) / reps), 4),
            "designs": {name: d.describe() for name, d in designs().items()},
        },
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "bench_calibration.json"
    )
    args = parser.parse_args()
    payload = run(args.reps, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
