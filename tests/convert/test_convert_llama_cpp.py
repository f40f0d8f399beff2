"""llama.cpp opens what ``ds4 convert`` writes, and computes transformers' logits from it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import llama_cpp
import numpy as np
import torch
from models import random_hf_model, tiny_hf_config

CONFIG = tiny_hf_config()  # head and indexer dims are multiples of 64, as llama.cpp needs
TOKENS = [0, 100, 200, 300, 400, 5000, 77, 12, 129279]


def test_llama_cpp_logits_match_transformers(gguf_model_factory: Callable[..., Path]) -> None:
    path = gguf_model_factory("mixed", CONFIG, "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
    assert llm.n_vocab() == 129280
    llm.eval(TOKENS)
    logits = np.array(llm.scores[: len(TOKENS)])
    with torch.no_grad():
        reference = random_hf_model(CONFIG, seed=0)(torch.tensor([TOKENS]), use_cache=False).logits[0]
    # llama.cpp keeps its KV cache in f16: agreement to ~1e-3 of logits of size ~5
    np.testing.assert_allclose(logits, reference.numpy(), atol=1e-2, rtol=0)
