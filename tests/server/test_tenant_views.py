"""A tenant sees only itself: system functions, error messages, and figures that outlive an
idle stop. Two tenants on one server; whatever one does, the other's answers never show its
name, its counters or a host path. Every test runs under ``trio.fail_after(LIMIT)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from realm import ModelError
from realm.server import TenantSpec, hash_key, open_server

from ._wire import LIMIT, LONG, SHORT, call_text, config, open_client

TENANTS = {
    "acme": TenantSpec("acme", api_key_hashes=(hash_key("k-acme"),), max_concurrent_calls=4),
    "beta": TenantSpec("beta", api_key_hashes=(hash_key("k-beta"),)),
}
ACME = [("Authorization", "Bearer k-acme")]
BETA = [("Authorization", "Bearer k-beta")]
SYSTEM = ("system_metrics", "system_health", "system_models", "system_metadata")


async def _answer(c: Any, call_id: str, function: str) -> dict[str, Any]:
    """Call; the final message of that call (other calls' stream messages are skipped)."""
    await c.send(call_text(call_id, function))
    while True:
        msg = await c.recv()
        if msg["id"] == call_id and msg["type"] != "stream":
            return msg


async def _views(c: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for fn in SYSTEM:
        msg = await _answer(c, fn, fn)
        assert msg["type"] == "result", msg
        out[fn] = msg["data"]
    return out


async def test_system_functions_show_only_the_callers_tenant(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with (
            open_server(config(model_path, tenants=TENANTS)) as server,
            open_client("trio", server.url, headers=ACME) as a1,
            open_client("websockets", server.url, headers=ACME) as a2,
            open_client("trio", server.url, headers=BETA) as b,
        ):
            # acme is busy: calls done, an error, a stream in flight on each connection
            await a1.request("g", "generate", SHORT)
            await a1.request("x", "no_such_function")
            await a1.send(call_text("long", "generate", LONG))
            await a2.send(call_text("long2", "generate", LONG))
            assert (await a1.recv())["type"] == "stream"
            assert (await a2.recv())["type"] == "stream"

            views = await _views(b)
            text = json.dumps(views)
            assert "acme" not in text  # no other tenant's name anywhere
            assert str(model_path.parent) not in text and '"path"' not in text
            m = views["system_metrics"]
            assert m["tenant"] == "beta"
            assert (m["calls"], m["errors"], m["completion_tokens"]) == (0, 0, 0)
            assert (m["sessions"], m["in_flight"], m["connections"]) == (0, 0, 1)
            assert "tenants" not in m
            h = views["system_health"]
            assert (h["connections"], h["calls_in_flight"]) == (1, 1)  # itself, this call
            assert views["system_metadata"]["tenant"] == "beta"
            assert [x["name"] for x in views["system_models"]["models"]] == ["tiny"]

            # acme's own view: its own figures, all of them
            mine = await _answer(a1, "m", "system_metrics")
            m = mine["data"]
            assert (m["tenant"], m["connections"], m["in_flight"]) == ("acme", 2, 2)
            assert m["calls"] >= 1 and m["completion_tokens"] >= 8
            assert "beta" not in json.dumps(mine)
            health = await _answer(a2, "h", "system_health")
            assert health["data"]["connections"] == 2
            assert health["data"]["calls_in_flight"] == 3  # two streams and this call


async def test_error_messages_carry_no_host_path(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=TENANTS)) as server:
            failures = iter(
                [
                    ModelError(f"{model_path}: tensor 'x' is truncated"),
                    ModelError("/srv/realm/secret/weights.bin: cannot read; /etc/x/y too"),
                    ModelError(f"{server.config.models['tiny']} and acme's files"),
                ]
            )

            async def call(*args: Any, **kwargs: Any) -> Any:
                raise next(failures)

            monkeypatch.setattr(server.runtime, "call", call)
            async with open_client("trio", server.url, headers=BETA) as c:
                messages = []
                for i in range(3):
                    _, err = await c.request(i, "generate", SHORT)
                    assert err["error"]["code"] == "INVALID_PARAMS"
                    messages.append(err["error"]["message"])
    assert messages[0] == "model 'tiny': tensor 'x' is truncated"
    assert messages[1] == "<path>: cannot read; <path> too"
    assert messages[2].startswith("model 'tiny' and")
    assert not any(str(model_path.parent) in m or "/srv/" in m for m in messages)


PUBLIC = [
    ("tokens/s over 2/3 of the limit", "tokens/s over 2/3 of the limit"),
    ("see http://example.com/a/b and ./rel/x", "see http://example.com/a/b and ./rel/x"),
    ("at '/home/u/m.gguf': bad", "at '<path>': bad"),
    ("(/var/lib/realm/g.wasm)", "(<path>)"),
    ("/metrics is one component", "/metrics is one component"),
]


async def test_public_message_rules(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            for message, public in PUBLIC:
                assert server.public_message(message) == public
            assert server.public_message(f"{model_path}: x") == "model 'tiny': x"


async def test_figures_survive_an_idle_stop(model_path: Path) -> None:
    cfg = config(model_path, tenants=TENANTS, tenant_idle_seconds=0.2)
    with trio.fail_after(LIMIT):
        async with open_server(cfg) as server, open_client("trio", server.url, headers=ACME) as c:
            for i in range(2):
                _, final = await c.request(i, "generate", SHORT)
                assert final["type"] == "result"
            _, before = await c.request("m1", "system_metrics")
            # the runtime stops the idle tenant (its instances and sessions are released);
            # watched through the runtime's own table, which no client can see
            while "acme" in server.runtime._actors:
                await trio.sleep(0.05)
            _, after = await c.request("m2", "system_metrics")
            for key in ("calls", "errors", "completion_tokens"):
                assert after["data"][key] == before["data"][key], key
            assert after["data"]["calls"] == 2 and after["data"]["completion_tokens"] == 16
            assert after["data"]["sessions"] == 0
            # and they go on adding up once it runs again
            await c.request("again", "generate", SHORT)
            _, again = await c.request("m3", "system_metrics")
            assert again["data"]["calls"] == 3 and again["data"]["completion_tokens"] == 24
