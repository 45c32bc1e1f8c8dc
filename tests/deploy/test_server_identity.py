"""What a server behind a balancer needs, in process: its identity on every answer
(``X-Realm-Server``, ``/health``, ``/ready``, ``system_health``), the client's address from a
trusted balancer's ``X-Forwarded-For`` (failed logins are throttled per client, not per
balancer), readiness turning false while draining, and the config's checks of both settings.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from realm._protocol import SERVER_HEADER
from realm.client import connect
from realm.server import ConfigError, ServerConfig, ServerLimits, TenantSpec, hash_key, open_server
from realm.server._config import config_from_dict
from realm.testing import write_test_model

LIMIT = 30.0
KEY = "identity-key"
TENANTS = {"acme": TenantSpec("acme", api_key_hashes=(hash_key(KEY),))}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("identity") / "tiny.gguf", context_length=4096)


def _config(model: Path, **kw: object) -> ServerConfig:
    return ServerConfig(models={"tiny": str(model)}, tenants=TENANTS, port=0, **kw)  # type: ignore[arg-type]


async def _get(port: int, path: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        head = "".join(f"{h}\r\n" for h in headers)
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode())
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    top, _, body = raw.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body


@contextlib.asynccontextmanager
async def _handshake(
    port: int, *headers: str
) -> AsyncIterator[tuple[int, dict[str, str], trio.SocketStream]]:
    """A raw WebSocket handshake: its status, headers and the stream (closed on the way out)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        head = "".join(f"{h}\r\n" for h in headers)
        await stream.send_all(
            "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"{head}\r\n".encode()
        )
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            raw += chunk
        top = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in top[1:])
        yield int(top[0].split()[1]), {k.lower(): v for k, v in fields.items()}, stream


async def test_the_server_names_itself_everywhere(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(_config(model_path, server_id="realm-a.1")) as server:
            assert server.server_id == "realm-a.1"
            for path in ("/health", "/ready", "/nope", "/v1/models"):
                status, headers, body = await _get(server.port, path)
                assert headers[SERVER_HEADER.lower()] == "realm-a.1", (path, status)
            status, headers, body = await _get(server.port, "/health")
            assert status == 200 and json.loads(body)["server"] == "realm-a.1"
            status, headers, body = await _get(server.port, "/ready")
            assert status == 200 and json.loads(body) == {"status": "ready", "server": "realm-a.1"}
            async with connect(server.url, api_key=KEY) as c:
                assert c.server == "realm-a.1"
                assert (await c.health())["server"] == "realm-a.1"
            # a refused handshake names the server too
            async with _handshake(server.port, "Origin: https://evil.example") as (code, heads, _):
                assert code == 403 and heads[SERVER_HEADER.lower()] == "realm-a.1"
        # without server_id: the machine's name and the port
        async with open_server(_config(model_path)) as server:
            status, headers, _ = await _get(server.port, "/health")
            assert headers[SERVER_HEADER.lower()].endswith(f":{server.port}")


async def test_ready_turns_503_while_draining_and_idle_connections_close(
    model_path: Path,
) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(_config(model_path, limits=ServerLimits(shutdown_seconds=20))) as s:
            async with (
                connect(s.url, api_key=KEY) as busy,
                _handshake(s.port, f"Authorization: Bearer {KEY}") as (code, _, idle),
                trio.open_nursery() as nursery,
            ):
                streaming = trio.Event()
                results = []

                async def long_call() -> None:
                    params = {"prompt": "The", "max_tokens": 3000, "temperature": 0}
                    async with busy.stream("generate", params) as events:
                        async for ev in events:
                            streaming.set()
                            if ev.kind == "result":
                                results.append(ev.data)

                nursery.start_soon(long_call)
                await streaming.wait()
                nursery.start_soon(s.shutdown)
                for _ in range(200):  # bounded: the drain begins at once
                    if s.closing:
                        break
                    await trio.sleep(0.01)
                status, _, body = await _get(s.port, "/ready")
                assert status == 503 and json.loads(body)["status"] == "shutting_down"
                # the idle connection is closed now (1001), not when the drain ends
                assert code == 101
                frame = await idle.receive_some(64)
                assert frame[0] == 0x88 and int.from_bytes(frame[2:4], "big") == 1001, frame
                assert not results  # ... while the busy one's call still runs
            assert len(results) == 1 and results[0]["finish_reason"] in ("length", "stop")


async def _throttled(port: int, forwarded: str | None) -> int | None:
    """The HTTP status of a refused handshake with a wrong key (None: accepted, then closed)."""
    headers = ["Authorization: Bearer wrong"]
    if forwarded is not None:
        headers.append(f"X-Forwarded-For: {forwarded}")
    async with _handshake(port, *headers) as (code, _, _stream):
        return None if code == 101 else code


async def test_failed_logins_are_throttled_per_forwarded_client(model_path: Path) -> None:
    limits = ServerLimits(auth_failures_allowed=2, auth_backoff_seconds=30)
    with trio.fail_after(LIMIT):
        # behind a trusted balancer: the client's address is the forwarded one
        cfg = _config(model_path, limits=limits, trusted_proxies=("127.0.0.0/8",))
        async with open_server(cfg) as server:
            for _ in range(3):
                await _throttled(server.port, "198.51.100.7, 10.1.2.3")
            assert await _throttled(server.port, "10.1.2.3") == 429
            # another client behind the same balancer is not throttled, nor a spoofed left part
            assert await _throttled(server.port, "10.1.2.4") is None
            assert await _throttled(server.port, "10.1.2.3, 10.1.2.5") is None
            async with connect(server.url, api_key=KEY) as c:  # no header: the balancer itself
                assert (await c.health())["status"] == "ok"
        # no trusted proxies: the header is ignored (anyone could send it)
        async with open_server(_config(model_path, limits=limits)) as server:
            for _ in range(3):
                await _throttled(server.port, "10.1.2.3")
            assert await _throttled(server.port, "10.9.9.9") == 429


def test_config_checks_the_new_settings() -> None:
    doc = {"models": {"m": "builtin"}, "tenants": {"a": {"api_keys": [hash_key("k")]}}}
    good = config_from_dict(
        {**doc, "server": {"server_id": "web-1:8080", "trusted_proxies": ["10.0.0.0/24", "::1"]}}
    )
    assert good.server_id == "web-1:8080"
    assert good.trusted_proxies == ("10.0.0.0/24", "::1/128")
    for server, named in (
        ({"server_id": "has space"}, "server.server_id"),
        ({"server_id": ""}, "server.server_id"),
        ({"server_id": 7}, "server.server_id"),
        ({"trusted_proxies": "10.0.0.1"}, "server.trusted_proxies"),
        ({"trusted_proxies": ["nginx.local"]}, "server.trusted_proxies[0]"),
    ):
        with pytest.raises(ConfigError, match="^" + re.escape(named)):
            config_from_dict({**doc, "server": server})
    with pytest.raises(ConfigError, match="server_id"):
        ServerConfig(models={}, server_id="a b")
    with pytest.raises(ConfigError, match="trusted_proxies"):
        ServerConfig(models={}, trusted_proxies=("not an address",))
