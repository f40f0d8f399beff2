"""Quantizers that search: Q2_K, Q4_K and IQ2_XXS, with an optional importance per column.

``quantize_rows`` runs the compiled kernels (numba; compiled once, then cached on disk) over a
matrix's rows, split across ``threads``. The importance vector is what llama.cpp's imatrix holds:
the mean squared activation of each input column, so columns that matter more are fitted better.
IQ2_XXS cannot do without one; absent, it uses the sum of squares of each column of the matrix
itself, as ds4's quantizer does.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType

from dwarfstar.gguf.container import row_nbytes

from .iq2_xxs import grid_tables, quantize_iq2_xxs
from .kquants import quantize_q2_k, quantize_q4_k

Q = GGMLQuantizationType
SEARCHED_KINDS = (Q.Q2_K, Q.Q4_K, Q.IQ2_XXS)
# Byte offset of the fp16 scales in each block, and how many there are.
_HALVES = {Q.Q2_K: (80, 2), Q.Q4_K: (0, 2), Q.IQ2_XXS: (0, 1)}
_ROWS_PER_TASK = 64


def quantize_rows(
    kind: GGMLQuantizationType, rows: np.ndarray, importance: np.ndarray | None = None, threads: int = 1
) -> np.ndarray:
    """float32 rows (n, cols), cols a multiple of 256 -> stored blocks, uint8 (n, bytes per row)."""
    kind = GGMLQuantizationType(kind)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, cols = rows.shape
    if cols % 256:
        raise ValueError(f"{kind.name} needs rows of a multiple of 256 values, not {cols}")
    if importance is None and kind == Q.IQ2_XXS:
        importance = np.einsum("ij,ij->j", rows, rows, dtype=np.float64).astype(np.float32)
    weighted = importance is not None
    if importance is None:
        importance = np.ones(cols, dtype=np.float32)
    importance = np.ascontiguousarray(importance, dtype=np.float32)
    if importance.shape != (cols,):
        raise ValueError(f"importance of shape {importance.shape} for rows of {cols} values")
    if not np.isfinite(importance).all() or (importance < 0).any():
        raise ValueError("importance must be finite and non-negative")
    blocks = cols // 256
    offset, count = _HALVES[kind]
    out = np.zeros((n, row_nbytes(kind, cols)), dtype=np.uint8)
    halves = np.zeros((n, blocks, count), dtype=np.float32)

    def run(start: int, stop: int) -> None:
        part, scales = out[start:stop], halves[start:stop]
        if kind == Q.Q2_K:
            quantize_q2_k(rows[start:stop], importance, weighted, part, scales)
        elif kind == Q.Q4_K:
            quantize_q4_k(rows[start:stop], importance, weighted, part, scales)
        else:
            quantize_iq2_xxs(rows[start:stop], importance, part, scales[..., 0], *grid_tables())

    bounds = [(s, min(n, s + _ROWS_PER_TASK)) for s in range(0, n, _ROWS_PER_TASK)]
    if threads > 1 and len(bounds) > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda b: run(*b), bounds))
    else:
        for b in bounds:
            run(*b)
    size = row_nbytes(kind, 256)
    stored = out.reshape(n, blocks, size)
    stored[:, :, offset : offset + 2 * count] = halves.astype(np.float16).view(np.uint8)
    return out
