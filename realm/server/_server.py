"""The WebSocket server: protocol v1 in front of the actor runtime.

One ``Server`` owns a listener (``_transport.WebSocketTransport``), a runtime and the
connections (``_connection.Connection``). Before a handshake is accepted its Host and Origin
are checked (``_access``: no web page the user visits can drive the server), then its API key,
with failed logins logged, counted and throttled per client address. A plain HTTP request on
the same port gets ``GET /health``, ``GET /ready``, the OpenAI-compatible API under ``/v1/``
(``_openai``, docs/http.md), the playground's files (``_static``), or a 400/404 that says what
the port speaks.

A tenant sees only itself: the system functions answer with the caller's own figures, and
every error message a client gets is stripped of host paths (``public_message``).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import logging
import math
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest

from .. import __version__
from .._errors import ProtocolError, RealmError
from .._protocol import (
    PROTOCOL_VERSION,
    SERVER_HEADER,
    SHUTDOWN_REASON,
    UNAUTHORIZED_REASON,
    Call,
    CloseCode,
    ErrorCode,
)
from .._util import single_error
from ..actors import Event, Runtime, RuntimeLimits, open_runtime
from ._access import AccessPolicy, LoginThrottle, chosen_subprotocol, credentials, is_loopback_name
from ._config import OPEN_TENANT, ConfigError, ServerConfig, TenantSpec, proxy_networks
from ._connection import Connection, Tally, finite
from ._http import RESPONSE_HEADERS, HttpRequest, HttpResponse, text_response
from ._jobs import Jobs
from ._limits import TokenBucket
from ._metrics import UNKNOWN_FUNCTION_LABEL, ServerMetrics, serve_metrics
from ._openai import HttpCalls, OpenAIError
from ._openai import handle as handle_openai
from ._static import static_response
from ._transport import UncutStream, WebSocketTransport

log = logging.getLogger("realm.server")

SYSTEM_FUNCTIONS: Final = {
    "system_metadata": "The functions this tenant can call: name, description, JSON-schema "
    "params (from the guest's own metadata), and these system functions.",
    "system_health": "Liveness and this tenant's load: status, uptime, its connections and "
    "calls in flight.",
    "system_models": "The models served: name, architecture, sizes, context length.",
    "system_metrics": "This tenant's statistics as JSON: calls, errors, tokens, sessions; and "
    "the shared batch scheduler's totals.",
}
MESSAGE_QUEUE: Final = 8  # messages trio-websocket buffers before its reader waits on ours
MAX_FUNCTION_LABELS: Final = 64  # per tenant: functions past these are counted as unknown
CANCEL_SECONDS: Final = 3.0  # at shutdown, cancelled calls get this long to send their errors
CLOSE_SECONDS: Final = 3.0  # then connections get this long to close
#: what a plain HTTP request to the WebSocket port is told
PORT_SPEAKS: Final = (
    "This port speaks Realm protocol v1 over WebSocket: connect a WebSocket client to "
    "ws://{host}/ (any path; docs/protocol.md). Plain HTTP: GET /health, GET /ready, the "
    "OpenAI-compatible API under /v1/ (docs/http.md) and the playground at GET /.\n"
)
# an absolute path (two or more components) not part of a word, a URL or a relative path
_ABS_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"/:,;()\[\]{}<>]+/)+[^\s'\"/:,;()\[\]{}<>]*")


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
        """Take a call from the buckets, or raise RATE_LIMITED with ``retry_after``."""
        if self.tokens is not None and not self.tokens.available():
            wait = _retry_after(self.tokens.seconds_until_available())
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"tenant {tenant!r} is over its token rate ({self.tokens.rate:g} tokens/s); "
                f"retry in {wait:g} s",
                retry_after=wait,
            )
        if self.calls is not None and not self.calls.take():
            wait = _retry_after(self.calls.seconds_until(1.0))
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"tenant {tenant!r} is over its call rate ({self.calls.rate:g} calls/s); "
                f"retry in {wait:g} s",
                retry_after=wait,
            )


def _is_in(address: str, networks: tuple[Any, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in n for n in networks)


def _retry_after(seconds: float) -> float:
    """Seconds rounded up to the millisecond (a retry that waits this long is admitted)."""
    return max(0.001, math.ceil(seconds * 1000) / 1000)


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
        self.started_wall = time.time()
        self.http_calls = HttpCalls()  # OpenAI API calls and jobs in flight (_openai)
        self.jobs = Jobs(self)  # HTTP jobs (_jobs), run in ``run``'s nursery
        self.closing = False
        self.connections: set[Connection] = set()
        self.calls_in_flight = Tally()
        self.open_connections = Tally()
        self.policy = AccessPolicy(
            config.allowed_origins, config.allowed_hosts, is_loopback_name(config.host)
        )
        lim = config.limits
        self.throttle = LoginThrottle(
            lim.auth_failures_allowed, lim.auth_backoff_seconds, lim.auth_backoff_max_seconds
        )
        specs = config.tenants or {}
        self._tenant_limits = {name: _TenantLimits(spec) for name, spec in specs.items()}
        self._open_limits = _TenantLimits(None)
        self._functions: dict[str, frozenset[str]] = {}  # per tenant: its labelled functions
        self._paths = self._known_paths()
        self._serving = trio.CancelScope()
        self._shut_down = trio.Event()
        self._proxies = proxy_networks("trusted_proxies", list(config.trusted_proxies))
        self._admitted = 0  # connections past the max_connections check, handshaking or open

    @property
    def server_id(self) -> str:
        """This server's name (``X-Realm-Server``, ``/health``, ``system_health``): the
        config's ``server_id``, else the machine's host name and the port."""
        return self.config.server_id or f"{socket.gethostname()}:{self.port}"

    @property
    def url(self) -> str:
        host = self.config.host
        return f"ws://{'[' + host + ']' if ':' in host else host}:{self.port}"

    # --- serving ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled (``shutdown`` ends it gracefully)."""
        if self.config.open and not is_loopback_name(self.config.host):
            raise ConfigError(
                f"server.host (--host): {self.config.host!r} is not a loopback address: a "
                "server without [tenants] (no API keys) listens on 127.0.0.1, localhost or ::1 "
                "only"
            )
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        self.port = listeners[0].socket.getsockname()[1]
        transport = WebSocketTransport(
            self._handle_websocket,
            self._handle_http,
            message_queue_size=MESSAGE_QUEUE,
            # trio-websocket counts characters of text frames: the byte limit is checked again
            # on each message; a character is at most 4 bytes, so memory stays bounded
            max_message_size=self.limits.max_message_bytes,
            handshake_timeout=self.limits.handshake_timeout_seconds,
            disconnect_timeout=2.0,
            send_timeout=self.limits.send_timeout_seconds,
        )
        # every response of this server names it (inherited by the tasks started below)
        RESPONSE_HEADERS.set(((SERVER_HEADER, self.server_id),))
        async with trio.open_nursery() as nursery:
            self.jobs.nursery = nursery
            if self.config.metrics_port is not None:
                metrics = functools.partial(
                    serve_metrics, self.metrics, policy=self.policy,
                    send_timeout=self.limits.send_timeout_seconds,
                )  # fmt: skip
                self.metrics_port = await nursery.start(
                    metrics, self.config.host, self.config.metrics_port
                )
            with self._serving:
                await nursery.start(transport.run, listeners)
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
        """Stop accepting; let calls in flight finish (``shutdown_seconds``); cancel those
        still running, each ending with a CANCELLED error; then close every connection with
        1001 once what it was sent is written."""
        if self.closing:  # shutting down already: done when that is
            await self._shut_down.wait()
            return
        self.closing = True
        try:
            await self._shutdown()
        finally:
            self._shut_down.set()

    async def _shutdown(self) -> None:
        log.info(
            "shutting down: %d connections, %d calls in flight",
            len(self.connections), self.calls_in_flight.value,
        )  # fmt: skip
        # draining: a connection with nothing in flight goes now (1001), one with calls as soon
        # as its calls end (``Connection``), so its client reconnects, through a balancer, to
        # another server rather than sending this one calls it would refuse
        for conn in list(self.connections):
            if not conn.calls:
                conn.close_when_sent(CloseCode.GOING_AWAY, "server shutting down")
        with trio.move_on_after(self.limits.shutdown_seconds):
            await self.calls_in_flight.wait_zero()
        if self.calls_in_flight.value:
            log.info("cancelling %d calls still running", self.calls_in_flight.value)
            for conn in list(self.connections):
                conn.cancel_calls(SHUTDOWN_REASON)
            self.http_calls.cancel(SHUTDOWN_REASON)
            with trio.move_on_after(CANCEL_SECONDS):
                await self.calls_in_flight.wait_zero()
        for conn in list(self.connections):
            conn.close_when_sent(CloseCode.GOING_AWAY, "server shutting down")
        with trio.move_on_after(CLOSE_SECONDS):
            await self.open_connections.wait_zero()
        for conn in list(self.connections):  # past the wait: a client that reads nothing
            conn.close(CloseCode.GOING_AWAY, "server shutting down")
        self._serving.cancel()

    # --- admission -----------------------------------------------------------------------------

    def _client(self, head: HttpRequest) -> HttpRequest:
        """``head`` with ``peer`` the client's address: behind a trusted balancer
        (``trusted_proxies``), the last address of ``X-Forwarded-For`` that is not one."""
        if not self._proxies or not _is_in(head.peer, self._proxies):
            return head
        peer = head.peer
        for hop in reversed(head.header_values("x-forwarded-for")):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break  # not written by a balancer: the last trusted hop stands for the client
            peer = hop
            if not _is_in(hop, self._proxies):
                break
        return attrs.evolve(head, peer=peer)

    async def _handle_websocket(self, request: WebSocketRequest, head: HttpRequest) -> None:
        """One connection, from handshake to close. Never raises (the error boundary)."""
        head = self._client(head)
        try:
            await self._handle_request(request, head)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("connection from %s failed", head.peer)

    async def _refuse(
        self,
        request: WebSocketRequest,
        status: int,
        why: str,
        reason: str,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Refuse a handshake with HTTP ``status``, counted under ``reason``."""
        self.metrics.refused.labels(reason).inc()
        extra = [(k.encode(), v.encode()) for k, v in (*headers, *RESPONSE_HEADERS.get())]
        await request.reject(status, extra_headers=extra, body=f"{why}\n".encode())

    async def _handle_request(self, request: WebSocketRequest, head: HttpRequest) -> None:
        if self.closing:
            await self._refuse(request, 503, "the server is shutting down", "shutting_down")
            return
        # counted from admission, not once accepted: handshakes in progress hold a slot too
        # (else a burst of simultaneous handshakes all pass the check)
        if self._admitted >= self.limits.max_connections:
            await self._refuse(request, 503, "too many connections", "capacity")
            return
        refusal = self.policy.refusal(head)
        if refusal is not None:
            log.warning("refused a handshake from %s: %s", head.peer, refusal)
            await self._refuse(request, 403, refusal, "forbidden")
            return
        self._admitted += 1
        try:
            await self._admit(request, head)
        finally:
            self._admitted -= 1

    async def _admit(self, request: WebSocketRequest, head: HttpRequest) -> None:
        tenant: str | None = OPEN_TENANT
        if not self.config.open:
            wait = self.throttle.blocked_for(head.peer)
            if wait > 0:
                seconds = math.ceil(wait)
                await self._refuse(
                    request, 429,
                    f"too many failed logins from this address; retry in {seconds} s",
                    "throttled", (("Retry-After", str(seconds)),),
                )  # fmt: skip
                return
            creds = credentials(head)
            tenant = self.config.tenant_for_key(creds.key)
            if tenant is None:
                self._login_failed(head.peer, creds.via)
            else:
                self.throttle.succeeded(head.peer)
        ws = await request.accept(
            subprotocol=chosen_subprotocol(head),
            extra_headers=[(k.encode(), v.encode()) for k, v in RESPONSE_HEADERS.get()],
        )
        if tenant is None:
            await ws.aclose(CloseCode.POLICY, UNAUTHORIZED_REASON)
            return
        conn = Connection(self, ws, tenant)
        self.connections.add(conn)
        self.open_connections.add()
        self.metrics.connections.inc()
        self.metrics.connections_total.inc()
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self.open_connections.remove()
            self.metrics.connections.dec()

    def _login_failed(self, peer: str, via: str) -> None:
        """Log (never the key), count, and throttle a failed login from ``peer``."""
        reason = "missing_key" if via == "none" else "unknown_key"
        self.metrics.auth_failures.labels(reason).inc()
        n = self.throttle.failed(peer)
        blocked = self.throttle.blocked_for(peer)
        log.warning(
            "failed login from %s: %s (%d in a row)%s",
            peer,
            "no API key" if via == "none" else f"unknown API key (from the {via})",
            n,
            f"; its handshakes are refused for {blocked:.1f} s" if blocked else "",
        )

    # --- plain HTTP ----------------------------------------------------------------------------

    async def _handle_http(self, request: HttpRequest, wire: UncutStream) -> HttpResponse | None:
        request = self._client(request)
        refusal = self.policy.refusal(request)
        if refusal is not None:
            self.metrics.refused.labels("forbidden").inc()
            if request.path.startswith("/v1/"):
                return OpenAIError(403, refusal, code="forbidden").response()
            return text_response(403, f"403: {refusal}\n")
        if request.path.startswith("/v1/"):
            if self.closing:
                return OpenAIError(503, SHUTDOWN_REASON, code="shutting_down").response()
            return await handle_openai(self, request, wire)
        if request.path == "/ready":
            ready = not self.closing and bool(self.runtime.registry.names())
            body = {
                "status": "ready" if ready else "shutting_down" if self.closing else "loading",
                "server": self.server_id,
            }
            return HttpResponse(
                200 if ready else 503, (json.dumps(body) + "\n").encode(), "application/json"
            )
        speaks = PORT_SPEAKS.format(host=request.header("host") or "HOST:PORT")
        if request.path == "/health":
            if request.method != "GET":
                return text_response(405, f"405: GET only.\n{speaks}", (("Allow", "GET"),))
            health = {
                "status": "shutting_down" if self.closing else "ok",
                "server": self.server_id,
                "version": __version__,
                "protocol": PROTOCOL_VERSION,
                "models": self.runtime.registry.names(),
                "uptime_seconds": round(time.monotonic() - self.started, 3),
            }
            body = (json.dumps(health) + "\n").encode()
            return HttpResponse(503 if self.closing else 200, body, "application/json")
        if request.method == "GET":
            page = static_response(request.path)
            if page is not None:
                return page
        if request.path == "/":
            return text_response(400, f"400: not a WebSocket handshake.\n{speaks}")
        return text_response(404, f"404: no such page.\n{speaks}")

    # --- what a tenant sees --------------------------------------------------------------------

    def _known_paths(self) -> list[tuple[str, str]]:
        """(absolute path, what a client is told instead), longest first: model files by
        their registry names, guest modules, the built-in files' directory."""
        from ..model import default_model_path

        paths = [(path, f"model {name!r}") for name, path in self.config.models.items()]
        for spec in (self.config.tenants or {}).values():
            if spec.guest:
                paths.append((spec.guest, "<guest module>"))
        paths.append((str(default_model_path().parent.parent.parent), "<realm>"))
        return sorted(paths, key=lambda p: -len(p[0]))

    def public_message(self, message: str) -> str:
        """``message`` as a client may see it: no absolute host path (model files are named by
        their registry names, anything else becomes ``<path>``)."""
        for path, name in self._paths:
            message = message.replace(path, name)
        return _ABS_PATH.sub("<path>", message)

    async def function_label(self, tenant: str, function: str) -> str:
        """The metrics label of a call's function: its name if the tenant can call it (a
        system function, or one its guest exports), else ``<unknown>``."""
        if function in SYSTEM_FUNCTIONS:
            return function
        known = self._functions.get(tenant)
        if known is None:
            try:
                found = await self.runtime.functions(tenant)
            except RealmError:
                return UNKNOWN_FUNCTION_LABEL  # the tenant cannot run now: learnt next time
            names = [f.get("name") for f in found if isinstance(f, dict)]
            known = frozenset(n for n in names[:MAX_FUNCTION_LABELS] if isinstance(n, str))
            self._functions[tenant] = known
        return function if function in known else UNKNOWN_FUNCTION_LABEL

    def tenant_limits(self, tenant: str) -> _TenantLimits:
        return self._tenant_limits.get(tenant, self._open_limits)

    # --- dispatch ----------------------------------------------------------------------------

    async def dispatch(
        self, tenant: str, call: Call, on_event: Callable[[Event], None]
    ) -> dict[str, Any]:
        if call.function.startswith("system_"):
            return await self._system(tenant, call)
        if self.closing:
            raise ProtocolError(ErrorCode.OVERLOADED, SHUTDOWN_REASON)
        cap = self.limits.max_tokens
        mt = call.params.get("max_tokens")
        if isinstance(mt, int) and not isinstance(mt, bool) and mt > cap:
            raise ProtocolError(
                ErrorCode.INVALID_PARAMS,
                f"{call.function}: max_tokens: {mt} is over this server's limit of {cap}",
            )
        self.tenant_limits(tenant).admit(tenant)  # a refused call costs no rate tokens
        return await self.runtime.call(tenant, call.function, call.params, on_event=on_event)

    def _own(self, tenant: str) -> tuple[int, int]:
        """The tenant's open connections and calls in flight (no other tenant's)."""
        conns = [c for c in self.connections if c.tenant == tenant]
        return len(conns), sum(len(c.calls) for c in conns)

    async def _system(self, tenant: str, call: Call) -> dict[str, Any]:
        if call.function not in SYSTEM_FUNCTIONS:
            raise ProtocolError(ErrorCode.UNKNOWN_FUNCTION, f"no function {call.function!r}")
        if call.params:
            raise ProtocolError(
                ErrorCode.INVALID_PARAMS,
                f"{call.function}: takes no params (got {sorted(call.params)})",
            )
        if call.function == "system_health":
            connections, calls = self._own(tenant)
            return {
                "status": "shutting_down" if self.closing else "ok",
                "server": self.server_id,
                "version": __version__,
                "protocol": PROTOCOL_VERSION,
                "uptime_seconds": round(time.monotonic() - self.started, 3),
                "connections": connections,
                "calls_in_flight": calls,
            }
        if call.function == "system_models":
            models = []
            for n in self.runtime.registry.names():
                info = self.runtime.registry.get(n).info.as_dict()
                info.pop("path", None)  # a host path: the model's name is its registry name
                info["title"] = info.pop("name", None)  # the file's own name; "name" is ours
                models.append({"name": n, **info})
            return {"models": models}
        if call.function == "system_metrics":
            connections, _ = self._own(tenant)
            return finite(
                {
                    "tenant": tenant,
                    **self.runtime.tenant_statistics(tenant),
                    "connections": connections,
                    "batcher": attrs.asdict(self.runtime.statistics().batcher),
                }
            )
        # system_metadata: the guest's functions (its own metadata), then the host's
        functions = await self.runtime.functions(tenant)
        host = [
            {"name": n, "description": d, "params": {"type": "object", "properties": {}}}
            for n, d in SYSTEM_FUNCTIONS.items()
        ]
        return {
            "protocol": PROTOCOL_VERSION,
            "tenant": tenant,
            "models": self.runtime.registry.names(),
            "functions": list(functions) + host,
        }


def runtime_limits(config: ServerConfig) -> RuntimeLimits:
    """The runtime's limits for a server: every tenant's concurrent calls get a worker thread
    (a call holds its thread while it waits for its forward steps)."""
    idle = config.limits.tenant_idle_seconds
    if config.tenants is None:
        t = config.open_tenant
        return RuntimeLimits(
            shutdown_seconds=config.limits.shutdown_seconds,
            max_concurrent_calls=t.max_concurrent_calls,
            max_queued_calls=t.max_queued_calls,
            threads=t.max_concurrent_calls + 4,
            idle_seconds=idle,
        )
    slots = sum(t.max_concurrent_calls for t in config.tenants.values())
    return RuntimeLimits(
        shutdown_seconds=config.limits.shutdown_seconds,
        threads=min(slots, 512) + 4,
        idle_seconds=idle,
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
    models: dict[str, Any] = dict(config.models)
    if config.device != "cpu":  # loaded here so that the runtime shares them as they are
        from ..model import ModelRegistry

        registry = ModelRegistry(device=config.device, max_resident_bytes=config.max_resident_bytes)
        for name, path in config.models.items():
            registry.load(name, path)
        models = {name: registry.get(name) for name in config.models}
    budget = config.max_resident_bytes if config.device == "cpu" else None  # else: loaded above
    async with open_runtime(
        models=models,
        tenants=tenants,
        limits=runtime_limits(config),
        max_resident_bytes=budget,
        pack=config.pack_weights,
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
