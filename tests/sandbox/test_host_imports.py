"""Every host import of guest ABI v1, its normal behaviour and its edge cases, through WAT guests.

Most tests use the probe guest (``wat_guests.Probe``): one exported function per host import
that calls it with exactly the i32 arguments the test gives and stores what it returned, so a
test can hand an import any pointer, length or flag. Behaviour that needs several imports in
one call (rate limits, cancellation by ``on_emit``, "last result wins") uses small guests.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import numpy as np
import pytest
from wat_guests import DATA, SCRATCH, Probe, guest_wat, wat_bytes, write_tiny_model

from realm import CallCancelled, GuestError
from realm.model import CHATML_TEMPLATE, Model, load_model
from realm.sandbox import CallContext, GuestLimits, SandboxEngine, Status, TenantState
from realm.testing.models import write_test_model

OK = int(Status.OK)
EINVAL = int(Status.EINVAL)
ENOENT = int(Status.ENOENT)
ECANCELLED = int(Status.ECANCELLED)
ELIMIT = int(Status.ELIMIT)
ENOTSUP = int(Status.ENOTSUP)
SENTINEL = 0xA5A5A5A5 - (1 << 32)  # an i32 of Probe.buffer's fill
TEXT = "héllo 日本語 🎉"  # 1-, 2-, 3- and 4-byte characters


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Iterator[SandboxEngine]:
    with SandboxEngine() as eng:
        yield eng


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tenant(model: Model) -> Iterator[TenantState]:
    t = TenantState("alice", {"tiny": model})
    yield t
    t.close()


@pytest.fixture
def probe(engine: SandboxEngine, tenant: TenantState) -> Probe:
    return Probe(engine, tenant)


def name(p: Probe, model_name: str = "tiny") -> tuple[int, int]:
    return p.put(model_name)


def ids_of(model: Model, text: str, **kw: bool) -> list[int]:
    return model.tokenizer.encode(text, **kw)


# --- log ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "expected"),
    [(0, logging.DEBUG), (1, logging.INFO), (2, logging.WARNING), (3, logging.ERROR),
     (7, logging.ERROR), (-1, logging.ERROR)],
)  # fmt: skip
def test_log_levels(probe: Probe, caplog: pytest.LogCaptureFixture, level: int, expected: int):
    caplog.set_level(logging.DEBUG, logger="realm.guest")
    a, n = probe.put(f"hello at {level}")
    assert probe("log", level, a, n) == OK
    (rec,) = [r for r in caplog.records if r.name == "realm.guest"]
    assert rec.levelno == expected
    assert rec.getMessage() == f"[alice] hello at {level}"


def test_log_is_rate_limited_per_call(
    engine: SandboxEngine, tenant: TenantState, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="realm.guest")
    body = f"""(local $i i32)
    (loop $l
      (i32.store (i32.const {SCRATCH})
        (i32.add (i32.load (i32.const {SCRATCH}))
                 (i32.eqz (call $log (i32.const 1) (i32.const {DATA}) (i32.const 4)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 150))))
    (i32.const 0)"""
    p = Probe(engine, tenant, guest_wat(None, {"spam": body}, data={DATA: b"spam"}))
    for call in range(2):  # the limit is per call: the second call logs again
        p.write(SCRATCH, bytes(4))
        ctx = CallContext()
        caplog.clear()
        assert p.inst.call("spam", {}, ctx) == {}
        assert p.scratch(0) == 150, "every log call returns OK, logged or not"
        assert ctx.log_lines == 150
        lines = [r for r in caplog.records if r.name == "realm.guest"]
        assert len(lines) == 100, f"call {call}"
        assert {r.getMessage() for r in lines} == {"[alice] spam"}


def test_log_text_is_cut_at_4096_bytes(probe: Probe, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="realm.guest")
    a, n = probe.put("x" * 5000)
    assert probe("log", 1, a, n) == OK
    (rec,) = [r for r in caplog.records if r.name == "realm.guest"]
    assert rec.getMessage() == "[alice] " + "x" * 4096


def test_log_rejects_invalid_utf8(probe: Probe) -> None:
    a, n = probe.put(b"ok \xff\xfe")
    ctx = CallContext()
    assert probe("log", 1, a, n, ctx=ctx) == EINVAL
    assert any("UTF-8" in e for e in ctx.errors)


# --- clock_ms -----------------------------------------------------------------------------------


def test_clock_ms_counts_from_the_start_of_the_call(probe: Probe) -> None:
    ctx = CallContext()
    time.sleep(0.05)
    first = probe("clock_ms", ctx=ctx)
    assert 50 <= first < 5000
    time.sleep(0.02)
    second = probe("clock_ms", ctx=ctx)
    assert second >= first + 15
    assert 0 <= probe("clock_ms") < 1000  # a fresh call starts near zero


# --- random -------------------------------------------------------------------------------------


def test_random_same_seed_same_bytes(probe: Probe) -> None:
    def draw(seed: int | None, n: int = 64) -> bytes:
        buf = probe.buffer(n)
        assert probe("random", buf, n, ctx=CallContext(seed=seed)) == OK
        return probe.read(buf, n)

    a, b, c = draw(42), draw(42), draw(43)
    assert a == b
    assert a != c
    assert draw(None) != draw(None)
    assert draw(7, 16) == draw(7, 64)[:16], "a stream: a shorter draw is a prefix"


def test_random_successive_draws_in_one_call_differ(engine: SandboxEngine, tenant: TenantState):
    body = f"""(i32.store (i32.const {SCRATCH}) (call $random (i32.const {DATA}) (i32.const 32)))
    (i32.store (i32.const {SCRATCH + 4}) (call $random (i32.const {DATA + 32}) (i32.const 32)))
    (i32.const 0)"""
    p = Probe(engine, tenant, guest_wat(None, {"two": body}))
    p.inst.call("two", {}, CallContext(seed=1))
    assert (p.scratch(0), p.scratch(1)) == (OK, OK)
    first, second = p.read(DATA, 32), p.read(DATA + 32, 32)
    assert first != second
    p.inst.call("two", {}, CallContext(seed=1))
    assert p.read(DATA, 64) == first + second


def test_random_edge_lengths(probe: Probe) -> None:
    buf = probe.buffer(8)
    assert probe("random", buf, 0) == OK
    assert probe.read(buf, 8) == b"\xa5" * 8, "nothing written for length 0"
    assert probe("random", buf, -1) == EINVAL
    assert probe("random", buf, (1 << 20) + 1) == EINVAL  # over MAX_TEXT_BYTES


# --- model_info ---------------------------------------------------------------------------------


@pytest.mark.parametrize("by_name", [False, True])
def test_model_info_is_json(probe: Probe, model: Model, by_name: bool) -> None:
    mp, ml = name(probe) if by_name else (0, 0)
    out = probe.buffer(4096)
    n = probe("model_info", mp, ml, out, 4096)
    assert 0 < n < 4096
    info = json.loads(probe.read(out, n))
    assert isinstance(info, dict)
    assert info["model"] == "tiny"
    assert info["arch"] == "llama"
    assert info["vocab_size"] == model.info.vocab_size == 587
    assert info["context_length"] == 256
    assert info["bos_id"] == model.tokenizer.bos_id
    assert info["eos_id"] == model.tokenizer.eos_id
    assert info["eog_ids"] == sorted(model.tokenizer.eog_ids)
    assert info["has_chat_template"] is False
    assert "path" not in info, "the host's paths are not the guest's business"
    assert probe.read(out + n, 4) == b"\xa5" * 4


def test_model_info_follows_snprintf(probe: Probe) -> None:
    full = probe.buffer(4096)
    n = probe("model_info", 0, 0, full, 4096)
    text = probe.read(full, n)
    small = probe.buffer(32)
    assert probe("model_info", 0, 0, small, 10) == n, "returns what the full output needs"
    assert probe.read(small, 32) == text[:10] + b"\xa5" * 22
    # a sizing query: cap 0 writes nothing, so even a wild pointer is fine
    assert probe("model_info", 0, 0, 0xFFFFFFF0, 0) == n


def test_model_info_errors(probe: Probe) -> None:
    out = probe.buffer(64)
    mp, ml = name(probe, "nope")
    assert probe("model_info", mp, ml, out, 64) == ENOENT
    bp, bl = probe.put(b"\xc3(")
    assert probe("model_info", bp, bl, out, 64) == EINVAL
    assert probe("model_info", 0, 0, out, -1) == EINVAL
    assert probe.read(out, 64) == b"\xa5" * 64


# --- tokenize -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Hello world", TEXT, "", " ", "a\nb\tc"])
def test_tokenize_matches_the_tokenizer(probe: Probe, model: Model, text: str) -> None:
    mp, ml = name(probe)
    tp, tl = probe.put(text)
    out = probe.buffer(4 * 64)
    want = ids_of(model, text)
    assert probe("tokenize", mp, ml, tp, tl, 0, out, 64) == len(want)
    assert probe.i32s(out, len(want) + 1) == [*want, SENTINEL]


def test_tokenize_returns_the_count_when_out_cap_is_smaller(probe: Probe, model: Model) -> None:
    tp, tl = probe.put(TEXT)
    want = ids_of(model, TEXT)
    assert len(want) > 5
    out = probe.buffer(4 * 64)
    assert probe("tokenize", 0, 0, tp, tl, 0, out, 5) == len(want)
    assert probe.i32s(out, 6) == [*want[:5], SENTINEL]
    assert probe("tokenize", 0, 0, tp, tl, 0, 0, 0) == len(want), "cap 0: a sizing query"


@pytest.mark.parametrize(
    ("flags", "text", "kw"),
    [
        (1, "Hello", {"add_special": True}),
        (2, "<s>hi</s>", {"parse_special": True}),
        (3, "<s>hi</s>", {"add_special": True, "parse_special": True}),
        (0, "<s>hi</s>", {}),
    ],
)
def test_tokenize_flags(probe: Probe, model: Model, flags: int, text: str, kw: dict) -> None:
    tp, tl = probe.put(text)
    out = probe.buffer(4 * 64)
    want = ids_of(model, text, **kw)
    assert probe("tokenize", 0, 0, tp, tl, flags, out, 64) == len(want)
    assert probe.i32s(out, len(want)) == want
    if flags & 1:
        assert want[0] == model.tokenizer.bos_id
    if flags == 2:
        assert want == [model.tokenizer.bos_id, *want[1:-1], model.tokenizer.eos_id]


def test_tokenize_errors(probe: Probe) -> None:
    out = probe.buffer(4 * 16)
    tp, tl = probe.put("Hello")
    assert probe("tokenize", 0, 0, tp, tl, 4, out, 16) == EINVAL  # unknown flag
    assert probe("tokenize", 0, 0, tp, tl, -1, out, 16) == EINVAL
    assert probe("tokenize", 0, 0, tp, tl, 0, out, -1) == EINVAL
    bp, bl = probe.put(b"ab\xff\xfecd")
    assert probe("tokenize", 0, 0, bp, bl, 0, out, 16) == EINVAL  # invalid UTF-8
    sp, sl = probe.put(b"\xed\xa0\x80")  # an encoded surrogate is not UTF-8 either
    assert probe("tokenize", 0, 0, sp, sl, 0, out, 16) == EINVAL
    mp, ml = name(probe, "other")
    assert probe("tokenize", mp, ml, tp, tl, 0, out, 16) == ENOENT
    # text over MAX_TEXT_BYTES: a limit, refused before the pointer is even looked at
    assert probe("tokenize", 0, 0, tp, (1 << 20) + 1, 0, out, 16) == ELIMIT
    assert probe.read(out, 64) == b"\xa5" * 64


# --- decode -------------------------------------------------------------------------------------


def test_decode_matches_the_tokenizer(probe: Probe, model: Model) -> None:
    ids = ids_of(model, TEXT)
    ip, _ = probe.put(np.asarray(ids, "<i4"))
    out = probe.buffer(256)
    want = model.tokenizer.decode(ids).encode()
    assert want.decode() == TEXT
    assert probe("decode", 0, 0, ip, len(ids), out, 256) == len(want)
    assert probe.read(out, len(want) + 1) == want + b"\xa5"
    small = probe.buffer(16)
    assert probe("decode", 0, 0, ip, len(ids), small, 3) == len(want)
    assert probe.read(small, 4) == want[:3] + b"\xa5"
    assert probe("decode", 0, 0, ip, 0, out, 256) == 0


def test_decode_errors(probe: Probe, model: Model) -> None:
    out = probe.buffer(64)
    bad, _ = probe.put(np.asarray([5, 587], "<i4"))  # 587 is past the vocabulary
    assert probe("decode", 0, 0, bad, 2, out, 64) == EINVAL
    neg, _ = probe.put(np.asarray([-1], "<i4"))
    assert probe("decode", 0, 0, neg, 1, out, 64) == EINVAL
    good, _ = probe.put(np.asarray([5, 6, 7, 8], "<i4"))
    assert probe("decode", 0, 0, good, -1, out, 64) == EINVAL
    assert probe("decode", 0, 0, good + 2, 1, out, 64) == EINVAL  # ids not 4-aligned
    assert probe("decode", 0, 0, good, 1, out, -1) == EINVAL
    mp, ml = name(probe, "nope")
    assert probe("decode", mp, ml, good, 1, out, 64) == ENOENT
    assert probe.read(out, 64) == b"\xa5" * 64


# --- chat_template ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(model: Model) -> Model:
    """The tiny model again, its tokenizer given the ChatML template."""
    m = load_model(model.path)
    m._tokenizer = attrs.evolve(m.tokenizer, chat_template=CHATML_TEMPLATE)
    return m


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓"}]


def test_chat_template_without_a_template_is_einval(probe: Probe) -> None:
    mp, ml = probe.put(json.dumps(MESSAGES))
    out = probe.buffer(256)
    ctx = CallContext()
    assert probe("chat_template", 0, 0, mp, ml, 1, out, 256, ctx=ctx) == EINVAL
    assert any("chat template" in e for e in ctx.errors), ctx.errors
    assert probe.read(out, 256) == b"\xa5" * 256


@pytest.mark.parametrize("add", [1, 0])
def test_chat_template_renders(engine: SandboxEngine, chat_model: Model, add: int) -> None:
    p = Probe(engine, TenantState("chat", {"chat": chat_model}))
    mp, ml = p.put(json.dumps(MESSAGES))
    out = p.buffer(512)
    want = chat_model.tokenizer.apply_chat_template(MESSAGES, bool(add)).encode()
    assert want.startswith(b"<|im_start|>system")
    assert want.endswith(b"<|im_start|>assistant\n") == bool(add)
    assert p("chat_template", 0, 0, mp, ml, add, out, 512) == len(want)
    assert p.read(out, len(want)) == want
    assert p("chat_template", 0, 0, mp, ml, add, out, 7) == len(want)
    for bad in ["not json", '{"role": "user"}', '[{"role": 1}]', "[1, 2]"]:
        bp, bl = p.put(bad)
        assert p("chat_template", 0, 0, bp, bl, add, out, 512) == EINVAL, bad


# --- sessions -----------------------------------------------------------------------------------


def test_session_lifecycle(probe: Probe, tenant: TenantState, model: Model) -> None:
    h = probe("session_open", 0, 0, 16)
    h2 = probe("session_open", *name(probe), 0)  # capacity 0: the model's context
    assert h >= 0 and h2 >= 0 and h != h2
    assert tenant.sessions[h2].session.capacity == model.info.context_length
    assert probe("session_pos", h) == 0
    tp, _ = probe.put(np.asarray([5, 6, 7, 8], "<i4"))
    assert probe("forward", h, tp, 4, 0, 0, 0) == 0
    assert probe("session_pos", h) == 4
    assert probe("session_rewind", h, 1) == 1
    assert probe("session_pos", h) == 1
    assert probe("session_rewind", h, 2) == EINVAL, "cannot rewind forward"
    assert probe("session_rewind", h, -1) == EINVAL
    assert probe("session_rewind", h, 0) == 0
    assert probe("session_close", h) == OK
    for imp, args in [("session_pos", ()), ("session_close", ()), ("session_rewind", (0,))]:
        assert probe(imp, h, *args) == ENOENT, imp
    h3 = probe("session_open", 0, 0, 16)
    assert h3 not in (h, h2), "a closed handle is not handed out again"
    assert set(tenant.sessions) == {h2, h3}


def test_sessions_outlive_calls_and_instances(
    engine: SandboxEngine, probe: Probe, tenant: TenantState
) -> None:
    h = probe("session_open", 0, 0, 16)
    tp, _ = probe.put(np.asarray([5, 6, 7], "<i4"))
    assert probe("forward", h, tp, 3, 0, 0, 0) == 0
    again = Probe(engine, tenant)  # a rebuilt instance of the same tenant
    assert again("session_pos", h) == 3


def test_session_open_errors(probe: Probe) -> None:
    assert probe("session_open", 0, 0, -1) == EINVAL
    assert probe("session_open", 0, 0, 0x7FFFFFFF) == EINVAL  # past the model's cap
    assert probe("session_open", *name(probe, "nope"), 16) == ENOENT
    h = probe("session_open", 0, 0, 4)
    tp, _ = probe.put(np.asarray([5, 6, 7, 8, 9], "<i4"))
    assert probe("forward", h, tp, 5, 0, 0, 0) == EINVAL, "over the session's capacity"
    assert probe("session_pos", h) == 0
    assert probe("forward", h, tp, 4, 0, 0, 0) == 0


def test_max_sessions(engine: SandboxEngine, model: Model) -> None:
    tenant = TenantState("capped", {"tiny": model}, limits=GuestLimits(max_sessions=3))
    try:
        p = Probe(engine, tenant)
        handles = [p("session_open", 0, 0, 8) for _ in range(3)]
        assert all(h >= 0 for h in handles)
        ctx = CallContext()
        assert p("session_open", 0, 0, 8, ctx=ctx) == ELIMIT
        assert any("sessions" in e for e in ctx.errors)
        assert p("session_close", handles[1]) == OK
        assert p("session_open", 0, 0, 8) >= 0
        assert p("session_open", 0, 0, 8) == ELIMIT
    finally:
        tenant.close()


def test_session_handles_name_only_this_tenants_sessions(
    engine: SandboxEngine, model: Model, probe: Probe, tenant: TenantState
) -> None:
    mine = [probe("session_open", 0, 0, 16) for _ in range(3)]
    tp, _ = probe.put(np.asarray([5, 6], "<i4"))
    assert probe("forward", mine[0], tp, 2, 0, 0, 0) == 0
    bob_tenant = TenantState("bob", {"tiny": model})
    try:
        bob = Probe(engine, bob_tenant)
        btp, _ = bob.put(np.asarray([9, 9, 9], "<i4"))
        for h in mine:
            assert bob("session_pos", h) == ENOENT
            assert bob("session_rewind", h, 0) == ENOENT
            assert bob("forward", h, btp, 3, 0, 0, 0) == ENOENT
            assert bob("detokenize", h, 5, bob.buffer(8), 8) == ENOENT
            assert bob("session_close", h) == ENOENT
        hb = bob("session_open", 0, 0, 16)  # bob's own handle may have the same number...
        assert bob("forward", hb, btp, 3, 0, 0, 0) == 0
        assert bob("session_close", hb) == OK
        # ...but never reaches alice's sessions
        assert [probe("session_pos", h) for h in mine] == [2, 0, 0]
        assert set(tenant.sessions) == set(mine)
        assert bob_tenant.sessions == {}
    finally:
        bob_tenant.close()


# --- forward ------------------------------------------------------------------------------------

TOKENS = [1, 476, 535, 299, 538, 430]


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_forward_logits_equal_the_model(probe: Probe, model: Model, mode: int) -> None:
    vocab = model.info.vocab_size
    want = model.logits(TOKENS)
    h = probe("session_open", 0, 0, 64)
    tp, _ = probe.put(np.asarray(TOKENS, "<i4"))
    n_out = {0: 0, 1: vocab, 2: len(TOKENS) * vocab}[mode]
    lp = probe.buffer(4 * n_out + 4)
    assert probe("forward", h, tp, len(TOKENS), lp, n_out, mode) == n_out
    assert probe("session_pos", h) == len(TOKENS)
    got = probe.f32s(lp, n_out)
    if mode == 1:
        np.testing.assert_allclose(got, want[-1], rtol=1e-5, atol=1e-5)
    elif mode == 2:
        np.testing.assert_allclose(got.reshape(len(TOKENS), vocab), want, rtol=1e-5, atol=1e-5)
    assert probe.read(lp + 4 * n_out, 4) == b"\xa5" * 4, "nothing past what was asked"


def test_forward_in_steps_continues_the_sequence(probe: Probe, model: Model) -> None:
    vocab = model.info.vocab_size
    want = model.logits(TOKENS)
    h = probe("session_open", 0, 0, 64)
    tp, _ = probe.put(np.asarray(TOKENS, "<i4"))
    lp = probe.buffer(4 * vocab * len(TOKENS))
    assert probe("forward", h, tp, 4, 0, 0, 0) == 0
    assert probe("forward", h, tp + 16, 2, lp, 2 * vocab, 2) == 2 * vocab
    np.testing.assert_allclose(probe.f32s(lp, 2 * vocab).reshape(2, vocab), want[4:], atol=1e-4)
    # rewind and redo the last token: the same logits again
    assert probe("session_rewind", h, 5) == 5
    assert probe("forward", h, tp + 20, 1, lp, vocab, 1) == vocab
    np.testing.assert_allclose(probe.f32s(lp, vocab), want[5], atol=1e-4)


def test_forward_argument_errors(probe: Probe, model: Model) -> None:
    vocab = model.info.vocab_size
    h = probe("session_open", 0, 0, 64)
    tp, _ = probe.put(np.asarray(TOKENS, "<i4"))
    lp = probe.buffer(4 * vocab * len(TOKENS) + 8)
    n = len(TOKENS)
    cases = [
        ((h, tp, n, lp, vocab - 1, 1), EINVAL),  # cap too small for mode 1
        ((h, tp, n, lp, n * vocab - 1, 2), EINVAL),  # ... and for mode 2
        ((h, tp, n, lp, -1, 0), EINVAL),  # negative cap
        ((h, tp, 0, lp, vocab, 1), EINVAL),  # no tokens
        ((h, tp, -1, lp, vocab, 1), EINVAL),
        ((h, tp, -(1 << 31), lp, vocab, 1), EINVAL),
        ((h, tp, 4097, lp, vocab, 1), ELIMIT),  # over max_tokens_per_forward
        ((h, tp, 0x7FFFFFFF, lp, vocab, 1), ELIMIT),
        ((h, tp, n, lp, vocab, 4), EINVAL),  # unknown mode
        ((h, tp, n, lp, vocab, -1), EINVAL),
        ((h, tp + 2, n, lp, vocab, 1), EINVAL),  # tokens not 4-aligned
        ((h, tp, n, lp + 2, vocab, 1), EINVAL),  # logits not 4-aligned
        ((h + 1000, tp, n, lp, vocab, 1), ENOENT),
    ]
    for args, status in cases:
        assert probe("forward", *args) == status, args
        assert probe("session_pos", h) == 0, f"{args} changed the session"
    big, _ = probe.put(np.asarray([5, vocab, 6], "<i4"))  # a token past the vocabulary
    assert probe("forward", h, big, 3, 0, 0, 0) == EINVAL
    neg, _ = probe.put(np.asarray([-5], "<i4"))
    assert probe("forward", h, neg, 1, 0, 0, 0) == EINVAL
    assert probe("session_pos", h) == 0
    assert probe.read(lp, 8) == b"\xa5" * 8


def test_forward_respects_the_tenants_token_limit(engine: SandboxEngine, model: Model) -> None:
    tenant = TenantState("small", {"tiny": model}, limits=GuestLimits(max_tokens_per_forward=4))
    try:
        p = Probe(engine, tenant)
        h = p("session_open", 0, 0, 64)
        tp, _ = p.put(np.asarray(TOKENS, "<i4"))
        assert p("forward", h, tp, 5, 0, 0, 0) == ELIMIT
        assert p("forward", h, tp, 4, 0, 0, 0) == 0
    finally:
        tenant.close()


# --- detokenize ---------------------------------------------------------------------------------


def drain(p: Probe, h: int, cap: int, token: int) -> list[bytes]:
    """Push ``token`` (or nothing: -1), then take text until none is left."""
    out = p.buffer(cap + 8)
    chunks = []
    while True:
        p.write(out, b"\xa5" * (cap + 8))
        n = p("detokenize", h, token, out, cap)
        assert 0 <= n <= cap
        assert p.read(out + n, 8) == b"\xa5" * 8, "nothing written past what is returned"
        if n == 0:
            return chunks
        chunks.append(p.read(out, n))
        token = -1


@pytest.mark.parametrize("cap", [64, 4, 5, 6])
@pytest.mark.parametrize("pile_up", [False, True])
def test_detokenize_streams_whole_characters(
    probe: Probe, model: Model, cap: int, pile_up: bool
) -> None:
    ids = ids_of(model, TEXT)
    h = probe("session_open", 0, 0, 64)
    chunks: list[bytes] = []
    for t in ids:
        if pile_up:  # push with cap 0: all the text waits, then comes out cap bytes at a time
            assert probe("detokenize", h, t, 0, 0) == 0
        else:
            chunks += drain(probe, h, cap, t)
    chunks += drain(probe, h, cap, -2)
    if pile_up:
        assert max(len(c) for c in chunks) <= cap
        assert len(chunks) > 1 or cap == 64
    for c in chunks:
        c.decode("utf-8")  # every chunk is whole UTF-8: no character split between calls
    assert b"".join(chunks).decode() == model.tokenizer.decode(ids) == TEXT


def test_detokenize_remainder_comes_on_the_next_call(probe: Probe, model: Model) -> None:
    ids = ids_of(model, "Hello world")
    h = probe("session_open", 0, 0, 64)
    out = probe.buffer(64)
    got = b""
    for t in ids:
        n = probe("detokenize", h, t, out, 1)  # one byte at a time: text piles up
        assert n in (0, 1)
        got += probe.read(out, n)
    assert len(got) == len(ids) < len("Hello world")
    n = probe("detokenize", h, -1, out, 64)  # push nothing, take the rest
    got += probe.read(out, n)
    assert got == b"Hello world"
    assert probe("detokenize", h, -1, out, 64) == 0


def test_detokenize_holds_a_character_its_buffer_cannot_take(probe: Probe, model: Model) -> None:
    h = probe("session_open", 0, 0, 64)
    out = probe.buffer(16)
    ids = ids_of(model, "日")
    n = sum(probe("detokenize", h, t, out, 2) for t in ids)
    assert n == 0, "a 3-byte character is not split to fit a 2-byte buffer"
    assert probe.read(out, 4) == b"\xa5" * 4
    assert probe("detokenize", h, -1, out, 4) == 3
    assert probe.read(out, 3) == "日".encode()


def test_detokenize_errors(probe: Probe) -> None:
    h = probe("session_open", 0, 0, 64)
    out = probe.buffer(16)
    assert probe("detokenize", h, -3, out, 16) == EINVAL
    assert probe("detokenize", h, 587, out, 16) == EINVAL  # past the vocabulary
    assert probe("detokenize", h, 5, out, -1) == EINVAL
    assert probe("detokenize", h + 99, 5, out, 16) == ENOENT
    assert probe("detokenize", h, -2, out, 16) == 0  # flushing an empty stream


# --- emit ---------------------------------------------------------------------------------------


def test_emit_streams_chunks(probe: Probe) -> None:
    seen: list[str] = []
    ctx = CallContext(on_emit=lambda t: seen.append(t) or True)
    for chunk in ["Hel", "lo ✓", "", "🎉"]:
        a, n = probe.put(chunk)
        assert probe("emit", a, n, ctx=ctx) == OK
    assert seen == ["Hel", "lo ✓", "", "🎉"]
    assert ctx.emitted == 4
    a, n = probe.put("no listener")
    assert probe("emit", a, n) == OK  # no on_emit: still fine


def test_emit_on_emit_false_cancels(engine: SandboxEngine, tenant: TenantState) -> None:
    body = f"""(i32.store (i32.const {SCRATCH}) (call $emit (i32.const {DATA}) (i32.const 3)))
    (i32.store (i32.const {SCRATCH + 4}) (call $emit (i32.const {DATA}) (i32.const 3)))
    (i32.const 0)"""
    p = Probe(engine, tenant, guest_wat(None, {"two": body}, data={DATA: b"abc"}))
    seen: list[str] = []
    ctx = CallContext(on_emit=lambda t: seen.append(t) or False)
    with pytest.raises(CallCancelled):
        p.inst.call("two", {}, ctx)
    assert seen == ["abc"], "the second emit never reaches the caller"
    assert (p.scratch(0), p.scratch(1)) == (ECANCELLED, ECANCELLED)
    assert ctx.cancel.is_set()
    assert not p.inst.broken, "a guest that returns after ECANCELLED is fine"
    assert p.inst.call("two", {}, CallContext(on_emit=lambda t: True)) == {}
    assert (p.scratch(0), p.scratch(1)) == (OK, OK)


def test_emit_errors(probe: Probe) -> None:
    seen: list[str] = []
    ctx = CallContext(on_emit=lambda t: seen.append(t) or True)
    a, n = probe.put(b"\xe6\x97")  # a cut 3-byte character
    assert probe("emit", a, n, ctx=ctx) == EINVAL
    assert probe("emit", a, -1, ctx=ctx) == EINVAL
    assert probe("emit", a, (1 << 20) + 1, ctx=ctx) == ELIMIT
    assert seen == []


# --- result -------------------------------------------------------------------------------------


def test_result_sets_the_calls_result(probe: Probe) -> None:
    a, n = probe.put(json.dumps({"answer": 42, "text": "✓"}))
    assert probe("result", a, n) == OK
    assert probe.result == {"answer": 42, "text": "✓"}


@pytest.mark.parametrize(
    "bad", [b"not json", b"[1, 2]", b'"a string"', b"42", b"null", b'{"a": 1', b"\xff{}", b""]
)
def test_result_must_be_a_json_object(probe: Probe, bad: bytes) -> None:
    a, n = probe.put(bad)
    ctx = CallContext()
    assert probe("result", a, n, ctx=ctx) == EINVAL
    assert ctx.result is None
    assert probe.result == {}


def test_result_last_wins(engine: SandboxEngine, tenant: TenantState) -> None:
    one, two, bad = b'{"n": 1}', b'{"n": 2}', b"[3]"
    d = {DATA: one, DATA + 16: two, DATA + 32: bad}

    def res(addr: int, n: int, slot: int) -> str:
        return f"(i32.store (i32.const {SCRATCH + 4 * slot}) (call $result (i32.const {addr}) (i32.const {n})))"  # noqa: E501

    bodies = {
        "last": f"{res(DATA, 8, 0)} {res(DATA + 16, 8, 1)} (i32.const 0)",
        "bad_after_good": f"{res(DATA, 8, 0)} {res(DATA + 32, 3, 1)} (i32.const 0)",
        "fail": f"{res(DATA + 48, 17, 0)} (i32.const -1)",
        "fail_bare": "(i32.const -7)",
        "none": "(i32.const 0)",
    }
    d[DATA + 48] = b'{"error": "boom"}'
    p = Probe(engine, tenant, guest_wat(None, bodies, data=d))
    assert p.inst.call("last", {}) == {"n": 2}
    assert (p.scratch(0), p.scratch(1)) == (OK, OK)
    assert p.inst.call("bad_after_good", {}) == {"n": 1}, "a rejected result leaves the last one"
    assert (p.scratch(0), p.scratch(1)) == (OK, EINVAL)
    with pytest.raises(GuestError, match="boom"):
        p.inst.call("fail", {})
    with pytest.raises(GuestError, match="status -7"):
        p.inst.call("fail_bare", {})
    assert p.inst.call("none", {}) == {}, "no result: an empty object"
    assert not p.inst.broken


# --- matmul_f32 and attention_f32 -----------------------------------------------------------


@pytest.mark.parametrize(("rows", "cols", "batch"), [(5, 7, 3), (1, 1, 1), (33, 64, 1)])
def test_matmul_f32_matches_numpy(probe: Probe, rows: int, cols: int, batch: int) -> None:
    rng = np.random.default_rng(rows * 100 + cols)
    w = rng.standard_normal((rows, cols)).astype("<f4")
    x = rng.standard_normal((batch, cols)).astype("<f4")
    wp, _ = probe.put(w)
    xp, _ = probe.put(x)
    yp = probe.buffer(4 * rows * batch + 4)
    assert probe("matmul_f32", yp, wp, xp, rows, cols, batch) == OK
    y = probe.f32s(yp, rows * batch).reshape(batch, rows)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4,
                               atol=1e-4)  # fmt: skip
    assert probe.read(yp + 4 * rows * batch, 4) == b"\xa5" * 4


def test_matmul_f32_errors(probe: Probe) -> None:
    wp, _ = probe.put(np.ones((4, 4), "<f4"))
    yp = probe.buffer(64)
    for rows, cols, batch in [(0, 4, 1), (4, 0, 1), (4, 4, 0), (-1, 4, 1), (1 << 14, 1 << 13, 1)]:
        assert probe("matmul_f32", yp, wp, wp, rows, cols, batch) == EINVAL
    assert probe("matmul_f32", yp + 1, wp, wp, 2, 2, 1) == EINVAL  # misaligned y
    assert probe("matmul_f32", yp, wp + 2, wp, 2, 2, 1) == EINVAL  # misaligned w
    assert probe.read(yp, 64) == b"\xa5" * 64


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray):
    """Causal grouped-query attention in float64: query i sees cache rows 0..pos[i]."""
    n_q, n_heads, d = q.shape
    n_kv, n_kv_heads, _ = k.shape
    group = n_heads // n_kv_heads
    out = np.zeros_like(q, dtype=np.float64)
    for i in range(n_q):
        n = min(int(pos[i]) + 1, n_kv)
        for h in range(n_heads):
            g = h // group
            s = k[:n, g, :].astype(np.float64) @ q[i, h].astype(np.float64) / np.sqrt(d)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[:n, g, :].astype(np.float64)
    return out


@pytest.mark.parametrize(
    ("n_q", "n_kv", "n_heads", "n_kv_heads", "d", "pos"),
    [(3, 5, 4, 2, 8, [2, 3, 4]), (1, 1, 1, 1, 4, [0]), (2, 4, 6, 3, 16, [0, 9])],
)
def test_attention_f32_matches_numpy(
    probe: Probe, n_q: int, n_kv: int, n_heads: int, n_kv_heads: int, d: int, pos: list[int]
) -> None:
    rng = np.random.default_rng(n_q + n_kv + d)
    q = rng.standard_normal((n_q, n_heads, d)).astype("<f4")
    k = rng.standard_normal((n_kv, n_kv_heads, d)).astype("<f4")
    v = rng.standard_normal((n_kv, n_kv_heads, d)).astype("<f4")
    positions = np.asarray(pos, "<i4")
    ptrs = [probe.put(a)[0] for a in (q, k, v, positions)]
    op = probe.buffer(q.nbytes + 4)
    assert probe("attention_f32", op, *ptrs, n_q, n_kv, n_heads, n_kv_heads, d) == OK
    got = probe.f32s(op, q.size).reshape(q.shape)
    np.testing.assert_allclose(got, attention_reference(q, k, v, positions), rtol=1e-4, atol=1e-5)
    assert probe.read(op + q.nbytes, 4) == b"\xa5" * 4


def test_attention_f32_errors(probe: Probe) -> None:
    buf, _ = probe.put(np.zeros(4 * 3 * 8, "<f4"))
    pos, _ = probe.put(np.asarray([0, 1], "<i4"))
    negpos, _ = probe.put(np.asarray([-1, 0], "<i4"))
    op = probe.buffer(256)
    cases = [
        (op, buf, buf, buf, pos, 2, 2, 3, 2, 8),  # n_kv_heads does not divide n_heads
        (op, buf, buf, buf, pos, 0, 2, 2, 2, 8),
        (op, buf, buf, buf, pos, 2, 2, 2, 2, -8),
        (op, buf, buf, buf, negpos, 2, 2, 2, 2, 8),  # negative position
        (op, buf, buf, buf, pos + 2, 2, 2, 2, 2, 8),  # misaligned positions
        (op, buf, buf, buf, pos, 1, 1, 1, 1, 300),  # head_dim over the kernel's limit
    ]
    for args in cases:
        assert probe("attention_f32", *args) == EINVAL, args
    assert probe.read(op, 256) == b"\xa5" * 256


# --- pager_hint ---------------------------------------------------------------------------------


def test_pager_hint_unpaged_is_enotsup(probe: Probe) -> None:
    for hint in (1, 2, 3):
        assert probe("pager_hint", 0, 0, 0, hint) == ENOTSUP
    assert probe("pager_hint", *name(probe, "nope"), 0, 1) == ENOENT


def test_pager_hint_paged(engine: SandboxEngine, tmp_path: Path) -> None:
    paged = load_model(write_test_model(tmp_path / "paged.gguf"), max_resident_bytes=1 << 16)
    assert paged.pager is not None
    try:
        p = Probe(engine, TenantState("paged", {"paged": paged}))
        assert p("pager_hint", 0, 0, 0, 1) == OK  # prefetch
        assert p("pager_hint", 0, 0, 1, 2) == OK  # pin
        assert p("pager_hint", 0, 0, 1, 3) == OK  # unpin
        assert 1 in paged.pager.statistics().resident_layers
        for layer, hint in [(2, 1), (-1, 1), (0, 0), (0, 4)]:
            assert p("pager_hint", 0, 0, layer, hint) == EINVAL, (layer, hint)
    finally:
        paged.pager.close()


# --- memory that grows under the host ---------------------------------------------------------


def test_pointers_into_grown_memory_work(engine: SandboxEngine, tenant: TenantState) -> None:
    """The memory base may move when memory grows: every import re-reads it."""
    page = 0x10000
    new = 9 * page + 100  # in a page that does not exist until the call grows the memory
    body = f"""(drop (memory.grow (i32.const 8)))
    (i32.store8 (i32.const {new}) (i32.const 0x41))
    (i32.store8 (i32.const {new + 1}) (i32.const 0x42))
    (i32.store (i32.const {SCRATCH}) (call $emit (i32.const {new}) (i32.const 2)))
    (i32.store (i32.const {SCRATCH + 4}) (call $random (i32.const {new + 8}) (i32.const 16)))
    (i32.const 0)"""
    p = Probe(engine, tenant, guest_wat(None, {"grow": body}))
    assert p.size() == 2 * page
    seen: list[str] = []
    p.inst.call("grow", {}, CallContext(seed=3, on_emit=lambda t: seen.append(t) or True))
    assert seen == ["AB"]
    assert (p.scratch(0), p.scratch(1)) == (OK, OK)
    assert p.size() == 10 * page
    assert p.read(new + 8, 16) != bytes(16), "the host wrote into the new (zeroed) page"


def test_memory_grown_between_two_imports_is_seen_by_the_second(
    engine: SandboxEngine, tenant: TenantState
) -> None:
    """An import reads the memory's base and size once (the guest is paused meanwhile): the
    next import, after the guest grew its memory, must not reuse them."""
    page = 0x10000
    new = 5 * page + 64
    body = f"""(i32.store8 (i32.const {SCRATCH + 16}) (i32.const 0x43))
    (i32.store (i32.const {SCRATCH}) (call $emit (i32.const {SCRATCH + 16}) (i32.const 1)))
    (drop (memory.grow (i32.const 4)))
    (i32.store8 (i32.const {new}) (i32.const 0x44))
    (i32.store (i32.const {SCRATCH + 4}) (call $emit (i32.const {new}) (i32.const 1)))
    (i32.const 0)"""
    p = Probe(engine, tenant, guest_wat(None, {"grow": body}))
    assert p.size() == 2 * page
    seen: list[str] = []
    p.inst.call("grow", {}, CallContext(seed=3, on_emit=lambda t: seen.append(t) or True))
    assert seen == ["C", "D"]
    assert (p.scratch(0), p.scratch(1)) == (OK, OK)


def test_wat_bytes_escapes_everything() -> None:
    assert wat_bytes(b'a"\\\n\x00\xff') == "\\61\\22\\5c\\0a\\00\\ff"
    assert wat_bytes("é") == "\\c3\\a9"
