"""Tenant containment in the sandbox: bounded, interruptible imports; the compute gate; module,
schema and output limits; guest output checked like client input; sessions that never leak.

Each hostile behaviour is a tiny inline WAT guest. Guests run in threads joined with an
absolute timeout, and time bounds are generous (a 0.3 s deadline must end a call within 1.5 s)
so that a busy 2-core machine does not make them flaky.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import wasmtime
from wat_guests import DATA, SCRATCH, Probe, guest_wat, metadata_for, scratch_i32, write_tiny_model

from realm import CallCancelled, DeadlineExceeded, GuestABIError, GuestError, InvalidParams
from realm.model import Model
from realm.sandbox import (
    HOST_IMPORTS,
    CallContext,
    ComputeGate,
    GuestInstance,
    GuestLimits,
    SandboxEngine,
    Status,
    TenantState,
    _deadline,
    _imports,
)
from realm.sandbox._compute import TOKENIZE_WORK_PER_BYTE, Interrupted
from realm.sandbox._engine import MAX_FUNCTIONS, MAX_LOCALS_PER_FUNCTION

OK, EINVAL, ECANCELLED, ELIMIT = 0, int(Status.EINVAL), int(Status.ECANCELLED), int(Status.ELIMIT)
PAGE = 65536
BOUND = 1.5  # seconds: a 0.3 s deadline (or a cancel) ends the call within this


@pytest.fixture(scope="module")
def engine() -> Iterator[SandboxEngine]:
    with SandboxEngine() as eng:
        yield eng


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tenant(model: Model) -> Iterator[TenantState]:
    t = TenantState("mallory", {"tiny": model})
    yield t
    t.close()


def run_bounded(fn: Callable[[], Any], timeout: float) -> tuple[Any, BaseException | None, float]:
    """Run ``fn`` in a thread; fail unless it ends within ``timeout`` s. (value, error, s)."""
    box: dict[str, Any] = {}

    def target() -> None:
        t0 = time.monotonic()
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e
        box["seconds"] = time.monotonic() - t0

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), f"still running after {timeout} s"
    return box.get("value"), box.get("error"), box["seconds"]


def looping(call: str, *, pages: int, setup: str = "") -> str:
    """A guest whose ``loop`` runs ``setup`` then calls ``call`` (an i32 expression) until it
    returns a negative status, which it stores at SCRATCH and returns."""
    body = f"""(local $s i32) {setup}
    (block $done (loop $again
      (local.set $s {call})
      (br_if $done (i32.lt_s (local.get $s) (i32.const 0)))
      (br $again)))
    (i32.store (i32.const {SCRATCH}) (local.get $s))
    (local.get $s)"""
    return guest_wat(None, {"loop": body}, memory=str(pages))


def instance(engine: SandboxEngine, wat: str, tenant: TenantState) -> GuestInstance:
    return GuestInstance(engine, engine.compile(wat.encode()), tenant)


def matmul_loop(n: int) -> tuple[str, int]:
    w, x, y = DATA, DATA + 4 * n * n, DATA + 8 * n * n
    call = (
        f"(call $matmul_f32 (i32.const {y}) (i32.const {w}) (i32.const {x}) "
        + " ".join(f"(i32.const {n})" for _ in range(3))
        + ")"
    )
    return call, (DATA + 12 * n * n) // PAGE + 1


# --- 1. work inside an import is bounded and interruptible ------------------------------------


def test_a_deadline_ends_a_guest_looping_on_a_huge_matmul(engine: SandboxEngine) -> None:
    # 6144^3 = 2.3e11 multiply-adds a product: seconds each on 2 cores (one uninterrupted
    # product outlived the deadline by that much before products ran in chunks)
    call, pages = matmul_loop(6144)
    tenant = TenantState("mallory", {}, limits=GuestLimits(max_memory_bytes=512 << 20))
    inst = instance(engine, looping(call, pages=pages), tenant)
    ctx = CallContext(deadline=time.monotonic() + 0.3)
    _, err, seconds = run_bounded(lambda: inst.call("loop", {}, ctx), 60)
    assert isinstance(err, DeadlineExceeded), repr(err)
    assert err.code == "TIMEOUT"
    assert seconds < BOUND, seconds
    assert scratch_i32(inst, 0) == ECANCELLED  # the product itself stopped between chunks


def test_a_cancel_ends_a_guest_looping_on_the_costliest_attention(
    engine: SandboxEngine, tenant: TenantState
) -> None:
    n_q, n_kv, heads, kv_heads, d = 512, 16384, 16, 4, 64  # 2^18 scores a query
    q = DATA
    k = q + 4 * n_q * heads * d
    v = k + 4 * n_kv * kv_heads * d
    pos = v + 4 * n_kv * kv_heads * d
    out = pos + 4 * n_q
    pages = (out + 4 * n_q * heads * d) // PAGE + 1
    call = (f"(call $attention_f32 (i32.const {out}) (i32.const {q}) (i32.const {k}) "
            f"(i32.const {v}) (i32.const {pos}) (i32.const {n_q}) (i32.const {n_kv}) "
            f"(i32.const {heads}) (i32.const {kv_heads}) (i32.const {d}))")  # fmt: skip
    inst = instance(engine, looping(call, pages=pages), tenant)
    inst.memory.write(inst.store, np.full(n_q, n_kv - 1, "<i4").tobytes(), pos)
    ctx = CallContext()
    timer = threading.Timer(0.3, ctx.cancel.set)
    timer.start()
    try:
        _, err, seconds = run_bounded(lambda: inst.call("loop", {}, ctx), 30)
    finally:
        timer.cancel()
    assert type(err) is CallCancelled, repr(err)  # a cancel, not a deadline
    assert seconds < 0.3 + BOUND, seconds
    assert scratch_i32(inst, 0) == ECANCELLED


@pytest.mark.parametrize("what", ["tokenize", "decode"])
def test_a_deadline_interrupts_python_work(
    engine: SandboxEngine, tenant: TenantState, model: Model, what: str
) -> None:
    if what == "tokenize":  # a megabyte of words: seconds of pure Python per call
        n = 1 << 20
        blob = (b"lorem ipsum dolor sit amet, consectetur adipiscing elit " * 20000)[:n]
        call = (f"(call $tokenize (i32.const 0) (i32.const 0) (i32.const {DATA}) "
                f"(i32.const {n}) (i32.const 0) (i32.const 0) (i32.const 0))")  # fmt: skip
    else:  # a million ids
        n = 1 << 20
        blob = (np.arange(n, dtype="<i4") % (model.info.vocab_size - 10) + 3).tobytes()
        call = (f"(call $decode (i32.const 0) (i32.const 0) (i32.const {DATA}) "
                f"(i32.const {n}) (i32.const 0) (i32.const 0))")  # fmt: skip
    # a count >= 0 is success: go on while the import does not fail
    call = (
        f"(if (result i32) (i32.ge_s (local.tee $s {call}) (i32.const 0)) "
        "(then (i32.const 0)) (else (local.get $s)))"
    )
    inst = instance(engine, looping(call, pages=(DATA + len(blob)) // PAGE + 2), tenant)
    inst.memory.write(inst.store, blob, DATA)
    ctx = CallContext(deadline=time.monotonic() + 0.3)
    _, err, seconds = run_bounded(lambda: inst.call("loop", {}, ctx), 60)
    assert isinstance(err, DeadlineExceeded), repr(err)
    assert seconds < BOUND, seconds
    assert any("interrupted" in e for e in ctx.errors), ctx.errors


def test_imports_charge_the_calls_work_budget(engine: SandboxEngine, model: Model) -> None:
    tenant = TenantState("t", {"tiny": model}, limits=GuestLimits(max_work_per_call=4000))
    try:
        p = Probe(engine, tenant)
        ctx = CallContext()
        n = 16  # 16^3 = 4096 multiply-adds: over the budget, refused before any work
        assert p("matmul_f32", DATA + 8192, DATA, DATA + 4096, n, n, n, ctx=ctx) == ELIMIT
        assert ctx.work == 0 and "max_work_per_call" in ctx.errors[0]
        text, size = p.put("Hello world")
        assert p("tokenize", 0, 0, text, size, 0, DATA + 64, 16) == ELIMIT  # Python work too
    finally:
        tenant.close()
    tenant = TenantState("t", {"tiny": model})
    try:
        p = Probe(engine, tenant)
        ctx = CallContext()
        text, size = p.put("Hello world")
        assert p("tokenize", 0, 0, text, size, 0, DATA + 64, 16, ctx=ctx) > 0
        assert ctx.work == size * TOKENIZE_WORK_PER_BYTE  # in proportion to the bytes
    finally:
        tenant.close()


def test_counts_are_checked_before_anything_is_read(
    engine: SandboxEngine, tenant: TenantState
) -> None:
    wat = guest_wat(None, {"decode": "(call $decode (i32.const 0) (i32.const 0) (i32.const "
                           f"{DATA}) (i32.const {1 << 21}) (i32.const 0) (i32.const 0))"},
                    memory=str((DATA + (4 << 21)) // PAGE + 1))  # fmt: skip
    inst = instance(engine, wat, tenant)
    ctx = CallContext()
    with pytest.raises(GuestError, match=r"exceeds 1048576"):
        inst.call("decode", {}, ctx)  # the guest returns the status: ELIMIT, nothing decoded
    assert ctx.work == 0


def test_kernel_shapes_are_limited(engine: SandboxEngine, tenant: TenantState) -> None:
    p = Probe(engine, tenant)
    ctx = CallContext()
    # one query over 2^20 scores (32 heads x 32768 positions): refused before any work
    assert p("attention_f32", DATA, DATA, DATA, DATA, DATA, 1, 32768, 32, 32, 1, ctx=ctx) == ELIMIT
    assert p("matmul_f32", DATA + 128, DATA, DATA + 128, 4, 4, 1) == EINVAL  # y overlaps x
    assert p("attention_f32", DATA, DATA, DATA + 256, DATA + 512, DATA + 768, 1, 1, 1, 1, 4) == (
        EINVAL  # out overlaps q
    )


# --- 2. the compute gate: forward steps are not queued behind guests' kernels -----------------


class _Ctx:
    def __init__(self) -> None:
        self.cancel = threading.Event()

    def cancelled(self) -> bool:
        return self.cancel.is_set()


def test_a_forward_step_waits_only_for_the_guest_chunk_running_now() -> None:
    gate = ComputeGate(share=1.0)
    ctx = _Ctx()
    chunks = [0]

    def guest() -> None:
        while not ctx.cancelled():
            try:
                with gate.guest_chunk(ctx):  # type: ignore[arg-type]
                    time.sleep(0.02)
                    chunks[0] += 1
            except CallCancelled:
                return

    th = threading.Thread(target=guest, daemon=True)
    th.start()
    try:
        time.sleep(0.1)
        t0 = time.monotonic()
        with gate.forward_step():
            waited = time.monotonic() - t0
            before = chunks[0]
            time.sleep(0.15)  # no guest chunk runs during a step
            assert chunks[0] - before <= 1
        assert waited < 0.5, waited
    finally:
        ctx.cancel.set()
        th.join(5)
    assert gate.statistics().steps == 1


def test_guests_keep_to_their_share_while_others_step() -> None:
    gate = ComputeGate(share=0.25, slice_seconds=0.01)
    ctx = _Ctx()
    stop = threading.Event()

    def stepper() -> None:  # another tenant decoding: short steps, often
        while not stop.is_set():
            with gate.forward_step():
                time.sleep(0.001)
            time.sleep(0.004)

    th = threading.Thread(target=stepper, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        for _ in range(4):
            with gate.guest_chunk(ctx):  # type: ignore[arg-type]
                time.sleep(0.02)
        took = time.monotonic() - t0
    finally:
        stop.set()
        th.join(5)
    # 0.08 s of work at a 25% share: at least 3 x 0.06 s of waiting between the chunks
    assert took > 0.2, took
    assert gate.statistics().paced_seconds > 0.1
    with gate.guest_chunk(ctx):  # type: ignore[arg-type]
        pass  # alone again (no step for a while): no waiting at all


def test_guest_python_is_sliced_and_interrupted() -> None:
    gate = ComputeGate(share=1.0, slice_seconds=0.005)
    ctx = _Ctx()
    timer = threading.Timer(0.2, ctx.cancel.set)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(Interrupted), gate.guest_python(ctx):  # type: ignore[arg-type]
        while True:  # pure Python that never returns by itself
            sum(range(100))
    timer.cancel()
    assert time.monotonic() - t0 < BOUND
    assert gate.statistics().guest_slices > 5  # it gave the gate back between slices


def test_a_finalizer_inside_guest_python_is_never_interrupted() -> None:
    # the garbage collector may run any object's __del__ in the guest's thread while the call
    # is cancelled: raising there would be lost (an unraisable exception), leak the object and
    # remove the profile hook (CPython drops a hook that raises), so nothing interrupts later
    gate = ComputeGate(share=1.0, slice_seconds=0.005)
    ctx = _Ctx()
    ctx.cancel.set()
    finished: list[int] = []

    class Resource:
        def __del__(self) -> None:
            finished.append(sum(int(i) for i in range(5000)))  # many profiled calls

    t0 = time.monotonic()
    with pytest.raises(Interrupted), gate.guest_python(ctx):  # type: ignore[arg-type]
        Resource()  # dropped at once: its finalizer runs under the hook
        while time.monotonic() - t0 < BOUND:  # the hook must still be there to interrupt
            sum(range(100))
    assert finished == [sum(range(5000))]


def test_a_bystanders_steps_are_not_queued_behind_a_huge_matmul(
    engine: SandboxEngine, model: Model
) -> None:
    attacker = TenantState("attacker", {"tiny": model})
    bystander = TenantState("bystander", {"tiny": model})
    call, pages = matmul_loop(4096)  # 69 GMAC a product
    inst = instance(engine, looping(call, pages=pages), attacker)
    ctx = CallContext()
    th = threading.Thread(target=lambda: _swallow(inst.call, "loop", {}, ctx), daemon=True)
    th.start()
    try:
        time.sleep(0.2)
        p = Probe(engine, bystander)
        tp, _ = p.put(np.arange(3, 9, dtype="<i4"))
        h = p("session_open", 0, 0, 64)
        worst = 0.0
        for i in range(8):  # before the gate: a step waited for whole products (seconds)
            t0 = time.monotonic()
            assert p("forward", h, tp + 4 * (i % 6), 1, 0, 0, 0) == 0
            worst = max(worst, time.monotonic() - t0)
        assert worst < 0.5, worst
    finally:
        ctx.cancel.set()
        th.join(10)
        attacker.close()
        bystander.close()
    assert not th.is_alive()


def _swallow(fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(Exception):
        fn(*args)


# --- 2b. a guest spinning in wasm keeps to its share while others step ------------------------


def test_a_long_wasm_stretch_is_paused_while_others_step(engine: SandboxEngine) -> None:
    from realm.sandbox import COMPUTE

    wat = guest_wat(None, {"spin": "(loop $l (br $l)) (i32.const 0)"})
    tenant = TenantState("spinner", {})
    inst = instance(engine, wat, tenant)
    stop = threading.Event()

    def stepper() -> None:  # another tenant stepping: the gate is contended
        while not stop.is_set():
            with COMPUTE.forward_step():
                time.sleep(0.002)
            time.sleep(0.005)

    th = threading.Thread(target=stepper, daemon=True)
    th.start()
    try:
        before = COMPUTE.statistics().paced_seconds
        ctx = CallContext(deadline=time.monotonic() + 0.5)
        _, err, _ = run_bounded(lambda: inst.call("spin", {}, ctx), 10)
        assert isinstance(err, DeadlineExceeded)
        assert COMPUTE.statistics().paced_seconds > before  # it was paused
    finally:
        stop.set()
        th.join(5)


# --- 3. modules and schemas: guest-controlled work with limits ------------------------------------


def test_a_module_with_too_many_locals_is_refused_before_compiling(engine: SandboxEngine) -> None:
    locals_ = " ".join(["i32"] * (MAX_LOCALS_PER_FUNCTION + 1))
    wat = guest_wat(None, {"f": "(i32.const 0)"}, extra=f"(func (local {locals_}))")
    t0 = time.monotonic()
    with pytest.raises(GuestABIError, match="locals"):
        engine.compile(wat.encode())
    with pytest.raises(GuestABIError, match="refused before"):  # remembered by its hash
        engine.compile(wat.encode())
    assert engine.is_refused(wat.encode())
    assert time.monotonic() - t0 < 5


def test_a_module_with_too_many_functions_is_refused(engine: SandboxEngine) -> None:
    funcs = "\n".join("(func)" for _ in range(MAX_FUNCTIONS + 1))
    with pytest.raises(GuestABIError, match="functions"):
        engine.compile(guest_wat(None, {"f": "(i32.const 0)"}, extra=funcs).encode())


def test_a_compile_past_its_time_limit_is_refused() -> None:
    funcs = "\n".join(f"(func (local {' '.join(['i64'] * 200)}) (nop))" for _ in range(500))
    wat = guest_wat(None, {"f": "(i32.const 0)"}, extra=funcs).encode()
    with SandboxEngine(compile_seconds=1e-6) as eng:
        with pytest.raises(GuestABIError, match="compiling took over"):
            eng.compile(wat)
        with pytest.raises(GuestABIError, match="refused before"):
            eng.compile(wat)


def test_a_function_export_with_the_wrong_signature_is_refused_at_load(
    engine: SandboxEngine,
) -> None:
    wat = guest_wat(None, {}, extra='(func (export "realm_fn_f") (param i64) (result i32) '
                    "(i32.const 0))")  # fmt: skip
    with pytest.raises(GuestABIError, match="realm_fn_f"):
        engine.compile(wat.encode())


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"type": "string", "pattern": "^(a+)+$"}, "repeat inside a repeat"),
        ({"properties": {"x": {"pattern": r"(\w+)\1"}}}, "backreference"),
        ({"properties": {"x": {"pattern": "(?=a)b"}}}, "lookaround"),
        ({"patternProperties": {"^a": {}}}, "patternProperties"),
        ({"properties": {"x": {"pattern": "a{1,100000}"}}}, "counted repeat"),
    ],
)
def test_super_linear_schema_patterns_are_refused_at_load(
    engine: SandboxEngine, tenant: TenantState, schema: dict[str, Any], why: str
) -> None:
    wat = guest_wat(
        metadata_for(["f"], {"f": {"type": "object", **schema}}), {"f": "(i32.const 0)"}
    )
    with pytest.raises(GuestABIError, match=re.escape(why)):
        instance(engine, wat, tenant)


def test_a_linear_pattern_validates_params(engine: SandboxEngine, tenant: TenantState) -> None:
    schema = {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-z]+$"}}}
    wat = guest_wat(metadata_for(["f"], {"f": schema}), {"f": "(i32.const 0)"})
    inst = instance(engine, wat, tenant)
    assert inst.call("f", {"id": "abc"}) == {}
    with pytest.raises(InvalidParams, match="id"):
        inst.call("f", {"id": "a" * 100_000 + "!"})


# --- 4. bytes from a guest are bounded -----------------------------------------------------------


def test_emitted_bytes_are_bounded_per_chunk_and_per_call(
    engine: SandboxEngine, model: Model
) -> None:
    limits = GuestLimits(max_emit_chunk_bytes=1000, max_emit_bytes=2500)
    tenant = TenantState("t", {"tiny": model}, limits=limits)
    try:
        body = f"""(local $i i32)
        (i32.store (i32.const {SCRATCH}) (call $emit (i32.const {DATA}) (i32.const 1001)))
        (block $done (loop $l
          (br_if $done (i32.ge_s (local.get $i) (i32.const 4)))
          (i32.store (i32.add (i32.const {SCRATCH + 4}) (i32.shl (local.get $i) (i32.const 2)))
                     (call $emit (i32.const {DATA}) (i32.const 1000)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $l)))
        (i32.const 0)"""
        inst = instance(engine, guest_wat(None, {"f": body}), tenant)
        chunks: list[str] = []
        ctx = CallContext(on_emit=lambda s: chunks.append(s) is None)
        inst.call("f", {}, ctx)
        statuses = [scratch_i32(inst, i) for i in range(5)]
        assert statuses == [ELIMIT, OK, OK, ELIMIT, ELIMIT], statuses
        assert [len(c) for c in chunks] == [1000, 1000] and ctx.emitted_bytes == 2000
    finally:
        tenant.close()


# --- 5. guest output is checked like client input -----------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b'{"x": NaN}', b'{"x": Infinity}', b'{"x": -Infinity}', b'{"x": 1e999}', b'{"x": -1e400}'],
)
def test_results_without_json_numbers_are_refused(probe_tenant: Probe, raw: bytes) -> None:
    a, n = probe_tenant.put(raw)
    ctx = CallContext()
    assert probe_tenant("result", a, n, ctx=ctx) == EINVAL
    assert ctx.result is None


@pytest.fixture
def probe_tenant(engine: SandboxEngine, tenant: TenantState) -> Probe:
    return Probe(engine, tenant)


@pytest.mark.parametrize(
    "usage",
    ['{"completion_tokens": -1}', '{"completion_tokens": "12"}', '{"completion_tokens": 1.5}',
     '{"completion_tokens": true}', '{"prompt_tokens": 18014398509481985}', '"lots"'],
)  # fmt: skip
def test_bad_usage_figures_are_guest_errors(
    engine: SandboxEngine, tenant: TenantState, usage: str
) -> None:
    result = f'{{"text": "", "usage": {usage}}}'.encode()
    body = f"(drop (call $result (i32.const {DATA}) (i32.const {len(result)}))) (i32.const 0)"
    inst = instance(engine, guest_wat(None, {"f": body}, data={DATA: result}), tenant)
    with pytest.raises(GuestError, match="usage") as info:
        inst.call("f", {})
    assert info.value.code == "GUEST_TRAP"


def test_a_result_nested_past_what_a_message_carries_is_a_guest_error(
    engine: SandboxEngine, tenant: TenantState
) -> None:
    result = b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}"
    body = f"(drop (call $result (i32.const {DATA}) (i32.const {len(result)}))) (i32.const 0)"
    inst = instance(engine, guest_wat(None, {"f": body}, data={DATA: result}), tenant)
    with pytest.raises(GuestError, match="nests deeper"):
        inst.call("f", {})


def test_guest_log_text_is_escaped(probe_tenant: Probe, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="realm.guest")
    a, n = probe_tenant.put("ok\n[other] forged line\x1b[31m\u2028x\\")
    assert probe_tenant("log", 1, a, n) == OK
    (rec,) = [r for r in caplog.records if r.name == "realm.guest"]
    text = rec.getMessage()
    assert "\n" not in text and "\x1b" not in text and "\u2028" not in text
    assert text == "[mallory] ok\\n[other] forged line\\x1b[31m\\u2028x\\\\"


def test_a_passed_deadline_is_timeout_a_cancel_is_cancelled(
    engine: SandboxEngine, tenant: TenantState
) -> None:
    wat = guest_wat(None, {"spin": "(loop $l (br $l)) (i32.const 0)"})
    inst = instance(engine, wat, tenant)
    ctx = CallContext(deadline=time.monotonic() + 0.2)
    _, err, seconds = run_bounded(lambda: inst.call("spin", {}, ctx), 10)
    assert isinstance(err, DeadlineExceeded) and err.code == "TIMEOUT", repr(err)
    assert seconds < BOUND
    inst = instance(engine, wat, tenant)
    ctx = CallContext()
    timer = threading.Timer(0.2, ctx.cancel.set)
    timer.start()
    _, err, _ = run_bounded(lambda: inst.call("spin", {}, ctx), 10)
    assert type(err) is CallCancelled and err.code == "CANCELLED", repr(err)


# --- 6. sessions never leak ---------------------------------------------------------------------


def session_guest(then: str, *, keep: bool = False) -> str:
    """``f`` opens a session (handle at SCRATCH), keeps it if asked, then does ``then``."""
    keep_it = "(drop (call $session_keep (local.get $h)))" if keep else ""
    body = f"""(local $h i32)
    (local.set $h (call $session_open (i32.const 0) (i32.const 0) (i32.const 16)))
    (i32.store (i32.const {SCRATCH}) (local.get $h)) {keep_it} {then}"""
    return guest_wat(None, {"f": body})


SPIN = "(loop $l (br $l)) (i32.const 0)"


@pytest.mark.parametrize(
    ("then", "how"),
    [("(unreachable)", "trap"), (SPIN, "cancel"), (SPIN, "deadline")],
)
def test_a_call_that_ends_badly_closes_the_sessions_it_opened(
    engine: SandboxEngine, tenant: TenantState, then: str, how: str
) -> None:
    for keep in (False, True):
        inst = instance(engine, session_guest(then, keep=keep), tenant)
        ctx = CallContext(deadline=time.monotonic() + 0.2 if how == "deadline" else None)
        timer = threading.Timer(0.2, ctx.cancel.set)
        if how == "cancel":
            timer.start()
        try:
            _, err, _ = run_bounded(lambda inst=inst, ctx=ctx: inst.call("f", {}, ctx), 10)
        finally:
            timer.cancel()
        assert err is not None
        handle = scratch_i32(inst, 0)
        assert handle >= 0
        assert (handle in tenant.sessions) is keep, (how, keep)  # kept: a conversation's cache
        assert inst.broken or how != "trap"
    tenant.close()
    assert tenant.sessions == {}


def test_a_call_that_returns_leaves_its_sessions_to_the_tenant(
    engine: SandboxEngine, tenant: TenantState
) -> None:
    inst = instance(engine, session_guest("(i32.const 0)"), tenant)
    inst.call("f", {})
    slot = tenant.sessions[scratch_i32(inst, 0)]
    assert slot.owner is None and not slot.kept


def test_at_the_session_limit_a_call_waits_for_a_session_another_gives_back(
    engine: SandboxEngine, model: Model
) -> None:
    tenant = TenantState("t", {"tiny": model}, limits=GuestLimits(max_sessions=1))
    holder_body = """(local $h i32) (local $t i64)
    (local.set $h (call $session_open (i32.const 0) (i32.const 0) (i32.const 16)))
    (block $done (loop $l  ;; hold it for 0.3 s
      (br_if $done (i64.ge_s (call $clock_ms) (i64.const 300)))
      (br $l)))
    (drop (call $session_close (local.get $h)))
    (i32.const 0)"""
    waiter_body = (f"(i32.store (i32.const {SCRATCH}) (call $session_open (i32.const 0) "
                   "(i32.const 0) (i32.const 16))) (i32.const 0)")  # fmt: skip
    holder = instance(engine, guest_wat(None, {"hold": holder_body}), tenant)
    waiter = instance(engine, guest_wat(None, {"wait": waiter_body}), tenant)
    try:
        th = threading.Thread(target=holder.call, args=("hold", {}), daemon=True)
        th.start()
        while not tenant.sessions:
            time.sleep(0.005)
        _, err, seconds = run_bounded(lambda: waiter.call("wait", {}), 10)
        th.join(10)
        assert err is None
        assert scratch_i32(waiter, 0) >= 0  # a session, not ELIMIT: it waited
        assert seconds > 0.1
        # a call that finds only kept sessions (or sessions of calls that returned) is
        # refused at once: nothing would give one back
        tenant.close()
        keeper = instance(engine, session_guest("(i32.const 0)", keep=True), tenant)
        keeper.call("f", {})
        assert tenant.sessions[scratch_i32(keeper, 0)].kept
        t0 = time.monotonic()
        waiter.call("wait", {})
        assert scratch_i32(waiter, 0) == ELIMIT and time.monotonic() - t0 < 0.5
    finally:
        tenant.close()


# --- the shape of the code ------------------------------------------------------------------------


def test_every_abi_row_has_one_import_function() -> None:
    assert list(_imports.IMPLEMENTATIONS) == [imp.name for imp in HOST_IMPORTS]
    for imp in HOST_IMPORTS:
        fn = _imports.IMPLEMENTATIONS[imp.name]
        assert fn.__name__ == f"imp_{imp.name}"


def test_the_deadline_module_fails_loudly_on_another_wasmtime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _deadline.check_bindings()  # the pinned version: fine
    monkeypatch.setattr(wasmtime, "__version__", "51.0.0", raising=False)
    with pytest.raises(RuntimeError, match="PINNED_WASMTIME"):
        _deadline.check_bindings()


def test_only_the_deadline_module_touches_wasmtimes_private_bindings() -> None:
    root = Path(__file__).resolve().parents[2] / "realm"
    users = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if re.search(r"\b_bindings\b", p.read_text(encoding="utf-8"))
    )
    assert users == ["sandbox/_deadline.py"], users


def test_metadata_is_read_once_per_module(engine: SandboxEngine, tenant: TenantState) -> None:
    wat = guest_wat(None, {"f": "(i32.const 0)"})
    first = instance(engine, wat, tenant)
    second = instance(engine, wat, tenant)
    assert first.metadata is second.metadata
    assert json.dumps(first.functions())
