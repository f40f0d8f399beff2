"""``ScriptedSampler``: a random model writes a chosen answer; parsing and stop strings still run."""

from __future__ import annotations

import json

import pytest
from models import tiny_hf_config

from dwarfstar.chat.conversation import Conversation
from dwarfstar.chat.tokens import (
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_OPEN,
)
from dwarfstar.engine import Engine, EngineError, SamplingParams
from dwarfstar.engine.events import ContentDelta, Finished, ReasoningDelta, TokenSampled
from dwarfstar.engine.sampling import ScriptedSampler


@pytest.fixture(scope="module")
def engine(gguf_model_factory):
    return Engine.open(gguf_model_factory("mixed", tiny_hf_config()))


def test_the_script_is_sampled_then_the_answer_ends(engine):
    tokenizer = engine.tokenizer
    script = tokenizer.encode("Let me see.</think>Hello there.")
    conversation = Conversation([{"role": "user", "content": "Hi"}])
    events = list(engine.generate(conversation, sampler=ScriptedSampler(script, tokenizer.eos_id)))
    assert [e.id for e in events if isinstance(e, TokenSampled)] == script
    done = events[-1]
    assert isinstance(done, Finished) and done.reason == "stop"
    assert done.usage.generated_tokens == len(script) + 1  # the end token counts
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Let me see."
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Hello there."


def test_stop_strings_and_max_tokens_still_apply(engine):
    tokenizer = engine.tokenizer
    script = tokenizer.encode("</think>one two three four")
    conversation = Conversation([{"role": "user", "content": "Count"}])
    sampler = ScriptedSampler(script, tokenizer.eos_id, SamplingParams(stop=(" three",)))
    done = list(engine.generate(conversation, sampler.params, sampler=sampler))[-1]
    assert done.reason == "stop" and done.message["content"] == "one two"
    sampler = ScriptedSampler(script, tokenizer.eos_id, SamplingParams(max_tokens=2))
    done = list(engine.generate(conversation, sampler.params, sampler=sampler))[-1]
    assert done.reason == "length" and done.usage.generated_tokens == 2


WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
TIME = {"type": "function", "function": {"name": "time", "parameters": {"type": "object"}}}
OPENING = f"\n\n{TOOL_CALLS_OPEN}\n"  # how the model opens a tool-calls block
PARIS = (
    f'{PARAMETER_OPEN} name="city" string="true">Paris{PARAMETER_CLOSE}\n{INVOKE_CLOSE}\n{TOOL_CALLS_CLOSE}'
)


def tool_conversation(forced: bool | str, thinking: bool) -> Conversation:
    messages = [
        {"role": "system", "content": "", "tools": [WEATHER, TIME]},
        {"role": "user", "content": "Paris?"},
    ]
    return Conversation(messages, thinking_mode="thinking" if thinking else "chat", forced_tool_call=forced)


def sampled(events) -> list[int]:
    return [e.id for e in events if isinstance(e, TokenSampled)]


def test_a_required_tool_call_is_opened_at_once_without_thinking(engine):
    tokenizer = engine.tokenizer
    opening = tokenizer.encode(OPENING)
    rest = tokenizer.encode(f'{INVOKE_OPEN} name="time">\n{INVOKE_CLOSE}\n{TOOL_CALLS_CLOSE}')
    sampler = ScriptedSampler(rest, tokenizer.eos_id)
    events = list(engine.generate(tool_conversation(True, thinking=False), sampler=sampler))
    assert sampled(events) == opening + rest
    done = events[-1]
    assert done.reason == "tool_calls" and done.message["content"] == ""
    assert [call["function"]["name"] for call in done.message["tool_calls"]] == ["time"]
    # The random model itself, unscripted: its answer still begins with the block's opening.
    params = SamplingParams(seed=1, max_tokens=len(opening) + 2)
    assert (
        sampled(engine.generate(tool_conversation(True, thinking=False), params))[: len(opening)] == opening
    )


def test_a_named_tool_call_is_forced_after_the_reasoning(engine):
    tokenizer = engine.tokenizer
    reasoning = tokenizer.encode("I should look it up.</think>")
    forced = tokenizer.encode(f'{OPENING}{INVOKE_OPEN} name="weather">\n')
    rest = tokenizer.encode(PARIS)
    sampler = ScriptedSampler(reasoning + rest, tokenizer.eos_id)
    events = list(engine.generate(tool_conversation("weather", thinking=True), sampler=sampler))
    assert sampled(events) == reasoning + forced + rest
    done = events[-1]
    assert done.reason == "tool_calls" and done.message["reasoning_content"] == "I should look it up."
    (call,) = done.message["tool_calls"]
    assert call["function"]["name"] == "weather" and json.loads(call["function"]["arguments"]) == {
        "city": "Paris"
    }


def test_auto_and_none_force_nothing(engine):
    tokenizer = engine.tokenizer
    script = tokenizer.encode("Hmm.</think>It is sunny.")
    for conversation in (
        tool_conversation(False, thinking=True),
        Conversation([{"role": "user", "content": "Hi"}]),
    ):
        events = list(engine.generate(conversation, sampler=ScriptedSampler(script, tokenizer.eos_id)))
        assert sampled(events) == script
        assert events[-1].reason == "stop" and events[-1].message["content"] == "It is sunny."


def test_a_forced_name_must_be_offered(engine):
    with pytest.raises(EngineError, match="not among the tools"):
        engine.generate(tool_conversation("nope", thinking=False))
