"""The compiled CPU kernels (the C extension `dwarfstar.quant._cpu`), registered on import.

They multiply straight from the stored blocks, for the formats in `_cpu.kinds()`, on CPU
tensors, decoding one row at a time into a buffer that stays in cache (`csrc/cpu_kernels.c`);
they agree with the reference path up to the order of the float32 sums. When
the extension was not built (no C compiler at install time), `dwarfstar.quant` warns once and
keeps the reference path. DWARFSTAR_KERNELS=reference forces the reference path.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
from gguf import GGMLQuantizationType

from . import formats
from .ops import EXPERT_KERNELS, LINEAR_KERNELS
from .tensor import QTensor

try:
    from . import _cpu
except ImportError as error:  # not built, or built for another Python: the reference path stays
    _cpu = None
    # A missing module reads as a "circular import" inside a package still initialising: say
    # plainly that it is not built, and quote the error only when a built module failed to load.
    built = importlib.util.find_spec(f"{__package__}._cpu") is not None
    _import_problem = f"failed to load ({error})" if built else "are not built"
else:
    _import_problem = ""

ENVIRONMENT = "DWARFSTAR_KERNELS"
"""`reference` forces the pure-torch kernels; unset (or `compiled`) uses the compiled ones."""


def available() -> bool:
    return _cpu is not None


def kinds() -> tuple[GGMLQuantizationType, ...]:
    """The formats with a compiled kernel (none when the extension is missing)."""
    return () if _cpu is None else tuple(GGMLQuantizationType(kind) for kind in _cpu.kinds())


GEMM_ROWS = {"avx512vnni": 16}
"""From this many input rows per matrix (or expert) on, decoding a band of rows at a time (in
C) and multiplying it with torch's float32 GEMM beats the direct kernels: 16 for the integer
products (AVX-512 VNNI), 8 for the float ones (docs/benchmarks.md)."""


def gemm_rows() -> int:
    """GEMM_ROWS for the instruction set in use."""
    return GEMM_ROWS.get(_cpu.isa(), 8)


def linear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """x (n, cols) @ W.T for one matrix W (rows, cols)."""
    if x.shape[0] >= gemm_rows():
        return _banded_gemm(x, w)
    rows, cols = w.shape
    x = x.contiguous()
    out = x.new_empty(x.shape[0], rows)
    data = w.data
    _cpu.matmul(
        int(w.kind), data.data_ptr(), 0, _row_stride(data), rows, cols,
        x.data_ptr(), x.shape[0], cols, 0, 1, 1, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def expert_linear(x: torch.Tensor, w: QTensor, ids: torch.Tensor) -> torch.Tensor:
    """x (n, cols) through experts ids (n, k) of W (experts, rows, cols): (n, k, rows).

    Experts with at least gemm_rows() rows (long prompts) take the banded GEMM, one call each;
    all the other (row, expert) pairs go through the direct kernel in one call, which groups
    them by expert in C (each expert's rows read once for all its inputs).
    """
    least = gemm_rows()
    if ids.numel() < least:
        return _direct_expert_linear(x, w, ids)
    n, k = ids.shape
    flat = ids.flatten()
    counts = torch.bincount(flat, minlength=w.shape[0])
    if int(counts.max()) < least:
        return _direct_expert_linear(x, w, ids)
    out = x.new_empty(n * k, w.shape[1])
    busy = counts >= least
    for expert in busy.nonzero().flatten().tolist():
        pairs = (flat == expert).nonzero().flatten()
        out[pairs] = _banded_gemm(x[pairs // k], w[expert])
    rest = (~busy[flat]).nonzero().flatten()
    if len(rest):
        out[rest] = _direct_expert_linear(x[rest // k], w, flat[rest, None])[:, 0]
    return out.view(n, k, -1)


def _direct_expert_linear(x: torch.Tensor, w: QTensor, ids: torch.Tensor) -> torch.Tensor:
    experts, rows, cols = w.shape
    x, ids = x.contiguous(), ids.contiguous()
    n, k = ids.shape
    out = x.new_empty(n, k, rows)
    data = w.data
    _cpu.matmul(
        int(w.kind), data.data_ptr(), data.stride(0) * data.element_size(), _row_stride(data), rows, cols,
        x.data_ptr(), n, cols, ids.data_ptr(), k, experts, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def _banded_gemm(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """x (n, cols) @ W.T: a band of W's rows at a time decoded into a buffer that stays in
    cache, then one float32 GEMM per band. The decoding (a small part of the work here) runs
    on one thread: torch's own threads, still spinning after each GEMM, would slow a pool of
    ours down more than it gains."""
    rows, cols = w.shape
    band = max(1, formats.BAND_VALUES // cols)
    weights = x.new_empty(min(band, rows), cols)
    out = x.new_empty(rows, x.shape[0])  # transposed: each band's results are contiguous
    data = w.data
    stride = _row_stride(data)
    for start in range(0, rows, band):
        stop = min(start + band, rows)
        address = data.data_ptr() + start * stride
        _cpu.decode(int(w.kind), address, stride, stop - start, cols, weights.data_ptr(), 1)
        torch.mm(weights[: stop - start], x.T, out=out[start:stop])
    return out.T.contiguous()


def _row_stride(data: torch.Tensor) -> int:
    """Bytes from one stored row to the next; each row's bytes must be contiguous."""
    if data.stride(-1) != 1:
        raise ValueError("compiled kernels need each stored row contiguous")
    return data.stride(-2) * data.element_size()


def register() -> None:
    """Put the compiled kernels into the registries, unless the environment says otherwise."""
    if os.environ.get(ENVIRONMENT, "compiled") == "reference":
        return
    if _cpu is None:
        warnings.warn(
            f"dwarfstar: the compiled CPU kernels {_import_problem}; using the much "
            "slower pure-torch kernels. Build them with a C compiler: `pip install -e .`, or "
            "`python setup.py build_ext --inplace` in a source tree.",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    for kind in kinds():
        LINEAR_KERNELS["cpu", kind] = linear
        EXPERT_KERNELS["cpu", kind] = expert_linear
