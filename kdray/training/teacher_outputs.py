"""What the loss terms take from the teacher: live from its forward pass, or from a cache.

:class:`TeacherBatch` is what a batch's loss terms need (logits, mapped layers' [CLS] vectors and
attention probabilities); a ``TeacherOutputs`` callable gives it for a batch. :class:`LiveOutputs`
runs the frozen teacher on every batch; :class:`CachedOutputs` serves the same values from the
teacher-output cache.

In a sweep the teacher is frozen and sees the same training examples in every epoch of every
trial, so recomputing its forward pass each step (about a third of a step for MiniLM-L6 -> 3
layers) is waste. :func:`build_cache` runs the teacher once and stores per example, unpadded and
in float16, everything the loss terms take from it; :class:`CachedOutputs` serves it back as the
``TeacherBatch`` of any shuffled batch, re-padded to that batch's width.

A cache folder (content-addressed by :func:`cache_key`) holds standard safetensors files, which
``safetensors.safe_open`` reads; kdray writes them streaming and reads them through ``np.memmap``
so neither side ever holds the attention buffer (gigabytes for a large split) in memory::

    manifest.json          CacheManifest: key, what is cached, which layers' attentions, sizes,
                           and the byte size and sha256 of every other file (``checksums``)
    logits.safetensors     "lengths" I64 [N] real tokens per example, "logits" F16 [N, C]
    hidden.safetensors     "L<l>" F16 [N, D]: [CLS] vector at the output of teacher layer l
    attention.safetensors  "offsets" I64 [N + 1], "L<l>" F16 flat buffer per cached layer l;
                           example i is elements offsets[i]:offsets[i + 1], its probabilities
                           [H, Q_i, L_i] in row-major order (L_i its real length; Q_i = L_i for
                           rows="all", 1 for rows="cls", the [CLS] query row only)

Teacher layers are numbered from 1 as in the rest of kdray (hidden_states[l], attentions[l - 1]).

A cache is trusted only as far as it checks out: a run's reuse compares the files' sha256 sums
with the manifest (``teacher.cache.verify: full``, the default: it catches same-size corruption
and reads every byte, well under 1 % of a run); ``verify="sizes"`` only compares sizes and
opens the headers (a stat and a small read per file). A damaged cache is rebuilt with a warning
that names the file; :class:`CachedOutputs` refuses one with a :class:`CacheError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import filelock
import numpy as np
import torch
from torch import nn

from kdray.infra import faults
from kdray.infra.store import atomic_dir, cache_root, content_hash, file_problems, file_records
from kdray.method import algorithms
from kdray.spec import Spec, term_weights
from kdray.training import data, engine

if TYPE_CHECKING:
    from kdray.training.teacher import TeacherInfo

__all__ = [
    "ALL_PARTS",
    "ATTENTION_ORDER",
    "FORMAT",
    "CacheBudgetError",
    "CacheError",
    "CacheManifest",
    "CachedOutputs",
    "LayerNotCachedError",
    "LiveOutputs",
    "TeacherBatch",
    "TeacherOutputs",
    "build_cache",
    "cache_key",
    "default_root",
    "estimate_bytes",
    "model_digest",
    "outputs_factory",
    "split_fingerprint",
    "teacher_outputs_factory",
]

logger = logging.getLogger("kdray")

#: Bumped whenever the layout or the meaning of a stored value changes; part of every key.
FORMAT = "kdray-teacher-cache-v1"
#: What a cache can hold. Logits are always stored (they are tiny and TeacherBatch needs them).
ALL_PARTS: tuple[str, ...] = ("logits", "hidden", "attentions")
#: Which layers' attentions are kept when they do not all fit in the budget, written into every
#: manifest. The lowest teacher layers go first: the bottom-up schedules (PID, SID) need them in
#: the most stages, so those stages run entirely from the cache.
ATTENTION_ORDER = "ascending teacher layer (lowest first)"

MANIFEST_FILE = "manifest.json"
LOGITS_FILE = "logits.safetensors"
HIDDEN_FILE = "hidden.safetensors"
ATTENTION_FILE = "attention.safetensors"

#: How much of a cache folder is checked before it is used: sizes and headers, or sha256 too.
Verify = Literal["none", "sizes", "full"]

_ST_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
_NP_DTYPES = {name: dtype for dtype, name in _ST_DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# What the loss terms need, and the live teacher


@dataclass
class TeacherBatch:
    """What the loss terms need from the teacher for one batch.

    logits [B, C]; hidden[layer] the [CLS] vector [B, D] at the output of teacher layer `layer`;
    attentions[layer] the attention probabilities [B, H, Q, T] (Q = T, or 1 for [CLS] rows only).
    """

    logits: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)


class TeacherOutputs(Protocol):
    """Gives the teacher's outputs for a batch, for the teacher layers named (1-based)."""

    def __call__(self, batch: dict[str, torch.Tensor], layers: tuple[int, ...]) -> TeacherBatch: ...


#: ``(prepared data, teacher model, device) -> TeacherOutputs``: how a run gets its outputs.
OutputsFactory = Callable[[data.Prepared, nn.Module, torch.device], TeacherOutputs]


class LiveOutputs:
    """Runs the frozen teacher forward for every batch (no gradients, eval mode)."""

    def __init__(self, model: nn.Module, device: torch.device, precision: str = "fp32") -> None:
        self.model = model.to(device).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.device = device
        self.precision = engine.resolve_precision(device, precision)  # auto: once, not per batch

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], layers: tuple[int, ...]) -> TeacherBatch:
        with engine.autocast(self.device, self.precision):
            out = self.model(
                **engine.model_inputs(batch),
                output_attentions=bool(layers),
                output_hidden_states=bool(layers),
            )
        result = TeacherBatch(logits=out.logits.float())
        for layer in layers:
            result.hidden[layer] = out.hidden_states[layer][:, 0].float()
            result.attentions[layer] = out.attentions[layer - 1].float()
        return result


# ---------------------------------------------------------------------------------------------
# The cache


class CacheError(RuntimeError):
    """The cache cannot be built or does not match what it is asked for."""


class CacheBudgetError(CacheError):
    """Even the logits and [CLS] vectors do not fit in the byte budget: run the teacher live."""


class LayerNotCachedError(KeyError):
    """A requested teacher layer is not in the cache and no teacher model was given."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------------------
# Keys and sizes


def _normalise_layers(layers: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Sorted and unique: the stored content does not depend on the order layers are named in."""
    out = tuple(sorted({int(layer) for layer in layers}))
    if any(layer < 1 for layer in out):
        raise ValueError(f"teacher layers are numbered from 1, got {list(layers)}")
    return out


def _normalise_what(what: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    unknown = sorted(set(what) - set(ALL_PARTS))
    if unknown:
        raise ValueError(f"unknown cache parts {unknown} (allowed: {', '.join(ALL_PARTS)})")
    return tuple(part for part in ALL_PARTS if part in what or part == "logits")


def _check_rows(rows: str) -> None:
    if rows not in ("all", "cls"):
        raise ValueError(f"rows must be 'all' or 'cls', got {rows!r}")


def cache_key(
    teacher_id: str,
    task: str,
    split_fingerprint: str,
    max_seq_length: int,
    layers: tuple[int, ...],
    rows: str,
    what: tuple[str, ...],
) -> str:
    """sha256 over everything that changes the stored values, so a cache folder named by it can
    never be reused for other settings. Layer and part order do not matter (they are sorted)."""
    _check_rows(rows)
    ingredients = {
        "format": FORMAT,
        "teacher": str(teacher_id),
        "task": str(task).lower(),
        "split": str(split_fingerprint),
        "max_seq_length": int(max_seq_length),
        "layers": list(_normalise_layers(layers)),
        "rows": rows,
        "what": list(_normalise_what(what)),
    }
    return content_hash(ingredients)


def split_fingerprint(split: data.TokenizedSplit) -> str:
    """Hash of the token ids in split order: exactly what the teacher sees (labels do not change
    its outputs; tokenizer, truncation and max_train_examples all show up in the ids)."""
    digest = hashlib.sha256(str(len(split)).encode())
    for column in (split.input_ids, split.token_type_ids):
        lengths = np.fromiter((len(ids) for ids in column), dtype=np.int64, count=len(column))
        flat = np.fromiter(
            (token for ids in column for token in ids), dtype=np.int64, count=int(lengths.sum())
        )
        digest.update(lengths.tobytes())
        digest.update(flat.tobytes())
    return digest.hexdigest()


def model_digest(model: nn.Module) -> str:
    """Content hash of a model's weights and config, for a key when no teacher id is known."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def estimate_bytes(
    split: data.TokenizedSplit,
    n_layers: int,
    n_heads: int,
    hidden: int,
    n_labels: int,
    rows: str,
) -> dict[str, int]:
    """Bytes of the float16 values, unpadded: logits, hidden ([CLS] vectors of ``n_layers``
    layers), attentions (all ``n_layers``), attention_per_layer and total.

    Attention per layer is ``sum_i H * L_i * L_i * 2`` for rows="all" and ``sum_i H * L_i * 2``
    for rows="cls". Index bookkeeping (8 bytes per example and file) is not included.
    """
    _check_rows(rows)
    lengths = np.asarray(split.lengths, dtype=np.int64)
    n = int(lengths.size)
    cells = lengths * lengths if rows == "all" else lengths
    per_layer = int(n_heads * int(cells.sum()) * 2)
    sizes = {
        "logits": n * n_labels * 2,
        "hidden": n * n_layers * hidden * 2,
        "attentions": n_layers * per_layer,
        "attention_per_layer": per_layer,
    }
    sizes["total"] = sizes["logits"] + sizes["hidden"] + sizes["attentions"]
    return sizes


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


# ---------------------------------------------------------------------------------------------
# Safetensors files written and read in place


def _create_safetensors(
    path: Path, tensors: dict[str, tuple[np.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> dict[str, np.ndarray]:
    """Write a safetensors header for tensors of known shape and return writable memmaps of
    their (zero-filled) data, so values can be stored batch by batch in any example order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _ST_DTYPES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as the reference writer does
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        handle.truncate(8 + len(raw) + offset)
    return _map_tensors(path, writable=True)


def _map_tensors(
    path: Path, *, writable: bool = False, private: bool = False
) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file (nothing is read until it is indexed);
    ``private`` maps copy-on-write (writable arrays, as torch wants, the file never changes).
    A file that cannot be (a cut header, data shorter than the header says) is a
    :class:`CacheError` naming it, not a struct, JSON or mmap traceback.
    """
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        start = 8 + length
        arrays: dict[str, np.ndarray] = {}
        for name, info in header.items():
            dtype = _NP_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = info["data_offsets"]
            if end == begin:
                arrays[name] = np.zeros(shape, dtype=dtype)
                continue
            mode = "r+" if writable else "c" if private else "r"
            offset = start + begin
            arrays[name] = np.memmap(path, dtype=dtype, mode=mode, offset=offset, shape=shape)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as error:
        raise CacheError(f"{path} cannot be read ({type(error).__name__}: {error})") from None
    return arrays


def _flush(arrays: dict[str, np.ndarray]) -> None:
    for array in arrays.values():
        if isinstance(array, np.memmap):
            array.flush()


# ---------------------------------------------------------------------------------------------
# The manifest


@dataclass
class CacheManifest:
    """What a cache folder holds; ``live_layers`` are requested layers whose attentions did not
    fit in the budget and are computed by the teacher when a batch needs them."""

    key: str
    n_examples: int
    n_labels: int
    hidden_size: int
    n_heads: int
    layers: tuple[int, ...]
    rows: str
    what: tuple[str, ...]
    attention_layers: tuple[int, ...]
    live_layers: tuple[int, ...]
    bytes: dict[str, int] = field(default_factory=dict)  # data bytes written per part
    needed_bytes: dict[str, int] = field(default_factory=dict)  # estimate_bytes of everything
    max_bytes: int = 0
    attention_order: str = ATTENTION_ORDER
    created: str = ""
    build_seconds: float = 0.0
    format: str = FORMAT
    checksums: dict[str, dict[str, Any]] = field(default_factory=dict)  # {file: {bytes, sha256}}
    path: str = ""  # the folder it was read from (not stored)

    def files(self) -> list[str]:
        names = [MANIFEST_FILE, LOGITS_FILE]
        if "hidden" in self.what and self.layers:
            names.append(HIDDEN_FILE)
        if self.attention_layers:
            names.append(ATTENTION_FILE)
        return names

    def to_json(self) -> str:
        record = asdict(self)
        record.pop("path")
        return json.dumps(record, indent=2, sort_keys=True)

    @classmethod
    def read(cls, folder: str | Path, verify: Verify = "sizes") -> CacheManifest | None:
        """The manifest of a complete, intact cache of this format, or None (then it is rebuilt;
        a damaged one with a warning that names the file and what is wrong)."""
        manifest, problem = cls.inspect(folder, verify)
        if problem is not None:
            logger.warning("%s: rebuilding it", problem)
        return manifest

    @classmethod
    def inspect(
        cls, folder: str | Path, verify: Verify = "sizes"
    ) -> tuple[CacheManifest | None, str | None]:
        """``(manifest, None)`` for a usable cache; ``(None, what is wrong)`` for a damaged one
        (unreadable manifest, a file missing, resized, with a broken header or, with
        ``verify="full"``, another sha256); ``(None, None)`` for no cache, another format, or
        one from an older kdray that records no checksums (all quietly rebuilt)."""
        folder = Path(folder)
        manifest_file = folder / MANIFEST_FILE
        if not manifest_file.is_file():
            return None, None
        try:
            record = json.loads(manifest_file.read_text())
            if record.get("format") != FORMAT:
                return None, None
            for name in ("layers", "what", "attention_layers", "live_layers"):
                record[name] = tuple(record[name])
            manifest = cls(**record, path=str(folder))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            return None, f"teacher cache {folder}: {manifest_file} cannot be read ({error})"
        if not manifest.checksums:
            logger.info("teacher cache %s records no checksums (older kdray): rebuilding", folder)
            return None, None
        if verify == "none":
            return manifest, None
        names = [name for name in manifest.files() if name != MANIFEST_FILE]
        problems = [
            f"{folder / name} has no checksum in {MANIFEST_FILE}"
            for name in names
            if name not in manifest.checksums
        ]
        records = {name: manifest.checksums[name] for name in names if name in manifest.checksums}
        problems += file_problems(folder, records, full=verify == "full")
        for name in records if not problems else ():
            try:
                _map_tensors(folder / name)
            except CacheError as error:
                problems.append(str(error))
        if problems:
            return None, f"teacher cache {folder} is damaged: {'; '.join(problems)}"
        return manifest, None


# ---------------------------------------------------------------------------------------------
# Building


def _use_eager_attention(model: nn.Module) -> None:
    """Attention probabilities only come out of the eager implementation."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")


def _half(values: torch.Tensor, what: str) -> np.ndarray:
    """float16 copy; refuse values that float16 cannot hold rather than cache inf/NaN."""
    array = values.detach().float().cpu().numpy().astype(np.float16)
    if not np.isfinite(array).all():
        peak = float(values.detach().float().abs().max())
        raise CacheError(
            f"teacher {what} are not finite in float16 (max |value| {peak:g}); "
            "turn the teacher cache off (teacher.cache.enabled: off)"
        )
    return array


def _plan_attention(
    layers: tuple[int, ...], sizes: dict[str, int], fixed: int, n: int, max_bytes: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split layers into (cached, live): as many layers' attentions as fit, lowest first."""
    room = max_bytes - fixed - 8 * (n + 1)  # the offsets index is stored once
    per_layer = sizes["attention_per_layer"]
    fits = 0 if room < 0 else min(len(layers), room // max(per_layer, 1))
    return layers[:fits], layers[fits:]


def build_cache(
    teacher_model: nn.Module,
    split: data.TokenizedSplit,
    pad_token_id: int,
    target_dir: str | Path,
    *,
    layers: tuple[int, ...],
    rows: str,
    max_bytes: int,
    key: str,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    what: tuple[str, ...] = ALL_PARTS,
    verify: Verify = "sizes",
) -> CacheManifest:
    """Run the teacher once over ``split`` and store its outputs in ``target_dir``, or reuse the
    folder if it already holds a complete cache with this ``key`` that passes ``verify``
    (a damaged one is rebuilt with a warning naming the file).

    ``max_bytes`` bounds the stored data. Logits and [CLS] vectors must fit (else
    :class:`CacheBudgetError`); of the attentions, as many layers as fit are stored, lowest
    teacher layer first (:data:`ATTENTION_ORDER`), and the rest are recorded as live (computed by
    the teacher on the batches that need them), with a warning on the ``kdray`` logger.
    ``what`` drops parts whose loss weight is 0 (the key must then say so too).
    """
    target = Path(target_dir)
    layers = _normalise_layers(layers)
    what = _normalise_what(what)
    _check_rows(rows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    existing, problem = CacheManifest.inspect(target, verify)
    if existing is not None and existing.key == key:
        logger.debug("reusing teacher cache %s", target)
        return existing
    target.parent.mkdir(parents=True, exist_ok=True)
    # concurrent trials of a sweep wait for one build instead of each running the teacher
    with filelock.FileLock(str(target.parent / f".{target.name}.lock")):
        if problem is not None:  # another process may have rebuilt it meanwhile
            existing, problem = CacheManifest.inspect(target, verify)
            if problem is not None:
                logger.warning("%s: rebuilding it", problem)
        else:
            existing = CacheManifest.read(target, "sizes")
        if existing is not None and existing.key == key:
            return existing
        return _build(
            teacher_model,
            split,
            pad_token_id,
            target,
            layers=layers,
            rows=rows,
            max_bytes=int(max_bytes),
            key=key,
            batch_size=batch_size,
            device=torch.device(device),
            what=what,
        )


@dataclass
class _Layout:
    """Where each example's values go: sizes, which attention layers are stored, offsets."""

    n: int
    n_labels: int
    hidden_size: int
    n_heads: int
    lengths: np.ndarray
    offsets: np.ndarray
    hidden_layers: tuple[int, ...]
    attention_layers: tuple[int, ...]
    live_layers: tuple[int, ...]
    sizes: dict[str, int]


def _layout(
    config: Any,
    split: data.TokenizedSplit,
    layers: tuple[int, ...],
    rows: str,
    max_bytes: int,
    what: tuple[str, ...],
) -> _Layout:
    """Decide what fits in ``max_bytes`` (logits and [CLS] vectors must; attentions as many
    layers as fit, lowest first) and where every example's attention values start."""
    n_teacher = int(config.num_hidden_layers)
    if layers and layers[-1] > n_teacher:
        raise ValueError(f"teacher layers {list(layers)}: the teacher has layers 1..{n_teacher}")
    n_heads, hidden_size = int(config.num_attention_heads), int(config.hidden_size)
    n_labels, n = int(config.num_labels), len(split)
    lengths = np.asarray(split.lengths, dtype=np.int64)
    hidden_layers = layers if "hidden" in what else ()
    sizes = estimate_bytes(split, len(layers), n_heads, hidden_size, n_labels, rows)
    fixed = sizes["logits"] + 8 * n + (sizes["hidden"] if hidden_layers else 0)
    if fixed > max_bytes:
        raise CacheBudgetError(
            f"teacher cache: logits and [CLS] vectors alone need {_fmt_bytes(fixed)} but the "
            f"budget is {_fmt_bytes(max_bytes)}"
        )
    attention_layers: tuple[int, ...] = ()
    live_layers: tuple[int, ...] = ()
    if "attentions" in what and layers:
        attention_layers, live_layers = _plan_attention(layers, sizes, fixed, n, max_bytes)
    if live_layers:
        _warn_live(live_layers, attention_layers, sizes, fixed + 8 * (n + 1), max_bytes)
    q_len = lengths if rows == "all" else np.ones_like(lengths)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(n_heads * q_len * lengths, out=offsets[1:])
    return _Layout(
        n, n_labels, hidden_size, n_heads, lengths, offsets, hidden_layers,
        attention_layers, live_layers, sizes,
    )  # fmt: skip


def _warn_live(
    live: tuple[int, ...], cached: tuple[int, ...], sizes: dict[str, int], fixed: int, budget: int
) -> None:
    needed = fixed + sizes["attentions"]
    logger.warning(
        "teacher cache: the attentions of teacher layers %s do not fit in the budget of %s "
        "and are computed on the fly (a teacher forward on every batch that needs them); "
        "cached: layers %s. Caching all layers needs %s (%s per layer's attentions): raise "
        "teacher.cache.max_gb to at least %.3g to cache everything.",
        list(live),
        _fmt_bytes(budget),
        list(cached) or "none",
        _fmt_bytes(needed),
        _fmt_bytes(sizes["attention_per_layer"]),
        needed / 1e9,
    )


def _allocate(folder: Path, layout: _Layout, key: str, rows: str) -> dict[str, Any]:
    """Create the (zero-filled) safetensors files and return their writable memmaps."""
    meta = {"format": FORMAT, "key": key}
    n = layout.n
    out_logits = _create_safetensors(
        folder / LOGITS_FILE,
        {"lengths": (np.int64, (n,)), "logits": (np.float16, (n, layout.n_labels))},
        meta,
    )
    out_logits["lengths"][:] = layout.lengths
    out_hidden: dict[str, np.ndarray] = {}
    if layout.hidden_layers:
        out_hidden = _create_safetensors(
            folder / HIDDEN_FILE,
            {f"L{layer}": (np.float16, (n, layout.hidden_size)) for layer in layout.hidden_layers},
            meta,
        )
    out_attn: dict[str, np.ndarray] = {}
    if layout.attention_layers:
        tensors = {"offsets": (np.int64, (n + 1,))}
        size = int(layout.offsets[-1])
        tensors |= {f"L{layer}": (np.float16, (size,)) for layer in layout.attention_layers}
        out_attn = _create_safetensors(folder / ATTENTION_FILE, tensors, {**meta, "rows": rows})
        out_attn["offsets"][:] = layout.offsets
    return {"logits": out_logits, "hidden": out_hidden, "attn": out_attn}


def _build(
    teacher_model: nn.Module,
    split: data.TokenizedSplit,
    pad_token_id: int,
    target: Path,
    *,
    layers: tuple[int, ...],
    rows: str,
    max_bytes: int,
    key: str,
    batch_size: int,
    device: torch.device,
    what: tuple[str, ...],
) -> CacheManifest:
    started = time.perf_counter()
    layout = _layout(teacher_model.config, split, layers, rows, max_bytes, what)
    with atomic_dir(target) as tmp:
        out = _allocate(tmp, layout, key, rows)
        _run_teacher(
            teacher_model,
            split,
            pad_token_id,
            layout,
            batch_size=batch_size,
            device=device,
            rows=rows,
            out_logits=out["logits"]["logits"],
            out_hidden=out["hidden"],
            out_attn=out["attn"],
        )
        faults.point("teacher_outputs.build", target)
        for arrays in out.values():
            _flush(arrays)
        checksums = file_records(tmp, [p.name for p in tmp.iterdir() if p.is_file()])
        written = {
            "logits": int(out["logits"]["logits"].nbytes),
            "hidden": sum(int(a.nbytes) for a in out["hidden"].values()),
            "attentions": sum(int(a.nbytes) for k, a in out["attn"].items() if k != "offsets"),
        }
        del out
        manifest = CacheManifest(
            key=key,
            n_examples=layout.n,
            n_labels=layout.n_labels,
            hidden_size=layout.hidden_size,
            n_heads=layout.n_heads,
            layers=layers,
            rows=rows,
            what=what,
            attention_layers=layout.attention_layers,
            live_layers=layout.live_layers,
            bytes=written,
            needed_bytes=layout.sizes,
            max_bytes=max_bytes,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            build_seconds=round(time.perf_counter() - started, 3),
            checksums=checksums,
        )
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())
    logger.info(
        "teacher cache: %d examples, %s in %.1f s at %s",
        layout.n,
        _fmt_bytes(sum(manifest.bytes.values())),
        manifest.build_seconds,
        target,
    )
    manifest.path = str(target)
    return manifest


@torch.no_grad()
def _run_teacher(
    model: nn.Module,
    split: data.TokenizedSplit,
    pad_token_id: int,
    layout: _Layout,
    *,
    batch_size: int,
    device: torch.device,
    rows: str,
    out_logits: np.ndarray,
    out_hidden: dict[str, np.ndarray],
    out_attn: dict[str, np.ndarray],
) -> None:
    """One eval-mode fp32 pass in length order (little padding); rows land at their index."""
    lengths, offsets = layout.lengths, layout.offsets
    hidden_layers, attention_layers = layout.hidden_layers, layout.attention_layers
    was_training = model.training
    model.to(device).eval()
    _use_eager_attention(model)
    order = np.argsort(lengths, kind="stable")
    try:
        for start in range(0, len(order), batch_size):
            ids = order[start : start + batch_size]
            batch = data.collate([split[int(i)] for i in ids], pad_token_id)
            out = model(
                **{k: v.to(device) for k, v in engine.model_inputs(batch).items()},
                output_hidden_states=bool(hidden_layers),
                output_attentions=bool(attention_layers),
            )
            out_logits[ids] = _half(out.logits, "logits")
            for layer in hidden_layers:
                out_hidden[f"L{layer}"][ids] = _half(out.hidden_states[layer][:, 0], "hidden")
            for layer in attention_layers:
                if out.attentions is None or out.attentions[layer - 1] is None:
                    raise CacheError("the teacher returned no attentions (needs eager attention)")
                probs = _half(out.attentions[layer - 1], "attention probabilities")
                flat = out_attn[f"L{layer}"]
                for row, i in enumerate(ids):
                    length = int(lengths[i])
                    q = length if rows == "all" else 1
                    flat[offsets[i] : offsets[i + 1]] = probs[row, :, :q, :length].reshape(-1)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# Serving


class CachedOutputs:
    """``TeacherOutputs`` from a cache folder: gathers the batch's examples by ``batch["index"]``
    and re-pads them to the batch width (zeros in padding), as float32 on ``device``.

    A batch that asks for a layer whose attentions are live (over budget) or that the cache does
    not hold is computed by ``teacher_model`` instead (all of that batch's outputs then come from
    the forward pass); without a teacher model that is a :class:`LayerNotCachedError`.
    ``stats`` counts batches served from the cache and by the teacher.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        teacher_model: nn.Module | None = None,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        verify: Verify = "sizes",
    ) -> None:
        manifest, problem = CacheManifest.inspect(cache_dir, verify)
        if problem is not None:
            raise CacheError(f"{problem}; delete {cache_dir} to have it rebuilt")
        if manifest is None:
            raise FileNotFoundError(f"no complete teacher cache ({FORMAT}) in {cache_dir}")
        self.manifest = manifest
        self.device = torch.device(device)
        self.precision = precision
        self.teacher_model = teacher_model
        self._live: LiveOutputs | None = None
        try:
            self._map(Path(cache_dir))
        except (CacheError, KeyError) as error:
            raise CacheError(
                f"teacher cache {cache_dir} is damaged: {error}; delete it to have it rebuilt"
            ) from None
        self.stats = {"cached": 0, "live": 0}

    def _map(self, folder: Path) -> None:
        manifest = self.manifest
        stored = _map_tensors(folder / LOGITS_FILE)
        self._lengths, self._logits = stored["lengths"], stored["logits"]
        self._hidden: dict[int, np.ndarray] = {}
        if HIDDEN_FILE in manifest.files():
            self._hidden = {int(k[1:]): v for k, v in _map_tensors(folder / HIDDEN_FILE).items()}
        self._attn: dict[int, torch.Tensor] = {}
        self._offsets = np.zeros(1, dtype=np.int64)
        if ATTENTION_FILE in manifest.files():
            stored = _map_tensors(folder / ATTENTION_FILE, private=True)
            self._offsets = np.asarray(stored.pop("offsets"))
            self._attn = {int(k[1:]): torch.from_numpy(v) for k, v in stored.items()}

    def uncached(self, layers: tuple[int, ...]) -> tuple[int, ...]:
        """Requested layers the cache cannot serve (they need a teacher forward)."""
        what = self.manifest.what
        return tuple(
            layer
            for layer in layers
            if ("hidden" in what and layer not in self._hidden)
            or ("attentions" in what and layer not in self._attn)
        )

    def __call__(self, batch: dict[str, torch.Tensor], layers: tuple[int, ...]) -> TeacherBatch:
        layers = tuple(layers)
        index = batch["index"].cpu().numpy().astype(np.int64)
        lengths = self._check_batch(batch, index)
        missing = self.uncached(layers)
        if missing:
            return self._forward(batch, layers, missing)
        self.stats["cached"] += 1
        result = TeacherBatch(logits=self._tensor(self._logits[index]))
        width = int(batch["input_ids"].shape[1])
        for layer in layers:
            if layer in self._hidden:
                result.hidden[layer] = self._tensor(self._hidden[layer][index])
            if layer in self._attn:
                padded = self._padded_attention(self._attn[layer], index, lengths, width)
                result.attentions[layer] = padded.to(self.device)
        return result

    def _padded_attention(
        self, flat: torch.Tensor, index: np.ndarray, lengths: np.ndarray, width: int
    ) -> torch.Tensor:
        """Copy each example's float16 maps into a zero float32 batch (torch converts while it
        copies, about twice as fast as numpy's float16 conversion)."""
        heads = self.manifest.n_heads
        rows_all = self.manifest.rows == "all"
        out = torch.zeros((len(index), heads, width if rows_all else 1, width))
        starts = self._offsets[index].tolist()
        for row, (start, length) in enumerate(zip(starts, lengths.tolist(), strict=True)):
            q = length if rows_all else 1
            piece = flat[start : start + heads * q * length]
            out[row, :, :q, :length] = piece.view(heads, q, length)
        return out

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(self.device)

    def _check_batch(self, batch: dict[str, torch.Tensor], index: np.ndarray) -> np.ndarray:
        """A batch from another split or tokenisation would silently get wrong targets."""
        n = self.manifest.n_examples
        if index.size and (index.min() < 0 or index.max() >= n):
            raise CacheError(
                f"batch index {int(index.max())} is outside the cached split of {n} examples "
                f"({self.manifest.path}): the cache was built for another split"
            )
        lengths = np.asarray(self._lengths[index])
        real = batch["attention_mask"].sum(dim=1).cpu().numpy()
        if not np.array_equal(real, lengths):
            bad = int(np.flatnonzero(real != lengths)[0])
            raise CacheError(
                f"example {int(index[bad])} has {int(real[bad])} tokens in this batch but "
                f"{int(lengths[bad])} in the teacher cache {self.manifest.path}: the cache was "
                "built for another split, tokenizer or max_seq_length"
            )
        return lengths

    def _forward(
        self, batch: dict[str, torch.Tensor], layers: tuple[int, ...], missing: tuple[int, ...]
    ) -> TeacherBatch:
        if self.teacher_model is None:
            raise LayerNotCachedError(
                f"teacher layers {list(missing)} are not in the teacher cache "
                f"{self.manifest.path} (it holds attentions of layers "
                f"{list(self.manifest.attention_layers)}, [CLS] vectors of layers "
                f"{sorted(self._hidden)}); give CachedOutputs a teacher_model to compute them"
            )
        if self._live is None:
            self._live = LiveOutputs(self.teacher_model, self.device, self.precision)
        self.stats["live"] += 1
        return self._live(batch, layers)


# ---------------------------------------------------------------------------------------------
# The factories distill() takes


def default_root() -> Path:
    """Where caches go unless told otherwise: next to the tokenised data and teachers."""
    return cache_root() / "teacher-outputs"


def teacher_outputs_factory(
    *,
    task: str,
    max_seq_length: int,
    layers: tuple[int, ...],
    rows: str,
    max_bytes: int,
    teacher_id: str | None = None,
    what: tuple[str, ...] = ALL_PARTS,
    root: str | Path | None = None,
    batch_size: int = 64,
    precision: str = "fp32",
    verify: Verify = "sizes",
) -> OutputsFactory:
    """``(prepared, teacher_model, device) -> TeacherOutputs`` for ``distill()``: builds or
    reuses the cache of ``prepared.train`` under ``root/<cache_key>`` and serves it.

    ``layers`` are the teacher layers the layer map uses; ``teacher_id`` should be a content id
    of the teacher (``TeacherInfo.id``), else the weights are hashed. When even the logits and
    [CLS] vectors exceed ``max_bytes`` the factory warns and falls back to ``LiveOutputs``.
    ``verify`` is how a cache found on disk is checked before reuse (``build_cache``).
    """

    def make(
        prepared: data.Prepared, teacher_model: nn.Module, device: torch.device
    ) -> TeacherOutputs:
        split = prepared.train
        ident = teacher_id or "weights:" + model_digest(teacher_model)
        key = cache_key(ident, task, split_fingerprint(split), max_seq_length, layers, rows, what)
        target = Path(root) if root is not None else default_root()
        try:
            build_cache(
                teacher_model,
                split,
                prepared.tokenizer.pad_token_id,
                target / key,
                layers=layers,
                rows=rows,
                max_bytes=max_bytes,
                key=key,
                batch_size=batch_size,
                device=device,
                what=what,
                verify=verify,
            )
        except CacheBudgetError as error:
            logger.warning("%s: running the teacher live instead", error)
            return LiveOutputs(teacher_model, device, precision)
        return CachedOutputs(
            target / key, teacher_model=teacher_model, device=device, precision=precision
        )

    return make


def cache_enabled(spec: Spec) -> bool:
    """``teacher.cache.enabled``: auto caches whenever the teacher is used for more than one
    epoch (building the cache costs about one epoch of teacher forwards)."""
    setting = spec.teacher.cache.enabled
    if setting in (False, "off"):
        return False
    if setting in (True, "on"):
        return True
    return spec.train.epochs > 1 and algorithms.get(spec.distill.algorithm).uses_teacher


def cached_parts(spec: Spec) -> tuple[str, ...]:
    """What a run's loss terms can ask of the cache: [CLS] vectors only when the hidden term
    weighs something, attention maps only when the attention term does."""
    weights = term_weights(spec)
    parts = ["logits"]
    if weights["hidden"] > 0:
        parts.append("hidden")
    if weights["attention"] > 0:
        parts.append("attentions")
    return tuple(parts)


def outputs_factory(
    spec: Spec,
    layer_map: list[int],
    teacher: TeacherInfo,
    root: str | Path | None = None,
) -> OutputsFactory:
    """How a run of ``spec`` gets its teacher outputs: the cache of its mapped layers when
    ``teacher.cache`` is on, else the live teacher."""
    if not cache_enabled(spec):
        precision = spec.train.precision
        return lambda prepared, model, device: LiveOutputs(model, device, precision)
    return teacher_outputs_factory(
        task=spec.task,
        max_seq_length=spec.data.max_seq_length,
        layers=tuple(sorted(set(layer_map))),
        rows=spec.distill.losses.attention.rows,
        max_bytes=int(spec.teacher.cache.max_gb * 1e9),
        teacher_id=teacher.id,
        what=cached_parts(spec),
        root=root or spec.teacher.cache.dir or cache_root(spec.data.cache_dir) / "teacher-outputs",
        precision=spec.train.precision,
        verify=spec.teacher.cache.verify,
    )
