"""Raw HTTP at awkward boundaries on the OpenAI-compatible API: a request arriving in pieces
(head and body split anywhere, a multi-byte character split), a chunked request body, a
streamed response read a few bytes at a time. Each case is followed by a normal request, still
served. Every test runs under ``trio.fail_after(LIMIT)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from realm.server import open_server

from ._wire import LIMIT, config, http_exchange
from .test_openai import post, sse_events

BODY = json.dumps({"prompt": "Once upon é", "max_tokens": 3, "temperature": 0}, ensure_ascii=False)


async def exchange_in_pieces(port: int, request: bytes, cuts: list[int]) -> bytes:
    """Send ``request`` cut at ``cuts`` (a short pause between pieces); read to EOF."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        start = 0
        for cut in [*cuts, len(request)]:
            await stream.send_all(request[start:cut])
            start = cut
            await trio.sleep(0.01)
        data = b""
        while chunk := await stream.receive_some(7):  # small reads: boundaries anywhere
            data += chunk
    return data


async def assert_served(port: int) -> None:
    status, _, raw = await http_exchange(port, post("/v1/completions", BODY, key=None))
    assert status == 200, raw
    assert json.loads(raw)["usage"]["completion_tokens"] == 3


async def test_request_in_pieces(model_path: Path) -> None:
    request = post("/v1/completions", BODY.encode(), key=None)
    head_end = request.index(b"\r\n\r\n")
    accent = request.index("é".encode())  # a two-byte character, split between pieces
    cut_sets = [
        [1, 5, head_end - 1, head_end + 2],  # inside the request line, inside the blank line
        [head_end + 4, accent + 1],  # head whole, body split inside the character
        list(range(1, len(request), 9)),  # many small pieces
    ]
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            for cuts in cut_sets:
                raw = await exchange_in_pieces(server.port, request, cuts)
                assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
                body = raw.partition(b"\r\n\r\n")[2]
                assert json.loads(body)["usage"]["completion_tokens"] == 3
                await assert_served(server.port)


async def test_chunked_request_body(model_path: Path) -> None:
    data = BODY.encode()
    accent = data.index("é".encode())
    pieces = [data[: accent + 1], data[accent + 1 :]]  # a chunk ends inside the character
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            raw = await exchange_in_pieces(server.port, head + body, [len(head) + 3])
            assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
            assert json.loads(raw.partition(b"\r\n\r\n")[2])["usage"]["completion_tokens"] == 3
            # a chunked body that lies about its chunk size: a 400, and the server serves on
            bad = head + b"zz\r\n{}\r\n0\r\n\r\n"
            raw = await exchange_in_pieces(server.port, bad, [])
            assert raw.startswith(b"HTTP/1.1 400"), raw[:200]
            await assert_served(server.port)


async def test_stream_read_in_small_pieces(model_path: Path) -> None:
    body = json.dumps({**json.loads(BODY), "stream": True, "max_tokens": 6})
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            raw = await exchange_in_pieces(server.port, post("/v1/completions", body, key=None), [])
            head, _, rest = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
            events = [e["data"] for e in sse_events(rest)]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(d) for d in events[:-1]]  # every event whole JSON
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            await assert_served(server.port)
