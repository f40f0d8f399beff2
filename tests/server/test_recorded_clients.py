"""Every request body that Claude Code, Codex CLI, opencode and pi really sent (``tests/data/clients``),
posted as is to a live ``ds4 serve``: each gets a well-formed answer of the kind its client expects.
The first request of each tool round trip is answered with a call to one of the client's own tools."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
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

CLIENTS = Path(__file__).parents[1] / "data/clients"
ENTRIES = json.loads((CLIENTS / "index.json").read_text())


@pytest.fixture(scope="module")
def server(serve, small_server_model):
    return serve("--ctx", "40000", model=small_server_model)


def first_tool(path: str, body: dict) -> tuple[str, str] | None:
    """The name and first parameter of the body's first function tool (opencode's title request
    in a tool scenario has none)."""
    for tool in body.get("tools") or []:
        if path == "/v1/messages":
            name, schema = tool["name"], tool.get("input_schema") or {}
        elif path == "/v1/responses":
            if tool.get("type") != "function":
                continue
            name, schema = tool["name"], tool.get("parameters") or {}
        else:
            name, schema = tool["function"]["name"], tool["function"].get("parameters") or {}
        return name, next(iter(schema.get("properties") or {"path": None}))
    return None


def call_script(name: str, parameter: str) -> str:
    return (
        f'The user wants a file read.</think>\n\n{TOOL_CALLS_OPEN}\n{INVOKE_OPEN} name="{name}">\n'
        f'{PARAMETER_OPEN} name="{parameter}" string="true">hello.txt{PARAMETER_CLOSE}\n{INVOKE_CLOSE}\n'
        f"{TOOL_CALLS_CLOSE}"
    )


@pytest.mark.parametrize("entry", ENTRIES, ids=[entry["fixture"] for entry in ENTRIES])
def test_recorded_request(server, entry):
    body = json.loads((CLIENTS / entry["fixture"]).read_text())
    meta = json.loads((CLIENTS / entry["meta"]).read_text())
    path = entry["path"]
    calls = entry["fixture"].endswith("tool-1.json")
    tool = first_tool(path, body) if calls else None
    script = call_script(*tool) if tool else "The user says hello.</think>Hello from DwarfStar."
    headers = {"content-type": "application/json", "x-ds4-script": json.dumps(script)}
    response = httpx.post(
        server.url + path,
        params=meta.get("query") or {},
        content=json.dumps(body),
        headers=headers,
        timeout=300,
    )
    assert response.status_code == 200, response.text
    if body.get("stream"):
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.content)
        if path == "/v1/messages":
            data = [json.loads(d) for _, d in events]
            assert data[0]["type"] == "message_start" and data[-1]["type"] == "message_stop"
            blocks = [d["content_block"] for d in data if d["type"] == "content_block_start"]
            if tool:
                assert data[-2]["delta"]["stop_reason"] == "tool_use"
                assert [(b["type"], b.get("name")) for b in blocks][-1] == ("tool_use", tool[0])
            else:
                assert [b["type"] for b in blocks] == ["thinking", "text"]
        elif path == "/v1/responses":
            data = [json.loads(d) for _, d in events]
            assert [d["sequence_number"] for d in data] == list(range(len(data)))
            final = data[-1]
            assert final["type"] == "response.completed"
            output = final["response"]["output"]
            if tool:
                assert output[-1]["type"] == "function_call" and output[-1]["name"] == tool[0]
                assert json.loads(output[-1]["arguments"]) == {tool[1]: "hello.txt"}
            else:
                assert [item["type"] for item in output] == ["reasoning", "message"]
                assert output[-1]["content"][0]["text"] == "Hello from DwarfStar."
        else:
            assert events[-1] == (None, "[DONE]")
            chunks = [json.loads(d) for _, d in events[:-1]]
            finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
            names = [
                call["function"].get("name")
                for c in chunks
                if c["choices"]
                for call in c["choices"][0]["delta"].get("tool_calls") or []
            ]
            assert (finish, [n for n in names if n]) == (("tool_calls", [tool[0]]) if tool else ("stop", []))
    else:
        answer = response.json()
        if path == "/v1/messages":
            assert answer["type"] == "message" and answer["content"]
        elif path == "/v1/responses":
            assert answer["status"] == "completed"
        else:
            assert answer["choices"][0]["finish_reason"] in ("stop", "tool_calls")
