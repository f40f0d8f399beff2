"""take_rows, linear and expert_linear agree with dequantizing everything, then indexing/multiplying."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from hypothesis import given, settings
from hypothesis import strategies as st

from dwarfstar.quant import (
    LINEAR_KERNELS,
    SUPPORTED_KINDS,
    QTensor,
    dequantize,
    expert_linear,
    formats,
    linear,
    random_blocks,
    take_rows,
)

kinds = st.sampled_from(SUPPORTED_KINDS)
seeds = st.integers(0, 2**32 - 1)


def random_qtensor(kind, shape, generator) -> QTensor:
    return QTensor.from_numpy(kind, shape, random_blocks(kind, shape, generator))


def assert_matmul_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)


def test_every_supported_kind_has_a_linear_kernel():
    assert set(LINEAR_KERNELS) == set(SUPPORTED_KINDS)


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
@given(kind=kinds, experts=st.integers(1, 4), expert=st.integers(0, 3), seed=seeds)
def test_expert_linear_is_one_slice_of_the_stack(kind, experts, expert, seed):
    expert = expert % experts
    generator = np.random.default_rng(seed)
    w = random_qtensor(kind, (experts, 3, 256), generator)
    x = torch.from_numpy(generator.standard_normal((5, 256), dtype=np.float32))
    assert_matmul_close(expert_linear(x, w, expert), x @ dequantize(w)[expert].T)


def test_linear_rejects_mismatched_features():
    w = random_qtensor(Q.Q8_0, (4, 64), np.random.default_rng(0))
    with pytest.raises(ValueError, match="64"):
        linear(torch.zeros(2, 32), w)


def test_linear_rejects_stacked_weights():
    w = random_qtensor(Q.Q8_0, (2, 4, 64), np.random.default_rng(0))
    with pytest.raises(ValueError, match="matrix"):
        linear(torch.zeros(2, 64), w)
