"""OpenAI chat, Anthropic messages and OpenAI Responses requests mapped onto the official
encoder's conversation form."""

import json
from pathlib import Path

import pytest

from dwarfstar.chat.render import render
from dwarfstar.chat.request import (
    RequestError,
    from_anthropic,
    from_openai,
    from_responses,
    parse_request,
)

CLIENTS = Path(__file__).parents[1] / "data/clients"
FIXTURES = [
    entry for entry in json.loads((CLIENTS / "index.json").read_text()) if entry["path"] != "/v1/responses"
]

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
OPENAI_WEATHER = {
    "type": "function",
    "function": {"name": "weather", "description": "Weather now.", "parameters": WEATHER_SCHEMA},
}


def openai_tool_round_trip() -> dict:
    return {
        "model": "deepseek-v4-flash",
        "tools": [OPENAI_WEATHER],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Weather in Oslo"}, {"type": "text", "text": "?"}],
            },
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "Look it up.",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
        ],
    }


def anthropic_tool_round_trip() -> dict:
    return {
        "model": "deepseek-v4-flash",
        "system": [{"type": "text", "text": "Be brief."}],
        "tools": [{"name": "weather", "description": "Weather now.", "input_schema": WEATHER_SCHEMA}],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Weather in Oslo"}, {"type": "text", "text": "?"}],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Look it up.", "signature": "x"},
                    {"type": "tool_use", "id": "c1", "name": "weather", "input": {"city": "Oslo"}},
                ],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "-3 C"}]},
        ],
        "max_tokens": 100,
    }


def test_openai_request_becomes_official_form():
    conversation = from_openai(openai_tool_round_trip())
    assert conversation.thinking_mode == "thinking" and conversation.reasoning_effort is None
    assert conversation.messages == [
        {"role": "system", "content": "Be brief.", "tools": [OPENAI_WEATHER]},
        {"role": "user", "content": "Weather in Oslo\n\n?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Look it up.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
    ]
    assert conversation.tools == [OPENAI_WEATHER]


def test_tool_round_trip_renders_the_call_and_its_result():
    prompt = render(from_openai(openai_tool_round_trip()))
    assert prompt.startswith(f"{BOS}Be brief.\n\n## Tools\n\n")
    assert '{"name": "weather", "description": "Weather now.", "parameters": {"type": "object",' in prompt
    assert prompt.endswith(
        f"{USER}Weather in Oslo\n\n?{ASSISTANT}<think>Look it up.</think>\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="weather">\n'
        '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
        f"</｜DSML｜invoke>\n</｜DSML｜tool_calls>{EOS}"
        f"{USER}<tool_result>-3 C</tool_result>{ASSISTANT}<think>"
    )


def test_anthropic_request_renders_like_the_same_openai_request():
    anthropic = from_anthropic(anthropic_tool_round_trip())
    assert anthropic.messages == from_openai(openai_tool_round_trip()).messages
    assert render(anthropic) == render(from_openai(openai_tool_round_trip()))


def test_system_and_developer_messages_join_the_leading_system_text():
    body = {
        "messages": [
            {"role": "developer", "content": "D1"},
            {"role": "system", "content": ""},
            {"role": "user", "content": "u"},
            {"role": "system", "content": [{"type": "text", "text": "S2"}]},
        ]
    }
    assert from_openai(body).messages == [
        {"role": "system", "content": "D1\n\nS2"},
        {"role": "user", "content": "u"},
    ]


def test_a_system_message_is_created_to_carry_tools():
    body = {"messages": [{"role": "user", "content": "u"}], "tools": [OPENAI_WEATHER]}
    assert from_openai(body).messages[0] == {"role": "system", "content": "", "tools": [OPENAI_WEATHER]}
    assert from_openai({"messages": [{"role": "user", "content": "u"}]}).messages == [
        {"role": "user", "content": "u"}
    ]


def test_tool_choice_none_withholds_tools_and_other_tool_types_are_left_out():
    body = {
        "messages": [{"role": "user", "content": "u"}],
        "tools": [OPENAI_WEATHER, {"type": "custom", "x": 1}],
    }
    assert from_openai(body).tools == [OPENAI_WEATHER]
    assert from_openai({**body, "tool_choice": "none"}).tools == []
    anthropic = {
        "messages": [{"role": "user", "content": "u"}],
        "tools": [{"name": "w", "input_schema": {}}, {"type": "web_search_20250305", "name": "web_search"}],
    }
    assert from_anthropic(anthropic).tools == [
        {"type": "function", "function": {"name": "w", "parameters": {}}}
    ]
    assert from_anthropic({**anthropic, "tool_choice": {"type": "none"}}).tools == []


def test_response_format_sits_on_the_system_message():
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}
    body = {"messages": [{"role": "user", "content": "u"}], "response_format": schema}
    assert from_openai(body).messages[0] == {"role": "system", "content": "", "response_format": schema}
    assert from_openai({**body, "response_format": {"type": "text"}}).messages[0]["role"] == "user"


def test_non_text_parts_become_the_official_placeholder():
    body = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "?"}],
            }
        ]
    }
    assert from_openai(body).messages == [{"role": "user", "content": "[Unsupported image_url]\n\n?"}]


def test_anthropic_system_string_blocks_and_billing_header():
    body = {
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=1;"},
            {"type": "text", "text": "A"},
        ],
        "messages": [
            {"role": "user", "content": "u"},
            {"role": "system", "content": "B"},
        ],
    }
    assert from_anthropic(body).messages == [
        {"role": "system", "content": "A\n\nB"},
        {"role": "user", "content": "u"},
    ]
    assert from_anthropic({**body, "system": "S"}).messages[0] == {"role": "system", "content": "S\n\nB"}


def test_anthropic_blocks_keep_their_order_in_the_user_turn():
    body = {
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "before"},
                    {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "r"}]},
                    {"type": "text", "text": "after"},
                ],
            },
        ]
    }
    conversation = from_anthropic(body)
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "tool", "user"]
    assert render(conversation).endswith(
        f"{USER}before\n\n<tool_result>r</tool_result>\n\nafter{ASSISTANT}<think>"
    )


def test_anthropic_tool_use_input_becomes_a_json_arguments_string():
    body = {
        "messages": [
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Sure."},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"b": 1, "a": "é"}},
                ],
            },
        ]
    }
    assistant = from_anthropic(body).messages[1]
    assert assistant["content"] == "Sure."
    assert assistant["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"b": 1, "a": "é"}'}


@pytest.mark.parametrize(
    "fields, thinking_mode, reasoning_effort",
    [
        ({}, "thinking", None),
        ({"model": "deepseek-chat"}, "chat", None),
        ({"model": "deepseek-reasoner"}, "thinking", None),
        ({"thinking": {"type": "disabled"}}, "chat", None),
        ({"thinking": {"type": "enabled"}, "model": "deepseek-chat"}, "thinking", None),
        ({"thinking": False}, "chat", None),
        ({"think": False}, "chat", None),
        ({"think": True, "model": "deepseek-chat"}, "thinking", None),
        ({"reasoning_effort": "max"}, "thinking", "max"),
        ({"reasoning_effort": "xhigh"}, "thinking", "high"),
        ({"reasoning_effort": "low"}, "thinking", "high"),
        ({"reasoning_effort": "minimal"}, "thinking", "high"),
        ({"reasoning_effort": "none"}, "chat", None),
        ({"reasoning_effort": "max", "thinking": {"type": "disabled"}}, "chat", None),
        ({"reasoning_effort": "high", "model": "deepseek-chat"}, "chat", None),
    ],
)
def test_thinking_controls(fields, thinking_mode, reasoning_effort):
    for mapper in (from_openai, from_anthropic):
        conversation = mapper({"messages": [{"role": "user", "content": "u"}], **fields})
        assert (conversation.thinking_mode, conversation.reasoning_effort) == (
            thinking_mode,
            reasoning_effort,
        )


def test_anthropic_effort_and_adaptive_thinking():
    body = {"messages": [{"role": "user", "content": "u"}], "thinking": {"type": "adaptive"}}
    assert from_anthropic({**body, "output_config": {"effort": "max"}}).reasoning_effort == "max"
    assert from_anthropic({**body, "output_config": {"effort": "high"}}).thinking_mode == "thinking"


def test_think_max_prompt():
    prompt = render(from_openai({"messages": [{"role": "user", "content": "u"}], "reasoning_effort": "max"}))
    assert prompt.startswith(f"{BOS}Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    assert prompt.endswith(f".\n\n{USER}u{ASSISTANT}<think>")


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "messages: missing"),
        ({"messages": []}, "messages must be a non-empty array"),
        ({"messages": "hi"}, "messages must be a non-empty array"),
        ({"messages": [3]}, "messages[0] must be an object"),
        ({"messages": [{"content": "x"}]}, "messages[0].role: missing"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role: unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string or an array"),
        (
            {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
            "messages[0].content[0] must be a content part",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id: missing"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": {}}}],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments must be a string, not an object",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "a"}]}]},
            "messages[0].tool_calls[0].function",
        ),
        (
            {"messages": [{"role": "assistant", "reasoning_content": 1}]},
            "messages[0].reasoning_content must be a string",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tools": {}}, "tools must be an array"),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools[0].function",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "huge"},
            "reasoning_effort: unknown level",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": 3},
            "reasoning_effort must be a string",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "on"}}, "thinking.type"),
        (
            {"messages": [{"role": "user", "content": "x"}], "thinking": "on"},
            "thinking must be an object or a boolean",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "think": "yes"}, "think must be a boolean"),
        ({"messages": [{"role": "user", "content": "x"}], "model": 4}, "model must be a string"),
    ],
)
def test_invalid_openai_requests_name_the_field(body, field):
    with pytest.raises(RequestError) as caught:
        from_openai(body)
    assert field in str(caught.value)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role: unknown role 'tool'"),
        (
            {"system": 3, "messages": [{"role": "user", "content": "x"}]},
            "system must be a string or an array",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f"}]}]},
            "messages[0].content[0].input: missing or not an object",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "server_tool_use"}]}]},
            "messages[0].content[0]: unsupported assistant block 'server_tool_use'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
            "messages[0].content[0].tool_use_id: missing",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f"}]}, "tools[0].input_schema"),
        (
            {"messages": [{"role": "user", "content": "x"}], "output_config": {"effort": "extreme"}},
            "output_config.effort: unknown level",
        ),
    ],
)
def test_invalid_anthropic_requests_name_the_field(body, field):
    with pytest.raises(RequestError) as caught:
        from_anthropic(body)
    assert field in str(caught.value)


def test_request_errors_are_value_errors():
    assert issubclass(RequestError, ValueError)


@pytest.mark.parametrize(
    "text, message",
    [("{", "not valid JSON"), ("[1]", "must be a JSON object, not an array"), (b"\xff", "not valid JSON")],
)
def test_parse_request_rejects_what_is_not_a_json_object(text, message):
    with pytest.raises(RequestError, match=message):
        parse_request(text)


@pytest.mark.parametrize("entry", FIXTURES, ids=[entry["fixture"] for entry in FIXTURES])
def test_recorded_client_request(entry):
    body = parse_request((CLIENTS / entry["fixture"]).read_bytes())
    anthropic = entry["path"] == "/v1/messages"
    conversation = from_anthropic(body) if anthropic else from_openai(body)
    prompt = render(conversation)

    # None of these clients switches thinking off, so the prompt opens a thinking answer.
    assert prompt.startswith(BOS) and prompt.endswith(f"{ASSISTANT}<think>")
    assert prompt.count(BOS) == 1
    system_part = prompt[len(BOS) : prompt.index(USER)]
    for tool in body.get("tools", []):
        name = tool["function"]["name"] if "function" in tool else tool["name"]
        assert f'{{"name": "{name}", ' in system_part
    assert "x-anthropic-billing-header" not in prompt
    for message in body["messages"]:
        if message["role"] in ("system", "developer") and isinstance(message["content"], str):
            assert message["content"] in system_part

    if any(message["role"] == "assistant" for message in body["messages"]):  # a tool round trip
        last = body["messages"][-1]
        if anthropic:
            last = next(block for block in last["content"] if block["type"] == "tool_result")
        assert prompt.endswith(f"<tool_result>{last['content']}</tool_result>{ASSISTANT}<think>")
        assert "</｜DSML｜tool_calls>" + EOS in prompt


def test_an_anthropic_body_without_anthropic_only_fields_keeps_its_tools():
    body = {
        "tools": [{"name": "weather", "description": "Weather now.", "input_schema": WEATHER_SCHEMA}],
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
    }
    assert from_anthropic(body).tools == [OPENAI_WEATHER]


@pytest.mark.parametrize("mapper", [from_openai, from_anthropic])
def test_a_trailing_assistant_message_is_continued(mapper):
    body = {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "Count to 3."}, {"role": "assistant", "content": "1, 2,"}],
    }
    conversation = mapper(body)
    assert conversation.continue_final_message
    assert render(conversation) == f"{BOS}{USER}Count to 3.{ASSISTANT}</think>1, 2,"
    thinking = render(mapper({**body, "model": "deepseek-reasoner"}))
    assert thinking == f"{BOS}{USER}Count to 3.{ASSISTANT}<think></think>1, 2,"


def test_tool_choice_required_and_named_are_asked_for_and_forced():
    other = {"type": "function", "function": {"name": "time", "parameters": {"type": "object"}}}
    body = {**openai_tool_round_trip(), "tools": [OPENAI_WEATHER, other]}
    body["messages"] = body["messages"][:2]
    required = from_openai({**body, "tool_choice": "required"})
    assert required.tools == [OPENAI_WEATHER, other]
    assert required.messages[0]["content"].endswith("Answer by calling one or more of the tools above.")
    assert required.forced_tool_call is True
    named = from_openai({**body, "tool_choice": {"type": "function", "function": {"name": "time"}}})
    assert named.tools == [other] and named.messages[0]["content"].endswith("the tool time.")
    assert named.forced_tool_call == "time"
    assert from_openai({**body, "tool_choice": "auto"}).forced_tool_call is False
    assert from_openai({**body, "tool_choice": "none"}).forced_tool_call is False
    assert from_openai({**body, "tools": [], "tool_choice": "required"}).forced_tool_call is False
    responses = {"input": "Time?", "tools": [{"type": "function", "name": "time"}]}
    assert (
        from_responses({**responses, "tool_choice": {"type": "function", "name": "time"}}).forced_tool_call
        == "time"
    )
    anthropic = {
        "system": "Be brief.",
        "tools": [{"name": "weather", "input_schema": WEATHER_SCHEMA}],
        "messages": [{"role": "user", "content": "Weather?"}],
    }
    any_tool = from_anthropic({**anthropic, "tool_choice": {"type": "any"}})
    assert "one or more" in any_tool.messages[0]["content"] and any_tool.forced_tool_call is True
    named = from_anthropic({**anthropic, "tool_choice": {"type": "tool", "name": "weather"}})
    assert named.forced_tool_call == "weather"
    with pytest.raises(RequestError, match="not among the tools"):
        from_openai({**body, "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    with pytest.raises(RequestError, match="tool_choice"):
        from_openai({**body, "tool_choice": 3})


def test_responses_items_become_the_same_conversation_as_chat_messages():
    responses = {
        "model": "deepseek-v4-flash",
        "instructions": "Be brief.",
        "tools": [
            {
                "type": "function",
                "name": "weather",
                "description": "Weather now.",
                "parameters": WEATHER_SCHEMA,
            },
            {"type": "web_search"},
        ],
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Weather in Paris?"}],
            },
            {
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": "Ask the tool."}],
                "content": None,
            },
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "weather",
                "arguments": '{"city": "Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
        ],
    }
    chat = {
        "model": "deepseek-v4-flash",
        "tools": [OPENAI_WEATHER],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "Ask the tool.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        ],
    }
    assert from_responses(responses).messages == from_openai(chat).messages
    assert from_responses({"input": "Hi", "reasoning": {"effort": "none"}}).thinking_mode == "chat"
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    continued = from_responses({"input": "Again", "instructions": "S"}, history=history)
    assert continued.messages == [
        {"role": "system", "content": "S"},
        *history,
        {"role": "user", "content": "Again"},
    ]


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "input: missing"),
        ({"input": 3}, "input must be a string or an array"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "'item_reference' are not supported"),
        ({"input": [{"type": "message", "role": "tool", "content": "x"}]}, "unknown role 'tool'"),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            r"input\[0\].call_id: missing",
        ),
        ({"input": "x", "reasoning": {"effort": "huge"}}, "reasoning.effort: unknown level"),
    ],
)
def test_responses_errors_name_the_field(body, message):
    with pytest.raises(RequestError, match=message):
        from_responses(body)


def test_recorded_responses_requests():
    for entry in json.loads((CLIENTS / "index.json").read_text()):
        if entry["path"] != "/v1/responses":
            continue
        body = parse_request((CLIENTS / entry["fixture"]).read_bytes())
        conversation = from_responses(body)
        prompt = render(conversation)
        assert prompt.startswith(BOS) and prompt.endswith(f"{ASSISTANT}<think>")
        names = [tool["name"] for tool in body.get("tools", []) if tool["type"] == "function"]
        assert [tool["function"]["name"] for tool in conversation.tools] == names
        outputs = [item for item in body["input"] if item.get("type") == "function_call_output"]
        if outputs:
            assert prompt.endswith(f"<tool_result>{outputs[-1]['output']}</tool_result>{ASSISTANT}<think>")
