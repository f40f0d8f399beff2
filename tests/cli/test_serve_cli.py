"""``ds4 serve`` refuses what it cannot serve before loading anything: exit status 2, a clear message."""

from __future__ import annotations

import subprocess
import sys

DS4 = [sys.executable, "-c", "import sys; from dwarfstar.cli.main import main; sys.exit(main())"]


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DS4, "serve", *args], capture_output=True, text=True, timeout=60)


def test_bad_options_and_a_missing_model_exit_2(tmp_path):
    result = serve("--ctx", "1", "-m", str(tmp_path / "m.gguf"))
    assert result.returncode == 2 and "--ctx must be at least 2" in result.stderr
    result = serve("--port", "70000", "-m", str(tmp_path / "m.gguf"))
    assert result.returncode == 2 and "--port" in result.stderr
    result = serve("-m", str(tmp_path / "missing.gguf"))
    assert (
        result.returncode == 2 and "no such model file" in result.stderr and "Traceback" not in result.stderr
    )


def test_a_public_host_without_a_key_warns(tmp_path):
    result = serve("--host", "0.0.0.0", "-m", str(tmp_path / "missing.gguf"))
    assert "warning: serving on 0.0.0.0 without --api-key" in result.stderr
    assert "warning" not in serve("--host", "127.0.0.1", "-m", str(tmp_path / "missing.gguf")).stderr
