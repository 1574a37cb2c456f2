"""A cached or given teacher folder is checked against the sizes and sha256 sums its teacher.json
records: a truncated or corrupted teacher is fine-tuned again (a cache entry) or an error naming
the file (teacher.checkpoint), never used under the old teacher's id and dev metrics."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_spec_dict
from kdray.cli import app
from kdray.spec import Spec, spec_from_dict
from kdray.training import teacher

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "model.safetensors"


def _spec(model: Path, cache: Path, **teacher_settings: Any) -> Spec:
    return spec_from_dict(tiny_spec_dict(model, data={"cache_dir": str(cache)}, **teacher_settings))


@pytest.fixture(scope="module")
def fine_tuned(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding one fine-tuned tiny teacher (fine-tuned once per module)."""
    cache = tmp_path_factory.mktemp("teacher-cache")
    teacher.ensure_teacher(_spec(tiny_bert, cache))
    return cache


@pytest.fixture
def cache(fine_tuned: Path, tmp_path: Path) -> Path:
    """A private copy of the fine-tuned cache, for a test to damage."""
    return Path(shutil.copytree(fine_tuned, tmp_path / "cache"))


@pytest.fixture
def fine_tunes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts fine-tuning runs (they still happen)."""
    calls: list[str] = []
    real = teacher.fine_tune_teacher

    def counting(*args: Any, **kwargs: Any) -> teacher.TeacherInfo:
        calls.append("fine-tune")
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher, "fine_tune_teacher", counting)
    return calls


def _folder(cache: Path) -> Path:
    (folder,) = (cache / "teachers").iterdir()
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_middle_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _write_spec(tmp_path: Path, model: Path, cache: Path, **sections: Any) -> Path:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        yaml.safe_dump(tiny_spec_dict(model, data={"cache_dir": str(cache)}, **sections))
    )
    return spec_file


# ---------------------------------------------------------------------------------------------
# What teacher.json records


def test_teacher_json_records_the_size_and_sha256_of_every_other_file(cache: Path) -> None:
    folder = _folder(cache)
    record = json.loads((folder / teacher.TEACHER_INFO_FILE).read_text())
    on_disk = {p.name for p in folder.iterdir()} - {teacher.TEACHER_INFO_FILE}
    assert {WEIGHTS, "config.json", "tokenizer.json"} <= on_disk
    assert set(record["files"]) == on_disk
    for name, entry in record["files"].items():
        raw = (folder / name).read_bytes()
        assert entry == {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    assert teacher.TeacherInfo.read(folder, "full").files == record["files"]


# ---------------------------------------------------------------------------------------------
# A damaged cache entry is fine-tuned again


def test_a_truncated_cached_teacher_is_fine_tuned_again_with_a_warning_naming_the_file(
    tiny_bert: Path, cache: Path, fine_tunes: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    folder = _folder(cache)
    weights = folder / WEIGHTS
    size = weights.stat().st_size
    _truncate(weights)
    with caplog.at_level(logging.WARNING, logger="kdray.training.teacher"):
        info = teacher.ensure_teacher(_spec(tiny_bert, cache))
    assert fine_tunes == ["fine-tune"]
    assert f"{weights} has {size // 2} bytes, not the {size} recorded" in caplog.text
    assert "fine-tuning it again" in caplog.text
    assert info.path == str(folder.resolve()) and weights.stat().st_size == size
    assert teacher.TeacherInfo.read(folder, "full") is not None
    assert [p.name for p in (cache / "teachers").iterdir()] == [folder.name]  # nothing left over


def test_same_size_corruption_passes_a_size_check_and_is_caught_by_default(
    tiny_bert: Path, cache: Path, fine_tunes: list[str]
) -> None:
    folder = _folder(cache)
    weights = folder / WEIGHTS
    _flip_middle_byte(weights)
    assert teacher.TeacherInfo.read(folder, "sizes") is not None  # sizes cannot see it
    with pytest.raises(teacher.TeacherDamagedError) as caught:
        teacher.TeacherInfo.read(folder, "full")
    assert caught.value.problems == [f"{weights} does not match its recorded sha256 (corrupted)"]

    teacher.ensure_teacher(_spec(tiny_bert, cache))  # the default checks the sha256 sums
    assert fine_tunes == ["fine-tune"]
    assert teacher.TeacherInfo.read(folder, "full") is not None


def test_an_unreadable_teacher_json_is_fine_tuned_again(
    tiny_bert: Path, cache: Path, fine_tunes: list[str]
) -> None:
    info_file = _folder(cache) / teacher.TEACHER_INFO_FILE
    _truncate(info_file)
    with pytest.raises(teacher.TeacherDamagedError, match=f"{info_file} cannot be read"):
        teacher.TeacherInfo.read(info_file.parent)
    info = teacher.ensure_teacher(_spec(tiny_bert, cache))
    assert fine_tunes == ["fine-tune"] and info.files is not None


def test_an_older_teacher_json_without_files_is_reused_unchecked(
    tiny_bert: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info_file = _folder(cache) / teacher.TEACHER_INFO_FILE
    record = json.loads(info_file.read_text())
    del record["files"]
    info_file.write_text(json.dumps(record))
    monkeypatch.setattr(teacher, "fine_tune_teacher", pytest.fail)
    info = teacher.ensure_teacher(_spec(tiny_bert, cache), verify="full")
    assert info.files is None and info.id == record["id"]


# ---------------------------------------------------------------------------------------------
# A damaged teacher.checkpoint is an error


def test_a_damaged_checkpoint_is_an_error_naming_the_file(
    tiny_bert: Path, cache: Path, tmp_path: Path
) -> None:
    checkpoint = Path(shutil.copytree(_folder(cache), tmp_path / "my-teacher"))
    spec = _spec(tiny_bert, cache, teacher={"checkpoint": str(checkpoint)})
    assert teacher.ensure_teacher(spec).path == str(checkpoint.resolve())
    _truncate(checkpoint / WEIGHTS)
    with pytest.raises(teacher.TeacherDamagedError) as caught:
        teacher.ensure_teacher(spec)
    message = str(caught.value)
    assert message.startswith(f"teacher.checkpoint: the teacher in {checkpoint} is damaged: ")
    assert f"{checkpoint / WEIGHTS} has " in message and "point teacher.checkpoint at" in message


# ---------------------------------------------------------------------------------------------
# kdray teacher [--verify]


def test_kdray_teacher_verify_passes_a_healthy_cached_teacher(
    tiny_bert: Path, cache: Path, tmp_path: Path, fine_tunes: list[str]
) -> None:
    n_files = len(list(_folder(cache).iterdir())) - 1
    spec_file = _write_spec(tmp_path, tiny_bert, cache)
    result = CliRunner().invoke(app, ["teacher", str(spec_file), "--verify"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"verified: {n_files} files match the sha256 in teacher.json" in result.output
    assert fine_tunes == []


def test_kdray_teacher_verify_on_a_corrupted_cache_exits_1_naming_the_file(
    tiny_bert: Path, cache: Path, tmp_path: Path, fine_tunes: list[str]
) -> None:
    weights = _folder(cache) / WEIGHTS
    _flip_middle_byte(weights)
    spec_file = _write_spec(tmp_path, tiny_bert, cache)
    result = CliRunner().invoke(app, ["teacher", str(spec_file), "--verify"])
    assert result.exit_code == 1, result.output + repr(result.exception)
    assert f"{weights} does not match its recorded sha256 (corrupted)" in result.output
    assert f"Delete {weights.parent} and run `kdray teacher` again" in result.output
    assert fine_tunes == []  # --verify reports; it never fine-tunes over the evidence


def test_plain_kdray_teacher_fine_tunes_a_truncated_cached_teacher_again(
    tiny_bert: Path, cache: Path, tmp_path: Path, fine_tunes: list[str]
) -> None:
    _truncate(_folder(cache) / WEIGHTS)
    spec_file = _write_spec(tmp_path, tiny_bert, cache)
    result = CliRunner().invoke(app, ["teacher", str(spec_file)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert fine_tunes == ["fine-tune"]
    assert "damaged" in result.output and "dev accuracy" in result.output
    assert teacher.TeacherInfo.read(_folder(cache), "full") is not None


def test_kdray_teacher_verify_says_when_teacher_json_records_no_checksums(
    tiny_bert: Path, cache: Path, tmp_path: Path
) -> None:
    info_file = _folder(cache) / teacher.TEACHER_INFO_FILE
    record = json.loads(info_file.read_text())
    del record["files"]
    info_file.write_text(json.dumps(record))
    spec_file = _write_spec(tmp_path, tiny_bert, cache)
    result = CliRunner().invoke(app, ["teacher", str(spec_file), "--verify"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "not verified:" in result.output
    assert "records no file sizes or checksums" in result.output
