"""Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) as llama.cpp's ``llm_tokenizer_bpe`` does it.

Each word from the pre-tokenizer is written as UTF-8 and every byte replaced by GPT-2's printable
stand-in character (:data:`BYTE_TO_CHAR`). The word starts as one symbol per character; the
adjacent pair with the lowest merge rank (its position in ``tokenizer.ggml.merges``; on a tie the
leftmost) is merged until no pair has a rank. Each symbol is then its token.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from typing import Final

import regex

from ._pretokenize import split_words

#: words remembered per tokenizer, so that common words are merged once
WORD_CACHE_ENTRIES: Final = 1 << 16


def _byte_to_char() -> tuple[str, ...]:
    # printable Latin-1 bytes stand for themselves; the others take 256, 257, ... in byte order
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


#: GPT-2's bytes → unicode table: BYTE_TO_CHAR[b] is the character that stands for byte b
BYTE_TO_CHAR: Final = _byte_to_char()
#: the inverse of :data:`BYTE_TO_CHAR`
CHAR_TO_BYTE: Final = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
# str.translate table taking a Latin-1 decoded byte string to its byte-level form
_LATIN1_TO_BYTE_LEVEL: Final = {b: c for b, c in enumerate(BYTE_TO_CHAR)}


def to_byte_level(text: str) -> str:
    """The byte-level form of ``text``: one stand-in character per UTF-8 byte."""
    return text.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_LEVEL)


#: byte-level character -> the Latin-1 character of its byte; the Latin-1 characters outside
#: the alphabet map to U+FFFF, which cannot encode as Latin-1 (so they take the slow path)
_BYTE_LEVEL_TO_LATIN1: Final = {
    **{b: "\uffff" for b in range(256)},
    **{ord(c): chr(b) for c, b in CHAR_TO_BYTE.items()},
}


def from_byte_level(token_text: str) -> bytes:
    """The bytes a byte-level token stands for (llama.cpp's ``llama_decode_text``).

    A character outside the byte-level alphabet is rendered as llama.cpp renders it,
    ``[UNK_BYTE_0x<hex of its UTF-8>`` followed by the token text and ``]``.
    """
    try:  # every character in the alphabet: one translate and one encode
        return token_text.translate(_BYTE_LEVEL_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        pass
    out = bytearray()
    for char in token_text:
        byte = CHAR_TO_BYTE.get(char)
        if byte is not None:
            out.append(byte)
        else:
            utf8 = char.encode("utf-8", "surrogateescape")
            out += b"[UNK_BYTE_0x" + utf8.hex().encode()
            out += token_text.encode("utf-8", "surrogateescape") + b"]"
    return bytes(out)


class BpeModel:
    """Rank-driven merges over the byte-level characters of each pre-tokenized word."""

    __slots__ = ("_cache", "_ignore_merges", "_patterns", "_ranks", "_token_to_id")

    def __init__(
        self,
        token_to_id: Mapping[str, int],
        ranks: Mapping[tuple[str, str], int],
        patterns: Sequence[regex.Pattern[str]],
        *,
        ignore_merges: bool,
    ) -> None:
        self._token_to_id = token_to_id
        self._ranks = ranks
        self._patterns = tuple(patterns)
        self._ignore_merges = ignore_merges
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str, out: list[int]) -> None:
        """Append the ids of ``text`` (one raw-text fragment) to ``out``."""
        cache = self._cache
        for word in split_words(text, self._patterns):
            ids = cache.get(word)
            if ids is None:
                ids = self._encode_word(to_byte_level(word))
                if len(cache) >= WORD_CACHE_ENTRIES:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        vocab = self._token_to_id
        if self._ignore_merges:
            whole = vocab.get(word)
            if whole is not None:
                return (whole,)
        ranks = self._ranks
        symbols = list(word)
        n = len(symbols)
        prev = list(range(-1, n - 1))
        nxt = [*range(1, n), -1]
        heap: list[tuple[int, int, int, str]] = []

        def candidate(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            rank = ranks.get((symbols[left], symbols[right]))
            if rank is not None:
                heapq.heappush(heap, (rank, left, right, symbols[left] + symbols[right]))

        for i in range(1, n):
            candidate(i - 1, i)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            left_text, right_text = symbols[left], symbols[right]
            # stale: a side was merged away (empty) or has grown since the pair was queued
            if not left_text or not right_text or left_text + right_text != merged:
                continue
            symbols[left] = merged
            symbols[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            candidate(prev[left], left)
            candidate(left, nxt[left])

        ids: list[int] = []
        i = 0 if n else -1
        while i != -1:
            token_id = vocab.get(symbols[i])
            if token_id is not None:
                ids.append(token_id)
            else:
                # llama.cpp looks each UTF-8 byte of the symbol up as a one-byte text and drops
                # what it does not find; only ASCII stand-ins can be found that way
                for byte in symbols[i].encode("utf-8"):
                    if byte < 0x80:
                        byte_id = vocab.get(chr(byte))
                        if byte_id is not None:
                            ids.append(byte_id)
            i = nxt[i]
        return tuple(ids)
