"""Writing a GGUF v3 file: typed metadata, then tensors already in stored form, one at a time.

Metadata values are plain Python and typed the way ds4 and llama.cpp's loaders read them
(llama.cpp checks key types strictly):

* ``bool`` -> BOOL; ``str`` -> STRING;
* ``int`` -> UINT32 (counts, ids, ``original_context_length``, ``expert_gating_func``), INT32
  when negative, UINT64 past 2**32;
* ``float`` -> FLOAT32;
* lists -> arrays of STRING, BOOL, INT32 (ints: ``compress_ratios``, ``token_type``) or
  FLOAT32 (``swiglu_clamp_exp``), after their first element, as gguf-py's converter does.

Tensors are declared up front (name, kind, torch-order shape) so the header can be written
first; their bytes then follow in the declared order, each in as many parts as the caller
likes (stacked experts go one expert at a time), so memory stays bounded.

The layout is gguf-py's (``gguf.GGUFWriter``), written here directly: gguf-py packs metadata
one value at a time, which takes seconds for the 129280-token vocabulary.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from dwarfstar.gguf.container import DEFAULT_ALIGNMENT, MAGIC, SCALAR_FORMATS, VERSION, tensor_nbytes

ARCHITECTURE_KEY = "general.architecture"
ALIGNMENT_KEY = "general.alignment"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, stored kind and logical shape in torch order."""

    name: str
    kind: GGMLQuantizationType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        try:
            return tensor_nbytes(self.kind, self.shape)
        except ValueError as err:
            raise ValueError(f"tensor {self.name!r}: {err}") from None


def value_type(key: str, value: object) -> tuple[GGUFValueType, GGUFValueType | None]:
    """The GGUF type (and array element type) a metadata value is written with."""
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError(f"metadata {key}: an empty array has no GGUF type")
        element, _ = value_type(key, value[0])
        if element is GGUFValueType.ARRAY:
            raise ValueError(f"metadata {key}: nested arrays are not supported")
        if element is GGUFValueType.UINT32:
            element = GGUFValueType.INT32
        return GGUFValueType.ARRAY, element
    if isinstance(value, bool):
        return GGUFValueType.BOOL, None
    if isinstance(value, int):
        if value < 0:
            return GGUFValueType.INT32, None
        return (GGUFValueType.UINT32 if value < 2**32 else GGUFValueType.UINT64), None
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return GGUFValueType.STRING, None
    raise TypeError(f"metadata {key}: cannot store a {type(value).__name__} in GGUF")


class GGUFFileWriter:
    """Writes ``metadata`` and the header for ``tensors`` on entry; then ``write_tensor`` each, in order.

    ``metadata`` must hold ``general.architecture`` (written first, as gguf-py does);
    ``general.alignment`` (default 32) sets the data alignment. Use as a context manager: the
    file is closed on exit, and removed if writing the header or the block raised (a full disk,
    say) or left a declared tensor unwritten.
    """

    def __init__(
        self, path: str | os.PathLike[str], metadata: dict[str, object], tensors: Sequence[TensorSpec]
    ) -> None:
        self.path = Path(path)
        if ARCHITECTURE_KEY not in metadata:
            raise ValueError(f"metadata must name {ARCHITECTURE_KEY}")
        # architecture first, as gguf-py writes it; then the alignment, defaulted
        first = {ARCHITECTURE_KEY: metadata[ARCHITECTURE_KEY], ALIGNMENT_KEY: DEFAULT_ALIGNMENT}
        metadata = {**first, **metadata}
        self.alignment = int(metadata[ALIGNMENT_KEY])  # type: ignore[call-overload]
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise ValueError(f"{ALIGNMENT_KEY} must be a power of two, not {self.alignment}")
        self._kv = b"".join(_string(k) + _typed_value(k, _plain(v)) for k, v in metadata.items())
        self._n_keys = len(metadata)
        self._pending = list(tensors)
        self._sizes = [spec.nbytes for spec in self._pending]  # checks every shape before writing

    def __enter__(self) -> GGUFFileWriter:
        self._out = open(self.path, "wb")  # noqa: SIM115 (closed in __exit__)
        try:
            self._write_header()
        except BaseException:
            self._close(keep=False)
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._close(keep=exc_type is None and not self._pending)
        if exc_type is None and self._pending:
            raise ValueError(f"{self.path}: tensor {self._pending[0].name!r} was declared but never written")

    def _write_header(self) -> None:
        """Metadata and the tensor directory (the vocabulary makes it megabytes), then padding."""
        self._out.write(MAGIC + struct.pack("<IQQ", VERSION, len(self._pending), self._n_keys))
        self._out.write(self._kv)
        offset = 0
        for spec, size in zip(self._pending, self._sizes, strict=True):
            dims = tuple(reversed(spec.shape))
            self._out.write(_string(spec.name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims))
            self._out.write(struct.pack("<IQ", spec.kind, offset))
            offset += -(-size // self.alignment) * self.alignment
        self._pad()  # tensor data starts aligned

    def _close(self, keep: bool) -> None:
        """Close the file (flushing it can fail too); remove it unless it is complete."""
        try:
            self._out.close()
        except BaseException:
            keep = False
            raise
        finally:
            if not keep:
                self.path.unlink(missing_ok=True)

    def write_tensor(self, name: str, parts: np.ndarray | Iterable[np.ndarray]) -> None:
        """The stored bytes of the next declared tensor, whole or as consecutive parts."""
        if not self._pending:
            raise ValueError(f"tensor {name!r} was not declared")
        spec = self._pending[0]
        if spec.name != name:
            raise ValueError(f"tensor {name!r} written out of order: {spec.name!r} comes next")
        written = 0
        for part in [parts] if isinstance(parts, np.ndarray) else parts:
            part = np.ascontiguousarray(part)
            written += part.nbytes
            if written > spec.nbytes:
                break
            part.tofile(self._out)
        if written != spec.nbytes:
            raise ValueError(f"tensor {name!r} takes {spec.nbytes} bytes as {spec.kind.name}, got {written}")
        self._pending.pop(0)
        self._pad()

    def _pad(self) -> None:
        self._out.write(bytes(-self._out.tell() % self.alignment))


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _typed_value(key: str, value: object) -> bytes:
    """The value's type id(s) and bytes."""
    try:
        return _pack(key, value)
    except (struct.error, OverflowError) as err:
        raise ValueError(f"metadata {key}: {value!r} does not fit its GGUF type ({err})") from None


def _pack(key: str, value: object) -> bytes:
    vtype, element = value_type(key, value)
    if vtype is GGUFValueType.STRING:
        return struct.pack("<I", vtype) + _string(value)  # type: ignore[arg-type]
    if vtype is not GGUFValueType.ARRAY:
        return struct.pack("<I", vtype) + struct.pack(SCALAR_FORMATS[vtype], value)
    assert element is not None and isinstance(value, list)
    header = struct.pack("<IIQ", vtype, element, len(value))
    if element is GGUFValueType.STRING:
        return header + b"".join(_string(item) for item in value)
    kinds = {type(item) for item in value}
    if len(kinds) > 1 and kinds != {int}:
        raise ValueError(f"metadata {key}: array items of mixed types {sorted(k.__name__ for k in kinds)}")
    return header + struct.pack(f"<{len(value)}{SCALAR_FORMATS[element][1:]}", *value)


def _plain(value: object) -> object:
    """numpy scalars as the Python values they hold; tuples as lists."""
    if isinstance(value, list | tuple):
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    return value.item() if isinstance(value, np.generic) else value
