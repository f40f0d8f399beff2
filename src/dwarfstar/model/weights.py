"""Binding a GGUF file to the model: every tensor found, checked and named once.

Matrices stay as :class:`QTensor` views over the memory-mapped file and are dequantized per
use by ``quant``; only small vectors (norms, biases, sinks, scales, tables) become float32
tensors here. Storage names (``blk.N.attn_q_a.weight``) do not leak past this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as T

from dwarfstar import quant
from dwarfstar.gguf.names import (
    EXPERT_TENSORS,
    global_shapes,
    is_mtp_tensor,
    layer_prefix,
    layer_shapes,
    tensor_role,
)
from dwarfstar.model.config import ModelConfig
from dwarfstar.model.hyper import HyperConnection
from dwarfstar.quant.formats import FLOAT_KINDS, SUPPORTED_KINDS
from dwarfstar.quant.tensor import QTensor

OPTIONAL = {"exp_probs_b.bias"}


class WeightsError(ValueError):
    """A tensor is missing or has the wrong shape or type."""


@dataclass
class Compressor:
    """Gated pooling of ``ratio`` tokens into one row (two overlapping halves when ratio is 4)."""

    ratio: int
    kv: QTensor  # (c·d, D)
    gate: QTensor  # (c·d, D)
    ape: torch.Tensor  # (ratio, c·d): learned gate bias by position inside the window
    norm: torch.Tensor  # (d,)


@dataclass
class Indexer:
    """The lightning indexer of ratio-4 layers: scores compressed rows for each query."""

    q_b: QTensor  # (heads·d, q_lora_rank)
    head_weights: QTensor  # (heads, D)
    compressor: Compressor


@dataclass
class Attention:
    q_a: QTensor
    q_norm: torch.Tensor
    q_b: QTensor
    kv: QTensor
    kv_norm: torch.Tensor
    sinks: torch.Tensor
    out_a: QTensor  # (groups, o_lora_rank, heads·head_dim / groups): one projection per head group
    out_b: QTensor
    compressor: Compressor | None
    indexer: Indexer | None


@dataclass
class MoE:
    router: QTensor  # (E, D)
    bias: torch.Tensor | None  # (E,) selection bias of score-routed layers
    hash_table: torch.Tensor | None  # (vocab, k) expert ids of hash-routed layers
    gate: QTensor  # (E, ff, D)
    up: QTensor  # (E, ff, D)
    down: QTensor  # (E, D, ff)
    shared_gate: QTensor
    shared_up: QTensor
    shared_down: QTensor


@dataclass
class Layer:
    attn_hc: HyperConnection
    attn_norm: torch.Tensor
    attn: Attention
    ffn_hc: HyperConnection
    ffn_norm: torch.Tensor
    moe: MoE


@dataclass
class Weights:
    config: ModelConfig
    embed: QTensor
    layers: list[Layer]
    head_hc: HyperConnection
    norm: torch.Tensor
    output: QTensor
    notes: list[str]  # what the file holds that the model does not use, for the user


# Vectors are float; the compressors' position biases, two-dimensional, are quantized by llama.cpp's
# recipes like any matrix (Q4_K_M stores them in Q5_0): they are dequantized once, at load.
_ALLOWED_KINDS = {
    "table": {T.I32},
    "vector": set(FLOAT_KINDS),
    "position bias": set(SUPPORTED_KINDS),
    "matrix": set(SUPPORTED_KINDS),
}


class _Binder:
    """Looks tensors up by name, checking presence, shape and type with clear messages."""

    def __init__(self, tensors: dict, path: str, n_expert: int) -> None:
        self.tensors = tensors
        self.path = path
        self.n_expert = n_expert
        self.bound: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...], *, optional: bool = False) -> QTensor | None:
        self.bound.add(name)
        info = self.tensors.get(name)
        if info is None:
            if optional:
                return None
            raise WeightsError(f"{self.path}: missing tensor {name!r}")
        if tuple(info.shape) != shape:
            raise WeightsError(
                f"{self.path}: tensor {name!r} has shape {list(info.shape)[::-1]} (GGUF order), "
                f"expected {list(shape)[::-1]}"
            )
        role = tensor_role(name, len(shape))
        allowed = _ALLOWED_KINDS["position bias" if role == "vector" and len(shape) > 1 else role]
        if info.kind not in allowed:
            names = ", ".join(sorted(k.name for k in allowed))
            raise WeightsError(
                f"{self.path}: tensor {name!r} has type {info.kind.name}, expected one of {names}"
            )
        if isinstance(info.data, torch.Tensor):  # made in torch, e.g. on a GPU (benchmarks/gpu_check.py)
            return QTensor(info.kind, tuple(info.shape), info.data)
        return QTensor.from_numpy(info.kind, tuple(info.shape), info.data)

    def dense(self, name: str, shape: tuple[int, ...], *, optional: bool = False) -> torch.Tensor | None:
        t = self.get(name, shape, optional=optional)
        if t is None:
            return None
        if t.kind != T.I32:
            return quant.dequantize(t)
        table = t.data.to(torch.long)
        if table.numel() and not (int(table.min()) >= 0 and int(table.max()) < self.n_expert):
            raise WeightsError(f"{self.path}: tensor {name!r} holds expert ids outside [0, {self.n_expert})")
        return table


def bind(config: ModelConfig, tensors: dict, path: str = "model") -> Weights:
    """Bind the file's tensors (``name -> TensorInfo`` with kind, shape, data) to the model.

    ``data`` is what gguf's reader gives (a numpy view of the mapped file) or a torch tensor in
    QTensor's storage layout."""
    b = _Binder(tensors, path, config.n_expert)
    g = global_shapes(config)
    layers = [_bind_layer(b, config, i) for i in range(config.n_layer)]
    weights = Weights(
        config=config,
        embed=b.get("token_embd.weight", g["token_embd.weight"]),
        layers=layers,
        head_hc=HyperConnection(
            fn=b.get("output_hc_fn.weight", g["output_hc_fn.weight"]),
            base=b.dense("output_hc_base.weight", g["output_hc_base.weight"]),
            scale=b.dense("output_hc_scale.weight", g["output_hc_scale.weight"]),
        ),
        norm=b.dense("output_norm.weight", g["output_norm.weight"]),
        output=b.get("output.weight", g["output.weight"]),
        notes=[],
    )
    unbound = [name for name in tensors if name not in b.bound]
    mtp = [name for name in unbound if is_mtp_tensor(name, config.n_layer, config.n_mtp_layer)]
    unknown = [name for name in unbound if not is_mtp_tensor(name, config.n_layer, config.n_mtp_layer)]
    if unknown:
        listed = ", ".join(repr(name) for name in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise WeightsError(
            f"{path}: {len(unknown)} tensor(s) that are no part of DeepSeek V4 Flash: {listed}"
        )
    if mtp:
        weights.notes.append(
            f"skipped {len(mtp)} multi-token-prediction (MTP) tensors ({mtp[0]}, ...): "
            "MTP is not supported yet"
        )
    return weights


def _split_rows(t: QTensor, groups: int) -> QTensor:
    """View a (groups·rows, cols) matrix as ``groups`` stacked (rows, cols) matrices."""
    rows = t.shape[0] // groups
    return QTensor(t.kind, (groups, rows, t.shape[1]), t.data.view(groups, rows, *t.data.shape[1:]))


def _bind_layer(b: _Binder, config: ModelConfig, layer: int) -> Layer:
    prefix = layer_prefix(layer)
    shapes = layer_shapes(config, layer)
    ratio = config.ratio(layer)

    def get(suffix: str) -> QTensor:
        return b.get(prefix + suffix, shapes[suffix])

    def dense(suffix: str) -> torch.Tensor | None:
        if suffix not in shapes:
            return None
        return b.dense(prefix + suffix, shapes[suffix], optional=suffix in OPTIONAL)

    def hc(kind: str) -> HyperConnection:
        return HyperConnection(
            get(f"hc_{kind}_fn.weight"), dense(f"hc_{kind}_base.weight"), dense(f"hc_{kind}_scale.weight")
        )

    def compressor(kind: str, ratio: int) -> Compressor:
        return Compressor(
            ratio,
            get(f"{kind}_compressor_kv.weight"),
            get(f"{kind}_compressor_gate.weight"),
            dense(f"{kind}_compressor_ape.weight"),
            dense(f"{kind}_compressor_norm.weight"),
        )

    indexer = None
    if ratio == 4:
        indexer = Indexer(
            get("indexer.attn_q_b.weight"), get("indexer.proj.weight"), compressor("indexer", 4)
        )
    experts = [get(s) for s in EXPERT_TENSORS]  # each may have its own type, as any matrix
    return Layer(
        attn_hc=hc("attn"),
        attn_norm=dense("attn_norm.weight"),
        attn=Attention(
            q_a=get("attn_q_a.weight"),
            q_norm=dense("attn_q_a_norm.weight"),
            q_b=get("attn_q_b.weight"),
            kv=get("attn_kv.weight"),
            kv_norm=dense("attn_kv_a_norm.weight"),
            sinks=dense("attn_sinks.weight"),
            out_a=_split_rows(get("attn_output_a.weight"), config.o_groups),
            out_b=get("attn_output_b.weight"),
            compressor=compressor("attn", ratio) if ratio else None,
            indexer=indexer,
        ),
        ffn_hc=hc("ffn"),
        ffn_norm=dense("ffn_norm.weight"),
        moe=MoE(
            router=get("ffn_gate_inp.weight"),
            bias=dense("exp_probs_b.bias"),
            hash_table=dense("ffn_gate_tid2eid.weight"),
            gate=experts[0],
            up=experts[1],
            down=experts[2],
            shared_gate=get("ffn_gate_shexp.weight"),
            shared_up=get("ffn_up_shexp.weight"),
            shared_down=get("ffn_down_shexp.weight"),
        ),
    )
