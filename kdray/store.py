"""On-disk plumbing every cache and table shares: where caches live, content hashes, atomic writes.

kdray keeps content-addressed caches (tokenised splits, fine-tuned teachers, teacher outputs) and
results tables that readers may open at any time. Each of them names its folder by a hash of what
determines its content (with a format version among the ingredients) and is written beside its
target and renamed into place, so a reader sees the old complete entry or the new one, never a
half-written one. Pure Python: importing this module loads no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where kdray keeps tokenised data, fine-tuned teachers and teacher outputs."""
    root = cache_dir or os.environ.get("KDRAY_CACHE_DIR") or Path.home() / ".cache" / "kdray"
    return Path(root).expanduser()


def content_hash(ingredients: Any, length: int | None = None) -> str:
    """sha256 of the canonical JSON of ``ingredients`` (keys sorted), optionally shortened.

    Every cache key and fingerprint goes through here, so two places never hash the same
    settings two ways.
    """
    digest = hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()
    return digest[:length] if length else digest


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_records(folder: str | Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": n, "sha256": hex}}`` of files in ``folder``, for a manifest to carry
    so a reader can tell a truncated or corrupted cache file from a good one."""
    folder = Path(folder)
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": file_digest(folder / name)}
        for name in sorted(names)
    }


def file_problems(
    folder: str | Path, records: dict[str, dict[str, Any]], *, full: bool = False
) -> list[str]:
    """What is wrong with the files ``records`` describes: missing, another size (truncated
    or overwritten) and, with ``full``, another sha256 (same-size corruption). Sizes cost a
    stat per file; ``full`` reads every byte. Empty when all match."""
    folder = Path(folder)
    problems = []
    for name, record in sorted(records.items()):
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{path} is missing")
            continue
        if size != record["bytes"]:
            problems.append(f"{path} has {size} bytes, not the {record['bytes']} recorded")
        elif full and file_digest(path) != record["sha256"]:
            problems.append(f"{path} does not match its recorded sha256 (corrupted)")
    return problems


def json_cell(value: Any) -> Any:
    """Lists and mappings (an explicit layer map) as JSON text, so a table column keeps one
    type and an Optuna categorical gets a scalar; everything else unchanged."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return value


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error it replaces
    ``path`` in one rename, otherwise it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file (a manifest, a JSON record) atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block succeeds it takes
    ``target``'s place (an existing folder is moved aside first and then deleted)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old: Path | None = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
