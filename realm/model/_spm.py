"""SentencePiece BPE (``tokenizer.ggml.model == "llama"``), merge for merge as llama.cpp does it.

The text of one fragment (already space-escaped to U+2581 and prefixed) starts as one symbol per
character. Every adjacent pair whose concatenation is a vocabulary entry is a candidate, ranked
by that entry's score (higher first; on a tie the leftmost pair). The best candidate is merged,
its new neighbours become candidates, and so on until none is left. Each final symbol is its
token, or, when it is not in the vocabulary, one ``<0xXX>`` byte token per UTF-8 byte (byte
fallback). This is llama.cpp's ``llm_tokenizer_spm_session`` and SentencePiece's own BPE encoder.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

from .._errors import TokenizerError

#: what the SentencePiece normaliser writes for a space
SPACE_MARK = "\u2581"


def byte_token_text(byte: int) -> str:
    """The vocabulary text of the byte-fallback token for ``byte`` (``<0x0A>`` for 10)."""
    return f"<0x{byte:02X}>"


class SpmModel:
    """Score-driven bigram merges over characters, with byte fallback."""

    __slots__ = ("_byte_ids", "_scores", "_token_to_id", "_unk_id")

    def __init__(
        self, token_to_id: Mapping[str, int], scores: Sequence[float], unk_id: int | None
    ) -> None:
        self._token_to_id = token_to_id
        self._scores = scores
        self._unk_id = unk_id
        # llama.cpp's byte_to_token: the <0xXX> entry, else the byte itself as a one-byte text
        byte_ids: list[int | None] = []
        for byte in range(256):
            found = token_to_id.get(byte_token_text(byte))
            if found is None:
                found = token_to_id.get(bytes([byte]).decode("utf-8", "surrogateescape"))
            byte_ids.append(found)
        self._byte_ids = byte_ids

    def encode(self, text: str, out: list[int]) -> None:
        """Append the ids of ``text`` (one escaped raw-text fragment) to ``out``."""
        n = len(text)
        if n == 0:
            return
        vocab = self._token_to_id
        scores = self._scores
        # symbol i is text[start[i] : start[i] + length[i]]; a merged-away symbol has length 0
        start = list(range(n))
        length = [1] * n
        prev = list(range(-1, n - 1))
        nxt = [*range(1, n), -1]
        heap: list[tuple[float, int, int, int]] = []

        def candidate(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            size = length[left] + length[right]
            token_id = vocab.get(text[start[left] : start[left] + size])
            if token_id is not None:
                heapq.heappush(heap, (-scores[token_id], left, right, size))

        for i in range(1, n):
            candidate(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            # stale: one side was merged away or has grown since this pair was queued
            if length[left] == 0 or length[right] == 0 or length[left] + length[right] != size:
                continue
            length[left] = size
            length[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            candidate(prev[left], left)
            candidate(left, nxt[left])

        i = 0
        while i != -1:
            piece = text[start[i] : start[i] + length[i]]
            token_id = vocab.get(piece)
            if token_id is not None:
                out.append(token_id)
            else:
                self._byte_fallback(piece, out)
            i = nxt[i]

    def _byte_fallback(self, piece: str, out: list[int]) -> None:
        ids = [self._byte_ids[byte] for byte in piece.encode("utf-8")]
        if None not in ids:
            out.extend(ids)  # type: ignore[arg-type]
            return
        # llama.cpp cannot encode this text at all (std::out_of_range); the unknown token, when
        # the vocabulary has one, is the useful answer
        if self._unk_id is None:
            missing = piece.encode("utf-8")[ids.index(None)]
            raise TokenizerError(
                f"cannot encode {piece!r}: the vocabulary has no byte token "
                f"{byte_token_text(missing)} and no unknown token"
            )
        out.append(self._unk_id)
