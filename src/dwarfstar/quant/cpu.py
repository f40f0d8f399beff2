"""The compiled CPU kernels (the C extension `dwarfstar.quant._cpu`), registered on import.

They multiply straight from the stored blocks, for the formats in `_cpu.kinds()`, on CPU
tensors: the direct products for a few input rows (`csrc/cpu_kernels.c`, each stored row
decoded in cache), and for many, the compiled GEMM with AVX-512 VNNI (`csrc/cpu_gemm.c`, a
tile of stored rows decoded once for all of them) or else bands of rows decoded for torch's
GEMM. They agree with the reference path up to the order of the float32 sums and, with VNNI
(and for the direct Q2_K, Q4_K and IQ2_XXS products with AVX2 alone), the inputs' rounding to
three int8 parts (two for IQ2_XXS's direct products, within s / 508 per value: docs/model.md,
"Kernels"). When
the extension was not built (no C compiler at install time), `dwarfstar.quant` warns once and
keeps the reference path. DWARFSTAR_KERNELS=reference forces the reference path.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings

import torch
from gguf import GGMLQuantizationType

from . import formats
from .ops import EXPERT_KERNELS, LINEAR_KERNELS
from .tensor import QTensor
from .threads import share_out

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


BANDED_GEMM_ROWS = 8
"""Without the compiled GEMM (no AVX-512 VNNI), from this many input rows per matrix (or expert)
on, decoding a band of rows at a time (in C) and multiplying it with torch's float32 GEMM beats
the direct float kernels (docs/benchmarks.md; the integer ones: AVX2_INTEGER_ROWS)."""

COMPILED_GEMM_ROWS = {
    GGMLQuantizationType.Q8_0: 3,
    GGMLQuantizationType.Q2_K: 5,
    GGMLQuantizationType.Q4_K: 5,
    GGMLQuantizationType.IQ2_XXS: 3,
    GGMLQuantizationType.MXFP4: 3,
    GGMLQuantizationType.F16: 4,
    GGMLQuantizationType.BF16: 4,
}
"""With AVX-512 VNNI, from this many input rows per matrix (or expert) on, the compiled GEMM
(`csrc/cpu_gemm.c`: a tile of stored rows decoded once, to int8 for the block formats, to
float32 for F16/BF16, for all the inputs) beats the direct kernels (docs/benchmarks.md, "The
integer GEMM")."""


AVX2_INTEGER_ROWS = {
    GGMLQuantizationType.Q2_K: 16,
    GGMLQuantizationType.Q4_K: 12,
    GGMLQuantizationType.IQ2_XXS: 12,
}
"""Without VNNI (AVX2, or AVX-512 without it), these formats' direct products multiply integers
(`csrc/cpu_kernels.c`, "integer products (AVX2)"), and beat the banded GEMM below this many input
rows, not below BANDED_GEMM_ROWS (docs/benchmarks.md, "Without VNNI")."""


def compiled_gemm(kind: GGMLQuantizationType) -> bool:
    """Whether products on format ``kind`` with many input rows take the compiled GEMM."""
    return kind in COMPILED_GEMM_ROWS and _cpu.isa() == "avx512vnni"


def gemm_rows(kind: GGMLQuantizationType) -> int:
    """From how many input rows on format ``kind`` takes a GEMM (the compiled one, else the
    banded float32 one), for the instruction set in use."""
    isa = _cpu.isa()
    if kind in COMPILED_GEMM_ROWS and isa == "avx512vnni":
        return COMPILED_GEMM_ROWS[kind]
    if kind in AVX2_INTEGER_ROWS and isa in ("avx2", "avx512"):
        return AVX2_INTEGER_ROWS[kind]
    return BANDED_GEMM_ROWS


FEWEST_GEMM_ROWS = min(BANDED_GEMM_ROWS, *COMPILED_GEMM_ROWS.values())
"""Below this many input rows every product takes the direct kernels (no need to ask which)."""


def linear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """x (n, cols) @ W.T for one matrix W (rows, cols)."""
    rows, cols = w.shape
    n = x.shape[0]
    if n >= FEWEST_GEMM_ROWS and n >= gemm_rows(w.kind):
        out = x.new_empty(n, rows)
        if compiled_gemm(w.kind):
            _compiled_gemm(x.contiguous(), w, None, out)
        else:
            threads = torch.get_num_threads()
            _run_bands([(x, w, out, first, last) for first, last in _spans(rows, cols, 4 * threads)], threads)
        return out
    # A decode step's path: kept short, its Python costs a few microseconds of every call.
    x = x.contiguous()
    out = x.new_empty(n, rows)
    data, kind, row_stride = _stored_rows(w)
    _cpu.matmul(
        kind, data.data_ptr(), 0, row_stride, rows, cols,
        x.data_ptr(), n, cols, 0, 1, 1, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def _stored_rows(w: QTensor) -> tuple[torch.Tensor, int, int]:
    """w.data, its format as an int and its row stride in bytes: worked out once per QTensor and
    kept in its __dict__ (a frozen dataclass; a slice or a replaced one is a new QTensor), checked
    against w.data itself in case that was swapped anyway. Saves a quarter of a decode step's
    Python per product."""
    stored = w.__dict__.get("_stored_rows")
    if stored is None or stored[0] is not w.data:
        stored = w.__dict__["_stored_rows"] = (w.data, int(w.kind), _row_stride(w.data))
    return stored


def expert_linear(x: torch.Tensor, w: QTensor, ids: torch.Tensor) -> torch.Tensor:
    """x (n, cols) through experts ids (n, k) of W (experts, rows, cols): (n, k, rows).

    Experts with at least gemm_rows(w.kind) rows (long prompts) take a GEMM: the compiled one
    in one call over all the pairs (it groups them by expert in C and skips the others), or the
    banded float32 one on their rows gathered once in expert order, the experts shared out among
    the threads; all the other (row, expert) pairs go through the direct kernel in one call,
    which groups them by expert in C (each expert's rows read once for all its inputs).
    """
    least = gemm_rows(w.kind)
    if ids.numel() < least:
        return _direct_expert_linear(x, w, ids)
    n, k = ids.shape
    experts, rows, cols = w.shape
    flat = ids.flatten()
    counts = torch.bincount(flat, minlength=experts)
    busy = counts >= least
    if not bool(busy.any()):
        return _direct_expert_linear(x, w, ids)
    out = x.new_empty(n * k, rows)
    in_busy = busy[flat]
    if compiled_gemm(w.kind):
        x = x.contiguous()
        _compiled_gemm(x, w, torch.where(in_busy, flat, -1).view(n, k), out)
        rest = (~in_busy).nonzero().flatten()
        if len(rest):
            out[rest] = _direct_expert_linear(x[rest // k], w, flat[rest, None])[:, 0]
        return out.view(n, k, -1)
    pairs = in_busy.nonzero().flatten()
    pairs = pairs[flat[pairs].argsort(stable=True)]  # grouped by expert
    inputs, results = x[pairs // k], x.new_empty(len(pairs), rows)
    busy_experts = busy.nonzero().flatten().tolist()
    threads = torch.get_num_threads()
    spans = _spans(rows, cols, -(-4 * threads // len(busy_experts)))
    work, start = [], 0
    for expert, count in zip(busy_experts, counts[busy].tolist(), strict=True):
        group = slice(start, start + count)
        work += [(inputs[group], w[expert], results[group], first, last) for first, last in spans]
        start += count
    work.sort(key=lambda item: -len(item[0]))  # the busiest experts first: less waiting at the end
    _run_bands(work, threads)
    out[pairs] = results
    rest = (~in_busy).nonzero().flatten()
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


def _compiled_gemm(x: torch.Tensor, w: QTensor, ids: torch.Tensor | None, out: torch.Tensor) -> None:
    """out = x @ W.T (one matrix, ids None) or each row through its experts ids (n, k) of W
    (experts, rows, cols), out (n * k, rows); pairs whose expert is -1 are left alone."""
    data = w.data
    *stacked, rows, cols = w.shape
    expert_stride = data.stride(0) * data.element_size() if stacked else 0
    address, k, experts = (0, 1, 1) if ids is None else (ids.data_ptr(), ids.shape[1], stacked[0])
    _cpu.gemm(
        int(w.kind), data.data_ptr(), expert_stride, _row_stride(data), rows, cols,
        x.data_ptr(), x.shape[0], cols, address, k, experts, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip


WIDE_GEMM_ROWS = 64
"""From this many input rows on, a band's product is band @ x.T; below, x @ band.T, which
torch's GEMM runs about twice as fast when x has few rows (an expert's share of a prompt)."""


def _multiply_bands(x: torch.Tensor, w: QTensor, out: torch.Tensor, first: int, last: int) -> None:
    """out[:, first:last] = x (n, cols) @ W[first:last].T on the calling thread: a band of W's
    rows at a time decoded (in C) into this thread's buffer, which stays in cache, then one
    float32 GEMM."""
    rows, cols = w.shape
    band = _band_rows(cols)
    weights = _band_buffer(band * cols).view(band, cols)
    data = w.data
    stride = _row_stride(data)
    for start in range(first, last, band):
        stop = min(start + band, last)
        decoded = weights[: stop - start]
        address = data.data_ptr() + start * stride
        _cpu.decode(int(w.kind), address, stride, stop - start, cols, decoded.data_ptr(), 1)
        if x.shape[0] >= WIDE_GEMM_ROWS:
            out[:, start:stop] = torch.mm(decoded, x.T).T
        else:
            torch.mm(x, decoded.T, out=out[:, start:stop])


def _band_rows(cols: int) -> int:
    return max(1, formats.BAND_VALUES // cols)


def _spans(rows: int, cols: int, parts: int) -> list[tuple[int, int]]:
    """Rows [0, rows) cut into about ``parts`` spans of whole bands."""
    band = _band_rows(cols)
    bands = -(-rows // band)
    per_span = max(1, -(-bands // max(1, parts))) * band
    return [(first, min(first + per_span, rows)) for first in range(0, rows, per_span)]


_local = threading.local()


def _band_buffer(values: int) -> torch.Tensor:
    """This thread's decoding buffer, at least ``values`` float32 (kept: a fresh 4 MiB buffer
    per band would cost its page faults every time)."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.numel() < values:
        buffer = _local.buffer = torch.empty(values)
    return buffer[:values]


def _run_bands(work: list[tuple], threads: int) -> None:
    """Run ``_multiply_bands`` on each item of ``work``, shared out among ``threads`` threads
    (`threads.py`: each decoding its own bands and running torch's GEMM on one thread)."""
    share_out(lambda item: _multiply_bands(*item), work, threads)


def _row_stride(data: torch.Tensor) -> int:
    """Bytes from one stored row to the next; each row's bytes must be contiguous."""
    *_, row, value = data.stride()
    if value != 1:
        raise ValueError("compiled kernels need each stored row contiguous")
    return row * data.element_size()


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
