"""Triton kernels that multiply straight from the stored GGML blocks (imported only on first use).

One matrix × vector kernel serves every format: a program owns BLOCK_ROWS rows of one matrix
and one input row, walks the rows' blocks, decodes a (BLOCK_ROWS, values per block) tile in
registers and accumulates its products with the input. The same kernel does the grouped expert
product: program column p reads its expert id from `ids` and its input row p // x_divisor, so a
token's routed experts (or the attention's head groups) take one launch. A second kernel
decodes whole blocks into float32, for the products of many rows (prefill), which then go
through the vendor GEMM.

The decoders follow `dwarfstar.quant.formats` (ggml's layouts and float operation order), so
a decoded value is bit-identical to the reference path's; the products differ from it only by
the order of the float32 sums. Set TRITON_INTERPRET=1 before importing this module to run the
kernels on the CPU (the tests do).
"""

from __future__ import annotations

import os
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
def matvec_kernel(
    w_ptr, x_ptr, ids_ptr, grid_ptr, out_ptr,
    rows, cols, row_stride, expert_stride, x_stride, x_divisor, out_stride, n_tiles,
    FORMAT: tl.constexpr, VALUES: tl.constexpr, UNITS: tl.constexpr,
    HAS_IDS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):  # fmt: skip
    """out[p, r] = Σ_c W[expert(p), r, c] · x[p // x_divisor, c] for BLOCK_ROWS rows r."""
    pair = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = r < rows
    base = w_ptr + r[:, None].to(tl.int64) * row_stride
    if HAS_IDS:
        base += tl.load(ids_ptr + pair).to(tl.int64) * expert_stride
    x_row = x_ptr + (pair // x_divisor).to(tl.int64) * x_stride
    j = tl.arange(0, VALUES)[None, :]
    acc = tl.full((BLOCK_ROWS, VALUES), 0.0, tl.float32)
    for tile in range(n_tiles):
        column = tile * VALUES + j
        mask = row_mask[:, None] & (column < cols)
        w = _decode_tile(base + tile * UNITS, j, mask, grid_ptr, FORMAT)
        x = tl.load(x_row + column, mask=column < cols, other=0.0)
        acc += w * x
    tl.store(out_ptr + pair.to(tl.int64) * out_stride + r, tl.sum(acc, axis=1), mask=row_mask)


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


@cache
def _grid(device: torch.device) -> torch.Tensor:
    """IQ2_XXS's codebook (256 × 8 float32) on `device`, uploaded once."""
    return torch.from_numpy(formats.grid(Q.IQ2_XXS).astype("float32")).reshape(-1).to(device)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_ROWS = 128 if INTERPRETED else 16
"""Rows per program: on a GPU a tile of 16 × 256 decoded values per step keeps the registers in
bounds; Triton's interpreter pays per operation, not per value, so it gets fewer, larger tiles."""


def _launch_matvec(x: torch.Tensor, w: QTensor, ids: torch.Tensor | None, x_divisor: int) -> torch.Tensor:
    code = FORMAT_CODES[w.kind]
    values, units = _TILE[code]
    rows, cols = w.shape[-2:]
    data = w.data
    pairs = x.shape[0] if ids is None else ids.numel()
    out = x.new_empty(pairs, rows)
    expert_stride = data.stride(0) if ids is not None else 0
    matvec_kernel[(triton.cdiv(rows, BLOCK_ROWS), pairs)](
        data, x, ids if ids is not None else x, _grid(x.device), out,
        rows, cols, data.stride(-2), expert_stride, x.stride(0), x_divisor, out.stride(0),
        triton.cdiv(cols, values),
        FORMAT=code, VALUES=values, UNITS=units, HAS_IDS=ids is not None, BLOCK_ROWS=BLOCK_ROWS,
    )  # fmt: skip
    return out


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
"""Up to this many input rows (or (row, expert) pairs) the fused kernel reads the weights once per
row; from there on decoding to float32 and one GEMM per matrix is cheaper."""


def linear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """x (n, cols) @ W.T for a stored matrix W (rows, cols): (n, rows) float32."""
    x = x.contiguous()
    if x.shape[0] <= MATVEC_ROWS:
        return _launch_matvec(x, w, None, 1)
    return x @ dequantize(w).T


def expert_linear(x: torch.Tensor, w: QTensor, ids: torch.Tensor) -> torch.Tensor:
    """x (n, cols) through experts ids (n, k) of W (experts, rows, cols): (n, k, rows) float32.

    Few pairs (decode): one launch, no host synchronisation. Many (prefill): the pairs grouped
    by expert, each busy expert decoded once and multiplied with one GEMM.
    """
    n, k = ids.shape
    x = x.contiguous()
    if ids.numel() <= MATVEC_ROWS:
        return _launch_matvec(x, w, ids.contiguous(), k).view(n, k, -1)
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=w.shape[0]).tolist()  # prefill only: one sync per call
    out = x.new_empty(n * k, w.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count:
            pairs = order[start : start + count]
            start += count
            out[pairs] = x[pairs // k] @ dequantize(w[expert]).T
    return out.view(n, k, -1)
