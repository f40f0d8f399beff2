"""Quantizers (bit-exact with gguf-py's `gguf.quants.quantize`) and random valid stored data.

Both return arrays in the form gguf.GGUFReader gives back and QTensor.from_numpy accepts: typed
arrays for F32 and F16, uint8 (..., rows, bytes_per_row) for BF16 and the block formats.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .tensor import bytes_per_row, is_block_kind, storage_shape

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
QUANTIZABLE_KINDS = (Q.F32, *_QUANTIZERS)

# Values quantized at a time: small enough for the temporaries to stay in cache, which is
# several times faster than whole-array numpy passes on large matrices.
_BAND_VALUES = 1 << 17


def quantize(values: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    """float32 values (..., cols) -> stored form of `kind`."""
    kind = GGMLQuantizationType(kind)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if kind == Q.F32:
        return values
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


# Byte offsets of the fp16 scales in each block of the block formats that have them.
_HALF_SCALE_OFFSETS = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
    Q.TQ1_0: (52,),
    Q.TQ2_0: (64,),
    Q.IQ1_S: (0,),
    Q.IQ2_XXS: (0,),
    Q.IQ2_XS: (0,),
    Q.IQ2_S: (0,),
    Q.IQ3_XXS: (0,),
    Q.IQ3_S: (0,),
    Q.IQ4_NL: (0,),
    Q.IQ4_XS: (0,),
}
# Formats whose codes times sub-scales reach several thousand (Q5_K: 31 * 63, Q6_K: 32 * 128,
# IQ4_XS: 127 * 32) get scales ten times smaller, so that every format's values stay modest.
_SMALL_SCALE_KINDS = (Q.Q5_K, Q.Q6_K, Q.IQ4_XS)
# IQ1_M keeps its fp16 scale in the top nibbles of the uint16s at these offsets, lowest nibble first.
_IQ1_M_SCALE_WORDS = (48, 50, 52, 54)


def random_blocks(
    kind: GGMLQuantizationType, shape: tuple[int, ...], generator: np.random.Generator
) -> np.ndarray:
    """Random but valid stored data of logical `shape`: every value finite and of modest size.

    Block formats get random bytes with their scales replaced by fp16 values with |d| in
    [1e-3, 1e-1] (a tenth of that for _SMALL_SCALE_KINDS; MXFP4: exponents for scales in
    [2^-10, 2^-4]; NVFP4: e4m3 scales in [2^-7, 2^-2]); float kinds get N(0, 0.1^2) values.
    """
    kind = GGMLQuantizationType(kind)
    if not is_block_kind(kind):
        return quantize(0.1 * generator.standard_normal(shape, dtype=np.float32), kind)
    type_size = GGML_QUANT_SIZES[kind][1]
    blocks_shape = (*shape[:-1], bytes_per_row(kind, shape[-1]) // type_size, type_size)
    blocks = generator.integers(0, 256, size=blocks_shape, dtype=np.uint8)
    top = 1e-2 if kind in _SMALL_SCALE_KINDS else 1e-1
    if kind == Q.MXFP4:
        blocks[..., 0] = generator.integers(117, 124, size=blocks_shape[:-1], dtype=np.uint8)
    elif kind == Q.NVFP4:  # exponent field 1-5, any mantissa
        blocks[..., :4] = generator.integers(8, 48, size=(*blocks_shape[:-1], 4), dtype=np.uint8)
    elif kind == Q.IQ1_M:
        bits = _random_scales(blocks_shape[:-1], generator, top).view(np.uint16)[..., 0]
        for nibble, offset in enumerate(_IQ1_M_SCALE_WORDS):
            high = blocks[..., offset + 1] & 0x0F
            blocks[..., offset + 1] = high | (((bits >> (4 * nibble)) & 0xF) << 4).astype(np.uint8)
    elif kind in _HALF_SCALE_OFFSETS:
        for offset in _HALF_SCALE_OFFSETS[kind]:
            blocks[..., offset : offset + 2] = _random_scales(blocks_shape[:-1], generator, top)
    else:
        raise NotImplementedError(f"random data for {kind.name} is not supported")
    return blocks.reshape(storage_shape(kind, shape))


def _random_scales(shape: tuple[int, ...], generator: np.random.Generator, top: float) -> np.ndarray:
    """fp16 scales, log-uniform in magnitude over [top / 100, top] with random signs, as bytes (..., 2)."""
    magnitude = np.exp(generator.uniform(np.log(top / 100), np.log(top), size=shape))
    sign = generator.choice(np.array([-1.0, 1.0]), size=shape)
    return (sign * magnitude).astype(np.float16)[..., None].view(np.uint8)
