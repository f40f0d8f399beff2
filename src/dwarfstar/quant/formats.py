"""Dequantization of the GGML formats, in torch, bit-exact with gguf-py's `gguf.quants.dequantize`.

Each block decoder reads a uint8 tensor of blocks (n, bytes per block) and writes their float32
values into `out` (n, values per block). Tensors are decoded a band of blocks at a time so that the
temporaries stay in cache, and the decoders make as few passes over a band as they can: bit fields
are cut out of whole int32 words (four bytes per operation), IQ2_XXS values come from a table of
eight int8 values per entry, and codes become float32 only once, in the final copy into `out`.

Multi-byte fields are little-endian, read by viewing the bytes as wider types, so like gguf-py this
assumes a little-endian host. The float operations follow ggml's order (e.g. `(d * scale) * q -
dmin * min`), which is what makes the results bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable

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


def q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """34 bytes -> 32 values: d (fp16) | q[32] (int8); value = q * d."""
    out.copy_(blocks[:, 2:].view(torch.int8))
    out.mul_(_halves(blocks, 0))


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


def q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """144 bytes -> 256 values, in 8 groups of 32.

    d (fp16) | dmin (fp16) | 12 bytes of 6-bit scales and mins: bytes 0-3 hold scale j (low 6 bits)
    and the top bits of scale j+4, bytes 4-7 the same for the mins, bytes 8-11 the low 4 bits of
    scale j+4 (low nibble) and min j+4 (high nibble) | q[128]: 4-bit codes; bytes 32 * k .. 32 * k + 31
    hold group 2k in their low nibbles and group 2k+1 in their high nibbles.
    value = (d * scale) * q - dmin * min.
    """
    n = blocks.shape[0]
    low_scales, low_mins, high = blocks[:, 4:16].contiguous().view(n, 3, 4).unbind(1)
    scales = torch.cat([low_scales & 0x3F, (high & 0xF) | ((low_scales >> 2) & 0x30)], dim=-1)
    mins = torch.cat([low_mins & 0x3F, (high >> 4) | ((low_mins >> 2) & 0x30)], dim=-1)
    d, dmin = _halves(blocks, 0, 2).unbind(1)
    scale = (d.view(n, 1) * scales.float()).view(n, 8, 1)
    minimum = (dmin.view(n, 1) * mins.float()).view(n, 8, 1)
    out.view(n, 4, 2, 32).copy_(_fields(blocks[:, 16:], 4, 32))
    out.view(n, 8, 32).mul_(scale).sub_(minimum)


# ggml's kgrid_2bit_256: 256 grid points of 8 magnitudes, 2 bits each (lowest bits first),
# standing for the magnitudes 8, 25 and 43.
_IQ2_XXS_GRID_CODES = (
        0,     2,     5,     8,    10,    17,    20,    32,    34,    40,    42,    65,    68,    80,
       88,    97,   100,   128,   130,   138,   162,   257,   260,   272,   277,   320,   388,   408,
      512,   514,   546,   642,  1025,  1028,  1040,  1057,  1060,  1088,  1090,  1096,  1120,  1153,
     1156,  1168,  1188,  1280,  1282,  1288,  1312,  1350,  1385,  1408,  1425,  1545,  1552,  1600,
     1668,  1700,  2048,  2053,  2056,  2068,  2088,  2113,  2116,  2128,  2130,  2184,  2308,  2368,
     2562,  2580,  4097,  4100,  4112,  4129,  4160,  4192,  4228,  4240,  4245,  4352,  4360,  4384,
     4432,  4442,  4480,  4644,  4677,  5120,  5128,  5152,  5157,  5193,  5248,  5400,  5474,  5632,
     5654,  6145,  6148,  6160,  6208,  6273,  6400,  6405,  6560,  6737,  8192,  8194,  8202,  8260,
     8289,  8320,  8322,  8489,  8520,  8704,  8706,  9217,  9220,  9232,  9280,  9302,  9472,  9537,
     9572,  9872, 10248, 10272, 10388, 10820, 16385, 16388, 16400, 16408, 16417, 16420, 16448, 16456,
    16470, 16480, 16513, 16516, 16528, 16640, 16672, 16737, 16768, 16773, 16897, 16912, 16968, 16982,
    17000, 17408, 17416, 17440, 17536, 17561, 17682, 17700, 17920, 18433, 18436, 18448, 18496, 18501,
    18688, 18776, 18785, 18818, 19013, 19088, 20480, 20488, 20497, 20505, 20512, 20608, 20616, 20740,
    20802, 20900, 21137, 21648, 21650, 21770, 22017, 22100, 22528, 22545, 22553, 22628, 22848, 23048,
    24580, 24592, 24640, 24680, 24832, 24917, 25112, 25184, 25600, 25605, 25872, 25874, 25988, 26690,
    32768, 32770, 32778, 32833, 32898, 33028, 33048, 33088, 33297, 33793, 33796, 33808, 33813, 33856,
    33888, 34048, 34118, 34196, 34313, 34368, 34400, 34818, 35076, 35345, 36868, 36880, 36900, 36928,
    37025, 37142, 37248, 37445, 37888, 37922, 37956, 38225, 39041, 39200, 40962, 41040, 41093, 41225,
    41472, 42008, 43088, 43268,
)  # fmt: skip


def iq2_xxs_grid() -> np.ndarray:
    """The IQ2_XXS grid as float32 (256, 8): ggml's iq2xxs_grid."""
    codes = (np.array(_IQ2_XXS_GRID_CODES, dtype=np.int64)[:, None] >> np.arange(0, 16, 2)) & 3
    return np.array([8, 25, 43], dtype=np.float32)[codes]


def iq2_xxs_signs() -> np.ndarray:
    """Sign patterns as float32 (128, 8) of +-1: ggml's ksigns_iq2xs.

    Index bits 0-6 are the signs of values 0-6 (1 = negative); value 7's sign makes the number of
    negatives even, which is why 7 bits suffice.
    """
    bits = (np.arange(128)[:, None] >> np.arange(7)) & 1
    bits = np.concatenate([bits, bits.sum(axis=1, keepdims=True) & 1], axis=1)
    return np.where(bits == 1, -1.0, 1.0).astype(np.float32)


def _iq2_xxs_table() -> torch.Tensor:
    """Every grid point with every sign pattern, entry 128 * grid_index + sign_index: its 8 values
    (all within +-43) as int8, packed into one int64 so that a lookup moves all 8 at once."""
    signed = iq2_xxs_grid()[:, None, :] * iq2_xxs_signs()[None, :, :]
    return torch.from_numpy(signed.astype(np.int8).reshape(-1).view(np.int64))


_IQ2_XXS_TABLE = _iq2_xxs_table()


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
    # The four table indices of a group, 128 * grid + sign, assembled in the four 16-bit lanes of
    # an int64: each step ORs in a shifted copy and masks away all but the fields it moved apart.
    signs = (groups >> 32).bitwise_and_(0x0FFFFFFF)  # 7-bit fields at bits 0, 7, 14, 21
    signs = (signs | signs << 18).bitwise_and_(0x00003FFF00003FFF)  # at 0, 7, 32, 39
    signs = (signs | signs << 9).bitwise_and_(0x007F007F007F007F)  # at 0, 16, 32, 48
    grid = groups & 0xFFFFFFFF  # bytes at 0, 8, 16, 24
    grid = (grid | grid << 16).bitwise_and_(0x0000FFFF0000FFFF)  # at 0, 8, 32, 40
    grid = (grid | grid << 8).bitwise_and_(0x00FF00FF00FF00FF)  # at 0, 16, 32, 48
    index = grid.bitwise_left_shift_(7).bitwise_or_(signs).view(torch.int16).int()
    packed = _IQ2_XXS_TABLE.to(blocks.device).index_select(0, index.view(-1))
    # (scale * grid) * sign == scale * (grid * sign) exactly: flipping a sign never rounds.
    values = out.view(n, 8, 32)
    values.copy_(packed.view(torch.int8).view(n, 8, 32))
    values.mul_(scale)


# e2m1 values, doubled so they are integers (the scale is halved to match, as in ggml).
_MXFP4_VALUES = torch.tensor((0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12), dtype=torch.float32)


def mxfp4(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """17 bytes -> 32 values: e (e8m0 exponent) | q[16]: 4-bit e2m1 codes, low nibbles are values
    0-15, high nibbles 16-31. value = 2^(e - 128) * doubled_e2m1[q], the scale subnormal for e < 2.
    """
    n = blocks.shape[0]
    e = blocks[:, :1].int()
    half_scale = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23).view(torch.float32)
    codes = _fields(blocks[:, 1:], 4, 16).view(-1).int()
    torch.mul(_MXFP4_VALUES.to(blocks.device).index_select(0, codes).view(n, 32), half_scale, out=out)


Decoder = Callable[[torch.Tensor, torch.Tensor], None]
BLOCK_DECODERS: dict[GGMLQuantizationType, Decoder] = {
    Q.Q8_0: q8_0,
    Q.Q2_K: q2_k,
    Q.Q4_K: q4_k,
    Q.IQ2_XXS: iq2_xxs,
    Q.MXFP4: mxfp4,
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
