"""Model dimensions and constants, read from (and written to) GGUF metadata."""

from __future__ import annotations

import math
import os
from collections.abc import Container
from dataclasses import dataclass, field

from dwarfstar.gguf.names import (
    COMPRESS_RATIOS_KEY,
    FLASH_METADATA,
    MTP_LAYERS_KEY,
    MTP_PROBE_SUFFIX,
    SWIGLU_CLAMP_KEY,
    key,
    layer_prefix,
)
from dwarfstar.gguf.reader import GGUFFile
from dwarfstar.gguf.shards import GGUFModel


class ConfigError(ValueError):
    """The file's metadata does not describe a DeepSeek V4 model we can run."""


# Keys llama.cpp reads with a default when a file lacks them; the defaults are the dataclass's.
_OPTIONAL_KEYS = ("rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow")

# field name -> metadata short key (see gguf.names.FLASH_METADATA)
_KEYS: dict[str, str] = {
    "n_layer": "block_count",
    "dim": "embedding_length",
    "vocab_size": "vocab_size",
    "n_head": "attention.head_count",
    "n_head_kv": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "value_dim": "attention.value_length",
    "rope_dim": "rope.dimension_count",
    "q_lora_rank": "attention.q_lora_rank",
    "o_lora_rank": "attention.output_lora_rank",
    "o_groups": "attention.output_group_count",
    "n_expert": "expert_count",
    "n_expert_used": "expert_used_count",
    "expert_ff": "expert_feed_forward_length",
    "n_shared_expert": "expert_shared_count",
    "n_hash_layer": "hash_layer_count",
    "window": "attention.sliding_window",
    "index_n_head": "attention.indexer.head_count",
    "index_head_dim": "attention.indexer.key_length",
    "index_topk": "attention.indexer.top_k",
    "hc_mult": "hyper_connection.count",
    "hc_sinkhorn_iters": "hyper_connection.sinkhorn_iterations",
    "hc_eps": "hyper_connection.epsilon",
    "rope_original_context": "rope.scaling.original_context_length",
    "rope_base": "rope.freq_base",
    "rope_factor": "rope.scaling.factor",
    "beta_fast": "rope.scaling.yarn_beta_fast",
    "beta_slow": "rope.scaling.yarn_beta_slow",
    "compress_rope_base": "attention.compress_rope_freq_base",
    "routed_scale": "expert_weights_scale",
    "norm_topk": "expert_weights_norm",
    "rms_eps": "attention.layer_norm_rms_epsilon",
}


# Fields that must be at least 1, and floats that must be finite and above 0.
_POSITIVE_INTS = (
    "n_layer",
    "dim",
    "vocab_size",
    "n_head",
    "head_dim",
    "q_lora_rank",
    "o_lora_rank",
    "o_groups",
    "n_expert",
    "n_expert_used",
    "expert_ff",
    "n_shared_expert",
    "window",
    "index_n_head",
    "index_head_dim",
    "index_topk",
    "hc_mult",
    "hc_sinkhorn_iters",
)
_POSITIVE_FLOATS = (
    "hc_eps",
    "rms_eps",
    "rope_base",
    "rope_factor",
    "beta_fast",
    "beta_slow",
    "compress_rope_base",
    "routed_scale",
)


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about the model's shape.

    Defaults are the real DeepSeek V4 Flash; small test models override the dimensions.
    """

    n_layer: int = 43
    dim: int = 4096
    vocab_size: int = 129280
    n_head: int = 64
    n_head_kv: int = 1
    head_dim: int = 512
    value_dim: int = 512
    rope_dim: int = 64
    q_lora_rank: int = 1024
    o_lora_rank: int = 1024
    o_groups: int = 8
    n_expert: int = 256
    n_expert_used: int = 6
    expert_ff: int = 2048
    n_shared_expert: int = 1
    n_hash_layer: int = 3
    window: int = 128
    index_n_head: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rope_original_context: int = 65536
    rope_base: float = 10000.0
    rope_factor: float = 16.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    compress_rope_base: float = 160000.0
    routed_scale: float = 1.5
    norm_topk: bool = True
    rms_eps: float = 1e-6
    compress_ratios: tuple[int, ...] = field(
        default=(0, 0) + tuple(4 if i % 2 == 0 else 128 for i in range(2, 43))
    )
    swiglu_limit: tuple[float, ...] = (10.0,) * 43
    # MTP (next-n prediction) blocks stored after the main layers, as llama.cpp's converter writes
    # them: counted in block_count, not run (multi-token prediction is not supported yet).
    n_mtp_layer: int = 0

    def __post_init__(self) -> None:
        if len(self.compress_ratios) < self.n_layer:
            raise ConfigError(
                f"{key(COMPRESS_RATIOS_KEY)} has {len(self.compress_ratios)} entries, "
                f"expected at least {self.n_layer}"
            )
        bad = sorted({r for r in self.compress_ratios[: self.n_layer] if r not in (0, 4, 128)})
        if bad:
            raise ConfigError(f"{key(COMPRESS_RATIOS_KEY)} holds unsupported ratios {bad}")
        if len(self.swiglu_limit) < self.n_layer:
            raise ConfigError(
                f"{key(SWIGLU_CLAMP_KEY)} has {len(self.swiglu_limit)} entries, expected {self.n_layer}"
            )
        self._check_ranges()
        if self.n_head % self.o_groups:
            raise ConfigError(f"head count {self.n_head} is not a multiple of {self.o_groups} groups")
        if self.n_head_kv != 1 or self.value_dim != self.head_dim:
            raise ConfigError("DeepSeek V4 has one shared K=V head: head_count_kv must be 1")

    def _check_ranges(self) -> None:
        """Values the forward pass cannot run with (or would silently compute wrong) are refused."""

        def refuse(name: str, rule: str) -> None:
            raise ConfigError(f"{key(_KEYS[name])} is {getattr(self, name)!r}; it must be {rule}")

        for name in _POSITIVE_INTS:
            if getattr(self, name) < 1:
                refuse(name, "at least 1")
        for name in _POSITIVE_FLOATS:
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                refuse(name, "a finite number above 0")
        if self.n_expert_used > self.n_expert:
            refuse("n_expert_used", f"at most {key(_KEYS['n_expert'])} ({self.n_expert})")
        if not 0 <= self.n_hash_layer <= self.n_layer:
            refuse("n_hash_layer", f"between 0 and {key(_KEYS['n_layer'])} ({self.n_layer})")
        widest = min(self.head_dim, self.index_head_dim)
        if self.rope_dim % 2 or not 2 <= self.rope_dim <= widest:
            heads = f"{key(_KEYS['head_dim'])} and {key(_KEYS['index_head_dim'])}"
            refuse("rope_dim", f"even (rope turns pairs), from 2 to {widest}, the narrower of {heads}")
        if self.index_head_dim & (self.index_head_dim - 1):
            refuse("index_head_dim", "a power of two (the indexer's Hadamard rotation needs one)")
        if self.rope_original_context < 0:
            refuse("rope_original_context", "0 (no YaRN) or more")
        bad = [v for v in self.swiglu_limit[: self.n_layer] if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ConfigError(
                f"{key(SWIGLU_CLAMP_KEY)} holds {bad[0]!r}; every entry must be a finite number above 0"
            )

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    def ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def hash_routed(self, layer: int) -> bool:
        return layer < self.n_hash_layer

    @property
    def is_flash(self) -> bool:
        """True when the dimensions claim to be the real DeepSeek V4 Flash."""
        return (self.n_layer, self.dim, self.vocab_size) == (43, 4096, 129280)

    @classmethod
    def from_metadata(cls, metadata: dict[str, object], tensors: Container[str] | None = None) -> ModelConfig:
        """Build the config from a GGUF's key/value metadata (already decoded to Python values).

        ``nextn_predict_layers`` MTP blocks are the last of ``block_count``. Like llama.cpp, when
        the file's tensor names are given and the first MTP block's ``nextn.eh_proj`` is not among
        them (the MTP tensors were left out), there are none.
        """
        arch = metadata.get("general.architecture")
        if arch != "deepseek4":
            raise ConfigError(f"general.architecture is {arch!r}, expected 'deepseek4'")
        values: dict[str, object] = {}
        missing = []
        for name, short in _KEYS.items():
            full = key(short)
            if full not in metadata:
                if short not in _OPTIONAL_KEYS:
                    missing.append(full)
                continue
            values[name] = _coerce(metadata[full], type(getattr(cls, name)), full)
        for name, short in (("compress_ratios", COMPRESS_RATIOS_KEY), ("swiglu_limit", SWIGLU_CLAMP_KEY)):
            full = key(short)
            if full not in metadata:
                missing.append(full)
                continue
            value = metadata[full]
            if name == "swiglu_limit" and isinstance(value, int | float):  # one value for every layer
                value = [value] * int(values.get("n_layer", 0))  # type: ignore[call-overload]
            cast = int if name == "compress_ratios" else float
            if not isinstance(value, list | tuple):
                raise ConfigError(f"metadata {full} must be an array, got {value!r}")
            values[name] = tuple(_coerce(v, cast, full) for v in value)
        if missing:
            raise ConfigError("missing metadata keys: " + ", ".join(missing))
        n_layer = int(values["n_layer"])  # type: ignore[call-overload]
        n_mtp = int(_coerce(metadata.get(key(MTP_LAYERS_KEY), 0), int, key(MTP_LAYERS_KEY)))  # type: ignore[call-overload]
        if not 0 <= n_mtp < n_layer:
            raise ConfigError(f"{key(MTP_LAYERS_KEY)} is {n_mtp}, with block_count {n_layer}")
        if n_mtp and tensors is not None and layer_prefix(n_layer - n_mtp) + MTP_PROBE_SUFFIX not in tensors:
            n_mtp = 0
        values["n_layer"], values["n_mtp_layer"] = n_layer - n_mtp, n_mtp
        for short in ("expert_group_count", "expert_group_used_count"):
            if metadata.get(key(short), 0) not in (0, None):
                raise ConfigError(f"{key(short)} must be 0 (DeepSeek V4 has no expert groups)")
        config = cls(**values)  # type: ignore[arg-type]
        if config.is_flash:
            config.validate_flash()
        return config

    def validate_flash(self) -> None:
        """A file that claims to be Flash must carry Flash's constants exactly."""
        for name, short in _KEYS.items():
            want, got = FLASH_METADATA[short], getattr(self, name)
            same = math.isclose(got, want, rel_tol=1e-6) if isinstance(want, float) else got == want
            if not same:
                raise ConfigError(f"{key(short)} is {got!r}; DeepSeek V4 Flash has {want!r}")
        flash = ModelConfig()
        if self.compress_ratios[:43] != flash.compress_ratios:
            raise ConfigError(f"{key(COMPRESS_RATIOS_KEY)} differs from Flash's 0,0,4,128,…,4 schedule")
        if any(v != 10.0 for v in self.swiglu_limit[:43]):
            raise ConfigError(f"{key(SWIGLU_CLAMP_KEY)} must be 10.0 for every Flash layer")

    def to_metadata(self) -> dict[str, object]:
        """The ``deepseek4.*`` metadata for this config (values as Python scalars and lists)."""
        out: dict[str, object] = {key(short): getattr(self, name) for name, short in _KEYS.items()}
        out[key(COMPRESS_RATIOS_KEY)] = list(self.compress_ratios[: self.n_layer])
        out[key(SWIGLU_CLAMP_KEY)] = list(self.swiglu_limit[: self.n_layer])
        return out


def load_config(source: str | os.PathLike[str] | GGUFFile | GGUFModel) -> ModelConfig:
    """The config of a model (a path, an opened file or shards); errors name the file."""
    file = source if isinstance(source, GGUFFile | GGUFModel) else GGUFModel(source)
    try:
        return ModelConfig.from_metadata(file.metadata, file.tensors)
    except ConfigError as err:
        raise ConfigError(f"{file.path}: {err}") from None


def _coerce(value: object, kind: type, name: str) -> object:
    """``value`` as ``kind``: a flag must be a bool, a count an integer, a float a number."""
    if isinstance(value, bool):
        if kind is bool:
            return value
    elif kind is int and (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        return int(value)
    elif kind is float and isinstance(value, int | float):
        return float(value)
    raise ConfigError(f"metadata {name} = {value!r} is not a valid {kind.__name__}")
