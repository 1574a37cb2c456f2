"""The statistics room: intervals, tests, the group-sequential design and verdicts, with values
computed by hand, the old rules fed in and refused, and the calibration by simulation."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from conftest import REPO
from kdray.analysis import stats as S


def test_the_t_interval_of_three_differences_matches_the_hand_computation() -> None:
    # 0.01, 0.02, 0.06: mean 0.03, sd sqrt(0.0007), se sd / sqrt 3, t(0.975, 2) = 4.302653
    low, high = S.t_interval([0.01, 0.02, 0.06], 0.95)
    half = 4.302653 * math.sqrt(0.0007) / math.sqrt(3)
    assert (low, high) == (pytest.approx(0.03 - half, rel=1e-6), pytest.approx(0.03 + half))
    assert S.t_interval([0.02], 0.95) == pytest.approx((math.nan, math.nan), nan_ok=True)
    assert S.t_interval([0.02, 0.02, 0.02], 0.95) == pytest.approx((0.02, 0.02))


def test_the_paired_t_test_p_matches_the_closed_form_for_two_dof() -> None:
    diff = np.array([0.01, 0.02, 0.06])
    t = diff.mean() / (diff.std(ddof=1) / math.sqrt(3))
    assert S.ttest_p(diff) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)
    assert S.ttest_p([0.01, 0.01]) == 0.0  # no spread, not zero: t is infinite
    assert math.isnan(S.ttest_p([0.0, 0.0, 0.0]))


def test_tost_p_is_the_larger_one_sided_p_and_matches_the_interval_rule() -> None:
    # +0.004, -0.002 (1 dof): mean 0.001, se 0.003; against +-0.01:
    # P(T > 11/3) = 1/2 - atan(11/3)/pi = 0.0848, P(T < -3) = 1/2 - atan(3)/pi = 0.1024
    p = S.tost_p([0.004, -0.002], 0.01)
    assert p == pytest.approx(0.5 - math.atan(3) / math.pi, rel=1e-9)
    # equivalent at level a exactly when the (1 - 2a) interval lies inside the margin
    low, high = S.t_interval([0.004, -0.002], 1 - 2 * p)
    assert high == pytest.approx(0.01, rel=1e-9) and low > -0.01


def test_sign_flip_p_cannot_go_below_two_over_two_to_the_n() -> None:
    assert S.signflip_p([0.01, 0.02, 0.03]) == pytest.approx(2 / 2**3)
    assert S.signflip_p([0.01, 0.02, 0.03, 0.04, 0.05]) == pytest.approx(2 / 2**5)
    # one negative difference among three: patterns with |mean| >= 0.02/3 ... by enumeration
    diff = np.array([0.03, 0.02, -0.01])
    signs = np.array([[a, b, c] for a in (1, -1) for b in (1, -1) for c in (1, -1)])
    means = np.abs((signs * diff).mean(axis=1))
    assert S.signflip_p(diff) == pytest.approx(np.mean(means >= abs(diff.mean()) - 1e-12))


def test_the_bootstrap_is_only_given_from_ten_pairs_on() -> None:
    rng = np.random.default_rng(0)
    assert all(math.isnan(v) for v in S.bca_interval(rng.normal(0.02, 0.01, 9), 0.95))
    low, high = S.bca_interval(rng.normal(0.02, 0.01, 12), 0.95)
    assert low < high and low > -0.01


def test_holm_adjustment_comes_from_statsmodels_and_skips_nan() -> None:
    # Holm by hand: sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 0.04)
    assert S.adjust([0.04, 0.01, float("nan"), 0.03]) == pytest.approx(
        [0.06, 0.03, float("nan"), 0.06], nan_ok=True
    )


def test_the_spending_functions_give_the_textbook_shares() -> None:
    # O'Brien-Fleming at half the information: 2 - 2 Phi(1.959964 / sqrt(0.5)) = 0.005575
    assert S.spent(0.5, 0.05, "obrien_fleming") == pytest.approx(0.005575, abs=2e-6)
    # Pocock: 0.05 ln(1 + (e - 1) / 2) = 0.031006
    assert S.spent(0.5, 0.05, "pocock") == pytest.approx(0.05 * math.log(1 + (math.e - 1) / 2))
    for kind in S.SPENDING:
        assert S.spent(1.0, 0.05, kind) == pytest.approx(0.05)
        assert S.spent(0.0, 0.05, kind) == 0.0
    with pytest.raises(ValueError, match="spending must be one of"):
        S.spent(0.5, 0.05, "haybittle")


def test_the_shipped_adaptive_design_looks_at_3_5_7_9_and_10_seeds() -> None:
    design = S.Design(3, 10, 2)
    assert design.looks == [3, 5, 7, 9, 10] and design.sequential
    assert design.next_look(5) == 7 and design.next_look(10) is None
    assert design.cumulative(10) == pytest.approx(0.05)
    assert S.Design.fixed(5).looks == [5] and not S.Design.fixed(5).sequential
    assert "O'Brien-Fleming" in design.describe() and "looks at 3, 5, 7, 9, 10" in design.describe()
    with pytest.raises(ValueError, match="2 <= min <= max"):
        S.Design(5, 3, 1)


def test_holm_recycles_a_decided_cells_share_to_the_next() -> None:
    # one look at 3 seeds: A's p is tiny; B's differences 0.02 -+ 0.007217 give t = 4.8 and
    # p 0.0408: above 0.05 / 2 but below 0.05, the level B gets once A is rejected
    b = [0.02 - 0.007217, 0.02, 0.02 + 0.007217]
    verdicts = S.sequential_verdicts({"A": [0.03, 0.031, 0.032], "B": b}, S.Design.fixed(3))
    assert S.ttest_p(b) == pytest.approx(0.0408, abs=5e-4)
    assert verdicts["A"].word == "better" and verdicts["A"].threshold == pytest.approx(0.025)
    assert verdicts["B"].word == "better" and verdicts["B"].threshold == pytest.approx(0.05)
    assert verdicts["B"].level == pytest.approx(0.95)  # the interval it was decided on
    assert verdicts["B"].low > 0 and verdicts["B"].family_size == 2
    alone = S.sequential_verdicts({"B": b, "C": [0.05, -0.04, 0.01]}, S.Design.fixed(3))
    assert alone["B"].word == "unresolved"  # C is not rejected: B's share stays 0.05 / 2


def test_a_point_estimate_inside_the_margin_is_not_equivalent_without_its_interval() -> None:
    """The old rule called a cell equivalent when |mean| <= margin, whatever its interval."""
    diff = [0.012, -0.011, 0.002]  # mean +0.001, but the 90 % interval spans about +-0.02
    verdict = S.sequential_verdicts({"c": diff}, S.Design.fixed(3))["c"]
    assert abs(np.mean(diff)) <= 0.005
    assert verdict.word == "unresolved"
    words = S.words(verdict)
    assert words.startswith("unresolved: +0.10 points") and "not ruled out" in words
    tight = S.sequential_verdicts({"c": [0.001, -0.001, 0.0005]}, S.Design.fixed(3))["c"]
    assert tight.word == "equivalent" and -0.005 < tight.low and tight.high < 0.005
    assert tight.level == pytest.approx(0.90)  # (1 - 2 alpha)


def test_an_early_look_spends_only_its_share_of_alpha() -> None:
    # 3 of 10 seeds (t = 0.3): O'Brien-Fleming allows 2 - 2 Phi(1.96 / sqrt 0.3) = 0.00035, so
    # a p of 0.0408 at the first look is no verdict; the same data with seeds ended (complete)
    # take the last look's full alpha
    b = [0.02 - 0.007217, 0.02, 0.02 + 0.007217]
    design = S.Design(3, 10, 2)
    early = S.sequential_verdicts({"B": b}, design)["B"]
    assert early.word == "unresolved" and not early.final
    ended = S.sequential_verdicts({"B": b}, design, complete={"B"})["B"]
    assert ended.word == "better"
    assert ended.threshold == pytest.approx(0.05 - S.spent(0.3, 0.05, "obrien_fleming"))


def test_verdict_words_use_one_vocabulary_and_the_decided_interval() -> None:
    verdicts = S.sequential_verdicts(
        {"up": [0.03, 0.031, 0.032], "down": [-0.03, -0.031, -0.032]}, S.Design.fixed(3)
    )
    assert S.words(verdicts["up"]).startswith("better: +3.10 points, [")
    assert S.words(verdicts["down"]).startswith("worse: -3.10 points")
    assert {v.word for v in verdicts.values()} <= set(S.WORDS)
    assert "equivalent within +-0.50 points (+-1.4 dev examples)" in S.words(
        S.sequential_verdicts({"c": [0.001, -0.001, 0.0005]}, S.Design.fixed(3))["c"],
        examples=277,
    )


def _calibration() -> object:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_calibration

    return bench_calibration


def test_the_shipped_adaptive_design_keeps_false_verdicts_at_alpha_by_simulation() -> None:
    """The full procedure (adaptive seeds 3..10, step 2, O'Brien-Fleming) on 1500 simulated
    paired questions with a fixed seed: false better/worse under no effect, and "equivalent"
    under a true effect of 2x the margin, both at most alpha + 3 Monte Carlo standard errors."""
    bench = _calibration()
    design = bench.designs()["adaptive-obf"]
    reps, se = 1500, math.sqrt(0.05 * 0.95 / 1500)
    null = bench.simulate(design, 0.0, 0.015, reps, seed=11)
    assert null["better"] + null["worse"] <= 0.05 + 3 * se
    effect = bench.simulate(design, 2 * design.margin, 0.01, reps, seed=12)
    assert effect["equivalent"] <= 0.05 + 3 * se
    power = bench.simulate(design, 0.02, 0.01, reps, seed=13)
    assert power["better"] > 0.5  # a 2-point effect at sd 0.01 is found most of the time


def test_the_old_rule_would_fail_the_same_simulation() -> None:
    """The old "equivalent when |mean| <= margin" rule, fed the simulated 2x-margin effect, calls
    far more than alpha equivalent: the calibration test above is able to fail."""
    rng = np.random.default_rng(12)
    n, sd, effect, margin = 3, 0.015, 0.01, 0.005
    base = np.round((0.6 + rng.normal(0, sd, (2000, n))) * 277) / 277
    cell = np.round((0.6 + effect + rng.normal(0, sd, (2000, n))) * 277) / 277
    old_rule = np.abs((cell - base).mean(axis=1)) <= margin
    assert old_rule.mean() > 0.15


def test_a_shown_but_negligible_difference_says_both() -> None:
    verdict = S.sequential_verdicts({"c": [0.001, 0.0012, 0.0008]}, S.Design.fixed(3))["c"]
    assert verdict.word == "better"
    assert S.words(verdict).endswith("(inside the +-0.50 points margin: a negligible difference)")
