"""Writing a GGUF file: typed metadata, then tensors already in stored form, one at a time.

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
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

ARCHITECTURE_KEY = "general.architecture"
ALIGNMENT_KEY = "general.alignment"
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, stored kind and logical shape in torch order."""

    name: str
    kind: GGMLQuantizationType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.kind]
        if self.shape[-1] % block_size:
            raise ValueError(
                f"tensor {self.name!r}: rows of {self.shape[-1]} values do not split into "
                f"{self.kind.name} blocks of {block_size}"
            )
        return int(np.prod(self.shape, dtype=np.int64)) // block_size * type_size


def value_type(key: str, value: object) -> tuple[GGUFValueType, GGUFValueType | None]:
    """The GGUF type (and array element type) a metadata value is written with."""
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError(f"metadata {key}: an empty array has no GGUF type")
        element, _ = value_type(key, value[0])
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

    ``metadata`` must hold ``general.architecture``; ``general.alignment`` (default 32) sets
    the data alignment. Use as a context manager: the file is closed on exit, and removed if
    the block raised or did not write every declared tensor.
    """

    def __init__(
        self, path: str | os.PathLike[str], metadata: dict[str, object], tensors: Sequence[TensorSpec]
    ) -> None:
        self.path = Path(path)
        metadata = dict(metadata)
        if ARCHITECTURE_KEY not in metadata:
            raise ValueError(f"metadata must name {ARCHITECTURE_KEY}")
        self._writer = gguf.GGUFWriter(None, str(metadata.pop(ARCHITECTURE_KEY)))
        self._writer.add_custom_alignment(int(metadata.pop(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)))
        for key, value in metadata.items():
            value = _plain(value)
            self._writer.add_key_value(key, value, *value_type(key, value))
        self._pending = list(tensors)
        for spec in self._pending:
            # The dtype only matters to gguf-py when raw_dtype is None; shape is the logical one.
            self._writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), spec.nbytes, spec.kind)

    def __enter__(self) -> GGUFFileWriter:
        self._writer.write_header_to_file(self.path)
        self._writer.write_kv_data_to_file()
        self._writer.write_ti_data_to_file()
        (self._out,) = self._writer.fout  # type: ignore[misc]
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._writer.close()
        if exc_type is not None or self._pending:
            self.path.unlink(missing_ok=True)
        if exc_type is None and self._pending:
            raise ValueError(f"{self.path}: tensor {self._pending[0].name!r} was declared but never written")

    def write_tensor(self, name: str, parts: np.ndarray | Iterable[np.ndarray]) -> None:
        """The stored bytes of the next declared tensor, whole or as consecutive parts."""
        if not self._pending:
            raise ValueError(f"tensor {name!r} was not declared")
        spec = self._pending[0]
        if spec.name != name:
            raise ValueError(f"tensor {name!r} written out of order: {spec.name!r} comes next")
        self._pad()
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

    def _pad(self) -> None:
        alignment = self._writer.data_alignment
        self._out.write(bytes(-self._out.tell() % alignment))


def _plain(value: object) -> object:
    """numpy scalars as the Python values they hold; tuples as lists."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value
