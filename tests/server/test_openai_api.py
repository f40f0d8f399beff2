"""``/v1/chat/completions`` and ``/v1/completions`` through the official ``openai`` SDK and byte by
byte, against a live ``ds4 serve`` whose sampler is scripted (everything after it runs for real)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import sse_events

from dwarfstar.chat.tokens import (
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_OPEN,
)
from dwarfstar.tokenizer import Tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOKENIZER = Tokenizer.default()
CALL = (  # a call to weather(city="Paris"), exactly as the model writes it
    f'\n\n{TOOL_CALLS_OPEN}\n{INVOKE_OPEN} name="weather">\n{PARAMETER_OPEN} name="city" string="true">Paris'
    f"{PARAMETER_CLOSE}\n{INVOKE_CLOSE}\n{TOOL_CALLS_CLOSE}"
)


@pytest.fixture(scope="module")
def server(serve):
    return serve()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_plain_answer_with_thinking(client, server):
    answer = client.chat.completions.create(
        model="deepseek-v4-flash",
        messages=user("Hi"),
        extra_headers=server.script("The user greets me.</think>Hello!"),
    )
    message = answer.choices[0].message
    assert message.content == "Hello!"
    assert message.model_extra["reasoning_content"] == "The user greets me."
    assert answer.choices[0].finish_reason == "stop"
    # Every scripted token, and the end of sentence.
    assert answer.usage.completion_tokens == len(TOKENIZER.encode("The user greets me.</think>Hello!")) + 1


def test_thinking_off_writes_no_reasoning(client, server):
    answer = client.chat.completions.create(
        model="deepseek-chat", messages=user("Hi"), extra_headers=server.script("Hello!"), temperature=0
    )
    assert answer.choices[0].message.content == "Hello!"
    assert answer.choices[0].message.model_extra.get("reasoning_content") is None


def test_streamed_answer_reasoning_never_in_content(client, server):
    stream = client.chat.completions.create(
        model="deepseek-v4-flash",
        messages=user("Hi"),
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=server.script("Hmm.</think>Hello there!"),
    )
    chunks = list(stream)
    reasoning = "".join(
        c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == ("Hmm.", "Hello there!")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_tool_round_trip_reuses_the_prefix(client, server):
    messages = [{"role": "system", "content": "Use tools."}, *user("Weather in Paris?")]
    first = client.chat.completions.create(
        model="deepseek-chat", messages=messages, tools=[WEATHER], extra_headers=server.script(CALL)
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("weather", {"city": "Paris"})
    assert call.id.startswith("call_")

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
    ]
    second = client.chat.completions.create(
        model="deepseek-chat", messages=messages, tools=[WEATHER], extra_headers=server.script("It is 18C.")
    )
    assert second.choices[0].message.content == "It is 18C."
    # The whole first prompt and the call are reused: only the tool result is prefilled.
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert cached < second.usage.prompt_tokens


def test_streamed_tool_call_name_first_then_arguments(client, server):
    stream = client.chat.completions.create(
        model="deepseek-chat",
        messages=user("Weather?"),
        tools=[WEATHER],
        stream=True,
        extra_headers=server.script(CALL),
    )
    calls = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
    first = calls[0][0]
    assert (
        first.id.startswith("call_") and first.function.name == "weather" and first.function.arguments == ""
    )
    arguments = "".join(delta[0].function.arguments or "" for delta in calls[1:])
    assert json.loads(arguments) == {"city": "Paris"}


TIME = {"type": "function", "function": {"name": "time", "parameters": {"type": "object"}}}
OPENING = f"\n\n{TOOL_CALLS_OPEN}\n"
AFTER_NAME = CALL.split('name="weather">\n', 1)[1]  # the call after its name: what a named choice leaves


def test_tool_choice_required_and_named_are_binding(client, server):
    tools = [WEATHER, TIME]
    # The script leaves out the block's opening: with tool_choice auto that is no call at all.
    free = client.chat.completions.create(
        model="deepseek-chat",
        messages=user("Weather?"),
        tools=tools,
        tool_choice="auto",
        extra_headers=server.script(CALL.removeprefix(OPENING)),
    )
    assert free.choices[0].finish_reason == "stop" and not free.choices[0].message.tool_calls
    required = client.chat.completions.create(
        model="deepseek-chat",
        messages=user("Weather?"),
        tools=tools,
        tool_choice="required",
        extra_headers=server.script(CALL.removeprefix(OPENING)),
    )
    assert required.choices[0].finish_reason == "tool_calls"
    (call,) = required.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("weather", {"city": "Paris"})
    # Named, thinking on, streamed: the model reasons, then the call of that function opens.
    stream = client.chat.completions.create(
        model="deepseek-v4-flash",
        messages=user("Weather?"),
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "weather"}},
        stream=True,
        extra_headers=server.script("Look it up.</think>" + AFTER_NAME),
    )
    chunks = [c for c in stream if c.choices]
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks)
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert reasoning == "Look it up." and calls[0].function.name == "weather"
    assert json.loads("".join(call.function.arguments or "" for call in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_trailing_assistant_message_is_continued(client, server):
    answer = client.chat.completions.create(
        model="deepseek-chat",
        messages=[*user("Count to 3."), {"role": "assistant", "content": "1, 2,"}],
        extra_headers=server.script(" 3."),
    )
    assert answer.choices[0].message.content == " 3."


def test_max_tokens_and_stop(client, server):
    answer = client.chat.completions.create(
        model="deepseek-chat",
        messages=user("Hi"),
        max_tokens=2,
        extra_headers=server.script("one two three four"),
    )
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 2
    answer = client.chat.completions.create(
        model="deepseek-chat",
        messages=user("Hi"),
        stop=[" three"],
        extra_headers=server.script("one two three four"),
    )
    assert answer.choices[0].message.content == "one two" and answer.choices[0].finish_reason == "stop"


def test_the_random_model_samples_when_not_scripted(client):
    answer = client.chat.completions.create(model="deepseek-chat", messages=user("Hi"), max_tokens=3, seed=7)
    again = client.chat.completions.create(model="deepseek-chat", messages=user("Hi"), max_tokens=3, seed=7)
    assert answer.usage.completion_tokens == 3
    assert answer.choices[0].message.content == again.choices[0].message.content


def test_chat_stream_bytes(server):
    body = {"model": "deepseek-chat", "messages": user("Hi"), "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers=server.script("Yes.")
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    events = sse_events(raw)
    assert raw.endswith(b"data: [DONE]\n\n") and events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]
    assert deltas == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Yes"}, None),
        ({"content": "."}, None),
        ({}, "stop"),
    ]


def test_completions_raw_prompt_plain_and_streamed(client, server):
    answer = client.completions.create(
        model="deepseek-v4-flash", prompt="Once upon", max_tokens=10, extra_headers=server.script(" a time")
    )
    assert answer.choices[0].text == " a time" and answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens == len(TOKENIZER.encode("Once upon"))  # as written, nothing added
    body = {"prompt": "Once upon", "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=server.script(" a time")
    ) as r:
        events = sse_events(r.read())
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert events[-1] == (None, "[DONE]")
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == [" a", " time", ""]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
