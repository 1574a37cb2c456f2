"""Tests for the cluster recipes in cluster/: each parses, validates against what reads it (Ray's
cluster-launcher schema, kdray's own CLI, bash) and starts things in the right order."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO

CLUSTER = REPO / "cluster"


def _sweep_options() -> set[str]:
    """The options ``kdray sweep`` takes, read from the CLI itself."""
    import typer

    from kdray.cli import app

    command = typer.main.get_command(app).commands["sweep"]  # type: ignore[attr-defined]
    return {opt for param in command.params for opt in param.opts}


def test_the_ray_up_recipe_is_valid_for_the_ray_cluster_launcher() -> None:
    import jsonschema
    import ray

    config = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # what `ray up` checks first
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # no trial on the head
    assert types["gpu"]["resources"]["GPU"] == 1
    setup = " ".join(config["setup_commands"])
    assert "-c constraints.txt -e ." in setup and "torch==2.13.0" in setup  # the lock's versions
    assert config["file_mounts"] == {"~/kdray": "."}


def test_the_rayjob_runs_a_kdray_sweep_the_cli_accepts_on_the_locked_ray() -> None:
    import ray

    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["kdray", "sweep"] and (REPO / words[2]).is_file()
    given = {w for w in words[3:] if w.startswith("--")}
    assert given <= _sweep_options() and {"--address", "--storage"} <= given
    assert words[words.index("--storage") + 1].startswith("s3://")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {c["image"] for p in pods for c in p["template"]["spec"]["containers"]}
    assert all(image.startswith(f"rayproject/ray:{ray.__version__}-") for image in images)
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


SHIMS = {
    # scontrol show hostnames: the allocation's three nodes
    "scontrol": 'printf "node-a\\nnode-b\\nnode-c\\n"',
    # srun -w NODE ... CMD: log, then run CMD as on NODE
    "srun": """echo "srun $*" >> "$LOG"
args=("$@"); i=0
while [ $i -lt ${#args[@]} ]; do
  case "${args[$i]}" in -w) export ON_NODE="${args[$((i+1))]}"; i=$((i+2));;
    -*) i=$((i+1));; *) break;; esac
done
exec "${args[@]:$i}\"""",
    "hostname": 'case "$ON_NODE" in node-a) echo 10.1.0.1;; *) echo 10.1.0.9;; esac',
    "ray": 'echo "ray on $ON_NODE: $*" >> "$LOG"',
    "kdray": 'echo "kdray: $*" >> "$LOG"',
    "sleep": "true",
}


def test_the_slurm_script_starts_head_then_workers_then_the_sweep_against_the_head(
    tmp_path: Path,
) -> None:
    script = CLUSTER / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --nodes=3" in script.read_text()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in SHIMS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log),
           "SLURM_JOB_NODELIST": "node-[a-c]", "SLURM_CPUS_PER_TASK": "8"}  # fmt: skip
    done = subprocess.run(
        ["bash", str(script), "search_spaces/rte.yaml", "/shared/kd"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # the shims run in the background as the script's do: their lines may come in any order
    lines = sorted(line for line in log.read_text().splitlines() if not line.startswith("srun"))
    head = [line for line in lines if "--head" in line]
    assert len(head) == 1
    assert head[0].startswith("ray on node-a: start --head --node-ip-address=10.1.0.1 --port=6379")
    workers = [line for line in lines if "start --address=10.1.0.1:6379" in line]
    assert sorted(line.split(":")[0] for line in workers) == ["ray on node-b", "ray on node-c"]
    (sweep_line,) = [line for line in lines if line.startswith("kdray: ")]
    assert sweep_line == (
        "kdray: sweep search_spaces/rte.yaml --address 10.1.0.1:6379 --storage /shared/kd/ray "
        "--out /shared/kd/results/rte"
    )
    text = script.read_text()  # and in the script: the head, then the workers, then the sweep
    order = ["ray start --head", 'for node in "${nodes[@]:1}"', 'kdray sweep "$spec"']
    assert [text.index(step) for step in order] == sorted(text.index(step) for step in order)
    sweep = shlex.split(sweep_line.removeprefix("kdray: "))
    assert {w for w in sweep if w.startswith("--")} <= _sweep_options()


@pytest.mark.parametrize("recipe", ["ray-up.yaml", "rayjob.yaml", "slurm.sbatch"])
def test_the_readme_links_every_recipe(recipe: str) -> None:
    assert f"cluster/{recipe}" in (REPO / "README.md").read_text()
