"""The operations the model performs on stored weights, and the kernel registry behind them.

The model calls three entry points: `linear`, `expert_linear` and `take_rows`. The matrix
products are looked up in LINEAR_KERNELS / EXPERT_KERNELS by (device type, format), e.g.
("cpu", Q.IQ2_XXS); a missing entry means the reference path below: pure torch, any format
with a decoder in `formats`, any device. Faster kernels (the compiled CPU kernels in
`quant.cpu`, later Triton for "cuda") register themselves there; the model never notices.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType

from . import formats
from .formats import decode, decode_into
from .tensor import QTensor

Q = GGMLQuantizationType

LinearKernel = Callable[[torch.Tensor, QTensor], torch.Tensor]
"""(x (n, cols) float32, W (rows, cols)) -> x @ W.T, (n, rows) float32."""
ExpertKernel = Callable[[torch.Tensor, QTensor, torch.Tensor], torch.Tensor]
"""(x (n, cols) float32, W (experts, rows, cols), ids (n, k) int64) -> (n, k, rows) float32:
row i of x through each of its k experts ids[i]."""

LINEAR_KERNELS: dict[tuple[str, GGMLQuantizationType], LinearKernel] = {}
EXPERT_KERNELS: dict[tuple[str, GGMLQuantizationType], ExpertKernel] = {}


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
    rows, cols = w.shape
    if x.shape[-1] != cols:
        raise ValueError(
            f"linear: input has {x.shape[-1]} features, the {w.kind.name} weight {w.shape} wants {cols}"
        )
    device = "cpu" if x.is_cpu else x.device.type  # x.device builds an object: 4x slower
    kernel = LINEAR_KERNELS.get((device, w.kind), reference_linear)
    if x.dim() == 2:  # a matrix of rows already (as in a decode step): no reshaping
        return kernel(x if x.dtype is torch.float32 else x.float(), w)
    return kernel(x.reshape(-1, cols).float(), w).reshape(*x.shape[:-1], rows)


def expert_linear(x: torch.Tensor, w: QTensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Each input row through its experts, in one call, for stacked weights W (experts, rows, cols).

    expert_ids (..., k) picks k experts per row. x is either (..., cols), one row sent to all k
    of its experts (a token's routed gate/up projections), or (..., k, cols), row j to expert j
    (the down projections, or one block per group). Returns (..., k, rows) in float32. Only the
    chosen experts' weights are read.
    """
    if len(w.shape) != 3:
        raise ValueError(
            f"expert_linear: expected stacked expert weights (experts, rows, cols), got {w.shape}"
        )
    _, rows, cols = w.shape
    if x.shape[-1] != cols:
        raise ValueError(
            f"expert_linear: input has {x.shape[-1]} features, experts {w.kind.name} {w.shape} want {cols}"
        )
    k = expert_ids.shape[-1]
    if x.dim() == expert_ids.dim() + 1:  # one row per (row, expert) slot
        if x.shape[:-1] != expert_ids.shape:
            raise ValueError(
                f"expert_linear: inputs {tuple(x.shape)} do not match experts {tuple(expert_ids.shape)}"
            )
        flat, ids = x.reshape(-1, cols), expert_ids.reshape(-1, 1)
    elif x.shape[:-1] == expert_ids.shape[:-1]:  # one row shared by its k experts
        flat, ids = x.reshape(-1, cols), expert_ids.reshape(-1, k)
    else:
        raise ValueError(
            f"expert_linear: inputs {tuple(x.shape)} do not match experts {tuple(expert_ids.shape)}"
        )
    kernel = EXPERT_KERNELS.get((x.device.type, w.kind), reference_expert_linear)
    return kernel(flat.float(), w, ids.long()).reshape(*expert_ids.shape, rows)


def _check_matrix(t: QTensor, operation: str) -> None:
    if len(t.shape) != 2:
        raise ValueError(f"{operation}: expected a matrix, got a {t.kind.name} tensor of shape {t.shape}")


def reference_linear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """The reference matrix product for any format: dequantize a band of rows at a time into one
    buffer that stays in cache and multiply it at once, so that the float32 weights never travel
    to and from memory. F32 weights are used as stored."""
    if w.kind == Q.F32:
        return x @ w.data.T
    rows, cols = w.shape
    band = max(1, formats.BAND_VALUES // cols)
    weights = x.new_empty(min(band, rows), cols)
    out = x.new_empty(rows, x.shape[0])  # transposed: each band's results are contiguous
    for start in range(0, rows, band):
        stop = min(start + band, rows)
        decode_into(w.kind, w.data[start:stop], weights[: stop - start])
        torch.mm(weights[: stop - start], x.T, out=out[start:stop])
    return out.T.contiguous()


def reference_expert_linear(x: torch.Tensor, w: QTensor, ids: torch.Tensor) -> torch.Tensor:
    """The reference grouped product: the (row, expert) pairs sorted by expert, then one
    `reference_linear` per expert that has any, on all of its rows at once."""
    n, k = ids.shape
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=w.shape[0]).tolist()
    out = x.new_empty(n * k, w.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        out[pairs] = reference_linear(x[pairs // k], w[expert])
    return out.view(n, k, -1)
