"""The teacher-output cache must be a drop-in for LiveTeacher: same tensors (within float16) and
same loss values on shuffled batches, never reused for other settings, never over budget."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from conftest import FIXTURE_GLUE, make_tiny_bert, tiny_spec_dict
from kdray.method.schedule import Stage
from kdray.spec import Spec
from kdray.training import data, engine, models
from kdray.training import distill as D
from kdray.training import teacher_outputs as tc

CPU = torch.device("cpu")
TEACHER_LAYERS = (2, 4)
RTOL, ATOL = 1e-2, 1e-3  # float16 storage of values in roughly [-5, 5]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors run faster on one thread, and the shared cores are often busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sharpen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Larger random weights: a default-initialised tiny BERT attends almost uniformly and gives
    nearly the same outputs for every example, so a mixed-up gather would go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                weights = torch.randn(module.weight.shape, generator=gen)
                module.weight.copy_(weights * 1.5 / module.in_features**0.5)
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_bert(tmp_path_factory.mktemp("cache-teacher"))
    model = _sharpen(models.load_classifier(str(folder), 2))
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def teacher(teacher_dir: Path) -> nn.Module:
    return models.load_classifier(str(teacher_dir), 2)


@pytest.fixture(scope="module")
def tokenizer(teacher_dir: Path) -> Any:
    return models.load_tokenizer(str(teacher_dir))


def _examples() -> list[data.Example]:
    """Forty RTE-like pairs from the ten fixture rows, some long enough to be truncated."""
    base = data.read_local("rte", FIXTURE_GLUE, "train") + data.read_local(
        "rte", FIXTURE_GLUE, "dev"
    )
    out = []
    for i in range(40):
        a, b = base[i % len(base)], base[(3 * i + 1) % len(base)]
        text_a = a.text_a if i % 4 else f"{a.text_a} {b.text_a} {a.text_a}"
        out.append(data.Example(text_a=text_a, text_b=b.text_b, label=a.label))
    return out


@pytest.fixture(scope="module")
def split(tokenizer: Any) -> data.TokenizedSplit:
    return data.tokenize(_examples(), tokenizer, 32)


def _count_calls(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _build(
    teacher: nn.Module, split: data.TokenizedSplit, folder: Path, **overrides: Any
) -> tc.CacheManifest:
    args: dict[str, Any] = {
        "layers": TEACHER_LAYERS,
        "rows": "all",
        "max_bytes": 10**9,
        "key": "k-all",
        "batch_size": 16,
    }
    args.update(overrides)
    return tc.build_cache(teacher, split, 0, folder, **args)


def _batches(split: data.TokenizedSplit, seed: int = 7) -> Iterator[dict[str, torch.Tensor]]:
    yield from engine.make_loader(split, 8, 0, shuffle_seed=seed)


def _student(teacher: nn.Module) -> tuple[nn.Module, models.Projections]:
    torch.manual_seed(3)
    student = models.build_student(
        teacher,
        layers=2,
        init="random",
        init_layers="skip",
        num_labels=2,
        hidden_size=24,
        intermediate_size=48,
    )
    return student.eval(), models.Projections(24, 32, 2)


# ---------------------------------------------------------------------------------------------
# Keys and sizes


def test_cache_key_changes_with_every_ingredient() -> None:
    base = ("t1", "rte", "fp1", 64, (2, 4, 6), "all", tc.ALL_PARTS)
    keys = {tc.cache_key(*base)}
    variants = [
        ("t2", "rte", "fp1", 64, (2, 4, 6), "all", tc.ALL_PARTS),
        ("t1", "mrpc", "fp1", 64, (2, 4, 6), "all", tc.ALL_PARTS),
        ("t1", "rte", "fp2", 64, (2, 4, 6), "all", tc.ALL_PARTS),
        ("t1", "rte", "fp1", 128, (2, 4, 6), "all", tc.ALL_PARTS),
        ("t1", "rte", "fp1", 64, (2, 4), "all", tc.ALL_PARTS),
        ("t1", "rte", "fp1", 64, (2, 4, 6), "cls", tc.ALL_PARTS),
        ("t1", "rte", "fp1", 64, (2, 4, 6), "all", ("logits", "hidden")),
    ]
    for variant in variants:
        keys.add(tc.cache_key(*variant))
    assert len(keys) == len(variants) + 1
    key = tc.cache_key(*base)
    assert len(key) == 64 and int(key, 16) >= 0
    # The same content named in another order is the same cache.
    assert (
        tc.cache_key("t1", "rte", "fp1", 64, (6, 2, 4), "all", tuple(reversed(tc.ALL_PARTS))) == key
    )
    with pytest.raises(ValueError, match="rows"):
        tc.cache_key("t1", "rte", "fp1", 64, (2,), "some", tc.ALL_PARTS)


def test_split_fingerprint_follows_the_token_ids(
    tokenizer: Any, split: data.TokenizedSplit
) -> None:
    same = data.tokenize(_examples(), tokenizer, 32)
    shorter = data.tokenize(_examples(), tokenizer, 24)
    fewer = data.tokenize(_examples()[:39], tokenizer, 32)
    prints = [tc.split_fingerprint(s) for s in (split, same, shorter, fewer)]
    assert prints[0] == prints[1]
    assert len(set(prints)) == 3


def test_estimate_bytes_formula(split: data.TokenizedSplit) -> None:
    lengths = split.lengths
    n = len(lengths)
    full = tc.estimate_bytes(split, n_layers=3, n_heads=4, hidden=32, n_labels=2, rows="all")
    assert full["logits"] == n * 2 * 2
    assert full["hidden"] == n * 3 * 32 * 2
    assert full["attention_per_layer"] == sum(4 * length * length * 2 for length in lengths)
    assert full["attentions"] == 3 * full["attention_per_layer"]
    assert full["total"] == full["logits"] + full["hidden"] + full["attentions"]
    cls = tc.estimate_bytes(split, n_layers=3, n_heads=4, hidden=32, n_labels=2, rows="cls")
    assert cls["attention_per_layer"] == sum(4 * length * 2 for length in lengths)
    assert cls["hidden"] == full["hidden"]


# ---------------------------------------------------------------------------------------------
# Exactness against the live teacher


@pytest.mark.parametrize("rows", ["all", "cls"])
def test_cached_outputs_and_losses_match_live(
    teacher: nn.Module, split: data.TokenizedSplit, tmp_path: Path, rows: str
) -> None:
    manifest = _build(teacher, split, tmp_path / "cache", rows=rows, key=f"k-{rows}")
    assert manifest.attention_layers == TEACHER_LAYERS and manifest.live_layers == ()
    cached = tc.CachedOutputs(tmp_path / "cache")  # no teacher model: everything from disk
    live = tc.LiveOutputs(teacher, CPU)
    student, projections = _student(teacher)
    stage = Stage(0, "all", (1, 2), soft=True, hard=True)
    weights = {"soft": 1.0, "hard": 1.0, "attention": 1.0, "hidden": 1.0}
    n_batches = 0
    for batch in _batches(split):
        n_batches += 1
        want, got = live(batch, TEACHER_LAYERS), cached(batch, TEACHER_LAYERS)
        mask = batch["attention_mask"].bool()
        width = batch["input_ids"].shape[1]
        assert got.logits.dtype == torch.float32
        torch.testing.assert_close(got.logits, want.logits, rtol=RTOL, atol=ATOL)
        for layer in TEACHER_LAYERS:
            torch.testing.assert_close(got.hidden[layer], want.hidden[layer], rtol=RTOL, atol=ATOL)
            attn = got.attentions[layer]
            q = width if rows == "all" else 1
            assert attn.shape == (len(mask), 4, q, width) and attn.dtype == torch.float32
            query_real = mask[:, :q]
            real = (query_real[:, :, None] & mask[:, None, :])[:, None].expand_as(attn)
            torch.testing.assert_close(
                attn[real], want.attentions[layer][:, :, :q][real], rtol=RTOL, atol=ATOL
            )
            assert torch.all(attn[~real] == 0), "padding positions must be zero"
            # Real rows are distributions (float16 keeps the sum to about 1e-3).
            sums = attn.sum(-1)[query_real[:, None, :].expand(-1, 4, -1)]
            torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=5e-3)
        # The tolerance tells examples apart: a gather off by one row would fail.
        assert not torch.allclose(got.logits, want.logits.roll(1, 0), rtol=RTOL, atol=ATOL)

        with torch.no_grad():
            s_out = student(
                **engine.model_inputs(batch), output_attentions=True, output_hidden_states=True
            )
            args = (batch, stage, [2, 4], weights, projections, 2.0, rows)
            live_terms = D.stage_losses(s_out, want, *args)
            cached_terms = D.stage_losses(s_out, got, *args)
        assert set(cached_terms) == set(live_terms) >= {
            "soft", "hard", "attention.L1", "attention.L2", "hidden.L1", "hidden.L2", "total"
        }  # fmt: skip
        for name, value in live_terms.items():
            torch.testing.assert_close(cached_terms[name], value, rtol=RTOL, atol=ATOL, msg=name)
    assert n_batches == 5
    assert cached.stats == {"cached": 5, "live": 0}


def test_files_are_standard_safetensors(
    teacher: nn.Module, split: data.TokenizedSplit, tmp_path: Path
) -> None:
    folder = tmp_path / "cache"
    manifest = _build(teacher, split, folder)
    lengths = np.asarray(split.lengths)
    n = len(lengths)
    assert sorted(p.name for p in folder.iterdir()) == sorted(manifest.files())
    with safe_open(folder / tc.LOGITS_FILE, framework="pt") as f:
        assert f.get_tensor("logits").shape == (n, 2)
        assert f.get_tensor("logits").dtype == torch.float16
        assert f.get_tensor("lengths").tolist() == lengths.tolist()
    with safe_open(folder / tc.HIDDEN_FILE, framework="pt") as f:
        assert sorted(f.keys()) == ["L2", "L4"]
        assert f.get_tensor("L4").shape == (n, 32)
    with safe_open(folder / tc.ATTENTION_FILE, framework="pt") as f:
        offsets = f.get_tensor("offsets").numpy()
        assert np.array_equal(np.diff(offsets), 4 * lengths * lengths)
        flat = f.get_tensor("L2")
        assert flat.dtype == torch.float16 and flat.numel() == offsets[-1]
        # Example 5 unpadded equals the live teacher's run on that example alone.
        i = 5
        alone = data.collate([split[i]], 0)
        want = tc.LiveOutputs(teacher, CPU)(alone, (2,)).attentions[2][0]
        got = flat[offsets[i] : offsets[i + 1]].reshape(4, lengths[i], lengths[i]).float()
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    sizes = tc.estimate_bytes(split, 2, 4, 32, 2, "all")
    assert manifest.bytes == {
        "logits": sizes["logits"],
        "hidden": sizes["hidden"],
        "attentions": sizes["attentions"],
    }
    assert manifest.needed_bytes == sizes and manifest.created
    assert tc.CacheManifest.read(folder) == dataclasses.replace(manifest, path=str(folder))


# ---------------------------------------------------------------------------------------------
# Reuse and keys


def test_building_twice_reuses_without_running_the_teacher(
    teacher: nn.Module, split: data.TokenizedSplit, tmp_path: Path
) -> None:
    calls = _count_calls(teacher)
    first = _build(teacher, split, tmp_path / "cache")
    assert calls[0] == 3  # 40 examples in batches of 16
    second = _build(teacher, split, tmp_path / "cache")
    assert calls[0] == 3
    assert second.created == first.created and second.key == first.key
    # A damaged cache is not trusted: it is rebuilt.
    (tmp_path / "cache" / tc.ATTENTION_FILE).unlink()
    _build(teacher, split, tmp_path / "cache")
    assert calls[0] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cache.tmp")]


def test_same_folder_with_another_key_is_rebuilt(
    teacher: nn.Module, split: data.TokenizedSplit, tmp_path: Path
) -> None:
    calls = _count_calls(teacher)
    _build(teacher, split, tmp_path / "cache", key="old", layers=(2,))
    manifest = _build(teacher, split, tmp_path / "cache", key="new")
    assert calls[0] == 6
    assert manifest.key == "new" and manifest.layers == TEACHER_LAYERS
    assert tc.CachedOutputs(tmp_path / "cache").manifest.key == "new"


def test_factory_never_reuses_a_cache_for_other_settings(
    teacher: nn.Module, tokenizer: Any, split: data.TokenizedSplit, tmp_path: Path
) -> None:
    calls = _count_calls(teacher)
    prepared = SimpleNamespace(train=split, tokenizer=tokenizer)
    base = {
        "task": "rte",
        "max_seq_length": 32,
        "layers": TEACHER_LAYERS,
        "rows": "all",
        "max_bytes": 10**9,
        "teacher_id": "teacher-a",
        "root": tmp_path,
        "batch_size": 16,
    }
    variants = [
        {},
        {"layers": (2,)},
        {"rows": "cls"},
        {"max_seq_length": 64},
        {"teacher_id": "teacher-b"},
        {"teacher_id": None},  # falls back to a hash of the weights
    ]
    folders = []
    for change in variants:
        before = calls[0]
        outputs = tc.teacher_outputs_factory(**{**base, **change})(prepared, teacher, CPU)
        assert isinstance(outputs, tc.CachedOutputs)
        assert calls[0] > before, f"{change} reused an existing cache"
        folders.append(Path(outputs.manifest.path))
        assert folders[-1].name == outputs.manifest.key
    assert len(set(folders)) == len(variants)
    before = calls[0]
    again = tc.teacher_outputs_factory(**base)(prepared, teacher, CPU)
    assert calls[0] == before and Path(again.manifest.path) == folders[0]
    # Another split (other truncation) is another cache too.
    shorter = data.tokenize(_examples(), tokenizer, 24)
    other = tc.teacher_outputs_factory(**base)(
        SimpleNamespace(train=shorter, tokenizer=tokenizer), teacher, CPU
    )
    assert calls[0] > before and Path(other.manifest.path) not in folders


def test_batch_of_another_split_is_refused(
    teacher: nn.Module, tokenizer: Any, split: data.TokenizedSplit, tmp_path: Path
) -> None:
    _build(teacher, split, tmp_path / "cache")
    cached = tc.CachedOutputs(tmp_path / "cache")
    shorter = data.tokenize(_examples(), tokenizer, 16)
    batch = data.collate([shorter[i] for i in range(8)], 0)
    with pytest.raises(tc.CacheError, match="another split"):
        cached(batch, TEACHER_LAYERS)
    with pytest.raises(FileNotFoundError):
        tc.CachedOutputs(tmp_path / "nothing-here")


# ---------------------------------------------------------------------------------------------
# Budget


def test_budget_caches_lowest_layers_warns_and_stays_exact(
    teacher: nn.Module,
    split: data.TokenizedSplit,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sizes = tc.estimate_bytes(split, 2, 4, 32, 2, "all")
    n = len(split)
    one_layer = (
        sizes["logits"] + sizes["hidden"] + 8 * n + 8 * (n + 1) + sizes["attention_per_layer"]
    )
    with caplog.at_level(logging.WARNING, logger="kdray"):
        manifest = _build(teacher, split, tmp_path / "cache", max_bytes=one_layer + 100)
    assert manifest.attention_layers == (2,) and manifest.live_layers == (4,)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "teacher layers [4]" in warning and "computed on the fly" in warning
    needed = one_layer + sizes["attention_per_layer"]
    assert f"{needed / 1e9:.3g}" in warning  # says how much caching everything would take
    with safe_open(tmp_path / "cache" / tc.ATTENTION_FILE, framework="pt") as f:
        assert sorted(f.keys()) == ["L2", "offsets"]

    calls = _count_calls(teacher)
    live = tc.LiveOutputs(teacher, CPU)
    cached = tc.CachedOutputs(tmp_path / "cache", teacher_model=teacher, device=CPU)
    student, projections = _student(teacher)
    weights = {"soft": 1.0, "hard": 0.0, "attention": 1.0, "hidden": 1.0}
    for stage, layers in (
        (Stage(0, "layer 1", (1,), soft=False, hard=False), (2,)),
        (Stage(1, "classifier", (1, 2), soft=True, hard=False), TEACHER_LAYERS),
    ):
        for batch in _batches(split, seed=11):
            before = calls[0]
            got = cached(batch, layers)
            ran_teacher = calls[0] - before
            assert ran_teacher == (1 if 4 in layers else 0)
            want = live(batch, layers)
            with torch.no_grad():
                s_out = student(
                    **engine.model_inputs(batch), output_attentions=True, output_hidden_states=True
                )
                args = (batch, stage, [2, 4], weights, projections, 2.0, "all")
                live_terms = D.stage_losses(s_out, want, *args)
                cached_terms = D.stage_losses(s_out, got, *args)
            assert set(cached_terms) == set(live_terms)
            for name, value in live_terms.items():
                torch.testing.assert_close(cached_terms[name], value, rtol=RTOL, atol=ATOL)
    assert cached.stats == {"cached": 5, "live": 5}

    without_teacher = tc.CachedOutputs(tmp_path / "cache")
    batch = next(_batches(split))
    assert set(without_teacher(batch, (2,)).attentions) == {2}
    with pytest.raises(KeyError, match=r"teacher layers \[4\] are not in the teacher cache"):
        without_teacher(batch, TEACHER_LAYERS)


def test_budget_below_logits_and_hidden(
    teacher: nn.Module,
    tokenizer: Any,
    split: data.TokenizedSplit,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(tc.CacheBudgetError, match="alone need"):
        _build(teacher, split, tmp_path / "cache", max_bytes=1000)
    assert not (tmp_path / "cache").exists()
    make = tc.teacher_outputs_factory(
        task="rte", max_seq_length=32, layers=(2,), rows="all", max_bytes=1000, root=tmp_path
    )
    with caplog.at_level(logging.WARNING, logger="kdray"):
        outputs = make(SimpleNamespace(train=split, tokenizer=tokenizer), teacher, CPU)
    assert isinstance(outputs, tc.LiveOutputs)
    assert "running the teacher live" in caplog.text


def test_what_without_attentions_stores_none(
    teacher: nn.Module, split: data.TokenizedSplit, tmp_path: Path
) -> None:
    manifest = _build(teacher, split, tmp_path / "cache", what=("logits", "hidden"))
    assert manifest.attention_layers == () and manifest.live_layers == ()
    assert not (tmp_path / "cache" / tc.ATTENTION_FILE).exists()
    out = tc.CachedOutputs(tmp_path / "cache")(next(_batches(split)), TEACHER_LAYERS)
    assert set(out.hidden) == set(TEACHER_LAYERS) and out.attentions == {}


# ---------------------------------------------------------------------------------------------
# Through D.distill


def test_distill_with_the_cache_factory_matches_live(teacher_dir: Path, tmp_path: Path) -> None:
    spec = Spec.model_validate(
        tiny_spec_dict(teacher_dir, train={"epochs": 3, "batch_size": 2, "seed": 1})
    )
    live = D.distill(spec)
    factory = tc.teacher_outputs_factory(
        task="rte",
        max_seq_length=32,
        layers=TEACHER_LAYERS,
        rows="all",
        max_bytes=10**9,
        root=tmp_path,
    )
    made: list[Any] = []

    def recording(*args: Any) -> Any:
        made.append(factory(*args))
        return made[-1]

    cached = D.distill(spec, teacher_outputs=recording)
    assert live.status == cached.status == "ok", (live.error, cached.error)
    (outputs,) = made
    assert isinstance(outputs, tc.CachedOutputs)
    assert outputs.stats["cached"] == 9 and outputs.stats["live"] == 0  # 3 epochs x 3 batches
    for want, got in zip(live.records, cached.records, strict=True):
        losses = [k for k in want if k.startswith("loss.")]
        assert "loss.attention.L2" in losses or "loss.attention.L1" in losses
        for name in losses:
            assert got[name] == pytest.approx(want[name], rel=RTOL, abs=ATOL), name


def test_the_cache_holds_only_what_the_weighted_terms_use(teacher_dir: Path) -> None:
    base = tiny_spec_dict(teacher_dir)
    spec = Spec.model_validate(base)
    assert tc.cached_parts(spec) == ("logits", "hidden", "attentions")
    no_attention = spec.with_values({"distill.losses.attention.weight": 0.0})
    assert tc.cached_parts(no_attention) == ("logits", "hidden")
    no_hidden = spec.with_values({"distill.losses.hidden.weight": 0.0})
    assert tc.cached_parts(no_hidden) == ("logits", "attentions")


def test_a_run_without_the_attention_term_caches_no_attention_maps(
    teacher_dir: Path, tmp_path: Path
) -> None:
    spec = Spec.model_validate(
        tiny_spec_dict(
            teacher_dir,
            distill={"algorithm": "idal", "losses": {"attention": {"weight": 0.0}}},
            teacher={"cache": {"enabled": "on", "dir": str(tmp_path / "outputs")}},
            train={"epochs": 2, "diagnostics": False},
        )
    )
    assert D.distill(spec).status == "ok"
    (folder,) = [p for p in (tmp_path / "outputs").iterdir() if not p.name.startswith(".")]
    manifest = tc.CacheManifest.read(folder)
    assert manifest is not None and "attentions" not in manifest.what
    assert not (folder / tc.ATTENTION_FILE).exists() and (folder / tc.HIDDEN_FILE).exists()


# ---------------------------------------------------------------------------------------------
# Damaged caches: sizes always, sha256 on demand


def _flip_data_byte(path: Path) -> None:
    """Flip one byte in the middle of a safetensors file's data (past its header): the file keeps
    its size and still parses, so only a checksum can tell."""
    raw = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")
    middle = (data_start + len(raw)) // 2
    raw[middle] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_the_manifest_records_the_size_and_sha256_of_every_data_file(
    teacher: nn.Module, split: data.TokenizedSplit, tmp_path: Path
) -> None:
    folder = tmp_path / "cache"
    manifest = _build(teacher, split, folder)
    names = [tc.LOGITS_FILE, tc.HIDDEN_FILE, tc.ATTENTION_FILE]
    assert sorted(manifest.checksums) == sorted(names)
    for name in names:
        raw = (folder / name).read_bytes()
        assert manifest.checksums[name] == {
            "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
        }
    assert tc.CacheManifest.read(folder, "full") == manifest


def test_a_truncated_cache_file_is_rebuilt_with_a_warning_naming_it(
    teacher: nn.Module,
    split: data.TokenizedSplit,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = _count_calls(teacher)
    folder = tmp_path / "cache"
    _build(teacher, split, folder)
    attention = folder / tc.ATTENTION_FILE
    size = attention.stat().st_size
    attention.write_bytes(attention.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="kdray"):
        manifest = _build(teacher, split, folder)
    assert calls[0] == 6  # built twice, 3 batches each
    assert f"{attention} has 1000 bytes, not the {size} recorded" in caplog.text
    assert "rebuilding it" in caplog.text
    assert (
        attention.stat().st_size == size and manifest.checksums[tc.ATTENTION_FILE]["bytes"] == size
    )


def test_same_size_corruption_is_reused_by_the_size_check_and_rebuilt_by_the_full_one(
    teacher: nn.Module,
    split: data.TokenizedSplit,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = _count_calls(teacher)
    folder = tmp_path / "cache"
    first = _build(teacher, split, folder)
    hidden = folder / tc.HIDDEN_FILE
    _flip_data_byte(hidden)
    _build(teacher, split, folder, verify="sizes")
    assert calls[0] == 3  # a stat and a header cannot see it
    assert tc.CachedOutputs(folder).manifest.key == first.key
    with pytest.raises(tc.CacheError, match=f"{hidden} does not match its recorded sha256"):
        tc.CachedOutputs(folder, verify="full")
    with caplog.at_level(logging.WARNING, logger="kdray"):
        rebuilt = _build(teacher, split, folder, verify="full")
    assert calls[0] == 6
    assert f"{hidden} does not match its recorded sha256 (corrupted)" in caplog.text
    assert rebuilt.checksums == first.checksums  # the same values as before the damage


def test_a_same_size_broken_header_is_rebuilt_not_a_traceback(
    teacher: nn.Module, split: data.TokenizedSplit, tmp_path: Path
) -> None:
    calls = _count_calls(teacher)
    folder = tmp_path / "cache"
    _build(teacher, split, folder)
    logits = folder / tc.LOGITS_FILE
    raw = bytearray(logits.read_bytes())
    raw[8] = ord("[")  # the JSON header no longer parses; same size
    logits.write_bytes(bytes(raw))
    with pytest.raises(tc.CacheError, match=f"teacher cache {folder} is damaged: {logits} cannot"):
        tc.CachedOutputs(folder)
    _build(teacher, split, folder)
    assert calls[0] == 6
    assert tc.CachedOutputs(folder).manifest.n_examples == len(split)


def test_cached_outputs_refuses_a_truncated_cache_naming_the_file(
    teacher: nn.Module, split: data.TokenizedSplit, tmp_path: Path
) -> None:
    folder = tmp_path / "cache"
    _build(teacher, split, folder)
    logits = folder / tc.LOGITS_FILE
    logits.write_bytes(logits.read_bytes()[:100])
    with pytest.raises(tc.CacheError) as caught:
        tc.CachedOutputs(folder)
    message = str(caught.value)
    assert message.startswith(f"teacher cache {folder} is damaged: {logits} has 100 bytes, not ")
    assert message.endswith(f"; delete {folder} to have it rebuilt")


def test_a_cache_whose_manifest_records_no_checksums_is_rebuilt(
    teacher: nn.Module, split: data.TokenizedSplit, tmp_path: Path
) -> None:
    calls = _count_calls(teacher)
    folder = tmp_path / "cache"
    _build(teacher, split, folder)
    record = json.loads((folder / tc.MANIFEST_FILE).read_text())
    del record["checksums"]  # as an older kdray wrote it
    (folder / tc.MANIFEST_FILE).write_text(json.dumps(record))
    assert tc.CacheManifest.read(folder) is None
    assert _build(teacher, split, folder).checksums and calls[0] == 6


def test_teacher_cache_verify_in_the_spec_reaches_the_cache(
    teacher: nn.Module,
    tokenizer: Any,
    split: data.TokenizedSplit,
    teacher_dir: Path,
    tmp_path: Path,
) -> None:
    calls = _count_calls(teacher)
    prepared = SimpleNamespace(train=split, tokenizer=tokenizer)
    base = tiny_spec_dict(teacher_dir, teacher={"cache": {"enabled": "on"}})
    assert Spec.model_validate(base).teacher.cache.verify == "full"  # the default
    full = Spec.model_validate(base)
    info = SimpleNamespace(id="teacher-a")
    outputs = tc.outputs_factory(full, [2, 4], info, root=tmp_path)(prepared, teacher, CPU)
    folder = Path(outputs.manifest.path)
    _flip_data_byte(folder / tc.LOGITS_FILE)
    tc.outputs_factory(full, [2, 4], info, root=tmp_path)(prepared, teacher, CPU)
    assert calls[0] == 2  # rebuilt (one batch of 64 per build)
    with pytest.raises(ValueError, match="verify"):
        Spec.model_validate(tiny_spec_dict(teacher_dir, teacher={"cache": {"verify": "fast"}}))
    sizes = Spec.model_validate(
        tiny_spec_dict(teacher_dir, teacher={"cache": {"enabled": "on", "verify": "sizes"}})
    )
    assert sizes.fingerprint() == full.fingerprint()  # how a cache is checked changes no result
