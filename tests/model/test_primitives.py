"""Rope, hyper-connection and quantisation-simulation primitives against independent facts."""

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dwarfstar.model import quantsim
from dwarfstar.model.config import ModelConfig
from dwarfstar.model.hyper import sinkhorn
from dwarfstar.model.rope import Rope, plain_frequencies, yarn_frequencies


def test_yarn_ramp_of_flash_matches_published_bounds():
    # For base 160000, factor 16, original context 65536, betas 32/1: pairs 0..15 keep their
    # frequency, 25..31 are divided by 16, and 16..24 blend linearly (architecture §5.1).
    config = ModelConfig()
    base = 160000.0 ** (-np.arange(0, 64, 2) / 64)
    keep = np.clip(1 - (np.arange(32) - 15) / 10, 0, 1)
    expected = base / 16 * (1 - keep) + base * keep
    got = yarn_frequencies(config).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[15] == np.float32(base[15]) and math.isclose(got[25], base[25] / 16, rel_tol=1e-6)


def test_rope_rotates_interleaved_pairs_of_the_last_dims():
    rope = Rope(plain_frequencies(ModelConfig(rope_dim=4, head_dim=8, value_dim=8)))
    x = torch.arange(8, dtype=torch.float32)[None]
    pos = torch.tensor([3])
    out = rope.apply(x, pos)
    assert torch.equal(out[0, :4], x[0, :4])  # non-rope dims untouched
    theta = 3 * torch.tensor([1.0, 10000 ** (-2 / 4)])
    even, odd = x[0, 4::2], x[0, 5::2]
    torch.testing.assert_close(out[0, 4::2], even * theta.cos() - odd * theta.sin())
    torch.testing.assert_close(out[0, 5::2], even * theta.sin() + odd * theta.cos())
    torch.testing.assert_close(rope.apply(out, pos, inverse=True), x)


def test_sinkhorn_is_doubly_stochastic():
    logits = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(0))
    comb = sinkhorn(logits, iters=20, eps=1e-6)
    torch.testing.assert_close(comb.sum(dim=-2), torch.ones(5, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(comb.sum(dim=-1), torch.ones(5, 4), atol=1e-5, rtol=0)


def test_hadamard_is_orthonormal_sylvester():
    n = 8
    h = quantsim.hadamard(torch.eye(n))
    sylvester = torch.tensor([[1.0]])
    while sylvester.shape[0] < n:
        sylvester = torch.cat(
            (torch.cat((sylvester, sylvester), 1), torch.cat((sylvester, -sylvester), 1)), 0
        )
    torch.testing.assert_close(h, sylvester / math.sqrt(n))


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@settings(max_examples=200, deadline=None)
@given(st.floats(-6, 6, allow_nan=False, width=32))
def test_e2m1_rounds_to_nearest_with_ties_to_even_code(value):
    got = quantsim._e2m1(torch.tensor([value], dtype=torch.float32)).item()
    mag = abs(value)
    dists = [abs(mag - v) for v in E2M1]
    best = min(dists)
    codes = [i for i, d in enumerate(dists) if d == best]
    code = codes[0] if len(codes) == 1 else next(i for i in codes if i % 2 == 0)
    assert got == math.copysign(E2M1[code], value) or (E2M1[code] == 0 and got == 0)


def test_fp8_round_uses_power_of_two_block_scales():
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)) * 5
    y = quantsim.fp8_round(x, 64)
    for block in range(2):
        xb, yb = x[:, block * 64 : (block + 1) * 64], y[:, block * 64 : (block + 1) * 64]
        scale = 2.0 ** torch.ceil(torch.log2(xb.abs().amax(dim=1, keepdim=True) / 448))
        # every rounded value is an E4M3 number times the block scale
        q = yb / scale
        assert torch.equal(q, q.to(torch.float8_e4m3fn).to(torch.float32))
        assert ((yb - xb).abs() <= xb.abs() * 2**-4 + scale * 2**-9).all()


def test_without_yarn_compressed_layers_use_the_plain_compress_base():
    config = ModelConfig(rope_factor=1.0, rope_original_context=0)
    expected = 160000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    torch.testing.assert_close(yarn_frequencies(config), expected)


def test_power_of_two_scales_round_up_exactly_at_the_boundary():
    top = torch.tensor(448.0)
    for k in range(-20, 10):
        at = top * 2.0**k
        just_above = torch.nextafter(at, torch.tensor(float("inf")))
        assert quantsim._pow2_scale(at[None], 448.0).item() == 2.0**k
        assert quantsim._pow2_scale(just_above[None], 448.0).item() == 2.0 ** (k + 1)


def test_hadamard_rejects_widths_that_are_not_powers_of_two():
    import pytest

    with pytest.raises(ValueError, match="power-of-two width, got 48"):
        quantsim.hadamard(torch.zeros(2, 48))
