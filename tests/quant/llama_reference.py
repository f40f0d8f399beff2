"""llama.cpp through llama-cpp-python as a reference: its own quantizer (what our quantizers are
measured against, and how the end-to-end tests make quantized files) and its forward pass."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
from gguf import GGMLQuantizationType


@llama_cpp.llama_log_callback
def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs every tensor while quantizing; tests do not need it."""


llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))


def llama_quantize(
    source: Path,
    out: Path,
    ftype: int = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    overrides: dict[str, GGMLQuantizationType] | None = None,
    imatrix: dict[str, np.ndarray] | None = None,
    threads: int = 1,
    whole_mix: bool = False,
) -> Path:
    """``llama_model_quantize`` of ``source`` to ``ftype``; ``overrides``: name regex -> type;
    ``imatrix``: tensor name -> importance (n_expert * cols,) float32. Unless ``whole_mix``, the
    token embedding and output head (large, and not what tests compare) are left as they are."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    if not whole_mix:
        params.token_embedding_type = gguf.GGMLQuantizationType.F16
        params.quantize_output_tensor = False
    keep = []  # the ctypes buffers must outlive the call
    if overrides:
        table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, kind) in enumerate(overrides.items()):
            table[i].pattern = pattern.encode()
            table[i].type = int(kind)
        table[len(overrides)].pattern = None
        params.tt_overrides = ctypes.cast(table, type(params.tt_overrides))
        keep.append(table)
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            data = np.ascontiguousarray(values, dtype=np.float32).ravel()
            keep.append(data)
            entries[i].name = name.encode()
            entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = data.size
        entries[len(imatrix)].name = None
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
        keep.append(entries)
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    assert status == 0, f"llama_model_quantize failed on {source}"
    return out


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """ggml's ``struct ggml_type_traits`` (ggml.h), up to the decoder."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", _TO_FLOAT),
    ]


def llama_dequantize(kind: GGMLQuantizationType, stored: np.ndarray, count: int) -> np.ndarray:
    """``count`` float32 values decoded from stored blocks by ggml's own ``to_float`` for ``kind``."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    traits = lib.ggml_get_type_traits(int(kind)).contents
    assert (traits.blck_size, traits.type_size) == gguf.GGML_QUANT_SIZES[kind], "ggml.h layout changed"
    blocks = np.ascontiguousarray(stored)
    out = np.empty(count, dtype=np.float32)
    traits.to_float(blocks.ctypes.data, out.ctypes.data, count)
    return out


def write_f32_model(path: Path, config: object, expert_values, seed: int = 0) -> Path:  # noqa: ANN001
    """A random model of ``config`` in float32 (token embedding F16) whose stacked experts hold
    ``expert_values(shape, rng)``: the source both quantizers read."""
    from gguf import GGMLQuantizationType as T

    from dwarfstar.convert.converter import gguf_metadata, stored_kind
    from dwarfstar.convert.hf_config import FP8_BLOCK, CheckpointConfig
    from dwarfstar.gguf.writer import GGUFFileWriter
    from dwarfstar.synthetic.models import random_values, tensor_specs
    from dwarfstar.tokenizer import deepseek_tokenizer_json, gguf_tokenizer_metadata

    def policy(name: str, shape: tuple[int, ...]) -> T:
        return T.F16 if name == "token_embd.weight" else stored_kind(name, shape, T.F32)

    rng = np.random.default_rng(seed)
    tokenizer = gguf_tokenizer_metadata(deepseek_tokenizer_json(), vocab_size=config.vocab_size)
    metadata = gguf_metadata(CheckpointConfig(config, 1 << 20, FP8_BLOCK), path.stem, T.F32, tokenizer)
    specs = tensor_specs(config, policy)
    with GGUFFileWriter(path, metadata, specs) as writer:
        for spec in specs:
            if "_exps." in spec.name:
                writer.write_tensor(spec.name, expert_values(spec.shape, rng).astype(np.float32))
            else:
                writer.write_tensor(spec.name, random_values(spec, config, rng))
    return path


def llama_cpp_logits(path: Path, ids: list[int], batch: int) -> np.ndarray:
    """All positions' logits from llama.cpp, fed ``batch`` tokens per decode call, its KV cache in f32.

    With ``type_k = type_v = f32`` and flash attention off every tensor of its graph is float32
    on the CPU backend (its defaults keep the KV cache, hence the compressed caches, in f16).
    """
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=len(ids),
        n_batch=batch,
        n_ubatch=batch,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        flash_attn=False,
        n_threads=2,
        n_threads_batch=2,
        verbose=False,
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])
