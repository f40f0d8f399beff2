"""A DeepSeek V4 checkpoint directory -> one GGUF file in the ds4 / llama.cpp ``deepseek4`` layout.

Every matrix (2-D projections, hyper-connection mixers, router, stacked experts) is stored in
the requested type; vectors (norms, sinks, biases, hc scales and bases) and the compressors'
position biases stay float32, the hash routing table int32. Tensors are read, converted and
written one at a time (stacked experts one expert at a time), so memory stays bounded by the
largest single matrix, whatever the checkpoint's size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType
from tqdm import tqdm

from dwarfstar.convert.checkpoint import Checkpoint, CheckpointError, scale_name
from dwarfstar.convert.hf_config import CheckpointConfig, CheckpointConfigError, read_checkpoint_config
from dwarfstar.gguf.container import DEFAULT_ALIGNMENT
from dwarfstar.gguf.names import (
    ARCH,
    EXPERT_TENSORS,
    GLOBAL_TENSORS,
    LAYER_TENSORS,
    global_shapes,
    key,
    layer_prefix,
    layer_shapes,
    tensor_role,
)
from dwarfstar.gguf.writer import GGUFFileWriter, TensorSpec
from dwarfstar.quant import quantize
from dwarfstar.tokenizer import deepseek_tokenizer_json, gguf_tokenizer_metadata

OUTPUT_TYPES: dict[str, T] = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}
_FILE_TYPES = {
    T.F32: LlamaFileType.ALL_F32,
    T.F16: LlamaFileType.MOSTLY_F16,
    T.BF16: LlamaFileType.MOSTLY_BF16,
    T.Q8_0: LlamaFileType.MOSTLY_Q8_0,
}
# llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SQRT_SOFTPLUS (gguf-py's ExpertGatingFuncType.SQRTSOFTPLUS);
# its deepseek4 loader refuses any other value.
EXPERT_GATING_SQRT_SOFTPLUS = 4
# The stacked experts of transformers' layout: GGUF suffix -> (tensor, which half of its rows).
_STACKED_EXPERTS = {
    "ffn_gate_exps.weight": ("ffn.experts.gate_up_proj", 0),
    "ffn_up_exps.weight": ("ffn.experts.gate_up_proj", 1),
    "ffn_down_exps.weight": ("ffn.experts.down_proj", None),
}


class ConvertError(ValueError):
    """The checkpoint cannot be converted; the message says which file or tensor and why."""


@dataclass(frozen=True)
class Conversion:
    """What ``convert_checkpoint`` wrote, and the checkpoint tensors it left out (MTP)."""

    path: Path
    tensors: int
    skipped: list[str]


@dataclass(frozen=True)
class PlannedTensor:
    """A GGUF tensor to write and where its values come from."""

    spec: TensorSpec
    values: Callable[[], Iterator[np.ndarray]]  # float32 (int32 for the hash table), a matrix at a time
    sources: tuple[str, ...]  # official names read


def encode(values: np.ndarray, kind: T) -> np.ndarray:
    """Values from a plan in their stored form: the hash table as int32, the rest quantized."""
    return values.astype(np.int32) if kind == T.I32 else quantize(values, kind)


def convert_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    matrix_type: str = "bf16",
    *,
    name: str | None = None,
    progress: bool = False,
) -> Conversion:
    """Convert ``checkpoint_dir`` (config.json + safetensors) to the GGUF ``out_path``.

    ``matrix_type`` is one of ``OUTPUT_TYPES``. The tokenizer comes from the directory's
    tokenizer.json, else from the ``deepseek-tokenizer`` package. The file appears only once
    complete: it is written to ``out_path`` + ``.part`` first, which is removed if anything fails.
    """
    directory = Path(checkpoint_dir)
    out = Path(out_path)
    if matrix_type not in OUTPUT_TYPES:
        raise ConvertError(f"unknown type {matrix_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    kind = OUTPUT_TYPES[matrix_type]
    if not directory.is_dir():
        raise ConvertError(f"{directory}: no such directory")
    if not (directory / "config.json").is_file():
        raise ConvertError(f"{directory}: not a checkpoint directory (no config.json)")
    if not out.parent.is_dir():
        raise ConvertError(f"{out.parent}: no such directory for the output file")
    partial = out.with_name(out.name + ".part")
    for path in (out, partial):
        if path.is_dir():
            raise ConvertError(f"{path}: is a directory; give a file name for the output")
    try:
        config = read_checkpoint_config(directory / "config.json")
        tokenizer_json = directory / "tokenizer.json"
        if not tokenizer_json.is_file():
            tokenizer_json = deepseek_tokenizer_json()
        tokenizer = gguf_tokenizer_metadata(tokenizer_json, vocab_size=config.model.vocab_size)
        metadata = gguf_metadata(config, name or directory.resolve().name, kind, tokenizer)
        with Checkpoint(directory, config.fp8_block) as checkpoint:
            plan = plan_tensors(config, checkpoint, lambda name, shape: stored_kind(name, shape, kind))
            skipped = leftovers(checkpoint, plan)
            with GGUFFileWriter(partial, metadata, [p.spec for p in plan]) as writer:
                for item in tqdm(plan, desc=out.name, unit="tensor", disable=not progress):
                    writer.write_tensor(item.spec.name, (encode(v, item.spec.kind) for v in item.values()))
        partial.replace(out)
    except (CheckpointConfigError, CheckpointError) as err:
        raise ConvertError(str(err)) from None
    except ValueError as err:  # the tokenizer, and tensor sizes the writer rejects
        raise ConvertError(f"{directory}: {err}") from None
    except OSError as err:  # an unwritable output or a full disk, mostly
        raise ConvertError(f"{err.filename or partial}: {err.strerror or err}") from None
    finally:
        partial.unlink(missing_ok=True)  # gone already when the conversion succeeded
    return Conversion(out, len(plan), skipped)


def gguf_metadata(
    config: CheckpointConfig, name: str, kind: T, tokenizer: dict[str, object]
) -> dict[str, object]:
    """Every key ds4 validates and llama.cpp's deepseek4 loader reads, plus the tokenizer's."""
    model = config.model
    clamp = list(model.swiglu_limit[: model.n_layer])
    return {
        "general.architecture": ARCH,
        "general.name": name,
        "general.alignment": DEFAULT_ALIGNMENT,
        "general.file_type": int(_FILE_TYPES[kind]),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        **model.to_metadata(),
        key("context_length"): config.context_length,
        key("expert_gating_func"): EXPERT_GATING_SQRT_SOFTPLUS,
        key("nextn_predict_layers"): 0,
        key("rope.scaling.type"): "yarn" if model.rope_factor != 1.0 else "none",
        key("swiglu_clamp_shexp"): clamp,
        **tokenizer,
    }


def stored_kind(gguf_name: str, shape: tuple[int, ...], matrix_kind: T) -> T:
    """Matrices take the requested type; vectors and position biases stay F32, the hash table I32."""
    return {"table": T.I32, "vector": T.F32, "matrix": matrix_kind}[tensor_role(gguf_name, len(shape))]


def plan_tensors(
    config: CheckpointConfig, checkpoint: Checkpoint, kind_of: Callable[[str, tuple[int, ...]], T]
) -> list[PlannedTensor]:
    """The GGUF tensors in file order, each with where its values come from; shapes checked.

    ``kind_of(gguf_name, shape)`` is the stored kind of each tensor."""
    model = config.model
    plan = []
    shapes = global_shapes(model)
    for t in GLOBAL_TENSORS:
        kind = kind_of(t.gguf, shapes[t.gguf])
        plan.append(_single(checkpoint, t.gguf, t.official, shapes[t.gguf], kind, model.n_expert))
    for layer in range(model.n_layer):
        shapes = layer_shapes(model, layer)
        prefix = layer_prefix(layer)
        for t in LAYER_TENSORS:
            if t.gguf not in shapes:
                continue
            shape, gguf_name = shapes[t.gguf], prefix + t.gguf
            kind = kind_of(gguf_name, shape)
            if t.gguf in EXPERT_TENSORS:
                plan.append(_experts(checkpoint, gguf_name, layer, t.gguf, t.official, shape, kind))
            else:
                official = f"layers.{layer}.{t.official}"
                plan.append(_single(checkpoint, gguf_name, official, shape, kind, model.n_expert))
    return plan


def _single(
    checkpoint: Checkpoint,
    gguf_name: str,
    official: str,
    shape: tuple[int, ...],
    kind: T,
    n_expert: int,
) -> PlannedTensor:
    _check_shape(checkpoint, official, gguf_name, shape)

    def values() -> Iterator[np.ndarray]:
        read = checkpoint.read(official)
        if kind == T.I32 and read.numel() and not (int(read.min()) >= 0 and int(read.max()) < n_expert):
            raise CheckpointError(f"{official} holds expert ids outside 0..{n_expert - 1}")
        yield read.numpy()

    return PlannedTensor(TensorSpec(gguf_name, kind, shape), values, (official,))


def _experts(
    checkpoint: Checkpoint,
    gguf_name: str,
    layer: int,
    suffix: str,
    official: str,
    shape: tuple[int, ...],
    kind: T,
) -> PlannedTensor:
    """A stacked (E, rows, cols) expert tensor: from E official tensors, or transformers' stacked one."""
    n_expert, rows = shape[0], shape[1]
    per_expert = [f"layers.{layer}.{official.format(e=e)}" for e in range(n_expert)]
    stacked, half = _STACKED_EXPERTS[suffix]
    stacked = f"layers.{layer}.{stacked}"
    spec = TensorSpec(gguf_name, kind, shape)
    if per_expert[0] in checkpoint:
        for name in per_expert:
            _check_shape(checkpoint, name, gguf_name, shape[1:])

        def values() -> Iterator[np.ndarray]:
            for name in per_expert:
                yield checkpoint.read(name).numpy()

        return PlannedTensor(spec, values, tuple(per_expert))
    if stacked not in checkpoint:
        raise CheckpointError(
            f"{checkpoint.directory}: no tensor {per_expert[0]!r} (nor transformers' {stacked!r}) "
            f"for {gguf_name}"
        )
    full = shape if half is None else (n_expert, 2 * rows, shape[2])
    _check_shape(checkpoint, stacked, gguf_name, full)

    def stacked_values() -> Iterator[np.ndarray]:
        for e in range(n_expert):
            values = checkpoint.read(stacked, index=e)
            if half is not None:
                values = values[half * rows : (half + 1) * rows]
            yield values.numpy()

    return PlannedTensor(spec, stacked_values, (stacked,))


def _check_shape(checkpoint: Checkpoint, official: str, gguf_name: str, shape: tuple[int, ...]) -> None:
    if official not in checkpoint:
        raise CheckpointError(f"{checkpoint.directory}: no tensor {official!r} (for {gguf_name})")
    found = checkpoint.shape(official)
    if found != shape:
        raise CheckpointError(
            f"{checkpoint.directory}: tensor {official!r} has shape {list(found)}, but config.json "
            f"implies {list(shape)} (for {gguf_name})"
        )


def leftovers(checkpoint: Checkpoint, plan: list[PlannedTensor]) -> list[str]:
    """The MTP tensors, which are skipped; any other tensor not converted is an error."""
    used = {name for item in plan for name in item.sources}
    used |= {scale_name(name) for name in used}
    skipped, unexpected = [], []
    for name in checkpoint.names:
        if name in used:
            continue
        (skipped if name.startswith("mtp.") else unexpected).append(name)
    if unexpected:
        listed = ", ".join(repr(n) for n in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"{checkpoint.directory}: tensors that config.json does not account for: {listed}{more}"
        )
    return skipped
