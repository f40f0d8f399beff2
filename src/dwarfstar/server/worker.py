"""The one inference thread: it owns the engine and runs queued requests in arrival order.

A request handler (on the event loop) submits a ``Job``: a function that plans the engine's
``Generation`` on the worker thread (where the session pool is touched) plus the job's own
event queue. The worker runs the generation and hands each event to the loop without
waiting, so a slow reader never stalls it: events wait in the job's unbounded queue. A job
cancelled before it starts is skipped; one cancelled while running stops at its next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dwarfstar.engine import Engine, EngineError, Generation
from dwarfstar.engine.events import Event, Finished

log = logging.getLogger("dwarfstar.server")


@dataclass(frozen=True)
class Started:
    """The first item of a job's queue when planning worked: usage is known from here on."""

    generation: Generation


@dataclass(frozen=True)
class Failed:
    """Planning or running failed; ``error`` is what the client is told (an ``EngineError`` is theirs)."""

    error: Exception


END = None  # the last item of every job's queue


@dataclass(eq=False)
class Job:
    plan: Callable[[Engine], Generation]
    loop: asyncio.AbstractEventLoop
    trace: dict[str, Any] = field(default_factory=dict)
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    generation: Generation | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Thread-safe: skip the job if it has not started, else stop it at its next token."""
        self._cancelled.set()
        if self.generation is not None:
            self.generation.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def put(self, item: Started | Failed | Event | None) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)


@dataclass
class Totals:
    """Counters for ``/metrics``, written by the worker thread only."""

    requests: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cancelled: int = 0
    failed: int = 0


class Worker:
    """The inference thread and its queue; ``submit`` from the event loop, ``close`` to stop."""

    def __init__(self, engine: Engine, trace: Path | None = None) -> None:
        self.engine = engine
        self.totals = Totals()
        self.busy = False
        self._current: Job | None = None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._trace: TextIO | None = trace.open("a", encoding="utf-8", buffering=1) if trace else None
        self._thread = threading.Thread(target=self._run, name="ds4-inference", daemon=True)
        self._thread.start()

    @property
    def queue_length(self) -> int:
        """Jobs waiting, the running one excluded."""
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def close(self) -> None:
        """Stop: the running answer at its next token, the queued ones before they start."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.put(END)
        if self._current is not None:
            self._current.cancel()
        self._queue.put(None)
        self._thread.join(timeout=30)
        if self._trace is not None:
            self._trace.close()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled:
                job.put(END)
                continue
            self.busy, self._current = True, job
            try:
                self._serve(job)
            finally:
                self.busy, self._current = False, None
                job.generation = None
                job.put(END)

    def _serve(self, job: Job) -> None:
        started = time.time()
        try:
            generation = job.plan(self.engine)
        except EngineError as err:  # the request's fault: context exceeded, empty prompt
            job.put(Failed(err))
            return
        except Exception as err:
            log.exception("planning a request failed")
            job.put(Failed(err))
            return
        job.generation = generation
        if job.cancelled:
            generation.cancel()
        job.put(Started(generation))
        try:
            for event in generation:
                job.put(event)
        except Exception as err:
            log.exception("generation failed")
            self.totals.failed += 1
            job.put(Failed(err))
            return
        finished = generation.finished
        assert finished is not None
        self._count(finished)
        if self._trace is not None:
            self._write_trace(job, generation, finished, started)

    def _count(self, finished: Finished) -> None:
        totals, usage = self.totals, finished.usage
        totals.requests += 1
        totals.prompt_tokens += usage.prompt_tokens
        totals.reused_tokens += usage.reused_tokens
        totals.generated_tokens += usage.generated_tokens
        totals.prefill_seconds += usage.prefill_seconds
        totals.decode_seconds += usage.decode_seconds
        totals.cancelled += finished.reason == "cancelled"

    def _write_trace(self, job: Job, generation: Generation, finished: Finished, started: float) -> None:
        usage = finished.usage
        record = {
            **job.trace,
            "time": started,
            "prompt": generation.text,
            "prompt_tokens": usage.prompt_tokens,
            "reuse": {"source": generation.plan.source, "reused_tokens": usage.reused_tokens},
            "generated_text": finished.text,
            "finish_reason": finished.reason,
            "message": finished.message,
            "tool_calls": finished.message.get("tool_calls", []),
            "generated_tokens": usage.generated_tokens,
            "prefill_seconds": round(usage.prefill_seconds, 6),
            "decode_seconds": round(usage.decode_seconds, 6),
        }
        assert self._trace is not None
        self._trace.write(json.dumps(record, ensure_ascii=False) + "\n")
