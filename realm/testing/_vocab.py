"""A small llama (SentencePiece) vocabulary, learned from a page of English, for test models.

The pieces are learned by byte-pair encoding over the words of ``_TEXT``, the way a
SentencePiece BPE model is trained: every word is ``"▁" + word``, the most frequent adjacent
pair of symbols is merged again and again, and each merge becomes a piece scored by its rank.
So every piece can be reached by merging smaller pieces that are also in the vocabulary, which
is what llama.cpp's SPM tokenizer needs, and the scores descend with the merge order.

Layout of the vocabulary, as in the original llama tokenizer:

======================  =======================  ==========  =============
ids                     pieces                   type        score
======================  =======================  ==========  =============
0, 1, 2                 ``<unk> <s> </s>``       UNKNOWN,    0
                                                 CONTROL
3 … 258                 ``<0x00>`` … ``<0xFF>``  BYTE        0
259 …                   merged pieces            NORMAL      0, -1, -2, …
then                    single characters        NORMAL      below every merge
then (``vocab_size``)   ``[PAD{id}]``            UNUSED      -1000
======================  =======================  ==========  =============
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter
from collections.abc import Sequence
from typing import Final

import attrs
from gguf import GGUFWriter, TokenType

SPACE: Final = "\u2581"  # "▁", SentencePiece's visible space
UNK_ID: Final = 0
BOS_ID: Final = 1
EOS_ID: Final = 2
N_BYTE_TOKENS: Final = 256
FIRST_PIECE_ID: Final = 3 + N_BYTE_TOKENS
PAD_SCORE: Final = -1000.0  # what llama.cpp's converter gives padding tokens
MIN_PAIR_COUNT: Final = 2  # a merge must occur at least this often in the text
_RUN: Final = re.compile(r"[^\W\d_]+|\d|[^\w\s]+|_+")

_TEXT: Final = """\
The morning was cold and clear, and the river ran fast under the old stone bridge. Anna had
walked to the market before the sun was up, as she did every Saturday, to buy bread, apples,
cheese and a little fish for the evening meal. The market was already busy. Farmers from the
hills were setting out their baskets of potatoes, onions and carrots; a man was selling honey
in small glass jars; two children were helping their father carry boxes of eggs from a cart.
"Good morning," said the baker, who knew her well. "The first loaves are still warm. Will you
take two today, or only one?" Anna laughed and said that two would be better, because her
brother was coming home from the city and he always ate more than he should.

She thought about the long winter that was coming. Last year the snow had closed the road for
nearly three weeks, and the people of the village had shared what they had: wood for the fire,
milk from the few cows that were still giving it, and stories in the evenings when the light
was gone. Her grandmother used to say that a hard winter shows you who your friends are. Anna
was not sure that this was true, but she liked the idea that something good could come from
something difficult.

On the way back she stopped at the small library near the church. The library had been built
more than a hundred years ago, and its wooden shelves held books about history, science,
music, cooking and travel. Anna returned a book about the stars and borrowed another about the
building of ships. She was interested in how things were made: how a ship could be strong
enough to cross an ocean, how a bridge could carry so much weight, how a clock could keep time
for so many years without stopping. The librarian, an old man with kind eyes, told her that
the best way to learn how something works is to build one yourself, even if it is small and
even if it does not work the first time.

When she reached the house, her brother was already there, sitting at the kitchen table and
reading the newspaper. He looked tired from the journey, but he was happy to be home. They
talked for a long time about their work, their plans for the new year, and the friends they
had not seen for many months. In the afternoon they walked together along the river, where
the water was bright in the low winter light, and watched the birds moving over the fields.
Later they cooked the fish with potatoes and onions, opened a bottle of wine, and ate slowly,
the way their parents had taught them. It was a simple day, and it was a good one.

Numbers, dates and measures appear in ordinary writing too: the train leaves at 7:45, the
bridge is 120 metres long, the library opened in 1898, and a loaf of bread costs 3.50 today.
Questions end with a question mark? Lists use commas, and quotations use "double quotes".
"""


@attrs.frozen
class Vocab:
    """Tokenizer metadata for a GGUF file (the ``tokenizer.ggml.*`` keys)."""

    model: str  # tokenizer.ggml.model
    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]  # gguf.TokenType values
    bos_id: int
    eos_id: int
    unk_id: int
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool

    def __len__(self) -> int:
        return len(self.tokens)

    def write(self, writer: GGUFWriter) -> None:
        """Add this vocabulary's keys to ``writer``."""
        writer.add_tokenizer_model(self.model)
        writer.add_token_list(list(self.tokens))
        writer.add_token_scores(list(self.scores))
        writer.add_token_types(list(self.types))
        writer.add_bos_token_id(self.bos_id)
        writer.add_eos_token_id(self.eos_id)
        writer.add_unk_token_id(self.unk_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        writer.add_add_space_prefix(self.add_space_prefix)


def min_spm_vocab_size() -> int:
    """The smallest ``vocab_size`` for :func:`spm_vocab`: specials, bytes and characters."""
    _merges, chars = _learned_pieces()
    return FIRST_PIECE_ID + len(chars)


def natural_spm_vocab_size() -> int:
    """The size of :func:`spm_vocab` with every learned piece and no padding."""
    merges, chars = _learned_pieces()
    return FIRST_PIECE_ID + len(merges) + len(chars)


def spm_vocab(vocab_size: int | None = None) -> Vocab:
    """A llama SentencePiece vocabulary of ``vocab_size`` tokens (all learned pieces if None).

    A smaller size keeps the first (most frequent) merges, which stays consistent: every merge
    is made of characters and earlier merges. A larger size pads with unused tokens.

    Raises:
        ValueError: ``vocab_size`` is below :func:`min_spm_vocab_size`.
    """
    merges, chars = _learned_pieces()
    lowest = FIRST_PIECE_ID + len(chars)
    if vocab_size is None:
        vocab_size = lowest + len(merges)
    if vocab_size < lowest:
        raise ValueError(f"vocab_size must be at least {lowest} for tokenizer 'spm'")
    merges = merges[: vocab_size - lowest]

    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(N_BYTE_TOKENS)]
    types += [TokenType.BYTE] * N_BYTE_TOKENS
    scores: list[float] = [0.0] * len(tokens)
    for rank, piece in enumerate((*merges, *chars)):
        tokens.append(piece)
        types.append(TokenType.NORMAL)
        scores.append(-float(rank))
    for token_id in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{token_id}]")
        types.append(TokenType.UNUSED)
        scores.append(PAD_SCORE)
    return Vocab(
        model="llama",
        tokens=tuple(tokens),
        scores=tuple(scores),
        types=tuple(int(t) for t in types),
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        add_bos=True,
        add_eos=False,
        add_space_prefix=True,
    )


@functools.cache
def _learned_pieces() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(merged pieces in merge order, single characters by descending frequency)."""
    word_counts = Counter(_segments(_TEXT))
    char_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for char in word:
            char_counts[char] += count
    chars = tuple(sorted(char_counts, key=lambda c: (-char_counts[c], c)))
    return _learn_merges(list(word_counts), list(word_counts.values())), chars


def _segments(text: str) -> list[str]:
    """Split ``text`` the way SentencePiece does for llama before learning pieces.

    Whitespace becomes a "▁" prefix; letters, punctuation and single digits are separate runs
    (llama's model splits by Unicode script and splits digits), so no piece mixes them.
    """
    out: list[str] = []
    for word in text.split():
        runs = _RUN.findall(word)
        if runs[0].isdigit():
            out.append(SPACE)
        else:
            runs[0] = SPACE + runs[0]
        out += runs
    return out


def _learn_merges(words: Sequence[str], counts: Sequence[int]) -> tuple[str, ...]:
    """Byte-pair-encoding merges over ``words`` (weighted by ``counts``), in merge order."""
    symbols = [list(word) for word in words]
    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}

    def count_pairs(index: int, sign: int) -> None:
        word = symbols[index]
        for pair in itertools.pairwise(word):
            pair_counts[pair] += sign * counts[index]
            if sign > 0:
                where.setdefault(pair, set()).add(index)

    for index in range(len(symbols)):
        count_pairs(index, +1)

    merges: list[str] = []
    seen = set().union(*symbols)
    while pair_counts:
        # most frequent pair; ties go to the alphabetically first, so the result is stable
        best, best_count = min(pair_counts.items(), key=lambda item: (-item[1], item[0]))
        if best_count < MIN_PAIR_COUNT:
            break
        merged = best[0] + best[1]
        for index in sorted(where.pop(best)):
            word = symbols[index]
            count_pairs(index, -1)
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            symbols[index] = out
            count_pairs(index, +1)
        for pair in [pair for pair, count in pair_counts.items() if count <= 0]:
            del pair_counts[pair]
        if merged not in seen:  # the same string can arise from two different pairs
            seen.add(merged)
            merges.append(merged)
    return tuple(merges)
