"""Manifold-constrained hyper-connections (mHC).

The residual stream is ``hc_mult`` parallel copies of the hidden state. Before each sublayer
they collapse into one input (``pre`` weights); after it, the output is spread back (``post``)
and added to a doubly-stochastic mix (``comb``, projected by Sinkhorn) of the old streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dwarfstar import quant
from dwarfstar.model import fused_cpu
from dwarfstar.model.norm import rms_norm
from dwarfstar.quant.tensor import QTensor


@dataclass
class HyperConnection:
    fn: QTensor  # (mix, hc * dim): projects the flattened streams to pre | post | comb logits
    base: torch.Tensor  # (mix,)
    scale: torch.Tensor  # (3,): pre, post, comb


def _mixes(streams: torch.Tensor, fn: QTensor, eps: float) -> torch.Tensor:
    return quant.linear(rms_norm(streams.flatten(-2), None, eps), fn)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project (T, n, n) logits (row = source stream) onto doubly-stochastic matrices."""
    n = logits.shape[-1]
    if logits.is_cuda and n & (n - 1) == 0:  # one launch instead of about 4 per iteration
        from dwarfstar.model import fused

        return fused.sinkhorn(logits, iters, eps)
    if fused_cpu.applies(logits):
        return fused_cpu.sinkhorn(logits, iters, eps)
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def hc_pre(
    streams: torch.Tensor, hc: HyperConnection, rms_eps: float, hc_eps: float, sinkhorn_iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse (T, n, D) streams into the sublayer input; return it with ``post`` and ``comb``."""
    n = streams.shape[-2]
    m = _mixes(streams, hc.fn, rms_eps)
    if fused_cpu.applies(streams):  # one call instead of about 100
        return fused_cpu.hc_pre(streams, m, hc.scale, hc.base, hc_eps, sinkhorn_iters)
    pre_w, post_w, comb_w = m.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = hc.base.split([n, n, n * n])
    pre = torch.sigmoid(pre_w * hc.scale[0] + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * hc.scale[1] + post_b)
    comb = sinkhorn((comb_w * hc.scale[2] + comb_b).unflatten(-1, (n, n)), sinkhorn_iters, hc_eps)
    collapsed = (pre.unsqueeze(-1) * streams).sum(dim=-2)
    return collapsed, post, comb


def hc_post(
    output: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """New streams: ``post[j]·output + Σ_i comb[i, j]·streams[i]`` (the sum runs over sources)."""
    if fused_cpu.applies(streams):
        return fused_cpu.hc_post(output, streams, post, comb)
    return post.unsqueeze(-1) * output.unsqueeze(-2) + comb.transpose(-1, -2) @ streams


def hc_head(streams: torch.Tensor, hc: HyperConnection, rms_eps: float, hc_eps: float) -> torch.Tensor:
    """Final collapse of the streams before the output norm: sigmoid weights, no Sinkhorn."""
    m = _mixes(streams, hc.fn, rms_eps)
    if fused_cpu.applies(streams):
        return fused_cpu.hc_head(streams, m, hc.scale, hc.base, hc_eps)
    weights = torch.sigmoid(m * hc.scale[0] + hc.base) + hc_eps
    return (weights.unsqueeze(-1) * streams).sum(dim=-2)
