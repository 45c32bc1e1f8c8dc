"""Tokenizer ids against llama.cpp's own test vectors (``test-tokenizer-0``'s data).

``scripts/fetch_llama_vocab_vectors.py`` (run by ``.ci/run`` at install time) puts llama.cpp's
``ggml-vocab-*.gguf`` files with their ``.inp``/``.out`` vectors in ``REALM_LLAMA_VOCAB_DIR``;
without them this module skips. Each ``.inp`` holds texts separated by
``__ggml_vocab_test__`` lines; each line of ``.out`` holds the ids llama.cpp gives for one text
(``add_special=False``, no special-token parsing).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import realm

VOCABS = ("llama-spm", "llama-bpe", "qwen2", "gpt-2", "falcon", "starcoder", "phi-3")
SEPARATOR = "\n__ggml_vocab_test__\n"
DIR = Path(os.environ.get("REALM_LLAMA_VOCAB_DIR", Path.home() / ".cache/realm/llama-vocab"))


def _vectors(vocab: str) -> tuple[Path, list[tuple[str, list[int]]]]:
    base = DIR / f"ggml-vocab-{vocab}.gguf"
    if not (base.is_file() and base.with_name(base.name + ".out").is_file()):
        pytest.skip(f"llama.cpp vocab vectors not in {DIR} (scripts/fetch_llama_vocab_vectors.py)")
    texts = base.with_name(base.name + ".inp").read_text(encoding="utf-8").split(SEPARATOR)
    ids = base.with_name(base.name + ".out").read_text(encoding="utf-8").splitlines()
    assert len(texts) >= len(ids) > 0
    return base, [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids, strict=False)]


@pytest.mark.parametrize("vocab", VOCABS)
def test_encode_matches_llama_cpp_vectors(vocab: str) -> None:
    path, cases = _vectors(vocab)
    tok = realm.load_tokenizer(path)
    wrong = [(text, tok.encode(text), want) for text, want in cases if tok.encode(text) != want]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, first: {wrong[0]!r}"
