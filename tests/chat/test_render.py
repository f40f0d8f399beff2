"""The renderer against DeepSeek's official V4 encoder: its test cases and 80 reference renders."""

import copy
import json

import pytest
from chat_data import OFFICIAL_CASES, RENDER_VECTORS, official_case
from hypothesis import given, settings
from hypothesis import strategies as st

from dwarfstar.chat.conversation import Conversation
from dwarfstar.chat.render import THINK_MAX_PREFIX, render, render_messages

VECTORS = RENDER_VECTORS

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"


def test_all_reference_vectors_are_present():
    assert len(VECTORS) == 80


@pytest.mark.parametrize("vector", VECTORS, ids=[f"vector{i}" for i in range(len(VECTORS))])
def test_reference_vector(vector):
    messages = copy.deepcopy(vector["messages"])
    prompt = render_messages(
        vector["messages"],
        thinking_mode=vector["thinking_mode"],
        reasoning_effort=vector["reasoning_effort"],
        drop_thinking=vector["drop_thinking"],
    )
    assert prompt == vector["expected"]
    assert vector["messages"] == messages  # the caller's messages are left as they were


@pytest.mark.parametrize("case, thinking_mode", OFFICIAL_CASES)
def test_official_encoder_case(case, thinking_mode):
    messages, expected = official_case(case)
    assert render_messages(messages, thinking_mode=thinking_mode) == expected


def test_opening_of_the_answer_in_each_mode():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_messages(messages, "chat") == f"{BOS}Be brief.{USER}Hi{ASSISTANT}</think>"
    assert render_messages(messages, "thinking") == f"{BOS}Be brief.{USER}Hi{ASSISTANT}<think>"
    assert render_messages(messages, "thinking", "high") == f"{BOS}Be brief.{USER}Hi{ASSISTANT}<think>"


def test_think_max_prefix_follows_bos_in_thinking_mode_only():
    messages = [{"role": "user", "content": "Hi"}]
    assert (
        render_messages(messages, "thinking", "max") == f"{BOS}{THINK_MAX_PREFIX}{USER}Hi{ASSISTANT}<think>"
    )
    assert render_messages(messages, "chat", "max") == f"{BOS}{USER}Hi{ASSISTANT}</think>"
    assert THINK_MAX_PREFIX.startswith("Reasoning Effort: Absolute maximum") and THINK_MAX_PREFIX.endswith(
        ".\n\n"
    )


def test_earlier_reasoning_is_dropped_without_tools_and_kept_on_request():
    messages = [
        {"role": "user", "content": "A"},
        {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
        {"role": "user", "content": "B"},
    ]
    dropped = f"{BOS}{USER}A{ASSISTANT}</think>a1{EOS}{USER}B{ASSISTANT}<think>"
    kept = f"{BOS}{USER}A{ASSISTANT}<think>r1</think>a1{EOS}{USER}B{ASSISTANT}<think>"
    assert render_messages(messages, "thinking") == dropped
    assert render_messages(messages, "thinking", drop_thinking=False) == kept


def test_tool_results_join_one_user_turn_in_call_order():
    call = [
        {"id": f"c{i}", "type": "function", "function": {"name": f"f{i}", "arguments": "{}"}} for i in (1, 2)
    ]
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": call},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "user", "content": "and?"},
    ]
    invokes = (
        '<｜DSML｜invoke name="f1">\n\n</｜DSML｜invoke>\n<｜DSML｜invoke name="f2">\n\n</｜DSML｜invoke>'
    )
    assert render_messages(messages, "chat") == (
        f"{BOS}{USER}go{ASSISTANT}</think>\n\n<｜DSML｜tool_calls>\n{invokes}\n</｜DSML｜tool_calls>{EOS}"
        f"{USER}<tool_result>one</tool_result>\n\n<tool_result>two</tool_result>\n\nand?{ASSISTANT}</think>"
    )


def test_arguments_strings_stay_raw_and_other_values_become_json():
    arguments = json.dumps({"path": "a<b>&c", "n": 3, "flags": ["x"], "deep": {"é": None}})
    messages = [
        {"role": "user", "content": "u"},
        {
            "role": "assistant",
            "content": "ok",
            "tool_calls": [{"function": {"name": "t", "arguments": arguments}}],
        },
    ]
    assert render_messages(messages, "chat").endswith(
        'ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="t">\n'
        '<｜DSML｜parameter name="path" string="true">a<b>&c</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">3</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="flags" string="false">["x"]</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="deep" string="false">{"é": null}</｜DSML｜parameter>\n'
        f"</｜DSML｜invoke>\n</｜DSML｜tool_calls>{EOS}"
    )


def test_arguments_that_are_not_a_json_object_become_one_string_parameter():
    messages = [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "t", "arguments": "[1"}}]}
    ]
    assert '<｜DSML｜parameter name="arguments" string="true">[1</｜DSML｜parameter>' in render_messages(
        messages
    )


def test_tools_and_response_format_follow_the_system_text():
    tool = {"type": "function", "function": {"name": "now", "description": "Time.", "parameters": {}}}
    messages = [
        {"role": "system", "content": "S", "tools": [tool], "response_format": {"type": "json_object"}},
        {"role": "user", "content": "u"},
    ]
    prompt = render_messages(messages, "chat")
    assert prompt.startswith(f"{BOS}S\n\n## Tools\n\nYou have access to a set of tools")
    assert (
        '\n\n### Available Tool Schemas\n\n{"name": "now", "description": "Time.", "parameters": {}}\n\n'
        in prompt
    )
    assert prompt.endswith(
        "invoke tool calls.\n\n\n## Response Format:\n\n"
        "You MUST strictly adhere to the following schema to reply:\n"
        f'{{"type": "json_object"}}{USER}u{ASSISTANT}</think>'
    )


def test_developer_and_latest_reminder_roles():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "latest_reminder", "content": "2026-01-01"},
        {"role": "developer", "content": "D"},
    ]
    expected = f"{BOS}S<｜latest_reminder｜>2026-01-01{USER}D{ASSISTANT}<think>"
    assert render_messages(messages, "thinking") == expected


def test_render_takes_a_conversation():
    messages = [{"role": "user", "content": "Hi"}]
    conversation = Conversation(messages, thinking_mode="thinking", reasoning_effort="max")
    assert render(conversation) == f"{BOS}{THINK_MAX_PREFIX}{USER}Hi{ASSISTANT}<think>"


@pytest.mark.parametrize(
    "messages, options, message",
    [
        ([{"role": "narrator", "content": "x"}], {}, "messages[0]: unknown role 'narrator'"),
        (["hello"], {}, "messages[0] must be a message dict"),
        ([{"role": "developer", "content": ""}], {}, "developer message"),
        ([{"role": "user", "content": "x", "task": "poem"}], {}, "unknown task 'poem'"),
        ([], {"thinking_mode": "deep"}, "thinking_mode"),
        ([], {"reasoning_effort": "low"}, "reasoning_effort"),
    ],
)
def test_invalid_input_is_rejected(messages, options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        render_messages(messages, **options)


texts = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<>｜"), max_size=12)
turns = st.lists(st.tuples(texts, texts, texts), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(
    turns=turns,
    question=texts,
    reasoning=texts,
    answer=texts,
    thinking_mode=st.sampled_from(["chat", "thinking"]),
)
def test_an_answer_extends_the_prompt_it_answers(turns, question, reasoning, answer, thinking_mode):
    """What the model writes after the prompt is exactly what the next request's render adds."""
    messages = []
    for user, old_reasoning, old_answer in turns:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "reasoning_content": old_reasoning, "content": old_answer})
    messages.append({"role": "user", "content": question})
    prompt = render_messages(messages, thinking_mode)
    answered = render_messages(
        [*messages, {"role": "assistant", "reasoning_content": reasoning, "content": answer}], thinking_mode
    )
    written = f"{reasoning}</think>{answer}{EOS}" if thinking_mode == "thinking" else f"{answer}{EOS}"
    assert answered == prompt + written
