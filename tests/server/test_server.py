"""The WebSocket server end to end, over real sockets on 127.0.0.1 (port 0).

Every test runs under an absolute time limit (``trio.fail_after(LIMIT)``); each starts its own
server. Where the client library matters, a test runs with both trio-websocket and the
``websockets`` library (see ``_wire.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from realm.server import TenantSpec, hash_key, open_server

from ._wire import (
    CLIENTS,
    LIMIT,
    LONG,
    SHORT,
    Closed,
    Rejected,
    assert_serving,
    call_text,
    cancel_text,
    config,
    open_client,
    wait_calls_freed,
)

ACME = {
    "acme": TenantSpec("acme", api_key_hashes=(hash_key("k1"),), max_concurrent_calls=4,
                       max_queued_calls=64),
    "beta": TenantSpec("beta", api_key_hashes=(hash_key("k2"), hash_key("k2b"))),
}  # fmt: skip
BEARER_K1 = [("Authorization", "Bearer k1")]


def check_generate(stream: list[dict[str, Any]], final: dict[str, Any], call_id: Any) -> str:
    """A streamed generate: indices 0..n-1, the text is the stream's, usage and timings."""
    assert final["type"] == "result" and final["id"] == call_id, final
    data = final["data"]
    assert [ev["index"] for ev in stream] == list(range(len(stream)))
    assert data["text"] == "".join(ev["token"] for ev in stream)
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0
    assert len(stream) <= usage["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    timings = data["timings"]
    assert timings["total_ms"] >= timings["time_to_first_token_ms"] >= 0
    assert data["finish_reason"] in ("stop", "length")
    return data["text"]


# --- system functions ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLIENTS)
async def test_system_functions(model_path: Path, kind: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server, open_client(kind, server.url) as c:
            _, meta = await c.request("m", "system_metadata")
            data = meta["data"]
            assert data["protocol"] == 1 and data["tenant"] == "local"
            assert data["models"] == ["tiny"]
            names = [f["name"] for f in data["functions"]]
            assert "generate" in names
            assert {"system_metadata", "system_health", "system_models", "system_metrics"} <= set(
                names
            )
            gen = next(f for f in data["functions"] if f["name"] == "generate")
            assert "prompt" in gen["params"]["properties"]

            _, health = await c.request(2, "system_health")
            h = health["data"]
            assert (health["id"], h["status"], h["protocol"]) == (2, "ok", 1)
            assert h["connections"] == 1 and h["calls_in_flight"] == 1  # this very call
            assert h["uptime_seconds"] >= 0 and h["version"]

            _, models = await c.request("ms", "system_models")
            (tiny,) = models["data"]["models"]
            assert tiny["name"] == "tiny" and tiny["n_layers"] == 2
            assert tiny["context_length"] == 2048 and tiny["vocab_size"] > 0

            assert "path" not in tiny  # no host path: the model is named by its registry name

            await c.request("g", "generate", SHORT)
            _, metrics = await c.request("mx", "system_metrics")
            m = metrics["data"]
            assert m["connections"] == 1 and m["batcher"]["steps"] > 0
            assert m["tenant"] == "local" and m["calls"] == 1 and m["completion_tokens"] == 8

            _, err = await c.request("p", "system_health", {"verbose": True})
            assert err["error"]["code"] == "INVALID_PARAMS"
            assert "takes no params" in err["error"]["message"]


# --- generate -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLIENTS)
async def test_streamed_generate(model_path: Path, kind: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server, open_client(kind, server.url) as c:
            stream, final = await c.request("r1", "generate", {**SHORT, "max_tokens": 24})
            text = check_generate(stream, final, "r1")
            assert final["data"]["usage"]["completion_tokens"] == 24
            assert final["data"]["finish_reason"] == "length"
            assert len(stream) > 0
            # greedy: the same text again, over an integer id this time
            stream2, again = await c.request(99, "generate", {**SHORT, "max_tokens": 24})
            assert check_generate(stream2, again, 99) == text


async def test_cancel_by_id(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server, open_client("trio", server.url) as c:
            await c.send(call_text("long", "generate", LONG))
            first = await c.recv()
            assert first["type"] == "stream" and first["id"] == "long"
            t0 = time.monotonic()
            await c.send(cancel_text("long"))
            stream, final = await c.final("long")
            assert final["type"] == "error" and final["id"] == "long"
            assert final["error"]["code"] == "CANCELLED"
            assert [ev["index"] for ev in stream] == list(range(1, len(stream) + 1))
            assert time.monotonic() - t0 < 2.0  # far sooner than the 1000 tokens would take
            await wait_calls_freed(server, "local")
            # a cancel for a call that is no longer running (or never was) gets no reply
            await c.send(cancel_text("long"))
            await c.send(cancel_text(12345))
            _, health = await c.request("h", "system_health")
            assert health["type"] == "result" and health["data"]["calls_in_flight"] == 1


@pytest.mark.parametrize("kind", CLIENTS)
async def test_disconnect_mid_stream_cancels_the_calls(model_path: Path, kind: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            async with open_client(kind, server.url) as c:
                await c.send(call_text("a", "generate", LONG))
                await c.send(call_text("b", "generate", {**LONG, "prompt": "Hello"}))
                seen = set()
                while seen != {"a", "b"}:
                    msg = await c.recv()
                    assert msg["type"] == "stream", msg
                    seen.add(msg["id"])
                assert server.runtime.statistics().tenants["local"]["in_flight"] == 2
            t0 = time.monotonic()
            await wait_calls_freed(server, "local", seconds=2.0)
            assert time.monotonic() - t0 < 2.0
            with trio.fail_after(2):
                while server.connections:
                    await trio.sleep(0.01)
            await assert_serving(server)


async def test_concurrent_calls_are_multiplexed_by_id(model_path: Path) -> None:
    cases = {
        "a": {**SHORT, "max_tokens": 30},
        7: {**SHORT, "prompt": "Hello", "max_tokens": 20},
        "c": {**SHORT, "prompt": "The cat", "max_tokens": 25},
    }
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server, open_client("trio", server.url) as c:
            alone = {}
            for call_id, params in cases.items():
                stream, final = await c.request(call_id, "generate", params)
                alone[call_id] = check_generate(stream, final, call_id)
            for call_id, params in cases.items():
                await c.send(call_text(call_id, "generate", params))
            await c.send(call_text("h", "system_health"))
            streams: dict[Any, list[dict[str, Any]]] = {k: [] for k in cases}
            finals: dict[Any, dict[str, Any]] = {}
            order = []
            while len(finals) < len(cases) + 1:
                msg = await c.recv()
                order.append(msg["id"])
                if msg["type"] == "stream":
                    assert msg["id"] not in finals  # nothing after a call's final message
                    streams[msg["id"]].append(msg["data"])
                else:
                    finals[msg["id"]] = msg
            assert finals["h"]["type"] == "result"
            for call_id in cases:
                assert check_generate(streams[call_id], finals[call_id], call_id) == alone[call_id]
            # interleaved, not one after the other: the health answer overtook the streams
            assert order.index("h") < len(order) - len(cases)
            assert len({order[i] for i in range(len(order) // 2)}) > 1


async def test_many_connections_at_once(model_path: Path) -> None:
    n = 24
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=ACME)) as server:
            texts: list[str] = []

            async def one(i: int) -> None:
                kind = CLIENTS[i % 2]
                async with open_client(kind, server.url, headers=BEARER_K1) as c:
                    _, health = await c.request("h", "system_health")
                    assert health["type"] == "result"
                    stream, final = await c.request(i, "generate", {**SHORT, "max_tokens": 6})
                    texts.append(check_generate(stream, final, i))

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
            assert len(texts) == n and len(set(texts)) == 1  # batching changes nothing
            assert server.runtime.statistics().batcher.max_batch_size > 1
            await wait_calls_freed(server, "acme")


# --- metrics endpoint ---------------------------------------------------------------------------


async def _http_get(port: int, request: bytes) -> tuple[bytes, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


async def test_metrics_endpoint(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, metrics=True)) as server:
            assert server.metrics_port and server.metrics_port != server.port
            async with open_client("trio", server.url) as c:
                await c.request("g", "generate", SHORT)
                await c.request("x", "nope")
                await c.send("not json")
                await c.recv()
            get = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            head, body = await _http_get(server.metrics_port, get)
            assert head.startswith(b"HTTP/1.1 200")
            assert b"text/plain; version=0.0.4" in head
            assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)
            text = body.decode()
            lines = text.splitlines()
            assert 'realm_calls_total{function="generate",outcome="ok",tenant="local"} 1.0' in lines
            assert (
                'realm_calls_total{function="<unknown>",outcome="unknown_function",'
                'tenant="local"} 1.0' in lines
            )
            assert 'realm_protocol_errors_total{code="INVALID_REQUEST"} 1.0' in lines
            assert "realm_connections_accepted_total 1.0" in lines
            assert any(line.startswith("realm_tokens_total{") for line in lines)
            assert any(line.startswith("realm_batch_steps_total ") for line in lines)
            assert 'realm_tenant_sessions{tenant="local"} 0.0' in lines
            assert "# TYPE realm_time_to_first_token_seconds histogram" in lines
            host = b"Host: localhost\r\n\r\n"
            head, _ = await _http_get(server.metrics_port, b"GET /other HTTP/1.1\r\n" + host)
            assert head.startswith(b"HTTP/1.1 404")
            head, _ = await _http_get(server.metrics_port, b"POST /metrics HTTP/1.1\r\n" + host)
            assert head.startswith(b"HTTP/1.1 405")
            head, _ = await _http_get(server.metrics_port, b"\x16\x03\x01garbage\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400")
            head, _ = await _http_get(server.metrics_port, get)  # the endpoint still answers
            assert head.startswith(b"HTTP/1.1 200")


# --- graceful shutdown --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLIENTS)
async def test_shutdown_cancels_a_long_call_and_closes_1001(
    long_model_path: Path, kind: str
) -> None:
    model_path = long_model_path
    shutdown = 0.5
    seen: list[Any] = []
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            cfg = config(model_path, shutdown_seconds=shutdown, max_tokens=8000)
            async with open_server(cfg) as server:
                streaming = trio.Event()

                async def client() -> None:
                    async with open_client(kind, server.url) as c:
                        await c.send(call_text("long", "generate", {**LONG, "max_tokens": 8000}))
                        try:
                            while True:
                                msg = await c.recv()
                                seen.append(msg)
                                streaming.set()
                        except Closed as e:
                            seen.append(e.code)

                nursery.start_soon(client)
                await streaming.wait()
                t0 = time.monotonic()
            took = time.monotonic() - t0  # leaving the block shut the server down
    assert shutdown <= took < shutdown + 2.0
    assert seen[-1] == 1001
    # past the grace period the call is cancelled, and says so before the close
    final = seen[-2]
    assert final["type"] == "error" and final["id"] == "long", final
    assert final["error"]["code"] == "CANCELLED"
    assert "shutting down" in final["error"]["message"]
    assert all(m["type"] == "stream" for m in seen[:-2])


async def test_shutdown_lets_a_short_call_finish(model_path: Path) -> None:
    seen: list[Any] = []
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            async with open_server(config(model_path, shutdown_seconds=10)) as server:
                streaming = trio.Event()

                async def client() -> None:
                    async with open_client("trio", server.url) as c:
                        await c.send(call_text("s", "generate", {**SHORT, "max_tokens": 60}))
                        try:
                            while True:
                                seen.append(await c.recv())
                                streaming.set()
                        except Closed as e:
                            seen.append(e.code)

                nursery.start_soon(client)
                await streaming.wait()
                t0 = time.monotonic()
            took = time.monotonic() - t0
    assert took < 5.0  # the call's time, not the 10 s grace period
    assert seen[-1] == 1001
    final = seen[-2]
    assert final["type"] == "result" and final["data"]["usage"]["completion_tokens"] == 60
    check_generate([m["data"] for m in seen[:-2]], final, "s")


# --- authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize(
    ("headers", "path"),
    [
        (None, ""),
        ([("Authorization", "Bearer nope")], ""),
        ([("Authorization", "Basic azE6")], ""),
        ([("Authorization", "Bearer")], ""),
        (None, "/?api_key=nope"),
        (None, "/?api_key="),
        (None, "/?key=k1"),
    ],
)
async def test_missing_or_bad_key_closes_1008(
    model_path: Path, kind: str, headers: Any, path: str
) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=ACME)) as server:
            async with open_client(kind, server.url + path, headers=headers) as c:
                with pytest.raises(Closed) as info:
                    await c.request("h", "system_health")
                assert info.value.code == 1008
                assert "UNAUTHORIZED" in info.value.reason
            await assert_serving(server, headers=BEARER_K1)


@pytest.mark.parametrize("kind", CLIENTS)
async def test_bearer_header_and_query_key_authenticate(model_path: Path, kind: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=ACME)) as server:
            for url, headers, tenant in [
                (server.url, BEARER_K1, "acme"),
                (server.url, [("authorization", "bearer  k2b")], "beta"),
                (server.url + "/?api_key=k2", None, "beta"),
                (server.url + "/v1?x=1&api_key=k1", None, "acme"),
            ]:
                async with open_client(kind, url, headers=headers) as c:
                    _, meta = await c.request("m", "system_metadata")
                    assert meta["data"]["tenant"] == tenant
                    stream, final = await c.request("g", "generate", SHORT)
                    check_generate(stream, final, "g")
                    _, ok = await c.request("t", "system_health", tenant_id=tenant)
                    assert ok["type"] == "result"
            stats = server.runtime.statistics().tenants
            assert stats["acme"]["calls"] == 2 and stats["beta"]["calls"] == 2


@pytest.mark.parametrize("kind", CLIENTS)
async def test_tenant_id_not_matching_the_key_is_unauthorized(model_path: Path, kind: str) -> None:
    with trio.fail_after(LIMIT):
        async with (
            open_server(config(model_path, tenants=ACME)) as server,
            open_client(kind, server.url, headers=BEARER_K1) as c,
        ):
            for tenant_id in ("beta", "local", "ACME", ""):
                _, err = await c.request("x", "generate", SHORT, tenant_id=tenant_id)
                assert err["type"] == "error" and err["id"] == "x"
                assert err["error"]["code"] == "UNAUTHORIZED"
                assert "tenant_id" in err["error"]["message"]
            assert "beta" not in server.runtime.statistics().tenants  # never reached
            _, ok = await c.request("y", "generate", SHORT, tenant_id="acme")
            assert ok["type"] == "result"


# --- limits -------------------------------------------------------------------------------------


async def test_call_rate_limit(model_path: Path) -> None:
    tenants = {
        "acme": TenantSpec("acme", api_key_hashes=(hash_key("k1"),), calls_per_second=2),
        "beta": TenantSpec("beta", api_key_hashes=(hash_key("k2"),)),
    }
    with trio.fail_after(LIMIT):
        async with (
            open_server(config(model_path, tenants=tenants)) as server,
            open_client("trio", server.url, headers=BEARER_K1) as c,
        ):
            outcomes = []
            for i in range(6):
                _, msg = await c.request(i, "count_tokens", {"text": "hi"})
                outcomes.append(msg["type"] if msg["type"] == "result" else msg["error"])
            assert outcomes[:2] == ["result", "result"]  # the burst
            limited = [o for o in outcomes if o != "result"]
            assert limited and all(o["code"] == "RATE_LIMITED" for o in limited)
            assert "call rate" in limited[0]["message"]
            _, health = await c.request("h", "system_health")  # system calls are free
            assert health["type"] == "result"
            # another tenant is not limited by acme's bucket
            k2 = [("Authorization", "Bearer k2")]
            async with open_client("websockets", server.url, headers=k2) as other:
                for i in range(4):
                    _, msg = await other.request(i, "count_tokens", {"text": "hi"})
                    assert msg["type"] == "result"
            await trio.sleep(0.6)  # one call back at 2/s
            _, msg = await c.request("later", "count_tokens", {"text": "hi"})
            assert msg["type"] == "result"


async def test_token_rate_limit(model_path: Path) -> None:
    tenants = {
        "acme": TenantSpec("acme", api_key_hashes=(hash_key("k1"),), tokens_per_second=5),
    }
    with trio.fail_after(LIMIT):
        async with (
            open_server(config(model_path, tenants=tenants)) as server,
            open_client("trio", server.url, headers=BEARER_K1) as c,
        ):
            # a stream under way is never cut short: the tenant goes into debt ...
            stream, final = await c.request("g", "generate", {**SHORT, "max_tokens": 30})
            check_generate(stream, final, "g")
            # ... and its next call waits until the debt is paid
            _, err = await c.request("g2", "generate", SHORT)
            assert err["error"]["code"] == "RATE_LIMITED"
            assert "token rate" in err["error"]["message"]
            assert "retry in" in err["error"]["message"]


@pytest.mark.parametrize("kind", CLIENTS)
async def test_max_tokens_over_the_server_limit(model_path: Path, kind: str) -> None:
    with trio.fail_after(LIMIT):
        async with (
            open_server(config(model_path, max_tokens=64)) as server,
            open_client(kind, server.url) as c,
        ):
            _, err = await c.request("big", "generate", {**SHORT, "max_tokens": 65})
            assert err["error"]["code"] == "INVALID_PARAMS" and err["id"] == "big"
            assert "max_tokens" in err["error"]["message"]
            assert "64" in err["error"]["message"]
            stream, ok = await c.request("ok", "generate", {**SHORT, "max_tokens": 64})
            check_generate(stream, ok, "ok")


async def test_calls_in_flight_per_connection_are_capped(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, max_calls_per_connection=2)) as server:
            async with open_client("trio", server.url) as c:
                await c.send(call_text("a", "generate", LONG))
                await c.send(call_text("b", "generate", LONG))
                await c.send(call_text("c", "generate", SHORT))
                await c.send(call_text("d", "system_health"))
                refused = {}
                while len(refused) < 2:
                    msg = await c.recv()
                    if msg["type"] == "error":
                        refused[msg["id"]] = msg["error"]
                assert refused["c"]["code"] == refused["d"]["code"] == "OVERLOADED"
                assert "limit 2" in refused["c"]["message"]
                await c.send(cancel_text("a"))
                await c.send(cancel_text("b"))
                codes = {}
                while len(codes) < 2:
                    msg = await c.recv()
                    if msg["type"] == "error":
                        codes[msg["id"]] = msg["error"]["code"]
                assert codes == {"a": "CANCELLED", "b": "CANCELLED"}
                _, ok = await c.request("e", "generate", SHORT)
                assert ok["type"] == "result"
            # another connection has its own allowance
            await assert_serving(server)


@pytest.mark.parametrize("kind", CLIENTS)
async def test_max_connections_refuses_the_handshake(model_path: Path, kind: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, max_connections=2)) as server:
            async with open_client("trio", server.url) as a, open_client(kind, server.url) as b:
                for c in (a, b):
                    _, ok = await c.request("h", "system_health")
                    assert ok["type"] == "result"
                with pytest.raises(Rejected) as info:
                    async with open_client(kind, server.url):
                        pass
                assert info.value.status == 503
            with trio.fail_after(3):  # the slots come back
                while server.connections:
                    await trio.sleep(0.01)
            await assert_serving(server)


async def test_max_connections_holds_for_simultaneous_handshakes(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, max_connections=3)) as server:
            outcomes: list[str] = []
            release = trio.Event()

            async def one(i: int) -> None:
                try:
                    async with open_client(CLIENTS[i % 2], server.url) as c:
                        outcomes.append("open")
                        await release.wait()
                        _, ok = await c.request("h", "system_health")
                        assert ok["data"]["connections"] == 3
                except Rejected as e:
                    outcomes.append(str(e.status))

            async with trio.open_nursery() as nursery:
                for i in range(12):
                    nursery.start_soon(one, i)
                with trio.fail_after(5):
                    while len(outcomes) < 12:
                        await trio.sleep(0.01)
                assert sorted(outcomes) == ["503"] * 9 + ["open"] * 3
                assert len(server.connections) == 3
                release.set()
            await assert_serving(server)


async def test_idle_connection_is_closed(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, idle_timeout_seconds=0.3)) as server:
            async with open_client("websockets", server.url) as c:
                _, ok = await c.request("h", "system_health")
                assert ok["type"] == "result"
                t0 = time.monotonic()
                assert await c.close_code() == 1000
                assert 0.25 < time.monotonic() - t0 < 3
            # a call in flight is not idleness
            async with open_client("trio", server.url) as c:
                stream, final = await c.request("g", "generate", {**SHORT, "max_tokens": 150})
                check_generate(stream, final, "g")


async def test_client_that_never_answers_pings_is_closed(model_path: Path) -> None:
    from ._wire import OP_CLOSE, OP_PING, open_raw

    limits = {"ping_interval_seconds": 0.2, "ping_timeout_seconds": 0.3}
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, **limits)) as server:
            async with open_raw(server.port) as raw:
                t0 = time.monotonic()
                opcodes = []
                while True:
                    got = await raw.read_frame()
                    assert got is not None
                    opcodes.append(got[0])
                    if got[0] == OP_CLOSE:
                        assert int.from_bytes(got[1][:2], "big") == 1008
                        break
                assert opcodes[0] == OP_PING
                assert time.monotonic() - t0 < 3
            # a client that answers (both libraries do) stays connected across pings
            async with open_client("trio", server.url) as c:
                await trio.sleep(1.0)
                _, ok = await c.request("h", "system_health")
                assert ok["type"] == "result"


async def test_a_burst_of_calls_gets_one_answer_each(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with (
            open_server(config(model_path)) as server,
            open_client("websockets", server.url) as c,
        ):
            ids = list(range(300))

            def burst() -> None:
                for i in ids:
                    c.ws.send(call_text(i, "system_health"))  # type: ignore[attr-defined]

            await trio.to_thread.run_sync(burst)
            got = [await c.recv() for _ in ids]
            assert sorted(m["id"] for m in got) == ids
            for m in got:  # answered, or refused past the per-connection cap
                assert m["type"] == "result" or m["error"]["code"] == "OVERLOADED", m
