"""Module paths of kdray before its modules were grouped by layer, still importable.

Ray Tune pickles a sweep's trainable and callbacks by module path into the experiment's state,
so a sweep started before the move must resume after it (``--resume`` unpickles
``kdray.sweep.distill_trainable``), and a notebook's ``import kdray.report`` must keep working.
An old path imports the module's new home and is the same module object under both names, so a
patch through one is seen through the other. Standard library only.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

#: old module name (below ``kdray.``) -> the layer package that now holds it
MOVED: dict[str, str] = {
    **dict.fromkeys(["faults", "progress", "remote", "store", "tracking"], "infra"),
    **dict.fromkeys(["algorithms", "diagnostics", "losses", "schedule"], "method"),
    **dict.fromkeys(["pareto", "plots", "report", "results", "stats"], "analysis"),
    **dict.fromkeys(
        [
            "data",
            "distill",
            "engine",
            "footprint",
            "models",
            "sources",
            "teacher",
            "teacher_outputs",
        ],
        "training",
    ),
    **dict.fromkeys(
        [
            "check",
            "export",
            "fault_harness",
            "followup",
            "plan",
            "study",
            "sweep",
            "teacher_search",
        ],
        "experiments",
    ),
}


def new_name(old: str) -> str | None:
    """``kdray.report`` -> ``kdray.analysis.report``; None for a name that did not move."""
    package, _, module = old.partition(".")
    if package != "kdray" or module not in MOVED:
        return None
    return f"kdray.{MOVED[module]}.{module}"


class _Alias(importlib.abc.Loader):
    """Loads an old name as the module of its new name, imported once under that name."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system has set the alias's spec on the module: give it back its own.
        module.__spec__ = self.spec


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds ``kdray.<old module>`` at its new path."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = new_name(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Put the finder first on ``sys.meta_path``, once (``import kdray`` does): an old name resolves
    to the new home even where a stale copy of the old file could still be found."""
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())
