"""Metrics no client can inflate, rendered off the event loop, never cut short silently.

Every test runs under ``trio.fail_after(LIMIT)``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from realm.server import TenantSpec, hash_key, open_server

from ._wire import LIMIT, call_text, config, get, http_exchange, open_client, open_tcp

METRICS = get("/metrics")


def label_values(page: str, label: str) -> set[str]:
    """Every value ``label`` takes on the page."""
    found = set()
    for line in page.splitlines():
        if line.startswith("#") or f'{label}="' not in line:
            continue
        found.add(line.split(f'{label}="', 1)[1].split('"', 1)[0])
    return found


async def test_no_client_string_becomes_a_label(model_path: Path) -> None:
    tenants = {"acme": TenantSpec("acme", api_key_hashes=(hash_key("k1"),), calls_per_second=1)}
    names = [f"fn_{i}_{'x' * i}" for i in range(40)]
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=tenants, metrics=True)) as server:
            headers = [("Authorization", "Bearer k1")]
            async with open_client("trio", server.url, headers=headers) as c:
                for i, name in enumerate(names):  # unknown, or refused by the rate limit first
                    _, msg = await c.request(i, name, {"prompt": "x"})
                    assert msg["error"]["code"] in ("UNKNOWN_FUNCTION", "RATE_LIMITED")
                await c.request("t", "system_health", tenant_id="no-such-tenant")
                await c.request("h", "system_health")
                await c.send('{"type":"surprise","id":"s"}')
                await c.recv()
                _, msg = await c.request("gen", "generate", {"prompt": "x"})  # rate limited
                assert msg["error"]["code"] == "RATE_LIMITED"
            status, _, body = await http_exchange(server.metrics_port, METRICS)
    assert status == 200
    page = body.decode()
    assert not any(name in page for name in names)
    assert "no-such-tenant" not in page and "surprise" not in page
    assert label_values(page, "function") == {"<unknown>", "system_health", "generate"}
    assert label_values(page, "tenant") == {"acme"}
    assert label_values(page, "code") == {
        "UNKNOWN_FUNCTION", "RATE_LIMITED", "INVALID_REQUEST", "UNAUTHORIZED",
    }  # fmt: skip
    lines = page.splitlines()
    unknown = [ln for ln in lines if ln.startswith('realm_calls_total{function="<unknown>"')]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in unknown) == len(names)


class _Gate(Collector):
    """A collector that proves the event loop runs while it renders: it waits (in the render's
    thread) until the loop has delivered ``tokens`` more tokens to the test's clients. Rendered
    on the event loop, it could only wait out its timeout."""

    def __init__(self, seen: list[int], tokens: int) -> None:
        self.seen = seen
        self.tokens = tokens
        self.renders: list[tuple[bool, bool]] = []  # (off the loop's thread, tokens flowed)

    def describe(self) -> list[Any]:
        return []  # (else registering it would collect it once)

    def collect(self) -> Iterator[Any]:
        off_loop = threading.current_thread() is not threading.main_thread()
        start = self.seen[0]
        flowed = False
        for _ in range(500):  # up to 5 s
            if self.seen[0] >= start + self.tokens:
                flowed = True
                break
            threading.Event().wait(0.01)
        self.renders.append((off_loop, flowed))
        yield GaugeMetricFamily("realm_test_gate", "test", value=1)


async def test_scraping_while_100_streams_run(model_path: Path) -> None:
    # the open tenant: 100 streams in flight, 16 running at once (the others queued for a slot)
    seen = [0]
    gate = _Gate(seen, tokens=20)
    streams: dict[tuple[int, int], list[int]] = {}
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, metrics=True)) as server:
            server.metrics.registry.register(gate)
            started = trio.Event()

            async def client(n: int) -> None:
                async with open_client("trio", server.url, queue=64) as c:
                    for i in range(10):
                        params = {"prompt": f"Once upon {n} {i}", "max_tokens": 20}
                        await c.send(call_text(i, "generate", {**params, "temperature": 0}))
                        streams[n, i] = []
                    done = 0
                    while done < 10:
                        msg = await c.recv()
                        if msg["type"] == "stream":
                            streams[n, msg["id"]].append(msg["data"]["index"])
                            seen[0] += 1
                            if seen[0] >= 100:
                                started.set()
                        else:
                            assert msg["type"] == "result", msg
                            done += 1

            async with trio.open_nursery() as nursery:
                for n in range(10):
                    nursery.start_soon(client, n)
                await started.wait()
                for _ in range(3):
                    status, _, body = await http_exchange(server.metrics_port, METRICS)
                    assert status == 200 and b"realm_test_gate 1.0" in body
    assert len(streams) == 100
    assert all(indices == list(range(len(indices))) for indices in streams.values())
    assert gate.renders == [(True, True)] * 3, gate.renders


async def test_a_failed_render_is_a_500_not_a_truncated_page(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Collector):
        def describe(self) -> list[Any]:
            return []

        def collect(self) -> Iterator[Any]:
            yield GaugeMetricFamily("realm_test_half", "test", value=1)
            raise RuntimeError("collector failed half way")

    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, metrics=True)) as server:
            server.metrics.registry.register(broken := Broken())
            status, headers, body = await http_exchange(server.metrics_port, METRICS)
            assert status == 500 and b"could not be rendered" in body
            assert int(headers["content-length"]) == len(body)
            assert "the metrics page could not be rendered" in caplog.text
            server.metrics.registry.unregister(broken)
            status, _, _ = await http_exchange(server.metrics_port, METRICS)
            assert status == 200  # the endpoint goes on


async def test_a_page_the_client_does_not_read_is_reported_cut(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Big(Collector):
        def describe(self) -> list[Any]:
            return []

        def collect(self) -> Iterator[Any]:
            g = GaugeMetricFamily("realm_test_big", "test", labels=["pad"])
            g.add_metric(["x" * (32 << 20)], 1)  # a 32 MiB page, more than socket buffers hold
            yield g

    caplog.set_level(logging.WARNING, logger="realm.server")
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, metrics=True, send_timeout_seconds=0.5)) as srv:
            srv.metrics.registry.register(Big())
            stream = await open_tcp(srv.metrics_port)
            async with stream:
                await stream.send_all(METRICS)  # and never reads the answer
                while "cut short" not in caplog.text:
                    await trio.sleep(0.05)
    (line,) = [r.getMessage() for r in caplog.records if "cut short" in r.getMessage()]
    assert "HTTP 200" in line and "bytes" in line


def test_each_paged_models_pager_figures_are_exported() -> None:
    """Every PagerStatistics figure of a paged model is a metric labelled with its name."""
    import types

    from realm.model._pager import PagerStatistics
    from realm.server._metrics import _PAGER_FIGURES, _RuntimeCollector

    ps = PagerStatistics(
        hits=5, misses=2, prefetches=3, prefetch_hits=1, prefetch_late=0, evictions=4,
        bytes_paged=1 << 20, resident_bytes=2 << 20, resident_layers=(0,), pinned_layers=(),
        max_resident_bytes=8 << 20, budget_resident_bytes=2 << 20, fixed_bytes=3 << 20,
        pageable_bytes=16 << 20, granule_bytes=2 << 20,
    )  # fmt: skip
    batcher = types.SimpleNamespace(steps=0, sequences=0, mean_batch_size=0.0, queued=0)
    stats = types.SimpleNamespace(batcher=batcher, tenants={}, models={"big": ps})
    collector = _RuntimeCollector(types.SimpleNamespace(statistics=lambda: stats))
    collector.take_snapshot()
    got = {m.name: m.samples for m in collector.collect()}
    for _, _, field in _PAGER_FIGURES:
        name = f"realm_pager_{field}"
        samples = [s for s in got[name] if not s.name.endswith("_created")]
        assert [(s.labels, s.value) for s in samples] == [({"model": "big"}, getattr(ps, field))]
