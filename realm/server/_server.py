"""The WebSocket server: protocol v1 over trio-websocket, in front of the actor runtime.

One ``Server`` owns a listener, a runtime and the connections. Each connection is one task
with its own error boundary (a failure there closes that connection, logged, never the
server); inside it a reader, a writer and a keepalive task, and one task per call in flight
(multiplexed by ``id``). Everything a connection sends goes through one bounded outbound queue
written by its writer task: a call that finds the queue full, or a write that makes no progress
for ``send_timeout_seconds``, closes the connection with 1008 and cancels its calls, so a slow
reader never stalls anyone else. A disconnect cancels the connection's calls (their guests stop
within one forward step and their sessions are freed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import attrs
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from .. import __version__
from .._errors import RealmError
from .._util import single_error
from ..actors import Event, Runtime, RuntimeLimits, open_runtime
from . import _protocol as p
from ._config import OPEN_TENANT, ServerConfig, TenantSpec
from ._limits import TokenBucket
from ._metrics import ServerMetrics, serve_metrics

log = logging.getLogger("realm.server")

SYSTEM_FUNCTIONS: Final = {
    "system_metadata": "The functions this tenant can call: name, description, JSON-schema "
    "params (from the guest's own metadata), and these system functions.",
    "system_health": "Liveness and load: status, uptime, connections, calls in flight.",
    "system_models": "The models served: name, architecture, sizes, context length.",
    "system_metrics": "Runtime statistics as JSON: batching, queues, per-tenant figures.",
}
MESSAGE_QUEUE: Final = 8  # messages trio-websocket buffers before its reader waits on ours
CLOSE_REASON_BYTES: Final = 120  # a close frame's reason is at most 123 bytes


def _reason(text: str) -> str:
    raw = text.encode("utf-8")[:CLOSE_REASON_BYTES]
    return raw.decode("utf-8", "ignore")


class _TenantLimits:
    """Per-tenant rate limits shared by all of a tenant's connections."""

    def __init__(self, spec: TenantSpec | None) -> None:
        self.calls = self.tokens = None
        if spec is not None and spec.calls_per_second:
            self.calls = TokenBucket(spec.calls_per_second, max(1.0, spec.calls_per_second))
        if spec is not None and spec.tokens_per_second:
            burst = spec.burst_tokens or 2 * spec.tokens_per_second
            self.tokens = TokenBucket(spec.tokens_per_second, burst)

    def admit(self, tenant: str) -> None:
        if self.tokens is not None and not self.tokens.available():
            wait = self.tokens.seconds_until_available()
            raise p.ProtocolError(
                p.RATE_LIMITED,
                f"tenant {tenant!r} is over its token rate ({self.tokens.rate:g} tokens/s); "
                f"retry in {wait:.2f} s",
            )
        if self.calls is not None and not self.calls.take():
            raise p.ProtocolError(
                p.RATE_LIMITED,
                f"tenant {tenant!r} is over its call rate ({self.calls.rate:g} calls/s)",
            )


class Server:
    """A Realm WebSocket server; use ``open_server`` (embedded, tests) or ``serve`` (CLI)."""

    def __init__(self, config: ServerConfig, runtime: Runtime) -> None:
        self.config = config
        self.limits = config.limits
        self.runtime = runtime
        self.metrics = ServerMetrics(runtime)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.started = time.monotonic()
        self.closing = False
        self.connections: set[Connection] = set()
        specs = config.tenants or {}
        self._tenant_limits = {name: _TenantLimits(spec) for name, spec in specs.items()}
        self._open_limits = _TenantLimits(None)
        self._serving = trio.CancelScope()
        self._idle = trio.Event()  # set when the last connection ends
        self._admitted = 0  # connections past the max_connections check, handshaking or open

    @property
    def url(self) -> str:
        host = self.config.host
        return f"ws://{'[' + host + ']' if ':' in host else host}:{self.port}"

    # --- serving ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled (``shutdown`` ends it gracefully)."""
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        self.port = listeners[0].socket.getsockname()[1]
        ws_server = _Server(
            self._handle,
            listeners,
            message_queue_size=MESSAGE_QUEUE,
            # trio-websocket counts characters of text frames: the byte limit is checked again
            # on each message; a character is at most 4 bytes, so memory stays bounded
            max_message_size=self.limits.max_message_bytes,
            connect_timeout=self.limits.handshake_timeout_seconds,
            disconnect_timeout=2.0,
        )
        async with trio.open_nursery() as nursery:
            if self.config.metrics_port is not None:
                self.metrics_port = await nursery.start(
                    serve_metrics, self.metrics, self.config.host, self.config.metrics_port
                )
            with self._serving:
                await nursery.start(ws_server.run)
                log.info(
                    "realm %s serving %s on %s (tenants: %s)%s",
                    __version__,
                    ", ".join(f"{n}={self.config.models[n]}" for n in self.config.models),
                    self.url,
                    "open (local)" if self.config.open else ", ".join(self.config.tenants or {}),
                    f"; metrics on http://{self.config.host}:{self.metrics_port}/metrics"
                    if self.metrics_port is not None
                    else "",
                )
                task_status.started(self)
                await trio.sleep_forever()
            nursery.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Stop accepting, let calls in flight finish (``shutdown_seconds``), then cancel them
        and close every connection with 1001."""
        if self.closing:
            return
        self.closing = True
        log.info("shutting down: %d connections", len(self.connections))
        with trio.move_on_after(self.limits.shutdown_seconds):
            while any(c.calls for c in self.connections):
                await trio.sleep(0.02)
        for conn in list(self.connections):
            conn.close(1001, "server shutting down")
        with trio.move_on_after(3.0):
            while self.connections:
                await trio.sleep(0.02)
        self._serving.cancel()

    async def _handle(self, request: WebSocketRequest) -> None:
        """One connection, from handshake to close. Never raises (the error boundary)."""
        try:
            await self._handle_request(request)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("connection from %s failed", request.remote)

    async def _handle_request(self, request: WebSocketRequest) -> None:
        if self.closing:
            await request.reject(503, body=b"the server is shutting down\n")
            return
        # counted from admission, not once accepted: handshakes in progress hold a slot too
        # (else a burst of simultaneous handshakes all pass the check)
        if self._admitted >= self.limits.max_connections:
            await request.reject(503, body=b"too many connections\n")
            return
        self._admitted += 1
        try:
            await self._admit(request)
        finally:
            self._admitted -= 1

    async def _admit(self, request: WebSocketRequest) -> None:
        tenant: str | None = OPEN_TENANT
        if not self.config.open:
            tenant = self.config.tenant_for_key(_api_key(request))
        ws = await request.accept()
        if tenant is None:
            await ws.aclose(1008, "UNAUTHORIZED: missing or unknown API key")
            return
        conn = Connection(self, ws, tenant)
        self.connections.add(conn)
        self.metrics.connections.inc()
        self.metrics.connections_total.inc()
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self.metrics.connections.dec()

    # --- dispatch ----------------------------------------------------------------------------

    def tenant_limits(self, tenant: str) -> _TenantLimits:
        return self._tenant_limits.get(tenant, self._open_limits)

    async def dispatch(
        self, tenant: str, call: p.Call, on_event: Callable[[Event], None]
    ) -> dict[str, Any]:
        if call.function.startswith("system_"):
            return await self._system(tenant, call)
        if self.closing:
            raise p.ProtocolError(p.OVERLOADED, "the server is shutting down")
        cap = self.limits.max_tokens
        mt = call.params.get("max_tokens")
        if isinstance(mt, int) and not isinstance(mt, bool) and mt > cap:
            raise p.ProtocolError(
                p.INVALID_PARAMS,
                f"{call.function}: max_tokens: {mt} is over this server's limit of {cap}",
            )
        self.tenant_limits(tenant).admit(tenant)  # a refused call costs no rate tokens
        return await self.runtime.call(tenant, call.function, call.params, on_event=on_event)

    async def _system(self, tenant: str, call: p.Call) -> dict[str, Any]:
        if call.function not in SYSTEM_FUNCTIONS:
            raise p.ProtocolError(p.UNKNOWN_FUNCTION, f"no function {call.function!r}")
        if call.params:
            raise p.ProtocolError(
                p.INVALID_PARAMS, f"{call.function}: takes no params (got {sorted(call.params)})"
            )
        if call.function == "system_health":
            return {
                "status": "shutting_down" if self.closing else "ok",
                "version": __version__,
                "protocol": p.PROTOCOL_VERSION,
                "uptime_seconds": round(time.monotonic() - self.started, 3),
                "connections": len(self.connections),
                "calls_in_flight": sum(len(c.calls) for c in self.connections),
            }
        if call.function == "system_models":
            models = []
            for n in self.runtime.registry.names():
                info = self.runtime.registry.get(n).info.as_dict()
                info["title"] = info.pop("name", None)  # the file's own name; "name" is ours
                models.append({"name": n, **info})
            return {"models": models}
        if call.function == "system_metrics":
            stats = self.runtime.statistics()
            return _finite(
                {
                    "batcher": attrs.asdict(stats.batcher),
                    "tenants": stats.tenants,
                    "connections": len(self.connections),
                }
            )
        # system_metadata: the guest's functions (its own metadata), then the host's
        functions = await self.runtime.functions(tenant)
        host = [
            {"name": n, "description": d, "params": {"type": "object", "properties": {}}}
            for n, d in SYSTEM_FUNCTIONS.items()
        ]
        return {
            "protocol": p.PROTOCOL_VERSION,
            "tenant": tenant,
            "models": self.runtime.registry.names(),
            "functions": list(functions) + host,
        }


def _finite(value: Any) -> Any:
    """JSON has no NaN: not-a-number figures (nothing measured yet) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _api_key(request: WebSocketRequest) -> str | None:
    """The API key of a handshake: ``Authorization: Bearer <key>``, or ``?api_key=<key>`` for
    browsers (which cannot set headers on a WebSocket)."""
    for name, value in request.headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    query = urllib.parse.urlsplit(request.path).query
    keys = urllib.parse.parse_qs(query).get("api_key")
    return keys[0] if keys else None


class _UncutStream(trio.abc.Stream):
    """A TCP stream that never writes after a write it left half done.

    A write cancelled part way (a close, or the send timeout, while the client reads nothing)
    leaves half a WebSocket frame on the wire; a close frame or ping written after it is read as
    garbage by the client (it saw 1007 instead of the close code). Once a write is cut, every
    later one fails with ``BrokenResourceError`` (trio-websocket then drops the connection);
    a write that was cancelled before sending anything is no harm and leaves the stream usable.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.cut = False
        try:
            host, port = stream.socket.getpeername()[:2]
            self._peer = f"{host}:{port}"
        except OSError:
            self._peer = "?"

    def __repr__(self) -> str:
        return self._peer

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

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
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
                await self._send(CloseConnection(event.code, _reason(event.reason or "")))
        await super()._handle_close_connection_event(event)


class _Server(trio_websocket.WebSocketServer):
    """trio-websocket's server with an error boundary around each connection: by default an
    exception in one connection's tasks (even a client closing mid-send) ends ``serve_listeners``
    and drops every other client."""

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        try:
            await self._serve_stream(stream)
        except Exception as e:
            if not isinstance(e, ConnectionClosed | trio.BrokenResourceError):
                log.warning("connection ended with %s: %s", type(e).__name__, e)
        finally:
            with contextlib.suppress(Exception):
                await trio.aclose_forcefully(stream)

    async def _serve_stream(self, stream: trio.abc.Stream) -> None:
        """``WebSocketServer._handle_connection`` of trio-websocket 0.12, with our connection
        class on an ``_UncutStream``."""
        assert isinstance(stream, trio.SocketStream)
        async with trio.open_nursery() as nursery:
            connection = _WebSocketConnection(
                _UncutStream(stream),  # type: ignore[arg-type]
                WSConnection(ConnectionType.SERVER),
                message_queue_size=self._message_queue_size,
                max_message_size=self._max_message_size,
                receive_buffer_size=self._receive_buffer_size,
            )
            nursery.start_soon(connection._reader_task)
            with trio.move_on_after(self._connect_timeout) as connect_scope:
                request = await connection._get_request()
            if connect_scope.cancelled_caught:
                nursery.cancel_scope.cancel()
                await stream.aclose()
                return
            try:
                await self._handler(request)
            finally:
                with trio.move_on_after(self._disconnect_timeout):
                    await connection.aclose()


class Connection:
    """One client connection (see the module docs)."""

    def __init__(self, server: Server, ws: WebSocketConnection, tenant: str) -> None:
        self.server = server
        self.ws = ws
        self.tenant = tenant
        self.limits = server.limits
        self.calls: dict[p.CallId, trio.CancelScope] = {}
        self._out_send, self._out_recv = trio.open_memory_channel[str](self.limits.outbound_queue)
        self._scope = trio.CancelScope()
        self._close: tuple[int, str] | None = None
        self._nursery: trio.Nursery | None = None

    # --- life cycle --------------------------------------------------------------------------

    async def run(self) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._keepalive)
                await self._reader()
                # the client went away (or we close): its calls are cancelled with it
                nursery.cancel_scope.cancel()
        code, reason = self._close or (1000, "")
        with trio.move_on_after(2.0) as cleanup:
            cleanup.shield = True
            with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError):
                await self.ws.aclose(code, _reason(reason))

    def close(self, code: int, reason: str) -> None:
        """End this connection: cancel its calls and close with ``code``."""
        if self._close is None:
            self._close = (code, reason)
            if code != 1000:
                log.info("closing connection (%d %s)", code, reason)
        self._scope.cancel()

    def send(self, text: str) -> bool:
        """Queue a message for the client; a full queue means a slow reader: close (1008)."""
        try:
            self._out_send.send_nowait(text)
            return True
        except trio.WouldBlock:
            self.close(1008, f"slow reader: {self.limits.outbound_queue} messages unread")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        return False

    async def _writer(self) -> None:
        async for text in self._out_recv:
            with trio.move_on_after(self.limits.send_timeout_seconds) as timer:
                try:
                    await self.ws.send_message(text)
                except ConnectionClosed:
                    self.close(1000, "")
                    return
            if timer.cancelled_caught:
                self.close(
                    1008, f"slow reader: no progress in {self.limits.send_timeout_seconds:g} s"
                )
                return

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(self.limits.ping_interval_seconds)
            with trio.move_on_after(self.limits.ping_timeout_seconds) as timer:
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    return
            if timer.cancelled_caught:
                self.close(1008, f"no pong within {self.limits.ping_timeout_seconds:g} s")
                return

    async def _reader(self) -> None:
        idle = self.limits.idle_timeout_seconds
        max_bytes = self.limits.max_message_bytes
        while True:
            with trio.move_on_after(idle) as timer:
                try:
                    message = await self.ws.get_message()
                except ConnectionClosed:
                    return
            if timer.cancelled_caught:
                if self.calls:
                    continue
                self.close(1000, f"idle for {idle:g} s")
                return
            if isinstance(message, bytes):
                self._refuse(
                    p.ProtocolError(p.INVALID_REQUEST, "binary frames are not part of protocol v1")
                )
                continue
            if len(message) * 4 > max_bytes and len(message.encode("utf-8")) > max_bytes:
                self.close(1009, f"message over {max_bytes} bytes")
                return
            try:
                msg = p.parse_message(message)
            except p.ProtocolError as e:
                self._refuse(e)
                continue
            if isinstance(msg, p.Cancel):
                scope = self.calls.get(msg.id)
                if scope is not None:  # a cancel for a call that already ended is a no-op
                    scope.cancel()
                continue
            self._start_call(msg)

    def _refuse(self, e: p.ProtocolError) -> None:
        self.server.metrics.protocol_errors.labels(e.code).inc()
        self.send(p.error_message(e.call_id, e.code, e.message))

    def _start_call(self, call: p.Call) -> None:
        if call.id in self.calls:
            self._refuse(
                p.ProtocolError(
                    p.INVALID_REQUEST,
                    f"field 'id': a call with id {call.id!r} is already in flight",
                    None,  # not that call's end: it goes on, and ends with its own reply
                )
            )
            return
        if call.tenant_id is not None and call.tenant_id != self.tenant:
            self._refuse(
                p.ProtocolError(
                    p.UNAUTHORIZED,
                    f"field 'tenant_id': {call.tenant_id!r} is not this connection's tenant",
                    call.id,
                )
            )
            return
        if len(self.calls) >= self.limits.max_calls_per_connection:
            self._refuse(
                p.ProtocolError(
                    p.OVERLOADED,
                    f"{len(self.calls)} calls in flight on this connection "
                    f"(limit {self.limits.max_calls_per_connection})",
                    call.id,
                )
            )
            return
        scope = trio.CancelScope()
        self.calls[call.id] = scope
        assert self._nursery is not None
        self._nursery.start_soon(self._run_call, call, scope)

    async def _run_call(self, call: p.Call, scope: trio.CancelScope) -> None:
        server, metrics, tenant = self.server, self.server.metrics, self.tenant
        t0 = last = time.perf_counter()
        n_tokens = 0
        # looked up once per call, not per token
        ttft, token_latency = metrics.ttft.labels(tenant), metrics.token_latency.labels(tenant)
        tokens, bucket = metrics.tokens.labels(tenant), server.tenant_limits(tenant).tokens

        def on_event(ev: Event) -> None:
            nonlocal last, n_tokens
            now = time.perf_counter()
            if n_tokens == 0:
                ttft.observe(now - t0)
            else:
                token_latency.observe(now - last)
            last = now
            n_tokens += 1
            tokens.inc()
            if bucket is not None:
                bucket.spend(1)
            if not self.send(p.stream_message(call.id, ev.data)):
                scope.cancel()

        code = message = None
        data: dict[str, Any] | None = None
        try:
            with scope:
                with trio.move_on_after(self.limits.call_timeout_seconds) as deadline:
                    data = await server.dispatch(tenant, call, on_event)
                if deadline.cancelled_caught:
                    code = p.TIMEOUT
                    message = f"the call took over {self.limits.call_timeout_seconds:g} s"
            if scope.cancelled_caught:
                code, message = p.CANCELLED, "cancelled by the client"
        except p.ProtocolError as e:
            code, message = e.code, str(e)
        except RealmError as e:
            code, message = e.code, str(e)
        except Exception:
            log.exception("call %r (%s) of tenant %r failed", call.id, call.function, tenant)
            code, message = p.INTERNAL, "internal error (logged on the server)"
        finally:
            self.calls.pop(call.id, None)
        if code is None:
            assert data is not None
            try:
                text = p.result_message(call.id, _finite(data))
            except (TypeError, ValueError) as e:
                log.error("call %r: result is not JSON: %s", call.id, e)
                code, message = p.INTERNAL, "the result could not be encoded"
            else:
                self.send(text)
        if code is not None:
            if code not in p.ERROR_CODES:
                code = p.INTERNAL
            metrics.errors.labels(tenant, call.function, code).inc()
            self.send(p.error_message(call.id, code, message or code))
        outcome = "ok" if code is None else code.lower()
        metrics.calls.labels(tenant, call.function, outcome).inc()
        metrics.call_seconds.labels(tenant, call.function).observe(time.perf_counter() - t0)


def runtime_limits(config: ServerConfig) -> RuntimeLimits:
    """The runtime's limits for a server: every tenant's concurrent calls get a worker thread
    (a call holds its thread while it waits for its forward steps)."""
    if config.tenants is None:
        t = config.open_tenant
        slots = t.max_concurrent_calls
        return RuntimeLimits(
            shutdown_seconds=config.limits.shutdown_seconds,
            max_concurrent_calls=t.max_concurrent_calls,
            max_queued_calls=t.max_queued_calls,
            threads=slots + 4,
        )
    slots = sum(t.max_concurrent_calls for t in config.tenants.values())
    return RuntimeLimits(
        shutdown_seconds=config.limits.shutdown_seconds, threads=min(slots, 512) + 4
    )


@contextlib.asynccontextmanager
async def open_server(config: ServerConfig) -> AsyncIterator[Server]:
    """Run a server in the background of the ``async with`` block (port 0 picks a free port:
    read ``server.port`` / ``server.url``). Leaving the block shuts it down gracefully."""
    tenants = (
        None
        if config.tenants is None
        else {n: spec.runtime_spec() for n, spec in config.tenants.items()}
    )
    async with open_runtime(
        models=config.models, tenants=tenants, limits=runtime_limits(config)
    ) as rt:
        server = Server(config, rt)
        with single_error():  # an error of the caller's block comes out as itself
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                try:
                    yield server
                finally:
                    with trio.CancelScope(shield=True):
                        await server.shutdown()
                    nursery.cancel_scope.cancel()


async def serve(config: ServerConfig, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (the CLI's ``realm serve``)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_server(config) as server:
            task_status.started(server)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                break
