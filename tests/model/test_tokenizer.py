"""Loading a tokenizer from GGUF metadata: fields, defaults, special ids, and what is refused."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import tokenizer_fixtures as fx

from realm import TokenizerError
from realm.model._tokenizer import MAX_TEXT_BYTES, Tokenizer, TokenType, load_tokenizer


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return fx.trained_spm(tmp_path_factory.mktemp("spm") / "spm.gguf")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return fx.trained_bpe(tmp_path_factory.mktemp("bpe") / "bpe.gguf")


# --- loading -------------------------------------------------------------------------------------


def test_vocab_only_spm_file(spm: Tokenizer) -> None:
    tokens, _, _ = fx.trained_spm_vocab()
    assert spm.model == "llama"
    assert spm.vocab_size == len(tokens)
    assert (spm.bos_id, spm.eos_id, spm.unk_id, spm.pad_id) == (1, 2, 0, None)
    assert spm.add_bos and not spm.add_eos and spm.add_space_prefix
    assert spm.token_text(1) == "<s>"
    assert spm.token_type(1) is TokenType.CONTROL
    assert spm.token_type(3) is TokenType.BYTE
    assert spm.text_to_token("<0x0A>") == 3 + 10
    assert spm.text_to_token("no such token") is None
    assert spm.chat_template is None


def test_vocab_only_bpe_file(bpe: Tokenizer) -> None:
    tokens, _, _ = fx.trained_bpe_vocab()
    assert (bpe.model, bpe.pre) == ("gpt2", "llama-bpe")
    assert bpe.vocab_size == len(tokens)
    assert bpe.bos_id == tokens.index("<|begin_of_text|>")
    assert bpe.eos_id == tokens.index("<|endoftext|>")
    assert bpe.add_bos  # the llama3 pre-tokenizer implies it, as in llama.cpp
    assert not bpe.add_space_prefix


def test_from_reader_reuses_an_open_reader(tmp_path: Path, spm: Tokenizer) -> None:
    path = fx.write_gguf(tmp_path / "v.gguf", model="llama", tokens=fx.trained_spm_vocab()[0])
    reader = gguf.GGUFReader(path)
    tok = Tokenizer.from_reader(reader, path=path)
    assert tok.path == str(path)
    assert Tokenizer.from_reader(reader).path == str(path)  # named from the mapping
    text = "The lighthouse keeper's light."
    # no scores in this file: every merge ties, so only the shape is compared
    assert tok.decode(tok.encode(text)) == text


def test_repr_is_short(spm: Tokenizer) -> None:
    assert len(repr(spm)) < 400
    assert "<0x00>" not in repr(spm)


def test_llama_defaults_without_ids(tmp_path: Path) -> None:
    tokens, scores, types = fx.spm_base()
    tok = fx.load(tmp_path / "v.gguf", model="llama", tokens=tokens, scores=scores, types=types)
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)  # llama.cpp's SPM defaults
    assert tok.add_bos and tok.add_space_prefix
    assert tok.encode("", add_special=True) == [1]


def test_flags_from_metadata(tmp_path: Path) -> None:
    tok = fx.tiny_spm(
        tmp_path / "v.gguf", flags={"add_bos": False, "add_eos": True, "add_space_prefix": False}
    )
    assert not tok.add_bos and tok.add_eos and not tok.add_space_prefix
    assert tok.encode("a", add_special=True) == [260, 2]


def test_gpt2_pre_does_not_add_bos(tmp_path: Path) -> None:
    tok = fx.trained_bpe(tmp_path / "v.gguf", pre="gpt2")
    assert not tok.add_bos
    assert tok.encode("Hi", add_special=True) == tok.encode("Hi")


def test_end_of_generation_ids(bpe: Tokenizer) -> None:
    eot = bpe.text_to_token("<|eot_id|>")
    im_end = bpe.text_to_token("<|im_end|>")
    assert bpe.eot_id == eot  # found by its text, as llama.cpp does
    assert {bpe.eos_id, eot, im_end} <= bpe.eog_ids
    assert bpe.is_eog(im_end) and not bpe.is_eog(bpe.bos_id)
    assert bpe.is_special(im_end) and not bpe.is_special(bpe.text_to_token("<tool_call>"))


def test_eot_from_metadata_and_promotion_to_control(tmp_path: Path) -> None:
    tokens, merges, types = fx.trained_bpe_vocab()
    types = list(types)
    im_end = tokens.index("<|im_end|>")
    types[im_end] = fx.NORMAL  # a converter that forgot to mark it
    tok = fx.load(
        tmp_path / "v.gguf",
        model="gpt2",
        pre="qwen2",
        tokens=tokens,
        types=types,
        merges=merges,
        ids={"eos": tokens.index("<|endoftext|>"), "eot": im_end},
    )
    assert tok.eot_id == im_end
    assert tok.token_type(im_end) is TokenType.CONTROL
    assert tok.encode("<|im_end|>", parse_special=True) == [im_end]
    assert im_end not in tok.encode("<|im_end|>")


def test_empty_token_text_is_renamed(tmp_path: Path) -> None:
    tokens, _, types = fx.spm_base()
    tokens.append("")
    tok = fx.load(tmp_path / "v.gguf", model="llama", tokens=tokens, types=[*types, fx.NORMAL])
    assert tok.token_text(len(tokens) - 1) == f"[EMPTY_{len(tokens) - 1}]"


# --- refused files -------------------------------------------------------------------------------


def _spm_kwargs(**changes: Any) -> dict[str, Any]:
    tokens, scores, types = fx.spm_base()
    kwargs: dict[str, Any] = {"model": "llama", "tokens": tokens, "scores": scores, "types": types}
    kwargs.update(changes)
    return kwargs


def _bpe_kwargs(**changes: Any) -> dict[str, Any]:
    tokens, merges, types = fx.trained_bpe_vocab()
    kwargs: dict[str, Any] = {
        "model": "gpt2",
        "pre": "gpt2",
        "tokens": tokens,
        "types": types,
        "merges": merges,
    }
    kwargs.update(changes)
    return kwargs


BAD_FILES = {
    "no model": (_spm_kwargs(model=None), "tokenizer.ggml.model", "missing"),
    "model bert": (_spm_kwargs(model="bert"), "tokenizer.ggml.model", "unsupported"),
    "model no_vocab": (_spm_kwargs(model="no_vocab"), "tokenizer.ggml.model", "no vocabulary"),
    "no tokens": (
        _spm_kwargs(tokens=None, scores=None, types=None),
        "tokenizer.ggml.tokens",
        "missing",
    ),
    "duplicate": (
        _spm_kwargs(tokens=[*fx.spm_base()[0][:-1], "<s>"]),
        "tokenizer.ggml.tokens",
        "duplicate token '<s>'",
    ),
    "few scores": (_spm_kwargs(scores=[0.0] * 5), "tokenizer.ggml.scores", "5 scores"),
    "nan score": (_spm_kwargs(scores=[math.nan] * 259), "tokenizer.ggml.scores", "NaN"),
    "few types": (_spm_kwargs(types=[1] * 5), "tokenizer.ggml.token_type", "5 types"),
    "bad byte token": (
        _spm_kwargs(tokens=[*fx.spm_base()[0][:-1], "<0xZZ>"]),
        "tokenizer.ggml.tokens",
        "byte token 258",
    ),
    "bos out of range": (_spm_kwargs(ids={"bos": 259}), "tokenizer.ggml.bos_token_id", "259"),
    "eos out of range": (_spm_kwargs(ids={"eos": 10**6}), "tokenizer.ggml.eos_token_id", "outside"),
    "eot out of range": (_spm_kwargs(ids={"eot": 300}), "tokenizer.ggml.eot_token_id", "outside"),
    "tokens not array": (
        _spm_kwargs(
            tokens=None,
            scores=None,
            types=None,
            extra=lambda w: w.add_string("tokenizer.ggml.tokens", "abc"),
        ),
        "tokenizer.ggml.tokens",
        "array of strings",
    ),
    "scores as strings": (
        _spm_kwargs(scores=None, extra=lambda w: w.add_array("tokenizer.ggml.scores", ["x"])),
        "tokenizer.ggml.scores",
        "array of float32",
    ),
    "add_bos not bool": (
        _spm_kwargs(extra=lambda w: w.add_uint32("tokenizer.ggml.add_bos_token", 1)),
        "tokenizer.ggml.add_bos_token",
        "must be a bool",
    ),
    "bos id as string": (
        _spm_kwargs(extra=lambda w: w.add_string("tokenizer.ggml.bos_token_id", "1")),
        "tokenizer.ggml.bos_token_id",
        "must be an integer",
    ),
    "template not string": (
        _spm_kwargs(extra=lambda w: w.add_uint32("tokenizer.chat_template", 7)),
        "tokenizer.chat_template",
        "must be a string",
    ),
    "no merges": (_bpe_kwargs(merges=None), "tokenizer.ggml.merges", "missing"),
    "unknown pre": (_bpe_kwargs(pre="klingon"), "tokenizer.ggml.pre", "unsupported pre-tokenizer"),
    "add_bos without bos": (
        {"model": "gpt2", "tokens": ["a", "b"], "merges": [], "flags": {"add_bos": True}},
        "tokenizer.ggml.add_bos_token",
        "bos_token_id is not set",
    ),
    "add_eos without eos": (
        {"model": "gpt2", "tokens": ["a", "b"], "merges": [], "flags": {"add_eos": True}},
        "tokenizer.ggml.add_eos_token",
        "eos_token_id is not set",
    ),
}


@pytest.mark.parametrize(("kwargs", "field", "reason"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_metadata_names_file_and_field(
    tmp_path: Path, kwargs: dict[str, Any], field: str, reason: str
) -> None:
    path = fx.write_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(path)
    message = str(info.value)
    assert str(path) in message and field in message and reason in message
    assert (info.value.path, info.value.field) == (str(path), field)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"missing\.gguf: cannot read as GGUF"):
        load_tokenizer(tmp_path / "missing.gguf")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(TokenizerError, match=r"junk\.gguf: cannot read as GGUF") as info:
        load_tokenizer(path)
    assert info.value.path == str(path)


# --- careless callers ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", [b"bytes", None, 5, ["a"], 1.5])
def test_encode_refuses_non_str(spm: Tokenizer, text: Any) -> None:
    with pytest.raises(TokenizerError, match="text must be a str"):
        spm.encode(text)


def test_encode_refuses_lone_surrogate(bpe: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match=r"lone surrogate '\\ud800' at index 2"):
        bpe.encode("ab\ud800cd")


def test_encode_refuses_huge_text(spm: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="text too long"):
        spm.encode("é" * (MAX_TEXT_BYTES // 2 + 1))
    with pytest.raises(TokenizerError, match="10 UTF-8 bytes > max_bytes=9"):
        spm.encode("a" * 10, max_bytes=9)


@pytest.mark.parametrize("flag", ["add_special", "parse_special"])
def test_encode_refuses_non_bool_flags(spm: Tokenizer, flag: str) -> None:
    with pytest.raises(TokenizerError, match=f"{flag} must be a bool"):
        spm.encode("a", **{flag: 1})


@pytest.mark.parametrize("flag", ["render_special", "strip_prefix_space"])
def test_decode_refuses_non_bool_flags(spm: Tokenizer, flag: str) -> None:
    with pytest.raises(TokenizerError, match=f"{flag} must be a bool, not str"):
        spm.decode([5], **{flag: "yes"})
    with pytest.raises(TokenizerError, match=f"{flag} must be a bool, not NoneType"):
        spm.stream(**{flag: None})
    if flag == "render_special":
        with pytest.raises(TokenizerError, match=f"{flag} must be a bool"):
            spm.token_to_piece(5, render_special=1)


BAD_IDS = {
    "negative": (-1, "out of range"),
    "too large": (10**9, "out of range"),
    "bool": (True, "not bool"),
    "float": (1.0, "not float"),
    "str": ("1", "not str"),
    "none": (None, "not NoneType"),
}


@pytest.mark.parametrize(("bad", "reason"), BAD_IDS.values(), ids=BAD_IDS.keys())
def test_bad_ids_everywhere(spm: Tokenizer, bad: Any, reason: str) -> None:
    with pytest.raises(TokenizerError, match=rf"ids\[1\].*{reason}"):
        spm.decode([5, bad])
    for method in (spm.token_to_piece, spm.token_text, spm.token_type, spm.is_special, spm.is_eog):
        with pytest.raises(TokenizerError, match=reason):
            method(bad)
    with pytest.raises(TokenizerError, match=reason):
        spm.stream().push(bad)


def test_vocab_size_is_the_first_bad_id(spm: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match=rf"{spm.vocab_size} is out of range \[0, "):
        spm.decode([spm.vocab_size])
    spm.decode([spm.vocab_size - 1])


@pytest.mark.parametrize("ids", ["abc", b"abc", 5, {"a": 1}, None])
def test_decode_refuses_non_sequences(spm: Tokenizer, ids: Any) -> None:
    with pytest.raises(TokenizerError, match="ids must be a sequence of ints"):
        spm.decode(ids)


def test_decode_accepts_numpy_and_tuples(spm: Tokenizer) -> None:
    ids = spm.encode("The light")
    assert spm.decode(np.array(ids, dtype=np.int32)) == "The light"
    assert spm.decode(tuple(ids)) == "The light"
    assert spm.decode(iter(ids)) == "The light"


def test_decode_refuses_too_many_ids(spm: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="too many ids"):
        spm.decode([5] * 11, max_tokens=10)


def test_text_to_token_refuses_non_str(spm: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="text must be a str"):
        spm.text_to_token(b"<s>")  # type: ignore[arg-type]
