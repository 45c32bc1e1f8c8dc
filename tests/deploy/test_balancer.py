"""Three ``realm serve`` processes behind Debian's nginx, for real, on loopback: each tenant's
calls land on one server (WebSocket and HTTP alike, its chat reusing its cached prefix), tenants
spread over the servers, a server killed mid-stream gives its clients a retryable error and
their retry is served by another, and a SIGTERM drain loses no call.

Where nginx is not installed (``apt-get install nginx-light``) the tests are skipped, saying so.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

import realm.testing.models as test_models
from realm._protocol import SERVER_HEADER
from realm.client import ConnectionLost, RemoteError, connect
from realm.model._chat import CHATML_TEMPLATE
from realm.server import hash_key

from ._cluster import Cluster, find_haproxy, find_nginx, open_cluster, open_haproxy

NGINX = find_nginx()
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx not installed (apt-get install -y nginx-light)"
)

LIMIT = 60.0  # seconds for one test's I/O, at most
TENANTS = 12
KEYS = [f"key-of-tenant-{i}" for i in range(TENANTS)]
SHORT = {"prompt": "The", "max_tokens": 8, "temperature": 0, "model": "builtin"}
#: a stream that outlasts the kill and the drain's first steps (the long model's context)
LONG = {"prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0, "model": "long"}


def write_long_chat_model(path: Path) -> Path:
    """The tiny test model with a context of 8192 and a ChatML template."""
    original = test_models.GGUFWriter

    class Writer(original):  # type: ignore[misc,valid-type]
        def add_vocab_size(self, n: int) -> None:
            super().add_vocab_size(n)
            self.add_chat_template(CHATML_TEMPLATE)

    test_models.GGUFWriter = Writer
    try:
        return test_models.write_test_model(path, context_length=8192)
    finally:
        test_models.GGUFWriter = original


def _config(long_model: Path) -> str:
    tenants = "".join(
        f'[tenants.t{i}]\napi_keys = ["{hash_key(key)}"]\nmax_concurrent_calls = 8\n\n'
        for i, key in enumerate(KEYS)
    )
    return (
        '[server]\nhost = "127.0.0.1"\nport = 0\nmax_tokens = 8000\nshutdown_seconds = 30\n\n'
        f'[models]\nbuiltin = "builtin"\nlong = "{long_model}"\n\n{tenants}'
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    assert NGINX is not None
    tmp = tmp_path_factory.mktemp("balancer")
    long_model = write_long_chat_model(tmp / "long.gguf")
    with open_cluster(NGINX, tmp, _config(long_model)) as c:
        yield c


def _http(
    url: str, key: str | None = None, data: dict[str, Any] | None = None
) -> tuple[int, str, Any]:
    """status, X-Realm-Server, JSON body of one request (in a worker thread)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = None
    if data is not None:
        body = json.dumps(data).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get(SERVER_HEADER, ""), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get(SERVER_HEADER, ""), json.loads(e.read() or b"null")


async def http(url: str, key: str | None = None, data: dict[str, Any] | None = None) -> Any:
    return await trio.to_thread.run_sync(_http, url, key, data)


async def server_of(cluster: Cluster, key: str, tenant: str | None = None) -> str:
    """The server a key's connection lands on (its handshake header and system_health)."""
    async with connect(cluster.url, api_key=key, tenant=tenant, retries=3) as c:
        health = await c.health()
        assert health["server"] == c.server, (health, c.server)
        return health["server"]


async def test_each_tenant_sticks_to_one_server_and_tenants_spread(cluster: Cluster) -> None:
    ids = {s.server_id for s in cluster.servers}
    with trio.fail_after(LIMIT):
        placed = {key: await server_of(cluster, key) for key in KEYS}
        assert set(placed.values()) <= ids, (placed, ids)
        assert len(set(placed.values())) >= 2, f"every tenant on one server: {placed}"
        for key in KEYS[:4]:
            home = placed[key]
            # again, on new connections: the same server
            for _ in range(3):
                assert await server_of(cluster, key) == home, cluster.logs()
            # the browser's way (the key as a subprotocol): the same server
            proto = ["realm.v1", f"realm.bearer.{key}"]
            async with open_websocket_url(cluster.url, subprotocols=proto) as ws:
                heads = {k.decode().lower(): v.decode() for k, v in ws.handshake_headers}
                assert heads[SERVER_HEADER.lower()] == home
                assert ws.subprotocol == "realm.v1"
            # the HTTP API with the same key: the same server
            status, served_by, body = await http(f"http://127.0.0.1:{cluster.port}/v1/models", key)
            assert status == 200 and served_by == home, (status, served_by, body)
            status, served_by, body = await http(
                f"http://127.0.0.1:{cluster.port}/v1/completions",
                key,
                {"model": "builtin", "prompt": "The", "max_tokens": 4, "temperature": 0},
            )
            assert status == 200 and served_by == home, (status, served_by, body)
        # X-Realm-Tenant routes every key of a tenant alike (a routing key, not a credential):
        # keys that land apart land together with the same routing key
        routed = {await server_of(cluster, key, tenant="acme") for key in KEYS}
        assert len(routed) == 1, routed
        # a chat continued on a new connection reuses the prefix its server cached
        conversation = {"conversation": "c-1", "max_tokens": 4, "temperature": 0}
        conversation["model"] = "long"
        async with connect(cluster.url, api_key=KEYS[1], retries=3) as c:
            first = await c.call("chat", {**conversation, "message": "Hello there"})
            assert c.server == placed[KEYS[1]]
        async with connect(cluster.url, api_key=KEYS[1], retries=3) as c:
            second = await c.call("chat", {**conversation, "message": "And then?"})
            assert c.server == placed[KEYS[1]]
        assert first["usage"].get("cached_tokens", 0) == 0, first["usage"]
        assert second["usage"]["cached_tokens"] > 0, (first["usage"], second["usage"])


async def test_haproxy_routes_each_tenant_to_one_server_too(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The shipped HAProxy config in front of the same servers (where haproxy is installed):
    a tenant's WebSocket and HTTP requests land on one server, tenants spread."""
    haproxy = find_haproxy()
    if haproxy is None:
        pytest.skip("haproxy not installed (apt-get install -y haproxy)")
    with open_haproxy(haproxy, tmp_path, [s.port for s in cluster.servers]) as port:
        url = f"ws://127.0.0.1:{port}"
        with trio.fail_after(LIMIT):
            placed: dict[str, str] = {}
            for key in KEYS:
                for attempt in range(50):  # until the first health checks have passed
                    try:
                        async with connect(url, api_key=key, retries=0) as c:
                            placed[key] = (await c.health())["server"]
                        break
                    except (ConnectionLost, RemoteError):
                        if attempt == 49:
                            raise
                        await trio.sleep(0.1)
            assert len(set(placed.values())) >= 2, placed
            for key in KEYS[:3]:
                async with connect(url, api_key=key, retries=0) as c:
                    assert (await c.health())["server"] == placed[key]
                status, served_by, _ = await http(f"http://127.0.0.1:{port}/v1/models", key)
                assert status == 200 and served_by == placed[key]


async def _retry(c: Any, params: dict[str, Any], attempts: int = 5) -> dict[str, Any]:
    """A call sent again while its errors say it may be (bounded)."""
    for attempt in range(attempts):
        try:
            return await c.call("generate", params)
        except (ConnectionLost, RemoteError) as e:
            if not e.retryable or attempt == attempts - 1:
                raise
            await trio.sleep(0.1)
    raise AssertionError("unreachable")


async def test_a_lost_server_and_a_drained_one(cluster: Cluster) -> None:
    """A server killed mid-stream: its client gets a retryable ConnectionLost and its retry is
    served by another server. Then that server is drained (SIGTERM) with streams in flight:
    every stream ends with its whole result, readiness said 503 meanwhile, the server exits
    cleanly, and the clients' next calls go to the last server."""
    key = KEYS[0]
    with trio.fail_after(LIMIT):
        victim = cluster.by_id(await server_of(cluster, key))
        async with connect(cluster.url, api_key=key, retries=3) as c:
            assert c.server == victim.server_id
            tokens = 0
            with pytest.raises(ConnectionLost) as lost:
                async with c.stream("generate", LONG) as events:
                    async for ev in events:
                        if ev.kind == "result":
                            raise AssertionError(f"the stream outran the kill: {ev.data}")
                        tokens += 1
                        if tokens == 1:
                            victim.proc.send_signal(signal.SIGKILL)
            assert lost.value.retryable and "may be retried" in str(lost.value), lost.value
            result = await _retry(c, SHORT)
            assert result["usage"]["completion_tokens"] >= 1
            drained_id = c.server
            assert drained_id is not None and drained_id != victim.server_id
        await trio.to_thread.run_sync(victim.proc.wait, 10)

        drained = cluster.by_id(drained_id)
        last = next(s for s in cluster.servers if s not in (victim, drained))
        homes = {k: await server_of(cluster, k) for k in KEYS}
        assert set(homes.values()) <= {drained.server_id, last.server_id}, homes
        keys = [k for k in KEYS if homes[k] == drained.server_id][:3]
        assert keys, homes
        streams = [keys[i % len(keys)] for i in range(4)]
        started = [trio.Event() for _ in streams]
        finished = [trio.Event() for _ in streams]
        results: list[Any] = [None] * len(streams)
        async with trio.open_nursery() as nursery:

            async def stream(i: int, c: Any) -> None:
                got: list[str] = []
                async with c.stream("generate", {**LONG, "max_tokens": 1500}) as events:
                    async for ev in events:
                        if ev.kind == "token":
                            assert ev.data["index"] == len(got), "a lost or repeated token"
                            got.append(ev.data["token"])
                            started[i].set()
                        else:
                            results[i] = (got, ev.data)
                finished[i].set()

            clients = []
            for key in streams:
                clients.append(await nursery.start(_client, cluster.url, key))
            for i, c in enumerate(clients):
                nursery.start_soon(stream, i, c)
            for ev in started:
                await ev.wait()
            drained.proc.send_signal(signal.SIGTERM)
            ready = f"http://127.0.0.1:{drained.port}/ready"
            for _ in range(100):  # readiness turns false while it drains (bounded)
                status, served_by, body = await http(ready)
                if status == 503:
                    break
                await trio.sleep(0.02)
            assert status == 503 and body["status"] == "shutting_down", (status, body)
            assert served_by == drained.server_id
            in_flight = sum(not ev.is_set() for ev in finished)
            assert in_flight, "every stream ended before the drain began: nothing tested"
            # nothing is lost: every stream in flight ends with its whole result
            for ev in finished:
                await ev.wait()
            for got, data in results:
                assert data["text"] == "".join(got)
                assert data["finish_reason"] in ("length", "stop"), data
            # the next calls (the drained server closed their connections: 1001) land on the
            # last server standing
            for c in clients:
                await _retry(c, SHORT)
                assert c.server == last.server_id, (c.server, cluster.logs())
            nursery.cancel_scope.cancel()
        code = await trio.to_thread.run_sync(drained.proc.wait, 20)
        assert code == 0, drained.log()[-3000:]
        assert "shutting down" in drained.log()


async def _client(url: str, key: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A connected client, handed to the caller, kept open until the caller's scope ends."""
    async with connect(url, api_key=key, retries=5) as c:
        task_status.started(c)
        await trio.sleep_forever()
