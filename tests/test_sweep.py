"""Sweeps through Ray Tune on one Ray instance for the whole session: a two-node cluster on
127.0.0.1 (Ray's cluster utilities), so every sweep here also exercises the multi-node path."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from conftest import FIXTURE_GLUE, REPO, tiny_spec_dict, wait_for_free_cpus
from kdray.analysis import results
from kdray.experiments.plan import OBJECTIVE, RUNG_TIME, OptunaSpace, active_values
from kdray.experiments.sweep import (
    OPTUNA_JOURNAL,
    logger_callbacks,
    make_scheduler,
    run_sweep,
    setup_cpus,
)
from kdray.spec import SpecError, spec_from_dict

ray = pytest.importorskip("ray")


def sweep_spec(model: Path, name: str, **extra: Any) -> dict[str, Any]:
    spec = tiny_spec_dict(model, name=name, train={"epochs": 3})
    spec["search"] = {
        "distill.algorithm": {"choice": ["soft", "internal", "sid"]},
        "distill.losses.soft.temperature": {
            "loguniform": [1, 10],
            "when": {"distill.algorithm": ["soft", "sid"]},
        },
        "train.lr": {"loguniform": [1e-4, 1e-3]},
    }
    spec["tune"] = {
        "num_samples": 4,
        "searcher": {"optuna": {"sampler": "tpe", "seed": 0}},
        "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}},
        "max_concurrent": 2,
        "resources": {"cpu": 1},
        "max_failures": 0,
    }
    spec.update(extra)
    return spec


def test_conditional_space_samples_only_what_matters(tiny_bert: Path) -> None:
    import optuna

    spec = spec_from_dict(sweep_spec(tiny_bert, "space"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        OptunaSpace(spec)(trial)
        algorithm = trial.params["distill.algorithm"]
        seen.add(algorithm)
        has_temperature = "distill.losses.soft.temperature" in trial.params
        assert has_temperature == (algorithm in ("soft", "sid"))
        study.tell(trial, 0.5)
    assert seen == {"soft", "internal", "sid"}
    # a value sampled for a parameter whose condition fails is dropped, not applied
    values = active_values(
        spec, {"distill.algorithm": "internal", "distill.losses.soft.temperature": 7.0}
    )
    assert values == {"distill.algorithm": "internal"}


def test_loggers_are_ray_tunes_own_callbacks_in_the_order_given(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    spec = spec_from_dict(sweep_spec(tiny_bert, "loggers"))
    made = logger_callbacks(spec, tmp_path, "loggers")
    assert [type(c) for c in made] == [TBXLoggerCallback, CSVLoggerCallback]
    spec = spec.with_values({"tune.loggers": ["json"]})
    assert [type(c) for c in logger_callbacks(spec, tmp_path, "loggers")] == [JsonLoggerCallback]


def test_wandb_logger_stays_offline_under_the_results_folder_unless_the_spec_says_otherwise(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from ray.air.integrations.wandb import WandbLoggerCallback

    spec = spec_from_dict(sweep_spec(tiny_bert, "wb", tune={"loggers": ["wandb"]}))
    (made,) = logger_callbacks(spec, tmp_path, "wb")
    assert isinstance(made, WandbLoggerCallback)
    assert (made.project, made.group) == ("wb", None)  # None: Ray's default, the experiment
    assert made.kwargs["mode"] == "offline" and made.kwargs["dir"] == str(tmp_path.resolve())
    assert made.kwargs["settings"]["x_disable_stats"] and made.kwargs["settings"]["disable_git"]
    given = {"project": "kd", "entity": "lab", "mode": "online", "dir": str(tmp_path / "w")}
    (made,) = logger_callbacks(spec.with_values({"tune.wandb": given}), tmp_path, "wb")
    assert (made.project, made.kwargs["entity"], made.kwargs["mode"]) == ("kd", "lab", "online")
    assert made.kwargs["dir"] == str((tmp_path / "w").resolve())


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_that_is_not_installed_is_refused_before_ray_saying_how_to_install_it(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: str
) -> None:
    monkeypatch.setitem(sys.modules, tracker, None)  # import mlflow/wandb raises ImportError
    raw = sweep_spec(tiny_bert, "untracked", tune={"loggers": ["tensorboard", tracker]})
    with pytest.raises(ValueError, match=rf"tune\.loggers: .*pip install 'kdray\[{tracker}\]'"):
        run_sweep(spec_from_dict(raw), out_dir=tmp_path / "out")  # before Ray: no cluster needed
    assert not (tmp_path / "out").exists()


def _tensorboard_scalars(folder: Path) -> tuple[dict[str, dict[int, float]], bool]:
    """A trial folder's TensorBoard scalars ({tag: {step: value}}) and whether it has hparams."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {
        tag: {event.step: event.value for event in events.Scalars(tag)}
        for tag in events.Tags()["scalars"]
    }
    return scalars, bool(events.PluginTagToContent("hparams"))


def _study_results(out: Path, name: str) -> tuple[list[tuple[float, float]], int]:
    """The Optuna study in a sweep's journal: (train.lr, value) of its COMPLETE trials, sorted,
    and how many trials it holds in all."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / OPTUNA_JOURNAL)))
    study = optuna.load_study(study_name=name, storage=storage)
    done = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    return sorted((t.params["train.lr"], t.value) for t in done), len(study.trials)


def _study_proposals(out: Path, name: str) -> list[dict[str, Any]]:
    """The parameters of every trial in a sweep's Optuna journal, in the order it proposed them."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / OPTUNA_JOURNAL)))
    return [t.params for t in optuna.load_study(study_name=name, storage=storage).trials]


def _table_results(trials: pd.DataFrame, statuses: tuple[str, ...]) -> list[tuple[float, float]]:
    chosen = trials[trials["status"].isin(statuses)]
    return sorted(zip(chosen["param.train.lr"], chosen["best.dev.accuracy"], strict=True))


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def test_asha_never_prunes_a_staged_trial_for_being_staged(tiny_bert: Path) -> None:
    """A sid trial's dev metric is meaningless before its classifier stage: ASHA on kd_epoch
    must let it through however bad it looks, and judge it after its classifier epochs."""
    spec = spec_from_dict(sweep_spec(tiny_bert, "asha", train={"epochs": 8}))
    scheduler = make_scheduler(spec)
    good = [_Trial(f"soft{i}") for i in range(4)]
    staged = _Trial("sid")
    for trial in [*good, staged]:
        scheduler.on_trial_add(None, trial)
    for epoch in range(1, 4):
        for i, trial in enumerate(good):
            action = scheduler.on_trial_result(
                None, trial, {RUNG_TIME: epoch, OBJECTIVE: 0.8 + 0.01 * i, "epoch": epoch}
            )
    # epochs 1..3 of the staged trial train layers only: chance-level dev metric, kd_epoch 0
    for epoch in range(1, 4):
        action = scheduler.on_trial_result(
            None, staged, {RUNG_TIME: 0, OBJECTIVE: math.nan, "epoch": epoch}
        )
        assert action == "CONTINUE"
    # after its first classifier epoch it is compared like any other trial at rung 1
    action = scheduler.on_trial_result(None, staged, {RUNG_TIME: 1, OBJECTIVE: 0.1, "epoch": 4})
    assert action == "STOP"


def test_the_live_table_shows_a_trial_the_scheduler_stopped_as_pruned(tiny_bert: Path) -> None:
    """Tune calls a trial that ASHA stopped "complete": the table shows pruned, as the trials
    table does, judged by the epochs of the spec's student (or, in a teacher search, teacher)."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from kdray.experiments.sweep import LiveTrials
    from kdray.infra.progress import TrialsTable

    raw = sweep_spec(tiny_bert, "live")  # students 3 epochs
    raw["teacher"] = {**raw["teacher"], "epochs": 2}
    spec = spec_from_dict(raw)
    config = {"distill.algorithm": "soft", "train.lr": 1e-4}
    expected = {"train": {"whole": "ok", "stopped": "pruned"}, "teacher": {"whole": "ok"}}
    for horizon, ran in (("train", {"whole": 3, "stopped": 2}), ("teacher", {"whole": 2})):
        out = io.StringIO()
        live = LiveTrials(spec, TrialsTable("live", "accuracy", Console(file=out)), horizon)
        for trial_id, epochs in ran.items():
            trial = SimpleNamespace(trial_id=trial_id, config=config)
            live.on_trial_start(0, [], trial)
            for epoch in range(1, epochs + 1):
                result = {"epoch": epoch, "dev.accuracy": 0.5, "objective": 0.5}
                live.on_trial_result(0, [], trial, result)
            live.on_trial_complete(0, [], trial)
        statuses = {trial_id: row["status"] for trial_id, row in live.table.rows.items()}
        assert statuses == expected[horizon]
    assert "whole ok" in out.getvalue()


def test_a_live_table_pickled_by_an_older_kdray_is_restored_with_defaults(tiny_bert: Path) -> None:
    """Tune.restore unpickles the callbacks of the run it continues: a LiveTrials pickled before
    it had a horizon and each trial's last report must still take results and ends."""
    import io
    import pickle
    from types import SimpleNamespace

    from rich.console import Console

    from kdray.experiments.sweep import LiveTrials
    from kdray.infra.progress import TrialsTable

    spec = spec_from_dict(sweep_spec(tiny_bert, "old"))
    live = LiveTrials(spec, TrialsTable("old", "accuracy", Console(file=io.StringIO())))
    del live.horizon, live.last  # what the older class held
    restored = pickle.loads(pickle.dumps(live))
    trial = SimpleNamespace(trial_id="t", config={"distill.algorithm": "soft", "train.lr": 1e-4})
    restored.on_trial_result(0, [], trial, {"epoch": 3, "dev.accuracy": 0.5, "objective": 0.5})
    restored.on_trial_complete(0, [], trial)
    assert restored.table.rows["t"]["status"] == "ok"


def test_sweep_writes_tables_with_conditional_params(
    cluster: Any, tiny_bert: Path, tmp_path: Path
) -> None:
    spec = spec_from_dict(sweep_spec(tiny_bert, "sweep"))
    wait_for_free_cpus(2)  # both nodes free, so the first two trials start on different ones
    outcome = run_sweep(spec, out_dir=tmp_path / "out")
    trials, epochs = outcome.trials, outcome.epochs
    assert len(trials) == 4
    assert trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"ok", "pruned"}
    assert (trials["best.dev.accuracy"].notna()).all()
    assert (trials["teacher.dev.accuracy"].notna()).all()
    internal = trials[trials["distill.algorithm"] == "internal"]
    soft_like = trials[trials["distill.algorithm"] != "internal"]
    if "param.distill.losses.soft.temperature" in trials:
        assert internal["param.distill.losses.soft.temperature"].isna().all()
        assert soft_like["param.distill.losses.soft.temperature"].notna().all()
    # the resolved setting equals the sampled one where it was sampled
    for _, row in soft_like.iterrows():
        assert row["distill.losses.soft.temperature"] == pytest.approx(
            row["param.distill.losses.soft.temperature"]
        )
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert (epochs["checkpoint_seconds"] > 0).all()  # every epoch of a trial is checkpointed
    per_trial = epochs.groupby("trial_id")["epoch"].max()
    for _, row in trials.iterrows():
        assert per_trial[row["trial_id"]] == row["epochs_run"]
    # two concurrent one-CPU trials on two one-CPU nodes: both nodes ran trials
    assert trials["node_id"].nunique() == 2, trials[["trial_id", "node_id", "status"]]
    # the sweep fine-tuned the teacher once and every trial used it
    assert trials["teacher.id"].nunique() == 1
    assert outcome.best is not None
    # no finished trial keeps resume state; the sweep's best trial (tune.keep_students: best)
    # keeps its best student beside the tables, the others' students are deleted
    students = tmp_path / "out" / "students"
    assert [p.name for p in students.iterdir()] == [outcome.best["trial_id"]]
    for _, row in trials[trials["status"] == "ok"].iterrows():
        student = students / row["trial_id"]
        if row["trial_id"] == outcome.best["trial_id"]:
            assert row["student_path"] == str(student)
            assert (student / "model.safetensors").is_file()
            assert (student / "config.json").is_file()
        else:
            assert pd.isna(row["student_path"]) and not student.exists()
    assert not list((tmp_path / "out" / "ray").glob("sweep/*/checkpoint_*"))
    # every trial ended: the teacher-output cache is gone from the storage too
    assert not (tmp_path / "out" / "ray" / "sweep-teacher-outputs").exists()
    # so the sweep's best student exports without Ray's checkpoints
    from kdray.experiments.export import export_student

    exported = export_student(tmp_path / "out", tmp_path / "best", best=True)
    assert (exported / "README.md").is_file()
    card = (exported / "README.md").read_text()
    assert outcome.best["trial_id"] in card
    assert "sweep-teacher" not in card  # the spec's teacher, not the sweep's storage copy

    # TensorBoard (Ray's TBX logger): every epoch's dev metric, losses and stage, per trial, at
    # step = epoch; the sampled settings as hparams once the trial ended
    experiment = tmp_path / "out" / "ray" / "sweep"
    for trial_id, rows in epochs.groupby("trial_id"):
        (folder,) = experiment.glob(f"*{trial_id}*")
        assert (folder / "progress.csv").is_file()  # csv: on by default
        assert not (folder / "result.json").exists()  # json: off, and Ray added none itself
        scalars, has_hparams = _tensorboard_scalars(folder)
        assert has_hparams
        dev = scalars["ray/tune/dev.accuracy"]
        assert sorted(dev) == sorted(rows["epoch"])
        for _, row in rows.iterrows():
            assert dev[row["epoch"]] == pytest.approx(row["dev.accuracy"], abs=1e-6)
            assert scalars["ray/tune/stage"][row["epoch"]] == row["stage"]
            assert scalars["ray/tune/loss.total"][row["epoch"]] == pytest.approx(
                row["loss.total"], rel=1e-6
            )
    # Optuna: one COMPLETE trial per trial that ended, with its objective (ASHA's stopped trials
    # are told to Optuna with their best so far, as Ray's OptunaSearch does)
    study, count = _study_results(tmp_path / "out", "sweep")
    assert study == _table_results(trials, ("ok", "pruned"))
    assert count == 4


def test_failing_and_diverging_trials_are_recorded_and_others_finish(
    cluster: Any, tiny_bert: Path, tmp_path: Path
) -> None:
    spec_dict = sweep_spec(tiny_bert, "faults")
    # a 5-layer student cannot be built from the 4-layer tiny teacher: those trials raise;
    # lr 10 (the largest allowed) without clipping blows the hard-label loss up past
    # train.divergence_factor (100) x its first epoch's: that trial diverges (see test_distill)
    spec_dict["search"] = {
        "student.layers": {"grid": [2, 5]},
        "train.lr": {"grid": [1e-3, 10.0]},
    }
    spec_dict["distill"] = {"algorithm": "none"}
    spec_dict["train"].update({"max_grad_norm": None, "warmup": 0.0})
    spec_dict["tune"].update(
        {"searcher": {"grid": {}}, "num_samples": 1, "scheduler": {"fifo": {}}, "max_failures": 2}
    )
    trials = run_sweep(spec_from_dict(spec_dict), out_dir=tmp_path / "out").trials
    assert len(trials) == 4
    by = trials.set_index(["student.layers", "train.lr"])
    assert by.loc[(2, 1e-3), "status"] == "ok"
    assert by.loc[(2, 1e-3), "best.dev.accuracy"] >= 0
    assert by.loc[(2, 10.0), "status"] == "diverged"
    assert "loss blew up" in by.loc[(2, 10.0), "error"]
    for lr in (1e-3, 10.0):
        assert by.loc[(5, lr), "status"] == "error"
        assert "5 layers" in by.loc[(5, lr), "error"]
        # a settings error is recorded once: retries are for lost workers only
        assert by.loc[(5, lr), "num_failures"] == 0


def test_a_sweep_whose_every_trial_errored_exits_1_with_a_one_line_summary(
    cluster: Any, tiny_bert: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from kdray.cli import app

    spec_dict = sweep_spec(tiny_bert, "all-errors")
    # a 5-layer student cannot be built from the 4-layer tiny teacher: every trial raises
    spec_dict["search"] = {"student.layers": {"grid": [5, 6]}}
    spec_dict["distill"] = {"algorithm": "none"}  # one stage: the spec itself is valid
    spec_dict["tune"].update(
        {"searcher": {"grid": {}}, "num_samples": 1, "scheduler": {"fifo": {}}}
    )
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict))
    result = CliRunner().invoke(
        app,
        ["sweep", str(spec_file), "--out", str(tmp_path / "out"), "--address", cluster.address],
    )
    assert result.exit_code == 1, result.output[-3000:]
    assert "trials: no trial finished: 2 error" in result.output
    assert len(pd.read_parquet(tmp_path / "out" / "trials.parquet")) == 2


def _ctrl_c_when(proc: subprocess.Popen, ready: Any, timeout: float = 300) -> None:
    """Wait (at most ``timeout`` s) until ``ready()`` holds, then Ctrl-C the still running
    ``proc`` and wait for it to exit (killed if it takes over 120 s)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_interrupted_sweep_resumes_without_losing_or_repeating_trials(
    cluster: Any, tiny_bert: Path, tmp_path: Path
) -> None:
    spec_dict = sweep_spec(tiny_bert, "resumable", train={"epochs": 4})
    spec_dict["tune"].update({"num_samples": 4, "max_concurrent": 1, "scheduler": {"fifo": {}}})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict))
    out = tmp_path / "out"
    address = cluster.address
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        str(Path(sys.executable).parent / "kdray"),
        "sweep",
        str(spec_file),
        "--out",
        str(out),
        "--address",
        address,
    ]
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    trials_file = out / "trials.parquet"
    # Ctrl-C once the first trial has finished and the second is under way
    _ctrl_c_when(proc, lambda: trials_file.exists() and len(pd.read_parquet(trials_file)) >= 1)
    output = proc.stdout.read().decode()
    assert proc.returncode != 0, output[-3000:]  # before, an interrupted sweep exited 0
    if proc.returncode == 130:  # Tune stopped and returned: the summary says what finished
        assert "trials: interrupted:" in output and "--resume" in output, output[-3000:]
    before = pd.read_parquet(trials_file)
    finished_before = set(before.loc[before["status"] == "ok", "trial_id"])
    assert 1 <= len(finished_before) < 4
    # the Optuna journal has exactly the finished trials as COMPLETE, with their objective
    assert _study_results(out, "resumable")[0] == _table_results(before, ("ok",))
    epochs_before = pd.read_parquet(out / "epochs.parquet")
    done_epochs = {
        tid: set(epochs_before.loc[epochs_before["trial_id"] == tid, "epoch"])
        for tid in finished_before
    }

    spec = spec_from_dict(spec_dict)
    outcome = run_sweep(spec, out_dir=out, resume=True)
    trials, epochs = outcome.trials, outcome.epochs
    assert len(trials) == 4, trials[["trial_id", "status"]]
    assert trials["trial_id"].is_unique
    assert set(trials["status"]) == {"ok"}
    assert finished_before <= set(trials["trial_id"])
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert (epochs.groupby("trial_id")["epoch"].max() == 4).all()
    # the resumed searcher told the same study: 4 trials, all COMPLETE, none asked twice
    study, count = _study_results(out, "resumable")
    assert study == _table_results(trials, ("ok",))
    assert count == 4
    for tid, seen in done_epochs.items():
        assert set(epochs.loc[epochs["trial_id"] == tid, "epoch"]) == seen


def test_ablation_runs_every_cell_once_per_seed_paired(
    cluster: Any, tiny_bert: Path, tmp_path: Path
) -> None:
    from kdray.analysis.report import paired_comparison
    from kdray.experiments.sweep import run_ablation

    spec_dict = tiny_spec_dict(tiny_bert, name="abl", train={"epochs": 2})
    spec_dict["distill"] = {"algorithm": "soft"}
    spec_dict["ablation"] = {
        "axes": {"distill.algorithm": ["soft", "idal"]},
        "seeds": [1, 2],
        "baseline": {"distill.algorithm": "soft"},
    }
    spec_dict["tune"] = {
        "max_concurrent": 2,
        "resources": {"cpu": 1},
        "max_failures": 0,
        "keep_checkpoints": True,  # keeps the teacher-output cache too, to look at it below
    }
    handler = signal.getsignal(signal.SIGINT)
    outcome = run_ablation(spec_from_dict(spec_dict), out_dir=tmp_path / "abl")
    # Ray Tune's own SIGINT handler is gone with its run: a Ctrl-C after it is not swallowed
    assert signal.getsignal(signal.SIGINT) is handler
    trials = outcome.trials
    assert len(trials) == 4
    assert set(trials["status"]) == {"ok"}
    assert sorted(zip(trials["cell"], trials["seed"], strict=True)) == [
        ("distill.algorithm=idal", 1),
        ("distill.algorithm=idal", 2),
        ("distill.algorithm=soft", 1),
        ("distill.algorithm=soft", 2),
    ]
    # the seed is the run's seed: same data order and student initialisation across cells
    assert (trials["train.seed"] == trials["seed"]).all()
    assert (trials["distill.algorithm"] == trials["cell"].str.split("=").str[1]).all()
    # diagnostics were measured for every run, and the CKA matrices were stored
    assert trials["diag.agreement"].notna().all()
    cka = pd.read_parquet(outcome.out_dir / "cka.parquet")
    assert set(cka["trial_id"]) == set(trials["trial_id"])
    comparison = paired_comparison(trials, {"distill.algorithm": "soft"}, "accuracy")
    idal = comparison.set_index(comparison.columns[0]).loc["distill.algorithm=idal"]
    assert idal["n_pairs"] == 2
    # the teacher-output cache was built once, before the trials, into the storage
    outputs = list((outcome.out_dir / "ray" / "abl-ablation-teacher-outputs").iterdir())
    assert len([p for p in outputs if (p / "manifest.json").exists()]) == 1

    # Its Ray Tune state lost (a folder copied without ray/, a lost head node's disk), with one
    # trial cut off and one never written: --resume keeps the ended rows and runs those two again
    shutil.rmtree(outcome.out_dir / "ray")
    table = trials.sort_values(["cell", "seed"]).reset_index(drop=True)
    cut, missing = table.loc[1, "trial_id"], table.loc[2, "trial_id"]
    table.loc[1, "status"] = "interrupted"
    table.drop(index=2).to_parquet(outcome.out_dir / "trials.parquet")
    again = run_ablation(spec_from_dict(spec_dict), out_dir=tmp_path / "abl", resume=True)
    resumed, epochs = results.load(again.out_dir)
    assert len(resumed) == 4 and set(resumed["status"]) == {"ok"}
    assert sorted(zip(resumed["cell"], resumed["seed"], strict=True)) == sorted(
        zip(trials["cell"], trials["seed"], strict=True)
    )
    kept = set(table["trial_id"]) - {cut, missing}
    assert kept < set(resumed["trial_id"]) and not {cut, missing} & set(resumed["trial_id"])
    assert set(epochs["trial_id"]) == set(resumed["trial_id"])  # the cut-off run's epochs too
    assert not epochs.duplicated(["trial_id", "epoch"]).any()


def test_an_adaptive_leave_one_out_runs_as_paired_ray_trials_and_resumes_without_rerunning(
    cluster: Any, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdray.analysis.report import build_report
    from kdray.experiments import followup
    from kdray.experiments.sweep import run_trials

    spec_dict = tiny_spec_dict(tiny_bert, name="study", train={"epochs": 2})
    spec_dict["distill"] = {"algorithm": "soft"}
    spec_dict["search"] = {"distill.algorithm": {"choice": ["soft", "idal"]}}
    spec_dict["tune"] = {"max_concurrent": 2, "resources": {"cpu": 1}, "max_failures": 0}
    spec_dict["ablation"] = {
        "design": "leave_one_out",
        "seeds": {"min": 2, "max": 3, "step": 1},
        "equivalence": 0.0,
    }
    spec = spec_from_dict(spec_dict)

    # adaptive leave-one-out of the soft recipe: -soft cannot run, init=random is the one change
    cells, skipped = followup.leave_one_out_cells(spec)
    assert [c["cell"] for c in cells] == ["recipe", "init=random"]
    assert any(s["cell"] == "-soft" and "cannot run" in s["reason"] for s in skipped)
    out = tmp_path / "loo"
    trials, decisions = followup.run_adaptive(
        spec, cells, followup.RECIPE, run_trials, name="study-ablation", out_dir=out
    )
    seeds = trials.groupby("cell")["seed"].apply(lambda s: sorted(s)).to_dict()
    assert set(trials["status"]) == {"ok"}
    assert set(seeds["init=random"]) <= set(seeds["recipe"])  # paired: the baseline has them
    decision = decisions["init=random"]
    assert decision.n_seeds == len(seeds["init=random"]) in (2, 3)
    rounds = sorted(p.name for p in (out / "rounds").iterdir())
    assert rounds == ["round-1"] if decision.n_seeds == 2 else ["round-1", "round-2"]
    assert decision.status in ("better", "worse", "equivalent", "max reached")
    built = build_report(out)
    assert built.baseline == "recipe"
    assert built.stopping.set_index("cell").loc["init=random", "stopped"] == decision.status

    # resuming the finished rounds runs nothing: no teacher, no teacher-output cache, no Tune
    import kdray.experiments.sweep as kdray_sweep

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished round was run again")

    monkeypatch.setattr(kdray_sweep, "run_experiment", must_not_run)
    again, decided = followup.run_adaptive(
        spec, cells, followup.RECIPE, run_trials, name="study-ablation", out_dir=out, resume=True
    )
    assert sorted(again["trial_id"]) == sorted(trials["trial_id"])
    assert decided["init=random"].status == decision.status


def _dying_trainable(marker: Path) -> Any:
    """A trial that kills its own worker process right after its epoch-2 checkpoint, once."""
    import kdray.experiments.sweep as kdray_sweep

    def trainable(config: dict[str, Any], spec_json: dict[str, Any]) -> None:
        real = kdray_sweep.distill

        def distill_then_die(spec: Any, report: Any, **kwargs: Any) -> Any:
            def report_then_die(record: dict[str, Any], save: Any) -> None:
                report(record, save)
                if record["epoch"] == 2 and not marker.exists():
                    marker.touch()
                    os._exit(1)  # the worker dies: no exception, no cleanup

            return real(spec, report=report_then_die, **kwargs)

        kdray_sweep.distill = distill_then_die
        try:
            kdray_sweep.distill_trainable(config, spec_json=spec_json)
        finally:
            kdray_sweep.distill = real

    return trainable


def test_dead_worker_is_retried_from_its_checkpoint(
    cluster: Any, tiny_bert: Path, tmp_path: Path
) -> None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    spec_dict = sweep_spec(tiny_bert, "dying")
    spec_dict["search"] = {"train.lr": {"grid": [1e-3]}}
    spec_dict["distill"] = {"algorithm": "soft"}
    spec_dict["tune"].update(
        {"searcher": {"grid": {}}, "num_samples": 1, "scheduler": {"fifo": {}}, "max_failures": 1}
    )
    marker = tmp_path / "died-once"
    outcome = run_sweep(
        spec_from_dict(spec_dict),
        out_dir=tmp_path / "out",
        trainable=_dying_trainable(marker),
    )
    assert marker.exists()  # it did die
    trial = outcome.trials.iloc[0]
    assert trial["status"] == "ok"
    assert trial["num_failures"] == 1
    epochs = outcome.epochs
    # epochs 1-2 before the crash, epoch 3 after the restore from the epoch-2 checkpoint
    assert sorted(epochs["epoch"]) == [1, 2, 3]
    assert trial["epochs_run"] == 3
    assert trial["resumed_from_epoch"] == 2  # the table says where it went on from


def study_spec(model: Path, name: str) -> dict[str, Any]:
    """A study small enough for two shared cores: 3 sweep trials, the top 2 with seeds 1, 2,
    and a leave-one-out with one change (init=random) at 2 seeds."""
    spec = sweep_spec(model, name, train={"epochs": 2})
    spec["distill"] = {"algorithm": "soft"}  # single-stage algorithms: 2 epochs are enough
    spec["search"] = {
        "distill.algorithm": {"choice": ["soft", "idal"]},
        "train.lr": {"loguniform": [1e-4, 1e-3]},
    }
    spec["tune"].update({"num_samples": 3, "max_concurrent": 1, "scheduler": {"fifo": {}}})
    spec["ablation"] = {
        "components": {"losses": [], "schedule": None, "init": "random", "freeze": False},
        "seeds": {"min": 2, "max": 2, "step": 1},
    }
    spec["study"] = {"confirm": {"top_k": 2, "seeds": 2}, "budget": {"trials": 100}}
    return spec


def _study_cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from kdray.cli import app

    return CliRunner().invoke(app, ["study", *args])


def _assert_whole_study(out: Path, metric: str = "accuracy") -> str:
    """Every phase done, its report written, and STUDY.md linking them."""
    record = json.loads((out / "study.json").read_text())
    assert {p: e["status"] for p, e in record["phases"].items()} == dict.fromkeys(
        ("sweep", "confirm", "ablation"), "done"
    )
    text = (out / "STUDY.md").read_text()
    assert "Phases: sweep done; confirm done; ablation done." in text
    assert f"Confirmed dev {metric}: " in text and "`init=random`" in text
    for phase in ("sweep", "confirm", "ablation"):
        assert f"- {phase}: [{phase}/REPORT.md]({phase}/REPORT.md)" in text
        assert (out / phase / "REPORT.md").exists()
    return text


def _rte_fixture_as_csv(folder: Path) -> dict[str, Any]:
    """The fixture's RTE rows as CSV files of the user's own (``data.source``): the same
    examples and label order, so the study below runs as on the GLUE files."""
    import csv

    from kdray.training import data

    files = {}
    for split in ("train", "dev"):
        path = folder / f"rte-{split}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["premise", "hypothesis", "label"])
            for ex in data.read_local("rte", FIXTURE_GLUE, split):
                writer.writerow([ex.text_a, ex.text_b, data.TASKS["rte"].labels[ex.label]])
        files[split] = str(path)
    return {"format": "csv", "files": files, "text": ["premise", "hypothesis"]}


def test_study_runs_sweep_confirm_and_leave_one_out_and_writes_study_md(
    cluster: Any, tiny_bert: Path, tmp_path: Path
) -> None:
    # on a CSV task of the user's own (data.source): the whole chain, as on GLUE files
    raw = study_spec(tiny_bert, "chain")
    raw.update(task="rte-csv", data={"source": _rte_fixture_as_csv(tmp_path), "max_seq_length": 32})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "chain"
    result = _study_cli(str(spec_file), "--out", str(out), "--address", cluster.address)
    assert result.exit_code == 0, result.output[-3000:]
    text = _assert_whole_study(out)
    for phase in ("sweep", "confirm", "ablation"):
        assert set(pd.read_parquet(out / phase / "trials.parquet")["task"]) == {"rte-csv"}
    confirmed = pd.read_parquet(out / "confirm" / "trials.parquet")
    assert set(confirmed["seed"]) == {1, 2} and set(confirmed["status"]) == {"ok"}
    assert set(confirmed["cell"]) == {"rank1", "rank2", "default"}
    assert "Against the spec as written (cell `default`, the same seeds): " in text
    ablation = pd.read_parquet(out / "ablation" / "trials.parquet")
    assert sorted(zip(ablation["cell"], ablation["seed"], strict=True)) == [
        ("init=random", 1), ("init=random", 2), ("recipe", 1), ("recipe", 2)
    ]  # fmt: skip
    print(text)  # the STUDY.md of the run, shown with pytest -s
    # without --resume, the finished study's folder is refused with the ways out
    again = _study_cli(str(spec_file), "--out", str(out), "--address", cluster.address)
    assert again.exit_code == 2
    assert "--resume, or write elsewhere with --out DIR" in " ".join(again.output.split())
    _confirm_and_ablate_alone_repeat_the_study(cluster, spec_file, out, confirmed, tmp_path)
    # --resume where only the evidence is left (no Ray folders: a clone of committed results/)
    # checks the finished sweep phase's folder no more: it will not run again
    for ray_dir in [path for path in out.rglob("ray") if path.is_dir()]:
        shutil.rmtree(ray_dir)
    resumed = _study_cli(
        str(spec_file), "--out", str(out), "--address", cluster.address, "--resume"
    )
    assert resumed.exit_code == 0, resumed.output[-3000:]
    assert "pre-flight checks failed" not in resumed.output
    _assert_whole_study(out)


def _confirm_and_ablate_alone_repeat_the_study(
    cluster: Any, spec_file: Path, out: Path, confirmed: pd.DataFrame, tmp_path: Path
) -> None:
    """kdray confirm and kdray ablate (leave_one_out, adaptive) on the study's sweep run the
    same trials as its phases: same configuration and seed, same dev scores."""
    from typer.testing import CliRunner

    from kdray.cli import app

    cli = CliRunner()
    alone = tmp_path / "confirm-alone"
    args = ["--top-k", "1", "--seeds", "2", "--out", str(alone), "--address", cluster.address]
    done = cli.invoke(app, ["confirm", str(out / "sweep"), *args])
    assert done.exit_code == 0, done.output[-3000:]
    assert "kdray confirm chain: 1 configurations + the spec as written x 2 seeds" in done.output
    mine = pd.read_parquet(alone / "trials.parquet").sort_values("seed")
    control = mine[mine["cell"] == "default"]  # the spec as written, same seeds: the control
    assert list(control["seed"]) == [1, 2] and set(control["config_rank"]) == {0}
    mine = mine[mine["cell"] != "default"]
    theirs = confirmed[confirmed["config_rank"] == 1].sort_values("seed")
    assert list(mine["config_rank"]) == [1, 1] and list(mine["seed"]) == [1, 2]
    assert list(mine["best.dev.accuracy"]) == pytest.approx(list(theirs["best.dev.accuracy"]))
    refused = cli.invoke(app, ["confirm", str(alone), "--address", cluster.address])
    assert refused.exit_code == 2  # rich wraps the message at the terminal's width
    assert "not a sweep's results folder" in " ".join(refused.output.split())

    ablation = tmp_path / "ablate-alone"
    # the study takes its recipe from the confirmation (the winner, or the spec as written when
    # the winner is not shown at least as good): so does kdray ablate given that folder
    args = ["--from-sweep", str(out / "confirm"), "--out", str(ablation)]
    args += ["--set", "ablation.design=leave_one_out"]  # the study's default; ablate's is grid
    done = cli.invoke(app, ["ablate", str(spec_file), *args, "--address", cluster.address])
    assert done.exit_code == 0, done.output[-3000:]
    assert "2 cells x 2 seeds = 4 adaptive seeds, first round" in done.output
    assert "init=random: 2 seeds, " in done.output  # seeds per cell and why it stopped
    mine = pd.read_parquet(ablation / "trials.parquet")
    theirs = pd.read_parquet(out / "ablation" / "trials.parquet")
    key = ["cell", "seed"]
    merged = mine.merge(theirs, on=key, suffixes=("", ".study"))
    assert len(merged) == len(mine) == len(theirs) == 4
    assert list(merged["best.dev.accuracy"]) == pytest.approx(
        list(merged["best.dev.accuracy.study"])
    )


@pytest.mark.parametrize(
    ("cpu", "gpu", "max_concurrent", "nodes", "free", "expected"),
    [
        (1, 0, 2, [2.0], 2.0, 2.0),  # two 1-CPU trials to come: the teacher gets both cores
        (1, 0, 2, [1.0, 1.0], 2.0, 1.0),  # no node has two: it must still be placed
        (2, 0, 1, [2.0], 2.0, 2.0),  # one 2-CPU trial: the same as a trial
        (0.5, 0, 4, [16.0], 16.0, 2.0),
        (1, 0, 8, [16.0], 3.0, 3.0),  # other jobs hold 13 CPUs: what is free
        (
            4,
            0,
            2,
            [2.0],
            2.0,
            4.0,
        ),  # never fewer than one trial's (the pre-flight check says it fits)
        (4, 1, 8, [32.0], 32.0, 4.0),  # on a GPU the CPUs do not train it: one trial's
    ],
)
def test_the_teacher_task_gets_the_cpus_of_all_concurrent_trials_that_a_node_can_give(
    cpu: float, gpu: float, max_concurrent: int, nodes: list[float], free: float, expected: float
) -> None:
    assert setup_cpus(cpu, gpu, max_concurrent, nodes, free) == expected


def test_the_trials_table_is_written_after_the_epochs_it_stands_for(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill between two table writes must never leave a trial's row without its epochs (a
    resumed experiment does not run an ended trial again to report them)."""
    from kdray.analysis import results
    from kdray.experiments.sweep import TableWriter

    writer = TableWriter(spec_from_dict(tiny_spec_dict(tiny_bert)), tmp_path, teacher=None)
    writer.rows = {"t1": {"trial_id": "t1", "status": "ok"}}
    writer.epoch_rows = {("t1", 1): {"trial_id": "t1", "epoch": 1}}
    writer.cka = {"t1": [{"trial_id": "t1", "student_layer": 1}]}
    written: list[str] = []
    monkeypatch.setattr(results, "write_table", lambda rows, path: written.append(path.name))
    writer.write()
    assert written == [results.CKA_FILE, results.EPOCHS_FILE, results.TRIALS_FILE]


class _EndedTrial:
    """What Tune's clean-up hands ``on_experiment_end``: every trial TERMINATED in memory."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id, self.status, self.config, self.num_failures = trial_id, "TERMINATED", {}, 0


def test_a_trial_cut_off_by_ctrl_c_is_unfinished_though_tune_marks_it_terminated(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """Cut off: started in this run, never completed (its row must not say pruned, or a resume
    from the tables would keep it as ended). Restored: TERMINATED before this run started."""
    from kdray.experiments.sweep import TableWriter

    writer = TableWriter(spec_from_dict(tiny_spec_dict(tiny_bert)), tmp_path, teacher=None)
    cut, unreported, restored = _EndedTrial("cut"), _EndedTrial("unreported"), _EndedTrial("old")
    writer.on_trial_start(0, [], cut)
    writer.on_trial_result(0, [], cut, {"epoch": 1, "dev.accuracy": 0.5, "status": "running"})
    writer.on_trial_start(0, [], unreported)
    writer.on_experiment_end([cut, unreported, restored])
    status = pd.read_parquet(tmp_path / "trials.parquet").set_index("trial_id")["status"]
    assert status.to_dict() == {"cut": "interrupted", "old": "pruned", "unreported": "pending"}


#: What Ray Client's proxy answers when the per-client server it starts dies: its own message,
#: or the traceback of its check of the new process (seen in CI: ray-project/ray#63202).
SERVER_DIED = (
    "Initialization failure from server:\nRuntimeError: Starting Ray client server "
    "failed. See ray_client_server_23000.err for detailed logs."
)
SERVER_ZOMBIE = (
    "Initialization failure from server:\nTraceback (most recent call last):\n  File "
    '"ray/util/client/server/proxier.py", line 765, in Datapath\n    if not '
    'self.proxy_manager.start_specific_server(\n  File "psutil/_pslinux.py", line 1648, in '
    "_raise_if_zombie\npsutil.ZombieProcess: PID still exists but it's a zombie (pid=5700)"
)


def _flaky_client(failures: int, calls: list[str], message: str = SERVER_DIED) -> Any:
    """A stand-in for ``ray.init`` whose first ``failures`` calls fail as Ray Client's proxy
    does when the per-client server it starts dies."""

    def init(address: str, **_: Any) -> None:
        calls.append(address)
        if len(calls) <= failures:
            raise ConnectionAbortedError(message)

    return init


@pytest.mark.parametrize("message", [SERVER_DIED, SERVER_ZOMBIE])
def test_ray_client_is_tried_again_when_its_server_fails_to_start(
    monkeypatch: Any, message: str
) -> None:
    from kdray.experiments import sweep

    calls: list[str] = []
    monkeypatch.setattr(sweep.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(sweep.ray, "shutdown", lambda: None)
    monkeypatch.setattr(sweep.ray, "init", _flaky_client(2, calls, message))
    monkeypatch.setattr(sweep, "CLIENT_RETRY_SECONDS", 0.0)
    assert sweep.init_ray("ray://10.0.0.1:10001") is False
    assert calls == ["ray://10.0.0.1:10001"] * 3  # two failures, then joined


def test_ray_client_gives_up_after_its_retries_and_a_plain_address_at_once(
    monkeypatch: Any,
) -> None:
    from kdray.experiments import sweep

    monkeypatch.setattr(sweep.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(sweep.ray, "shutdown", lambda: None)
    monkeypatch.setattr(sweep, "CLIENT_RETRY_SECONDS", 0.0)
    calls: list[str] = []
    monkeypatch.setattr(sweep.ray, "init", _flaky_client(10, calls))
    with pytest.raises(ConnectionAbortedError, match="client server failed"):
        sweep.init_ray("ray://10.0.0.1:10001")
    assert len(calls) == 1 + sweep.CLIENT_RETRIES
    calls.clear()  # a GCS address is not Ray Client: its failure is not this flake
    with pytest.raises(ConnectionAbortedError):
        sweep.init_ray("10.0.0.1:6379")
    assert calls == ["10.0.0.1:6379"]
    calls.clear()  # a refusal that would hold again (here a bad runtime_env) is not retried
    refused = "Initialization failure from server:\nValueError: bad runtime_env"
    monkeypatch.setattr(sweep.ray, "init", _flaky_client(10, calls, refused))
    with pytest.raises(ConnectionAbortedError, match="bad runtime_env"):
        sweep.init_ray("ray://10.0.0.1:10001")
    assert calls == ["ray://10.0.0.1:10001"]


@pytest.mark.parametrize(
    ("time", "column"), [("epoch", "epoch"), (RUNG_TIME, "classifier_epochs")]
)  # a teacher search's time, a sweep's (classifier-trained epochs, a column of the epochs table)
def test_a_scheduler_told_the_kept_trials_prunes_a_new_trial_below_their_rung(
    time: str, column: str
) -> None:
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from kdray.experiments.plan import OBJECTIVE
    from kdray.experiments.sweep import _tell_scheduler

    asha = ASHAScheduler(
        time_attr=time, metric=OBJECTIVE, mode="max", max_t=4, grace_period=1, reduction_factor=2
    )
    kept = [{"trial_id": t} for t in ("a", "b", "c", "d")]
    scores = {"a": [0.5, 0.55], "b": [0.6, 0.7], "c": [0.7, 0.72], "d": []}  # d: no epoch
    epochs = [
        {"trial_id": t, "epoch": e + 1, column: e + 1, "best.dev.accuracy": v}
        for t, values in scores.items()
        for e, v in enumerate(values)
    ]
    _tell_scheduler(asha, kept, epochs, "best.dev.accuracy", (time, column))
    # rung 1 holds 0.5, 0.6, 0.7: with reduction 2 its cutoff is their median, 0.6
    new, other = SimpleNamespace(trial_id="e"), SimpleNamespace(trial_id="f")
    for trial in (new, other):
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, new, {time: 1, OBJECTIVE: 0.59}) == TrialScheduler.STOP
    assert asha.on_trial_result(None, other, {time: 1, OBJECTIVE: 0.61}) == "CONTINUE"
    # rung 2 holds 0.55, 0.7, 0.72 (cutoff 0.7)
    assert asha.on_trial_result(None, other, {time: 2, OBJECTIVE: 0.69}) == TrialScheduler.STOP


def test_a_sweep_whose_ray_state_is_lost_goes_on_from_its_tables(
    cluster: Any, tiny_bert: Path, tmp_path: Path
) -> None:
    """The folder without ``ray/`` and the Optuna journal, its last trial cut off: the ended
    trial is kept as it was, and the seeded searcher, told it, proposes the cut-off trial's
    conditional configuration again rather than its own first proposal."""
    spec_dict = sweep_spec(tiny_bert, "lost")
    spec_dict["tune"].update({"num_samples": 2, "max_concurrent": 1, "scheduler": {"fifo": {}}})
    spec = spec_from_dict(spec_dict)
    out = tmp_path / "out"
    whole = run_sweep(spec, out_dir=out, address=cluster.address).trials
    assert list(whole["status"]) == ["ok", "ok"]
    # the table is in trial-id order: which row Optuna proposed second, from its journal
    proposed = _study_proposals(out, "lost")
    second = int(whole.index[whole["param.train.lr"] == proposed[1]["train.lr"]][0])
    shutil.rmtree(out / "ray")
    (out / OPTUNA_JOURNAL).unlink()
    params = [c for c in whole if c.startswith("param.")]
    cut = whole.copy()
    cut.loc[second, "status"] = "interrupted"
    cut.to_parquet(out / "trials.parquet")
    resumed = run_sweep(spec, out_dir=out, address=cluster.address, resume=True).trials
    assert list(resumed["status"]) == ["ok", "ok"]
    first = whole["trial_id"][1 - second]
    pd.testing.assert_series_equal(  # kept as it was
        resumed.set_index("trial_id").loc[first], whole.set_index("trial_id").loc[first]
    )
    again = resumed[resumed["trial_id"] != first]
    assert again["trial_id"].item() != whole["trial_id"][second]  # ran again, as a new trial
    assert again[params].to_dict("records") == whole.loc[[second], params].to_dict("records")
    epochs = pd.read_parquet(out / "epochs.parquet")
    assert sorted(epochs["trial_id"].unique()) == sorted(resumed["trial_id"])


def test_tpe_samples_at_random_for_the_start_up_the_spec_gives(tiny_bert: Path) -> None:
    import optuna

    from kdray.experiments.plan import OptunaSpace
    from kdray.experiments.sweep import make_searcher

    def proposals(startup: int | None) -> list[float]:
        spec_dict = sweep_spec(tiny_bert, "startup")
        spec_dict["search"] = {"train.lr": {"loguniform": [1e-4, 1e-3]}}
        if startup is not None:
            spec_dict["tune"]["searcher"]["optuna"]["n_startup_trials"] = startup
        spec = spec_from_dict(spec_dict)
        sampler = make_searcher(spec).searcher._sampler  # the Optuna sampler Ray's searcher uses
        study = optuna.create_study(sampler=sampler, direction="maximize")
        lrs = []
        for _ in range(5):
            trial = study.ask()
            OptunaSpace(spec)(trial)
            lrs.append(trial.params["train.lr"])
            study.tell(trial, -abs(math.log(trial.params["train.lr"] / 3e-4)))  # best at 3e-4
        return lrs

    default, two = proposals(None), proposals(2)
    assert default[:2] == two[:2]  # the same seeded random start
    assert default[2:] != two[2:]  # from the third trial on, TPE models the results (startup 2)
    with pytest.raises(SpecError, match="n_startup_trials is a setting of the tpe sampler"):
        spec_dict = sweep_spec(tiny_bert, "random")
        spec_dict["tune"]["searcher"]["optuna"] = {"sampler": "random", "n_startup_trials": 2}
        spec_from_dict(spec_dict)
