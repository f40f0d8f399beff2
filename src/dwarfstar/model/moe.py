"""Mixture of experts: sqrt-softplus routing (by score, or by token-id hash) and SwiGLU experts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from dwarfstar import quant
from dwarfstar.model import fused_cpu
from dwarfstar.model.config import ModelConfig
from dwarfstar.model.weights import MoE

# Sees each MoE call's routed-expert inputs: (weights, x (T, D), experts (T, k), down input (T, k, ff)).
ExpertObserver = Callable[[MoE, torch.Tensor, torch.Tensor, torch.Tensor], None]
_observer: ContextVar[ExpertObserver | None] = ContextVar("expert_observer", default=None)


@contextmanager
def observing_experts(observer: ExpertObserver) -> Iterator[None]:
    """Within the block, ``observer`` sees what every routed expert is fed (``ds4 imatrix``)."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)


def swiglu(
    gate: torch.Tensor, up: torch.Tensor, limit: float, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """SiLU-gated product with DeepSeek's asymmetric clamp: gate ≤ limit, |up| ≤ limit; each
    row (...) times its weight when ``weights`` (...) are given."""
    if fused_cpu.applies(gate):
        return fused_cpu.swiglu(gate, up, limit, weights)
    hidden = F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)
    return hidden if weights is None else hidden * weights.unsqueeze(-1)


def route(
    w: MoE, x: torch.Tensor, tokens: torch.Tensor, config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected experts (T, k) and their weights (T, k) for each token."""
    logits = quant.linear(x, w.router)
    if fused_cpu.applies(logits):
        hashed = None if w.hash_table is None else w.hash_table[tokens]
        c = config
        return fused_cpu.route(logits, w.bias, hashed, c.n_expert_used, c.norm_topk, c.routed_scale)
    scores = torch.sqrt(F.softplus(logits))
    if w.hash_table is not None:
        experts = w.hash_table[tokens]
    else:
        biased = scores if w.bias is None else scores + w.bias
        experts = biased.topk(config.n_expert_used, dim=-1).indices
    weights = scores.gather(1, experts)
    if config.norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return experts, weights * config.routed_scale


def moe(w: MoE, x: torch.Tensor, tokens: torch.Tensor, config: ModelConfig, limit: float) -> torch.Tensor:
    """Routed experts (one grouped call per projection for all tokens) plus the shared expert."""
    experts, weights = route(w, x, tokens, config)
    shared = quant.linear(
        swiglu(quant.linear(x, w.shared_gate), quant.linear(x, w.shared_up), limit), w.shared_down
    )
    gate = quant.expert_linear(x, w.gate, experts)  # (T, k, expert width)
    up = quant.expert_linear(x, w.up, experts)
    hidden = swiglu(gate, up, limit, weights)
    observer = _observer.get()
    if observer is not None:
        observer(w, x, experts, hidden)
    return shared + quant.expert_linear(hidden, w.down, experts).sum(dim=1)
