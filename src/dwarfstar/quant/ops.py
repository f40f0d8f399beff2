"""The operations the model performs on stored weights.

`linear` is the one entry point per matrix product: LINEAR_KERNELS maps each format to its
implementation, so a faster kernel (Triton, a compiled CPU kernel) can replace one format's
entry without the model noticing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType

from . import formats
from .formats import decode, decode_into
from .tensor import QTensor


def dequantize(t: QTensor) -> torch.Tensor:
    """All of `t` as float32 of shape t.shape (for F32, the stored tensor itself: do not modify it)."""
    return decode(t.kind, t.data)


def take_rows(t: QTensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of the matrix `t` as float32 (*index.shape, cols), dequantizing only those rows."""
    _check_matrix(t, "take_rows")
    return decode(t.kind, t.data[index])


def linear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """x @ W.T in float32, for x (..., cols) and a matrix W (rows, cols)."""
    _check_matrix(w, "linear")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"linear: input has {x.shape[-1]} features, the {w.kind.name} weight {w.shape} wants {w.shape[1]}"
        )
    kernel = LINEAR_KERNELS.get(w.kind)
    if kernel is None:
        raise NotImplementedError(f"linear: no kernel for {w.kind.name} weights")
    return kernel(x.float(), w)


def expert_linear(x: torch.Tensor, w: QTensor, expert: int) -> torch.Tensor:
    """x @ W[expert].T for stacked expert weights W (experts, rows, cols), reading only that expert."""
    if len(w.shape) != 3:
        raise ValueError(
            f"expert_linear: expected stacked expert weights (experts, rows, cols), got {w.shape}"
        )
    return linear(x, w[expert])


def _check_matrix(t: QTensor, operation: str) -> None:
    if len(t.shape) != 2:
        raise ValueError(f"{operation}: expected a matrix, got a {t.kind.name} tensor of shape {t.shape}")


def _matmul_stored(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """F32: the stored matrix is usable as it is."""
    return x @ w.data.T


def _matmul_dequantized(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """Any format: dequantize a band of rows at a time into one buffer that stays in cache and
    multiply it at once, so that the float32 weights never travel to and from memory."""
    rows, cols = w.shape
    band = max(1, formats.BAND_VALUES // cols)
    flat = x.reshape(-1, cols)
    weights = flat.new_empty(min(band, rows), cols)
    out = flat.new_empty(rows, flat.shape[0])  # transposed: each band's results are contiguous
    for start in range(0, rows, band):
        stop = min(start + band, rows)
        decode_into(w.kind, w.data[start:stop], weights[: stop - start])
        torch.mm(weights[: stop - start], flat.T, out=out[start:stop])
    return out.T.reshape(*x.shape[:-1], rows).contiguous()


Q = GGMLQuantizationType
LINEAR_KERNELS: dict[GGMLQuantizationType, Callable[[torch.Tensor, QTensor], torch.Tensor]] = {
    Q.F32: _matmul_stored,
    Q.F16: _matmul_dequantized,
    Q.BF16: _matmul_dequantized,
    Q.Q8_0: _matmul_dequantized,
    Q.Q2_K: _matmul_dequantized,
    Q.Q4_K: _matmul_dequantized,
    Q.IQ2_XXS: _matmul_dequantized,
    Q.MXFP4: _matmul_dequantized,
}
