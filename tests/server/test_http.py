"""Plain HTTP on the WebSocket port: ``GET /health``, and for anything else an answer that says
what the port speaks. Every test runs under ``trio.fail_after(LIMIT)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from realm.server import TenantSpec, hash_key, open_server

from ._wire import LIMIT, LONG, assert_serving, call_text, config, get, http_exchange, open_client

TENANTS = {"acme": TenantSpec("acme", api_key_hashes=(hash_key("k1"),))}


@pytest.mark.parametrize("tenants", [None, TENANTS], ids=["open", "tenants"])
async def test_get_health(model_path: Path, tenants: object) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=tenants)) as server:
            for request in (get("/health"), get("/health?x=1", "Authorization: Bearer k1")):
                status, headers, body = await http_exchange(server.port, request)
                assert status == 200 and headers["content-type"] == "application/json"
                assert int(headers["content-length"]) == len(body)
                health = json.loads(body)
                assert set(health) == {
                    "status", "server", "version", "protocol", "models", "uptime_seconds"
                }  # fmt: skip
                assert health["server"] == headers["x-realm-server"] == server.server_id
                assert health["status"] == "ok" and health["protocol"] == 1
                assert health["models"] == ["tiny"] and health["uptime_seconds"] >= 0
                assert b"acme" not in body and b"local" not in body  # no tenant data
            await assert_serving(server, headers=[("Authorization", "Bearer k1")])


ELSE = [
    (get("/", method="POST"), 400),
    (get("/no-such-page.html"), 404),
    (get("/health", method="POST"), 405),
    (get("/health", method="DELETE"), 405),
    (get("/", "Upgrade: h2c", "Connection: Upgrade", method="POST"), 400),
]


async def test_anything_else_says_what_the_port_speaks(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            for request, status in ELSE:
                got, headers, body = await http_exchange(server.port, request)
                assert got == status, request
                assert headers["content-type"].startswith("text/plain")
                assert headers["x-content-type-options"] == "nosniff"
                assert int(headers["content-length"]) == len(body)
                text = body.decode()
                assert "WebSocket" in text and "protocol v1" in text and "GET /health" in text
                assert "ws://127.0.0.1/" in text  # the address the client asked for
                if status == 405:
                    assert headers["allow"] == "GET"
            await assert_serving(server)


async def test_health_while_shutting_down_is_503(long_model_path: Path) -> None:
    cfg = config(long_model_path, shutdown_seconds=5, max_tokens=8000)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery, open_server(cfg) as server:
            # a call in flight holds the shutdown in its grace period
            streaming = trio.Event()

            async def client() -> None:
                async with open_client("trio", server.url) as c:
                    await c.send(call_text("l", "generate", {**LONG, "max_tokens": 8000}))
                    await c.recv()
                    streaming.set()
                    while True:
                        msg = await c.recv()
                        if msg["type"] != "stream":
                            return

            nursery.start_soon(client)
            await streaming.wait()
            nursery.start_soon(server.shutdown)
            while not server.closing:
                await trio.sleep(0.01)
            status, _, body = await http_exchange(server.port, get("/health"))
            assert status == 503 and json.loads(body)["status"] == "shutting_down"
            for conn in list(server.connections):
                conn.cancel_calls("test over")  # the call ends: the shutdown goes on
