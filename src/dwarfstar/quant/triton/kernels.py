"""Triton kernels that multiply straight from the stored GGML blocks (imported only on first use).

`matvec_kernel` serves every format for one to a few input rows (decode): a program owns ROWS
output rows of one matrix and one input row, and walks a range of each row's blocks (split-K
where rows are few), BLOCKS whole blocks per step. A block's bytes are contiguous, so each load
is a run of bytes the warp reads together; the block's scales are read once per block (not per
value), and its sums are factored the way the format is built (Σ code·x per sub-block times its
scale, minus min · Σ x). The same kernel does the grouped expert product: program column p
reads its expert id from `ids` and its input row p // x_divisor, so a token's routed experts
(or the attention's head groups) take one launch, with no host synchronisation.

`dequantize_kernel` decodes whole blocks to float32 with `_decode_tile`, value by value: the
reference for the decoders (bit-identical to `dwarfstar.quant.formats`, ggml's layouts and
float operation order) and the decode before the vendor GEMM of many rows (prefill).

The products differ from the reference path only by the order of the float32 sums. Set
TRITON_INTERPRET=1 before importing this module to run the kernels on the CPU (the tests do).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from dwarfstar.quant import formats
from dwarfstar.quant.tensor import QTensor

Q = GGMLQuantizationType

# Format codes the kernels branch on at compile time (`_decode_tile` spells them as numbers).
F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS = range(6)
FORMAT_CODES = {Q.F16: F16, Q.BF16: BF16, Q.Q8_0: Q8_0, Q.Q2_K: Q2_K, Q.Q4_K: Q4_K, Q.IQ2_XXS: IQ2_XXS}
# Values per decoded tile and storage units (bytes, or elements for the float kinds) per tile.
_TILE = {F16: (64, 64), BF16: (64, 64), Q8_0: (32, 34), Q2_K: (256, 84), Q4_K: (256, 144), IQ2_XXS: (256, 66)}


@triton.jit
def _byte(ptr, offset, mask):
    return tl.load(ptr + offset, mask=mask, other=0).to(tl.int32)


@triton.jit
def _half(ptr, offset, mask):
    """The little-endian fp16 at byte `offset` as float32."""
    bits = _byte(ptr, offset, mask) | (_byte(ptr, offset + 1, mask) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _decode_tile(block, j, mask, grid_ptr, FORMAT: tl.constexpr):
    """Values j (1, V) of the blocks at pointers `block` (R, 1) as float32 (R, V)."""
    if FORMAT <= 1:  # F16, BF16: `block` points at elements
        w = tl.load(block + j, mask=mask, other=0.0).to(tl.float32)
    elif FORMAT == 2:  # Q8_0: d (fp16) | q[32] (int8); q * d
        q = _byte(block, 2 + j, mask).to(tl.int8).to(tl.float32)
        w = q * _half(block, 0, mask)
    elif FORMAT == 3:  # Q2_K: scales[16] | q[64] | d | dmin; (d * scale) * q - dmin * min
        sm = _byte(block, j // 16, mask)
        code = (_byte(block, 16 + 32 * (j // 128) + j % 32, mask) >> (2 * ((j % 128) // 32))) & 3
        d = _half(block, 80, mask)
        dmin = _half(block, 82, mask)
        w = (d * (sm & 15).to(tl.float32)) * code.to(tl.float32) - dmin * (sm >> 4).to(tl.float32)
    elif FORMAT == 4:  # Q4_K: d | dmin | 12 bytes of 6-bit scales and mins | q[128]
        g = j // 32
        low = g < 4
        g4 = g % 4
        scale_byte = _byte(block, 4 + g4, mask)
        min_byte = _byte(block, 8 + g4, mask)
        high = _byte(block, 12 + g4, mask)
        scale = tl.where(low, scale_byte & 63, (high & 15) | ((scale_byte >> 6) << 4))
        minimum = tl.where(low, min_byte & 63, (high >> 4) | ((min_byte >> 6) << 4))
        code = (_byte(block, 16 + 32 * (g // 2) + j % 32, mask) >> (4 * (g % 2))) & 15
        d = _half(block, 0, mask)
        dmin = _half(block, 2, mask)
        w = (d * scale.to(tl.float32)) * code.to(tl.float32) - dmin * minimum.to(tl.float32)
    else:  # IQ2_XXS: d | per group of 32: 4 grid indices, uint32 of 4 sign indices and a scale
        group = 2 + 8 * (j // 32)
        point = (j % 32) // 8
        element = j % 8
        index = _byte(block, group + point, mask)
        aux = (
            _byte(block, group + 4, mask)
            | (_byte(block, group + 5, mask) << 8)
            | (_byte(block, group + 6, mask) << 16)
            | (_byte(block, group + 7, mask) << 24)
        )
        s = (aux >> 28) & 15
        signs = (aux >> (7 * point)) & 127
        parity = signs ^ (signs >> 4)
        parity = parity ^ (parity >> 2)
        parity = (parity ^ (parity >> 1)) & 1
        negative = tl.where(element == 7, parity, (signs >> element) & 1)
        value = tl.load(grid_ptr + index * 8 + element, mask=mask, other=0.0)
        value = tl.where(negative == 1, -value, value)
        scale = (_half(block, 0, mask) * (0.5 + s.to(tl.float32))) * 0.25
        w = scale * value
    return w


@triton.jit
def _q8_0_dot(row, blocks, mask, inside, x_row):
    """Σ over the Q8_0 blocks `blocks` (1, B) of rows `row` (R, 1): (R, B). d | q[32] (int8)."""
    i = tl.arange(0, 32)[None, None, :]
    block = row + blocks * 34
    q = tl.load(block[:, :, None] + 2 + i, mask=mask[:, :, None], other=0).to(tl.int8, bitcast=True)
    x = tl.load(x_row + blocks[:, :, None] * 32 + i, mask=inside[:, :, None], other=0.0)
    return tl.sum(q.to(tl.float32) * x, axis=2) * _half(block, 0, mask)


@triton.jit
def _q2_k_dot(row, blocks, mask, inside, x_row):
    """Q2_K: scales[16] | q[64] | d | dmin. Value 128h + 32s + 16u + v is bits 2s of byte
    16 + 32h + 16u + v, with the scale and min of byte 8h + 2s + u."""
    v = tl.arange(0, 16)[None, None, :]
    block = row + blocks * 84
    d = _half(block, 80, mask)
    dmin = _half(block, 82, mask)
    acc = tl.zeros(d.shape, tl.float32)
    for h in tl.static_range(2):
        for u in tl.static_range(2):
            q = _byte(block[:, :, None], 16 + 32 * h + 16 * u + v, mask[:, :, None])
            for s in tl.static_range(4):
                offset = 128 * h + 32 * s + 16 * u
                x = tl.load(x_row + blocks[:, :, None] * 256 + offset + v, mask=inside[:, :, None], other=0.0)
                code = ((q >> (2 * s)) & 3).to(tl.float32)
                sm = _byte(block, 8 * h + 2 * s + u, mask)
                acc += (d * (sm & 15).to(tl.float32)) * tl.sum(code * x, axis=2)
                acc -= (dmin * (sm >> 4).to(tl.float32)) * tl.sum(x, axis=2)
    return acc


@triton.jit
def _q4_k_dot(row, blocks, mask, inside, x_row):
    """Q4_K: d | dmin | 12 bytes of 6-bit scales and mins | q[128]. Group g of 32 values is
    nibble g % 2 of bytes 16 + 32 (g // 2) + i."""
    i = tl.arange(0, 32)[None, None, :]
    block = row + blocks * 144
    d = _half(block, 0, mask)
    dmin = _half(block, 2, mask)
    acc = tl.zeros(d.shape, tl.float32)
    for pair in tl.static_range(4):
        q = _byte(block[:, :, None], 16 + 32 * pair + i, mask[:, :, None])
        for nibble in tl.static_range(2):
            g = 2 * pair + nibble
            if g < 4:
                scale = _byte(block, 4 + g, mask) & 63
                minimum = _byte(block, 8 + g, mask) & 63
            else:
                high = _byte(block, 8 + g, mask)
                scale = (high & 15) | ((_byte(block, g, mask) >> 6) << 4)
                minimum = (high >> 4) | ((_byte(block, 4 + g, mask) >> 6) << 4)
            x = tl.load(x_row + blocks[:, :, None] * 256 + 32 * g + i, mask=inside[:, :, None], other=0.0)
            code = ((q >> (4 * nibble)) & 15).to(tl.float32)
            acc += (d * scale.to(tl.float32)) * tl.sum(code * x, axis=2)
            acc -= (dmin * minimum.to(tl.float32)) * tl.sum(x, axis=2)
    return acc


@triton.jit
def _iq2_xxs_dot(row, blocks, mask, inside, x_row, grid_ptr):
    """IQ2_XXS: d | per group of 32 values: 4 grid indices, a uint32 of 4 × 7 sign bits and a
    4-bit scale. A grid entry is 8 magnitudes packed in an int64 (one gather per 8 values)."""
    point = tl.arange(0, 4)[None, None, :]
    element = tl.arange(0, 8)[None, None, None, :]
    block = row + blocks * 66
    d = _half(block, 0, mask)
    acc = tl.zeros(d.shape, tl.float32)
    for g in tl.static_range(8):
        index = _byte(block[:, :, None], 2 + 8 * g + point, mask[:, :, None])
        packed = tl.load(grid_ptr + index, mask=mask[:, :, None], other=0)
        aux = (
            _byte(block, 6 + 8 * g, mask)
            | (_byte(block, 7 + 8 * g, mask) << 8)
            | (_byte(block, 8 + 8 * g, mask) << 16)
            | (_byte(block, 9 + 8 * g, mask) << 24)
        )
        signs = (aux[:, :, None] >> (7 * point)) & 127
        parity = signs ^ (signs >> 4)
        parity = parity ^ (parity >> 2)
        parity = (parity ^ (parity >> 1)) & 1
        negative = tl.where(element == 7, parity[:, :, :, None], (signs[:, :, :, None] >> element) & 1)
        value = ((packed[:, :, :, None] >> (8 * element)) & 255).to(tl.float32)
        value = tl.where(negative == 1, -value, value)
        x = tl.load(
            x_row + blocks[:, :, None, None] * 256 + 32 * g + 8 * point[:, :, :, None] + element,
            mask=inside[:, :, None, None],
            other=0.0,
        )
        scale = (d * (0.5 + ((aux >> 28) & 15).to(tl.float32))) * 0.25
        acc += scale * tl.sum(tl.sum(value * x, axis=3), axis=2)
    return acc


@triton.jit
def _float_dot(row, blocks, mask, inside, x_row, cols):
    """F16 / BF16: a "block" is 64 consecutive elements."""
    i = tl.arange(0, 64)[None, None, :]
    column = blocks[:, :, None] * 64 + i
    in_row = column < cols
    w = tl.load(row[:, :, None] + column, mask=mask[:, :, None] & in_row, other=0.0).to(tl.float32)
    x = tl.load(x_row + column, mask=inside[:, :, None] & in_row, other=0.0)
    return tl.sum(w * x, axis=2)


@triton.jit
def matvec_kernel(
    w_ptr, x_ptr, ids_ptr, grid_ptr, out_ptr,
    rows, cols, row_stride, expert_stride, x_stride, x_divisor, out_stride, split_stride,
    n_blocks, blocks_per_split,
    FORMAT: tl.constexpr, HAS_IDS: tl.constexpr, ROWS: tl.constexpr, BLOCKS: tl.constexpr,
):  # fmt: skip
    """out[split, p, r] = Σ_c W[expert(p), r, c] · x[p // x_divisor, c] over the split's blocks.

    A program owns ROWS rows of one matrix, one input row and one range of blocks (split-K);
    each step reads BLOCKS whole stored blocks of every row (their bytes are contiguous) and
    keeps one partial sum per row and block slot in registers.
    """
    pair = tl.program_id(0)  # fastest: the input rows of one row tile run together (L2 reuse)
    split = tl.program_id(2)
    r = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    row_mask = r < rows
    row = w_ptr + r[:, None].to(tl.int64) * row_stride
    if HAS_IDS:
        row += tl.load(ids_ptr + pair).to(tl.int64) * expert_stride
    x_row = x_ptr + (pair // x_divisor).to(tl.int64) * x_stride
    first = split * blocks_per_split
    end = tl.minimum(first + blocks_per_split, n_blocks)
    acc = tl.zeros((ROWS, BLOCKS), tl.float32)
    for start in range(first, end, BLOCKS):
        blocks = start + tl.arange(0, BLOCKS)[None, :]
        inside = blocks < end
        mask = row_mask[:, None] & inside
        if FORMAT <= 1:  # F16, BF16
            acc += _float_dot(row, blocks, mask, inside, x_row, cols)
        elif FORMAT == 2:
            acc += _q8_0_dot(row, blocks, mask, inside, x_row)
        elif FORMAT == 3:
            acc += _q2_k_dot(row, blocks, mask, inside, x_row)
        elif FORMAT == 4:
            acc += _q4_k_dot(row, blocks, mask, inside, x_row)
        else:  # IQ2_XXS
            acc += _iq2_xxs_dot(row, blocks, mask, inside, x_row, grid_ptr)
    out = out_ptr + split.to(tl.int64) * split_stride + pair.to(tl.int64) * out_stride + r
    tl.store(out, tl.sum(acc, axis=1), mask=row_mask)


@triton.jit
def dequantize_kernel(
    w_ptr, grid_ptr, out_ptr, rows, cols, row_stride,
    FORMAT: tl.constexpr, VALUES: tl.constexpr, UNITS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):  # fmt: skip
    """Rows (BLOCK_ROWS) × one tile of values of a matrix, decoded to float32 (rows, cols)."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    tile = tl.program_id(1)
    j = tl.arange(0, VALUES)[None, :]
    column = tile * VALUES + j
    mask = (r < rows)[:, None] & (column < cols)
    base = w_ptr + r[:, None].to(tl.int64) * row_stride + tile * UNITS
    w = _decode_tile(base, j, mask, grid_ptr, FORMAT)
    tl.store(out_ptr + r[:, None].to(tl.int64) * cols + column, w, mask=mask)


@triton.jit
def gemm_kernel(
    w_ptr, x_ptr, slot_pair_ptr, tile_expert_ptr, grid_ptr, out_ptr,
    pairs, rows, cols, row_stride, expert_stride, x_stride, x_divisor, out_stride, n_experts,
    FORMAT: tl.constexpr, VALUES: tl.constexpr, UNITS: tl.constexpr, GROUPED: tl.constexpr,
    PAIRS: tl.constexpr, ROWS: tl.constexpr, STEP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out[p, r] = Σ_c W[expert(p), r, c] · x[p // x_divisor, c] for a tile of PAIRS pairs × ROWS rows.

    Grouped: tile t holds the pairs of slots t·PAIRS … of `slot_pair` (pairs sorted by expert,
    each expert's run padded to whole tiles; `pairs` marks a padding slot), all of expert
    `tile_expert[t]` (`n_experts` past the last tile: nothing to do). Each step decodes a
    (ROWS, STEP) tile of weights in registers and multiplies it on the tensor cores.
    """
    tile = tl.program_id(0)
    r = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    slots = tile * PAIRS + tl.arange(0, PAIRS)
    steps = tl.cdiv(cols, STEP)
    w_row = w_ptr + r[:, None].to(tl.int64) * row_stride
    if GROUPED:
        expert = tl.load(tile_expert_ptr + tile)
        pair = tl.load(slot_pair_ptr + slots)
        steps = tl.where(expert < n_experts, steps, 0)
        w_row += expert.to(tl.int64) * expert_stride
    else:
        pair = slots
    pair_mask = pair < pairs
    row_mask = r < rows
    x_row = x_ptr + (pair // x_divisor)[:, None].to(tl.int64) * x_stride
    c = tl.arange(0, STEP)[None, :]
    acc = tl.zeros((PAIRS, ROWS), tl.float32)
    for step in range(0, steps):
        column = step * STEP + c
        inside = column < cols
        block = w_row + (column // VALUES) * UNITS
        w = _decode_tile(block, column % VALUES, row_mask[:, None] & inside, grid_ptr, FORMAT)
        x = tl.load(x_row + column, mask=pair_mask[:, None] & inside, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    out = out_ptr + pair[:, None].to(tl.int64) * out_stride + r[None, :]
    tl.store(out, acc, mask=pair_mask[:, None] & row_mask[None, :])


@cache
def _grid(device: torch.device) -> torch.Tensor:
    """IQ2_XXS's codebook (256 × 8 float32) on `device`, uploaded once."""
    return torch.from_numpy(formats.grid(Q.IQ2_XXS).astype("float32")).reshape(-1).to(device)


@cache
def _packed_grid(device: torch.device) -> torch.Tensor:
    """The same codebook as 256 int64, the 8 magnitudes (8, 25 or 43) of an entry in its bytes."""
    magnitudes = formats.grid(Q.IQ2_XXS).astype("uint8")  # exact: small integers
    return torch.from_numpy(magnitudes.copy().view("<i8").reshape(-1)).to(device)


@cache
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_ROWS = 128 if INTERPRETED else 16
"""Rows per program of the dequantize kernel: on a GPU a tile of 16 × 256 decoded values keeps the
registers in bounds; Triton's interpreter pays per operation, not per value, so it gets larger
tiles."""


@dataclass(frozen=True)
class MatvecConfig:
    """How `matvec_kernel` cuts a product: output rows per program, stored blocks per step of
    each row, warps per program. The split of the blocks (split-K) follows from the launch size."""

    rows: int
    blocks: int
    warps: int = 4


MATVEC_CONFIGS = {
    F16: MatvecConfig(8, 4),  # 256 values of each row per step
    BF16: MatvecConfig(8, 4),
    Q8_0: MatvecConfig(8, 16),  # 512
    Q2_K: MatvecConfig(8, 2),
    Q4_K: MatvecConfig(8, 2),
    IQ2_XXS: MatvecConfig(8, 2),
}
"""Per format: untuned guesses (`benchmarks/gpu_check.py` times alternatives on a GPU) that
compile for sm_90 to 48 (Q2_K) to 96 (Q4_K) registers a thread, no spills."""
PROGRAMS_PER_PROCESSOR = 4
"""Split-K until a launch has this many programs per streaming multiprocessor (where rows are few)."""


def matvec(
    x: torch.Tensor,
    w: QTensor,
    ids: torch.Tensor | None = None,
    x_divisor: int = 1,
    config: MatvecConfig | None = None,
    split: int | None = None,
) -> torch.Tensor:
    """out[p] = W[ids[p]] @ x[p // x_divisor] (W @ x[p] without ids): (pairs, rows) float32.

    One launch, no host synchronisation; `split` blocks ranges per row (default: enough
    programs to fill the device) are summed after the launch."""
    code = FORMAT_CODES[w.kind]
    if config is None:
        config = MATVEC_CONFIGS[code]
        if INTERPRETED:  # the interpreter pays per operation, not per value: fewer, larger tiles
            config = MatvecConfig(128, 4 * config.blocks)
    rows, cols = w.shape[-2:]
    values = _TILE[code][0]
    n_blocks = triton.cdiv(cols, values)
    pairs = x.shape[0] if ids is None else ids.numel()
    tiles = triton.cdiv(rows, config.rows)
    if split is None:
        wanted = triton.cdiv(PROGRAMS_PER_PROCESSOR * _processors(x.device), tiles * pairs)
        split = max(1, min(wanted, n_blocks // config.blocks))
    per_split = triton.cdiv(triton.cdiv(n_blocks, split), config.blocks) * config.blocks
    split = triton.cdiv(n_blocks, per_split)
    out = x.new_empty(split, pairs, rows)
    data = w.data
    matvec_kernel[(pairs, tiles, split)](  # tiles ≤ 65,535: Flash's vocabulary in tiles of 2+ rows
        data, x, ids if ids is not None else x, _packed_grid(x.device), out,
        rows, cols, data.stride(-2), data.stride(0) if ids is not None else 0, x.stride(0), x_divisor,
        out.stride(1), out.stride(0), n_blocks, per_split,
        FORMAT=code, HAS_IDS=ids is not None, ROWS=config.rows, BLOCKS=config.blocks,
        num_warps=config.warps,
    )  # fmt: skip
    return out[0] if split == 1 else out.sum(0)


def dequantize(w: QTensor) -> torch.Tensor:
    """A stored matrix (rows, cols) as float32 on its device."""
    code = FORMAT_CODES[w.kind]
    values, units = _TILE[code]
    rows, cols = w.shape
    out = torch.empty(rows, cols, device=w.data.device)
    dequantize_kernel[(triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(cols, values))](
        w.data, _grid(w.data.device), out, rows, cols, w.data.stride(0),
        FORMAT=code, VALUES=values, UNITS=units, BLOCK_ROWS=BLOCK_ROWS,
    )  # fmt: skip
    return out


MATVEC_ROWS = 8
"""Up to this many input rows (or (row, expert) pairs) the matrix × vector kernel reads the
weights once per row; from there on the GEMM kernel, which decodes each weight tile once per
tile of pairs."""

GEMM_PRECISION = "tf32"
"""How `gemm_kernel` multiplies on the tensor cores: "tf32" (inputs rounded to 10-bit mantissas,
float32 sums: about 1e-3 of Σ|w·x|, the scale of the vendor libraries' fast float32 GEMMs),
"tf32x3" (three tf32 products: about float32's accuracy, a third of the speed) or "ieee" (plain
float32, no tensor cores). Decode (`matvec_kernel`) is always float32."""
GEMM_PAIRS, GEMM_ROWS, GEMM_STEP, GEMM_WARPS = 64, 64, 32, 8
"""Pairs × rows of a GEMM tile, values decoded per step (a multiple of 16 for tl.dot), warps:
compiled for sm_90 this tile needs no spills in any format (145 to 197 registers a thread)."""
if INTERPRETED:  # fewer, larger tiles
    GEMM_ROWS, GEMM_STEP = 128, 256


def _expert_tiles(ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs sorted by expert in runs padded to whole tiles of GEMM_PAIRS slots, and each
    tile's expert, made on the device without reading anything back (a fixed number of tiles:
    every expert may leave one partial tile; tiles past the end have expert `n_experts`)."""
    pairs = ids.numel()
    # Not bincount: on CUDA it reads the largest id back to size its output.
    counts = torch.zeros(n_experts, dtype=torch.int64, device=ids.device).scatter_add_(
        0, ids, torch.ones_like(ids)
    )
    padded_end = torch.cumsum(triton.cdiv(counts, GEMM_PAIRS) * GEMM_PAIRS, 0)
    first_slot = padded_end - triton.cdiv(counts, GEMM_PAIRS) * GEMM_PAIRS
    first_pair = torch.cumsum(counts, 0) - counts
    order = torch.argsort(ids, stable=True)
    by_expert = ids[order]
    rank = torch.arange(pairs, device=ids.device) - first_pair[by_expert]
    tiles = triton.cdiv(pairs, GEMM_PAIRS) + n_experts
    slot_pair = torch.full((tiles * GEMM_PAIRS,), pairs, dtype=torch.int64, device=ids.device)
    slot_pair[first_slot[by_expert] + rank] = order
    starts = torch.arange(tiles, device=ids.device) * GEMM_PAIRS
    return slot_pair, torch.searchsorted(padded_end, starts, right=True)


def gemm(
    x: torch.Tensor,
    w: QTensor | torch.Tensor,
    ids: torch.Tensor | None = None,
    x_divisor: int = 1,
    precision: str | None = None,
) -> torch.Tensor:
    """out[p] = W[ids[p]] @ x[p // x_divisor] (W @ x[p] without ids) for many pairs: (pairs, rows)
    float32, in one launch, stored weights decoded in the kernel's tiles (or a float32 W)."""
    if isinstance(w, QTensor):
        code, data = FORMAT_CODES[w.kind], w.data
    else:  # float32 elements: loaded as the F16 path loads its elements
        code, data = F16, w
    values, units = _TILE[code]
    rows, cols = w.shape[-2:]
    if ids is None:
        pairs, n_experts = x.shape[0], 1
        tiles, slot_pair, tile_expert = triton.cdiv(pairs, GEMM_PAIRS), x, x  # (unused pointers)
    else:
        pairs, n_experts = ids.numel(), w.shape[0]
        slot_pair, tile_expert = _expert_tiles(ids.reshape(-1), n_experts)
        tiles = tile_expert.numel()
    out = x.new_empty(pairs, rows)
    gemm_kernel[(tiles, triton.cdiv(rows, GEMM_ROWS))](
        data, x, slot_pair, tile_expert, _grid(x.device), out,
        pairs, rows, cols, data.stride(-2), data.stride(0) if ids is not None else 0, x.stride(0), x_divisor,
        out.stride(0), n_experts,
        FORMAT=code, VALUES=values, UNITS=units, GROUPED=ids is not None, PAIRS=GEMM_PAIRS, ROWS=GEMM_ROWS,
        STEP=GEMM_STEP, PRECISION=precision or GEMM_PRECISION, num_warps=GEMM_WARPS,
    )  # fmt: skip
    return out


DECODE_ONCE_ROWS = 4 * GEMM_PAIRS
"""From this many input rows a matrix is decoded to float32 once (`dequantize`) and multiplied
by the GEMM kernel, instead of being decoded again in every tile of rows."""


def linear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """x (n, cols) @ W.T for a stored matrix W (rows, cols): (n, rows) float32."""
    x = x.contiguous()
    if x.shape[0] <= MATVEC_ROWS:
        return matvec(x, w)
    if x.shape[0] >= DECODE_ONCE_ROWS:
        return gemm(x, dequantize(w))
    return gemm(x, w)


def expert_linear(x: torch.Tensor, w: QTensor, ids: torch.Tensor) -> torch.Tensor:
    """x (n, cols) through experts ids (n, k) of W (experts, rows, cols): (n, k, rows) float32.

    One launch either way, no host synchronisation: few pairs (decode) through the matrix ×
    vector kernel, many (prefill) through the GEMM kernel with the pairs grouped by expert.
    """
    n, k = ids.shape
    x = x.contiguous()
    if ids.numel() <= MATVEC_ROWS:
        return matvec(x, w, ids.contiguous(), k).view(n, k, -1)
    return gemm(x, w, ids, k).view(n, k, -1)
