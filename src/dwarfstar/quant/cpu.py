"""The compiled CPU kernels (the C extension `dwarfstar.quant._cpu`), registered on import.

They multiply straight from the stored blocks, for the formats in `_cpu.kinds()`, on CPU
tensors, decoding one row at a time into a buffer that stays in cache (`csrc/cpu_kernels.c`);
they agree with the reference path up to the order of the float32 sums. When
the extension was not built (no C compiler at install time), `dwarfstar.quant` warns once and
keeps the reference path. DWARFSTAR_KERNELS=reference forces the reference path.
"""

from __future__ import annotations

import os
import warnings

import torch
from gguf import GGMLQuantizationType

from .ops import EXPERT_KERNELS, LINEAR_KERNELS
from .tensor import QTensor

try:
    from . import _cpu
except ImportError as error:  # not built: the reference path stays
    _cpu = None
    _import_error: ImportError | None = error
else:
    _import_error = None

ENVIRONMENT = "DWARFSTAR_KERNELS"
"""`reference` forces the pure-torch kernels; unset (or `compiled`) uses the compiled ones."""


def available() -> bool:
    return _cpu is not None


def kinds() -> tuple[GGMLQuantizationType, ...]:
    """The formats with a compiled kernel (none when the extension is missing)."""
    return () if _cpu is None else tuple(GGMLQuantizationType(kind) for kind in _cpu.kinds())


def linear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """x (n, cols) @ W.T for one matrix W (rows, cols)."""
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
    """x (n, cols) through experts ids (n, k) of W (experts, rows, cols): (n, k, rows)."""
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
            f"dwarfstar: the compiled CPU kernels are not built ({_import_error}); using the much "
            "slower pure-torch kernels. Build them with a C compiler: `pip install -e .`, or "
            "`python setup.py build_ext --inplace` in a source tree.",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    for kind in kinds():
        LINEAR_KERNELS["cpu", kind] = linear
        EXPERT_KERNELS["cpu", kind] = expert_linear
