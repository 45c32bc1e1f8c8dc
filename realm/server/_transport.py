"""The WebSocket transport: every dependence of Realm on trio-websocket's internals is here.

trio-websocket 0.12 runs each connection under ``trio.serve_listeners`` in
``WebSocketServer._handle_connection``, where one handler's exception ends the whole server, a
frame wsproto cannot parse drops TCP without a close frame (the client sees 1006), and a
request that is not a WebSocket handshake never reaches Realm. ``WebSocketTransport`` serves
the listeners itself with its own copy of that method which:

- puts an error boundary around each connection (logged, never the server's end);
- reads the request head first (h11): a plain HTTP request goes to ``on_http`` (``GET /health``,
  the OpenAI-compatible API, the playground, a 400/404 that says what the port speaks; it may
  read the body and stream its answer on the connection itself); a WebSocket handshake is
  replayed into trio-websocket's connection and reaches ``on_websocket`` with the head it was
  read from;
- ends the handshake wait as soon as trio-websocket's reader gives up on the request (one
  wsproto refused), not only at the handshake timeout, and ends the connection after a
  handshake Realm refused (trio-websocket waits for the client to hang up);
- sends a close frame with 1007 (invalid UTF-8) or 1002 (protocol violation) before dropping a
  connection whose frames cannot be parsed (``_WebSocketConnection``);
- writes nothing after a write that was cut short (``UncutStream``).

It uses these private parts of trio-websocket, pinned ``<0.13`` in pyproject; ``RELIES_ON``
holds a digest of each one's source, and a test fails loudly when the installed version's
differ: re-check this module against the new code before updating the digests.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from ._http import BadRequest, HttpRequest, HttpResponse, read_request, send_response, text_response

log = logging.getLogger("realm.server")

CLOSE_REASON_BYTES: Final = 120  # a close frame's reason is at most 123 bytes
RECEIVE_BYTES: Final = 4096  # trio-websocket's own default read size

#: the private parts of trio-websocket this module relies on, and the sha256 of their source
#: (``source_digest``) in the version it was written against, 0.12.2
RELIES_ON: Final = {
    # copied by WebSocketTransport._serve_websocket
    "WebSocketServer._handle_connection": (
        "8410285aa857d6c4f8b942963cc2505be4a9edc8dec38fdabc58e2a1bf1ecfc4"
    ),
    # built with (stream, WSConnection, message_queue_size=, max_message_size=,
    # receive_buffer_size=); its ._wsproto is read by _WebSocketConnection
    "WebSocketConnection.__init__": (
        "29c06a80f96dc90a33966411d7ab9cffb14dbbc31498f1243e35aa20488c0b7d"
    ),
    # started by us as WebSocketServer does; ends once a refused handshake is answered
    "WebSocketConnection._reader_task": (
        "69826f541cb0278a8c63ab6e152d9326241cc5e254abd438e6db4e9de6268753"
    ),
    # awaited by us for the handshake's request
    "WebSocketConnection._get_request": (
        "cf68948d369f471c09f33c185e6a329cbe6b89c5760776bd6bc5a0df57b53053"
    ),
    # overridden by _WebSocketConnection, which then calls it
    "WebSocketConnection._handle_close_connection_event": (
        "6d4c481a35db569916c48896096818e3950329f8849365aa571cbc10e98a9fe8"
    ),
    # sends our close frame
    "WebSocketConnection._send": (
        "2c6048dd9c0d1f1fb38fa9b81ceb81f619ad81408717eb0da45c15cffc4c3a00"
    ),
}


def source_digest(qualname: str) -> str:
    """sha256 of the source of ``trio_websocket.<qualname>`` (``Class.method``)."""
    cls_name, _, attr = qualname.partition(".")
    obj = getattr(getattr(trio_websocket, cls_name), attr)
    return hashlib.sha256(inspect.getsource(obj).encode("utf-8")).hexdigest()


def close_reason(text: str) -> str:
    """``text`` cut to what a close frame can carry (at most 123 bytes of UTF-8)."""
    raw = text.encode("utf-8")[:CLOSE_REASON_BYTES]
    return raw.decode("utf-8", "ignore")


class UncutStream(trio.abc.HalfCloseableStream):
    """A TCP stream that never writes after a write it left half done, and can give back
    bytes read ahead of the WebSocket connection (the request head).

    A write cancelled part way (a close, or the send timeout, while the client reads nothing)
    leaves half a WebSocket frame on the wire; a close frame or ping written after it is read as
    garbage by the client (it saw 1007 instead of the close code). Once a write is cut, every
    later one fails with ``BrokenResourceError`` (trio-websocket then drops the connection);
    a write that was cancelled before sending anything is no harm and leaves the stream usable.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.cut = False
        self._pending = b""
        try:
            host, port = stream.socket.getpeername()[:2]
            self.peer_host, self._peer = str(host), f"{host}:{port}"
        except (OSError, ValueError):  # gone already; or not an IP socket
            self.peer_host, self._peer = "", "?"

    def __repr__(self) -> str:
        return self._peer

    def unread(self, data: bytes) -> None:
        """The next reads return ``data`` first."""
        self._pending = data + self._pending

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.cut:
            raise trio.BrokenResourceError("an earlier write was cut short")
        with memoryview(data) as view:
            sent = 0
            try:
                while sent < len(view):
                    sent += await self.stream.socket.send(view[sent:])
            except OSError as e:
                raise trio.BrokenResourceError(f"socket connection broken: {e}") from e
            finally:
                if 0 < sent < len(view):
                    self.cut = True

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._pending:
            n = len(self._pending) if max_bytes is None else max_bytes
            data, self._pending = self._pending[:n], self._pending[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


class _WebSocketConnection(WebSocketConnection):
    """trio-websocket's connection, telling the client why when its frames cannot be parsed.

    wsproto reports invalid UTF-8 (1007) or a protocol violation (1002) as a close event while
    the connection is still OPEN (a real close frame from the peer makes it REMOTE_CLOSING);
    trio-websocket then drops TCP without sending a close frame, so the client saw only 1006.
    """

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        if self._wsproto.state == ConnectionState.OPEN:
            with contextlib.suppress(ConnectionClosed):
                await self._send(CloseConnection(event.code, close_reason(event.reason or "")))
        await super()._handle_close_connection_event(event)


WebSocketHandler = Callable[[WebSocketRequest, HttpRequest], Awaitable[None]]
#: answers a plain HTTP request: a response to send whole, or None when the handler wrote its
#: own (a stream) on the connection it is given
HttpHandler = Callable[[HttpRequest, UncutStream], Awaitable[HttpResponse | None]]


class WebSocketTransport:
    """Serves WebSocket handshakes to ``on_websocket`` and plain HTTP requests to ``on_http``
    on the listeners given to ``run`` (see the module docs)."""

    def __init__(
        self,
        on_websocket: WebSocketHandler,
        on_http: HttpHandler,
        *,
        message_queue_size: int,
        max_message_size: int,
        handshake_timeout: float,
        disconnect_timeout: float,
        send_timeout: float,
    ) -> None:
        self._on_websocket = on_websocket
        self._on_http = on_http
        self._message_queue_size = message_queue_size
        self._max_message_size = max_message_size
        self._handshake_timeout = handshake_timeout
        self._disconnect_timeout = disconnect_timeout
        self._send_timeout = send_timeout

    async def run(
        self, listeners: list[trio.SocketListener], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled."""
        await trio.serve_listeners(self._handle_stream, listeners, task_status=task_status)

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        """One TCP connection, from its first byte to its close. Never raises."""
        try:
            await self._serve(stream)
        except Exception as e:
            leaf: BaseException = e
            while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
                leaf = leaf.exceptions[0]
            if not isinstance(leaf, ConnectionClosed | trio.BrokenResourceError):
                log.warning("connection ended with %s: %s", type(leaf).__name__, leaf)
        finally:
            with contextlib.suppress(Exception):
                await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        wire = UncutStream(stream)
        deadline = trio.current_time() + self._handshake_timeout
        request: HttpRequest | None = None
        with trio.CancelScope(deadline=deadline):
            try:
                request = await read_request(wire, peer=wire.peer_host)
            except BadRequest as e:
                text = f"{e.status}: not an HTTP request this server can read ({e.reason})\n"
                await send_response(wire, text_response(e.status, text), timeout=1.0)
                return
        if request is None:  # closed, or silent past the handshake timeout
            return
        if not request.websocket:
            response = await self._on_http(request, wire)
            if response is not None:
                await send_response(wire, response, timeout=self._send_timeout)
            return
        wire.unread(request.raw)
        await self._serve_websocket(wire, request, deadline)

    async def _serve_websocket(self, wire: UncutStream, head: HttpRequest, deadline: float) -> None:
        """``WebSocketServer._handle_connection`` of trio-websocket 0.12, on an ``UncutStream``
        with our connection class, its handshake under the deadline that began with the first
        byte, and the head passed on to the handler."""
        handshake = trio.CancelScope(deadline=deadline)
        async with trio.open_nursery() as nursery:
            connection = _WebSocketConnection(
                wire,  # type: ignore[arg-type]  # a Stream, as trio-websocket's own tests pass
                WSConnection(ConnectionType.SERVER),
                message_queue_size=self._message_queue_size,
                max_message_size=self._max_message_size,
                receive_buffer_size=RECEIVE_BYTES,
            )

            async def reader() -> None:
                await connection._reader_task()
                handshake.cancel()  # the reader ended: no request will come (if none came)

            nursery.start_soon(reader)
            with handshake:
                request = await connection._get_request()
            if handshake.cancelled_caught:
                nursery.cancel_scope.cancel()
                return
            try:
                await self._on_websocket(request, head)
            finally:
                with trio.move_on_after(self._disconnect_timeout):
                    await connection.aclose()
                # a refused handshake leaves the reader waiting for the client to hang up
                nursery.cancel_scope.cancel()
