"""The Triton kernels inside the model: a small model in ds4's q2 recipe gives the same logits
through them as through the compiled CPU kernels.

On a CUDA machine the model runs on the GPU through the kernels registered for CUDA tensors.
Elsewhere the kernels are registered for CPU tensors and run in Triton's interpreter (tests/
conftest.py sets TRITON_INTERPRET=1 without CUDA), so this exercises, as a GPU would, the
registry lookup, the grouped expert path (routed experts sharing one input row; one row per
slot for the down projections and the attention's output groups) and the GEMM kernel of
prefill (in float32). Both sides sum in float32 in different orders: the logits agree to 1e-4 of
their largest magnitude.
"""

from __future__ import annotations

import json

import pytest
import torch
from models import byte_tokenizer_json

from dwarfstar import quant
from dwarfstar.convert.recipe import recipe_kind
from dwarfstar.model.config import ModelConfig
from dwarfstar.model.model import Model
from dwarfstar.synthetic.models import write_random_model

triton_kernels = pytest.importorskip("dwarfstar.quant.triton.kernels", reason="triton is a test dependency")

CONFIG = ModelConfig(
    n_layer=3, dim=256, vocab_size=260, n_head=4, head_dim=128, value_dim=128, rope_dim=64,
    q_lora_rank=256, o_lora_rank=128, o_groups=2, n_expert=4, n_expert_used=2, expert_ff=256,
    n_hash_layer=1, index_n_head=4, index_head_dim=64, index_topk=4, compress_ratios=(0, 4, 128),
    swiglu_limit=(10.0,) * 3,
)  # fmt: skip


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("triton-model")
    tokenizer = directory / "tokenizer.json"
    tokenizer.write_text(json.dumps(byte_tokenizer_json()))
    return write_random_model(
        directory / "q2.gguf", CONFIG, lambda n, s: recipe_kind("q2", n, s), seed=3, tokenizer_json=tokenizer
    )


def run(model: Model) -> torch.Tensor:
    """A 5-token prefill (a ratio-4 window completes), then a decode step: the logits of both."""
    session = model.new_session()
    prefill = model.forward(torch.arange(10, 15), session)
    return torch.cat([prefill, model.forward(torch.tensor([7]), session)])


def test_triton_kernels_in_the_model_match_the_cpu_kernels(path, monkeypatch):
    monkeypatch.setattr(triton_kernels, "GEMM_PRECISION", "ieee")  # a GPU's default is tf32
    expected = run(Model.load(path, quant_sim=False))
    if torch.cuda.is_available():  # compiled Triton can only read device memory
        ours = run(Model.load(path, quant_sim=False, device="cuda")).cpu()
    else:
        for kind in quant.triton_kernels.KINDS:
            monkeypatch.setitem(quant.LINEAR_KERNELS, ("cpu", kind), triton_kernels.linear)
            monkeypatch.setitem(quant.EXPERT_KERNELS, ("cpu", kind), triton_kernels.expert_linear)
        ours = run(Model.load(path, quant_sim=False))
    scale = expected.abs().max()
    assert (ours - expected).abs().max() <= 1e-4 * scale
