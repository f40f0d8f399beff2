"""``ScriptedSampler``: a random model writes a chosen answer; parsing and stop strings still run."""

from __future__ import annotations

import pytest
from models import tiny_hf_config

from dwarfstar.chat.conversation import Conversation
from dwarfstar.engine import Engine, SamplingParams
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
