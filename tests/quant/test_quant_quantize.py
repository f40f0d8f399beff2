"""quantize agrees bit for bit with gguf-py's gguf.quants.quantize; random_blocks is valid data."""

import gguf
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given, settings
from hypothesis import strategies as st

from dwarfstar.quant import SUPPORTED_KINDS, QTensor, bytes_per_row, dequantize, quantize
from dwarfstar.quant.quantize import QUANTIZABLE_KINDS
from dwarfstar.synthetic.blocks import random_blocks

float32s = st.floats(width=32, allow_nan=False, allow_infinity=False)
matrices = hnp.arrays(
    np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64, 96])), elements=float32s
)


def assert_same_array(ours: np.ndarray, expected: np.ndarray) -> None:
    assert ours.dtype == expected.dtype
    assert ours.shape == expected.shape
    np.testing.assert_array_equal(ours.view(np.uint8), expected.view(np.uint8))


@settings(deadline=None)
@given(kind=st.sampled_from(QUANTIZABLE_KINDS), values=matrices)
def test_quantize_like_gguf(kind, values):
    with np.errstate(all="ignore"):  # gguf-py warns on overflow to inf and on 1/d for subnormal d
        expected = gguf.quants.quantize(values, kind)
        ours = quantize(values, kind)
    assert_same_array(ours, expected)


@pytest.mark.parametrize("kind", QUANTIZABLE_KINDS, ids=lambda kind: kind.name)
def test_quantize_a_matrix_in_several_bands(kind):
    """300 rows of 1024 span three bands of 128 rows, the last one partial."""
    values = np.random.default_rng(0).standard_normal((300, 1024), dtype=np.float32)
    assert_same_array(quantize(values, kind), gguf.quants.quantize(values, kind))


def test_quantize_rejects_partial_blocks():
    with pytest.raises(ValueError, match="Q8_0"):
        quantize(np.zeros((2, 48), dtype=np.float32), Q.Q8_0)


@pytest.mark.parametrize("kind", SUPPORTED_KINDS, ids=lambda kind: kind.name)
def test_random_blocks_are_valid_and_reproducible(kind):
    shape = (2, 3, 512)
    stored = random_blocks(kind, shape, np.random.default_rng(7))
    np.testing.assert_array_equal(stored, random_blocks(kind, shape, np.random.default_rng(7)))
    assert stored.nbytes == 2 * 3 * bytes_per_row(kind, 512)
    values = dequantize(QTensor.from_numpy(kind, shape, stored)).numpy()
    assert np.isfinite(values).all()
    assert 0 < np.abs(values).max() < 128
    assert len(np.unique(values)) > 20  # not constant (MXFP4 has few distinct values)
