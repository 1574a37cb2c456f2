"""kdray on a real multi-host Ray cluster: a head and two worker hosts, each in a network
namespace of its own with its own address, folders and kdray cache, and an S3 object store
(moto's server) on a fourth host as the experiments' storage. A worker host is killed mid-trial;
the trial goes on on the other host from its checkpoint in the store, no row is lost, and the
tables and students are read back from the store alone on another host.

Runs as root where ``ip netns`` is permitted (CI's machine); elsewhere it is skipped, saying why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from netns_cluster import Hosts, hosts, tool, unavailable, wait_for

from conftest import FIXTURE_GLUE, grid_tune, tiny_spec_dict

WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces: {WHY_NOT}")

BUCKET = "kdray"
STORAGE = f"s3://{BUCKET}/experiments"
S3_PORT = 5000


def _s3_env(h: Hosts) -> dict[str, str]:
    """What every host knows of the object store, as a cluster's machines would be set up."""
    return {
        "AWS_ACCESS_KEY_ID": "kdray-test",
        "AWS_SECRET_ACCESS_KEY": "kdray-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{h.address['s3']}:{S3_PORT}",
        "AWS_EC2_METADATA_DISABLED": "true",  # no probe of a cloud metadata address
    }


def _start_store(h: Hosts) -> None:
    h.popen(
        "s3", [tool("moto_server"), "-H", h.address["s3"], "-p", str(S3_PORT)],
        h.work["s3"] / "moto.log",
    )  # fmt: skip
    create = (
        "import boto3, os; boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL'])"
        f".create_bucket(Bucket='{BUCKET}')"
    )

    def made() -> bool:
        return h.run("head", [sys.executable, "-c", create], timeout=30)[0] == 0

    wait_for(made, 60, "the S3 store", every=1)


def _start_node(h: Hosts, name: str, temp: Path | None = None, **env: str) -> None:
    """``ray start`` on host ``name``: the head (no CPUs: trials run on the workers) or a
    worker with one CPU; ``env`` reaches every process Ray starts there."""
    args = ["--node-ip-address", h.address[name], "--disable-usage-stats"]
    args += ["--temp-dir", str(temp or h.temp[name])]
    if name == "head":
        args += ["--head", "--port", "6379", "--num-cpus", "0", "--include-dashboard", "false"]
    else:
        args += ["--address", f"{h.address['head']}:6379", "--num-cpus", "1"]
    code, output = h.run(name, [tool("ray"), "start", *args], timeout=120, **env)
    assert code == 0, output[-3000:]


def _alive_workers(h: Hosts) -> int:
    count = (
        f"import ray; ray.init(address='{h.address['head']}:6379', log_to_driver=False); "
        "print(sum(1 for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')))"
    )
    code, output = h.run("head", [sys.executable, "-c", count], timeout=60)
    return int(output.strip().splitlines()[-1]) if code == 0 else 0


WORKERS = ("w1", "w2")


def _epochs_counted(h: Hosts, worker: str) -> int:
    """How many epochs host ``worker`` has ended so far (see :func:`_epoch_plan`)."""
    counted = h.work[worker] / "hits.distill.epoch"
    return counted.stat().st_size if counted.exists() else 0


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else f"({log}: no log)"


def _ray_logs(h: Hosts) -> str:
    """The end of the latest Ray error logs of each Ray host: why a trial never started."""
    parts = []
    for worker in ("head", *WORKERS):
        logs = h.temp[worker].glob("session_latest/logs/*.err")
        for path in sorted(logs, key=lambda p: p.stat().st_mtime)[-3:]:
            parts.append(f"--- {worker}: {path.name}\n{_tail(path, 1500)}")
    return "\n".join(parts)


def _epoch_plan(counter: Path) -> str:
    """Every epoch on this host counted (``<counter>.distill.epoch``) and a second long, so a
    test can kill a host while its trial is mid-way whatever the machine's speed."""
    return json.dumps({"action": "count", "counter": str(counter), "slow": {"distill.epoch": 1}})


@pytest.fixture(scope="module")
def cluster_hosts(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("hosts")
    with hosts(["head", "w1", "w2", "s3", "laptop"], root) as h:
        h.env.update(_s3_env(h))
        # a dead host is noticed in seconds, not Ray's default half minute
        h.env.update(
            RAY_health_check_period_ms="500",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
        )
        _start_store(h)
        _start_node(h, "head")
        for worker in WORKERS:  # each host counts its own epochs, a second each
            _start_node(h, worker, KDRAY_FAULT_PLAN=_epoch_plan(h.work[worker] / "hits"))
        wait_for(lambda: _alive_workers(h) == 2, 60, "two worker hosts")
        yield h


def _spec_file(h: Hosts, model: Path, name: str, **sections: Any) -> Path:
    spec = tiny_spec_dict(model, name=name, **sections)
    spec["data"] = {"dir": str(FIXTURE_GLUE), "max_seq_length": 32}
    path = h.work["head"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _kdray(h: Hosts, host: str, *args: str, timeout: float = 300, **env: str) -> str:
    code, output = h.run(host, [tool("kdray"), *args], timeout=timeout, **env)
    assert code == 0, f"kdray {' '.join(args)} on {host} exited {code}:\n{output[-4000:]}"
    return output


def _cluster_args(h: Hosts) -> list[str]:
    return ["--address", f"{h.address['head']}:6379", "--storage", STORAGE]


def _laptop_sweep(h: Hosts, spec: Path, private: Path) -> Any:
    """``kdray sweep`` through Ray Client from the laptop host, its data and --out folder on a
    tmpfs that only this command sees (the head's writes to the same path land on the shared
    disk instead), then ``kdray.load`` of that folder, printed as JSON."""
    out = private / "out"
    check = (
        f"import json, kdray; r = kdray.load('{out}'); "
        "print(json.dumps(r.trials[['trial_id', 'status']].to_dict('records')), len(r.epochs))"
    )
    address = f"ray://{h.address['head']}:10001"
    glue = private / "glue"  # the data too: no other host can read it but by S3
    script = (
        f"mount -t tmpfs kdray-laptop {private} && mkdir {glue} && "
        f"cp -r {FIXTURE_GLUE / 'RTE'} {glue}/ && "
        f"{tool('kdray')} sweep {spec} --out {out} --address {address} --storage {STORAGE} "
        f"--set data.dir={glue} && "
        f'{sys.executable} -c "{check}"'
    )
    return h.popen("laptop", ["sh", "-c", script], h.work["laptop"] / "sweep.log")


def test_an_adaptive_ablation_runs_across_both_worker_hosts_with_s3_storage(
    cluster_hosts: Hosts, tiny_bert: Path
) -> None:
    h = cluster_hosts  # both worker hosts (the next test kills one)
    tune = grid_tune(max_failures=2)
    ablation = {
        "axes": {"distill.algorithm": ["soft", "idal"]},
        "seeds": {"min": 2, "max": 2, "step": 1},  # adaptive rounds: one is enough here
    }
    spec = _spec_file(
        h, tiny_bert, "netns", tune=tune, ablation=ablation, train={"epochs": 2},
        distill={"algorithm": "soft"},
    )  # fmt: skip
    out = h.work["head"] / "results" / "netns-ablation"
    output = _kdray(h, "head", "ablate", str(spec), "--out", str(out), *_cluster_args(h))
    assert "2 cells x 2 seeds = 4 adaptive seeds, first round" in output
    trials = pd.read_parquet(out / "trials.parquet")
    assert set(trials["status"]) == {"ok"} and len(trials) >= 4
    assert trials["node_id"].nunique() == 2  # both worker hosts ran cells
    location = f"{STORAGE}/netns-ablation-results"
    assert f"also in the storage: kdray report {location}" in output
    report = _kdray(h, "w2", "report", location, "--format", "csv")
    assert "idal" in report


def test_a_sweep_from_another_machine_survives_losing_a_worker_host_and_lives_in_s3(
    cluster_hosts: Hosts, tiny_bert: Path
) -> None:
    """Ray Client (``--address ray://``) from a laptop host: the Tuner and its table writer run
    on the head, and the laptop's --out folder gets the tables back by the storage. A worker
    host dies mid-trial: its trial goes on on the other host from its checkpoint in S3. Then a
    third host reads the tables and exports the student from S3 alone."""
    h = cluster_hosts
    search = {"distill.algorithm": {"grid": ["soft", "sid"]}}
    spec = _spec_file(
        h, tiny_bert, "netns", search=search, tune=grid_tune(max_failures=2), train={"epochs": 3}
    )
    private = h.work["laptop"] / "private"
    private.mkdir()
    before = {w: _epochs_counted(h, w) for w in WORKERS}  # the ablation's epochs
    log = h.work["laptop"] / "sweep.log"
    sweep = _laptop_sweep(h, spec, private)

    def mid_trial() -> str | None:
        """The worker host whose trial is past its first epoch (checkpointed in S3), with two
        to go: whichever host Ray placed it on."""
        assert sweep.poll() is None, f"the sweep ended first:\n{_tail(log)}\n{_ray_logs(h)}"
        return next((w for w in WORKERS if _epochs_counted(h, w) > before[w]), None)

    try:
        victim = wait_for(mid_trial, 240, "a worker host's first epoch")
    except TimeoutError as e:
        raise AssertionError(f"{e}; the sweep's log:\n{_tail(log)}\n{_ray_logs(h)}") from e
    assert h.kill(victim) > 0
    assert sweep.wait(timeout=300) == 0, _tail(log)

    # the head's copy, at the same path on the shared disk (the laptop's is on its tmpfs)
    out = private / "out"
    trials = pd.read_parquet(out / "trials.parquet")
    epochs = pd.read_parquet(out / "epochs.parquet")
    assert sorted(trials["distill.algorithm"]) == ["sid", "soft"]
    assert trials["data.dir"].str.startswith(f"{STORAGE}/netns-data/").all()
    assert set(trials["status"]) == {"ok"}
    retried = trials[trials["num_failures"] >= 1]
    assert len(retried) == 1  # the killed host's trial, retried on the other host
    # ...from its last checkpoint in S3 (at least epoch 1 was checkpointed before the kill)
    assert retried["resumed_from_epoch"].iloc[0] >= 1
    assert trials["node_id"].nunique() == 1  # both ended on the host that is left
    for _, row in trials.iterrows():  # every epoch once: nothing lost, nothing doubled
        assert sorted(epochs[epochs["trial_id"] == row["trial_id"]]["epoch"]) == [1, 2, 3]
    # the laptop's own folder holds the same rows, brought back from S3
    rows = json.dumps([{"trial_id": t, "status": "ok"} for t in trials["trial_id"]])
    text = log.read_text()
    assert text.strip().splitlines()[-1] == f"{rows} 6"
    assert f"also in the storage: kdray report {STORAGE}/netns-results" in text

    # another host with nothing of theirs: the tables and a student from S3 alone
    read = (
        f"import json, kdray; r = kdray.load('{STORAGE}/netns-results'); "
        "print(json.dumps(sorted(r.trials['trial_id'])), len(r.epochs))"
    )
    code, output = h.run("w2", [sys.executable, "-c", read], timeout=120)
    assert code == 0, output[-3000:]
    assert output.strip().splitlines()[-1] == f"{json.dumps(sorted(trials['trial_id']))} 6"
    exported = h.work["w2"] / "exported"
    _kdray(h, "w2", "export", f"{STORAGE}/netns-results", "--best", "--to", str(exported))
    assert (exported / "config.json").is_file() and (exported / "README.md").is_file()
