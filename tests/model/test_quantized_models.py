"""End to end on block-quantized files: ds4's 2-bit mix and every other supported type.

Real files are Q8_0, IQ2_XXS, Q2_K, F16 and more, not F32. Each model here is a random float32
model quantized by llama.cpp's own quantizer (so its weights are what a real quantized file
holds), then run two ways:

* against its own dequantized F32 copy (every stored matrix decoded by gguf-py, not by us):
  the quantized paths must compute what float32 math on the same weights computes, <= 1e-4;
* against llama.cpp on the same quantized file. llama.cpp rounds the activations before every
  quantized dot product (to Q8_0 or Q8_K, to f16 for F16 weights, to bf16 for BF16) while we
  multiply in float32, so the engines agree only to that rounding, amplified through the
  layers: measured on these models, at most 0.108 of a position's largest logit and 0.046 of
  the mean logit on average for the block types (0.066 and 0.036 for the q2 mix), 0.018 and
  0.010 for BF16, 0.009 and 0.006 for F16. The tolerances below are about 2.5 times that; a
  wrong decoder or a mis-bound tensor moves logits by their own size.

The model makes no discrete choice that such rounding could flip: every expert is used, and
the indexer's top-k covers every compressed row. Dimensions are multiples of 256 (the
K-quants' block); where a type does not fit a tensor (the 128-wide position biases), llama.cpp
picks its usual fallback.
"""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from models import byte_tokenizer_json, dequantized_twin
from quant.llama_reference import llama_cpp_logits, llama_quantize

from dwarfstar.convert.converter import stored_kind
from dwarfstar.gguf.reader import GGUFFile
from dwarfstar.model.config import ModelConfig
from dwarfstar.model.model import Model
from dwarfstar.quant import SUPPORTED_KINDS
from dwarfstar.synthetic.models import write_random_model

CONFIG = ModelConfig(
    n_layer=3, dim=256, vocab_size=260, n_head=4, head_dim=128, value_dim=128, rope_dim=64,
    q_lora_rank=256, o_lora_rank=128, o_groups=2, n_expert=2, n_expert_used=2, expert_ff=256,
    n_hash_layer=1, index_n_head=4, index_head_dim=64, index_topk=64, compress_ratios=(0, 4, 128),
    swiglu_limit=(10.0,) * 3,
)  # fmt: skip
TOKENS = 140  # 35 ratio-4 rows (all of them picked) and one ratio-128 row

# ds4's "IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8" file (docs/architecture.md §13.2): routed gate/up
# IQ2_XXS, routed down Q2_K, hyper-connections, compressors and indexer F16, the rest Q8_0; the
# source already holds the F16 embedding and router and the Q8_0 output, which llama.cpp keeps.
Q2_MIX = {
    r"ffn_(gate|up)_exps\.weight": T.IQ2_XXS,
    r"ffn_down_exps\.weight": T.Q2_K,
    r"(hc_|compressor|indexer)": T.F16,
}
MODELS = ["q2-mix"] + [kind.name for kind in SUPPORTED_KINDS if kind != T.F32]  # F32: test_llama_cpp

# Largest logit difference from llama.cpp, per position, as a fraction of that position's largest
# logit; and the mean difference as a fraction of the mean logit.
LLAMA_TOLERANCE = {"F16": (0.025, 0.015), "BF16": (0.05, 0.025)}
BLOCK_TOLERANCE = (0.25, 0.12)


def source_kind(name: str, shape: tuple[int, ...]) -> T:
    if name in ("token_embd.weight",) or name.endswith("ffn_gate_inp.weight"):
        return T.F16
    if name == "output.weight":
        return T.Q8_0
    return stored_kind(name, shape, T.F32)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """``make(name) -> Path``: the model quantized to ``name``, made once per module."""
    directory = tmp_path_factory.mktemp("quantized")
    tokenizer = directory / "tokenizer.json"
    tokenizer.write_text(json.dumps(byte_tokenizer_json()), encoding="utf-8")
    source = write_random_model(directory / "f32.gguf", CONFIG, source_kind, seed=1, tokenizer_json=tokenizer)
    # The IQ1/IQ2 quantizers need importance weights; uniform ones leave the plain error measure.
    imatrix = {
        name: np.ones(int(np.prod(info.shape[:-2], dtype=np.int64)) * info.shape[-1], np.float32)
        for name, info in GGUFFile(source).tensors.items()
        if len(info.shape) >= 2
    }
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            overrides = Q2_MIX if name == "q2-mix" else {r"blk\.": T[name]}
            out = directory / f"{name}.gguf"
            made[name] = llama_quantize(source, out, llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, overrides, imatrix)
        return made[name]

    return make


def stored_kinds(path: Path) -> set[str]:
    return {info.kind.name for info in GGUFFile(path).tensors.values()}


def prompt() -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (TOKENS,), generator=torch.Generator().manual_seed(0))


def test_the_q2_mix_has_ds4s_types(quantized):
    path = quantized("q2-mix")
    kinds = {name: info.kind for name, info in GGUFFile(path).tensors.items()}
    assert kinds["blk.1.ffn_gate_exps.weight"] == kinds["blk.1.ffn_up_exps.weight"] == T.IQ2_XXS
    assert kinds["blk.1.ffn_down_exps.weight"] == T.Q2_K
    assert kinds["blk.1.attn_q_b.weight"] == kinds["blk.1.ffn_down_shexp.weight"] == T.Q8_0
    assert kinds["output.weight"] == T.Q8_0
    for name in ("token_embd.weight", "blk.1.hc_attn_fn.weight", "blk.1.attn_compressor_kv.weight"):
        assert kinds[name] == T.F16
    assert kinds["blk.1.indexer.attn_q_b.weight"] == kinds["blk.1.ffn_gate_inp.weight"] == T.F16


@pytest.mark.parametrize("name", MODELS)
def test_quantized_model_matches_its_dequantized_copy(quantized, name):
    path = quantized(name)
    assert name == "q2-mix" or name in stored_kinds(path)
    model = Model.load(path, quant_sim=False)
    ours = model.prefill(prompt(), model.new_session())
    copy = dequantized_twin(model)
    assert copy.weights.layers[1].moe.gate.kind == T.F32
    reference = copy.prefill(prompt(), copy.new_session())
    assert reference.abs().max() > 1  # logits of a real size, so that 1e-4 means something
    assert float((ours - reference).abs().max()) <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_quantized_model_matches_llama_cpp(quantized, name):
    path = quantized(name)
    model = Model.load(path, quant_sim=False)
    ours = model.prefill(prompt(), model.new_session())
    theirs = torch.from_numpy(llama_cpp_logits(path, prompt().tolist(), batch=TOKENS))
    difference = (ours - theirs).abs()
    per_position, mean = LLAMA_TOLERANCE.get(name, BLOCK_TOLERANCE)
    worst = float((difference.amax(dim=-1) / ours.abs().amax(dim=-1)).max())
    assert worst <= per_position, f"{name}: a position's logits differ by {worst:.3g} of its largest"
    assert float(difference.mean() / ours.abs().mean()) <= mean
