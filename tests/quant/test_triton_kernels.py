"""The Triton kernels agree with the reference path, run on the CPU in Triton's interpreter.

Each kernel decodes a weight exactly as the reference decoders do (the dequantize kernel is
compared bit for bit) and sums in float32 in another order, so each product is within 1e-5 of
Σ_j |w_j x_j| (the scale of its rounding error) of the float64 product of the reference
weights. The interpreter is slow: tiny shapes, few cases. On a machine with CUDA the same
tests run the compiled kernels on the GPU.
"""

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from dwarfstar.quant import EXPERT_KERNELS, LINEAR_KERNELS, QTensor, dequantize, triton_kernels
from dwarfstar.synthetic.blocks import random_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # tests/conftest.py sets it before anything imports triton
    assert os.environ.get("TRITON_INTERPRET") == "1"
kernels = pytest.importorskip("dwarfstar.quant.triton.kernels", reason="triton is a test dependency")

KINDS = triton_kernels.KINDS


def random_qtensor(kind, shape, seed) -> QTensor:
    array = random_blocks(kind, shape, np.random.default_rng(seed))
    t = QTensor.from_numpy(kind, shape, array)
    return QTensor(t.kind, t.shape, t.data.to(DEVICE))


def assert_within_bound(ours, x, dense):
    """ours (n, rows) against x (n, cols) @ dense (rows, cols).T, in float64."""
    x64, w64 = x.double().cpu(), dense.double().cpu()
    exact = x64 @ w64.T
    bound = 1e-5 * (x64.abs() @ w64.abs().T) + 1e-30
    err = (ours.double().cpu() - exact).abs()
    assert (err <= bound).all(), f"worst excess {(err / bound).max():.3g}"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_dequantize_kernel_is_bit_exact(kind):
    w = random_qtensor(kind, (5, 512), seed=1)
    assert torch.equal(kernels.dequantize(w).cpu(), dequantize(QTensor(w.kind, w.shape, w.data.cpu())))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_matrix_times_vectors(kind):
    w = random_qtensor(kind, (20, 512), seed=2)  # 20 rows: a partial block of rows
    dense = dequantize(QTensor(w.kind, w.shape, w.data.cpu()))
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    assert_within_bound(kernels.linear(x, w), x, dense)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_split_products_and_partial_tiles(kind):
    """Rows in partial tiles of 8, the blocks of each row in 3 ranges (split-K) summed after the
    launch, 2 blocks per step: 5 blocks per row leave a partial step and a short last range."""
    cols = 5 * (64 if kind in (Q.F16, Q.BF16) else 32 if kind == Q.Q8_0 else 256)
    w = random_qtensor(kind, (20, cols), seed=9)
    dense = dequantize(QTensor(w.kind, w.shape, w.data.cpu()))
    x = torch.randn(2, cols, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    out = kernels.matvec(x, w, config=kernels.MatvecConfig(rows=8, blocks=2), split=3)
    assert_within_bound(out, x, dense)


@pytest.mark.parametrize("kind", [Q.IQ2_XXS, Q.Q2_K, Q.Q8_0], ids=lambda k: k.name)
def test_grouped_experts_one_launch(kind):
    """A token's experts (shared input row) and one row per slot (the down projection)."""
    w = random_qtensor(kind, (4, 8, 256), seed=4)
    dense = dequantize(QTensor(w.kind, w.shape, w.data.cpu()))
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ids = torch.tensor([[3, 0, 2], [1, 3, 3]], device=DEVICE)
    out = kernels.expert_linear(x, w, ids)
    for i in range(2):
        for j in range(3):
            assert_within_bound(out[i, j][None], x[i][None], dense[ids[i, j]])
    slots = torch.randn(4, 256, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    out = kernels.expert_linear(slots, w, ids.reshape(-1, 1)[:4])
    for p in range(4):
        assert_within_bound(out[p, 0][None], slots[p][None], dense[ids.reshape(-1)[p]])


@pytest.fixture
def float32_gemm(monkeypatch):
    """The GEMM kernel in plain float32 (on a GPU its default multiplies in tf32)."""
    monkeypatch.setattr(kernels, "GEMM_PRECISION", "ieee")


def test_many_rows_take_the_gemm_path(float32_gemm, monkeypatch):
    w = random_qtensor(Q.Q8_0, (3, 6, 64), seed=7)
    dense = dequantize(QTensor(w.kind, w.shape, w.data.cpu()))
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    assert_within_bound(kernels.linear(x, w[1]), x, dense[1])  # decoded in the GEMM's tiles
    monkeypatch.setattr(kernels, "DECODE_ONCE_ROWS", 10)
    assert_within_bound(kernels.linear(x, w[1]), x, dense[1])  # decoded once, then the GEMM
    ids = torch.tensor([[0, 2]] * 5 + [[1, 1]] * 5, device=DEVICE)
    out = kernels.expert_linear(x, w, ids)
    for i in range(10):
        for j in range(2):
            assert_within_bound(out[i, j][None], x[i][None], dense[ids[i, j]])


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_grouped_gemm(kind, float32_gemm, monkeypatch):
    """Many pairs in one launch: sorted by expert into tiles of 64 pairs (expert 1 fills more
    than one tile, expert 2 none), the weights decoded in the tiles (a GPU's: 32 values per step,
    within a block or across blocks); an input row per pair (the down projection) and a row
    shared by a token's experts."""
    monkeypatch.setattr(kernels, "GEMM_ROWS", 64)
    monkeypatch.setattr(kernels, "GEMM_STEP", 32)
    w = random_qtensor(kind, (3, 20, 512), seed=11)
    dense = dequantize(QTensor(w.kind, w.shape, w.data.cpu())).double()
    x = torch.randn(70, 512, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    ids = torch.tensor([[1, 0]] * 60 + [[0, 1]] * 10, device=DEVICE)
    shared = kernels.expert_linear(x, w, ids).reshape(140, -1)
    per_pair = kernels.expert_linear(x.repeat_interleave(2, 0).reshape(70, 2, -1), w, ids).reshape(140, -1)
    weights = dense[ids.reshape(-1).cpu()]
    x64 = x.double().cpu().repeat_interleave(2, 0)
    exact = torch.einsum("prc,pc->pr", weights, x64)
    bound = 1e-5 * torch.einsum("prc,pc->pr", weights.abs(), x64.abs())
    for out in (shared, per_pair):
        assert ((out.double().cpu() - exact).abs() <= bound).all()


def test_expert_tiles_are_scheduled_without_reading_back():
    """The grouped GEMM's schedule runs on `meta` (no values: any read back would fail there),
    so prefill's expert products never wait for the GPU; a fixed number of tiles."""
    slot_pair, tile_expert = kernels._expert_tiles(torch.zeros(100, dtype=torch.long, device="meta"), 8)
    assert slot_pair.shape == (10 * kernels.GEMM_PAIRS,) and tile_expert.shape == (10,)


def test_tf32_gemm_within_its_rounding():
    """The default GEMM rounds its inputs to tf32 on a GPU: within 2^-8 of Σ|w·x|."""
    w = random_qtensor(Q.IQ2_XXS, (2, 20, 256), seed=13)
    dense = dequantize(QTensor(w.kind, w.shape, w.data.cpu())).double()
    x = torch.randn(12, 256, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    out = kernels.linear(x, w[1]).double().cpu()
    bound = 2**-8 * (x.double().cpu().abs() @ dense[1].abs().T)
    assert ((out - x.double().cpu() @ dense[1].T).abs() <= bound).all()


def test_registered_for_cuda_tensors_only():
    for kind in KINDS:
        assert LINEAR_KERNELS["cuda", kind] is triton_kernels.linear
        assert EXPERT_KERNELS["cuda", kind] is triton_kernels.expert_linear
    assert ("cpu", Q.F16) not in LINEAR_KERNELS or LINEAR_KERNELS["cpu", Q.F16] is not triton_kernels.linear
