"""The experiment's storage as a cluster's shared place (kdray/infra/remote.py, data.publish and
data.localize), against a real S3 API: moto's server on a loopback port of this test's own."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import FIXTURE_GLUE, tiny_spec_dict
from kdray.experiments import check
from kdray.infra import remote
from kdray.spec import spec_from_dict
from kdray.training import data


def test_a_uri_keeps_its_query_at_the_end_when_parts_are_joined() -> None:
    assert remote.join("s3://b/x?scheme=http&endpoint_override=h:9", "y", "/z/") == (
        "s3://b/x/y/z?scheme=http&endpoint_override=h:9"
    )
    assert remote.join("/data/store/", "exp") == "/data/store/exp"
    assert remote.is_remote("s3://b/x") and not remote.is_remote("file:///tmp/x")
    assert not remote.is_remote("/tmp/x")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An S3 endpoint on 127.0.0.1 with one bucket; pyarrow and boto find it by the AWS_*
    variables, as a user's would."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "kdray-test",
        "AWS_SECRET_ACCESS_KEY": "kdray-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="kdray")
    yield "s3://kdray"
    server.stop()
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _stored(location: str) -> dict[str, bytes]:
    import pyarrow.fs as pafs

    fs, root = remote.filesystem(location)
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as handle:
                found[info.path[len(root) + 1 :]] = handle.read()
    return found


def test_a_mirror_follows_a_results_folder_and_leaves_out_rays_and_temporary_files(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "out"
    (folder / "students" / "t1").mkdir(parents=True)
    (folder / "trials.parquet").write_bytes(b"v1")
    (folder / "students" / "t1" / "config.json").write_text("{}")
    (folder / "ray").mkdir()
    (folder / "ray" / "tuner.pkl").write_bytes(b"ray's own")
    (folder / ".trials.parquet.tmp-host@1-x").write_bytes(b"half")
    location = remote.results_location(f"{s3}/exp", "sweep")
    assert location == f"{s3}/exp/sweep-results"
    mirror = remote.Mirror(folder, location)
    mirror.push()
    assert _stored(location) == {"trials.parquet": b"v1", "students/t1/config.json": b"{}"}
    # a table rewritten and a student pruned: the copy follows
    (folder / "trials.parquet").write_bytes(b"v2, longer")
    (folder / "students" / "t1" / "config.json").unlink()
    mirror.push()
    assert _stored(location) == {"trials.parquet": b"v2, longer"}
    # another push of the same folder (the CLI's, after the table writer's) uploads only what
    # changed since the copy there was made
    import pyarrow.fs as pafs

    past = time.time() - 60
    os.utime(folder / "trials.parquet", (past, past))  # written well before it was uploaded
    uploads: list[str] = []
    copy = pafs.copy_files

    def counted(source: str, destination: str, **kwargs: Any) -> None:
        uploads.append(source)
        copy(source, destination, **kwargs)

    monkeypatch.setattr(pafs, "copy_files", counted)
    remote.Mirror(folder, location).push()
    assert uploads == []
    (folder / "experiment.json").write_text("{}")
    remote.Mirror(folder, location).push()
    assert uploads == [str(folder / "experiment.json")]
    monkeypatch.undo()
    (folder / "experiment.json").unlink()
    mirror.push()

    # read back: a fresh copy, or laid over a folder whose other files stay
    assert (remote.pull_results(location) / "trials.parquet").read_bytes() == b"v2, longer"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "experiment.json").write_text("{}")
    remote.pull_results(location, into=mine)
    assert sorted(p.name for p in mine.iterdir()) == ["experiment.json", "trials.parquet"]
    with pytest.raises(FileNotFoundError, match="no results at s3://kdray/nothing-results"):
        remote.pull_results(f"{s3}/nothing-results")


def test_data_published_to_the_storage_is_read_on_a_node_from_its_own_copy(
    s3: str, tiny_bert: Path, tmp_path: Path
) -> None:
    raw = tiny_spec_dict(tiny_bert)
    raw["data"]["cache_dir"] = str(tmp_path / "node-cache")
    spec = spec_from_dict(raw)
    published = data.publish(spec, f"{s3}/exp/tiny-data")
    assert published.data.dir.startswith(f"{s3}/exp/tiny-data/")  # under a hash of the files
    assert {"RTE/dev.tsv", "RTE/train.tsv"} <= set(_stored(published.data.dir))
    assert data.publish(spec, f"{s3}/exp/tiny-data").data.dir == published.data.dir
    local = data.localize(published)
    assert Path(local.data.dir).is_relative_to(tmp_path / "node-cache")
    assert data.read_local("rte", local.data.dir, "dev") == data.read_local(
        "rte", FIXTURE_GLUE, "dev"
    )
    assert data.localize(published).data.dir == local.data.dir  # downloaded once

    # the user's own CSV files travel the same way, each split by itself
    files = {}
    for split in ("train", "dev"):
        files[split] = tmp_path / f"{split}.csv"
        files[split].write_text("a,label\nyes,1\nno,0\n")
    source = {"format": "csv", "files": {k: str(v) for k, v in files.items()}, "text": ["a"]}
    own = spec_from_dict(tiny_spec_dict(tiny_bert, task="mine", data={"source": source}))
    uris = data.publish(own, f"{s3}/exp/mine-data").data.source.files
    assert all(uri.startswith(f"{s3}/exp/mine-data/") for uri in uris.values())
    back = data.localize(data.publish(own, f"{s3}/exp/mine-data")).data.source.files
    assert Path(back["dev"]).read_text() == files["dev"].read_text()


def test_a_storage_that_cannot_be_written_fails_the_preflight_naming_what_to_check(
    s3: str,
) -> None:
    ok, detail = check._storage_check(f"{s3}/exp")
    assert ok and "writable" in detail
    assert remote.probe(f"{s3}/exp") is None
    ok, detail = check._storage_check("s3://no-such-bucket/exp")
    assert ok is False
    assert "s3://no-such-bucket/exp: cannot write there" in detail
    assert "AWS_ENDPOINT_URL" in detail
