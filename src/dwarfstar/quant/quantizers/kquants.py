"""Q2_K and Q4_K: super-blocks of 256 values, each sub-block an affine map of 2- or 4-bit levels.

Q2_K (84 bytes): 16 sub-blocks of 16; per sub-block a 4-bit scale and a 4-bit offset (packed in
one byte, scale low), both multiples of the super-block's fp16 d and dmin; levels 0..3.
Layout: scales[16] | qs[64] | d | dmin; qs byte 32*h + l holds the levels of values
128*h + l + 32*s at bits 2s (s = 0..3).

Q4_K (144 bytes): 8 sub-blocks of 32; 6-bit scales and offsets packed in 12 bytes; levels 0..15.
Layout: d | dmin | scales[12] | qs[128]; qs byte 32*h + l holds value 64*h + l (low nibble) and
64*h + 32 + l (high nibble).

Without importance the sub-block fits weigh each value by its magnitude and the sub-block scales
are rounded against the largest; with importance (one weight per column) each value weighs
importance * sqrt(sigma^2 + x^2) and the sub-block scales are themselves fitted, weighted by the
sub-block's total weight: llama.cpp's choices, which these kernels match in quality.
"""

from __future__ import annotations

import math

import numpy as np

from .fitting import fit_affine, fit_scale, jit, round_half


@jit
def quantize_q2_k(
    rows: np.ndarray, importance: np.ndarray, weighted: bool, out: np.ndarray, halves: np.ndarray
) -> None:
    """rows (n, cols) float32 -> out (n, cols // 256 * 84) uint8; d, dmin to halves."""
    n, cols = rows.shape
    levels = np.zeros(256, np.uint8)
    trial = np.zeros(16, np.uint8)
    weight = np.zeros(16, np.float32)
    scales = np.zeros(16, np.float32)
    offsets = np.zeros(16, np.float32)
    sub_weight = np.zeros(16, np.float32)
    scale_levels = np.zeros(16, np.uint8)
    offset_levels = np.zeros(16, np.uint8)
    for r in range(n):
        for b in range(cols // 256):
            x = rows[r, 256 * b : 256 * b + 256]
            dest = out[r, 84 * b : 84 * b + 84]
            sigma2 = 0.0
            for i in range(256):
                sigma2 += x[i] * x[i]
            sigma2 /= 256
            for j in range(16):
                xs = x[16 * j : 16 * j + 16]
                for i in range(16):
                    if weighted:
                        weight[i] = importance[256 * b + 16 * j + i] * math.sqrt(sigma2 + xs[i] * xs[i])
                    else:
                        weight[i] = abs(xs[i])
                sub_weight[j] = weight.sum()
                if weighted:
                    scales[j], offsets[j] = fit_affine(
                        xs, weight, 3, -0.9, 0.05, 36, False, levels[16 * j :], trial
                    )
                else:
                    scales[j], offsets[j] = fit_affine(
                        xs, weight, 3, -0.5, 0.1, 15, True, levels[16 * j :], trial
                    )
            if weighted:
                d = round_half(fit_scale(scales, 15, sub_weight, scale_levels))
                dmin = round_half(fit_scale(offsets, 15, sub_weight, offset_levels))
            else:
                d, dmin = _max_levels(scales, 15, scale_levels), _max_levels(offsets, 15, offset_levels)
            halves[r, b, 0] = d
            halves[r, b, 1] = dmin
            for j in range(16):
                dest[j] = scale_levels[j] | (offset_levels[j] << 4)
                step = d * scale_levels[j]
                if step == 0:
                    continue
                shift = dmin * offset_levels[j]
                for i in range(16):
                    levels[16 * j + i] = min(3, max(0, int(np.rint((x[16 * j + i] + shift) / step))))
            for h in range(2):
                for i in range(32):
                    v = 128 * h + i
                    dest[16 + 32 * h + i] = (
                        levels[v] | (levels[v + 32] << 2) | (levels[v + 64] << 4) | (levels[v + 96] << 6)
                    )


@jit
def quantize_q4_k(
    rows: np.ndarray, importance: np.ndarray, weighted: bool, out: np.ndarray, halves: np.ndarray
) -> None:
    """rows (n, cols) float32 -> out (n, cols // 256 * 144) uint8; d, dmin to halves."""
    n, cols = rows.shape
    levels = np.zeros(256, np.uint8)
    trial = np.zeros(32, np.uint8)
    weight = np.zeros(32, np.float32)
    scales = np.zeros(8, np.float32)
    offsets = np.zeros(8, np.float32)
    sub_weight = np.zeros(8, np.float32)
    scale_levels = np.zeros(8, np.uint8)
    offset_levels = np.zeros(8, np.uint8)
    for r in range(n):
        for b in range(cols // 256):
            x = rows[r, 256 * b : 256 * b + 256]
            dest = out[r, 144 * b : 144 * b + 144]
            sigma2 = 0.0
            for i in range(256):
                sigma2 += x[i] * x[i]
            sigma2 = 2 * sigma2 / 256
            for j in range(8):
                xs = x[32 * j : 32 * j + 32]
                if weighted:
                    for i in range(32):
                        weight[i] = importance[256 * b + 32 * j + i] * math.sqrt(sigma2 + xs[i] * xs[i])
                    sub_weight[j] = weight.sum()
                    scales[j], offsets[j] = fit_affine(
                        xs, weight, 15, -0.9, 0.05, 36, False, levels[32 * j :], trial
                    )
                else:
                    sum_x2 = 0.0
                    for i in range(32):
                        sum_x2 += xs[i] * xs[i]
                    rms = math.sqrt(sum_x2 / 32)
                    for i in range(32):
                        weight[i] = rms + abs(xs[i])
                    scales[j], offsets[j] = fit_affine(
                        xs, weight, 15, -1.0, 0.1, 20, False, levels[32 * j :], trial
                    )
            if weighted:
                d = round_half(fit_scale(scales, 63, sub_weight, scale_levels))
                dmin = round_half(fit_scale(offsets, 63, sub_weight, offset_levels))
            else:
                d, dmin = _max_levels(scales, 63, scale_levels), _max_levels(offsets, 63, offset_levels)
            halves[r, b, 0] = d
            halves[r, b, 1] = dmin
            packed = dest[4:16]
            packed[:] = 0
            for j in range(8):
                s, m = scale_levels[j], offset_levels[j]
                if j < 4:
                    packed[j] = s
                    packed[j + 4] = m
                else:
                    packed[j + 4] = (s & 0xF) | ((m & 0xF) << 4)
                    packed[j - 4] |= (s >> 4) << 6
                    packed[j] |= (m >> 4) << 6
                step = d * s
                if step == 0:
                    continue
                shift = dmin * m
                for i in range(32):
                    levels[32 * j + i] = min(15, max(0, int(np.rint((x[32 * j + i] + shift) / step))))
            for h in range(4):
                for i in range(32):
                    dest[16 + 32 * h + i] = levels[64 * h + i] | (levels[64 * h + 32 + i] << 4)


@jit
def _max_levels(values: np.ndarray, nmax: int, levels: np.ndarray) -> float:
    """Non-negative values as levels 0..nmax of max / nmax, rounded; returns that step as stored (fp16)."""
    hi = values.max()
    if hi <= 0:
        levels[:] = 0
        return 0.0
    inverse = nmax / hi
    for j in range(values.shape[0]):
        levels[j] = min(nmax, int(np.rint(inverse * values[j])))
    return round_half(hi / nmax)
