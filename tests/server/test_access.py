"""Who may connect: Origin and Host (browsers, DNS rebinding), API keys a browser can send,
and failed logins (logged without the key, counted, throttled per client address).

Handshakes are written by hand (``_wire.handshake``) so every header is the test's choice, as
a browser's would be; clients from other addresses connect from 127.0.0.2 (all of 127/8 is
this machine). Every test runs under ``trio.fail_after(LIMIT)``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import websockets.sync.client

from realm.server import (
    ConfigError,
    ServerConfig,
    TenantSpec,
    config_from_dict,
    hash_key,
    open_server,
)
from realm.server._access import FORGET_SECONDS, MAX_TRACKED_ADDRESSES, LoginThrottle

from ._wire import (
    LIMIT,
    RECV_SECONDS,
    assert_serving,
    config,
    get,
    handshake,
    http_exchange,
    raw_call,
)

KEY = "rk-access-test-key"
TENANTS = {"acme": TenantSpec("acme", api_key_hashes=(hash_key(KEY),))}


def refused(server: object, reason: str) -> float:
    return (
        server.metrics.registry.get_sample_value(  # type: ignore[attr-defined]
            "realm_handshakes_refused_total", {"reason": reason}
        )
        or 0.0
    )


# --- Origin and Host ---------------------------------------------------------------------------

LOOPBACK_PAGES = [
    "http://localhost:3000",
    "http://127.0.0.1",
    "https://127.0.0.2:8443",
    "http://[::1]:8080",
    "http://app.localhost",
    "HTTP://LOCALHOST:3000/",
]
OTHER_PAGES = [
    "https://evil.example",
    "http://localhost.evil.example",
    "http://127.0.0.1.nip.io",
    "null",  # sandboxed iframes, file:// pages
    "file://",
    "chrome-extension://abcdef",
    "http://10.0.0.1",
]


async def test_without_config_only_loopback_pages_may_connect(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            for origin in [None, *LOOPBACK_PAGES]:
                headers = [] if origin is None else [f"Origin: {origin}"]
                status, _, conn = await handshake(server.port, *headers)
                async with conn.stream:
                    assert status == 101, origin
                    msg = await raw_call(conn, "h", "system_health")
                    assert msg["type"] == "result", origin
            for i, origin in enumerate(OTHER_PAGES):
                status, _, conn = await handshake(server.port, f"Origin: {origin}")
                async with conn.stream:
                    assert status == 403, origin
                    body = await conn.rest()
                    assert b"Origin" in body and b"allowed_origins" in body
                assert refused(server, "forbidden") == i + 1
            assert not server.connections
            await assert_serving(server)


HOSTS = [
    ("127.0.0.1", True),
    ("localhost:8080", True),
    ("[::1]:1234", True),
    ("LOCALHOST", True),
    ("evil.example", False),  # DNS rebinding: evil.example now resolves to 127.0.0.1
    ("evil.example:8080", False),
    ("127.0.0.1.evil.example", False),
    ("10.1.2.3", False),
]


async def test_a_loopback_server_answers_loopback_names_only(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            for host, ok in HOSTS:
                status, _, conn = await handshake(server.port, host=host)
                async with conn.stream:
                    assert status == (101 if ok else 403), host
                status, _, body = await http_exchange(server.port, get("/health", host=host))
                assert status == (200 if ok else 403), host
                if not ok:
                    assert b"loopback" in body and b"allowed_hosts" in body


async def test_allowed_origins_and_hosts_from_the_config(model_path: Path) -> None:
    cfg = ServerConfig(
        models={"tiny": str(model_path)},
        tenants=TENANTS,
        port=0,
        allowed_origins=("https://app.example.com",),
        allowed_hosts=("realm.example.com", "127.0.0.1"),
    )
    auth = f"Authorization: Bearer {KEY}"
    with trio.fail_after(LIMIT):
        async with open_server(cfg) as server:
            for origin, host, status_wanted in [
                ("https://app.example.com", "realm.example.com", 101),
                ("HTTPS://APP.EXAMPLE.COM/", "realm.example.com:443", 101),
                (None, "127.0.0.1", 101),
                ("http://localhost:3000", "realm.example.com", 403),  # listed origins only
                ("https://evil.example", "realm.example.com", 403),
                ("https://app.example.com", "evil.example", 403),
            ]:
                headers = [auth] + ([f"Origin: {origin}"] if origin else [])
                status, _, conn = await handshake(server.port, *headers, host=host)
                async with conn.stream:
                    assert status == status_wanted, (origin, host)
    star = ServerConfig(models={"tiny": str(model_path)}, port=0, allowed_origins=("*",))
    with trio.fail_after(LIMIT):
        async with open_server(star) as server:
            status, _, conn = await handshake(server.port, "Origin: https://anyone.example")
            async with conn.stream:
                assert status == 101


def test_allowed_origins_are_checked_at_load(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    base = {"models": {"m": "m.gguf"}}
    cfg = config_from_dict(
        {**base, "server": {"allowed_origins": ["https://A.example/", "*"],
                            "allowed_hosts": ["Realm.example:8443", "[::1]"]}},
        base=tmp_path,
    )  # fmt: skip
    assert cfg.allowed_origins == ("https://a.example", "*")
    assert cfg.allowed_hosts == ("realm.example:8443", "[::1]")
    for server, says in [
        ({"allowed_origins": "https://a.example"}, "server.allowed_origins: must be a list"),
        ({"allowed_origins": ["a.example"]}, "server.allowed_origins[0]: 'a.example' is not"),
        ({"allowed_origins": ["https://a.example/path"]}, "server.allowed_origins[0]"),
        ({"allowed_hosts": ["https://a.example"]}, "server.allowed_hosts[0]"),
        ({"allowed_hosts": [5]}, "server.allowed_hosts: must be a list"),
    ]:
        with pytest.raises(ConfigError, match=r"^" + says.replace("[", r"\[").replace("]", r"\]")):
            config_from_dict({**base, "server": server}, base=tmp_path)


async def test_an_open_server_listens_on_loopback_only(model_path: Path) -> None:
    for host in ["0.0.0.0", "::", "192.0.2.1", "example.com"]:
        cfg = ServerConfig(models={"tiny": str(model_path)}, host=host, port=0)
        with trio.fail_after(LIMIT), pytest.raises(ConfigError, match="loopback"):
            async with open_server(cfg):
                pass  # pragma: no cover


# --- a key a browser can send ------------------------------------------------------------------


async def test_a_browser_authenticates_with_a_subprotocol(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=TENANTS)) as server:
            # what `new WebSocket(url, ["realm.v1", "realm.bearer." + key])` sends
            status, headers, conn = await handshake(
                server.port,
                "Origin: http://localhost:5173",
                f"Sec-WebSocket-Protocol: realm.v1, realm.bearer.{KEY}",
            )
            async with conn.stream:
                assert status == 101
                # the server picks realm.v1: a browser fails a handshake answered with none,
                # and the key is never echoed
                assert headers["sec-websocket-protocol"] == "realm.v1"
                msg = await raw_call(conn, "m", "system_metadata")
                assert msg["data"]["tenant"] == "acme"
            # the key alone as a subprotocol also works (no subprotocol is chosen then)
            status, headers, conn = await handshake(
                server.port, f"Sec-WebSocket-Protocol: realm.bearer.{KEY}"
            )
            async with conn.stream:
                assert status == 101 and "sec-websocket-protocol" not in headers
                assert (await raw_call(conn, "m", "system_metadata"))["data"]["tenant"] == "acme"
            # a wrong key there is a failed login like any other: 1008 UNAUTHORIZED
            status, headers, conn = await handshake(
                server.port, "Sec-WebSocket-Protocol: realm.v1, realm.bearer.wrong"
            )
            async with conn.stream:
                assert status == 101 and headers["sec-websocket-protocol"] == "realm.v1"
                assert await conn.close_code() == 1008


async def test_the_websockets_library_with_subprotocols(model_path: Path) -> None:
    """A second WebSocket implementation offering subprotocols as a browser does."""

    def use(url: str) -> tuple[str | None, str]:
        with websockets.sync.client.connect(
            url,
            subprotocols=["realm.v1", f"realm.bearer.{KEY}"],  # type: ignore[list-item]
            origin="http://127.0.0.1:8000",  # type: ignore[arg-type]
            proxy=None,
            open_timeout=RECV_SECONDS,
        ) as ws:
            ws.send('{"type":"call","id":1,"function":"system_metadata"}')
            return ws.subprotocol, ws.recv(timeout=RECV_SECONDS)  # type: ignore[return-value]

    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=TENANTS)) as server:
            chosen, text = await trio.to_thread.run_sync(use, server.url)
    assert chosen == "realm.v1" and '"tenant":"acme"' in text


# --- failed logins -----------------------------------------------------------------------------


async def test_failed_logins_are_logged_counted_and_throttled(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="realm.server")
    limits = {"auth_failures_allowed": 2, "auth_backoff_seconds": 5.0}  # (unit tests: expiry)
    wrong = "rk-wrong-key-do-not-log"
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=TENANTS, **limits)) as server:
            for headers in ([], [f"Authorization: Bearer {wrong}"], [f"X-Nothing: {wrong}"]):
                status, _, conn = await handshake(server.port, *headers)
                async with conn.stream:
                    assert status == 101 and await conn.close_code() == 1008
            # three in a row from 127.0.0.1, two allowed: its handshakes are refused for a while,
            # even with the right key (which is not even looked at)
            status, response, conn = await handshake(server.port, f"Authorization: Bearer {KEY}")
            async with conn.stream:
                assert status == 429 and 1 <= int(response["retry-after"]) <= 5
                assert b"too many failed logins" in await conn.rest()
            # another address is not slowed down
            status, _, conn = await handshake(
                server.port, f"Authorization: Bearer {KEY}", source="127.0.0.2"
            )
            async with conn.stream:
                assert status == 101
                assert (await raw_call(conn, "m", "system_metadata"))["data"]["tenant"] == "acme"
            registry = server.metrics.registry
            failures = {
                reason: registry.get_sample_value("realm_auth_failures_total", {"reason": reason})
                for reason in ("missing_key", "unknown_key")
            }
            assert failures == {"missing_key": 2.0, "unknown_key": 1.0}
            assert refused(server, "throttled") == 1
    lines = [r.getMessage() for r in caplog.records]
    assert not any(wrong in line or KEY in line for line in lines)  # keys are never logged
    failed = [line for line in lines if line.startswith("failed login from 127.0.0.1")]
    assert len(failed) == 3 and "unknown API key (from the header)" in failed[1]
    assert "refused for" in failed[2]


def test_throttle_backs_off_doubling_up_to_its_max() -> None:
    now = [1000.0]
    t = LoginThrottle(2, 1.0, 5.0, clock=lambda: now[0])
    assert [t.failed("a"), t.failed("a")] == [1, 2] and t.blocked_for("a") == 0
    waits = []
    for _ in range(5):
        t.failed("a")
        waits.append(t.blocked_for("a"))
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert t.blocked_for("b") == 0  # per address
    now[0] += 5.0
    assert t.blocked_for("a") == 0
    t.succeeded("a")  # a success clears the address
    t.failed("a")
    assert t.blocked_for("a") == 0
    now[0] += FORGET_SECONDS  # a long quiet: forgotten
    assert [t.failed("a"), t.failed("a"), t.failed("a")] == [1, 2, 3]


def test_throttle_memory_is_bounded() -> None:
    now = [0.0]
    t = LoginThrottle(1, 1.0, 60.0, clock=lambda: now[0])
    for i in range(MAX_TRACKED_ADDRESSES + 500):
        t.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(t) == MAX_TRACKED_ADDRESSES
    t.failed("10.0.0.1")  # long dropped: starts again at 1
    assert t.blocked_for("10.0.0.1") == 0
    now[0] += FORGET_SECONDS
    t.failed("x")
    assert len(t) == 1  # the quiet ones are forgotten
