"""The tokenizer of a GGUF model: text → token ids → text, giving the ids llama.cpp gives.

Two vocabulary kinds are supported, chosen by ``tokenizer.ggml.model``:

* ``"llama"``: SentencePiece BPE with byte fallback (``_spm``), spaces escaped to U+2581 and, with
  ``add_space_prefix``, one space put before the text and after each special token.
* ``"gpt2"``: byte-level BPE (``_bpe``) after the regex pre-tokenizer named by
  ``tokenizer.ggml.pre`` (``_pretokenize``).

Special tokens (control, user-defined and unknown types) are cut out of the text first, longest
first; control and unknown tokens only when the caller asks with ``parse_special=True``, as in
llama.cpp's ``llama_tokenize``. Metadata is read as llama.cpp's ``llama_vocab::load`` reads it,
including its defaults and its detection of end-of-generation tokens by their text, except that
a special-token id outside the vocabulary is an error here rather than a warning.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import gguf
import numpy as np

from .._errors import TokenizerError
from ._bpe import BpeModel, from_byte_level
from ._chat import check_messages, render_chat
from ._detok import (
    MAX_DECODE_TOKENS,
    PieceTable,
    TokenStream,
    check_flag,
    check_token_id,
    decode_ids,
)
from ._gguf_reader import field_numbers, field_strings, open_gguf
from ._pretokenize import find_pre_tokenizer, partition_special
from ._spm import SPACE_MARK, SpmModel

#: most UTF-8 bytes one encode call accepts
MAX_TEXT_BYTES: Final = 1 << 22  # 4 MiB

_KEYS = gguf.Keys.Tokenizer
_V = gguf.GGUFValueType
_INT_TYPES: Final = frozenset(
    {_V.UINT8, _V.INT8, _V.UINT16, _V.INT16, _V.UINT32, _V.INT32, _V.UINT64, _V.INT64}
)
_FLOAT_TYPES: Final = frozenset({_V.FLOAT32, _V.FLOAT64})
_BYTE_TOKEN: Final = re.compile(r"<0x([0-9A-Fa-f]{2})>")

#: texts of tokens that end generation (llama.cpp's list); such tokens are made control tokens
EOG_TEXTS: Final = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
)  # fmt: skip
#: texts llama.cpp looks for when the file names no end-of-turn token, in order of preference
EOT_TEXTS: Final = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)  # fmt: skip


class TokenType(enum.IntEnum):
    """A token's type, as ``tokenizer.ggml.token_type`` stores it (GGUF's and llama.cpp's)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


#: types cut out of the text before the merges (control and unknown only with parse_special)
_MATCHED_TYPES: Final = frozenset({TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN})
#: types hidden by decode unless render_special
_HIDDEN_TYPES: Final = frozenset({TokenType.CONTROL, TokenType.UNKNOWN})


class _Metadata:
    """Typed access to a reader's fields, failing with the file and key named."""

    def __init__(self, reader: gguf.GGUFReader, path: str) -> None:
        self._fields = reader.fields
        self.path = path

    def error(self, key: str, message: str) -> TokenizerError:
        return TokenizerError(f"{self.path}: {key}: {message}", path=self.path, field=key)

    def _field(self, key: str, required: bool) -> Any:
        field = self._fields.get(key)
        if field is None and required:
            raise self.error(key, "missing from the file's metadata")
        return field

    def _scalar_type(self, key: str, field: Any, allowed: frozenset[Any], what: str) -> None:
        if len(field.types) != 1 or field.types[0] not in allowed:
            found = "/".join(t.name for t in field.types)
            raise self.error(key, f"must be {what}, not {found}")

    def string(self, key: str, *, required: bool = False) -> str | None:
        field = self._field(key, required)
        if field is None:
            return None
        self._scalar_type(key, field, frozenset({_V.STRING}), "a string")
        try:
            return bytes(field.parts[-1]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.error(key, f"is not valid UTF-8 ({exc.reason})") from None

    def integer(self, key: str) -> int | None:
        field = self._field(key, False)
        if field is None:
            return None
        self._scalar_type(key, field, _INT_TYPES, "an integer")
        return int(field.parts[-1][0])

    def boolean(self, key: str) -> bool | None:
        field = self._field(key, False)
        if field is None:
            return None
        self._scalar_type(key, field, frozenset({_V.BOOL}), "a bool")
        return bool(field.parts[-1][0])

    def _array(self, key: str, required: bool, allowed: frozenset[Any], what: str) -> Any:
        field = self._field(key, required)
        if field is None:
            return None
        if field.types[0] != _V.ARRAY or (field.data and field.types[-1] not in allowed):
            found = "/".join(t.name for t in field.types)
            raise self.error(key, f"must be an array of {what}, not {found}")
        return field

    def strings(self, key: str, *, required: bool = False) -> list[str] | None:
        field = self._array(key, required, frozenset({_V.STRING}), "strings")
        if field is None:
            return None
        # surrogateescape keeps a token that is not valid UTF-8 distinct and byte-exact
        return field_strings(field, "surrogateescape")

    def numbers(self, key: str, allowed: frozenset[Any], what: str) -> np.ndarray | None:
        field = self._array(key, False, allowed, what)
        if field is None:
            return None
        return field_numbers(field)  # one array, read in bulk from a FastGGUFReader

    def token_id(self, key: str, n_tokens: int) -> int | None:
        value = self.integer(key)
        if value is not None and not 0 <= value < n_tokens:
            raise self.error(key, f"token id {value} is outside the vocabulary [0, {n_tokens})")
        return value


@attrs.frozen(eq=False)
class Tokenizer:
    """A model's tokenizer. Immutable and safe to share between threads.

    Build one with :func:`load_tokenizer` or :meth:`from_reader`.
    """

    #: the GGUF file it was read from
    path: str
    #: ``tokenizer.ggml.model``: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    model: str
    #: ``tokenizer.ggml.pre``: the pre-tokenizer of a "gpt2" vocabulary (None: not set)
    pre: str | None
    bos_id: int | None
    eos_id: int | None
    #: end of turn (``tokenizer.ggml.eot_token_id`` or found by text, e.g. ``<|eot_id|>``)
    eot_id: int | None
    unk_id: int | None
    pad_id: int | None
    #: every id that ends generation: eos, eot, eom and tokens such as ``<|im_end|>``
    eog_ids: frozenset[int]
    #: encode(add_special=True) starts with bos / ends with eos
    add_bos: bool
    add_eos: bool
    #: a SentencePiece vocabulary puts a space before the text and after each special token
    add_space_prefix: bool
    #: ``tokenizer.chat_template``, the Jinja chat template (None: the file has none)
    chat_template: str | None = attrs.field(repr=False)
    _tokens: Sequence[str] = attrs.field(repr=False)
    _types: bytes = attrs.field(repr=False)
    _token_to_id: Mapping[str, int] = attrs.field(repr=False)
    _specials: Sequence[tuple[str, int]] = attrs.field(repr=False)
    _user_specials: Sequence[tuple[str, int]] = attrs.field(repr=False)
    _engine: SpmModel | BpeModel = attrs.field(repr=False)
    _pieces: PieceTable = attrs.field(repr=False)

    @classmethod
    def from_reader(
        cls, reader: gguf.GGUFReader, *, path: str | os.PathLike[str] | None = None
    ) -> Tokenizer:
        """Read the tokenizer from an open GGUF reader (``path`` names the file in errors).

        Raises:
            TokenizerError: a tokenizer field is missing, has the wrong type or a bad value,
                or the tokenizer model or pre-tokenizer is not supported.
        """
        if path is None:
            path = getattr(getattr(reader, "data", None), "filename", None) or "<GGUF>"
        return _build(_Metadata(reader, os.fspath(path)))

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Hypothesis and IPython would otherwise print every field, the whole vocabulary too
        printer.text(repr(self))

    # --- vocabulary ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens; ids are 0 … vocab_size - 1."""
        return len(self._tokens)

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of a token, as stored (``▁the``, ``Ġthe``, ``<0x0A>``, ``<s>``)."""
        return self._tokens[check_token_id(token_id, self.vocab_size)]

    def token_type(self, token_id: int) -> TokenType:
        """The type of a token (after llama.cpp's promotion of end-of-generation tokens)."""
        return TokenType(self._types[check_token_id(token_id, self.vocab_size)])

    def text_to_token(self, text: str) -> int | None:
        """The id of the vocabulary entry exactly equal to ``text``, or None."""
        if not isinstance(text, str):
            raise TokenizerError(f"text must be a str, not {type(text).__name__}")
        return self._token_to_id.get(text)

    def is_special(self, token_id: int) -> bool:
        """A control or unknown token: not text; decode hides it unless ``render_special``."""
        return self._types[check_token_id(token_id, self.vocab_size)] in _HIDDEN_TYPES

    def is_eog(self, token_id: int) -> bool:
        """The token ends generation (see :attr:`eog_ids`)."""
        return check_token_id(token_id, self.vocab_size) in self.eog_ids

    # --- text → ids ------------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        add_special: bool = False,
        *,
        parse_special: bool = False,
        max_bytes: int = MAX_TEXT_BYTES,
    ) -> list[int]:
        """The token ids of ``text``, the ids llama.cpp's ``llama_tokenize`` gives.

        Args:
            text: the text.
            add_special: add bos (and eos) as the file's ``add_bos_token``/``add_eos_token`` say.
            parse_special: also recognise control tokens written in the text (``<s>``,
                ``<|im_end|>``); user-defined tokens are always recognised.
            max_bytes: refuse text longer than this many UTF-8 bytes.

        Raises:
            TokenizerError: text is not a str, holds a lone surrogate, or is too long.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"text must be a str, not {type(text).__name__}")
        check_flag("add_special", add_special)
        check_flag("parse_special", parse_special)
        try:
            n_bytes = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise TokenizerError(
                f"text is not valid Unicode: lone surrogate {text[exc.start]!r} at index "
                f"{exc.start}"
            ) from None
        if n_bytes > max_bytes:
            raise TokenizerError(f"text too long: {n_bytes} UTF-8 bytes > max_bytes={max_bytes}")

        specials = self._specials if parse_special else self._user_specials
        fragments = partition_special(text, specials)
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)  # type: ignore[arg-type]  # checked at load
        engine = self._engine
        if isinstance(engine, SpmModel):
            after_special = True  # llama.cpp: the first fragment counts as following a special
            for fragment in fragments:
                if isinstance(fragment, int):
                    out.append(fragment)
                    after_special = True
                    continue
                if self.add_space_prefix and after_special:
                    fragment = " " + fragment
                engine.encode(fragment.replace(" ", SPACE_MARK), out)
                after_special = False
        else:
            for fragment in fragments:
                if isinstance(fragment, int):
                    out.append(fragment)
                else:
                    engine.encode(fragment, out)
        if add_special and self.add_eos:
            out.append(self.eos_id)  # type: ignore[arg-type]  # checked at load
        return out

    # --- ids → text ------------------------------------------------------------------------------

    def token_to_piece(self, token_id: int, *, render_special: bool = False) -> bytes:
        """The bytes a token stands for (llama.cpp's ``token_to_piece``, no space stripped).

        A control or unknown token is ``b""`` unless ``render_special``; a byte token is its byte,
        so a piece may be part of a UTF-8 character.
        """
        check_flag("render_special", render_special)
        return self._pieces.piece(check_token_id(token_id, self.vocab_size), render_special)

    def decode(
        self,
        ids: Sequence[int],
        *,
        render_special: bool = False,
        strip_prefix_space: bool = True,
        max_tokens: int = MAX_DECODE_TOKENS,
    ) -> str:
        """The text of ``ids``; invalid UTF-8 becomes U+FFFD.

        Args:
            ids: token ids.
            render_special: show control and unknown tokens (``<s>``, ``<|im_end|>``) as their
                text; otherwise they are left out.
            strip_prefix_space: take off the space a SentencePiece vocabulary puts before the
                text (pass False to decode a continuation, such as generated tokens after a
                prompt); the space it puts after each special token is always taken off.
            max_tokens: refuse more ids than this.

        Raises:
            TokenizerError: ids is not a sequence of ints in [0, vocab_size), or is too long.
        """
        return decode_ids(
            self._pieces,
            ids,
            render_special=render_special,
            strip_prefix_space=strip_prefix_space,
            max_tokens=max_tokens,
        )

    def stream(
        self, *, render_special: bool = False, strip_prefix_space: bool = True
    ) -> TokenStream:
        """A streaming detokenizer: ``push(id) -> str``, ``flush() -> str`` (see TokenStream).

        The flags mean what they mean for :meth:`decode`.
        """
        return TokenStream(
            self._pieces, render_special=render_special, strip_prefix_space=strip_prefix_space
        )

    # --- chat ------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        template: str | None = None,
        **variables: Any,
    ) -> str:
        """Render a conversation into the prompt text the model was trained on.

        The model's ``tokenizer.chat_template`` is rendered in a Jinja sandbox, as Hugging Face
        renders it, with ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``
        and any extra ``variables`` (``tools``, ``documents``...). The result holds special
        tokens as text: encode it with ``parse_special=True`` (and ``add_special=False`` when the
        template writes ``bos_token`` itself).

        Args:
            messages: ``[{"role": "user", "content": "Hi"}, ...]``.
            add_generation_prompt: end with the header of an assistant turn.
            template: a template to use instead of the model's (e.g. ``CHATML_TEMPLATE``).

        Raises:
            TokenizerError: the model has no template and none is given, the messages are
                malformed, or the template fails (the reason is in the message).
        """
        source = template if template is not None else self.chat_template
        where = f"{self.path}: {_KEYS.CHAT_TEMPLATE}" if template is None else "template"
        if source is None:
            raise TokenizerError(
                f"{self.path}: the model has no chat template ({_KEYS.CHAT_TEMPLATE} is not "
                f"set); pass template=, e.g. CHATML_TEMPLATE",
                path=self.path,
                field=_KEYS.CHAT_TEMPLATE,
            )
        if not isinstance(source, str):
            raise TokenizerError(f"template must be a str, not {type(source).__name__}")
        check_flag("add_generation_prompt", add_generation_prompt)
        named = {"bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id, "pad": self.pad_id}
        context = {f"{k}_token": "" if v is None else self._tokens[v] for k, v in named.items()}
        context.update(variables)
        return render_chat(
            source,
            check_messages(messages),
            add_generation_prompt=add_generation_prompt,
            variables=context,
            where=where,
        )


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Read the tokenizer of a GGUF file (a full model or a vocabulary-only file).

    Raises:
        TokenizerError: the file cannot be read as GGUF, or its tokenizer metadata is unusable.
    """
    where = os.fspath(path)
    try:
        reader = open_gguf(path)
    except Exception as exc:  # the reader raises OSError, ValueError, struct and numpy errors
        raise TokenizerError(
            f"{where}: cannot read as GGUF: {type(exc).__name__}: {exc}", path=where
        ) from exc
    return Tokenizer.from_reader(reader, path=where)


# --- loading -------------------------------------------------------------------------------------


def _build(meta: _Metadata) -> Tokenizer:
    model = meta.string(_KEYS.MODEL, required=True)
    if model in ("no_vocab", "none"):
        raise meta.error(_KEYS.MODEL, f"is {model!r}: the file has no vocabulary")
    if model not in ("llama", "gpt2"):
        raise meta.error(
            _KEYS.MODEL, f"unsupported tokenizer model {model!r} (supported: 'llama', 'gpt2')"
        )
    spm = model == "llama"
    pre_name = meta.string(_KEYS.PRE)
    pre = None
    if not spm:
        pre = find_pre_tokenizer(pre_name)
        if pre is None:
            raise meta.error(_KEYS.PRE, f"unsupported pre-tokenizer {pre_name!r}")

    tokens = meta.strings(_KEYS.LIST, required=True) or []
    n = len(tokens)
    if n == 0:
        raise meta.error(_KEYS.LIST, "the vocabulary is empty")
    token_to_id: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if not text:
            tokens[i] = text = f"[EMPTY_{i}]"  # as llama.cpp renames an empty token
        first = token_to_id.setdefault(text, i)
        if first != i:
            raise meta.error(_KEYS.LIST, f"duplicate token {text!r} at ids {first} and {i}")

    scores = _read_scores(meta, n)
    types = _read_types(meta, n)

    def default(token_id: int | None) -> int | None:
        return token_id if token_id is not None and token_id < n else None

    bos_id = meta.token_id(_KEYS.BOS_ID, n)
    eos_id = meta.token_id(_KEYS.EOS_ID, n)
    unk_id = meta.token_id(_KEYS.UNK_ID, n)
    # llama.cpp's defaults when the file does not say (11 is GPT-NeoX's <|endoftext|>)
    if bos_id is None:
        bos_id = default(1 if spm else 11)
    if eos_id is None:
        eos_id = default(2 if spm else 11)
    if unk_id is None and spm:
        unk_id = default(0)
    pad_id = meta.token_id(_KEYS.PAD_ID, n)
    eot_id = meta.token_id(_KEYS.EOT_ID, n)
    eom_id = meta.token_id(_KEYS.EOM_ID, n)

    add_bos = meta.boolean(_KEYS.ADD_BOS)
    if add_bos is None:
        add_bos = True if spm else bool(pre and pre.add_bos)
    add_eos = bool(meta.boolean(_KEYS.ADD_EOS))
    add_space_prefix = meta.boolean(_KEYS.ADD_PREFIX)
    if add_space_prefix is None:
        add_space_prefix = spm
    if add_bos and bos_id is None:
        raise meta.error(_KEYS.ADD_BOS, f"is true but {_KEYS.BOS_ID} is not set")
    if add_eos and eos_id is None:
        raise meta.error(_KEYS.ADD_EOS, f"is true but {_KEYS.EOS_ID} is not set")

    # end-of-generation tokens found by their text are made control tokens, as in llama.cpp
    eog = {token_id for token_id in (eos_id, eot_id, eom_id) if token_id is not None}
    for text in EOG_TEXTS:
        token_id = token_to_id.get(text)
        if token_id is not None:
            eog.add(token_id)
            types[token_id] = TokenType.CONTROL
    if eot_id is None:
        eot_id = next((token_to_id[t] for t in EOT_TEXTS if t in token_to_id), None)
    if eot_id is not None:
        eog.add(eot_id)

    matched = [i for i in range(n) if types[i] in _MATCHED_TYPES]
    # llama.cpp tries longer token texts (in bytes) first; ties go to the lower id
    matched.sort(key=lambda i: (-len(tokens[i].encode("utf-8", "surrogateescape")), i))
    specials = [(tokens[i], i) for i in matched]
    user_specials = [(tokens[i], i) for i in matched if types[i] == TokenType.USER_DEFINED]

    engine: SpmModel | BpeModel
    if spm:
        engine = SpmModel(token_to_id, scores, unk_id)
    else:
        assert pre is not None
        ranks = _read_merges(meta)
        engine = BpeModel(token_to_id, ranks, pre.patterns, ignore_merges=pre.ignore_merges)

    restarts = bytes(1 if types[i] in _MATCHED_TYPES else 0 for i in range(n))
    pieces = PieceTable(
        pieces=[_render_piece(meta, i, tokens[i], types[i], spm) for i in range(n)],
        hidden=bytes(1 if types[i] in _HIDDEN_TYPES else 0 for i in range(n)),
        restarts_prefix=restarts,
        space_prefix=spm and add_space_prefix,
    )
    return Tokenizer(
        path=meta.path,
        model=model,
        pre=pre_name,
        bos_id=bos_id,
        eos_id=eos_id,
        eot_id=eot_id,
        unk_id=unk_id,
        pad_id=pad_id,
        eog_ids=frozenset(eog),
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=add_space_prefix,
        chat_template=meta.string(_KEYS.CHAT_TEMPLATE),
        tokens=tokens,
        types=bytes(types),
        token_to_id=token_to_id,
        specials=specials,
        user_specials=user_specials,
        engine=engine,
        pieces=pieces,
    )


def _read_scores(meta: _Metadata, n: int) -> list[float]:
    scores = meta.numbers(_KEYS.SCORES, _FLOAT_TYPES | {_V.INT32}, "float32 or int32")
    if scores is None:
        return [0.0] * n
    if len(scores) < n:
        raise meta.error(_KEYS.SCORES, f"has {len(scores)} scores for {n} tokens")
    values = scores[:n].astype(np.float64)  # what float() of each score gives, all at once
    nan = np.flatnonzero(np.isnan(values))
    if len(nan):
        raise meta.error(_KEYS.SCORES, f"score of token {int(nan[0])} is NaN")
    return values.tolist()


def _read_types(meta: _Metadata, n: int) -> bytearray:
    types = meta.numbers(_KEYS.TOKEN_TYPE, _INT_TYPES, "int32")
    if types is None:
        return bytearray([TokenType.NORMAL]) * n
    if len(types) < n:
        raise meta.error(_KEYS.TOKEN_TYPE, f"has {len(types)} types for {n} tokens")
    values = types[:n]
    # llama.cpp treats an unknown type as UNDEFINED (a token that renders as nothing)
    known = np.isin(values, [int(t) for t in TokenType])
    return bytearray(np.where(known, values, TokenType.UNDEFINED).astype(np.uint8).tobytes())


def _read_merges(meta: _Metadata) -> dict[tuple[str, str], int]:
    merges = meta.strings(_KEYS.MERGES, required=True) or []
    ranks: dict[tuple[str, str], int] = {}
    for rank, merge in enumerate(merges):
        cut = merge.find(" ", 1)
        if cut < 0:
            continue  # not "left right": llama.cpp keeps it as a pair that never matches
        ranks.setdefault((merge[:cut], merge[cut + 1 :]), rank)  # the first rank wins
    return ranks


def _render_piece(meta: _Metadata, token_id: int, text: str, kind: int, spm: bool) -> bytes:
    """llama.cpp's token_to_piece with special=true."""
    if kind in _MATCHED_TYPES:
        return text.encode("utf-8", "surrogateescape")
    if kind == TokenType.NORMAL:
        if spm:
            return text.replace(SPACE_MARK, " ").encode("utf-8", "surrogateescape")
        return from_byte_level(text)
    if kind == TokenType.BYTE:
        byte = _BYTE_TOKEN.fullmatch(text)
        if byte is not None:
            return bytes([int(byte[1], 16)])
        raise meta.error(_KEYS.LIST, f"byte token {token_id} is {text!r}, not <0xXX>")
    return b""  # unused and undefined tokens render as nothing
