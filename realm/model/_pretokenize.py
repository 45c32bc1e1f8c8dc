"""Pre-tokenization: special-token partitioning and the regex word splits of byte-level BPE.

Both steps follow llama.cpp (``src/llama-vocab.cpp``, ``src/unicode.cpp``):

* :func:`partition_special` cuts the text at every occurrence of a special token, one token at a
  time, longest token text first, exactly as ``tokenizer_st_partition`` does.
* :func:`split_words` applies a pre-tokenizer's regular expressions one after the other; each
  expression splits every piece produced by the previous one, and the unmatched stretches between
  matches stay pieces of their own (``unicode_regex_split``).

llama.cpp evaluates the GPT-2 and Llama-3 expressions with hand-written matchers and the others
with ``std::regex`` over a text in which every non-ASCII code point is collapsed to a byte that
stands for its Unicode category. Both agree with the ``regex`` package's ``\\p{L}``, ``\\p{N}``,
``\\p{P}`` and ``\\s`` (Unicode ``White_Space``) on every code point whose category is the same
in the two Unicode databases; a code point assigned only in the newer one may differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import attrs
import regex

#: GPT-2's expression. llama.cpp lists it without the final ``|\s+`` but its matcher has it.
GPT2_PATTERN: Final = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
#: Llama-3's expression, with the case-insensitive contractions spelled out as llama.cpp does
#: (``(?i:'s)`` would also match the long s, U+017F, through Unicode case folding).
LLAMA3_PATTERN: Final = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Qwen-2's expression: Llama-3's with single digits.
QWEN2_PATTERN: Final = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@attrs.frozen
class PreTokenizer:
    """One ``tokenizer.ggml.pre`` value: its expressions and the vocabulary flags it implies."""

    #: the canonical llama.cpp name of this pre-tokenizer type
    name: str
    #: regular expressions applied in order (see :func:`split_words`)
    patterns: tuple[regex.Pattern[str], ...] = attrs.field(repr=False)
    #: a word that is itself a token is emitted whole, without running the merges
    ignore_merges: bool = False
    #: the ``add_bos_token`` default when the file does not set it
    add_bos: bool = False


def _pre(
    name: str, *patterns: str, ignore_merges: bool = False, add_bos: bool = False
) -> PreTokenizer:
    return PreTokenizer(
        name,
        tuple(regex.compile(p) for p in patterns),
        ignore_merges=ignore_merges,
        add_bos=add_bos,
    )


_DEFAULT = _pre("default", r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN, r"\p{N}+", r"[0-9][0-9][0-9]")
_GPT2 = _pre("gpt2", GPT2_PATTERN)
_LLAMA3 = _pre("llama3", LLAMA3_PATTERN, ignore_merges=True, add_bos=True)
_DBRX = _pre("dbrx", LLAMA3_PATTERN)
_QWEN2 = _pre("qwen2", QWEN2_PATTERN)
_STARCODER = _pre("starcoder", r"\p{N}", GPT2_PATTERN)
_FALCON = _pre("falcon", r"[\p{P}\$\+<=>\^~\|`]+", GPT2_PATTERN, r"[0-9][0-9][0-9]")


def _aliases(pre: PreTokenizer, *names: str) -> dict[str, PreTokenizer]:
    return dict.fromkeys(names, pre)


#: ``tokenizer.ggml.pre`` values understood, with the names llama.cpp accepts for each type
PRE_TOKENIZERS: Final[dict[str, PreTokenizer]] = {
    "default": _DEFAULT,
    **_aliases(
        _GPT2,
        "gpt2",
        "gpt-2",
        "phi-2",
        "jina-es",
        "jina-de",
        "gigachat",
        "jina-v2-es",
        "jina-v2-de",
        "a.x-4.0",
        "mellum",
        "modern-bert",
        "mpt",
        "olmo",
        "jais",
        "trillion",
        "granite-docling",
        "exaone4",
    ),
    **_aliases(
        _LLAMA3,
        "llama3",
        "llama-v3",
        "llama-bpe",
        "falcon3",
        "falcon-h1",
        "pixtral",
        "midm-2.0",
        "lfm2",
        "jina-v5-nano",
    ),
    **_aliases(_DBRX, "dbrx", "smaug-bpe"),
    **_aliases(
        _QWEN2,
        "qwen2",
        "deepseek-r1-qwen",
        "kormo",
        "f2llmv2",
        "megrez",
        "stablelm2",
        "hunyuan",
        "solar-open",
    ),
    **_aliases(
        _STARCODER,
        "starcoder",
        "refact",
        "command-r",
        "smollm",
        "codeshell",
        "exaone",
        "minerva-7b",
        "mellum2",
    ),
    "falcon": _FALCON,
}


def find_pre_tokenizer(name: str | None) -> PreTokenizer | None:
    """The pre-tokenizer for a ``tokenizer.ggml.pre`` value (None or empty: ``default``).

    Returns None for a name this module does not know.
    """
    if not name:
        return _DEFAULT
    return PRE_TOKENIZERS.get(name)


def split_words(text: str, patterns: Sequence[regex.Pattern[str]]) -> list[str]:
    """Split ``text`` into the words that BPE merges run on (matches and the gaps between)."""
    pieces = [text]
    for pattern in patterns:
        out: list[str] = []
        for piece in pieces:
            pos = 0
            for match in pattern.finditer(piece):
                start, end = match.span()
                if start > pos:
                    out.append(piece[pos:start])
                if end > start:
                    out.append(piece[start:end])
                pos = end
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


def partition_special(text: str, specials: Sequence[tuple[str, int]]) -> list[str | int]:
    """Cut ``text`` at the special tokens: a list of raw-text fragments and token ids.

    Args:
        text: the text to encode.
        specials: (token text, token id) pairs in matching priority (longest text first); each
            is searched in the fragments that earlier tokens left, leftmost occurrences first.
    """
    fragments: list[str | int] = [text] if text else []
    for token_text, token_id in specials:
        if token_text not in text:
            continue  # a fragment is a substring of text, so no fragment holds it either
        out: list[str | int] = []
        for fragment in fragments:
            if isinstance(fragment, int) or token_text not in fragment:
                out.append(fragment)
                continue
            for i, part in enumerate(fragment.split(token_text)):
                if i:
                    out.append(token_id)
                if part:
                    out.append(part)
        fragments = out
    return fragments
