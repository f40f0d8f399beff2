"""Dequantization of the GGML formats, in torch, bit-exact with gguf-py's `gguf.quants.dequantize`.

Every format gguf-py can dequantize is here. Each block decoder reads a uint8 tensor of blocks
(n, bytes per block) and writes their float32 values into `out` (n, values per block). Tensors are
decoded a band of blocks at a time so that the temporaries stay in cache, and the decoders make as
few passes over a band as they can: bit fields are cut out of whole int32 words (four bytes per
operation), grid formats look up whole rows of int8 values packed into one integer, and codes
become float32 only once, in the final copy into `out`.

Multi-byte fields are little-endian, read by viewing the bytes as wider types, so like gguf-py this
assumes a little-endian host. The float operations follow ggml's order (e.g. `(d * scale) * q -
dmin * min`), which is what makes the results bit-exact; where a decoder reorders a product, the
comment says why the result is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import gguf.quants
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType

# Values decoded at a time: big enough to amortize the fixed cost of each torch operation (several
# microseconds), small enough for the band (4 MiB of float32) and its temporaries to stay in cache.
BAND_VALUES = 1 << 20


def _aligned(packed: torch.Tensor, size: int) -> torch.Tensor:
    """packed (n, k) bytes, copied if needed so that they can be viewed as elements of `size` bytes."""
    if packed.storage_offset() % size or packed.stride(0) % size:
        return packed.clone(memory_format=torch.contiguous_format)
    return packed


def _halves(blocks: torch.Tensor, offset: int, count: int = 1) -> torch.Tensor:
    """The `count` fp16 values from byte `offset` of each block, as float32 of shape (n, count)."""
    halves = _aligned(blocks, 2).view(torch.float16)
    return halves[:, offset // 2 : offset // 2 + count].float()


def _words(blocks: torch.Tensor, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` little-endian integers of `dtype` from byte `offset` of each block, widened to int32
    without their sign (uint16 and uint32 fields read as int16/int32 would be negative)."""
    size = torch.empty((), dtype=dtype).element_size()
    words = _aligned(blocks[:, offset : offset + count * size], size).view(dtype).int()
    return words.bitwise_and_(0xFFFF) if size == 2 else words


def _fields(packed: torch.Tensor, bits: int, run: int) -> torch.Tensor:
    """Split the bytes of packed (n, k) into bits-wide fields, lowest first, grouped per run of `run`
    bytes: the run's first fields, then its second fields, ...: uint8 (n, k // run, 8 // bits, run).

    Works on int32 words (four bytes per element), one shift by a constant per field, then
    interleaves the runs with one stack: shifting by a tensor of amounts, or writing the fields
    into strided slices, would make torch fall back to slow elementwise loops.
    """
    n, k = packed.shape
    words = _aligned(packed, 4).view(torch.int32).view(n, k // run, run // 4)
    fields = torch.stack([words >> (bits * i) for i in range(8 // bits)], dim=2)
    return fields.bitwise_and_(int.from_bytes(bytes([(1 << bits) - 1]) * 4, "little")).view(torch.uint8)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Low then high nibbles of small bytes (n, k), such as packed scales: uint8 (n, 2 * k), in the
    order byte 0 low, byte 0 high, byte 1 low, ..."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """The bits of packed (n, k), lowest first within each byte: uint8 (n, 8 * k) of 0 and 1."""
    return _lookup(_bit_table(), packed, 8).view(torch.uint8).view(packed.shape[0], -1)


def _lookup(table: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """Rows `index` of a table of `width` int8 values per row, each row packed into one integer so
    that one lookup moves a whole row: int8 (*index.shape, width)."""
    if index.dtype not in (torch.int32, torch.int64):
        index = index.int()
    packed = table.to(index.device).index_select(0, index.reshape(-1))
    return packed.view(torch.int8).view(*index.shape, width)


def _packed(values: np.ndarray) -> torch.Tensor:
    """A table of small integers (entries, 4 or 8) as int8 rows packed into int32 or int64 each."""
    rows = np.ascontiguousarray(values.astype(np.int8))
    return torch.from_numpy(rows.view({4: np.int32, 8: np.int64}[rows.shape[1]]).reshape(-1))


@cache
def _bit_table() -> torch.Tensor:
    """Row b: the 8 bits of byte b, lowest first."""
    return _packed((np.arange(256)[:, None] >> np.arange(8)) & 1)


def sign_bits() -> np.ndarray:
    """Row b: the signs (+-1) of 8 values whose sign bits (1 = negative, lowest first) are byte b."""
    return 1 - 2 * ((np.arange(256)[:, None] >> np.arange(8)) & 1)


def parity_signs() -> np.ndarray:
    """Sign patterns (128, 8) of +-1: ggml's ksigns_iq2xs, used by IQ2_XXS, IQ2_XS and IQ3_XXS.

    Index bits 0-6 are the signs of values 0-6 (1 = negative); value 7's sign makes the number of
    negatives even, which is why 7 bits suffice.
    """
    index = np.arange(128)
    parity = ((index[:, None] >> np.arange(7)) & 1).sum(axis=1) & 1
    return sign_bits()[index | parity << 7]


def grid(kind: GGMLQuantizationType) -> np.ndarray:
    """The codebook of an IQ format as float32 (entries, values per entry), taken from gguf-py (a
    dependency) rather than copied: ggml's iq2xxs_grid, iq2xs_grid, iq2s_grid, iq3xxs_grid,
    iq3s_grid, iq1s_grid."""
    traits = getattr(gguf.quants, kind.name)
    traits.init_grid()
    return traits.grid.reshape(traits.grid_shape)


@cache
def _signed_grid_table(kind: GGMLQuantizationType) -> torch.Tensor:
    """Every grid point with every parity sign pattern, entry sign * points + point."""
    points = grid(kind)
    signed = parity_signs()[:, None, :] * points[None, :, :]
    return _packed(signed.reshape(128 * len(points), -1))


@cache
def _grid_table(kind: GGMLQuantizationType) -> torch.Tensor:
    """The codebook of ``kind``, one packed row per grid point."""
    return _packed(grid(kind))


@cache
def _sign_table(parity: bool) -> torch.Tensor:
    """Sign patterns by 7-bit parity index (``parity``) or by sign byte, one packed row each."""
    return _packed(parity_signs() if parity else sign_bits())


def _signed_points(
    kind: GGMLQuantizationType, points: torch.Tensor, signs: torch.Tensor, parity: bool
) -> torch.Tensor:
    """Grid points `points` (n, m) with sign patterns `signs` (indices or sign bytes, one per 8
    values): int8 (n, values). A sign flip never rounds, so signing first is exact."""
    width = grid(kind).shape[1]
    values = _lookup(_grid_table(kind), points, width).view(points.shape[0], -1)
    return values.mul_(_lookup(_sign_table(parity), signs, 8).view(points.shape[0], -1))


# --- The 32-value formats --------------------------------------------------------------------------


def q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """18 bytes -> 32 values: d (fp16) | q[16]: 4-bit codes, low nibbles are values 0-15, high
    nibbles 16-31. value = d * (q - 8)."""
    out.copy_(_fields(blocks[:, 2:], 4, 16).view(out.shape))
    out.sub_(8).mul_(_halves(blocks, 0))


def q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """20 bytes -> 32 values: d (fp16) | m (fp16) | q[16] as in Q4_0. value = d * q + m."""
    out.copy_(_fields(blocks[:, 4:], 4, 16).view(out.shape))
    out.mul_(_halves(blocks, 0)).add_(_halves(blocks, 2))


def _five_bit_codes(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 codes: 4-bit codes from q[16] as in Q4_0, the fifth bit of value i is bit i of the
    uint32 qh: uint8 (n, 32)."""
    n = low.shape[0]
    return _fields(low, 4, 16).view(n, 32) | (_bits(high) << 4)


def q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """22 bytes -> 32 values: d (fp16) | qh (uint32) | q[16]. value = d * (q - 16)."""
    out.copy_(_five_bit_codes(blocks[:, 6:], blocks[:, 2:6]))
    out.sub_(16).mul_(_halves(blocks, 0))


def q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """24 bytes -> 32 values: d (fp16) | m (fp16) | qh (uint32) | q[16]. value = d * q + m."""
    out.copy_(_five_bit_codes(blocks[:, 8:], blocks[:, 4:8]))
    out.mul_(_halves(blocks, 0)).add_(_halves(blocks, 2))


def q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """34 bytes -> 32 values: d (fp16) | q[32] (int8); value = q * d."""
    out.copy_(blocks[:, 2:].view(torch.int8))
    out.mul_(_halves(blocks, 0))


# The 16 values of IQ4_NL and IQ4_XS codes: ggml's kvalues_iq4nl.
_IQ4_VALUES = torch.tensor((-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)).float()

# FP4 E2M1 values by 4-bit code, bit 3 the sign: MXFP4 and NVFP4 blocks, the FP4 experts of
# DeepSeek's release and the simulated rounding of the indexer all read this one table.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Doubled so they are integers (the scale is halved to match, as in ggml); adding +0.0 turns
# code 8 into a plain zero, as ggml's integer table has it.
_MXFP4_VALUES = (2 * torch.tensor(E2M1_VALUES, dtype=torch.float32)).add_(0.0)


def _values_of(codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float32 values[codes] for uint8 codes (n, k)."""
    return values.to(codes.device).index_select(0, codes.reshape(-1).int()).view(codes.shape)


def iq4_nl(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """18 bytes -> 32 values: d (fp16) | q[16] as in Q4_0. value = d * kvalues[q]."""
    codes = _fields(blocks[:, 2:], 4, 16).view(out.shape)
    torch.mul(_values_of(codes, _IQ4_VALUES), _halves(blocks, 0), out=out)


def mxfp4(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """17 bytes -> 32 values: e (e8m0 exponent) | q[16]: 4-bit e2m1 codes, low nibbles are values
    0-15, high nibbles 16-31. value = 2^(e - 128) * doubled_e2m1[q], the scale subnormal for e < 2.
    """
    e = blocks[:, :1].int()
    half_scale = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23).view(torch.float32)
    codes = _fields(blocks[:, 1:], 4, 16).view(out.shape)
    torch.mul(_values_of(codes, _MXFP4_VALUES), half_scale, out=out)


@cache
def _ue4m3_half() -> torch.Tensor:
    """NVFP4's scales: the unsigned e4m3 byte (bias 7, bit 7 ignored) as float32, halved to match
    the doubled e2m1 values; 0x00 and 0x7F stand for zero."""
    code = np.arange(256)
    exponent, mantissa = (code >> 3) & 0xF, code & 7
    value = np.where(exponent == 0, mantissa * 2.0**-9, (1 + mantissa / 8) * 2.0 ** (exponent - 7.0))
    value[(code == 0) | (code == 0x7F)] = 0
    return torch.from_numpy((value / 2).astype(np.float32))


def nvfp4(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """36 bytes -> 64 values, in 4 groups of 16: d[4] (ue4m3) | q[32]: per group 8 bytes of 4-bit
    e2m1 codes, low nibbles are the group's values 0-7, high nibbles 8-15.
    value = d / 2 * doubled_e2m1[q]."""
    n = blocks.shape[0]
    scale = _values_of(blocks[:, :4], _ue4m3_half()).view(n, 4, 1)
    codes = _fields(blocks[:, 4:], 4, 8).view(n, 4, 16)
    torch.mul(_values_of(codes, _MXFP4_VALUES), scale, out=out.view(n, 4, 16))


# --- The 256-value K formats -----------------------------------------------------------------------


def q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """84 bytes -> 256 values, in 16 groups of 16.

    scales[16]: per group, low nibble = scale, high nibble = min | q[64]: 2-bit codes; byte
    32 * h + j holds, from its low bits up, values 128 * h + j, +32, +64, +96 | d (fp16) | dmin (fp16).
    value = (d * scale) * q - dmin * min.
    """
    n = blocks.shape[0]
    scales_and_mins = _fields(blocks[:, :16], 4, 16).view(n, 2, 16).float()
    scale, minimum = (_halves(blocks, 80, 2).view(n, 2, 1) * scales_and_mins).unsqueeze(-1).unbind(1)
    out.view(n, 2, 4, 32).copy_(_fields(blocks[:, 16:80], 2, 32))
    out.view(n, 16, 16).mul_(scale).sub_(minimum)


def q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """110 bytes -> 256 values, in 16 groups of 16.

    hmask[32]: bit i of byte j is the high bit of value 32 * i + j | q[64]: low 2 bits, laid out as
    Q2_K's codes | scales[12]: 16 6-bit scales, their low nibbles in bytes 0-7 (scale j in byte
    j % 8, low nibble for j < 8), their top 2 bits in bytes 8-11 (scale j at byte 8 + j % 4, bits
    2 * (j // 4)) | d (fp16). value = (d * (scale - 32)) * (q - 4 * (1 - high bit)).
    """
    n = blocks.shape[0]
    raw = blocks[:, 96:108]
    low = torch.cat([raw[:, :8] & 0xF, raw[:, :8] >> 4], dim=1)
    high = torch.cat([(raw[:, 8:] >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1)
    scale = (_halves(blocks, 108) * ((low | high << 4).float() - 32)).view(n, 16, 1)
    low, high = _fields(blocks[:, 32:96], 2, 32), _fields(blocks[:, :32], 1, 32)
    out.copy_(low.view(n, 256) | high.view(n, 256) << 2)
    out.sub_(4).view(n, 16, 16).mul_(scale)


def _k_scales_and_mins(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K and Q5_K: d * scale and dmin * min of the 8 groups of 32, each (n, 8, 1).

    d (fp16) | dmin (fp16) | 12 bytes of 6-bit scales and mins: bytes 0-3 hold scale j (low 6 bits)
    and the top bits of scale j+4, bytes 4-7 the same for the mins, bytes 8-11 the low 4 bits of
    scale j+4 (low nibble) and min j+4 (high nibble).
    """
    n = blocks.shape[0]
    low_scales, low_mins, high = blocks[:, 4:16].contiguous().view(n, 3, 4).unbind(1)
    scales = torch.cat([low_scales & 0x3F, (high & 0xF) | ((low_scales >> 2) & 0x30)], dim=-1)
    mins = torch.cat([low_mins & 0x3F, (high >> 4) | ((low_mins >> 2) & 0x30)], dim=-1)
    d, dmin = _halves(blocks, 0, 2).unbind(1)
    scale = (d.view(n, 1) * scales.float()).view(n, 8, 1)
    minimum = (dmin.view(n, 1) * mins.float()).view(n, 8, 1)
    return scale, minimum


def q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """144 bytes -> 256 values, in 8 groups of 32: the scales (see `_k_scales_and_mins`) | q[128]:
    4-bit codes; bytes 32 * k .. 32 * k + 31 hold group 2k in their low nibbles and group 2k+1 in
    their high nibbles. value = (d * scale) * q - dmin * min.
    """
    n = blocks.shape[0]
    scale, minimum = _k_scales_and_mins(blocks)
    out.view(n, 4, 2, 32).copy_(_fields(blocks[:, 16:], 4, 32))
    out.view(n, 8, 32).mul_(scale).sub_(minimum)


def q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """176 bytes -> 256 values, in 8 groups of 32: the scales (see `_k_scales_and_mins`) | qh[32]:
    bit i of byte j is the fifth bit of value 32 * i + j | q[128]: low 4 bits, laid out as Q4_K's.
    value = (d * scale) * q - dmin * min.
    """
    n = blocks.shape[0]
    scale, minimum = _k_scales_and_mins(blocks)
    low, high = _fields(blocks[:, 48:], 4, 32), _fields(blocks[:, 16:48], 1, 32)
    out.copy_(low.view(n, 256) | high.view(n, 256) << 4)
    out.view(n, 8, 32).mul_(scale).sub_(minimum)


def q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """210 bytes -> 256 values, in 16 groups of 16.

    ql[128]: low 4 bits; byte 64 * h + j holds value 128 * h + j (low nibble) and +64 (high) |
    qh[64]: high 2 bits; byte 32 * h + j holds, from its low bits up, values 128 * h + j, +32, +64,
    +96 | scales[16] (int8) | d (fp16). value = (d * scale) * (q - 32).
    """
    n = blocks.shape[0]
    scale = (_halves(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    low, high = _fields(blocks[:, :128], 4, 64), _fields(blocks[:, 128:192], 2, 32)
    out.copy_(low.view(n, 256) | high.view(n, 256) << 4)
    out.sub_(32).view(n, 16, 16).mul_(scale)


# --- The ternary formats ---------------------------------------------------------------------------


def tq1_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """54 bytes -> 256 values: qs[48] | qh[4] | d (fp16). Each byte packs 5 (qh: 4) base-3 digits
    as a fixed-point fraction: digit k of byte b is ((b * 3^k mod 256) * 3) >> 8.
    qs[0:32] hold values 32 * k + j (digit k of byte j), qs[32:48] values 160 + 16 * k + j, qh
    values 240 + 4 * k + j. value = d * (digit - 1).
    """
    n = blocks.shape[0]
    powers = torch.tensor((1, 3, 9, 27, 81), dtype=torch.int32, device=blocks.device)

    def digits(packed: torch.Tensor, count: int) -> torch.Tensor:
        shifted = (packed.int().unsqueeze(1) * powers[:count, None]).bitwise_and_(0xFF)
        return shifted.mul_(3).bitwise_right_shift_(8).view(n, -1)

    trits = [digits(blocks[:, :32], 5), digits(blocks[:, 32:48], 5), digits(blocks[:, 48:52], 4)]
    out.copy_(torch.cat(trits, dim=1))
    out.sub_(1).mul_(_halves(blocks, 52))


def tq2_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """66 bytes -> 256 values: q[64]: 2-bit codes laid out as Q2_K's | d (fp16). value = d * (q - 1)."""
    out.view(-1, 2, 4, 32).copy_(_fields(blocks[:, :64], 2, 32))
    out.sub_(1).mul_(_halves(blocks, 64))


# --- The codebook (IQ) formats ---------------------------------------------------------------------


def iq2_xxs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """66 bytes -> 256 values, in 8 groups of 32 (4 grid points of 8).

    d (fp16) | per group 8 bytes: 4 grid indices (uint8), then a uint32 whose bits 0-27 are four
    7-bit sign indices (one per grid point) and bits 28-31 the group scale s.
    value = (d * (0.5 + s) * 0.25) * grid * sign.
    """
    n = blocks.shape[0]
    groups = _aligned(blocks[:, 2:], 8).view(torch.int64)  # (n, 8): grid indices in bits 0-31, aux above
    s = (groups >> 60).bitwise_and_(0xF).float()
    scale = (_halves(blocks, 0) * (0.5 + s) * 0.25).view(n, 8, 1)
    # The four table indices of a group, 256 * sign + grid, assembled in the four 16-bit lanes of
    # an int64: each step ORs in a shifted copy and masks away all but the fields it moved apart.
    signs = (groups >> 32).bitwise_and_(0x0FFFFFFF)  # 7-bit fields at bits 0, 7, 14, 21
    signs = (signs | signs << 18).bitwise_and_(0x00003FFF00003FFF)  # at 0, 7, 32, 39
    signs = (signs | signs << 9).bitwise_and_(0x007F007F007F007F)  # at 0, 16, 32, 48
    points = groups & 0xFFFFFFFF  # bytes at 0, 8, 16, 24
    points = (points | points << 16).bitwise_and_(0x0000FFFF0000FFFF)  # at 0, 8, 32, 40
    points = (points | points << 8).bitwise_and_(0x00FF00FF00FF00FF)  # at 0, 16, 32, 48
    index = signs.bitwise_left_shift_(8).bitwise_or_(points).view(torch.int16).int()
    # (scale * grid) * sign == scale * (grid * sign) exactly: flipping a sign never rounds.
    values = out.view(n, 8, 32)
    values.copy_(_lookup(_signed_grid_table(Q.IQ2_XXS), index, 8).view(n, 8, 32))
    values.mul_(scale)


def _iq2_scales(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """IQ2_XS and IQ2_S: d (fp16, at byte 0) * (0.5 + s) * 0.25 for the 16 4-bit scales s of the
    8 bytes from `offset` (low nibble first), one per 16 values: (n, 16, 1)."""
    s = _nibbles(blocks[:, offset : offset + 8]).float()
    return (_halves(blocks, 0) * (0.5 + s) * 0.25).unsqueeze(-1)


def iq2_xs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """74 bytes -> 256 values, in 32 grid points of 8: d (fp16) | qs[32] (uint16): grid index in
    bits 0-8, sign index in bits 9-15 | scales[8]: 4-bit scales, one per 16 values.
    value = (d * (0.5 + s) * 0.25) * grid * sign.
    """
    n = blocks.shape[0]
    index = _words(blocks, 2, 32, torch.int16)  # = (sign << 9) | grid: the table's own order
    out.view(n, 32, 8).copy_(_lookup(_signed_grid_table(Q.IQ2_XS), index, 8))
    out.view(n, 16, 16).mul_(_iq2_scales(blocks, 66))


def iq2_s(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """82 bytes -> 256 values, in 32 grid points of 8: d (fp16) | qs[32]: low 8 bits of the grid
    indices | signs[32]: one sign byte per grid point (bit k = value k negative) | qh[8]: bits
    2 * k, 2 * k + 1 of byte b are bits 8-9 of grid index 4 * b + k | scales[8] as in IQ2_XS.
    value = (d * (0.5 + s) * 0.25) * grid * sign.
    """
    n = blocks.shape[0]
    qh = blocks[:, 66:74]
    high = torch.stack([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1).view(n, 32)
    points = blocks[:, 2:34].int() | high.int() << 8
    out.copy_(_signed_points(Q.IQ2_S, points, blocks[:, 34:66], parity=False))
    out.view(n, 16, 16).mul_(_iq2_scales(blocks, 74))


def iq3_xxs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """98 bytes -> 256 values, in 64 grid points of 4: d (fp16) | qs[64]: grid indices | 8 uint32,
    one per 32 values: four 7-bit sign indices (bits 0-27, each for 8 values) and a scale s in
    bits 28-31. value = (d * (0.5 + s) * 0.5) * grid * sign.
    """
    n = blocks.shape[0]
    aux = _words(blocks, 66, 8, torch.int32)
    signs = torch.stack([(aux >> shift) & 0x7F for shift in (0, 7, 14, 21)], dim=-1)
    s = ((aux >> 28) & 0xF).float()
    scale = (_halves(blocks, 0) * (0.5 + s) * 0.5).unsqueeze(-1)
    out.copy_(_signed_points(Q.IQ3_XXS, blocks[:, 2:66], signs.view(n, 32), parity=True))
    out.view(n, 8, 32).mul_(scale)


def iq3_s(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """110 bytes -> 256 values, in 64 grid points of 4: d (fp16) | qs[64]: low 8 bits of the grid
    indices | qh[8]: bit k of byte b is bit 8 of grid index 8 * b + k | signs[32]: one sign bit per
    value | scales[4]: 4-bit scales s, low nibble first, one per 32 values.
    value = (d * (1 + 2 * s)) * grid * sign.
    """
    n = blocks.shape[0]
    points = blocks[:, 2:66].int() | _bits(blocks[:, 66:74]).int() << 8
    scale = (_halves(blocks, 0) * (1 + 2 * _nibbles(blocks[:, 106:110]).float())).unsqueeze(-1)
    out.copy_(_signed_points(Q.IQ3_S, points, blocks[:, 74:106], parity=False))
    out.view(n, 8, 32).mul_(scale)


@cache
def _iq1_table() -> torch.Tensor:
    """IQ1_S and IQ1_M grid points with their shift of +-1/8, times 8: entry (negative << 11) | point,
    values 8 * grid + 1 or 8 * grid - 1 (grid values are -1, 0, 1)."""
    points = 8 * grid(Q.IQ1_S)
    return _packed(np.concatenate([points + 1, points - 1]))


def _iq1_values(points: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """8 * (grid + delta) as int8 (n, 8 * m) for grid indices (n, m) and their shift signs."""
    index = points.int() | negative.int() << 11
    return _lookup(_iq1_table(), index, 8).view(points.shape[0], -1)


def iq1_s(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """50 bytes -> 256 values, in 32 grid points of 8: d (fp16) | qs[32]: low 8 bits of the grid
    indices | qh[8] (uint16), one per 32 values: bits 3 * k .. 3 * k + 2 are bits 8-10 of grid index
    4 * g + k, bits 12-14 a scale s, bit 15 the sign of the shift delta = +-1/8.
    value = (d * (2 * s + 1)) * (grid + delta).
    """
    n = blocks.shape[0]
    qh = _words(blocks, 34, 8, torch.int16)
    high = torch.stack([(qh >> shift) & 7 for shift in (0, 3, 6, 9)], dim=-1).view(n, 32)
    points = blocks[:, 2:34].int() | high << 8
    negative = (qh >> 15).repeat_interleave(4, dim=1)
    # scale * (v / 8) == (scale / 8) * v: dividing by 8 is exact (the scale is no smaller than the
    # smallest fp16 subnormal, far above float32's), so both round the same exact product once.
    scale = (_halves(blocks, 0) * (2 * ((qh >> 12) & 7) + 1).float() * 0.125).unsqueeze(-1)
    out.copy_(_iq1_values(points, negative))
    out.view(n, 8, 32).mul_(scale)


def iq1_m(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """56 bytes -> 256 values, in 32 grid points of 8: qs[32]: low 8 bits of the grid indices |
    qh[16]: per grid point a nibble (low nibble first), bits 0-2 are bits 8-10 of its index, bit 3
    the sign of its shift delta = +-1/8 | 4 uint16: bits 3 * k .. 3 * k + 2 of word w are the scale s
    of values 64 * w + 16 * k .. +15, and the four top nibbles, word 0 lowest, form d (fp16).
    value = (d * (2 * s + 1)) * (grid + delta).
    """
    n = blocks.shape[0]
    words = _words(blocks, 48, 4, torch.int16)
    top = words >> 12
    d = torch.stack([top[:, 0] | top[:, 1] << 4, top[:, 2] | top[:, 3] << 4], dim=1)
    d = d.to(torch.uint8).view(torch.float16).float()
    s = torch.stack([(words >> shift) & 7 for shift in (0, 3, 6, 9)], dim=-1).view(n, 16)
    nibbles = _nibbles(blocks[:, 32:48])
    points = blocks[:, :32].int() | (nibbles & 7).int() << 8
    # As in IQ1_S, the 1/8 moves into the scale without changing any result.
    scale = (d * (2 * s + 1).float() * 0.125).unsqueeze(-1)
    out.copy_(_iq1_values(points, nibbles >> 3))
    out.view(n, 16, 16).mul_(scale)


def iq4_xs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """136 bytes -> 256 values, in 8 groups of 32: d (fp16) | scales_h (uint16): bits 2 * g, 2 * g + 1
    are the top bits of group g's scale | scales_l[4]: the low 4 bits, low nibble first | q[128]:
    per group 16 bytes of 4-bit codes, low nibbles are values 0-15, high nibbles 16-31.
    value = (d * (scale - 32)) * kvalues[q].
    """
    n = blocks.shape[0]
    high = _words(blocks, 2, 1, torch.int16) >> torch.arange(0, 16, 2, device=blocks.device)
    scales = (_nibbles(blocks[:, 4:8]).int() | (high & 3) << 4).float() - 32
    scale = (_halves(blocks, 0) * scales).unsqueeze(-1)
    codes = _fields(blocks[:, 8:], 4, 16).view(n, 256)
    torch.mul(_values_of(codes, _IQ4_VALUES).view(n, 8, 32), scale, out=out.view(n, 8, 32))


Decoder = Callable[[torch.Tensor, torch.Tensor], None]
BLOCK_DECODERS: dict[GGMLQuantizationType, Decoder] = {
    Q.Q4_0: q4_0,
    Q.Q4_1: q4_1,
    Q.Q5_0: q5_0,
    Q.Q5_1: q5_1,
    Q.Q8_0: q8_0,
    Q.Q2_K: q2_k,
    Q.Q3_K: q3_k,
    Q.Q4_K: q4_k,
    Q.Q5_K: q5_k,
    Q.Q6_K: q6_k,
    Q.TQ1_0: tq1_0,
    Q.TQ2_0: tq2_0,
    Q.IQ1_S: iq1_s,
    Q.IQ1_M: iq1_m,
    Q.IQ2_XXS: iq2_xxs,
    Q.IQ2_XS: iq2_xs,
    Q.IQ2_S: iq2_s,
    Q.IQ3_XXS: iq3_xxs,
    Q.IQ3_S: iq3_s,
    Q.IQ4_NL: iq4_nl,
    Q.IQ4_XS: iq4_xs,
    Q.MXFP4: mxfp4,
    Q.NVFP4: nvfp4,
}
FLOAT_KINDS = (Q.F32, Q.F16, Q.BF16)
SUPPORTED_KINDS = (*FLOAT_KINDS, *BLOCK_DECODERS)


def decode_into(kind: GGMLQuantizationType, data: torch.Tensor, out: torch.Tensor) -> None:
    """Write the float32 values of stored rows data (rows, stored row) into out (rows, cols)."""
    if kind in FLOAT_KINDS:
        out.copy_(data)
        return
    if kind not in BLOCK_DECODERS:
        raise NotImplementedError(f"dequantizing {kind.name} is not supported")
    decoder = BLOCK_DECODERS[kind]
    block_size, type_size = GGML_QUANT_SIZES[kind]
    blocks = data.reshape(-1, type_size)
    values = out.view(-1, block_size)
    band = max(1, BAND_VALUES // block_size)
    for start in range(0, blocks.shape[0], band):
        decoder(blocks[start : start + band], values[start : start + band])


def decode(kind: GGMLQuantizationType, data: torch.Tensor) -> torch.Tensor:
    """float32 values of stored data (..., stored row) -> (..., cols); F32 data is returned as is."""
    if kind in FLOAT_KINDS:
        return data.float()
    if kind not in BLOCK_DECODERS:
        raise NotImplementedError(f"dequantizing {kind.name} is not supported")
    block_size, type_size = GGML_QUANT_SIZES[kind]
    out = torch.empty(*data.shape[:-1], data.shape[-1] // type_size * block_size, device=data.device)
    decode_into(kind, data, out)
    return out
