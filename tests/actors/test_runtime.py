"""The embedded runtime: calls, streams, batching across tenants, cancellation, supervision.

Every test runs under an absolute time limit (``trio.fail_after``)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import trio

import realm
from realm.actors import RuntimeLimits
from realm.sandbox import GuestLimits
from realm.testing import write_test_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sandbox"))
from wat_guests import guest_wat

LIMIT = 30  # seconds, every test
GEN = {"prompt": "Once upon", "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("rt") / "tiny.gguf", n_layers=2)


async def test_call_returns_the_result_data(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": model_path}) as rt:
            r = await rt.call("alice", "generate", GEN)
            assert r["finish_reason"] in ("length", "stop")
            assert r["usage"]["completion_tokens"] <= 12 and isinstance(r["text"], str)
            again = await rt.call("alice", "generate", GEN)
            assert again["text"] == r["text"]  # greedy: same text


async def test_stream_yields_contiguous_tokens_then_the_result(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": model_path}) as rt:
            tokens: list[str] = []
            result = None
            async with rt.stream("bob", "generate", GEN) as events:
                async for ev in events:
                    if ev.kind == "token":
                        assert ev.data["index"] == len(tokens)
                        tokens.append(ev.data["token"])
                    else:
                        result = ev.data
            assert result is not None and result["text"] == "".join(tokens)


async def test_tenants_share_batched_steps(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": model_path}) as rt:
            texts: dict[str, str] = {}

            async def one(name: str) -> None:
                texts[name] = (await rt.call(name, "generate", {**GEN, "max_tokens": 24}))["text"]

            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(one, f"tenant{i}")
            alone = await rt.call("solo", "generate", {**GEN, "max_tokens": 24})
            assert set(texts.values()) == {alone["text"]}  # batching changes nothing
            st = rt.statistics().batcher
            assert st.max_batch_size > 1 and st.mean_batch_size > 1


async def test_cancel_stops_the_guest_and_frees_the_session(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": model_path}) as rt:
            with trio.move_on_after(0.05):
                await rt.call("carol", "generate", {**GEN, "max_tokens": 100000 // 100})
            actor = rt._actors["carol"]
            for _ in range(100):  # the guest's thread winds down within a step
                if not actor.state.sessions:
                    break
                await trio.sleep(0.01)
            assert actor.state.sessions == {}
            assert (await rt.call("carol", "count_tokens", {"text": "still here"}))["count"] > 0


async def test_leaving_a_stream_early_cancels_the_call(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": model_path}) as rt:
            async with rt.stream("dave", "generate", {**GEN, "max_tokens": 500}) as events:
                async for ev in events:
                    assert ev.kind == "token"
                    break
            actor = rt._actors["dave"]
            for _ in range(100):
                if not actor.state.sessions:
                    break
                await trio.sleep(0.01)
            assert actor.state.sessions == {}


async def test_configured_tenants_refuse_unknown_names(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": model_path}, tenants={"acme": {}}) as rt:
            assert (await rt.call("acme", "count_tokens", {"text": "hi"}))["count"] > 0
            with pytest.raises(realm.TenantUnavailable, match="unknown tenant 'other'"):
                await rt.call("other", "count_tokens", {"text": "hi"})


async def test_bad_params_and_functions(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": model_path}) as rt:
            with pytest.raises(realm.InvalidParams, match="max_tokens"):
                await rt.call("eve", "generate", {"prompt": "x", "max_tokens": "10"})
            with pytest.raises(realm.UnknownFunction):
                await rt.call("eve", "__class__", {})
            assert (await rt.call("eve", "count_tokens", {"text": "ok"}))["count"] > 0


TRAP_GUEST = guest_wat(None, {"boom": "unreachable", "fine": "(i32.const 0)"}).encode()


async def test_a_crashing_tenant_is_restarted_then_marked_unavailable(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        tenants = {"bad": {"guest": TRAP_GUEST}, "good": {}}
        async with realm.open_runtime(models={"tiny": model_path}, tenants=tenants) as rt:
            for _ in range(4):  # max_restarts = 3: the fourth trap marks it failed
                with pytest.raises(realm.GuestTrap):
                    await rt.call("bad", "boom", {})
            with pytest.raises(realm.TenantUnavailable, match="restarted"):
                await rt.call("bad", "fine", {})
            # the other tenant never noticed
            assert (await rt.call("good", "count_tokens", {"text": "fine"}))["count"] > 0
            rt._actors["bad"].reset()  # an operator action
            assert await rt.call("bad", "fine", {}) == {}


async def test_restarts_back_off(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        tenants = {"bad": {"guest": TRAP_GUEST}}
        async with realm.open_runtime(models={"tiny": model_path}, tenants=tenants) as rt:
            times = [trio.current_time()]
            for _ in range(3):
                with pytest.raises(realm.GuestTrap):
                    await rt.call("bad", "boom", {})
                times.append(trio.current_time())
            took = [b - a for a, b in itertools.pairwise(times)]
            # the call after the first crash waits 0.05 s for its instance, the next 0.1 s
            assert took[1] >= 0.05 and took[2] >= 0.1, took


async def test_reload_takes_effect_for_new_calls(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": model_path}, tenants={"t": {}}) as rt:
            assert "generate" in {f["name"] for f in rt.metadata("t")}
            rt.add_tenant("t", guest=TRAP_GUEST)
            assert {f["name"] for f in rt.metadata("t")} == {"boom", "fine"}


async def test_tight_guest_limits_apply(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        limits = RuntimeLimits(guest=GuestLimits(fuel_per_call=50_000))
        async with realm.open_runtime(models={"tiny": model_path}, limits=limits) as rt:
            with pytest.raises(realm.GuestTrap, match="fuel"):
                await rt.call("frank", "generate", {**GEN, "max_tokens": 50})


async def test_open_runtime_needs_a_model() -> None:
    with pytest.raises(realm.ModelError, match="at least one model"):
        async with realm.open_runtime(models={}):
            pass


async def test_one_paging_budget_for_every_model(model_path: Path, tmp_path: Path) -> None:
    other = write_test_model(tmp_path / "other.gguf", n_layers=2, seed=5)
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": model_path}) as rt:
            plain = await rt.call("alice", "generate", GEN)
            assert rt.statistics().models == {}  # no budget: nothing paged
        models = {"tiny": model_path, "other": other}
        async with realm.open_runtime(models=models, max_resident_bytes=0) as rt:
            paged = await rt.call("alice", "generate", {**GEN, "model": "tiny"})
            assert paged["text"] == plain["text"]  # paging changes where weights are, not them
            await rt.call("bob", "generate", {**GEN, "model": "other"})
            stats = rt.statistics().models
            assert set(stats) == {"tiny", "other"} and stats["tiny"].max_resident_bytes == 0
            assert stats["tiny"].misses > 0 and stats["other"].misses > 0
            assert rt.registry.get("tiny").pager.budget is rt.registry.get("other").pager.budget
    for bad in (-1, 1.5, "1GB", True):
        with pytest.raises(realm.ModelError, match="max_resident_bytes"):
            async with realm.open_runtime(models={"tiny": model_path}, max_resident_bytes=bad):
                pass


def test_the_trio_app_example_runs() -> None:
    import subprocess

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "trio_app.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tenant-2:" in proc.stdout and "mean batch size" in proc.stdout


async def test_idle_actors_stop_and_start_again(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        limits = RuntimeLimits(idle_seconds=0.2)
        async with realm.open_runtime(models={"tiny": model_path}, limits=limits) as rt:
            await rt.call("gina", "count_tokens", {"text": "hi"})
            assert "gina" in rt._actors
            await trio.sleep(1.5)
            assert "gina" not in rt._actors  # stopped, its memory released
            assert (await rt.call("gina", "count_tokens", {"text": "hi"}))["count"] > 0


async def test_long_prefill_is_chunked_between_other_steps(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": model_path}) as rt:
            rt.batcher.prefill_chunk = 8
            long_prompt = "word " * 60
            r = await rt.call("hank", "generate", {"prompt": long_prompt, "max_tokens": 3,
                                                   "temperature": 0})  # fmt: skip
            assert r["usage"]["prompt_tokens"] > 16
            st = rt.statistics().batcher
            assert st.steps >= r["usage"]["prompt_tokens"] // 8  # the prompt took many steps
            # and the chunked prefill gives the same text as an unchunked one
            rt.batcher.prefill_chunk = 4096
            again = await rt.call("hank", "generate", {"prompt": long_prompt, "max_tokens": 3,
                                                       "temperature": 0})  # fmt: skip
            assert again["text"] == r["text"]


async def test_per_tenant_kv_quota(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        model = realm.load_model(model_path)
        per = model.kv_bytes_per_position()
        tenants = {"small": {"limits": GuestLimits(max_kv_bytes=8 * per)}, "big": {}}
        async with realm.open_runtime(models={"tiny": model}, tenants=tenants) as rt:
            with pytest.raises(realm.GuestError, match="KV memory"):
                await rt.call("small", "generate", {**GEN, "max_tokens": 20})
            r = await rt.call("big", "generate", {**GEN, "max_tokens": 20})
            assert r["usage"]["completion_tokens"] > 0


async def test_a_flooding_tenant_does_not_starve_another(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": model_path}) as rt:
            done: list[str] = []

            async def flood() -> None:
                await rt.call("flood", "generate", {**GEN, "max_tokens": 16})
                done.append("flood")

            async def polite() -> None:
                await trio.sleep(0.01)  # arrives after the flood is queued
                await rt.call("polite", "generate", {**GEN, "max_tokens": 16})
                done.append("polite")

            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(flood)
                nursery.start_soon(polite)
            # the flood runs 2 at a time (its call slots); the polite call shares their steps
            assert done.index("polite") < len(done) - 4


async def test_shutdown_lets_calls_finish_then_stops_the_rest(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        outcomes: dict[str, object] = {}

        async def call(rt: realm.actors.Runtime, name: str, fn: str, params: dict) -> None:
            try:
                outcomes[name] = await rt.call(name, fn, params)
            except realm.RealmError as e:
                outcomes[name] = type(e).__name__

        limits = RuntimeLimits(shutdown_seconds=0.3)
        tenants = {"short": {}, "spin": {"guest": SPIN_GUEST}}
        # the callers (in `outer`) outlive the runtime block
        async with (
            trio.open_nursery() as outer,
            realm.open_runtime(models={"tiny": model_path}, tenants=tenants, limits=limits) as rt,
        ):
            outer.start_soon(call, rt, "short", "generate", {**GEN, "max_tokens": 3})
            outer.start_soon(call, rt, "spin", "spin", {})
            await trio.sleep(0.05)
        short = outcomes["short"]
        assert isinstance(short, dict) and short["finish_reason"] in ("length", "stop")
        assert outcomes["spin"] == "CallCancelled"  # stopped after the grace period, not hung


SPIN_GUEST = guest_wat(None, {"spin": "(loop $l (br $l)) (i32.const 0)"}).encode()


async def test_shutdown_lets_calls_in_flight_finish(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        results: list[dict] = []
        first_token = trio.Event()
        async with trio.open_nursery() as nursery:
            async with realm.open_runtime(
                models={"tiny": model_path}, limits=RuntimeLimits(shutdown_seconds=20)
            ) as rt:

                async def caller() -> None:
                    results.append(
                        await rt.call(
                            "t", "generate", {**GEN, "max_tokens": 24},
                            on_event=lambda ev: first_token.set(),
                        )
                    )  # fmt: skip

                nursery.start_soon(caller)
                await first_token.wait()
            # leaving the runtime waited for the call in flight
            assert len(results) == 1 and results[0]["usage"]["completion_tokens"] == 24
            with pytest.raises(realm.TenantUnavailable, match="shutting down"):
                await rt.call("t", "generate", GEN)


async def test_shutdown_cancels_calls_past_the_grace_period(model_path: Path) -> None:
    # a guest that never ends by itself: only the runtime's cancel stops it
    spin = guest_wat(None, {"spin": "(loop $l (br $l)) (i32.const 0)"}).encode()
    with trio.fail_after(LIMIT):
        outcome: list[BaseException | dict] = []
        async with trio.open_nursery() as nursery:
            async with realm.open_runtime(
                models={"tiny": model_path},
                tenants={"spin": {"guest": spin}},
                limits=RuntimeLimits(shutdown_seconds=0.2),
            ) as rt:

                async def caller() -> None:
                    try:
                        outcome.append(await rt.call("spin", "spin", {}))
                    except realm.RealmError as e:
                        outcome.append(e)

                nursery.start_soon(caller)
                while not rt.statistics().tenants.get("spin", {}).get("in_flight"):
                    await trio.sleep(0.01)
                t0 = trio.current_time()
            took = trio.current_time() - t0
        assert 0.2 <= took < 5, took  # the grace period, then stopped
        assert len(outcome) == 1
        assert isinstance(outcome[0], realm.CallCancelled | realm.GuestTrap), outcome


async def test_cancel_by_id(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": model_path}) as rt:
            assert rt.cancel("no-such-call") is False
            # a stream, cancelled from elsewhere by its id
            seen = 0
            async with rt.stream("t", "generate", {**GEN, "max_tokens": 200}) as events:
                assert isinstance(events.id, str)
                with pytest.raises(realm.CallCancelled, match=events.id):
                    async for _ev in events:
                        seen += 1
                        if seen == 2:
                            assert rt.cancel(events.id) is True
            assert seen < 200
            assert rt.statistics().tenants["t"]["sessions"] == 0  # its session was freed
            # a call given its id by the caller
            outcome: list[BaseException] = []

            async def caller() -> None:
                try:
                    await rt.call("t", "generate", {**GEN, "max_tokens": 200}, call_id="mine")
                except realm.CallCancelled as e:
                    outcome.append(e)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(caller)
                while not rt.cancel("mine"):
                    await trio.sleep(0.005)
            assert len(outcome) == 1 and "mine" in str(outcome[0])
            # ids are unique among running calls
            async with rt.stream("t", "generate", GEN, call_id="dup") as first:
                with pytest.raises(realm.InvalidParams, match="dup"):
                    await rt.call("t", "generate", GEN, call_id="dup")
                async for _ in first:
                    pass
            assert (await rt.call("t", "generate", GEN, call_id="dup"))["text"]  # free again
