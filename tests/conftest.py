"""Shared fixtures; puts tests/ on sys.path so tests can ``from models import ...``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# The test models are tiny: one thread avoids fork-join overhead that dominates their small
# operations (ten times slower on two busy cores). Subprocesses inherit it through the env.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
# Without CUDA the Triton kernels run in Triton's interpreter on the CPU (tests/quant/
# test_triton_kernels.py). Triton reads this when it is first imported, which `models` may do.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from models import converted_gguf, hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def gguf_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make(name, config, type="f32", seed=0) -> Path``: a converted tiny model, once per session."""

    def make(name: str, config: object, type: str = "f32", seed: int = 0) -> Path:
        return converted_gguf(tmp_path_factory, name, config, type, seed)

    return make


@pytest.fixture(scope="session")
def hf_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make(name, config, seed=0) -> Path``: a saved random transformers checkpoint, once per session."""

    def make(name: str, config: object, seed: int = 0) -> Path:
        return hf_checkpoint(tmp_path_factory, name, config, seed)

    return make


@pytest.fixture(scope="session", autouse=True)
def ds4_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache directory (the ``--demo`` model) for this test session, never the user's own."""
    path = tmp_path_factory.mktemp("ds4-cache")
    os.environ["DS4_CACHE_DIR"] = str(path)  # subprocesses inherit it
    return path
