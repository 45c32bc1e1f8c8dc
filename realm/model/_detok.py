"""Detokenization: token ids → text, whole or streamed, never splitting a UTF-8 sequence.

Each token renders to a *piece* of bytes (llama.cpp's ``token_to_piece``); the text is the
concatenation of the pieces decoded as UTF-8, with invalid sequences replaced by U+FFFD.

A SentencePiece vocabulary that adds a space prefix (``add_space_prefix``) makes the encoder put
one space before the text at the start and after every special token; by default the decoder
removes exactly that space again, so ``decode(encode(s)) == s``. llama.cpp's ``detokenize`` only
strips the first token's space; the extra rule makes text after a special token round-trip too.
Clean-up of spaces before punctuation (llama.cpp's ``clean_spaces``, HF's
``clean_up_tokenization_spaces``) is never applied: it would break the round trip and the
streamed text, which, like llama.cpp's server, is the plain concatenation of pieces.
"""

from __future__ import annotations

import codecs
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import attrs

from .._errors import TokenizerError

#: most ids one decode call accepts
MAX_DECODE_TOKENS: Final = 1 << 22  # 4 Mi ids


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else TokenizerError naming the parameter."""
    if not isinstance(value, bool):
        raise TokenizerError(f"{name} must be a bool, not {type(value).__name__}")
    return value


def check_token_id(value: Any, vocab_size: int, what: str = "token id") -> int:
    """``value`` as a token id, or TokenizerError naming what is wrong with it."""
    if isinstance(value, bool):
        raise TokenizerError(f"{what} must be an int, not bool ({value!r})")
    try:
        token_id = operator.index(value)
    except TypeError:
        raise TokenizerError(
            f"{what} must be an int, not {type(value).__name__} ({value!r:.40})"
        ) from None
    if not 0 <= token_id < vocab_size:
        raise TokenizerError(f"{what} {token_id} is out of range [0, {vocab_size})")
    return token_id


def iter_token_ids(ids: Any, vocab_size: int, *, max_tokens: int) -> Iterable[int]:
    """Validate a sequence of ids lazily, naming the position of the first bad one."""
    if isinstance(ids, str | bytes | bytearray | Mapping) or not isinstance(ids, Iterable):
        raise TokenizerError(f"ids must be a sequence of ints, not {type(ids).__name__}")
    for i, value in enumerate(ids):
        if i >= max_tokens:
            raise TokenizerError(f"too many ids: more than {max_tokens}")
        yield check_token_id(value, vocab_size, f"ids[{i}]")


@attrs.frozen
class PieceTable:
    """What the detokenizer knows of a vocabulary."""

    #: each token's bytes with special tokens shown (llama.cpp's token_to_piece, special=true)
    pieces: Sequence[bytes] = attrs.field(repr=False)
    #: 1 where a token is hidden unless special tokens are rendered (control, unknown)
    hidden: bytes = attrs.field(repr=False)
    #: 1 where the encoder starts a space-prefixed fragment after the token (special tokens)
    restarts_prefix: bytes = attrs.field(repr=False)
    #: the encoder adds a space prefix (SentencePiece with add_space_prefix)
    space_prefix: bool

    def piece(self, token_id: int, render_special: bool) -> bytes:
        if not render_special and self.hidden[token_id]:
            return b""
        return self.pieces[token_id]


class _PieceWalker:
    """The piece of each id in turn, with the encoder's space prefixes taken off."""

    __slots__ = ("_at_start", "_render_special", "_strip_next", "_table")

    def __init__(self, table: PieceTable, render_special: bool, strip_prefix_space: bool) -> None:
        self._table = table
        self._render_special = render_special
        self._at_start = strip_prefix_space and table.space_prefix
        self._strip_next = self._at_start

    def reset(self) -> None:
        self._strip_next = self._at_start

    def next(self, token_id: int) -> bytes:
        table = self._table
        piece = table.piece(token_id, self._render_special)
        if self._strip_next and piece.startswith(b" "):
            piece = piece[1:]
        self._strip_next = table.space_prefix and bool(table.restarts_prefix[token_id])
        return piece


def decode_ids(
    table: PieceTable,
    ids: Any,
    *,
    render_special: bool,
    strip_prefix_space: bool,
    max_tokens: int = MAX_DECODE_TOKENS,
) -> str:
    """The text of ``ids`` (see the module docstring)."""
    check_flag("render_special", render_special)
    check_flag("strip_prefix_space", strip_prefix_space)
    walker = _PieceWalker(table, render_special, strip_prefix_space)
    checked = iter_token_ids(ids, len(table.pieces), max_tokens=max_tokens)
    return b"".join([walker.next(token_id) for token_id in checked]).decode("utf-8", "replace")


class TokenStream:
    """Incremental detokenizer: text for each id as soon as its characters are complete.

    ``push`` returns the text that the new id completes; the bytes of a character split across
    tokens are held back until the character is whole. ``flush`` ends the sequence, returning what
    is still held (an incomplete character becomes U+FFFD) and starting afresh. The concatenation
    of everything returned equals ``Tokenizer.decode`` of all the ids pushed, with the same flags.
    Create one with ``Tokenizer.stream()``; one stream serves one sequence, from one thread.
    """

    __slots__ = ("_decoder", "_table", "_walker")

    def __init__(
        self, table: PieceTable, *, render_special: bool = False, strip_prefix_space: bool = True
    ) -> None:
        check_flag("render_special", render_special)
        check_flag("strip_prefix_space", strip_prefix_space)
        self._table = table
        self._walker = _PieceWalker(table, render_special, strip_prefix_space)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        checked = check_token_id(token_id, len(self._table.pieces))
        return self._decoder.decode(self._walker.next(checked))

    def flush(self) -> str:
        """End the sequence: return the text still held back, then start a new sequence."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        self._walker.reset()
        return text

    @property
    def pending(self) -> bytes:
        """The bytes held back, waiting for the rest of their character."""
        return self._decoder.getstate()[0]
