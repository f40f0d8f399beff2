"""take_rows, linear and expert_linear agree with dequantizing everything, then indexing/multiplying.

These check the reference path (the registries emptied); test_quant_cpu_kernels.py checks the
compiled kernels against it.
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from hypothesis import given, settings
from hypothesis import strategies as st

from dwarfstar.quant import (
    SUPPORTED_KINDS,
    QTensor,
    dequantize,
    expert_linear,
    formats,
    linear,
    ops,
    take_rows,
)
from dwarfstar.synthetic.blocks import random_blocks

kinds = st.sampled_from(SUPPORTED_KINDS)
seeds = st.integers(0, 2**32 - 1)


def random_qtensor(kind, shape, generator) -> QTensor:
    return QTensor.from_numpy(kind, shape, random_blocks(kind, shape, generator))


@pytest.fixture(autouse=True, scope="module")
def reference_kernels():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "LINEAR_KERNELS", {})
        patch.setattr(ops, "EXPERT_KERNELS", {})
        yield


def assert_matmul_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)


def test_formats_without_a_registered_kernel_take_the_reference_path():
    """An empty registry still multiplies every format with a decoder."""
    generator = np.random.default_rng(0)
    x = torch.from_numpy(generator.standard_normal((2, 256), dtype=np.float32))
    for kind in formats.BLOCK_DECODERS:
        w = random_qtensor(kind, (2, 3, 256), generator)
        assert_matmul_close(linear(x, w[1]), x @ dequantize(w)[1].T)
        ids = torch.tensor([[1], [0]])
        assert_matmul_close(
            expert_linear(x, w, ids)[:, 0],
            torch.stack([x[0] @ dequantize(w)[1].T, x[1] @ dequantize(w)[0].T]),
        )


@settings(deadline=None, max_examples=50)
@given(kind=kinds, rows=st.integers(1, 6), index_shape=st.sampled_from([(), (3,), (2, 4)]), seed=seeds)
def test_take_rows_is_dequantize_then_index(kind, rows, index_shape, seed):
    generator = np.random.default_rng(seed)
    w = random_qtensor(kind, (rows, 256), generator)
    index = torch.from_numpy(generator.integers(0, rows, size=index_shape))
    ours = take_rows(w, index)
    assert ours.shape == (*index_shape, 256)
    torch.testing.assert_close(ours, dequantize(w)[index], rtol=0, atol=0)


@settings(deadline=None, max_examples=50)
@given(kind=kinds, rows=st.integers(1, 6), x_shape=st.sampled_from([(1,), (3,), (2, 3)]), seed=seeds)
def test_linear_is_dequantize_then_matmul(kind, rows, x_shape, seed):
    generator = np.random.default_rng(seed)
    w = random_qtensor(kind, (rows, 512), generator)
    x = torch.from_numpy(generator.standard_normal((*x_shape, 512), dtype=np.float32))
    ours = linear(x, w)
    assert ours.dtype == torch.float32
    assert_matmul_close(ours, x @ dequantize(w).T)


@pytest.mark.parametrize("kind", SUPPORTED_KINDS, ids=lambda kind: kind.name)
@pytest.mark.parametrize("x_shape", [(1,), (2, 3), (40,)], ids=str)
def test_linear_in_bands_of_rows(kind, x_shape, monkeypatch):
    """A budget of two rows per band: 7 rows take bands of 2, 2, 2 and 1, whatever the batch."""
    monkeypatch.setattr(formats, "BAND_VALUES", 2 * 256)
    generator = np.random.default_rng(1)
    w = random_qtensor(kind, (7, 256), generator)
    x = torch.from_numpy(generator.standard_normal((*x_shape, 256), dtype=np.float32))
    ours = linear(x, w)
    assert ours.is_contiguous()
    assert_matmul_close(ours, x @ dequantize(w).T)


@settings(deadline=None, max_examples=50)
@given(kind=kinds, experts=st.integers(1, 5), k=st.integers(1, 3), shared=st.booleans(), seed=seeds)
def test_expert_linear_sends_each_row_through_its_experts(kind, experts, k, shared, seed):
    """Shared rows (T, cols) go to all k experts of their token, per-slot rows (T, k, cols) to one."""
    generator = np.random.default_rng(seed)
    w = random_qtensor(kind, (experts, 3, 256), generator)
    ids = torch.from_numpy(generator.integers(0, experts, size=(4, k)))
    x_shape = (4, 256) if shared else (4, k, 256)
    x = torch.from_numpy(generator.standard_normal(x_shape, dtype=np.float32))
    dense = dequantize(w)
    rows = x.unsqueeze(1).expand(4, k, 256) if shared else x
    expected = torch.einsum("tkc,tkrc->tkr", rows, dense[ids])
    ours = expert_linear(x, w, ids)
    assert ours.shape == (4, k, 3)
    assert_matmul_close(ours, expected)


def test_expert_linear_rejects_mismatched_experts():
    w = random_qtensor(Q.Q8_0, (2, 4, 64), np.random.default_rng(0))
    with pytest.raises(ValueError, match="do not match"):
        expert_linear(torch.zeros(3, 64), w, torch.zeros(2, 1, dtype=torch.long))


def test_linear_rejects_mismatched_features():
    w = random_qtensor(Q.Q8_0, (4, 64), np.random.default_rng(0))
    with pytest.raises(ValueError, match="64"):
        linear(torch.zeros(2, 32), w)


def test_linear_rejects_stacked_weights():
    w = random_qtensor(Q.Q8_0, (2, 4, 64), np.random.default_rng(0))
    with pytest.raises(ValueError, match="matrix"):
        linear(torch.zeros(2, 64), w)
