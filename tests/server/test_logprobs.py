"""``logprobs`` on ``/v1/chat/completions`` and ``/v1/completions`` of a live ``ds4 serve``: the shapes
OpenAI gives, and figures equal to a log-softmax over this process's own forward passes (to 1e-5:
the server runs one thread, this process may not, so the last bits of a sum may differ)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from conftest import sse_events

from dwarfstar.chat.render import render_message_parts
from dwarfstar.chat.tokens import (
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_OPEN,
)
from dwarfstar.model.model import Model
from dwarfstar.tokenizer import Tokenizer

PROMPT_IDS = [0, 17, 923, 4, 55, 6, 7]
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(serve):
    return serve()


@pytest.fixture(scope="module")
def model(server_model):
    return Model.load(server_model)


@pytest.fixture(scope="module")
def tokenizer(server_model):
    return Tokenizer.from_gguf(server_model)


def post(server, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


def greedy_steps(model: Model, prompt: list[int], n: int) -> list[tuple[int, torch.Tensor]]:
    """``n`` greedy tokens after ``prompt``, each with the log-softmax of the raw logits it was
    chosen from: the prompt read in one pass, then one token at a time, as a server decodes."""
    session = model.new_session()
    logits = model.prefill(torch.tensor(prompt), session)[-1]
    steps = []
    for _ in range(n):
        token = int(logits.argmax())
        steps.append((token, torch.log_softmax(logits.float(), dim=-1)))
        logits = model.forward(torch.tensor([token]), session, all_logits=False)[0]
    return steps


def test_completion_logprobs_are_the_models(server, model, tokenizer):
    body = {"prompt": PROMPT_IDS, "max_tokens": 4, "temperature": 0, "logprobs": 5}
    answer = post(server, "/v1/completions", body).json()
    choice = answer["choices"][0]
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    steps = greedy_steps(model, PROMPT_IDS, 4)
    assert len(logprobs["tokens"]) == answer["usage"]["completion_tokens"] == 4
    tokens = [token for token, _ in steps]
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in tokens]
    assert logprobs["text_offset"] == [len(tokenizer.decode(tokens[:i])) for i in range(4)]
    for (token, expected), logprob, top in zip(
        steps, logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert logprob == pytest.approx(float(expected[token]), abs=1e-5)
        assert len(top) == 5
        ids = expected.topk(5).indices.tolist()
        assert list(top) == [tokenizer.decode([t]) for t in ids]
        assert list(top.values()) == pytest.approx(expected[ids].tolist(), abs=1e-5)
        # greedy: the chosen token is the likeliest
        assert token == ids[0] and logprob == max(top.values())


def test_streamed_completion_logprobs_add_up_to_the_whole(server):
    body = {"prompt": PROMPT_IDS, "max_tokens": 4, "temperature": 0, "logprobs": 2}
    whole = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    raw = post(server, "/v1/completions", {**body, "stream": True}).content
    chunks = [json.loads(data)["choices"] for _, data in sse_events(raw) if data != "[DONE]"]
    parts = [choice[0]["logprobs"] for choice in chunks if choice and choice[0]["text"]]
    joined = {key: [value for part in parts for value in part[key]] for key in whole}
    assert joined == whole
    assert chunks[-1][0]["finish_reason"] and chunks[-1][0]["logprobs"] is None


def test_chat_logprobs_are_the_models_and_stream_alike(server, model, tokenizer):
    body = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 4, "temperature": 0}
    body |= {"logprobs": True, "top_logprobs": 3}
    answer = post(server, "/v1/chat/completions", body).json()
    content = answer["choices"][0]["logprobs"]["content"]
    assert answer["choices"][0]["logprobs"]["refusal"] is None
    assert len(content) == answer["usage"]["completion_tokens"] == 4
    text = b"".join(bytes(entry["bytes"]) for entry in content).decode(errors="replace")
    assert text == answer["choices"][0]["message"]["content"]
    prompt = tokenizer.encode_parts(render_message_parts(HELLO, thinking_mode="chat"))
    assert answer["usage"]["prompt_tokens"] == len(prompt)
    for entry, (token, expected) in zip(content, greedy_steps(model, prompt, 4), strict=True):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["token"] == tokenizer.decode([token])
        assert entry["logprob"] == pytest.approx(float(expected[token]), abs=1e-5)
        top = entry["top_logprobs"]
        assert [alt["token"] for alt in top] == [tokenizer.decode([t]) for t in expected.topk(3).indices]
        assert all(set(alt) == {"token", "logprob", "bytes"} for alt in top)
        assert top[0]["token"] == entry["token"] and top[0]["logprob"] == entry["logprob"]

    raw = post(server, "/v1/chat/completions", {**body, "stream": True}).content
    choices = [json.loads(data)["choices"][0] for _, data in sse_events(raw) if data != "[DONE]"]
    streamed = [entry for choice in choices if choice["logprobs"] for entry in choice["logprobs"]["content"]]
    assert streamed == content
    # a chunk of content lists the tokens sampled since the last one (a character split
    # across tokens shows when whole); the other chunks have none
    assert all(bool(choice["logprobs"]) == bool(choice["delta"].get("content")) for choice in choices)


def test_only_the_contents_tokens_are_reported(server, tokenizer):
    """Reasoning, ``</think>`` and a tool call's DSML are not content."""
    call = (
        f'\n\n{TOOL_CALLS_OPEN}\n{INVOKE_OPEN} name="weather">\n{PARAMETER_OPEN} name="city" string="true">'
        f"Paris{PARAMETER_CLOSE}\n{INVOKE_CLOSE}\n{TOOL_CALLS_CLOSE}"
    )
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    body = {"model": "deepseek-reasoner", "messages": HELLO, "tools": tools, "logprobs": True}
    for stream in (False, True):
        raw = post(
            server, "/v1/chat/completions", {**body, "stream": stream},
            headers=server.script("Let me look.</think>Checking the weather." + call),
        ).content  # fmt: skip
        if stream:
            choices = [json.loads(data)["choices"] for _, data in sse_events(raw) if data != "[DONE]"]
            content = [e for c in choices if c and c[0]["logprobs"] for e in c[0]["logprobs"]["content"]]
        else:
            content = json.loads(raw)["choices"][0]["logprobs"]["content"]
        # each token that holds content text, whole (the last one holds the blank line too)
        assert [entry["token"] for entry in content] == ["Checking", " the", " weather", ".\n\n"]
        assert all(entry["top_logprobs"] == [] for entry in content)  # top_logprobs 0 by default
        assert all(entry["logprob"] <= 0 for entry in content)


def test_without_logprobs_there_are_none(server):
    body = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 2}
    assert post(server, "/v1/chat/completions", body).json()["choices"][0]["logprobs"] is None
    body = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 2, "logprobs": False}
    assert post(server, "/v1/chat/completions", body).json()["choices"][0]["logprobs"] is None
    answer = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}).json()
    assert answer["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
    ],
)
def test_bad_logprobs_fields_are_400_naming_the_field(server, path, fields, param):
    body = {"messages": HELLO} if path == "/v1/chat/completions" else {"prompt": "Hi"}
    response = post(server, path, {**body, "max_tokens": 1, **fields})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param)
    assert set(error) == {"message", "type", "param", "code"}
