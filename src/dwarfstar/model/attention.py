"""Attention of one layer: sliding window, compressed rows (CSA / HCA) and attention sinks.

Every layer attends to the raw K=V rows of the last ``window`` tokens. Ratio-128 layers (HCA)
also attend to every complete 128-token window, pooled into one row. Ratio-4 layers (CSA)
pool overlapping 8-token windows every 4 tokens, and each query attends only to the
``index_topk`` rows its lightning indexer scores highest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dwarfstar import quant
from dwarfstar.model import fused_cpu, quantsim
from dwarfstar.model.config import ModelConfig
from dwarfstar.model.norm import rms_norm
from dwarfstar.model.rope import Rope
from dwarfstar.model.state import CompressorState, LayerState
from dwarfstar.model.weights import Attention, Compressor, Indexer
from dwarfstar.quant import threads

# Bound on the elements of one block of queries' attention temporaries: its scores (queries ×
# heads × keys) and, on ratio-4 layers, the compressed rows gathered for it (queries × top-k ×
# head_dim, 256 × 512 × 512 at Flash's widths for a whole 256-token block). Longer chunks and
# contexts are processed in blocks of queries, so memory stays flat with context length.
_SCORE_BUDGET = 1 << 25


@dataclass
class LayerContext:
    """What a layer's attention needs besides its weights: config, rope, rounding switch."""

    config: ModelConfig
    rope: Rope
    quant_sim: bool


def compress(
    comp: Compressor,
    state: CompressorState,
    a: torch.Tensor,
    positions: torch.Tensor,
    ctx: LayerContext,
    d: int,
    finish,
) -> None:
    """Feed a chunk's tokens to a compressor; append a row for every window they complete.

    ``finish`` is applied to each new pooled row after its norm and rope (quantisation
    simulation, or the identity).
    """
    m = comp.ratio
    kv = quant.linear(a, comp.kv)
    gate = quant.linear(a, comp.gate) + comp.ape[positions % m]
    kv = torch.cat((state.pending_kv, kv))
    gate = torch.cat((state.pending_gate, gate))
    n_windows = kv.shape[0] // m
    done = n_windows * m
    if n_windows == 0:  # no window complete: the concatenations are the new frontier
        state.pending_kv, state.pending_gate = kv, gate
        return
    state.pending_kv, state.pending_gate = kv[done:].clone(), gate[done:].clone()
    kv = kv[:done].unflatten(0, (n_windows, m))
    gate = gate[:done].unflatten(0, (n_windows, m))
    if m == 4:
        # Row w pools the first halves of window w-1 and the second halves of window w.
        first_kv = kv[..., :d]
        first_gate = gate[..., :d]
        if state.previous_kv is None:
            prev_kv = kv.new_zeros(1, m, d)
            prev_gate = gate.new_full((1, m, d), float("-inf"))
        else:
            prev_kv, prev_gate = state.previous_kv[None], state.previous_gate[None]
        slots_kv = torch.cat((torch.cat((prev_kv, first_kv[:-1])), kv[..., d:]), dim=1)
        slots_gate = torch.cat((torch.cat((prev_gate, first_gate[:-1])), gate[..., d:]), dim=1)
        state.previous_kv, state.previous_gate = first_kv[-1].clone(), first_gate[-1].clone()
    else:
        slots_kv, slots_gate = kv, gate
    pooled = _pool(slots_kv, slots_gate)
    rows = rms_norm(pooled, comp.norm, ctx.config.rms_eps)
    first_window = state.rows.shape[0]
    window_starts = torch.arange(first_window, first_window + n_windows, device=rows.device) * m
    rows = finish(ctx.rope.apply(rows, window_starts))
    state.append_rows(rows)


def _pool(slots_kv: torch.Tensor, slots_gate: torch.Tensor) -> torch.Tensor:
    """Each window's slots (windows, slots, width) averaged with softmax(gate) weights per value."""
    if fused_cpu.applies(slots_kv):  # torch's softmax across slots opens a parallel region
        return fused_cpu.pool(slots_kv, slots_gate)
    return (slots_kv * torch.softmax(slots_gate, dim=1)).sum(dim=1)


def indexer_select(
    idx: Indexer,
    state: CompressorState,
    a: torch.Tensor,
    qr: torch.Tensor,
    positions: torch.Tensor,
    ctx: LayerContext,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-k compressed rows per query: ``(indices (T, k), valid (T, k))``, or None while the
    top-k holds every row, so that each query attends to all the rows it sees.

    A query sees rows ``w < (p + 1) // ratio``; when fewer than ``k`` are visible, the extra
    picks are marked invalid.
    """
    c = ctx.config
    finish = quantsim.indexer_round if ctx.quant_sim else _identity
    compress(idx.compressor, state, a, positions, ctx, c.index_head_dim, finish)
    keys = state.rows
    if keys.shape[0] <= c.index_topk:  # every row is picked: no scores needed
        return None
    visible = (positions + 1) // idx.compressor.ratio
    q = quant.linear(qr, idx.q_b).unflatten(-1, (c.index_n_head, c.index_head_dim))
    q = finish(ctx.rope.apply(q, positions))
    weights = quant.linear(a, idx.head_weights) * (c.index_head_dim * c.index_n_head) ** -0.5
    k = min(c.index_topk, keys.shape[0])
    step = max(1, _SCORE_BUDGET // max(1, c.index_n_head * keys.shape[0]))
    picks = []
    for start in range(0, q.shape[0], step):  # blocks of queries bound the score tensor's memory
        block = slice(start, start + step)
        scores = torch.einsum("thd,wd->thw", q[block], keys).relu()
        scores = torch.einsum("thw,th->tw", scores, weights[block])
        future = torch.arange(keys.shape[0], device=keys.device)[None, :] >= visible[block, None]
        picks.append(scores.masked_fill(future, float("-inf")).topk(k, dim=-1).indices)
    indices = torch.cat(picks)
    return indices, indices < visible[:, None]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _query_block(n_queries: int, heads: int, other_keys: int, gathered: int) -> int:
    """Largest block of queries whose scores (block × heads × (block + other_keys)) and gathered
    rows (block × ``gathered`` values per query) each fit the budget."""
    block = n_queries
    while block > 1 and block * max(heads * (block + other_keys), gathered) > _SCORE_BUDGET:
        block = (block + 1) // 2
    return block


def _attend_block(
    w: Attention,
    ctx: LayerContext,
    q: torch.Tensor,
    positions: torch.Tensor,
    first: int,
    raw: torch.Tensor,
    raw_start: int,
    rows: torch.Tensor | None,
    picks: torch.Tensor | None,
    valid: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Softmax attention with sinks for a block of consecutive queries (B, H, D), into ``out``
    (B, H, D).

    ``first`` is the first query's position (a host int, so the keys are sliced without reading
    ``positions`` back from the device). Keys: the raw rows of each query's window, and the
    compressed rows it may see (all complete windows for HCA, and for CSA its indexer's valid
    picks, or all its complete windows while the indexer picks every row).
    """
    c = ctx.config
    last = first + q.shape[0] - 1
    lo = max(0, first - c.window + 1 - raw_start)
    keys = raw[lo : last + 1 - raw_start]
    scale = c.head_dim**-0.5
    if fused_cpu.applies(q):
        if rows is not None and picks is None:
            rows = rows[: (last + 1) // w.compressor.ratio]  # those the block's last query sees
        if q.shape[0] == 1:  # one decoded token: every key it sees, one call
            picks, valid = (None, None) if picks is None else (picks[0], valid[0])
            fused_cpu.attend(q[0], keys, rows, picks, valid, w.sinks, scale, out[0])
            return
        # Every query of the block against every key any of them sees, as float32 GEMMs around
        # one fused softmax that gives the keys a query does not see probability 0: the keys
        # shared by the block (raw, and the compressed rows, or the rows its queries picked
        # when they are few), then each query's own picks.
        n_raw, ratio = keys.shape[0], 0 if rows is None else w.compressor.ratio
        if picks is not None:
            common = _shared_picks(picks, valid)
            if common is not None:  # few rows picked by the block as a whole: shared keys too
                picked, valid = common
                rows, picks = rows[picked], None
        if rows is not None and picks is None:
            keys = torch.cat((keys, rows))
        scores = torch.mm(q.reshape(-1, q.shape[-1]), keys.T).view(*q.shape[:2], -1)
        if picks is not None:
            chosen = rows[picks]  # (B, k, d)
            scores = torch.cat((scores, torch.bmm(q, chosen.transpose(1, 2))), dim=-1)
        offset = first - (raw_start + lo)
        fused_cpu.window_softmax(scores, n_raw, offset, c.window, first, ratio, valid, w.sinks, scale)
        shared = scores.view(-1, scores.shape[-1])[:, : keys.shape[0]]
        torch.mm(shared, keys, out=out.view(-1, keys.shape[1]))
        if picks is not None:
            out.baddbmm_(scores[..., keys.shape[0] :], chosen)
        return
    key_positions = torch.arange(raw_start + lo, raw_start + lo + keys.shape[0], device=keys.device)
    delta = positions[:, None] - key_positions[None, :]
    seen = (delta >= 0) & (delta < c.window)
    parts = [torch.einsum("thd,kd->thk", q, keys).masked_fill(~seen[:, None, :], float("-inf")) * scale]
    if picks is not None:  # CSA
        chosen = rows[picks]  # (B, k, d)
        scores = torch.einsum("thd,tkd->thk", q, chosen)
        parts.append(scores.masked_fill(~valid[:, None, :], float("-inf")) * scale)
    elif rows is not None:  # HCA, or CSA while every row is picked
        visible = (
            torch.arange(rows.shape[0], device=rows.device)[None, :]
            < ((positions + 1) // w.compressor.ratio)[:, None]
        )
        scores = torch.einsum("thd,wd->thw", q, rows)
        parts.append(scores.masked_fill(~visible[:, None, :], float("-inf")) * scale)
    sinks = w.sinks[None, :, None].expand(q.shape[0], -1, 1)
    probs = torch.softmax(torch.cat((*parts, sinks), dim=-1), dim=-1)
    n_raw = keys.shape[0]
    result = torch.einsum("thk,kd->thd", probs[..., :n_raw], keys)
    if picks is not None:
        result = result + torch.einsum("thk,tkd->thd", probs[..., n_raw:-1], chosen)
    elif rows is not None:
        result = result + torch.einsum("thk,kd->thd", probs[..., n_raw:-1], rows)
    out.copy_(result)


def _shared_picks(picks: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The compressed rows a block of queries picked, ``(rows (U,), which query picked which
    (B, U))``, when there are few enough that scoring them all for every query beats gathering
    each query's own (at most 5/4 of a query's picks: one GEMM for the block runs at about
    5/4 the speed of the per-query ones with their gathers); else None."""
    picked = torch.unique(picks[valid])
    if picked.numel() > picks.shape[1] * 5 // 4:
        return None
    if picked.numel() == 0:
        return picked, valid[:, :0]
    where = torch.searchsorted(picked, picks).clamp_(max=max(0, picked.numel() - 1))
    chosen = torch.zeros(picks.shape[0], picked.numel(), dtype=torch.int32)
    chosen.scatter_add_(1, where, valid.to(torch.int32))  # an invalid pick adds nothing
    return picked, chosen > 0


def attention(
    w: Attention,
    a: torch.Tensor,
    positions: torch.Tensor,
    first: int,
    state: LayerState,
    ctx: LayerContext,
) -> torch.Tensor:
    """Attention output (T, D) for a chunk of normed inputs ``a`` (T, D); updates ``state``.

    ``positions`` (T,) are ``first``, ``first + 1``, ... on the model's device; ``first`` also
    comes as a host int so that nothing is read back from the device.
    """
    c = ctx.config
    n_tok = a.shape[0]
    qr = rms_norm(quant.linear(a, w.q_a), w.q_norm, c.rms_eps)
    q = quant.linear(qr, w.q_b).unflatten(-1, (c.n_head, c.head_dim))  # normed and turned by block
    kv = ctx.rope.apply(rms_norm(quant.linear(a, w.kv), w.kv_norm, c.rms_eps), positions)
    if ctx.quant_sim:
        kv = quantsim.kv_round(kv, c.nope_dim)

    # Raw window: cached rows then the chunk's own; query p sees positions (p - window, p].
    raw_start = first - len(state.window)  # position of raw[0]
    state.window.append(kv)
    raw = state.window.view()
    state.window.keep_last(c.window - 1)

    rows = picks = valid = None
    if w.compressor is not None:
        finish = (lambda r: quantsim.kv_round(r, c.nope_dim)) if ctx.quant_sim else _identity
        compress(w.compressor, state.compressor, a, positions, ctx, c.head_dim, finish)
        rows = state.compressor.rows
        if w.indexer is not None:  # CSA: each query attends only to its indexer's top-k rows
            selected = indexer_select(w.indexer, state.indexer, a, qr, positions, ctx)
            if selected is not None:
                picks, valid = selected

    compressed_keys = 0 if rows is None else (picks.shape[1] if picks is not None else rows.shape[0])
    gathered = 0 if picks is None else picks.shape[1] * c.head_dim
    step = _query_block(n_tok, c.n_head, c.window + compressed_keys + 1, gathered)  # + 1: the sink
    # A block of B queries scores its raw keys (B + window - 1) for all of them. The torch code
    # takes blocks of half a window (the window mask throws a third of the scores away, in few
    # operations); the fused CPU path, a few GEMMs and a softmax per block, a sixteenth (5%).
    step = min(step, max(1, c.window // (16 if fused_cpu.applies(q) else 2)))
    out = q.new_empty(q.shape)

    def attend_block(start: int) -> None:
        """A block's queries normed and turned, attended, turned back: in cache from end to end."""
        block = slice(start, start + step)
        block_q = ctx.rope.apply(rms_norm(q[block], None, c.rms_eps), positions[block])
        chosen = (None, None) if picks is None else (picks[block], valid[block])
        args = (block_q, positions[block], first + start, raw, raw_start, rows, *chosen, out[block])
        _attend_block(w, ctx, *args)
        out[block] = ctx.rope.apply(out[block], positions[block], inverse=True)

    starts = range(0, n_tok, step)
    if fused_cpu.applies(q):  # the blocks shared out among threads, torch on one thread in each
        threads.share_out(attend_block, starts, torch.get_num_threads())
    else:
        for start in starts:
            attend_block(start)

    # Grouped output projection: each group of heads has its own block of out_a.
    groups = out.reshape(n_tok, c.o_groups, -1)
    group_ids = torch.arange(c.o_groups, device=out.device).expand(n_tok, -1)
    z = quant.expert_linear(groups, w.out_a, group_ids).flatten(1)
    return quant.linear(z, w.out_b)
