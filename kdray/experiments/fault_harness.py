"""Fault harness: kill a kdray command at random moments, resume it until it is done, and compare
what it left with an uninterrupted run of the same spec and seeds.

A dry run first counts how often the command passes each fault point (:mod:`kdray.infra.faults`) and
how long it takes; the kills are then drawn from a seeded generator: half at a fault point (the
n-th pass of a table write, a checkpoint, a student save, a teacher-output cache build), half on
a timer. Each kill is a SIGKILL of the command's whole process group, as a pre-empted machine
would give; each next attempt adds ``--resume`` once the results folder is claimed. When it is
done, :func:`compare` checks what a user relies on: every finished trial present exactly once
with the reference's settings, status and metrics; every table, record and safetensors file
readable and every cache file matching its recorded sha256; no temporary file left.

``tests/test_faults.py`` runs a bounded version in ``make test``;
``benchmarks/bench_faults.py`` runs 100+ kills and writes a JSON record.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdray.infra import faults, store

#: What a finished run leaves that two runs of the same spec and seeds must agree on (the
#: rest is identity, timing and paths): trials-table columns with these prefixes and names.
_TRIAL_COLUMNS = ("status", "best_epoch", "epochs_run", "best.", "final.", "diag.", "teacher.dev.")
_EPOCH_COLUMNS = ("stage", "lr", "is_best", "loss.", "dev.")


#: About how long a kdray command takes to start (imports, joining Ray) on two cores: timer
#: kills land from half of it on, some before the command has done anything.
STARTUP_SECONDS = 6.0


@dataclass(frozen=True)
class Kill:
    """One planned kill: at the ``hit``-th pass of the fault point ``site``, or ``delay``
    seconds after the attempt starts when ``site`` is None."""

    site: str | None
    hit: int = 1
    delay: float = 0.0

    def describe(self) -> str:
        return f"{self.site} pass {self.hit}" if self.site else f"timer {self.delay:.1f}s"


@dataclass
class Attempt:
    """One start of the command: the kill it was given, whether it resumed, how it ended."""

    kill: str | None
    resumed: bool
    returncode: int
    fired: str | None  # where the kill happened (a point's path, or "timer"); None: not killed
    seconds: float


@dataclass
class Command:
    """A kdray command line and where it writes: ``marker`` is the file whose presence means
    the results folder is claimed, so the next attempt continues it with ``--resume``."""

    argv: list[str]
    out: Path
    env: dict[str, str]
    cwd: Path
    marker: str = "experiment.json"
    timeout: float = 900.0


@dataclass
class DryRun:
    """What an uninterrupted run of the command did: its exit code, seconds and the number of
    passes of each fault point (where kills can land)."""

    returncode: int
    seconds: float
    hits: dict[str, int] = field(default_factory=dict)


def _launch(command: Command, plan: dict[str, Any] | None, log: Path, resume: bool) -> Any:
    env = dict(command.env)
    env.pop(faults.PLAN_VAR, None)
    if plan is not None:
        env[faults.PLAN_VAR] = json.dumps(plan)
    argv = command.argv + (["--resume"] if resume else [])
    with log.open("ab") as handle:
        handle.write(f"$ {' '.join(argv)}\n".encode())
        # its own process group: a kill takes the command and everything it started
        return subprocess.Popen(
            argv, env=env, cwd=command.cwd, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def _kill_group(proc: Any) -> None:
    """SIGKILL the command and everything it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait(proc: Any, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
        raise TimeoutError(f"the command ran over {timeout:.0f} s") from None


def dry_run(command: Command, workdir: Path) -> DryRun:
    """Run the command once, uninterrupted, counting its fault-point passes."""
    workdir.mkdir(parents=True, exist_ok=True)
    counter = workdir / "count"
    started = time.perf_counter()
    plan = {"action": "count", "counter": str(counter)}
    proc = _launch(command, plan, workdir / "dry.log", False)
    code = _wait(proc, command.timeout)
    hits = {
        site: (workdir / f"count.{site}").stat().st_size
        for site in faults.SITES
        if (workdir / f"count.{site}").exists()
    }
    return DryRun(code, time.perf_counter() - started, hits)


def plan_kills(seed: int, n: int, dry: DryRun) -> list[Kill]:
    """``n`` kills drawn from ``seed``, spread so that together they cover the whole run: half
    at fault points, chosen in proportion to how often the dry run passed each, landing on one
    of the first ``2/n`` of its passes; half on a timer within the first ``2/n`` of its time
    (each resumed attempt then gets about ``1/n`` of the work done before its kill)."""
    rng = random.Random(seed)
    sites = [site for site, count in sorted(dry.hits.items()) if count > 0]
    kills = []
    for index in range(n):
        if sites and index % 2 == 0:
            site = rng.choices(sites, weights=[dry.hits[s] for s in sites])[0]
            kills.append(Kill(site, hit=rng.randint(1, max(1, 2 * dry.hits[site] // n))))
        else:
            longest = max(STARTUP_SECONDS + 1, 2 * dry.seconds / n)
            kills.append(Kill(None, delay=round(rng.uniform(STARTUP_SECONDS / 2, longest), 2)))
    return kills


def _attempt(command: Command, kill: Kill | None, workdir: Path, index: int) -> Attempt:
    resume = (command.out / command.marker).exists()
    counter = workdir / f"hits-{index}"
    pgid_file = workdir / f"pgid-{index}"
    plan = None
    if kill is not None and kill.site is not None:
        plan = {"site": kill.site, "hit": kill.hit, "action": "kill", "counter": str(counter)}
        plan["pgid_file"] = str(pgid_file)
    started = time.perf_counter()
    proc = _launch(command, plan, workdir / f"attempt-{index}.log", resume)
    pgid_file.write_text(str(proc.pid))
    fired = None
    if kill is not None and kill.site is None:
        try:
            proc.wait(timeout=kill.delay)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            fired = "timer"
    code = _wait(proc, command.timeout)
    fired_file = Path(f"{counter}.fired")
    if fired_file.exists():
        point = json.loads(fired_file.read_text())
        fired = f"{point['site']} {point['detail']}"
    time.sleep(0.5)  # Ray ends the dead driver's workers; let them go before the next start
    return Attempt(
        kill.describe() if kill else None, resume, code, fired, time.perf_counter() - started
    )


def run_with_kills(
    command: Command, kills: list[Kill], workdir: Path, max_final: int = 3
) -> list[Attempt]:
    """Start the command, kill it as ``kills`` say (a kill whose point the attempt never
    reaches lets it finish, and the kills left are not used), then let it finish: at most
    ``max_final`` unkilled attempts (an unkilled attempt that fails is a finding)."""
    workdir.mkdir(parents=True, exist_ok=True)
    attempts: list[Attempt] = []
    for kill in kills:
        attempt = _attempt(command, kill, workdir, len(attempts))
        attempts.append(attempt)
        if attempt.fired is None and attempt.returncode == 0:
            return attempts  # done before this kill could land
    for _ in range(max_final):
        attempts.append(_attempt(command, None, workdir, len(attempts)))
        if attempts[-1].returncode == 0:
            break
    return attempts


# ---------------------------------------------------------------------------------------------
# What a finished run must look like


def leftovers(*folders: Path) -> list[str]:
    """Temporary files and folders kdray's writers left under ``folders``."""
    found = []
    for folder in folders:
        for path in folder.rglob("*") if folder.exists() else []:
            if store.is_temp_name(path.name):
                found.append(str(path))
    return sorted(found)


def _record_problems(path: Path) -> list[str]:
    """A manifest's files against their recorded sizes and sha256 (teacher.json's ``files``,
    a teacher-output cache's ``checksums``)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return [f"{path}: not readable JSON ({error})"]
    problems = []
    for key in ("files", "checksums"):
        files = record.get(key) if isinstance(record, dict) else None
        if isinstance(files, dict) and all(isinstance(v, dict) for v in files.values()):
            problems += store.file_problems(path.parent, files, full=True)
    return problems


def corrupt_files(*folders: Path) -> list[str]:
    """Every table, JSON record and safetensors file under ``folders`` that cannot be read, and
    every cache file that differs from its manifest."""
    import pyarrow.parquet as pq
    from safetensors import safe_open

    problems = []
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.exists() else []:
            if not path.is_file() or store.is_temp_name(path.name) or "/ray/" in str(path):
                continue
            try:
                if path.suffix == ".parquet":
                    pq.read_table(path)
                elif path.suffix == ".json":
                    problems += _record_problems(path)
                elif path.suffix == ".safetensors":
                    with safe_open(str(path), framework="pt") as handle:
                        list(handle.keys())
            except Exception as error:  # noqa: BLE001 - any unreadable file is a finding
                problems.append(f"{path}: {type(error).__name__}: {error}")
    return problems


def _key(frame: Any) -> list[str]:
    """What identifies a run across two experiments (trial ids are random): its cell and
    seed, else its searched settings and seed."""
    if "cell" in frame and "seed" in frame:
        return ["cell", "seed"]
    return sorted(c for c in frame.columns if c.startswith("param.")) + ["train.seed"]


def _columns(frame: Any, wanted: tuple[str, ...]) -> list[str]:
    return sorted(c for c in frame.columns if c in wanted or c.startswith(wanted))


def _table_differences(
    name: str, ref: Any, got: Any, key: list[str], wanted: tuple[str, ...], rtol: float
) -> list[str]:
    """Rows of ``got`` against ``ref`` matched on ``key``: none twice, none missing or extra,
    and the ``wanted`` columns equal (numbers within ``rtol``)."""
    import numpy as np
    import pandas as pd

    problems = []
    if got.duplicated(key).any():
        problems.append(f"{name}: present more than once:\n{got[got.duplicated(key)][key]}")
    merged = ref.merge(got, on=key, how="outer", suffixes=("", ".got"), indicator=True)
    missing = merged[merged["_merge"] != "both"]
    if len(missing):
        problems.append(f"{name}: in only one of the two runs:\n{missing[[*key, '_merge']]}")
    both = merged[merged["_merge"] == "both"]
    for column in _columns(ref, wanted):
        a, b = both[column], both.get(f"{column}.got")
        if b is None:
            problems.append(f"{name}: column {column} missing")
            continue
        if pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b):
            same = np.isclose(a.astype(float), b.astype(float), rtol=rtol, atol=0, equal_nan=True)
        else:
            same = (a.astype(str) == b.astype(str)).to_numpy()
        if not same.all():
            rows = both.loc[~same, [*key, column, f"{column}.got"]]
            problems.append(f"{name}: {column} differs:\n{rows.to_string()}")
    return problems


def compare(reference: Path, got: Path, rtol: float = 0.0) -> list[str]:
    """Where the results folder ``got`` differs from ``reference`` (the same spec and seeds run
    uninterrupted): every trials table and its epochs, run by run; empty when they agree."""
    import pandas as pd

    problems = []
    for ref_trials in sorted(reference.rglob("trials.parquet")):
        relative = ref_trials.parent.relative_to(reference)
        if "ray" in relative.parts:
            continue
        got_trials = got / relative / "trials.parquet"
        if not got_trials.exists():
            problems.append(f"{relative}: no trials.parquet")
            continue
        ref_t, got_t = pd.read_parquet(ref_trials), pd.read_parquet(got_trials)
        key = _key(ref_t)
        problems += _table_differences(
            f"{relative}/trials", ref_t, got_t, key, _TRIAL_COLUMNS, rtol
        )
        if not (reference / relative / "epochs.parquet").exists():
            continue
        ref_e, got_e = (
            pd.read_parquet(folder / relative / "epochs.parquet").merge(
                trials[["trial_id", *key]], on="trial_id"
            )
            for folder, trials in ((reference, ref_t), (got, got_t))
        )
        problems += _table_differences(
            f"{relative}/epochs", ref_e, got_e, [*key, "epoch"], _EPOCH_COLUMNS, rtol
        )
    return problems


def verdict_differences(reference: Path, got: Path) -> list[str]:
    """Where the verdicts of ``got`` differ from the reference's: every folder whose trials
    compare cells (an ablation, a confirmation) reported by
    :func:`kdray.analysis.report.build_report` on both, each cell's verdict per metric and its
    interval as printed."""
    import pandas as pd

    from kdray.analysis.report import build_report

    problems = []
    for ref_trials in sorted(reference.rglob("trials.parquet")):
        folder = ref_trials.parent.relative_to(reference)
        if {"ray", "rounds"} & set(folder.parts):
            continue  # a round's tables are merged into its ablation's, reported there
        if "cell" not in pd.read_parquet(ref_trials, columns=None).columns:
            continue
        if not (got / folder / "trials.parquet").exists():
            problems.append(f"{folder}: no trials.parquet, so no verdicts")
            continue
        theirs, mine = build_report(reference / folder), build_report(got / folder)
        if theirs.findings is None:
            continue
        columns = ["cell", *[c for c in theirs.findings if c.endswith(".verdict")], "interval"]
        a = theirs.findings[columns].astype(str).sort_values("cell").reset_index(drop=True)
        b = mine.findings.reindex(columns=columns).astype(str).sort_values("cell")
        if not a.equals(b.reset_index(drop=True)):
            problems.append(f"{folder}: verdicts differ:\n{a.to_string()}\n---\n{b.to_string()}")
    return problems


@dataclass
class Finding:
    """A harness run, for its JSON record: the kills, the attempts, what differed."""

    command: list[str]
    seed: int
    kills_planned: int
    attempts: list[Attempt]
    differences: list[str]
    corrupt: list[str]
    leftovers: list[str]

    @property
    def kills_landed(self) -> int:
        return sum(a.fired is not None for a in self.attempts)

    @property
    def finished(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].returncode == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "attempts"},
            "kills_landed": self.kills_landed,
            "resumes": sum(a.resumed for a in self.attempts),
            "finished": self.finished,
            "attempts": [asdict(a) for a in self.attempts],
        }
