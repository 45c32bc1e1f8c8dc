"""``n`` choices and a tenant that cannot run, on the OpenAI-compatible API (docs/http.md).

Every test runs under ``trio.fail_after(LIMIT)``; every client has a timeout and
``max_retries=0``; each ends by checking that a normal request is still served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from realm.server import TenantSpec, hash_key, open_server
from realm.server._openai import MAX_CHOICES

from ._wire import LIMIT, config, http_exchange, wait_calls_freed
from .test_openai import KEY, TENANTS, assert_error, client, post, sse_events

GEN = {"prompt": "Once upon", "max_tokens": 5, "temperature": 0.9, "seed": 7}


async def assert_still_served(port: int, key: str | None = KEY) -> None:
    status, _, raw = await http_exchange(
        port, post("/v1/completions", '{"prompt": "x", "max_tokens": 2}', key=key)
    )
    assert status == 200, raw
    assert json.loads(raw)["usage"]["completion_tokens"] == 2


async def test_n_choices_with_the_openai_client(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=TENANTS)) as server:

            def run() -> None:
                c = client(server)
                r = c.completions.create(model="tiny", n=3, **GEN)
                assert [ch.index for ch in r.choices] == [0, 1, 2]
                assert all(ch.finish_reason == "length" for ch in r.choices)
                assert r.usage is not None and r.usage.completion_tokens == 15
                # seeded: choice i is the single request with seed + i
                for i in range(3):
                    one = c.completions.create(model="tiny", **{**GEN, "seed": 7 + i})
                    assert one.choices[0].text == r.choices[i].text
                # streamed: every chunk names its choice; each choice's text is whole
                chunks = list(
                    c.completions.create(
                        model="tiny", n=3, stream=True, stream_options={"include_usage": True},
                        **GEN,
                    )
                )  # fmt: skip
                texts = ["", "", ""]
                finishes: dict[int, str] = {}
                for ch in chunks[:-1]:
                    (choice,) = ch.choices
                    texts[choice.index] += choice.text
                    if choice.finish_reason is not None:
                        finishes[choice.index] = choice.finish_reason
                assert texts == [ch.text for ch in r.choices]
                assert finishes == {0: "length", 1: "length", 2: "length"}
                assert chunks[-1].choices == [] and chunks[-1].usage is not None
                assert chunks[-1].usage.completion_tokens == 15
                with pytest.raises(openai.BadRequestError) as bad:
                    c.completions.create(model="tiny", n=MAX_CHOICES + 1, **GEN)
                assert bad.value.body["param"] == "n"  # type: ignore[index]

            await trio.to_thread.run_sync(run)
            await assert_still_served(server.port)


async def test_n_bad_values_and_limits(model_path: Path) -> None:
    tenants = {"acme": TenantSpec("acme", api_key_hashes=(hash_key(KEY),), calls_per_second=0.2)}
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=tenants)) as server:
            for n in ("2", 0, -1, True, 1.5, MAX_CHOICES + 1):
                body = json.dumps({"prompt": "x", "n": n})
                status, headers, raw = await http_exchange(
                    server.port, post("/v1/completions", body)
                )
                assert assert_error(status, headers, raw, 400)["param"] == "n", n
            # n calls count against the tenant's limits: its call bucket holds 1 call
            body = json.dumps({**GEN, "n": 2})
            status, headers, raw = await http_exchange(server.port, post("/v1/completions", body))
            assert assert_error(status, headers, raw, 429)["code"] == "rate_limited"
            assert int(headers["retry-after"]) >= 1
            await wait_calls_freed(server, "acme")
            assert server.calls_in_flight.value == 0


async def test_n_stream_raw_chunks(model_path: Path) -> None:
    body = {"prompt": "Once upon", "max_tokens": 4, "temperature": 0, "n": 2, "stream": True}
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            status, headers, raw = await http_exchange(
                server.port, post("/v1/completions", json.dumps(body), key=None)
            )
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            events = [e["data"] for e in sse_events(raw)]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(d) for d in events[:-1]]
            seen: dict[int, list[Any]] = {0: [], 1: []}
            for ch in chunks:
                (choice,) = ch["choices"]
                seen[choice["index"]].append(choice)
            # greedy: both choices are the same text; each ends with its own finish chunk
            text = ["".join(c["text"] for c in seen[i]) for i in (0, 1)]
            assert text[0] == text[1] and text[0]
            assert [c["finish_reason"] for c in seen[0]][-1] == "length"
            assert [c["finish_reason"] for c in seen[1]][-1] == "length"
            await assert_still_served(server.port, key=None)


async def test_tenant_that_cannot_run_gets_503(model_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.wasm"
    broken.write_bytes(b"\0asm\x01\0\0\0 not a module")
    bad_key = "sk-broken"
    tenants = {
        **TENANTS,
        "broken": TenantSpec("broken", api_key_hashes=(hash_key(bad_key),), guest=str(broken)),
    }
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=tenants)) as server:
            for path, body in (
                ("/v1/completions", '{"prompt": "x", "max_tokens": 2}'),
                ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}]}'),
                ("/v1/embeddings", '{"input": "x"}'),
                ("/v1/jobs", '{"function": "generate", "params": {"prompt": "x"}}'),
            ):
                status, headers, raw = await http_exchange(
                    server.port, post(path, body, key=bad_key)
                )
                error = assert_error(status, headers, raw, 503)
                assert error["code"] == "tenant_unavailable", error
                assert int(headers["retry-after"]) >= 1
                assert str(tmp_path) not in error["message"]  # no host path
            # unknown models and routes stay 404
            status, headers, raw = await http_exchange(
                server.port, post("/v1/completions", '{"prompt": "x", "model": "nope"}')
            )
            assert assert_error(status, headers, raw, 404)["code"] == "model_not_found"
            status, headers, raw = await http_exchange(server.port, post("/v1/nothing", "{}"))
            assert assert_error(status, headers, raw, 404)["code"] == "unknown_url"
            await assert_still_served(server.port)


async def test_no_model_loaded_is_503(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            monkeypatch.setattr(server.runtime.registry, "names", lambda: [])
            status, headers, raw = await http_exchange(
                server.port, post("/v1/completions", '{"prompt": "x"}', key=None)
            )
            error = assert_error(status, headers, raw, 503)
            assert error["code"] == "tenant_unavailable" and "no model" in error["message"]
            assert int(headers["retry-after"]) >= 1
            monkeypatch.undo()
            await assert_still_served(server.port, key=None)
