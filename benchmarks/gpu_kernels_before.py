"""The products as they were before the block-wise and GEMM kernels (commit 369c490): the
baselines `gpu_check.py` times the new kernels against.

`old_matvec`: a program owns 16 rows and decodes a (16, values per block) tile with
`_decode_tile`, which loads every value's bytes (and its block's scales) on their own: correct,
but far from the memory bandwidth (113 µs per launch on an H200 in the q2 model's decode).
`old_expert_gemm`: many pairs (prefill) grouped by expert on the host, each busy expert decoded
to float32 and multiplied with the vendor's float32 GEMM (two launches per busy expert).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwarfstar.quant.tensor import QTensor
from dwarfstar.quant.triton.kernels import _TILE, FORMAT_CODES, _decode_tile, _grid, dequantize

BLOCK_ROWS = 16


@triton.jit
def old_matvec_kernel(
    w_ptr, x_ptr, ids_ptr, grid_ptr, out_ptr,
    rows, cols, row_stride, expert_stride, x_stride, x_divisor, out_stride, n_tiles,
    FORMAT: tl.constexpr, VALUES: tl.constexpr, UNITS: tl.constexpr,
    HAS_IDS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):  # fmt: skip
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


def old_matvec(
    x: torch.Tensor, w: QTensor, ids: torch.Tensor | None = None, x_divisor: int = 1
) -> torch.Tensor:
    code = FORMAT_CODES[w.kind]
    values, units = _TILE[code]
    rows, cols = w.shape[-2:]
    pairs = x.shape[0] if ids is None else ids.numel()
    out = x.new_empty(pairs, rows)
    data = w.data
    old_matvec_kernel[(triton.cdiv(rows, BLOCK_ROWS), pairs)](
        data, x, ids if ids is not None else x, _grid(x.device), out,
        rows, cols, data.stride(-2), data.stride(0) if ids is not None else 0, x.stride(0), x_divisor,
        out.stride(0), triton.cdiv(cols, values),
        FORMAT=code, VALUES=values, UNITS=units, HAS_IDS=ids is not None, BLOCK_ROWS=BLOCK_ROWS,
    )  # fmt: skip
    return out


def old_expert_gemm(x: torch.Tensor, w: QTensor, ids: torch.Tensor) -> torch.Tensor:
    """x (n, cols) through experts ids (n, k): (n * k, rows)."""
    k = ids.shape[1]
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=w.shape[0]).tolist()
    out = x.new_empty(flat.numel(), w.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count:
            pairs = order[start : start + count]
            start += count
            out[pairs] = x[pairs // k] @ dequantize(w[expert]).T
    return out
