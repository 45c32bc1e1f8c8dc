"""What speculative decoding needs from a model: vocabulary identity and an exact verify step.

Speculative decoding is orchestrated by a guest (the default guest's ``speculative`` parameter,
docs/speculative.md): a draft proposes tokens, the target checks them all in one step. The
model layer gives two primitives for it:

- ``vocab_fingerprint``: a digest of a model's vocabulary (every token's text and type, and
  the special ids), so that a draft model is accepted only when its token ids mean what the
  target's mean; ``check_same_vocab`` raises a clear error otherwise.
- the "verify" logits mode of ``Model.step``: every position's logits, computed bit-identically
  to one-token steps of the same sequence (``verify_logits`` is the direct call).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import numpy as np

from .._errors import ModelError, RealmError

if TYPE_CHECKING:
    from ._model import Model, Session

MAX_DRAFT_TOKENS: Final = 16  # k: drafted tokens one verify step may check (the ABI's bound)

_fingerprints: weakref.WeakKeyDictionary[Model, str] = weakref.WeakKeyDictionary()


def vocab_fingerprint(model: Model) -> str:
    """A hex digest of the model's vocabulary: its size, every token's text and type, BOS/EOS
    and end-of-generation ids. Two models with the same digest read token ids the same way.
    A model without tokenizer data is known by its vocabulary size alone."""
    fp = _fingerprints.get(model)
    if fp is not None:
        return fp
    h = hashlib.blake2b(digest_size=16)
    n = model.info.vocab_size
    h.update(f"vocab:{n}\n".encode())
    try:
        tok = model.tokenizer
    except RealmError:
        h.update(b"no tokenizer\n")
    else:
        for i in range(tok.vocab_size):
            h.update(tok.token_text(i).encode("utf-8", "surrogatepass"))
            h.update(b"\x00%d\x01" % int(tok.token_type(i)))
        h.update(f"bos:{tok.bos_id} eos:{tok.eos_id} eog:{sorted(tok.eog_ids)}".encode())
    fp = h.hexdigest()
    _fingerprints[model] = fp
    return fp


def check_same_vocab(target: Model, draft: Model) -> None:
    """Raise ModelError unless ``draft`` reads token ids exactly as ``target`` does."""
    if target.info.vocab_size != draft.info.vocab_size:
        raise ModelError(
            f"draft model {draft.info.name!r} has a vocabulary of {draft.info.vocab_size} tokens, "
            f"the target {target.info.name!r} one of {target.info.vocab_size}: a draft must "
            "share the target's vocabulary"
        )
    if vocab_fingerprint(target) != vocab_fingerprint(draft):
        raise ModelError(
            f"draft model {draft.info.name!r} has a different vocabulary from the target "
            f"{target.info.name!r} (same size, different tokens): a draft must share the "
            "target's vocabulary"
        )


def verify_logits(session: Session, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Append ``tokens`` (the last accepted token and up to ``MAX_DRAFT_TOKENS`` drafted ones)
    and return every position's logits, ``(len(tokens), vocab)``, bit-identical to feeding the
    tokens one at a time."""
    n = len(tokens)
    if not 0 < n <= MAX_DRAFT_TOKENS + 1:
        raise ModelError(f"a verify step takes 1 to {MAX_DRAFT_TOKENS + 1} tokens, got {n}")
    out = session.model.step([(session, tokens, "verify")])[0]
    assert out is not None
    return out
