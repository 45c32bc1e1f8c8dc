"""Server metrics (prometheus-client) and the HTTP endpoint that exposes them.

Counters and histograms are updated by the server as calls happen; the runtime's own figures
(batch sizes, queues, pager hits) are read from ``Runtime.statistics()`` when scraped, by a
custom collector. Each server has its own registry, so several servers in one process (tests)
do not mix their figures. The endpoint is a small Trio HTTP responder owned by the server's
nursery (prometheus-client's own HTTP server would run a bare thread).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..actors import Runtime

log = logging.getLogger("realm.server")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _RuntimeCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        stats = self.runtime.statistics()
        b = stats.batcher
        yield CounterMetricFamily("realm_batch_steps", "Batched forward steps run", value=b.steps)
        yield CounterMetricFamily(
            "realm_batch_sequences", "Sequence-steps run in batched steps", value=b.sequences
        )
        yield GaugeMetricFamily(
            "realm_batch_size_mean", "Mean sequences per batched step",
            value=0.0 if math.isnan(b.mean_batch_size) else b.mean_batch_size,
        )  # fmt: skip
        yield GaugeMetricFamily("realm_batch_queue", "Forward steps waiting", value=b.queued)
        sessions = GaugeMetricFamily("realm_tenant_sessions", "Open sessions", labels=["tenant"])
        inflight = GaugeMetricFamily("realm_tenant_calls_in_flight", "Calls", labels=["tenant"])
        for name, t in stats.tenants.items():
            sessions.add_metric([name], t.get("sessions", 0))
            inflight.add_metric([name], t.get("in_flight", 0))
        yield sessions
        yield inflight
        hits = CounterMetricFamily("realm_pager_hits", "Layer pager hits", labels=["model"])
        misses = CounterMetricFamily("realm_pager_misses", "Layer pager misses", labels=["model"])
        for name in self.runtime.registry.names():
            pager = self.runtime.registry.get(name).pager
            if pager is not None:
                ps = pager.statistics()
                hits.add_metric([name], ps.hits)
                misses.add_metric([name], ps.misses)
        yield hits
        yield misses


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
        if runtime is not None:
            r.register(_RuntimeCollector(runtime))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def serve_metrics(
    metrics: ServerMetrics,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` (Prometheus text format) until cancelled; started() gets the port."""
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
                line = request.split(b"\r\n", 1)[0].split()
                if len(line) < 2 or line[0] != b"GET":
                    status, body, ctype = b"405 Method Not Allowed", b"GET only\n", "text/plain"
                elif line[1].split(b"?")[0] not in (b"/metrics", b"/"):
                    status, body, ctype = b"404 Not Found", b"try /metrics\n", "text/plain"
                else:
                    status, body, ctype = b"200 OK", metrics.exposition(), CONTENT_TYPE
                head = (
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype.encode()
                    + b"\r\nContent-Length: " + str(len(body)).encode()
                    + b"\r\nConnection: close\r\n\r\n"
                )  # fmt: skip
                await stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # one scrape's failure never ends the endpoint
            log.exception("metrics request failed")
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])
