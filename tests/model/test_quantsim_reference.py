"""The quantisation simulation against an independent reference of the official rounding.

The reference is written from docs/architecture.md §5.2-5.3 and DeepSeek's
inference code with numpy alone: the power-of-two scale from the float32 bits of
amax·(1/top), E4M3 and E2M1 rounding by ml_dtypes' float8_e4m3fn and float4_e2m1fn casts
(round to nearest, ties to even), and the Hadamard rotation as the Sylvester butterfly. It is
compared element for element at Flash's real widths: KV rows of 512 (448 rounded dims, the
64 rope dims left exact) and indexer vectors of 128.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from dwarfstar.model import quantsim

HEAD_DIM, ROPE_DIM, INDEX_DIM, HEADS = 512, 64, 128, 64


def pow2_scale(amax: np.ndarray, top: float) -> np.ndarray:
    """2^ceil(log2(amax · float32(1/top))), the exponent read from the float32 bits."""
    ratio = (amax.astype(np.float32) * np.float32(1.0 / top)).astype(np.float32)
    bits = ratio.view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.int32) - 127
    exponent += (bits & 0x7FFFFF) != 0  # not a power of two: round up
    return np.ldexp(np.float32(1.0), exponent).astype(np.float32)


def reference_round(x: np.ndarray, block: int, top: float, floor: float, dtype) -> np.ndarray:
    """Blocks of ``block`` along the last axis: x -> cast(clamp(x / s, ±top)) · s."""
    blocks = x.reshape(*x.shape[:-1], -1, block).astype(np.float32)
    amax = np.maximum(np.abs(blocks).max(axis=-1, keepdims=True), np.float32(floor))
    scale = pow2_scale(amax, top)
    scaled = np.clip(blocks / scale, -top, top).astype(np.float32)
    return (scaled.astype(dtype).astype(np.float32) * scale).reshape(x.shape)


def reference_fp8(x: np.ndarray) -> np.ndarray:
    return reference_round(x, 64, 448.0, 1e-4, ml_dtypes.float8_e4m3fn)


def reference_fp4(x: np.ndarray) -> np.ndarray:
    return reference_round(x, 32, 6.0, 6.0 * 2.0**-126, ml_dtypes.float4_e2m1fn)


def reference_hadamard(x: np.ndarray) -> np.ndarray:
    """Sylvester-order Walsh-Hadamard over the last axis, scaled by 1/sqrt(n): for strides 1, 2,
    4, ..., each pair (i, i + stride) inside a run of 2·stride becomes (a + b, a - b)."""
    out = x.astype(np.float32).copy()
    n = out.shape[-1]
    stride = 1
    while stride < n:
        for start in range(0, n, 2 * stride):
            a = out[..., start : start + stride].copy()
            b = out[..., start + stride : start + 2 * stride].copy()
            out[..., start : start + stride] = a + b
            out[..., start + stride : start + 2 * stride] = a - b
        stride *= 2
    return out * np.float32(n**-0.5)


def awkward_values(shape: tuple[int, ...], block: int, top: float, seed: int) -> np.ndarray:
    """Random values whose blocks span magnitudes from 1e-7 to 1e4, with the cases rounding gets
    wrong: all-zero blocks, blocks below the amax floor, amax exactly top·2^k (a power-of-two
    ratio), values that are exact ties of the target grid, and negative zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    blocks = x.reshape(-1, block)
    blocks *= np.exp(rng.uniform(np.log(1e-7), np.log(1e4), size=(blocks.shape[0], 1))).astype(np.float32)
    n = blocks.shape[0]
    blocks[0] = 0.0
    blocks[1] = -0.0
    blocks[2] *= np.float32(1e-12)  # far below either floor
    for row in range(3, min(n, 40)):  # amax exactly top · 2^k
        blocks[row, rng.integers(block)] = np.float32(top * 2.0 ** rng.integers(-20, 10))
        blocks[row] = np.clip(blocks[row], -top * 2.0**10, top * 2.0**10)
    for row in range(40, min(n, 80)):  # ties: midpoints of grid values once scaled by 1
        blocks[row] = rng.choice([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 1.0625, 17.0, 3.0], size=block)
        blocks[row] *= rng.choice([-1.0, 1.0], size=block)
        blocks[row, 0] = np.float32(top)  # pins the scale at 1
    return blocks.reshape(shape)


@pytest.mark.parametrize("seed", range(3))
def test_kv_rounding_matches_the_reference_at_flash_width(seed):
    rows = awkward_values((2048, HEAD_DIM - ROPE_DIM), 64, 448.0, seed)
    rope = np.random.default_rng(seed + 100).standard_normal((2048, ROPE_DIM)).astype(np.float32)
    kv = np.concatenate([rows, rope], axis=1)
    ours = quantsim.kv_round(torch.from_numpy(kv), HEAD_DIM - ROPE_DIM).numpy()
    np.testing.assert_array_equal(ours[:, : HEAD_DIM - ROPE_DIM], reference_fp8(rows))
    np.testing.assert_array_equal(ours[:, HEAD_DIM - ROPE_DIM :], rope)  # rope dims stay exact


@pytest.mark.parametrize("seed", range(3))
def test_fp4_rounding_matches_the_reference_at_indexer_width(seed):
    x = awkward_values((256, HEADS, INDEX_DIM), 32, 6.0, seed)
    ours = quantsim.fp4_round(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(ours, reference_fp4(x))


@pytest.mark.parametrize("seed", range(3))
def test_indexer_rounding_matches_the_reference(seed):
    """Hadamard then FP4, on indexer queries (T, 64 heads, 128) and keys (rows, 128)."""
    rng = np.random.default_rng(seed)
    queries = (rng.standard_normal((128, HEADS, INDEX_DIM)) * rng.uniform(0.01, 30, (128, HEADS, 1))).astype(
        np.float32
    )
    keys = (rng.standard_normal((512, INDEX_DIM)) * rng.uniform(0.01, 30, (512, 1))).astype(np.float32)
    for x in (queries, keys):
        np.testing.assert_array_equal(quantsim.hadamard(torch.from_numpy(x)).numpy(), reference_hadamard(x))
        ours = quantsim.indexer_round(torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(ours, reference_fp4(reference_hadamard(x)))


def test_the_reference_rounds_like_the_format_tables():
    """The reference itself: E4M3's largest finite value, subnormal step and ties; E2M1's grid."""
    one_block = np.zeros(64, dtype=np.float32)
    one_block[:5] = [448.0, 2.0**-9, 3 * 2.0**-10, 1.0 + 2.0**-4, 1.0 + 3 * 2.0**-4]
    np.testing.assert_array_equal(reference_fp8(one_block)[:5], [448.0, 2.0**-9, 2.0**-8, 1.0, 1.25])
    grid = np.array([6.0, 0.25, 0.75, 2.5, 5.0, -1.75, 0.2] + [0.0] * 25, dtype=np.float32)
    np.testing.assert_array_equal(reference_fp4(grid)[:7], [6.0, 0.0, 1.0, 2.0, 4.0, -2.0, 0.0])
    amax = np.array([448.0, 449.0, 1.0], np.float32)
    np.testing.assert_array_equal(pow2_scale(amax, 448.0), [1.0, 2.0, 2.0**-8])
