"""Every row of the bad-input table in docs/reliability.md, against a real server.

Each test checks what the careless or hostile input gets (an error code, or a close code) AND
that the server still serves afterwards: a fresh connection from each client library gets a
``system_health`` result (``assert_serving``). What a WebSocket library will not send (invalid
UTF-8, broken frames, non-WebSocket bytes) goes over raw TCP with frames built by hand.
Every test runs under an absolute time limit (``trio.fail_after(LIMIT)``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from realm.server import TenantSpec, hash_key, open_server

from ._wire import (
    CLIENTS,
    LIMIT,
    LONG,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    SHORT,
    Client,
    Closed,
    assert_serving,
    call_text,
    config,
    frame,
    handshake_request,
    open_client,
    open_raw,
    wait_calls_freed,
)

MAX_BYTES = 1024


async def still_open(c: Client) -> None:
    """The connection that got the bad input still answers."""
    _, msg = await c.request("after", "system_health")
    assert msg["type"] == "result", msg


async def expect_error(c: Client, text: str | bytes, code: str, call_id: Any = None) -> str:
    """Send ``text``; the answer is an error with ``code`` and ``call_id``; return its message."""
    await c.send(text)
    msg = await c.recv()
    assert msg["type"] == "error", (text[:80], msg)
    assert (msg["id"], msg["error"]["code"]) == (call_id, code), (text[:80], msg)
    return msg["error"]["message"]


# --- message over the size limit (also fragmented, multi-byte UTF-8): close 1009 -----------------


def _padded_call(total_bytes: int, char: str) -> str:
    """A count_tokens call of exactly ``total_bytes`` UTF-8 bytes, its text made of ``char``."""
    empty = len(call_text("big", "count_tokens", {"text": ""}).encode())
    n, pad = divmod(total_bytes - empty, len(char.encode()))
    text = call_text("big", "count_tokens", {"text": char * n + "x" * pad})
    assert len(text.encode()) == total_bytes
    return text


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("char", ["x", "é", "€", "😀"], ids=["ascii", "2-byte", "3-byte", "4-byte"])
async def test_oversize_message_closes_1009(model_path: Path, kind: str, char: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, max_message_bytes=MAX_BYTES)) as server:
            async with open_client(kind, server.url) as c:  # exactly at the limit: served
                await c.send(_padded_call(MAX_BYTES, char))
                _, ok = await c.final("big")
                assert ok["type"] == "result", ok
            text = _padded_call(MAX_BYTES + 1, char)  # one byte over (fewer chars than bytes)
            assert char == "x" or len(text) <= MAX_BYTES
            async with open_client(kind, server.url) as c:
                await c.send(text)
                with pytest.raises(Closed) as info:
                    await c.recv()
                assert info.value.code == 1009
            await assert_serving(server)


@pytest.mark.parametrize("char", ["x", "€"])
async def test_fragmented_oversize_message_closes_1009(model_path: Path, char: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, max_message_bytes=MAX_BYTES)) as server:
            # the bytes of a message over the limit, split at every 7th byte (which cuts
            # multi-byte characters in two: the decoder must carry them across fragments)
            data = _padded_call(2 * MAX_BYTES, char).encode()  # "€": fewer chars than the limit
            parts = [data[i : i + 7] for i in range(0, len(data), 7)]
            if char == "x":  # counted in characters by trio-websocket: no need for the end,
                parts = parts[: MAX_BYTES // 7 + 2]  # so the message is never held whole
            async with open_raw(server.port) as raw:
                await raw.send(frame(OP_TEXT, parts[0], fin=False))
                for part in parts[1:-1]:
                    await raw.send(frame(OP_CONT, part, fin=False))
                await raw.send(frame(OP_CONT, parts[-1], fin=char != "x"))
                assert await raw.close_code() == 1009
            # the same splitting on a message under the limit is served
            data = _padded_call(MAX_BYTES, char).encode()
            parts = [data[i : i + 7] for i in range(0, len(data), 7)]
            async with open_raw(server.port) as raw:
                await raw.send(frame(OP_TEXT, parts[0], fin=False))
                for part in parts[1:-1]:
                    await raw.send(frame(OP_CONT, part, fin=False))
                await raw.send(frame(OP_CONT, parts[-1]))
                got = await raw.read_frame()
                assert got is not None and got[0] == OP_TEXT
                assert json.loads(got[1])["type"] == "result"
            await assert_serving(server)


async def test_frame_declaring_a_huge_length_closes_1009(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, max_message_bytes=MAX_BYTES)) as server:
            async with open_raw(server.port) as raw:
                head = bytes([0x80 | OP_TEXT, 0x80 | 127]) + struct.pack(">Q", 1 << 40)
                await raw.send(head + b"\0\0\0\0" + b"x" * (2 * MAX_BYTES))  # mask 0: plain
                assert await raw.close_code() == 1009
            await assert_serving(server)


# --- invalid UTF-8 text frame, protocol violation: close 1007 / 1002; server survives -----------

BAD_FRAMES = {
    # invalid UTF-8 in a text message: 1007
    "invalid-utf8": (frame(OP_TEXT, b'{"type":"call","id":"\xff"}'), 1007),
    "overlong-utf8": (frame(OP_TEXT, b"\xc0\xaf"), 1007),
    "surrogate-utf8": (frame(OP_TEXT, b"\xed\xa0\x80"), 1007),
    "truncated-utf8": (frame(OP_TEXT, b"\xe2\x82"), 1007),
    "invalid-utf8-across-fragments": (
        frame(OP_TEXT, b"\xe2\x82", fin=False) + frame(OP_CONT, b"("),
        1007,
    ),
    # framing errors: 1002
    "reserved-bits": (frame(OP_TEXT, b"{}", rsv=0b100), 1002),
    "unknown-opcode": (frame(0x3, b"{}"), 1002),
    "unknown-control-opcode": (frame(0xB, b""), 1002),
    "unmasked": (frame(OP_TEXT, b"{}", mask=False), 1002),
    "continuation-first": (frame(OP_CONT, b"{}"), 1002),
    "text-inside-a-fragmented-message": (
        frame(OP_TEXT, b"{", fin=False) + frame(OP_TEXT, b"}"),
        1002,
    ),
    "fragmented-ping": (frame(OP_PING, b"x", fin=False), 1002),
    "ping-over-125-bytes": (frame(OP_PING, b"x" * 126), 1002),
    "close-with-one-byte": (frame(OP_CLOSE, b"\x03"), 1002),
    "close-with-a-bad-code": (frame(OP_CLOSE, struct.pack(">H", 999)), 1002),
}


@pytest.mark.parametrize("name", BAD_FRAMES)
async def test_broken_frames_close_1007_or_1002(model_path: Path, name: str) -> None:
    data, code = BAD_FRAMES[name]
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            async with open_client("trio", server.url) as bystander:
                async with open_raw(server.port) as raw:
                    await raw.send(data)
                    t0 = time.monotonic()
                    assert await raw.close_code() == code
                    assert time.monotonic() - t0 < 2
                await still_open(bystander)  # another client on the server never noticed
            await assert_serving(server)


# --- binary frame on the JSON protocol: INVALID_REQUEST, never fed to the JSON parser -----------


@pytest.mark.parametrize("kind", CLIENTS)
async def test_binary_frames_are_refused(model_path: Path, kind: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            async with open_client(kind, server.url) as c:
                for data in [b"\x00\xff", b"", call_text("b", "system_health").encode()]:
                    message = await expect_error(c, data, "INVALID_REQUEST")  # id never read
                    assert "binary" in message
                await still_open(c)
            await assert_serving(server)


# --- not JSON, not an object, NaN/Infinity/1e400, deep nesting, huge ints: INVALID_REQUEST -------

NOT_JSON = [
    "",
    " ",
    "{",
    "hello",
    "{'type': 'call'}",
    '{"type":"call","id":"a","function":"f"} {}',
    '{"type":"call","id":"a","function":"f",}',
    "[1, 2]",
    '"call"',
    "42",
    "null",
    "true",
    '{"type":"call","id":"n","function":"generate","params":{"temperature":NaN}}',
    '{"type":"call","id":"n","function":"generate","params":{"temperature":Infinity}}',
    '{"type":"call","id":"n","function":"generate","params":{"temperature":-Infinity}}',
    '{"type":"call","id":"n","function":"generate","params":{"temperature":1e400}}',
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 50_000 + "1" + "}" * 50_000,
    '{"type":"call","id":"n","function":"f","params":' + '{"a":' * 40 + "1" + "}" * 41,
    '{"type":"call","id":' + "9" * 5000 + ',"function":"f"}',
    '{"type":"call","id":"n","function":"generate","params":{"seed":' + "7" * 5000 + "}}",
]


@pytest.mark.parametrize("kind", CLIENTS)
async def test_not_json_gets_invalid_request_with_id_null(model_path: Path, kind: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            async with open_client(kind, server.url) as c:
                for text in NOT_JSON:
                    message = await expect_error(c, text, "INVALID_REQUEST", None)
                    assert len(message) < 400  # never echoes the input at length
                    await still_open(c)  # the connection stays open after each
                assert "local" not in server.runtime.statistics().tenants  # no guest ran
            await assert_serving(server)


# --- missing/wrong fields, unknown type, duplicate in-flight id: INVALID_REQUEST naming it -------

BAD_FIELDS: list[tuple[dict[str, Any], str, Any]] = [
    ({"id": "a", "function": "system_health"}, "'type'", "a"),
    ({"type": "calls", "id": "a", "function": "system_health"}, "'type'", "a"),
    ({"type": "result", "id": "a", "data": {}}, "'type'", "a"),
    ({"type": None, "id": 4}, "'type'", 4),
    ({"type": ["call"], "id": "a"}, "'type'", "a"),
    ({"type": "call", "function": "system_health"}, "'id'", None),
    ({"type": "call", "id": None, "function": "system_health"}, "'id'", None),
    ({"type": "call", "id": 1.5, "function": "system_health"}, "'id'", None),
    ({"type": "call", "id": True, "function": "system_health"}, "'id'", None),
    ({"type": "call", "id": -1, "function": "system_health"}, "'id'", None),
    ({"type": "call", "id": 2**53, "function": "system_health"}, "'id'", None),
    ({"type": "call", "id": "", "function": "system_health"}, "'id'", None),
    ({"type": "call", "id": "x" * 129, "function": "system_health"}, "'id'", None),
    ({"type": "call", "id": {"a": 1}, "function": "system_health"}, "'id'", None),
    ({"type": "cancel"}, "'id'", None),
    ({"type": "cancel", "id": [1]}, "'id'", None),
    ({"type": "call", "id": "a"}, "'function'", "a"),
    ({"type": "call", "id": "a", "function": None}, "'function'", "a"),
    ({"type": "call", "id": "a", "function": 5}, "'function'", "a"),
    ({"type": "call", "id": "a", "function": ""}, "'function'", "a"),
    ({"type": "call", "id": "a", "function": "f" * 200}, "'function'", "a"),
    ({"type": "call", "id": "a", "function": "generate", "params": [SHORT]}, "'params'", "a"),
    ({"type": "call", "id": "a", "function": "generate", "params": "x"}, "'params'", "a"),
    ({"type": "call", "id": "a", "function": "generate", "params": 5}, "'params'", "a"),
    ({"type": "call", "id": "a", "function": "system_health", "tenant_id": 5}, "'tenant_id'", "a"),
    ({"type": "call", "id": "a", "function": "system_health", "extra": 1}, "'extra'", "a"),
    ({"type": "call", "id": "a", "function": "system_health", "Type": "call"}, "'Type'", "a"),
    ({"type": "cancel", "id": "a", "params": {}}, "'params'", "a"),
]


@pytest.mark.parametrize("kind", CLIENTS)
async def test_bad_fields_get_invalid_request_naming_the_field(model_path: Path, kind: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            async with open_client(kind, server.url) as c:
                for msg, field, call_id in BAD_FIELDS:
                    message = await expect_error(c, json.dumps(msg), "INVALID_REQUEST", call_id)
                    assert field in message, (msg, message)
                await still_open(c)
            await assert_serving(server)


@pytest.mark.parametrize("kind", CLIENTS)
async def test_duplicate_in_flight_id(model_path: Path, kind: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            async with open_client(kind, server.url) as c:
                await c.send(call_text("dup", "generate", {**LONG, "max_tokens": 150}))
                first = await c.recv()
                assert first["type"] == "stream"
                await c.send(call_text("dup", "system_health"))
                stream, final = [first["data"]], None
                refused = None
                while final is None:
                    msg = await c.recv()
                    if msg["type"] == "error" and msg["id"] is None:
                        # the refusal is about the message, not the call in flight with that
                        # id: every call ends with exactly one result or error of its own
                        assert refused is None
                        refused = msg["error"]
                        continue
                    assert msg["id"] == "dup"
                    if msg["type"] == "stream":
                        stream.append(msg["data"])
                    else:
                        final = msg
                assert refused is not None and refused["code"] == "INVALID_REQUEST"
                assert "'id'" in refused["message"] and "already in flight" in refused["message"]
                # the first call was not disturbed: its stream is whole and it finished
                assert final["type"] == "result"
                assert [ev["index"] for ev in stream] == list(range(len(stream)))
                assert final["data"]["text"] == "".join(ev["token"] for ev in stream)
                # once it has ended, the id can be used again
                _, again = await c.request("dup", "system_health")
                assert again["type"] == "result"
            await assert_serving(server)


@pytest.mark.parametrize("kind", CLIENTS)
async def test_ids_that_cannot_be_sent_back_as_utf8(model_path: Path, kind: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            async with open_client(kind, server.url) as c:
                # valid JSON text whose id is a lone surrogate: echoed back escaped, as JSON
                # allows, never as text the socket cannot encode
                await c.send('{"type":"call","id":"\\ud800","function":"nope"}')
                msg = await c.recv()
                assert msg["id"] == "\ud800" and msg["error"]["code"] == "UNKNOWN_FUNCTION"
                await c.send('{"type":"call","id":"\\udfff","function":"system_health"}')
                msg = await c.recv()
                assert msg["id"] == "\udfff" and msg["type"] == "result"
                await still_open(c)
            await assert_serving(server)


# --- unknown function: UNKNOWN_FUNCTION, from an allow-list -------------------------------------

UNKNOWN = [
    "nope",
    "GENERATE",
    "generate ",
    "generate\x00",
    "../generate",
    "__class__",
    "__init__",
    "__dict__",
    "_system",
    "system_",
    "system_nope",
    "System_health",
    "system_health.__class__",
    "dispatch",
    "shutdown",
    "run",
    "memory",
    "realm_abi_version",
    "realm_alloc",
    "realm_free",
    "realm_metadata_ptr",
    "realm_fn_generate",
]


@pytest.mark.parametrize("kind", CLIENTS)
async def test_unknown_functions(model_path: Path, kind: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            async with open_client(kind, server.url) as c:
                for i, name in enumerate(UNKNOWN):
                    _, msg = await c.request(i, name, {})
                    assert msg["type"] == "error" and msg["id"] == i, (name, msg)
                    assert msg["error"]["code"] == "UNKNOWN_FUNCTION", (name, msg)
                    assert repr(name) in msg["error"]["message"]
                await still_open(c)
            await assert_serving(server)


# --- wrong param types, prompt longer than the context: INVALID_PARAMS naming param and limit ----

BAD_PARAMS: list[tuple[dict[str, Any], list[str]]] = [
    ({"max_tokens": "10"}, ["max_tokens", "integer"]),
    ({"max_tokens": True}, ["max_tokens", "integer"]),
    ({"max_tokens": 1.5}, ["max_tokens", "integer"]),
    ({"max_tokens": None}, ["max_tokens", "integer"]),
    ({"max_tokens": -1}, ["max_tokens", "minimum of 1"]),
    ({"max_tokens": 0}, ["max_tokens", "minimum of 1"]),
    ({"max_tokens": 2**63}, ["max_tokens", "limit of 4096"]),
    ({"max_tokens": 4097}, ["max_tokens", "limit of 4096"]),
    ({"temperature": "hot"}, ["temperature", "number"]),
    ({"temperature": -0.5}, ["temperature", "minimum of 0"]),
    ({"top_p": 0}, ["top_p", "0"]),
    ({"top_p": 1.5}, ["top_p", "maximum of 1"]),
    ({"top_k": -1}, ["top_k", "minimum of 0"]),
    ({"presence_penalty": 3}, ["presence_penalty", "maximum of 2"]),
    ({"seed": "x"}, ["seed", "integer"]),
    ({"stop": "x"}, ["stop", "array"]),
    ({"stop": [""]}, ["stop", "non-empty"]),
    ({"stop": [1]}, ["stop", "string"]),
    ({"prompt": 5}, ["prompt", "string"]),
    ({"prompt": None}, ["prompt", "string"]),
    ({"prompt": ["Hi"]}, ["prompt", "string"]),
    ({"bogus": 1}, ["bogus"]),
]


@pytest.mark.parametrize("kind", CLIENTS)
async def test_wrong_params_get_invalid_params(model_path: Path, kind: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            async with open_client(kind, server.url) as c:
                for i, (params, says) in enumerate(BAD_PARAMS):
                    _, msg = await c.request(i, "generate", {**SHORT, **params})
                    assert msg["type"] == "error" and msg["id"] == i, (params, msg)
                    assert msg["error"]["code"] == "INVALID_PARAMS", (params, msg)
                    for word in says:
                        assert word in msg["error"]["message"], (params, msg)
                _, msg = await c.request("p", "generate", {"max_tokens": 2})
                assert msg["error"]["code"] == "INVALID_PARAMS"
                assert "'prompt' is a required property" in msg["error"]["message"]
                await still_open(c)
            await assert_serving(server)


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"prompt": "hi " * 3000}, ["prompt", "2048"]),  # the parameter and the limit
        ({"model": "huge"}, ["model", "huge"]),
    ],
    ids=["prompt-longer-than-the-context", "unknown-model"],
)
async def test_params_only_the_guest_can_check_get_invalid_params(
    model_path: Path, params: dict[str, Any], says: list[str]
) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            async with open_client("trio", server.url) as c:
                _, msg = await c.request("p", "generate", {**SHORT, **params})
                assert msg["type"] == "error", msg
                for word in says:
                    assert word in msg["error"]["message"], msg
                assert msg["error"]["code"] == "INVALID_PARAMS", msg
                await still_open(c)
            await assert_serving(server)


# --- tenant_id not matching the key; missing/bad key: UNAUTHORIZED / close 1008 ------------------

TENANTS = {
    "acme": TenantSpec("acme", api_key_hashes=(hash_key("k1"),)),
    "beta": TenantSpec("beta", api_key_hashes=(hash_key("k2"),)),
}
K1 = [("Authorization", "Bearer k1")]


@pytest.mark.parametrize("kind", CLIENTS)
async def test_bad_keys_and_foreign_tenant_ids(model_path: Path, kind: str) -> None:
    unthrottled = {"auth_failures_allowed": 100}  # throttling has tests of its own
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=TENANTS, **unthrottled)) as server:
            for headers, path in [
                (None, ""),
                ([("Authorization", "Bearer k3")], ""),
                ([("Authorization", "Bearer " + "k" * 4000)], ""),
                ([("Authorization", "k1")], ""),  # no scheme
                ([("X-Api-Key", "k1")], ""),
                (None, "/?api_key=K1"),
                (None, "/?api_key=k1%00"),
            ]:
                async with open_client(kind, server.url + path, headers=headers) as c:
                    with pytest.raises(Closed) as info:
                        await c.request("h", "system_health")
                    assert info.value.code == 1008, (headers, path)
            async with open_client(kind, server.url, headers=K1) as c:
                _, msg = await c.request("x", "count_tokens", {"text": "hi"}, tenant_id="beta")
                assert msg["error"]["code"] == "UNAUTHORIZED" and msg["id"] == "x"
                assert "'beta'" in msg["error"]["message"]
                await still_open(c)
            assert "beta" not in server.runtime.statistics().tenants
            await assert_serving(server, headers=K1)


async def test_raw_authorization_bytes(model_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=TENANTS)) as server:
            for extra, served in [
                (b"Authorization: Bearer \xff\xfe\r\n", False),
                (b"Authorization: Bearer\r\n", False),
                (b"Authorization: Bearer k3\r\nAuthorization: Bearer k1\r\n", False),
                (b"Authorization: Bearer k1\r\nAuthorization: Bearer k3\r\n", True),  # first
            ]:
                async with open_raw(server.port, upgrade=False) as raw:
                    await raw.send(handshake_request(extra=extra))
                    head = await raw.http_response()
                    assert head.startswith(b"HTTP/1.1 101"), head
                    if not served:
                        assert await raw.close_code() == 1008, extra
                        continue
                    await raw.send(frame(OP_TEXT, call_text("h", "system_metadata").encode()))
                    got = await raw.read_frame()
                    assert got is not None and json.loads(got[1])["data"]["tenant"] == "acme"
            await assert_serving(server, headers=K1)


# --- flood of calls from one client or tenant: RATE_LIMITED / OVERLOADED; others' latency holds --


async def test_flood_is_refused_and_others_latency_holds(model_path: Path) -> None:
    tenants = {
        "acme": TenantSpec("acme", api_key_hashes=(hash_key("k1"),), calls_per_second=5,
                           max_concurrent_calls=1, max_queued_calls=2),
        "beta": TenantSpec("beta", api_key_hashes=(hash_key("k2"),)),
    }  # fmt: skip
    n = 60
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=tenants)) as server:
            async with (
                open_client("trio", server.url, headers=K1) as flood,
                open_client(
                    "websockets", server.url, headers=[("Authorization", "Bearer k2")]
                ) as other,
            ):
                for i in range(n):
                    await flood.send(call_text(i, "generate", {**SHORT, "max_tokens": 4}))
                outcomes: dict[int, str] = {}
                latencies = []
                while len(outcomes) < n:
                    t0 = time.monotonic()
                    _, msg = await other.request("h", "system_health")
                    latencies.append(time.monotonic() - t0)
                    assert msg["type"] == "result"
                    with trio.move_on_after(0.01):
                        while True:
                            msg = await flood.recv()
                            if msg["type"] != "stream":
                                outcomes[msg["id"]] = msg.get("error", {}).get("code", "ok")
                _, gen = await other.request("g", "generate", SHORT)  # beta is unaffected
                assert gen["type"] == "result"
            counts = {k: list(outcomes.values()).count(k) for k in set(outcomes.values())}
            assert set(counts) <= {"ok", "RATE_LIMITED", "OVERLOADED"}, counts
            assert counts.get("RATE_LIMITED", 0) >= n - 10, counts  # 5 calls of burst at 5/s
            assert counts.get("OVERLOADED", 0) >= 1 and counts.get("ok", 0) >= 1, counts
            assert max(latencies) < 1.0, latencies
            await assert_serving(server, headers=K1)


# --- slow reader during streaming: bounded queue, call cancelled, connection closed (1008) -------


async def test_slow_reader_is_closed_1008(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="realm.server")
    limits = {"outbound_queue": 8, "send_timeout_seconds": 0.5}
    tenants = {"acme": TenantSpec("acme", api_key_hashes=(hash_key("k1"),), max_concurrent_calls=8)}
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=tenants, **limits)) as server:
            async with (
                open_client("trio", server.url, headers=K1, queue=1, rcvbuf=4096) as slow,
                open_client("websockets", server.url, headers=K1) as other,
            ):
                for i in range(8):  # streams at once fill the socket buffers sooner
                    params = {**LONG, "prompt": f"Once upon {i}", "max_tokens": 2000}
                    await slow.send(call_text(i, "generate", params))
                t0 = time.monotonic()
                while not any("(1008 slow reader" in r.getMessage() for r in caplog.records):
                    start = time.monotonic()
                    await still_open(other)  # others are served all along
                    assert time.monotonic() - start < 1.0
                    await trio.sleep(0.05)
                assert time.monotonic() - t0 < 10
                await wait_calls_freed(server, "acme", seconds=3)  # its calls were cancelled
                # reading again, the client gets what was sent, then the close: 1008, or, if
                # the server had to cut a write short, the end of the TCP connection
                assert await slow.close_code() in (1008, 1006)
                with trio.fail_after(3):
                    while len(server.connections) > 1:
                        await trio.sleep(0.01)
                await still_open(other)
            await assert_serving(server, headers=K1)


async def test_slow_reader_never_gets_half_a_frame(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Large messages to a client that stopped reading: the write in progress is cut by the
    close, and nothing (no close frame) may follow half a frame: the client, reading again,
    gets whole messages then the close, never garbage (1007/1002)."""
    caplog.set_level(logging.INFO, logger="realm.server")
    limits = {"outbound_queue": 8, "send_timeout_seconds": 0.3}
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, **limits)) as server:
            for _ in range(3):
                caplog.clear()
                async with open_client("trio", server.url, queue=1, rcvbuf=4096) as slow:
                    i = 0
                    while not any("(1008 slow reader" in r.getMessage() for r in caplog.records):
                        with contextlib.suppress(Closed):
                            await slow.send(call_text(i, "system_metadata"))  # ~5 KB each
                        i += 1
                        await trio.sleep(0.005)
                    assert await slow.close_code() in (1008, 1006)
            await assert_serving(server)


# --- disconnect mid-stream: calls cancelled within a step; batch slot and KV memory freed --------


@pytest.mark.parametrize("how", ["close-frame", "tcp-fin", "tcp-reset"])
async def test_disconnect_mid_stream_frees_the_session(model_path: Path, how: str) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            async with open_raw(server.port) as raw:
                await raw.send(frame(OP_TEXT, call_text("s", "generate", LONG).encode()))
                got = await raw.read_frame()
                assert got is not None and json.loads(got[1])["type"] == "stream"
                assert server.runtime.statistics().tenants["local"]["sessions"] == 1
                if how == "close-frame":
                    await raw.send(frame(OP_CLOSE, struct.pack(">H", 1000)))
                elif how == "tcp-fin":
                    raw.stream.socket.shutdown(socket.SHUT_WR)
                else:  # SO_LINGER 0: close() sends RST
                    raw.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                          struct.pack("ii", 1, 0))  # fmt: skip
                    await raw.aclose()
                t0 = time.monotonic()
                await wait_calls_freed(server, "local", seconds=2)
                assert time.monotonic() - t0 < 1.0  # one forward step is milliseconds
            await assert_serving(server)


# --- plain HTTP GET, TLS to a plaintext port, huge headers: HTTP 400 or close; server survives --


def _tls_client_hello() -> bytes:
    ctx = ssl.create_default_context()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


NOT_WEBSOCKET = {
    "http-get": b"GET /no-such-page HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "http-post": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    "http-1.0": b"GET / HTTP/1.0\r\n\r\n",
    "wrong-version": handshake_request().replace(b"Version: 13", b"Version: 8"),
    "no-key": b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n",
    "tls-client-hello": _tls_client_hello(),
    "huge-header": b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    "many-headers": b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 20_000 + b"\r\n",
    "huge-request-line": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
    "binary-garbage": bytes(range(256)) * 8,
}


@pytest.mark.parametrize("name", NOT_WEBSOCKET)
async def test_not_websocket_gets_400_or_close(model_path: Path, name: str) -> None:
    limits = {"handshake_timeout_seconds": 1.0}
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, **limits)) as server:
            async with open_raw(server.port, upgrade=False) as raw:
                t0 = time.monotonic()
                # the server may refuse (and reset) before it has read everything
                with contextlib.suppress(trio.BrokenResourceError):
                    await raw.send(NOT_WEBSOCKET[name])
                head = await raw.http_response()
                assert head.startswith(b"HTTP/1.1 4") or not head, head[:100]
                await raw.wait_eof()  # then the server closes the connection
                assert time.monotonic() - t0 < 3
            await assert_serving(server)


async def test_handshake_that_never_completes_is_dropped(model_path: Path) -> None:
    limits = {"handshake_timeout_seconds": 0.5}
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, **limits)) as server:
            async with (
                open_raw(server.port, upgrade=False) as silent,
                open_raw(server.port, upgrade=False) as slow,
            ):
                t0 = time.monotonic()
                await slow.send(handshake_request()[:40])  # and never the rest
                await assert_serving(server)  # others get through meanwhile
                await slow.wait_eof()
                await silent.wait_eof()
                assert time.monotonic() - t0 < 3
            await assert_serving(server)
