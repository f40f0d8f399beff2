"""Our forward pass against transformers' DeepseekV4ForCausalLM on the same random weights.

Each model is a random float32 transformers checkpoint (every tensor random, see
``tests/models.py``), converted by ``ds4 convert --type f32``. transformers implements none of
the official quantisation simulation, so ours runs with it off.
"""

from __future__ import annotations

import pytest
import torch
from models import CSA, HCA, SLIDING, tiny_hf_config
from transformers import DeepseekV4ForCausalLM

from dwarfstar.model.model import Model

TOLERANCE = 1e-4
LONG = 600

CONFIGS = {
    # window-only, ratio 4 with indexer (top-k 4 of up to 150 rows), ratio 128; hash routing on
    # the first two layers; YaRN on the compressed ones.
    "mixed": tiny_hf_config(),
    # hash routing on ratio-128 and ratio-4 layers, a wider rope, more indexer picks.
    "hashed": tiny_hf_config(
        num_hidden_layers=3,
        layer_types=[HCA, CSA, SLIDING],
        mlp_layer_types=["hash_moe", "hash_moe", "moe"],
        head_dim=128,
        qk_rope_head_dim=64,
        index_topk=16,
    ),
}

_reference: dict[tuple[str, int], torch.Tensor] = {}
_models: dict[str, Model] = {}


def tokens(length: int) -> torch.Tensor:
    return torch.randint(0, 129280, (length,), generator=torch.Generator().manual_seed(length))


@pytest.fixture
def setup(hf_checkpoint_factory, gguf_model_factory):
    def get(name: str, length: int) -> tuple[Model, torch.Tensor, torch.Tensor]:
        if (name, length) not in _reference:
            path = hf_checkpoint_factory(name, CONFIGS[name])
            hf = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            with torch.no_grad():
                _reference[name, length] = hf(tokens(length)[None], use_cache=False).logits[0]
        if name not in _models:
            _models[name] = Model.load(gguf_model_factory(name, CONFIGS[name]), quant_sim=False)
        return _models[name], tokens(length), _reference[name, length]

    return get


def max_error(model: Model, ids: torch.Tensor, reference: torch.Tensor, chunk: int | None) -> float:
    logits = model.prefill(ids, model.new_session(), chunk)
    assert logits.shape == reference.shape
    return (logits - reference).abs().max().item()


@pytest.mark.parametrize("length", [1, 5, 130, LONG])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_pass_matches_transformers(setup, name, length):
    model, ids, reference = setup(name, length)
    assert reference.abs().max() > 1, "logits should be well away from zero for a meaningful check"
    assert max_error(model, ids, reference, None) <= TOLERANCE


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize(("name", "length"), [("mixed", 130), ("mixed", LONG), ("hashed", LONG)])
def test_chunked_prefill_matches_transformers(setup, name, length, chunk):
    model, ids, reference = setup(name, length)
    assert max_error(model, ids, reference, chunk) <= TOLERANCE


def test_indexer_really_selects(setup):
    """The long check is only meaningful if top-k is smaller than the visible rows."""
    model, _, _ = setup("mixed", LONG)
    assert model.config.index_topk < LONG // 4
    assert [model.config.ratio(i) for i in range(model.config.n_layer)] == [0, 4, 128, 4]
    assert model.config.hash_routed(1) and not model.config.hash_routed(2)


@pytest.mark.parametrize("chunk", [None, 64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_query_blocks_for_long_contexts_match_transformers(setup, monkeypatch, name, chunk):
    """With a small score budget, attention and indexer run in blocks of queries, as they do at
    long context on the real model; the result must not change."""
    from dwarfstar.model import attention

    model, ids, reference = setup(name, LONG)
    monkeypatch.setattr(attention, "_SCORE_BUDGET", 20_000)
    assert attention._query_block(LONG, model.config.n_head, model.config.window, 0) < 64
    assert max_error(model, ids, reference, chunk) <= TOLERANCE
