"""Quantizers: F16, BF16 and Q8_0 bit-exact with gguf-py's `gguf.quants.quantize`; Q2_K, Q4_K and
IQ2_XXS search for their scales (compiled kernels in `quantizers/`) and take an optional importance
per column.

They return arrays in the form gguf.GGUFReader gives back and QTensor.from_numpy accepts: typed
arrays for F32 and F16, uint8 (..., rows, bytes_per_row) for BF16 and the block formats.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType

from .quantizers import SEARCHED_KINDS, quantize_rows
from .tensor import bytes_per_row

Q = GGMLQuantizationType


def _f16(rows: np.ndarray) -> np.ndarray:
    return rows.astype(np.float16).view(np.uint8)


def _bf16(rows: np.ndarray) -> np.ndarray:
    """Round to nearest even on the bit patterns; NaNs are made quiet first, as in ggml."""
    bits = rows.view(np.uint32)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    bits = np.where(is_nan, (bits & 0xFFFF0000) | 0x00400000, bits)
    # Cannot overflow: only NaN bit patterns are within 0x8000 of 2**32, and they now end in 0x0000.
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).view(np.uint8)


def _q8_0(rows: np.ndarray) -> np.ndarray:
    """Blocks of 32: d = max|x| / 127 stored as fp16, q = x / d rounded half away from zero."""
    blocks = rows.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    scaled = blocks * inverse
    magnitude = np.abs(scaled)
    whole = np.floor(magnitude)
    q = np.copysign(whole + (magnitude - whole >= 0.5), scaled).astype(np.int8)
    out = np.empty((blocks.shape[0], 34), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(rows.shape[0], -1)


# Row quantizers: float32 rows (n, cols) -> stored bytes (n, bytes_per_row).
_QUANTIZERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    Q.F16: _f16,
    Q.BF16: _bf16,
    Q.Q8_0: _q8_0,
}
QUANTIZABLE_KINDS = (Q.F32, *_QUANTIZERS)  # bit-exact with gguf-py; SEARCHED_KINDS apart

# Values quantized at a time: small enough for the temporaries to stay in cache, which is
# several times faster than whole-array numpy passes on large matrices.
_BAND_VALUES = 1 << 17


def quantize(
    values: np.ndarray,
    kind: GGMLQuantizationType,
    importance: np.ndarray | None = None,
    threads: int = 1,
) -> np.ndarray:
    """float32 values (..., cols) -> stored form of `kind`.

    `importance` (Q2_K, Q4_K, IQ2_XXS only; others ignore it): one weight per column, (cols,), or
    one vector per matrix of a stack, (..., cols) for values (..., rows, cols). `threads` splits
    the searched kinds' rows across threads.
    """
    kind = GGMLQuantizationType(kind)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if kind == Q.F32:
        return values
    if kind in SEARCHED_KINDS:
        return _quantize_searched(values, kind, importance, threads)
    quantizer = _QUANTIZERS.get(kind)
    if quantizer is None:
        raise NotImplementedError(f"quantizing to {kind.name} is not supported")
    cols = values.shape[-1]
    rows = values.reshape(-1, cols)
    out = np.empty((rows.shape[0], bytes_per_row(kind, cols)), dtype=np.uint8)
    band = max(1, _BAND_VALUES // cols)
    for start in range(0, rows.shape[0], band):
        out[start : start + band] = quantizer(rows[start : start + band])
    if kind == Q.F16:
        out = out.view(np.float16)
    return out.reshape(*values.shape[:-1], -1)


def _quantize_searched(
    values: np.ndarray, kind: GGMLQuantizationType, importance: np.ndarray | None, threads: int
) -> np.ndarray:
    cols = values.shape[-1]
    matrices = values.reshape(-1, values.shape[-2] if values.ndim > 1 else 1, cols)
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float32)
        importance = np.broadcast_to(importance.reshape(-1, cols), (matrices.shape[0], cols))
    out = [
        quantize_rows(kind, matrix, None if importance is None else importance[i], threads)
        for i, matrix in enumerate(matrices)
    ]
    return np.stack(out).reshape(*values.shape[:-1], -1)
