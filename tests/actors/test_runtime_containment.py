"""Tenant containment in the runtime: no guest slows, starves or crashes another tenant, and no
call leaks what it holds.

Every test runs under an absolute time limit (``trio.fail_after``); time bounds are generous
(a busy 2-core machine must not make them flaky).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import sys
import threading
import time
from pathlib import Path

import attrs
import pytest
import trio

import realm
from realm.actors import RuntimeLimits, TenantSpec, TenantStatistics
from realm.sandbox import GuestLimits
from realm.testing import write_test_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sandbox"))
from wat_guests import DATA, guest_wat

LIMIT = 30  # seconds, every test
GEN = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
SPIN = guest_wat(None, {"spin": "(loop $l (br $l)) (i32.const 0)"}).encode()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("rt") / "tiny.gguf", n_layers=1)


def result_guest(result: bytes) -> bytes:
    body = f"(drop (call $result (i32.const {DATA}) (i32.const {len(result)}))) (i32.const 0)"
    return guest_wat(None, {"f": body}, data={DATA: result}).encode()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


# --- deadlines, cancels and what a guest returns -------------------------------------------------


async def test_a_call_timeout_is_timeout(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        tenants = {"spin": {"guest": SPIN}}
        async with realm.open_runtime(models={"tiny": model_path}, tenants=tenants) as rt:
            t0 = trio.current_time()
            with pytest.raises(realm.DeadlineExceeded) as info:
                await rt.call("spin", "spin", {}, timeout=0.3)
            assert info.value.code == "TIMEOUT"
            assert trio.current_time() - t0 < 2.0
            with pytest.raises(realm.InvalidParams, match="timeout"):
                await rt.call("spin", "spin", {}, timeout=-1)


@pytest.mark.parametrize(
    "result",
    [b'{"usage": {"completion_tokens": -5}}', b'{"usage": {"completion_tokens": "many"}}',
     b'{"usage": {"completion_tokens": 1e300}}', b'{"usage": 7}', b'{"timings": "slow"}'],
)  # fmt: skip
async def test_what_a_guest_returns_is_checked(model_path: Path, result: bytes) -> None:
    with trio.fail_after(LIMIT):
        tenants = {"liar": {"guest": result_guest(result)}}
        async with realm.open_runtime(models={"tiny": model_path}, tenants=tenants) as rt:
            with pytest.raises(realm.GuestError) as info:
                await rt.call("liar", "f", {})
            assert info.value.code == "GUEST_TRAP"
            stats = rt.tenant_statistics("liar")
            assert (stats.calls, stats.errors, stats.completion_tokens) == (1, 1, 0)


# --- sessions never leak -------------------------------------------------------------------------


async def test_cancel_churn_leaves_no_session_open(model_path: Path) -> None:
    with trio.fail_after(LIMIT * 2):
        limits = RuntimeLimits(max_concurrent_calls=4, max_queued_calls=16)
        async with realm.open_runtime(models={"tiny": model_path}, limits=limits) as rt:
            rng = random.Random(7)
            for _ in range(4):  # rounds of 16 calls, each cancelled at a random point
                async with trio.open_nursery() as nursery:
                    for _ in range(16):

                        async def one(delay: float) -> None:
                            with trio.move_on_after(delay):
                                await rt.call("churn", "generate", {**GEN, "max_tokens": 40})

                        nursery.start_soon(one, rng.uniform(0.0, 0.08))
            with trio.fail_after(5):  # the guests' threads wind down within a step
                while rt.tenant_statistics("churn").sessions:
                    await trio.sleep(0.01)
            assert rt.registry.get("tiny").kv_bytes_used == 0
            assert (await rt.call("churn", "generate", GEN))["usage"]["completion_tokens"] > 0


async def test_the_session_limit_is_checked_against_concurrent_calls(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        bad = {"t": TenantSpec.from_mapping({"max_concurrent_calls": 2})}  # fine
        async with realm.open_runtime(models={"tiny": model_path}, tenants=bad):
            pass
        tenants = {"t": {"max_concurrent_calls": 4, "limits": GuestLimits(max_sessions=2)}}
        with pytest.raises(realm.TenantUnavailable, match="max_sessions"):
            async with realm.open_runtime(models={"tiny": model_path}, tenants=tenants):
                pass


# --- bytes: backpressure from a slow reader to the guest -----------------------------------------


async def test_a_reader_that_stops_holds_the_guest_back(model_path: Path) -> None:
    chunk = 64 << 10
    body = f"""(block $done (loop $l
      (br_if $done (i32.ne (call $emit (i32.const {DATA}) (i32.const {chunk})) (i32.const 0)))
      (br $l))) (i32.const 0)"""
    flood = guest_wat(None, {"flood": body}, memory="4", data={DATA: b"x" * chunk}).encode()
    limits = GuestLimits(max_emit_bytes=1 << 30)  # the per-call budget is not what stops it
    with trio.fail_after(LIMIT):
        tenants = {"flood": {"guest": flood, "limits": limits}}
        async with realm.open_runtime(models={"tiny": model_path}, tenants=tenants) as rt:
            before = _rss()
            async with rt.stream("flood", "flood", {}) as events:
                seen = 0
                async for ev in events:
                    assert ev.kind == "token" and len(ev.data["token"]) == chunk
                    seen += 1
                    if seen == 1:
                        await trio.sleep(0.5)  # a reader that stops reading
                        grown = _rss() - before
                    if seen == 40:
                        break  # still streaming: the guest waited, the call did not fail
            assert grown < 64 << 20, grown  # no more than the window (1 MiB) and change


# --- start-up: modules compile off the event loop, and bad ones are remembered -------------------


async def test_tenants_are_built_in_worker_threads_and_refusals_remembered(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from realm.sandbox import SandboxEngine

    threads: list[bool] = []
    compile_ = SandboxEngine.compile

    def spy(self: SandboxEngine, wasm: object, **kw: object) -> object:
        threads.append(threading.current_thread() is threading.main_thread())
        return compile_(self, wasm, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(SandboxEngine, "compile", spy)
    locals_ = " ".join(["i32"] * 20000)
    bad = guest_wat(None, {"f": "(i32.const 0)"}, extra=f"(func (local {locals_}))").encode()
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": model_path}, tenants={"ok": {}}) as rt:
            t0 = time.monotonic()
            rt.add_tenant("bad", guest=bad)  # returns at once: the work is in the background
            rt.add_tenant("trap", guest=SPIN)
            assert time.monotonic() - t0 < 0.5
            with pytest.raises(realm.GuestABIError, match="locals"):
                await rt.call("bad", "f", {})
            assert rt.engine.is_refused(bad)
            assert (await rt.call("ok", "count_tokens", {"text": "fine"}))["count"] > 0
            assert [f["name"] for f in await rt.functions("trap")] == ["spin"]
    assert threads and not any(threads), threads


# --- public operations and typed statistics ------------------------------------------------------


async def test_reset_tenant_and_typed_statistics(model_path: Path) -> None:
    trap = guest_wat(None, {"boom": "unreachable", "fine": "(i32.const 0)"}).encode()
    with trio.fail_after(LIMIT):
        tenants = {"bad": {"guest": trap, "max_restarts": 1, "restart_backoff_seconds": 0.0}}
        async with realm.open_runtime(models={"tiny": model_path}, tenants=tenants) as rt:
            for _ in range(2):
                with pytest.raises(realm.GuestTrap):
                    await rt.call("bad", "boom", {})
            with pytest.raises(realm.TenantUnavailable):
                await rt.call("bad", "fine", {})
            stats = rt.tenant_statistics("bad")
            assert isinstance(stats, TenantStatistics) and stats.failed
            assert stats["calls"] == stats.calls == 2 and dict(stats)["errors"] == 2
            assert json.loads(json.dumps({**stats}, default=str))["failed"] is True
            assert rt.statistics().tenants["bad"] == stats
            assert rt.reset_tenant("bad") is True
            assert await rt.call("bad", "fine", {}) == {}
            assert rt.reset_tenant("nobody") is False
            none = rt.tenant_statistics("nobody")
            assert none.calls == 0 and math.isnan(none.tokens_per_second)


def test_one_tenant_spec_with_one_set_of_defaults() -> None:
    from realm.server import TenantSpec as ServerTenantSpec

    spec = TenantSpec()
    assert RuntimeLimits().tenant_defaults() == spec
    server = ServerTenantSpec("acme")
    for name in ("max_concurrent_calls", "max_queued_calls", "weight"):
        assert getattr(server, name) == getattr(spec, name), name
    runtime = ServerTenantSpec("acme", max_concurrent_calls=32, max_kv_bytes=1 << 20).runtime_spec()
    assert isinstance(runtime, TenantSpec)
    assert runtime.limits.max_sessions >= 32 and runtime.limits.max_kv_bytes == 1 << 20
    with pytest.raises(ValueError, match="unknown key"):
        TenantSpec.from_mapping({"max_concurent_calls": 3})
    with pytest.raises(ValueError, match="weight"):
        TenantSpec(weight=0)
    assert attrs.evolve(spec, weight=2).weight == 2


# --- a bystander's tokens while another tenant attacks -------------------------------------------


async def test_a_bystanders_gaps_hold_while_another_tenant_multiplies(model_path: Path) -> None:
    n = 4096  # 69 GMAC a product
    w, x, y = DATA, DATA + 4 * n * n, DATA + 8 * n * n
    call = (f"(call $matmul_f32 (i32.const {y}) (i32.const {w}) (i32.const {x}) "
            f"(i32.const {n}) (i32.const {n}) (i32.const {n}))")  # fmt: skip
    body = f"(block $d (loop $l (br_if $d (i32.ne {call} (i32.const 0))) (br $l))) (i32.const 0)"
    attacker = guest_wat(None, {"attack": body}, memory=str((DATA + 12 * n * n) // 65536 + 1))
    with trio.fail_after(LIMIT * 2):
        tenants = {"bystander": {}, "attacker": {"guest": attacker.encode()}}
        async with realm.open_runtime(models={"tiny": model_path}, tenants=tenants) as rt:
            await rt.call("bystander", "generate", GEN)  # warm
            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(_swallow, rt.call("attacker", "attack", {}))
                await trio.sleep(0.3)
                arrivals: list[float] = []
                async with rt.stream("bystander", "generate", {**GEN, "max_tokens": 16}) as evs:
                    async for ev in evs:
                        if ev.kind == "token":
                            arrivals.append(time.perf_counter())
                nursery.cancel_scope.cancel()
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            # before the pool's gate a step waited for one such product per native job: the
            # worst gap was 4 s on 2 cores
            assert gaps and max(gaps) < 0.5, gaps
            assert rt.statistics().compute is not None


async def _swallow(coro: object) -> None:
    with contextlib.suppress(realm.RealmError):
        await coro  # type: ignore[misc]
