"""``ds4 serve`` sessions: a server restarted with ``--kv-disk-dir`` resumes a long conversation, and
interleaved conversations each keep their own prefix."""

from __future__ import annotations

from importlib.resources import files

import httpx
from conftest import start_server, stop_server


def ask(server, messages: list[dict], **fields) -> dict:
    body = {"model": "deepseek-chat", "messages": messages, "max_tokens": 4, "temperature": 0, **fields}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_restarted_server_continues_a_2000_token_conversation_without_reading_it_again(
    server_model, tmp_path
):
    poem = files("dwarfstar").joinpath("data", "paradise_lost.txt").read_text(encoding="utf-8")
    messages = [{"role": "user", "content": "Summarise this:\n" + poem[:9000]}]
    kv = tmp_path / "kv"
    steady = start_server(server_model, tmp_path / "steady.log")  # never stopped: the reference
    try:
        first = start_server(server_model, tmp_path / "first.log", "--kv-disk-dir", str(kv))
        try:
            reference, opening = ask(steady, messages), ask(first, messages)
        finally:
            stop_server(first)  # a clean shutdown saves the live session
        assert opening["usage"]["prompt_tokens"] >= 2000
        assert opening["choices"][0]["message"] == reference["choices"][0]["message"]
        assert list(kv.glob("*.kv"))

        messages += [
            {"role": "assistant", "content": opening["choices"][0]["message"]["content"]},
            {"role": "user", "content": "And in one word?"},
        ]
        restarted = start_server(server_model, tmp_path / "restarted.log", "--kv-disk-dir", str(kv))
        logprobs = {"logprobs": True, "top_logprobs": 20}
        try:
            resumed = ask(restarted, messages, **logprobs)
        finally:
            stop_server(restarted)
        uninterrupted = ask(steady, messages, **logprobs)
    finally:
        stop_server(steady)
    assert resumed["usage"] == uninterrupted["usage"]  # the same tokens reused, the same computed
    reused = resumed["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert reused > opening["usage"]["prompt_tokens"]
    assert resumed["usage"]["prompt_tokens"] - reused < 40  # only the new turn is read
    assert resumed["choices"][0]["message"] == uninterrupted["choices"][0]["message"]
    # the same logits, bit for bit: each token's 20 likeliest log-probabilities (JSON floats
    # round-trip exactly), from the state read back from disk and from the one never stopped
    steps = resumed["choices"][0]["logprobs"]["content"]
    assert len(steps) == resumed["usage"]["completion_tokens"]
    assert all(len(step["top_logprobs"]) == 20 for step in steps)
    assert steps == uninterrupted["choices"][0]["logprobs"]["content"]


def test_an_agent_and_two_subagents_taking_turns_each_reuse_their_own_prefix(serve):
    server = serve()  # the defaults: live sessions up to --kv-ram-mb
    conversations = [
        [{"role": "user", "content": "You are the main agent. Plan the work."}],
        [{"role": "user", "content": "Sub-agent one: read the parser."}],
        [{"role": "user", "content": "Sub-agent two: read the tests, all of them."}],
    ]
    previous = [0, 0, 0]
    for turn in range(3):
        for i, messages in enumerate(conversations):
            answer = ask(server, messages)
            usage = answer["usage"]
            if turn:  # all of its own last prompt and answer, whatever the others did meanwhile
                assert usage["prompt_tokens_details"]["cached_tokens"] >= previous[i]
            previous[i] = usage["prompt_tokens"]
            messages += [
                {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                {"role": "user", "content": f"Go on, step {turn}."},
            ]


def test_a_thinking_conversation_reads_only_each_new_turn(serve):
    server = serve()

    def think(messages: list[dict]) -> tuple[dict, dict]:
        body = {"model": "deepseek-reasoner", "messages": messages, "max_tokens": 64}
        headers = server.script("A capital; I know it.</think>Paris.")
        response = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=600)
        assert response.status_code == 200, response.text
        answer = response.json()["choices"][0]["message"]
        assert answer["reasoning_content"] and answer["content"] == "Paris."
        reply = {"role": "assistant", **{key: answer[key] for key in ("content", "reasoning_content")}}
        return reply, response.json()["usage"]

    messages = [{"role": "user", "content": "Think it over, then name the capital of France."}]
    reply, first = think(messages)
    # the client sends the reasoning back; the renderer drops it from the history anyway
    _, second = think([*messages, reply, {"role": "user", "content": "And of Italy?"}])
    # all of the first prompt but its closing <think>, where the second one writes </think>
    assert second["prompt_tokens_details"]["cached_tokens"] == first["prompt_tokens"] - 1
