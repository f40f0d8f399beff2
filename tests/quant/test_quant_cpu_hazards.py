"""The compiled CPU kernels where a careless kernel would go wrong: non-finite inputs, two Python
threads calling at once, a forked child, expert ids out of range on every path.

Expected values come from the reference (dequantize, then torch's matmul) or from the same call
made alone, never from the path under test.
"""

import ctypes
import mmap
import os
import signal
import threading

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from dwarfstar.quant import QTensor, cpu, dequantize
from dwarfstar.quant.threads import share_out
from dwarfstar.synthetic.blocks import random_blocks

try:
    from dwarfstar.quant import _cpu
except ImportError as error:  # fail, never skip: `make test` builds the extension
    raise ImportError("the compiled kernels are not built: python setup.py build_ext --inplace") from error

VNNI = pytest.mark.skipif(_cpu.isa() != "avx512vnni", reason="the compiled GEMM needs AVX-512 VNNI")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def random_qtensor(kind, shape, seed) -> QTensor:
    return QTensor.from_numpy(kind, shape, random_blocks(kind, shape, np.random.default_rng(seed)))


def columns(kind) -> int:
    return 512 if kind not in (Q.F16, Q.BF16) else 101


@pytest.mark.parametrize("kind", cpu.kinds(), ids=lambda kind: kind.name)
@pytest.mark.parametrize("batch", [1, 2, 16], ids=["one-row", "direct", "gemm"])
def test_non_finite_inputs_reach_their_outputs_only(kind, batch, isa):
    """A NaN in an input row makes its outputs NaN and an infinity makes them non-finite, as in
    the reference, on every path (the integer ones round each block of 256 inputs by its largest
    magnitude, which a NaN must not slip past); the other rows stay finite."""
    cols = columns(kind)
    w = random_qtensor(kind, (29, cols), batch)
    x = torch.from_numpy(np.random.default_rng(batch).standard_normal((batch, cols), dtype=np.float32))
    x[0, 3] = float("nan")
    if batch > 1:
        x[1, cols - 1] = float("inf")
    ours, reference = cpu.linear(x, w), x @ dequantize(w).T
    assert reference[0].isnan().all() and ours[0].isnan().all()
    if batch > 1:
        assert not reference[1].isfinite().any() and not ours[1].isfinite().any()
    assert ours[2:].isfinite().all()


def between_guard_pages(array: np.ndarray, mappings: list) -> list[np.ndarray]:
    """Two copies of ``array``: one whose first byte follows an inaccessible page, one whose
    last byte precedes one (a file's first and last tensors border its mapping so). A kernel
    that reads a byte before or after them faults. The mappings go to ``mappings``."""
    pages = -(-array.nbytes // mmap.PAGESIZE)
    mprotect = ctypes.CDLL(None).mprotect
    mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    copies = []
    for start in (mmap.PAGESIZE, (pages + 1) * mmap.PAGESIZE - array.nbytes):
        mapping = mmap.mmap(-1, (pages + 2) * mmap.PAGESIZE)
        copy = np.frombuffer(mapping, dtype=array.dtype, count=array.size, offset=start).reshape(array.shape)
        copy[...] = array
        base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        for guard in (0, pages + 1):
            assert mprotect(base + guard * mmap.PAGESIZE, mmap.PAGESIZE, 0) == 0  # PROT_NONE
        mappings.append(mapping)
        copies.append(copy)
    return copies


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mprotect"), reason="needs mprotect")
@pytest.mark.parametrize("kind", cpu.kinds(), ids=lambda kind: kind.name)
def test_no_kernel_reads_past_the_ends_of_weights_or_inputs(kind, isa, two_threads):
    """Weights and inputs that start right after and end right before an inaccessible page, on
    every path (one row, direct, GEMM; one matrix and experts) and instruction set: no read past
    either end (a prefetch may, it never faults; a load may not), and the products are right.
    Odd shapes: 37 rows (a partial tile), Q8_0 and MXFP4 9 blocks of 32 (the inputs' last block of
    256 short, 32 values: one stored block where the direct integer kernels take two), the
    K-formats and IQ2_XXS 3 blocks (one-row IQ2_XXS decodes blocks in pairs), F16/BF16 101 columns."""
    cols = {Q.F16: 101, Q.BF16: 101, Q.Q8_0: 32 * 9, Q.MXFP4: 32 * 9}.get(kind, 256 * 3)
    generator, mappings = np.random.default_rng(1), []
    for shape in ((37, cols), (3, 21, cols)):
        blocks = random_blocks(kind, shape, generator)
        dense = dequantize(QTensor.from_numpy(kind, shape, blocks))
        for weights in between_guard_pages(blocks, mappings):
            w = QTensor.from_numpy(kind, shape, weights)
            for n in (1, 2, 5, 16):
                inputs = generator.standard_normal((n, cols), dtype=np.float32)
                ids = torch.from_numpy(generator.integers(0, 3, size=(n, 2)))
                for x in map(torch.from_numpy, between_guard_pages(inputs, mappings)):
                    # IQ2_XXS's direct integer products round each input to two int8 parts:
                    # within s / 508 per value, s = max|x| / 127 of its block (docs/model.md)
                    two_parts = kind == Q.IQ2_XXS and isa != "portable"
                    blocks_of_x = x.split(256, -1)
                    step = torch.cat([b.abs().amax(-1, keepdim=True).expand_as(b) for b in blocks_of_x], -1)
                    rounding = step / (127 * 508) if two_parts else torch.zeros_like(x)
                    if len(shape) == 2:
                        ours, reference = cpu.linear(x, w), x @ dense.T
                        slack = rounding @ dense.abs().T
                    else:
                        ours = cpu.expert_linear(x, w, ids)
                        reference = torch.einsum("nc,nkrc->nkr", x, dense[ids])
                        slack = torch.einsum("nc,nkrc->nkr", rounding, dense[ids].abs())
                    assert ((ours - reference).abs() <= 1e-4 + 1e-4 * reference.abs() + slack).all()


# Per format: the stored bytes of the codes (and sub-block scales) in each block, set to their
# largest so that one group's integer sum is as large as a format allows.
LARGEST_CODES = {
    Q.Q8_0: [(slice(2, 34), 0x7F)],  # q = 127: code 255 once offset by 128
    Q.Q2_K: [(slice(0, 16), 0xFF), (slice(16, 80), 0xFF)],  # scales and mins 15, codes 3
    Q.Q4_K: [(slice(4, 16), 0xFF), (slice(16, 144), 0xFF)],  # scales and mins 63, codes 15
    Q.MXFP4: [(slice(1, 17), 0x77)],  # e2m1 6.0 (doubled 12) everywhere
    # every point the grid's largest (57: 8 25 43 43 43 25 8 8), all signs positive, s = 15
    Q.IQ2_XXS: [(slice(2 + 8 * g, 6 + 8 * g), 57) for g in range(8)]
    + [(slice(6 + 8 * g, 10 + 8 * g), [0, 0, 0, 0xF0]) for g in range(8)],
}
BLOCK_BYTES = {Q.Q8_0: 34, Q.Q2_K: 84, Q.Q4_K: 144, Q.MXFP4: 17, Q.IQ2_XXS: 66}


@pytest.mark.parametrize("kind", sorted(LARGEST_CODES), ids=lambda kind: kind.name)
@pytest.mark.parametrize("batch", [1, 2, 16], ids=["one-row", "direct", "gemm"])
def test_the_largest_codes_against_the_largest_parts_do_not_overflow(kind, batch, isa):
    """Every code at its largest meets inputs that all round to the largest part (127): the
    integer sums over a scale group (Q2_K: 256 values) are at their largest (AVX2: the int16
    pair sums of `vpmaddubsw` too, which would saturate), and must still match the reference
    within the usual bound (the two-part IQ2_XXS products: plus s / 508 per value)."""
    cols = 1024
    blocks = random_blocks(kind, (19, cols), np.random.default_rng(7))
    block_bytes = blocks.reshape(-1, BLOCK_BYTES[kind])
    for where, value in LARGEST_CODES[kind]:
        block_bytes[:, where] = value
    w = QTensor.from_numpy(kind, (19, cols), blocks)
    x = torch.full((batch, cols), 0.5)
    x[:, torch.arange(cols) % 4 < 2] = 3.0  # s = 3 / 127: 3.0 -> 127 (neighbours: a pair), 0.5 -> 21 + parts
    dense = dequantize(w).double()
    error = (cpu.linear(x, w).double() - x.double() @ dense.T).abs()
    bound = 1e-5 * (x.abs().double() @ dense.abs().T)
    if kind == Q.IQ2_XXS and isa != "portable" and batch < cpu.gemm_rows(kind):  # two parts: s / 508
        bound += (3 / 127 / 508) * dense.abs().sum(-1)
    assert (error <= bound).all()


def test_two_python_threads_calling_at_once_get_what_each_gets_alone(two_threads):
    """The server's model thread and another thread may call the kernels at the same time: their
    calls share one pool of C threads (and the GEMM keeps a tile buffer per thread), so each must
    get exactly the outputs it gets alone: a one-row product, a GEMM and its float32 variant."""
    work = []
    for seed, (kind, batch) in enumerate([(Q.IQ2_XXS, 1), (Q.Q8_0, 24), (Q.Q2_K, 9), (Q.F16, 20)]):
        w = random_qtensor(kind, (70, 1024), seed)
        x = torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, 1024), dtype=np.float32))
        work.append((x, w, cpu.linear(x, w)))
    mismatches = []

    def repeat(x, w, alone):
        for _ in range(100):
            if not torch.equal(cpu.linear(x, w), alone):
                mismatches.append(w.kind.name)

    callers = [threading.Thread(target=repeat, args=item) for item in work]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert mismatches == []


def test_back_to_back_calls_with_changing_threads_and_items_get_what_one_thread_gets():
    """The C pool's workers join each call through a shared ticket, and a call may want fewer of
    them than the last (fewer items than threads): thousands of calls in a row, from one to 32
    items (bands of stored rows decoded) on one to four threads, must each run every item,
    whichever workers are awake, late or left out (the outputs start as NaN: an item skipped
    shows)."""
    w = random_qtensor(Q.IQ2_XXS, (40, 256), 0)
    stride = w.data.stride(0)

    def decoded(rows, threads):
        out = torch.full((rows, 256), float("nan"))
        _cpu.decode(int(w.kind), w.data.data_ptr(), stride, rows, 256, out.data_ptr(), threads)
        return out

    alone = {rows: decoded(rows, 1) for rows in range(1, 41)}
    rng = np.random.default_rng(1)
    for rows, threads in zip(
        rng.integers(1, 41, 3000).tolist(), rng.integers(1, 5, 3000).tolist(), strict=True
    ):
        assert torch.equal(decoded(rows, threads), alone[rows]), (rows, threads)


def test_a_forked_child_runs_the_kernels_and_the_pools(two_threads, isa):
    """A child forked after the C pool and the Python pool have run has none of their threads:
    it must start its own (not wait for ever on the parent's) and get the parent's outputs, on
    every instruction set (without VNNI the 24 rows take torch's GEMM, whose OpenMP threads hang
    a forked child unless it runs torch on one thread)."""
    w = random_qtensor(Q.Q8_0, (70, 1024), 0)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((24, 1024), dtype=np.float32))
    alone = [cpu.linear(x[:1], w), cpu.linear(x, w)]
    shared = torch.zeros(4)
    share_out(lambda i: shared.__setitem__(i, i + 1), range(4), 2)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 on success, killed by the alarm if it hangs
        signal.alarm(60)
        try:
            ok = torch.equal(cpu.linear(x[:1], w), alone[0]) and torch.equal(cpu.linear(x, w), alone[1])
            share_out(lambda i: shared.__setitem__(i, 10 * (i + 1)), range(4), 2)
            ok = ok and shared.tolist() == [10.0, 20.0, 30.0, 40.0] and torch.get_num_threads() == 1
            ok = ok and torch.equal(cpu.linear(x, w), alone[1])  # after the child's own pool
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("ids", [[[0, 3]], [[-1, 0]]], ids=["past-the-last", "negative"])
def test_the_direct_kernel_refuses_experts_out_of_range(ids):
    w = random_qtensor(Q.Q8_0, (3, 4, 64), 0)
    with pytest.raises(IndexError, match="out of range"):
        cpu._direct_expert_linear(torch.zeros(1, 64), w, torch.tensor(ids))


@VNNI
def test_the_compiled_gemm_refuses_experts_past_the_last():
    """(Negative experts are skipped there: test_quant_cpu_kernels.py.)"""
    w = random_qtensor(Q.Q8_0, (3, 4, 64), 0)
    out = torch.zeros(8, 4)
    with pytest.raises(IndexError, match="out of range"):
        cpu._compiled_gemm(torch.zeros(4, 64), w, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 0]]), out)


@VNNI
def test_without_vnni_the_compiled_gemm_is_not_offered():
    """Forcing an older instruction set (as on a CPU without AVX-512 VNNI) takes the GEMM out:
    the products fall back to the banded float32 GEMM, and a direct call says why."""
    w = random_qtensor(Q.Q8_0, (4, 64), 0)
    _cpu.set_isa("avx512")
    try:
        assert _cpu.gemm_kinds() == [] and not cpu.compiled_gemm(Q.Q8_0)
        with pytest.raises(ValueError, match="no compiled GEMM"):
            cpu._compiled_gemm(torch.zeros(4, 64), w, None, torch.zeros(4, 4))
    finally:
        _cpu.set_isa("avx512vnni")


def test_a_qtensor_whose_data_is_swapped_multiplies_its_new_data():
    """cpu.linear keeps each QTensor's format and row stride; a QTensor whose data is swapped
    (past the frozen dataclass), or a matrix taken out of a stack, must not use another's."""

    def check(x, w, expected):  # IQ2_XXS's direct products round the inputs to s / 508
        torch.testing.assert_close(cpu.linear(x, w), x @ dequantize(expected).T, rtol=1e-2, atol=1e-2)

    stack = random_qtensor(Q.IQ2_XXS, (2, 8, 256), 0)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32))
    first, second = stack[0], stack[1]
    check(x, first, first)
    object.__setattr__(first, "data", second.data)
    check(x, first, second)
    wider = random_qtensor(Q.Q2_K, (8, 512), 1)
    for field in ("data", "kind", "shape"):
        object.__setattr__(first, field, getattr(wider, field))
    check(
        torch.from_numpy(np.random.default_rng(1).standard_normal((1, 512), dtype=np.float32)), first, wider
    )
