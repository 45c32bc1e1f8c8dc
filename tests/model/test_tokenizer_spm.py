"""SentencePiece vocabularies (``tokenizer.ggml.model == "llama"``): llama.cpp's SPM tokenizer.

Hand-checked encodings on a tiny vocabulary, then equality with the ``sentencepiece`` library
itself on a model it trains here (llama.cpp mirrors SentencePiece's BPE encoder), then round
trips through decode.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tokenizer_fixtures as fx
from hypothesis import example, given, settings
from hypothesis import strategies as st

from realm.model._tokenizer import Tokenizer

BYTE = 3  # id of <0x00>; <0xXX> is BYTE + 0xXX
SPACE, A, B, C, D, AB, BC, CD, SPACE_A, AA, ABC, TOOL, IM_END = range(259, 272)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return fx.tiny_spm(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_no_prefix(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tiny") / "tiny-no-prefix.gguf"
    return fx.tiny_spm(path, flags={"add_space_prefix": False})


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return fx.trained_spm(tmp_path_factory.mktemp("spm") / "spm.gguf")


# --- by hand -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("bcd", [SPACE, BC, D]),  # "bc" (-4) is merged before "cd" (-5)
        ("abc", [SPACE_A, BC]),  # "▁a" (-3) wins, so "abc" can no longer form
        ("aaa", [SPACE_A, AA]),
        ("a", [SPACE_A]),
        (" a", [SPACE, SPACE_A]),  # the prefix space and the text's own
        ("a b", [SPACE_A, SPACE, B]),
        ("", []),
        ("é", [SPACE, BYTE + 0xC3, BYTE + 0xA9]),  # byte fallback for a character not in vocab
        ("a\tb", [SPACE_A, BYTE + 0x09, B]),
        ("x🎉", [SPACE, BYTE + 0x78, BYTE + 0xF0, BYTE + 0x9F, BYTE + 0x8E, BYTE + 0x89]),
    ],
)
def test_tiny_encodings(tiny: Tokenizer, text: str, ids: list[int]) -> None:
    assert tiny.encode(text) == ids


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("abc", [ABC]),  # "bc" first, then "a" + "bc" = "abc"
        ("aaa", [AA, A]),  # two "aa" candidates tie: the leftmost is merged
        ("cdab", [CD, AB]),
        (" a", [SPACE_A]),
    ],
)
def test_tiny_encodings_without_space_prefix(
    tiny_no_prefix: Tokenizer, text: str, ids: list[int]
) -> None:
    assert tiny_no_prefix.encode(text) == ids


def test_add_special(tiny: Tokenizer) -> None:
    assert tiny.encode("a", add_special=True) == [1, SPACE_A]
    assert tiny.encode("", add_special=True) == [1]


def test_control_tokens_only_with_parse_special(tiny: Tokenizer) -> None:
    text = "a<|im_end|>a"
    # the text after a special token gets its own space prefix, as in llama.cpp
    assert tiny.encode(text, parse_special=True) == [SPACE_A, IM_END, SPACE_A]
    plain = tiny.encode(text)
    assert IM_END not in plain and plain[0] == SPACE_A
    assert tiny.decode(plain) == text
    assert tiny.encode("<s>a</s>", parse_special=True) == [1, SPACE_A, 2]
    assert tiny.encode("<unk>", parse_special=True) == [0]


def test_user_defined_tokens_always(tiny: Tokenizer) -> None:
    ids = [SPACE_A, TOOL, SPACE, B]
    assert tiny.encode("a<tool>b") == ids
    assert tiny.encode("a<tool>b", parse_special=True) == ids
    assert tiny.decode(ids) == "a<tool>b"


def test_trained_vocabulary_words(spm: Tokenizer) -> None:
    ids = spm.encode("the lighthouse")
    assert [spm.token_text(i) for i in ids] == ["▁the", "▁lighthouse"]


# --- against sentencepiece -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Tokenizer]:
    """A SentencePiece BPE model trained on the corpus, and the same vocabulary as GGUF."""
    sp, tokens, scores, types = fx.sentencepiece_vocab()
    path = tmp_path_factory.mktemp("sp") / "sp.gguf"
    tok = fx.load(path, model="llama", tokens=tokens, scores=scores, types=types)
    return sp, tok


CORPUS_WORDS = fx.CORPUS.split()
texts = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from([*sorted(set(fx.CORPUS)), "  ", "<s>"]), max_size=80).map("".join),
    st.lists(st.sampled_from(CORPUS_WORDS), max_size=12).map(" ".join),
)


@settings(max_examples=300)
@given(text=texts)
@example(text="")
@example(text=fx.CORPUS)
@example(text="  leading and trailing  ")
@example(text="▁already escaped ▁")
def test_matches_sentencepiece(sentencepiece_pair: tuple[object, Tokenizer], text: str) -> None:
    sp, tok = sentencepiece_pair
    assert tok.encode(text) == sp.encode(text)  # type: ignore[attr-defined]


# --- round trips ---------------------------------------------------------------------------------


# "▁" is how the vocabulary writes a space, so a literal one decodes to a space
no_space_mark = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\u2581"))


@settings(max_examples=100)
@given(text=no_space_mark)
@example(text=" ")
@example(text="  two leading spaces")
def test_round_trip(spm: Tokenizer, text: str) -> None:
    assert spm.decode(spm.encode(text)) == text
    assert spm.decode(spm.encode(text, add_special=True)) == text


@settings(max_examples=100)
@given(
    parts=st.lists(
        st.one_of(no_space_mark, st.sampled_from(["<s>", "</s>", "<|im_end|>", "<tool>", "<unk>"]))
    )
)
def test_round_trip_with_special_tokens(spm: Tokenizer, parts: list[str]) -> None:
    text = "".join(parts)
    ids = spm.encode(text, parse_special=True)
    assert spm.decode(ids, render_special=True) == text


def test_corpus_encodes_quickly(spm: Tokenizer) -> None:
    text = fx.CORPUS * 20  # ~36 KB: catches a quadratic merge loop
    assert spm.decode(spm.encode(text)) == text


def test_equal_scores_keep_the_leftmost_pair(tmp_path: Path) -> None:
    tokens, scores, types = fx.spm_base()
    for piece in ("x", "y", "xy", "yx"):
        tokens.append(piece)
        scores.append(-1.0)
        types.append(fx.NORMAL)
    tok = fx.load(
        tmp_path / "v.gguf",
        model="llama",
        tokens=tokens,
        scores=scores,
        types=types,
        flags={"add_space_prefix": False},
    )
    xy, yx = tokens.index("xy"), tokens.index("yx")
    assert tok.encode("xyx") == [xy, tokens.index("x")]
    assert tok.encode("yxy") == [yx, tokens.index("y")]
