"""Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``): llama.cpp's BPE tokenizer.

Pre-tokenizer splits and merge order are checked by hand; whole encodings are compared with
Hugging Face ``tokenizers`` set up as the ``tokenizer.json`` of GPT-2 / Llama-3 / Qwen-2 models
set it up (a regex ``Split`` then ``ByteLevel``), over a vocabulary learned here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tokenizer_fixtures as fx
from hypothesis import example, given, settings
from hypothesis import strategies as st

from realm.model._bpe import BYTE_TO_CHAR, from_byte_level, to_byte_level
from realm.model._pretokenize import (
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    PRE_TOKENIZERS,
    QWEN2_PATTERN,
    find_pre_tokenizer,
    partition_special,
    split_words,
)
from realm.model._tokenizer import Tokenizer


def split(pre: str, text: str) -> list[str]:
    found = find_pre_tokenizer(pre)
    assert found is not None
    return split_words(text, found.patterns)


# --- pre-tokenizers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "gpt2", "llama3", "qwen2"),
    [
        (
            "world's 12345",
            ["world", "'s", " 12345"],
            ["world", "'s", " ", "123", "45"],  # numbers in groups of three
            ["world", "'s", " ", "1", "2", "3", "4", "5"],  # single digits
        ),
        (
            "I'M you'LL",
            ["I", "'", "M", " you", "'", "LL"],  # GPT-2's contractions are lower case only
            ["I", "'M", " you", "'LL"],
            ["I", "'M", " you", "'LL"],
        ),
        (
            "\n\nHi  there \n",
            ["\n", "\n", "Hi", " ", " there", " \n"],
            ["\n\n", "Hi", " ", " there", " \n"],  # \s*[\r\n]+ keeps newlines together
            ["\n\n", "Hi", " ", " there", " \n"],
        ),
        (
            "x\t\ty",
            ["x", "\t", "\t", "y"],
            ["x", "\t", "\ty"],  # one non-letter may lead a word
            ["x", "\t", "\ty"],
        ),
        (
            "$1,000.50!!",
            ["$", "1", ",", "000", ".", "50", "!!"],
            ["$", "1", ",", "000", ".", "50", "!!"],
            ["$", "1", ",", "0", "0", "0", ".", "5", "0", "!!"],
        ),
        ("café 東京", ["café", " 東京"], ["café", " 東京"], ["café", " 東京"]),
    ],
)
def test_pre_tokenizer_splits(
    text: str, gpt2: list[str], llama3: list[str], qwen2: list[str]
) -> None:
    assert split("gpt2", text) == gpt2
    assert split("llama-bpe", text) == llama3
    assert split("qwen2", text) == qwen2


def test_default_pre_tokenizer_splits_punctuation_first() -> None:
    # llama.cpp's choice when tokenizer.ggml.pre is missing: four expressions in a row
    assert split("default", "world's 12345") == ["world", "'", "s", " ", "123", "45"]
    assert find_pre_tokenizer(None) is find_pre_tokenizer("") is PRE_TOKENIZERS["default"]


def test_pre_tokenizer_names() -> None:
    assert find_pre_tokenizer("llama3") is find_pre_tokenizer("llama-bpe")
    assert find_pre_tokenizer("gpt-2") is find_pre_tokenizer("gpt2")
    assert find_pre_tokenizer("deepseek-r1-qwen") is find_pre_tokenizer("qwen2")
    assert find_pre_tokenizer("klingon") is None
    llama3 = find_pre_tokenizer("llama3")
    assert llama3 is not None and llama3.ignore_merges and llama3.add_bos


@given(text=st.text())
def test_splits_cover_the_text(text: str) -> None:
    for pre in ("gpt2", "llama3", "qwen2", "default", "starcoder", "falcon"):
        words = split(pre, text)
        assert "".join(words) == text
        assert all(words)


def test_partition_special_longest_first() -> None:
    specials = [("<|im_end|>", 1), ("<|im", 2), ("end", 3)]
    assert partition_special("a<|im_end|>b<|imx", specials) == ["a", 1, "b", 2, "x"]
    assert partition_special("endend", specials) == [3, 3]
    assert partition_special("", specials) == []


# --- byte level and merges -----------------------------------------------------------------------


def test_byte_level_alphabet() -> None:
    assert len(set(BYTE_TO_CHAR)) == 256
    assert BYTE_TO_CHAR[ord(" ")] == "Ġ" and BYTE_TO_CHAR[ord("\n")] == "Ċ"
    assert BYTE_TO_CHAR[ord("a")] == "a"
    assert to_byte_level(" é") == "ĠÃ©"
    assert from_byte_level("ĠÃ©") == " é".encode()
    # a character outside the alphabet renders as llama.cpp renders it
    assert from_byte_level("a€") == b"a[UNK_BYTE_0xe282aca\xe2\x82\xac]"


@pytest.mark.parametrize(
    ("merges", "pieces"),
    [
        (["a b", "b c"], ["ab", "c"]),  # the lower rank is merged first
        (["b c", "a b"], ["a", "bc"]),
        (["b c", "a bc"], ["abc"]),
        (["a a"], ["aa", "a"]),  # a tie between positions: the leftmost
        (["Ġ a", "Ġa b"], ["Ġab"]),
    ],
)
def test_merge_order(tmp_path: Path, merges: list[str], pieces: list[str]) -> None:
    tok = fx.tiny_bpe(tmp_path / "v.gguf", merges)
    text = "".join(pieces).replace("Ġ", " ")
    assert [tok.token_text(i) for i in tok.encode(text)] == pieces


def test_llama3_takes_whole_words_from_the_vocabulary(tmp_path: Path) -> None:
    # "abc" is a token the merges cannot build: llama3 (ignore_merges) emits it whole
    tokens = [*BYTE_TO_CHAR, "bc", "abc"]
    common = {"model": "gpt2", "tokens": tokens, "merges": ["b c"]}
    llama3 = fx.load(tmp_path / "l.gguf", pre="llama-bpe", ids={"bos": 0}, **common)
    gpt2 = fx.load(tmp_path / "g.gguf", pre="gpt2", **common)
    assert llama3.encode("abc") == [257]
    assert gpt2.encode("abc") == [ord("a"), 256]


def test_merged_symbol_missing_from_vocabulary(tmp_path: Path) -> None:
    # llama.cpp then looks each byte up as a one-character text: only ASCII stand-ins are found
    tokens = [c for c in BYTE_TO_CHAR if c != "Ã"]
    tok = fx.load(tmp_path / "v.gguf", model="gpt2", pre="gpt2", tokens=tokens, merges=["a b"])
    assert [tok.token_text(i) for i in tok.encode("ab")] == ["a", "b"]
    assert [tok.token_text(i) for i in tok.encode("é")] == ["©"]  # "Ã" is not a token: dropped


# --- trained vocabulary --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return fx.trained_bpe(tmp_path_factory.mktemp("bpe") / "llama3.gguf", pre="llama-bpe")


def test_special_tokens(llama3: Tokenizer) -> None:
    eot = llama3.text_to_token("<|eot_id|>")
    tool = llama3.text_to_token("<tool_call>")
    ids = llama3.encode("Hi<|eot_id|><tool_call>", parse_special=True)
    assert ids[-2:] == [eot, tool]
    plain = llama3.encode("Hi<|eot_id|><tool_call>")
    assert eot not in plain and plain[-1] == tool  # user-defined: always a token
    assert llama3.encode("Hi", add_special=True)[0] == llama3.bos_id


def test_corpus_round_trip_and_compression(llama3: Tokenizer) -> None:
    ids = llama3.encode(fx.CORPUS)
    assert llama3.decode(ids) == fx.CORPUS
    assert len(ids) < len(fx.CORPUS.encode()) / 2.5


@settings(max_examples=200)
@given(text=st.text())
@example(text="\u00a0\u2028 \r\n\t")
@example(text="🌊🌊 \x00")
def test_round_trip(llama3: Tokenizer, text: str) -> None:
    assert llama3.decode(llama3.encode(text)) == text


# --- against Hugging Face tokenizers -------------------------------------------------------------


def hf_tokenizer(pattern: str | None, ignore_merges: bool) -> object:
    tokenizers = pytest.importorskip("tokenizers")
    tokens, merges, _ = fx.trained_bpe_vocab()
    model = tokenizers.models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[tuple(m.split(" ")) for m in merges],
        ignore_merges=ignore_merges,
    )
    hf = tokenizers.Tokenizer(model)
    byte_level = tokenizers.pre_tokenizers.ByteLevel
    if pattern is None:  # GPT-2's tokenizer.json: the byte-level step splits with its regex
        hf.pre_tokenizer = byte_level(add_prefix_space=False, use_regex=True)
    else:
        split_step = tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated")
        hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
            [split_step, byte_level(add_prefix_space=False, use_regex=False)]
        )
    return hf


# (GGUF pre, HF pattern, ignore_merges); the Llama-3 pattern is llama.cpp's spelling of the
# contractions ([sS] for (?i:s)), which differs from tokenizer.json only on U+017F
PARITY = {
    "gpt2": ("gpt2", None, False),
    "llama3": ("llama-bpe", LLAMA3_PATTERN, True),
    "qwen2": ("qwen2", QWEN2_PATTERN, False),
    "gpt2-as-split": ("gpt2", GPT2_PATTERN, False),
}
texts = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(fx.CORPUS.split(" ")), max_size=12).map(" ".join),
    st.lists(
        st.sampled_from(["'s", "'LL", " ", "  ", "\n", "\r\n", "\t", "123", "4567", "x", "é", "!"]),
        max_size=12,
    ).map("".join),
)


@pytest.mark.parametrize(("pre", "pattern", "ignore_merges"), PARITY.values(), ids=PARITY.keys())
def test_matches_hf_tokenizers(
    tmp_path_factory: pytest.TempPathFactory, pre: str, pattern: str | None, ignore_merges: bool
) -> None:
    hf = hf_tokenizer(pattern, ignore_merges)
    ours = fx.trained_bpe(tmp_path_factory.mktemp("bpe") / f"{pre}.gguf", pre=pre)

    @settings(max_examples=250)
    @given(text=texts)
    @example(text=fx.CORPUS)
    @example(text="  leading and trailing  \n\n")
    def check(text: str) -> None:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids  # type: ignore[attr-defined]

    check()
