"""Balancer benchmark: what nginx in front of Realm servers adds, per call and per token.

    python -m benchmarks.balancer [--quick] [--json] [--isa LEVEL] [--only SUBSTRING]
                                  [--servers N]

N ``realm serve`` processes (3; the built-in model, tenants with API keys) run behind Debian's
nginx with the shipped site file (deploy/nginx/, as tests/deploy runs it: its upstream and
listen lines replaced), everything on 127.0.0.1. One tenant's key is used throughout; its home
server (where nginx's consistent hash sends it) is found through nginx first. Every case runs
the same work both ways in the same run, in alternating blocks: **direct** (to the home
server's own port) and **through nginx**. The peer (the limit column) is the direct path, and
ratio = through nginx / direct, in seconds (1.00: nothing added). The note gives the time
nginx adds (the difference of the medians) and the p99 of both paths.

Cases:
    ws call     ``system_health`` on one open WebSocket, calls one after another: per call.
    http call   ``GET /v1/models`` with the key, a new TCP connection each (Realm closes every
                HTTP connection after its response): per request, connect to last byte.
    connect     a new WebSocket (TCP, handshake), one ``system_health``, the close: what a
                client's reconnect costs.
    token       one ``generate`` stream (greedy, ``max_tokens`` 200) per sample: the time per
                token event after the first, as the reader sees it (median of samples); the
                note adds the time to the first token of both paths.

The servers' kernel level is ``--isa`` (default: the best this CPU has); their native pools
use every core. nginx: 1 worker process. Needs nginx (``apt-get install nginx-light``).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import attrs
import trio

from realm import kernels
from realm.client import connect
from realm.server import hash_key

from ._common import (
    Limit,
    Reporter,
    Result,
    Timing,
    argument_parser,
    describe_machine,
    format_seconds,
)

SUITE: Final = "balancer"
ROOT: Final = Path(__file__).resolve().parents[1]
KEY: Final = "bench-balancer-key"
PROMPT: Final = "The Python interpreter"
STREAM_TOKENS: Final = 200  # the built-in model's context is 256
CASES: Final = ("ws call", "http call", "connect", "token")


@attrs.frozen
class Profile:
    calls: int  # ws call and http call: per path
    block: int  # calls in a row before the other path's turn
    connects: int  # connect: per path
    streams: int  # token: samples per path


FULL: Final = Profile(calls=2000, block=100, connects=200, streams=12)
QUICK: Final = Profile(calls=300, block=50, connects=40, streams=4)


def _cluster_module() -> ModuleType:
    """tests/deploy/_cluster.py: the servers and nginx exactly as the balancer test runs
    them (loaded by path: ``tests`` is not a package)."""
    path = ROOT / "tests" / "deploy" / "_cluster.py"
    spec = importlib.util.spec_from_file_location("realm_balancer_cluster", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # attrs classes look their module up
    spec.loader.exec_module(module)
    return module


def _config() -> str:
    return (
        '[server]\nhost = "127.0.0.1"\nport = 0\n\n[models]\nbuiltin = "builtin"\n\n'
        f'[tenants.bench]\napi_keys = ["{hash_key(KEY)}"]\nmax_concurrent_calls = 4\n\n'
        f'[tenants.other]\napi_keys = ["{hash_key(KEY + "-other")}"]\n'
    )


# --- the two paths, sampled alike -----------------------------------------------------------


@attrs.frozen
class Samples:
    direct: list[float]
    nginx: list[float]


def _p(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _alternate(
    fn: Callable[[str], Awaitable[float]], urls: tuple[str, str], n: int, block: int
) -> Samples:
    """``n`` samples of ``fn`` per path, in blocks of ``block``, each path first every other
    round; one untimed warm-up call per path first."""
    out: dict[str, list[float]] = {urls[0]: [], urls[1]: []}
    for url in urls:
        await fn(url)
    turn = 0
    while len(out[urls[1]]) < n:
        order = urls if turn % 2 == 0 else urls[::-1]
        for url in order:
            for _ in range(min(block, n - len(out[url]))):
                out[url].append(await fn(url))
        turn += 1
    return Samples(out[urls[0]], out[urls[1]])


def _rows(case: str, shape: str, samples: Samples, per: str, note: str = "") -> list[Result]:
    d, n = samples.direct, samples.nginx
    direct = Timing(statistics.median(d), min(d), len(d), 1)
    through = Timing(statistics.median(n), min(n), len(n), 1)
    limit = Limit("direct connection", "direct", direct.median, "s", (direct.min,))
    added = through.median - direct.median
    return [
        Result(
            case=case, kernel="direct", shape=shape, wtype="-", batch=1,
            threads=os.cpu_count() or 1, timing=direct, record="limit",
            note=f"p99 {format_seconds(_p(d, 0.99))}",
        ),
        Result(
            case=case, kernel="via nginx", shape=shape, wtype="-", batch=1,
            threads=os.cpu_count() or 1, timing=through, limit=limit,
            ratio=through.median / direct.median,
            note=f"{'+' if added >= 0 else '-'}{format_seconds(abs(added))} per {per}; "
            f"p99 {format_seconds(_p(n, 0.99))}{'; ' + note if note else ''}",
            extra={"added_seconds": added, "p99_seconds": _p(n, 0.99),
                   "direct_p99_seconds": _p(d, 0.99)},
        ),
    ]  # fmt: skip


async def ws_call(urls: tuple[str, str], profile: Profile) -> list[Result]:
    async with connect(urls[0], api_key=KEY) as direct, connect(urls[1], api_key=KEY) as via:
        clients = {urls[0]: direct, urls[1]: via}

        async def one(url: str) -> float:
            t0 = time.perf_counter()
            await clients[url].call("system_health")
            return time.perf_counter() - t0

        samples = await _alternate(one, urls, profile.calls, profile.block)
    return _rows("ws call", "system_health", samples, "call")


async def _http_get(port: int) -> float:
    request = (
        f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
    ).encode()
    t0 = time.perf_counter()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        got = b""
        while chunk := await stream.receive_some(65536):
            got += chunk
    elapsed = time.perf_counter() - t0
    if not got.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET /v1/models on port {port}: {got[:200]!r}")
    return elapsed


async def http_call(ports: tuple[int, int], profile: Profile) -> list[Result]:
    urls = (str(ports[0]), str(ports[1]))
    samples = await _alternate(lambda u: _http_get(int(u)), urls, profile.calls, profile.block)
    return _rows("http call", "GET /v1/models", samples, "request")


async def connects(urls: tuple[str, str], profile: Profile) -> list[Result]:
    async def one(url: str) -> float:
        t0 = time.perf_counter()
        async with connect(url, api_key=KEY, retries=0) as c:
            await c.call("system_health")
        return time.perf_counter() - t0

    samples = await _alternate(one, urls, profile.connects, max(1, profile.connects // 10))
    return _rows("connect", "connect+call+close", samples, "connection")


async def tokens(urls: tuple[str, str], profile: Profile) -> list[Result]:
    params = {"prompt": PROMPT, "max_tokens": STREAM_TOKENS, "temperature": 0}
    firsts: dict[str, list[float]] = {urls[0]: [], urls[1]: []}
    counts: set[int] = set()
    async with connect(urls[0], api_key=KEY) as direct, connect(urls[1], api_key=KEY) as via:
        clients = {urls[0]: direct, urls[1]: via}

        async def one(url: str) -> float:
            t0 = time.perf_counter()
            stamps: list[float] = []
            async with clients[url].stream("generate", params) as events:
                async for ev in events:
                    if ev.kind == "token":
                        stamps.append(time.perf_counter())
            if len(stamps) < 2:
                raise RuntimeError(f"a stream of {len(stamps)} token events")
            counts.add(len(stamps))
            firsts[url].append(stamps[0] - t0)
            return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

        samples = await _alternate(one, urls, profile.streams, 1)
    ttft = {u: statistics.median(v[1:] or v) for u, v in firsts.items()}
    note = (
        f"first token {format_seconds(ttft[urls[1]])} vs {format_seconds(ttft[urls[0]])}; "
        f"{'/'.join(map(str, sorted(counts)))} events"
    )
    return _rows("token", f"generate {STREAM_TOKENS}", samples, "token", note)


async def run(
    reporter: Any, selected: set[str], profile: Profile, isa: str | None, servers: int
) -> None:
    cluster_mod = _cluster_module()
    nginx = cluster_mod.find_nginx()
    if nginx is None:
        reporter.error(SUITE, "nginx is not installed (apt-get install -y nginx-light)")
        return
    with (
        tempfile.TemporaryDirectory(prefix="realm-balancer-") as tmp,
        cluster_mod.open_cluster(nginx, Path(tmp), _config(), servers, isa=isa) as c,
    ):
        async with connect(c.url, api_key=KEY) as probe:
            home = c.by_id((await probe.health())["server"])
        direct = f"ws://127.0.0.1:{home.port}"
        urls = (direct, c.url)
        reporter.text(
            f"{len(c.servers)} servers {', '.join(s.server_id for s in c.servers)}; "
            f"nginx on {c.url}; the key's home: {home.server_id}"
        )
        for case, fn in (
            ("ws call", lambda: ws_call(urls, profile)),
            ("http call", lambda: http_call((home.port, c.port), profile)),
            ("connect", lambda: connects(urls, profile)),
            ("token", lambda: tokens(urls, profile)),
        ):
            if case not in selected:
                continue
            reporter.section(case)
            try:
                for row in await fn():
                    reporter.result(row)
            except Exception as e:  # report, go on with the other cases
                reporter.error(case, f"{type(e).__name__}: {e}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser(SUITE, __doc__.splitlines()[0] if __doc__ else SUITE)
    parser.add_argument(
        "--servers", type=int, default=3, metavar="N", help="realm serve processes (default 3)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        parser.error("--threads: the servers' native pools use every core in this suite")
    if not 1 <= args.servers <= 16:
        parser.error(f"--servers must be in 1..16, not {args.servers}")
    selected = {c for c in CASES if args.only is None or args.only in c}
    if not selected:
        parser.error(f"no case name contains {args.only!r}; names: {', '.join(CASES)}")
    profile = QUICK if args.quick else FULL
    isa = kernels.active_isa().name if args.isa is not None else None
    reporter = Reporter(json_lines=args.json)
    settings = {
        "quick": args.quick,
        "only": args.only,
        "servers": f"{args.servers} x realm serve (built-in model), servers' isa "
        f"{isa or kernels.detected_isa().name}",
        "balancer": "nginx, deploy/nginx/realm.conf (hash $realm_route_key consistent), 1 worker",
        "ws/http calls": f"{profile.calls} per path in blocks of {profile.block}",
        "connects": f"{profile.connects} per path",
        "streams": f"{profile.streams} per path, max_tokens {STREAM_TOKENS}, greedy",
    }
    reporter.machine(describe_machine(SUITE, os.cpu_count() or 1, settings, numpy_limit=False))
    trio.run(run, reporter, selected, profile, isa, args.servers)
    reporter.text("")
    reporter.text(
        "median/min per call, request, connection or token event; limit = the same on a direct "
        "connection to the key's home server, same run; ratio = via nginx / direct."
    )
    reporter.end()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
