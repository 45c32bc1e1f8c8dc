"""The OpenAI-compatible HTTP API (docs/http.md), driven by the official ``openai`` package (in a
worker thread while the server runs in the test's nursery) and by raw HTTP. Every test runs
under ``trio.fail_after(LIMIT)``; every client has a timeout and ``max_retries=0``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from pathlib import Path
from typing import Any

import attrs
import openai
import pytest
import trio

import realm.testing.models as test_models
from realm.model._chat import CHATML_TEMPLATE
from realm.server import TenantSpec, hash_key, open_server
from realm.server._static import static_file

from ._wire import LIMIT, assert_serving, config, get, http_exchange, wait_calls_freed

KEY = "sk-acme"
TENANTS = {"acme": TenantSpec("acme", api_key_hashes=(hash_key(KEY),))}


@pytest.fixture(scope="session")
def chat_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test model with a ChatML template (``write_test_model`` writes none)."""
    original = test_models.GGUFWriter

    class Writer(original):  # type: ignore[misc,valid-type]
        def add_vocab_size(self, n: int) -> None:
            super().add_vocab_size(n)
            self.add_chat_template(CHATML_TEMPLATE)

    test_models.GGUFWriter = Writer
    try:
        path = tmp_path_factory.mktemp("openai") / "chat.gguf"
        return test_models.write_test_model(path, context_length=4096)
    finally:
        test_models.GGUFWriter = original


def client(server: Any, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key=key, max_retries=0, timeout=10
    )


def post(
    path: str,
    body: bytes | str,
    *headers: str,
    key: str | None = KEY,
    content_type: str = "application/json",
) -> bytes:
    data = body.encode() if isinstance(body, str) else body
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(data)}",
        *headers,
    ]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def assert_error(status: int, headers: dict[str, str], body: bytes, want: int) -> dict[str, Any]:
    assert status == want, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


async def test_openai_client(chat_model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(chat_model_path, tenants=TENANTS)) as server:

            def run() -> None:
                c = client(server)
                assert [m.id for m in c.models.list()] == ["tiny"]
                msgs: Any = [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                ]
                r = c.chat.completions.create(
                    model="tiny",
                    messages=msgs,
                    max_tokens=6,
                    temperature=0,
                    seed=1,
                    stop=["zzz"],
                    top_p=0.9,
                    presence_penalty=0.1,
                    frequency_penalty=0.1,
                    user="u1",
                    n=1,
                )
                assert r.object == "chat.completion" and r.model == "tiny"
                choice = r.choices[0]
                assert choice.message.role == "assistant" and choice.finish_reason == "length"
                assert r.usage is not None and r.usage.completion_tokens == 6
                # streamed: role first, deltas, a finish_reason, the usage chunk, [DONE]
                chunks = list(
                    c.chat.completions.create(
                        model="tiny",
                        messages=msgs,
                        max_completion_tokens=6,
                        temperature=0,
                        seed=1,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                )
                assert chunks[0].choices[0].delta.role == "assistant"
                text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                assert text == choice.message.content  # greedy: the same text
                assert [ch.choices[0].finish_reason for ch in chunks[:-1]][-1] == "length"
                assert chunks[-1].choices == [] and chunks[-1].usage is not None
                assert chunks[-1].usage.completion_tokens == 6
                # completions
                r2 = c.completions.create(
                    model="tiny", prompt="Once upon", max_tokens=5, temperature=0
                )
                assert r2.object == "text_completion" and r2.choices[0].finish_reason == "length"
                streamed = list(
                    c.completions.create(
                        model="tiny", prompt="Once upon", max_tokens=5, temperature=0, stream=True
                    )
                )
                assert "".join(ch.choices[0].text for ch in streamed) == r2.choices[0].text
                assert streamed[-1].choices[0].finish_reason == "length"
                assert all(ch.usage is None for ch in streamed)
                # embeddings: the client asks for base64 by default; and floats
                e = c.embeddings.create(model="tiny", input=["a cat", "a dog"])
                assert [d.index for d in e.data] == [0, 1] and len(e.data[0].embedding) == 64
                f = c.embeddings.create(model="tiny", input="a cat", encoding_format="float")
                assert f.data[0].embedding == pytest.approx(e.data[0].embedding, abs=1e-5)
                # errors the client raises
                with pytest.raises(openai.AuthenticationError):
                    client(server, "wrong").models.list()
                with pytest.raises(openai.NotFoundError):
                    c.completions.create(model="gpt-4", prompt="x")
                with pytest.raises(openai.BadRequestError) as bad:
                    c.chat.completions.create(model="tiny", messages=msgs, n=9)
                assert bad.value.body["param"] == "n"  # type: ignore[index]

            await trio.to_thread.run_sync(run)


async def test_realm_fields_reach_the_guest(model_path: Path) -> None:
    # extra_body: the default guest's top_k / min_p / repeat_penalty and speculative decoding
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=TENANTS)) as server:

            def run() -> None:
                c = client(server)
                plain = c.completions.create(
                    model="tiny", prompt="a b a b a b a b", max_tokens=12, temperature=0
                )
                fast = c.completions.create(
                    model="tiny",
                    prompt="a b a b a b a b",
                    max_tokens=12,
                    temperature=0,
                    extra_body={"speculative": {"mode": "lookup", "k": 4}, "top_k": 5},
                )
                assert fast.choices[0].text == plain.choices[0].text  # greedy: identical
                sampled = c.completions.create(
                    model="tiny",
                    prompt="x",
                    max_tokens=4,
                    seed=3,
                    extra_body={"top_k": 1, "min_p": 0.1, "repeat_penalty": 1.1},
                )
                assert sampled.usage is not None and sampled.usage.completion_tokens == 4
                for bad in ({"top_k": "many"}, {"speculative": {"mode": "psychic"}}):
                    with pytest.raises(openai.BadRequestError) as info:
                        c.completions.create(model="tiny", prompt="x", extra_body=bad)
                    assert next(iter(bad)) in info.value.message
                # still serving
                assert c.completions.create(model="tiny", prompt="x", max_tokens=2).choices

            await trio.to_thread.run_sync(run)


async def test_a_paging_budget_from_the_config(model_path: Path) -> None:
    cfg = attrs.evolve(config(model_path, tenants=TENANTS), max_resident_bytes=0)
    with trio.fail_after(LIMIT):
        async with open_server(cfg) as server:
            pager = server.runtime.registry.get("tiny").pager
            assert pager is not None and pager.budget.max_resident_bytes == 0

            def run() -> None:
                c = client(server)
                assert c.completions.create(model="tiny", prompt="x", max_tokens=3).choices

            await trio.to_thread.run_sync(run)
            assert server.runtime.statistics().models["tiny"].misses > 0


async def test_async_client_streams(chat_model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(chat_model_path)) as server:

            async def run() -> list[str]:
                c = openai.AsyncOpenAI(
                    base_url=f"http://127.0.0.1:{server.port}/v1",
                    api_key="unused",
                    max_retries=0,
                    timeout=10,
                )
                async with c:
                    s = await c.chat.completions.create(
                        model="tiny",
                        messages=[{"role": "user", "content": "Hi"}],
                        max_tokens=4,
                        temperature=0,
                        stream=True,
                    )
                    return [ch.choices[0].delta.content or "" async for ch in s]

            parts = await trio.to_thread.run_sync(lambda: asyncio.run(run()))
            assert len(parts) >= 5  # the role chunk, 4 tokens, the finish chunk


async def test_raw_errors_are_openai_shaped(model_path: Path) -> None:
    cfg = config(model_path, tenants=TENANTS, max_message_bytes=4096)
    cases = [
        (post("/v1/completions", "{not json"), 400, None),
        (post("/v1/completions", "[1]"), 400, None),
        (post("/v1/completions", '{"prompt": 5}'), 400, "prompt"),
        (post("/v1/completions", '{"prompt": "x", "max_tokens": "9"}'), 400, "max_tokens"),
        (post("/v1/completions", '{"prompt": "x", "max_tokens": 0}'), 400, "max_tokens"),
        (post("/v1/completions", '{"prompt": "x", "temperature": "hot"}'), 400, "temperature"),
        (post("/v1/completions", '{"prompt": "x", "stream": "yes"}'), 400, "stream"),
        (post("/v1/completions", '{"prompt": "x", "logprobs": 21}'), 400, "logprobs"),
        (post("/v1/chat/completions", '{"messages": []}'), 400, "messages"),
        (
            post("/v1/chat/completions", '{"messages": [{"content": "x"}]}'),
            400,
            "messages[0].role",
        ),
        (post("/v1/completions", '{"prompt": "x", "model": "nope"}'), 404, "model"),
        (post("/v1/completions", '{"prompt": "x"}', key=None), 401, None),
        (post("/v1/completions", '{"prompt": "x"}', key="bad"), 401, None),
        (post("/v1/completions", "x" * 5000), 413, None),
        (post("/v1/completions", "{}", content_type="text/plain"), 415, None),
        (get("/v1/completions", f"Authorization: Bearer {KEY}"), 405, None),
        (get("/v1/nothing", f"Authorization: Bearer {KEY}"), 404, None),
        (get("/v1/models"), 401, None),
    ]
    with trio.fail_after(LIMIT):
        async with open_server(cfg) as server:
            server.throttle.allowed = 100  # the failed logins here are not an attack
            for request, want, param in cases:
                status, headers, body = await http_exchange(server.port, request)
                error = assert_error(status, headers, body, want)
                if param is not None:
                    assert error["param"] == param, error
            # a body announced larger than the limit is refused before it is sent
            huge = post("/v1/completions", b"")
            huge = huge.replace(b"Content-Length: 0", b"Content-Length: 100000000")
            status, headers, body = await http_exchange(server.port, huge)
            assert_error(status, headers, body, 413)
            # and the server still serves
            req = post("/v1/completions", '{"prompt": "Once upon", "max_tokens": 3}')
            status, headers, body = await http_exchange(server.port, req)
            assert status == 200, body
            assert json.loads(body)["usage"]["completion_tokens"] == 3
            await assert_serving(server, headers=[("Authorization", f"Bearer {KEY}")])


async def test_guest_refusal_and_rate_limit(model_path: Path) -> None:
    tenants = {"acme": TenantSpec("acme", api_key_hashes=(hash_key(KEY),), calls_per_second=0.2)}
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=tenants)) as server:
            # the tiny model has no chat template: the guest refuses, a 400
            chat = '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}'
            status, headers, body = await http_exchange(
                server.port, post("/v1/chat/completions", chat)
            )
            assert "chat template" in assert_error(status, headers, body, 400)["message"]
            status, headers, body = await http_exchange(
                server.port, post("/v1/completions", '{"prompt": "x", "max_tokens": 2}')
            )
            error = assert_error(status, headers, body, 429)
            assert error["code"] == "rate_limited" and int(headers["retry-after"]) >= 1


async def test_disconnect_mid_stream_cancels(model_path: Path) -> None:
    body = {
        "model": "tiny",
        "prompt": "Once upon",
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
    }
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(post("/v1/completions", json.dumps(body), key=None))
                got = b""
                while got.count(b"data: {") < 3:
                    got += await stream.receive_some(65536)
                head = got.partition(b"\r\n\r\n")[0].decode().lower()
                assert head.startswith("http/1.1 200") and "text/event-stream" in head
                assert "transfer-encoding: chunked" in head
                assert server.calls_in_flight.value == 1
            # closed mid-stream: the call is cancelled, its session freed
            await wait_calls_freed(server, "local")
            assert server.calls_in_flight.value == 0
            small = json.dumps({**body, "max_tokens": 3})
            status, headers, raw = await http_exchange(
                server.port, post("/v1/completions", small, key=None)
            )
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            events = [ln.strip() for ln in raw.split(b"\r\n") if ln.startswith(b"data: ")]
            assert events[-1] == b"data: [DONE]" and len(events) >= 3  # tokens, finish, DONE
            assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


async def test_ready_and_playground(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=TENANTS)) as server:
            status, headers, body = await http_exchange(server.port, get("/ready"))
            assert status == 200 and json.loads(body)["status"] == "ready"
            status, headers, body = await http_exchange(server.port, get("/"))
            assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
            assert body.lstrip().lower().startswith(b"<!doctype html")
            for bad in (
                "/../_server.py",
                "/%2e%2e/_server.py",
                "/static/../_server.py",
                "/..%2f_server.py",
                "/.hidden",
                "//etc/passwd",
            ):
                status, _, _ = await http_exchange(server.port, get(bad))
                assert status in (400, 404), bad


def test_static_files(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "app.js").write_text("x")
    (tmp_path.parent / "secret.txt").write_text("no")
    assert static_file("/", tmp_path) == (tmp_path / "index.html").resolve()
    assert static_file("/static/app.js", tmp_path) == (tmp_path / "app.js").resolve()
    for bad in ("/../secret.txt", "/%2e%2e/secret.txt", "/a/../../secret.txt", "/missing.js"):
        assert static_file(bad, tmp_path) is None
    (tmp_path / "link.txt").symlink_to(tmp_path.parent / "secret.txt")
    assert static_file("/link.txt", tmp_path) is None


def test_embedding_base64_roundtrip() -> None:
    # what the server sends for encoding_format=base64 is what the openai client decodes
    vector = [0.5, -1.25, 3.0]
    packed = base64.b64encode(struct.pack("<3f", *vector)).decode()
    assert list(struct.unpack("<3f", base64.b64decode(packed))) == vector


async def test_shutdown_ends_streams_with_a_final_event(long_model_path: Path) -> None:
    body = {"prompt": "Once upon", "max_tokens": 8000, "temperature": 0, "stream": True}
    cfg = config(long_model_path, shutdown_seconds=0.5, max_tokens=8000)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery, open_server(cfg) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(post("/v1/completions", json.dumps(body), key=None))
                got = b""
                while b"data: {" not in got:
                    got += await stream.receive_some(65536)
                nursery.start_soon(server.shutdown)
                while not server.closing:
                    await trio.sleep(0.01)
                status, _, raw = await http_exchange(server.port, get("/ready"))
                assert status == 503 and json.loads(raw)["status"] == "shutting_down"
                status, headers, raw = await http_exchange(
                    server.port, post("/v1/completions", '{"prompt": "x"}', key=None)
                )
                assert_error(status, headers, raw, 503)
                while chunk := await stream.receive_some(65536):
                    got += chunk
            events = [ln.strip() for ln in got.split(b"\r\n") if ln.startswith(b"data: ")]
            assert events[-1] == b"data: [DONE]"
            error = json.loads(events[-2][6:])["error"]
            assert error["code"] == "cancelled" and "shutting down" in error["message"]
            assert got.endswith(b"0\r\n\r\n")  # the last chunk: the stream ended whole


def sse_events(raw: bytes) -> list[dict[str, str]]:
    """The SSE events of a chunked response body."""
    rest, body = raw, b""
    while rest:  # chunked: SIZE\r\nDATA\r\n ... 0\r\n\r\n
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        body, rest = body + rest[:n], rest[n + 2 :]
        if n == 0:
            break
    text = body.decode()
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            name, sep, value = line.partition(": ")
            if sep and name in ("id", "event", "data"):
                fields[name] = value
        if fields:
            events.append(fields)
    return events


async def test_jobs(model_path: Path) -> None:
    other = "sk-other"
    tenants = {**TENANTS, "other": TenantSpec("other", api_key_hashes=(hash_key(other),))}
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=tenants)) as server:
            submit = json.dumps({"function": "generate", "params": {"prompt": "Once upon",
                                 "max_tokens": 4, "temperature": 0}})  # fmt: skip
            status, headers, raw = await http_exchange(server.port, post("/v1/jobs", submit))
            assert status == 202, raw
            job = json.loads(raw)
            assert job["object"] == "job" and job["status"] in ("queued", "running")
            jid = job["id"]
            auth = f"Authorization: Bearer {KEY}"
            # its events: 4 tokens with ids, the result, [DONE]
            status, _, raw = await http_exchange(server.port, get(f"/v1/jobs/{jid}/events", auth))
            events = sse_events(raw)
            tokens = [e for e in events if "id" in e]
            assert status == 200 and [e["id"] for e in tokens] == [
                str(i) for i in range(len(tokens))
            ]
            assert len(tokens) >= 2
            assert events[-2]["event"] == "result" and events[-1]["data"] == "[DONE]"
            done = json.loads(events[-2]["data"])
            assert (
                done["status"] == "succeeded" and done["result"]["usage"]["completion_tokens"] == 4
            )
            text = "".join(json.loads(e["data"])["token"] for e in tokens)
            assert text == done["result"]["text"]
            # resumed after event 0
            status, _, raw = await http_exchange(
                server.port, get(f"/v1/jobs/{jid}/events", auth, "Last-Event-ID: 0")
            )
            assert [e.get("id") for e in sse_events(raw)] == [e["id"] for e in tokens[1:]] + [
                None
            ] * 2
            status, _, raw = await http_exchange(server.port, get(f"/v1/jobs/{jid}", auth))
            assert status == 200 and json.loads(raw)["result"]["text"] == done["result"]["text"]
            # another tenant never sees it
            for path in (f"/v1/jobs/{jid}", f"/v1/jobs/{jid}/events"):
                status, headers, raw = await http_exchange(
                    server.port, get(path, f"Authorization: Bearer {other}")
                )
                assert_error(status, headers, raw, 404)
            # a long job, cancelled
            long = json.dumps({"function": "generate", "params": {"prompt": "Once upon",
                               "max_tokens": 1500, "temperature": 0}})  # fmt: skip
            status, _, raw = await http_exchange(server.port, post("/v1/jobs", long))
            jid = json.loads(raw)["id"]
            status, _, raw = await http_exchange(
                server.port, get(f"/v1/jobs/{jid}", auth, method="DELETE")
            )
            assert status == 200
            await wait_calls_freed(server, "acme")
            status, _, raw = await http_exchange(server.port, get(f"/v1/jobs/{jid}", auth))
            assert json.loads(raw)["status"] in ("cancelled", "succeeded")
            # bad submissions
            for body, want in (('{"function": 5}', 400), ('{"function": "nope"}', 404),
                               ('{"function": "generate", "params": []}', 400)):  # fmt: skip
                status, headers, raw = await http_exchange(server.port, post("/v1/jobs", body))
                assert_error(status, headers, raw, want)


async def test_slow_body_is_408(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, handshake_timeout_seconds=0.5)) as server:
            request = post("/v1/completions", '{"prompt": "Once upon"}', key=None)
            request = request.replace(b"Content-Length: 23", b"Content-Length: 99")
            status, headers, raw = await http_exchange(server.port, request)  # 76 bytes short
            assert_error(status, headers, raw, 408)
            status, _, raw = await http_exchange(
                server.port, post("/v1/completions", '{"prompt": "x", "max_tokens": 2}', key=None)
            )
            assert status == 200, raw
