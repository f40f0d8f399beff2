"""A live ``ds4 serve`` on the tiny test model: a real process on a free port, one per test module."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from models import tiny_hf_config

CODE = "import sys; from dwarfstar.cli.main import main; sys.exit(main())"
SCRIPT_HEADER = "x-ds4-script"


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    def script(self, completion: str) -> dict[str, str]:
        """The header that makes the model write ``completion`` (then end its answer)."""
        return {SCRIPT_HEADER: json.dumps(completion)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, log: Path, *args: str) -> Server:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", CODE, "serve", "-m", str(model), "--port", str(port), *args]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ds4 serve exited: {log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return Server(process, url, log)
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"ds4 serve did not come up: {log.read_text()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        raise


@pytest.fixture(scope="session")
def server_model(gguf_model_factory) -> Path:
    return gguf_model_factory("mixed", tiny_hf_config())


@pytest.fixture(scope="session")
def small_server_model(gguf_model_factory) -> Path:
    """Two layers (sliding window, then ratio 4): half the prefill time, for the long client prompts."""
    return gguf_model_factory("two-layers", tiny_hf_config(num_hidden_layers=2))


@pytest.fixture(scope="module")
def serve(server_model, tmp_path_factory) -> Iterator:
    """``serve(*args, model=None) -> Server``: started once per module for each set of arguments."""
    started: dict[tuple, Server] = {}

    def make(*args: str, model: Path | None = None) -> Server:
        key = (*args, model)
        if key not in started:
            log = tmp_path_factory.mktemp("serve") / "server.log"
            started[key] = start_server(model or server_model, log, "--allow-scripted-output", *args)
        return started[key]

    yield make
    for server in started.values():
        stop_server(server)


def sse_events(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of an SSE body; comments (keep-alives) left out."""
    events = []
    for block in raw.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        name = next((line[len("event: ") :] for line in lines if line.startswith("event: ")), None)
        data = "\n".join(line[len("data: ") :] for line in lines if line.startswith("data: "))
        events.append((name, data))
    return events
