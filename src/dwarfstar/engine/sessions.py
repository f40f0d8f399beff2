"""Live sessions: decode state that outlives a request, and how a prompt finds what it can reuse.

A ``LiveSession`` knows the tokens its state holds and, when known, their text (the rendered
prompt plus the text the model generated). A new prompt reuses a session when:

1. the session's text is a prefix of the prompt's text: only the rest of the text is
   tokenized and prefilled (so a model's own tokens are kept even where tokenizing its text
   again would split it differently); or
2. the session's tokens are a prefix of the prompt's tokens.

A session the prompt diverges from can roll back to its **checkpoint**, a copy of the state
taken at the end of its latest prompt (before generation). That covers regenerating an
answer, a stop string (the state holds tokens after the stop), a tool call the client sends
back re-serialized and an interrupted turn. Otherwise the prompt is prefilled from zero.

``SessionPool`` is the one place that picks, among the live sessions, the one with the
longest reusable prefix (least recently used evicted when full); a disk cache plugs in there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from dwarfstar.model.model import Model
from dwarfstar.model.state import Session


@dataclass
class Prompt:
    """A prompt as the engine sees it: its text when it has one, and its tokens.

    ``tokens_after(offset)`` tokenizes the text from a character offset (the whole prompt at 0);
    it is given for text prompts and None for token prompts, whose ``tokens`` are given.
    """

    text: str | None
    tokens_after: Callable[[int], list[int]] | None = None
    tokens: list[int] | None = None

    def all_tokens(self) -> list[int]:
        if self.tokens is None:
            assert self.tokens_after is not None
            self.tokens = self.tokens_after(0)
        return self.tokens


@dataclass
class Checkpoint:
    state: Session
    tokens: list[int]
    text: str | None
    logits: torch.Tensor


@dataclass
class Plan:
    """How to reach a prompt from a session: start from ``source``, which holds ``reused``
    of the prompt's ``tokens``, and prefill the rest."""

    source: Literal["live", "checkpoint", "empty"]
    tokens: list[int]
    reused: int


class LiveSession:
    """Decode state plus the tokens it holds (``text`` None when their text is not known)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.reset()
        self.checkpoint: Checkpoint | None = None

    def reset(self) -> None:
        self.state = self.model.new_session()
        self.tokens: list[int] = []
        self.text: str | None = ""
        self.logits: torch.Tensor | None = None  # next-token logits after ``tokens``

    def save_checkpoint(self) -> None:
        assert self.logits is not None
        self.checkpoint = Checkpoint(self.state.snapshot(), list(self.tokens), self.text, self.logits)

    def restore_checkpoint(self) -> None:
        assert self.checkpoint is not None
        cp = self.checkpoint
        self.state.restore(cp.state)
        self.tokens, self.text, self.logits = list(cp.tokens), cp.text, cp.logits

    def rollback(self) -> None:
        """After a forward pass was interrupted (its state is half written): the checkpoint, or empty."""
        if self.checkpoint is not None:
            self.restore_checkpoint()
        else:
            self.reset()

    def plan(self, prompt: Prompt) -> Plan:
        """The longest reuse this session offers ``prompt``: its current state, or its checkpoint."""
        starts = [("live", self.tokens, self.text, self.logits)]
        if self.checkpoint is not None:
            cp = self.checkpoint
            starts.append(("checkpoint", cp.tokens, cp.text, cp.logits))
        for source, tokens, text, logits in starts:
            if tokens and logits is None:
                continue
            by_text = prompt.text is not None and text is not None and prompt.tokens_after is not None
            if by_text and prompt.text.startswith(text):
                return Plan(source, tokens + prompt.tokens_after(len(text)), len(tokens))
            full = prompt.all_tokens()
            if full[: len(tokens)] == tokens:
                return Plan(source, full, len(tokens))
        return Plan("empty", prompt.all_tokens(), 0)


class SessionPool:
    """Up to ``max_sessions`` live sessions, most recently used last."""

    def __init__(self, model: Model, max_sessions: int = 1) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, not {max_sessions}")
        self.model = model
        self.max_sessions = max_sessions
        self.sessions: list[LiveSession] = []

    def acquire(self, prompt: Prompt) -> tuple[LiveSession, Plan]:
        """The session with the longest reusable prefix for ``prompt``, and how to use it.

        A prompt that reuses nothing gets a new session while there is room, else the least
        recently used one.
        """
        best: tuple[LiveSession, Plan] | None = None
        for session in self.sessions:
            plan = session.plan(prompt)
            if best is None or plan.reused > best[1].reused:
                best = (session, plan)
        if best is None or (best[1].reused == 0 and len(self.sessions) < self.max_sessions):
            session = LiveSession(self.model)
            best = (session, Plan("empty", prompt.all_tokens(), 0))
        elif best[1].reused == 0:
            best = (self.sessions[0], best[1])
        session = best[0]
        if session in self.sessions:
            self.sessions.remove(session)
        self.sessions.append(session)
        return best
