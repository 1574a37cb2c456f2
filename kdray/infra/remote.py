"""The experiment's storage as the one place every node of a cluster shares.

On a cluster, ``--storage`` (a shared path or a pyarrow filesystem URI such as ``s3://bucket/x``)
is where the teacher, checkpoints and kept students travel between nodes, and where a results
folder is mirrored, so ``kdray report`` and ``kdray export`` work from the storage alone (on
another machine, or after the driver's disk is gone). A URI keeps its query (``?endpoint_override=
...&scheme=http``) at the end whatever is joined to it. Pure Python over ``pyarrow.fs``: no Ray,
no torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdray.infra.store import (
    atomic_dir,
    atomic_file,
    cache_root,
    content_hash,
    is_temp_name,
    temp_beside,
)

logger = logging.getLogger("kdray")

#: A mirrored results folder sits beside the Ray experiment of the same name.
RESULTS_SUFFIX = "-results"


def is_remote(location: str | Path) -> bool:
    """Whether ``location`` is a URI other than ``file://`` (S3, GCS, HDFS, ...)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a path or a URI; a URI's query string stays at the end
    (``s3://b/x?scheme=http`` + ``y`` -> ``s3://b/x/y?scheme=http``)."""
    head, sep, query = str(base).partition("?")
    path = "/".join([head.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return path + sep + query


def filesystem(location: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path in it)`` of a path or URI."""
    import pyarrow.fs as pafs

    if "://" not in location:
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    return pafs.FileSystem.from_uri(location)


def probe(location: str) -> str | None:
    """Why nothing can be written at ``location`` (the error, one line), or None: a small
    file is written there and removed, before any compute is spent."""
    try:
        fs, root = filesystem(location)
        fs.create_dir(root, recursive=True)
        path = f"{root}/.kdray-probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(path) as handle:
            handle.write(b"kdray")
        fs.delete_file(path)
    except (OSError, ValueError) as error:
        return " ".join(str(error).split())[:300]
    return None


def local_name(location: str) -> str:
    """A folder name for a node's copy of ``location``: its last part and a hash of the whole
    (the same name in two storages is two copies)."""
    return f"{Path(location.partition('?')[0]).name}-{content_hash(location, 12)}"


def exists(location: str) -> bool:
    """Whether a file or folder is at ``location``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def upload(local: str | Path, location: str) -> None:
    """Copy a local file or folder to ``location`` (a path or URI), replacing what is there."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0] if Path(local).is_file() else path, recursive=True)
    pafs.copy_files(str(local), path, destination_filesystem=fs)


def download(location: str, local: Path, intact: Callable[[Path], bool] | None = None) -> Path:
    """A local copy of the file or folder at ``location``, downloaded once per machine:
    concurrent processes wait on a file lock beside ``local``, the copy is written beside it
    and renamed into place, and an existing copy is kept while ``intact`` says it is whole
    (default: it exists)."""
    import filelock
    import pyarrow.fs as pafs

    local.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(local.parent / f".{local.name}.lock")):
        if local.exists() and (intact or Path.exists)(local):
            return local
        fs, path = filesystem(location)
        folder = fs.get_file_info(path).type == pafs.FileType.Directory
        with (atomic_dir if folder else atomic_file)(local) as tmp:
            pafs.copy_files(path, str(tmp), source_filesystem=fs)
    return local


def results_location(storage: str, name: str) -> str:
    """Where the results folder of the experiment ``name`` is mirrored in ``storage``: beside
    its Ray experiment ``<storage>/<name>``."""
    return join(storage, f"{name}{RESULTS_SUFFIX}")


def _local_files(folder: Path) -> dict[str, tuple[int, int]]:
    """``relative path -> (size, mtime_ns)`` of the files a results folder holds (temporary
    files of an atomic write in progress and Ray's own experiment folder left out)."""
    found = {}
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if relative.parts[0] == "ray" or any(is_temp_name(p) for p in relative.parts):
            continue
        if path.is_file():
            stat = path.stat()
            found[relative.as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return found


class Mirror:
    """Keeps a copy of a results folder in the storage: after each call of :meth:`push` the
    storage holds the folder's files as they were then (each file uploaded whole, only the
    ones that changed since the last push; files gone locally, such as a pruned student, are
    deleted there too)."""

    def __init__(self, folder: str | Path, location: str) -> None:
        self.folder = Path(folder)
        self.location = location
        self._pushed: dict[str, tuple[int, int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "location": self.location, "_pushed": {}}

    def push(self) -> None:
        import pyarrow.fs as pafs

        fs, root = filesystem(self.location)
        local = _local_files(self.folder)
        fs.create_dir(root, recursive=True)
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        stored = {
            info.path[len(root) :].lstrip("/"): info
            for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File
        }
        for relative, stamp in sorted(local.items()):
            there = stored.get(relative)
            if self._pushed.get(relative) == stamp or (
                # uploaded after its last local change (by another push: the table writer's,
                # or this folder's earlier run): not again
                there is not None and there.size == stamp[0] and there.mtime_ns >= stamp[1]
            ):
                continue
            target = f"{root}/{relative}"
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(self.folder / relative), target, destination_filesystem=fs)
            self._pushed[relative] = stamp
        for relative, info in stored.items():
            if relative not in local:
                fs.delete_file(info.path)
                self._pushed.pop(relative, None)


def pull_results(location: str, into: str | Path | None = None) -> Path:
    """A local copy of a results folder mirrored at ``location``: by default a fresh copy in
    kdray's cache (under a hash of the location, replacing an older one in one step); with
    ``into``, its files laid over that folder's, each renamed into place whole."""
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(
            f"no results at {location}: a sweep, ablation or study run with --storage copies "
            f"its results folder to <storage>/<name>{RESULTS_SUFFIX}"
        )
    if into is None:
        target = cache_root() / "storage-results" / content_hash(location, 16)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(target) as tmp:
            pafs.copy_files(root, str(tmp), source_filesystem=fs)
        logger.info("results %s copied to %s", location, target)
        return target
    target = Path(into)
    target.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(target / "pulled", folder=True)
    try:
        pafs.copy_files(root, str(tmp), source_filesystem=fs)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                final = target / path.relative_to(tmp)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def local_results(location: str | Path) -> Path:
    """A results folder given as a local path (as it is) or a storage URI (pulled)."""
    if is_remote(location):
        return pull_results(str(location))
    return Path(str(location).removeprefix("file://"))
