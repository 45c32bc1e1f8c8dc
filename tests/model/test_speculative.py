"""The model layer's primitives for speculative decoding: the exact verify step, vocab checks.

A verify step's logits must be bit-identical to one-token steps of the same sequence, alone
or batched with other sequences (whose row counts push the plain step onto the GEMM kernels):
greedy speculative decoding is then the plain greedy output, token for token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import realm
from realm.model._speculative import (
    MAX_DRAFT_TOKENS,
    check_same_vocab,
    verify_logits,
    vocab_fingerprint,
)
from realm.testing import write_test_model

WTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, realm.model.Model]:
    d = tmp_path_factory.mktemp("spec")
    return {
        w: realm.load_model(
            write_test_model(d / f"{w}.gguf", wtype=w, n_embd=128, n_ff=256, n_layers=2)
        )
        for w in WTYPES
    }


def _one_at_a_time(m: realm.model.Model, prefix: list[int], tokens: list[int]) -> np.ndarray:
    with m.open_session() as s:
        s.extend(prefix, logits="none")
        rows = [s.extend([t], logits="last") for t in tokens]
    return np.stack(rows)  # type: ignore[arg-type]


@pytest.mark.parametrize("wtype", WTYPES)
def test_verify_rows_equal_one_token_steps_bit_for_bit(
    models: dict[str, realm.model.Model], wtype: str
) -> None:
    m = models[wtype]
    rng = np.random.default_rng(1)
    ids = [int(t) for t in rng.integers(0, m.info.vocab_size, 4 + MAX_DRAFT_TOKENS + 1)]
    want = _one_at_a_time(m, ids[:4], ids[4:])
    with m.open_session() as s:
        s.extend(ids[:4], logits="none")
        got = verify_logits(s, ids[4:])
        assert s.pos == len(ids)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("wtype", WTYPES)
def test_verify_rows_do_not_depend_on_the_batch(
    models: dict[str, realm.model.Model], wtype: str
) -> None:
    """Batched with 20 sequences of several tokens (a step of ~60 rows, where a plain step
    takes the GEMM kernels), the verify rows still equal one-token steps alone."""
    m = models[wtype]
    rng = np.random.default_rng(2)
    V = m.info.vocab_size
    ids = [int(t) for t in rng.integers(0, V, 12)]
    want = _one_at_a_time(m, ids[:3], ids[3:])
    others = [m.open_session() for _ in range(20)]
    with m.open_session() as s:
        s.extend(ids[:3], logits="none")
        work: list = [(s, ids[3:], "verify")]
        work += [(o, rng.integers(0, V, int(rng.integers(1, 6))), "all") for o in others]
        got = m.step(work)[0]
    for o in others:
        o.close()
    assert np.array_equal(got, want)


def test_plain_batched_steps_are_not_row_invariant(models: dict[str, realm.model.Model]) -> None:
    """Why "verify" exists: the same one-token row in a big plain step (GEMM kernels) differs in
    its last bits from the row alone (documented in docs/speculative.md)."""
    m = models["F16"]
    rng = np.random.default_rng(3)
    V = m.info.vocab_size
    ids = [int(t) for t in rng.integers(0, V, 6)]
    want = _one_at_a_time(m, ids[:5], ids[5:])[0]
    others = [m.open_session() for _ in range(24)]
    with m.open_session() as s:
        s.extend(ids[:5], logits="none")
        work: list = [(s, ids[5:], "last")]
        work += [(o, rng.integers(0, V, 2), "none") for o in others]
        got = m.step(work)[0]
    for o in others:
        o.close()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert not np.array_equal(got, want)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    wtype=st.sampled_from(WTYPES),
    n_prefix=st.integers(1, 20),
    n_verify=st.integers(1, MAX_DRAFT_TOKENS + 1),
    n_others=st.integers(0, 12),
)
def test_verify_identity_hypothesis(
    models: dict[str, realm.model.Model],
    data: st.DataObject,
    wtype: str,
    n_prefix: int,
    n_verify: int,
    n_others: int,
) -> None:
    m = models[wtype]
    V = m.info.vocab_size
    tok = st.integers(0, V - 1)
    prefix = data.draw(st.lists(tok, min_size=n_prefix, max_size=n_prefix))
    tokens = data.draw(st.lists(tok, min_size=n_verify, max_size=n_verify))
    want = _one_at_a_time(m, prefix, tokens)
    others = [m.open_session() for _ in range(n_others)]
    try:
        with m.open_session() as s:
            s.extend(prefix, logits="none")
            work: list = [(s, tokens, "verify")]
            work += [(o, data.draw(st.lists(tok, min_size=1, max_size=4)), "last") for o in others]
            got = m.step(work)[0]
    finally:
        for o in others:
            o.close()
    assert np.array_equal(got, want)


def test_verify_bounds_and_modes(models: dict[str, realm.model.Model]) -> None:
    m = models["Q8_0"]
    with m.open_session() as s:
        with pytest.raises(realm.ModelError, match="1 to 17 tokens"):
            verify_logits(s, [])
        with pytest.raises(realm.ModelError, match="1 to 17 tokens"):
            verify_logits(s, [1] * (MAX_DRAFT_TOKENS + 2))
        with pytest.raises(realm.ModelError, match="'verify'"):
            m.step([(s, [1], "exact")])  # type: ignore[list-item]
        assert s.pos == 0


def test_vocab_fingerprint_and_check(tmp_path: Path, models: dict[str, realm.model.Model]) -> None:
    f16, q4 = models["F16"], models["Q4_0"]
    assert vocab_fingerprint(f16) == vocab_fingerprint(q4)  # same vocabulary, other weights
    check_same_vocab(f16, q4)
    bigger = realm.load_model(write_test_model(tmp_path / "big.gguf", vocab_size=600))
    with pytest.raises(realm.ModelError, match="vocabulary of 600 tokens"):
        check_same_vocab(f16, bigger)
    bare = realm.load_model(
        write_test_model(tmp_path / "bare.gguf", vocab_size=f16.info.vocab_size, tokenizer="none")
    )
    assert vocab_fingerprint(bare) != vocab_fingerprint(f16)
    with pytest.raises(realm.ModelError, match="different vocabulary"):
        check_same_vocab(f16, bare)
