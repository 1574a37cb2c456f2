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


def _fsync(path: str | Path) -> None:
    """Flush a file's or a folder's entry to disk, so a rename that follows survives a crash."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # a folder some systems will not open read-only: nothing to flush then
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the data itself is flushed
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(root)


_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths in one step (Linux >= 3.15)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot, so the caller falls back to two renames."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(errno, os.strerror(errno), str(a))


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error it is
    flushed to disk and replaces ``path`` in one rename (the folder entry flushed too), otherwise
    it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file (a manifest, a JSON record) atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block succeeds its files are
    flushed to disk and it takes ``target``'s place. An existing ``target`` is swapped with it
    in one step (``renameat2(RENAME_EXCHANGE)``), so ``target`` exists at every moment and a
    crash leaves the old complete folder or the new one; the old one is then deleted. Where the
    system cannot swap, the old folder is renamed aside first (a short gap, never a half
    folder)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists() and _exchange(tmp, target):
            _fsync(target.parent)
            return  # tmp now holds the old folder: removed below
        old: Path | None = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:  # the new folder could not take its place: put the old one back
                os.replace(old, target)
            raise
        _fsync(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
