"""Atomic writes: a reader sees the old complete file or folder or the new one, at every moment,
and what was renamed into place was flushed to disk first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdray.infra import store


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_dir_swaps_a_finished_folder_in_without_a_moment_where_the_target_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "student"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def watched_replace(src, dst):  # the fallback's two renames would show up here
        renames.append((Path(src).name, Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", watched_replace)
    with store.atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("new")
        assert (target / "model.safetensors").read_text() == "old"
    assert (target / "model.safetensors").read_text() == "new"
    assert renames == []  # one renameat2(RENAME_EXCHANGE), no rename that moves target away
    assert _names(tmp_path) == ["student"]  # neither the temp nor the old folder is left


def test_atomic_dir_keeps_the_old_folder_when_the_swap_itself_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "student"
    target.mkdir()
    (target / "model.safetensors").write_text("old")

    def crash(a: Path, b: Path) -> bool:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store, "_exchange", crash)
    with pytest.raises(OSError, match="Input/output"), store.atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert (target / "model.safetensors").read_text() == "old"
    assert _names(tmp_path) == ["student"]


def test_atomic_dir_without_exchange_puts_the_old_folder_back_when_the_new_one_cannot_move_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback for systems without RENAME_EXCHANGE: old aside, new in; if the second
    rename fails, the old folder returns (before, it was deleted: a finished student lost)."""
    target = tmp_path / "student"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    monkeypatch.setattr(store, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def second_rename_fails(src, dst):
        if Path(dst) == target:
            if ".old-" not in Path(src).name:
                raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="No space"), store.atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert (target / "model.safetensors").read_text() == "old"
    assert _names(tmp_path) == ["student"]


def test_atomic_dir_creates_a_new_target(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    with store.atomic_dir(target) as tmp:
        (tmp / "f").write_text("x")
    assert (target / "f").read_text() == "x"
    assert _names(target.parent) == ["b"]


def test_atomic_writes_flush_the_data_and_the_folder_entry_before_and_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", recording_fsync)
    store.write_text_atomic(tmp_path / "t.json", "{}")
    assert any(Path(p).name.startswith(".t.json.") for p in flushed)  # the data, before
    assert str(tmp_path) in flushed  # the folder entry, after
    flushed.clear()
    with store.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "weights").write_text("w")
    assert any(p.endswith("/weights") for p in flushed)
    assert str(tmp_path) in flushed
