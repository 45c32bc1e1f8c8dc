"""Our tokenizer against llama.cpp's own, on the same vocabulary-only GGUF files.

llama-cpp-python (the ``[bench]`` extra) loads each file with ``vocab_only=True``; where it is
not installed this module is skipped. Compared: ``llama_tokenize`` for every combination of
``add_special`` and ``parse_special``, ``llama_token_to_piece`` for every token, the special ids,
the end-of-generation set, and ``llama_detokenize`` where the two decoders are meant to agree.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tokenizer_fixtures as fx
from hypothesis import example, given, settings
from hypothesis import strategies as st

from realm.model._tokenizer import EOT_TEXTS, Tokenizer, TokenType

llama_cpp = pytest.importorskip("llama_cpp")


def _sentencepiece(path: Path, **kw: Any) -> Tokenizer:
    _, tokens, scores, types = fx.sentencepiece_vocab()
    return fx.load(path, model="llama", tokens=tokens, scores=scores, types=types, **kw)


def _bpe(pre: str | None) -> Callable[..., Tokenizer]:
    return lambda path, **kw: fx.trained_bpe(path, pre=pre, **kw)


VOCABS: dict[str, Callable[..., Tokenizer]] = {
    "spm": fx.trained_spm,
    "spm-tiny": fx.tiny_spm,
    "spm-no-prefix": lambda path, **kw: fx.tiny_spm(path, flags={"add_space_prefix": False}, **kw),
    "spm-add-eos": lambda path, **kw: fx.trained_spm(path, flags={"add_eos": True}, **kw),
    "sentencepiece": _sentencepiece,
    "llama-bpe": _bpe("llama-bpe"),
    "gpt-2": _bpe("gpt-2"),
    "qwen2": _bpe("qwen2"),
    "default": _bpe(None),
    "starcoder": _bpe("starcoder"),
    "falcon": _bpe("falcon"),
}


@pytest.fixture(scope="module", params=VOCABS.keys())
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path = tmp_path_factory.mktemp("vocab") / f"{request.param}.gguf"
    ours = VOCABS[request.param](path, extra=fx.llama_hparams)
    theirs = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        yield ours, theirs
    finally:
        theirs.close()


def _piece(theirs: Any, token_id: int, special: bool) -> bytes:
    buffer = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(theirs._model.vocab, token_id, buffer, 256, 0, special)
    assert 0 <= n <= 256
    return buffer.raw[:n]


def _detokenize(theirs: Any, ids: list[int], unparse_special: bool) -> bytes:
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    buffer = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_detokenize(
        theirs._model.vocab, tokens, len(ids), buffer, 4096, False, unparse_special
    )
    assert 0 <= n <= 4096
    return buffer.raw[:n]


def _specials(ours: Tokenizer) -> list[str]:
    kinds = {TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN}
    return [ours.token_text(i) for i in range(ours.vocab_size) if ours.token_type(i) in kinds]


def test_special_ids_and_flags(pair: Any) -> None:
    ours, theirs = pair
    vocab = theirs._model.vocab

    def none_if_null(token_id: int) -> int | None:
        return None if token_id < 0 else token_id

    assert ours.vocab_size == llama_cpp.llama_vocab_n_tokens(vocab)
    assert ours.bos_id == none_if_null(llama_cpp.llama_vocab_bos(vocab))
    assert ours.eos_id == none_if_null(llama_cpp.llama_vocab_eos(vocab))
    # with several end-of-turn texts llama.cpp takes the first in its hash map's order
    candidates = {i for i in ours.eog_ids if ours.token_text(i) in EOT_TEXTS} or {None}
    theirs_eot = none_if_null(llama_cpp.llama_vocab_eot(vocab))
    if len(candidates) == 1:
        assert ours.eot_id == theirs_eot
    else:
        assert ours.eot_id in candidates and theirs_eot in candidates
    assert ours.pad_id == none_if_null(llama_cpp.llama_vocab_pad(vocab))
    assert ours.add_bos == llama_cpp.llama_vocab_get_add_bos(vocab)
    assert ours.add_eos == llama_cpp.llama_vocab_get_add_eos(vocab)
    eog = {i for i in range(ours.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert ours.eog_ids == eog
    control = {i for i in range(ours.vocab_size) if llama_cpp.llama_vocab_is_control(vocab, i)}
    assert {i for i in range(ours.vocab_size) if ours.token_type(i) is TokenType.CONTROL} == control


def test_every_piece(pair: Any) -> None:
    ours, theirs = pair
    for token_id in range(ours.vocab_size):
        for special in (False, True):
            assert ours.token_to_piece(token_id, render_special=special) == _piece(
                theirs, token_id, special
            ), (token_id, special)


def _texts(ours: Tokenizer) -> st.SearchStrategy[str]:
    fragments = [
        *fx.CORPUS.split(" "),
        *_specials(ours),
        " ", "  ", "\n", "\r\n", "\t", "'s", "'LL", "123", "4567", "é", "東京", "🌊", "!?", "▁",
    ]  # fmt: skip
    return st.one_of(
        st.text(max_size=40),
        st.lists(st.sampled_from(fragments), max_size=16).map("".join),
        st.lists(st.one_of(st.sampled_from(fragments), st.text(max_size=3)), max_size=12).map(
            "".join
        ),
    )


def test_tokenize(pair: Any) -> None:
    ours, theirs = pair

    @settings(max_examples=150)
    @given(text=_texts(ours), add_special=st.booleans(), parse_special=st.booleans())
    @example(text="", add_special=True, parse_special=False)
    @example(text=fx.CORPUS, add_special=False, parse_special=False)
    def check(text: str, add_special: bool, parse_special: bool) -> None:
        expected = theirs.tokenize(text.encode(), add_bos=add_special, special=parse_special)
        assert ours.encode(text, add_special, parse_special=parse_special) == expected

    check()


def test_detokenize(pair: Any) -> None:
    """Without special tokens in the ids, decode is llama_detokenize (less its space clean-up).

    llama.cpp strips the first token's leading space only, we also strip after special tokens;
    for BPE vocabularies (other than Qwen-2's) it also removes spaces before punctuation.
    """
    ours, theirs = pair
    plain = [
        i
        for i in range(ours.vocab_size)
        if ours.token_type(i) not in {TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN}
    ]
    cleans_spaces = ours.model == "gpt2" and ours.pre not in ("qwen2",)

    @settings(max_examples=100)
    @given(ids=st.lists(st.sampled_from(plain), max_size=30), special=st.booleans())
    def check(ids: list[int], special: bool) -> None:
        text = ours.decode(ids, render_special=special)
        if cleans_spaces:
            pieces = b"".join(_piece(theirs, i, special) for i in ids)
            assert text == pieces.decode("utf-8", "replace")
        else:
            expected = _detokenize(theirs, ids, special).decode("utf-8", "replace")
            assert text == expected

    check()
