"""Plain HTTP/1.1 on the server's ports, with h11: read one request head (``read_request``), its
body (``read_body``), and write one response, whole (``send_response``) or streamed
(``HttpStream``, chunked), then close.

Used for what is not a WebSocket on the WebSocket port (``GET /health``, ``GET /ready``, the
OpenAI-compatible API of ``_openai``, the playground of ``_static``, a 400/404 that says what
the port speaks) and by the metrics endpoint. One request per connection: every response says
``Connection: close``. A response is sent whole or the failure is logged by the caller:
``send_response`` reports a write that was cut short instead of leaving a truncated page.
"""

from __future__ import annotations

import contextlib
import contextvars
import http
import urllib.parse
from typing import Final

import attrs
import h11
import trio

MAX_HEAD_BYTES: Final = 16 << 10  # a request head (request line and headers) at most this long
RECEIVE_BYTES: Final = 4096
DRAIN_SECONDS: Final = 1.0  # after a response, read what the client still sends, this long ...
DRAIN_BYTES: Final = 1 << 20  # ... or this much, so closing does not reset the connection
#: headers every response of a server carries (its ``X-Realm-Server`` identity): set by the
#: server in its serving task, inherited by every connection task it starts
RESPONSE_HEADERS: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "realm_response_headers", default=()
)


@attrs.frozen
class HttpRequest:
    """One request head. ``headers`` have lower-case names and latin-1 decoded values;
    ``raw`` is every byte read from the stream (the head and anything after it)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    raw: bytes = attrs.field(repr=False)
    peer: str = ""  # the client's address
    #: the h11 connection the head was read with: it reads the body (``read_body``) and
    #: frames a streamed response (``HttpStream``)
    conn: h11.Connection | None = attrs.field(default=None, repr=False, eq=False)

    def header(self, name: str) -> str | None:
        """The first value of a header, or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_values(self, name: str) -> list[str]:
        """Every value of a header, comma-separated lists split."""
        return [
            part.strip()
            for k, v in self.headers
            if k == name
            for part in v.split(",")
            if part.strip()
        ]

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target).path or "/"

    @property
    def query(self) -> str:
        return urllib.parse.urlsplit(self.target).query

    @property
    def websocket(self) -> bool:
        """An upgrade to WebSocket (everything else is plain HTTP)."""
        return "websocket" in (v.lower() for v in self.header_values("upgrade"))


@attrs.frozen
class HttpResponse:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


class BadRequest(Exception):
    """Bytes that are not an HTTP/1.x request head (``status``: the answer, 400 or 431), or a
    body that cannot be read (400, 408, 413)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def text_response(
    status: int, text: str, headers: tuple[tuple[str, str], ...] = ()
) -> HttpResponse:
    return HttpResponse(status, text.encode("utf-8"), headers=headers)


async def read_request(
    stream: trio.abc.ReceiveStream, *, peer: str = "", max_bytes: int = MAX_HEAD_BYTES
) -> HttpRequest | None:
    """The next request head, or None if the client closed before sending a byte.

    Raises ``BadRequest`` for anything else that is not a request head of at most
    ``max_bytes``. The caller bounds the time it may take.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_bytes)
    raw = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise BadRequest(e.error_status_hint, str(e)) from None
        if isinstance(event, h11.Request):
            headers = tuple(
                (bytes(k).decode("latin-1").lower(), bytes(v).decode("latin-1"))
                for k, v in event.headers
            )
            return HttpRequest(
                event.method.decode("latin-1"),
                event.target.decode("latin-1"),
                headers,
                bytes(raw),
                peer,
                conn,
            )
        if event is not h11.NEED_DATA:
            raise BadRequest(400, f"unexpected {type(event).__name__}")
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            if not raw:
                return None
            raise BadRequest(400, "the request head ended early")
        raw += data
        conn.receive_data(data)


def response_bytes(response: HttpResponse) -> bytes:
    try:
        phrase = http.HTTPStatus(response.status).phrase
    except ValueError:
        phrase = "Error"
    lines = [
        f"HTTP/1.1 {response.status} {phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "X-Content-Type-Options: nosniff",  # a body echoing a Host header is never run as HTML
        "Connection: close",
        *(f"{k}: {v}" for k, v in (*response.headers, *RESPONSE_HEADERS.get())),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


async def send_response(
    stream: trio.abc.HalfCloseableStream | trio.abc.Stream,
    response: HttpResponse,
    *,
    timeout: float,
) -> bool:
    """Write ``response`` whole within ``timeout`` seconds, then end the connection politely
    (our side closed, what the client still sends read and dropped for a moment, so it gets
    the answer rather than a reset). False if the write was cut short or failed."""
    done = False
    with trio.move_on_after(timeout):
        try:
            await stream.send_all(response_bytes(response))
            done = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
    if not done:
        return False
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        with trio.move_on_after(DRAIN_SECONDS):
            got = 0
            while got < DRAIN_BYTES and (chunk := await stream.receive_some(65536)):
                got += len(chunk)
    return True


async def read_body(
    stream: trio.abc.ReceiveStream, request: HttpRequest, *, max_bytes: int, timeout: float
) -> bytes:
    """The request's body (Content-Length or chunked, read by h11), at most ``max_bytes`` long
    and read within ``timeout`` seconds. Raises ``BadRequest`` (413: too long, 408: too slow,
    400: not HTTP). A ``Content-Length`` over the limit is refused before a byte is read."""
    conn = request.conn
    assert conn is not None, "a request read by read_request"
    length = request.header("content-length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise BadRequest(413, f"the body is {int(length)} bytes, over the limit of {max_bytes}")
    body = bytearray()
    with trio.move_on_after(timeout):
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise BadRequest(e.error_status_hint, str(e)) from None
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_bytes:
                    raise BadRequest(413, f"the body is over the limit of {max_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            elif event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    raise BadRequest(400, "the body ended early")
                conn.receive_data(data)
            else:
                raise BadRequest(400, f"unexpected {type(event).__name__}")
    raise BadRequest(408, f"the body took over {timeout:g} s")


class HttpStream:
    """A streamed response (``Transfer-Encoding: chunked``, framed by h11) on ``stream``:
    ``start`` sends the head, ``send`` each piece, ``end`` the last chunk. A write that does not
    finish within ``timeout`` seconds raises ``trio.BrokenResourceError`` (a slow reader)."""

    def __init__(
        self, stream: trio.abc.SendStream, request: HttpRequest, *, timeout: float
    ) -> None:
        assert request.conn is not None
        self._conn = request.conn
        self._stream = stream
        self._timeout = timeout

    async def _write(self, event: h11.Event) -> None:
        data = self._conn.send(event)
        if data:
            with trio.move_on_after(self._timeout):
                await self._stream.send_all(data)
                return
            raise trio.BrokenResourceError(f"no progress writing for {self._timeout:g} s")

    async def start(
        self, status: int, content_type: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        # the body may not have been read whole (the client's problem): h11 only frames ours
        all_headers = [
            ("Content-Type", content_type),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
            ("Connection", "close"),
            *headers,
            *RESPONSE_HEADERS.get(),
        ]
        await self._write(h11.Response(status_code=status, headers=all_headers))

    async def send(self, data: bytes) -> None:
        if data:
            await self._write(h11.Data(data=data))

    async def end(self) -> None:
        await self._write(h11.EndOfMessage())
