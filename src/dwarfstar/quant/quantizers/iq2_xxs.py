"""IQ2_XXS: 2.06 bits per weight, groups of 8 magnitudes drawn from a 256-entry grid.

Block of 256 values (66 bytes): d (fp16) | 8 sub-blocks of 32, each two little-endian uint32:
the first holds four grid indices (one per group of 8), the second four 7-bit sign patterns
(the eighth sign makes the count of minus signs even) and, in its top 4 bits, the sub-block
scale ls. A value decodes as d * (0.5 + ls) / 4 * grid byte * sign, the grid bytes being
8, 25 and 43 (about 8.5 times the odd levels 1, 3, 5 the search works with).

The search is the one llama.cpp uses: per sub-block, signs are taken from the data (flipping the
cheapest one when the count is odd), then thirteen candidate scales each round the magnitudes to
levels 0..2; a group of 8 levels that is not a grid point is replaced by its best weighted
neighbour among the grid points at the two smallest distances (the neighbour table), and the
scale with the best least-squares gain wins. On top of that, once the sub-block scales are
rounded to 4 bits, the super-block scale d is refitted by weighted least squares against what the
blocks actually decode to, which lowers the error further.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from gguf.quants import IQ2_XXS as GGUF_IQ2_XXS

from .fitting import GROUP_MAX_EPS, fit_scale, jit

N_PATTERNS = 3**8  # groups of 8 levels 0..2


@cache
def grid_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(levels (256, 8) int8, grid bytes (256, 8) float32, index of each base-4 code (4**8,) int32
    (-1 off the grid), neighbour offsets (4**8 + 1,) int32, neighbour indices int32).

    The grid comes from gguf-py's decoder. A code off the grid lists the grid points at its two
    smallest squared distances, nearest first, ties by index.
    """
    GGUF_IQ2_XXS.init_grid()
    grid_bytes = np.asarray(GGUF_IQ2_XXS.grid, dtype=np.float32).reshape(256, 8)
    levels = np.searchsorted(np.array(GGUF_IQ2_XXS.grid_map, dtype=np.float32), grid_bytes).astype(np.int8)
    powers = 4 ** np.arange(8)
    index_of = np.full(4**8, -1, dtype=np.int32)
    index_of[levels.astype(np.int64) @ powers] = np.arange(256, dtype=np.int32)

    patterns = (np.arange(N_PATTERNS)[:, None] // 3 ** np.arange(8)) % 3  # every group of levels 0..2
    codes = patterns @ powers
    distance = ((patterns[:, None, :] - levels[None, :, :].astype(np.int64)) ** 2).sum(-1)  # (6561, 256)
    lists: dict[int, np.ndarray] = {}
    for code, row in zip(codes, distance, strict=True):
        if index_of[code] >= 0:
            continue
        nearest = np.unique(row)[:2]
        order = np.lexsort((np.arange(256), row))
        lists[int(code)] = order[np.isin(row[order], nearest)]
    counts = np.zeros(4**8, dtype=np.int32)
    for code, entries in lists.items():
        counts[code] = len(entries)
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int32)
    neighbours = np.zeros(offsets[-1], dtype=np.int32)
    for code, entries in lists.items():
        neighbours[offsets[code] : offsets[code + 1]] = entries
    return levels, grid_bytes, index_of, offsets, neighbours


@jit
def _group_code(xval: np.ndarray, inverse: float) -> int:
    """The base-4 code of 8 magnitudes rounded to levels 0..2 (odd values 1, 3, 5) of 1 / inverse."""
    code = 0
    for i in range(8):
        level = min(2, max(0, int(np.rint(0.5 * (inverse * xval[i] - 1)))))
        code |= level << (2 * i)
    return code


@jit
def _snap(code, xval, waux, scale, levels, index_of, offsets, neighbours) -> int:  # noqa: ANN001
    """The grid index for a group's code: itself if on the grid, else its best weighted neighbour."""
    index = index_of[code]
    if index >= 0:
        return index
    best = np.inf
    for k in range(offsets[code], offsets[code + 1]):
        candidate = neighbours[k]
        error = 0.0
        for i in range(8):
            diff = scale * (2 * levels[candidate, i] + 1) - xval[i]
            error += waux[i] * diff * diff
        if error < best:
            best = error
            index = candidate
    return index


@jit
def quantize_iq2_xxs(
    rows: np.ndarray,
    importance: np.ndarray,
    out: np.ndarray,
    halves: np.ndarray,
    levels: np.ndarray,
    grid_bytes: np.ndarray,
    index_of: np.ndarray,
    offsets: np.ndarray,
    neighbours: np.ndarray,
) -> None:
    """rows (n, cols) float32, importance (cols,) -> out (n, cols // 256 * 66) uint8; d to halves."""
    n, cols = rows.shape
    weight = np.zeros(32, np.float64)
    waux = np.zeros(32, np.float64)
    xval = np.zeros(32, np.float64)
    first_levels = np.zeros(32, np.uint8)
    trial = np.zeros(32, np.uint8)
    indices = np.zeros((8, 4), np.int64)
    signs = np.zeros((8, 4), np.int64)
    scales = np.zeros(8, np.float64)
    all_weights = np.zeros(256, np.float64)
    for r in range(n):
        for b in range(cols // 256):
            x = rows[r, 256 * b : 256 * b + 256]
            sigma2 = 0.0
            for i in range(256):
                sigma2 += x[i] * x[i]
            sigma2 /= 256
            max_scale = 0.0
            for s in range(8):
                xs = x[32 * s : 32 * s + 32]
                for i in range(32):
                    weight[i] = importance[256 * b + 32 * s + i] * math.sqrt(sigma2 + xs[i] * xs[i])
                    waux[i] = math.sqrt(weight[i])
                    all_weights[32 * s + i] = weight[i]
                for g in range(4):
                    pattern = 0
                    flips = 0
                    cheapest = 0
                    for i in range(8):
                        v = xs[8 * g + i]
                        xval[8 * g + i] = abs(v)
                        if v < 0:
                            pattern |= 1 << i
                            flips += 1
                        if weight[8 * g + i] * v * v < weight[8 * g + cheapest] * xs[8 * g + cheapest] ** 2:
                            cheapest = i
                    if flips % 2:
                        xval[8 * g + cheapest] = -xval[8 * g + cheapest]
                        pattern ^= 1 << cheapest
                    signs[s, g] = pattern & 127
                scales[s] = 0.0
                indices[s, :] = 0
                if xval.max() < GROUP_MAX_EPS:
                    continue
                scale = fit_scale(xval, 4, weight, first_levels)  # a first guess at the scale
                top = 3 * scale
                if top <= 0:
                    continue
                best = 0.0
                for step in range(-6, 7):
                    inverse = (5 + 0.1 * step) / top
                    for g in range(4):
                        xg = xval[8 * g : 8 * g + 8]
                        code = _group_code(xg, inverse)
                        index = _snap(
                            code, xg, waux[8 * g :], 1 / inverse, levels, index_of, offsets, neighbours
                        )
                        for i in range(8):
                            trial[8 * g + i] = levels[index, i]
                    sum_qx = 0.0
                    sum_q2 = 0.0
                    for i in range(32):
                        q = 2.0 * trial[i] + 1
                        sum_qx += weight[i] * xval[i] * q
                        sum_q2 += weight[i] * q * q
                    if sum_q2 > 0 and sum_qx * sum_qx > best * sum_q2:
                        scale = sum_qx / sum_q2
                        best = scale * sum_qx
                if scale <= 0:
                    continue
                # the winning scale, its codes re-derived and snapped once more, then refitted
                sum_qx = 0.0
                sum_q2 = 0.0
                for g in range(4):
                    xg = xval[8 * g : 8 * g + 8]
                    code = _group_code(xg, 1 / scale)
                    index = _snap(code, xg, waux[8 * g :], scale, levels, index_of, offsets, neighbours)
                    indices[s, g] = index
                    for i in range(8):
                        q = 2.0 * levels[index, i] + 1
                        sum_qx += weight[8 * g + i] * xval[8 * g + i] * q
                        sum_q2 += weight[8 * g + i] * q * q
                if sum_q2 > 0:
                    scale = sum_qx / sum_q2
                if scale < 0:
                    scale = -scale
                    for g in range(4):
                        signs[s, g] = ~signs[s, g] & 127
                scales[s] = scale
                max_scale = max(max_scale, scale)
            _store_block(
                x,
                all_weights,
                max_scale,
                scales,
                indices,
                signs,
                grid_bytes,
                out[r, 66 * b : 66 * b + 66],
                halves[r, b:],
            )


@jit
def _store_block(x, weight, max_scale, scales, indices, signs, grid_bytes, dest, half) -> None:  # noqa: ANN001
    """Round the sub-block scales to 4 bits of max_scale / 31, refit d to the decoded values, pack."""
    dest[:] = 0
    half[0] = 0.0
    if max_scale == 0:
        return
    d = max_scale / 31
    sum_xc = 0.0
    sum_c2 = 0.0
    for s in range(8):
        ls = min(15, max(0, int(np.rint(0.5 * (scales[s] / d - 1)))))
        sign_word = ls << 28
        for g in range(4):
            sign_word |= signs[s, g] << (7 * g)
            pattern = signs[s, g] | ((_parity(signs[s, g])) << 7)
            dest[2 + 8 * s + g] = indices[s, g]
            for i in range(8):
                c = (0.5 + ls) * 0.25 * grid_bytes[indices[s, g], i]
                if (pattern >> i) & 1:
                    c = -c
                v = 32 * s + 8 * g + i
                sum_xc += weight[v] * x[v] * c
                sum_c2 += weight[v] * c * c
        for k in range(4):
            dest[2 + 8 * s + 4 + k] = (sign_word >> (8 * k)) & 0xFF
    half[0] = sum_xc / sum_c2 if sum_c2 > 0 and sum_xc > 0 else d


@jit
def _parity(bits: int) -> int:
    count = 0
    for i in range(7):
        count += (bits >> i) & 1
    return count & 1
