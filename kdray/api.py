"""kdray from Python: the commands a notebook needs, as functions returning DataFrames.

``import kdray`` then ``kdray.run(spec)``, ``kdray.sweep(spec)``, ``kdray.load(folder)`` (and
:func:`kdray.analysis.report.build_report`): the same pre-flight checks (a failed one raises
:class:`kdray.experiments.check.PreflightError` listing each, before any compute), the same folders
and tables as the CLI, which calls :func:`execute_run` and :func:`kdray.experiments.sweep.search`
itself. A spec is a YAML path, a dict or a :class:`~kdray.spec.Spec`; ``overrides`` are ``--set``
values."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kdray.analysis import results
from kdray.analysis.results import Results, load
from kdray.experiments import check
from kdray.infra import faults
from kdray.spec import Spec, SpecLike, as_spec

__all__ = ["Results", "SpecLike", "as_spec", "execute_run", "load", "run"]


def run(
    spec: SpecLike,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Results:
    """One distillation (``kdray run``): its tables, read back. A run that failed or diverged
    still has its row (``status``, ``error``), as in the CLI."""
    spec = as_spec(spec, overrides)
    out_dir = Path(out) if out else check.default_out_dir(spec, "run")
    check.raise_failed(check.preflight(spec, command="run", out_dir=out_dir, overwrite=overwrite))
    execute_run(spec, out_dir, overwrite=overwrite)
    return load(out_dir)


def execute_run(spec: Spec, out_dir: Path, *, overwrite: bool = False, progress: Any = None) -> Any:
    """Claim the folder, distil (epoch curves to TensorBoard), write the tables and the
    experiment record; the :class:`~kdray.training.distill.RunResult`. Checks are the caller's."""
    from kdray.training import data  # torch: imported when a run is made, not with import kdray
    from kdray.training.distill import distill

    results.claim_folder(out_dir, spec, "run", overwrite=overwrite)
    with _tensorboard(out_dir) as tensorboard:
        result = distill(spec, report=tensorboard, output_dir=out_dir, progress=progress)
    failure = faults.io_failure_text(result.error) if result.status == "failed" else None
    if failure is not None:  # the disk filled (or turned read-only): no table can be written
        raise OSError(failure.code, failure.reason, failure.path)
    results.write_run(out_dir, spec, result)
    results.write_experiment(out_dir, spec, "run", data.spec_length_stats(spec))
    return result


def _tensorboard(out_dir: Path) -> Any:
    """The run's epoch curves as TensorBoard events in ``<results>/tensorboard``; an earlier
    run's events there are removed first (the folder holds one run, like its tables)."""
    from kdray.infra.tracking import TENSORBOARD_DIR, TensorBoardReport

    folder = out_dir / TENSORBOARD_DIR
    if folder.is_dir():
        shutil.rmtree(folder)
    return TensorBoardReport(folder)
