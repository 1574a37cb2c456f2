"""Thin typer commands: parse arguments, call the library, show progress and tables."""

from __future__ import annotations

import contextlib
import math
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from kdray.infra import faults
from kdray.spec import Spec, SpecError, load_spec

console = Console()


@dataclass
class _Job:
    """The command under way, for an I/O failure's paragraph: its arguments, its results
    folder once known, when it started, and I/O failures in background threads."""

    argv: list[str] = field(default_factory=list)
    out: Path | None = None
    started: float = 0.0
    thread_failures: list[faults.IOFailure] = field(default_factory=list)


_JOB = _Job()


class _Commands(TyperGroup):
    """kdray's commands: an I/O failure anywhere in one (a full disk, a read-only or failing
    file system, in the results folder, a cache or the Ray storage) ends it with one paragraph
    and exit code 2 instead of a traceback; so does one in a background thread (TensorBoard's
    writer), which would otherwise print its own traceback and let the command go on."""

    def invoke(self, ctx: Any) -> Any:
        global _JOB
        _JOB = _Job(argv=[*ctx._protected_args, *ctx.args], started=time.time())
        previous = threading.excepthook
        threading.excepthook = _thread_hook(previous)
        try:
            done = super().invoke(ctx)
        except Exception as error:
            failure = faults.io_failure(error)
            if failure is None:
                raise
            _io_stop(failure)
        finally:
            threading.excepthook = previous
        if _JOB.thread_failures:
            _io_stop(_JOB.thread_failures[0])
        return done


def _thread_hook(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    def hook(args: Any) -> None:
        failure = faults.io_failure(args.exc_value) if args.exc_value is not None else None
        if failure is None:
            previous(args)
        else:
            _JOB.thread_failures.append(failure)

    return hook


def _continue_command(argv: list[str]) -> str:
    """The command line that carries on after the failure: the same one with ``--resume`` for
    the commands that resume (a study, and :data:`kdray.analysis.results.RESUMABLE`: a teacher
    search, not a plain ``kdray teacher``; never with ``--overwrite``, which would move the results
    aside again), else the same one with ``--overwrite`` so the half run is replaced."""
    from kdray.analysis.results import RESUMABLE

    name = argv[0] if argv else "run"
    args = [a for a in argv[1:] if a not in ("--overwrite", "--resume")]
    if name == "study" or (name in RESUMABLE and (name != "teacher" or "--search" in args)):
        args.append("--resume")
    elif name == "run":
        args.append("--overwrite")
    return shlex.join(["kdray", name, *args])


def _kept(out: Path | None) -> str:
    """What the failed command leaves in its results folder, and where an ``--overwrite`` of
    this command put the earlier results."""
    if out is None:
        return "Nothing of this command's results was written yet."
    trials = out / "trials.parquet"
    text = f"No finished results of this command were kept in {out}"
    if trials.is_file():
        text = f"Kept: the tables of what finished, in {out}"
        try:
            import pandas as pd

            counts = pd.read_parquet(trials, columns=["status"])["status"].value_counts()
            text += " (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")"
        except Exception:  # noqa: BLE001 - the paragraph must not fail on a table it reads
            pass
    moved = [
        p
        for p in out.parent.glob(f"{out.name}.old-*")
        if p.is_dir() and p.stat().st_mtime >= _JOB.started - 1
    ]
    if moved:
        text += f"; --overwrite moved the earlier results to {max(moved, key=lambda p: p.name)}"
    return text + "."


def _io_stop(failure: faults.IOFailure) -> None:
    """End the command with the one paragraph an I/O failure gets, exit code 2."""
    where = f" writing {failure.path}" if failure.path else ""
    command = _JOB.argv[0] if _JOB.argv else "kdray"
    console.print(
        f"[red]kdray {command} stopped: {failure.reason}{escape(where)}.[/red] Every table, "
        f"student and cache is written beside its place and renamed in whole, so nothing "
        f"half-written is used. {escape(_kept(_JOB.out))} Free space on that file system (or "
        f"write elsewhere: --out, --storage, $KDRAY_CACHE_DIR, $TMPDIR), then continue with: "
        f"{escape(_continue_command(_JOB.argv))}",
        soft_wrap=True,
        highlight=False,
    )
    raise typer.Exit(2)


def _working_in(folder: Path) -> Path:
    """Note the command's results folder (for an I/O failure's paragraph) and return it."""
    _JOB.out = Path(folder)
    return _JOB.out


app = typer.Typer(
    cls=_Commands,
    help="Knowledge distillation from internal representations, at scale.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _show_kdray_log() -> None:
    """kdray's own log lines (sweep phases, cache decisions) on the console."""
    import logging

    from rich.logging import RichHandler

    log = logging.getLogger("kdray")
    if not any(isinstance(h, RichHandler) for h in log.handlers):
        log.addHandler(RichHandler(console=console, show_path=False))
    log.setLevel(logging.INFO)


def _progress() -> Any:
    from kdray.infra.progress import RichProgress

    return RichProgress(console)


def _trials_table(spec: Spec, horizon: str = "train") -> Any:
    from kdray.experiments.sweep import LiveTrials
    from kdray.infra.progress import TrialsTable
    from kdray.training.distill import selection_metric

    return LiveTrials(spec, TrialsTable(spec.name, selection_metric(spec), console), horizon)


@contextlib.contextmanager
def _settings_errors() -> Iterator[None]:
    """Settings that cannot work (spec, data, models, maps, metric, nothing to resume) end the
    command with their message and exit code 2, never a traceback."""
    from kdray.training.data import DataError
    from kdray.training.models import ModelError

    try:
        yield
    except (SpecError, DataError, ModelError, ValueError, FileNotFoundError) as error:
        name = type(error).__name__
        shown = str(error) if isinstance(error, SpecError) else f"{name}: {error}"
        console.print(f"[red]{shown}[/red]", highlight=False, soft_wrap=True)  # paths unbroken
        raise typer.Exit(2) from None


SearchSpecArgument = Annotated[
    Path, typer.Argument(help="A YAML spec with a search block.", metavar="SPEC")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a setting: key.path=value (repeatable)."),
]
AddressOption = Annotated[
    str | None, typer.Option(help="Join an existing Ray cluster: auto or ray://host:port.")
]
OverwriteOption = Annotated[
    bool,
    typer.Option(
        help="Start over in a results folder that holds another experiment: the old folder is "
        "moved aside to <folder>.old-<UTC time>."
    ),
]
StorageOption = Annotated[
    str | None,
    typer.Option(help="Ray storage: a path or URI such as s3://... (default <tables>/ray)."),
]


def _load(spec_path: Path, overrides: list[str] | None) -> Spec:
    try:
        spec = load_spec(spec_path, overrides or [])
    except SpecError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    return _concrete_length(spec)


def _concrete_length(spec: Spec) -> Spec:
    """``data.max_seq_length: auto`` as the number it stands for, said once, before compute
    (everything after, caches and fingerprints included, sees the number)."""
    if spec.data.max_seq_length != "auto":
        return spec
    from kdray.training import data

    with _settings_errors():
        resolved, stats = data.resolve_max_seq_length(spec)
    console.print(
        f"data.max_seq_length auto -> {resolved.data.max_seq_length}: keeps "
        f"{1 - stats.cut:.1%} of the training examples whole ({stats.describe()})",
        soft_wrap=True,
    )
    return resolved


def _results_dir(spec: Spec, out: Path | None) -> Path:
    return _working_in(out or Path("results") / spec.name)


def _cluster_resources(address: str | None, spec: Spec) -> dict[str, Any] | None:
    if not address:
        return None
    from kdray.experiments.sweep import cluster_resources

    try:
        return cluster_resources(address, spec.tune.runtime_env)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ValueError(f"cannot join the Ray cluster at --address {address}: {error}") from None


def _preflight(spec: Spec, command: str, out: Path | None, **options: Any) -> None:
    """The pre-flight checks of ``kdray check``; a failed one stops the command (exit 2) with
    every failed check listed, before any compute."""
    from kdray.experiments.check import failed, preflight

    with _settings_errors():
        resources = _cluster_resources(options.get("address"), spec)
    checks = preflight(spec, command=command, out_dir=out, cluster_resources=resources, **options)
    if failed(checks):
        console.print(f"[red]kdray {command} {spec.name}: pre-flight checks failed[/red]")
        for check in failed(checks):
            console.print(f"  [red]{check.name}[/red]: {check.detail}", soft_wrap=True)
        raise typer.Exit(2)
    for check in checks:  # passed, but with something to say before compute (truncation)
        for warning in check.detail.split("WARNING: ")[1:]:
            console.print(f"[yellow]warning[/yellow] ({check.name}): {warning.strip('; ')}")


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(help="A YAML spec.", metavar="SPEC")],
    set_: SetOption = None,
    out: Annotated[
        Path | None, typer.Option(help="Results folder (default results/<name>).")
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Run one distillation as the spec says and write its Parquet tables."""
    from kdray.analysis import results
    from kdray.api import execute_run

    spec = _load(spec_path, set_)
    _show_kdray_log()
    out_dir = _results_dir(spec, out)
    _preflight(spec, "run", out_dir, overwrite=overwrite)
    console.print(
        f"[bold]kdray run[/bold] {spec.name}: {spec.task}, {spec.distill.algorithm}, "
        f"teacher {spec.teacher.model} -> {spec.student.layers} layers, {spec.train.epochs} epochs"
    )
    with _settings_errors():
        result = execute_run(spec, out_dir, overwrite=overwrite, progress=_progress())
    trials, epochs = (out_dir / name for name in (results.TRIALS_FILE, results.EPOCHS_FILE))
    _print_run_summary(spec, result)
    console.print(f"tables: {trials} and {epochs}")
    if result.status == "oom":
        console.print(
            f"[red]run out of memory:[/red] {escape(result.error or '')}\nLower "
            "train.batch_size (or train.eval_batch_size, data.max_seq_length), or try "
            "train.precision: bf16.",
            soft_wrap=True,
        )
        raise typer.Exit(1)
    if result.status != "ok":  # failed, or diverged: the student is not what was asked for
        console.print(f"[red]run {result.status}:[/red] {result.error}")
        raise typer.Exit(1)


def _print_run_summary(spec: Spec, result: Any) -> None:
    table = Table(title=f"{spec.name}: {result.status}")
    table.add_column("epoch", justify="right")
    table.add_column("stage")
    table.add_column("loss", justify="right")
    metric_names = [
        k for k in (result.records[0] if result.records else {}) if k.startswith("dev.")
    ]
    for name in metric_names:
        table.add_column(name, justify="right")
    table.add_column("ex/s", justify="right")
    for record in result.records:
        table.add_row(
            str(record["epoch"]),
            record["stage_name"],
            f"{record.get('loss.total', math.nan):.4f}",
            *[f"{record[n]:.4f}" for n in metric_names],
            f"{record['examples_per_s']:.0f}",
            style="bold green" if record.get("is_best") else None,
        )
    console.print(table)
    teacher = result.teacher
    if teacher is not None:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in teacher.dev_metrics.items())
        console.print(f"teacher {teacher.id}: dev {shown}")
    best = ", ".join(f"{k} {v:.4f}" for k, v in result.best_metrics.items())
    console.print(
        f"student ({result.student_params / 1e6:.1f}M params): best dev {best or 'n/a'} at epoch "
        f"{result.best_epoch}; {result.wall_time:.0f}s, {result.examples_per_s:.0f} examples/s"
    )


@app.command()
def teacher(
    spec_path: Annotated[Path, typer.Argument(help="A YAML spec.", metavar="SPEC")],
    set_: SetOption = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Exit 1, fine-tuning nothing, if a file of the cached teacher differs from the "
            "sha256 in its teacher.json (without it: such a teacher is fine-tuned again).",
        ),
    ] = False,
    search: Annotated[
        bool,
        typer.Option(
            "--search",
            help="Search the teacher's fine-tuning (the spec's search block: teacher.* and "
            "data.max_seq_length) as Ray Tune trials, then fine-tune the best configuration "
            "with seeds 1, 2, 3 into the teacher cache; tables and TEACHER.md in --out.",
        ),
    ] = False,
    address: AddressOption = None,
    storage: StorageOption = None,
    out: Annotated[
        Path | None, typer.Option(help="--search: tables folder (default results/<name>-teacher).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="--search: continue an interrupted one.")] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Fine-tune (or find in the cache) the spec's teacher and print its dev metrics; with
    --search, search its fine-tuning first.

    A cached teacher whose files differ from their recorded sha256 is fine-tuned again."""
    from kdray.training.teacher import TeacherDamagedError, ensure_teacher

    spec = _load(spec_path, set_)
    _show_kdray_log()
    if search:
        _teacher_search(spec, address, storage, out, resume=resume, overwrite=overwrite)
        return
    with _settings_errors():
        try:
            info = ensure_teacher(spec, progress=_progress(), verify="full", repair=not verify)
        except TeacherDamagedError as error:
            console.print(f"[red]damaged teacher:[/red] {escape(str(error))}", soft_wrap=True)
            raise typer.Exit(1) from None
    shown = ", ".join(f"{k} {v:.4f}" for k, v in info.dev_metrics.items())
    console.print(f"teacher {info.id}: dev {shown}\n  {escape(info.path)}", soft_wrap=True)
    if not verify:
        return
    if info.files is None:
        console.print(
            f"[yellow]not verified:[/yellow] {escape(info.path)} records no file sizes or "
            "checksums (a teacher.json from an older kdray, or a folder kdray did not write); "
            "delete a cached one to have it fine-tuned again with them",
            soft_wrap=True,
        )
    else:
        console.print(f"verified: {len(info.files)} files match the sha256 in teacher.json")


def _teacher_search(
    spec: Spec, address: str | None, storage: str | None, out: Path | None, **options: Any
) -> None:
    """``kdray teacher --search``: the trials, then the confirmation seeds, then where the
    report is and which settings to use."""
    from kdray.analysis.results import experiment_name
    from kdray.experiments.sweep import run_teacher_search
    from kdray.experiments.teacher_search import TEACHER_REPORT

    folder = _working_in(out or Path("results") / experiment_name(spec, "teacher"))
    # its spec check refuses a search block that varies anything but the teacher (exit 2)
    _preflight(spec, "teacher", folder, address=address, storage=storage, **options)
    console.print(
        f"[bold]kdray teacher --search[/bold] {spec.name}: {len(spec.search)} searched "
        f"settings, {spec.tune.num_samples} trials, then the best with 3 seeds, in {folder}"
    )
    with _settings_errors():
        found = run_teacher_search(
            spec,
            address=address,
            storage=storage,
            out_dir=folder,
            callbacks=[_trials_table(spec, horizon="teacher")],
            **options,
        )
    if found.interrupted:
        from kdray.analysis.results import EXIT_INTERRUPTED

        done = (
            int((~found.trials["status"].isin(["interrupted"])).sum()) if len(found.trials) else 0
        )
        console.print(
            f"[yellow]teacher search interrupted: {done} of {spec.tune.num_samples} trials "
            f"ended, nothing confirmed yet[/yellow]; continue with: "
            f"{escape(_continue_command(_JOB.argv))}"
        )
        raise typer.Exit(EXIT_INTERRUPTED)
    for row in found.confirm.to_dict("records"):
        dev = ", ".join(f"{k[4:]} {v:.4f}" for k, v in row.items() if k.startswith("dev."))
        console.print(f"  seed {row['seed']}: teacher {row['teacher_id']}: dev {dev}")
    console.print(f"report: {found.out_dir / TEACHER_REPORT}")


@app.command()
def sweep(
    spec_path: SearchSpecArgument,
    set_: SetOption = None,
    address: AddressOption = None,
    storage: StorageOption = None,
    out: Annotated[
        Path | None, typer.Option(help="Tables folder (default results/<name>).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted sweep.")] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """A hyperparameter search: every Ray Tune trial is one distillation run."""
    from kdray.analysis import results
    from kdray.experiments.sweep import run_sweep

    spec = _load(spec_path, set_)
    _show_kdray_log()
    if not spec.search:
        console.print(f"[red]{spec_path}: no search block; use kdray run for a single run[/red]")
        raise typer.Exit(2)
    _working_in(out or Path("results") / spec.name)
    console.print(
        f"[bold]kdray sweep[/bold] {spec.name}: {len(spec.search)} searched settings, "
        f"{spec.tune.num_samples} trials, searcher {spec.tune.searcher.kind}, "
        f"scheduler {spec.tune.scheduler.kind}" + (" (resuming)" if resume else "")
    )
    _preflight(
        spec, "sweep", out, address=address, storage=storage, resume=resume, overwrite=overwrite
    )
    with _settings_errors():
        outcome = run_sweep(
            spec,
            address=address,
            storage=storage,
            out_dir=out,
            resume=resume,
            overwrite=overwrite,
            callbacks=[_trials_table(spec)],
        )
    trials = outcome.trials
    code, summary = results.exit_summary(trials, spec.tune.num_samples)
    if outcome.best is not None:
        metric = outcome.best["metric"]
        params = {k[6:]: v for k, v in outcome.best.items() if k.startswith("param.") and v == v}
        console.print(
            f"[bold green]best trial {outcome.best['trial_id']}[/bold green]: dev {metric} "
            f"{outcome.best[f'best.dev.{metric}']:.4f} with {params}"
        )
    out_dir = outcome.out_dir
    console.print(f"tables: {out_dir}/trials.parquet and epochs.parquet (pandas: kdray.load)")
    console.print(f"report: kdray report {out_dir} --plots {out_dir}/plots")
    _copy_results(out_dir, storage, spec.name)
    if outcome.best is not None:
        console.print(f"export the best student: kdray export {out_dir} --to exported/{spec.name}")
    _finish(code, f"trials: {summary}", trials)


def _copy_results(out_dir: Path, storage: str | None, name: str) -> None:
    """With ``--storage``, the whole results folder copied there (each experiment's tables were
    copied as they were written), so report and export work from the storage alone."""
    if not storage:
        return
    from kdray.infra import remote

    location = remote.results_location(storage, name)
    with _settings_errors():
        remote.Mirror(out_dir, location).push()
    console.print(f"also in the storage: kdray report {location}", highlight=False, soft_wrap=True)


def _finish(code: int, summary: str, trials: Any = None) -> None:
    """The closing line of a sweep or ablation, and its exit code: 130 when trials were cut off
    (with the command that continues), 1 when none finished, else 0; a trial that ended on an
    I/O failure (a full disk, a read-only folder) ends the command in its paragraph, exit 2."""
    from kdray.analysis.results import EXIT_INTERRUPTED

    errors = trials["error"].dropna() if trials is not None and "error" in trials else []
    failure = next((f for f in map(faults.io_failure_text, errors) if f is not None), None)
    if failure is not None:
        console.print(summary)
        _io_stop(failure)

    if code == EXIT_INTERRUPTED:
        console.print(
            f"[yellow]{summary}[/yellow]; continue with: {escape(_continue_command(_JOB.argv))}"
        )
    elif code:
        console.print(f"[red]{summary}[/red]")
    else:
        console.print(summary)
    if code:
        raise typer.Exit(code)


@app.command()
def ablate(
    spec_path: Annotated[
        Path, typer.Argument(help="A YAML spec with an ablation block.", metavar="SPEC")
    ],
    set_: SetOption = None,
    from_sweep: Annotated[
        Path | None,
        typer.Option(help="Start each cell from the best trial of its algorithm in this sweep."),
    ] = None,
    seeds: Annotated[
        int | None, typer.Option(help="Use seeds 1..N instead of ablation.seeds.")
    ] = None,
    address: AddressOption = None,
    storage: StorageOption = None,
    out: Annotated[
        Path | None, typer.Option(help="Tables folder (default results/<name>-ablation).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted ablation.")] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Every cell of the ablation (a grid, or the recipe leave-one-out) once per seed, paired by
    seed, as Ray Tune trials; with adaptive ablation.seeds, in rounds until each is resolved."""
    spec = _load(spec_path, set_)
    _show_kdray_log()
    with _settings_errors():
        cells, baseline = _ablation_cells(spec, from_sweep)
    adaptive = spec.ablation is not None and spec.ablation.adaptive and not seeds
    seed_list = list(range(1, seeds + 1)) if seeds else None
    first = seed_list or (spec.ablation.first_seeds() if spec.ablation else [1])
    how = "adaptive seeds, first round" if adaptive else "runs"
    console.print(
        f"[bold]kdray ablate[/bold] {spec.name}: {len(cells)} cells x {len(first)} seeds = "
        f"{len(cells) * len(first)} {how}" + (" (resuming)" if resume else "")
    )
    for cell in cells:
        console.print(f"  {cell['cell']}  [dim]from {cell['source']}[/dim]")
    _preflight(
        spec, "ablate", out, address=address, storage=storage, resume=resume, overwrite=overwrite
    )
    options = {"address": address, "storage": storage, "callbacks": [_trials_table(spec)]}
    name = f"{spec.name}-ablation"
    out_dir = _working_in(out or Path("results") / name)
    from kdray.experiments.followup import RoundInterrupted

    try:
        with _settings_errors():
            trials = _run_ablation(
                spec, cells, baseline, adaptive, seed_list, from_sweep, name, out_dir,
                resume=resume, overwrite=overwrite, **options,
            )  # fmt: skip
    except RoundInterrupted as stop:
        console.print(
            f"[yellow]round {stop.round_index} of the adaptive seeds was interrupted "
            f"({len(stop.trials)} of {stop.planned} trials so far have rows): continue with "
            f"{escape(_continue_command(_JOB.argv))}[/yellow]"
        )
        raise typer.Exit(130) from None
    from kdray.analysis.results import exit_summary

    code, summary = exit_summary(trials)
    console.print(f"tables: {out_dir}; summarise with: kdray report {out_dir}")
    _copy_results(out_dir, storage, name)
    _finish(code, f"runs: {summary}", trials)


def _ablation_cells(spec: Spec, from_sweep: Path | None) -> tuple[list[dict], Any]:
    """``(cells, baseline)`` of the spec's ablation design; skipped leave-one-out cells are
    printed with why."""
    from kdray.analysis import results
    from kdray.experiments import followup
    from kdray.experiments.plan import ablation_cells

    if spec.ablation is None or spec.ablation.design == "grid":
        return ablation_cells(spec, from_sweep), (spec.ablation.baseline if spec.ablation else None)
    values, source = ({}, "spec")
    if from_sweep:
        values, source = followup.recipe_from_results(results.load(from_sweep)[0], spec)
    cells, skipped = followup.leave_one_out_cells(spec, values, source)
    for item in skipped:
        console.print(f"  [dim]skipped {item['cell']}: {item['reason']}[/dim]")
    return cells, followup.RECIPE


def _run_ablation(
    spec: Spec,
    cells: list[dict],
    baseline: Any,
    adaptive: bool,
    seed_list: list[int] | None,
    from_sweep: Path | None,
    name: str,
    out_dir: Path,
    **options: Any,
) -> Any:
    """The trials table of a grid ablation (as before), a fixed-seed leave-one-out, or the
    adaptive rounds of either (then the seeds per cell and why each stopped are printed)."""
    from kdray.experiments import followup
    from kdray.experiments.sweep import run_ablation, run_trials
    from kdray.training import data

    if adaptive:
        lengths = data.spec_length_stats(spec)
        trials, decisions = followup.run_adaptive(
            spec, cells, baseline, run_trials, name=name, out_dir=out_dir, lengths=lengths,
            **options,
        )  # fmt: skip
        for row in followup.stop_table(decisions).to_dict("records"):
            console.print(f"  {row['cell']}: {row['seeds']} seeds, {row['stopped']}")
        return trials
    if spec.ablation is None or spec.ablation.design == "grid":
        return run_ablation(
            spec, from_sweep=from_sweep, seeds=seed_list, out_dir=out_dir, **options
        ).trials
    seeds = seed_list or spec.ablation.first_seeds()
    trials = followup.paired_trials(followup._plain(cells), seeds)
    return run_trials(spec, trials, name=name, command="ablate", out_dir=out_dir, **options).trials


@app.command()
def confirm(
    results_dir: Annotated[Path, typer.Argument(help="A sweep's results folder.")],
    top_k: Annotated[int, typer.Option(help="How many distinct configurations.")] = 3,
    seeds: Annotated[int, typer.Option(help="Seeds 1..N for every configuration.")] = 5,
    address: AddressOption = None,
    storage: StorageOption = None,
    out: Annotated[
        Path | None, typer.Option(help="Tables folder (default results/<name>-confirm).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted confirmation.")] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Re-run a sweep's top-K distinct configurations with N paired seeds each: how much of the
    sweep's ranking survives fresh seeds (the winner's curse)."""
    from kdray.analysis.report import read_experiment

    with _settings_errors():
        record = read_experiment(results_dir)
        if record is None or record.get("command") != "sweep":
            raise ValueError(
                f"{results_dir}: not a sweep's results folder (its experiment.json must say "
                "command: sweep); give the folder kdray sweep wrote, e.g. results/<name>"
            )
        spec = Spec.model_validate(record["spec"])
        configs = _confirm_configs(spec, results_dir, top_k, seeds)
    _show_kdray_log()
    name = f"{spec.name}-confirm"
    out_dir = _working_in(out or Path("results") / name)
    _preflight(
        spec, "confirm", out_dir, address=address, storage=storage, resume=resume,
        overwrite=overwrite,
    )  # fmt: skip
    with _settings_errors():
        outcome = _run_confirm(
            spec, configs, seeds, out_dir, resume=resume, overwrite=overwrite, address=address,
            storage=storage,
        )  # fmt: skip
    counts = outcome.trials["status"].value_counts().to_dict()
    console.print("runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    console.print(f"tables: {out_dir}; summarise with: kdray report {out_dir}")
    _copy_results(out_dir, storage, name)


def _confirm_configs(spec: Spec, sweep_dir: Path, top_k: int, seeds: int) -> list[dict]:
    """The sweep's top-K distinct configurations, printed (``kdray confirm`` and the study's
    confirm phase)."""
    from kdray.analysis import results
    from kdray.experiments import followup

    if seeds < 2:
        raise ValueError(f"--seeds must be >= 2 to estimate a spread, got {seeds}")
    ranked = followup.confirm_configs(results.load(sweep_dir)[0], spec, top_k)
    configs = followup.with_control(ranked, spec)
    control = " + the spec as written" if len(configs) > len(ranked) else ""
    console.print(
        f"[bold]kdray confirm[/bold] {spec.name}: {len(ranked)} configurations{control} x "
        f"{seeds} seeds"
    )
    for config in configs:
        shown = ", ".join(f"{k}={v}" for k, v in config["values"].items())
        if config["cell"] == followup.DEFAULT_CELL:
            score = "the spec as written: the control"
        else:
            score = f"{config['sweep_score']:.4f}"
            score += ", the spec as written" if config.get("is_default") else ""
        console.print(f"  {config['cell']} ({score}): {shown}", soft_wrap=True)
    return configs


def _run_confirm(spec: Spec, configs: list[dict], seeds: int, out_dir: Path, **options: Any) -> Any:
    """Every configuration with seeds 1..``seeds``, paired, as one Ray Tune experiment."""
    from kdray.experiments import followup
    from kdray.experiments.sweep import run_trials

    return run_trials(
        spec, followup.paired_trials(configs, list(range(1, seeds + 1))),
        name=f"{spec.name}-confirm", command="confirm", out_dir=out_dir,
        callbacks=[_trials_table(spec)], **options,
    )  # fmt: skip


@app.command()
def study(
    spec_path: SearchSpecArgument,
    set_: SetOption = None,
    address: AddressOption = None,
    storage: StorageOption = None,
    out: Annotated[Path | None, typer.Option(help="Study folder (default results/<name>).")] = None,
    resume: Annotated[
        bool, typer.Option(help="Skip finished phases and continue the interrupted one.")
    ] = False,
) -> None:
    """The whole question in one command: sweep -> confirm the top configurations -> leave-one-out
    of the confirmed winner (adaptive seeds) -> STUDY.md, within the spec's study.budget."""
    from kdray.experiments import study as studies

    spec = _load(spec_path, set_)
    _show_kdray_log()
    if not spec.search:
        console.print(f"[red]{spec_path}: no search block; a study starts with a sweep[/red]")
        raise typer.Exit(2)
    folder = _working_in(out or Path("results") / spec.name)
    console.print(
        f"[bold]kdray study[/bold] {spec.name}: sweep -> confirm -> leave-one-out in {folder}"
        + (" (resuming)" if resume else "")
    )
    with _settings_errors():
        record = studies.claim_study(folder, spec, resume)  # refused before any check
    swept = resume and _restorable(folder / "sweep", storage, spec.name)
    skip = {}
    # a done sweep phase is not run again, even if its Ray experiment is gone
    if studies.phase_status(record, "sweep") == studies.DONE:
        skip = dict.fromkeys(("results folder", "resume"), "the study's sweep phase is done")
    _preflight(
        spec, "sweep", folder / "sweep", address=address, storage=storage, resume=swept, skip=skip
    )
    runners = _study_runners(spec, folder, {"address": address, "storage": storage})
    with _settings_errors():
        outcome = studies.run_study(spec, folder, runners, resume=resume)
    console.print(f"study: {folder / studies.STUDY_REPORT}")
    _copy_results(folder, storage, f"{spec.name}-study")
    if outcome.stopped:
        console.print(f"[yellow]{outcome.stopped}[/yellow]")
    if outcome.interrupted:
        console.print(
            f"[yellow]the {outcome.interrupted} phase was interrupted: continue with "
            f"{escape(_continue_command(_JOB.argv))}[/yellow]"
        )
        raise typer.Exit(130)


def _restorable(out_dir: Path, storage: str | None, name: str) -> bool:
    """Whether an interrupted phase's Tune experiment exists to continue; one interrupted before
    Tune started (e.g. while the teacher trained) starts again instead."""
    from kdray.analysis.results import ray_store
    from kdray.experiments.check import can_restore

    return can_restore(ray_store(out_dir, storage), name)


BudgetCheck = Callable[[], str | None]  # why a study's budget is spent now, or None


def _study_runners(spec: Spec, folder: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The study's phases, each by the code path of its own command (sweep, confirm, ablate)."""
    from kdray.experiments import study as studies
    from kdray.experiments.sweep import run_sweep
    from kdray.spec import StudySpec

    confirm = (spec.study or StudySpec()).confirm

    def sweep_phase(out_dir: Path, again: bool, _budget_spent: BudgetCheck) -> tuple[Any, int]:
        again = again and _restorable(out_dir, options["storage"], spec.name)
        outcome = run_sweep(
            spec, out_dir=out_dir, resume=again, callbacks=[_trials_table(spec)], **options
        )
        return outcome.trials, spec.tune.num_samples

    def confirm_phase(out_dir: Path, again: bool, _budget_spent: BudgetCheck) -> tuple[Any, int]:
        again = again and _restorable(out_dir, options["storage"], f"{spec.name}-confirm")
        configs = _confirm_configs(spec, folder / "sweep", confirm.top_k, confirm.seeds)
        outcome = _run_confirm(spec, configs, confirm.seeds, out_dir, resume=again, **options)
        return outcome.trials, len(configs) * confirm.seeds

    def ablation_phase(out_dir: Path, again: bool, budget_spent: BudgetCheck) -> tuple[Any, int]:
        from kdray.experiments.followup import RoundInterrupted

        loo = studies.ablation_spec(spec)
        cells, baseline = _ablation_cells(loo, folder / "confirm")
        try:
            trials = _run_ablation(
                loo, cells, baseline, True, None, folder / "confirm", f"{spec.name}-ablation",
                out_dir, resume=again, overwrite=False, callbacks=[_trials_table(loo)],
                stop_before=lambda _round: budget_spent(), **options,
            )  # fmt: skip
        except RoundInterrupted as stop:  # fewer rows than planned: the phase is interrupted
            return stop.trials, stop.planned
        return trials, len(cells)

    return {"sweep": sweep_phase, "confirm": confirm_phase, "ablation": ablation_phase}


@app.command()
def check(
    spec_path: Annotated[Path, typer.Argument(help="A YAML spec.", metavar="SPEC")],
    set_: SetOption = None,
    command: Annotated[
        str | None,
        typer.Option(
            help="run | sweep | ablate | teacher (teacher --search; default: teacher when the "
            "search block varies only teacher settings, sweep with another search block, else "
            "ablate with an ablation block, else run)."
        ),
    ] = None,
    address: AddressOption = None,
    storage: StorageOption = None,
    out: Annotated[
        Path | None, typer.Option(help="Results folder (default results/<name>).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Check a --resume.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Check an --overwrite.")] = False,
) -> None:
    """Pre-flight checks of a spec, in seconds: data, teacher, tokenizer, metric, device,
    resources, storage, results folder. Exit 0 when all pass, 2 otherwise."""
    from kdray.experiments.check import as_rows, failed, preflight
    from kdray.experiments.teacher_search import searches_teacher

    spec = _load(spec_path, set_)
    chosen = command or (
        "teacher" if searches_teacher(spec)
        else "sweep" if spec.search else "ablate" if spec.ablation else "run"
    )  # fmt: skip
    if chosen not in ("run", "sweep", "ablate", "teacher"):
        console.print(f"[red]--command must be run, sweep, ablate or teacher, not {chosen!r}[/red]")
        raise typer.Exit(2)
    with _settings_errors():
        resources = _cluster_resources(address, spec) if chosen != "run" else None
    checks = preflight(
        spec, command=chosen, out_dir=out, address=address, storage=storage, resume=resume,
        overwrite=overwrite, cluster_resources=resources,
    )  # fmt: skip
    out_console = console if console.is_terminal else Console(width=240)
    table = Table(title=f"kdray {chosen} {spec.name}: pre-flight checks")
    for column in ("check", "status", "detail"):
        table.add_column(column)
    style = {"ok": "green", "FAILED": "bold red", "skipped": "dim"}
    for name, status, detail in as_rows(checks):
        table.add_row(name, f"[{style[status]}]{status}[/]", detail)
    out_console.print(table)
    if failed(checks):
        raise typer.Exit(2)


@app.command()
def report(
    results_dir: Annotated[
        str,
        typer.Argument(
            help="A results folder (trials.parquet), or where --storage copied it "
            "(s3://.../<name>-results).",
            metavar="RESULTS",
        ),
    ],
    format_: Annotated[str, typer.Option("--format", help="table | markdown | csv")] = "table",
    plots: Annotated[Path | None, typer.Option(help="Write PNG plots into this folder.")] = None,
    baseline: Annotated[
        str | None,
        typer.Option(help="Baseline cell (default: the spec's ablation.baseline, else soft)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also save to a file.")
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(help="max or min: the metric's direction (default: the spec's tune.mode)."),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="Significance level of the tests and (1 - alpha) CIs "
            "(default: the spec's ablation.alpha, else 0.05)."
        ),
    ] = None,
    family_with: Annotated[
        list[Path] | None,
        typer.Option(
            "--family-with",
            help="Another folder answering the same question (repeatable): all their "
            "comparisons are adjusted together as one family.",
        ),
    ] = None,
) -> None:
    """Summarise a sweep or an ablation: statistics, paired comparisons, importance, plots."""
    from kdray.analysis.plots import draw
    from kdray.analysis.report import build_report
    from kdray.infra.remote import local_results

    if format_ not in ("table", "markdown", "csv"):
        console.print("[red]--format must be table, markdown or csv[/red]")
        raise typer.Exit(2)
    if alpha is not None and not 0 < alpha < 1:
        console.print("[red]--alpha must be between 0 and 1 (e.g. 0.05)[/red]")
        raise typer.Exit(2)
    with _settings_errors():
        built = build_report(
            local_results(results_dir), baseline=baseline, fmt=format_, mode=mode, alpha=alpha,
            family_with=family_with or (),
        )  # fmt: skip
        if plots is not None:
            draw(built, plots)
    if format_ == "table":
        _print_report_tables(built)
    else:
        # plain text on stdout: markdown and CSV must not be wrapped to the terminal width
        typer.echo(built.render(format_))
    if output is not None:
        built.save(output)
        console.print(f"saved {output}")
    for name, path in built.plots.items():
        console.print(f"plot {name}: {path}")


def _print_report_tables(built: Any) -> None:
    import pandas as pd

    # Piped or redirected output is not cut to 80 columns: the tables are wide.
    out = console if console.is_terminal else Console(width=240)
    for line in built.header_lines():
        out.print(line, highlight=False, soft_wrap=True)
    for heading, body in built.sections():
        if isinstance(body, pd.DataFrame):
            table = Table(title=heading)
            for column in body.columns:
                table.add_column(str(column))
            cells = [c in ("cell", "baseline") for c in body.columns]
            for row in body.itertuples(index=False):
                table.add_row(
                    *(_short_cell(v) if c else _fmt(v) for v, c in zip(row, cells, strict=True))
                )
            out.print(table)
        else:
            out.print(f"[bold]{heading}[/bold]\n{body}")


def _short_cell(value: Any) -> str:
    """A one-axis ablation cell by its value (``distill.algorithm=sid`` -> ``sid``)."""
    text = _fmt(value)
    _, sep, rest = text.partition("=")
    return rest if sep and "," not in text else text


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return str(value)


@app.command()
def export(
    results_dir: Annotated[
        str,
        typer.Argument(
            help="A kdray results folder, or where --storage copied it (s3://.../<name>-results).",
            metavar="RESULTS",
        ),
    ],
    to: Annotated[Path, typer.Option("--to", help="The Hugging Face model folder to write.")],
    trial: Annotated[
        str | None, typer.Option(help="The trial to export (a kdray run folder has one: run).")
    ] = None,
    best: Annotated[bool, typer.Option("--best", help="Export the best trial.")] = False,
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            "--push-to-hub",
            metavar="REPO",
            help="Then upload the folder to this Hub model repo (user-or-org/name; created if "
            "missing). Needs a token (hf auth login or HF_TOKEN) and HF_HUB_OFFLINE unset.",
        ),
    ] = None,
    private: Annotated[
        bool, typer.Option("--private", help="Create the Hub repo private (with --push-to-hub).")
    ] = False,
    revision: Annotated[
        str | None,
        typer.Option(help="The Hub branch to push to, created if missing (default main)."),
    ] = None,
) -> None:
    """Write the run's best student as a Hugging Face folder with a model card and its spec,
    and optionally push it to the Hugging Face Hub."""
    from kdray.experiments.export import CARD_FILE, check_push, export_student
    from kdray.experiments.export import push_to_hub as push
    from kdray.infra.remote import local_results

    if trial is not None and best:
        console.print("[red]give --trial ID or --best, not both[/red]")
        raise typer.Exit(2)
    if push_to_hub is None and (private or revision is not None):
        console.print("[red]--private and --revision go with --push-to-hub REPO[/red]")
        raise typer.Exit(2)
    with _settings_errors():
        if push_to_hub is not None:
            check_push(push_to_hub)  # before the export: a push that cannot work writes nothing
        folder = export_student(local_results(results_dir), to, trial=trial, best=best)
        console.print(f"exported {results_dir} -> {folder} (model card: {folder / CARD_FILE})")
        if push_to_hub is not None:
            url = push(folder, push_to_hub, private=private, revision=revision)
            console.print(f"pushed {folder} -> {url}", highlight=False, soft_wrap=True)


@app.command()
def predict(
    source: Annotated[
        Path,
        typer.Argument(
            help="A kdray run results folder, an exported folder or a model folder.",
            metavar="RESULTS|MODEL_DIR",
        ),
    ],
    split: Annotated[str, typer.Option(help="test (for submission) or dev (scored).")] = "test",
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder (default <RESULTS>/glue-<split>, else ./glue-<split>)."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="GLUE folder (default: the run's data.dir, else $KDRAY_GLUE_DIR)."),
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="The GLUE task of a model folder without kdray-spec.yaml.")
    ] = None,
    max_seq_length: Annotated[
        int | None, typer.Option(help="Token limit (default: the run's, else 128).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 128,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Predict GLUE test (or dev) in the GLUE server's format: <Task>.tsv, index<TAB>prediction."""
    from kdray.experiments.export import predict_glue

    with _settings_errors():
        made = predict_glue(
            source,
            split,
            out=out,
            data_dir=data_dir,
            task=task,
            max_seq_length=max_seq_length,
            batch_size=batch_size,
            device=device,
        )
    for name, path in made.files.items():
        console.print(f"{name}: {made.rows[name]} predictions -> {path}")
    for name, metrics in made.metrics.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        console.print(f"[bold]{made.task.name} {name}[/bold]: {shown}")
    if made.metrics:
        console.print(f"metrics: {made.out_dir / 'metrics.json'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
