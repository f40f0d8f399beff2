"""Random but valid stored data in every supported GGML format, for tests and benchmarks.

The arrays come in the form gguf.GGUFReader gives back and QTensor.from_numpy accepts (see
``dwarfstar.quant.quantize``).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dwarfstar.quant.ops import dequantize
from dwarfstar.quant.quantize import quantize
from dwarfstar.quant.tensor import QTensor, bytes_per_row, is_block_kind, storage_shape

Q = GGMLQuantizationType

# Byte offsets of the fp16 scales in each block of the block formats that have them (from ggml's
# block structs; the dequantization tests set extreme scales through this table too).
HALF_SCALE_OFFSETS = {
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
    kind: GGMLQuantizationType,
    shape: tuple[int, ...],
    generator: np.random.Generator,
    std: float | None = None,
) -> np.ndarray:
    """Random but valid stored data of logical `shape`: every value finite and of modest size.

    Block formats get random bytes with their scales replaced by fp16 values with |d| in
    [1e-3, 1e-1] (a tenth of that for _SMALL_SCALE_KINDS; MXFP4: exponents for scales in
    [2^-10, 2^-4]; NVFP4: e4m3 scales in [2^-7, 2^-2]); float kinds get N(0, 0.1^2) values.

    With ``std``, the values' root mean square is brought to about ``std`` (the scales of the
    formats in HALF_SCALE_OFFSETS and MXFP4's exponents are multiplied): a code times sub-scale
    reaches 43 * 3.9 in IQ2_XXS and 15 * 63 in Q4_K, so the plain ranges above give matrices
    tens to hundreds of times larger than 1/sqrt(fan_in), and a model built of them multiplies
    its activations, and its float32 rounding, by as much.
    """
    kind = GGMLQuantizationType(kind)
    if not is_block_kind(kind):
        return quantize(
            (0.1 if std is None else std) * generator.standard_normal(shape, dtype=np.float32), kind
        )
    blocks = _random_block_bytes(kind, shape, generator)
    if std is not None:
        _rescale(kind, shape, blocks, std)
    return blocks.reshape(storage_shape(kind, shape))


def _random_block_bytes(
    kind: GGMLQuantizationType, shape: tuple[int, ...], generator: np.random.Generator
) -> np.ndarray:
    """Random blocks (..., blocks per row, block size) with valid scales, as random_blocks describes."""
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
    elif kind in HALF_SCALE_OFFSETS:
        for offset in HALF_SCALE_OFFSETS[kind]:
            blocks[..., offset : offset + 2] = _random_scales(blocks_shape[:-1], generator, top)
    else:
        raise NotImplementedError(f"random data for {kind.name} is not supported")
    return blocks


def _rescale(kind: GGMLQuantizationType, shape: tuple[int, ...], blocks: np.ndarray, std: float) -> None:
    """Multiply ``blocks``' scales in place so that their values' root mean square is about ``std``."""
    values = dequantize(QTensor.from_numpy(kind, shape, blocks.reshape(storage_shape(kind, shape))))
    rms = float(values.double().square().mean().sqrt())
    if rms == 0:
        return
    factor = std / rms
    if kind == Q.MXFP4:  # a power-of-two scale: shift the exponent byte
        shift = round(np.log2(factor))
        blocks[..., 0] = np.clip(blocks[..., 0].astype(np.int32) + shift, 1, 254).astype(np.uint8)
    elif kind in HALF_SCALE_OFFSETS:
        for offset in HALF_SCALE_OFFSETS[kind]:
            field = blocks[..., offset : offset + 2]
            scaled = field.copy().view(np.float16).astype(np.float32) * factor
            blocks[..., offset : offset + 2] = scaled.astype(np.float16).view(np.uint8)


def _random_scales(shape: tuple[int, ...], generator: np.random.Generator, top: float) -> np.ndarray:
    """fp16 scales, log-uniform in magnitude over [top / 100, top] with random signs, as bytes (..., 2)."""
    magnitude = np.exp(generator.uniform(np.log(top / 100), np.log(top), size=shape))
    sign = generator.choice(np.array([-1.0, 1.0]), size=shape)
    return (sign * magnitude).astype(np.float16)[..., None].view(np.uint8)
