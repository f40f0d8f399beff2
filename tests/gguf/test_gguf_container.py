"""Tensor byte sizes: one rule for the reader, the writer and the quantized tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import quant_shape_to_byte_shape

from dwarfstar.gguf.container import NUMPY_DTYPES, row_nbytes, tensor_nbytes
from dwarfstar.quant import QTensor

# Bytes of one row of 256 values, from the GGML block layouts (values per block, bytes per block).
ROW_OF_256 = {
    T.F32: 1024,
    T.F16: 512,
    T.BF16: 512,
    T.I32: 1024,
    T.Q8_0: 8 * 34,  # 32 int8 + an f16 scale
    T.Q2_K: 84,
    T.Q4_K: 144,
    T.IQ2_XXS: 66,
}


@pytest.mark.parametrize("kind", list(ROW_OF_256))
def test_row_sizes_follow_the_block_layouts(kind: T) -> None:
    assert row_nbytes(kind, 256) == ROW_OF_256[kind]
    assert tensor_nbytes(kind, (3, 2, 256)) == 6 * ROW_OF_256[kind]
    assert tensor_nbytes(kind, (256,)) == ROW_OF_256[kind]


@pytest.mark.parametrize("kind", list(GGML_QUANT_SIZES))
def test_sizes_agree_with_gguf_py(kind: T) -> None:
    shape = (2, 3, GGML_QUANT_SIZES[kind][0] * 4)
    assert tensor_nbytes(kind, shape) == int(np.prod(quant_shape_to_byte_shape(shape, kind)))


def test_rows_that_do_not_split_into_blocks() -> None:
    with pytest.raises(ValueError, match="a row of 48 values is not a whole number of Q4_K blocks of 256"):
        tensor_nbytes(T.Q4_K, (2, 48))


def test_element_dtypes_have_the_kinds_size() -> None:
    for kind, dtype in NUMPY_DTYPES.items():
        assert row_nbytes(kind, 1) == dtype.itemsize, kind.name


def test_quantized_tensors_use_the_same_sizes() -> None:
    raw = np.zeros(tensor_nbytes(T.Q4_K, (2, 512)), dtype=np.uint8)
    tensor = QTensor.from_numpy(T.Q4_K, (2, 512), raw)
    assert tensor.data.shape == (2, row_nbytes(T.Q4_K, 512)) and tensor.data.dtype == torch.uint8
    with pytest.raises(ValueError, match="takes 576 bytes"):
        QTensor.from_numpy(T.Q4_K, (2, 512), raw[:-1])
