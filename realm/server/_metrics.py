"""Server metrics (prometheus-client) and the HTTP endpoint that exposes them.

Counters and histograms are updated by the server as calls happen; the runtime's own figures
(batch sizes, queues, pager hits) are read from ``Runtime.statistics()`` when scraped. Each
server has its own registry, so several servers in one process (tests) do not mix their
figures.

No label value is ever a string a client chose: tenants are the configured names, codes and
outcomes come from ``ErrorCode``, and a function is labelled by its name only if the tenant
can call it (a system function, or one its guest exports), else ``<unknown>``
(``UNKNOWN_FUNCTION_LABEL``); so no client can grow the page. The page is rendered in a worker
thread (the runtime's figures are read on the event loop first), one scrape at a time, so a
scrape never stalls anyone's tokens; it is sent whole or the failure is logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ._access import AccessPolicy
from ._http import BadRequest, HttpResponse, read_request, send_response, text_response

if TYPE_CHECKING:
    from ..actors import Runtime

log = logging.getLogger("realm.server")

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN_FUNCTION_LABEL: Final = "<unknown>"  # every function a tenant cannot call
REQUEST_SECONDS: Final = 5.0  # a scrape's request head must arrive within this
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _RuntimeCollector(Collector):
    """The runtime's figures, from a snapshot taken on the event loop before each render (the
    render runs in a worker thread, which must not read the runtime's Trio-owned state)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.snapshot: list[Any] = []

    def take_snapshot(self) -> None:
        stats = self.runtime.statistics()
        b = stats.batcher
        out: list[Any] = [
            CounterMetricFamily("realm_batch_steps", "Batched forward steps run", value=b.steps),
            CounterMetricFamily(
                "realm_batch_sequences", "Sequence-steps run in batched steps", value=b.sequences
            ),
            GaugeMetricFamily(
                "realm_batch_size_mean",
                "Mean sequences per batched step",
                value=0.0 if math.isnan(b.mean_batch_size) else b.mean_batch_size,
            ),
            GaugeMetricFamily("realm_batch_queue", "Forward steps waiting", value=b.queued),
        ]
        sessions = GaugeMetricFamily("realm_tenant_sessions", "Open sessions", labels=["tenant"])
        inflight = GaugeMetricFamily("realm_tenant_calls_in_flight", "Calls", labels=["tenant"])
        for name, t in stats.tenants.items():
            sessions.add_metric([name], t.get("sessions", 0))
            inflight.add_metric([name], t.get("in_flight", 0))
        pager: list[Any] = []
        for family, help_text, field in _PAGER_FIGURES:
            metric = family(f"realm_pager_{field}", help_text, labels=["model"])
            for name, ps in getattr(stats, "models", {}).items():
                metric.add_metric([name], getattr(ps, field))
            pager.append(metric)
        self.snapshot = [*out, sessions, inflight, *pager]

    def collect(self) -> Iterator[Any]:
        yield from self.snapshot


#: each paged model's layer pager figures (PagerStatistics fields), labelled by model
_PAGER_FIGURES: Final = (
    (CounterMetricFamily, "Layer pager acquires that found the block resident", "hits"),
    (CounterMetricFamily, "Layer pager acquires that paged the block in", "misses"),
    (CounterMetricFamily, "Layer pager prefetches started", "prefetches"),
    (CounterMetricFamily, "Acquires served by a finished prefetch", "prefetch_hits"),
    (CounterMetricFamily, "Blocks evicted under the budget", "evictions"),
    (CounterMetricFamily, "Tensor bytes made resident", "bytes_paged"),
    (GaugeMetricFamily, "This model's resident blocks in bytes", "resident_bytes"),
    (GaugeMetricFamily, "Resident bytes outside the budget (header, output)", "fixed_bytes"),
    (GaugeMetricFamily, "The budget the model pages under", "max_resident_bytes"),
    (GaugeMetricFamily, "Resident bytes of every model under the budget", "budget_resident_bytes"),
)


class ServerMetrics:
    def __init__(self, runtime: Runtime | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter(
            "realm_calls", "Calls finished", ["tenant", "function", "outcome"], registry=r
        )
        self.errors = Counter(
            "realm_errors", "Calls that ended in an error", ["tenant", "function", "code"],
            registry=r,
        )  # fmt: skip
        self.tokens = Counter("realm_tokens", "Tokens streamed", ["tenant"], registry=r)
        self.ttft = Histogram(
            "realm_time_to_first_token_seconds", "Time to first token", ["tenant"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.token_latency = Histogram(
            "realm_token_latency_seconds", "Time between streamed tokens", ["tenant"],
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.call_seconds = Histogram(
            "realm_call_seconds", "Call duration", ["tenant", "function"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.connections = Gauge("realm_connections", "Open WebSocket connections", registry=r)
        self.connections_total = Counter(
            "realm_connections_accepted", "WebSocket connections accepted", registry=r
        )
        self.protocol_errors = Counter(
            "realm_protocol_errors", "Client messages refused", ["code"], registry=r
        )
        self.auth_failures = Counter(
            "realm_auth_failures",
            "Failed logins (reason: missing_key, unknown_key)",
            ["reason"],
            registry=r,
        )
        self.refused = Counter(
            "realm_handshakes_refused",
            "Requests refused before a connection opened (reason: shutting_down, capacity, "
            "forbidden (Host/Origin), throttled (failed logins))",
            ["reason"],
            registry=r,
        )
        self._runtime = _RuntimeCollector(runtime) if runtime is not None else None
        if self._runtime is not None:
            r.register(self._runtime)
        self._render_lock = trio.Lock()

    def exposition_now(self) -> bytes:
        """The page, rendered here and now (tests, and callers outside Trio)."""
        if self._runtime is not None:
            self._runtime.take_snapshot()
        return generate_latest(self.registry)

    async def exposition(self) -> bytes:
        """The page: the runtime's figures read on the event loop, the text rendered in a
        worker thread (one scrape at a time), so the loop never waits for it."""
        async with self._render_lock:
            if self._runtime is not None:
                self._runtime.take_snapshot()
            return await trio.to_thread.run_sync(generate_latest, self.registry)


async def serve_metrics(
    metrics: ServerMetrics,
    host: str,
    port: int,
    *,
    policy: AccessPolicy | None = None,
    send_timeout: float = 10.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` (Prometheus text format) until cancelled; started() gets the port.

    ``policy`` checks each request's Host and Origin as the WebSocket port does. A response
    is sent whole within ``send_timeout`` seconds, or the cut is logged as a warning.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def answer(stream: trio.SocketStream, peer: str) -> HttpResponse | None:
        request = None
        with trio.move_on_after(REQUEST_SECONDS):
            try:
                request = await read_request(stream, peer=peer)
            except BadRequest as e:
                return text_response(e.status, f"{e.status}: not an HTTP request ({e.reason})\n")
        if request is None:  # closed, or silent too long
            return None
        refusal = policy.refusal(request) if policy is not None else None
        if refusal is not None:
            return text_response(403, f"403: {refusal}\n")
        if request.method != "GET":
            return text_response(405, "405: GET only\n", (("Allow", "GET"),))
        if request.path not in ("/metrics", "/"):
            return text_response(404, "404: try GET /metrics\n")
        try:
            body = await metrics.exposition()
        except Exception:
            log.exception("the metrics page could not be rendered")
            return text_response(500, "500: the metrics page could not be rendered (logged)\n")
        return HttpResponse(200, body, CONTENT_TYPE)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            host, peer_port = stream.socket.getpeername()[:2]
            peer = f"{host}:{peer_port}"
        except OSError:
            host, peer = "", "?"
        try:
            response = await answer(stream, str(host))
            if response is not None:
                size = len(response.body)
                if not await send_response(stream, response, timeout=send_timeout):
                    log.warning(
                        "metrics response to %s (HTTP %d, %d bytes) was cut short: the client "
                        "did not read it within %g s",
                        peer, response.status, size, send_timeout,
                    )  # fmt: skip
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # one scrape's failure never ends the endpoint
            log.exception("metrics request from %s failed", peer)
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])
