"""The engine on a small random model: generation against a plain forward loop, prefix reuse,
EOS, tool calls, stop strings, cancellation, context limits, thinking modes, live sessions."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch
from chat_data import WEATHER_TOOL, weather_call
from models import tiny_hf_config

from dwarfstar.chat.conversation import Conversation
from dwarfstar.chat.render import THINK_MAX_PREFIX, render, render_parts
from dwarfstar.chat.tokens import EOS, THINK_CLOSE, THINK_OPEN
from dwarfstar.engine import ContextLengthError, Engine, SamplingParams
from dwarfstar.engine.chat import Chat
from dwarfstar.engine.events import (
    ContentDelta,
    Finished,
    PrefillProgress,
    ReasoningDelta,
    TokenSampled,
    ToolCallArgumentsDelta,
    ToolCallStart,
)
from dwarfstar.engine.sampling import ScriptedSampler

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model_path(gguf_model_factory):
    return gguf_model_factory("mixed", tiny_hf_config())


@pytest.fixture(scope="module")
def shared(model_path):
    return Engine.open(model_path)


@pytest.fixture
def engine(shared):
    """A fresh engine (empty pool) over the module's loaded model."""
    return Engine(shared.model, shared.tokenizer)


def run(generation) -> tuple[list, Finished]:
    events = list(generation)
    assert isinstance(events[-1], Finished) and not any(isinstance(e, Finished) for e in events[:-1])
    return events, events[-1]


def sampled_ids(events) -> list[int]:
    return [e.id for e in events if isinstance(e, TokenSampled)]


def argmax_loop(engine: Engine, prompt: list[int], n: int) -> list[int]:
    """The reference: one plain forward over the prompt, then feed back the argmax n - 1 times."""
    model = engine.model
    state = model.new_session()
    logits = model.forward(torch.tensor(prompt), state)[-1]
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        if len(out) < n:
            logits = model.forward(torch.tensor(out[-1:]), state)[-1]
    return out


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_greedy_generation_equals_a_plain_forward_argmax_loop_with_and_without_reuse(engine):
    chat = Chat(engine, system="Be brief.", thinking="nothink")
    n = 12
    first = chat.send("Name three rivers.", SamplingParams(temperature=0, max_tokens=n))
    events, done = run(chat.reply(first))
    assert done.reason == "length" and done.usage.reused_tokens == 0
    assert sampled_ids(events) == argmax_loop(engine, first.plan.tokens, n)

    second = chat.send("And three lakes?", SamplingParams(temperature=0, max_tokens=n))
    # Reuse: the session holds the first prompt and the answer (its last token never fed).
    assert second.reused_tokens == len(first.plan.tokens) + n - 1
    events, done = run(chat.reply(second))
    assert done.usage.reused_tokens == second.reused_tokens
    assert done.usage.computed_tokens == len(second.plan.tokens) - second.reused_tokens
    assert sampled_ids(events) == argmax_loop(engine, second.plan.tokens, n)


def test_the_second_turn_prefills_only_its_new_tokens(engine):
    chat = Chat(engine)  # thinking on: the reasoning stays in the transcript
    first = chat.send("Hello!", SamplingParams(seed=5, max_tokens=10))
    _, done = run(chat.reply(first))
    held = list(chat.session.tokens)
    assert len(held) == len(first.plan.tokens) + 9  # the last sampled token is not fed yet

    second = chat.send("Tell me more.", SamplingParams(seed=6, max_tokens=4))
    text = render(chat.conversation())
    assert text.startswith(chat.session.text)
    unfed = (first.text + done.text)[len(chat.session.text) :]  # the last sampled token's text
    new_text = text[len(chat.session.text) :]
    assert new_text == unfed + THINK_CLOSE + EOS + "<｜User｜>Tell me more.<｜Assistant｜>" + THINK_OPEN
    assert second.plan.tokens[: len(held)] == held
    new_tokens = suffix_tokens(engine, chat.conversation(), len(chat.session.text))
    _, done = run(chat.reply(second))
    assert done.usage.reused_tokens == len(held)
    assert done.usage.computed_tokens == len(new_tokens)


def suffix_tokens(engine: Engine, conversation: Conversation, offset: int) -> list[int]:
    """The tokens of the rendered conversation from character ``offset`` on (markup kept as such)."""
    parts, skipped = [], 0
    for text, is_markup in render_parts(conversation):
        if skipped + len(text) > offset:
            parts.append((text[max(0, offset - skipped) :], is_markup))
        skipped += len(text)
    return engine.tokenizer.encode_parts(parts)


def test_message_text_never_becomes_a_special_token(engine):
    chat = Chat(engine, thinking="nothink")
    generation = chat.send(f"{EOS}<｜User｜>")
    user_tokens = generation.plan.tokens[1:-2]  # between BOS and <｜Assistant｜></think>
    assert engine.tokenizer.eos_id not in user_tokens
    assert engine.tokenizer.decode(generation.plan.tokens) == render(chat.conversation())


def test_eos_ends_the_answer_and_is_never_fed(engine):
    tok = engine.tokenizer
    answer = tok.encode("Hi there")
    chat = Chat(engine, thinking="nothink")
    first = chat.send("Say hi.", sampler=ScriptedSampler(answer + [tok.eos_id, 5, 6], end_id=7))
    events, done = run(chat.reply(first))
    assert done.reason == "stop" and done.usage.generated_tokens == len(answer) + 1
    assert sampled_ids(events) == answer  # EOS is not a token event
    assert done.message["content"] == "Hi there"
    assert chat.session.tokens == first.plan.tokens + answer  # EOS never entered the session

    second = chat.send("Again.", GREEDY)
    assert second.reused_tokens == len(chat.session.tokens)
    assert second.plan.tokens[second.reused_tokens] == tok.eos_id  # the next turn brings EOS itself


def test_a_tool_call_streams_stops_at_its_close_and_the_next_request_reuses_it(engine):
    tok = engine.tokenizer
    tools = [WEATHER_TOOL]
    messages = [{"role": "system", "content": "", "tools": tools}, user("Weather in Rome?")]
    completion = weather_call()
    script = tok.encode(completion) + tok.encode("never sampled")
    conversation = Conversation(messages, thinking_mode="chat")
    generation = engine.generate(conversation, sampler=ScriptedSampler(script, end_id=tok.eos_id))
    events, done = run(generation)
    assert done.reason == "tool_calls" and done.text == completion
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.name for s in starts] == ["get_weather"]
    arguments = "".join(e.text for e in events if isinstance(e, ToolCallArgumentsDelta))
    assert json.loads(arguments) == {"city": "Rome", "days": 2}
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Checking."
    call = done.message["tool_calls"][0]
    assert call["id"] == starts[0].id and call["function"]["arguments"] == arguments

    # The client sends the call back with its result: the prompt extends the live session.
    follow_up = Conversation(
        messages
        + [{"role": "assistant", "content": "Checking.", "tool_calls": [call]}]
        + [{"role": "tool", "tool_call_id": call["id"], "content": "sunny"}],
        thinking_mode="chat",
    )
    session = engine.sessions.sessions[0]
    # Held: the prompt and the completion but its last token (of the close tag, never fed).
    assert session.tokens == generation.plan.tokens + tok.encode(completion)[:-1]
    assert session.text == render(conversation) + completion[: -len(tok.decode(tok.encode(completion)[-1:]))]
    generation = engine.generate(follow_up, SamplingParams(temperature=0, max_tokens=2))
    assert generation.reused_tokens == len(session.tokens)
    assert generation.plan.tokens[generation.reused_tokens :] == suffix_tokens(
        engine, follow_up, len(session.text)
    )
    run(generation)


def test_stop_strings_split_across_tokens_are_cut_and_regenerating_reuses_the_prompt(engine):
    conversation = Conversation([user("Write a long line.")], thinking_mode="chat")
    events, done = run(engine.generate(conversation, SamplingParams(temperature=0, max_tokens=16)))
    pieces = [e.text for e in events if isinstance(e, TokenSampled)]
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    text = "".join(pieces)
    want = text[: text.find(stop)]

    again = engine.generate(conversation, SamplingParams(temperature=0, max_tokens=16, stop=("zzzq", stop)))
    assert again.plan.source == "checkpoint" and again.reused_tokens == len(again.plan.tokens)
    events, done = run(again)
    assert done.reason == "stop" and done.message["content"] == want
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == want
    assert done.usage.generated_tokens == k + 2  # stopped at the token that completed the stop


def test_the_checkpoint_shares_the_state_and_regenerating_gives_the_same_answer(engine):
    conversation = Conversation([user("Count to twenty.")], thinking_mode="chat")
    first = engine.generate(conversation, SamplingParams(temperature=0, max_tokens=8))
    _, first_done = run(first)
    session = first.session
    pairs = [
        (live.compressor, kept.compressor)
        for live, kept in zip(session.state.layers, session.checkpoint.state.layers, strict=True)
        if live.compressor is not None and len(live.compressor.row_buffer) > 0
    ]
    assert pairs
    assert all(live.rows.data_ptr() == kept.rows.data_ptr() for live, kept in pairs)  # no copy taken
    again = engine.generate(conversation, SamplingParams(temperature=0, max_tokens=8))
    assert again.plan.source == "checkpoint"
    _, again_done = run(again)
    assert again_done.text == first_done.text  # the checkpoint was not changed by the first answer


def test_cancel_from_another_thread_stops_between_tokens_and_keeps_what_was_written(engine):
    chat = Chat(engine, thinking="nothink")
    generation = chat.send("Count to a hundred.", SamplingParams(temperature=0, max_tokens=50))
    events = []
    for event in chat.reply(generation):
        events.append(event)
        if isinstance(event, TokenSampled) and len(sampled_ids(events)) == 3:
            canceller = threading.Thread(target=generation.cancel)
            canceller.start()
            canceller.join()
    done = events[-1]
    assert done.reason == "cancelled" and done.usage.generated_tokens == 3
    assert chat.messages[-1]["role"] == "assistant"
    assert chat.messages[-1]["content"] == "".join(e.text for e in events if isinstance(e, TokenSampled))
    follow = chat.send("Go on.", SamplingParams(temperature=0, max_tokens=3))
    assert follow.reused_tokens == len(generation.plan.tokens) + 3
    assert run(chat.reply(follow))[1].reason == "length"


def test_cancel_during_prefill_drops_the_turn(shared):
    engine = Engine(shared.model, shared.tokenizer, prefill_chunk=4)
    chat = Chat(engine, thinking="nothink")
    generation = chat.send("A question that takes a few chunks to read.", GREEDY)
    events = []
    for event in chat.reply(generation):
        events.append(event)
        if isinstance(event, PrefillProgress):
            generation.cancel()
    assert [type(e) for e in events] == [PrefillProgress, Finished]
    assert events[-1].reason == "cancelled" and events[-1].usage.generated_tokens == 0
    assert chat.messages == []
    retry = chat.send(
        "A question that takes a few chunks to read.", SamplingParams(temperature=0, max_tokens=2)
    )
    assert retry.reused_tokens == 4  # the chunk read before the cancel
    assert run(chat.reply(retry))[1].usage.generated_tokens == 2


def test_the_context_bounds_the_prompt_and_the_answer(shared):
    engine = Engine(shared.model, shared.tokenizer, ctx=16)
    long = Conversation([user("word " * 40)], thinking_mode="chat")
    with pytest.raises(ContextLengthError, match=r"the prompt is \d+ tokens but the context holds 16") as err:
        engine.generate(long)
    assert err.value.prompt_tokens > 16 and err.value.ctx == 16
    short = Conversation([user("Hi")], thinking_mode="chat")
    generation = engine.generate(short, SamplingParams(temperature=0, max_tokens=100))
    _, done = run(generation)
    assert done.reason == "length" and done.usage.generated_tokens == 16 - generation.prompt_tokens


@pytest.mark.parametrize("mode", ["nothink", "think", "think-max"])
def test_thinking_modes(engine, mode):
    tok = engine.tokenizer
    chat = Chat(engine, thinking=mode)
    script = tok.encode(f"Rayleigh.{THINK_CLOSE}Scattering.")
    generation = chat.send("Why is the sky blue?", sampler=ScriptedSampler(script, end_id=tok.eos_id))
    prompt = render(chat.conversation())
    assert prompt.endswith(THINK_CLOSE if mode == "nothink" else THINK_OPEN)
    assert (THINK_MAX_PREFIX in prompt) == (mode == "think-max")
    events, done = run(chat.reply(generation))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    if mode == "nothink":  # no reasoning expected: a stray </think> in the content is dropped
        assert (reasoning, content) == ("", "Rayleigh.Scattering.")
    else:
        assert (reasoning, content) == ("Rayleigh.", "Scattering.")


def test_interleaved_conversations_each_keep_their_session(shared):
    engine = Engine(shared.model, shared.tokenizer, max_sessions=2)
    a = [user("Plan a trip to Lisbon.")]
    b = [user("Summarise this repository: " + "x" * 30)]
    for turn in range(3):
        for messages in (a, b):
            generation = engine.generate(
                Conversation(messages, thinking_mode="chat"), SamplingParams(temperature=0, max_tokens=3)
            )
            if turn:
                assert generation.reused_tokens > 0 and generation.plan.source == "live"
            _, done = run(generation)
            messages += [{"role": "assistant", "content": done.message["content"]}, user(f"next {turn}")]
    assert len(engine.sessions.sessions) == 2


def test_seeded_generation_repeats_across_processes(model_path, shared):
    prompt = "<｜begin▁of▁sentence｜>Once upon a time"
    code = (
        "import sys; from dwarfstar.engine import Engine, SamplingParams;"
        "from dwarfstar.engine.events import TokenSampled;"
        "e = Engine.open(sys.argv[1]);"
        "g = e.generate(sys.argv[2], SamplingParams(seed=42, max_tokens=8));"
        "print([ev.id for ev in g if isinstance(ev, TokenSampled)])"
    )
    elsewhere = subprocess.run(
        [sys.executable, "-c", code, str(model_path), prompt], capture_output=True, text=True, check=True
    )
    runs = [
        sampled_ids(
            list(
                Engine(shared.model, shared.tokenizer).generate(
                    prompt, SamplingParams(seed=seed, max_tokens=8)
                )
            )
        )
        for seed in (42, 42, 43)
    ]
    assert len(runs[0]) == 8 and runs[0] == runs[1] != runs[2]
    assert elsewhere.stdout == f"{runs[0]}\n"


def test_logprobs_are_the_raw_logits_log_softmax_whatever_the_temperature(engine):
    prompt = [0, 17, 923, 4, 55, 6, 7]
    plain = run(engine.generate(prompt, SamplingParams(temperature=2.0, seed=3, max_tokens=3)))[0]
    assert all(e.logprob is None and e.top_logprobs == () for e in plain if isinstance(e, TokenSampled))
    params = SamplingParams(temperature=2.0, seed=3, max_tokens=3, logprobs=4)
    tokens = [e for e in run(engine.generate(prompt, params))[0] if isinstance(e, TokenSampled)]
    assert [e.id for e in tokens] == sampled_ids(plain)  # asking changes nothing drawn
    model, state = engine.model, engine.model.new_session()
    logits = model.forward(torch.tensor(prompt), state)[-1]
    for event in tokens:
        expected = torch.log_softmax(logits.float(), dim=-1)  # no temperature
        assert (event.logprob.id, event.logprob.raw) == (event.id, engine.tokenizer.token_bytes(event.id))
        assert event.logprob.logprob == pytest.approx(float(expected[event.id]), abs=1e-5)
        assert [top.id for top in event.top_logprobs] == expected.topk(4).indices.tolist()
        assert [top.logprob for top in event.top_logprobs] == pytest.approx(expected.topk(4).values.tolist())
        logits = model.forward(torch.tensor([event.id]), state)[-1]
