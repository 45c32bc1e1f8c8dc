"""Token ids → text: pieces, decode flags, and the streaming detokenizer."""

from __future__ import annotations

import pytest
import tokenizer_fixtures as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from realm import TokenizerError
from realm.model._tokenizer import Tokenizer

BYTE = 3  # id of <0x00> in the SentencePiece vocabularies


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return fx.trained_spm(tmp_path_factory.mktemp("spm") / "spm.gguf")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return fx.trained_bpe(tmp_path_factory.mktemp("bpe") / "bpe.gguf")


# --- pieces --------------------------------------------------------------------------------------


def test_spm_pieces(spm: Tokenizer) -> None:
    the = spm.text_to_token("▁the")
    assert the is not None
    assert spm.token_to_piece(the) == b" the"  # ▁ is a space; nothing stripped here
    assert spm.token_to_piece(BYTE + 0xE6) == b"\xe6"  # a byte token: one byte
    assert spm.token_to_piece(1) == b""  # control: hidden unless asked for
    assert spm.token_to_piece(1, render_special=True) == b"<s>"
    assert spm.token_to_piece(0, render_special=True) == b"<unk>"
    tool = spm.text_to_token("<tool>")
    assert spm.token_to_piece(tool) == b"<tool>"  # user-defined: always its text
    unused = spm.text_to_token("[UNUSED_0]")
    assert spm.token_to_piece(unused, render_special=True) == b""  # unused: nothing


def test_bpe_pieces(bpe: Tokenizer) -> None:
    the = bpe.text_to_token("Ġthe")
    assert the is not None
    assert bpe.token_to_piece(the) == b" the"
    assert bpe.token_to_piece(bpe.text_to_token("æ")) == b"\xe6"  # type: ignore[arg-type]
    eot = bpe.text_to_token("<|eot_id|>")
    assert bpe.token_to_piece(eot) == b""
    assert bpe.token_to_piece(eot, render_special=True) == b"<|eot_id|>"


# --- decode --------------------------------------------------------------------------------------


def test_decode_special_tokens(spm: Tokenizer) -> None:
    ids = spm.encode("<s>Hello</s>", parse_special=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert spm.decode(ids) == "Hello"
    assert spm.decode(ids, render_special=True) == "<s>Hello</s>"


def test_decode_space_prefix(spm: Tokenizer) -> None:
    ids = spm.encode("the light")
    assert spm.decode(ids) == "the light"
    assert spm.decode(ids, strip_prefix_space=False) == " the light"  # a continuation
    assert spm.decode(spm.encode("the light", add_special=True)) == "the light"
    # after a special token, the space the encoder added is taken off too
    im_end = spm.text_to_token("<|im_end|>")
    assert spm.decode([*ids, im_end, *ids], render_special=True) == "the light<|im_end|>the light"


def test_bpe_decode_keeps_spaces(bpe: Tokenizer) -> None:
    ids = bpe.encode(" the light ,")
    assert bpe.decode(ids) == " the light ,"  # no clean-up of spaces before punctuation


def test_decode_invalid_utf8(spm: Tokenizer) -> None:
    # the first two bytes of 日 (E6 97 A5), then "a": one replacement character
    ids = [BYTE + 0xE6, BYTE + 0x97, spm.text_to_token("a")]
    assert spm.decode(ids) == "\ufffda"
    assert spm.decode([BYTE + 0xFF]) == "\ufffd"


# --- streaming -----------------------------------------------------------------------------------


def test_stream_holds_back_split_characters(spm: Tokenizer) -> None:
    stream = spm.stream()
    assert stream.push(BYTE + 0xE6) == ""
    assert stream.pending == b"\xe6"
    assert stream.push(BYTE + 0x97) == ""
    assert stream.push(BYTE + 0xA5) == "日"
    assert stream.pending == b""
    assert stream.flush() == ""


def test_stream_flush_ends_an_incomplete_character(spm: Tokenizer) -> None:
    stream = spm.stream()
    assert stream.push(BYTE + 0xF0) + stream.push(BYTE + 0x9F) == ""
    assert stream.flush() == "\ufffd"
    # a new sequence: the leading space is stripped again
    the = spm.text_to_token("▁the")
    assert stream.push(the) == "the"


def test_stream_of_an_encoding(spm: Tokenizer) -> None:
    text = "Köln, 東京 and 🌊!"
    stream = spm.stream()
    chunks = [stream.push(i) for i in spm.encode(text, add_special=True)]
    assert "".join(chunks) + stream.flush() == text
    assert "\ufffd" not in "".join(chunks)


def test_stream_refuses_bad_ids(bpe: Tokenizer) -> None:
    stream = bpe.stream()
    with pytest.raises(TokenizerError, match="out of range"):
        stream.push(bpe.vocab_size)
    with pytest.raises(TokenizerError, match="not bool"):
        stream.push(False)


@settings(max_examples=100)
@given(data=st.data(), render_special=st.booleans(), strip=st.booleans())
def test_stream_equals_decode(
    spm: Tokenizer, bpe: Tokenizer, data: st.DataObject, render_special: bool, strip: bool
) -> None:
    for tok in (spm, bpe):
        ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
        stream = tok.stream(render_special=render_special, strip_prefix_space=strip)
        chunks = [stream.push(i) for i in ids]
        whole = tok.decode(ids, render_special=render_special, strip_prefix_space=strip)
        assert "".join(chunks) + stream.flush() == whole


@settings(max_examples=100)
@given(text=st.text())
def test_stream_never_splits_a_character(bpe: Tokenizer, text: str) -> None:
    # byte-level tokens often end inside a character; nothing is emitted until it is whole
    stream = bpe.stream()
    chunks = [stream.push(i) for i in bpe.encode(text)]
    assert "\ufffd" not in "".join(chunks) or "\ufffd" in text
    assert "".join(chunks) + stream.flush() == text
