"""Re-derive every committed report and study from its tables under kdray's current statistics.

    python results/rederive.py      # from the repository root, offline variables set

Rewrites each folder's REPORT.md (and plots), the RTE study's phase reports and STUDY.md, and
prints one line per verdict: the folder, the cell, its seeds, the difference with the interval
it was decided on, and the verdict. The tables themselves are never touched: the evidence stays
what it was, only the reading of it follows the rules in ``kdray.analysis.stats``.

Questions answered by several folders are one family (``kdray report --family-with``): claim 1
on RTE (the 3-epoch-teacher grid and the 10-epoch-teacher adaptive re-run) and on MRPC (the
3-seed grid and the adaptive follow-up of ``pid``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent
sys.path.insert(0, str(RESULTS.parent))  # this checkout's kdray

from kdray.analysis import plots, report, results  # noqa: E402
from kdray.experiments import study  # noqa: E402
from kdray.experiments import teacher_search as ts  # noqa: E402
from kdray.spec import Spec  # noqa: E402
from kdray.training import data  # noqa: E402

# folder -> the other folders of its question (its family)
FOLDERS: dict[str, list[str]] = {
    "rte-cpu-ablation": ["rte-claim1-ablation"],
    "rte-claim1-ablation": ["rte-cpu-ablation"],
    "mrpc-cpu-ablation": ["mrpc-claim1-ablation"],
    "mrpc-claim1-ablation": ["mrpc-cpu-ablation"],
    "rte-cpu-confirm": [],
    # claim 1 again with the searched teacher (another teacher, length 128): its own family
    "rte-minilm-claim1-ablation": [],
    "mrpc-minilm-claim1-ablation": [],
}
STUDY = "rte-study"
# The study's confirmation predates the control cell; the spec as written (sid, skip, T 1,
# weights 1, lr 5e-5) ran with the same teacher, data and epochs in rte-claim1-ablation.
CONTROL = ("rte-study/ablation", "recipe", "rte-claim1-ablation", "distill.algorithm=sid")


def rewrite(name: str, family: list[str]) -> report.Report:
    folder = Path("results") / name
    built = report.build_report(folder, family_with=[Path("results") / f for f in family])
    plots.draw(built, folder / "plots")
    built.save(folder / "REPORT.md")
    return built


def verdict_lines(name: str, built: report.Report) -> list[str]:
    if built.family is not None:
        return [
            f"{name} | {row.cell} | {row.n_pairs} | {row.mean_diff:+.4f} "
            f"[{row.low:+.4f}, {row.high:+.4f}] ({row.level:.1%}) | {row.verdict} (family of "
            f"{len(built.family)})"
            for row in built.family.itertuples()
            if row.folder == name
        ]
    if built.findings is None:
        return []
    short = str(built.metric).removeprefix("dev.")
    return [
        f"{name} | {row['cell']} | {row['n_pairs']} | {row[f'{short}.diff']:+.4f} "
        f"{row['interval']} | {row[f'{short}.verdict']}"
        for row in built.findings.to_dict("records")
    ]


def control() -> str:
    """CONTROL.md of the study: its recipe against the spec as written, paired by seed."""

    from kdray.analysis import stats

    folder, cell, other, default = CONTROL
    mine = results.load(Path("results") / folder)[0]
    theirs = results.load(Path("results") / other)[0]

    def scores(trials: pd.DataFrame, name: str) -> pd.Series:
        rows = trials[(trials["cell"] == name) & (trials["status"] == "ok")]
        return rows.set_index("seed")["best.dev.accuracy"]

    a, b = scores(mine, cell), scores(theirs, default)
    teachers = set(mine["teacher.id"]) | set(theirs["teacher.id"])
    seeds = sorted(set(a.index) & set(b.index))
    diff = (a[seeds] - b[seeds]).to_numpy()
    verdict = stats.sequential_verdicts({"recipe": diff}, stats.Design.fixed(len(diff)))["recipe"]
    lines = [
        "# rte-study: the recipe against the spec as written",
        "",
        "The study's confirmation ran before confirmations had a control cell, so STUDY.md cannot",
        f"say this from its own tables. The spec as written (`{default}` in `{other}`) ran with",
        f"the same teacher ({', '.join(sorted(teachers))}), data and epochs; paired by seed with",
        f"the study's recipe (`{cell}` in `{folder}`), seeds {seeds[0]}-{seeds[-1]}:",
        "",
        "| seed | recipe | spec as written | difference |",
        "| --- | --- | --- | --- |",
        *(f"| {s} | {a[s]:.4f} | {b[s]:.4f} | {a[s] - b[s]:+.4f} |" for s in seeds),
        "",
        f"Verdict (kdray.analysis.stats, a family of one, {verdict.method}, p {verdict.p:.4f}): "
        f"{stats.words(verdict, examples=277)}.",
        "",
        "kdray would not recommend this recipe: it is worse than the spec as written."
        if verdict.word == stats.WORSE
        else "",
        "Written by `python results/rederive.py`.",
    ]
    return "\n".join(lines) + "\n"


def rewrite_teacher_report(folder: Path) -> str:
    """A teacher search's ``TEACHER.md`` again from its tables and spec."""
    spec = Spec.model_validate(report.read_experiment(folder)["spec"])
    trials = pd.read_parquet(folder / ts.SEARCH_FILE)
    confirm = pd.read_parquet(folder / ts.CONFIRM_FILE)
    metric = data.task_of(spec).main_metric  # as the search chose and wrote it
    text = ts.teacher_markdown(spec, trials, confirm, metric)
    (folder / ts.TEACHER_REPORT).write_text(text)
    return f"{folder.name}: TEACHER.md written again"


def main() -> None:
    lines = []
    for name, family in FOLDERS.items():
        lines += verdict_lines(name, rewrite(name, family))
    folder = Path("results") / STUDY
    for phase in study.PHASES:
        study.write_phase_report(folder / phase)
    record = study.read_study(folder)
    spec = Spec.model_validate(report.read_experiment(folder / "sweep")["spec"])
    (folder / study.STUDY_REPORT).write_text(study.study_markdown(spec, folder, record))
    built = report.build_report(folder / "ablation")
    lines += verdict_lines(f"{STUDY}/ablation", built)
    (folder / "CONTROL.md").write_text(control())
    confirm = study.phase_trials(folder, "confirm")
    lines.append(f"{STUDY}/confirm has a default cell: {'default' in set(confirm['cell'])}")
    for teacher_md in sorted(Path("results").glob(f"*/{ts.TEACHER_REPORT}")):
        lines.append(rewrite_teacher_report(teacher_md.parent))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
