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
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kdray.infra import faults

logger = logging.getLogger("kdray")


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


def _owner() -> str:
    """``<host>@<pid>``: who made a temporary entry, so a later run can tell one that a killed
    process left (remove it) from one a live writer is filling (leave it)."""
    return f"{socket.gethostname()}@{os.getpid()}"


#: A temporary entry kdray writes beside a target: ``.<name>.tmp-<host>@<pid>-<random>`` (a
#: file or folder being written) or ``.<name>.old-<host>@<pid>-<random>`` (an old folder on
#: its way out).
_TEMP_NAME = re.compile(r"^\..+\.(?:tmp|old)-(?P<host>[^@/]+)@(?P<pid>\d+)-[^/]*$")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of the temporary entries kdray writes beside a target."""
    return _TEMP_NAME.match(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders that killed writers left in ``folder`` (this
    host's only, and only those whose process is gone); returns what was removed. Every cache
    and results folder calls it before use, so a crash leaves nothing behind for long."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    host = socket.gethostname()
    removed = []
    for entry in entries:
        found = _TEMP_NAME.match(entry.name)
        if not found or found["host"] != host or _alive(int(found["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        logger.info("removed %s, left half-written by a killed run", entry)
        removed.append(entry)
    return removed


def remove_stale_tree(folder: str | Path) -> list[Path]:
    """:func:`remove_stale` in ``folder`` and every folder below it (a results folder before a
    resume: a killed sweep may have left a half table or student in any of them)."""
    removed: list[Path] = []
    for root, _dirs, _files in os.walk(folder):
        removed += remove_stale(root)
    return removed


def temp_beside(target: str | Path, *, folder: bool = False) -> Path:
    """A new empty temporary file (or folder) beside ``target``, named so :func:`remove_stale`
    can clean it up after a crash (it does so here first: a writer tidies the folder it
    writes in); beside, so the final rename never crosses file systems."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent)
    prefix = f".{target.name}.tmp-{_owner()}-"
    if folder:
        made = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        made.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would become the target's
        return made
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=target.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide tables from a team
    os.close(fd)
    return Path(tmp)


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it to read it, which
    races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error it is
    flushed to disk and replaces ``path`` in one rename (the folder entry flushed too), otherwise
    it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        yield tmp
        _fsync(tmp)
        faults.point("store.file", path)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


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
    tmp = temp_beside(target, folder=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        faults.point("store.dir", target)
        if target.exists() and _exchange(tmp, target):
            _fsync(target.parent)
            return  # tmp now holds the old folder: removed below
        old: Path | None = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{_owner()}-{uuid.uuid4().hex[:8]}"
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
