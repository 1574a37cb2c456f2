"""kdray: knowledge distillation from internal representations, swept and ablated at scale."""

import os

__version__ = "0.1.0"


def _passive_openmp() -> None:
    """OpenMP threads that wait sleep instead of spinning, unless the user chose a policy.

    On a laptop or a shared server other work takes cores: spinning OpenMP threads then steal
    the very cores torch's other threads need and a step slows several-fold (see
    ``benchmarks/bench_busy.py``). OpenMP reads the setting when torch loads, so it only takes
    effect when kdray is imported first (the CLI, Ray workers). ``KDRAY_OMP_WAIT_POLICY=unset``
    leaves OpenMP's own default (used by the benchmark to compare).
    """
    if os.environ.get("KDRAY_OMP_WAIT_POLICY") != "unset":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_passive_openmp()

from kdray import _moved  # noqa: E402  (after the OpenMP policy, before any torch import)

_moved.install()


def build() -> str:
    """This installation's kdray: its version and a hash of its source files, so two checkouts
    of one version that differ are told apart (the pre-flight compares every Ray node's with the
    driver's). Standard library only: a node answers without importing torch or Ray."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix().encode()
        digest.update(name + b"\0" + path.read_bytes() + b"\0")
    return f"{__version__}+{digest.hexdigest()[:10]}"


#: ``kdray.<name>`` from Python, imported on first use so ``import kdray`` stays light (no
#: torch, no Ray): run and load from :mod:`kdray.api`; ``kdray.sweep(spec)`` is the
#: :mod:`kdray.experiments.sweep` module itself, which a call runs
#: (:func:`kdray.experiments.sweep.search`); a report is
#: ``kdray.analysis.report.build_report(folder)``.
_API = ("run", "load", "as_spec", "Results")


def __getattr__(name: str) -> object:
    if name in _API:
        from kdray import api

        return getattr(api, name)
    if name == "sweep":
        import importlib

        return importlib.import_module("kdray.experiments.sweep")
    raise AttributeError(f"module 'kdray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API, "sweep"])
