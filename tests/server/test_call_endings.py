"""Every call ends with exactly one result or error, at shutdown too; rate-limit errors say
when to retry (``retry_after``), for the call rate and the token rate alike.

Every test runs under ``trio.fail_after(LIMIT)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from realm.client import RateLimited, connect
from realm.server import TenantSpec, hash_key, open_server

from ._wire import CLIENTS, LIMIT, LONG, SHORT, Closed, call_text, config, open_client


async def test_every_call_ends_once_also_at_shutdown(long_model_path: Path) -> None:
    """Calls still running when the grace period ends get CANCELLED (code and reason), and
    only then the close 1001; the short ones finish with their results."""
    cfg = config(long_model_path, shutdown_seconds=1.5, max_tokens=8000)
    got: dict[int, list[Any]] = {}
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery, open_server(cfg) as server:
            streaming = [trio.Event() for _ in range(4)]

            async def client(n: int) -> None:
                seen = got[n] = []
                async with open_client(CLIENTS[n % 2], server.url) as c:
                    for i in range(2):
                        params = {**LONG, "max_tokens": 8000}  # (this prompt never stops)
                        await c.send(call_text(f"long{i}", "generate", params))
                    try:
                        while True:
                            msg = await c.recv()
                            seen.append(msg)
                            if msg["type"] != "stream" or msg["data"]["index"]:
                                continue
                            if msg["id"] == "long0":  # a short call joins the long ones
                                short = {**SHORT, "max_tokens": 12}
                                await c.send(call_text("short", "generate", short))
                            elif msg["id"] == "short":  # all three are under way
                                streaming[n].set()
                    except Closed as e:
                        seen.append(e.code)

            for n in range(4):
                nursery.start_soon(client, n)
            for event in streaming:
                await event.wait()
            # leaving the block shut the server down
    for n, seen in got.items():
        assert seen[-1] == 1001, (n, seen[-3:])
        finals: dict[str, dict[str, Any]] = {}
        for msg in seen[:-1]:
            assert msg["id"] not in finals, (n, msg)  # nothing after a call's final message
            if msg["type"] != "stream":
                finals[msg["id"]] = msg
        assert set(finals) == {"long0", "long1", "short"}, (n, finals)
        assert finals["short"]["type"] == "result", finals["short"]
        for call_id in ("long0", "long1"):
            final = finals[call_id]
            assert final["type"] == "error", (final["id"], final.get("data", {}).get("usage"))
            error = final["error"]
            assert error["code"] == "CANCELLED", error
            assert error["message"] == "the server is shutting down"


@pytest.mark.parametrize("kind", CLIENTS)
async def test_call_rate_errors_carry_retry_after(model_path: Path, kind: str) -> None:
    tenants = {"acme": TenantSpec("acme", api_key_hashes=(hash_key("k1"),), calls_per_second=2)}
    with trio.fail_after(LIMIT):
        async with (
            open_server(config(model_path, tenants=tenants)) as server,
            open_client(kind, server.url, headers=[("Authorization", "Bearer k1")]) as c,
        ):
            errors = []
            for i in range(4):
                _, msg = await c.request(i, "count_tokens", {"text": "hi"})
                if msg["type"] == "error":
                    errors.append(msg["error"])
            assert errors and all(e["code"] == "RATE_LIMITED" for e in errors)
            error = errors[0]
            wait = error["retry_after"]
            assert isinstance(wait, float) and 0 < wait <= 0.5  # one call back at 2/s
            assert f"retry in {wait:g} s" in error["message"] and "call rate" in error["message"]
            await trio.sleep(wait)  # waiting as long as it says is enough
            _, msg = await c.request("later", "count_tokens", {"text": "hi"})
            assert msg["type"] == "result", msg


async def test_token_rate_errors_carry_retry_after(model_path: Path) -> None:
    tenants = {
        "acme": TenantSpec(
            "acme", api_key_hashes=(hash_key("k1"),), tokens_per_second=5, burst_tokens=10
        )
    }
    with trio.fail_after(LIMIT):
        async with (
            open_server(config(model_path, tenants=tenants)) as server,
            connect(server.url, api_key="k1") as c,
        ):
            # a stream under way is never cut short: 30 tokens from a burst of 10 leaves the
            # tenant 20 tokens in debt, which 5 tokens/s pay back in about 4 s
            r = await c.call("generate", {**SHORT, "max_tokens": 30})
            assert r["usage"]["completion_tokens"] == 30
            with pytest.raises(RateLimited) as info:
                await c.call("generate", SHORT)
            wait = info.value.retry_after
            assert wait is not None and 1.0 < wait <= 4.0  # (less the stream's own time)
            assert "token rate" in info.value.message
            assert f"retry in {wait:g} s" in info.value.message
