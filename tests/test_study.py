"""Confirmation, leave-one-out cells and adaptive seeds (``kdray.experiments.followup``) and the
``kdray study`` chain (``kdray.experiments.study``) on synthetic tables with known answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from kdray.experiments import followup
from kdray.spec import AdaptiveSeeds, SpecError, load_spec, spec_from_dict

REPO = Path(__file__).resolve().parents[1]


def _spec(**sections: Any):
    raw: dict[str, Any] = {
        "name": "s",
        "task": "rte",
        "student": {"layers": 3},
        "distill": {"algorithm": "sid", "stages": {"epochs_per_stage": 1}},
        "train": {"epochs": 5},
        "search": {
            "distill.algorithm": {"choice": ["soft", "sid"]},
            "distill.layer_map": {"choice": ["skip", [1, 2, 3]]},
            "train.lr": {"loguniform": [1e-5, 1e-3]},
        },
        "tune": {"metric": "accuracy", "mode": "max"},
    }
    raw.update(sections)
    return spec_from_dict(raw)


# ---------------------------------------------------------------------------------------------
# Spec


def test_adaptive_seeds_and_fixed_seed_lists_are_both_valid_specs() -> None:
    fixed = _spec(ablation={"seeds": [4, 5]})
    adaptive = _spec(ablation={"seeds": {"min": 3, "max": 10, "step": 2}, "equivalence": 0.01})
    assert fixed.ablation.first_seeds() == [4, 5] and not fixed.ablation.adaptive
    assert adaptive.ablation.first_seeds() == [1, 2, 3] and adaptive.ablation.adaptive
    assert adaptive.ablation.equivalence == 0.01 and adaptive.ablation.alpha == 0.05


def test_adaptive_seeds_with_min_above_max_is_an_error_naming_the_key() -> None:
    with pytest.raises(SpecError, match=r"ablation\.seeds.*min \(5\) must be <= max \(4\)"):
        _spec(ablation={"seeds": {"min": 5, "max": 4, "step": 1}})


def test_unknown_schedule_component_is_an_error_listing_the_algorithms() -> None:
    with pytest.raises(SpecError, match=r"ablation\.components\.schedule.*unknown algorithm"):
        _spec(ablation={"design": "leave_one_out", "components": {"schedule": "fast"}})


# ---------------------------------------------------------------------------------------------
# Confirmation


def _sweep_row(trial_id: str, accuracy: float | None, status: str = "ok", **params: Any) -> dict:
    return {
        "trial_id": trial_id,
        "status": status,
        "metric": "accuracy",
        "best.dev.accuracy": accuracy,
        **{f"param.{k}": v for k, v in params.items()},
    }


@pytest.fixture
def sweep_trials() -> pd.DataFrame:
    return pd.DataFrame(
        [
            _sweep_row("a", 0.70, **{"distill.algorithm": "soft", "train.lr": 1e-4}),
            _sweep_row("b", 0.80, **{"distill.algorithm": "sid", "train.lr": 2e-4}),
            # the same configuration as b, sampled again: one configuration, its best score
            _sweep_row("c", 0.78, **{"distill.algorithm": "sid", "train.lr": 2e-4}),
            _sweep_row("d", 0.75, **{"distill.algorithm": "sid", "distill.layer_map": "[1, 2, 3]"}),
            _sweep_row("e", 0.95, status="pruned", **{"distill.algorithm": "soft"}),
            _sweep_row("f", None, **{"distill.algorithm": "soft"}),
        ]
    )


def test_confirm_picks_the_top_k_distinct_configurations_best_first(sweep_trials) -> None:
    configs = followup.confirm_configs(sweep_trials, _spec(), top_k=3)
    assert [c["cell"] for c in configs] == ["rank1", "rank2", "rank3"]
    assert [c["source"] for c in configs] == ["sweep:b", "sweep:d", "sweep:a"]
    assert [c["sweep_score"] for c in configs] == [0.80, 0.75, 0.70]
    assert configs[0]["values"] == {"distill.algorithm": "sid", "train.lr": 2e-4}
    # an explicit layer list travels as JSON text in the table and comes back as a list
    assert configs[1]["values"]["distill.layer_map"] == [1, 2, 3]
    assert json.loads(configs[1]["config_values"])["distill.layer_map"] == "[1, 2, 3]"


def test_confirm_with_mode_min_ranks_the_lowest_first(sweep_trials) -> None:
    spec = _spec(tune={"metric": "accuracy", "mode": "min"})
    configs = followup.confirm_configs(sweep_trials, spec, top_k=2)
    assert [c["source"] for c in configs] == ["sweep:a", "sweep:d"]


def test_confirm_trials_pair_the_same_seeds_across_configurations(sweep_trials) -> None:
    configs = followup.confirm_configs(sweep_trials, _spec(), top_k=2)
    trials = followup.paired_trials(configs, [1, 2, 3])
    seeds = {rank: [t["seed"] for t in trials if t["config_rank"] == rank] for rank in (1, 2)}
    assert seeds == {1: [1, 2, 3], 2: [1, 2, 3]}


def test_confirm_of_a_sweep_without_ok_trials_says_so() -> None:
    trials = pd.DataFrame([_sweep_row("a", 0.7, status="failed", **{"train.lr": 1e-4})])
    with pytest.raises(ValueError, match="no ok trial"):
        followup.confirm_configs(trials, _spec(), top_k=2)


def test_every_confirmation_runs_the_spec_as_written_as_its_control(sweep_trials) -> None:
    spec = _spec()
    configs = followup.with_control(followup.confirm_configs(sweep_trials, spec, top_k=2), spec)
    assert [c["cell"] for c in configs] == ["rank1", "rank2", "default"]
    assert configs[-1]["values"] == {} and configs[-1]["config_rank"] == 0
    # a configuration that is the spec as written (sid, skip, the spec's lr) is the control
    lr = spec.train.lr
    same = pd.DataFrame([_sweep_row("z", 0.9, **{"distill.algorithm": "sid", "train.lr": lr})])
    configs = followup.with_control(followup.confirm_configs(same, spec, top_k=1), spec)
    assert [c["cell"] for c in configs] == ["rank1"] and configs[0]["is_default"]


def _control_table(winner: list[float], default: list[float]) -> pd.DataFrame:
    values = {"rank1": '{"train.lr": 0.0003}', "rank2": '{"train.lr": 1e-05}', "default": "{}"}
    rows = [_confirm_row(1, s, a, 0.80) for s, a in enumerate(winner, start=1)]
    rows += [_confirm_row(2, s, a - 0.05, 0.78) for s, a in enumerate(winner, start=1)]
    rows += [
        {**_confirm_row(0, s, a, float("nan")), "cell": "default", "source": "spec"}
        for s, a in enumerate(default, start=1)
    ]
    table = pd.DataFrame(rows)
    table[followup.CONFIG_VALUES] = table["cell"].map(values)
    return table


def test_a_confirmed_winner_below_the_spec_as_written_is_not_the_recipe() -> None:
    """results/rte-study's recipe was below the spec's own sid on every paired seed: now the
    confirmation's control catches that, and the recipe stays the spec as written."""
    spec = _spec()
    worse = _control_table([0.60, 0.61, 0.62], [0.63, 0.64, 0.65])  # -0.03 on every seed
    assert followup.control_verdict(worse, spec, "rank1").word == "worse"
    assert followup.recipe_from_results(worse, spec) == (
        {},
        "confirmed:default (rank1 worse than it)",
    )
    noisy = _control_table([0.60, 0.66, 0.62], [0.63, 0.61, 0.64])  # not shown either way
    assert followup.control_verdict(noisy, spec, "rank1").word == "unresolved"
    assert followup.recipe_from_results(noisy, spec)[0] == {}
    better = _control_table([0.66, 0.67, 0.68], [0.63, 0.64, 0.65])
    assert followup.control_verdict(better, spec, "rank1").word == "better"
    assert followup.recipe_from_results(better, spec) == ({"train.lr": 0.0003}, "confirmed:rank1")
    # the control is not one of the sweep's configurations: no winner's curse, no rank
    assert followup.winners_curse(None, better, "accuracy")["cell"].tolist() == ["rank1", "rank2"]


def _confirm_row(rank: int, seed: int, accuracy: float, sweep_score: float) -> dict:
    return {
        "trial_id": f"r{rank}s{seed}",
        "status": "ok",
        "metric": "accuracy",
        "best.dev.accuracy": accuracy,
        "cell": f"rank{rank}",
        "config_rank": rank,
        "seed": seed,
        "source": f"sweep:t{rank}",
        "sweep_score": sweep_score,
    }


def test_winners_curse_is_sweep_score_minus_confirmed_mean_and_ranking_can_flip() -> None:
    rows = [_confirm_row(1, s, a, 0.80) for s, a in ((1, 0.70), (2, 0.72), (3, 0.74))]
    rows += [_confirm_row(2, s, a, 0.78) for s, a in ((1, 0.75), (2, 0.76), (3, 0.77))]
    curse = followup.winners_curse(None, pd.DataFrame(rows), "accuracy")
    assert curse["config_rank"].tolist() == [1, 2]
    assert curse["mean"].tolist() == pytest.approx([0.72, 0.76])
    assert curse["winners_curse"].tolist() == pytest.approx([0.08, 0.02])
    assert curse["confirmed_rank"].tolist() == [2, 1]
    assert not followup.ranking_survived(curse)
    # the sweep table, when given, is where the sweep score comes from
    sweep = pd.DataFrame([_sweep_row("t1", 0.90), _sweep_row("t2", 0.70)])
    curse = followup.winners_curse(sweep, pd.DataFrame(rows), "accuracy")
    assert curse["winners_curse"].tolist() == pytest.approx([0.18, -0.06])


def test_ranking_survives_when_the_confirmed_order_matches_the_sweeps() -> None:
    curse = pd.DataFrame({"config_rank": [1, 2, 3], "confirmed_rank": [1, 1, 3]})
    assert followup.ranking_survived(curse)


# ---------------------------------------------------------------------------------------------
# Leave-one-out


def test_leave_one_out_cells_are_the_recipe_with_exactly_one_change_each() -> None:
    spec = load_spec(REPO / "search_spaces" / "rte-cpu.yaml")
    cells, skipped = followup.leave_one_out_cells(spec, {"train.lr": 1e-4}, source="sweep:x")
    assert [c["cell"] for c in cells] == [
        "recipe",
        "-soft",
        "-attention",
        "-hidden",
        "schedule=idal",
        "init=random",
    ]
    recipe = cells[0]["values"]
    assert recipe == {"train.lr": 1e-4}
    for cell in cells[1:]:
        assert cell["values"] == {**recipe, **cell["change"]} and len(cell["change"]) == 1
        assert cell["source"] == "sweep:x"
    assert cells[1]["change"] == {"distill.losses.soft.weight": 0.0}
    assert cells[4]["change"] == {"distill.algorithm": "idal"}
    assert {s["cell"]: s["reason"] for s in skipped} == {
        "-hard": "hard is not active in the recipe",
        "freeze=off": "the recipe freezes nothing",
    }


def test_leave_one_out_skips_cells_identical_to_the_recipe_or_another_cell() -> None:
    spec = _spec(
        ablation={
            "design": "leave_one_out",
            "components": {"layer_map": ["skip", "last", "last"], "losses": [], "init": None},
        },
        distill={"algorithm": "pid", "stages": {"epochs_per_stage": 1, "freeze_lower": True}},
        train={"epochs": 4},
    )
    cells, skipped = followup.leave_one_out_cells(spec)
    assert [c["cell"] for c in cells] == ["recipe", "schedule=idal", "layer_map=last", "freeze=off"]
    assert {"cell": "layer_map=skip", "reason": "identical to recipe"} in skipped
    assert {"cell": "layer_map=last", "reason": "identical to layer_map=last"} in skipped


def test_leave_one_out_of_a_single_stage_recipe_has_no_schedule_cell() -> None:
    spec = _spec(distill={"algorithm": "idal"})
    cells, skipped = followup.leave_one_out_cells(spec)
    assert "schedule=idal" not in [c["cell"] for c in cells]
    assert {"cell": "schedule=idal", "reason": "the recipe's idal is not staged"} in skipped


def test_recipe_from_a_sweep_is_its_best_trials_sampled_values(sweep_trials) -> None:
    values, source = followup.recipe_from_results(sweep_trials, _spec())
    assert values == {"distill.algorithm": "sid", "train.lr": 2e-4} and source == "sweep:b"


# ---------------------------------------------------------------------------------------------
# Adaptive seeds

NOISE = [0.03, -0.03, 0.01, -0.01, 0.02, -0.02, 0.0, 0.015, -0.015, 0.005]


def _value(cell: str, seed: int) -> float:
    """Known answers: clear is 0.1 better every seed, same is the baseline exactly, noisy
    differs by +-0.2 alternately (mean 0, far outside the margin), base varies by seed."""
    base = 0.7 + NOISE[seed - 1]
    offsets = {"base": 0.0, "clear": 0.1, "same": 0.0, "noisy": 0.2 if seed % 2 else -0.19}
    return base + offsets[cell]


def _fake_runner(log: list[list[tuple[str, int]]]):
    rows: list[dict] = []

    def run_round(trials: list[dict], round_index: int) -> pd.DataFrame:
        log.append([(t["cell"], t["seed"]) for t in trials])
        for t in trials:
            rows.append(
                {
                    "trial_id": f"{t['cell']}-{t['seed']}",
                    "status": "ok",
                    "metric": "accuracy",
                    "cell": t["cell"],
                    "seed": t["seed"],
                    "best.dev.accuracy": _value(t["cell"], t["seed"]),
                }
            )
        return pd.DataFrame(rows)

    return run_round


def test_adaptive_seeds_stop_each_cell_for_its_known_reason() -> None:
    cells = [
        {"cell": c, "values": {}, "source": "spec"} for c in ("base", "clear", "same", "noisy")
    ]
    log: list[list[tuple[str, int]]] = []
    trials, decisions = followup.adaptive_rounds(
        cells,
        "base",
        AdaptiveSeeds(min=3, max=7, step=2),
        _fake_runner(log),
        metric="accuracy",
    )
    assert {c: (d.status, d.n_seeds) for c, d in decisions.items()} == {
        "clear": ("better", 3),
        "same": ("equivalent", 3),
        "noisy": ("max reached", 7),
    }
    # round 1: every cell seeds 1..3; then only noisy and the baseline, with the same seeds
    assert sorted(log[0]) == sorted(
        (c, s) for c in ("base", "clear", "same", "noisy") for s in (1, 2, 3)
    )
    assert sorted(log[1]) == [("base", 4), ("base", 5), ("noisy", 4), ("noisy", 5)]
    assert sorted(log[2]) == [("base", 6), ("base", 7), ("noisy", 6), ("noisy", 7)]
    assert len(log) == 3
    table = followup.adaptive_summary(
        trials, "base", "accuracy", "max", AdaptiveSeeds(min=3, max=7, step=2), 0.05, 0.005
    )
    assert dict(zip(table["cell"], table["stopped"], strict=True)) == {
        "clear": "better",
        "same": "equivalent",
        "noisy": "max reached",
    }
    assert dict(zip(table["cell"], table["seeds"], strict=True)) == {
        "clear": 3,
        "same": 3,
        "noisy": 7,
    }


def test_a_worse_cell_stops_as_worse_and_mode_min_flips_the_verdict() -> None:
    trials = pd.DataFrame(
        [
            {"cell": c, "seed": s, "status": "ok", "metric": "accuracy", "best.dev.accuracy": v}
            for s in (1, 2, 3)
            for c, v in (("base", 0.7 + s / 100), ("low", 0.6 + s / 100 + (s == 2) / 1000))
        ]
    )
    args = ("accuracy",)
    kwargs = dict(alpha=0.05, equivalence=0.005, seeds_so_far={"low": 3})
    kwargs["seeds"] = AdaptiveSeeds(min=3, max=9, step=2)
    decisions = followup.seed_decisions(trials, "base", *args, "max", **kwargs)
    assert decisions["low"].status == "worse" and decisions["low"].next_seeds == []
    decisions = followup.seed_decisions(trials, "base", *args, "min", **kwargs)
    assert decisions["low"].status == "better"


def test_an_unresolved_cell_gets_step_more_seeds_but_never_past_max() -> None:
    trials = pd.DataFrame(
        [
            {"cell": c, "seed": s, "status": "ok", "metric": "accuracy", "best.dev.accuracy": v}
            for s, noisy in ((1, 0.9), (2, 0.5), (3, 0.8), (4, 0.55))
            for c, v in (("base", 0.7), ("noisy", noisy))
        ]
    )
    common = dict(alpha=0.05, equivalence=0.005, seeds_so_far={"noisy": 4})
    decision = followup.seed_decisions(
        trials, "base", "accuracy", "max", seeds=AdaptiveSeeds(min=3, max=5, step=2), **common
    )
    assert decision["noisy"].status == "unresolved" and decision["noisy"].next_seeds == [5]


def test_a_spent_budget_stops_adaptive_seeds_between_rounds_with_the_rounds_so_far_decided() -> (
    None
):
    cells = [
        {"cell": c, "values": {}, "source": "spec"} for c in ("base", "clear", "same", "noisy")
    ]
    log: list[list[tuple[str, int]]] = []
    asked: list[int] = []

    def stop_before(round_index: int) -> str | None:
        asked.append(round_index)
        return "the budget of 1 wall hours is spent (1.20 hours)"

    with pytest.raises(followup.SeedsStopped) as stopped:
        followup.adaptive_rounds(
            cells,
            "base",
            AdaptiveSeeds(min=3, max=7, step=2),
            _fake_runner(log),
            metric="accuracy",
            stop_before=stop_before,
        )
    # round 1 ran in full; asked before round 2, which never started
    assert len(log) == 1 and asked == [2]
    stop = stopped.value
    assert stop.rounds == 1 and len(stop.trials) == 12
    assert {c: d.status for c, d in stop.decisions.items()} == {
        "clear": "better",
        "same": "equivalent",
        "noisy": "unresolved",
    }
    assert str(stop) == (
        "adaptive seeds stopped after round 1: the budget of 1 wall hours is spent (1.20 hours)"
    )


def test_adaptive_seeds_that_resolve_in_round_one_never_ask_the_budget() -> None:
    cells = [{"cell": c, "values": {}, "source": "spec"} for c in ("base", "clear", "same")]
    asked: list[int] = []
    _, decisions = followup.adaptive_rounds(
        cells,
        "base",
        AdaptiveSeeds(min=3, max=7, step=2),
        _fake_runner([]),
        metric="accuracy",
        stop_before=lambda k: asked.append(k) or "spent",
    )
    assert asked == [] and {d.status for d in decisions.values()} == {"better", "equivalent"}


def test_adaptive_rounds_on_disk_run_one_folder_per_round_and_merge_the_tables(tmp_path) -> None:
    spec = _spec(ablation={"seeds": {"min": 3, "max": 5, "step": 2}})
    cells = [{"cell": c, "values": {}, "source": "spec"} for c in ("base", "clear", "noisy")]
    calls: list[dict] = []

    def fake_run(spec, trials, *, name, command, cells, out_dir, resume, **options):
        calls.append({"name": name, "out_dir": out_dir, "resume": resume, "n": len(trials)})
        rows = [
            {
                "trial_id": f"{name}-{t['cell']}-{t['seed']}",
                "status": "ok",
                "metric": "accuracy",
                "cell": t["cell"],
                "seed": t["seed"],
                "best.dev.accuracy": _value(t["cell"], t["seed"]),
            }
            for t in trials
        ]
        out_dir.mkdir(parents=True)
        followup.results.write_table(rows, out_dir / followup.results.TRIALS_FILE)

    out = tmp_path / "abl"
    trials, decisions = followup.run_adaptive(spec, cells, "base", fake_run, name="s", out_dir=out)
    assert [c["name"] for c in calls] == ["s-round1", "s-round2"]
    assert [c["out_dir"] for c in calls] == [out / "rounds" / "round-1", out / "rounds" / "round-2"]
    assert [c["n"] for c in calls] == [9, 4]
    merged = pd.read_parquet(out / "trials.parquet")
    assert len(merged) == len(trials) == 13
    assert {d.status for d in decisions.values()} == {"better", "max reached"}
    assert (out / "experiment.json").exists()
    # the folder now holds this ablation: a second run needs --resume (or --overwrite)
    with pytest.raises(ValueError, match="--resume"):
        followup.run_adaptive(spec, cells, "base", fake_run, name="s", out_dir=out)


# ---------------------------------------------------------------------------------------------
# The report of a confirmation and of an adaptive ablation


def _folder(tmp_path: Path, rows: list[dict], command: str, ablation: dict | None) -> Path:
    folder = tmp_path / command
    folder.mkdir()
    pd.DataFrame(rows).to_parquet(folder / "trials.parquet")
    spec = {"tune": {"metric": "accuracy", "mode": "max"}, "ablation": ablation}
    (folder / "experiment.json").write_text(json.dumps({"command": command, "spec": spec}))
    return folder


def test_report_of_a_confirmation_gives_the_curse_the_comparison_with_rank1_and_survival(
    tmp_path: Path,
) -> None:
    from kdray.analysis.report import build_report

    rows = [_confirm_row(1, s, a, 0.80) for s, a in ((1, 0.70), (2, 0.72), (3, 0.74))]
    rows += [_confirm_row(2, s, a, 0.78) for s, a in ((1, 0.75), (2, 0.76), (3, 0.77))]
    built = build_report(_folder(tmp_path, rows, "confirm", None))
    assert built.kind == "confirmation" and built.baseline == "rank1"
    comparison = built.comparison.set_index("cell")
    assert comparison.loc["rank2", "mean_diff"] == pytest.approx(0.04)
    assert built.confirmation["winners_curse"].tolist() == pytest.approx([0.08, 0.02])
    assert built.ranking_survived is False
    markdown = built.to_markdown()
    assert "ranking survived: no (sweep rank -> confirmed rank: rank1 -> 2, rank2 -> 1)" in markdown
    assert "winner's curse" in markdown and "from the default" in markdown


def test_report_of_an_adaptive_ablation_says_seeds_per_cell_and_why_each_stopped(
    tmp_path: Path,
) -> None:
    from kdray.analysis.report import build_report

    cells = [
        {"cell": c, "values": {}, "source": "spec"} for c in ("base", "clear", "same", "noisy")
    ]
    rule = AdaptiveSeeds(min=3, max=7, step=2)
    trials, _ = followup.adaptive_rounds(cells, "base", rule, _fake_runner([]), metric="accuracy")
    ablation = {
        "design": "grid",
        "seeds": {"min": 3, "max": 7, "step": 2},
        "alpha": 0.05,
        "equivalence": 0.005,
        "baseline": {},
    }
    built = build_report(
        _folder(tmp_path, trials.to_dict("records"), "ablate", ablation), baseline="base"
    )
    stopping = built.stopping.set_index("cell")
    assert stopping["stopped"].to_dict() == {
        "clear": "better",
        "same": "equivalent",
        "noisy": "max reached",
    }
    assert stopping["seeds"].to_dict() == {"clear": 3, "same": 3, "noisy": 7}
    markdown = built.to_markdown()
    assert "- equivalence margin: +-0.005 (0.5 points of the metric)" in markdown
    assert "(from the spec)" in markdown
    assert "- design: group-sequential design, looks at 3, 5, 7 seeds" in markdown
    assert "why each stopped (alpha 0.05, equivalence margin 0.005)" in markdown


# ---------------------------------------------------------------------------------------------
# The study chain (kdray study): study.json, the budget, STUDY.md, on hand-made tables


def _study_spec(**study_block: Any):
    return _spec(
        tune={"metric": "accuracy", "mode": "max", "num_samples": 3, "resources": {"cpu": 2}},
        ablation={"seeds": {"min": 2, "max": 2, "step": 1}, "equivalence": 0.01},
        study={"confirm": {"top_k": 2, "seeds": 2}, **study_block},
    )


def _phase_rows(rows: list[dict]) -> list[dict]:
    """Rows as the phases write them: ok, 900 s each (x 2 CPUs = 0.5 CPU hours), teacher 0.80."""
    base = {"status": "ok", "metric": "accuracy", "wall_time": 900.0, "teacher.dev.accuracy": 0.8}
    return [{**base, **row} for row in rows]


SWEEP_ROWS = [
    {"trial_id": t, "best.dev.accuracy": a, "param.distill.algorithm": alg, "param.train.lr": lr}
    for t, a, alg, lr in (("t1", 0.70, "sid", 1e-4), ("t2", 0.65, "soft", 2e-4),
                          ("t3", 0.60, "soft", 3e-4))
]  # fmt: skip
WINNER = {"distill.algorithm": "sid", "train.lr": 1e-4}
CONFIRM_ROWS = [
    {"trial_id": f"r{rank}s{seed}", "cell": f"rank{rank}", "config_rank": rank, "seed": seed,
     "source": f"sweep:{src}", "sweep_score": score, "best.dev.accuracy": acc,
     followup.CONFIG_VALUES: json.dumps(values, sort_keys=True)}
    for rank, src, score, values, accs in (
        (1, "t1", 0.70, WINNER, (0.67, 0.69)),
        (2, "t2", 0.65, {"distill.algorithm": "soft", "train.lr": 2e-4}, (0.60, 0.62)),
    )
    for seed, acc in zip((1, 2), accs, strict=True)
]  # fmt: skip
# paired by seed with the recipe (0.68, 0.70): -attention -0.080/-0.079 (worse: CI clear of 0
# and the Holm-adjusted t-test p = 3 x 0.0057 < 0.05), init=random
# +0.004/-0.002 (mean +0.001 within the margin 0.01: equivalent), schedule=idal +0.03/-0.06
# (mean -0.015, CI across 0 and 2 seeds = max: not resolved)
ABLATION_ROWS = [
    {"trial_id": f"{cell}-{seed}", "cell": cell, "seed": seed, "best.dev.accuracy": acc}
    for cell, accs in (("recipe", (0.68, 0.70)), ("-attention", (0.60, 0.621)),
                       ("init=random", (0.684, 0.698)), ("schedule=idal", (0.71, 0.64)))
    for seed, acc in zip((1, 2), accs, strict=True)
]  # fmt: skip


def _fake_phases(spec: Any, calls: list[tuple[str, bool]]) -> dict[str, Any]:
    """Phase runners that write the hand-made tables (and experiment.json) as the real ones do."""
    from kdray.analysis import results
    from kdray.experiments import study

    def runner(phase: str, rows: list[dict], command: str, phase_spec: Any) -> Any:
        def run(out_dir: Path, again: bool, budget_spent: Any) -> tuple[pd.DataFrame, int]:
            calls.append((phase, again))
            out_dir.mkdir(parents=True, exist_ok=True)
            results.write_experiment(out_dir, phase_spec, command)
            trials = pd.DataFrame(_phase_rows(rows))
            trials.to_parquet(out_dir / results.TRIALS_FILE)
            return trials, len(rows)

        return run

    return {
        "sweep": runner("sweep", SWEEP_ROWS, "sweep", spec),
        "confirm": runner("confirm", CONFIRM_ROWS, "confirm", spec),
        "ablation": runner("ablation", ABLATION_ROWS, "ablate", study.ablation_spec(spec)),
    }


def test_a_study_block_is_validated_strictly_and_leaves_the_run_settings_alone() -> None:
    spec = _study_spec(budget={"trials": 10, "hours": 6})
    assert (spec.study.confirm.top_k, spec.study.budget.hours) == (2, 6.0)
    assert spec.fingerprint() == _spec().fingerprint()
    with pytest.raises(SpecError, match=r"study\.confirm\.seeds") as error:
        _study_spec(confirm={"top_k": 2, "seeds": 1})
    assert "greater than or equal to 2" in str(error.value)
    with pytest.raises(SpecError, match=r"study\.budget\.days"):
        _study_spec(budget={"days": 2})


def test_the_study_ablation_is_a_leave_one_out_with_adaptive_seeds_by_default() -> None:
    from kdray.experiments import study

    listed = _spec(ablation={"seeds": [1, 2], "equivalence": 0.01})
    ablation = study.ablation_spec(listed).ablation
    assert ablation.design == "leave_one_out"
    assert (ablation.seeds.min, ablation.seeds.max, ablation.seeds.step) == (3, 10, 2)
    assert ablation.equivalence == 0.01  # the rest of the spec's block is kept
    given = _spec(ablation={"seeds": {"min": 2, "max": 4, "step": 1}})
    assert study.ablation_spec(given).ablation.seeds == AdaptiveSeeds(min=2, max=4, step=1)


def test_a_study_runs_every_phase_once_and_records_each_as_done(tmp_path: Path) -> None:
    from kdray.experiments import study

    spec, calls = _study_spec(), []
    outcome = study.run_study(spec, tmp_path / "s", _fake_phases(spec, calls))
    assert calls == [("sweep", False), ("confirm", False), ("ablation", False)]
    record = json.loads((tmp_path / "s" / "study.json").read_text())
    assert {p: e["status"] for p, e in record["phases"].items()} == dict.fromkeys(
        ("sweep", "confirm", "ablation"), "done"
    )
    assert [record["phases"][p]["trials"] for p in ("sweep", "confirm", "ablation")] == [3, 4, 8]
    assert outcome.stopped is None and outcome.interrupted is None
    for phase in ("sweep", "confirm", "ablation"):
        assert (tmp_path / "s" / phase / "REPORT.md").read_text().startswith("# kdray report")
    # a second study in the same folder is refused with the ways out; --resume runs nothing new
    with pytest.raises(ValueError, match="--resume, or write elsewhere with --out DIR"):
        study.run_study(spec, tmp_path / "s", _fake_phases(spec, calls))
    study.run_study(spec, tmp_path / "s", _fake_phases(spec, calls), resume=True)
    assert len(calls) == 3


def test_study_md_states_the_recipe_its_confirmed_score_and_which_components_matter(
    tmp_path: Path,
) -> None:
    from kdray.experiments import study

    spec = _study_spec()
    study.run_study(spec, tmp_path / "s", _fake_phases(spec, []))
    text = (tmp_path / "s" / "STUDY.md").read_text()
    # rank1 confirmed at (0.67 + 0.69) / 2 = 0.68; CI half-width t(0.975, 1) 12.7062 x
    # sd 0.014142 / sqrt(2) = 0.1271; the sweep said 0.70 (curse +0.02); 0.68 / 0.80 = 85.0 %
    assert "Phases: sweep done; confirm done; ablation done." in text
    assert '- `distill.algorithm`: "sid"\n- `train.lr`: 0.0001\n' in text
    assert (
        "Confirmed dev accuracy: 0.6800, 95 % CI 0.5529 to 0.8071 (2 seeds); the sweep scored "
        "it 0.7000 (winner's curse +0.0200)." in text
    )
    assert "The teacher scores dev accuracy 0.8000; the recipe keeps 85.0 % of it" in text
    # One look at 2 seeds, Holm over 3 cells. -attention: diffs -0.080/-0.079, se 0.0005,
    # t -159 (1 dof), p 0.0040 < 0.05 / 3: worse, decided at level 1 - 0.05 / 3, so its interval
    # is the 98.3 % one: t(0.99167, 1) = 38.19, -0.0795 +- 0.0191.
    assert "Verdicts: fixed design, 2 seeds; Holm across the family at alpha 0.05" in text
    assert (
        "- `-attention` matters: the recipe is worse without it (keep it); dev accuracy -0.0795 "
        "vs the recipe, 98.3% interval -0.0986 to -0.0604, 2 seeds." in text
    )
    # init=random: mean +0.001 lies within the margin 0.01, but its TOST p is 0.102 (the 90 %
    # interval is not inside +-0.01): unresolved, not "equivalent" as the old point-estimate
    # rule said. 95 % interval: +0.001 +- 12.706 x 0.003.
    assert (
        "- `init=random` is unresolved at the maximum of seeds (whether it matters is not shown "
        "either way); dev accuracy +0.0010 vs the recipe, 95.0% interval -0.0371 to +0.0391, "
        "2 seeds." in text
    )
    assert "equivalent to the recipe" not in text
    assert (
        "- `schedule=idal` is unresolved at the maximum of seeds (whether it matters is not shown "
        "either way); dev accuracy -0.0150 vs the recipe, 95.0% interval -0.5868 to +0.5568, "
        "2 seeds." in text
    )
    # 3 / 4 / 8 runs of 900 s on 2 CPUs: 1.50 / 2.00 / 4.00 CPU hours
    assert "| sweep | done | 3 | - | 1.500 | 0.000 |" in text
    assert "| confirm | done | 4 | 2 | 2.000 | 0.000 |" in text
    assert "| ablation | done | 8 | 2 | 4.000 | 0.000 |" in text
    assert "- ablation: [ablation/REPORT.md](ablation/REPORT.md)" in text
    # the sid recipe optimises no hard-label term, so that component has nothing to take away
    assert "Not tested on this recipe:\n\n- `-hard`: hard is not active in the recipe" in text


def test_study_md_is_written_after_each_finished_phase_so_a_crash_leaves_what_is_known(
    tmp_path: Path,
) -> None:
    from kdray.experiments import study

    spec = _study_spec()
    phases = _fake_phases(spec, [])
    seen: list[str] = []

    def crashing_ablation(out_dir: Path, again: bool, spent: Any) -> tuple[pd.DataFrame, int]:
        seen.append((tmp_path / "s" / "STUDY.md").read_text())
        raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError, match="went away"):
        study.run_study(spec, tmp_path / "s", {**phases, "ablation": crashing_ablation})
    # written when the confirmation finished, before the ablation started
    assert "Phases: sweep done; confirm done; ablation not run." in seen[0]
    assert "Confirmed dev accuracy: 0.6800" in seen[0]
    assert (tmp_path / "s" / "STUDY.md").read_text() == seen[0]


def test_a_spent_trial_budget_stops_the_study_after_the_sweep_with_what_is_known(
    tmp_path: Path,
) -> None:
    from kdray.experiments import study

    spec, calls = _study_spec(budget={"trials": 3}), []
    outcome = study.run_study(spec, tmp_path / "s", _fake_phases(spec, calls))
    assert calls == [("sweep", False)]
    assert outcome.stopped == (
        "stopped before the confirm phase: the budget of 3 trials is spent (3 trials run)"
    )
    record = json.loads((tmp_path / "s" / "study.json").read_text())
    assert record["phases"]["sweep"]["status"] == "done"
    assert record["phases"]["confirm"]["status"] == "pending"
    text = (tmp_path / "s" / "STUDY.md").read_text()
    assert "Phases: sweep done; confirm pending; ablation not run." in text
    assert (
        "The study stopped before the confirm phase: the budget of 3 trials is spent (3 trials "
        "run); what follows is what is known so far." in text
    )
    assert "Only the sweep's best trial is known: `t1`, dev accuracy 0.7000, unconfirmed" in text
    assert "The teacher scores dev accuracy 0.8000; this trial keeps 87.5 % of it" in text
    assert "Not known yet: the ablation has not finished." in text
    assert "- sweep: [sweep/REPORT.md](sweep/REPORT.md)\n" in text
    assert "confirm/REPORT.md" not in text


def test_an_interrupted_phase_is_continued_with_resume_and_finished_ones_are_skipped(
    tmp_path: Path,
) -> None:
    from kdray.experiments import study

    spec, calls = _study_spec(), []
    phases = _fake_phases(spec, calls)
    real_confirm = phases["confirm"]

    def cut_short(out_dir: Path, again: bool, spent: Any) -> tuple[pd.DataFrame, int]:
        trials, expected = real_confirm(out_dir, again, spent)
        return trials.assign(status=["ok", "interrupted", "ok", "ok"]), expected

    outcome = study.run_study(spec, tmp_path / "s", {**phases, "confirm": cut_short})
    assert outcome.interrupted == "confirm"
    assert study.read_study(tmp_path / "s")["phases"]["confirm"]["status"] == "interrupted"
    assert "The confirm phase was interrupted: continue with --resume." in (
        (tmp_path / "s" / "STUDY.md").read_text()
    )
    study.run_study(spec, tmp_path / "s", phases, resume=True)
    assert calls == [("sweep", False), ("confirm", False), ("confirm", True), ("ablation", False)]


def _budget_study(trials: int):
    """The study spec with a trial budget and up to 4 ablation seeds (2 run: cells unresolved)."""
    return _spec(
        tune={"metric": "accuracy", "mode": "max", "num_samples": 3, "resources": {"cpu": 2}},
        ablation={"seeds": {"min": 2, "max": 4, "step": 1}, "equivalence": 0.01},
        study={"confirm": {"top_k": 2, "seeds": 2}, "budget": {"trials": trials}},
    )


def test_a_budget_spent_between_ablation_rounds_stops_there_and_resume_adds_the_seeds(
    tmp_path: Path,
) -> None:
    from kdray.experiments import study

    calls: list[tuple[str, bool]] = []
    phases = _fake_phases(_budget_study(8), calls)
    round_one = phases["ablation"]

    def adaptive(out_dir: Path, again: bool, spent: Any) -> tuple[pd.DataFrame, int]:
        trials, expected = round_one(out_dir, again, spent)  # round 1 writes its 8 rows
        reason = spent()  # as run_adaptive asks before round 2
        if reason:
            raise followup.SeedsStopped(reason, 1, trials, {})
        return trials, expected

    phases["ablation"] = adaptive
    # 3 sweep + 4 confirm trials = 7 < 8: the ablation starts; after its round 1, 15 >= 8
    outcome = study.run_study(_budget_study(8), tmp_path / "s", phases)
    assert outcome.stopped == (
        "stopped the ablation phase after its adaptive round 1: the budget of 8 trials is spent "
        "(15 trials run)"
    )
    assert outcome.interrupted is None
    entry = study.read_study(tmp_path / "s")["phases"]["ablation"]
    assert (entry["status"], entry["trials"]) == ("stopped", 8)
    text = (tmp_path / "s" / "STUDY.md").read_text()
    assert "Phases: sweep done; confirm done; ablation stopped." in text
    assert "The study stopped the ablation phase after its adaptive round 1" in text
    # round 1 is the design's first look (2 of 4 seeds): O'Brien-Fleming lets it spend
    # 2 - 2 Phi(1.96 / sqrt(0.5)) = 0.0056 of alpha, Holm over 3 cells 0.0019: -attention's
    # p 0.0040 does not reach it, so every cell says the budget stopped its seeds
    assert "- `-attention` is unresolved so far (the budget stopped its seeds" in text
    assert (
        "- `schedule=idal` is unresolved so far (the budget stopped its seeds; kdray study "
        "--resume with a larger study.budget adds more); dev accuracy -0.0150" in text
    )
    assert "- ablation: [ablation/REPORT.md](ablation/REPORT.md)" in text
    assert (tmp_path / "s" / "ablation" / "REPORT.md").exists()
    # a larger budget and --resume continue the stopped ablation (resume=True), nothing else
    study.run_study(_budget_study(20), tmp_path / "s", phases, resume=True)
    assert calls == [("sweep", False), ("confirm", False), ("ablation", False), ("ablation", True)]
    assert study.read_study(tmp_path / "s")["phases"]["ablation"]["status"] == "done"


def test_resume_without_a_study_says_there_is_nothing_to_continue(tmp_path: Path) -> None:
    from kdray.experiments import study

    with pytest.raises(ValueError, match="holds no study.json, so there is no study to continue"):
        study.run_study(_study_spec(), tmp_path / "s", {}, resume=True)


def test_a_study_killed_while_writing_its_first_record_starts_again(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from kdray.experiments import study

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "s"
    folder.mkdir()
    half = folder / f".study.json.tmp-{socket.gethostname()}@{dead.pid}-abc"
    half.write_text('{"name": ')  # the only thing a kill left: no study.json yet
    record = study.claim_study(folder, _study_spec(), resume=False)
    assert record["phases"] == {} and not half.exists()


def test_a_spent_hours_budget_names_the_hours_it_allowed_and_used() -> None:
    from kdray.experiments import study
    from kdray.spec import StudyBudgetSpec

    budget = StudyBudgetSpec(trials=50, hours=6)
    assert study.budget_reached(budget, 10, 5.99) is None
    assert study.budget_reached(budget, 10, 6.5) == (
        "the budget of 6 wall hours is spent (6.50 hours)"
    )


def test_an_interrupted_round_decides_nothing_and_resume_continues_that_round(tmp_path) -> None:
    spec = _spec(ablation={"seeds": {"min": 3, "max": 5, "step": 2}})
    cells = [{"cell": c, "values": {}, "source": "spec"} for c in ("base", "clear", "noisy")]
    calls: list[tuple[str, bool]] = []
    cut = {"s-round2"}  # Ctrl-C during round 2: one trial cut off, one never started

    def fake_run(spec, trials, *, name, command, cells, out_dir, resume, **options):
        calls.append((name, resume))
        rows = [
            {
                "trial_id": f"{name}-{t['cell']}-{t['seed']}",
                "status": "interrupted" if name in cut and i == 0 else "ok",
                "metric": "accuracy",
                "cell": t["cell"],
                "seed": t["seed"],
                "best.dev.accuracy": _value(t["cell"], t["seed"]),
            }
            for i, t in enumerate(trials)
        ]
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "experiment.json").write_text("{}")  # as run_trials writes before Tune starts
        kept = rows[:-1] if name in cut else rows
        followup.results.write_table(kept, out_dir / followup.results.TRIALS_FILE, replace=True)

    out = tmp_path / "abl"
    with pytest.raises(followup.RoundInterrupted, match="round 2 was interrupted") as stopped:
        followup.run_adaptive(spec, cells, "base", fake_run, name="s", out_dir=out)
    assert calls == [("s-round1", False), ("s-round2", False)]  # no round 3 from part of round 2
    assert stopped.value.planned == 13 and len(stopped.value.trials) == 12
    assert not (out / "rounds" / "round-3").exists()

    cut.clear()
    calls.clear()
    trials, decisions = followup.run_adaptive(
        spec, cells, "base", fake_run, name="s", out_dir=out, resume=True
    )
    assert calls == [("s-round1", True), ("s-round2", True)]  # both continued, none added
    assert len(trials) == 13 and set(trials["status"]) == {"ok"}
    assert {d.status for d in decisions.values()} == {"better", "max reached"}


def test_the_sid_cell_whose_three_seeds_a_bootstrap_called_clear_is_unresolved() -> None:
    """RTE sid vs soft, 3 seeds: differences +0.0289, +0.0217, +0.0072. The old percentile
    bootstrap interval [+0.0072, +0.0289] (their range) excluded 0; the t-test p is 0.098."""
    trials = pd.DataFrame(
        [
            {"cell": c, "seed": s, "status": "ok", "metric": "accuracy", "best.dev.accuracy": v}
            for s, d in ((1, 0.0289), (2, 0.0217), (3, 0.0072))
            for c, v in (("soft", 0.55), ("sid", 0.55 + d))
        ]
    )
    decisions = followup.seed_decisions(
        trials,
        "soft",
        "accuracy",
        "max",
        0.05,
        0.005,
        {"sid": 3},
        AdaptiveSeeds(min=3, max=3, step=1),
    )
    sid = decisions["sid"]
    assert sid.status == "max reached" and sid.level == pytest.approx(0.95)
    assert sid.ci_low < 0 < sid.ci_high  # mean 0.019267 +- 4.302653 x se 0.0063813
    assert sid.ci_low == pytest.approx(0.019267 - 4.302653 * 0.0063813, abs=2e-6)
