"""The GGUF-built tokenizer against the reference: ``tokenizers`` loading DeepSeek V4's tokenizer.json."""

import json
from pathlib import Path

import gguf
import pytest
from chat_data import RENDER_VECTORS
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as ReferenceTokenizer

from dwarfstar.chat import tokens as chat_tokens
from dwarfstar.tokenizer import (
    PRE_TOKENIZER_PATTERNS,
    StreamDecoder,
    Tokenizer,
    deepseek_tokenizer_json,
    gguf_tokenizer_metadata,
)

VOCAB_SIZE = 129280  # DeepSeek V4 Flash's embedding rows
KEYS = gguf.Keys.Tokenizer
NORMAL, CONTROL = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
USER_DEFINED, UNUSED = gguf.TokenType.USER_DEFINED, gguf.TokenType.UNUSED

SPEC = json.loads(deepseek_tokenizer_json().read_text(encoding="utf-8"))
ADDED_TOKENS = [token["content"] for token in SPEC["added_tokens"]]


def write_tokenizer_gguf(path: Path, metadata: dict[str, object]) -> None:
    """A vocab-only GGUF, each value in the type gguf_tokenizer_metadata's docstring names."""
    writer = gguf.GGUFWriter(path, arch="deepseek4")
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)  # strings, or ints as int32
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def reference() -> ReferenceTokenizer:
    return ReferenceTokenizer.from_file(str(deepseek_tokenizer_json()))


@pytest.fixture(scope="session")
def metadata() -> dict[str, object]:
    return gguf_tokenizer_metadata(deepseek_tokenizer_json(), vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="session")
def tokenizer(metadata, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tokenizer") / "vocab.gguf"
    write_tokenizer_gguf(path, metadata)
    return Tokenizer.from_gguf(path)


def reference_ids(reference: ReferenceTokenizer, text: str) -> list[int]:
    return reference.encode(text, add_special_tokens=False).ids


def reference_text(reference: ReferenceTokenizer, ids: list[int]) -> str:
    return reference.decode(ids, skip_special_tokens=False)


# --- the GGUF metadata ---------------------------------------------------------------------------


def test_pre_tokenizer_patterns_are_the_reference_ones():
    splits = SPEC["pre_tokenizer"]["pretokenizers"]
    assert [split["pattern"]["Regex"] for split in splits[:-1]] == list(PRE_TOKENIZER_PATTERNS)
    assert {split["behavior"] for split in splits[:-1]} == {"Isolated"}
    assert splits[-1]["type"] == "ByteLevel" and splits[-1]["use_regex"] is False


def test_metadata_names_the_llama_cpp_tokenizer(metadata):
    assert metadata[KEYS.MODEL] == "gpt2"
    assert metadata[KEYS.PRE] == "joyai-llm"


def test_metadata_tokens_are_the_reference_vocabulary_in_id_order(metadata, reference):
    tokens = metadata[KEYS.LIST]
    assert len(tokens) == VOCAB_SIZE == reference.get_vocab_size()
    assert tokens == [reference.id_to_token(token_id) for token_id in range(VOCAB_SIZE)]
    assert metadata[KEYS.MERGES] == SPEC["model"]["merges"]


def test_metadata_special_ids_and_flags(metadata, reference):
    assert metadata[KEYS.BOS_ID] == reference.token_to_id(chat_tokens.BOS)
    assert metadata[KEYS.EOS_ID] == reference.token_to_id(chat_tokens.EOS)
    assert metadata[KEYS.PAD_ID] == reference.token_to_id(chat_tokens.EOS)  # tokenizer_config's pad
    assert metadata[KEYS.ADD_BOS] is False and metadata[KEYS.ADD_EOS] is False


def test_metadata_token_types_follow_llama_cpp(metadata):
    token_types = metadata[KEYS.TOKEN_TYPE]
    added = {token["id"] for token in SPEC["added_tokens"]}
    assert {token_id for token_id, kind in enumerate(token_types) if kind in (CONTROL, USER_DEFINED)} == added
    assert {kind for token_id, kind in enumerate(token_types) if token_id not in added} == {NORMAL}

    kind_of = dict(zip(metadata[KEYS.LIST], token_types, strict=True))
    # Flagged special, or spelled <｜...｜> / <|...|>: control. The other added tokens: user-defined.
    control = [chat_tokens.BOS, chat_tokens.EOS, chat_tokens.USER, chat_tokens.ASSISTANT]
    control += [chat_tokens.LATEST_REMINDER, "<｜▁pad▁｜>", "<｜place▁holder▁no▁7｜>", "<｜action｜>"]
    control += ["<|EOT|>"]
    user_defined = [chat_tokens.THINK_OPEN, chat_tokens.THINK_CLOSE, chat_tokens.DSML, "<dsml:"]
    user_defined += ["<｜/table>｜"]
    assert {text: kind_of[text] for text in control} == dict.fromkeys(control, CONTROL)
    assert {text: kind_of[text] for text in user_defined} == dict.fromkeys(user_defined, USER_DEFINED)


def test_metadata_pads_a_larger_vocabulary_with_unused_tokens():
    metadata = gguf_tokenizer_metadata(deepseek_tokenizer_json(), vocab_size=VOCAB_SIZE + 3)
    padding = ["[PAD129280]", "[PAD129281]", "[PAD129282]"]
    assert metadata[KEYS.LIST][VOCAB_SIZE - 1 :] == ["<｜image｜>", *padding]
    assert metadata[KEYS.TOKEN_TYPE][VOCAB_SIZE - 1 :] == [CONTROL, UNUSED, UNUSED, UNUSED]


def test_metadata_of_a_small_tokenizer_json(tmp_path):
    """Merges in the newer pair form; no tokenizer_config.json beside it, so no special-id keys."""
    spec = {
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
        "added_tokens": [
            {"id": 3, "content": "<｜x｜>", "special": False},
            {"id": 5, "content": "y", "special": False},
        ],
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    metadata = gguf_tokenizer_metadata(tmp_path / "tokenizer.json")
    assert metadata == {
        KEYS.MODEL: "gpt2",
        KEYS.PRE: "joyai-llm",
        KEYS.LIST: ["a", "b", "ab", "<｜x｜>", "[PAD4]", "y"],
        KEYS.TOKEN_TYPE: [NORMAL, NORMAL, NORMAL, CONTROL, UNUSED, USER_DEFINED],
        KEYS.MERGES: ["a b"],
    }


def test_metadata_rejects_a_vocabulary_too_small():
    with pytest.raises(ValueError, match="does not fit a vocabulary of 1000 tokens"):
        gguf_tokenizer_metadata(deepseek_tokenizer_json(), vocab_size=1000)


def test_tokenizer_rejects_an_unknown_pre_tokenizer(metadata):
    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'deepseek-v3'"):
        Tokenizer.from_gguf({**metadata, KEYS.PRE: "deepseek-v3"})
    with pytest.raises(ValueError, match="missing tokenizer key.*tokenizer.ggml.merges"):
        Tokenizer.from_gguf({key: value for key, value in metadata.items() if key != KEYS.MERGES})


# --- special tokens ------------------------------------------------------------------------------


def test_special_ids_are_the_reference_added_tokens(tokenizer, reference):
    assert tokenizer.special_ids == {text: reference.token_to_id(text) for text in ADDED_TOKENS}
    assert tokenizer.bos_id == reference.token_to_id(chat_tokens.BOS)
    assert tokenizer.eos_id == reference.token_to_id(chat_tokens.EOS)
    assert tokenizer.vocab_size == VOCAB_SIZE


def test_prompt_markers_are_single_tokens(tokenizer, reference):
    markers = [chat_tokens.BOS, chat_tokens.USER, chat_tokens.ASSISTANT, chat_tokens.THINK_OPEN]
    markers += [chat_tokens.THINK_CLOSE, chat_tokens.LATEST_REMINDER, chat_tokens.EOS, "<｜query｜>"]
    text = "".join(markers)
    assert tokenizer.encode(text) == [reference.token_to_id(marker) for marker in markers]
    # A DSML tag: "<", the DSML token, then plain BPE; no BOS is added in front.
    invoke = tokenizer.encode(chat_tokens.INVOKE_OPEN)
    assert invoke[:2] == [reference.token_to_id("<"), reference.token_to_id(chat_tokens.DSML)]
    assert tokenizer.decode(invoke) == chat_tokens.INVOKE_OPEN


# --- ids identical to the reference --------------------------------------------------------------


def test_rendered_prompts_match_reference(tokenizer, reference):
    prompts = [vector["expected"] for vector in RENDER_VECTORS]
    assert len(prompts) == 80
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        assert ids == reference_ids(reference, prompt)
        assert ids[0] == tokenizer.bos_id
        assert tokenizer.decode(ids) == prompt


MIXED_CORPUS = [
    # source code
    'def mean(xs: list[float]) -> float:\n    """Average."""\n    return sum(xs) / len(xs)  # 0.5\n',
    '#include <stdio.h>\nint main(void) {\n\tprintf("%d\\n", 42);\n\treturn 0;\n}\n',
    'fn main() {\n    let v: Vec<u8> = (0..=255).collect();\n    println!("{:?}", &v[..3]);\n}\n',
    "const f = async (x) => { await fetch(`/api/${x}?q=1&r=2`); };\n",
    'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("ciao")\n}\n',
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;\n",
    '<div class="a"><p>Hello&nbsp;world</p></div>\n<?php echo $x; ?>\n',
    "    if (x != y) {\r\n        return;\r\n    }\r\n",
    # CJK, kana, hangul
    "我想在apple工作1314151天～今天天气很好。",
    "日本語のテキスト、カタカナとひらがな。漢字も。",
    "한국어 문장입니다. 안녕하세요!",
    # emoji, including ZWJ sequences, skin tones, flags, keycaps
    "🚀 😶‍🌫️ 👨‍👩‍👧‍👦 👩🏽‍💻 🏳️‍🌈 🇮🇹🇯🇵 1️⃣ ❤️‍🔥 🦙🦙",
    # Italian prose
    "Perché è così difficile? Già, la città più bella è là: però l'università è già chiusa.",
    "È un'òpera d'arte; Ñandú, façade, naïve, Ærøskøbing, Straße.",
    # whitespace and digits
    "a  b   c    d\t\te\t \tf     \n\n\n   \n \t\n",
    "line one\r\nline two\r\n\r\n  indented\r\n",
    "1 12 123 1234 12345 123456 3.14159 1,000,000 0x1F 1e-10 ٣٤٥ ½",
    "   leading and trailing   ",
    # special-token strings in running text, and near misses
    'Say <｜User｜> or <think>this</think> and <｜DSML｜invoke name="x"> with ｜DSML｜ inside.',
    "<｜end▁of▁sentence｜><｜begin▁of▁sentence｜><｜Assistant｜></think>",
    "<｜User>  <think  </thin> ｜DSML <｜fim▁hole｜> <dsml:x> <|EOT|> <｜/table>｜ <｜place▁holder▁no▁3｜>",
    # other scripts and oddities
    "مرحبا بالعالم — שלום עולם — नमस्ते दुनिया — สวัสดีชาวโลก",
    "e\u0301 a\u0308 \u00a0nbsp \u200bzero\u200dwidth \ufeffbom \x00\x1b[31mred\x1b[0m \x7f",
    "“smart quotes” ‘single’ «guillemets» — … ¿¡ ！？。、",
]


def test_mixed_corpus_matches_reference(tokenizer, reference):
    for text in [*MIXED_CORPUS, "".join(MIXED_CORPUS), "\n".join(MIXED_CORPUS) * 3]:
        ids = tokenizer.encode(text)
        assert ids == reference_ids(reference, text)
        assert tokenizer.decode(ids) == text


def test_default_tokenizer_matches_reference(reference):
    default = Tokenizer.default()
    text = "\n".join(MIXED_CORPUS)
    assert default.encode(text) == reference_ids(reference, text)
    assert default.vocab_size == VOCAB_SIZE


FRAGMENTS = ["<｜", "｜>", "<think", "｜DSML", "▁", "\r\n", "  ", "\t", "123456", "😶‍🌫️", "è", "工作"]
PIECES = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(ADDED_TOKENS), st.sampled_from(FRAGMENTS)))


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8")))
def test_random_text_matches_reference(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference_ids(reference, text)
    assert tokenizer.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(pieces=PIECES)
def test_text_with_special_tokens_matches_reference(tokenizer, reference, pieces):
    text = "".join(pieces)
    ids = tokenizer.encode(text)
    assert ids == reference_ids(reference, text)
    assert tokenizer.decode(ids) == text


# --- bytes and streaming -------------------------------------------------------------------------


def test_token_bytes_decode_like_the_reference(tokenizer, reference):
    texts = reference.decode_batch([[token_id] for token_id in range(VOCAB_SIZE)], skip_special_tokens=False)
    assert [tokenizer.token_bytes(i).decode("utf-8", "replace") for i in range(VOCAB_SIZE)] == texts
    assert tokenizer.token_bytes(reference.token_to_id("Ġthe")) == b" the"
    assert tokenizer.token_bytes(tokenizer.bos_id) == chat_tokens.BOS.encode()


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


def test_stream_holds_a_character_split_across_tokens(tokenizer):
    ids = tokenizer.encode("🦙")
    assert len(ids) > 1  # the llama is spelled in byte tokens
    assert stream(tokenizer, ids) == [""] * (len(ids) - 1) + ["🦙", ""]


@settings(max_examples=300, deadline=None)
@given(pieces=PIECES)
def test_stream_reproduces_text(tokenizer, pieces):
    text = "".join(pieces)
    ids = tokenizer.encode(text)
    parts = stream(tokenizer, ids)
    for part in parts:
        part.encode("utf-8")  # no lone surrogates
    assert "".join(parts) == text == tokenizer.decode(ids)
    if "\ufffd" not in text:
        assert all("\ufffd" not in part for part in parts)


BYTE_TOKENS = [token_id for text, token_id in SPEC["model"]["vocab"].items() if len(text) == 1]


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.one_of(st.integers(0, VOCAB_SIZE - 1), st.sampled_from(BYTE_TOKENS)), max_size=24))
def test_stream_of_arbitrary_ids_matches_reference_decode(tokenizer, reference, ids):
    assert "".join(stream(tokenizer, ids)) == reference_text(reference, ids) == tokenizer.decode(ids)
