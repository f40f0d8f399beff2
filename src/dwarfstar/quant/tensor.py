"""QTensor: a weight exactly as the GGUF file stores it, without copying it out of the mmap."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

from dwarfstar.gguf import container
from dwarfstar.gguf.container import row_nbytes as bytes_per_row  # re-exported by dwarfstar.quant
from dwarfstar.gguf.container import tensor_nbytes

# Kinds stored one value per element, held as a typed tensor of the logical shape: the numpy
# dtype their bytes are viewed as (the container's) and the torch dtype. numpy has no bfloat16,
# so BF16 is viewed as its int16 bit patterns, then as torch.bfloat16.
_TORCH_DTYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
    GGMLQuantizationType.I32: torch.int32,
}
_STORAGE_DTYPES: dict[GGMLQuantizationType, tuple[np.dtype, torch.dtype]] = {
    kind: (np.dtype(np.int16) if kind == GGMLQuantizationType.BF16 else container.NUMPY_DTYPES[kind], dtype)
    for kind, dtype in _TORCH_DTYPES.items()
}


def is_block_kind(kind: GGMLQuantizationType) -> bool:
    """True for the packed formats (Q8_0, Q2_K, ...), stored as uint8 rows of blocks."""
    return kind not in _STORAGE_DTYPES


def storage_shape(kind: GGMLQuantizationType, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of `QTensor.data` for a tensor of logical `shape`."""
    if is_block_kind(kind):
        return (*shape[:-1], bytes_per_row(kind, shape[-1]))
    return shape


@dataclass(frozen=True, eq=False)
class QTensor:
    """A weight as stored in the file: raw GGML blocks, usually a view over the mmap.

    `shape` is the logical shape in torch order (..., rows, cols), cols being GGUF's ne0 (the
    contiguous dimension). `data` is a typed tensor of `shape` for element kinds (F32, F16, I32,
    BF16 as torch.bfloat16) and a uint8 tensor (..., rows, bytes_per_row) for block kinds.
    The data may be a read-only mapping of the file: never modify it in place.
    """

    kind: GGMLQuantizationType
    shape: tuple[int, ...]
    data: torch.Tensor

    @classmethod
    def from_numpy(cls, kind: GGMLQuantizationType, shape: tuple[int, ...], array: np.ndarray) -> QTensor:
        """Wrap the bytes of `array` (e.g. gguf.GGUFReader's ReaderTensor.data) without copying them."""
        kind = GGMLQuantizationType(kind)
        shape = tuple(int(n) for n in shape)
        if not array.flags.c_contiguous:
            raise ValueError(f"{kind.name} tensor of shape {shape}: the array is not contiguous")
        expected = tensor_nbytes(kind, shape)
        if array.nbytes != expected:
            raise ValueError(
                f"{kind.name} tensor of shape {shape} takes {expected} bytes, "
                f"the array has {array.nbytes} ({array.dtype} {array.shape})"
            )
        numpy_dtype, torch_dtype = _STORAGE_DTYPES.get(kind, (np.dtype(np.uint8), torch.uint8))
        array = array.reshape(-1).view(numpy_dtype).reshape(storage_shape(kind, shape))
        with warnings.catch_warnings():
            # A read-only memmap gives a read-only tensor; torch warns, and we never write to it.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(array)
        return cls(kind, shape, data.view(torch_dtype))

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def __getitem__(self, index: int) -> QTensor:
        """The `index`-th matrix of a stacked tensor (e.g. one expert), as a view."""
        return QTensor(self.kind, self.shape[1:], self.data[index])
