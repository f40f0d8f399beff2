"""``--demo``: the demo model is built once, in the cache directory, and every model command runs it."""

from __future__ import annotations

import json
import subprocess
import sys

from dwarfstar.model.model import Model
from dwarfstar.synthetic import demo_model_path
from dwarfstar.synthetic.demo import cache_dir
from dwarfstar.synthetic.models import DEMO_CONFIG

CODE = "import sys; from dwarfstar.cli.main import main; sys.exit(main())"


def ds4(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CODE, *args], capture_output=True, text=True, cwd=cwd)


def test_the_demo_is_built_once_in_the_cache_directory(ds4_cache_dir):
    path = demo_model_path()
    assert path.parent == ds4_cache_dir and path.suffix == ".gguf"
    built = path.stat().st_mtime_ns
    assert demo_model_path() == path and path.stat().st_mtime_ns == built
    assert [p.name for p in ds4_cache_dir.iterdir() if p.name.startswith("demo-")] == [path.name]
    config = Model.load(path).config  # all layer kinds and hash routing, the real vocabulary
    assert (config.compress_ratios, config.n_hash_layer, config.vocab_size) == (
        DEMO_CONFIG.compress_ratios,
        DEMO_CONFIG.n_hash_layer,
        DEMO_CONFIG.vocab_size,
    )
    assert set(config.compress_ratios) == {0, 4, 128} and config.n_hash_layer >= 1


def test_the_cache_follows_xdg_and_the_override(monkeypatch, tmp_path):
    monkeypatch.delenv("DS4_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "dwarfstar"
    monkeypatch.setenv("DS4_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_model_commands_run_the_demo_and_leave_the_working_directory_alone(tmp_path):
    demo_model_path()  # built once for the session
    result = ds4("logprobs", "--demo", "--prompt", "Hello", "-n", "2", "--top-k", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["steps"]) <= 2
    assert "building" not in result.stderr  # already built, and quiet when piped anyway

    logits = ds4("logits", "--demo", cwd=tmp_path)
    assert logits.returncode == 0, logits.stderr
    assert "top-5 next tokens" in logits.stdout and str(cache_dir()) in logits.stdout

    (tmp_path / "text.txt").write_text("The world was all before them, where to choose.", encoding="utf-8")
    perplexity = ds4("perplexity", "--demo", "text.txt", "--skip", "2", cwd=tmp_path)
    assert perplexity.returncode == 0, perplexity.stderr
    assert "ppl=" in perplexity.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]


def test_demo_and_a_model_file_exclude_each_other(tmp_path):
    result = ds4("logprobs", "--demo", "-m", "x.gguf", "--prompt", "Hi", cwd=tmp_path)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


def test_building_the_demo_prints_nothing_when_stderr_is_not_a_terminal(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("DS4_CACHE_DIR", str(tmp_path))
    path = demo_model_path()
    assert path.parent == tmp_path and path.exists()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # no note, no progress bar in a log
