"""Verdicts from paired seeds, with error rates that hold: the one statistics room.

Every comparison kdray prints (report, confirm, ablate, study) is a cell against a baseline over
the seeds both ran, paired by seed. This module turns those paired differences into one of four
words, and records how:

- **better / worse**: the two-sided paired t-test rejects "no difference" at the level the
  design gives this look (Holm across the family's cells, alpha spent across looks); the printed
  interval is the t-interval at that level, so it excludes 0 exactly when the verdict says so.
- **equivalent within +-m**: two one-sided tests (TOST) reject "the difference is at least m"
  at that level: the (1 - 2 level) t-interval lies inside +-m.
- **unresolved**: neither; the interval says which effects the seeds have not ruled out. A
  non-significant difference is never "the same".

Seeds added in rounds (``min, min + step, ..., max``) are a group-sequential design: each look
may spend only its share of alpha by a Lan-DeMets spending function (O'Brien-Fleming or
Pocock), and a Bonferroni bound over the looks (the shares add up to alpha) keeps the whole
procedure's false better/worse rate, and its false "equivalent" rate, at alpha however many
looks it takes and whatever the looks' correlation. Across the family's cells, Holm's step-down
recycles a decided cell's share to the others (a graphical, Bonferroni-based multiple test).
A fixed list of seeds is the one-look case: plain Holm at alpha. ``benchmarks/bench_calibration``
shows the rates by simulation.

Exact sign-flip p-values and BCa bootstrap intervals (from 10 pairs on) are reported beside the
t-test, which decides: with 3 or 5 pairs no sign-flip test can go below 0.25 or 0.0625.

Pure numpy, scipy and statsmodels: no torch, no Ray, no pandas.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from scipy import stats as sst

BETTER, WORSE, EQUIVALENT, UNRESOLVED = "better", "worse", "equivalent", "unresolved"
WORDS = (BETTER, WORSE, EQUIVALENT, UNRESOLVED)
MIN_BOOTSTRAP_PAIRS = 10  # below this a bootstrap interval is about the range of the pairs
EXACT_SIGNFLIP_PAIRS = 16  # up to 2**16 sign patterns are enumerated; beyond, resampled
Spending = Literal["obrien_fleming", "pocock"]
SPENDING: tuple[str, ...] = ("obrien_fleming", "pocock")


# ---------------------------------------------------------------------------------------------
# One comparison


def _clean(diff: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(diff, dtype=float)
    return values[np.isfinite(values)]


def _mean_se(diff: np.ndarray) -> tuple[float, float]:
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(diff.size))


def t_interval(diff: Sequence[float] | np.ndarray, level: float) -> tuple[float, float]:
    """Two-sided ``level`` t-interval of the mean paired difference; NaN below 2 pairs, the
    mean itself when every difference is the same."""
    diff = _clean(diff)
    if diff.size < 2:
        return math.nan, math.nan
    mean, se = _mean_se(diff)
    half = float(sst.t.ppf(0.5 + level / 2, diff.size - 1)) * se
    return mean - half, mean + half


def ttest_p(diff: Sequence[float] | np.ndarray) -> float:
    """Two-sided paired t-test p of "mean difference 0"; NaN below 2 pairs; with no spread, 0
    for a non-zero difference and NaN when every difference is 0."""
    diff = _clean(diff)
    if diff.size < 2:
        return math.nan
    mean, se = _mean_se(diff)
    if se == 0:
        return math.nan if mean == 0 else 0.0
    return float(2 * sst.t.sf(abs(mean) / se, diff.size - 1))


def tost_p(diff: Sequence[float] | np.ndarray, margin: float) -> float:
    """Two one-sided t-tests of "the difference is at least ``margin`` away from 0": the larger
    of the two p-values (small: the difference lies within +-margin). NaN below 2 pairs."""
    diff = _clean(diff)
    if diff.size < 2 or margin <= 0:
        return math.nan
    mean, se = _mean_se(diff)
    if se == 0:
        return 0.0 if abs(mean) < margin else 1.0
    df = diff.size - 1
    lower = sst.t.sf((mean + margin) / se, df)  # H0: diff <= -margin
    upper = sst.t.cdf((mean - margin) / se, df)  # H0: diff >= +margin
    return float(max(lower, upper))


def signflip_p(diff: Sequence[float] | np.ndarray, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p of the mean difference (exact up to
    :data:`EXACT_SIGNFLIP_PAIRS` pairs: ``scipy.stats.permutation_test``). Its smallest possible
    value is ``2 / 2**n``: 0.25 at 3 pairs."""
    diff = _clean(diff)
    if diff.size < 2 or np.all(diff == 0):
        return math.nan
    resamples = 2**diff.size if diff.size <= EXACT_SIGNFLIP_PAIRS else 20000
    result = sst.permutation_test(
        (diff,),
        np.mean,
        permutation_type="samples",
        n_resamples=resamples,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
        vectorized=True,
    )
    return float(result.pvalue)


def bca_interval(
    diff: Sequence[float] | np.ndarray, level: float, seed: int = 0, n_boot: int = 10000
) -> tuple[float, float]:
    """BCa bootstrap interval of the mean difference, only from :data:`MIN_BOOTSTRAP_PAIRS`
    pairs on (NaN below: a bootstrap of 3 pairs is their range, about a 75 % interval)."""
    diff = _clean(diff)
    if diff.size < MIN_BOOTSTRAP_PAIRS:
        return math.nan, math.nan
    if np.all(diff == diff[0]):
        return float(diff[0]), float(diff[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = sst.bootstrap(
            (diff,),
            np.mean,
            n_resamples=n_boot,
            confidence_level=level,
            method="BCa",
            vectorized=True,
            rng=np.random.default_rng(seed),
        )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def adjust(p_values: Sequence[float], method: str = "holm") -> list[float]:
    """Multiplicity-adjusted p-values (``statsmodels.stats.multitest.multipletests``); NaN
    stays NaN and does not count as a test."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(np.isfinite(p))
    if valid.size:
        out[valid] = multipletests(p[valid], method=method)[1]
    return out.tolist()


# ---------------------------------------------------------------------------------------------
# The design: looks and the alpha each may spend


def spent(fraction: float, alpha: float, spending: str) -> float:
    """Cumulative alpha a Lan-DeMets spending function allows by information ``fraction``
    (seeds so far / the design's max): O'Brien-Fleming ``2 - 2 Phi(z_{1-alpha/2} / sqrt t)``
    (little early, nearly all of alpha at the end) or Pocock ``alpha ln(1 + (e - 1) t)``."""
    t = min(max(fraction, 0.0), 1.0)
    if t == 0:
        return 0.0
    if spending == "obrien_fleming":
        return float(2 - 2 * sst.norm.cdf(sst.norm.ppf(1 - alpha / 2) / math.sqrt(t)))
    if spending == "pocock":
        return float(alpha * math.log(1 + (math.e - 1) * t))
    raise ValueError(f"spending must be one of {', '.join(SPENDING)}, got {spending!r}")


@dataclass(frozen=True)
class Design:
    """How seeds are spent: looks at ``min, min + step, ...`` seeds up to ``max`` (one look when
    ``min == max``: a fixed list of seeds), ``alpha`` for each of the two families of errors
    (a false better/worse, a false equivalent), spent across looks by ``spending``, and the
    equivalence ``margin`` in the metric's units."""

    min: int
    max: int
    step: int = 1
    alpha: float = 0.05
    margin: float = 0.005
    spending: str = "obrien_fleming"

    def __post_init__(self) -> None:
        if not 2 <= self.min <= self.max or self.step < 1:
            raise ValueError(f"a design needs 2 <= min <= max and step >= 1, got {self}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be between 0 and 1, got {self.alpha!r}")
        spent(1.0, self.alpha, self.spending)  # a known spending function

    @classmethod
    def fixed(cls, n: int, alpha: float = 0.05, margin: float = 0.005) -> Design:
        return cls(min=max(n, 2), max=max(n, 2), alpha=alpha, margin=margin)

    @property
    def looks(self) -> list[int]:
        sizes = list(range(self.min, self.max, self.step)) + [self.max]
        return sorted(set(sizes))

    @property
    def sequential(self) -> bool:
        return len(self.looks) > 1

    def cumulative(self, n: int, alpha: float | None = None) -> float:
        """Alpha available by ``n`` seeds (all of it at ``max``; everything at one look)."""
        a = self.alpha if alpha is None else alpha
        return a if not self.sequential else spent(n / self.max, a, self.spending)

    def next_look(self, n: int) -> int | None:
        later = [size for size in self.looks if size > n]
        return later[0] if later else None

    def describe(self) -> str:
        if not self.sequential:
            return (
                f"fixed design, {self.max} seeds; Holm across the family at alpha {self.alpha:g}; "
                f"equivalence by TOST within +-{self.margin:g}"
            )
        name = {"obrien_fleming": "O'Brien-Fleming", "pocock": "Pocock"}[self.spending]
        shares = ", ".join(f"{n}: {self.cumulative(n):.4f}" for n in self.looks)
        return (
            f"group-sequential design, looks at {', '.join(map(str, self.looks))} seeds; "
            f"alpha {self.alpha:g} spent by {name} (cumulative by seeds: {shares}), Holm across "
            f"the family; equivalence by TOST within +-{self.margin:g}, spent the same way"
        )


# ---------------------------------------------------------------------------------------------
# Verdicts


@dataclass
class Verdict:
    """One cell's comparison with the baseline and how it was decided; ``low``/``high`` is the
    interval it was decided on, at confidence ``level``."""

    word: str  # better | worse | equivalent | unresolved
    n: int  # paired seeds it was decided on
    mean: float
    low: float
    high: float
    level: float
    p: float  # the deciding test's p (t-test, or TOST for equivalent); NaN below 2 pairs
    threshold: float  # the level that p was held against at this look
    method: str
    family: str
    family_size: int
    margin: float
    look: int  # 1-based index of the look that decided it (or the last look seen)
    final: bool = True  # False: unresolved with more seeds to come in the design
    p_signflip: float = math.nan
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _direction(mean: float, higher_is_better: bool) -> str:
    return BETTER if (mean > 0) == higher_is_better else WORSE


def _holm_look(
    p: dict[str, float], budget: dict[str, float], spent_so_far: dict[str, float], m: int
) -> tuple[set[str], dict[str, float]]:
    """Holm's step-down at one look: ``p`` of the cells tested here, ``budget[cell]`` the share
    of alpha its information allows per unit level (its spending fraction x alpha), of which
    ``spent_so_far`` is used. Returns the rejected cells and each tested cell's threshold."""
    rejected: set[str] = set()
    thresholds: dict[str, float] = {}
    order = sorted((c for c in p if np.isfinite(p[c])), key=lambda c: (p[c], c))
    for cell in order:
        size = max(m - len(rejected), 1)
        thresholds[cell] = max(budget[cell] / size - spent_so_far.get(cell, 0.0), 0.0)
        if p[cell] <= thresholds[cell]:
            rejected.add(cell)
        else:
            break
    size = max(m - len(rejected), 1)
    for cell in p:  # every cell tested but not rejected used its share at the final size
        if cell not in rejected:
            thresholds[cell] = max(budget[cell] / size - spent_so_far.get(cell, 0.0), 0.0)
    return rejected, thresholds


def _decided(
    word: str, data: np.ndarray, p: float, threshold: float, sides: float, look: int
) -> Verdict:
    """A verdict decided at ``threshold`` with the interval it was decided on: (1 - threshold)
    for a difference, (1 - 2 threshold) for TOST (``sides`` 2)."""
    level = max(1 - sides * threshold, 0.0)
    low, high = t_interval(data, level)
    method = "paired t-test" if word != EQUIVALENT else "TOST (two one-sided t-tests)"
    mean = float(data.mean())
    return Verdict(
        word, int(data.size), mean, low, high, level, p, threshold, method, "", 0, 0, look
    )


def _unresolved(data: np.ndarray, design: Design, look: int, final: bool) -> Verdict:
    """A cell no look decided, with every pair it has: the (1 - alpha) interval of what is
    known now."""
    mean = float(data.mean()) if data.size else math.nan
    low, high = t_interval(data, 1 - design.alpha)
    return Verdict(
        UNRESOLVED, int(data.size), mean, low, high, 1 - design.alpha, ttest_p(data), math.nan,
        "paired t-test", "", 0, design.margin, look, final=final,
    )  # fmt: skip


def sequential_verdicts(
    diffs: dict[str, Sequence[float] | np.ndarray],
    design: Design | dict[str, Design],
    *,
    higher_is_better: bool = True,
    family: str = "",
    complete: set[str] | None = None,
    signflip: bool = True,
) -> dict[str, Verdict]:
    """Replay the design's looks (``design``: one for every cell, or one per cell when a family
    spans experiments of different designs) over each cell's paired differences (in seed
    order: seed 1 first) and return where each cell stands: decided at the first look that
    decides it, or unresolved (``final`` False while the design has more seeds for it).

    Two families of ``len(diffs)`` hypotheses each, both at ``design.alpha``: "no difference"
    (rejected: better/worse) and "a difference of at least the margin" (rejected: equivalent).
    At each look a cell's test may use its spending share minus what earlier looks used, divided
    Holm-wise among the family's hypotheses not yet rejected. A pure function of the tables, so
    a resumed or re-read folder reaches the same verdicts.

    ``complete``: cells that get no more seeds although they have fewer than ``design.max``
    pairs (failed trials, a spent budget); they take the last look with what they have. Every
    cell is complete in a one-look design. ``signflip``: also record the exact sign-flip p (off
    in simulations, where it would cost most of the time).
    """
    arrays = {cell: _clean(values) for cell, values in diffs.items()}
    designs = design if isinstance(design, dict) else dict.fromkeys(arrays, design)
    m = len(arrays)
    family = family or f"{m} cells against one baseline"
    open_cells = set(arrays)
    done: dict[str, Verdict] = {}
    used_d: dict[str, float] = {}
    used_e: dict[str, float] = {}
    rejected_d: set[str] = set()
    rejected_e: set[str] = set()
    last_look: dict[str, int] = {}
    ended = {c for c in arrays if not designs[c].sequential or arrays[c].size >= designs[c].max}
    ended |= set(complete or ())
    for n in sorted({size for d in designs.values() for size in d.looks}):
        here = {c for c in open_cells if n in designs[c].looks and arrays[c].size >= n}
        # a cell's last look: it takes it with what it has once its seeds have ended
        here |= {c for c in open_cells & ended if n == designs[c].max and arrays[c].size >= 2}
        if not here:
            continue
        data = {c: arrays[c][:n] for c in here}
        budget = {c: designs[c].cumulative(n) for c in here}
        p_d = {c: ttest_p(data[c]) for c in here}
        p_e = {c: tost_p(data[c], designs[c].margin) for c in here}
        new_d, thr_d = _holm_look(p_d, budget, used_d, m - len(rejected_d))
        new_e, thr_e = _holm_look(p_e, budget, used_e, m - len(rejected_e))
        rejected_d |= new_d
        rejected_e |= new_e
        for cell in here:
            index = designs[cell].looks.index(n) + 1
            last_look[cell] = index
            if cell in new_d:
                word = _direction(float(data[cell].mean()), higher_is_better)
                done[cell] = _decided(word, data[cell], p_d[cell], thr_d[cell], 1.0, index)
            elif cell in new_e:
                done[cell] = _decided(EQUIVALENT, data[cell], p_e[cell], thr_e[cell], 2.0, index)
            if cell in done:
                done[cell].family, done[cell].family_size = family, m
                done[cell].margin = designs[cell].margin
            used_d[cell] = used_d.get(cell, 0.0) + thr_d.get(cell, 0.0)
            used_e[cell] = used_e.get(cell, 0.0) + thr_e.get(cell, 0.0)
        open_cells -= set(done)
    for cell in arrays:
        if cell not in done:
            look = last_look.get(cell, 0)
            done[cell] = _unresolved(arrays[cell], designs[cell], look, cell in ended)
            done[cell].family, done[cell].family_size = family, m
    for verdict, values in ((done[c], arrays[c]) for c in arrays if signflip):
        verdict.p_signflip = signflip_p(values[: verdict.n]) if verdict.n >= 2 else math.nan
    return {cell: done[cell] for cell in arrays}


def words(verdict: Verdict, scale: float = 100.0, unit: str = "points", examples: int = 0) -> str:
    """A verdict in the one vocabulary, with its interval; differences in ``unit`` (metric x
    ``scale``), the margin also in dev examples when ``examples`` (the dev set's size) is
    given. Never calls an unresolved difference "the same"."""

    def pts(value: float) -> str:
        return f"{value * scale:+.2f}"

    interval = f"[{pts(verdict.low)}, {pts(verdict.high)}] {unit} ({verdict.level:.1%} interval)"
    margin = f"+-{verdict.margin * scale:.2f} {unit}" + (
        f" (+-{verdict.margin * examples:.1f} dev examples)" if examples else ""
    )
    if verdict.word in (BETTER, WORSE):
        small = -verdict.margin < verdict.low and verdict.high < verdict.margin
        note = f" (inside the {margin} margin: a negligible difference)" if small else ""
        return f"{verdict.word}: {pts(verdict.mean)} {unit}, {interval}, {verdict.n} seeds{note}"
    if verdict.word == EQUIVALENT:
        return f"equivalent within {margin}: {pts(verdict.mean)} {unit}, {interval}"
    if not np.isfinite(verdict.low):
        return f"unresolved: too few paired seeds ({verdict.n})"
    reach = max(abs(verdict.low), abs(verdict.high)) * scale
    return (
        f"unresolved: {pts(verdict.mean)} {unit}, {interval}: effects up to {reach:.2f} {unit} "
        f"not ruled out, equivalence within {margin} not shown"
    )
