"""The inference worker in-process: it never waits for a reader, runs jobs in arrival order, skips
a job cancelled while queued and stops a running one at its next token."""

from __future__ import annotations

import asyncio

import pytest

from dwarfstar.chat.conversation import Conversation
from dwarfstar.engine import Engine
from dwarfstar.engine.events import ContentDelta, Finished
from dwarfstar.engine.sampling import ScriptedSampler
from dwarfstar.server.worker import END, Job, Started, Worker


@pytest.fixture(scope="module")
def engine(server_model):
    return Engine.open(server_model)


def job(engine: Engine, loop, words: int) -> Job:
    tokenizer = engine.tokenizer
    script = tokenizer.encode(" ".join(f"w{k}" for k in range(words)))
    conversation = Conversation([{"role": "user", "content": f"{words} words"}], thinking_mode="chat")
    return Job(lambda e: e.generate(conversation, sampler=ScriptedSampler(script, tokenizer.eos_id)), loop)


async def drain(job: Job) -> list:
    items = []
    while (item := await job.items.get()) is not END:
        items.append(item)
    return items


def test_an_unread_answer_never_holds_up_the_next(engine):
    async def scenario() -> tuple[int, list, list]:
        loop = asyncio.get_running_loop()
        worker = Worker(engine)
        unread, queued_then_cancelled, second = (
            job(engine, loop, 40),
            job(engine, loop, 5),
            job(engine, loop, 5),
        )
        for each in (unread, queued_then_cancelled, second):
            worker.submit(each)
        queued_then_cancelled.cancel()
        second_items = await asyncio.wait_for(drain(second), timeout=120)
        waiting = unread.items.qsize()  # the whole first answer, never read, waits in its own queue
        skipped = await drain(queued_then_cancelled)
        worker.close()
        return waiting, second_items, skipped

    waiting, second_items, skipped = asyncio.run(scenario())
    assert isinstance(second_items[0], Started) and isinstance(second_items[-1], Finished)
    assert second_items[-1].reason == "stop"
    assert waiting > 40  # Started, the events of 40 words, Finished and END
    assert skipped == []  # cancelled before it started: nothing ran


def test_cancel_stops_a_running_answer_at_the_next_token(engine):
    async def scenario() -> list:
        loop = asyncio.get_running_loop()
        worker = Worker(engine)
        running = job(engine, loop, 200)
        worker.submit(running)
        items = []
        while (item := await running.items.get()) is not END:
            items.append(item)
            if isinstance(item, ContentDelta) and len([i for i in items if isinstance(i, ContentDelta)]) == 2:
                running.cancel()
        worker.close()
        return items

    items = asyncio.run(scenario())
    finished = items[-1]
    assert isinstance(finished, Finished) and finished.reason == "cancelled"
    assert finished.usage.generated_tokens < 20
