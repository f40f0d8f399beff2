"""Choosing the next token: temperature, top-k, top-p, min-p, a seeded draw, and stop strings.

The filters apply in this order to ``softmax(logits / temperature)``:

1. ``top_k`` (0 = off): keep the ``top_k`` most likely tokens;
2. ``min_p`` (0 = off): drop tokens less likely than ``min_p`` times the most likely one
   (relative to the top token, after temperature, as in antirez's ds4);
3. ``top_p`` (1 = off): of what is left, renormalised, keep the most likely tokens until their
   cumulative probability reaches ``top_p``.

The draw walks the kept tokens in id order with one uniform number from NumPy's PCG64 seeded
by ``seed``, so a seed gives the same tokens in every process and on every platform. A
temperature of 0 (or a greedy step, see ``OutputParser.in_structure``) takes the argmax.

Log-probabilities (``token_logprobs``) are those of the model itself: a log-softmax of the raw
logits over the whole vocabulary, before temperature or any filter (as OpenAI reports them).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# DeepSeek's recommendation for V4 (temperature 1, top_p 1) plus ds4's min_p.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_MIN_P = 0.05


@dataclass(frozen=True)
class SamplingParams:
    """How one answer is sampled. ``max_tokens`` None: until EOS or the context is full."""

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = 0
    top_p: float = DEFAULT_TOP_P
    min_p: float = DEFAULT_MIN_P
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    greedy_dsml: bool = True  # sample DSML structure greedily (see OutputParser.in_structure)
    logprobs: int | None = None  # None: none; N: each token's log-probability and the N likeliest

    def __post_init__(self) -> None:
        checks = (
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("seed", self.seed is None or self.seed >= 0, "must be >= 0"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 0, "must be >= 0"),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "must be >= 0"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, not {getattr(self, name)!r}")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))


def token_probabilities(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """The distribution a draw uses: float64 (vocab,), zero outside the kept set, summing to 1."""
    logits = logits.detach().reshape(-1).to("cpu", torch.float64)
    logits = torch.where(torch.isfinite(logits), logits, torch.tensor(-torch.inf, dtype=torch.float64))
    if temperature <= 0:
        probs = torch.zeros_like(logits)
        probs[int(logits.argmax())] = 1.0
        return probs
    weights = torch.exp((logits - logits.max()) / temperature)  # the top token weighs 1
    if 0 < top_k < weights.numel():
        keep = torch.topk(weights, top_k).indices
        weights = torch.zeros_like(weights).index_copy_(0, keep, weights[keep])
    if min_p > 0:
        weights = torch.where(weights >= min_p, weights, 0.0)
    if top_p < 1:
        order = torch.argsort(weights, descending=True, stable=True)
        sorted_probs = weights[order] / weights.sum()
        before = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass of the more likely tokens
        weights = torch.zeros_like(weights).index_copy_(
            0, order, torch.where(before < top_p, weights[order], 0.0)
        )
    return weights / weights.sum()


def token_logprobs(logits: torch.Tensor, chosen: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of token ``chosen`` and the ``top_n`` likeliest (id, log-probability),
    most likely first: a float32 log-softmax over the whole vocabulary of the raw ``logits``
    (before temperature or any filter), one top-k, one transfer from the device."""
    logprobs = torch.log_softmax(logits.detach().reshape(-1).float(), dim=-1)
    values, ids = torch.topk(logprobs, min(top_n, logprobs.numel()))
    figures = torch.cat([logprobs[chosen].reshape(1), values]).tolist()
    return figures[0], list(zip(ids.tolist(), figures[1:], strict=True))


class Sampler:
    """Draws tokens for one answer; ``seed`` None picks a random seed (kept in ``self.seed``)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))

    def sample(self, logits: torch.Tensor, greedy: bool = False) -> int:
        p = self.params
        if greedy or p.temperature <= 0:
            finite = torch.where(torch.isfinite(logits), logits, -torch.inf)
            return int(finite.reshape(-1).argmax())
        probs = token_probabilities(logits, p.temperature, p.top_k, p.top_p, p.min_p)
        kept = torch.nonzero(probs).reshape(-1)
        cumulative = torch.cumsum(probs[kept], 0)
        u = self._rng.random() * float(cumulative[-1])
        return int(kept[min(int(torch.searchsorted(cumulative, u, right=True)), kept.numel() - 1)])


def _held_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that a stop string could still begin with."""
    for n in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1):
        if any(stop.startswith(text[-n:]) for stop in stops):
            return n
    return 0


class StopMatcher:
    """Cuts generated text at the first stop string, even one split across tokens.

    ``push`` returns the text that is safe to show; a tail that may begin a stop string is held
    until the next piece tells. ``stopped`` turns true at a match: the stop string and all
    after it are never returned.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        text = self._held + text
        hits = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        keep = _held_len(text, self.stops)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What is held at the end of generation (it never became a stop string)."""
        text, self._held = self._held, ""
        return "" if self.stopped else text


class ScriptedSampler(Sampler):
    """Chooses the given token ids in order, then ``end_id``: makes any model, even a random one,
    write a chosen answer while the detokenizer, parser and everything after them run for real.

    Tests of the layers above the model use it (``ds4 serve --allow-scripted-output``).
    """

    def __init__(self, script: Sequence[int], end_id: int, params: SamplingParams | None = None) -> None:
        super().__init__(params or SamplingParams(temperature=0))
        self.script = list(script)
        self.end_id = end_id

    def sample(self, logits: torch.Tensor, greedy: bool = False) -> int:
        return self.script.pop(0) if self.script else self.end_id
