"""One client connection: its reader, writer and keepalive tasks, and its calls.

Each call in flight is a task (multiplexed by ``id``) that ends with exactly one ``result`` or
``error``. Everything the connection sends goes through one bounded outbound queue written by
its writer task: a call that finds the queue full, or a write that makes no progress for
``send_timeout_seconds``, closes the connection with 1008 and cancels its calls, so a slow
reader never stalls anyone else. A disconnect cancels the connection's calls (their guests stop
within one forward step and their sessions are freed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .._errors import ProtocolError, RealmError
from .._protocol import (
    Call,
    CallId,
    Cancel,
    CloseCode,
    ErrorCode,
    error_message,
    parse_message,
    result_message,
    stream_message,
)
from ..actors import Event
from ._transport import close_reason

if TYPE_CHECKING:
    from ._server import Server

log = logging.getLogger("realm.server")

CANCELLED_BY_CLIENT = "cancelled by the client"


class Tally:
    """A count, and a way to wait until it is zero (rather than polling it)."""

    def __init__(self) -> None:
        self.value = 0
        self._zero = trio.Event()
        self._zero.set()

    def add(self) -> None:
        self.value += 1
        if self._zero.is_set():
            self._zero = trio.Event()

    def remove(self) -> None:
        self.value -= 1
        if self.value == 0:
            self._zero.set()

    async def wait_zero(self) -> None:
        while self.value:
            await self._zero.wait()


@attrs.define(eq=False)
class _CallState:
    scope: trio.CancelScope
    reason: str = CANCELLED_BY_CLIENT  # the CANCELLED message, if it is cancelled


def finite(value: Any) -> Any:
    """JSON has no NaN: not-a-number figures (nothing measured yet) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


class Connection:
    """One client connection of ``tenant`` (see the module docs)."""

    def __init__(self, server: Server, ws: WebSocketConnection, tenant: str) -> None:
        self.server = server
        self.ws = ws
        self.tenant = tenant
        self.limits = server.limits
        self.calls: dict[CallId, _CallState] = {}
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
        code, reason = self._close or (CloseCode.NORMAL, "")
        with trio.move_on_after(2.0) as cleanup:
            cleanup.shield = True
            with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError):
                await self.ws.aclose(code, close_reason(reason))

    def close(self, code: int, reason: str) -> None:
        """End this connection now: cancel its calls and close with ``code``."""
        if self._close is None:
            self._close = (code, reason)
            if code != CloseCode.NORMAL:
                log.info("closing connection (%d %s)", code, reason)
        self._scope.cancel()

    def cancel_calls(self, reason: str) -> None:
        """Cancel every call in flight; each ends with a CANCELLED error saying ``reason``."""
        for state in self.calls.values():
            state.reason = reason
            state.scope.cancel()

    def close_when_sent(self, code: int, reason: str) -> None:
        """Send what is queued (no more is accepted), then close with ``code``."""
        if self._close is None:
            self._close = (code, reason)
        self._out_send.close()  # the writer ends the connection once the queue is empty

    def send(self, text: str) -> bool:
        """Queue a message for the client; a full queue means a slow reader: close (1008)."""
        try:
            self._out_send.send_nowait(text)
            return True
        except trio.WouldBlock:
            self.close(
                CloseCode.POLICY, f"slow reader: {self.limits.outbound_queue} messages unread"
            )
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        return False

    async def _writer(self) -> None:
        async for text in self._out_recv:
            with trio.move_on_after(self.limits.send_timeout_seconds) as timer:
                try:
                    await self.ws.send_message(text)
                except ConnectionClosed:
                    self.close(CloseCode.NORMAL, "")
                    return
            if timer.cancelled_caught:
                self.close(
                    CloseCode.POLICY,
                    f"slow reader: no progress in {self.limits.send_timeout_seconds:g} s",
                )
                return
        # the queue was closed and is empty (close_when_sent): close as asked
        self._scope.cancel()

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(self.limits.ping_interval_seconds)
            with trio.move_on_after(self.limits.ping_timeout_seconds) as timer:
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    return
            if timer.cancelled_caught:
                self.close(
                    CloseCode.POLICY, f"no pong within {self.limits.ping_timeout_seconds:g} s"
                )
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
                self.close(CloseCode.NORMAL, f"idle for {idle:g} s")
                return
            if isinstance(message, bytes):
                self._refuse(
                    ProtocolError(
                        ErrorCode.INVALID_REQUEST, "binary frames are not part of protocol v1"
                    )
                )
                continue
            if len(message) * 4 > max_bytes and len(message.encode("utf-8")) > max_bytes:
                self.close(CloseCode.TOO_BIG, f"message over {max_bytes} bytes")
                return
            try:
                msg = parse_message(message)
            except ProtocolError as e:
                self._refuse(e)
                continue
            if isinstance(msg, Cancel):
                state = self.calls.get(msg.id)
                if state is not None:  # a cancel for a call that already ended is a no-op
                    state.scope.cancel()
                continue
            self._start_call(msg)

    def _refuse(self, e: ProtocolError) -> None:
        self.server.metrics.protocol_errors.labels(e.code).inc()
        self.send(error_message(e.call_id, e.code, self.server.public_message(e.message)))

    def _start_call(self, call: Call) -> None:
        if call.id in self.calls:
            self._refuse(
                ProtocolError(
                    ErrorCode.INVALID_REQUEST,
                    f"field 'id': a call with id {call.id!r} is already in flight",
                    None,  # not that call's end: it goes on, and ends with its own reply
                )
            )
            return
        if call.tenant_id is not None and call.tenant_id != self.tenant:
            self._refuse(
                ProtocolError(
                    ErrorCode.UNAUTHORIZED,
                    f"field 'tenant_id': {call.tenant_id!r} is not this connection's tenant",
                    call.id,
                )
            )
            return
        if len(self.calls) >= self.limits.max_calls_per_connection:
            self._refuse(
                ProtocolError(
                    ErrorCode.OVERLOADED,
                    f"{len(self.calls)} calls in flight on this connection "
                    f"(limit {self.limits.max_calls_per_connection})",
                    call.id,
                )
            )
            return
        state = _CallState(trio.CancelScope())
        self.calls[call.id] = state
        self.server.calls_in_flight.add()
        assert self._nursery is not None
        self._nursery.start_soon(self._run_call, call, state)

    async def _run_call(self, call: Call, state: _CallState) -> None:
        try:
            await self._call(call, state)
        finally:
            self.calls.pop(call.id, None)
            self.server.calls_in_flight.remove()
            if self.server.closing and not self.calls:  # draining: its last call has ended
                self.close_when_sent(CloseCode.GOING_AWAY, "server shutting down")

    async def _call(self, call: Call, state: _CallState) -> None:
        server, metrics, tenant, scope = self.server, self.server.metrics, self.tenant, state.scope
        t0 = last = time.perf_counter()
        n_tokens = 0
        done = False
        # looked up once per call, not per token
        ttft, token_latency = metrics.ttft.labels(tenant), metrics.token_latency.labels(tenant)
        tokens, bucket = metrics.tokens.labels(tenant), server.tenant_limits(tenant).tokens

        def on_event(ev: Event) -> None:
            nonlocal last, n_tokens
            if done:  # nothing after a call's final message
                return
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
            if not self.send(stream_message(call.id, ev.data)):
                scope.cancel()

        function = await server.function_label(tenant, call.function)
        code: ErrorCode | None = ErrorCode.CANCELLED  # unless it ends otherwise (below)
        message = ""
        retry_after: float | None = None
        data: dict[str, Any] | None = None
        try:
            try:
                with scope:
                    with trio.move_on_after(self.limits.call_timeout_seconds) as deadline:
                        data = await server.dispatch(tenant, call, on_event)
                code = None
                if deadline.cancelled_caught:
                    code = ErrorCode.TIMEOUT
                    message = f"the call took over {self.limits.call_timeout_seconds:g} s"
                if scope.cancelled_caught:
                    code, message = ErrorCode.CANCELLED, state.reason
            except ProtocolError as e:
                code, message, retry_after = e.code, e.message, e.retry_after
            except RealmError as e:
                code, message = e.code, str(e)
            except Exception:
                log.exception("call %r (%s) of tenant %r failed", call.id, call.function, tenant)
                code, message = ErrorCode.INTERNAL, "internal error (logged on the server)"
            done = True
            if code is None:
                assert data is not None
                try:
                    text = result_message(call.id, finite(data))
                except (TypeError, ValueError) as e:
                    log.error("call %r: result is not JSON: %s", call.id, e)
                    code, message = ErrorCode.INTERNAL, "the result could not be encoded"
                else:
                    self.send(text)
            if code is not None:
                code = ErrorCode(code) if code in set(ErrorCode) else ErrorCode.INTERNAL
                self.send(
                    error_message(
                        call.id, code, server.public_message(message or code),
                        retry_after=retry_after,
                    )
                )  # fmt: skip
        finally:
            # also for a call cut off with its connection (no reply can reach the client then):
            # counted as cancelled
            if code is not None:
                metrics.errors.labels(tenant, function, code).inc()
            metrics.calls.labels(tenant, function, "ok" if code is None else code.lower()).inc()
            metrics.call_seconds.labels(tenant, function).observe(time.perf_counter() - t0)
