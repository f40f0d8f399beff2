"""Memory bounds at Flash's attention widths: no tensor a long prompt's chunk allocates exceeds the budget.

The model has Flash's attention shape (64 heads of 512 with 64 rope dims, a 128-token window,
an indexer of 64 heads of 128 picking 512 rows) and a small everything-else. Its session is
given the state of a 2048-token context directly (random rows stand in for the ones a prefill
would compute), so that a 512-token chunk sees the full top-512 of the indexer without the
cost of computing 2048 tokens first.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dwarfstar.model import attention
from dwarfstar.model.config import ModelConfig
from dwarfstar.model.model import Model
from dwarfstar.synthetic.models import uniform_policy, write_random_model

FLASH_ATTENTION = ModelConfig(
    n_layer=3,
    dim=256,
    n_head=64,
    head_dim=512,
    value_dim=512,
    rope_dim=64,
    q_lora_rank=64,
    o_lora_rank=64,
    o_groups=8,
    n_expert=2,
    n_expert_used=1,
    expert_ff=64,
    n_hash_layer=0,
    window=128,
    index_n_head=64,
    index_head_dim=128,
    index_topk=512,
    compress_ratios=(0, 4, 128),
    swiglu_limit=(10.0,) * 3,
)
CONTEXT = 2048
CHUNK = 512
BUDGET_BYTES = 4 * (1 << 25)  # 32M float32 values, the budget docs/model.md states


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any operation allocates (views and in-place results excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes, self.where = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view, or an in-place / out= result: no new storage
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() > self.nbytes:
                self.nbytes = tensor.untyped_storage().nbytes()
                self.where = (str(func), tuple(tensor.shape))
        return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    path = tmp_path_factory.mktemp("memory") / "flash-attention.gguf"
    write_random_model(path, FLASH_ATTENTION, uniform_policy(T.Q8_0))
    return Model.load(path, quant_sim=True)


def session_at(model: Model, n_tokens: int):
    """A session holding the state of ``n_tokens`` random tokens (window, compressed rows)."""
    c = model.config
    g = torch.Generator().manual_seed(0)
    session = model.new_session()
    for i, state in enumerate(session.layers):
        state.window.append(torch.randn(c.window - 1, c.head_dim, generator=g))
        ratio = c.ratio(i)
        if ratio:
            state.compressor.append_rows(torch.randn(n_tokens // ratio, c.head_dim, generator=g))
        if ratio == 4:
            state.indexer.append_rows(torch.randn(n_tokens // ratio, c.index_head_dim, generator=g))
    session.n_tokens = n_tokens
    return session


def test_no_tensor_of_a_long_prompt_chunk_exceeds_the_budget(model):
    tokens = torch.randint(0, model.config.vocab_size, (CHUNK,), generator=torch.Generator().manual_seed(1))
    recorder = LargestAllocation()
    with recorder:
        logits = model.forward(tokens, session_at(model, CONTEXT), all_logits=False)
    assert bool(logits.isfinite().all())
    # Without the gather counted, a 256-query block gathers 256 x 512 x 512 values: twice this.
    assert recorder.nbytes <= BUDGET_BYTES, f"{recorder.nbytes / 2**20:.0f} MiB from {recorder.where}"
    assert recorder.nbytes > BUDGET_BYTES // 8  # the recorder does see the large temporaries


def test_query_blocks_count_the_gathered_rows():
    # Flash's CSA layer on a 512-token chunk: 128 window + 512 picked keys + the sink per query.
    block = attention._query_block(CHUNK, 64, 128 + 512 + 1, 512 * 512)
    assert block * 512 * 512 <= 1 << 25 and block * 64 * (block + 641) <= 1 << 25
    assert attention._query_block(CHUNK, 64, 128 + 1, 0) == CHUNK  # window-only: 21M scores fit
