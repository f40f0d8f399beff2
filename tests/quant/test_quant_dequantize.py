"""Dequantization agrees bit for bit with gguf-py's reference (gguf.quants.dequantize)."""

import gguf
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dwarfstar.quant import SUPPORTED_KINDS, QTensor, bytes_per_row, dequantize, formats
from dwarfstar.quant.formats import parity_signs
from dwarfstar.quant.tensor import is_block_kind
from dwarfstar.synthetic.blocks import HALF_SCALE_OFFSETS, random_blocks

BLOCK_KINDS = [kind for kind in SUPPORTED_KINDS if is_block_kind(kind)]


@st.composite
def shapes(draw, kind, stacked=False):
    """Any number of rows (odd ones included) of any whole number of blocks."""
    block_size = GGML_QUANT_SIZES[kind][0]
    rows = draw(st.integers(1, 7))
    cols = block_size * draw(st.integers(1, max(2, 512 // block_size)))
    return (draw(st.integers(1, 3)), rows, cols) if stacked else (rows, cols)


def assert_bits_equal(ours: torch.Tensor, expected: np.ndarray) -> None:
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == expected.shape
    assert np.isfinite(expected).all()
    np.testing.assert_array_equal(ours.numpy().view(np.uint32), expected.view(np.uint32))


def test_every_format_gguf_py_dequantizes_is_supported():
    readable = set()
    for kind in Q:
        size, type_size = GGML_QUANT_SIZES[kind]
        try:
            gguf.quants.dequantize(np.zeros(type_size, dtype=np.uint8), kind)
        except NotImplementedError:
            continue
        readable.add(kind)
    assert readable == set(SUPPORTED_KINDS)


@settings(deadline=None, max_examples=300)
@given(
    data=st.data(),
    kind=st.sampled_from(SUPPORTED_KINDS),
    stacked=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_blocks_dequantize_like_gguf(data, kind, stacked, seed):
    shape = data.draw(shapes(kind, stacked))
    stored = random_blocks(kind, shape, np.random.default_rng(seed))
    ours = dequantize(QTensor.from_numpy(kind, shape, stored))
    assert_bits_equal(ours, gguf.quants.dequantize(stored, kind))


@st.composite
def raw_tensors(draw):
    """Arbitrary bytes (many zeros and repeats, as hypothesis draws them) for a small matrix."""
    kind = draw(st.sampled_from(SUPPORTED_KINDS))
    rows, cols = draw(shapes(kind))
    raw = draw(hnp.arrays(np.uint8, (rows, bytes_per_row(kind, cols))))
    return kind, (rows, cols), raw


@settings(deadline=None)
@given(raw_tensors())
def test_arbitrary_bytes_dequantize_like_gguf(tensor):
    kind, shape, raw = tensor
    with np.errstate(all="ignore"):
        expected = gguf.quants.dequantize(raw, kind)
    assume(np.isfinite(expected).all())
    assert_bits_equal(dequantize(QTensor.from_numpy(kind, shape, raw)), expected)


def every_fp16_scale() -> np.ndarray:
    """Every subnormal, and every 16th bit pattern of the rest: all exponents, both signs, as bytes."""
    bits = np.arange(0, 1 << 16, dtype=np.uint16)
    halves = bits[((bits & 0x7C00) == 0) | (bits % 16 == 0)].view(np.float16)
    return halves[np.isfinite(halves)].view(np.uint8).reshape(-1, 2)


def assert_finite_rows_like_gguf(kind: Q, stored: np.ndarray) -> None:
    """Rows that gguf-py decodes to finite values (huge scales overflow) decode alike."""
    rows, cols = stored.shape[0], GGML_QUANT_SIZES[kind][0]
    with np.errstate(invalid="ignore", over="ignore"):
        expected = gguf.quants.dequantize(stored, kind)
    finite = np.isfinite(expected).all(axis=1)
    assert finite.mean() > 0.9
    ours = dequantize(QTensor.from_numpy(kind, (rows, cols), stored))
    assert_bits_equal(ours[torch.from_numpy(finite)], expected[finite])


# IQ1_M, MXFP4 and NVFP4 keep their scales otherwise and are tested on their own.
@pytest.mark.parametrize("kind", list(HALF_SCALE_OFFSETS), ids=lambda kind: kind.name)
def test_extreme_scales_dequantize_like_gguf(kind):
    """Subnormal, tiny and huge fp16 scales: every exponent, in every scale of the block."""
    halves = every_fp16_scale()
    stored = random_blocks(kind, (len(halves), GGML_QUANT_SIZES[kind][0]), np.random.default_rng(0))
    for offset in HALF_SCALE_OFFSETS[kind]:
        stored[:, offset : offset + 2] = halves
    assert_finite_rows_like_gguf(kind, stored)


def test_extreme_iq1_m_scales_dequantize_like_gguf():
    """IQ1_M spreads its fp16 scale over the top nibbles of its last four uint16 words."""
    bits = every_fp16_scale().view(np.uint16)[:, 0]
    stored = random_blocks(Q.IQ1_M, (len(bits), 256), np.random.default_rng(0))
    for nibble in range(4):
        high_byte = 48 + 2 * nibble + 1
        stored[:, high_byte] = (stored[:, high_byte] & 0x0F) | ((bits >> (4 * nibble)) & 0xF) << 4
    assert_finite_rows_like_gguf(Q.IQ1_M, stored)


def test_every_mxfp4_and_nvfp4_scale_dequantizes_like_gguf():
    generator = np.random.default_rng(0)
    stored = random_blocks(Q.MXFP4, (256, 32), generator)
    stored[:, 0] = np.arange(256)
    stored_nv = random_blocks(Q.NVFP4, (256, 64), generator)
    stored_nv[:, :4] = np.arange(256)[:, None]
    for kind, data in ((Q.MXFP4, stored), (Q.NVFP4, stored_nv)):
        with np.errstate(over="ignore"):
            expected = gguf.quants.dequantize(data, kind)
        ours = dequantize(QTensor.from_numpy(kind, data.shape[:1] + (GGML_QUANT_SIZES[kind][0],), data))
        np.testing.assert_array_equal(ours.numpy().view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("kind", BLOCK_KINDS, ids=lambda kind: kind.name)
@pytest.mark.parametrize("band_values", [1, 300])
def test_dequantize_in_bands(kind, band_values, monkeypatch):
    """Bands of one block, or of a number of values that is not a whole number of blocks."""
    monkeypatch.setattr(formats, "BAND_VALUES", band_values)
    stored = random_blocks(kind, (5, 512), np.random.default_rng(3))
    ours = dequantize(QTensor.from_numpy(kind, (5, 512), stored))
    assert_bits_equal(ours, gguf.quants.dequantize(stored, kind))


@pytest.mark.parametrize("kind", BLOCK_KINDS, ids=lambda kind: kind.name)
@pytest.mark.parametrize("offset", [1, 2, 3, 4])
def test_data_at_any_byte_offset_dequantizes_alike(kind, offset):
    """The decoders view the bytes as wider types; data that is not aligned for that is copied first."""
    stored = random_blocks(kind, (3, 256), np.random.default_rng(offset))
    buffer = torch.zeros(offset + stored.nbytes, dtype=torch.uint8)
    buffer[offset:] = torch.from_numpy(stored.reshape(-1))
    t = QTensor(kind, (3, 256), buffer[offset:].view(stored.shape))
    assert t.data.storage_offset() == offset
    assert_bits_equal(dequantize(t), gguf.quants.dequantize(stored, kind))
    last_row = QTensor(kind, (1, 256), t.data[2:])
    assert_bits_equal(dequantize(last_row), gguf.quants.dequantize(stored[2:], kind))


def test_iq2_xxs_every_grid_point_with_every_sign_pattern_and_scale():
    """1024 blocks whose 32768 grid points take each (grid index, sign index) pair once, and every scale."""
    pairs = np.arange(256 * 128)
    grid_index, sign_index = (pairs // 128).reshape(-1, 4), (pairs % 128).reshape(-1, 4)  # per group
    scale = np.arange(len(grid_index)) % 16
    aux = (sign_index << np.arange(0, 28, 7)).sum(axis=1) | (scale << 28)
    groups = np.concatenate([grid_index.astype(np.uint8), aux.astype("<u4")[:, None].view(np.uint8)], axis=1)
    blocks = np.empty((len(groups) // 8, 66), dtype=np.uint8)
    blocks[:, :2] = np.array([0.01], dtype=np.float16).view(np.uint8)
    blocks[:, 2:] = groups.reshape(-1, 64)
    ours = dequantize(QTensor.from_numpy(Q.IQ2_XXS, (len(blocks), 256), blocks))
    assert_bits_equal(ours, gguf.quants.dequantize(blocks, Q.IQ2_XXS))


def test_parity_signs_match_gguf_py():
    ksigns = np.frombuffer(gguf.quants.IQ2_XXS.ksigns, dtype=np.uint8)
    negative = (ksigns[:, None] >> np.arange(8)) & 1
    np.testing.assert_array_equal(parity_signs(), np.where(negative == 1, -1.0, 1.0))


def test_f32_dequantizes_to_the_stored_tensor():
    stored = random_blocks(Q.F32, (4, 8), np.random.default_rng(0))
    t = QTensor.from_numpy(Q.F32, (4, 8), stored)
    assert dequantize(t).data_ptr() == t.data.data_ptr()
