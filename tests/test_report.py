"""Ablation statistics against hand-computed values, sweep tables, fANOVA, plots and the report."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kdray.analysis import plots as P
from kdray.analysis import report as R

SOFT, SID, PID = "distill.algorithm=soft", "distill.algorithm=sid", "distill.algorithm=pid"
# best dev accuracy per cell and seed. pid has seed 4 instead of 3: only seeds 1, 2 pair.
ACCURACY = {
    "soft": {1: 0.70, 2: 0.72, 3: 0.74},
    "sid": {1: 0.71, 2: 0.74, 3: 0.80},
    "pid": {1: 0.73, 2: 0.71, 4: 0.99},
}
TEACHER = 0.80


def _row(algorithm: str, seed: int, accuracy: float, **extra: object) -> dict[str, object]:
    return {
        "name": "ablation",
        "trial_id": f"{algorithm}-s{seed}",
        "status": "ok",
        "error": None,
        "task": "rte",
        "distill.algorithm": algorithm,
        "distill.layer_map": "skip",
        "train.seed": seed,
        "train.lr": 2e-5,
        "metric": "accuracy",
        "best.dev.accuracy": accuracy,
        "best.dev.f1": accuracy - 0.1,
        "best_epoch": 3,
        "epochs_run": 4,
        "wall_time": 10.0,
        "student_params": 1000,
        "teacher_params": 2000,
        "teacher.id": "teacher-a",
        "teacher.dev.accuracy": TEACHER,
        "teacher.dev.f1": 0.70,
        "diag.cka.mean": 0.5 + seed / 10,
        "diag.agreement": 0.9,
        "cell": f"distill.algorithm={algorithm}",
        "seed": seed,
        **extra,
    }


@pytest.fixture
def ablation() -> pd.DataFrame:
    rows = [_row(a, s, v) for a, per_seed in ACCURACY.items() for s, v in per_seed.items()]
    # A failed sid run: counted as failed, never averaged.
    failed = _row("sid", 5, float("nan"), status="failed", error="boom")
    return pd.DataFrame(rows + [failed])


# ---------------------------------------------------------------------------------------------
# cell_summary


def test_cell_summary_matches_hand_computed_values(ablation: pd.DataFrame) -> None:
    summary = R.cell_summary(ablation)
    assert list(summary["cell"]) == [SOFT, SID, PID]  # grid order kept
    soft = summary.set_index("cell").loc[SOFT]
    sid = summary.set_index("cell").loc[SID]
    assert soft["accuracy.mean"] == pytest.approx(0.72)
    assert soft["accuracy.std"] == pytest.approx(0.02)  # ddof=1: sqrt((.02^2 + 0 + .02^2) / 2)
    assert sid["accuracy.mean"] == pytest.approx(0.75)
    assert sid["accuracy.std"] == pytest.approx(math.sqrt((0.04**2 + 0.01**2 + 0.05**2) / 2))
    assert soft["accuracy.ci95"] == pytest.approx(4.302652729911275 * 0.02 / math.sqrt(3))
    assert int(sid["n"]) == 3 and int(sid["n_failed"]) == 1 and int(soft["n_failed"]) == 0
    assert int(sid["n_pruned"]) == 0
    assert soft["teacher.accuracy"] == pytest.approx(TEACHER)
    assert soft["retention.accuracy"] == pytest.approx(90.0)
    assert sid["retention.accuracy"] == pytest.approx(93.75)
    assert sid["f1.mean"] == pytest.approx(0.65)
    assert int(soft["student_params"]) == 1000
    assert soft["diag.cka.mean"] == pytest.approx(0.7)  # seeds 1, 2, 3
    assert sid["diag.agreement"] == pytest.approx(0.9)
    assert "diag.attention_kl.mean" not in summary.columns  # not recorded by these runs
    assert list(summary.columns[:4]) == ["cell", "n", "n_pruned", "n_failed"]


def test_cell_summary_selected_metrics_and_grouping_by_algorithm(ablation: pd.DataFrame) -> None:
    summary = R.cell_summary(ablation.drop(columns=["cell"]), metrics=["accuracy"])
    assert summary.columns[0] == "distill.algorithm"
    assert "f1.mean" not in summary.columns
    assert summary.set_index("distill.algorithm").loc["pid", "accuracy.mean"] == pytest.approx(
        (0.73 + 0.71 + 0.99) / 3
    )
    with pytest.raises(ValueError, match="metrics present"):
        R.cell_summary(ablation, metrics=["matthews"])


# ---------------------------------------------------------------------------------------------
# paired_comparison


def _t_p_df2(d: np.ndarray) -> float:
    """Paired t-test p for 3 pairs by hand: with 2 d.o.f. F(t) = 1/2 + t / (2 sqrt(2 + t^2))."""
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    return 1.0 - abs(t) / math.sqrt(2.0 + t * t)


def test_paired_comparison_matches_hand_computed_values(ablation: pd.DataFrame) -> None:
    comparison = R.paired_comparison(ablation, SOFT, "accuracy", n_boot=2000, seed=0)
    assert list(comparison["cell"]) == [SID, PID]  # the baseline is not compared with itself
    sid = comparison.set_index("cell").loc[SID]
    diffs = np.array([0.01, 0.02, 0.06])
    assert sid["baseline"] == SOFT
    assert int(sid["n_pairs"]) == 3
    assert sid["mean_diff"] == pytest.approx(0.03)
    assert sid["mean"] == pytest.approx(0.75) and sid["baseline_mean"] == pytest.approx(0.72)
    assert sid["p_ttest"] == pytest.approx(_t_p_df2(diffs), rel=1e-6)
    assert sid["p_ttest"] == pytest.approx(0.18847, abs=1e-4)
    # Three positive differences: of the 2^3 sign patterns, all + and all - are as extreme.
    assert sid["p_signflip"] == pytest.approx(0.25)
    # t-interval by hand: sd sqrt(0.0007), se sd / sqrt(3), t(0.975, 2) = 4.302653
    half = 4.302653 * math.sqrt(0.0007) / math.sqrt(3)
    assert (sid["ci_low"], sid["ci_high"]) == (
        pytest.approx(0.03 - half, rel=1e-5),
        pytest.approx(0.03 + half, rel=1e-5),
    )
    # not the min-max of the three differences a percentile bootstrap gave (a ~75 % interval)
    assert sid["ci_low"] < 0.01 and sid["ci_high"] > 0.06
    assert np.isnan(sid["boot_low"]) and np.isnan(sid["boot_high"])  # 3 pairs: no bootstrap


def test_pairing_uses_only_common_seeds(ablation: pd.DataFrame) -> None:
    pid = R.paired_comparison(ablation, SOFT, "accuracy").set_index("cell").loc[PID]
    # Seed 4 (0.99) has no soft partner and soft's seed 3 has no pid partner.
    assert int(pid["n_pairs"]) == 2
    assert pid["mean_diff"] == pytest.approx(((0.73 - 0.70) + (0.71 - 0.72)) / 2)
    assert pid["mean"] == pytest.approx(0.72) and pid["baseline_mean"] == pytest.approx(0.71)
    # 1 d.o.f.: t = 0.5, two-sided p = 1 - 2 atan(t) / pi.
    assert pid["p_ttest"] == pytest.approx(1 - 2 * math.atan(0.5) / math.pi, rel=1e-6)
    assert pid["p_ttest"] == pytest.approx(
        stats.ttest_rel([0.73, 0.71], [0.70, 0.72]).pvalue, rel=1e-9
    )


def test_holm_adjustment_over_cells(ablation: pd.DataFrame) -> None:
    comparison = R.paired_comparison(ablation, SOFT, "accuracy").set_index("cell")
    p_sid, p_pid = comparison.loc[SID, "p_ttest"], comparison.loc[PID, "p_ttest"]
    assert p_sid < p_pid
    assert comparison.loc[SID, "p_ttest_holm"] == pytest.approx(2 * p_sid)
    assert comparison.loc[PID, "p_ttest_holm"] == pytest.approx(max(2 * p_sid, p_pid))


def test_baseline_as_settings_dict(ablation: pd.DataFrame) -> None:
    by_name = R.paired_comparison(ablation, SOFT, "accuracy")
    by_dict = R.paired_comparison(ablation, {"distill.algorithm": "soft"}, "best.dev.accuracy")
    pd.testing.assert_frame_equal(by_name, by_dict)
    with pytest.raises(ValueError, match="exactly one"):
        R.paired_comparison(ablation, {"task": "rte"}, "accuracy")  # every cell matches
    with pytest.raises(ValueError, match="exactly one"):
        R.paired_comparison(ablation, {"distill.algorithm": "idal"}, "accuracy")
    with pytest.raises(ValueError, match="not a cell"):
        R.paired_comparison(ablation, "distill.algorithm=nope", "accuracy")


def test_signflip_p_is_nan_when_undefined(ablation: pd.DataFrame) -> None:
    same = ablation.copy()
    sid = same["cell"] == SID
    same.loc[sid, "best.dev.accuracy"] = same.loc[sid, "seed"].map(ACCURACY["soft"])
    row = R.paired_comparison(same, SOFT, "accuracy").set_index("cell").loc[SID]
    assert row["mean_diff"] == 0 and np.isnan(row["p_signflip"]) and np.isnan(row["p_ttest"])
    one = ablation[~((ablation["cell"] == PID) & (ablation["seed"] == 2))]
    row = R.paired_comparison(one, SOFT, "accuracy").set_index("cell").loc[PID]
    assert int(row["n_pairs"]) == 1
    assert np.isnan(row["p_signflip"]) and np.isnan(row["p_ttest"])
    assert row["ci_low"] == row["ci_high"] == pytest.approx(0.03)


def test_bca_bootstrap_from_ten_pairs_is_deterministic_and_sensible() -> None:
    rng = np.random.default_rng(7)
    n = 30
    base = rng.normal(0.7, 0.05, size=n)
    cell = base + rng.normal(0.02, 0.01, size=n)
    rows = [
        {"cell": c, "seed": s, "status": "ok", "metric": "accuracy", "best.dev.accuracy": v}
        for c, values in (("base", base), ("new", cell))
        for s, v in enumerate(values)
    ]
    trials = pd.DataFrame(rows)

    def ci(seed: int) -> tuple[float, float]:
        row = R.paired_comparison(trials, "base", "accuracy", n_boot=4000, seed=seed).iloc[0]
        return float(row["boot_low"]), float(row["boot_high"])

    assert ci(0) == ci(0)
    assert ci(0) != ci(1)
    diff = cell - base
    half = 1.96 * diff.std(ddof=1) / math.sqrt(n)
    low, high = ci(0)
    assert low < diff.mean() < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.08)  # close to the normal-theory CI


# ---------------------------------------------------------------------------------------------
# Sweeps


@pytest.fixture
def sweep() -> pd.DataFrame:
    """A sweep where accuracy depends on the learning rate only."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        lr = float(10 ** rng.uniform(-5, -3))
        rows.append(
            {
                "name": "sweep",
                "trial_id": f"t{i:02d}",
                "status": "ok" if i != 5 else "failed",
                "distill.algorithm": ["soft", "sid", "pid"][i % 3],
                "distill.layer_map": json.dumps([2, 4]) if i % 2 else "skip",
                "distill.freeze": bool(i % 4 < 2),
                "train.lr": lr,
                "train.batch_size": [16, 32][(i // 2) % 2],
                "train.epochs": 3,
                "data.dir": f"/somewhere/{i}",
                "metric": "accuracy",
                "best.dev.accuracy": 0.9 + 0.1 * math.log10(lr) / 5 if i != 5 else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def test_sweep_summary_and_best_per(sweep: pd.DataFrame) -> None:
    top = R.sweep_summary(sweep, "accuracy", top=5)
    assert len(top) == 5
    assert list(top["accuracy"]) == sorted(sweep["best.dev.accuracy"].dropna(), reverse=True)[:5]
    assert {"train.lr", "distill.algorithm", "train.batch_size"} <= set(top.columns)
    assert (
        "train.epochs" not in top.columns and "data.dir" not in top.columns
    )  # constant / bookkeeping
    low = R.sweep_summary(sweep, "accuracy", mode="min", top=2)
    assert list(low["accuracy"]) == sorted(sweep["best.dev.accuracy"].dropna())[:2]

    best = R.best_per(sweep, "distill.algorithm", "accuracy")
    assert len(best) == 3
    for _, row in best.iterrows():
        rows = sweep[(sweep["distill.algorithm"] == row["distill.algorithm"])]
        assert row["accuracy"] == rows["best.dev.accuracy"].max()
    assert R.best_per(sweep)["accuracy"].max() == sweep["best.dev.accuracy"].max()


def test_parameter_importance_finds_the_one_that_matters(sweep: pd.DataFrame) -> None:
    params = [
        "train.lr",
        "train.batch_size",
        "distill.algorithm",
        "distill.layer_map",
        "distill.freeze",
        "train.epochs",  # constant: left out
    ]
    importance = R.parameter_importance(sweep, params, "accuracy")
    assert list(importance.columns) == ["param", "importance"]
    assert set(importance["param"]) == set(params) - {"train.epochs"}
    assert importance["importance"].sum() == pytest.approx(1.0, abs=1e-6)
    assert importance.iloc[0]["param"] == "train.lr"
    assert importance.iloc[0]["importance"] > 0.8
    # Deterministic (fANOVA seeded).
    pd.testing.assert_frame_equal(importance, R.parameter_importance(sweep, params, "accuracy"))


def test_importance_ranks_the_searched_settings_once_each_never_ray_bookkeeping(
    sweep: pd.DataFrame, tmp_path: Path
) -> None:
    """A resumed sweep's table has node_id (which Ray node ran the trial) and the param.*
    copies of the searched values: before, both were ranked as parameters (lr twice)."""
    resumed = sweep.assign(
        node_id=[f"node{i % 2}" for i in range(len(sweep))], **{"param.train.lr": sweep["train.lr"]}
    )
    folder = _results(resumed, tmp_path / "sweep")
    spec = {"name": "sweep", "task": "rte", "tune": {"metric": "accuracy", "mode": "max"}}
    spec["search"] = {"train.lr": {"loguniform": [1e-5, 1e-3]}, "distill.algorithm": {}}
    (folder / "experiment.json").write_text(json.dumps({"command": "sweep", "spec": spec}))
    built = R.build_report(folder)
    assert sorted(built.importance["param"]) == ["distill.algorithm", "train.lr"]
    assert built.importance.iloc[0]["param"] == "train.lr"
    markdown = built.to_markdown()
    assert "FanovaImportanceEvaluator" in markdown and "rough guess" not in markdown
    few = _results(resumed.head(6), tmp_path / "few")
    (few / "experiment.json").write_text(json.dumps({"command": "sweep", "spec": spec}))
    assert "parameter importance from 5 finished trials is a rough guess" in (
        R.build_report(few).to_markdown()
    )


def test_parameter_importance_distributions(sweep: pd.DataFrame) -> None:
    import optuna.distributions as od

    lr, _ = R._distribution(sweep["train.lr"])
    assert isinstance(lr, od.FloatDistribution) and lr.log
    narrow, _ = R._distribution(pd.Series([0.1, 0.2, 0.5]))
    assert isinstance(narrow, od.FloatDistribution) and not narrow.log
    batch, values = R._distribution(sweep["train.batch_size"])
    assert isinstance(batch, od.IntDistribution) and values[:2] == [16, 16]
    layers, values = R._distribution(sweep["distill.layer_map"])
    assert isinstance(layers, od.CategoricalDistribution)
    assert set(layers.choices) == {"skip", "[2, 4]"}
    freeze, values = R._distribution(sweep["distill.freeze"])
    assert isinstance(freeze, od.CategoricalDistribution) and set(values) == {"True", "False"}
    assert R._distribution(sweep["train.epochs"]) is None


def test_parameter_importance_degenerate_cases(sweep: pd.DataFrame) -> None:
    few = R.parameter_importance(sweep.iloc[3:6], ["train.lr"], "accuracy")  # t05 failed
    assert few.empty and list(few.columns) == ["param", "importance"]
    constant = R.parameter_importance(sweep, ["train.epochs"], "accuracy")
    assert constant.empty
    with pytest.raises(ValueError, match="not columns"):
        R.parameter_importance(sweep, ["train.nope"], "accuracy")


def test_parameter_importance_of_a_sweep_whose_trials_all_score_the_same_is_empty(
    sweep: pd.DataFrame,
) -> None:
    # fANOVA raises "zero total variance" on such a study; a tiny sweep can score 0.4 everywhere
    flat = sweep.assign(**{"best.dev.accuracy": 0.4})
    assert R.parameter_importance(flat, ["train.lr"], "accuracy").empty


# ---------------------------------------------------------------------------------------------
# Learning curves and plots


def _epochs(trials: pd.DataFrame) -> pd.DataFrame:
    """Four epochs per ok run; sid changes stage after epoch 2, soft never does."""
    rows = []
    for _, trial in trials[trials["status"] == "ok"].iterrows():
        sid = trial["distill.algorithm"] == "sid"
        for epoch in range(1, 5):
            stage = (0 if epoch <= 2 else 1) if sid else 0
            rows.append(
                {
                    "name": trial["name"],
                    "trial_id": trial["trial_id"],
                    "epoch": epoch,
                    "stage": stage,
                    "stage_name": f"layer{stage + 1}" if sid else "soft",
                    "lr": 1e-3,
                    "loss.total": 1.0 / epoch,
                    "dev.accuracy": 0.5 + 0.05 * epoch + 0.01 * trial["seed"],
                    "classifier_epochs": epoch,
                    "is_best": epoch == 4,
                }
            )
    return pd.DataFrame(rows)


def test_learning_curves(ablation: pd.DataFrame) -> None:
    epochs = _epochs(ablation)
    curves = R.learning_curves(epochs, ablation, "accuracy")
    assert list(curves.columns[:5]) == ["cell", "epoch", "mean", "std", "n"]
    assert len(curves) == 3 * 4
    soft = curves[curves["cell"] == SOFT].set_index("epoch")
    assert soft.loc[2, "mean"] == pytest.approx(0.6 + 0.02)  # seeds 1, 2, 3
    assert soft.loc[2, "std"] == pytest.approx(0.01)
    assert int(soft.loc[2, "n"]) == 3
    assert not soft["stage_start"].any()
    sid = curves[curves["cell"] == SID].set_index("epoch")
    assert list(sid["stage_start"]) == [False, False, True, False]
    assert sid.loc[3, "stage_name"] == "layer2"
    by_algorithm = R.learning_curves(epochs, ablation, "dev.accuracy", by="distill.algorithm")
    assert set(by_algorithm["distill.algorithm"]) == {"soft", "sid", "pid"}


def _assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def _cka_long(trials: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, trial in trials[trials["status"] == "ok"].iterrows():
        for s in (1, 2):
            for t in (1, 2, 3, 4):
                rows.append(
                    {
                        "trial_id": trial["trial_id"],
                        "student_layer": s,
                        "teacher_layer": t,
                        "cka": max(0.0, 1.0 - 0.2 * abs(2 * s - t)),
                    }
                )
    return pd.DataFrame(rows)


def test_plots_are_written(ablation: pd.DataFrame, tmp_path: Path) -> None:
    _assert_png(P.plot_cells(ablation, "accuracy", tmp_path / "cells.png"))
    _assert_png(P.plot_cells(R.cell_summary(ablation), "accuracy", tmp_path / "summary.png"))
    curves = P.plot_learning_curves(_epochs(ablation), ablation, "accuracy", tmp_path / "lc.png")
    _assert_png(curves)
    cka = _cka_long(ablation).merge(ablation[["trial_id", "distill.algorithm"]], on="trial_id")
    cka = cka.rename(columns={"distill.algorithm": "algorithm"})
    _assert_png(P.plot_cka(cka, tmp_path / "sub" / "cka.png"))


# ---------------------------------------------------------------------------------------------
# Rendering


def _tidy(line: str) -> str:
    """A pipe-table line without tabulate's column padding: ``| a | b |``, ``|:---|---:|``."""
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
    if cells and all(c and set(c) <= set(":-") for c in cells):
        return "|" + "|".join(re.sub("-+", "---", c) for c in cells) + "|"
    return "| " + " | ".join(cells) + " |"


def test_render_markdown_csv_and_table() -> None:
    frame = pd.DataFrame(
        {"cell": ["a|b", "c"], "accuracy.mean": [0.71234, float("nan")], "n": [3, 2]}
    )
    markdown = [_tidy(line) for line in R.render(frame, "markdown").splitlines()]
    assert markdown[0] == "| cell | accuracy.mean | n |"
    assert markdown[1] == "|:---|---:|---:|"
    assert markdown[2] == "| a\\|b | 0.7123 | 3 |"
    assert markdown[3] == "| c |  | 2 |"
    csv = R.render(frame, "csv")
    pd.testing.assert_frame_equal(pd.read_csv(StringIO(csv)), frame)
    table = R.render(frame, "table")
    assert "accuracy.mean" in table and "0.7123" in table and "a|b" in table
    indexed = R.render(frame.set_index("cell"), "markdown")
    assert _tidy(indexed.splitlines()[0]) == "| cell | accuracy.mean | n |"
    with pytest.raises(ValueError, match="fmt"):
        R.render(frame, "html")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# build_report


def test_build_report_on_an_ablation_folder(ablation: pd.DataFrame, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    ablation.to_parquet(results / "trials.parquet", index=False)
    _epochs(ablation).to_parquet(results / "epochs.parquet", index=False)
    _cka_long(ablation).to_parquet(results / "cka.parquet", index=False)

    report = R.build_report(results)
    assert P.draw(report, tmp_path / "out" / "plots") is report.plots
    with pytest.raises(ValueError, match="no trials table to plot"):
        P.draw(dataclasses.replace(report, trials=None), tmp_path / "never")
    assert report.kind == "ablation" and report.metric == "accuracy"
    assert report.baseline == SOFT  # the unique soft-label cell, found by default
    assert report.n_trials == 10 and report.n_ok == 9
    assert list(report.comparison["cell"]) == [SID, PID]
    assert report.summary.equals(R.cell_summary(ablation))
    assert report.teacher.loc[0, "teacher.id"] == "teacher-a"
    assert report.teacher.loc[0, "accuracy"] == pytest.approx(TEACHER)
    assert report.sweep is None and report.importance is None
    assert set(report.plots) == {"cells", "learning_curves", "cka"}
    for plot in report.plots.values():
        _assert_png(plot)

    md_path = tmp_path / "out" / "report.md"
    report.save(md_path)
    text = md_path.read_text()
    for heading in ("## Teacher", "## Cells", "## Paired comparison vs baseline", "## Plots"):
        assert heading in text
    assert "](plots/cells.png)" in text and "](plots/cka.png)" in text
    assert "| distill.algorithm=sid |" in text
    assert "Cells\n=====" in report.render("table")
    assert "# Cells\ncell,n,n_pruned,n_failed" in report.render("csv")

    explicit = R.build_report(results, baseline={"distill.algorithm": "sid"})
    assert explicit.baseline == SID and not explicit.plots


def test_build_report_on_a_sweep_folder(sweep: pd.DataFrame, tmp_path: Path) -> None:
    sweep.to_parquet(tmp_path / "trials.parquet", index=False)
    report = R.build_report(tmp_path)
    P.draw(report, tmp_path / "plots")
    assert report.kind == "sweep" and report.comparison is None
    assert report.sweep is not None and len(report.sweep) == 10
    assert report.best is not None and len(report.best) == 3
    assert report.importance is not None and report.importance.iloc[0]["param"] == "train.lr"
    assert "train.seed" not in set(report.importance["param"])
    assert set(report.plots) == {"cells"}  # no epochs table, no CKA
    text = report.to_markdown()
    assert (
        "## Sweep: best trials" in text
        and "## Parameter importance of the searched settings (fANOVA" in text
    )
    with pytest.raises(FileNotFoundError):
        R.build_report(tmp_path / "missing")


def test_pruned_runs_are_counted_apart_from_failed_ones() -> None:
    trials = pd.DataFrame(
        [
            {"distill.algorithm": "soft", "status": s, "metric": "accuracy", "best.dev.accuracy": v}
            for s, v in (("ok", 0.7), ("pruned", 0.6), ("pruned", 0.5), ("error", float("nan")))
        ]
    )
    row = R.cell_summary(trials).iloc[0]
    assert (int(row["n"]), int(row["n_pruned"]), int(row["n_failed"])) == (1, 2, 1)


# ---------------------------------------------------------------------------------------------
# findings


def _claims_table(idal_gain: float) -> pd.DataFrame:
    """soft, idal and none over 3 seeds; idal's insides are closer to the teacher (higher CKA,
    lower attention KL), 'none' is clearly worse on accuracy."""
    rows = []
    noise = {1: 0.0, 2: 0.004, 3: -0.003}
    for seed in (1, 2, 3):
        base = 0.70 + seed / 100
        rows.append(
            _row("soft", seed, base, **{"diag.cka.mean": 0.6, "diag.attention_kl.mean": 0.5})
        )
        rows.append(
            _row(
                "idal",
                seed,
                base + idal_gain + noise[seed],
                **{"diag.cka.mean": 0.8 + noise[seed], "diag.attention_kl.mean": 0.2},
            )
        )
        rows.append(
            _row("none", seed, base - 0.1 + noise[seed], **{"diag.cka.mean": 0.6 + noise[seed]})
        )
    return pd.DataFrame(rows)


def test_findings_verdicts_follow_the_paired_statistics() -> None:
    trials = _claims_table(idal_gain=0.05)
    table = R.findings(trials, SOFT, "accuracy")
    idal = table.set_index("cell").loc["distill.algorithm=idal"]
    none = table.set_index("cell").loc["distill.algorithm=none"]
    assert idal["accuracy.diff"] == pytest.approx(0.05 + (0.0 + 0.004 - 0.003) / 3)
    assert idal["accuracy.verdict"] == "better"
    assert none["accuracy.verdict"] == "worse"
    # closer to the teacher: CKA up is better, attention KL down is better
    assert idal["cka.mean.verdict"] == "better"
    assert idal["attention_kl.mean.diff"] == pytest.approx(-0.3)
    # the same difference for every seed: t is infinite, p = 0
    assert idal["attention_kl.mean.verdict"] == "better"
    assert none["cka.mean.verdict"] == "unresolved"

    text = R.findings_text(trials, table, SOFT, "accuracy")
    assert "Claim 1" in text and "**held** for distill.algorithm=idal" in text
    # the metric may be named as the CLI and tables name it: the same findings either way
    for name in ("dev.accuracy", "best.dev.accuracy"):
        same = R.findings(trials, SOFT, name)
        assert same.equals(table)
        assert R.findings_text(trials, same, SOFT, name) == text
    assert "cka.mean significantly closer to the teacher in 1 of 1 cells" in text
    claim2 = "Claim 2, internal distillation makes the student's inside closer to the teacher's"
    assert f"{claim2}: **held**" in text


@pytest.mark.parametrize(
    ("gain", "word"), [(0.0, "**unresolved**: every"), (-0.002, "**unresolved**: no internal")]
)
def test_findings_never_call_an_unresolved_claim_refuted(gain: float, word: str) -> None:
    # gain 0: idal ahead by the seed noise's mean (+0.0003); -0.002: behind (-0.0017)
    trials = _claims_table(idal_gain=gain)
    table = R.findings(trials, SOFT, "accuracy")
    assert table.set_index("cell").loc["distill.algorithm=idal", "accuracy.verdict"] == (
        "unresolved"
    )
    text = R.findings_text(trials, table, SOFT, "accuracy")
    assert f"Claim 1, internal distillation beats soft labels on dev accuracy: {word}" in text
    # without any internal-distillation cell the claim is not tested at all
    only_none = trials[trials["distill.algorithm"] != "idal"]
    table = R.findings(only_none, SOFT, "accuracy")
    assert "not tested" in R.findings_text(only_none, table, SOFT, "accuracy")


def test_findings_say_claim_one_did_not_hold_when_a_cell_is_worse_and_none_better() -> None:
    # idal 5 points behind on every seed (worse); pid 0.17 behind on average (unresolved)
    trials = _claims_table(idal_gain=-0.05)
    pid = _claims_table(idal_gain=-0.002)
    pid = pid[pid["distill.algorithm"] == "idal"].assign(
        **{"distill.algorithm": "pid", "cell": PID, "trial_id": lambda f: f["trial_id"] + "-pid"}
    )
    trials = pd.concat([trials, pid], ignore_index=True)
    table = R.findings(trials, SOFT, "accuracy").set_index("cell")
    assert table.loc["distill.algorithm=idal", "accuracy.verdict"] == "worse"
    assert table.loc[PID, "accuracy.verdict"] == "unresolved"
    text = R.findings_text(trials, table.reset_index(), SOFT, "accuracy")
    assert (
        "beats soft labels on dev accuracy: **did not hold**: no internal-distillation cell is "
        "shown better, distill.algorithm=idal is worse (the other unresolved)"
    ) in text
    assert "not shown worse either" not in text


def test_cli_report_prints_tables_and_writes_markdown_and_plots(
    ablation: pd.DataFrame, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from kdray.cli import app

    results = tmp_path / "results"
    results.mkdir()
    ablation.to_parquet(results / "trials.parquet", index=False)
    _epochs(ablation).to_parquet(results / "epochs.parquet", index=False)
    _cka_long(ablation).to_parquet(results / "cka.parquet", index=False)

    runner = CliRunner()
    shown = runner.invoke(app, ["report", str(results)])
    assert shown.exit_code == 0, shown.output
    assert "Findings: the paper's claims at this scale" in shown.output
    assert "Paired comparison vs baseline" in shown.output
    assert "│ sid " in shown.output  # one-axis cell names shown by their value

    md = tmp_path / "out" / "REPORT.md"
    made = runner.invoke(
        app,
        [
            "report",
            str(results),
            "--format",
            "markdown",
            "--plots",
            str(tmp_path / "out" / "p"),
            "-o",
            str(md),
        ],
    )
    assert made.exit_code == 0, made.output
    assert "## Findings: the paper's claims at this scale" in md.read_text()
    assert "| distill.algorithm=sid |" in made.output
    for name in ("cells", "learning_curves", "cka"):
        _assert_png(tmp_path / "out" / "p" / f"{name}.png")

    missing = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no results" in missing.output


# ---------------------------------------------------------------------------------------------
# experiment.json: the spec's baseline and metric direction


def _write_experiment(
    folder: Path,
    baseline: dict[str, object] | None = None,
    mode: str = "max",
    metric: str | None = None,
) -> None:
    """experiment.json as the runners write it: {"spec": spec.model_dump(mode="json")}."""
    ablation = None if baseline is None else {"axes": {}, "seeds": [1, 2, 3], "baseline": baseline}
    spec = {"name": "ablation", "task": "rte", "tune": {"metric": metric, "mode": mode}}
    (folder / "experiment.json").write_text(json.dumps({"spec": {**spec, "ablation": ablation}}))


def _results(frame: pd.DataFrame, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(folder / "trials.parquet", index=False)
    return folder


def test_read_experiment_is_none_without_the_file_and_names_the_file_when_it_is_broken(
    tmp_path: Path,
) -> None:
    assert R.read_experiment(tmp_path) is None
    _write_experiment(tmp_path, None)
    assert R.read_experiment(tmp_path / "missing") is None  # never the parent folder's file
    _write_experiment(tmp_path, {"distill.algorithm": "sid"}, mode="min")
    (tmp_path / "trials.parquet").touch()
    experiment = R.read_experiment(tmp_path / "trials.parquet")  # a file in the folder works too
    assert experiment is not None
    assert experiment["spec"]["ablation"]["baseline"] == {"distill.algorithm": "sid"}
    assert experiment["spec"]["tune"]["mode"] == "min"
    (tmp_path / "experiment.json").write_text('{"spec": {"name": ')
    with pytest.raises(ValueError, match=r"experiment\.json is not valid JSON"):
        R.read_experiment(tmp_path)
    (tmp_path / "experiment.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        R.read_experiment(tmp_path)


def test_report_uses_the_spec_baseline_when_no_baseline_is_given(
    ablation: pd.DataFrame, tmp_path: Path
) -> None:
    results = _results(ablation, tmp_path / "results")
    _write_experiment(results, {"distill.algorithm": "sid"})
    report = R.build_report(results)
    assert report.baseline == SID and "experiment.json ablation.baseline" in report.baseline_source
    comparison = report.comparison.set_index("cell")
    assert list(comparison.index) == [SOFT, PID]
    # soft - sid per seed 1, 2, 3: 0.70 - 0.71, 0.72 - 0.74, 0.74 - 0.80
    assert comparison.loc[SOFT, "mean_diff"] == pytest.approx((-0.01 - 0.02 - 0.06) / 3)
    assert f"- baseline: `{SID}` (from experiment.json" in report.to_markdown()
    # an explicit baseline still wins over the spec's
    assert R.build_report(results, baseline=SOFT).baseline == SOFT


def test_report_falls_back_to_the_soft_cell_when_the_spec_baseline_selects_no_cell(
    ablation: pd.DataFrame, tmp_path: Path
) -> None:
    results = _results(ablation, tmp_path / "results")
    _write_experiment(results, {"distill.algorithm": "idal"})  # no idal cell in this ablation
    report = R.build_report(results)
    assert report.baseline == SOFT and report.baseline_source.startswith("the default")
    assert any("ablation.baseline is not used" in note for note in report.notes)
    _write_experiment(results, None)  # a sweep spec: "ablation": null
    assert R.build_report(results).baseline == SOFT


def test_report_takes_the_mode_from_the_argument_then_the_mode_column_then_the_spec(
    sweep: pd.DataFrame, tmp_path: Path
) -> None:
    accuracies = sorted(sweep["best.dev.accuracy"].dropna())
    plain = _results(sweep, tmp_path / "plain")
    report = R.build_report(plain)
    assert (report.mode, report.mode_source) == ("max", "the default")
    assert report.sweep["accuracy"].iloc[0] == accuracies[-1]

    _write_experiment(plain, None, mode="min")
    report = R.build_report(plain)
    assert (report.mode, report.mode_source) == ("min", "experiment.json tune.mode")
    assert report.sweep["accuracy"].iloc[0] == accuracies[0]  # lowest first

    column = _results(sweep.assign(mode="max"), tmp_path / "column")
    _write_experiment(column, None, mode="min")
    report = R.build_report(column)  # the column beats experiment.json
    assert (report.mode, report.mode_source) == ("max", "the trials' mode column")
    assert "mode" not in R.setting_columns(sweep.assign(mode="max"))  # not a swept setting
    report = R.build_report(column, mode="min")  # the argument beats both
    assert (report.mode, report.mode_source) == ("min", "the mode argument")
    assert report.sweep["accuracy"].iloc[0] == accuracies[0]

    mixed = _results(sweep.assign(mode=["max", "min"] * 20), tmp_path / "mixed")
    with pytest.raises(ValueError, match="give the mode explicitly"):
        R.build_report(mixed)
    with pytest.raises(ValueError, match="mode must be 'max' or 'min'"):
        R.build_report(plain, mode="up")


def test_report_uses_the_spec_metric_when_the_trials_do_not_record_one(
    ablation: pd.DataFrame, tmp_path: Path
) -> None:
    results = _results(ablation.drop(columns=["metric"]), tmp_path / "results")
    assert R.build_report(results).metric == "accuracy"  # the first best.dev.<metric> column
    _write_experiment(results, {"distill.algorithm": "soft"}, metric="f1")
    report = R.build_report(results)
    assert report.metric == "f1"
    sid = report.comparison.set_index("cell").loc[SID]
    assert sid["mean_diff"] == pytest.approx(0.03)  # f1 = accuracy - 0.1 in every run


# ---------------------------------------------------------------------------------------------
# alpha


def test_verdicts_and_printed_thresholds_use_the_alpha_given(
    ablation: pd.DataFrame, tmp_path: Path
) -> None:
    # Holm over sid (p 0.18847) and pid (p 1 - 2 atan(0.5) / pi = 0.70483): 0.37694 and 0.70483.
    strict = R.findings(ablation, SOFT, "accuracy").set_index("cell")
    assert strict.loc[SID, "accuracy.verdict"] == "unresolved"
    loose = R.findings(ablation, SOFT, "accuracy", alpha=0.4).set_index("cell")
    assert loose.loc[SID, "accuracy.verdict"] == "better"  # 0.37694 < 0.4
    assert loose.loc[PID, "accuracy.verdict"] == "unresolved"  # 0.70483 >= 0.4
    # the interval printed with the verdict is the one it was decided on: sid's at 1 - 0.4 / 2
    assert "(80.0%)" in loose.loc[SID, "interval"]

    text = R.findings_text(ablation, loose.reset_index(), SOFT, "accuracy", alpha=0.4)
    assert "alpha = 0.4" in text and "p < 0.4" in text
    assert "0.05" not in text and "95%" not in text

    results = _results(ablation, tmp_path / "results")
    markdown = R.build_report(results, alpha=0.01).to_markdown()
    assert "- alpha: 0.01 (from the alpha argument): better/worse need a Holm-adjusted" in markdown
    assert "p < 0.01 (its t-interval" in markdown and "(99% t-interval)" in markdown
    assert "- design: fixed design, 3 seeds; Holm across the family at alpha 0.01" in markdown
    assert "p < 0.05" not in markdown and "95%" not in markdown
    with pytest.raises(ValueError, match="alpha must be between 0 and 1"):
        R.build_report(results, alpha=5)


# ---------------------------------------------------------------------------------------------
# intervals: t-based, the bootstrap only where the pairs support it


def _two_cells(base: list[float], new: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"cell": cell, "seed": seed, "status": "ok", "best.dev.accuracy": value}
            for cell, values in (("base", base), ("new", new))
            for seed, value in enumerate(values, start=1)
        ]
    )


def test_the_interval_of_two_paired_differences_is_the_t_interval_with_one_dof() -> None:
    # differences 0.01 and 0.03: mean 0.02, sd sqrt(2) * 0.01, se 0.01, t(0.975, 1) = 12.7062
    trials = _two_cells([0.70, 0.70], [0.71, 0.73])
    row = R.paired_comparison(trials, "base", "accuracy").iloc[0]
    assert (row["ci_low"], row["ci_high"]) == (
        pytest.approx(0.02 - 0.127062, rel=1e-4),
        pytest.approx(0.02 + 0.127062, rel=1e-4),
    )
    row = R.paired_comparison(trials, "base", "accuracy", confidence=0.5).iloc[0]
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(0.01), pytest.approx(0.03))  # t=1


def test_the_interval_of_equal_differences_is_that_difference() -> None:
    trials = _two_cells([0.70, 0.71, 0.72], [0.72, 0.73, 0.74])
    row = R.paired_comparison(trials, "base", "accuracy").iloc[0]
    assert row["ci_low"] == pytest.approx(0.02) and row["ci_high"] == pytest.approx(0.02)


# ---------------------------------------------------------------------------------------------
# CKA heatmaps on the real tables


def test_plot_cka_groups_the_real_cka_table_by_cell_by_default(
    ablation: pd.DataFrame, tmp_path: Path
) -> None:
    results = _results(ablation, tmp_path / "results")
    # cka.parquet as kdray.analysis.results writes it; layer pair (1, 1) scores 0.1 * seed
    rows = [
        {"name": t["name"], "trial_id": t["trial_id"], "student_layer": s, "teacher_layer": u}
        | {"cka": 0.1 * t["seed"] if (s, u) == (1, 1) else 0.5}
        for _, t in ablation[ablation["status"] == "ok"].iterrows()
        for s in (1, 2)
        for u in (1, 2)
    ]
    pd.DataFrame(rows).to_parquet(results / "cka.parquet", index=False)
    cka = R.build_report(results).cka
    means = R.cka_means(cka)
    assert list(means.columns) == ["cell", "student_layer", "teacher_layer", "cka", "n"]
    assert list(dict.fromkeys(means["cell"])) == [SOFT, SID, PID]
    first = means[(means["student_layer"] == 1) & (means["teacher_layer"] == 1)].set_index("cell")
    assert first.loc[SOFT, "cka"] == pytest.approx((0.1 + 0.2 + 0.3) / 3)
    assert first.loc[PID, "cka"] == pytest.approx((0.1 + 0.2 + 0.4) / 3)
    assert int(first.loc[SID, "n"]) == 3  # the failed sid run has no CKA
    _assert_png(P.plot_cka(cka, tmp_path / "cka.png"))
    algorithms = ablation[["trial_id", "distill.algorithm"]]
    by_algorithm = R.cka_means(cka.drop(columns=["cell"]).merge(algorithms, on="trial_id"))
    assert list(dict.fromkeys(by_algorithm["distill.algorithm"])) == ["soft", "sid", "pid"]
    with pytest.raises(ValueError, match=r"cannot group CKA by 'algorithm'.*'cell'"):
        P.plot_cka(cka, tmp_path / "never.png", by="algorithm")
    alone = R.cka_means(cka.drop(columns=["cell"]))
    assert set(alone["runs"]) == {"all runs"} and int(alone["n"].iloc[0]) == 9


# ---------------------------------------------------------------------------------------------
# Folders the report cannot use: clear errors, not tracebacks


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: t.assign(status="failed"),
            r"no run finished ok \(10 failed\).*first error: boom",
        ),
        (lambda t: t.drop(columns=["cell", "distill.algorithm"]), "neither a 'cell' nor"),
        (lambda t: t.drop(columns=["best.dev.accuracy"]), "no column for metric 'accuracy'"),
    ],
    ids=["only-failed-runs", "no-group-column", "metric-column-missing"],
)
def test_report_on_an_unusable_folder_raises_a_value_error_saying_what_is_missing(
    ablation: pd.DataFrame, tmp_path: Path, change: object, message: str
) -> None:
    results = _results(change(ablation), tmp_path / "results")  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        R.build_report(results)


def test_cli_report_exits_2_with_the_reason_when_every_run_failed(
    ablation: pd.DataFrame, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from kdray.cli import app

    results = _results(ablation.assign(status="error"), tmp_path / "results")
    shown = CliRunner().invoke(app, ["report", str(results)])
    output = " ".join(shown.output.split())  # rich wraps long lines
    assert shown.exit_code == 2 and "no run finished ok (10 error)" in output
    assert "Traceback" not in output
    assert shown.exception is None or isinstance(shown.exception, SystemExit)


def test_findings_say_not_tested_when_the_baseline_cell_has_no_ok_run(
    ablation: pd.DataFrame, tmp_path: Path
) -> None:
    failed_soft = ablation.assign(
        status=np.where(ablation["distill.algorithm"] == "soft", "failed", ablation["status"])
    )
    report = R.build_report(_results(failed_soft, tmp_path / "results"))
    assert report.baseline == SOFT
    assert list(report.comparison["n_pairs"]) == [0, 0]
    assert "**not tested**: no internal-distillation cell has an ok run" in report.findings_text


# ---------------------------------------------------------------------------------------------
# Dependencies


def test_report_imports_no_kdray_module_but_the_torch_free_results_and_registry() -> None:
    source = Path(R.__file__).read_text(encoding="utf-8")
    modules = set()
    for node in ast.walk(ast.parse(source)):  # top-level and lazy (in-function) imports alike
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    assert {m for m in modules if m.split(".")[0] == "kdray"} <= {
        "kdray.analysis.results",
        "kdray.method.algorithms",
        "kdray.analysis.stats",
        "kdray.analysis.pareto",
    }
    assert not {"torch", "transformers", "ray"} & {m.split(".")[0] for m in modules}
    check = "import sys, kdray.analysis.report; assert 'torch' not in sys.modules, 'torch imported'"
    root = str(Path(R.__file__).resolve().parents[1])  # this checkout's kdray, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr


def test_markdown_tables_need_tabulate_so_it_is_a_declared_dependency() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert "tabulate" in {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0] for d in dependencies}


# ---------------------------------------------------------------------------------------------
# one question across folders: one family


def _pair_folder(folder: Path, diffs: list[float]) -> Path:
    """An ablation folder of cells base and new, new minus base = ``diffs`` by seed."""
    rows = [
        {"cell": c, "seed": s, "status": "ok", "metric": "accuracy", "best.dev.accuracy": v,
         "distill.algorithm": algorithm}
        for s, d in enumerate(diffs, start=1)
        for c, v, algorithm in (("base", 0.6, "soft"), ("new", 0.6 + d, "pid"))
    ]  # fmt: skip
    return _results(pd.DataFrame(rows), folder)  # the one soft cell is the baseline


def test_a_follow_up_on_the_same_question_joins_its_family_instead_of_starting_one(
    tmp_path: Path,
) -> None:
    """The MRPC pid pattern: an unresolved cell re-run alone in a new folder. Alone, the
    follow-up's p 0.0408 (t 4.8, 2 dof) is below alpha; in the family of the two folders'
    comparisons, Holm holds it to 0.05 / 2 (the first folder's cell, p 0.80, is not rejected)."""
    first = _pair_folder(tmp_path / "first", [0.05, -0.04, 0.01])
    follow = _pair_folder(tmp_path / "follow", [0.02 - 0.007217, 0.02, 0.02 + 0.007217])
    alone = R.build_report(follow, baseline="base")
    assert alone.findings.set_index("cell").loc["new", "accuracy.verdict"] == "better"
    family = R.family_verdicts([first, follow])
    assert family["folder"].tolist() == ["first", "follow"]
    assert family["verdict"].tolist() == ["unresolved", "unresolved"]
    assert family["p_ttest"].iloc[1] == pytest.approx(0.0408, abs=5e-4)
    markdown = R.build_report(follow, family_with=[first]).to_markdown()
    assert "## One question, one family: 2 comparisons in 2 folders" in markdown
    assert "the question's family (2 comparisons in 2 folders" in markdown


def test_a_teacher_id_whose_runs_recorded_different_dev_scores_gets_a_note() -> None:
    """Same settings, same id, fine-tuned twice (an emptied cache, a resume on another
    machine): the teacher table's mean would hide it, so the report says so."""
    trials = pd.DataFrame(
        {
            "teacher.id": ["t1", "t1", "t1", "t2", "t2"],
            "teacher.dev.accuracy": [173 / 277, 173 / 277, 170 / 277, 0.5, 0.5],
        }
    )
    notes = R.remade_teacher_notes(trials)
    assert len(notes) == 1
    assert "teacher t1 was fine-tuned more than once" in notes[0]
    assert "accuracy 0.6137, 0.6245 across 3 runs" in notes[0]
    assert R.remade_teacher_notes(trials[trials["teacher.id"] == "t2"]) == []
    assert R.remade_teacher_notes(trials.drop(columns="teacher.id")) == []
