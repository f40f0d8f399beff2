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

``SessionPool`` is the one place that picks, among the live sessions and the disk cache, the
one with the longest reusable prefix. Live sessions are kept up to a count and a RAM budget,
least recently used evicted first (to the disk cache when there is one).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from dwarfstar.engine.diskcache import DiskCache
from dwarfstar.engine.kvfile import Snapshot
from dwarfstar.model.model import Model


@dataclass
class Prompt:
    """A prompt as the engine sees it: its text when it has one, and its tokens.

    ``tokens_after(offset)`` tokenizes the text from a character offset (the whole prompt at 0);
    it is given for text prompts and None for token prompts, whose ``tokens`` are given.
    """

    text: str | None
    tokens_after: Callable[[int], list[int]] | None = None
    tokens: list[int] | None = None
    turn_end: bool = False  # it ends where a turn opens: the next request continues its text exactly
    # When it ends with <think>, the next prompt is expected to leave it there (reasoning dropped).
    branches_at_think: bool = True
    # A conversation's anchor: the character offset where the part other conversations may share
    # ends (before the last user turn ahead of the first answer), and the tokens of a prefix.
    anchor: int | None = None
    tokens_before: Callable[[int], list[int]] | None = None

    def all_tokens(self) -> list[int]:
        if self.tokens is None:
            assert self.tokens_after is not None
            self.tokens = self.tokens_after(0)
        return self.tokens


MAX_TOOL_CALLS = 4096
MAX_SESSION_TOOL_CALLS = 256

# The state at the end of a prompt, with its tokens, text and next-token logits.
Checkpoint = Snapshot


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
        # The checkpoint is where the next prompt is expected to leave the live state (before a
        # thinking turn's ``<think>``), not a prefix of it: worth saving on its own.
        self.branches_at_checkpoint = False

    def reset(self) -> None:
        self.state = self.model.new_session()
        self.tokens: list[int] = []
        self.text: str | None = ""
        self.logits: torch.Tensor | None = None  # next-token logits after ``tokens``
        # The exact ``invoke`` text of the tool calls written in this session, by call id.
        self.tool_calls: dict[str, str] = {}
        self.frontier_saved = 0  # tokens held at the last mid-prefill save
        # The state at the end of the part of the prompt other conversations may share (its
        # system prompt and tools): another session can start from a copy of it.
        self.anchor: Snapshot | None = None

    def save_checkpoint(self, branch: bool = False) -> None:
        assert self.logits is not None
        self.checkpoint = Checkpoint(self.state.snapshot(), list(self.tokens), self.text, self.logits)
        self.branches_at_checkpoint = branch

    def as_snapshot(self) -> Snapshot | None:
        """What is worth keeping of this session: its state when whole (its next-token logits
        known), else its checkpoint."""
        if self.tokens and self.logits is not None:
            return Snapshot(self.state.snapshot(), list(self.tokens), self.text, self.logits)
        return self.checkpoint

    def adopt(self, snapshot: Snapshot) -> None:
        """Continue from ``snapshot`` (loaded from disk): it becomes the state and the checkpoint."""
        self.state = snapshot.state
        self.tokens, self.text, self.logits = list(snapshot.tokens), snapshot.text, snapshot.logits
        calls = snapshot.extra.get("tool_calls")
        self.tool_calls = {str(k): str(v) for k, v in calls.items()} if isinstance(calls, dict) else {}
        self.frontier_saved = len(self.tokens)
        self.save_checkpoint()
        if snapshot.extra.get("reason") == "anchor":  # others may start from it too
            self.anchor = self.checkpoint

    def fork(self, snapshot: Snapshot) -> None:
        """Continue from a copy of ``snapshot`` (another session's anchor, which stays as it is)."""
        copy = Snapshot(snapshot.state.snapshot(), snapshot.tokens, snapshot.text, snapshot.logits)
        self.adopt(copy)
        self.anchor = snapshot

    @property
    def nbytes(self) -> int:
        """Memory held: the state (its checkpoint shares the rows) and the logits kept."""
        logits = 0 if self.logits is None else self.logits.numel() * self.logits.element_size()
        return self.state.nbytes + 2 * logits

    def restore_checkpoint(self) -> None:
        assert self.checkpoint is not None
        cp = self.checkpoint
        self.state.restore(cp.state)
        self.tokens, self.text, self.logits = list(cp.tokens), cp.text, cp.logits
        self.frontier_saved = len(self.tokens)

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
    """Up to ``max_sessions`` live sessions in ``ram_bytes``, most recently used last, and an
    optional disk cache behind them."""

    def __init__(
        self,
        model: Model,
        max_sessions: int = 1,
        ram_bytes: int | None = None,
        disk: DiskCache | None = None,
        save_interval: int | None = None,
        trim: int = 32,
        align: int = 2048,
        min_tokens: int = 512,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, not {max_sessions}")
        self.model = model
        self.max_sessions = max_sessions
        self.ram_bytes = ram_bytes
        self.disk = disk
        self.save_interval = save_interval  # save every this many tokens of prefill or generation
        self.trim, self.align = trim, align  # where a long raw prompt is saved: see prompt_store_point
        self.min_tokens = min_tokens  # the shortest anchor worth keeping
        self.sessions: list[LiveSession] = []
        self.tool_calls: OrderedDict[str, str] = OrderedDict()  # the most recent last

    def acquire(self, prompt: Prompt) -> tuple[LiveSession, Plan]:
        """The session with the longest reusable prefix for ``prompt``, and how to use it.

        A saved snapshot that holds more of the prompt than any live session is loaded. A
        prompt that reuses nothing gets a new session while there is room, else the least
        recently used one (saved to disk first).
        """
        best: tuple[LiveSession, Plan] | None = None
        for session in self.sessions:
            plan = session.plan(prompt)
            if best is None or plan.reused > best[1].reused:
                best = (session, plan)
        reused = 0 if best is None else best[1].reused
        anchor = self._anchor(prompt, reused)
        loaded = self._load(prompt, reused if anchor is None else len(anchor.tokens))
        if loaded is not None:
            session = self._free_session()
            session.adopt(loaded)
            best = (session, session.plan(prompt))
        elif anchor is not None:
            session = self._free_session()
            session.fork(anchor)
            best = (session, session.plan(prompt))
        elif best is None or best[1].reused == 0:
            session = self._free_session()
            best = (session, Plan("empty", prompt.all_tokens(), 0))
        session = best[0]
        if session in self.sessions:
            self.sessions.remove(session)
        self.sessions.append(session)
        self._fit()
        return best

    def _anchor(self, prompt: Prompt, live_reuse: int) -> Snapshot | None:
        """A live session's anchor holding more of ``prompt`` than ``live_reuse`` tokens."""
        best = None
        for session in self.sessions:
            anchor = session.anchor
            if anchor is None or anchor.text is None or prompt.text is None:
                continue
            longer = len(anchor.tokens) > max(live_reuse, 0 if best is None else len(best.tokens))
            if longer and prompt.text.startswith(anchor.text):
                best = anchor
        return best

    def _load(self, prompt: Prompt, live_reuse: int) -> Snapshot | None:
        """A snapshot from disk holding more of ``prompt`` than ``live_reuse`` tokens."""
        if self.disk is None:
            return None
        # Matching by tokens needs the whole prompt tokenized: done when no live session holds
        # a part of it (a cold prompt is tokenized anyway), or when a live plan did it already.
        tokens = prompt.all_tokens() if live_reuse == 0 or prompt.tokens is not None else None
        entry = self.disk.lookup(prompt.text, tokens)
        if entry is None or entry.n_tokens <= live_reuse:
            return None
        return self.disk.load(entry, prompt.text, tokens)

    def _free_session(self) -> LiveSession:
        """A new session while there is room, else the least recently used one, emptied."""
        if len(self.sessions) < self.max_sessions:
            return LiveSession(self.model)
        session = self.sessions[0]
        self.save(session, "evict")
        session.reset()
        session.checkpoint = None
        return session

    def _fit(self) -> None:
        """Evict least recently used sessions (to disk) until the rest fit the RAM budget; the
        most recent one always stays."""
        if self.ram_bytes is None:
            return
        while len(self.sessions) > 1 and sum(s.nbytes for s in self.sessions) > self.ram_bytes:
            self.save(self.sessions.pop(0), "evict")

    def prompt_store_point(self, n: int, reused: int, turn_end: bool) -> int | None:
        """Where a prompt of ``n`` tokens, ``reused`` of them already held, is saved during its
        prefill; None: at its end (its checkpoint), or not at all.

        A rendered conversation ends where a turn opens, and the next request continues its text
        exactly: its end is the point to keep. A raw prompt may be continued mid-word, so it is
        saved ``trim`` tokens short of its end, aligned down to a multiple of ``align`` (when
        that still holds ``min_tokens``), as ds4 does.
        """
        if self.disk is None or turn_end or n - reused < self.disk.min_tokens:
            return None
        stable = (n - self.trim) // self.align * self.align
        return stable if stable >= self.disk.min_tokens and stable > reused else None

    def save_points(self, start: int, end: int) -> range:
        """The multiples of ``save_interval`` in (``start``, ``end``): where a prefill stops to
        save (counted from the start of the sequence, so they are the same in every session)."""
        interval = self.save_interval
        if self.disk is None or not interval:
            return range(0)
        return range((start // interval + 1) * interval, end, interval)

    def save_prefix(self, session: LiveSession, text: str | None) -> None:
        """Mid-prefill, at the point ``prompt_store_point`` chose: the state goes to disk (named
        by ``text``, the text of its tokens, when known)."""
        assert session.logits is not None
        self._save(
            session, Snapshot(session.state.snapshot(), list(session.tokens), text, session.logits), "prompt"
        )
        session.frontier_saved = len(session.tokens)  # no second file for the same state

    def keep_anchor(self, session: LiveSession, text: str) -> None:
        """Mid-prefill, at the prompt's anchor (``text`` its text): keep the state there for other
        conversations that share it, and save it to disk."""
        assert session.logits is not None
        session.anchor = Snapshot(session.state.snapshot(), list(session.tokens), text, session.logits)
        if self.disk is not None:
            self._save(session, session.anchor, "anchor")

    def prompt_read(self, session: LiveSession, computed: int, prefix_saved: bool = False) -> None:
        """After a prompt's prefill: a long one (``computed`` tokens read) is saved to disk at
        its checkpoint, unless a prefix of it was saved on the way (``save_prefix``)."""
        disk = self.disk
        if disk is not None and not prefix_saved and computed >= disk.min_tokens and session.checkpoint:
            self._save(session, session.checkpoint, "prompt")
        self._fit()

    def frontier(
        self, session: LiveSession, reason: str, text: Callable[[], str | None] | None = None
    ) -> None:
        """During a prefill or a generation: each time the session crosses a multiple of
        ``save_interval`` tokens, its state goes to disk (named by ``text()``, the text it holds,
        when known; else by its tokens), so work cut short (a crash, a restart) resumes there."""
        interval = self.save_interval
        if self.disk is None or not interval or session.logits is None:
            return
        if len(session.tokens) // interval > session.frontier_saved // interval:
            held = None if text is None else text()
            snapshot = Snapshot(session.state.snapshot(), list(session.tokens), held, session.logits)
            self._save(session, snapshot, reason)
            session.frontier_saved = len(session.tokens)

    def save(self, session: LiveSession, reason: str) -> None:
        """Write ``session`` to disk: its state, and its checkpoint too when the next prompt is
        expected to leave the state there (a thinking turn)."""
        if self.disk is None or (snapshot := session.as_snapshot()) is None:
            return
        self._save(session, snapshot, reason)
        checkpoint = session.checkpoint
        if session.branches_at_checkpoint and checkpoint is not None and checkpoint is not snapshot:
            self._save(session, checkpoint, reason)

    def _save(self, session: LiveSession, snapshot: Snapshot, reason: str) -> None:
        assert self.disk is not None
        snapshot.extra = {**snapshot.extra, "tool_calls": dict(session.tool_calls)}
        self.disk.save(snapshot, reason)

    def remember_tool_calls(self, session: LiveSession, calls: dict[str, str]) -> None:
        """Keep the exact text of tool calls the model wrote, so that a client sending them back
        in another serialization still renders the prompt the session holds (bounded: the
        most recent ``MAX_TOOL_CALLS`` here, ``MAX_SESSION_TOOL_CALLS`` per session)."""
        for call_id, text in calls.items():
            self.tool_calls[call_id] = text
            self.tool_calls.move_to_end(call_id)
            session.tool_calls.pop(call_id, None)
            session.tool_calls[call_id] = text
        while len(self.tool_calls) > MAX_TOOL_CALLS:
            self.tool_calls.popitem(last=False)
        for call_id in list(session.tool_calls)[: max(0, len(session.tool_calls) - MAX_SESSION_TOOL_CALLS)]:
            del session.tool_calls[call_id]

    def replay(self) -> dict[str, str]:
        """Tool-call id -> the text the model wrote: from the disk cache's files, then this process."""
        texts = self.disk.tool_calls() if self.disk is not None else {}
        texts.update(self.tool_calls)
        return texts

    def close(self) -> None:
        """At shutdown: every live session to disk."""
        for session in self.sessions:
            self.save(session, "shutdown")
