"""Live sessions and the disk cache: restarts, interleaved conversations, bad files, budgets."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import time
from importlib.resources import files

import pytest
import torch
from chat_data import WEATHER_TOOL, weather_call
from models import tiny_hf_config

from dwarfstar.chat.conversation import Conversation
from dwarfstar.engine import Engine, SamplingParams
from dwarfstar.engine import kvfile as kvfile_module
from dwarfstar.engine.diskcache import DiskCache, estimated_size, text_key
from dwarfstar.engine.events import Finished
from dwarfstar.engine.kvfile import Snapshot
from dwarfstar.engine.sampling import ScriptedSampler
from dwarfstar.model.model import Model

GREEDY = SamplingParams(temperature=0, max_tokens=4)


@pytest.fixture(scope="module")
def model_path(gguf_model_factory):
    return gguf_model_factory("mixed", tiny_hf_config())


@pytest.fixture(scope="module")
def shared(model_path):
    return Engine.open(model_path)


def run(generation) -> Finished:
    events = list(generation)
    assert isinstance(events[-1], Finished)
    return events[-1]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(done: Finished) -> dict:
    return {"role": "assistant", "content": done.message["content"]}


def test_a_restarted_engine_continues_a_2000_token_conversation_without_reading_it_again(
    shared, model_path, tmp_path
):
    poem = files("dwarfstar").joinpath("data", "paradise_lost.txt").read_text(encoding="utf-8")
    messages = [user("Summarise this:\n" + poem[:9000])]
    first = Engine(shared.model, shared.tokenizer, kv_disk_dir=tmp_path)
    opening = first.generate(Conversation(messages, thinking_mode="chat"), GREEDY)
    assert opening.prompt_tokens >= 2000
    done = run(opening)
    first.close()  # a clean shutdown saves the live session

    messages += [assistant(done), user("And in one word?")]
    follow_up = Conversation(messages, thinking_mode="chat")
    restarted = Engine(Model.load(model_path), shared.tokenizer, kv_disk_dir=tmp_path)
    resumed = restarted.generate(follow_up, GREEDY)
    uninterrupted = first.generate(follow_up, GREEDY)
    assert resumed.plan.tokens == uninterrupted.plan.tokens
    # nothing already read is read again: only the new turn's tokens are computed
    assert resumed.reused_tokens == uninterrupted.reused_tokens > opening.prompt_tokens
    resumed_done, uninterrupted_done = run(resumed), run(uninterrupted)
    assert resumed_done.usage.computed_tokens == uninterrupted_done.usage.computed_tokens < 40
    assert torch.equal(resumed.session.checkpoint.logits, uninterrupted.session.checkpoint.logits)
    assert resumed_done.text == uninterrupted_done.text


@pytest.mark.parametrize(
    "options",
    [
        {"max_sessions": 3},  # all three live
        {"max_sessions": 1, "kv_min_tokens": 8},  # one live, the others on disk
        {"max_sessions": 3, "kv_ram_mb": 1e-3, "kv_min_tokens": 8},  # a RAM budget for one
    ],
    ids=["live", "disk-by-count", "disk-by-ram"],
)
def test_an_agent_and_two_subagents_taking_turns_each_reuse_their_own_prefix(shared, tmp_path, options):
    disk = {"kv_disk_dir": tmp_path} if "kv_min_tokens" in options else {}
    engine = Engine(shared.model, shared.tokenizer, **options, **disk)
    conversations = [
        [user("You are the main agent. Plan the work.")],
        [user("Sub-agent one: read the parser.")],
        [user("Sub-agent two: read the tests, all of them.")],
    ]
    held = [0, 0, 0]
    for turn in range(3):
        for i, messages in enumerate(conversations):
            generation = engine.generate(Conversation(messages, thinking_mode="chat"), GREEDY)
            assert generation.reused_tokens == held[i]  # everything it had, nothing of the others
            done = run(generation)
            held[i] = len(generation.session.tokens)
            messages += [assistant(done), user(f"Go on, step {turn}.")]
    if disk:
        assert len(list(tmp_path.glob("*.kv"))) >= 3


def snapshot_of(model: Model, text: str, n: int, seed: int) -> Snapshot:
    tokens = torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))
    state = model.new_session()
    logits = model.forward(tokens, state, all_logits=False)[0]
    return Snapshot(state, tokens.tolist(), text, logits)


def test_bad_files_are_skipped_with_a_warning_and_removed(shared, tmp_path, caplog):
    cache = DiskCache(tmp_path, shared.model, 1 << 30, min_tokens=4)
    assert cache.save(snapshot_of(shared.model, "hello world", 20, 0), "test")
    good = tmp_path / (text_key("hello world") + ".kv")
    truncated = tmp_path / (text_key("hello") + ".kv")
    truncated.write_bytes(good.read_bytes()[:100])
    stray = tmp_path / "notes.txt"
    stray.write_text("not a cache file")
    with caplog.at_level(logging.WARNING):
        entry = cache.lookup("hello world, and more", None)
    assert entry is not None and entry.path == good
    assert not truncated.exists() and stray.exists()  # only files with cache names are touched
    assert any("truncated" in record.message for record in caplog.records)

    corrupt = bytearray(good.read_bytes())
    corrupt[-10] ^= 0xFF
    good.write_bytes(bytes(corrupt))
    with caplog.at_level(logging.WARNING):
        assert cache.load(cache.lookup("hello world, and more", None), "hello world, and more", None) is None
    assert not good.exists() and any("checksum" in record.message for record in caplog.records)


def test_the_disk_budget_is_never_exceeded(shared, tmp_path):
    size = kvfile_module.write(
        tmp_path / "probe", snapshot_of(shared.model, "conversation 0", 40, 0), shared.model
    )
    (tmp_path / "probe").unlink()
    budget = int(3.5 * size)
    cache = DiskCache(tmp_path, shared.model, budget, min_tokens=4)
    for i in range(8):
        assert cache.save(snapshot_of(shared.model, f"conversation {i}", 40, i), "test")
        assert sum(p.stat().st_size for p in tmp_path.glob("*.kv")) <= budget
    assert len(list(tmp_path.glob("*.kv"))) == 3
    assert cache.lookup("conversation 7 goes on", None) is not None  # the newest stays


def test_a_full_disk_stops_saving_but_not_serving(shared, tmp_path, monkeypatch, caplog):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kvfile_module, "write", full)
    engine = Engine(shared.model, shared.tokenizer, kv_disk_dir=tmp_path, kv_min_tokens=4)
    with caplog.at_level(logging.WARNING):
        done = run(
            engine.generate(Conversation([user("Hi there, how are you?")], thinking_mode="chat"), GREEDY)
        )
    assert done.reason in ("length", "stop")
    assert engine.sessions.disk is not None and not engine.sessions.disk.saving
    assert any("full" in record.message for record in caplog.records)
    engine.close()  # saving has stopped: no second attempt, no error


def test_two_engines_share_one_directory(shared, tmp_path):
    a = Engine(shared.model, shared.tokenizer, kv_disk_dir=tmp_path, kv_min_tokens=4)
    b = Engine(shared.model, shared.tokenizer, kv_disk_dir=tmp_path, kv_min_tokens=4)
    messages = [user("A question both servers will see, with a few more words.")]
    done = run(a.generate(Conversation(messages, thinking_mode="chat"), GREEDY))
    a.close()
    messages += [assistant(done), user("Again?")]
    generation = b.generate(Conversation(messages, thinking_mode="chat"), GREEDY)
    assert generation.reused_tokens > 0  # b continues what a saved
    run(generation)
    b.close()
    a.close()  # the same names again: rewritten atomically, still loadable
    for path in tmp_path.glob("*.kv"):
        assert kvfile_module.read(path, shared.model).tokens


def test_a_client_that_reserializes_tool_call_arguments_still_hits_the_cache(shared, tmp_path):
    tok = shared.tokenizer
    tools = [WEATHER_TOOL]
    messages = [{"role": "system", "content": "", "tools": tools}, user("Weather in Rome?")]
    completion = weather_call()
    script = tok.encode(completion) + tok.encode("never sampled")
    opening = Conversation(messages, thinking_mode="chat")

    def answered(engine: Engine) -> tuple[dict, int]:
        done = run(engine.generate(opening, sampler=ScriptedSampler(script, end_id=tok.eos_id)))
        return done.message["tool_calls"][0], len(engine.sessions.sessions[0].tokens)

    def sent_back(call: dict, call_id: str) -> Conversation:
        arguments = json.dumps({"days": 2, "city": "Rome"}, indent=1)  # keys re-ordered, re-spaced
        returned = {**call, "id": call_id, "function": {**call["function"], "arguments": arguments}}
        return Conversation(
            messages
            + [{"role": "assistant", "content": "Checking.", "tool_calls": [returned]}]
            + [{"role": "tool", "tool_call_id": call_id, "content": "sunny"}],
            thinking_mode="chat",
        )

    control = Engine(shared.model, shared.tokenizer)
    call, held = answered(control)
    unknown = control.generate(sent_back(call, "call_unknown"), GREEDY)  # no replay: the answer is lost
    assert unknown.plan.source == "checkpoint" and unknown.reused_tokens < held

    engine = Engine(shared.model, shared.tokenizer, kv_disk_dir=tmp_path, kv_min_tokens=4)
    call, held = answered(engine)
    known = engine.generate(sent_back(call, call["id"]), GREEDY)  # replayed as written: all reused
    assert known.plan.source == "live" and known.reused_tokens == held
    run(known)
    engine.close()

    restarted = Engine(shared.model, shared.tokenizer, kv_disk_dir=tmp_path, kv_min_tokens=4)
    again = restarted.generate(sent_back(call, call["id"]), GREEDY)  # the map came back from disk
    assert again.reused_tokens >= held


def test_a_saved_chat_loads_into_another_engine_and_continues_with_no_prefill(shared, model_path, tmp_path):
    from dwarfstar.engine.chat import Chat

    chat = Chat(Engine(shared.model, shared.tokenizer), system="Be brief.", thinking="nothink")
    run(chat.reply(chat.send("Name three rivers.", GREEDY)))
    with pytest.raises(ValueError, match="nothing to save"):
        Chat(chat.engine).save(tmp_path / "empty.kv")
    chat.save(tmp_path / "rivers.kv")
    held = len(chat.session.tokens)
    uninterrupted = chat.send("And three lakes?", GREEDY)

    elsewhere = Chat(Engine(Model.load(model_path), shared.tokenizer))
    elsewhere.load(tmp_path / "rivers.kv")
    assert (elsewhere.system, elsewhere.thinking) == ("Be brief.", "nothink")
    assert elsewhere.messages == chat.messages[:-1]
    resumed = elsewhere.send("And three lakes?", GREEDY)
    assert resumed.reused_tokens == uninterrupted.reused_tokens == held
    assert resumed.plan.tokens == uninterrupted.plan.tokens
    assert run(elsewhere.reply(resumed)).text == run(chat.reply(uninterrupted)).text


def test_chat_commands_save_load_and_list_sessions(shared, tmp_path, monkeypatch, capsys):
    from dwarfstar.cli.chat import _command
    from dwarfstar.engine.chat import Chat

    monkeypatch.setenv("DS4_SESSIONS_DIR", str(tmp_path))
    chat = Chat(Engine(shared.model, shared.tokenizer), thinking="nothink")
    run(chat.reply(chat.send("Hello there.", GREEDY)))
    _command(chat, "/save", "greeting")
    _command(chat, "/save", "../escape")
    other = Chat(Engine(shared.model, shared.tokenizer))
    _command(other, "/load", "greeting")
    _command(other, "/load", "missing")
    _command(other, "/sessions", "")
    notes = capsys.readouterr().err
    assert "saved greeting" in notes and "usage: /save NAME" in notes
    assert "loaded greeting: 2 messages" in notes and "no saved conversation 'missing'" in notes
    assert "greeting: 2 messages" in notes
    assert other.messages == chat.messages and other.session.tokens == chat.session.tokens
    assert [p.name for p in tmp_path.iterdir()] == ["greeting.kv"]


def test_an_anthropic_client_sending_a_tool_use_back_with_reordered_input_hits_the_cache(shared):
    from dwarfstar.chat.request import from_anthropic

    tok = shared.tokenizer
    tools = [{"name": "get_weather", "description": "", "input_schema": {"type": "object"}}]
    question = {"role": "user", "content": "Weather in Rome?"}
    body = {"model": "deepseek-chat", "max_tokens": 8, "tools": tools, "messages": [question]}
    body["thinking"] = {"type": "disabled"}
    completion = weather_call(days="2.0")
    engine = Engine(shared.model, shared.tokenizer)
    script = tok.encode(completion) + tok.encode("never sampled")
    done = run(engine.generate(from_anthropic(body), sampler=ScriptedSampler(script, end_id=tok.eos_id)))
    held = len(engine.sessions.sessions[0].tokens)
    tool_use_id = "toolu_" + done.message["tool_calls"][0]["id"].removeprefix(
        "call_"
    )  # as the server sends it
    body["messages"] = [
        question,
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": tool_use_id,
                    "name": "get_weather",
                    "input": {"days": 2.0, "city": "Rome"},
                },
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_use_id, "content": "sunny"}],
        },
    ]
    follow_up = engine.generate(from_anthropic(body), GREEDY)
    assert follow_up.plan.source == "live" and follow_up.reused_tokens == held


def test_a_long_prefill_cut_short_resumes_from_its_last_saved_frontier(shared, model_path, tmp_path):
    poem = files("dwarfstar").joinpath("data", "paradise_lost.txt").read_text(encoding="utf-8")
    conversation = Conversation([user(poem[:3000])], thinking_mode="chat")
    options = {"kv_disk_dir": tmp_path, "kv_save_interval": 128, "prefill_chunk": 64, "kv_min_tokens": 64}
    engine = Engine(shared.model, shared.tokenizer, **options)
    generation = engine.generate(conversation, GREEDY)
    assert generation.prompt_tokens > 600
    for event in generation:  # a crash after the ninth chunk: nothing else is saved
        if getattr(event, "done", 0) >= 9 * 64:
            generation.cancel()
    saved = sorted(kvfile_module.read_header(p)["n_tokens"] for p in tmp_path.glob("*.kv"))
    assert saved == [128, 256, 384, 512]  # every multiple of the interval crossed, mid-prompt

    restarted = Engine(Model.load(model_path), shared.tokenizer, **options)
    resumed = restarted.generate(conversation, GREEDY)
    assert resumed.reused_tokens == 512
    uninterrupted = Engine(shared.model, shared.tokenizer, prefill_chunk=64).generate(conversation, GREEDY)
    assert run(resumed).text == run(uninterrupted).text
    assert torch.equal(resumed.session.checkpoint.logits, uninterrupted.session.checkpoint.logits)


def test_a_thinking_conversation_reads_only_each_new_turn_though_the_renderer_drops_the_reasoning(
    shared, tmp_path
):
    tok = shared.tokenizer
    options = {"kv_disk_dir": tmp_path, "kv_min_tokens": 64}
    engine = Engine(shared.model, shared.tokenizer, **options)
    messages = [user("Name the capital of each country I ask about, after thinking it over. " * 6)]

    def turn(engine: Engine, question: str | None = None):
        if question is not None:
            messages.append(user(question))
        script = tok.encode("The user asks for a capital; I know this one.</think>Paris.")
        generation = engine.generate(Conversation(messages), sampler=ScriptedSampler(script, tok.eos_id))
        done = run(generation)
        assert done.message["reasoning_content"] and done.message["content"] == "Paris."
        kept = {key: done.message[key] for key in ("content", "reasoning_content")}
        messages.append({"role": "assistant", **kept})
        return generation

    first = turn(engine, "France?")
    assert first.plan.tokens[-1] == tok.special_ids["<think>"]
    assert first.session.checkpoint.tokens == first.plan.tokens[:-1]
    # The next prompt drops the reasoning and writes </think> where this one has <think>: it
    # reads only what follows that point (the answer and the new question), as a cold one would.
    second = turn(engine, "Italy?")
    assert second.plan.source == "checkpoint" and second.reused_tokens == first.prompt_tokens - 1
    assert second.plan.tokens == Engine(shared.model, tok).generate(Conversation(messages[:-1])).plan.tokens
    assert second.prompt_tokens - second.reused_tokens < 30 < 64  # too few to be saved as a prompt
    engine.close()  # saves the live state and the point the next turn leaves it

    messages.append(user("Spain?"))
    restarted = Engine(shared.model, shared.tokenizer, **options)
    third = restarted.generate(Conversation(messages), GREEDY)
    assert third.reused_tokens == second.prompt_tokens - 1
    cold = Engine(shared.model, tok).generate(Conversation(messages), GREEDY)
    assert third.plan.tokens == cold.plan.tokens
    run(third), run(cold)
    assert torch.allclose(third.session.checkpoint.logits, cold.session.checkpoint.logits, atol=1e-4)

    # Offering tools keeps every turn's reasoning: the next prompt extends the answer, and the
    # checkpoint stays at the end of the prompt.
    tools = [{"type": "function", "function": {"name": "get_capital", "parameters": {"type": "object"}}}]
    offered = Conversation([{"role": "system", "tools": tools}, *messages])
    with_tools = Engine(shared.model, tok).generate(offered, GREEDY)
    assert with_tools.plan.tokens[-1] == tok.special_ids["<think>"]
    run(with_tools)
    assert with_tools.session.checkpoint.tokens == with_tools.plan.tokens


def test_eviction_ranks_files_by_age_and_hits_which_survive_a_restart(shared, tmp_path):
    model = shared.model
    cache = DiskCache(tmp_path, model, 1 << 30, min_tokens=4)
    popular, recent = tmp_path / (text_key("popular") + ".kv"), tmp_path / (text_key("recent") + ".kv")
    assert cache.save(snapshot_of(model, "popular", 20, 1), "test")
    assert cache.save(snapshot_of(model, "recent", 20, 2), "test")
    for _ in range(3):
        assert cache.load(cache.lookup("popular, again", None), "popular, again", None) is not None
    restarted = DiskCache(tmp_path, model, 1 << 30, min_tokens=4)
    assert {entry.path: entry.hits for entry in restarted.entries()} == {popular: 3, recent: 0}

    now = time.time()
    os.utime(popular, (now - 1000, now - 1000))  # used long ago but often: 1000 s / (1 + 3 hits)
    os.utime(recent, (now - 500, now - 500))  # used since, never again: 500 s / 1, evicted first
    third = snapshot_of(model, "third", 20, 3)
    restarted.space_bytes = popular.stat().st_size + estimated_size(third)  # room for two
    assert restarted.save(third, "test")
    assert popular.exists() and not recent.exists()


def test_a_file_a_session_still_reads_is_never_evicted(shared, tmp_path, caplog):
    model = shared.model
    cache = DiskCache(tmp_path, model, 1 << 30, min_tokens=4)
    old = tmp_path / (text_key("old") + ".kv")
    assert cache.save(snapshot_of(model, "old", 20, 1), "test")
    restored = cache.load(cache.lookup("old and more", None), "old and more", None)  # its rows: mapped
    second = snapshot_of(model, "second", 20, 2)
    cache.space_bytes = estimated_size(second)  # room for one file
    with caplog.at_level(logging.WARNING):
        assert not cache.save(second, "test")  # only by removing the file still read
    assert old.exists() and any("in use" in record.message for record in caplog.records)

    del restored
    gc.collect()
    assert cache.save(second, "test")  # no longer read: it goes
    assert not old.exists() and len(list(tmp_path.glob("*.kv"))) == 1


def test_a_long_raw_prompt_is_saved_trimmed_and_aligned_so_a_continuation_still_extends_it(shared, tmp_path):
    poem = files("dwarfstar").joinpath("data", "paradise_lost.txt").read_text(encoding="utf-8")
    text = poem[:2500].rstrip() + " and walk"
    options = {"kv_disk_dir": tmp_path, "kv_min_tokens": 64, "kv_trim": 32, "kv_align": 128}
    generation = Engine(shared.model, shared.tokenizer, **options).generate(text, GREEDY)
    run(generation)
    stored = (generation.prompt_tokens - 32) // 128 * 128
    assert stored >= 256
    headers = [kvfile_module.read_header(p) for p in tmp_path.glob("*.kv")]
    assert [(h["n_tokens"], h["extra"]["reason"]) for h in headers] == [(stored, "prompt")]
    assert text.startswith(headers[0]["text"])  # named by its text

    # another process: the next request continues the last word ("walk" -> "walked")
    again = Engine(shared.model, shared.tokenizer, **options).generate(text + "ed on", GREEDY)
    assert again.reused_tokens == stored
    cold = Engine(shared.model, shared.tokenizer).generate(text + "ed on", GREEDY)
    run(again), run(cold)
    assert torch.allclose(again.session.checkpoint.logits, cold.session.checkpoint.logits, atol=1e-4)


def test_a_generation_is_saved_at_each_interval_and_a_crash_resumes_from_the_last(shared, tmp_path):
    tok = shared.tokenizer
    options = {"kv_disk_dir": tmp_path, "kv_min_tokens": 16, "kv_save_interval": 16}
    messages = [user("Tell me about the keeper of the lighthouse.")]
    story = tok.encode("The keeper climbed the stairs each night and lit the lamp for the ships. " * 3)
    engine = Engine(shared.model, tok, **options)
    generation = engine.generate(
        Conversation(messages, thinking_mode="chat"), sampler=ScriptedSampler(story, tok.eos_id)
    )
    done = run(generation)  # then the process dies: no shutdown save
    held, prompt = len(generation.session.tokens), generation.prompt_tokens
    assert held == prompt + len(story)
    saved = {
        kvfile_module.read_header(p)["n_tokens"]: kvfile_module.read_header(p) for p in tmp_path.glob("*.kv")
    }
    during = [n for n in range(16, held + 1, 16) if n > prompt]
    assert len(during) >= 2
    assert all(saved[n]["extra"]["reason"] == "generation" and saved[n]["text"] for n in during)

    messages += [assistant(done), user("And then?")]
    restarted = Engine(shared.model, tok, **options)
    resumed = restarted.generate(Conversation(messages, thinking_mode="chat"), GREEDY)
    assert resumed.reused_tokens == during[-1]


def test_conversations_that_share_a_long_system_prompt_read_it_once(shared, tmp_path):
    poem = files("dwarfstar").joinpath("data", "paradise_lost.txt").read_text(encoding="utf-8")
    system = {"role": "system", "content": "Answer questions about this poem.\n" + poem[:1200]}
    options = {"max_sessions": 4, "kv_min_tokens": 64, "kv_disk_dir": tmp_path}
    engine = Engine(shared.model, shared.tokenizer, **options)

    def ask(engine: Engine, *messages: dict):
        return engine.generate(Conversation([system, *messages], thinking_mode="chat"), GREEDY)

    first = ask(engine, user("Who speaks first?"))
    shared_part = first.plan.tokens.index(shared.tokenizer.special_ids["<｜User｜>"])  # BOS and system
    assert shared_part > 64
    done = run(first)
    held = len(first.session.tokens)
    second = ask(engine, user("How many lines are there?"))
    assert second.reused_tokens == shared_part and second.session is not first.session
    run(second)
    follow_up = ask(engine, user("Who speaks first?"), assistant(done), user("Why?"))
    assert follow_up.session is first.session and follow_up.reused_tokens == held  # still whole

    restarted = Engine(shared.model, shared.tokenizer, **options)  # from the disk cache
    third = ask(restarted, user("What rhymes?"))
    assert third.reused_tokens == shared_part
    run(third)
    fourth = ask(restarted, user("Who falls?"))  # from the anchor the third one read from disk
    assert fourth.reused_tokens == shared_part and fourth.session is not third.session
    anchors = [
        h for h in map(kvfile_module.read_header, tmp_path.glob("*.kv")) if h["extra"]["reason"] == "anchor"
    ]
    assert [(h["n_tokens"], h["hits"]) for h in anchors] == [(shared_part, 1)]  # read once
    cold = ask(Engine(shared.model, shared.tokenizer), user("What rhymes?"))
    assert third.plan.tokens == cold.plan.tokens
    run(cold)
    assert torch.allclose(third.session.checkpoint.logits, cold.session.checkpoint.logits, atol=1e-4)
