"""The shape of the package: one room per idea, checked from the source.

No import cycles between kdray modules (lazy imports inside functions count), Ray imported by one
module only, the tables and the report usable without torch, and no function so long that it
holds several jobs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "kdray"
MAX_FUNCTION_LINES = 80

#: The layers, lowest first: a module imports modules of its own layer or lower ones only.
#: ``analysis`` sits below ``training`` because training writes the tables whose format it owns.
LAYERS = ("infra", "method", "spec", "analysis", "training", "experiments", "entry")
ROOT_LAYER = {"_moved": "infra", "spec": "spec", "api": "entry", "cli": "entry"}


def _modules() -> dict[str, ast.Module]:
    """Every kdray module by its dotted name below ``kdray`` (``experiments.sweep``)."""
    return {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts): ast.parse(
            path.read_text(), filename=str(path)
        )
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.stem != "__init__"
    }


def _layer(module: str) -> str:
    package, _, _ = module.partition(".")
    return package if package in LAYERS else ROOT_LAYER[module]


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of nodes under ``if TYPE_CHECKING:`` (type hints: no import when the code runs)."""
    return {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }


def _imported(tree: ast.Module, *, runtime_only: bool = False) -> set[str]:
    """Every module name imported anywhere in ``tree`` (top level or inside a function)."""
    skip = _type_checking_only(tree) if runtime_only else set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module.split(".")[0] == "kdray":
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _kdray_graph(*, runtime_only: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        imported = _imported(tree, runtime_only=runtime_only)
        deps = {n.removeprefix("kdray.") for n in imported if n.startswith("kdray.")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_kdray_modules_import_each_other_without_a_cycle() -> None:
    graph = _kdray_graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            cycle = path[path.index(node) :] + [node]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        state[node] = 1
        for dep in sorted(graph[node]):
            visit(dep, [*path, node])
        state[node] = 2

    for module in sorted(graph):
        visit(module, [])


def test_every_module_imports_only_its_own_layer_or_lower_ones() -> None:
    upward = [
        f"{module} ({_layer(module)}) imports {dep} ({_layer(dep)})"
        for module, deps in _kdray_graph(runtime_only=True).items()
        for dep in sorted(deps)
        if LAYERS.index(_layer(dep)) > LAYERS.index(_layer(module))
    ]
    assert upward == []


def test_the_layer_check_sees_an_upward_import_but_not_a_type_hint() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "from kdray.training import data\n"
        "if TYPE_CHECKING:\n    from kdray.experiments.plan import Trial\n"
    )
    assert "kdray.training.data" in _imported(tree, runtime_only=True)
    assert "kdray.experiments.plan" not in _imported(tree, runtime_only=True)
    assert "kdray.experiments.plan" in _imported(tree)
    assert _layer("training.data") == "training" and _layer("api") == "entry"


def test_only_the_sweep_module_imports_ray() -> None:
    users = sorted(
        name
        for name, tree in _modules().items()
        if any(n == "ray" or n.startswith("ray.") for n in _imported(tree))
    )
    assert users == ["experiments.sweep"]


def _fresh_python(code: str) -> str:
    """What ``code`` prints in a new interpreter started in the repository."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    return out.stdout.strip()


def test_results_and_report_load_without_torch() -> None:
    code = (
        "import sys, kdray.analysis.results, kdray.analysis.report, kdray.experiments.plan; "
        "print('torch' in sys.modules)"
    )
    assert _fresh_python(code) == "False"


def test_importing_kdray_models_leaves_transformers_logging_alone() -> None:
    code = (
        "from transformers.utils import logging as l; before = l.get_verbosity(); "
        "bars = l.is_progress_bar_enabled(); import kdray.training.models, kdray.training.distill; "
        "print(l.get_verbosity() == before and l.is_progress_bar_enabled() == bars)"
    )
    assert _fresh_python(code) == "True"


def test_no_function_in_kdray_is_longer_than_about_80_lines() -> None:
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert long == []


def test_the_layout_check_sees_a_cycle_and_a_lazy_import(tmp_path: Path) -> None:
    tree = ast.parse(
        "def f():\n    from kdray.experiments import sweep\n    import kdray.experiments.plan\n"
    )
    assert {"kdray.experiments.sweep", "kdray.experiments.plan"} <= _imported(tree)


def test_kdray_makes_openmp_threads_wait_passively_unless_told_otherwise() -> None:
    code = "import os, kdray; print(os.environ.get('OMP_WAIT_POLICY'))"

    def policy(**env: str) -> str:
        base = {k: v for k, v in __import__("os").environ.items() if "OMP_WAIT" not in k}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
            env={**base, **env}, check=True,
        )  # fmt: skip
        return out.stdout.strip()

    assert policy() == "PASSIVE"
    assert policy(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"  # the user's choice stands
    assert policy(KDRAY_OMP_WAIT_POLICY="unset") == "None"


def _imported_modules(path: Path) -> set[str]:
    """Top-level modules a file imports outside ``try`` blocks (an import that may fail on
    purpose, e.g. to check the message without mlflow, sits in one)."""
    import ast

    tree = ast.parse(path.read_text())
    guarded = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.Try)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_test_extra_names_every_package_the_tests_import() -> None:
    """``pip install -e .[test]`` must be enough for the tests: before, the TensorBoard
    assertions needed tensorboard, which only the bench extra pulled in (through textbrewer)."""
    import importlib.metadata
    import re
    import sys

    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    names = {
        re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0].lower().replace("_", "-") for req in declared
    }
    local = {"kdray", "_common"} | {
        p.stem for folder in ("benchmarks", "tests") for p in (REPO / folder).glob("*.py")
    }
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for path in sorted((REPO / "tests").glob("*.py")):
        for module in _imported_modules(path) - local - set(sys.stdlib_module_names):
            owners = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not owners & names:
                missing.setdefault(module, []).append(path.name)
    assert not missing, (
        f"imported by the tests but not in dependencies or the test extra: {missing}"
    )


def test_a_module_path_from_before_the_layers_imports_the_same_module() -> None:
    code = (
        "import kdray.report, kdray.analysis.report as new; "
        "print(kdray.report is new, new.__spec__.name, new.__name__)"
    )
    assert _fresh_python(code) == "True kdray.analysis.report kdray.analysis.report"


def test_a_trainable_pickled_under_its_old_module_path_unpickles_as_the_moved_one() -> None:
    """What Ray Tune stored for a sweep started by an older kdray: resumable after the move."""
    code = (
        "import pickle; f = pickle.loads(b'ckdray.sweep\\ndistill_trainable\\n.'); "
        "import kdray.experiments.sweep as s; print(f is s.distill_trainable)"
    )
    assert _fresh_python(code) == "True"


def test_every_old_module_path_points_at_a_module_that_exists() -> None:
    from kdray._moved import MOVED, new_name

    moved = {name for name in _modules() if "." in name}
    assert {f"{MOVED[old]}.{old}" for old in MOVED} <= moved
    assert new_name("kdray.stats") == "kdray.analysis.stats"
    assert new_name("kdray.spec") is None and new_name("kdray.analysis.stats") is None
