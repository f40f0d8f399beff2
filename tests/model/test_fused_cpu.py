"""The compiled CPU operations (model/fused_cpu.py, csrc/fused_cpu.c) agree with the torch code.

Each model operation is its own dispatch point; with `fused_cpu.ACTIVE` off it runs its torch
code, the reference here. Random inputs at odd sizes, both instruction sets the machine has.
Tolerance: float32 sums in another order and libm's exp/sin/cos against torch's, 1e-5 relative.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from gguf import GGMLQuantizationType as T

from dwarfstar.convert.converter import stored_kind
from dwarfstar.model import attention, fused_cpu, hyper, moe, quantsim
from dwarfstar.model.config import ModelConfig
from dwarfstar.model.model import Model
from dwarfstar.model.norm import rms_norm
from dwarfstar.model.rope import layer_rope
from dwarfstar.quant.tensor import QTensor
from dwarfstar.synthetic.models import write_random_model

pytestmark = pytest.mark.skipif(fused_cpu._fused is None, reason="the C extension is not built")

ISAS = ["portable", "avx2", "avx512"]


@pytest.fixture(params=ISAS)
def isa(request):
    try:
        fused_cpu._fused.set_isa(request.param)
    except ValueError:
        pytest.skip(f"no {request.param} on this CPU")
    yield request.param
    fused_cpu._fused.set_isa(_available()[-1])


def _available() -> list[str]:
    found = []
    for name in ISAS:
        try:
            fused_cpu._fused.set_isa(name)
            found.append(name)
        except ValueError:
            pass
    return found


def torch_code(fn, *args, **kwargs):
    """``fn`` with the compiled operations off: the torch code it replaces."""
    active = fused_cpu.ACTIVE
    fused_cpu.ACTIVE = False
    try:
        return fn(*args, **kwargs)
    finally:
        fused_cpu.ACTIVE = active


def compiled(fn, *args, **kwargs):
    active = fused_cpu.ACTIVE
    fused_cpu.ACTIVE = True
    try:
        return fn(*args, **kwargs)
    finally:
        fused_cpu.ACTIVE = active


def same(fn, *args, rtol=1e-5, atol=1e-6):
    ours, theirs = compiled(fn, *args), torch_code(fn, *args)
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)
    return ours


def randn(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm(isa, weighted):
    x = randn(3, 5, 97, scale=3)
    same(rms_norm, x, randn(97, seed=1) if weighted else None, 1e-6)
    same(rms_norm, x.transpose(0, 1), None, 1e-6)  # not contiguous


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape", [(3, 2, 96), (4, 70), (2, 3, 5, 66)])
def test_rope(isa, inverse, shape):
    rope = layer_rope(ModelConfig(rope_dim=64), 4)  # YaRN frequencies, 32 pairs
    positions = torch.tensor([0, 17, 4000, 65535][: shape[0]])
    same(rope.apply, randn(*shape), positions, inverse, atol=1e-5)


def test_sinkhorn(isa):
    out = same(hyper.sinkhorn, randn(5, 4, 4, scale=3), 20, 1e-6, atol=1e-7)
    assert torch.allclose(out.sum(-2), torch.ones(5, 4), atol=1e-5)
    same(hyper.sinkhorn, randn(2, 3, 3, seed=1), 7, 1e-6, atol=1e-7)  # odd n


def _hyper_connection(n: int, width: int) -> hyper.HyperConnection:
    fn = randn(2 * n + n * n, n * width, seed=5, scale=0.05)
    fn = QTensor.from_numpy(0, tuple(fn.shape), fn.numpy())
    return hyper.HyperConnection(fn=fn, base=randn(2 * n + n * n, seed=6), scale=randn(3, seed=7))


@pytest.mark.parametrize("n", [4, 3])
def test_hc_pre_and_post(isa, n):
    width = 37
    hc = _hyper_connection(n, width)
    streams = randn(2, n, width, seed=2)
    collapsed, post, comb = same(hyper.hc_pre, streams, hc, 1e-6, 1e-6, 20)
    same(hyper.hc_post, randn(2, width, seed=3), streams, post, comb)
    # the first layer's streams: one state broadcast to every stream (stride 0)
    broadcast = randn(2, width, seed=4)[:, None, :].expand(-1, n, -1)
    same(hyper.hc_pre, broadcast, hc, 1e-6, 1e-6, 20)
    same(hyper.hc_post, randn(2, width, seed=3), broadcast, post, comb)


@pytest.mark.parametrize("n", [4, 3])
def test_hc_head(isa, n):
    width = 37
    fn = randn(n, n * width, seed=5, scale=0.05)
    fn = QTensor.from_numpy(0, tuple(fn.shape), fn.numpy())
    hc = hyper.HyperConnection(fn=fn, base=randn(n, seed=6), scale=randn(1, seed=7))
    same(hyper.hc_head, randn(2, n, width, seed=2), hc, 1e-6, 1e-6)


def _attention_layer(heads: int, dim: int, ratio: int):
    config = ModelConfig(n_head=heads, o_groups=1, head_dim=dim, value_dim=dim, window=16)
    ctx = attention.LayerContext(config, layer_rope(config, 0), False)
    w = type("W", (), {"sinks": randn(heads, seed=1), "compressor": type("C", (), {"ratio": ratio})()})()
    return w, ctx


def attend_block(w, ctx, q, positions, first, raw, raw_start, rows, picks, valid):
    """``attention._attend_block``'s output for a block of queries."""
    out = torch.full_like(q, float("nan"))
    attention._attend_block(w, ctx, q, positions, first, raw, raw_start, rows, picks, valid, out)
    return out


@pytest.mark.parametrize("kind", ["window", "csa", "hca"])
def test_attention_of_one_query(isa, kind):
    heads, dim, first = 3, 72, 40
    ratio = {"window": 0, "csa": 4, "hca": 128}[kind]
    w, ctx = _attention_layer(heads, dim, ratio)
    q, raw = randn(1, heads, dim, seed=2), randn(20, dim, seed=3)
    rows = picks = valid = None
    if kind == "csa":
        rows = randn(10, dim, seed=4)
        picks = torch.tensor([[7, 2, 9, 0, 4]])
        valid = torch.tensor([[True, True, False, True, True]])
    elif kind == "hca":
        first = 300
        rows = randn(5, dim, seed=4)  # 2 of them visible to a query at 300
    positions = torch.tensor([first])
    same(attend_block, w, ctx, q, positions, first, raw, first - 19, rows, picks, valid)


@pytest.mark.parametrize("ratio", [0, 4, 128])
@pytest.mark.parametrize(("first", "cached", "queries"), [(0, 0, 7), (9, 9, 13), (290, 15, 5), (41, 15, 21)])
def test_attention_of_a_block_of_queries(isa, ratio, first, cached, queries):
    """A prefill's block: queries at first.. over the raw rows from first - cached on (a window of
    16, so that most blocks see only part of them) and the compressed rows some queries see."""
    heads, dim = 5, 72
    w, ctx = _attention_layer(heads, dim, ratio)
    q = randn(queries, heads, dim, seed=2)
    raw = randn(cached + queries, dim, seed=3)
    rows = None if ratio == 0 else randn(max(1, (first + queries) // ratio), dim, seed=4)
    positions = torch.arange(first, first + queries)
    same(attend_block, w, ctx, q, positions, first, raw, first - cached, rows, None, None)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize(("first", "cached", "queries"), [(120, 15, 7), (140, 0, 13)])
def test_attention_of_a_block_of_queries_over_an_indexer_s_picks(isa, shared, first, cached, queries):
    """CSA past the indexer's top-k: each query its own picks of the compressed rows, some not
    valid (past its position), with the raw rows of its window; the picks few enough in all to
    be scored as keys shared by the block, or not."""
    heads, dim, k = 5, 72, 6
    w, ctx = _attention_layer(heads, dim, 4)
    q = randn(queries, heads, dim, seed=2)
    raw = randn(cached + queries, dim, seed=3)
    rows = randn((first + queries) // 4, dim, seed=4)
    generator = torch.Generator().manual_seed(5)
    choice = k + 1 if shared else rows.shape[0]  # the rows picks are drawn from
    picks = torch.stack([torch.randperm(choice, generator=generator)[:k] for _ in range(queries)])
    positions = torch.arange(first, first + queries)
    valid = picks < ((positions + 1) // 4)[:, None] - (0 if shared else 10)
    valid[0] = False  # a query with no compressed row at all
    assert valid.any() and not valid.all()
    assert (attention._shared_picks(picks, valid) is not None) == shared
    same(attend_block, w, ctx, q, positions, first, raw, first - cached, rows, picks, valid)


def test_the_softmaxes_take_sinks_of_any_dtype_and_layout():
    """The sinks are converted to contiguous float32 and held through the call (a temporary's
    address would point at freed memory by then): float64 sinks, every other one of a tensor,
    give the float32 sinks' result."""
    heads, dim = 3, 16
    sinks = randn(heads, seed=1)
    strided = torch.stack((sinks, sinks), dim=1).double()[:, 0]
    assert not strided.is_contiguous()
    q, raw = randn(heads, dim, seed=2), randn(9, dim, seed=3)
    want = fused_cpu.attend(q, raw, None, None, None, sinks, 0.25)
    torch.testing.assert_close(fused_cpu.attend(q, raw, None, None, None, strided, 0.25), want)
    scores = randn(4, heads, 9, seed=4)
    theirs = scores.clone()
    fused_cpu.window_softmax(theirs, 9, 5, 4, 10, 0, None, sinks, 0.25)
    fused_cpu.window_softmax(scores, 9, 5, 4, 10, 0, None, strided, 0.25)
    torch.testing.assert_close(scores, theirs)


def test_pool():
    gate = randn(3, 8, 37, seed=1, scale=4)
    gate[0, :4] = float("-inf")  # the first window has no previous one
    same(attention._pool, randn(3, 8, 37), gate)


@pytest.mark.parametrize("hashed", [False, True])
def test_route(hashed):
    config = ModelConfig(n_expert=37, n_expert_used=5)
    w = type("W", (), {})()
    w.router = None
    w.bias = None if hashed else randn(37, seed=1)
    table = torch.randint(0, 37, (50, 5), generator=torch.Generator().manual_seed(2))
    w.hash_table = table if hashed else None
    logits = randn(3, 37, scale=4)
    tokens = torch.tensor([3, 0, 49])
    from dwarfstar import quant

    original = quant.linear
    quant.linear = lambda x, _w: x  # the router's projection is not under test
    try:
        experts, weights = compiled(moe.route, w, logits, tokens, config)
        expected_experts, expected_weights = torch_code(moe.route, w, logits, tokens, config)
    finally:
        quant.linear = original
    assert torch.equal(experts, expected_experts)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)


def test_swiglu(isa):
    gate, up = randn(2, 3, 71, scale=8), randn(2, 3, 71, seed=1, scale=8)
    same(moe.swiglu, gate, up, 7.0)
    same(moe.swiglu, gate, up, 7.0, randn(2, 3, seed=2))


@pytest.mark.parametrize("scale", [1e-6, 1.0, 3e4])
def test_quantisation_simulation_is_bit_identical(scale):
    x = randn(50, 96, scale=scale)
    x[0, :64] = 0
    x[1, :64] = (torch.arange(64) + 0.5) * 2.0**-9  # ties between E4M3 subnormals
    assert torch.equal(compiled(quantsim.kv_round, x, 80), torch_code(quantsim.kv_round, x, 80))
    y = randn(70, 128, seed=1, scale=scale)
    y[0] = 0
    assert torch.equal(compiled(quantsim.indexer_round, y), torch_code(quantsim.indexer_round, y))


SMALL = ModelConfig(
    n_layer=3, dim=64, n_head=4, head_dim=64, value_dim=64, rope_dim=16, q_lora_rank=32,
    o_lora_rank=16, o_groups=2, n_expert=8, n_expert_used=2, expert_ff=32, n_hash_layer=1,
    index_n_head=4, index_head_dim=32, index_topk=3, compress_ratios=(0, 4, 128), window=16,
    swiglu_limit=(10.0,) * 3,
)  # fmt: skip


def prefilled_both_ways(tmp_path, config: ModelConfig, tokens_seed: int, chunk: int):
    """The logits of 140 random tokens prefilled in chunks of ``chunk`` through a random float32
    model of ``config``: with the compiled operations, and with the torch code they replace."""
    path = tmp_path / "small.gguf"
    write_random_model(path, config, lambda name, shape: stored_kind(name, shape, T.F32), seed=4)
    model = Model.load(path, quant_sim=False)
    tokens = torch.randint(0, 129280, (140,), generator=torch.Generator().manual_seed(tokens_seed))
    ours = compiled(model.prefill, tokens, model.new_session(), chunk)
    return ours, torch_code(model.prefill, tokens, model.new_session(), chunk)


def test_decoded_logits_match_the_torch_code(tmp_path):
    """Token by token past the window, the indexer's top-k and a ratio-128 row: every fused
    operation and the one-query attention on the way. (Without the rounding simulation: with
    it, an ulp of difference before an FP4 rounding moves the value a whole step and can reorder
    the indexer's tied scores; its fused rounding is checked bit for bit above.)"""
    ours, reference = prefilled_both_ways(tmp_path, SMALL, tokens_seed=0, chunk=1)
    assert reference.abs().max() > 1
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_prefilled_logits_match_the_torch_code(tmp_path):
    """The same model and tokens in chunks of 60 (the last one shorter): blocks of 4 queries (a
    window of 64) over the window, the compressed rows each sees and, past the indexer's top-k,
    its picks."""
    config = dataclasses.replace(SMALL, window=64)
    ours, reference = prefilled_both_ways(tmp_path, config, tokens_seed=1, chunk=60)
    assert reference.abs().max() > 1
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_reference_kernels_switch_the_compiled_operations_off():
    environment = {**os.environ, "DWARFSTAR_KERNELS": "reference"}
    code = "from dwarfstar.model import fused_cpu; print(fused_cpu.ACTIVE)"
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
