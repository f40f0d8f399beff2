"""The engine: one model and tokenizer, the live sessions, and generation as a stream of events.

A request becomes a prompt (a ``Conversation``, raw text, or token ids), finds the live
session with the longest matching prefix (``SessionPool``), prefills only what that session
lacks, then samples token by token. Each token is detokenized, cut at stop strings and fed to
the incremental ``OutputParser``, whose events (reasoning, content, tool calls) the consumer
forwards. The engine is used from one thread at a time; ``Generation.cancel()`` may be called
from any thread and takes effect before the next prefill chunk or token.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch

from dwarfstar.chat.conversation import Conversation
from dwarfstar.chat.parser import Done, OutputParser
from dwarfstar.chat.render import Part, render_parts, tool_calls_opening
from dwarfstar.chat.tokens import ASSISTANT, INVOKE_CLOSE, INVOKE_OPEN, THINK_OPEN, TOOL_CALLS_OPEN, USER
from dwarfstar.engine.diskcache import DiskCache
from dwarfstar.engine.events import (
    Event,
    Finished,
    FinishReason,
    PrefillProgress,
    TokenLogprob,
    TokenSampled,
    Usage,
)
from dwarfstar.engine.sampling import Sampler, SamplingParams, StopMatcher, token_logprobs
from dwarfstar.engine.sessions import LiveSession, Plan, Prompt, SessionPool
from dwarfstar.model.model import Model
from dwarfstar.tokenizer import StreamDecoder, Tokenizer

DEFAULT_CTX = 32768
# Bounds the attention score tensors of a long prompt; every chunking gives the same tokens.
DEFAULT_PREFILL_CHUNK = 512
_INVOKE = re.compile(re.escape(INVOKE_OPEN) + ".*?" + re.escape(INVOKE_CLOSE), re.S)
DEFAULT_KV_DISK_SPACE_MB = 16384
# Prompts shorter than this are cheap to read again: not worth a file.
DEFAULT_KV_MIN_TOKENS = 512
# A long raw prompt is saved this many tokens short of its end, aligned down to a multiple of
# the alignment, so the next request, which may continue its last word, still extends it.
DEFAULT_KV_TRIM = 32
DEFAULT_KV_ALIGN = 2048


class EngineError(ValueError):
    """A request or a model file the engine cannot serve; the message says why."""


class ContextLengthError(EngineError):
    def __init__(self, prompt_tokens: int, ctx: int) -> None:
        super().__init__(
            f"the prompt is {prompt_tokens} tokens but the context holds {ctx} "
            f"(leave at least one token for the answer, or raise the context size)"
        )
        self.prompt_tokens = prompt_tokens
        self.ctx = ctx


class Engine:
    """A loaded model ready to answer; owns the live sessions (``self.sessions``).

    ``ctx`` caps prompt plus answer, per session. The engine runs where the model's weights are
    (``model.device``; ``Engine.open(..., device=...)`` loads them there).
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        *,
        ctx: int = DEFAULT_CTX,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        max_sessions: int = 1,
        kv_ram_mb: float | None = None,
        kv_disk_dir: str | Path | None = None,
        kv_disk_space_mb: float = DEFAULT_KV_DISK_SPACE_MB,
        kv_min_tokens: int = DEFAULT_KV_MIN_TOKENS,
        kv_save_interval: int | None = None,
        kv_trim: int = DEFAULT_KV_TRIM,
        kv_align: int = DEFAULT_KV_ALIGN,
    ) -> None:
        if ctx < 2:
            raise EngineError(f"the context must hold at least 2 tokens, not {ctx}")
        if prefill_chunk < 1:
            raise EngineError(f"the prefill chunk must be at least 1 token, not {prefill_chunk}")
        self.model = model
        self.tokenizer = tokenizer
        self.ctx = ctx
        self.prefill_chunk = prefill_chunk
        self.device = model.device
        if kv_ram_mb is not None and kv_ram_mb <= 0:
            raise EngineError(f"the KV RAM budget must be positive, not {kv_ram_mb} MB")
        if kv_disk_space_mb <= 0 or kv_min_tokens < 1:
            raise EngineError("the KV disk space must be positive and the minimum tokens at least 1")
        disk = None
        if kv_disk_dir is not None:
            try:
                disk = DiskCache(kv_disk_dir, model, int(kv_disk_space_mb * 2**20), kv_min_tokens)
            except OSError as err:
                raise EngineError(
                    f"cannot use {kv_disk_dir} as the KV cache: {err.strerror or err}"
                ) from None
        if kv_save_interval is not None and kv_save_interval < 1:
            raise EngineError(f"the KV save interval must be at least 1 token, not {kv_save_interval}")
        if kv_trim < 0 or kv_align < 1:
            raise EngineError(
                f"the KV trim must be at least 0 and the alignment at least 1, not {kv_trim}, {kv_align}"
            )
        ram = None if kv_ram_mb is None else int(kv_ram_mb * 2**20)
        self.sessions = SessionPool(
            model, max_sessions, ram, disk, kv_save_interval, kv_trim, kv_align, kv_min_tokens
        )

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        quant_sim: bool | None = None,
        device: str | torch.device | None = "cpu",
        **options: object,
    ) -> Engine:
        """Load a GGUF file (memory-mapped) and its embedded tokenizer, the weights on ``device``
        (None: the best available; see docs/gpu.md).

        Raises ``EngineError`` with a message a user can act on when the file is missing or is
        not a DeepSeek V4 Flash GGUF.
        """
        from dwarfstar.gguf.reader import GGUFError
        from dwarfstar.model.config import ConfigError
        from dwarfstar.model.device import DeviceError
        from dwarfstar.model.weights import WeightsError

        path = Path(path)
        if not path.exists():
            raise EngineError(f"{path}: no such model file")
        if path.is_dir():
            raise EngineError(f"{path} is a directory, not a GGUF model file")
        try:
            model = Model.load(path, quant_sim=quant_sim, device=device)
            tokenizer = Tokenizer.from_gguf(path)
        except (GGUFError, ConfigError, WeightsError, DeviceError) as err:
            raise EngineError(str(err)) from None
        except (ValueError, KeyError) as err:
            raise EngineError(f"{path}: not a usable DeepSeek V4 GGUF ({err})") from None
        except OSError as err:
            raise EngineError(f"{path}: cannot read it ({err.strerror or err})") from None
        return cls(model, tokenizer, **options)

    def close(self) -> None:
        """Save the live sessions to the disk cache, if there is one (a clean shutdown)."""
        self.sessions.close()

    def new_session(self) -> LiveSession:
        """A session outside the pool, for a caller that keeps its own conversation (the CLI chat)."""
        return LiveSession(self.model)

    def prompt(self, source: Conversation | str | Sequence[int]) -> Prompt:
        """A conversation (rendered), raw prompt text, or token ids, as the engine sees it.

        This is the one place chat prompts are tokenized: special tokens are recognised only in
        the template's markup, so no message text can inject one. Raw text is tokenized as
        written, special tokens included.
        """
        if isinstance(source, Conversation):
            parts = render_parts(source, replay=self.sessions.replay())
            text = "".join(text for text, _ in parts)
            return Prompt(
                text=text,
                tokens_after=lambda offset: self.tokenizer.encode_parts(_parts_after(parts, offset)),
                turn_end=True,
                branches_at_think=source.drops_reasoning,
                anchor=_anchor(text),
                tokens_before=lambda offset: self.tokenizer.encode_parts(_parts_before(parts, offset)),
            )
        if not isinstance(source, str):
            tokens = [int(t) for t in source]
            bad = [t for t in tokens if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise EngineError(f"token ids out of range [0, {self.model.config.vocab_size}): {bad[:5]}")
            return Prompt(text=None, tokens=tokens)
        return Prompt(text=source, tokens_after=lambda offset: self.tokenizer.encode(source[offset:]))

    def generate(
        self,
        prompt: Conversation | str | Sequence[int] | Prompt,
        sampling: SamplingParams | None = None,
        *,
        session: LiveSession | None = None,
        sampler: Sampler | None = None,
    ) -> Generation:
        """Plan the answer to ``prompt``; iterate the result to run it.

        The session is ``session`` if given, else the pool's best match. ``sampler`` replaces
        the one ``sampling`` would make (tests script the model's choices with it). A
        conversation's ``forced_tool_call`` is binding: when the answer proper begins (after
        ``</think>``, or at once in chat mode) the engine writes the opening of the tool-calls
        block (and of the named call) as sampled tokens, then sampling goes on. Raises
        ``ContextLengthError`` (before touching any state) when the prompt leaves no room for
        an answer. Usage counts are known at once: ``prompt_tokens`` and ``reused_tokens``.
        """
        forced = self._forced_tool_call(prompt) if isinstance(prompt, Conversation) else []
        request = prompt if isinstance(prompt, Prompt) else self.prompt(prompt)
        if session is None:
            session, plan = self.sessions.acquire(request)
        else:
            plan = session.plan(request)
        if not plan.tokens:
            raise EngineError("the prompt is empty")
        if len(plan.tokens) >= self.ctx:
            raise ContextLengthError(len(plan.tokens), self.ctx)
        sampler = sampler or Sampler(sampling or SamplingParams())
        return Generation(self, session, plan, request, sampler, forced)

    def _forced_tool_call(self, conversation: Conversation) -> list[int]:
        """The tokens that open the call ``conversation.forced_tool_call`` asks for ([]: none),
        tokenized as the model writes them (the DSML markers are special tokens)."""
        choice = conversation.forced_tool_call
        names = [tool["function"]["name"] for tool in conversation.tools]
        if choice is False or not names:
            return []
        if choice is not True and choice not in names:
            raise EngineError(f"the forced tool call names {choice!r}, which is not among the tools")
        return self.tokenizer.encode_parts(tool_calls_opening(None if choice is True else choice))


def _anchor(text: str) -> int | None:
    """Where the shared part of a conversation's prompt ends: before its last user turn ahead of
    the first answer (the system prompt and tools, which other conversations often share)."""
    first_answer = text.find(ASSISTANT)
    user = text.rfind(USER, 0, first_answer) if first_answer > 0 else -1
    return user if user > 0 else None


def _part(parser: OutputParser) -> Literal["reasoning", "content", "markup"]:
    """Where the parser is: in the reasoning, the answer's content, or markup (DSML, a think tag)."""
    return "reasoning" if parser.in_reasoning else "content" if parser.in_answer_text else "markup"


def _parts_before(parts: list[Part], offset: int) -> list[Part]:
    """The rendered parts up to character ``offset``."""
    out = []
    for text, is_markup in parts:
        if offset <= 0:
            break
        out.append((text[:offset], is_markup))
        offset -= len(text)
    return out


def _parts_after(parts: list[Part], offset: int) -> list[Part]:
    """The rendered parts from character ``offset`` on (the text a session does not hold yet)."""
    out = []
    for text, is_markup in parts:
        if offset < len(text):
            out.append((text[offset:], is_markup))
        offset = max(0, offset - len(text))
    return out


class Generation:
    """One answer being produced: iterate it (once) for its events; ``cancel()`` from anywhere."""

    def __init__(
        self,
        engine: Engine,
        session: LiveSession,
        plan: Plan,
        prompt: Prompt,
        sampler: Sampler,
        forced_tool_call: Sequence[int] = (),
    ) -> None:
        self.engine = engine
        self.prompt = prompt
        self.session = session
        self.plan = plan
        self.text = prompt.text
        self.sampler = sampler
        self.sampling = sampler.params
        self.forced_tool_call = list(forced_tool_call)  # written when the answer proper begins
        self.prompt_tokens = len(plan.tokens)
        self.reused_tokens = plan.reused
        self.finished: Finished | None = None
        self._cancel = threading.Event()
        self._started = False

    def cancel(self) -> None:
        """Stop before the next prefill chunk or token; the answer ends with reason ``cancelled``."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[Event]:
        if self._started:
            raise RuntimeError("a Generation runs once")
        self._started = True
        return self._run()

    def _forward(self, tokens: list[int]) -> torch.Tensor:
        """Advance the session by ``tokens``; a failure mid-pass rolls it back (half-written state)."""
        session = self.session
        try:
            logits = self.engine.model.forward(
                torch.tensor(tokens, dtype=torch.long, device=self.engine.device),
                session.state,
                all_logits=False,
            )[0]
        except BaseException:
            session.rollback()
            raise
        session.tokens.extend(tokens)
        session.logits = logits
        return logits

    def _run(self) -> Iterator[Event]:
        start = time.perf_counter()
        if not (yield from self._prefill()):
            yield self._finish("cancelled", [], "", None, start, prefilled=time.perf_counter())
            return
        yield from self._decode(start, prefilled=time.perf_counter())

    def _prefill(self) -> Generator[Event, None, bool]:
        """Bring the session to the prompt, chunk by chunk; False when cancelled on the way.

        The checkpoint is taken at the end of the prompt, or just before it when it ends with
        ``<think>`` and old reasoning is dropped (``Prompt.branches_at_think``): the next turn's
        rendering drops this turn's reasoning and writes ``</think>`` there instead, so that is
        where its prompt leaves this one.
        """
        session, plan, chunk = self.session, self.plan, self.engine.prefill_chunk
        pool = self.engine.sessions
        if plan.source == "checkpoint":
            session.restore_checkpoint()
        elif plan.source == "empty":
            session.reset()
        n, reused = len(plan.tokens), plan.reused
        think = self.engine.tokenizer.special_ids[THINK_OPEN]
        ends_in_think = self.prompt.branches_at_think and plan.tokens[-1] == think
        pooled = session in pool.sessions
        store = pool.prompt_store_point(n, reused, self.prompt.turn_end) if pooled else None
        # The anchor is looked for (the prompt's start tokenized) only when the text held stops short of it.
        held = session.text
        short = held is None or len(held) < (self.prompt.anchor or 0)
        anchor = self._anchor_tokens() if pooled and reused < n and short else None
        if reused < n:
            session.text = None  # a partial prompt: its text is not tracked
        if ends_in_think and reused == n - 1:
            self._keep_checkpoint(branch=True)
        # Where the prefill stops: chunk ends, the checkpoint, the saved prefix, each save interval.
        stops = {*range(reused + chunk, n, chunk), n, *pool.save_points(reused, n)}
        stops |= {n - 1} if ends_in_think else set()
        stops |= set() if store is None else {store}
        stops |= set() if anchor is None else {anchor}
        done = reused
        for end in sorted(stop for stop in stops if stop > reused):
            if self.cancelled:
                return False
            self._forward(plan.tokens[done:end])
            done = end
            if end == store:
                pool.save_prefix(session, self._text_of(plan.tokens[:end]))
            if end == anchor:
                assert self.text is not None and self.prompt.anchor is not None
                pool.keep_anchor(session, self.text[: self.prompt.anchor])
            if ends_in_think and end == n - 1:
                self._keep_checkpoint(branch=True)
            elif end < n and pooled:
                pool.frontier(session, "prefill", lambda end=end: self._text_of(plan.tokens[:end]))
            yield PrefillProgress(end - reused, n - reused)
        session.text = self.text
        if not ends_in_think:
            self._keep_checkpoint(branch=False)
        if pooled:
            pool.prompt_read(session, n - reused, prefix_saved=store is not None)
        return True

    def _anchor_tokens(self) -> int | None:
        """How many of the prompt's tokens its anchor holds (``Prompt.anchor``), when they are
        worth keeping: beyond what the session held, at least ``kv_min_tokens``."""
        prompt, pool = self.prompt, self.engine.sessions
        if prompt.anchor is None or prompt.tokens_before is None:
            return None
        count = len(prompt.tokens_before(prompt.anchor))
        if not self.plan.reused < count < len(self.plan.tokens) or count < pool.min_tokens:
            return None
        return count

    def _text_of(self, tokens: list[int]) -> str | None:
        """The text of a prefix of the prompt's tokens, when the prompt's text begins with it."""
        try:
            text = b"".join(self.engine.tokenizer.token_bytes(t) for t in tokens).decode("utf-8")
        except UnicodeDecodeError:
            return None
        return text if self.text is not None and self.text.startswith(text) else None

    def _keep_checkpoint(self, branch: bool) -> None:
        """Checkpoint the session where it is, unless the checkpoint is there already.

        ``branch``: the prompt's last token, ``<think>``, is not held yet.
        """
        session = self.session
        if branch:
            text = self.text
            session.text = text[: -len(THINK_OPEN)] if text and text.endswith(THINK_OPEN) else None
        if session.logits is None:
            return
        if session.checkpoint is None or session.checkpoint.tokens != session.tokens:
            session.save_checkpoint(branch)
        else:
            session.branches_at_checkpoint = branch

    def _decode(self, start: float, prefilled: float) -> Iterator[Event]:
        """Sample until EOS, a stop string, a closed tool-calls block, the budget or a cancel.

        The last sampled token is fed only if another one follows, and EOS never: the next
        prompt brings them, so it extends the session exactly. A forced tool call's tokens take
        the place of samples once the parser is in the answer's text; they run through the
        detokenizer, parser and session like sampled ones.
        """
        session, plan, params = self.session, self.plan, self.sampling
        tokenizer = self.engine.tokenizer
        logits = session.logits
        assert logits is not None
        parser = OutputParser(thinking=(self.text or tokenizer.decode(plan.tokens[-1:])).endswith(THINK_OPEN))
        decoder = StreamDecoder(tokenizer)
        stops = StopMatcher(params.stop)
        room = self.engine.ctx - len(plan.tokens)
        budget = room if params.max_tokens is None else min(room, params.max_tokens)
        sampled: list[int] = []
        pieces: list[str] = []
        reason: FinishReason = "length"
        to_force, forcing = list(self.forced_tool_call), []
        while len(sampled) < budget:
            if self.cancelled:
                reason = "cancelled"
                break
            if to_force and parser.in_answer_text:
                to_force, forcing = [], to_force
            if forcing:
                token = forcing.pop(0)
            else:
                token = self.sampler.sample(logits, greedy=params.greedy_dsml and parser.in_structure)
            sampled.append(token)
            if token == tokenizer.eos_id:
                reason = "stop"
                break
            piece = decoder.push(token)
            pieces.append(piece)
            before = _part(parser)
            events = parser.feed(stops.push(piece))
            after = _part(parser)
            part = before if before == after else "markup"
            yield TokenSampled(token, piece, part, *self._logprobs(logits, token))
            yield from events
            if stops.stopped or parser.tool_calls_closed:
                reason = "stop" if stops.stopped else "tool_calls"
                break
            if len(sampled) < budget:
                logits = self._forward([token])
                if session in self.engine.sessions.sessions:
                    self.engine.sessions.frontier(session, "generation", lambda: self._held_text(sampled))
        pieces.append(decoder.flush())
        yield from parser.feed(stops.push(pieces[-1]) + stops.flush())
        *events, done = parser.finish()
        yield from events
        assert isinstance(done, Done)
        session.text = self._held_text(sampled[: len(session.tokens) - len(plan.tokens)])
        yield self._finish(reason, sampled, "".join(pieces), done.message, start, prefilled)

    def _logprobs(
        self, logits: torch.Tensor, token: int
    ) -> tuple[TokenLogprob | None, tuple[TokenLogprob, ...]]:
        """The sampled token's log-probability and the likeliest alternatives', when asked for."""
        if self.sampling.logprobs is None:
            return None, ()
        chosen, top = token_logprobs(logits, token, self.sampling.logprobs)
        tokenizer = self.engine.tokenizer

        def entry(token_id: int, logprob: float) -> TokenLogprob:
            text, raw = tokenizer.decode([token_id]), tokenizer.token_bytes(token_id)
            return TokenLogprob(token_id, text, raw, logprob)

        return entry(token, chosen), tuple(entry(token_id, logprob) for token_id, logprob in top)

    def _held_text(self, fed: list[int]) -> str | None:
        """The session's text after generation: the prompt's plus the fed tokens', when whole UTF-8."""
        if self.text is None:
            return None
        data = b"".join(self.engine.tokenizer.token_bytes(t) for t in fed)
        try:
            return self.text + data.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _remember_tool_calls(self, text: str, calls: list[dict]) -> None:
        """Map each call's id to the ``invoke`` text the model wrote for it (when they pair up)."""
        block = text.find(TOOL_CALLS_OPEN)
        invokes = _INVOKE.findall(text[block:]) if block >= 0 else []
        if len(invokes) == len(calls):
            written = {call["id"]: invoke for call, invoke in zip(calls, invokes, strict=True)}
            self.engine.sessions.remember_tool_calls(self.session, written)

    def _finish(
        self,
        reason: FinishReason,
        sampled: list[int],
        text: str,
        message: dict | None,
        start: float,
        prefilled: float,
    ) -> Finished:
        end = time.perf_counter()
        if message is None:
            message = {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": []}
        elif reason == "stop" and message["tool_calls"]:
            reason = "tool_calls"
        if message["tool_calls"]:
            self._remember_tool_calls(text, message["tool_calls"])
        usage = Usage(
            prompt_tokens=len(self.plan.tokens),
            reused_tokens=self.plan.reused,
            generated_tokens=len(sampled),
            prefill_seconds=prefilled - start,
            decode_seconds=end - prefilled,
        )
        self.finished = Finished(reason, usage, message, text)
        return self.finished
