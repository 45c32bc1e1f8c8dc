"""The Python client of protocol v1: ``AsyncClient`` (Trio) and ``Client`` (plain threads).

One WebSocket connection carries any number of calls at once, multiplexed by ``id``. A reader
task hands each server message to its call's channel. A connection that has closed (the server's
idle timeout, a restart) is opened again, with exponential backoff, when the next call starts;
calls in flight when a connection drops fail with ``ConnectionLost`` (a call is not idempotent,
so it is never silently sent twice; the error's ``retryable`` says the caller may send it again).

Behind a balancer (docs/deploy.md), ``tenant`` sends ``X-Realm-Tenant`` so that every key of a
tenant is routed to the same server; ``server`` names the server of the open connection (its
``X-Realm-Server`` handshake header).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import ssl
import threading
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from .._protocol import (
    SERVER_HEADER,
    CloseCode,
    ErrorCode,
    ServerMessage,
    call_message,
    cancel_message,
    read_server_message,
)
from .._util import single_error
from ._errors import ConnectionLost, KeyRefused, RemoteError, error_from_wire

_TENANT: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")  # an X-Realm-Tenant routing key
CALL_BUFFER: Final = 4096  # messages buffered per call before the reader waits for its caller
MAX_MESSAGE_BYTES: Final = 16 << 20
DISCONNECT_SECONDS: Final = 2.0  # wait this long for the server to close a closed connection


@attrs.frozen
class Event:
    """A streamed call's events: ``"token"`` events (``data``: ``token``, ``index``), then one
    ``"result"`` (``data``: the call's result)."""

    kind: str
    data: dict[str, Any]


def _split_url(url: str) -> tuple[str, int, str, str, bool]:
    """``ws[s]://host[:port]/path?query`` -> host, port, Host header, resource, TLS."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConnectionLost(f"{url!r} is not a ws:// or wss:// URL")
    tls = parts.scheme == "wss"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        raise ConnectionLost(f"{url!r}: bad port") from None
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, parts.netloc.rpartition("@")[2], resource, tls


RETRY_HINT: Final = "the call may not have finished: it may be retried"


def _lost(e: ConnectionClosed) -> ConnectionLost:
    """The error of a call whose connection closed (carrying the close frame): KeyRefused (an
    Unauthorized too) for the server's 1008 UNAUTHORIZED, else ConnectionLost."""
    reason = e.reason
    text = f"connection closed ({reason.code} {reason.reason or reason.name})"
    if reason.code == CloseCode.POLICY and (reason.reason or "").startswith(
        f"{ErrorCode.UNAUTHORIZED}:"
    ):
        return KeyRefused(text, close_code=reason.code, reason=reason.reason or "")
    return ConnectionLost(
        f"{text}; {RETRY_HINT}", close_code=reason.code, reason=reason.reason or ""
    )


class _Call:
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws  # the connection it was sent on (only that one's closing fails it)
        self.send, self.recv = trio.open_memory_channel[ServerMessage](CALL_BUFFER)
        self.done = False
        self.lost: ConnectionLost | None = None  # set, and ``send`` closed, when ``ws`` closes


class CallStream:
    """A streamed call: iterate it for its events; ``id`` is its protocol id."""

    def __init__(self, call_id: str, events: AsyncIterator[Event], client: AsyncClient) -> None:
        self.id = call_id
        self._events = events
        self._client = client

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events

    async def cancel(self) -> None:
        """Ask the server to cancel this call."""
        await self._client.cancel(self.id)


class AsyncClient:
    """A connection to a Realm server; open it with ``connect`` (``async with``)."""

    def __init__(
        self,
        nursery: trio.Nursery,
        url: str,
        *,
        api_key: str | None = None,
        tenant: str | None = None,
        connect_timeout: float = 10.0,
        retries: int = 5,
        backoff_seconds: float = 0.1,
    ) -> None:
        self.url = url
        self._nursery = nursery
        self._headers = [("Authorization", f"Bearer {api_key}")] if api_key else []
        if tenant is not None:
            if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
                raise ValueError(
                    f"tenant: {tenant!r} is not a routing key (1-128 letters, digits, '._-')"
                )
            self._headers.append(("X-Realm-Tenant", tenant))
        self._connect_timeout = connect_timeout
        self._retries = retries
        self._backoff = backoff_seconds
        self._ws: WebSocketConnection | None = None
        self._lock = trio.Lock()
        self._calls: dict[str, _Call] = {}
        self._ids = itertools.count(1)

    @property
    def server(self) -> str | None:
        """The server of the open connection (its ``X-Realm-Server`` header), or None."""
        ws = self._ws
        if ws is None:
            return None
        for name, value in ws.handshake_headers:
            if name.decode("latin-1").lower() == SERVER_HEADER.lower():
                return value.decode("latin-1")
        return None

    # --- connection ----------------------------------------------------------------------------

    async def _connection(self) -> WebSocketConnection:
        """The open connection, (re)opened with exponential backoff when it has closed."""
        async with self._lock:
            if self._ws is not None and self._ws.closed is None:
                return self._ws
            delay, last = self._backoff, "no attempt"
            for attempt in range(self._retries + 1):
                try:
                    with trio.fail_after(self._connect_timeout):
                        ws: WebSocketConnection = await self._nursery.start(self._run_connection)
                except HandshakeError as e:
                    status = getattr(e, "status_code", None)
                    body = (getattr(e, "body", None) or b"").decode("utf-8", "replace").strip()
                    last = f"handshake refused ({status}{': ' + body if body else ''})"
                    if status is not None and 400 <= status < 500:  # retrying won't help
                        raise ConnectionLost(f"{self.url}: {last}") from None
                except trio.TooSlowError:
                    last = f"no handshake within {self._connect_timeout:g} s"
                except OSError as e:
                    last = str(e)
                else:
                    self._ws = ws
                    return ws
                if attempt < self._retries:
                    await trio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            raise ConnectionLost(f"cannot connect to {self.url}: {last}")

    async def _run_connection(
        self, *, task_status: trio.TaskStatus[WebSocketConnection] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open one connection (``started`` with it after the handshake), read it until it
        closes, then fail its calls still waiting and close its socket.

        The connection's tasks run in a nursery of their own: a refused handshake is raised by
        trio-websocket's reader task, and must reach ``_connection`` as an error of this attempt
        rather than end the client. The socket is ours to close: trio-websocket leaves a
        client's socket open when the server closes the connection.
        """
        host, port, host_header, resource, tls = _split_url(self.url)
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
        if tls:
            stream = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=ssl.create_default_context(), https_compatible=True
            )
        else:
            stream = await trio.open_tcp_stream(host, port)
        ws: WebSocketConnection | None = None
        try:
            with single_error():
                async with trio.open_nursery() as nursery:
                    ws = await wrap_client_stream(
                        nursery,
                        stream,
                        host_header,
                        resource,
                        extra_headers=self._headers,
                        max_message_size=MAX_MESSAGE_BYTES,
                    )
                    task_status.started(ws)
                    self._drop(ws, await self._reader(ws))
                    # trio-websocket's reader task completes the close handshake, then ends
                    # when the server closes the socket; a server that never does is cut off
                    nursery.cancel_scope.deadline = trio.current_time() + DISCONNECT_SECONDS
        except Exception as e:
            if ws is None:
                raise  # the handshake failed: an error of this attempt
            self._drop(ws, ConnectionLost(f"connection to {self.url} failed: {e!r}; {RETRY_HINT}"))
        finally:
            await trio.aclose_forcefully(stream)

    def _drop(self, ws: WebSocketConnection, lost: ConnectionLost) -> None:
        """``ws`` has closed: the next call opens a new connection; its calls fail with
        ``lost`` once they have read what arrived before the close."""
        if self._ws is ws:
            self._ws = None
        for call in list(self._calls.values()):
            if call.ws is ws and call.lost is None:
                call.lost = lost
                call.send.close()

    async def _reader(self, ws: WebSocketConnection) -> ConnectionLost:
        """Hand each message to its call until the connection closes; return the error for
        the calls still waiting on it."""
        try:
            while True:
                msg = read_server_message(await ws.get_message())
                call = self._calls.get(msg.id) if msg is not None and msg.id is not None else None
                if call is not None:
                    assert msg is not None
                    await call.send.send(msg)
        except ConnectionClosed as e:
            return _lost(e)

    async def aclose(self) -> None:
        if self._ws is not None:
            with trio.move_on_after(2):
                await self._ws.aclose()

    # --- calls ---------------------------------------------------------------------------------

    async def _start(self, function: str, params: dict[str, Any] | None) -> tuple[str, _Call]:
        ws = await self._connection()
        call_id = f"c{next(self._ids)}"
        call = _Call(ws)
        self._calls[call_id] = call
        try:
            await ws.send_message(call_message(call_id, function, params))
        except ConnectionClosed as e:
            self._calls.pop(call_id, None)
            raise _lost(e) from None
        return call_id, call

    async def _events(self, call_id: str, call: _Call) -> AsyncIterator[Event]:
        try:
            while True:
                try:
                    msg = await call.recv.receive()
                except trio.EndOfChannel:
                    raise call.lost or ConnectionLost(f"connection lost; {RETRY_HINT}") from None
                if msg.type == "stream":
                    yield Event("token", msg.data)
                elif msg.type == "result":
                    call.done = True
                    yield Event("result", msg.data)
                    return
                else:
                    call.done = True
                    raise error_from_wire(msg.error, call_id)
        finally:
            self._calls.pop(call_id, None)

    async def call(self, function: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call ``function`` and return its result data (streamed tokens are not kept)."""
        async with self.stream(function, params) as events:
            async for ev in events:
                if ev.kind == "result":
                    return ev.data
        raise ConnectionLost("the call ended without a result")  # pragma: no cover

    @contextlib.asynccontextmanager
    async def stream(
        self, function: str, params: dict[str, Any] | None = None
    ) -> AsyncIterator[CallStream]:
        """``async for ev in events``: token events, then the result. Leaving early cancels;
        so does ``await events.cancel()`` (the iteration then ends with ``RemoteCancelled``)."""
        call_id, call = await self._start(function, params)
        events = self._events(call_id, call)
        try:
            yield CallStream(call_id, events, self)
        finally:
            if not call.done:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await self.cancel(call_id)
            await events.aclose()

    async def cancel(self, call_id: str) -> None:
        """Ask the server to cancel a call (its stream then ends with CANCELLED)."""
        ws = self._ws
        if ws is not None and ws.closed is None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send_message(cancel_message(call_id))

    async def metadata(self) -> dict[str, Any]:
        """``system_metadata``: the functions this tenant can call, with their JSON schemas."""
        return await self.call("system_metadata")

    async def health(self) -> dict[str, Any]:
        return await self.call("system_health")


@contextlib.asynccontextmanager
async def connect(
    url: str,
    *,
    api_key: str | None = None,
    tenant: str | None = None,
    connect_timeout: float = 10.0,
    retries: int = 5,
    backoff_seconds: float = 0.1,
) -> AsyncIterator[AsyncClient]:
    """``async with realm.client.connect("ws://127.0.0.1:8080", api_key=...) as c``.

    ``tenant``: a routing key sent as ``X-Realm-Tenant``, for a balancer that hashes on it
    (docs/deploy.md); the server itself ignores it."""
    with single_error():
        async with trio.open_nursery() as nursery:
            client = AsyncClient(
                nursery,
                url,
                api_key=api_key,
                tenant=tenant,
                connect_timeout=connect_timeout,
                retries=retries,
                backoff_seconds=backoff_seconds,
            )
            # fail fast on a wrong URL or a refused handshake; a wrong API key is not seen
            # here (the server accepts, then closes with 1008): the first call raises
            # KeyRefused (an Unauthorized and a ConnectionLost) with close_code 1008
            await client._connection()
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()


class Client:
    """The same client for code without an event loop: a Trio loop runs in a helper thread.

    ``with Client(url, api_key=...) as c: c.call(...)``; ``for ev in c.stream(...)``.
    """

    def __init__(self, url: str, *, api_key: str | None = None, **options: Any) -> None:
        self._url, self._key, self._options = url, api_key, options
        self._token: trio.lowlevel.TrioToken | None = None
        self._client: AsyncClient | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="realm-client", daemon=True)

    def _main(self) -> None:
        async def run() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            try:
                async with connect(self._url, api_key=self._key, **self._options) as client:
                    self._client = client
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as e:
                self._failure = e
                raise

        with contextlib.suppress(BaseException):
            trio.run(run)
        self._ready.set()

    def __enter__(self) -> Client:
        self._thread.start()
        self._ready.wait()
        if self._client is None:
            failure = self._failure
            while isinstance(failure, BaseExceptionGroup) and len(failure.exceptions) == 1:
                failure = failure.exceptions[0]
            raise failure or ConnectionLost(f"cannot connect to {self._url}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(timeout=10)

    def _run(self, fn: Any, *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def call(self, function: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self._client is not None, "use `with Client(...) as c`"
        return self._run(self._client.call, function, params)

    def stream(self, function: str, params: dict[str, Any] | None = None) -> Iterator[Event]:
        """Iterate token events, then the result; breaking out early cancels the call."""
        client = self._client
        assert client is not None, "use `with Client(...) as c`"
        call_id, call = self._run(client._start, function, params)
        events = client._events(call_id, call)
        try:
            while True:
                try:
                    ev = self._run(events.__anext__)
                except StopAsyncIteration:
                    return
                yield ev
        finally:
            if not call.done:
                self._run(client.cancel, call_id)
            self._run(events.aclose)

    def cancel(self, call_id: str) -> None:
        assert self._client is not None
        self._run(self._client.cancel, call_id)

    @property
    def server(self) -> str | None:
        """The server of the open connection (``X-Realm-Server``), or None."""
        return None if self._client is None else self._client.server

    def metadata(self) -> dict[str, Any]:
        return self.call("system_metadata")

    def health(self) -> dict[str, Any]:
        return self.call("system_health")


__all__ = ["AsyncClient", "CallStream", "Client", "Event", "RemoteError", "connect"]
