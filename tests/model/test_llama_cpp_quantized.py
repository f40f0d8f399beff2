"""Files made by llama.cpp's own quantizer (``llama_model_quantize``) from an f32 model load and
compute what they store.

Each recipe's file must give the logits of its dequantized F32 copy (<= 1e-4: the only difference
is where the dequantization happens), and the logits llama.cpp computes from the same file within
the tolerance explained at ``LLAMA_CPP_TOLERANCE``. The per-layer mix sets a format per tensor
pattern (``tt_overrides``): gate and up experts differ, the routed down projection changes between
layers, and sixteen formats appear in one file. Split into three shards, that file computes the
same logits as whole, in our engine and in llama.cpp.
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from models import dequantized_twin, split_gguf, tiny_hf_config, truncate_vocabulary
from quant import llama_reference

from dwarfstar.cli.main import main
from dwarfstar.gguf.shards import GGUFModel
from dwarfstar.model.model import Model
from dwarfstar.quant import cpu

# Every matrix row a whole number of 256-value blocks, so that the K and IQ formats apply (llama.cpp
# falls back to other formats for rows that are not); head and indexer dims powers of two for its
# Hadamard rotation. A 4096-token vocabulary keeps the embedding and output small.
CONFIG = tiny_hf_config(
    hidden_size=256,
    q_lora_rank=256,
    num_attention_heads=8,
    head_dim=64,
    o_groups=2,
    o_lora_rank=128,
    moe_intermediate_size=256,
    index_n_heads=8,
)
N_VOCAB = 4096
TOKENS = torch.randint(0, N_VOCAB, (20,), generator=torch.Generator().manual_seed(7)).tolist()

# recipe -> (llama.cpp file type, formats its file must hold)
RECIPES = {
    "Q2_K": ("Q2_K", {T.Q2_K, T.Q3_K}),
    "Q3_K_M": ("Q3_K_M", {T.Q3_K, T.Q4_K}),
    "Q4_K_M": ("Q4_K_M", {T.Q4_K, T.Q6_K}),
    "Q5_K_M": ("Q5_K_M", {T.Q5_K, T.Q6_K}),
    "Q6_K": ("Q6_K", {T.Q6_K}),
    "Q4_0": ("Q4_0", {T.Q4_0}),
    "IQ4_XS": ("IQ4_XS", {T.IQ4_XS}),
    "mixed": ("Q4_K_M", set()),  # formats checked in test_the_mixed_file_mixes
}
# The per-layer mix: (tensor-name pattern, format), the first match wins.
MIX = (
    (r"blk\.[01]\.ffn_down_exps", T.Q2_K),
    (r"blk\.[23]\.ffn_down_exps", T.IQ4_XS),
    (r"ffn_gate_exps", T.Q4_K),
    (r"ffn_up_exps", T.Q5_K),
    (r"attn_q_a\.", T.Q3_K),
    (r"attn_q_b", T.IQ3_S),
    (r"attn_kv\.", T.IQ4_NL),
    (r"attn_output_a", T.MXFP4),
    (r"attn_output_b", T.Q8_0),
    (r"ffn_gate_shexp", T.Q5_1),
    (r"ffn_up_shexp", T.Q4_1),
    (r"ffn_down_shexp", T.TQ2_0),
    (r"hc_.*_fn", T.BF16),
)

# llama.cpp rounds the activations to 8 bits (Q8_K or Q8_0 blocks) before every product with a
# quantized weight; on f32 weights the two engines agree to 5e-6 (test_llama_cpp.py), on these
# files that rounding moves every position's logits (std ~1) by ~0.1 (largest difference per
# position) and now and then flips a top-k choice (an expert, a compressed row), which moves that
# position by ~1-1.6. So: the median position within LLAMA_CPP_TOLERANCE, at most a quarter of the
# positions beyond FLIPPED, none beyond FLIP_TOLERANCE. A decoding error in one format moves every
# position by ~1 (and the formats' decoding is checked bit for bit against ggml elsewhere).
LLAMA_CPP_TOLERANCE = 0.3
FLIPPED, FLIP_TOLERANCE = 0.6, 2.5
TWIN_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def f32_model(gguf_model_factory, tmp_path_factory) -> Path:
    converted = gguf_model_factory("quantizable", CONFIG, "f32")
    return truncate_vocabulary(converted, tmp_path_factory.mktemp("quantized") / "f32.gguf", N_VOCAB)


_FILES: dict[str, Path] = {}


def quantized(f32_model: Path, recipe: str) -> Path:
    """llama.cpp's ``recipe`` of ``f32_model``, made once."""
    if recipe not in _FILES:
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # the quantizer's progress log
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{RECIPES[recipe][0]}")
        params.nthread = 2
        if recipe == "mixed":
            overrides = (llama_cpp.llama_model_tensor_override * (len(MIX) + 1))()  # ends with a null pattern
            for override, (pattern, kind) in zip(overrides, MIX, strict=False):
                override.pattern, override.type = pattern.encode(), int(kind)
            params.tt_overrides = ctypes.cast(
                overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override)
            )
        out = f32_model.with_name(f"{recipe}.gguf")
        assert (
            llama_cpp.llama_model_quantize(str(f32_model).encode(), str(out).encode(), ctypes.byref(params))
            == 0
        )
        _FILES[recipe] = out
    return _FILES[recipe]


def llama_cpp_logits(path: Path) -> np.ndarray:
    return llama_reference.llama_cpp_logits(path, TOKENS, batch=len(TOKENS))


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_llama_cpp_quantized_file(f32_model: Path, recipe: str) -> None:
    path = quantized(f32_model, recipe)
    kinds = collections.Counter(info.kind for info in GGUFModel(path).tensors.values())
    assert RECIPES[recipe][1] <= set(kinds), kinds
    model = Model.load(path, quant_sim=False)
    ours = model.prefill(torch.tensor(TOKENS), model.new_session())
    twin = dequantized_twin(model)
    torch.testing.assert_close(
        ours, twin.prefill(torch.tensor(TOKENS), twin.new_session()), rtol=0, atol=TWIN_TOLERANCE
    )

    theirs = llama_cpp_logits(path)
    assert theirs.std() > 0.5  # logits well away from zero
    largest = np.abs(ours.numpy() - theirs).max(axis=1)
    assert np.median(largest) <= LLAMA_CPP_TOLERANCE, largest
    assert (largest > FLIPPED).mean() <= 0.25 and largest.max() <= FLIP_TOLERANCE, largest


def test_the_mixed_file_mixes(f32_model: Path) -> None:
    tensors = GGUFModel(quantized(f32_model, "mixed")).tensors
    kinds = {name: info.kind for name, info in tensors.items()}
    assert kinds["blk.0.ffn_down_exps.weight"] == T.Q2_K and kinds["blk.3.ffn_down_exps.weight"] == T.IQ4_XS
    assert kinds["blk.2.ffn_gate_exps.weight"] == T.Q4_K and kinds["blk.2.ffn_up_exps.weight"] == T.Q5_K
    assert len(set(kinds.values())) >= 16


def test_split_into_three_shards_computes_as_the_single_file(f32_model: Path, tmp_path: Path) -> None:
    """llama.cpp's split format (written by gguf-py), opened from any shard, by us and by llama.cpp."""
    single = quantized(f32_model, "mixed")
    shards = split_gguf(single, tmp_path, 3)
    expected = Model.load(single, quant_sim=False)
    expected = expected.prefill(torch.tensor(TOKENS), expected.new_session())
    for shard in shards:
        model = Model.load(shard, quant_sim=False)
        assert len(model.file.shards) == 3
        torch.testing.assert_close(
            model.prefill(torch.tensor(TOKENS), model.new_session()), expected, rtol=0, atol=0
        )
    np.testing.assert_array_equal(llama_cpp_logits(shards[0]), llama_cpp_logits(single))


def run_info(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["info", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("recipe", ["Q4_K_M", "mixed"])
def test_ds4_info(f32_model: Path, recipe: str, capsys) -> None:
    """Formats, bytes and bytes per token as gguf-py's reader sees the file."""
    path = quantized(f32_model, recipe)
    status, out, _ = run_info(capsys, str(path), "--json")
    assert status == 0
    report = json.loads(out)
    tensors = gguf.GGUFReader(path).tensors
    histogram = collections.defaultdict(lambda: {"tensors": 0, "bytes": 0})
    per_token = 0
    for tensor in tensors:
        histogram[tensor.tensor_type.name]["tensors"] += 1
        histogram[tensor.tensor_type.name]["bytes"] += int(tensor.n_bytes)
        rows = int(tensor.shape[-1])  # gguf-py's shape is GGUF's (ne0, ne1, ...)
        if tensor.name in (
            "token_embd.weight",
            "blk.0.ffn_gate_tid2eid.weight",
            "blk.1.ffn_gate_tid2eid.weight",
        ):
            per_token += int(tensor.n_bytes) // rows
        elif "_exps." in tensor.name:
            per_token += int(tensor.n_bytes) * 2 // 8  # 2 of 8 experts
        else:
            per_token += int(tensor.n_bytes)
    assert report["formats"] == dict(histogram)
    assert report["bytes_per_token"] == per_token
    assert (report["layers"], report["experts"], report["vocabulary"], report["shards"]) == (
        4,
        8,
        N_VOCAB,
        [str(path)],
    )
    compiled = {kind.name for kind in cpu.kinds()}  # the compiled kernels, when built
    assert set(report["reference_path"]).isdisjoint(compiled)
    if recipe == "Q4_K_M":  # Q4_K matrices, Q6_K ones (the output), Q5_0 only for position biases
        assert set(report["reference_path"]) == {"Q4_K", "Q6_K"} - compiled
    else:
        assert {"IQ3_S", "TQ2_0", "MXFP4"} - compiled <= set(report["reference_path"])

    status, text, _ = run_info(capsys, str(path))
    assert status == 0 and "per token" in text and "kernels" in text
    assert all(kind in text for kind in histogram)


def test_ds4_info_on_shards(f32_model: Path, tmp_path: Path, capsys) -> None:
    single = quantized(f32_model, "Q4_K_M")
    shards = split_gguf(single, tmp_path, 3)
    whole = json.loads(run_info(capsys, str(single), "--json")[1])
    split = json.loads(run_info(capsys, str(shards[1]), "--json")[1])
    assert split["shards"] == [str(p) for p in shards]
    assert {k: v["tensors"] for k, v in split["formats"].items()} == {
        k: v["tensors"] for k, v in whole["formats"].items()
    }
    assert split["bytes_per_token"] == whole["bytes_per_token"]
    assert "shards        3: " in run_info(capsys, str(shards[2]))[1]
    shards[2].unlink()
    status, _, err = run_info(capsys, str(shards[0]))
    assert status == 2 and "missing" in err and shards[2].name in err and "Traceback" not in err
