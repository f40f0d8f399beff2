"""Our forward pass against llama.cpp's ``deepseek4`` graph, both reading the same f32 GGUF.

llama.cpp is an independent implementation of the architecture (its own compressor state
machine, indexer, hyper-connections and MoE routing), so agreement to float32 noise is strong
evidence that both follow DeepSeek's model. On its defaults llama.cpp only agrees to ~2e-3 at
128 tokens and ~5e-2 at 600 (logits of size ~6): it keeps the KV cache in f16 (the raw window
cache, the compressed ratio-4 / ratio-128 caches and the indexer's key cache are all ``type_k``),
and flash attention casts float32 K/V to f16 as well. With ``type_k = type_v = f32`` and flash
attention off, every tensor of its graph is float32 on the CPU backend (the compressor states are
always f32; the Hadamard rotation it applies to q/k and the indexer is orthogonal, hence exact up
to f32 rounding; masks hold only 0 / -inf), and the two engines agree to ~1e-5.

llama.cpp always rotates the indexer's keys with a Hadamard matrix, which it builds only for
powers of two from 64 up (a 32-wide indexer aborts the process); ``tiny_hf_config()`` has head
and indexer dims of 64.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from models import CSA, HCA, SLIDING, tiny_hf_config
from quant.llama_reference import llama_cpp_logits

from dwarfstar.model.model import Model

TOLERANCE = 1e-4
CONFIG = tiny_hf_config()  # layers: window only, ratio 4 (indexer top-k 4), ratio 128, ratio 4
WINDOW_ONLY, INDEXED, LONG = 3, 130, 600  # no compressed rows; 32 ratio-4 rows; 4 ratio-128 rows


def tokens(length: int) -> list[int]:
    ids = torch.randint(0, CONFIG.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
    return ids.tolist()


@pytest.fixture(scope="module")
def model_path(gguf_model_factory: Callable[..., Path]) -> Path:
    return gguf_model_factory("mixed", CONFIG, "f32")


def max_error(ours: torch.Tensor, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape
    assert np.abs(theirs).max() > 1, "logits should be well away from zero for a meaningful check"
    return float(np.abs(ours.numpy() - theirs).max())


@pytest.mark.parametrize("length", [WINDOW_ONLY, INDEXED, LONG])
def test_prefill_matches_llama_cpp(model_path: Path, length: int) -> None:
    ids = tokens(length)
    model = Model.load(model_path, quant_sim=False)
    ours = model.prefill(torch.tensor(ids), model.new_session())
    assert max_error(ours, llama_cpp_logits(model_path, ids, batch=length)) <= TOLERANCE


def test_chunked_prefill_matches_llama_cpp_ubatches(model_path: Path) -> None:
    """Both engines carry their caches and compressor states across 50-token pieces.

    50 is a multiple of neither ratio, so pieces end inside compression blocks; 260 tokens slide
    the 128-token window and complete two ratio-128 blocks.
    """
    ids = tokens(260)
    model = Model.load(model_path, quant_sim=False)
    ours = model.prefill(torch.tensor(ids), model.new_session(), chunk=50)
    assert max_error(ours, llama_cpp_logits(model_path, ids, batch=50)) <= TOLERANCE


def test_lengths_cover_every_attention_kind() -> None:
    """The checks above are only meaningful if each layer kind really works at those lengths."""
    assert CONFIG.layer_types == [SLIDING, CSA, HCA, CSA]
    assert CONFIG.compress_rates == {CSA: 4, HCA: 128}
    assert WINDOW_ONLY < 4 and CONFIG.sliding_window < LONG
    assert CONFIG.index_topk < INDEXED // 4  # the indexer picks a strict subset of the rows
    assert LONG // 128 >= 2
    assert CONFIG.head_dim % 64 == 0 and CONFIG.index_head_dim % 64 == 0
