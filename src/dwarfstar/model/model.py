"""DeepSeek V4 Flash: tokens in, logits out, with the decode state carried in a Session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from dwarfstar import quant
from dwarfstar.model.attention import LayerContext, attention
from dwarfstar.model.config import load_config
from dwarfstar.model.hyper import hc_head, hc_post, hc_pre
from dwarfstar.model.moe import moe
from dwarfstar.model.norm import rms_norm
from dwarfstar.model.rope import layer_rope
from dwarfstar.model.state import Session
from dwarfstar.model.weights import Weights, bind


class Model:
    """The forward pass over bound weights.

    ``quant_sim`` rounds stored KV rows and indexer vectors the way DeepSeek's own inference
    does (see ``quantsim``); by default it is on for the real Flash model and off for small
    models, which are compared with references that do not simulate it.
    """

    def __init__(self, weights: Weights, quant_sim: bool | None = None) -> None:
        self.weights = weights
        self.config = weights.config
        self.quant_sim = self.config.is_flash if quant_sim is None else quant_sim
        self.contexts = [
            LayerContext(self.config, layer_rope(self.config, self.config.ratio(i)), self.quant_sim)
            for i in range(self.config.n_layer)
        ]

    @classmethod
    def load(cls, path: str | Path, quant_sim: bool | None = None) -> Model:
        """Memory-map a GGUF file (or every shard of a split one) and bind its tensors; nothing
        is dequantized here."""
        from dwarfstar.gguf.shards import GGUFModel

        file = GGUFModel(path)
        config = load_config(file)
        model = cls(bind(config, file.tensors, str(path)), quant_sim)
        model.file = file  # keeps the mapping alive as long as the model
        return model

    def new_session(self) -> Session:
        return Session.new(self.config)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, session: Session, all_logits: bool = True) -> torch.Tensor:
        """Process ``tokens`` (T,) after what ``session`` holds; return float32 logits.

        Returns (T, vocab) logits, or (1, vocab) for the last token when ``all_logits`` is
        false. The session advances by T tokens.
        """
        c = self.config
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        positions = torch.arange(session.n_tokens, session.n_tokens + tokens.shape[0])
        x = quant.take_rows(self.weights.embed, tokens)
        streams = x[:, None, :].expand(-1, c.hc_mult, -1)
        for i, (layer, state) in enumerate(zip(self.weights.layers, session.layers, strict=True)):
            a, post, comb = hc_pre(streams, layer.attn_hc, c.rms_eps, c.hc_eps, c.hc_sinkhorn_iters)
            out = attention(
                layer.attn, rms_norm(a, layer.attn_norm, c.rms_eps), positions, state, self.contexts[i]
            )
            streams = hc_post(out, streams, post, comb)
            a, post, comb = hc_pre(streams, layer.ffn_hc, c.rms_eps, c.hc_eps, c.hc_sinkhorn_iters)
            out = moe(layer.moe, rms_norm(a, layer.ffn_norm, c.rms_eps), tokens, c, c.swiglu_limit[i])
            streams = hc_post(out, streams, post, comb)
        session.n_tokens += tokens.shape[0]
        if not all_logits:
            streams = streams[-1:]
        y = rms_norm(
            hc_head(streams, self.weights.head_hc, c.rms_eps, c.hc_eps), self.weights.norm, c.rms_eps
        )
        return quant.linear(y, self.weights.output)

    def prefill_chunks(
        self, tokens: torch.Tensor, session: Session, chunk: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Process a prompt ``chunk`` tokens at a time, yielding each chunk's logits (n, vocab)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        step = chunk or max(1, tokens.shape[0])
        for start in range(0, tokens.shape[0], step):
            yield self.forward(tokens[start : start + step], session)

    def prefill(self, tokens: torch.Tensor, session: Session, chunk: int | None = None) -> torch.Tensor:
        """Logits (T, vocab) for every token, processing the prompt in chunks of ``chunk``."""
        return torch.cat(list(self.prefill_chunks(tokens, session, chunk)))
