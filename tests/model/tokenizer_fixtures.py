"""Vocabulary-only GGUF files for the tokenizer tests, built here from English text.

* :func:`tiny_spm` / :func:`tiny_bpe`: hand-made vocabularies whose encodings can be checked by
  hand (scores, merge ranks and ties chosen on purpose).
* :func:`trained_spm`: a SentencePiece-style vocabulary (``"▁" + word`` BPE, scores descending
  with the merge order, all 256 byte-fallback tokens).
* :func:`trained_bpe`: a byte-level BPE vocabulary with merges learned by the small trainer
  below over the Llama-3 pre-tokenizer's words.

Both learned vocabularies carry chat-style special tokens. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import io
import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gguf
import regex

from realm.model._bpe import BYTE_TO_CHAR, to_byte_level
from realm.model._pretokenize import LLAMA3_PATTERN
from realm.model._tokenizer import Tokenizer, load_tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"

CORPUS = """\
The lighthouse keeper climbed the narrow stairs every evening at a quarter past six. She
counted the steps out of habit: there were 142 of them, and she'd never once lost count. At the
top she wiped the salt from the glass, checked the oil, and lit the great lamp. Ships that passed
in the night didn't know her name, but they knew her light. "It's a simple job," she told the
children from the village, "and that's what makes it hard. You can't skip a single night."

In 1987 the council wrote to say the light would be automated. They'd send an engineer, they
said, and she could retire with a pension of 3,250 pounds a year. She wrote back that she wasn't
ready, that the engineer was welcome to visit, and that he should bring a warm coat. He came in
March. He stayed for tea, then for supper, then for the whole winter; the machine he'd brought
sat in its crate by the door until spring, when they finally opened it together.

def keep_light(hours: int) -> bool:
    return hours >= 12 and not storm  # we're fine

Naïve visitors asked whether the café in town sold postcards of the lighthouse. It did: 2 for
50 pence, or 5 for £1.00. Some came from far away, from Köln and Zürich, from 東京 and São Paulo,
and one summer a group arrived with a banner that said 🌊 WE LOVE LIGHTHOUSES 🌊.
"""

#: chat and control tokens appended to the learned vocabularies (text, type)
SPM_SPECIALS: Sequence[tuple[str, int]] = (
    ("<|im_start|>", CONTROL),
    ("<|im_end|>", CONTROL),
    ("<tool>", USER_DEFINED),
    ("[UNUSED_0]", UNUSED),
)
BPE_SPECIALS: Sequence[tuple[str, int]] = (
    ("<|endoftext|>", CONTROL),
    ("<|begin_of_text|>", CONTROL),
    ("<|eot_id|>", CONTROL),
    ("<|im_start|>", CONTROL),
    ("<|im_end|>", CONTROL),
    ("<|start_header_id|>", CONTROL),
    ("<|end_header_id|>", CONTROL),
    ("<tool_call>", USER_DEFINED),
)


# --- writing -------------------------------------------------------------------------------------


def write_gguf(
    path: Path,
    *,
    model: str | None,
    tokens: Sequence[str] | None,
    scores: Sequence[float] | None = None,
    types: Sequence[int] | None = None,
    merges: Sequence[str] | None = None,
    pre: str | None = None,
    ids: dict[str, int] | None = None,
    flags: dict[str, bool] | None = None,
    chat_template: str | None = None,
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """Write a vocabulary-only GGUF file (no tensors). ``None`` leaves a key out.

    ``ids`` maps "bos", "eos", "unk", "pad", "eot" to token ids; ``flags`` maps "add_bos",
    "add_eos", "add_space_prefix" to bools.
    """
    writer = gguf.GGUFWriter(path, arch="llama")
    if model is not None:
        writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    if tokens is not None:
        writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    if types is not None:
        writer.add_token_types(types)
    if merges is not None:
        writer.add_token_merges(merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
        "eot": writer.add_eot_token_id,
    }
    for name, value in (ids or {}).items():
        adders[name](value)
    flag_adders = {
        "add_bos": writer.add_add_bos_token,
        "add_eos": writer.add_add_eos_token,
        "add_space_prefix": writer.add_add_space_prefix,
    }
    for name, flag in (flags or {}).items():
        flag_adders[name](flag)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if extra is not None:
        extra(writer)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def load(path: Path, **kwargs: Any) -> Tokenizer:
    return load_tokenizer(write_gguf(path, **kwargs))


def llama_hparams(writer: gguf.GGUFWriter) -> None:
    """The hyper-parameters llama.cpp wants before it loads even a vocabulary-only file."""
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)


# --- hand-made vocabularies ----------------------------------------------------------------------


def spm_base() -> tuple[list[str], list[float], list[int]]:
    """``<unk> <s> </s>`` and the 256 byte tokens: ids 0 … 258."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    return tokens, [0.0] * len(tokens), [UNKNOWN, CONTROL, CONTROL, *[BYTE] * 256]


#: the pieces of the tiny SentencePiece vocabulary, ids from 259 on, with their scores
TINY_SPM_PIECES: Sequence[tuple[str, float]] = (
    (SPACE, -1.0),  # 259
    ("a", -2.0),  # 260
    ("b", -2.0),  # 261
    ("c", -2.0),  # 262
    ("d", -2.0),  # 263
    ("ab", -5.0),  # 264
    ("bc", -4.0),  # 265: beats "ab"
    ("cd", -5.0),  # 266
    (SPACE + "a", -3.0),  # 267
    ("aa", -6.0),  # 268: ties with itself in "aaa"
    ("abc", -7.0),  # 269: reachable only as "a" + "bc"
    ("<tool>", 0.0),  # 270: user-defined
    ("<|im_end|>", 0.0),  # 271: control
)


def tiny_spm(path: Path, **kwargs: Any) -> Tokenizer:
    tokens, scores, types = spm_base()
    for text, score in TINY_SPM_PIECES:
        tokens.append(text)
        scores.append(score)
        types.append({"<tool>": USER_DEFINED, "<|im_end|>": CONTROL}.get(text, NORMAL))
    options: dict[str, Any] = {"ids": {"bos": 1, "eos": 2, "unk": 0}}
    options.update(kwargs)
    return load(path, model="llama", tokens=tokens, scores=scores, types=types, **options)


def tiny_bpe(
    path: Path, merges: Sequence[str], *, pre: str | None = "gpt2", **kw: Any
) -> Tokenizer:
    """The 256 byte-level characters, every merge result, and ``<|endoftext|>``."""
    tokens = list(BYTE_TO_CHAR)
    for merge in merges:
        left, right = merge.split(" ")
        if left + right not in tokens:
            tokens.append(left + right)
    tokens.append("<|endoftext|>")
    types = [NORMAL] * (len(tokens) - 1) + [CONTROL]
    eot = len(tokens) - 1
    options: dict[str, Any] = {"ids": {"bos": eot, "eos": eot}}
    options.update(kw)
    return load(path, model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges, **options)


def sentencepiece_vocab(vocab_size: int = 700) -> tuple[Any, list[str], list[float], list[int]]:
    """A SentencePiece BPE model trained on the corpus like llama's: (processor, vocabulary).

    No user-defined symbols: llama.cpp cuts those out before adding the space prefix, so
    ``"<tool>"`` would be ``[<tool>]`` there but ``[▁, <tool>]`` in SentencePiece.
    """
    import pytest

    spm_lib = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm_lib.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        # llama's tokenizer.model: no normalisation, whitespace kept, "▁" prefix
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=3,
    )
    sp = spm_lib.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(UNKNOWN)
        elif sp.is_control(i):
            types.append(CONTROL)
        elif sp.is_byte(i):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return sp, tokens, scores, types


# --- learned vocabularies ------------------------------------------------------------------------


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(
    words: Counter[str], n_merges: int, *, min_count: int = 2
) -> list[tuple[str, str]]:
    """Plain BPE training: merge the most frequent adjacent pair (ties: smallest pair first)."""
    split = {tuple(word): count for word, count in words.items()}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in split.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best_count = max(pairs.values())
        if best_count < min_count:
            break
        best = min(pair for pair, count in pairs.items() if count == best_count)
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for word, count in split.items():
            new = _merge_pair(word, best)
            merged[new] = merged.get(new, 0) + count
        split = merged
    return merges


@functools.cache
def trained_spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style: every word is ``"▁" + word``; pieces scored -rank, then characters."""
    words = Counter(SPACE + word for word in CORPUS.split())
    merges = learn_merges(words, 300)
    tokens, scores, types = spm_base()
    seen = set(tokens)
    for rank, (left, right) in enumerate(merges):
        if left + right not in seen:
            seen.add(left + right)
            tokens.append(left + right)
            scores.append(-float(rank))
            types.append(NORMAL)
    # single characters (no byte fallback needed for the corpus), below every merge
    for char in sorted({c for c in CORPUS.replace(" ", SPACE) if not c.isspace()} | {SPACE}):
        if char not in seen:
            seen.add(char)
            tokens.append(char)
            scores.append(-float(len(merges) + len(tokens)))
            types.append(NORMAL)
    for text, kind in SPM_SPECIALS:
        tokens.append(text)
        scores.append(0.0)
        types.append(kind)
    return tokens, scores, types


def trained_spm(path: Path, **kwargs: Any) -> Tokenizer:
    tokens, scores, types = trained_spm_vocab()
    options: dict[str, Any] = {"ids": {"bos": 1, "eos": 2, "unk": 0}}
    options.update(kwargs)
    return load(path, model="llama", tokens=tokens, scores=scores, types=types, **options)


@functools.cache
def trained_bpe_vocab() -> tuple[list[str], list[str], list[int]]:
    """Byte-level BPE over the Llama-3 pre-tokenizer's words: (tokens, merges, types)."""
    pattern = regex.compile(LLAMA3_PATTERN)
    words = Counter(to_byte_level(word) for word in pattern.findall(CORPUS))
    merges = learn_merges(words, 400, min_count=1)
    tokens = list(BYTE_TO_CHAR)
    for left, right in merges:
        if left + right not in tokens:
            tokens.append(left + right)
    types = [NORMAL] * len(tokens)
    for text, kind in BPE_SPECIALS:
        tokens.append(text)
        types.append(kind)
    return tokens, [f"{left} {right}" for left, right in merges], types


def trained_bpe(path: Path, *, pre: str | None = "llama-bpe", **kwargs: Any) -> Tokenizer:
    tokens, merges, types = trained_bpe_vocab()
    options: dict[str, Any] = {
        "ids": {"bos": tokens.index("<|begin_of_text|>"), "eos": tokens.index("<|endoftext|>")}
    }
    options.update(kwargs)
    return load(path, model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges, **options)
