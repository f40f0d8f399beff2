"""The server's overhead: time to first token and decode tokens per second through ``ds4 serve``
against the engine in-process, on the same model, prompt and scripted answer.

Both sides write the same scripted answer (``ScriptedSampler``, so the number of tokens
is fixed) with a fresh session each run (no prefix reuse). In-process, time to first token is
from ``engine.generate`` to the first content event; through the server it is from sending
the streaming request to the first content delta on the wire. Decode speed is tokens after
the first over the time after the first. The ratios are server / engine (1.0: no overhead).

    python benchmarks/bench_server.py [-m MODEL | --demo] [--prompt-words 300] [--answer-words 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from dwarfstar.chat.conversation import Conversation
from dwarfstar.engine import Engine
from dwarfstar.engine.events import ContentDelta, Finished
from dwarfstar.engine.sampling import ScriptedSampler

CODE = "import sys; from dwarfstar.cli.main import main; sys.exit(main())"


def texts(prompt_words: int, answer_words: int, run: int) -> tuple[str, str]:
    # A different first word each run: no run reuses another's prefix.
    prompt = f"run {run}: " + " ".join(f"word{i % 97}" for i in range(prompt_words))
    answer = " ".join(f"token{i % 89}" for i in range(answer_words))
    return prompt, answer


def in_process(engine: Engine, prompt: str, answer: str) -> tuple[float, float, int]:
    tokenizer = engine.tokenizer
    conversation = Conversation([{"role": "user", "content": prompt}], thinking_mode="chat")
    sampler = ScriptedSampler(tokenizer.encode(answer), tokenizer.eos_id)
    start = time.perf_counter()
    first = None
    for event in engine.generate(conversation, sampler=sampler):
        if isinstance(event, ContentDelta) and first is None:
            first = time.perf_counter()
        if isinstance(event, Finished):
            tokens = event.usage.generated_tokens
    end = time.perf_counter()
    return first - start, (tokens - 1) / (end - first), tokens


def through_server(url: str, prompt: str, answer: str) -> tuple[float, float, int]:
    body = {
        "model": "deepseek-chat",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": prompt}],
    }
    headers = {"x-ds4-script": json.dumps(answer)}
    start = time.perf_counter()
    first = None
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=600
    ) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return first - start, (tokens - 1) / (end - first), tokens


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("-m", "--model", type=Path)
    which.add_argument("--demo", action="store_true")
    parser.add_argument("--prompt-words", type=int, default=300)
    parser.add_argument("--answer-words", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=8192)
    args = parser.parse_args()
    if args.demo:
        from dwarfstar.synthetic import demo_model_path

        args.model = demo_model_path()

    engine = Engine.open(args.model, ctx=args.ctx)
    local = [
        in_process(engine, *texts(args.prompt_words, args.answer_words, run)) for run in range(args.runs)
    ]
    del engine

    port = free_port()
    command = [
        sys.executable,
        "-c",
        CODE,
        "serve",
        "-m",
        str(args.model),
        "--port",
        str(port),
        "--ctx",
        str(args.ctx),
    ]
    server = subprocess.Popen([*command, "--allow-scripted-output"], env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        offset = args.runs  # other prompts than the in-process runs, so nothing is reused
        served = [
            through_server(url, *texts(args.prompt_words, args.answer_words, offset + run))
            for run in range(args.runs)
        ]
    finally:
        server.terminate()
        server.wait(timeout=30)

    def median(rows: list[tuple[float, float, int]], column: int) -> float:
        return statistics.median(row[column] for row in rows)

    print(
        f"model {args.model}, prompt {args.prompt_words} words, answer {local[0][2]} tokens, {args.runs} runs"
    )
    print(f"{'':12} {'TTFT s':>10} {'decode tok/s':>14}")
    print(f"{'engine':12} {median(local, 0):10.3f} {median(local, 1):14.1f}")
    print(f"{'server':12} {median(served, 0):10.3f} {median(served, 1):14.1f}")
    print(
        f"{'server/engine':12} {median(served, 0) / median(local, 0):10.3f} "
        f"{median(served, 1) / median(local, 1):14.3f}"
    )


if __name__ == "__main__":
    main()
