"""Snapshot files: a session's decode state on disk, restored bit-exactly and memory-mapped.

Layout (little-endian; ``docs/kv-cache.md`` is the reference):

- a 40-byte prefix: magic ``DS4KVSNP``, format version (u32), header length (u32), payload
  length (u64), XXH3-64 of header and payload (u64), then the hit count (u32) and its bitwise
  complement (u32): kept outside the checksum so a hit is recorded by rewriting 8 bytes;
- the header: UTF-8 JSON, padded with spaces to a multiple of 64 bytes: the model identity,
  the token count, the rendered text, caller metadata (``extra``) and the table of tensors
  (name, dtype, shape, offset into the payload);
- the payload: the tensors' bytes, each at a 64-byte aligned offset: the token ids, the
  next-token logits, then per layer the window, and the compressor and indexer rows and
  frontier.

Files are written to a temporary name in the same directory, flushed, fsynced and renamed, so
a crash never leaves a half file under a real name. Reading checks size, magic, version,
checksum, model identity and structure; any mismatch is a ``KVFileError``, never a crash.
The mapping of each file read is remembered while any of its rows are in use (``in_use``), so
a cache never removes a file whose pages a session still reads.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from dwarfstar.model.model import Model
from dwarfstar.model.state import CompressorState, RowBuffer, Session

MAGIC = b"DS4KVSNP"
VERSION = 3
_PREFIX = struct.Struct("<8sIIQQII")
_HITS = struct.Struct("<II")  # the hit count and its complement, the prefix's last 8 bytes
_HITS_AT = _PREFIX.size - _HITS.size
_MASK = 0xFFFFFFFF
_MAPPED: weakref.WeakValueDictionary[tuple[int, int], mmap.mmap] = weakref.WeakValueDictionary()
_ALIGN = 64
_FRONTIER = ("pending_kv", "pending_gate", "previous_kv", "previous_gate")
_IDENTITIES: weakref.WeakKeyDictionary[Model, dict] = weakref.WeakKeyDictionary()


class KVFileError(ValueError):
    """A snapshot file that cannot be used: truncated, corrupt, another model or format version."""


@dataclass
class Snapshot:
    """What a snapshot file holds: the state after ``tokens``, their text when known, the
    next-token logits, and the caller's metadata (JSON values)."""

    state: Session
    tokens: list[int]
    text: str | None
    logits: torch.Tensor
    extra: dict = field(default_factory=dict)


def model_identity(model: Model) -> dict:
    """What a snapshot is valid for: the architecture, the quantisation-simulation switch and a
    fingerprint of the weights (each tensor's name, type, shape and first bytes)."""
    if model not in _IDENTITIES:
        digest = hashlib.sha256()
        file = getattr(model, "file", None)
        for name, info in sorted(file.tensors.items()) if file is not None else []:
            head = info.data.reshape(-1)[:64].tobytes()
            digest.update(f"{name}:{info.kind.name}:{info.shape}:".encode() + head)
        _IDENTITIES[model] = {
            "architecture": model.config.to_metadata(),
            "quant_sim": bool(model.quant_sim),
            "weights": digest.hexdigest(),
        }
    return _IDENTITIES[model]


def state_tensors(state: Session) -> list[tuple[str, torch.Tensor]]:
    out = []
    for i, layer in enumerate(state.layers):
        out.append((f"layers.{i}.window", layer.raw))
        for part_name in ("compressor", "indexer"):
            part = getattr(layer, part_name)
            if part is None:
                continue
            out.append((f"layers.{i}.{part_name}.rows", part.rows))
            out += [
                (f"layers.{i}.{part_name}.{f}", getattr(part, f))
                for f in _FRONTIER
                if getattr(part, f) is not None
            ]
    return out


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def write(path: str | os.PathLike[str], snapshot: Snapshot, model: Model) -> int:
    """Write ``snapshot`` atomically to ``path``; returns the file's size in bytes.

    An ``OSError`` (a full disk, say) leaves no file behind, under the real name or another.
    """
    path = Path(path)
    tensors = [
        ("tokens", torch.tensor(snapshot.tokens, dtype=torch.int32)),
        ("logits", snapshot.logits.detach().reshape(-1)),
        *state_tensors(snapshot.state),
    ]
    table, offset = [], 0
    for name, t in tensors:
        table.append(
            {
                "name": name,
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "offset": offset,
            }
        )
        offset = _padded(offset + t.numel() * t.element_size())
    header = {
        "model": model_identity(model),
        "n_tokens": len(snapshot.tokens),
        "text": snapshot.text,
        "created": time.time(),
        "extra": snapshot.extra,
        "tensors": table,
    }
    header_bytes = json.dumps(header, ensure_ascii=False).encode()
    header_bytes += b" " * (_padded(_PREFIX.size + len(header_bytes)) - _PREFIX.size - len(header_bytes))
    payload_size = offset
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, VERSION, len(header_bytes), payload_size, 0, 0, _MASK))
            f.write(header_bytes)
            checksum = xxhash.xxh3_64(header_bytes)
            written = 0
            for entry, (_, t) in zip(table, tensors, strict=True):
                gap = bytes(entry["offset"] - written)
                data = memoryview(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
                f.write(gap)
                f.write(data)
                checksum.update(gap)
                checksum.update(data)
                written = entry["offset"] + len(data)
            tail = bytes(payload_size - written)
            f.write(tail)
            checksum.update(tail)
            f.seek(0)
            digest = checksum.intdigest()
            f.write(_PREFIX.pack(MAGIC, VERSION, len(header_bytes), payload_size, digest, 0, _MASK))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return _PREFIX.size + len(header_bytes) + payload_size


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_header(path: str | os.PathLike[str]) -> dict:
    """The header of a snapshot file, with its ``hits`` (no checksum check: for listing a
    directory)."""
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        header_size, _, _, hits = _unpack_prefix(prefix)
        data = f.read(header_size)
    if len(data) != header_size:
        raise KVFileError("truncated: the header is cut short")
    return {**_parse_header(data), "hits": hits}


def record_hit(path: str | os.PathLike[str]) -> int:
    """Count one more use of the file (rewriting its 8 bytes of hit count; its modification time
    becomes now) and return the new count. ``KVFileError`` if it is not a snapshot file.

    Two processes counting a hit at once may count one: the count only ranks files for eviction.
    """
    with open(path, "r+b") as f:
        hits = _unpack_prefix(f.read(_PREFIX.size))[3]
        hits = min(hits + 1, _MASK)
        os.pwrite(f.fileno(), _HITS.pack(hits, hits ^ _MASK), _HITS_AT)
    return hits


def in_use(path: str | os.PathLike[str]) -> bool:
    """Whether rows of the file at ``path`` are still read from its mapping in this process."""
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) in _MAPPED


def _unpack_prefix(prefix: bytes) -> tuple[int, int, int, int]:
    """Header size, payload size, checksum and hit count of a file's prefix."""
    if len(prefix) < _PREFIX.size:
        raise KVFileError("truncated: shorter than the fixed prefix")
    magic, version, header_size, payload_size, checksum, hits, check = _PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise KVFileError("not a dwarfstar snapshot file (bad magic)")
    if version != VERSION:
        raise KVFileError(f"format version {version}; this dwarfstar reads version {VERSION}")
    if hits ^ check != _MASK:
        raise KVFileError("corrupt: the hit count does not match its check")
    return header_size, payload_size, checksum, hits


def _parse_header(data: bytes) -> dict:
    try:
        header = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise KVFileError(f"corrupt header ({err})") from None
    if not isinstance(header, dict):
        raise KVFileError("corrupt header (not an object)")
    return header


def verify(path: str | os.PathLike[str]) -> dict:
    """The header of a whole, uncorrupted snapshot file, with its ``hits`` (size and checksum
    checked; written for which model is not): ``KVFileError`` otherwise."""
    mapped, header, _ = _checked(path)
    del mapped
    return header


def read(path: str | os.PathLike[str], model: Model, device: torch.device | str | None = None) -> Snapshot:
    """Load a snapshot for ``model``, memory-mapped: the rows stay in the file's pages until
    the session first appends to them (on another ``device``, the model's by default, they are
    copied there). ``KVFileError`` says why a file cannot be used."""
    mapped, header, base = _checked(path)
    if header.get("model") != model_identity(model):
        raise KVFileError(
            "written for another model (architecture, weights or quantisation simulation differ)"
        )
    try:
        target = model.device if device is None else torch.device(device)
        return _snapshot(header, mapped, base, model, target)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise KVFileError(f"inconsistent contents ({err})") from None


def _checked(path: str | os.PathLike[str]) -> tuple[mmap.mmap, dict, int]:
    """The file mapped (privately), its header, and where its payload starts, once its size and
    checksum are right."""
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            size = stat.st_size
            if size < _PREFIX.size:
                raise KVFileError("truncated: shorter than the fixed prefix")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as err:
        raise KVFileError(f"cannot read it ({err.strerror or err})") from None
    header_size, payload_size, checksum, hits = _unpack_prefix(mapped[: _PREFIX.size])
    expected = _PREFIX.size + header_size + payload_size
    if size != expected:
        raise KVFileError(f"truncated or padded: {size} bytes, the prefix announces {expected}")
    if xxhash.xxh3_64_intdigest(memoryview(mapped)[_PREFIX.size :]) != checksum:
        raise KVFileError("corrupt: the checksum does not match")
    header = {**_parse_header(mapped[_PREFIX.size : _PREFIX.size + header_size]), "hits": hits}
    _MAPPED[stat.st_dev, stat.st_ino] = mapped
    return mapped, header, _PREFIX.size + header_size


def _snapshot(header: dict, mapped: mmap.mmap, base: int, model: Model, device: torch.device) -> Snapshot:
    tensors = {}
    for entry in header["tensors"]:
        dtype = getattr(torch, entry["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {entry['dtype']!r}")
        count = 1
        for n in entry["shape"]:
            count *= int(n)
        start = base + int(entry["offset"])
        if count and start + count * dtype.itemsize > len(mapped):
            raise ValueError(f"tensor {entry['name']} runs past the end of the file")
        flat = (
            torch.frombuffer(mapped, dtype=dtype, count=count, offset=start)
            if count
            else torch.empty(0, dtype=dtype)
        )
        tensors[entry["name"]] = flat.reshape(entry["shape"])
    config = model.config
    tokens = tensors.pop("tokens").tolist()
    logits = tensors.pop("logits").to(device, copy=True)
    if len(tokens) != header["n_tokens"] or logits.shape != (config.vocab_size,):
        raise ValueError("the token count or the logits' size does not match the header")
    state = Session.new(config, device)
    for i, layer in enumerate(state.layers):
        layer.window = _adopted(tensors.pop(f"layers.{i}.window"), config.head_dim, device)
        for part_name in ("compressor", "indexer"):
            part: CompressorState | None = getattr(layer, part_name)
            if part is None:
                continue
            part.row_buffer = _adopted(
                tensors.pop(f"layers.{i}.{part_name}.rows"), part.rows.shape[1], device
            )
            for f in _FRONTIER:
                value = tensors.pop(f"layers.{i}.{part_name}.{f}", None)
                setattr(part, f, None if value is None else value.to(device, copy=True))
            if part.pending_kv is None or part.pending_gate is None:
                raise ValueError(f"layer {i} {part_name}: the frontier is missing")
    if tensors:
        raise ValueError(f"unexpected tensors {sorted(tensors)[:3]}")
    state.n_tokens = len(tokens)
    extra = header.get("extra") or {}
    return Snapshot(state, tokens, header.get("text"), logits, extra if isinstance(extra, dict) else {})


def _adopted(rows: torch.Tensor, width: int, device: torch.device) -> RowBuffer:
    """A buffer over ``rows`` (mapped pages on the CPU; copied to another device)."""
    if rows.dim() != 2 or rows.shape[1] != width:
        raise ValueError(f"rows of shape {tuple(rows.shape)}, expected width {width}")
    return RowBuffer.adopt(rows if device.type == "cpu" else rows.to(device))
