"""The compiled CPU versions of a decode step's small operations (`dwarfstar.model._fused`).

At one token, the work between the matrix products (hyper-connections, norms, rope, attention
over a few hundred rows, routing) is a few kilobytes per operation, and in torch its cost is
the number of operator calls: about 600 per layer. `csrc/fused_cpu.c` does each of these
operations in one call on the calling thread. The model's operations (`norm.rms_norm`,
`Rope.apply`, `hyper.hc_pre` ...) are the dispatch points: Triton on CUDA tensors
(`fused.py`), these on float32 CPU tensors when `ACTIVE`, their torch code otherwise. The
results agree with the torch code up to the order of float32 sums (tests/model/test_fused_cpu.py).

`ACTIVE` is false when the extension was not built (no C compiler: the torch code runs, no
warning, as only speed differs) or under DWARFSTAR_KERNELS=reference.
"""

from __future__ import annotations

import os

import torch

try:
    from . import _fused
except ImportError:  # not built: the torch code stays
    _fused = None

ACTIVE = _fused is not None and os.environ.get("DWARFSTAR_KERNELS", "compiled") != "reference"


def applies(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the compiled path: a float32 CPU tensor, with the extension active."""
    return ACTIVE and x.device.type == "cpu" and x.dtype == torch.float32


def _address(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def _contiguous(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``x`` as a contiguous tensor of ``dtype``, converted only when it is not one already."""
    if x is None or (x.dtype == dtype and x.is_contiguous()):
        return x
    return x.to(dtype).contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    width = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    weight = _contiguous(weight, torch.float32)
    _fused.rms_norm(x.data_ptr(), _address(weight), x.numel() // width, width, eps, out.data_ptr())
    return out


def rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool) -> torch.Tensor:
    """`Rope.apply` for x (T, ..., D) at positions (T,)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    positions = _contiguous(positions, torch.int64)
    tokens, width = x.shape[0], x.shape[-1]
    _fused.rope(
        x.data_ptr(), positions.data_ptr(), freqs.data_ptr(), tokens, x.numel() // max(1, tokens * width),
        width, freqs.shape[0], inverse, out.data_ptr(),
    )  # fmt: skip
    return out


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    n = logits.shape[-1]
    out = logits.contiguous().clone()
    _fused.sinkhorn(out.data_ptr(), out.data_ptr(), out.numel() // (n * n), n, iters, eps)
    return out


def _stream_strides(streams: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Streams (T, n, D) with contiguous rows, and their token and stream strides (a stream
    stride of 0 for the first layer's streams, one state broadcast)."""
    if streams.stride(-1) != 1 or streams.stride(0) < streams.shape[-1]:
        streams = streams.contiguous()
    return streams, streams.stride(0), streams.stride(1)


def _mixer_inputs(
    mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The projected mixes, and the mixer's scale and base, as the C functions read them."""
    return mixes.contiguous(), _contiguous(scale, torch.float32), _contiguous(base, torch.float32)


def hc_pre(
    streams: torch.Tensor,
    mixes: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    hc_eps: float,
    sinkhorn_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`hyper.hc_pre` from the projected ``mixes`` (T, 2n + n²): (collapsed, post, comb)."""
    tokens, n, width = streams.shape
    streams, token_stride, stream_stride = _stream_strides(streams)
    mixes, scale, base = _mixer_inputs(mixes, scale, base)
    collapsed = streams.new_empty(tokens, width)
    post = streams.new_empty(tokens, n)
    comb = streams.new_empty(tokens, n, n)
    _fused.hc_pre(
        streams.data_ptr(), token_stride, stream_stride, mixes.data_ptr(), scale.data_ptr(),
        base.data_ptr(), tokens, n, width, sinkhorn_iters, hc_eps,
        collapsed.data_ptr(), post.data_ptr(), comb.data_ptr(),
    )  # fmt: skip
    return collapsed, post, comb


def hc_head(
    streams: torch.Tensor, mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_eps: float
) -> torch.Tensor:
    """`hyper.hc_head` from the projected ``mixes`` (T, n): the collapsed streams (T, D)."""
    tokens, n, width = streams.shape
    streams, token_stride, stream_stride = _stream_strides(streams)
    mixes, scale, base = _mixer_inputs(mixes, scale, base)
    out = streams.new_empty(tokens, width)
    _fused.hc_head(
        streams.data_ptr(), token_stride, stream_stride, mixes.data_ptr(), scale.data_ptr(), base.data_ptr(),
        tokens, n, width, hc_eps, out.data_ptr(),
    )  # fmt: skip
    return out


def hc_post(
    output: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    tokens, n, width = streams.shape
    streams, token_stride, stream_stride = _stream_strides(streams)
    output, post, comb = output.contiguous(), post.contiguous(), comb.contiguous()
    out = output.new_empty(tokens, n, width)
    _fused.hc_post(
        output.data_ptr(), streams.data_ptr(), token_stride, stream_stride, post.data_ptr(), comb.data_ptr(),
        tokens, n, width, out.data_ptr(),
    )  # fmt: skip
    return out


def attend(
    q: torch.Tensor,
    raw: torch.Tensor,
    rows: torch.Tensor | None,
    picks: torch.Tensor | None,
    valid: torch.Tensor | None,
    sinks: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query's attention (H, D) over the ``raw`` rows and the compressed ``rows`` (the
    ``picks`` (k,) marked ``valid`` (k,), or all), with a sink logit per head; written into
    ``out`` (contiguous) when given."""
    heads, dim = q.shape
    q, raw = q.contiguous(), raw.contiguous()
    rows = None if rows is None else rows.contiguous()
    picks, valid = _contiguous(picks, torch.int64), _contiguous(valid, torch.bool)
    n_rows = 0 if rows is None else (rows.shape[0] if picks is None else picks.shape[0])
    sinks = _contiguous(sinks, torch.float32)  # held here: a temporary would be freed before the call
    out = q.new_empty(heads, dim) if out is None else out
    assert out.is_contiguous() and out.shape == (heads, dim) and out.dtype == torch.float32
    _fused.attend(
        q.data_ptr(), heads, dim, raw.data_ptr(), raw.shape[0], _address(rows), _address(picks),
        _address(valid), n_rows, sinks.data_ptr(), scale, out.data_ptr(),
    )  # fmt: skip
    return out


def window_softmax(
    scores: torch.Tensor,
    n_raw: int,
    offset: int,
    window: int,
    first: int,
    ratio: int,
    valid: torch.Tensor | None,
    sinks: torch.Tensor,
    scale: float,
) -> None:
    """In place: the softmax of a block of queries' (queries, heads, keys) scores, each scaled,
    with a sink logit per head. Query t sees raw key j < ``n_raw`` when 0 <= ``offset`` + t - j
    < ``window``, and compressed row r (key ``n_raw`` + r) when ``valid[t, r]`` or, without
    ``valid``, when r < (``first`` + t + 1) // ``ratio`` (none when ``ratio`` is 0); the keys
    it does not see get probability 0."""
    queries, heads, keys = scores.shape
    assert scores.is_contiguous() and scores.dtype == torch.float32
    valid, sinks = _contiguous(valid, torch.bool), _contiguous(sinks, torch.float32)
    assert valid is None or valid.shape == (queries, keys - n_raw)
    _fused.window_softmax(
        scores.data_ptr(), queries, heads, n_raw, keys - n_raw, offset, window, first, ratio, _address(valid),
        sinks.data_ptr(), scale,
    )  # fmt: skip


def pool(kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """A compressor's gated pooling of (windows, slots, width) projections: (windows, width)."""
    kv, gate = kv.contiguous(), gate.contiguous()
    windows, slots, width = kv.shape
    out = kv.new_empty(windows, width)
    _fused.pool(kv.data_ptr(), gate.data_ptr(), windows, slots, width, out.data_ptr())
    return out


def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    hashed: torch.Tensor | None,
    k: int,
    norm_topk: bool,
    routed_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe.route` from the router's logits (T, experts): experts (T, k), weights (T, k)."""
    tokens, n_expert = logits.shape
    logits = logits.contiguous()
    hashed = _contiguous(hashed, torch.int64)
    bias = _contiguous(bias, torch.float32)
    experts = torch.empty(tokens, k, dtype=torch.int64)
    weights = logits.new_empty(tokens, k)
    _fused.route(
        logits.data_ptr(), _address(bias), _address(hashed), tokens, n_expert, k, norm_topk, routed_scale,
        experts.data_ptr(), weights.data_ptr(),
    )  # fmt: skip
    return experts, weights


def swiglu(
    gate: torch.Tensor, up: torch.Tensor, limit: float, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """`moe.swiglu` (..., width), times ``weights`` (...) per row when given."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    weights = None if weights is None else weights.contiguous()
    width = gate.shape[-1]
    _fused.swiglu(
        gate.data_ptr(), up.data_ptr(), _address(weights), gate.numel() // width, width, limit, out.data_ptr()
    )
    return out


def kv_round(kv: torch.Tensor, nope_dim: int) -> torch.Tensor:
    """`quantsim.kv_round`: FP8 rounding of the first ``nope_dim`` values of each row."""
    kv = kv.contiguous()
    out = torch.empty_like(kv)
    width = kv.shape[-1]
    _fused.kv_round(kv.data_ptr(), kv.numel() // width, width, nope_dim, out.data_ptr())
    return out


def indexer_round(x: torch.Tensor) -> torch.Tensor:
    """`quantsim.indexer_round`: Hadamard rotation, then FP4 rounding, of each row."""
    x = x.contiguous()
    out = torch.empty_like(x)
    width = x.shape[-1]
    _fused.indexer_round(x.data_ptr(), x.numel() // width, width, out.data_ptr())
    return out
