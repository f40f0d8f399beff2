"""DeepSeek V4 Flash: tokens in, logits out, with the decode state carried in a Session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from dwarfstar import quant
from dwarfstar.model.attention import LayerContext, attention
from dwarfstar.model.config import load_config
from dwarfstar.model.device import resolve_device, reuse_freed_host_memory, upload
from dwarfstar.model.hyper import hc_head, hc_post, hc_pre
from dwarfstar.model.moe import moe
from dwarfstar.model.norm import rms_norm
from dwarfstar.model.rope import layer_rope
from dwarfstar.model.state import Session
from dwarfstar.model.weights import Weights, bind

# The most logits ``Model.prefill`` gathers at once (512 MiB of float32: about 1000 tokens of
# Flash's vocabulary).
MAX_PREFILL_LOGITS = 1 << 27


class Model:
    """The forward pass over bound weights.

    ``quant_sim`` rounds stored KV rows and indexer vectors the way DeepSeek's own inference
    does (see ``quantsim``); by default it is on for the real Flash model and off for small
    models, which are compared with references that do not simulate it.

    Every tensor of the weights, the sessions and the forward pass lives on ``device`` (that of
    the weights given); a decode step reads nothing back to the host.
    """

    def __init__(self, weights: Weights, quant_sim: bool | None = None) -> None:
        self.weights = weights
        self.config = weights.config
        self.device = weights.norm.device
        self.quant_sim = self.config.is_flash if quant_sim is None else quant_sim
        if self.device.type == "cpu":  # a prefill's temporaries reuse freed memory, no page faults
            reuse_freed_host_memory()
        self.contexts = [
            LayerContext(
                self.config, layer_rope(self.config, self.config.ratio(i)).to(self.device), self.quant_sim
            )
            for i in range(self.config.n_layer)
        ]

    @classmethod
    def load(
        cls, path: str | Path, quant_sim: bool | None = None, device: str | torch.device | None = "cpu"
    ) -> Model:
        """Memory-map a GGUF file (or every shard of a split one) and bind its tensors; nothing
        is dequantized here. On another ``device`` (None: the best available) the weights are
        uploaded once; a DeviceError when they do not fit."""
        from dwarfstar.gguf.shards import GGUFModel

        target = resolve_device(device)
        file = GGUFModel(path)
        config = load_config(file)
        model = cls(upload(bind(config, file.tensors, str(path)), target), quant_sim)
        model.file = file  # keeps the mapping alive as long as the model
        return model

    def new_session(self) -> Session:
        return Session.new(self.config, self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, session: Session, all_logits: bool = True) -> torch.Tensor:
        """Process ``tokens`` (T,) after what ``session`` holds; return float32 logits.

        Returns (T, vocab) logits, or (1, vocab) for the last token when ``all_logits`` is
        false. The session advances by T tokens.
        """
        c = self.config
        tokens = self._checked_tokens(tokens).to(self.device)
        first = session.n_tokens
        positions = torch.arange(first, first + tokens.shape[0], device=self.device)
        x = quant.take_rows(self.weights.embed, tokens)
        streams = x[:, None, :].expand(-1, c.hc_mult, -1)
        for i, (layer, state) in enumerate(zip(self.weights.layers, session.layers, strict=True)):
            a, post, comb = hc_pre(streams, layer.attn_hc, c.rms_eps, c.hc_eps, c.hc_sinkhorn_iters)
            out = attention(
                layer.attn, rms_norm(a, layer.attn_norm, c.rms_eps), positions, first, state, self.contexts[i]
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

    def _checked_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` as a flat int64 tensor; a ValueError unless they are integer ids in the vocabulary.

        The check runs where the ids come from (the host, normally): ids already on the model's
        device are checked without reading them back, by the device's own bounds checks."""
        tokens = torch.as_tensor(tokens)
        if tokens.numel() == 0:
            raise ValueError("no tokens to process: give at least one token id")
        if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(f"token ids must be integers, got a tensor of {tokens.dtype}")
        tokens = tokens.to(torch.long).reshape(-1)
        if tokens.device.type != "cpu":
            return tokens
        bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)]
        if bad.numel():
            raise ValueError(f"token ids out of range [0, {self.config.vocab_size}): {bad[:5].tolist()}")
        return tokens

    def prefill_chunks(
        self, tokens: torch.Tensor, session: Session, chunk: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Process a prompt ``chunk`` tokens at a time, yielding each chunk's logits (n, vocab)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        step = chunk or max(1, tokens.shape[0])
        for start in range(0, tokens.shape[0], step):
            yield self.forward(tokens[start : start + step], session)

    def prefill(self, tokens: torch.Tensor, session: Session, chunk: int | None = None) -> torch.Tensor:
        """Logits (T, vocab) for every token, processing the prompt in chunks of ``chunk``.

        For prompts whose logits would exceed ``MAX_PREFILL_LOGITS`` values it raises a
        ValueError: iterate ``prefill_chunks`` (or ``forward(..., all_logits=False)``) instead.
        """
        n_tokens = torch.as_tensor(tokens).numel()
        if n_tokens * self.config.vocab_size > MAX_PREFILL_LOGITS:
            raise ValueError(
                f"prefill returns the logits of every token: {n_tokens} x {self.config.vocab_size} values "
                f"exceed {MAX_PREFILL_LOGITS}; iterate prefill_chunks, or forward with all_logits=False"
            )
        return torch.cat(list(self.prefill_chunks(tokens, session, chunk)))
