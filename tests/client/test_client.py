"""The protocol v1 client, async and sync, against a real server on 127.0.0.1 port 0.

Every test runs under an absolute time limit (``trio.fail_after``). The sync ``Client`` runs its
own Trio loop in a helper thread; the tests drive it from ``trio.to_thread.run_sync`` so the
server keeps running in the test's loop.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

import realm
from realm.client import (
    Client,
    ConnectionLost,
    Event,
    RemoteCancelled,
    RemoteError,
    RemoteInvalidParams,
    RemoteUnknownFunction,
    Unauthorized,
    connect,
)
from realm.server import Server, ServerConfig, ServerLimits, TenantSpec, hash_key, open_server
from realm.testing import write_test_model

LIMIT = 20  # seconds, every test
GEN = {"prompt": "Once upon", "max_tokens": 8, "temperature": 0}
LONG = {"prompt": "Once upon", "max_tokens": 200, "temperature": 0}  # seconds of tokens
KEY = "rk-test-key"
CANCELLED = {"tenant": "local", "function": "generate", "outcome": "cancelled"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("client") / "tiny.gguf", n_layers=2)


def config(model_path: Path, **changes: Any) -> ServerConfig:
    return ServerConfig(models={"tiny": str(model_path)}, port=0, **changes)


def sample(server: Server, name: str, **labels: str) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


async def wait_for_no_sessions(server: Server, tenant: str = "local") -> None:
    """The tenant's sessions go back to 0 (its guest stopped and freed them)."""
    while server.runtime.statistics().tenants[tenant]["sessions"]:
        await trio.sleep(0.01)


def free_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- async client ------------------------------------------------------------------------------


async def test_call_returns_the_result_data(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server, connect(server.url) as c:
            r = await c.call("generate", GEN)
            assert r["finish_reason"] in ("length", "stop")
            assert 0 < r["usage"]["completion_tokens"] <= 8 and isinstance(r["text"], str)
            assert (await c.call("generate", GEN))["text"] == r["text"]  # greedy: same text
            health = await c.health()
            assert health["status"] == "ok" and health["connections"] == 1
            meta = await c.metadata()
            names = {f["name"] for f in meta["functions"]}
            assert {"generate", "system_health", "system_metadata"} <= names
            assert meta["tenant"] == "local" and meta["models"] == ["tiny"]


async def test_stream_gives_contiguous_tokens_then_the_result(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server, connect(server.url) as c:
            tokens: list[str] = []
            events: list[Event] = []
            async with c.stream("generate", GEN) as stream:
                async for ev in stream:
                    events.append(ev)
                    if ev.kind == "token":
                        assert ev.data["index"] == len(tokens)
                        tokens.append(ev.data["token"])
            assert [ev.kind for ev in events] == ["token"] * len(tokens) + ["result"]
            result = events[-1].data
            # a token event is a piece of text (bytes of a split character wait for the rest)
            assert tokens and result["text"] == "".join(tokens)
            assert 0 < len(tokens) <= result["usage"]["completion_tokens"]


async def test_leaving_a_stream_early_cancels_the_call_on_the_server(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server, connect(server.url) as c:
            got = 0
            async with c.stream("generate", LONG) as stream:
                async for ev in stream:
                    assert ev.kind == "token"
                    got += 1
                    if got == 3:
                        break
            await wait_for_no_sessions(server)
            while not sample(server, "realm_calls_total", **CANCELLED):
                await trio.sleep(0.01)
            assert sample(server, "realm_tokens_total", tenant="local") < LONG["max_tokens"]
            # the connection is still good for the next call
            assert (await c.call("generate", GEN))["usage"]["completion_tokens"] > 0


async def test_concurrent_calls_share_one_connection(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server, connect(server.url) as c:
            texts: dict[int, str] = {}

            async def one(i: int) -> None:
                texts[i] = (await c.call("generate", {**GEN, "max_tokens": 6 + i}))["text"]

            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(one, i)
            assert sorted(texts) == list(range(5))
            alone = (await c.call("generate", {**GEN, "max_tokens": 10}))["text"]
            assert texts[4] == alone  # each call got its own stream, not a neighbour's
            assert sample(server, "realm_connections_accepted_total") == 1


async def test_errors_are_typed_and_carry_their_codes(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server, connect(server.url) as c:
            with pytest.raises(RemoteUnknownFunction) as unknown:
                await c.call("no_such_function", {})
            assert isinstance(unknown.value, realm.UnknownFunction)
            assert isinstance(unknown.value, RemoteError) and unknown.value.code == (
                "UNKNOWN_FUNCTION"
            )
            assert "no_such_function" in str(unknown.value)
            assert str(unknown.value).startswith("UNKNOWN_FUNCTION: ")

            with pytest.raises(RemoteInvalidParams) as bad:
                await c.call("generate", {"prompt": 5})
            assert isinstance(bad.value, realm.InvalidParams) and bad.value.code == (
                "INVALID_PARAMS"
            )
            assert "prompt" in bad.value.message and bad.value.call_id is not None

            with pytest.raises(realm.InvalidParams):  # the server's own cap on max_tokens
                await c.call("generate", {"prompt": "x", "max_tokens": 10**6})
            with pytest.raises(RemoteInvalidParams):  # system functions take no params
                await c.call("system_health", {"x": 1})
            # a failed call leaves the connection usable
            assert (await c.health())["status"] == "ok"


async def test_a_missing_api_key_closes_the_connection_with_1008(model_path: Path) -> None:
    tenants = {"acme": TenantSpec("acme", api_key_hashes=(hash_key(KEY),))}
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=tenants)) as server:
            # the server accepts the handshake, then closes with 1008: the first call fails
            for key in (None, "rk-wrong"):
                with pytest.raises(Unauthorized) as info:
                    async with connect(server.url, api_key=key, retries=0) as c:
                        await c.call("system_health")
                assert info.value.close_code == 1008
                assert info.value.reason == "UNAUTHORIZED: missing or unknown API key"
                assert "1008 UNAUTHORIZED: missing or unknown API key" in str(info.value)
                assert isinstance(info.value, realm.RealmError)
                assert info.value.code == "UNAUTHORIZED"
                assert isinstance(info.value, ConnectionLost)  # the connection is gone, too
            async with connect(server.url, api_key=KEY) as c:
                assert (await c.metadata())["tenant"] == "acme"


async def test_the_next_call_reconnects_after_an_idle_close(model_path: Path) -> None:
    limits = ServerLimits(idle_timeout_seconds=0.3)
    with trio.fail_after(LIMIT):
        async with (
            open_server(config(model_path, limits=limits)) as server,
            connect(server.url) as c,
        ):
            first = await c.call("generate", GEN)
            while server.connections:  # the server closes the idle connection (1000)
                await trio.sleep(0.02)
            assert (await c.call("generate", GEN))["text"] == first["text"]
            assert sample(server, "realm_connections_accepted_total") == 2


async def test_a_call_in_flight_when_the_connection_drops_fails(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server, connect(server.url) as c:
            with pytest.raises(ConnectionLost) as info:
                async with c.stream("generate", LONG) as stream:
                    async for ev in stream:
                        assert ev.kind == "token"
                        for conn in list(server.connections):
                            conn.close(1011, "going away for a test")
            assert info.value.close_code == 1011 and info.value.reason == "going away for a test"
            await wait_for_no_sessions(server)
            # never re-sent silently; the next call opens a new connection
            assert (await c.call("generate", GEN))["usage"]["completion_tokens"] > 0
            assert sample(server, "realm_connections_accepted_total") == 2


async def test_connecting_to_a_closed_port_fails_quickly() -> None:
    url = f"ws://127.0.0.1:{free_port()}"
    with trio.fail_after(LIMIT):
        t0 = trio.current_time()
        with pytest.raises(ConnectionLost) as info:
            async with connect(url, retries=1, backoff_seconds=0.05):
                pass  # pragma: no cover
        assert trio.current_time() - t0 < 2.0
        assert url in str(info.value) and info.value.close_code is None


async def test_a_refused_handshake_is_connection_lost(model_path: Path) -> None:
    limits = ServerLimits(max_connections=1)
    with trio.fail_after(LIMIT):
        async with (
            open_server(config(model_path, limits=limits)) as server,
            connect(server.url) as first,
        ):
            with pytest.raises(ConnectionLost) as info:  # HTTP 503, retried, then given up
                async with connect(server.url, retries=1, backoff_seconds=0.05):
                    pass  # pragma: no cover
            assert "handshake refused (503: too many connections)" in str(info.value)
            assert (await first.health())["connections"] == 1  # the first client is unharmed


async def test_a_url_that_is_not_a_websocket_url() -> None:
    with trio.fail_after(LIMIT):
        for url in ("http://127.0.0.1:8080", "127.0.0.1:8080", "ws://"):
            with pytest.raises(ConnectionLost, match="not a ws:// or wss:// URL"):
                async with connect(url, retries=3):
                    pass  # pragma: no cover


# --- sync client -------------------------------------------------------------------------------


async def test_sync_client_calls_streams_and_raises(model_path: Path) -> None:
    def use(url: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with Client(url) as c:
            out["thread"] = c._thread
            out["alive"] = c._thread.is_alive()
            out["result"] = c.call("generate", GEN)
            out["events"] = list(c.stream("generate", GEN))
            out["health"] = c.health()
            out["functions"] = {f["name"] for f in c.metadata()["functions"]}
            for name, fn, params in (
                ("unknown", "no_such_function", {}),
                ("bad", "generate", {"prompt": 5}),
            ):
                try:
                    c.call(fn, params)
                except RemoteError as e:
                    out[name] = e
        return out

    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            out = await trio.to_thread.run_sync(use, server.url)
    assert out["alive"] and not out["thread"].is_alive()
    assert "realm-client" not in {t.name for t in threading.enumerate()}
    events = out["events"]
    tokens = [ev.data["token"] for ev in events[:-1]]
    assert [ev.kind for ev in events] == ["token"] * len(tokens) + ["result"]
    assert [ev.data["index"] for ev in events[:-1]] == list(range(len(tokens)))
    assert events[-1].data["text"] == "".join(tokens) == out["result"]["text"]
    assert out["health"]["status"] == "ok" and "generate" in out["functions"]
    assert isinstance(out["unknown"], RemoteUnknownFunction)
    assert isinstance(out["unknown"], realm.UnknownFunction)
    assert isinstance(out["bad"], RemoteInvalidParams) and out["bad"].code == "INVALID_PARAMS"


async def test_sync_client_leaving_a_stream_early_cancels(model_path: Path) -> None:
    def use(url: str) -> tuple[int, dict[str, Any]]:
        with Client(url) as c:
            got = 0
            for ev in c.stream("generate", LONG):
                assert ev.kind == "token"
                got += 1
                if got == 3:
                    break
            return got, c.call("generate", GEN)

    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            got, after = await trio.to_thread.run_sync(use, server.url)
            assert got == 3 and after["usage"]["completion_tokens"] > 0
            await wait_for_no_sessions(server)
            assert sample(server, "realm_calls_total", **CANCELLED) == 1


async def test_sync_client_connection_errors() -> None:
    url = f"ws://127.0.0.1:{free_port()}"

    def use() -> tuple[BaseException | None, float]:
        t0 = time.monotonic()
        try:
            with Client(url, retries=0):
                pass  # pragma: no cover
        except ConnectionLost as e:
            return e, time.monotonic() - t0
        return None, 0.0  # pragma: no cover

    with trio.fail_after(LIMIT):
        error, seconds = await trio.to_thread.run_sync(use)
    assert isinstance(error, ConnectionLost) and url in str(error) and seconds < 2.0
    assert "realm-client" not in {t.name for t in threading.enumerate()}


async def test_sync_client_missing_key(model_path: Path) -> None:
    tenants = {"acme": TenantSpec("acme", api_key_hashes=(hash_key(KEY),))}

    def use(url: str) -> tuple[BaseException | None, str]:
        with Client(url, api_key=KEY) as c:
            tenant = c.metadata()["tenant"]
        try:
            with Client(url, retries=0) as c:
                c.call("system_health")
        except Unauthorized as e:
            return e, tenant
        return None, tenant  # pragma: no cover

    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=tenants)) as server:
            error, tenant = await trio.to_thread.run_sync(use, server.url)
    assert tenant == "acme"
    assert isinstance(error, Unauthorized) and error.close_code == 1008
    assert "UNAUTHORIZED" in error.reason


async def test_cancel_by_id_ends_the_stream_with_cancelled(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with (
            open_server(config(model_path)) as server,
            connect(server.url) as c,
            c.stream("generate", {"prompt": "Hi", "max_tokens": 200}) as events,
        ):
            assert isinstance(events.id, str)
            seen = 0
            with pytest.raises(RemoteCancelled) as info:
                async for ev in events:
                    assert ev.kind == "token"
                    seen += 1
                    if seen == 2:
                        await events.cancel()
            assert info.value.code == "CANCELLED" and info.value.call_id == events.id
