"""Faults: where kdray can be made to crash on purpose, and how it recognises an I/O failure.

Crash safety is shown by tests that kill kdray at named points (:func:`point`) inside table writes,
checkpoint writes, student saves and cache builds, then resume it and compare with an uninterrupted
run (:mod:`kdray.experiments.fault_harness`). A point does nothing unless the environment variable
:data:`PLAN_VAR` holds a plan, so production runs pay one dictionary lookup per point.
The plan is JSON::

    {"site": "store.file", "match": "trials.parquet", "hit": 3, "action": "kill",
     "counter": "/tmp/x/hits", "pgid": 12345}

``slow: {site: seconds}`` sleeps that long at every pass of a site (a slow step, so that a test
can act while a run is in the middle of it). ``action: count`` only counts every point's
passes, in ``<counter>.<site>`` files (how a harness learns where a run can be cut). ``hit``:
fire on the n-th time any process of the run passes a matching point (counted in the
``counter`` file, so Ray workers and the driver share one count). ``action``: ``kill`` (SIGKILL
to the process group ``pgid``, or the one whose id is in the file ``pgid_file``: the whole
command, then to this process, as a pre-emption would), or ``enospc``, ``eio``, ``erofs``
(raise that ``OSError``, as a full disk, a failing one or a read-only remount would), or
``memory`` (raise ``MemoryError``).

:func:`io_failure` finds the I/O error behind an exception (also inside the text of errors that
Ray, safetensors or Arrow re-raise without the ``OSError``), so the CLI can end in one
paragraph that names the path instead of a traceback. Pure Python: no torch, no Ray.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: The environment variable holding a fault plan (JSON); unset in normal use.
PLAN_VAR = "KDRAY_FAULT_PLAN"

#: The named points, for a harness to choose from. ``store.file``: a file written beside its
#: target, before the rename (tables, JSON records, tokenised data); ``store.dir``: a folder
#: written beside its target, before the swap (students, teachers, teacher outputs);
#: ``distill.checkpoint``: between a checkpoint's state and its student; ``distill.epoch``:
#: after an epoch's report; ``teacher_outputs.build``: halfway through computing a cache.
SITES = (
    "store.file",
    "store.dir",
    "distill.checkpoint",
    "distill.epoch",
    "teacher_outputs.build",
)

_ACTIONS = {
    "enospc": errno.ENOSPC,
    "eio": errno.EIO,
    "erofs": errno.EROFS,
}


def _plan() -> dict | None:
    text = os.environ.get(PLAN_VAR)
    return json.loads(text) if text else None


def _count(counter: str) -> int:
    """Add one to the shared hit count in the file ``counter`` and return it: one byte appended
    per hit (``O_APPEND`` writes do not interleave), so concurrent processes count once each."""
    fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b".")
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _read_int(path: str | None) -> int | None:
    try:
        return int(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


def point(site: str, detail: str | Path = "") -> None:
    """A named place where a test may crash kdray (see the module docstring); a no-op unless a
    plan in :data:`PLAN_VAR` names this ``site`` (and, with ``match``, a part of ``detail``)."""
    plan = _plan()
    if plan is None:
        return
    if site in plan.get("slow", {}):  # a slow step, so that a test can act in the middle
        time.sleep(float(plan["slow"][site]))
    if plan.get("action") == "count":  # a dry run: how often each point is passed
        _count(f"{plan['counter']}.{site}")
        return
    if plan.get("site") != site or plan.get("match", "") not in str(detail):
        return
    if _count(plan["counter"]) != int(plan.get("hit", 1)):
        return
    Path(f"{plan['counter']}.fired").write_text(json.dumps({"site": site, "detail": str(detail)}))
    action = plan.get("action", "kill")
    if action == "kill":
        pgid = plan.get("pgid") or _read_int(plan.get("pgid_file"))
        if pgid:
            try:
                os.killpg(int(pgid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "memory":
        raise MemoryError(f"injected at {site} ({detail})")
    code = _ACTIONS[action]
    raise OSError(code, os.strerror(code), str(detail))


# ---------------------------------------------------------------------------------------------
# Recognising I/O failures

#: errno values a user fixes outside kdray (space, permissions, hardware), by name.
IO_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "an input/output error (a failing disk or network file system)",
}

# The same failures as other libraries word them after dropping the OSError (safetensors'
# "I/O error: No space left on device (os error 28)", Arrow's "IOError: ... errno 28", Ray's
# re-raised worker errors).
_TEXTS = {
    errno.ENOSPC: ("No space left on device", "os error 28", "errno 28"),
    errno.EDQUOT: ("Disk quota exceeded", "os error 122"),
    errno.EROFS: ("Read-only file system", "os error 30", "errno 30"),
    errno.EIO: ("Input/output error", "os error 5"),
}
_PATH_IN_TEXT = re.compile(r"['\"](/[^'\"]+)['\"]")


@dataclass(frozen=True)
class IOFailure:
    """An I/O error a user can fix: its errno, what it means, and the path when known."""

    code: int
    reason: str
    path: str | None


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Re-raise an I/O failure that a library reports without its path (safetensors: "I/O
    error: No space left on device") as an ``OSError`` naming ``path``, what is being written."""
    try:
        yield
    except OSError:
        raise
    except Exception as error:
        failure = io_failure(error)
        if failure is None:
            raise
        raise OSError(failure.code, os.strerror(failure.code), str(path)) from error


def io_failure_text(text: str | None) -> IOFailure | None:
    """The I/O failure an error message (a failed run's recorded error) describes, or None."""
    for code, words in _TEXTS.items():
        if text and any(word in text for word in words):
            found = _PATH_IN_TEXT.search(text)
            return IOFailure(code, IO_ERRNOS[code], found.group(1) if found else None)
    return None


def io_failure(error: BaseException) -> IOFailure | None:
    """The I/O failure (disk full, read-only, quota, I/O error, permission) behind ``error`` or
    any exception it was raised from, or None when it is not one."""
    for item in _chain(error):
        if isinstance(item, OSError) and item.errno in IO_ERRNOS:
            path = item.filename if isinstance(item.filename, str) else None
            return IOFailure(item.errno, IO_ERRNOS[item.errno], path)
    for item in _chain(error):
        found = io_failure_text(str(item))
        if found is not None:
            return found
    return None


# How an out-of-memory end reads: Python's MemoryError, PyTorch's CPU and CUDA allocators, Ray's
# memory monitor (OutOfMemoryError, "running low on memory").
_MEMORY_TEXTS = (
    "MemoryError",
    "OutOfMemoryError",
    "out of memory",
    "not enough memory",
    "running low on memory",
)


def out_of_memory(text: str | None) -> bool:
    """Whether a run's or trial's error says it ran out of memory (reported as status ``oom``
    with what to change, not as a generic error)."""
    return bool(text) and any(word in text for word in _MEMORY_TEXTS)
