"""kdray teacher --search: what may be searched, which trial wins, the seeds that confirm it,
and the whole command on the session's Ray cluster with a tiny teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_spec_dict
from kdray.cli import app
from kdray.experiments import teacher_search as ts
from kdray.spec import parse_overrides, spec_from_dict
from kdray.training.teacher import teacher_settings


def _spec(model: Path, search: dict[str, Any]) -> Any:
    raw = tiny_spec_dict(model, name="ts")
    raw["search"] = search
    return spec_from_dict(raw)


def _search_command(
    model: Path, tmp_path: Path, cluster: Any, name: str, search: dict, tune: dict
) -> tuple[Path, Path, list[str]]:
    """A 2-epoch tiny teacher search's spec file, results folder and ``kdray teacher --search``
    arguments on the session's cluster (1 CPU a trial, the teacher cache in ``tmp_path``)."""
    raw = tiny_spec_dict(model, name=name, teacher={"epochs": 2})
    raw["data"]["cache_dir"] = str(tmp_path / "cache")
    raw["search"] = search
    raw["tune"] = {**tune, "resources": {"cpu": 1}}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "found"
    args = ["teacher", str(spec_file), "--search", "--out", str(out), "--address", cluster.address]
    return spec_file, out, args


def test_only_teacher_settings_and_the_length_may_be_searched(tiny_bert: Path) -> None:
    assert ts.search_problems(_spec(tiny_bert, {"teacher.lr": {"loguniform": [1e-5, 1e-4]}})) == []
    problems = ts.search_problems(_spec(tiny_bert, {"train.lr": {"loguniform": [1e-5, 1e-4]}}))
    assert len(problems) == 1 and "train.lr cannot be searched for the teacher" in problems[0]


def test_the_best_trial_wins_by_its_best_dev_score_pruned_ones_included() -> None:
    trials = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d"],
            "status": ["ok", "pruned", "error", "ok"],
            "best.dev.accuracy": [0.60, 0.64, 0.90, 0.62],
            "param.teacher.lr": [1e-5, 3e-5, 1e-4, 5e-5],
        }
    )
    # c errored: its score does not count; b was stopped early by ASHA but is the best so far
    assert ts.best_settings(trials, "accuracy") == {"teacher.lr": 3e-5}
    with pytest.raises(ValueError, match="nothing to confirm"):
        ts.best_settings(trials[trials["status"] == "error"], "accuracy")


def test_teacher_md_names_the_trials_tied_at_the_best_score(tiny_bert: Path) -> None:
    spec = _spec(tiny_bert, {"teacher.lr": {"loguniform": [1e-5, 1e-4]}})
    confirm = pd.DataFrame(
        {"seed": [1, 2], "dev.accuracy": [0.6, 0.62], "teacher_id": ["x", "y"], "path": [".", "."]}
    )

    def report(scores: list[float]) -> str:
        trials = pd.DataFrame(
            {
                "trial_id": ["b", "a", "c"],
                "status": ["ok", "pruned", "ok"],
                "best.dev.accuracy": scores,
                "param.teacher.lr": [1e-5, 3e-5, 5e-5],
            }
        )
        return ts.teacher_markdown(spec, trials, confirm, "accuracy")

    tied = report([0.64, 0.64, 0.60])
    assert "- 2 trials tie at the best score (`a`, `b`): the first by id is confirmed" in tied
    assert "`teacher.lr=3e-05`" in tied  # a's settings
    assert "tie" not in report([0.64, 0.63, 0.60])


def test_the_confirmation_runs_the_best_settings_with_fresh_seeds(tiny_bert: Path) -> None:
    spec = _spec(tiny_bert, {"teacher.lr": {"loguniform": [1e-5, 1e-4]}})
    specs = ts.confirm_specs(spec, {"teacher.lr": 3e-5, "teacher.seed": 7}, (1, 2, 3))
    assert [s.teacher.seed for s in specs] == [1, 2, 3]  # the search's own seed is not reused
    assert {s.teacher.lr for s in specs} == {3e-5}


def test_the_seeds_spread_is_a_t_interval_by_hand() -> None:
    confirm = pd.DataFrame({"seed": [1, 2, 3], "dev.accuracy": [0.60, 0.62, 0.64]})
    found = ts.spread(confirm, "accuracy")
    # mean 0.62, sd 0.02, se 0.02 / sqrt(3); t(0.975, 2) = 4.302653
    half = 4.302653 * 0.02 / 3**0.5
    assert found["mean"] == pytest.approx(0.62)
    assert found["sd"] == pytest.approx(0.02)
    assert (found["low"], found["high"]) == pytest.approx((0.62 - half, 0.62 + half), abs=1e-6)


def test_teacher_search_finds_confirms_and_caches_the_best_teacher(
    cluster: Any, tiny_bert: Path, tmp_path: Path
) -> None:
    tune = {
        "num_samples": 1,
        "searcher": {"grid": {}},
        "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}},
        "max_concurrent": 2,
    }
    search = {"teacher.lr": {"grid": [1e-3, 1e-4]}}
    spec_file, out, args = _search_command(tiny_bert, tmp_path, cluster, "ts", search, tune)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]
    trials = pd.read_parquet(out / ts.SEARCH_FILE)
    assert sorted(trials["param.teacher.lr"]) == [1e-4, 1e-3]
    assert set(trials["status"]) <= {"ok", "pruned"} and trials["best.dev.accuracy"].notna().all()
    epochs = pd.read_parquet(out / "epochs.parquet")
    assert set(epochs["trial_id"]) == set(trials["trial_id"])
    confirm = pd.read_parquet(out / ts.CONFIRM_FILE)
    assert list(confirm["seed"]) == [1, 2, 3] and confirm["teacher_id"].is_unique
    # the confirmation says what it runs, and each seed as it ends (a background log shows it)
    logged = " ".join(result.output.split())
    assert "confirming teacher.lr=" in logged and "with teacher seeds 1, 2, 3" in logged
    for row in confirm.to_dict("records"):
        assert f"confirmation seed {row['seed']}: dev accuracy {row['dev.accuracy']:.4f}" in logged
    best_lr = ts.best_settings(trials, "accuracy")["teacher.lr"]
    for row in confirm.to_dict("records"):  # each one a teacher in the cache, like any other
        info = json.loads((Path(row["path"]) / "teacher.json").read_text())
        assert (info["settings"]["lr"], info["settings"]["seed"]) == (best_lr, row["seed"])
    text = (out / ts.TEACHER_REPORT).read_text()
    assert "Selection bias" in text and f"--set teacher.lr={best_lr}" in text
    # the settings TEACHER.md gives find that cached teacher: nothing is fine-tuned again
    chosen = confirm.sort_values(["dev.accuracy", "seed"], ascending=[False, True]).iloc[0]
    again = CliRunner().invoke(
        app,
        ["teacher", str(spec_file), "--set", f"teacher.lr={best_lr}",
         "--set", f"teacher.seed={chosen['seed']}"],
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert f"teacher {chosen['teacher_id']}" in again.output


def test_layer_decay_gives_the_head_the_full_rate_and_each_lower_layer_less(
    tiny_bert: Path,
) -> None:
    from kdray.training import engine, models

    model = models.load_classifier(str(tiny_bert), 2)  # 4 encoder layers
    scale = models.layer_lr_scale(model, 0.5)
    assert scale("classifier.weight") == 1.0 and scale("bert.pooler.dense.weight") == 1.0
    assert scale("bert.encoder.layer.3.attention.self.query.weight") == 0.5  # the top layer
    assert scale("bert.encoder.layer.0.output.dense.bias") == 0.5**4
    assert scale("bert.embeddings.word_embeddings.weight") == 0.5**5
    optimizer = engine.make_optimizer([model], 1e-3, 0.01, scale)
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert rates[id(named["bert.embeddings.word_embeddings.weight"])] == pytest.approx(1e-3 / 32)
    assert rates[id(named["classifier.weight"])] == pytest.approx(1e-3)
    plain = engine.make_optimizer([model], 1e-3, 0.01)  # without: the two groups as always
    assert [g["lr"] for g in plain.param_groups] == [1e-3, 1e-3]


def test_a_setting_added_later_changes_no_fingerprint_or_teacher_key_at_its_default(
    tiny_bert: Path,
) -> None:
    from kdray.infra.store import content_hash
    from kdray.spec import LATER_SETTINGS
    from kdray.training import teacher

    base = spec_from_dict(tiny_spec_dict(tiny_bert))
    later = ("teacher.layer_decay", "teacher.pooling", "data.source", "train.compile")
    assert set(later) == set(LATER_SETTINGS)
    # the fingerprint a spec had before these existed: its flat settings without them
    flat = {k: v for k, v in base.flat().items() if k not in ("name", *later)}
    assert base.fingerprint() == content_hash({**flat, "teacher.cache.verify": "sizes"}, 16)
    for key, value in (("teacher.layer_decay", 0.8), ("teacher.pooling", "mean")):
        changed = base.with_values({key: value})
        assert changed.fingerprint() != base.fingerprint()
        name = key.split(".")[1]
        assert name not in teacher.teacher_settings(base, "data")
        assert teacher.teacher_settings(changed, "data")[name] == value
    compiled = base.with_values({"train.compile": True})  # a student setting: no teacher key
    assert compiled.fingerprint() != base.fingerprint()
    assert teacher.teacher_settings(compiled, "data") == teacher.teacher_settings(base, "data")


def test_a_teacher_fine_tuned_with_layer_decay_is_cached_under_its_own_key(
    tiny_bert: Path, tmp_path: Path, one_thread: Any
) -> None:
    from kdray.training.teacher import ensure_teacher

    raw = tiny_spec_dict(tiny_bert, teacher={"layer_decay": 0.8})
    raw["data"]["cache_dir"] = str(tmp_path / "cache")
    info = ensure_teacher(spec_from_dict(raw))
    assert info.settings["layer_decay"] == 0.8
    plain = ensure_teacher(spec_from_dict({**raw, "teacher": {**raw["teacher"], "layer_decay": 1}}))
    assert plain.id != info.id


def test_an_interrupted_teacher_search_confirms_nothing_and_says_how_to_continue(
    cluster: Any, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from kdray.experiments import sweep

    raw = tiny_spec_dict(tiny_bert, name="cut", teacher={"epochs": 2})
    raw["search"] = {"teacher.lr": {"loguniform": [1e-4, 1e-3]}}
    raw["tune"] = {"num_samples": 3, "scheduler": {"fifo": {}}, "resources": {"cpu": 1}}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))

    # what Tune tells the callbacks until a Ctrl-C: trial a ended, b was cut off mid-way, and
    # Tune's clean-up marks both TERMINATED
    def fit(spec: Any, out: Path, live: list[Any]) -> None:
        everyone = [sweep.TeacherTables(spec, out), *live]
        a, b = (SimpleNamespace(trial_id=t, config={"teacher.lr": 1e-4}, status="RUNNING")
                for t in "ab")  # fmt: skip
        for trial, epochs in ((a, 2), (b, 1)):
            for callback in everyone:
                callback.on_trial_start(0, [], trial)
                for epoch in range(1, epochs + 1):
                    result = {"epoch": epoch, "best.dev.accuracy": 0.6, "best_epoch": 1,
                              "lr": 1, "dev.accuracy": 0.6, "objective": 0.6}  # fmt: skip
                    callback.on_trial_result(0, [], trial, result)
        for callback in everyone:
            callback.on_trial_complete(0, [], a)
        a.status = b.status = "TERMINATED"
        for callback in everyone:
            callback.on_experiment_end([a, b])

    def tuner(spec: Any, out: Path, *args: Any) -> Any:
        return SimpleNamespace(fit=lambda: fit(spec, out, args[-1]))

    monkeypatch.setattr(sweep, "_teacher_tuner", tuner)
    out = tmp_path / "cut"
    args = ["teacher", str(spec_file), "--search", "--out", str(out), "--address", cluster.address]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output[-3000:]
    words = " ".join(result.output.split())
    assert "teacher search interrupted: 1 of 3 trials ended, nothing confirmed yet" in words
    assert "--resume" in words
    assert "cut: trials (accuracy)" in words  # the live trials table, as a sweep shows it
    trials = pd.read_parquet(out / ts.SEARCH_FILE)
    assert dict(zip(trials["trial_id"], trials["status"], strict=True)) == {
        "a": "ok", "b": "interrupted"
    }  # fmt: skip
    assert list(trials["epochs_run"]) == [2, 1] and list(trials["param.teacher.lr"]) == [1e-4] * 2
    epochs = pd.read_parquet(out / "epochs.parquet")
    assert list(zip(epochs["trial_id"], epochs["epoch"], strict=True)) == [
        ("a", 1), ("a", 2), ("b", 1)
    ]  # fmt: skip
    assert "lr" not in epochs  # the dev metrics and the best so far only
    assert not (out / ts.CONFIRM_FILE).exists() and not (out / ts.TEACHER_REPORT).exists()


def test_a_teacher_search_whose_ray_state_is_lost_goes_on_from_its_tables(
    cluster: Any, tiny_bert: Path, tmp_path: Path
) -> None:
    """The folder without ``ray/`` and the Optuna journal (copied to another machine, a lost
    disk), its last trial cut off: the ended trial is kept as it was, and the seeded searcher,
    told it, proposes for the rest what the uninterrupted search did."""
    tune = {
        "num_samples": 2,
        "searcher": {"optuna": {"sampler": "tpe", "seed": 0}},
        "scheduler": {"fifo": {}},
        "max_concurrent": 1,
    }
    search = {"teacher.lr": {"loguniform": [1e-4, 1e-3]}}
    _, out, args = _search_command(tiny_bert, tmp_path, cluster, "lost", search, tune)
    assert (first := CliRunner().invoke(app, args)).exit_code == 0, first.output[-3000:]
    whole = pd.read_parquet(out / ts.SEARCH_FILE)
    assert list(whole["status"]) == ["ok", "ok"]
    shutil.rmtree(out / "ray")
    (out / "optuna.journal").unlink()
    cut = whole.copy()
    cut.loc[1, "status"] = "interrupted"
    cut.to_parquet(out / ts.SEARCH_FILE)
    epochs = pd.read_parquet(out / "epochs.parquet")
    epochs[~((epochs["trial_id"] == whole["trial_id"][1]) & (epochs["epoch"] == 2))].to_parquet(
        out / "epochs.parquet"
    )
    again = CliRunner().invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output[-3000:]
    resumed = pd.read_parquet(out / ts.SEARCH_FILE)
    assert list(resumed["status"]) == ["ok", "ok"]
    pd.testing.assert_series_equal(resumed.iloc[0], whole.iloc[0])  # kept as it was
    assert resumed["trial_id"][1] != whole["trial_id"][1]  # ran again, as a new trial
    assert resumed["param.teacher.lr"][1] == whole["param.teacher.lr"][1]
    assert sorted(pd.read_parquet(out / "epochs.parquet")["epoch"]) == [1, 1, 2, 2]
    assert len(pd.read_parquet(out / ts.CONFIRM_FILE)) == 3


def test_teacher_md_use_line_sets_what_keys_the_teacher_so_another_spec_finds_it(
    tiny_bert: Path,
) -> None:
    # The search held epochs, batch and length fixed at values another spec does not share:
    # the --set options must carry them, or that spec fine-tunes a different teacher.
    spec = _spec(tiny_bert, {"teacher.lr": {"loguniform": [1e-5, 1e-4]}}).with_values(
        {"teacher.epochs": 5, "teacher.batch_size": 16, "data.max_seq_length": 40}
    )
    trials = pd.DataFrame(
        {
            "trial_id": ["a"],
            "status": ["ok"],
            "best.dev.accuracy": [0.7],
            "param.teacher.lr": [3e-5],
        }
    )
    confirm = pd.DataFrame(
        {"seed": [1, 2], "dev.accuracy": [0.6, 0.62], "teacher_id": ["x", "y"], "path": [".", "."]}
    )
    settings = ts.best_settings(trials, "accuracy")
    text = ts.teacher_markdown(spec, trials, confirm, "accuracy")
    line = next(row for row in text.splitlines() if row.startswith("Use it"))
    options = parse_overrides(line.split("`")[1].split(" --set ")[1:])
    other = _spec(tiny_bert, {}).with_values(
        {"teacher.epochs": 2, "teacher.batch_size": 8, "data.max_seq_length": 64}
    )
    chosen = ts.confirm_specs(spec, settings, [2])[0]  # seed 2 scored best
    assert teacher_settings(other.with_values(options), "fp") == teacher_settings(chosen, "fp")
    assert "--set teacher.max_grad_norm=1.0" in line
