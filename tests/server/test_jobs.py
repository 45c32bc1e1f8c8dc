"""Jobs' event streams (docs/http.md, "Jobs"): a client that leaves is noticed at once.

Every test runs under ``trio.fail_after(LIMIT)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from realm.server import TenantSpec, hash_key, open_server

from ._wire import LIMIT, config, get, http_exchange, wait_calls_freed
from .test_openai import KEY, post

AUTH = f"Authorization: Bearer {KEY}"
LONG = {"prompt": "Once upon", "max_tokens": 1500, "temperature": 0}


async def test_job_stream_notices_a_gone_client_between_events(model_path: Path) -> None:
    # one call at a time: the second job waits behind the first and emits nothing meanwhile
    spec = TenantSpec("acme", api_key_hashes=(hash_key(KEY),), max_concurrent_calls=1)
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants={"acme": spec})) as server:
            ids = []
            for _ in range(2):
                body = json.dumps({"function": "generate", "params": LONG})
                status, _, raw = await http_exchange(server.port, post("/v1/jobs", body))
                assert status == 202, raw
                ids.append(json.loads(raw)["id"])
            waiting = server.jobs.get("acme", ids[1])
            assert waiting is not None
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(get(f"/v1/jobs/{ids[1]}/events", AUTH))
                got = b""
                while b"\r\n\r\n" not in got:
                    got += await stream.receive_some(65536)
                assert got.startswith(b"HTTP/1.1 200")
                assert server.open_connections.value == 1
            # gone: its handler ends at once, though the job has had no event since
            with trio.fail_after(2):
                while server.open_connections.value:
                    await trio.sleep(0.01)
            assert not waiting.events and waiting.finished is None  # the job runs on
            for jid in ids:
                status, _, _ = await http_exchange(
                    server.port, get(f"/v1/jobs/{jid}", AUTH, method="DELETE")
                )
                assert status == 200
            await wait_calls_freed(server, "acme")
            # a normal request is still served
            status, _, raw = await http_exchange(
                server.port, post("/v1/completions", '{"prompt": "x", "max_tokens": 2}')
            )
            assert status == 200, raw
