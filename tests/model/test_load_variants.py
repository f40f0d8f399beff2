"""Files that differ from ds4's own in ways published files do: any type for any matrix,
llama.cpp's MTP blocks and metadata spellings. Each loads, and computes what its plain twin does."""

from __future__ import annotations

import dataclasses
import json
from itertools import cycle

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from models import dequantized_twin

from dwarfstar.cli.main import main
from dwarfstar.gguf.names import key, tensor_role
from dwarfstar.gguf.reader import GGUFFile
from dwarfstar.gguf.writer import GGUFFileWriter
from dwarfstar.model.config import load_config
from dwarfstar.model.model import Model
from dwarfstar.model.weights import WeightsError
from dwarfstar.quant.formats import BLOCK_DECODERS
from dwarfstar.synthetic.models import (
    DEMO_CONFIG,
    random_values,
    tensor_specs,
    uniform_policy,
    write_random_model,
)

# Most matrices' rows a whole number of 256-value blocks, so that every format fits somewhere.
CONFIG = dataclasses.replace(DEMO_CONFIG, n_expert=8, expert_ff=256, q_lora_rank=256, o_lora_rank=128)
TOKENS = [0, 17, 4242, 99, 128000, 3]


def rotating_policy():
    """Each matrix (and position bias) takes the least used format whose blocks fit its rows, so
    every format is used and neighbours (a layer's gate and up experts, one tensor in consecutive
    layers) differ; vectors rotate through the float formats."""
    uses = dict.fromkeys([T.F16, T.BF16, T.F32, *BLOCK_DECODERS], 0)
    vector_kinds = cycle([T.F16, T.BF16, T.F32])
    chosen: dict[str, T] = {}

    def policy(name: str, shape: tuple[int, ...]) -> T:
        role = tensor_role(name, len(shape))
        if role == "table":
            return T.I32
        if role == "vector" and len(shape) == 1:
            return next(vector_kinds)  # the compressors' 2-D position biases may be quantized
        fitting = [kind for kind in uses if shape[-1] % GGML_QUANT_SIZES[kind][0] == 0]
        kind = min(fitting, key=uses.__getitem__)
        uses[kind] += 1
        chosen[name] = kind
        return kind

    return policy, chosen


def logits(model: Model) -> torch.Tensor:
    out = model.prefill(torch.tensor(TOKENS), model.new_session())
    assert bool(out.isfinite().all())
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    policy, chosen = rotating_policy()
    path = write_random_model(tmp_path_factory.mktemp("mixed") / "mixed.gguf", CONFIG, policy)
    return path, chosen


def test_any_matrix_in_any_format(mixed):
    path, chosen = mixed
    assert set(chosen.values()) == {T.F16, T.BF16, T.F32, *BLOCK_DECODERS}
    assert chosen["blk.1.ffn_gate_exps.weight"] != chosen["blk.1.ffn_up_exps.weight"]
    assert chosen["blk.1.attn_q_a.weight"] != chosen["blk.2.attn_q_a.weight"]
    assert chosen["blk.1.attn_compressor_ape.weight"] not in (T.F32, T.F16, T.BF16)
    model = Model.load(path, quant_sim=False)
    torch.testing.assert_close(logits(model), logits(dequantized_twin(model)), rtol=0, atol=1e-4)


# ---- llama.cpp's spellings -------------------------------------------------------------------

SMALL = dataclasses.replace(
    DEMO_CONFIG,
    n_layer=3,
    dim=64,
    q_lora_rank=32,
    o_lora_rank=32,
    expert_ff=32,
    compress_ratios=(0, 4, 128),
    swiglu_limit=(10.0,) * 3,
)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A ds4-style file, its metadata, and its logits."""
    path = write_random_model(tmp_path_factory.mktemp("plain") / "plain.gguf", SMALL, uniform_policy(T.Q8_0))
    return path, GGUFFile(path).metadata, logits(Model.load(path, quant_sim=False))


def rewrite(path, metadata, config, extra_specs=()):
    """The plain model's tensors (same seed, same values) plus ``extra_specs``, under ``metadata``."""
    specs = [*tensor_specs(config, uniform_policy(T.Q8_0)), *extra_specs]
    rng = np.random.default_rng(0)
    with GGUFFileWriter(path, metadata, specs) as writer:
        for spec in specs:
            writer.write_tensor(spec.name, random_values(spec, config, rng))
    return path


def mtp_specs():
    """llama.cpp's MTP block after 3 layers: blk.3 with a layer's tensors (ratio 0) and its nextn.* extras."""
    with_block = dataclasses.replace(
        SMALL, n_layer=4, compress_ratios=(0, 4, 128, 0), swiglu_limit=(10.0,) * 4
    )
    block = [s for s in tensor_specs(with_block, uniform_policy(T.Q8_0)) if s.name.startswith("blk.3.")]
    d = SMALL.dim
    nextn = [("eh_proj.weight", (d, 2 * d)), ("enorm.weight", (d,)), ("hnorm.weight", (d,))]
    extras = [dataclasses.replace(block[0], name=f"blk.3.nextn.{n}", shape=shape) for n, shape in nextn]
    return [*block, *(dataclasses.replace(s, kind=T.F32 if len(s.shape) == 1 else T.Q8_0) for s in extras)]


def test_mtp_block_is_skipped_with_a_note(plain, tmp_path):
    path, metadata, expected = plain
    metadata = {
        **metadata,
        key("block_count"): 4,
        key("nextn_predict_layers"): 1,
        key("attention.compress_ratios"): [0, 4, 128, 0],
        key("swiglu_clamp_exp"): [10.0] * 4,
    }
    mtp = rewrite(tmp_path / "mtp.gguf", metadata, SMALL, mtp_specs())
    model = Model.load(mtp, quant_sim=False)
    assert model.config.n_layer == 3 and model.config.n_mtp_layer == 1
    assert len(model.weights.notes) == 1 and "multi-token-prediction" in model.weights.notes[0]
    assert "blk.3." in model.weights.notes[0]
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


def test_the_commands_print_the_note(plain, tmp_path, capsys):
    metadata = {
        **plain[1],
        key("block_count"): 4,
        key("nextn_predict_layers"): 1,
        key("attention.compress_ratios"): [0, 4, 128, 0],
        key("swiglu_clamp_exp"): [10.0] * 4,
    }
    mtp = rewrite(tmp_path / "mtp.gguf", metadata, SMALL, mtp_specs())
    (tmp_path / "ids.json").write_text(json.dumps(TOKENS))
    args = [
        "logits",
        "-m",
        str(mtp),
        "--tokens",
        str(tmp_path / "ids.json"),
        "--out",
        str(tmp_path / "l.npy"),
    ]
    assert main(args) == 0
    assert f"note: skipped {len(mtp_specs())} multi-token-prediction (MTP) tensors" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "l.npy"), plain[2].numpy())


def test_mtp_key_without_mtp_tensors_counts_no_mtp_block(plain, tmp_path):
    """As in llama.cpp: a file converted without its MTP tensors keeps the key; every block is a layer."""
    path, metadata, expected = plain
    metadata = {**metadata, key("nextn_predict_layers"): 1}
    model = Model.load(rewrite(tmp_path / "no-mtp.gguf", metadata, SMALL), quant_sim=False)
    assert model.config.n_layer == 3 and model.config.n_mtp_layer == 0 and not model.weights.notes
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


def test_llama_cpp_metadata_spellings(plain, tmp_path):
    """One swiglu clamp for every layer, no YaRN beta keys (llama.cpp's defaults are Flash's), and
    keys we do not read (llama.cpp's gating function, shared-expert clamp, chat template)."""
    path, metadata, expected = plain
    metadata = {k: v for k, v in metadata.items() if "yarn_beta" not in k}
    metadata |= {
        key("swiglu_clamp_exp"): 10.0,
        key("swiglu_clamp_shexp"): 10.0,
        key("expert_gating_func"): 4,
        key("leading_dense_block_count"): 0,
        "tokenizer.chat_template": "{{ messages }}",
        "general.file_type": 7,
    }
    model = Model.load(rewrite(tmp_path / "spellings.gguf", metadata, SMALL), quant_sim=False)
    assert model.config == load_config(path)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


def test_a_block_past_block_count_is_no_mtp_block_without_the_key(plain, tmp_path):
    """Without nextn_predict_layers, blk.3.* in a 3-layer file belongs to nothing: an error naming it."""
    path = rewrite(tmp_path / "extra-block.gguf", plain[1], SMALL, mtp_specs())
    with pytest.raises(WeightsError, match=r"27 tensor\(s\) that are no part of .*'blk\.3\."):
        Model.load(path)
