"""Sixteen concurrent streaming clients, some leaving mid-answer; keep-alive comments during a long
prefill; the trace file. Against a live ``ds4 serve`` with a short keep-alive interval."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from conftest import sse_events
from test_openai_api import CALL

from dwarfstar.tokenizer import Tokenizer

CLIENTS = 16
LEAVING = {3, 7, 11, 15}


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return tmp_path_factory.mktemp("trace") / "trace.jsonl"


@pytest.fixture(scope="module")
def server(serve, trace):
    return serve("--keepalive", "0.3", "--trace", str(trace))


def answer(i: int) -> str:
    return " ".join(f"w{i}x{k}" for k in range(8))


def metrics(server) -> dict[str, float]:
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in lines if line and not line.startswith("#")}


def test_sixteen_streams_in_arrival_order_and_disconnects_cancel(server):
    before = metrics(server)
    results: dict[int, dict] = {}

    def client(i: int) -> None:
        body = {
            "model": "deepseek-chat",
            "stream": True,
            "messages": [{"role": "user", "content": f"Client {i}"}],
        }
        with httpx.stream(
            "POST",
            server.url + "/v1/chat/completions",
            json=body,
            headers=server.script(answer(i)),
            timeout=120,
        ) as response:
            if i in LEAVING:
                for line in response.iter_lines():
                    if '"content":"w' in line:
                        break  # leave after the first word: the connection closes here
                results[i] = {"left": True}
                return
            raw = response.read()
        chunks = [json.loads(data) for _, data in sse_events(raw)[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        results[i] = {"text": text, "expected": answer(i), "done": time.monotonic()}

    threads = []
    for i in range(CLIENTS):
        threads.append(threading.Thread(target=client, args=(i,)))
        threads[-1].start()
        time.sleep(0.1)  # a clear arrival order
    for thread in threads:
        thread.join(timeout=180)
    assert len(results) == CLIENTS
    stayed = sorted(i for i in results if i not in LEAVING)
    assert all(results[i]["text"] == results[i]["expected"] for i in stayed)
    finish_times = [results[i]["done"] for i in stayed]
    assert finish_times == sorted(finish_times)  # answered in the order they arrived

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = metrics(server)
        done = after["ds4_generations_total"] - before.get("ds4_generations_total", 0)
        if done == CLIENTS and after["ds4_busy"] == 0 and after["ds4_queue_length"] == 0:
            break
        time.sleep(0.1)
    assert (after["ds4_busy"], after["ds4_queue_length"]) == (0, 0)
    cancelled = after["ds4_generations_cancelled_total"] - before.get("ds4_generations_cancelled_total", 0)
    assert cancelled == len(LEAVING)
    # Cancelled at the next token: each leaver wrote little more than its first word.
    tokenizer = Tokenizer.default()
    lengths = {i: len(tokenizer.encode(answer(i))) + 1 for i in range(CLIENTS)}
    generated = after["ds4_generated_tokens_total"] - before.get("ds4_generated_tokens_total", 0)
    left_early = sum(lengths[i] - len(tokenizer.encode(answer(i).split()[0])) - 3 for i in LEAVING)
    assert sum(lengths.values()) - generated >= left_early


def test_keepalive_comments_during_a_long_prefill(server):
    body = {
        "model": "deepseek-chat",
        "stream": True,
        "messages": [{"role": "user", "content": "many words " * 1500}],
    }
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers=server.script("ok"), timeout=120
    ) as response:
        raw = response.read()
    first_content = raw.index(b'"content":"ok"')
    assert b": keep-alive\n\n" in raw[:first_content]
    assert json.loads(sse_events(raw)[-2][1])["choices"][0]["finish_reason"] == "stop"


def test_the_trace_has_one_record_per_answer(server, trace):
    body = {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "Trace me"}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
    }
    response = httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.script(CALL))
    call = response.json()["choices"][0]["message"]["tool_calls"][0]
    record = json.loads(trace.read_text().splitlines()[-1])
    assert record["api"] == "chat.completions" and record["request"] == body
    assert record["prompt"].endswith("Trace me<｜Assistant｜></think>")
    assert record["generated_text"] == CALL and record["tool_calls"] == [call]
    assert record["reuse"]["source"] in ("empty", "live", "checkpoint")
    assert record["prompt_tokens"] == response.json()["usage"]["prompt_tokens"]
    assert record["prefill_seconds"] >= 0 and record["decode_seconds"] > 0
    assert len(trace.read_text().splitlines()) >= CLIENTS + 2  # every answer, cancelled ones too


def test_a_client_that_gives_up_on_a_plain_request_cancels_it(server):
    before = metrics(server)
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Write a lot"}]}
    long_answer = " ".join(f"word{k}" for k in range(400))  # about a thousand tokens: many seconds
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/chat/completions", json=body, headers=server.script(long_answer), timeout=1.0
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = metrics(server)
        if after["ds4_generations_cancelled_total"] > before["ds4_generations_cancelled_total"]:
            break
        time.sleep(0.1)
    assert after["ds4_generations_cancelled_total"] == before["ds4_generations_cancelled_total"] + 1
    generated = after["ds4_generated_tokens_total"] - before["ds4_generated_tokens_total"]
    assert generated < len(Tokenizer.default().encode(long_answer)) / 2
