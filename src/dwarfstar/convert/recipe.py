"""ds4's tensor mix: which GGUF type each tensor of a DeepSeek V4 file is stored in.

The routed experts (most of the parameters) take the recipe's low-bit types; everything that
decides quality keeps ds4's published types, identical across recipes (ds4-reference §5.3):
attention projections, shared expert and output head Q8_0; token embedding, hyper-connection
mixers, compressors (with their position biases), indexer and router F16; norms, sinks, biases
and hyper-connection scales and bases F32; the hash routing table I32.
"""

from __future__ import annotations

import fnmatch
import re

from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as T

from dwarfstar.gguf.names import tensor_role

# Routed experts per recipe: gate, up, down.
RECIPES: dict[str, tuple[T, T, T]] = {
    "q2": (T.IQ2_XXS, T.IQ2_XXS, T.Q2_K),
    "q4": (T.Q4_K, T.Q4_K, T.Q4_K),
    "q8": (T.Q8_0, T.Q8_0, T.Q8_0),
}
FILE_TYPES = {
    "q2": LlamaFileType.MOSTLY_IQ2_XXS,
    "q4": LlamaFileType.MOSTLY_Q4_K_M,
    "q8": LlamaFileType.MOSTLY_Q8_0,
}
EXPERTS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
EIGHT_BIT = (
    "output.weight",
    "attn_q_a.weight",
    "attn_q_b.weight",
    "attn_kv.weight",
    "attn_output_a.weight",
    "attn_output_b.weight",
    "ffn_gate_shexp.weight",
    "ffn_up_shexp.weight",
    "ffn_down_shexp.weight",
    "e_proj.weight",  # MTP block
    "h_proj.weight",
)
# Types a --type-override may name, by their lower-case names.
OVERRIDE_TYPES = {k.name.lower(): k for k in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_K, T.Q2_K, T.IQ2_XXS)}
_LAYER_PREFIX = re.compile(r"^(blk|mtp)\.\d+\.")


class RecipeError(ValueError):
    """An unknown recipe or type, or a malformed override."""


def parse_override(text: str) -> tuple[str, T]:
    """``NAME_GLOB=TYPE`` (``blk.*.ffn_down_exps.weight=q4_k``) -> (glob, type)."""
    glob, sep, name = text.rpartition("=")
    if not sep or not glob:
        raise RecipeError(f"override {text!r} is not NAME_GLOB=TYPE")
    if name.lower() not in OVERRIDE_TYPES:
        raise RecipeError(
            f"override {text!r}: unknown type {name!r}; choose one of {', '.join(OVERRIDE_TYPES)}"
        )
    return glob, OVERRIDE_TYPES[name.lower()]


def recipe_kind(recipe: str, name: str, shape: tuple[int, ...]) -> T:
    """The type ds4's published ``recipe`` file stores tensor ``name`` of ``shape`` (torch order) in."""
    if recipe not in RECIPES:
        raise RecipeError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    suffix = _LAYER_PREFIX.sub("", name)
    if suffix in EXPERTS:
        return RECIPES[recipe][EXPERTS.index(suffix)]
    role = tensor_role(name, len(shape))
    if role == "table":
        return T.I32
    if "_ape." in name:  # the compressors' position biases: F16 in ds4's files
        return T.F16
    if role == "vector":
        return T.F32
    return T.Q8_0 if suffix in EIGHT_BIT else T.F16


def fits(kind: T, cols: int) -> bool:
    """Whether rows of ``cols`` values are whole blocks of ``kind``."""
    return cols % GGML_QUANT_SIZES[kind][0] == 0


class TensorMix:
    """A recipe with overrides: ``kind(name, shape)``, and the notes on fallbacks it had to take.

    Overrides (glob -> type) come first, in order. A block type whose block does not divide the
    rows (only in small test models) falls back to Q8_0, else F16, as llama.cpp falls back.
    """

    def __init__(self, recipe: str, overrides: list[tuple[str, T]] | None = None) -> None:
        recipe_kind(recipe, "output_norm.weight", (1,))  # checks the recipe's name
        self.recipe = recipe
        self.overrides = list(overrides or [])
        self.fallbacks: list[str] = []

    def kind(self, name: str, shape: tuple[int, ...]) -> T:
        kind = recipe_kind(self.recipe, name, shape)
        if kind not in (T.I32,) and len(shape) > 1:
            kind = next((k for glob, k in self.overrides if fnmatch.fnmatchcase(name, glob)), kind)
        if fits(kind, shape[-1]):
            return kind
        fallback = T.Q8_0 if fits(T.Q8_0, shape[-1]) else T.F16
        self.fallbacks.append(
            f"{name}: rows of {shape[-1]} values do not fit {kind.name}; {fallback.name} instead"
        )
        return fallback
