"""Importance matrices in llama.cpp's two file formats, so files made by either tool interchange.

An imatrix holds, for each weight (``blk.3.ffn_gate_exps.weight``), the sum of squared input
activations per input column and the number of inputs summed, per matrix of the tensor (one per
routed expert, or one): the mean is the importance the quantizers weigh columns by.

* GGUF (``llama-imatrix``'s default): ``general.type = "imatrix"``, ``imatrix.datasets``
  (strings), ``imatrix.chunk_count``, ``imatrix.chunk_size``; per weight two F32 tensors,
  ``NAME.in_sum2`` (matrices, cols) and ``NAME.counts`` (matrices, 1).
* Legacy ``.dat`` (what ds4 publishes): i32 entry count; per entry i32 name length, the name,
  i32 calls, i32 value count, f32 values (the mean times the calls); then i32 chunk count and
  the dataset path (i32 length and bytes).

A matrix that never saw an input has importance 1 everywhere, as in llama.cpp.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from dwarfstar.gguf.reader import GGUFError, GGUFFile
from dwarfstar.gguf.writer import GGUFFileWriter, TensorSpec

SUMS, COUNTS = ".in_sum2", ".counts"


class ImatrixError(ValueError):
    """The file is not an importance matrix we can read, or does not fit the model."""


@dataclass
class Imatrix:
    """Per weight name: sums of squared activations (matrices, cols) and input counts (matrices,)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def add(self, name: str, squares: np.ndarray, counts: np.ndarray) -> None:
        """Accumulate ``squares`` (matrices, cols), summed over ``counts`` (matrices,) inputs."""
        if name not in self.sums:
            self.sums[name] = np.zeros(squares.shape, dtype=np.float64)
            self.counts[name] = np.zeros(squares.shape[0], dtype=np.int64)
        self.sums[name] += squares
        self.counts[name] += np.asarray(counts, dtype=np.int64)

    def importance(self, name: str) -> np.ndarray | None:
        """The mean squared activation (matrices, cols) float32 of weight ``name``; None if absent."""
        if name not in self.sums:
            return None
        counts = self.counts[name][:, None]
        mean = np.divide(self.sums[name], counts, out=np.ones_like(self.sums[name]), where=counts > 0)
        return mean.astype(np.float32)


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """An imatrix in either format (GGUF by its magic, else legacy .dat)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ImatrixError(f"{path}: {err.strerror}") from None
    return _read_gguf(path) if magic == b"GGUF" else _read_dat(path)


def _read_gguf(path: Path) -> Imatrix:
    try:
        file = GGUFFile(path)
    except GGUFError as err:
        raise ImatrixError(str(err)) from None
    if file.metadata.get("general.type") != "imatrix":
        raise ImatrixError(f"{path}: a GGUF file, but not an imatrix (general.type is not 'imatrix')")
    result = Imatrix(
        datasets=list(file.metadata.get("imatrix.datasets", [])),
        chunk_count=int(file.metadata.get("imatrix.chunk_count", 0)),
        chunk_size=int(file.metadata.get("imatrix.chunk_size", 0)),
    )
    for tensor_name, info in file.tensors.items():
        if not tensor_name.endswith(SUMS):
            continue
        name = tensor_name.removesuffix(SUMS)
        counts = file.tensors.get(name + COUNTS)
        if counts is None:
            raise ImatrixError(f"{path}: {tensor_name} has no {name + COUNTS} beside it")
        sums = np.array(info.data, dtype=np.float64).reshape(-1, info.shape[-1])
        result.sums[name] = sums
        result.counts[name] = np.array(counts.data, dtype=np.float64).reshape(-1).astype(np.int64)
        if result.counts[name].shape[0] != sums.shape[0]:
            raise ImatrixError(f"{path}: {name} has {sums.shape[0]} matrices but {counts.shape} counts")
    return result


def _read_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    offset = 0

    def take(fmt: str) -> tuple:
        nonlocal offset
        size = struct.calcsize(fmt)
        if offset + size > len(data):
            raise ImatrixError(f"{path}: not an imatrix file (truncated legacy .dat, or another format)")
        values = struct.unpack_from(fmt, data, offset)
        offset += size
        return values

    result = Imatrix()
    (entries,) = take("<i")
    if entries < 0 or entries > len(data) // 12:
        raise ImatrixError(f"{path}: not an imatrix file")
    for _ in range(entries):
        (length,) = take("<i")
        name = take(f"<{length}s")[0].decode("utf-8", errors="replace")
        calls, count = take("<ii")
        values = np.array(take(f"<{count}f"), dtype=np.float64)
        # the values are means times the calls; one call stands for the whole mean
        result.sums[name] = (values / max(calls, 1)).reshape(1, -1)
        result.counts[name] = np.ones(1, dtype=np.int64)
    if offset + 4 <= len(data):
        (result.chunk_count,) = take("<i")
        if offset + 4 <= len(data):
            (length,) = take("<i")
            result.datasets = [take(f"<{length}s")[0].decode("utf-8", errors="replace")]
    return result


def write_imatrix(path: str | os.PathLike[str], imatrix: Imatrix) -> None:
    """Write ``imatrix`` in llama.cpp's GGUF format (written to ``path``.part, then renamed)."""
    path = Path(path)
    metadata: dict[str, object] = {
        "general.architecture": "deepseek4",
        "general.type": "imatrix",
        "imatrix.chunk_count": imatrix.chunk_count,
        "imatrix.chunk_size": imatrix.chunk_size,
    }
    if imatrix.datasets:
        metadata["imatrix.datasets"] = list(imatrix.datasets)
    specs, arrays = [], []
    for name in sorted(imatrix.sums):
        sums = np.asarray(imatrix.sums[name], dtype=np.float32)
        counts = np.asarray(imatrix.counts[name], dtype=np.float32).reshape(-1, 1)
        specs += [
            TensorSpec(name + SUMS, GGMLQuantizationType.F32, sums.shape),
            TensorSpec(name + COUNTS, GGMLQuantizationType.F32, counts.shape),
        ]
        arrays += [sums, counts]
    partial = path.with_name(path.name + ".part")
    try:
        with GGUFFileWriter(partial, metadata, specs) as writer:
            for spec, array in zip(specs, arrays, strict=True):
                writer.write_tensor(spec.name, array)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
