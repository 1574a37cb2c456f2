"""The YAML spec: strict keys, readable errors, --set overrides, safe loading, search checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdray.spec import (
    Spec,
    SpecError,
    load_spec,
    parse_overrides,
    spec_from_dict,
    validate_search,
)

REPO = Path(__file__).resolve().parents[1]
SEARCH_SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))
BASE = {"name": "t", "task": "rte"}


def _error(raw: dict) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw)
    return str(info.value)


def _write(tmp_path: Path, raw: dict | str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------------------ search spaces


def test_there_are_search_spaces() -> None:
    assert len(SEARCH_SPACES) >= 8


@pytest.mark.parametrize("path", SEARCH_SPACES, ids=lambda p: p.name)
def test_every_search_space_loads(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, Spec)
    assert spec.name == path.stem
    assert spec.search, "every shipped search space has a search block"
    # Every searched key is a run setting and every condition refers to one.
    settings = spec.flat()
    for key, dist in spec.search.items():
        assert key in settings
        for cond in dist.when or {}:
            assert cond in settings


# ------------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    ("raw", "path", "allowed"),
    [
        ({"bogus": 1}, "bogus", ["name", "task", "train", "distill", "search"]),
        ({"train": {"lrr": 1e-4}}, "train.lrr", ["lr", "epochs", "batch_size", "seed"]),
        (
            {"distill": {"losses": {"soft": {"temp": 2}}}},
            "distill.losses.soft.temp",
            ["weight", "temperature"],
        ),
        (
            {"distill": {"stages": {"patiance": 3}}},
            "distill.stages.patiance",
            ["advance", "patience", "freeze_lower"],
        ),
        (
            {"teacher": {"cache": {"size": 3}}},
            "teacher.cache.size",
            ["enabled", "max_gb"],
        ),
        (
            {"tune": {"searcher": {"optuna": {"sampler": "tpe", "seeds": 1}}}},
            "tune.searcher.optuna.seeds",
            ["sampler", "seed"],
        ),
        ({"ablation": {"axis": {}}}, "ablation.axis", ["axes", "seeds", "baseline"]),
        (
            {"search": {"train.lr": {"loguniform": [1e-5, 1e-4], "iff": {}}}},
            "search.train.lr.iff",
            ["choice", "grid", "uniform", "loguniform", "int", "when"],
        ),
    ],
)
def test_unknown_key_names_path_and_allowed_keys(raw: dict, path: str, allowed: list[str]) -> None:
    message = _error({**BASE, **raw})
    line = next((ln for ln in message.splitlines() if ln.strip().startswith(path + ":")), None)
    assert line is not None, message
    assert "unknown key" in line
    assert "allowed:" in line, line
    listed = [k.strip() for k in line.split("allowed:", 1)[1].rstrip(")").split(",")]
    for key in allowed:
        assert key in listed, (key, line)


def test_every_unknown_key_is_reported_at_once() -> None:
    message = _error({**BASE, "train": {"lrr": 1}, "student": {"layerz": 2}})
    assert "train.lrr: unknown key" in message
    assert "student.layerz: unknown key" in message


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {**BASE, "train": {"epoch": 3}})
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    assert "train.epoch: unknown key" in str(info.value)


# ------------------------------------------------------------------------------ wrong values


@pytest.mark.parametrize(
    ("raw", "path", "hint"),
    [
        ({"task": "rtee"}, "task", "'rte'"),
        ({"distill": {"algorithm": "sidd"}}, "distill.algorithm", "'pid' or 'sid'"),
        ({"train": {"epochs": 0}}, "train.epochs", "greater than or equal to 1"),
        ({"train": {"lr": -1.0}}, "train.lr", "greater than 0"),
        ({"train": {"device": "tpu"}}, "train.device", "cuda:N"),
        ({"train": {"precision": "fp8"}}, "train.precision", "'bf16'"),
        ({"distill": {"layer_map": "middle"}}, "distill.layer_map", "'skip', 'first' or 'last'"),
        ({"distill": {"layer_map": [0, 2]}}, "distill.layer_map", "numbered from 1"),
        ({"distill": {"layer_map": []}}, "distill.layer_map", "may not be empty"),
        (
            {"distill": {"losses": {"attention": {"rows": "some"}}}},
            "distill.losses.attention.rows",
            "'all' or 'cls'",
        ),
        ({"distill": {"stages": {"advance": "never"}}}, "distill.stages.advance", "'plateau'"),
        ({"student": {"hidden_size": 64}}, "student", "init: random"),
        ({"name": "has space"}, "name", "pattern"),
        ({"tune": {"loggers": ["neptune"]}}, "tune.loggers.0", "'mlflow' or 'wandb'"),
        ({"tune": {"wandb": {"mode": "shared"}}}, "tune.wandb.mode", "'offline' or 'online'"),
        ({"tune": {"loggers": ["csv", "csv"]}}, "tune.loggers", "repeated: csv"),
        ({"tune": {"mlflow": {"uri": "x"}}}, "tune.mlflow.uri", "tracking_uri, experiment"),
        (
            {"tune": {"searcher": {"optuna": {"storage": "redis://127.0.0.1/0"}}}},
            "tune.searcher.optuna.storage",
            "sqlite://, postgresql://, mysql:// (got redis://)",
        ),
    ],
)
def test_wrong_value_names_key_path_and_what_is_allowed(raw: dict, path: str, hint: str) -> None:
    message = _error({**BASE, **raw})
    lines = [ln.strip() for ln in message.splitlines()[1:]]
    assert any(ln.startswith(path) and hint in ln for ln in lines), message


def test_missing_required_keys() -> None:
    message = _error({"task": "rte"})
    assert "name: required key is missing" in message


def test_not_a_mapping() -> None:
    with pytest.raises(SpecError, match="mapping"):
        spec_from_dict(["name", "task"])  # type: ignore[arg-type]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------ --set


def test_overrides_parse_types() -> None:
    values = parse_overrides(
        [
            "train.lr=1e-4",
            "train.warmup=0.2",
            "train.epochs=7",
            "distill.layer_map=[1, 3]",
            "train.save_student=false",
            "distill.stages.freeze_lower=true",
            "distill.algorithm=pid",
            "train.threads=",
            "train.max_grad_norm=null",
            "teacher.model=a=b",
        ]
    )
    assert values["train.lr"] == pytest.approx(1e-4) and isinstance(values["train.lr"], float)
    assert values["train.warmup"] == 0.2
    assert values["train.epochs"] == 7 and isinstance(values["train.epochs"], int)
    assert values["distill.layer_map"] == [1, 3]
    assert values["train.save_student"] is False
    assert values["distill.stages.freeze_lower"] is True
    assert values["distill.algorithm"] == "pid"
    assert values["train.threads"] is None
    assert values["train.max_grad_norm"] is None
    assert values["teacher.model"] == "a=b"  # only the first '=' splits


@pytest.mark.parametrize("text", ["1e-4", "1E-4", "-2.5e-3", "3e5", "1.0e-4"])
def test_exponent_numbers_are_floats(text: str) -> None:
    value = parse_overrides([f"train.lr={text}"])["train.lr"]
    assert isinstance(value, float)
    assert value == float(text)


def test_overrides_apply_to_a_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {**BASE, "train": {"lr": 3e-5, "epochs": 8}})
    spec = load_spec(
        path,
        [
            "train.lr=1e-4",
            "distill.layer_map=[2, 4]",
            "student.layers=2",
            "train.save_student=false",
            "distill.losses.soft.temperature=4",
        ],
    )
    assert spec.train.lr == pytest.approx(1e-4)
    assert spec.train.epochs == 8  # untouched
    assert spec.distill.layer_map == [2, 4]
    assert spec.student.layers == 2
    assert spec.train.save_student is False
    assert spec.distill.losses.soft.temperature == 4.0
    # A dict of values works the same way.
    assert load_spec(path, {"train.lr": 2e-4}).train.lr == pytest.approx(2e-4)


def test_override_without_equals_is_an_error() -> None:
    with pytest.raises(SpecError) as info:
        parse_overrides(["train.lr"])
    assert "train.lr" in str(info.value)
    assert "key.path=value" in str(info.value)


def test_override_of_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, {**BASE, "train": {"lr": 1e-4}})
    with pytest.raises(SpecError, match=r"train\.lrr: unknown key"):
        load_spec(path, ["train.lrr=1e-4"])
    with pytest.raises(SpecError, match=r"nosection: unknown key"):
        load_spec(path, ["nosection.x=1"])
    with pytest.raises(SpecError, match="'lr' is a value, not a section"):
        load_spec(path, ["train.lr.x=1"])


def test_override_with_bad_value_names_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE)
    with pytest.raises(SpecError, match=r"train\.epochs: .*greater than or equal to 1"):
        load_spec(path, ["train.epochs=0"])


def test_override_with_unparsable_value_is_a_spec_error(tmp_path: Path) -> None:
    """A --set value that is not valid YAML is reported like every other spec problem."""
    path = _write(tmp_path, BASE)
    with pytest.raises(SpecError, match=r"train\.layer_map|distill\.layer_map"):
        load_spec(path, ["distill.layer_map=[1, 2"])


def test_cli_reports_a_bad_override_cleanly(tmp_path: Path, monkeypatch) -> None:
    from kdray import cli

    path = _write(tmp_path, BASE)
    calls: list[object] = []
    monkeypatch.setattr("kdray.training.distill.distill", lambda *a, **k: calls.append(a))
    result = CliRunner().invoke(cli.app, ["run", str(path), "--set", "train.lrr=1e-4"])
    assert result.exit_code == 2, result.output
    assert "train.lrr" in result.output and "unknown key" in result.output
    assert calls == []


# ------------------------------------------------------------------------------ safe YAML


def test_python_tags_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = (
        "name: t\ntask: rte\n"
        f"train: !!python/object/apply:os.system ['touch {marker}']\n"
        "data: !!python/object:pathlib.Path {}\n"
    )
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "not valid YAML" in str(info.value)
    assert "python/object" in str(info.value)
    assert not marker.exists()


def test_python_tags_in_overrides_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _write(tmp_path, BASE)
    with pytest.raises(SpecError):
        load_spec(path, [f"train.seed=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def test_load_spec_uses_safe_load(tmp_path: Path, monkeypatch) -> None:
    loaders: list[type] = []
    real_load = yaml.load

    def checked_load(stream, Loader):  # noqa: N803 - yaml's own argument name
        loaders.append(Loader)
        return real_load(stream, Loader)

    def refuse(*args, **kwargs):
        raise AssertionError("only yaml.safe_load may read a spec")

    monkeypatch.setattr(yaml, "load", checked_load)
    monkeypatch.setattr(yaml, "unsafe_load", refuse)
    monkeypatch.setattr(yaml, "full_load", refuse)
    load_spec(_write(tmp_path, BASE), ["train.lr=1e-4"])
    assert loaders  # the file and the override value
    assert all(issubclass(loader, yaml.SafeLoader) for loader in loaders)


def test_not_valid_yaml(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(_write(tmp_path, "name: [t\ntask: rte\n"))


# ------------------------------------------------------------------------------ hostile YAML


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: t\ntask: rte\nname: u\n", "line 3: name is given twice (first on line 1)"),
        (
            "name: t\ntask: rte\ntrain:\n  lr: 1.0e-4\n  epochs: 3\n  lr: 1.0e-3\n",
            "line 6: train.lr is given twice (first on line 4)",
        ),
        (
            "name: t\ntask: rte\ntrain: {lr: 1.0e-4, lr: 2.0e-4}\n",
            "line 3: train.lr is given twice (first on line 3)",
        ),
        (
            "name: t\ntask: rte\nsearch:\n  train.lr: {choice: [1]}\n  train.lr: {choice: [2]}\n",
            "line 5: search.train.lr is given twice (first on line 4)",
        ),
        (
            "name: t\ntask: rte\ntune: {searcher: {optuna: {seed: 1, seed: 2}}}\n",
            "line 3: tune.searcher.optuna.seed is given twice",
        ),
        # 1 and 1.0 are the same key once read
        ("name: t\ntask: rte\nablation: {axes: {1: [a], 1.0: [b]}}\n", "axes.1.0 is given twice"),
    ],
    ids=["top", "nested", "flow", "search", "deep", "same-value"],
)
def test_a_key_given_twice_is_refused_with_file_key_and_lines(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message and "keep one" in message


def test_a_merge_key_may_be_overridden_explicitly(tmp_path: Path) -> None:
    text = "name: t\ntask: rte\ntrain:\n  <<: {lr: 1.0e-4, epochs: 7}\n  lr: 2.0e-4\n"
    spec = load_spec(_write(tmp_path, text))
    assert spec.train.lr == 2.0e-4 and spec.train.epochs == 7


def test_a_key_given_twice_in_an_override_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="given twice"):
        load_spec(_write(tmp_path, BASE), ["tune.searcher={optuna: {}, optuna: {}}"])


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    # 7 levels of 10 aliases: 10^7 values once expanded, 70 nodes as written
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for level in range(1, 7):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    path = _write(tmp_path, "\n".join(["name: t", "task: rte", *lines]) + "\n")
    with pytest.raises(SpecError, match=r"line 7: the document expands to more than 100000"):
        load_spec(path)


def test_an_alias_inside_itself_and_deep_nesting_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="line 3: a YAML alias refers to itself"):
        load_spec(_write(tmp_path, "name: t\ntask: rte\nsearch: &a {x: *a}\n"))
    deep = "name: t\ntask: rte\nx: " + "[" * 3000 + "]" * 3000 + "\n"
    with pytest.raises(SpecError, match="nested too deeply"):
        load_spec(_write(tmp_path, deep, "deep.yaml"))


def test_errors_stay_short_whatever_the_input() -> None:
    message = _error({**BASE, "train": {"device": "x" * 5000}, "k" * 3000: 1})
    assert "(got 'xxx" in message and "x" * 80 not in message and "x..." in message
    assert "k" * 77 + "...: unknown key" in message and "k" * 78 not in message
    assert len(message) < 800

    many = _error({**BASE, "train": {f"k{i}": 1 for i in range(100)}})
    lines = many.splitlines()
    assert len(lines) == 1 + 20 + 1
    assert lines[-1] == "  ... and 80 more"

    bad_choices = _error(
        {**BASE, "search": {"train.lr": {"choice": [-float(i) for i in range(1, 50)]}}}
    )
    assert bad_choices.splitlines()[-1] == "  ... and 29 more"


@pytest.mark.parametrize(
    ("raw", "path", "allowed"),
    [
        ({"train": {"epochs": 10001}}, "train.epochs", "1 <= epochs <= 10000"),
        ({"train": {"batch_size": 65537}}, "train.batch_size", "1 <= batch_size <= 65536"),
        (
            {"train": {"eval_batch_size": 10**6}},
            "train.eval_batch_size",
            "1 <= eval_batch_size <= 65536",
        ),
        ({"train": {"lr": 11.0}}, "train.lr", "0 < lr <= 10"),
        ({"train": {"seed": -1}}, "train.seed", "0 <= seed <= 4294967295"),
        ({"teacher": {"epochs": 1001}}, "teacher.epochs", "1 <= epochs <= 1000"),
        ({"teacher": {"batch_size": 70000}}, "teacher.batch_size", "1 <= batch_size <= 65536"),
        ({"teacher": {"lr": 100.0}}, "teacher.lr", "0 < lr <= 10"),
        ({"tune": {"num_samples": 100001}}, "tune.num_samples", "1 <= num_samples <= 100000"),
        (
            {"distill": {"losses": {"soft": {"temperature": 1001.0}}}},
            "distill.losses.soft.temperature",
            "0 < temperature <= 1000",
        ),
        (
            {"distill": {"losses": {"attention": {"weight": 2e6}}}},
            "distill.losses.attention.weight",
            "0 <= weight <= 1000000",
        ),
        (
            {"distill": {"losses": {"hard": {"weight": 1e7}}}},
            "distill.losses.hard.weight",
            "0 <= weight <= 1000000",
        ),
        ({"ablation": {"seeds": [1, 2**32]}}, "ablation.seeds.1", "0 <= seeds <= 4294967295"),
    ],
)
def test_numbers_out_of_their_sane_range_name_key_and_range(
    raw: dict, path: str, allowed: str
) -> None:
    message = _error({**BASE, **raw})
    line = next(ln.strip() for ln in message.splitlines() if ln.strip().startswith(path + ":"))
    assert f"allowed: {allowed}" in line, message


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_and_inf_are_never_a_setting(tmp_path: Path, value: str) -> None:
    path = _write(tmp_path, BASE)
    with pytest.raises(SpecError, match=r"stages\.min_delta: Input should be a finite number"):
        load_spec(path, [f"distill.stages.min_delta={value}"])


def test_the_largest_allowed_values_load() -> None:
    spec = spec_from_dict(
        {
            **BASE,
            "train": {"epochs": 10000, "batch_size": 65536, "lr": 10.0},
            "teacher": {"epochs": 1000},
            "tune": {"num_samples": 100000},
            "distill": {"losses": {"soft": {"temperature": 1000.0, "weight": 1e6}}},
        }
    )
    assert spec.train.epochs == 10000 and spec.distill.losses.soft.weight == 1e6


# ------------------------------------------------------------------------------ search block


def _search_error(search: dict) -> str:
    return _error({**BASE, "search": search})


def test_search_unknown_key() -> None:
    message = _search_error({"train.learning_rate": {"choice": [1e-5]}, "lr": {"choice": [1]}})
    assert "search.train.learning_rate: not a run setting" in message
    assert "search.lr: not a run setting (did you mean" in message
    assert "train.lr" in message
    assert "search.name" in _search_error({"name": {"choice": ["a", "b"]}})


def test_search_bad_value_in_choice() -> None:
    message = _search_error({"distill.algorithm": {"choice": ["soft", "sidd"]}})
    assert "search.distill.algorithm: value 'sidd' is not allowed" in message
    assert "'pid' or 'sid'" in message
    assert "'soft' is not allowed" not in message


def test_search_bad_range_bounds() -> None:
    message = _search_error({"train.epochs": {"int": [0, 3]}})
    assert "search.train.epochs: value 0 is not allowed" in message


@pytest.mark.parametrize("kind", ["uniform", "loguniform", "int"])
def test_search_lo_must_be_below_hi(kind: str) -> None:
    message = _search_error({"train.epochs": {kind: [5, 5]}})
    assert "search.train.epochs" in message
    assert "lo < hi" in message


def test_search_distribution_needs_exactly_one_kind() -> None:
    message = _search_error({"train.lr": {"choice": [1e-5], "uniform": [1e-5, 1e-4]}})
    assert "search.train.lr" in message and "exactly one of" in message
    assert "got none" in _search_error({"train.lr": {"when": {"distill.algorithm": ["sid"]}}})


def test_search_loguniform_needs_positive_bounds() -> None:
    assert "> 0" in _search_error({"train.warmup": {"loguniform": [0.0, 0.5]}})


def test_search_when_on_unknown_key() -> None:
    message = _search_error(
        {"train.lr": {"loguniform": [1e-5, 1e-4], "when": {"distill.algo": ["sid"]}}}
    )
    assert "search.train.lr.when.distill.algo: not a run setting" in message


def test_search_when_on_itself_and_empty() -> None:
    message = _search_error(
        {
            "train.lr": {"loguniform": [1e-5, 1e-4], "when": {"train.lr": [1e-5]}},
            "train.seed": {"choice": [1, 2], "when": {"distill.algorithm": []}},
        }
    )
    assert "search.train.lr.when: a parameter cannot depend on itself" in message
    assert "search.train.seed.when.distill.algorithm: give a non-empty list" in message


def test_search_when_value_the_setting_cannot_take() -> None:
    """A typo in a condition's values would silently switch the parameter off for good."""
    message = _search_error(
        {"train.lr": {"loguniform": [1e-5, 1e-4], "when": {"distill.algorithm": ["sdi"]}}}
    )
    assert "search.train.lr.when.distill.algorithm" in message
    assert "'sdi'" in message


def test_all_search_problems_reported_together() -> None:
    message = _search_error(
        {
            "train.lrate": {"choice": [1e-5]},
            "distill.algorithm": {"choice": ["sid", "bogus"]},
            "train.seed": {"choice": [1, 2], "when": {"distill.nothing": ["x"]}},
        }
    )
    assert message.splitlines()[0].endswith("invalid search block")
    assert "search.train.lrate" in message
    assert "value 'bogus'" in message
    assert "search.train.seed.when.distill.nothing" in message


def test_search_errors_stop_the_cli_before_anything_runs(tmp_path: Path, monkeypatch) -> None:
    from kdray import cli

    called: list[str] = []
    monkeypatch.setattr("kdray.training.distill.distill", lambda *a, **k: called.append("distill"))
    monkeypatch.setattr(
        "kdray.training.teacher.ensure_teacher", lambda *a, **k: called.append("teacher")
    )
    for search in (
        {"distill.algorithm": {"choice": ["sid", "bogus"]}},
        {"train.lr": {"uniform": [1e-3, 1e-5]}},
        {"train.lrate": {"choice": [1e-5]}},
    ):
        path = _write(tmp_path, {**BASE, "search": search})
        for command in ("run", "teacher"):
            result = CliRunner().invoke(cli.app, [command, str(path)])
            assert result.exit_code == 2, result.output
            assert "search." in result.output
    assert called == []


def test_validate_search_accepts_valid_block() -> None:
    spec = spec_from_dict(
        {
            **BASE,
            "distill": {"algorithm": "soft"},
            "search": {
                "distill.algorithm": {"choice": ["soft", "sid"]},
                "train.lr": {"loguniform": [1e-5, 1e-4]},
                "train.epochs": {"int": [2, 4]},
                "distill.layer_map": {"grid": ["skip", [2, 4, 6, 8, 10, 12]]},
                "distill.losses.soft.temperature": {
                    "uniform": [1, 5],
                    "when": {"distill.algorithm": ["soft", "sid"]},
                },
            },
        }
    )
    validate_search(spec)
    assert spec.search["train.epochs"].kind == "int"
    assert spec.search["train.epochs"].values == (2, 4)
    assert spec.search["distill.algorithm"].values == ["soft", "sid"]


# ------------------------------------------------------------------------------ fingerprint


def test_fingerprint_is_stable() -> None:
    a = spec_from_dict({**BASE, "train": {"lr": 1e-4}})
    b = spec_from_dict({**BASE, "train": {"lr": 1e-4}})
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() == a.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", a.fingerprint())
    # Defaults spelled out give the same fingerprint as defaults left out.
    c = spec_from_dict({**BASE, "train": {"lr": 1e-4, "epochs": 50, "seed": 42}})
    assert c.fingerprint() == a.fingerprint()


def test_fingerprint_ignores_name_and_search_settings() -> None:
    a = spec_from_dict(BASE)
    b = spec_from_dict({**BASE, "name": "other"})
    c = spec_from_dict({**BASE, "search": {"train.lr": {"loguniform": [1e-5, 1e-4]}}})
    d = spec_from_dict({**BASE, "tune": {"num_samples": 3}})
    assert a.fingerprint() == b.fingerprint() == c.fingerprint() == d.fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        {"train": {"lr": 3e-5}},
        {"train": {"seed": 7}},
        {"distill": {"algorithm": "pid"}},
        {"distill": {"layer_map": [2, 4, 6, 8, 10, 12]}},
        {"distill": {"losses": {"soft": {"temperature": 2.0}}}},
        {"student": {"layers": 4}},
        {"teacher": {"lr": 3e-5}},
        {"task": "mrpc"},
    ],
)
def test_fingerprint_changes_with_settings(change: dict) -> None:
    assert spec_from_dict({**BASE, **change}).fingerprint() != spec_from_dict(BASE).fingerprint()


def test_with_values_validates_again() -> None:
    spec = spec_from_dict(BASE)
    changed = spec.with_values({"train.lr": 1e-4, "distill.algorithm": "pid"})
    assert changed.train.lr == pytest.approx(1e-4)
    assert changed.distill.algorithm == "pid"
    assert spec.distill.algorithm == "sid"  # the original is untouched
    with pytest.raises(SpecError, match=r"train\.epochs"):
        spec.with_values({"train.epochs": 0})


def test_too_few_epochs_for_the_stages_is_caught_at_load(tmp_path: Path) -> None:
    """sid on 6 layers has 7 stages: 5 epochs can never run, and it is said before any work."""
    path = _write(tmp_path, {**BASE, "train": {"epochs": 5}})
    with pytest.raises(SpecError, match=r"train\.epochs.*7 stages"):
        load_spec(path, ["distill.algorithm=sid", "student.layers=6"])
    assert load_spec(path, ["distill.algorithm=soft"]).train.epochs == 5


def test_sweep_and_ablate_report_settings_errors_without_a_traceback(
    tmp_path: Path, monkeypatch
) -> None:
    from kdray import cli

    monkeypatch.setattr(
        "kdray.experiments.sweep.init_ray", lambda *a, **k: pytest.fail("Ray started")
    )
    raw = {
        **BASE,
        "search": {"train.lr": {"choice": [1e-5, 2e-5]}},
        "tune": {"metric": "f1"},  # RTE has accuracy only
        "ablation": {"axes": {"distill.algorithm": ["soft", "sid"]}},
    }
    path = _write(tmp_path, raw)
    for command in ("sweep", "ablate"):
        result = CliRunner().invoke(cli.app, [command, str(path), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        assert "tune.metric 'f1' is not a dev metric of rte" in result.output
        assert "Traceback" not in result.output


def test_a_when_on_a_setting_that_is_never_searched_is_an_error() -> None:
    """The condition can never change, so the parameter is always or never sampled."""
    message = _search_error(
        {"train.lr": {"loguniform": [1e-5, 1e-4], "when": {"distill.algorithm": ["soft"]}}}
    )
    assert (
        "search.train.lr.when.distill.algorithm: distill.algorithm is not searched, so the "
        "condition never changes (distill.algorithm is always 'sid': train.lr is never sampled)"
    ) in message


def test_tracking_defaults_are_tensorboard_and_csv_with_a_local_optuna_journal() -> None:
    tune = spec_from_dict(BASE).tune
    assert tune.loggers == ["tensorboard", "csv"]
    assert tune.mlflow.tracking_uri is None and tune.mlflow.experiment is None
    # W&B stays on the machine unless the spec says online; project etc. default at run time
    assert tune.wandb.mode == "offline"
    assert tune.wandb.project is None and tune.wandb.dir is None
    assert tune.searcher.optuna.storage is None  # <results folder>/optuna.journal
    url = "postgresql+psycopg://kd@127.0.0.1/optuna"
    given = {"searcher": {"optuna": {"storage": url}}, "loggers": ["json", "mlflow"]}
    tune = spec_from_dict({**BASE, "tune": given}).tune
    assert tune.searcher.optuna.storage == url
    assert tune.loggers == ["json", "mlflow"]


def test_an_invalid_point_to_evaluate_is_refused_before_any_compute_naming_key_value_and_file(
    tmp_path: Path,
) -> None:
    """Before, ``train.lr: -5`` for a log-uniform range was found by Optuna after the teacher
    was fine-tuned and Ray had started, with a message naming neither the key nor the file."""
    raw = {
        "name": "p",
        "task": "rte",
        "search": {
            "train.lr": {"loguniform": [1e-5, 1e-3]},
            "distill.algorithm": {"choice": ["soft", "sid"]},
        },
        "tune": {
            "points_to_evaluate": [
                {"train.lr": -5, "distill.algorithm": "sid"},
                {"train.lr": 1e-4, "distill.algorithm": "pid", "train.epochs": 3},
            ]
        },
    }
    path = _write(tmp_path, raw)
    with pytest.raises(SpecError) as error:
        load_spec(path)
    message = str(error.value)
    assert message.startswith(f"{path}: invalid search block")
    assert "tune.points_to_evaluate[0].train.lr: -5 is outside loguniform [1e-05, 0.001]" in message
    assert "tune.points_to_evaluate[1].distill.algorithm: 'pid' is not one of ['soft', 'sid']" in (
        message
    )
    assert "tune.points_to_evaluate[1].train.epochs: not a searched setting" in message
    raw["tune"]["points_to_evaluate"] = [{"train.lr": 1e-4, "distill.algorithm": "sid"}]
    valid = _write(tmp_path, raw, "valid.yaml")
    assert load_spec(valid).tune.points_to_evaluate[0]["train.lr"] == 1e-4
    from kdray.cli import app

    result = CliRunner().invoke(app, ["sweep", str(path)])  # refused before Ray or a teacher
    assert result.exit_code == 2
    assert "points_to_evaluate[0].train.lr: -5 is outside" in " ".join(result.output.split())
