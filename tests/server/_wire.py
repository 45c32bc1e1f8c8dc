"""Client helpers for the server tests: two independent WebSocket clients and raw frames.

``open_client("trio", url)`` uses trio-websocket (our own stack); ``open_client("websockets",
url)`` uses the asyncio-free sync client of the ``websockets`` library in a worker thread, so
the protocol is checked against a second implementation. Both give the same small interface
(``send``, ``recv``, ``request``, ``close_code``), and raise ``Closed`` with the close code.
For what no well-behaved client sends, ``open_raw`` does the handshake by hand over TCP and
``frame`` builds client frames byte by byte.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import struct
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import trio
import trio_websocket
import websockets.exceptions
import websockets.sync.client

from realm.server import Server, ServerConfig, ServerLimits

LIMIT: Final = 20  # seconds: the absolute limit of every test
RECV_SECONDS: Final = 10.0  # a worker thread never waits longer than this for one message
CLIENTS: Final = ("trio", "websockets")

#: a greedy stream that runs for seconds (the test model does not stop early on this prompt)
LONG: Final = {"prompt": "Once upon", "max_tokens": 1000, "temperature": 0}
#: a short greedy generate
SHORT: Final = {"prompt": "Once upon", "max_tokens": 8, "temperature": 0}


def config(
    model: Path, *, tenants: Any = None, metrics: bool = False, **limits: Any
) -> ServerConfig:
    return ServerConfig(
        models={"tiny": str(model)},
        tenants=tenants,
        port=0,
        metrics_port=0 if metrics else None,
        limits=ServerLimits(**limits),
    )


def call_text(call_id: Any, function: str, params: Any = None, **extra: Any) -> str:
    msg = {"type": "call", "id": call_id, "function": function, **extra}
    if params is not None:
        msg["params"] = params
    return json.dumps(msg, ensure_ascii=False)  # UTF-8 on the wire, not \u escapes


def cancel_text(call_id: Any) -> str:
    return json.dumps({"type": "cancel", "id": call_id})


class Closed(Exception):
    """The server closed the connection (``code`` 1006: no close frame arrived)."""

    def __init__(self, code: int, reason: str | None = None) -> None:
        super().__init__(f"closed {code} {reason or ''}")
        self.code = code
        self.reason = reason or ""


class Rejected(Exception):
    """The server refused the handshake with an HTTP status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"handshake refused with HTTP {status}")
        self.status = status


class Client:
    """What both clients offer; messages are JSON objects."""

    kind: str

    async def send(self, message: str | bytes) -> None:
        raise NotImplementedError

    async def recv(self) -> dict[str, Any]:
        raise NotImplementedError

    async def request(self, call_id: Any, function: str, params: Any = None, **extra: Any) -> Any:
        """Call and return ``(stream data list, final message)`` for that id."""
        await self.send(call_text(call_id, function, params, **extra))
        return await self.final(call_id)

    async def final(self, call_id: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        stream: list[dict[str, Any]] = []
        while True:
            msg = await self.recv()
            assert msg["id"] == call_id, msg
            if msg["type"] != "stream":
                return stream, msg
            stream.append(msg["data"])

    async def close_code(self) -> int:
        """Read (and drop) messages until the server closes; return its close code."""
        while True:
            try:
                await self.recv()
            except Closed as e:
                return e.code


class _TrioClient(Client):
    kind = "trio"

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, message: str | bytes) -> None:
        try:
            await self.ws.send_message(message)
        except trio_websocket.ConnectionClosed as e:
            raise Closed(e.reason.code, e.reason.reason) from None

    async def recv(self) -> dict[str, Any]:
        try:
            text = await self.ws.get_message()
        except trio_websocket.ConnectionClosed as e:
            raise Closed(e.reason.code, e.reason.reason) from None
        assert isinstance(text, str), text
        return json.loads(text)


class _SyncClient(Client):
    kind = "websockets"

    def __init__(self, ws: websockets.sync.client.ClientConnection) -> None:
        self.ws = ws

    async def send(self, message: str | bytes) -> None:
        try:
            await trio.to_thread.run_sync(self.ws.send, message)
        except websockets.exceptions.ConnectionClosed as e:
            raise _closed(e) from None

    async def recv(self) -> dict[str, Any]:
        try:
            text = await trio.to_thread.run_sync(self.ws.recv, RECV_SECONDS)
        except websockets.exceptions.ConnectionClosed as e:
            raise _closed(e) from None
        assert isinstance(text, str), text
        return json.loads(text)


def _closed(e: websockets.exceptions.ConnectionClosed) -> Closed:
    return Closed(e.rcvd.code, e.rcvd.reason) if e.rcvd is not None else Closed(1006)


def _sync_connect(url: str, headers: list[tuple[str, str]] | None) -> Any:
    return websockets.sync.client.connect(
        url,
        additional_headers=headers,
        proxy=None,
        open_timeout=RECV_SECONDS,
        close_timeout=2,
        legacy=True,  # connect now (no `with` block: the calls come from several threads)
    )


@contextlib.asynccontextmanager
async def _open_trio(
    url: str, extra: list[tuple[bytes, bytes]], queue: int, rcvbuf: int | None
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """trio-websocket's client on a TCP stream we own: its ``open_websocket_url`` (0.12) leaves
    the socket open when the server closes first or refuses the handshake."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    sock = trio.socket.socket()
    if rcvbuf is not None:  # before connecting, so the window it advertises stays small
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    stream = trio.SocketStream(sock)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(RECV_SECONDS):
                ws = await trio_websocket.wrap_client_stream(
                    nursery, stream, host, resource, extra_headers=extra,
                    message_queue_size=queue,
                )  # fmt: skip
            try:
                yield ws
            finally:
                with trio.move_on_after(2) as cleanup:
                    cleanup.shield = True
                    await ws.aclose()
                await trio.aclose_forcefully(stream)  # ends the reader task in any case
    except BaseExceptionGroup as group:  # one failure (the body's or the reader's): as itself
        if len(group.exceptions) == 1:
            e = group.exceptions[0]
            if isinstance(e, trio_websocket.ConnectionRejected):
                raise Rejected(e.status_code) from None
            raise e from None
        raise
    finally:
        await trio.aclose_forcefully(stream)


@contextlib.asynccontextmanager
async def open_client(
    kind: str,
    url: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    queue: int = 1,
    rcvbuf: int | None = None,
) -> AsyncIterator[Client]:
    """A connected client of ``kind`` ("trio" or "websockets"); ``Rejected`` if refused.

    For "trio", ``queue`` is the client's message queue (its reader stops reading the socket
    while the queue is full) and ``rcvbuf`` the socket's receive buffer in bytes."""
    if kind == "trio":
        extra = [(k.encode(), v.encode()) for k, v in headers or []]
        async with _open_trio(url, extra, queue, rcvbuf) as ws:
            yield _TrioClient(ws)
        return
    assert kind == "websockets", kind
    try:
        ws = await trio.to_thread.run_sync(_sync_connect, url, headers)
    except websockets.exceptions.InvalidStatus as e:
        raise Rejected(e.response.status_code) from None
    try:
        yield _SyncClient(ws)
    finally:
        await trio.to_thread.run_sync(ws.close)


async def assert_serving(server: Server, *, headers: list[tuple[str, str]] | None = None) -> None:
    """A fresh connection from each client gets a ``system_health`` result."""
    for kind in CLIENTS:
        async with open_client(kind, server.url, headers=headers) as c:
            _, msg = await c.request("health", "system_health")
            assert msg["type"] == "result", msg
            assert msg["data"]["status"] == "ok"


async def wait_calls_freed(server: Server, tenant: str, seconds: float = 5.0) -> None:
    """The tenant's calls end and its sessions are freed within ``seconds``."""
    with trio.fail_after(seconds):
        while True:
            st = server.runtime.statistics().tenants.get(tenant)
            if st is not None and st["sessions"] == 0 and st["in_flight"] == 0:
                return
            await trio.sleep(0.02)


# --- raw WebSocket over TCP --------------------------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """One client frame: FIN/RSV/opcode byte, length (with the mask bit), mask, payload."""
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def handshake_request(path: str = "/", extra: bytes = b"") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n"
    )


class RawConnection:
    """A TCP stream to the server, with a reader of the server's (unmasked) frames."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""
        self.eof = False

    async def _fill(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:  # reset by the server
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def http_response(self) -> bytes:
        """The server's HTTP response head (status line and headers), or what came before EOF."""
        while b"\r\n\r\n" not in self.buf:
            if not await self._fill():
                return self.buf
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return head

    async def _exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not await self._fill():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    async def read_frame(self) -> tuple[int, bytes] | None:
        """The next frame's (opcode, payload); None at EOF."""
        head = await self._exactly(2)
        if head is None:
            return None
        assert not head[1] & 0x80, "a server frame must not be masked"
        n = head[1] & 0x7F
        if n == 126:
            ext = await self._exactly(2)
            n = struct.unpack(">H", ext)[0] if ext else 0
        elif n == 127:
            ext = await self._exactly(8)
            n = struct.unpack(">Q", ext)[0] if ext else 0
        payload = await self._exactly(n)
        if payload is None:
            return None
        return head[0] & 0x0F, payload

    async def close_code(self) -> int:
        """Read until the server's close frame (its code) or EOF without one (1006)."""
        while True:
            got = await self.read_frame()
            if got is None:
                return 1006
            opcode, payload = got
            if opcode == OP_CLOSE:
                return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005

    async def rest(self) -> bytes:
        """Everything the server still sends, to EOF (a refused handshake's body)."""
        while await self._fill():
            pass
        out, self.buf = self.buf, b""
        return out

    async def wait_eof(self) -> None:
        """Read (and drop) whatever comes until the server closes the connection."""
        while await self._fill():
            self.buf = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@contextlib.asynccontextmanager
async def open_raw(port: int, *, upgrade: bool = True) -> AsyncIterator[RawConnection]:
    """A raw TCP connection, by default after a successful WebSocket handshake."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = RawConnection(stream)
    try:
        if upgrade:
            await conn.send(handshake_request())
            head = await conn.http_response()
            assert head.startswith(b"HTTP/1.1 101"), head
        yield conn
    finally:
        await conn.aclose()


# --- plain HTTP, and connections from another loopback address ---------------------------------


async def open_tcp(port: int, *, source: str | None = None) -> trio.SocketStream:
    """A TCP connection to the server on 127.0.0.1, from ``source`` (e.g. "127.0.0.2": any
    127/8 address is this machine's, so tests can play several clients)."""
    sock = trio.socket.socket()
    try:
        if source is not None:
            await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def http_exchange(
    port: int, request: bytes, *, source: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` raw; read the response to EOF: (status, headers lower-cased, body)."""
    stream = await open_tcp(port, source=source)
    async with stream:
        await stream.send_all(request)
        data = b""
        with contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/1.") else 0
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def get(path: str, *headers: str, host: str = "127.0.0.1", method: str = "GET") -> bytes:
    """A plain HTTP/1.1 request (``headers``: "Name: value" lines)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def handshake(
    port: int, *headers: str, path: str = "/", host: str = "127.0.0.1", source: str | None = None
) -> tuple[int, dict[str, str], RawConnection]:
    """A WebSocket handshake with ``headers`` added, by hand: (status, response headers, the
    connection, for frames after a 101). The caller closes the connection."""
    lines = [
        f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version: 13", *headers,
    ]  # fmt: skip
    conn = RawConnection(await open_tcp(port, source=source))
    await conn.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    head = (await conn.http_response()).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1]) if head[0].startswith("HTTP/1.") else 0
    response = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        response[k.strip().lower()] = v.strip()
    return status, response, conn


async def raw_call(conn: RawConnection, call_id: Any, function: str, params: Any = None) -> Any:
    """A call over a raw connection; its final message (a close: the close code)."""
    await conn.send(frame(OP_TEXT, call_text(call_id, function, params).encode()))
    while True:
        got = await conn.read_frame()
        if got is None:
            return 1006
        opcode, payload = got
        if opcode == OP_CLOSE:
            return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
        if opcode == OP_TEXT:
            msg = json.loads(payload)
            if msg["id"] == call_id and msg["type"] != "stream":
                return msg
