"""``ds4 kv ls|inspect|rm``, run as a user runs it, on a directory a disk cache wrote."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from models import tiny_hf_config

from dwarfstar.engine.diskcache import DiskCache, text_key
from dwarfstar.engine.kvfile import Snapshot
from dwarfstar.model.model import Model

DS4 = [sys.executable, "-c", "import sys; from dwarfstar.cli.main import main; sys.exit(main())"]


def ds4(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*DS4, *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def cache_dir(gguf_model_factory, tmp_path_factory):
    model = Model.load(gguf_model_factory("mixed", tiny_hf_config()), quant_sim=False)
    directory = tmp_path_factory.mktemp("kv")
    cache = DiskCache(directory, model, 1 << 30, min_tokens=1)
    for i, text in enumerate(("first conversation", "second conversation")):
        tokens = list(range(100 + i, 130 + i))
        state = model.new_session()
        logits = model.forward(torch.tensor(tokens), state, all_logits=False)[0]
        assert cache.save(Snapshot(state, tokens, text, logits), "prompt")
    (directory / ("f" * 40 + ".kv")).write_bytes(b"DS4KVSNP broken")
    return directory


def test_ls_lists_every_snapshot_and_flags_bad_ones(cache_dir):
    result = ds4("kv", "ls", cache_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "tokens", "size"]
    assert any(
        text_key("first conversation")[:12] in line and "30" in line and "'first conversation'" in line
        for line in lines
    )
    assert any(line.startswith("f" * 12) and "invalid" in line for line in lines)
    assert lines[-1].startswith("3 snapshots")


def test_inspect_checks_the_file_and_prints_its_header(cache_dir):
    good = cache_dir / (text_key("second conversation") + ".kv")
    result = ds4("kv", "inspect", good)
    assert result.returncode == 0, result.stderr
    assert (
        "checksum ok" in result.stdout
        and "tokens:    30" in result.stdout
        and "hits:      0" in result.stdout
    )
    assert "'second conversation'" in result.stdout and '"reason": "prompt"' in result.stdout
    bad = ds4("kv", "inspect", cache_dir / ("f" * 40 + ".kv"))
    assert bad.returncode == 2 and "not a usable snapshot" in bad.stderr and "Traceback" not in bad.stderr


def test_rm_removes_by_name_prefix_or_all(cache_dir, tmp_path):
    for path in cache_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    first = text_key("first conversation")
    assert ds4("kv", "rm", tmp_path, first[:8]).stdout.strip() == "removed 1 snapshots"
    assert not (tmp_path / f"{first}.kv").exists() and len(list(tmp_path.glob("*.kv"))) == 2
    missing = ds4("kv", "rm", tmp_path, "0123abcd")
    assert missing.returncode == 2 and "no snapshot" in missing.stderr
    assert ds4("kv", "rm", tmp_path, "--all").returncode == 0 and not list(tmp_path.glob("*.kv"))
    assert ds4("kv", "ls", tmp_path / "nowhere").returncode == 2
