"""Triton kernels for the small operations of a decode step on CUDA tensors (imported on first use).

At batch 1 these operations move a few kilobytes each, so their cost is the number of launches:
the hyper-connections' Sinkhorn projection (20 iterations of two normalisations, twice per
layer) is about 80 launches in torch and one here; an RMSNorm is five launches in torch and
one here; a rope rotation is about ten in torch. `hyper.sinkhorn`, `norm.rms_norm` and
`rope.Rope.apply` call these for CUDA tensors. They compute what
the torch versions compute, up to float32 rounding (exp and reductions in another order;
tests/model/test_fused.py runs them in Triton's interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sinkhorn_kernel(logits_ptr, out_ptr, iters, eps, N: tl.constexpr):
    """One (N, N) matrix per program: softmax over rows' entries, then alternate column and row
    normalisation, starting and ending with columns (as `hyper.sinkhorn`)."""
    base = tl.program_id(0).to(tl.int64) * N * N
    offsets = tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
    x = tl.load(logits_ptr + base + offsets)
    x = tl.exp(x - tl.max(x, axis=1)[:, None])
    comb = x / tl.sum(x, axis=1)[:, None] + eps
    comb = comb / (tl.sum(comb, axis=0)[None, :] + eps)
    for _ in range(iters - 1):
        comb = comb / (tl.sum(comb, axis=1)[:, None] + eps)
        comb = comb / (tl.sum(comb, axis=0)[None, :] + eps)
    tl.store(out_ptr + base + offsets, comb)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """`hyper.sinkhorn` for (..., n, n) logits, n a power of two, in one launch."""
    n = logits.shape[-1]
    flat = logits.contiguous().view(-1, n, n)
    out = torch.empty_like(flat)
    _sinkhorn_kernel[(flat.shape[0],)](flat, out, iters, eps, N=n)
    return out.view(logits.shape)


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, width, eps, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program: x / sqrt(mean(x²) + eps), times the weight if there is one."""
    row = tl.program_id(0).to(tl.int64) * width
    columns = tl.arange(0, BLOCK)
    mask = columns < width
    x = tl.load(x_ptr + row + columns, mask=mask, other=0.0)
    y = x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps))
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + columns, mask=mask, other=0.0)
    tl.store(out_ptr + row + columns, y, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`norm.rms_norm` for float32 rows of up to 16384 values, one launch."""
    width = x.shape[-1]
    flat = x.contiguous().view(-1, width)
    out = torch.empty_like(flat)
    block = triton.next_power_of_2(width)
    _rms_norm_kernel[(flat.shape[0],)](
        flat, flat if weight is None else weight, out, width, eps,
        HAS_WEIGHT=weight is not None, BLOCK=block, num_warps=4 if block <= 2048 else 16,
    )  # fmt: skip
    return out.view(x.shape)


@triton.jit
def _rope_kernel(
    x_ptr, positions_ptr, freqs_ptr, out_ptr, width, rows_per_token, sign,
    PAIRS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row per program: its first values copied, its last 2·PAIRS rotated in interleaved pairs
    (each output written once: two stores to one address from one program are not ordered)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * width
    columns = tl.arange(0, BLOCK)
    kept = columns < width - 2 * PAIRS
    tl.store(out_ptr + base + columns, tl.load(x_ptr + base + columns, mask=kept), mask=kept)
    position = tl.load(positions_ptr + row // rows_per_token).to(tl.float32)
    k = tl.arange(0, PAIRS)
    angle = position * tl.load(freqs_ptr + k)
    cos = tl.cos(angle)
    sin = sign * tl.sin(angle)
    even_at = base + width - 2 * PAIRS + 2 * k
    even = tl.load(x_ptr + even_at)
    odd = tl.load(x_ptr + even_at + 1)
    tl.store(out_ptr + even_at, even * cos - odd * sin)
    tl.store(out_ptr + even_at + 1, even * sin + odd * cos)


def rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool) -> torch.Tensor:
    """`Rope.apply` for float32 x (T, ..., D) at positions (T,), one launch."""
    width = x.shape[-1]
    flat = x.contiguous().view(-1, width)
    out = torch.empty_like(flat)
    rows_per_token = flat.shape[0] // x.shape[0]
    _rope_kernel[(flat.shape[0],)](
        flat, positions.contiguous(), freqs, out, width, rows_per_token, -1.0 if inverse else 1.0,
        PAIRS=freqs.shape[0], BLOCK=triton.next_power_of_2(width),
    )  # fmt: skip
    return out.view(x.shape)
