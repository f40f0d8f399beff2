"""The compiled CPU kernels agree with dequantize-then-matmul, and the fallback works.

The float kernels decode each weight exactly as the reference decoders do and sum in float32 in
another order (so does the compiled GEMM's float32 path for F16/BF16); the integer ones (AVX-512
VNNI: the direct products and the integer GEMM; AVX2 and AVX-512F: the direct Q2_K, Q4_K and
IQ2_XXS products of a few rows) also round each input to three int8 parts per
256 values (about 24 bits). Either way each output is
within 1e-5 of sum_j |w_j x_j| (the scale of its rounding error) of the reference, and the
integer rounding stays within its documented bound even when a block holds an outlier. The
direct IQ2_XXS integer products (a decode step's) take two parts only: each
output within sum_j |w_j| s_j / 508 (s_j = max|x| / 127 of value j's block), plus float32's
rounding, of the reference (docs/model.md, "Integer products").
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from dwarfstar.quant import QTensor, cpu, dequantize, expert_linear, formats, linear, ops
from dwarfstar.synthetic.blocks import random_blocks

try:
    from dwarfstar.quant import _cpu
except ImportError as error:  # fail, never skip: `make test` builds the extension
    raise ImportError("the compiled kernels are not built: python setup.py build_ext --inplace") from error

COMPILED = cpu.kinds()


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}threads")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def random_qtensor(kind, shape, generator) -> QTensor:
    return QTensor.from_numpy(kind, shape, random_blocks(kind, shape, generator))


def block_steps(x: torch.Tensor) -> torch.Tensor:
    """Each input value's rounding step s = max|x| / 127 over its block of 256, in float64."""
    steps = [block.abs().amax(-1, keepdim=True).expand_as(block) for block in x.split(256, -1)]
    return torch.cat(steps, -1).double() / 127


def two_parts(kind, rows: int) -> bool:
    """Whether a product of ``rows`` input rows on ``kind`` takes a direct IQ2_XXS integer
    kernel (AVX-512 VNNI or AVX2, below the GEMM's crossover), which rounds its inputs to two
    int8 parts."""
    return kind == Q.IQ2_XXS and _cpu.isa() != "portable" and rows < cpu.gemm_rows(kind)


def assert_within_bound(kind, ours, x, dense):
    """|ours - x @ dense.T| <= 1e-5 sum_j |x_j w_j| for each output, or for the two-part IQ2_XXS
    products sum_j |w_j| s_j / 508 + 2e-6 sum_j |x_j w_j|; x (n, cols), dense (rows, cols)."""
    if two_parts(kind, x.shape[0]):
        bound = (block_steps(x) / 508) @ dense.abs().double().T + 2e-6 * (x.abs() @ dense.abs().T).double()
    else:
        bound = 1e-5 * (x.abs() @ dense.abs().T)
    worst = ((ours - x @ dense.T).abs() / bound).max()
    assert worst <= 1, f"{kind.name}: error {float(worst):.3g} x the bound"


def cols_for(kind) -> int:
    """An odd number of blocks."""
    return 3 * (256 if kind in (Q.Q2_K, Q.Q4_K, Q.IQ2_XXS) else 32) + (5 if kind in (Q.F16, Q.BF16) else 0)


def test_the_compiled_formats_are_registered_for_cpu():
    assert set(COMPILED) == {Q.Q8_0, Q.Q2_K, Q.Q4_K, Q.IQ2_XXS, Q.MXFP4, Q.F16, Q.BF16}
    if os.environ.get(cpu.ENVIRONMENT) != "reference":
        for kind in COMPILED:
            assert ops.LINEAR_KERNELS["cpu", kind] is cpu.linear
            assert ops.EXPERT_KERNELS["cpu", kind] is cpu.expert_linear


@pytest.mark.parametrize("kind", COMPILED, ids=lambda kind: kind.name)
@pytest.mark.parametrize("batch", [1, 2, 7, 64])
def test_linear_agrees_with_dequantize_then_matmul(kind, batch, isa, threads):
    generator = np.random.default_rng(batch)
    cols = cols_for(kind)
    w = random_qtensor(kind, (37, cols), generator)
    x = torch.from_numpy(generator.standard_normal((batch, cols), dtype=np.float32))
    ours = cpu.linear(x, w)
    assert ours.shape == (batch, 37)
    assert_within_bound(kind, ours, x, dequantize(w))


@pytest.mark.parametrize("batch", [16, 64])
def test_bands_shared_out_among_threads_inside_inference_mode(batch, monkeypatch):
    """The model runs in inference mode, a per-thread state: the pool's threads writing results
    of a product cut into many bands (a band of 4 rows here) follow it. (The banded GEMM, as on
    a CPU without VNNI, where the compiled GEMM does not run.)"""
    monkeypatch.setattr(formats, "BAND_VALUES", 4 * cols_for(Q.Q8_0))
    monkeypatch.setattr(cpu, "compiled_gemm", lambda kind: False)
    generator = np.random.default_rng(3)
    cols, before = cols_for(Q.Q8_0), torch.get_num_threads()
    w = random_qtensor(Q.Q8_0, (37, cols), generator)
    experts = random_qtensor(Q.Q8_0, (3, 37, cols), generator)
    x = torch.from_numpy(generator.standard_normal((batch, cols), dtype=np.float32))
    ids = torch.from_numpy(generator.integers(0, 3, size=(batch, 2)))
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            ours, ours_experts = cpu.linear(x, w), cpu.expert_linear(x, experts, ids)
    finally:
        torch.set_num_threads(before)
    assert_within_bound(Q.Q8_0, ours, x, dequantize(w))
    dense = dequantize(experts)
    for j in range(2):
        for e in range(3):
            rows = ids[:, j] == e
            assert_within_bound(Q.Q8_0, ours_experts[rows, j], x[rows], dense[e])


@pytest.mark.parametrize("kind", COMPILED, ids=lambda kind: kind.name)
def test_linear_takes_non_contiguous_inputs_and_leading_dims(kind):
    generator = np.random.default_rng(5)
    cols = cols_for(kind)
    w = random_qtensor(kind, (9, cols), generator)
    x = torch.from_numpy(generator.standard_normal((cols, 2, 5), dtype=np.float32)).permute(1, 2, 0)
    assert not x.is_contiguous()
    ours = linear(x, w)  # the entry point, through the registry (10 rows: a GEMM)
    assert ours.shape == (2, 5, 9)
    assert_within_bound(kind, ours.reshape(10, 9), x.reshape(10, cols), dequantize(w))


@pytest.mark.parametrize("kind", COMPILED, ids=lambda kind: kind.name)
@pytest.mark.parametrize("shared", [True, False], ids=["shared-rows", "row-per-slot"])
@pytest.mark.parametrize("n", [7, 40], ids=lambda n: f"{n}rows")
def test_expert_linear_agrees_with_dequantize_then_matmul(kind, shared, n, isa, threads):
    """Rows routed to repeated and distinct experts of a stack, with experts nobody uses; with
    40 rows some experts get enough of them for the banded GEMM."""
    generator = np.random.default_rng(11)
    cols, experts, k = cols_for(kind), 6, 3
    w = random_qtensor(kind, (experts, 13, cols), generator)
    ids = torch.from_numpy(generator.integers(0, experts - 1, size=(n, k)))  # the last expert unused
    ids[0] = torch.tensor([2, 2, 0])
    x_shape = (n, cols) if shared else (n, k, cols)
    x = torch.from_numpy(generator.standard_normal(x_shape, dtype=np.float32))
    ours = expert_linear(x, w, ids)
    assert ours.shape == (n, k, 13)
    dense = dequantize(w)
    rows = x.unsqueeze(1).expand(n, k, cols) if shared else x
    for i in range(n):
        for j in range(k):
            assert_within_bound(kind, ours[i, j : j + 1], rows[i, j : j + 1], dense[ids[i, j]])


@pytest.mark.parametrize("kind", COMPILED, ids=lambda kind: kind.name)
def test_many_experts_with_a_few_rows_each(kind, isa, threads):
    """A prefill's routing: 64 rows each through 6 of 32 experts (about 12 rows per expert, in
    one call grouped by expert in C), two experts never chosen, repeats within a row."""
    generator = np.random.default_rng(17)
    cols, experts, k, n = cols_for(kind), 32, 6, 64
    w = random_qtensor(kind, (experts, 11, cols), generator)
    ids = torch.from_numpy(generator.integers(0, experts - 2, size=(n, k)))
    ids[1] = 7  # one row sent six times to one expert
    x = torch.from_numpy(generator.standard_normal((n, cols), dtype=np.float32))
    ours = expert_linear(x, w, ids)
    dense = dequantize(w)[ids]  # (n, k, rows, cols)
    reference = torch.einsum("nc,nkrc->nkr", x.double(), dense.double())
    bound = 1e-5 * torch.einsum("nc,nkrc->nkr", x.abs().double(), dense.abs().double())
    assert ((ours.double() - reference).abs() <= bound).all()


INTEGER = [kind for kind in COMPILED if kind not in (Q.F16, Q.BF16)]
GEMM = pytest.mark.skipif(_cpu.isa() != "avx512vnni", reason="the compiled GEMM needs AVX-512 VNNI")


@pytest.mark.parametrize("kind", INTEGER, ids=lambda kind: kind.name)
@pytest.mark.parametrize("batch", [1, 2, 16], ids=["one-row", "direct", "gemm"])
@pytest.mark.parametrize("blocks", [2, 5], ids=lambda n: f"{n}blocks")
def test_integer_products_stay_within_their_rounding_bound(kind, batch, blocks, isa):
    """Inputs with one large value per block: each value is rounded to s (a0 + a1/254 + a2/254^2),
    s = max|x| / 127 over its 256 values, so by at most s / (2 * 254^2) (the direct IQ2_XXS
    products: s (a0 + a1/254), by at most s / 508); float32's own rounding
    of x / s and of the sums adds 2e-6 sum_j |w_j x_j|. The bound must hold for every output
    (the float kernels meet it too), and is tight: one int8 part (s / 2) would be far off. With
    16 rows the integer GEMM takes the product (on AVX-512 VNNI). Two and five blocks of 256:
    the direct IQ2_XXS product decodes blocks in pairs, the last one alone when odd."""
    generator = np.random.default_rng(3)
    cols = 256 * blocks + (32 if kind in (Q.Q8_0, Q.MXFP4) else 0)  # a last, short block of 32 too
    w = random_qtensor(kind, (29, cols), generator)
    x = generator.standard_normal((batch, cols)).astype(np.float32)
    x[:, 5::256] *= 1000.0  # an outlier in every block
    x = torch.from_numpy(x)
    dense = dequantize(w).double()
    error = (cpu.linear(x, w).double() - x.double() @ dense.T).abs()
    step = block_steps(x)
    rounding = 2 * 254 if two_parts(kind, batch) else 2 * 254**2
    bound = (step / rounding) @ dense.abs().T + 2e-6 * (x.abs().double() @ dense.abs().T)
    assert (error <= bound).all(), float((error / bound).max())
    assert (step / 2 @ dense.abs().T > 100 * bound).all()  # one int8 part could be this far off


@pytest.mark.skipif(_cpu.isa() != "avx512vnni", reason="needs a CPU with AVX-512 VNNI")
@pytest.mark.parametrize("kind", [Q.F16, Q.BF16], ids=lambda kind: kind.name)
@pytest.mark.parametrize("batch", [1, 3])
def test_with_vnni_16_bit_rows_take_the_avx512_float_kernels(kind, batch):
    """F16 and BF16 have no integer products: with VNNI their direct products must still take
    the 16-wide AVX-512 kernels, not the 8-wide AVX2 ones (1.5x slower a row, cache-warm). The
    two add in different orders, so the outputs match AVX-512's bit for bit and not AVX2's."""
    generator = np.random.default_rng(41)
    w = random_qtensor(kind, (37, 4096 + 5), generator)
    x = torch.from_numpy(generator.standard_normal((batch, 4096 + 5), dtype=np.float32))
    outputs = {}
    try:
        for isa in ("avx2", "avx512", "avx512vnni"):
            _cpu.set_isa(isa)
            outputs[isa] = cpu.linear(x, w)
    finally:
        _cpu.set_isa("avx512vnni")
    assert not torch.equal(outputs["avx2"], outputs["avx512"])  # the test can tell them apart
    assert torch.equal(outputs["avx512vnni"], outputs["avx512"])


def mxfp4_rows(exponents, rows: int, cols: int, generator) -> QTensor:
    """MXFP4 rows of random codes, each block's exponent byte drawn from ``exponents``."""
    blocks = generator.integers(0, 256, size=(rows, cols // 32, 17), dtype=np.uint8)
    blocks[..., 0] = generator.choice(np.asarray(exponents), size=(rows, cols // 32))
    return QTensor.from_numpy(Q.MXFP4, (rows, cols), blocks.reshape(rows, -1))


def test_mxfp4_decodes_every_exponent_and_code_exactly(isa):
    """The C decoder (the banded GEMM's) gives formats.mxfp4's bits for every exponent byte: the
    subnormal scales (e < 2), the infinite values of the largest (e > 252) too; row e holds
    every code byte once."""
    blocks = np.zeros((256, 16, 17), dtype=np.uint8)
    blocks[..., 0] = np.arange(256)[:, None]
    blocks[..., 1:] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    w = QTensor.from_numpy(Q.MXFP4, (256, 512), blocks.reshape(256, -1))
    ours = torch.full((256, 512), float("nan"))
    _cpu.decode(int(Q.MXFP4), w.data.data_ptr(), 16 * 17, 256, 512, ours.data_ptr(), 1)
    reference = dequantize(w)
    assert reference[253:].isinf().any() and (reference[:2] != 0).any()  # the edges are there
    assert torch.equal(ours.view(torch.int32), reference.view(torch.int32))


@pytest.mark.parametrize("batch", [1, 2, 16], ids=["one-row", "direct", "gemm"])
def test_mxfp4_products_at_the_extreme_exponents(batch, isa):
    """Blocks with subnormal scales (e < 2) and with the largest exponents the integer kernels
    take for any input (e <= 237: values up to 12 * 2^109; their sums hold the inputs in units of
    their rounding step, docs/model.md), and rows mixing all of them: each product within 1e-5
    sum_j |x_j w_j| of the exact one, with inputs scaled down where the weights are large."""
    generator = np.random.default_rng(31)
    cols = 32 * 9
    for exponents, x_scale in (([0, 1, 2, 3], 1.0), (range(230, 238), 2.0**-40), (range(238), 2.0**-40)):
        w = mxfp4_rows(exponents, 21, cols, generator)
        x = torch.from_numpy(generator.standard_normal((batch, cols), dtype=np.float32)) * x_scale
        dense = dequantize(w).double()
        error = (cpu.linear(x, w).double() - x.double() @ dense.T).abs()
        assert (error <= 1e-5 * (x.abs().double() @ dense.abs().T)).all(), list(exponents)[:3]


@GEMM
@pytest.mark.parametrize("kind", COMPILED, ids=lambda kind: kind.name)
@pytest.mark.parametrize("batch", [1, 2, 4, 7, 8, 13, 64])
def test_compiled_gemm_agrees_with_dequantize_then_matmul(kind, batch, threads):
    """The compiled GEMM on its own, below its crossover too: 37 stored rows (a tile of 32 and
    one of 5), an odd number of blocks (F16/BF16: 101 columns), inputs in passes of 3, then 2
    or 1 (integer), of 12, 4 and 1 (float32)."""
    generator = np.random.default_rng(batch)
    cols = cols_for(kind)
    w = random_qtensor(kind, (37, cols), generator)
    x = torch.from_numpy(generator.standard_normal((batch, cols), dtype=np.float32))
    out = x.new_full((batch, 37), float("nan"))
    cpu._compiled_gemm(x, w, None, out)
    assert_within_bound(kind, out, x, dequantize(w))


@GEMM
def test_compiled_gemm_takes_long_prompts_in_slices_and_skips_unchosen_pairs(threads):
    """16384 columns: a slice (the input rows one decoded tile meets) holds 340 rows' 16 MiB of
    parts, so an expert's 400-odd rows take two; pairs with expert -1 are left to another
    kernel (untouched here)."""
    generator = np.random.default_rng(23)
    cols, n, k = 16384, 600, 2
    w = random_qtensor(Q.Q8_0, (2, 37, cols), generator)
    x = torch.from_numpy(generator.standard_normal((n, cols), dtype=np.float32))
    ids = torch.from_numpy(generator.integers(-1, 2, size=(n, k)))
    out = x.new_full((n * k, 37), float("nan"))
    cpu._compiled_gemm(x, w, ids, out)
    dense = dequantize(w)
    flat = ids.flatten()
    assert out[flat < 0].isnan().all()
    for e in range(2):
        pairs = (flat == e).nonzero().flatten()
        assert len(pairs) > 340
        assert_within_bound(Q.Q8_0, out[pairs], x[pairs // k], dense[e])


def test_expert_ids_out_of_range_raise():
    w = random_qtensor(Q.Q8_0, (2, 4, 64), np.random.default_rng(0))
    with pytest.raises(IndexError, match="out of range"):
        cpu.expert_linear(torch.zeros(1, 64), w, torch.tensor([[2]]))


def test_missing_extension_warns_once_and_keeps_the_reference(monkeypatch):
    monkeypatch.setattr(cpu, "_cpu", None)
    monkeypatch.setattr(ops, "LINEAR_KERNELS", {})
    monkeypatch.setattr(ops, "EXPERT_KERNELS", {})
    monkeypatch.delenv(cpu.ENVIRONMENT, raising=False)
    with pytest.warns(RuntimeWarning, match="pure-torch"):
        cpu.register()
    assert ops.LINEAR_KERNELS == {} and ops.EXPERT_KERNELS == {}
    generator = np.random.default_rng(0)
    w = random_qtensor(Q.IQ2_XXS, (3, 256), generator)
    x = torch.from_numpy(generator.standard_normal((2, 256), dtype=np.float32))
    torch.testing.assert_close(linear(x, w), x @ dequantize(w).T, rtol=1e-5, atol=1e-4)


def test_environment_forces_the_reference_path():
    code = (
        "from dwarfstar.quant import ops; "
        "print(sorted(str(key) for key in (*ops.LINEAR_KERNELS, *ops.EXPERT_KERNELS)))"
    )
    env = {**os.environ, cpu.ENVIRONMENT: "reference"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert result.stderr == ""  # forcing it is not a warning
