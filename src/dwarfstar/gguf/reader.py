"""Opening a GGUF file: its metadata as Python values, its tensors as views over a memory map.

Nothing is copied or dequantized at load: each tensor's ``data`` is a read-only numpy view of
the mapped file, shaped as gguf-py's reader shapes it. The checks here are the container's
(magic, version 3, every tensor's type known, its data aligned and inside the file); whether
the tensors make a model is the model binder's business.

The header is parsed here rather than by ``gguf.GGUFReader``, which takes about 20 seconds
over the 129280-token vocabulary (it builds numpy views for every string); this takes well
under one.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from dwarfstar.gguf.container import (
    DEFAULT_ALIGNMENT,
    MAGIC,
    NUMPY_DTYPES,
    SCALAR_FORMATS,
    VERSION,
    row_nbytes,
    tensor_nbytes,
)


class GGUFError(ValueError):
    """The file is not a GGUF file we can read; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as stored: ``shape`` in torch order (GGUF's ne reversed), ``data`` a view of the map.

    ``data`` is typed (float32, float16, int32, ...) for element kinds and uint8
    ``(..., rows, bytes_per_row)`` for BF16 and the block formats. It is read-only.
    """

    name: str
    kind: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFFile:
    """A GGUF v3 file, memory-mapped.

    ``metadata`` maps each key to a plain Python value (str, int, float, bool or a list of
    those); ``tensors`` maps each name to a ``TensorInfo``; ``alignment`` is the data alignment.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._map = _map_file(self.path)
        header = _Header(self._map, self.path)
        self.metadata: dict[str, object] = header.metadata
        self.alignment: int = header.alignment
        self.tensors: dict[str, TensorInfo] = header.tensors

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


def _map_file(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 8:
                raise GGUFError(f"{path}: not a GGUF file (too short)")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory, not a GGUF file") from None
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    except OSError as err:  # permissions, a file in place of a directory, a failed map
        raise GGUFError(f"{path}: cannot open it ({err.strerror or err})") from None


class _Header:
    """Parses the header of a mapped GGUF file: metadata, tensor directory, data views."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data = data
        self.path = path
        if data[:4] != MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (it does not start with the magic bytes 'GGUF')")
        self.offset = 4
        version = self.scalar("<I")
        if version != VERSION:
            if version & 0xFFFF == 0:
                raise GGUFError(f"{path}: big-endian GGUF files are not supported")
            raise GGUFError(
                f"{path}: unsupported GGUF version {version} (only version {VERSION} is supported)"
            )
        n_tensors, n_keys = self.scalar("<Q"), self.scalar("<Q")
        self.metadata = {}
        for _ in range(n_keys):
            key = self.string()
            self.metadata[key] = self.value(self.value_type(key), key)
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        power_of_two = isinstance(alignment, int) and alignment > 0 and not alignment & (alignment - 1)
        if not power_of_two:
            raise GGUFError(f"{path}: general.alignment is {alignment!r}, not a power of two")
        self.alignment = alignment
        directory = [self.tensor_entry() for _ in range(n_tensors)]
        self.data_start = self.offset + -self.offset % self.alignment  # tensor data begins aligned
        self.tensors = {}
        for name, kind, dims, offset in directory:
            if name in self.tensors:
                raise GGUFError(f"{path}: tensor {name!r} appears twice")
            self.tensors[name] = self.tensor(name, kind, dims, offset)

    def take(self, size: int) -> int:
        """Advance past ``size`` header bytes; their offset."""
        at = self.offset
        if at + size > len(self.data):
            raise self.truncated()
        self.offset += size
        return at

    def truncated(self) -> GGUFError:
        return GGUFError(f"{self.path}: truncated file: the header runs past the end of the file")

    def scalar(self, fmt: str) -> int | float | bool:
        size = struct.calcsize(fmt)
        return struct.unpack_from(fmt, self.data, self.take(size))[0]

    def string(self) -> str:
        size = self.scalar("<Q")
        at = self.take(size)
        return self.data[at : at + size].decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """``count`` consecutive strings (the vocabulary: kept to a tight loop)."""
        data, at, end, out = self.data, self.offset, len(self.data), []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if at + 8 > end:
                raise self.truncated()
            (size,) = unpack(data, at)
            at += 8
            if at + size > end:
                raise self.truncated()
            out.append(data[at : at + size].decode("utf-8", errors="replace"))
            at += size
        self.offset = at
        return out

    def value_type(self, key: str) -> GGUFValueType:
        type_id = self.scalar("<I")
        try:
            return GGUFValueType(type_id)
        except ValueError:
            raise GGUFError(f"{self.path}: metadata {key!r} has unknown value type {type_id}") from None

    def value(self, vtype: GGUFValueType, key: str) -> object:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            element = self.value_type(key)
            count = self.scalar("<Q")
            if element == GGUFValueType.STRING:
                return self.strings(count)
            if element in SCALAR_FORMATS:
                dtype = np.dtype(SCALAR_FORMATS[element])
                at = self.take(count * dtype.itemsize)
                return np.frombuffer(self.data, dtype, count, at).tolist()
            return [self.value(element, key) for _ in range(count)]
        return self.scalar(SCALAR_FORMATS[vtype])

    def tensor_entry(self) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
        name = self.string()
        n_dims = self.scalar("<I")
        dims = tuple(self.scalar("<Q") for _ in range(n_dims))
        type_id = self.scalar("<I")
        offset = self.scalar("<Q")
        try:
            return name, GGMLQuantizationType(type_id), dims, offset
        except ValueError:
            raise GGUFError(f"{self.path}: tensor {name!r} has unknown type id {type_id}") from None

    def tensor(self, name: str, kind: GGMLQuantizationType, dims: tuple[int, ...], offset: int) -> TensorInfo:
        """The view of one tensor, ``offset`` bytes into the data section."""
        if offset % self.alignment:
            raise GGUFError(
                f"{self.path}: tensor {name!r} starts at data offset {offset}, "
                f"not a multiple of the alignment {self.alignment}"
            )
        shape = tuple(reversed(dims))
        try:
            n_bytes = tensor_nbytes(kind, shape)
        except ValueError as err:
            raise GGUFError(f"{self.path}: tensor {name!r}: {err}") from None
        start = self.data_start + offset
        end = start + n_bytes
        if end > len(self.data):
            raise GGUFError(
                f"{self.path}: truncated file: tensor {name!r} ends at byte {end} but the file has "
                f"{len(self.data)} bytes ({end - len(self.data)} bytes missing)"
            )
        if kind in NUMPY_DTYPES:
            dtype, view_shape = NUMPY_DTYPES[kind], shape
        else:
            dtype = np.dtype(np.uint8)
            view_shape = (*shape[:-1], row_nbytes(kind, shape[-1])) if shape else (n_bytes,)
        array = np.frombuffer(self.data, dtype, n_bytes // dtype.itemsize, start).reshape(view_shape)
        return TensorInfo(name, kind, shape, array)
