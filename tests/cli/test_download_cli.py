"""``ds4 download`` against a stand-in Hub (``tests/hub.py``) reached through ``HF_ENDPOINT``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hub import Hub
from terminal import run_with_terminal_stderr

from dwarfstar.cli.download import FILES, REPO

CHUNK = 10 * 1024 * 1024  # huggingface_hub writes what it receives in pieces of this size
CODE = "import sys; from dwarfstar.cli.main import main; sys.exit(main())"


@pytest.fixture
def hub():
    with Hub() as hub:
        yield hub


def content(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def environment(hub: Hub, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DS4_"))}
    return env | {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}


def ds4_download(hub: Hub, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CODE, "download", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment(hub, cwd),
        timeout=120,
    )


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.part")) if directory.exists() else []


def test_downloads_the_file_and_links_the_default_model(hub, tmp_path):
    data = content(300_000)
    hub.add(REPO, FILES["q2-imatrix"], data)
    result = ds4_download(hub, tmp_path, "q2-imatrix")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "gguf" / FILES["q2-imatrix"]).read_bytes() == data
    link = tmp_path / "ds4flash.gguf"
    assert link.is_symlink() and link.read_bytes() == data
    assert "\r" not in result.stderr  # piped: no progress bar
    assert leftovers(tmp_path / "gguf") == []

    again = ds4_download(hub, tmp_path, "q2-imatrix")
    assert again.returncode == 0 and "already complete" in again.stderr
    assert len(hub.file_requests()) == 1  # nothing fetched the second time


def test_progress_shows_on_a_terminal(hub, tmp_path):
    hub.add(REPO, FILES["mtp"], content(200_000))
    status, _, terminal = run_with_terminal_stderr(
        [sys.executable, "-c", CODE, "download", "mtp"], cwd=tmp_path, env=environment(hub, tmp_path)
    )
    assert status == 0, terminal
    assert FILES["mtp"][:20] in terminal and "100%" in terminal


def test_a_run_interrupted_mid_file_resumes_in_the_next_run(hub, tmp_path):
    data = content(2 * CHUNK + 12345, seed=1)
    name = FILES["q4-imatrix"]
    hub.add(REPO, name, data)
    hub.hold_after = CHUNK + 5000  # the transfer stalls there, as on a dead network
    env = environment(hub, tmp_path) | {"DS4_GGUF_DIR": str(tmp_path / "models")}
    first = subprocess.Popen(
        [sys.executable, "-c", CODE, "download", "q4-imatrix", "--no-link"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell without job control starts background jobs with SIGINT ignored; Ctrl-C must work.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert hub.holding.wait(60), "the download never started"
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size >= CHUNK for p in (tmp_path / "models").glob("*.part")):
            assert time.monotonic() < deadline and first.poll() is None, "no bytes reached the disk"
            time.sleep(0.05)
        first.send_signal(signal.SIGINT)  # the user gives up: Ctrl-C
        _, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
        hub.release()
    assert first.returncode == 130 and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "models" / name).exists()  # nothing half-written under the final name
    [partial] = (tmp_path / "models").glob("*.part")
    kept = partial.stat().st_size
    assert kept >= CHUNK and partial.read_bytes() == data[:kept]

    second = subprocess.run(
        [sys.executable, "-c", CODE, "download", "q4-imatrix", "--no-link"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert second.returncode == 0, second.stderr
    assert f"resuming {name} at {kept:,}" in second.stderr
    assert hub.file_requests()[-1].range == f"bytes={kept}-"
    assert (tmp_path / "models" / name).read_bytes() == data
    assert leftovers(tmp_path / "models") == [] and not (tmp_path / "ds4flash.gguf").exists()


def test_a_dropped_connection_resumes_within_the_run(hub, tmp_path):
    data = content(CHUNK + 70_000, seed=2)
    hub.add(REPO, FILES["mtp"], data)
    hub.cuts = [CHUNK + 1000]  # the first transfer ends early
    result = ds4_download(hub, tmp_path, "mtp")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "gguf" / FILES["mtp"]).read_bytes() == data
    assert [r.range for r in hub.file_requests()] == [None, f"bytes={CHUNK}-"]
    assert not (tmp_path / "ds4flash.gguf").exists()  # the draft head is not a model to link


def test_the_token_goes_to_the_hub_and_never_to_the_cdn(hub, tmp_path):
    hub.add(REPO, FILES["mtp"], b"draft head")
    env = environment(hub, tmp_path) | {"HF_TOKEN": "hf_stand_in_token"}
    result = subprocess.run(
        [sys.executable, "-c", CODE, "download", "mtp"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    [head] = [r for r in hub.requests if r.method == "HEAD"]
    assert head.authorization == "Bearer hf_stand_in_token"
    assert [r.authorization for r in hub.file_requests()] == [None]


def test_a_missing_file_is_a_clear_error_and_leaves_nothing(hub, tmp_path):
    hub.add(REPO, "README.md", b"hello")
    result = ds4_download(hub, tmp_path, "q2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{REPO} has no file {FILES['q2']}" in result.stderr
    assert not (tmp_path / "gguf" / FILES["q2"]).exists() and leftovers(tmp_path / "gguf") == []
    assert not (tmp_path / "ds4flash.gguf").exists()


def test_not_enough_free_space_stops_before_downloading(hub, tmp_path):
    hub.add(REPO, FILES["q4"], b"x" * 1000)
    hub.advertised_size[FILES["q4"]] = 10**18  # an exabyte: no disk here has it
    result = ds4_download(hub, tmp_path, "q4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "needs 1000000000.0 GB more" in result.stderr and "free" in result.stderr
    assert hub.file_requests() == []


def test_an_unreachable_hub_is_a_clear_error(tmp_path):
    class Closed:
        endpoint = "http://127.0.0.1:9"  # the discard port: nothing listens there

    result = ds4_download(Closed(), tmp_path, "q2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot reach http://127.0.0.1:9" in result.stderr


def test_a_real_file_under_the_default_name_is_left_alone(hub, tmp_path):
    hub.add(REPO, FILES["q2"], b"gguf bytes")
    (tmp_path / "ds4flash.gguf").write_bytes(b"mine")
    result = ds4_download(hub, tmp_path, "q2")
    assert result.returncode == 0, result.stderr
    assert "is a file, not a link" in result.stderr
    assert (tmp_path / "ds4flash.gguf").read_bytes() == b"mine"


SHARDED = "someone/Flash-GGUF"


def test_a_repo_download_fetches_the_matching_files_and_links_a_split_model(hub, tmp_path):
    shards = {f"Q2/flash-0000{i}-of-00002.gguf": content(50_000 + i, seed=i) for i in (1, 2)}
    for name, data in shards.items():
        hub.add(SHARDED, name, data)
    hub.add(SHARDED, "Q4/flash-Q4.gguf", b"q4 bytes")
    hub.add(SHARDED, "README.md", b"read me")
    result = ds4_download(hub, tmp_path, SHARDED, "--include", "Q2/*")
    assert result.returncode == 0, result.stderr
    for name, data in shards.items():
        assert (tmp_path / "gguf" / name).read_bytes() == data
    assert not (tmp_path / "gguf" / "Q4").exists() and not (tmp_path / "gguf" / "README.md").exists()
    link = tmp_path / "ds4flash.gguf"
    assert link.resolve() == (tmp_path / "gguf" / "Q2" / "flash-00001-of-00002.gguf").resolve()

    every_model = ds4_download(hub, tmp_path, SHARDED, "--dir", "all")  # default: every *.gguf
    assert every_model.returncode == 0, every_model.stderr
    assert sorted(p.name for p in (tmp_path / "all").rglob("*.gguf")) == [
        "flash-00001-of-00002.gguf",
        "flash-00002-of-00002.gguf",
        "flash-Q4.gguf",
    ]
    assert "open one with -m FILE" in every_model.stderr
    assert link.resolve().parent == (tmp_path / "gguf" / "Q2").resolve()  # left as it was


def test_repo_download_errors(hub, tmp_path):
    hub.add(SHARDED, "flash.gguf", b"x" * 100)
    hub.advertised_size["flash.gguf"] = 10**18
    cases = [
        ([SHARDED, "--include", "*.safetensors"], "no file of someone/Flash-GGUF matches *.safetensors"),
        (["nobody/none"], "no repository nobody/none"),
        ([SHARDED], "needs 1000000000.0 GB more"),
        (["q3"], "unknown target 'q3'"),
        (["q2", "--include", "*.gguf"], "--include goes with a repo"),
    ]
    for args, message in cases:
        result = ds4_download(hub, tmp_path, *args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert hub.file_requests() == []
