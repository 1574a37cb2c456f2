"""Crash anywhere, lose nothing: fault points, the kill-and-resume harness on a real study, and
the one-paragraph errors for a full disk, a read-only folder and an out-of-memory run."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, grid_tune, tiny_spec_dict
from kdray.cli import app
from kdray.experiments import fault_harness
from kdray.infra import faults, store

KDRAY = str(Path(sys.executable).parent / "kdray")


def _plan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **plan: Any) -> Path:
    counter = tmp_path / "hits"
    monkeypatch.setenv(faults.PLAN_VAR, json.dumps({"counter": str(counter), **plan}))
    return counter


# ---------------------------------------------------------------------------------------------
# Fault points and stale temporary files


def test_a_fault_point_does_nothing_without_a_plan(tmp_path: Path) -> None:
    assert faults.PLAN_VAR not in os.environ
    faults.point("store.file", tmp_path / "x")  # no error, no file
    assert list(tmp_path.iterdir()) == []


def test_a_fault_point_fires_on_its_nth_matching_pass_only(monkeypatch, tmp_path: Path) -> None:
    _plan(monkeypatch, tmp_path, site="store.file", match="trials", hit=2, action="enospc")
    faults.point("store.file", tmp_path / "epochs.parquet")  # another file: not counted
    faults.point("store.dir", tmp_path / "trials.parquet")  # another site: not counted
    faults.point("store.file", tmp_path / "trials.parquet")  # first pass
    with pytest.raises(OSError) as raised:
        faults.point("store.file", tmp_path / "trials.parquet")
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(tmp_path / "trials.parquet")
    faults.point("store.file", tmp_path / "trials.parquet")  # third pass: not again


def test_a_dry_plan_counts_every_points_passes(monkeypatch, tmp_path: Path) -> None:
    counter = _plan(monkeypatch, tmp_path, action="count")
    for _ in range(3):
        faults.point("store.file", "a")
    faults.point("distill.epoch", 1)
    assert Path(f"{counter}.store.file").stat().st_size == 3
    assert Path(f"{counter}.distill.epoch").stat().st_size == 1


def test_a_kill_point_sigkills_the_whole_process_group(tmp_path: Path) -> None:
    # a parent and a child in one session; the child passes the point and kills both
    child = "import time, sys; from kdray import faults; faults.point('store.dir', 'x')"
    parent = (
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); "
        "time.sleep(60)"
    )
    pgid_file = tmp_path / "pgid"
    plan = {"site": "store.dir", "counter": str(tmp_path / "hits"), "pgid_file": str(pgid_file)}
    env = {**os.environ, faults.PLAN_VAR: json.dumps(plan), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", parent], env=env, start_new_session=True)
    pgid_file.write_text(str(proc.pid))
    assert proc.wait(timeout=60) == -9  # the parent, killed by its child's point
    assert json.loads(Path(f"{tmp_path / 'hits'}.fired").read_text())["site"] == "store.dir"


def test_a_crash_inside_an_atomic_write_leaves_the_old_file_and_a_temp_the_next_write_removes(
    tmp_path: Path,
) -> None:
    target = tmp_path / "trials.parquet"
    target.write_text("old")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".trials.parquet.tmp-{host}@{dead.pid}-abc"  # a killed writer's
    stale.write_text("half")
    live = tmp_path / f".trials.parquet.tmp-{host}@{os.getpid()}-def"  # a live writer's
    live.write_text("busy")
    elsewhere = tmp_path / f".trials.parquet.tmp-otherhost@{dead.pid}-ghi"  # another machine's
    elsewhere.write_text("theirs")
    assert target.read_text() == "old"
    store.write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert not stale.exists()
    assert live.exists() and elsewhere.exists()


def test_files_and_folders_written_atomically_get_the_umask_permissions(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        store.write_text_atomic(tmp_path / "a.json", "{}")
        with store.atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


# ---------------------------------------------------------------------------------------------
# Recognising I/O failures and running out of memory


def test_an_io_failure_is_found_behind_wrapping_errors_and_in_library_texts() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/x.parquet")
        except OSError as inner:
            raise RuntimeError("table write failed") from inner
    except RuntimeError as outer:
        found = faults.io_failure(outer)
    assert found == faults.IOFailure(errno.ENOSPC, "no space left on the device", "/data/x.parquet")
    text = "SafetensorError: I/O error: Read-only file system (os error 30)"
    assert faults.io_failure(RuntimeError(text)).code == errno.EROFS
    assert faults.io_failure(ValueError("lr must be positive")) is None
    assert faults.io_failure(OSError(errno.ENOENT, "No such file")) is None  # a user's path typo


def test_out_of_memory_is_told_apart_from_other_errors() -> None:
    assert faults.out_of_memory("MemoryError: injected")
    assert faults.out_of_memory(
        "RuntimeError: [enforce fail at alloc_cpu.cpp:118] ... "
        "DefaultCPUAllocator: not enough memory: you tried to allocate"
    )
    assert faults.out_of_memory(
        "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory."
    )
    assert not faults.out_of_memory("ValueError: bad layer map")
    assert not faults.out_of_memory(None)


# ---------------------------------------------------------------------------------------------
# The CLI: one paragraph, exit 2


def _run_spec(tiny_bert: Path, tmp_path: Path) -> Path:
    spec_file = tmp_path / "spec.yaml"
    spec = tiny_spec_dict(tiny_bert, train={"epochs": 2}, distill={"algorithm": "soft"})
    spec_file.write_text(yaml.safe_dump(spec))
    return spec_file


def test_a_full_disk_while_the_student_is_saved_ends_run_in_one_paragraph_with_exit_2(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: Any
) -> None:
    spec_file = _run_spec(tiny_bert, tmp_path)
    out = tmp_path / "out"
    _plan(monkeypatch, tmp_path, site="store.dir", match="student", action="enospc")
    result = CliRunner().invoke(app, ["run", str(spec_file), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "kdray run stopped: no space left on the device writing" in text
    assert str(out / "student") in text
    assert f"continue with: kdray run {spec_file} --out {out} --overwrite" in text
    assert not (out / "student").exists()  # nothing half-written
    assert fault_harness.leftovers(out) == []


def test_a_full_disk_after_overwrite_says_where_the_old_results_went(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: Any
) -> None:
    spec_file = _run_spec(tiny_bert, tmp_path)
    out = tmp_path / "out"
    assert CliRunner().invoke(app, ["run", str(spec_file), "--out", str(out)]).exit_code == 0
    _plan(monkeypatch, tmp_path, site="store.file", match="trials", action="enospc")
    result = CliRunner().invoke(app, ["run", str(spec_file), "--out", str(out), "--overwrite"])
    assert result.exit_code == 2, result.output
    (moved,) = tmp_path.glob("out.old-*")
    assert (moved / "trials.parquet").exists()  # the earlier run survives, where it says
    text = " ".join(result.output.split())
    assert f"--overwrite moved the earlier results to {moved}" in text
    assert "Traceback" not in result.output


def test_a_folder_turning_read_only_mid_run_ends_in_one_paragraph(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: Any
) -> None:
    spec_file = _run_spec(tiny_bert, tmp_path)
    _plan(monkeypatch, tmp_path, site="store.file", match="epochs", action="erofs")
    result = CliRunner().invoke(app, ["run", str(spec_file), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "the file system is read-only" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_really_full_disk_ends_run_in_one_paragraph(
    tiny_bert: Path, tmp_path: Path, one_thread: Any
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode:
        pytest.skip("this machine does not let a test mount a tmpfs")
    try:
        spec_file = _run_spec(tiny_bert, tmp_path)
        result = subprocess.run(
            [KDRAY, "run", str(spec_file), "--out", str(disk / "out")],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 2, output[-3000:]
        assert "no space left on the device" in output and "Traceback" not in output
        assert fault_harness.leftovers(disk) == []
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_run_out_of_memory_is_reported_as_such(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: Any
) -> None:
    import pandas as pd

    spec_file = _run_spec(tiny_bert, tmp_path)
    _plan(monkeypatch, tmp_path, site="distill.epoch", action="memory")
    result = CliRunner().invoke(app, ["run", str(spec_file), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "run out of memory" in result.output and "train.batch_size" in result.output
    trials = pd.read_parquet(tmp_path / "out" / "trials.parquet")
    assert list(trials["status"]) == ["oom"]


# ---------------------------------------------------------------------------------------------
# Kill anywhere, resume, compare


def fault_study_spec(model: Path, cache: Path) -> dict[str, Any]:
    """A study whose runs are fixed by the spec (a grid sweep), so a killed-and-resumed study
    must reproduce the uninterrupted one run by run: 2 sweep trials, the top one and the
    default confirmed at 2 seeds, a leave-one-out with one change at 2 seeds (one round).
    ``benchmarks/bench_faults.py`` kills bigger ones, adaptive rounds included, 100+ times."""
    spec = tiny_spec_dict(model, name="faults", train={"epochs": 2})
    spec["data"]["cache_dir"] = str(cache)
    spec["distill"] = {"algorithm": "soft"}
    spec["search"] = {"train.lr": {"grid": [1e-3, 3e-4]}}
    spec["tune"] = grid_tune()
    spec["ablation"] = {
        "components": {"losses": [], "schedule": None, "init": "random", "freeze": False},
        "seeds": {"min": 2, "max": 2, "step": 1},
    }
    spec["study"] = {"confirm": {"top_k": 1, "seeds": 2}, "budget": {"trials": 100}}
    return spec


def _study_command(spec_file: Path, out: Path, address: str, cache: Path) -> Any:
    argv = [KDRAY, "study", str(spec_file), "--out", str(out), "--address", address]
    argv += ["--set", f"data.cache_dir={cache}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return fault_harness.Command(argv, out, env, spec_file.parent, marker="study.json")


def test_a_study_killed_at_three_random_moments_resumes_to_the_uninterrupted_result(
    cluster: Any, tiny_bert: Path, tmp_path: Path
) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(fault_study_spec(tiny_bert, tmp_path / "cache-ref")))
    reference = _study_command(spec_file, tmp_path / "ref", cluster.address, tmp_path / "cache-ref")
    dry = fault_harness.dry_run(reference, tmp_path / "dry")
    assert dry.returncode == 0, (tmp_path / "dry" / "dry.log").read_text()[-3000:]
    assert {"store.file", "store.dir", "distill.checkpoint", "teacher_outputs.build"} <= set(
        dry.hits
    )
    kills = fault_harness.plan_kills(seed=0, n=3, dry=dry)
    cache = tmp_path / "cache-killed"
    killed = _study_command(spec_file, tmp_path / "killed", cluster.address, cache)
    attempts = fault_harness.run_with_kills(killed, kills, tmp_path / "kills")
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((tmp_path / "kills").glob("*.log")))
    assert attempts[-1].returncode == 0, logs[-6000:]
    landed = [a for a in attempts if a.fired]
    # a kill planned past the end of a resumed run never fires; benchmarks/bench_faults.py
    # lands 100+ of them
    assert len(landed) >= 1, [(a.kill, a.fired, a.returncode) for a in attempts]
    assert sum(a.resumed for a in attempts) >= len(landed) - 1
    assert fault_harness.compare(reference.out, killed.out) == []
    assert fault_harness.verdict_differences(reference.out, killed.out) == []
    assert fault_harness.corrupt_files(killed.out, cache) == []
    assert fault_harness.leftovers(killed.out, cache) == []


# ---------------------------------------------------------------------------------------------
# Sweeps on the cluster: the results folder, the cache and the Ray storage filling up


def _one_trial_sweep(tiny_bert: Path, tmp_path: Path, name: str) -> Path:
    spec = tiny_spec_dict(tiny_bert, name=name, train={"epochs": 2}, distill={"algorithm": "soft"})
    spec["data"]["cache_dir"] = str(tmp_path / "cache")
    spec["search"] = {"train.lr": {"grid": [1e-3]}}
    spec["tune"] = grid_tune(max_concurrent=1)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    return spec_file


def _sweep_with_plan(
    spec_file: Path, out: Path, address: str, tmp_path: Path, site: str, match: str, action: str
) -> subprocess.CompletedProcess:
    """``kdray sweep`` as its own process (its Ray job carries the plan to the workers)."""
    plan = {"site": site, "match": match, "action": action, "counter": str(tmp_path / "hits")}
    env = {**os.environ, faults.PLAN_VAR: json.dumps(plan), "PYTHONPATH": str(REPO)}
    argv = [KDRAY, "sweep", str(spec_file), "--out", str(out), "--address", address]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.CompletedProcess(argv, done.returncode, done.stdout + done.stderr)


@pytest.mark.parametrize(
    ("site", "match", "where"),
    [
        ("store.file", "trials", "the results folder (the driver's table write)"),
        ("teacher_outputs.build", "", "the teacher-output cache (a Ray task)"),
        ("distill.checkpoint", "", "a trial's checkpoint (a Ray worker)"),
    ],
)
def test_a_full_disk_anywhere_in_a_sweep_ends_it_in_one_paragraph_with_exit_2(
    cluster: Any, tiny_bert: Path, tmp_path: Path, site: str, match: str, where: str
) -> None:
    spec_file = _one_trial_sweep(tiny_bert, tmp_path, "full")
    out = tmp_path / "out"
    result = _sweep_with_plan(spec_file, out, cluster.address, tmp_path, site, match, "enospc")
    text = " ".join(result.stdout.split())
    assert result.returncode == 2, (where, result.stdout[-3000:])
    assert "kdray sweep stopped: no space left on the device" in text, where
    assert f"--out {out} --address {cluster.address} --resume" in text, where
    assert "Traceback" not in result.stdout, where
    assert fault_harness.leftovers(out, tmp_path / "cache") == []
    assert fault_harness.corrupt_files(out, tmp_path / "cache") == []


def test_a_trial_whose_worker_ray_killed_for_memory_is_oom_not_error() -> None:
    from kdray.experiments.sweep import _trial_status

    killed = (
        "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on "
        "memory. Memory on the node (IP: 127.0.0.1) where the task was running was 23.1GB / "
        "24.0GB (0.96), which exceeds the memory usage threshold of 0.95."
    )
    assert _trial_status({}, [], 3, killed, ended=True) == "oom"
    assert _trial_status({}, [], 3, "ValueError: bad layer map", ended=True) == "error"
    # inside the run (distill caught a MemoryError): its own status, reported with the records
    assert _trial_status({"status": "oom"}, [{"epoch": 1}], 3, None, ended=True) == "oom"


def test_the_harness_comparison_sees_a_lost_a_repeated_and_a_changed_run(tmp_path: Path) -> None:
    import pandas as pd

    def folder(name: str, rows: list[tuple[str, int, str, float]]) -> Path:
        out = tmp_path / name
        out.mkdir()
        trials = pd.DataFrame(rows, columns=["cell", "seed", "trial_id", "best.dev.accuracy"])
        trials["status"] = "ok"
        trials.to_parquet(out / "trials.parquet")
        epochs = trials[["trial_id"]].assign(epoch=1)
        epochs["dev.accuracy"] = trials["best.dev.accuracy"]
        epochs.to_parquet(out / "epochs.parquet")
        return out

    ref = folder("ref", [("a", 1, "t1", 0.5), ("a", 2, "t2", 0.6), ("b", 1, "t3", 0.7)])
    same = folder("same", [("a", 1, "x1", 0.5), ("a", 2, "x2", 0.6), ("b", 1, "x3", 0.7)])
    assert fault_harness.compare(ref, same) == []  # other trial ids, same runs: no difference
    got = folder("got", [("a", 1, "y1", 0.5), ("a", 1, "y4", 0.5), ("b", 1, "y3", 0.71)])
    found = "\n".join(fault_harness.compare(ref, got))
    assert "./trials: present more than once" in found  # ("a", 1) twice
    assert "./trials: in only one of the two runs" in found and "left_only" in found  # ("a", 2)
    assert "./trials: best.dev.accuracy differs" in found  # b: 0.7 -> 0.71
    assert "./epochs: dev.accuracy differs" in found


def test_checkpoints_are_pruned_only_when_no_saved_experiment_state_needs_them(
    tmp_path: Path,
) -> None:
    from kdray.experiments.sweep import prune_checkpoints

    experiment = tmp_path / "exp"

    def trial(trial_id: str, checkpoints: list[int]) -> Path:
        folder = experiment / f"distill_trainable_{trial_id}_0_lr=0.1"
        for n in checkpoints:
            (folder / f"checkpoint_{n:06d}").mkdir(parents=True)
        return folder

    def state(trial_id: str, status: str, named: int) -> list[Any]:
        meta = {"checkpoint_manager": f"{experiment}/x/checkpoint_{named:06d}"}
        return [json.dumps({"trial_id": trial_id, "status": status}), json.dumps(meta)]

    done, running, unknown = (
        trial("a_00000", [0, 1, 2]),
        trial("a_00001", [0, 1, 2, 3]),
        trial("a_00002", [0, 1, 2]),
    )
    old = {"trial_data": [state("a_00000", "RUNNING", 2), state("a_00001", "RUNNING", 0)]}
    (experiment / "experiment_state-2026-12-06_10-00-00.json").write_text(json.dumps(old))
    newest = {"trial_data": [state("a_00000", "TERMINATED", 2), state("a_00001", "RUNNING", 1)]}
    (experiment / "experiment_state-2026-12-06_11-00-00.json").write_text(json.dumps(newest))
    prune_checkpoints(str(experiment), keep=2, drop_ended=True)
    left = {f.name: sorted(c.name[-1] for c in f.iterdir()) for f in (done, running, unknown)}
    assert left == {
        done.name: [],  # finished in the state a restore reads: nothing to restore
        running.name: ["1", "2", "3"],  # the one the state names, and the newest two
        unknown.name: ["0", "1", "2"],  # not in the saved state yet: left alone
    }
    prune_checkpoints(str(experiment), keep=2, drop_ended=False)  # tune.keep_checkpoints
    assert sorted(c.name[-1] for c in running.iterdir()) == ["1", "2", "3"]
